"""REST and websocket endpoints under /codellama, authenticated exactly like the server's own APIs.

Browser requests go through the Jupyter server's identity provider (token or cookie), XSRF check
on POST and Origin check on the websocket. Kernels started by this server may instead present the
per-server key the extension put into their environment (`X-CodeLlama-Key`).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from .protocol import ProtocolError, decode_message, parse_completion, request_id
from .service import Busy, Job, ModelService

AUTH_RESOURCE = "codellama"
KEY_HEADER = "X-CodeLlama-Key"
KERNEL_USER = User(username="codellama-kernel", name="Code Llama kernel client")
# Fewer than the service's queue: one tab cannot take every place in it.
MAX_IN_FLIGHT_PER_CONNECTION = 4


class KernelKeyMixin:
    """Accept the per-server key that kernels of this server hold, besides the usual credentials."""

    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        handler: JupyterHandler = self  # type: ignore[assignment]
        offered = handler.request.headers.get(KEY_HEADER)
        if offered is None:
            return await super().prepare(*args, **kwargs)  # type: ignore[misc]
        key = handler.settings.get("codellama_kernel_key", "")
        if not key or not hmac.compare_digest(offered.encode(), key.encode()) or not handler.check_host():
            raise web.HTTPError(403)
        handler.current_user = handler._jupyter_current_user = KERNEL_USER
        return None


class CodeLlamaAPIHandler(KernelKeyMixin, APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def service(self) -> ModelService:
        return self.settings["codellama_service"]

    def reply_error(self, status: int, message: str) -> None:
        self.set_status(status)
        self.finish({"error": message})


class StatusHandler(CodeLlamaAPIHandler):
    @web.authenticated
    @authorized("read")
    def get(self) -> None:
        self.finish(self.service.status())


class CompleteHandler(CodeLlamaAPIHandler):
    @web.authenticated
    @authorized("execute")
    async def post(self) -> None:
        try:
            request = parse_completion(decode_message(self.request.body), self.settings["codellama_limits"])
        except ProtocolError as exc:
            return self.reply_error(400, str(exc))
        job = Job(id="rest", request=request, loop=asyncio.get_running_loop())
        try:
            self.service.submit(job)
        except Busy as exc:
            return self.reply_error(503, str(exc))
        except ModelError as exc:
            return self.reply_error(503, str(exc))
        try:
            while True:
                event = await job.events.get()
                if event["type"] == "error":
                    return self.reply_error(400, event["message"])
                if event["type"] == "done":
                    event.pop("type")
                    return self.finish(event)
        except asyncio.CancelledError:
            job.cancel.set()  # the client went away
            raise


class CompletionSocket(KernelKeyMixin, WebSocketMixin, WebSocketHandler, JupyterHandler):
    """One socket per browser tab; many requests over it, each answered by chunks and one final message."""

    auth_resource = AUTH_RESOURCE

    def set_default_headers(self) -> None:
        """JupyterHandler's page headers mean nothing on a websocket."""

    @property
    def service(self) -> ModelService:
        return self.settings["codellama_service"]

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

    def on_message(self, message: str | bytes) -> None:
        reply_id = None
        try:
            body = decode_message(message)
            kind = body.get("type")
            reply_id = body.get("id") if isinstance(body.get("id"), str) else None
            if kind == "cancel":
                job = self.jobs.get(request_id(body))
                if job is not None:
                    job.cancel.set()
            elif kind == "complete":
                self.start(request_id(body), body)
            else:
                raise ProtocolError("'type' must be 'complete' or 'cancel'")
        except (ProtocolError, ModelError, Busy) as exc:
            self.send({"type": "error", "id": reply_id, "message": str(exc)})

    def start(self, job_id: str, body: dict[str, Any]) -> None:
        if job_id in self.jobs:
            raise ProtocolError(f"a request with id {job_id!r} is still running")
        request = parse_completion(body, self.settings["codellama_limits"])
        for older in self.jobs.values():
            if older.request.target == request.target:
                older.cancel.set()  # the user typed on: the older suggestion is stale
        if len([j for j in self.jobs.values() if not j.cancel.is_set()]) >= MAX_IN_FLIGHT_PER_CONNECTION:
            raise Busy(f"at most {MAX_IN_FLIGHT_PER_CONNECTION} requests may run at once per connection")
        job = Job(id=job_id, request=request, loop=asyncio.get_running_loop())
        self.service.submit(job)
        self.jobs[job_id] = job
        task = asyncio.create_task(self.forward(job))
        self.forwarders.add(task)
        task.add_done_callback(self.forwarders.discard)

    async def forward(self, job: Job) -> None:
        try:
            while True:
                event = await job.events.get()
                self.send({**event, "id": job.id})
                if event["type"] != "chunk":
                    return
        finally:
            self.jobs.pop(job.id, None)

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(WebSocketClosedError):
            self.write_message(json.dumps(message))

    def on_close(self) -> None:
        # A client that disconnects mid-stream frees the worker at once.
        for job in getattr(self, "jobs", {}).values():
            job.cancel.set()
        super().on_close()


def handlers() -> list[tuple[str, type]]:
    return [
        (r"/codellama/status", StatusHandler),
        (r"/codellama/complete", CompleteHandler),
        (r"/codellama/ws", CompletionSocket),
    ]
