"""Outbound webhooks against a real local receiver (tests/webhook_receiver.py) that verifies the
Standard Webhooks signature: delivery, retries with backoff, a wrong secret refused, dead letters
in /metrics, /health and `vlbot doctor`, endpoint URLs under the SSRF rules (at start and at
delivery), preset results as events."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from adapters.http import HttpAdapter
from bot.app import App
from bot.db import Database
from bot.models import ImagePart
from bot.outbox import PRESET_EVENT, TRIAGE_EVENT, Outbox
from bot.remote_images import RemoteImageFetcher
from bot.settings import HttpSettings, Settings, WebhookEndpoint, WebhookSettings
from bot.webhooks import EndpointGuard, PresetResultWebhooks, WebhookConfigError, WebhookWorker
from tests.conftest import make_stack
from tests.fakes import ScriptedEngine, incoming
from tests.webhook_receiver import WebhookReceiver, new_secret

TRIAGE = {
    "product_area": "Billing",
    "error_message": "Your card was declined.",
    "error_code": "402",
    "severity": "critical",
}
DESCRIBED = '{"summary": "A login form showing an expired-session error.", "tags": ["login"]}'
ROOT = Path(__file__).resolve().parents[1]  # subprocesses run this checkout's code
PNG = ImagePart(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32, "image/png", "shot.png")


def hooks(url: str, secret: str, **kw: Any) -> WebhookSettings:
    kw = {"allow_private_hosts": ["127.0.0.1"], "backoff_s": 0.2, "timeout_s": 5.0, **kw}
    return WebhookSettings(endpoints=[WebhookEndpoint(url=url, secret=secret)], **kw)


@asynccontextmanager
async def delivering(
    tmp_path: Path, settings: WebhookSettings, **worker_kw: Any
) -> AsyncIterator[tuple[Outbox, WebhookWorker]]:
    db = await Database.open(tmp_path / "data" / "vlbot.sqlite3")
    outbox = Outbox(db, [e.url for e in settings.endpoints], event_types=settings.events)
    worker = WebhookWorker(outbox, settings, poll_s=0.2, **worker_kw)
    try:
        await worker.start()
        yield outbox, worker
    finally:
        await worker.stop()
        await db.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def received(receiver: WebhookReceiver, predicate: Callable[[], bool]) -> None:
    await asyncio.to_thread(receiver.wait_for, predicate)


async def test_an_event_arrives_once_signed_and_the_receiver_verifies_it(tmp_path: Path) -> None:
    secret = new_secret()
    with WebhookReceiver(secret) as receiver:
        async with delivering(tmp_path, hooks(receiver.url, secret)) as (outbox, worker):
            event_id = await outbox.enqueue(TRIAGE_EVENT, TRIAGE)
            await received(receiver, lambda: bool(receiver.processed))
            await eventually(lambda: outbox_has(outbox, delivered=1))
            await eventually(lambda: worker_sees(worker, delivered=1))
    (attempt,) = receiver.attempts
    assert attempt.event_id == event_id and attempt.verified and attempt.status == 200
    (body,) = receiver.processed
    assert body["type"] == "triage.result" and body["data"] == TRIAGE
    assert body["timestamp"].endswith("Z")


async def outbox_has(outbox: Outbox, **expected: int) -> bool:
    counts = await outbox.counts()
    return all(counts[k] == n for k, n in expected.items())


async def worker_sees(worker: WebhookWorker, **expected: int) -> bool:
    return all(worker.counts.get(k) == n for k, n in expected.items())


async def test_a_receiver_failing_its_first_three_attempts_gets_the_event_with_backoff(
    tmp_path: Path,
) -> None:
    secret = new_secret()
    with WebhookReceiver(secret, fail_first=3) as receiver:
        settings = hooks(receiver.url, secret, backoff_s=0.2)
        # jitter at its low end: waits of 0.1, 0.2, 0.4 s (half of 0.2 s doubling)
        async with delivering(tmp_path, settings, jitter=lambda: 0.0) as (outbox, _):
            event_id = await outbox.enqueue(TRIAGE_EVENT, TRIAGE)
            await received(receiver, lambda: bool(receiver.processed))
            await eventually(lambda: outbox_has(outbox, delivered=1, pending=0))
    attempts = receiver.attempts_of(event_id)
    assert [a.status for a in attempts] == [503, 503, 503, 200]
    assert all(a.verified for a in attempts)  # the same id, signed afresh each time
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(attempts)]
    assert [round(g, 2) >= wait for g, wait in zip(gaps, (0.1, 0.2, 0.4), strict=True)] == [True] * 3, gaps
    assert len(receiver.processed) == 1


async def test_a_wrong_secret_fails_verification_and_ends_as_a_dead_letter(tmp_path: Path) -> None:
    with WebhookReceiver(new_secret()) as receiver:  # the receiver knows another secret
        settings = hooks(receiver.url, new_secret(), max_attempts=2, backoff_s=0.05)
        async with delivering(tmp_path, settings) as (outbox, _):
            event_id = await outbox.enqueue(TRIAGE_EVENT, TRIAGE)
            await eventually(lambda: outbox_has(outbox, dead=1))
            (dead,) = await outbox.dead_letters()
    assert [(a.status, a.verified) for a in receiver.attempts] == [(401, False), (401, False)]
    assert receiver.attempts[0].error == "No matching signature found"
    assert receiver.processed == []
    assert dead["event_id"] == event_id and dead["attempts"] == 2
    assert dead["last_error"] == "HTTP 401"


async def test_a_private_endpoint_is_refused_at_start_with_its_url_named(tmp_path: Path) -> None:
    secret = new_secret()
    with WebhookReceiver(secret) as receiver:
        settings = hooks(receiver.url, secret, allow_private_hosts=[])
        db = await Database.open(tmp_path / "vlbot.sqlite3")
        worker = WebhookWorker(Outbox(db, [receiver.url]), settings)
        try:
            with pytest.raises(WebhookConfigError) as refused:
                await worker.start()
        finally:
            await worker.stop()
            await db.close()
    message = str(refused.value)
    assert f"http://127.0.0.1:{receiver.url.split(':')[2].split('/')[0]}" in message
    assert "private or local address" in message
    assert "VLBOT_WEBHOOKS__ALLOW_PRIVATE_HOSTS" in message
    assert receiver.attempts == []


@pytest.mark.parametrize(
    ("url", "secret", "says"),
    [
        ("http://169.254.169.254/latest/meta-data", None,
         "webhook endpoint http://169.254.169.254/… is refused: The webhook URL points to a private"),
        ("ftp://files.example/drop", None,
         "webhook endpoint ftp://files.example/… is refused: Only http(s) webhook URLs"),
        ("https://tickets.example/hook", "whsec_c2hvcnQ=",
         "invalid setting webhooks.endpoints.0.secret: Value error, a webhook secret is whsec_"),
    ],
)
def test_serve_with_a_bad_endpoint_stops_with_one_clear_line(
    url: str, secret: str | None, says: str, tmp_path: Path
) -> None:
    secret = secret or new_secret()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VLBOT_ENGINE": "openai",
        "VLBOT_DATA_DIR": str(tmp_path / "data"),
        "VLBOT_HTTP__ENABLED": "true",
        "VLBOT_HTTP__PORT": "0",
        "VLBOT_WEBHOOKS__ENDPOINTS": json.dumps([{"url": url, "secret": secret}]),
    }
    out = subprocess.run(
        [sys.executable, "-m", "bot.cli", "serve"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vlbot: {says}"), last
    assert "Traceback" not in out.stderr and secret not in out.stderr + out.stdout


def test_a_wrong_secret_is_kept_out_of_the_settings_error() -> None:
    with pytest.raises(ValidationError) as refused:
        WebhookEndpoint(url="https://tickets.example/hook", secret="whsec_c2hvcnQtc2VjcmV0")
    assert "whsec_ followed by the base64 of 24 to 64 random bytes" in str(refused.value)
    assert "c2hvcnQtc2VjcmV0" not in str(refused.value)


def resolver(table: dict[str, list[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


async def test_an_endpoint_whose_dns_turns_private_is_refused_at_delivery(tmp_path: Path) -> None:
    secret = new_secret()
    dns = {"hooks.example": ["93.184.216.34"]}
    guard = EndpointGuard([], RemoteImageFetcher(0, resolver=resolver(dns)))
    settings = hooks("http://hooks.example/vlbot", secret, allow_private_hosts=[], max_attempts=1)
    async with delivering(tmp_path, settings, guard=guard) as (outbox, _):  # public at start
        dns["hooks.example"] = ["127.0.0.1"]  # then the name is pointed at this machine
        await outbox.enqueue(TRIAGE_EVENT, TRIAGE)
        await eventually(lambda: outbox_has(outbox, dead=1))
        (dead,) = await outbox.dead_letters()
    assert dead["last_error"].startswith("refused: The webhook URL points to a private")


async def test_an_endpoint_that_does_not_resolve_at_start_is_tried_anyway(tmp_path: Path) -> None:
    """DNS down at start is no reason to refuse the endpoint: each attempt resolves again."""
    async def no_dns(host: str, port: int) -> list[str]:
        raise OSError("temporary failure in name resolution")

    guard = EndpointGuard([], RemoteImageFetcher(0, resolver=no_dns))
    settings = hooks("https://tickets.example/hook", new_secret(), allow_private_hosts=[],
                     max_attempts=1)
    async with delivering(tmp_path, settings, guard=guard) as (outbox, _):
        await outbox.enqueue(TRIAGE_EVENT, TRIAGE)
        await eventually(lambda: outbox_has(outbox, dead=1))
        (dead,) = await outbox.dead_letters()
    assert dead["last_error"] == "refused: The webhook host 'tickets.example' could not be resolved."


async def test_a_checked_endpoint_is_reached_at_the_address_that_was_checked(tmp_path: Path) -> None:
    """The connection goes to the address the check resolved (the name is not looked up
    again): `hooks.example` exists only in the guard's resolver, here as this machine, which the
    check is told to accept like a public address."""
    secret = new_secret()
    with WebhookReceiver(secret) as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        checker = RemoteImageFetcher(0, resolver=resolver({"hooks.example": ["127.0.0.1"]}),
                                     allowed=lambda address: True)
        settings = hooks(f"http://hooks.example:{port}/hooks/vlbot", secret, allow_private_hosts=[])
        async with delivering(tmp_path, settings, guard=EndpointGuard([], checker)) as (outbox, _):
            await outbox.enqueue(TRIAGE_EVENT, TRIAGE)
            await received(receiver, lambda: bool(receiver.processed))
    assert receiver.attempts[0].verified


async def test_preset_results_become_events_when_asked_for(tmp_path: Path) -> None:
    secret = new_secret()
    with WebhookReceiver(secret) as receiver:
        settings = hooks(receiver.url, secret, events=[TRIAGE_EVENT, PRESET_EVENT])
        async with delivering(tmp_path, settings) as (outbox, _):
            stack = await make_stack(
                tmp_path / "jobs.sqlite3",
                ScriptedEngine(reply=lambda h, m: DESCRIBED),
                result_hooks=[PresetResultWebhooks(outbox)],
            )
            try:
                await stack.runner.start()
                await stack.runner.submit(incoming("c1", "/describe", PNG))
                await stack.adapter.wait_for_finals(1)
                await received(receiver, lambda: bool(receiver.processed))
            finally:
                await stack.runner.stop(grace_s=1)
                await stack.db.close()
    (body,) = receiver.processed
    assert body["type"] == "preset.result"
    data = body["data"]
    assert data["preset"] == "describe"
    assert data["place"] == {"platform": "test", "chat": "c1", "thread": None}
    assert data["result"]["summary"] == "A login form showing an expired-session error."
    assert receiver.attempts[0].event_id == f"evt_{data['job_id']}_describe"


async def test_preset_results_are_not_sent_by_default(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "vlbot.sqlite3")
    try:
        outbox = Outbox(db, ["https://hooks.example/x"], event_types=WebhookSettings().events)
        stack = await make_stack(tmp_path / "jobs.sqlite3", ScriptedEngine(reply=lambda h, m: DESCRIBED),
                                 result_hooks=[PresetResultWebhooks(outbox)])
        await stack.runner.start()
        await stack.runner.submit(incoming("c1", "/describe", PNG))
        await stack.adapter.wait_for_finals(1)
        await stack.runner.stop(grace_s=1)
        await stack.db.close()
        assert await outbox.counts() == {"pending": 0, "delivered": 0, "dead": 0}
    finally:
        await db.close()


async def test_dead_letters_show_in_metrics_health_and_doctor(tmp_path: Path) -> None:
    secret = new_secret()
    with WebhookReceiver(secret, fail_first=100) as receiver:  # never takes anything
        webhooks = hooks(receiver.url, secret, max_attempts=2, backoff_s=0.05)
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, data_dir=tmp_path / "data", http=HttpSettings(port=0), webhooks=webhooks
        )
        adapter = HttpAdapter(settings)
        app = App(settings, ScriptedEngine(), [adapter])
        await app.start()
        try:
            assert app.outbox is not None
            event_id = await app.outbox.enqueue(TRIAGE_EVENT, TRIAGE)
            await eventually(lambda: outbox_has(app.outbox, dead=1))  # type: ignore[arg-type]
            base = f"http://127.0.0.1:{adapter.port}"
            async with httpx.AsyncClient(base_url=base) as client:
                await eventually(lambda: metrics_show(client, 'vlbot_webhook_events{state="dead"} 1.0'))
                metrics = (await client.get("/metrics")).text
                health = (await client.get("/health")).json()
        finally:
            await app.stop()
    assert 'vlbot_webhook_events{state="pending"} 0.0' in metrics
    assert health["webhooks"] == {"pending": 0, "dead": 1}
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "VLBOT_ENGINE": "openai",
        "VLBOT_DATA_DIR": str(tmp_path / "data"),
        "VLBOT_WEBHOOKS__ENDPOINTS": json.dumps([{"url": receiver.url, "secret": secret}]),
        "VLBOT_WEBHOOKS__ALLOW_PRIVATE_HOSTS": '["127.0.0.1"]',
    }
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bot.cli", "doctor"], capture_output=True,
        text=True, env=env, cwd=tmp_path, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert "webhook outbox: 0 pending, 1 dead, 0 delivered" in out.stdout
    dead_line = next(line for line in out.stdout.splitlines() if event_id in line)
    assert "after 2 attempt(s)" in dead_line and dead_line.endswith("HTTP 503")
    assert secret not in out.stdout


async def metrics_show(client: httpx.AsyncClient, line: str) -> bool:
    return line in (await client.get("/metrics")).text


async def test_two_replicas_on_postgres_deliver_each_event_once(postgres_url: str) -> None:
    """Two workers, each on its own connection pool (two replicas), share one outbox: every
    event reaches the receiver once, none twice."""
    secret = new_secret()
    with WebhookReceiver(secret) as receiver:
        settings = hooks(receiver.url, secret)
        dbs = [await Database.open(postgres_url) for _ in range(2)]
        outboxes = [Outbox(db, [receiver.url]) for db in dbs]
        workers = [WebhookWorker(o, settings, poll_s=0.05) for o in outboxes]
        try:
            ids = [await outboxes[n % 2].enqueue(TRIAGE_EVENT, {"n": n}) for n in range(30)]
            for worker in workers:
                await worker.start()
            await eventually(lambda: outbox_has(outboxes[0], delivered=30))
        finally:
            for worker in workers:
                await worker.stop()
            for db in dbs:
                await db.close()
    assert sorted(a.event_id for a in receiver.attempts) == sorted(ids)


async def test_triages_asked_through_the_http_api_reach_the_receiver_grouped(tmp_path: Path) -> None:
    """The whole path: a triage request, the triage workflow's event, the outbox, a signed POST;
    the same error asked about twice in one place (conversation) is one group, counted."""
    from tests.http_helpers import data_url, png
    from tests.test_presets import GOOD

    secret = new_secret()
    with WebhookReceiver(secret) as receiver:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, data_dir=tmp_path / "data", http=HttpSettings(port=0),
            webhooks=hooks(receiver.url, secret),
        )
        adapter = HttpAdapter(settings)
        app = App(settings, ScriptedEngine(reply=lambda h, m: GOOD["triage"]), [adapter])
        await app.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{adapter.port}") as http:
                for color in ((200, 30, 30), (30, 200, 30)):
                    answer = await http.post("/v1/chat/completions", timeout=30, json={
                        "model": "m", "preset": "triage", "conversation_id": "support-desk",
                        "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": data_url(png(color=color))}},
                            {"type": "text", "text": "what broke?"}]}]})
                    assert answer.status_code == 200, answer.text
            await received(receiver, lambda: len(receiver.processed) == 2)
        finally:
            await app.stop()
    first, second = receiver.processed
    assert first["type"] == second["type"] == "triage.result"
    assert first["data"]["result"]["error_message"] == "Your card was declined."
    assert first["data"]["group_id"] == second["data"]["group_id"]
    assert [first["data"]["count"], second["data"]["count"]] == [1, 2]
    assert len({a.event_id for a in receiver.attempts}) == 2 and all(a.verified for a in receiver.attempts)
