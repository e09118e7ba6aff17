"""Faults through a real server: failing, out-of-memory, crawling and hung generations, bad checkpoints,
clients that leave mid-stream, and more requests than the model can take.

The model is never mocked: faults are injected by wrapping the real engine's `stream` (failing after
real tokens, or replacing it with one that crawls or hangs), the way a CUDA error or a stuck driver
would surface. Nothing here asserts a duration; waits are only bounded so a regression fails.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from server_helpers import complete, final_reply, read_json, server_config, service, wait_state, wait_until
from tornado.httpclient import HTTPClientError

from jupyter_codellama.engines import StreamStats

pytest_plugins = ["pytest_jupyter.jupyter_server"]

LONG = {"prefix": "x = [", "suffix": "", "mode": "none"}  # random weights: no natural end
FAILED = "the model failed on this request; the server log has the details"


@pytest.fixture
def jp_server_config(fim_checkpoint):
    return server_config(fim_checkpoint, max_new_tokens=512, request_timeout=120.0)


class Injected:
    """The real stream, with `before(index)` run before each of its deltas is passed on."""

    def __init__(self, real: Any, before: Callable[[int], None]) -> None:
        self.real = real
        self.before = before

    def __iter__(self) -> Iterator[str]:
        for index, delta in enumerate(self.real):
            self.before(index)
            yield delta

    def close(self) -> None:
        self.real.close()

    @property
    def stats(self) -> StreamStats:
        return self.real.stats


class Crawling:
    """An engine that keeps producing text, slowly, and ignores both cancel and deadline."""

    stats = StreamStats()

    def __iter__(self) -> Iterator[str]:
        while True:
            time.sleep(0.05)
            yield "x"

    def close(self) -> None:
        pass


class Hung:
    """An engine stuck inside a call (a driver, a socket) until `release` is set."""

    stats = StreamStats()

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def __iter__(self) -> Iterator[str]:
        self.release.wait(300)
        yield from ()

    def close(self) -> None:
        pass


def inject(jp_serverapp: Any, make: Callable[..., Any]) -> Callable[[], None]:
    """Replace the engine's stream with make(real_stream, *args, **kwargs); returns the undo."""
    engine = service(jp_serverapp).engine
    real = engine.stream
    engine.stream = lambda *args, **kwargs: make(real, *args, **kwargs)
    return lambda: setattr(engine, "stream", real)


def fail_after(count: int, error: BaseException) -> Callable[..., Any]:
    def before(index: int) -> None:
        if index >= count:
            raise error

    return lambda real, *args, **kwargs: Injected(real(*args, **kwargs), before)


async def still_works(ws: Any, request_id: str = "next") -> None:
    await ws.write_message(complete(request_id, prefix="def f():\n    ", max_new_tokens=4))
    _, final = await final_reply(ws, request_id)
    assert final["type"] == "done", final


async def test_an_exception_mid_generation_fails_that_request_only(jp_fetch, jp_ws_fetch, jp_serverapp):
    await wait_state(jp_fetch)
    ws = await jp_ws_fetch("codellama", "ws")
    undo = inject(jp_serverapp, fail_after(3, RuntimeError("injected failure in /secret/path/model.py")))
    try:
        await ws.write_message(complete("boom", max_new_tokens=64, **LONG))
        _, final = await final_reply(ws, "boom")
        assert final == {"type": "error", "id": "boom", "message": FAILED}
        with pytest.raises(HTTPClientError) as error:
            await jp_fetch(
                "codellama", "complete", method="POST", body=json.dumps({**LONG, "max_new_tokens": 64})
            )
        assert error.value.code == 500 and json.loads(error.value.response.body) == {"error": FAILED}
    finally:
        undo()
    # The failed generation was closed (it held the model's lock) and the worker lives on.
    await still_works(ws)
    ws.close()


async def test_out_of_memory_mid_generation_is_reported_and_recovered(jp_fetch, jp_ws_fetch, jp_serverapp):
    await wait_state(jp_fetch)
    engine = service(jp_serverapp).engine
    ws = await jp_ws_fetch("codellama", "ws")
    await still_works(ws, "warm")
    assert engine.model.prefix_cache._entries  # something cached, to be dropped
    oom = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)"
    )
    undo = inject(jp_serverapp, fail_after(2, oom))
    try:
        await ws.write_message(complete("oom", max_new_tokens=64, **LONG))
        _, final = await final_reply(ws, "oom")
    finally:
        undo()
    assert final["type"] == "error" and "ran out of memory" in final["message"]
    assert "Tried to allocate" not in final["message"]
    assert not engine.model.prefix_cache._entries  # reset: the next request starts clean
    await still_works(ws)
    ws.close()


class TestDeadlines:
    @pytest.fixture
    def jp_server_config(self, fim_checkpoint):
        return server_config(fim_checkpoint, max_new_tokens=512, request_timeout=2.0)

    async def test_a_crawling_generation_is_ended_by_its_deadline(self, jp_fetch, jp_ws_fetch, jp_serverapp):
        await wait_state(jp_fetch)
        ws = await jp_ws_fetch("codellama", "ws")
        undo = inject(jp_serverapp, lambda real, *args, **kwargs: Crawling())
        try:
            await ws.write_message(complete("crawl", **LONG))
            chunks, final = await final_reply(ws, "crawl")
        finally:
            undo()
        assert final["type"] == "done" and final["text"] == "".join(chunks) and chunks
        await wait_until(lambda: service(jp_serverapp).current is None)
        await still_works(ws)
        ws.close()

    async def test_a_hung_generation_is_answered_and_the_worker_recovers(
        self, jp_fetch, jp_ws_fetch, jp_serverapp
    ):
        await wait_state(jp_fetch)
        ws = await jp_ws_fetch("codellama", "ws")
        release = threading.Event()
        undo = inject(jp_serverapp, lambda real, *args, **kwargs: Hung(release))
        try:
            await ws.write_message(complete("hung", **LONG))
            _, final = await final_reply(ws, "hung")
            assert final["type"] == "error" and "did not answer within 4 seconds" in final["message"]
            # Still stuck: a new request hears so at once instead of queueing behind it.
            await ws.write_message(complete("behind", prefix="y = "))
            _, behind = await final_reply(ws, "behind")
            assert behind["type"] == "error" and "stopped answering" in behind["message"]
            assert json.loads((await jp_fetch("api", "status")).body)["started"]  # Jupyter is fine
        finally:
            undo()
            release.set()
        await wait_until(lambda: service(jp_serverapp).current is None)
        await still_works(ws)
        ws.close()


class TestBadCheckpoints:
    @pytest.fixture(params=["missing", "corrupt weights", "corrupt params"])
    def jp_server_config(self, request, fim_checkpoint, tmp_path_factory):
        folder = tmp_path_factory.mktemp("bad") / "checkpoint"
        if request.param != "missing":
            shutil.copytree(fim_checkpoint, folder)
            if request.param == "corrupt weights":
                weights = folder / "consolidated.00.pth"
                weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            else:
                (folder / "params.json").write_text('{"dim": 64, "n_layers": ')
        return server_config(folder)

    async def test_the_status_says_why_and_the_server_runs_on(self, jp_fetch, jp_ws_fetch, request):
        status = await wait_state(jp_fetch, "error")
        assert status["error"] and "Traceback" not in status["error"]
        if "missing" in request.node.name:
            assert "not found" in status["error"]
        with pytest.raises(HTTPClientError) as error:
            await jp_fetch("codellama", "complete", method="POST", body=json.dumps({"prefix": "x"}))
        assert (
            error.value.code == 503
            and "could not be loaded" in json.loads(error.value.response.body)["error"]
        )
        ws = await jp_ws_fetch("codellama", "ws")
        await ws.write_message(complete("x", prefix="x"))
        reply = await read_json(ws)
        assert reply["type"] == "error" and "could not be loaded" in reply["message"]
        ws.close()
        # The rest of the Jupyter server is untouched.
        assert json.loads((await jp_fetch("api", "status")).body)["started"]
        assert (await jp_fetch("api", "contents")).code == 200


def observe(jp_serverapp: Any) -> tuple[list[Any], list[weakref.ref], Callable[[], None]]:
    """The real streams the engine makes and weak references to the jobs submitted.

    The streams are slowed a little (a slow engine), so that a client surely leaves mid-stream.
    """
    svc = service(jp_serverapp)
    streams: list[Any] = []
    jobs: list[weakref.ref] = []
    real_stream, real_submit = svc.engine.stream, svc.submit

    def stream(*args: Any, **kwargs: Any) -> Any:
        made = real_stream(*args, **kwargs)
        streams.append(made)
        return Injected(made, lambda index: time.sleep(0.01))

    def submit(job: Any) -> None:
        jobs.append(weakref.ref(job))
        real_submit(job)

    svc.engine.stream, svc.submit = stream, submit

    def undo() -> None:
        svc.engine.stream, svc.submit = real_stream, real_submit

    return streams, jobs, undo


def freed(jobs: list[weakref.ref]) -> Callable[[], bool]:
    def check() -> bool:
        gc.collect()
        return bool(jobs) and all(job() is None for job in jobs)

    return check


async def stopped_early(svc: Any, stream: Any, max_new_tokens: int) -> None:
    """The worker is free again and the generation ended before its token limit."""
    await wait_until(lambda: svc.current is None)
    result = stream.generation.result
    # Stopped by the cancel flag, by the engine ("cancelled") or by the service between deltas.
    assert result.finish_reason in ("cancelled", "closed") and result.completion_tokens < max_new_tokens


async def test_a_client_leaving_mid_stream_stops_its_generation(jp_fetch, jp_ws_fetch, jp_serverapp):
    await wait_state(jp_fetch)
    svc = service(jp_serverapp)
    streams, jobs, undo = observe(jp_serverapp)
    try:
        ws = await jp_ws_fetch("codellama", "ws")
        await ws.write_message(complete("leaving", max_new_tokens=512, **LONG))
        first = await read_json(ws)
        assert first["type"] == "chunk"
        ws.close()  # mid-stream
        await stopped_early(svc, streams[0], max_new_tokens=512)
    finally:
        undo()
    # Nothing of the connection is kept: its job is gone, the cache within its slots.
    await wait_until(freed(jobs))
    cache = svc.engine.model.prefix_cache
    assert len(cache._entries) <= cache.slots


async def test_a_rest_client_leaving_stops_its_generation(jp_fetch, jp_serverapp, jp_http_port, jp_base_url):
    await wait_state(jp_fetch)
    svc = service(jp_serverapp)
    streams, jobs, undo = observe(jp_serverapp)
    body = json.dumps({**LONG, "max_new_tokens": 512}).encode()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", jp_http_port)
        writer.write(
            f"POST {jp_base_url}codellama/complete HTTP/1.1\r\nHost: 127.0.0.1:{jp_http_port}\r\n"
            f"Authorization: token {jp_serverapp.identity_provider.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await wait_until(lambda: bool(streams) and streams[0].generation.result.completion_tokens > 0)
        writer.close()  # the client gives up mid-generation
        await stopped_early(svc, streams[0], max_new_tokens=512)
    finally:
        undo()
    await wait_until(freed(jobs))


class TestOverload:
    @pytest.fixture
    def jp_server_config(self, fim_checkpoint):
        return server_config(fim_checkpoint, max_new_tokens=8, queue_size=1, max_requests_per_connection=2)

    async def test_more_requests_than_room_are_told_busy(self, jp_fetch, jp_ws_fetch, jp_serverapp):
        await wait_state(jp_fetch)
        svc = service(jp_serverapp)
        gate = threading.Event()

        def held(real: Any, *args: Any, **kwargs: Any) -> Injected:
            return Injected(real(*args, **kwargs), lambda index: gate.wait(300))

        undo = inject(jp_serverapp, held)
        tab, other_tab = await jp_ws_fetch("codellama", "ws"), await jp_ws_fetch("codellama", "ws")
        notebook = {
            "cells": [{"cell_type": "code", "source": "a = 1"}, {"cell_type": "code", "source": "b = 2"}]
        }
        try:
            await tab.write_message(complete("running", max_new_tokens=10**9, **LONG))
            await wait_until(lambda: svc.current is not None)  # on the worker, held at its first token
            await tab.write_message(complete("queued", notebook=notebook, cell=0, offset=5))
            await wait_until(lambda: svc.status()["queued"] == 1)
            await tab.write_message(complete("third", notebook=notebook, cell=1, offset=5))
            _, third = await final_reply(tab, "third")
            assert third["busy"] is True and "at most 2 requests" in third["message"]
            await other_tab.write_message(complete("other", prefix="z = "))
            _, other = await final_reply(other_tab, "other")
            assert other["busy"] is True and "busy" in other["message"]
            with pytest.raises(HTTPClientError) as error:
                await jp_fetch("codellama", "complete", method="POST", body=json.dumps({"prefix": "r = "}))
            assert error.value.code == 503
        finally:
            gate.set()
            undo()
        _, running = await final_reply(tab, "running")
        _, queued = await final_reply(tab, "queued")
        assert running["type"] == queued["type"] == "done"
        assert running["usage"]["completion_tokens"] <= 8  # a billion asked, the ceiling given
        await still_works(other_tab)
        tab.close()
        other_tab.close()
