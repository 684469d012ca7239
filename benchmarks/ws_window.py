"""The window column pass warp-specialised in Gluon (benchmarks/gluon_ws_window_pass.py) against the product's
(_window_column_kernel, persistent where it applies), lse given (issue 19's goal: window 64, GQA 32/8, N = 128k,
lse given ≤ 0.12 ms; a read of K takes 0.079 on the H200).

1. Check: every config of gluon_ws_window_pass.CONFIGS against float64 (outputs pre-filled with NaN): dense causal and
   not, sum/mean, group sum/mean, fp16/bf16, D 128/64, G 4/8, windows of 64, 50, 32, 128 rows, ragged N, varlen with
   a short, an empty-query and a long sequence; relative error ≤ 2e-5 (the product's own check's limit is 1e-5
   against float64 of fp16 inputs: the p sums in float32).
2. Time (benchmarks/kernels.py time3: L2 flushed, medians): each config against the product at the same inputs,
   alternated 3×, and a read of K.

    python benchmarks/ws_window.py --out DIR     # GPU (sm_90): DIR/ws_window.json
    WS_WINDOW_CONFIGS=2cta_tf,1cta_tf python benchmarks/ws_window.py --out DIR    # only these configs
    WS_WINDOW_MODULE=window_fold python benchmarks/ws_window.py --out DIR  # the Triton transposed pass instead
    WS_WINDOW_ARMS=gluon_ws_window_pass:2cta_tf,window_fold:tf_s2 python benchmarks/ws_window.py --out DIR  # both
    (WS_WINDOW_CASES=n / WS_WINDOW_SHAPES=n: only the first n check cases, no varlen / the first n timed shapes)
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tma_ab import _setup  # noqa: E402

LOG2E = 1.4426950408889634


def _dense_lse(q, k, scale, causal):
    """(B, Hq, M) natural lse in float64."""
    G = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * scale
    if causal:
        M, N = q.shape[2], k.shape[2]
        vis = torch.arange(N, device=q.device)[None, :] <= torch.arange(M, device=q.device)[:, None] + (N - M)
        s = s.masked_fill(~vis, float("-inf"))
    return torch.logsumexp(s, -1)


def check_dense_case(case, config, record, run):
    """One dense float64 check: random q and k (k scaled by 1.5) of case (B, Hq, Hkv, M, N, D, dtype, causal,
    reduction, group_reduce), run(q, k, lse, scale, causal, reduction, group_reduce) → the (B, Hkv, N) column values
    from the float64 natural lse, recorded and asserted within 2e-5 of colreduce_torch in float64, without NaN.
    Returns the relative error."""
    from colreduce_kvprune.reference import colreduce_torch
    B, Hq, Hkv, M, N, D, dt, causal, red, gr = case
    q = torch.randn(B, Hq, M, D, device="cuda", dtype=dt)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=dt) * 1.5
    scale = 1 / math.sqrt(D)
    got = run(q, k, _dense_lse(q, k, scale, causal), scale, causal, red, gr)
    ref = colreduce_torch(q.double(), k.double(), red, is_causal=causal, scale=scale, group_reduce=gr)
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    record(dict(check="dense", config=config, shape=[B, Hq, Hkv, M, N, D], dtype=str(dt), causal=causal,
                reduction=red, group_reduce=gr, rel_err=err, nan=bool(got.isnan().any())))
    assert not got.isnan().any() and err <= 2e-5, (config, B, Hq, Hkv, M, N, D, dt, causal, red, gr, err)
    return err


def gluon_dense(ww, q, k, lse, reduction, group_reduce, causal, config, sms):
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    out = torch.full((B, Hkv, N), float("nan"), device=q.device)
    ok = ww.launch(q, k, lse, lse.stride(), 0, out, (Hkv * N, N, 1), None, None, M, N, B, LOG2E / math.sqrt(D),
                   varlen=False, is_causal=causal, lse_natural=True, mean=reduction == "mean",
                   group_mean=group_reduce == "mean", sms=sms, config=config)
    assert ok
    return out


def gluon_varlen(ww, q, k, lse, cu_q, cu_k, max_m, max_n, reduction, group_reduce, causal, config, sms):
    Hkv, D = k.shape[1], k.shape[2]
    out = torch.full((k.shape[0], Hkv), float("nan"), device=q.device)
    ok = ww.launch(q, k, lse, (0, lse.stride(0), lse.stride(1)), 1, out, (0, 1, Hkv), cu_q, cu_k, max_m, max_n,
                   cu_q.shape[0] - 1, LOG2E / math.sqrt(D), varlen=True, is_causal=causal, lse_natural=True,
                   mean=reduction == "mean", group_mean=group_reduce == "mean", sms=sms, config=config)
    assert ok
    return out


def check(ww, sms, record, configs=None, strict=True):
    """The configs' float64 check; returns those that passed (strict: the first failure raises)."""
    passed = []
    for config in configs or ww.CONFIGS:
        try:
            _check_config(ww, sms, record, config)
            passed.append(config)
        except Exception as e:   # noqa: BLE001 - a wrong result or a compile error: recorded, the others go on
            if strict:
                raise
            record(dict(check="FAILED", config=config, error=str(e)))
            print(f"check FAILED for {config}: {e}")
    return passed


def _check_config(ww, sms, record, config):
    from colreduce_kvprune.reference import colreduce_torch
    torch.manual_seed(0)
    worst = 0.0
    dense = [  # B, Hq, Hkv, M, N, D, dtype, causal, reduction, group_reduce
        (1, 32, 8, 64, 5000, 128, torch.float16, True, "sum", "mean"),
        (2, 8, 2, 50, 3001, 128, torch.float16, True, "mean", "sum"),
        (1, 16, 2, 32, 777, 64, torch.bfloat16, True, "sum", "mean"),
        (1, 8, 1, 32, 4100, 128, torch.bfloat16, False, "mean", "mean"),
        (1, 4, 2, 128, 2000, 128, torch.float16, True, "sum", "sum"),
        (1, 4, 4, 64, 40, 128, torch.float16, True, "sum", "mean"),
    ]
    quick = int(os.environ.get("WS_WINDOW_CASES", "0"))       # only the first n dense cases, no varlen (compiles)
    for case in dense[:quick or None]:
        worst = max(worst, check_dense_case(case, config, record, lambda q, k, lse, scale, causal, red, gr: gluon_dense(
            ww, q, k, lse.float(), red, gr, causal, config, sms)))
    if quick:
        print(f"check passed for {config} (first {quick} dense cases): worst relative error {worst:.2e}")
        return
    # varlen: a short sequence, one without queries, a long one
    Hq, Hkv, D, dt = 32, 8, 128, torch.float16
    qlens, klens = [20, 0, 64], [100, 300, 3000]
    cu_q = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(klens).cumsum(0)), device="cuda", dtype=torch.int32)
    q = torch.randn(sum(qlens), Hq, D, device="cuda", dtype=dt)
    k = torch.randn(sum(klens), Hkv, D, device="cuda", dtype=dt)
    lse = torch.full((Hq, sum(qlens)), float("-inf"), device="cuda")
    refs = []
    for b in range(3):
        qb = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)[None]
        kb = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None]
        if qlens[b]:
            lse[:, cu_q[b]:cu_q[b + 1]] = _dense_lse(qb, kb, 1 / math.sqrt(D), True)[0].float()
            refs.append(colreduce_torch(qb.double(), kb.double(), "sum", is_causal=True, scale=1 / math.sqrt(D),
                                        group_reduce="mean")[0].t())
        else:
            refs.append(torch.zeros(klens[b], Hkv, device="cuda", dtype=torch.float64))
    got = gluon_varlen(ww, q, k, lse, cu_q, cu_k, max(qlens), max(klens), "sum", "mean", True, config, sms)
    ref = torch.cat(refs)
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    worst = max(worst, err)
    record(dict(check="varlen", config=config, rel_err=err, nan=bool(got.isnan().any())))
    assert not got.isnan().any() and err <= 2e-5, (config, "varlen", err)
    print(f"check passed for {config}: worst relative error {worst:.2e}")


def _arms_wanted():
    """[(module, config)] to check and time: WS_WINDOW_ARMS ("module:config,…", modules of benchmarks/ holding
    launch and CONFIGS as gluon_ws_window_pass.py and window_fold.py do), else every config of WS_WINDOW_CONFIGS (all
    by default) of the module WS_WINDOW_MODULE (gluon_ws_window_pass)."""
    import importlib
    if os.environ.get("WS_WINDOW_ARMS"):
        pairs = [a.split(":") for a in os.environ["WS_WINDOW_ARMS"].split(",")]
    else:
        name = os.environ.get("WS_WINDOW_MODULE", "gluon_ws_window_pass")
        configs = os.environ.get("WS_WINDOW_CONFIGS") or ",".join(importlib.import_module(name).CONFIGS)
        pairs = [(name, c) for c in configs.split(",")]
    return [(importlib.import_module(m), c) for m, c in pairs]


def main(argv=None):
    bk, kmod, flush, record = _setup(__doc__, "ws_window.json", argv)
    from colreduce_kvprune import colreduce
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    wanted = _arms_wanted()
    several = len({mod.__name__ for mod, _ in wanted}) > 1
    passed = [(mod, c) for mod, c in wanted if check(mod, sms, record, [c], strict=False)]
    shapes = ((131072, 64, 32, 8, torch.float16), (131072, 32, 32, 8, torch.float16),
              (32768, 64, 32, 8, torch.float16), (8192, 64, 32, 8, torch.float16),
              (131072, 64, 32, 8, torch.bfloat16), (32768, 32, 32, 4, torch.bfloat16))
    for N, W, Hq, Hkv, dt in shapes[:int(os.environ.get("WS_WINDOW_SHAPES", "0")) or None]:
        q = torch.randn(1, Hq, W, 128, device="cuda", dtype=dt)
        k = torch.randn(1, Hkv, N, 128, device="cuda", dtype=dt)
        lse = torch.randn(1, Hq, W, device="cuda") + math.log(N)
        shape = f"win{W} {Hq}/{Hkv} N={N} {str(dt)[6:]}"
        arms = {"product": lambda: colreduce(q, k, "sum", is_causal=True, group_reduce="mean", lse=lse)}
        for mod, config in passed:
            name = f"{mod.__name__}:{config}" if several else config
            arms[name] = (lambda m, c: lambda: gluon_dense(m, q, k, lse, "sum", "mean", True, c, sms))(mod, config)
        outs = {name: fn() for name, fn in arms.items()}
        for name, o in outs.items():
            record(dict(shape=shape, arm=name, rel_diff_vs_product=((o - outs["product"]).norm()
                                                                    / outs["product"].norm()).item()))
        for rep in range(3):
            for name, fn in arms.items():
                t = bk.time3(fn, flush)
                record(dict(shape=shape, arm=name, rep=rep, gpu_ms=t["gpu_ms"], host_us=t["host_us"]))
        t = bk.time3(lambda: k.sum(dtype=torch.float32), flush)
        record(dict(shape=shape, arm="read of K (sum)", gpu_ms=t["gpu_ms"]))


if __name__ == "__main__":
    main()
