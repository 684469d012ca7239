"""Where the host time of a call goes (issue 19: ≤ 30 µs per call), at the shapes where it is furthest off: the
long causal prompts, whose row pass is colreduce_ws.py's Gluon kernel on sm_90 (78–115 µs per call in the
twenty-second session's sweep, against 58–90 for the same shapes with the Triton row pass, and ~30 elsewhere).

Per shape (full causal 32/8 fp16 D 128 at 4k, dense, and a varlen batch of two prompts, 4k + 8k): the CPU µs per
call (benchmarks/kernels.py host_blocks: the device kept busy, so no launch waits) of
- the whole call with the Gluon row pass (K_WS) and with the Triton row pass;
- colreduce_ws.launch alone (the JIT path's first launch of a signature), the direct path's launcher
  (colreduce_ws.direct_launcher) alone, and launch's pieces: the 2-D views (_matrix), the signature, and Triton's
  per-launch conversion of the two descriptors (make_tensordesc_arg: the CUtensorMap encodes);
- an empty Triton kernel through its compiled launcher (the floor of one launch on this host);
and a cProfile of 300 whole calls each way (the functions with the most own time), so the parts not listed show.
Then the Triton path's parts at three shapes, and a window of 64 over 512 keys both as two passes and as the one-launch
kernel (set_fused_windows), alternated twice.

    python benchmarks/host_parts.py --out DIR     # GPU (sm_90): DIR/host_parts.json, DIR/host_parts_profile.txt
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tma_ab import _cases, _setup  # noqa: E402


@triton.jit
def _empty_kernel(X, n):
    pass


def main(argv=None):
    bk, kmod, flush, record = _setup(__doc__, "host_parts.json", argv)
    from colreduce_kvprune.kernels import colreduce_ws as wmod
    import triton.backends.nvidia.driver as drv
    x = torch.zeros(16, device="cuda")
    compiled = _empty_kernel[(1, )](x, 1)
    run, function, meta = compiled.run, compiled.function, compiled.packed_metadata
    stream = torch._C._cuda_getCurrentRawStream(0)

    def empty():
        run(1, 1, 1, stream, function, meta, None, None, None, x, 1)

    def us(fn, est_ms=0.05):
        fn()
        torch.cuda.synchronize()
        blocks = bk.host_blocks(fn, est_ms, host_calls=200)
        return dict(host_us=round(blocks[2], 2), host_us_min=round(blocks[0], 2))

    record(dict(part="empty Triton kernel, compiled launcher", **us(empty)))
    from colreduce_kvprune.kernels.launch import compiled_launch
    raw = compiled_launch(compiled)
    record(dict(part="empty Triton kernel, Triton's C launch (launch.compiled_launch, the direct path's)",
                **us(lambda: raw(1, 1, 1, stream, x.data_ptr(), 1))))
    before = kmod.K_WS, wmod.launch, drv.make_tensordesc_arg
    seen = {}

    def spy_launch(*a):
        seen["launch"] = a
        return before[1](*a)

    def spy_desc(arg, metadata):
        seen.setdefault("descs", []).append((arg, metadata))
        return before[2](arg, metadata)
    try:
        for name, k, max_m, fn in _cases((4096, )):    # full causal 4k, then the varlen batch 4k + 8k
            for ws in (True, False):
                kmod.K_WS = ws
                fn()
                torch.cuda.synchronize()
                t = bk.time3(fn, flush)
                record(dict(shape=name, part=f"whole call, {'Gluon' if ws else 'Triton'} row pass",
                            gpu_ms=t["gpu_ms"], **us(fn, t["gpu_ms"])))
            kmod.K_WS = True
            wmod.launch, drv.make_tensordesc_arg = spy_launch, spy_desc
            seen.clear()
            kmod._direct_launchers.clear()                 # the JIT path: it calls colreduce_ws.launch
            fn()
            wmod.launch, drv.make_tensordesc_arg = before[1], before[2]
            torch.cuda.synchronize()
            a = seen.get("launch")
            if a is None:
                record(dict(shape=name, error="the Gluon row pass did not run"))
                continue
            q, kk, lse2, cu_q, cu_k, mm, mn, B, scale, varlen = a
            record(dict(shape=name, part="colreduce_ws.launch alone (the JIT path's)", **us(lambda: wmod.launch(*a))))
            go = wmod.direct_launcher(q, kk, lse2, cu_q, cu_k, varlen)
            stream = torch._C._cuda_getCurrentRawStream(q.get_device())
            record(dict(shape=name, part="colreduce_ws.direct_launcher's launch alone (the direct path's)",
                        **us(lambda: go(q, kk, lse2.data_ptr(), cu_q, cu_k, mm, mn, B, scale, stream))))
            record(dict(shape=name, part="_matrix(q), _matrix(k)",
                        **us(lambda: (wmod._matrix(q, varlen), wmod._matrix(kk, varlen)))))
            record(dict(shape=name, part="_signature",
                        **us(lambda: wmod._signature(q, lse2, cu_q, cu_k, varlen))))
            q2, k2 = wmod._matrix(q, varlen), wmod._matrix(kk, varlen)
            record(dict(shape=name, part="two _Desc", **us(lambda: (
                wmod._Desc(q2, tuple(q2.shape), q2.stride()), wmod._Desc(k2, tuple(k2.shape), k2.stride())))))
            descs = seen.get("descs", [])
            if descs:
                record(dict(shape=name, part=f"make_tensordesc_arg × {len(descs)} (CUtensorMap encodes)",
                            **us(lambda: [before[2](d, m) for d, m in descs])))
            for ws in (True, False):
                kmod.K_WS = ws
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(300):
                    fn()
                prof.disable()
                torch.cuda.synchronize()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
                with open(os.path.join(_out(argv), "host_parts_profile.txt"), "a") as f:
                    f.write(f"== {name}, {'Gluon' if ws else 'Triton'} row pass, 300 calls\n{s.getvalue()}\n")
        kmod.K_WS = False
        _launch_parts(bk, kmod, record)
    finally:
        kmod.K_WS, wmod.launch, drv.make_tensordesc_arg = before


def _launch_parts(bk, kmod, record):
    """The Triton path's host µs, whole and in parts (K_WS off), at a window and at full causal 512 and 4k."""
    from colreduce_kvprune import colreduce
    dev, f16 = "cuda", torch.float16
    for name, M, N in (("win64 32/8 N=8192", 64, 8192), ("full 32/8 N=512", 512, 512),
                       ("full 32/8 N=4096", 4096, 4096)):
        q = torch.randn(1, 32, M, 128, device=dev, dtype=f16)
        k = torch.randn(1, 8, N, 128, device=dev, dtype=f16)
        fn = lambda q=q, k=k: colreduce(q, k, "sum", is_causal=True, group_reduce="mean")  # noqa: E731
        tri = lambda q=q, k=k: kmod.colreduce_triton(q, k, "sum", is_causal=True,  # noqa: E731
                                                      scale=128 ** -0.5, group_reduce="mean")
        fn()
        torch.cuda.synchronize()
        kmod._direct_launchers.clear()
        tri()
        tri()
        torch.cuda.synchronize()
        (ck, fast), = kmod._direct_launchers.items()
        got = {}

        def spy(part, f):
            def call(*a):
                got[part] = a
                return f(*a)
            return call
        kmod._direct_launchers[ck] = fast._replace(
            row=spy("row", fast.row) if fast.row else None, col=spy("col", fast.col))
        held = tri()                           # the spied launches' output (and placeholders), alive while timed
        kmod._direct_launchers[ck] = fast
        torch.cuda.synchronize()
        # the direct path passes every tensor as its address; the same launches with q, k and the output passed as
        # tensors (as before 2026-12-04): Triton's launcher then calls data_ptr() and cuPointerGetAttribute on each
        tensors = {q.data_ptr(): q, k.data_ptr(): k, held.data_ptr(): held}

        def as_tensors(stream, pointers, qk_scale):
            return stream, tuple(tensors.get(p, p) if type(p) is int else p for p in pointers), qk_scale
        row_t = as_tensors(*got["row"]) if "row" in got else None
        col_t = as_tensors(*got["col"])
        for part, f in (("whole call (ops.colreduce)", fn), ("colreduce_triton alone", tri),
                        ("the row pass's compiled launch alone", (lambda: fast.row(*got["row"])) if "row" in got
                         else None),
                        ("the row pass's compiled launch, tensors as tensors", (lambda: fast.row(*row_t)) if row_t
                         else None),
                        ("the column pass's compiled launch alone", lambda: fast.col(*got["col"])),
                        ("the column pass's compiled launch, tensors as tensors", lambda: fast.col(*col_t)),
                        ("torch.empty of the output", lambda: torch.empty(1, 8, N, dtype=torch.float32, device=dev)),
                        ("_scratch", lambda: kmod._scratch(fast.n_scratch, fast.n_count, q.device, 0,
                                                          torch._C._cuda_getCurrentRawStream(0)))):
            if f is not None:
                f()
                torch.cuda.synchronize()
                blocks = bk.host_blocks(f, 0.05, host_calls=200)
                record(dict(shape=name, part=part, host_us=round(blocks[2], 2), host_us_min=round(blocks[0], 2)))
    # a short window both ways: two passes (two launches) and the one-launch kernel (kernels/colreduce.py
    # set_fused_windows), whole calls, so the launch it saves shows in host time
    q = torch.randn(1, 32, 64, 128, device=dev, dtype=f16)
    k = torch.randn(1, 8, 512, 128, device=dev, dtype=f16)
    default = kmod.FUSED_WINDOWS
    try:
        for fused in (False, True, False, True):
            kmod.set_fused_windows(fused)
            fn = lambda: colreduce(q, k, "sum", is_causal=True, group_reduce="mean")  # noqa: E731
            fn()
            fn()
            torch.cuda.synchronize()
            blocks = bk.host_blocks(fn, 0.05, host_calls=200)
            record(dict(shape="win64 32/8 N=512", part="whole call (ops.colreduce), " +
                        ("one launch (set_fused_windows)" if fused else "two passes"),
                        host_us=round(blocks[2], 2), host_us_min=round(blocks[0], 2)))
    finally:
        kmod.set_fused_windows(default)


def _out(argv):
    args = list(sys.argv[1:] if argv is None else argv)
    return args[args.index("--out") + 1] if "--out" in args else "out"


if __name__ == "__main__":
    main()
