"""The %%codellama cell magic and %codellama line magic: ask in a cell, get code streamed back, insert it.

    %load_ext jupyter_codellama
    %%codellama [--max-new-tokens N] [--temperature T] [--insert] [--no-context] [--show-prompt] ...
    plot the daily mean of df.price            <- an instruction, or code with <FILL> to infill

The model is the Jupyter server's when the server announced one (see `client.py`), else one loaded
in this kernel. Generated code is only ever shown or put into a new cell: never executed.

MIME contract — `application/vnd.jupyter-codellama.answer+json`
----------------------------------------------------------------
Each answer is one display (`display_data` with a `transient.display_id`), re-sent as
`update_display_data` with the same id while the answer grows, at most every 0.1 s, and once
more when it ends. Its data holds this JSON object beside `text/plain` (the code alone),
`text/markdown` and `text/html` (the highlighted code and a status line) for other frontends:

    {
      "code": str,                # the answer as a cell's source: for a <FILL> cell, the whole
                                  # cell with the middle filled in; else the generated code
      "done": bool,               # false while it streams; true exactly once, in the last update
      "cancelled": bool,          # stopped before the model finished (Stop, interrupt)
      "finish_reason": str,       # once done, why the text ended, in the server protocol's words:
                                  # "length" and "deadline" cut the code off; "" while streaming
      "tokens": int,              # generated so far (estimated while streaming, exact when done)
      "tokens_per_second": float, # decoding speed, one decimal
      "model": str,               # the model's name, e.g. "CodeLlama-13b-Instruct-hf"
      "request_id": str,          # the id the request carries on the server's /codellama/ws
      "kind": "instruction" | "fill",
      "backend": "server" | "kernel",  # where it runs; only "server" requests can be cancelled
                                  # over /codellama/ws: {"type": "cancel", "id": request_id}
      "error": str | null         # one sentence when the request failed (then done is true)
    }

A renderer may show Insert below / Replace this cell / Copy on `code` once `done` is true (or on
the partial code if `cancelled`); "Replace this cell" replaces the %%codellama cell with `code`.
Fields may be added later; a renderer should ignore the ones it does not know.
"""

from __future__ import annotations

import argparse
import contextvars
import importlib.util
import shlex
import sys
import threading
import uuid
from dataclasses import dataclass, replace
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class

from .client import Backend, CodeLlamaError, GenerationRequest, backend_from_environment
from .kernel_context import kernel_context
from .magic_display import CUT_OFF, Answer, AnswerView, StopButton
from .magic_prompt import FILL, STYLES, MagicPrompt, build_prompt

STOP_GRACE = 10.0  # seconds an interrupted cell waits for the server to confirm the stop
POLL = 0.1  # seconds between checks that leave room for the kernel's interrupt

HELP = f"""\
%%codellama [options]       ask Code Llama for code; the cell body below is either
                            an instruction ("load data.csv and plot column b") or
                            code with one {FILL} where the model should write.
  --max-new-tokens N        at most N tokens in the answer
  --temperature T           0 (the default) always picks the likeliest token; up to 2
  --insert                  put the answer into a new cell below (it is never run)
  --no-context              leave out the cells run so far and the kernel's variables
  --style auto|instruct|base  prompt format; auto: Instruct's chat format when the
                            model's name says Instruct, else a code prompt
  --show-prompt, --dry-run  print the prompt and stop, without generating
  --wait                    keep the cell running until the answer is complete, even
                            where a Stop button could be shown (ipywidgets)
Stop an answer with its Stop button, by interrupting the kernel, or with %codellama stop.

%codellama                  the current settings and where the model runs
%codellama status           ask the model's host how it is
%codellama set [options]    change the defaults of --max-new-tokens, --temperature,
                            --no-context (undo with --context) and --style
%codellama stop             stop every answer still being written
%codellama help             this text"""


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    context: bool = True
    style: str = "auto"

    def merged(self, args: argparse.Namespace) -> Settings:
        given = {name: getattr(args, name) for name in ("max_new_tokens", "temperature", "context", "style")}
        return replace(self, **{name: value for name, value in given.items() if value is not None})

    def describe(self) -> str:
        context = "on" if self.context else "off (--no-context)"
        return (
            f"--max-new-tokens {self.max_new_tokens}, --temperature {self.temperature}, "
            f"--style {self.style}, context {context}"
        )


class OptionParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = " (the request goes in the cell body, below %%codellama)" if "unrecognized" in message else ""
        raise CodeLlamaError(f"{message}{hint}; see %codellama help")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 2, not {text!r}")
    return value


def settings_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int)
    parser.add_argument("--temperature", type=temperature)
    parser.add_argument("--style", choices=STYLES)
    parser.add_argument("--no-context", dest="context", action="store_false", default=None)
    parser.add_argument("--context", dest="context", action="store_true", default=None)


def cell_parser() -> OptionParser:
    parser = OptionParser(prog="%%codellama", add_help=False, allow_abbrev=False)
    settings_options(parser)
    parser.add_argument("--insert", action="store_true")
    parser.add_argument("--show-prompt", "--dry-run", dest="show_prompt", action="store_true")
    parser.add_argument("--wait", action="store_true")
    return parser


def set_parser() -> OptionParser:
    parser = OptionParser(prog="%codellama set", add_help=False, allow_abbrev=False)
    settings_options(parser)
    return parser


def parse(parser: argparse.ArgumentParser, line: str) -> argparse.Namespace:
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise CodeLlamaError(f"cannot read the options ({exc})") from None
    return parser.parse_args(words)


class MagicJob:
    """One answer being written on a worker thread, which also keeps its display up to date."""

    def __init__(
        self, backend: Backend, request: GenerationRequest, answer: Answer, running: set[MagicJob]
    ) -> None:
        self.backend = backend
        self.request = request
        self.answer = answer
        self.running = running  # the jobs %codellama stop reaches; this one is in it while it runs
        self.cancel = threading.Event()
        self.finished = threading.Event()
        self.view: AnswerView | None = None
        self.button: StopButton | None = None

    def start(self, stop_button: bool, live: bool) -> None:
        if stop_button:
            self.button = StopButton(self.stop)
        self.view = AnswerView(self.answer, live)
        self.running.add(self)
        # A copy of this cell's context: the thread's displays then belong to this cell.
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"codellama-{self.request.id}", daemon=True
        )
        thread.start()

    def stop(self) -> None:
        self.cancel.set()

    def wait(self) -> bool:
        """Until the answer is complete; an interrupt (the frontend's stop) stops it on the server.

        False when interrupted: the answer is partial, even if the stop is not confirmed yet.
        """
        # An Event, not Thread.join: an interrupt inside join() marks the still-running thread as
        # finished in CPython 3.11 (the bpo-45274 fix releases the thread's own state lock).
        try:
            while not self.finished.wait(POLL):
                pass
        except KeyboardInterrupt:
            self.stop()
            self.finished.wait(STOP_GRACE)
            return False
        return True

    def _run(self) -> None:
        assert self.view is not None
        try:
            outcome = self.backend.generate(self.request, self._on_text, self.cancel)
            self.answer.finish(outcome)
        except CodeLlamaError as exc:
            self.answer.fail(str(exc))
        except Exception as exc:  # whatever the transport raises, the user gets one line
            self.answer.fail(f"{type(exc).__name__}: {exc}")
        finally:
            try:
                self.view.refresh(final=True)
                if self.button is not None:
                    self.button.finish(self.answer)
            finally:
                self.running.discard(self)
                self.finished.set()  # whatever the display does: `wait` must end

    def _on_text(self, delta: str) -> None:
        assert self.view is not None
        self.answer.add(delta)
        self.view.refresh()


@magics_class
class CodeLlamaMagics(Magics):
    def __init__(self, shell: Any, backend: Backend | None = None) -> None:
        super().__init__(shell)
        self.settings = Settings()
        self._backend = backend
        self.running: set[MagicJob] = set()

    @property
    def backend(self) -> Backend:
        # Resolved on first use: the environment is read when the user asks, not at %load_ext.
        if self._backend is None:
            self._backend = backend_from_environment()
        return self._backend

    @line_cell_magic
    def codellama(self, line: str, cell: str | None = None) -> None:
        """Ask Code Llama for code in a cell (%%codellama), or manage it (%codellama help)."""
        if cell is None:
            self.command(line)
        else:
            self.ask(line, cell)

    # -- %%codellama --------------------------------------------------------------------------------

    def ask(self, line: str, cell: str) -> None:
        args = parse(cell_parser(), line)
        settings = self.settings.merged(args)
        if not cell.strip():
            raise CodeLlamaError(
                f"the cell is empty: below %%codellama, say what the code should do, or write code with {FILL}"
            )
        backend = self.backend
        model = backend.model_info()
        context = kernel_context(self.shell) if settings.context else None
        prompt = build_prompt(cell, context, model, settings.max_new_tokens, settings.style)
        if args.show_prompt:
            print(show_prompt(prompt, model.name))
            return
        request = GenerationRequest(
            id=f"magic-{uuid.uuid4().hex[:16]}",
            prefix=prompt.prefix,
            suffix=prompt.suffix,
            infill=prompt.infill,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            stop=prompt.stop,
        )
        background = self.can_run_in_background(args)
        hint = "Stop button or %codellama stop" if background else "interrupt the kernel to stop"
        answer = Answer(request.id, model.name, backend.kind, prompt, stop_hint=hint)
        job = MagicJob(backend, request, answer, self.running)
        # Outside a kernel (terminal IPython) every update would be printed anew: show the end only.
        job.start(stop_button=background, live=getattr(self.shell, "kernel", None) is not None)
        if background:
            return
        completed = job.wait()
        if answer.error:
            raise CodeLlamaError(answer.error)
        if not args.insert or not completed or answer.cancelled or not answer.code.strip():
            return
        self.shell.set_next_input(answer.code, replace=False)
        if answer.cut_off:
            # Still the user's to finish or discard; it never runs by itself.
            print(f"Inserted as it is: the answer was {CUT_OFF[answer.finish_reason]}.", file=sys.stderr)

    def can_run_in_background(self, args: argparse.Namespace) -> bool:
        """Whether to return at once and stream on, so that a Stop button's click can be heard.

        A click reaches the kernel only while it is idle. Only worth it when someone is watching:
        frontends with a person at them allow stdin (JupyterLab, Notebook, VS Code); nbclient and
        nbconvert do not, and they keep only what a cell shows before it ends. With the server's
        model the JupyterLab renderer has its own Stop, which reaches the server while the cell
        runs: a second button would only repeat it.
        """
        if args.wait or args.insert or importlib.util.find_spec("ipywidgets") is None:
            return False
        if self.backend.kind == "server":
            return False
        return bool(getattr(getattr(self.shell, "kernel", None), "_allow_stdin", False))

    # -- %codellama ---------------------------------------------------------------------------------

    def command(self, line: str) -> None:
        word, _, rest = line.strip().partition(" ")
        if word in ("", "settings"):
            print(f"codellama: {self.settings.describe()}\nmodel: {self.backend.description}")
        elif word == "status":
            print(self.backend.status_line())
        elif word == "help":
            print(HELP)
        elif word == "stop":
            jobs = list(self.running)
            for job in jobs:
                job.stop()
            print(f"codellama: stopping {len(jobs)} answer{'s' * (len(jobs) != 1)}")
        elif word == "set":
            self.settings = self.settings.merged(parse(set_parser(), rest))
            print(f"codellama: {self.settings.describe()}")
        else:
            raise CodeLlamaError(f"unknown command {word!r}; use status, set, stop or help")


def show_prompt(prompt: MagicPrompt, model: str) -> str:
    size = len(prompt.prefix) + len(prompt.suffix)
    cells = f"{prompt.cells_used} context cells" + (
        f" ({prompt.cells_dropped} older left out to fit)" if prompt.cells_dropped else ""
    )
    head = f"# {prompt.kind} prompt for {model}: {size} characters, {cells}"
    if prompt.stop:
        head += f", stops at {', '.join(repr(s) for s in prompt.stop)}"
    if not prompt.infill:
        return f"{head}\n{prompt.prefix}"
    return f"{head}\n----- prefix -----\n{prompt.prefix}\n----- suffix -----\n{prompt.suffix}"


_loaded: dict[int, CodeLlamaMagics] = {}


def load_ipython_extension(ipython: Any) -> None:
    magics = CodeLlamaMagics(ipython)
    ipython.register_magics(magics)
    _loaded[id(ipython)] = magics


def unload_ipython_extension(ipython: Any) -> None:
    magics = _loaded.pop(id(ipython), None)
    if magics is not None:
        for job in list(magics.running):
            job.stop()
