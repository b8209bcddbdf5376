"""The OpenAI-compatible API, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.http import HttpAdapter
from bot.models import ConversationId, Role
from bot.texts import text
from tests.http_helpers import (
    CheckingEngine,
    LoadingEngine,
    close_openai_clients,  # noqa: F401 (autouse fixture)
    data_url,
    make_settings,
    openai_client,
    png,
    running,
)


def client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai_client(url, key)


def image_message(question: str, *images: bytes) -> Any:
    content: list[dict[str, object]] = [{"type": "text", "text": question}]
    content += [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [{"role": "user", "content": content}]


async def test_text_question_answered_with_usage(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        reply = await client(server.url).chat.completions.create(
            model="anything", messages=[{"role": "user", "content": "hello there"}]
        )
    assert reply.choices[0].message.content == "answer to: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert (
        reply.usage is not None and reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    )
    assert (reply.usage.model_extra or {})["total_time_ms"] >= 0


async def test_image_as_data_url_reaches_engine(tmp_path: Path) -> None:
    image = png(640, 480)
    engine = CheckingEngine(reply=lambda h, m: f"{len(m.images)} image, {m.images[0].size} bytes")
    async with running(tmp_path, engine) as server:
        reply = await client(server.url).chat.completions.create(
            model="vlbot",
            messages=image_message("what is this?", image),  # type: ignore[arg-type]
        )
    assert reply.choices[0].message.content == f"1 image, {len(image)} bytes"
    assert engine.calls[0].message.images[0].data == image
    assert engine.calls[0].message.text == "what is this?"
    # 640x480 = 300 visual tokens of 32x32 pixels, plus the words
    assert reply.usage is not None and reply.usage.prompt_tokens >= 300


async def test_streaming_chunks_end_with_done(tmp_path: Path) -> None:
    engine = CheckingEngine(reply=lambda h, m: "one two three four", delay_s=0.01)
    async with running(tmp_path, engine) as server:
        stream = await client(server.url).chat.completions.create(
            model="vlbot", messages=[{"role": "user", "content": "count"}], stream=True
        )
        pieces = [c async for c in stream]
        async with httpx.AsyncClient() as http:
            raw = await http.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
            )
    text_ = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text_.strip() == "one two three four"
    assert len([c for c in pieces if c.choices and c.choices[0].delta.content]) == 4
    assert pieces[-1].choices[0].finish_reason == "stop"
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


async def test_stateless_history_from_messages_then_forgotten(tmp_path: Path) -> None:
    image = png()
    engine = CheckingEngine(reply=lambda h, m: f"history {len(h)} turns")
    async with running(tmp_path, engine) as server:
        messages = [
            {"role": "system", "content": "Answer briefly."},
            *image_message("what is it?", image),
            {"role": "assistant", "content": "a red square"},
            {"role": "user", "content": "which color exactly?"},
        ]
        reply = await client(server.url).chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "history 2 turns"
        seen = engine.calls[0].history
        assert [t.role for t in seen] == [Role.USER, Role.ASSISTANT]
        assert seen[0].images[0].data == image and "Answer briefly." in seen[0].text
        for _ in range(100):  # the seeded conversation is forgotten once answered
            rows = await server.stack.db.fetchall("SELECT COUNT(*) AS n FROM turns")
            if rows[0]["n"] == 0:
                break
            await asyncio.sleep(0.02)
        assert rows[0]["n"] == 0


async def test_conversation_id_keeps_server_side_history(tmp_path: Path) -> None:
    image = png()
    engine = CheckingEngine(reply=lambda h, m: f"seen {len(h)} earlier turns")
    async with running(tmp_path, engine) as server:
        api = client(server.url)
        first = await api.chat.completions.create(
            model="m",
            messages=image_message("what?", image),
            extra_body={"conversation_id": "c-1"},  # type: ignore[arg-type]
        )
        second = await api.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "and then?"}],
            extra_body={"conversation_id": "c-1"},
        )
        assert first.choices[0].message.content == "seen 0 earlier turns"
        assert second.choices[0].message.content == "seen 2 earlier turns"
        async with httpx.AsyncClient(base_url=server.url) as http:
            for _ in range(100):  # the last answer is recorded just after it is delivered
                exported = (await http.get("/v1/conversations/c-1")).json()
                if len(exported["turns"]) == 4:
                    break
                await asyncio.sleep(0.02)
            url = next(p["url"] for p in exported["turns"][0]["parts"] if "url" in p)
            got = await http.get(url)
            bad = await http.get("/v1/conversations/bad%20id")
            markdown = await http.get("/v1/conversations/c-1", params={"format": "markdown"})
        assert markdown.headers["content-type"].startswith("text/markdown")
        assert "and then?" in markdown.text and "seen 2 earlier turns" in markdown.text
        assert "![" in markdown.text
        assert [t["role"] for t in exported["turns"]] == ["user", "assistant", "user", "assistant"]
        assert got.content == image and got.headers["content-type"] == "image/png"
        assert bad.status_code == 400


async def test_errors_raise_the_clients_exception_classes(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        api = client(server.url)
        with pytest.raises(openai.BadRequestError) as not_image:
            await api.chat.completions.create(
                model="m",
                messages=image_message("read this", b"%PDF-1.7 not an image at all"),  # type: ignore[arg-type]
            )
        with pytest.raises(openai.BadRequestError) as no_messages:
            await api.chat.completions.create(model="m", messages=[])
        with pytest.raises(openai.BadRequestError) as remote:
            await api.chat.completions.create(
                model="m",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "http://10.0.0.1/a.png"}}
                        ],
                    }
                ],
            )
        async with httpx.AsyncClient() as http:
            bad_json = await http.post(
                f"{server.url}/v1/chat/completions",
                content=b"{not json",
                headers={"content-type": "application/json"},
            )
    assert not_image.value.status_code == 400
    assert text("not_an_image") in not_image.value.message
    assert "messages" in no_messages.value.message
    assert "remote image URLs are turned off" in remote.value.message
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    assert bad_json.json()["error"]["code"] == "invalid_json"


async def test_api_keys_required_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-vlbot-test-0123456789"
    caplog.set_level(logging.DEBUG)
    async with running(tmp_path, http={"api_keys": [key]}) as server:
        with pytest.raises(openai.AuthenticationError):
            await client(server.url, "wrong-key").chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        async with httpx.AsyncClient() as http:
            missing = await http.post(f"{server.url}/v1/chat/completions", json={"messages": []})
        reply = await client(server.url, key).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    assert missing.status_code == 401 and "API key" in missing.json()["error"]["message"]
    assert reply.choices[0].message.content == "answer to: hi"
    assert "key#1" in caplog.text  # the access log names the key by number
    assert key not in caplog.text


async def test_refuses_public_bind_without_keys(tmp_path: Path) -> None:
    adapter = HttpAdapter(make_settings(tmp_path, {"host": "0.0.0.0"}))
    with pytest.raises(ValueError, match="without API keys"):
        await adapter.start(None)  # type: ignore[arg-type]


async def test_rate_limit_per_key_with_retry_after(tmp_path: Path) -> None:
    async with running(
        tmp_path, http={"api_keys": ["key-a-1234", "key-b-1234"], "rate_limit_per_minute": 2}
    ) as server:
        a = client(server.url, "key-a-1234")
        for _ in range(2):
            await a.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError) as limited:
            await a.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        other = await client(server.url, "key-b-1234").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert other.choices[0].message.content == "answer to: hi"


async def test_503_while_loading_and_health(tmp_path: Path) -> None:
    async with running(tmp_path, LoadingEngine()) as server:
        with pytest.raises(openai.APIStatusError) as loading:
            await client(server.url).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        async with httpx.AsyncClient() as http:
            health = await http.get(f"{server.url}/health")
    assert loading.value.status_code == 503
    assert loading.value.response.headers["retry-after"] == "10"
    assert text("engine_loading") in loading.value.message
    assert health.status_code == 503 and health.json()["status"] == "loading"


async def test_health_when_ready(tmp_path: Path) -> None:
    async with running(tmp_path) as server, httpx.AsyncClient() as http:
        health = await http.get(f"{server.url}/health")
        models = await client(server.url).models.list()
    body = health.json()
    assert health.status_code == 200 and body["status"] == "healthy"
    assert body["model"] == "script" and body["queue_depth"] == 0 and body["uptime_s"] >= 0
    assert {"dtype", "running", "engine"} <= set(body)
    assert [m.id for m in models.data] == ["script"]


async def test_503_when_queue_full(tmp_path: Path) -> None:
    async with running(tmp_path, runner={"max_queue": 0}) as server:
        with pytest.raises(openai.APIStatusError) as full:
            await client(server.url).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
    assert full.value.status_code == 503
    assert int(full.value.response.headers["retry-after"]) >= 1
    assert "busy" in full.value.message


async def test_engine_failure_is_a_clear_error_json_and_stream(tmp_path: Path) -> None:
    engine = CheckingEngine(fail_times=10)
    async with running(tmp_path, engine, runner={"max_attempts": 1}) as server:
        api = client(server.url)
        with pytest.raises(openai.InternalServerError) as failed:
            await api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        stream = await api.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError) as in_stream:
            async for _ in stream:
                pass
    assert "Sorry, that failed" in failed.value.message
    assert "Sorry, that failed" in in_stream.value.message


async def test_client_leaving_a_stream_cancels_the_job(tmp_path: Path) -> None:
    engine = CheckingEngine(hang=True)
    async with running(tmp_path, engine) as server:
        async with (
            httpx.AsyncClient() as http,
            http.stream(
                "POST",
                f"{server.url}/v1/chat/completions",
                json={"stream": True, "messages": [{"role": "user", "content": "long"}]},
            ) as response,
        ):
            lines = response.aiter_lines()
            assert (await lines.__anext__()).startswith("data: ")  # the role chunk
            for _ in range(100):
                if engine.running:
                    break
                await asyncio.sleep(0.02)
            assert engine.running == 1
            await response.aclose()  # the client hangs up mid-answer
        for _ in range(200):
            if engine.running == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.running == 0
        rows = await server.stack.db.fetchall("SELECT status FROM jobs")
    assert [r["status"] for r in rows] == ["cancelled"]


def _raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def _read_status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


async def test_413_from_content_length_without_reading_the_body(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        size = 11 * 1024 * 1024
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {size}\r\n\r\n"
        ).encode()

        def go() -> tuple[int, bytes]:
            sock = _raw_request(server.adapter.port or 0, head + b"x" * 65536)  # 64 KB of 11 MB sent
            try:
                return _read_status(sock)
            finally:
                sock.close()

        status, data = await asyncio.to_thread(go)
    assert status == 413
    assert b"request_too_large" in data


async def test_413_while_counting_a_chunked_body(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"a" * (1024 * 1024)

        def go() -> tuple[int, int]:
            sock = _raw_request(server.adapter.port or 0, head)
            sent = 0
            try:
                sock.settimeout(0.05)
                for _ in range(40):  # offers up to 40 MB
                    try:
                        sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                        sent += len(chunk)
                        peek = sock.recv(65536, socket.MSG_PEEK)
                        if peek:
                            break
                    except (TimeoutError, BlockingIOError):
                        continue
                    except OSError:
                        break
                sock.settimeout(10)
                return _read_status(sock)[0], sent
            finally:
                sock.close()

        status, sent = await asyncio.to_thread(go)
    assert status == 413
    assert sent < 20 * 1024 * 1024  # refused near the 13.8 MB JSON limit, long before 40 MB


async def test_metrics_parse_with_prometheus_parser(tmp_path: Path) -> None:
    async with running(tmp_path, CheckingEngine(delay_s=0.01)) as server:
        await client(server.url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a b c"}]
        )
        async with httpx.AsyncClient() as http:
            page = await http.get(f"{server.url}/metrics")
    families = {f.name: f for f in text_string_to_metric_families(page.text)}
    requests = [
        s
        for s in families["vlbot_http_requests"].samples
        if s.name.endswith("_total") and s.labels["route"] == "/v1/chat/completions"
    ]
    assert requests and requests[0].labels["status"] == "200" and requests[0].value == 1
    ttft = {s.name: s.value for s in families["vlbot_time_to_first_token_seconds"].samples}
    assert ttft["vlbot_time_to_first_token_seconds_count"] == 1
    assert families["vlbot_queue_depth"].samples[0].value == 0
    stored = {s.labels["status"]: s.value for s in families["vlbot_jobs_stored"].samples}
    assert stored == {"done": 1}
    finished = {
        (s.labels["adapter"], s.labels["status"]): s.value
        for s in families["vlbot_jobs_finished"].samples
        if s.name.endswith("_total")
    }
    assert finished == {("http", "done"): 1}


async def test_log_files_without_message_text(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    async with running(tmp_path, http={"log_dir": logs}) as server:
        reply = await client(server.url).chat.completions.create(
            model="m",
            messages=image_message("my private question", png()),  # type: ignore[arg-type]
        )
    rid = reply.id.removeprefix("chatcmpl-")
    access = (logs / "api_access.log").read_text()
    model = (logs / "model_loading.log").read_text()
    assert f"request_id={rid}" in access and "status=200" in access
    assert f"request_id={rid}" in model and "completion_tokens=" in model
    assert (logs / "error.log").exists()
    for content in (access, model):
        assert "private question" not in content


async def test_stateless_conversation_key_is_not_reused(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        api = client(server.url)
        await api.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        await api.chat.completions.create(model="m", messages=[{"role": "user", "content": "b"}])
        rows = await server.stack.db.fetchall("SELECT conversation FROM jobs")
    keys = {ConversationId.parse(r["conversation"]) for r in rows}
    assert len(keys) == 2 and all(k.platform == "http" for k in keys)


def test_error_body_shape() -> None:
    from adapters.http.errors import ApiError

    body = json.loads(bytes(ApiError(429, "slow down", code="rate_limit_exceeded").response().body))
    assert body == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


async def test_presets_by_name_and_by_response_format(tmp_path: Path) -> None:
    from openai import BadRequestError, OpenAI

    from tests.test_presets import GOOD

    engine = CheckingEngine(reply=lambda h, m: GOOD["triage"])
    async with running(tmp_path, engine=engine) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
        async with httpx.AsyncClient(base_url=server.url) as http:
            presets = (await http.get("/v1/presets")).json()["data"]
            triage = next(p for p in presets if p["name"] == "triage")
            by_name = await http.post("/v1/chat/completions", json={
                "model": "m", "preset": "triage",
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png())}},
                    {"type": "text", "text": "what broke?"}]}]})
        assert by_name.status_code == 200
        content = by_name.json()["choices"][0]["message"]["content"]
        assert "Billing" in content and "```json" in content  # readable, with the JSON

        reply = await asyncio.to_thread(
            client.chat.completions.create, model="m",
            response_format=triage["response_format"],
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(png())}},
                {"type": "text", "text": "what broke?"}]}])
        data = json.loads(reply.choices[0].message.content or "")
        assert data["product_area"] == "Billing" and data["severity"] == "blocker"

        with pytest.raises(BadRequestError):
            await asyncio.to_thread(
                client.chat.completions.create, model="m",
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
                messages=[{"role": "user", "content": "hi"}])


async def test_basic_auth_guards_the_web_page_and_its_api_calls(tmp_path: Path) -> None:
    http = {"web_user": "team", "web_password": "s3cret-pass", "api_keys": ["sk-test-key-123"]}
    async with running(tmp_path, CheckingEngine(), http=http) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            page = await client.get("/")
            assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
            wrong = await client.get("/", auth=("team", "nope"))
            assert wrong.status_code == 401
            ok = await client.get("/", auth=("team", "s3cret-pass"))
            assert ok.status_code == 200 and "<html" in ok.text.lower()
            # the page's own API calls go through with the same credentials...
            asked = await client.post("/v1/chat/completions", auth=("team", "s3cret-pass"), json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert asked.status_code == 200
            # ...and API clients with a key; nobody else
            keyed = await client.get("/v1/models", headers={"Authorization": "Bearer sk-test-key-123"})
            assert keyed.status_code == 200
            assert (await client.get("/v1/models")).status_code == 401
