"""What whole-notebook context buys: masked-line completions on real notebooks, scored per context strategy.

Each task is a line of a code cell that the user is (re)writing in the middle of an existing notebook:

- ``line``: the cursor after the line's indentation, the rest of the line gone (the model writes the
  whole statement; the lines below it stay in the cell);
- ``rest``: the user has typed the line up to a word boundary part-way through it.

The truth is the masked part of that line; the completion's first line is scored against it (exact
match, and a Levenshtein similarity). The same task is asked with three notebooks, everything else
(budget, model, settings) the same:

- ``notebook``: the whole notebook, as the frontend sends it;
- ``above``: the cells after the active one removed;
- ``cell``: the active cell alone.

A request goes through the server's own path: `parse_completion` reads the notebook as the frontend
would send it (outputs included, its default), `request_context` builds the prompt with the server's
settings, and `TrimmedStream` generates and trims it as the first choice of a completion. Generation
is greedy (the frontend's default is a temperature of 0.2) and the engine's prefix cache is cleared
before each request, so that a result depends on its task only, never on the requests before it.

    python -m jupyter_codellama.notebook_eval NOTEBOOK_DIR [--every K] [--limit N] [--output rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_model import ModelError

from .context import PYTHON_CELL_MAGICS
from .engines import Engine
from .postprocess import MODES
from .protocol import CompletionRequest, Limits, ProtocolError, parse_completion
from .service import (
    ServiceConfig,
    TrimmedStream,
    fit_to_window,
    load_engine,
    request_context,
    window_tokens,
)

STRATEGIES = ("notebook", "above", "cell")
KINDS = ("line", "rest")
# Shorter lines (`df`, `x[0]`, `)`) are guessed from almost any context and say little about it.
MIN_LINE_CHARS = 6
# A `rest` task leaves the model at least this much of the line (not `)` alone).
MIN_MASKED_CHARS = 3
# Lines in IPython's syntax rather than Python's (magics, shell escapes, help).
IPYTHON_STARTS = ("%", "!", "?")


@dataclass(frozen=True)
class Task:
    """One completion request: a cell being edited, the cursor in it, and what the rest of the line was."""

    task_id: str  # notebook/cell:line/kind
    kind: str  # "line" | "rest"
    notebook: str
    cell: int  # the active cell's index in the notebook
    line: int  # the masked line's index in the cell
    source: str  # the active cell as the user has it: the masked line cut at the cursor
    offset: int  # the cursor, in characters into `source` (code points, as the protocol counts)
    truth: str  # the masked rest of the line, trailing spaces dropped


# ---------------------------------------------------------------------------------------------
# Tasks


def eligible_lines(source: str) -> list[int]:
    """Indices of the lines of a code cell worth masking: lines of Python (continuation lines and
    docstring text included), not comment lines or magics. A truth keeps its trailing comment."""
    lines = source.split("\n")
    if lines[0].startswith("%%"):
        words = lines[0][2:].split()
        if not words or words[0] not in PYTHON_CELL_MAGICS:
            return []  # the body is another language (%%bash, %%html, ...)
    eligible = []
    for i, line in enumerate(lines):
        text = line.strip()
        if len(text) >= MIN_LINE_CHARS and not text.startswith(("#", *IPYTHON_STARTS)):
            eligible.append(i)
    return eligible


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def word_boundaries(line: str) -> list[int]:
    """Cursor positions a `rest` task may take in a line: between a word character and a non-word one,
    after some of the statement and before at least MIN_MASKED_CHARS of it."""
    start = len(line) - len(line.lstrip())
    end = len(line.rstrip())
    return [
        p
        for p in range(start + 1, end)
        if _is_word(line[p - 1]) != _is_word(line[p]) and len(line[p:end].strip()) >= MIN_MASKED_CHARS
    ]


def mask_line(source: str, line: int, kind: str, rng: random.Random) -> tuple[str, int, str] | None:
    """(cell source as typed so far, cursor offset, truth) for masking `line` of a cell; None where a
    `rest` task has no word boundary to stop at."""
    lines = source.split("\n")
    text = lines[line]
    if kind == "line":
        cursor = len(text) - len(text.lstrip())
    elif kind == "rest":
        boundaries = word_boundaries(text)
        if not boundaries:
            return None
        cursor = rng.choice(boundaries)
    else:
        raise ValueError(f"unknown task kind {kind!r}; use {', '.join(KINDS)}")
    typed = [*lines[:line], text[:cursor], *lines[line + 1 :]]
    offset = sum(len(above) + 1 for above in lines[:line]) + cursor
    return "\n".join(typed), offset, text[cursor:].rstrip()


def notebook_tasks(
    name: str, cells: Sequence[dict[str, Any]], kinds: Sequence[str], every: int, seed: int, limit: int | None
) -> list[Task]:
    """Tasks from every `every`-th eligible line of a notebook's code cells (the first at a seeded
    offset), at most `limit` lines; each line gives one task of each kind that it allows."""
    if every < 1:
        raise ValueError(f"--every must be at least 1, not {every}")
    candidates = [
        (index, line)
        for index, cell in enumerate(cells)
        if cell.get("cell_type") == "code"
        for line in eligible_lines(_source(cell))
    ]
    # Seeded by name, not by position in the run: a notebook gets the same tasks in any company.
    start = random.Random(f"{seed}/{name}").randrange(every)
    picked = candidates[start::every][:limit]
    tasks = []
    for index, line in picked:
        source = _source(cells[index])
        for kind in kinds:
            rng = random.Random(f"{seed}/{name}/{index}/{line}/{kind}")
            masked = mask_line(source, line, kind, rng)
            if masked is not None:
                typed, offset, truth = masked
                tasks.append(
                    Task(f"{name}/{index}:{line}/{kind}", kind, name, index, line, typed, offset, truth)
                )
    return tasks


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def strategy_body(cells: Sequence[dict[str, Any]], task: Task, strategy: str) -> dict[str, Any]:
    """The notebook part of a completion message for a task, as the frontend would send it."""
    active = {**cells[task.cell], "source": task.source}
    if strategy == "notebook":
        shown, index = [*cells[: task.cell], active, *cells[task.cell + 1 :]], task.cell
    elif strategy == "above":
        shown, index = [*cells[: task.cell], active], task.cell
    elif strategy == "cell":
        shown, index = [active], 0
    else:
        raise ValueError(f"unknown context strategy {strategy!r}; use {', '.join(STRATEGIES)}")
    return {"notebook": {"cells": shown}, "cell": index, "offset": task.offset}


# ---------------------------------------------------------------------------------------------
# Scoring


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / the longer length: 1.0 for equal strings, 0.0 for nothing in common."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    if not n:
        return {"tasks": 0}

    def mean(key: str) -> float:
        return statistics.fmean(row[key] for row in rows)

    return {
        "tasks": n,
        "exact_match": round(mean("exact"), 4),
        "edit_similarity": round(mean("similarity"), 4),
        "empty": round(statistics.fmean(not row["completion"] for row in rows), 4),
        "prompt_tokens": round(mean("prompt_tokens"), 1),
        "cells_in_prefix": round(mean("cells_in_prefix"), 2),
        "cells_in_suffix": round(mean("cells_in_suffix"), 2),
        "context_truncated": round(statistics.fmean(row["truncated"] for row in rows), 4),
        "finish_reasons": dict(Counter(row["finish_reason"] for row in rows).most_common()),
        "seconds": round(sum(row["seconds"] for row in rows), 1),
    }


def paired(rows: Sequence[dict[str, Any]], base: str, other: str) -> dict[str, Any]:
    """`base` against `other` on the tasks both ran: who alone got the line right, who came closer."""
    by_task: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(row["task_id"], {})[row["strategy"]] = row
    pairs = [(runs[base], runs[other]) for runs in by_task.values() if base in runs and other in runs]
    if not pairs:
        return {"tasks": 0}
    return {
        "tasks": len(pairs),
        f"only_{base}_exact": sum(a["exact"] and not b["exact"] for a, b in pairs),
        f"only_{other}_exact": sum(b["exact"] and not a["exact"] for a, b in pairs),
        f"{base}_closer": sum(a["similarity"] > b["similarity"] for a, b in pairs),
        f"{other}_closer": sum(b["similarity"] > a["similarity"] for a, b in pairs),
        "similarity_gain": round(statistics.fmean(a["similarity"] - b["similarity"] for a, b in pairs), 4),
    }


# ---------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class EvalSettings:
    mode: str = CompletionRequest.mode  # the frontend's default multi-line policy is "auto" too
    max_new_tokens: int = CompletionRequest.max_new_tokens
    contexts: tuple[str, ...] = STRATEGIES
    kinds: tuple[str, ...] = KINDS
    every: int = 4
    limit: int | None = None
    seed: int = 0


def notebook_paths(paths: Iterable[str | Path]) -> list[Path]:
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(path.glob("*.ipynb")))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no notebook or folder at {path}")
    if not found:
        raise FileNotFoundError("no .ipynb files found in " + ", ".join(map(str, paths)))
    return found


def load_cells(path: Path) -> list[dict[str, Any]]:
    """A notebook's cells, checked as the server checks what a browser sends, so that a notebook it
    would refuse stops the run before the model loads rather than in the middle."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells")
        if not isinstance(cells, list):
            raise ValueError("no list of cells (nbformat 4 is needed)")
        parse_completion({"notebook": {"cells": cells}, "cell": 0, "offset": 0}, Limits())
    except (ValueError, AttributeError, ProtocolError) as exc:  # JSON errors are ValueErrors
        raise ValueError(f"{path}: {exc}") from None
    return cells


def complete(
    engine: Engine, config: ServiceConfig, body: dict[str, Any], settings: EvalSettings
) -> dict[str, Any]:
    """One completion request through the server's path; its first choice and what it cost."""
    message = {**body, "max_new_tokens": settings.max_new_tokens, "temperature": 0.0, "mode": settings.mode}
    request = fit_to_window(parse_completion(message, Limits()), window_tokens(config, engine))
    started = time.monotonic()
    context = request_context(request, engine, config)
    engine.reset()  # a cold prefix cache: the result must not depend on the request before
    stream = TrimmedStream(engine, request, context, threading.Event(), started + config.request_timeout)
    text = "".join(stream)
    return {
        "text": text,
        "prompt_tokens": stream.stats.prompt_tokens,
        "completion_tokens": stream.stats.completion_tokens,
        "cells_in_prefix": context.cells_in_prefix,
        "cells_in_suffix": context.cells_in_suffix,
        "truncated": context.truncated,
        "finish_reason": stream.reason,
        "seconds": round(time.monotonic() - started, 3),
    }


def run_notebook_eval(
    paths: Iterable[str | Path],
    config: ServiceConfig,
    settings: EvalSettings,
    engine: Engine | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score every strategy on every task of the notebooks; returns the summary (rows go to `on_row`)."""
    for chosen, known, what in (
        (settings.contexts, STRATEGIES, "contexts"),
        (settings.kinds, KINDS, "tasks"),
    ):
        if not chosen or not set(chosen) <= set(known):
            raise ValueError(f"{what} must be some of {','.join(known)}, not {','.join(chosen) or 'none'}")
    if settings.mode not in MODES:
        raise ValueError(f"unknown mode {settings.mode!r}; use {', '.join(MODES)}")
    started = time.monotonic()
    notebooks = []
    for path in notebook_paths(paths):
        cells = load_cells(path)
        tasks = notebook_tasks(
            path.stem, cells, settings.kinds, settings.every, settings.seed, settings.limit
        )
        notebooks.append((cells, tasks))
    total = sum(len(tasks) for _, tasks in notebooks) * len(settings.contexts)
    if engine is None:
        engine = load_engine(config)
    rows: list[dict[str, Any]] = []
    for cells, tasks in notebooks:
        for task in tasks:
            for strategy in settings.contexts:
                result = complete(engine, config, strategy_body(cells, task, strategy), settings)
                line = first_line(result["text"])
                row = {
                    "task_id": task.task_id,
                    "kind": task.kind,
                    "strategy": strategy,
                    "truth": task.truth,
                    "completion": line,
                    "exact": line == task.truth,
                    "similarity": round(edit_similarity(line, task.truth), 4),
                    **result,
                }
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                if progress is not None and len(rows) % 50 == 0:
                    elapsed = time.monotonic() - started
                    progress(f"{len(rows)}/{total} requests, {elapsed:.0f} s")
    results = {
        kind: {strategy: summarize([r for r in rows if r["kind"] == kind and r["strategy"] == strategy])
               for strategy in settings.contexts}
        for kind in settings.kinds
    }  # fmt: skip
    comparisons = {
        kind: {
            f"notebook_vs_{other}": paired([r for r in rows if r["kind"] == kind], "notebook", other)
            for other in settings.contexts
            if other != "notebook" and "notebook" in settings.contexts
        }
        for kind in settings.kinds
    }
    describe = engine.describe()
    return {
        "benchmark": "notebook-masked-line",
        "notebooks": len(notebooks),
        "results": results,
        "paired": comparisons,
        "settings": {
            "model": engine.name,
            **describe,
            "window": window_tokens(config, engine),
            "max_new_tokens": settings.max_new_tokens,
            "prefix_share": config.prefix_share,
            "include_outputs": config.include_outputs,
            "mode": settings.mode,
            "temperature": 0.0,
            "contexts": list(settings.contexts),
            "kinds": list(settings.kinds),
            "every": settings.every,
            "limit": settings.limit,
            "seed": settings.seed,
            "min_line_chars": MIN_LINE_CHARS,
            "min_masked_chars": MIN_MASKED_CHARS,
            "prefix_cache": "cleared before each request",
        },
        "seconds": round(time.monotonic() - started, 1),
    }


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parser() -> argparse.ArgumentParser:
    from kernel_model.codellama import QUANT_CHOICES, QUANT_HELP

    defaults, server = EvalSettings(), ServiceConfig()
    p = argparse.ArgumentParser(
        prog="python -m jupyter_codellama.notebook_eval",
        description="Masked-line completions on real notebooks with the whole notebook, the cells above, "
        "or the cell alone as context; prints one JSON object.",
    )
    p.add_argument("notebooks", nargs="+", help="notebook files or folders of them")
    p.add_argument("--model", default=server.model, help="'embedded' or a checkpoint folder")
    p.add_argument("--quant", choices=QUANT_CHOICES, default=server.quant, help=QUANT_HELP)
    p.add_argument("--device", default=server.device)
    p.add_argument("--dtype", default=server.dtype)
    p.add_argument("--contexts", type=_names, default=defaults.contexts, help="of " + ",".join(STRATEGIES))
    p.add_argument("--tasks", type=_names, default=defaults.kinds, help="of " + ",".join(KINDS))
    p.add_argument("--every", type=_positive, default=defaults.every, help="mask every K-th eligible line")
    p.add_argument("--limit", type=_positive, default=None, help="at most N masked lines per notebook")
    p.add_argument(
        "--seed", type=int, default=defaults.seed, help="picks the lines and the rest-task cursors"
    )
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--max-context-tokens", type=int, default=server.max_context_tokens)
    p.add_argument(
        "--request-timeout",
        type=float,
        default=server.request_timeout,
        help="seconds a request may take, as the server's setting (a slow model ends with 'deadline')",
    )
    p.add_argument("--mode", choices=MODES, default=defaults.mode, help="the request's multi-line policy")
    p.add_argument(
        "--include-outputs",
        action=argparse.BooleanOptionalAction,
        default=server.include_outputs,
        help="the server's include_outputs (default: on, as served)",
    )
    p.add_argument("--output", default=None, help="write one JSON line per request here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = ServiceConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        max_context_tokens=args.max_context_tokens,
        request_timeout=args.request_timeout,
        include_outputs=args.include_outputs,
    )
    settings = EvalSettings(args.mode, args.max_new_tokens, args.contexts, args.tasks, args.every, args.limit,
                            args.seed)  # fmt: skip
    out = open(args.output, "w", encoding="utf-8") if args.output else None  # noqa: SIM115 - closed below
    try:
        summary = run_notebook_eval(
            args.notebooks,
            config,
            settings,
            on_row=(lambda row: out.write(json.dumps(row) + "\n")) if out else None,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (ValueError, FileNotFoundError, ModelError, ProtocolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if out:
            out.close()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
