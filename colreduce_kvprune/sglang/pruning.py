"""The tensor work of pruning one SGLang request after its prefill; pure torch, no SGLang import.

SGLang's KV layout: every token of a request has one slot index (its `req_to_token` row), shared by all layers and
all kv heads; layer l keeps K (S, Hkv, D) and V (S, Hkv, Dv) at those slots. After prefill of a P-token prompt that
keeps `keep` tokens per (layer, kv head):
- if every layer and every kv head keeps the same tokens, the kept slots are simply listed first in the row (index
  rewrite, no K/V moved: `compact_shared`);
- otherwise the kept K/V of each (layer, kv head) is moved into the request's own first `keep` slots — gathered to
  a temporary, then scattered, so no slot is overwritten before it is read (`compact_moved`).
Either way the row's first `keep` entries then hold the compacted prompt and the other P − keep slots are free.

Scoring needs the last queries of the prompt (SnapKV's window, TOVA's last query, all of them for H2O); with chunked
prefill they span chunks, so `QueryRecorder` keeps the last `capacity` queries per (request, layer) as the chunks
go by. Keys are read from the pool after the last chunk (`gather_keys`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..policies import Policy


def query_capacity(policy: Policy) -> int | None:
    """How many trailing queries per layer scoring can need: 0 (none), an int, or None (all of the prompt: H2O)."""
    huge = 1 << 40
    req = policy.score_request(huge)
    if req.kind != "attention":
        return 0
    return None if req.num_queries >= huge else req.num_queries


@dataclass
class QueryRecorder:
    """The last `capacity` (None: all) post-RoPE queries of each prefilling request, per layer, across chunks.

    Keyed by the request's req_to_token row (unique among live requests). `record` with first_chunk=True starts the
    request afresh (a new request, or a retracted one prefilled again)."""
    capacity: int | None
    queries: dict = field(default_factory=dict)     # (row, layer) -> (m, Hq, D)
    scales: dict = field(default_factory=dict)      # layer -> softmax scale of that layer's attention

    def record(self, row: int, layer: int, chunk_queries: torch.Tensor, first_chunk: bool, scale: float) -> None:
        """chunk_queries (e, Hq, D): this chunk's queries of the request, in order."""
        self.scales[layer] = scale
        key = (row, layer)
        prev = None if first_chunk else self.queries.get(key)
        if self.capacity is not None:
            chunk_queries = chunk_queries[max(0, chunk_queries.shape[0] - self.capacity):]
        q = chunk_queries.detach().clone() if prev is None else torch.cat([prev, chunk_queries.detach()])
        if self.capacity is not None and q.shape[0] > self.capacity:
            q = q[q.shape[0] - self.capacity:].clone()
        self.queries[key] = q

    def pop(self, row: int, layers) -> dict:
        """layer -> (m, Hq, D) recorded queries of the request (removed from the recorder)."""
        return {layer: q for layer in layers if (q := self.queries.pop((row, layer), None)) is not None}

    def drop(self, row: int) -> None:
        for key in [k for k in self.queries if k[0] == row]:
            del self.queries[key]


def gather_keys(key_buffer: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """key_buffer (S, Hkv, D) of one layer, slots (P,) int64 → the request's keys (Hkv, P, D)."""
    return key_buffer[slots].transpose(0, 1)


def select_layer(policy: Policy, keys: torch.Tensor, queries: torch.Tensor | None, *, layer: int, num_layers: int,
                 scale: float | None, backend: str = "auto") -> torch.Tensor:
    """Kept token indices of one layer. keys (Hkv, P, D) after RoPE; queries (m, Hq, D) the prompt's last m queries
    after RoPE (None when the policy needs none). → (Hkv, keep) int64 ascending."""
    window = None if queries is None else queries.transpose(0, 1)
    scores = policy.scores(window, keys, layer=layer, scale=scale, backend=backend)
    return policy.select(scores, layer=layer, num_layers=num_layers)


def selection_is_shared(kept: torch.Tensor) -> bool:
    """kept (L, Hkv, keep): True when every layer and every kv head keeps the same tokens."""
    return bool((kept == kept[:1, :1]).all())


def compact_shared(slots: torch.Tensor, kept_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index rewrite. slots (P,) the request's slots; kept_row (keep,) kept token indices (the same for every layer
    and head). → (the new first `keep` row entries, the P − keep freed slots)."""
    drop = torch.ones(slots.shape[0], dtype=torch.bool, device=slots.device)
    drop[kept_row] = False
    return slots[kept_row], slots[drop]


def compact_moved(buffers, slots: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each (layer, kv head)'s kept K/V into the request's first `keep` slots.

    buffers: per layer, the pool tensors to move, e.g. [(K_l, V_l), ...] with K_l (S, Hkv, D), V_l (S, Hkv, Dv);
    slots (P,) int64; kept (L, Hkv, keep) int64 token indices per layer and head.
    → (the new first `keep` row entries = slots[:keep], the freed slots[keep:])."""
    hkv, keep = kept.shape[1], kept.shape[2]
    dst = slots[:keep].expand(hkv, keep)
    heads = torch.arange(hkv, device=slots.device)[:, None].expand(hkv, keep)
    for tensors, kept_l in zip(buffers, kept):
        src = slots[kept_l.to(slots.device)]                         # (Hkv, keep) source slots
        for buf in tensors:
            moved = buf[src, heads]                                   # gather to a temporary (Hkv, keep, D)
            buf[dst, heads] = moved                                   # then scatter
    return slots[:keep], slots[keep:]
