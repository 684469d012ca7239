#!/usr/bin/env bash
# tests/vllm on the GPU device machine with vLLM's CUDA build (after the staging of ../shared/gpu-vllm), under vLLM's
# default model runner (V2 in 0.32) unless VLLM_USE_V2_MODEL_RUNNER is set. The tests pick CUDA from the installed
# build (tests/vllm/conftest.py). A device call is at most 10 minutes, so give the suite in parts:
#
#   source /root/w/install.sh && bash scripts/gpu_vllm_tests.sh part1 tests/vllm/test_vllm_compaction.py ...
# (scripts/gpu_vllm_suite.sh shared / alone / server: the whole suite in three calls, every test file listed once)
#
# NAME (first argument) names the log, $OUT/pytest-NAME.txt; the remaining arguments go to pytest (default:
# tests/vllm). GPU_TEST_LIMIT (seconds, default 500): pytest is stopped with SIGINT then, so it still prints the
# failures so far and its summary line. Exit status: pytest's.
set -uo pipefail
name=${1:-all}
shift || true
out=${OUT:-/tmp/gpu-vllm-out}
mkdir -p "$out"
export VLLM_TARGET_DEVICE=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
echo "model runner: VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER:-unset (vLLM default)}"
# -P: the installed package (/tmp/proj, with colreduce_kvprune.kernels mapped from kernels/) is imported, not the
# source tree in the working directory.
# --timeout: one hung test fails alone instead of taking the whole call (pytest-timeout is on the device image)
timeout -s INT -k 20 "${GPU_TEST_LIMIT:-500}" python3 -P -m pytest -v -rfEs --tb=short -p no:cacheprovider \
    --timeout "${GPU_TEST_TIMEOUT:-150}" \
    "${@:-tests/vllm}" 2>&1 | tee "$out/pytest-$name.txt"
exit "${PIPESTATUS[0]}"
