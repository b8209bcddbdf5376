"""Auto-triage groups on Telegram, end to end: the whole app (bot/app.py: runner, SQLite, the
triage workflow with a routing rule) with python-telegram-bot long-polling the fake Bot API
(recorded-shape updates: an unaddressed group photo, a group text message), and a scripted
engine that answers the triage preset's JSON per screenshot (tests/triage_helpers.py)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from telegram.error import Forbidden

from bot.adapter import Poster
from bot.settings import TriageSettings
from tests.chat_admin_helpers import telegram_app, telegram_settings
from tests.fake_telegram import FakeTelegram, fixture
from tests.telegram_harness import (
    BLUE,
    GREEN,
    GROUP,
    RED,
    Harness,
    fake_server,  # noqa: F401  (the `fake` fixture)
    jpeg,
)
from tests.triage_helpers import TriageScript, triage_json

SUPPORT = -1009876543210  # the auto-triage group of the recorded updates
ONCALL = -1005555555555
CAROL = 333
TRIAGE = {"telegram_chats": [SUPPORT],
          "rules": [{"when": {"severity": ["blocker"]}, "post_to": f"telegram:{ONCALL}"}]}


def link_of(chat: int, message_id: int) -> str:
    """A private supergroup's message link, as Telegram forms it (-100 dropped from the id)."""
    return f"https://t.me/c/{str(chat)[4:]}/{message_id}"


@pytest.fixture
def script() -> TriageScript:
    s = TriageScript()
    s.add(RED, triage_json("blocker", "Checkout", "Payment failed for order 81723 at 10:31:07",
                           "PAY-402"))
    s.add(BLUE, triage_json("minor", "Profile", "Avatar upload is slow"))
    s.add(GREEN, triage_json("major", "Search", "Search results never load"))
    return s


@asynccontextmanager
async def triage_bot(fake: FakeTelegram, tmp_path: Path, script: TriageScript, **telegram: Any
                     ) -> AsyncIterator[Harness]:
    """The app with one auto-triage group and a rule: blockers also go to the on-call group."""
    settings = telegram_settings(fake, tmp_path, **telegram).model_copy(
        update={"triage": TriageSettings.model_validate(TRIAGE)})
    async with telegram_app(fake, settings, script.engine()) as h:
        yield h


def screenshot(h: Harness, data: bytes, caption: str | None = None, chat: int = SUPPORT
               ) -> dict[str, Any]:
    return h.photo(data, caption, chat=chat, user=CAROL, name="group_photo_unaddressed.json")


def group_text(text: str, chat: int = SUPPORT) -> dict[str, Any]:
    update = fixture("group_text.json")
    update["message"].update(text=text, date=int(time.time()))
    update["message"]["chat"]["id"] = chat
    return update


def replies_to(fake: FakeTelegram, chat: int, message_id: int) -> list[str]:
    return [m.text for m in fake.bot_messages(chat) if m.reply_to == message_id]


def code_block(fake: FakeTelegram, chat: int, text: str) -> tuple[str | None, str]:
    """The language and text of the one `pre` entity the message showing `text` was sent with."""
    [call] = [c for c in fake.calls_to(chat, "sendMessage", "editMessageText")
              if c.params.get("text") == text]
    [entity] = call.params["entities"]
    assert entity["type"] == "pre"
    start, end = entity["offset"], entity["offset"] + entity["length"]  # ASCII: UTF-16 = str
    return entity.get("language"), text[start:end]


async def origins(h: Harness) -> list[dict[str, Any]]:
    rows = await h.stack.db.fetchall("SELECT id FROM jobs ORDER BY seq", ())
    jobs = [await h.stack.jobs.get(str(row["id"])) for row in rows]
    return [dict(job.origin) for job in jobs if job is not None]


async def test_a_photo_in_a_triage_group_gets_one_triage_reply(
    fake: FakeTelegram, tmp_path: Path, script: TriageScript, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "vlbot.telegram.triage")
    async with triage_bot(fake, tmp_path, script) as h:
        # the recorded getMe says privacy mode is on: the log says how to let the bot see images
        assert "privacy mode is on" in caplog.text and "/setprivacy" in caplog.text
        update = screenshot(h, RED, "customer sent this from the checkout page")
        await fake.push(update)
        await h.wait_done(1)
        message_id = update["message"]["message_id"]
        [answer] = replies_to(fake, SUPPORT, message_id)
        [origin] = await origins(h)
    assert len(fake.bot_messages(SUPPORT)) == 1, "one reply, to the photo"
    # readable first, then the JSON as a code block (an entity: no parse mode, no backticks)
    assert answer.startswith("Severity: blocker\n") and "Error: Payment failed for order 81723" in answer
    assert "```" not in answer
    language, code = code_block(fake, SUPPORT, answer)
    assert language == "json" and json.loads(code)["error_code"] == "PAY-402"
    assert answer.endswith(code)
    assert origin["preset"] == "triage" and origin["auto_triage"] is True
    assert origin["link"] == link_of(SUPPORT, message_id)
    assert h.engine.calls[0].message.text and "checkout page" in h.engine.calls[0].message.text


async def test_other_groups_and_text_only_messages_are_left_alone(
    fake: FakeTelegram, tmp_path: Path, script: TriageScript
) -> None:
    async with triage_bot(fake, tmp_path, script) as h:
        await fake.push(screenshot(h, GREEN, "look at this", chat=GROUP))  # not a triage group
        await fake.push(group_text("anyone else seeing checkout errors?"))
        parts = [screenshot(h, data, "two screens of it" if i == 0 else None)
                 for i, data in enumerate((BLUE, GREEN, b"a screen recording"))]
        video = parts[2]["message"]  # an album may hold a video: left out, not refused
        video["video"] = {"file_id": video["photo"][-1]["file_id"], "file_unique_id": "vid1",
                          "width": 1280, "height": 800, "duration": 12}
        del video["photo"]
        for part in parts:  # an album: triaged once, with its two images
            part["message"]["media_group_id"] = "album-7"
            await fake.push(part)
        await h.wait_done(1)
        [answer] = replies_to(fake, SUPPORT, parts[0]["message"]["message_id"])
        assert fake.bot_messages(GROUP) == [] and len(fake.bot_messages(SUPPORT)) == 1
        [call] = h.engine.calls
        assert [i.data for i in call.message.images] == [BLUE, GREEN]
        assert "Severity: major" in answer  # the script answers for the album's last image
        assert len(fake.downloads) == 2, "the photo in the other group is never fetched"


async def test_a_blocker_reaches_on_call_and_a_repeat_says_how_often_it_was_seen(
    fake: FakeTelegram, tmp_path: Path, script: TriageScript
) -> None:
    again = jpeg((201, 20, 20))  # another screenshot of the same error: other order id and time
    script.add(again, triage_json("blocker", "Checkout",
                                  "Payment failed for order 99102 at 11:02:45", "PAY-402"))
    async with triage_bot(fake, tmp_path, script) as h:
        first = screenshot(h, RED)
        await fake.push(first)
        await h.wait_done(1)
        first_link = link_of(SUPPORT, first["message"]["message_id"])
        await fake.wait_for(lambda: fake.texts(ONCALL))
        [routed] = fake.texts(ONCALL)
        assert "blocker" in routed and f"Original: {first_link}" in routed

        minor = screenshot(h, BLUE)
        await fake.push(minor)
        repeat = screenshot(h, again, "same again, another customer")
        await fake.push(repeat)
        await h.wait_done(3)
        [repeat_answer] = replies_to(fake, SUPPORT, repeat["message"]["message_id"])
        [minor_answer] = replies_to(fake, SUPPORT, minor["message"]["message_id"])
    assert "Seen 2 times since" in repeat_answer and f"first here: {first_link}" in repeat_answer
    assert "Seen" not in minor_answer
    assert len(fake.texts(ONCALL)) == 2 and "(seen 2 times)" in fake.texts(ONCALL)[1]
    assert all(not call.history for call in h.engine.calls), "each triage sees its own image only"


async def test_a_group_outside_the_allowlist_is_not_triaged_and_not_told(
    fake: FakeTelegram, tmp_path: Path, script: TriageScript
) -> None:
    async with triage_bot(fake, tmp_path, script, allowed_chats=[GROUP]) as h:
        await fake.push(screenshot(h, RED))  # nobody asked: no "not allowed" reply either
        asked = h.photo(BLUE, "@vlbot_test_bot what is this?", chat=GROUP, user=CAROL,
                        name="group_photo_unaddressed.json")
        await fake.push(asked)
        await h.wait_done(1)
        assert fake.bot_messages(SUPPORT) == [] and len(h.engine.calls) == 1


async def test_the_poster_posts_into_a_chat_and_returns_the_link(
    fake: FakeTelegram, tmp_path: Path, script: TriageScript
) -> None:
    async with triage_bot(fake, tmp_path, script) as h:
        assert isinstance(h.adapter, Poster)
        link = await h.adapter.post(str(ONCALL), "Daily triage digest: 3 blockers")
        [message] = fake.bot_messages(ONCALL)
        assert message.text == "Daily triage digest: 3 blockers" and message.reply_to is None
        assert link == link_of(ONCALL, message.message_id)
        fake.blocked.add(-1007777777777)
        with pytest.raises(Forbidden):
            await h.adapter.post("-1007777777777", "nobody will see this")
