"""Quotas in the units a local model costs: images, requests and engine seconds per UTC day, and
jobs waiting (queued or running) per user at once.

Limits come from the settings' defaults and from overrides in the database per user (HTTP: per
API key) and per chat/channel; the most specific wins, field by field: the user's (or key's)
override, then the chat's, then the defaults. A chat's limits apply to each user in it; use is
counted per user (or key) across all chats of a platform. Days are UTC: today's use counts jobs
settled since 00:00 UTC (the usage ledger) plus the user's jobs not settled yet (the jobs table),
and resets at the next 00:00 UTC. Admins are exempt.

`QuotaAdmission` is the runner's Admission: over a limit it raises InputRejected (quota_images,
quota_requests, quota_engine, quota_waiting with limit, used, resets), and nothing is queued.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from bot.adapter import Incoming
from bot.admin_types import DayUse, Limits, Subject, day_start, next_reset, reset_text
from bot.db import Database, Tx
from bot.models import InputRejected
from bot.usage import UsageLedger

LIMIT_FIELDS = ("images_per_day", "requests_per_day", "engine_seconds_per_day", "max_waiting")
# jobs not settled yet: "answered" is waiting for delivery (counted today, not as waiting)
UNSETTLED = ("queued", "running", "answered")
WAITING = ("queued", "running")


def user_subject(platform: str, user_id: str) -> Subject:
    """The subject a user's quota and use are kept under (HTTP: the API key id)."""
    return Subject(platform, "key" if platform == "http" else "user", user_id)


def chat_subject(platform: str, chat_id: str | None) -> Subject | None:
    return None if platform == "http" or chat_id is None else Subject(platform, "chat", chat_id)


class QuotaStore:
    """Overrides per subject (user, chat, key) in the database, and today's use."""

    def __init__(self, db: Database, ledger: UsageLedger, defaults: Limits | None = None) -> None:
        self.db = db
        self.ledger = ledger
        self.defaults = defaults or Limits()

    async def override(self, subject: Subject) -> Limits:
        """The stored override of `subject` (all None when it has none)."""
        rows = await self.db.fetchall(
            f"SELECT {', '.join(LIMIT_FIELDS)} FROM quota_overrides"
            " WHERE platform = ? AND kind = ? AND subject_id = ?",
            [subject.platform, subject.kind, subject.id],
        )
        return limits_from(rows[0]) if rows else Limits()

    @staticmethod
    async def put(tx: Tx, subject: Subject, limits: Limits, actor: Subject) -> None:
        """Replace the override of `subject` (an empty Limits removes it)."""
        key = [subject.platform, subject.kind, subject.id]
        await tx.execute(
            "DELETE FROM quota_overrides WHERE platform = ? AND kind = ? AND subject_id = ?", key
        )
        if limits.empty:
            return
        await tx.execute(
            f"INSERT INTO quota_overrides (platform, kind, subject_id, {', '.join(LIMIT_FIELDS)},"
            " updated_at, updated_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [*key, *(getattr(limits, f) for f in LIMIT_FIELDS), time.time(), str(actor)],
        )

    async def effective(self, user: Subject, chat: Subject | None) -> Limits:
        """The user's (key's) override, then the chat's, then the defaults, field by field."""
        limits = await self.override(user)
        if chat is not None:
            limits = limits.over(await self.override(chat))
        return limits.over(self.defaults)

    async def day_use(self, user: Subject, now: float | None = None) -> DayUse:
        """Today's (UTC) use of `user`: settled jobs from the ledger plus its unsettled jobs.

        One statement, so one snapshot (also on Postgres): the runner writes a job's ledger row
        before it marks the job done, and a job with a ledger row is not counted again from the
        jobs table, so every job is counted exactly once. The jobs table holds at most the
        queue's bound of unsettled jobs; they are matched to the user here rather than by a
        JSON query."""
        now = now if now is not None else time.time()
        marks = ", ".join("?" for _ in UNSETTLED)
        rows = await self.db.fetchall(
            "SELECT NULL AS status, NULL AS user_json, COUNT(*) AS requests,"
            " COALESCE(SUM(images), 0) AS images, COALESCE(SUM(engine_s), 0) AS engine_s"
            " FROM usage_ledger WHERE platform = ? AND user_id = ? AND finished_at >= ?"
            " AND status <> 'rejected'"
            " UNION ALL"
            ' SELECT j.status, j."user", 1, (SELECT COUNT(*) FROM job_images i'
            " WHERE i.job_id = j.id), 0 FROM jobs j"
            f" WHERE j.status IN ({marks}) AND j.conversation LIKE ?"
            " AND NOT EXISTS (SELECT 1 FROM usage_ledger u WHERE u.job_id = j.id)",
            [user.platform, user.id, day_start(now), *UNSETTLED, f"{user.platform}:%"],
        )
        requests, images, engine_s, waiting = 0, 0, 0.0, 0
        for row in rows:
            if row["status"] is not None and (
                str(json.loads(row["user_json"]).get("platform_id")) != user.id
            ):
                continue  # another user's job on this platform
            requests += int(row["requests"])
            images += int(row["images"])
            engine_s += float(row["engine_s"])
            waiting += row["status"] in WAITING
        return DayUse(requests, images, engine_s, waiting)


def limits_from(row: dict[str, object]) -> Limits:
    return Limits(
        images_per_day=_int(row["images_per_day"]),
        requests_per_day=_int(row["requests_per_day"]),
        engine_seconds_per_day=None
        if row["engine_seconds_per_day"] is None
        else float(row["engine_seconds_per_day"]),  # type: ignore[arg-type]
        max_waiting=_int(row["max_waiting"]),
    )


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def check(limits: Limits, used: DayUse, images: int, now: float) -> None:
    """Raise InputRejected if one more job with `images` images goes over a limit."""
    resets = reset_text(next_reset(now))
    if limits.max_waiting is not None and used.waiting >= limits.max_waiting:
        raise InputRejected(
            "quota_waiting", f"{used.waiting} jobs waiting", limit=limits.max_waiting,
            used=used.waiting, resets=resets,
        )
    if limits.requests_per_day is not None and used.requests + 1 > limits.requests_per_day:
        raise InputRejected(
            "quota_requests", f"{used.requests} requests today", limit=limits.requests_per_day,
            used=used.requests, resets=resets,
        )
    if (
        limits.images_per_day is not None
        and images
        and used.images + images > limits.images_per_day
    ):
        raise InputRejected(
            "quota_images", f"{used.images} + {images} images today",
            limit=limits.images_per_day, used=used.images, resets=resets,
        )
    if (
        limits.engine_seconds_per_day is not None
        and used.engine_s >= limits.engine_seconds_per_day
    ):
        raise InputRejected(
            "quota_engine", f"{used.engine_s:.1f} engine seconds today",
            limit=_seconds(limits.engine_seconds_per_day), used=_seconds(used.engine_s),
            resets=resets,
        )


def _seconds(value: float) -> str:
    """Seconds as users read them: "1800", "12.5", "0.05"."""
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}".rstrip("0").rstrip(".")


class QuotaAdmission:
    """The runner's Admission: refuses a message over its user's quota (admins exempt)."""

    def __init__(self, store: QuotaStore, is_admin: Callable[[str, str], bool]) -> None:
        self.store = store
        self.is_admin = is_admin

    async def admit(self, incoming: Incoming) -> None:
        platform = incoming.conversation.platform
        user_id = incoming.user.platform_id
        if self.is_admin(platform, user_id):
            return
        user = user_subject(platform, user_id)
        limits = await self.store.effective(user, chat_subject(platform, incoming.conversation.chat))
        if limits.empty:
            return
        now = time.time()
        check(limits, await self.store.day_use(user, now), len(incoming.message.images), now)
