"""`vlbot triage-report --since 7d [--csv]`: the triages of a period, summed up or one CSV row each
(--since as `vlbot usage` reads it: 7d, 12h, 30m).

The summary is the digest's (counts by severity and product area, the most repeated errors with
links) over every place, with a count per place. The CSV has one row per triage, oldest first,
with the columns in CSV_COLUMNS; group_count is how often that row's error (its group) was seen
in the period. Texts read from screenshots never start a cell with a formula character.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence

from bot import texts
from bot.db import Row
from bot.triage.summary import render, summarise, utc

CSV_COLUMNS = (
    "time_utc", "platform", "chat", "severity", "product_area", "error_code", "error_message",
    "group_id", "group_count", "link", "auto_triage",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def report_text(rows: Sequence[Row], start: float, end: float) -> str:
    summary = summarise(rows)
    places = Counter(f"{r['platform']}:{r['chat']}" for r in rows)
    lines = [texts.text("triage_report_title", start=utc(start), end=utc(end), count=summary.total)]
    if rows:
        lines.append(texts.text(
            "triage_by_place", counts=" · ".join(f"{p} {n}" for p, n in places.most_common())
        ))
        lines += render(summary)
    return "\n".join(lines)


def cell(value: object) -> str:
    """A text from a screenshot as a CSV cell a spreadsheet shows as text, never runs as a
    formula (a leading =, +, -, @ gets a ' before it, as OWASP advises)."""
    text = "" if value is None else str(value)
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def report_csv(rows: Sequence[Row]) -> str:
    groups = Counter(str(r["group_id"]) for r in rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([
            utc(float(r["created_at"]), "%Y-%m-%dT%H:%M:%SZ"), r["platform"], r["chat"],
            r["severity"], cell(r["product_area"]), cell(r["error_code"]),
            cell(r["error_message"]), r["group_id"], groups[str(r["group_id"])],
            cell(r["link"]), "true" if r["auto_triage"] else "false",
        ])
    return out.getvalue()
