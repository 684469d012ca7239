"""Both column-pass kernels (_window_column_kernel, _long_column_kernel), each forced through the launcher's config,
against the float64 reference on dense, packed varlen and paged inputs (the shape rule picks only one of them
for a given shape, so each is also run where the other one would be chosen)."""
import math

import pytest
import torch

from colreduce_kvprune.kernels.colreduce import _pick_config, colreduce_triton
from test_colreduce import DEVICE, GROUP, REDUCTIONS, TOL, _poison_empty, rand_qk, reference, rel_err
from test_colreduce_paged import paged_case
from test_colreduce_varlen import per_sequence_reference

KERNELS = {"window-kernel": True, "long-kernel": False}
# (B, Hq, Hkv, M, N, D): a window shorter than its keys, M = N with a ragged end, M > N, a group of 3 (not 2^k)
SHAPES = {
    "M16-N100-g4": (1, 4, 1, 16, 100, 32),
    "M45-N45-g2-B2": (2, 4, 2, 45, 45, 16),
    "M40-N20-g1": (1, 2, 2, 40, 20, 16),
    "M9-N70-g3": (1, 6, 2, 9, 70, 16),
}


def forced(window: bool, m: int, d: int) -> dict:
    return dict(_pick_config(m, d, 1, True), WINDOW=window)


@pytest.mark.parametrize("window", KERNELS.values(), ids=KERNELS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_dense(window, shape, is_causal, monkeypatch):
    if DEVICE == "cpu" and not is_causal and shape[0] > 1:
        pytest.skip("interpreter time: the batched shape runs causal only on CPU")
    _poison_empty(monkeypatch)                              # unwritten outputs are NaN
    q, k = rand_qk(shape, torch.float32, seed=3)
    scale = 1 / math.sqrt(shape[-1])
    for reduction in REDUCTIONS:
        for group in GROUP:
            out = colreduce_triton(q, k, reduction, is_causal=is_causal, scale=scale, group_reduce=group,
                                   config=forced(window, shape[3], shape[5]))
            ref = reference(q, k, reduction, is_causal, group)
            assert out.shape == ref.shape
            assert rel_err(out, ref) < TOL[torch.float32], (reduction, group)


@pytest.mark.parametrize("window", KERNELS.values(), ids=KERNELS.keys())
def test_varlen_and_paged(window, monkeypatch):
    _poison_empty(monkeypatch)
    q_lens, k_lens = [8, 30, 0, 5], [70, 30, 12, 5]          # a window, a prefill, an empty window, a short one
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 2, 16, "NHD", seed=5)
    cfg = forced(window, max(q_lens), 16)
    for reduction in REDUCTIONS:
        for group in (None, "max"):
            ref = per_sequence_reference(q, k, cu_q, cu_k, reduction, True, group)
            out = colreduce_triton(q, k, reduction, is_causal=True, scale=0.25, group_reduce=group,
                                   cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(q_lens),
                                   max_seqlen_k=max(k_lens), config=cfg)
            assert rel_err(out, ref) < TOL[torch.float32], ("varlen", reduction, group)
            paged = colreduce_triton(q, cache, reduction, is_causal=True, scale=0.25, group_reduce=group,
                                     cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
                                     block_table=table, seqlens_k=seqlens, config=cfg)
            start = 0
            for b, n in enumerate(k_lens):                   # (B, H, max_n) → the packed rows of sequence b
                got = paged[b, :, :n].T
                assert not torch.isnan(paged[b, :, :n]).any()
                if n and q_lens[b]:
                    assert rel_err(got, ref[start:start + n]) < TOL[torch.float32], ("paged", reduction, group, b)
                start += n
