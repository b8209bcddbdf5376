"""The usage ledger: one row per settled job and per refused message (a JobObserver), in the
same database as history and pruned with the same retention; and the reports read from it.

Who a row is about: the platform user (HTTP: the API key id, which the HTTP adapter uses as the
user's platform id), the chat/channel (none on HTTP), the API key (HTTP). A "request" is a job
(answered, failed or cancelled); a refused message is recorded as "rejected" but is not one.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

from bot.admin_types import (
    DailyUsage,
    Subject,
    TopUsage,
    UsageRecord,
    UsageReport,
    UsageTotals,
    utc_day,
)
from bot.db import Database, Row
from bot.job_hooks import JobOutcome

log = logging.getLogger("vlbot.usage")

# The ledger's columns, in UsageRecord's order (also the CSV's columns: bot/cli.py).
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRecord))
JOB_STATUSES = ("answered", "failed", "cancelled")


def record_of(outcome: JobOutcome) -> UsageRecord:
    """The ledger row of one outcome."""
    platform = outcome.conversation.platform
    http = platform == "http"
    return UsageRecord(
        finished_at=outcome.finished_at,
        platform=platform,
        user_id=outcome.user.platform_id,
        user_name=outcome.user.display_name,
        chat=None if http else outcome.conversation.chat,
        conversation=outcome.conversation.key(),
        api_key=outcome.user.platform_id if http else None,
        job_id=outcome.job_id,
        status=outcome.status,
        reason=outcome.reason,
        images=outcome.images,
        visual_tokens=outcome.visual_tokens,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        engine_s=outcome.engine_s,
        first_token_s=outcome.first_token_s,
    )


def subject_filter(subject: Subject | None) -> tuple[str, list[Any]]:
    """A WHERE fragment (starting with " AND") selecting one subject's rows."""
    if subject is None:
        return "", []
    column = {"user": "user_id", "key": "api_key", "chat": "chat"}[subject.kind]
    return f" AND platform = ? AND {column} = ?", [subject.platform, subject.id]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..1) by the nearest-rank method; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class UsageLedger:
    """Writes the ledger (`job_finished`), reads it (records, today's use, reports), prunes it."""

    def __init__(self, db: Database, retention_days: float = 30.0) -> None:
        self.db = db
        self.retention_days = retention_days

    async def job_finished(self, outcome: JobOutcome) -> None:
        record = record_of(outcome)
        placeholders = ", ".join("?" for _ in COLUMNS)
        async with self.db.transaction() as tx:
            await tx.execute(
                f"INSERT INTO usage_ledger ({', '.join(COLUMNS)}) VALUES ({placeholders})"
                " ON CONFLICT DO NOTHING",  # a job settled again after a restart: once
                [getattr(record, c) for c in COLUMNS],
            )

    async def records(
        self, since: float, until: float | None = None, subject: Subject | None = None
    ) -> list[UsageRecord]:
        """Rows with since <= finished_at < until, oldest first."""
        where, params = subject_filter(subject)
        rows = await self.db.fetchall(
            f"SELECT {', '.join(COLUMNS)} FROM usage_ledger WHERE finished_at >= ?"
            f" AND finished_at < ?{where} ORDER BY finished_at",
            [since, until if until is not None else time.time() + 1, *params],
        )
        return [record_from(row) for row in rows]

    async def report(
        self, subject: Subject | None, since: float, until: float | None = None, top: int = 10
    ) -> UsageReport:
        until = until if until is not None else time.time()
        records = await self.records(since, until, subject)
        return summarize(records, subject, since, until, top)

    async def prune(self, now: float | None = None) -> int:
        """Delete rows older than the retention period (history's)."""
        cutoff = (now if now is not None else time.time()) - self.retention_days * 86400
        async with self.db.transaction() as tx:
            return await tx.execute("DELETE FROM usage_ledger WHERE finished_at < ?", [cutoff])


def record_from(row: Row) -> UsageRecord:
    return UsageRecord(**{c: row[c] for c in COLUMNS})


def summarize(
    records: Iterable[UsageRecord], subject: Subject | None, since: float, until: float, top: int
) -> UsageReport:
    """Totals, use per UTC day, the top users and chats (everyone's report only), and the time
    to first token (p50/p95) of answered jobs."""
    counts: dict[str, int] = defaultdict(int)
    images = prompt = completion = 0
    engine_s = 0.0
    days: dict[str, list[float]] = {}
    users: dict[Subject, list[float]] = {}
    chats: dict[Subject, list[float]] = {}
    names: dict[Subject, str] = {}
    first_tokens: list[float] = []
    for r in records:
        counts[r.status] += 1
        if r.status == "rejected":
            continue
        images += r.images
        engine_s += r.engine_s
        prompt += r.prompt_tokens or 0
        completion += r.completion_tokens or 0
        if r.status == "answered" and r.first_token_s is not None:
            first_tokens.append(r.first_token_s)
        _add(days.setdefault(utc_day(r.finished_at), [0, 0, 0.0]), r)
        user = Subject(r.platform, "key" if r.api_key is not None else "user", r.user_id)
        _add(users.setdefault(user, [0, 0, 0.0]), r)
        if r.user_name:
            names[user] = r.user_name
        if r.chat is not None:
            _add(chats.setdefault(Subject(r.platform, "chat", r.chat), [0, 0, 0.0]), r)
    totals = UsageTotals(
        requests=sum(counts[s] for s in JOB_STATUSES),
        images=images,
        engine_s=engine_s,
        prompt_tokens=prompt,
        completion_tokens=completion,
        answered=counts["answered"],
        failed=counts["failed"],
        cancelled=counts["cancelled"],
        rejected=counts["rejected"],
    )
    everyone = subject is None
    return UsageReport(
        subject=subject,
        since=since,
        until=until,
        totals=totals,
        days=tuple(
            DailyUsage(day, int(v[0]), int(v[1]), v[2]) for day, v in sorted(days.items())
        ),
        top_users=_top(users, names, top) if everyone else (),
        top_chats=_top(chats, {}, top) if everyone else (),
        first_token_p50_s=percentile(first_tokens, 0.5),
        first_token_p95_s=percentile(first_tokens, 0.95),
    )


def _add(sums: list[float], r: UsageRecord) -> None:
    sums[0] += 1
    sums[1] += r.images
    sums[2] += r.engine_s


def _top(found: dict[Subject, list[float]], names: dict[Subject, str], n: int) -> tuple[TopUsage, ...]:
    ranked = sorted(found.items(), key=lambda kv: (-kv[1][2], -kv[1][0], str(kv[0])))
    return tuple(
        TopUsage(s, names.get(s, ""), int(v[0]), int(v[1]), v[2]) for s, v in ranked[:n]
    )
