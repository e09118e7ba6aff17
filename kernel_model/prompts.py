"""Prompt layouts (completion, PSM and SPM infilling) and token healing at the cursor, as pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InfillingNotSupported
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    heal: str = ""  # text cut from the prompt's tail: the generation must start with it, and it is not output
    stop_ids: frozenset[int] = frozenset()


def completion_prompt(tokenizer: Tokenizer, text: str, heal: bool = True) -> Prompt:
    """<s> text — a left-to-right continuation."""
    ids = tokenizer.encode(text, bos=True)
    stop = frozenset(i for i in (tokenizer.eos_id, tokenizer.eot_id) if i is not None)
    if heal:
        ids, cut = heal_tail(tokenizer, ids, segment_start=1)
        return Prompt(ids, cut, stop)
    return Prompt(ids, "", stop)


def infilling_prompt(
    tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False, heal: bool = True
) -> Prompt:
    """Meta's layouts; the middle is generated after the last id and ends at ▁<EOT>.

    PSM: <s> ▁<PRE> encode(prefix) ▁<SUF> encode_infilling(suffix) ▁<MID>
    SPM: <s> ▁<PRE> ▁<SUF> encode_infilling(suffix) ▁<MID> encode(prefix)
    """
    if not tokenizer.supports_infilling:
        raise InfillingNotSupported(
            "this model's tokenizer has no fill-in-the-middle pieces (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>): "
            "Code Llama - Python and 34B can only complete left to right"
        )
    pre, suf, mid = tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id
    prefix_ids = tokenizer.encode(prefix)
    suffix_ids = tokenizer.encode_infilling(suffix)
    cut = ""
    if heal:
        prefix_ids, cut = heal_tail(tokenizer, prefix_ids, segment_start=0)
    if suffix_first:
        ids = [tokenizer.bos_id, pre, suf, *suffix_ids, mid, *prefix_ids]
    else:
        ids = [tokenizer.bos_id, pre, *prefix_ids, suf, *suffix_ids, mid]
    stop = frozenset(i for i in (tokenizer.eot_id, tokenizer.eos_id) if i is not None)
    return Prompt(ids, cut, stop)


def heal_tail(tokenizer: Tokenizer, ids: list[int], segment_start: int) -> tuple[list[int], str]:
    """Back the prompt up to a token boundary the model knows, returning the cut text.

    A prompt ending in "    " ends with `▁▁▁▁`, while code always has `▁▁▁` + `▁return` there:
    cutting the last piece and forcing the generation to re-type its text lets the model choose
    the natural split. The first kept piece carries sentencepiece's dummy space, so it stays.
    """
    if len(ids) - 1 <= segment_start or tokenizer.is_special(ids[-1]):
        return ids, ""
    text = tokenizer.piece_texts[ids[-1]]
    if text is None:
        # Part of a multi-byte character: no piece restarts from there, so leave the prompt alone.
        return ids, ""
    from .generate import healing_index  # generate builds on prompts: imported when first needed

    if healing_index(tokenizer).candidates(text) == [ids[-1]]:
        # Only the cut piece can type it again (a line break, a byte piece): healing would change
        # nothing but the layout, and in PSM move the piece after ▁<MID>, where training never had it.
        return ids, ""
    return ids[:-1], text


def healing_candidates(tokenizer: Tokenizer, remaining: str) -> list[int]:
    """Ids whose text agrees with the still-unmatched healed text: it is their start, or they are its."""
    return [
        index
        for index, text in enumerate(tokenizer.piece_texts)
        if text and (text.startswith(remaining) or remaining.startswith(text))
    ]
