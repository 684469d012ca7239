# Sourced by scripts/ci_sglang.sh and scripts/test.sh: the venv with SGLang 0.5.23 on its CPU path.
#   SGLANG_VENV  venv path (default: .venv-sglang in the repo root); PYTHON: interpreter for a new venv (default python3)
# Usage: ROOT=<repo>; source "$ROOT/scripts/sglang_venv.sh" PIP_SPECS...  → sets VENV, PIP; fills the venv when SGLang
# is missing (~2 min, 3.4 GB), then installs PIP_SPECS (e.g. -e "$ROOT[test]") keeping torch 2.13.0.
#
# What is installed (the set that ran SGLang 0.5.23 on CPU): sglang pins torch 2.14.1 and a CPU kernel package
# that is not on PyPI, so: torch==2.13.0 (CPU), SGLang's runtime requirements (tests/sglang/requirements-sglang-cpu.txt),
# `sglang==0.5.23` with --no-deps, and two import-only stand-ins (tests/sglang/stubs: sgl_kernel, torchvision) put on
# PYTHONPATH by tests/sglang/conftest.py. They are test-only; a real SGLang install brings the real packages.
source "$ROOT/scripts/venv_common.sh"
open_venv "${SGLANG_VENV:-$ROOT/.venv-sglang}"
if ! has_dist sglang 0.5.23; then
    echo "== installing SGLang 0.5.23's CPU set (about 3.4 GB, a few minutes)" >&2
    "${PIP[@]}" install "torch==2.13.0"
    "${PIP[@]}" install -r "$ROOT/tests/sglang/requirements-sglang-cpu.txt" "torch==2.13.0"
    "${PIP[@]}" install --no-deps "sglang==0.5.23"
fi
[ $# -eq 0 ] || "${PIP[@]}" install "$@" "torch==2.13.0"
