"""The values the admin facade (bot/admin.py) speaks in: who a rule is about (`Subject`), the
limits of a quota (`Limits`), what is left today (`Remaining`), usage reports and ledger rows,
audit entries and API keys. Plain frozen dataclasses; the stores and the facade share them.

A "day" is a UTC day: quotas count from 00:00 UTC and reset at the next 00:00 UTC.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

SubjectKind = Literal["user", "chat", "key"]
SUBJECT_KINDS: tuple[SubjectKind, ...] = ("user", "chat", "key")
PLATFORMS = ("telegram", "slack", "http")


@dataclass(frozen=True)
class Subject:
    """Who a rule or a usage row is about: a platform user id, a chat/channel id, or (HTTP) the
    API key id the HTTP adapter uses as User.platform_id."""

    platform: str  # "telegram" | "slack" | "http"
    kind: SubjectKind
    id: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.kind}:{self.id}"

    @classmethod
    def parse(cls, text: str) -> Subject:
        """"telegram:user:42" (as `str` writes it) back into a Subject."""
        platform, kind, ident = text.split(":", 2)
        if kind not in SUBJECT_KINDS:
            raise ValueError(f"not a subject kind: {kind!r} (user, chat or key)")
        return cls(platform, kind, ident)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Limits:
    """A quota. None: not set at this level (falls back to the next, else no limit)."""

    images_per_day: int | None = None
    requests_per_day: int | None = None
    engine_seconds_per_day: float | None = None
    max_waiting: int | None = None  # jobs queued or running per user at once

    def over(self, fallback: Limits) -> Limits:
        """These limits where set, `fallback`'s elsewhere."""
        return Limits(**{
            name: mine if mine is not None else getattr(fallback, name)
            for name, mine in vars(self).items()
        })

    @property
    def empty(self) -> bool:
        return self == Limits()


@dataclass(frozen=True)
class DayUse:
    """What a user (or key) used today (UTC day), and how many of its jobs wait or run now."""

    requests: int = 0  # jobs accepted today (answered, failed, cancelled, or still waiting)
    images: int = 0
    engine_s: float = 0.0
    waiting: int = 0  # queued or running now


@dataclass(frozen=True)
class Remaining:
    """A user's effective limits, today's use and when the day's counts reset."""

    limits: Limits
    used: DayUse
    resets_at: float  # unix time of the next 00:00 UTC
    exempt: bool = False  # an admin: no limit applies

    @property
    def images_left(self) -> int | None:
        return _left(self.limits.images_per_day, self.used.images, self.exempt)

    @property
    def requests_left(self) -> int | None:
        return _left(self.limits.requests_per_day, self.used.requests, self.exempt)

    @property
    def engine_seconds_left(self) -> float | None:
        if self.exempt or self.limits.engine_seconds_per_day is None:
            return None
        return max(0.0, self.limits.engine_seconds_per_day - self.used.engine_s)


def _left(limit: int | None, used: int, exempt: bool) -> int | None:
    return None if exempt or limit is None else max(0, limit - used)


def day_start(at: float) -> float:
    """00:00 UTC of the day `at` falls in (unix time)."""
    moment = dt.datetime.fromtimestamp(at, dt.timezone.utc)
    return dt.datetime(moment.year, moment.month, moment.day, tzinfo=dt.timezone.utc).timestamp()


def next_reset(at: float) -> float:
    """The next 00:00 UTC after `at`: when the day's quota counts start again."""
    return day_start(at) + 86400


def utc_day(at: float) -> str:
    """The UTC day of `at` as YYYY-MM-DD."""
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).strftime("%Y-%m-%d")


def reset_text(at: float) -> str:
    """A reset time as users see it: "2026-12-08 00:00 UTC"."""
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


OutcomeName = Literal["answered", "failed", "cancelled", "rejected"]


@dataclass(frozen=True)
class UsageRecord:
    """One ledger row: a settled job, or a message refused before it became a job."""

    finished_at: float  # unix time
    platform: str
    user_id: str  # HTTP: the API key id
    user_name: str
    chat: str | None  # chat/channel id (None on HTTP)
    conversation: str  # the conversation key
    api_key: str | None  # HTTP: the API key id
    job_id: str | None  # None: refused before a job was written
    status: OutcomeName
    reason: str | None  # failed/cancelled/rejected: the texts.py code
    images: int
    visual_tokens: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    engine_s: float
    first_token_s: float | None


@dataclass(frozen=True)
class UsageTotals:
    requests: int = 0  # jobs (answered + failed + cancelled); refused messages are not jobs
    images: int = 0
    engine_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    answered: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class DailyUsage:
    day: str  # YYYY-MM-DD (UTC)
    requests: int
    images: int
    engine_s: float


@dataclass(frozen=True)
class TopUsage:
    subject: Subject  # a user (kind "user", HTTP: "key") or a chat (kind "chat")
    name: str  # a display name when the ledger has one, else ""
    requests: int
    images: int
    engine_s: float


@dataclass(frozen=True)
class UsageReport:
    subject: Subject | None  # None: everyone
    since: float
    until: float
    totals: UsageTotals
    days: tuple[DailyUsage, ...]  # oldest first, days with use only
    top_users: tuple[TopUsage, ...] = ()  # most engine seconds first (everyone's report only)
    top_chats: tuple[TopUsage, ...] = ()
    first_token_p50_s: float | None = None
    first_token_p95_s: float | None = None


AuditAction = Literal["allow", "deny", "quota", "key_create", "key_revoke"]


@dataclass(frozen=True)
class AuditEntry:
    at: float
    actor: Subject
    action: str  # allow | deny | quota | key_create | key_revoke
    subject: Subject
    detail: str = ""  # e.g. the quota after the change, the key's name


@dataclass(frozen=True)
class ApiKeyInfo:
    """An HTTP API key made at run time (its secret is stored hashed and shown once)."""

    id: str  # the key id: the HTTP user's platform_id, the ledger's api_key
    name: str
    created_at: float
    created_by: str  # the actor, as Subject text
    revoked_at: float | None = None
    limits: Limits = field(default_factory=Limits)

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def subject(self) -> Subject:
        return Subject("http", "key", self.id)
