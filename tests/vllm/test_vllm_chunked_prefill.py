"""Chunked prefill with pruning (CPU build and CUDA): prompts of 1-8x max_num_batched_tokens are prefilled over
several steps, beside other requests' decodes; each chunk leaves what the cache does not hold (window queries, or
H2O's column sums) in the request's carry, and the last chunk reads the earlier chunks' keys and values back from
the paged cache, scores and compacts the prompt exactly as a whole one; the scheduler frees the tail blocks after
that chunk. Greedy float32 outputs equal the transformers path token for token."""
import pytest

from colreduce_kvprune.policies import keep_count
from colreduce_kvprune.vllm import get_stats
from vllm_helpers import BLOCK_SIZE, engine, greedy, random_prompts, reference, scheduler

LENGTHS = (300, 57, 200, 129, 96, 40, 511)            # max_num_batched_tokens 64: up to 8 chunks
BASE = dict(budget={"keep_tokens": 64}, window=16, sink_tokens=4, min_prompt_tokens=64)
CASES = {
    "snapkv": dict(BASE, policy="snapkv", pooling={"kind": "max", "kernel": 5}),
    "h2o": dict(BASE, policy="h2o"),
    "tova": dict(BASE, policy="tova"),
    "streamingllm": dict(BASE, policy="streamingllm"),
    "knorm": dict(BASE, policy="knorm"),
}


def cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("policy", list(CASES))
def test_chunked_prefill_equals_transformers_path(llama_path, policy, monkeypatch):
    from colreduce_kvprune.vllm import compaction

    calls = {"stash": 0, "assemble": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in calls:                       # the engine runs in this process: count the chunk work it does
        monkeypatch.setattr(compaction, name if name == "assemble" else "stash_chunks",
                            counted(name, getattr(compaction, name if name == "assemble" else "stash_chunks")))
    config = CASES[policy]
    prompts = random_prompts(LENGTHS, seed=1)
    with engine(llama_path, config, enable_chunked_prefill=True, max_num_batched_tokens=64) as llm:
        got = greedy(llm, prompts, max_tokens=16)
        stats = get_stats(llm)
        pool = scheduler(llm).kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1          # nothing leaked
    assert calls["stash"] > 0 and calls["assemble"] > 0          # prompts really came in chunks
    assert got == reference(llama_path, prompts, config, max_tokens=16)
    pruned = [(n, keep_count(config, n)) for n in LENGTHS if keep_count(config, n) < n]
    assert stats.requests_pruned == len(pruned) and stats.kept_tokens == sum(k for _, k in pruned)
    assert stats.blocks_freed == sum(cdiv(n, BLOCK_SIZE) - cdiv(k, BLOCK_SIZE) for n, k in pruned)


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova", "knorm"])
def test_one_token_chunks_are_captured_and_pruned_at_the_next_step(llama_path, policy, monkeypatch):
    """Prompt steps of one token (vLLM runs them beside decodes as decodes, on CUDA inside full graphs where the
    plugin's Python never runs) are captured by every layer's forward and handled at the next build
    (compaction.LateRows): stashed like any chunk, and a prompt whose last token came that way is pruned by the
    builder before its next step. 15 short requests decode while a long prompt gets the 16-token budget's last
    token, one at a time to its end: greedy float32 outputs still equal the transformers path."""
    from colreduce_kvprune.vllm import compaction

    seen = {"captured": 0, "late": 0}
    split, late_steps = compaction.LateRows.split, compaction.LateRows.late_steps

    def counted_split(self, config, policy_, steps, carries, bt):
        kept = split(self, config, policy_, steps, carries, bt)
        seen["captured"] += len(steps) - len(kept[0])
        return kept

    def counted_late(*args):
        got = late_steps(*args)
        seen["late"] += len(got[0])
        return got

    monkeypatch.setattr(compaction.LateRows, "split", counted_split)
    monkeypatch.setattr(compaction.LateRows, "late_steps", staticmethod(counted_late))
    config = CASES[policy]
    lengths = (20,) * 15 + (120, 97)
    prompts = random_prompts(lengths, seed=3)
    with engine(llama_path, config, enable_chunked_prefill=True, max_num_batched_tokens=16,
                max_num_seqs=16) as llm:
        got = greedy(llm, prompts, max_tokens=160)
        stats = get_stats(llm)
        pool = scheduler(llm).kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1          # nothing leaked
    assert seen["captured"] > 0 and seen["late"] > 0, seen          # one-token steps happened, and ended prompts
    assert got == reference(llama_path, prompts, config, max_tokens=160)
    assert stats.requests_pruned == 2


def test_every_prompt_ending_on_a_one_token_step_at_once(llama_path, monkeypatch):
    """With long_prefill_token_threshold (not vLLM's default) every running prompt is cut to that many tokens a
    step, so 40 prompts of 2 × 20 + 1 tokens all end on a one-token step together: more than compaction.LATE_ROWS.
    The capture buffers are sized for it (compaction.late_rows: max_num_seqs rows), and every prompt is pruned at its
    next step with outputs equal to the transformers path."""
    from colreduce_kvprune.vllm import compaction

    seen = {"most": 0}
    split = compaction.LateRows.split

    def counted_split(self, config, policy_, steps, carries, bt):
        kept = split(self, config, policy_, steps, carries, bt)
        seen["most"] = max(seen["most"], len(steps) - len(kept[0]))
        return kept

    monkeypatch.setattr(compaction.LateRows, "split", counted_split)
    config = dict(policy="snapkv", budget={"keep_tokens": 16}, window=8, sink_tokens=2, min_prompt_tokens=24,
                  pooling={"kind": "max", "kernel": 3})
    prompts = random_prompts((41,) * 40, seed=5)
    with engine(llama_path, config, enable_chunked_prefill=True, max_num_batched_tokens=96, max_num_seqs=48,
                long_prefill_token_threshold=2) as llm:
        got = greedy(llm, prompts, max_tokens=8)
        stats = get_stats(llm)
    assert seen["most"] > compaction.LATE_ROWS, seen
    assert got == reference(llama_path, prompts, config, max_tokens=8)
    assert stats.requests_pruned == 40 and stats.kept_tokens == 40 * 16


def test_late_rows_cover_what_the_scheduler_can_cut():
    from colreduce_kvprune.vllm import compaction

    assert compaction.late_rows(256, 0) == compaction.LATE_ROWS          # vLLM's default: one cut prompt a step
    assert compaction.late_rows(256, 512) == 256                          # every running prompt cut each step
    assert compaction.late_rows(8, 512) == compaction.LATE_ROWS
