"""Backends the plugin cannot prune, registered over vLLM's so that a configured pruning run fails at engine start
instead of silently doing nothing: their impl __init__ resolves the config, and `settings.resolve` refuses the model
(MLA). Without a pruning config they are vLLM's classes unchanged. CPU only (CPU_MLA, AMX_MLA); not exercised by the
tests (no tiny MLA model is built there)."""
from __future__ import annotations

from vllm.v1.attention.backends.mla.amx_mla import AMXMLABackend, AMXMLAImpl
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from .backend_common import _current_config


class RefuseIfConfiguredMixin:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _current_config()            # raises ConfigError naming the unsupported model when pruning is configured


class GuardedCPUMLAImpl(RefuseIfConfiguredMixin, CPUMLAImpl):
    pass


class GuardedCPUMLABackend(CPUMLABackend):
    @staticmethod
    def get_impl_cls():
        return GuardedCPUMLAImpl


class GuardedAMXMLAImpl(RefuseIfConfiguredMixin, AMXMLAImpl):
    pass


class GuardedAMXMLABackend(AMXMLABackend):
    @staticmethod
    def get_impl_cls():
        return GuardedAMXMLAImpl
