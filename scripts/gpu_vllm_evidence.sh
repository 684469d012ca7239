#!/usr/bin/env bash
# GPU evidence for the vLLM plugin on the device machine (after the staging of ../shared/gpu-vllm, install.sh
# sourced): plugin vs transformers path (benchmarks/vllm_agreement.py) and the quality table through vLLM on CUDA
# (benchmarks/quality/eval.py). Each PART writes $OUT/PART.json and $OUT/PART.log:
#   agree-fp32      float32 on TRITON_ATTN, 5 policies x 8 prompts of 1k-8k, vLLM's default model runner (V2)
#   agree-fp32-v1   the same under the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)
#   agree-bf16      bfloat16 on FLASH_ATTN (FA3 on Hopper): selections and compacted cache contents
#   agree-fp32-defaults / agree-bf16-defaults   the same two at vLLM's defaults (CUDA graphs in its default
#                   cudagraph mode, async scheduling, prefix caching, chunked prefill: chunks of <= 2048 tokens)
#   defaults-vs-eager compare the tokens of the -defaults runs with the eager runs' (agree-fp32, agree-bf16), per
#                   policy and for vanilla vLLM (the four reports in $EAGER_DIR, default $OUT): $OUT/defaults-vs-eager.json
#   quality         the quality benchmark's 60 samples through vLLM (bf16, FLASH_ATTN), keep 1 / 0.25 / 0.1
#   usage: bash scripts/gpu_vllm_evidence.sh PART [PART ...]
#   AGREE_ARGS: extra arguments to every vllm_agreement.py run (e.g. "--policies snapkv,h2o --skip-vanilla")
set -uo pipefail
out=${OUT:-/tmp/gpu-vllm-out}
mkdir -p "$out"
export VLLM_TARGET_DEVICE=cuda PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
# vLLM's Triton attention leaves tl.dot at Triton's float32 default, TF32 (10-bit mantissa): float32 engines are
# then not float32, and greedy tokens drift from a float32 reference (seen: vanilla vLLM vs transformers differed on
# 2 of 8 prompts). IEEE float32 dots for token-for-token comparisons.
export TRITON_F32_DEFAULT=${TRITON_F32_DEFAULT:-ieee}
# the engine settings the plugin needs today (refused otherwise)
PLUGIN=(--engine-arg enforce_eager=true --engine-arg enable_prefix_caching=false
        --engine-arg enable_chunked_prefill=false --engine-arg async_scheduling=false)
# vLLM's defaults (CUDA graphs, async scheduling, prefix caching, chunked prefill) with chunks of at most 2048
# tokens, so that the 1k-8k prompts come in 1-4 chunks
DEFAULTS=(--engine-arg max_num_batched_tokens=2048)
quiet() { grep --line-buffered -v -E " (INFO|DEBUG) |^\s*warnings.warn|DeprecationWarning" ; }
rc=0
for part in "$@"; do
    start=$(date +%s)
    case "$part" in
        agree-fp32)
            python3 -P benchmarks/vllm_agreement.py --dtype float32 --backend TRITON_ATTN "${PLUGIN[@]}" \
                ${AGREE_ARGS:-} --out "$out/$part.json" ;;
        agree-fp32-v1)
            VLLM_USE_V2_MODEL_RUNNER=0 python3 -P benchmarks/vllm_agreement.py --dtype float32 \
                --backend TRITON_ATTN "${PLUGIN[@]}" ${AGREE_ARGS:-} --out "$out/$part.json" ;;
        agree-bf16)
            python3 -P benchmarks/vllm_agreement.py --dtype bfloat16 --backend FLASH_ATTN "${PLUGIN[@]}" \
                ${AGREE_ARGS:-} --out "$out/$part.json" ;;
        agree-fp32-defaults)
            python3 -P benchmarks/vllm_agreement.py --dtype float32 --backend TRITON_ATTN "${DEFAULTS[@]}" \
                ${AGREE_ARGS:-} --out "$out/$part.json" ;;
        agree-bf16-defaults)
            python3 -P benchmarks/vllm_agreement.py --dtype bfloat16 --backend FLASH_ATTN "${DEFAULTS[@]}" \
                ${AGREE_ARGS:-} --out "$out/$part.json" ;;
        defaults-vs-eager)
            d=${EAGER_DIR:-$out}
            python3 -P benchmarks/vllm_agreement.py --compare "$d/agree-fp32.json" "$d/agree-fp32-defaults.json" \
                "$d/agree-bf16.json" "$d/agree-bf16-defaults.json" --out "$out/$part.json" ;;
        quality)
            python3 -P benchmarks/quality/eval.py run --engine vllm --dtype bfloat16 --attention-backend FLASH_ATTN \
                --ratios 1.0 0.25 0.1 --policies snapkv h2o tova knorm streamingllm random --out "$out/$part.json" ;;
        *) echo "unknown part $part"; exit 2 ;;
    esac 2>&1 | quiet | tee "$out/$part.log"
    status=${PIPESTATUS[0]}
    echo "== $part: exit $status, $(( $(date +%s) - start )) s" | tee -a "$out/$part.log"
    [ "$status" = 0 ] || rc=$status
done
exit $rc
