"""Auto-triage channels on Slack, end to end: the whole app (bot/app.py: runner, SQLite, the
triage workflow with a routing rule) with real bolt behind the adapter's HTTP server, signed
Events API payloads of the recorded shapes (message.channels: a file share, a plain text
message), the fake Slack's Web API, and a scripted engine that answers the triage preset's JSON
per screenshot (tests/triage_helpers.py)."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.slack.auto_triage import PostRefused
from adapters.slack.format import escape
from bot.adapter import Poster
from bot.settings import TriageSettings
from tests.chat_admin_helpers import slack_app, slack_settings
from tests.fake_slack import FakeSlack
from tests.slack_helpers import (
    BLUE,
    CHANNEL,
    RED,
    Env,
    answered,
    fake_slack,  # noqa: F401 (the fixture)
    fixture,
    mention,
    png,
)
from tests.triage_helpers import TriageScript, triage_json

SUPPORT = "C0SUPPORT"
ONCALL = "C0ONCALL"
_event_ids = itertools.count(1)


def posted(fake: FakeSlack, text: str, image: bytes | None = None, channel: str = SUPPORT,
           thread_ts: str | None = None, user: str = "U0AGENT") -> dict[str, Any]:
    """A `message` event as message.channels delivers it (a file share when `image` is given),
    for a message the fake also keeps in the channel's history."""
    if image is None:
        payload = copy.deepcopy(fixture("message_channel_text.json"))
        files: list[dict[str, Any]] = []
    else:
        payload = copy.deepcopy(fixture("message_channel_file_share.json"))
        files = [fake.add_file(image, "screenshot.png")]
    msg = fake.add_user_message(channel, text, user, files, thread_ts)
    payload["event"].update(text=text, ts=msg["ts"], event_ts=msg["ts"], channel=channel, user=user)
    if files:
        payload["event"]["files"] = files
    if thread_ts:
        payload["event"]["thread_ts"] = thread_ts
    payload["event_id"] = f"Ev0TRIAGE{next(_event_ids):04d}"
    return payload


@pytest.fixture
def script() -> TriageScript:
    s = TriageScript()
    s.add(RED, triage_json("blocker", "Checkout", "Payment failed for order 81723 at 10:31:07",
                           "PAY-402"))
    s.add(BLUE, triage_json("minor", "Profile", "Avatar upload is slow"))
    return s


TRIAGE = {"slack_channels": [SUPPORT],
          "rules": [{"when": {"severity": ["blocker"]}, "post_to": f"slack:{ONCALL}"}]}


@pytest.fixture
async def env(tmp_path: Path, fake: FakeSlack, script: TriageScript) -> AsyncIterator[Env]:
    """The app with one auto-triage channel and a rule: blockers also go to on-call."""
    settings = slack_settings(fake, tmp_path).model_copy(
        update={"triage": TriageSettings.model_validate(TRIAGE)})
    async with slack_app(fake, settings, script.engine()) as e:
        yield e


async def job_origins(env: Env) -> list[dict[str, Any]]:
    rows = await env.stack.db.fetchall("SELECT id FROM jobs ORDER BY seq", ())
    jobs = [await env.stack.jobs.get(str(row["id"])) for row in rows]
    return [dict(job.origin) for job in jobs if job is not None]


def _text(message: dict[str, Any]) -> str:
    return str(message["text"])


async def test_an_image_in_a_triage_channel_gets_one_triage_reply_in_its_thread(
    env: Env, script: TriageScript
) -> None:
    payload = posted(env.fake, "customer sent this from the checkout page", RED)
    assert await env.event(payload) == 200
    await answered(env.fake, payload)

    ts = payload["event"]["ts"]
    replies = env.fake.thread(SUPPORT, ts)
    assert len(replies) == 1, "exactly one reply, in the image's thread"
    answer = _text(replies[0])
    # readable first: the severity and the error as labelled lines ...
    assert "Severity: blocker" in answer and "Area: Checkout" in answer
    assert "Error: Payment failed for order 81723 at 10:31:07" in answer
    # ... and the JSON kept, as a code block Slack shows as such
    fenced = answer.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(fenced)["severity"] == "blocker"
    assert len(script.seen) == 1
    [origin] = await job_origins(env)
    assert origin["preset"] == "triage" and origin["auto_triage"] is True
    assert origin["link"] == f"https://fake.slack.com/archives/{SUPPORT}/p{ts.replace('.', '')}"
    asked = env.engine.calls[0].message
    assert "customer sent this from the checkout page" in (asked.text or "")


async def test_other_channels_and_text_only_messages_are_left_alone(
    env: Env, script: TriageScript
) -> None:
    elsewhere = posted(env.fake, "look at this", BLUE, channel=CHANNEL)
    chatter = posted(env.fake, "anyone else seeing checkout errors?")
    pdf = posted(env.fake, "the invoice", RED)  # a file Slack describes only by its id
    stored = env.fake.files[pdf["event"]["files"][0]["id"]]
    stored.mimetype, stored.name = "application/pdf", "invoice.pdf"
    pdf["event"]["files"] = [{"id": stored.id, "file_access": "check_file_info"}]
    for payload in (elsewhere, chatter, pdf):
        assert await env.event(payload) == 200
    first = posted(env.fake, "", RED)
    await env.event(first)
    await answered(env.fake, first)
    in_thread = posted(env.fake, "I asked them to retry", thread_ts=first["event"]["ts"])
    await env.event(in_thread)
    # an image in the thread is triaged too; everything posted before it is handled by then
    marker = posted(env.fake, "", BLUE, thread_ts=first["event"]["ts"])
    await env.event(marker)
    await answered(env.fake, marker)

    assert len(script.seen) == 2, "only the two images in the triage channel were triaged"
    assert not any(m.get("bot_id") for m in env.fake.messages[CHANNEL]), "nothing elsewhere"
    assert not env.fake.reactions.get((CHANNEL, elsewhere["event"]["ts"]))
    assert env.fake.called("files.info") and env.fake.thread(SUPPORT, pdf["event"]["ts"]) == []
    bot_posts = [m for m in env.fake.messages[SUPPORT] if m.get("bot_id")]
    assert len(bot_posts) == 2 and {m["thread_ts"] for m in bot_posts} == {first["event"]["ts"]}
    links = [origin["link"] for origin in await job_origins(env)]
    assert links[1].endswith(f"?thread_ts={first['event']['ts']}&cid={SUPPORT}"), links


async def test_a_mention_in_a_triage_channel_is_an_ordinary_question(env: Env) -> None:
    env.engine.reply = lambda history, message: f"plain answer to {message.text}"
    payload = mention(env.fake, "<@U0BOT> what is this?", [env.fake.add_file(png((9, 9, 9)))],
                      channel=SUPPORT)
    await env.event(payload)  # Slack also sends the message.channels copy of a mention
    copy_of_it = copy.deepcopy(payload) | {"event_id": "Ev0COPY0001"}
    copy_of_it["event"] |= {"type": "message", "channel_type": "channel", "subtype": "file_share"}
    await env.event(copy_of_it)
    await answered(env.fake, payload)
    replies = env.fake.thread(SUPPORT, payload["event"]["ts"])
    assert [_text(m) for m in replies] == ["plain answer to what is this?"]


async def test_the_poster_posts_into_a_channel_and_returns_the_link(env: Env) -> None:
    assert isinstance(env.adapter, Poster)
    summary = "Blocker in Checkout: https://fake.slack.com/archives/C0SUPPORT/p1?thread_ts=1&cid=C"
    link = await env.adapter.post(ONCALL, summary)
    [message] = env.fake.messages[ONCALL]
    assert _text(message) == escape(summary) and "thread_ts" not in message
    assert link == f"https://fake.slack.com/archives/{ONCALL}/p{message['ts'].replace('.', '')}"
    env.fake.not_member.add("C0PRIVATE")
    with pytest.raises(PostRefused, match=r"into C0PRIVATE \(not_in_channel\): invite the bot"):
        await env.adapter.post("C0PRIVATE", "nobody will see this")


async def test_a_blocker_reaches_on_call_and_a_repeat_says_how_often_it_was_seen(
    env: Env, script: TriageScript
) -> None:
    first = posted(env.fake, "customer sent this from the checkout page", RED)
    await env.event(first)
    await answered(env.fake, first)
    first_link = f"https://fake.slack.com/archives/{SUPPORT}/p{first['event']['ts'].replace('.', '')}"
    [routed] = env.fake.messages[ONCALL]
    assert "blocker" in routed["text"] and "Checkout" in routed["text"]
    assert f"Original: {first_link}" in routed["text"], "the summary links the original thread"
    assert "Seen" not in _text(env.fake.thread(SUPPORT, first["event"]["ts"])[0])

    minor = posted(env.fake, "", BLUE)  # a minor problem: answered, not routed
    await env.event(minor)
    await answered(env.fake, minor)
    assert len(env.fake.messages[ONCALL]) == 1

    again = png((201, 30, 30))  # another screenshot of the same error: other order id and time
    script.add(again, triage_json("blocker", "Checkout", "Payment failed for order 99102 at 11:02:45",
                                  "PAY-402"))
    repeat = posted(env.fake, "same again, another customer", again)
    await env.event(repeat)
    await answered(env.fake, repeat)
    [reply] = env.fake.thread(SUPPORT, repeat["event"]["ts"])
    assert "Seen 2 times since" in _text(reply) and f"first here: {first_link}" in _text(reply)
    assert "Seen" not in _text(env.fake.thread(SUPPORT, minor["event"]["ts"])[0])
    assert len(env.fake.messages[ONCALL]) == 2
    assert "(seen 2 times)" in env.fake.messages[ONCALL][1]["text"]
    print(f"\nthe repeat's reply in its thread:\n{_text(reply)}\n\non-call channel:\n"
          + "\n---\n".join(_text(m) for m in env.fake.messages[ONCALL]))


def test_an_auto_triage_channel_must_be_given_by_its_id() -> None:
    with pytest.raises(ValidationError, match=r"'#support' is not a Slack channel ID: use the ID"):
        TriageSettings.model_validate({"slack_channels": ["C0SUPPORT", "#support"]})
