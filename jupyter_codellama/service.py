"""The model service: loads the model in the background and runs completions on one worker thread.

The tornado event loop never touches the model. Requests wait in a bounded queue; each request's
events (chunks, then one final message) travel back to the loop through an asyncio queue, and a
cancel flag lets the loop stop a generation between two tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from kernel_model import ModelError, SamplingParams

from .context import MAX_CHARS_PER_TOKEN, FimContext, build_context, plain_context
from .engines import Engine, LocalEngine, StreamStats
from .postprocess import StreamTrimmer, trim_completion, was_cut_off
from .protocol import CompletionRequest
from .remote import OpenAIEngine, RemoteConfig

# Room kept free in the window for the FIM pieces and sentencepiece's small disagreements between
# the token counts of pieces and of their concatenation.
PROMPT_MARGIN_TOKENS = 16
# Extra candidates for a manual invoke are sampled, so they differ from the greedy first one.
CANDIDATE_TEMPERATURE = 0.7
# How long past its deadline a client still waits for the worker before it is told the model is stuck
# (an engine that ignores the deadline, a prefill far slower than planned): at most this, and at most
# the timeout itself, so a client always hears back within twice the timeout.
WATCHDOG_GRACE_MAX_S = 10.0


@dataclass(frozen=True)
class ServiceConfig:
    model: str = "embedded"
    device: str = "auto"
    dtype: str = "auto"
    quant: str | None = "auto"  # load_model's: 'int8'; 'none' or None: every matrix in dtype; 'auto'
    compile: bool = False  # torch.compile the decode step while loading
    max_context_tokens: int = 4096  # the prompt budget: more context, slower first token
    request_timeout: float = 30.0  # seconds from arrival to the end of generation
    queue_size: int = 16
    prefix_share: float = 0.75
    include_outputs: bool = True  # the browser's setting decides what it sends
    backend: str = "local"  # 'local' (kernel_model here) or 'openai' (a server, configured by `remote`)
    remote: RemoteConfig = field(default_factory=RemoteConfig)


class Busy(Exception):
    """The queue is full: the client should retry later rather than pile up requests."""


@dataclass
class Job:
    """One request on its way through the service; `events` is read on the event loop."""

    id: str
    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    answer_by: float = math.inf  # set by `submit`: when the client stops waiting for the worker
    failure_status: int = 400  # the HTTP status of an error event: the request's fault unless set otherwise

    def emit(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def next_event(self) -> dict[str, Any]:
        """The next event, or an error once the worker is past `answer_by` (a hung engine, say)."""
        if not self.events.empty():
            return self.events.get_nowait()
        timeout = None if self.answer_by == math.inf else max(self.answer_by - time.monotonic(), 0.0)
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            self.cancel.set()  # the worker drops the job whenever it gets back to it
            logging.getLogger(__name__).warning("Code Llama request %s got no answer in time", self.id)
            waited = self.answer_by - self.enqueued
            self.failure_status = 504
            return {"type": "error", "message": f"the model did not answer within {waited:.0f} seconds"}


class ModelService:
    def __init__(
        self,
        config: ServiceConfig,
        log: logging.Logger | None = None,
        loader: Callable[[ServiceConfig], Engine] | None = None,
    ) -> None:
        self.config = config
        self.log = log or logging.getLogger(__name__)
        self._loader = loader or (lambda config: load_engine(config, self.log))
        self.state = "loading"
        self.error: str | None = None
        self.engine: Engine | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=config.queue_size)
        self._thread = threading.Thread(target=self._work, name="codellama-model", daemon=True)
        self.current: Job | None = None
        self.completed = 0  # requests finished, for status and tests

    # -- on the event loop ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self.current is not None:
            self.current.cancel.set()
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def status(self) -> dict[str, Any]:
        engine = self.engine
        info: dict[str, Any] = {"name": self.config.model, "supports_infilling": None, "max_context": None,
                                "device": None, "dtype": None}  # fmt: skip
        if engine is not None:
            info.update(name=engine.name, supports_infilling=engine.supports_infilling,
                        max_context=self.prompt_window(), **engine.describe())  # fmt: skip
            # Code Llama - Instruct checkpoints are named so; the magic then uses the [INST] format.
            info["instruct"] = "instruct" in engine.name.lower()
        state, error = self.state, self.error
        if state == "ready" and (unavailable := engine_unavailable(engine)):
            state, error = "error", unavailable
        return {
            "state": state,
            "model": info,
            "error": error,
            "busy": self.current is not None,
            "queued": self._queue.qsize(),
        }

    def submit(self, job: Job) -> None:
        if self.state == "loading":
            raise ModelError("the model is still loading; try again in a moment")
        if self.state == "error":
            raise ModelError(f"the model could not be loaded: {self.error}")
        if unavailable := engine_unavailable(self.engine):
            raise ModelError(f"the model is unavailable: {unavailable}")
        current = self.current
        if current is not None and time.monotonic() > current.answer_by:
            # Queueing behind a stuck request would only make this one time out too.
            raise ModelError("the model has stopped answering; the server log may say why")
        timeout = self.config.request_timeout
        job.answer_by = job.enqueued + timeout + min(timeout, WATCHDOG_GRACE_MAX_S)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            # Requests superseded by typing wait in the queue until the worker reaches them: their
            # places go to this one first.
            if not self._drop_cancelled():
                raise Busy("the model is busy with other requests; try again in a moment") from None
            self._queue.put_nowait(job)

    def _drop_cancelled(self) -> int:
        """Answer the cancelled requests still waiting in the queue and take them out of it."""
        with self._queue.mutex:
            waiting = self._queue.queue
            dropped = [job for job in waiting if job is not None and job.cancel.is_set()]
            if dropped:
                kept = [job for job in waiting if job is None or not job.cancel.is_set()]
                waiting.clear()
                waiting.extend(kept)
                # Queue.join() is never used here, so its count of unfinished tasks may stay high.
                self._queue.not_full.notify(len(dropped))
        for job in dropped:
            job.emit(cancelled_message(job))
        return len(dropped)

    def prompt_window(self) -> int:
        assert self.engine is not None
        return window_tokens(self.config, self.engine)

    # -- on the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        if not self._load():
            return
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.current = job
            try:
                self._run(job)
            except ModelError as exc:
                job.emit({"type": "error", "message": str(exc)})
            except Exception as exc:  # the worker must survive anything one request does
                self._recover(job, exc)
            finally:
                self.current = None
                self.completed += 1
                # Not kept while the worker waits for the next request: it may hold a large notebook.
                del job

    def _load(self) -> bool:
        started = time.perf_counter()
        try:
            self.engine = self._loader(self.config)
        except Exception as exc:
            self.error = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
            self.state = "error"
            self.log.error("Code Llama model %r failed to load: %s", self.config.model, self.error)
            return False
        self.state = "ready"
        self.log.info(
            "Code Llama model %r ready (%s) in %.1f s",
            self.engine.name,
            self.engine.describe(),
            time.perf_counter() - started,
        )
        return True

    def _recover(self, job: Job, exc: Exception) -> None:
        self.log.exception("Code Llama request %s failed", job.id)
        if self.engine is not None:
            self.engine.reset()
        message = "the model failed on this request; the server log has the details"
        if "out of memory" in str(exc).lower():
            message = "the model ran out of memory on this request; try a shorter context"
            empty_cuda_cache()
        job.failure_status = 500  # the server failed, not the request
        job.emit({"type": "error", "message": message})

    def _run(self, job: Job) -> None:
        engine = self.engine
        assert engine is not None
        request = fit_to_window(job.request, self.prompt_window())
        started = time.monotonic()
        queue_ms = (started - job.enqueued) * 1000
        timings = {"queue_ms": round(queue_ms, 1), "prefill_ms": 0.0, "decode_ms": 0.0}
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        if job.cancel.is_set():
            job.emit(cancelled_message(job))
            return
        context = request_context(request, engine, self.config)
        deadline = job.enqueued + self.config.request_timeout
        if time.monotonic() > deadline:  # the queue and the context took all the time: skip the prefill
            job.emit({**final_message("", [], usage, timings), "finish_reason": "deadline"})
            return
        first = TrimmedStream(engine, request, context, job.cancel, deadline)
        shown: list[str] = []
        for visible in first:
            shown.append(visible)
            job.emit({"type": "chunk", "text": visible})
        reason = first.reason
        stats = [first.stats]
        choices = ["".join(shown)]
        for index in range(1, request.n):
            if job.cancel.is_set() or time.monotonic() > deadline:
                break
            extra_params = SamplingParams(
                request.max_new_tokens,
                request.temperature or CANDIDATE_TEMPERATURE,
                request.top_p,
                None if request.seed is None else request.seed + index,
                request.stop,
                deadline,
            )
            extra = engine.stream(context.prefix, context.suffix, infill=request.infill, params=extra_params,
                                  cancel=job.cancel)  # fmt: skip
            try:
                raw = "".join(until_stopped(extra, job.cancel, deadline))
            finally:
                extra.close()
            text = trim_completion(raw, mode=request.mode, prefix=context.prefix, suffix=context.suffix,
                                   truncated=was_cut_off(extra.stats.finish_reason))  # fmt: skip
            stats.append(extra.stats)
            if text and text not in choices:
                choices.append(text)
        usage = {
            "prompt_tokens": stats[0].prompt_tokens,
            "completion_tokens": sum(s.completion_tokens for s in stats),
            "cached_tokens": stats[0].cached_tokens,
        }
        timings["prefill_ms"] = round(sum(s.prefill_ms for s in stats), 1)
        timings["decode_ms"] = round(sum(s.decode_ms for s in stats), 1)
        message = final_message(choices[0], choices, usage, timings, cancelled=job.cancel.is_set())
        # Why the text ended: a client can tell a deadline ("deadline") from a natural end.
        message["finish_reason"] = reason
        job.emit(message)


def window_tokens(config: ServiceConfig, engine: Engine) -> int:
    """The tokens a prompt and its completion share: the configured budget, within the model's window."""
    return min(config.max_context_tokens, engine.max_context)


def fit_to_window(request: CompletionRequest, window: int) -> CompletionRequest:
    """The request with its completion given at most half the window, so that a ceiling set above a
    small model's window shortens answers rather than refusing every request."""
    return replace(request, max_new_tokens=min(request.max_new_tokens, window // 2))


def request_context(request: CompletionRequest, engine: Engine, config: ServiceConfig) -> FimContext:
    """The prefix and suffix the model sees for a request (already fitted to the window)."""
    window = window_tokens(config, engine)
    budget = window - request.max_new_tokens - PROMPT_MARGIN_TOKENS
    if budget < 16:
        raise ModelError(
            f"max_new_tokens {request.max_new_tokens} leaves no room for context in a {window}-token window"
        )
    count = engine.count_tokens
    share = config.prefix_share
    if not request.infill:
        # A whole prompt (e.g. an Instruct chat) cannot lose its beginning: refuse rather than cut.
        if len(request.prefix) > budget * MAX_CHARS_PER_TOKEN:  # cannot fit: not worth tokenizing
            raise ModelError(
                f"the prompt has {len(request.prefix):,} characters; this server's window leaves "
                f"room for {budget} tokens"
            )
        used = count(request.prefix)
        if used > budget:
            raise ModelError(f"the prompt has {used} tokens; this server's window leaves room for {budget}")
        return FimContext(request.prefix, "", 0, 0, truncated=False)
    if request.cells is None:
        return plain_context(request.prefix, request.suffix, count_tokens=count, budget_tokens=budget,
                             prefix_share=share)  # fmt: skip
    return build_context(
        request.cells, request.cell, request.offset, count_tokens=count, budget_tokens=budget,
        prefix_share=share, include_outputs=config.include_outputs,
    )  # fmt: skip


class TrimmedStream:
    """A request's first choice as its client sees it: the engine's deltas cut to the request's mode
    as they arrive.

    Iterating yields each piece to show, the tail the trimmer settles at the end included, and closes
    the engine's stream however the iteration ends; then `stats` and `reason` say how it went.
    """

    def __init__(
        self,
        engine: Engine,
        request: CompletionRequest,
        context: FimContext,
        cancel: threading.Event,
        deadline: float,
    ) -> None:
        self._engine = engine
        self._request = request
        self._context = context
        self._cancel = cancel
        self._deadline = deadline
        self.stats = StreamStats()
        self.reason = ""  # as the final message's finish_reason

    def __iter__(self) -> Iterator[str]:
        request, context, deadline = self._request, self._context, self._deadline
        trimmer = StreamTrimmer(mode=request.mode, prefix=context.prefix, suffix=context.suffix)
        params = SamplingParams(
            request.max_new_tokens, request.temperature, request.top_p, request.seed, request.stop, deadline
        )
        stream = self._engine.stream(
            context.prefix, context.suffix, infill=request.infill, params=params, cancel=self._cancel
        )
        try:
            yield from trimmer.feed(until_stopped(stream, self._cancel, deadline))
        finally:
            stream.close()  # also on a failure: a suspended generation would hold the model's lock
        self.stats = stream.stats
        # Read before `finish`, which always fixes a stop point.
        self.reason = (
            "mode" if trimmer.done else stop_reason(self._cancel, deadline, self.stats.finish_reason)
        )
        tail = trimmer.finish(truncated=was_cut_off(self.stats.finish_reason))
        if tail:
            yield tail


def until_stopped(stream: Iterator[str], cancel: threading.Event, deadline: float) -> Iterator[str]:
    """The stream's deltas until the request is cancelled or its deadline passes, whatever the engine does."""
    for delta in stream:
        yield delta
        if cancel.is_set() or time.monotonic() > deadline:
            return


def stop_reason(cancel: threading.Event, deadline: float, engine_reason: str) -> str:
    """Why a generation that the line/block rule did not end stopped: `until_stopped` leaves the
    engine saying only "closed" when the service cut it short."""
    if engine_reason != "closed":
        return engine_reason
    if cancel.is_set():
        return "cancelled"
    return "deadline" if time.monotonic() > deadline else engine_reason


def cancelled_message(job: Job) -> dict[str, Any]:
    """The answer to a request cancelled before the worker started it."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    timings = {
        "queue_ms": round((time.monotonic() - job.enqueued) * 1000, 1),
        "prefill_ms": 0.0,
        "decode_ms": 0.0,
    }
    return {**final_message("", [], usage, timings, cancelled=True), "finish_reason": "cancelled"}


def final_message(
    text: str, choices: list[str], usage: dict, timings: dict, cancelled: bool = False
) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "done", "text": text, "choices": choices or [text], "usage": usage,
                               "timings": timings}  # fmt: skip
    if cancelled:
        message["cancelled"] = True
    return message


def empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_unavailable(engine: Engine | None) -> str | None:
    """Why a loaded engine cannot serve now (a remote server that stopped answering), else None."""
    return getattr(engine, "unavailable", None)


def load_engine(config: ServiceConfig, log: logging.Logger | None = None) -> Engine:
    if config.backend == "openai":
        return OpenAIEngine.connect(config.remote, log)
    if config.backend != "local":
        raise ModelError(f"unknown backend {config.backend!r}; use 'local' or 'openai'")
    return LocalEngine.load(
        config.model, config.device, config.dtype, quant=config.quant, compile=config.compile
    )
