"""Block accounting, isolation of batched requests, the pruning summary and the per-request debug log, on one
engine pruning with SnapKV (block size 32)."""
import logging

import pytest

from colreduce_kvprune.policies import keep_count
from colreduce_kvprune.vllm import get_stats
from vllm_helpers import BLOCK_SIZE, engine, greedy, random_prompts, reference, scheduler

CONFIG = dict(policy="snapkv", budget={"keep_ratio": 0.25, "min_tokens": 40}, window=16, sink_tokens=4,
              min_prompt_tokens=64)


def cdiv(a, b):
    return -(-a // b)


@pytest.fixture(scope="module")
def llm(llama_path):
    with engine(llama_path, CONFIG) as llm:
        yield llm


def test_pool_free_count_after_prefill_and_decode(llm, caplog):
    from vllm import SamplingParams

    lengths = (300, 200, 57, 129, 64, 96)
    keeps = [keep_count(CONFIG, n) for n in lengths]
    assert [k < n for k, n in zip(keeps, lengths)] == [True, True, False, True, True, True]
    sched, core = scheduler(llm), llm.llm_engine
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    before = get_stats(llm)
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, detokenize=False)
    for i, p in enumerate(random_prompts(lengths, seed=3)):
        core.add_request(f"r{i}", {"prompt_token_ids": p}, sp)
    log = logging.getLogger("vllm.colreduce_kvprune")
    old_level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(caplog.handler)
    try:
        core.step()                                   # prefill of all six (one step: 846 tokens <= 1024)
        assert free0 - pool.get_num_free_blocks() == sum(cdiv(n, BLOCK_SIZE) for n in lengths)
        core.step()                                   # first decode: tail blocks freed, 1 slot more each
        held = sum(cdiv(k + 1, BLOCK_SIZE) for k in keeps)
        assert free0 - pool.get_num_free_blocks() == held
        while core.has_unfinished_requests():
            core.step()
    finally:
        log.removeHandler(caplog.handler)
        log.setLevel(old_level)
    assert pool.get_num_free_blocks() == free0        # everything returned, nothing leaked or double-freed
    after = get_stats(llm)
    pruned = [(n, k) for n, k in zip(lengths, keeps) if k < n]
    assert after.requests_pruned - before.requests_pruned == len(pruned)
    assert after.blocks_freed - before.blocks_freed == sum(cdiv(n, BLOCK_SIZE) - cdiv(k, BLOCK_SIZE)
                                                           for n, k in pruned)
    assert after.kept_tokens - before.kept_tokens == sum(k for _, k in pruned)
    assert after.peak_blocks_in_use >= sum(cdiv(n, BLOCK_SIZE) for n in lengths)
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.colreduce_kvprune"]
    for n, k in pruned:
        assert any(f"prefill {n} tokens -> kept {k} per kv head" in ln for ln in lines), lines


def test_batched_requests_equal_each_alone(llm):
    lengths = (300, 40, 200, 64, 129, 511, 96, 33, 250, 70)
    prompts = random_prompts(lengths, seed=4)
    together = greedy(llm, prompts, max_tokens=12)
    alone = [greedy(llm, [p], max_tokens=12)[0] for p in prompts]
    assert together == alone


def test_decode_to_max_model_len_after_pruning(llama_path):
    """A request pruned by one token (33 → 32) that decodes up to max_model_len needs one block-table entry more
    than vLLM's width (the worker's row keeps the freed block ids); the output still equals the transformers path."""
    config = dict(policy="snapkv", budget={"keep_tokens": 32}, window=16, sink_tokens=4, min_prompt_tokens=32)
    prompts = random_prompts((33, 97), seed=8)
    with engine(llama_path, config, max_model_len=128) as llm:
        got = [greedy(llm, [p], max_tokens=128 - len(p))[0] for p in prompts]
    want = [reference(llama_path, [p], config, max_tokens=128 - len(p))[0] for p in prompts]
    assert got == want


def test_unpruned_requests_ignore_stale_row_state(llama_path, monkeypatch):
    """Steps in which no row can be pruned skip the builder's work, so no RowState entry is reset then: an unpruned
    request prefilled in such a step may sit on a block whose entry a finished pruned request left. When a later
    step has a pruned row beside it, that request must still read its own whole cache. Here every entry is
    overwritten with a pruned layout right after the unpruned requests' prefill; their outputs (and the pruned
    request's) must equal the transformers path."""
    import torch
    from vllm import SamplingParams

    from colreduce_kvprune.vllm import compaction

    tables = []
    init = compaction.RowState.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        tables.append(self.table)

    monkeypatch.setattr(compaction.RowState, "__init__", recording)
    shorts = random_prompts((60, 50, 62), seed=12)              # below min_prompt_tokens: never pruned
    long = random_prompts((300,), seed=13)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, detokenize=False)
    got = {}
    with engine(llama_path, CONFIG) as llm:
        core = llm.llm_engine
        for i, p in enumerate(shorts):
            core.add_request(f"s{i}", {"prompt_token_ids": p}, sp)
        core.step()                                              # their prefill: no row can be pruned
        assert tables, "the builder made no RowState"
        with torch.inference_mode():                             # the table was made in the engine's
            for t in tables:                                     # inference mode
                t[:] = torch.tensor([5, 1, 3], dtype=t.dtype)    # what a finished pruned request leaves behind
        core.add_request("long", {"prompt_token_ids": long[0]}, sp)
        while core.has_unfinished_requests():
            for o in core.step():
                if o.finished:
                    got[o.request_id] = list(o.outputs[0].token_ids)
    assert [got[f"s{i}"] for i in range(len(shorts))] == reference(llama_path, shorts, CONFIG, max_tokens=24)
    assert [got["long"]] == reference(llama_path, long, CONFIG, max_tokens=24)
