"""The model service: loads the model in the background and runs completions on one worker thread.

The tornado event loop never touches the model. Requests wait in a bounded queue; each request's
events (chunks, then one final message) travel back to the loop through an asyncio queue, and a
cancel flag lets the loop stop a generation between two tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kernel_model import ModelError, SamplingParams

from .context import FimContext, build_context, plain_context
from .engines import Engine, LocalEngine
from .postprocess import StreamTrimmer, trim_completion
from .protocol import CompletionRequest

# Room kept free in the window for the FIM pieces and sentencepiece's small disagreements between
# the token counts of pieces and of their concatenation.
PROMPT_MARGIN_TOKENS = 16
# Extra candidates for a manual invoke are sampled, so they differ from the greedy first one.
CANDIDATE_TEMPERATURE = 0.7


@dataclass(frozen=True)
class ServiceConfig:
    model: str = "embedded"
    device: str = "auto"
    dtype: str = "auto"
    max_context_tokens: int = 4096  # the prompt budget: more context, slower first token
    request_timeout: float = 30.0  # seconds from arrival to the end of generation
    queue_size: int = 16
    prefix_share: float = 0.75
    include_outputs: bool = False


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

    def emit(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class ModelService:
    def __init__(
        self,
        config: ServiceConfig,
        log: logging.Logger | None = None,
        loader: Callable[[ServiceConfig], Engine] | None = None,
    ) -> None:
        self.config = config
        self.log = log or logging.getLogger(__name__)
        self._loader = loader or load_engine
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
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def status(self) -> dict[str, Any]:
        engine = self.engine
        info: dict[str, Any] = {"name": self.config.model, "supports_infilling": None, "max_context": None,
                                "device": None, "dtype": None}  # fmt: skip
        if engine is not None:
            info.update(name=engine.name, supports_infilling=engine.supports_infilling,
                        max_context=self.prompt_window(), **engine.describe())  # fmt: skip
        return {
            "state": self.state,
            "model": info,
            "error": self.error,
            "busy": self.current is not None,
            "queued": self._queue.qsize(),
        }

    def submit(self, job: Job) -> None:
        if self.state == "loading":
            raise ModelError("the model is still loading; try again in a moment")
        if self.state == "error":
            raise ModelError(f"the model could not be loaded: {self.error}")
        try:
            self._queue.put_nowait(job)
        except queue.Full as exc:
            raise Busy("the model is busy with other requests; try again in a moment") from exc

    def prompt_window(self) -> int:
        assert self.engine is not None
        return min(self.config.max_context_tokens, self.engine.max_context)

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
        job.emit({"type": "error", "message": message})

    def _run(self, job: Job) -> None:
        engine, request = self.engine, job.request
        assert engine is not None
        started = time.monotonic()
        queue_ms = (started - job.enqueued) * 1000
        timings = {"queue_ms": round(queue_ms, 1), "prefill_ms": 0.0, "decode_ms": 0.0}
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        if job.cancel.is_set():
            job.emit(final_message("", [], usage, timings, cancelled=True))
            return
        context = self._context(request)
        deadline = job.enqueued + self.config.request_timeout
        trimmer = StreamTrimmer(mode=request.mode, prefix=context.prefix, suffix=context.suffix)
        params = SamplingParams(
            request.max_new_tokens, request.temperature, request.top_p, request.seed, request.stop, deadline
        )
        stream = engine.stream(
            context.prefix, context.suffix, infill=request.infill, params=params, cancel=job.cancel
        )
        shown: list[str] = []
        for delta in stream:
            visible = trimmer.push(delta)
            if visible:
                shown.append(visible)
                job.emit({"type": "chunk", "text": visible})
            if trimmer.done:
                break
        stream.close()
        tail = trimmer.finish()
        if tail:
            shown.append(tail)
            job.emit({"type": "chunk", "text": tail})
        stats = [stream.stats]
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
            raw = "".join(extra)
            text = trim_completion(raw, mode=request.mode, prefix=context.prefix, suffix=context.suffix)
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
        cancelled = job.cancel.is_set()
        job.emit(final_message(choices[0], choices, usage, timings, cancelled=cancelled))

    def _context(self, request: CompletionRequest) -> FimContext:
        engine = self.engine
        assert engine is not None
        budget = self.prompt_window() - request.max_new_tokens - PROMPT_MARGIN_TOKENS
        if budget < 16:
            raise ModelError(
                f"max_new_tokens {request.max_new_tokens} leaves no room for context in a "
                f"{self.prompt_window()}-token window"
            )
        count = engine.count_tokens
        share = self.config.prefix_share
        if request.cells is None:
            return plain_context(request.prefix, request.suffix, count_tokens=count, budget_tokens=budget,
                                 prefix_share=share)  # fmt: skip
        return build_context(
            request.cells, request.cell, request.offset, count_tokens=count, budget_tokens=budget,
            prefix_share=share, include_outputs=self.config.include_outputs,
        )  # fmt: skip


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


def load_engine(config: ServiceConfig) -> Engine:
    return LocalEngine.load(config.model, config.device, config.dtype)
