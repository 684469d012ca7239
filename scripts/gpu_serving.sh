#!/usr/bin/env bash
# The serving benchmark on the device machine (after the staging of ../shared/gpu-vllm, install.sh sourced), one
# command: the offline workloads of benchmarks/serving_gpu.py, the online one of benchmarks/serving_online.py, then
# the table and chart (benchmarks/serving_report.py) into $OUT/h200_serving.{md,png} with the JSON beside them.
# A device call is at most 10 minutes: give the parts over several calls, e.g.
#   source /root/w/install.sh && bash scripts/gpu_serving.sh long          # then: short, mixed, online, report
# RUNS takes vanilla, vanilla-piecewise, snapkv-RATIO, each optionally +sync, +direct or +jit (the scoring
# kernels' launch), and RUN@2 for a second sample of RUN (benchmarks/serving_gpu.py).
# Environment: PROFILE_STEPS (offline workloads: torch.profiler tables of that many pruning steps inside each pruned
# run's engine, serving_WORKLOAD.json.profile_RUN.txt), NUM (requests of the offline workloads, default the workload's), RUNS (default
# vanilla,snapkv-0.25,snapkv-0.1), RATES (online, default 1,2), FRONTEND (online: server, vLLM's OpenAI server over
# HTTP, the default; or engine, AsyncLLM), RUN_TIMEOUT (seconds per run, default 280: for the offline workloads
# counted from the engine's start-up, which START_TIMEOUT limits, default 240; online: the whole run, server start
# included), SHAPE
# (default llama-3.1-8b; `SHAPE=tiny bash scripts/gpu_serving.sh smoke online report` is a quick check on vLLM's CPU
# build, with WORKLOAD=smoke for the online part).
set -uo pipefail
out=${OUT:-/tmp/gpu-serving-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
quiet() { grep -v -E " (INFO|DEBUG) |^\s*warnings.warn|DeprecationWarning" ; }
rc=0
for part in "$@"; do
    # what else loads the machine (a leftover engine's process would slow host-bound runs)
    echo "== $part: $(uptime | sed 's/.*load average/load average/'); engine processes already running:" \
        "$(pgrep -fc 'VLLM::|EngineCore')" | tee -a "$out/host_state.log"
    case "$part" in
        long|short|mixed|decode|smoke)
            python3 -P benchmarks/serving_gpu.py --workload "$part" --shape "${SHAPE:-llama-3.1-8b}" ${NUM:+--num "$NUM"} \
                --runs "${RUNS:-vanilla,snapkv-0.25,snapkv-0.1}" --timing --timeout "${RUN_TIMEOUT:-280}" --start-timeout "${START_TIMEOUT:-240}" \
                ${PROFILE_STEPS:+--profile-steps "$PROFILE_STEPS"} \
                --out "$out/serving_$part.json" 2>&1 | quiet | tee "$out/serving_$part.log" ;;
        online)
            python3 -P benchmarks/serving_online.py --rates "${RATES:-1,2}" --num "${NUM:-64}" \
                --shape "${SHAPE:-llama-3.1-8b}" --workload "${WORKLOAD:-long}" \
                --runs "${RUNS:-vanilla,snapkv-0.1}" --timeout "${RUN_TIMEOUT:-280}" \
                --frontend "${FRONTEND:-server}" --out "$out/serving_online.json" 2>&1 | quiet | tee "$out/serving_online.log" ;;
        report)
            python3 -P benchmarks/serving_report.py "$out"/serving_*.json --md "$out/h200_serving.md" \
                --png "$out/h200_serving.png" ;;
        *) echo "unknown part $part (long, short, mixed, decode, smoke, online, report)"; exit 2 ;;
    esac
    status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || rc=$status
done
exit $rc
