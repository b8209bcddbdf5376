"""The hostile-input corpus sent to the Slack adapter as mentions with files, each in its own
thread, all at once: each thread gets an answer or its specific refusal, once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.slack.format import escape
from bot import texts
from tests.fake_slack import FakeSlack
from tests.hostile import CASES, DecodingEngine
from tests.slack_helpers import APP_TOKEN, BOT_TOKEN, CHANNEL, mention, open_env

PLACEHOLDERS = ("queued", "thinking")


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    server = await FakeSlack(BOT_TOKEN, APP_TOKEN).start()
    yield server
    await server.close()


async def test_hostile_files_through_slack(fake: FakeSlack, tmp_path: Path) -> None:
    env = await open_env(tmp_path, fake, engine=DecodingEngine())
    try:
        threads = {}
        for case in CASES:
            files = [fake.add_file(f.data, f.name, f.mime) for f in case.files]
            payload = mention(fake, f"<@U0BOT> {case.text}".strip(), files)
            assert await env.event(payload) == 200
            threads[payload["event"]["ts"]] = case

        def settled() -> bool:
            return all(
                (replies := fake.thread(CHANNEL, ts))
                and not replies[-1]["text"].startswith(PLACEHOLDERS)
                for ts in threads
            )

        await fake.wait_for(settled, timeout=60)
    finally:
        await env.close()
    for ts, case in threads.items():
        replies = [m["text"] for m in fake.thread(CHANNEL, ts)]
        assert len(replies) == 1, (case.name, replies)
        if case.expect == "answer":
            assert replies[0].startswith("I see"), (case.name, replies)
        else:
            prefix = escape(texts.CATALOGUE["en"][case.expect].split("{")[0].strip())
            assert replies[0].startswith(prefix), (case.name, replies)
