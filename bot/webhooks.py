"""Delivering the outbox (bot/outbox.py): signed POSTs, retries with backoff, dead letters.

Each attempt POSTs the event's JSON body with the Standard Webhooks headers: `webhook-id` (the
event id, the same on every attempt and for every endpoint: receivers de-duplicate by it),
`webhook-timestamp` (this attempt's time, Unix seconds) and `webhook-signature`
(`v1,` + base64 HMAC-SHA256 of "{id}.{timestamp}.{body}" under the endpoint's `whsec_` secret),
signed by the `standardwebhooks` package, the scheme's reference library.

A 2xx answer delivers the event; anything else (another status, a refused connection, a
timeout) is retried after a backoff that doubles from `backoff_s` up to `max_backoff_s`, each
wait drawn between half and all of it (jitter: receivers coming back are not hit by every
sender at once), until `max_attempts` or `max_age_s`; then the row is dead-lettered.

Endpoint URLs pass the SSRF rules of image URLs (bot/remote_images.py) unless their host is in
`allow_private_hosts`: checked when the worker starts (a refused URL stops the start, named)
and again before each attempt, whose connection goes to the address just checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from bot.db import Database, DataDirError
from bot.job_hooks import PresetResultHook
from bot.models import Job
from bot.outbox import PRESET_EVENT, Outbox, OutboxEvent
from bot.remote_images import RemoteImageError, RemoteImageFetcher, pinned_request
from bot.settings import WebhookSettings
from bot.tasks import cancel_and_wait

log = logging.getLogger("vlbot.webhooks")


class WebhookConfigError(Exception):
    """An endpoint that may not be used; the message names it and the setting to change."""


def endpoint_label(url: str) -> str:
    """The endpoint for logs and reports: scheme and host only (paths of hook URLs often hold
    a token)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}" + ("/…" if parts.path.strip("/") or parts.query else "")


def signed_headers(secret: str, event_id: str, body: str, at: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt."""
    at = at or datetime.now(timezone.utc)
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, at, body),
    }


class EndpointGuard:
    """The SSRF rules for endpoint URLs: the image URLs' check, except for allowlisted hosts."""

    def __init__(
        self, allow_private_hosts: Sequence[str] = (), checker: RemoteImageFetcher | None = None
    ) -> None:
        self.allowed_hosts = {h.strip().lower().strip("[]") for h in allow_private_hosts if h.strip()}
        self.checker = checker or RemoteImageFetcher(max_bytes=0)

    async def target(self, url: str) -> tuple[str, str] | None:
        """(host, checked address) to connect to; None when the host is allowlisted (connect as
        usual). Raises RemoteImageError with the reason when the URL is refused."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteImageError(f"Only http(s) webhook URLs are accepted, not {url!r}.")
        if parts.hostname.lower() in self.allowed_hosts:
            return None
        return await self.checker.check_target(url, what="webhook")

    async def check_all(self, urls: Sequence[str]) -> list[str]:
        """Raise WebhookConfigError naming the first URL that may not be used; return warnings
        for hosts that do not resolve now (no reason to refuse: each attempt resolves again)."""
        warnings: list[str] = []
        for url in urls:
            try:
                await self.target(url)
            except RemoteImageError as exc:
                if isinstance(exc.__cause__, OSError):  # DNS failed: maybe only for now
                    warnings.append(f"webhook endpoint {endpoint_label(url)}: {exc}")
                    continue
                hint = (" Name its host in VLBOT_WEBHOOKS__ALLOW_PRIVATE_HOSTS if it is a receiver"
                        " of yours." if urlsplit(url).scheme in ("http", "https") else "")
                raise WebhookConfigError(
                    f"webhook endpoint {endpoint_label(url)} is refused: {exc}{hint}"
                ) from None
        return warnings


class WebhookWorker:
    """Claims due outbox rows and delivers them, a few at a time, until stopped."""

    def __init__(
        self,
        outbox: Outbox,
        settings: WebhookSettings,
        *,
        guard: EndpointGuard | None = None,
        concurrency: int = 4,
        poll_s: float = 2.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self.secrets = {e.url: e.secret.get_secret_value() for e in settings.endpoints}
        self.guard = guard or EndpointGuard(self.settings.allow_private_hosts)
        self.concurrency = concurrency
        self.poll_s = poll_s  # rows other replicas enqueued, leases run out: looked for this often
        self.lease_s = self.settings.timeout_s * 2 + 10  # longer than any one attempt
        self._jitter = jitter
        self._task: asyncio.Task[None] | None = None
        self.counts: dict[str, int] = {}  # outbox rows by state, as of the last look
        self._pruned = 0.0

    async def start(self) -> None:
        """Check every endpoint URL (WebhookConfigError names a refused one), resume what a
        previous run left pending, and start delivering."""
        for warning in await self.guard.check_all(list(self.secrets)):
            log.warning("%s (tried anyway)", warning)
        if self.outbox.db.dialect == "sqlite":  # one process per data folder: its leases are ours
            await self.outbox.release_leases()
        self.counts = await self.outbox.counts()
        self._task = asyncio.create_task(self._run(), name="vlbot-webhooks")
        if self.secrets:
            log.info(
                "webhooks: %d endpoint(s), %d event(s) pending",
                len(self.secrets),
                self.counts.get("pending", 0),
            )

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                delivered = await self.run_once()
                self.counts = await self.outbox.counts()
                if time.time() - self._pruned > 3600:
                    self._pruned = time.time()
                    await self.outbox.prune(self.settings.retention_days * 86_400)
            except Exception as exc:  # the database is away: try again after a pause
                log.warning("webhook delivery pass failed: %r", exc)
                delivered = 0
            if delivered:
                continue  # a full batch may mean more are due
            await self._sleep_until_due()

    async def _sleep_until_due(self) -> None:
        self.outbox.wakeup.clear()
        wait = self.poll_s
        with contextlib.suppress(Exception):
            due = await self.outbox.next_due()
            if due is not None:
                wait = min(wait, max(0.0, due - time.time()))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.outbox.wakeup.wait(), timeout=wait)

    async def run_once(self) -> int:
        """Deliver one batch of due rows; the number attempted."""
        events = await self.outbox.claim(self.concurrency, self.lease_s)
        if events:
            await asyncio.gather(*(self.deliver(e) for e in events))
        return len(events)

    async def deliver(self, event: OutboxEvent) -> None:
        """One attempt; records the outcome (delivered, retry at …, or dead)."""
        error = await self._attempt(event)
        if error is None:
            await self.outbox.delivered(event)
            log.info("webhook %s delivered to %s", event.event_id, endpoint_label(event.endpoint))
            return
        retry_at = self.retry_at(event)
        await self.outbox.failed(event, error, retry_at)
        if retry_at is None:
            log.warning(
                "webhook %s to %s dead after %d attempt(s): %s",
                event.event_id, endpoint_label(event.endpoint), event.attempts + 1, error,
            )
        else:
            log.info(
                "webhook %s to %s failed (%s), retry in %.1f s",
                event.event_id, endpoint_label(event.endpoint), error, retry_at - time.time(),
            )

    def retry_at(self, event: OutboxEvent) -> float | None:
        """When to try again after attempt number `event.attempts + 1` failed, or None: dead."""
        s = self.settings
        made = event.attempts + 1
        if made >= s.max_attempts:
            return None
        delay = min(s.max_backoff_s, s.backoff_s * 2 ** (made - 1)) * (0.5 + 0.5 * self._jitter())
        at = time.time() + delay
        return None if at - event.created_at > s.max_age_s else at

    async def _attempt(self, event: OutboxEvent) -> str | None:
        """POST the event once; None when the endpoint took it, else what went wrong."""
        secret = self.secrets.get(event.endpoint)
        if secret is None:
            return "the endpoint is no longer configured (VLBOT_WEBHOOKS__ENDPOINTS)"
        body = event.body()
        headers = signed_headers(secret, event.event_id, body)
        try:
            target = await asyncio.wait_for(self.guard.target(event.endpoint), self.settings.timeout_s)
        except RemoteImageError as exc:
            return f"refused: {exc}"
        except asyncio.TimeoutError:
            return f"its host name did not resolve within {self.settings.timeout_s:g} s"
        # a client per attempt: pinned connections to one address under several host names
        # must not share a pooled connection (nor its TLS name)
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.settings.timeout_s) as client:
            if target is None:
                request = client.build_request("POST", event.endpoint, headers=headers, content=body)
            else:
                host, address = target
                request = pinned_request(
                    client, "POST", event.endpoint, host, address, headers=headers, content=body
                )
            return await self._send(client, request)

    async def _send(self, client: httpx.AsyncClient, request: httpx.Request) -> str | None:
        try:
            response = await asyncio.wait_for(client.send(request, stream=True), self.settings.timeout_s)
            await response.aclose()
        except asyncio.TimeoutError:
            return f"no answer within {self.settings.timeout_s:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        if response.is_redirect:
            return f"HTTP {response.status_code} (redirects are not followed)"
        return f"HTTP {response.status_code}"


async def doctor_report(database: Path | str, settings: WebhookSettings) -> tuple[list[str], list[str]]:
    """`vlbot doctor`'s webhook lines (endpoints, their URL check, the outbox by state, the
    latest dead letters) and the problems among them that would stop `serve`."""
    lines: list[str] = []
    problems: list[str] = []
    if settings.endpoints:
        allowed = ", ".join(settings.allow_private_hosts) or "none"
        lines.append(f"webhooks: events {', '.join(settings.events)}; private hosts allowed: {allowed}")
    else:
        lines.append("webhooks: no endpoint (VLBOT_WEBHOOKS__ENDPOINTS)")
    guard = EndpointGuard(settings.allow_private_hosts)
    for endpoint in settings.endpoints:
        try:
            warnings = await guard.check_all([endpoint.url])
            lines.append(f"  {warnings[0]}" if warnings else
                         f"  endpoint {endpoint_label(endpoint.url)}: URL accepted")
        except WebhookConfigError as exc:
            problems.append(str(exc))
            lines.append(f"  endpoint {endpoint_label(endpoint.url)}: {exc}")
    try:
        db = await Database.open(database)
    except DataDirError as exc:
        problems.append(str(exc))
        lines.append(f"webhook outbox: {exc}")
        return lines, problems
    try:
        outbox = Outbox(db)
        counts = await outbox.counts()
        dead = await outbox.dead_letters(limit=5)
    finally:
        await db.close()
    lines.append(
        f"webhook outbox: {counts['pending']} pending, {counts['dead']} dead,"
        f" {counts['delivered']} delivered (kept {settings.retention_days:g} days)"
    )
    for row in dead:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(row["updated_at"]))
        lines.append(
            f"  dead {row['event_id']} ({row['event_type']}) to {endpoint_label(row['endpoint'])}"
            f" after {row['attempts']} attempt(s), {when}: {row['last_error']}"
        )
    return lines, problems


class PresetResultWebhooks(PresetResultHook):
    """events=preset.result: every preset's result other than triage's (its own event, with
    grouping, comes from bot/triage/) as a `preset.result` event, one per job and preset."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    async def preset_result(self, job: Job, preset: str, result: Mapping[str, Any]) -> str | None:
        if preset != "triage":  # stored only where preset.result is subscribed (Outbox)
            conversation, link = job.conversation, job.origin.get("link")
            await self.outbox.enqueue(
                PRESET_EVENT,
                {
                    "job_id": job.id,
                    "preset": preset,
                    "place": {"platform": conversation.platform, "chat": conversation.chat,
                              "thread": conversation.thread},  # as in triage.result events
                    "link": link if isinstance(link, str) else None,
                    "result": dict(result),
                },
                event_id=f"evt_{job.id}_{preset}",
            )
        return None


__all__ = [
    "EndpointGuard",
    "PresetResultWebhooks",
    "WebhookConfigError",
    "WebhookWorker",
    "doctor_report",
    "endpoint_label",
    "signed_headers",
]
