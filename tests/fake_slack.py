"""A fake Slack: the Web API methods vlbot uses, file downloads, response_url and Socket Mode.

Runs as a real aiohttp server on port 0; slack_sdk's AsyncWebClient talks to it through its
`base_url`. It behaves like Slack where vlbot depends on it: Slack-shaped `{"ok": false, "error"}`
answers, HTTP 429 with Retry-After (injected with `fail_next`), Slack's size limits (40,000
characters of text, 3,000 per section block, 50 blocks), a private file download that needs the bot
token (without it, or for a file marked `html`, Slack's 200 HTML login page), and a Socket Mode
WebSocket that sends envelopes and collects their acknowledgements. Every call is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from aiohttp import WSMsgType, web

LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Slack</title></head><body>Sign in</body></html>"


@dataclass
class ApiCall:
    method: str
    args: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    status: int = 200
    error: str | None = None


@dataclass
class FakeFile:
    id: str
    name: str
    mimetype: str
    data: bytes
    html: bool = False  # answer downloads with the login page (the files:read scope is missing)
    external: bool = False  # an external file (Google Drive...): its url_private is not Slack's
    broken: bool = False  # the download connection is closed before any answer


class FakeSlack:
    def __init__(
        self, bot_token: str, app_token: str = "xapp-1-A0APP-0000-fakeapptoken",
        team_id: str = "T0TEAM", bot_user_id: str = "U0BOT", bot_id: str = "B0BOT",
    ) -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        self.team_id = team_id
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.calls: list[ApiCall] = []
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.ephemeral: list[dict[str, Any]] = []
        self.reactions: dict[tuple[str, str], set[str]] = {}
        self.files: dict[str, FakeFile] = {}
        self.not_member: set[str] = set()
        self.faults: dict[str, list[tuple[int, str, float | None]]] = {}
        self.socket_acks: dict[str, tuple[float, dict[str, Any]]] = {}
        self.socket_connected = asyncio.Event()
        self._sockets: list[web.WebSocketResponse] = []
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/files/{file_id}/{name}", self._download)
        app.router.add_post("/response/{hook}", self._response_url)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        for ws in self._sockets:
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/"

    # --- test helpers --------------------------------------------------------------------------

    def next_ts(self) -> str:
        return f"{1_700_000_000 + next(self._ts)}.{next(self._ids):06d}"

    def add_file(self, data: bytes, name: str = "screenshot.png", mimetype: str = "image/png",
                 html: bool = False, external: bool = False, broken: bool = False) -> dict[str, Any]:
        """Store a file; returns the file object as it appears in events and history."""
        fid = f"F{next(self._ids):08d}"
        self.files[fid] = FakeFile(fid, name, mimetype, data, html, external, broken)
        return self._file_object(self.files[fid])

    def file_link(self, file: dict[str, Any]) -> str:
        """The file's link as a user pastes it (on Slack: https://team.slack.com/files/U…/F…/name)."""
        return f"{self.base_url}/files/{file['id']}/{quote(file['name'], safe='')}"

    def _file_object(self, f: FakeFile) -> dict[str, Any]:
        if f.external:  # what Slack sends for a Google Drive file: no Slack-hosted bytes
            return {"id": f.id, "created": int(time.time()), "name": f.name, "title": f.name,
                    "mimetype": f.mimetype, "mode": "external", "is_external": True,
                    "external_type": "gdrive",
                    "url_private": f"https://docs.google.com/file/d/{f.id}/view"}
        url = f"{self.base_url}/files/{f.id}/{quote(f.name, safe='')}"  # as Slack encodes names
        return {
            "id": f.id, "created": int(time.time()), "name": f.name, "title": f.name,
            "mimetype": f.mimetype, "filetype": f.name.rsplit(".", 1)[-1], "size": len(f.data),
            "mode": "hosted", "is_external": False, "url_private": url,
            "url_private_download": f"{url}?download=1",
        }

    def add_user_message(self, channel: str, text: str, user: str = "U0ALICE",
                         files: list[dict[str, Any]] | None = None, thread_ts: str | None = None
                         ) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "message", "user": user, "text": text, "ts": self.next_ts()}
        if files:
            msg["files"], msg["subtype"] = files, "file_share"
        if thread_ts:
            msg["thread_ts"] = thread_ts
        self.messages.setdefault(channel, []).append(msg)
        return msg

    def fail_next(self, method: str, times: int = 1, status: int = 429, error: str = "ratelimited",
                  retry_after: float | None = 1) -> None:
        self.faults.setdefault(method, []).extend([(status, error, retry_after)] * times)

    def called(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method and c.error is None]

    def sequence(self) -> list[str]:
        return [c.method if c.error is None else f"{c.method} → {c.status} {c.error}" for c in self.calls]

    def thread(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        return [m for m in self.messages.get(channel, []) if m.get("thread_ts") == thread_ts]

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; calls so far: {self.sequence()}")
            await asyncio.sleep(0.01)

    async def socket_send(self, envelope: dict[str, Any]) -> None:
        await self.socket_connected.wait()
        await self._sockets[-1].send_str(json.dumps(envelope))

    # --- the Web API -----------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                args.update(await request.json())
            else:
                args.update(dict(await request.post()))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        wanted = self.app_token if method == "apps.connections.open" else self.bot_token
        if token != wanted:
            return self._error(method, args, "invalid_auth")
        if self.faults.get(method):
            status, error, retry_after = self.faults[method].pop(0)
            headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else {}
            return self._error(method, args, error, status, headers)
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return self._error(method, args, "unknown_method")
        result: dict[str, Any] | str = handler(args)
        if isinstance(result, str):
            return self._error(method, args, result)
        self.calls.append(ApiCall(method, args))
        return web.json_response({"ok": True, **result})

    def _error(self, method: str, args: dict[str, Any], error: str, status: int = 200,
               headers: dict[str, str] | None = None) -> web.Response:
        self.calls.append(ApiCall(method, args, status=status, error=error))
        return web.json_response({"ok": False, "error": error}, status=status, headers=headers)

    def _m_auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"url": "https://fake.slack.com/", "team": "Fake Team", "user": "vlbot",
                "team_id": self.team_id, "user_id": self.bot_user_id, "bot_id": self.bot_id}

    def _m_apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"url": f"ws://127.0.0.1:{self.port}/socket"}

    @staticmethod
    def _check_size(args: dict[str, Any]) -> str | None:
        blocks = args.get("blocks") or []
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        if not args.get("text") and not blocks:
            return "no_text"
        if len(args.get("text") or "") > 40000:
            return "msg_too_long"
        if len(blocks) > 50 or any(len(b.get("text", {}).get("text", "")) > 3000 for b in blocks):
            return "invalid_blocks"
        return None

    def _m_chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any] | str:
        channel = args.get("channel", "")
        if channel in self.not_member:
            return "not_in_channel"
        problem = self._check_size(args)
        if problem:
            return problem
        msg = {"type": "message", "user": self.bot_user_id, "bot_id": self.bot_id,
               "text": args.get("text", ""), "blocks": args.get("blocks"), "ts": self.next_ts()}
        if args.get("thread_ts"):
            msg["thread_ts"] = args["thread_ts"]
        self.messages.setdefault(channel, []).append(msg)
        return {"channel": channel, "ts": msg["ts"], "message": msg}

    def _m_chat_update(self, args: dict[str, Any]) -> dict[str, Any] | str:
        channel = args.get("channel", "")
        found = [m for m in self.messages.get(channel, []) if m["ts"] == args.get("ts")]
        if not found:
            return "message_not_found"
        problem = self._check_size(args)
        if problem:
            return problem
        found[0].update(text=args.get("text", ""), blocks=args.get("blocks"))
        return {"channel": channel, "ts": args["ts"], "text": args.get("text", "")}

    def _m_chat_getPermalink(self, args: dict[str, Any]) -> dict[str, Any] | str:
        """Slack's permalink form: /archives/<channel>/p<ts without the dot>, with the thread for
        a reply in one."""
        channel, ts = args.get("channel", ""), args.get("message_ts", "")
        found = [m for m in self.messages.get(channel, []) if m["ts"] == ts]
        if not found:
            return "message_not_found"
        link = f"https://fake.slack.com/archives/{channel}/p{ts.replace('.', '')}"
        thread = found[0].get("thread_ts")
        if thread and thread != ts:
            link += f"?thread_ts={thread}&cid={channel}"
        return {"channel": channel, "permalink": link}

    def _m_chat_postEphemeral(self, args: dict[str, Any]) -> dict[str, Any] | str:
        if args.get("channel") in self.not_member:
            return "not_in_channel"
        self.ephemeral.append(args)
        return {"message_ts": self.next_ts()}

    def _m_reactions_add(self, args: dict[str, Any]) -> dict[str, Any] | str:
        names = self.reactions.setdefault((args["channel"], args["timestamp"]), set())
        if args["name"] in names:
            return "already_reacted"
        names.add(args["name"])
        return {}

    def _m_reactions_remove(self, args: dict[str, Any]) -> dict[str, Any] | str:
        names = self.reactions.setdefault((args["channel"], args["timestamp"]), set())
        if args["name"] not in names:
            return "no_reaction"
        names.discard(args["name"])
        return {}

    def _m_conversations_history(self, args: dict[str, Any]) -> dict[str, Any] | str:
        channel = args.get("channel", "")
        if channel in self.not_member:
            return "not_in_channel"
        top = [m for m in self.messages.get(channel, []) if m.get("thread_ts") in (None, m["ts"])]
        limit = int(args.get("limit") or 100)
        return {"messages": list(reversed(top))[:limit], "has_more": False}

    def _m_conversations_replies(self, args: dict[str, Any]) -> dict[str, Any] | str:
        msgs = self.messages.get(args.get("channel", ""), [])
        ts = args.get("ts")
        thread = [m for m in msgs if m["ts"] == ts or m.get("thread_ts") == ts]
        return {"messages": thread, "has_more": False} if thread else "thread_not_found"

    def _m_files_info(self, args: dict[str, Any]) -> dict[str, Any] | str:
        f = self.files.get(args.get("file", ""))
        if f is None:
            return "file_not_found"
        return {"file": self._file_object(f)}

    # --- files, response_url, Socket Mode ------------------------------------------------------

    async def _download(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["file_id"])
        authorized = request.headers.get("Authorization") == f"Bearer {self.bot_token}"
        self.calls.append(ApiCall("files.download", {"file": request.match_info["file_id"],
                                                     "authorized": authorized}))
        if f is None:
            return web.Response(status=404, text="not found")
        if f.broken and request.transport is not None:
            request.transport.close()
            return web.Response()
        if not authorized or f.html:  # Slack's answer: a 200 login page, not an error status
            return web.Response(body=LOGIN_PAGE, content_type="text/html")
        return web.Response(body=f.data, content_type=f.mimetype)

    async def _response_url(self, request: web.Request) -> web.Response:
        self.calls.append(ApiCall("response_url", await request.json()))
        return web.Response(text="ok")

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1,
                                      "connection_info": {"app_id": "A0APP"}}))
        self.socket_connected.set()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                ack = json.loads(msg.data)
                self.socket_acks[ack["envelope_id"]] = (time.monotonic(), ack)
        return ws
