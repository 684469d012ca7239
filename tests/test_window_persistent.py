"""benchmarks/window_persistent.py, the persistent window column pass experiment (issue 19): its kernel against
float64 on small shapes (interpreter on CPU, the GPU where there is one), so the experiment the benchmark times
stays exact."""
import importlib.util
import os

from test_colreduce import DEVICE


def test_window_persistent_matches_float64():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "window_persistent.py")
    spec = importlib.util.spec_from_file_location("window_persistent_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.check(DEVICE)
