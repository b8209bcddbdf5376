"""A fake Telegram Bot API server (aiohttp.web on port 0) for adapter tests.

It speaks the real wire protocol python-telegram-bot uses: POST /bot<token>/<method> with form
fields (strings raw, everything else JSON-encoded), answers `{"ok": true, "result": ...}` or a
Telegram-shaped error, long-polls getUpdates with offsets, serves files under
/file/bot<token>/<path>, and records every call so tests can assert what a user saw.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures" / "telegram"
TOKEN = "7654321:AAF-secret-token-do-not-log_x9"
BOT_ID = 7654321
BOT_USERNAME = "vlbot_test_bot"
# Fields PTB sends as raw strings (never JSON-encoded); everything else is JSON.
_RAW_STRING_FIELDS = {"text", "caption", "file_id", "action", "url", "secret_token", "description"}
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are"
    " exactly the same as a current content and reply markup of the message"
)


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return data


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float  # time.monotonic()
    status: int = 200

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.params.items() if k not in ("timeout", "limit")}
        return f"{self.method}({shown}){'' if self.status == 200 else f' -> {self.status}'}"


@dataclass
class ChatMessage:
    chat_id: int
    message_id: int
    text: str
    from_bot: bool
    reply_to: int | None = None
    thread_id: int | None = None
    deleted: bool = False
    edits: list[str] = field(default_factory=list)


RESET = 0  # fail_next status: the connection is reset
LOST = -1  # fail_next status: the call is carried out, then the connection drops (answer lost)


class FakeTelegram:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.calls: list[Call] = []
        self.messages: dict[tuple[int, int], ChatMessage] = {}
        self.files: dict[str, tuple[str, bytes]] = {}  # file_id -> (file_path, data)
        self.downloads: list[str] = []
        self.documents: list[tuple[int, str, bytes]] = []  # (chat, file name, bytes) sent
        self.pushed_at: dict[int, float] = {}
        self.blocked: set[int] = set()
        self._failures: list[tuple[str, int, str | None, dict[str, Any]]] = []
        self._pending: list[dict[str, Any]] = []
        self._delivered: list[dict[str, Any]] = []
        self._update_ids = itertools.count(100)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._file_ids = itertools.count(1)
        self._new_updates = asyncio.Condition()
        self._closing = False
        self.confirmed_offset = 0  # getUpdates' highest offset: updates below it are acknowledged
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- server lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.*}", self._file)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        self._closing = True
        async with self._new_updates:
            self._new_updates.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # --- what tests drive --------------------------------------------------------------------

    async def push(self, update: dict[str, Any]) -> int:
        """Queue an update (assigning an update_id if it has none) and wake the long poll."""
        if not update.get("update_id"):
            update["update_id"] = next(self._update_ids)
        message = update.get("message")
        if message is not None:
            chat_id = message["chat"]["id"]
            if not message.get("message_id"):
                message["message_id"] = next(self._ids(chat_id))
            message["date"] = message.get("date") or int(time.time())
            self.messages[(chat_id, message["message_id"])] = ChatMessage(
                chat_id, message["message_id"], message.get("text") or message.get("caption") or "",
                from_bot=False, thread_id=message.get("message_thread_id"),
            )
        self.pushed_at[update["update_id"]] = time.monotonic()
        async with self._new_updates:
            self._pending.append(update)
            self._new_updates.notify_all()
        return int(update["update_id"])

    async def redeliver_all(self) -> None:
        """Telegram redelivers what it handed out (as after a restart before offsets were saved)."""
        async with self._new_updates:
            self._pending = [copy.deepcopy(u) for u in self._delivered] + self._pending
            self._new_updates.notify_all()

    def add_file(self, data: bytes, path_hint: str = "photos/file.jpg") -> tuple[str, str]:
        n = next(self._file_ids)
        file_id = f"AgACAgIAAxkBAAI{n:04d}"
        stem, _, ext = path_hint.rpartition(".")
        self.files[file_id] = (f"{stem}_{n}.{ext}", data)
        return file_id, f"uniq{n:04d}"

    def fail_next(self, method: str, status: int, times: int = 1, text: str | None = None,
                  **parameters: Any) -> None:
        """Answer the next `times` calls of `method` (with this `text`, if given) with a
        Telegram error; `parameters` become the error's parameters (e.g. retry_after).
        `status=RESET` drops the connection instead of answering; `status=LOST` carries the call
        out and then drops the connection (the caller never learns that it succeeded)."""
        for _ in range(times):
            self._failures.append((method, status, text, parameters))

    def delete_by_user(self, chat_id: int, message_id: int) -> None:
        self.messages[(chat_id, message_id)].deleted = True

    # --- what tests read ---------------------------------------------------------------------

    def calls_to(self, chat_id: int, *methods: str) -> list[Call]:
        return [
            c for c in self.calls
            if c.params.get("chat_id") == chat_id and (not methods or c.method in methods)
        ]

    def bot_messages(self, chat_id: int) -> list[ChatMessage]:
        """What the user sees from the bot in a chat now: visible messages, oldest first."""
        return sorted(
            (m for m in self.messages.values()
             if m.chat_id == chat_id and m.from_bot and not m.deleted),
            key=lambda m: m.message_id,
        )

    def texts(self, chat_id: int) -> list[str]:
        return [m.text for m in self.bot_messages(chat_id)]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; calls so far: {self.calls}")
            await asyncio.sleep(0.01)

    # --- the API -----------------------------------------------------------------------------

    def _ids(self, chat_id: int) -> itertools.count[int]:
        return self._message_ids.setdefault(chat_id, itertools.count(1))

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        form = await request.post()
        params: dict[str, Any] = {}
        for key, value in form.items():
            if isinstance(value, web.FileField):  # an uploaded file (sendDocument)
                params[key] = {"filename": value.filename, "data": value.file.read()}
                continue
            raw = value if isinstance(value, str) else str(value)
            if key in _RAW_STRING_FIELDS:
                params[key] = raw
            else:
                try:
                    params[key] = json.loads(raw)
                except ValueError:
                    params[key] = raw
        call = Call(method, params, time.monotonic())
        if method != "getUpdates":
            self.calls.append(call)
        for i, (m, status, text, extra) in enumerate(self._failures):
            if m == method and (text is None or params.get("text") == text):
                del self._failures[i]
                call.status = status
                if status == LOST:
                    break
                if status == RESET:  # the connection drops before any answer
                    assert request.transport is not None
                    request.transport.close()
                    raise ConnectionResetError("reset by the fake server")
                return _error(status, _DESCRIPTIONS.get(status, "Internal Server Error"), **extra)
        handler = getattr(self, "_m_" + method, None)
        if handler is None:
            call.status = 404
            return _error(404, "Not Found: method not found")
        chat_id = params.get("chat_id")
        if chat_id in self.blocked and method.startswith(("send", "edit")):
            call.status = 403
            return _error(403, "Forbidden: bot was blocked by the user")
        result = await handler(params)
        if call.status == LOST:  # carried out; the answer never arrives
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("answer lost by the fake server")
        if isinstance(result, web.Response):
            call.status = result.status
            return result
        return web.json_response({"ok": True, "result": result})

    async def _m_getMe(self, _: dict[str, Any]) -> Any:
        return fixture("get_me.json")

    async def _m_deleteWebhook(self, _: dict[str, Any]) -> Any:
        return True

    async def _m_setWebhook(self, _: dict[str, Any]) -> Any:
        return True

    async def _m_setMyCommands(self, _: dict[str, Any]) -> Any:
        return True

    async def _m_sendChatAction(self, _: dict[str, Any]) -> Any:
        return True

    async def _m_getUpdates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        self.confirmed_offset = max(self.confirmed_offset, offset)
        async with self._new_updates:
            if offset:
                self._pending = [u for u in self._pending if u["update_id"] >= offset]
            if not self._pending and timeout and not self._closing:
                try:
                    await asyncio.wait_for(self._new_updates.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            batch = list(self._pending[: int(params.get("limit") or 100)])
        self._delivered.extend(u for u in batch if u not in self._delivered)
        return batch

    async def _m_getFile(self, params: dict[str, Any]) -> Any:
        file_id = params["file_id"]
        if file_id not in self.files:
            return _error(400, "Bad Request: invalid file_id")
        path, data = self.files[file_id]
        return {"file_id": file_id, "file_unique_id": "u" + file_id[-6:], "file_size": len(data),
                "file_path": path}

    async def _file(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        path = request.match_info["path"]
        for stored, data in self.files.values():
            if stored == path:
                self.downloads.append(path)
                return web.Response(body=data, content_type="application/octet-stream")
        return web.Response(status=404)

    def _message_json(self, m: ChatMessage) -> dict[str, Any]:
        chat = {"id": m.chat_id, "type": "private" if m.chat_id > 0 else "supergroup"}
        if m.chat_id > 0:
            chat["first_name"] = "User"
        else:
            chat["title"] = "Group"
        out: dict[str, Any] = {
            "message_id": m.message_id, "date": int(time.time()), "chat": chat, "text": m.text,
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "vlbot", "username": BOT_USERNAME},
        }
        if m.thread_id is not None:
            out["message_thread_id"] = m.thread_id
        return out

    async def _m_sendMessage(self, params: dict[str, Any]) -> Any:
        chat_id = int(params["chat_id"])
        text = params.get("text", "")
        if not text.strip():
            return _error(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            return _error(400, "Bad Request: message is too long")
        reply = params.get("reply_parameters") or {}
        m = ChatMessage(chat_id, next(self._ids(chat_id)), text, from_bot=True,
                        reply_to=reply.get("message_id"), thread_id=params.get("message_thread_id"))
        self.messages[(chat_id, m.message_id)] = m
        return self._message_json(m)

    async def _m_sendDocument(self, params: dict[str, Any]) -> Any:
        chat_id = int(params["chat_id"])
        document = params["document"]
        self.documents.append((chat_id, document["filename"], document["data"]))
        m = ChatMessage(chat_id, next(self._ids(chat_id)), "", from_bot=True,
                        thread_id=params.get("message_thread_id"))
        self.messages[(chat_id, m.message_id)] = m
        return {**self._message_json(m), "document": {
            "file_id": "doc", "file_unique_id": "doc", "file_name": document["filename"]}}

    async def _m_editMessageText(self, params: dict[str, Any]) -> Any:
        chat_id, message_id = int(params["chat_id"]), int(params["message_id"])
        m = self.messages.get((chat_id, message_id))
        if m is None or m.deleted:
            return _error(400, "Bad Request: message to edit not found")
        text = params.get("text", "")
        if len(text) > 4096:
            return _error(400, "Bad Request: MESSAGE_TOO_LONG")
        if text == m.text:
            return _error(400, NOT_MODIFIED)
        m.edits.append(text)
        m.text = text
        return self._message_json(m)

    async def _m_editMessageReplyMarkup(self, params: dict[str, Any]) -> Any:
        m = self.messages.get((int(params["chat_id"]), int(params["message_id"])))
        if m is None or m.deleted:
            return _error(400, "Bad Request: message to edit not found")
        if not m.from_bot:
            return _error(400, "Bad Request: message can't be edited")
        if params.get("reply_markup"):
            return _error(400, "Bad Request: keyboards are not modelled by this fake")
        return _error(400, NOT_MODIFIED)  # no message here has a keyboard

    async def _m_deleteMessage(self, params: dict[str, Any]) -> Any:
        m = self.messages.get((int(params["chat_id"]), int(params["message_id"])))
        if m is None or m.deleted:
            return _error(400, "Bad Request: message to delete not found")
        m.deleted = True
        return True


_DESCRIPTIONS = {
    400: NOT_MODIFIED,
    403: "Forbidden: bot was blocked by the user",
    429: "Too Many Requests: retry after 1",
    500: "Internal Server Error",
    502: "Bad Gateway",
}


def _error(status: int, description: str, **parameters: Any) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=status)
