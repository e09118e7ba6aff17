#!/usr/bin/env bash
# Runs BENCHMARKS.md's GPU measurements on a lent GPU, most important first.
#
#   bash scripts/bench_gpu.sh OUT [STEP ...]
#
# Each step is its own `python -m kernel_model bench` process under its own time limit, writing
# OUT/STEP.json (the figures) and OUT/STEP.log (progress), so a step that runs long loses only
# itself. Steps (default: compiled int8 long, 500 s of limits, which fit one 10-minute call; hf
# takes a second call; each limit includes building 7B random weights and compiling):
#   graphs    the server's default path (CUDA graphs, no compile): compiled's figures (limit 100 s)
#             (every decode step below also lists a decode's kernels: --profile)
#   compiled  --compile: decode, prefill 1k/4k/16k, first token after an edit      (limit 260 s)
#   int8      --quant int8 on the default path (the Triton kernel): against graphs  (limit 150 s)
#   int8-compiled  --compile --quant int8 (the kernel inside the compiled step): against compiled (170 s)
#   fused     bf16 through our kernels, norms, SwiGLU, RoPE in them (--decode-kernels all): against graphs (150 s)
#   fused-compiled  the same with --compile: against compiled                          (limit 260 s)
#   chunk16k  the default path with 16k prompts in one chunk (flash attention)      (limit 90 s)
#   cudnn     the same, cuDNN's attention first for fresh prompts                    (limit 90 s)
#   cudnn-reuse  cudnn with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1: one cuDNN graph for all lengths (90 s)
#   long      a 100,000-token prompt on the server's default path                   (limit 90 s)
#   hf        --compile --compare-hf at 4k: transformers' static cache and eager    (limit 300 s)
# LIMIT_SCALE (1.0) multiplies every limit; SHAPE (7b) picks another shape (tiny: a CPU smoke test).
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT [STEP ...]" >&2
    exit 2
fi
mkdir -p "$1"
out=$(realpath "$1")
shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(compiled int8 long)
for name in "${steps[@]}"; do
    case $name in
        graphs | compiled | int8 | int8-compiled | fused | fused-compiled | chunk16k | cudnn | cudnn-reuse | long | hf) ;;
        *) echo "unknown step $name (see the header of $0)" >&2 && exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."  # the checkout: python -m kernel_model runs from here
export PYTHONUNBUFFERED=1

step() {
    local name=$1 limit=$2
    shift 2
    limit=$(python3 -c "print(int($limit * ${LIMIT_SCALE:-1.0}))")
    local started=$SECONDS
    timeout --kill-after=10 "$limit" python3 -m kernel_model bench --shape "${SHAPE:-7b}" "$@" \
        >"$out/$name.json" 2>"$out/$name.log"
    echo "$name: exit $? after $((SECONDS - started)) s (limit $limit s)"
}

for name in "${steps[@]}"; do
    case $name in
        graphs) step graphs 100 --prompt-tokens 1024,4096,16384 --repeats 3 --profile ;;
        compiled) step compiled 260 --compile --prompt-tokens 1024,4096,16384 --repeats 3 --profile ;;
        int8) step int8 150 --quant int8 --prompt-tokens 4096 --repeats 3 --profile ;;
        int8-compiled) step int8-compiled 170 --compile --quant int8 --prompt-tokens 4096 --repeats 3 --profile ;;
        fused) step fused 150 --decode-kernels all --prompt-tokens 4096 --repeats 3 --profile ;;
        fused-compiled) step fused-compiled 260 --decode-kernels all --compile --prompt-tokens 4096 --repeats 3 --profile ;;
        chunk16k) step chunk16k 90 --prompt-tokens 4096,16384 --prefill-chunk 16384 --repeats 3 ;;
        cudnn) step cudnn 90 --prompt-tokens 4096,16384 --prefill-chunk 16384 --prompt-attention cudnn --repeats 3 ;;
        cudnn-reuse) TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 step cudnn-reuse 90 --prompt-tokens 4096,16384 \
            --prefill-chunk 16384 --prompt-attention cudnn --repeats 3 ;;
        long) step long 90 --prompt-tokens 100000 --new-tokens 16 --repeats 1 ;;
        hf) step hf 300 --compile --compare-hf --prompt-tokens 4096 --repeats 2 ;;
    esac
done
