#!/bin/bash
# The GPU checks of issue #9 / #18, as one script for a lent GPU machine (under 10 minutes on
# one H200, each step under its own time limit so that a slow step costs only its own table).
# Run from the repository root after `make venv`, or with the machine's own python:
#   OUT=/some/folder PY=python3 bash benchmarks/gpu_checks.sh
# Writes at most 8 files to $OUT (a device loan returns no more): steps.log (nvidia-smi, each
# step's exit status and seconds), the CUDA tests' log, the benchmark tables (gmm.md, batch.md,
# unet.md; rows in cuda.jsonl) and the memory floor of the samplers' own work (floor.md,
# floor.jsonl).
set -u
OUT=${OUT:-benchmarks/results/cuda}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1
# the tables: the quality warnings of these fixed benchmark problems (the reference start of
# a non-centred mixture) are not the point here; the tests' log keeps its warnings
BENCH_WARNINGS=ignore
LOG="$OUT/steps.log"
rm -f "$OUT"/*.md "$OUT"/*.log "$OUT"/*.jsonl  # the steps append
nvidia-smi > "$LOG" 2>&1
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))" >> "$LOG" 2>&1
step() {  # step NAME LIMIT_S OUTFILE CMD...
  local name=$1 limit=$2 out=$3
  shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$out" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s (limit $limit s)" >> "$LOG"
}
# 1. CUDA tests: GPU/CPU agreement on the same random numbers, SMC samplers against the
#    exact posterior on the device, distances on the device, device errors (only the files
#    with CUDA tests are collected: the machine may lack the optional test dependencies)
step cuda_tests 150 "$OUT/cuda_tests.log" $PY -m pytest -q -m cuda -p no:cacheprovider \
  tests/test_cuda.py tests/test_bad_input.py tests/test_diagnostics.py tests/test_benchmarks.py
# 2. throughput and overhead at large N (one process: on a GPU the peak memory is the
#    allocator's own high-water mark, reset before each configuration)
step gmm 120 "$OUT/gmm.md" env PYTHONWARNINGS=$BENCH_WARNINGS $PY -m benchmarks --device cuda --prior gmm --dims 80,800 \
  --methods MCGdiff,TDS,FPS-SMC,DDRM --particles 1024,16384,65536,262144 --steps 20 --same-process \
  --out "$OUT/cuda.jsonl"
# 2b. N = 10^6 at d = 800 (TDS's peak at N = 262 144 was 16 GB: about 67 GB here)
step gmm_1m 90 "$OUT/gmm.md" env PYTHONWARNINGS=$BENCH_WARNINGS $PY -m benchmarks --device cuda \
  --prior gmm --dims 800 --methods MCGdiff,TDS,FPS-SMC,DDRM --particles 1048576 --steps 20 \
  --same-process --out "$OUT/cuda.jsonl"
# 3. B = 16 problems in one call against 16 calls (the issue's >= 8x target)
step batch 90 "$OUT/batch.md" env PYTHONWARNINGS=$BENCH_WARNINGS $PY -m benchmarks --device cuda --prior gmm --dims 80 \
  --methods MCGdiff,TDS,DDRM --particles 256,4096 --steps 20 --batch-speedup 16
# 4. a U-Net prior (the network's cost dominates), then float64
step unet28 80 "$OUT/unet.md" env PYTHONWARNINGS=$BENCH_WARNINGS $PY -m benchmarks --device cuda --prior unet28 --dims 0 \
  --methods MCGdiff,TDS,FPS-SMC,DDRM --particles 1024,8192 --steps 10 --same-process \
  --out "$OUT/cuda.jsonl"
step gmm_f64 50 "$OUT/gmm.md" env PYTHONWARNINGS=$BENCH_WARNINGS $PY -m benchmarks --device cuda --prior gmm --dims 800 \
  --methods MCGdiff,TDS,FPS-SMC --particles 65536 --steps 20 --dtype float64 --same-process \
  --out "$OUT/cuda.jsonl"
step unet32 60 "$OUT/unet.md" env PYTHONWARNINGS=$BENCH_WARNINGS $PY -m benchmarks --device cuda --prior unet32 --dims 0 \
  --methods MCGdiff,FPS-SMC --particles 1024,4096 --steps 10 --chunk-size 4096 \
  --same-process --out "$OUT/cuda.jsonl"
# 5. the samplers' own work against the memory floor, on the device (issue #18): wall time,
#    synchronised around each network call
step floor 120 "$OUT/floor.md" env PYTHONWARNINGS=$BENCH_WARNINGS $PY -m benchmarks.floor \
  --device cuda --shape 3,256,256 --particles 32,256 --methods FPS-SMC,MCGdiff,TDS,DPS \
  --out "$OUT/floor.jsonl"
step floor_d800 60 "$OUT/floor.md" env PYTHONWARNINGS=$BENCH_WARNINGS $PY -m benchmarks.floor \
  --device cuda --shape 800 --particles 65536 --methods FPS-SMC,MCGdiff,TDS,DPS \
  --out "$OUT/floor.jsonl"
echo done >> "$LOG"
