"""Experiment (issue 19, item 2: full causal 16k ≤ 1.0× SDPA): the long column pass with the next query block's
q·kᵀ issued before the current block's exp2, against a replica of the product's loop.

The product's `_long_column_kernel` takes ~2.2 ms at full causal 32/8, N = 16k on the H200 (the lse given), against
a floor of ~1.7 ms per pass; each query block's exp2 waits for its dot. LOOKAHEAD carries the dot's result to the
next iteration, so an asynchronous wgmma can run under the previous block's exp2 (the row pass's version of this is
in benchmarks/row_pass.py). POLY: half of the exp2 in software on the FMA pipe (row_pass.py's _poly_exp2, every
second column), as the row pass's POLY 2 (its _split_exp2_sum). F16EXP: every exp2 at half precision, two per MUFU
instruction (row_pass.py's POLY 3, _exp2_f16): x = s·scale − lse ≤ 0, so no term overflows; about 1e-3 relative.

Scope: dense (B, H, M, D) inputs, causal (bottom-right), reduction "sum" with the group mean, the lse given (log2
units, +inf for a row that sees no key), D a power of two, HS programs per kv head and key tile each over G / HS of
the group's heads (the product's head split), their partial sums added on the host. Not in the product.

    python benchmarks/column_pass.py --check     # CPU: TRITON_INTERPRET=1, small shapes vs float64, both loops
    python benchmarks/column_pass.py --out DIR   # GPU: both loops at full causal 32/8 16k, 8k and 4k fp16, at the
                                                 # product's column tiles, against its column pass (lse given)
"""
from __future__ import annotations

import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune_path import _bench_kernels  # noqa: E402 (benchmarks/kernels.py loaded once, as prune_path loads it)
from row_pass import LOG2E, _reference_lse2, _split_exp2_sum  # noqa: E402


@triton.jit
def _scores(kt, Q_head, ms, sqm, M, d, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """q·kᵀ (raw units) of the query rows [ms, ms + BLOCK_M) with the key tile kt (D, BLOCK_N)."""
    m = ms + tl.arange(0, BLOCK_M)
    q = tl.load(Q_head + m[:, None] * sqm + d[None, :], mask=m[:, None] < M, other=0.0)
    return tl.dot(q, kt, input_precision=PRECISION)


@triton.jit
def _add(acc, s, LSE_head, ms, n, shift, M, qk_scale, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
         POLY: tl.constexpr = 0, BLOCK_N: tl.constexpr = 16):
    """acc + exp2(s·scale − lse) of the query rows [ms, ms + BLOCK_M) (absent rows: lse +inf, so 0). POLY as
    row_pass._split_exp2_sum's: 2, acc is (BLOCK_M, BLOCK_N // 2, 2), the column pairs, the second of each pair's
    exp2 in software; 3, every exp2 at half precision."""
    m = ms + tl.arange(0, BLOCK_M)
    lse2 = tl.load(LSE_head + m, mask=m < M, other=float("inf"))
    x = s * qk_scale - lse2[:, None]
    if POLY != 0:                                        # (no early return: Triton compiles none in a branch)
        if MASKED:
            x = tl.where(n[None, :] <= m[:, None] + shift, x, float("-inf"))
        acc = _split_exp2_sum(acc, x, POLY, BLOCK_M, BLOCK_N)
    else:
        p = tl.exp2(x)
        if MASKED:
            p = tl.where(n[None, :] <= m[:, None] + shift, p, 0.0)
        acc = acc + p
    return acc


@triton.jit
def _column_kernel(Q, K, LSE2, Out, sqb, sqh, sqm, skb, skh, skn, slb, slh, sob, soh, M, N, qk_scale,
                   G: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, LOOKAHEAD: tl.constexpr, PRECISION: tl.constexpr, POLY: tl.constexpr):
    t = tl.program_id(0)
    hk = tl.program_id(1) // HS
    hs = tl.program_id(1) % HS
    b = tl.program_id(2)
    n0 = t * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    kt = tl.load(K + b * skb + hk * skh + n[None, :] * skn + d[:, None], mask=n[None, :] < N, other=0.0)
    shift = N - M                                         # query m sees key j iff j <= m + shift
    m_lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
    n_last = tl.minimum(n0 + BLOCK_N, N) - 1
    m_full = m_lo + tl.cdiv(tl.maximum(n_last - shift - m_lo, 0), BLOCK_M) * BLOCK_M   # blocks that see it whole
    if POLY == 1 or POLY == 2:
        acc = tl.zeros([BLOCK_M, BLOCK_N // 2, 2], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for gg in range(G // HS):
        h = hk * G + hs * (G // HS) + gg
        Q_head = Q + b * sqb + h * sqh
        LSE_head = LSE2 + b * slb + h * slh
        for ms in range(m_lo, m_full, BLOCK_M):          # the diagonal: causal mask
            s = _scores(kt, Q_head, ms, sqm, M, d, PRECISION, BLOCK_M)
            acc = _add(acc, s, LSE_head, ms, n, shift, M, qk_scale, True, BLOCK_M, POLY, BLOCK_N)
        if LOOKAHEAD:
            if m_full < M:
                s = _scores(kt, Q_head, m_full, sqm, M, d, PRECISION, BLOCK_M)
                for ms in range(m_full + BLOCK_M, M, BLOCK_M):
                    s_next = _scores(kt, Q_head, ms, sqm, M, d, PRECISION, BLOCK_M)
                    acc = _add(acc, s, LSE_head, ms - BLOCK_M, n, shift, M, qk_scale, False, BLOCK_M, POLY, BLOCK_N)
                    s = s_next
                acc = _add(acc, s, LSE_head, m_full + (M - 1 - m_full) // BLOCK_M * BLOCK_M, n, shift, M, qk_scale,
                           False, BLOCK_M, POLY, BLOCK_N)
        else:
            for ms in range(m_full, M, BLOCK_M):
                s = _scores(kt, Q_head, ms, sqm, M, d, PRECISION, BLOCK_M)
                acc = _add(acc, s, LSE_head, ms, n, shift, M, qk_scale, False, BLOCK_M, POLY, BLOCK_N)
    tl.store(Out + b * sob + (hk * HS + hs) * soh + n, tl.reshape(tl.sum(acc, 0), [BLOCK_N]) / G, mask=n < N)


VARIANTS = {"replica": (False, 0), "lookahead": (True, 0), "poly_half": (False, 2), "f16exp": (False, 3),
            "lookahead+f16exp": (True, 3)}   # → LOOKAHEAD, POLY


def column_mean(q, k, lse2, variant="replica", hs=1, block_m=64, block_n=128, warps=4, stages=2, scale=None):
    """(B, Hkv, N) float32: the group mean of Σ over queries of softmax(q·kᵀ) (causal, bottom-right). q (B, Hq, M, D),
    k (B, Hkv, N, D), lse2 (B, Hq, M) in log2 units (+inf for a row that sees no key)."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    assert D == triton.next_power_of_2(D) and G % hs == 0, "outside the experiment's scope"
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    part = torch.full((B, Hkv * hs, N), float("nan"), dtype=torch.float32, device=q.device)
    _column_kernel[(triton.cdiv(N, block_n), Hkv * hs, B)](
        q, k, lse2, part, *q.stride()[:3], *k.stride()[:3], *lse2.stride()[:2], *part.stride()[:2], M, N,
        scale * LOG2E, G=G, HS=hs, D=D, BLOCK_M=block_m, BLOCK_N=block_n, LOOKAHEAD=VARIANTS[variant][0],
        POLY=VARIANTS[variant][1], PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps,
        num_stages=stages)
    return part.view(B, Hkv, hs, N).sum(2)


def check(device="cpu"):
    """Both loops on small shapes against float64, the partial outputs pre-filled with NaN: on the CPU under
    TRITON_INTERPRET=1, or on a GPU (tests/test_experiments.py runs it). Shapes: a window shorter than its keys,
    M = N with ragged ends, more queries than keys, head splits of 1 and 2, one and several unmasked blocks."""
    from colreduce_kvprune.reference import colreduce_torch
    torch.manual_seed(0)
    worst = {False: 0.0, True: 0.0}
    for B, Hq, Hkv, M, N, D, hs, block_m, block_n in [(1, 4, 2, 20, 100, 16, 1, 16, 32), (2, 4, 1, 70, 70, 32, 2, 16, 16),
                                                      (1, 2, 2, 40, 24, 16, 1, 16, 16), (1, 4, 2, 64, 64, 16, 2, 16, 32)]:
        q = torch.randn(B, Hq, M, D, device=device)
        k = torch.randn(B, Hkv, N, D, device=device)
        lse2 = _reference_lse2(q, k, 1 / math.sqrt(D)).float()
        ref = colreduce_torch(q.double(), k.double(), "sum", is_causal=True, group_reduce="mean")
        for variant in VARIANTS:
            got = column_mean(q, k, lse2, variant, hs, block_m, block_n, warps=4, stages=1)
            assert not got.isnan().any(), (variant, "a column was not written")
            err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
            half = VARIANTS[variant][1] == 3             # f16 exp2: about 1e-3 per term
            worst[half] = max(worst[half], err)
            assert err < (2e-3 if half else 1e-5), (variant, B, Hq, Hkv, M, N, D, hs, err)
    print(f"column pass variants match float64 (largest relative error {worst[False]:.1e}; f16 exp2: "
          f"{worst[True]:.1e})")


def gpu(out_dir):
    """Both loops at full causal 32/8 (fp16, D 128) 16k, 8k and 4k, at the product's column tiles and head split
    (_fit_config on this GPU) and at a head split of 1, against the product's column pass with the lse given, all
    timed in one run. column_pass.json in out_dir, rewritten after each row."""
    bk = _bench_kernels()
    from colreduce_kvprune.kernels import colreduce as kmod
    flush = bk._flush_buffer()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    record = bk.experiment_rows(out_dir, "column_pass.json", flush)
    for N in (16384, 8192, 4096):
        B, Hq, Hkv, D = 1, 32, 8, 128
        torch.manual_seed(0)
        q = torch.randn(B, Hq, N, D, device="cuda", dtype=torch.float16)
        k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.float16)
        lse = bk.row_lse(q, k, 1 / math.sqrt(D), True)
        lse2 = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse * LOG2E).float().contiguous()
        shape = f"full {Hq}/{Hkv} N={N} fp16"
        kw = dict(is_causal=True, scale=1 / math.sqrt(D), group_reduce="mean", lse=lse)
        product = kmod.colreduce_triton(q, k, "sum", **kw)
        record(dict(shape=shape, name="product column pass (lse given)"),
               lambda: kmod.colreduce_triton(q, k, "sum", **kw))
        cfg = kmod._fit_config(kmod._pick_config(N, D, Hq // Hkv, True), N, N, Hq // Hkv, B * Hkv, sms, D)
        tiles = (cfg["HEAD_SPLIT"], cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["warps"], cfg["stages"])
        for t in (tiles, (1,) + tiles[1:]):
            for variant in VARIANTS:
                record(dict(shape=shape, name=variant, hs_tiles=t), lambda: column_mean(q, k, lse2, variant, *t),
                       lambda got: {"rel_diff_vs_product": ((got - product).norm() / product.norm()).item()})
        del q, k, lse, lse2, product
        torch.cuda.empty_cache()


def main(argv=None):
    _bench_kernels().experiment_main(__doc__, check, gpu, argv)


if __name__ == "__main__":
    main()
