#!/usr/bin/env bash
# Run several GPU jobs at once on the device machine (one H200 fits many tiny-model engines; a device call is at most
# 10 minutes): each argument NAME=COMMAND runs in the background with its output in $OUT/NAME.out; waits for all,
# then prints each job's exit status, time and last lines. Exit status: 0 when every job exited 0.
#   source /root/w/install.sh && bash scripts/gpu_jobs.sh \
#       "tests-a=bash scripts/gpu_vllm_tests.sh a tests/vllm/test_vllm_compaction.py" \
#       "agree=bash scripts/gpu_vllm_evidence.sh agree-fp32"
# Engines started by these jobs must not ask vLLM for most of the GPU (its default gpu_memory_utilization=0.9 is
# checked against free memory at start): the tests and benchmarks here fix their KV pool and pass 0.15.
set -uo pipefail
out=${OUT:-/tmp/gpu-vllm-out}
mkdir -p "$out"
# each job's threads: the CPU cores shared out (HF references and engine start-up run on the CPU)
threads=$(( $(nproc) / $# ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
names=(); pids=(); starts=()
for job in "$@"; do
    name=${job%%=*}; cmd=${job#*=}
    ( eval "$cmd" ) > "$out/$name.out" 2>&1 &
    names+=("$name"); pids+=($!); starts+=("$(date +%s)")
done
rc=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; status=$?
    [ "$status" = 0 ] || rc=1
    echo "== ${names[$i]}: exit $status, done $(( $(date +%s) - ${starts[$i]} )) s after its start"
    grep -E "passed|failed|error|tokens equal|prompts with equal|== " "$out/${names[$i]}.out" | tail -n 12
done
# engine processes that a failed job left behind would load the host (and hold GPU memory) under the next call's
# benchmarks (the ninth session's decode run after a failed agreement job ran its piecewise decode 15% slower)
left=$(pgrep -f "VLLM::|EngineCore" | tr '\n' ' ')
if [ -n "$left" ]; then
    echo "== leftover engine processes after the jobs: $left(killed)"
    pkill -9 -f "VLLM::|EngineCore"
fi
exit $rc
