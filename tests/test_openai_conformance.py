"""OpenAI conformance, through the official `openai` client (and httpx for the raw shapes):
finish_reason, unsupported parameters, error shapes of unknown routes, the model's name, the
engine's own token counts, and the seed's required prompt."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bot.engine_port import EngineInfo
from engine.intake import IntakeLimits
from engine.qwen.engine import QwenVLEngine
from tests.http_helpers import (  # noqa: F401 (close_openai_clients: autouse fixture)
    CheckingEngine,
    close_openai_clients,
    openai_client,
    png,
    running,
)

USER: Any = [{"role": "user", "content": "count for me"}]


def client(url: str) -> openai.AsyncOpenAI:
    return openai_client(url, timeout=30)


def counting() -> CheckingEngine:
    return CheckingEngine(reply=lambda h, m: "one two three four five six")


async def test_finish_reason_length_when_max_tokens_cuts_the_answer(tmp_path: Path) -> None:
    async with running(tmp_path, counting()) as server:
        api = client(server.url)
        cut = await api.chat.completions.create(model="m", messages=USER, max_tokens=3)
        whole = await api.chat.completions.create(model="m", messages=USER, max_tokens=50)
        stream = await api.chat.completions.create(model="m", messages=USER, max_tokens=2,
                                                   stream=True)
        chunks = [c async for c in stream]
    assert cut.choices[0].message.content == "one two three"
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 3
    assert whole.choices[0].finish_reason == "stop"
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split() == [
        "one", "two"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stop": ["\n"]}, "stop"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
async def test_unsupported_parameters_are_refused_by_name(
    tmp_path: Path, extra: dict[str, Any], param: str
) -> None:
    engine = counting()
    async with running(tmp_path, engine) as server:
        api = client(server.url)
        with pytest.raises(openai.BadRequestError) as refused:
            await api.chat.completions.create(model="m", messages=USER, **extra)
        harmless = await api.chat.completions.create(  # the defaults a client may send are fine
            model="m", messages=USER, n=1, logprobs=False, stop=None, tools=[]
        )
    body: Any = refused.value.body
    assert body["param"] == param and f"'{param}'" in body["message"]
    assert body["code"] == "unsupported_parameter"
    assert harmless.choices[0].finish_reason == "stop"
    assert len(engine.calls) == 1  # the refused request never reached the engine


async def test_unknown_routes_and_methods_answer_in_the_error_shape(tmp_path: Path) -> None:
    async with running(tmp_path) as server, httpx.AsyncClient(base_url=server.url) as http:
        missing = await http.get("/v1/embeddings")
        wrong = await http.get("/v1/chat/completions")
        with pytest.raises(openai.NotFoundError):
            await client(server.url).embeddings.create(model="m", input="x")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Invalid URL (GET /v1/embeddings)."
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    error = wrong.json()["error"]
    assert error["type"] == "invalid_request_error" and "POST" in error["message"]


class FolderEngine(CheckingEngine):
    """A scripted engine whose model is a local folder, as `VLBOT_MODEL=/path/to/folder` gives."""

    folder: str = ""

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(name="scripted", model=self.folder)


async def test_the_model_id_is_a_name_not_the_servers_path(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "Qwen3-VL-2B-Instruct"
    folder.mkdir(parents=True)
    engine = FolderEngine()
    engine.folder = str(folder)
    async with running(tmp_path, engine) as server:
        api = client(server.url)
        models = await api.models.list()
        reply = await api.chat.completions.create(model="m", messages=USER)
        async with httpx.AsyncClient(base_url=server.url) as http:
            health = (await http.get("/health")).json()
    assert [m.id for m in models.data] == ["Qwen3-VL-2B-Instruct"]
    assert reply.model == "Qwen3-VL-2B-Instruct" and health["model"] == "Qwen3-VL-2B-Instruct"
    assert str(tmp_path) not in str(health)


async def test_usage_reports_the_engines_own_prompt_count(tmp_path: Path) -> None:
    async with running(tmp_path, counting()) as server:
        api = client(server.url)
        first = await api.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a b c d e f g h"}],
            extra_body={"conversation_id": "count"})
        follow = await api.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}],
            extra_body={"conversation_id": "count"})
    assert first.usage is not None and follow.usage is not None
    assert first.usage.prompt_tokens == 8  # the fake engine counts words
    # the follow-up's prompt is the whole conversation (8 + 6 + 1 words), not the new message
    assert follow.usage.prompt_tokens == 15


async def test_seed_form_needs_a_prompt(tmp_path: Path) -> None:
    engine = counting()
    async with running(tmp_path, engine) as server, httpx.AsyncClient(base_url=server.url) as http:
        for data in ({"prompt": ""}, {"prompt": "   "}, {}):
            reply = await http.post("/v1/chat/completions", data=data,
                                    files={"image": ("a.png", png(), "image/png")})
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"]["param"] == "prompt"
    assert engine.calls == []


@pytest.fixture(scope="module")
def tiny_engine(tiny_qwen3: Path) -> Iterator[QwenVLEngine]:
    engine = QwenVLEngine(str(tiny_qwen3), dtype="float32", limits=IntakeLimits())
    asyncio.run(engine.load())
    yield engine


async def test_real_engine_reports_length_and_its_token_count(
    tiny_engine: QwenVLEngine, tmp_path: Path
) -> None:
    async with running(tmp_path, tiny_engine) as server:  # type: ignore[arg-type]
        api = client(server.url)
        first = await api.chat.completions.create(
            model="m", messages=USER, max_tokens=3, extra_body={"conversation_id": "real"})
        first_stats = tiny_engine.last_stats
        follow = await api.chat.completions.create(
            model="m", messages=USER, max_tokens=3, extra_body={"conversation_id": "real"})
        stream = await api.chat.completions.create(model="m", messages=USER, max_tokens=2,
                                                   stream=True)
        chunks = [c async for c in stream]
        models = await api.models.list()
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None and first_stats is not None
    assert first.usage.prompt_tokens == first_stats.prompt_tokens  # the tokenizer's count
    assert first.usage.completion_tokens == 3
    assert follow.usage is not None and follow.usage.prompt_tokens > first.usage.prompt_tokens + 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert models.data[0].id == "tiny-qwen3"
