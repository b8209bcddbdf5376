"""The admin facade (bot/admin.py) on SQLite and Postgres: which access rule wins, allow/deny
and quota changes persisted and written to the audit log, API keys stored hashed and shown
once, and everything still there after reopening the SQLite file."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.access import SettingsAccess
from bot.admin import AdminPolicy, AdminService, Limits, Subject
from bot.db import Database
from bot.settings import Settings

BOSS = Subject("telegram", "user", "1")
POLICY = AdminPolicy(
    SettingsAccess(
        admins={"telegram": frozenset({"1"}), "slack": frozenset({"UADMIN"})},
        allowed_users={"telegram": frozenset({"10"})},
        allowed_chats={"telegram": frozenset({"-500"}), "slack": frozenset({"CTEAM"})},
    ),
    Limits(requests_per_day=50),
)


@pytest.fixture
async def admin(database_target: Path | str) -> AsyncIterator[AdminService]:
    db = await Database.open(database_target)
    yield AdminService(db, POLICY)
    await db.close()


async def test_settings_allowlists_keep_working_and_admins_are_always_in(
    admin: AdminService,
) -> None:
    assert await admin.access("telegram", "10", "10")  # a listed user
    assert await admin.access("telegram", "77", "-500")  # anyone in a listed group
    assert not await admin.access("telegram", "77", "77")
    assert await admin.access("telegram", "1", "1")  # an admin, in no list
    assert await admin.access("slack", "U5", "CTEAM")
    assert not await admin.access("slack", "U5", "COTHER")
    assert await admin.access("slack", "U5", "D123")  # direct messages: no channel list applies
    assert await admin.access("http", "k-any", None)  # no list for HTTP at all: open


async def test_database_entries_add_to_the_lists_and_a_deny_beats_any_allow(
    admin: AdminService,
) -> None:
    await admin.allow(BOSS, Subject("telegram", "user", "77"))
    assert await admin.access("telegram", "77", "77")  # added at run time
    await admin.deny(BOSS, Subject("telegram", "user", "10"))
    assert not await admin.access("telegram", "10", "10")  # the settings allow loses
    assert not await admin.access("telegram", "10", "-500")  # in a listed group too
    await admin.deny(BOSS, Subject("telegram", "chat", "-500"))
    assert not await admin.access("telegram", "77", "-500")  # a denied chat: nobody in it
    assert await admin.access("telegram", "1", "-500")  # except an admin
    await admin.allow(BOSS, Subject("telegram", "user", "10"))  # the latest entry wins
    assert await admin.access("telegram", "10", "10")
    # a platform with no list becomes closed once an allow entry makes one
    assert await admin.access("http", "k-a", None)
    await admin.allow(BOSS, Subject("http", "key", "k-a"))
    assert await admin.access("http", "k-a", None) and not await admin.access("http", "k-b", None)
    await admin.deny(Subject("slack", "user", "UADMIN"), Subject("slack", "chat", "CTEAM"))
    assert not await admin.access("slack", "U5", "CTEAM")
    assert await admin.entries() == {
        Subject("telegram", "user", "77"): "allow",
        Subject("telegram", "user", "10"): "allow",
        Subject("telegram", "chat", "-500"): "deny",
        Subject("http", "key", "k-a"): "allow",
        Subject("slack", "chat", "CTEAM"): "deny",
    }


async def test_every_change_is_in_the_audit_log_with_who_made_it(admin: AdminService) -> None:
    started = time.time()
    ann = Subject("telegram", "user", "77")
    await admin.allow(BOSS, ann)
    await admin.set_quota(BOSS, ann, Limits(images_per_day=5))
    info, _ = await admin.create_key(Subject("http", "key", "admin"), "ci bot")
    await admin.revoke_key(Subject("http", "key", "admin"), info.id)
    assert not await admin.revoke_key(Subject("http", "key", "admin"), info.id)  # not twice
    await admin.deny(BOSS, ann)
    entries = await admin.audit()
    assert [(e.action, e.actor, e.subject) for e in entries] == [
        ("deny", BOSS, ann),
        ("key_revoke", Subject("http", "key", "admin"), info.subject),
        ("key_create", Subject("http", "key", "admin"), info.subject),
        ("quota", BOSS, ann),
        ("allow", BOSS, ann),
    ]
    assert entries[3].detail == "images_per_day=5" and "ci bot" in entries[2].detail
    assert all(started - 1 <= e.at <= time.time() + 1 for e in entries)
    assert [e.action for e in await admin.audit(limit=2)] == ["deny", "key_revoke"]


async def test_quota_changes_merge_and_the_most_specific_level_wins(admin: AdminService) -> None:
    ann, group = Subject("telegram", "user", "77"), Subject("telegram", "chat", "-500")
    assert await admin.effective_limits(ann, group) == Limits(requests_per_day=50)  # defaults
    await admin.set_quota(BOSS, group, Limits(images_per_day=10, max_waiting=2))
    assert await admin.set_quota(BOSS, ann, Limits(images_per_day=3)) == Limits(images_per_day=3)
    stored = await admin.set_quota(BOSS, ann, Limits(engine_seconds_per_day=600))
    assert stored == Limits(images_per_day=3, engine_seconds_per_day=600)  # merged
    assert await admin.effective_limits(ann, group) == Limits(
        images_per_day=3, requests_per_day=50, engine_seconds_per_day=600, max_waiting=2
    )
    assert await admin.effective_limits(ann, None) == Limits(
        images_per_day=3, requests_per_day=50, engine_seconds_per_day=600
    )
    await admin.set_quota(BOSS, ann, Limits(), replace=True)  # removed
    assert await admin.quota_override(ann) == Limits()
    left = await admin.remaining(ann, group)
    assert (left.images_left, left.requests_left, left.exempt) == (10, 50, False)
    assert left.resets_at > time.time() and left.resets_at % 86400 == 0  # next 00:00 UTC


async def test_api_keys_are_stored_hashed_shown_once_and_revocable(admin: AdminService) -> None:
    actor = Subject("http", "key", "admin")
    info, secret = await admin.create_key(actor, "office scanner", Limits(images_per_day=20))
    assert info.active and info.limits == Limits(images_per_day=20) and len(secret) >= 40
    assert await admin.key_for_secret(secret) == info
    assert await admin.key_for_secret(secret + "x") is None
    rows = await admin.db.fetchall("SELECT * FROM api_keys")
    assert secret not in repr(rows)  # only its hash is kept
    assert await admin.effective_limits(info.subject, None) == Limits(
        images_per_day=20, requests_per_day=50
    )
    other, other_secret = await admin.create_key(actor, "second")
    assert other.id != info.id and other_secret != secret
    assert [k.name for k in await admin.list_keys()] == ["office scanner", "second"]
    assert await admin.revoke_key(actor, info.id)
    assert await admin.key_for_secret(secret) is None
    listed = {k.id: k for k in await admin.list_keys()}
    assert listed[info.id].revoked_at is not None and listed[other.id].active


async def test_everything_survives_reopening_the_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "data" / "vlbot.sqlite3"
    db = await Database.open(path)
    first = AdminService(db, POLICY)
    await first.deny(BOSS, Subject("telegram", "user", "10"))
    await first.set_quota(BOSS, Subject("telegram", "user", "77"), Limits(max_waiting=1))
    _, secret = await first.create_key(BOSS, "kept")
    await db.close()
    db = await Database.open(path)
    try:
        again = AdminService(db, POLICY)
        assert not await again.access("telegram", "10", "10")
        assert await again.quota_override(Subject("telegram", "user", "77")) == Limits(max_waiting=1)
        found = await again.key_for_secret(secret)
        assert found is not None and found.name == "kept"
        assert [e.action for e in await again.audit()] == ["key_create", "quota", "deny"]
    finally:
        await db.close()


def test_the_policy_comes_from_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "VLBOT_TELEGRAM__ADMINS": "[7]", "VLBOT_SLACK__ADMINS": '["UA"]',
        "VLBOT_TELEGRAM__ALLOWED_CHATS": "[-5]", "VLBOT_QUOTA__IMAGES_PER_DAY": "20",
        "VLBOT_QUOTA__MAX_WAITING": "2",
    }.items():
        monkeypatch.setenv(name, value)
    policy = AdminPolicy.from_settings(Settings())
    assert policy.access.is_admin("telegram", "7") and policy.access.is_admin("slack", "UA")
    assert not policy.access.is_admin("slack", "7")
    assert policy.access.allowed_chats["telegram"] == frozenset({"-5"})
    assert policy.defaults == Limits(images_per_day=20, max_waiting=2)
