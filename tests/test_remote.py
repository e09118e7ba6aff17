"""The `openai` backend: the server extension on a real llama.cpp server (llama-cpp-python) serving our GGUF.

The protocol tests of test_server.py run here again, unchanged, on the remote backend: pytest
collects the imported test functions in this module, where `jp_server_config` points the extension
at the llama.cpp subprocess.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server import (  # noqa: F401 — collected here, run against the remote backend
    NOTEBOOK,
    post,
    receive_until_final,
    service,
    test_bad_requests_get_one_clear_sentence,
    test_cancel_stops_generation_on_the_server,
    test_kernel_key_is_an_alternative_credential,
    test_malformed_messages_keep_the_socket_open,
    test_newer_request_for_the_same_cell_supersedes,
    test_rest_completion_plain_and_notebook,
    test_unauthenticated_requests_are_refused,
    test_websocket_chunks_add_up_to_done,
    wait_ready,
    wait_until,
)
from tornado.httpclient import HTTPClientError

from jupyter_codellama.estimate import estimate_tokens
from jupyter_codellama.postprocess import was_cut_off
from jupyter_codellama.remote import (
    Healer,
    OpenAIEngine,
    RemoteConfig,
    _error_message,
    fim_prompt,
    heal_whitespace,
    local_finish_reason,
    split_url,
    sse_events,
)
from kernel_model import ModelError, SamplingParams

pytest_plugins = ["pytest_jupyter.jupyter_server"]

API_KEY = "sk-test-4f1d0c9a7b"  # the llama.cpp server's key: must never reach the browser
KEY_VAR = "CODELLAMA_TEST_REMOTE_KEY"
ALIAS = "codellama-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fim_gguf(fim_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from kernel_model.gguf import export_gguf

    out = tmp_path_factory.mktemp("remote-gguf") / "fim-f32.gguf"
    export_gguf(fim_checkpoint, out, "f32")
    return out


class LlamaServer:
    """`python -m llama_cpp.server` on a loopback port, its output in a log file."""

    def __init__(self, model: Path, log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        command = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", ALIAS,
            "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "2",
            "--logits_all", "False", "--api_key", API_KEY,
        ]  # fmt: skip
        # Unbuffered: the tests read the server's "disconnected" line as it happens.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 180.0) -> LlamaServer:
        request = urllib.request.Request(self.url + "/models", headers={"Authorization": f"Bearer {API_KEY}"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"llama_cpp.server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise AssertionError(f"llama_cpp.server did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def llama_server(fim_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")
    server = LlamaServer(fim_gguf, tmp_path_factory.mktemp("llama-log") / "server.log")
    try:
        yield server.wait()
    finally:
        server.stop()


def remote_config(url: str, **overrides) -> dict:
    settings = {
        "backend": "openai",
        "remote_url": url,
        "remote_api_key_env": KEY_VAR,
        "max_new_tokens": 2048,
        "request_timeout": 120.0,
    }
    return {"ServerApp": {"jpserver_extensions": {"jupyter_codellama": True}},
            "CodeLlamaExtension": settings | overrides}  # fmt: skip


def remote(url: str | None = None, url_fixture: str = "llama_server", key: str = API_KEY, **settings):
    """This test's remote: a fixed URL, or the one a fixture serves; its key; extension settings."""

    def mark(test):
        test.remote = {"url": url, "url_fixture": url_fixture, "key": key, "settings": settings}
        return test

    return mark


@pytest.fixture
def jp_server_config(request, monkeypatch, fim_checkpoint: Path):
    setup = getattr(request.function, "remote", None) or {
        "url": None, "url_fixture": "llama_server", "key": API_KEY,
        "settings": {"remote_tokenizer": str(fim_checkpoint / "tokenizer.model")},
    }  # fmt: skip
    monkeypatch.setenv(KEY_VAR, setup["key"])
    url = setup["url"]
    if url is None:
        served = request.getfixturevalue(setup["url_fixture"])
        url = served if isinstance(served, str) else served.url
    return remote_config(url, **setup["settings"])


async def wait_status(jp_fetch, state: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads((await jp_fetch("codellama", "status")).body)
        if status["state"] == state or time.monotonic() > deadline:
            assert status["state"] == state, status
            return status
        await asyncio.sleep(0.1)


# -- against the real llama.cpp server ------------------------------------------------------------------


async def test_status_reports_the_remote_model(jp_fetch) -> None:
    ready = await wait_ready(jp_fetch)
    model = ready["model"]
    assert model["name"] == ALIAS and model["supports_infilling"] is True
    assert model["device"] == "remote" and model["backend"] == "openai"
    assert model["url"].startswith("http://127.0.0.1:") and model["max_context"] == 4096
    assert ready["error"] is None
    assert API_KEY not in json.dumps(ready)


async def test_remote_completions_stream_and_stop(jp_fetch, jp_ws_fetch) -> None:
    await wait_ready(jp_fetch)
    ws = await jp_ws_fetch("codellama", "ws")
    request = {"type": "complete", "id": "fim", "prefix": "def area(r):\n    ", "suffix": "\n",
               "max_new_tokens": 12, "mode": "none"}  # fmt: skip
    await ws.write_message(json.dumps(request))
    chunks, final = await receive_until_final(ws, "fim")
    assert final["type"] == "done" and "".join(chunks) == final["text"]
    assert 0 < final["usage"]["completion_tokens"] <= 12 and final["usage"]["prompt_tokens"] > 5
    assert "<EOT>" not in final["text"] and "<PRE>" not in final["text"]
    ws.close()


async def test_cancel_closes_the_upstream_stream(jp_fetch, jp_ws_fetch, llama_server) -> None:
    await wait_ready(jp_fetch)
    before = llama_server.log.read_text().lower().count("disconnected")
    ws = await jp_ws_fetch("codellama", "ws")
    await ws.write_message(json.dumps({"type": "complete", "id": "c", "prefix": "values = [", "suffix": "",
                                       "mode": "none", "max_new_tokens": 2048}))  # fmt: skip
    first = json.loads(await ws.read_message())
    assert first["type"] == "chunk"
    # Cancel at the first chunk: llama.cpp is then still far from its 2048 tokens.
    await ws.write_message(json.dumps({"type": "cancel", "id": "c"}))
    _, final = await receive_until_final(ws, "c")
    assert final["cancelled"] is True and final["usage"]["completion_tokens"] < 2048
    # llama-cpp-python's server notices the closed connection at its next token and stops generating.
    await wait_until(lambda: llama_server.log.read_text().lower().count("disconnected") > before, timeout=60)
    ws.close()


@remote(key="sk-wrong-0000")
async def test_a_refused_key_is_a_clear_error_status(jp_fetch) -> None:
    status = await wait_status(jp_fetch, "error")
    assert "refused the API key (HTTP 401)" in status["error"]
    assert "sk-wrong-0000" not in json.dumps(status)


# -- unreachable and slow remotes: the Jupyter server stays healthy -------------------------------------

UNREACHABLE_PORT = free_port()


@remote(f"http://127.0.0.1:{UNREACHABLE_PORT}/v1", remote_model=ALIAS, remote_retries=1,
        remote_connect_timeout=1.0)  # fmt: skip
async def test_unreachable_remote_is_an_error_status_then_recovers(
    jp_fetch, jp_ws_fetch, fim_gguf, tmp_path, request
) -> None:
    status = await wait_status(jp_fetch, "error")
    assert "unreachable (connection refused)" in status["error"], status
    assert status["model"]["name"] == ALIAS
    with pytest.raises(HTTPClientError) as error:
        await post(jp_fetch, {"prefix": "x = ", "max_new_tokens": 4})
    assert error.value.code == 503 and "connection refused" in json.loads(error.value.response.body)["error"]
    ws = await jp_ws_fetch("codellama", "ws")
    await ws.write_message(json.dumps({"type": "complete", "id": "u", "prefix": "x = "}))
    _, final = await receive_until_final(ws, "u")
    assert final["type"] == "error" and "unreachable" in final["message"]
    ws.close()
    # The server comes up: the periodic probe notices, and completions work again.
    pytest.importorskip("llama_cpp.server.app")
    server = LlamaServer(fim_gguf, tmp_path / "late.log", port=UNREACHABLE_PORT)
    request.addfinalizer(server.stop)
    server.wait()
    status = await wait_status(jp_fetch, "ready", timeout=60)
    assert status["error"] is None
    reply = await post(jp_fetch, {"prefix": "x = ", "suffix": "\n", "max_new_tokens": 4, "mode": "none"})
    assert reply["usage"]["completion_tokens"] <= 4


class FaultyServer(http.server.ThreadingHTTPServer):
    """A hung or overloaded peer, to test the failure paths; it stands in for a server, never for a model."""

    daemon_threads = True

    def __init__(self, fault: str) -> None:
        # "hung" (never answers), "stall" (one event, then silence), "busy" (503), "late" (headers only
        # once released), "refused" (401), "silent" (a stream closed with nothing in it), "error-line"
        # (llama.cpp's `error:` event), "listing" (models as a JSON list), "ollama" (tagged names)
        self.fault = fault
        self.posts = 0
        self.bodies: list[dict] = []
        self.owner = "faulty-org"  # the model list's `owned_by`
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address) -> None:
        pass  # the client hanging up on a handler is what these tests do

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    server: FaultyServer

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        fault = self.server.fault
        if fault == "hung":
            self.server.release.wait(30)
            return
        if fault == "listing":
            self.reply(200, [{"id": "faulty"}])  # type: ignore[arg-type]
            return
        name = "codellama:latest" if fault == "ollama" else "faulty"
        self.reply(
            200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": self.server.owner}]}
        )

    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.server.posts += 1
        fault = self.server.fault
        if fault == "busy":
            self.reply(503, {"error": {"message": "the queue is full"}})
            return
        if fault == "refused":
            self.reply(401, {"error": {"message": "invalid API key"}})
            return
        if fault == "late" and not self.server.release.wait(30):
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if fault == "silent":
            return
        if fault == "error-line":
            self.wfile.write(
                b'error: {"code": 400, "message": "the request exceeds the available context size"}\n\n'
            )
            self.wfile.write(b"data: [DONE]\n\n")
            return
        self.wfile.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
        self.wfile.flush()
        self.server.release.wait(30)


@pytest.fixture(params=["hung", "stall", "busy"])
def faulty(request) -> Iterator[FaultyServer]:
    server = FaultyServer(request.param)
    yield server
    server.close()


@remote(url_fixture="faulty", remote_read_timeout=1.0, remote_retries=2, remote_connect_timeout=1.0)
async def test_hung_stalled_and_busy_remotes_give_clear_errors(jp_fetch, faulty: FaultyServer) -> None:
    if faulty.fault == "hung":
        status = await wait_status(jp_fetch, "error")
        assert "timed out (waiting for an answer, 1 s)" in status["error"]
        return
    await wait_status(jp_fetch, "ready")
    pending = asyncio.ensure_future(post(jp_fetch, {"prefix": "x = ", "max_new_tokens": 8}))
    # The event loop never waits for the remote: status answers while the request hangs upstream.
    status = json.loads((await jp_fetch("codellama", "status")).body)
    assert status["model"]["name"] == "faulty"
    with pytest.raises(HTTPClientError) as error:
        await pending
    message = json.loads(error.value.response.body)["error"]
    if faulty.fault == "stall":
        # A byte was streamed: no retry, which could repeat text the user already saw.
        assert "the remote stream broke" in message and "timed out" in message and faulty.posts == 1
    else:
        assert "not ready (HTTP 503): the queue is full" in message and faulty.posts == 3
    # The worker frees itself just after it sent the error, on its own thread: give it that moment.
    deadline = time.monotonic() + 10
    while json.loads((await jp_fetch("codellama", "status")).body)["busy"]:
        assert time.monotonic() < deadline, "the worker stayed busy after the failed request"
        await asyncio.sleep(0.05)


def engine_stream(server: FaultyServer, seconds: float = 30.0, **config):
    """The engine on `server` and one request's stream, with its cancel event."""
    engine = OpenAIEngine(RemoteConfig(url=server.url, read_timeout=10.0, **config))
    engine.probe()
    cancel = threading.Event()
    params = SamplingParams(8, 0.0, 1.0, None, (), time.monotonic() + seconds)
    return engine, engine.stream("x = ", "", infill=True, params=params, cancel=cancel), cancel


def test_a_cancel_or_the_deadline_reaches_a_server_that_has_not_answered_yet() -> None:
    server = FaultyServer("late")
    try:
        engine, stream, cancel = engine_stream(server)
        threading.Timer(0.3, cancel.set).start()
        started = time.monotonic()
        assert list(stream) == [] and stream.stats.finish_reason == "cancelled"
        assert time.monotonic() - started < 5  # not when the server would have answered
        engine, stream, _ = engine_stream(server, seconds=0.5)
        assert list(stream) == [] and stream.stats.finish_reason == "deadline"
        assert engine.unavailable is None  # out of time is not the server's failure
    finally:
        server.close()


@pytest.mark.parametrize(
    ("fault", "message"),
    [("silent", "ended the stream without an answer"), ("error-line", "exceeds the available context size"),
     ("refused", "refused the API key")],
)  # fmt: skip
def test_failures_inside_or_before_the_stream_are_errors_not_empty_answers(fault: str, message: str) -> None:
    server = FaultyServer(fault)
    try:
        _, stream, _ = engine_stream(server, retries=2)
        with pytest.raises(ModelError, match=message):
            list(stream)
        assert server.posts == 1  # an answer that failed is not asked again, nor a refused key
    finally:
        server.close()


@pytest.mark.parametrize("owner", ["vllm", "llamacpp"])
def test_an_infilling_request_asks_vllm_for_the_end_of_infill_token_as_text(owner: str) -> None:
    """vLLM drops special tokens' text by default, and HF's tokenizer counts ▁<EOT> as one."""
    server = FaultyServer("silent")
    server.owner = owner
    try:
        _, stream, _ = engine_stream(server)
        with pytest.raises(ModelError):
            list(stream)
        [body] = server.bodies
        assert body["prompt"].startswith("<PRE> <SUF>") and body["stop"][:2] == [" <EOT>", "<EOT>"]
        # Only vLLM knows the field; a strict server would refuse it.
        assert body.get("skip_special_tokens", "absent") is (False if owner == "vllm" else "absent")
    finally:
        server.close()


def test_model_listings_ollama_names_and_odd_json() -> None:
    server = FaultyServer("ollama")
    try:
        engine = OpenAIEngine(RemoteConfig(url=server.url, model="codellama"))
        engine.probe()
        assert engine.unavailable is None and engine.name == "codellama:latest"
    finally:
        server.close()
    server = FaultyServer("listing")
    try:
        engine = OpenAIEngine(RemoteConfig(url=server.url))
        engine.probe()
        assert "not an object" in (engine.unavailable or "")
    finally:
        server.close()


# -- the engine's pieces ---------------------------------------------------------------------------------


def test_urls_prompts_and_estimates() -> None:
    assert split_url("http://gpu:8000/v1") == ("http", "gpu", 8000, "")
    assert split_url("https://gw.example/llm/v1/") == ("https", "gw.example", 443, "/llm")
    assert split_url("http://localhost:11434") == ("http", "localhost", 11434, "")
    for bad in ["gpu:8000", "ftp://gpu/v1", "http://user:pw@gpu/v1", ""]:
        with pytest.raises(ModelError):
            split_url(bad)
    assert fim_prompt("a = ", "\nb", "psm") == "<PRE> a =  <SUF>\nb <MID>"
    assert fim_prompt("a = ", "\nb", "spm") == "<PRE> <SUF>\nb <MID> a = "
    assert estimate_tokens("") == 0


def test_whitespace_healing() -> None:
    assert heal_whitespace("def f():\n    ") == ("def f():\n", "    ")
    assert heal_whitespace("def f():\n    return") == ("def f():\n    return", "")
    assert heal_whitespace("    ") == ("    ", "")  # the first line: nothing before it to back up to
    healer = Healer("    ")
    assert [healer.push(t) for t in ["  ", "  ret", "urn x"]] == ["", "ret", "urn x"]
    other = Healer("    ")
    assert other.push("  pass\n    x") == "pass\n    x"  # the user's indentation stands
    assert Healer("").push("  y") == "  y"


def test_finish_reasons_in_the_local_engines_words() -> None:
    # Only "length" is a cut-off: a block completion that ended otherwise keeps its last line.
    assert local_finish_reason("length", ended=True) == "length"
    for server_reason in ("stop", "eos_token", "stop_sequence", ""):
        assert local_finish_reason(server_reason, ended=True) == "end"
        assert not was_cut_off(local_finish_reason(server_reason, ended=True))
    assert local_finish_reason("", ended=False) == "closed"


def test_sse_parsing_and_error_bodies() -> None:
    class Raw(io.BytesIO):
        pass

    stream = Raw(b': ping\n\ndata: {"a": 1}\n\nevent: x\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n')
    assert list(sse_events(stream)) == ['{"a": 1}', "line1\nline2", "[DONE]"]
    assert _error_message('{"error": {"message": "model not found"}}') == "model not found"
    assert _error_message('{"detail": "Invalid API key"}') == "Invalid API key"
    assert _error_message("Bad Gateway") == "Bad Gateway"


def test_the_key_stays_out_of_reprs_and_messages() -> None:
    config = RemoteConfig(url="http://127.0.0.1:9/v1", api_key=API_KEY)
    assert API_KEY not in repr(config)
    engine = OpenAIEngine(config)
    assert engine.redact(f"echo {API_KEY}!") == "echo ***!"
    assert API_KEY not in json.dumps(engine.describe())
    with pytest.raises(ModelError, match="remote_fim"):
        OpenAIEngine(RemoteConfig(url="http://x/v1", fim="middle"))
    with pytest.raises(ModelError, match="remote_url"):
        OpenAIEngine(RemoteConfig())
    with pytest.raises(ModelError, match="characters an HTTP header cannot carry") as refused:
        OpenAIEngine(RemoteConfig(url="http://x/v1", api_key=API_KEY + " \u00e9"))
    assert API_KEY not in str(refused.value)


def test_extension_settings_reach_the_service_config(monkeypatch) -> None:
    from jupyter_codellama.extension import CodeLlamaExtension

    monkeypatch.setenv("JUPYTER_CODELLAMA_API_KEY", API_KEY)
    extension = CodeLlamaExtension(backend="openai", remote_url="http://gpu:8000/v1", remote_retries=5)
    config = extension.remote_config()
    assert config.api_key == API_KEY and config.retries == 5 and config.url == "http://gpu:8000/v1"
    assert CodeLlamaExtension(remote_api_key="sk-config\n").remote_config().api_key == "sk-config"
    for name, value in [("backend", "tgi"), ("remote_fim", "middle")]:
        with pytest.raises(ValueError, match=name.removeprefix("remote_")):
            CodeLlamaExtension(**{name: value})
