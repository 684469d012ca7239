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


def visible_pairs(M, N, causal=True):
    """(query, key) pairs one head sees: M·N, or under the bottom-right causal mask Σ_m clamp(m + N − M + 1, 0, N)."""
    if not causal:
        return M * N
    return int((torch.arange(M) + (N - M) + 1).clamp(0, N).sum())


def floors(B, Hq, Hkv, M, N, D, causal, dtype_bytes=2):
    """Per pass: ms at the matmul ceiling (q·kᵀ only), at the exp2 ceiling, and to read K once."""
    pairs = B * Hq * visible_pairs(M, N, causal)
    return dict(matmul_ms=2 * pairs * D / (MATMUL_TFLOPS * 1e12) * 1e3, exp_ms=pairs / EXP_PER_S * 1e3,
                read_k_ms=B * Hkv * N * D * dtype_bytes / (COPY_TBS * 1e12) * 1e3)


def compiled_kernels():
    """Registers, spills and shared memory of every compiled variant of the two kernels (Triton's own cache)."""
    from colreduce_kvprune.kernels import colreduce as kmod
    rows = []
    for fn in (kmod._row_stats_kernel, kmod._window_column_kernel, kmod._long_column_kernel,
               kmod._saved_column_kernel, kmod._fused_window_kernel):
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


def experiment_main(doc, check, gpu, argv=None):
    """The command line of a kernel experiment in benchmarks/ (window_persistent.py, row_pass.py, column_pass.py):
    --check runs its check against float64 (on the CPU under TRITON_INTERPRET=1), otherwise its GPU timing writes
    into --out (through experiment_rows)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default="out")
    a = ap.parse_args(argv)
    if a.check:
        check()
    else:
        gpu(a.out)


def experiment_rows(out_dir, name, flush):
    """record(row, fn=None, diff=None): times fn on the GPU into row (gpu_ms; diff(fn()) adds how far its result is
    from a reference; a compile failure or out-of-resources error is recorded as the row's error, not raised),
    prints the row and rewrites out_dir/name (the GPU's versions and every row so far), so a run cut by its time
    limit keeps what it timed."""
    rows = []
    os.makedirs(out_dir, exist_ok=True)

    def record(row, fn=None, diff=None):
        if fn is not None:
            try:
                got = fn()
                if diff is not None:
                    row.update(diff(got))
                row["gpu_ms"] = time3(fn, flush)["gpu_ms"]
            except Exception as e:  # noqa: BLE001 (compile failure or out of resources: reported)
                row["error"] = repr(e)[:200]
                torch.cuda.synchronize()
        rows.append(row)
        print(row, flush=True)
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(dict(env=env_info(), rows=rows), f, indent=1)
    return record


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


# ---------------------------------------------------------------------------------------------------------------
# Serving-shape sweep (issue 19): the shapes a server's prefill scores, every method timed three ways.

# name → dict(B, Hq, Hkv, M (query window; M == N: full causal), N, D, dtype, mode: dense | varlen | paged,
# lens: per-prompt key lengths for varlen/paged). All causal (bottom-right), reduction "sum", group_reduce "mean"
# (the plugin's default config: configs/snapkv.yaml).
def serving_shapes():
    shapes = {}

    def add(name, B=1, Hq=32, Hkv=8, M=64, N=8192, D=128, dtype="float16", mode="dense", lens=None):
        shapes[name] = dict(B=B, Hq=Hq, Hkv=Hkv, M=M, N=N, D=D, dtype=dtype, mode=mode, lens=lens)

    for n in (2048, 8192, 32768):                                # the MHA anchors first
        add(f"win64 MHA32 N={n}", Hkv=32, M=64, N=n)
    add("full MHA32 N=2048", Hkv=32, M=2048, N=2048)
    for w in (1, 16, 64, 128):                                   # windows, Llama-3.1-8B heads (32/8, D 128)
        for n in (512, 2048, 8192, 32768, 131072):
            add(f"win{w} 32/8 N={n}", M=w, N=n)
    add("win64 8/8 D64 N=8192", Hq=8, Hkv=8, D=64)
    add("win64 16/8 N=8192", Hq=16)
    add("win64 28/4 (g7) N=8192", Hq=28, Hkv=4)
    add("win64 64/8 N=8192", Hq=64)
    add("win64 64/64 N=8192", Hq=64, Hkv=64)
    add("win64 32/8 D64 N=8192", D=64)
    for n in (512, 1024, 2048, 4096, 8192, 16384):               # full causal prefill (M = N)
        add(f"full 32/8 N={n}", M=n, N=n)
    add("full 16/16 D64 N=2048", Hq=16, Hkv=16, M=2048, N=2048, D=64)
    add("chunk M=2048 of N=16384 32/8", M=2048, N=16384)         # last chunk of a chunked prefill
    add("win64 32/8 N=8192 bf16", dtype="bfloat16")
    add("win64 32/8 N=32768 bf16", N=32768, dtype="bfloat16")
    add("full 32/8 N=4096 bf16", M=4096, N=4096, dtype="bfloat16")
    add("batch 4x full 32/8 N=2048", B=4, M=2048, N=2048)
    small, large = [512, 3072, 1024, 4096, 2048, 1536, 768, 2560], [8192, 32768, 16384, 12288]
    for mode in ("varlen", "paged"):
        add(f"{mode} 8 prompts 0.5k-4k win64 32/8", M=64, N=max(small), mode=mode, lens=small)
        add(f"{mode} 4 prompts 8k-32k win64 32/8", M=64, N=max(large), mode=mode, lens=large)
    add("varlen 8 prompts 0.5k-4k win64 32/8 bf16", M=64, N=max(small), mode="varlen", lens=small, dtype="bfloat16")
    return shapes


def _ceilings():
    """(matmul TFLOP/s, copy TB/s, exp2/s, SMs) of this GPU: H200 anchors of ARCHITECTURE.md, else the H100's."""
    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if "H200" in name:
        return dict(matmul_tflops=657.0, copy_tbs=4.22, exp_per_s=16 * sms * 1.98e9, sms=sms)
    return dict(matmul_tflops=MATMUL_TFLOPS, copy_tbs=COPY_TBS, exp_per_s=EXP_PER_S, sms=sms)


def _flush_buffer():
    return torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")


def time3(fn, flush, reps=None, host_calls=30):
    """Three timings of fn, no CUDA graphs, medians:
    - gpu_ms: device time of one call, L2 flushed first, the host kept ahead by a device sleep (torch.cuda._sleep)
      enqueued before the start event, so launch gaps on the host do not count;
    - e2e_ms: back-to-back calls, wall time between two events / calls: max(host, device) per call, what an eager
      serving loop sees;
    - host_us: CPU wall time of one call (no sync inside): the median of five blocks' means over host_calls calls,
      host_us_min the lowest block's (the host is shared: a block can catch another process's burst)."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = s.elapsed_time(e)
    blocks = host_blocks(fn, est, host_calls)
    host_us = blocks[2]
    reps = reps or max(5, min(30, int(40 / (est + 0.1))))
    sleep_cycles = int(2000 * (2 * host_us + 30))                  # ~2 GHz: twice the host time, plus 30 µs
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        torch.cuda._sleep(sleep_cycles)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    gpu = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
    n_e2e = max(3, min(50, int(30 / (est + 0.02))))
    s.record()
    for _ in range(n_e2e):
        fn()
    e.record()
    torch.cuda.synchronize()
    return dict(gpu_ms=gpu[len(gpu) // 2], gpu_p20=gpu[len(gpu) // 5], gpu_p80=gpu[(4 * len(gpu)) // 5],
                e2e_ms=s.elapsed_time(e) / n_e2e, host_us=host_us, host_us_min=blocks[0])


def host_blocks(fn, est_ms, host_calls=30):
    """CPU µs per call of fn (no sync inside) in five blocks of up to host_calls calls, sorted; the device kept busy
    by a sleep enqueued first, so no launch waits on it. time3's host_us is the median block."""
    import time
    calls = max(3, min(host_calls, int(50 / max(est_ms, 1e-3))))
    blocks = []                                                    # five blocks: a busy host in one is not the path
    for _ in range(5):
        torch.cuda._sleep(int(2e6 * min(50.0, est_ms * calls)))   # keep the device busy: launches never wait
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(blocks)


def count_syncs(fn):
    """Synchronizing CUDA calls made by one call of fn (torch's sync debug mode), with their first messages."""
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    msgs = [str(w.message).splitlines()[0][:120] for w in caught
            if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
    return dict(count=len(msgs), first=sorted(set(msgs))[:4])


def _serving_case(sh):
    """Inputs of one sweep shape: dict with q, k (and cu/paged tensors), per-prompt dense views, lse."""
    dtype = getattr(torch, sh["dtype"])
    g = torch.Generator(device="cuda").manual_seed(0)
    Hq, Hkv, D, M = sh["Hq"], sh["Hkv"], sh["D"], sh["M"]
    case = dict(dtype=dtype)
    if sh["mode"] == "dense":
        case["q"] = torch.randn(sh["B"], Hq, M, D, device="cuda", dtype=dtype, generator=g)
        case["k"] = torch.randn(sh["B"], Hkv, sh["N"], D, device="cuda", dtype=dtype, generator=g)
        return case
    lens = sh["lens"]
    k = torch.randn(sum(lens), Hkv, D, device="cuda", dtype=dtype, generator=g)
    q = torch.randn(M * len(lens), Hq, D, device="cuda", dtype=dtype, generator=g)
    case.update(q=q, k=k, cu_q=torch.arange(0, M * (len(lens) + 1), M, device="cuda", dtype=torch.int32),
                cu_k=torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32),
                seqlens=torch.tensor(lens, device="cuda", dtype=torch.int32))
    starts = [0] + list(torch.tensor(lens).cumsum(0)[:-1].tolist())
    case["dense"] = [(q[i * M:(i + 1) * M].transpose(0, 1)[None], k[a:a + n].transpose(0, 1)[None])
                     for i, (a, n) in enumerate(zip(starts, lens))]
    if sh["mode"] == "paged":
        block = 16
        nblk = sum(triton_cdiv(n, block) for n in lens)
        cache = torch.zeros(nblk, block, Hkv, D, device="cuda", dtype=dtype)
        perm = torch.randperm(nblk, device="cuda", generator=g)
        table = torch.zeros(len(lens), max(triton_cdiv(n, block) for n in lens), dtype=torch.int32, device="cuda")
        used = 0
        for i, (a, n) in enumerate(zip(starts, lens)):
            nb = triton_cdiv(n, block)
            ids = perm[used:used + nb]
            used += nb
            table[i, :nb] = ids.to(torch.int32)
            pad = torch.zeros(nb * block, Hkv, D, device="cuda", dtype=dtype)
            pad[:n] = k[a:a + n]
            cache[ids] = pad.view(nb, block, Hkv, D)
        case.update(cache=cache, table=table)
    return case


def triton_cdiv(a, b):
    return -(-a // b)


def _ours_fn(sh, case, variant, with_lse=False, lse=None):
    from colreduce_kvprune.kernels import colreduce as kmod
    from colreduce_kvprune import colreduce, colreduce_paged, colreduce_varlen
    M = sh["M"]

    def call():
        kmod.set_launch_variant(variant)
        if sh["mode"] == "dense":
            return colreduce(case["q"], case["k"], "sum", is_causal=True, group_reduce="mean",
                             lse=lse if with_lse else None)
        if sh["mode"] == "varlen":
            return colreduce_varlen(case["q"], case["k"], case["cu_q"], case["cu_k"], "sum", max_seqlen_q=M,
                                    max_seqlen_k=sh["N"], is_causal=True, group_reduce="mean",
                                    lse=lse if with_lse else None)
        return colreduce_paged(case["q"], case["cache"], case["table"], case["cu_q"], case["seqlens"], "sum",
                               max_seqlen_q=M, max_seqlen_k=sh["N"], is_causal=True, group_reduce="mean",
                               lse=lse if with_lse else None)
    return call


def _candidate_fns(sh, case, sms):
    """Configs that are not the default, timed beside ours (name → call; GPU time comparable, host time not: they
    go through the kernel's own entry with a config; each call's config is its `.config`).
    - ours_persistent, packed and paged shapes: the persistent window pass at 8 programs per SM (runs of consecutive
      key tiles; _persistent_config), which _fit_config does not pick for them: the H200's sweep of the eighteenth
      session put it 1–3% faster at three ragged shapes and 10% slower at 4 paged prompts of 8k–32k.
    - ours_row_s3, full causal M ≥ 8192: the row pass at 3 stages, the default before its key tiles went through a
      tensor descriptor (4 since: row_pass.py's TMA variant at 16k 2.16 vs 2.30 ms; not yet timed in the product).
    - ours_row128, full causal 4096 ≤ M < 8192: 128-row tiles at 4 warps and 4 stages instead of 64-row tiles
      (row_pass.py with TMA at 4k: 0.179–0.183 vs 0.189 ms).
    - ours_mid_before, long prompts of fewer than 8192 keys: the tiles before _fit_config's short-prompt rule
      (mid=False), where the rule changes them.
    - ours_one_split, full causal M < 4096, N < 8192 at D 128 where the plan splits the keys: one split (the row pass
      writes the lse, no combine; twenty-ninth session's tile run at 1024: 0.0496 vs 0.0550 ms).
    - ours_win_tiles64, windows of 16–128 queries at N ≤ 2048, D 128: column tiles of the window's rows × 64 keys
      and 64-row row tiles (the same run, window 64 at N = 512: 0.0173 vs 0.0202 ms).
    - ours_pdl, every shape: ours with programmatic dependent launch between the two passes (the config's PDL:
      the column kernel's launch and key-tile load overlap the row pass's last programs; thirty-second session's
      sweep: −20% to +78%, not adopted).
    - windows where _fused_tiles applies (the group's rows in one tile, at most one program per SM: N ≤ 2048 at
      32/8), the other way than ours: ours_two_passes where ours takes the one-launch kernel (FUSED_WINDOWS, the
      GPU default since the thirty-second session), else ours_fused (the config's FUSED: both passes in one
      cooperative launch, each score computed once). Its host time is one launch less, which GPU time does not
      show (benchmarks/fused_ab.py times both ways end to end).
    - ours_fused32, windows where the one-launch kernel's 64-key tiles leave at least half the SMs idle (N = 512 at
      8 kv heads: 64 programs on 132 SMs): 32-key tiles, twice the programs (thirty-second session's sweep: window
      128 at N = 512 16.2 µs against the same work's 12.4).
    - ours_paged_before, paged shapes: the row pass at the stages a packed K takes (3), as before _paged_stages
      (2·3 − 1 = 5 for a paged K, whose block-table loads take pipeline stages; thirty-third session).
    (ours_row64 — 64-row tiles at 8k — was timed in the twentieth session: −0.5%, not adopted.)"""
    from colreduce_kvprune.kernels import colreduce as kmod
    M, N, D, G = sh["M"], sh["N"], sh["D"], sh["Hq"] // sh["Hkv"]
    ragged = sh["mode"] != "dense"
    B = len(sh["lens"]) if ragged else sh["B"]

    def planned(paged):                                   # ours' config, as the product plans it
        return kmod._plan(M, N, D, G, B, sh["Hkv"], True, "new", sms, None, ragged, paged=paged)[0]
    fitted = planned(False)                               # a paged K's before _paged_stages
    base = planned(True) if sh["mode"] == "paged" else fitted
    fns = {}

    def dense(name, cfg):
        fns[name] = lambda: kmod.colreduce_triton(case["q"], case["k"], "sum", is_causal=True, scale=D ** -0.5,
                                                  group_reduce="mean", config=cfg)
        fns[name].config = cfg
    if not ragged:
        if not base["WINDOW"] and M >= 4096:
            dense(*(("ours_row_s3", dict(base, stages1=3)) if M >= 8192 else
                    ("ours_row128", dict(base, BLOCK_R=128, warps1=4, stages1=4))))
        before = kmod._fit_config(kmod._pick_config(M, D, G, True), M, N, G, B * sh["Hkv"], sms, D, mid=False)
        if before != base:
            dense("ours_mid_before", before)
        if not base["WINDOW"] and M < 4096 and N < 8192 and D > 64 and \
                kmod._plan(M, N, D, G, B, sh["Hkv"], True, "new", sms, base)[2] > 1:
            dense("ours_one_split", dict(base, SPLITS=1))
        if base["WINDOW"] and M >= 16 and N <= 2048 and D > 64:
            per_tile = {k_: v for k_, v in base.items() if k_ != "PERSISTENT"}
            dense("ours_win_tiles64", dict(per_tile, BLOCK_M=1 << (M - 1).bit_length(), BLOCK_N=64, warps=4,
                                           stages=3, BLOCK_R=64, warps1=4, stages1=3))
        dense("ours_pdl", dict(base, PDL=True))
        fused_n = kmod._fused_tiles(M, N, D, G, B * sh["Hkv"], sms, False)
        if fused_n:
            dense(*(("ours_two_passes", dict(base, FUSED=False)) if kmod.FUSED_WINDOWS else
                    ("ours_fused", dict(base, FUSED=True))))
        if fused_n == 64 and triton_cdiv(N, 64) * B * sh["Hkv"] <= sms // 2 and \
                kmod._fused_tiles(M, N, D, G, B * sh["Hkv"], sms, False, block_n=32):
            dense("ours_fused32", dict(base, FUSED=True, FUSED_N=32))
        return fns

    def packed(name, cfg):
        kw = dict(is_causal=True, scale=D ** -0.5, group_reduce="mean", max_seqlen_q=M, max_seqlen_k=N,
                  cu_seqlens_q=case["cu_q"], config=cfg)
        if sh["mode"] == "varlen":
            fns[name] = lambda: kmod.colreduce_triton(case["q"], case["k"], "sum", cu_seqlens_k=case["cu_k"], **kw)
        else:
            fns[name] = lambda: kmod.colreduce_triton(case["q"], case["cache"], "sum", block_table=case["table"],
                                                      seqlens_k=case["seqlens"], **kw)
        fns[name].config = cfg
    cfg = kmod._persistent_config(base, M, N, G, B * sh["Hkv"], sms, D, 8) if base["WINDOW"] else None
    if cfg is not None:
        packed("ours_persistent", cfg)
    packed("ours_pdl", dict(base, PDL=True))
    if base != fitted:
        packed("ours_paged_before", fitted)
    return fns


def _lse_for(sh, case):
    """Natural-log row lse in the layout the call takes: (B, Hq, M) dense, (Hq, total_q) varlen/paged."""
    scale = sh["D"] ** -0.5
    if sh["mode"] == "dense":
        return row_lse(case["q"], case["k"], scale, True)
    parts = [row_lse(q, k, scale, True)[0] for q, k in case["dense"]]          # (Hq, M) each
    return torch.cat(parts, dim=1).contiguous()


def _peer_fns(sh, case, have_flash):
    """name → callable (or None where it does not fit / is absent): the same scores (sum over the window, mean over
    the group) by flash-colreduce 0.2.2 (K repeated for GQA, as it needs), naive torch, and SDPA forward (v = k)."""
    G = sh["Hq"] // sh["Hkv"]
    pairs = [(case["q"], case["k"])] if sh["mode"] == "dense" else case["dense"]

    def grouped(x):                        # (B, Hq, N) → (B, Hkv, N) mean over the group
        return x.view(x.shape[0], -1, G, x.shape[-1]).float().mean(2) if G > 1 else x

    fns = {}
    if have_flash:
        from flash_colreduce import flash_colreduce

        def flash():
            return [grouped(flash_colreduce(q, k.repeat_interleave(G, 1) if G > 1 else k, "sum", is_causal=True))
                    for q, k in pairs]
        fns["flash_colreduce"] = flash
    else:
        fns["flash_colreduce"] = None
    fits = max(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] for q, k in pairs) * 4 <= 4 * 2**30
    fns["naive_torch"] = (lambda: [grouped(naive(q, k, True)) for q, k in pairs]) if fits else None
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns["sdpa"] = lambda: [sdpa(q, k, k, is_causal=q.shape[2] == k.shape[2], enable_gqa=G > 1) for q, k in pairs]
    fns["read_k"] = lambda: case["k"].sum(dtype=torch.float32)
    fns.update(_same_work_fns(pairs))
    return fns


def _same_work_fns(pairs, heads: int = 2):
    """SDPA's forward doing the work of our two passes (benchmarks/same_work.py): head dim D/2 (its q·kᵀ and p·v
    are the 2·D FLOPs a pair of one q·kᵀ of ours), separate values (K and V of D/2: the bytes of our K), heads
    doubled (two passes; heads=1: the work of one pass), the same queries and keys: the same tensor FLOPs, exp2 count
    and bytes, in NVIDIA's kernels. flash: FlashAttention-2's op, whose is_causal is our bottom-right mask at every
    shape; cuDNN: causal where M = N, a window unmasked (M·(M−1)/2 more pairs a head). The row's same work is the
    faster of the two."""
    g = torch.Generator(device="cuda").manual_seed(1)
    halves = []
    for q, k in pairs:
        B, Hq, M, D = q.shape
        Hkv, N = k.shape[1], k.shape[2]
        halves.append(tuple(torch.randn(B, heads * h, n, D // 2, device="cuda", dtype=q.dtype, generator=g)
                            for h, n in ((Hq, M), (Hkv, N), (Hkv, N))))

    def cudnn():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return [torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=q.shape[2] == k.shape[2], enable_gqa=q.shape[1] != k.shape[1]) for q, k, v in halves]

    def flash():
        return [torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal=True)[0]
                for q, k, v in halves]
    return {"same_work_cudnn": cudnn, "same_work_flash": flash}


def _same_work(r):
    """(ms, backend) of the faster same-work arm of a sweep row, or None (rows of sweeps before it, or both failed)."""
    got = [(r[k]["gpu_ms"], k.rsplit("_", 1)[1]) for k in ("same_work_cudnn", "same_work_flash") if r.get(k)]
    return min(got) if got else None


def _floor(sh, ceil, sms):
    """Floor of one pass (ms): the largest of q·kᵀ at the matmul ceiling, exp2 at the MUFU rate, one read of K; and
    ours (ours_ms) as the product runs this shape on a GPU of sms SMs."""
    lens = sh["lens"] or [sh["N"]] * sh["B"]
    pairs = sum(sh["Hq"] * visible_pairs(sh["M"], n) for n in lens)
    bytes_k = sum(lens) * sh["Hkv"] * sh["D"] * 2
    f = dict(matmul_ms=2 * pairs * sh["D"] / (ceil["matmul_tflops"] * 1e12) * 1e3,
             exp_ms=pairs / ceil["exp_per_s"] * 1e3, read_k_ms=bytes_k / (ceil["copy_tbs"] * 1e12) * 1e3)
    f["pass_ms"] = max(f["matmul_ms"], f["exp_ms"], f["read_k_ms"])
    # ours: two passes; where the row pass saves its scores (kernels/colreduce.py _save_scores: windows of few
    # rows) the second pass reads them instead of K: their fp32 bytes written and read once, and their exp2
    from colreduce_kvprune.kernels import colreduce as kmod
    f["saved_scores"] = sh["M"] <= kmod._WINDOW_M and kmod._save_scores(
        sh["Hq"] // sh["Hkv"], sh["M"], sh["D"], getattr(torch, sh.get("dtype", "float16")), sh["B"] * sh["N"] * sh["Hkv"])
    f["scores_ms"] = 2 * pairs * 4 / (ceil["copy_tbs"] * 1e12) * 1e3
    f["ours_ms"] = f["pass_ms"] + (max(f["exp_ms"], f["scores_ms"]) if f["saved_scores"] else f["pass_ms"])
    # where ours takes the one-launch window kernel (FUSED_WINDOWS, _fused_tiles) each score is computed once and
    # K read once: one pass
    f["fused"] = kmod.FUSED_WINDOWS and bool(kmod._fused_tiles(sh["M"], max(lens), sh["D"], sh["Hq"] // sh["Hkv"],
                                                                 len(lens) * sh["Hkv"], sms, False))
    if f["fused"]:
        f["ours_ms"] = f["pass_ms"]
    return f


def serving_sweep(out_dir, only=None, compile_only=False, shard=None, floor_us=None):
    """Every serving shape: ours (new and old launch variants, and new with lse given), flash-colreduce, naive
    torch, SDPA forward and a read of K, each timed by time3; each shape's floor (2 passes; 1 with lse). floor_us:
    host_floor()'s figures, written into the results from the first shape on (a sweep cut by its time limit keeps
    them: host µs differ between machines by as much as the launch floor does)."""
    from colreduce_kvprune.kernels import colreduce as kmod
    try:
        import flash_colreduce  # noqa: F401
        have_flash = True
    except ImportError:
        have_flash = False
        print("flash-colreduce is not installed: its column is skipped", flush=True)
    shapes = serving_shapes()
    names = [n for n in shapes if not only or any(o in n for o in only)]
    if shard is not None:
        i, n = shard
        names = names[i::n]
    ceil = _ceilings()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    env = env_info()
    flush = _flush_buffer()
    rows, result = [], None
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        sh = shapes[name]
        try:
            case = _serving_case(sh)
            lse = _lse_for(sh, case)
            default = kmod.DEFAULT_VARIANT               # what users get: "direct" under the checked Tritons
            fns = {"ours": _ours_fn(sh, case, default), "ours_old": _ours_fn(sh, case, "old"),
                   "ours_lse": _ours_fn(sh, case, default, True, lse), "ours_jit": _ours_fn(sh, case, "new")}
            candidates = _candidate_fns(sh, case, sms)
            fns.update(candidates)               # candidate defaults, timed beside ours
            if compile_only:                     # fill Triton's disk cache (parallel processes before the sweep)
                for fn in fns.values():
                    fn()
                if have_flash:
                    _peer_fns(sh, case, True)["flash_colreduce"]()
                torch.cuda.synchronize()
                continue
            ref = fns["ours_old"]()
            new = fns["ours"]()
            err = ((new - ref).norm() / ref.norm().clamp(min=1e-30)).item()
            row = dict(name=name, shape=sh, new_vs_old_rel_err=err, floor=_floor(sh, ceil, sms),
                       ours_syncs=count_syncs(fns["ours"]))
            row["candidates"] = {}
            for key, fn in candidates.items():   # their difference to the old path (exact: summation order only)
                got = fn()
                row["candidates"][key] = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
            row["variant"] = default
            row["loadavg_1min"] = os.getloadavg()[0]         # what else loads the host while this row is timed
            try:                                 # the JIT dispatch of the same kernels ("new"): bitwise ours
                row["jit_equal"] = all(bool(torch.equal(fns["ours_jit"](), new)) for _ in range(2))
            except Exception as e:  # noqa: BLE001
                row["jit_equal"] = f"error {e!r}"[:200]
                fns["ours_jit"] = None
            for key, fn in list(fns.items()) + list(_peer_fns(sh, case, have_flash).items()):
                try:
                    row[key] = time3(fn, flush) if fn is not None else None
                except Exception as e:  # noqa: BLE001 (a peer that fails here is reported, the sweep goes on)
                    if key in ("ours", "ours_old", "ours_lse"):
                        raise
                    row[key] = None
                    row.setdefault("errors", {})[key] = repr(e)[:200]
                    torch.cuda.synchronize()
            print(_sweep_line(row), flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: FAILED {e!r}"[:300], flush=True)
            row = dict(name=name, shape=sh, error=repr(e)[:300])
        finally:
            kmod.set_launch_variant(kmod.DEFAULT_VARIANT)
            case = lse = fns = None
            torch.cuda.empty_cache()
        if compile_only:
            continue
        rows.append(row)
        result = dict(env=env, ceilings=ceil, rows=rows, partial=len(rows) < len(names),
                      flash_colreduce="present" if have_flash else "absent: column skipped", host_floor=floor_us)
        _save_sweep(out_dir, result)
    if compile_only:
        return None
    if result is not None:
        recheck_host(rows, shapes)
        _save_sweep(out_dir, result)
        print(serving_markdown(result), flush=True)
    return result


def _save_sweep(out_dir, result):
    """serving_sweep.json and .md, rewritten (after each shape, and after the host re-check)."""
    json.dump(result, open(os.path.join(out_dir, "serving_sweep.json"), "w"), indent=1)
    open(os.path.join(out_dir, "serving_sweep.md"), "w").write(serving_markdown(result) + "\n")


HOST_GOAL_US = 30      # issue 19: host time per call of our launch path


def recheck_host(rows, shapes):
    """Times the host µs again, after the whole sweep, of every shape whose first timing exceeded HOST_GOAL_US: ours
    and the old launch path, on the shape rebuilt (row["host_recheck"]). The launch path is the same code at every
    shape of a kind; a shape slow at first in ours, the old path and the JIT dispatch alike and at the goal when
    re-timed caught a busy host (another process, a clock change), not a slower path. Both timings are reported."""
    from colreduce_kvprune.kernels import colreduce as kmod
    for row in rows:
        if "error" in row or row["ours"]["host_us"] <= HOST_GOAL_US:
            continue
        sh = shapes[row["name"]]
        try:
            case = _serving_case(sh)
            again = {}
            for key, variant in (("ours", kmod.DEFAULT_VARIANT), ("ours_old", "old")):
                fn = _ours_fn(sh, case, variant)
                fn()
                torch.cuda.synchronize()
                blocks = host_blocks(fn, row[key]["gpu_ms"])
                again[key] = dict(host_us=blocks[2], host_us_min=blocks[0])
            again["loadavg_1min"] = os.getloadavg()[0]
            row["host_recheck"] = again
            print(f"{row['name']}: host re-check ours {row['ours']['host_us']:.0f} -> {again['ours']['host_us']:.0f}"
                  f" us, old {row['ours_old']['host_us']:.0f} -> {again['ours_old']['host_us']:.0f} us", flush=True)
        except Exception as e:  # noqa: BLE001 (the first timing stays reported)
            row["host_recheck"] = f"failed: {e!r}"[:200]
        finally:
            kmod.set_launch_variant(kmod.DEFAULT_VARIANT)
            case = None
            torch.cuda.empty_cache()


# issue 19's big shapes, as the serving sweep calls them (fp16, causal, sum over the queries, mean over the group):
# name -> (B, Hq, Hkv, M, N, D)
GOAL_SHAPES = {"win64 32/8 N=131072": (1, 32, 8, 64, 131072, 128), "full 32/8 N=16384": (1, 32, 8, 16384, 16384, 128)}
# the full causal prompts where the same work in NVIDIA's kernels is faster than ours (twenty-ninth session's sweep):
# GOAL_TILE_SHAPES=mid times these instead
MID_SHAPES = {f"full 32/8 N={n}": (1, 32, 8, n, n, 128) for n in (512, 1024, 2048, 4096)}
MID_SHAPES["win64 32/8 N=512"] = (1, 32, 8, 64, 512, 128)
# column-pass variants tried at each (WINDOW, BLOCK_M, BLOCK_N, warps, stages, HEAD_SPLIT; None = the default's)
GOAL_COLUMN_TILES = {
    True: [(True, 16, 128, 4, 3, None), (True, 32, 128, 4, 2, None), (True, 32, 128, 4, 4, None),
           (True, 32, 128, 8, 3, None), (True, 64, 128, 4, 3, None), (True, 64, 128, 8, 3, None),
           (True, 32, 256, 8, 2, None), (True, 32, 256, 8, 3, None), (True, 64, 64, 4, 3, None),
           (True, 32, 64, 4, 3, None), (True, 32, 64, 2, 3, None)],
    False: [(False, 64, 128, 4, 3, 1), (False, 64, 128, 4, 2, 2), (False, 128, 128, 8, 2, None),
            (False, 128, 64, 4, 3, None), (False, 128, 64, 8, 3, None), (False, 64, 64, 4, 3, None),
            (False, 64, 128, 8, 2, None), (False, 128, 128, 8, 3, None), (False, 64, 256, 8, 2, None)]}
# BLOCK_R, BLOCK_N1, warps1, stages1. 256-row tiles at 4 warps: a window's whole group (4 × 64 rows) in one row
# block reads K once instead of twice; the persistent column experiment ran such tiles fastest at 4 warps
GOAL_ROW_TILES = [(128, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3),
                  (128, 32, 4, 3), (256, 64, 8, 2), (64, 64, 4, 4), (256, 64, 4, 3), (256, 32, 4, 3)]


def goal_tiles(out_dir, budget_s=200.0):
    """Tile configs of both passes on this GPU at GOAL_SHAPES, on the serving path (group mean): the column pass
    alone (lse given) per column variant, then both passes per row variant with the fastest column variant; each
    against the default launch (the fitted tiles) in the same run, outputs compared to the default's (any tile is
    exact: differences are summation order). Results in goal_tiles.json, rewritten after each config; stops at
    budget_s. The default tiles came from H100 sweeps: this checks them on the H200."""
    import time
    from colreduce_kvprune.kernels import colreduce as kmod
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = dict(env=env_info(), rows=[])
    flush = _flush_buffer()
    shapes = MID_SHAPES if os.environ.get("GOAL_TILE_SHAPES") == "mid" else GOAL_SHAPES
    for name, (B, Hq, Hkv, M, N, D) in shapes.items():
        torch.manual_seed(0)
        q = torch.randn(B, Hq, M, D, device="cuda", dtype=torch.float16)
        k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.float16)
        scale = 1 / math.sqrt(D)
        lse = row_lse(q, k, scale, True)
        base = kmod._fit_config(kmod._pick_config(M, D, Hq // Hkv, True), M, N, Hq // Hkv, B * Hkv, sms)

        def call(cfg, with_lse):
            return kmod.colreduce_triton(q, k, "sum", is_causal=True, scale=scale, group_reduce="mean",
                                         lse=lse if with_lse else None, config=cfg, variant="new")
        ref = {w: call(base, w) for w in (True, False)}

        def timed(part, tag, cfg, with_lse):
            row = dict(shape=name, part=part, tiles=tag, config={k_: v for k_, v in cfg.items()})
            try:
                out = call(cfg, with_lse)
                row["rel_err_vs_default"] = ((out - ref[with_lse]).norm() / ref[with_lse].norm()).item()
                row["gpu_ms"] = time3(lambda: call(cfg, with_lse), flush)["gpu_ms"]
            except Exception as e:  # noqa: BLE001 (out of resources for this tile: reported)
                row["error"] = repr(e)[:160]
                torch.cuda.synchronize()
            result["rows"].append(row)
            json.dump(result, open(os.path.join(out_dir, "goal_tiles.json"), "w"), indent=1)
            print(f"{name:22s} {part:14s} {tag} {row.get('gpu_ms', row.get('error'))}", flush=True)
            return row
        best = (timed("column (lse)", "default", base, True)["gpu_ms"], base)
        timed("both passes", "default", base, False)
        for window, bm, bn, w, st, hs in GOAL_COLUMN_TILES[bool(base["WINDOW"])]:
            if time.perf_counter() - t0 > budget_s:
                break
            cfg = dict(base, WINDOW=window, BLOCK_M=bm, BLOCK_N=bn, warps=w, stages=st)
            cfg.pop("PERSISTENT", None)          # these are the per-key-tile kernels' tiles
            if hs is not None:
                cfg["HEAD_SPLIT"] = hs
            r = timed("column (lse)", (bm, bn, w, st, cfg.get("HEAD_SPLIT")), cfg, True)
            if r.get("gpu_ms", float("inf")) < best[0]:
                best = (r["gpu_ms"], cfg)
        if base.get("PERSISTENT"):                   # the persistent window pass at 1–4 programs per SM
            for per_sm in (1, 3, 4):
                cfg = dict(base, PERSISTENT=max(1, per_sm * sms // (B * Hkv)))
                r = timed("column (lse)", ("persistent", per_sm, "per SM"), cfg, True)
                if r.get("gpu_ms", float("inf")) < best[0]:
                    best = (r["gpu_ms"], cfg)
        for br, bn1, w1, st1 in GOAL_ROW_TILES:
            if time.perf_counter() - t0 > budget_s:
                break
            timed("both passes", ("row", br, bn1, w1, st1, "column", best[1]["BLOCK_M"], best[1]["BLOCK_N"],
                                  best[1]["warps"], best[1]["stages"]),
                  dict(best[1], BLOCK_R=br, BLOCK_N1=bn1, warps1=w1, stages1=st1), False)
        plan = kmod._plan(M, N, D, Hq // Hkv, B, Hkv, True, "new", sms, best[1])
        for s in (1, 2, 4):                          # the row pass's key splits (_num_splits: plan[2]); 1: no combine
            if s != plan[2] and time.perf_counter() - t0 <= budget_s:
                timed("both passes", ("splits", s, "default", plan[2]), dict(best[1], SPLITS=s), False)
        del q, k, lse, ref
        torch.cuda.empty_cache()
    return result


def _ms(cell, key="gpu_ms"):
    return f"{cell[key]:.3f}" if cell else "—"


def _ours_floor(r):
    """The floor of ours at a sweep row (_floor; rows of sweeps before the saved scores: two passes)."""
    return r["floor"].get("ours_ms", 2 * r["floor"]["pass_ms"])


def _sweep_line(r):
    peers = [k for k in ("flash_colreduce", "naive_torch", "sdpa") if r.get(k)]
    best = min((r[k]["gpu_ms"] for k in peers if k != "sdpa"), default=float("inf"))
    flag = " SLOWER than a peer" if r["ours"]["gpu_ms"] > best else ""
    jit = r.get("ours_jit")
    return (f"{r['name']:40s} ours {_ms(r['ours'])} (old {_ms(r['ours_old'])}, lse {_ms(r['ours_lse'])}) host "
            f"{r['ours']['host_us']:.0f} us (old {r['ours_old']['host_us']:.0f}, jit "
            f"{jit['host_us'] if jit else float('nan'):.0f} {r.get('jit_equal')}) | "
            f"flash {_ms(r['flash_colreduce'])} "
            f"naive {_ms(r['naive_torch'])} sdpa {_ms(r['sdpa'])} same work {_same_work(r)} | "
            f"floor {_ours_floor(r):.3f} | "
            f"syncs {r['ours_syncs']['count']} | new vs old {r['new_vs_old_rel_err']:.1e}{flag}")


def serving_markdown(result):
    info = result["env"]
    lines = [f"GPU: {info['gpu']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"flash-colreduce {info['flash_colreduce']}. Causal (bottom-right), sum over the window, mean over "
             "the GQA group. Times in ms, medians: **gpu** = device time of one call (L2 flushed, host launch "
             "gaps hidden by a device sleep), **e2e** = back-to-back calls (max of host and device per call, no "
             "CUDA graphs), **host** = CPU µs per call of our launch path. ours = the default launch variant "
             f"({result['rows'][0].get('variant', 'new') if result['rows'] else '?'}: compiled kernels launched "
             "directly, scratch shared per stream), JIT = the same kernels through Triton's dispatch ('new'), "
             "old = before issue 19 (same run). floor = 2 passes × max(q·kᵀ at the matmul ceiling, exp2 at the MUFU rate, "
             "a read of K) — where ours saves the row pass's scores (windows of few rows), 1 pass + max(their exp2, "
             "their fp32 bytes written and read); where it runs both passes of a short window in one launch, and "
             "with lse: 1 pass. SDPA: the keys passed as the values (one read of "
             "K). Same work: SDPA's forward at head dim D/2 with its own values and twice the heads — the tensor "
             "FLOPs, exp2 count and bytes of our two passes, in NVIDIA's kernels (the faster of cuDNN and "
             "FlashAttention-2; benchmarks/same_work.py). Peers: flash-colreduce with K repeated for GQA and the group mean "
             "after; naive = matmul + softmax + sum (skipped past 4 GiB); varlen/paged peers loop over prompts.",
             "",
             f"Host floor on this machine (µs per call, measured before the shapes): {result.get('host_floor')}",
             "",
             "| shape | ours gpu | ours e2e | host µs | old gpu | old e2e | old host µs | ours lse gpu | "
             "flash-colreduce gpu / e2e | naive gpu / e2e | SDPA fwd gpu | same work gpu | ours / same work | "
             "read K | floor | ours / floor | ours ≤ peers | JIT dispatch e2e / host µs (bitwise = ours) |",
             "|" + "---|" * 18]
    done = [r for r in result["rows"] if "error" not in r]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:100]} |" + " |" * 17)
            continue
        o, old = r["ours"], r["ours_old"]
        peers = [r[k] for k in ("flash_colreduce", "naive_torch") if r.get(k)]
        ok_gpu = all(o["gpu_ms"] <= p["gpu_ms"] for p in peers)
        ok_e2e = all(o["e2e_ms"] <= p["e2e_ms"] for p in peers)
        floor = _ours_floor(r)
        pe = lambda c: f"{c['gpu_ms']:.3f} / {c['e2e_ms']:.3f}" if c else "—"  # noqa: E731
        sw = _same_work(r)
        lines.append(
            f"| {r['name']} | {o['gpu_ms']:.3f} | {o['e2e_ms']:.3f} | {o['host_us']:.0f} | {old['gpu_ms']:.3f} | "
            f"{old['e2e_ms']:.3f} | {old['host_us']:.0f} | {_ms(r['ours_lse'])} | {pe(r['flash_colreduce'])} | "
            f"{pe(r['naive_torch'])} | {_ms(r['sdpa'])} | "
            + (f"{sw[0]:.3f} ({sw[1]}) | {o['gpu_ms'] / sw[0]:.2f}× | " if sw else "— | — | ")
            + f"{_ms(r['read_k'])} | {floor:.3f} | "
            f"{o['gpu_ms'] / floor:.1f}× | {'yes' if ok_gpu else '**no**'} gpu, {'yes' if ok_e2e else '**no**'} e2e | "
            + (f"{r['ours_jit']['e2e_ms']:.3f} / {r['ours_jit']['host_us']:.0f} ({r.get('jit_equal')}) |"
               if r.get("ours_jit") else f"— ({r.get('jit_equal')}) |"))
    n = len(result["rows"])
    if not done:
        return "\n".join(lines + ["", f"{n} shapes, all failed."])
    worse = [r["name"] for r in done
             if any(r[k] and r["ours"]["gpu_ms"] > r[k]["gpu_ms"] for k in ("flash_colreduce", "naive_torch"))]
    by_sdpa = [r for r in done if r.get("sdpa") and r["ours"]["gpu_ms"] > r["sdpa"]["gpu_ms"]]
    by_both = [r["name"] for r in by_sdpa if _same_work(r) and r["ours"]["gpu_ms"] > _same_work(r)[0]]
    hosts = sorted(r["ours"]["host_us"] for r in done)
    jit = sorted(r["ours_jit"]["host_us"] for r in done if r.get("ours_jit"))
    unequal = [r["name"] for r in done if r.get("jit_equal") is not True]
    syncs = sum(r["ours_syncs"]["count"] for r in done)
    errs = max(r["new_vs_old_rel_err"] for r in done)
    rechecked = [r for r in done if isinstance(r.get("host_recheck"), dict)]
    best = sorted(min(r["ours"]["host_us"], r["host_recheck"]["ours"]["host_us"])
                  if isinstance(r.get("host_recheck"), dict) else r["ours"]["host_us"] for r in done)
    again = "; ".join(f"{r['name']}: ours {r['ours']['host_us']:.0f} → {r['host_recheck']['ours']['host_us']:.0f}, "
                      f"old {r['ours_old']['host_us']:.0f} → {r['host_recheck']['ours_old']['host_us']:.0f}"
                      for r in rechecked)
    lines += ["", f"{n} shapes; ours slower than a peer (gpu) at {len(worse)}: {', '.join(worse) or 'none'}. "
              f"Host µs per call of ours: median {hosts[len(hosts) // 2]:.0f}, max {hosts[-1]:.0f} (goal ≤ "
              f"{HOST_GOAL_US}). SDPA's forward (head dim D) faster than ours at {len(by_sdpa)}; of those, the "
              f"same work in NVIDIA's kernels faster than ours at {len(by_both)}: {', '.join(by_both) or 'none'}"
              + (f" (same work not timed at {sum(1 for r in by_sdpa if not _same_work(r))})"
                 if any(not _same_work(r) for r in by_sdpa) else "") + ". "
              + (f"Re-timed after the sweep (first timing above the goal; ours and the old path, µs): {again}; the "
                 f"lower of the two timings per shape: median {best[len(best) // 2]:.0f}, max {best[-1]:.0f}. "
                 if rechecked else "")
              + "Host "
              f"syncs in our calls (torch sync debug mode): {syncs}; largest relative difference new vs old launch "
              f"path: {errs:.1e}. JIT dispatch (variant 'new'): host µs median "
              f"{jit[len(jit) // 2] if jit else float('nan'):.0f}; not bitwise equal to ours or failed at: "
              f"{', '.join(unequal) or 'none'}."]
    cand = [(r, key) for r in done for key in r.get("candidates", {}) if r.get(key)]
    if cand:                                  # candidate defaults (_candidate_fns), not ours yet
        lines += ["", "Candidate defaults (ours_persistent: the persistent window pass at 8 programs per SM for "
                  "packed/paged batches; ours_row_s3: the row pass at 3 stages at full causal ≥ 8k; ours_row128: 128-row "
                  "row tiles at 4 stages at full causal 4k; ours_mid_before: the tiles before the short-prompt rule of "
                  "_fit_config, full causal < 8192 keys; ours_one_split: one key split in the row pass; ours_win_tiles64: "
                  "window tiles of the window's rows × 64 keys, 64-row row tiles; ours_pdl: programmatic dependent "
                  "launch between the passes; ours_fused: both passes of a short window in one cooperative launch; "
                  "ours_two_passes: the two passes where ours takes that one launch; ours_paged_before: the paged row pass "
                  "at the stages a packed K takes, before _paged_stages; ours_fused32: the one launch with 32-key "
                  "tiles), "
                  "gpu ms against ours: "
                  + "; ".join(f"{r['name']} {key}: {r[key]['gpu_ms']:.4f} vs {r['ours']['gpu_ms']:.4f} "
                              f"({r[key]['gpu_ms'] / r['ours']['gpu_ms'] - 1:+.1%}; rel. diff. to the old path "
                              f"{r['candidates'][key]:.1e})" for r, key in cand) + "."]
    return "\n".join(lines)


def host_floor():
    """Host µs of an empty Triton launch and of torch.empty: what any launch path costs at least."""
    import time
    import triton

    @triton.jit
    def _empty(X, n, BLOCK):     # no tl annotation: Triton resolves names in the module's globals, not here
        pass
    from triton import knobs
    x = torch.empty(16, device="cuda")
    compiled = _empty[(1,)](x, 16, BLOCK=16)
    torch.cuda.synchronize()
    dev = x.device.index

    def direct():                      # the compiled kernel's own launcher (CompiledKernel.run)
        compiled.run(1, 1, 1, torch._C._cuda_getCurrentRawStream(dev), compiled.function, compiled.packed_metadata,
                     None, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, x, 16, 16)
    from colreduce_kvprune.kernels.launch import compiled_launch
    raw = compiled_launch(compiled)      # Triton's C launch itself, as the "direct" launch variant calls it
    out = {}
    for name, fn in (("triton_empty_launch_us", lambda: _empty[(1,)](x, 16, BLOCK=16)),
                     ("triton_empty_direct_launch_us", direct),
                     ("triton_empty_raw_launch_us",
                      lambda: raw(1, 1, 1, torch._C._cuda_getCurrentRawStream(dev), x.data_ptr(), 16, 16)),
                     ("torch_empty_us", lambda: torch.empty(64, device="cuda")),
                     ("torch_add_us", lambda: x.add(1))):
        for _ in range(20):
            fn()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        out[name] = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="folder for kernels.md and kernels.json")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--only", nargs="*", help="workload names (substrings) to run")
    ap.add_argument("--plot", help="draw the chart from this JSON instead of running")
    ap.add_argument("--png", default="kernels.png")
    ap.add_argument("--sweep", action="store_true", help="time the tile configs of both passes instead")
    ap.add_argument("--report", action="store_true", help="times next to their floors, and kernel resources")
    ap.add_argument("--serving-sweep", action="store_true",
                    help="the serving shapes (issue 19): ours new/old, peers, host time, floors → serving_sweep.*")
    ap.add_argument("--goal-tiles", action="store_true",
                    help="tile configs of both passes at issue 19's big shapes (serving path) → goal_tiles.json")
    ap.add_argument("--budget", type=float, default=200.0, help="with --goal-tiles: seconds")
    ap.add_argument("--compile-only", action="store_true", help="with --serving-sweep: only compile (fill the cache)")
    ap.add_argument("--shard", help="with --compile-only: i/n, the i-th of n slices of the shapes")
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot, args.png)
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    if args.serving_sweep:
        shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
        if not args.compile_only:
            warm_up_clocks()
            try:
                hf = host_floor()
            except Exception as e:  # noqa: BLE001 (a measurement aid only)
                hf = {"error": repr(e)[:200]}
            print("host floor (µs):", hf, flush=True)
        serving_sweep(args.out, args.only, args.compile_only, shard, None if args.compile_only else hf)
        return
    warm_up_clocks()
    if args.goal_tiles:
        goal_tiles(args.out, args.budget)
        return
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
