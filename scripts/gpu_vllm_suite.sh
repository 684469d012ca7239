#!/usr/bin/env bash
# The whole vLLM test suite on the GPU device machine in two device calls (after the staging of scripts/gpu-vllm,
# install.sh sourced), and the fp32 agreement at vLLM's defaults in a third. Logs and JSON under $OUT.
#   source /root/w/install.sh && bash scripts/gpu_vllm_suite.sh shared   # ~7.5 min: the tests whose engines fix a
#                                                                        # small KV pool, three groups at once, and
#                                                                        # the kernel tests under vLLM's torch/Triton
#   source /root/w/install.sh && bash scripts/gpu_vllm_suite.sh alone    # ~5 min: the tests that start engines at
#                                                                        # vLLM's default gpu_memory_utilization
#   source /root/w/install.sh && bash scripts/gpu_vllm_suite.sh agree    # ~6 min: the fp32 agreement at vLLM's
#                                                                        # defaults, five policies in two jobs
#   source /root/w/install.sh && bash scripts/gpu_vllm_suite.sh server   # the OpenAI-server tests (each starts
#                                                                        # `vllm serve`'s server in processes of
#                                                                        # its own), alone in a call
# (Until the thirty-third session the server tests ran in `shared`'s g2, and twice (twenty-seventh and thirty-third
# sessions) the job's limit came inside them after the other 14 tests of g2: g2 took ~500 s beside three jobs.)
# (Until the twenty-seventh session the agreement ran inside `shared`; with 226 kernel tests the six jobs no longer
# fit one 600 s call: g2, g3 and the kernel tests took ~430 s each and the agreement was cut.)
# Every file of tests/vllm is in exactly one part; a file added to tests/vllm and not listed here fails the script.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-vllm-out}
T=tests/vllm
G1="$T/test_vllm_compaction.py $T/test_vllm_guards.py $T/test_vllm_policies.py $T/test_vllm_timing.py $T/test_vllm_versions.py"
G2="$T/test_vllm_blocks.py $T/test_vllm_capacity.py $T/test_vllm_passthrough.py $T/test_vllm_prefix_caching.py"
SERVER="$T/test_vllm_server.py"
G3="$T/test_quality_vllm.py $T/test_vllm_tensor_parallel.py $T/test_vllm_chunked_prefill.py"
ALONE="$T/test_vllm_defaults.py $T/test_cli_run.py"
# the kernel tests again, under vLLM's torch and Triton (benchmarks/gpu_sweep.sh runs them under the image's)
KERNELS=$(echo tests/test_colreduce*.py)
listed=$(echo $G1 $G2 $G3 $ALONE $SERVER | tr ' ' '\n' | sort)
present=$(ls $T/test_*.py | sort)
if [ "$listed" != "$present" ]; then
    echo "scripts/gpu_vllm_suite.sh does not list every test file of $T:"; diff <(echo "$listed") <(echo "$present")
    exit 2
fi
case "${1:-}" in
    shared)
        GPU_TEST_TIMEOUT=${GPU_TEST_TIMEOUT:-240} bash scripts/gpu_jobs.sh \
            "g1=bash scripts/gpu_vllm_tests.sh g1 $G1" "g2=bash scripts/gpu_vllm_tests.sh g2 $G2" \
            "g3=bash scripts/gpu_vllm_tests.sh g3 $G3" "k=bash scripts/gpu_vllm_tests.sh kernels $KERNELS -n 4" ;;
    agree)
        bash scripts/gpu_jobs.sh \
            "fa=OUT=$out/fa AGREE_ARGS='--policies snapkv,h2o,tova' bash scripts/gpu_vllm_evidence.sh agree-fp32-defaults" \
            "fb=OUT=$out/fb AGREE_ARGS='--policies streamingllm,knorm --skip-vanilla' bash scripts/gpu_vllm_evidence.sh agree-fp32-defaults" ;;
    alone)
        GPU_TEST_LIMIT=${GPU_TEST_LIMIT:-560} GPU_TEST_TIMEOUT=${GPU_TEST_TIMEOUT:-420} \
            bash scripts/gpu_vllm_tests.sh alone $ALONE ;;
    server)
        GPU_TEST_LIMIT=${GPU_TEST_LIMIT:-540} GPU_TEST_TIMEOUT=${GPU_TEST_TIMEOUT:-300} \
            bash scripts/gpu_vllm_tests.sh server $SERVER ;;
    *) echo "usage: bash scripts/gpu_vllm_suite.sh shared|alone|agree|server"; exit 2 ;;
esac
