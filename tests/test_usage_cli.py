"""`vlbot usage` as an operator runs it: the report, the CSV and its columns, --since, --user,
and one clear line for a bad argument (the ledger in a real SQLite file)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.db import Database
from bot.job_hooks import JobOutcome
from bot.models import ConversationId, User
from bot.usage import UsageLedger

COLUMNS = [
    "finished_at", "platform", "user_id", "user_name", "chat", "conversation", "api_key",
    "job_id", "status", "reason", "images", "visual_tokens", "prompt_tokens",
    "completion_tokens", "engine_s", "first_token_s",
]
NOW = time.time()


def vlbot(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLBOT_")}
    env["VLBOT_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", "usage", *args], capture_output=True, text=True,
        env=env, cwd=tmp_path, timeout=120,
    )


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    async def fill() -> None:
        db = await Database.open(tmp_path / "data" / "vlbot.sqlite3")
        book = UsageLedger(db)
        await book.job_finished(JobOutcome(
            conversation=ConversationId("telegram", "-100", "7"), user=User("42", "Ann"),
            origin={}, status="answered", images=2, job_id="j1", engine_s=3.25,
            first_token_s=0.5, prompt_tokens=120, completion_tokens=30, visual_tokens=96,
            finished_at=NOW - 3600,
        ))
        await book.job_finished(JobOutcome(
            conversation=ConversationId("http", "key-ab/c1"), user=User("k-team", "k-team"),
            origin={}, status="rejected", images=1, reason="quota_images",
            finished_at=NOW - 1800,
        ))
        await book.job_finished(JobOutcome(  # ten days ago: outside --since 7d
            conversation=ConversationId("slack", "C1"), user=User("U9"), origin={},
            status="answered", images=0, job_id="j0", engine_s=1.0, finished_at=NOW - 10 * 86400,
        ))
        await db.close()

    asyncio.run(fill())
    return tmp_path


def test_the_csv_has_the_documented_columns_and_one_row_per_job(ledger_file: Path) -> None:
    out = vlbot(ledger_file, "--since", "7d", "--csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0] == COLUMNS
    records = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    assert [r["user_id"] for r in records] == ["42", "k-team"]  # oldest first, U9 too old
    ann, key = records
    assert ann["finished_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 3600))
    assert (ann["platform"], ann["user_name"], ann["chat"], ann["conversation"]) == (
        "telegram", "Ann", "-100", "telegram:-100:7"
    )
    assert (ann["api_key"], ann["job_id"], ann["status"], ann["reason"]) == ("", "j1", "answered", "")
    assert (ann["images"], ann["visual_tokens"], ann["prompt_tokens"]) == ("2", "96", "120")
    assert (ann["completion_tokens"], ann["engine_s"], ann["first_token_s"]) == (
        "30", "3.250", "0.500"
    )
    assert (key["platform"], key["api_key"], key["chat"], key["job_id"]) == ("http", "k-team", "", "")
    assert (key["status"], key["reason"], key["first_token_s"]) == ("rejected", "quota_images", "")
    assert list(ledger_file.iterdir()) == [ledger_file / "data"]  # nothing else written


def test_since_and_user_select_the_rows(ledger_file: Path) -> None:
    everything = vlbot(ledger_file, "--since", "30d", "--csv")
    assert len(everything.stdout.strip().splitlines()) == 4
    one = vlbot(ledger_file, "--since", "2h", "--csv", "--user", "http:k-team")
    assert [line.split(",")[2] for line in one.stdout.strip().splitlines()[1:]] == ["k-team"]
    recent = vlbot(ledger_file, "--since", "45m", "--csv")
    assert len(recent.stdout.strip().splitlines()) == 2  # header + the refused message


def test_the_report_shows_totals_days_and_top_users(ledger_file: Path) -> None:
    out = vlbot(ledger_file)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "requests: 1 (answered 1, failed 0, cancelled 0); refused messages: 1" in text
    assert "images: 2  engine seconds: 3.2" in text
    assert "p50 0.50 s, p95 0.50 s" in text
    assert "telegram:user:42 (Ann)  1  2  3.2" in text
    assert "telegram:chat:-100  1  2  3.2" in text
    assert "U9" not in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--since", "a week"], "is not a period"),
        (["--user", "bob"], "does not name a user"),
    ],
)
def test_a_bad_argument_gets_one_clear_line(ledger_file: Path, args: list[str], expected: str) -> None:
    out = vlbot(ledger_file, *args)
    assert out.returncode == 2
    assert expected in out.stderr and "Traceback" not in out.stderr
