"""Reply delivery for Telegram: one placeholder per job, streamed into by throttled edits.

The placeholder is sent on the first reply event (Queued or Started) and its message id is
returned to the runner, which persists it in the job's origin; every later event, also after a
restart, edits that same message, so a user sees exactly one reply per question.

Partial text is never sent from the runner's coroutine: `Partial` only records the latest text
and a per-job flusher task edits the placeholder at most once per interval (about one edit per
second in private chats, fewer in groups), so a slow or rate-limited Telegram never slows
generation. The final answer is sent as plain text (no parse mode: `*_[` can never fail to send),
split at Telegram's 4096-character limit; a complete fenced block in a piece (```json … ```, as
a preset's answer carries its JSON) is sent as its bare content with a `pre` entity of the
fence's language, which Telegram shows as a code block with a copy button.

A send whose response was lost (the message may exist, its id is unknown) is not left beside
the answer: the next message sent to the chat (the next placeholder try, or the answer) lets
`ChatLedger` find the lost one between the known ids and delete it (see adapters.telegram.ledger).
Edits are idempotent, so a retried final edit can never show the answer twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from telegram import Bot, MessageEntity, ReplyParameters
from telegram.constants import ChatAction
from telegram.error import BadRequest, Forbidden, RetryAfter, TelegramError

from adapters.telegram.ledger import ChatLedger
from bot import texts
from bot.adapter import Failed, Final, Partial, Queued, ReplyEvent, Started
from bot.models import Job

log = logging.getLogger("vlbot.telegram")

MAX_MESSAGE = 4096  # Telegram's limit, in UTF-16 code units
FENCE_RE = re.compile(r"```([\w+#.-]*)[ \t]*\n(.*?)\n?```", re.DOTALL)


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """Split at the last newline (or space) before the limit; never an empty piece."""
    pieces: list[str] = []
    rest = text.strip()
    while utf16_len(rest) > limit:
        lo, hi = 1, min(len(rest), limit)  # the longest prefix that fits: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if utf16_len(rest[:mid]) <= limit else (lo, mid - 1)
        cut = lo
        window = rest[:cut]
        at = max(window.rfind("\n"), window.rfind(" "))
        if at < cut // 2:
            at = cut
        pieces.append(rest[:at].rstrip())
        rest = rest[at:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces or ["…"]


def code_blocks(text: str) -> tuple[str, list[MessageEntity]]:
    """`text` with its complete fenced blocks unwrapped, and a `pre` entity (offsets in UTF-16
    code units, as the Bot API counts) for each. An open fence, or an empty block, stays as typed."""
    out: list[str] = []
    entities: list[MessageEntity] = []
    offset = 0  # UTF-16 length of what is in `out`
    at = 0
    for match in FENCE_RE.finditer(text):
        language, body = match.group(1), match.group(2)
        if not body.strip():
            continue  # an entity may not be empty
        before = text[at:match.start()]
        out.append(before)
        offset += utf16_len(before)
        entities.append(MessageEntity(MessageEntity.PRE, offset, utf16_len(body),
                                      language=language or None))
        out.append(body)
        offset += utf16_len(body)
        at = match.end()
    out.append(text[at:])
    return "".join(out), entities


def preview(text: str) -> str:
    """What a placeholder shows while the answer streams: the text so far and an ellipsis."""
    shown = split_message(text)[0]
    return shown + " …"


TYPING_RENEW_S = 4.5


@dataclass
class ReplyState:
    placeholder_id: int | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: bool = False
    done: bool = False
    shown: str = ""
    pending: str | None = None
    last_edit: float = 0.0
    answer_ids: list[int] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    side: asyncio.Task[Any] | None = None


class Replier:
    def __init__(
        self,
        bot: Bot,
        *,
        ledger: ChatLedger,
        max_concurrency: int,
        edit_interval_s: float = 1.0,
        group_edit_interval_s: float = 3.0,
    ) -> None:
        self.bot = bot
        self.ledger = ledger
        self.max_concurrency = max_concurrency
        self.edit_interval_s = edit_interval_s
        self.group_edit_interval_s = group_edit_interval_s
        # the runner's state when a Queued event arrives (set by the adapter from core.status())
        self.running = 0
        self.queue_depth = 0
        self._states: dict[str, ReplyState] = {}

    async def close(self) -> None:
        for state in self._states.values():
            await _stop(state.flusher)
            await _stop(state.side)
        self._states.clear()

    async def send(self, job: Job, event: ReplyEvent) -> dict[str, Any] | None:
        state = self._states.get(job.id)
        if state is None:
            state = ReplyState(placeholder_id=job.origin.get("placeholder_id"))
            state.answer_ids = list(job.origin.get("answer_ids") or [])
            self._states[job.id] = state
        try:
            if isinstance(event, Partial):
                self._on_partial(job, state, event)
                return None
            if isinstance(event, Started):
                # in the background: the runner starts generating without waiting for Telegram
                # (and a /cancel never lands inside this call)
                state.started = True
                state.side = asyncio.create_task(self._quietly(job, self._on_progress(job, state, event)))
                return None
            if isinstance(event, Queued):
                return await self._on_progress(job, state, event)
            await _stop(state.flusher)
            await _stop(state.side)
            if isinstance(event, Final):
                return await self._on_final(job, state, event.text)
            return await self._on_failed(job, state, event)
        except Forbidden as exc:  # the user blocked the bot or left the chat: nothing to deliver
            log.info("job %s: chat %s refuses messages (%s); reply dropped",
                     job.id, job.origin.get("chat_id"), exc.message)
            state.done = True
            await _stop(state.flusher)
            await _stop(state.side)
            self._states.pop(job.id, None)
            return None

    # --- events ------------------------------------------------------------------------------

    async def _on_progress(
        self, job: Job, state: ReplyState, event: Queued | Started
    ) -> dict[str, Any] | None:
        lang = job.origin.get("lang")
        async with state.lock:
            if state.done or state.pending is not None or (
                state.started and isinstance(event, Queued)
            ):
                return None  # a late position update must not overwrite the answer
            if isinstance(event, Started):
                state.started = True
                label = texts.text("thinking", lang)
            elif self.queue_depth >= event.position > self.max_concurrency - self.running:
                # still in the queue, and no free worker will take it at once
                label = texts.queued(event.position, event.eta_s, lang)
            else:
                label = texts.text("thinking", lang)
            created = state.placeholder_id is None
            if created or state.shown != label:
                await self._show(job, state, label)
        if isinstance(event, Started):
            while not state.done:  # Telegram shows "typing…" for 5 s: renew it until the answer
                await self._typing(job)
                await asyncio.sleep(TYPING_RENEW_S)
        return {"placeholder_id": state.placeholder_id} if created else None

    async def _quietly(self, job: Job, work: Awaitable[Any]) -> None:
        try:
            await work
        except TelegramError as exc:
            log.info("job %s: progress update failed: %s", job.id, exc.message)

    def _on_partial(self, job: Job, state: ReplyState, event: Partial) -> None:
        if state.done:
            return
        state.started = True
        state.pending = event.text
        if state.flusher is None or state.flusher.done():
            state.flusher = asyncio.create_task(self._flush(job, state), name=f"tg-edit-{job.id}")

    async def _flush(self, job: Job, state: ReplyState) -> None:
        interval = self.group_edit_interval_s if job.origin.get("group") else self.edit_interval_s
        while state.pending is not None and not state.done:
            wait = state.last_edit + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            text, state.pending = state.pending, None
            try:
                async with state.lock:
                    if state.done:
                        return
                    await self._show(job, state, preview(text))
            except RetryAfter as exc:  # the rate limiter gave up: skip this frame, keep the latest
                state.last_edit = time.monotonic() + exc._retry_after.total_seconds()
                state.pending = state.pending or text
            except TelegramError as exc:
                log.info("job %s: streaming edit failed: %s", job.id, exc.message)
                state.last_edit = time.monotonic()

    async def _on_final(self, job: Job, state: ReplyState, answer: str) -> dict[str, Any]:
        lang = job.origin.get("lang")
        chunks = split_message(answer) if answer.strip() else [texts.text("empty_answer", lang)]
        async with state.lock:
            ids = state.answer_ids or ([state.placeholder_id] if state.placeholder_id else [])
            for i, chunk in enumerate(chunks):
                existing = ids[i] if i < len(ids) else None
                message_id = await self._put(job, existing, *code_blocks(chunk))
                if i < len(state.answer_ids):
                    state.answer_ids[i] = message_id
                else:
                    state.answer_ids.append(message_id)
            state.done = True
        self._states.pop(job.id, None)
        return {"placeholder_id": state.answer_ids[0], "answer_ids": state.answer_ids}

    async def _on_failed(self, job: Job, state: ReplyState, event: Failed) -> dict[str, Any] | None:
        lang = job.origin.get("lang")
        params = {"ref": event.ref, **event.params}
        message = texts.text(event.code, lang, **params) if event.code in texts.CATALOGUE["en"] \
            else texts.text("failed", lang, ref=event.ref)
        async with state.lock:
            created = state.placeholder_id is None
            await self._show(job, state, message)
            state.done = True
        self._states.pop(job.id, None)
        return {"placeholder_id": state.placeholder_id} if created else None

    # --- Telegram calls ----------------------------------------------------------------------

    async def _show(self, job: Job, state: ReplyState, text: str) -> None:
        """Make the placeholder show `text` (sending it first if there is none). Lock held."""
        state.placeholder_id = await self._put(job, state.placeholder_id, text)
        state.shown = text
        state.last_edit = time.monotonic()

    async def _put(self, job: Job, message_id: int | None, text: str,
                   entities: list[MessageEntity] | None = None) -> int:
        """Edit `message_id` to `text`, or send a new message when there is none (or the user
        deleted it). Returns the id of the message now showing `text`."""
        chat_id = int(job.origin["chat_id"])
        if message_id is not None:
            try:
                await self.bot.edit_message_text(text, chat_id=chat_id, message_id=message_id,
                                                 entities=entities or None)
                return message_id
            except BadRequest as exc:
                reason = exc.message.lower()
                if "not modified" in reason:
                    return message_id
                if "not found" not in reason:
                    raise
                log.info("job %s: message %s was deleted; sending a new one", job.id, message_id)
        async with self.ledger.sending(chat_id):
            sent = await self.bot.send_message(
                chat_id, text, entities=entities or None,
                message_thread_id=job.origin.get("thread_id"),
                reply_parameters=_reply_to(job.origin.get("message_id")),
            )
        await self.ledger.sent(chat_id, sent.message_id)
        return sent.message_id

    async def _typing(self, job: Job) -> None:
        with contextlib.suppress(TelegramError):
            await self.bot.send_chat_action(
                int(job.origin["chat_id"]), ChatAction.TYPING,
                message_thread_id=job.origin.get("thread_id"),
            )


def _reply_to(message_id: int | None) -> ReplyParameters | None:
    if message_id is None:
        return None
    return ReplyParameters(message_id=int(message_id), allow_sending_without_reply=True)


async def _stop(task: asyncio.Task[Any] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
