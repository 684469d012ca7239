"""Tiny random decoder-only models (Llama, Qwen2, Qwen3, Mistral) written to a folder: demos and tests, no download.

`make_tiny_model(kind, path, **overrides) -> path` builds the model from a small config (float32 weights, seeded,
hidden 128, GQA 4 query heads / 2 kv heads of dim 32 (a head size vLLM's CPU attention supports), 2 layers, vocab
512, 4096 positions) and writes it with `save_pretrained`, plus a minimal word-level tokenizer ("t0" … "t511") so
engines that initialise a tokenizer can load the folder too. (For model type qwen2, AutoTokenizer picks its own
Qwen2Tokenizer class, which does not read this vocabulary: pass token ids / skip_tokenizer_init.)
`default_model()` builds the Llama once into a cache folder (the `colreduce-kvprune run` default).
Needs transformers and tokenizers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

KINDS = ("llama", "qwen2", "qwen3", "mistral")
CACHE_ENV = "COLREDUCE_KVPRUNE_CACHE"      # overrides ~/.cache/colreduce-kvprune

# Shared small shape. initializer_range 0.1 (not 0.02) makes attention and logits peaked enough that pruning
# visibly changes greedy outputs and argmax ties are unlikely.
_BASE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
             initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def tiny_config(kind: str, **overrides):
    """The transformers config of a tiny `kind` model ("llama" | "qwen2" | "qwen3" | "mistral")."""
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}
    if kind not in classes:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    params = dict(_BASE)
    if kind == "mistral":
        params["sliding_window"] = None  # full attention: pruning with a sliding window is a different problem
    params.update(overrides)
    return getattr(transformers, classes[kind])(**params)


def make_tiny_model(kind: str, path: str | os.PathLike, *, seed: int = 0, tokenizer: bool = True,
                    **overrides) -> str:
    """Build a tiny random `kind` CausalLM (float32, weights from `seed`) and save it to `path`; return `path`.

    `overrides` replace config fields (e.g. num_hidden_layers=3). The global torch RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = os.fspath(path)
    model.save_pretrained(path)
    if tokenizer:
        _save_word_tokenizer(path, config.vocab_size)
    return path


def cache_dir() -> Path:
    """Where built demo models live: $COLREDUCE_KVPRUNE_CACHE, else $XDG_CACHE_HOME or ~/.cache, /colreduce-kvprune."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "colreduce-kvprune"


def default_model(kind: str = "llama", seed: int = 0) -> str:
    """The folder of the tiny random `kind` model in the cache, built on first use (a few seconds); return it.

    Built into a temporary folder and renamed, so a crash never leaves a half-written model behind; a folder whose
    stamp does not match this builder's shape is rebuilt."""
    target = cache_dir() / f"tiny-{kind}-seed{seed}"
    stamp = json.dumps({"kind": kind, "seed": seed, "base": _BASE}, sort_keys=True)
    stamp_file = target / "colreduce_kvprune_stamp.json"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    make_tiny_model(kind, tmp, seed=seed)
    (tmp / stamp_file.name).write_text(stamp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return str(target)


def _save_word_tokenizer(path: str, vocab_size: int) -> None:
    """A whitespace word-level tokenizer whose token i is the word "t{i}" (t0 = unk/pad, t1 = bos, t2 = eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                                   eos_token="t2")
    fast.save_pretrained(path)
