"""Which messages of each chat the adapter knows, so that a message sent with a lost response is
found and removed instead of left beside the answer.

The Bot API has no idempotency key: when `sendMessage` fails after the request may have reached
Telegram (a read timeout, a dropped connection, a 5xx) the message may exist, and its id is
unknown. Message ids in a chat only grow, so such a message lies between the highest id known
before the send and the id of the next message this adapter sends there. After that next send,
every id in that range the adapter does not know (not a user message it received, not a message
it sent) is checked with a no-op `editMessageReplyMarkup`: Telegram answers "message is not
modified" only for a message of this bot, which is then the lost one and is deleted; a user's
message answers "can't be edited" and is never touched. The sweep runs only when no other send
in the chat is in flight (a message whose response has not arrived yet is not lost), and only
above an id this process saw being created (a message it sent, or a user's message dated after
the start), so messages of an earlier run are never swept.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from httpx import ConnectError, ConnectTimeout, PoolTimeout
from telegram import Bot
from telegram.error import BadRequest, NetworkError, TelegramError

log = logging.getLogger("vlbot.telegram")

MAX_SWEEP = 10  # ids checked after one lost send (a busy chat may interleave a few)
_KEEP = 500  # known ids remembered per chat


def maybe_delivered(exc: BaseException) -> bool:
    """Whether a failed request may still have reached Telegram (its outcome is unknown).
    Refusals (4xx) and errors raised before anything was sent (connect, pool) are certain."""
    if not isinstance(exc, NetworkError) or isinstance(exc, BadRequest):
        return False
    return not isinstance(exc.__cause__, (ConnectError, ConnectTimeout, PoolTimeout))


@dataclass
class _Chat:
    known: set[int] = field(default_factory=set)
    in_flight: int = 0
    lost_after: int | None = None  # a send with an unknown outcome happened after this id


class ChatLedger:
    def __init__(self, bot: Bot) -> None:
        self.bot = bot
        self.started_at = time.time()
        self._chats: dict[int, _Chat] = {}

    def note_incoming(self, chat_id: int, message_id: int, date: dt.datetime) -> None:
        """A user's message; it anchors a sweep only if it was sent since this process started
        (a replayed or redelivered older update may predate messages of an earlier run)."""
        if date.timestamp() >= math.floor(self.started_at):  # Telegram dates are whole seconds
            self.note(chat_id, message_id)

    def note(self, chat_id: int, message_id: int) -> None:
        chat = self._chats.setdefault(chat_id, _Chat())
        chat.known.add(message_id)
        if len(chat.known) > _KEEP:
            chat.known = set(sorted(chat.known)[-_KEEP // 2:])

    @contextlib.asynccontextmanager
    async def sending(self, chat_id: int) -> AsyncIterator[None]:
        """Wrap one send: a send that may have been delivered marks the chat for a sweep."""
        chat = self._chats.setdefault(chat_id, _Chat())
        before = max(chat.known, default=0)
        chat.in_flight += 1
        try:
            yield
        except TelegramError as exc:
            if maybe_delivered(exc) and before:
                log.info("telegram: a send to chat %s may have arrived (%s); will look for it",
                         chat_id, exc.message)
                chat.lost_after = before if chat.lost_after is None else min(chat.lost_after, before)
            raise
        finally:
            chat.in_flight -= 1

    async def sent(self, chat_id: int, message_id: int) -> None:
        """Record a message this adapter sent; then remove an earlier lost one, if any."""
        self.note(chat_id, message_id)
        chat = self._chats[chat_id]
        if chat.lost_after is None or chat.in_flight:
            return
        low, chat.lost_after = chat.lost_after, None
        candidates = [i for i in range(low + 1, message_id) if i not in chat.known]
        for candidate in candidates[-MAX_SWEEP:]:
            await self._remove_if_ours(chat_id, candidate)

    async def _remove_if_ours(self, chat_id: int, message_id: int) -> None:
        try:  # a no-op for this bot's messages (none carries a keyboard); refused for others
            await self.bot.edit_message_reply_markup(chat_id, message_id)
        except BadRequest as exc:
            if "not modified" not in exc.message.lower():
                return  # not ours (or gone)
        except TelegramError as exc:
            log.info("telegram: could not check message %s in chat %s: %s",
                     message_id, chat_id, exc.message)
            return
        else:
            return  # it had a keyboard: none of this bot's messages has one; leave it
        try:
            await self.bot.delete_message(chat_id, message_id)
            log.info("telegram: removed message %s in chat %s (sent with a lost response)",
                     message_id, chat_id)
        except TelegramError as exc:
            log.info("telegram: could not remove message %s in chat %s: %s",
                     message_id, chat_id, exc.message)
