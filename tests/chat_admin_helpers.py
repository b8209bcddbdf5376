"""The whole app (bot/app.py's App: the admin service, quota admission, usage ledger) around one
chat adapter and its fake platform server, started and restarted on the same SQLite file; an
engine whose "slow" questions wait for a gate (to hold a job running); slash commands from any
Slack user."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from adapters.slack import SlackAdapter
from adapters.telegram import TelegramAdapter
from bot import texts
from bot.admin_types import next_reset, reset_text
from bot.app import App
from bot.models import GenerationParams, Message, Turn
from bot.settings import QuotaSettings, Settings, SlackSettings
from tests.conftest import CoreStack
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.fakes import ScriptedEngine
from tests.slack_helpers import APP_TOKEN, BOT_TOKEN, CHANNEL, SIGNING_SECRET, Env, fixture, signed
from tests.telegram_harness import Harness, make_settings

_triggers = itertools.count(1)


@dataclass
class GatedEngine(ScriptedEngine):
    """A scripted engine whose questions containing "slow" wait until `gate` is set."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0  # questions waiting at the gate now

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        if "slow" in (message.text or ""):
            self.held += 1
            try:
                await self.gate.wait()
            finally:
                self.held -= 1
        async for piece in super().stream(history, message, params):
            yield piece


def with_quota(settings: Settings, **quota: Any) -> Settings:
    """`settings` with default quotas and two jobs at once (one may be held by a gate)."""
    return settings.model_copy(update={"quota": QuotaSettings(**quota), "max_concurrency": 2})


def telegram_settings(fake: FakeTelegram, tmp_path: Path, quota: dict[str, Any] | None = None,
                      **telegram: Any) -> Settings:
    return with_quota(make_settings(fake, tmp_path, **telegram), **(quota or {}))


def slack_settings(fake: FakeSlack, tmp_path: Path, quota: dict[str, Any] | None = None,
                   **slack: Any) -> Settings:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        slack=SlackSettings.model_validate({
            "bot_token": BOT_TOKEN, "signing_secret": SIGNING_SECRET, "app_token": APP_TOKEN,
            "mode": "http", "port": 0, "base_url": fake.api_url,
        } | slack),
    )
    return with_quota(settings, **(quota or {}))


def stack_of(app: App, engine: ScriptedEngine) -> CoreStack:
    assert app.db is not None and app.runner is not None and app.core is not None
    return CoreStack(app.db, app.core.history, app.runner.jobs, app.runner, app.core, engine)


@asynccontextmanager
async def telegram_app(fake: FakeTelegram, settings: Settings, engine: ScriptedEngine
                       ) -> AsyncIterator[Harness]:
    adapter = TelegramAdapter(settings, edit_interval_s=0.1, group_edit_interval_s=0.3,
                              album_wait_s=0.3, poll_timeout_s=2.0)
    app = App(settings, engine, adapters=[adapter])
    await app.start()
    try:
        yield Harness(fake, adapter, stack_of(app, engine))
    finally:
        await app.stop()


@asynccontextmanager
async def slack_app(fake: FakeSlack, settings: Settings, engine: ScriptedEngine) -> AsyncIterator[Env]:
    adapter = SlackAdapter(settings, update_interval_s=0.1)
    app = App(settings, engine, adapters=[adapter])
    await app.start()
    http = aiohttp.ClientSession()
    try:
        yield Env(fake, adapter, stack_of(app, engine), engine, http)
    finally:
        await http.close()
        await app.stop()


async def slash(env: Env, text: str, user: str = "U0ALICE", channel: str = CHANNEL) -> str:
    """A signed slash command from `user`; the text of its (ephemeral) acknowledgement."""
    fields = fixture("slash_command.json") | {
        "text": text, "channel_id": channel, "user_id": user, "user_name": user.lower(),
        "response_url": f"{env.fake.base_url}/response/r1", "trigger_id": f"admin-{next(_triggers)}",
    }
    body = urlencode(fields)
    status, reply = await env.post(body, "application/x-www-form-urlencoded", signed(body), "slash")
    assert status == 200, reply
    return str(json.loads(reply).get("text", ""))


async def job_total(stack: CoreStack) -> int:
    """Every job the store holds, whatever its status."""
    return sum((await stack.jobs.counts()).values())


def quota_refusal(code: str, lang: str | None = None, **params: Any) -> set[str]:
    """The refusal a user should read, with the reset named (either side of a UTC midnight)."""
    now = time.time()
    return {texts.text(code, lang, resets=reset_text(next_reset(at)), **params) for at in (now, now + 5)}
