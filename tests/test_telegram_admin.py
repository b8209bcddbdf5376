"""Telegram's admin commands end to end (issue #23): /allow, /deny, /quota, /usage sent through
python-telegram-bot to the fake Bot API, the whole app behind it (bot/app.py) on a SQLite file.
A change takes effect with no restart and is still in force after one (the app stopped and
started again on the same file); a non-admin's command is refused and changes nothing; a bad
argument gets a reply naming it and changes nothing; /usage shows what was done."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot import texts
from bot.admin_types import Limits, Subject
from bot.settings import Settings
from tests.chat_admin_helpers import GatedEngine, job_total, telegram_app, telegram_settings
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import ANSWER, BLUE, GROUP, RED, Harness, fake_server

__all__ = ["fake_server"]  # the `fake` fixture

ADMIN, BOB, CAROL = 900_001, 222_001, 333_001
NOT_ALLOWED = texts.text("not_allowed")
SERVED = (texts.text("thinking"), ANSWER)  # the placeholder, or the answer it became


def engine() -> GatedEngine:
    return GatedEngine(reply=lambda h, m: ANSWER, delay_s=0.01)


def private(fake: FakeTelegram, tmp_path: Path, **quota: Any) -> Settings:
    """A private bot: only the admin is on the settings allowlist."""
    return telegram_settings(fake, tmp_path, quota=quota, admins=[ADMIN], allowed_users=[ADMIN])


async def say(h: Harness, text: str, user: int, chat: int | None = None, lang: str = "en",
              reply_to: dict[str, Any] | None = None) -> str:
    """Send a text as `user`; the bot's next new message in that chat."""
    chat = user if chat is None else chat
    seen = len(h.fake.texts(chat))
    await h.fake.push(h.text(text, chat=chat, user=user, lang=lang, reply_to=reply_to))
    await h.fake.wait_for(lambda: len(h.fake.texts(chat)) > seen)
    return h.fake.texts(chat)[seen]


async def ask_photo(h: Harness, user: int, expect: str | Callable[[str], bool] = ANSWER) -> str:
    seen = len(h.fake.texts(user))
    await h.fake.push(h.photo(RED, "what is this?", chat=user, user=user))
    match = expect if callable(expect) else (lambda t: t == expect)
    await h.fake.wait_for(lambda: any(match(t) for t in h.fake.texts(user)[seen:]))
    return next(t for t in h.fake.texts(user)[seen:] if match(t))


def user(uid: int) -> Subject:
    return Subject("telegram", "user", str(uid))


async def test_allow_and_deny_apply_at_once_and_survive_a_restart(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    settings = private(fake, tmp_path)
    async with telegram_app(fake, settings, engine()) as h:
        assert await ask_photo(h, BOB, NOT_ALLOWED) == NOT_ALLOWED
        assert await say(h, f"/allow {BOB}", ADMIN) == "Done: user 222001 may use the bot now."
        await ask_photo(h, BOB)  # no restart needed
    async with telegram_app(fake, settings, engine()) as h:  # the same SQLite file
        await ask_photo(h, BOB)
        assert await say(h, f"/deny {BOB}", ADMIN) == "Done: user 222001 may no longer use the bot."
        await ask_photo(h, BOB, NOT_ALLOWED)
        audit = await h.stack.core.admin.audit()
    async with telegram_app(fake, settings, engine()) as h:
        await ask_photo(h, BOB, NOT_ALLOWED)
    assert [(e.action, e.subject, e.actor) for e in reversed(audit)] == [
        ("allow", user(BOB), user(ADMIN)), ("deny", user(BOB), user(ADMIN))]


async def test_a_reply_names_whom_and_here_names_the_group(fake: FakeTelegram, tmp_path: Path) -> None:
    settings = private(fake, tmp_path)
    async with telegram_app(fake, settings, engine()) as h:
        await fake.push(h.text("/ask hello", chat=GROUP, user=CAROL))
        await fake.wait_for(lambda: NOT_ALLOWED in fake.texts(GROUP))
        carol_said = next(m for m in fake.messages.values() if m.chat_id == GROUP and not m.from_bot)
        reply_to = {"message_id": carol_said.message_id, "date": 0, "text": carol_said.text,
                    "chat": {"id": GROUP, "type": "supergroup", "title": "G"},
                    "from": {"id": CAROL, "is_bot": False, "first_name": "Carol"}}
        assert await say(h, "/ask what?", BOB, chat=GROUP) == NOT_ALLOWED
        done = await say(h, "/allow", ADMIN, chat=GROUP, reply_to=reply_to)
        assert done == "Done: user 333001 may use the bot now."
        assert await say(h, "/ask what is 2+2?", CAROL, chat=GROUP) in SERVED
        assert await say(h, "/ask what?", BOB, chat=GROUP) == NOT_ALLOWED  # only Carol
        assert await say(h, "/allow here", ADMIN, chat=GROUP) == f"Done: chat {GROUP} may use the bot now."
        assert await say(h, "/ask what is 3+3?", BOB, chat=GROUP) in SERVED  # anyone there now
        await h.wait_done(2)


async def test_a_non_admins_admin_commands_are_refused_and_change_nothing(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    settings = telegram_settings(fake, tmp_path, admins=[ADMIN])  # no allowlist: all may ask
    async with telegram_app(fake, settings, engine()) as h:
        assert await say(h, f"/deny {CAROL}", BOB) == (
            "Sorry, only an admin of this bot can use /deny. Nothing was changed.")
        assert await say(h, f"/quota {CAROL} requests=0", BOB) == (
            "Sorry, only an admin of this bot can use /quota. Nothing was changed.")
        assert await say(h, f"/allow {BOB}", BOB, lang="zh-CN") == (
            "抱歉，只有本机器人的管理员可以使用 /allow。没有做任何更改。")
        await ask_photo(h, CAROL)  # still served, with no limit
        admin = h.stack.core.admin
        assert await admin.audit() == []
        assert await admin.effective_limits(user(CAROL), None) == Limits()


async def test_quota_applies_at_once_and_survives_a_restart(fake: FakeTelegram, tmp_path: Path) -> None:
    settings = private(fake, tmp_path)
    async with telegram_app(fake, settings, engine()) as h:
        await say(h, f"/allow {BOB}", ADMIN)
        done = await say(h, f"/quota {BOB} requests=1 images=5 engine=600 waiting=2", ADMIN)
        assert done == ("Done: user 222001's quota is now images 5/day, requests 1/day, engine "
                        "seconds 600/day, waiting jobs 2 at once. It applies at once.")
        await ask_photo(h, BOB)
        refused = await ask_photo(h, BOB, lambda t: t.startswith("You have used all 1"))
        jobs = await job_total(h.stack)
    async with telegram_app(fake, settings, engine()) as h:
        assert await ask_photo(h, BOB, lambda t: t.startswith("You have used all 1")) == refused
        assert await job_total(h.stack) == jobs  # refused: nothing queued
        raised = await say(h, f"/quota {BOB} requests=3", ADMIN)
        assert "requests 3/day" in raised and "images 5/day" in raised  # the rest is kept
        await ask_photo(h, BOB)  # at once
        assert (await h.stack.core.admin.audit())[0].detail  # what it was set to, logged


async def test_bad_arguments_are_named_and_change_nothing(fake: FakeTelegram, tmp_path: Path) -> None:
    settings = private(fake, tmp_path)
    async with telegram_app(fake, settings, engine()) as h:
        replies = {text: (await say(h, text, ADMIN)).split("\n")[0] for text in (
            f"/quota {BOB} images=abc",
            f"/quota {BOB} speed=3",
            f"/quota {BOB} images=5 images=6",
            f"/quota {BOB} images=-1",
            f"/quota {BOB} requests=2.5",
            f"/quota {BOB} images",
            f"/quota {BOB}",
            "/allow bob",
            f"/allow {BOB} {CAROL}",
            "/deny",
            f"/usage {BOB} forever",
        )}
        admin = h.stack.core.admin
        assert await admin.audit() == []
        assert await admin.effective_limits(user(BOB), None) == Limits()
        assert not await admin.access("telegram", "bob", None)
    assert replies == {
        f"/quota {BOB} images=abc": "images=abc is not a number.",
        f"/quota {BOB} speed=3": (
            "speed=3: there is no limit called speed (the limits: images, requests, engine, waiting)."),
        f"/quota {BOB} images=5 images=6": "images is given twice.",
        f"/quota {BOB} images=-1": "images=-1: a limit cannot be negative.",
        f"/quota {BOB} requests=2.5": "requests=2.5 is not a whole number.",
        f"/quota {BOB} images": (
            "images is not a limit setting: write name=number (images, requests, engine, waiting)."),
        f"/quota {BOB}": (
            "Which limits? Give at least one of images, requests, engine, waiting as name=number."),
        "/allow bob": "bob is not a user or a chat I can name.",
        f"/allow {BOB} {CAROL}": f"I did not expect {CAROL} there.",
        "/deny": "/deny needs to know whom it is about.",
        f"/usage {BOB} forever": "forever is not a number of days (1 to 366).",
    }


async def test_usage_shows_what_was_done(fake: FakeTelegram, tmp_path: Path) -> None:
    settings = telegram_settings(fake, tmp_path, quota={"images_per_day": 5, "requests_per_day": 10},
                                 admins=[ADMIN])
    async with telegram_app(fake, settings, engine()) as h:
        await ask_photo(h, BOB)
        await fake.push(h.photo(BLUE, "and this?", chat=BOB, user=BOB))
        await h.wait_done(2)
        await ask_photo(h, CAROL)
        await h.wait_done(3)
        own = await say(h, "/usage", BOB)
        mine_zh = await say(h, "/usage", CAROL, lang="zh")
        carol_to_bob = await say(h, f"/usage {BOB} 7", CAROL)
        report = await say(h, "/usage", ADMIN)
        about_bob = await say(h, f"/usage {BOB} 1", ADMIN)
    lines = own.split("\n")
    assert lines[0].startswith("Your use today (UTC): requests 2, images 2, ")
    assert lines[1] == ("Left: images: 3 of 5; requests: 8 of 10; engine seconds: no limit; "
                        "waiting jobs: no limit.")
    assert lines[2].startswith("The day's counts reset at ") and lines[2].endswith(" 00:00 UTC.")
    assert mine_zh.startswith("你今天（UTC）的用量：1 个请求，1 张图片，")
    assert carol_to_bob == texts.text("admin_usage_others")
    head, *rest = report.split("\n")
    assert head.startswith("Use in the last 7 days (") and ": requests 3, images 3, " in head
    assert "answered 3, failed 0, cancelled 0" in head
    assert rest[0].startswith("Time to first token: p50 ")
    users = rest[rest.index("Top users:") + 1: rest.index("Top chats:")]
    assert sorted(line[3:].rsplit(",", 1)[0] for line in users) == [  # ranked by engine time
        f"Alice (user {BOB}): requests 2, images 2", f"Alice (user {CAROL}): requests 1, images 1"]
    assert rest[-1].startswith("Images per day: ") and rest[-1].endswith(": 3.")
    assert f" by user {BOB}: requests 2, images 2" in about_bob


async def test_help_and_menus_show_the_admin_commands_to_admins(fake: FakeTelegram, tmp_path: Path) -> None:
    settings = telegram_settings(fake, tmp_path, admins=[ADMIN])
    async with telegram_app(fake, settings, engine()) as h:
        for_admin = await say(h, "/help", ADMIN)
        for_bob = await say(h, "/help", BOB)
    assert "/usage" in for_bob and "/allow" not in for_bob
    assert "/allow" in for_admin and "/quota" in for_admin and "/deny" in for_admin
    menus = [c.params for c in fake.calls if c.method == "setMyCommands"]
    scoped = [m for m in menus if m.get("scope")]
    assert {m["scope"]["chat_id"] for m in scoped} == {ADMIN}
    assert {m.get("language_code") for m in scoped} == {None, "zh"}
    names = {c["command"] for c in scoped[0]["commands"]}
    assert {"allow", "deny", "quota", "usage", "ask"} <= names
    default = next(m for m in menus if not m.get("scope"))
    assert "usage" in {c["command"] for c in default["commands"]}
    assert "allow" not in {c["command"] for c in default["commands"]}
