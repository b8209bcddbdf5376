"""Delivering reply events to Slack: placeholder, reactions, throttled streaming, final pages.

One placeholder message per job (in the thread of the question, in the DM, or in the channel of a
slash command) shows the queue position, then "thinking…", then the answer as it streams. Its
`ts` is returned from `send` as `placeholder_ts`, so the runner persists it with the job and a
final delivery after a restart edits the same message. Streaming edits run in the background at
most once per `update_interval_s` (Slack allows about one chat.update per second), so a slow or
rate-limited Web API never slows generation; the final edit always carries the whole answer.

Origin fields (captured by the handlers): channel, thread_ts (None: reply top level), message_ts
(the user's message, for reactions), lang, ephemeral + user + response_url (slash command
answered privately), notice (a note put first in the final reply, e.g. which attachments were
skipped and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from adapters.slack.format import escape, page_message, pages, streaming_text
from bot.adapter import Failed, Final, Partial, Queued, ReplyEvent, Started
from bot.models import Job
from bot.texts import queued, text

log = logging.getLogger("vlbot.slack.replies")

WORKING = "eyes"
DONE = "white_check_mark"


@dataclass
class _Reply:
    ts: str | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_edit: float = 0.0
    edit_task: asyncio.Task[None] | None = None
    reacted: bool = False
    started: bool = False  # a late queue-position update must not overwrite "thinking…"


class ReplyWriter:
    def __init__(self, client: AsyncWebClient, update_interval_s: float = 1.0) -> None:
        self.client = client
        self.update_interval_s = update_interval_s
        self._replies: dict[str, _Reply] = {}

    async def close(self) -> None:
        for reply in self._replies.values():
            if reply.edit_task is not None:
                reply.edit_task.cancel()
        self._replies.clear()

    async def send(self, job: Job, event: ReplyEvent) -> dict[str, Any] | None:
        origin = job.origin
        if origin.get("ephemeral"):
            await self._send_ephemeral(job, event)
            return None
        reply = self._replies.setdefault(job.id, _Reply(ts=origin.get("placeholder_ts")))
        lang = origin.get("lang")
        async with reply.lock:
            if isinstance(event, Queued):
                if reply.started:
                    return None
                status = queued(event.position, event.eta_s, lang)
                return await self._show(job, reply, escape(status))
            if isinstance(event, Started):
                reply.started = True
                return await self._show(job, reply, escape(text("thinking", lang)))
            if isinstance(event, Partial):
                reply.started = True
                changes = None if reply.ts else await self._show(job, reply, streaming_text(event.text))
                self._maybe_stream(job, reply, event.text)
                return changes
            if reply.edit_task is not None:  # let the last streaming edit land before the final
                with contextlib.suppress(Exception):
                    await reply.edit_task
            if isinstance(event, Final):
                changes = await self._final(job, reply, event.text)
                await self._react(job, reply, done=True)
            else:
                assert isinstance(event, Failed)
                body = text(event.code, lang, ref=event.ref, **event.params)
                changes = await self._write(job, reply, page_message([*_notice(job), escape(body)]))
                await self._react(job, reply, done=False)
            self._replies.pop(job.id, None)
            return changes

    # --- the placeholder ---------------------------------------------------------------------

    async def _show(self, job: Job, reply: _Reply, mrkdwn: str) -> dict[str, Any] | None:
        changes = await self._write(job, reply, {"text": mrkdwn})
        await self._react(job, reply, done=None)
        return changes

    async def _write(self, job: Job, reply: _Reply, message: dict[str, Any]) -> dict[str, Any] | None:
        """Edit the placeholder, or post it (and report its ts) if there is none yet."""
        channel = job.origin["channel"]
        if reply.ts is not None:
            await self.client.chat_update(channel=channel, ts=reply.ts, **message)
            reply.last_edit = time.monotonic()
            return None
        resp = await self.client.chat_postMessage(
            channel=channel, thread_ts=job.origin.get("thread_ts"), **message
        )
        reply.ts = str(resp["ts"])
        reply.last_edit = time.monotonic()
        return {"placeholder_ts": reply.ts}

    def _maybe_stream(self, job: Job, reply: _Reply, so_far: str) -> None:
        busy = reply.edit_task is not None and not reply.edit_task.done()
        if busy or time.monotonic() - reply.last_edit < self.update_interval_s or reply.ts is None:
            return
        reply.last_edit = time.monotonic()
        reply.edit_task = asyncio.create_task(self._stream_edit(job, reply.ts, so_far))

    async def _stream_edit(self, job: Job, ts: str, so_far: str) -> None:
        try:
            await self.client.chat_update(channel=job.origin["channel"], ts=ts, text=streaming_text(so_far))
        except SlackApiError as exc:  # a lost progress edit is harmless; the final edit matters
            log.info("job %s: streaming edit failed: %s", job.id, exc.response.get("error"))

    async def _final(self, job: Job, reply: _Reply, answer: str) -> dict[str, Any] | None:
        all_pages = pages(answer)
        changes = await self._write(job, reply, page_message([*_notice(job), *all_pages[0]]))
        for page in all_pages[1:]:
            await self.client.chat_postMessage(
                channel=job.origin["channel"],
                thread_ts=job.origin.get("thread_ts") or reply.ts,
                **page_message(page),
            )
        return changes

    # --- reactions on the user's message ------------------------------------------------------

    async def _react(self, job: Job, reply: _Reply, done: bool | None) -> None:
        """done=None: mark working (once); True: working → check mark; False: remove working."""
        ts = job.origin.get("message_ts")
        if not ts:
            return
        channel = job.origin["channel"]
        try:
            if done is None:
                if not reply.reacted:
                    reply.reacted = True
                    await self.client.reactions_add(channel=channel, timestamp=ts, name=WORKING)
                return
            await self.client.reactions_remove(channel=channel, timestamp=ts, name=WORKING)
            if done:
                await self.client.reactions_add(channel=channel, timestamp=ts, name=DONE)
        except SlackApiError as exc:  # already_reacted, no_reaction, missing scope: cosmetic
            log.info("job %s: reaction not changed: %s", job.id, exc.response.get("error"))

    # --- slash command answered privately -----------------------------------------------------

    async def _send_ephemeral(self, job: Job, event: ReplyEvent) -> None:
        lang = job.origin.get("lang")
        if isinstance(event, Final):
            blocks_pages = pages(event.text)
        elif isinstance(event, Failed):
            blocks_pages = [[escape(text(event.code, lang, ref=event.ref, **event.params))]]
        else:
            return  # the ack already said "working…"; ephemeral messages cannot be edited
        blocks_pages[0] = [*_notice(job), *blocks_pages[0]]
        for page in blocks_pages:
            await self.post_ephemeral(job.origin, page_message(page))

    async def post_ephemeral(self, origin: dict[str, Any], message: dict[str, Any]) -> None:
        """Through the command's response_url (works in channels the bot is not in), falling back
        to chat.postEphemeral once the URL has expired."""
        url = origin.get("response_url")
        if url:
            resp = await AsyncWebhookClient(url).send(response_type="ephemeral", **message)
            if resp.status_code == 200:
                return
            log.info("response_url answered HTTP %d; using chat.postEphemeral", resp.status_code)
        await self.client.chat_postEphemeral(channel=origin["channel"], user=origin["user"], **message)


def _notice(job: Job) -> list[str]:
    """The job's notice (see the module docstring) as a block to put first, or nothing."""
    notice = job.origin.get("notice")
    return [escape(str(notice))] if notice else []
