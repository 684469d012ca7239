#!/usr/bin/env bash
# One device call (GPU machine, repo root): train the retrieval model, then the transformers-path accuracy table on
# the GPU as a cross-check of the CPU table. Everything lands in $OUT (model/, train.log, train_log.jsonl,
# result.json, eval_hf_gpu.json); a checkpoint is saved every 2 minutes, so a run cut short still returns a model.
# Usage: TRAIN_SECONDS=400 EVAL_SECONDS=120 bash benchmarks/quality/gpu_train.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/pkg . >/dev/null
export PYTHONPATH=/tmp/pkg PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/quality/train.py --out "$OUT" --train-seconds "${TRAIN_SECONDS:-400}" 2>&1 \
    | grep -v "Writing model" | tee "$OUT/train.log"
timeout "${EVAL_SECONDS:-120}" python3 benchmarks/quality/eval.py run --engine transformers --device cuda \
    --model "$OUT/model" --out "$OUT/eval_hf_gpu.json" --samples 200 --lens 1024 2048 3072 4096 --batch 25 2>&1 \
    | grep -v "Loading weights"
echo "done"
