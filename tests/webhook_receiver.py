"""A real HTTP receiver of vlbot's webhooks, on 127.0.0.1 port 0, as a customer would run one:
it verifies each request's Standard Webhooks signature with the `standardwebhooks` library
(401 when it does not match), de-duplicates by `webhook-id` (a repeat is answered 200 and not
processed again) and records everything it saw.

`fail_first=N`: the first N verified attempts of each event id are answered 503. `hold()`, or
`hold_after=N` (after N answered 200): verified requests are recorded, then kept waiting without
an answer until `release()` (deliveries in flight when vlbot is killed).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Attempt:
    event_id: str
    at: float  # time.monotonic() when it arrived
    status: int  # what the receiver answered (0: held, never answered)
    verified: bool
    error: str | None = None


class WebhookReceiver:
    def __init__(self, secret: str, fail_first: int = 0, hold_after: int | None = None) -> None:
        self.webhook = Webhook(secret)
        self.fail_first = fail_first
        self.hold_after = hold_after
        self.attempts: list[Attempt] = []
        self.processed: list[dict[str, Any]] = []  # each event's body, once per id
        self.seen_ids: set[str] = set()
        self._lock = threading.Condition()
        self._open = threading.Event()
        self._open.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/vlbot"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.set()
        self._server.shutdown()
        self._server.server_close()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self.hold_after = None
        self._open.set()

    def attempts_of(self, event_id: str) -> list[Attempt]:
        with self._lock:
            return [a for a in self.attempts if a.event_id == event_id]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Until `predicate()` holds (checked at each request), or AssertionError at `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"receiver: condition not met in {timeout} s: {self.attempts}")
                self._lock.wait(min(left, 0.2))

    def _receive(self, headers: dict[str, str], body: bytes) -> int:
        """The receiver's logic; the status to answer (0: hold without answering)."""
        event_id = headers.get("webhook-id", "")
        try:
            payload = self.webhook.verify(body, headers)
        except WebhookVerificationError as exc:
            self._record(Attempt(event_id, time.monotonic(), 401, False, str(exc)))
            return 401
        with self._lock:
            earlier = sum(1 for a in self.attempts if a.event_id == event_id and a.verified)
        if earlier < self.fail_first:
            self._record(Attempt(event_id, time.monotonic(), 503, True))
            return 503
        with self._lock:
            answered = sum(1 for a in self.attempts if a.status == 200)
            if self.hold_after is not None and answered >= self.hold_after:
                self._open.clear()
            held = not self._open.is_set()
            if event_id not in self.seen_ids:  # de-duplicate by webhook-id
                self.seen_ids.add(event_id)
                self.processed.append(payload)
            self.attempts.append(Attempt(event_id, time.monotonic(), 0 if held else 200, True))
            self._lock.notify_all()
        if held:
            self._open.wait()
            return 0
        return 200

    def _record(self, attempt: Attempt) -> None:
        with self._lock:
            self.attempts.append(attempt)
            self._lock.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = receiver._receive({k.lower(): v for k, v in self.headers.items()}, body)
                if status == 0:
                    self.close_connection = True
                    return
                answer = json.dumps({"ok": status == 200}).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler


def new_secret() -> str:
    import base64
    import os

    return "whsec_" + base64.b64encode(os.urandom(32)).decode()
