"""KVPRUNE_TIMING=1: every attention layer of a step that prunes (or stashes a chunk) records its attention and its
pruning work, on the device clock and the host clock, and summary() adds them up (steps without pruning record
nothing)."""
from colreduce_kvprune.vllm import timing
from vllm_helpers import engine, greedy, random_prompts

CONFIG = dict(policy="snapkv", budget={"keep_tokens": 64}, window=16, sink_tokens=4, min_prompt_tokens=64)


def test_timing_records_each_pruning_step(llama_path, monkeypatch):
    monkeypatch.setattr(timing, "ENABLED", True)
    timing.reset()
    try:
        with engine(llama_path, CONFIG) as llm:
            greedy(llm, random_prompts((300,), seed=3), max_tokens=4)        # one prefill step prunes
            greedy(llm, random_prompts((40,), seed=4), max_tokens=4)         # below min_prompt_tokens: nothing
            layers = llm.llm_engine.vllm_config.model_config.hf_config.num_hidden_layers
        s = timing.summary()
    finally:
        timing.reset()
    assert s["steps"] == 1 and s["layer_calls"] == layers
    assert s["attention_ms"] > 0 and s["pruning_ms"] > 0 and s["decoder_span_ms"] >= s["attention_ms"] + s["pruning_ms"]
    assert 0 < s["pruning_share_of_decoder_span"] < 1
    assert s["pruning_host_ms"] > 0 and s["decoder_span_host_ms"] >= s["pruning_host_ms"]
    assert s["stash_steps"] == 0 and s["stash_ms"] == 0 == s["stash_host_ms"]


def test_timing_counts_stash_steps_apart(llama_path, monkeypatch):
    """A prompt prefilled in chunks: the steps before its last chunk only stash (counted apart), the last prunes."""
    monkeypatch.setattr(timing, "ENABLED", True)
    timing.reset()
    try:
        with engine(llama_path, CONFIG, enable_chunked_prefill=True, max_num_batched_tokens=64) as llm:
            greedy(llm, random_prompts((300,), seed=3), max_tokens=2)       # 5 chunks of <= 64 tokens
            layers = llm.llm_engine.vllm_config.model_config.hf_config.num_hidden_layers
        s = timing.summary()
    finally:
        timing.reset()
    # every chunk step records (the window's queries are stashed where they fall), the last one prunes
    assert s["steps"] == 5 and s["stash_steps"] == 4 and s["layer_calls"] == 5 * layers
    assert 0 <= s["stash_ms"] < s["pruning_ms"] and 0 < s["stash_host_ms"] < s["pruning_host_ms"]   # GPU: ~0 possible


def test_profile_writes_one_table_per_profiled_step(llama_path, monkeypatch, tmp_path):
    """KVPRUNE_PROFILE_STEPS: torch.profiler over the decoder layers of a step that prunes with one selection per
    step, written as op tables (the selection's sort among the ops); skipped steps and steps past the count are
    not profiled."""
    out = tmp_path / "profile.txt"
    monkeypatch.setattr(timing, "PROFILE_STEPS", 1)
    monkeypatch.setattr(timing, "PROFILE_SKIP", 1)
    monkeypatch.setattr(timing, "PROFILE_OUT", str(out))
    monkeypatch.setattr(timing, "_profile", {"active": None, "step": None, "seen": 0, "done": 0, "t0": 0.0})
    with engine(llama_path, CONFIG) as llm:
        for seed in (3, 5, 7):                   # three pruning steps: the first skipped, the second profiled
            greedy(llm, random_prompts((300,), seed=seed), max_tokens=2)
    text = out.read_text()
    assert text.count("== pruning step") == 1 and "== pruning step 2 " in text, text[:300]
    assert "prompt lengths [300]" in text and "-- by self host time" in text and "aten::sort" in text
    assert timing._profile["active"] is None and timing._profile["done"] == 1
