"""The plugin's backend-independent tensor work (colreduce_kvprune.vllm.compaction) against plain Python loops on
random batches: the vectorised remap of pruned rows, the RowState table, the gather of kept K/V, and the re-pruning
of a request recomputed after preemption (prompt + outputs prefilled again)."""
import contextlib
import random

import pytest
import torch

from colreduce_kvprune.config import load_config
from colreduce_kvprune.policies import get_policy, keep_count
from colreduce_kvprune.vllm import compaction

BS = 4


def test_remap_rows_matches_loop():
    rng = random.Random(0)
    n, width = 6, 12
    bt = torch.randperm(200)[: n * width].view(n, width).int() + 1
    # rows 0, 2, 5 pruned (offset, kept blocks, prefill blocks), the others untouched
    specs = {0: (13, 2, 6), 2: (5, 1, 3), 5: (30, 3, 10)}
    state = torch.zeros(n, 3, dtype=torch.int32)
    for r, v in specs.items():
        state[r] = torch.tensor(v)
    seq = torch.tensor([25, 9, 12, 30, 3, 41])          # logical lengths (prefill + decoded)
    qlen = [1, 2, 1, 3, 3, 1]
    positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq.tolist(), qlen)])
    qs = torch.tensor([0] + qlen).cumsum(0)
    slots = torch.tensor([rng.randrange(10**6) for _ in range(sum(qlen))])
    orig_slots = slots.clone()
    given_bt, given_seq = bt.clone(), seq.clone()
    out_bt = torch.full((n + 3, width + 2), -7, dtype=bt.dtype)          # the builder's buffers: larger, stale
    out_seq = torch.full((n + 3,), -7, dtype=seq.dtype)
    new_bt, new_seq = compaction.remap_rows(state, bt, seq, positions, qs, sum(qlen), slots, BS, out_bt, out_seq)
    # written into the buffers (what a captured CUDA graph reads), views of the input shapes; inputs untouched
    assert new_bt.data_ptr() == out_bt.data_ptr() and new_seq.data_ptr() == out_seq.data_ptr()
    assert new_bt.shape == bt.shape and new_seq.shape == seq.shape
    assert torch.equal(given_bt, bt) and torch.equal(given_seq, seq)
    t = 0
    for r in range(n):
        off, kb, nb = specs.get(r, (0, 0, 0))
        row = bt[r, :kb].tolist() + bt[r, nb:].tolist() if off else bt[r].tolist()
        assert new_bt[r, : len(row)].tolist() == row
        assert int(new_seq[r]) == int(seq[r]) - off
        for _ in range(qlen[r]):
            c = int(positions[t]) - off
            want = row[c // BS] * BS + c % BS if off else int(orig_slots[t])
            assert int(slots[t]) == want
            t += 1


def test_row_state_resets_on_fresh_prefill():
    rs = compaction.RowState(50, "cpu")
    first = torch.tensor([7, 9, 3])
    vals = rs.update_and_lookup(first, [0, 2], [(10, 1, 3), (0, 0, 0)])
    assert vals.tolist() == [[0, 0, 0]] * 3                  # fresh rows attend to their full prefill this step
    assert rs.update_and_lookup(first, [], []).tolist() == [[10, 1, 3], [0, 0, 0], [0, 0, 0]]
    # block 7 reused as the first block of a new request: its prefill resets the entry
    assert rs.update_and_lookup(torch.tensor([7]), [0], [(0, 0, 0)]).tolist() == [[0, 0, 0]]
    assert rs.update_and_lookup(torch.tensor([7]), [], []).tolist() == [[0, 0, 0]]


def test_row_state_ignores_stale_entries_of_rows_never_pruned():
    """The builder skips steps in which no row can be pruned, so an unpruned request that reused a finished pruned
    request's first block never reset its entry: `never` gives such rows zeros."""
    rs = compaction.RowState(50, "cpu")
    rs.update_and_lookup(torch.tensor([7]), [0], [(10, 1, 3)])          # a pruned request, first block 7
    # block 7 now first block of an unpruned request whose prefill ran in a skipped step (no reset)
    assert rs.update_and_lookup(torch.tensor([7, 9]), [], []).tolist() == [[10, 1, 3], [0, 0, 0]]   # stale
    assert rs.update_and_lookup(torch.tensor([7, 9]), [], [], never=[0]).tolist() == [[0, 0, 0]] * 2


def test_prunable_rows_and_copy_rows():
    config = load_config(dict(policy="snapkv", budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    memo = {}
    assert compaction.prunable_rows(config, [30, 9, None, 12, 13], 5, memo) == [True, False, None, False, True]
    assert memo == {30: True, 9: False, 12: False, 13: True}
    assert all(memo[p] == (keep_count(config, p) < p) for p in memo)
    # copy_rows is remap_rows of an all-zero state: same buffers, same values, slot mapping untouched
    n, width = 5, 9
    bt = torch.randperm(100)[: n * width].view(n, width).int()
    seq = torch.tensor([25, 9, 12, 30, 3])
    qlen = [1, 2, 1, 3, 3]
    positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq.tolist(), qlen)])
    qs = torch.tensor([0] + qlen).cumsum(0)
    slots = torch.randint(0, 10**6, (sum(qlen),))
    bufs = [(torch.full((n + 2, width + 1), -7, dtype=bt.dtype), torch.full((n + 2,), -7, dtype=seq.dtype))
            for _ in range(2)]
    want_slots = slots.clone()
    a = compaction.remap_rows(torch.zeros(n, 3, dtype=torch.int32), bt, seq, positions, qs, sum(qlen), want_slots,
                              BS, *bufs[0])
    b = compaction.copy_rows(bt, seq, *bufs[1])
    assert torch.equal(want_slots, slots)
    for x, y, buf in zip(a, b, bufs[1]):
        assert torch.equal(x, y) and y.data_ptr() == buf.data_ptr()


def test_plan_and_gather_match_per_request_selection():
    torch.manual_seed(0)
    config = load_config(dict(policy="snapkv", budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10, pooling={"kind": "max", "kernel": 3}))
    policy = get_policy(config)
    lengths, hq, hkv, d = [30, 7, 19], 4, 2, 8
    total = sum(lengths) + 2                                  # two decode tokens of other rows at the end
    q, k, v = torch.randn(total, hq, d), torch.randn(total, hkv, d), torch.randn(total, hkv, d)
    starts = [0, 30, 37]
    bt = torch.arange(1, 3 * 10 + 1).view(3, 10).int()
    prefills = [(r, s, 0, n, n) for r, (s, n) in enumerate(zip(starts, lengths))]
    fresh_rows, fresh_values, plan, stash = compaction.plan_prefills(config, policy, prefills, bt, BS)
    assert stash == [] and plan.sources is None
    keeps = [keep_count(config, n) for n in lengths]
    assert fresh_rows == [0, 1, 2] and plan.rows == [0, 2] and keeps[1] == 7
    assert fresh_values[0] == (30 - 12, 3, 8) and fresh_values[1] == (0, 0, 0)
    idx = compaction.select_kept(policy, plan, q, k, layer=0, scale=d ** -0.5, backend="torch")
    ks, vs = compaction.gather_kept(plan, idx, k, v)
    e = 0
    for b, r in enumerate(plan.rows):
        s, n, keep = starts[r], lengths[r], keeps[r]
        m = policy.score_request(n).num_queries
        scores = policy.scores(q[s + n - m: s + n].transpose(0, 1), k[s: s + n].transpose(0, 1),
                               scale=d ** -0.5, backend="torch")
        sel = policy.select(scores)                                        # (Hkv, keep)
        assert torch.equal(idx[b, :, :keep], sel)
        for c in range(keep):
            for h in range(hkv):
                assert torch.equal(ks[e, h], k[s + sel[h, c], h]) and torch.equal(vs[e, h], v[s + sel[h, c], h])
            assert int(plan.slots[e]) == int(bt[r, c // BS]) * BS + c % BS
            e += 1
    assert e == ks.shape[0]


def test_prompt_steps_take_prompt_lengths():
    qs, seq = torch.tensor([0, 40, 41, 101, 103]), torch.tensor([40, 77, 60, 2])
    prompt = [40, None, 50, None]                                     # row 2: a recompute of 50 + 10 outputs
    assert compaction.prompt_steps(qs, seq, 4, prompt) == [(0, 0, 0, 40, 40), (2, 41, 0, 60, 50), (3, 101, 0, 2, 2)]
    assert compaction.prompt_steps(qs, seq, 4) == [(0, 0, 0, 40, 40), (2, 41, 0, 60, 60), (3, 101, 0, 2, 2)]
    # chunked prefill: row 2 computes tokens 0..59 of a 70-token prompt (a first chunk); row 1 (76 computed, 1 new)
    # is past its 70-token prompt: a decode
    assert compaction.prompt_steps(qs, seq, 4, [None, 70, 70, None]) == [(0, 0, 0, 40, 40), (2, 41, 0, 60, 70),
                                                                          (3, 101, 0, 2, 2)]
    # a later chunk: 20 tokens after 40 computed, of a 100-token prompt
    assert compaction.prompt_steps(torch.tensor([0, 20]), torch.tensor([60]), 1, [100]) == [(0, 0, 40, 20, 100)]
    with pytest.raises(RuntimeError, match="tracked prompt of 0 tokens"):
        compaction.prompt_steps(qs, seq, 4, [0, None, None, None])
    # rows vLLM does not call prefilling (dummy / padding rows of profiling and graph capture) are never pruned
    flags = torch.tensor([True, False, False, True])
    assert compaction.prompt_steps(qs, seq, 4, prompt, flags) == [(0, 0, 0, 40, 40), (3, 101, 0, 2, 2)]


def test_prompt_lengths_checked_against_vllm_is_prefilling():
    qs, seq = torch.tensor([0, 40, 41, 101, 103]), torch.tensor([40, 77, 60, 2])   # computed: 0, 76, 0, 0
    prompt = [40, 70, 50, None]
    flags = torch.tensor([True, False, True, True])
    assert compaction.check_prompt_lengths(prompt, prompt, qs, seq, flags, 4) == (prompt, prompt)
    assert compaction.check_prompt_lengths(prompt, prompt, qs, seq, None, 4) == (prompt, prompt)
    with pytest.raises(RuntimeError, match="batch row 1 has a tracked prompt of 70"):   # row 1 really has P > 76
        compaction.check_prompt_lengths(prompt, prompt, qs, seq, torch.tensor([True, True, True, True]), 4)


def test_dummy_batch_rows_drop_stale_lengths():
    """A dummy batch (CUDA-graph capture, warm-up: V2 builds it with is_prefilling all False, seq_lens = query lens,
    req_idx 0..n-1) whose slots still hold an earlier request's lengths: no error, those rows untracked, no prompt
    step among them; a real row beside them keeps its length."""
    qs, seq = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 90])     # rows 0, 1: dummy; row 2: a decode
    prompts, targets = compaction.check_prompt_lengths([2, 1500, 80], [2, 1500, 80], qs, seq,
                                                       torch.tensor([False, False, False]), 3)
    assert prompts == [None, None, 80] and targets == [None, None, 80]
    assert compaction.prompt_steps(qs, seq, 3, prompts, torch.tensor([False, False, False])) == []
    with pytest.raises(RuntimeError, match="batch row 2 has a tracked prompt of 95"):   # decode row, 89 < 95
        compaction.check_prompt_lengths([2, 1500, 95], [2, 1500, 95], qs, seq, torch.tensor([False] * 3), 3)


def test_recompute_is_pruned_like_the_prompt_alone():
    """A row prefilling prompt (P) + g outputs after preemption: scored on the prompt alone (same kept tokens as the
    prompt's own prefill), the g outputs kept after them, their attention recomputed over the kept tokens only."""
    torch.manual_seed(1)
    config = load_config(dict(policy="h2o", budget={"keep_tokens": 10}, window=4, sink_tokens=2, min_prompt_tokens=8))
    policy = get_policy(config)
    hq, hkv, d, scale = 4, 2, 8, 8 ** -0.5
    prompt, g, other = 23, 9, 14                               # row 0: recompute; row 1: a fresh prompt
    total = prompt + g + other
    q, k, v = torch.randn(total, hq, d), torch.randn(total, hkv, d), torch.randn(total, hkv, d)
    bt = torch.arange(1, 2 * 12 + 1).view(2, 12).int()
    keep = keep_count(config, prompt)
    fresh_rows, fresh_values, plan, _ = compaction.plan_prefills(
        config, policy, [(0, 0, 0, prompt + g, prompt), (1, prompt + g, 0, other, other)], bt, BS)
    assert fresh_values[0] == (prompt - keep, -(-(keep + g) // BS), -(-(prompt + g) // BS))
    assert plan.lengths == [prompt, other] and plan.num_outputs == [g, 0]
    idx = compaction.select_kept(policy, plan, q, k, layer=0, scale=scale, backend="torch")
    # the same selection as the prompt's own prefill (plan of the prompt alone, outputs absent)
    _, _, alone, _ = compaction.plan_prefills(config, policy, [(0, 0, 0, prompt, prompt)], bt, BS)
    idx_alone = compaction.select_kept(policy, alone, q[:prompt], k[:prompt], layer=0, scale=scale, backend="torch")
    assert torch.equal(idx[0, :, :keep], idx_alone[0, :, :keep])
    ks, vs = compaction.gather_kept(plan, idx, k, v)
    assert ks.shape[0] == keep + g + keep_count(config, other)
    sel = idx_alone[0, :, :keep]
    for c in range(keep + g):
        assert int(plan.slots[c]) == int(bt[0, c // BS]) * BS + c % BS
        for h in range(hkv):
            src = int(sel[h, c]) if c < keep else prompt + c - keep
            assert torch.equal(ks[c, h], k[src, h]) and torch.equal(vs[c, h], v[src, h])
    out = torch.randn(total, hq, d)
    before = out.clone()
    compaction.recompute_outputs(plan, q, ks, vs, out, scale)
    assert torch.equal(out[:prompt], before[:prompt]) and torch.equal(out[prompt + g:], before[prompt + g:])
    for j in range(g):                                        # output j: kept prompt tokens + outputs 0..j
        for h in range(hq):
            kv = h // (hq // hkv)
            toks = sel[kv].tolist() + list(range(prompt, prompt + j + 1))
            w = torch.softmax(torch.stack([q[prompt + j, h] @ k[t, kv] for t in toks]) * scale, 0)
            want = sum(wi * v[t, kv] for wi, t in zip(w, toks))
            torch.testing.assert_close(out[prompt + j, h], want, rtol=1e-5, atol=1e-6)


def test_prompt_length_tracker_follows_batch_updates():
    """The tracker's {row: prompt length} follows vLLM's persistent-batch updates (removed, added, moved/swapped),
    compared with a plain list simulation of the batch; inert without a pruning config."""
    from types import SimpleNamespace as NS

    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from colreduce_kvprune.vllm.prompt_lengths import PromptLengthTracker, tracker_for

    cfg = NS(additional_config={"kv_prune": {"policy": "snapkv"}})
    tracker = PromptLengthTracker(cfg, torch.device("cpu"), False)
    assert tracker_for(cfg) is tracker and tracker_for(NS(additional_config={})) is None
    rng = random.Random(3)
    rows: list[int | None] = [None] * 8                       # the batch, simulated: prompt length per row
    for _ in range(200):
        removed = [r for r in range(8) if rows[r] is not None and rng.random() < 0.2]
        for r in removed:
            rows[r] = None
        added = []
        for r in range(8):
            if rows[r] is None and rng.random() < 0.3:
                rows[r] = rng.randrange(1, 500)
                added.append((r, None, [0] * rows[r], []))
        removed = [r for r in removed if rows[r] is None]    # vLLM reuses a removed row for an added request
        moved = []
        for _ in range(rng.randrange(3)):
            a, b = rng.sample(range(8), 2)
            if rng.random() < 0.5:
                rows[a], rows[b] = rows[b], rows[a]
                moved.append((a, b, MoveDirectionality.SWAP))
            elif rows[a] is not None:
                rows[b], rows[a] = rows[a], None
                moved.append((a, b, MoveDirectionality.UNIDIRECTIONAL))
        tracker.update_state(BatchUpdate(batch_size=8, removed=removed, added=added, moved=moved))
        assert tracker.row_lengths(None, 8) == (rows, rows)
    tracker.update_state(None)
    assert tracker.row_lengths(None, 8) == (rows, rows)
    inert = PromptLengthTracker(NS(additional_config={}), torch.device("cpu"), False)
    inert.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, None, [0] * 5, [])], moved=[]))
    assert inert.row_lengths(None, 1) == ([None], [None])


def test_tracker_loads_under_both_model_runners():
    """One entry point for both runners: vLLM's V2 plugin loader (the CUDA default in 0.32, plain Python, so it runs
    here) accepts the tracker — it failed on every engine start before — and so does V1's; built the V2 way, the
    tracker reads each row's prompt length from the runner's request slots (CommonAttentionMetadata.req_idx)."""
    from types import SimpleNamespace as NS

    import numpy as np
    from vllm.v1.sample.logits_processor import _load_custom_logitsprocs
    from vllm.v1.worker.gpu.sample.logits_processor import loader
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState

    from colreduce_kvprune.vllm.prompt_lengths import PromptLengthTracker, tracker_for

    assert PromptLengthTracker in loader._load_v2_logitsprocs_plugins()
    assert PromptLengthTracker in _load_custom_logitsprocs(None)
    validate = loader.build_custom_logits_processors_params_validator(None)
    validate(None)                                               # the frontend's check: nothing to refuse

    prompt_len = NS(np=np.array([0, 300, 57, 200, 0], dtype=np.int32))
    prefill_len = NS(np=np.array([0, 300, 77, 200, 0], dtype=np.int32))    # slot 2: resumed with 20 outputs
    req_states = NS(device=torch.device("cpu"), max_num_reqs=5, vocab_size=512, all_token_ids=None,
                    prompt_len=prompt_len, prefill_len=prefill_len, total_len=None)
    cfg = NS(additional_config={"kv_prune": {"policy": "snapkv"}})
    tracker = PromptLengthTracker(cfg, LogitsProcRequestState.from_request_state(req_states))
    assert tracker.runner == "v2" and tracker_for(cfg) is tracker
    assert tracker.add_request(1, None) is False                 # the sampler never applies it
    logits = torch.randn(2, 512)
    assert tracker.apply(logits, None) is logits
    cm = NS(req_idx=np.array([2, 1, 3]))                         # batch row -> request slot
    assert tracker.row_lengths(cm, 4) == ([57, 300, 200, None], [77, 300, 200, None])
    with pytest.raises(RuntimeError, match="without req_idx"):
        tracker.row_lengths(NS(req_idx=None), 1)
    with pytest.raises(TypeError, match="V1 model runner"):
        PromptLengthTracker(cfg)


CHUNK_CASES = {
    "snapkv": dict(policy="snapkv"),
    "tova": dict(policy="tova"),
    "knorm": dict(policy="knorm"),
    "h2o": dict(policy="h2o"),                                          # column sums accumulated chunk by chunk
    "h2o-mean-max": dict(policy="h2o", reduction="mean", group_reduce="max"),   # per query head, then grouped
}


@pytest.mark.parametrize("read_cache", [True, False], ids=["paged-cache", "kv-in-carry"])
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunked_prompt_equals_whole_prompt(case, read_cache):
    """A prompt prefilled in chunks (its keys and values in the paged cache, read back at the last chunk — or, for a
    backend whose layout cannot be read, kept in the carry —, the window queries or the column sums of each chunk's
    queries in the carry; then assembled at its last chunk beside a whole prompt of another row, with a recomputed
    output in the last chunk) gets the same selection, kept K/V, slots and recomputed outputs as the same prompt
    prefilled in one step."""
    torch.manual_seed(2)
    config = load_config(dict(CHUNK_CASES[case], budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    pol = get_policy(config)
    hq, hkv, d, scale = 4, 2, 8, 8 ** -0.5
    prompt, g, other = 37, 3, 21                   # row 0: 37-token prompt + 3 recomputed outputs, in chunks
    q, k, v = (torch.randn(prompt + g + other, h, d) for h in (hq, hkv, hkv))
    bt = torch.arange(1, 2 * 12 + 1).view(2, 12).int()
    whole = [(0, 0, 0, prompt + g, prompt), (1, prompt + g, 0, other, other)]
    _, values_w, plan_w, _ = compaction.plan_prefills(config, pol, whole, bt, BS)
    idx_w = compaction.select_kept(pol, plan_w, q, k, layer=3, scale=scale, backend="torch")
    ks_w, vs_w = compaction.gather_kept(plan_w, idx_w, k, v)
    out_w = torch.zeros_like(q)
    compaction.recompute_outputs(plan_w, q, ks_w, vs_w, out_w, scale)

    # the paged cache as vLLM leaves it: each step's K/V written at the row's logical slots before the attention
    key_cache, value_cache = (torch.full((26, BS, hkv, d), float("nan")) for _ in range(2))
    views = (key_cache, value_cache) if read_cache else None

    def write(c0, qlen, row=0, first=0):         # tokens c0.. of the row, taken from q/k/v rows first + c0..
        pos = torch.arange(c0, c0 + qlen)
        blocks = bt[row, pos // BS].long()
        rows = slice(first + c0, first + c0 + qlen)
        key_cache[blocks, pos % BS], value_cache[blocks, pos % BS] = k[rows], v[rows]

    carry = {"stale": 1}
    # the last chunk holds the last 2 prompt tokens and the outputs; SnapKV's 4-query window spans two chunks
    chunks = [(0, 16), (16, 19), (35, prompt + g - 35)]
    for c0, qlen in chunks[:-1]:                                # each chunk: its own step, row 0 alone
        fresh, values, plan, stash = compaction.plan_prefills(config, pol, [(0, 0, c0, qlen, prompt)], bt, BS,
                                                              [carry])
        assert plan is None and [(c.row, c.start, c.c0, c.qlen, c.carry) for c in stash] == [(0, 0, c0, qlen, carry)]
        assert (fresh, values) == (([0], [(0, 0, 0)]) if c0 == 0 else ([], []))
        assert "stale" not in carry                             # reset at the prompt's first step
        write(c0, qlen)
        compaction.stash_chunks(compaction.StepPlan(None, stash, bt), 3, pol, q[c0: c0 + qlen], k[c0: c0 + qlen],
                                v[c0: c0 + qlen], views, scale)
    assert (("kv", 3) in carry) == (not read_cache)
    stashed = carry.get(3)
    if case.startswith("h2o"):                                 # column sums over the keys so far: (heads, P)
        assert stashed.shape == (hkv if case == "h2o" else hq, prompt)
    elif case == "knorm":                                      # nothing the cache does not hold
        assert stashed is None
    else:                                                      # the window queries before the last chunk
        n = sum(t.shape[0] for t in stashed or ())
        assert n == max(0, chunks[-1][0] - (prompt - pol.score_request(prompt).num_queries))
    c0, qlen = chunks[-1]
    write(c0, qlen)
    write(0, other, row=1, first=prompt + g)                   # the whole prompt of row 1, in the same step
    step_q, step_k, step_v = (torch.cat([t[c0: c0 + qlen], t[prompt + g:]]) for t in (q, k, v))
    steps = [(0, 0, c0, qlen, prompt), (1, qlen, 0, other, other)]
    fresh, values, plan, stash = compaction.plan_prefills(config, pol, steps, bt, BS, [carry, None])
    assert stash == [] and fresh == [0, 1] and values == values_w and plan.sources is not None
    aq, ak, av, partials = compaction.assemble(plan, 3, step_q, step_k, step_v, views, bt, BS)
    assert torch.equal(ak, k) and torch.equal(av, v) and carry == {}             # released
    qfrom = plan.query_from[0]
    assert torch.equal(aq, torch.cat([q[qfrom: prompt + g], q[prompt + g:]]))
    idx = compaction.select_kept(pol, plan, aq, ak, layer=3, scale=scale, backend="torch", partials=partials)
    ks, vs = compaction.gather_kept(plan, idx, ak, av)
    assert torch.equal(idx, idx_w) and torch.equal(ks, ks_w) and torch.equal(vs, vs_w)
    assert torch.equal(plan.slots, plan_w.slots)
    out_a = torch.zeros_like(aq)
    compaction.recompute_outputs(plan, aq, ks, vs, out_a, scale)
    step_out = torch.zeros_like(step_q)
    compaction.scatter_outputs(plan, out_a, step_out)
    torch.testing.assert_close(step_out[qlen - g: qlen], out_w[prompt: prompt + g], rtol=0, atol=0)
    assert not step_out[: qlen - g].any() and not step_out[qlen:].any()


STEP_CASES = dict(CHUNK_CASES, streamingllm=dict(policy="streamingllm"),
                  **{"shared-heads": dict(policy="snapkv", per_head=False)})


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "last-chunk"])
@pytest.mark.parametrize("read_cache", [True, False], ids=["paged-cache", "held-tensors"])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_selection_writes_what_each_layer_would(case, read_cache, chunked):
    """One selection for the step's layers (StepSelection: every layer's scores stacked, selected after the last
    layer, then each layer's kept K/V gathered — from the paged cache, or from the tensors held for a cache layout
    not readable — and written) leaves every layer's cache bitwise as the per-layer path does (select_kept,
    gather_kept, write at each layer), for whole prompts and for a last chunk beside a whole prompt; each layer
    gets its NaN flag."""
    torch.manual_seed(5)
    config = load_config(dict(STEP_CASES[case], budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    pol = get_policy(config)
    hq, hkv, d, scale, layers = 4, 2, 8, 8 ** -0.5, 3
    prompt, other, c0 = 37, 21, (20 if chunked else 0)       # row 0: chunks [0, c0) and [c0, prompt); row 1 whole
    bt = torch.arange(1, 2 * 12 + 1).view(2, 12).int()
    qkv = [[torch.randn(prompt + other, h, d) for h in (hq, hkv, hkv)] for _ in range(layers)]
    base = []                                                  # per layer: the caches as vLLM leaves them
    for q, k, v in qkv:
        kc, vc = (torch.full((26, BS, hkv, d), float("nan")) for _ in range(2))
        for row, n, first in ((0, prompt, 0), (1, other, prompt)):
            pos = torch.arange(n)
            kc[bt[row, pos // BS].long(), pos % BS] = k[first: first + n]
            vc[bt[row, pos // BS].long(), pos % BS] = v[first: first + n]
        base.append((kc, vc))

    def run(per_step):
        caches = [(kc.clone(), vc.clone()) for kc, vc in base]
        views = [c if read_cache else None for c in caches]
        carry, watch = {}, compaction.NanWatch()
        if chunked:
            _, _, _, stash = compaction.plan_prefills(config, pol, [(0, 0, 0, c0, prompt)], bt, BS, [carry])
            for l, (q, k, v) in enumerate(qkv):
                compaction.stash_chunks(compaction.StepPlan(None, stash, bt), l, pol, q[:c0], k[:c0], v[:c0],
                                        views[l], scale)
        steps = [(0, 0, c0, prompt - c0, prompt), (1, prompt - c0, 0, other, other)]
        _, _, plan, _ = compaction.plan_prefills(config, pol, steps, bt, BS, [carry, None])
        assert (plan.sources is not None) == chunked and plan.layout is not None and not any(plan.num_outputs)
        sel = compaction.StepSelection(layers)

        def write(l, ks, vs):
            kc, vc = caches[l]
            kc.view(-1, hkv, d)[plan.slots], vc.view(-1, hkv, d)[plan.slots] = ks, vs

        for l, (q, k, v) in enumerate(qkv):
            q, k, v, partials, paged = q[c0:], k[c0:], v[c0:], None, None
            if chunked:      # the engine's step path with a readable cache gathers no values (read back at the end)
                values = not (per_step and read_cache)   # and, for window attention scores, no keys (scored in
                if per_step and read_cache and compaction.scores_from_cache(pol, plan):     # the cache)
                    paged = (caches[l][0], bt)
                q, k, v, partials = compaction.assemble(plan, l, q, k, v, views[l], bt, BS, values=values,
                                                        keys=paged is None)
                assert (v is None) == (not values) and (k is None) == (paged is not None)
            if not per_step:
                idx = compaction.select_kept(pol, plan, q, k, layer=l, scale=scale, backend="torch",
                                             partials=partials, nan_flags=watch.flags(l))
                write(l, *compaction.gather_kept(plan, idx, k, v))
                continue
            scores = compaction.layer_scores(pol, plan, q, k, layer=l, scale=scale, backend="torch",
                                             partials=partials, paged=paged)

            def finish(kept, i, l=l, k=k, v=v):
                if read_cache:
                    write(l, *compaction.gather_kept_cached(kept, i, bt, caches[l]))
                else:
                    write(l, *compaction.gather_kept(plan, kept.idx[i], k, v))
            done = sel.add(pol, plan, l, scores, finish, heads=hkv, nan=watch)
            assert done == (l == layers - 1) and sel.done == done
        assert {l: len(f) for l, f in watch.pending.items()} == {l: 1 for l in range(layers)}
        return caches

    for (ka, va), (kb, vb) in zip(run(False), run(True)):
        assert torch.equal(ka.nan_to_num(-1), kb.nan_to_num(-1)) and torch.equal(va.nan_to_num(-1), vb.nan_to_num(-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["snapkv", "tova", "shared-heads"])
def test_scores_from_the_cache_equal_the_assembled_keys(case, backend):
    """A last chunk's scores read in the paged cache (colreduce_paged through the step's block table, no key gather)
    are bitwise the scores of the keys assemble gathers, in every row's columns (a last chunk beside a whole prompt,
    blocks out of order, NaN in every cache slot no row owns); padding columns hold zeros."""
    torch.manual_seed(11)
    config = load_config(dict(STEP_CASES[case], budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    pol = get_policy(config)
    hq, hkv, d, scale = 4, 2, 16, 16 ** -0.5                 # head dim 16: the Triton kernels' smallest
    prompt, other, c0 = 37, 21, 20
    bt = torch.randperm(26)[:24].view(2, 12).int()
    q, k, v = (torch.randn(prompt + other, h, d) for h in (hq, hkv, hkv))
    kc, vc = (torch.full((26, BS, hkv, d), float("nan")) for _ in range(2))
    for row, n, first in ((0, prompt, 0), (1, other, prompt)):
        pos = torch.arange(n)
        kc[bt[row, pos // BS].long(), pos % BS] = k[first: first + n]
        vc[bt[row, pos // BS].long(), pos % BS] = v[first: first + n]
    # on the GPU the Triton backend needs CUDA tensors (its first H200 run had them on the CPU and failed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bt, q, k, v, kc, vc = (t.to(dev) for t in (bt, q, k, v, kc, vc))
    carry = {}
    _, _, _, stash = compaction.plan_prefills(config, pol, [(0, 0, 0, c0, prompt)], bt, BS, [carry])
    compaction.stash_chunks(compaction.StepPlan(None, stash, bt), 0, pol, q[:c0], k[:c0], v[:c0], (kc, vc), scale)
    steps = [(0, 0, c0, prompt - c0, prompt), (1, prompt - c0, 0, other, other)]
    _, _, plan, _ = compaction.plan_prefills(config, pol, steps, bt, BS, [carry, None])
    assert compaction.scores_from_cache(pol, plan)
    step = [t[c0:] for t in (q, k, v)]
    aq, ak, _, _ = compaction.assemble(plan, 0, *step, (kc, vc), bt, BS, values=False)
    want = compaction.layer_scores(pol, plan, aq, ak, layer=0, scale=scale, backend=backend)
    plan.memo.clear()
    aq2, none_k, none_v, _ = compaction.assemble(plan, 0, *step, (kc, vc), bt, BS, values=False, keys=False)
    assert none_k is None and none_v is None and torch.equal(aq2, aq)
    got = compaction.layer_scores(pol, plan, aq2, None, layer=0, scale=scale, backend=backend, paged=(kc, bt))
    assert got.shape == want.shape
    for b, n in enumerate(plan.lengths):
        assert torch.equal(got[b, :, :n], want[b, :, :n]), b
        assert not got[b, :, n:].any()
    with pytest.raises(ValueError, match="needs cache_views"):
        compaction.assemble(plan, 0, *step, None, bt, BS, keys=False)


def test_cache_reads_equal_for_any_cache_strides():
    """read_cache reads entries of a (num_blocks, block_size, Hkv, D) view with one row gather where its storage is
    rows of D elements R apart (vLLM 0.32's CUDA layout, keys and values side by side along the last dim: R = 2D;
    a contiguous view: R = D), and by indexing otherwise; every way returns the same entries."""
    torch.manual_seed(3)
    nb, h, d = 6, 3, 8
    cuda_like = torch.randn(nb, h, BS, 2 * d)                     # vLLM 0.32 on CUDA: its prune_kv_views
    k_view, v_view = cuda_like.transpose(1, 2).split(d, dim=-1)
    dense = k_view.contiguous()
    padded = torch.randn(nb, BS, h, d + 3)[..., :d]                # rows of D, 11 apart
    odd = torch.randn(nb, BS, d, h).transpose(2, 3)                # D not contiguous: no layout
    assert compaction.cache_layout(k_view) == (2 * d, h * BS, 1, BS) == compaction.cache_layout(v_view)
    assert compaction.cache_layout(dense) == (d, BS * h, h, 1) and compaction.cache_layout(odd) is None
    assert compaction.cache_layout(padded) == (d + 3, BS * h, h, 1)
    blocks, slots = torch.tensor([4, 0, 2, 5, 4]), torch.tensor([1, 3, 0, 2, 3]) % BS
    for heads, b, sl in ((torch.arange(h)[None], blocks[:, None], slots[:, None]),          # assemble: all heads
                         (torch.tensor([[2, 0, 1]]), blocks[:, None].expand(-1, h), slots[:, None].expand(-1, h))):
        for view in (k_view, v_view, dense, padded, odd):
            want = torch.stack([torch.stack([view[bi, si, hi] for bi, si, hi in zip(rb, rs, rh)])
                                for rb, rs, rh in zip(b.expand(-1, h).tolist(), sl.expand(-1, h).tolist(),
                                                      heads.expand(len(blocks), -1).tolist())])
            layout = compaction.cache_layout(view)
            rows = None if layout is None else compaction.cache_rows(layout, b, sl, heads)
            got = compaction.read_cache(view, layout, b, sl, heads, rows)
            assert got.shape == (len(blocks), h, d) and torch.equal(got, want)


def test_scores_from_cache_only_for_window_attention_scores():
    """Policies whose last chunk needs the keys themselves (key norms, positions) or carried column sums (H2O)
    assemble them; a plan without a last chunk has nothing to read back."""
    bt = torch.arange(1, 25).view(2, 12).int()
    for policy, want in (("snapkv", True), ("tova", True), ("h2o", False), ("knorm", False),
                         ("streamingllm", False)):
        config = load_config(dict(policy=policy, budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                                  min_prompt_tokens=10))
        pol = get_policy(config)
        carry = {}
        _, _, _, stash = compaction.plan_prefills(config, pol, [(0, 0, 0, 20, 37)], bt, BS, [carry])
        _, _, whole, _ = compaction.plan_prefills(config, pol, [(0, 0, 0, 37, 37)], bt, BS)
        _, _, last, _ = compaction.plan_prefills(config, pol, [(0, 0, 20, 17, 37)], bt, BS, [carry])
        assert not compaction.scores_from_cache(pol, whole), policy
        assert compaction.scores_from_cache(pol, last) == want, policy
        if not want:
            with pytest.raises(ValueError, match="scores_from_cache"):
                compaction.padded_scores(pol, last, torch.randn(17, 4, 8), None, layer=0, scale=1.0,
                                         paged=(torch.randn(26, BS, 2, 8), bt))


@pytest.mark.parametrize("case", ["snapkv", "tova", "shared-heads"])
def test_step_selection_in_groups_of_layers_selects_the_same(case, monkeypatch):
    """StepSelection selects over groups of layers of at most SORT_BYTES of scores (bounding the sort's temporary
    memory): groups of 1, 2 (the last one short) or all 5 layers give every layer the same kept indices."""
    config = load_config(dict(STEP_CASES[case], budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    pol = get_policy(config)
    bt = torch.arange(1, 25).view(2, 12).int()
    _, _, plan, _ = compaction.plan_prefills(config, pol, [(0, 0, 0, 37, 37), (1, 37, 0, 21, 21)], bt, BS)
    g = torch.Generator().manual_seed(4)
    scores = [compaction.layer_scores(pol, plan, torch.randn(58, 4, 8, generator=g),
                                      torch.randn(58, 2, 8, generator=g), layer=l, scale=0.35, backend="torch")
              for l in range(5)]
    per_layer = scores[0].numel() * 4
    calls = []
    select = compaction.select_scores
    monkeypatch.setattr(compaction, "select_scores", lambda *a, **k: calls.append(len(a[2])) or select(*a, **k))

    def run(sort_bytes):
        monkeypatch.setattr(compaction.StepSelection, "SORT_BYTES", sort_bytes)
        sel, got = compaction.StepSelection(5), {}
        calls.clear()
        for l, sc in enumerate(scores):
            sel.add(pol, plan, l, sc, lambda kept, i, l=l: got.__setitem__(l, kept.idx[i]), heads=2)
        return got

    whole = run(5 * per_layer)
    assert sorted(whole) == list(range(5)) and calls == [5]
    for sort_bytes, groups in ((1, [1] * 5), (2 * per_layer, [2, 2, 1])):
        got = run(sort_bytes)
        assert calls == groups and all(torch.equal(got[l], whole[l]) for l in range(5)), sort_bytes
    for l, sc in enumerate(scores):             # and each equals the layer's own selection
        assert torch.equal(whole[l], compaction.select_scores(pol, plan, sc, 2))


def test_step_selection_refuses_a_layer_twice_and_outputs_from_the_cache():
    config = load_config(dict(policy="snapkv", budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    pol = get_policy(config)
    bt = torch.arange(1, 13).view(1, 12).int()
    q, k = torch.randn(33, 4, 8), torch.randn(33, 2, 8)
    _, _, plan, _ = compaction.plan_prefills(config, pol, [(0, 0, 0, 30, 30)], bt, BS)
    sel = compaction.StepSelection(2)
    scores = compaction.layer_scores(pol, plan, q, k, layer=0, scale=1.0, backend="torch")
    assert not sel.add(pol, plan, 0, scores, lambda kept, i: None, heads=2)
    with pytest.raises(RuntimeError, match="layer 0 ran twice"):
        sel.add(pol, plan, 0, scores, lambda kept, i: None, heads=2)
    _, _, rec, _ = compaction.plan_prefills(config, pol, [(0, 0, 0, 33, 30)], bt, BS)     # 3 recomputed outputs
    idx = compaction.select_kept(pol, rec, q, k, layer=0, scale=1.0, backend="torch")
    with pytest.raises(ValueError, match="recomputed outputs"):
        compaction.gather_kept_cached(compaction.StepKept(rec, idx[None]), 0, bt,
                                      (torch.zeros(13, BS, 2, 8), torch.zeros(13, BS, 2, 8)))
    with pytest.raises(ValueError, match="values=False or keys=False needs cache_views"):
        compaction.assemble(plan, 0, q, k, k, None, bt, BS, values=False)


def test_builder_passes_through_before_the_kv_pool_exists():
    """vLLM's memory profiling (on CUDA without a fixed KV pool; with CUDA graphs it captures graphs too) builds
    attention metadata before the KV cache exists: the builder then leaves the batch as vLLM built it, and creates
    its RowState table at the first build after the worker sized the pool (cache_config.num_gpu_blocks)."""
    from types import SimpleNamespace as NS

    from colreduce_kvprune.vllm.backend_common import PruneBuilderMixin

    builder = NS(prune_rows=None, prune_cache_config=NS(num_gpu_blocks=None))
    bt = torch.zeros(2, 4, dtype=torch.int32)
    assert PruneBuilderMixin._prune_row_state(builder, bt) is None
    builder.prune_cache_config.num_gpu_blocks = 50
    state = PruneBuilderMixin._prune_row_state(builder, bt)
    assert tuple(state.table.shape) == (50, 3) and PruneBuilderMixin._prune_row_state(builder, bt) is state


@pytest.mark.parametrize("name", ["snapkv", "h2o", "tova", "streamingllm", "knorm", "random"])
def test_warmup_scores_like_a_pruned_prefill(name):
    """The engine-start warm-up (warmup.py) runs the same plan, scoring and selection a pruned prefill does
    (compaction.plan_prefills, select_kept: a change there breaks this test, not the first request on a GPU); on
    CPU, where nothing is compiled, warm_up itself does nothing."""
    from colreduce_kvprune.vllm import warmup

    policy = get_policy(load_config({"policy": name, "budget": {"keep_ratio": 0.25}, "min_prompt_tokens": 300}))
    paged = []
    score_paged = compaction.score_paged
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compaction, "score_paged", lambda *a, **k: paged.append(score_paged(*a, **k)) or paged[-1])
        idx, counts = warmup.score_dummies(policy, torch.device("cpu"), torch.float32, 8, 2, 16, 0.25)
    lengths = [307, 600]
    # the paged scoring of a last chunk (window attention scores only) is compiled too: each dummy's columns scored
    assert len(paged) == (name in ("snapkv", "tova"))
    for got in paged:
        assert got.shape == (2, 2, 600) and not got[0, :, 307:].any()
        assert all(bool(torch.isfinite(got[b, :, :n]).all() and got[b, :, :n].any()) for b, n in enumerate(lengths))
    assert counts == [policy.keep_count(n, 0, None) for n in lengths]
    assert idx.shape == (2, 2, max(counts))
    for b, n in enumerate(lengths):
        kept = idx[b, :, : counts[b]]
        assert bool(((kept >= 0) & (kept < n)).all())
    assert warmup.warm_up(policy, torch.device("cpu"), torch.float32, 8, 2, 16, 0.25) is True
    assert not any(key[0].type == "cpu" for key in warmup._done)
    if torch.cuda.is_available():                  # on the GPU: runs once per (device, dtype, heads, policy)
        dev = torch.device("cuda", torch.cuda.current_device())
        assert warmup.warm_up(policy, dev, torch.bfloat16, 8, 2, 16, 0.25) is True
        assert (dev, torch.bfloat16, 8, 2, 16, policy.name) in warmup._done


def test_warmup_lengths_cover_every_launch_of_longer_prompts(monkeypatch):
    """The kernels' tiles and Triton's integer specialisations change with the prompt's length, so the warm-up also
    scores one prompt per distinct launch up to max_model_len (kernels.colreduce.launch_lengths, here on the H200's
    132 SMs as the GPU would plan them): every length in the range, 16k among them, launches as one of the returned
    lengths does, the returned ones all differently; on CPU score_lengths runs the same calls (torch reference)
    for window policies, packed and paged, whole packed prompts for H2O (every query scored), nothing for KNorm."""
    from colreduce_kvprune.kernels import colreduce as C
    from colreduce_kvprune.vllm import warmup

    monkeypatch.setattr(C, "_interpreting", lambda: False)
    for paged in (False, True):
        shape = (128, 4, 1, 8, True, C._VARIANT, 132, "sum", "mean", True, paged, 16 if paged else 1,
                 torch.bfloat16, False)
        got = C.launch_lengths(32, 1024, 1 << 17, 128, 4, 1, 8, is_causal=True, reduction="sum",
                               group_reduce="mean", dtype=torch.bfloat16, device="cuda", paged=paged,
                               page=16 if paged else 1, sms=132)
        keys = [C._launch_key(32, n, *shape) for n in got]
        assert got[0] == 1024 and len(set(keys)) == len(keys) > 2
        # the 2.1 s stall of the eleventh visit: 16k prompts launch tiles that short dummies never used
        assert C._launch_key(32, 16384, *shape) != C._launch_key(32, 600, *shape)
        rng = random.Random(0)
        for n in [16384, 16385, 1 << 17] + [rng.randrange(1024, 1 << 17) for _ in range(300)]:
            assert C._launch_key(32, n, *shape) in keys, n
    monkeypatch.undo()
    for name, expect in (("snapkv", {False, True}), ("tova", {False, True}), ("h2o", {False}), ("knorm", set())):
        policy = get_policy(load_config({"policy": name, "budget": {"keep_ratio": 0.25}, "min_prompt_tokens": 300}))
        scored = warmup.score_lengths(policy, torch.device("cpu"), torch.float32, 8, 2, 16, 0.25, 1000, 16)
        assert {p for p, _ in scored} == expect, name         # H2O: whole prompts, packed (score_whole_prompts)
        assert all(300 <= n <= 1000 for _, n in scored)
    policy = get_policy(load_config({"policy": "h2o", "budget": {"keep_ratio": 0.25}, "min_prompt_tokens": 300}))
    # whole prompts up to what max_bytes of queries and keys allows ((8 + 2) heads × 16 × 4 bytes a token), and at
    # least to the Gluon row pass's threshold + 8 (its lengths' classes mod 16)
    ranges, real = [], C.launch_lengths
    monkeypatch.setattr(C, "launch_lengths", lambda *a, **k: ranges.append((a[1], a[2], k["whole"])) or real(*a, **k))
    for threshold, top in ((400, 500), (600, 608)):
        monkeypatch.setattr(C, "_WS_MIN_M", threshold)
        scored = warmup.score_lengths(policy, torch.device("cpu"), torch.float32, 8, 2, 16, 0.25, 1000, 16,
                                      max_bytes=640 * 500)
        assert scored and all(300 <= n <= top for _, n in scored) and ranges[-1] == (300, top, True), ranges


@pytest.mark.skipif(not torch.cuda.is_available(), reason="on CPU the plugin scores with torch: nothing is compiled")
def test_h2o_engine_compiles_its_scoring_at_start(tmp_path):
    """End to end on the GPU: an H2O engine (whole prompts scored, bf16, heads of 64) compiles every scoring kernel
    its prompts need while it starts (warmup.py), so prompts of 4500 and 5100 tokens compile none of ours mid-serving.
    On sm_90 the Gluon row pass (prompts of >= 4096 queries) is among the start's compiles. Compiles are read from
    Triton's JIT hooks (serving.TritonCompiles); that the start shows some proves the hooks see ours."""
    import triton

    from colreduce_kvprune.kernels import colreduce as C
    from colreduce_kvprune.kernels import colreduce_ws
    from colreduce_kvprune.serving import TritonCompiles
    from colreduce_kvprune.vllm import get_stats
    from vllm_helpers import build_model, greedy, make_llm, random_prompts, shutdown

    ours = {name for mod in (C, colreduce_ws) for name, fn in vars(mod).items()
            if isinstance(fn, triton.runtime.jit.JITFunction)}
    model = build_model("llama", tmp_path / "m", head_dim=64, max_position_embeddings=8192)
    prune = {"policy": "h2o", "budget": {"keep_ratio": 0.25}, "min_prompt_tokens": 1024}
    with TritonCompiles() as compiles:
        if not compiles.available:
            pytest.skip("this Triton has no JIT hooks")
        llm = make_llm(model, prune, dtype="bfloat16", max_model_len=6144, max_num_batched_tokens=6144)
        try:
            at_start = [name for _, _, name in compiles.events if name in ours]
            n = len(compiles.events)
            greedy(llm, random_prompts([4500, 5100], seed=3), max_tokens=4)
            later = [name for _, _, name in compiles.events[n:] if name in ours]
            pruned = get_stats(llm).requests_pruned
        finally:
            shutdown(llm)
    assert at_start, compiles.events
    if C._ws_device(torch.cuda.current_device()):
        assert "_ws_row_lse_kernel" in at_start, at_start
    assert later == [], later
    assert pruned == 2


def test_nan_scores_are_reported_at_a_later_build():
    """With nan_flags (the engine's layers), NaN scores do not raise in the layer (that would read the device back):
    the NanWatch reports them, naming the layer, once the builder has flushed the flags and their copy has landed.
    Without nan_flags they raise at once; with clean scores both select the same tokens."""
    config = load_config(dict(policy="snapkv", budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    policy = get_policy(config)
    lengths, hq, hkv, d = [30, 19], 4, 2, 8
    q, k = torch.randn(sum(lengths), hq, d), torch.randn(sum(lengths), hkv, d)
    bt = torch.arange(1, 2 * 10 + 1).view(2, 10).int()
    _, _, plan, _ = compaction.plan_prefills(config, policy, [(0, 0, 0, 30, 30), (1, 30, 0, 19, 19)], bt, BS)
    watch = compaction.NanWatch()
    select = dict(scale=d ** -0.5, backend="torch")
    idx = compaction.select_kept(policy, plan, q, k, layer=0, **select)
    assert torch.equal(compaction.select_kept(policy, plan, q, k, layer=0, nan_flags=watch.flags(0), **select), idx)
    bad = q.clone()
    bad[47, 1, 3] = float("nan")                               # a window query of row 1
    with pytest.raises(ValueError, match="NaN"):
        compaction.select_kept(policy, plan, bad, k, layer=4, **select)
    compaction.select_kept(policy, plan, bad, k, layer=4, nan_flags=watch.flags(4), **select)
    watch.check()                                             # nothing flushed yet
    watch.flush()
    assert watch.pending == {}
    with pytest.raises(RuntimeError, match=r"NaN at layer\(s\) \[4\]"):
        watch.check()
    assert watch.copies == []
    watch.flush()
    watch.check()


@contextlib.contextmanager
def _no_host_sync(guard: bool):
    torch.cuda.set_sync_debug_mode("error" if guard else "default")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["snapkv", "h2o", "knorm", "random", "shared-heads"])
def test_layer_work_reads_nothing_back_from_the_gpu(case):
    """The per-layer work of the attention layers (the stash of a chunk; at a last chunk the assembly, scores,
    selection, gather of the kept K/V, recomputed outputs) runs under torch's sync debug mode "error": no host sync.
    Layer 0 runs unguarded first (Triton compiles its kernels there); layer 1 is guarded."""
    cases = dict(CHUNK_CASES, random=dict(policy="random"), **{"shared-heads": dict(policy="snapkv", per_head=False)})
    config = load_config(dict(cases[case], budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    pol, dev, watch = get_policy(config), torch.device("cuda"), compaction.NanWatch()
    hq, hkv, d, scale = 4, 2, 16, 16 ** -0.5
    prompt, g, other, c0 = 37, 3, 21, 20          # row 0: prompt + 3 recomputed outputs in two chunks; row 1 whole
    q, k, v = (torch.randn(prompt + g + other, h, d, device=dev) for h in (hq, hkv, hkv))
    bt = torch.arange(1, 2 * 12 + 1, device=dev).view(2, 12).int()
    views = tuple(torch.zeros(26, BS, hkv, d, device=dev) for _ in range(2))
    pos = torch.arange(prompt + g, device=dev)
    pos1 = torch.arange(other, device=dev)
    for cache, t in zip(views, (k, v)):                      # both rows' keys and values, as vLLM wrote them
        cache[bt[0, pos // BS].long(), pos % BS] = t[: prompt + g]
        cache[bt[1, pos1 // BS].long(), pos1 % BS] = t[prompt + g:]
    carry = {}
    _, _, _, stash = compaction.plan_prefills(config, pol, [(0, 0, 0, c0, prompt)], bt, BS, [carry])
    steps = [(0, 0, c0, prompt + g - c0, prompt), (1, prompt + g - c0, 0, other, other)]
    _, _, plan, _ = compaction.plan_prefills(config, pol, steps, bt, BS, [carry, None])
    step_q, step_k, step_v = (t[c0:] for t in (q, k, v))
    for layer in (0, 1):
        with _no_host_sync(layer > 0):
            compaction.stash_chunks(compaction.StepPlan(None, stash, bt, watch), layer, pol, q[:c0], k[:c0], v[:c0],
                                    views, scale)
    for layer in (0, 1):
        with _no_host_sync(layer > 0):
            aq, ak, av, partials = compaction.assemble(plan, layer, step_q, step_k, step_v, views, bt, BS)
            idx = compaction.select_kept(pol, plan, aq, ak, layer=layer, scale=scale, partials=partials,
                                         nan_flags=watch.flags(layer))
            ks, vs = compaction.gather_kept(plan, idx, ak, av)
            out = torch.zeros_like(aq)
            compaction.recompute_outputs(plan, aq, ks, vs, out, scale)
            compaction.scatter_outputs(plan, out, torch.zeros_like(step_q))
            watch.flush()
    torch.cuda.synchronize()
    watch.check()
    assert watch.copies == [] and ks.shape == (sum(plan.keeps) + g, hkv, d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["snapkv", "h2o", "knorm", "shared-heads"])
def test_step_selection_reads_nothing_back_from_the_gpu(case):
    """The once-per-step path (layer_scores per layer; at the last layer the stacked selection, the NaN flags and
    every layer's gather from the paged cache and write) under torch's sync debug mode "error", a last chunk beside
    a whole prompt. Layer 0 runs unguarded first (Triton compiles there); the rest is guarded."""
    config = load_config(dict(STEP_CASES[case], budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    pol, dev, watch = get_policy(config), torch.device("cuda"), compaction.NanWatch()
    hq, hkv, d, scale, layers = 4, 2, 16, 16 ** -0.5, 3
    prompt, other, c0 = 37, 21, 20
    q, k, v = (torch.randn(prompt + other, h, d, device=dev) for h in (hq, hkv, hkv))
    bt = torch.arange(1, 2 * 12 + 1, device=dev).view(2, 12).int()
    views = tuple(torch.zeros(26, BS, hkv, d, device=dev) for _ in range(2))
    for cache, t in zip(views, (k, v)):
        for row, n, first in ((0, prompt, 0), (1, other, prompt)):
            pos = torch.arange(n, device=dev)
            cache[bt[row, pos // BS].long(), pos % BS] = t[first: first + n]
    carry = {}
    _, _, _, stash = compaction.plan_prefills(config, pol, [(0, 0, 0, c0, prompt)], bt, BS, [carry])
    for layer in range(layers):
        compaction.stash_chunks(compaction.StepPlan(None, stash, bt, watch), layer, pol, q[:c0], k[:c0], v[:c0],
                                views, scale)
    steps = [(0, 0, c0, prompt - c0, prompt), (1, prompt - c0, 0, other, other)]
    _, _, plan, _ = compaction.plan_prefills(config, pol, steps, bt, BS, [carry, None])
    sel, written = compaction.StepSelection(layers), []

    def finish(kept, i):
        ks, vs = compaction.gather_kept_cached(kept, i, bt, views)
        written.append(ks.shape)
    for layer in range(layers):
        with _no_host_sync(layer > 0):
            aq, ak, av, partials = compaction.assemble(plan, layer, q[c0:], k[c0:], v[c0:], views, bt, BS,
                                                       values=False)
            scores = compaction.layer_scores(pol, plan, aq, ak, layer=layer, scale=scale, partials=partials)
            sel.add(pol, plan, layer, scores, finish, heads=hkv, nan=watch)
            watch.flush()
    torch.cuda.synchronize()
    watch.check()
    assert sel.done and written == [(sum(plan.keeps), hkv, d)] * layers


def test_late_rows_split_capture_index():
    """LateRows.split takes the one-token prompt steps (c0 > 0) of pruned requests out of the plan, writes their
    token ids into the persistent index the layers copy (zeros elsewhere, and all zeros again at the next step
    without any, so a shorter step never reads past its tokens), and refuses more rows than the buffers hold."""
    config = load_config(dict(policy="snapkv", budget={"keep_tokens": 12}, window=4, sink_tokens=2,
                              min_prompt_tokens=10))
    pol = get_policy(config)
    late = compaction.LateRows("cpu")
    bt = torch.arange(40, dtype=torch.int32).view(4, 10)
    steps = [(0, 0, 30, 1, 40), (1, 1, 0, 5, 40), (2, 6, 7, 1, 9), (3, 7, 12, 1, 40)]   # row 2: never pruned
    carries = [{}, {}, {}, {}]
    kept, kept_carries = late.split(config, pol, steps, carries, bt)
    assert kept == steps[1:3] and kept_carries == carries[1:3]
    assert late.index.tolist() == [0, 7] + [0] * (compaction.LATE_ROWS - 2)
    assert [(ch.c0, ch.prompt, ch.start) for ch in late.pending.stash] == [(30, 40, 0), (12, 40, 1)]
    assert torch.equal(late.pending.block_table, bt[[0, 3]])
    assert late.split(config, pol, [], [], bt) == ([], []) and not late.index.any()
    many = [(r, r, 5, 1, 40) for r in range(compaction.LATE_ROWS + 1)]
    with pytest.raises(RuntimeError, match="one-token chunk in one step"):
        late.split(config, pol, many, [{}] * len(many), bt.repeat(3, 1))
