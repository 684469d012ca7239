"""Test set-up. Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton is imported anywhere, so it is set here, first.

The checkout's root is taken off sys.path: `python -m pytest` from the root puts it there, and then the folder
kernels/ (installed as colreduce_kvprune.kernels) is importable as a top-level `kernels`, shadowing Hugging Face's
`kernels` package, which transformers 5.25 requires and imports (`from kernels import ...` failed in every
transformers test). The package itself is imported through its installation (pip install -e), not through the
root. Processes the tests start run scripts or console entry points, whose path starts with their own folder.
benchmarks/kernels.py is the same trap on a path that holds benchmarks/: the real `kernels` is imported here first."""
import os
import shutil
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]


def _has_cuda_driver() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


if "TRITON_INTERPRET" not in os.environ and not _has_cuda_driver():
    os.environ["TRITON_INTERPRET"] = "1"

try:      # Hugging Face's `kernels` (after TRITON_INTERPRET: it may import triton), cached now: the benchmark scripts
    import kernels  # noqa: F401,E402  some tests import put benchmarks/, whose kernels.py would pass for it, on
except ImportError:       # sys.path for the rest of the session. transformers < 5.25 does not need it.
    pass

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
