"""The scoring kernels compile for Hopper (sm_90) under the installed Triton, with the constexprs and tiles the
product launches on an H200-sized GPU (132 SMs) at serving shapes — without a GPU: Triton lowers them to PTX and its
bundled ptxas assembles the cubin, which needs no driver. The core suite runs under TRITON_INTERPRET=1, where the
kernels are interpreted and never compiled; this catches a kernel that a Triton release no longer compiles (CI
installs Triton 3.7.1, the version vLLM 0.32 pins) before a GPU run does. It runs in a subprocess, since the
interpreter replaces triton.jit at import time. What it cannot tell: whether the compiled kernels are right (the
GPU kernel tests) or fast (benchmarks/)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

# (name, max_m, max_n, D, G, B, Hkv, is_causal, reduction, group_reduce, varlen, paged, page, dtype, lse_given)
LAUNCHES = [
    ("window 64, 32/8, 128k (persistent column pass)", 64, 131072, 128, 4, 1, 8, True, "sum", "mean", False, False, 1,
     "float16", False),
    ("full causal 32/8 16k (long column pass, head split)", 16384, 16384, 128, 4, 1, 8, True, "sum", "mean", False,
     False, 1, "float16", False),
    ("full causal 32/8 4k bf16 (64-row row tiles)", 4096, 4096, 128, 4, 1, 8, True, "sum", "mean", False, False, 1,
     "bfloat16", False),
    ("paged 4 prompts to 32k, window 64, per head", 64, 32768, 128, 4, 4, 8, True, "mean", None, True, True, 16,
     "float16", False),
    ("varlen, full causal 2k, max over heads, fp32", 2048, 2048, 64, 2, 3, 4, True, "max", "max", True, False, 1,
     "float32", False),
    ("window 16 with the lse given", 16, 8192, 128, 4, 1, 8, True, "sum", "mean", False, False, 1, "float16", True),
]


def _compile_all() -> list[dict]:
    """Compile each launch's row and column kernels for sm_90 (run with TRITON_INTERPRET unset)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import colreduce_kvprune.kernels.colreduce as kmod

    kmod._interpreting = lambda: False                 # the GPU's tiles, as _gpu_like_config in the launch tests
    elem = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    done = []
    for name, max_m, max_n, D, G, B, Hkv, causal, red, group, varlen, paged, page, dtype, lse_given in LAUNCHES:
        cfg, *_, row_kw, col_kw, final, hs = kmod._recipe(max_m, max_n, D, G, B, Hkv, causal, "direct", 132, red,
                                                          group, varlen, paged, page, getattr(torch, dtype), False,
                                                          lse_given)
        kernels = [(kmod._window_column_kernel if cfg["WINDOW"] else kmod._long_column_kernel, col_kw)]
        if not lse_given:
            kernels.insert(0, (kmod._row_stats_kernel, row_kw))
        for fn, kw in kernels:
            const = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
            sig = {}
            for arg in fn.arg_names:
                if arg in const:
                    sig[arg] = "constexpr"
                elif arg in ("Q", "K"):
                    sig[arg] = "*" + elem[dtype]
                elif arg in ("BT", "cu_q", "cu_k", "Counter"):
                    sig[arg] = "*i32"
                elif arg in ("M_part", "L_part", "LSE2", "Out", "Part"):     # float32 buffers
                    sig[arg] = "*fp32"
                else:
                    sig[arg] = "fp32" if arg == "qk_scale" else "i32"
            missing = set(const) - set(fn.arg_names)
            assert not missing, (fn.__name__, missing)
            src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=kw["num_warps"], num_stages=kw["num_stages"]))
            assert compiled.asm.get("cubin"), (name, fn.__name__, "no cubin")
            done.append(dict(launch=name, kernel=fn.__name__, cubin_bytes=len(compiled.asm["cubin"]),
                             tiles={k: kw[k] for k in kw if k.startswith("BLOCK") or k.startswith("num_")}))
    return done


@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}),
                    reason="this Triton has no NVIDIA backend to compile with")
def test_kernels_compile_for_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = sum(2 if not launch[-1] else 1 for launch in LAUNCHES)
    assert len(done) == expected, done
    assert {d["kernel"] for d in done} == {"_row_stats_kernel", "_window_column_kernel", "_long_column_kernel"}


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
