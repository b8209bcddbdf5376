"""Routing rules: which triage results are also posted, as a short summary, into which channel.

In settings (VLBOT_TRIAGE__RULES, a JSON list), each rule is
`{"when": {"severity": ["blocker"], "product_area": "billing", "place": "slack:C0SUPPORT"},
"post_to": "slack:C0ONCALL"}`. Every condition given must hold (a list: any of its values);
`when` left out or empty matches every result. Product areas compare case-insensitively. Every
rule that matches posts (each target once). Rules are checked when settings load: a bad one
stops the start with an error naming it (its number and text) and what is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SEVERITIES = ("blocker", "major", "minor")
CONDITIONS = ("severity", "product_area", "place")
RULE_KEYS = ("when", "post_to")
_SLACK_ID = re.compile(r"^[A-Z0-9]{2,}$")
_TELEGRAM_ID = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class Place:
    """A chat: where an image was posted, or where a rule posts: ("slack", "C0ONCALL"),
    ("telegram", "-1001234567890")."""

    platform: str
    chat: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.chat}"


@dataclass(frozen=True)
class RoutingRule:
    severity: frozenset[str] | None  # None: any
    product_area: frozenset[str] | None  # casefolded
    place: frozenset[str] | None  # "platform:chat" of the triaged image
    post_to: Place

    def __str__(self) -> str:
        """As `vlbot doctor` shows it: "severity blocker, product_area billing -> slack:C0X"."""
        when = [f"{name} {'|'.join(sorted(values))}" for name, values in (
            ("severity", self.severity), ("product_area", self.product_area), ("place", self.place)
        ) if values is not None]
        return f"{', '.join(when) or 'any result'} -> {self.post_to}"

    def matches(self, severity: str | None, product_area: str | None, place: str) -> bool:
        if self.severity is not None and severity not in self.severity:
            return False
        if self.product_area is not None and (product_area or "").strip().casefold() not in (
            self.product_area
        ):
            return False
        return self.place is None or place in self.place


class RuleError(ValueError):
    """A routing rule that cannot be used; the message names the rule and the fix."""


def parse_target(text: Any, what: str = "post_to") -> Place:
    """"slack:C0ONCALL" or "telegram:-100123…" (a Slack channel ID, a Telegram chat id)."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"{what} must look like slack:C0ONCALL or telegram:-1001234567890, "
                         f"not {json.dumps(text)}")
    platform, _, chat = text.partition(":")
    platform, chat = platform.strip().lower(), chat.strip()
    if platform == "slack":
        if not _SLACK_ID.match(chat):
            raise ValueError(f"{what} {text!r}: a Slack channel is named by its ID (C0…, "
                             "upper-case letters and digits), not its #name")
    elif platform == "telegram":
        if not _TELEGRAM_ID.match(chat):
            raise ValueError(f"{what} {text!r}: a Telegram chat is named by its numeric id "
                             "(e.g. -1001234567890)")
    else:
        raise ValueError(f"{what} {text!r}: unknown platform {platform!r} (slack or telegram)")
    return Place(platform, chat)


def _strings(name: str, value: Any) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(
        isinstance(v, str) and v.strip() for v in values
    ):
        raise ValueError(f"{name} must be a text or a non-empty list of texts, "
                         f"not {json.dumps(value)}")
    return [v.strip() for v in values]


def parse_rule(raw: Any) -> RoutingRule:
    if not isinstance(raw, Mapping):
        raise ValueError('a rule is an object: {"when": {...}, "post_to": "slack:C0…"}')
    unknown = [k for k in raw if k not in RULE_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (a rule has: {', '.join(RULE_KEYS)})")
    if "post_to" not in raw:
        raise ValueError("post_to is missing")
    when = raw.get("when") or {}
    if not isinstance(when, Mapping):
        raise ValueError(f"when must be an object, not {json.dumps(when)}")
    unknown = [k for k in when if k not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition {unknown[0]!r} (known: {', '.join(CONDITIONS)})")
    severity = place = area = None
    if "severity" in when:
        severity = frozenset(v.lower() for v in _strings("severity", when["severity"]))
        bad = sorted(severity - set(SEVERITIES))
        if bad:
            raise ValueError(f"unknown severity {bad[0]!r} (known: {', '.join(SEVERITIES)})")
    if "product_area" in when:
        area = frozenset(v.casefold() for v in _strings("product_area", when["product_area"]))
    if "place" in when:
        place = frozenset(str(parse_target(v, "place")) for v in _strings("place", when["place"]))
    return RoutingRule(severity, area, place, parse_target(raw["post_to"]))


def parse_rules(raw: Any) -> list[RoutingRule]:
    """Every rule, or RuleError naming the first bad one (1-based, with its text)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError as exc:
            raise RuleError(f"the routing rules are not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise RuleError("the routing rules must be a JSON list of rules")
    rules: list[RoutingRule] = []
    for number, item in enumerate(raw, start=1):
        if isinstance(item, RoutingRule):
            rules.append(item)
            continue
        try:
            rules.append(parse_rule(item))
        except ValueError as exc:
            shown = json.dumps(item, ensure_ascii=False, default=str)
            raise RuleError(f"routing rule {number} {shown}: {exc}") from None
    return rules


def targets_for(
    rules: list[RoutingRule], severity: str | None, product_area: str | None, place: str
) -> list[Place]:
    """The distinct targets of every matching rule, in rule order."""
    found = [r.post_to for r in rules if r.matches(severity, product_area, place)]
    return list(dict.fromkeys(found))
