"""The usage ledger: one row per settled job and per refused message, written by the real
Runner (shared fake engine), on SQLite and Postgres; reports, retention, reopening the file."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.admin import AdminPolicy, Subject
from bot.admin_types import utc_day
from bot.db import Database
from bot.job_hooks import JobOutcome
from bot.models import ConversationId, InputRejected, User
from bot.usage import UsageLedger, percentile
from tests.admin_helpers import ask, until
from tests.conftest import Stack, make_stack


@pytest.fixture
async def stack(database_target: Path | str) -> AsyncIterator[Stack]:
    s = await make_stack(
        database_target, admin_policy=AdminPolicy(), retry_backoff_s=0.01, max_attempts=2,
        max_question_chars=100,
    )
    s.runner.attach({p: s.adapter for p in ("telegram", "slack", "http")})
    yield s
    await s.runner.stop(grace_s=1)
    await s.db.close()


def ledger(stack: Stack) -> UsageLedger:
    assert stack.admin is not None
    return stack.admin.ledger


async def rows_of(stack: Stack, n: int) -> list:  # type: ignore[type-arg]
    async def enough() -> bool:
        return len(await ledger(stack).records(0)) >= n

    await until(enough, f"{n} ledger rows")
    return await ledger(stack).records(0)


async def test_an_answered_job_is_recorded_with_its_images_tokens_and_times(stack: Stack) -> None:
    stack.engine.delay_s = 0.01
    await stack.runner.start()
    await stack.runner.submit(ask("41", "what is on this receipt", images=2, chat="-100"))
    await stack.adapter.wait_for_finals(1)
    [row] = await rows_of(stack, 1)
    assert (row.platform, row.user_id, row.user_name, row.chat) == (
        "telegram", "41", "name of 41", "-100"
    )
    assert row.conversation == "telegram:-100" and row.api_key is None and row.job_id
    assert (row.status, row.reason, row.images) == ("answered", None, 2)
    assert row.engine_s > 0 and row.first_token_s is not None and row.first_token_s <= row.engine_s
    assert row.prompt_tokens and row.prompt_tokens > 0  # the engine's count, passed through
    assert row.completion_tokens == len("answer to: what is on this receipt".split())
    assert abs(row.finished_at - time.time()) < 60


async def test_failed_cancelled_and_refused_messages_are_recorded_with_their_reason(
    stack: Stack,
) -> None:
    await stack.runner.start()
    stack.engine.fail_times = 2  # both attempts fail
    await stack.runner.submit(ask("1"))
    await stack.adapter.wait_for_finals(1)
    stack.engine.hang = True
    await stack.runner.submit(ask("2"))

    async def running() -> bool:
        return stack.runner.running_count == 1

    await until(running, "the job to start")
    assert await stack.runner.cancel(ConversationId("telegram", "2")) == 1
    with pytest.raises(InputRejected, match="characters"):
        await stack.runner.submit(ask("3", "x" * 101, images=1))
    rows = await rows_of(stack, 3)
    by_user = {r.user_id: r for r in rows}
    assert (by_user["1"].status, by_user["1"].reason) == ("failed", "failed")
    assert (by_user["2"].status, by_user["2"].reason) == ("cancelled", "cancelled")
    assert (by_user["3"].status, by_user["3"].reason) == ("rejected", "question_too_long")
    assert by_user["3"].job_id is None and by_user["3"].images == 1
    report = await ledger(stack).report(None, 0)
    assert (report.totals.requests, report.totals.failed, report.totals.cancelled) == (2, 1, 1)
    assert report.totals.rejected == 1 and report.totals.answered == 0


async def test_an_http_job_is_recorded_under_its_api_key(stack: Stack) -> None:
    await stack.runner.start()
    await stack.runner.submit(ask("k-office", chat="key-abc/conv1", platform="http"))
    await stack.adapter.wait_for_finals(1)
    [row] = await rows_of(stack, 1)
    assert (row.platform, row.api_key, row.user_id, row.chat) == ("http", "k-office", "k-office", None)
    mine = await ledger(stack).report(Subject("http", "key", "k-office"), 0)
    assert mine.totals.requests == 1
    assert (await ledger(stack).report(Subject("http", "key", "k-other"), 0)).totals.requests == 0


JOB_IDS = itertools.count()  # each outcome its own job (the ledger keeps one row per job)


def outcome(user: str, chat: str, at: float, images: int = 1, engine_s: float = 1.0,
            first: float | None = 0.5, status: str = "answered") -> JobOutcome:
    return JobOutcome(
        conversation=ConversationId("slack", chat), user=User(user, f"@{user}"), origin={},
        status=status, images=images, job_id=f"j{next(JOB_IDS)}", engine_s=engine_s,  # type: ignore[arg-type]
        first_token_s=first, prompt_tokens=10, completion_tokens=5, finished_at=at,
    )


async def test_the_report_has_totals_days_top_users_and_chats_and_first_token_percentiles(
    database_target: Path | str,
) -> None:
    db = await Database.open(database_target)
    try:
        book = UsageLedger(db)
        day1, day2 = 1_700_006_400.0, 1_700_006_400.0 + 86400  # two UTC days
        firsts = [0.1 * i for i in range(1, 21)]  # 0.1 .. 2.0
        for i, first in enumerate(firsts):
            user = "UBIG" if i < 15 else "USMALL"
            await book.job_finished(
                outcome(user, "C1" if i % 2 else "C2", day1 if i < 10 else day2, first=first)
            )
        await book.job_finished(outcome("USMALL", "C1", day2, images=3, engine_s=0, status="rejected"))
        report = await book.report(None, day1 - 1, day2 + 10)
        assert report.totals.requests == 20 and report.totals.rejected == 1
        assert report.totals.images == 20 and report.totals.engine_s == pytest.approx(20)
        assert (report.totals.prompt_tokens, report.totals.completion_tokens) == (200, 100)
        assert [(d.day, d.requests, d.images) for d in report.days] == [
            (utc_day(day1), 10, 10), (utc_day(day2), 10, 10)
        ]
        assert [(t.subject, t.name, t.requests) for t in report.top_users] == [
            (Subject("slack", "user", "UBIG"), "@UBIG", 15),
            (Subject("slack", "user", "USMALL"), "@USMALL", 5),
        ]
        assert {t.subject.id: t.requests for t in report.top_chats} == {"C1": 10, "C2": 10}
        assert report.first_token_p50_s == pytest.approx(1.0)
        assert report.first_token_p95_s == pytest.approx(1.9)
        mine = await book.report(Subject("slack", "user", "USMALL"), day1 - 1, day2 + 10)
        assert mine.totals.requests == 5 and mine.top_users == () and mine.top_chats == ()
        chat = await book.report(Subject("slack", "chat", "C2"), day1 - 1, day2 + 10)
        assert chat.totals.requests == 10
    finally:
        await db.close()


async def test_rows_older_than_the_retention_are_pruned(database_target: Path | str) -> None:
    db = await Database.open(database_target)
    try:
        book = UsageLedger(db, retention_days=30)
        now = time.time()
        await book.job_finished(outcome("UOLD", "C1", now - 31 * 86400))
        await book.job_finished(outcome("UNEW", "C1", now - 29 * 86400))
        assert await book.prune(now) == 1
        assert [r.user_id for r in await book.records(0)] == ["UNEW"]
    finally:
        await db.close()


async def test_the_ledger_survives_reopening_the_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "data" / "vlbot.sqlite3"
    db = await Database.open(path)
    await UsageLedger(db).job_finished(outcome("U1", "C1", time.time()))
    await db.close()
    db = await Database.open(path)
    try:
        [row] = await UsageLedger(db).records(0)
        assert (row.user_id, row.chat, row.status) == ("U1", "C1", "answered")
    finally:
        await db.close()


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
