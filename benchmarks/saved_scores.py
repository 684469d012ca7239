"""A/B in one run (issue 19): the saved-scores column pass (kernels/colreduce.py SAVE_SCORES: the row pass also
stores its fp32 scores, _saved_column_kernel reduces them) against the window kernel's second read of K, same
process, same inputs, alternated three times per shape.

Where a kv group has few query rows (windows of 1–4 queries at GQA 4, D 128), the two passes each read all of K
while the scores are a small fraction of its bytes (G·M·4 against D·2 per key and kv head: 1/16 at one query of
GQA 4): the sweep had ours at about two reads of K there (window 1, 32/8, 128k: 0.165 ms, a read of K 0.079), and
SDPA's forward faster. The saved scores make it one read of K plus the scores written and read once.

Beside it: SDPA's forward as the sweep times it (the keys passed as the values too, so it reads K once) and with
values of their own (what an attention layer reads), and a read of K. Each shape checks that the saved path is
really taken (the recipe's SAVE) and records the relative difference of the two arms' outputs.

    python benchmarks/saved_scores.py --out DIR     # GPU: DIR/saved_scores.json
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tma_ab import _setup  # noqa: E402

# (N, window, Hq, Hkv, dtype): window 1 over the sweep's lengths, windows 2 and 4, MHA, bf16
SHAPES = [(512, 1, 32, 8, torch.float16), (2048, 1, 32, 8, torch.float16), (8192, 1, 32, 8, torch.float16),
          (32768, 1, 32, 8, torch.float16), (131072, 1, 32, 8, torch.float16), (131072, 2, 32, 8, torch.float16),
          (131072, 4, 32, 8, torch.float16), (32768, 1, 32, 32, torch.float16), (131072, 1, 32, 8, torch.bfloat16)]


def main(argv=None):
    bk, kmod, flush, record = _setup(__doc__, "saved_scores.json", argv)
    from colreduce_kvprune import colreduce
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        for N, W, Hq, Hkv, dt in SHAPES:
            torch.manual_seed(0)
            q = torch.randn(1, Hq, W, 128, device="cuda", dtype=dt)
            k = torch.randn(1, Hkv, N, 128, device="cuda", dtype=dt)
            v = torch.randn_like(k)
            shape = f"win{W} {Hq}/{Hkv} N={N} {str(dt)[6:]}"
            kmod.set_saved_scores(True)                # (the previous shape's last arm turned it off)
            cfg = kmod._recipe(W, N, 128, Hq // Hkv, 1, Hkv, True, kmod._VARIANT, sms, "sum", "mean", False, False,
                               1, dt, False, False)[0]
            assert cfg.get("SAVE"), (shape, "the product does not save the scores here")
            fn = lambda: colreduce(q, k, "sum", is_causal=True, group_reduce="mean")  # noqa: E731
            outs = {}
            for rep in range(3):
                for on in (True, False):
                    kmod.set_saved_scores(on)
                    outs[on] = fn()
                    t = bk.time3(fn, flush)
                    record(dict(shape=shape, arm="saved" if on else "window kernel", rep=rep, gpu_ms=t["gpu_ms"],
                                e2e_ms=t["e2e_ms"], host_us=t["host_us"]))
            record(dict(shape=shape, rel_diff_saved_vs_window=((outs[True] - outs[False]).norm()
                                                               / outs[False].norm()).item()))
            for name, f in (("sdpa (v = k)", lambda: sdpa(q, k, k, enable_gqa=Hq != Hkv)),
                            ("sdpa", lambda: sdpa(q, k, v, enable_gqa=Hq != Hkv)),
                            ("read of K (sum)", lambda: k.sum(dtype=torch.float32))):
                t = bk.time3(f, flush)
                record(dict(shape=shape, arm=name, gpu_ms=t["gpu_ms"], e2e_ms=t["e2e_ms"]))
    finally:
        kmod.set_saved_scores(True)


if __name__ == "__main__":
    main()
