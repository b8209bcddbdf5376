"""Repeat-error grouping: error texts that differ only in ids, times, numbers are one error;
texts that differ in meaning are not. Through the normaliser, the matcher and the store (both
database backends)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.db import Database
from bot.triage.grouping import DEFAULT_THRESHOLD, ErrorKey, similarity
from bot.triage.rules import Place
from bot.triage.store import TriageRecord, TriageStore

# each pair: two reports of the same error, differing in what a screenshot varies in
SAME_ERROR = [
    ("Payment failed for order #48213 at 2026-12-05 14:03:22 UTC. Request ID: req_8f7Ad9kQ2x",
     "Payment failed for order #99120 at 2026-12-07 09:11:05 UTC. Request ID: req_2Kd9aa01Qz"),
    ("Session 3f2a9c1e-77b0-4c1f-9a55-0e1d2c3b4a59 expired. Please sign in again.",
     "Session 0a1b2c3d-1111-2222-3333-444455556666 expired, please sign in again"),
    ("Upload of report_2026-12-01.pdf failed: file is 12.4 MB, the limit is 10 MB",
     "Upload of invoice_77.pdf failed: file is 31 MB, the limit is 10 MB"),
    ("Cannot reach https://api.example.com/v2/orders?token=abc123&user=jane@example.com",
     "Cannot reach https://api.example.com/v2/orders?token=zzz999&user=bob@example.org"),
    ("User jane@example.com not found", "User bob@corp.io not found"),
    ("Error: timeout after 30s waiting for 0x7ffe3a21c0",
     "error: Timeout after 45s waiting for 0x7ffe3a9990"),
    ("Sync failed on Dec 3, 2026 at 4:15 PM", "Sync failed on 06/12/2026 at 11:02"),
    ("Your session has expired. Please log in again.",
     "Your session has expired. Please sign in again."),
    ("ORA-00942: table or view does not exist (trace 5f1c2e9a7b3d)",
     "ORA-00942: table or view does not exist (trace 0c9e8d7f6a5b)"),
    ("Request failed with status code 503 at 2026-12-07T08:00:01Z",
     "Request failed with status code 503 at 2026-12-06T22:13:40+01:00"),
    ("支付失败，订单 48213，请稍后再试", "支付失败，订单 99120，请稍后再试"),
    ("Payment failed: card declined", "Payment faild: card declined"),
    ("Could not load your invoices. Please try again later.",
     "Could not load your invoices, please try again later"),
]

# each pair: worded alike, but a different error
DIFFERENT_ERRORS = [
    ("Payment failed: card declined", "Payment failed: insufficient funds"),
    ("Could not connect to server", "Could not connect to database"),
    ("Request failed with status code 500", "Request failed with status code 404"),
    ("ORA-00942: table or view does not exist", "ORA-00904: invalid identifier"),
    ("Cannot reach https://api.example.com/v2/orders", "Cannot reach https://api.example.com/v2/users"),
    ("Password must be at least 8 characters", "Password must contain a number"),
    ("Your session has expired", "Your subscription has expired"),
    ("Export failed: disk full", "Import failed: disk full"),
]


def key(message: str, code: str | None = None) -> ErrorKey:
    return ErrorKey.of(message, code)


@pytest.mark.parametrize(("a", "b"), SAME_ERROR)
def test_reports_of_one_error_are_grouped(a: str, b: str) -> None:
    assert similarity(key(a), key(b)) >= DEFAULT_THRESHOLD


@pytest.mark.parametrize(("a", "b"), DIFFERENT_ERRORS)
def test_different_errors_are_not_grouped(a: str, b: str) -> None:
    assert similarity(key(a), key(b)) < DEFAULT_THRESHOLD


def test_what_the_mask_removes_and_keeps() -> None:
    masked = key("Upload by jane@example.com at 2026-12-05 14:03 failed (id 3f2a9c1e-77b0-4c1f-9a55-"
                 "0e1d2c3b4a59, see https://status.example.com/incidents?id=42), error 413")
    assert "jane" not in masked.text and "example" not in masked.text
    assert "2026" not in masked.text and "3f2a9c1e" not in masked.text and "42" not in masked.text
    assert "upload by" in masked.text and "failed" in masked.text
    assert masked.codes == {"413"}
    assert masked.endpoints == {"status.example.com/incidents"}


def test_explicit_codes_decide_and_ids_given_as_codes_do_not() -> None:
    text = "Payment failed, please try again"
    assert similarity(key(text, "E1001"), key(text, "e-1001")) == 100
    assert similarity(key(text, "E1001"), key(text, "E1002")) == 0
    # a request id in the code field is not a code: the texts still group
    assert similarity(key(text, "req_8f7Ad9kQ2x"), key(text, "req_2Kd9aa01Qz")) == 100
    assert similarity(key(text, "3f2a9c1e-77b0-4c1f-9a55-0e1d2c3b4a59"), key(text)) == 100
    # nothing to compare: never grouped
    assert similarity(key(""), key("")) == 0


@pytest.fixture
async def store(database_target: Path | str) -> AsyncIterator[TriageStore]:
    db = await Database.open(database_target)
    yield TriageStore(db, window_days=14)
    await db.close()


SUPPORT = Place("slack", "C0SUP")


def triage(job: str, message: str, *, place: Place = SUPPORT, at: float,
           link: str | None = None, code: str | None = None) -> TriageRecord:
    return TriageRecord.of(job, place, {"severity": "major", "error_message": message,
                                        "error_code": code, "product_area": "billing"},
                           link=link, created_at=at)


async def test_the_store_groups_repeats_of_a_place_and_counts_them(store: TriageStore) -> None:
    day = 86400.0
    t0 = 1_796_000_000.0
    a, b = SAME_ERROR[0]
    first = await store.record(triage("j1", a, at=t0, link="https://x.slack.com/archives/C0SUP/p1"))
    other = await store.record(triage("j2", DIFFERENT_ERRORS[0][0], at=t0 + 60))
    second = await store.record(triage("j3", b, at=t0 + day))
    assert first.count == 1 and first.new
    assert other.group_id != first.group_id
    assert second.group_id == first.group_id and second.count == 2
    assert second.first_seen == t0 and second.first_link == "https://x.slack.com/archives/C0SUP/p1"
    # the same job again (generated again after a crash): recorded once
    again = await store.record(triage("j3", b, at=t0 + day + 5))
    assert (again.group_id, again.count, again.new) == (first.group_id, 2, False)
    # another place never joins this place's group
    elsewhere = await store.record(triage("j4", a, at=t0 + day, place=Place("telegram", "-100")))
    assert elsewhere.group_id != first.group_id and elsewhere.count == 1
    # past the window, the same error starts a new group
    late = await store.record(triage("j5", a, at=t0 + 20 * day))
    assert late.group_id != first.group_id and late.count == 1


async def test_prune_follows_the_retention(store: TriageStore) -> None:
    now = 1_796_000_000.0
    await store.record(triage("old", "Disk full", at=now - 40 * 86400))
    await store.record(triage("new", "Disk full", at=now - 86400))
    assert await store.prune(now) == 1
    rows = await store.between(0, now)
    assert [r["job_id"] for r in rows] == ["new"]
