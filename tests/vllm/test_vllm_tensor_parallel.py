"""Tensor parallelism: each rank holds a slice of the kv heads and prunes its own heads; with per_head=false (one
token set for all heads) the ranks gather every head's scores first, so they select together. Pruned TP=2 must equal
pruned TP=1 token for token (float32), with the same block accounting. On CPU the vLLM build runs TP=2 with one
core per rank (VLLM_CPU_OMP_THREADS_BIND="0|1"); on CUDA it needs two GPUs."""
import pytest
import torch

from colreduce_kvprune.config import load_config
from colreduce_kvprune.policies import get_policy
from colreduce_kvprune.vllm import compaction, get_stats
from vllm_helpers import DEVICE, engine, greedy, random_prompts, reference

LENGTHS = (300, 57, 200, 129)
BASE = dict(budget={"keep_tokens": 64}, window=16, sink_tokens=4, min_prompt_tokens=64)
CASES = {
    "snapkv-per_head": dict(BASE, policy="snapkv", per_head=True),
    "snapkv-shared": dict(BASE, policy="snapkv", per_head=False),
    "h2o-per_head": dict(BASE, policy="h2o", per_head=True),
    "h2o-shared": dict(BASE, policy="h2o", per_head=False),
}


def _two_ranks_available() -> bool:
    return DEVICE == "cpu" or torch.cuda.device_count() >= 2


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=1)


@pytest.mark.skipif(not _two_ranks_available(), reason="tensor_parallel_size=2 needs two GPUs on CUDA")
@pytest.mark.parametrize("name", list(CASES) + ["snapkv-shared-chunked"])
def test_tp2_equals_tp1(llama_path, prompts, name, monkeypatch):
    """The "-chunked" case runs TP=2 with chunked prefill (64-token chunks) and prefix caching on: each rank keeps
    its own heads' window queries and reads its own heads' keys back from its cache."""
    config = CASES[name.removesuffix("-chunked")]
    tp2 = dict(tensor_parallel_size=2)
    if name.endswith("-chunked"):
        tp2.update(enable_chunked_prefill=True, max_num_batched_tokens=64, enable_prefix_caching=True)
    if DEVICE == "cpu":
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    with engine(llama_path, config, **tp2) as llm:
        tp2 = greedy(llm, prompts)
        tp2_stats = get_stats(llm)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with engine(llama_path, config) as llm:
        tp1 = greedy(llm, prompts)
        tp1_stats = get_stats(llm)
    assert tp2 == tp1
    fields = ("requests_pruned", "prompt_tokens", "kept_tokens", "blocks_freed")
    if not name.endswith("-chunked"):            # chunks change how many blocks are held at once
        fields += ("peak_blocks_in_use",)
    for field in fields:
        assert getattr(tp2_stats, field) == getattr(tp1_stats, field), field
    assert tp2_stats.requests_pruned == 3
    # the test can fail: pruning changes the outputs of these prompts
    assert tp1 != reference(llama_path, prompts, dict(config, min_prompt_tokens=100000))


@pytest.mark.parametrize("policy,per_head", [("snapkv", False), ("h2o", False), ("random", True),
                                             ("random", False), ("knorm", False)])
def test_rank_selection_equals_one_device(policy, per_head):
    """compaction.select_kept on two simulated ranks (each with half the heads; the gather hands back both ranks'
    scores in rank order) gives each rank its rows of the one-device selection; without the gather (each rank on
    its own) a shared (per_head=false) selection differs."""
    torch.manual_seed(0)
    config = load_config(dict(BASE, policy=policy, per_head=per_head, budget={"keep_tokens": 20}, window=4,
                              min_prompt_tokens=8))
    pol = get_policy(config)
    hq, hkv, d, lengths = 8, 4, 16, [57, 90]
    total = sum(lengths)
    q, k = torch.randn(total, hq, d), torch.randn(total, hkv, d)
    bt = torch.arange(1, 2 * 8 + 1).view(2, 8).int()
    _, _, plan, _ = compaction.plan_prefills(config, pol, [(0, 0, 0, 57, 57), (1, 57, 0, 90, 90)], bt, 16)
    one = compaction.select_kept(pol, plan, q, k, layer=1, scale=d ** -0.5, backend="torch")
    sent = {}

    def rank_call(r, gather):
        return compaction.select_kept(pol, plan, q[:, r * 4:(r + 1) * 4], k[:, r * 2:(r + 1) * 2], layer=1,
                                      scale=d ** -0.5, backend="torch", head_offset=2 * r, gather_heads=gather,
                                      rank_heads=2 * r)

    for r in range(2):                      # what each rank contributes to the gather
        rank_call(r, lambda t, r=r: sent.setdefault(r, t).repeat(2, 1))
    both = lambda t: torch.cat([sent[0], sent[1]])      # noqa: E731  the all-gather, in rank order
    ranks = [rank_call(r, both) for r in range(2)]
    assert torch.equal(torch.cat(ranks, dim=1), one)
    alone = [rank_call(r, None) for r in range(2)]
    if not per_head:
        assert not torch.equal(torch.cat(alone, dim=1), one)


@pytest.mark.skipif(not _two_ranks_available(), reason="tensor_parallel_size=2 needs two GPUs on CUDA")
@pytest.mark.parametrize("name", ["snapkv-shared", "h2o-shared"])
def test_tp2_one_token_chunks(llama_path, name, monkeypatch):
    """One-token prompt steps (compaction.LateRows) under TP=2: each rank captures its own heads' rows, stashes
    them at the next build, and prunes the prompt there when its last token came that way; with per_head=false
    that late pruning gathers every rank's scores inside the builders, which run the same step on every rank.
    15 short requests decode while a 120-token prompt gets one token per step: equal to the transformers path."""
    config = CASES[name]
    prompts = random_prompts((20,) * 15 + (120,), seed=3)
    if DEVICE == "cpu":
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    with engine(llama_path, config, tensor_parallel_size=2, enable_chunked_prefill=True, max_num_batched_tokens=16,
                max_num_seqs=16) as llm:
        got = greedy(llm, prompts, max_tokens=160)
        stats = get_stats(llm)
    assert stats.requests_pruned == 1
    assert got == reference(llama_path, prompts, config, max_tokens=160)
