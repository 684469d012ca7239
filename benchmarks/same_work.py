"""Issue 19's big-shape goals against NVIDIA's attention kernels doing the same work (one GPU run).

A pass of ours does, per visible (query, key) pair, one q·kᵀ product of D terms (2·D FLOPs on the tensor pipe) and
one exp2 (the MUFU), and reads K once. SDPA's forward at head dim D/2 does two products of D/2 terms (q·kᵀ and p·v:
the same 2·D FLOPs), one exp2, and reads K and V of D/2 each (the same bytes as our K). So, with the same query and
key counts, SDPA at head dim D/2 and separate values is *the same tensor work, exp2 count and bytes* as one pass of
ours, and at twice the heads the same as our two passes. (SDPA at head dim D, the issue's reference, has twice the
tensor work per exp2: its exp2 hides more easily.) The mix is the same, the kernels are not: SDPA's two half-depth
products against our one of full depth.

Per shape, alternated ALTERNATIONS times in one process (medians of benchmarks/kernels.py time3's gpu_ms, L2
flushed): ours (two passes, the product's call), ours with the lse given (one pass), SDPA at head dim D (v = k as the
sweep times it, and separate values), and SDPA at D/2 for one pass and for two (Hq, Hkv doubled), each as the
serving sweep's same-work column builds it (benchmarks/kernels.py _same_work_fns: cuDNN, and FlashAttention-2's op
with our bottom-right causal mask) and the faster of them. Each time comes with its tensor TFLOP/s (2·D FLOPs a pair
and pass). Until the thirtieth session the script built its own arms (cuDNN, flash and memory-efficient through
SDPA's backends; a window's mask left out; memory-efficient refused every shape): same_work_visit31.json.

    python benchmarks/same_work.py --out DIR   # GPU: DIR/same_work.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as bk  # noqa: E402

ALTERNATIONS = int(os.environ.get("SAME_WORK_ALTERNATIONS", "3"))
# (name, Hq, Hkv, M, N, D): the two big goal shapes and their neighbours
SHAPES = [("full 32/8 N=16384", 32, 8, 16384, 16384, 128), ("full 32/8 N=8192", 32, 8, 8192, 8192, 128),
          ("full 32/8 N=4096", 32, 8, 4096, 4096, 128), ("win64 32/8 N=131072", 32, 8, 64, 131072, 128),
          ("win64 32/8 N=32768", 32, 8, 64, 32768, 128)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    a = ap.parse_args(argv)
    from colreduce_kvprune import colreduce
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "same_work.json")
    flush = bk._flush_buffer()
    bk.warm_up_clocks()
    rows = []
    for name, Hq, Hkv, M, N, D in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, Hq, M, D, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(1, Hkv, N, D, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(1, Hkv, N, D, device="cuda", dtype=torch.float16, generator=g)
        lse = bk.row_lse(q, k, D ** -0.5, True)
        G = Hq // Hkv

        def sdpa_d(vv):
            return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, vv, is_causal=M == N,
                                                                            enable_gqa=G > 1)
        arms = {"ours": lambda: colreduce(q, k, "sum", is_causal=True, group_reduce="mean"),
                "ours_lse": lambda: colreduce(q, k, "sum", is_causal=True, group_reduce="mean", lse=lse),
                "sdpa_D_v=k": sdpa_d(k), "sdpa_D": sdpa_d(v)}
        for work, heads in (("one_pass_work", 1), ("two_pass_work", 2)):     # the sweep's same-work arms
            for arm, fn in bk._same_work_fns([(q, k)], heads).items():        # same_work_cudnn, same_work_flash
                arms[f"{work}_{arm.rsplit('_', 1)[1]}"] = fn
        times = {arm: [] for arm in arms}
        errors = {}
        for _ in range(ALTERNATIONS):
            for arm, fn in arms.items():
                if arm in errors:
                    continue
                try:
                    times[arm].append(bk.time3(fn, flush)["gpu_ms"])
                except Exception as e:  # noqa: BLE001 (a backend that refuses the shape: recorded)
                    errors[arm] = repr(e)[:160]
                    torch.cuda.synchronize()
        p = Hq * bk.visible_pairs(M, N)
        flops_pass = 2 * p * D
        row = dict(name=name, Hq=Hq, Hkv=Hkv, M=M, N=N, D=D, pairs=p, errors=errors, ms={}, tflops={})
        for arm, ts in times.items():
            if not ts:
                continue
            med = sorted(ts)[len(ts) // 2]
            row["ms"][arm] = dict(median=med, all=ts)
            passes = 1 if arm in ("ours_lse",) or arm.startswith("one_pass") else 2
            if arm.startswith("sdpa_D"):
                passes = 2                                     # q·kᵀ and p·v at depth D: twice a pass's FLOPs
            row["tflops"][arm] = passes * flops_pass / (med * 1e-3) / 1e12
        for work in ("one_pass_work", "two_pass_work"):
            best = [(row["ms"][a]["median"], a) for a in row["ms"] if a.startswith(work)]
            if best:
                row[f"best_{work}"] = dict(ms=min(best)[0], backend=min(best)[1].split("_")[-1])
        ms = {a: row["ms"][a]["median"] for a in row["ms"]}
        if "best_two_pass_work" in row:
            row["ours / two-pass work"] = ms["ours"] / row["best_two_pass_work"]["ms"]
        if "best_one_pass_work" in row:
            row["ours_lse / one-pass work"] = ms["ours_lse"] / row["best_one_pass_work"]["ms"]
        if "sdpa_D" in ms:
            row["ours / sdpa_D"] = ms["ours"] / ms["sdpa_D"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ms"}), flush=True)
        print({a: round(v, 4) for a, v in ms.items()}, flush=True)
        with open(path, "w") as f:
            json.dump(dict(env=bk.env_info(), alternations=ALTERNATIONS, rows=rows), f, indent=1)
        del q, k, v, lse, arms
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
