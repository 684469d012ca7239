#!/usr/bin/env bash
# One device call: install carried wheels and this package, run the kernel benchmark (and the floors/resources
# report with REPORT=1, the config sweep with SWEEP=1), then the kernel tests on the GPU.
# Usage (device tool, repo root, carry .whl): [REPORT=1] [SWEEP=1] bash benchmarks/gpu_run.sh [pytest-args...]
set -euo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/pkg . >/dev/null
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
REPO=$PWD
(cd /tmp && python3 "$REPO/benchmarks/kernels.py" --out "$OUT" ${BENCH_ARGS:-})
[ "${REPORT:-0}" = 1 ] && (cd /tmp && python3 "$REPO/benchmarks/kernels.py" --report --out "$OUT")
[ "${SWEEP:-0}" = 1 ] && (cd /tmp && python3 "$REPO/benchmarks/kernels.py" --sweep --out "$OUT" | tee "$OUT/sweep.log")
# extra arguments go to pytest (e.g. -k gpu); the kernel test files always run from the repo's tests/
cd /tmp && python3 -m pytest "$REPO/tests/test_colreduce.py" "$REPO/tests/test_colreduce_varlen.py" \
    "$REPO/tests/test_colreduce_paged.py" "$REPO/tests/test_colreduce_kernels.py" -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log" | tail -25
