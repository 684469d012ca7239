"""Worker side, backend independent: which rows of a step to prune, the remapped block tables of pruned requests,
scoring + selection per layer, and the gather of the kept K/V. Pure torch on the step's tensors; no vLLM import.

Layout after pruning a request whose prefill had L tokens and keeps `keep` per kv head (off = L − keep):
compacted token c (0 ≤ c < keep: the kept prompt tokens in ascending order, per kv head; c ≥ keep: the tokens
after the prefill) lives in block row[c // bs] at offset c % bs, where row = the request's block-table row with
the blocks [cdiv(keep, bs), cdiv(L, bs)) removed (the scheduler freed them). Attention sees seq_len − off keys;
positions stay logical, so RoPE of new tokens is unchanged.

Per-request state lives in a table indexed by the request's first physical block id (unique per live request
without prefix caching; each request's first step is a prefill from position 0, which resets the entry), so the
builder needs no request ids and no host sync on GPU: `RowState.lookup` is a device gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..policies import keep_count


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefillPlan:
    """The rows of one step whose prefill is pruned after attention (shared by every layer of the step).

    rows/starts/lengths/keeps: host ints per pruned row (row index in the batch, first token in the packed step,
    prefill length L, kept count). Device tensors: key_index (ΣL,) packed token ids of the rows' tokens, cu_k (B+1,)
    int32; window_index (ΣW,) the last W tokens of each row, cu_q (B+1,) int32 (empty when the policy needs no
    queries); kept_row/kept_pos (Σkeep,) int64 — row (in this plan) and compacted position c of every kept entry;
    slots (Σkeep,) int64 — destination cache slot of each kept entry.
    """
    rows: list[int]
    starts: list[int]
    lengths: list[int]
    keeps: list[int]
    num_queries: list[int]
    key_index: torch.Tensor
    cu_k: torch.Tensor
    window_index: torch.Tensor
    cu_q: torch.Tensor
    starts_dev: torch.Tensor
    kept_row: torch.Tensor
    kept_pos: torch.Tensor
    slots: torch.Tensor


class RowState:
    """Per-request pruning state in a (num_blocks, 3) int32 table indexed by the request's first block id:
    [offset L − keep, kept blocks cdiv(keep, bs), prefill blocks cdiv(L, bs)]; zeros = not pruned."""

    def __init__(self, num_blocks: int, device):
        self.table = torch.zeros(num_blocks, 3, dtype=torch.int32, device=device)

    def update_and_lookup(self, first_blocks: torch.Tensor, fresh_rows: list[int],
                          fresh_values: list[tuple[int, int, int]]) -> torch.Tensor:
        """first_blocks (n,) block ids of each row's first block. Rows in fresh_rows start a prefill now: their
        entries are (re)set to fresh_values and they get zeros (this step attends to the full prefill).
        Returns (n, 3) int32 — the state each row's attention must apply in this step."""
        first_blocks = first_blocks.long()
        vals = self.table[first_blocks]
        if fresh_rows:
            idx = torch.tensor(fresh_rows, dtype=torch.long).to(first_blocks.device, non_blocking=True)
            new = torch.tensor(fresh_values, dtype=torch.int32).to(first_blocks.device, non_blocking=True)
            self.table[first_blocks[idx]] = new
            vals[idx] = 0
        return vals


def fresh_prefills(query_start_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, num_reqs: int):
    """Rows whose step prefills their sequence from position 0 (query length == sequence length): [(row, start, L)]."""
    qs = query_start_cpu[: num_reqs + 1].tolist()
    sl = seq_lens_cpu[:num_reqs].tolist()
    return [(r, qs[r], sl[r]) for r in range(num_reqs) if sl[r] > 0 and qs[r + 1] - qs[r] == sl[r]]


def plan_prefills(config, policy, prefills, block_table: torch.Tensor, block_size: int):
    """Host-side plan for the fresh prefills [(row, start, L)] of a step.

    Returns (fresh_rows, fresh_values, PrefillPlan | None): the RowState entries to set for every fresh row, and
    the plan of the rows actually pruned (keep < L)."""
    fresh_rows, fresh_values, pruned = [], [], []
    for row, start, length in prefills:
        keep = keep_count(config, length)
        fresh_rows.append(row)
        if keep < length:
            fresh_values.append((length - keep, cdiv(keep, block_size), cdiv(length, block_size)))
            pruned.append((row, start, length, keep))
        else:
            fresh_values.append((0, 0, 0))
    if not pruned:
        return fresh_rows, fresh_values, None
    dev = block_table.device
    rows, starts, lengths, keeps = (list(x) for x in zip(*pruned))
    req = policy.score_request(max(lengths))
    nq = [min(policy.score_request(n).num_queries, n) if req.kind == "attention" else 0 for n in lengths]
    key_index = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    window_index = torch.cat([torch.arange(s + n - m, s + n) for s, n, m in zip(starts, lengths, nq)])
    cu_k = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_q = torch.tensor([0] + nq, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    kept_row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(keeps))
    kept_pos = torch.cat([torch.arange(k) for k in keeps])
    to = dict(device=dev, non_blocking=True)
    kept_row_d, kept_pos_d = kept_row.to(**to), kept_pos.to(**to)
    rows_d = torch.tensor(rows, dtype=torch.long).to(**to)
    slots = (block_table[rows_d[kept_row_d], kept_pos_d // block_size].long() * block_size
             + kept_pos_d % block_size)
    plan = PrefillPlan(rows=rows, starts=starts, lengths=lengths, keeps=keeps, num_queries=nq,
                       key_index=key_index.to(**to), cu_k=cu_k.to(**to), window_index=window_index.to(**to),
                       cu_q=cu_q.to(**to), starts_dev=torch.tensor(starts, dtype=torch.long).to(**to),
                       kept_row=kept_row_d, kept_pos=kept_pos_d, slots=slots)
    return fresh_rows, fresh_values, plan


def remap_rows(state: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, positions: torch.Tensor,
               query_start: torch.Tensor, num_tokens: int, slot_mapping: torch.Tensor, block_size: int):
    """Apply the pruned layout to every row (vectorised, no host sync). state (n, 3) from RowState; block_table
    (≥n, W); seq_lens (≥n,); positions (≥num_tokens,) logical; query_start (n+1,) device; slot_mapping is rewritten
    in place for the tokens of pruned rows (the runner passes the same tensor to the KV-cache write).
    Returns (new block table, new seq_lens) — fresh tensors; rows with offset 0 are unchanged."""
    n = state.shape[0]
    off, kept_blocks, prefill_blocks = (x.long() for x in state.unbind(1))
    width = block_table.shape[1]
    j = torch.arange(width, device=block_table.device)
    src = torch.where(j < kept_blocks[:, None], j, j - kept_blocks[:, None] + prefill_blocks[:, None])
    new_bt = block_table.clone()
    new_bt[:n] = block_table[:n].gather(1, src.clamp_(max=width - 1))
    new_seq = seq_lens.clone()
    new_seq[:n] = seq_lens[:n] - off.to(seq_lens.dtype)
    if num_tokens:
        qlen = query_start[1: n + 1] - query_start[:n]
        row = torch.repeat_interleave(torch.arange(n, device=qlen.device), qlen.long(), output_size=num_tokens)
        c = positions[:num_tokens].long() - off[row]
        c = c.clamp(min=0)
        slot = new_bt[row, c // block_size].long() * block_size + c % block_size
        sm = slot_mapping[:num_tokens]
        sm.copy_(torch.where(off[row] > 0, slot.to(sm.dtype), sm))
    return new_bt, new_seq


def select_kept(policy, plan: PrefillPlan, query: torch.Tensor, key: torch.Tensor, *, layer: int, scale: float,
                backend: str = "auto") -> torch.Tensor:
    """Scores and selection for every pruned row of the step at one layer.

    query (T, Hq, D) after RoPE, key (T, Hkv, D) after RoPE (the step's packed tensors).
    Returns (B, Hkv, K_max) int64 kept token indices per row, ascending (padded with −1 beyond keeps[b])."""
    req = policy.score_request(max(plan.lengths))
    bounds = list(zip([0] + list(_cumsum(plan.lengths))[:-1], _cumsum(plan.lengths)))
    if req.kind == "attention":
        from .. import colreduce_varlen

        raw = colreduce_varlen(query[plan.window_index], key[plan.key_index], plan.cu_q, plan.cu_k, req.reduction,
                               max_seqlen_q=max(plan.num_queries), max_seqlen_k=max(plan.lengths),
                               is_causal=True, scale=scale, group_reduce=req.group_reduce, backend=backend)
        scores = [policy.postprocess_scores(raw[a:b].t()) for a, b in bounds]
    else:
        keys = key[plan.key_index]
        scores = [policy.scores(None, keys[a:b].transpose(0, 1), layer=layer) for a, b in bounds]
    idx, _ = policy.select_batched(scores, layer=layer)
    return idx


def gather_kept(plan: PrefillPlan, idx: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """The kept K/V of every pruned row, in compacted order: (Σkeep, Hkv, D) each, matching plan.slots."""
    tok = plan.starts_dev[plan.kept_row][:, None] + idx[plan.kept_row, :, plan.kept_pos]   # (Σkeep, Hkv)
    heads = torch.arange(key.shape[1], device=key.device)
    return key[tok, heads], value[tok, heads]


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total
