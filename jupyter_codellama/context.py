"""Notebook to fill-in-the-middle prompt: the prefix and suffix around the cursor, within a token budget.

The notebook is written out in the "percent" format that jupytext and VS Code use for Python files, a
shape Code Llama has read plenty of:

    # %%                       a code cell; IPython magics and shell lines become comments
    import numpy as np
    # Out: array([1, 2, 3])    its outputs, when asked for, shortened
                               a blank line between cells
    # %% [markdown]            markdown (and raw) cells, every line commented
    # # A title

The active cell is written verbatim, magics included, so that the prefix ends exactly at the cursor
and the suffix starts exactly after it. Under budget pressure the active cell is kept first, then the
cells nearest to it (the prefix side gets `prefix_share` of the budget; what one side leaves unused
goes to the other), cutting only at line or cell boundaries. Imports, definitions and short
assignments that the code near the cursor uses, but that fall outside what is kept, are gathered at
the top of the prefix so the model still sees them.
"""

from __future__ import annotations

import ast
import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Cell", "FimContext", "build_context", "cells_from_json", "plain_context"]

CELL_TYPES = ("code", "markdown", "raw")
CELL_MARKER = "# %%"

# Outputs are evidence of what the data looks like, not something to reproduce: a few short lines
# per output is enough, and a long stream (training logs, tracebacks) would eat the budget.
OUTPUT_MAX_CHARS = 2000  # per output, when read from the notebook JSON
OUTPUTS_PER_CELL = 5
OUTPUT_MAX_LINES = 6  # per output, when written into the prompt
OUTPUT_LINE_CHARS = 100

# The sum of piece counts only approximates the count of the joined prompt (a sentencepiece
# encode merges differently across a boundary), so a little of the budget is held back.
SAFETY_FRACTION = 0.02
SAFETY_TOKENS = 2

# Gathered imports and definitions may take at most this share of the budget up front; the rest
# stays for the code around the cursor.
HEADER_SHARE = 0.25
# A longer assignment (a literal table, a long call) costs more than it tells the model.
ASSIGN_MAX_LINES = 3
# The depth given to imports that only the neighbouring cells use: after everything the cursor uses.
AROUND_DEPTH = 1000
# Llama's longest pieces are 16 characters, so text further than 16 characters per budget token from
# the cursor can never be kept. It is dropped before anything is tokenized: a multi-megabyte line or
# cell then costs one window's worth of tokenizing, not seconds of the model's thread.
MAX_CHARS_PER_TOKEN = 16
# Definitions are gathered from cells up to this size (about 2,500 lines); bigger ones cost more to
# parse than their definitions are worth. Cells up to the second size are remembered between requests.
UNITS_MAX_CHARS = 100_000
UNITS_CACHE_MAX_CHARS = 10_000

# Cell magics whose body is still Python; any other cell magic (%%bash, %%html, %%sql, ...) holds
# another language, which is commented out whole.
PYTHON_CELL_MAGICS = frozenset({"time", "timeit", "capture", "prun", "debug", "python", "python3"})

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_LINE_MAGIC = re.compile(r"^([ \t]*)([%!].*)$")  # %magic, !shell
_HELP_LINE = re.compile(r"^([ \t]*)(\?{1,2}[\w.]+|[\w.]+\?{1,2})[ \t]*$")  # ?obj, obj??
_BARE_REPR = re.compile(r"^<[^\n]*>$")  # "<Figure size 432x288 with 1 Axes>": says nothing useful
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_]\w*")  # attribute names (after a dot) are not references
# A string's opening quote, with its prefix (r"...", f'''...'''), or a comment's "#".
_STRING_OR_COMMENT = re.compile(r"""(?:(?<!\w)(?P<prefix>[rRbBuUfF]{1,2}))?(?P<quote>'''|\"\"\"|'|")|#""")
_SIMPLE_STRING = re.compile(r"'[^'\\\n]*(?:\\.[^'\\\n]*)*'|\"[^\"\\\n]*(?:\\.[^\"\\\n]*)*\"")
_TOP_LEVEL_START = re.compile(r"[A-Za-z_@]")
_CLAUSE = re.compile(r"(?:else|elif|except|finally)\b")
# Lines that start a statement even where an unclosed bracket above seems to continue one.
_STATEMENT_KEYWORD = re.compile(r"(?:async[ \t]+def|def|class|import|from|if|for|while|with|try)\b|@")
_LONE_CR = re.compile(r"\r(?!\n)")  # a line break to Python's parser, not to str.split("\n")
_DEF_HEAD = re.compile(r"(?:async[ \t]+)?def[ \t]+(\w+)|class[ \t]+(\w+)")


@dataclass(frozen=True)
class Cell:
    """One notebook cell as the browser sends it."""

    cell_type: str  # "code" | "markdown" | "raw"
    source: str
    outputs: tuple[str, ...] = ()  # text of outputs, already flattened to plain text

    def __post_init__(self) -> None:
        if self.cell_type not in CELL_TYPES:
            raise ValueError(f"cell_type must be 'code', 'markdown' or 'raw', not {self.cell_type!r}.")
        if not isinstance(self.source, str):
            raise ValueError(f"A cell's source must be a string, not {type(self.source).__name__}.")
        if not isinstance(self.outputs, tuple):
            object.__setattr__(self, "outputs", tuple(self.outputs))


@dataclass(frozen=True)
class FimContext:
    """A prompt's prefix (ending at the cursor) and suffix (starting right after it)."""

    prefix: str
    suffix: str
    cells_in_prefix: int  # the active cell plus the cells above that made it, whole or partial
    cells_in_suffix: int  # the cells below that made it, whole or partial
    truncated: bool  # something was left out or shortened to fit the budget


# ---------------------------------------------------------------------------------------------
# Reading the notebook JSON


def cells_from_json(notebook: Mapping[str, Any]) -> list[Cell]:
    """Cells from nbformat-shaped JSON: {"cells": [{"cell_type", "source", "outputs"?}, ...]}.

    Outputs keep only plain text: stream text, the text/plain form of results and displays (bare
    object reprs such as "<Figure ...>" dropped), and "Name: message" for errors; each is capped.
    """
    if not isinstance(notebook, Mapping):
        raise ValueError("The notebook must be a JSON object with a 'cells' list.")
    raw_cells = notebook.get("cells")
    if not isinstance(raw_cells, list):
        raise ValueError("The notebook must have a 'cells' list.")
    cells = []
    for index, raw in enumerate(raw_cells):
        if not isinstance(raw, Mapping):
            raise ValueError(f"Cell {index} must be a JSON object.")
        cell_type = raw.get("cell_type")
        if cell_type not in CELL_TYPES:
            raise ValueError(
                f"Cell {index} has cell_type {_brief(cell_type)}; expected 'code', 'markdown' or 'raw'."
            )
        if "source" not in raw:
            raise ValueError(f"Cell {index} has no 'source'.")
        source = _multiline(raw["source"], f"Cell {index}'s source")
        outputs = _outputs(raw.get("outputs", []), index) if cell_type == "code" else ()
        cells.append(Cell(cell_type, source, outputs))
    return cells


def _brief(value: object) -> str:
    """A client's value quoted in an error message: short strings as they are, anything else by type."""
    if isinstance(value, str) and len(value) <= 40:
        return repr(value)
    return "a string" if isinstance(value, str) else type(value).__name__


def _multiline(value: object, what: str) -> str:
    """nbformat's multiline string: one string or a list of strings to concatenate."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return "".join(value)
    raise ValueError(f"{what} must be a string or a list of strings.")


def _outputs(raw_outputs: object, index: int) -> tuple[str, ...]:
    if not isinstance(raw_outputs, list):
        raise ValueError(f"Cell {index}'s outputs must be a list.")
    texts: list[str] = []
    last_stream: str | None = None
    for raw in raw_outputs:
        if not isinstance(raw, Mapping):
            raise ValueError(f"Cell {index} has an output that is not a JSON object.")
        kind = raw.get("output_type")
        text = None
        if kind == "stream":
            text = _multiline(raw.get("text", ""), f"Cell {index}'s stream output")
            # Kernels flush a stream in many small chunks; they read as one output.
            if last_stream == raw.get("name") and texts:
                texts[-1] += text
                continue
            last_stream = raw.get("name")
            texts.append(text)
            continue
        last_stream = None
        if kind in ("execute_result", "display_data"):
            data = raw.get("data")
            if isinstance(data, Mapping) and "text/plain" in data:
                text = _multiline(data["text/plain"], f"Cell {index}'s text/plain output")
                if _BARE_REPR.match(text.strip()):
                    text = None
        elif kind == "error":
            text = f"{raw.get('ename', 'Error')}: {raw.get('evalue', '')}"
        if text is not None:
            texts.append(text)
    cleaned = (_clean_output(text) for text in texts)
    return tuple(text for text in cleaned if text)[:OUTPUTS_PER_CELL]


def _clean_output(text: str) -> str:
    text = _ANSI.sub("", text).replace("\r\n", "\n")
    # A progress bar redraws its line with "\r": only the last drawing is what the user saw.
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    text = text.strip("\n")
    if len(text) > OUTPUT_MAX_CHARS:
        cut = text.rfind("\n", 0, OUTPUT_MAX_CHARS)
        text = text[: cut if cut > 0 else OUTPUT_MAX_CHARS] + "\n..."
    return text if text.strip() else ""


# ---------------------------------------------------------------------------------------------
# Rendering cells as Python


def _lines(text: str) -> list[str]:
    """The lines of text, each with its "\\n"; unlike str.splitlines only "\\n" ends a line."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _comment(line: str) -> str:
    return "# " + line if line.strip() else "#"


def _pythonize(source: str) -> str:
    """Source with IPython-only lines turned into comments, line for line (line numbers are kept).

    `%line` and `!shell` lines and `obj?` help lines become `# %line`; a cell magic's `%%name` line
    is commented, and so is its whole body unless the magic runs Python (%%time, %%capture, ...).
    """
    lines = source.split("\n")
    first = 0
    if lines[0].startswith("%%"):
        words = lines[0][2:].split()
        first = 1
        if not words or words[0] not in PYTHON_CELL_MAGICS:
            return "\n".join(_comment(line) for line in lines)
        lines[0] = _comment(lines[0])
    for i in range(first, len(lines)):
        match = _LINE_MAGIC.match(lines[i]) or _HELP_LINE.match(lines[i])
        if match:
            lines[i] = f"{match.group(1)}# {match.group(2)}"
    return "\n".join(lines)


def _marker(cell_type: str) -> str:
    return CELL_MARKER + "\n" if cell_type == "code" else f"{CELL_MARKER} [{cell_type}]\n"


def _body_lines(cell: Cell) -> list[str]:
    """The cell's source as it appears outside the active cell, every line ending with "\\n"."""
    if cell.cell_type == "code":
        lines = _lines(_pythonize(cell.source))
    else:
        lines = [_comment(line) + "\n" for line in cell.source.split("\n")]
        while lines and lines[-1] == "#\n":
            lines.pop()
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


def _output_lines(outputs: Sequence[str]) -> list[str]:
    """Outputs as comment lines: "# Out: " before each output's first line, shortened."""
    rendered = []
    for text in outputs:
        lines = text.split("\n")
        for j, line in enumerate(lines[:OUTPUT_MAX_LINES]):
            if len(line) > OUTPUT_LINE_CHARS:
                line = line[:OUTPUT_LINE_CHARS] + " ..."
            rendered.append((("# Out: " if j == 0 else "#      ") + line).rstrip() + "\n")
        if len(lines) > OUTPUT_MAX_LINES:
            rendered.append("#      ...\n")
    return rendered


# ---------------------------------------------------------------------------------------------
# Blocks of text and filling them greedily into a budget


class _Count:
    """count_tokens, called at most once per distinct piece of one prompt."""

    def __init__(self, count_tokens: Callable[[str], int]) -> None:
        self._count_tokens = count_tokens
        self._known: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        known = self._known.get(text)
        if known is None:
            known = self._known[text] = int(self._count_tokens(text))
        return known


@dataclass(frozen=True)
class _Block:
    """A run of lines kept whole or, when it does not fit, in part: the lines nearest the cursor."""

    head: str  # written once before whatever is kept (a cell marker on the prefix side)
    lines: tuple[str, ...]
    from_end: bool  # the cursor is after the block (prefix side): its last lines are the nearest
    pinned: int = 0  # how many lines nearest the cursor are kept whatever the budget
    cell: int = -1

    def pinned_cost(self, count: _Count) -> int:
        n = len(self.lines)
        near = self.lines[n - self.pinned :] if self.from_end else self.lines[: self.pinned]
        return sum(count(line) for line in near) + (count(self.head) if near else 0)

    def render(self, kept: int) -> str:
        part = self.lines[len(self.lines) - kept :] if self.from_end else self.lines[:kept]
        return self.head + "".join(part)


class _Side:
    """One side of the cursor filled nearest block first; `fill` can resume with a larger budget."""

    def __init__(self, blocks: Iterable[_Block], count: _Count) -> None:
        self._blocks = iter(blocks)
        self._count = count
        self._partial: _Block | None = None
        self._taken = 0  # lines of the partial block kept so far
        self.whole: list[_Block] = []
        self.used = 0
        self.exhausted = False

    def fill(self, budget: int) -> None:
        while True:
            if self._partial is None:
                block = next(self._blocks, None)
                if block is None:
                    self.exhausted = True
                    return
                whole = block.render(len(block.lines))
                # Text this long cannot fit what is left: not worth tokenizing (it may be megabytes).
                cost = (
                    budget + 1
                    if len(whole) > (budget - self.used) * MAX_CHARS_PER_TOKEN
                    else self._count(whole)
                )
                if self.used + cost <= budget:
                    self.used += cost
                    self.whole.append(block)
                    continue
                self._partial, self._taken = block, 0
            block = self._partial
            n = len(block.lines)
            while self._taken < n:
                line = block.lines[n - 1 - self._taken] if block.from_end else block.lines[self._taken]
                if self._taken >= block.pinned and len(line) > (budget - self.used) * MAX_CHARS_PER_TOKEN:
                    return
                cost = self._count(line) + (self._count(block.head) if self._taken == 0 else 0)
                if self._taken >= block.pinned and self.used + cost > budget:
                    return
                self.used += cost
                self._taken += 1
            # Line by line, every line fitted after all.
            self.whole.append(block)
            self._partial = None

    def kept(self) -> list[tuple[_Block, int]]:
        """(block, lines kept), nearest the cursor first."""
        kept = [(block, len(block.lines)) for block in self.whole]
        partial = self._partial
        # A cell of which only the blank line between cells fitted is not worth its marker.
        if partial is not None and (
            partial.pinned or partial.render(self._taken)[len(partial.head) :].strip()
        ):
            kept.append((partial, self._taken))
        return kept

    @property
    def complete(self) -> bool:
        return self.exhausted and self._partial is None

    def text(self) -> str:
        """What this side contributes, in reading order."""
        kept = self.kept()
        pieces = [block.render(n) for block, n in kept]
        if kept and kept[0][0].from_end:  # nearest first, but on the prefix side the nearest comes last
            pieces.reverse()
        return "".join(pieces)


def _fill_both(
    prefix: _Side, suffix: _Side, prefix_budget: int, suffix_budget: int, suffix_floor: int = 0
) -> None:
    """Prefix first within its share, the suffix gets the rest, then the prefix what the suffix left.

    `suffix_floor` is what the suffix takes whatever its budget (the rest of the cursor's line).
    """
    total = prefix_budget + suffix_budget
    prefix.fill(min(prefix_budget, total - suffix_floor))
    suffix.fill(total - prefix.used)
    prefix.fill(total - suffix.used)


def _trim_chars(text: str, budget: int, count: _Count, *, keep_end: bool) -> str:
    """The longest end of text (or start) within budget: only for a single line too long to keep whole."""
    if count(text) <= budget:
        return text
    low, high = 0, len(text)  # low chars fit, high do not
    while high - low > 1:
        mid = (low + high) // 2
        if count(text[len(text) - mid :] if keep_end else text[:mid]) <= budget:
            low = mid
        else:
            high = mid
    return text[len(text) - low :] if keep_end else text[:low]


def _cursor_blocks(
    head: str, before: str, after: str, count: _Count, prefix_budget: int, suffix_budget: int
) -> tuple[_Block, _Block, bool]:
    """Blocks for the text around the cursor, the cursor's own line pinned; True if that line was cut.

    Only a cursor line longer than the whole budget is cut inside the line, at its far ends: the
    budget is a hard limit of the model, the line boundary rule a preference.
    """
    before_lines = _lines(before)
    if not before_lines or before_lines[-1].endswith("\n"):
        before_lines.append("")  # the cursor is at the start of its line
    after_lines = _lines(after)
    total = prefix_budget + suffix_budget
    head_cost = count(head)
    near_before, near_after = before_lines[-1], after_lines[0] if after_lines else ""
    # Characters further from the cursor than this cannot fit: dropped before anything is tokenized.
    limit = total * MAX_CHARS_PER_TOKEN
    cut = len(near_before) > limit or len(near_after) > limit
    if cut:
        near_before = before_lines[-1] = near_before[max(len(near_before) - limit, 0) :]
        near_after = near_after[:limit]
        if after_lines:
            after_lines[0] = near_after
    if head_cost + count(near_before) + count(near_after) > total:
        cut = True
        allowance = max(prefix_budget, total - count(near_after)) - head_cost
        near_before = before_lines[-1] = _trim_chars(near_before, max(allowance, 0), count, keep_end=True)
        allowance = total - head_cost - count(near_before)
        near_after = _trim_chars(near_after, max(allowance, 0), count, keep_end=False)
        if after_lines:
            after_lines[0] = near_after
    before_block = _Block(head, tuple(before_lines), from_end=True, pinned=1)
    after_block = _Block("", tuple(after_lines), from_end=False, pinned=1 if after_lines else 0)
    return before_block, after_block, cut


def _effective_budget(budget_tokens: int) -> int:
    margin = SAFETY_TOKENS + math.ceil(budget_tokens * SAFETY_FRACTION)
    return max(1, budget_tokens - margin)


def _split_budget(budget: int, prefix_share: float, reserved: int) -> tuple[int, int]:
    """(prefix, suffix) budgets; `reserved` tokens at the top of the prefix come out of its share."""
    prefix_budget = math.floor(budget * prefix_share)
    suffix_budget = budget - prefix_budget
    prefix_budget -= reserved
    if prefix_budget < 0:
        suffix_budget += prefix_budget
        prefix_budget = 0
    return prefix_budget, max(suffix_budget, 0)


def _validate_budget(budget_tokens: int, prefix_share: float) -> None:
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int) or budget_tokens < 1:
        raise ValueError(f"budget_tokens must be a positive integer, not {budget_tokens!r}.")
    if not 0.0 <= prefix_share <= 1.0:
        raise ValueError(f"prefix_share must be between 0 and 1, not {prefix_share!r}.")


def plain_context(
    prefix: str,
    suffix: str,
    *,
    count_tokens: Callable[[str], int],
    budget_tokens: int,
    prefix_share: float = 0.75,
) -> FimContext:
    """Prefix and suffix of a file or console, their far ends trimmed at line boundaries to fit."""
    _validate_budget(budget_tokens, prefix_share)
    count = _Count(count_tokens)
    prefix_budget, suffix_budget = _split_budget(_effective_budget(budget_tokens), prefix_share, 0)
    before, after, cut = _cursor_blocks("", prefix, suffix, count, prefix_budget, suffix_budget)
    before_side, after_side = _Side([before], count), _Side([after], count)
    _fill_both(before_side, after_side, prefix_budget, suffix_budget, after.pinned_cost(count))
    truncated = cut or not (before_side.complete and after_side.complete)
    return FimContext(before_side.text(), after_side.text(), 0, 0, truncated)


# ---------------------------------------------------------------------------------------------
# Imports and definitions that the code near the cursor uses


@dataclass(frozen=True)
class _Unit:
    """A top-level import, def/class or short assignment: lines [start, end) of a cell."""

    kind: str  # "import" | "def" | "assign" | "binding" (an assignment too long to carry)
    names: frozenset[str]  # what it binds
    refs: frozenset[str]  # what it reads
    start: int
    end: int
    text: str
    stubs: tuple[str, ...] = ()  # shorter forms of a def (signature, docstring line, "..."), longest first


@dataclass
class _Need:
    """A unit the code near the cursor uses, directly (depth 1) or through the units in `parents`."""

    cell: int
    unit: _Unit
    depth: int
    parents: set[tuple[int, int]]  # keys of the units whose use brought this one in; empty for roots

    @property
    def key(self) -> tuple[int, int]:
        return self.cell, self.unit.start


def _join(lines: Sequence[str], start: int, end: int) -> str:
    return "".join(line + "\n" for line in lines[start:end])


def _parse(code: str) -> ast.Module | None:
    try:
        with warnings.catch_warnings():
            # Invalid escape sequences and the like are the user's business, not the log's.
            warnings.simplefilter("ignore")
            return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _units(code: str) -> tuple[_Unit, ...]:
    """The units of a cell's pythonized code; none for a cell too large to parse on every request.

    Parsing holds the GIL (a megabyte of code stalls the server's event loop for seconds), and the
    cache keeps only small cells, so that it holds at most its size times UNITS_CACHE_MAX_CHARS
    characters whatever clients send.
    """
    if len(code) > UNITS_MAX_CHARS:
        return ()
    if len(code) > UNITS_CACHE_MAX_CHARS:
        return _parse_units(code)
    return _cached_units(code)


@functools.lru_cache(maxsize=4096)
def _cached_units(code: str) -> tuple[_Unit, ...]:
    return _parse_units(code)


def _parse_units(code: str) -> tuple[_Unit, ...]:
    """The units of a cell's pythonized code.

    Small cells are cached by text (see `_units`): on every keystroke the same unchanged cells are
    read again. A cell that does not parse (notebooks are often mid-edit) is split into top-level
    statements by a line heuristic and each statement is parsed on its own; a def that still does
    not parse is read by pattern.
    """
    # Same length, so positions hold; lines then number as the parser numbers them.
    code = _LONE_CR.sub("\n", code)
    lines = code.split("\n")
    tree = _parse(code)
    if tree is not None:
        return _units_of(tree.body, lines, 0)
    units: list[_Unit] = []
    for start, end in _segments(lines):
        tree = _parse("\n".join(lines[start:end]))
        if tree is not None:
            units.extend(_units_of(tree.body, lines, start))
        else:
            unit = _def_by_pattern(lines, start, end)
            if unit is not None:
                units.append(unit)
    return tuple(units)


def _binding(node: ast.stmt) -> tuple[str, set[str]] | None:
    """(kind, names bound) for the statements worth carrying, else None."""
    if isinstance(node, ast.Import):
        return "import", {alias.asname or alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom):
        # A star import binds names nobody can see; a __future__ import only matters at a file's top.
        if node.module == "__future__" or any(alias.name == "*" for alias in node.names):
            return None
        return "import", {alias.asname or alias.name for alias in node.names}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return "def", {node.name}
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets = [node.target]
    names: set[str] = set()
    while targets:
        target = targets.pop()
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            targets.extend(target.elts)
        elif isinstance(target, ast.Starred):
            targets.append(target.value)
    return ("assign", names) if names else None


def _node_refs(node: ast.stmt, kind: str) -> frozenset[str]:
    loads: set[str] = set()
    local: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            (loads if isinstance(sub.ctx, ast.Load) else local).add(sub.id)
        elif isinstance(sub, ast.arg):
            local.add(sub.arg)
    # A function's own parameters and locals are not outside names it needs.
    return frozenset(loads - local if kind == "def" else loads)


def _first_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [decorator.lineno for decorator in decorators])


def _units_of(statements: Sequence[ast.stmt], lines: Sequence[str], base: int) -> tuple[_Unit, ...]:
    """Units from parsed top-level statements; `base` is the line where the parsed text starts."""
    units: list[_Unit] = []
    for node in statements:
        bound = _binding(node)
        if bound is None:
            continue
        kind, names = bound
        start, end = base + _first_line(node) - 1, base + (node.end_lineno or node.lineno)
        if kind == "assign" and end - start > ASSIGN_MAX_LINES:
            kind = "binding"  # not carried, but it still hides earlier bindings of its names
        refs = _node_refs(node, kind)
        stubs = _stubs(node, lines, base) if kind == "def" else ()
        if units and start < units[-1].end:  # statements sharing a line ("a = 1; b = 2") go together
            previous = units.pop()
            if "def" in (kind, previous.kind):
                kind = "def"
            elif kind != previous.kind:
                kind = "assign"
            names, refs = names | previous.names, refs | previous.refs
            start, end, stubs = previous.start, max(end, previous.end), ()
        text = _join(lines, start, end)
        units.append(_Unit(kind, frozenset(names), refs, start, end, text, _shorter(stubs, text)))
    return tuple(units)


def _indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _shorter(stubs: Iterable[str], text: str) -> tuple[str, ...]:
    """The distinct stubs shorter than the full text, longest first."""
    return tuple(
        sorted({stub for stub in stubs if len(stub) < len(text)}, key=lambda stub: (-len(stub), stub))
    )


def _stubs(node: ast.stmt, lines: Sequence[str], base: int) -> tuple[str, ...]:
    """A def cut to its signature, docstring summary and "..."; a class also with its methods' stubs."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return ()
    body = node.body[0]
    if body.lineno == node.lineno:  # "def f(): return 1" is already one line
        return ()
    indent = _indentation(lines[base + body.lineno - 1]) or "    "
    parts = [_join(lines, base + _first_line(node) - 1, base + body.lineno - 1)]
    docstring = ast.get_docstring(node)
    if docstring and docstring.strip():
        summary = docstring.strip().split("\n")[0].strip().replace('"""', "'''")
        parts.append(f'{indent}"""{summary}"""\n')
    bare = "".join(parts) + indent + "...\n"
    members = []
    if isinstance(node, ast.ClassDef):
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                end = base + (item.end_lineno or item.lineno)
                members.extend(
                    _stubs(item, lines, base)[-1:] or [_join(lines, base + _first_line(item) - 1, end)]
                )
            elif isinstance(item, (ast.Assign, ast.AnnAssign)) and item.end_lineno == item.lineno:
                members.append(lines[base + item.lineno - 1] + "\n")
    return ("".join(parts + members), bare) if members else (bare,)


def _bracket_balance(line: str) -> int:
    code = _SIMPLE_STRING.sub("", line).split("#", 1)[0]
    return sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")


def _segments(lines: Sequence[str]) -> list[tuple[int, int]]:
    """Top-level statements of code that does not parse, as line ranges (a heuristic)."""
    starts: list[int] = []
    depth = 0
    previous_top = ""
    for i, line in enumerate(lines):
        if _STATEMENT_KEYWORD.match(line):
            depth = 0  # an unclosed bracket above is a mistake being edited, not a continuation
        if depth == 0 and _TOP_LEVEL_START.match(line) and not _CLAUSE.match(line):
            if not previous_top.startswith("@"):  # a decorator's def belongs with the decorator
                starts.append(i)
            previous_top = line
        depth = max(0, depth + _bracket_balance(line))
    segments = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        segments.append((start, end))
    return segments


def _def_by_pattern(lines: Sequence[str], start: int, end: int) -> _Unit | None:
    """A def or class whose body does not parse, found by its first line."""
    head = start
    while head < end and lines[head].startswith("@"):
        head += 1
    match = _DEF_HEAD.match(lines[head]) if head < end else None
    if match is None:
        return None
    name = match.group(1) or match.group(2)
    signature_end = head
    while signature_end < end - 1 and not lines[signature_end].split("#", 1)[0].rstrip().endswith(":"):
        signature_end += 1
    body = [line for line in lines[signature_end + 1 : end] if line.strip()]
    indent = _indentation(body[0]) if body else ""
    text = _join(lines, start, end)
    stub = _join(lines, start, signature_end + 1) + (indent or "    ") + "...\n"
    refs = _references(text) - {name}
    return _Unit("def", frozenset({name}), refs, start, end, text, _shorter([stub], text))


def _references(text: str) -> frozenset[str]:
    """Names the code in `text` reads. Words in comments and strings are prose ("number of
    components"), and a name there would pull in the definition of a variable nobody uses."""
    return frozenset(_IDENTIFIER.findall(_code_only(text)))


def _code_only(text: str) -> str:
    """`text` without its comments and the insides of its strings, but with the names its f-strings'
    replacement fields read (`f"{df.shape}"` reads `df`).

    Line by line: the text is often cut from a cell at any line, so a triple quote at the top may close
    a string rather than open one, and nothing read from one line may decide how the next is read.
    A string still open at a line's end ends there, as in code still being typed.
    """
    return "\n".join(_code_of_line(line) for line in text.split("\n"))


def _code_of_line(line: str) -> str:
    kept: list[str] = []
    pos = 0
    while match := _STRING_OR_COMMENT.search(line, pos):
        kept.append(line[pos : match.start()])
        quote = match.group("quote")
        if quote is None:  # a comment: the rest of the line
            return "".join(kept)
        end = match.end()
        while end < len(line) and not line.startswith(quote, end):
            end += 2 if line[end] == "\\" else 1
        closed = line.startswith(quote, end)
        if closed and "f" in (match.group("prefix") or "").lower():
            kept.append(" ".join(("", *_fstring_names(line[match.start() : end + len(quote)]), "")))
        kept.append(" ")
        pos = min(len(line), end + len(quote)) if closed else len(line)
    kept.append(line[pos:])
    return "".join(kept)


def _fstring_names(literal: str) -> list[str]:
    """The names an f-string literal's replacement fields read, format specs' fields included; none if
    it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # invalid escapes in the literal
            tree = ast.parse(literal, mode="eval")
    except (SyntaxError, ValueError):
        return []
    return sorted({node.id for node in ast.walk(tree) if isinstance(node, ast.Name)})


# ---------------------------------------------------------------------------------------------
# The notebook around the cursor


class _Notebook:
    """The notebook seen from the cursor; cells are rendered into blocks only when asked for."""

    def __init__(self, cells: Sequence[Cell], index: int, offset: int, include_outputs: bool) -> None:
        self.cells = cells
        self.index = index
        self.include_outputs = include_outputs
        active = cells[index]
        self.head = _marker(active.cell_type)
        self.before = active.source[:offset]
        after = active.source[offset:]
        # The cell's last line ends like every other line, so the next cell marker starts its own.
        self.after = after + "\n" if after and not after.endswith("\n") else after
        self._blocks: dict[int, _Block | None] = {}

    def _block(self, i: int) -> _Block | None:
        if i not in self._blocks:
            cell = self.cells[i]
            body = _body_lines(cell) if cell.source.strip() else []
            outputs = []
            if self.include_outputs and cell.cell_type == "code":
                outputs = _output_lines(cell.outputs)
            marker = _marker(cell.cell_type)
            block = None
            if body and i < self.index:
                block = _Block(marker, (*body, *outputs, "\n"), from_end=True, cell=i)
            elif body:
                block = _Block("", ("\n", marker, *body, *outputs), from_end=False, cell=i)
            self._blocks[i] = block
        return self._blocks[i]

    def above(self) -> Iterable[_Block]:
        """Blocks of the cells above, nearest first (empty cells skipped)."""
        for i in range(self.index - 1, -1, -1):
            block = self._block(i)
            if block is not None:
                yield block

    def below(self) -> Iterable[_Block]:
        for i in range(self.index + 1, len(self.cells)):
            block = self._block(i)
            if block is not None:
                yield block

    def definitions(self) -> dict[str, tuple[int, _Unit]]:
        """Each name bound above the cursor, to the unit that binds it last (cell, unit)."""
        index: dict[str, tuple[int, _Unit]] = {}
        for i in range(self.index):
            cell = self.cells[i]
            if cell.cell_type == "code":
                for unit in _units(_pythonize(cell.source)):
                    index.update(dict.fromkeys(unit.names, (i, unit)))
        if self.cells[self.index].cell_type == "code":
            # Whole lines above the cursor's own line: the statement being typed is not a definition yet.
            lines_above = self.before[: self.before.rfind("\n") + 1]
            for unit in _units(_pythonize(lines_above)) if lines_above else ():
                index.update(dict.fromkeys(unit.names, (self.index, unit)))
        return index

    def needed(self, near: str, around: str) -> list[_Need]:
        """The units the code near the cursor uses, and the units those use in turn.

        Depth 1 is a unit binding a name the `near` text reads, 2 one binding a name a depth-1 unit
        reads, and so on. Imports of names that only the `around` text (the neighbouring cells kept)
        reads come last: cheap, and they say what an abbreviation such as `plt` stands for.
        """
        index = self.definitions()
        found: dict[tuple[int, int], _Need] = {}
        if self.cells[self.index].cell_type != "code":
            near = ""  # prose mentions names without needing their definitions
        # A name the active cell binds from the cursor's line on is mostly read as that binding.
        rest = self.before[self.before.rfind("\n") + 1 :] + self.after
        shadowed = {name for unit in _units(_pythonize(rest)) for name in unit.names}
        frontier: list[tuple[str, tuple[int, int] | None]] = [
            (name, None) for name in sorted(_references(near) - shadowed)
        ]
        depth = 1
        while frontier:
            following: list[tuple[str, tuple[int, int] | None]] = []
            for name, parent in frontier:
                hit = index.get(name)
                if hit is None or hit[1].kind == "binding":
                    continue
                key = (hit[0], hit[1].start)
                need = found.get(key)
                if need is None:
                    need = found[key] = _Need(hit[0], hit[1], depth, set())
                    following.extend((ref, key) for ref in sorted(hit[1].refs))
                if parent is not None and need.depth == depth:
                    need.parents.add(parent)
            frontier = following
            depth += 1
        for name in sorted(_references(around)):
            hit = index.get(name)
            if hit is not None and hit[1].kind == "import" and (hit[0], hit[1].start) not in found:
                found[(hit[0], hit[1].start)] = _Need(hit[0], hit[1], AROUND_DEPTH, set())
        return list(found.values())


def _header(
    needed: Sequence[_Need], kept_from: Mapping[int, int], budget: int, count: _Count
) -> tuple[str, int]:
    """The top of the prefix: needed units not already in the kept text, within budget, and its cost.

    Nearest in the chain of use first, imports before definitions at each depth, then nearest to
    the cursor; a definition that does not fit whole may go in as a stub, and a unit is only worth
    its place while a unit that uses it is shown. Written out imports first, in notebook order.
    """

    def is_kept(need: _Need) -> bool:
        return need.cell in kept_from and kept_from[need.cell] <= need.unit.start

    shown = {need.key for need in needed if is_kept(need)}
    missing = sorted(
        (need for need in needed if not is_kept(need)),
        key=lambda need: (need.depth, need.unit.kind != "import", -need.cell, -need.unit.start),
    )
    # The marker, then a blank line after the imports and one at the end.
    used = count(CELL_MARKER + "\n") + 2 * count("\n")
    chosen: list[tuple[_Need, str]] = []
    for need in missing:
        if need.parents and not need.parents & shown:
            continue
        for text in (need.unit.text, *need.unit.stubs):
            if need.unit.kind == "def":
                text += "\n"  # a blank line after a definition, as in any Python file
            if len(text) > (budget - used) * MAX_CHARS_PER_TOKEN:
                continue  # cannot fit: not worth tokenizing
            if used + count(text) <= budget:
                used += count(text)
                chosen.append((need, text))
                shown.add(need.key)
                break
    if not chosen:
        return "", 0
    chosen.sort(key=lambda item: (item[0].unit.kind != "import", item[0].cell, item[0].unit.start))
    imports = "".join(text for need, text in chosen if need.unit.kind == "import")
    others = "".join(text for need, text in chosen if need.unit.kind != "import")
    return CELL_MARKER + "\n" + imports + ("\n" if imports and others else "") + others + "\n", used


@dataclass
class _Window:
    """What of the notebook is kept for one budget: four sides filled around the cursor."""

    before: _Side  # the active cell up to the cursor
    after: _Side  # the active cell from the cursor
    above: _Side
    below: _Side
    cursor_line_cut: bool

    @classmethod
    def fit(cls, nb: _Notebook, count: _Count, budget: int, share: float, reserved: int) -> _Window:
        prefix_budget, suffix_budget = _split_budget(budget, share, reserved)
        before_block, after_block, cut = _cursor_blocks(
            nb.head, nb.before, nb.after, count, prefix_budget, suffix_budget
        )
        before, after = _Side([before_block], count), _Side([after_block], count)
        _fill_both(before, after, prefix_budget, suffix_budget, after_block.pinned_cost(count))
        above, below = _Side(nb.above(), count), _Side(nb.below(), count)
        # Neighbours only once the active cell is whole: it is what the user is looking at.
        if before.complete and after.complete:
            rest = max(prefix_budget + suffix_budget - before.used - after.used, 0)
            above_budget = min(max(prefix_budget - before.used, 0), rest)
            _fill_both(above, below, above_budget, rest - above_budget)
        return cls(before, after, above, below, cut)

    @property
    def used(self) -> int:
        return self.before.used + self.after.used + self.above.used + self.below.used

    @property
    def complete(self) -> bool:
        sides = (self.before, self.after, self.above, self.below)
        return not self.cursor_line_cut and all(side.complete for side in sides)

    def kept_from(self, active: int) -> dict[int, int]:
        """For each cell kept on the prefix side, the first of its source lines that is kept."""
        kept = {block.cell: len(block.lines) - n for block, n in self.above.kept()}
        for block, n in self.before.kept():
            kept[active] = len(block.lines) - n
        return kept

    def active_text(self) -> str:
        return self.before.text() + self.after.text()

    def context(self, header: str) -> FimContext:
        return FimContext(
            prefix=header + self.above.text() + self.before.text(),
            suffix=self.after.text() + self.below.text(),
            cells_in_prefix=1 + len(self.above.kept()),
            cells_in_suffix=len(self.below.kept()),
            truncated=bool(header) or not self.complete,
        )


def build_context(
    cells: Sequence[Cell],
    cell_index: int,
    offset: int,
    *,
    count_tokens: Callable[[str], int],
    budget_tokens: int,
    prefix_share: float = 0.75,
    include_outputs: bool = False,
) -> FimContext:
    """The FIM prefix and suffix for a cursor `offset` characters into cell `cell_index`.

    `count_tokens` is called on pieces (whole cells, lines, definitions), each distinct piece once,
    never on the whole prompt; `budget_tokens` is what prefix and suffix may take together (the
    FIM sentinels and the completion are the caller's to budget for). A small safety margin is held
    back because piece counts only add up approximately.
    """
    _validate_budget(budget_tokens, prefix_share)
    if not cells:
        raise ValueError("The notebook has no cells.")
    if isinstance(cell_index, bool) or not isinstance(cell_index, int) or not 0 <= cell_index < len(cells):
        raise ValueError(f"cell_index {cell_index!r} is out of range for a notebook of {len(cells)} cells.")
    source = cells[cell_index].source
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= len(source):
        raise ValueError(f"offset {offset!r} is outside the active cell's {len(source)} characters.")
    nb = _Notebook(cells, cell_index, offset, include_outputs)
    count = _Count(count_tokens)
    budget = _effective_budget(budget_tokens)
    window = _Window.fit(nb, count, budget, prefix_share, reserved=0)
    if window.complete:
        return window.context("")
    needed = nb.needed(window.active_text(), window.above.text() + window.below.text())
    if not needed:
        return window.context("")
    # First reserve room for everything the active cell needs from outside itself (an upper bound),
    # then fit the neighbours around that, then keep only what the neighbours do not already show.
    active_only = {cell_index: window.kept_from(cell_index).get(cell_index, 0)}
    header, cost = _header(needed, active_only, math.floor(budget * HEADER_SHARE), count)
    for _ in range(2):
        window = _Window.fit(nb, count, budget, prefix_share, reserved=cost)
        header, cost = _header(needed, window.kept_from(cell_index), budget - window.used, count)
    return window.context(header)
