#!/bin/bash
# Validation studies too slow for the CPU machine, for a lent GPU machine (one H200), each
# under its own time limit; what completed comes back as one archive of the study's store.
#   OUT=/some/folder PY=python3 bash validation/gpu_studies.sh
# Then, here: tar xzf <OUT>/hierarchical_d80_k1024_cuda.tar.gz -C validation/results/ and
# rerun the study command below (every cell found in the store, nothing recomputed) to write
# its report.
#
# (HIER_CONFIG / HIER_LIMIT override the configuration and the time limit: a CPU rehearsal.)
#
# Issue #16's d = 80 goals need K = 1024 theta-particles (at K = 256 the floors of the W1
# distances, 0.07-0.08 sd, sit at the 0.1 goal): one such cell takes over 1.5 h on one CPU
# core, 77-119 s on an H200 (2026-12-04), so the six need two loans. The cells carry
# "device": "cuda", so they are stored beside the CPU cells, not over them; the store starts
# from the cells committed under validation/results/ (a fresh machine computes only the
# missing ones).
set -u
OUT=${OUT:-/tmp/gpu_studies}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
LOG="$OUT/studies.log"
: > "$LOG"
STORE=/tmp/bfd_studies/hierarchical_d80_k1024_cuda
mkdir -p "$STORE"
SAVED=validation/results/$(basename "$STORE")
[ -d "$SAVED" ] && cp -r "$SAVED"/. "$STORE"/
t0=$SECONDS
CONFIG=${HIER_CONFIG:-'{"dims":[80],"K":1024,"N":256,"moves":6,"steps":100,"seeds":[0,1,2],"priors":["true","alt"],"device":"cuda"}'}
timeout "${HIER_LIMIT:-420}" $PY validation/run_studies.py hierarchical --out "$STORE" \
  --config "$CONFIG" >> "$LOG" 2>&1
echo "hierarchical: exit $? in $((SECONDS - t0)) s" >> "$LOG"
tar czf "$OUT/hierarchical_d80_k1024_cuda.tar.gz" -C "$(dirname "$STORE")" "$(basename "$STORE")"
echo done >> "$LOG"
