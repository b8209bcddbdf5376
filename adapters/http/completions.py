"""POST /v1/chat/completions: one request becomes one job of the core.

The request's reply events arrive through `HttpAdapter.send` into an `Exchange` (registered
before `core.submit`, so no event can be missed) and are answered as one JSON object or as
server-sent events in OpenAI's chunk format ending with `data: [DONE]`.

A request without `conversation_id` is stateless, as in OpenAI's API: it gets a fresh conversation,
seeded with the earlier turns from its `messages`, which is forgotten once the answer is out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from adapters.http import openai_api as api
from adapters.http.errors import ApiError
from adapters.http.guard import Caller, owned_conversation
from adapters.http.logs import kv, model_log
from adapters.http.metrics import Metrics
from bot.adapter import Core, Failed, Final, Incoming, Partial, QueueFull, ReplyEvent
from bot.admin_types import next_reset
from bot.models import ConversationId, InputRejected, User
from bot.texts import text

log = logging.getLogger("vlbot.http")

FORGET_WAIT_S = 10.0
# Codes of Failed events that are about the request, not the server.
SERVER_FAULTS = {
    "failed": 500, "timeout": 504, "cancelled": 409,
    # engine=openai: the model servers behind this one failed (not the client's request)
    "remote_unavailable": 502, "remote_timeout": 504, "remote_busy": 503, "answer_interrupted": 502,
}


@dataclass
class Exchange:
    """The reply events of one request, fed by `HttpAdapter.send`."""

    events: asyncio.Queue[ReplyEvent] = field(default_factory=asyncio.Queue)
    job_id: str = ""
    answered: bool = False


# A quota refusal (bot/quotas.py): the limit it names, as the admin API and settings call it.
QUOTA_LIMITS = {
    "quota_images": "images_per_day",
    "quota_requests": "requests_per_day",
    "quota_engine": "engine_seconds_per_day",
    "quota_waiting": "max_waiting",
}


def failure_status(code: str) -> int:
    if code == "too_large":
        return 413
    if code in QUOTA_LIMITS:
        return 429
    if code in ("busy", "engine_loading"):
        return 503
    return SERVER_FAULTS.get(code, 400)


def quota_retry_after(code: str, core: Core) -> float | None:
    """Seconds until a quota lets the caller in again: the daily limits at the next 00:00 UTC;
    jobs waiting about when one of them is answered (the recent mean job time)."""
    if code == "quota_waiting":
        return max(1.0, core.status().job_seconds)
    if code in QUOTA_LIMITS:
        now = time.time()
        return next_reset(now) - now
    return None


def language(request: Request) -> str | None:
    header = request.headers.get("accept-language", "")
    return header.split(",")[0].split(";")[0].strip() or None


class Completions:
    def __init__(
        self,
        core: Callable[[], Core],
        exchanges: dict[str, Exchange],
        metrics: Metrics,
        max_visual_tokens: int,
        spawn: Callable[[Any], None],
    ) -> None:
        self._core = core
        self._exchanges = exchanges
        self._metrics = metrics
        self._max_visual_tokens = max_visual_tokens
        self._spawn = spawn

    async def handle(self, request: Request, chat: api.ChatRequest, rid: str, caller: Caller) -> Response:
        core = self._core()
        lang = language(request)
        stateless = chat.conversation_id is None
        conversation = owned_conversation(
            caller.principal, chat.conversation_id or f"api-{uuid.uuid4().hex}"
        )
        origin: dict[str, Any] = {"request_id": rid}
        if chat.params():
            origin["params"] = chat.params()
        if chat.preset:
            origin["preset"] = chat.preset
            origin["json_only"] = chat.json_only
        incoming = Incoming(
            conversation=conversation,
            user=User(platform_id=caller.key_id, display_name=caller.display_name, language_code=lang),
            message=chat.message,
            origin=origin,
        )
        timing = api.Timing(started=request.scope.get("vlbot.started", time.monotonic()))
        exchange = Exchange()
        self._exchanges[rid] = exchange
        try:
            if stateless and chat.history:
                await core.history.append(conversation, chat.history)
            acceptance = await core.submit(incoming)
            exchange.job_id = acceptance.job_id
        except InputRejected as exc:
            await self._done(rid, conversation, stateless, None)
            message = text(exc.code, lang, **exc.params)
            raise ApiError(
                failure_status(exc.code),
                message,
                code=exc.code,
                param=QUOTA_LIMITS.get(exc.code),
                retry_after_s=quota_retry_after(exc.code, core),
            ) from None
        except QueueFull as exc:
            await self._done(rid, conversation, stateless, None)
            retry = max(1, math.ceil(exc.retry_after_s))
            message = text("busy", lang, queued=exc.queued, retry_s=retry)
            raise ApiError(503, message, code="queue_full", retry_after_s=retry) from None
        except BaseException:
            await self._done(rid, conversation, stateless, None)
            raise
        prompt_tokens = sum(api.estimate_tokens(t.text) for t in chat.history) + self._prompt_tokens(chat)
        model = core.status().model
        public_id = chat.conversation_id
        log.info(kv(event="accepted", request_id=rid, job=acceptance.job_id, position=acceptance.position))
        if chat.stream:
            stream = self._stream(rid, model, exchange, conversation, stateless, prompt_tokens, timing,
                                  chat.include_usage, lang)
            return StreamingResponse(
                stream,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-ID": rid},
            )
        try:
            final = await self._wait(exchange, timing, lang)
        finally:
            await self._done(rid, conversation, stateless, exchange.job_id if exchange.answered else None)
        usage = self._usage(final, prompt_tokens, timing)
        self._record(rid, exchange.job_id, usage, timing)
        body = api.completion(rid, model, final.text, usage, public_id, final.finish_reason)
        return JSONResponse(body, headers={"X-Request-ID": rid})

    @staticmethod
    def _usage(final: Final, estimated_prompt: int, timing: api.Timing) -> dict[str, Any]:
        """Token counts as the engine counted them (the whole prompt, history included), or
        estimates for an engine that does not count."""
        prompt = final.prompt_tokens if final.prompt_tokens is not None else estimated_prompt
        completion = final.completion_tokens
        if completion is None:
            completion = api.estimate_tokens(final.text)
        return api.usage(prompt, completion, timing)

    def _prompt_tokens(self, chat: api.ChatRequest) -> int:
        images = [*chat.message.images, *(i for t in chat.history for i in t.images)]
        return api.estimate_tokens(chat.message.text) + sum(
            api.visual_tokens(i, self._max_visual_tokens) for i in images
        )

    async def _wait(self, exchange: Exchange, timing: api.Timing, lang: str | None) -> Final:
        while True:
            event = await exchange.events.get()
            if isinstance(event, Partial) and timing.first_token is None:
                timing.first_token = time.monotonic()
            elif isinstance(event, Final):
                timing.finished = time.monotonic()
                exchange.answered = True
                self._metrics.jobs.labels("http", "done").inc()
                return event
            elif isinstance(event, Failed):
                self._metrics.jobs.labels("http", "failed").inc()
                raise ApiError(
                    failure_status(event.code),
                    text(event.code, lang, ref=event.ref, **event.params),
                    code=event.code,
                )

    async def _stream(
        self,
        rid: str,
        model: str,
        exchange: Exchange,
        conversation: ConversationId,
        stateless: bool,
        prompt_tokens: int,
        timing: api.Timing,
        include_usage: bool,
        lang: str | None,
    ) -> AsyncIterator[str]:
        finished = False
        streamed = ""
        try:
            yield api.chunk(rid, model, {"role": "assistant", "content": ""})
            while True:
                event = await exchange.events.get()
                if isinstance(event, Partial):
                    if timing.first_token is None:
                        timing.first_token = time.monotonic()
                    streamed += event.delta
                    yield api.chunk(rid, model, {"content": event.delta})
                elif isinstance(event, Final):
                    if event.text.startswith(streamed) and len(event.text) > len(streamed):
                        # what was not streamed (a preset's result arrives whole)
                        timing.first_token = timing.first_token or time.monotonic()
                        yield api.chunk(rid, model, {"content": event.text[len(streamed):]})
                    finished = exchange.answered = True
                    timing.finished = time.monotonic()
                    self._metrics.jobs.labels("http", "done").inc()
                    usage = self._usage(event, prompt_tokens, timing)
                    self._record(rid, exchange.job_id, usage, timing)
                    yield api.chunk(rid, model, {}, event.finish_reason, usage)
                    if include_usage:
                        yield api.sse({**_chunk_base(rid, model), "choices": [], "usage": usage})
                    yield api.sse("[DONE]")
                    return
                elif isinstance(event, Failed):
                    finished = True
                    self._metrics.jobs.labels("http", "failed").inc()
                    error = ApiError(
                        failure_status(event.code),
                        text(event.code, lang, ref=event.ref, **event.params),
                        code=event.code,
                    )
                    yield api.sse(error.body())
                    yield api.sse("[DONE]")
                    return
        finally:
            # Runs also when the client goes away; the work is handed to a task because the
            # stream's own scope may already be cancelled here.
            job = exchange.job_id if exchange.answered else None
            self._spawn(self._after_stream(rid, conversation, stateless, job, cancel=not finished))

    async def _after_stream(
        self, rid: str, conversation: ConversationId, stateless: bool, job_id: str | None, cancel: bool
    ) -> None:
        if cancel:
            log.info(kv(event="client_gone", request_id=rid))
            with contextlib.suppress(Exception):
                await self._core().cancel(conversation)
        await self._done(rid, conversation, stateless, None if cancel else job_id)

    async def _done(
        self, rid: str, conversation: ConversationId, stateless: bool, job_id: str | None
    ) -> None:
        """Unregister the request; forget a stateless conversation (after the runner has
        recorded the job's turns, when it answered)."""
        self._exchanges.pop(rid, None)
        if not stateless:
            return
        if job_id:
            self._spawn(self._forget_after_record(conversation, job_id))
        else:
            await self._core().history.reset(conversation)

    async def _forget_after_record(self, conversation: ConversationId, job_id: str) -> None:
        history = self._core().history
        deadline = time.monotonic() + FORGET_WAIT_S
        while time.monotonic() < deadline:
            exported = await history.export(conversation)
            if any(t.get("job_id") == job_id for t in exported["turns"]):
                break
            await asyncio.sleep(0.02)
        await history.reset(conversation)

    def _record(self, rid: str, job_id: str, usage: dict[str, Any], timing: api.Timing) -> None:
        if timing.first_token is not None:
            self._metrics.ttft.labels("http").observe(timing.first_token - timing.started)
            if timing.finished is not None and timing.finished > timing.first_token:
                rate = usage["completion_tokens"] / (timing.finished - timing.first_token)
                self._metrics.tokens_per_s.labels("http").observe(rate)
        self._metrics.completion_tokens.labels("http").inc(usage["completion_tokens"])
        model_log.info(
            kv(
                event="generation",
                request_id=rid,
                job=job_id,
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                ttft_ms=usage.get("time_to_first_token_ms"),
                total_ms=usage["total_time_ms"],
            )
        )


def _chunk_base(rid: str, model: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
