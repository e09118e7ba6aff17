"""The model service on its own: background loading, load failures, recovery, how a cut-off answer ends, int8."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from traitlets import TraitError

from jupyter_codellama.engines import LocalEngine, StreamStats
from jupyter_codellama.extension import CodeLlamaExtension
from jupyter_codellama.protocol import CompletionRequest
from jupyter_codellama.service import Job, ModelService, ServiceConfig
from kernel_model import ModelError
from kernel_model.fast import int8_parameters


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


async def run_job(service: ModelService, request: CompletionRequest) -> list[dict]:
    job = Job(id="t", request=request, loop=asyncio.get_running_loop())
    service.submit(job)
    events = []
    while not events or events[-1]["type"] == "chunk":
        events.append(await asyncio.wait_for(job.events.get(), 60))
    return events


def test_status_goes_loading_then_ready(fim_checkpoint):
    gate = threading.Event()

    def gated_loader(config: ServiceConfig) -> LocalEngine:
        gate.wait()
        return LocalEngine.load(config.model, config.device, config.dtype)

    service = ModelService(ServiceConfig(model=str(fim_checkpoint)), loader=gated_loader)
    service.start()
    status = service.status()
    assert status["state"] == "loading" and status["model"]["name"] == str(fim_checkpoint)
    with pytest.raises(ModelError, match="still loading"):
        service.submit(Job(id="early", request=CompletionRequest(prefix="x"), loop=asyncio.new_event_loop()))
    gate.set()
    wait_for(lambda: service.status()["state"] == "ready")
    assert service.status()["model"]["supports_infilling"] is True
    service.stop()


def test_a_missing_checkpoint_is_an_error_state_with_the_reason(tmp_path):
    service = ModelService(ServiceConfig(model=str(tmp_path / "nowhere")))
    service.start()
    wait_for(lambda: service.status()["state"] != "loading")
    status = service.status()
    assert status["state"] == "error" and "not found" in status["error"]
    with pytest.raises(ModelError, match="could not be loaded"):
        service.submit(Job(id="x", request=CompletionRequest(prefix="x"), loop=asyncio.new_event_loop()))


def test_a_failing_generation_is_reported_and_the_next_request_works(fim_checkpoint):
    service = ModelService(ServiceConfig(model=str(fim_checkpoint)))
    service.start()
    wait_for(lambda: service.status()["state"] == "ready")
    engine = service.engine
    real_stream = engine.stream
    calls = []

    def failing_once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_stream(*args, **kwargs)

    engine.stream = failing_once
    failed = asyncio.run(run_job(service, CompletionRequest(prefix="def f():\n", max_new_tokens=4)))
    assert failed[-1] == {"type": "error", "message": failed[-1]["message"]}
    assert "out of memory" in failed[-1]["message"] and "Tried to allocate" not in failed[-1]["message"]
    worked = asyncio.run(run_job(service, CompletionRequest(prefix="def f():\n", max_new_tokens=4)))
    assert worked[-1]["type"] == "done"
    service.stop()


class ScriptedStream:
    """An engine stream that yields fixed deltas and then says how it ended."""

    def __init__(self, deltas: list[str], finish_reason: str) -> None:
        self.deltas = deltas
        self.stats = StreamStats(completion_tokens=len(deltas), finish_reason=finish_reason)

    def __iter__(self):
        return iter(self.deltas)

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("finish_reason", "expected"),
    [("length", "total = 0\n    for x in xs:\n        total += x"),
     ("end", "total = 0\n    for x in xs:\n        total += x\n    return tot")],
)  # fmt: skip
def test_a_block_cut_off_by_the_token_limit_ends_at_its_last_whole_statement(
    fim_checkpoint, finish_reason, expected
):
    service = ModelService(ServiceConfig(model=str(fim_checkpoint)))
    service.start()
    wait_for(lambda: service.status()["state"] == "ready")
    deltas = ["total = 0\n", "    for x in xs:\n", "        total += x\n", "    return tot"]
    service.engine.stream = lambda *args, **kwargs: ScriptedStream(deltas, finish_reason)
    request = CompletionRequest(prefix="def f(xs):\n    ", suffix="\n", mode="auto", max_new_tokens=4)
    events = asyncio.run(run_job(service, request))
    assert events[-1]["type"] == "done" and events[-1]["text"] == expected
    assert "".join(event["text"] for event in events[:-1]) == expected  # streamed, never taken back
    service.stop()


@pytest.mark.parametrize(
    ("mode", "engine_reason", "expected"),
    [
        ("none", "length", "length"),
        ("none", "end", "end"),
        ("none", "stop", "stop"),
        ("line", "length", "mode"),
    ],
)
def test_done_says_why_the_text_ended(fim_checkpoint, mode, engine_reason, expected):
    service = ModelService(ServiceConfig(model=str(fim_checkpoint)))
    service.start()
    wait_for(lambda: service.status()["state"] == "ready")
    deltas = ["total = 0", "\n", "print(total)"]
    service.engine.stream = lambda *args, **kwargs: ScriptedStream(deltas, engine_reason)
    request = CompletionRequest(prefix="", suffix="\n", mode=mode, max_new_tokens=3)
    events = asyncio.run(run_job(service, request))
    assert events[-1]["finish_reason"] == expected
    service.stop()


class HeldStream(ScriptedStream):
    """A stream that waits for `release` before its first delta: a slow prefill."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__(["x"], "end")
        self.release = release

    def __iter__(self) -> Iterator[str]:
        self.release.wait(60)
        return iter(self.deltas)


def test_requests_cancelled_while_queued_give_their_places_to_new_ones(fim_checkpoint):
    service = ModelService(ServiceConfig(model=str(fim_checkpoint), queue_size=2))
    service.start()
    wait_for(lambda: service.status()["state"] == "ready")
    release = threading.Event()
    service.engine.stream = lambda *args, **kwargs: HeldStream(release)

    async def scenario() -> tuple[list[dict], list[dict]]:
        loop = asyncio.get_running_loop()
        jobs = {name: Job(id=name, request=CompletionRequest(prefix="x = "), loop=loop) for name in "abcd"}
        service.submit(jobs["a"])
        await asyncio.to_thread(wait_for, lambda: service.current is jobs["a"])
        service.submit(jobs["b"])
        service.submit(jobs["c"])  # the queue is full now
        jobs["b"].cancel.set()  # superseded by typing, but still waiting
        jobs["c"].cancel.set()
        service.submit(jobs["d"])  # takes their places instead of "busy"
        dropped = [await asyncio.wait_for(jobs[name].events.get(), 10) for name in "bc"]
        release.set()
        answered = [await asyncio.wait_for(jobs[name].events.get(), 60) for name in "ad"]
        return dropped, answered

    dropped, answered = asyncio.run(scenario())
    assert all(event["finish_reason"] == "cancelled" and event["cancelled"] for event in dropped)
    assert [event["type"] for event in answered] == ["chunk", "chunk"]
    service.stop()


def test_int8_serving_holds_the_matrices_quantized_and_says_so(fim_checkpoint):
    service = ModelService(ServiceConfig(model=str(fim_checkpoint), quant="int8"))
    service.start()
    wait_for(lambda: service.status()["state"] != "loading")
    assert service.status()["model"]["quant"] == "int8"
    assert int8_parameters(service.engine.model.model) > 0
    events = asyncio.run(run_job(service, CompletionRequest(prefix="def f():\n    ", max_new_tokens=4)))
    assert events[-1]["type"] == "done"
    service.stop()


def test_a_completion_longer_than_half_the_window_is_shortened_not_refused(fim_checkpoint):
    service = ModelService(ServiceConfig(model=str(fim_checkpoint), max_context_tokens=256))
    service.start()
    wait_for(lambda: service.status()["state"] == "ready")
    request = CompletionRequest(prefix="x = [", mode="none", max_new_tokens=250)
    events = asyncio.run(run_job(service, request))
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] <= 128
    service.stop()


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [("prefix_share", 1.5, "between 0 and 1"), ("prefix_share", float("nan"), "between 0 and 1"),
     ("max_context_tokens", 60, "at least 128")],
)  # fmt: skip
def test_the_extension_refuses_settings_every_request_would_fail_on(setting, value, message):
    with pytest.raises(TraitError, match=message):
        CodeLlamaExtension(**{setting: value})


def test_the_extension_refuses_an_unknown_quantization():
    with pytest.raises(TraitError, match="quant must be empty or one of auto, none, int8"):
        CodeLlamaExtension(quant="int4")
    assert CodeLlamaExtension(quant="int8").quant == "int8"
