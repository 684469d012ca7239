"""benchmarks/kernels.py's candidate defaults (_candidate_fns), which the serving sweep times beside ours: the
persistent window pass on packed and paged keys against the float64 reference, so a candidate that a later session
makes the default was exact when it was timed (interpreter on CPU, the GPU where there is one)."""
import os
import sys

import pytest
import torch

from test_colreduce import TOL, rel_err
from test_colreduce_paged import paged_case
from test_colreduce_varlen import per_sequence_reference


def _kernels_bench():
    """benchmarks/kernels.py through prune_path's loader (benchmarks/ is not a package: imported from its folder)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        from prune_path import _bench_kernels
    finally:
        sys.path.pop(0)
    return _bench_kernels()


@pytest.mark.parametrize("mode", ["varlen", "paged"])
def test_ragged_persistent_candidate_matches_float64(mode):
    kb = _kernels_bench()
    q_lens, k_lens = [16, 16, 16], [1200, 530, 40]
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 2, 16, "NHD", seed=3)
    case = dict(q=q, k=k, cache=cache, table=table, cu_q=cu_q, cu_k=cu_k, seqlens=seqlens)
    sh = dict(B=1, M=16, N=max(k_lens), D=16, Hq=q.shape[1], Hkv=k.shape[1], lens=k_lens, mode=mode)
    fns = kb._candidate_fns(sh, case, 2)      # 2 "SMs": 2 programs per sequence × kv head, runs of 10 key tiles
    assert list(fns) == ["ours_persistent"]
    out = fns["ours_persistent"]()
    ref = per_sequence_reference(q, k, cu_q, cu_k, "sum", True, "mean", scale=16 ** -0.5)
    if mode == "paged":
        assert all((out[b, :, n:] == 0).all() for b, n in enumerate(k_lens))      # padding written
        out = torch.cat([out[b, :, :n].T for b, n in enumerate(k_lens)])
    assert rel_err(out, ref) < TOL[torch.float32]
    assert kb._candidate_fns(dict(sh, M=4096, N=4096, mode="dense", lens=None), {}, 2) == {}
