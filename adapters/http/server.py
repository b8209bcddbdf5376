"""The HTTP adapter: an ASGI app (Starlette) served by uvicorn inside the bot's process.

Routes: the OpenAI-compatible API (/v1/chat/completions, /v1/models), the web chat page at `/`
with its conversation and image routes, /health and /metrics. Every request gets a request id
(`X-Request-ID`, echoed), one access-log line and its metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.http import admin_api
from adapters.http import openai_api as api
from adapters.http.admin_api import AdminApi
from adapters.http.completions import Completions, Exchange, language
from adapters.http.errors import ApiError
from adapters.http.guard import (
    Authenticator,
    Caller,
    ClientGone,
    RateLimiter,
    check_bind,
    owned_conversation,
    owned_prefix,
    read_body,
)
from adapters.http.logs import LogFiles, access_log, error_log, kv
from adapters.http.metrics import Metrics
from bot.adapter import Core, Failed, ReplyEvent
from bot.export import to_markdown
from bot.models import Job
from bot.presets import PRESETS, response_format
from bot.remote_images import RemoteImageFetcher
from bot.settings import Settings
from bot.texts import text

WEB_DIR = Path(__file__).parent / "web"
BODY_OVERHEAD = 512 * 1024  # form fields, JSON text and headers around the image bytes
LOADING_RETRY_S = 10
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection mid-request
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

Handler = Callable[[Request], Awaitable[Response]]
# the web page's files by path; the admin page's need the admin key for their data, not to load
PAGE_FILES = {"/": "index.html", "/app.js": "app.js", "/app.css": "app.css"}
ADMIN_PAGE = {"/admin": "admin.html", "/admin.js": "admin.js", "/admin.css": "admin.css"}


def route_label(path: str) -> str:
    if path.startswith("/v1/conversations/"):
        return "/v1/conversations/{id}"
    if path.startswith("/v1/images/"):
        return "/v1/images/{sha}"
    if path.startswith("/v1/admin/"):
        return admin_api.route_label(path)
    known = ("/", "/app.js", "/app.css", "/health", "/metrics", "/v1/models", "/v1/chat/completions",
             *ADMIN_PAGE)
    return path if path in known else "other"


class Observe:
    """ASGI middleware: request id, access log line and request metrics (streams included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else uuid.uuid4().hex[:16]
        started = time.monotonic()
        scope["vlbot.rid"], scope["vlbot.started"] = rid, started
        state: dict[str, Any] = {"status": 500, "bytes": 0, "done": False}

        def finish() -> None:
            if state["done"]:
                return
            state["done"] = True
            label = route_label(scope["path"])
            elapsed = time.monotonic() - started
            self.metrics.requests.labels(label, scope["method"], str(state["status"])).inc()
            self.metrics.latency.labels(label).observe(elapsed)
            client = scope.get("client")
            access_log.info(
                kv(
                    request_id=rid,
                    method=scope["method"],
                    path=scope["path"],
                    status=state["status"],
                    ms=round(elapsed * 1000),
                    bytes=state["bytes"],
                    client=client[0] if client else None,
                    caller=scope.get("vlbot.caller"),
                )
            )

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    await send(message)
                    finish()
                    return
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            finish()


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the bot's process owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpAdapter:
    platform = "http"
    connection_bound = True  # replicas: a job runs where its client's stream is (bot/runner.py)

    def __init__(self, settings: Settings, *, fetcher: RemoteImageFetcher | None = None) -> None:
        self.settings = settings
        http = settings.http
        self.auth = Authenticator(http.api_keys, http.web_user, http.web_password, http.admin_key)
        self.limiter = RateLimiter(http.rate_limit_per_minute)
        self.metrics = Metrics()
        if fetcher is None and http.allow_remote_images:
            fetcher = RemoteImageFetcher(settings.max_image_bytes)
        self.parser = api.Parser(settings.max_image_bytes, fetcher)
        self._core: Core | None = None
        self._exchanges: dict[str, Exchange] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.completions = Completions(
            self.core, self._exchanges, self.metrics, settings.max_visual_tokens, self._spawn
        )
        self.admin_api = AdminApi(self.auth, self.core, http.body_timeout_s)
        self.app = self._build_app()
        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._log_files: LogFiles | None = None
        self.port: int | None = None

    # --- Adapter protocol ------------------------------------------------------------------------

    def core(self) -> Core:
        if self._core is None:
            raise ApiError(503, "The server is starting.", retry_after_s=1)
        return self._core

    async def start(self, core: Core) -> None:
        http = self.settings.http
        check_bind(http.host, self.auth.has_keys)
        self._core = core
        self.auth.live_keys = core.admin.key_for_secret  # API keys made at run time
        self.metrics.track_status(core.status)
        if http.log_dir is not None:
            self._log_files = LogFiles(http.log_dir)
        sock = self._bind(http.host, http.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self._server = _Server(config)
        self._serve_task = asyncio.create_task(self._server.serve(sockets=[sock]), name="vlbot-http")
        while not self._server.started:
            if self._serve_task.done():
                self._serve_task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        logging.getLogger("vlbot.http").info(
            kv(event="listening", url=f"http://{http.host}:{self.port}/", api_keys=len(http.api_keys))
        )

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            raise RuntimeError(f"vlbot http: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def stop(self) -> None:
        for rid, exchange in list(self._exchanges.items()):
            exchange.events.put_nowait(Failed("failed", rid))
        if self._server is not None and self._serve_task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._serve_task, 10)
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 2)
        if self._log_files is not None:
            self._log_files.close()
            self._log_files = None

    async def send(self, job: Job, event: ReplyEvent) -> dict[str, Any] | None:
        exchange = self._exchanges.get(str(job.origin.get("request_id")))
        if exchange is not None:  # else the request is gone (client left, or a restart)
            exchange.events.put_nowait(event)
        return None

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- app -------------------------------------------------------------------------------------

    def _build_app(self) -> ASGIApp:
        def endpoint(handler: Handler) -> Handler:
            async def wrapped(request: Request) -> Response:
                rid = str(request.scope.get("vlbot.rid", ""))
                try:
                    return await handler(request)
                except ApiError as exc:
                    return exc.response(rid)
                except ClientGone:  # the client's doing, not the server's: 499, as nginx logs it
                    logging.getLogger("vlbot.http").info(kv(event="client_gone", request_id=rid))
                    return Response(status_code=CLIENT_CLOSED)
                except Exception as exc:  # the type only: an exception's repr may quote user text
                    error_log.error(
                        kv(event="unhandled", request_id=rid, error=type(exc).__name__), exc_info=exc
                    )
                    return ApiError(500, f"Internal error (reference {rid}).").response(rid)

            return wrapped

        async def http_error(request: Request, exc: Exception) -> Response:
            """404 and 405 from routing, in OpenAI's error shape (with Allow for a 405)."""
            assert isinstance(exc, HTTPException)
            where = f"{request.method} {request.url.path}"
            if exc.status_code == 405:
                message = f"Method not allowed ({where}); allowed: {(exc.headers or {}).get('Allow')}."
            elif exc.status_code == 404:
                message = f"Invalid URL ({where})."
            else:
                message = str(exc.detail)
            error = ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
            return error.response(str(request.scope.get("vlbot.rid", "")))

        routes = [
            *(Route(path, endpoint(self.page), methods=["GET"]) for path in {**PAGE_FILES, **ADMIN_PAGE}),
            Route("/health", endpoint(self.health), methods=["GET"]),
            Route("/metrics", endpoint(self.metrics_page), methods=["GET"]),
            Route("/v1/models", endpoint(self.models), methods=["GET"]),
            Route("/v1/presets", endpoint(self.presets), methods=["GET"]),
            Route("/v1/chat/completions", endpoint(self.chat), methods=["POST"]),
            Route("/v1/conversations/{cid}", endpoint(self.conversation), methods=["GET", "DELETE"]),
            Route("/v1/images/{sha}", endpoint(self.image), methods=["GET"]),
            *self.admin_api.routes(endpoint),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
        return Observe(app, self.metrics)

    async def _caller(self, request: Request) -> Caller:
        caller = await self.auth.api_caller(request)
        request.scope["vlbot.caller"] = caller.key_id
        return caller

    async def page(self, request: Request) -> Response:
        if not self.auth.page_allowed(request):
            return Response(
                "Authentication required", 401, {"WWW-Authenticate": 'Basic realm="vlbot", charset="UTF-8"'}
            )
        name = {**PAGE_FILES, **ADMIN_PAGE}[request.url.path]
        return FileResponse(WEB_DIR / name, headers=PAGE_HEADERS)

    async def health(self, request: Request) -> Response:
        status = self.core().status()
        if status.engine_state == "loading":
            state = "loading"
        elif (
            status.engine_state == "ready"
            and status.queue_depth < self.settings.max_queue
            and (not status.upstreams or any(u.up for u in status.upstreams))
        ):
            state = "healthy"
        else:
            state = "degraded"
        body = {
            "status": state,
            "model": status.model,
            "engine": status.engine,
            "dtype": status.dtype,
            "queue_depth": status.queue_depth,
            "running": status.running,
            "uptime_s": round(status.uptime_s, 1),
        }
        if status.cpu_tier:  # the local engine: what it computes with
            body["cpu_tier"] = status.cpu_tier
            body["kernels"] = status.kernels or "none"
        if status.engine_error:
            body["error"] = status.engine_error
        if status.webhooks is not None:  # outbound webhooks: waiting, and given up on (dead)
            body["webhooks"] = {k: status.webhooks.get(k, 0) for k in ("pending", "dead")}
        if status.upstreams:  # engine=openai: the pool of model servers
            body["upstreams_up"] = f"{sum(u.up for u in status.upstreams)}/{len(status.upstreams)}"
            if await self._sees_internals(request):  # their URLs and errors: to whom /metrics shows them
                body["upstreams"] = [dataclasses.asdict(u) for u in status.upstreams]
        if status.fallback:  # engine=auto: no VLM here, OCR answers
            body["notice"] = f"{text('engine_fallback_ocr')} ({status.fallback})"
        return JSONResponse(body, status_code=200 if state == "healthy" else 503)

    async def _sees_internals(self, request: Request) -> bool:
        if self.settings.http.metrics_public:
            return True
        try:
            await self._caller(request)
        except ApiError:
            return False
        return True

    async def metrics_page(self, request: Request) -> Response:
        if not self.settings.http.metrics_public:
            await self._caller(request)  # with API keys set, only their holders (and the web user)
        with contextlib.suppress(Exception):
            self.metrics.set_job_counts(await self.core().job_counts())
        with contextlib.suppress(Exception):
            await self.metrics.ledger.refresh(self.core().admin.usage_records)
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def models(self, request: Request) -> Response:
        await self._caller(request)
        status = self.core().status()
        name = status.model
        model = {"id": name, "object": "model", "created": 0, "owned_by": "vlbot"}
        return JSONResponse({"object": "list", "data": [model]})

    async def presets(self, request: Request) -> Response:
        """The presets, each with the response_format that selects it."""
        await self._caller(request)
        data = [{"name": p.name, "response_format": response_format(p)} for p in PRESETS.values()]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        caller = await self._caller(request)
        self.limiter.check(caller.key_id)
        core = self.core()
        status = core.status()
        if status.engine_state != "ready":
            message = text("engine_loading", language(request))
            if status.engine_state == "failed":
                message += f" ({status.engine_error})"
            raise ApiError(503, message, code="engine_loading", retry_after_s=LOADING_RETRY_S)
        content_type = request.headers.get("content-type", "")
        is_form = content_type.startswith("multipart/form-data")
        max_image = self.settings.max_image_bytes
        limit = (max_image if is_form else math.ceil(max_image * 4 / 3)) + BODY_OVERHEAD
        body = await read_body(request, limit, self.settings.http.body_timeout_s)
        if is_form:
            chat = await self.parser.parse_form(request.headers, body)
        else:
            chat = await self.parser.parse_json(body)
        del body
        rid = str(request.scope["vlbot.rid"])
        return await self.completions.handle(request, chat, rid, caller)

    async def conversation(self, request: Request) -> Response:
        """A caller's own conversation; another principal's is not found, like an unknown id."""
        caller = await self._caller(request)
        cid = api.check_conversation_id(request.path_params["cid"])
        assert cid is not None
        conversation = owned_conversation(caller.principal, cid)
        core = self.core()
        if request.method == "DELETE":
            cancelled = await core.cancel(conversation)
            if not await core.history.reset(conversation) and not cancelled:
                raise not_found("conversation")
            return JSONResponse({"conversation_id": cid, "deleted": True})
        exported = await core.history.export(conversation)
        if not exported["turns"]:
            raise not_found("conversation")
        exported["conversation"] = f"http:{cid}"
        for turn in exported["turns"]:
            for part in turn["parts"]:
                if "image" in part:
                    part["url"] = f"/v1/images/{part['image']}"
        exported["conversation_id"] = cid
        if request.query_params.get("format") in ("md", "markdown"):
            return PlainTextResponse(to_markdown(exported), media_type="text/markdown")
        return JSONResponse(exported)

    async def image(self, request: Request) -> Response:
        """An image of one of the caller's own conversations; any other is not found."""
        caller = await self._caller(request)
        sha = request.path_params["sha"]
        history = self.core().history
        data = await history.image_in(sha, owned_prefix(caller.principal)) if _SHA.match(sha) else None
        if data is None:
            raise not_found("image")
        headers = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type=_sniff_mime(data), headers=headers)


def not_found(what: str) -> ApiError:
    """The one answer for an unknown id and for another caller's: nothing tells them apart."""
    return ApiError(404, f"No such {what}.", code="not_found")


def _sniff_mime(data: bytes) -> str:
    for magic, mime in (
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"\x89PNG", "image/png"),
        (b"GIF8", "image/gif"),
        (b"BM", "image/bmp"),
    ):
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"
