#!/usr/bin/env bash
# One device call (GPU machine, repo root): train three variants of the retrieval model side by side on the one GPU
# (the model is tiny; the GPU has room), keep the one with the best unpruned exact match, then run the
# transformers-path accuracy table on the GPU as a cross-check of the CPU table. Lands in $OUT: model/ (the chosen
# variant, with task.json), variants.json (every variant's result), train.log (all logs), train_log.jsonl (the chosen
# one's), eval_hf_gpu.json. Checkpoints are saved every 2 minutes, so a run cut short still returns a model.
# Usage: TRAIN_SECONDS=420 EVAL_SECONDS=100 bash benchmarks/quality/gpu_train.sh
set -uo pipefail
export OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/pkg . >/dev/null
export PYTHONPATH=/tmp/pkg PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
V=/tmp/variants
declare -A ARGS=([a]="--filler phrases --lm-loss --copy-aux 1 --lr 2e-3"
                 [b]="--filler random --no-lm-loss --copy-aux 1 --lr 2e-3"
                 [c]="--filler random --no-lm-loss --copy-aux 1 --lr 3e-3 --hidden 128 --layers 2 --tokens-per-step 4096")
# (b) trained the shipped model (tests/data/retrieval-llama/card.md; its flags are train.py's defaults); (a) is
# 4 x 256 with phrase filler and next-token loss; (c) is the recipe of the earlier CPU-trained model (2 x 128)
for v in a b c; do
    python3 benchmarks/quality/train.py --out $V/$v --train-seconds "${TRAIN_SECONDS:-420}" ${ARGS[$v]} ${EXTRA_TRAIN_ARGS:-} \
        > $V.$v.log 2>&1 &
done
wait
for v in a b c; do echo "== variant $v: ${ARGS[$v]}"; grep -v "Writing model" $V.$v.log; done > "$OUT/train.log"
grep -h unpruned_exact_match $V.?.log
BEST=$(python3 - <<'PY'
import json, os
res = {}
for v in "abc":
    try:
        res[v] = json.load(open(f"/tmp/variants/{v}/result.json"))
    except OSError:
        pass
json.dump(res, open(os.environ["OUT"] + "/variants.json", "w"), indent=1)
print(max(res, key=lambda v: res[v]["unpruned_exact_match"]) if res else "a")
PY
)
echo "chosen variant: $BEST"
cp -r $V/$BEST/model "$OUT/model" && cp $V/$BEST/train_log.jsonl "$OUT/train_log.jsonl"
timeout "${EVAL_SECONDS:-110}" python3 benchmarks/quality/eval.py run --engine transformers --device cuda \
    --model "$OUT/model" --out "$OUT/eval_hf_gpu.json" --samples 200 --lens 1024 2048 3072 4096 --batch 25 ${EXTRA_EVAL_ARGS:-} 2>&1 \
    | grep -v "Loading weights"
echo "done"
