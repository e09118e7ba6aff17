"""Token counts for Code Llama's tokenizer where it is not at hand (a remote model, the kernel's magic)."""

from __future__ import annotations

import math
import re

# Code Llama's pieces cover about four letters of a word, and one digit, punctuation mark or line
# break each; other scripts fall back to bytes at worst. A fixed characters-per-token figure cannot
# serve both code (3.2) and printed numbers (1.4) without overflowing the window on the second.
_WORDS = re.compile(r"[A-Za-z_]+")
_SINGLES = re.compile(r"[0-9!-/:-@\[-^`{-~\n]| (?=[0-9])")  # a space before a digit is a piece too
_SPACE_RUNS = re.compile(r"[ \t]{2,}")
ESTIMATE_MARGIN = 1.1  # measured: 1.1 to 2x the real count on code, numbers, tables, CJK and emoji


def estimate_tokens(text: str) -> int:
    """An upper estimate of the Code Llama tokenizer's count for `text`."""
    ascii_chars = len(text) if text.isascii() else sum(1 for c in text if c < "\x80")
    words = sum((len(word) + 3) // 4 for word in _WORDS.findall(text))
    singles = len(_SINGLES.findall(text))
    spaces = sum((len(run) + 7) // 8 for run in _SPACE_RUNS.findall(text))
    wide = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    return math.ceil(ESTIMATE_MARGIN * (words + singles + spaces + wide))
