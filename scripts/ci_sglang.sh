#!/usr/bin/env bash
# SGLang plugin tests (tests/sglang) against real SGLang 0.5.23 on its CPU path, in a venv of their own.
#   SGLANG_VENV  venv path (default: .venv-sglang in the repo root); created and filled when missing (~2 min, 3.4 GB)
#   PYTHON       interpreter for a new venv (default: python3)
# Extra arguments go to pytest, e.g. scripts/ci_sglang.sh -k freed
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/sglang_venv.sh" -e "$ROOT[test]"

cd "$ROOT"
# SGLang's CPU engine, its strict KV-pool checks (leak / double free / page invariants), no hub
export SGLANG_USE_CPU_ENGINE=1 HF_HUB_OFFLINE=1 \
    SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY=2 SGLANG_CHECK_KV_PAGE_INVARIANTS=1 \
    SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1
unset KVPRUNE_CONFIG
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/sglang "$@"
