"""A/B/C in one run (issue 19): the product's row pass of long causal prompts as kernels/colreduce_ws.py's
warp-specialised Gluon kernel (K_WS) against the Triton row pass with TMA key tiles (K_TMA) and with pointer loads,
same process, same inputs, alternated three times per shape, with SDPA's forward timed in the same loop.

Shapes: full causal 32/8 fp16 D 128 at 2k (below _WS_MIN_M: the Gluon arm lowers it, to see whether the threshold
could come down), 4k, 8k, 16k, and a varlen batch of two full causal prompts (4k, 8k), all colreduce(..., "sum",
group mean) as the serving path calls it; gpu ms, e2e ms and host µs (benchmarks/kernels.py time3). Each Gluon arm
checks that the Gluon kernel really ran (a counted _ws_launch on the JIT path, and the direct path's launcher), so
the A/B cannot compare the Triton pass with itself; each shape records the largest relative difference between the
arms' outputs.

    python benchmarks/ws_ab.py --out DIR     # GPU (sm_90): DIR/ws_ab.json
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tma_ab import _cases, _setup  # noqa: E402

ARMS = {"gluon ws": (True, True), "triton tma": (False, True), "triton pointer": (False, False)}   # K_WS, K_TMA


def main(argv=None):
    bk, kmod, flush, record = _setup(__doc__, "ws_ab.json", argv)
    before = kmod.K_WS, kmod.K_TMA, kmod._WS_MIN_M, kmod._ws_launch
    ran = []

    def counted(*a):
        ran.append(before[3](*a))
        return ran[-1]
    kmod._ws_launch = counted
    try:
        for name, k, max_m, fn in _cases((2048, 4096, 8192, 16384)):
            kmod._WS_MIN_M = min(before[2], max_m)
            Hq = 32
            qs = torch.randn(k.shape[0] if k.dim() == 4 else 1, Hq, max_m, 128, device="cuda", dtype=torch.float16)
            ks = torch.randn(qs.shape[0], 8, max_m, 128, device="cuda", dtype=torch.float16)
            vs = torch.randn_like(ks)
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,  # noqa: E731
                                                                            enable_gqa=True)
            outs = {}
            for rep in range(3):
                for arm, (ws, tma) in ARMS.items():
                    kmod.K_WS, kmod.K_TMA = ws, tma
                    ran.clear()
                    kmod._direct_launchers.clear()         # this call takes the JIT path (a counted _ws_launch)
                    outs[arm] = fn()
                    assert ws == (bool(ran) and all(ran)), (name, arm, "the Gluon kernel ran" if ran else "did not run")
                    # and the direct path that time3 times launches it too
                    assert [v.ws is not None for v in kmod._direct_launchers.values()] == [ws], (name, arm)
                    t = bk.time3(fn, flush)
                    record(dict(shape=name, arm=arm, rep=rep, gpu_ms=t["gpu_ms"], e2e_ms=t["e2e_ms"],
                                host_us=t["host_us"]))
                record(dict(shape=name, arm="SDPA forward (max_m × max_m, 32/8)", rep=rep,
                            gpu_ms=bk.time3(sdpa, flush)["gpu_ms"]))
            base = outs["triton pointer"]
            record(dict(shape=name, rel_diff_vs_triton_pointer={
                arm: ((o - base).norm() / base.norm()).item() for arm, o in outs.items()}))
            del qs, ks, vs
    finally:
        kmod.K_WS, kmod.K_TMA, kmod._WS_MIN_M, kmod._ws_launch = before


if __name__ == "__main__":
    main()
