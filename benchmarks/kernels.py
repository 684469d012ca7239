"""GPU benchmark of colreduce against the baselines, all timed in the same run.

For each workload: ours (two passes, and one pass with ``lse=``), flash-colreduce 0.2.2 (K repeated for GQA, as it
needs), naive torch (matmul + softmax + reduce; skipped where the matrix would pass 4 GiB), SDPA forward on the same
shapes (v = k), and a read of K. Median of ``do_bench`` with the 20th/80th percentiles, and the peak extra memory of
each call beyond its inputs. Writes a markdown table and JSON; ``--plot`` draws the chart from the JSON (on any
machine with matplotlib).

    python benchmarks/kernels.py --out out/            # on the GPU
    python benchmarks/kernels.py --plot out/kernels.json --png docs/kernels.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import torch

WORKLOADS = {
    # name: (B, Hq, Hkv, M, N, D, causal)
    "window GQA 32/8 W=64 N=128k": (1, 32, 8, 64, 131072, 128, True),
    "window MHA 32 W=64 N=128k": (1, 32, 32, 64, 131072, 128, True),
    "full causal 16k H=32": (1, 32, 32, 16384, 16384, 128, True),
    "batch 16x1024 causal H=32": (16, 32, 32, 1024, 1024, 128, True),
    "non-causal 16k H=16 D=64": (1, 16, 16, 16384, 16384, 64, False),
}
VARLEN_LENGTHS = [1024, 16384, 3072, 8192, 2048, 12288, 4096, 1536, 6144, 16384, 2560, 10240, 1024, 5120, 7168, 14336]


def bench(fn, warmup=25, rep=100):
    """(median, p20, p80) in ms and the peak memory allocated beyond what was live before the call (MiB)."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return dict(ms=med, p20=p20, p80=p80, extra_mib=extra)


def row_lse(q, k, scale, causal):
    """Natural-log row log-sum-exp (what flash-attention returns), chunked."""
    B, Hq, M, D = q.shape
    G = Hq // k.shape[1]
    N = k.shape[2]
    out = torch.empty(B, Hq, M, device=q.device, dtype=torch.float32)
    step = max(1, (1 << 28) // (B * Hq * N))
    for m0 in range(0, M, step):
        m1 = min(M, m0 + step)
        s = (q[:, :, m0:m1].float() @ k.float().repeat_interleave(G, 1).transpose(-1, -2)) * scale
        if causal:
            i = torch.arange(m0, m1, device=q.device)[:, None]
            s.masked_fill_(torch.arange(N, device=q.device)[None, :] > i + (N - M), float("-inf"))
        out[:, :, m0:m1] = s.logsumexp(-1)
    return out


def naive(q, k, causal):
    G = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(G, 1) if G > 1 else k
    s = (q @ kk.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        M, N = q.shape[2], k.shape[2]
        mask = torch.ones(M, N, dtype=torch.bool, device=q.device).tril(N - M)
        s = s.masked_fill(~mask, float("-inf"))
    return s.float().softmax(-1).sum(2)


def run_workload(name, B, Hq, Hkv, M, N, D, causal, dtype):
    from colreduce_kvprune import colreduce
    torch.manual_seed(0)
    q = torch.randn(B, Hq, M, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype)
    scale = 1 / math.sqrt(D)
    G = Hq // Hkv
    row = {"workload": name, "shape": [B, Hq, Hkv, M, N, D, causal]}
    row["ours"] = bench(lambda: colreduce(q, k, "sum", is_causal=causal))
    lse = row_lse(q, k, scale, causal)
    row["ours_lse"] = bench(lambda: colreduce(q, k, "sum", is_causal=causal, lse=lse))
    row["ours_group_mean"] = bench(lambda: colreduce(q, k, "sum", is_causal=causal, group_reduce="mean"))
    try:
        from flash_colreduce import flash_colreduce
        if G > 1:
            row["flash_colreduce"] = bench(
                lambda: flash_colreduce(q, k.repeat_interleave(G, 1), "sum", is_causal=causal))
        else:
            row["flash_colreduce"] = bench(lambda: flash_colreduce(q, k, "sum", is_causal=causal))
    except ImportError:
        row["flash_colreduce"] = None
    if B * Hq * M * N * 4 <= 4 * 2**30:
        row["naive_torch"] = bench(lambda: naive(q, k, causal))
    else:
        row["naive_torch"] = None
    v = k
    if G > 1:
        row["sdpa"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal and M == N, enable_gqa=True))
    else:
        row["sdpa"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal and M == N))
    row["read_k"] = bench(lambda: k.sum(dtype=torch.float32))
    return row


def warm_up_clocks(seconds=2.0):
    """Keep the GPU busy for a while first, so the first workload is not timed at idle clocks."""
    import time
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(50):
            a @ a
        torch.cuda.synchronize()


def run_varlen(dtype, window=64, Hq=32, Hkv=8, D=128):
    """16 prompts of mixed lengths 1k–16k packed, a 64-query window each, vs the sum of the dense windows."""
    from colreduce_kvprune import colreduce, colreduce_varlen
    torch.manual_seed(0)
    ks = [torch.randn(n, Hkv, D, device="cuda", dtype=dtype) for n in VARLEN_LENGTHS]
    qs = [torch.randn(window, Hq, D, device="cuda", dtype=dtype) for _ in VARLEN_LENGTHS]
    k, q = torch.cat(ks), torch.cat(qs)
    cu_k = torch.tensor([0] + VARLEN_LENGTHS, device="cuda").cumsum(0).to(torch.int32)
    cu_q = torch.arange(0, window * (len(VARLEN_LENGTHS) + 1), window, device="cuda", dtype=torch.int32)
    kw = dict(max_seqlen_q=window, max_seqlen_k=max(VARLEN_LENGTHS), is_causal=True, group_reduce="mean")
    row = {"workload": f"varlen 16 prompts 1k-16k W={window} GQA {Hq}/{Hkv}", "shape": VARLEN_LENGTHS}
    row["ours"] = bench(lambda: colreduce_varlen(q, k, cu_q, cu_k, "sum", **kw))
    dense = [(qq.transpose(0, 1)[None], kk.transpose(0, 1).contiguous()[None]) for qq, kk in zip(qs, ks)]
    row["dense_sum"] = bench(lambda: [colreduce(a, b, "sum", is_causal=True, group_reduce="mean") for a, b in dense])
    row["read_k"] = bench(lambda: k.sum(dtype=torch.float32))
    return row


# column pass: WINDOW (True: _window_column_kernel, False: _long_column_kernel), BLOCK_M, BLOCK_N, warps, stages
COLUMN_CONFIGS = [(True, 32, 128, 4, 2), (True, 32, 128, 4, 3), (True, 64, 128, 4, 2), (True, 64, 128, 4, 3),
                  (True, 16, 128, 4, 3), (True, 32, 256, 8, 2), (True, 64, 64, 4, 3),
                  (False, 64, 128, 4, 2), (False, 64, 128, 4, 3), (False, 64, 64, 4, 3), (False, 128, 64, 8, 2)]
ROW_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 4, 3),
               (64, 128, 8, 3)]                                              # BLOCK_R, BLOCK_N1, warps1, stages1
SWEEP_WORKLOADS = ["window GQA 32/8 W=64 N=128k", "full causal 16k H=32", "batch 16x1024 causal H=32",
                   "non-causal 16k H=16 D=64"]


def sweep(dtype):
    """Time each column-pass config (lse given: the column pass alone), then each row-pass config with the best
    column config; check every config's output against the default's. Returns rows of (workload, config, ms)."""
    from colreduce_kvprune.kernels.colreduce import _pick_config, colreduce_triton
    rows = []
    for name in SWEEP_WORKLOADS:
        B, Hq, Hkv, M, N, D, causal = WORKLOADS[name]
        torch.manual_seed(0)
        q = torch.randn(B, Hq, M, D, device="cuda", dtype=dtype)
        k = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype)
        scale = 1 / math.sqrt(D)
        lse = row_lse(q, k, scale, causal)
        base = _pick_config(M, D, Hq // Hkv, causal)
        ref = colreduce_triton(q, k, "sum", is_causal=causal, scale=scale, group_reduce=None, config=base)

        def call(cfg, with_lse):
            return colreduce_triton(q, k, "sum", is_causal=causal, scale=scale, group_reduce=None,
                                    lse=lse if with_lse else None, config=cfg)
        best = (float("inf"), base)
        for window, bm, bn, w, st in COLUMN_CONFIGS:
            cfg = dict(base, WINDOW=window, BLOCK_M=bm, BLOCK_N=bn, warps=w, stages=st)
            tag = ("window" if window else "long", bm, bn, w, st)
            try:
                err = ((call(cfg, True) - ref).norm() / ref.norm()).item()
                ms = bench(lambda: call(cfg, True), warmup=10, rep=40)["ms"]
            except Exception as e:  # out of resources for this tile
                rows.append((name, "col", tag, None, repr(e)[:80]))
                continue
            rows.append((name, "col", tag, ms, f"err {err:.1e}"))
            best = min(best, (ms, cfg), key=lambda t: t[0])
        for br, bn, w, st in ROW_CONFIGS:
            cfg = dict(best[1], BLOCK_R=br, BLOCK_N1=bn, warps1=w, stages1=st)
            try:
                err = ((call(cfg, False) - ref).norm() / ref.norm()).item()
                ms = bench(lambda: call(cfg, False), warmup=10, rep=40)["ms"]
            except Exception as e:
                rows.append((name, "row", (br, bn, w, st), None, repr(e)[:80]))
                continue
            rows.append((name, "row+col", (br, bn, w, st), ms, f"err {err:.1e}"))
        print("\n".join(f"{r[0]:32s} {r[1]:8s} {r[2]} {r[3] if r[3] is None else round(r[3], 4)} {r[4]}"
                        for r in rows if r[0] == name), flush=True)
        del q, k, lse
        torch.cuda.empty_cache()
    return rows


def run_paged(dtype, window=64, N=131072, Hq=32, Hkv=8, D=128, block=16):
    """The window GQA case with K read through a shuffled block table (vLLM's FlashAttention layout)."""
    from colreduce_kvprune import colreduce, colreduce_paged
    torch.manual_seed(0)
    nblk = N // block
    cache = torch.randn(nblk, block, Hkv, D, device="cuda", dtype=dtype)
    table = torch.randperm(nblk, device="cuda").to(torch.int32)[None]
    q = torch.randn(window, Hq, D, device="cuda", dtype=dtype)
    cu_q = torch.tensor([0, window], device="cuda", dtype=torch.int32)
    seqlens = torch.tensor([N], device="cuda", dtype=torch.int32)
    k_dense = cache[table[0].long()].reshape(N, Hkv, D).transpose(0, 1)[None].contiguous()
    row = {"workload": f"paged window GQA {Hq}/{Hkv} W={window} N=128k block {block}", "shape": [N, block]}
    row["ours"] = bench(lambda: colreduce_paged(q, cache, table, cu_q, seqlens, "sum", max_seqlen_q=window,
                                                max_seqlen_k=N, is_causal=True))
    row["dense"] = bench(lambda: colreduce(q.transpose(0, 1)[None], k_dense, "sum", is_causal=True))
    row["read_k"] = bench(lambda: cache.sum(dtype=torch.float32))
    return row


MATMUL_TFLOPS = 708.0      # fp16 dense matmul measured on the H100 (ARCHITECTURE.md anchors)
COPY_TBS = 2.99            # device copy, bytes read + written
EXP_PER_S = 16 * 132 * 1.755e9   # MUFU ex2: 16 per clock per SM, 132 SMs, 1.755 GHz (assumed clock)


def floors(B, Hq, Hkv, M, N, D, causal, dtype_bytes=2):
    """Per pass: ms at the matmul ceiling (q·kᵀ only), at the exp2 ceiling, and to read K once."""
    seen = torch.full((M,), N) if not causal else (torch.arange(M) + (N - M) + 1).clamp(0, N)  # keys per query
    pairs = B * Hq * int(seen.sum())
    return dict(matmul_ms=2 * pairs * D / (MATMUL_TFLOPS * 1e12) * 1e3, exp_ms=pairs / EXP_PER_S * 1e3,
                read_k_ms=B * Hkv * N * D * dtype_bytes / (COPY_TBS * 1e12) * 1e3)


def compiled_kernels():
    """Registers, spills and shared memory of every compiled variant of the two kernels (Triton's own cache)."""
    from colreduce_kvprune.kernels import colreduce as kmod
    rows = []
    for fn in (kmod._row_stats_kernel, kmod._window_column_kernel, kmod._long_column_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for key, k in kernels.items():
                meta = getattr(k, "metadata", None)
                rows.append(dict(kernel=fn.__name__, n_regs=getattr(k, "n_regs", None),
                                 n_spills=getattr(k, "n_spills", None),
                                 shared=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None),
                                 key=str(key)[:160]))
    return rows


def report(dtype):
    """Each workload's time next to its floors, then the compiled kernels' resources."""
    from colreduce_kvprune import colreduce
    out = []
    for name, (B, Hq, Hkv, M, N, D, causal) in WORKLOADS.items():
        torch.manual_seed(0)
        q = torch.randn(B, Hq, M, D, device="cuda", dtype=dtype)
        k = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype)
        lse = row_lse(q, k, 1 / math.sqrt(D), causal)
        two = bench(lambda: colreduce(q, k, "sum", is_causal=causal))["ms"]
        one = bench(lambda: colreduce(q, k, "sum", is_causal=causal, lse=lse))["ms"]
        f = floors(B, Hq, Hkv, M, N, D, causal)
        out.append(dict(workload=name, two_pass_ms=two, column_pass_ms=one, row_pass_ms=two - one, **f))
        print(f"{name:32s} row {two - one:.3f} col {one:.3f} | per pass floors: matmul {f['matmul_ms']:.3f} "
              f"exp2 {f['exp_ms']:.3f} read K {f['read_k_ms']:.3f} ms", flush=True)
        del q, k, lse
        torch.cuda.empty_cache()
    kernels = compiled_kernels()
    for r in kernels:
        print(f"{r['kernel']:18s} regs {r['n_regs']} spills {r['n_spills']} shared {r['shared']} "
              f"warps {r['num_warps']}", flush=True)
    return dict(workloads=out, kernels=kernels)


def env_info():
    import triton
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version())
    try:
        import flash_colreduce
        info["flash_colreduce"] = flash_colreduce.__version__
    except ImportError:
        info["flash_colreduce"] = "not installed"
    return info


def fmt(cell, base=None):
    if not cell:
        return "—"
    s = f"{cell['ms']:.3f}"
    if base:
        s += f" ({cell['ms'] / base['ms']:.1f}×)"
    return s


def markdown(result):
    info = result["env"]
    lines = [f"GPU: {info['gpu']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"flash-colreduce {info['flash_colreduce']}; {result['dtype']}; median ms (in brackets: its time / ours).",
             "",
             "| workload | ours | ours, lse given | flash-colreduce | naive torch | SDPA fwd | read K | ours extra MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "dense" in r:
            lines.append(f"| {r['workload']} | {fmt(r['ours'])} | — | — | — | dense K, same run: "
                         f"{fmt(r['dense'])} | {fmt(r['read_k'])} | {r['ours']['extra_mib']:.0f} |")
            continue
        if "dense_sum" in r:
            lines.append(f"| {r['workload']} | {fmt(r['ours'])} | — | — | — | dense windows summed: "
                         f"{fmt(r['dense_sum'])} | {fmt(r['read_k'])} | {r['ours']['extra_mib']:.0f} |")
            continue
        ours = r["ours"]
        lines.append(
            f"| {r['workload']} | {fmt(ours)} | {fmt(r['ours_lse'])} | {fmt(r['flash_colreduce'], ours) if r['flash_colreduce'] else '—'}"
            f" | {fmt(r['naive_torch'], ours) if r['naive_torch'] else '—'} | {fmt(r['sdpa'])} | {fmt(r['read_k'])}"
            f" | {ours['extra_mib']:.0f} |")
    return "\n".join(lines)


def plot(json_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    result = json.load(open(json_path))
    rows = [r for r in result["rows"] if "sdpa" in r]
    series = [("ours", "ours"), ("ours_lse", "ours, lse given"), ("flash_colreduce", "flash-colreduce 0.2.2"),
              ("naive_torch", "naive torch"), ("sdpa", "SDPA forward"), ("read_k", "read of K")]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        xs = [j + i * width for j, r in enumerate(rows) if r.get(key)]
        ys = [r[key]["ms"] for r in rows if r.get(key)]
        ax.bar(xs, ys, width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["workload"] for r in rows], fontsize=8)
    ax.set_title(f"colreduce sum, {result['dtype']}, {result['env']['gpu']}")
    ax.legend(fontsize=8, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="folder for kernels.md and kernels.json")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--only", nargs="*", help="workload names (substrings) to run")
    ap.add_argument("--plot", help="draw the chart from this JSON instead of running")
    ap.add_argument("--png", default="kernels.png")
    ap.add_argument("--sweep", action="store_true", help="time the tile configs of both passes instead")
    ap.add_argument("--report", action="store_true", help="times next to their floors, and kernel resources")
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot, args.png)
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    warm_up_clocks()
    if args.report:
        os.makedirs(args.out, exist_ok=True)
        json.dump(report(dtype), open(os.path.join(args.out, "report.json"), "w"), indent=1)
        return
    if args.sweep:
        os.makedirs(args.out, exist_ok=True)
        json.dump(sweep(dtype), open(os.path.join(args.out, "sweep.json"), "w"))
        return
    rows = []
    for name, shape in WORKLOADS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        rows.append(run_workload(name, *shape, dtype))
        print(f"{name}: ours {rows[-1]['ours']['ms']:.3f} ms", flush=True)
        torch.cuda.empty_cache()
    if not args.only or any("varlen" in s for s in args.only):
        rows.append(run_varlen(dtype))
    if not args.only or any("paged" in s for s in args.only):
        rows.append(run_paged(dtype))
    result = dict(env=env_info(), dtype=args.dtype, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    json.dump(result, open(os.path.join(args.out, "kernels.json"), "w"), indent=1)
    table = markdown(result)
    open(os.path.join(args.out, "kernels.md"), "w").write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
