"""The remote engine (`engine=openai`): the same requests, sent to any OpenAI-compatible server
(vLLM, llama.cpp's server, Ollama, another vlbot) and streamed back.

This is how a team outgrows one CPU: bot front-ends, GPU servers behind them (several: a
`RemotePool` of these, engine/remote/pool.py). Images
are checked here like the local engine checks them (so bad input is refused before it is queued)
and sent as base64 data: URLs; history turns go along as earlier messages. Timeouts, refused
connections and 5xx answers become an `EngineError` that names the server and what happened.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from bot.engine_port import EngineError, EngineInfo, StreamStats
from bot.models import GenerationParams, ImagePart, InputRejected, Message, Part, Role, TextPart, Turn
from engine.intake import IntakeLimits, check_image

log = logging.getLogger("vlbot.engine")


class RemoteEngineError(EngineError):
    """The remote server failed; `code` is a texts.py key for the user-facing reply."""

    def __init__(self, message: str, code: str = "remote_unavailable") -> None:
        super().__init__(message)
        self.code = code


class OpenAIRemoteEngine:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str = "default",
        *,
        limits: IntakeLimits | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = public_url(self.base_url)  # for messages: no credentials
        self._api_key = api_key
        self.model = model
        self._limits = limits or IntakeLimits()
        self.timeout_s = timeout_s
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.last_stats: StreamStats | None = None

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(name="openai", model=self.model, details={"base_url": self.name})

    @property
    def ready(self) -> bool:
        return self._client is not None

    async def load(self) -> None:
        """Open the connection pool and say whether the server answers (it may come up later)."""
        if self._client is not None:
            return
        problem = await self.probe(min(self.timeout_s, 10.0))
        if problem is None:
            log.info("remote engine %s answers /models", self.name)
        else:
            log.warning("remote engine %s not usable yet: %s", self.name, problem)

    def _open(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, timeout=self._timeout, transport=self._transport
            )
        return self._client

    async def probe(self, timeout_s: float) -> str | None:
        """A health check (`GET /models`, as vLLM, llama.cpp's server, Ollama and vlbot offer):
        None when the server answers 200, else what went wrong, without the URL or a key."""
        try:
            response = await self._open().get("/models", timeout=timeout_s)
        except httpx.TimeoutException:
            return f"GET /models: no answer within {timeout_s:g} s"
        except httpx.HTTPError as exc:
            return f"GET /models: {type(exc).__name__}"
        return None if response.status_code == 200 else f"GET /models: HTTP {response.status_code}"

    def check(self, message: Message) -> None:
        for part in message.images:
            check_image(part, self._limits)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def request_body(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if params.system_prompt:
            messages.append({"role": "system", "content": params.system_prompt})
        for turn in history:
            messages.append({"role": turn.role.value, "content": _content(turn.parts, turn.role)})
        messages.append({"role": "user", "content": _content(message.parts, Role.USER)})
        return {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
        }

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        if self._client is None:
            await self.load()
        assert self._client is not None
        body = self.request_body(history, message, params)
        started = time.monotonic()
        first: float | None = None
        pieces = 0
        try:
            async with self._client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._status_error(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    piece = self._piece(data)
                    if piece:
                        first = first or time.monotonic()
                        pieces += 1
                        yield piece
        except httpx.TimeoutException as exc:
            raise RemoteEngineError(
                f"the model server at {self.name} did not answer within {self.timeout_s:.0f} s "
                f"({type(exc).__name__})",
                "remote_timeout",
            ) from exc
        except httpx.HTTPError as exc:
            raise RemoteEngineError(
                f"cannot reach the model server at {self.name}: {type(exc).__name__}: {exc}"
            ) from exc
        self.last_stats = StreamStats(
            completion_tokens=pieces,
            time_to_first_token_s=(first - started) if first else 0.0,
            total_s=time.monotonic() - started,
        )

    def _piece(self, data: str) -> str:
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise RemoteEngineError(f"the model server at {self.name} sent a malformed event") from None
        if "error" in chunk:
            raise RemoteEngineError(f"the model server at {self.name} failed: {_message(chunk)}")
        choices = chunk.get("choices") or []
        if not choices:
            return ""
        content = (choices[0].get("delta") or {}).get("content")
        return content if isinstance(content, str) else ""

    def _status_error(self, response: httpx.Response) -> Exception:
        try:
            detail = _message(response.json())
        except (json.JSONDecodeError, UnicodeDecodeError):
            detail = response.text[:200]
        where = f"the model server at {self.name}"
        status = response.status_code
        if status == 400:
            # The remote refused the input (e.g. an image it cannot read): the user's to fix.
            return InputRejected("remote_rejected", f"{where} refused the request: {detail}", reason=detail)
        if status in (401, 403):
            return RemoteEngineError(f"{where} refused our API key (HTTP {status}): {detail}")
        if status == 404:
            return RemoteEngineError(
                f"{where} has no model {self.model!r} or no chat API (HTTP 404): {detail}"
            )
        if status in (429, 503):
            return RemoteEngineError(f"{where} is busy (HTTP {status}): {detail}", "remote_busy")
        return RemoteEngineError(f"{where} answered HTTP {status}: {detail}")


def public_url(url: str) -> str:
    """`url` as logs, /health and /metrics may show it: no user:password@, no query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:300]
    return str(body)[:300]


def _content(parts: Sequence[Part], role: Role) -> str | list[dict[str, Any]]:
    if role is Role.ASSISTANT or not any(isinstance(p, ImagePart) for p in parts):
        return "\n".join(p.text for p in parts if isinstance(p, TextPart))
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            out.append({"type": "text", "text": part.text})
        else:
            mime = part.mime if part.mime.startswith("image/") else "image/png"
            url = f"data:{mime};base64,{base64.b64encode(part.data).decode()}"
            out.append({"type": "image_url", "image_url": {"url": url}})
    return out
