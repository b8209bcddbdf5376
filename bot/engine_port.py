"""The engine port: the narrow protocol every engine implements, its errors and what it reports.

bot/ owns this contract (the runner, core and presets need it); engine/ implements it and may
import this module and bot.models, nothing else of bot/. Only the composition root (bot/app.py,
bot/cli.py) imports engine/ itself.
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

