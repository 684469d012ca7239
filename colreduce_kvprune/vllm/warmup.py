"""Compile the scoring kernels at engine start, not inside the first pruned prefill.

Triton compiles a kernel at its first launch with a new specialization. Without this, the first prompt that is
pruned paid that compile (about 2.5 s on the H200: the whole serving run's timeline shifted by it, and its TTFT with
it). vLLM's own start-up never scores a prompt: memory profiling and CUDA-graph capture run dummy batches that the
plugin leaves alone. So the attention impl calls `warm_up` from its first eager forward outside a graph capture
(vLLM's profiling run): the plan, scores and selection of two dummy prompts through the same functions a pruned
prefill uses (`compaction.plan_prefills`, `compaction.select_kept`, and for policies whose last chunk is scored
in the paged cache `compaction.score_paged`), with the layer's head counts, head size and dtype. The kernels' tiles
also change with the prompt's length (the eleventh H200 visit stalled 2.1 s at the first 16k prompt, whose tiles
the short dummies had not used), so `score_lengths` then scores one prompt per distinct launch up to the engine's
max_model_len (kernels.colreduce.launch_lengths finds them; for policies scoring with every query, H2O, whole
prompts of up to a few thousand tokens: score_whole_prompts). Steps that prune several prompts at once, chunked
prompts of those policies and their longer whole prompts can still compile a variant at first use. Nothing here
touches the KV cache or vLLM's state.
"""
from __future__ import annotations

import torch

_done: set[tuple] = set()


def warm_up(policy, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_size: int,
            scale: float, max_len: int = 0, block_size: int = 16) -> bool:
    """Run the scoring path once per process for this (device, dtype, heads, head size, policy) on CUDA. Returns
    False only when it should be called again later (inside a CUDA graph capture); True once it ran, was run
    already, or has nothing to do (CPU: this path compiles nothing there)."""
    if device.type != "cuda":
        return True
    if torch.cuda.is_current_stream_capturing():
        return False
    key = (device, dtype, num_heads, num_kv_heads, head_size, policy.name)
    if key in _done:
        return True
    _done.add(key)
    score_dummies(policy, device, dtype, num_heads, num_kv_heads, head_size, scale)
    score_lengths(policy, device, dtype, num_heads, num_kv_heads, head_size, scale, max_len, block_size)
    torch.cuda.synchronize(device)
    return True


def score_dummies(policy, device, dtype, num_heads: int, num_kv_heads: int, head_size: int, scale: float):
    """Plan, scores and selection of two random whole prompts, through the same calls as a pruned prefill
    (compaction.plan_prefills, then select_kept with device NaN flags, as the engine's layers call it);
    → (kept indices (2, Hkv, K_max), the plan's keep counts), or None when the policy would not prune them."""
    from . import compaction

    # two prompts, one 16-aligned and one not (Triton specialises integer arguments on 16-divisibility)
    base = max(int(policy.config.min_prompt_tokens), 256)
    lengths, block_size = [base + 7, 2 * base], 16
    steps = [(0, 0, 0, lengths[0], lengths[0]), (1, lengths[0], 0, lengths[1], lengths[1])]
    width = compaction.cdiv(max(lengths), block_size)
    block_table = torch.arange(2 * width, dtype=torch.int32, device=device).view(2, width)
    plan = compaction.plan_prefills(policy.config, policy, steps, block_table, block_size)[2]
    if plan is None:
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(sum(lengths), num_heads, head_size, device=device, dtype=dtype, generator=gen)
    k = torch.randn(sum(lengths), num_kv_heads, head_size, device=device, dtype=dtype, generator=gen)
    kept = compaction.select_kept(policy, plan, q, k, layer=0, scale=scale, nan_flags=[])
    if policy.score_request(max(lengths)).kind == "attention" and not plan.accumulate:
        # the step path scores a chunked prompt's last chunk in the paged cache (compaction.scores_from_cache):
        # the same keys, laid out in a cache of the dummies' blocks, through colreduce_paged
        cache = k.new_zeros(2 * width, block_size, num_kv_heads, head_size)
        cache.view(-1, num_kv_heads, head_size)[:lengths[0]] = k[:lengths[0]]
        cache.view(-1, num_kv_heads, head_size)[width * block_size: width * block_size + lengths[1]] = k[lengths[0]:]
        compaction.score_paged(policy, plan, q, cache, block_table,
                               torch.tensor(lengths, dtype=torch.int32, device=device), scale=scale)
    return kept, plan.keeps


def score_lengths(policy, device, dtype, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                  max_len: int, block_size: int, max_bytes: int = 64 << 20) -> list[int]:
    """Score one dummy prompt per distinct kernel launch (kernels.colreduce.launch_lengths) of prompts up to
    max_len (its tiles and Triton's specialisation of the length-dependent integers): as packed keys
    (colreduce_varlen, whole prompts) and, where the step path scores a last chunk in the paged cache, through a
    block table of `block_size` (colreduce_paged; every entry the same block, so any length costs one block).
    Window policies (num_queries < the prompt); packed keys over max_bytes are skipped (they compile at first use).
    Policies scoring with every query (H2O): whole prompts, up to max_bytes of queries and keys together and at least
    to the Gluon row pass's threshold (score_whole_prompts). → [(paged, length)] scored (none for other policies)."""
    from .. import colreduce_paged, colreduce_varlen
    from ..ops import kernels_module

    launch_lengths = kernels_module("colreduce").launch_lengths

    lo = max(int(policy.config.min_prompt_tokens), 256)
    if max_len <= lo:
        return []
    req = policy.score_request(lo)
    if req.kind != "attention":
        return []
    if req.num_queries == lo and policy.score_request(max_len).num_queries == max_len:
        return score_whole_prompts(policy, device, dtype, num_heads, num_kv_heads, head_size, scale, lo, max_len,
                                   max_bytes)
    if req.num_queries >= lo or policy.score_request(max_len).num_queries != req.num_queries:
        return []
    m, group = req.num_queries, num_heads // num_kv_heads
    kw = dict(reduction=req.reduction, is_causal=True, scale=scale, group_reduce=req.group_reduce,
              max_seqlen_q=m)
    shape = dict(is_causal=True, reduction=req.reduction, group_reduce=req.group_reduce, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(m, num_heads, head_size, device=device, dtype=dtype, generator=gen)
    cu_q = torch.tensor([0, m], dtype=torch.int32, device=device)
    block = torch.randn(1, block_size, num_kv_heads, head_size, device=device, dtype=dtype, generator=gen)
    scored = []
    for paged in (False, True):
        for length in launch_lengths(m, lo, max_len, head_size, group, 1, num_kv_heads, paged=paged,
                                     page=block_size if paged else 1, **shape):
            seqlen = torch.tensor([length], dtype=torch.int32, device=device)
            if paged:        # the step path's table rows are a multiple of 16 wide (compaction._paged_rows)
                table = torch.zeros(1, -(-length // (16 * block_size)) * 16, dtype=torch.int32, device=device)
                colreduce_paged(q, block, table, cu_q, seqlen, max_seqlen_k=length, **kw)
            elif length * num_kv_heads * head_size * block.element_size() <= max_bytes:
                k = torch.randn(length, num_kv_heads, head_size, device=device, dtype=dtype, generator=gen)
                colreduce_varlen(q, k, cu_q, torch.cat([seqlen.new_zeros(1), seqlen]), max_seqlen_k=length, **kw)
            else:
                continue
            scored.append((paged, length))
    return scored


def score_whole_prompts(policy, device, dtype, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                        lo: int, max_len: int, max_bytes: int = 64 << 20) -> list[tuple[bool, int]]:
    """score_lengths for a policy that scores a prompt with all its queries (H2O): one whole dummy prompt (packed,
    colreduce_varlen, as compaction.row_scores calls it for an unchunked prompt) per distinct launch of prompts of
    lo … max_len tokens (launch_lengths(..., whole=True)), up to the length whose queries and keys together fit
    max_bytes (32 query and 8 kv heads of 128 in bf16: 6553 tokens), and at least to _WS_MIN_M + 8 (4104): on sm_90
    in fp16/bf16 colreduce_ws.py's Gluon row pass takes whole prompts from 4096 queries on — one compile for every
    length, which the plugin otherwise paid at the first such prompt mid-serving. Longer prompts' other launches,
    and chunked prompts (their chunks' column sums accumulate), still compile at first use. → [(False, length)]."""
    from .. import colreduce_varlen
    from ..ops import kernels_module

    kernels = kernels_module("colreduce")
    req = policy.score_request(lo)
    per_token = (num_heads + num_kv_heads) * head_size * dtype.itemsize
    # at least up to the Gluon row pass's threshold and its lengths' classes mod 16 (4096 … 4104)
    hi = min(max_len, max(max_bytes // per_token, kernels._WS_MIN_M + 8))
    if hi < lo:
        return []
    kw = dict(is_causal=True, group_reduce=req.group_reduce)
    gen = torch.Generator(device=device).manual_seed(0)
    scored = []
    for length in kernels.launch_lengths(0, lo, hi, head_size, num_heads // num_kv_heads, 1, num_kv_heads,
                                         reduction=req.reduction, dtype=dtype, device=device, whole=True, **kw):
        q = torch.randn(length, num_heads, head_size, device=device, dtype=dtype, generator=gen)
        k = torch.randn(length, num_kv_heads, head_size, device=device, dtype=dtype, generator=gen)
        cu = torch.tensor([0, length], dtype=torch.int32, device=device)
        colreduce_varlen(q, k, cu, cu, req.reduction, max_seqlen_q=length, max_seqlen_k=length, scale=scale, **kw)
        scored.append((False, length))
    return scored
