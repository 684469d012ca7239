"""Compile the scoring kernels at engine start, not inside the first pruned prefill.

Triton compiles a kernel at its first launch with a new specialization. Without this, the first prompt that is
pruned paid that compile (about 2.5 s on the H200: the whole serving run's timeline shifted by it, and its TTFT with
it). vLLM's own start-up never scores a prompt: memory profiling and CUDA-graph capture run dummy batches that the
plugin leaves alone. So the attention impl calls `warm_up` from its first eager forward outside a graph capture
(vLLM's profiling run): scores and a selection of two dummy prompts through the same functions a pruned prefill
uses (`compaction.row_scores`, the policy's `select_batched`), with the layer's head counts, head size and dtype. The
kernels specialise on shapes and alignment, so a prompt whose shape differs from both dummies can still compile a new
variant at its first use. Nothing here touches the KV cache or vLLM's state.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

_done: set[tuple] = set()


def warm_up(policy, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_size: int,
            scale: float) -> bool:
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
    torch.cuda.synchronize(device)
    return True


def score_dummies(policy, device, dtype, num_heads: int, num_kv_heads: int, head_size: int, scale: float):
    """Scores and selection of two random prompts, as a pruned prefill computes them; → select_batched's result."""
    from . import compaction

    # two prompts, one 16-aligned and one not (Triton specialises integer arguments on 16-divisibility)
    base = max(int(policy.config.min_prompt_tokens), 256)
    lengths = [base + 7, 2 * base]
    windows = [min(policy.score_request(n).num_queries, n) for n in lengths]
    total = sum(lengths)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(total, num_heads, head_size, device=device, dtype=dtype, generator=gen)
    k = torch.randn(total, num_kv_heads, head_size, device=device, dtype=dtype, generator=gen)
    starts = [0, lengths[0]]
    window_index = torch.cat([torch.arange(s + n - w, s + n) for s, n, w in zip(starts, lengths, windows)])

    def cumsum(xs):
        return torch.tensor([0] + xs, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    plan = SimpleNamespace(lengths=lengths, num_queries=windows, accumulate=False, sources=None,
                           key_index=torch.arange(total, device=device), cu_k=cumsum(lengths),
                           window_index=window_index.to(device), cu_q=cumsum(windows))
    scores = compaction.row_scores(policy, plan, q, k, layer=0, scale=scale)
    return policy.select_batched(scores, layer=0)
