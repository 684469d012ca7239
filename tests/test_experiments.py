"""The kernel experiments of benchmarks/ (issue 19): window_persistent.py (the persistent window column pass),
row_pass.py (row pass variants), column_pass.py (the long column pass's loop), gluon_row_pass.py,
gluon_column_pass.py, gluon_ws_row_pass.py, gluon_ws_column_pass.py and gluon_ws_window_pass.py (the passes in Gluon,
on an H200-class GPU only), window_fold.py (the window column pass transposed, its lse folded into the dot),
short_fused.py (both passes of a short causal prompt in one launch), each
one's check() against float64 on small shapes (interpreter on CPU, the GPU where there is one), so what the benchmarks
time stays exact."""
import importlib.util
import os

import pytest
import torch

from test_colreduce import DEVICE


@pytest.mark.parametrize("script", ["window_persistent.py", "row_pass.py", "column_pass.py", "gluon_row_pass.py",
                                    "gluon_column_pass.py", "gluon_ws_row_pass.py",
                                    "gluon_ws_column_pass.py", "gluon_ws_window_pass.py", "window_fold.py",
                                    "short_fused.py"])
def test_experiment_matches_float64(script):
    if script.startswith("gluon_") and not (DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("Gluon's Hopper kernel runs only on sm_90 (no interpreter); on the CPU "
                    "tests/test_colreduce_compile.py compiles it and reads its SASS")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", script)
    spec = importlib.util.spec_from_file_location(script[:-3] + "_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.check(DEVICE)
