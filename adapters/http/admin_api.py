"""The admin API under /v1/admin/: API keys made, listed and revoked at run time, quotas per key,
user and chat, usage (JSON, or CSV with the columns of `vlbot usage --csv`) and the audit log.

Only the admin key (VLBOT_HTTP__ADMIN_KEY) opens it: no key is answered 401, an API key 403,
both in OpenAI's error shape. Every change goes through the core's AdminService (bot/admin.py),
which writes the audit log; the HTTP admin appears there as http:key:admin.

    GET    /v1/admin/keys                              the keys (never a secret)
    POST   /v1/admin/keys {"name", "quota"?}           a new key: its secret, shown this once
    DELETE /v1/admin/keys/{id}                         revoke (refused from the next request)
    GET    /v1/admin/quotas/{platform}/{kind}/{id}     the override, and for a user/key today's use
    PUT    /v1/admin/quotas/{platform}/{kind}/{id}     set the override (the four limits; null:
                                                       not set at this level)
    GET    /v1/admin/usage?since=7d[&who=platform:kind:id][&format=csv]   (since: 7d, 12h, 30m)
    GET    /v1/admin/audit?limit=50
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.http.errors import ApiError, bad_request
from adapters.http.guard import ADMIN_ACTOR, Authenticator, read_body
from bot.adapter import Core
from bot.admin_args import DEFAULT_REPORT_DAYS, MAX_COUNT, MAX_ENGINE_S
from bot.admin_types import (
    PLATFORMS,
    SUBJECT_KINDS,
    ApiKeyInfo,
    Limits,
    Remaining,
    Subject,
    UsageReport,
)
from bot.usage_view import csv_text, parse_since, parse_subject

Handler = Callable[[Request], Awaitable[Response]]
ACTOR = Subject("http", "key", ADMIN_ACTOR)
MAX_NAME = 64
MAX_BODY = 16 * 1024
MAX_AUDIT = 1000


def route_label(path: str) -> str:
    """The metrics label of an admin path (ids left out)."""
    for prefix in ("/v1/admin/keys/", "/v1/admin/quotas/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    return path if path in ("/v1/admin/keys", "/v1/admin/usage", "/v1/admin/audit") else "other"


class AdminApi:
    def __init__(self, auth: Authenticator, core: Callable[[], Core], body_timeout_s: float) -> None:
        self._auth = auth
        self._core = core
        self._body_timeout_s = body_timeout_s

    def routes(self, endpoint: Callable[[Handler], Handler]) -> list[Route]:
        return [
            Route("/v1/admin/keys", endpoint(self.keys), methods=["GET", "POST"]),
            Route("/v1/admin/keys/{key_id}", endpoint(self.revoke), methods=["DELETE"]),
            Route(
                "/v1/admin/quotas/{platform}/{kind}/{subject_id}",
                endpoint(self.quota),
                methods=["GET", "PUT"],
            ),
            Route("/v1/admin/usage", endpoint(self.usage), methods=["GET"]),
            Route("/v1/admin/audit", endpoint(self.audit), methods=["GET"]),
        ]

    async def _admin(self, request: Request) -> None:
        caller = await self._auth.admin_caller(request)
        request.scope["vlbot.caller"] = caller.key_id

    # --- keys --------------------------------------------------------------------------------

    async def keys(self, request: Request) -> Response:
        await self._admin(request)
        admin = self._core().admin
        if request.method == "GET":
            return JSONResponse({"object": "list", "data": [key_json(k) for k in await admin.list_keys()]})
        body = await json_body(request, self._body_timeout_s)
        name = body.pop("name", None)
        if not isinstance(name, str) or not 1 <= len(name.strip()) <= MAX_NAME:
            raise bad_request(f"'name' is required: 1 to {MAX_NAME} characters.", param="name")
        limits = parse_limits(body.pop("quota", None) or {}, "quota")
        no_extra(body)
        info, secret = await admin.create_key(ACTOR, name.strip(), limits)
        return JSONResponse({**key_json(info), "secret": secret}, status_code=201)

    async def revoke(self, request: Request) -> Response:
        await self._admin(request)
        key_id = request.path_params["key_id"]
        if not await self._core().admin.revoke_key(ACTOR, key_id):
            raise ApiError(404, f"No active API key {key_id!r}.", code="not_found")
        return JSONResponse({"id": key_id, "object": "api_key", "revoked": True})

    # --- quotas ------------------------------------------------------------------------------

    async def quota(self, request: Request) -> Response:
        await self._admin(request)
        subject = path_subject(request)
        admin = self._core().admin
        if request.method == "PUT":
            body = await json_body(request, self._body_timeout_s)
            limits = parse_limits(body, "body")
            await admin.set_quota(ACTOR, subject, limits, replace=True)
        answer: dict[str, Any] = {
            "subject": str(subject),
            "override": limits_json(await admin.quota_override(subject)),
        }
        if subject.kind != "chat":
            answer.update(remaining_json(await admin.remaining(subject, None)))
        return JSONResponse(answer)

    # --- usage and audit ---------------------------------------------------------------------

    async def usage(self, request: Request) -> Response:
        await self._admin(request)
        query = request.query_params
        since = query.get("since", f"{DEFAULT_REPORT_DAYS}d")
        try:
            period_s = parse_since(since)
        except ValueError as exc:
            raise bad_request(f"'since': {exc}.", param="since") from None
        try:
            who = parse_subject(query["who"]) if query.get("who") else None
        except ValueError as exc:
            raise bad_request(f"'who': {exc}.", param="who") from None
        admin = self._core().admin
        kind = query.get("format", "json")
        days = period_s / 86400
        if kind == "csv":  # the columns of `vlbot usage --csv`
            records = await admin.ledger.records(time.time() - period_s, subject=who)
            return Response(
                csv_text(records),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": f'attachment; filename="vlbot-usage-{days:g}d.csv"'},
            )
        if kind != "json":
            raise bad_request("'format' must be json or csv.", param="format")
        return JSONResponse(report_json(await admin.usage(who, days)))

    async def audit(self, request: Request) -> Response:
        await self._admin(request)
        raw = request.query_params.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_AUDIT:
            raise bad_request(f"'limit' must be a number from 1 to {MAX_AUDIT}.", param="limit")
        entries = await self._core().admin.audit(int(raw))
        data = [
            {"at": e.at, "actor": str(e.actor), "action": e.action, "subject": str(e.subject),
             "detail": e.detail}
            for e in entries
        ]
        return JSONResponse({"object": "list", "data": data})


# --- requests ---------------------------------------------------------------------------------


async def json_body(request: Request, timeout_s: float) -> dict[str, Any]:
    raw = await read_body(request, MAX_BODY, timeout_s)
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return data


def no_extra(body: dict[str, Any]) -> None:
    if body:
        name = sorted(body)[0]
        raise bad_request(f"Unknown field {name!r}.", param=name)


def parse_limits(data: Any, where: str) -> Limits:
    """{"images_per_day", "requests_per_day", "engine_seconds_per_day", "max_waiting"}: whole
    numbers (engine seconds may have a fraction), 0 or more; null or left out: not set."""
    if not isinstance(data, dict):
        raise bad_request(f"'{where}' must be an object of limits.", param=where)
    fields = {f.name for f in dataclasses.fields(Limits)}
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            raise bad_request(
                f"Unknown limit {name!r}; the limits are {', '.join(sorted(fields))}.", param=name
            )
        if value is None:
            continue
        seconds = name == "engine_seconds_per_day"
        ok = isinstance(value, (int, float)) if seconds else isinstance(value, int)
        top = MAX_ENGINE_S if seconds else MAX_COUNT
        if isinstance(value, bool) or not ok or not 0 <= value <= top or not math.isfinite(value):
            kind = "a number of seconds" if seconds else "a whole number"
            raise bad_request(f"'{name}' must be {kind} from 0 to {top:g}, or null.", param=name)
        values[name] = float(value) if seconds else value
    return Limits(**values)


def path_subject(request: Request) -> Subject:
    platform = request.path_params["platform"]
    kind = request.path_params["kind"]
    ident = request.path_params["subject_id"]
    if platform not in PLATFORMS:
        raise bad_request(f"Unknown platform {platform!r}; use one of {', '.join(PLATFORMS)}.")
    if kind not in SUBJECT_KINDS:
        raise bad_request(f"Unknown kind {kind!r}; use one of {', '.join(SUBJECT_KINDS)}.")
    if (platform == "http") != (kind == "key"):
        raise bad_request("HTTP callers are API keys: use http/key/{id} (and user or chat elsewhere).")
    if not 1 <= len(ident) <= 128:
        raise bad_request("The id must be 1 to 128 characters.")
    return Subject(platform, kind, ident)


# --- answers ----------------------------------------------------------------------------------


def limits_json(limits: Limits) -> dict[str, Any]:
    return dataclasses.asdict(limits)


def key_json(info: ApiKeyInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "api_key",
        "name": info.name,
        "created_at": info.created_at,
        "created_by": info.created_by,
        "revoked_at": info.revoked_at,
        "active": info.active,
        "quota": limits_json(info.limits),
    }


def remaining_json(remaining: Remaining) -> dict[str, Any]:
    return {
        "effective": limits_json(remaining.limits),
        "today": dataclasses.asdict(remaining.used),
        "left": {
            "requests": remaining.requests_left,
            "images": remaining.images_left,
            "engine_seconds": remaining.engine_seconds_left,
        },
        "resets_at": remaining.resets_at,
        "exempt": remaining.exempt,
    }


def report_json(report: UsageReport) -> dict[str, Any]:
    def top(rows: Any) -> list[dict[str, Any]]:
        return [
            {"subject": str(t.subject), "name": t.name, "requests": t.requests, "images": t.images,
             "engine_s": round(t.engine_s, 3)}
            for t in rows
        ]

    return {
        "object": "usage",
        "subject": str(report.subject) if report.subject else None,
        "days": (report.until - report.since) / 86400,
        "since": report.since,
        "until": report.until,
        "totals": dataclasses.asdict(report.totals),
        "per_day": [dataclasses.asdict(d) for d in report.days],
        "top_users": top(report.top_users),
        "top_chats": top(report.top_chats),
        "first_token_p50_s": report.first_token_p50_s,
        "first_token_p95_s": report.first_token_p95_s,
    }
