"""Access to the Code Llama endpoints of a real Jupyter server: credentials, Origin, XSRF, the kernel key.

Nothing here trusts a mock: each test starts a Jupyter server holding a small random-weight
checkpoint and talks to it over loopback the way a browser, a foreign page or a kernel would.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

import pytest
from server_helpers import complete, final_reply, server_config, service, wait_state
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

import jupyter_codellama
import kernel_model
from kernel_model.checkpoint import read_json

pytest_plugins = ["pytest_jupyter.jupyter_server"]

EVIL = "http://evil.example"
# A refusal is 403, or 404 where the Jupyter server hides an API from a foreign Origin.
REFUSED = (403, 404)
TRUSTED = "https://trusted.example"
NOTEBOOK = {"cells": [{"cell_type": "code", "source": "import os\nvalue = os.getcwd()\nprint(val"}]}


@pytest.fixture
def jp_server_config(request, fim_checkpoint):
    config = server_config(fim_checkpoint, max_new_tokens=4)
    # A CORS pattern, to check that a prefix of it is no way in (CVE-2026-40110).
    config["ServerApp"]["allow_origin_pat"] = r"https://trusted\.example"
    if getattr(request, "param", "default") == "strict":
        config["ServerApp"]["allow_unauthenticated_access"] = False
    return config


def endpoints() -> list[tuple[tuple[str, ...], dict]]:
    return [
        (("codellama", "status"), {}),
        (("codellama", "complete"), {"method": "POST", "body": json.dumps({"prefix": "x = "})}),
    ]


async def refused(fetch, *parts, **kwargs) -> bool:
    with pytest.raises(HTTPClientError) as error:
        await fetch(*parts, **kwargs)
    return error.value.code in REFUSED


# The server's default for allow_unauthenticated_access lets through handlers that do not ask for
# authentication themselves; every Code Llama handler does, so both settings refuse alike.
@pytest.mark.parametrize("jp_server_config", ["default", "strict"], indirect=True)
async def test_missing_or_wrong_credentials_are_refused_everywhere(jp_fetch, jp_ws_fetch, jp_serverapp):
    await wait_state(jp_fetch)
    token = jp_serverapp.identity_provider.token
    key = os.environ["JUPYTER_CODELLAMA_KEY"]
    bad_headers = [
        {"Authorization": ""},
        {"Authorization": "token wrong"},
        {"Authorization": f"token {token}x"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": "", "Origin": EVIL},
        {"Authorization": "", "X-CodeLlama-Key": ""},
        {"Authorization": "", "X-CodeLlama-Key": key[:-1]},
        {"Authorization": "", "X-CodeLlama-Key": key + "x"},
    ]
    completed = service(jp_serverapp).completed
    for headers in bad_headers:
        for parts, kwargs in endpoints():
            assert await refused(jp_fetch, *parts, headers=dict(headers), **kwargs), (parts, headers)
        assert await refused(jp_ws_fetch, "codellama", "ws", headers=dict(headers)), headers
    wrong_query = {"token": "wrong"}
    assert await refused(jp_ws_fetch, "codellama", "ws", headers={"Authorization": ""}, params=wrong_query)
    assert service(jp_serverapp).completed == completed  # nothing reached the model
    # The right token still works, under either setting.
    ws = await jp_ws_fetch("codellama", "ws")
    await ws.write_message(complete("ok", prefix="y = "))
    _, final = await final_reply(ws, "ok")
    assert final["type"] == "done"
    ws.close()


class Browser:
    """A browser that logged in to the server once: it holds the login and XSRF cookies."""

    def __init__(self, port: int, base_url: str) -> None:
        self.http = f"http://localhost:{port}{base_url}"
        self.ws = f"ws://localhost:{port}{base_url}codellama/ws"
        self.same_origin = f"http://localhost:{port}"
        self.cookies: dict[str, str] = {}
        self.client = AsyncHTTPClient()

    def remember(self, response) -> None:
        for header in response.headers.get_list("Set-Cookie"):
            for name, morsel in SimpleCookie(header).items():
                self.cookies[name] = morsel.value

    @property
    def cookie_header(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.cookies.items())

    async def log_in(self, token: str) -> None:
        self.remember(await self.client.fetch(self.http + "login"))
        form = urlencode({"_xsrf": self.cookies["_xsrf"], "password": token})
        response = await self.client.fetch(
            self.http + "login", method="POST", body=form, headers={"Cookie": self.cookie_header},
            follow_redirects=False, raise_error=False,
        )  # fmt: skip
        assert response.code == 302, response.code
        self.remember(response)
        assert any(name.startswith("username-") for name in self.cookies), self.cookies

    async def fetch(self, path: str, origin: str | None, xsrf: bool, **kwargs) -> int:
        headers = {"Cookie": self.cookie_header}
        if origin is not None:
            headers["Origin"] = origin
        if xsrf:
            headers["X-XSRFToken"] = self.cookies["_xsrf"]
        response = await self.client.fetch(self.http + path, headers=headers, raise_error=False, **kwargs)
        return response.code

    async def open_socket(self, origin: str):
        request = HTTPRequest(self.ws, headers={"Cookie": self.cookie_header, "Origin": origin})
        return await websocket_connect(request)


async def test_a_foreign_page_cannot_use_the_users_login(jp_fetch, jp_serverapp, jp_http_port, jp_base_url):
    """The attack the Origin check and XSRF exist for: the user's browser, logged in, on a hostile page.

    Token-authenticated requests skip the Origin check by the Jupyter server's design (a foreign page
    cannot know the token); a cookie is sent by the browser whatever page asks, so it must not do.
    """
    await wait_state(jp_fetch)
    browser = Browser(jp_http_port, jp_base_url)
    await browser.log_in(jp_serverapp.identity_provider.token)
    body = json.dumps({"prefix": "z = "})

    for origin in (EVIL, TRUSTED + ".evil.example", "null"):
        with pytest.raises(HTTPClientError) as error:
            await browser.open_socket(origin)
        assert error.value.code == 403, origin
        assert await browser.fetch("codellama/status", origin, xsrf=True) in REFUSED, origin
        code = await browser.fetch("codellama/complete", origin, xsrf=True, method="POST", body=body)
        assert code in REFUSED, origin
    # The cookie without the XSRF token is refused even from the right origin (a form post).
    assert (
        await browser.fetch("codellama/complete", browser.same_origin, xsrf=False, method="POST", body=body)
        == 403
    )
    assert await browser.fetch("codellama/complete", None, xsrf=False, method="POST", body=body) == 403

    # The same cookie from JupyterLab's own origin (or the configured CORS origin) works.
    assert await browser.fetch("codellama/status", browser.same_origin, xsrf=False) == 200
    assert (
        await browser.fetch("codellama/complete", browser.same_origin, xsrf=True, method="POST", body=body)
        == 200
    )
    for origin in (browser.same_origin, TRUSTED):
        ws = await browser.open_socket(origin)
        await ws.write_message(complete("mine", prefix="w = "))
        _, final = await final_reply(ws, "mine")
        assert final["type"] == "done", origin
        ws.close()


async def test_the_kernel_key_serves_kernels_only(jp_fetch, jp_ws_fetch, jp_serverapp, jp_http_port):
    """The key kernels inherit opens the Code Llama endpoints, from a non-browser, on an allowed host.

    Why another user or process cannot use it: it exists only in this server's environment and its
    kernels' (/proc/PID/environ is readable by the owning user alone); it is never written to disk,
    sent to a browser or logged; it authenticates nothing but these endpoints; a browser page cannot
    present it (a request carrying it with an Origin header is refused) and DNS rebinding meets the
    server's Host check. A process of the same user could read it, but such a process can already
    read the server's token from its runtime file: the key grants it nothing more.
    """
    await wait_state(jp_fetch)
    key = os.environ["JUPYTER_CODELLAMA_KEY"]
    assert len(key) >= 40  # 32 random bytes
    kernel = {"Authorization": "", "X-CodeLlama-Key": key}
    assert json.loads((await jp_fetch("codellama", "status", headers=dict(kernel))).body)["state"] == "ready"
    ws = await jp_ws_fetch("codellama", "ws", headers=dict(kernel))
    await ws.write_message(complete("k", prefix="v = "))
    _, final = await final_reply(ws, "k")
    assert final["type"] == "done"
    ws.close()

    origins = (f"http://localhost:{jp_http_port}", EVIL)
    for headers in [
        *({**kernel, "Origin": origin} for origin in origins),
        {**kernel, "Host": "evil.example"},
    ]:
        for parts, kwargs in endpoints():
            assert await refused(jp_fetch, *parts, headers=dict(headers), **kwargs), headers
        assert await refused(jp_ws_fetch, "codellama", "ws", headers=dict(headers)), headers
    # It opens nothing else of the server: not the files, not the kernels.
    for parts in (("api", "contents"), ("api", "kernels"), ("api", "terminals")):
        assert await refused(jp_fetch, *parts, headers=dict(kernel)), parts

    if sys.platform == "linux":
        environ = os.stat(f"/proc/{os.getpid()}/environ")
        assert environ.st_uid == os.getuid() and not environ.st_mode & (stat.S_IRWXG | stat.S_IRWXO)


async def test_no_reply_reveals_the_key_the_token_or_the_paths(
    jp_fetch, jp_ws_fetch, jp_serverapp, fim_checkpoint
):
    await wait_state(jp_fetch)
    secrets = [os.environ["JUPYTER_CODELLAMA_KEY"], jp_serverapp.identity_provider.token]
    replies = [(await jp_fetch("codellama", "status")).body.decode()]
    for body in [
        "{",
        json.dumps({"prefix": 1}),
        json.dumps({"notebook": {"cells": [{"cell_type": "x" * 99}]}}),
    ]:
        with pytest.raises(HTTPClientError) as error:
            await jp_fetch("codellama", "complete", method="POST", body=body)
        replies.append(error.value.response.body.decode())
    ws = await jp_ws_fetch("codellama", "ws")
    for raw in [
        "{",
        complete("a", prefix=None),
        complete("b", notebook={"cells": 5}),
        complete("c", prefix="q = "),
    ]:
        await ws.write_message(raw)
        replies.append(json.dumps(await final_reply(ws, json.loads(raw).get("id") if raw != "{" else None)))
    ws.close()
    assert "JUPYTER_CODELLAMA_URL" in os.environ and secrets[1] not in os.environ["JUPYTER_CODELLAMA_URL"]
    for reply in replies:
        for secret in secrets:
            assert secret not in reply
        assert str(fim_checkpoint) not in reply and "Traceback" not in reply
        assert str(Path(jupyter_codellama.__file__).parent) not in reply


# -- nothing read, written or run -----------------------------------------------------------------

PACKAGES = tuple(str(Path(module.__file__).parent) + os.sep for module in (jupyter_codellama, kernel_model))
# Audit events (PEP 578) that read or change files or run code or programs.
WATCHED = {
    "open", "exec", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown",
    "os.symlink", "os.link", "os.utime", "os.listdir", "os.scandir", "shutil.copyfile", "shutil.move",
    "shutil.rmtree", "shutil.unpack_archive",
}  # fmt: skip
_recorded: list[tuple[str, str]] | None = None


def _audit(event: str, args: tuple) -> None:
    if _recorded is None or event not in WATCHED:
        return
    if event == "exec" and os.path.isfile(getattr(args[0], "co_filename", "")):
        return  # a module's own code, imported lazily
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGES):
            _recorded.append((event, repr(args)[:200]))
            return
        frame = frame.f_back


sys.addaudithook(_audit)  # hooks cannot be removed: it does nothing while _recorded is None


async def test_requests_read_write_and_run_nothing(jp_fetch, jp_ws_fetch, tmp_path, fim_checkpoint):
    """Serving completions touches no file and runs no code, whatever the notebook or the model says."""
    global _recorded
    await wait_state(jp_fetch)
    tmp_path = tmp_path / "victim"
    tmp_path.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    hostile = (
        f"%load {secret}\n!rm -rf {tmp_path}\nimport os\nos.system('touch {tmp_path}/pwned')\n"
        f"exec(open({str(secret)!r}).read())\n"
    )
    notebook = {"path": str(secret), "cells": [{"cell_type": "code", "source": hostile,
                "outputs": [{"output_type": "stream", "name": "stdout", "text": str(secret)}]}]}  # fmt: skip
    ws = await jp_ws_fetch("codellama", "ws")
    _recorded = []
    try:
        for n in range(3):
            await ws.write_message(
                complete(f"nb{n}", notebook=notebook, cell=0, offset=len(hostile) - n, n=2)
            )
            assert (await final_reply(ws, f"nb{n}"))[1]["type"] == "done"
        await ws.write_message(complete("plain", prefix=hostile, suffix=f"\n# {secret}\n", mode="none"))
        assert (await final_reply(ws, "plain"))[1]["type"] == "done"
        await ws.write_message(complete("bad", notebook={"cells": [{"cell_type": "code"}]}))
        assert (await final_reply(ws, "bad"))[1]["type"] == "error"
        reply = await jp_fetch("codellama", "complete", method="POST", body=json.dumps({"prefix": hostile}))
        assert "text" in json.loads(reply.body)
        await jp_fetch("codellama", "status")
        recorded = _recorded
    finally:
        _recorded = None
        ws.close()
    assert recorded == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]
    # The hook does see the packages' file access (Python's, not that of C++ libraries).
    _recorded = []
    try:
        read_json(fim_checkpoint / "params.json")
        assert any(event == "open" and "params.json" in args for event, args in _recorded)
    finally:
        _recorded = None
