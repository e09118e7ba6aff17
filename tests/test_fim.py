"""Tests for kernel_model.fim: PSM/SPM layouts round-trip, FIM rates, seeding, packing, token files."""

from __future__ import annotations

import argparse
import collections
import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_model import fim, vocab
from kernel_model.corpus import ShardWriter, iter_documents
from kernel_model.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DOCS = [
    "def add(a, b):\n    return a + b\n",
    "import numpy as np\n\nx = np.arange(10)\nprint(x.mean())\n",
    "    indented start\n\ttab\n\n\nend  ",
    " leading space",
    "é ☃ 🎉 mixed\n",
    "x",
    "",
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fim-corpus")
    writer = ShardWriter(out, shard_bytes=1 << 30)
    texts = [f.read_text(encoding="utf-8") for f in sorted(STDLIB.glob("*.py"))[:40]]
    for text in texts:
        writer.write(text)
    writer.close()
    (out / "manifest.jsonl").write_text("")
    return out


@pytest.fixture(scope="module")
def trained_tokenizer(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("fim-tok") / "tokenizer.model"
    return Tokenizer(vocab.train_tokenizer(corpus_dir, path, vocab_size=800, num_threads=1))


@pytest.fixture(scope="module", params=["codellama", "trained"])
def tok(request: pytest.FixtureRequest, codellama_tokenizer_file: Path, trained_tokenizer: Tokenizer):
    """Both real shapes of FIM tokenizer: Code Llama's 32016 pieces and our small trained one."""
    if request.param == "codellama":
        return Tokenizer(codellama_tokenizer_file)
    return trained_tokenizer


def unpack(sample: fim.FimSample, tok: Tokenizer) -> tuple[str, str, str]:
    """Invert the layouts: (prefix, middle, suffix) decoded back to text from the ids alone, except for
    SPM's prefix/middle boundary, which comes from `sample.split` (the token stream cannot tell an empty
    prefix from a dummy space)."""
    ids = sample.ids
    assert ids[0] == tok.bos_id
    if sample.mode == "plain":
        assert ids[-1] == tok.eos_id and sample.split is None
        return tok.decode(ids[1:-1]), "", ""
    assert ids[1] == tok.prefix_id and ids[-1] == tok.eot_id
    body = ids[2:-1]
    assert body.count(tok.suffix_id) == 1 and body.count(tok.middle_id) == 1
    suf, mid = body.index(tok.suffix_id), body.index(tok.middle_id)
    if sample.mode == "spm":
        assert suf == 0
        suffix = tok.decode_infilling(body[1:mid])
        rest = body[mid + 1 :]
        assert sample.split is not None
        cut = len(tok.encode(tok.decode(rest)[: sample.split[0]])) if sample.split[0] else 0
        return tok.decode(rest[:cut]), tok.decode_infilling(rest[cut:]), suffix
    assert sample.mode == "psm"
    return (
        tok.decode(body[:suf]),
        tok.decode_infilling(body[mid + 1 :]),
        tok.decode_infilling(body[suf + 1 : mid]),
    )


def test_layouts_match_metas_definition(tok: Tokenizer) -> None:
    prefix, middle, suffix = "def f(x):\n    ", "return x", "\n\nprint(f(1))\n"
    assert fim.psm_ids(prefix, middle, suffix, tok) == [
        tok.bos_id,
        tok.prefix_id,
        *tok.encode(prefix),
        tok.suffix_id,
        *tok.encode_infilling(suffix),
        tok.middle_id,
        *tok.encode_infilling(middle),
        tok.eot_id,
    ]
    assert fim.spm_ids(prefix, middle, suffix, tok) == [
        tok.bos_id,
        tok.prefix_id,
        tok.suffix_id,
        *tok.encode_infilling(suffix),
        tok.middle_id,
        *tok.encode(prefix),
        *tok.encode_infilling(middle),
        tok.eot_id,
    ]


def test_round_trip_every_mode(tok: Tokenizer) -> None:
    seen = set()
    for seed in range(60):
        for doc in DOCS:
            sample = fim.fim_transform(doc, tok, random.Random(seed))
            prefix, middle, suffix = unpack(sample, tok)
            assert prefix + middle + suffix == doc
            if sample.split is not None:
                assert (len(prefix), len(middle)) == sample.split
            seen.add(sample.mode)
    assert seen == {"plain", "psm", "spm"}


# "▁" (U+2581) is how sentencepiece writes a space, so it decodes as one: no Llama tokenizer keeps it.
@settings(max_examples=150, deadline=None, database=None)
@given(
    doc=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<\x00\r\u2581"), max_size=120),
    seed=st.integers(0, 2**32),
)
def test_round_trip_arbitrary_text(codellama_tokenizer_file: Path, doc: str, seed: int) -> None:
    tok = Tokenizer(codellama_tokenizer_file)
    for fim_rate, spm_rate in ((1.0, 0.0), (1.0, 1.0), (0.0, 0.0)):
        sample = fim.fim_transform(doc, tok, random.Random(seed), fim_rate, spm_rate)
        prefix, middle, suffix = unpack(sample, tok)
        assert prefix + middle + suffix == doc


def test_rates_over_many_documents(tok: Tokenizer) -> None:
    counts = {"plain": 0, "psm": 0, "spm": 0}
    n = 3000
    for i in range(n):
        counts[fim.fim_transform("abc def\n" * 3, tok, fim.document_rng(7, 0, i)).mode] += 1
    fim_share = (counts["psm"] + counts["spm"]) / n
    assert 0.88 <= fim_share <= 0.92  # 0.9 +- ~4 sd
    assert 0.46 <= counts["spm"] / (counts["psm"] + counts["spm"]) <= 0.54


def test_split_points_are_uniform_characters() -> None:
    rng = random.Random(3)
    doc = "0123456789" * 10
    starts = [len(fim.split_document(doc, rng)[0]) for _ in range(20000)]
    # The prefix length is the smaller of two uniform draws: P(len <= k) = 1 - (1 - (k+1)/101)^2.
    share = sum(s <= 50 for s in starts) / len(starts)
    assert abs(share - (1 - (50 / 101) ** 2)) < 0.02
    assert min(starts) == 0 and max(starts) >= 95


def test_line_splits_fall_on_line_starts_uniformly() -> None:
    rng = random.Random(4)
    lines = [f"    value_{i} = {i}\n" for i in range(20)]
    doc = "".join(lines)
    starts = [sum(len(line) for line in lines[:k]) for k in range(21)]
    draws = [fim.split_at_lines(doc, rng) for _ in range(20000)]
    assert all("".join(d) == doc and len(d[0]) in starts and len(d[0]) + len(d[1]) in starts for d in draws)
    # As with characters, the prefix ends at the smaller of two uniform draws, here over 21 line starts.
    share = sum(len(d[0]) <= starts[10] for d in draws) / len(draws)
    assert abs(share - (1 - (10 / 21) ** 2)) < 0.02


def test_line_rate_splits_that_share_of_fim_samples_at_line_starts(tok: Tokenizer) -> None:
    doc = "def f(x):\n    return x + 1\n\nprint(f(2))\n"
    starts = {0, 10, 27, 28, len(doc)}
    samples = [fim.fim_transform(doc, tok, fim.document_rng(2, 0, i), line_rate=0.5) for i in range(2000)]
    split = [s.split for s in samples if s.split is not None]
    at_lines = sum(a in starts and a + b in starts for a, b in split) / len(split)
    # Half are line splits, and a character split lands on two line starts by chance ~ (5/43)^2.
    assert 0.45 <= at_lines <= 0.57
    # Without a line rate the draws are exactly Code Llama's, as before the option existed.
    for i in range(50):
        recipe = fim.fim_transform(doc, tok, fim.document_rng(2, 0, i))
        assert fim.fim_transform(doc, tok, fim.document_rng(2, 0, i), line_rate=0) == recipe


def test_reproducible_from_seed(tok: Tokenizer) -> None:
    doc = DOCS[1]

    def draw(seed: int) -> list[list[int]]:
        return [fim.fim_transform(doc, tok, fim.document_rng(seed, 0, i)).ids for i in range(50)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    # Per-document streams do not depend on processing order.
    assert fim.document_rng(1, 0, 5).random() == fim.document_rng(1, 0, 5).random()
    assert fim.document_rng(1, 0, 5).random() != fim.document_rng(1, 1, 5).random()


def test_fim_needs_fim_pieces(llama_tokenizer_file: Path) -> None:
    tok = Tokenizer(llama_tokenizer_file)
    with pytest.raises(ValueError, match="FIM"):
        fim.fim_transform("x = 1\n", tok, random.Random(0), fim_rate=1.0)
    assert fim.fim_transform("x = 1\n", tok, random.Random(0), fim_rate=0.0).mode == "plain"


def test_pack_sequences() -> None:
    samples = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    chunks = list(fim.pack_sequences(samples, 4))
    assert chunks == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert list(fim.pack_sequences([[1, 2]], 4)) == []


@settings(max_examples=300, deadline=None)
@given(doc=st.text(alphabet="ab \n", max_size=400), max_chars=st.integers(1, 60), seed=st.integers(0, 99))
def test_window_pieces_cut_at_line_ends_within_the_limit(doc: str, max_chars: int, seed: int) -> None:
    pieces = fim.window_pieces(doc, random.Random(seed), max_chars)
    assert pieces and "".join(pieces) == doc
    assert pieces == [doc] if len(doc) <= max_chars else all(len(piece) <= max_chars for piece in pieces)
    for piece in pieces[:-1]:
        # A piece ends its last line, unless that line alone is longer than the piece may be.
        assert piece.endswith("\n") or "\n" not in piece


def test_window_pieces_leave_short_documents_whole_and_spread_the_rest() -> None:
    assert fim.window_pieces("x = 1\n", random.Random(0), 100) == ["x = 1\n"]
    assert fim.window_pieces("", random.Random(0), 100) == [""]
    doc = "".join(f"line_{i} = {i}\n" for i in range(3000))  # 45 k characters
    lengths = [len(p) for p in fim.window_pieces(doc, random.Random(1), 3000)[:-1]]
    assert min(lengths) < 1200 and max(lengths) > 2500 and max(lengths) <= 3000


def test_tokenize_corpus_in_window_pieces(
    corpus_dir: Path, trained_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    docs = list(iter_documents(corpus_dir))
    max_chars = max(len(d) for d in docs) // 3
    out = tmp_path / "pieces.bin"
    meta = fim.tokenize_corpus(
        corpus_dir, trained_tokenizer, out, vocab_size=800, seed=3, max_chars=max_chars
    )
    expected = []
    for index, doc in enumerate(docs):
        rng = fim.document_rng(3, 0, index)
        expected += [
            fim.fim_transform(p, trained_tokenizer, rng).ids for p in fim.window_pieces(doc, rng, max_chars)
        ]
    assert meta["samples"] == len(expected) > len(docs) and meta["max_chars"] == max_chars
    assert np.array_equal(fim.load_tokens(out), np.concatenate([np.asarray(x) for x in expected]))


def test_tokenize_corpus_and_batches(corpus_dir: Path, trained_tokenizer: Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "train.bin"
    meta = fim.tokenize_corpus(corpus_dir, trained_tokenizer, out, vocab_size=800, seed=3, epochs=2)
    tokens = fim.load_tokens(out)
    assert meta["dtype"] == "uint16" and len(tokens) == meta["tokens"]
    docs = list(iter_documents(corpus_dir))
    assert meta["samples"] == 2 * len(docs) == sum(meta["modes"].values())
    # The stream is exactly the per-document transforms, concatenated, epoch after epoch.
    expected = [
        fim.fim_transform(d, trained_tokenizer, fim.document_rng(3, e, i)).ids
        for e in range(2)
        for i, d in enumerate(docs)
    ]
    assert np.array_equal(tokens, np.concatenate([np.asarray(x) for x in expected]))
    # Reproducible, and the same bytes however many processes tokenize.
    for workers in (1, 2):
        again = tmp_path / f"again-{workers}.bin"
        fim.tokenize_corpus(
            corpus_dir, trained_tokenizer, again, vocab_size=800, seed=3, epochs=2, workers=workers
        )
        assert again.read_bytes() == out.read_bytes()

    seq_len, batch_size = 64, 8
    windows = (len(tokens) - 1) // seq_len
    epoch = list(fim.batches(out, seq_len, batch_size, seed=5, epochs=1))
    assert len(epoch) == windows // batch_size
    assert all(b.shape == (batch_size, seq_len + 1) and b.dtype == torch.int64 for b in epoch)
    window_counts = collections.Counter(
        np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64).tobytes()
        for i in range(windows)
    )
    row_counts = collections.Counter(row.tobytes() for batch in epoch for row in batch.numpy())
    # Every row is a window of the stream starting on a window boundary, none used twice in an epoch.
    assert not row_counts - window_counts
    assert row_counts.total() == len(epoch) * batch_size
    same = list(fim.batches(out, seq_len, batch_size, seed=5, epochs=1))
    assert all(torch.equal(a, b) for a, b in zip(epoch, same, strict=True))
    two_epochs = list(fim.batches(out, seq_len, batch_size, seed=5, epochs=2))
    resumed = list(fim.batches(out, seq_len, batch_size, seed=5, epochs=2, start=len(epoch) + 3))
    assert all(torch.equal(a, b) for a, b in zip(two_epochs[len(epoch) + 3 :], resumed, strict=True))
    assert not torch.equal(two_epochs[0], two_epochs[len(epoch)])  # a new order each epoch
    other = next(fim.batches(out, seq_len, batch_size, seed=6))
    assert not torch.equal(other, epoch[0])
    with pytest.raises(ValueError):
        next(fim.batches(np.arange(10), 64, 2))


def test_batches_aligned_to_samples_see_each_fitting_sample_whole(
    corpus_dir: Path, trained_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    out = tmp_path / "pieces.bin"
    fim.tokenize_corpus(corpus_dir, trained_tokenizer, out, vocab_size=800, seed=3, epochs=2, max_chars=300)
    tokens = np.asarray(fim.load_tokens(out), dtype=np.int64)
    bos, seq_len, batch_size = trained_tokenizer.bos_id, 128, 4
    starts = [int(i) for i in np.flatnonzero(tokens == bos) if i + seq_len + 1 <= len(tokens)]
    epoch = list(fim.batches(out, seq_len, batch_size, seed=5, epochs=1, sample_start_id=bos))
    assert len(epoch) == len(starts) // batch_size
    rows = [row for batch in epoch for row in batch.numpy()]
    assert all(row[0] == bos for row in rows)
    # Each row is the window from a sample's start (so a sample that fits is seen whole, from
    # position 0), and no start is used twice in an epoch.
    expected = collections.Counter(tokens[i : i + seq_len + 1].tobytes() for i in starts)
    assert not collections.Counter(row.tobytes() for row in rows) - expected
    resumed = fim.batches(out, seq_len, batch_size, seed=5, epochs=1, start=2, sample_start_id=bos)
    assert all(torch.equal(a, b) for a, b in zip(epoch[2:], resumed, strict=True))


def test_cli_registration(corpus_dir: Path, trained_tokenizer: Tokenizer, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    fim.add_cli(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "t.bin"
    args = parser.parse_args(
        ["tokenize-corpus", str(corpus_dir), "--tokenizer", str(trained_tokenizer.path), "--out", str(out)]
    )
    assert args.func(args) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["tokens"] == len(fim.load_tokens(out)) > 0
