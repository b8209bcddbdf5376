"""The shared conversation model: frozen dataclasses with no platform types.

Adapters translate platform events into these types; the runner, the history store and the
engine speak only these types.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal


class Role(str, Enum):
    USER = "user"
    ASSISTANT = "assistant"


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    ANSWERED = "answered"  # answer text stored, delivery pending
    DONE = "done"  # delivered and recorded in history
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class ConversationId:
    """Where a conversation lives: platform, chat, and the thread/topic inside it (if any)."""

    platform: str
    chat: str
    thread: str | None = None

    def key(self) -> str:
        parts = [self.platform, self.chat] + ([self.thread] if self.thread is not None else [])
        return ":".join(_escape(p) for p in parts)

    @classmethod
    def parse(cls, key: str) -> ConversationId:
        parts = [_unescape(p) for p in key.split(":")]
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        if len(parts) == 3:
            return cls(parts[0], parts[1], parts[2])
        raise ValueError(f"not a conversation key: {key!r}")

    def __str__(self) -> str:
        return self.key()


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def _unescape(part: str) -> str:
    return part.replace("%3A", ":").replace("%25", "%")


@dataclass(frozen=True)
class User:
    platform_id: str
    display_name: str = ""
    language_code: str | None = None


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image exactly as received: the raw bytes, their claimed mime type and file name."""

    data: bytes = field(repr=False)
    mime: str = "application/octet-stream"
    name: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


Part = TextPart | ImagePart


@dataclass(frozen=True)
class Message:
    """One incoming message: an ordered list of parts."""

    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.parts if isinstance(p, TextPart)).strip()

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImagePart))

    @classmethod
    def of(cls, text: str | None = None, *images: ImagePart) -> Message:
        parts: list[Part] = list(images)
        if text:
            parts.append(TextPart(text))
        return cls(tuple(parts))


@dataclass(frozen=True)
class Turn:
    role: Role
    parts: tuple[Part, ...]
    created_at: float = field(default_factory=time.time)
    job_id: str | None = None

    @property
    def text(self) -> str:
        return Message(self.parts).text

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return Message(self.parts).images


# Why an answer ended: the model finished it ("stop") or max_new_tokens cut it ("length").
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.0
    system_prompt: str | None = None
    # A stable key for the conversation, so an engine may keep state (a KV cache) between turns.
    session: str | None = None


@dataclass(frozen=True)
class Job:
    id: str
    conversation: ConversationId
    message: Message
    user: User
    status: JobStatus = JobStatus.QUEUED
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    # Platform-specific reply context (chat id, message to reply to, placeholder id, ...), captured
    # when the message arrived and persisted with the job, so a reply can be sent after a restart.
    origin: dict[str, Any] = field(default_factory=dict)
    answer: str | None = None
    error: str | None = None


class InputRejected(Exception):
    """Input that cannot be processed; `code` selects the user-facing text, `params` fill it in."""

    def __init__(self, code: str, detail: str, **params: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.params = params


def size_text(n_bytes: float) -> str:
    """A file size or size limit as users see it (InputRejected params, chat texts), in the binary
    units the limits are counted in (1 MiB = 1,048,576 bytes; VLBOT_MAX_IMAGE_MB=10 is 10 MiB):
    "10 MiB", "12.4 MiB". Rounded up to 0.1, so a file over a limit never shows as the limit."""
    tenths = math.ceil(n_bytes / 2**20 * 10 - 1e-9)
    return f"{tenths // 10} MiB" if tenths % 10 == 0 else f"{tenths / 10:.1f} MiB"
