"""How the %%codellama magic reaches a model: the Jupyter server's, or (with no server) one loaded in the kernel.

The server extension announces itself to the kernels it starts through two environment variables:
`JUPYTER_CODELLAMA_URL` (its base URL) and `JUPYTER_CODELLAMA_KEY` (a per-server secret sent as
`X-CodeLlama-Key`). With the URL set the magic only ever talks to that server, so a 13 GB model is
never loaded a second time; without it the kernel loads `JUPYTER_CODELLAMA_MODEL` itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .postprocess import StreamTrimmer, was_cut_off

URL_ENV = "JUPYTER_CODELLAMA_URL"
KEY_ENV = "JUPYTER_CODELLAMA_KEY"
MODEL_ENV = "JUPYTER_CODELLAMA_MODEL"
CAFILE_ENV = "JUPYTER_CODELLAMA_CAFILE"  # an https server's certificate, for its kernels to trust
KEY_HEADER = "X-CodeLlama-Key"
HTTP_TIMEOUT = 10.0  # seconds; the server answers status at once, even while a generation runs
LOAD_WAIT = 600.0  # seconds to wait for a server whose model is still loading (13 GB from a slow disk)
CANCEL_POLL = 0.05  # seconds between looks at the cancel flag while a generation streams


class CodeLlamaError(Exception):
    """A problem the user can act on: shown as one line, never as a traceback."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this list in place of a traceback (the hook ipyparallel uses).
        return [f"codellama: {self}"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    supports_infilling: bool
    max_context: int  # tokens the prompt and the answer share
    device: str = ""
    dtype: str = ""
    quant: str = ""  # "int8" when the server holds the matrices quantized
    instruct: bool = False

    def __post_init__(self) -> None:
        # A server may say so; otherwise Meta's and Hugging Face's names carry "Instruct".
        object.__setattr__(self, "instruct", self.instruct or "instruct" in self.name.lower())

    @classmethod
    def from_status(cls, model: Mapping[str, Any]) -> ModelInfo:
        name = str(model.get("name") or "")
        return cls(
            name=name,
            supports_infilling=bool(model.get("supports_infilling")),
            max_context=int(model.get("max_context") or 2048),
            device=str(model.get("device") or ""),
            dtype=str(model.get("dtype") or ""),
            quant=str(model.get("quant") or ""),
            instruct=bool(model.get("instruct")),
        )


@dataclass(frozen=True)
class GenerationRequest:
    id: str
    prefix: str
    suffix: str
    infill: bool  # False: `prefix` is the whole prompt, continued left to right
    max_new_tokens: int
    temperature: float
    stop: tuple[str, ...] = ()

    def message(self) -> dict[str, Any]:
        """The request in the server's protocol; mode "none": the magic wants the whole answer, not a line or block."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "suffix": self.suffix,
            "infill": self.infill,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "mode": "none",
            "stop": list(self.stop),
        }


@dataclass(frozen=True)
class Outcome:
    text: str
    completion_tokens: int
    decode_ms: float
    cancelled: bool
    finish_reason: str = ""  # the server's words (protocol): "length" and "deadline" cut the text off


class Backend(Protocol):
    kind: str  # "server" | "kernel": where the model runs
    description: str

    def model_info(self) -> ModelInfo: ...

    def status_line(self) -> str: ...

    def generate(
        self, request: GenerationRequest, on_text: Callable[[str], None], cancel: threading.Event
    ) -> Outcome: ...


def tls_context(cafile: str | None) -> ssl.SSLContext:
    """Trust for the kernel's own server: its certificate (self-signed or not) or the system's CAs.

    The kernel dials the server's loopback address, which the certificate does not name (it names
    the host users browse to), so the name is not checked; the certificate still is.
    """
    context = ssl.create_default_context()
    if cafile:
        try:
            context.load_verify_locations(cafile)
        except (OSError, ssl.SSLError) as exc:
            raise CodeLlamaError(f"cannot read the Jupyter server's certificate {cafile}: {exc}") from None
    context.check_hostname = False
    # The server's own certificate is enough even when a private CA signed it (the default before
    # Python 3.13 wants the whole chain up to a root).
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def backend_from_environment(environ: Mapping[str, str] | None = None) -> Backend:
    environ = os.environ if environ is None else environ
    url = environ.get(URL_ENV)
    if url:
        key = environ.get(KEY_ENV)
        if not key:
            raise CodeLlamaError(f"{URL_ENV} is set but {KEY_ENV} is not: restart the kernel from the server")
        return ServerBackend(url, key, environ.get(CAFILE_ENV) or None)
    return kernel_backend(environ.get(MODEL_ENV) or "embedded")


class ServerBackend:
    """The model the Jupyter server hosts: status over HTTP, generation streamed over its websocket."""

    kind = "server"

    def __init__(self, url: str, key: str, cafile: str | None = None) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.key = key
        self.description = f"the Jupyter server at {self.url}"
        self._tls = tls_context(cafile) if self.url.startswith("https:") else None
        # The server is this user's own: a proxy from the environment has no business in between.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self._tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self._tls))
        self._opener = urllib.request.build_opener(*handlers)

    def status(self) -> dict[str, Any]:
        request = urllib.request.Request(self.url + "codellama/status", headers={KEY_HEADER: self.key})
        try:
            with self._opener.open(request, timeout=HTTP_TIMEOUT) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise self._refused(exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CodeLlamaError(
                f"cannot reach the Jupyter server at {self.url} ({reason}); {URL_ENV} names it. Restart "
                "the kernel from a running server (the model is not loaded in the kernel a second time)"
            ) from None
        except ValueError:
            raise CodeLlamaError(
                f"{self.url}codellama/status did not answer JSON: is it a Jupyter server?"
            ) from None

    def _refused(self, code: int) -> CodeLlamaError:
        if code in (401, 403):
            return CodeLlamaError(
                f"the Jupyter server at {self.url} refused this kernel's key ({KEY_ENV}): "
                "restart the kernel from that server"
            )
        if code == 404:
            return CodeLlamaError(f"the Jupyter server at {self.url} has no codellama extension enabled")
        return CodeLlamaError(f"the Jupyter server at {self.url} answered HTTP {code}")

    def model_info(self) -> ModelInfo:
        deadline = time.monotonic() + LOAD_WAIT
        said = False
        while True:
            status = self.status()
            state = status.get("state")
            if state == "ready":
                return ModelInfo.from_status(status.get("model") or {})
            if state == "error":
                raise CodeLlamaError(f"the server's model could not be loaded: {status.get('error')}")
            if time.monotonic() > deadline:
                raise CodeLlamaError(f"the server's model is still loading after {LOAD_WAIT:.0f} s")
            if not said:
                print("codellama: waiting for the server's model to load…", flush=True)
                said = True
            time.sleep(0.5)

    def status_line(self) -> str:
        status = self.status()
        model = status.get("model") or {}
        if status.get("state") == "error":
            return f"{self.description}: the model failed to load: {status.get('error')}"
        if status.get("state") != "ready":
            return f"{self.description}: loading {model.get('name')}"
        return f"{self.description}: {describe_model(ModelInfo.from_status(model))}"

    def generate(
        self, request: GenerationRequest, on_text: Callable[[str], None], cancel: threading.Event
    ) -> Outcome:
        # Runs on the job's worker thread, which has no event loop of its own yet.
        return asyncio.run(self._generate(request, on_text, cancel))

    async def _generate(
        self, request: GenerationRequest, on_text: Callable[[str], None], cancel: threading.Event
    ) -> Outcome:
        from tornado.httpclient import HTTPClientError, HTTPRequest
        from tornado.websocket import websocket_connect

        ws_url = "ws" + self.url.removeprefix("http") + "codellama/ws"
        try:
            connection = await websocket_connect(
                HTTPRequest(
                    ws_url,
                    headers={KEY_HEADER: self.key},
                    connect_timeout=HTTP_TIMEOUT,
                    ssl_options=self._tls,
                )
            )
        except HTTPClientError as exc:
            raise self._refused(exc.code) from None
        except OSError as exc:
            raise CodeLlamaError(f"cannot reach the Jupyter server at {self.url} ({exc})") from None

        async def forward_cancel() -> None:
            while not cancel.is_set():
                await asyncio.sleep(CANCEL_POLL)
            await connection.write_message(json.dumps({"type": "cancel", "id": request.id}))

        watcher = asyncio.create_task(forward_cancel())
        try:
            await connection.write_message(json.dumps({"type": "complete", **request.message()}))
            while True:
                raw = await connection.read_message()
                if raw is None:
                    raise CodeLlamaError(
                        "the Jupyter server closed the connection before the answer was complete"
                    )
                message = json.loads(raw)
                if message.get("id") not in (request.id, None):
                    continue
                if message.get("type") == "chunk":
                    on_text(message.get("text", ""))
                elif message.get("type") == "error":
                    raise CodeLlamaError(f"the server could not answer: {message.get('message')}")
                elif message.get("type") == "done":
                    usage, timings = message.get("usage") or {}, message.get("timings") or {}
                    return Outcome(
                        text=message.get("text", ""),
                        completion_tokens=int(usage.get("completion_tokens", 0)),
                        decode_ms=float(timings.get("decode_ms", 0.0)),
                        cancelled=bool(message.get("cancelled")),
                        finish_reason=str(message.get("finish_reason") or ""),
                    )
        finally:
            watcher.cancel()
            connection.close()


_KERNEL_BACKENDS: dict[str, KernelBackend] = {}


def kernel_backend(path: str) -> KernelBackend:
    """One in-kernel model per checkpoint, however often the extension is reloaded."""
    if path not in _KERNEL_BACKENDS:
        _KERNEL_BACKENDS[path] = KernelBackend(path)
    return _KERNEL_BACKENDS[path]


class KernelBackend:
    """No server announced itself: the model is loaded into this kernel, once, on first use."""

    kind = "kernel"
    loads = 0  # how many models this process has loaded; tests read it

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = f"a model in this kernel ({path})"
        self._model: Any = None
        self._lock = threading.Lock()

    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                print(
                    f"codellama: no Jupyter server announced a model ({URL_ENV} is unset), "
                    f"so this kernel loads {self.path} itself",
                    flush=True,
                )
                # Imported here: with a server, the kernel never imports torch at all.
                from kernel_model import ModelError, load_model

                try:
                    self._model = load_model(self.path)
                except ModelError as exc:
                    raise CodeLlamaError(
                        f"cannot load the model from {MODEL_ENV}={self.path}: {exc}"
                    ) from None
                KernelBackend.loads += 1
            return self._model

    def model_info(self) -> ModelInfo:
        model = self.model()
        return ModelInfo.from_status(model.info())

    def status_line(self) -> str:
        if self._model is None:
            return f"{self.description}: not loaded yet; it loads on first use"
        return f"{self.description}: {describe_model(self.model_info())}"

    def generate(
        self, request: GenerationRequest, on_text: Callable[[str], None], cancel: threading.Event
    ) -> Outcome:
        from kernel_model import ModelError

        model = self.model()
        sampling = {"max_new_tokens": request.max_new_tokens, "temperature": request.temperature,
                    "stop": request.stop, "cancel": cancel}  # fmt: skip
        try:
            # The server's rule, so both backends answer alike: SPM infilling when asked and
            # possible, else a left-to-right continuation of the prefix.
            if request.infill and model.supports_infilling:
                generation = model.stream_infill(
                    request.prefix, request.suffix, suffix_first=True, **sampling
                )
            else:
                generation = model.stream_complete(request.prefix, **sampling)
            # The server trims its answers so (repeats, trailing space, line breaks): answer alike.
            trimmer = StreamTrimmer(mode="none", prefix=request.prefix, suffix=request.suffix)
            shown = []
            for visible in trimmer.feed(generation):
                shown.append(visible)
                on_text(visible)
            generation.close()  # at the trimmer's stop point: generate no more
        except ModelError as exc:
            raise CodeLlamaError(str(exc)) from None
        result = generation.result
        tail = trimmer.finish(truncated=was_cut_off(result.finish_reason))
        if tail:
            shown.append(tail)
            on_text(tail)
        return Outcome(
            "".join(shown),
            result.completion_tokens,
            result.decode_ms,
            result.finish_reason == "cancelled",
            result.finish_reason,
        )


def describe_model(info: ModelInfo) -> str:
    infilling = "infills" if info.supports_infilling else "cannot infill"
    style = "Instruct" if info.instruct else "base"
    weights = f"{info.quant} weights" if info.quant else ""
    where = " ".join(part for part in (info.device, info.dtype, weights) if part)
    return (
        f"{info.name} ({style}, {infilling}, {info.max_context}-token window{', ' + where if where else ''})"
    )
