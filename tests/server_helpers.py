"""Helpers for the hardening tests: a real Jupyter server's Code Llama endpoints, waited on and spoken to."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

FINAL_TYPES = ("done", "error")


def server_config(checkpoint: Any, **extension: Any) -> dict[str, Any]:
    """The jp_server_config for a server holding `checkpoint`, with CodeLlamaExtension overrides."""
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_codellama": True}},
        "CodeLlamaExtension": {"model": str(checkpoint), **extension},
    }


def service(jp_serverapp: Any) -> Any:
    return jp_serverapp.web_app.settings["codellama_service"]


async def wait_state(jp_fetch: Callable, state: str = "ready") -> dict:
    """The extension's status once it has left 'loading'; it must then be `state`."""
    for _ in range(1200):
        status = json.loads((await jp_fetch("codellama", "status")).body)
        if status["state"] != "loading":
            break
        await asyncio.sleep(0.05)
    assert status["state"] == state, status
    return status


async def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def read_json(ws: Any, timeout: float = 60.0) -> dict:
    raw = await asyncio.wait_for(ws.read_message(), timeout)
    assert raw is not None, f"the server closed the socket (code {ws.close_code}, {ws.close_reason!r})"
    return json.loads(raw)


async def final_reply(ws: Any, request_id: str | None, timeout: float = 60.0) -> tuple[list[str], dict]:
    """Chunks for `request_id`, then its one final message; messages for other ids are skipped."""
    chunks: list[str] = []
    while True:
        message = await read_json(ws, timeout)
        if message.get("id") != request_id:
            continue
        if message["type"] == "chunk":
            chunks.append(message["text"])
        else:
            return chunks, message


def complete(request_id: str, **fields: Any) -> str:
    return json.dumps({"type": "complete", "id": request_id, **fields})
