"""Tokenizer training for the embedded model, and Code Llama's FIM pieces added to a Llama tokenizer.

Both edit sentencepiece's ModelProto at the protobuf wire level with the standard library only:
`sentencepiece_model_pb2` would need the `protobuf` package, which the engine does not otherwise use.
Repeated fields may be split across a message (parsers append in order of appearance), so appending
encoded `pieces` entries to a serialized model appends pieces to its vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece

FIM_PIECES: tuple[str, ...] = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")

# The 16 pieces Code Llama (7B/13B/70B infilling models) appends to Llama 2's 32,000: first the partial
# merges through which BPE reaches each FIM piece from "▁<" ("▁<" + "SU" -> "▁<SU" -> "▁<SUF" -> "▁<SUF>"),
# then the FIM pieces at 32007-32010, then runs of EOT.
CODE_LLAMA_EXTRA_PIECES: tuple[str, ...] = (
    "▁<SU",
    "▁<SUF",
    "▁<PRE",
    "▁<M",
    "▁<MID",
    "▁<E",
    "▁<EOT",
    "▁<PRE>",
    "▁<SUF>",
    "▁<MID>",
    "▁<EOT>",
    "▁<EOT><EOT>",
    "▁<EOT><EOT><EOT>",
    "▁<EOT><EOT><EOT><EOT>",
    "▁<EOT><EOT><EOT><EOT><EOT>",
    "▁<EOT><EOT><EOT><EOT><EOT><EOT>",
)

# sentencepiece_model.proto: ModelProto.pieces = 1; SentencePiece.piece = 1, score = 2, type = 3.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Meta's trick for encoding without the dummy-prefix space encodes "☺" + text and drops the ids of "☺";
# keeping "☺" one piece (as in Llama's vocabulary) keeps that to exactly two ids, "▁" and "☺".
SPACE_GUARD = "☺"


# --------------------------------------------------------------------------------------------- protobuf wire


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def encode_piece(piece: str, score: float, kind: int = NORMAL) -> bytes:
    """One serialized `ModelProto.pieces` entry (field 1, length-delimited)."""
    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", score)
    if kind != NORMAL:  # NORMAL is the proto default and is omitted on the wire, as protobuf does
        body += b"\x18" + _varint(kind)
    return b"\x0a" + _varint(len(body)) + body


def _fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_pieces(model_bytes: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) for every vocabulary entry of a serialized sentencepiece model."""
    pieces = []
    for number, wire, value in _fields(model_bytes):
        if number != 1 or wire != 2:
            continue
        piece, score, kind = "", 0.0, NORMAL
        assert isinstance(value, bytes)
        for n, _, v in _fields(value):
            if n == 1:
                piece = bytes(v).decode("utf-8")  # type: ignore[arg-type]
            elif n == 2:
                score = struct.unpack("<f", v)[0]  # type: ignore[arg-type]
            elif n == 3:
                kind = int(v)  # type: ignore[arg-type]
        pieces.append((piece, score, kind))
    return pieces


def append_pieces(model_bytes: bytes, pieces: Iterable[tuple[str, float, int]]) -> bytes:
    """A serialized model with `pieces` appended after the existing vocabulary (ids continue from it)."""
    existing = {p for p, _, _ in read_pieces(model_bytes)}
    extra = []
    for piece, score, kind in pieces:
        if piece in existing:
            raise ValueError(f"piece {piece!r} is already in the vocabulary")
        existing.add(piece)
        extra.append(encode_piece(piece, score, kind))
    return model_bytes + b"".join(extra)


def add_fim_pieces(model_bytes: bytes) -> bytes:
    """Turn Llama 2's 32,000-piece tokenizer into Code Llama's 32,016-piece one (FIM ids 32007-32010).

    The new pieces are NORMAL, scored below every existing piece: BPE only merges into them after all
    ordinary merges, and only along the "▁<" + "PRE"... chain, so any text without " <PRE"/" <SU"/" <M"/
    " <E" encodes exactly as before, while " <PRE>" still encodes to the FIM id as in Code Llama.
    """
    existing = read_pieces(model_bytes)
    if len(existing) != 32000:
        raise ValueError(f"expected Llama's 32000 pieces, got {len(existing)}")
    floor = min(score for _, score, _ in existing)
    # float32 steps near -1e9 are 64 apart; 1000 keeps each new score distinct and strictly lower.
    extra = [(piece, floor - 1000.0 * (i + 1), NORMAL) for i, piece in enumerate(CODE_LLAMA_EXTRA_PIECES)]
    return append_pieces(model_bytes, extra)


# --------------------------------------------------------------------------------------------- training


def _sentences(corpus: Path, max_line_bytes: int) -> Iterator[str]:
    """Training sentences: the corpus's lines, since sentencepiece never learns pieces across a newline."""
    from kernel_model.corpus import iter_documents

    for doc in iter_documents(corpus):
        for line in doc.split("\n"):
            if line.strip() and len(line.encode("utf-8")) <= max_line_bytes:
                yield line


def trainer_options(vocab_size: int, **overrides) -> dict:
    """sentencepiece options: Llama's (BPE, byte fallback, identity, dummy prefix, ids 0/1/2/-1), for code."""
    options = {
        "model_type": "bpe",
        # The four FIM pieces are appended afterwards (ids vocab_size-4 .. vocab_size-1, as in Code Llama).
        "vocab_size": vocab_size - len(FIM_PIECES),
        "byte_fallback": True,
        "character_coverage": 0.9999,
        "required_chars": SPACE_GUARD,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": True,
        "allow_whitespace_only_pieces": True,  # indentation runs (4, 8, 12 spaces) become single pieces
        "split_by_whitespace": True,
        "split_by_unicode_script": True,
        "split_by_number": True,
        "split_digits": True,
        "max_sentencepiece_length": 16,
        "max_sentence_length": 8192,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": -1,
        "unk_surface": " \u2047 ",
        "input_sentence_size": 4_000_000,
        "shuffle_input_sentence": True,
        "num_threads": os.cpu_count() or 1,
        "minloglevel": 2,
    }
    options.update(overrides)
    return options


def train_tokenizer(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    vocab_size: int = 8000,
    **overrides,
) -> Path:
    """Train a Code Llama-style BPE tokenizer on a corpus directory and write it to `out` (a .model file)."""
    out = Path(out)
    options = trainer_options(vocab_size, **overrides)
    model = _train(_sentences(Path(corpus), options["max_sentence_length"]), options)
    # USER_DEFINED so sentencepiece never splits them; scored 0 like other user-defined pieces.
    model = append_pieces(model, [(piece, 0.0, USER_DEFINED) for piece in FIM_PIECES])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model)
    return out


def _train(sentences: Iterator[str], options: dict) -> bytes:
    with tempfile.TemporaryDirectory(prefix="kernel_model_vocab_") as tmp:
        prefix = str(Path(tmp) / "sp")
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=sentences, model_prefix=prefix, **options)
        return Path(prefix + ".model").read_bytes()


def count_manifest_tokens(corpus: str | os.PathLike, model_file: str | os.PathLike) -> int:
    """Replace the corpus manifest's estimated token counts with exact ones; returns the total."""
    from kernel_model.corpus import iter_documents, read_manifest

    corpus = Path(corpus)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    rows = read_manifest(corpus)
    total = 0
    docs = iter_documents(corpus)
    for row, doc in zip(rows, docs, strict=True):
        row["tokens"] = len(sp.encode(doc))
        row["tokens_estimated"] = False
        total += row["tokens"]
    tmp = corpus / "manifest.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    tmp.replace(corpus / "manifest.jsonl")
    return total


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    overrides = {}
    if args.input_sentence_size is not None:
        overrides["input_sentence_size"] = args.input_sentence_size
    path = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, **overrides)
    result: dict = {"tokenizer": str(path), "vocab_size": args.vocab_size}
    if args.count_manifest:
        result["corpus_tokens"] = count_manifest_tokens(args.corpus, path)
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `train-tokenizer` on the engine's top-level subparsers (handler in `func`)."""
    p = subparsers.add_parser("train-tokenizer", help="train the embedded model's BPE tokenizer on a corpus")
    p.add_argument("corpus", type=Path, help="corpus directory written by `python -m kernel_model.corpus`")
    p.add_argument("--out", type=Path, required=True, help="tokenizer .model file to write")
    p.add_argument("--vocab-size", type=int, default=8000, help="total pieces, FIM pieces included")
    p.add_argument("--input-sentence-size", type=int, default=None, help="lines sampled for training")
    p.add_argument("--count-manifest", action="store_true", help="write exact token counts to the manifest")
    p.set_defaults(func=_cmd_train_tokenizer)
