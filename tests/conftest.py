"""Test set-up. Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton is imported anywhere, so it is set here, first."""
import os
import shutil
import subprocess


def _has_cuda_driver() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


if "TRITON_INTERPRET" not in os.environ and not _has_cuda_driver():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def online():
    """benchmarks/serving_online.py (benchmarks/ is not a package: imported from its folder)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        import serving_online
    finally:
        sys.path.pop(0)
    return serving_online
