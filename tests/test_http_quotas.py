"""Quotas on the HTTP API, each kind driven to its limit for an API key with the official `openai`
client: 429 in OpenAI's error shape naming the limit (code, param, the user's text in their
language) with Retry-After for the reset; no job queued; another key still served."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bot.admin import AdminPolicy
from bot.admin_types import Limits, next_reset, reset_text
from bot.models import GenerationParams, Message, Turn
from bot.texts import text
from tests.http_helpers import (  # noqa: F401 (close_openai_clients: autouse fixture)
    CheckingEngine,
    Server,
    close_openai_clients,
    data_url,
    openai_client,
    png,
    running,
)

ADMIN = "admin-secret-key-0123456789"
SETTINGS_KEY = "settings-user-key-0123456789"
HTTP = {"admin_key": ADMIN, "api_keys": [SETTINGS_KEY]}


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai_client(url, key)


async def ask(server: Server, key: str, question: str = "hello", images: int = 0, **kw: Any) -> str:
    content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    content += [{"type": "image_url", "image_url": {"url": data_url(png(40 + i, 40))}} for i in range(images)]
    async with client(server.url, key) as api:  # closed here, not by the garbage collector later
        reply = await api.chat.completions.create(
            model="vlbot", messages=[{"role": "user", "content": content}], **kw  # type: ignore[list-item]
        )
        if kw.get("stream"):
            return "".join([c.choices[0].delta.content or "" async for c in reply if c.choices])  # type: ignore[union-attr]
    return reply.choices[0].message.content or ""  # type: ignore[union-attr]


async def new_key(server: Server, name: str, **quota: Any) -> str:
    async with httpx.AsyncClient(base_url=server.url) as http:
        made = await http.post(
            "/v1/admin/keys", json={"name": name, "quota": quota},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
    assert made.status_code == 201, made.text
    secret: str = made.json()["secret"]
    return secret


async def jobs_and_calls(server: Server) -> tuple[int, int]:
    return sum((await server.stack.jobs.counts()).values()), len(server.engine.calls)


async def until_settled(server: Server, requests: int) -> None:
    """Wait until the ledger holds `requests` settled jobs (written after the answer is out)."""
    from tests.admin_helpers import until

    async def settled() -> bool:
        records = await server.stack.core.admin.usage_records(0)
        return sum(r.status != "rejected" for r in records) >= requests

    await until(settled, f"{requests} settled jobs in the ledger")


async def refused(
    server: Server, key: str, code: str, limit: str, *, question: str = "one more", images: int = 0,
    lang: str | None = None, stream: bool = False,
) -> openai.RateLimitError:
    """Ask once over the quota: a 429 naming the limit, and nothing queued."""
    before = await jobs_and_calls(server)
    headers = {"Accept-Language": lang} if lang else None
    with pytest.raises(openai.RateLimitError) as caught:
        await ask(server, key, question, images, stream=stream, extra_headers=headers)
    error = caught.value
    assert error.status_code == 429
    assert error.code == code
    assert error.type == "rate_limit_error"
    message = error.body["message"]  # type: ignore[index]
    assert limit in message
    assert await jobs_and_calls(server) == before  # no job written, the engine never asked
    retry_after = float(error.response.headers["retry-after"])
    if code == "quota_waiting":
        assert retry_after >= 1
    else:  # the next 00:00 UTC
        assert reset_text(next_reset(time.time())) in message
        assert abs(retry_after - (next_reset(time.time()) - time.time())) < 5
    return error


async def test_requests_per_day(tmp_path: Path) -> None:
    async with running(tmp_path, http=HTTP, admin_policy=AdminPolicy()) as server:
        limited, other = await new_key(server, "limited", requests_per_day=2), await new_key(server, "other")
        assert await ask(server, limited, "one") == "answer to: one"
        assert await ask(server, limited, "two") == "answer to: two"
        await until_settled(server, 2)
        error = await refused(server, limited, "quota_requests", "2")
        assert error.param == "requests_per_day"
        resets = reset_text(next_reset(time.time()))
        assert error.body["message"] == text("quota_requests", limit=2, used=2, resets=resets)  # type: ignore[index]
        zh = await refused(server, limited, "quota_requests", "2", lang="zh-CN", stream=True)
        assert zh.body["message"] == text("quota_requests", "zh", limit=2, used=2, resets=resets)  # type: ignore[index]
        assert await ask(server, other, "me too") == "answer to: me too"


async def test_images_per_day(tmp_path: Path) -> None:
    engine = CheckingEngine(reply=lambda h, m: f"{len(m.images)} image(s)")
    async with running(tmp_path, engine, http=HTTP, admin_policy=AdminPolicy()) as server:
        limited, other = await new_key(server, "limited", images_per_day=2), await new_key(server, "other")
        assert await ask(server, limited, "two pictures", images=2) == "2 image(s)"
        await until_settled(server, 1)
        error = await refused(server, limited, "quota_images", "2", images=1)
        assert error.param == "images_per_day"
        assert await ask(server, limited, "words only") == "0 image(s)"  # text still goes
        assert await ask(server, other, "mine", images=3) == "3 image(s)"


async def test_engine_seconds_per_day(tmp_path: Path) -> None:
    engine = CheckingEngine(delay_s=0.1)  # three words: about 0.3 s of engine time
    async with running(tmp_path, engine, http=HTTP, admin_policy=AdminPolicy()) as server:
        limited = await new_key(server, "limited", engine_seconds_per_day=0.2)
        other = await new_key(server, "other")
        assert await ask(server, limited, "slow") == "answer to: slow"
        await until_settled(server, 1)
        error = await refused(server, limited, "quota_engine", "0.2")
        assert error.param == "engine_seconds_per_day"
        assert await ask(server, other, "fine") == "answer to: fine"


class GatedEngine(CheckingEngine):
    """Holds a question "hold" until `release` is set; answers anything else at once."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = asyncio.Event()  # the held job is running
        self.release = asyncio.Event()

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        if message.text == "hold":
            self.holding.set()
            await self.release.wait()
        async for piece in super().stream(history, message, params):
            yield piece


async def test_jobs_waiting_at_once(tmp_path: Path) -> None:
    engine = GatedEngine()
    async with running(
        tmp_path, engine, http=HTTP, admin_policy=AdminPolicy(), runner={"max_concurrency": 2}
    ) as server:
        limited, other = await new_key(server, "limited", max_waiting=1), await new_key(server, "other")
        first = asyncio.create_task(ask(server, limited, "hold"))
        await asyncio.wait_for(engine.holding.wait(), 20)
        error = await refused(server, limited, "quota_waiting", "1")
        assert error.param == "max_waiting"
        assert await ask(server, other, "meanwhile") == "answer to: meanwhile"
        engine.release.set()
        assert await first == "answer to: hold"


async def test_settings_default_quota_applies_to_settings_keys_and_an_override_lifts_it(
    tmp_path: Path,
) -> None:
    policy = AdminPolicy(defaults=Limits(requests_per_day=1))
    async with running(tmp_path, http=HTTP, admin_policy=policy) as server:
        generous = await new_key(server, "generous", requests_per_day=5)
        assert await ask(server, SETTINGS_KEY, "once") == "answer to: once"
        await until_settled(server, 1)
        await refused(server, SETTINGS_KEY, "quota_requests", "1")
        for n in range(2):
            assert await ask(server, generous, f"q{n}") == f"answer to: q{n}"
