"""`eval fim-probe`: how a model writes a masked line in each FIM layout, with and without the far side of the gap.

HumanEval's pass@1 needs a whole correct line and says nothing while a model is still learning a
layout. This probe reads the same skill teacher-forced on lines of corpus documents (150 lines take
two minutes on a CPU): for each layout it reports the middle's mean negative log-likelihood, how
often the first middle token is the model's top choice, and how often every middle token is. Each
figure is also taken with the suffix left out, which shows whether the model uses the far side of
the gap: the suffix in SPM, where the prefix sits next to the middle, and in PSM the prefix end it
must find across the suffix. A model that scores the same without the suffix does not read it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .fim import psm_ids, spm_ids, window_pieces

LAYOUTS = {"psm": psm_ids, "spm": spm_ids}


@dataclass(frozen=True)
class MaskedLine:
    prefix: str
    middle: str  # one non-blank line without its newline, which starts the suffix
    suffix: str


def masked_lines(
    documents: Iterable[str], samples: int, seed: int = 0, max_chars: int = 3000
) -> list[MaskedLine]:
    """`samples` documents drawn uniformly (reservoir), each cut to its first window-sized piece with
    one non-blank line, not the first, drawn uniformly as the middle."""
    rng = random.Random(seed)
    chosen: list[str] = []
    for seen, doc in enumerate(documents):
        if seen < samples:
            chosen.append(doc)
        elif (slot := rng.randint(0, seen)) < samples:
            chosen[slot] = doc
    tasks = []
    for doc in chosen:
        lines = window_pieces(doc, rng, max_chars)[0].split("\n")
        candidates = [i for i, line in enumerate(lines) if i > 0 and line.strip()]
        if not candidates:
            continue
        i = rng.choice(candidates)
        # The newline goes with the suffix: in running text it merges with the next line's indentation,
        # so a lone "\n" closing the middle is a target the model rarely meets (HumanEval's scoring, too,
        # reads only the text before a completion's first newline).
        after = "\n".join(lines[i + 1 :])
        tasks.append(
            MaskedLine("\n".join(lines[:i]) + "\n", lines[i], "\n" + after if i + 1 < len(lines) else "")
        )
    return tasks


def score_middle(net: torch.nn.Module, ids: list[int], middle_len: int) -> tuple[float, bool, bool]:
    """Teacher-forced over the `middle_len` ids before the last (▁<EOT>): mean NLL, first id the top
    choice, every id the top choice (exactly when greedy decoding would write the middle)."""
    start = len(ids) - 1 - middle_len
    tokens = torch.tensor([ids], device=net.tok_embeddings.weight.device)
    with torch.inference_mode():
        logits = net(tokens[:, : start + middle_len - 1]).float()[0, start - 1 :]
    targets = tokens[0, start : start + middle_len]
    hits = logits.argmax(-1) == targets
    return float(torch.nn.functional.cross_entropy(logits, targets)), bool(hits[0]), bool(hits.all())


def probe(model, tasks: list[MaskedLine]) -> dict:
    """Teacher-forced figures per layout, with the suffix and without it (`*_no_suffix`)."""
    tok, net = model.tokenizer, model.model
    results: dict = {}
    for name, layout in LAYOUTS.items():
        for keep_suffix in (True, False):
            scores = [
                score_middle(net, ids, len(tok.encode_infilling(task.middle)))
                for task in tasks
                if len(ids := layout(task.prefix, task.middle, task.suffix if keep_suffix else "", tok))
                <= net.args.max_context
            ]
            n = max(len(scores), 1)
            results[name if keep_suffix else f"{name}_no_suffix"] = {
                "middle_nll": round(sum(s[0] for s in scores) / n, 3),
                "first_token": round(sum(s[1] for s in scores) / n, 3),
                "whole_line": round(sum(s[2] for s in scores) / n, 3),
                "lines": len(scores),
            }
    return results


def _cmd_fim_probe(args: argparse.Namespace) -> int:
    from kernel_model import load_model
    from kernel_model.corpus import iter_documents

    t0 = time.monotonic()
    try:
        tasks = masked_lines(iter_documents(args.corpus), args.samples, args.seed, args.max_chars)
        model = load_model(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not model.supports_infilling:
        print(f"error: {args.model} does not support infilling", file=sys.stderr)
        return 2
    summary = {
        "benchmark": "fim-probe",
        "model": args.model,
        "corpus": str(args.corpus),
        **probe(model, tasks),
    }
    summary["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(summary))
    return 0


def add_cli(benchmarks: argparse._SubParsersAction) -> None:
    """Register `fim-probe` under `eval`."""
    p = benchmarks.add_parser(
        "fim-probe",
        help="teacher-forced masked-line figures per FIM layout, with and without the suffix",
        description="Masks one line in each of N corpus documents; prints one JSON object.",
    )
    p.add_argument("--model", required=True, help="checkpoint path for kernel_model.load_model")
    p.add_argument("--corpus", required=True, help="a corpus directory or one of its shards")
    p.add_argument("--samples", type=int, default=150, help="documents, one masked line each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=3000, help="each document's first piece of at most this")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=_cmd_fim_probe)
