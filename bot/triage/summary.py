"""What the digest and `vlbot triage-report` show of a period's triages: counts by severity and
product area, and the most repeated errors with a link to where each was first seen."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bot import texts
from bot.db import Row
from bot.triage.rules import SEVERITIES

TOP_ERRORS = 5
ERROR_CHARS = 100  # an error's text shown this long at most


@dataclass(frozen=True)
class RepeatedError:
    group_id: str
    count: int  # in the period
    error: str  # the first report's error text (or code) in the period
    product_area: str | None
    first_link: str | None
    first_seen: float


@dataclass(frozen=True)
class Summary:
    total: int
    by_severity: list[tuple[str, int]]  # blocker, major, minor (those seen)
    by_area: list[tuple[str | None, int]]  # most first; None: no area given
    top_errors: list[RepeatedError]  # seen at least twice, most first


def error_text(row: Row) -> str:
    message, code = row.get("error_message"), row.get("error_code")
    text = f"{message} ({code})" if message and code else str(message or code or "")
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


def summarise(rows: Sequence[Row], top: int = TOP_ERRORS) -> Summary:
    """`rows` as TriageStore.between returns them (oldest first)."""
    severities = Counter(str(r["severity"]) for r in rows)
    areas = Counter(r["product_area"] or None for r in rows)
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(str(row["group_id"]), []).append(row)
    repeated = [
        RepeatedError(
            group_id=group_id, count=len(members), error=error_text(members[0]),
            product_area=members[0]["product_area"],
            first_link=next((m["link"] for m in members if m["link"]), None),
            first_seen=float(members[0]["created_at"]),
        )
        for group_id, members in groups.items()
        if len(members) > 1 and error_text(members[0])
    ]
    repeated.sort(key=lambda e: (-e.count, e.first_seen))
    return Summary(
        total=len(rows),
        by_severity=[(s, severities[s]) for s in SEVERITIES if severities[s]]
        + sorted((s, n) for s, n in severities.items() if s not in SEVERITIES),
        by_area=sorted(areas.items(), key=lambda a: (-a[1], a[0] or "\uffff")),
        top_errors=repeated[:top],
    )


def utc(ts: float, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return time.strftime(fmt, time.gmtime(ts))


def render(summary: Summary, lang: str | None = None) -> list[str]:
    """The summary's lines (without a heading): severities, areas, top repeated errors."""
    def severity(name: str) -> str:
        return texts.text(f"pf_severity_{name}", lang) if name in SEVERITIES else name

    def area(name: str | None) -> str:
        return name or texts.text("triage_no_area", lang)

    lines = [
        texts.text("triage_by_severity", lang,
                   counts=" · ".join(f"{severity(s)} {n}" for s, n in summary.by_severity)),
        texts.text("triage_by_area", lang,
                   counts=" · ".join(f"{area(a)} {n}" for a, n in summary.by_area)),
    ]
    if summary.top_errors:
        lines.append(texts.text("triage_top_errors", lang))
        for e in summary.top_errors:
            where = texts.text("triage_first_at", lang, link=e.first_link) if e.first_link else ""
            lines.append(texts.text("triage_top_error", lang, error=e.error, count=e.count,
                                    area=area(e.product_area), first=where))
    return lines
