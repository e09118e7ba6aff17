"""The completion protocol's messages: validating what clients send, shaping what the server answers.

Every validation failure is a `ProtocolError` whose message is one sentence a user can act on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .context import Cell, cells_from_json

MODES = ("line", "block", "auto", "none")
MAX_ID_LENGTH = 128
MAX_TARGET_LENGTH = 512
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64


class ProtocolError(ValueError):
    """A request the server cannot serve as sent; the message goes to the client as is."""


class MessageTooLarge(ProtocolError):
    """A message over the size limit (HTTP 413 rather than 400)."""


@dataclass(frozen=True)
class Limits:
    """Server-side ceilings that requests are checked and clamped against (set by the extension)."""

    max_new_tokens: int = 256
    max_candidates: int = 4
    max_message_bytes: int = 4 << 20  # JSON as sent; a notebook's text is most of it
    max_cells: int = 5000
    max_notebook_chars: int = 2_000_000  # sources and output text together
    max_in_flight: int = 4  # requests running at once on one websocket


@dataclass(frozen=True)
class CompletionRequest:
    prefix: str = ""
    suffix: str = ""
    cells: tuple[Cell, ...] | None = None  # the notebook form: the context builder makes prefix/suffix
    cell: int = 0
    offset: int = 0
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 0.95
    n: int = 1
    mode: str = "auto"
    stop: tuple[str, ...] = ()
    infill: bool = True  # False: `prefix` is a whole prompt to continue (e.g. an Instruct chat)
    seed: int | None = None
    client_target: str | None = None  # e.g. a notebook path and cell id, when the client names one

    @property
    def target(self) -> str:
        """What the request completes in: a newer request for the same target supersedes it."""
        if self.client_target is not None:
            return "client:" + self.client_target
        return f"cell:{self.cell}" if self.cells is not None else "text"


def decode_message(raw: str | bytes, max_bytes: int | None = None) -> dict[str, Any]:
    if max_bytes is not None and _size_exceeds(raw, max_bytes):
        raise MessageTooLarge(f"the message is larger than the limit of {max_bytes:,} bytes")
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("the message is not valid JSON") from exc
    if not isinstance(message, dict):
        raise ProtocolError("the message must be a JSON object")
    return message


# A client writes "type" and "id" first; the id of an over-long message is read from its head alone.
_LEADING_ID = re.compile(r'"id"\s*:\s*"([^"\\]{1,' + str(MAX_ID_LENGTH) + '})"')
_ID_SEARCH_CHARS = 512


def leading_id(raw: str | bytes) -> str | None:
    """The request id near the start of a message that will not be parsed (too large), if any."""
    head = raw[:_ID_SEARCH_CHARS]
    if isinstance(head, bytes):
        head = head.decode("utf-8", "replace")
    match = _LEADING_ID.search(head)
    return match.group(1) if match else None


def parse_completion(body: dict[str, Any], limits: Limits) -> CompletionRequest:
    fields: dict[str, Any] = {}
    if "notebook" in body:
        notebook = body["notebook"]
        if not isinstance(notebook, dict):
            raise ProtocolError("'notebook' must be an object with a 'cells' list")
        raw_cells = notebook.get("cells")
        # Counted before reading the cells, so an oversized notebook costs nothing more.
        if isinstance(raw_cells, list) and len(raw_cells) > limits.max_cells:
            raise ProtocolError(
                f"the notebook has {len(raw_cells):,} cells; the limit is {limits.max_cells:,}"
            )
        try:
            cells = tuple(cells_from_json(notebook))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc
        except RecursionError as exc:
            raise ProtocolError("the notebook is nested too deeply") from exc
        if not cells:
            raise ProtocolError("the notebook has no cells: a completion needs the cell it is typed in")
        check_cells(cells, limits)
        fields["cells"] = cells
        fields["cell"] = integer(body, "cell", 0, len(cells) - 1, required=True)
        source_length = len(cells[fields["cell"]].source)
        fields["offset"] = integer(body, "offset", 0, source_length, required=True)
    elif "prefix" in body:
        fields["prefix"] = text(body, "prefix")
        fields["suffix"] = text(body, "suffix") if "suffix" in body else ""
    else:
        raise ProtocolError(
            "a completion needs either 'prefix' (and 'suffix') or 'notebook', 'cell' and 'offset'"
        )
    if "max_new_tokens" in body:
        # Above the ceiling is clamped, not refused: the client cannot know the server's setting.
        fields["max_new_tokens"] = min(integer(body, "max_new_tokens", 1, 1 << 30), limits.max_new_tokens)
    else:
        fields["max_new_tokens"] = min(CompletionRequest.max_new_tokens, limits.max_new_tokens)
    if "temperature" in body:
        fields["temperature"] = number(body, "temperature", 0.0, 2.0)
    if "top_p" in body:
        fields["top_p"] = number(body, "top_p", 0.01, 1.0)
    if "n" in body:
        # Clamped for the same reason as max_new_tokens: the frontend's candidate count is its own setting.
        fields["n"] = min(integer(body, "n", 1, 1 << 30), limits.max_candidates)
    if "mode" in body:
        mode = body["mode"]
        if mode not in MODES:
            raise ProtocolError(f"'mode' must be one of {', '.join(MODES)}")
        fields["mode"] = mode
    if "stop" in body:
        fields["stop"] = stop_strings(body["stop"])
    if "infill" in body:
        if not isinstance(body["infill"], bool):
            raise ProtocolError("'infill' must be true or false")
        fields["infill"] = body["infill"]
    if body.get("seed") is not None:
        fields["seed"] = integer(body, "seed", 0, 2**63 - 1)
    if "target" in body:
        target = text(body, "target")
        if not 0 < len(target) <= MAX_TARGET_LENGTH:
            raise ProtocolError(
                f"'target' must be a non-empty string of at most {MAX_TARGET_LENGTH} characters"
            )
        fields["client_target"] = target
    return CompletionRequest(**fields)


def request_id(message: dict[str, Any]) -> str:
    value = message.get("id")
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise ProtocolError(f"'id' must be a non-empty string of at most {MAX_ID_LENGTH} characters")
    return value


def text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"'{name}' must be a string")
    if has_lone_surrogate(value):
        raise ProtocolError(f"'{name}' contains an unpaired UTF-16 surrogate, which is not text")
    return value


def check_cells(cells: tuple[Cell, ...], limits: Limits) -> None:
    total = 0
    for index, cell in enumerate(cells):
        for part in (cell.source, *cell.outputs):
            total += len(part)
            # The tokenizer cannot encode a lone surrogate: refuse it here, not deep in the worker.
            if has_lone_surrogate(part):
                raise ProtocolError(f"cell {index} contains an unpaired UTF-16 surrogate, which is not text")
    if total > limits.max_notebook_chars:
        raise ProtocolError(
            f"the notebook has {total:,} characters of text; the limit is {limits.max_notebook_chars:,}"
        )


def has_lone_surrogate(value: str) -> bool:
    if value.isascii():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _size_exceeds(raw: str | bytes, max_bytes: int) -> bool:
    if isinstance(raw, bytes):
        return len(raw) > max_bytes
    # A character is 1 to 4 bytes in UTF-8: encode only when the length alone does not decide.
    if len(raw) > max_bytes:
        return True
    if 4 * len(raw) <= max_bytes:
        return False
    return len(raw.encode("utf-8", "surrogatepass")) > max_bytes


def integer(body: dict[str, Any], name: str, low: int, high: int, required: bool = False) -> int:
    if name not in body and required:
        raise ProtocolError(f"'{name}' is required")
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{name}' must be a whole number")
    if not low <= value <= high:
        raise ProtocolError(f"'{name}' must be between {low} and {high}")
    return value


def number(body: dict[str, Any], name: str, low: float, high: float) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ProtocolError(f"'{name}' must be a number")
    if not low <= value <= high:
        raise ProtocolError(f"'{name}' must be between {low} and {high}")
    return float(value)


def stop_strings(value: Any) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in value)
        or any(has_lone_surrogate(s) for s in value)
    ):
        raise ProtocolError(
            f"'stop' must be a list of at most {MAX_STOP_STRINGS} non-empty strings "
            f"of at most {MAX_STOP_LENGTH} characters"
        )
    return tuple(value)
