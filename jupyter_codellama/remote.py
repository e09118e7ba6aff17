"""The `openai` backend: completions from a shared inference server speaking the OpenAI `/v1/completions` API.

vLLM, TGI, llama.cpp's server (and llama-cpp-python's) and Ollama all take a raw prompt on
`/v1/completions` and stream Server-Sent Events, so one engine serves them all. The FIM prompt goes
as raw text in Code Llama's format; each of these servers tokenizes " <PRE>" to the ▁<PRE> piece as
Meta's tokenizer does (checked id by id against llama.cpp in the tests). llama.cpp's `/infill` is
not used: llama-cpp-python's server lacks it and raw text gives the same ids.

Everything here runs on the model service's worker thread (requests) or on the engine's own probe
thread (health), never on the event loop, so plain blocking `http.client` is right.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kernel_model import ModelError, SamplingParams, Tokenizer

from .engines import StreamStats
from .estimate import estimate_tokens

# Code Llama's window; used when neither the settings nor the server's model list say otherwise.
DEFAULT_REMOTE_CONTEXT = 16_384
FIM_MODES = ("auto", "spm", "psm", "off")
# Code Llama variants without FIM pieces: Python, 34B and 70B (and their Instruct versions).
_NO_FIM_NAMES = re.compile(r"python|34b|70b", re.IGNORECASE)
# Statuses worth a retry: the server is overloaded or restarting, and nothing was generated yet.
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_HEADER_SAFE = re.compile(r"[\x21-\x7e]*")  # printable ASCII without spaces: what a Bearer token is
# While unreachable, look again this often, so the status recovers soon after the server does.
ERROR_PROBE_INTERVAL = 3.0


@dataclass(frozen=True)
class RemoteConfig:
    url: str = ""
    model: str = ""  # empty: the first model the server lists
    api_key: str = field(default="", repr=False)  # never in a repr, a log line or a status
    tokenizer: str = ""  # a local tokenizer.model for exact token counts; empty: estimate
    fim: str = "auto"  # auto | spm | psm | off
    connect_timeout: float = 5.0
    read_timeout: float = 60.0  # the longest silence within a response (the first token included)
    retries: int = 2  # extra attempts, only before anything was streamed
    probe_interval: float = 30.0
    max_context: int = 0  # 0: what the server reports (vLLM's max_model_len), else 16,384


class RemoteUnavailable(ModelError):
    """The server could not be reached, or refused us before generating anything."""


class KeyRefused(RemoteUnavailable):
    """The server refused the API key: asking again cannot help."""


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of the server's base URL; a trailing /v1 is optional."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ModelError(f"remote_url must be an http:// or https:// URL, not {url!r}")
    if parsed.username or parsed.password:
        raise ModelError("remote_url must not hold credentials; put the API key in remote_api_key_env")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    prefix = parsed.path.rstrip("/").removesuffix("/v1")
    return parsed.scheme, parsed.hostname, port, prefix


def fim_prompt(prefix: str, suffix: str, order: str) -> str:
    """Code Llama's infilling prompt as text; the server adds <s> and sentencepiece's dummy space.

    PSM: ▁<PRE>▁{prefix}▁<SUF>{suffix}▁<MID>  SPM: ▁<PRE>▁<SUF>{suffix}▁<MID>▁{prefix}
    — the same ids as Meta's `infilling_prompt_tokens` (the prefix encoded with its dummy space,
    the suffix without).
    """
    if order == "psm":
        return f"<PRE> {prefix} <SUF>{suffix} <MID>"
    return f"<PRE> <SUF>{suffix} <MID> {prefix}"


def heal_whitespace(prefix: str) -> tuple[str, str]:
    """Cut a cursor line's indentation off the prompt; the model types it again (token healing as text).

    A prompt ending in "    " ends with the piece ▁▁▁▁, while code has ▁▁▁ + ▁return there; a
    remote server cannot be asked to force the first tokens, so the indentation is left for the
    model to write, and `Healer` takes it back off the completion.
    """
    line_start = prefix.rfind("\n") + 1
    tail = prefix[line_start:]
    if line_start == 0 or not tail or tail.strip(" \t"):
        return prefix, ""
    return prefix[:line_start], tail


class Healer:
    """Removes the re-typed indentation from the start of a completion."""

    def __init__(self, cut: str) -> None:
        self.cut = cut
        self.pending = "" if cut else None  # None: passing text through

    def push(self, text: str) -> str:
        if self.pending is None:
            return text
        self.pending += text
        head = self.pending
        if len(head) < len(self.cut) and self.cut.startswith(head):
            return ""  # still re-typing the indentation
        self.pending = None
        if head.startswith(self.cut):
            return head[len(self.cut) :]
        # The model chose another indentation on the cursor's line: the user's stands.
        first, newline, rest = head.partition("\n")
        return first.lstrip(" \t") + newline + rest

    def finish(self) -> str:
        return ""  # an unfinished indentation alone shows nothing


@dataclass
class _Response:
    connection: http.client.HTTPConnection
    response: http.client.HTTPResponse


class OpenAIEngine:
    """An OpenAI-compatible server: streams `/v1/completions`, watches `/v1/models`."""

    def __init__(self, config: RemoteConfig, log: logging.Logger | None = None) -> None:
        if config.fim not in FIM_MODES:
            raise ModelError(f"remote_fim must be one of {', '.join(FIM_MODES)}, not {config.fim!r}")
        if not config.url:
            raise ModelError("backend 'openai' needs remote_url (e.g. http://gpu-host:8000/v1)")
        if not _HEADER_SAFE.fullmatch(config.api_key):
            # http.client would refuse it with the key in its message, bound for the status and the log.
            raise ModelError("the remote API key holds characters an HTTP header cannot carry")
        self.config = config
        self.log = log or logging.getLogger(__name__)
        self.scheme, self.host, self.port, self.prefix = split_url(config.url)
        self.tokenizer = Tokenizer(config.tokenizer) if config.tokenizer else None
        self.name = config.model or "(remote)"
        self.max_context = config.max_context or DEFAULT_REMOTE_CONTEXT
        self.supports_infilling = self._infilling(self.name)
        # Why the server cannot be used now, or None; the service reports it as the status's error.
        self.unavailable: str | None = "not contacted yet"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.streaming = False  # a completion is streaming from the server right now
        self.vllm = False  # the model list says vLLM serves it (`owned_by`)
        self._prober = threading.Thread(target=self._probe_loop, name="codellama-remote-probe", daemon=True)

    @classmethod
    def connect(cls, config: RemoteConfig, log: logging.Logger | None = None) -> OpenAIEngine:
        """The engine after a first look at the server; unreachable is a status, not a failure."""
        engine = cls(config, log)
        engine.probe()
        engine._prober.start()
        return engine

    # -- the Engine interface -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {"device": "remote", "dtype": None, "backend": "openai", "url": self.display_url}

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count(text) if self.tokenizer else estimate_tokens(text)

    def stream(
        self, prefix: str, suffix: str, *, infill: bool, params: SamplingParams, cancel: threading.Event
    ) -> RemoteStream:
        prefix, cut = heal_whitespace(prefix)
        stops = ["<EOT>"]
        infilling = infill and self.supports_infilling
        if infilling:
            prompt = fim_prompt(prefix, suffix, "psm" if self.config.fim == "psm" else "spm")
            # The text of ▁<EOT> is " <EOT>": listed first, a server that stops on the first match
            # in list order (vLLM) drops its space too.
            stops = [" <EOT>", "<EOT>"]
        else:
            prompt = prefix
        body: dict[str, Any] = {
            "model": self.name,
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "stop": stops + [s for s in params.stop if s not in stops],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if infilling and self.vllm:
            # Hugging Face's Code Llama tokenizer counts ▁<EOT> as a special token, whose text vLLM
            # leaves out by default: the stop strings would never match, and the middle would run
            # on past its end. Only to vLLM: a strict server refuses unknown fields.
            body["skip_special_tokens"] = False
        if params.top_p < 1:
            body["top_p"] = params.top_p  # 1 is every server's default, and TGI refuses it
        if params.seed is not None:
            body["seed"] = params.seed
        return RemoteStream(self, body, self.count_tokens(prompt) + 1, Healer(cut), params.deadline, cancel)

    def reset(self) -> None:
        self._wake.set()  # something went wrong: look at the server again now

    def close(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- health -----------------------------------------------------------------------------------

    @property
    def display_url(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return f"{self.scheme}://{host}{port}{self.prefix}/v1"

    def probe(self) -> None:
        """Ask `/v1/models`; sets `unavailable` (and the model's name and window on success)."""
        try:
            listing = self._get_json("/v1/models")
            models = [m for m in listing.get("data") or [] if isinstance(m, dict) and m.get("id")]
            ids = [str(m["id"]) for m in models]
            wanted = self.config.model or (ids[0] if ids else "")
            if not wanted:
                raise RemoteUnavailable(f"{self.display_url} serves no model")
            if wanted not in ids and f"{wanted}:latest" in ids:
                wanted = f"{wanted}:latest"  # Ollama lists the tag that a bare name means
            if ids and wanted not in ids:
                raise RemoteUnavailable(
                    f"{self.display_url} does not serve {wanted!r}; it serves {', '.join(ids[:8])}"
                )
            entry = next((m for m in models if m["id"] == wanted), {})
            self.vllm = entry.get("owned_by") == "vllm"
            # vLLM's window. llama.cpp lists only the training context, which its -c may be below.
            reported = entry.get("max_model_len")
            self.name = wanted
            if not self.config.max_context and isinstance(reported, int) and reported > 0:
                self.max_context = reported
            self.supports_infilling = self._infilling(wanted)
        except ModelError as exc:
            self._mark(str(exc))
            return
        if self.unavailable is not None:
            self.log.info("Code Llama remote model %r at %s is available", self.name, self.display_url)
        self.unavailable = None

    def _mark(self, reason: str) -> None:
        if reason != self.unavailable:
            self.log.warning("Code Llama remote at %s is unavailable: %s", self.display_url, reason)
        self.unavailable = reason

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            interval = self.config.probe_interval
            if self.unavailable is not None:
                interval = min(interval, ERROR_PROBE_INTERVAL)
            woken = self._wake.wait(interval)
            self._wake.clear()
            # A stream flowing now is proof enough; and llama-cpp-python answers /v1/models only
            # between generations, so a probe then could time out on a healthy server.
            if self._stop.is_set() or (self.streaming and not woken and self.unavailable is None):
                continue
            try:
                self.probe()
            except Exception:  # the status must recover once the server does: this thread lives on
                self.log.exception("Code Llama: the remote health check failed unexpectedly")

    def _infilling(self, name: str) -> bool:
        if self.config.fim == "off":
            return False
        if self.tokenizer is not None:
            return self.tokenizer.supports_infilling
        # Without a tokenizer to ask, "auto" trusts the name; spm/psm say the model infills.
        return self.config.fim != "auto" or not _NO_FIM_NAMES.search(name)

    # -- HTTP ---------------------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        key = self.config.api_key
        return text.replace(key, "***") if key else text

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream", "User-Agent": "jupyter-codellama"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    def _connection(self, read_timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        connection = cls(self.host, self.port, timeout=self.config.connect_timeout)
        try:
            connection.connect()
        except OSError as exc:
            connection.close()
            raise RemoteUnavailable(self._network_reason(exc, connecting=True)) from exc
        assert connection.sock is not None
        connection.sock.settimeout(read_timeout)
        return connection

    def open(
        self,
        method: str,
        path: str,
        body: dict | None,
        read_timeout: float,
        on_connect: Callable[[http.client.HTTPConnection], None] | None = None,
    ) -> _Response:
        """One request; raises RemoteUnavailable (network, overload) or ModelError (refused) unless 200.

        `on_connect` gets the connection before the request is sent, so that another thread can shut
        it while the server has not answered yet (a queue, a model loading, a long prefill).
        """
        connection = self._connection(read_timeout)
        if on_connect is not None:
            on_connect(connection)
        try:
            payload = None if body is None else json.dumps(body).encode("utf-8")
            headers = self._headers()
            if payload is not None:
                headers["Content-Type"] = "application/json"
            connection.request(method, self.prefix + path, body=payload, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise RemoteUnavailable(self._network_reason(exc)) from exc
        if response.status == 200:
            return _Response(connection, response)
        try:
            detail = response.read(2000).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            detail = ""
        connection.close()
        raise self._status_error(response.status, detail)

    def _get_json(self, path: str) -> dict:
        opened = self.open("GET", path, None, min(self.config.read_timeout, 10.0))
        where = f"{self.display_url}{path.removeprefix('/v1')}"
        try:
            content = json.loads(opened.response.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise RemoteUnavailable(f"{where} answered unreadably: {exc}") from exc
        finally:
            opened.connection.close()
        if not isinstance(content, dict):
            raise RemoteUnavailable(f"{where} answered with JSON that is not an object")
        return content

    def _network_reason(self, exc: BaseException, connecting: bool = False) -> str:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, socket.timeout | TimeoutError):
            what = "connecting" if connecting else "waiting for an answer"
            limit = self.config.connect_timeout if connecting else self.config.read_timeout
            return f"the remote server {where} timed out ({what}, {limit:g} s)"
        if isinstance(exc, ConnectionRefusedError):
            return f"the remote server {where} is unreachable (connection refused)"
        if isinstance(exc, socket.gaierror):
            return f"the remote server's host {self.host!r} is unknown ({exc.strerror})"
        return self.redact(f"the remote server {where} is unreachable ({type(exc).__name__}: {exc})")

    def _status_error(self, status: int, detail: str) -> ModelError:
        message = _error_message(detail) or http.client.responses.get(status, "")
        message = self.redact(message)[:300]
        if status in (401, 403):
            return KeyRefused(f"the remote server refused the API key (HTTP {status}): {message}")
        if status in _RETRY_STATUSES:
            return RemoteUnavailable(f"the remote server is not ready (HTTP {status}): {message}")
        return ModelError(f"the remote server rejected the request (HTTP {status}): {message}")


def _error_message(detail: str) -> str:
    """The human part of an OpenAI-style error body (`{"error": {"message"}}`, `{"detail"}`...)."""
    try:
        data = json.loads(detail)
    except ValueError:
        return detail.strip()
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)
    return detail.strip()


def local_finish_reason(server_reason: str, ended: bool) -> str:
    """A server's finish reason in the local engine's words (StreamStats.finish_reason).

    Only "length" says the text was cut off. Servers name a natural end differently ("stop" in vLLM
    and llama.cpp, "eos_token" and "stop_sequence" in TGI) or not at all: a stream the server
    finished is an end; one the reader left early is "closed".
    """
    if server_reason == "length":
        return "length"
    return "end" if ended else "closed"


class StreamFailed(Exception):
    """The server reported a failure inside the stream (llama.cpp's server sends an `error:` line)."""


def sse_events(response: http.client.HTTPResponse) -> Iterator[str]:
    """The data of each Server-Sent Event; comments (llama.cpp's pings) and other fields are skipped,
    an `error` field raises StreamFailed with its text."""
    data: list[str] = []
    while True:
        raw = response.readline()
        if not raw:
            if data:
                yield "\n".join(data)
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("error:"):
            raise StreamFailed(line[6:].strip())


class RemoteStream:
    """One streamed completion; cancel, the deadline or `close` shut the connection, which aborts upstream."""

    def __init__(
        self,
        engine: OpenAIEngine,
        body: dict,
        prompt_tokens: int,
        healer: Healer,
        deadline: float | None,
        cancel: threading.Event,
    ) -> None:
        self.engine = engine
        self.body = body
        self.healer = healer
        self.deadline = deadline
        self.cancel = cancel
        self.stats = StreamStats(prompt_tokens=prompt_tokens)
        self.finish_reason = ""  # the server's word for how the text ended, when it says
        self._ended = False
        self._connection: http.client.HTTPConnection | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._steps: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        if self._steps is None:
            self._steps = self._run()
        return self._steps

    def _run(self) -> Iterator[str]:
        started = time.perf_counter()
        first: float | None = None
        chunks = 0
        try:
            # Watching from before the request: a cancel must reach a server that has not answered yet.
            threading.Thread(target=self._watch, name="codellama-remote-cancel", daemon=True).start()
            opened = self._open_with_retries()
            if opened is None:
                return
            self.engine.streaming = True
            finished = False  # "[DONE]": the server says the stream is complete
            try:
                for data in sse_events(opened.response):
                    if data == "[DONE]":
                        finished = True
                        break
                    text, usage = self._parse(data)
                    if usage:
                        self._usage(usage)
                    if not text:
                        continue
                    if first is None:
                        first = time.perf_counter()
                    chunks += 1
                    visible = self.healer.push(text)
                    if visible:
                        yield visible
                # Ended, not cut: a server that closes without "[DONE]" or a finish reason failed
                # (llama-cpp-python does so on a prompt longer than its context).
                self._ended = finished or bool(self.finish_reason)
                if not self._ended and not chunks and not self._stopped():
                    raise ModelError(
                        "the remote server ended the stream without an answer; its log may say why "
                        "(a prompt longer than its context?)"
                    )
            except StreamFailed as exc:
                message = self.engine.redact(_error_message(str(exc)))[:300]
                raise ModelError(f"the remote server failed: {message}") from exc
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if not self._stopped():
                    reason = self.engine._network_reason(exc) if isinstance(exc, OSError) else str(exc)
                    raise ModelError(f"the remote stream broke: {reason}") from exc
            tail = self.healer.finish()
            if tail:
                yield tail
        finally:
            self.engine.streaming = False
            self._disconnect()
            end = time.perf_counter()
            self.stats.prefill_ms = ((first or end) - started) * 1000
            self.stats.decode_ms = (end - (first or end)) * 1000
            self.stats.finish_reason = self._finish_reason()
            if not self.stats.completion_tokens:
                # Servers that do not report usage in a stream send about one token per event.
                self.stats.completion_tokens = chunks

    def _finish_reason(self) -> str:
        if self.cancel.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return local_finish_reason(self.finish_reason, self._ended)

    def _open_with_retries(self) -> _Response | None:
        engine = self.engine
        attempts = max(0, engine.config.retries) + 1
        for attempt in range(attempts):
            if self._stopped():
                return None
            try:
                read_timeout = engine.config.read_timeout  # the deadline is the watcher's: see `_watch`
                opened = engine.open(
                    "POST", "/v1/completions", self.body, read_timeout, on_connect=self._attach
                )
            except RemoteUnavailable as exc:
                if self._stopped():
                    # The cancel or the deadline shut the connection: not the server's fault. But a
                    # server that let a whole request pass without answering deserves a look now.
                    if not self.cancel.is_set():
                        engine.reset()
                    return None
                last = attempt == attempts - 1 or isinstance(exc, KeyRefused)
                wait = min(0.25 * 2**attempt, 2.0)
                if last or (self.deadline is not None and time.monotonic() + wait > self.deadline):
                    engine._mark(str(exc))
                    engine.reset()
                    raise
                if self.cancel.wait(wait):
                    return None
                continue
            return opened
        return None

    def _attach(self, connection: http.client.HTTPConnection) -> None:
        """The connection a request is about to go out on: the one `_interrupt` shuts."""
        with self._lock:
            self._connection = connection
            stopped = self._done.is_set()
        if stopped:  # the watcher gave up before this connection existed
            self._shut(connection)

    def _parse(self, data: str) -> tuple[str, dict | None]:
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise ModelError(f"the remote server sent an unreadable event: {data[:120]!r}") from exc
        if not isinstance(event, dict):
            return "", None
        if "error" in event:
            raise ModelError(f"the remote server failed: {self.engine.redact(_error_message(data))[:300]}")
        text = ""
        for choice in event.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                text = choice.get("text") or ""
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
        usage = event.get("usage")
        return text, usage if isinstance(usage, dict) else None

    def _usage(self, usage: dict) -> None:
        if isinstance(usage.get("prompt_tokens"), int):
            self.stats.prompt_tokens = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            self.stats.completion_tokens = usage["completion_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.stats.cached_tokens = details["cached_tokens"]

    def _stopped(self) -> bool:
        past = self.deadline is not None and time.monotonic() >= self.deadline
        return self.cancel.is_set() or past or self._done.is_set()

    def _watch(self) -> None:
        """Shut the socket as soon as the request is cancelled or out of time, unblocking the read."""
        while not self._done.is_set():
            timeout = 1.0
            if self.deadline is not None:
                timeout = min(timeout, max(0.0, self.deadline - time.monotonic()))
            if self.cancel.wait(timeout) or (self.deadline is not None and time.monotonic() >= self.deadline):
                self._interrupt()
                return

    def close(self) -> None:
        """End the stream early; `stats` are final when this returns."""
        self._done.set()
        if self._steps is not None:
            self._steps.close()  # runs the generator's cleanup: the connection, the timings
        self._disconnect()

    def _interrupt(self) -> None:
        """From any thread: shut the socket down, so the worker's blocked read returns at once.

        Only the socket: closing the connection object under a reading thread races http.client.
        """
        with self._lock:
            self._done.set()
            connection = self._connection
        if connection is not None:
            self._shut(connection)

    @staticmethod
    def _shut(connection: http.client.HTTPConnection) -> None:
        sock = connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _disconnect(self) -> None:
        """On the worker thread: drop the connection; vLLM and llama.cpp abort a generation whose client went away."""
        self._interrupt()
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
