"""Slack's admin subcommands end to end (issue #23): `/vlbot allow|deny|quota|usage` as signed
slash commands to bolt's HTTP endpoint, mentions as signed Events API requests, the whole app
behind it (bot/app.py) on a SQLite file and the fake Slack Web API. Covers the channel
allowlist (allow/deny of a channel), changes that apply with no restart and survive one, the
refusal of a non-admin, strict arguments, and /vlbot usage's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot import texts
from bot.admin_types import Limits, Subject
from bot.settings import Settings
from tests.chat_admin_helpers import GatedEngine, job_total, slack_app, slack_settings, slash
from tests.fake_slack import FakeSlack
from tests.slack_helpers import (
    CHANNEL,
    RED,
    Env,
    answered,
    fake_slack,  # noqa: F401 (the fixture)
    mention,
)

ADMIN, BOB, CAROL = "U0ADMIN", "U0BOB", "U0CAROL"
TEAM_ROOM = "C0TEAM"  # on the settings' channel allowlist
NOT_ALLOWED = texts.text("not_allowed")
WORKING = texts.text("slack_working")
ANSWER = "The total is 42.50 EUR."


def engine() -> GatedEngine:
    return GatedEngine(reply=lambda h, m: ANSWER, delay_s=0.01)


def private(fake: FakeSlack, tmp_path: Path, **kw: Any) -> Settings:
    """Only #team (C0TEAM) is on the settings' channel allowlist; U0ADMIN is an admin."""
    return slack_settings(fake, tmp_path, admins=[ADMIN], allowed_channels=[TEAM_ROOM], **kw)


async def ask(env: Env, user: str, channel: str = CHANNEL) -> dict[str, Any]:
    """A mention with an image; waits for the answer."""
    payload = mention(env.fake, "<@U0BOT> what is this?", [env.fake.add_file(RED)], channel=channel,
                      user=user)
    assert await env.event(payload) == 200
    await answered(env.fake, payload)
    return payload


def in_thread(fake: FakeSlack, payload: dict[str, Any]) -> list[str]:
    event = payload["event"]
    return [m["text"] for m in fake.thread(event["channel"], event["ts"]) if m.get("bot_id")]


def user(uid: str) -> Subject:
    return Subject("slack", "user", uid)


async def test_channel_and_user_allow_and_deny_apply_at_once_and_survive_a_restart(
    fake: FakeSlack, tmp_path: Path
) -> None:
    settings = private(fake, tmp_path)
    async with slack_app(fake, settings, engine()) as env:
        assert await slash(env, "what is this?", BOB) == NOT_ALLOWED  # #general: not listed
        done = await slash(env, "allow <#C0GENERAL|general>", ADMIN)
        assert done == "Done: <#C0GENERAL> may use the bot now."
        assert await slash(env, "reset", BOB) == texts.text("reset_done")  # no restart needed
        await ask(env, BOB)
    async with slack_app(fake, settings, engine()) as env:  # the same SQLite file
        await ask(env, BOB)
        assert await slash(env, "deny <@U0BOB|bob>", ADMIN) == "Done: <@U0BOB> may no longer use the bot."
        assert await slash(env, "reset", BOB) == NOT_ALLOWED  # a user's deny beats the channel's allow
        await ask(env, CAROL)  # the others in #general are still served
        assert await slash(env, "deny <#C0TEAM|team>", ADMIN) == "Done: <#C0TEAM> may no longer use the bot."
        audit = await env.stack.core.admin.audit()
    async with slack_app(fake, settings, engine()) as env:
        assert await slash(env, "reset", BOB) == NOT_ALLOWED
        assert await slash(env, "reset", CAROL, channel=TEAM_ROOM) == NOT_ALLOWED  # a DB deny beats settings
        assert await slash(env, "reset", CAROL) == texts.text("reset_done")
    assert [(e.action, e.subject, e.actor) for e in reversed(audit)] == [
        ("allow", Subject("slack", "chat", "C0GENERAL"), user(ADMIN)),
        ("deny", user(BOB), user(ADMIN)),
        ("deny", Subject("slack", "chat", TEAM_ROOM), user(ADMIN)),
    ]


async def test_a_non_admins_admin_subcommands_are_refused_and_change_nothing(
    fake: FakeSlack, tmp_path: Path
) -> None:
    settings = slack_settings(fake, tmp_path, admins=[ADMIN])  # no allowlist: everyone may ask
    async with slack_app(fake, settings, engine()) as env:
        assert await slash(env, "deny <#C0GENERAL|general>", BOB) == (
            "Sorry, only an admin of this bot can use /vlbot deny. Nothing was changed.")
        assert await slash(env, "quota <@U0CAROL|carol> requests=0", BOB) == (
            "Sorry, only an admin of this bot can use /vlbot quota. Nothing was changed.")
        assert await slash(env, "allow <@U0BOB|bob>", BOB) == (
            "Sorry, only an admin of this bot can use /vlbot allow. Nothing was changed.")
        await ask(env, CAROL)
        admin = env.stack.core.admin
        assert await admin.audit() == []
        assert await admin.effective_limits(user(CAROL), None) == Limits()


async def test_quota_applies_at_once_and_survives_a_restart(fake: FakeSlack, tmp_path: Path) -> None:
    settings = slack_settings(fake, tmp_path, admins=[ADMIN])
    async with slack_app(fake, settings, engine()) as env:
        done = await slash(env, "quota <@U0BOB|bob> requests=1 engine=90.5", ADMIN)
        assert done == ("Done: <@U0BOB>'s quota is now images: default, requests 1/day, engine "
                        "seconds 90.5/day, waiting jobs: default. It applies at once.")
        await ask(env, BOB)
        over = mention(fake, "<@U0BOT> and this?", [fake.add_file(RED)], user=BOB)
        await env.event(over)
        await fake.wait_for(lambda: any(t.startswith("You have used all 1") for t in in_thread(fake, over)))
        jobs = await job_total(env.stack)
    async with slack_app(fake, settings, engine()) as env:
        over = mention(fake, "<@U0BOT> and this?", [fake.add_file(RED)], user=BOB)
        await env.event(over)
        await fake.wait_for(lambda: any(t.startswith("You have used all 1") for t in in_thread(fake, over)))
        assert await job_total(env.stack) == jobs  # refused: nothing queued
        await ask(env, CAROL)  # another user is served
        assert "requests 2/day" in await slash(env, "quota <@U0BOB|bob> requests=2", ADMIN)
        await ask(env, BOB)  # at once


async def test_bad_arguments_are_named_and_change_nothing(fake: FakeSlack, tmp_path: Path) -> None:
    settings = slack_settings(fake, tmp_path, admins=[ADMIN])
    async with slack_app(fake, settings, engine()) as env:
        replies = {text: (await slash(env, text, ADMIN)).split("\n")[0] for text in (
            "quota <@U0BOB|bob> images=abc",
            "quota <@U0BOB|bob> images=<b>",
            "quota <@U0BOB|bob> waiting=1 waiting=2",
            "quota images=3",
            "allow @bob",
            "deny <!here>",
            "usage <@U0BOB|bob> 400",
            "usage 0d",
        )}
        admin = env.stack.core.admin
        assert await admin.audit() == []
        assert await admin.effective_limits(user(BOB), None) == Limits()
    assert replies == {
        "quota <@U0BOB|bob> images=abc": "images=abc is not a number.",
        "quota <@U0BOB|bob> images=<b>": "images=&lt;b&gt; is not a number.",
        "quota <@U0BOB|bob> waiting=1 waiting=2": "waiting is given twice.",
        "quota images=3": "/vlbot quota needs to know whom it is about.",
        "allow @bob": texts.text("admin_slack_plain_mention", arg="@bob"),
        "deny <!here>": "&lt;!here&gt; is not a user or a chat I can name.",
        "usage <@U0BOB|bob> 400": "400 is not a number of days (1 to 366).",
        "usage 0d": "0d is not a number of days (1 to 366).",
    }


async def test_usage_shows_what_was_done(fake: FakeSlack, tmp_path: Path) -> None:
    settings = slack_settings(fake, tmp_path, admins=[ADMIN], quota={"images_per_day": 4})
    async with slack_app(fake, settings, engine()) as env:
        await ask(env, BOB)
        await ask(env, BOB)
        await ask(env, CAROL, channel=TEAM_ROOM)
        own = await slash(env, "usage", BOB)
        others = await slash(env, "usage <@U0CAROL|carol>", BOB)
        report = await slash(env, "usage", ADMIN)
        by_channel = await slash(env, "usage <#C0GENERAL|general> 3", ADMIN)
        helped = await slash(env, "help", ADMIN), await slash(env, "help", BOB)
    assert own.startswith("Your use today (UTC): requests 2, images 2, ")
    assert "images: 2 of 4; requests: no limit;" in own
    assert others == texts.text("admin_usage_others")
    head, *rest = report.split("\n")
    assert ": requests 3, images 3, " in head and "answered 3" in head
    users = rest[rest.index("Top users:") + 1: rest.index("Top chats:")]
    chats = rest[rest.index("Top chats:") + 1: -1]
    assert sorted(line[3:].rsplit(",", 1)[0] for line in users) == [  # ranked by engine time
        "<@U0BOB>: requests 2, images 2", "<@U0CAROL>: requests 1, images 1"]
    assert sorted(line[3:].rsplit(",", 1)[0] for line in chats) == [
        "<#C0GENERAL>: requests 2, images 2", "<#C0TEAM>: requests 1, images 1"]
    assert rest[-1].startswith("Images per day: ") and rest[-1].endswith(": 3.")
    assert by_channel.startswith("Use in the last 3 days (") and " by <#C0GENERAL>: requests 2" in by_channel
    assert "/vlbot allow" in helped[0] and "/vlbot allow" not in helped[1]
    assert "/vlbot usage" in helped[1]
