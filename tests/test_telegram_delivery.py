"""The Telegram adapter under a busy queue and platform errors: positions, 429, 5xx, deleted
placeholders, blocked users, redelivered updates, long answers, webhook mode."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.telegram import TelegramAdapter
from adapters.telegram.replies import split_message, utf16_len
from bot.adapter import Core, ReplyEvent
from bot.app import App
from bot.models import ConversationId, Job
from tests.conftest import make_core
from tests.fake_telegram import LOST, RESET, TOKEN, FakeTelegram
from tests.fakes import ScriptedEngine
from tests.telegram_harness import (
    ALICE,
    ANSWER,
    GREEN,
    GROUP,
    RED,
    Harness,
    fake_server,
    make_settings,
    running,
)

__all__ = ["fake_server"]  # the `fake` fixture


# --- queue, errors, exactly once ----------------------------------------------------------------


async def test_a_queued_message_shows_its_position_then_its_answer(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    engine = ScriptedEngine(reply=lambda h, m: f"answer about {m.text}", delay_s=0.3)
    async with running(fake, tmp_path, engine=engine) as h:
        await fake.push(h.photo(RED, "first"))
        await fake.wait_for(lambda: h.engine.running == 1)
        await fake.push(h.photo(GREEN, "second", chat=333, user=333))
        await h.wait_text(333, "answer about second", timeout=15)
    first_text = fake.calls_to(333, "sendMessage")[0].params["text"]
    assert first_text == "queued: 1st in line"  # no job timed yet: no invented estimate
    assert fake.texts(333) == ["answer about second"] and len(fake.calls_to(333, "sendMessage")) == 1


async def test_429_during_streaming_still_delivers_the_whole_answer_once(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    fake.fail_next("editMessageText", 429, times=2, retry_after=1)
    async with running(fake, tmp_path) as h:
        await fake.push(h.photo(RED, "total?"))
        await h.wait_done(1, timeout=15)
        await asyncio.sleep(0.3)
    assert [c.status for c in fake.calls if c.method == "editMessageText"][:2] == [429, 429]
    assert fake.texts(ALICE) == [ANSWER]
    assert len(fake.calls_to(ALICE, "sendMessage")) == 1


async def test_server_error_on_the_final_edit_is_retried_into_the_same_message(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    fake.fail_next("editMessageText", 502, text="short")  # the final edit, not the streamed ones
    async with running(fake, tmp_path, engine=ScriptedEngine(reply=lambda h, m: "short")) as h:
        await fake.push(h.photo(RED, "total?"))
        await h.wait_done(1, timeout=15)
    finals = [c.status for c in fake.calls_to(ALICE, "editMessageText") if c.params["text"] == "short"]
    assert finals == [502, 200]
    assert fake.texts(ALICE) == ["short"] and len(fake.calls_to(ALICE, "sendMessage")) == 1


async def test_deleted_placeholder_and_blocked_user(fake: FakeTelegram, tmp_path: Path) -> None:
    engine = ScriptedEngine(reply=lambda h, m: "the answer", delay_s=0.2)
    async with running(fake, tmp_path, engine=engine) as h:
        await fake.push(h.photo(RED, "q"))
        await h.wait_text(ALICE, "thinking…")
        fake.delete_by_user(ALICE, fake.bot_messages(ALICE)[0].message_id)
        await h.wait_done(1)
        assert fake.texts(ALICE) == ["the answer"]  # sent anew, once
        fake.blocked.add(444)
        await fake.push(h.photo(RED, "q", chat=444, user=444))
        await h.wait_done(2)  # the job completes; nothing is retried forever
    assert all(c.status == 403 for c in fake.calls_to(444, "sendMessage"))


async def test_a_redelivered_update_is_answered_once(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path) as h:
        await fake.push(h.photo(RED, "what is it?"))
        await h.wait_done(1)
        # restart the adapter; Telegram hands out the same update again
        await h.adapter.stop()
        await fake.redeliver_all()
        await h.adapter.start(h.stack.core)
        await fake.push(h.text("marker"))
        await h.wait_done(2)
        await asyncio.sleep(0.3)
    assert [c.message.text for c in h.engine.calls] == ["what is it?", "marker"]
    assert len(fake.calls_to(ALICE, "sendMessage")) == 2


async def test_long_and_markdown_like_answers_are_sent_safely(fake: FakeTelegram, tmp_path: Path) -> None:
    # long words: the scripted engine streams a word a token, up to max_new_tokens (512)
    long = (("*bold_[link](x)`code`" * 5 + " ") * 70).strip()
    async with running(fake, tmp_path, engine=ScriptedEngine(reply=lambda h, m: long)) as h:
        await fake.push(h.photo(RED, "q"))
        await h.wait_done(1)
    shown = fake.texts(ALICE)
    assert len(shown) == 2 and all(utf16_len(t) <= 4096 for t in shown)
    assert " ".join(shown) == long


def test_split_message_counts_utf16() -> None:
    text = "😀" * 3000  # 2 UTF-16 units each
    pieces = split_message(text)
    assert [utf16_len(p) for p in pieces] == [4096, 1904] and "".join(pieces) == text




async def test_webhook_mode_checks_the_secret(fake: FakeTelegram, tmp_path: Path) -> None:
    settings = make_settings(fake, tmp_path, mode="webhook", webhook_port=0,
                             webhook_url="https://bot.example.com/tg/hook", webhook_secret="s3cret")
    adapter = TelegramAdapter(settings, edit_interval_s=0.1)
    stack = await make_core(tmp_path / "vlbot.sqlite3", [adapter], ScriptedEngine(reply=lambda h, m: "hi"))
    try:
        assert adapter.webhook is not None
        url = f"http://127.0.0.1:{adapter.webhook.bound_port}/tg/hook"
        h = Harness(fake, adapter, stack)
        update = h.text("hello")
        update["update_id"], update["message"]["message_id"] = 5, 1
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=update) as refused:
                assert refused.status == 403
            headers = {"X-Telegram-Bot-Api-Secret-Token": "s3cret"}
            async with session.post(url, json=update, headers=headers) as accepted:
                assert accepted.status == 200
        await fake.wait_for(lambda: fake.texts(ALICE) == ["hi"])
        hook = next(c for c in fake.calls if c.method == "setWebhook")
        assert hook.params["url"] == "https://bot.example.com/tg/hook"
    finally:
        await adapter.stop()
        await stack.close()


async def test_streaming_edits_respect_the_flood_limits(fake: FakeTelegram, tmp_path: Path) -> None:
    """Default pacing: at most about one edit per second in a private chat, one per 3 s in groups."""
    words = " ".join(f"w{i}" for i in range(10))
    engine = ScriptedEngine(reply=lambda h, m: words, delay_s=0.3)
    defaults = {"edit_interval_s": 1.0, "group_edit_interval_s": 3.0}
    async with running(fake, tmp_path, engine=engine, adapter_kw=defaults) as h:
        await fake.push(h.photo(RED, "q"))
        await fake.push(h.photo(RED, chat=GROUP, user=222, name="group_photo.json",
                                caption="@vlbot_test_bot q"))
        await h.wait_done(2, timeout=20)
    for chat, interval in ((ALICE, 1.0), (GROUP, 3.0)):
        streamed = [c.at for c in fake.calls_to(chat, "editMessageText")
                    if c.params["text"].endswith(" …")]
        assert streamed, f"no streamed edits in {chat}"
        gaps = [b - a for a, b in itertools.pairwise(streamed)]
        assert all(g >= interval * 0.95 for g in gaps), (chat, gaps)
        assert fake.texts(chat) == [words]


async def test_forum_topic_is_its_own_conversation(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path) as h:
        update = h.photo(RED, chat=GROUP, user=222, name="group_photo.json",
                         caption="@vlbot_test_bot what is on this?")
        msg = update["message"]
        msg["chat"]["is_forum"] = True
        msg.update(message_thread_id=77, is_topic_message=True)
        await fake.push(update)
        await h.wait_done(1)
        export = await h.stack.history.export(ConversationId("telegram", str(GROUP), "77"))
        assert len(export["turns"]) == 2  # the topic's own history
        assert (await h.stack.history.export(ConversationId("telegram", str(GROUP))))["turns"] == []
    placeholder = fake.calls_to(GROUP, "sendMessage")[0]
    assert placeholder.params["message_thread_id"] == 77


async def test_typing_is_renewed_while_a_long_answer_is_generated(
    fake: FakeTelegram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.telegram import replies

    monkeypatch.setattr(replies, "TYPING_RENEW_S", 0.2)
    slow = ScriptedEngine(reply=lambda h, m: " ".join(["word"] * 10), delay_s=0.1)
    async with running(fake, tmp_path, engine=slow) as h:
        await fake.push(h.photo(RED, "take your time"))
        await h.wait_done(1)
        typing = len(fake.calls_to(ALICE, "sendChatAction"))
        await asyncio.sleep(0.5)
        assert len(fake.calls_to(ALICE, "sendChatAction")) == typing  # stops with the answer
    assert typing >= 3


# --- lost responses, restarts, an unreachable Bot API ----------------------------------------------


async def test_a_placeholder_whose_response_was_lost_is_not_left_beside_the_answer(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    fake.fail_next("sendMessage", LOST)  # Telegram shows the placeholder; the bot never hears
    async with running(fake, tmp_path) as h:
        await fake.push(h.photo(RED, "total?"))
        await h.wait_done(1, timeout=15)
    lost = [m for m in fake.messages.values() if m.chat_id == ALICE and m.from_bot and m.deleted]
    assert len(lost) == 1  # it did arrive, and was found and removed
    assert fake.texts(ALICE) == [ANSWER]


async def test_an_answer_whose_response_was_lost_is_shown_once(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    long = (("word" * 20 + " ") * 60).strip()  # two messages: the second is a new send
    engine = ScriptedEngine(reply=lambda h, m: long)
    async with running(fake, tmp_path, engine=engine) as h:
        second = split_message(long)[1]
        fake.fail_next("sendMessage", LOST, text=second)
        await fake.push(h.photo(RED, "q"))
        await h.wait_done(1, timeout=15)
    assert fake.texts(ALICE) == split_message(long)  # each part once, the lost copy removed


async def test_an_album_inside_its_window_survives_a_restart(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    """SIGTERM's path (App.stop → adapter.stop) while an album is still being collected: Telegram
    has been told the updates arrived, and the album is answered after the restart."""
    adapter_kw = {"album_wait_s": 30.0}  # the stop always lands inside the window
    async with running(fake, tmp_path, adapter_kw=adapter_kw) as h:
        ids = []
        for i, image in enumerate((RED, GREEN)):
            update = h.photo(image, "what differs?" if i == 0 else None)
            update["message"]["media_group_id"] = "album-1"
            ids.append(await fake.push(update))
        await fake.wait_for(lambda: fake.confirmed_offset > max(ids))  # acknowledged
        await h.adapter.stop()
        assert (await h.stack.jobs.counts()) == {}  # no job yet: only the pending updates
        h.adapter.album_wait_s = 0.3
        await h.adapter.start(h.stack.core)  # Telegram does not send them again
        await h.wait_done(1, timeout=15)
        await asyncio.sleep(0.5)  # anything duplicated would show up now
    assert fake.texts(ALICE) == [ANSWER]
    assert [len(c.message.images) for c in h.engine.calls] == [2]


async def test_an_unreachable_bot_api_at_start_is_retried_in_the_background(
    fake: FakeTelegram, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail_next("getMe", 502, times=2)
    fake.fail_next("getMe", RESET)
    caplog.set_level(logging.INFO)
    adapter_kw = {"connect_backoff_s": 0.05}
    async with running(fake, tmp_path, adapter_kw=adapter_kw) as h:
        assert not h.adapter._ready.is_set()  # start returned: the other adapters go on
        await fake.push(h.photo(RED, "total?"))
        await h.wait_text(ALICE, ANSWER, timeout=15)
    assert [c.status for c in fake.calls if c.method == "getMe"] == [502, 502, RESET, 200]
    attempts = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(attempts) == 3, attempts
    assert not any(TOKEN in r.getMessage() or TOKEN.split(":")[1] in r.getMessage()
                   for r in caplog.records)


class OtherAdapter:
    """Stands for Slack or HTTP: started by the app after Telegram."""

    platform = "other"

    def __init__(self) -> None:
        self.started = False

    async def start(self, core: Core) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def send(self, job: Job, event: ReplyEvent) -> dict[str, Any] | None:
        return None


async def test_serve_keeps_the_other_adapters_while_the_bot_api_is_unreachable(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    fake.fail_next("getMe", 502, times=1000)  # down for the whole test
    settings = make_settings(fake, tmp_path)
    telegram = TelegramAdapter(settings, connect_backoff_s=0.05, connect_backoff_max_s=0.1)
    other = OtherAdapter()
    app = App(settings, ScriptedEngine(), [telegram, other])
    await app.start()  # returns: Telegram keeps trying in the background
    try:
        assert other.started and app.runner is not None
        await fake.wait_for(lambda: sum(c.method == "getMe" for c in fake.calls) >= 3)
    finally:
        await app.stop()


async def test_an_update_that_cannot_be_stored_is_not_acknowledged(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    """The database refuses the write once (e.g. locked): Telegram's offset stays, getUpdates
    hands the photo out again, and it is answered once."""
    async with running(fake, tmp_path) as h:
        assert h.adapter.queue is not None
        pending = h.adapter.queue.pending
        store = pending.add
        failures = [sqlite3.OperationalError("database is locked")]

        async def add_or_fail(update_id: str, body: dict[str, Any]) -> None:
            if failures:
                raise failures.pop()
            await store(update_id, body)

        pending.add = add_or_fail  # type: ignore[method-assign]
        update_id = await fake.push(h.photo(RED, "total?"))
        await h.wait_done(1, timeout=15)
        assert not failures and fake.confirmed_offset > update_id
        await asyncio.sleep(0.3)  # anything duplicated would show up now
    assert fake.texts(ALICE) == [ANSWER]
