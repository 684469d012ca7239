# Sourced by scripts/vllm_venv.sh and scripts/sglang_venv.sh (the engines' venvs).
# open_venv PATH: creates the venv when missing (interpreter: $PYTHON, default python3); sets VENV and PIP.
open_venv() {
    VENV=$1
    [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
}
# has_dist NAME VERSION: whether the venv holds that distribution at that version.
has_dist() {
    "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null
}
