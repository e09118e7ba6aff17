"""Tests for kernel_model.vocab: Code Llama's FIM pieces on Llama 2's tokenizer, and our BPE trainer."""

from __future__ import annotations

import argparse
import json
import re
import sysconfig
from pathlib import Path

import pytest
import sentencepiece

from kernel_model import vocab
from kernel_model.corpus import ShardWriter, read_manifest
from kernel_model.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Ordinary Python with the shapes that matter for a code tokenizer: indentation runs, tabs, blank lines,
# comparisons with "<", non-ASCII text.
SNIPPETS = [
    "def f(x):\n    if x < 3:\n        return [i ** 2 for i in range(10)]\n\treturn None  \n\n\n",
    "import numpy as np\nimport pandas as pd\ndf = pd.read_csv('data.csv')\ndf.groupby('a').mean()\n",
    "# café ☃ 🎉 ﬁ\nx = {'a': 1, 'b': [1, 2, 3]}  # trailing\n            deep = 12\n",
    "if a<b and c <d:\n    print(f'{a!r:>10}')\n",
]


def stdlib_sources(limit: int = 40) -> list[str]:
    files = sorted(STDLIB.glob("*.py"))[:limit]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def test_add_fim_pieces_gives_code_llama_layout(llama_tokenizer_file: Path) -> None:
    original = llama_tokenizer_file.read_bytes()
    extended = vocab.add_fim_pieces(original)
    old = sentencepiece.SentencePieceProcessor(model_proto=original)
    new = sentencepiece.SentencePieceProcessor(model_proto=extended)

    assert new.vocab_size() == 32016
    assert [new.piece_to_id(p) for p in vocab.FIM_PIECES] == [32007, 32008, 32009, 32010]
    assert [new.id_to_piece(i) for i in range(32000, 32016)] == list(vocab.CODE_LLAMA_EXTRA_PIECES)
    assert [new.id_to_piece(i) for i in range(32000)] == [old.id_to_piece(i) for i in range(32000)]
    assert (new.bos_id(), new.eos_id(), new.unk_id()) == (1, 2, 0)
    kinds = [kind for _, _, kind in vocab.read_pieces(extended)[32000:]]
    assert kinds == [vocab.NORMAL] * 16
    # The fragments are the merge chains derived from Llama 2's own segmentation: one mechanism for both.
    assert sorted(vocab.merge_fragments(original)) == sorted(vocab.CODE_LLAMA_EXTRA_PIECES[:7])


def test_add_fim_pieces_keeps_ordinary_encodings(llama_tokenizer_file: Path) -> None:
    original = llama_tokenizer_file.read_bytes()
    old = sentencepiece.SentencePieceProcessor(model_proto=original)
    new = sentencepiece.SentencePieceProcessor(model_proto=vocab.add_fim_pieces(original))
    for text in SNIPPETS + stdlib_sources():
        assert new.encode(text) == old.encode(text)
    # The FIM text itself reaches the new pieces through the merge chain, as in Code Llama.
    assert new.encode(" <PRE>")[-1] == 32007
    assert new.encode(" <SUF>")[-1] == 32008


def test_engine_tokenizer_sees_fim_pieces(codellama_tokenizer_file: Path) -> None:
    tok = Tokenizer(codellama_tokenizer_file)
    assert tok.supports_infilling
    assert (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id) == (32007, 32008, 32009, 32010)


def test_add_fim_pieces_rejects_other_vocabularies(tiny_tokenizer: Path) -> None:
    with pytest.raises(ValueError, match="32000"):
        vocab.add_fim_pieces(tiny_tokenizer.read_bytes())


def test_piece_wire_format_round_trips(llama_tokenizer_file: Path) -> None:
    pieces = vocab.read_pieces(llama_tokenizer_file.read_bytes())
    assert len(pieces) == 32000
    assert pieces[0] == ("<unk>", 0.0, vocab.UNKNOWN)
    assert pieces[1][2] == vocab.CONTROL and pieces[3] == ("<0x00>", 0.0, vocab.BYTE)
    extra = [("▁<X>", -5.5, vocab.USER_DEFINED), ("qqzzqq", -1.25, vocab.NORMAL)]
    appended = vocab.append_pieces(llama_tokenizer_file.read_bytes(), extra)
    assert vocab.read_pieces(appended)[-2:] == extra
    with pytest.raises(ValueError, match="already"):
        vocab.append_pieces(llama_tokenizer_file.read_bytes(), [("<s>", 0.0, vocab.NORMAL)])


# --------------------------------------------------------------------------------------------- trained model


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus directory in the corpus module's format, from stdlib sources (no downloads)."""
    out = tmp_path_factory.mktemp("tiny-corpus")
    writer = ShardWriter(out, shard_bytes=1 << 30)
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        for i, text in enumerate(SNIPPETS * 20 + stdlib_sources(60)):
            shard, offset, nbytes = writer.write(text.replace("\x00", ""))
            row = {"file": f"doc{i}.py", "bytes": nbytes, "tokens": 0, "shard": shard, "offset": offset}
            manifest.write(json.dumps(row) + "\n")
    writer.close()
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-tokenizer") / "tokenizer.model"
    return vocab.train_tokenizer(tiny_corpus, out, vocab_size=1000, num_threads=1)


def appended_ids(model_file: Path) -> range:
    """Ids of the FIM pieces and their fragments: the tail of pieces that are parts of a FIM piece."""
    pieces = [p for p, _, _ in vocab.read_pieces(model_file.read_bytes())]
    first = len(pieces)
    # Trained single characters such as "<" end the trained pieces; fragments are longer.
    while len(pieces[first - 1]) > 1 and any(pieces[first - 1] in f for f in vocab.FIM_PIECES):
        first -= 1
    return range(first, len(pieces))


def test_trained_tokenizer_has_llama_ids_and_fim_pieces(tiny_tokenizer: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    assert sp.vocab_size() == 1000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"  # byte fallback, Llama's ids
    assert [sp.piece_to_id(p) for p in vocab.FIM_PIECES] == [996, 997, 998, 999]
    pieces = vocab.read_pieces(tiny_tokenizer.read_bytes())
    appended = appended_ids(tiny_tokenizer)
    assert len(appended) > len(vocab.FIM_PIECES)  # the fragments come first, as in Code Llama
    # NORMAL, scored below every trained piece, as Code Llama's are: reached by merges, last.
    assert all(pieces[i][2] == vocab.NORMAL for i in appended)
    floor = min(score for _, score, _ in pieces[: appended.start])
    assert all(pieces[i][1] < floor for i in appended)
    tok = Tokenizer(tiny_tokenizer)
    assert tok.supports_infilling and (tok.bos_id, tok.eos_id) == (1, 2)


def test_trained_tokenizer_merges_into_fim_pieces(tiny_tokenizer: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    tok = Tokenizer(tiny_tokenizer)
    fim = [tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id]
    assert [sp.encode(piece.removeprefix("▁")) for piece in vocab.FIM_PIECES] == [[i] for i in fim]
    ids = sp.encode("<PRE> x = 1 <SUF>\n <MID>")
    assert [i for i in ids if i in fim] == [tok.prefix_id, tok.suffix_id, tok.middle_id]


def test_trained_tokenizer_encodes_code_as_without_fim_pieces(tiny_tokenizer: Path) -> None:
    model = tiny_tokenizer.read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    # The appended pieces are the lowest-scored merges: dropping them gives the trained vocabulary back.
    base = sentencepiece.SentencePieceProcessor(
        model_proto=vocab._drop_last_merges(model, len(appended_ids(tiny_tokenizer)))
    )
    assert base.vocab_size() == appended_ids(tiny_tokenizer).start
    # A chain's first merge joins "▁<" and the first token of a FIM name, as Code Llama's do; text
    # with " <" right before P, S, M or E may therefore merge into a fragment (Code Llama too). All
    # other text encodes exactly as before.
    checked = 0
    for text in SNIPPETS + stdlib_sources(400):
        if not re.search(r" <[PSME]", text):
            assert sp.encode(text) == base.encode(text)
            checked += 1
    assert checked > 100


def test_trained_tokenizer_learns_indentation_pieces(tiny_tokenizer: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    pieces = {sp.id_to_piece(i) for i in range(sp.vocab_size())}
    assert {"▁▁▁▁", "▁▁▁▁▁▁▁▁"} <= pieces
    assert "▁▁▁▁▁▁▁▁" in sp.encode("def f():\n    if x:\n        return 1\n", out_type=str)


def test_trained_tokenizer_is_lossless(tiny_tokenizer: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    for text in [*SNIPPETS, "  leading spaces", "\n\nx", "tab\tand\u00a0nbsp", "ﬁ"]:
        assert sp.decode(sp.encode(text)) == text  # identity normalisation, byte fallback, spaces kept
    assert sp.encode("ﬁ", out_type=str) != sp.encode("fi", out_type=str)  # no NFKC folding


def test_trained_tokenizer_supports_metas_space_guard(tiny_tokenizer: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    # Meta's encode_infilling drops exactly two ids after encoding "☺" + text.
    assert sp.encode(vocab.SPACE_GUARD, out_type=str) == ["▁", vocab.SPACE_GUARD]
    tok = Tokenizer(tiny_tokenizer)
    for text in ["    return x\n", " x", "x = 1"]:
        assert sp.encode(vocab.SPACE_GUARD + text)[2:] == tok.encode_infilling(text)
        assert tok.decode_infilling(tok.encode_infilling(text)) == text


def test_count_manifest_tokens(tiny_corpus: Path, tiny_tokenizer: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in tiny_corpus.iterdir():
        (corpus / f.name).write_bytes(f.read_bytes())
    total = vocab.count_manifest_tokens(corpus, tiny_tokenizer)
    rows = read_manifest(corpus)
    assert total == sum(r["tokens"] for r in rows) > 0
    assert not any(r["tokens_estimated"] for r in rows)


def test_cli_registration(tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    vocab.add_cli(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "t.model"
    args = parser.parse_args(["train-tokenizer", str(tiny_corpus), "--out", str(out), "--vocab-size", "600"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["vocab_size"] == 600
    assert sentencepiece.SentencePieceProcessor(model_file=str(out)).vocab_size() == 600
