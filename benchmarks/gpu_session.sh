#!/bin/bash
# One device loan's work, as one command of at most ~9.5 minutes: the GPU checks
# (benchmarks/gpu_checks.sh, ~3 minutes on an H200), then the validation studies
# (validation/gpu_studies.sh) for whatever time is left of BUDGET_S. Returns 3 files in $OUT
# (a loan brings back at most 8): checks.tar.gz (the checks' outputs; untar into
# benchmarks/results/cuda/<run>/), studies.log and hierarchical_d80_k1024_cuda.tar.gz.
# On the device machine (its own python and torch; pyro-ppl, arviz and their dependencies
# carried as wheels in .whl/, an ignored folder named in the call's carry):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD; OUT=$OUT bash benchmarks/gpu_session.sh
# with timeout_s 590. The wheels, here (python 3.12 on the device):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pyro-ppl==1.9.1 pyro-api arviz==0.23.0 xarray-einstats h5netcdf platformdirs
set -u
: "${OUT:?set OUT}"
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-560}
T0=$SECONDS
CHECKS=/tmp/gpu_checks
OUT=$CHECKS PY=$PY bash benchmarks/gpu_checks.sh
tar czf "$OUT/checks.tar.gz" -C "$CHECKS" .
grep -v '^[|+ ]' "$CHECKS/steps.log"
tail -3 "$CHECKS/cuda_tests.log"
LEFT=$((BUDGET_S - (SECONDS - T0) - 25))
echo "studies: $LEFT s"
if [ "$LEFT" -gt 60 ]; then
  HIER_LIMIT=$LEFT OUT=$OUT PY=$PY bash validation/gpu_studies.sh
  tail -c 1500 "$OUT/studies.log"
fi
