"""Shared harness for the Telegram adapter tests: the fake Bot API server, update builders from
the recorded-shape fixtures, and a running adapter + real core + scripted engine."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from adapters.telegram import TelegramAdapter
from adapters.telegram.replies import utf16_len
from bot.admin import AdminPolicy
from bot.models import Turn
from bot.settings import Settings, TelegramSettings
from tests.conftest import CoreStack, make_core
from tests.fake_telegram import BOT_ID, BOT_USERNAME, TOKEN, Call, FakeTelegram, fixture
from tests.fakes import ScriptedEngine

ALICE = 111
GROUP = -1001234567890
ANSWER = "The total is 42.50 EUR, paid by card on 3 March at the corner cafe."


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG")
    return out.getvalue()


RED, GREEN, BLUE = jpeg((200, 20, 20)), jpeg((20, 200, 20)), jpeg((20, 20, 200))


@dataclass
class Harness:
    fake: FakeTelegram
    adapter: TelegramAdapter
    stack: CoreStack

    @property
    def engine(self) -> ScriptedEngine:
        return self.stack.engine

    # --- building updates from the recorded-shape fixtures ------------------------------------

    def photo(self, data: bytes, caption: str | None = None, *, chat: int = ALICE, user: int = ALICE,
              lang: str = "en", name: str = "photo_private.json") -> dict[str, Any]:
        update = fixture(name)
        msg = update["message"]
        self._who(msg, chat, user, lang)
        for size in msg["photo"][:-1]:
            size["file_id"], size["file_unique_id"] = self.fake.add_file(b"thumbnail bytes")
        largest = msg["photo"][-1]
        largest["file_id"], largest["file_unique_id"] = self.fake.add_file(data)
        largest["file_size"] = len(data)
        if caption is None:
            msg.pop("caption", None)
            msg.pop("caption_entities", None)
        else:
            msg["caption"] = caption
            mention = "@" + BOT_USERNAME
            at = caption.find(mention)
            msg["caption_entities"] = [
                {"offset": utf16_len(caption[:at]), "length": len(mention), "type": "mention"}
            ] if at >= 0 else []
        return update

    def document(self, data: bytes, file_name: str, mime: str, caption: str | None = "what is this?",
                 size: int | None = None) -> dict[str, Any]:
        update = fixture("document_heic.json")
        msg = update["message"]
        self._who(msg, ALICE, ALICE, "en")
        doc = msg["document"]
        # the Bot API names stored files itself (documents/file_N.ext), never by the user's name
        suffix = Path(file_name).suffix if "/" not in file_name else ".bin"
        doc["file_id"], doc["file_unique_id"] = self.fake.add_file(data, f"documents/file{suffix}")
        doc.update(file_name=file_name, mime_type=mime, file_size=size or len(data))
        if caption is None:
            msg.pop("caption")
        else:
            msg["caption"] = caption
        return update

    def text(self, text: str, *, chat: int = ALICE, user: int = ALICE, lang: str = "en",
             reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
        update = fixture("text_private.json")
        msg = update["message"]
        self._who(msg, chat, user, lang)
        msg["text"] = text
        if text.startswith("/"):
            command = text.split()[0]
            msg["entities"] = [{"offset": 0, "length": utf16_len(command), "type": "bot_command"}]
        if reply_to is not None:
            msg["reply_to_message"] = reply_to
        return update

    @staticmethod
    def _who(msg: dict[str, Any], chat: int, user: int, lang: str) -> None:
        msg["date"] = int(time.time())
        msg["from"].update(id=user, language_code=lang)
        if chat < 0:
            msg["chat"] = {"id": chat, "title": "Receipts team", "type": "supergroup"}
        else:
            msg["chat"]["id"] = chat

    def bot_message(self, chat: int, message_id: int) -> dict[str, Any]:
        m = self.fake.messages[(chat, message_id)]
        return {"message_id": message_id, "date": int(time.time()), "text": m.text,
                "chat": {"id": chat, "type": "private" if chat > 0 else "supergroup", "title": "G"},
                "from": {"id": BOT_ID, "is_bot": True, "first_name": "vlbot", "username": BOT_USERNAME}}

    # --- waiting for what the user sees -------------------------------------------------------

    async def wait_text(self, chat: int, text: str, timeout: float = 10.0) -> None:
        await self.fake.wait_for(lambda: text in self.fake.texts(chat), timeout)

    async def wait_done(self, n: int, timeout: float = 10.0) -> None:
        async def done() -> None:
            while (await self.stack.jobs.counts()).get("done", 0) < n:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

        await asyncio.wait_for(done(), timeout)


def make_settings(fake: FakeTelegram, tmp_path: Path, **telegram: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        max_concurrency=1,
        max_image_mb=10,
        telegram=TelegramSettings(token=SecretStr(TOKEN), base_url=fake.base_url,
                                  base_file_url=fake.base_file_url, **telegram),
    )


@pytest.fixture(name="fake")
async def fake_server() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    await server.start()
    yield server
    await server.stop()


@asynccontextmanager
async def running(fake: FakeTelegram, tmp_path: Path, engine: ScriptedEngine | None = None,
                  adapter_kw: dict[str, float] | None = None, **telegram: Any) -> AsyncIterator[Harness]:
    kw = {"edit_interval_s": 0.1, "group_edit_interval_s": 0.3, "album_wait_s": 0.3,
          "poll_timeout_s": 2.0, **(adapter_kw or {})}
    settings = make_settings(fake, tmp_path, **telegram)
    adapter = TelegramAdapter(settings, **kw)
    engine = engine or ScriptedEngine(reply=lambda h, m: ANSWER, delay_s=0.03)
    stack = await make_core(tmp_path / "vlbot.sqlite3", [adapter], engine,  # settings' allowlists
                            admin_policy=AdminPolicy.from_settings(settings), max_concurrency=1,
                            retry_backoff_s=0.01)
    try:
        yield Harness(fake, adapter, stack)
    finally:
        await adapter.stop()
        await stack.close()


def transcript(calls: Sequence[Call], since: float) -> str:
    return "\n".join(f"  +{(c.at - since) * 1000:6.0f} ms  {c!r}" for c in calls)


def image_shas(turns: Sequence[Turn]) -> list[str]:
    return [i.sha256 for t in turns for i in t.images]


