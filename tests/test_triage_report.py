"""`vlbot triage-report --since 7d [--csv]` on a seeded database (both backends)."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from pathlib import Path

import pytest

from bot.cli import main
from bot.db import Database
from bot.triage.report import CSV_COLUMNS
from bot.triage.rules import Place
from bot.triage.store import TriageRecord, TriageStore

DAY = 86400.0
SUPPORT = Place("slack", "C0SUP")
GROUP_CHAT = Place("telegram", "-1001")


def fields(message: str | None, severity: str, area: str | None, code: str | None = None
           ) -> dict[str, str | None]:
    return {"error_message": message, "severity": severity, "product_area": area,
            "error_code": code}


async def seed(target: Path | str, now: float) -> None:
    db = await Database.open(target)
    store = TriageStore(db)
    rows = [  # (days ago, place, result, link)
        (10, SUPPORT, fields("Payment failed for order #1: card declined", "major", "Billing"),
         "https://s/old"),
        (5, SUPPORT, fields("Payment failed for order #48213: card declined", "major", "Billing"),
         "https://s/p1"),
        (3, GROUP_CHAT, fields("Service unavailable", "blocker", "Login", "HTTP 503"), None),
        (2, SUPPORT, fields("Payment failed for order #99120: card declined", "major", "Billing"),
         "https://s/p2"),
        (1, SUPPORT, fields('=HYPERLINK("http://evil.example","click")', "minor", None), None),
    ]
    for i, (days, place, result, link) in enumerate(rows):
        await store.record(TriageRecord.of(f"job{i}", place, result, link=link,
                                           user_id="U1", created_at=now - days * DAY))
    await db.close()


@pytest.fixture
def seeded(database_target: Path | str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    if isinstance(database_target, Path):
        monkeypatch.setenv("VLBOT_DATA_DIR", str(database_target.parent))
    else:
        monkeypatch.setenv("VLBOT_DATABASE_URL", database_target)
    asyncio.run(seed(database_target, time.time()))


def test_the_report_sums_up_the_period(seeded: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["triage-report", "--since", "7d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Triage report, ") and lines[0].endswith("Screenshots triaged: 4")
    assert lines[1:] == [
        "By place: slack:C0SUP 3 · telegram:-1001 1",
        "By severity: blocker 1 · major 2 · minor 1",
        "By product area: Billing 2 · Login 1 · no area 1",
        "Most repeated errors:",
        "• Payment failed for order #48213: card declined — 2 times (Billing), first: https://s/p1",
    ]


def test_the_csv_has_one_row_per_triage(seeded: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["triage-report", "--since", "30d", "--csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert tuple(rows[0]) == CSV_COLUMNS == (
        "time_utc", "platform", "chat", "severity", "product_area", "error_code", "error_message",
        "group_id", "group_count", "link", "auto_triage",
    )
    table = [dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows[1:]]
    assert [r["link"] for r in table] == ["https://s/old", "https://s/p1", "", "https://s/p2", ""]
    declined = [r for r in table if "card declined" in r["error_message"]]
    assert len({r["group_id"] for r in declined}) == 1
    assert {r["group_count"] for r in declined} == {"3"}
    outage = table[2]
    assert (outage["platform"], outage["chat"], outage["severity"], outage["error_code"]) == (
        "telegram", "-1001", "blocker", "HTTP 503")
    assert outage["group_count"] == "1" and outage["auto_triage"] == "false"
    assert table[0]["time_utc"].endswith("Z") and table[0]["time_utc"][10] == "T"
    # a screenshot's text never becomes a spreadsheet formula
    assert table[4]["error_message"] == '\'=HYPERLINK("http://evil.example","click")'


def test_a_bad_period_is_refused(seeded: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["triage-report", "--since", "last week"]) == 2
    assert "is not a period: write e.g. 7d, 12h or 30m" in capsys.readouterr().err
