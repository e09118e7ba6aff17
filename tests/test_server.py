"""The server extension in a real Jupyter server holding a small random-weight model: REST, websocket, auth."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from tornado.httpclient import HTTPClientError

pytest_plugins = ["pytest_jupyter.jupyter_server"]

NOTEBOOK = {
    "cells": [
        {"cell_type": "markdown", "source": "# Cleaning the data"},
        {"cell_type": "code", "source": "import pandas as pd\ndf = pd.read_csv('data.csv')"},
        {"cell_type": "code", "source": "def clean(frame):\n    \n    return frame"},
        {"cell_type": "code", "source": "clean(df).head()"},
    ]
}


@pytest.fixture
def jp_server_config(fim_checkpoint):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_codellama": True}},
        "CodeLlamaExtension": {
            "model": str(fim_checkpoint),
            "max_new_tokens": 2048,
            "request_timeout": 120.0,
        },
    }


async def wait_ready(jp_fetch) -> dict:
    """The extension's status once the model has loaded."""
    for _ in range(600):
        status = json.loads((await jp_fetch("codellama", "status")).body)
        if status["state"] != "loading":
            break
        await asyncio.sleep(0.05)
    assert status["state"] == "ready", status
    return status


def service(jp_serverapp):
    return jp_serverapp.web_app.settings["codellama_service"]


async def post(jp_fetch, body: dict, **kwargs):
    response = await jp_fetch("codellama", "complete", method="POST", body=json.dumps(body), **kwargs)
    return json.loads(response.body)


async def receive_until_final(ws, request_id: str) -> tuple[list[str], dict]:
    chunks = []
    while True:
        message = json.loads(await ws.read_message())
        if message["id"] != request_id:
            continue
        if message["type"] == "chunk":
            chunks.append(message["text"])
        else:
            return chunks, message


async def test_status_reports_the_model(jp_fetch):
    ready = await wait_ready(jp_fetch)
    assert ready["model"]["supports_infilling"] is True
    assert ready["model"]["device"] == "cpu" and ready["model"]["dtype"] == "float32"
    assert ready["model"]["quant"] is None
    assert ready["model"]["max_context"] == 4096 and ready["error"] is None


async def test_rest_completion_plain_and_notebook(jp_fetch):
    await wait_ready(jp_fetch)
    plain = await post(jp_fetch, {"prefix": "def add(a, b):\n    ", "suffix": "\n", "max_new_tokens": 8})
    assert isinstance(plain["text"], str) and plain["choices"][0] == plain["text"]
    assert plain["usage"]["completion_tokens"] <= 8 and plain["usage"]["prompt_tokens"] > 5
    assert set(plain["timings"]) == {"queue_ms", "prefill_ms", "decode_ms"}
    offset = NOTEBOOK["cells"][2]["source"].index("\n    ") + 5
    nb = await post(
        jp_fetch, {"notebook": NOTEBOOK, "cell": 2, "offset": offset, "max_new_tokens": 8, "n": 2}
    )
    assert 1 <= len(nb["choices"]) <= 2 and nb["text"] == nb["choices"][0]


async def test_candidates_above_the_servers_ceiling_are_clamped_not_refused(jp_fetch):
    """The frontend's candidate count is its own setting; a server configured lower still answers."""
    await wait_ready(jp_fetch)
    reply = await post(jp_fetch, {"prefix": "x = ", "max_new_tokens": 2, "n": 99, "temperature": 0.8})
    assert 1 <= len(reply["choices"]) <= 4  # max_candidates' default


async def test_bad_requests_get_one_clear_sentence(jp_fetch):
    await wait_ready(jp_fetch)
    for body, fragment in [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"suffix": "x"}, "needs either"),
        ({"prefix": 3}, "'prefix' must be a string"),
        ({"prefix": "x", "max_new_tokens": -1}, "max_new_tokens"),
        ({"prefix": "x", "mode": "paragraph"}, "'mode' must be one of"),
        ({"notebook": NOTEBOOK, "cell": 9, "offset": 0}, "'cell' must be between"),
        ({"notebook": {"cells": []}, "cell": 0, "offset": 0}, "the notebook has no cells"),
        ({"prefix": "[INST] " + "word " * 5000, "infill": False}, "window leaves room"),
    ]:
        with pytest.raises(HTTPClientError) as error:
            await jp_fetch(
                "codellama",
                "complete",
                method="POST",
                body=body if isinstance(body, str) else json.dumps(body),
            )
        assert error.value.code == 400
        reply = json.loads(error.value.response.body)
        assert fragment in reply["error"] and "Traceback" not in reply["error"]


async def test_websocket_chunks_add_up_to_done(jp_fetch, jp_ws_fetch):
    await wait_ready(jp_fetch)
    ws = await jp_ws_fetch("codellama", "ws")
    request = {"type": "complete", "id": "r1", "prefix": "import os\n", "suffix": "", "max_new_tokens": 24}
    await ws.write_message(json.dumps({**request, "mode": "none"}))
    chunks, final = await receive_until_final(ws, "r1")
    assert final["type"] == "done" and "cancelled" not in final
    assert final["finish_reason"] in ("end", "length")  # "mode" none has no line/block rule
    assert "".join(chunks) == final["text"]
    ws.close()


async def test_cancel_stops_generation_on_the_server(jp_fetch, jp_ws_fetch, jp_serverapp):
    await wait_ready(jp_fetch)
    ws = await jp_ws_fetch("codellama", "ws")
    long = {
        "type": "complete",
        "id": "long",
        "prefix": "x = [",
        "suffix": "",
        "mode": "none",
        "max_new_tokens": 2048,
    }
    await ws.write_message(json.dumps(long))
    await wait_until(lambda: service(jp_serverapp).current is not None)
    await ws.write_message(json.dumps({"type": "cancel", "id": "long"}))
    _, final = await receive_until_final(ws, "long")
    assert final["type"] == "done" and final["cancelled"] is True and final["finish_reason"] == "cancelled"
    assert final["usage"]["completion_tokens"] < 2048
    await wait_until(lambda: service(jp_serverapp).current is None)  # the worker is free again
    ws.close()


async def test_newer_request_for_the_same_cell_supersedes(jp_fetch, jp_ws_fetch, jp_serverapp):
    await wait_ready(jp_fetch)
    ws = await jp_ws_fetch("codellama", "ws")
    base = {"type": "complete", "notebook": NOTEBOOK, "cell": 3, "offset": 5, "mode": "none"}
    await ws.write_message(json.dumps({**base, "id": "old", "max_new_tokens": 2048}))
    await wait_until(lambda: service(jp_serverapp).current is not None)
    await ws.write_message(json.dumps({**base, "id": "new", "offset": 6, "max_new_tokens": 4}))
    _, old = await receive_until_final(ws, "old")
    assert old["cancelled"] is True and old["usage"]["completion_tokens"] < 2048
    assert old["finish_reason"] == "cancelled"
    _, new = await receive_until_final(ws, "new")
    assert new["type"] == "done" and "cancelled" not in new
    ws.close()


async def test_malformed_messages_keep_the_socket_open(jp_fetch, jp_ws_fetch):
    await wait_ready(jp_fetch)
    ws = await jp_ws_fetch("codellama", "ws")
    for raw in ["{", "[]", json.dumps({"type": "dance", "id": "a"}), json.dumps({"type": "complete", "id": 5}),
                json.dumps({"type": "complete", "id": "b", "prefix": None})]:  # fmt: skip
        await ws.write_message(raw)
        reply = json.loads(await ws.read_message())
        assert reply["type"] == "error" and reply["message"]
    await ws.write_message(
        json.dumps({"type": "complete", "id": "ok", "prefix": "a = ", "max_new_tokens": 2})
    )
    _, final = await receive_until_final(ws, "ok")
    assert final["type"] == "done"
    ws.close()


async def test_prefix_reuse_runs_fewer_prompt_tokens(jp_fetch):
    await wait_ready(jp_fetch)
    notebook_text = "import numpy as np\n" + "values = np.arange(10)\nprint(values.mean())\n" * 30
    first = await post(jp_fetch, {"prefix": notebook_text + "total = ", "suffix": "\n", "max_new_tokens": 4})
    second = await post(
        jp_fetch, {"prefix": notebook_text + "total = v", "suffix": "\n", "max_new_tokens": 4}
    )
    assert second["usage"]["cached_tokens"] > 0.9 * second["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens"] > 300


async def test_unauthenticated_requests_are_refused(jp_fetch, jp_ws_fetch):
    await wait_ready(jp_fetch)
    for parts, kwargs in [
        (("codellama", "status"), {}),
        (("codellama", "complete"), {"method": "POST", "body": json.dumps({"prefix": "x"})}),
    ]:
        with pytest.raises(HTTPClientError) as error:
            await jp_fetch(*parts, headers={"Authorization": ""}, **kwargs)
        assert error.value.code == 403
    with pytest.raises(HTTPClientError) as error:
        await jp_ws_fetch("codellama", "ws", headers={"Authorization": ""})
    assert error.value.code == 403


async def test_kernel_key_is_an_alternative_credential(jp_fetch):
    await wait_ready(jp_fetch)
    key = os.environ["JUPYTER_CODELLAMA_KEY"]
    assert os.environ["JUPYTER_CODELLAMA_URL"].startswith("http://127.0.0.1:")
    status = await jp_fetch("codellama", "status", headers={"Authorization": "", "X-CodeLlama-Key": key})
    assert json.loads(status.body)["state"] == "ready"
    reply = await post(jp_fetch, {"prefix": "y = ", "max_new_tokens": 2},
                       headers={"Authorization": "", "X-CodeLlama-Key": key})  # fmt: skip
    assert "text" in reply
    with pytest.raises(HTTPClientError) as error:
        await jp_fetch("codellama", "status", headers={"Authorization": "", "X-CodeLlama-Key": key + "x"})
    assert error.value.code == 403


async def wait_until(condition, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_cancel_reaches_a_request_of_another_socket(jp_fetch, jp_ws_fetch, jp_serverapp):
    await wait_ready(jp_fetch)
    kernel_socket, browser_socket = await jp_ws_fetch("codellama", "ws"), await jp_ws_fetch("codellama", "ws")
    long = {"type": "complete", "id": "magic-7f3a", "prefix": "x = [", "mode": "none", "max_new_tokens": 2048}
    await kernel_socket.write_message(json.dumps(long))
    await wait_until(lambda: service(jp_serverapp).current is not None)
    await browser_socket.write_message(json.dumps({"type": "cancel", "id": "magic-7f3a"}))
    _, final = await receive_until_final(kernel_socket, "magic-7f3a")
    assert final["type"] == "done" and final["cancelled"] is True
    kernel_socket.close()
    browser_socket.close()


async def test_requests_for_different_client_targets_do_not_supersede(jp_fetch, jp_ws_fetch):
    await wait_ready(jp_fetch)
    ws = await jp_ws_fetch("codellama", "ws")
    base = {
        "type": "complete",
        "notebook": NOTEBOOK,
        "cell": 3,
        "offset": 5,
        "mode": "none",
        "max_new_tokens": 3,
    }
    await ws.write_message(json.dumps({**base, "id": "a", "target": "one.ipynb#c3"}))
    await ws.write_message(json.dumps({**base, "id": "b", "target": "two.ipynb#c3"}))
    for request_id in ("a", "b"):
        _, final = await receive_until_final(ws, request_id)
        assert final["type"] == "done" and "cancelled" not in final
    ws.close()
