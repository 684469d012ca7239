"""Prefix caching on, with pruning: requests that are not pruned (shorter than min_prompt_tokens) read and publish
cached blocks as usual; requests that are pruned never read a cached block (not even a prefix an unpruned request
published) and never publish theirs. Outputs equal an engine with prefix caching off, token for token (float32)."""
import pytest

from colreduce_kvprune.config import load_config
from colreduce_kvprune.policies import keep_count
from colreduce_kvprune.vllm import get_stats
from colreduce_kvprune.vllm.manager import PruneManager, PrunableFullAttentionSpec
from colreduce_kvprune.vllm.settings import config_to_json
from vllm_helpers import BLOCK_SIZE, engine, random_prompts, reference, scheduler

CONFIG = dict(policy="snapkv", budget={"keep_tokens": 64}, window=16, sink_tokens=4, min_prompt_tokens=96)


def _run(llm, prompts, max_tokens=12):
    """Each prompt alone, in order (so a later one can hit what an earlier one published): (tokens, cached tokens)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    out = []
    for p in prompts:
        o = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0]
        out.append((list(o.outputs[0].token_ids), o.num_cached_tokens or 0))
    return out


@pytest.fixture(scope="module")
def prompts():
    short, long_a, long_b = random_prompts((80, 300, 250), seed=11)
    shared = short + long_b[80:]               # a pruned prompt that starts with the unpruned one (80 tokens)
    # short twice (a hit), long_a twice (pruned: never a hit), shared after short (its prefix is cached: no hit),
    # then long_a's first 80 tokens (not pruned): long_a published nothing, so no hit on its compacted blocks
    return [short, short, long_a, long_a, shared, long_a[:80]]


def test_prefix_caching_with_pruning(llama_path, prompts):
    with engine(llama_path, CONFIG, enable_prefix_caching=True) as llm:
        on = _run(llm, prompts)
        stats = get_stats(llm)
        pool = scheduler(llm).kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1      # nothing leaked
    with engine(llama_path, CONFIG, enable_prefix_caching=False) as llm:
        off = _run(llm, prompts)
    assert [t for t, _ in on] == [t for t, _ in off]
    cached = [c for _, c in on]
    assert cached[1] >= BLOCK_SIZE                # the unpruned repeat read the cache
    assert cached[3] == 0 and cached[4] == 0      # pruned requests never did, not even the published prefix
    assert cached[5] == 0                         # and never published their (compacted) blocks
    assert stats.requests_pruned == 3
    want = reference(llama_path, prompts, CONFIG, max_tokens=12)
    assert [t for t, _ in on] == want


def test_cache_lookup_refused_exactly_for_pruned_lengths(monkeypatch):
    """The lookup refuses a request of n tokens iff keep_count(n) < n (else it is vLLM's lookup); keep_count(P) < P
    implies the same for every P + g (a pruned request resumed after preemption is refused too), checked over lengths
    and budgets."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    monkeypatch.setattr(FullAttentionManager, "find_longest_cache_hit", classmethod(lambda cls, *a, **k: "vllm"))
    for budget, min_prompt in [({"keep_tokens": 64}, 96), ({"keep_ratio": 0.3, "min_tokens": 40}, 0),
                               ({"keep_ratio": 0.5, "max_tokens": 90}, 50)]:
        cfg = load_config(dict(CONFIG, budget=budget, min_prompt_tokens=min_prompt))
        spec = PrunableFullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=32, dtype=None,
                                         prune_config=config_to_json(cfg))
        pruned = {n: keep_count(cfg, n) < n for n in range(1, 700)}
        first = min(n for n, p in pruned.items() if p)
        assert all(pruned[n] for n in range(first, 700))                 # monotone: once pruned, always pruned
        for n in range(1, 700):
            hit = PruneManager.find_longest_cache_hit([], n - 1, [0], None, spec, False, 0)
            assert hit == ((([],), 0) if pruned[n] else "vllm")
