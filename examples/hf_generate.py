"""Pruned vs unpruned generation in transformers.

    python examples/hf_generate.py [--model PATH] [--config configs/snapkv.yaml] [--prompt-tokens 1536]

Without --model, a tiny random Llama is built into a temporary folder (tests/tiny_models.py), so the tokens are
meaningless: the example shows the API and what pruning saves.
"""
import argparse
import os
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

from colreduce_kvprune.config import load_config
from colreduce_kvprune.hf import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="a local transformers CausalLM folder (llama, mistral, qwen2, qwen3)")
parser.add_argument("--config", default=os.path.join(ROOT, "configs", "snapkv.yaml"))
parser.add_argument("--prompt-tokens", type=int, default=1536)
parser.add_argument("--new-tokens", type=int, default=16)
args = parser.parse_args()

if args.model is None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import make_tiny_model
    args.model = make_tiny_model("llama", tempfile.mkdtemp(prefix="tiny-llama-"))
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
config = load_config(args.config)
prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

full = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)[0, args.prompt_tokens:].tolist()
pruned = generate(model, prompt, config, max_new_tokens=args.new_tokens)   # greedy by default
print(f"config {args.config}: policy {config.policy}, budget {config.budget.to_dict()}")
print("unpruned:", full)
print("pruned:  ", pruned.sequences[0])
print(pruned.summary())
