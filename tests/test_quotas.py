"""Quotas at the runner (the real Runner with the shared fake engine, SQLite and Postgres): each
kind driven to its limit is refused with a text naming the limit and the reset, nothing is
queued, another user is still served; admins are exempt; overrides per user, chat and API key
beat the defaults, the most specific first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bot import texts
from bot.access import SettingsAccess
from bot.adapter import Incoming
from bot.admin import AdminPolicy, AdminService, Limits, Subject
from bot.admin_types import next_reset, reset_text
from bot.job_hooks import JobOutcome
from bot.models import ConversationId, InputRejected, Job
from tests.admin_helpers import ask, until
from tests.conftest import Stack, make_stack

ADMIN = Subject("telegram", "user", "boss")

StackMaker = Callable[[Limits], Awaitable[Stack]]


@pytest.fixture
async def make(database_target: Path | str) -> AsyncIterator[StackMaker]:
    made: list[Stack] = []

    async def _make(defaults: Limits) -> Stack:
        policy = AdminPolicy(SettingsAccess(admins={"telegram": frozenset({"boss"})}), defaults)
        s = await make_stack(database_target, admin_policy=policy, retry_backoff_s=0.01)
        s.runner.attach({p: s.adapter for p in ("telegram", "slack", "http")})
        await s.runner.start()
        made.append(s)
        return s

    yield _make
    for s in made:
        await s.runner.stop(grace_s=1)
        await s.db.close()


def admin_of(stack: Stack) -> AdminService:
    assert stack.admin is not None
    return stack.admin


async def answered(stack: Stack, message: Incoming, total: int) -> None:
    """Submit and wait until `total` answers in all have been delivered and ledgered."""
    await stack.runner.submit(message)
    await stack.adapter.wait_for_finals(total)

    async def ledgered() -> bool:
        rows = await admin_of(stack).ledger.records(0)
        return len([r for r in rows if r.status != "rejected"]) >= total

    await until(ledgered, f"{total} jobs in the ledger")


async def refused(stack: Stack, message: Incoming, code: str) -> InputRejected:
    """Submit a message that must be refused with `code`; nothing may be queued by it."""
    before = sum((await stack.jobs.counts()).values())
    with pytest.raises(InputRejected) as caught:
        await stack.runner.submit(message)
    assert caught.value.code == code
    assert sum((await stack.jobs.counts()).values()) == before  # no job written, none queued
    return caught.value


def resets_now() -> str:
    return reset_text(next_reset(time.time()))


async def test_requests_per_day_refuses_the_next_request_and_serves_another_user(
    make: StackMaker,
) -> None:
    stack = await make(Limits(requests_per_day=2))
    await answered(stack, ask("ann"), 1)
    await answered(stack, ask("ann", "and this?"), 2)
    error = await refused(stack, ask("ann", "a third one"), "quota_requests")
    assert error.params == {"limit": 2, "used": 2, "resets": resets_now()}
    en = texts.text(error.code, "en", **error.params)
    assert "2 of your requests" in en.replace("all 2", "2") and resets_now() in en
    zh = texts.text(error.code, "zh-CN", **error.params)
    assert "2 次请求" in zh and resets_now() in zh
    await answered(stack, ask("bob"), 3)  # another user is untouched


async def test_images_per_day_counts_images_and_names_what_was_used(make: StackMaker) -> None:
    stack = await make(Limits(images_per_day=3))
    await answered(stack, ask("ann", images=2), 1)
    error = await refused(stack, ask("ann", images=2), "quota_images")
    assert (error.params["limit"], error.params["used"]) == (3, 2)
    assert "2 of your 3 images" in texts.text(error.code, "en", **error.params)
    assert "上限 3 张" in texts.text(error.code, "zh", **error.params)
    await answered(stack, ask("ann", images=1), 2)  # one more still fits
    await refused(stack, ask("ann", images=1), "quota_images")
    await answered(stack, ask("ann", "a question without an image"), 3)
    await answered(stack, ask("bob", images=3), 4)


async def test_engine_seconds_per_day_refuses_once_the_model_time_is_spent(
    make: StackMaker,
) -> None:
    stack = await make(Limits(engine_seconds_per_day=0.05))
    stack.engine.delay_s = 0.02  # "answer to: ..." is 4 words: at least 80 ms of engine time
    await answered(stack, ask("ann", "one two"), 1)
    [row] = await admin_of(stack).ledger.records(0)
    assert row.engine_s >= 0.05
    error = await refused(stack, ask("ann"), "quota_engine")
    assert error.params["limit"] == "0.05" and float(error.params["used"]) >= 0.05
    assert "of your 0.05 s of model time" in texts.text(error.code, "en", **error.params)
    await answered(stack, ask("bob"), 2)


async def test_max_waiting_refuses_while_the_users_jobs_are_queued_or_running(
    make: StackMaker,
) -> None:
    stack = await make(Limits(max_waiting=1))
    stack.engine.hang = True
    await stack.runner.submit(ask("ann"))
    error = await refused(stack, ask("ann", "another"), "quota_waiting")
    assert (error.params["limit"], error.params["used"]) == (1, 1)
    waiting = texts.text(error.code, "en", **error.params)
    assert "Requests of yours waiting now: 1, the most at once: 1." in waiting
    accepted = await stack.runner.submit(ask("bob"))  # another user's job is queued
    assert not accepted.duplicate
    assert await stack.runner.cancel(ConversationId("telegram", "ann")) == 1

    async def settled() -> bool:
        return len(await admin_of(stack).ledger.records(0)) >= 1

    await until(settled, "the cancelled job in the ledger")
    await stack.runner.cancel(ConversationId("telegram", "bob"))
    stack.engine.hang = False
    await answered(stack, ask("ann", "now"), 3)  # nothing of hers waits any more


async def test_jobs_still_waiting_count_against_the_days_requests_and_images(
    make: StackMaker,
) -> None:
    stack = await make(Limits(requests_per_day=2, images_per_day=3))
    stack.engine.hang = True  # nothing settles: the counts come from the jobs still waiting
    await stack.runner.submit(ask("ann", images=2))
    error = await refused(stack, ask("ann", images=2), "quota_images")
    assert error.params["used"] == 2
    await stack.runner.submit(ask("ann", "a second question"))
    error = await refused(stack, ask("ann", "a third"), "quota_requests")
    assert error.params["used"] == 2
    await stack.runner.cancel(ConversationId("telegram", "ann"))


async def test_admins_are_exempt(make: StackMaker) -> None:
    stack = await make(Limits(requests_per_day=1, images_per_day=0, max_waiting=0))
    for n in range(1, 4):
        await answered(stack, ask("boss", images=1), n)
    remaining = await admin_of(stack).remaining(ADMIN, None)
    assert remaining.exempt and remaining.requests_left is None
    await refused(stack, ask("ann"), "quota_waiting")


async def test_user_chat_and_key_overrides_beat_the_defaults_most_specific_first(
    make: StackMaker,
) -> None:
    stack = await make(Limits(requests_per_day=1))
    admin = admin_of(stack)
    await admin.set_quota(ADMIN, Subject("telegram", "user", "ann"), Limits(requests_per_day=2))
    await admin.set_quota(ADMIN, Subject("telegram", "chat", "-100"), Limits(requests_per_day=3))
    await admin.set_quota(ADMIN, Subject("telegram", "user", "cat"), Limits(requests_per_day=1))
    await admin.set_quota(ADMIN, Subject("http", "key", "k-team"), Limits(requests_per_day=2))
    total = 0

    async def serve(message: Incoming, times: int) -> None:
        nonlocal total
        for _ in range(times):
            total += 1
            await answered(stack, message, total)

    await serve(ask("ann"), 2)  # her own override: 2, not the default 1
    await refused(stack, ask("ann"), "quota_requests")
    await serve(ask("dan", chat="-100"), 3)  # the group's override: 3
    await refused(stack, ask("dan", chat="-100"), "quota_requests")
    await serve(ask("cat", chat="-100"), 1)  # her own override beats the group's
    error = await refused(stack, ask("cat", chat="-100"), "quota_requests")
    assert error.params["limit"] == 1
    await serve(ask("k-team", chat="key-x/c1", platform="http"), 2)  # the key's override
    await refused(stack, ask("k-team", chat="key-x/c1", platform="http"), "quota_requests")
    await serve(ask("eve"), 1)  # the default
    await refused(stack, ask("eve"), "quota_requests")
    left = await admin.remaining(Subject("telegram", "user", "dan"), Subject("telegram", "chat", "-100"))
    assert (left.limits.requests_per_day, left.used.requests, left.requests_left) == (3, 3, 0)


async def test_no_quota_set_means_no_limit(make: StackMaker) -> None:
    stack = await make(Limits())
    for n in range(1, 4):
        await answered(stack, ask("ann", images=2), n)
    left = await admin_of(stack).remaining(Subject("telegram", "user", "ann"), None)
    assert left.limits == Limits() and left.used.images == 6 and left.images_left is None


async def test_messages_sent_at_the_same_moment_cannot_all_pass_a_quota(make: StackMaker) -> None:
    stack = await make(Limits(requests_per_day=2))
    messages = [ask("ann", f"question {i}", chat=f"chat-{i}") for i in range(6)]
    results = await asyncio.gather(
        *(stack.runner.submit(m) for m in messages), return_exceptions=True
    )
    refusals = [r for r in results if isinstance(r, InputRejected)]
    assert len(refusals) == 4 and {r.code for r in refusals} == {"quota_requests"}
    assert sum((await stack.jobs.counts()).values()) == 2


async def test_a_job_is_counted_once_while_it_is_being_settled(make: StackMaker) -> None:
    """The runner writes the ledger row before it marks the job done: in between, the job is
    counted from the ledger and not again from the jobs table (and never in neither place)."""
    stack = await make(Limits(requests_per_day=5))
    admin = admin_of(stack)
    seen: list[int] = []
    record = admin.ledger.job_finished

    async def recording(outcome: JobOutcome) -> None:
        await record(outcome)
        used = await admin.quotas.day_use(Subject("telegram", "user", "ann"))
        seen.append(used.requests)  # the row is in the ledger, the job not marked done yet

    complete = stack.jobs.complete

    async def completing(job: Job) -> Job:
        done = await complete(job)
        used = await admin.quotas.day_use(Subject("telegram", "user", "ann"))
        seen.append(used.requests)  # marked done: counted from the ledger already
        return done

    admin.ledger.job_finished = recording  # type: ignore[method-assign]
    stack.jobs.complete = completing  # type: ignore[method-assign]
    await answered(stack, ask("ann"), 1)

    async def checked() -> bool:
        return len(seen) == 2

    await until(checked, "the count taken while the job was settled")
    assert seen == [1, 1]
    assert (await admin.quotas.day_use(Subject("telegram", "user", "ann"))).requests == 1
