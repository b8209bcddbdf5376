"""A fake OpenAI-compatible model server (like vLLM, llama.cpp's server or Ollama) on a free port:
`GET /v1/models` and streamed `POST /v1/chat/completions`, real HTTP through uvicorn.

Its `mode` can be changed while it runs: "ok"; "error" (HTTP 500 everywhere, health probe
included); "hang" (never answers, until the server stops); "break" (streams two pieces of the
answer, then the connection drops). `gate`, when set, holds every answer before its first piece
until it is released, so that requests stay in flight.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Mode = Literal["ok", "error", "hang", "break"]


async def serve(app: Starlette) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """Run `app` on 127.0.0.1 on a free port: (server, its task, the port)."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port


class FakeOpenAIServer:
    def __init__(self, name: str, mode: Mode = "ok") -> None:
        self.name = name
        self.mode: Mode = mode
        self.gate: asyncio.Event | None = None
        self.received: list[str] = []  # the question of every chat request that reached it
        self.answered: list[str] = []  # the questions it answered to the end
        self.in_flight = 0
        self.probes = 0
        self._stopping = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def answer(self, question: str) -> str:
        return f"{self.name} answers: {question}"

    async def start(self) -> FakeOpenAIServer:
        app = Starlette(
            routes=[
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
            ]
        )
        self._server, self._task, self.port = await serve(app)
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self.gate is not None:
            self.gate.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task

    async def _models(self, request: Request) -> Response:
        self.probes += 1
        if self.mode == "hang":
            await self._stopping.wait()
        if self.mode in ("error", "hang"):
            return _error(500, "model server down")
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        question = body["messages"][-1]["content"]
        self.received.append(question)
        mode = self.mode
        if mode == "hang":
            await self._stopping.wait()
        if mode in ("error", "hang"):
            return _error(500, "GPU on fire")
        self.in_flight += 1
        return StreamingResponse(self._pieces(question, mode), media_type="text/event-stream")

    async def _pieces(self, question: str, mode: Mode) -> AsyncIterator[str]:
        try:
            if self.gate is not None:
                await self.gate.wait()
            words = self.answer(question).split(" ")
            for i, word in enumerate(words):
                if mode == "break" and i == 2:
                    raise ConnectionResetError("the model server dropped the connection")
                yield _chunk(word if i == 0 else f" {word}")
            yield "data: [DONE]\n\n"
            self.answered.append(question)
        finally:
            self.in_flight -= 1


def _chunk(content: str) -> str:
    event = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    return f"data: {json.dumps(event)}\n\n"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error"}}, status_code=status)
