"""Helpers for the HTTP adapter tests: a running server on port 0 around a real core."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from adapters.http import HttpAdapter
from bot.admin import AdminPolicy
from bot.models import Message
from bot.settings import HttpSettings, Settings
from engine.intake import IntakeLimits, check_image
from tests.conftest import CoreStack, make_core
from tests.fakes import ScriptedEngine


class CheckingEngine(ScriptedEngine):
    """A scripted engine that validates images like the real engines do."""

    def check(self, message: Message) -> None:
        for part in message.images:
            check_image(part, IntakeLimits())


class LoadingEngine(ScriptedEngine):
    """An engine that never finishes loading."""

    @property
    def ready(self) -> bool:
        return False

    async def load(self) -> None:
        pass


@dataclass
class Server:
    adapter: HttpAdapter
    stack: CoreStack
    settings: Settings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.port}"

    @property
    def engine(self) -> ScriptedEngine:
        return self.stack.engine


def make_settings(tmp_path: Path, http: dict[str, Any] | None = None, **kw: Any) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path, http=HttpSettings(**{"port": 0, **(http or {})}), **kw
    )


@asynccontextmanager
async def running(
    tmp_path: Path,
    engine: ScriptedEngine | None = None,
    http: dict[str, Any] | None = None,
    runner: dict[str, Any] | None = None,
    admin_policy: AdminPolicy | None = None,
    **settings_kw: Any,
) -> AsyncIterator[Server]:
    """A server on the SQLite file in `tmp_path` (the same file again: a restart). With
    `admin_policy`: quotas and the usage ledger wired into the runner (core.admin)."""
    settings = make_settings(tmp_path, http, **settings_kw)
    adapter = HttpAdapter(settings)
    stack = await make_core(
        tmp_path / "vlbot.sqlite3",
        [adapter],
        engine or CheckingEngine(),
        admin_policy,
        retry_backoff_s=0.01,
        **(runner or {}),
    )
    try:
        yield Server(adapter, stack, settings)
    finally:
        await adapter.stop()
        await stack.close()


def png(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_answer(reply: Callable[[Any, Message], str] | None = None) -> Callable[[Any, Message], str]:
    """A script that says how many images it saw and what was asked."""
    return reply or (lambda h, m: f"{len(m.images)} image(s); you asked: {m.text}")


async def status_counts(url: str, **auth: Any) -> dict[str, float]:
    """Requests answered so far by status code, from the server's own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=url) as http:
        page = await http.get("/metrics", **auth)
    page.raise_for_status()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(page.text):
        if family.name == "vlbot_http_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    status = sample.labels["status"]
                    counts[status] = counts.get(status, 0) + sample.value
    return counts


def server_errors(counts: dict[str, float]) -> float:
    return sum(value for status, value in counts.items() if status.startswith("5"))


async def raw_exchange(port: int, head: str, body: bytes, *, hang_up: bool = False) -> bytes:
    """Send a request head and (part of) a body over a plain socket; then either hang up at
    once (a client that drops its upload) or read whatever the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        if hang_up:
            return b""
        return await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


OPEN_CLIENTS: list[openai.AsyncOpenAI] = []


def openai_client(url: str, key: str = "unused", timeout: float = 20.0) -> openai.AsyncOpenAI:
    """The official client for a test server, closed when the test ends (close_openai_clients)."""
    made = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=timeout)
    OPEN_CLIENTS.append(made)
    return made


@pytest.fixture(autouse=True)
async def close_openai_clients() -> AsyncIterator[None]:
    """Import into a test module that uses openai_client: its clients are closed on the test's
    own loop (one left to the garbage collector is closed later on a loop that is gone, an error
    logged in whichever test runs then)."""
    yield
    while OPEN_CLIENTS:
        await OPEN_CLIENTS.pop().close()
