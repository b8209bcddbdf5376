"""The usage ledger as people read it: the CSV export (`vlbot usage --csv`, the HTTP admin API)
and the plain-text report of `vlbot usage`; parsing "7d" and "telegram:user:42".

CSV columns, in order (one row per settled job or refused message, oldest first):
  finished_at        ISO 8601, UTC ("2026-12-07T09:30:12Z")
  platform           telegram | slack | http
  user_id            the platform user id (HTTP: the API key id)
  user_name          the display name the platform gave, if any
  chat               the chat/channel id (empty on HTTP)
  conversation       the conversation key (platform:chat[:thread])
  api_key            HTTP: the API key id (empty elsewhere)
  job_id             empty for a message refused before it became a job
  status             answered | failed | cancelled | rejected
  reason             why it failed, was cancelled or refused (a texts.py code: quota_images, …)
  images             images in the message
  visual_tokens      image tokens the engine saw (empty: not counted)
  prompt_tokens      as the engine counted them (empty: not counted)
  completion_tokens
  engine_s           seconds the engine spent generating this job
  first_token_s      seconds from the start of generation to the first piece (empty: none)
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterable

from bot.admin_types import PLATFORMS, SUBJECT_KINDS, Subject, UsageRecord, UsageReport
from bot.usage import COLUMNS

CSV_COLUMNS: tuple[str, ...] = COLUMNS
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0}


def parse_since(text: str) -> float:
    """"7d", "12h", "30m" or a plain number of days → seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhm]?)\s*", text.lower())
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a period: write e.g. 7d, 12h or 30m")
    return float(found.group(1)) * _UNITS[found.group(2) or "d"]


def parse_subject(text: str) -> Subject:
    """"telegram:user:42", "slack:chat:C0123", "http:key:k-1a2b", or "platform:id" (a user; on
    HTTP an API key)."""
    parts = text.strip().split(":", 2)
    if len(parts) == 3 and parts[1] in SUBJECT_KINDS and parts[0] in PLATFORMS and parts[2]:
        return Subject.parse(text.strip())
    if len(parts) >= 2 and parts[0] in PLATFORMS and ":".join(parts[1:]):
        ident = ":".join(parts[1:])
        return Subject(parts[0], "key" if parts[0] == "http" else "user", ident)
    raise ValueError(
        f"{text!r} does not name a user: write platform:id or platform:kind:id "
        "(platform: telegram, slack, http; kind: user, chat, key)"
    )


def iso_utc(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def csv_text(records: Iterable[UsageRecord]) -> str:
    """The records as CSV (header first; see the module's docstring for the columns)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        row: list[object] = []
        for column in CSV_COLUMNS:
            value = getattr(r, column)
            if column == "finished_at":
                value = iso_utc(value)
            elif isinstance(value, float):
                value = f"{value:.3f}"
            row.append("" if value is None else value)
        writer.writerow(row)
    return out.getvalue()


def report_text(report: UsageReport) -> str:
    """The report of `vlbot usage` (English: an operator's view)."""
    t = report.totals
    who = "everyone" if report.subject is None else str(report.subject)
    lines = [
        f"usage of {who}, {iso_utc(report.since)} to {iso_utc(report.until)} (days are UTC)",
        f"requests: {t.requests} (answered {t.answered}, failed {t.failed}, cancelled "
        f"{t.cancelled}); refused messages: {t.rejected}",
        f"images: {t.images}  engine seconds: {t.engine_s:.1f}  tokens: {t.prompt_tokens} prompt, "
        f"{t.completion_tokens} completion",
        "time to first token: "
        + (
            f"p50 {report.first_token_p50_s:.2f} s, p95 {report.first_token_p95_s:.2f} s"
            if report.first_token_p50_s is not None and report.first_token_p95_s is not None
            else "no answers yet"
        ),
    ]
    if report.days:
        lines.append("per day: day, requests, images, engine seconds")
        lines += [f"  {d.day}  {d.requests}  {d.images}  {d.engine_s:.1f}" for d in report.days]
    for title, top in (("top users", report.top_users), ("top chats", report.top_chats)):
        if top:
            lines.append(f"{title}: requests, images, engine seconds")
            lines += [
                f"  {u.subject}{f' ({u.name})' if u.name else ''}  {u.requests}  {u.images}  "
                f"{u.engine_s:.1f}"
                for u in top
            ]
    return "\n".join(lines)
