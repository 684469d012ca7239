"""A/B in one run (issue 19): short windows as two passes against the one-launch window kernel (kernels/colreduce.py
_fused_window_kernel; set_fused_windows switches between them, and it is the GPU default since the thirty-second
session's run of this script), same process, same inputs, alternated three times per shape, with NVIDIA's kernels
doing the same work timed beside them.

The serving sweep times the way ours does not take as a candidate (`ours_two_passes` or `ours_fused`: a config, so
the JIT dispatch and GPU time only).
This times both ways through the product's default entry (ops.colreduce / colreduce_varlen, the direct launch
path), so the launch it saves shows in e2e ms and host µs as well as gpu ms (benchmarks/kernels.py time3) — the
numbers a default needs. Shapes: the sweep's windows where the kernel applies on this GPU (_fused_tiles: N =
512–2048 at 8 kv heads), MHA 32, bf16 and a packed batch of two prompts; each case checks that the kernel is taken
(a launch of _fused_window_kernel recorded) and records the largest relative difference to the two passes.

    python benchmarks/fused_ab.py --out DIR     # GPU: DIR/fused_ab.json
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tma_ab import _setup  # noqa: E402

# (name, Hq, Hkv, M, N, dtype); dense B = 1, D 128, causal, sum over the window, mean over the group
SHAPES = [
    ("win1 32/8 N=512", 32, 8, 1, 512, torch.float16),
    ("win1 32/8 N=2048", 32, 8, 1, 2048, torch.float16),
    ("win16 32/8 N=512", 32, 8, 16, 512, torch.float16),
    ("win16 32/8 N=2048", 32, 8, 16, 2048, torch.float16),
    ("win64 32/8 N=512", 32, 8, 64, 512, torch.float16),
    ("win64 32/8 N=1024", 32, 8, 64, 1024, torch.float16),
    ("win64 32/8 N=2048", 32, 8, 64, 2048, torch.float16),
    ("win64 32/8 N=2048 bf16", 32, 8, 64, 2048, torch.bfloat16),
    ("win128 32/8 N=512", 32, 8, 128, 512, torch.float16),
    ("win128 32/8 N=1024", 32, 8, 128, 1024, torch.float16),
    ("win64 MHA32 N=512", 32, 32, 64, 512, torch.float16),
]


def _cases(bk, kmod):
    """(name, fits, fn, same-work fns) per shape: fits = _fused_tiles' answer on this GPU."""
    from colreduce_kvprune import colreduce, colreduce_varlen
    sms = kmod._sm_count(torch.cuda.current_device())
    for name, Hq, Hkv, M, N, dtype in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(1, Hq, M, 128, device="cuda", dtype=dtype)
        k = torch.randn(1, Hkv, N, 128, device="cuda", dtype=dtype)
        fits = kmod._fused_tiles(M, N, 128, Hq // Hkv, Hkv, sms, False, dtype.itemsize)
        yield name, fits, (lambda q=q, k=k: colreduce(q, k, "sum", is_causal=True, group_reduce="mean")), \
            bk._same_work_fns([(q, k)])
    lens, M = [512, 512], 64                          # a packed batch: two prompts' windows of 64 over 512 keys
    torch.manual_seed(0)
    q = torch.randn(2 * M, 32, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(sum(lens), 8, 128, device="cuda", dtype=torch.float16)
    cu_q = torch.tensor([0, M, 2 * M], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, 512, 1024], device="cuda", dtype=torch.int32)
    fits = kmod._fused_tiles(M, 512, 128, 4, 2 * 8, sms, False, 2)
    dense = [(q[:M].transpose(0, 1)[None], k[:512].transpose(0, 1)[None]),
             (q[M:].transpose(0, 1)[None], k[512:].transpose(0, 1)[None])]
    yield "varlen 2 x win64 32/8 N=512", fits, lambda: colreduce_varlen(
        q, k, cu_q, cu_k, "sum", max_seqlen_q=M, max_seqlen_k=512, is_causal=True, group_reduce="mean"), \
        bk._same_work_fns([(a.contiguous(), b.contiguous()) for a, b in dense])


def main(argv=None):
    bk, kmod, flush, record = _setup(__doc__, "fused_ab.json", argv)
    launched = []
    real = kmod._launch

    def spy(fn, grid, args, kw):
        launched.append(getattr(fn, "__name__", str(fn)))
        return real(fn, grid, args, kw)
    kmod._launch = spy
    default = kmod.FUSED_WINDOWS
    try:
        for name, fits, fn, same in _cases(bk, kmod):
            if not fits:
                record(dict(shape=name, skipped="_fused_tiles: not on this GPU"))
                continue
            outs = {}
            for rep in range(3):
                for fused in (False, True):
                    kmod.set_fused_windows(fused)
                    launched.clear()
                    outs[fused] = fn()                         # the first call of a signature: the JIT dispatch
                    if fused and "_fused_window_kernel" not in launched:
                        raise SystemExit(f"{name}: the one-launch kernel was not taken")
                    t = bk.time3(fn, flush)
                    record(dict(shape=name, fused=fused, rep=rep, gpu_ms=t["gpu_ms"], e2e_ms=t["e2e_ms"],
                                host_us=t["host_us"], block_n=fits))
            kmod.set_fused_windows(default)
            for arm, sfn in same.items():                     # NVIDIA's kernels doing the same work
                try:
                    t = bk.time3(sfn, flush)
                    record(dict(shape=name, arm=arm, gpu_ms=t["gpu_ms"], e2e_ms=t["e2e_ms"]))
                except Exception as e:  # noqa: BLE001 (a backend that refuses the shape: reported)
                    record(dict(shape=name, arm=arm, error=repr(e)[:200]))
            record(dict(shape=name, rel_diff_fused_vs_two_passes=((outs[True] - outs[False]).norm()
                                                                  / outs[False].norm()).item()))
    finally:
        kmod._launch = real
        kmod.set_fused_windows(default)


if __name__ == "__main__":
    main()
