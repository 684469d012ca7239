"""Shared helpers of the vLLM tests: engine construction with the settings pruning needs, greedy generation,
the transformers reference, access to the in-process scheduler."""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
from contextlib import contextmanager

import pytest

# pytest puts tests/ on sys.path, where tests/vllm would pass for a (namespace) package `vllm`: look for the real
# one without importing anything, then import it.
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin in (None, "namespace"):
    pytest.skip("vLLM is not installed (run scripts/ci_vllm.sh)", allow_module_level=True)
pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/ci_vllm.sh)")

BLOCK_SIZE = 32                     # a multiple of 32 (vLLM's CPU attention); CUDA backends take it too
DEVICE = os.environ["VLLM_TARGET_DEVICE"]          # set by conftest.py from the installed vLLM build
ENGINE_KW = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=1024, enforce_eager=True,
                 block_size=BLOCK_SIZE, max_num_seqs=16, seed=0, max_num_batched_tokens=1024,
                 enable_prefix_caching=False, enable_chunked_prefill=False, async_scheduling=False)
# prefix caching off by default here so that tests measure pruning alone (block counts, outputs); it is on in
# test_vllm_prefix_caching.py and test_vllm_passthrough.py
if DEVICE == "cuda":
    # A 1 GiB KV pool, as VLLM_CPU_KVCACHE_SPACE=1 on CPU: 90% of an H200 would be millions of tiny-model blocks,
    # seconds of scheduler set-up per engine. float32 runs on TRITON_ATTN (FlashAttention takes 16-bit only).
    ENGINE_KW["kv_cache_memory_bytes"] = 1 << 30
    # With the pool fixed, gpu_memory_utilization only gates vLLM's start-up check of free GPU memory (0.9 of the GPU
    # by default): 0.15 lets test processes share the GPU (scripts/gpu_vllm_tests.sh runs groups concurrently).
    ENGINE_KW["gpu_memory_utilization"] = 0.15


def build_model(kind: str, path, **overrides) -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    try:
        from tiny_models import make_tiny_model
    finally:
        sys.path.pop(0)
    return make_tiny_model(kind, path, **overrides)


def random_prompts(lengths, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(n - 1)] for n in lengths]


def make_llm(model: str, prune=None, **overrides):
    from vllm import LLM

    kw = dict(ENGINE_KW, model=model, **overrides)
    kw = {k: v for k, v in kw.items() if v is not None}      # an override of None: vLLM's own default
    if prune is not None:
        kw["additional_config"] = {"kv_prune": prune}
    return LLM(**kw)


def shutdown(llm) -> None:
    """Release an in-process engine so the next one can start in this process."""
    from vllm.distributed import cleanup_dist_env_and_memory

    if llm is not None:
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@contextmanager
def engine(model: str, prune=None, **overrides):
    llm = make_llm(model, prune, **overrides)
    try:
        yield llm
    finally:
        shutdown(llm)


def greedy(llm, prompts, max_tokens=16) -> list[list[int]]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def reference(model: str, prompts, config, max_tokens=16) -> list[list[int]]:
    """The transformers path (colreduce_kvprune.hf.generate), greedy, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from colreduce_kvprune.hf import generate

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()
    return generate(m, prompts, config, max_new_tokens=max_tokens, eos_token_id=[]).sequences


def scheduler(llm):
    """The in-process v1 scheduler of an LLM (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def baseline_without_plugins(model: str, prompts, max_tokens=16, **overrides) -> list[list[int]]:
    """Greedy outputs of vanilla vLLM (VLLM_PLUGINS=none) in a fresh process with the same engine settings."""
    code = ("import json, sys\n"
            "sys.path.insert(0, sys.argv[2])\n"
            "from vllm_helpers import make_llm, greedy\n"
            "if __name__ == '__main__':\n"
            "    a = json.loads(sys.argv[1])\n"
            "    print('RESULT' + json.dumps(greedy(make_llm(a['model'], **a['kw']), a['prompts'], a['n'])))\n")
    env = dict(os.environ, VLLM_PLUGINS="none")
    arg = json.dumps({"model": model, "prompts": prompts, "n": max_tokens, "kw": overrides})
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", code, arg, here], env=env, capture_output=True, text=True,
                         timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")]
    assert run.returncode == 0 and lines, f"baseline run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT"):])
