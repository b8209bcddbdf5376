"""The daily digest: once a day, at VLBOT_TRIAGE__DIGEST_HOUR (UTC), each auto-triage place gets a
post of the last 24 hours' triages there: counts by severity and product area, the most repeated
errors with a link to where each was first seen. The places are listed at each pass, so those an
admin turned on at run time are included (bot/triage/places.py).

A day's digest covers [that day's hour - 24 h, that day's hour), so consecutive digests neither
overlap nor leave a gap, whenever they are sent. Each (place, day) is claimed in the database
before it is posted: one digest per place and day across restarts and replicas. A process that
starts after the hour sends that day's digest at once; a period without triages posts nothing.
A post that fails gives the claim back and is tried again at the next pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta, timezone

from bot import texts
from bot.db import Row
from bot.tasks import cancel_and_wait
from bot.triage.rules import Place
from bot.triage.store import TriageStore
from bot.triage.summary import render, summarise, utc
from bot.triage.workflow import PostText

log = logging.getLogger("vlbot.triage.digest")

MAX_SLEEP_S = 900.0  # the scheduler looks again at least this often
# The places to post to, or how to list them at each pass (bot/triage/places.py: settings' and
# those an admin turned on at run time).
Places = Sequence[Place] | Callable[[], Awaitable[Sequence[Place]]]


def digest_day(now: float, hour: int) -> tuple[str, float]:
    """The latest digest due at `now`: (its day YYYY-MM-DD, the end of its period). Before the
    hour that is yesterday's."""
    moment = datetime.fromtimestamp(now, timezone.utc)
    end = moment.replace(hour=hour, minute=0, second=0, microsecond=0)
    if end > moment:
        end -= timedelta(days=1)
    return end.strftime("%Y-%m-%d"), end.timestamp()


def seconds_to_next(now: float, hour: int) -> float:
    _, end = digest_day(now, hour)
    return max(1.0, end + 86400 - now)


def digest_text(rows: Sequence[Row], start: float, end: float, lang: str | None = None) -> str:
    summary = summarise(rows)
    title = texts.text("triage_digest_title", lang, start=utc(start), end=utc(end, "%H:%M"),
                       count=summary.total)
    return "\n".join([title, *render(summary, lang)])


class DigestScheduler:
    """Posts each place's digest when due; started and stopped by the composition root."""

    def __init__(
        self,
        store: TriageStore,
        places: Places,
        hour: int,
        post: PostText,
        *,
        language: str = "en",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.places = places
        self.hour = hour
        self.post = post
        self.language = language
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def run_due(self) -> list[Place]:
        """Send every digest due now and not sent yet; the places posted to."""
        now = self.clock()
        day, end = digest_day(now, self.hour)
        posted: list[Place] = []
        places = await self.places() if callable(self.places) else self.places
        for place in places:
            if not await self.store.claim_digest(place, day, now):
                continue
            rows = await self.store.between(end - 86400, end, place)
            if not rows:
                continue  # nothing to tell; the day stays claimed
            try:
                await self.post(place.platform, place.chat,
                                digest_text(rows, end - 86400, end, self.language))
            except Exception as exc:
                log.warning("digest for %s (%s) not posted: %r; trying again later", place, day, exc)
                await self.store.release_digest(place, day)
                continue
            log.info("digest for %s (%s) posted: %d triages", place, day, len(rows))
            posted.append(place)
        return posted

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._forever(), name="vlbot-triage-digest")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _forever(self) -> None:
        while True:
            try:
                await self.run_due()
            except Exception as exc:  # the database away for a moment: the next pass
                log.warning("digest pass failed: %r", exc)
            await asyncio.sleep(min(MAX_SLEEP_S, seconds_to_next(self.clock(), self.hour)))
