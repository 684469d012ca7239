"""Bad configs and unsupported engine settings stop the engine at start with the ConfigError message, before the
scheduler (and its KV cache manager) exists; a correct engine starts fine afterwards in the same process."""
import pytest

from colreduce_kvprune.config import ConfigError
from colreduce_kvprune.vllm import get_stats
from colreduce_kvprune.vllm.stats import managers_created
from vllm_helpers import build_model, engine, greedy, make_llm, random_prompts, shutdown

GOOD = dict(policy="snapkv", budget={"keep_tokens": 64}, window=16, sink_tokens=4, min_prompt_tokens=64)

CASES = [
    ("unknown key", dict(GOOD, windw=8), {}, r"windw"),
    ("pyramidkv", dict(GOOD, policy="pyramidkv"), {}, r"pyramidkv gives layers different kept counts"),
    ("adakv", dict(GOOD, policy="adakv"), {}, r"adakv gives kv heads different kept counts"),
    ("prompt embeds", GOOD, dict(enable_prompt_embeds=True), r"enable_prompt_embeds=True"),
]


def _refused(model, config, overrides, pattern):
    created = managers_created()
    llm = None
    try:
        with pytest.raises(ConfigError, match=pattern):
            llm = make_llm(model, config, **overrides)
    finally:
        shutdown(llm)
    assert managers_created() == created           # the scheduler side never started


@pytest.mark.parametrize("name,config,overrides,pattern", CASES, ids=[c[0] for c in CASES])
def test_refused_at_engine_start(llama_path, name, config, overrides, pattern):
    _refused(llama_path, config, overrides, pattern)


def test_sliding_window_model_refused(tmp_path):
    model = build_model("mistral", tmp_path / "mistral_swa", sliding_window=128)
    _refused(model, GOOD, {}, r"sliding-window models are not supported")


def test_missing_prompt_length_tracker_refused(llama_path, monkeypatch):
    """Without the package's logits processor (entry point vllm.logits_processors) the worker cannot learn prompt
    lengths, needed to re-prune requests recomputed after preemption: refused at engine start, saying why."""
    import vllm.v1.sample.logits_processor as lp
    from vllm.v1.worker.gpu.sample.logits_processor import loader

    monkeypatch.setattr(lp, "_load_custom_logitsprocs", lambda logits_processors: [])     # V1 model runner
    monkeypatch.setattr(loader, "_load_v2_logitsprocs", lambda logits_processors: [])     # V2
    _refused(llama_path, GOOD, {}, r"prompt-length tracker .* is not active")


def test_missing_config_file_from_env(llama_path, tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRUNE_CONFIG", str(tmp_path / "nope.yaml"))
    _refused(llama_path, None, {}, r"nope\.yaml")


def test_env_config_prunes_and_engine_starts_after_failures(llama_path, tmp_path, monkeypatch):
    path = tmp_path / "snap.yaml"
    path.write_text("policy: snapkv\nbudget: {keep_tokens: 64}\nwindow: 16\nsink_tokens: 4\nmin_prompt_tokens: 64\n")
    monkeypatch.setenv("KVPRUNE_CONFIG", str(path))
    with engine(llama_path) as llm:
        out = greedy(llm, random_prompts((200, 40), seed=7), max_tokens=4)
        stats = get_stats(llm)
    assert [len(o) for o in out] == [4, 4]
    assert stats.requests_pruned == 1 and stats.kept_tokens == 64


def test_unsupported_settings_listed():
    """Settings the CPU build cannot reach (no pipeline or context parallelism on CPU): each refused by name. Tensor
    parallelism (tests/vllm/test_vllm_tensor_parallel.py) and async scheduling are not among them."""
    from types import SimpleNamespace as NS

    from colreduce_kvprune.vllm.settings import unsupported_settings

    cfg = NS(model_config=None, cache_config=NS(enable_prefix_caching=False, cache_dtype="fp8"),
             scheduler_config=NS(enable_chunked_prefill=True, long_prefill_token_threshold=0, async_scheduling=True),
             parallel_config=NS(tensor_parallel_size=2, pipeline_parallel_size=2, decode_context_parallel_size=2),
             speculative_config=None, kv_transfer_config=None)
    problems = unsupported_settings(cfg)
    assert len(problems) == 3
    assert "chunked prefill with a quantized KV cache (kv_cache_dtype=fp8)" in problems[0]
    assert "pipeline_parallel_size=2" in problems[1] and "decode_context_parallel_size=2" in problems[2]
    cfg.cache_config.cache_dtype = "auto"                     # chunked prefill itself is supported
    cfg.parallel_config.pipeline_parallel_size = cfg.parallel_config.decode_context_parallel_size = 1
    assert unsupported_settings(cfg) == []             # tensor_parallel_size=2 and async scheduling: supported


def test_unsupported_backend_refused_by_name(monkeypatch):
    """A backend the plugin does not prune with (CPU_MLA on CPU; FlexAttention here on CUDA, also FlashInfer, the MLA
    backends, ...) is vLLM's class with an impl that refuses a configured engine by name: otherwise no plugin code
    would run and pruning would silently not happen. Without a config the impl is vLLM's, unchanged."""
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from colreduce_kvprune.vllm import backend_common, guards

    load_general_plugins()                                     # what every vLLM process does: runs register()
    name, ours = ("CPU_MLA", "CPU_ATTN") if current_platform.is_cpu() else ("FLEX_ATTENTION", "FLASH_ATTN")
    assert AttentionBackendEnum[name].get_path() == f"{guards.__name__}.Guarded_{name}"   # registered by the plugin
    base = resolve_obj_by_qualname(AttentionBackendEnum[name].value)
    backend = getattr(guards, f"Guarded_{name}")
    impl = base.get_impl_cls()
    assert issubclass(backend, base) and issubclass(backend.get_impl_cls(), impl)
    monkeypatch.setattr(impl, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(backend_common, "_current_config", lambda: None)
    backend.get_impl_cls()()                                   # no config: vLLM's impl, nothing refused
    monkeypatch.setattr(backend_common, "_current_config", lambda: object())
    with pytest.raises(ConfigError, match=rf"{ours}.* attention backend, but this engine selected {name}"):
        backend.get_impl_cls()()


def test_cudagraph_support_declared_with_pruning():
    """A pruning backend never lets vLLM replay a full CUDA graph over a step whose attention the plugin must follow
    with its own work: no full graphs of mixed batches. Decode-only batches keep theirs, with chunked prefill too
    (a prompt's 1-token chunk that vLLM runs there as a decode is captured: compaction.LateRows). Without a config
    the base backend's support is unchanged."""
    from vllm.v1.attention.backend import AttentionCGSupport as S

    from colreduce_kvprune.vllm.settings import cudagraph_support

    for base in S:
        assert cudagraph_support(base, pruning=False) is base
        assert cudagraph_support(base, pruning=True) is (
            base if base.value <= S.UNIFORM_SINGLE_TOKEN_DECODE.value else S.UNIFORM_SINGLE_TOKEN_DECODE)
