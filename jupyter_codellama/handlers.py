"""REST and websocket endpoints under /codellama, authenticated exactly like the server's own APIs.

Browser requests go through the Jupyter server's identity provider (token or cookie), XSRF check
on POST and Origin check on the websocket. Kernels started by this server may instead present the
per-server key the extension put into their environment (`X-CodeLlama-Key`); a request that carries
it must not come from a browser (no Origin header) and must name a host this server accepts.

Whatever a client sends, it gets one answer per message: a result, or an error of one sentence.
Unexpected failures are logged here with their traceback and reach the client only as a sentence.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado import web
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from kernel_model import ModelError

from .protocol import (
    MAX_ID_LENGTH,
    Limits,
    MessageTooLarge,
    ProtocolError,
    decode_message,
    leading_id,
    parse_completion,
    request_id,
)
from .service import Busy, Job, ModelService

AUTH_RESOURCE = "codellama"
KEY_HEADER = "X-CodeLlama-Key"
KERNEL_USER = User(username="codellama-kernel", name="Code Llama kernel client")
UNEXPECTED = "the server could not handle this request; its log has the details"
# Messages up to this multiple of the size limit are read and refused with an error, the socket kept
# open; tornado closes the connection (1009) on larger ones before buffering them.
WS_READ_FACTOR = 4
# Replies a client has not read yet (bytes): a client that sends but never reads is disconnected
# rather than left to grow the server's write buffer without end.
MAX_UNSENT_BYTES = 8 << 20


class KernelKeyMixin:
    """What every /codellama endpoint shares: the service and limits, and the kernels' per-server key."""

    @property
    def service(self) -> ModelService:
        return self.settings["codellama_service"]

    @property
    def limits(self) -> Limits:
        return self.settings["codellama_limits"]

    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        handler: JupyterHandler = self  # type: ignore[assignment]
        offered = handler.request.headers.get(KEY_HEADER)
        if offered is None:
            return await super().prepare(*args, **kwargs)  # type: ignore[misc]
        key = handler.settings.get("codellama_kernel_key", "")
        valid = bool(key) and hmac.compare_digest(offered.encode(), key.encode()) and handler.check_host()
        # Kernels are not browsers: a page that somehow learned the key still cannot use it.
        if not valid or handler.request.headers.get("Origin") is not None:
            # Known to be nobody, so that rendering the 403 does not ask the identity provider.
            handler.current_user = handler._jupyter_current_user = None
            raise web.HTTPError(403)
        handler.current_user = handler._jupyter_current_user = KERNEL_USER
        return None


class CodeLlamaAPIHandler(KernelKeyMixin, APIHandler):
    auth_resource = AUTH_RESOURCE

    def reply_error(self, status: int, message: str) -> None:
        self.set_status(status)
        self.finish({"error": message})


class StatusHandler(CodeLlamaAPIHandler):
    @web.authenticated
    @authorized("read")
    def get(self) -> None:
        self.finish(self.service.status())


class CompleteHandler(CodeLlamaAPIHandler):
    job: Job | None = None

    @web.authenticated
    @authorized("execute")
    async def post(self) -> None:
        try:
            body = decode_message(self.request.body, self.limits.max_message_bytes)
            request = parse_completion(body, self.limits)
        except MessageTooLarge as exc:
            return self.reply_error(413, str(exc))
        except ProtocolError as exc:
            return self.reply_error(400, str(exc))
        except Exception:
            self.log.exception("Code Llama: unexpected failure reading a completion request")
            return self.reply_error(500, UNEXPECTED)
        self.job = job = Job(id="rest", request=request, loop=asyncio.get_running_loop())
        try:
            self.service.submit(job)
        except (Busy, ModelError) as exc:
            return self.reply_error(503, str(exc))
        try:
            while True:
                event = await job.next_event()
                if event["type"] == "error":
                    return self.reply_error(job.failure_status, event["message"])
                if event["type"] == "done":
                    event.pop("type")
                    return self.finish(event)
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    def on_connection_close(self) -> None:
        # The client went away (tornado does not cancel the coroutine): free the worker at once.
        if self.job is not None:
            self.job.cancel.set()
        super().on_connection_close()


class CompletionSocket(KernelKeyMixin, WebSocketMixin, WebSocketHandler, JupyterHandler):
    """One socket per browser tab; many requests over it, each answered by chunks and one final message."""

    auth_resource = AUTH_RESOURCE

    def set_default_headers(self) -> None:
        """JupyterHandler's page headers mean nothing on a websocket."""

    @property
    def max_message_size(self) -> int:
        return WS_READ_FACTOR * self.limits.max_message_bytes

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "execute", AUTH_RESOURCE)
        )
        if not allowed:
            raise web.HTTPError(403)
        await super().get(*args, **kwargs)

    def open(self, *args: Any, **kwargs: Any) -> None:
        super().open(*args, **kwargs)
        self.jobs: dict[str, Job] = {}
        self.forwarders: set[asyncio.Task] = set()
        self.sockets.add(self)
        self.unsent = 0  # bytes written but not yet flushed to the client

    def on_message(self, message: str | bytes) -> None:
        reply_id = None
        try:
            body = decode_message(message, self.limits.max_message_bytes)
            kind = body.get("type")
            given_id = body.get("id")
            if isinstance(given_id, str) and 0 < len(given_id) <= MAX_ID_LENGTH:
                reply_id = given_id
            if kind == "cancel":
                self.cancel(request_id(body))
            elif kind == "complete":
                self.start(request_id(body), body)
            else:
                raise ProtocolError("'type' must be 'complete' or 'cancel'")
        except MessageTooLarge as exc:
            # Answered with the request's id, or the client would wait on it for ever.
            self.send({"type": "error", "id": leading_id(message), "message": str(exc)})
        except Busy as exc:
            self.send({"type": "error", "id": reply_id, "message": str(exc), "busy": True})
        except (ProtocolError, ModelError) as exc:
            self.send({"type": "error", "id": reply_id, "message": str(exc)})
        except Exception:
            # Tornado would close the socket on an exception escaping on_message: answer instead.
            self.log.exception("Code Llama: unexpected failure on a websocket message")
            self.send({"type": "error", "id": reply_id, "message": UNEXPECTED})

    def cancel(self, job_id: str) -> None:
        """Stop a request of this socket or, failing that, another socket's with that id.

        The magic's answer streams over the kernel's own socket while its Stop button lives in the
        browser's; the id (a random one for the magic) is what they share.
        """
        owners = [self] + [socket for socket in self.sockets if socket is not self]
        for socket in owners:
            job = socket.jobs.get(job_id)
            if job is not None:
                job.cancel.set()
                return

    @property
    def sockets(self) -> set[CompletionSocket]:
        return self.settings.setdefault("codellama_sockets", set())

    def start(self, job_id: str, body: dict[str, Any]) -> None:
        if job_id in self.jobs:
            raise ProtocolError(f"a request with id {job_id!r} is still running")
        request = parse_completion(body, self.limits)
        for older in self.jobs.values():
            if older.request.target == request.target:
                older.cancel.set()  # the user typed on: the older suggestion is stale
        # Fewer than the service's queue holds: one tab cannot take every place in it.
        cap = self.limits.max_in_flight
        if len([j for j in self.jobs.values() if not j.cancel.is_set()]) >= cap:
            raise Busy(f"at most {cap} requests may run at once on one connection")
        job = Job(id=job_id, request=request, loop=asyncio.get_running_loop())
        self.service.submit(job)
        self.jobs[job_id] = job
        task = asyncio.create_task(self.forward(job))
        self.forwarders.add(task)
        task.add_done_callback(self.forwarders.discard)

    async def forward(self, job: Job) -> None:
        try:
            while True:
                event = await job.next_event()
                self.send({**event, "id": job.id})
                if event["type"] != "chunk":
                    return
        finally:
            self.jobs.pop(job.id, None)

    def send(self, message: dict[str, Any]) -> None:
        if self.ws_connection is None or self.ws_connection.is_closing():
            return
        if self.unsent > MAX_UNSENT_BYTES:
            self.log.warning("Code Llama: closing a websocket whose client does not read its replies")
            self.close(1008, "replies are not being read")
            return
        data = json.dumps(message)
        try:
            written = self.write_message(data)
        except WebSocketClosedError:
            return
        self.unsent += len(data)
        written.add_done_callback(lambda done: self._flushed(done, len(data)))

    def _flushed(self, done: asyncio.Future, size: int) -> None:
        self.unsent -= size
        if not done.cancelled():
            done.exception()  # a closed socket's failure is expected: retrieve it so it is not logged

    def on_close(self) -> None:
        # A client that disconnects mid-stream frees the worker at once.
        for job in getattr(self, "jobs", {}).values():
            job.cancel.set()
        self.sockets.discard(self)
        super().on_close()


def handlers() -> list[tuple[str, type]]:
    return [
        (r"/codellama/status", StatusHandler),
        (r"/codellama/complete", CompleteHandler),
        (r"/codellama/ws", CompletionSocket),
    ]
