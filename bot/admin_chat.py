"""The chat admin commands, run for Telegram and Slack alike: /allow, /deny, /quota, /usage,
/autotriage.

An adapter parses the platform's command syntax into a verb and words, says who asked
(`Asker`) and how its platform names people and chats (`ChatPlatform`); `ChatAdmin.run` checks
the asker may do it, carries it out through the admin facade (core.admin: persisted, audited
with the asker as actor, effective at once) and returns the reply text in the asker's language.

A non-admin's allow/deny/quota is refused before its arguments are read; anyone may ask /usage
about themselves (today's use and what is left of each limit); an admin's /usage is the report
of everyone's (or one user's or chat's) use over days: top users and chats, images per day, the
p50/p95 time to first token. An admin's /autotriage turns auto-triage on or off in a group or
channel (bot/triage/places.py), or says whether it is on there and why (settings or an admin).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bot import texts
from bot.admin import AdminService
from bot.admin_args import (
    CHANGING_VERBS,
    DEFAULT_REPORT_DAYS,
    AdminArgError,
    AdminCommand,
    AdminVerb,
    parse_admin_command,
)
from bot.admin_types import Limits, Remaining, Subject, TopUsage, UsageReport, reset_text, utc_day
from bot.triage.places import PlaceState
from bot.triage.rules import Place
from bot.triage.summary import utc

log = logging.getLogger("vlbot.admin")

TOP_N = 5  # users and chats listed in an admin's report
DAYS_SHOWN = 14  # the latest days of "images per day"
SETTING = {"telegram": "VLBOT_TRIAGE__TELEGRAM_CHATS", "slack": "VLBOT_TRIAGE__SLACK_CHANNELS"}


class ChatPlatform(Protocol):
    """How one chat platform names people and chats."""

    name: str  # "telegram" | "slack"

    def target(self, word: str) -> Subject:
        """The user or chat an argument names; AdminArgError if it names none."""

    def label(self, subject: Subject, lang: str | None) -> str:
        """A subject of this platform as its users read it (a Slack mention, a Telegram id)."""

    def quote(self, text: str) -> str:
        """User-typed text made safe to put into a reply (Slack: its three escapes)."""

    def is_group(self, chat: Subject) -> bool:
        """A group or channel (not a private chat with the bot): where auto-triage can be on."""


@dataclass(frozen=True)
class Asker:
    user: Subject
    chat: Subject | None  # where the command was typed
    lang: str | None
    replied_to: Subject | None = None  # Telegram: the author of the message replied to


class ChatAdmin:
    def __init__(self, platform: ChatPlatform, command_prefix: str = "/") -> None:
        self.platform = platform
        self.prefix = command_prefix  # "/" (Telegram) or "/vlbot " (Slack), for the hints

    async def run(self, admin: AdminService, verb: AdminVerb, args: Sequence[str], asker: Asker) -> str:
        lang = asker.lang
        is_admin = admin.is_admin(self.platform.name, asker.user.id)
        if verb in CHANGING_VERBS and not is_admin:
            log.info("%s: refused /%s from non-admin %s", self.platform.name, verb, asker.user.id)
            return texts.text("admin_only", lang, command=self.prefix + verb)
        def target_of(word: str) -> Subject:
            if word.lower() == "here" and asker.chat is not None:
                return asker.chat
            return self.platform.target(word)

        try:
            command = parse_admin_command(verb, args, target_of, asker.replied_to)
        except AdminArgError as exc:
            return self._arg_error(exc, verb, lang)
        if command.verb == "usage":
            return await self._usage(admin, command, asker, is_admin)
        if command.verb == "autotriage":
            return await self._autotriage(admin, command, asker)
        assert command.target is not None
        target, who = command.target, self.label(command.target, lang)
        if command.verb == "allow":
            await admin.allow(asker.user, target)
            reply = texts.text("admin_allowed", lang, who=who)
        elif command.verb == "deny":
            await admin.deny(asker.user, target)
            reply = texts.text("admin_denied", lang, who=who)
        else:
            after = await admin.set_quota(asker.user, target, command.limits)
            reply = texts.text("admin_quota_set", lang, who=who, limits=self.limits_text(after, lang))
        log.info("%s: admin %s ran /%s on %s", self.platform.name, asker.user.id, verb, target)
        return reply

    def _arg_error(self, exc: AdminArgError, verb: AdminVerb, lang: str | None) -> str:
        params = {k: self.platform.quote(str(v)) for k, v in exc.params.items()}
        reason = texts.text(exc.code, lang, **{"command": self.prefix + verb, **params})
        whom = "where" if verb == "autotriage" else "who"
        who = texts.text(f"admin_{whom}_{self.platform.name}", lang)
        return f"{reason}\n{texts.text('admin_usage_' + verb, lang, command=self.prefix + verb, who=who)}"

    # --- /autotriage ------------------------------------------------------------------------

    async def _autotriage(self, admin: AdminService, command: AdminCommand, asker: Asker) -> str:
        lang = asker.lang
        chat = command.target or asker.chat
        if chat is None or not self.platform.is_group(chat):
            return texts.text("admin_autotriage_not_group", lang)
        place, where = Place(chat.platform, chat.id), self.label(chat, lang)
        setting = SETTING[self.platform.name]
        if command.switch is None:
            return self._autotriage_state(await admin.auto_triage.state(place), where, lang)
        places = admin.auto_triage
        change = await (places.turn_on if command.switch else places.turn_off)(asker.user, place)
        log.info("%s: admin %s: autotriage %s in %s: %s", self.platform.name, asker.user.id,
                 "on" if command.switch else "off", chat, change)
        if change == "settings":
            key = "admin_autotriage_settings_" + ("on" if command.switch else "off")
            return texts.text(key, lang, where=where, setting=setting)
        if change == "already_on":
            return self._autotriage_state(await places.state(place), where, lang)
        return texts.text("admin_autotriage_" + change, lang, where=where)

    def _autotriage_state(self, state: PlaceState, where: str, lang: str | None) -> str:
        if state.source == "settings":
            return texts.text("admin_autotriage_state_settings", lang, where=where,
                              setting=SETTING[self.platform.name])
        if state.source == "admin" and state.set_by is not None and state.set_at is not None:
            return texts.text("admin_autotriage_state_admin", lang, where=where,
                              who=self.label(state.set_by, lang), when=utc(state.set_at))
        return texts.text("admin_autotriage_state_off", lang, where=where,
                          command=self.prefix + "autotriage")

    # --- /usage ------------------------------------------------------------------------------

    async def _usage(
        self, admin: AdminService, command: AdminCommand, asker: Asker, is_admin: bool
    ) -> str:
        lang = asker.lang
        target = command.target
        if target is not None and target != asker.user and not is_admin:
            return texts.text("admin_usage_others", lang)
        if is_admin and (target is None or target != asker.user):
            days = command.days or DEFAULT_REPORT_DAYS
            return self.report_text(await admin.usage(target, days), days, lang)
        own = self.remaining_text(await admin.remaining(asker.user, asker.chat), lang)
        if command.days is None:
            return own
        report = await admin.usage(asker.user, command.days)
        return f"{own}\n\n{self.report_text(report, command.days, lang)}"

    def remaining_text(self, left: Remaining, lang: str | None) -> str:
        used = left.used
        lines = [texts.text("admin_used_today", lang, requests=used.requests, images=used.images,
                            engine=_seconds(used.engine_s), waiting=used.waiting)]
        if left.exempt:
            lines.append(texts.text("admin_exempt", lang))
            return "\n".join(lines)
        limits = left.limits
        items = [
            self._left("images", left.images_left, limits.images_per_day, lang),
            self._left("requests", left.requests_left, limits.requests_per_day, lang),
            self._left("engine", _maybe_seconds(left.engine_seconds_left),
                       _maybe_seconds(limits.engine_seconds_per_day), lang),
            self._left("waiting", None if limits.max_waiting is None
                       else max(0, limits.max_waiting - used.waiting), limits.max_waiting, lang),
        ]
        lines.append(texts.text("admin_left_today", lang, items="; ".join(items)))
        lines.append(texts.text("admin_resets", lang, reset=reset_text(left.resets_at)))
        return "\n".join(lines)

    @staticmethod
    def _left(name: str, left: Any, limit: Any, lang: str | None) -> str:
        label = texts.text("admin_limit_" + name, lang)
        if limit is None:
            return texts.text("admin_no_limit", lang, name=label)
        return texts.text("admin_left_item", lang, name=label, left=left, limit=limit)

    def report_text(self, report: UsageReport, days: int, lang: str | None) -> str:
        t = report.totals
        whom = "" if report.subject is None else texts.text(
            "admin_report_of", lang, who=self.label(report.subject, lang))
        lines = [texts.text(
            "admin_report_head", lang, days=days, since=utc_day(report.since),
            until=utc_day(report.until), whom=whom, requests=t.requests, images=t.images,
            engine=_seconds(t.engine_s), answered=t.answered, failed=t.failed,
            cancelled=t.cancelled, rejected=t.rejected,
        )]
        if report.first_token_p50_s is None or report.first_token_p95_s is None:
            lines.append(texts.text("admin_report_no_first_token", lang))
        else:
            lines.append(texts.text("admin_report_first_token", lang,
                                    p50=f"{report.first_token_p50_s:.2f}",
                                    p95=f"{report.first_token_p95_s:.2f}"))
        for key, top in (("admin_report_top_users", report.top_users),
                         ("admin_report_top_chats", report.top_chats)):
            if top:
                lines.append(texts.text(key, lang))
                lines.extend(self._top_line(i, row, lang) for i, row in enumerate(top[:TOP_N], 1))
        per_day = ", ".join(f"{d.day}: {d.images}" for d in report.days[-DAYS_SHOWN:])
        lines.append(texts.text("admin_report_images_per_day", lang,
                                days=per_day or texts.text("admin_report_none", lang)))
        return "\n".join(lines)

    def _top_line(self, rank: int, row: TopUsage, lang: str | None) -> str:
        who = self.label(row.subject, lang)
        if row.name:
            who = f"{self.platform.quote(row.name)} ({who})"
        return texts.text("admin_report_top_line", lang, rank=rank, who=who, requests=row.requests,
                          images=row.images, engine=_seconds(row.engine_s))

    # --- naming ------------------------------------------------------------------------------

    def label(self, subject: Subject, lang: str | None) -> str:
        if subject.platform == self.platform.name:
            return self.platform.label(subject, lang)
        ident = self.platform.quote(subject.id)
        if subject.kind == "key":
            return texts.text("admin_label_key", lang, id=ident)
        return texts.text("admin_label_" + subject.kind, lang,
                          platform=subject.platform.capitalize(), id=ident)

    def limits_text(self, limits: Limits, lang: str | None) -> str:
        shown = [
            (texts.text("admin_limit_images", lang), limits.images_per_day, "admin_per_day"),
            (texts.text("admin_limit_requests", lang), limits.requests_per_day, "admin_per_day"),
            (texts.text("admin_limit_engine", lang), _maybe_seconds(limits.engine_seconds_per_day),
             "admin_seconds_per_day"),
            (texts.text("admin_limit_waiting", lang), limits.max_waiting, "admin_at_once"),
        ]
        return ", ".join(
            texts.text("admin_limit_default", lang, name=name) if value is None
            else texts.text(unit, lang, name=name, value=value)
            for name, value, unit in shown
        )


def _seconds(value: float) -> str:
    """Engine seconds as shown: one decimal, none when whole (600, 12.5)."""
    return f"{value:.1f}".removesuffix(".0")


def _maybe_seconds(value: float | None) -> str | None:
    return None if value is None else _seconds(value)
