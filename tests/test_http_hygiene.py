"""HTTP hygiene: a dropped upload is the client's doing (499, logged at INFO), a stalled body is
answered 408 after VLBOT_HTTP__BODY_TIMEOUT_S, /metrics needs the API key when keys are set,
and text that is not valid Unicode or JSON nested without end is a 400, never a 500 — with the
user's text kept out of the log files."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest

from tests.http_helpers import raw_exchange, running, server_errors, status_counts

KEY = "sk-hygiene-0123456789"


def post_head(port: int, length: int, content_type: str = "application/json") -> str:
    return (f"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1:{port}\n"
            f"Content-Type: {content_type}\nContent-Length: {length}\n")


async def test_a_dropped_upload_is_a_499_logged_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vlbot")
    async with running(tmp_path) as server:
        port = server.adapter.port
        assert port is not None
        await raw_exchange(port, post_head(port, 500_000), b'{"messages": [' + b" " * 2000,
                           hang_up=True)
        for _ in range(250):  # the server notices the hang-up on its next read
            counts = await status_counts(server.url)
            if "499" in counts:
                break
            await asyncio.sleep(0.02)
    assert counts.get("499") == 1
    assert server_errors(counts) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "event=client_gone" in caplog.text


async def test_a_stalled_body_is_answered_408(tmp_path: Path) -> None:
    async with running(tmp_path, http={"body_timeout_s": 0.3}) as server:
        port = server.adapter.port
        assert port is not None
        answer = await raw_exchange(port, post_head(port, 1000), b'{"messages": [')
        counts = await status_counts(server.url)
        after = await httpx.AsyncClient().post(  # and the server goes on serving
            f"{server.url}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "0.3 s" in error["message"]
    assert counts.get("408") == 1 and server_errors(counts) == 0
    assert after.status_code == 200


async def test_metrics_need_the_api_key_unless_made_public(tmp_path: Path) -> None:
    http = {"api_keys": [KEY], "web_user": "ops", "web_password": "ops-pass-1"}
    async with running(tmp_path / "closed", http=http) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            anonymous = await client.get("/metrics")
            wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
            keyed = await client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
            web = await client.get("/metrics", auth=("ops", "ops-pass-1"))
    async with running(tmp_path / "open", http={**http, "metrics_public": True}) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            public = await client.get("/metrics")
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert anonymous.json()["error"]["code"] == "missing_api_key"
    assert keyed.status_code == 200 and "vlbot_http_requests" in keyed.text
    assert web.status_code == 200
    assert public.status_code == 200 and "vlbot_http_requests" in public.text


async def test_invalid_unicode_and_deep_nesting_are_400_and_stay_out_of_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vlbot")
    logs = tmp_path / "logs"
    secret = "my private words"
    bodies = {
        "surrogate in content": f'{{"messages": [{{"role": "user", "content": "{secret} \\ud800"}}]}}',
        "surrogate in a part": (
            f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": '
            f'"{secret} \\udfff"}}]}}]}}'),
        "surrogate in a key": f'{{"messages": [{{"role": "user", "content": "{secret}"}}], '
                              f'"x\\ud83d": 1}}',
        "surrogate in conversation_id": (
            f'{{"conversation_id": "c\\ud800", "messages": [{{"role": "user", "content": "{secret}"}}]}}'),
        "nested 100000 deep": '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "nested 40 deep": '{"messages": [{"role": "user", "content": "' + secret + '"}], "x": '
                          + "[" * 40 + "]" * 40 + "}",
    }
    async with running(tmp_path, http={"log_dir": logs}) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            replies = {
                name: await http.post("/v1/chat/completions", content=body.encode(),
                                      headers={"Content-Type": "application/json"})
                for name, body in bodies.items()
            }
        counts = await status_counts(server.url)
    for name, reply in replies.items():
        assert reply.status_code == 400, (name, reply.text)
        error = reply.json()["error"]
        if name.startswith("surrogate"):
            assert error["code"] == "invalid_text" and "Unicode" in error["message"], name
        else:
            assert error["code"] == "invalid_json" and "nested too deeply" in error["message"]
    assert server_errors(counts) == 0
    written = "".join(p.read_text() for p in logs.iterdir())
    assert "error.log" in {p.name for p in logs.iterdir()}
    assert secret not in written and secret not in caplog.text
