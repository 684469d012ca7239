"""The plugin on real SGLang engines (CPU, torch_native, float32, greedy, chunked prefill of 128 tokens, strict
KV-pool checks on). All engines run once per session in one subprocess (engine_runner.py); the tests read the
results:
- pruned runs equal the transformers path (colreduce_kvprune.hf.generate) token for token, for prompts of mixed
  lengths in one batch (some under min_prompt_tokens, some whose window or queries span prefill chunks), through
  both compactions: K/V moved (SnapKV, TOVA, KNorm per head; H2O shared by heads) and index rewrite
  (StreamingLLM); Llama and Qwen2; TOVA with every prompt in one chunk;
- right after each pruned prefill the pool's free-slot count rose by exactly the pruned tokens, and after the
  engine idled (SGLang's idle leak / double-free checks) it still serves a request;
- with SGLang's retraction test mode on, pruned requests are retracted, freed, prefilled and pruned again with no
  leak or double free;
- no config: outputs equal SGLang without the plugin (SGLANG_PLUGINS=none);
- a bad config or unsupported setting stops the engine with the message before any subprocess starts.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from colreduce_kvprune.policies import keep_count

HERE = os.path.dirname(os.path.abspath(__file__))
LENGTHS = (300, 57, 200, 129, 96, 40)     # 57, 40 < min_prompt_tokens; 129 = one chunk + 1 token
MAX_NEW = 12
BASE = dict(budget={"keep_tokens": 64}, window=16, sink_tokens=4, min_prompt_tokens=64)
CONFIGS = {
    "snapkv": dict(BASE, policy="snapkv", pooling={"kind": "max", "kernel": 5}, per_head=True),
    "h2o": dict(BASE, policy="h2o", per_head=False),
    "streamingllm": dict(BASE, policy="streamingllm", per_head=False),
    "tova": dict(BASE, policy="tova", per_head=True),
    "knorm": dict(BASE, policy="knorm", per_head=True),
}
MODEL_OF = {"snapkv": "llama", "h2o": "llama", "streamingllm": "qwen2", "tova": "qwen2", "knorm": "llama"}
ENGINE_OF = {"tova": {"chunked_prefill_size": 2048}}   # one run with every prompt prefilled in one chunk
ENGINE = dict(device="cpu", skip_tokenizer_init=True, attention_backend="torch_native", dtype="float32",
              max_total_tokens=4096, disable_cuda_graph=True, log_level="warning", random_seed=0,
              chunked_prefill_size=128, disable_overlap_schedule=True, disable_radix_cache=True)
REFUSALS = {   # name: (config overrides or a raw YAML text, engine overrides, expected words in the message)
    "bad_config": ("policy: snapkv\nbudget: {keep_ratio: 2.0}\n", {}, ["budget.keep_ratio"]),
    "pyramidkv": (dict(BASE, policy="pyramidkv"), {}, ["pyramidkv", "Engines that can: transformers"]),
    "adakv": (dict(BASE, policy="adakv"), {}, ["adakv", "Engines that can: transformers"]),
    "mixed_chunk": (CONFIGS["snapkv"], {"enable_mixed_chunk": True}, ["enable_mixed_chunk"]),
    "speculative": (CONFIGS["snapkv"], {"speculative_algorithm": "NGRAM"}, ["speculative decoding"]),
    "page_size": (CONFIGS["snapkv"], {"page_size": 16}, ["page_size=16"]),
    "mla_model": (CONFIGS["snapkv"], {"model": "mla", "load_format": "dummy"}, ["attention architecture MLA"]),
}


def prompts(seed=1):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(n - 1)] for n in LENGTHS]


def _write(path, config) -> str:
    import yaml

    with open(path, "w") as f:
        f.write(config if isinstance(config, str) else yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(HERE))
    try:
        from tiny_models import make_tiny_model
    finally:
        sys.path.pop(0)
    paths = {kind: make_tiny_model(kind, tmp_path_factory.mktemp(f"tiny_{kind}")) for kind in ("llama", "qwen2")}
    paths["mla"] = _mla_config_folder(tmp_path_factory.mktemp("tiny_deepseek_v2"))
    return paths


def _mla_config_folder(path) -> str:
    """A DeepSeek-V2 (MLA attention) config.json only: SGLang resolves it, the plugin must refuse it."""
    from transformers import DeepseekV2Config

    config = DeepseekV2Config(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                              q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                              n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2)
    config.architectures = ["DeepseekV2ForCausalLM"]
    config.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def engine_runs(models, tmp_path_factory):
    """name -> result of engine_runner.run_one, for every run (one subprocess for all)."""
    cfg_dir = tmp_path_factory.mktemp("configs")
    ps = prompts()
    runs = []

    def add(name, config, model="llama", engine=None, env=None, max_new=MAX_NEW):
        env = {"SGLANG_TEST_RETRACT": None, **(env or {})}
        env["KVPRUNE_CONFIG"] = None if config is None else _write(cfg_dir / f"{name}.yaml", config)
        runs.append(dict(name=name, env=env, engine=dict(ENGINE, model_path=models[model], **(engine or {})),
                         prompts=ps, max_new_tokens=max_new))

    add("snapkv", CONFIGS["snapkv"])            # first: the plugin is loaded with a config in the runner process
    for name, (config, engine, _) in REFUSALS.items():
        engine = dict(engine)
        add(f"refuse_{name}", config, model=engine.pop("model", "llama"), engine=engine)
    for name in CONFIGS:
        if name != "snapkv":
            add(name, CONFIGS[name], model=MODEL_OF[name], engine=ENGINE_OF.get(name))
    # SGLang's retraction test mode: every 3rd step a running request is retracted (its KV freed) and later
    # prefilled again from its prompt + outputs so far — a pruned request's shortened KV lengths must free exactly
    # what it holds, and the new prefill is pruned again
    add("retract", CONFIGS["snapkv"], env={"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3"},
        max_new=24)
    add("no_config", None)
    add("vanilla", None, env={"SGLANG_PLUGINS": "none"})
    proc = subprocess.run([sys.executable, os.path.join(HERE, "engine_runner.py"), json.dumps(runs)],
                          capture_output=True, text=True, timeout=900)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["name"]] = r
    missing = [r["name"] for r in runs if r["name"] not in results]
    assert not missing, (f"engine runs {missing} gave no result (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return results


def transformers_path(model_path, config, max_new=MAX_NEW):
    from transformers import AutoModelForCausalLM

    from colreduce_kvprune.hf import generate

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager").eval()
    return generate(model, prompts(), config, max_new_tokens=max_new, eos_token_id=[]).sequences


def _ok(result):
    assert "error" not in result, result["error"]
    return result


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pruned_outputs_equal_transformers_path(engine_runs, models, name):
    got = _ok(engine_runs[name])["outputs"]
    model = models[MODEL_OF[name]]
    want = transformers_path(model, CONFIGS[name])
    assert got == want
    # the test can fail: pruning changed the outputs of at least one long prompt
    unpruned = transformers_path(model, dict(CONFIGS[name], min_prompt_tokens=100000))
    assert any(w != u for w, u, n in zip(want, unpruned, LENGTHS) if n >= 64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_freed_slots_and_pool_whole_when_idle(engine_runs, name):
    run = _ok(engine_runs[name])
    config = CONFIGS[name]
    pruned = sorted(n for n in LENGTHS if keep_count(config, n) < n)
    events = run["events"]
    assert sorted(e["prompt_tokens"] for e in events) == pruned
    assert set(e["rid"] for e in events) <= set(run["rids"])
    for e in events:
        keep = keep_count(config, e["prompt_tokens"])
        assert e["kept_tokens"] == keep
        assert e["free_after"] - e["free_before"] == e["prompt_tokens"] - keep
        # the zero-copy rewrite exactly when every layer and head keeps the same tokens
        assert e["index_rewrite"] == (name == "streamingllm")
    # served one more request after idling with SGLang's strict idle checks (leak, double free) on
    assert len(run["probe"]) == 2


def test_retracted_pruned_requests_are_freed_and_pruned_again(engine_runs):
    run = _ok(engine_runs["retract"])
    assert [len(o) for o in run["outputs"]] == [24] * len(LENGTHS)
    first = sorted(n for n in LENGTHS if keep_count(CONFIGS["snapkv"], n) < n)
    events = run["events"]
    assert len(events) > len(first)                                  # re-prefills after retraction were pruned
    for e in events:
        keep = keep_count(CONFIGS["snapkv"], e["prompt_tokens"])
        assert e["kept_tokens"] == keep
        assert e["free_after"] - e["free_before"] == e["prompt_tokens"] - keep
    assert len(run["probe"]) == 2                                     # strict leak / double-free checks passed


def test_no_config_equals_sglang_without_plugin(engine_runs):
    no_config, vanilla = _ok(engine_runs["no_config"]), _ok(engine_runs["vanilla"])
    assert no_config["events"] == []
    assert no_config["outputs"] == vanilla["outputs"]
    assert no_config["outputs"] != _ok(engine_runs["snapkv"])["outputs"]


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_stop_the_engine_with_the_message(engine_runs, name):
    run = engine_runs[f"refuse_{name}"]
    assert "error" in run, f"{name}: the engine started"
    assert run["error"].startswith("ConfigError: colreduce_kvprune"), run["error"]
    for words in REFUSALS[name][2]:
        assert words in run["error"], run["error"]
    assert run["new_children"] == [], "an SGLang subprocess was started before the refusal"
