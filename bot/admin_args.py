"""The arguments of the chat admin commands, parsed strictly (Telegram and Slack share this).

    allow <who>                  deny <who>
    quota <who> images=20 requests=50 engine=600 waiting=2   (any of the four, at least one)
    usage [who] [days]
    autotriage [where] [on|off]  (where: a group or channel; none: here)

Who a command is about is platform syntax (a Telegram id or reply, a Slack <@U…>/<#C…>
mention): the adapter passes a `TargetParser` for it. Any argument that does not fit raises
`AdminArgError`, whose code and params select the reply naming it (bot/texts.py, admin_*);
nothing is changed then.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.admin_types import Limits, Subject

AdminVerb = Literal["allow", "deny", "quota", "usage", "autotriage"]
ADMIN_VERBS: tuple[AdminVerb, ...] = ("allow", "deny", "quota", "usage", "autotriage")
# The commands that change something: only admins may run them (autotriage's status too).
CHANGING_VERBS: tuple[AdminVerb, ...] = ("allow", "deny", "quota", "autotriage")
SWITCHES = {"on": True, "off": False}  # autotriage's last word
# quota names as typed → Limits fields
LIMIT_FIELDS = {
    "images": "images_per_day",
    "requests": "requests_per_day",
    "engine": "engine_seconds_per_day",
    "waiting": "max_waiting",
}
LIMIT_NAMES = ", ".join(LIMIT_FIELDS)
MAX_COUNT = 1_000_000  # images, requests or waiting jobs
MAX_ENGINE_S = 10_000_000.0
MAX_DAYS = 366
DEFAULT_REPORT_DAYS = 7  # an admin's /usage without days
_DAYS_RE = re.compile(r"(\d{1,6})d?", re.IGNORECASE)
_NUMBER_RE = re.compile(r"\d{1,12}(\.\d{1,6})?")


class AdminArgError(Exception):
    """An argument that does not fit; `code` names the reply text, `params` fill it in."""

    def __init__(self, code: str, **params: Any) -> None:
        super().__init__(code)
        self.code = code
        self.params = params


# Turns one argument into whom it names; raises AdminArgError when it is not a valid target.
TargetParser = Callable[[str], Subject]


@dataclass(frozen=True)
class AdminCommand:
    verb: AdminVerb
    target: Subject | None = None  # allow/deny/quota: always set; usage: None means "me" / "all"
    limits: Limits = field(default_factory=Limits)  # quota
    days: int | None = None  # usage: None when not given
    switch: bool | None = None  # autotriage: on (True), off (False), None: say how it is


def parse_admin_command(
    verb: AdminVerb, args: Sequence[str], target_of: TargetParser, replied_to: Subject | None = None
) -> AdminCommand:
    """`args` are the words after the command; `replied_to` is whom a reply is about (Telegram),
    used when no argument names anyone."""
    words = list(args)
    if verb in ("allow", "deny"):
        if len(words) > 1:
            raise AdminArgError("admin_extra_argument", arg=words[1])
        target = target_of(words[0]) if words else replied_to
        if target is None:
            raise AdminArgError("admin_who_missing")  # the reply names the command
        return AdminCommand(verb, target)
    if verb == "quota":
        target = replied_to
        if words and "=" not in words[0]:
            target = target_of(words.pop(0))
        if target is None:
            raise AdminArgError("admin_who_missing")  # the reply names the command
        return AdminCommand(verb, target, limits=parse_limits(words))
    if verb == "autotriage":
        return parse_autotriage(words, target_of)
    if len(words) > 2:
        raise AdminArgError("admin_extra_argument", arg=words[2])
    days: int | None = None
    target = replied_to
    if len(words) == 2:
        target, days = target_of(words[0]), parse_days(words[1])
    elif words:
        days = days_or_none(words[0])
        if days is None:
            target = _target_or_days(words[0], target_of)
    return AdminCommand(verb, target, days=days)


def parse_autotriage(words: Sequence[str], target_of: TargetParser) -> AdminCommand:
    """[where] [on|off]: target None means the chat the command was typed in."""
    if len(words) > 2:
        raise AdminArgError("admin_extra_argument", arg=words[2])
    rest = list(words)
    switch: bool | None = None
    if rest and rest[-1].lower() in SWITCHES:
        switch = SWITCHES[rest.pop().lower()]
    elif len(rest) == 2:
        raise AdminArgError("admin_autotriage_bad_switch", arg=rest[1])
    if len(rest) > 1:
        raise AdminArgError("admin_extra_argument", arg=rest[1])
    target = target_of(rest[0]) if rest else None
    if target is not None and target.kind != "chat":
        raise AdminArgError("admin_autotriage_not_a_chat", arg=rest[0])
    return AdminCommand("autotriage", target, switch=switch)


def _target_or_days(word: str, target_of: TargetParser) -> Subject:
    """/usage's single argument when it is not a number of days: whom, else (a number such as
    "0" or "400d") the days it failed to be."""
    try:
        return target_of(word)
    except AdminArgError:
        if _DAYS_RE.fullmatch(word.strip()):
            raise AdminArgError("admin_bad_days", arg=word, limit=MAX_DAYS) from None
        raise


def parse_limits(words: Sequence[str]) -> Limits:
    """images=20 requests=50 engine=600 waiting=2 (any of them, at least one) → Limits."""
    if not words:
        raise AdminArgError("admin_quota_empty", names=LIMIT_NAMES)
    values: dict[str, int | float] = {}
    for word in words:
        name, sep, value = word.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise AdminArgError("admin_not_a_setting", arg=word, names=LIMIT_NAMES)
        if name not in LIMIT_FIELDS:
            raise AdminArgError("admin_unknown_limit", arg=word, name=name, names=LIMIT_NAMES)
        key = LIMIT_FIELDS[name]
        if key in values:
            raise AdminArgError("admin_limit_twice", name=name)
        values[key] = _limit_value(word, name, value.strip())
    return Limits(**values)  # type: ignore[arg-type]


def _limit_value(word: str, name: str, value: str) -> int | float:
    if value.startswith("-") and _NUMBER_RE.fullmatch(value[1:]):
        raise AdminArgError("admin_negative", arg=word)
    if not _NUMBER_RE.fullmatch(value):
        raise AdminArgError("admin_not_a_number", arg=word)
    if name == "engine":
        seconds = float(value)
        if seconds > MAX_ENGINE_S:
            raise AdminArgError("admin_too_large", arg=word, limit=f"{MAX_ENGINE_S:.0f}")
        return seconds
    if "." in value:
        raise AdminArgError("admin_not_whole", arg=word)
    count = int(value)
    if count > MAX_COUNT:
        raise AdminArgError("admin_too_large", arg=word, limit=str(MAX_COUNT))
    return count


def days_or_none(word: str) -> int | None:
    """A number of days ("7" or "7d", 1 to 366), or None if the word is not one."""
    match = _DAYS_RE.fullmatch(word.strip())
    if match is None:
        return None
    days = int(match.group(1))
    return days if 1 <= days <= MAX_DAYS else None


def parse_days(word: str) -> int:
    days = days_or_none(word)
    if days is None:
        raise AdminArgError("admin_bad_days", arg=word, limit=MAX_DAYS)
    return days
