"""colreduce_varlen (packed batches) against the float64 reference applied to each sequence on its own."""
import pytest
import torch

from colreduce_kvprune import colreduce_varlen
from test_colreduce import DEVICE, TOL, reference, rel_err

# (query lengths, key lengths): windows shorter than keys, M > N, zero-length sequences, ragged ends
CASES = {
    "windows": ([8, 8, 8], [40, 100, 17]),
    "prefill": ([30, 70, 5], [30, 70, 5]),
    "empty-seqs": ([0, 12, 0, 3], [9, 12, 0, 3]),
    "m-gt-n": ([20, 4], [6, 50]),
}


def packed(case, Hq, Hkv, D, dtype, seed):
    lq, lk = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), Hq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(sum(lk), Hkv, D, generator=g).to(DEVICE, dtype)
    cu = lambda lens: torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)  # noqa: E731
    return q, k, cu(lq), cu(lk)


def per_sequence_reference(q, k, cu_q, cu_k, reduction, is_causal, group_reduce, scale=None):
    outs = []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)[None]
        kb = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None]
        if kb.shape[2] == 0:
            continue
        if qb.shape[2] == 0:
            heads = q.shape[1] if group_reduce is None else k.shape[1]
            outs.append(torch.zeros(kb.shape[2], heads, dtype=torch.float64, device=q.device))
            continue
        outs.append(reference(qb, kb, reduction, is_causal, group_reduce, scale)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("group_reduce", [None, "mean"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_matches_per_sequence(case, group_reduce, backend):
    q, k, cu_q, cu_k = packed(case, 4, 2, 32, torch.float32, seed=0)
    for reduction in ("sum", "mean", "max"):
        out = colreduce_varlen(q, k, cu_q, cu_k, reduction, is_causal=True, group_reduce=group_reduce,
                               backend=backend)
        assert out.shape == (k.shape[0], 4 if group_reduce is None else 2)
        ref = per_sequence_reference(q, k, cu_q, cu_k, reduction, True, group_reduce)
        assert rel_err(out, ref) < TOL[torch.float32], reduction


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_non_causal_half(backend):
    q, k, cu_q, cu_k = packed(CASES["windows"], 8, 2, 64, torch.float16, seed=1)
    out = colreduce_varlen(q, k, cu_q, cu_k, "sum", backend=backend)
    assert rel_err(out, per_sequence_reference(q, k, cu_q, cu_k, "sum", False, None)) < TOL[torch.float16]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_lse(backend):
    q, k, cu_q, cu_k = packed(CASES["windows"], 4, 2, 32, torch.float32, seed=2)
    scale = 0.2
    lse = torch.empty(4, q.shape[0], device=DEVICE)
    for b in range(3):
        qb, kb = q[cu_q[b]:cu_q[b + 1]].double(), k[cu_k[b]:cu_k[b + 1]].double().repeat_interleave(2, 1)
        s = torch.einsum("mhd,nhd->hmn", qb, kb) * scale
        M, N = s.shape[1], s.shape[2]
        mask = torch.arange(N, device=DEVICE)[None, :] > torch.arange(M, device=DEVICE)[:, None] + (N - M)
        lse[:, cu_q[b]:cu_q[b + 1]] = s.masked_fill(mask, float("-inf")).logsumexp(-1).float()
    out = colreduce_varlen(q, k, cu_q, cu_k, "sum", is_causal=True, scale=scale, lse=lse, backend=backend)
    assert rel_err(out, per_sequence_reference(q, k, cu_q, cu_k, "sum", True, None, scale)) < 1e-5


def test_varlen_errors():
    q, k, cu_q, cu_k = packed(CASES["windows"], 4, 2, 32, torch.float32, seed=3)
    with pytest.raises(ValueError, match="must be 3-D"):
        colreduce_varlen(q[None], k, cu_q, cu_k)
    with pytest.raises(ValueError, match="different batch sizes"):
        colreduce_varlen(q, k, torch.cat([cu_q, cu_q[-1:]]), cu_k)     # one more (empty) query sequence
    with pytest.raises(TypeError, match="int32 or int64"):
        colreduce_varlen(q, k, cu_q.float(), cu_k)
    if not q.is_cuda:
        with pytest.raises(ValueError, match=f"ends at {k.shape[0]} but the packed tensor has {k.shape[0] - 1}"):
            colreduce_varlen(q, k[:-1], cu_q, cu_k)
    with pytest.raises(ValueError, match=r"lse must be \(Hq, total_q\)"):
        colreduce_varlen(q, k, cu_q, cu_k, lse=torch.zeros(q.shape[0], 4))
