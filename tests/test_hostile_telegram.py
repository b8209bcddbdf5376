"""The hostile-input corpus sent to the Telegram adapter as documents (albums for several files),
all at once from different chats: each chat gets an answer or its specific refusal."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapters.telegram.media import DOWNLOAD_TRIES
from bot import texts
from tests.fake_telegram import FakeTelegram
from tests.hostile import CASES, DecodingEngine
from tests.telegram_harness import fake_server, running

__all__ = ["fake_server"]

PLACEHOLDERS = ("thinking", "queued")


async def test_hostile_documents_through_telegram(fake: FakeTelegram, tmp_path: Path) -> None:
    cases = [c for c in CASES if "no-file" not in c.tags]  # Telegram has no empty message
    chats = {1000 + i: case for i, case in enumerate(cases)}
    async with running(fake, tmp_path, engine=DecodingEngine(), rate_limit_per_minute=100) as h:
        for chat, case in chats.items():
            for i, f in enumerate(case.files):
                update = h.document(f.data, f.name, f.mime, caption=case.text if i == 0 else None)
                message = update["message"]
                h._who(message, chat, chat, "en")
                if len(case.files) > 1:
                    message["media_group_id"] = f"album-{chat}"
                await fake.push(update)

        def settled() -> bool:
            return all(
                (shown := fake.texts(chat)) and not shown[-1].startswith(PLACEHOLDERS)
                for chat in chats
            )

        await fake.wait_for(settled, timeout=60)
    for chat, case in chats.items():
        shown = fake.texts(chat)
        assert len(shown) == 1, (case.name, shown)  # one reply, nothing duplicated
        if case.expect == "answer":
            assert shown[0].startswith("I see"), (case.name, shown)
            if case.name == "ten-images":
                assert shown[0].count("x") == 10
        else:
            prefix = texts.CATALOGUE["en"][case.expect].split("{")[0].strip()
            assert shown[0].startswith(prefix), (case.name, shown)
        assert "Traceback" not in shown[0]


async def test_a_getfile_5xx_is_retried_and_the_photo_answered(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    from tests.hostile import jpeg

    async with running(fake, tmp_path, engine=DecodingEngine()) as h:
        fake.fail_next("getFile", 503, times=2)
        await fake.push(h.document(jpeg(), "photo.jpg", "image/jpeg"))
        await h.wait_done(1, timeout=30)
    assert [c.status for c in fake.calls if c.method == "getFile"] == [503, 503, 200]
    shown = fake.texts(111)
    assert len(shown) == 1 and shown[0].startswith("I see"), shown


async def test_a_download_that_keeps_failing_still_gets_a_reply(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    from tests.hostile import jpeg

    async with running(fake, tmp_path, engine=DecodingEngine()) as h:
        fake.fail_next("getFile", 500, times=DOWNLOAD_TRIES)
        await fake.push(h.document(jpeg(), "photo.jpg", "image/jpeg"))
        await fake.wait_for(lambda: bool(fake.texts(111)), timeout=30)
        assert fake.texts(111)[0].startswith("Sorry, that failed, please try again.")
        assert [c.status for c in fake.calls if c.method == "getFile"] == [500] * DOWNLOAD_TRIES
        await fake.push(h.document(jpeg(), "photo.jpg", "image/jpeg"))  # and it keeps serving
        await fake.wait_for(lambda: fake.texts(111)[-1].startswith("I see"), timeout=30)


async def test_connection_resets_while_downloading_and_sending(fake: FakeTelegram, tmp_path: Path) -> None:
    from tests.fake_telegram import RESET
    from tests.hostile import jpeg

    async with running(fake, tmp_path, engine=DecodingEngine()) as h:
        fake.fail_next("getFile", RESET)  # the download's connection drops: tried again
        await fake.push(h.document(jpeg(), "photo.jpg", "image/jpeg"))
        await h.wait_done(1, timeout=30)
        assert fake.texts(111)[0].startswith("I see")

        fake.fail_next("editMessageText", RESET, times=2)  # and while the answer is sent
        await fake.push(h.document(jpeg(), "again.jpg", "image/jpeg"))
        await h.wait_done(2, timeout=60)
        shown = fake.texts(111)
        assert len(shown) == 2 and shown[1].startswith("I see"), shown  # complete, once
    assert [c.method for c in fake.calls if c.status == RESET] == [
        "getFile", "editMessageText", "editMessageText"]


async def test_text_and_captions_that_are_not_valid_unicode_get_a_clear_reply(
    fake: FakeTelegram, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lone UTF-16 surrogate ("\\ud800" in the update's JSON) in a question or a caption."""
    from tests.hostile import jpeg

    caplog.set_level(logging.INFO)
    async with running(fake, tmp_path, engine=DecodingEngine()) as h:
        await fake.push(h.text("what is \ud800 this?"))
        await fake.push(h.photo(jpeg(), "caption \udc00 here"))
        await fake.wait_for(lambda: len(fake.texts(111)) == 2, timeout=30)
        await fake.push(h.text("still there?"))  # and it keeps serving
        await fake.wait_for(lambda: len(fake.texts(111)) == 3, timeout=30)
    prefix = texts.CATALOGUE["en"]["invalid_text"]
    assert fake.texts(111)[:2] == [prefix, prefix]
    assert not fake.texts(111)[2].startswith(prefix)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
