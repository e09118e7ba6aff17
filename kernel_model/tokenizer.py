"""Code Llama's sentencepiece tokenizer: special ids, FIM pieces, encoding without the implicit space.

The FIM pieces are found by name, so a 32,000-piece tokenizer (Code Llama - Python, 34B) simply
reports `supports_infilling = False`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import sentencepiece

from .errors import ModelError

FIM_PIECES = {"prefix_id": "▁<PRE>", "suffix_id": "▁<SUF>", "middle_id": "▁<MID>", "eot_id": "▁<EOT>"}

# A character that is one piece of its own in Llama-style vocabularies, or falls back to bytes;
# either way it starts the text so that sentencepiece's dummy space attaches to it, not to `text`.
_SPACE_GUARD = "☺"


class Tokenizer:
    def __init__(self, model_file: str | Path) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise ModelError(f"tokenizer file not found: {path}")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise ModelError(f"{path} is not a sentencepiece model ({exc})") from exc
        self.path = path
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        ids = {name: self._piece_id(piece) for name, piece in FIM_PIECES.items()}
        self.prefix_id: int | None = ids["prefix_id"]
        self.suffix_id: int | None = ids["suffix_id"]
        self.middle_id: int | None = ids["middle_id"]
        self.eot_id: int | None = ids["eot_id"]
        self._guard_ids = self.sp.encode(_SPACE_GUARD)

    def _piece_id(self, piece: str) -> int | None:
        index = self.sp.piece_to_id(piece)
        return None if index == self.sp.unk_id() and piece != self.sp.id_to_piece(index) else index

    @property
    def supports_infilling(self) -> bool:
        return None not in (self.prefix_id, self.suffix_id, self.middle_id, self.eot_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def encode_infilling(self, text: str) -> list[int]:
        """Encode without the implicit leading space (Meta's trick: encode "☺"+text, drop its ids)."""
        return self.sp.encode(_SPACE_GUARD + text)[len(self._guard_ids) :]

    def decode_infilling(self, ids: list[int]) -> str:
        """Decode a continuation: a leading "▁" is a real space here, not the dummy prefix."""
        return self.sp.decode(self._guard_ids + list(ids))[len(_SPACE_GUARD) :]

    def count(self, text: str) -> int:
        return len(self.sp.encode(text))

    def is_special(self, token: int) -> bool:
        return self.sp.is_control(token) or token in (
            self.prefix_id,
            self.suffix_id,
            self.middle_id,
            self.eot_id,
        )

    @cached_property
    def piece_texts(self) -> list[str | None]:
        """The text each id stands for inside a continuation, or None where it is not plain text.

        Byte-fallback pieces above 0x7F are None: they are parts of a character, not text.
        """
        texts: list[str | None] = []
        for index in range(self.vocab_size):
            piece = self.sp.id_to_piece(index)
            if self.is_special(index) or self.sp.is_unknown(index):
                texts.append(None)
            elif self.sp.is_byte(index):
                value = int(piece[3:5], 16)
                texts.append(chr(value) if value < 0x80 else None)
            else:
                texts.append(piece.replace("▁", " "))
        return texts
