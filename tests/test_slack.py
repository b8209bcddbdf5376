"""The Slack adapter against a fake Slack: real bolt, real HTTP, really signed requests.

bolt's AsyncApp runs inside SlackAdapter behind its aiohttp server on port 0; the tests POST
Events API payloads and slash commands signed with the signing secret (v0 HMAC-SHA256, computed
in tests/slack_helpers.py independently of slack_sdk), and the adapter's AsyncWebClient talks to
tests/fake_slack.py. Socket Mode runs for real too: the fake hands out a WebSocket URL from
apps.connections.open and sends envelopes over it. Answers come from a ScriptedEngine through the
real runner and SQLite.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from adapters.slack import SlackAdapter
from adapters.slack.format import escape, split_escaped, strip_mentions
from bot import texts
from bot.adapter import Core
from bot.models import ConversationId, GenerationParams, Message, Turn
from bot.remote_images import RemoteImageFetcher
from bot.settings import Settings, SlackSettings
from tests.fake_slack import FakeSlack
from tests.fakes import ScriptedEngine
from tests.slack_helpers import (
    ACK_TIMES,
    APP_TOKEN,
    BLUE,
    BOT_TOKEN,
    CHANNEL,
    RED,
    SIGNING_SECRET,
    Env,
    answered,
    describe,
    dm,
    fake_slack,  # noqa: F401 (the fixture)
    fixture,
    mention,
    open_env,
    png,
    sha8,
    signed,
    thread_reply,
)

GREEN = png((30, 200, 30))


@pytest.fixture
async def env(tmp_path: Path, fake: FakeSlack) -> AsyncIterator[Env]:
    e = await open_env(tmp_path, fake)
    yield e
    await e.close()


@pytest.fixture(scope="module", autouse=True)
def report_ack_times() -> Any:
    yield
    for kind, times in ACK_TIMES.items():
        print(f"\nack times ({kind}, n={len(times)}): max {max(times) * 1000:.1f} ms, "
              f"mean {sum(times) / len(times) * 1000:.1f} ms")



# --- mentions and threads ---------------------------------------------------------------------


async def test_mention_with_image_gets_a_streamed_answer_in_its_thread(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    file = env.fake.add_file(RED, "error.png")
    payload = mention(env.fake, "<@U0BOT> what does this error say?", [file])
    assert await env.event(payload) == 200
    await answered(env.fake, payload)

    ts = payload["event"]["ts"]
    asked = env.engine.calls[0].message
    assert [i.data for i in asked.images] == [RED] and asked.text == "what does this error say?"
    expected = describe([], asked)
    assert expected.startswith(f"image {sha8(RED)}:")
    replies = env.fake.thread(CHANNEL, ts)
    assert len(replies) == 1, "one reply message, in the mention's thread"
    assert replies[0]["text"] == escape(expected)
    assert "a &lt; b &amp; c &gt; d" in replies[0]["text"]
    streamed = [c.args["text"] for c in env.fake.called("chat.update") if c.args["text"].endswith(" …")]
    assert len(streamed) >= 2, "the answer grows in place while it is generated"
    assert all(len(a) < len(b) for a, b in itertools.pairwise(streamed))
    first_post = env.fake.called("chat.postMessage")[0].args
    assert first_post["thread_ts"] == ts and first_post["text"].startswith("queued: 1st in line")
    assert env.fake.called("files.download")[0].args["authorized"] is True
    assert env.fake.reactions[(CHANNEL, ts)] == {"white_check_mark"}  # :eyes: removed when done
    assert [c.method for c in env.fake.calls if c.method.startswith("reactions")] == [
        "reactions.add", "reactions.remove", "reactions.add"]
    job = await env.stack.jobs.get(await _last_job_id(env))
    assert job is not None and job.origin["placeholder_ts"] == replies[0]["ts"]
    print("\nWeb API calls for one mention:", " → ".join(env.fake.sequence()))
    for secret in (BOT_TOKEN, SIGNING_SECRET, APP_TOKEN):
        assert secret not in caplog.text
    assert "Bearer" not in caplog.text


async def _last_job_id(env: Env) -> str:
    rows = await env.stack.db.fetchall("SELECT id FROM jobs ORDER BY seq DESC LIMIT 1", ())
    return str(rows[0]["id"])


async def test_a_follow_up_in_the_thread_is_about_the_same_image(env: Env) -> None:
    first = mention(env.fake, "<@U0BOT> what is this?", [env.fake.add_file(BLUE, "chart.png")])
    await env.event(first)
    await answered(env.fake, first)
    thread = first["event"]["ts"]
    follow = mention(env.fake, "<@U0BOT> and what is the trend?", thread_ts=thread)
    await env.event(follow)
    await answered(env.fake, follow)

    history = env.engine.calls[1].history
    assert [i.data for t in history for i in t.images] == [BLUE]
    replies = env.fake.thread(CHANNEL, thread)
    assert len(replies) == 3  # the user's follow-up and two bot answers, all in one thread
    assert replies[-1]["text"].startswith(f"image {sha8(BLUE)}: about 'and what is the trend?'")


def bot_messages(fake: FakeSlack, thread: str) -> list[str]:
    return [m["text"] for m in fake.thread(CHANNEL, thread) if m.get("bot_id")]


async def test_plain_replies_in_the_bots_thread_are_follow_ups_by_default(
    tmp_path: Path, fake: FakeSlack
) -> None:
    env = await open_env(tmp_path, fake)  # follow_all_thread_messages left at its default
    try:
        first = mention(fake, "<@U0BOT> read this", [fake.add_file(RED)])
        await env.event(first)
        await answered(fake, first)
        thread = first["event"]["ts"]
        elsewhere = fake.add_user_message(CHANNEL, "lunch, anyone?")["ts"]
        from_a_bot = thread_reply(fake, "deploy finished", thread, user="U0DEPLOY")
        from_a_bot["event"]["bot_id"] = "B0DEPLOY"
        for ignored in (
            thread_reply(fake, "count me in", elsewhere),  # a thread the bot has not answered in
            thread_reply(fake, "<@U0BOB> can you check the second line?", thread),  # for bob
            thread_reply(fake, "<!here> the build is red", thread),
            from_a_bot,
        ):
            assert await env.event(ignored) == 200
        plain = thread_reply(fake, "what about the second line?", thread)
        await env.event(plain)
        await answered(fake, plain)
        await asyncio.sleep(0.2)
        assert [c.message.text for c in env.engine.calls] == ["read this", "what about the second line?"]
        answers = bot_messages(fake, thread)
        assert len(answers) == 2 and answers[1].startswith(f"image {sha8(RED)}: about 'what about")
        assert bot_messages(fake, elsewhere) == []
    finally:
        await env.close()
    restarted = await open_env(tmp_path, fake)  # the thread is still the bot's: its history is on disk
    try:
        again = thread_reply(fake, "and the third line?", thread)
        await restarted.event(again)
        await answered(fake, again)
        assert bot_messages(fake, thread)[-1].startswith(f"image {sha8(RED)}: about 'and the third line?'")
    finally:
        await restarted.close()


async def test_following_plain_thread_replies_can_be_turned_off(tmp_path: Path, fake: FakeSlack) -> None:
    env = await open_env(tmp_path, fake, follow_all_thread_messages=False)
    try:
        assert "mention me in that thread" in (await env.command("help"))["text"]
        first = mention(fake, "<@U0BOT> read this", [fake.add_file(RED)])
        await env.event(first)
        await answered(fake, first)
        thread = first["event"]["ts"]
        await env.event(thread_reply(fake, "what about the second line?", thread))
        follow = mention(fake, "<@U0BOT> and the third?", thread_ts=thread)
        await env.event(follow)
        await answered(fake, follow)
        await asyncio.sleep(0.2)
        assert [c.message.text for c in env.engine.calls] == ["read this", "and the third?"]
    finally:
        await env.close()


async def test_skipped_attachments_are_named_in_the_reply(env: Env) -> None:
    skipped = escape("I skipped report.pdf: only images (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC) can be read.")
    pdf = env.fake.add_file(b"%PDF-1.7\n%fake report\n", "report.pdf", "application/pdf")
    alone = mention(env.fake, "<@U0BOT>", [pdf])
    await env.event(alone)
    thread = alone["event"]["ts"]
    await env.fake.wait_for(lambda: bot_messages(env.fake, thread))
    assert bot_messages(env.fake, thread) == [skipped]
    image_next = thread_reply(env.fake, "", thread, files=[env.fake.add_file(BLUE)])  # no mention
    await env.event(image_next)
    await answered(env.fake, image_next)
    assert bot_messages(env.fake, thread)[-1].startswith(f"image {sha8(BLUE)}")

    stubs = [{"id": f["id"], "file_access": "check_file_info"} for f in (env.fake.add_file(RED), pdf)]
    both = mention(env.fake, "<@U0BOT> what does the chart show?", stubs)  # types from files.info
    await env.event(both)
    await answered(env.fake, both)
    [reply] = env.fake.thread(CHANNEL, both["event"]["ts"])
    blocks = [b["text"]["text"] for b in reply["blocks"]]
    assert blocks[0] == skipped and blocks[1].startswith(f"image {sha8(RED)}: about 'what does the chart")
    assert [i.data for i in env.engine.calls[-1].message.images] == [RED]
    assert not [c for c in env.fake.called("files.download") if c.args["file"] == pdf["id"]]

    refused = mention(env.fake, "<@U0BOT> and these?", [env.fake.add_file(RED, html=True), pdf])
    await env.event(refused)
    await env.fake.wait_for(lambda: bot_messages(env.fake, refused["event"]["ts"]))
    [refusal] = bot_messages(env.fake, refused["event"]["ts"])
    assert refusal.startswith(skipped + "\nI could not download that file: Slack sent a login page")


async def test_text_that_is_not_unicode_gets_a_clear_reply(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    invalid = escape(texts.text("invalid_text"))
    in_channel = mention(env.fake, "<@U0BOT> zebra-question \ud800 here", [env.fake.add_file(RED)])
    in_dm = dm(env.fake, "zebra-question \udfff")
    for payload in (in_channel, in_dm):
        assert "\\ud" in json.dumps(payload)  # sent as JSON escapes, as a hostile client would
        assert await env.event(payload) == 200
    await env.fake.wait_for(lambda: len(env.fake.called("chat.postMessage")) == 2)
    assert bot_messages(env.fake, in_channel["event"]["ts"]) == [invalid]
    assert env.fake.messages["D0ALICE"][-1]["text"] == invalid
    assert env.engine.calls == [] and not env.fake.called("files.download")
    assert "zebra-question" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    fine = dm(env.fake, "what is it?", [env.fake.add_file(BLUE)])  # the next message is answered
    await env.event(fine)
    await answered(env.fake, fine)


async def test_an_event_that_breaks_the_handler_still_gets_a_reply(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    payload = mention(env.fake, "<@U0BOT> walrus-question")
    payload["event"]["files"] = "not a list"  # a shape Slack does not send: a bug's stand-in
    await env.event(payload)
    await env.fake.wait_for(lambda: bot_messages(env.fake, payload["event"]["ts"]))
    [reply] = bot_messages(env.fake, payload["event"]["ts"])
    assert reply == f"Sorry, that failed, please try again. (reference {payload['event_id']})"
    assert "walrus-question" not in caplog.text


async def test_a_file_without_a_download_url_is_explained(env: Env) -> None:
    gdrive = env.fake.add_file(RED, "design.png", external=True)
    payload = mention(env.fake, "<@U0BOT> what is this?", [gdrive])
    await env.event(payload)
    await env.fake.wait_for(lambda: bot_messages(env.fake, payload["event"]["ts"]))
    [reply] = bot_messages(env.fake, payload["event"]["ts"])
    assert reply.startswith("I could not download design.png: Slack gives me no download link")
    assert "external files (Google Drive" in reply and "Upload the image itself" in reply
    assert "HTTP" not in reply and env.engine.calls == []

    cut_off = mention(env.fake, "<@U0BOT> and this?", [env.fake.add_file(RED, "cut.png", broken=True)])
    await env.event(cut_off)
    await env.fake.wait_for(lambda: bot_messages(env.fake, cut_off["event"]["ts"]))
    assert bot_messages(env.fake, cut_off["event"]["ts"]) == [
        "I could not download cut.png from Slack (the connection broke off). Please upload it again."]


async def test_the_bot_token_goes_only_to_the_configured_origin(env: Env) -> None:
    other_port = await FakeSlack(BOT_TOKEN).start()  # the same host, another port
    try:
        elsewhere = other_port.add_file(RED, "elsewhere.png")
        payload = mention(env.fake, "<@U0BOT> what is it?", [elsewhere])
        await env.event(payload)
        await env.fake.wait_for(lambda: bot_messages(env.fake, payload["event"]["ts"]))
        assert other_port.calls == [], "nothing, least of all the token, went to the other port"
    finally:
        await other_port.close()
    assert bot_messages(env.fake, payload["event"]["ts"])[0].startswith("I could not download elsewhere.png")
    files = env.adapter.files
    assert files.is_slack_url(f"{env.fake.base_url}/files/F00000001/a.png")
    assert files.is_slack_url("https://files.slack.com/files-pri/T0TEAM-F00000001/a.png")
    for url in (f"http://localhost:{env.fake.port}/files/F00000001/a.png",
                f"https://127.0.0.1:{env.fake.port}/files/F00000001/a.png",
                "https://files.slack.com:8443/files-pri/T0TEAM-F00000001/a.png",
                "http://files.slack.com/files-pri/T0TEAM-F00000001/a.png",
                "https://slack.com.attacker.example/a.png", "https://notslack.com/a.png"):
        assert not files.is_slack_url(url), url


async def test_dm_turns_are_answered_in_the_dm_and_remember_the_image(env: Env) -> None:
    first = dm(env.fake, "what is on this receipt?", [env.fake.add_file(RED, "receipt.jpg", "image/jpeg")])
    await env.event(first)
    await answered(env.fake, first)
    second = dm(env.fake, "and the total?")
    await env.event(second)
    await answered(env.fake, second)

    bot_posts = env.fake.called("chat.postMessage")
    assert [p.args["channel"] for p in bot_posts] == ["D0ALICE", "D0ALICE"]
    assert all(p.args.get("thread_ts") is None for p in bot_posts), "DM answers are not threaded"
    assert [i.data for t in env.engine.calls[1].history for i in t.images] == [RED]
    assert env.fake.messages["D0ALICE"][-1]["text"].startswith(f"image {sha8(RED)}: about 'and the total?'")


# --- the slash command ------------------------------------------------------------------------


async def test_slash_command_answers_about_the_latest_image_in_the_channel(env: Env) -> None:
    env.fake.add_user_message(CHANNEL, "old", files=[env.fake.add_file(BLUE, "old.png")])
    env.fake.add_user_message(CHANNEL, "new", files=[env.fake.add_file(RED, "new.png")])
    ack = await env.command("what is the total?")
    assert ack == {"response_type": "ephemeral", "text": "working…"}
    await env.fake.wait_for(lambda: any(
        m.get("text", "").startswith(f"image {sha8(RED)}") for m in env.fake.messages[CHANNEL]))
    answer = env.fake.called("chat.postMessage")[0].args
    assert answer["channel"] == CHANNEL and answer.get("thread_ts") is None  # in the channel
    assert env.engine.calls[0].message.images[0].data == RED
    assert env.fake.called("conversations.history")[0].args["channel"] == CHANNEL


async def test_slash_command_without_an_image_says_how_to_attach_one(env: Env) -> None:
    ack = await env.command("what does it say?", channel="C0EMPTY")
    assert ack["text"] == "working…"
    await env.fake.wait_for(lambda: env.fake.called("response_url"))
    hint = env.fake.called("response_url")[0].args
    assert hint["response_type"] == "ephemeral"
    assert "found no image" in hint["text"] and "/vlbot &lt;question&gt;" in hint["text"]
    assert env.engine.calls == []


async def test_slash_command_reads_the_images_it_links(tmp_path: Path, fake: FakeSlack) -> None:
    def internet(request: httpx.Request) -> httpx.Response:  # the public host the guard checked
        assert request.url.host == "93.184.216.34" and request.headers["host"] == "images.example"
        return httpx.Response(200, content=GREEN, headers={"content-type": "image/png"})

    async def resolve(host: str, port: int) -> list[str]:
        return {"images.example": ["93.184.216.34"], "intranet.example": ["10.0.0.7"]}[host]

    def posted(prefix: str) -> bool:
        return any(m["text"].startswith(prefix) for m in fake.messages[CHANNEL])

    fetcher = RemoteImageFetcher(10_000_000, resolver=resolve, transport=httpx.MockTransport(internet))
    env = await open_env(tmp_path, fake, fetcher=fetcher)
    try:
        fake.add_user_message(CHANNEL, "latest", files=[fake.add_file(RED)])  # not the one asked about
        chart = fake.add_file(BLUE, "chart.png")
        await env.command(f"what is the trend? {fake.file_link(chart)}")
        await fake.wait_for(lambda: posted(f"image {sha8(BLUE)}: about 'what is the trend?'"))
        assert [c.args["authorized"] for c in fake.called("files.download")] == [True]
        await env.command("and this photo? <https://images.example/photo.png>")
        await fake.wait_for(lambda: posted(f"image {sha8(GREEN)}: about 'and this photo?'"))
        for refused in ("what is it? https://127.0.0.1:9/x.png", "https://intranet.example/x.png",
                        "http://images.example/photo.png"):
            await env.command(refused)
        await fake.wait_for(lambda: len(fake.called("response_url")) == 3)
        told = [c.args["text"] for c in fake.called("response_url")]
        assert "private or local address (127.0.0.1)" in told[0]
        assert "private or local address (intranet.example)" in told[1]
        assert told[2] == "I only open https:// image links; http://images.example/photo.png is not one."
        assert len(env.engine.calls) == 2
    finally:
        await env.close()


async def test_slash_help_reset_and_private_answers(tmp_path: Path, fake: FakeSlack) -> None:
    env = await open_env(tmp_path, fake, answer_in_channel=False)
    try:
        help_text = (await env.command("help"))["text"]
        assert "/vlbot reset" in help_text and "reply in that thread to ask follow-up" in help_text
        fake.add_user_message("D0ALICE", "", files=[fake.add_file(RED)])
        await env.command("what is in it?", channel="D0ALICE")
        await fake.wait_for(lambda: len(fake.called("response_url")) == 1)
        private = fake.called("response_url")[0].args
        assert private["response_type"] == "ephemeral" and private["text"].startswith(f"image {sha8(RED)}")
        assert fake.called("chat.postMessage") == [], "a private answer is not posted in the channel"
        assert (await env.command("reset", channel="D0ALICE"))["text"].startswith("Done: I forgot")
        assert await env.stack.history.recent(ConversationId("slack", "D0ALICE")) == []
    finally:
        await env.close()


# --- reliability --------------------------------------------------------------------------------


async def test_a_retried_event_is_answered_once_also_after_a_restart(tmp_path: Path, fake: FakeSlack) -> None:
    env = await open_env(tmp_path, fake)
    payload = mention(fake, "<@U0BOT> read this", [fake.add_file(RED)])
    try:
        assert await env.event(payload) == 200
        assert await env.event(payload, retry=1) == 200
        await answered(fake, payload)
        await asyncio.sleep(0.2)
    finally:
        await env.close()
    restarted = await open_env(tmp_path, fake)
    try:
        assert await restarted.event(payload, retry=2) == 200
        await asyncio.sleep(0.5)
        assert restarted.engine.calls == []
    finally:
        await restarted.close()
    assert len(env.engine.calls) == 1
    assert len(fake.thread(CHANNEL, payload["event"]["ts"])) == 1
    assert len(fake.called("files.download")) == 2  # the restarted process checks the key at submit


async def test_rate_limited_chat_update_still_delivers_the_whole_answer(
    tmp_path: Path, fake: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    def reply(history: Sequence[Turn], message: Message) -> str:
        fake.fail_next("chat.update", times=2, retry_after=1)  # the next edit is the final one
        return "the complete answer, every word of it"

    env = await open_env(tmp_path, fake, ScriptedEngine(reply=reply))
    env.adapter.replies.update_interval_s = 60  # no streaming edits: the 429s hit the final edit
    try:
        payload = mention(fake, "<@U0BOT> go", [fake.add_file(RED)])
        await env.event(payload)
        await answered(fake, payload)
        statuses = [c.status for c in fake.calls if c.method == "chat.update"]
        assert statuses[-3:] == [429, 429, 200]
        final = fake.thread(CHANNEL, payload["event"]["ts"])[0]["text"]
        assert final == "the complete answer, every word of it"
        assert "delivery attempt" not in caplog.text, "slack_sdk's retry handler waited out the 429s"
    finally:
        await env.close()


async def test_long_answers_are_split_within_slack_limits(tmp_path: Path, fake: FakeSlack) -> None:
    long_answer = " ".join(f"<w{i}> & more" for i in range(3000))  # ~55k characters escaped
    env = await open_env(tmp_path, fake, ScriptedEngine(reply=lambda h, m: long_answer),
                         runner_kw={"params": GenerationParams(max_new_tokens=20_000)})
    try:
        payload = mention(fake, "<@U0BOT> everything please", [fake.add_file(RED)])
        await env.event(payload)
        await answered(fake, payload)
        messages = fake.thread(CHANNEL, payload["event"]["ts"])
        assert len(messages) >= 4
        blocks = [b["text"]["text"] for m in messages for b in m["blocks"]]
        assert all(len(b) <= 3000 for b in blocks) and all(len(m["text"]) <= 40000 for m in messages)
        assert " ".join(blocks).split() == escape(long_answer).split()
    finally:
        await env.close()


# --- bad input, access and trust ------------------------------------------------------------------


async def test_html_instead_of_the_file_names_the_missing_scope(env: Env) -> None:
    payload = mention(env.fake, "<@U0BOT> what is this?", [env.fake.add_file(RED, html=True)])
    await env.event(payload)
    await env.fake.wait_for(lambda: env.fake.thread(CHANNEL, payload["event"]["ts"]))
    reply = env.fake.thread(CHANNEL, payload["event"]["ts"])[0]["text"]
    assert "files:read" in reply and "reinstall" in reply
    assert env.engine.calls == []


async def test_queue_full_gets_the_busy_text(tmp_path: Path, fake: FakeSlack) -> None:
    env = await open_env(tmp_path, fake, runner_kw={"max_queue": 0})
    try:
        payload = mention(fake, "<@U0BOT> hi", [fake.add_file(RED)])
        await env.event(payload)
        await fake.wait_for(lambda: fake.thread(CHANNEL, payload["event"]["ts"]))
        assert fake.thread(CHANNEL, payload["event"]["ts"])[0]["text"].startswith("I'm busy right now")
    finally:
        await env.close()


async def test_own_and_other_bots_messages_are_ignored(env: Env) -> None:
    own = dm(env.fake, "my own answer")
    own["event"] |= {"user": "U0BOT", "bot_id": "B0BOT"}
    other = fixture("message_bot.json")
    other_mention = mention(env.fake, "<@U0BOT> beep", [env.fake.add_file(RED)], user="U0OTHERBOT")
    other_mention["event"]["bot_id"] = "B0OTHER"
    for payload in (own, other, other_mention):
        assert await env.event(payload) == 200
    person = dm(env.fake, "hello", [env.fake.add_file(BLUE)])
    await env.event(person)
    await answered(env.fake, person)
    await asyncio.sleep(0.1)
    assert [c.message.text for c in env.engine.calls] == ["hello"]
    assert len(env.fake.called("chat.postMessage")) == 1


async def test_allowlists_of_teams_and_channels(tmp_path: Path, fake: FakeSlack) -> None:
    env = await open_env(tmp_path, fake, allowed_teams=["T0TEAM"], allowed_channels=["C0OK"])
    try:
        elsewhere = mention(fake, "<@U0BOT> a", [fake.add_file(RED)])
        other_team = mention(fake, "<@U0BOT> b", [fake.add_file(RED)], channel="C0OK")
        other_team["team_id"] = "T0STRANGER"
        allowed = mention(fake, "<@U0BOT> c", [fake.add_file(RED)], channel="C0OK")
        for payload in (elsewhere, other_team, allowed):
            await env.event(payload)
        await answered(fake, allowed)
        await asyncio.sleep(0.1)
        assert [c.message.text for c in env.engine.calls] == ["c"]
        assert (await env.command("hi", channel="C0NOPE"))["text"] == "Sorry, this bot is private."
    finally:
        await env.close()


async def test_bad_signature_and_stale_timestamp_are_rejected(env: Env) -> None:
    payload = mention(env.fake, "<@U0BOT> hi", [env.fake.add_file(RED)])
    body = json.dumps(payload)
    wrong = await env.post(body, "application/json", signed(body, secret="not-the-secret"), "bad")
    stale = await env.post(body, "application/json", signed(body, ts=time.time() - 600), "stale")
    unsigned = await env.post(body, "application/json", {}, "unsigned")
    assert [wrong[0], stale[0], unsigned[0]] == [401, 401, 401]
    await asyncio.sleep(0.2)
    assert env.engine.calls == [] and not env.fake.called("chat.postMessage")
    assert await env.event(payload) == 200  # the same body, properly signed, is accepted
    await answered(env.fake, payload)
    challenge = json.dumps({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                            "type": "url_verification"})
    status, answer = await env.post(challenge, "application/json", signed(challenge), "url_verification")
    assert status == 200 and "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in answer


# --- Socket Mode ------------------------------------------------------------------------------


async def test_socket_mode_uses_the_same_handlers(
    tmp_path: Path, fake: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env = await open_env(tmp_path, fake, mode="socket", signing_secret=None)
    try:
        assert env.adapter.http_port is None
        assert fake.called("apps.connections.open")
        payload = mention(fake, "<@U0BOT> over the socket", [fake.add_file(RED)])
        envelope = fixture("socket_events_api.json") | {"payload": payload}
        sent = time.monotonic()
        await fake.socket_send(envelope)
        await fake.wait_for(lambda: envelope["envelope_id"] in fake.socket_acks)
        ACK_TIMES.setdefault("socket mode", []).append(fake.socket_acks[envelope["envelope_id"]][0] - sent)
        await answered(fake, payload)
        retry = envelope | {"envelope_id": "second-delivery", "retry_attempt": 1, "retry_reason": "timeout"}
        await fake.socket_send(retry)
        await fake.wait_for(lambda: "second-delivery" in fake.socket_acks)
        await asyncio.sleep(0.2)
        assert len(env.engine.calls) == 1
        replies = fake.thread(CHANNEL, payload["event"]["ts"])
        assert len(replies) == 1
        assert replies[0]["text"].startswith(f"image {sha8(RED)}: about 'over the socket'")
    finally:
        await env.close()
    assert APP_TOKEN not in caplog.text and BOT_TOKEN not in caplog.text


async def test_wrong_tokens_stop_start_with_a_message_naming_the_setting(
    tmp_path: Path, fake: FakeSlack
) -> None:
    for kw, setting in (({"bot_token": "xoxb-wrong"}, "VLBOT_SLACK__BOT_TOKEN"),
                        ({"mode": "socket", "app_token": "xapp-wrong"}, "VLBOT_SLACK__APP_TOKEN")):
        settings = Settings.model_validate({"data_dir": tmp_path, "slack": {
            "bot_token": BOT_TOKEN, "app_token": APP_TOKEN, "signing_secret": SIGNING_SECRET,
            "mode": "http", "port": 0, "base_url": fake.api_url} | kw})
        adapter = SlackAdapter(settings)
        with pytest.raises(RuntimeError, match=setting):
            # a refused start reads only the auto-triage places of the core
            await adapter.start(cast(Core, SimpleNamespace(admin=SimpleNamespace(auto_triage=None))))
        await adapter.stop()
    assert fake.calls[-1].method == "apps.connections.open" and fake.calls[-1].error == "invalid_auth"


# --- install and text rules -------------------------------------------------------------------


def test_the_manifest_asks_for_what_the_adapter_uses() -> None:
    import yaml  # a dependency of transformers

    manifest = yaml.safe_load((Path(__file__).parent.parent / "manifest.yml").read_text())
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"files:read", "chat:write", "app_mentions:read", "im:history", "channels:history",
            "groups:history", "reactions:write", "commands"} <= scopes
    assert {"app_mention", "message.im", "message.channels", "message.groups"} <= set(
        manifest["settings"]["event_subscriptions"]["bot_events"])
    assert [c["command"] for c in manifest["features"]["slash_commands"]] == [SlackSettings().slash_command]
    assert manifest["settings"]["socket_mode_enabled"] is True


def test_splitting_never_cuts_an_entity_or_exceeds_the_limit() -> None:
    chunks = split_escaped(escape("<>&" * 2000), limit=3000)
    assert all(len(c) <= 3000 for c in chunks) and "".join(chunks) == escape("<>&" * 2000)
    assert all(c.startswith("&") and c.endswith(";") for c in chunks)
    assert strip_mentions("<@U0BOT>  what is <@W123|bob> doing?") == "what is doing?"


async def test_slash_presets_and_export(env: Env) -> None:
    env.fake.add_user_message(CHANNEL, "shot", files=[env.fake.add_file(RED, "error.png")])
    assert (await env.command("export"))["text"] == "There is nothing stored for this chat yet."
    await env.command("what is the total?")
    await env.fake.wait_for(lambda: any(
        m.get("text", "").startswith(f"image {sha8(RED)}") for m in env.fake.messages[CHANNEL]))
    for _ in range(100):  # the answer is recorded just after it is delivered
        exported = (await env.command("export"))["text"]
        if "what is the total?" in exported:
            break
        await asyncio.sleep(0.02)
    assert exported.startswith("# Conversation slack:") and f"image {sha8(RED)}" in exported
    await env.command("triage what broke?")
    await env.fake.wait_for(lambda: len(env.engine.calls) == 2)
    job = (await env.stack.jobs.unfinished() or [None])[0]
    seen = env.engine.calls[1].message.text
    assert "screenshot of a problem" in seen and seen.endswith("what broke?")  # the preset prompt
    assert job is None or job.origin.get("preset") == "triage"
