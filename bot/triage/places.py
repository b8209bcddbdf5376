"""Auto-triage places: the chats where every image posted is triaged without a mention. Named in
settings (VLBOT_TRIAGE__SLACK_CHANNELS / TELEGRAM_CHATS) or turned on by an admin at run time
(`/autotriage on` on Telegram, `/vlbot autotriage #channel on` on Slack; bot/admin_chat.py).

An admin's places are rows of `triage_places`: a change is audited with the admin as actor in
the same transaction, takes effect at once on every replica (the adapters ask `covers` for each
message that may be triaged: the settings set first, then one primary-key lookup) and survives
a restart; the daily digest lists `all` places at each pass. A place named in settings cannot
be turned off from a chat: `turn_off` leaves it on and says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from bot.admin_types import Subject
from bot.audit import AuditLog
from bot.db import Database, Row
from bot.settings import Settings
from bot.triage.rules import Place

Source = Literal["settings", "admin"]
# What a change did: turned on or off, or nothing (already so; a settings place stays on).
Change = Literal["on", "off", "already_on", "already_off", "settings"]


@dataclass(frozen=True)
class PlaceState:
    """Whether a place is auto-triaged, and where that comes from."""

    on: bool
    source: Source | None = None  # None when off
    set_by: Subject | None = None  # the admin who turned it on (source "admin")
    set_at: float | None = None


def settings_places(settings: Settings) -> frozenset[Place]:
    t = settings.triage
    return frozenset([Place("slack", c) for c in t.slack_channels]
                     + [Place("telegram", str(c)) for c in t.telegram_chats])


def chat_of(place: Place) -> Subject:
    """The place as the audit log and the admin replies name it."""
    return Subject(place.platform, "chat", place.chat)


class AutoTriagePlaces:
    def __init__(self, db: Database, configured: Iterable[Place] = ()) -> None:
        self.db = db
        self.configured = frozenset(configured)  # from settings

    async def covers(self, place: Place) -> bool:
        """Is an image posted in `place` triaged? Cheap: settings first, then one lookup."""
        if place in self.configured:
            return True
        return bool(await self._row(place))

    async def state(self, place: Place) -> PlaceState:
        if place in self.configured:
            return PlaceState(True, "settings")
        rows = await self._row(place)
        if not rows:
            return PlaceState(False)
        return PlaceState(True, "admin", Subject.parse(rows[0]["set_by"]), float(rows[0]["set_at"]))

    async def all(self) -> list[Place]:
        """Every place: the settings' first (in a stable order), then the admins'."""
        rows = await self.db.fetchall(
            "SELECT platform, chat FROM triage_places ORDER BY platform, chat"
        )
        settings = sorted(self.configured, key=lambda p: (p.platform, p.chat))
        return settings + [p for r in rows if (p := Place(r["platform"], r["chat"])) not in
                           self.configured]

    async def turn_on(self, actor: Subject, place: Place) -> Change:
        if place in self.configured:
            return "settings"
        async with self.db.transaction() as tx:
            added = await tx.execute(
                "INSERT INTO triage_places (platform, chat, set_by, set_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                [place.platform, place.chat, str(actor), time.time()],
            )
            if added:
                await AuditLog.write(tx, actor, "autotriage_on", chat_of(place))
        return "on" if added else "already_on"

    async def turn_off(self, actor: Subject, place: Place) -> Change:
        if place in self.configured:
            return "settings"
        async with self.db.transaction() as tx:
            removed = await tx.execute(
                "DELETE FROM triage_places WHERE platform = ? AND chat = ?",
                [place.platform, place.chat],
            )
            if removed:
                await AuditLog.write(tx, actor, "autotriage_off", chat_of(place))
        return "off" if removed else "already_off"

    async def _row(self, place: Place) -> list[Row]:
        return await self.db.fetchall(
            "SELECT set_by, set_at FROM triage_places WHERE platform = ? AND chat = ?",
            [place.platform, place.chat],
        )
