"""The engine port: the narrow protocol every engine implements, its errors and what it reports.

bot/ owns this contract (the runner, core and presets need it); engine/ implements it and may
import this module and bot.models, nothing else of bot/. Only the composition root (bot/app.py,
bot/cli.py) imports engine/ itself.

Optional, found with getattr: `take_stats(session)`, `take_notice(session)` (read by the runner)
and `upstreams() -> tuple[UpstreamStatus, ...]` (an engine over several inference servers; read
by BotCore.status for /health and /metrics).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bot.models import FinishReason, GenerationParams, Message, Turn


class EngineError(Exception):
    """Generation failed for a reason that is not the user's input."""


class EngineNotReady(EngineError):
    """The engine is still loading (or failed to load)."""


class ModelNotFound(EngineError):
    """The configured model folder or hub id cannot be loaded; the message names the fix."""


class AnswerInterrupted(EngineError):
    """Generation broke off after part of the answer was streamed to the user. Not retried:
    running the job again would show its beginning twice. `code` names the user-facing text."""

    def __init__(self, message: str, code: str = "answer_interrupted") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class EngineInfo:
    name: str
    model: str
    dtype: str = "n/a"
    threads: int = 0
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamStats:
    """What an engine measured for the last completed stream (for logs and metrics)."""

    prompt_tokens: int = 0
    visual_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    finish_reason: FinishReason = "stop"


@dataclass(frozen=True)
class UpstreamStatus:
    """One inference server behind an engine that spreads work over several (engine=openai):
    what `/health` and `/metrics` show of it. `server` is its URL without credentials."""

    server: str
    model: str
    up: bool
    in_flight: int
    requests: int  # requests sent to it (failed ones and failovers included)
    failures: int  # requests that failed on it, and failed health probes
    failovers: int  # requests that failed on it before their first token and went elsewhere
    latency_s: float  # recent time to first token (0 before the first answer)
    last_error: str | None = None


@runtime_checkable
class Engine(Protocol):
    @property
    def info(self) -> EngineInfo: ...

    @property
    def ready(self) -> bool: ...

    async def load(self) -> None:
        """Load weights; idempotent. Raises ModelNotFound with a message naming the fix."""

    def check(self, message: Message) -> None:
        """Validate a message's images (raises bot.models.InputRejected) before it is queued."""

    def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        """Yield text pieces of the answer. Closing the iterator stops generation."""

    async def close(self) -> None: ...

