"""The remote engine against vlbot's own API (and a failing server) as the remote."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bot.engine_port import EngineError
from bot.models import GenerationParams, ImagePart, InputRejected, Message, Role, Turn
from engine.remote import OpenAIRemoteEngine, RemoteEngineError
from tests.fake_openai import serve
from tests.http_helpers import CheckingEngine, png, running


async def collect(engine: OpenAIRemoteEngine, history: list[Turn], message: Message) -> str:
    return "".join(
        [p async for p in engine.stream(history, message, GenerationParams(max_new_tokens=50))]
    )


async def test_streams_from_vlbot_api_with_images_and_history(tmp_path: Path) -> None:
    image = png()
    backend = CheckingEngine(
        reply=lambda h, m: (
            f"{len(h)} earlier turns, {len(m.images) + sum(len(t.images) for t in h)} images, q={m.text}"
        )
    )
    async with running(tmp_path, backend, http={"api_keys": ["remote-key-1234"]}) as server:
        remote = OpenAIRemoteEngine(f"{server.url}/v1", "remote-key-1234", "vlbot-remote")
        await remote.load()
        assert remote.ready
        first = await collect(remote, [], Message.of("what is it?", ImagePart(image, "image/png")))
        history = [
            Turn(Role.USER, (ImagePart(image, "image/png"), *Message.of("what is it?").parts)),
            Turn(Role.ASSISTANT, Message.of(first).parts),
        ]
        follow_up = await collect(remote, history, Message.of("and the color?"))
        await remote.close()
    assert first.strip() == "0 earlier turns, 1 images, q=what is it?"
    assert follow_up.strip() == "2 earlier turns, 1 images, q=and the color?"
    assert backend.calls[1].history[0].images[0].data == image


async def test_remote_engine_behind_a_full_core(tmp_path: Path) -> None:
    """A front-end vlbot whose engine is another vlbot: the user gets the backend's answer."""
    from tests.conftest import make_core
    from tests.fakes import RecordingAdapter, incoming

    async with running(tmp_path / "backend", CheckingEngine()) as server:
        front_adapter = RecordingAdapter("test")
        remote = OpenAIRemoteEngine(f"{server.url}/v1", None, "m")
        front = await make_core(tmp_path / "front.sqlite3", [front_adapter], remote)  # type: ignore[arg-type]
        try:
            await front.core.submit(incoming("c1", "hello remote"))
            finals = await front_adapter.wait_for_finals(1)
        finally:
            await front.close()
            await remote.close()
    assert finals[0].event.text == "answer to: hello remote"  # type: ignore[union-attr]


async def test_timeout_is_a_clear_error(tmp_path: Path) -> None:
    async with running(tmp_path, CheckingEngine(hang=True)) as server:
        remote = OpenAIRemoteEngine(f"{server.url}/v1", None, "m", timeout_s=0.5)
        with pytest.raises(RemoteEngineError, match="did not answer within") as caught:
            await collect(remote, [], Message.of("hi"))
        await remote.close()
    assert caught.value.code == "remote_timeout"


def failing_server(status: int, message: str) -> Starlette:
    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "server_error"}}, status_code=status)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (500, "answered HTTP 500: GPU on fire"),
        (503, "busy"),
        (401, "refused our API key"),
        (400, "refused"),
    ],
)
async def test_error_statuses_become_clear_errors(status: int, expected: str) -> None:
    server, task, port = await serve(failing_server(status, "GPU on fire"))
    remote = OpenAIRemoteEngine(f"http://127.0.0.1:{port}/v1", "k", "m")
    try:
        with pytest.raises((EngineError, InputRejected)) as caught:
            await collect(remote, [], Message.of("hi"))
    finally:
        await remote.close()
        server.should_exit = True
        await task
    assert expected in str(caught.value)
    assert f"127.0.0.1:{port}" in str(caught.value) or status == 400
    if status == 400:
        assert isinstance(caught.value, InputRejected) and caught.value.code == "remote_rejected"


async def test_unreachable_server_and_local_image_check() -> None:
    remote = OpenAIRemoteEngine("http://127.0.0.1:9/v1", None, "m", timeout_s=2)
    await remote.load()  # logs, does not fail: the server may come up later
    with pytest.raises(
        RemoteEngineError, match=r"cannot reach the model server at http://127\.0\.0\.1:9/v1"
    ):
        await collect(remote, [], Message.of("hi"))
    with pytest.raises(InputRejected) as bad:
        remote.check(Message.of("x", ImagePart(b"not an image", "image/png")))
    assert bad.value.code == "not_an_image"
    await remote.close()
