"""Worker side, backend independent: which rows of a step to prune, the remapped block tables of pruned requests,
scoring + selection per layer, the gather of the kept K/V, and the exact attention of recomputed outputs. Pure torch
on the step's tensors; no vLLM import.

Layout after pruning a request whose prompt had P tokens and keeps `keep` per kv head (off = P − keep): compacted
token c (0 ≤ c < keep: the kept prompt tokens in ascending order, per kv head; c ≥ keep: the tokens after the
prompt) lives in block row[c // bs] at offset c % bs, where row = the request's block-table row with the blocks
[cdiv(L − off, bs), cdiv(L, bs)) removed (the scheduler freed them), L being the length of the prefill that pruned
it: L = P for a fresh prompt, L = P + g when vLLM recomputes a preempted request (prompt + its g outputs prefilled
from position 0). A recompute is pruned exactly like the first prefill: the prompt alone is scored, keep(P) prompt
tokens are kept, then all g outputs; and the outputs' attention rows are recomputed over the kept prompt tokens +
earlier outputs (`recompute_outputs`), as their decode steps saw them. Attention sees seq_len − off keys; positions
stay logical, so RoPE of new tokens is unchanged.

Per-request state lives in a table indexed by the request's first physical block id, so the builder needs no
request ids and no host sync on GPU: `RowState.lookup` is a device gather. A pruned request's first block is its own
(pruned requests never take prefix-cache hits, manager.py) and its first step is a prefill from position 0, which
sets the entry; requests that are not pruned reset it to zeros at their own prefill from position 0, and requests
that share a cached first block are never pruned, so that block's entry stays the zeros its first owner wrote.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..policies import keep_count, pad_scores


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: on CUDA through pinned memory and an asynchronous copy (a copy
    from pageable memory synchronizes the stream), elsewhere a plain copy."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class PrefillPlan:
    """The rows of one step whose prefill is pruned after attention (shared by every layer of the step).

    Host ints per pruned row: rows (row index in the batch), starts (first token in the packed step), lengths
    (prompt length P: the tokens scored), keeps (prompt tokens kept), num_outputs (g: output tokens after the prompt,
    > 0 only for a recompute after preemption), num_queries, kept_starts (first entry of the row in the kept
    entries). Device tensors: key_index (ΣP,) packed token ids of the rows' prompts, cu_k (B+1,) int32; window_index
    (ΣW,) the last W prompt tokens of each row, cu_q (B+1,) int32 (empty when the policy needs no queries);
    kept_row/kept_pos (Σ(keep+g),) int64 — row (in this plan) and compacted position c of every kept entry;
    slots (Σ(keep+g),) int64 — destination cache slot of each kept entry; lengths_dev / keeps_dev (B,) int64 —
    lengths and keeps on the device (for the selection); out_starts: the query row of each row's first output
    (recomputed attention rows).

    Made once per step for every layer's selection and gather (each saves the layers aten ops, ~10 µs of host
    time apiece on a GPU machine): key_span / window_span, (first, end) when the rows' keys / window queries are
    one contiguous range of the step's tokens (then sliced, not gathered: a view); pad_index (B, 1, P_max) int64,
    the packed row of token j of request b (j clamped to P_b − 1: padding repeats the request's own last score),
    through which one indexing op lays out the packed scores as (B, Hkv, P_max); layout, the policy's
    SelectionLayout (None: a policy with different counts per head or layer, which selects through
    select_batched); gather_pos / gather_base (Σ(keep+g),) and (Σ(keep+g), 1): the column of idx (clamped to
    K_max − 1) and the row's first token of each kept entry; out_tok (Σ(keep+g), 1) int64, the packed token id
    of an output entry (c ≥ keep), −1 for a prompt entry, and is_out = out_tok ≥ 0, only with recomputed
    outputs. memo: tensors made at the first layer that needs them (the kv head count, the cache positions of
    assemble), reused by the step's other layers.

    With the last chunk of a chunked prefill among the rows, `sources` is set (per row: step start, c0, qlen,
    carry, block-table row) and the plan indexes the tensors of `assemble`: keys/values of every row's tokens
    0..L−1 back to back (`starts`; the earlier chunks read back from the paged cache), queries of positions
    query_from..L−1, rows back to back (the earlier chunks' window queries come from the carry). When the policy scores
    with every prompt query (`accumulate`, H2O), earlier chunks left their column sums in the carry (`partials`
    of assemble) and the last chunk adds its own queries' (window_index: its prompt queries only).
    """
    rows: list[int]
    starts: list[int]
    lengths: list[int]
    keeps: list[int]
    num_outputs: list[int]
    num_queries: list[int]
    kept_starts: list[int]
    key_index: torch.Tensor
    cu_k: torch.Tensor
    window_index: torch.Tensor
    cu_q: torch.Tensor
    kept_row: torch.Tensor
    kept_pos: torch.Tensor
    slots: torch.Tensor
    lengths_dev: torch.Tensor
    keeps_dev: torch.Tensor
    out_starts: list[int]
    sources: list | None = None
    query_from: list[int] | None = None
    accumulate: bool = False
    key_span: tuple[int, int] | None = None
    window_span: tuple[int, int] | None = None
    pad_index: torch.Tensor | None = None
    layout: object | None = None
    gather_pos: torch.Tensor | None = None
    gather_base: torch.Tensor | None = None
    out_tok: torch.Tensor | None = None
    is_out: torch.Tensor | None = None
    memo: dict | None = None


@dataclass
class Chunk:
    """A row of this step that prefills part of a prompt being pruned, not its last part: what each layer keeps of
    it until the last chunk (stash_chunks)."""
    row: int
    start: int            # first token in the packed step
    c0: int               # tokens of the prompt computed before this step
    qlen: int             # this step's tokens
    prompt: int           # P
    num_queries: int      # the policy's scoring queries for P (the last ones of the prompt)
    carry: dict
    cu: torch.Tensor | None = None   # policies scoring with every query: device int32 [0, qlen, 0, c0 + qlen]


@dataclass
class StepPlan:
    """What the attention layers do after a step's attention: prune the rows of `plan` (None: none), keep what the
    last chunk will need of the chunks of `stash` ([Chunk]: prompts prefilled in chunks, pruned at their last
    chunk). block_table: the step's (unremapped) device block table, through which earlier chunks' keys are read
    back from the paged cache. nan: the builder's NanWatch, where the layers leave their NaN flags (None: the
    selection checks for NaN on the host). selection: a StepSelection when the plan's rows are selected once for
    every layer (None: per layer)."""
    plan: PrefillPlan | None
    stash: list
    block_table: torch.Tensor | None = None
    nan: NanWatch | None = None
    selection: StepSelection | None = None


LATE_ROWS = 32    # one-token prompt steps a step can capture by default (the buffers: 32 rows of queries per
                  # layer, 8 MiB for a Llama-3.1-8B shape)


def late_rows(max_num_seqs: int, long_prefill_token_threshold: int) -> int:
    """How many one-token prompt steps of pruned requests one step may hold, so LateRows never overflows. vLLM's
    scheduler cuts only the last prompt it schedules in a step short of its token budget, so at most one prompt
    a step is left with a one-token remainder, run at its next step: LATE_ROWS is ample. With
    long_prefill_token_threshold > 0 (not vLLM's default) every running prompt may be cut to that many tokens each
    step, so every request could end on a one-token step at once: max_num_seqs rows. (A pruned request never
    reads the prefix cache, so a cache hit cannot leave it one token either.)"""
    return max(LATE_ROWS, max_num_seqs) if long_prefill_token_threshold > 0 else LATE_ROWS


class LateRows:
    """Prompt steps of one token over earlier chunks (c0 > 0, qlen == 1) of requests that are pruned. vLLM's runners
    run such a row beside decodes as a decode (V2: `prefill_runs_as_decode`), so a batch of decodes and such rows
    replays a full CUDA graph, where the plugin's Python does not run. Such rows are therefore never planned in
    their own step, in any graph mode:
    - each attention layer's forward copies the rows of its query, key and value at `index` (a persistent tensor the
      builder writes each step; full graphs capture the copy) into its impl's buffers (`capture`);
    - the next build stashes them into the request's carry like any chunk (`stash_captured`: stash_chunks), and
    - a request whose last prompt token came that way is pruned at its next step, before that step's forward, by
      the builder (`late_steps`: plan_prefills of an empty step, c0 = P, qlen = 0). The scheduler frees its tail at
      that step's scheduling either way (manager.py), and that step attends to the pruned layout."""

    def __init__(self, device, rows: int = LATE_ROWS):
        self.rows = rows         # late_rows(): the layers' capture buffers have as many rows
        self.index = torch.zeros(rows, dtype=torch.long, device=device)
        self.pending = None      # StepPlan(None, [Chunk], block-table rows) captured by the last step's forward
        self.dirty = False       # index holds some step's token ids (reset before a step that may be shorter)

    def split(self, config, policy, steps, carries, block_table: torch.Tensor):
        """This step's prompt steps without the one-token rows of pruned requests, which are captured instead:
        returns (steps, carries) for plan_prefills. Writes `index` (no host sync)."""
        keep, kept_carries, captured = [], [], []
        for st, carry in zip(steps, carries):
            row, start, c0, qlen, prompt = st
            if qlen == 1 and c0 > 0 and keep_count(config, prompt) < prompt:
                if carry is None:
                    raise RuntimeError(f"colreduce_kvprune: batch row {row} prefills its prompt in chunks, and no "
                                       "per-request carry is known for it (the prompt-length tracker's row)")
                captured.append((st, carry))
            else:
                keep.append(st)
                kept_carries.append(carry)
        if len(captured) > self.rows:        # (late_rows() sizes it so that vLLM's scheduler cannot get here)
            raise RuntimeError(f"colreduce_kvprune: {len(captured)} prompts prefill a one-token chunk in one step, "
                               f"more than the {self.rows} the attention layers capture")
        dev = block_table.device
        if captured or self.dirty:
            ids = torch.zeros(self.rows, dtype=torch.long)
            ids[: len(captured)] = torch.tensor([st[1] for st, _ in captured], dtype=torch.long)
            self.index.copy_(to_device(ids, dev), non_blocking=True)
            self.dirty = bool(captured)
        if captured:
            rows = to_device(torch.tensor([st[0] for st, _ in captured], dtype=torch.long), dev)
            chunks = []
            for i, ((row, start, c0, qlen, prompt), carry) in enumerate(captured):
                ch = Chunk(i, i, c0, 1, prompt, _num_queries(policy, prompt), carry)
                if ch.num_queries == prompt:
                    ch.cu = to_device(torch.tensor([0, 1, 0, c0 + 1], dtype=torch.int32), dev)
                chunks.append(ch)
            self.pending = StepPlan(None, chunks, block_table.index_select(0, rows))
        return keep, kept_carries

    def stash_captured(self, layers, policy) -> None:
        """The last step's captured rows into their carries, at every layer (layers: [(layer index, attention
        layer)], whose impl holds the captured rows), before this step's forward overwrites them; a request whose
        last prompt token it was is marked for late_steps."""
        step, self.pending = self.pending, None
        if step is None:
            return
        for idx, layer in layers:
            impl = layer.impl
            stash_chunks(step, idx, policy, *impl.prune_captured, impl.prune_kv_views(layer.kv_cache), impl.scale)
        for ch in step.stash:
            if ch.c0 + 1 == ch.prompt:
                ch.carry["late"] = True

    @staticmethod
    def late_steps(steps, carries, query_start_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, prompts):
        """The rows of this step whose request's prompt ended in a captured one-token step and is not pruned yet:
        [(row, 0, P, 0, P)] for plan_prefills (the whole prompt in the cache, this step adding none of it), with
        their carries. Rows that prefill their prompt again from position 0 (recomputed after a preemption) are
        left to that prefill (plan_prefills clears their carry)."""
        prefilling = {st[0] for st in steps}
        out, out_carries = [], []
        for row, carry in enumerate(carries):
            if carry is None or not carry.get("late") or row in prefilling:
                continue
            computed = int(seq_lens_cpu[row]) - int(query_start_cpu[row + 1] - query_start_cpu[row])
            if computed >= prompts[row]:
                out.append((row, 0, prompts[row], 0, prompts[row]))
                out_carries.append(carry)
        return out, out_carries


class NanWatch:
    """NaN scores reported without a host sync in the layers: each layer's selection appends a device flag
    (`flags(layer)`); `flush` (the builder, once per step, after the previous step's layers were launched) copies
    the flags gathered so far to host memory asynchronously (pinned, with a CUDA event), and `check` reads the
    copies whose event has completed and raises naming the layers. On CPU the copy is complete at once, so a NaN is
    reported at the next step's build. A NaN in the last step of an engine's life goes unreported."""

    def __init__(self):
        self.pending: dict[int, list] = {}    # layer -> device bool flags not yet flushed
        self.copies: list = []                # (layers, host flags, event or None), in flush order

    def flags(self, layer: int) -> list:
        return self.pending.setdefault(layer, [])

    def flush(self) -> None:
        layers = [l for l, fs in self.pending.items() for _ in fs]
        if layers:
            flags = torch.stack([f for fs in self.pending.values() for f in fs])
            event = None
            if flags.is_cuda:
                host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
                host.copy_(flags, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                flags = host
            self.copies.append((layers, flags, event))
        self.pending = {}

    def check(self) -> None:
        while self.copies and (self.copies[0][2] is None or self.copies[0][2].query()):
            layers, host, _ = self.copies.pop(0)
            bad = sorted({l for l, f in zip(layers, host.tolist()) if f})
            if bad:
                raise RuntimeError(f"colreduce_kvprune: pruning scores contain NaN at layer(s) {bad} of an earlier "
                                   "prefill step (NaN queries or keys: check the model's dtype and inputs)")


class RowState:
    """Per-request pruning state in a (num_blocks, 3) int32 table indexed by the request's first block id:
    [offset L − keep, kept blocks cdiv(keep, bs), prefill blocks cdiv(L, bs)]; zeros = not pruned."""

    def __init__(self, num_blocks: int, device):
        self.table = torch.zeros(num_blocks, 3, dtype=torch.int32, device=device)

    def update_and_lookup(self, first_blocks: torch.Tensor, fresh_rows: list[int],
                          fresh_values: list[tuple[int, int, int]], never: list[int] = (),
                          now_rows: list[int] = (), now_values: list[tuple[int, int, int]] = ()) -> torch.Tensor:
        """first_blocks (n,) block ids of each row's first block. Rows in fresh_rows start a prefill now: their
        entries are (re)set to fresh_values and they get zeros (this step attends to the full prefill). Rows in
        `never` belong to requests that are never pruned (see prunable_rows): they get zeros whatever their entry
        holds — the builder skips the steps where no row can be pruned (no entry is reset then), so the entry of a
        block that an unpruned request reused may still be a finished pruned request's. Rows in now_rows were pruned
        before this step's forward (LateRows: by the builder): their entries are set to now_values, which they get.
        Returns (n, 3) int32 — the state each row's attention must apply in this step."""
        first_blocks = first_blocks.long()
        if now_rows:
            idx = to_device(torch.tensor(now_rows, dtype=torch.long), first_blocks.device)
            self.table[first_blocks[idx]] = to_device(torch.tensor(now_values, dtype=torch.int32),
                                                      first_blocks.device)
        vals = self.table[first_blocks]
        if fresh_rows:
            idx = to_device(torch.tensor(fresh_rows, dtype=torch.long), first_blocks.device)
            new = to_device(torch.tensor(fresh_values, dtype=torch.int32), first_blocks.device)
            self.table[first_blocks[idx]] = new
            vals[idx] = 0
        if never:
            vals[to_device(torch.tensor(never, dtype=torch.long), first_blocks.device)] = 0
        return vals


def prunable_rows(config, prompts: list[int | None], num_reqs: int, memo: dict) -> list[bool | None]:
    """Per batch row: True where its request is pruned (keep_count(P) < P for its prompt P: a pure function of P,
    so the scheduler and every layer agree), False where it never is, None where the row's prompt is not tracked
    (a dummy row). memo: P -> bool, kept by the caller across steps."""
    out = []
    for r in range(num_reqs):
        p = prompts[r] if prompts is not None else None
        if p is None:
            out.append(None)
            continue
        hit = memo.get(p)
        if hit is None:
            hit = memo[p] = keep_count(config, p) < p
        out.append(hit)
    return out


def copy_rows(block_table: torch.Tensor, seq_lens: torch.Tensor, out_block_table: torch.Tensor,
              out_seq_lens: torch.Tensor):
    """remap_rows for a batch in which no row is pruned: the block table and seq_lens copied into the builder's
    persistent buffers (which a captured CUDA graph reads), returned as views of the input shapes; the slot
    mapping is left as it is. Two copies instead of remap_rows' ~20 ops."""
    rows_bt, width = block_table.shape
    new_bt = out_block_table[:rows_bt, :width]
    new_bt.copy_(block_table)
    new_seq = out_seq_lens[: seq_lens.shape[0]]
    new_seq.copy_(seq_lens)
    return new_bt, new_seq


def prompt_steps(query_start_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, num_reqs: int,
                 prompts: list[int | None] | None = None, is_prefilling_cpu: torch.Tensor | None = None):
    """Rows whose step computes part of their prompt: [(row, start, c0, qlen, P)] — start: the row's first token in
    the packed step, c0: tokens computed before this step, qlen: this step's tokens (c0 + qlen = L, the row's length
    after the step), P = prompts[row] (the request's prompt length). A whole prompt in one step has c0 = 0 and
    L >= P (L − P outputs are recomputed after a preemption); with chunked prefill a prompt comes in several steps,
    the one with c0 < P <= L being its last. Rows of no tracked request (prompts None or holding None) count only
    when they prefill from position 0, with P = L. With vLLM's per-row is_prefilling flag (host tensor), rows it
    does not call prefilling are skipped: dummy and padding rows of profiling and CUDA-graph capture runs."""
    qs = query_start_cpu[: num_reqs + 1].tolist()
    sl = seq_lens_cpu[:num_reqs].tolist()
    flags = is_prefilling_cpu[:num_reqs].tolist() if is_prefilling_cpu is not None else [True] * num_reqs
    out = []
    for r in range(num_reqs):
        qlen = qs[r + 1] - qs[r]
        c0 = sl[r] - qlen
        p = prompts[r] if prompts is not None else None
        if not (sl[r] > 0 and qlen > 0 and flags[r]) or (p is None and c0 != 0):
            continue
        p = sl[r] if p is None else p
        if p <= 0:
            raise RuntimeError(f"colreduce_kvprune: batch row {r} has a tracked prompt of {p} tokens: the prompt "
                               "lengths tracked per row disagree with vLLM's batch (unsupported vLLM change?)")
        if c0 < p:
            out.append((r, qs[r], c0, qlen, p))
    return out


def check_prompt_lengths(prompts: list[int | None], targets: list[int | None], query_start_cpu: torch.Tensor,
                         seq_lens_cpu: torch.Tensor, is_prefilling_cpu: torch.Tensor | None, num_reqs: int):
    """Cross-check the tracked lengths against vLLM's own per-row flag is_prefilling (computed by the runner from its
    input batch: num_computed_tokens < targets[row], the prompt length P on the V1 runner, the tokens of the latest
    (re)fill on V2; None for rows of no tracked request): a row whose tracked length disagrees means the tracker's
    rows are not the attention rows (an unsupported vLLM change), and pruning would use wrong lengths.

    Rows the flag calls not prefilling although none of their tokens were computed before this step cannot be a
    request's (a request's first step prefills its prompt): they are rows of a dummy batch (CUDA-graph capture,
    warm-up), whose slots may still hold an earlier request's lengths (V2's req_idx of a dummy batch is 0..n-1).
    Their tracked lengths are dropped. Returns (prompts, targets) with those rows None. Host tensors only."""
    if is_prefilling_cpu is None:
        return prompts, targets
    rows = [r for r in range(num_reqs) if targets[r] is not None]
    if not rows:
        return prompts, targets
    idx = torch.tensor(rows)
    target = torch.tensor([targets[r] for r in rows])
    computed = seq_lens_cpu[idx] - (query_start_cpu[idx + 1] - query_start_cpu[idx])
    flag = is_prefilling_cpu[idx].bool()
    dummy = (computed == 0) & ~flag
    if bool(dummy.any()):
        prompts, targets = list(prompts), list(targets)
        for i in dummy.nonzero()[:, 0].tolist():
            prompts[rows[i]] = targets[rows[i]] = None
    bad = ((computed < target) != flag) & ~dummy
    if bool(bad.any()):
        r = rows[int(bad.nonzero()[0, 0])]
        raise RuntimeError(f"colreduce_kvprune: batch row {r} has a tracked prompt of {targets[r]} tokens, "
                           "which disagrees with vLLM's is_prefilling flag for that row: the prompt lengths tracked "
                           "per row do not follow vLLM's batch (unsupported vLLM change?)")
    return prompts, targets


def plan_prefills(config, policy, steps, block_table: torch.Tensor, block_size: int, carries=None):
    """Host-side plan for the prompt steps [(row, start, c0, qlen, P)] of a step (see prompt_steps).

    A prompt that is pruned (keep(P) < P) is scored and compacted at the step that completes it (c0 < P <= L =
    c0 + qlen). A step that holds only part of it (chunked prefill, L < P) is stashed (stash_chunks): its keys and
    values stay in the paged cache, where vLLM wrote them, and are read back at the last chunk; what the cache does
    not hold — the queries of the policy's scoring window, or for a policy scoring with every query (H2O) the column
    sums of this chunk's queries — goes into the request's carry (a dict from the prompt-length tracker). The last
    chunk then scores the prompt as one whole prefill would (`assemble`).
    Returns (fresh_rows, fresh_values, PrefillPlan | None, stash): the RowState entries to set (zeros at a prompt's
    first step, the pruned layout at its last), the plan of the rows pruned now, and the [Chunk] to stash."""
    fresh_rows, fresh_values, pruned, stash = [], [], [], []
    for i, (row, start, c0, qlen, prompt) in enumerate(steps):
        keep = keep_count(config, prompt)
        length = c0 + qlen
        carry = carries[i] if carries is not None else None
        if c0 > 0 or length < prompt:
            if keep < prompt and carry is None:
                raise RuntimeError(f"colreduce_kvprune: batch row {row} prefills its prompt in chunks, and no "
                                   "per-request carry is known for it (the prompt-length tracker's row)")
        if keep >= prompt or length < prompt:
            if c0 == 0:                             # the prompt's first step: this request's entry starts at zero
                fresh_rows.append(row)
                fresh_values.append((0, 0, 0))
                if carry is not None:
                    carry.clear()                   # left by an attempt before a preemption
            if keep < prompt:
                stash.append(Chunk(row, start, c0, qlen, prompt, _num_queries(policy, prompt), carry))
            continue
        off = prompt - keep
        fresh_rows.append(row)
        fresh_values.append((off, cdiv(length - off, block_size), cdiv(length, block_size)))
        pruned.append((row, start, c0, qlen, prompt, keep, length - prompt, carry if c0 else None))
    dev = block_table.device
    summed = [ch for ch in stash if ch.num_queries == ch.prompt]
    if summed:       # the cu_seqlens of each stashed chunk's column sums, on the device once per step
        cu = to_device(torch.tensor([[0, ch.qlen, 0, ch.c0 + ch.qlen] for ch in summed], dtype=torch.int32), dev)
        for ch, row in zip(summed, cu.unbind(0)):
            ch.cu = row
    if not pruned:
        return fresh_rows, fresh_values, None, stash
    rows, steps_at, c0s, qlens, lengths, keeps, outs, carried = (list(x) for x in zip(*pruned))
    full = [c + q for c, q in zip(c0s, qlens)]                  # L per row
    nq = [_num_queries(policy, n) for n in lengths]
    accumulate = any(m == n and m > 0 for m, n in zip(nq, lengths))   # every query scores (H2O)
    if any(c0s):          # a last chunk: every pruned row is assembled (keys 0..L-1, queries query_from..L-1)
        starts = [0] + list(_cumsum(full))[:-1]
        qfrom = [c if accumulate else min(c, n - m) for c, n, m in zip(c0s, lengths, nq)]
        qstarts = [0] + list(_cumsum([f - a for f, a in zip(full, qfrom)]))[:-1]
        sources = list(zip(steps_at, c0s, qlens, carried, rows))
        # scoring queries in the query layout: the window (last nq prompt queries) or, accumulating, the prompt
        # queries of this chunk (earlier chunks' are in the partial sums)
        wins = [(q + (c - a if accumulate else n - m - a), q + n - a)
                for q, a, c, n, m in zip(qstarts, qfrom, c0s, lengths, nq)]
        out_starts = [q + n - a for q, a, n in zip(qstarts, qfrom, lengths)]
    else:
        starts, sources, qfrom = steps_at, None, None
        wins = [(s + n - m, s + n) for s, n, m in zip(starts, lengths, nq)]
        out_starts = [s + n for s, n in zip(starts, lengths)]
    key_index = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    window_index = torch.cat([torch.arange(a, b) for a, b in wins])
    cu_k = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_q = torch.tensor([0] + [b - a for a, b in wins], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    totals = [k + g for k, g in zip(keeps, outs)]
    kept_row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(totals))
    kept_pos = torch.cat([torch.arange(t) for t in totals])
    kept_row_d, kept_pos_d = to_device(kept_row, dev), to_device(kept_pos, dev)
    rows_d, starts_d, lengths_d, keeps_d = to_device(torch.tensor([rows, starts, lengths, keeps]), dev).unbind(0)
    slots = (block_table[rows_d[kept_row_d], kept_pos_d // block_size].long() * block_size
             + kept_pos_d % block_size)
    # once per step, for every layer (device ops on the tensors above: no host sync, no large copy)
    n_max, kmax = max(lengths), max(keeps)
    packed_start = lengths_d.cumsum(0) - lengths_d
    pad_index = (torch.minimum(torch.arange(n_max, device=dev), lengths_d[:, None] - 1)
                 + packed_start[:, None])[:, None, :]
    layout = None
    if policy.uniform_heads and policy.uniform_layers:
        layout = policy.selection_layout(lengths_d, keeps_d, n_max, kmax)
    out_tok = is_out = None
    if any(outs):         # the packed token id of each output entry, −1 for a prompt entry
        out_tok = to_device(torch.cat([torch.cat([torch.full((k,), -1), torch.arange(s + n, s + n + g)])
                                       for s, n, k, g in zip(starts, lengths, keeps, outs)]), dev)[:, None]
        is_out = out_tok >= 0
    plan = PrefillPlan(rows=rows, starts=starts, lengths=lengths, keeps=keeps, num_outputs=outs,
                       num_queries=[b - a for a, b in wins], kept_starts=[0] + list(_cumsum(totals))[:-1],
                       key_index=to_device(key_index, dev), cu_k=to_device(cu_k, dev),
                       window_index=to_device(window_index, dev), cu_q=to_device(cu_q, dev),
                       kept_row=kept_row_d, kept_pos=kept_pos_d,
                       slots=slots, lengths_dev=lengths_d, keeps_dev=keeps_d, out_starts=out_starts,
                       sources=sources, query_from=qfrom, accumulate=accumulate,
                       key_span=_span([(s, s + n) for s, n in zip(starts, lengths)]), window_span=_span(wins),
                       pad_index=pad_index, layout=layout, gather_pos=kept_pos_d.clamp(max=max(kmax - 1, 0)),
                       gather_base=starts_d[kept_row_d][:, None], out_tok=out_tok, is_out=is_out, memo={})
    return fresh_rows, fresh_values, plan, stash


def _span(ranges):
    """(first, end) when the [a, b) ranges are back to back (one contiguous range), else None."""
    if all(b0 == a1 for (_, b0), (a1, _) in zip(ranges, ranges[1:])):
        return ranges[0][0], ranges[-1][1]
    return None


def _num_queries(policy, n: int) -> int:
    """The prompt queries the policy scores a prompt of n tokens with (its last ones; 0: no queries)."""
    req = policy.score_request(n)
    return min(req.num_queries, n) if req.kind == "attention" else 0


def _partial_reduction(req) -> tuple[str, str | None]:
    """(reduction, group_reduce) of one chunk's column sums, combined over chunks by sum (max for max): the query
    reduction without the division of mean, and the group reduction only where it commutes with that combination
    (otherwise per query head, reduced at the end: finish_partial)."""
    if req.reduction == "max":
        return "max", req.group_reduce if req.group_reduce in (None, "max") else None
    return "sum", req.group_reduce if req.group_reduce in (None, "sum", "mean") else None


def _finish_partial(req, scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Column sums over all P prompt queries (H, P), from _partial_reduction's → the policy's raw scores
    (Hkv, P): mean divides by the queries that see each column (P − j, causal), then the group reduction."""
    n = scores.shape[1]
    if req.reduction == "mean":
        scores = scores / torch.arange(n, 0, -1, device=scores.device, dtype=scores.dtype)
    if req.group_reduce is not None and _partial_reduction(req)[1] is None:
        grouped = scores.view(num_kv_heads, -1, n)
        scores = {"sum": grouped.sum(1), "mean": grouped.mean(1), "max": grouped.amax(1)}[req.group_reduce]
    return scores


def stash_chunks(step: StepPlan, layer: int, policy, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 cache_views, scale: float) -> None:
    """What the last chunk of each stashed prompt will need from this step at `layer` and cannot read back from
    the paged cache, into the request's carry: the queries of the scoring window that fall in this chunk (copied:
    the step's tensors are reused), or, for a policy scoring with every query, this chunk's column sums over the
    keys so far added to the sums of the earlier chunks. cache_views: (key_cache, value_cache) as
    (num_blocks, block_size, Hkv, D) views of the layer's cache, where vLLM wrote this chunk's keys before the
    attention; None for a backend whose cache layout cannot be read here (vLLM's CPU backend packs keys per ISA):
    then the chunk's keys and values are kept in the carry as well (host memory)."""
    for ch in step.stash:
        rows = slice(ch.start, ch.start + ch.qlen)
        if cache_views is None:
            ch.carry.setdefault(("kv", layer), []).append((key[rows].clone(), value[rows].clone()))
        if ch.num_queries == ch.prompt:
            reduction, group = _partial_reduction(policy.score_request(ch.prompt))
            part = _chunk_column_sums(step, ch, layer, query[rows], cache_views, scale, reduction, group)
            acc = ch.carry.get(layer)
            if acc is None:
                acc = ch.carry[layer] = part.new_zeros(part.shape[0], ch.prompt)
            cols = acc[:, : ch.c0 + ch.qlen]
            if reduction == "max":
                torch.maximum(cols, part, out=cols)
            else:
                cols += part
        elif ch.num_queries:
            a, b = max(ch.c0, ch.prompt - ch.num_queries), min(ch.c0 + ch.qlen, ch.prompt)
            if a < b:
                ch.carry.setdefault(layer, []).append(query[ch.start + a - ch.c0: ch.start + b - ch.c0].clone())


def _chunk_column_sums(step: StepPlan, ch: Chunk, layer: int, q: torch.Tensor, cache_views, scale: float,
                       reduction: str, group: str | None):
    """(H, c0 + qlen) float32: the chunk's queries' causal column sums (or maxima) over the prompt's keys so far."""
    from .. import colreduce_paged, colreduce_varlen

    n, cu_q = ch.c0 + ch.qlen, ch.cu[:2]                # ch.cu: plan_prefills, on the device once per step
    if cache_views is None:
        keys = torch.cat([k for k, _ in ch.carry[("kv", layer)]])
        return colreduce_varlen(q, keys, cu_q, ch.cu[2:], reduction, max_seqlen_q=ch.qlen, max_seqlen_k=n,
                                is_causal=True, scale=scale, group_reduce=group).t()
    return colreduce_paged(q, cache_views[0], step.block_table[ch.row: ch.row + 1], cu_q, ch.cu[3:], reduction,
                           max_seqlen_q=ch.qlen, max_seqlen_k=n, is_causal=True, scale=scale,
                           group_reduce=group)[0]


def assemble(plan: PrefillPlan, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             cache_views, block_table: torch.Tensor, block_size: int, *, values: bool = True, keys: bool = True):
    """For a plan with chunked rows (plan.sources): (query, key, value, partials) in the layout the plan indexes.
    key/value: every pruned row's tokens 0..L−1 back to back. With cache_views ((key_cache, value_cache) as
    (num_blocks, block_size, Hkv, D) views), all of them read from the paged cache through the rows' block tables,
    where vLLM wrote this step's keys and values before the attention as it wrote the earlier chunks': one gather
    each for keys and values, whatever the rows (positions made once per step). Without (cache_views None, see
    stash_chunks): the earlier chunks' from the carry, then this step's rows. query: positions query_from..L−1 of
    each row, the stashed window queries then this step's. partials: per row, the column sums of the earlier
    chunks' queries (accumulating policies) or None. The row's carry of `layer` is released. Everything is read
    before any compacted row is written (the caller writes after this returns). values=False (with cache_views
    only): no value gather, None in its place (the step path reads the kept values from the cache itself);
    keys=False likewise for the keys (the step path's scores read them in the cache: scores_from_cache)."""
    if not (values and keys) and cache_views is None:
        raise ValueError("assemble: values=False or keys=False needs cache_views (without them the keys and values "
                         "come from the carry)")
    qs, ks, vs, partials = [], [], [], []
    for (start, c0, qlen, carry, row), qfrom, n in zip(plan.sources, plan.query_from, plan.lengths):
        stashed = carry.pop(layer, None) if carry is not None else None
        if plan.accumulate:
            have = 0 if stashed is None else stashed.shape[1]
            if c0 and have != n:
                raise RuntimeError(f"colreduce_kvprune: a chunked prompt of {n} tokens reached its last chunk at "
                                   f"layer {layer} without the column sums of its earlier chunks")
            partials.append(stashed if c0 else None)
        else:
            got = sum(t.shape[0] for t in stashed or ())
            if got != c0 - qfrom:
                raise RuntimeError(f"colreduce_kvprune: a chunked prompt reached its last chunk with {got} stashed "
                                   f"window queries at layer {layer}, expected {c0 - qfrom}")
            qs.extend(stashed or ())
            partials.append(None)
        qs.append(query[start: start + qlen])
        if cache_views is not None:
            continue
        if c0:
            kv = carry.pop(("kv", layer), [])
            got = sum(k.shape[0] for k, _ in kv)
            if got != c0:
                raise RuntimeError(f"colreduce_kvprune: a chunked prompt reached its last chunk with {got} stashed "
                                   f"tokens at layer {layer}, expected {c0}")
            ks.extend(k for k, _ in kv)
            vs.extend(v for _, v in kv)
        ks.append(key[start: start + qlen])
        vs.append(value[start: start + qlen])
    query = qs[0] if len(qs) == 1 else torch.cat(qs)          # one row, nothing stashed: a view, no copy
    if cache_views is None:
        return query, torch.cat(ks), torch.cat(vs), partials
    if not (keys or values):
        return query, None, None, partials
    where = plan.memo.get("cache_positions")
    if where is None:                       # (ΣL, 1) places, against every head
        blocks, slots = _cache_positions(plan, block_table, block_size)
        where = plan.memo["cache_positions"] = (blocks[:, None], slots[:, None],
                                                _heads(plan, cache_views[0].shape[2], blocks.device, 2))
    return (query, _read_assembled(plan, cache_views[0], where) if keys else None,
            _read_assembled(plan, cache_views[1], where) if values else None, partials)


def _read_assembled(plan: PrefillPlan, view: torch.Tensor, where) -> torch.Tensor:
    layout = cache_layout(view)
    rows = None
    if layout is not None:                  # the row ids, once per step and layout
        rows = plan.memo.get(("cache_rows", layout))
        if rows is None:
            rows = plan.memo[("cache_rows", layout)] = cache_rows(layout, *where)
    return read_cache(view, layout, *where, rows)


def _cache_positions(plan: PrefillPlan, block_table: torch.Tensor, block_size: int):
    """(blocks, slots) (ΣL,) int64 each: the paged-cache place of every assembled position (each row's tokens
    0..L−1, back to back), made once per step for every layer (host lists, one copy to the device, no sync)."""
    spans = [(row, c0 + qlen) for _, c0, qlen, _, row in plan.sources]
    rows = torch.cat([torch.full((n,), r) for r, n in spans])
    pos = torch.cat([torch.arange(n) for _, n in spans])
    rows, pos = to_device(torch.stack([rows, pos]), block_table.device).unbind(0)
    return block_table[rows, pos // block_size].long(), pos % block_size


def cache_layout(view: torch.Tensor):
    """How read_cache reads a (num_blocks, block_size, Hkv, D) cache view: (R, r0, r1, r2) when its storage can be
    seen as rows of D elements R apart (R ≥ D, every stride a multiple of R, unit last stride), entry (b, s, h)
    being row b·r0 + s·r1 + h·r2: vLLM 0.32's CUDA layout ((num_blocks, Hkv, block_size, 2·D), keys then values
    along the last dim: R = 2·D) and any contiguous view (R = D). None otherwise (read by indexing)."""
    s0, s1, s2, s3 = view.stride()
    r = math.gcd(math.gcd(s0, s1), s2)
    if s3 != 1 or r < view.shape[3]:
        return None
    return r, s0 // r, s1 // r, s2 // r


def cache_rows(layout, blocks: torch.Tensor, slots: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """The row ids of read_cache for places (blocks, slots, heads), broadcast together (int64)."""
    _, r0, r1, r2 = layout
    return blocks * r0 + slots * r1 + heads * r2


def read_cache(view: torch.Tensor, layout, blocks: torch.Tensor, slots: torch.Tensor, heads: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """Entries of a (num_blocks, block_size, Hkv, D) cache view at places (blocks, slots, heads), broadcast
    together → (*places, D). With a layout (cache_layout) and its rows (cache_rows), one row gather (index_select
    over the view's storage seen as rows): PyTorch's multi-index gather, the fallback, reads a fraction of the
    memory bandwidth and costs more host time."""
    if layout is None:
        return view[blocks, slots, heads]
    r, r0, r1, r2 = layout
    nb, bs, h, d = view.shape
    flat = view.as_strided(((nb - 1) * r0 + (bs - 1) * r1 + (h - 1) * r2 + 1, d), (r, 1))
    return flat.index_select(0, rows.flatten()).view(*rows.shape, d)


def scatter_outputs(plan: PrefillPlan, assembled: torch.Tensor, output: torch.Tensor) -> None:
    """Copy the recomputed output rows (positions P..L−1 of each row, all in this step's chunk) of an assembled plan
    back to the step's output tensor."""
    for b, (start, c0, qlen, _, _) in enumerate(plan.sources):
        g = plan.num_outputs[b]
        if g:
            a = plan.out_starts[b]
            s = start + plan.lengths[b] - c0
            output[s: s + g] = assembled[a: a + g]


def remap_rows(state: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, positions: torch.Tensor,
               query_start: torch.Tensor, num_tokens: int, slot_mapping: torch.Tensor, block_size: int,
               out_block_table: torch.Tensor, out_seq_lens: torch.Tensor):
    """Apply the pruned layout to every row (vectorised, no host sync). state (n, 3) from RowState; block_table
    (≥n, W); seq_lens (≥n,); positions (≥num_tokens,) logical; query_start (n+1,) device; slot_mapping is rewritten
    in place for the tokens of pruned rows (the runner passes the same tensor to the KV-cache write).
    The remapped block table and seq_lens are written into out_block_table / out_seq_lens (≥ the input shapes; the
    builder's own persistent buffers, which CUDA graphs capture) and returned as views of the input shapes; the
    inputs are left untouched (the runners read their seq_lens after the forward: V2's sampler tells chunked
    prefills by seq_lens < prefill_len). Rows with offset 0 are copied unchanged."""
    n = state.shape[0]
    off, kept_blocks, prefill_blocks = (x.long() for x in state.unbind(1))
    rows_bt, width = block_table.shape
    j = torch.arange(width, device=block_table.device)
    src = torch.where(j < kept_blocks[:, None], j, j - kept_blocks[:, None] + prefill_blocks[:, None])
    new_bt = out_block_table[:rows_bt, :width]
    new_bt[n:] = block_table[n:]
    new_bt[:n] = block_table[:n].gather(1, src.clamp_(max=width - 1))
    new_seq = out_seq_lens[: seq_lens.shape[0]]
    new_seq[n:] = seq_lens[n:]
    torch.sub(seq_lens[:n], off.to(seq_lens.dtype), out=new_seq[:n])
    if num_tokens:
        qlen = query_start[1: n + 1] - query_start[:n]
        row = torch.repeat_interleave(torch.arange(n, device=qlen.device), qlen.long(), output_size=num_tokens)
        c = positions[:num_tokens].long() - off[row]
        c = c.clamp(min=0)
        slot = new_bt[row, c // block_size].long() * block_size + c % block_size
        sm = slot_mapping[:num_tokens]
        sm.copy_(torch.where(off[row] > 0, slot.to(sm.dtype), sm))
    return new_bt, new_seq


def row_scores(policy, plan: PrefillPlan, query: torch.Tensor, key: torch.Tensor, *, layer: int, scale: float,
               backend: str = "auto", head_offset: int = 0, partials: list | None = None) -> list[torch.Tensor]:
    """The policy's scores of every pruned row at one layer: [(Hkv, P_b)] (see select_kept for the arguments)."""
    req = policy.score_request(max(plan.lengths))
    bounds = list(zip([0] + list(_cumsum(plan.lengths))[:-1], _cumsum(plan.lengths)))
    if req.kind == "attention":
        from .. import colreduce_varlen

        # chunked prompts of a policy scoring with every query: this chunk's prompt queries' column sums, added to
        # the earlier chunks' (partials), then finished as the policy's reduction
        summed = plan.accumulate and plan.sources is not None
        reduction, group = _partial_reduction(req) if summed else (req.reduction, req.group_reduce)
        raw = colreduce_varlen(query[plan.window_index], key[plan.key_index], plan.cu_q, plan.cu_k, reduction,
                               max_seqlen_q=max(plan.num_queries), max_seqlen_k=max(plan.lengths),
                               is_causal=True, scale=scale, group_reduce=group, backend=backend)
        scores = []
        for (a, b), part in zip(bounds, partials or [None] * len(bounds)):
            s = raw[a:b].t()
            if summed:
                if part is not None:
                    s = torch.maximum(s, part) if reduction == "max" else s + part
                s = _finish_partial(req, s, key.shape[1])
            scores.append(policy.postprocess_scores(s))
    elif req.kind == "random":
        scores = [to_device(policy.random_scores(key.shape[1], b - a, layer, head_offset), key.device)
                  for a, b in bounds]
    else:
        keys = key[plan.key_index]
        scores = [policy.scores(None, keys[a:b].transpose(0, 1), layer=layer) for a, b in bounds]
    return scores


def scores_from_cache(policy, plan: PrefillPlan) -> bool:
    """Whether padded_scores can read a last chunk's keys in the paged cache (`paged`) instead of assembled ones:
    attention scores of the rows' window queries, with no column sums carried over from earlier chunks."""
    return (plan.sources is not None and not plan.accumulate and not any(plan.num_outputs)
            and policy.score_request(max(plan.lengths)).kind == "attention")


def score_paged(policy, plan: PrefillPlan, query: torch.Tensor, key_cache: torch.Tensor, table: torch.Tensor,
                seqlens: torch.Tensor, *, scale: float, backend: str = "auto") -> torch.Tensor:
    """The attention scores of the plan's window queries against each row's keys where they lie in a paged cache
    (colreduce_paged; table (B, max_blocks) and seqlens (B,): the plan's rows) → (B, H, P_max), zero past each
    row's length. padded_scores' paged path, and what the engine-start warm-up compiles (warmup.py)."""
    from .. import colreduce_paged

    req = policy.score_request(max(plan.lengths))
    return colreduce_paged(_rows(query, plan.window_index, plan.window_span), key_cache, table, plan.cu_q, seqlens,
                           req.reduction, max_seqlen_q=max(plan.num_queries), max_seqlen_k=max(plan.lengths),
                           is_causal=True, scale=scale, group_reduce=req.group_reduce, backend=backend)


def _table_rows(plan: PrefillPlan, device) -> torch.Tensor:
    """plan.rows (each pruned row's row in the step's block table) on the device, copied once per step."""
    rows = plan.memo.get("table_rows")
    if rows is None:
        rows = plan.memo["table_rows"] = to_device(torch.tensor(plan.rows), device)
    return rows


def _paged_rows(plan: PrefillPlan, block_table: torch.Tensor):
    """(the plan rows' block-table rows (B, max_blocks rounded up to a multiple of 16, zeros past max_blocks), their
    prompt lengths (B,) int32), made once per step. The rounding fixes the table's row stride, an integer on which
    Triton specialises (16-divisibility), to the kind the engine-start warm-up compiled (warmup.score_lengths)."""
    key = ("paged_rows", block_table.data_ptr(), tuple(block_table.shape))
    got = plan.memo.get(key)
    if got is None:
        rows = _table_rows(plan, block_table.device)
        table = block_table.new_zeros(len(plan.rows), -(-block_table.shape[1] // 16) * 16)
        table[:, : block_table.shape[1]] = block_table.index_select(0, rows)
        got = plan.memo[key] = (table, to_device(torch.tensor(plan.lengths, dtype=torch.int32), block_table.device))
    return got


def padded_scores(policy, plan: PrefillPlan, query: torch.Tensor, key: torch.Tensor | None, *, layer: int,
                  scale: float, backend: str = "auto", head_offset: int = 0, partials: list | None = None,
                  paged=None) -> torch.Tensor:
    """row_scores as one padded tensor (B, Hkv, P_max), row b's first P_b columns bitwise equal to row_scores'
    b-th; the other columns are padding (some request's real scores repeated: they hold a NaN only where the
    request's own scores do). Attention and key-norm scores come packed, (ΣP, Hkv), from one call for every row;
    one indexing op (plan.pad_index) lays them out padded, and the policy post-processes all rows at once
    (postprocess_padded: SnapKV's pooling), so the op count does not grow with the rows. Positional scores
    (kind "none", a function of the position only) are made once per step. The rest (random scores drawn on the
    host, the last chunk of a chunked prompt scored with every query) goes through row_scores and is padded.

    paged: (key_cache as (num_blocks, block_size, Hkv, D), the step's block table) when scores_from_cache: key is
    then None and colreduce_paged scores each row's prompt where vLLM wrote it, straight into the padded layout
    (zero past each row's length instead of repeated scores: padding, never selected), no gather of the keys."""
    req = policy.score_request(max(plan.lengths))
    if paged is not None:
        if not scores_from_cache(policy, plan):
            raise ValueError("padded_scores: paged keys need scores_from_cache(policy, plan)")
        padded = score_paged(policy, plan, query, paged[0], *_paged_rows(plan, paged[1]), scale=scale,
                             backend=backend)
        return policy.postprocess_padded(padded, plan.layout)
    heads = key.shape[1]
    if req.kind == "none":
        cached = plan.memo.get(("none", heads))
        if cached is None:      # (1, Hkv, P_max): the scores of the longest row, whose prefixes are the others'
            cached = policy.scores(None, key.new_empty((heads, max(plan.lengths), 0)), layer=layer)[None]
            plan.memo[("none", heads)] = cached
        return cached
    summed = plan.accumulate and plan.sources is not None
    if req.kind == "attention" and not summed:
        from .. import colreduce_varlen

        raw = colreduce_varlen(_rows(query, plan.window_index, plan.window_span),
                               _rows(key, plan.key_index, plan.key_span), plan.cu_q, plan.cu_k, req.reduction,
                               max_seqlen_q=max(plan.num_queries), max_seqlen_k=max(plan.lengths),
                               is_causal=True, scale=scale, group_reduce=req.group_reduce, backend=backend)
    elif req.kind == "key_norm":
        raw = policy.key_scores(_rows(key, plan.key_index, plan.key_span))
    else:
        return pad_scores(row_scores(policy, plan, query, key, layer=layer, scale=scale, backend=backend,
                                     head_offset=head_offset, partials=partials))
    padded = raw[plan.pad_index, _heads(plan, raw.shape[1], raw.device, 3)]        # (B, Hkv, P_max)
    return policy.postprocess_padded(padded, plan.layout)


def _rows(x: torch.Tensor, index: torch.Tensor, span) -> torch.Tensor:
    """x's rows at index: a slice (a view, no copy) when they are one contiguous range."""
    return x[span[0]: span[1]] if span is not None else x[index]


def _heads(plan: PrefillPlan, heads: int, device, dims: int) -> torch.Tensor:
    """arange(heads) shaped (1, heads, 1) (dims 3) or (1, heads) (dims 2), made once per step."""
    t = plan.memo.get((heads, dims))
    if t is None:
        t = plan.memo[(heads, dims)] = torch.arange(heads, device=device).view((1, heads, 1)[:dims])
    return t


def select_kept(policy, plan: PrefillPlan, query: torch.Tensor, key: torch.Tensor, *, layer: int, scale: float,
                backend: str = "auto", head_offset: int = 0, gather_heads=None, rank_heads: int = 0,
                partials: list | None = None, nan_flags: list | None = None) -> torch.Tensor:
    """Scores and selection for every pruned row of the step at one layer.

    query (T, Hq, D) after RoPE, key (T, Hkv, D) after RoPE (the step's packed tensors; under tensor parallelism a
    rank's slice of the heads). head_offset: the model-wide index of key's first kv head (the random policy draws
    per model-wide head). gather_heads: None on one rank; under tensor parallelism a callable concatenating a
    (Hkv, X) tensor of every rank along dim 0, in rank order, and rank_heads the position of this rank's heads in
    it. partials: from assemble (a chunked prompt's earlier column sums, accumulating policies). nan_flags: None
    (NaN scores raise here, a host sync) or a list to which the selection appends a device NaN flag (NanWatch).
    No host sync otherwise: lengths and keep counts come from the plan's device tensors. per_head=false
    shares one token set over all kv heads, so its scores are gathered from every rank first
    and each rank keeps its own rows of the common selection (then every rank selects as one device would).
    Returns (B, Hkv, K_max) int64 kept token indices per row, ascending (padded with −1 beyond keeps[b]); equal
    to Policy.select_batched of row_scores. Per layer a fixed number of aten ops, whatever the number of rows
    (benchmarks/prune_ops.py): the plan's per-step tensors (padded_scores, policy.select_padded)."""
    if plan.layout is None:      # a policy select_batched refuses (different counts per head or per layer)
        scores = row_scores(policy, plan, query, key, layer=layer, scale=scale, backend=backend,
                            head_offset=head_offset, partials=partials)
        return policy.select_batched(scores, layer=layer, device_lengths=plan.lengths_dev,
                                     device_counts=plan.keeps_dev, nan_flags=nan_flags)[0]
    padded = layer_scores(policy, plan, query, key, layer=layer, scale=scale, backend=backend,
                          head_offset=head_offset, gather_heads=gather_heads, partials=partials)
    if nan_flags is None and torch.isnan(padded).any():          # a host sync: callers without a NanWatch
        for b, n in enumerate(plan.lengths):
            if torch.isnan(padded[min(b, padded.shape[0] - 1), :, :n]).any():
                raise ValueError(f"scores[{b}] contain NaN")
    if nan_flags is not None:
        nan_flags.append(torch.isnan(padded).any())
    return select_scores(policy, plan, padded, key.shape[1], gathered=gather_heads is not None,
                         rank_heads=rank_heads)


def layer_scores(policy, plan: PrefillPlan, query: torch.Tensor, key: torch.Tensor | None, *, layer: int,
                 scale: float, backend: str = "auto", head_offset: int = 0, gather_heads=None,
                 partials: list | None = None, paged=None) -> torch.Tensor:
    """select_kept's first half, for a plan with a layout: the padded scores (B or 1, Hkv, P_max) of one layer;
    per_head=false under tensor parallelism, every rank's heads (B, Hkv of all ranks, P_max)."""
    padded = padded_scores(policy, plan, query, key, layer=layer, scale=scale, backend=backend,
                           head_offset=head_offset, partials=partials, paged=paged)
    if gather_heads is not None and not policy.config.per_head:
        b, n = len(plan.lengths), padded.shape[2]
        every = gather_heads(padded.expand(b, -1, -1).transpose(0, 1).reshape(padded.shape[1], b * n))
        padded = every.view(-1, b, n).transpose(0, 1).contiguous()             # (B, Hkv of all ranks, P_max)
    return padded


def select_scores(policy, plan: PrefillPlan, padded: torch.Tensor, heads: int, *, gathered: bool = False,
                  rank_heads: int = 0) -> torch.Tensor:
    """select_kept's second half: layer_scores' output (leading dims, e.g. layers, allowed) → (..., B, heads,
    K_max) kept indices of this rank's `heads` kv heads (`gathered`: the scores hold every rank's heads, this
    rank's from rank_heads on)."""
    idx = policy.select_padded(padded, plan.layout)
    if gathered and not policy.config.per_head:
        idx = idx[..., rank_heads: rank_heads + heads, :]
    b = len(plan.lengths)
    return idx.expand(*idx.shape[:-3], b, -1, -1) if idx.shape[-3] != b else idx


class StepSelection:
    """Select once per step instead of once per layer: every layer's scores go into one stacked (layers, B, Hkv,
    P_max) buffer, and when the step's last layer has added its own, one selection serves them all (the NaN
    check, the top-k's sorts and fills run once, not per layer), then each layer's gather and write runs
    (`finish`: a callable per layer taking the step's StepKept and the layer's position i in it: its (B, Hkv,
    K_max) indices are kept.idx[i]). The writes move from each
    layer's forward to the last one's: nothing in the step reads a layer's cache after its own attention. Used
    for plans with a layout and no recomputed outputs (those rewrite the layer's attention output, which the next
    layer reads: they stay per layer). num_layers: the attention layers that share the step's metadata.

    The stacked scores and the selection's temporaries are memory vLLM's profiling does not see: the buffer is
    float32, layers × rows × kv heads × longest prompt, and with one selection over the whole buffer the step's
    peak beyond what was allocated before it measured 13× the buffer on the H200 (prune_path.py, eighth session:
    104, 209 and 417 MiB for buffers of 8, 16 and 32 MiB; most of it the sort's float64 key, values, int64
    indices and scratch). So the selection runs over groups of layers of at most SORT_BYTES of scores (each
    layer's selection is its own: the same indices), which bounds the temporaries near 13 × SORT_BYTES, and
    steps whose buffer would exceed MAX_BYTES select per layer (`fits`), as every step did before: a peak near
    MAX_BYTES + 13 × SORT_BYTES ≈ 0.3 GiB. One 16k prompt of a Llama-3.1-8B shape (16 MiB) is one group; one
    64k prompt the largest step selected once."""
    MAX_BYTES = 64 << 20
    SORT_BYTES = 16 << 20

    @classmethod
    def fits(cls, num_layers: int, rows: int, heads: int, n_max: int) -> bool:
        return num_layers * rows * heads * n_max * 4 <= cls.MAX_BYTES

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.stacked = None
        self.finish = {}                 # layer index -> callable(kept, i), in the order the layers ran
        self.done = False

    def add(self, policy, plan: PrefillPlan, layer: int, scores: torch.Tensor, finish, *, heads: int,
            gathered: bool = False, rank_heads: int = 0, nan: NanWatch | None = None) -> bool:
        """Add one layer's layer_scores; after the last layer's, select and run every layer's finish. Returns
        True when this call finished the step."""
        if self.done or layer in self.finish:
            raise RuntimeError(f"colreduce_kvprune: layer {layer} ran twice in one step's selection")
        if self.stacked is None:
            self.stacked = scores.new_empty((self.num_layers,) + tuple(scores.shape))
        self.stacked[len(self.finish)] = scores
        self.finish[layer] = finish
        if len(self.finish) < self.num_layers:
            return False
        stacked, self.stacked, self.done = self.stacked, None, True
        if nan is None:
            if torch.isnan(stacked).any():                      # a host sync: callers without a NanWatch
                raise ValueError("scores contain NaN")
        else:
            flags = torch.isnan(stacked.flatten(1)).any(1)
            for i, l in enumerate(self.finish):
                nan.flags(l).append(flags[i])
        group = max(1, self.SORT_BYTES // (stacked[0].numel() * stacked.element_size()))
        idx = [select_scores(policy, plan, stacked[i: i + group], heads, gathered=gathered, rank_heads=rank_heads)
               for i in range(0, len(stacked), group)]
        kept = StepKept(plan, idx[0] if len(idx) == 1 else torch.cat(idx))
        for i, fn in enumerate(self.finish.values()):
            fn(kept, i)
        return True


class StepKept:
    """One step's selection for all its layers: idx (layers, B, Hkv, K_max) kept indices (layer i's are idx[i], in
    the order the layers ran), with the kept entries' places located once for every layer (cache_slots) instead of
    once per layer."""

    def __init__(self, plan: PrefillPlan, idx: torch.Tensor):
        self.plan, self.idx, self._slots = plan, idx, {}

    def cache_slots(self, block_table: torch.Tensor, block_size: int):
        """(blocks, offsets), each (layers, Σ(keep), Hkv) int64: where each layer's kept prompt tokens lie in the
        paged cache (block_table: the step's unremapped table). Made on the first call for a table and block size
        (every layer of a step passes the same), the same after."""
        key = (block_table.data_ptr(), tuple(block_table.shape), block_size)
        slots = self._slots.get(key)
        if slots is None:
            plan = self.plan
            tok = _kept_tokens(plan, self.idx)
            rows = plan.memo.get("kept_table_rows")
            if rows is None:          # the block-table row of each kept entry, made once per step
                rows = plan.memo["kept_table_rows"] = _table_rows(plan, tok.device)[plan.kept_row][:, None]
            slots = self._slots[key] = block_table[rows, tok // block_size].long(), tok % block_size
        return slots

    def cache_rows(self, block_table: torch.Tensor, block_size: int, layout, heads: torch.Tensor) -> torch.Tensor:
        """cache_rows of cache_slots' places for a cache layout, (layers, Σ(keep), Hkv), made once per step."""
        key = (block_table.data_ptr(), tuple(block_table.shape), block_size, layout)
        rows = self._slots.get(key)
        if rows is None:
            rows = self._slots[key] = cache_rows(layout, *self.cache_slots(block_table, block_size), heads)
        return rows


def _kept_tokens(plan: PrefillPlan, idx: torch.Tensor) -> torch.Tensor:
    """The position in its row's prompt of every kept entry (output entries: any valid column): idx (B, Hkv,
    K_max) → (Σ(keep+g), Hkv); idx (layers, B, Hkv, K_max) → (layers, Σ(keep+g), Hkv)."""
    pos = plan.gather_pos if idx.shape[-1] == max(plan.keeps) else plan.kept_pos.clamp(max=idx.shape[-1] - 1)
    if idx.dim() == 3:
        return idx[plan.kept_row, :, pos]
    return idx[:, plan.kept_row, :, pos].transpose(0, 1)       # advanced indices first: (Σ, layers, Hkv)


def gather_kept(plan: PrefillPlan, idx: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """The kept K/V of every pruned row, in compacted order (kept prompt tokens, then the recomputed outputs):
    (Σ(keep+g), Hkv, D) each, matching plan.slots. idx (B, Hkv, K_max) from select_kept."""
    tok = _kept_tokens(plan, idx) + plan.gather_base             # (Σ, Hkv): packed token ids
    if plan.is_out is not None:
        tok = torch.where(plan.is_out, plan.out_tok, tok)
    heads = _heads(plan, key.shape[1], key.device, 2)
    return key[tok, heads], value[tok, heads]


def gather_kept_cached(kept: StepKept, layer: int, block_table: torch.Tensor, cache_views):
    """gather_kept from the paged cache instead of the step's tensors, for layer `layer` (its position in the
    step's selection) of a StepKept: every kept prompt token of each row read at its place in the row's blocks
    (block_table: the step's unremapped table), where vLLM wrote it before the attention (this step's tokens) or
    at an earlier chunk. cache_views: (key_cache, value_cache) as (num_blocks, block_size, Hkv, D). Plans without
    recomputed outputs only (their entries are all prompt tokens). The places are located once for all layers."""
    plan = kept.plan
    if plan.is_out is not None:
        raise ValueError("gather_kept_cached: the plan has recomputed outputs (not in the cache); use gather_kept")
    key_cache, value_cache = cache_views
    block_size = key_cache.shape[1]
    blocks, offsets = (t[layer] for t in kept.cache_slots(block_table, block_size))
    heads = _heads(plan, key_cache.shape[2], blocks.device, 2)

    def read(view):
        layout = cache_layout(view)
        rows = None if layout is None else kept.cache_rows(block_table, block_size, layout, heads)[layer]
        return read_cache(view, layout, blocks, offsets, heads, rows)
    return read(key_cache), read(value_cache)


def recompute_outputs(plan: PrefillPlan, query: torch.Tensor, k_kept: torch.Tensor, v_kept: torch.Tensor,
                      output: torch.Tensor, scale: float) -> None:
    """Overwrite the attention output of the recomputed output tokens of each row (rows with g > 0: a request
    prefilled again after preemption). Output token j of a row attends to the row's kept prompt tokens and outputs
    0..j (its kept entries c ≤ keep + j), exactly what its decode step saw, instead of the whole prompt the base
    attention gave it. query (T, Hq, D); k_kept/v_kept from gather_kept; output (T, Hq, Dv), written in place.
    Plain torch in float32 (recompute after preemption is rare); host ints only, no sync."""
    for b, g in enumerate(plan.num_outputs):
        if not g:
            continue
        keep, e0, q0 = plan.keeps[b], plan.kept_starts[b], plan.out_starts[b]
        q = query[q0: q0 + g].float()                                            # (g, Hq, D)
        group = q.shape[1] // k_kept.shape[1]
        k = k_kept[e0: e0 + keep + g].float().repeat_interleave(group, dim=1)    # (keep+g, Hq, D)
        v = v_kept[e0: e0 + keep + g].float().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        c = torch.arange(keep + g, device=q.device)
        j = torch.arange(g, device=q.device)
        s = s.masked_fill((c[None, :] > keep + j[:, None])[None], float("-inf"))
        out = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
        output[q0: q0 + g] = out.to(output.dtype)


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total
