"""vLLM's offline LLM with KV pruning after prefill: the plugin loads itself; the config goes in additional_config.

    python examples/offline_serving.py [MODEL_FOLDER]      # default: the tiny random Llama of `colreduce-kvprune run`
On CPU: VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1; VLLM_ENABLE_V1_MULTIPROCESSING=0 lets get_stats see the
scheduler in this process.
"""
import random
import sys

from vllm import LLM, SamplingParams

from colreduce_kvprune.tiny_model import default_model
from colreduce_kvprune.vllm import get_stats

if __name__ == "__main__":
    model = sys.argv[1] if len(sys.argv) > 1 else default_model()
    # vLLM's defaults otherwise (CUDA graphs, chunked prefill, prefix caching, async scheduling where the platform
    # has them); block_size 32 suits vLLM's CPU build
    llm = LLM(model=model, dtype="float32", max_model_len=4096, block_size=32,
              additional_config={"kv_prune": {"policy": "snapkv", "budget": {"keep_ratio": 0.25}, "window": 32,
                                              "min_prompt_tokens": 1024}})   # or a YAML path: "configs/snapkv.yaml"
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [1] + [rng.randrange(3, 512) for _ in range(n)]} for n in (3000, 1500, 200)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    for p, out in zip(prompts, outputs):
        print(f"{len(p['prompt_token_ids'])} prompt tokens -> {list(out.outputs[0].token_ids)}")
    try:
        print(get_stats(llm))   # requests pruned, prompt/kept tokens, blocks freed, peak blocks in use
    except RuntimeError as e:   # the scheduler runs in another process (VLLM_ENABLE_V1_MULTIPROCESSING=1)
        print(e)
