"""The daily digest: its content on a seeded history, once per place and day (across restarts),
nothing for a quiet place, a failed post tried again, and its scheduler started by the app."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bot.adapter import Incoming
from bot.app import App
from bot.db import Database
from bot.models import ConversationId, ImagePart, Message, User
from bot.settings import HttpSettings, Settings, TriageSettings
from bot.triage.digest import DigestScheduler, digest_day
from bot.triage.rules import Place
from bot.triage.service import TriageConfigError
from bot.triage.store import TriageRecord, TriageStore
from tests.fakes import RecordingAdapter, ScriptedEngine
from tests.http_helpers import png

HOUR = 9
DIGEST_TIME = datetime(2026, 12, 7, 9, 30, tzinfo=timezone.utc).timestamp()  # Monday 09:30
PERIOD_END = datetime(2026, 12, 7, 9, 0, tzinfo=timezone.utc).timestamp()
H = 3600.0
SUPPORT = Place("slack", "C0SUP")
GROUP_CHAT = Place("telegram", "-1001")
QUIET = Place("slack", "C0QUIET")


@dataclass
class Posts:
    sent: list[tuple[str, str, str]] = field(default_factory=list)
    fail: bool = False

    async def __call__(self, platform: str, chat: str, text: str) -> str | None:
        if self.fail:
            raise ConnectionError("Slack is down")
        self.sent.append((platform, chat, text))
        return None


@dataclass
class Clock:
    now: float = DIGEST_TIME

    def __call__(self) -> float:
        return self.now


def result(message: str | None, severity: str, area: str | None, code: str | None = None
           ) -> dict[str, str | None]:
    return {"error_message": message, "severity": severity, "product_area": area,
            "error_code": code}


DECLINED = "Payment failed for order #{n}: card declined"
SEED = [  # (hours before the period's end, place, result, link)
    (30, SUPPORT, result(DECLINED.format(n=1), "major", "Billing"), "https://s/p0"),  # before
    (20, SUPPORT, result(DECLINED.format(n=48213), "major", "Billing"), "https://s/p1"),
    (12, SUPPORT, result(DECLINED.format(n=99120), "major", "Billing"), "https://s/p2"),
    (11, SUPPORT, result("Service unavailable (error 503)", "blocker", "Login"), "https://s/p3"),
    (10, SUPPORT, result(DECLINED.format(n=10007), "major", "Billing"), None),
    (9, SUPPORT, result("Service unavailable (error 503)", "blocker", "Login"), "https://s/p4"),
    (3, SUPPORT, result("Button label cut off", "minor", None), "https://s/p5"),
    (2, SUPPORT, result(None, "minor", "Settings", "E1001"), "https://s/p6"),
    (5, GROUP_CHAT, result("Upload failed: file too large (31 MB)", "major", "Files"), None),
    (-0.2, SUPPORT, result("Service unavailable (error 503)", "blocker", "Login"), "https://s/p7"),
]


@pytest.fixture
async def store(database_target: Path | str) -> AsyncIterator[TriageStore]:
    db = await Database.open(database_target)
    store = TriageStore(db, window_days=14)
    for i, (hours, place, fields, link) in enumerate(SEED):
        await store.record(TriageRecord.of(f"job{i}", place, fields, link=link,
                                           created_at=PERIOD_END - hours * H))
    yield store
    await db.close()


def scheduler(store: TriageStore, posts: Posts, clock: Clock, lang: str = "en") -> DigestScheduler:
    return DigestScheduler(store, [SUPPORT, GROUP_CHAT, QUIET], HOUR, posts, language=lang,
                           clock=clock)


async def test_the_digest_shows_the_periods_counts_and_top_repeats(store: TriageStore) -> None:
    posts = Posts()
    posted = await scheduler(store, posts, Clock()).run_due()
    assert posted == [SUPPORT, GROUP_CHAT]  # the quiet channel gets nothing
    (platform, chat, text), (_, group_chat, group_text) = posts.sent
    assert (platform, chat, group_chat) == ("slack", "C0SUP", "-1001")
    lines = text.splitlines()
    assert lines[0] == "Triage digest, 2026-12-06 09:00 – 09:00 UTC. Screenshots triaged: 7"
    assert lines[1] == "By severity: blocker 2 · major 3 · minor 2"
    assert lines[2] == "By product area: Billing 3 · Login 2 · Settings 1 · no area 1"
    assert lines[3] == "Most repeated errors:"
    assert lines[4] == ("• Payment failed for order #48213: card declined — 3 times (Billing), "
                        "first: https://s/p1")
    assert lines[5] == ("• Service unavailable (error 503) — 2 times (Login), first: https://s/p3")
    assert len(lines) == 6  # errors seen once are counted, not listed
    assert "https://s/p0" not in text and "https://s/p7" not in text  # outside the period
    assert group_text.splitlines()[:3] == [
        "Triage digest, 2026-12-06 09:00 – 09:00 UTC. Screenshots triaged: 1",
        "By severity: major 1",
        "By product area: Files 1",
    ]


async def test_the_digest_in_chinese(store: TriageStore) -> None:
    posts = Posts()
    await scheduler(store, posts, Clock(), lang="zh").run_due()
    text = posts.sent[0][2]
    assert "分诊日报" in text and "阻断 2 · 严重 3 · 轻微 2" in text and "3 次（Billing）" in text


async def test_one_digest_per_place_and_day_even_across_restarts(store: TriageStore) -> None:
    posts, clock = Posts(), Clock()
    await scheduler(store, posts, clock).run_due()
    assert len(posts.sent) == 2
    clock.now += 4 * H
    assert await scheduler(store, posts, clock).run_due() == []  # a restart the same day
    restarted = TriageStore(store.db)  # a new process on the same database
    assert await scheduler(restarted, posts, clock).run_due() == []
    clock.now = DIGEST_TIME + 23 * H  # Tuesday 08:30: Monday's is still the latest due
    assert await scheduler(store, posts, clock).run_due() == []
    clock.now = DIGEST_TIME + 24 * H  # Tuesday 09:30: Monday 09:00 - Tuesday 09:00
    assert await scheduler(store, posts, clock).run_due() == [SUPPORT]
    assert posts.sent[-1][2].startswith(
        "Triage digest, 2026-12-07 09:00 – 09:00 UTC. Screenshots triaged: 1\n")


async def test_a_failed_post_is_tried_again(store: TriageStore) -> None:
    posts, clock = Posts(fail=True), Clock()
    assert await scheduler(store, posts, clock).run_due() == []
    posts.fail = False
    clock.now += 60
    assert await scheduler(store, posts, clock).run_due() == [SUPPORT, GROUP_CHAT]


def test_the_period_is_the_24_hours_before_the_hour() -> None:
    assert digest_day(DIGEST_TIME, HOUR) == ("2026-12-07", PERIOD_END)
    assert digest_day(PERIOD_END - 1, HOUR) == ("2026-12-06", PERIOD_END - 24 * H)
    assert digest_day(PERIOD_END, HOUR) == ("2026-12-07", PERIOD_END)


class PostingAdapter(RecordingAdapter):
    """A chat adapter that can also post (as the Slack and Telegram adapters do)."""

    def __init__(self, platform: str) -> None:
        super().__init__(platform)
        self.posts: list[tuple[str, str]] = []
        self.posted = asyncio.Event()

    async def post(self, chat: str, text: str) -> str | None:
        self.posts.append((chat, text))
        self.posted.set()
        return f"https://{self.platform}.example/{chat}/{len(self.posts)}"


def app_settings(tmp_path: Path, **triage: object) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path / "data", http=HttpSettings(enabled=False),
        triage=TriageSettings(**triage),  # type: ignore[arg-type]
    )


async def test_the_app_runs_the_digest_and_routes_through_the_adapters(tmp_path: Path) -> None:
    now = time.time()
    hour = datetime.fromtimestamp(now, timezone.utc).hour  # due now: the app sends it at start
    settings = app_settings(tmp_path, slack_channels=["C0SUP"], digest_hour=hour,
                            rules=[{"when": {"severity": "blocker"}, "post_to": "slack:C0ONCALL"}])
    db = await Database.open(settings.database)
    period_end = datetime.fromtimestamp(now, timezone.utc).replace(minute=0, second=0,
                                                                   microsecond=0).timestamp()
    store = TriageStore(db)
    for i in range(2):
        await store.record(TriageRecord.of(f"seed{i}", SUPPORT, result(DECLINED.format(n=i), "major",
                                           "Billing"), link=f"https://s/{i}",
                                           created_at=period_end - (2 - i) * H))
    await db.close()

    slack = PostingAdapter("slack")
    outage = json.dumps({"severity": "blocker", "product_area": "Login",
                         "error_message": "Service unavailable", "next_step": "Page on-call."})
    app = App(settings, ScriptedEngine(reply=lambda h, m: outage), [slack])
    await app.start()
    try:
        await asyncio.wait_for(slack.posted.wait(), 20)
        (chat, digest), = slack.posts
        assert chat == "C0SUP" and "Screenshots triaged: 2" in digest
        assert "— 2 times (Billing), first: https://s/0" in digest
        slack.posted.clear()
        assert app.runner is not None
        await app.runner.submit(Incoming(
            conversation=ConversationId("slack", "C0SUP", "1.0001"), user=User("U1", "Ann"),
            message=Message.of("/triage", ImagePart(png(), "image/png")),
            origin={"link": "https://acme.slack.com/archives/C0SUP/p1"},
        ))
        await asyncio.wait_for(slack.posted.wait(), 20)
        chat, summary = slack.posts[-1]
        assert chat == "C0ONCALL" and "Service unavailable" in summary
        assert "https://acme.slack.com/archives/C0SUP/p1" in summary
    finally:
        await app.stop()
    app = App(settings, ScriptedEngine(), [PostingAdapter("slack")])  # a restart: not again
    await app.start()
    try:
        assert app.triage is not None and app.triage.digest is not None
        assert await app.triage.digest.run_due() == []
    finally:
        await app.stop()


async def test_a_rule_to_a_platform_not_configured_stops_the_start(tmp_path: Path) -> None:
    settings = app_settings(tmp_path, rules=[{"post_to": "slack:C0ALL"},
                                             {"post_to": "telegram:-1009"}])
    app = App(settings, ScriptedEngine(), [PostingAdapter("slack")])
    with pytest.raises(TriageConfigError, match=r"routing rule 2 posts to telegram:-1009, but "
                       r"Telegram is not configured \(set VLBOT_TELEGRAM__TOKEN\)"):
        await app.start()
