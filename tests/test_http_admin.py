"""The admin API (/v1/admin/*) against the real server: API keys made at run time (work at once,
revoked at once, kept across a restart on the same SQLite file), the admin key alone opens it,
usage as JSON and CSV, the audit log, and the ledger's per-platform counters in /metrics."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.admin import AdminPolicy
from bot.usage import COLUMNS
from tests.admin_helpers import until
from tests.http_helpers import close_openai_clients, openai_client, running  # noqa: F401

ADMIN = "admin-secret-key-0123456789"
USER_KEY = "settings-user-key-0123456789"


def settings_http(**more: Any) -> dict[str, Any]:
    return {"admin_key": ADMIN, "api_keys": [USER_KEY], **more}


def as_admin(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai_client(url, key)


async def ask(url: str, key: str, question: str = "hello") -> str:
    async with client(url, key) as api:  # closed here, not by the garbage collector later
        reply = await api.chat.completions.create(
            model="vlbot", messages=[{"role": "user", "content": question}]
        )
    return reply.choices[0].message.content or ""


async def create_key(http: httpx.AsyncClient, name: str, **quota: Any) -> dict[str, Any]:
    made = await http.post("/v1/admin/keys", json={"name": name, "quota": quota}, headers=as_admin())
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    return body


async def test_key_made_at_run_time_works_at_once_survives_a_restart_and_revoked_stops(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, http=settings_http(), admin_policy=AdminPolicy()) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            made = await create_key(http, "alice", requests_per_day=50)
            secret, key_id = made["secret"], made["id"]
            assert made["name"] == "alice" and made["quota"]["requests_per_day"] == 50
            assert await ask(server.url, secret, "first") == "answer to: first"
            listed = await http.get("/v1/admin/keys", headers=as_admin())
        assert secret not in listed.text  # the secret is shown once, at creation
        assert [(k["id"], k["name"], k["active"]) for k in listed.json()["data"]] == [
            (key_id, "alice", True)
        ]
        # the ledger and the quotas know the caller by the key's id
        async with httpx.AsyncClient(base_url=server.url) as http:
            await _until_ledger(http, 1, 0)
            quota = await http.get(f"/v1/admin/quotas/http/key/{key_id}", headers=as_admin())
        assert quota.json()["today"]["requests"] == 1
        assert quota.json()["left"]["requests"] == 49
        records = await server.stack.core.admin.usage_records(0)
        assert [(r.user_id, r.api_key, r.status) for r in records] == [(key_id, key_id, "answered")]
        assert records[0].user_name == "alice"  # usage reports show the name it was given

    async with running(tmp_path, http=settings_http(), admin_policy=AdminPolicy()) as server:
        assert await ask(server.url, secret, "after the restart") == "answer to: after the restart"
        async with httpx.AsyncClient(base_url=server.url) as http:
            revoked = await http.delete(f"/v1/admin/keys/{key_id}", headers=as_admin())
            assert revoked.status_code == 200 and revoked.json()["revoked"] is True
            with pytest.raises(openai.AuthenticationError) as refused:
                await ask(server.url, secret)
            assert refused.value.code == "invalid_api_key"
            again = await http.delete(f"/v1/admin/keys/{key_id}", headers=as_admin())
            assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
            listed = await http.get("/v1/admin/keys", headers=as_admin())
        assert listed.json()["data"][0]["active"] is False
        assert await ask(server.url, USER_KEY, "settings key") == "answer to: settings key"

    async with running(tmp_path, http=settings_http(), admin_policy=AdminPolicy()) as server:
        with pytest.raises(openai.AuthenticationError):
            await ask(server.url, secret)  # revoked stays revoked


ADMIN_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/admin/keys", None),
    ("POST", "/v1/admin/keys", {"name": "mallory"}),
    ("DELETE", "/v1/admin/keys/{key}", None),
    ("GET", "/v1/admin/quotas/http/key/{key}", None),
    ("PUT", "/v1/admin/quotas/http/key/{key}", {"requests_per_day": 0}),
    ("PUT", "/v1/admin/quotas/telegram/user/42", {"images_per_day": 0}),
    ("GET", "/v1/admin/usage", None),
    ("GET", "/v1/admin/usage?format=csv", None),
    ("GET", "/v1/admin/audit", None),
]


async def test_a_non_admin_key_cannot_use_the_admin_api_and_changes_nothing(tmp_path: Path) -> None:
    async with running(tmp_path, http=settings_http(), admin_policy=AdminPolicy()) as server:
        admin = server.stack.core.admin
        async with httpx.AsyncClient(base_url=server.url) as http:
            made = await create_key(http, "bob")
            before = (await admin.list_keys(), await admin.audit(100))
            for method, path, body in ADMIN_CALLS:
                url = path.format(key=made["id"])
                for headers, status, code in (
                    (as_admin(USER_KEY), 403, "not_admin"),  # a settings API key
                    (as_admin(made["secret"]), 403, "not_admin"),  # a key made at run time
                    ({}, 401, "missing_api_key"),
                    (as_admin("not-a-key"), 401, "invalid_api_key"),
                ):
                    answer = await http.request(method, url, json=body, headers=headers)
                    assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), url
                    assert answer.json()["error"]["type"] in ("permission_error", "authentication_error")
            after = (await admin.list_keys(), await admin.audit(100))
        assert after == before  # no key made or revoked, no quota set, nothing audited
        assert await ask(server.url, made["secret"], "still here") == "answer to: still here"
        with pytest.raises(openai.AuthenticationError):
            await ask(server.url, ADMIN)  # the admin key opens the admin API only


async def test_admin_api_is_off_without_an_admin_key(tmp_path: Path) -> None:
    async with running(tmp_path, http={"api_keys": [USER_KEY]}, admin_policy=AdminPolicy()) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            answer = await http.get("/v1/admin/keys", headers=as_admin(USER_KEY))
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "admin_disabled"
    assert "VLBOT_HTTP__ADMIN_KEY" in answer.json()["error"]["message"]


async def test_quota_set_by_the_admin_applies_at_once_and_is_audited(tmp_path: Path) -> None:
    async with running(tmp_path, http=settings_http(), admin_policy=AdminPolicy()) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            made = await create_key(http, "carol")
            assert await ask(server.url, made["secret"]) == "answer to: hello"
            put = await http.put(
                f"/v1/admin/quotas/http/key/{made['id']}", json={"requests_per_day": 1}, headers=as_admin()
            )
            assert put.status_code == 200, put.text
            assert put.json()["override"]["requests_per_day"] == 1
            assert put.json()["left"]["requests"] == 0
            with pytest.raises(openai.RateLimitError) as refused:
                await ask(server.url, made["secret"])
            assert refused.value.code == "quota_requests"
            # a settings key by its id ("key#1" for the first of VLBOT_HTTP__API_KEYS)
            settings_key = await http.put(
                "/v1/admin/quotas/http/key/key%231", json={"requests_per_day": 0}, headers=as_admin()
            )
            assert settings_key.json()["subject"] == "http:key:key#1"
            with pytest.raises(openai.RateLimitError):
                await ask(server.url, USER_KEY)
            chat = await http.put(
                "/v1/admin/quotas/slack/chat/C042", json={"images_per_day": 5}, headers=as_admin()
            )
            assert chat.json() == {
                "subject": "slack:chat:C042",
                "override": {"images_per_day": 5, "requests_per_day": None,
                             "engine_seconds_per_day": None, "max_waiting": None},
            }
            await http.delete(f"/v1/admin/keys/{made['id']}", headers=as_admin())
            audit = (await http.get("/v1/admin/audit", headers=as_admin())).json()["data"]
    assert [(e["actor"], e["action"], e["subject"]) for e in audit] == [
        ("http:key:admin", "key_revoke", f"http:key:{made['id']}"),
        ("http:key:admin", "quota", "slack:chat:C042"),
        ("http:key:admin", "quota", "http:key:key#1"),
        ("http:key:admin", "quota", f"http:key:{made['id']}"),
        ("http:key:admin", "key_create", f"http:key:{made['id']}"),
    ]


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("POST", "/v1/admin/keys", {}, "name"),
        ("POST", "/v1/admin/keys", {"name": "x", "quota": {"requests_per_day": -1}}, "requests_per_day"),
        ("POST", "/v1/admin/keys", {"name": "x", "quota": {"tokens": 5}}, "tokens"),
        ("POST", "/v1/admin/keys", {"name": "x", "colour": "red"}, "colour"),
        ("PUT", "/v1/admin/quotas/http/key/k1", {"images_per_day": 2.5}, "images_per_day"),
        ("PUT", "/v1/admin/quotas/http/key/k1", {"max_waiting": True}, "max_waiting"),
        ("PUT", "/v1/admin/quotas/http/user/k1", {"max_waiting": 1}, None),
        ("PUT", "/v1/admin/quotas/irc/user/k1", {"max_waiting": 1}, None),
        ("GET", "/v1/admin/usage?since=forever", None, "since"),
        ("GET", "/v1/admin/usage?who=nobody", None, "who"),
        ("GET", "/v1/admin/usage?format=xml", None, "format"),
        ("GET", "/v1/admin/audit?limit=0", None, "limit"),
    ],
)
async def test_bad_admin_requests_are_answered_400_naming_the_field(
    tmp_path: Path, method: str, path: str, body: dict[str, Any] | None, param: str | None
) -> None:
    async with running(tmp_path, http=settings_http(), admin_policy=AdminPolicy()) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            answer = await http.request(method, path, json=body, headers=as_admin())
            keys = await server.stack.core.admin.list_keys()
            audit = await server.stack.core.admin.audit()
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert keys == [] and audit == []


async def test_usage_as_json_and_as_csv_with_the_cli_columns(tmp_path: Path) -> None:
    async with running(tmp_path, http=settings_http(), admin_policy=AdminPolicy()) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            made = await create_key(http, "dave", requests_per_day=2)
            for n in range(2):
                await ask(server.url, made["secret"], f"question {n}")
            with pytest.raises(openai.RateLimitError):
                await ask(server.url, made["secret"], "one too many")
            await ask(server.url, USER_KEY, "from the settings key")
            report = await _until_ledger(http, 3, 1)
            as_csv = await http.get("/v1/admin/usage?since=7d&format=csv", headers=as_admin())
            mine = await http.get(f"/v1/admin/usage?who=http:key:{made['id']}", headers=as_admin())
    assert report["totals"]["requests"] == 3 and report["totals"]["rejected"] == 1
    # most engine seconds first: dave's two answers usually, but one long answer can outweigh them
    top = report["top_users"]
    assert {u["subject"]: u["requests"] for u in top} == {f"http:key:{made['id']}": 2, "http:key:key#1": 1}
    assert [u["engine_s"] for u in top] == sorted((u["engine_s"] for u in top), reverse=True)
    assert mine.json()["totals"]["requests"] == 2
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.headers["content-disposition"] == 'attachment; filename="vlbot-usage-7d.csv"'
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    header = as_csv.text.splitlines()[0].split(",")
    assert header == list(COLUMNS) == cli_csv_header(tmp_path)
    assert [(r["api_key"], r["status"], r["reason"]) for r in rows] == [
        (made["id"], "answered", ""),
        (made["id"], "answered", ""),
        (made["id"], "rejected", "quota_requests"),
        ("key#1", "answered", ""),
    ]


async def test_metrics_count_use_per_platform_from_the_ledger_without_user_labels(tmp_path: Path) -> None:
    async with running(tmp_path, http=settings_http(), admin_policy=AdminPolicy()) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            made = await create_key(http, "erin", requests_per_day=1)
            await ask(server.url, made["secret"])
            with pytest.raises(openai.RateLimitError):
                await ask(server.url, made["secret"])
            await _until_ledger(http, 1, 1)
            first = await _usage_samples(http)
            await ask(server.url, USER_KEY)
            await _until_ledger(http, 2, 1)
            second = await _usage_samples(http)
    assert first[("vlbot_usage_requests_total", "http", "answered")] == 1
    assert first[("vlbot_usage_rejected_total", "http", "quota_requests")] == 1
    assert first[("vlbot_usage_requests_total", "telegram", "answered")] == 0
    assert second[("vlbot_usage_requests_total", "http", "answered")] == 2  # counted once each
    assert second[("vlbot_usage_rejected_total", "http", "quota_requests")] == 1
    assert ("vlbot_usage_engine_seconds_total", "http", "") in second
    assert ("vlbot_usage_images_total", "http", "") in second


# --- helpers ----------------------------------------------------------------------------------


async def _until_ledger(http: httpx.AsyncClient, requests: int, rejected: int) -> dict[str, Any]:
    """The usage report once the ledger holds these many jobs and refusals (the runner writes
    its rows in the background, after the answer is out)."""
    report: dict[str, Any] = {}

    async def written() -> bool:
        nonlocal report
        report = (await http.get("/v1/admin/usage", headers=as_admin())).json()
        return (report["totals"]["requests"], report["totals"]["rejected"]) == (requests, rejected)

    await until(written, f"{requests} jobs and {rejected} refusals in the ledger")
    return report


async def _usage_samples(http: httpx.AsyncClient) -> dict[tuple[str, str, str], float]:
    page = await http.get("/metrics", headers=as_admin(USER_KEY))
    found: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(page.text):
        if family.name.startswith("vlbot_usage"):
            for s in family.samples:
                assert set(s.labels) <= {"platform", "status", "reason"}  # no per-user labels
                detail = s.labels.get("status") or s.labels.get("reason") or ""
                found[(s.name, s.labels["platform"], detail)] = s.value
    return found


def cli_csv_header(data_dir: Path) -> list[str]:
    """The header `vlbot usage --csv` writes for the same database."""
    env = {**os.environ, "VLBOT_DATA_DIR": str(data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "usage", "--since", "7d", "--csv"],
        cwd=data_dir, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    return done.stdout.splitlines()[0].split(",")


async def test_with_only_an_admin_key_the_api_needs_a_key_made_at_run_time(tmp_path: Path) -> None:
    async with running(tmp_path, http={"admin_key": ADMIN}, admin_policy=AdminPolicy()) as server:
        with pytest.raises(openai.AuthenticationError) as refused:
            await ask(server.url, "anything")
        assert refused.value.code == "invalid_api_key"
        async with httpx.AsyncClient(base_url=server.url) as http:
            anonymous = await http.get("/v1/models")
            made = await create_key(http, "frank")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "missing_api_key"
        assert await ask(server.url, made["secret"], "made here") == "answer to: made here"
