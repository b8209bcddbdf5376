"""The hostile-input corpus sent to the Slack adapter as mentions with files, each in its own
thread, all at once: each thread gets an answer or its specific refusal, once. Then the hostile
texts and bodies: lone UTF-16 surrogates (JSON escapes) wherever a person's text arrives, request
bodies that are not UTF-8 or are nested past the recursion limit, signed or not, attachments that
are not images: each gets a clear reply or a 4xx, never a 5xx, an ERROR log or the text in a log."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from adapters.slack.format import escape
from bot import texts
from tests.fake_slack import FakeSlack
from tests.hostile import CASES, DecodingEngine
from tests.slack_helpers import (
    BLUE,
    CHANNEL,
    answered,
    dm,
    fake_slack,  # noqa: F401 (the fixture)
    mention,
    open_env,
    signed,
    thread_reply,
)

PLACEHOLDERS = ("queued", "thinking")


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


async def test_hostile_texts_and_bodies_through_slack(
    fake: FakeSlack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    invalid = escape(texts.text("invalid_text"))
    env = await open_env(tmp_path, fake)
    try:
        first = mention(fake, "<@U0BOT> what is this?", [fake.add_file(BLUE)])
        await env.event(first)
        await answered(fake, first)
        thread = first["event"]["ts"]
        texts_sent = {  # where a reply lands -> the event carrying a lone surrogate
            ("C0HOSTILE", "high"): mention(fake, "<@U0BOT> pelican \ud800", channel="C0HOSTILE"),
            ("C0HOSTILE", "low"): mention(fake, "<@U0BOT> pelican \udc00 x", channel="C0HOSTILE"),
            ("C0HOSTILE", "swapped"): mention(fake, "<@U0BOT> pelican \udc00\ud800", channel="C0HOSTILE"),
            ("D0ALICE", "dm"): dm(fake, "pelican \udfff"),
            (CHANNEL, "thread"): thread_reply(fake, "pelican \ud83d alone", thread),
        }
        for payload in texts_sent.values():
            assert "\\ud" in json.dumps(payload)  # sent as JSON escapes, as a hostile client would
            assert await env.event(payload) == 200
        nested = '{"type": "event_callback", "event": ' + "[" * 100_000 + "]" * 100_000 + "}"
        not_utf8 = '{"type": "event_callback", "event": {"type": "message", "text": "\xff\xfe"}}'
        statuses = []
        for body, headers in ((nested, signed(nested)), (nested, {}), (not_utf8, signed(not_utf8)),
                              (not_utf8, {})):
            async with env.http.post(env.url, data=body.encode("latin-1"),
                                     headers={"Content-Type": "application/json", **headers}) as resp:
                statuses.append(resp.status)
        assert statuses == [400, 400, 400, 400]

        def replies() -> list[str]:
            out = [m["text"] for key, p in texts_sent.items() if key[0] == "C0HOSTILE"
                   for m in fake.thread("C0HOSTILE", p["event"]["ts"])]
            out += [m["text"] for m in fake.messages["D0ALICE"] if m.get("bot_id")]
            return out + [m["text"] for m in fake.thread(CHANNEL, thread) if m.get("bot_id")][1:]

        await fake.wait_for(lambda: len(replies()) == 5)
        assert replies() == [invalid] * 5
        assert len(env.engine.calls) == 1
    finally:
        await env.close()
    assert "pelican" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
