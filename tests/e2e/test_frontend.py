"""End-to-end: the JupyterLab frontend in real Chromium against a real `jupyter lab` serving a tiny random model.

The model's text is random but real, so the tests check behaviour (ghost text appears, Tab inserts
exactly what was shown, typing past it cancels it on the server, the docstring lands between the
header and the body and one Ctrl+Z removes it), never content. Screenshots of each step go to
test-artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Page, WebSocket, sync_playwright  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
READY_TIMEOUT_S = 180
GHOST_TIMEOUT_MS = 60_000

# A documented function sets the docstring style; `add` is left for the docstring button.
NOTEBOOK = {
    "cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["# Code Llama end-to-end"]},
        {
            "cell_type": "code",
            "metadata": {},
            "execution_count": None,
            "outputs": [],
            "source": [
                "def scale(values, factor):\n",
                '    """Multiply every value.\n',
                "\n",
                "    Args:\n",
                "        values: Numbers.\n",
                "        factor: The multiplier.\n",
                '    """\n',
                "    return [v * factor for v in values]",
            ],
        },
        {
            "cell_type": "code",
            "metadata": {},
            "execution_count": None,
            "outputs": [],
            "source": ["def add(a, b):\n", "    return a + b"],
        },
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": [""]},
    ],
    "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}

# User settings for the test server: quick requests, long suggestions (so a stream is still running
# when the test types past it), no animation (the DOM holds the whole ghost text), no news pop-up.
SETTINGS = {
    "jupyter-codellama/completions": {"debounceMs": 100, "maxNewTokens": 200},
    "jupyter-codellama/docstring": {"maxNewTokens": 24},
    "@jupyterlab/completer-extension/inline-completer": {"streamingAnimation": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, fim_checkpoint: Path) -> Iterator[dict[str, Any]]:
    """`jupyter lab` on a free port with a token, serving the tiny infilling checkpoint."""
    base = tmp_path_factory.mktemp("lab")
    root, settings = base / "root", base / "settings"
    root.mkdir()
    for plugin, values in SETTINGS.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_CODELLAMA_MODEL": str(fim_checkpoint),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
        "JUPYTER_CONFIG_DIR": str(base / "config"),
    }
    log = (base / "lab.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
            f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
            # Room for a %%codellama answer long enough to be stopped while it streams.
            "--CodeLlamaExtension.max_new_tokens=1024",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert server.poll() is None, f"jupyter lab exited:\n{(base / 'lab.log').read_text()[-3000:]}"
            with contextlib.suppress(OSError, ValueError):
                if get_json(f"{url}/codellama/status", token)["state"] == "ready":
                    break
            assert time.monotonic() < deadline, f"model not ready:\n{(base / 'lab.log').read_text()[-3000:]}"
            time.sleep(1)
        yield {"url": url, "token": token, "root": root, "log": base / "lab.log"}
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


class Frames:
    """Messages on the page's /codellama/ws socket, in order, as ("sent"|"received", message)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, dict[str, Any]]] = []

    def attach(self, ws: WebSocket) -> None:
        if "/codellama/ws" in ws.url:
            ws.on("framesent", lambda payload: self.log.append(("sent", json.loads(payload))))
            ws.on("framereceived", lambda payload: self.log.append(("received", json.loads(payload))))

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [m for d, m in self.log if d == "sent" and m.get("type") == kind]

    def received(self, kind: str, request_id: str) -> list[dict[str, Any]]:
        return [m for d, m in self.log if d == "received" and m["type"] == kind and m["id"] == request_id]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def open_notebook(
    browser, lab: dict[str, Any], test: str, content: dict[str, Any]
) -> Iterator[tuple[Page, Frames]]:
    """A fresh copy of `content` open in a new page; fails the test on any page error."""
    name = f"{test}.ipynb"
    (lab["root"] / name).write_text(json.dumps(content))
    page = browser.new_page(viewport={"width": 1300, "height": 800})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    frames = Frames()
    page.on("websocket", frames.attach)
    # A workspace of its own, so notebooks of earlier tests are not restored beside this one.
    page.goto(f"{lab['url']}/lab/workspaces/{test}/tree/{name}?token={lab['token']}&reset")
    page.wait_for_selector(".jp-Notebook .jp-CodeCell .cm-content", timeout=60_000)
    page.wait_for_function("() => !!window.jupyterapp.shell.currentWidget?.content?.model")
    page.wait_for_selector(".jp-NotebookPanel .jp-Spinner", state="detached", timeout=60_000)
    try:
        yield page, frames
    finally:
        page.close()
    assert errors == [], f"errors in the page console: {errors}"


@pytest.fixture
def notebook(browser, lab: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[tuple[Page, Frames]]:
    """A fresh copy of the test notebook open in a new page; fails the test on any page error."""
    # The name goes into a file name and the workspace URL: no brackets from parametrized tests.
    with open_notebook(browser, lab, re.sub(r"[^\w-]", "-", request.node.name), NOTEBOOK) as opened:
        yield opened


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def cell_source(page: Page, index: int) -> str:
    return page.evaluate(
        "i => window.jupyterapp.shell.currentWidget.content.model.cells.get(i).sharedModel.getSource()", index
    )


def type_in_cell(page: Page, index: int, text: str) -> None:
    page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".cm-content").click()
    page.keyboard.type(text, delay=60)


def ghost_text(page: Page) -> str:
    ghost = page.locator(".jp-GhostText")
    return ghost.first.inner_text() if ghost.count() else ""


def wait_for_ghost(page: Page, at_least: int = 3) -> str:
    page.wait_for_function(
        "n => (document.querySelector('.jp-GhostText')?.innerText.trim().length ?? 0) >= n",
        arg=at_least,
        timeout=GHOST_TIMEOUT_MS,
    )
    return ghost_text(page)


def last_complete_id(frames: Frames) -> str:
    return frames.sent("complete")[-1]["id"]


def wait_until(page: Page, condition, timeout_s: float = 30, what: str = "condition") -> None:
    """Poll through the page: Playwright's sync API delivers events (websocket frames) only inside its calls."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(100)


def test_status_bar_shows_the_model(notebook: tuple[Page, Frames], lab: dict[str, Any]) -> None:
    page, _ = notebook
    model = get_json(f"{lab['url']}/codellama/status", lab["token"])["model"]
    item = page.locator(".jp-codellama-StatusItem")
    page.wait_for_function(
        "() => document.querySelector('.jp-codellama-StatusItem')?.dataset.state === 'ready'", timeout=30_000
    )
    assert item.inner_text() == f"{model['name']}: ready"
    assert "fill-in-the-middle" in (item.get_attribute("title") or "")
    shot(page, "01-status-bar")


def test_ghost_text_streams_and_tab_accepts_it(notebook: tuple[Page, Frames]) -> None:
    page, frames = notebook
    typed = "total = add"
    type_in_cell(page, 3, typed)
    shown = wait_for_ghost(page)
    request = frames.sent("complete")[-1]
    assert request["cell"] == 3 and request["offset"] == len(typed)
    assert [c["source"] for c in request["notebook"]["cells"]][2] == "def add(a, b):\n    return a + b"
    shot(page, "02-ghost-text")

    page.keyboard.press("Tab")
    wait_until(page, lambda: cell_source(page, 3) != typed, what="the suggestion to be inserted")
    accepted = cell_source(page, 3)[len(typed) :]
    assert cell_source(page, 3).startswith(typed)
    # The stream may have grown between reading the ghost and pressing Tab, never shrunk.
    assert accepted.startswith(shown.rstrip()), (shown, accepted)
    shot(page, "03-tab-accepted")


def test_typing_past_a_suggestion_cancels_it_on_the_server(notebook: tuple[Page, Frames]) -> None:
    page, frames = notebook
    type_in_cell(page, 3, "value = ")
    shown = wait_for_ghost(page)
    request_id = last_complete_id(frames)
    assert not frames.received("done", request_id), (
        "the suggestion finished before the test could type past it"
    )
    completes_before = len(frames.sent("complete"))
    page.keyboard.type("§" if not shown.startswith("§") else "¤")
    wait_until(page, lambda: frames.received("done", request_id), what="the server's final message")
    cancels = [m for m in frames.sent("cancel") if m["id"] == request_id]
    assert cancels, "no cancel was sent for the suggestion typed past"
    # The cancel went out at the keystroke, before the newer request that comes after the debounce,
    # so it was this client, not the server's supersede rule, that stopped the generation.
    sent = [m for d, m in frames.log if d == "sent"]
    newer = [i for i, m in enumerate(sent) if m.get("type") == "complete"][completes_before:]
    assert all(sent.index(cancels[0]) < i for i in newer)
    assert frames.received("done", request_id)[0].get("cancelled") is True
    shot(page, "04-typed-past-cancelled")


@pytest.mark.parametrize("key", ["Escape", "ArrowLeft"])
def test_a_dismissed_suggestion_stops_on_the_server(notebook: tuple[Page, Frames], key: str) -> None:
    page, frames = notebook
    type_in_cell(page, 3, "value = ")
    wait_for_ghost(page)
    request_id = last_complete_id(frames)
    assert not frames.received("done", request_id), "the suggestion finished before the test could dismiss it"
    # Escape leaves the editor (the focus rule stops it); a cursor move back clears the ghost text in place.
    page.keyboard.press(key)
    wait_until(page, lambda: frames.received("done", request_id), what="the server's final message")
    assert [m for m in frames.sent("cancel") if m["id"] == request_id], f"{key} sent no cancel"
    assert frames.received("done", request_id)[0].get("cancelled") is True
    assert ghost_text(page) == ""
    if key == "ArrowLeft":
        # Still in the editor: the focus rule did not stop it, the dismissal did.
        assert page.evaluate("() => document.activeElement?.classList.contains('cm-content')")


def test_a_new_line_gets_a_suggestion_without_typing_on_it(notebook: tuple[Page, Frames]) -> None:
    page, frames = notebook
    header = "def total(values):"
    type_in_cell(page, 3, header)
    wait_until(page, lambda: frames.sent("complete"), what="the request for the header line")
    page.keyboard.press("Enter")  # JupyterLab itself asks its providers nothing on a blank line
    blank_line = len(header + "\n    ")
    wait_until(
        page,
        lambda: any(m["offset"] == blank_line for m in frames.sent("complete")),
        what="a request for the new, blank line",
    )
    request = next(m for m in frames.sent("complete") if m["offset"] == blank_line)
    assert request["n"] == 1 and request["mode"] == "auto"  # answered as typing, not as an Alt+\\
    wait_until(page, lambda: frames.received("done", request["id"]), timeout_s=60, what="its answer")
    shot(page, "19-suggestion-on-a-new-line")


def python_next_word(text: str) -> str:
    """The frontend's accept-next-word rule, restated: spaces, then a word run or a punctuation run."""
    match = re.match(r"\s*(?:\w+|[^\w\s]+)", text)
    return match.group(0) if match else text


def python_next_line(text: str) -> str:
    """The frontend's accept-next-line rule, restated: up to the first line break after visible text."""
    match = re.match(r"\s*[^\n]*", text)
    return match.group(0) if match else text


def test_accept_next_word_and_next_line(notebook: tuple[Page, Frames]) -> None:
    page, frames = notebook
    typed = "answer = "
    type_in_cell(page, 3, typed)
    wait_for_ghost(page)
    request_id = last_complete_id(frames)
    wait_until(
        page, lambda: frames.received("done", request_id), timeout_s=60, what="the suggestion to finish"
    )
    page.wait_for_timeout(300)
    whole = ghost_text(page)
    assert whole.strip()

    page.keyboard.press("Control+ArrowRight")
    word = python_next_word(whole)
    wait_until(
        page, lambda: cell_source(page, 3) == typed + word, what=f"the next word {word!r} to be inserted"
    )
    remaining = ghost_text(page)
    assert whole[len(word) :].lstrip().startswith(remaining.lstrip()[:10]), (whole, word, remaining)
    shot(page, "05-accepted-next-word")

    page.keyboard.press("Control+ArrowDown")
    line = python_next_line(whole[len(word) :])
    wait_until(page, lambda: cell_source(page, 3) == typed + word + line, what=f"the next line {line!r}")
    shot(page, "06-accepted-next-line")


def test_docstring_button_writes_in_place_and_undoes_in_one_step(notebook: tuple[Page, Frames]) -> None:
    page, _ = notebook
    original = cell_source(page, 2)
    page.locator(".jp-Notebook .jp-Cell").nth(2).locator(".cm-content").click()
    button = page.locator('.jp-Cell [data-command="codellama:generate-docstring"]')
    button.click()
    page.wait_for_selector(".jp-codellama-busy", timeout=5_000)
    shot(page, "07-docstring-busy")

    wait_until(page, lambda: cell_source(page, 2) != original, timeout_s=60, what="the docstring")
    lines = cell_source(page, 2).split("\n")
    assert lines[0] == "def add(a, b):"
    assert lines[1].startswith('    """')
    assert lines[-1] == "    return a + b"
    docstring = "\n".join(lines[1:-1])
    assert docstring.endswith('"""') and docstring.count('"""') == 2, docstring
    page.wait_for_selector(".jp-codellama-busy", state="detached", timeout=10_000)
    assert page.locator(".jp-toast-error, .Toastify__toast--error").count() == 0
    shot(page, "08-docstring-inserted")

    page.keyboard.press("Control+z")
    wait_until(
        page, lambda: cell_source(page, 2) == original, timeout_s=10, what="one undo to remove the docstring"
    )
    shot(page, "09-docstring-undone")


def test_docstring_from_the_context_menu_of_a_cell_that_is_not_active(notebook: tuple[Page, Frames]) -> None:
    page, _ = notebook
    original = cell_source(page, 2)
    # Right-clicking does not make the cell active; the command must still act on the clicked cell.
    page.locator(".jp-Notebook .jp-Cell").nth(2).locator(".cm-content").click(button="right")
    item = page.get_by_role("menuitem", name="Generate docstring")
    item.wait_for(timeout=5_000)
    shot(page, "10-docstring-context-menu")
    item.click()
    wait_until(page, lambda: cell_source(page, 2) != original, timeout_s=60, what="the docstring")
    lines = cell_source(page, 2).split("\n")
    assert lines[0] == "def add(a, b):" and lines[1].startswith('    """') and lines[-1] == "    return a + b"
    assert cell_source(page, 1) == "".join(NOTEBOOK["cells"][1]["source"])
    shot(page, "11-docstring-from-context-menu")


# -- %%codellama answers through the extension's own renderer --------------------------------------

ANSWER_MIME = "application/vnd.jupyter-codellama.answer+json"
MAGIC_CELL = "%%codellama --max-new-tokens 16\nwrite a function that returns the sum of a list of numbers"
AFTER_CELL = "print('the cell after')"
MAGIC_NOTEBOOK = {
    **NOTEBOOK,
    "cells": [
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": source}
        for source in ("%load_ext jupyter_codellama", MAGIC_CELL, AFTER_CELL)
    ],
}


@pytest.fixture
def magic_notebook(
    browser, lab: dict[str, Any], request: pytest.FixtureRequest
) -> Iterator[tuple[Page, Frames]]:
    """A notebook that loads the magic and asks it one question, open with its kernel ready."""
    with open_notebook(browser, lab, request.node.name, MAGIC_NOTEBOOK) as (page, frames):
        page.wait_for_function(
            "() => window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel?.status === 'idle'",
            timeout=60_000,
        )
        yield page, frames


def cell_count(page: Page) -> int:
    return page.evaluate("() => window.jupyterapp.shell.currentWidget.content.model.cells.length")


def answer_data(page: Page, index: int) -> dict[str, Any] | None:
    """The answer's MIME data as the notebook model holds it (the last update), or None."""
    return page.evaluate(
        """([i, mime]) => {
            const outputs = window.jupyterapp.shell.currentWidget.content.model.cells.get(i).outputs;
            for (let k = 0; k < outputs.length; k++) {
                const data = outputs.get(k).data[mime];
                if (data) { return data; }
            }
            return null;
        }""",
        [index, ANSWER_MIME],
    )


def run_cells(page: Page, first: int, count: int) -> None:
    """Shift+Enter from cell `first`, as a user runs cells one after another."""
    page.locator(".jp-Notebook .jp-Cell").nth(first).locator(".jp-InputPrompt").click()
    for _ in range(count):
        page.keyboard.press("Shift+Enter")


def test_magic_answer_renders_and_inserts_or_replaces_in_one_undo(
    magic_notebook: tuple[Page, Frames], lab: dict[str, Any]
) -> None:
    page, _ = magic_notebook
    model = get_json(f"{lab['url']}/codellama/status", lab["token"])["model"]["name"]
    run_cells(page, 0, 2)
    magic_cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    answer = magic_cell.locator(".jp-OutputArea .jp-codellama-Answer")
    answer.wait_for(timeout=60_000)
    page.wait_for_function(
        "() => document.querySelector('.jp-codellama-Answer')?.dataset.state === 'done'", timeout=60_000
    )
    data = answer_data(page, 1)
    assert data is not None and data["done"] is True and data["backend"] == "server", data
    code = data["code"]
    assert code.strip(), "the model wrote nothing to insert"
    # Rendered by the extension, not by the magic's Markdown/HTML fallbacks.
    outputs = magic_cell.locator(".jp-OutputArea-output")
    assert outputs.locator(".jp-RenderedMarkdown, .jp-RenderedHTMLCommon").count() == 0
    assert answer.locator(".jp-codellama-Answer-code").inner_text().rstrip("\n") == code.rstrip("\n")
    status = answer.locator(".jp-codellama-Answer-status").inner_text()
    assert status.startswith(f"{model} · {data['tokens']} token"), status
    assert status.endswith("cut off at the token limit" if data["finish_reason"] == "length" else "done"), (
        status
    )
    buttons = {
        name: answer.get_by_role("button", name=name)
        for name in ("Insert below", "Replace this cell", "Copy")
    }
    assert all(button.is_enabled() for button in buttons.values())
    assert not answer.get_by_role("button", name="Stop").is_visible()
    # Highlighted by JupyterLab's own CodeMirror languages, as Markdown code blocks are.
    assert "cm-s-jupyter" in (answer.locator(".jp-codellama-Answer-code code").get_attribute("class") or "")
    shot(page, "12-magic-answer")

    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=lab["url"])
    buttons["Copy"].click()
    answer.get_by_role("button", name="Copied").wait_for(timeout=5_000)
    assert page.evaluate("() => navigator.clipboard.readText()") == code
    assert cell_count(page) == 3

    buttons["Insert below"].click()
    wait_until(page, lambda: cell_count(page) == 4, what="a new cell below the magic's")
    assert [cell_source(page, i) for i in range(4)] == [
        "%load_ext jupyter_codellama",
        MAGIC_CELL,
        code,
        AFTER_CELL,
    ]
    assert page.evaluate("() => window.jupyterapp.shell.currentWidget.content.mode") == "command"
    shot(page, "13-magic-inserted-below")
    # JupyterLab undoes cell operations with Z in command mode (Ctrl+Z there undoes the active cell's text).
    page.keyboard.press("z")
    wait_until(page, lambda: cell_count(page) == 3, timeout_s=10, what="one undo to remove the inserted cell")
    assert [cell_source(page, i) for i in range(3)] == ["%load_ext jupyter_codellama", MAGIC_CELL, AFTER_CELL]
    assert answer_data(page, 1) == data, "the undo reached past the insert"
    shot(page, "14-magic-insert-undone")

    buttons["Replace this cell"].click()
    wait_until(page, lambda: cell_source(page, 1) == code, what="the magic cell to hold the code")
    assert cell_count(page) == 3 and cell_source(page, 2) == AFTER_CELL
    shot(page, "15-magic-replaced")
    assert page.evaluate("() => window.jupyterapp.shell.currentWidget.content.mode") == "command"
    # A change of the cell's text: Ctrl+Z on the cell, in command mode as in edit mode.
    page.keyboard.press("Control+z")
    wait_until(
        page,
        lambda: cell_source(page, 1) == MAGIC_CELL,
        timeout_s=10,
        what="one undo to bring the magic back",
    )
    assert cell_count(page) == 3
    # Nothing the buttons did ran anything: the only execution counts are the two cells run above.
    counts = page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.content.model.sharedModel.cells.map(c => c.execution_count ?? null)"
    )
    assert counts == [1, 2, None], counts
    shot(page, "16-magic-replace-undone")


def test_magic_stop_button_cancels_the_kernels_request_from_the_browser(
    magic_notebook: tuple[Page, Frames],
) -> None:
    page, frames = magic_notebook
    long_cell = MAGIC_CELL.replace("--max-new-tokens 16", "--max-new-tokens 1000")
    page.evaluate(
        "source => window.jupyterapp.shell.currentWidget.content.model.cells.get(1).sharedModel.setSource(source)",
        long_cell,
    )
    run_cells(page, 0, 2)
    answer = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-codellama-Answer")
    stop = answer.get_by_role("button", name="Stop")
    stop.wait_for(state="visible", timeout=60_000)
    wait_until(page, lambda: (answer_data(page, 1) or {}).get("tokens", 0) >= 2, what="the first tokens")
    streaming = answer_data(page, 1)
    assert streaming is not None and streaming["done"] is False, (
        "the answer ended before Stop could be clicked"
    )
    assert answer.get_attribute("data-state") == "streaming"
    assert answer.get_by_role("button", name="Insert below").is_disabled()
    assert answer.get_by_role("button", name="Replace this cell").is_disabled()
    shot(page, "17-magic-streaming")

    stop.click()
    request_id = streaming["request_id"]
    # The answer streams over the kernel's socket; the cancel goes over the page's, naming its id.
    wait_until(
        page,
        lambda: any(m["id"] == request_id for m in frames.sent("cancel")),
        timeout_s=10,
        what="the page to send the cancel",
    )
    assert frames.sent("complete") == [], "the page itself requested nothing"
    page.wait_for_function(
        "() => document.querySelector('.jp-codellama-Answer')?.dataset.state === 'cancelled'", timeout=30_000
    )
    final = answer_data(page, 1)
    assert final is not None and final["done"] is True and final["cancelled"] is True, final
    assert final["tokens"] < 1000
    assert answer.locator(".jp-codellama-Answer-status").inner_text().endswith("stopped")
    assert not stop.is_visible()
    if final["code"].strip():
        # A stopped answer's partial code may still be taken.
        assert answer.get_by_role("button", name="Insert below").is_enabled()
    shot(page, "18-magic-stopped")
