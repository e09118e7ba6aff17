"""The tokenizer against plain sentencepiece and Meta's published infilling algorithm."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import sentencepiece

from kernel_model import InfillingNotSupported, ModelError, Tokenizer
from kernel_model.prompts import completion_prompt, heal_tail, infilling_prompt

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = [STDLIB / name for name in ("json/decoder.py", "textwrap.py", "dataclasses.py", "functools.py")]


def meta_encode_infilling(sp, text: str) -> list[int]:
    return sp.encode("☺" + text)[2:]


def test_ids_and_round_trips_equal_sentencepiece(llama_tokenizer_file):
    ours = Tokenizer(llama_tokenizer_file)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_tokenizer_file))
    for source in SOURCES:
        text = source.read_text()
        assert ours.encode(text) == sp.encode(text)
        assert ours.decode(ours.encode(text)) == text
        assert ours.encode_infilling(text) == meta_encode_infilling(sp, text)
        assert ours.decode_infilling(ours.encode_infilling("    " + text)) == "    " + text


def test_python_tokenizer_cannot_infill(llama_tokenizer_file):
    tokenizer = Tokenizer(llama_tokenizer_file)
    assert tokenizer.vocab_size == 32000 and not tokenizer.supports_infilling
    with pytest.raises(InfillingNotSupported, match="fill-in-the-middle"):
        infilling_prompt(tokenizer, "a = ", "\n")


@pytest.mark.parametrize("suffix_first", [False, True], ids=["psm", "spm"])
def test_infilling_prompts_follow_meta(codellama_tokenizer_file, suffix_first):
    tokenizer = Tokenizer(codellama_tokenizer_file)
    assert (tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id, tokenizer.eot_id) == (
        32007, 32008, 32009, 32010,
    )  # fmt: skip
    sp = sentencepiece.SentencePieceProcessor(model_file=str(codellama_tokenizer_file))
    for source in SOURCES:
        text = source.read_text()[:3000]
        cut = len(text) // 2
        prefix, suffix = text[:cut], text[cut:]
        if suffix_first:
            expected = [1, 32007, 32008, *meta_encode_infilling(sp, suffix), 32009, *sp.encode(prefix)]
        else:
            expected = [1, 32007, *sp.encode(prefix), 32008, *meta_encode_infilling(sp, suffix), 32009]
        prompt = infilling_prompt(tokenizer, prefix, suffix, suffix_first, heal=False)
        assert prompt.ids == expected
        assert [sp.id_to_piece(i) for i in prompt.ids] == [sp.id_to_piece(i) for i in expected]


def test_healing_backs_up_indentation_to_a_token_boundary(codellama_tokenizer_file):
    tokenizer = Tokenizer(codellama_tokenizer_file)
    ids = tokenizer.encode("def f(x):\n    ")
    assert tokenizer.sp.id_to_piece(ids[-1]) == "▁▁▁▁"  # not how code tokenizes: ▁▁▁ + ▁return
    kept, cut = heal_tail(tokenizer, ids, segment_start=0)
    assert kept == ids[:-1] and cut == "    "
    prompt = infilling_prompt(tokenizer, "def f(x):\n    ", "\n", suffix_first=True)
    assert prompt.ids[-1] == tokenizer.encode("def f(x):\n")[-1] and prompt.heal == "    "
    assert completion_prompt(tokenizer, "x").heal == ""  # the dummy-space piece is never cut


@pytest.mark.parametrize("suffix_first", [False, True])
def test_a_piece_only_itself_can_retype_is_not_healed(codellama_tokenizer_file, suffix_first):
    """A prefix ending in a line break (every HumanEval line task): healing would force the same
    piece back, and in PSM put it after ▁<MID>, a layout training never shows the model."""
    tokenizer = Tokenizer(codellama_tokenizer_file)
    prefix, suffix = "def f(x):\n    y = x + 1\n", "\n    return y\n"
    healed = infilling_prompt(tokenizer, prefix, suffix, suffix_first)
    assert (
        healed.heal == ""
        and healed.ids == infilling_prompt(tokenizer, prefix, suffix, suffix_first, heal=False).ids
    )


def test_bad_tokenizer_files_raise_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a sentencepiece model"):
        Tokenizer(junk)
