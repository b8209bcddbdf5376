"""The inference pool (engine=openai with several servers) against three fake OpenAI-compatible
servers over real HTTP (tests/fake_openai.py): failover before the first token, least-busy
routing, a server used again once its probe succeeds, a mid-stream failure that is reported and
not restarted, and the pool's state in /health and /metrics."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.adapter import Failed, Final, Partial
from bot.app import build_engine
from bot.engine_port import UpstreamStatus
from bot.models import GenerationParams, Message
from bot.settings import Settings
from engine.remote import OpenAIRemoteEngine, RemotePool
from tests.conftest import make_core
from tests.fake_openai import FakeOpenAIServer, Mode
from tests.fakes import RecordingAdapter, incoming
from tests.http_helpers import close_openai_clients, openai_client, running  # noqa: F401


@asynccontextmanager
async def fake_servers(*modes: Mode) -> AsyncIterator[list[FakeOpenAIServer]]:
    servers = [await FakeOpenAIServer(f"s{i}", mode).start() for i, mode in enumerate(modes)]
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


def make_pool(servers: list[FakeOpenAIServer], **kw: Any) -> RemotePool:
    kw = {"first_token_timeout_s": 5.0, "health_interval_s": 30.0, **kw}
    return RemotePool([OpenAIRemoteEngine(s.base_url, None, s.name) for s in servers], **kw)


async def ask(pool: RemotePool, question: str) -> str:
    pieces = pool.stream([], Message.of(question), GenerationParams(max_new_tokens=50))
    return "".join([p async for p in pieces])


async def until(condition: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    """Wait for a state the pool reaches on its own (a bound, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.01)


def status_of(pool: RemotePool, server: FakeOpenAIServer) -> UpstreamStatus:
    return next(u for u in pool.upstreams() if u.server == server.base_url)


@pytest.mark.parametrize("failure", ["error", "hang", "gone"])
async def test_three_servers_one_failing_every_request_answered_once(
    tmp_path: Path, failure: str
) -> None:
    """30 streamed requests through vlbot's API (the official openai client) to a pool of 3
    servers, one of them failing after the pool has seen it healthy (HTTP 500s; no first token
    within the timeout; its process gone, connections refused): all answered, each by one
    server, none twice."""
    questions = [f"question {i}" for i in range(30)]
    async with fake_servers("ok", "ok", "ok") as servers:
        pool = make_pool(servers, first_token_timeout_s=1.0)
        await pool.load()
        if failure == "gone":
            await servers[1].stop()
        else:
            servers[1].mode = "error" if failure == "error" else "hang"
        async with running(tmp_path, pool, runner={"max_concurrency": 6}) as front:  # type: ignore[arg-type]
            client = openai_client(front.url, "x", timeout=600)

            async def one(question: str) -> str:
                stream = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": question}], stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            started = time.monotonic()
            answers = await asyncio.gather(*(one(q) for q in questions))
            elapsed = time.monotonic() - started
            await client.close()
        await pool.close()
    answered_by = Counter(q for s in servers for q in s.answered)
    failing = status_of(pool, servers[1])
    print(
        f"\npool of 3, one {failure}: {len(questions)} requests, {len(answers)} answered, "
        f"{failing.failovers} failed over from the failing server, {elapsed:.2f} s"
    )
    assert servers[1].answered == []
    assert answered_by == Counter(questions)  # every question answered by exactly one server
    for question, answer in zip(questions, answers, strict=True):
        assert answer in (servers[0].answer(question), servers[2].answer(question))
    assert failing.failovers == failing.requests >= 1 and not failing.up
    if failure != "gone":
        assert len(servers[1].received) == failing.requests
    assert failing.last_error is not None


async def test_concurrent_requests_go_to_the_least_busy_server() -> None:
    async with fake_servers("ok", "ok", "ok") as servers:
        gate = asyncio.Event()
        for server in servers:
            server.gate = gate
        pool = make_pool(servers)
        await pool.load()
        tasks = [asyncio.create_task(ask(pool, f"q{i}")) for i in range(6)]
        await until(lambda: sum(s.in_flight for s in servers) == 6, "6 requests in flight")
        in_flight = [s.in_flight for s in servers]
        reported = [u.in_flight for u in pool.upstreams()]
        gate.set()
        answers = await asyncio.gather(*tasks)
        await pool.close()
    assert in_flight == [2, 2, 2]
    assert reported == [2, 2, 2]
    assert sorted(answers) == sorted(s.answer(q) for s in servers for q in s.answered)


async def test_a_server_that_comes_back_is_used_again_after_its_probe() -> None:
    async with fake_servers("ok", "error") as (steady, flaky):
        pool = make_pool([steady, flaky], health_interval_s=0.05, max_backoff_s=0.2)
        await pool.load()  # the first probe finds `flaky` down
        assert [u.up for u in pool.upstreams()] == [True, False]
        for i in range(3):
            assert await ask(pool, f"while down {i}") == steady.answer(f"while down {i}")
        assert flaky.received == []  # a server marked down gets no requests while another is up
        flaky.mode = "ok"
        await until(lambda: status_of(pool, flaky).up, "the probe to find the server up again")
        answers = [await ask(pool, f"after {i}") for i in range(4)]
        await pool.close()
    assert flaky.answered, "the server that came back is used again"
    assert sorted(answers) == sorted(
        [steady.answer(q) for q in steady.answered if q.startswith("after")]
        + [flaky.answer(q) for q in flaky.answered]
    )


async def test_all_servers_down_still_tries_them_and_says_why() -> None:
    async with fake_servers("error", "error") as servers:
        pool = make_pool(servers)
        await pool.load()
        with pytest.raises(Exception, match="no model server could answer") as caught:
            await ask(pool, "anyone?")
        await pool.close()
    assert [len(s.received) for s in servers] == [1, 1]  # each tried once, none twice
    assert getattr(caught.value, "code", None) == "remote_unavailable"


async def test_a_failure_mid_stream_fails_the_job_once_without_restarting_elsewhere(
    tmp_path: Path,
) -> None:
    """The first server breaks off after two pieces: the user got those pieces once and a clear
    failure; the answer is not restarted on the healthy server (nor retried by the runner),
    which would show its beginning twice."""
    async with fake_servers("break", "ok") as (breaking, healthy):
        pool = make_pool([breaking, healthy])
        adapter = RecordingAdapter("test")
        stack = await make_core(tmp_path / "db.sqlite3", [adapter], pool, retry_backoff_s=0.01)  # type: ignore[arg-type]
        try:
            await stack.core.submit(incoming("c1", "tell me"))
            finals = await adapter.wait_for_finals(1)  # a retry would end in a Final instead
        finally:
            await stack.close()
            await pool.close()
    partials = [s.event for s in adapter.sent if isinstance(s.event, Partial)]
    assert [p.text for p in partials] == ["s0", "s0 answers:"]
    assert len(finals) == 1 and isinstance(finals[0].event, Failed)
    assert finals[0].event.code == "answer_interrupted"
    assert not any(isinstance(s.event, Final) for s in adapter.sent)
    assert breaking.received == ["tell me"] and healthy.received == []


async def test_health_and_metrics_show_the_pool(tmp_path: Path) -> None:
    """Per server: up/down, in flight, requests, failures, last error; URLs without credentials,
    no API key anywhere; the details to API-key holders (as /metrics), the up count to all."""
    async with fake_servers("ok", "error", "ok") as servers:
        with_credentials = servers[2].base_url.replace("http://", "http://user:hunter2secret@")
        pool = RemotePool(
            [
                OpenAIRemoteEngine(servers[0].base_url, "sk-one-secret", "m"),
                OpenAIRemoteEngine(servers[1].base_url, "sk-two-secret", "m"),
                OpenAIRemoteEngine(with_credentials, None, "m"),
            ],
            health_interval_s=0.05,
            max_backoff_s=0.2,
        )
        key = {"Authorization": "Bearer front-key-1234"}
        async with running(tmp_path, pool, http={"api_keys": ["front-key-1234"]}) as front:  # type: ignore[arg-type]
            await pool.load()
            async with httpx.AsyncClient(base_url=front.url) as http:
                answer = await http.post(
                    "/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    headers=key,
                )
                public = await http.get("/health")
                health = await http.get("/health", headers=key)
                metrics = (await http.get("/metrics", headers=key)).text
                for server in servers:
                    server.mode = "error"
                await until(lambda: not any(u.up for u in pool.upstreams()), "all servers down")
                all_down = await http.get("/health")
        await pool.close()
    assert answer.status_code == 200
    assert public.status_code == 200 and public.json()["upstreams_up"] == "2/3"
    assert "upstreams" not in public.json() and "127.0.0.1" not in public.text
    body = health.json()
    assert health.status_code == 200 and body["status"] == "healthy"
    assert [(u["server"], u["up"]) for u in body["upstreams"]] == [
        (servers[0].base_url, True), (servers[1].base_url, False), (servers[2].base_url, True)
    ]
    assert "HTTP 500" in body["upstreams"][1]["last_error"]
    assert sum(u["requests"] for u in body["upstreams"]) == 1
    assert f'vlbot_upstream_up{{server="{servers[1].base_url}"}} 0.0' in metrics
    assert f'vlbot_upstream_up{{server="{servers[0].base_url}"}} 1.0' in metrics
    assert "vlbot_upstream_requests_total" in metrics and "vlbot_upstream_failovers_total" in metrics
    for secret in ("hunter2secret", "sk-one-secret", "sk-two-secret"):
        assert secret not in health.text and secret not in metrics
    assert all_down.status_code == 503 and all_down.json()["status"] == "degraded"
    assert all_down.json()["upstreams_up"] == "0/3"


def test_settings_build_a_pool_from_a_list_of_base_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLBOT_ENGINE", "openai")
    monkeypatch.setenv("VLBOT_REMOTE__BASE_URLS", '["http://a:8000/v1", "http://b:8080/v1"]')
    monkeypatch.setenv("VLBOT_REMOTE__API_KEY", "shared-key")
    pool = build_engine(Settings(_env_file=None))  # type: ignore[call-arg]
    assert isinstance(pool, RemotePool)
    assert [u.server for u in pool.upstreams()] == ["http://a:8000/v1", "http://b:8080/v1"]
    monkeypatch.setenv(
        "VLBOT_REMOTE__SERVERS",
        '[{"base_url": "http://gpu:8000/v1", "model": "big"}, {"base_url": "http://cpu:11434/v1"}]',
    )
    listed = Settings(_env_file=None).remote.server_list()  # type: ignore[call-arg]
    assert [(s.base_url, s.model) for s in listed] == [
        ("http://gpu:8000/v1", "big"), ("http://cpu:11434/v1", "Qwen/Qwen3-VL-2B-Instruct")
    ]
    assert all(s.api_key is not None and s.api_key.get_secret_value() == "shared-key" for s in listed)
    monkeypatch.delenv("VLBOT_REMOTE__BASE_URLS")
    monkeypatch.delenv("VLBOT_REMOTE__SERVERS")
    monkeypatch.setenv("VLBOT_REMOTE__BASE_URL", "http://one:8000/v1")
    single = build_engine(Settings(_env_file=None))  # type: ignore[call-arg]
    assert [u.server for u in single.upstreams()] == ["http://one:8000/v1"]  # type: ignore[attr-defined]
