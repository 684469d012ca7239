"""SGLang plugin tests: real SGLang 0.5.23 on its CPU path (torch_native attention), tiny random models.

Where SGLang is not installed (the normal dev/CI venv) only test_sglang_units.py's engine-free tests run; the rest
is not collected. scripts/ci_sglang.sh makes a venv with SGLang and runs this folder.
On CPU, SGLang 0.5.23 imports two packages that have no installable CPU build here (sgl_kernel's CPU build,
a torchvision matching torch 2.13): the import-only stand-ins in stubs/ are put on the path of this process and of
the engine processes, each only where the real package is missing.
Engines are slow to start (tens of seconds on 2 cores), so all engine runs happen in one subprocess, once per
session (fixture `engine_runs`), and the tests read its results.
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
STUBS = os.path.join(HERE, "stubs")


def sglang_installed() -> bool:
    # tests/ is on sys.path, where this folder would pass for a namespace package `sglang`: look for the real one
    spec = importlib.util.find_spec("sglang")
    return spec is not None and spec.origin not in (None, "namespace")


collect_ignore_glob = [] if sglang_installed() else ["test_sglang_engine.py"]

if sglang_installed():
    extra = [os.path.join(STUBS, name) for name in ("sgl_kernel", "torchvision")
             if importlib.util.find_spec(name) is None]
    for path in extra:
        sys.path.append(path)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + extra)
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # SGLang's strict KV-pool checks: leak (every busy step and when idle), double free / use after free
    os.environ.setdefault("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY", "2")
    os.environ.setdefault("SGLANG_CHECK_KV_PAGE_INVARIANTS", "1")
    os.environ.setdefault("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE", "1")
os.environ.pop("KVPRUNE_CONFIG", None)          # tests pass configs explicitly
