"""Synthetic long-context retrieval (multi-query associative recall), seeded and importable.

A sample is one token sequence (vocabulary of VOCAB_SIZE ids, no tokenizer needed):

    BOS  filler … REC k v1 v2 v3 … filler … REC k' v1' v2' v3' … filler   QRY k
    └─────────────────── context of `context_len` tokens ──────────────┘  └question┘
    answer (what the model must generate): v1 v2 v3 EOS

- filler ("phrases", the default): each sample draws its own small pool of short random phrases over the FILLER
  ids and the filler is a random sequence of those phrases, so it repeats like text does (a language-model loss on
  it teaches the copy/induction mechanism that retrieval needs); filler "random": i.i.d. uniform FILLER ids;
- records (REC, KEY_LEN key tokens, VALUE_LEN value tokens) sit at uniformly random, non-overlapping places of the
  context, overwriting filler;
- keys are distinct within a sample; key and value tokens are drawn fresh for every sample, so the answer can only
  come from reading the context (no memorised mapping exists);
- the question names the key of one record; the answer is that record's value, then EOS.
Evaluation samples ask about a record whose start lies at a uniformly random depth in [0, max_depth) of the context
(near the start, in the middle, later on); training sequences carry several questions (each followed by its answer).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VOCAB_SIZE = 256          # small on purpose: every token is seen often, so copying is learned in fewer steps
PAD, BOS, EOS, REC, QRY = 0, 1, 2, 3, 4
FILLER = (8, 96)          # [lo, hi) token ids of filler
KEYS = (96, 176)          # key token ids
VALUES = (176, 256)       # value token ids (a 3-token value is one of 80**3 = 512000)
KEY_LEN = 1
VALUE_LEN = 3
RECORD_LEN = 1 + KEY_LEN + VALUE_LEN
QUESTION_LEN = 1 + KEY_LEN
ANSWER_LEN = VALUE_LEN + 1  # value tokens + EOS
IGNORE = -100               # label of positions without loss
FILLER_KINDS = ("phrases", "random")
PHRASES = (8, 32)           # phrases per sample (inclusive)
PHRASE_LEN = (2, 6)         # tokens per phrase (inclusive)


@dataclass(frozen=True)
class Sample:
    """One evaluation sample. prompt: BOS + context + question (token ids); answer: value tokens + EOS;
    depth: start of the queried record / context length, in [0, 1); context_len: tokens between BOS and QRY."""
    prompt: list[int]
    answer: list[int]
    depth: float
    context_len: int


def filler(rng: np.random.Generator, length: int, kind: str = "phrases") -> np.ndarray:
    """Filler tokens (length,) int64 over the FILLER ids (see the module docstring for the kinds)."""
    if kind == "random":
        return rng.integers(*FILLER, size=length)
    if kind != "phrases":
        raise ValueError(f"filler kind must be one of {FILLER_KINDS}, got {kind!r}")
    n = int(rng.integers(PHRASES[0], PHRASES[1] + 1))
    lens = rng.integers(PHRASE_LEN[0], PHRASE_LEN[1] + 1, size=n)
    pool = rng.integers(*FILLER, size=(n, PHRASE_LEN[1]))
    ids = rng.integers(0, n, size=length // PHRASE_LEN[0] + 1)          # enough phrases to cover `length`
    reps = lens[ids]
    starts = np.cumsum(reps) - reps
    pid = np.repeat(ids, reps)
    within = np.arange(len(pid)) - np.repeat(starts, reps)
    return pool[pid, within][:length]


def _context(rng: np.random.Generator, context_len: int, num_records: int, kind: str):
    """Context tokens (context_len,) int64 with `num_records` records; returns (tokens, keys (R, KEY_LEN),
    values (R, VALUE_LEN), starts (R,)) with records in order of position."""
    if num_records < 1 or num_records * RECORD_LEN > context_len:
        raise ValueError(f"{num_records} records of {RECORD_LEN} tokens do not fit a context of {context_len} tokens")
    tokens = filler(rng, context_len, kind)
    # distinct keys: draw distinct integers in [0, n_keys ** KEY_LEN) and write them in base n_keys
    n_keys = KEYS[1] - KEYS[0]
    codes = rng.choice(n_keys ** KEY_LEN, size=num_records, replace=False)
    keys = np.stack([(codes // n_keys ** i) % n_keys for i in range(KEY_LEN)], axis=1) + KEYS[0]
    values = rng.integers(*VALUES, size=(num_records, VALUE_LEN))
    # non-overlapping uniform placement: sorted offsets into the free space, shifted by the records before them
    free = context_len - num_records * RECORD_LEN
    starts = np.sort(rng.integers(0, free + 1, size=num_records)) + RECORD_LEN * np.arange(num_records)
    for s, k, v in zip(starts, keys, values):
        tokens[s:s + RECORD_LEN] = np.concatenate([[REC], k, v])
    return tokens, keys, values, starts


def make_sample(rng: np.random.Generator, context_len: int, num_records: int, max_depth: float = 0.9,
                filler: str = "phrases") -> Sample:
    """One evaluation sample; the queried record is drawn uniformly among records starting before
    max_depth * context_len (at least the first record qualifies)."""
    tokens, keys, values, starts = _context(rng, context_len, num_records, filler)
    eligible = np.flatnonzero(starts < max_depth * context_len)
    q = int(rng.choice(eligible)) if len(eligible) else 0
    prompt = [BOS, *tokens.tolist(), QRY, *keys[q].tolist()]
    return Sample(prompt=prompt, answer=[*values[q].tolist(), EOS], depth=float(starts[q] / context_len),
                  context_len=context_len)


def eval_samples(seed: int, num: int, context_lens=(1024, 2048, 3072, 4096), num_records: int = 8,
                 max_depth: float = 0.9, filler: str = "phrases") -> list[Sample]:
    """`num` samples, context lengths cycling through `context_lens` (equal lengths batch well), from `seed`."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, context_lens[i % len(context_lens)], num_records, max_depth, filler)
            for i in range(num)]


def copy_batch(rng: np.random.Generator, batch: int, length: int, span: tuple[int, int] = (8, 32)):
    """Auxiliary training batch that only in-context copying can predict: random tokens (ids FILLER[0]..VOCAB_SIZE)
    in which one span (length drawn in `span`) reappears later at a random offset; labels are the repeated span's
    tokens after its first (IGNORE elsewhere). Random offsets rule out a fixed-distance positional shortcut.
    Returns ids, labels (batch, length) int64."""
    if length < 2 * span[1]:
        raise ValueError(f"copy batch length {length} is shorter than two spans of {span[1]} tokens")
    ids = rng.integers(FILLER[0], VOCAB_SIZE, size=(batch, length))
    labels = np.full((batch, length), IGNORE, dtype=np.int64)
    for r in range(batch):
        n = int(rng.integers(span[0], span[1] + 1))
        src = int(rng.integers(0, length - 2 * n + 1))
        dst = int(rng.integers(src + n, length - n + 1))
        ids[r, dst:dst + n] = ids[r, src:src + n]
        labels[r, dst + 1:dst + n] = ids[r, dst + 1:dst + n]
    return ids, labels


def train_batch(rng: np.random.Generator, batch: int, context_len: int, num_records: tuple[int, int],
                num_questions: tuple[int, int], filler: str = "phrases"):
    """A training batch: input_ids (B, T) int64 and labels (B, T) int64 (IGNORE except the answer tokens, already
    aligned with input_ids: labels[t] is the target at position t, shifted by the model's loss as usual).

    Every row: BOS + context + Q questions each followed by its answer (Q drawn in num_questions, inclusive, the same
    for the batch so rows have equal length); records per row drawn in num_records (inclusive, capped by the
    context). The first question/answer is exactly the evaluation format.
    """
    q = int(rng.integers(num_questions[0], num_questions[1] + 1))
    max_records = max(1, min(num_records[1], context_len // (2 * RECORD_LEN)))
    length = 1 + context_len + q * (QUESTION_LEN + ANSWER_LEN)
    ids = np.empty((batch, length), dtype=np.int64)
    labels = np.full((batch, length), IGNORE, dtype=np.int64)
    for b in range(batch):
        r = int(rng.integers(min(num_records[0], max_records), max_records + 1))
        tokens, keys, values, _ = _context(rng, context_len, r, filler)
        asked = rng.choice(r, size=q, replace=q > r)
        parts = [[BOS], tokens]
        pos = 1 + context_len
        for i in asked:
            parts.append(np.concatenate([[QRY], keys[i], values[i], [EOS]]))
            start = pos + QUESTION_LEN
            labels[b, start:start + ANSWER_LEN] = parts[-1][QUESTION_LEN:]
            pos += QUESTION_LEN + ANSWER_LEN
        ids[b] = np.concatenate(parts)
    return ids, labels
