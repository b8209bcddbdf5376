"""Telegram with replicas on one Postgres: long polling has a single consumer (Telegram hands
each update to one getUpdates caller), so a second replica that would poll says so and does not;
webhook mode is for replicas."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapters.telegram import TelegramAdapter
from tests.conftest import make_core
from tests.fake_telegram import FakeTelegram
from tests.fakes import ScriptedEngine
from tests.telegram_harness import fake_server, make_settings

__all__ = ["fake_server"]


async def test_a_second_long_poller_on_one_database_refuses_clearly(
    fake: FakeTelegram, tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(fake, tmp_path, mode="polling")
    settings.database_url = postgres_url
    first, second, third = (TelegramAdapter(settings, poll_timeout_s=0.5) for _ in range(3))
    one = await make_core(postgres_url, [first], ScriptedEngine())  # type: ignore[arg-type]
    two = await make_core(postgres_url, [second], ScriptedEngine())  # type: ignore[arg-type]
    try:
        assert first.app is not None and first.app.updater is not None
        assert first.app.updater.running
        assert second.app is not None and second.app.updater is not None
        assert not second.app.updater.running
        refusal = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert any("already long-polling" in r.getMessage() and "webhook" in r.getMessage()
                   for r in refusal)
        await first.stop()  # the first poller leaves: a replica started now may poll
        three = await make_core(postgres_url, [third], ScriptedEngine())  # type: ignore[arg-type]
        try:
            assert third.app is not None and third.app.updater is not None
            assert third.app.updater.running
        finally:
            await third.stop()
            await three.close()
    finally:
        await second.stop()
        await first.stop()
        await one.close()
        await two.close()
