"""A compiled Triton (or Gluon) kernel launched without Triton's Python around the launch: the one place that knows
how each Triton release's launcher is called.

colreduce.py's direct path and colreduce_ws.py launch a signature's compiled kernel again and again, with the
arguments CompiledKernel.run takes. That is a CudaLauncher, whose __call__ (Python, on every launch) defines a
closure, asks two allocators for scratch the kernels here never use, and then calls Triton's C launch function with
its own fields added. Calling that C function directly with the same arguments saves that Python: on the H200's host an
empty kernel took 6.40 µs a launch this way against 7.51 through CompiledKernel.run (benchmarks/host_parts.py,
thirty-second session, Triton 3.6). The C function's arguments differ between releases, read from their sources:

- 3.6 (the H200 image's): launch(gx, gy, gz, stream, function, cooperative, pdl, global_scratch, profile_scratch,
  kernel_metadata, launch_metadata, enter_hook, exit_hook, *kernel_args) — a launcher generated per signature;
- 3.7 (vLLM 0.32's): launch(gx, gy, gz, stream, function, cooperative, pdl, kernel_metadata, launch_metadata,
  enter_hook, exit_hook, global_scratch, profile_scratch, arg_annotations, kernel_signature, kernel_args) — one
  generic launcher, the kernel's arguments as one tuple.

Where `launch` is Triton's tensor-descriptor wrapper (a kernel with a descriptor argument) it takes the same
arguments. The launch hooks: both releases keep them as HookChain objects, never None, so the C function calls the
enter and the exit chain on every launch, empty or not (~0.3 µs a launch in a timeit of the two calls here). An
empty chain is passed as None (which the C function skips), checked at each launch, so a hook registered later (a
profiler's) is still called.
Any other release, another launcher class or a kernel that needs scratch: CompiledKernel.run as before.
tests/test_colreduce_launch.py checks, on the CPU with a recording C function, that each form passes exactly what
CudaLauncher.__call__ would."""
from __future__ import annotations

import triton

# Triton releases under which CompiledKernel.run, called as the direct path calls it, was checked against the JIT
# dispatch on the H200 (test_direct_launch_matches_jit_dispatch under 3.6, 3.7.1 and 3.8.0): colreduce.py's
# default launch variant is "direct" under these only
DIRECT_CHECKED = ("3.6.", "3.7.", "3.8.")
RAW_FORMS = {"3.6.": "flat", "3.7.": "tuple"}     # Triton release → how its C launch takes the kernel's arguments


def _is_cuda_launcher(run) -> bool:
    try:
        from triton.backends.nvidia.driver import CudaLauncher
    except ImportError:
        return False
    return isinstance(run, CudaLauncher)


def _form(version: str) -> str | None:
    return next((form for prefix, form in RAW_FORMS.items() if version.startswith(prefix)), None)


def compiled_launch(compiled, version: str = triton.__version__):
    """launch(gx, gy, gz, stream, *args) for a compiled kernel, args all its arguments in order (constexprs
    included, as CompiledKernel.run takes them), with the launch hooks as they are now; None without Triton's
    CompiledKernel fields (then the caller stays on the JIT dispatch)."""
    try:
        from triton import knobs
        run, function, meta = compiled.run, compiled.function, compiled.packed_metadata
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    except Exception:  # noqa: BLE001 (an unknown Triton: stay on the JIT dispatch)
        return None
    form = _form(version)
    if (form is None or not _is_cuda_launcher(run) or getattr(run, "global_scratch_size", 1)
            or getattr(run, "profile_scratch_size", 1)):
        def launch(gx, gy, gz, stream, *args):
            run(gx, gy, gz, stream, function, meta, None, enter, leave, *args)
        return launch
    raw, coop, pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl
    # the chains' hook lists (mutated in place by add/remove), None for a hook that is not a HookChain
    ec, xc = getattr(enter, "calls", None), getattr(leave, "calls", None)
    if form == "flat":
        def launch(gx, gy, gz, stream, *args):
            raw(gx, gy, gz, stream, function, coop, pdl, None, None, meta, None, enter if ec is None or ec else None,
                leave if xc is None or xc else None, *args)
        return launch
    annotations, signature = run.arg_annotations, run.kernel_signature

    def launch(gx, gy, gz, stream, *args):
        raw(gx, gy, gz, stream, function, coop, pdl, meta, None, enter if ec is None or ec else None,
            leave if xc is None or xc else None, None, None, annotations, signature, args)
    return launch
