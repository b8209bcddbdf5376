"""Who may call, how often, and how much they may send: API keys, basic auth for the web page,
a per-key rate limit, the loopback-only rule without keys, and a body reader that stops at the
size limit instead of buffering whatever a client sends."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pydantic import SecretStr
from starlette.requests import ClientDisconnect, Request

from adapters.http.errors import ApiError
from bot.admin_types import ApiKeyInfo
from bot.models import ConversationId, size_text

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback_host(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, has_api_keys: bool) -> None:
    """Refuse to serve an unauthenticated API on anything but loopback."""
    if not has_api_keys and not is_loopback_host(host):
        raise ValueError(
            f"vlbot http: refusing to listen on {host!r} without API keys. Set VLBOT_HTTP__API_KEYS "
            '(e.g. \'["a-long-random-key"]\') or listen on 127.0.0.1 (VLBOT_HTTP__HOST=127.0.0.1).'
        )


LOCAL_PRINCIPAL = "local"  # every caller of a server without API keys (loopback only)
WEB_PRINCIPAL = "web"  # the web page's basic-auth user


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: `key_id` names the key (never the key itself) for logs and limits;
    `principal` owns the caller's conversations and images: "key-" and a hash of the API key,
    "web" (the basic-auth user) or "local" (no keys configured)."""

    key_id: str
    principal: str
    name: str = ""  # what the caller is called in usage reports: a run-time key's given name

    @property
    def display_name(self) -> str:
        return self.name or self.key_id


def owned_conversation(principal: str, conversation_id: str) -> ConversationId:
    """A caller's conversation: the id a client chose, inside its principal's namespace, so two
    callers choosing the same id never meet (another principal's id is simply not found)."""
    return ConversationId("http", f"{principal}/{conversation_id}")


def owned_prefix(principal: str) -> str:
    """The start of every conversation key of `principal` (for its images)."""
    return owned_conversation(principal, "").key()


def key_principal(key: bytes) -> str:
    """The owner name of an API key's conversations: a hash, never the key itself, that stays
    the same when keys are added, removed or reordered."""
    return "key-" + hashlib.sha256(key).hexdigest()[:32]


# A run-time API key by its secret (bot/admin.py's AdminService.key_for_secret), or None.
KeyLookup = Callable[[str], Awaitable[ApiKeyInfo | None]]
ADMIN_ACTOR = "admin"  # the admin key's caller id (audit log: http:key:admin)


class Authenticator:
    """API keys from settings and, once the core runs, the keys made at run time (looked up in
    the database on every request, so a revoked key is refused at once); the admin key, which
    opens the admin API only; basic auth for the web page."""

    def __init__(
        self,
        api_keys: Sequence[SecretStr],
        web_user: str | None = None,
        web_password: SecretStr | None = None,
        admin_key: SecretStr | None = None,
    ) -> None:
        self._keys = [k.get_secret_value().encode() for k in api_keys]
        self._web_user = web_user
        self._web_password = web_password.get_secret_value() if web_password else None
        self._admin_key = admin_key.get_secret_value().encode() if admin_key else None
        self.live_keys: KeyLookup | None = None  # set by the adapter at start

    @property
    def has_keys(self) -> bool:
        """Callers must bring a key: settings name API keys, or an admin key (who then makes
        the API keys at run time)."""
        return bool(self._keys) or self._admin_key is not None

    @property
    def has_web_auth(self) -> bool:
        return bool(self._web_user and self._web_password)

    def _basic_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if not self.has_web_auth or not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        assert self._web_user is not None and self._web_password is not None
        return hmac.compare_digest(user.encode(), self._web_user.encode()) & hmac.compare_digest(
            password.encode(), self._web_password.encode()
        )

    @staticmethod
    def _bearer(request: Request) -> str:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and header[7:].strip():
            return header[7:].strip()
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )

    async def _key_caller(self, given: str) -> Caller | None:
        """The caller an API key names: a settings key ("key#N"), else a live run-time key (its
        id, as the ledger and quotas know it); None for an unknown or revoked key."""
        raw = given.encode()
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(raw, key):
                return Caller(f"key#{index + 1}", key_principal(key))
        if self.live_keys is not None:
            info = await self.live_keys(given)
            if info is not None and info.active:
                return Caller(info.id, key_principal(raw), info.name)
        return None

    async def api_caller(self, request: Request) -> Caller:
        """The caller of an API route: a Bearer key when keys are set (or the web page's basic
        auth); otherwise the client address (the server is on loopback then)."""
        if self._basic_ok(request):
            return Caller("web", WEB_PRINCIPAL)
        if not self.has_keys:
            return Caller(f"ip:{request.client.host if request.client else '?'}", LOCAL_PRINCIPAL)
        caller = await self._key_caller(self._bearer(request))
        if caller is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return caller

    async def admin_caller(self, request: Request) -> Caller:
        """The caller of an admin route: the admin key only. Without a key 401; an API key that
        is not the admin key 403; no admin key configured 403 (the admin API is off)."""
        if self._admin_key is None:
            raise ApiError(
                403,
                "The admin API is off on this server: set VLBOT_HTTP__ADMIN_KEY to turn it on.",
                code="admin_disabled",
            )
        given = self._bearer(request)
        if hmac.compare_digest(given.encode(), self._admin_key):
            return Caller(ADMIN_ACTOR, ADMIN_ACTOR)
        if await self._key_caller(given) is not None:
            raise ApiError(
                403, "This API key may not use the admin API; use the admin key.", code="not_admin"
            )
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def page_allowed(self, request: Request) -> bool:
        """The web page and its files: open unless basic auth is configured."""
        return not self.has_web_auth or self._basic_ok(request)


class RateLimiter:
    """A token bucket per caller: `per_minute` requests a minute, bursts up to that many."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def check(self, caller: str) -> None:
        """Take one token or raise a 429 ApiError with the seconds until the next one."""
        if self.per_minute <= 0:
            return
        now = self._clock()
        rate = self.per_minute / 60.0
        tokens, at = self._buckets.get(caller, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            wait = (1.0 - tokens) / rate
            raise ApiError(
                429,
                f"Rate limit reached: {self.per_minute} requests per minute. "
                f"Try again in {math.ceil(wait)} s.",
                code="rate_limit_exceeded",
                retry_after_s=wait,
            )
        self._buckets[caller] = (tokens - 1.0, now)
        if len(self._buckets) > 10_000:  # forget idle callers
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 120}


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is over the limit of {size_text(limit)}.",
        code="request_too_large",
    )


class ClientGone(Exception):
    """The client closed the connection before its request body had arrived."""


async def read_body(request: Request, limit: int, stall_timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over `limit` bytes:
    from Content-Length before reading, else while counting the chunks as they arrive. A body
    that stalls (no bytes for `stall_timeout_s`) is answered 408; a client that leaves mid-body
    raises ClientGone."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large(limit)
        except ValueError:
            raise ApiError(400, "Invalid Content-Length header.", code="invalid_request") from None
    chunks: list[bytes] = []
    received = 0
    stream = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), stall_timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"The request body stopped arriving: nothing for {stall_timeout_s:g} s.",
                code="request_timeout",
                headers={"Connection": "close"},
            ) from None
        except ClientDisconnect:
            raise ClientGone from None
        received += len(chunk)
        if received > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
