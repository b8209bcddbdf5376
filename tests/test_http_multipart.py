"""The seed's multipart form on /v1/chat/completions, with raw HTTP and with a seed-style client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from bot.texts import text
from tests.http_helpers import CheckingEngine, png, running


async def test_multipart_image_and_prompt(tmp_path: Path) -> None:
    image = png(320, 240)
    engine = CheckingEngine(reply=lambda h, m: f"{m.images[0].name}: {m.text}")
    async with running(tmp_path, engine) as server, httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post(
            "/v1/chat/completions",
            files={"image": ("photo.png", image, "image/png")},
            data={"prompt": "Describe this image."},
        )
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "photo.png: Describe this image."
    assert body["usage"]["total_time_ms"] >= 0 and body["usage"]["prompt_tokens"] >= 75
    assert engine.calls[0].message.images[0].data == image


async def test_multipart_conversation_follow_up(tmp_path: Path) -> None:
    engine = CheckingEngine(reply=lambda h, m: f"{len(h)} earlier turns")
    async with running(tmp_path, engine) as server, httpx.AsyncClient(base_url=server.url) as http:
        first = await http.post(
            "/v1/chat/completions",
            files={"image": ("a.png", png(), "image/png")},
            data={"prompt": "what is it?", "conversation_id": "seed-1"},
        )
        second = await http.post(
            "/v1/chat/completions",
            files={"prompt": (None, "and the color?"), "conversation_id": (None, "seed-1")},
        )
    assert first.json()["choices"][0]["message"]["content"] == "0 earlier turns"
    assert first.json()["conversation_id"] == "seed-1"
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["message"]["content"] == "2 earlier turns"
    assert engine.calls[1].history[0].images  # the follow-up still sees the image


async def test_multipart_errors(tmp_path: Path) -> None:
    async with running(tmp_path) as server, httpx.AsyncClient(base_url=server.url) as http:
        not_image = await http.post(
            "/v1/chat/completions",
            files={"image": ("doc.txt", b"hello, plain text", "text/plain")},
            data={"prompt": "read it"},
            headers={"Accept-Language": "zh-CN"},
        )
        empty = await http.post("/v1/chat/completions", files={"other": ("x", b"1")})
        broken = await http.post(
            "/v1/chat/completions",
            content=b"--zz\r\nnonsense",
            headers={"content-type": "multipart/form-data; boundary=zz"},
        )
    assert not_image.status_code == 400
    assert not_image.json()["error"]["message"] == text("not_an_image", "zh")
    assert empty.status_code == 400 and "'image'" in empty.json()["error"]["message"]
    assert broken.status_code == 400


async def test_multipart_image_over_limit_is_413(tmp_path: Path) -> None:
    async with (
        running(tmp_path, max_image_mb=1.0) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        big = await http.post(
            "/v1/chat/completions",
            files={"image": ("big.png", b"\x89PNG" + b"0" * 1_300_000, "image/png")},
            data={"prompt": "x"},
        )
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    assert big.json()["error"]["message"] == "That image is 1.3 MiB; the limit is 1 MiB."


def seed_client(url: str, image: bytes) -> tuple[str, int, dict[str, object]]:
    """Written the way the seed's README shows its client (requests, multipart image + prompt)."""
    import requests

    health = requests.get(f"{url}/health", timeout=10).json()
    r = requests.post(
        f"{url}/v1/chat/completions",
        files={"image": ("test.jpg", image, "image/jpeg")},
        data={"prompt": "Describe this image in detail."},
        timeout=60,
    )
    r.raise_for_status()
    result = r.json()
    return result["choices"][0]["message"]["content"], result["usage"]["total_time_ms"], health


async def test_client_written_the_seeds_way(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        content, total_ms, health = await asyncio.to_thread(seed_client, server.url, png())
    assert content == "answer to: Describe this image in detail."
    assert isinstance(total_ms, int) and total_ms >= 0
    assert health["status"] == "healthy"
