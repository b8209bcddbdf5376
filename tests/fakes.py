"""Shared fakes for runner/engine tests: a recording adapter and a scripted engine."""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from bot.adapter import Core, Failed, Final, Incoming, ReplyEvent
from bot.engine_port import EngineInfo, StreamStats
from bot.models import ConversationId, GenerationParams, ImagePart, Message, Turn, User


@dataclass
class Sent:
    job_id: str
    conversation: str
    event: ReplyEvent


class RecordingAdapter:
    """Records every reply event; `finals()` is what the users would have received."""

    def __init__(self, platform: str = "test") -> None:
        self.platform = platform
        self.sent: list[Sent] = []
        self.core: Core | None = None
        self.fail_next_final = 0
        self.answered = asyncio.Event()
        self._placeholder = 0

    async def start(self, core: Core) -> None:
        self.core = core

    async def stop(self) -> None:
        pass

    async def send(self, job: Any, event: ReplyEvent) -> dict[str, Any] | None:
        if isinstance(event, Final) and self.fail_next_final:
            self.fail_next_final -= 1
            raise ConnectionError("platform down")
        self.sent.append(Sent(job.id, job.conversation.key(), event))
        if isinstance(event, (Final, Failed)):
            self.answered.set()
        if "placeholder" not in job.origin:
            self._placeholder += 1
            return {"placeholder": self._placeholder}
        return None

    def finals(self, conversation: str | None = None) -> list[Sent]:
        return [
            s
            for s in self.sent
            if isinstance(s.event, (Final, Failed))
            and (conversation is None or s.conversation == conversation)
        ]

    async def wait_for_finals(self, n: int, timeout: float = 20.0) -> list[Sent]:
        async def _wait() -> None:
            while len(self.finals()) < n:
                self.answered.clear()
                await self.answered.wait()

        await asyncio.wait_for(_wait(), timeout)
        return self.finals()


@dataclass
class Call:
    history: Sequence[Turn]
    message: Message
    params: GenerationParams


@dataclass
class ScriptedEngine:
    """Answers by a script: `reply(history, message) -> str`, streamed word by word."""

    reply: Callable[[Sequence[Turn], Message], str] = lambda h, m: f"answer to: {m.text}"
    delay_s: float = 0.0
    fail_times: int = 0
    hang: bool = False
    calls: list[Call] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    stats: dict[str, StreamStats] = field(default_factory=dict)  # by session, see take_stats

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(name="scripted", model="script")

    @property
    def ready(self) -> bool:
        return True

    async def load(self) -> None:
        pass

    def check(self, message: Message) -> None:
        pass

    async def close(self) -> None:
        pass

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        self.calls.append(Call(list(history), message, params))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.fail_times:
                self.fail_times -= 1
                raise RuntimeError("engine exploded")
            if self.hang:
                await asyncio.sleep(3600)
            words = self.reply(history, message).split(" ")
            cut = len(words) > params.max_new_tokens  # one word a token, as far as the limit
            for word in words[: params.max_new_tokens]:
                await asyncio.sleep(self.delay_s)
                yield word + " "
            if params.session is not None:
                texts = [*(t.text for t in history), message.text]
                images = [*(i for t in history for i in t.images), *message.images]
                self.stats[params.session] = StreamStats(
                    prompt_tokens=sum(len(t.split()) for t in texts) + sum(map(_pixels, images)),
                    completion_tokens=min(len(words), params.max_new_tokens),
                    finish_reason="length" if cut else "stop",
                )
        finally:
            self.running -= 1

    def take_stats(self, session: str | None) -> StreamStats | None:
        """Like QwenVLEngine.take_stats: prompt tokens are the words of history and message."""
        return self.stats.pop(session, None) if session is not None else None


def _pixels(image: ImagePart) -> int:
    """A visual token per 32x32 pixels, as Qwen's processor counts them (0 if unreadable)."""
    try:
        with Image.open(io.BytesIO(image.data)) as img:
            return math.ceil(img.width * img.height / 1024)
    except Exception:
        return 0


def incoming(chat: str, text: str, *images: Any, platform: str = "test", event: str | None = None,
             lang: str | None = None) -> Incoming:
    return Incoming(
        conversation=ConversationId(platform, chat),
        user=User(platform_id=f"u-{chat}", display_name="Tester", language_code=lang),
        message=Message.of(text, *images),
        origin={"chat": chat},
        event_key=event,
    )
