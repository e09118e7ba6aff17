"""Command line for the engine: inspect, complete, infill, and the embedded model's training pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import bench, evaluation, fim, gguf, vocab
from .checkpoint import make_test_checkpoint
from .codellama import QUANT_CHOICES, QUANT_HELP, load_model
from .errors import ModelError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`| head`): point stdout at nothing, so exiting does not fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kernel_model", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="describe a checkpoint as JSON")
    add_model_options(info)
    info.set_defaults(func=run_info)

    complete = commands.add_parser("complete", help="continue a prompt left to right")
    add_model_options(complete)
    complete.add_argument("--prompt", required=True)
    add_sampling_options(complete)
    complete.set_defaults(func=run_complete)

    infill = commands.add_parser("infill", help="fill the middle between a prefix and a suffix")
    add_model_options(infill)
    infill.add_argument("--prefix", required=True)
    infill.add_argument("--suffix", default="")
    infill.add_argument("--suffix-first", action="store_true", help="SPM order (suffix, then prefix)")
    add_sampling_options(infill)
    infill.set_defaults(func=run_infill)

    make = commands.add_parser("make-test-checkpoint", help="write a small random-weight checkpoint")
    make.add_argument("out", type=Path)
    make.add_argument("--layout", choices=("meta", "hf"), default="meta")
    make.add_argument("--tokenizer", type=Path, required=True, help="a sentencepiece tokenizer.model")
    make.add_argument("--shards", type=int, default=1)
    make.add_argument("--dim", type=int, default=64)
    make.add_argument("--layers", type=int, default=2)
    make.add_argument("--heads", type=int, default=4)
    make.add_argument("--kv-heads", type=int, default=None)
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(func=run_make_test_checkpoint)

    # The embedded model's pipeline: tokenizer training, FIM tokenization, evaluation.
    for module in (vocab, fim, evaluation, bench, gguf):
        module.add_cli(commands)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder, or 'embedded'")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)


def run_info(args: argparse.Namespace) -> None:
    model = load_model(args.model, args.device, args.dtype, quant=args.quant)
    print(json.dumps(model.info(), indent=2))


def run_complete(args: argparse.Namespace) -> None:
    model = load_model(args.model, args.device, args.dtype, quant=args.quant)
    stream = model.stream_complete(
        args.prompt, args.max_new_tokens, args.temperature, args.top_p, seed=args.seed
    )
    print_stream(stream)


def run_infill(args: argparse.Namespace) -> None:
    model = load_model(args.model, args.device, args.dtype, quant=args.quant)
    stream = model.stream_infill(
        args.prefix,
        args.suffix,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.suffix_first,
        seed=args.seed,
    )
    print_stream(stream)


def print_stream(stream) -> None:
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def run_make_test_checkpoint(args: argparse.Namespace) -> None:
    shape = make_test_checkpoint(
        args.out, args.layout, args.tokenizer, dim=args.dim, layers=args.layers, heads=args.heads,
        kv_heads=args.kv_heads, shards=args.shards, seed=args.seed,
    )  # fmt: skip
    print(json.dumps({"out": str(args.out), "layout": args.layout, "vocab": shape.vocab_size}))


if __name__ == "__main__":
    sys.exit(main())
