#!/usr/bin/env bash
# One device call for a GPU session: the benchmarks first, then the embedded model's training in the time left.
#
#   bash scripts/gpu_session.sh CORPUS.txt.xz OUT [BENCH_STEP ...]
#
# A lent GPU gives a session 15 minutes (start-up included) and a call 10, so the two GPU jobs share
# one call: `scripts/bench_gpu.sh` steps (default: graphs int8 fused, the server's path and our
# decode kernels on it; with the compiled steps the benchmarks took 338 s on an H200 and left
# training 147 s, too little to ship a model, so a session meant to train gives training a call of
# its own), then
# `scripts/train_embedded_gpu.sh` with BUDGET_SECONDS set to what the call has left. The model is
# scored afterwards on the returned files (README, "The embedded model"), not here.
# OUT receives results.tar (the bench JSON and logs, the training's console, progress.txt), rewritten
# after each stage so a call cut short still returns what finished, and train/ (log, config, the
# model as 15 MB pieces): six files, within the eight a call returns.
# CALL_SECONDS (585) is the time the whole script may take; training gets it less the benchmarks,
# less 100 s for unpacking, tokenizing (41 s on 16 cores) and exporting; under 120 s left, it is skipped.
set -uo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 CORPUS.txt.xz OUT [BENCH_STEP ...]" >&2
    exit 2
fi
if [ ! -f "$1" ]; then
    echo "no corpus at $1" >&2
    exit 2
fi
corpus=$(realpath "$1")
mkdir -p "$2/train"
out=$(realpath "$2")
shift 2
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(graphs int8 fused)
cd "$(dirname "$0")/.."
results=$(mktemp -d)
export PYTHONUNBUFFERED=1

pack() { tar -C "$results" -cf "$out/results.tar" .; }
{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
    python3 -c 'import torch; print("torch", torch.__version__)'
} >"$results/progress.txt" 2>&1
pack

bash scripts/bench_gpu.sh "$results/bench" "${steps[@]}" >>"$results/progress.txt" 2>&1
budget=$((${CALL_SECONDS:-585} - SECONDS - 100))
if [ $budget -lt 120 ]; then
    echo "benchmarks done at $SECONDS s; too little time left to train" >>"$results/progress.txt"
else
    echo "benchmarks done at $SECONDS s; training for $budget s" >>"$results/progress.txt"
    pack
    BUDGET_SECONDS=$budget EVAL_SECONDS=0 bash scripts/train_embedded_gpu.sh "$corpus" /dev/null "$out/train" \
        >"$results/train.txt" 2>&1
    echo "training: exit $? at $SECONDS s" >>"$results/progress.txt"
fi
pack
cat "$results/progress.txt"
