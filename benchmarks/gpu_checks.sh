#!/bin/bash
# The GPU checks of issue #9, as one script for a lent GPU machine (about 10 minutes on one
# H200). Run from the repository root after `make .venv` (or with the venv carried over):
#   OUT=/some/folder bash benchmarks/gpu_checks.sh
# Writes the CUDA tests' log and the benchmark tables (markdown + JSON lines) to $OUT.
set -u
OUT=${OUT:-benchmarks/results/cuda}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# 1. CUDA tests: GPU/CPU agreement on the same random numbers, SMC samplers against the
#    exact posterior on the device, distances on the device, device errors
$PY -m pytest -q -m cuda tests > "$OUT/cuda_tests.log" 2>&1
# 2. throughput and overhead at large N, float32 and float64
$PY -m benchmarks --device cuda --prior gmm --dims 80,800 --methods MCGdiff,TDS,FPS-SMC,DDRM \
  --particles 1024,16384,65536 --steps 20 --out "$OUT/cuda.jsonl" > "$OUT/gmm.md" 2>&1
$PY -m benchmarks --device cuda --prior gmm --dims 800 --methods MCGdiff,TDS,FPS-SMC \
  --particles 65536 --steps 20 --dtype float64 --out "$OUT/cuda.jsonl" > "$OUT/gmm_f64.md" 2>&1
$PY -m benchmarks --device cuda --prior unet28 --dims 0 --methods MCGdiff,TDS,FPS-SMC,DDRM \
  --particles 1024,8192 --steps 10 --out "$OUT/cuda.jsonl" > "$OUT/unet28.md" 2>&1
$PY -m benchmarks --device cuda --prior unet32 --dims 0 --methods MCGdiff,FPS-SMC \
  --particles 1024,4096 --steps 10 --chunk-size 4096 --out "$OUT/cuda.jsonl" > "$OUT/unet32.md" 2>&1
# 3. B = 16 problems in one call against 16 calls (the issue's >= 8x target)
$PY -m benchmarks --device cuda --prior gmm --dims 80 --methods MCGdiff,TDS,DDRM \
  --particles 256,4096 --steps 20 --batch-speedup 16 > "$OUT/batch.md" 2>&1
echo done > "$OUT/DONE"
