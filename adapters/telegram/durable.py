"""The update queue between PTB's receiver (long polling or the webhook) and its handlers, made
durable: an update is in SQLite before Telegram learns it was received.

How PTB acknowledges: in long polling, the Updater puts each fetched update into this queue
(`await update_queue.put(update)`) and only then advances the offset that the next getUpdates
sends, which is what tells Telegram the updates were received; in webhook mode our server
answers 200 after the same `put`. So `put` writing the update to the `pending_updates` table
(committed; WAL survives SIGKILL) before it returns means nothing is acknowledged unwritten. If
the write fails, `put` raises a TelegramError: the offset does not advance and PTB's polling
loop retries getUpdates with backoff, or the webhook answers 500 and Telegram redelivers.

The handlers call `settle` once an update is fully handled — a job written (the runner's own
durable record takes over), a refusal sent, or nothing to do. An album's parts stay pending
until the album's job is written. Whatever is still pending at start (an album inside its
collection window, a photo still downloading, a handler cut off by SIGTERM or SIGKILL) is put
back by `replay` before polling starts and handled again; job writes dedupe by event key, and an
update already in this process (replayed and redelivered) is handled once.

Webhook mode waits (`handled`, bounded) until the update is settled before answering 200: with
replicas, a replica killed before it wrote the job has then not acknowledged the update, and
Telegram's redelivery (through the proxy, to another replica) keeps the chat's order; a pending
update would otherwise be handled only at that replica's restart, after the chat's later ones.
"""

from __future__ import annotations

import asyncio
import logging

from telegram import Bot, Update
from telegram.error import TelegramError

from bot.pending import PendingUpdates

log = logging.getLogger("vlbot.telegram")


class DurableUpdateQueue(asyncio.Queue[object]):
    def __init__(self, pending: PendingUpdates) -> None:
        super().__init__()
        self.pending = pending
        self._in_process: set[int] = set()
        self._settled: dict[int, asyncio.Event] = {}

    async def put(self, item: object) -> None:
        if isinstance(item, Update) and item.message is not None:
            if item.update_id in self._in_process:
                return  # redelivered while the replayed copy is being handled
            try:
                await self.pending.add(str(item.update_id), item.to_dict())
            except Exception as exc:  # the database (SQLite or Postgres) refused it
                # a TelegramError: PTB's polling loop retries getUpdates (same offset) with backoff
                log.error("telegram: could not store update %s: %r", item.update_id, exc)
                raise TelegramError(f"update {item.update_id} not stored") from exc
            self._in_process.add(item.update_id)
            self._settled.setdefault(item.update_id, asyncio.Event())
        await super().put(item)

    async def handled(self, update_id: int, timeout_s: float) -> None:
        """Wait until the update is settled (at most `timeout_s`; it stays pending anyway)."""
        settled = self._settled.get(update_id)
        if settled is not None:
            try:
                await asyncio.wait_for(settled.wait(), timeout_s)
            except asyncio.TimeoutError:
                self._settled.pop(update_id, None)

    async def settle(self, *update_ids: int) -> None:
        """These updates are handled: forget them."""
        await self.pending.remove(str(i) for i in update_ids)
        self._in_process.difference_update(update_ids)
        for update_id in update_ids:
            settled = self._settled.pop(update_id, None)
            if settled is not None:
                settled.set()

    async def replay(self, bot: Bot) -> int:
        """Queue the updates left pending by an earlier run; returns how many."""
        bodies = await self.pending.all()
        for body in bodies:
            update = Update.de_json(body, bot)
            self._in_process.add(update.update_id)
            await super().put(update)
        if bodies:
            log.info("telegram: handling %d updates received before the restart", len(bodies))
        return len(bodies)
