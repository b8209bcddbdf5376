"""Helpers for the Slack tests: an adapter + real core around a FakeSlack, signed requests,
and recorded-shape event payloads (tests/fixtures/slack)."""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import itertools
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from PIL import Image

from adapters.slack import SlackAdapter
from bot.admin import AdminPolicy
from bot.models import Message, Turn
from bot.remote_images import RemoteImageFetcher
from bot.settings import Settings, SlackSettings
from tests.conftest import CoreStack, make_core
from tests.fake_slack import FakeSlack
from tests.fakes import ScriptedEngine

BOT_TOKEN = "xoxb-1111-2222-fakeBotTokenSECRET"
APP_TOKEN = "xapp-1-A0APP-3333-fakeAppTokenSECRET"
SIGNING_SECRET = "8f742231b10e8888abcd99fakeSIGNING"
FIXTURES = Path(__file__).parent / "fixtures" / "slack"
CHANNEL = "C0GENERAL"
ACK_TIMES: dict[str, list[float]] = {}
_event_ids = itertools.count(100)


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "PNG")
    return buf.getvalue()


RED, BLUE = png((200, 30, 30)), png((30, 30, 200))


def sha8(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


def describe(history: Sequence[Turn], message: Message) -> str:
    """A scripted answer that says which image it saw (the latest in the turn or history)."""
    seen = [i.sha256[:8] for t in history for i in t.images] + [i.sha256[:8] for i in message.images]
    image = seen[-1] if seen else "none"
    return (f"image {image}: about {message.text!r} the answer is that a < b & c > d, "
            "and here are a few more words to stream one two three four five six seven eight")


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def signed(body: str, secret: str = SIGNING_SECRET, ts: float | None = None) -> dict[str, str]:
    stamp = str(int(time.time() if ts is None else ts))
    digest = hmac.new(secret.encode(), f"v0:{stamp}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={digest}"}


@dataclass
class Env:
    fake: FakeSlack
    adapter: SlackAdapter
    stack: CoreStack
    engine: ScriptedEngine
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.http_port}/slack/events"

    async def post(self, body: str, content_type: str, headers: dict[str, str], kind: str
                   ) -> tuple[int, str]:
        started = time.monotonic()
        async with self.http.post(self.url, data=body.encode(),
                                  headers={"Content-Type": content_type, **headers}) as resp:
            text = await resp.text()
        elapsed = time.monotonic() - started
        if resp.status == 200:
            ACK_TIMES.setdefault(kind, []).append(elapsed)
            assert elapsed < 3.0, f"{kind} acked after {elapsed:.2f} s"
        return resp.status, text

    async def event(self, payload: dict[str, Any], retry: int | None = None) -> int:
        body = json.dumps(payload)
        headers = signed(body)
        if retry:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        status, _ = await self.post(body, "application/json", headers, "event")
        return status

    async def command(self, text: str, channel: str = CHANNEL) -> dict[str, Any]:
        fields = fixture("slash_command.json") | {
            "text": text, "channel_id": channel, "response_url": f"{self.fake.base_url}/response/r1",
            "trigger_id": f"trigger-{next(_event_ids)}",
        }
        body = urlencode(fields)
        form = "application/x-www-form-urlencoded"
        status, reply = await self.post(body, form, signed(body), "slash command")
        assert status == 200
        data: dict[str, Any] = json.loads(reply)
        return data

    async def close(self) -> None:
        await self.adapter.stop()
        await self.stack.close()
        await self.http.close()


async def open_env(tmp_path: Path, fake: FakeSlack, engine: ScriptedEngine | None = None,
                   runner_kw: dict[str, Any] | None = None, fetcher: RemoteImageFetcher | None = None,
                   **slack: Any) -> Env:
    settings = Settings(
        data_dir=tmp_path,
        slack=SlackSettings.model_validate({
            "bot_token": BOT_TOKEN, "signing_secret": SIGNING_SECRET, "app_token": APP_TOKEN,
            "mode": "http", "port": 0, "base_url": fake.api_url,
        } | slack),
    )
    adapter = SlackAdapter(settings, update_interval_s=0.1, fetcher=fetcher)
    engine = engine or ScriptedEngine(reply=describe, delay_s=0.02)
    stack = await make_core(tmp_path / "vlbot.sqlite3", [adapter], engine,  # settings' allowlists
                            admin_policy=AdminPolicy.from_settings(settings), **(runner_kw or {}))
    return Env(fake, adapter, stack, engine, aiohttp.ClientSession())


def mention(fake: FakeSlack, text: str, files: list[dict[str, Any]] | None = None,
            thread_ts: str | None = None, channel: str = CHANNEL, user: str = "U0ALICE") -> dict[str, Any]:
    """An app_mention envelope (recorded shape) for a message the fake also keeps in history."""
    payload = copy.deepcopy(fixture("app_mention.json"))
    msg = fake.add_user_message(channel, text, user, files, thread_ts)
    payload["event"].update(text=text, ts=msg["ts"], event_ts=msg["ts"], channel=channel, user=user,
                            files=files or [])
    if thread_ts:
        payload["event"]["thread_ts"] = thread_ts
    payload["event_id"] = f"Ev{next(_event_ids):08d}"
    return payload


def thread_reply(fake: FakeSlack, text: str, thread_ts: str, files: list[dict[str, Any]] | None = None,
                 user: str = "U0ALICE") -> dict[str, Any]:
    """A plain `message` event (no mention) in a channel thread, as message.channels delivers it."""
    payload = mention(fake, text, files, thread_ts=thread_ts, user=user)
    payload["event"] |= {"type": "message", "channel_type": "channel"}
    if files:
        payload["event"]["subtype"] = "file_share"
    return payload


def dm(fake: FakeSlack, text: str, files: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    payload = copy.deepcopy(fixture("message_im.json"))
    msg = fake.add_user_message("D0ALICE", text, files=files)
    payload["event"].update(text=text, ts=msg["ts"], event_ts=msg["ts"], files=files or [])
    if not files:
        del payload["event"]["subtype"], payload["event"]["files"], payload["event"]["upload"]
    payload["event_id"] = f"Ev{next(_event_ids):08d}"
    return payload


def done(fake: FakeSlack, channel: str, ts: str) -> bool:
    return "white_check_mark" in fake.reactions.get((channel, ts), set())


async def answered(fake: FakeSlack, payload: dict[str, Any]) -> None:
    event = payload["event"]
    await fake.wait_for(lambda: done(fake, event["channel"], event["ts"]))


async def _serve_fake_slack() -> AsyncIterator[FakeSlack]:
    server = await FakeSlack(BOT_TOKEN, APP_TOKEN).start()
    yield server
    await server.close()


# The fake Slack server on port 0, under the two names the test modules use; a module imports
# the one it asks for (pytest finds fixtures by the module's names).
fake_slack = pytest.fixture(name="fake")(_serve_fake_slack)
fake_slack_as_slack = pytest.fixture(name="slack")(_serve_fake_slack)
