"""Capacity: with a small KV pool and long prompts, vanilla vLLM queues (and may preempt) while the plugin, which
frees most of each prompt's blocks after prefill, runs more requests at once. Measured with vLLM's own scheduler
stats (SchedulerStats.num_running_reqs / num_waiting_reqs after every step) and its requests' preemption counts.
Preemption: a pruned request that vLLM preempts and recomputes continues exactly as if it had not been preempted."""
import pytest

from colreduce_kvprune.vllm import get_stats
from vllm_helpers import engine, random_prompts, reference, scheduler

NUM_BLOCKS = 48                     # 47 usable blocks of 32 tokens; one 480-token prompt needs 15
LENGTHS = (480,) * 8
CONFIG = dict(policy="snapkv", budget={"keep_tokens": 64}, window=16, sink_tokens=4, min_prompt_tokens=64)
MAX_TOKENS = 24


def run_stepwise(llm, prompts):
    """Run all prompts; return (outputs, max running at once, max waiting, total preemptions)."""
    from vllm import SamplingParams

    core, sched = llm.llm_engine, scheduler(llm)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        core.add_request(str(i), {"prompt_token_ids": p}, sp)
    outs, max_running, max_waiting, preemptions = {}, 0, 0, {}
    while core.has_unfinished_requests():
        for o in core.step():
            if o.finished:
                outs[int(o.request_id)] = list(o.outputs[0].token_ids)
        stats = sched.make_stats()
        max_running = max(max_running, stats.num_running_reqs)
        max_waiting = max(max_waiting, stats.num_waiting_reqs)
        for rid, req in sched.requests.items():
            preemptions[rid] = max(preemptions.get(rid, 0), req.num_preemptions)
    return [outs[i] for i in range(len(prompts))], max_running, max_waiting, sum(preemptions.values())


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=5)


@pytest.fixture(scope="module")
def vanilla(llama_path, prompts):
    with engine(llama_path, None, num_gpu_blocks_override=NUM_BLOCKS, disable_log_stats=False) as llm:
        return run_stepwise(llm, prompts)


@pytest.fixture(scope="module")
def pruned(llama_path, prompts):
    with engine(llama_path, CONFIG, num_gpu_blocks_override=NUM_BLOCKS, disable_log_stats=False) as llm:
        result = run_stepwise(llm, prompts)
        stats = get_stats(llm)
        assert scheduler(llm).kv_cache_manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    return result, stats


def test_plugin_runs_more_requests_at_once(vanilla, pruned):
    (_, v_running, v_waiting, v_preempt) = vanilla
    (_, p_running, _, p_preempt), stats = pruned
    assert v_running <= 3 and v_waiting >= 4          # vanilla: the pool holds at most 3 such prompts
    assert p_running >= 2 * v_running                  # plugin: pruned requests hold 3 blocks instead of 16
    assert v_preempt > 0 and p_preempt == 0
    assert stats.requests_pruned >= len(LENGTHS)
    assert stats.peak_blocks_in_use <= NUM_BLOCKS - 1


def test_small_pool_outputs(llama_path, prompts, vanilla, pruned):
    (v_out, *_), ((p_out, _, _, p_preempt), _) = vanilla, pruned
    assert v_out == reference(llama_path, prompts, dict(CONFIG, min_prompt_tokens=10**6), max_tokens=MAX_TOKENS)
    assert p_preempt == 0                              # so each output equals the transformers path
    assert p_out == reference(llama_path, prompts, CONFIG, max_tokens=MAX_TOKENS)


def run_with_preemptions(llm, prompts, max_tokens):
    """Run all prompts together to completion; return (outputs, number of preemptions), the latter from vLLM's own
    per-request counters (Request.num_preemptions; the scheduler keys requests by internal ids)."""
    from vllm import SamplingParams

    core, sched = llm.llm_engine, scheduler(llm)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    ids = [f"{id(prompts)}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        core.add_request(rid, {"prompt_token_ids": p}, sp)
    outs, preemptions = {}, {}
    while core.has_unfinished_requests():
        for o in core.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
        for rid, req in sched.requests.items():
            preemptions[rid] = max(preemptions.get(rid, 0), req.num_preemptions)
    return [outs[rid] for rid in ids], sum(preemptions.values())


CHUNKED = dict(enable_chunked_prefill=True, max_num_batched_tokens=64)


@pytest.mark.parametrize("config,chunked", [
    (CONFIG, {}), (dict(CONFIG, policy="h2o"), {}),
    (dict(CONFIG, policy="h2o"), CHUNKED)],
    ids=["snapkv", "h2o", "h2o-chunked"])
def test_preemption_and_recompute_reprune(llama_path, config, chunked):
    """Long decodes in a tiny pool: pruned requests get preempted and recomputed (prompt + outputs prefilled again
    from position 0; with chunked prefill over several steps, the prompt's last chunk pruning it). Each is pruned
    again exactly as the first time (same kept prompt tokens, outputs kept, outputs' attention over the kept tokens
    only), so its greedy output equals the one of a run without preemption (each request alone in the same pool),
    token for token; and every block comes back."""
    prompts, max_tokens, num_blocks = random_prompts((150, 140), seed=6), 100, 10   # 9 usable blocks of 32
    with engine(llama_path, config, num_gpu_blocks_override=num_blocks, max_model_len=288,
                disable_log_stats=False, **chunked) as llm:
        pool = scheduler(llm).kv_cache_manager.block_pool
        stats0 = get_stats(llm)
        together, preempted = run_with_preemptions(llm, prompts, max_tokens)
        stats = get_stats(llm)
        alone = [run_with_preemptions(llm, [p], max_tokens) for p in prompts]
        assert pool.get_num_free_blocks() == num_blocks - 1
    assert preempted > 0 and stats.requests_recomputed - stats0.requests_recomputed > 0
    assert stats.requests_pruned - stats0.requests_pruned == len(prompts) + preempted
    assert [n for _, n in alone] == [0] * len(prompts)      # the reference runs: no preemption
    assert together == [out[0] for out, _ in alone]
    assert all(len(o) == max_tokens for o in together)
