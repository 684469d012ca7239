"""The vLLM releases the plugin supports (0.32.x, 0.33.x) and what differs between them (colreduce_kvprune/vllm/
versions.py). CI runs these on the CPU build of 0.32; the 0.33 behaviour is exercised here by setting the
attributes 0.33 adds (supports_kv_cache_update_bypass, aux_output_config) on 0.32's classes, and for real by the
same suite on a GPU with vLLM 0.33."""
import dataclasses
from types import SimpleNamespace as NS

import pytest
import torch

from colreduce_kvprune.config import ConfigError
from colreduce_kvprune.vllm import versions

GOOD = dict(policy="snapkv", budget={"keep_tokens": 64}, window=16, sink_tokens=4, min_prompt_tokens=64)


@pytest.mark.parametrize("version,ok", [
    ("0.32.0", True), ("0.32.4", True), ("0.33.0", True), ("0.33.1rc2", True), ("0.33.0.dev12+g0123abc", True),
    ("0.32.1.post1", True), ("0.31.9", False), ("0.34.0", False), ("0.3.2", False), ("0.330.0", False),
    ("1.32.0", False), ("0.34.0rc1", False),
])
def test_supported_releases(version, ok):
    assert versions.supported(version) is ok


def test_unsupported_message_names_the_supported_releases():
    msg = versions.unsupported_message("0.34.1")
    assert "supports vLLM 0.32.x or 0.33.x, found 0.34.1" in msg
    assert "'vllm>=0.32.0,<0.34'" in msg


def _engine_config(prune=GOOD, prefix_caching=False, aux=None, chunked=False):
    return NS(additional_config={} if prune is None else {"kv_prune": prune}, model_config=None,
              cache_config=NS(enable_prefix_caching=prefix_caching, cache_dtype="auto"),
              scheduler_config=NS(enable_chunked_prefill=chunked, long_prefill_token_threshold=0),
              parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1),
              speculative_config=None, kv_transfer_config=None,
              **({} if aux is None else {"aux_output_config": NS(enabled=aux)}))


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0"])
def test_other_releases_refused_by_the_engine_checks(monkeypatch, version):
    import vllm

    from colreduce_kvprune.vllm.settings import resolve, unsupported_settings

    monkeypatch.setattr(vllm, "__version__", version)
    problems = unsupported_settings(_engine_config())
    assert len(problems) == 1 and f"supports vLLM 0.32.x or 0.33.x, found {version}" in problems[0]
    with pytest.raises(ConfigError, match=rf"found {version}"):
        resolve(_engine_config())
    for ok in ("0.32.0", "0.33.0"):
        monkeypatch.setattr(vllm, "__version__", ok)
        assert unsupported_settings(_engine_config()) == []


def test_register_refuses_other_releases(monkeypatch):
    """register() (every vLLM process) installs nothing on another release: it raises when $KVPRUNE_CONFIG asks for
    pruning, and otherwise only warns."""
    import vllm
    import vllm.v1.attention.backends.registry as registry

    import colreduce_kvprune.vllm as plugin

    calls = []
    monkeypatch.setattr(registry, "register_backend", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setenv("KVPRUNE_CONFIG", "snapkv.yaml")
    with pytest.raises(ConfigError, match=r"supports vLLM 0.32.x or 0.33.x, found 0.34.0"):
        plugin.register()
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv("KVPRUNE_CONFIG")
    plugin.register()
    assert calls == []


def test_other_release_refused_at_engine_start(llama_path, monkeypatch):
    """An engine with a pruning config on another vLLM release stops at start, naming the supported ones (the
    backends are registered by the real release first, as in any process that ran an engine before: their
    resolve() refuses)."""
    import vllm
    from vllm.plugins import load_general_plugins
    from vllm_helpers import make_llm, shutdown

    from colreduce_kvprune.vllm.stats import managers_created

    # vLLM loads plugins once per process. Loaded first under the patched release, register() would install nothing
    # and every later engine of this process (a pytest-xdist worker runs this file first at times) would not prune.
    load_general_plugins()
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    created, llm = managers_created(), None
    try:
        with pytest.raises(ConfigError, match=r"supports vLLM 0.32.x or 0.33.x, found 0.34.0"):
            llm = make_llm(llama_path, GOOD)
    finally:
        shutdown(llm)
    assert managers_created() == created


def test_routed_experts_with_prefix_caching_refused_on_033():
    """0.33's scheduler bounds a prefix-cache lookup by the aux output connector (on with enable_return_routed_experts):
    the manager could not tell a pruned request from that bound, so the combination is refused there, and only there."""
    problems = versions.engine_problems(_engine_config(prefix_caching=True, aux=True), "0.33.0")
    assert len(problems) == 1 and "enable_return_routed_experts with prefix caching" in problems[0]
    assert versions.engine_problems(_engine_config(prefix_caching=False, aux=True), "0.33.0") == []
    assert versions.engine_problems(_engine_config(prefix_caching=True, aux=False), "0.33.0") == []
    assert versions.engine_problems(_engine_config(prefix_caching=True, aux=True), "0.32.0") == []


def _spec():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=16, dtype=torch.float32, page_size_padded=8192,
                             max_tp_shards=2)


def test_prunable_spec_copies_every_field_and_survives_replace(monkeypatch):
    """customize_spec turns vLLM's FullAttentionSpec into PrunableFullAttentionSpec with all its fields (whatever the
    release adds: 0.33's is_draft); vLLM then `dataclasses.replace`s specs (KV cache planning: block_size,
    page_size_padded; 0.33: is_draft=True for draft layers), which must keep the class and the pruning config."""
    from colreduce_kvprune.vllm import backend_common
    from colreduce_kvprune.vllm.manager import PrunableFullAttentionSpec

    monkeypatch.setattr(backend_common, "_last_config_json", '{"policy": "snapkv"}')
    base = _spec()
    spec = backend_common.prunable_spec(base)
    assert type(spec) is PrunableFullAttentionSpec and spec.prune_config == '{"policy": "snapkv"}'
    for f in dataclasses.fields(base):
        assert getattr(spec, f.name) == getattr(base, f.name), f.name
    assert backend_common.prunable_spec(spec) is spec                      # customize_spec may run twice
    changes = [dict(block_size=64), dict(page_size_padded=16384)]
    if "is_draft" in {f.name for f in dataclasses.fields(spec)}:           # vLLM >= 0.33
        changes.append(dict(is_draft=True))
    for change in changes:
        new = dataclasses.replace(spec, **change)
        assert type(new) is PrunableFullAttentionSpec and new.prune_config == spec.prune_config, change
    assert type(spec.copy_with_new_block_size(16)) is PrunableFullAttentionSpec
    merged = PrunableFullAttentionSpec.merge([spec, dataclasses.replace(spec)])
    assert type(merged) is PrunableFullAttentionSpec and merged.prune_config == spec.prune_config


def _backends():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from colreduce_kvprune.vllm.backend_cpu import PruneCPUAttentionBackend
    from colreduce_kvprune.vllm.backend_cuda import PruneFlashAttentionBackend, PruneTritonAttentionBackend

    return [(PruneCPUAttentionBackend, CPUAttentionBackend), (PruneFlashAttentionBackend, FlashAttentionBackend),
            (PruneTritonAttentionBackend, TritonAttentionBackend)]


@pytest.mark.parametrize("base_value", [False, True])
def test_kv_cache_update_bypass_off_while_pruning(monkeypatch, base_value):
    """vLLM 0.33 lets a model write K/V itself and call attention with key=None when the backend class says
    supports_kv_cache_update_bypass (FLASH_ATTN: True). A pruning backend says so only without a pruning config
    (the prefill's key/value are what the plugin scores); vLLM reads it from the class while building the model."""
    import vllm.config

    current = {"config": None}
    monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda: current["config"])
    monkeypatch.delenv("KVPRUNE_CONFIG", raising=False)
    for ours, base in _backends():
        monkeypatch.setattr(base, "supports_kv_cache_update_bypass", base_value, raising=False)
        current["config"] = _engine_config(prune=None)
        assert ours.supports_kv_cache_update_bypass is base_value, ours.__name__
        current["config"] = _engine_config(prune=GOOD)
        assert ours.supports_kv_cache_update_bypass is False, ours.__name__
        current["config"] = None                                           # no engine being built: the safe answer
        assert ours.supports_kv_cache_update_bypass is False, ours.__name__
        monkeypatch.setenv("KVPRUNE_CONFIG", "snapkv.yaml")
        current["config"] = _engine_config(prune=None)
        assert ours.supports_kv_cache_update_bypass is False, ours.__name__
        monkeypatch.delenv("KVPRUNE_CONFIG")


def test_pruning_step_with_key_none_raises():
    """If a None key ever reaches a pruning step (a fused KV write the backend did not turn off), the impl says so
    instead of pruning nothing; steps that do not prune pass a None key through to vLLM's attention."""
    from colreduce_kvprune.vllm.backend_common import PruneImplMixin

    class Base:
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            return output

    class Impl(PruneImplMixin, Base):
        pass

    impl = object.__new__(Impl)                    # no vLLM impl state needed for this path
    impl.prune_cold = False                        # (set by __init__: the scoring kernels' warm-up is done)
    impl.prune_config = impl.prune_captured = impl.prune_capture_kv = None
    q, out = torch.zeros(4, 2, 16), torch.zeros(4, 2, 16)
    assert impl.forward(None, q, None, None, None, NS(kvprune=None), out) is out
    with pytest.raises(RuntimeError, match="without key/value tensors"):
        impl.forward(None, q, None, None, None, NS(kvprune=NS(stash=False, plan=object())), out)


@pytest.mark.parametrize("name", ["CPU", "FlashAttention", "Triton"])
def test_builder_caps_a_full_cudagraph_claim(monkeypatch, name):
    """0.33's FlashAttention builder claims ALWAYS (full CUDA graphs of every batch) for FA4 as for FA3: each pruning
    builder class caps what its vLLM base returns (the mixin comes first in the MRO)."""
    from vllm.v1.attention.backend import AttentionCGSupport as S

    from colreduce_kvprune.vllm import backend_cpu, backend_cuda

    ours = {"CPU": backend_cpu.PruneCPUAttentionMetadataBuilder,
            "FlashAttention": backend_cuda.PruneFlashAttentionMetadataBuilder,
            "Triton": backend_cuda.PruneTritonAttentionMetadataBuilder}[name]
    base = ours.__mro__[2]
    assert base.__module__.startswith("vllm.")
    monkeypatch.setattr(base, "_cudagraph_support", S.ALWAYS)
    monkeypatch.setattr(base, "get_cudagraph_support", classmethod(lambda cls, c, s: cls._cudagraph_support))
    assert ours.get_cudagraph_support(_engine_config(prune=None), None) is S.ALWAYS
    assert ours.get_cudagraph_support(_engine_config(), None) is S.UNIFORM_SINGLE_TOKEN_DECODE
    assert ours.get_cudagraph_support(_engine_config(chunked=True), None) is S.UNIFORM_SINGLE_TOKEN_DECODE


@pytest.mark.parametrize("readable", [True, False])
def test_forward_captures_the_late_rows(readable):
    """Every forward copies the rows of the builder's LateRows index (one-token prompt steps, which full CUDA graphs
    replay without the plugin's Python): the queries always; the keys and values only where the backend cannot read
    its cache back (prune_kv_views None, the CPU backend), decided at the first forward with a KV cache."""
    from colreduce_kvprune.vllm import compaction
    from colreduce_kvprune.vllm.backend_common import PruneImplMixin

    class Base:
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            return output

    class Impl(PruneImplMixin, Base):
        def prune_kv_views(self, kv_cache):
            return (kv_cache, kv_cache) if readable else None

    impl = object.__new__(Impl)
    impl.prune_cold, impl.prune_config = False, object()
    impl.prune_captured = impl.prune_capture_kv = None
    impl.prune_late_rows = compaction.LATE_ROWS
    q, k, v, out = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.zeros(5, 4, 8)
    index = torch.zeros(compaction.LATE_ROWS, dtype=torch.long)
    index[:2] = torch.tensor([3, 1])
    assert impl.forward(None, q, k, v, torch.zeros(2, 3), NS(kvprune=None, kvprune_late=index), out) is out
    cq, ck, cv = impl.prune_captured
    assert torch.equal(cq, q[index]) and impl.prune_capture_kv is (not readable)
    assert torch.equal(ck, k[index]) != readable and torch.equal(cv, v[index]) != readable
