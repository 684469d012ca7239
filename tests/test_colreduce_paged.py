"""colreduce_paged: keys read through a block table from caches with shuffled blocks, in vLLM's two layouts,
against the dense varlen path on the same keys. Unused cache slots hold NaN, so a stray read fails."""
import pytest
import torch

from colreduce_kvprune import colreduce_paged, colreduce_varlen
from test_colreduce import DEVICE, TOL, _poison_empty, rel_err

BLOCK = 16


def paged_case(q_lens, k_lens, Hq, Hkv, D, layout, dtype=torch.float32, seed=0, block=BLOCK):
    """Packed q, dense packed k, and the same keys scattered over a shuffled paged cache of block-key blocks."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(sum(k_lens), Hkv, D, generator=g).to(DEVICE, dtype)
    blocks_per_seq = [-(-n // block) for n in k_lens]
    max_blocks = max(blocks_per_seq)
    num_blocks = sum(blocks_per_seq) + 3                       # spare blocks, never referenced
    perm = torch.randperm(num_blocks, generator=g)
    shape = (num_blocks, block, Hkv, D) if layout == "NHD" else (num_blocks, Hkv, block, D)
    cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    view = cache if layout == "NHD" else cache.transpose(1, 2)  # (num_blocks, block, Hkv, D) either way
    table = torch.full((len(k_lens), max_blocks + 1), 10**6, dtype=torch.int32)   # padding ids are never read
    used, start = 0, 0
    for b, n in enumerate(k_lens):
        for j in range(blocks_per_seq[b]):
            blk = int(perm[used])
            used += 1
            table[b, j] = blk
            rows = k[start + j * block: start + min(n, (j + 1) * block)]
            view[blk, :rows.shape[0]] = rows
        start += n
    cu = lambda lens: torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)  # noqa: E731
    return q, k, view, table.to(DEVICE), cu(q_lens), cu(k_lens), torch.tensor(k_lens, dtype=torch.int32,
                                                                                 device=DEVICE)


def unpack(dense, k_lens, max_n):
    """(total_k, H) → (B, H, max_n), zero-padded."""
    out = torch.zeros(len(k_lens), dense.shape[1], max_n, dtype=dense.dtype, device=dense.device)
    start = 0
    for b, n in enumerate(k_lens):
        out[b, :, :n] = dense[start:start + n].T
        start += n
    return out


@pytest.mark.parametrize("layout", ["NHD", "HND"], ids=["flash-layout", "cpu-layout"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("group_reduce", [None, "mean"])
def test_paged_matches_dense(layout, backend, group_reduce, monkeypatch):
    _poison_empty(monkeypatch)                      # the padding past each sequence's keys must be written
    q_lens, k_lens = [8, 5, 12, 0], [70, 33, 12, 20]          # last chunks shorter than keys; an empty window
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 2, 32, layout)
    for reduction in ("sum", "mean", "max"):
        dense = colreduce_varlen(q, k, cu_q, cu_k, reduction, is_causal=True, group_reduce=group_reduce,
                                 backend="torch").double()
        out = colreduce_paged(q, cache, table, cu_q, seqlens, reduction, is_causal=True,
                              group_reduce=group_reduce, backend=backend)
        assert out.shape == (4, 4 if group_reduce is None else 2, 70)
        assert rel_err(out, unpack(dense, k_lens, 70)) < TOL[torch.float32], reduction


@pytest.mark.parametrize("block", [16, 24, 256])
def test_paged_block_sizes(block, monkeypatch):
    """Each way the kernels find a key tile's rows in the cache (_key_rows): blocks that divide the key tile (16
    keys; tiles of 32 under the interpreter, 64–128 on a GPU), blocks the tile divides (256) and neither (24), in
    both passes and with the lse given, windows and a whole prompt, against float64 on the same keys."""
    _poison_empty(monkeypatch)
    q_lens, k_lens = [8, 130, 1, 0], [600, 130, 97, 40]         # windows, a whole prompt, an empty window
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case(q_lens, k_lens, 4, 2, 32, "NHD", seed=11, block=block)
    lse = torch.randn(4, q.shape[0], device=DEVICE)
    for group_reduce, given in ((None, None), ("mean", None), ("mean", lse)):
        ref = colreduce_varlen(q.double(), k.double(), cu_q, cu_k, "sum", is_causal=True, group_reduce=group_reduce,
                               lse=None if given is None else given.double(), backend="torch")
        out = colreduce_paged(q, cache, table, cu_q, seqlens, "sum", is_causal=True, group_reduce=group_reduce,
                              lse=given, backend="triton")
        assert rel_err(out, unpack(ref, k_lens, 600)) < TOL[torch.float32], (group_reduce, given is not None)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_paged_half_and_lse(backend):
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case([16, 4], [50, 90], 8, 2, 64, "NHD", torch.float16, seed=1)
    dense = colreduce_varlen(q, k, cu_q, cu_k, "sum", is_causal=True, backend="torch")
    out = colreduce_paged(q, cache, table, cu_q, seqlens, "sum", is_causal=True, backend=backend)
    assert rel_err(out, unpack(dense.double(), [50, 90], 90)) < TOL[torch.float16]
    lse = torch.ones(8, q.shape[0], device=DEVICE)            # any lse: both paths must normalise with it
    a = colreduce_varlen(q, k, cu_q, cu_k, "sum", is_causal=True, lse=lse, backend="torch")
    b = colreduce_paged(q, cache, table, cu_q, seqlens, "sum", is_causal=True, lse=lse, backend=backend)
    assert rel_err(b, unpack(a.double(), [50, 90], 90)) < TOL[torch.float16]


def test_paged_errors():
    q, k, cache, table, cu_q, cu_k, seqlens = paged_case([4], [20], 4, 2, 32, "NHD")
    with pytest.raises(ValueError, match="key_cache"):
        colreduce_paged(q, k, table, cu_q, seqlens)
    with pytest.raises(ValueError, match="block_table must be a 2-D tensor"):
        colreduce_paged(q, cache, table[0], cu_q, seqlens)
    with pytest.raises(TypeError, match="seqlens_k must be int32 or int64"):
        colreduce_paged(q, cache, table, cu_q, seqlens.float())
    if not q.is_cuda:
        with pytest.raises(ValueError, match="exceeds what block_table addresses"):
            colreduce_paged(q, cache, table[:, :1], cu_q, seqlens + 10)
    # the kernels read the table's entries up to max_seqlen_k: one past its blocks is refused on any device
    with pytest.raises(ValueError, match=r"max_seqlen_k \(49\) exceeds what block_table addresses \(3 blocks of 16"):
        colreduce_paged(q, cache, table, cu_q, seqlens, max_seqlen_k=49)
    assert colreduce_paged(q, cache, table, cu_q, seqlens, max_seqlen_k=48).shape == (1, 4, 48)
