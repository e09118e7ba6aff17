"""Bad input through a real server: generated and monstrous messages each get one clear answer.

Hypothesis generates the messages (derandomized, a fixed count); they go through one websocket (and
some through REST) to a Jupyter server holding a small random-weight model whose ceiling of two new
tokens keeps the valid ones quick. Every message must get exactly one final reply, an error of one
sentence with no traceback or server path, or a completion; the socket stays open, the server keeps
answering, and its memory does not grow with the number of messages.

Memory is measured while the recorded messages are sent a second time, without Hypothesis: the
test shares its process with the server, and Hypothesis's own bookkeeping grows as it generates.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import FINAL_TYPES, complete, final_reply, read_json, server_config, service, wait_state
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError

import jupyter_codellama
from jupyter_codellama.protocol import MAX_ID_LENGTH, MODES

pytest_plugins = ["pytest_jupyter.jupyter_server"]

WS_EXAMPLES = 1200  # of FRAMES_PER_EXAMPLE frames each
FRAMES_PER_EXAMPLE = 8
REST_EXAMPLES = 500
REPLAYED = 3200  # frames sent again to measure memory
MiB = 1 << 20


@pytest.fixture
def jp_server_config(fim_checkpoint):
    # Defaults for every limit but the token ceiling: generated valid requests then finish fast.
    return server_config(fim_checkpoint, max_new_tokens=2)


def rss_bytes() -> int:
    """This process's resident memory once garbage is collected and freed heap handed back."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap otherwise
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def server_markers(checkpoint: Path) -> tuple[str, ...]:
    """Strings that only a leaked traceback or server path would put into a reply."""
    return ("Traceback", 'File "', str(Path(jupyter_codellama.__file__).parent), str(checkpoint), sys.prefix)


def check_error(message: Any, markers: tuple[str, ...]) -> None:
    assert isinstance(message, str) and 0 < len(message) <= 300, message
    assert "\n" not in message, message
    for marker in markers:
        assert marker not in message, message


# -- what clients may send ------------------------------------------------------------------------

ANY_CHAR = st.characters(exclude_categories=())  # every code point: NUL, controls, lone surrogates
ANY_TEXT = st.text(ANY_CHAR, max_size=40)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | ANY_TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: mostly of the right shape (to get past the first checks), sometimes anything."""
    return st.one_of(plausible, plausible, JSON_VALUES)


SOURCE = st.text(ANY_CHAR, max_size=120) | st.lists(st.text(ANY_CHAR, max_size=30), max_size=4)
OUTPUTS = st.fixed_dictionaries(
    {"output_type": field(st.sampled_from(["stream", "execute_result", "display_data", "error", "update"]))},
    optional={
        "name": field(st.sampled_from(["stdout", "stderr"])),
        "text": field(SOURCE),
        "data": field(st.fixed_dictionaries({}, optional={"text/plain": field(SOURCE)})),
        "ename": JSON_VALUES,
        "evalue": JSON_VALUES,
    },
)
CELLS = st.fixed_dictionaries(
    {"cell_type": field(st.sampled_from(["code", "markdown", "raw"]))},
    optional={"source": field(SOURCE), "outputs": field(st.lists(OUTPUTS, max_size=3))},
)
NOTEBOOKS = st.fixed_dictionaries(
    {"cells": field(st.lists(CELLS, max_size=5))}, optional={"metadata": JSON_VALUES, "path": ANY_TEXT}
)
REQUEST_FIELDS = {
    "id": field(st.text(ANY_CHAR, min_size=1, max_size=MAX_ID_LENGTH + 4)),
    "prefix": field(st.text(ANY_CHAR, max_size=200)),
    "suffix": field(st.text(ANY_CHAR, max_size=100)),
    "notebook": NOTEBOOKS,
    "cell": field(st.integers(-2, 6)),
    "offset": field(st.integers(-2, 130)),
    "max_new_tokens": field(st.integers(-3, 10**12)),
    "temperature": field(st.floats(-1, 3) | st.just(float("nan"))),
    "top_p": field(st.floats(-0.5, 1.5)),
    "n": field(st.integers(-1, 6)),
    "mode": field(st.sampled_from([*MODES, "paragraph", ""])),
    "stop": field(st.lists(st.text(ANY_CHAR, max_size=70), max_size=10)),
    "infill": field(st.booleans()),
    "seed": field(st.integers(-3, 2**64)),
}
MESSAGES = st.fixed_dictionaries(
    {"type": field(st.sampled_from(["complete", "cancel"]))}, optional=REQUEST_FIELDS
).map(json.dumps)  # ensure_ascii: lone surrogates travel as \\ud800 escapes, as a browser sends them


def nested(depth: int, opener: str, closer: str) -> str:
    return opener * depth + closer * depth


# A frame: (binary?, payload).
FRAMES = st.one_of(
    *[MESSAGES.map(lambda text: (False, text))] * 6,
    MESSAGES.flatmap(lambda text: st.integers(0, len(text)).map(lambda cut: (False, text[:cut]))),
    JSON_VALUES.map(lambda value: (False, json.dumps(value))),
    st.binary(max_size=300).map(lambda data: (True, data)),  # invalid UTF-8, NULs, BOMs
    MESSAGES.map(lambda text: (True, text.encode("utf-16"))),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=200).map(lambda text: (False, text)),
    st.integers(1, 60_000).map(lambda depth: (False, nested(depth, "[", "]"))),
    st.integers(1, 3_000).map(lambda depth: (False, '{"type": "complete", "id": "deep", "notebook": ' + nested(depth, '{"cells": ', "}"))),
)  # fmt: skip


def reply_shape(binary: bool, payload: str | bytes) -> tuple[bool, str | None]:
    """(whether the server answers at all, the id its answer must carry) for a frame.

    Only a cancel of a well-formed id goes unanswered; an answer carries the message's id when that
    is a valid one, else null.
    """
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return True, None
    if not isinstance(body, dict):
        return True, None
    given_id = body.get("id")
    valid_id = given_id if isinstance(given_id, str) and 0 < len(given_id) <= MAX_ID_LENGTH else None
    if body.get("type") == "cancel" and valid_id is not None:
        return False, None
    return True, valid_id


class Socket:
    """One websocket for the whole run; reopened (and the run failed) if the server ever closes it."""

    def __init__(self, open_socket: Callable, markers: tuple[str, ...]) -> None:
        self.open_socket = open_socket
        self.markers = markers
        self.ws: Any = None
        self.sent = 0
        self.frames: list[tuple[bool, str | bytes]] = []

    async def exchange(self, frames: list[tuple[bool, str | bytes]]) -> None:
        if self.ws is None:
            self.ws = await self.open_socket()
        try:
            for binary, payload in frames:
                await self.ws.write_message(payload, binary=binary)
                self.sent += 1
                if len(self.frames) < REPLAYED:
                    self.frames.append((binary, payload))
                answered, reply_id = reply_shape(binary, payload)
                if answered:
                    await self.one_answer(reply_id)
            # Nothing stray is left behind: the next message answers the sentinel.
            await self.ws.write_message(json.dumps({"type": "sentinel", "id": "sentinel"}))
            reply = await read_json(self.ws)
            assert reply["id"] == "sentinel" and reply["type"] == "error", reply
        except BaseException:
            self.ws.close()
            self.ws = None
            raise

    async def one_answer(self, reply_id: str | None) -> None:
        chunks: list[str] = []
        while True:
            message = await read_json(self.ws)
            assert message.get("id") == reply_id, (message, reply_id)
            if message["type"] == "chunk":
                chunks.append(message["text"])
                continue
            assert message["type"] in FINAL_TYPES, message
            if message["type"] == "error":
                assert not chunks, message
                check_error(message["message"], self.markers)
            else:
                assert isinstance(message["text"], str) and "".join(chunks) == message["text"]
                assert message["usage"]["completion_tokens"] <= 2 * len(message["choices"])
            return


async def answered_over_rest(jp_fetch: Callable, body: bytes, markers: tuple[str, ...]) -> None:
    try:
        response = await jp_fetch("codellama", "complete", method="POST", body=body)
    except HTTPClientError as error:
        assert error.code in (400, 413, 503), (error.code, body[:200])
        check_error(json.loads(error.response.body)["error"], markers)
        return
    assert isinstance(json.loads(response.body)["text"], str)


async def assert_responsive(jp_fetch: Callable) -> None:
    assert json.loads((await jp_fetch("api", "status")).body)["started"]
    assert json.loads((await jp_fetch("codellama", "status")).body)["state"] == "ready"


async def test_generated_messages_each_get_one_clear_answer(
    jp_fetch, jp_ws_fetch, jp_serverapp, fim_checkpoint
):
    await wait_state(jp_fetch)
    loop = asyncio.get_running_loop()
    markers = server_markers(fim_checkpoint)
    socket = Socket(lambda: jp_ws_fetch("codellama", "ws"), markers)
    rest_sent = 0

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=300)

    def fixed(examples: int) -> settings:
        return settings(
            max_examples=examples, derandomize=True, database=None, deadline=None,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip

    @fixed(WS_EXAMPLES)
    @given(st.lists(FRAMES, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
    def over_websocket(frames: list[tuple[bool, str | bytes]]) -> None:
        run(socket.exchange(frames))
        if socket.sent % 400 < FRAMES_PER_EXAMPLE:
            run(assert_responsive(jp_fetch))

    @fixed(REST_EXAMPLES)
    @given(FRAMES)
    def over_rest(frame: tuple[bool, str | bytes]) -> None:
        nonlocal rest_sent
        _, payload = frame
        run(
            answered_over_rest(jp_fetch, payload if isinstance(payload, bytes) else payload.encode(), markers)
        )
        rest_sent += 1

    await asyncio.to_thread(over_rest)
    await asyncio.to_thread(over_websocket)
    await assert_responsive(jp_fetch)
    sent = socket.sent + rest_sent
    assert sent >= 10_000

    frames = socket.frames[:REPLAYED]
    before = rss_bytes()
    for start in range(0, len(frames), FRAMES_PER_EXAMPLE):
        await socket.exchange(frames[start : start + FRAMES_PER_EXAMPLE])
    grown = rss_bytes() - before
    print(f"\nfuzzed {sent} messages ({sent - rest_sent} websocket, {rest_sent} REST); replaying "
          f"{len(frames)} of them grew the process by {grown / MiB:.1f} MiB")  # fmt: skip
    assert grown < 16 * MiB
    # The same socket still works, and the service holds nothing from the run.
    await socket.ws.write_message(complete("last", prefix="x = "))
    assert (await final_reply(socket.ws, "last"))[1]["type"] == "done"
    assert service(jp_serverapp).current is None and service(jp_serverapp).status()["queued"] == 0


def notebook_message(request_id: str, cells: list[dict], cell: int, offset: int) -> str:
    return complete(request_id, notebook={"cells": cells}, cell=cell, offset=offset)


async def test_monstrous_messages_get_clear_errors_or_bounded_work(jp_fetch, jp_ws_fetch, fim_checkpoint):
    """Sizes the limits exist for: 10 MB, 10,000 cells, deep nesting, huge numbers, megabyte lines."""
    await wait_state(jp_fetch)
    markers = server_markers(fim_checkpoint)
    ws = await jp_ws_fetch("codellama", "ws")
    line = "values = compute(values, 12345) + other_values * 2 "
    big_cell = {"cell_type": "code", "source": (line + "\n") * 200}  # 10 kB
    long_line = line * 30_000  # 1.5 MB without a newline: the context builder must not tokenize it all
    cases: list[tuple[str | bytes, str]] = [
        (notebook_message("10MB", [big_cell] * 1000, 0, 0), "larger than the limit of 4,194,304 bytes"),
        (notebook_message("10k", [{"cell_type": "raw", "source": "x"}] * 10_000, 0, 0), "10,000 cells; the limit is 5,000"),
        (notebook_message("chars", [big_cell] * 300, 0, 0), "characters of text; the limit is 2,000,000"),
        (nested(200_000, "[", "]"), "not valid JSON"),
        ('{"type": "complete", "id": "num", "prefix": "", "max_new_tokens": 1' + "0" * 5000 + "}", "not valid JSON"),
        (complete("inf", prefix="", max_new_tokens=float("inf")), "'max_new_tokens' must be a whole number"),
        (complete("nan", prefix="", temperature=float("nan")), "'temperature' must be a number"),
        (complete("neg", prefix="", n=-(2**70)), "'n' must be between"),
        (complete("sur", prefix="a\ud800b"), "unpaired UTF-16 surrogate"),
        (complete("nbsur", notebook={"cells": [{"cell_type": "code", "source": "\udfff"}]}, cell=0, offset=0), "surrogate"),
        (complete("type", notebook={"cells": [{"cell_type": "x" * 1_000_000, "source": ""}]}, cell=0, offset=0), "cell_type a string"),
        (complete("whole", prefix=long_line, infill=False), "characters; this server's window leaves room"),
    ]  # fmt: skip
    for raw, fragment in cases:
        await ws.write_message(raw)
        reply = await read_json(ws)
        assert reply["type"] == "error" and fragment in reply["message"], (reply, fragment)
        check_error(reply["message"], markers)
        if raw is cases[0][0]:
            assert reply["id"] == "10MB"  # refused unread, yet answered: the client's request settles
    work: list[tuple[str, str]] = [
        ("4000", notebook_message("4000", [big_cell] * 3 + [{"cell_type": "code", "source": f"v{i} = {i}"} for i in range(4000)], 4002, 3)),
        ("line", notebook_message("line", [{"cell_type": "code", "source": long_line}], 0, len(long_line) // 2)),
        ("plain", complete("plain", prefix=long_line, suffix=long_line)),
        ("nul", complete("nul", prefix="a = '\x00'\nb = ", suffix="\x00")),
    ]  # fmt: skip
    for request_id, raw in work:
        await ws.write_message(raw)
        _, final = await final_reply(ws, request_id, timeout=120)
        assert final["type"] == "done", final
        assert final["usage"]["prompt_tokens"] <= 4096
    # REST refuses the same way (413 for size).
    for raw, code in [(cases[0][0], 413), (cases[1][0], 400), (cases[3][0], 400)]:
        with pytest.raises(HTTPClientError) as error:
            await jp_fetch("codellama", "complete", method="POST", body=raw)
        assert error.value.code == code
        check_error(json.loads(error.value.response.body)["error"], markers)
    ws.close()


async def test_frames_no_protocol_can_read_close_only_their_socket(jp_fetch, jp_ws_fetch):
    """Beyond 4x the size limit tornado refuses to buffer (close 1009); invalid UTF-8 in a text frame
    must fail the connection (RFC 6455). Either way only that socket ends, and the server answers on."""
    await wait_state(jp_fetch)
    bystander = await jp_ws_fetch("codellama", "ws")
    for payload in [b"x" * (17 * MiB), b'{"type": "complete", "id": "\xff\xfe"}']:
        ws = await jp_ws_fetch("codellama", "ws")
        with contextlib.suppress(WebSocketClosedError):  # closed while the client still writes
            await ws.write_message(payload, binary=False)
        assert await asyncio.wait_for(ws.read_message(), 60) is None  # closed
        await bystander.write_message(complete("after", prefix="y = "))
        assert (await final_reply(bystander, "after"))[1]["type"] == "done"
    await assert_responsive(jp_fetch)
    bystander.close()
