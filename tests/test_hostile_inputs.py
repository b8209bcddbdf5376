"""Hostile inputs through the HTTP API and the CLI, on the real engine (tiny model): each gets an
answer or a clear, specific refusal; the process keeps serving; nothing is left in temp."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot import texts
from bot.cli import main as vlbot_main
from engine.intake import IntakeLimits
from engine.qwen.engine import QwenVLEngine
from tests.hostile import CASES, HTTP_REQUESTS, Case
from tests.http_helpers import data_url, png, raw_exchange, running, server_errors, status_counts

IDS = [c.name for c in CASES]


@pytest.fixture(scope="module")
def engine(tiny_qwen3: Path) -> Iterator[QwenVLEngine]:
    qwen = QwenVLEngine(str(tiny_qwen3), dtype="float32", limits=IntakeLimits())
    asyncio.run(qwen.load())
    yield qwen


def refusal_prefix(code: str) -> str:
    """The fixed start of the catalogue text for `code` (before its first placeholder)."""
    return texts.CATALOGUE["en"][code].split("{")[0].strip()


@pytest.fixture
def private_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


async def test_hostile_inputs_through_the_http_api(
    engine: QwenVLEngine, tmp_path: Path, private_tmp: Path
) -> None:
    async with running(tmp_path, engine=engine, max_new_tokens=4) as server:  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            for case in CASES:
                files = [("image", (f.name, f.data, f.mime)) for f in case.files]
                reply = await client.post(
                    "/v1/chat/completions",
                    data={"prompt": case.text, "conversation_id": f"hostile-{case.name}"},
                    files=files or None,
                )
                assert "Traceback" not in reply.text, case.name
                if case.expect == "answer":
                    assert reply.status_code == 200, (case.name, reply.text)
                    assert reply.json()["choices"][0]["message"]["content"], case.name
                elif "no-file" in case.tags:
                    assert reply.status_code == 400, (case.name, reply.text)
                elif "big" in case.tags:  # refused while reading the body, before buffering
                    assert reply.status_code == 413, (case.name, reply.text)
                    assert "limit" in reply.json()["error"]["message"]
                else:
                    assert reply.status_code in (400, 413), (case.name, reply.text)
                    error = reply.json()["error"]
                    assert error["code"] == case.expect, (case.name, error)
                    assert error["message"].startswith(refusal_prefix(case.expect)), error
            # still serving, and an unrelated chat is untouched
            after = await client.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "still there?"}]})
            assert after.status_code == 200
    assert not any(private_tmp.iterdir())  # noqa: ASYNC240 (no upload left on disk)


async def test_hostile_requests_through_the_http_api(engine: QwenVLEngine, tmp_path: Path) -> None:
    """Broken text and JSON, unsupported parameters, stalled and dropped bodies, another caller's
    conversation: each a clear 4xx (or 499 for the client that left), 0 server errors."""
    keys = ["sk-hostile-alice-0001", "sk-hostile-mallory-02"]
    alice, mallory = ({"Authorization": f"Bearer {k}"} for k in keys)
    http = {"api_keys": keys, "body_timeout_s": 0.5}
    async with running(tmp_path, engine=engine, http=http) as server:  # type: ignore[arg-type]
        port = server.adapter.port
        assert port is not None
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=mallory) as client:
            for request in HTTP_REQUESTS:
                reply = await client.post("/v1/chat/completions", content=request.body,
                                          headers={"Content-Type": "application/json"})
                assert reply.status_code == request.status, (request.name, reply.text)
                assert reply.json()["error"]["code"] == request.code, (request.name, reply.text)

            head = (f"POST /v1/chat/completions HTTP/1.1\nHost: x\nAuthorization: Bearer {keys[1]}\n"
                    "Content-Type: application/json\nContent-Length: 4000\n")
            stalled = await raw_exchange(port, head, b'{"messages": [')
            assert stalled.startswith(b"HTTP/1.1 408"), stalled[:200]
            await raw_exchange(port, head, b'{"messages": [', hang_up=True)

            mine = await client.post("/v1/chat/completions", headers=alice, json={
                "model": "m", "max_tokens": 4, "conversation_id": "alice-1",
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "what is it?"},
                    {"type": "image_url", "image_url": {"url": data_url(png())}}]}]})
            assert mine.status_code == 200, mine.text
            for _ in range(200):  # recorded just after delivery
                own = await client.get("/v1/conversations/alice-1", headers=alice)
                if own.status_code == 200 and len(own.json()["turns"]) == 2:
                    break
                await asyncio.sleep(0.02)
            sha = next(p["image"] for p in own.json()["turns"][0]["parts"] if "image" in p)
            for reply in (await client.get("/v1/conversations/alice-1"),
                          await client.delete("/v1/conversations/alice-1"),
                          await client.get(f"/v1/images/{sha}")):
                assert reply.status_code == 404, reply.text
            assert (await client.get(f"/v1/images/{sha}", headers=alice)).status_code == 200

            for _ in range(250):  # the dropped upload is counted once the server notices
                counts = await status_counts(server.url, headers=alice)
                if "499" in counts:
                    break
                await asyncio.sleep(0.02)
    assert counts.get("499") == 1 and counts.get("408") == 1
    assert server_errors(counts) == 0, counts


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hostile_inputs_through_the_cli(
    case: Case, tiny_qwen3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for i, f in enumerate(case.files):
        path = tmp_path / f"{i}-{Path(f.name).name}"
        path.write_bytes(f.data)
        paths.append(str(path))
    rc = vlbot_main(["ask", "--model", str(tiny_qwen3), "--max-new-tokens", "4", *paths, case.text])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    if case.expect == "answer":
        assert rc == 0, out.err
        assert out.out.strip()
    else:
        assert rc == 2
        last = out.err.strip().splitlines()[-1]
        assert last.startswith("vlbot: " + refusal_prefix(case.expect)), last
