"""The shared top-k (policies._top_k) against candidate replacements, on the shapes the vLLM plugin selects at:
per layer (1, 8, P) for one prompt, (4, 8, 8k) for four, and per step (32 layers stacked, the experiment of
prune_path.py). An experiment for issue 19 / 16: the 2026-12-01 profile of the per-layer path (sixth visit,
h200_kernels/prune_path_profile.txt) has aten::sort at 47% of its GPU time.

_top_k sorts a float64 key (the token groups folded into the score: protected +inf, padding −inf, NaN above +inf)
with a stable sort, then sorts the kept positions. The candidates fold the same order into one int64 per token, so
the keys are unique and need no stable sort:
    key = group << 61 | order-preserving int32 of the float32 score (+2^31) << 29 | (2^29 − 1 − index)
(group 2 protected, 1 scored, 0 padding; only scored tokens carry their score; −0.0 equals +0.0; every NaN sorts
above +inf: the order _top_k documents). Descending key order is _top_k's priority order, ties to the lower index.
    packed+sort   torch.sort of the int64 keys, then the kept positions sorted (2 sorts, like _top_k)
    packed+topk   torch.topk(kmax, sorted=True) of the int64 keys, then the kept positions sorted
    float32 sort  timing only, not exact (a float32 key cannot hold the groups apart from ±inf/NaN scores): the
                  cost of a 32-bit radix sort with the index payload, for scale
Each exact candidate is checked bitwise against _top_k on the device first, on scores with many ties, NaN, ±inf,
−0.0 and requests of different lengths and keeps. Prompts up to 2^29 tokens.

    python benchmarks/select_variants.py --out out/        # GPU: timings; CPU: the equality checks only
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

INDEX_BITS = 29


def packed_base(layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Once per step: (base (B, 1, N) int64 = group << 61 | (2^29 − 1 − index), scored (B, 1, N) bool)."""
    n = layout.lo.shape[-1]
    protected = layout.lo == float("inf")
    scored = (layout.lo != float("inf")) & (layout.lo != float("-inf"))
    group = protected.long() * 2 + scored.long()
    idx = torch.arange(n, device=layout.lo.device)
    return (group << 61) | ((1 << INDEX_BITS) - 1 - idx), scored


def packed_key(scores: torch.Tensor, base: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    x = scores.float() + 0.0                                  # −0.0 → +0.0
    b = x.view(torch.int32)
    k = torch.where(b < 0, b ^ 0x7FFFFFFF, b)                 # float order as signed int32 (NaN by sign: fixed next)
    k = torch.where(torch.isnan(x), torch.iinfo(torch.int32).max, k)
    part = (k.long() + (1 << 31)) << INDEX_BITS               # < 2^61
    return torch.where(scored, part, 0) + base


def _kept_positions(key_top: torch.Tensor, layout, n: int) -> torch.Tensor:
    order = ((1 << INDEX_BITS) - 1) - (key_top & ((1 << INDEX_BITS) - 1))
    pos = torch.sort(order.masked_fill(layout.dropped, n), dim=-1).values
    return pos.masked_fill_(layout.dropped, -1)


def top_k_packed_sort(scores, layout, base, scored):
    key = packed_key(scores, base, scored)
    top = torch.sort(key, dim=-1, descending=True).values[..., : layout.kmax]
    return _kept_positions(top, layout, scores.shape[-1])


def top_k_packed_topk(scores, layout, base, scored):
    key = packed_key(scores, base, scored)
    top = torch.topk(key, layout.kmax, dim=-1, sorted=True).values
    return _kept_positions(top, layout, scores.shape[-1])


def float32_sort(scores, layout):
    """Timing reference only (not exact): a stable sort of a float32 key with the index payload."""
    key = torch.fmin(torch.clamp(scores.float(), layout.lo.float(), layout.hi.float()), layout.cap.float())
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., : layout.kmax]
    pos = torch.sort(order.masked_fill(layout.dropped, scores.shape[-1]), dim=-1).values
    return pos.masked_fill_(layout.dropped, -1)


def make_case(policy, lengths, n_max, heads, device, layers=None, seed=0, ties=None):
    """Scores (B or layers×B, H, n_max) and the step's layout for requests of `lengths`. ties: None (distinct
    random scores), "coarse" (16 levels: many exact ties, plus NaN of both signs, ±inf and −0.0) or "zeros"
    (mostly +0.0 and −0.0, so the kept/dropped boundary falls inside a tie between the two zeros, and −NaN)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = len(lengths)
    shape = ((layers,) if layers else ()) + (B, heads, n_max)
    s = torch.rand(shape, generator=g)
    if ties == "coarse":
        s = torch.floor(s * 16) / 16
        flat = s.view(-1)
        pick = torch.randint(0, flat.numel(), (72,), generator=g)
        flat[pick[:8]] = float("nan")
        flat[pick[8:16]] = -float("nan")
        flat[pick[16:32]] = float("inf")
        flat[pick[32:40]] = float("-inf")
        flat[pick[40:56]] = -0.0
    elif ties == "zeros":
        s = torch.where(s < 0.05, s, torch.where(s < 0.5, 0.0, -0.0))
        flat = s.view(-1)
        flat[torch.randint(0, flat.numel(), (8,), generator=g)] = -float("nan")
    keeps = [policy.keep_count(n) for n in lengths]
    lens = torch.tensor(lengths, device=device)
    layout = policy.selection_layout(lens, torch.tensor(keeps, device=device), n_max, max(keeps))
    return s.to(device), layout


def check(policy, device) -> dict:
    from colreduce_kvprune.policies import _top_k
    out = {}
    cases = {"one request 4096": ([4096], 4096, None), "three of 1000/3000/777": ([1000, 3000, 777], 3000, None),
             "stacked 4 layers × 2 requests": ([2048, 1500], 2048, 4)}
    for name, (lengths, n_max, layers) in cases.items():
        for seed in range(3):
            for ties in (None, "coarse", "zeros"):
                s, layout = make_case(policy, lengths, n_max, 8, device, layers, seed, ties)
                want = _top_k(s, layout)
                base, scored = packed_base(layout)
                for vname, fn in (("packed+sort", top_k_packed_sort), ("packed+topk", top_k_packed_topk)):
                    got = fn(s, layout, base, scored)
                    ok = got.shape == want.shape and torch.equal(got, want)
                    out[f"{vname}: {name}"] = out.get(f"{vname}: {name}", True) and bool(ok)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                                     "snapkv.yaml"))
    a = p.parse_args(argv)
    from colreduce_kvprune.config import load_config
    from colreduce_kvprune.policies import _top_k, get_policy

    policy = get_policy(load_config(a.config))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "config": os.path.basename(a.config), "equal_to_top_k": check(policy, device), "timings": []}
    print(json.dumps(report["equal_to_top_k"], indent=1), flush=True)
    if device == "cuda":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # also under python -P
        from prune_path import _bench_kernels                               # benchmarks/kernels.py's timers

        bk = _bench_kernels()
        flush = bk._flush_buffer()
        shapes = [("1 × 8k", [8192], 8192, None), ("4 × 8k", [8192] * 4, 8192, None), ("1 × 16k", [16384], 16384, None),
                  ("1 × 32k", [32768], 32768, None), ("1 × 128k", [131072], 131072, None),
                  ("step: 32 layers × 1 × 8k", [8192], 8192, 32), ("step: 32 layers × 1 × 32k", [32768], 32768, 32)]
        for name, lengths, n_max, layers in shapes:
            s, layout = make_case(policy, lengths, n_max, 8, device, layers)
            base, scored = packed_base(layout)
            variants = {"_top_k (float64 stable sort)": lambda: _top_k(s, layout),
                        "packed+sort": lambda: top_k_packed_sort(s, layout, base, scored),
                        "packed+topk": lambda: top_k_packed_topk(s, layout, base, scored),
                        "float32 stable sort (not exact)": lambda: float32_sort(s, layout),
                        "packed key alone": lambda: packed_key(s, base, scored)}
            row = {"shape": name}
            for vname, fn in variants.items():
                row[vname] = bk.time3(fn, flush)
            report["timings"].append(row)
            print(name + "  " + "  ".join(f"{k}: {v['gpu_ms']:.3f}/{v['e2e_ms']:.3f} ms {v['host_us']:.0f} µs"
                                          for k, v in row.items() if k != "shape"), flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "select_variants.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(report["equal_to_top_k"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
