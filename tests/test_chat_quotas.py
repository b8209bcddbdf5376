"""Each quota kind driven to its limit through each chat adapter (issue #23): images per day,
requests per day, engine seconds per day and jobs waiting at once, set as the settings' default
quota. The whole app runs (bot/app.py: quota admission, usage ledger) behind python-telegram-bot
and bolt talking real HTTP to the fake platform servers. Over the limit the user reads the reply
naming the limit (and when it resets), no job is written, and another user is still answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapters.slack.format import escape
from bot import texts
from bot.admin_types import Subject, next_reset, reset_text
from tests.chat_admin_helpers import (
    GatedEngine,
    job_total,
    slack_app,
    slack_settings,
    telegram_app,
    telegram_settings,
)
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.slack_helpers import (
    CHANNEL,
    RED,
    answered,
    fake_slack_as_slack,  # noqa: F401 (the fixture)
    mention,
)
from tests.telegram_harness import ANSWER, BLUE, fake_server

__all__ = ["fake_server"]  # the Telegram `fake` fixture

ANY = object()  # a parameter whose value the test does not predict (engine seconds used)


@dataclass(frozen=True)
class Kind:
    quota: dict[str, Any]  # the settings' default quota
    code: str  # the refusal's text
    params: dict[str, Any]  # what the refusal says


KINDS = {
    "images": Kind({"images_per_day": 1}, "quota_images", {"used": 1, "limit": 1}),
    "requests": Kind({"requests_per_day": 1}, "quota_requests", {"used": 1, "limit": 1}),
    "engine": Kind({"engine_seconds_per_day": 0.1}, "quota_engine", {"used": ANY, "limit": "0.1"}),
    "waiting": Kind({"max_waiting": 1}, "quota_waiting", {"used": 1, "limit": 1}),
}


def refusal_matcher(kind: Kind, lang: str | None = None) -> Callable[[str], bool]:
    """Whether a reply is this kind's refusal: its text with the limit, the use and the reset
    (today's next 00:00 UTC) filled in; ANY parameters may read anything."""
    hole = "\x00"
    params = {k: hole if v is ANY else v for k, v in kind.params.items()}
    now = time.time()  # either side of a UTC midnight
    expected = {texts.text(kind.code, lang, resets=reset_text(next_reset(at)), **params)
                for at in (now - 60, now)}

    def matches(reply: str) -> bool:
        for template in expected:
            parts = template.split(hole)
            if len(parts) == 1:
                if reply == template:
                    return True
                continue
            rest = reply
            if not rest.startswith(parts[0]) or not rest.endswith(parts[-1]):
                continue
            rest = rest[len(parts[0]): len(rest) - len(parts[-1])]
            if all(p in rest for p in parts[1:-1]):
                return True
        return False

    return matches


def engine() -> GatedEngine:
    return GatedEngine(reply=lambda h, m: ANSWER, delay_s=0.03)


async def used_engine_time(admin: Any, platform: str, user: str) -> None:
    """Wait until the ledger holds the user's first job's engine time (it is written as the job
    settles, just after the answer is delivered)."""
    for _ in range(500):
        left = await admin.remaining(Subject(platform, "user", user), None)
        if left.used.engine_s > 0.1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine time never reached the ledger")


# --- Telegram -----------------------------------------------------------------------------------

BOB, CAROL = 222_001, 333_001


@pytest.mark.parametrize("name", list(KINDS))
async def test_telegram_user_over_quota_is_told_and_nothing_is_queued(
    fake: FakeTelegram, tmp_path: Path, name: str
) -> None:
    kind = KINDS[name]
    gated = engine()
    settings = telegram_settings(fake, tmp_path, quota=kind.quota)
    async with telegram_app(fake, settings, gated) as h:
        first = "slow: what is this?" if name == "waiting" else "what is this?"
        await fake.push(h.photo(RED, first, chat=BOB, user=BOB))
        if name == "waiting":
            await fake.wait_for(lambda: gated.held == 1)
        else:
            await h.wait_text(BOB, ANSWER)
        if name == "engine":
            await used_engine_time(h.stack.core.admin, "telegram", str(BOB))
        jobs_before = await job_total(h.stack)

        await fake.push(h.photo(BLUE, "and this one?", chat=BOB, user=BOB))
        refused = refusal_matcher(kind)
        await fake.wait_for(lambda: any(refused(t) for t in fake.texts(BOB)))
        assert await job_total(h.stack) == jobs_before  # nothing queued for the refused message

        await fake.push(h.photo(BLUE, "what is this?", chat=CAROL, user=CAROL))
        await h.wait_text(CAROL, ANSWER)  # another user is served
        gated.gate.set()
        await fake.wait_for(lambda: ANSWER in fake.texts(BOB))
    assert [m.message.text for m in gated.calls].count("and this one?") == 0


async def test_telegram_quota_refusal_is_in_the_users_language(fake: FakeTelegram, tmp_path: Path) -> None:
    settings = telegram_settings(fake, tmp_path, quota=KINDS["requests"].quota)
    async with telegram_app(fake, settings, engine()) as h:
        await fake.push(h.photo(RED, "这是什么？", chat=BOB, user=BOB, lang="zh-hans"))
        await h.wait_text(BOB, ANSWER)
        await fake.push(h.photo(BLUE, "还有这个？", chat=BOB, user=BOB, lang="zh-hans"))
        refused = refusal_matcher(KINDS["requests"], "zh")
        await fake.wait_for(lambda: any(refused(t) for t in fake.texts(BOB)))
    assert any("重置" in t for t in fake.texts(BOB))


# --- Slack --------------------------------------------------------------------------------------


def bot_texts(fake: FakeSlack, thread: str) -> list[str]:
    return [m["text"] for m in fake.thread(CHANNEL, thread) if m.get("bot_id")]


@pytest.mark.parametrize("name", list(KINDS))
async def test_slack_user_over_quota_is_told_and_nothing_is_queued(
    slack: FakeSlack, tmp_path: Path, name: str
) -> None:
    kind = KINDS[name]
    gated = engine()
    settings = slack_settings(slack, tmp_path, quota=kind.quota)
    async with slack_app(slack, settings, gated) as env:
        first = "<@U0BOT> slow: what is this?" if name == "waiting" else "<@U0BOT> what is this?"
        held = mention(slack, first, [slack.add_file(RED)], user="U0BOB")
        assert await env.event(held) == 200
        if name == "waiting":
            await slack.wait_for(lambda: gated.held == 1)
        else:
            await answered(slack, held)
        if name == "engine":
            await used_engine_time(env.stack.core.admin, "slack", "U0BOB")
        jobs_before = await job_total(env.stack)

        again = mention(slack, "<@U0BOT> and this one?", [slack.add_file(BLUE)], user="U0BOB")
        assert await env.event(again) == 200
        thread = again["event"]["ts"]
        refused = refusal_matcher(kind)
        await slack.wait_for(lambda: any(refused(t) for t in map(_unescape, bot_texts(slack, thread))))
        assert await job_total(env.stack) == jobs_before

        other = mention(slack, "<@U0BOT> what is this?", [slack.add_file(BLUE)], user="U0CAROL")
        assert await env.event(other) == 200
        await answered(slack, other)  # another user is served
        gated.gate.set()
        await answered(slack, held)
    assert all("and this one?" not in (c.message.text or "") for c in gated.calls)


def _unescape(text: str) -> str:
    unescaped = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert escape(unescaped) == text
    return unescaped
