"""Tokenizer training for the embedded model, and Code Llama's FIM pieces added to a Llama tokenizer.

Both add the FIM pieces the way Code Llama has them: NORMAL pieces scored below every other piece,
with the partial pieces ("fragments") through which BPE merges reach each one from the ordinary
segmentation of its text. sentencepiece and llama.cpp then both turn the text " <PRE>" into the FIM id,
and text that never puts those ordinary tokens side by side encodes exactly as without them.

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
    for number, wire, value, _ in _field_spans(data):
        yield number, wire, value


def _field_spans(data: bytes) -> Iterator[tuple[int, int, object, bytes]]:
    """(number, wire type, value, the field's raw bytes) for each top-level field of a message."""
    pos = 0
    while pos < len(data):
        start = pos
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
        yield number, wire, value, data[start:pos]


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


def merge_fragments(model_bytes: bytes, targets: Iterable[str] = FIM_PIECES) -> list[str]:
    """The pieces BPE needs to merge its way from the ordinary tokens of each target to the target.

    Each target's text is segmented with the vocabulary as it is; the chain then grows from the token
    holding "<" rightwards, then leftwards, one token per merge. A chain has a single merge of two
    ordinary tokens (its first), so only text with that pair side by side is affected. Growing from
    "<" keeps the name in that pair: for Llama 2 ("▁<" + "SU" + "F" + ">") this gives Code Llama's
    "▁<SU", "▁<SUF" exactly, and a vocabulary without "▁<" gets "<SU"…, never a bare "▁<".
    """
    sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    existing = {p for p, _, _ in read_pieces(model_bytes)}
    fragments: list[str] = []
    for target in targets:
        if target in existing:
            raise ValueError(f"piece {target!r} is already in the vocabulary")
        # The dummy prefix supplies the leading "▁" (a literal "▁" would be kept as a second one).
        tokens = sp.encode(target.removeprefix("▁"), out_type=str)
        if "".join(tokens) != target:
            raise ValueError(f"{target!r} segments as {tokens}: not reachable by merges")
        lo = hi = next(i for i, t in enumerate(tokens) if "<" in t)
        while (lo, hi) != (0, len(tokens) - 1):
            hi, lo = (hi + 1, lo) if hi < len(tokens) - 1 else (hi, lo - 1)
            piece = "".join(tokens[lo : hi + 1])
            if piece != target and piece not in existing and piece not in fragments:
                fragments.append(piece)
    return fragments


def append_below(model_bytes: bytes, pieces: Iterable[str]) -> bytes:
    """Append NORMAL `pieces`, each scored below every piece before it.

    sentencepiece and llama.cpp both merge the adjacent pair whose union scores highest, so every
    ordinary merge happens first and the appended pieces only ever join what is left.
    """
    floor = min(score for _, score, _ in read_pieces(model_bytes))
    # float32 steps near -1e9 (Llama's "▁▁") are 64 apart; 1000 keeps each new score distinct and lower.
    return append_pieces(model_bytes, [(p, floor - 1000.0 * (i + 1), NORMAL) for i, p in enumerate(pieces)])


def add_fim_pieces(model_bytes: bytes) -> bytes:
    """Turn Llama 2's 32,000-piece tokenizer into Code Llama's 32,016-piece one (FIM ids 32007-32010).

    Meta's layout is kept piece for piece; its fragments are the ones `merge_fragments` derives from
    Llama 2's vocabulary (the tests check that), so " <PRE>" encodes to 32007 as in Code Llama.
    """
    existing = read_pieces(model_bytes)
    if len(existing) != 32000:
        raise ValueError(f"expected Llama's 32000 pieces, got {len(existing)}")
    return append_below(model_bytes, CODE_LLAMA_EXTRA_PIECES)


def _drop_last_merges(model_bytes: bytes, count: int) -> bytes:
    """The model without its `count` last-learned merges, as if BPE training had stopped that much sooner.

    sentencepiece's BPE trainer scores merges by learning order; a merge only joins earlier pieces, so
    the last ones are no part of any other piece's path. Single characters (scored after the merges)
    and non-NORMAL pieces stay.
    """
    if count <= 0:
        return model_bytes
    pieces = read_pieces(model_bytes)
    merges = sorted((i for i, (p, _, k) in enumerate(pieces) if k == NORMAL and len(p) > 1),
                    key=lambda i: pieces[i][1])  # fmt: skip
    drop = set(merges[:count])
    out, index = bytearray(), 0
    for number, wire, _, raw in _field_spans(model_bytes):
        if number == 1 and wire == 2:
            index += 1
            if index - 1 in drop:
                continue
        out += raw
    return bytes(out)


def with_fim_pieces(model_bytes: bytes) -> bytes:
    """A trained model with the FIM pieces and their fragments in place of its last merges.

    The vocabulary grows by the four FIM pieces only, as before. How many fragments are needed
    depends on the segmentation, which depends on the merges kept, so drop merges until the two agree.
    """
    dropped = 0
    for _ in range(16):
        base = _drop_last_merges(model_bytes, dropped)
        fragments = merge_fragments(base)
        if len(fragments) == dropped:
            return append_below(base, [*fragments, *FIM_PIECES])
        dropped = len(fragments)
    raise ValueError("the number of FIM fragments did not settle")


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
        # The four FIM pieces (and their fragments, in place of the last merges) are appended afterwards.
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
    model = with_fim_pieces(_train(_sentences(Path(corpus), options["max_sentence_length"]), options))
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
