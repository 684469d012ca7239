"""serving.TritonCompiles (Triton JIT compiles during a serving run) and benchmarks/serving_gpu.slow_steps (the
run's longest engine steps and the compiles inside them)."""
import os
import sys
import time

import pytest
import torch

from colreduce_kvprune.serving import TritonCompiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
knobs = pytest.importorskip("triton.knobs")


class _Fn:
    def __init__(self, name):
        self.name = name


def _compile(name, seconds):
    """What JITFunction._do_compile does around a compile: the cache hook, the compile, the post-compile hook, with
    one key object for both."""
    key, rt = object(), knobs.runtime
    skipped = rt.jit_cache_hook(key=key, repr=name, fn=_Fn(name), compile={"key": key}, is_manual_warmup=False,
                                already_compiled=False) if rt.jit_cache_hook else None
    if skipped:
        return
    time.sleep(seconds)
    if rt.jit_post_compile_hook:
        rt.jit_post_compile_hook(key=key, repr=name, fn=_Fn(name), compile={"key": key}, is_manual_warmup=False,
                                 already_compiled=False)


def test_records_each_compile_chains_and_restores_the_hooks():
    calls = []
    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    knobs.runtime.jit_cache_hook = lambda **kw: calls.append(("cache", kw["fn"].name))
    knobs.runtime.jit_post_compile_hook = lambda **kw: calls.append(("post", kw["fn"].name))
    try:
        installed = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
        with TritonCompiles() as rec:
            t0 = time.perf_counter()
            _compile("first", 0.02)
            _compile("second", 0.0)
        _compile("after", 0.0)
        assert rec.available
        got = rec.since(t0)
        assert [e["kernel"] for e in got] == ["first", "second"]
        assert got[0]["s"] >= 0.02 and 0 <= got[0]["t"] < got[1]["t"]
        # the hooks already set still ran, in order, and are back in place afterwards
        assert calls == [("cache", "first"), ("post", "first"), ("cache", "second"), ("post", "second"),
                         ("cache", "after"), ("post", "after")]
        assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == installed
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real Triton compile needs CUDA")
def test_records_a_real_compile():
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(x_ptr, value, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, value, mask=offs < n)

    x = torch.full((100,), float("nan"), device="cuda")
    with TritonCompiles() as rec:
        t0 = time.perf_counter()
        _fill[(1,)](x, 3.0, 100, BLOCK=128)
        _fill[(1,)](x, 4.0, 100, BLOCK=128)          # the same specialisation: no second compile
    torch.cuda.synchronize()
    assert (x == 4.0).all()
    got = rec.since(t0)
    assert [e["kernel"] for e in got] == ["_fill"] and got[0]["s"] > 0


def test_slow_steps_names_the_compiles_inside_each():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from serving_gpu import slow_steps
    finally:
        sys.path.pop(0)
    result = {"timeline": {"t": [0.0, 0.1, 0.2, 1.1, 1.2, 1.5], "running": [1, 1, 2, 3, 3, 4],
                           "generated": [0, 1, 1, 2, 3, 3]},
              "triton_compiles": [{"t": -5.0, "s": 1.0, "kernel": "at_start"}, {"t": 0.3, "s": 0.7, "kernel": "k"}]}
    got = slow_steps(result, n=2)
    assert [(round(s["t"], 3), round(s["s"], 3), s["running"], s["generated"]) for s in got] == [
        (0.2, 0.9, 3, 2), (1.2, 0.3, 4, 3)]
    assert [c["kernel"] for c in got[0]["compiles"]] == ["k"] and got[1]["compiles"] == []
