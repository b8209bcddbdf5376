"""The Telegram adapter end to end: python-telegram-bot talks real HTTP to a fake Bot API server,
a real SQLite-backed runner and core sit behind it, and a scripted engine answers. Assertions
are about what the user sees in the chat (the fake records every call)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import logging
import time
from pathlib import Path

import pytest
from PIL import Image

from bot.engine_port import EngineInfo
from tests.fake_telegram import TOKEN, FakeTelegram, fixture
from tests.fakes import ScriptedEngine
from tests.telegram_harness import (
    ALICE,
    ANSWER,
    BLUE,
    GREEN,
    GROUP,
    RED,
    fake_server,
    image_shas,
    jpeg,
    running,
    transcript,
)

__all__ = ["fake_server"]  # the `fake` fixture


# --- the main path ------------------------------------------------------------------------------


async def test_photo_with_caption_streams_edits_ending_in_the_full_answer(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    async with running(fake, tmp_path) as h:
        update_id = await fake.push(h.photo(RED, "What does the receipt total?"))
        await h.wait_text(ALICE, ANSWER)
        await h.wait_done(1)

    sends = fake.calls_to(ALICE, "sendMessage")
    assert [c.params["text"] for c in sends] == ["thinking…"]  # one message, edited
    placeholder = fake.bot_messages(ALICE)[0]
    assert placeholder.text == ANSWER
    streamed = placeholder.edits[:-1]
    assert len(streamed) >= 2 and all(e.endswith(" …") for e in streamed)
    assert all(ANSWER.startswith(e[:-2].strip()) for e in streamed)  # growing prefixes
    assert fake.calls_to(ALICE, "sendChatAction")[0].params["action"] == "typing"
    assert all("parse_mode" not in c.params for c in fake.calls)  # plain text: never fails
    call = h.engine.calls[0]
    assert call.message.text == "What does the receipt total?"
    assert [i.data for i in call.message.images] == [RED]  # the largest size, downloaded
    assert sends[0].params["reply_parameters"]["message_id"] > 0

    delay = sends[0].at - fake.pushed_at[update_id]
    print(f"\nupdate -> placeholder: {delay * 1000:.0f} ms")
    print("private chat, photo + caption:\n" + transcript(fake.calls, fake.pushed_at[update_id]))
    assert delay < 1.0


async def test_photo_without_caption_gets_the_default_question(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path, default_prompt="Describe it briefly.") as h:
        await fake.push(h.photo(RED, None))
        await h.wait_text(ALICE, ANSWER)
    assert h.engine.calls[0].message.text == "Describe it briefly."


async def test_follow_up_text_uses_the_image(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path) as h:
        await fake.push(h.photo(RED, "What is this?"))
        await h.wait_done(1)
        await fake.push(h.text("and the date?"))
        await h.wait_done(2)
    follow_up = h.engine.calls[1]
    assert follow_up.message.text == "and the date?" and not follow_up.message.images
    assert image_shas(follow_up.history) == [hashlib.sha256(RED).hexdigest()]
    assert len(fake.bot_messages(ALICE)) == 2


async def test_reply_to_an_earlier_photo_or_its_answer_asks_about_that_photo(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    async with running(fake, tmp_path) as h:
        red = h.photo(RED, "first")
        await fake.push(red)
        await h.wait_done(1)
        await fake.push(h.photo(GREEN, "second"))
        await h.wait_done(2)
        # reply to the bot's answer about the first photo (the first bot message)
        first_answer = fake.bot_messages(ALICE)[0].message_id
        await fake.push(h.text("and this?", reply_to=h.bot_message(ALICE, first_answer)))
        await h.wait_done(3)
        await fake.push(h.photo(BLUE, "third"))
        await h.wait_done(4)
        # reply to the first photo message itself
        await fake.push(h.text("what colour was this one?", reply_to=copy.deepcopy(red["message"])))
        await h.wait_done(5)
        # a plain follow-up is about the latest image again
        await fake.push(h.text("and now?"))
        await h.wait_done(6)
    calls = h.engine.calls
    assert [i.data for i in calls[2].message.images] == [RED]
    assert [i.data for i in calls[4].message.images] == [RED]
    assert calls[5].message.images == ()  # the history's latest image (RED) serves
    assert image_shas(calls[5].history)[-1] == hashlib.sha256(RED).hexdigest()


async def test_album_of_three_is_one_turn_with_one_answer(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path) as h:
        for i, data in enumerate((RED, GREEN, BLUE)):
            update = h.photo(data, "compare these" if i == 0 else None)
            update["message"]["media_group_id"] = "13579"
            await fake.push(update)
        await h.wait_done(1)
        await asyncio.sleep(0.4)  # nothing else arrives
    assert len(h.engine.calls) == 1
    assert [i.data for i in h.engine.calls[0].message.images] == [RED, GREEN, BLUE]
    assert h.engine.calls[0].message.text == "compare these"
    assert fake.texts(ALICE) == [ANSWER]


async def test_heic_document_is_an_image(fake: FakeTelegram, tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(out, format="HEIF")
    heic = out.getvalue()
    async with running(fake, tmp_path) as h:
        await fake.push(h.document(heic, "IMG_4021.HEIC", "image/heic"))
        await h.wait_done(1)
        # iOS "files" often arrive as application/octet-stream: the extension decides
        await fake.push(h.document(heic, "IMG_4022.heic", "application/octet-stream"))
        await h.wait_done(2)
    first, second = (c.message.images[0] for c in h.engine.calls)
    assert (first.data, first.mime, first.name) == (heic, "image/heic", "IMG_4021.HEIC")
    assert second.mime == "image/heic"


async def test_stickers_videos_and_other_files_get_a_short_hint(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path) as h:
        sticker = fixture("sticker.json")
        h._who(sticker["message"], ALICE, ALICE, "en")
        await fake.push(sticker)
        await fake.push(h.document(b"%PDF-1.7 ...", "invoice.pdf", "application/pdf"))
        hint = "Send a photo or an image file (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC)."
        await fake.wait_for(lambda: fake.texts(ALICE).count(hint) == 2)
    assert h.engine.calls == [] and fake.downloads == []


async def test_too_large_files_are_refused_without_downloading(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path) as h:
        await fake.push(h.document(b"x", "scan.png", "image/png", size=25 * 1024 * 1024))
        await fake.push(h.document(b"x", "photo.jpg", "image/jpeg", size=12 * 1024 * 1024))
        await fake.wait_for(lambda: len(fake.texts(ALICE)) == 2)
    assert fake.texts(ALICE) == [
        "That file is 25 MiB; the limit is 10 MiB.",
        "That file is 12 MiB; the limit is 10 MiB.",
    ]
    assert not fake.calls_to(ALICE, "getFile") and not any(c.method == "getFile" for c in fake.calls)


# --- groups -------------------------------------------------------------------------------------


async def test_group_answers_only_when_addressed(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path) as h:
        plain = h.photo(GREEN, "look at this", chat=GROUP, user=222, name="group_photo.json")
        await fake.push(plain)
        start = time.monotonic()
        addressed = h.photo(RED, chat=GROUP, user=222, name="group_photo.json",
                            caption="@vlbot_test_bot what is on this?")
        update_id = await fake.push(addressed)
        await h.wait_text(GROUP, ANSWER)
        await h.wait_done(1)
        # replying to the bot's answer addresses it, too (works with privacy mode on)
        answer_id = fake.bot_messages(GROUP)[0].message_id
        await fake.push(h.text("and the price?", chat=GROUP, user=222,
                               reply_to=h.bot_message(GROUP, answer_id)))
        await fake.push(h.text("/ask@vlbot_test_bot how many items?", chat=GROUP, user=222))
        await fake.push(h.text("nobody asked you", chat=GROUP, user=222))
        await h.wait_done(3)
        await asyncio.sleep(0.3)
    assert h.engine.calls[0].message.text == "what is on this?"
    assert sorted(c.message.text for c in h.engine.calls[1:]) == ["and the price?", "how many items?"]
    assert [i.data for i in h.engine.calls[0].message.images] == [RED]
    assert len(fake.bot_messages(GROUP)) == 3
    placeholder = fake.calls_to(GROUP, "sendMessage")[0]
    assert placeholder.params["reply_parameters"]["message_id"] == addressed["message"]["message_id"]
    assert fake.downloads and len(fake.downloads) == 1  # the unaddressed photo is never fetched
    since = fake.pushed_at[update_id]
    first_final = next(c.at for c in fake.calls_to(GROUP, "editMessageText")
                        if c.params["text"] == ANSWER)
    shown = [c for c in fake.calls if since <= c.at <= first_final
             and (c.params.get("chat_id") == GROUP or c.method == "getFile")]
    print("\ngroup, an unaddressed photo, then photo + @mention:\n" + transcript(shown, since))
    assert time.monotonic() - start < 20


# --- commands -----------------------------------------------------------------------------------


async def test_reset_forgets_the_chat(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path) as h:
        await fake.push(h.photo(RED, "what is it?"))
        await h.wait_done(1)
        await fake.push(h.text("/reset"))
        await h.wait_text(ALICE, "Done: I forgot this chat's history.")
        await fake.push(h.text("and the date?"))
        await h.wait_done(2)
    assert h.engine.calls[1].history == []


async def test_cancel_stops_the_running_answer(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path, engine=ScriptedEngine(hang=True)) as h:
        await fake.push(h.photo(RED, "what is it?"))
        await h.wait_text(ALICE, "thinking…")
        await fake.wait_for(lambda: h.engine.running == 1)
        await fake.push(h.text("/cancel"))
        await h.wait_text(ALICE, "Cancelled.")
        await fake.push(h.text("/cancel"))
        await h.wait_text(ALICE, "There is nothing to cancel.")
    assert fake.texts(ALICE) == ["Cancelled.", "There is nothing to cancel."]


async def test_cancel_after_five_photos_cancels_all_five(fake: FakeTelegram, tmp_path: Path) -> None:
    """The photos are still downloading, waiting for the chat's turn or queued when /cancel
    arrives: every one of them is cancelled, none answered."""
    engine = ScriptedEngine(reply=lambda h, m: ANSWER, delay_s=0.1)
    async with running(fake, tmp_path, engine=engine) as h:
        colours = [(40 * i, 200 - 30 * i, 90) for i in range(5)]
        for colour in colours:
            await fake.push(h.photo(jpeg(colour), "total?"))
        await fake.push(h.text("/cancel"))
        await fake.wait_for(lambda: fake.texts(ALICE).count("Cancelled.") == 5, timeout=15)
        await fake.push(h.text("/cancel"))  # a marker: everything before it has settled
        await h.wait_text(ALICE, "There is nothing to cancel.")
        counts = await h.stack.jobs.counts()
    assert fake.texts(ALICE) == ["Cancelled."] * 5 + ["There is nothing to cancel."]
    assert "done" not in counts
    replied_to = sorted(m.reply_to for m in fake.bot_messages(ALICE) if m.text == "Cancelled.")
    photo_ids = sorted(i for (chat, i), m in fake.messages.items()
                       if chat == ALICE and not m.from_bot and m.text == "total?")
    assert replied_to == photo_ids  # one "Cancelled." for each photo


async def test_cancel_covers_an_album_still_being_collected(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path, adapter_kw={"album_wait_s": 1.0}) as h:
        for i, image in enumerate((RED, GREEN)):
            update = h.photo(image, "what differs?" if i == 0 else None)
            update["message"]["media_group_id"] = "album-c"
            await fake.push(update)
        await fake.push(h.text("/cancel"))  # inside the album's window
        await h.wait_text(ALICE, "Cancelled.")
        await fake.push(h.text("/cancel"))  # a marker: the album has settled
        await h.wait_text(ALICE, "There is nothing to cancel.")
    assert fake.texts(ALICE) == ["Cancelled.", "There is nothing to cancel."]
    assert h.engine.calls == []


class FolderModelEngine(ScriptedEngine):
    @property
    def info(self) -> EngineInfo:
        return EngineInfo(name="qwen3-vl", model="/srv/private/models/Qwen3-VL-2B-Instruct")


async def test_help_and_commands_registered(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path, engine=FolderModelEngine()) as h:
        await fake.push(h.text("/help"))
        await fake.wait_for(lambda: len(fake.texts(ALICE)) == 1)
    shown = fake.texts(ALICE)[0]
    assert "Model: Qwen3-VL-2B-Instruct." in shown and "/srv" not in shown  # a name, not a path
    assert "10 MiB" in shown
    for command in ("/ask", "/export", "/reset", "/cancel", "/describe", "/ocr", "/extract",
                    "/triage"):
        assert command in shown, command
    registered = [c.params for c in fake.calls if c.method == "setMyCommands"]
    assert {c.get("language_code") for c in registered} == {None, "zh"}
    names = {x["command"] for x in registered[0]["commands"]}
    assert names == {"ask", "help", "reset", "cancel", "export", "usage", "start"}


async def test_an_unknown_command_is_named_not_asked(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path) as h:
        await fake.push(h.text("/frobnicate the receipt"))
        await fake.wait_for(lambda: len(fake.texts(ALICE)) == 1)
        group_plain = h.text("/frobnicate", chat=GROUP)  # maybe another bot's: not ours to answer
        group_ours = h.text("/frobnicate@vlbot_test_bot", chat=GROUP)
        await fake.push(group_plain)
        await fake.push(group_ours)
        await fake.wait_for(lambda: len(fake.texts(GROUP)) == 1)
        await fake.push(h.photo(RED, "/describe"))  # a preset is no unknown command
        await fake.wait_for(lambda: len(h.engine.calls) == 1)
    shown = fake.texts(ALICE)[0]
    assert shown.startswith("I don't know the command /frobnicate.")
    for command in ("/ask", "/help", "/export", "/reset", "/cancel", "/triage"):
        assert command in shown, command
    assert fake.texts(GROUP)[0].startswith("I don't know the command /frobnicate.")
    replied_to = [c.params["reply_parameters"]["message_id"] for c in fake.calls_to(GROUP)]
    assert replied_to == [group_ours["message"]["message_id"]]
    assert len(h.engine.calls[0].message.images) == 1  # only the /describe photo was asked


# --- access, language, logs ---------------------------------------------------------------------


async def test_user_outside_the_allowlist_is_refused(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path, allowed_users=[999]) as h:
        await fake.push(h.photo(RED, "q"))
        await h.wait_text(ALICE, "Sorry, this bot is private.")
    assert h.engine.calls == [] and fake.downloads == []


async def test_rate_limit_per_user(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path, rate_limit_per_minute=2) as h:
        for i in range(4):
            await fake.push(h.text(f"question {i}"))
        await h.wait_done(2)
        await asyncio.sleep(0.3)
    refusals = [t for t in fake.texts(ALICE) if t.startswith("You're sending messages too fast")]
    assert len(refusals) == 1 and len(h.engine.calls) == 2


async def test_chinese_user_gets_chinese_texts(fake: FakeTelegram, tmp_path: Path) -> None:
    async with running(fake, tmp_path, engine=ScriptedEngine(hang=True)) as h:
        await fake.push(h.photo(RED, "这是什么？", lang="zh-hans"))
        await h.wait_text(ALICE, "思考中…")
        await fake.push(h.text("/cancel", lang="zh-hans"))
        await h.wait_text(ALICE, "已取消。")
        await fake.push(h.text("/help", lang="zh-hans"))
        await fake.wait_for(lambda: any("模型：script" in t for t in fake.texts(ALICE)))


async def test_the_token_is_in_no_log_line(
    fake: FakeTelegram, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(fake, tmp_path) as h:
        await fake.push(h.photo(RED, "q"))
        await h.wait_done(1)
    assert caplog.records, "nothing was logged: the assertion below would prove nothing"
    assert any("getUpdates" in r.getMessage() for r in caplog.records)  # PTB debug logs were seen
    leaked = [r.getMessage() for r in caplog.records if TOKEN in r.getMessage()]
    assert leaked == []
    assert TOKEN.split(":")[1] not in caplog.text


async def test_export_sends_the_chat_as_markdown_and_json(fake: FakeTelegram, tmp_path: Path) -> None:
    import json

    async with running(fake, tmp_path) as h:
        await fake.push(h.text("/export"))
        await h.wait_text(ALICE, "There is nothing stored for this chat yet.")
        await fake.push(h.photo(RED, "what is the total?"))
        await h.wait_done(1)
        await fake.push(h.text("/export"))
        await fake.wait_for(lambda: len(fake.documents) == 2)
    (_, md_name, md), (_, json_name, raw) = fake.documents
    assert (md_name, json_name) == ("conversation.md", "conversation.json")
    markdown = md.decode()
    assert "what is the total?" in markdown and ANSWER in markdown and "![" in markdown
    data = json.loads(raw)
    assert [t["role"] for t in data["turns"]] == ["user", "assistant"]
    assert data["turns"][0]["parts"][0]["size"] == len(RED)
