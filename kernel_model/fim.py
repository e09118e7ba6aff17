"""Code Llama's fill-in-the-middle training transform, sequence packing, and the trainer's token file.

Pipeline: corpus documents -> `fim_transform` (per document: 90% FIM, half PSM half SPM, else plain) ->
one flat token stream written by `tokenize_corpus` (FIM precomputed, one draw per document and epoch,
reproducible from the seed) -> `batches`, which cuts the stream into (batch, seq_len + 1) windows.

FIM is precomputed rather than applied in the training loop because tokenization is the slow part on a
CPU box and the trainer should only slice memory; several epochs with fresh FIM draws are written with
`--epochs`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class FimTokenizer(Protocol):
    """What the transform needs; `kernel_model.tokenizer.Tokenizer` provides exactly these names."""

    bos_id: int
    eos_id: int
    prefix_id: int | None
    suffix_id: int | None
    middle_id: int | None
    eot_id: int | None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def encode_infilling(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class FimSample:
    """One transformed document: token ids, the layout (plain, psm or spm) and the split (prefix and
    middle lengths in characters; None for plain). SPM with an empty prefix is ambiguous at the token
    level (a middle starting with a space looks like a prefix with its dummy space), hence `split`."""

    mode: str
    ids: list[int]
    split: tuple[int, int] | None = None


def split_document(doc: str, rng: random.Random) -> tuple[str, str, str]:
    """Prefix, middle, suffix at two character positions drawn uniformly (either may coincide/be an end)."""
    a, b = sorted((rng.randint(0, len(doc)), rng.randint(0, len(doc))))
    return doc[:a], doc[a:b], doc[b:]


def split_at_lines(doc: str, rng: random.Random) -> tuple[str, str, str]:
    """Prefix, middle, suffix at two line starts drawn uniformly (the document's ends count as line starts).

    Character-level splits start a middle at a line start only about once in a line's length, yet
    that is where an editor's cursor sits after Enter (token healing then cuts the indentation the
    editor typed, so the model writes it again) and what HumanEval's single-line infilling masks.
    The GPU-trained embedded model, on character splits alone, picks the first token of a masked
    HumanEval line right 90 % of the time in SPM but 0.3 % in PSM; 2.5 M tokens of continued
    training with half the FIM samples split here raised PSM to 38 % (character splits: 0.6 %).
    """
    starts = [0, *(i + 1 for i, c in enumerate(doc) if c == "\n" and i + 1 < len(doc)), len(doc)]
    a, b = sorted((rng.choice(starts), rng.choice(starts)))
    return doc[:a], doc[a:b], doc[b:]


def window_pieces(doc: str, rng: random.Random, max_chars: int) -> list[str]:
    """`doc` cut at line ends into pieces of at most `max_chars` characters; a document that fits stays whole.

    Each cut is made at the last line end before a limit drawn uniformly from a quarter of
    `max_chars` to all of it, so lengths spread over that range (a piece may come out shorter
    where a long line follows a short one, and the last is whatever remains).

    Code Llama's documents mostly fit its 4,096-token sequences. Ours average ~4,000 tokens against
    a 1,024-token window, so a PSM sample's middle lands in a window holding the end of its suffix
    but not of its prefix, and the model never learns to read the prefix across the suffix. Pieces
    that fit a window, read by windows that start where samples start (`batches`), give a sample
    its whole context, and the spread of lengths teaches both short and window-filling prompts. A
    line longer than the limit is cut at the limit.
    """
    pieces = []
    while len(doc) > max_chars:
        limit = rng.randint(max(1, max_chars // 4), max_chars)
        end = doc.rfind("\n", 0, limit) + 1 or limit  # keep the newline with its line
        pieces.append(doc[:end])
        doc = doc[end:]  # never empty: every cut is within max_chars of a longer text
    return [*pieces, doc]


def psm_ids(prefix: str, middle: str, suffix: str, tok: FimTokenizer) -> list[int]:
    """Meta's PSM: <s> <PRE> prefix <SUF> suffix <MID> middle <EOT>."""
    return [
        tok.bos_id,
        _fim(tok.prefix_id),
        *tok.encode(prefix),
        _fim(tok.suffix_id),
        *tok.encode_infilling(suffix),
        _fim(tok.middle_id),
        *tok.encode_infilling(middle),
        _fim(tok.eot_id),
    ]


def spm_ids(prefix: str, middle: str, suffix: str, tok: FimTokenizer) -> list[int]:
    """Meta's SPM: <s> <PRE> <SUF> suffix <MID> prefix middle <EOT> (prefix keeps its leading space)."""
    return [
        tok.bos_id,
        _fim(tok.prefix_id),
        _fim(tok.suffix_id),
        *tok.encode_infilling(suffix),
        _fim(tok.middle_id),
        *tok.encode(prefix),
        *tok.encode_infilling(middle),
        _fim(tok.eot_id),
    ]


def _fim(token: int | None) -> int:
    if token is None:
        raise ValueError("tokenizer has no FIM pieces (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>)")
    return token


def fim_transform(
    doc: str,
    tok: FimTokenizer,
    rng: random.Random,
    fim_rate: float = 0.9,
    spm_rate: float = 0.5,
    line_rate: float = 0.0,
) -> FimSample:
    """Code Llama's training transform for one document; `line_rate` of FIM samples split at line starts."""
    if rng.random() >= fim_rate:
        return FimSample("plain", tok.encode(doc, bos=True, eos=True))
    # Drawn only when asked, so that line_rate 0 leaves every earlier token file's draws as they were.
    at_lines = line_rate > 0 and rng.random() < line_rate
    prefix, middle, suffix = (split_at_lines if at_lines else split_document)(doc, rng)
    split = (len(prefix), len(middle))
    if rng.random() < spm_rate:
        return FimSample("spm", spm_ids(prefix, middle, suffix, tok), split)
    return FimSample("psm", psm_ids(prefix, middle, suffix, tok), split)


def document_rng(seed: int, epoch: int, index: int) -> random.Random:
    # String seeds go through SHA-512, so the draw for a document depends only on (seed, epoch, index):
    # the same across processes and runs, whatever order documents are processed in.
    return random.Random(f"fim:{seed}:{epoch}:{index}")


def pack_sequences(samples: Iterable[Sequence[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate token lists and cut them into consecutive `seq_len` chunks (the remainder is dropped)."""
    buffer: list[int] = []
    for ids in samples:
        buffer.extend(ids)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            del buffer[:seq_len]


# --------------------------------------------------------------------------------------------- token file


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


_WORKER: dict = {}


def _init_worker(settings: dict) -> None:
    """tok, seed, fim_rate, spm_rate, line_rate, dtype, max_chars: what every document's transform reads."""
    _WORKER.update(settings)


def _transform_batch(batch: list[tuple[int, int, str]]) -> list[tuple[str, int, bytes]]:
    """(epoch, index, document) -> (layout, token count, token bytes); bytes pickle far faster than lists."""
    out = []
    for epoch, index, doc in batch:
        rng = document_rng(_WORKER["seed"], epoch, index)
        pieces = window_pieces(doc, rng, _WORKER["max_chars"]) if _WORKER["max_chars"] else [doc]
        for piece in pieces:
            sample = fim_transform(
                piece, _WORKER["tok"], rng, _WORKER["fim_rate"], _WORKER["spm_rate"], _WORKER["line_rate"]
            )
            ids = np.asarray(sample.ids, dtype=_WORKER["dtype"])
            out.append((sample.mode, len(sample.ids), ids.tobytes()))
    return out


def tokenize_corpus(
    corpus: str | os.PathLike,
    tok: FimTokenizer,
    out: str | os.PathLike,
    *,
    vocab_size: int,
    seed: int = 0,
    fim_rate: float = 0.9,
    spm_rate: float = 0.5,
    line_rate: float = 0.0,
    epochs: int = 1,
    max_chars: int = 0,
    workers: int = 1,
) -> dict:
    """Write `out` (flat little-endian token ids) and `out`.json (metadata) from a corpus directory.

    Each epoch passes over every document once with fresh FIM draws, so `epochs` > 1 gives the trainer
    more than one FIM view of the data without tokenizing during training. `max_chars` > 0 cuts longer
    documents into pieces that fit a training window first (`window_pieces`). `workers` > 1 tokenizes in
    that many processes (`tok` must pickle); the file is byte-identical to a one-process run, since each
    document's draw depends only on (seed, epoch, index) and results are written in corpus order.
    """
    from kernel_model.corpus import bounded_map, iter_documents

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size).newbyteorder("<")
    counts = {"plain": 0, "psm": 0, "spm": 0}
    total = 0
    t0 = time.monotonic()
    settings = dict(
        tok=tok, seed=seed, fim_rate=fim_rate, spm_rate=spm_rate, line_rate=line_rate, dtype=dtype,
        max_chars=max_chars,
    )  # fmt: skip
    items = (
        (epoch, index, doc) for epoch in range(epochs) for index, doc in enumerate(iter_documents(corpus))
    )
    pool = None
    if workers > 1:
        pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(settings,))
        results: Iterable[tuple[str, int, bytes]] = bounded_map(pool, _transform_batch, items, 4 * workers)
    else:
        _init_worker(settings)
        results = (result for item in items for result in _transform_batch([item]))
    try:
        with open(out, "wb") as fh:
            for mode, count, data in results:
                counts[mode] += 1
                total += count
                fh.write(data)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    meta = {
        "dtype": dtype.name,
        "tokens": total,
        "vocab_size": vocab_size,
        "samples": sum(counts.values()),
        "modes": counts,
        "seed": seed,
        "fim_rate": fim_rate,
        "spm_rate": spm_rate,
        "line_rate": line_rate,
        "epochs": epochs,
        "max_chars": max_chars,
        "corpus": str(corpus),
        "seconds": round(time.monotonic() - t0, 1),
    }
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """The token file as a read-only memory map (dtype from its .json sidecar)."""
    meta = json.loads(Path(str(path) + ".json").read_text(encoding="utf-8"))
    return np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")


def batches(
    token_source: str | os.PathLike | np.ndarray | Sequence[int],
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    *,
    epochs: int | None = None,
    start: int = 0,
    sample_start_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """Training batches: int64 tensors of shape (batch_size, seq_len + 1); inputs [:, :-1], targets [:, 1:].

    The stream is cut into non-overlapping windows (neighbours share one token, the next target); each
    epoch visits every window once in an order drawn from (seed, epoch). Runs forever unless `epochs` is
    given; a final partial batch of an epoch is dropped. `start` skips that many batches without reading
    them, so a resumed run continues exactly where it stopped.

    With `sample_start_id` (the <s> every sample begins with), a window starts at every sample instead,
    running on into the samples after it: a sample that fits a window is always seen whole, from
    position 0 as a prompt is, where fixed windows cut half of window-sized pieces apart. Windows
    then overlap, so an epoch reads each token about window / mean sample length times.
    """
    if isinstance(token_source, str | os.PathLike):
        tokens = load_tokens(token_source)
    else:
        tokens = np.asarray(token_source)
    if sample_start_id is None:
        offsets = np.arange((len(tokens) - 1) // seq_len) * seq_len
    else:
        offsets = np.flatnonzero(tokens == sample_start_id)
        offsets = offsets[offsets + seq_len + 1 <= len(tokens)]
    windows = len(offsets)
    if windows < batch_size:
        raise ValueError(f"{len(tokens)} tokens make {windows} windows of {seq_len}, fewer than one batch")
    per_epoch = windows // batch_size
    epoch, skip = divmod(start, per_epoch)
    while epochs is None or epoch < epochs:
        order = np.random.default_rng([seed, epoch]).permutation(windows)
        for first in range(skip * batch_size, per_epoch * batch_size, batch_size):
            rows = [
                tokens[offset : offset + seq_len + 1] for offset in offsets[order[first : first + batch_size]]
            ]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))
        epoch, skip = epoch + 1, 0


def _cmd_tokenize_corpus(args: argparse.Namespace) -> int:
    from kernel_model.tokenizer import Tokenizer

    tok = Tokenizer(args.tokenizer)
    meta = tokenize_corpus(
        args.corpus,
        tok,
        args.out,
        vocab_size=tok.vocab_size,
        seed=args.seed,
        fim_rate=args.fim_rate,
        spm_rate=args.spm_rate,
        line_rate=args.line_rate,
        epochs=args.epochs,
        max_chars=args.max_chars,
        workers=args.workers or os.cpu_count() or 1,
    )
    print(json.dumps(meta))
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `tokenize-corpus` on the engine's top-level subparsers (handler in `func`)."""
    p = subparsers.add_parser("tokenize-corpus", help="FIM-transform and tokenize a corpus for training")
    p.add_argument(
        "corpus",
        type=Path,
        help="corpus directory written by `python -m kernel_model.corpus`, or one of its shards",
    )
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer .model with FIM pieces")
    p.add_argument("--out", type=Path, required=True, help="token file to write (plus OUT.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fim-rate", type=float, default=0.9)
    p.add_argument("--spm-rate", type=float, default=0.5)
    p.add_argument(
        "--line-rate",
        type=float,
        default=0.0,
        help="share of FIM samples split at line starts rather than at any character (0: Code Llama's recipe)",
    )
    p.add_argument("--epochs", type=int, default=1, help="passes, each with fresh FIM draws")
    p.add_argument(
        "--max-chars",
        type=_non_negative,
        default=0,
        help="cut longer documents at line ends into pieces of at most this many characters, so each "
        "FIM sample fits a training window (about 3 x its tokens); 0 keeps documents whole",
    )
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: one per CPU)")
    p.set_defaults(func=_cmd_tokenize_corpus)
