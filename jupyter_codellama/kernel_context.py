"""What the live kernel knows, as %%codellama context: the code of the cells run so far and a namespace summary.

The summary is built without importing pandas, NumPy or torch: objects are recognised by their
attributes (`shape`, `dtype`, `columns`, `dtypes`), and nothing is ever `repr()`-ed whole, so a
10 GB array or a lazy remote frame costs a few attribute reads.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ENTRY_CHARS = 200  # one variable's line, at most
MAX_ENTRIES = 60  # the most recently defined names are kept
MAX_COLUMNS = 24
MAX_KEYS = 8
PREVIEW_CHARS = 40  # of a string's value, or of a dict key
# IPython's own names that are not in user_ns_hidden in every version.
SKIP_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit"})
# How IPython rewrites a line magic, a shell command or a help request as Python.
IPYTHON_CALL = "get_ipython()."
# More history than any window holds (100,000 tokens of code): older cells are not read at all.
MAX_HISTORY_CHARS = 400_000
ANNOTATION_CHARS = 30


@dataclass(frozen=True)
class KernelContext:
    cells: tuple[str, ...]  # oldest first
    variables: tuple[str, ...]  # "name: description", in definition order


def kernel_context(shell: Any) -> KernelContext:
    return KernelContext(
        tuple(executed_cells(shell)), tuple(describe_namespace(shell.user_ns, shell.user_ns_hidden))
    )


def executed_cells(shell: Any) -> list[str]:
    """The code of the cells run so far, oldest first, as typed; a cell re-run counts once, where it last ran."""
    return clean_history(shell.history_manager.input_hist_raw)


def clean_history(raw_cells: Iterable[str]) -> list[str]:
    """Python cells only: cell magics (this one's own cells included) go, as do line-magic and shell lines."""
    from IPython.core.inputtransformer2 import TransformerManager

    # IPython's own reading of a cell: a "%" or "!" that continues a statement (`x = (a\n    % 2)`)
    # is Python, not a magic, which a test of each line's first character would drop.
    transformer = TransformerManager()
    newest_first: list[str] = []
    seen: set[str] = set()
    size = 0
    # Newest first, so a long session's oldest cells cost nothing once the window is full.
    for raw in reversed(list(raw_cells)):
        if size > MAX_HISTORY_CHARS:
            break
        if raw.lstrip().startswith("%%"):
            continue
        python = transformer.transform_cell(raw)
        lines = [line for line in python.splitlines() if IPYTHON_CALL not in line]
        code = "\n".join(lines).strip("\n")
        if code.strip() and code not in seen:  # a cell run again counts where it last ran
            seen.add(code)
            newest_first.append(code)
            size += len(code)
    return newest_first[::-1]


def describe_namespace(namespace: Mapping[str, Any], hidden: Mapping[str, Any] | None = None) -> list[str]:
    hidden = hidden or {}
    entries = []
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in SKIP_NAMES or (name in hidden and hidden[name] is value):
            continue
        # One line each: a prompt shows them as comments, which a line break in a name would end.
        line = f"{name}: {describe(value)}".replace("\r", "\\r").replace("\n", "\\n")
        entries.append(cap(line, ENTRY_CHARS))
    return entries[-MAX_ENTRIES:]


def describe(value: Any) -> str:
    """A short description of any object, read from its type and a few cheap attributes."""
    try:
        return _describe(value)
    except Exception:
        # Properties of arbitrary objects may raise anything; their type is still worth a line.
        return type_name(value)


def _describe(value: Any) -> str:
    if isinstance(value, types.ModuleType):
        return f"module {value.__name__}"
    if isinstance(value, type):
        return f"class{signature(value)}"
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType | types.MethodType):
        return f"function{signature(value)}"
    if value is None or isinstance(value, bool | float | complex):
        return f"{type(value).__name__} = {value!r}"
    if isinstance(value, int):
        # repr() of a huge int is quadratic in its digits.
        return f"int = {value!r}" if value.bit_length() <= 128 else f"int of {value.bit_length()} bits"
    if isinstance(value, str | bytes):
        return f"{type(value).__name__} of length {len(value)}: {cap(repr(value[:PREVIEW_CHARS]), 50)}"
    if isinstance(value, Mapping):
        return describe_mapping(value)
    if isinstance(value, list | tuple | set | frozenset):
        return describe_collection(value)
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple):  # torch.Size is a tuple too
        if hasattr(value, "columns") and hasattr(value, "dtypes"):
            return describe_frame(value, shape)
        parts = [f"{type(value).__name__} shape {format_shape(shape)}"]
        dtype = getattr(value, "dtype", None)
        if dtype is not None:
            parts.append(f"dtype {dtype}")
        name = getattr(value, "name", None)
        if isinstance(name, str) and hasattr(value, "index"):  # a pandas-like Series
            parts.append(f"name {cap(repr(name), PREVIEW_CHARS)}")
        return ", ".join(parts)
    return type_name(value)


def describe_frame(frame: Any, shape: tuple) -> str:
    columns = list(frame.columns[: MAX_COLUMNS + 1]) if hasattr(frame.columns, "__getitem__") else []
    dtypes = frame.dtypes
    if hasattr(dtypes, "items"):  # pandas: a Series of dtypes indexed by column
        types_by_column = dict(_take(dtypes.items(), MAX_COLUMNS + 1))
    elif isinstance(dtypes, list | tuple):  # polars: a list aligned with the columns
        types_by_column = dict(zip(columns, dtypes, strict=False))
    else:
        types_by_column = {}
    shown = [
        f"{cap(str(column), PREVIEW_CHARS)} ({types_by_column[column]})"
        if column in types_by_column
        else str(column)
        for column in columns[:MAX_COLUMNS]
    ]
    width = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else len(columns)
    more = f", … {width - MAX_COLUMNS} more" if width > MAX_COLUMNS else ""
    return f"{type(frame).__name__} shape {format_shape(shape)}; columns: {', '.join(shown)}{more}"


def describe_mapping(mapping: Mapping) -> str:
    keys = list(_take(mapping.keys(), MAX_KEYS))
    shown = ", ".join(cap(repr(k), PREVIEW_CHARS) if isinstance(k, str | int) else type_name(k) for k in keys)
    more = ", …" if len(mapping) > MAX_KEYS else ""
    return f"{type(mapping).__name__} of {len(mapping)} items; keys: {shown}{more}"


def describe_collection(items: list | tuple | set | frozenset) -> str:
    kinds = sorted({type(item).__name__ for item in _take(items, 20)})
    of = f" of {' | '.join(kinds)}" if kinds else ""
    return f"{type(items).__name__} of {len(items)} items{of}"


def signature(function: Any) -> str:
    """The parameters, with defaults only where they are small literals: `str(inspect.signature)`
    would repr every default, however large (a 30-million-item list took seconds)."""
    try:
        signature_of = inspect.signature(function)
    except (TypeError, ValueError):
        return "(…)"
    parameters = list(signature_of.parameters.values())
    parts: list[str] = []
    starred = False
    for parameter in parameters:
        if parameter.kind is parameter.VAR_POSITIONAL:
            parts.append(f"*{parameter.name}")
            starred = True
            continue
        if parameter.kind is parameter.VAR_KEYWORD:
            parts.append(f"**{parameter.name}")
            continue
        if parameter.kind is parameter.KEYWORD_ONLY and not starred:
            parts.append("*")
            starred = True
        annotation = (
            "" if parameter.annotation is parameter.empty else f": {annotation_text(parameter.annotation)}"
        )
        equals = " = " if annotation else "="  # as PEP 8 writes them
        default = (
            "" if parameter.default is parameter.empty else f"{equals}{small_literal(parameter.default)}"
        )
        parts.append(parameter.name + annotation + default)
        if (
            parameter.kind is parameter.POSITIONAL_ONLY
            and next_kind(parameters, parameter) != parameter.POSITIONAL_ONLY
        ):
            parts.append("/")
    returns = (
        ""
        if signature_of.return_annotation is signature_of.empty
        else f" -> {annotation_text(signature_of.return_annotation)}"
    )
    return cap(f"({', '.join(parts)}){returns}", 120)


def annotation_text(annotation: Any) -> str:
    # Under `from __future__ import annotations` they are strings already, to show without quotes.
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return cap(text, ANNOTATION_CHARS)


def next_kind(parameters: list[inspect.Parameter], parameter: inspect.Parameter) -> Any:
    """The kind of the parameter after this one, or None at the end."""
    index = parameters.index(parameter)
    return parameters[index + 1].kind if index + 1 < len(parameters) else None


def small_literal(value: Any) -> str:
    """repr of None, a bool, a modest number or a short string; "…" for anything else."""
    if value is None or isinstance(value, bool | float) or (isinstance(value, int) and abs(value) < 10**12):
        return repr(value)
    if isinstance(value, str) and len(value) <= 20:
        return repr(value)
    return "…"


def format_shape(shape: tuple) -> str:
    return "(" + ", ".join(str(size) for size in shape[:8]) + (", …" if len(shape) > 8 else "") + ")"


def type_name(value: Any) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"


def cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _take(items: Iterable, count: int) -> Iterable:
    for index, item in enumerate(items):
        if index >= count:
            return
        yield item
