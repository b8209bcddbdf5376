"""A pool of OpenAI-compatible inference servers behind one engine (`engine=openai` with several
base URLs): health-checked, least-busy routing, failover before the first token.

- Routing: each request goes to the server that is up with the fewest requests in flight; ties
  go to the lowest recent time to first token, then to the order of the settings.
- Health: every server is probed (`GET /models`) every `health_interval_s`. A failed probe or a
  failed request marks a server down; a down server is probed again after a backoff that doubles
  with each failure (up to `max_backoff_s`) and is used again as soon as a probe succeeds. When
  every server is down a request still tries them all (the one due for a probe first): a
  single-server setup is not refused because of one hiccup.
- Failover, without a duplicate answer: a request that fails *before its first token* (refused
  connection, HTTP 5xx/429, no first token within `first_token_timeout_s`) is sent to the next
  server, each server at most once; nothing has reached the user yet, so nothing is shown twice.
  Once a token has been streamed, a failure is *not* restarted elsewhere (the user would see the
  beginning twice): it raises `AnswerInterrupted`, which the runner reports as failed without a
  retry. A server refusing the input itself (HTTP 400, `InputRejected`) is not failed over: the
  same input goes to the same kind of model.

`upstreams()` reports each server's state (`bot.engine_port.UpstreamStatus`) for /health and
/metrics; URLs are shown without credentials and errors without keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import anyio

from bot.engine_port import AnswerInterrupted, EngineError, EngineInfo, StreamStats, UpstreamStatus
from bot.models import GenerationParams, Message, Turn
from engine.remote.server import OpenAIRemoteEngine, RemoteEngineError

log = logging.getLogger("vlbot.engine")


@dataclass
class _Server:
    """One server's live state (only the event loop's task touches it: no locks)."""

    engine: OpenAIRemoteEngine
    order: int
    up: bool = True  # until a probe or a request says otherwise
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    failovers: int = 0
    failures_in_a_row: int = 0
    latency_s: float = 0.0
    next_probe: float = 0.0  # time.monotonic() of the next health probe
    last_error: str | None = None

    def status(self) -> UpstreamStatus:
        return UpstreamStatus(
            server=self.engine.name,
            model=self.engine.model,
            up=self.up,
            in_flight=self.in_flight,
            requests=self.requests,
            failures=self.failures,
            failovers=self.failovers,
            latency_s=round(self.latency_s, 3),
            last_error=self.last_error,
        )


class RemotePool:
    """An Engine over several `OpenAIRemoteEngine`s (see the module docstring for the rules)."""

    def __init__(
        self,
        servers: Sequence[OpenAIRemoteEngine],
        *,
        first_token_timeout_s: float = 60.0,
        health_interval_s: float = 10.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        if not servers:
            raise ValueError("a remote pool needs at least one server")
        self._servers = [_Server(engine, order) for order, engine in enumerate(servers)]
        self.first_token_timeout_s = first_token_timeout_s
        self.health_interval_s = health_interval_s
        self.max_backoff_s = max_backoff_s
        self._watch_task: asyncio.Task[None] | None = None
        self._loaded = False
        self.last_stats: StreamStats | None = None  # of the last completed answer (vlbot ask)

    @property
    def info(self) -> EngineInfo:
        models = dict.fromkeys(s.engine.model for s in self._servers)
        up = sum(s.up for s in self._servers)
        return EngineInfo(
            name="openai",
            model=", ".join(models),
            details={"servers": str(len(self._servers)), "servers_up": str(up)},
        )

    @property
    def ready(self) -> bool:
        return self._loaded

    def upstreams(self) -> tuple[UpstreamStatus, ...]:
        return tuple(s.status() for s in self._servers)

    async def load(self) -> None:
        """Open every server's connections, probe them all once, then keep probing."""
        if self._loaded:
            return
        self._loaded = True
        await asyncio.gather(*(self._probe(s) for s in self._servers))  # opens their clients
        up = [s.engine.name for s in self._servers if s.up]
        log.info("remote pool: %d of %d servers up (%s)", len(up), len(self._servers), ", ".join(up))
        self._watch_task = asyncio.create_task(self._watch(), name="vlbot-remote-health")

    def check(self, message: Message) -> None:
        self._servers[0].engine.check(message)

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        for server in self._servers:
            await server.engine.close()
        self._loaded = False

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        if not self._loaded:
            await self.load()
        tried: set[int] = set()
        errors: list[str] = []
        codes: set[str] = set()
        while (server := self._pick(tried)) is not None:
            tried.add(server.order)
            server.in_flight += 1  # chosen and counted with no await between: least-busy holds
            server.requests += 1
            started = time.monotonic()
            pieces = server.engine.stream(history, message, params)
            try:
                async with contextlib.aclosing(pieces):
                    try:
                        with anyio.fail_after(self.first_token_timeout_s):
                            first = await anext(pieces, None)
                    except (EngineError, TimeoutError) as exc:
                        reason = _reason(exc, self.first_token_timeout_s)
                        self._failed(server, reason)
                        errors.append(f"{server.engine.name}: {reason}")
                        codes.add(_code(exc))
                        if self._pick(tried) is not None:
                            server.failovers += 1
                            log.warning(
                                "remote %s failed before the first token (%s): trying another",
                                server.engine.name, reason,
                            )
                        continue
                    self._answered(server, time.monotonic() - started)
                    if first is None:  # an empty answer is an answer
                        return
                    yield first
                    sent = 1
                    try:
                        async for piece in pieces:
                            yield piece
                            sent += 1
                    except EngineError as exc:
                        self._failed(server, _reason(exc, self.first_token_timeout_s))
                        raise AnswerInterrupted(
                            f"the model server at {server.engine.name} broke off the answer after "
                            f"{sent} pieces had been sent ({exc}); not restarted elsewhere, which "
                            "would repeat the beginning"
                        ) from exc
                    self.last_stats = server.engine.last_stats
                    return
            finally:
                server.in_flight -= 1
        raise RemoteEngineError(
            "no model server could answer: " + "; ".join(errors),
            codes.pop() if len(codes) == 1 else "remote_unavailable",
        )

    def _pick(self, tried: set[int]) -> _Server | None:
        """The least-busy server that is up, else (all down) the one due for a probe soonest."""
        fresh = [s for s in self._servers if s.order not in tried]
        up = [s for s in fresh if s.up]
        if up:
            return min(up, key=lambda s: (s.in_flight, s.latency_s, s.order))
        return min(fresh, key=lambda s: s.next_probe, default=None)

    def _answered(self, server: _Server, latency_s: float) -> None:
        """A first token arrived: the server is up; its latency joins a moving average."""
        server.latency_s = latency_s if server.latency_s == 0 else 0.7 * server.latency_s + 0.3 * latency_s
        server.failures_in_a_row = 0
        if not server.up:
            log.info("remote %s answers again", server.engine.name)
        server.up = True

    def _failed(self, server: _Server, reason: str) -> None:
        server.failures += 1
        server.failures_in_a_row += 1
        server.last_error = reason
        backoff = min(self.max_backoff_s, self.health_interval_s * 2 ** (server.failures_in_a_row - 1))
        server.next_probe = time.monotonic() + backoff
        if server.up:
            log.warning("remote %s marked down: %s", server.engine.name, reason)
        server.up = False

    async def _probe(self, server: _Server) -> None:
        problem = await server.engine.probe(min(10.0, self.first_token_timeout_s))
        if problem is None:
            if not server.up:
                log.info("remote %s is up again", server.engine.name)
            server.up = True
            server.failures_in_a_row = 0
            server.next_probe = time.monotonic() + self.health_interval_s
        else:
            self._failed(server, problem)

    async def _watch(self) -> None:
        """Probe each server when its time comes (up: every interval; down: after its backoff)."""
        while True:
            now = time.monotonic()
            due = [s for s in self._servers if s.next_probe <= now]
            results = await asyncio.gather(*(self._probe(s) for s in due), return_exceptions=True)
            for server, result in zip(due, results, strict=True):
                if isinstance(result, Exception):  # a probe must not end the watch
                    self._failed(server, f"health probe: {type(result).__name__}")
            wake = min(s.next_probe for s in self._servers)
            await asyncio.sleep(min(self.health_interval_s, max(0.01, wake - time.monotonic())))


def _code(exc: BaseException) -> str:
    """The texts.py key for the reply when no server could answer."""
    if isinstance(exc, TimeoutError):
        return "remote_timeout"
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else "remote_unavailable"


def _reason(exc: BaseException, first_token_timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no first token within {first_token_timeout_s:g} s"
    return str(exc)[:300]
