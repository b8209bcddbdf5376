"""Auto-triage places set by an admin at run time (issue #24 point 1, with the admin commands of
issue #23), end to end: the whole app (bot/app.py) on a SQLite file, `/autotriage on|off` sent
through python-telegram-bot to the fake Bot API and `/vlbot autotriage #channel on|off` as
signed slash commands to bolt, images posted without a mention afterwards. Turning a place on
works at once and survives a restart on the same file; off stops it; a non-admin changes
nothing; a place named in settings cannot be turned off from a chat; the daily digest covers an
admin's places too."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from adapters.telegram import TelegramAdapter
from bot import texts
from bot.admin_types import Subject
from bot.app import App
from bot.audit import AuditLog
from bot.db import Database
from bot.settings import Settings, TriageSettings
from bot.triage.places import AutoTriagePlaces
from bot.triage.rules import Place
from tests.chat_admin_helpers import slack_app, slack_settings, slash, stack_of, telegram_settings
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.slack_helpers import BLUE as SLACK_BLUE
from tests.slack_helpers import RED as SLACK_RED
from tests.slack_helpers import (
    Env,
    answered,
    fake_slack_as_slack,  # noqa: F401 (the fixture)
    mention,
)
from tests.telegram_harness import BLUE, GREEN, RED, Harness, fake_server
from tests.test_slack_triage import posted
from tests.triage_helpers import TriageScript, triage_json

__all__ = ["fake_server"]  # the `fake` fixture (Telegram)

ADMIN, BOB, CAROL = 900_001, 222_001, 333_001
SUPPORT = -1009876543210  # a group no setting names
CONFIGURED = -1004444444444  # a group the settings name
SLACK_ADMIN, SLACK_BOB = "U0ADMIN", "U0BOB"
SUPPORT_CHANNEL = "C0SUPPORT"


def script() -> TriageScript:
    s = TriageScript()
    s.add(RED, triage_json("blocker", "Checkout", "Payment failed for order 81723", "PAY-402"))
    s.add(BLUE, triage_json("minor", "Profile", "Avatar upload is slow"))
    s.add(GREEN, triage_json("major", "Search", "Search results never load"))
    s.add(SLACK_RED, triage_json("blocker", "Checkout", "Payment failed for order 81723"))
    s.add(SLACK_BLUE, triage_json("minor", "Profile", "Avatar upload is slow"))
    return s


def chat(platform: str, ident: int | str) -> Subject:
    return Subject(platform, "chat", str(ident))


# --- Telegram -------------------------------------------------------------------------------


def tg_settings(fake: FakeTelegram, tmp_path: Path, **triage: Any) -> Settings:
    return telegram_settings(fake, tmp_path, admins=[ADMIN]).model_copy(
        update={"triage": TriageSettings.model_validate(triage)})


@asynccontextmanager
async def tg_app(fake: FakeTelegram, settings: Settings, engine: TriageScript
                 ) -> AsyncIterator[tuple[Harness, App]]:
    """tests/chat_admin_helpers.py's telegram_app, with the App itself (its digest scheduler)."""
    adapter = TelegramAdapter(settings, edit_interval_s=0.1, group_edit_interval_s=0.3,
                              album_wait_s=0.3, poll_timeout_s=2.0)
    scripted = engine.engine()
    app = App(settings, scripted, adapters=[adapter])
    await app.start()
    try:
        yield Harness(fake, adapter, stack_of(app, scripted)), app
    finally:
        await app.stop()


async def command(h: Harness, text: str, user: int = ADMIN, group: int = SUPPORT) -> str:
    """`text` sent in `group` by `user`; the bot's reply."""
    seen = len(h.fake.texts(group))
    await h.fake.push(h.text(text, chat=group, user=user))
    await h.fake.wait_for(lambda: len(h.fake.texts(group)) > seen)
    return h.fake.texts(group)[seen]


async def post_screenshot(h: Harness, data: bytes, group: int = SUPPORT) -> int:
    """An image posted in `group` without a mention; its message id."""
    update = h.photo(data, None, chat=group, user=CAROL, name="group_photo_unaddressed.json")
    await h.fake.push(update)
    return int(update["message"]["message_id"])


def replies_to(h: Harness, group: int, message_id: int) -> list[str]:
    return [m.text for m in h.fake.bot_messages(group) if m.reply_to == message_id]


async def triaged(h: Harness, data: bytes, group: int = SUPPORT) -> str:
    """Post an image without a mention; the triage reply to it (once final)."""
    message_id = await post_screenshot(h, data, group)
    await h.fake.wait_for(lambda: any("Severity" in t for t in replies_to(h, group, message_id)))
    [answer] = replies_to(h, group, message_id)
    return answer


async def not_triaged(h: Harness, data: bytes, engine: TriageScript, group: int = SUPPORT) -> None:
    """Post an image without a mention and then a question in the same group (a group's
    messages are handled in order): the question is answered, the image was left alone."""
    seen = len(engine.seen)
    message_id = await post_screenshot(h, data, group)
    asked = h.photo(RED, "@vlbot_test_bot what is this?", chat=group, user=CAROL,
                    name="group_photo_unaddressed.json")
    await h.fake.push(asked)
    asked_id = asked["message"]["message_id"]
    await h.fake.wait_for(lambda: any("PAY-402" in t for t in replies_to(h, group, asked_id)))
    assert replies_to(h, group, message_id) == [], "the image without a mention was triaged"
    assert len(engine.seen) == seen + 1, "only the question reached the engine"


async def test_an_admin_turns_a_group_on_and_off_and_it_survives_a_restart(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    engine = script()
    settings = tg_settings(fake, tmp_path)
    group = f"chat {SUPPORT}"
    async with tg_app(fake, settings, engine) as (h, _):
        await not_triaged(h, GREEN, engine)  # nothing names the group yet
        assert await command(h, "/autotriage") == (
            f"Auto-triage is off in {group} (/autotriage on turns it on).")
        # the recorded getMe has privacy mode on: the reply says how to let the bot see images
        assert await command(h, "/autotriage on") == "\n".join([
            texts.text("admin_autotriage_on", where=group), texts.text("admin_autotriage_privacy")])
        answer = await triaged(h, RED)  # at once, no restart
        assert answer.startswith("Severity: blocker\n") and "PAY-402" in answer
    async with tg_app(fake, settings, engine) as (h, _):  # the same SQLite file
        assert "Severity: minor" in await triaged(h, BLUE)
        state = await command(h, "/autotriage")
        assert state.startswith(f"Auto-triage is on in {group}: user {ADMIN} turned it on (")
        assert await command(h, "/autotriage off") == f"Done: auto-triage is off in {group}."
        await not_triaged(h, GREEN, engine)
        audit = await h.stack.core.admin.audit()
    async with tg_app(fake, settings, engine) as (h, _):
        await not_triaged(h, BLUE, engine)  # still off after a restart
    admin = Subject("telegram", "user", str(ADMIN))
    assert [(e.action, e.subject, e.actor) for e in reversed(audit)] == [
        ("autotriage_on", chat("telegram", SUPPORT), admin),
        ("autotriage_off", chat("telegram", SUPPORT), admin)]


async def test_an_admin_names_a_group_by_its_id_from_a_private_chat(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    engine = script()
    async with tg_app(fake, tg_settings(fake, tmp_path), engine) as (h, _):
        reply = await command(h, f"/autotriage {SUPPORT} on", group=ADMIN)
        assert reply.startswith(texts.text("admin_autotriage_on", where=f"chat {SUPPORT}") + "\n")
        assert "Severity: major" in await triaged(h, GREEN)
        # a private chat cannot be an auto-triage place, nor can a user
        assert await command(h, "/autotriage on", group=ADMIN) == texts.text(
            "admin_autotriage_not_group")
        refusal = await command(h, f"/autotriage {BOB} on", group=ADMIN)
        assert refusal.startswith(
            f"{BOB} is a user: auto-triage is for a group or channel.\nUsage: /autotriage")


async def test_a_non_admin_is_refused_and_nothing_changes(fake: FakeTelegram, tmp_path: Path) -> None:
    engine = script()
    async with tg_app(fake, tg_settings(fake, tmp_path), engine) as (h, _):
        refusal = texts.text("admin_only", command="/autotriage")
        assert await command(h, "/autotriage on", user=BOB) == refusal  # no privacy note either
        assert await command(h, "/autotriage", user=BOB) == refusal
        await not_triaged(h, RED, engine)
        assert await h.stack.core.admin.audit() == []
        assert "/autotriage" not in await command(h, "/help", user=BOB)
        assert "/autotriage on|off in a group" in await command(h, "/help")


async def test_a_settings_group_cannot_be_turned_off_from_the_chat(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    engine = script()
    settings = tg_settings(fake, tmp_path, telegram_chats=[CONFIGURED])
    async with tg_app(fake, settings, engine) as (h, _):
        reply = await command(h, "/autotriage off", group=CONFIGURED)
        assert reply == (
            f"Auto-triage in chat {CONFIGURED} comes from the settings "
            "(VLBOT_TRIAGE__TELEGRAM_CHATS), so it cannot be turned off from a chat: remove it "
            "from VLBOT_TRIAGE__TELEGRAM_CHATS and restart vlbot. Nothing was changed.")
        assert "Severity: blocker" in await triaged(h, RED, CONFIGURED)
        assert await command(h, "/autotriage", group=CONFIGURED) == (
            f"Auto-triage is on in chat {CONFIGURED}: the settings name it "
            "(VLBOT_TRIAGE__TELEGRAM_CHATS).")
        assert await h.stack.core.admin.audit() == []


async def test_the_digest_covers_a_group_an_admin_turned_on(fake: FakeTelegram, tmp_path: Path) -> None:
    engine = script()
    settings = tg_settings(fake, tmp_path, telegram_chats=[CONFIGURED], digest_hour=9)
    async with tg_app(fake, settings, engine) as (h, app):
        await command(h, "/autotriage on")
        await triaged(h, RED)
        await triaged(h, BLUE)
        await triaged(h, GREEN, CONFIGURED)
        assert app.triage is not None and app.triage.digest is not None
        app.triage.digest.clock = lambda: time.time() + 86400  # tomorrow: today's triages are due
        posted = await app.triage.digest.run_due()
    assert {str(p) for p in posted} == {f"telegram:{SUPPORT}", f"telegram:{CONFIGURED}"}
    [digest] = [t for t in fake.texts(SUPPORT) if t.startswith("Triage digest")]
    assert "Screenshots triaged: 2" in digest and "blocker 1" in digest and "minor 1" in digest
    [other] = [t for t in fake.texts(CONFIGURED) if t.startswith("Triage digest")]
    assert "Screenshots triaged: 1" in other


# --- Slack ----------------------------------------------------------------------------------


async def slack_triaged(env: Env, data: bytes) -> str:
    payload = posted(env.fake, "", data, channel=SUPPORT_CHANNEL)
    assert await env.event(payload) == 200
    await answered(env.fake, payload)
    [reply] = env.fake.thread(SUPPORT_CHANNEL, payload["event"]["ts"])
    return str(reply["text"])


async def slack_not_triaged(env: Env, data: bytes, engine: TriageScript) -> None:
    """An image without a mention, then a question in the same channel: the question is
    answered and the image never reached the engine."""
    seen = len(engine.seen)
    payload = posted(env.fake, "", data, channel=SUPPORT_CHANNEL)
    assert await env.event(payload) == 200
    asked = mention(env.fake, "<@U0BOT> what is this?", [env.fake.add_file(SLACK_RED)],
                    channel=SUPPORT_CHANNEL, user="U0AGENT")
    assert await env.event(asked) == 200
    await answered(env.fake, asked)
    assert env.fake.thread(SUPPORT_CHANNEL, payload["event"]["ts"]) == []
    assert len(engine.seen) == seen + 1, "only the question reached the engine"


async def test_slack_an_admin_turns_a_channel_on_and_off_and_a_non_admin_cannot(
    slack: FakeSlack, tmp_path: Path
) -> None:
    engine = script()
    settings = slack_settings(slack, tmp_path, admins=[SLACK_ADMIN])
    named = f"<#{SUPPORT_CHANNEL}|support>"
    async with slack_app(slack, settings, engine.engine()) as env:
        assert await slash(env, f"autotriage {named} on", user=SLACK_BOB) == texts.text(
            "admin_only", command="/vlbot autotriage")
        await slack_not_triaged(env, SLACK_BLUE, engine)
        reply = await slash(env, f"autotriage {named} on", user=SLACK_ADMIN, channel="C0OTHER")
        assert reply == texts.text("admin_autotriage_on", where=f"<#{SUPPORT_CHANNEL}>")
        assert "Severity: blocker" in await slack_triaged(env, SLACK_RED)
    async with slack_app(slack, settings, engine.engine()) as env:  # the same SQLite file
        assert "Severity: minor" in await slack_triaged(env, SLACK_BLUE)
        assert (await slash(env, "autotriage", user=SLACK_ADMIN, channel=SUPPORT_CHANNEL)
                ).startswith(f"Auto-triage is on in <#{SUPPORT_CHANNEL}>: <@{SLACK_ADMIN}> turned it on")
        reply = await slash(env, "autotriage here off", user=SLACK_ADMIN, channel=SUPPORT_CHANNEL)
        assert reply == f"Done: auto-triage is off in <#{SUPPORT_CHANNEL}>."
        await slack_not_triaged(env, SLACK_RED, engine)
        assert [e.action for e in await env.stack.core.admin.audit()] == [
            "autotriage_off", "autotriage_on"]


# --- the store, on SQLite and Postgres ---------------------------------------------------------


async def test_the_places_store_on_both_backends(database_target: Path | str) -> None:
    db = await Database.open(database_target)
    try:
        configured, added = Place("slack", "C0SET"), Place("telegram", "-1001")
        places = AutoTriagePlaces(db, [configured])
        admin = Subject("slack", "user", "U0ADMIN")
        assert await places.covers(configured) and not await places.covers(added)
        assert await places.turn_on(admin, added) == "on"
        assert await places.turn_on(admin, added) == "already_on"
        assert await places.covers(added) and await places.all() == [configured, added]
        state = await places.state(added)
        assert (state.on, state.source, state.set_by) == (True, "admin", admin)
        assert await places.turn_off(admin, configured) == "settings"
        assert await places.turn_off(admin, added) == "off"
        assert await places.turn_off(admin, added) == "already_off"
        assert await places.all() == [configured] and not (await places.state(added)).on
        assert [e.action for e in await AuditLog(db).latest()] == ["autotriage_off", "autotriage_on"]
    finally:
        await db.close()
