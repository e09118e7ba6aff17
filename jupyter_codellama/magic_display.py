"""How a %%codellama answer is shown: one display updated in place (contract in `magic.py`), and a Stop button."""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from IPython.display import display

from .client import Outcome
from .magic_prompt import MagicPrompt

MIME_TYPE = "application/vnd.jupyter-codellama.answer+json"
REFRESH_INTERVAL = 0.1  # seconds between display updates: a small model writes hundreds of tokens a second
# Why an answer can end mid-code, as the footer says it.
CUT_OFF = {"length": "cut off at the token limit", "deadline": "cut off at the server's time limit"}


@dataclass
class Answer:
    """What is known of one request's answer, from its first chunk to its end."""

    request_id: str
    model: str
    backend: str  # "server" | "kernel"
    prompt: MagicPrompt
    stop_hint: str = "interrupt the kernel to stop"
    text: str = ""  # generated so far
    tokens: int = 0
    tokens_per_second: float = 0.0
    done: bool = False
    cancelled: bool = False
    finish_reason: str = ""
    error: str | None = None
    _first_at: float | None = field(default=None, repr=False)

    @property
    def code(self) -> str:
        return self.prompt.code(self.text)

    @property
    def cut_off(self) -> bool:
        """The answer stopped where the model had not ended it: the code may be half written."""
        return self.finish_reason in CUT_OFF

    def add(self, delta: str) -> None:
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
        self.text += delta
        self.tokens += 1  # the server sends about one chunk a token; the final count replaces this
        elapsed = now - self._first_at
        if elapsed > 0:
            self.tokens_per_second = (self.tokens - 1) / elapsed

    def finish(self, outcome: Outcome) -> None:
        self.text = outcome.text or self.text
        self.tokens = outcome.completion_tokens or self.tokens
        if outcome.decode_ms > 0:
            self.tokens_per_second = self.tokens / (outcome.decode_ms / 1000)
        self.cancelled = outcome.cancelled
        self.finish_reason = outcome.finish_reason
        self.done = True

    def fail(self, message: str) -> None:
        self.error = message
        self.done = True

    def state(self) -> str:
        if self.error:
            return f"error: {self.error}"
        if self.cancelled:
            return "stopped"
        if self.cut_off:
            return CUT_OFF[self.finish_reason]
        return "done" if self.done else f"writing… ({self.stop_hint})"

    def footer(self) -> str:
        return f"{self.model} · {self.tokens} tokens · {self.tokens_per_second:.1f} tokens/s · {self.state()}"

    def bundle(self) -> dict[str, Any]:
        code = self.code
        return {
            MIME_TYPE: {
                "code": code,
                "done": self.done,
                "cancelled": self.cancelled,
                "finish_reason": self.finish_reason,
                "tokens": self.tokens,
                "tokens_per_second": round(self.tokens_per_second, 1),
                "model": self.model,
                "request_id": self.request_id,
                "kind": self.prompt.kind,
                "backend": self.backend,
                "error": self.error,
            },
            "text/plain": code,
            "text/markdown": f"{fenced(code)}\n\n*{self.footer()}*",
            "text/html": (
                f'<div class="jp-codellama-answer">{highlight(code)}'
                f'<div style="opacity: 0.7; font-size: 85%">{html.escape(self.footer())}</div></div>'
            ),
        }


class AnswerView:
    """The answer's display, updated in place at most every REFRESH_INTERVAL; if not `live`, shown once at the end."""

    def __init__(self, answer: Answer, live: bool = True) -> None:
        self.answer = answer
        self.handle = display(answer.bundle(), raw=True, display_id=True) if live else None
        self._shown_at = time.monotonic()

    def refresh(self, final: bool = False) -> None:
        if self.handle is None:
            if final:
                display(self.answer.bundle(), raw=True)
            return
        now = time.monotonic()
        if final or now - self._shown_at >= REFRESH_INTERVAL:
            self.handle.update(self.answer.bundle(), raw=True)
            self._shown_at = now


class StopButton:
    """An ipywidgets button that stops the generation; only useful while the kernel is idle to hear it."""

    def __init__(self, on_stop: Callable[[], None]) -> None:
        import ipywidgets

        self.button = ipywidgets.Button(description="Stop", icon="stop", tooltip="Stop writing this answer")
        self.button.on_click(lambda _button: on_stop())
        display(self.button)

    def finish(self, answer: Answer) -> None:
        self.button.description = "Stopped" if answer.cancelled else "Done"
        self.button.disabled = True


def fenced(code: str) -> str:
    """A Markdown code block that no run of backticks inside the code can close."""
    longest, run = 0, 0
    for char in code:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}python\n{code}\n{fence}"


def highlight(code: str) -> str:
    # Pygments comes with IPython; inline styles survive every frontend's HTML sanitizer.
    from pygments import highlight as pygmentize
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    return pygmentize(code, PythonLexer(), HtmlFormatter(noclasses=True))
