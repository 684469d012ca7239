#!/usr/bin/env bash
# SGLang plugin tests (tests/sglang) against real SGLang 0.5.23 on its CPU path, in a venv of their own.
#   SGLANG_VENV  venv path (default: .venv-sglang in the repo root); created and filled when missing (~2 min, 3.4 GB)
#   PYTHON       interpreter for a new venv (default: python3)
# Extra arguments go to pytest, e.g. scripts/ci_sglang.sh -k freed
#
# What is installed (the set that ran SGLang 0.5.23 on CPU): sglang pins torch 2.14.1 and a CPU kernel package
# that is not on PyPI, so: torch==2.13.0 (CPU), SGLang's runtime requirements (tests/sglang/requirements-sglang-cpu.txt),
# `sglang==0.5.23` with --no-deps, and two import-only stand-ins (tests/sglang/stubs: sgl_kernel, torchvision) put on
# PYTHONPATH by tests/sglang/conftest.py. They are test-only; a real SGLang install brings the real packages.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SGLANG_VENV:-$ROOT/.venv-sglang}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '0.5.23')" 2>/dev/null
then
    "${PIP[@]}" install "torch==2.13.0"
    "${PIP[@]}" install -r "$ROOT/tests/sglang/requirements-sglang-cpu.txt" "torch==2.13.0"
    "${PIP[@]}" install --no-deps "sglang==0.5.23"
fi
"${PIP[@]}" install -e "$ROOT[test]" "torch==2.13.0"

cd "$ROOT"
# SGLang's CPU engine, its strict KV-pool checks (leak / double free / page invariants), no hub
export SGLANG_USE_CPU_ENGINE=1 HF_HUB_OFFLINE=1 \
    SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY=2 SGLANG_CHECK_KV_PAGE_INVARIANTS=1 \
    SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1
unset KVPRUNE_CONFIG
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/sglang "$@"
