"""The vLLM plugin's whole per-layer prune path (score, pool, top-k, gather, cache write) timed as one unit per
prompt length, against the same layer's attention forward (issue 19, part 3). GPU only; not run by CI.

It also times a whole step of 32 layers two ways (`step_variants`): the per-layer path 32 times, and the engine's
once-per-step selection (compaction.StepSelection: every layer's scores stacked, one selection after the last
layer, each layer's kept K/V read back from the paged cache); and the same two ways for a step that ends a chunked
prefill (`last_chunk_variants`: the last 2048 tokens of the prompt, the prompt's keys gathered back from the cache
per layer), the step that prunes in serving with chunked prefill.

It calls the plugin's own functions on plain torch tensors — no vLLM engine: `compaction.plan_prefills` (once per
step, host side: timed on its own), then per layer exactly what `PruneImplMixin._prune_compact` runs for a whole
prompt: `compaction.select_kept` (colreduce_varlen over the window + SnapKV pooling + the shared top-k),
`compaction.gather_kept`, and the cache write. The cache write is vLLM's `do_kv_cache_update` in the plugin (the
reshape_and_cache_flash op): here that op when vLLM is importable, else the same write as an index_copy_ into
the (num_blocks, block_size, Hkv, D) cache (said in the output). Layer: Llama-3.1-8B (32 q heads, 8 kv heads,
D 128, hidden 4096, MLP 14336), bf16, config configs/snapkv.yaml (window 32, keep 25%, max pooling 7).

The attention forward: flash-attn's varlen function if importable, else SDPA causal (K/V repeated to 32 heads
beforehand, so SDPA takes its FlashAttention kernel). The share is prune / attention forward, and prune / (attention
+ the layer's four linear matmuls, measured here): the layer's prefill time without norms and RoPE.

    python benchmarks/prune_path.py --out out/
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch



def _bench_kernels():
    """benchmarks/kernels.py as a module (never as a top-level `kernels`: transformers probes a package of that
    name)."""
    import importlib.util
    name = "colreduce_bench_kernels"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                          "kernels.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]

HQ, HKV, D, HIDDEN, MLP, LAYERS = 32, 8, 128, 4096, 14336, 32
ENGINE_STEP = f"step of {LAYERS} layers: once per step (StepSelection, the engine's CUDA path)"


def cache_writer():
    try:
        from vllm import _custom_ops as vops  # noqa: F401

        def write(k, v, key_cache, value_cache, slots):
            scale = torch.ones((), device=k.device)
            vops.reshape_and_cache_flash(k, v, key_cache, value_cache, slots, "auto", scale, scale)
        return write, "vLLM reshape_and_cache_flash"
    except Exception:  # noqa: BLE001
        def write(k, v, key_cache, value_cache, slots):
            block_size = key_cache.shape[1]
            key_cache[slots // block_size, slots % block_size] = k
            value_cache[slots // block_size, slots % block_size] = v
        return write, "indexed assignment into vLLM 0.32's CUDA cache layout (vLLM not importable)"


def attention_fn(q, k, v):
    """Causal prefill attention of one prompt: flash-attn varlen if importable, else SDPA (K/V pre-repeated)."""
    P = q.shape[0]
    try:
        from flash_attn import flash_attn_varlen_func
        cu = torch.tensor([0, P], device=q.device, dtype=torch.int32)
        return (lambda: flash_attn_varlen_func(q, k, v, cu, cu, P, P, causal=True)), "flash-attn varlen"
    except Exception:  # noqa: BLE001
        G = q.shape[1] // k.shape[1]
        qd = q.transpose(0, 1)[None].contiguous()
        kd = k.transpose(0, 1)[None].repeat_interleave(G, 1).contiguous()
        vd = v.transpose(0, 1)[None].repeat_interleave(G, 1).contiguous()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return (lambda: sdpa(qd, kd, vd, is_causal=True)), "SDPA causal (K/V repeated to 32 heads)"


def host_idle_us(fn, calls=20):
    """CPU wall time of one call with the device idle before it (synchronized first): the launch path's own host
    time, without the waits on a full launch queue that time3's host_us can include."""
    import time
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def peak_extra_mib(fn) -> float:
    """MiB allocated at the peak of one call of fn beyond what was allocated before it (its temporaries and
    outputs): the memory a step's pruning needs outside vLLM's profile."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def profile_table(fn, calls=20, rows=40) -> str:
    """torch.profiler over `calls` calls of fn: the aten ops and kernels by self CPU time (host cost per op)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _cached_finish(plan, table, key_cache, value_cache, write):
    """The engine's CUDA finish of a once-per-step selection: layer i's kept K/V read back from the paged cache
    (gather_kept_cached) and written to the compacted slots."""
    from colreduce_kvprune.vllm import compaction

    def finish(kept, i):
        k_sel, v_sel = compaction.gather_kept_cached(kept, i, table, (key_cache, value_cache))
        write(k_sel.contiguous(), v_sel.contiguous(), key_cache, value_cache, plan.slots)
    return finish


def cuda_caches(num_blocks, block_size, heads, d, dtype):
    """Key and value caches laid out as vLLM 0.32's FLASH_ATTN / TRITON_ATTN keep them on CUDA, (num_blocks, Hkv,
    block_size, 2·D) with keys then values along the last dim, seen as the plugin sees them (backend_cuda.py:
    (num_blocks, block_size, Hkv, D) views with rows 2·D apart)."""
    kv = torch.zeros(num_blocks, heads, block_size, 2 * d, device="cuda", dtype=dtype)
    return kv.transpose(1, 2).split(d, dim=-1)


def clone_caches(key_cache, value_cache):
    """Copies of the two caches with their strides (views of one copied buffer when they share one)."""
    base = key_cache._base
    if base is None or value_cache._base is not base:
        return key_cache.clone(), value_cache.clone()
    copy = base.clone()
    return tuple(copy.as_strided(c.shape, c.stride(), c.storage_offset()) for c in (key_cache, value_cache))


def _writes_the_same(variants, key_cache, value_cache) -> bool:
    """variants(kc, vc) -> (per_layer, per_step, ...) for one layer: whether all leave copies of the cache bitwise
    equal."""
    checks = []
    for variant in range(len(variants(key_cache, value_cache))):
        kc, vc = clone_caches(key_cache, value_cache)
        variants(kc, vc)[variant]()
        checks.append((kc, vc))
    return all(torch.equal(a, b) for other in checks[1:] for a, b in zip(checks[0], other))


def step_variants(policy, plan, query, key, value, table, block_size, key_cache, value_cache, write, layers, scale,
                  backend="auto"):
    """Two ways to prune one step of `layers` layers, both the engine's code:
    - per_layer: `layers` times select_kept, gather_kept and the write (what the engine does for steps that
      recompute outputs, or whose stacked scores exceed StepSelection.MAX_BYTES);
    - per_step: compaction.StepSelection, as the engine runs it on CUDA: layer_scores per layer into the stacked
      buffer, one selection after the last layer, then per layer the kept K/V read back from the paged cache
      (gather_kept_cached: vLLM has written the step's K/V there before the attention) and the write. Every layer
      here uses the same query/key and the same cache (the op counts and shapes are a real step's; the values
      repeat).
    Returns (per_layer, per_step): callables running one step each."""
    from colreduce_kvprune.vllm import compaction

    def per_layer():
        for layer in range(layers):
            idx = compaction.select_kept(policy, plan, query, key, layer=layer, scale=scale, backend=backend,
                                         nan_flags=[])
            k_sel, v_sel = compaction.gather_kept(plan, idx, key, value)
            write(k_sel.contiguous(), v_sel.contiguous(), key_cache, value_cache, plan.slots)

    nan = compaction.NanWatch()
    finish = _cached_finish(plan, table, key_cache, value_cache, write)

    def per_step():
        sel = compaction.StepSelection(layers)
        for layer in range(layers):
            scores = compaction.layer_scores(policy, plan, query, key, layer=layer, scale=scale, backend=backend)
            sel.add(policy, plan, layer, scores, finish, heads=key.shape[1], nan=nan)
        nan.pending.clear()
    return per_layer, per_step


def last_chunk_variants(config, policy, P, chunk, query, key, value, table, block_size, key_cache, value_cache, write,
                        layers, scale, backend="auto"):
    """A step that ends a chunked prefill, as in serving with chunked prefill (vLLM's chunks of 2048 tokens): the last
    `chunk` tokens of row 0's P-token prompt, the whole prompt's K/V already in the paged cache (where vLLM wrote the
    earlier chunks and this one). Per layer the engine assembles the prompt (its keys, and on the per-layer path its
    values, gathered back from the cache), scores the window, selects and compacts. Two ways, both the engine's code:
    - per_layer: assemble, select_kept, gather_kept from the assembled tensors, write (what the per-layer path runs);
    - per_step: assemble without values, layer_scores into a StepSelection, the kept K/V read back from the cache
      after the last layer (the engine's CUDA path): for window attention scores (compaction.scores_from_cache)
      the keys are scored where they lie in the cache (colreduce_paged), not gathered;
    - per_step_gathered: the same with the keys gathered by assemble and scored packed (the engine's path before
      scores_from_cache).
    The plan is made once (its per-step memo cleared each call, as each engine step makes a new one). Policies
    scoring with the window's queries only (SnapKV's config here): an accumulating policy (H2O) needs the earlier
    chunks' column sums stashed first. As in step_variants every layer shares one cache here, so with more than one
    layer the values read back differ from an engine's (shapes and ops are a real step's); the bitwise check of the
    two ways runs one layer.
    Returns (per_layer, per_step, per_step_gathered)."""
    from colreduce_kvprune.vllm import compaction

    c0 = P - chunk
    plan = compaction.plan_prefills(config, policy, [(0, 0, c0, chunk, P)], table, block_size, [{}])[2]
    q, k, v = query[c0:P], key[c0:P], value[c0:P]
    views = (key_cache, value_cache)
    nan = compaction.NanWatch()
    finish = _cached_finish(plan, table, key_cache, value_cache, write)

    def per_layer():
        plan.memo.clear()
        for layer in range(layers):
            aq, ak, av, partials = compaction.assemble(plan, layer, q, k, v, views, table, block_size)
            idx = compaction.select_kept(policy, plan, aq, ak, layer=layer, scale=scale, backend=backend,
                                         partials=partials, nan_flags=[])
            k_sel, v_sel = compaction.gather_kept(plan, idx, ak, av)
            write(k_sel.contiguous(), v_sel.contiguous(), key_cache, value_cache, plan.slots)

    def step(from_cache):
        def run():
            plan.memo.clear()
            sel = compaction.StepSelection(layers)
            paged = (key_cache, table) if from_cache and compaction.scores_from_cache(policy, plan) else None
            for layer in range(layers):
                aq, ak, _, partials = compaction.assemble(plan, layer, q, k, v, views, table, block_size,
                                                          values=False, keys=paged is None)
                scores = compaction.layer_scores(policy, plan, aq, ak, layer=layer, scale=scale, backend=backend,
                                                 partials=partials, paged=paged)
                sel.add(policy, plan, layer, scores, finish, heads=k.shape[1], nan=nan)
            nan.pending.clear()
        return run
    return per_layer, step(True), step(False)


def run(P, dtype, config_path, n_req=1, block_size=16, profile_calls=0, chunk=2048):
    from colreduce_kvprune.config import load_config
    from colreduce_kvprune.policies import get_policy
    from colreduce_kvprune.vllm import compaction
    _flush_buffer, time3 = _bench_kernels()._flush_buffer, _bench_kernels().time3

    config = load_config(config_path)
    policy = get_policy(config)
    g = torch.Generator(device="cuda").manual_seed(0)
    T = P * n_req
    query = torch.randn(T, HQ, D, device="cuda", dtype=dtype, generator=g)
    key = torch.randn(T, HKV, D, device="cuda", dtype=dtype, generator=g)
    value = torch.randn(T, HKV, D, device="cuda", dtype=dtype, generator=g)
    blocks_per = -(-P // block_size)
    num_blocks = blocks_per * n_req + 16
    table = torch.randperm(num_blocks, device="cuda", generator=g)[: blocks_per * n_req].view(n_req, blocks_per)
    table = table.to(torch.int32)
    key_cache, value_cache = cuda_caches(num_blocks, block_size, HKV, D, dtype)
    steps = [(r, r * P, 0, P, P) for r in range(n_req)]            # (row, start, c0, qlen, P): whole prompts
    write, write_how = cache_writer()
    scale = D ** -0.5

    def plan_step():
        return compaction.plan_prefills(config, policy, steps, table, block_size)
    plan = plan_step()[2]

    def score():            # as select_kept scores: packed colreduce_varlen, laid out padded, pooled in one call
        return compaction.padded_scores(policy, plan, query, key, layer=0, scale=scale)

    def prune_layer():      # as the engine calls it: NaN flags left on the device (compaction.NanWatch), no sync
        idx = compaction.select_kept(policy, plan, query, key, layer=0, scale=scale, nan_flags=[])
        k_sel, v_sel = compaction.gather_kept(plan, idx, key, value)
        write(k_sel.contiguous(), v_sel.contiguous(), key_cache, value_cache, plan.slots)

    scores = score()
    idx = compaction.select_kept(policy, plan, query, key, layer=0, scale=scale)
    k_sel, v_sel = compaction.gather_kept(plan, idx, key, value)
    attn, attn_how = attention_fn(query[:P], key[:P], value[:P])
    x = torch.randn(T, HIDDEN, device="cuda", dtype=dtype, generator=g)
    h = torch.randn(T, MLP, device="cuda", dtype=dtype, generator=g)
    w_qkv = torch.randn(HIDDEN, (HQ + 2 * HKV) * D, device="cuda", dtype=dtype, generator=g) * 0.01
    w_o = torch.randn(HQ * D, HIDDEN, device="cuda", dtype=dtype, generator=g) * 0.01
    w_gu = torch.randn(HIDDEN, 2 * MLP, device="cuda", dtype=dtype, generator=g) * 0.01
    w_d = torch.randn(MLP, HIDDEN, device="cuda", dtype=dtype, generator=g) * 0.01

    def linears():
        x @ w_qkv
        x @ w_o
        x @ w_gu
        h @ w_d

    # vLLM writes the step's K/V to the cache before the attention: every prompt token at its slot
    pos = torch.arange(P, device="cuda")
    for r in range(n_req):
        slot = table[r, pos // block_size].long() * block_size + pos % block_size
        key_cache[slot // block_size, slot % block_size] = key[r * P:(r + 1) * P]
        value_cache[slot // block_size, slot % block_size] = value[r * P:(r + 1) * P]
    step_parts = {}
    try:                                         # the step selection writes what the per-layer path writes
        per_step_equal = _writes_the_same(lambda kc, vc: step_variants(policy, plan, query, key, value, table,
                                                                       block_size, kc, vc, write, 1, scale),
                                          key_cache, value_cache)
        step_layer, step_once = step_variants(policy, plan, query, key, value, table, block_size, key_cache,
                                              value_cache, write, LAYERS, scale)
        step_parts = {f"step of {LAYERS} layers: per layer (select_kept, gather_kept, write)": step_layer,
                      ENGINE_STEP: step_once}
    except Exception as e:  # noqa: BLE001 (the rest of the table still comes back)
        per_step_equal = f"failed: {type(e).__name__}: {e}"
    last_chunk_equal = None
    if n_req == 1 and chunk < P:
        try:                                     # both ways write the same cache here too
            last_chunk_equal = _writes_the_same(
                lambda kc, vc: last_chunk_variants(config, policy, P, chunk, query, key, value, table, block_size,
                                                   kc, vc, write, 1, scale), key_cache, value_cache)
            chunk_layer, chunk_once, chunk_gathered = last_chunk_variants(
                config, policy, P, chunk, query, key, value, table, block_size, key_cache, value_cache, write,
                LAYERS, scale)
            step_parts[f"last chunk ({chunk} of {P}) step of {LAYERS} layers: per layer"] = chunk_layer
            step_parts[f"last chunk ({chunk} of {P}) step of {LAYERS} layers: once per step"] = chunk_once
            step_parts[f"last chunk ({chunk} of {P}) step of {LAYERS} layers: once per step, keys gathered"] = \
                chunk_gathered
        except Exception as e:  # noqa: BLE001
            last_chunk_equal = f"failed: {type(e).__name__}: {e}"

    # reads from the paged cache, the two ways compaction.read_cache has (a row gather where the cache's layout
    # allows it, vLLM's flash layout included; the multi-index gather it keeps for other strides and used for every
    # layout before): the kept tokens' K and V of one layer (gather_kept_cached) and a whole prompt's keys (assemble
    # of a last chunk)
    kept = compaction.StepKept(plan, idx[None])
    kb, ko = (t[0] for t in kept.cache_slots(table, block_size))
    kh = torch.arange(HKV, device="cuda")[None]
    pos = torch.arange(P, device="cuda")
    pb, ps = table[0, pos // block_size].long()[:, None], (pos % block_size)[:, None]
    layout = compaction.cache_layout(key_cache)
    kr, pr = compaction.cache_rows(layout, kb, ko, kh), compaction.cache_rows(layout, pb, ps, kh)
    reads = {
        "kept K+V from the cache: row gather (read_cache)":
            lambda: [compaction.read_cache(c, layout, kb, ko, kh, kr) for c in (key_cache, value_cache)],
        "kept K+V from the cache: multi-index gather (before)": lambda: [c[kb, ko, kh] for c in (key_cache,
                                                                                                  value_cache)],
        "a prompt's keys from the cache: row gather (read_cache)":
            lambda: compaction.read_cache(key_cache, layout, pb, ps, kh, pr),
        "a prompt's keys from the cache: multi-index gather (before)": lambda: key_cache[pb[:, 0], ps[:, 0]],
    }
    reads_equal = (all(torch.equal(a, b) for a, b in zip(reads["kept K+V from the cache: row gather (read_cache)"](),
                                                          reads["kept K+V from the cache: multi-index gather "
                                                                "(before)"]()))
                   and torch.equal(reads["a prompt's keys from the cache: row gather (read_cache)"](),
                                   reads["a prompt's keys from the cache: multi-index gather (before)"]()))

    flush = _flush_buffer()
    parts = {
        "prune_layer (score+pool+top-k+gather+write)": prune_layer,
        "score: colreduce_varlen + pooling (padded_scores)": score,
        # as select_kept calls it: the plan's per-step layout, no checks, no host sync (the 2026-12-01 run timed
        # select_batched of the per-request list with a NaN check read back, which waits for the GPU)
        "select: shared top-k (select_padded)": lambda: policy.select_padded(scores, plan.layout),
        "gather_kept": lambda: compaction.gather_kept(plan, idx, key, value),
        "cache write": lambda: write(k_sel.contiguous(), v_sel.contiguous(), key_cache, value_cache, plan.slots),
        "plan_prefills (once per step, all layers)": plan_step,
        **reads,
        **step_parts,
        "attention forward": lambda: [attn() for _ in range(n_req)],
        "linear matmuls of the layer": linears,
    }
    row = dict(prompt=P, requests=n_req, dtype=str(dtype).replace("torch.", ""), attention=attn_how,
               cache_write=write_how, keep=plan.keeps[0], window=plan.num_queries[0],
               one_selection_per_step_writes_the_same=per_step_equal, cache_reads_equal=reads_equal,
               last_chunk_once_per_step_writes_the_same=last_chunk_equal)
    if step_parts:     # memory of one 32-layer step's pruning, against its stacked scores (float32)
        row["stacked_scores_mib"] = LAYERS * n_req * HKV * P * 4 / 2 ** 20
        for name, fn in step_parts.items():
            row[f"peak extra MiB: {name}"] = peak_extra_mib(fn)
    for name, fn in parts.items():
        row[name] = time3(fn, flush)
        row[name]["host_idle_us"] = host_idle_us(fn)
    if profile_calls:
        try:
            row["profile"] = profile_table(prune_layer, profile_calls)
        except Exception as e:  # noqa: BLE001
            row["profile"] = f"profiler failed: {type(e).__name__}: {e}"
    row["syncs in prune_layer"] = _bench_kernels().count_syncs(prune_layer)
    pr, at, li = (row[k] for k in ("prune_layer (score+pool+top-k+gather+write)", "attention forward",
                                   "linear matmuls of the layer"))
    for key_ in ("gpu_ms", "e2e_ms"):
        row[f"share_of_attention_{key_}"] = pr[key_] / at[key_]
        row[f"share_of_layer_{key_}"] = pr[key_] / (at[key_] + li[key_])
    once = row.get(ENGINE_STEP)      # the engine's path for most steps: its cost per layer, the same denominator
    if isinstance(once, dict):
        for key_ in ("gpu_ms", "e2e_ms"):
            row[f"engine_share_of_layer_{key_}"] = once[key_] / LAYERS / (at[key_] + li[key_])
    return row


def markdown(rows, env):
    lines = [f"GPU: {env['gpu']}; torch {env['torch']}, triton {env['triton']}. Per layer, Llama-3.1-8B shape "
             f"(32/8 heads, D 128), bf16, configs/snapkv.yaml. Attention: {rows[0]['attention']}; cache write: "
             f"{rows[0]['cache_write']}. Times in ms (gpu = device time with host gaps hidden; e2e = back-to-back "
             "calls, no CUDA graphs); host µs = CPU time per call with the device kept busy (can include waits on a "
             "full launch queue); idle host µs = CPU time of one call after a synchronize (the launch path alone).",
             "", "| prompt × requests | part | gpu ms | e2e ms | host µs | idle host µs |", "|---|---|---|---|---|---|"]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, dict) and "gpu_ms" in v:
                lines.append(f"| {r['prompt']} × {r['requests']} | {k} | {v['gpu_ms']:.3f} | {v['e2e_ms']:.3f} | "
                             f"{v['host_us']:.0f} | {v.get('host_idle_us', float('nan')):.0f} |")
        lines.append(f"| {r['prompt']} × {r['requests']} | **prune / attention forward** | "
                     f"{100 * r['share_of_attention_gpu_ms']:.1f}% | {100 * r['share_of_attention_e2e_ms']:.1f}% | | |")
        lines.append(f"| {r['prompt']} × {r['requests']} | **prune / (attention + linears)** | "
                     f"{100 * r['share_of_layer_gpu_ms']:.1f}% | {100 * r['share_of_layer_e2e_ms']:.1f}% | "
                     f"syncs per layer: {r['syncs in prune_layer']['count']} | |")
        if "engine_share_of_layer_gpu_ms" in r:
            lines.append(f"| {r['prompt']} × {r['requests']} | **engine path (one selection per step), per layer / "
                         f"(attention + linears)** | {100 * r['engine_share_of_layer_gpu_ms']:.1f}% | "
                         f"{100 * r['engine_share_of_layer_e2e_ms']:.1f}% | | |")
        lines.append(f"| {r['prompt']} × {r['requests']} | one selection per step writes what the per-layer path "
                     f"writes (one layer, bitwise) | {r['one_selection_per_step_writes_the_same']} | | | |")
        for k, v in r.items():
            if k.startswith("peak extra MiB: "):
                lines.append(f"| {r['prompt']} × {r['requests']} | {k} (stacked scores "
                             f"{r['stacked_scores_mib']:.0f} MiB) | {v:.0f} | | | |")
        if r.get("last_chunk_once_per_step_writes_the_same") is not None:
            lines.append(f"| {r['prompt']} × {r['requests']} | the same for a last chunk, keys scored in the cache "
                         f"and gathered (one layer, bitwise) | {r['last_chunk_once_per_step_writes_the_same']} | | | |")
        lines.append(f"| {r['prompt']} × {r['requests']} | cache reads: row gather == multi-index gather (bitwise) | "
                     f"{r.get('cache_reads_equal')} | | | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--profile-calls", type=int, default=20,
                    help="torch.profiler over this many prune_layer calls at each shape, its op table written to "
                         "prune_path_profile.txt (0: none)")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                                     "snapkv.yaml"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/prune_path.py needs a CUDA GPU")
    env_info, warm_up_clocks = _bench_kernels().env_info, _bench_kernels().warm_up_clocks
    warm_up_clocks(1.0)
    rows = []
    for P in (int(x) for x in args.lengths.split(",")):
        for n_req in (1, 4) if P == 8192 else (1,):
            rows.append(run(P, torch.bfloat16, args.config, n_req, profile_calls=args.profile_calls))
            r = rows[-1]
            print(f"P={P} x{n_req}: prune {r['prune_layer (score+pool+top-k+gather+write)']['gpu_ms']:.3f} ms, "
                  f"attention {r['attention forward']['gpu_ms']:.3f} ms, "
                  f"share {100 * r['share_of_attention_gpu_ms']:.1f}%"
                  f" of attention, {100 * r['share_of_layer_gpu_ms']:.1f}% of attention+linears; syncs "
                  f"{r['syncs in prune_layer']}", flush=True)
            torch.cuda.empty_cache()
    env = env_info()
    os.makedirs(args.out, exist_ok=True)
    profiles = [(f"{r['prompt']} x {r['requests']}", r.pop("profile")) for r in rows if "profile" in r]
    if profiles:
        with open(os.path.join(args.out, "prune_path_profile.txt"), "w") as f:
            for label, text in profiles:
                f.write(f"== prune_layer, prompt {label}, {args.profile_calls} calls (self CPU time = host cost)\n"
                        f"{text}\n")
    json.dump(dict(env=env, rows=rows), open(os.path.join(args.out, "prune_path.json"), "w"), indent=1)
    table = markdown(rows, env)
    open(os.path.join(args.out, "prune_path.md"), "w").write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
