"""Raw model output to the ghost text JupyterLab shows: where to stop, what repeats the suffix, whitespace.

Modes: "line" stops at the end of the cursor's line. "block" stops at the end of the block that
starts at the cursor: at a line indented less than where it started, or, when it started at the top
level, at a new top-level statement after a blank line; a dedented line that only closes brackets
ends the block but belongs to it; after a block header's colon ("def f(x):") the block is the body.
"auto" is "line" when the cursor's line already has text before the cursor, and "block" on an empty
line or right after a block header's colon, where the only useful completion is the indented body.
"none" keeps all the model wrote. Lines inside brackets or strings the completion opened never stop
it.

Line breaks come out as "\n" whatever the model wrote ("\r\n", a lone "\r"): a cell's lines end in
"\n", and a "\r" the editor does not break on would make one line of several, for the eye, for
"accept next line" and for Python.

In "block" mode the ghost text also stays whole: after the first line (which streams as it comes),
a statement is shown only once it is complete (brackets and strings closed, a block header with the
first line of its body), and a completion cut off by the token limit or the deadline (`truncated`)
loses the statement it was in the middle of rather than show half a line. In every mode a statement
that repeats the one before it word for word (a small model's loop: `self.y = y` eight times) ends
the completion.

In every mode, text that only repeats what already follows the cursor is dropped: the completion
stops before a line equal to the first non-blank line of the suffix, and a tail that equals the
start of the suffix (a closing bracket the editor already inserted, the rest of the line) is cut.
It also stops before a `# %%` line: that is how the notebook prompt marks a cell boundary, so the
model writing one has moved on to a cell of its own. Trailing spaces and trailing blank lines go; a
final newline is kept in "block" and "none" mode only when the suffix continues on the cursor's
line, where it moves that text to a line of its own.

`StreamTrimmer` is the same function applied while tokens arrive: what it emits is never taken back,
and what it emits plus `finish()` always equals `trim_completion` of the whole text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Literal, cast

from .context import CELL_MARKER

__all__ = ["Mode", "StreamTrimmer", "normalize_line_breaks", "resolve_mode", "trim_completion", "was_cut_off"]

Mode = Literal["line", "block", "auto", "none"]
MODES: tuple[Mode, ...] = ("line", "block", "auto", "none")

# A line that opens a block and ends with its colon: what follows is the body on the next lines.
_BLOCK_HEADER = re.compile(
    r"[ \t]*(?:async[ \t]+)?(?:def|class|if|elif|else|for|while|with|try|except|finally|match|case)\b"
    r".*:[ \t]*(?:#.*)?$"
)
_FOREIGN_LINE_BREAK = re.compile(r"\r\n?")
_OPENERS = "([{"
_CLOSERS = ")]}"
_QUOTES = "'\""


def normalize_line_breaks(text: str) -> str:
    """Every "\r\n" and lone "\r" as "\n", the only line break a cell has."""
    return _FOREIGN_LINE_BREAK.sub("\n", text)


def resolve_mode(mode: str, prefix: str) -> Mode:
    """The mode to apply: "auto" becomes "line" or "block" by the text before the cursor on its line.

    Raises ValueError for a mode that is not one of MODES.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown completion mode {mode!r}; expected one of {', '.join(MODES)}.")
    if mode != "auto":
        return cast(Mode, mode)
    line = _cursor_line(prefix)
    return "block" if not line.strip() or _BLOCK_HEADER.match(line) else "line"


def was_cut_off(finish_reason: str) -> bool:
    """Whether a generation that ended so was stopped mid-text (token limit, deadline, cancel) rather
    than ended by the model ("end") or at a stop string ("stop"): the engines' finish reasons."""
    return finish_reason not in ("end", "stop")


def trim_completion(text: str, *, mode: str, prefix: str, suffix: str, truncated: bool = False) -> str:
    """The part of a finished completion to show at the cursor between prefix and suffix.

    `truncated`: the model did not end the text itself (it hit the token limit or the deadline).
    """
    resolved = resolve_mode(mode, prefix)
    cutter = _Cutter(resolved, prefix, suffix)
    text = normalize_line_breaks(text)
    cutter.advance(text, final=True, truncated=truncated)
    return _finalize(text[: cutter.cut], resolved, suffix)


class StreamTrimmer:
    """Streaming form: feed deltas as generated, get what is safe to show now.

    `.done` says the stop point was reached and generation can stop.
    """

    def __init__(self, *, mode: str, prefix: str, suffix: str) -> None:
        self._mode = resolve_mode(mode, prefix)
        self._suffix = suffix
        self._cutter = _Cutter(self._mode, prefix, suffix)
        self._text = ""  # what was pushed, its line breaks made "\n"
        self._after_cr = False  # the last delta ended in "\r": a "\n" starting the next one is its pair
        self._sent = 0  # characters of the cleaned text already emitted
        self._finished = False

    def push(self, delta: str) -> str:
        """Text safe to emit now (never later retracted)."""
        if self.done or self._finished:
            return ""  # the stop point is known: nothing after it can change the result
        if not delta:
            return ""
        if self._after_cr and delta.startswith("\n"):
            delta = delta[1:]
        self._after_cr = delta.endswith("\r")
        self._text += normalize_line_breaks(delta)
        self._cutter.advance(self._text, final=False)
        safe = self._cutter.cut if self._cutter.cut is not None else self._cutter.safe
        cleaned = _strip_trailing(self._text[:safe])
        # Whatever could still turn out to be the start of the suffix, repeated, waits.
        hold = _possible_overlap_start(cleaned, self._suffix)
        if hold <= self._sent:
            return ""
        out = cleaned[self._sent : hold]
        self._sent = hold
        return out

    def feed(self, deltas: Iterable[str]) -> Iterator[str]:
        """What to emit as the deltas arrive, until the stop point (the caller then stops generating)."""
        for delta in deltas:
            visible = self.push(delta)
            if visible:
                yield visible
            if self.done:
                return

    @property
    def done(self) -> bool:
        """The mode's stop point was reached: the caller stops generating."""
        return self._cutter.cut is not None

    def finish(self, truncated: bool = False) -> str:
        """Rest to emit at the end; `truncated` as for `trim_completion`."""
        if self._finished:
            return ""
        self._finished = True
        self._cutter.advance(self._text, final=True, truncated=truncated)
        result = _finalize(self._text[: self._cutter.cut], self._mode, self._suffix)
        return result[self._sent :]


def _cursor_line(prefix: str) -> str:
    return prefix[prefix.rfind("\n") + 1 :]


def _indent_width(line: str) -> int:
    stripped = line.lstrip(" \t")
    return len(line[: len(line) - len(stripped)].expandtabs(4))


def _scan(text: str, depth: int, quote: str | None) -> tuple[int, str | None]:
    """Brackets the text opens and leaves open, and the string it leaves open, from a given state.

    Closers with nothing open are ignored: they close brackets of the prefix, which this text did
    not open. A one-quote string ends at the end of its line, as Python ends it with an error.
    """
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 2
                continue
            if text.startswith(quote, i):
                i += len(quote)
                quote = None
                continue
            if ch == "\n" and len(quote) == 1:
                quote = None
            i += 1
            continue
        if ch == "#":
            newline = text.find("\n", i)
            if newline == -1:
                break
            i = newline
            continue
        if ch in _QUOTES:
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            i += len(quote)
            continue
        if ch in _OPENERS:
            depth += 1
        elif ch in _CLOSERS and depth:
            depth -= 1
        i += 1
    return depth, quote


def _repeat_target(blank_head: str | None, suffix: str) -> str | None:
    """The first non-blank line after the cursor, as a whole line, which the completion must not repeat.

    When the cursor's line has text before the cursor, the rest of that line is not a whole line and
    the first candidate is the next line; on a blank line the rest of the line counts, with the
    indentation before the cursor.
    """
    lines = suffix.split("\n")
    if blank_head is None:
        lines = lines[1:]
    else:
        lines[0] = blank_head + lines[0]
    return next((line.rstrip() for line in lines if line.strip()), None)


_KEEP, _WAIT, _CUT_BEFORE, _CUT_AFTER = range(4)


class _Cutter:
    """Finds where a completion stops, reading it line by line as it grows; shared by both forms.

    `cut` is the index to cut the text at once known; until then `safe` is how far the text is
    certainly kept. A line's verdict depends only on the line and the lines before it, so the
    verdict on a growing text never changes.
    """

    def __init__(self, mode: Mode, prefix: str, suffix: str) -> None:
        self._mode = mode
        self._head = _cursor_line(prefix)
        self._head_blank = not self._head.strip()
        self._target = _repeat_target(self._head if self._head_blank else None, suffix)
        self._start: int | None = None if self._head_blank else _indent_width(self._head)
        if _BLOCK_HEADER.match(self._head):
            self._start = _indent_width(self._head) + 1  # the block is the body: deeper than its header
        self._saw_blank = False
        self._depth = 0  # brackets open at the start of the current line
        # The string open at the start of the current line. The cursor may be inside one (a
        # docstring being written): then the completion's lines are its text until it closes.
        self._quote = _open_string(prefix)
        self._in_prefix_string = self._quote is not None
        self._line_start = 0
        self._line_no = 0
        # Block mode shows whole statements after the first line: where the last one ended, and
        # whether a block header read since still waits for the first line of its body.
        self._statement_end = 0
        self._header_pending = False
        # The last one-line statement: the same line again means the model is looping.
        self._last_statement: str | None = None
        self.cut: int | None = None
        self.safe = 0

    def advance(self, text: str, *, final: bool, truncated: bool = False) -> None:
        while self.cut is None:
            newline = text.find("\n", self._line_start)
            line_end = newline if newline != -1 else len(text)
            complete = newline != -1 or final
            line = text[self._line_start : line_end]
            if final and truncated and newline == -1 and self._holds_statements():
                self.cut = self._statement_end  # the statement the limit cut off is not shown
                break
            verdict = self._judge(line, complete)
            if verdict == _CUT_BEFORE:
                # Below a header still waiting for its body, the header goes too.
                self.cut = self._statement_end if self._holds_statements() else self._line_start
            elif verdict == _CUT_AFTER:
                self.cut = self._statement_end if self._header_pending else line_end
            elif verdict == _WAIT:
                self.safe = self._statement_end if self._holds_statements() else self._line_start
                return
            elif not complete:
                self.safe = self._statement_end if self._holds_statements() else len(text)
                return
            elif self._mode == "line" or newline == -1:
                ends_bodiless = self._header_pending and not _is_body(self._full(line))
                self.cut = self._statement_end if self._holds_statements() and ends_bodiless else line_end
            else:
                self._commit(line)
                full = self._full(line)
                string_text = self._in_prefix_string
                self._depth, self._quote = _scan(line + "\n", self._depth, self._quote)
                self._in_prefix_string = self._in_prefix_string and self._quote is not None
                self._line_start = newline + 1
                self._line_no += 1
                if self._mode == "block":
                    self._settle(full, string_text)
        self.safe = self.cut

    def _settle(self, full: str, string_text: bool) -> None:
        """After a line is read: if it completes a statement, the text up to here may be shown.

        `string_text`: the line was text of the string the cursor is in, shown line by line.
        """
        if self._line_no == 1 or string_text:
            self._statement_end = self._line_start  # the first line streamed as it came: it is shown
            return
        if self._depth or self._quote is not None or full.rstrip().endswith("\\"):
            return  # the statement goes on
        # A block header ("if x:") waits for its body: cut off alone, it would not parse. Blank
        # and comment lines are no body.
        if _is_body(full):
            self._header_pending = False
        elif _BLOCK_HEADER.match(full):
            self._header_pending = True
        if not self._header_pending:
            self._statement_end = self._line_start

    def _holds_statements(self) -> bool:
        """Past the first line, block mode keeps back a statement until it is complete."""
        return self._mode == "block" and self._line_no > 0

    def _full(self, line: str) -> str:
        return self._head + line if self._line_no == 0 else line

    def _judge(self, line: str, complete: bool) -> int:
        if self._line_no == 0 and not self._head_blank:
            return _KEEP  # the rest of a line the user started
        if self._depth or (self._quote is not None and not self._in_prefix_string):
            return _KEEP  # inside brackets or a string the completion opened
        full = self._full(line)
        body = full.lstrip(" \t")
        if not body:
            return _KEEP if complete else _WAIT
        if full.startswith(CELL_MARKER):
            return _CUT_BEFORE
        if not complete and CELL_MARKER.startswith(full):
            return _WAIT
        if self._mode == "block" and self._start is not None and not self._in_prefix_string:
            indent = _indent_width(full)
            if indent < self._start:
                if body[0] not in _CLOSERS:
                    return _CUT_BEFORE
                # A dedented line of closing brackets ends the block but belongs to it.
                if not complete:
                    return _WAIT
                return _CUT_BEFORE if full.rstrip() == self._target else _CUT_AFTER
            if self._start == 0 and indent == 0 and self._saw_blank:
                return _CUT_BEFORE
        # Stop before the suffix's next line, and before the statement just written, written again
        # (the model is looping); while a line may still become one of them, it waits.
        repeats = [line for line in (self._target, self._last_statement) if line is not None]
        if complete:
            return _CUT_BEFORE if full.rstrip() in repeats else _KEEP
        could_repeat = any(
            target.startswith(full) or (full.startswith(target) and not full[len(target) :].strip())
            for target in repeats
        )
        return _WAIT if could_repeat else _KEEP

    def _commit(self, line: str) -> None:
        """Carry what a finished line tells about the lines after it (called only on kept lines)."""
        if self._depth or self._quote is not None:
            return
        full = self._full(line)
        if not full.strip():
            self._saw_blank = self._start is not None
            return
        if self._start is None:
            self._start = _indent_width(full)
        self._saw_blank = False
        one_line = _scan(line + "\n", 0, None) == (0, None) and not full.rstrip().endswith("\\")
        self._last_statement = full.rstrip() if one_line else None


def _is_body(line: str) -> bool:
    """Whether a line is code that can be a block's body: not blank, not a comment, not a header."""
    body = line.strip()
    return bool(body) and not body.startswith("#") and not _BLOCK_HEADER.match(line)


def _open_string(prefix: str) -> str | None:
    """The string left open at the end of the prefix, read from the start of the cursor's cell."""
    cell = prefix.rfind("\n" + CELL_MARKER)
    _, quote = _scan(prefix[cell + 1 :], 0, None)
    return quote


def _strip_trailing(text: str) -> str:
    """Text without spaces at line ends and without trailing blank lines.

    For a growing text, the result for a shorter text is always a prefix of the result for a longer.
    """
    return "\n".join(line.rstrip(" \t\r\f\v") for line in text.split("\n")).rstrip()


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _overlap_ok(text: str, k: int, suffix: str) -> bool:
    """Whether the last k characters of text, equal to the suffix's first k, are a repeat of it."""
    before, piece = text[: len(text) - k], suffix[:k]
    if not piece.strip():
        return False
    # "tota" + "l = 1": the overlap must not split a word on either side.
    if before and _is_word(before[-1]) and _is_word(piece[0]):
        return False
    if k < len(suffix) and _is_word(piece[-1]) and _is_word(suffix[k]):
        return False
    if any(ch in _CLOSERS or ch in _QUOTES for ch in piece):
        # "f(a)" before ")": the completion's own ")" closes its own "(", it is not the suffix's.
        depth, quote = _scan(before, 0, None)
        return depth == 0 and quote is None
    return True


def _drop_overlap(text: str, suffix: str) -> str:
    for k in range(min(len(text), len(suffix)), 0, -1):
        if text.endswith(suffix[:k]) and _overlap_ok(text, k, suffix):
            return text[: len(text) - k]
    return text


def _possible_overlap_start(text: str, suffix: str) -> int:
    """The earliest index from which text could still end up as a start of the suffix."""
    if not suffix:
        return len(text)
    i = text.find(suffix[0], max(0, len(text) - len(suffix)))  # a longer tail cannot fit in the suffix
    while i != -1:
        if suffix.startswith(text[i:]):
            return i
        i = text.find(suffix[0], i + 1)
    return len(text)


def _finalize(kept: str, mode: Mode, suffix: str) -> str:
    cleaned = _strip_trailing(kept)
    trimmed = _drop_overlap(cleaned, suffix)
    if trimmed != cleaned or not trimmed.strip() or mode == "line":
        return trimmed
    ended_line = "\n" in kept[len(kept.rstrip()) :]
    rest_of_line = suffix.split("\n", 1)[0]
    # Ghost text ending in a newline pushes the rest of the cursor's line down to a line of its own;
    # where that rest is empty the newline would only show as a stray blank line.
    if ended_line and rest_of_line.strip():
        return trimmed + "\n"
    return trimmed
