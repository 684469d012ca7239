"""The plugin's backend-independent tensor work (colreduce_kvprune.vllm.compaction) against plain Python loops on
random batches: the vectorised remap of pruned rows, the RowState table, and the gather of kept K/V."""
import random

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
    new_bt, new_seq = compaction.remap_rows(state, bt, seq, positions, qs, sum(qlen), slots, BS)
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
    prefills = [(r, s, n) for r, (s, n) in enumerate(zip(starts, lengths))]
    fresh_rows, fresh_values, plan = compaction.plan_prefills(config, policy, prefills, bt, BS)
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
