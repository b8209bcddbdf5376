"""The triage workflow: what happens to a preset's result before the answer is delivered.

`TriageWorkflow` is the runner's PresetResultHook (bot/job_hooks.py). For a triage result it
1. records it and groups it with repeats of the same error in the same place (store.py);
2. enqueues a "triage.result" webhook event (bot/outbox.py) with the result, place, link, user,
   group_id and count, under an id stable per job (a result that comes again is one event);
3. posts a short summary with the link to the original message into the target of every routing
   rule that matches (rules.py), through `PostText` (the chat adapters' `post`); a post that
   fails is logged and costs nothing else;
4. returns the reply's note when the error was seen before: "Seen 4 times since Monday, first
   here: <link>" (days and times in UTC).
Other presets' results are bot/webhooks.py's PresetResultWebhooks' business ("preset.result").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from bot import texts
from bot.models import Job
from bot.outbox import TRIAGE_EVENT
from bot.triage.rules import Place, RoutingRule, targets_for
from bot.triage.store import Grouped, TriageRecord, TriageStore
from bot.triage.summary import error_text, utc

log = logging.getLogger("vlbot.triage")

TRIAGE_PRESET = "triage"
POST_TIMEOUT_S = 15.0

# (platform, chat, text) -> a link to the posted message, or None where the platform has none
PostText = Callable[[str, str, str], Awaitable[str | None]]


class EventSink(Protocol):
    """What the workflow needs of bot/outbox.py's Outbox."""

    async def enqueue(
        self, event_type: str, payload: Mapping[str, Any], *, event_id: str | None = None
    ) -> str: ...


def iso(ts: float) -> str:
    return utc(ts, "%Y-%m-%dT%H:%M:%SZ")


def since_text(first_seen: float, now: float, lang: str | None = None) -> str:
    """When a group was first seen, as the note says it (UTC): "09:14 UTC" today, a weekday
    within the last six days, else the date."""
    first = datetime.fromtimestamp(first_seen, timezone.utc)
    days = (datetime.fromtimestamp(now, timezone.utc).date() - first.date()).days
    if days < 1:
        return texts.text("triage_since_time", lang, time=first.strftime("%H:%M"))
    if days < 7:
        return texts.text("triage_weekdays", lang).split(",")[first.weekday()]
    month = texts.text("triage_months", lang).split(",")[first.month - 1]
    return texts.text("triage_since_date", lang, day=first.day, month=month, year=first.year)


def seen_note(grouped: Grouped, now: float, lang: str | None = None) -> str | None:
    """The reply's note for an error seen before; None the first time."""
    if grouped.count < 2:
        return None
    since = since_text(grouped.first_seen, now, lang)
    if grouped.first_link:
        return texts.text("triage_seen", lang, count=grouped.count, since=since,
                          link=grouped.first_link)
    return texts.text("triage_seen_no_link", lang, count=grouped.count, since=since)


def route_summary(record: TriageRecord, grouped: Grouped, lang: str | None = None) -> str:
    """The short text a routing rule posts into its target."""
    row = {"error_message": record.error_message, "error_code": record.error_code}
    summary = texts.text(
        "triage_route", lang,
        severity=texts.text(f"pf_severity_{record.severity}", lang),
        area=record.product_area or texts.text("triage_no_area", lang),
        error=error_text(row) or texts.text("triage_no_error", lang),
    )
    if grouped.count > 1:
        summary += texts.text("triage_route_seen", lang, count=grouped.count)
    where = (texts.text("triage_route_link", lang, link=record.link) if record.link
             else texts.text("triage_route_place", lang, place=str(record.place)))
    return f"{summary}\n{where}"


class TriageWorkflow:
    """The PresetResultHook behind triage: record, group, webhook, route, note."""

    def __init__(
        self,
        store: TriageStore,
        *,
        rules: Sequence[RoutingRule] = (),
        outbox: EventSink | None = None,
        post: PostText | None = None,
        language: str = "en",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.rules = list(rules)
        self.outbox = outbox
        self.post = post
        self.language = language  # of the routed summaries (the note follows the user's)
        self.clock = clock

    async def preset_result(
        self, job: Job, preset: str, result: Mapping[str, Any]
    ) -> str | None:
        if preset != TRIAGE_PRESET:
            return None
        now = self.clock()
        place = Place(job.conversation.platform, job.conversation.chat)
        link = job.origin.get("link")
        record = TriageRecord.of(
            job.id, place, result, link=link if isinstance(link, str) else None,
            user_id=job.user.platform_id, user_name=job.user.display_name,
            auto_triage=bool(job.origin.get("auto_triage")), created_at=now,
        )
        grouped = await self.store.record(record)
        if self.outbox is not None:
            payload = {
                **self._context(job), "preset": preset, "result": dict(result),
                "group_id": grouped.group_id, "count": grouped.count,
                "first_seen": iso(grouped.first_seen), "first_link": grouped.first_link,
            }
            await self.outbox.enqueue(TRIAGE_EVENT, payload, event_id=f"evt_triage_{job.id}")
        if grouped.new:  # a result that came again was routed the first time
            await self._route(record, grouped)
        return seen_note(grouped, now, job.user.language_code)

    def _context(self, job: Job) -> dict[str, Any]:
        conversation = job.conversation
        link = job.origin.get("link")
        return {
            "job_id": job.id,
            "place": {"platform": conversation.platform, "chat": conversation.chat,
                      "thread": conversation.thread},
            "link": link if isinstance(link, str) else None,
            "user": {"id": job.user.platform_id, "name": job.user.display_name},
            "auto_triage": bool(job.origin.get("auto_triage")),
            "event_time": iso(self.clock()),
        }

    async def _route(self, record: TriageRecord, grouped: Grouped) -> None:
        targets = targets_for(self.rules, record.severity, record.product_area, str(record.place))
        if not targets:
            return
        text = route_summary(record, grouped, self.language)
        for target in targets:
            await self._post(target, text, record.job_id)

    async def _post(self, target: Place, text: str, job_id: str) -> None:
        if self.post is None:
            log.warning("job %s: routing to %s, but no chat platform can post", job_id, target)
            return
        try:
            await asyncio.wait_for(self.post(target.platform, target.chat, text), POST_TIMEOUT_S)
            log.info("job %s: triage routed to %s", job_id, target)
        except Exception as exc:  # a routed copy never costs the user the answer
            log.warning("job %s: triage not routed to %s: %r", job_id, target, exc)
