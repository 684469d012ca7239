#!/usr/bin/env bash
# Issue 19 in one device call (≤ SWEEP_BUDGET s, default 285): the serving-shape sweep (ours new vs old launch path, flash-colreduce,
# naive torch, SDPA, host time, floors), the plugin's per-layer prune path vs the layer's attention, and the kernel
# tests on the GPU. Everything goes under $OUT, packed into $OUT/all.tgz at the end (one file comes back).
# Usage (device tool, repo root, carry [".whl"] holding flash_colreduce-0.2.2-py3-none-any.whl):
#   bash benchmarks/gpu_sweep.sh          # the sweep, prune path and kernel tests (cut at 140 s: the 179 tests took
#                                         # 116 s beside other GPU work in the sixteenth session; a 110 s cut
#                                         # stopped them after the last test, before pytest's summary)
#   TILES_BUDGET=120 bash benchmarks/gpu_sweep.sh   # and then tile configs at the big goal shapes (goal_tiles.json)
#   bash benchmarks/gpu_sweep.sh tests    # the kernel tests alone (KERNEL_TEST_LIMIT seconds, default 400)
#   bash benchmarks/gpu_sweep.sh tests path   # the kernel tests, then the per-layer prune path (prune_path.py)
#   SWEEP_ONLY="varlen paged" KERNEL_TESTS=0 bash benchmarks/gpu_sweep.sh   # only the shapes whose names hold one
#                                         # of these words; without the kernel tests (when another call runs them)
#   bash benchmarks/gpu_sweep.sh passes   # the full causal experiments (benchmarks/row_pass.py, column_pass.py):
#                                         # their variants against float64 on the GPU (tests/test_experiments.py),
#                                         # then timed (row_pass.json, column_pass.json; PASSES_LIMIT s each;
#                                         # PASSES="row_pass" times one)
#   bash benchmarks/gpu_sweep.sh gluon    # the Gluon passes (benchmarks/gluon_row_pass.py, gluon_column_pass.py):
#                                         # their float64 checks on the GPU, then timed beside the product and SDPA
#   bash benchmarks/gpu_sweep.sh script tma_ab   # benchmarks/NAME.py --out $OUT after the set-up (SCRIPT_LIMIT s
#                                         # each; several names in turn; SCRIPT_CHECK=1: each one's --check first)
#   bash benchmarks/gpu_sweep.sh ncu      # hardware counters of both passes at the big goal shapes and of SDPA
#                                         # (benchmarks/ncu_passes.py: ncu_raw.csv, ncu_passes.json)
# Without .whl the flash-colreduce column is skipped (the sweep says so).
set -uo pipefail
OUT=$(realpath -m "${OUT:-out}")
mkdir -p "$OUT"
REPO=$PWD

kernel_tests() {    # $1: seconds; rc 124 = cut by the limit (the log's progress shows how far it got)
    XDIST=""
    python3 -c "import xdist" 2>/dev/null && XDIST="-n 12"
    # In a process group of their own, killed whole at the limit: a plain `timeout` stops pytest but not
    # necessarily its xdist workers, which would then load the host while the sweep times host µs.
    # -v: each test's name as it ends (a cut run still says which ran); faulthandler: a hung test's stacks
    setsid python3 -m pytest "$REPO"/tests/test_colreduce*.py -v -rfE --tb=short -o faulthandler_timeout=90 \
        -p no:cacheprovider $XDIST \
        > "$OUT/pytest.log" 2>&1 &
    local pid=$! waited=0 rc
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$1" ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$pid" 2>/dev/null; then rc=124; else wait "$pid"; rc=$?; fi
    kill -KILL -- "-$pid" 2>/dev/null
    echo "== kernel tests on the GPU (rc $rc): $(tail -1 "$OUT/pytest.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
}

setup() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sweep-site \
            .whl/*.whl
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/sweep-pkg . >/dev/null
    # Own install folders: /tmp/site holds vLLM's torch when the machine also ran the staging of scripts/gpu-vllm, and
    # the sweep times the image's torch and Triton.
    export PYTHONPATH=/tmp/sweep-pkg:/tmp/sweep-site PYTHONUNBUFFERED=1
    nvidia-smi -L
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    python3 -c "import flash_colreduce; print('flash-colreduce', flash_colreduce.__version__)" || echo "flash-colreduce absent"
    echo "== set-up done at ${SECONDS}s"
}

main() {
    setup

    # 1. compile every sweep kernel in 12 processes (Triton's disk cache), the GPU kernel tests beside them
    cd /tmp || return
    for i in $(seq 0 11); do
        timeout 100 python3 "$REPO/benchmarks/kernels.py" --serving-sweep --compile-only --shard "$i/12" \
            ${SWEEP_ONLY:+--only $SWEEP_ONLY} --out /tmp/warm > "/tmp/warm_$i.log" 2>&1 &
    done
    [ "${KERNEL_TESTS:-1}" = 0 ] || kernel_tests 140
    wait
    for f in /tmp/warm_*.log; do grep -q "Traceback" "$f" && { echo "== $f"; tail -15 "$f"; }; done
    echo "== compiled at ${SECONDS}s"

    # 2. the per-layer prune path of the vLLM plugin (8k, 16k, 32k; 8k × 4 requests)
    timeout 70 python3 "$REPO/benchmarks/prune_path.py" --out "$OUT"
    echo "== prune path done at ${SECONDS}s (rc $?)"

    # 3. the serving sweep in what is left (json and md rewritten after each shape)
    LEFT=$((${SWEEP_BUDGET:-285} - SECONDS))
    timeout "$LEFT" python3 "$REPO/benchmarks/kernels.py" --serving-sweep ${SWEEP_ONLY:+--only $SWEEP_ONLY} --out "$OUT"
    echo "== sweep done at ${SECONDS}s (rc $?; 124 = cut by the time limit: serving_sweep.* hold the shapes done)"
    [ -f "$OUT/serving_sweep.md" ] && cat "$OUT/serving_sweep.md"

    # 4. with TILES_BUDGET=s (default 0: skipped): tile configs of both passes at issue 19's big shapes on this GPU
    if [ "${TILES_BUDGET:-0}" -gt 0 ]; then
        timeout $((TILES_BUDGET + 60)) python3 "$REPO/benchmarks/kernels.py" --goal-tiles --budget "$TILES_BUDGET" \
            --out "$OUT"
        echo "== goal tiles done at ${SECONDS}s (rc $?)"
    fi
}

if [ "${1:-}" = tests ]; then     # the kernel tests alone, with the whole call's time (about 170 tests)
    { setup; cd /tmp && kernel_tests "${KERNEL_TEST_LIMIT:-400}"
      if [ "${2:-}" = path ]; then
          timeout 90 python3 "$REPO/benchmarks/prune_path.py" --out "$OUT"; echo "== prune path done at ${SECONDS}s (rc $?)"
      fi; } 2>&1 | tee "$OUT/gpu_sweep.log"
elif [ "${1:-}" = passes ]; then
    { setup; cd /tmp || exit
      timeout 120 python3 -m pytest "$REPO"/tests/test_experiments.py -q -p no:cacheprovider > "$OUT/pytest_experiments.log" 2>&1
      echo "== experiments against float64 on the GPU (rc $?): $(tail -1 "$OUT/pytest_experiments.log")"
      for exp in ${PASSES:-row_pass column_pass}; do
          timeout "${PASSES_LIMIT:-200}" python3 "$REPO/benchmarks/$exp.py" --out "$OUT"
          echo "== $exp done at ${SECONDS}s (rc $?)"
      done; } 2>&1 | tee "$OUT/gpu_sweep.log"
elif [ "${1:-}" = gluon ]; then     # benchmarks/gluon_{row,column}_pass.py: against float64 on the GPU, then timed
    { setup; cd /tmp || exit
      timeout 150 python3 -m pytest "$REPO"/tests/test_experiments.py -k gluon -q -p no:cacheprovider -rs \
          > "$OUT/pytest_gluon.log" 2>&1
      echo "== the Gluon passes against float64 on the GPU (rc $?): $(tail -1 "$OUT/pytest_gluon.log")"
      for exp in gluon_row_pass gluon_column_pass; do
          timeout "${PASSES_LIMIT:-200}" python3 "$REPO/benchmarks/$exp.py" --out "$OUT"
          echo "== $exp done at ${SECONDS}s (rc $?)"
      done; } 2>&1 | tee "$OUT/gpu_sweep.log"
elif [ "${1:-}" = script ]; then   # benchmark scripts in turn, e.g. tma_ab (the TMA key tiles against pointer loads);
    # SCRIPT_CHECK=1: each one's --check (against float64 on the GPU) first, and its timing only if that passed
    { setup; cd /tmp || exit
      for name in "${@:2}"; do
          if [ "${SCRIPT_CHECK:-0}" = 1 ]; then
              timeout "${CHECK_LIMIT:-120}" python3 "$REPO/benchmarks/$name.py" --check
              rc=$?; echo "== $name --check rc $rc at ${SECONDS}s"; [ "$rc" = 0 ] || continue
          fi
          timeout "${SCRIPT_LIMIT:-400}" python3 "$REPO/benchmarks/$name.py" --out "$OUT"
          echo "== $name done at ${SECONDS}s (rc $?)"
      done; } 2>&1 | tee "$OUT/gpu_sweep.log"
elif [ "${1:-}" = ncu ]; then      # benchmarks/ncu_passes.py: Nsight Compute's counters of the passes and of SDPA
    { setup; cd /tmp || exit
      timeout "${NCU_LIMIT:-500}" python3 "$REPO/benchmarks/ncu_passes.py" --out "$OUT"
      echo "== ncu_passes done at ${SECONDS}s (rc $?)"; } 2>&1 | tee "$OUT/gpu_sweep.log"
else
    main 2>&1 | tee "$OUT/gpu_sweep.log"
fi
cd "$OUT" && tar czf all.tgz --remove-files ./*
