#!/usr/bin/env bash
# vLLM plugin tests (tests/vllm) against real vLLM 0.32 (CPU build), in a venv of their own.
#   VLLM_VENV   venv path (default: .venv-vllm in the repo root); created and filled when missing (~80 s, 3.5 GB)
#   PYTHON      interpreter for a new venv (default: python3)
# Extra arguments go to pytest, e.g. scripts/ci_vllm.sh -k snapkv
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/vllm_venv.sh" -e "$ROOT[test]"

cd "$ROOT"
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
unset KVPRUNE_CONFIG VLLM_PLUGINS
echo "== pytest"      # scripts/test.sh waits for this line (the -e install above is done)
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm "$@"
