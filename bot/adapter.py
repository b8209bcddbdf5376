"""The adapter contract: start, stop, send — and the core an adapter is handed at start.

An adapter turns platform events into `Incoming` messages and hands them to `Core.submit`
(ack fast: submit persists and queues, it never waits for the answer). The runner later calls
`Adapter.send(job, event)` on the adapter of the job's platform with reply events; the job's
`origin` holds the platform reply context the adapter captured when the message arrived.

Optional capability: an adapter that can also post on its own initiative (the triage workflow's
routed summaries and daily digests) implements `Poster`; the composition root hands those to the
workflow. The core contract stays start/stop/send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bot.engine_port import UpstreamStatus
from bot.history import HistoryStore
from bot.models import ConversationId, FinishReason, ImagePart, Job, Message, User

if TYPE_CHECKING:  # bot.admin's stores import this module
    from bot.admin import AdminService


@dataclass(frozen=True)
class Incoming:
    conversation: ConversationId
    user: User
    message: Message
    origin: dict[str, Any] = field(default_factory=dict)
    # A platform event id (Telegram update id, Slack event_id): redelivered events are answered once.
    event_key: str | None = None


@dataclass(frozen=True)
class Acceptance:
    job_id: str
    position: int  # 1 = next to run (0 = running now)
    eta_s: float | None  # None until a job has been timed
    duplicate: bool = False


# --- reply events, in the order a job sees them -------------------------------------------


@dataclass(frozen=True)
class Queued:
    position: int
    eta_s: float | None  # None until a job has been timed: show the position alone


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class Partial:
    text: str  # the whole answer so far
    delta: str  # what this piece added


@dataclass(frozen=True)
class Final:
    text: str
    finish_reason: FinishReason = "stop"  # "length": max_new_tokens cut the answer
    prompt_tokens: int | None = None  # as the engine counted them (None: it does not count)
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Failed:
    code: str  # a texts.py key: failed, timeout, cancelled, or an intake code
    ref: str  # reference id to quote to an operator
    params: dict[str, Any] = field(default_factory=dict)


ReplyEvent = Queued | Started | Partial | Final | Failed


class QueueFull(Exception):
    def __init__(self, queued: int, retry_after_s: float) -> None:
        super().__init__(f"queue full ({queued} waiting)")
        self.queued = queued
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class CoreStatus:
    engine_state: str  # loading | ready | failed
    engine_error: str | None
    model: str
    engine: str
    dtype: str
    queue_depth: int
    running: int
    uptime_s: float
    job_seconds: float  # recent mean job duration, for ETAs
    fallback: str | None = None  # why engine=auto answers with OCR instead of the VLM
    upstreams: tuple[UpstreamStatus, ...] = ()  # engine=openai: each model server of the pool
    cpu_tier: str | None = None  # the local engine's CPU tier (VLBOT_CPU) and its C kernels in use
    kernels: str | None = None
    webhooks: dict[str, int] | None = None  # outbound webhook events by state (bot/outbox.py)


class Core(Protocol):
    """What the composition root hands an adapter: the runner and history, narrowly."""

    @property
    def history(self) -> HistoryStore: ...

    @property
    def admin(self) -> AdminService:
        """Admins, access, quotas, usage, audit log and run-time API keys (bot/admin.py)."""

    def status(self) -> CoreStatus: ...

    async def job_counts(self) -> dict[str, int]: ...

    async def images_for_reply(
        self, conversation: ConversationId, message_ref: int | str
    ) -> list[ImagePart]:
        """Images of the job whose origin names this platform message (see JobStore)."""

    async def submit(self, incoming: Incoming) -> Acceptance:
        """Persist and queue. Raises QueueFull or bot.models.InputRejected (reply to the user)."""

    async def cancel(self, conversation: ConversationId) -> int:
        """Stop the running and queued jobs of a conversation; returns how many."""

    async def reset(self, conversation: ConversationId) -> None:
        """Cancel the conversation's jobs and forget its history."""


class Adapter(Protocol):
    platform: str

    async def start(self, core: Core) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, job: Job, event: ReplyEvent) -> dict[str, Any] | None:
        """Deliver one reply event. Return origin fields to persist (e.g. a placeholder message
        id) so that a later delivery, also after a restart, edits the same message."""


@runtime_checkable
class Poster(Protocol):
    """An adapter that can post a message of its own into a chat (not a reply to a job)."""

    platform: str

    async def post(self, chat: str, text: str) -> str | None:
        """Post plain text (the adapter escapes it for its platform; bare URLs stay links) into
        `chat` (a Slack channel ID, a Telegram chat id) and return a link to the new message, or
        None where the platform has none. Raises if the platform refused the post."""


class Posters:
    """The adapters that can post, by platform, as one call: (platform, chat, text) -> link. The
    triage workflow's PostText (bot/triage/workflow.py). `adapters` is read at each call."""

    def __init__(self, adapters: Sequence[object]) -> None:
        self.adapters = adapters

    async def __call__(self, platform: str, chat: str, text: str) -> str | None:
        for adapter in self.adapters:
            if isinstance(adapter, Poster) and adapter.platform == platform:
                return await adapter.post(chat, text)
        raise LookupError(f"cannot post into {platform}:{chat}: the {platform} adapter is not "
                          "configured (or cannot post)")
