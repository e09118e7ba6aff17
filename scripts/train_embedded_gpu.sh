#!/usr/bin/env bash
# Trains, scores and packs the embedded model on one lent GPU in a single call of about 9 minutes.
#
#   bash scripts/train_embedded_gpu.sh CORPUS.txt.xz HUMANEVAL.jsonl.gz OUT
#
# CORPUS is the large corpus's shard compressed with xz (README, "The embedded model"); the GPU
# machine cannot reach the registry, so the corpus and HumanEval's problems travel as files. OUT
# receives the training log and config, the model as a tar in pieces (the device returns files of at
# most 16 MiB: `cat OUT/model.tar.part-* | tar -xf - -C DIR`), then `eval fim-probe`'s JSON and both
# modes' eval JSON.
#
# Knobs, from the environment: BUDGET_SECONDS (training, compilation included; 300), EPOCHS (FIM
# passes tokenized; 6), MAX_CHARS (documents are cut into pieces of at most this many characters,
# and each training window starts at a piece, so that a FIM sample is seen whole; 3 x SEQ_LEN
# characters: 98 % of pieces fit the window; 1200 packs several to a window, which taught PSM about
# twice as fast per token in the CPU runs the README reports), LINE_RATE (the share of FIM samples
# split at line starts; 0, Code Llama's recipe), DIM / LAYERS / HEADS (384 / 8 / 6: 20 M parameters,
# 21 MB as int8, about 170 tokens/s greedy on 2 CPU cores), SEQ_LEN (1024, the window the model will
# serve), BATCH (32), LR (2e-3), INIT_FROM (a model of the same shape to continue training, e.g.
# embedded; default: random weights), EVAL_LIMIT (all 1,033 tasks), EVAL_SECONDS (the limit of each
# mode's eval; 150; 0 skips the evals, to run them elsewhere on the returned model).
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 CORPUS.txt.xz HUMANEVAL.jsonl.gz OUT" >&2
    exit 2
fi
mkdir -p "$3"
corpus=$(realpath "$1") humaneval=$(realpath "$2") out=$(realpath "$3")
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
cd "$(dirname "$0")/.."  # the checkout: python -m kernel_model runs from here
tokenizer=kernel_model/embedded/tokenizer.model
export PYTHONUNBUFFERED=1

python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$corpus" "$work/corpus.txt"
python3 -m kernel_model tokenize-corpus "$work/corpus.txt" --tokenizer "$tokenizer" \
    --out "$work/tokens.bin" --epochs "${EPOCHS:-6}" --max-chars "${MAX_CHARS:-$((3 * ${SEQ_LEN:-1024}))}" \
    --line-rate "${LINE_RATE:-0}"
lr=${LR:-2e-3}
python3 -m kernel_model.train --tokens "$work/tokens.bin" --tokenizer "$tokenizer" --out "$work/run" \
    --dim "${DIM:-384}" --layers "${LAYERS:-8}" --heads "${HEADS:-6}" --seq-len "${SEQ_LEN:-1024}" \
    --batch-size "${BATCH:-32}" --learning-rate "$lr" --min-learning-rate "$(python3 -c "print($lr / 10)")" \
    --warmup-steps 200 --budget-seconds "${BUDGET_SECONDS:-300}" --log-every 50 --save-every 1000000 --align-windows \
    --export-int8 $([ "$(python3 -c 'import torch; print(torch.cuda.is_available())')" = True ] && echo --compile) \
    ${INIT_FROM:+--init-from "$INIT_FROM"} \
    2>&1 | tee "$out/train.log"
# The model comes back first: the evals after it may outrun the call's time.
cp "$work/run/log.jsonl" "$work/run/config.json" "$out/"
tar -C "$work/run/model" -cf - . | split -b 15m - "$out/model.tar.part-"
# Seconds on a GPU (cut short rather than outrun the call): whether the model writes a masked line
# in each layout, even where pass@1 cannot tell.
timeout 45 python3 -m kernel_model eval fim-probe --model "$work/run/model" --corpus "$work/corpus.txt" \
    --samples 150 | tee "$out/probe.json" || echo "fim-probe: exit $?"

limit=()
[ -n "${EVAL_LIMIT:-}" ] && limit=(--limit "$EVAL_LIMIT")
modes=(spm psm)
[ "${EVAL_SECONDS:-150}" = 0 ] && modes=()
for mode in "${modes[@]}"; do  # in float32 (a CPU serves it through the int8 kernel, which scored the same)
    timeout "${EVAL_SECONDS:-150}" python3 -m kernel_model eval humaneval-infill --model "$work/run/model" \
        --mode "$mode" --dtype float32 --data "$humaneval" --max-new-tokens 48 "${limit[@]}" \
        | tee "$out/eval-$mode.json" || echo "eval $mode: exit $?"
done
ls -l "$out"
