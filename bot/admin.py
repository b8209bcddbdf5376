"""The admin facade adapters use (issue #23): who may use the bot, quotas, usage, the audit log
and HTTP API keys made at run time. One object (`Core.admin`) over the stores of bot/access.py,
bot/quotas.py, bot/usage.py, bot/audit.py and bot/api_keys.py; everything it changes is in the
database, so a change takes effect at once (on every replica) and survives a restart.

Access (`access`): admins are always in; a database deny (user, key or chat) beats any allow;
otherwise a message is allowed if the settings allowlists or the database's allow entries name
its user or its chat, or if there is no list at all for the platform (bot/access.py).

The callers check `is_admin` before a change; `actor` is who made it, for the audit log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bot.access import AccessRules, PlatformRules, Rule, SettingsAccess, decide
from bot.admin_types import (
    ApiKeyInfo,
    AuditEntry,
    DailyUsage,
    DayUse,
    Limits,
    Remaining,
    Subject,
    SubjectKind,
    TopUsage,
    UsageRecord,
    UsageReport,
    UsageTotals,
    next_reset,
)
from bot.api_keys import ApiKeyStore
from bot.audit import AuditLog
from bot.db import Database
from bot.quotas import QuotaAdmission, QuotaStore
from bot.settings import Settings
from bot.triage.places import AutoTriagePlaces, settings_places
from bot.triage.rules import Place
from bot.usage import UsageLedger

__all__ = [
    "AdminPolicy",
    "AdminService",
    "ApiKeyInfo",
    "AuditEntry",
    "DailyUsage",
    "DayUse",
    "Limits",
    "Remaining",
    "Subject",
    "SubjectKind",
    "TopUsage",
    "UsageRecord",
    "UsageReport",
    "UsageTotals",
    "describe_limits",
]


@dataclass(frozen=True)
class AdminPolicy:
    """What settings say: admin ids and allowlists per platform, and the default quota."""

    access: SettingsAccess = field(default_factory=SettingsAccess)
    defaults: Limits = field(default_factory=Limits)
    auto_triage: frozenset[Place] = frozenset()  # auto-triage places named in settings

    @classmethod
    def from_settings(cls, s: Settings) -> AdminPolicy:
        return cls(
            access=SettingsAccess(
                admins={
                    "telegram": frozenset(str(i) for i in s.telegram.admins),
                    "slack": frozenset(s.slack.admins),
                },
                allowed_users={"telegram": frozenset(str(i) for i in s.telegram.allowed_users)},
                allowed_chats={
                    "telegram": frozenset(str(i) for i in s.telegram.allowed_chats),
                    "slack": frozenset(s.slack.allowed_channels),
                },
            ),
            defaults=Limits(
                images_per_day=s.quota.images_per_day,
                requests_per_day=s.quota.requests_per_day,
                engine_seconds_per_day=s.quota.engine_seconds_per_day,
                max_waiting=s.quota.max_waiting,
            ),
            auto_triage=settings_places(s),
        )


def describe_limits(limits: Limits) -> str:
    """"images_per_day=20 max_waiting=2" (the set fields), or "none"."""
    found = [f"{name}={value:g}" for name, value in vars(limits).items() if value is not None]
    return " ".join(found) or "none"


class AdminService:
    def __init__(
        self, db: Database, policy: AdminPolicy | None = None, retention_days: float = 30.0
    ) -> None:
        self.db = db
        self.policy = policy or AdminPolicy()
        self.ledger = UsageLedger(db, retention_days)  # the runner's JobObserver
        self.quotas = QuotaStore(db, self.ledger, self.policy.defaults)
        self.admission = QuotaAdmission(self.quotas, self.is_admin)  # the runner's Admission
        self.rules = AccessRules(db)
        self.audit_log = AuditLog(db)
        self.keys = ApiKeyStore(db)
        # auto-triage places: settings' and those admins turn on (/autotriage)
        self.auto_triage = AutoTriagePlaces(db, self.policy.auto_triage)

    # --- access ----------------------------------------------------------------------------

    def is_admin(self, platform: str, user_id: str) -> bool:
        return self.policy.access.is_admin(platform, user_id)

    async def access(self, platform: str, user_id: str, chat_id: str | None) -> bool:
        """Settings allowlists and database entries combined; admins always in."""
        if self.is_admin(platform, user_id):
            return True
        rules: PlatformRules = await self.rules.of_platform(platform)
        return decide(self.policy.access, rules, platform, user_id, chat_id)

    async def allow(self, actor: Subject, subject: Subject) -> None:
        await self._rule(actor, subject, "allow")

    async def deny(self, actor: Subject, subject: Subject) -> None:
        await self._rule(actor, subject, "deny")

    async def _rule(self, actor: Subject, subject: Subject, rule: Rule) -> None:
        async with self.db.transaction() as tx:
            await self.rules.put(tx, subject, rule, actor)
            await self.audit_log.write(tx, actor, rule, subject)

    async def entries(self) -> dict[Subject, Rule]:
        """Every allow/deny entry in the database (settings lists not included)."""
        return await self.rules.all()

    # --- quotas ----------------------------------------------------------------------------

    async def set_quota(
        self, actor: Subject, subject: Subject, limits: Limits, replace: bool = False
    ) -> Limits:
        """Store an override: fields left None keep their stored value (`replace`: store exactly
        `limits`, an empty Limits removing the override). Returns the override after."""
        stored = limits if replace else limits.over(await self.quotas.override(subject))
        async with self.db.transaction() as tx:
            await self.quotas.put(tx, subject, stored, actor)
            await self.audit_log.write(tx, actor, "quota", subject, describe_limits(stored))
        return stored

    async def quota_override(self, subject: Subject) -> Limits:
        """The override stored for `subject` alone (no fallback)."""
        return await self.quotas.override(subject)

    async def effective_limits(self, user: Subject, chat: Subject | None) -> Limits:
        return await self.quotas.effective(user, chat)

    async def remaining(self, user: Subject, chat: Subject | None) -> Remaining:
        now = time.time()
        return Remaining(
            limits=await self.quotas.effective(user, chat),
            used=await self.quotas.day_use(user, now),
            resets_at=next_reset(now),
            exempt=self.is_admin(user.platform, user.id),
        )

    # --- usage -----------------------------------------------------------------------------

    async def usage(self, subject: Subject | None, days: float) -> UsageReport:
        """Use over the last `days` days; subject None: everyone, with the top users and chats."""
        now = time.time()
        return await self.ledger.report(subject, now - days * 86400, now)

    async def usage_records(self, since: float, until: float | None = None) -> list[UsageRecord]:
        return await self.ledger.records(since, until)

    async def audit(self, limit: int = 50) -> list[AuditEntry]:
        """The newest audit entries first."""
        return await self.audit_log.latest(limit)

    # --- HTTP API keys made at run time ----------------------------------------------------

    async def create_key(
        self, actor: Subject, name: str, limits: Limits | None = None
    ) -> tuple[ApiKeyInfo, str]:
        """A new key and its secret (shown once: only its hash is stored)."""
        limits = limits or Limits()
        async with self.db.transaction() as tx:
            info, secret = await self.keys.insert(tx, name, actor)
            await self.quotas.put(tx, info.subject, limits, actor)
            await self.audit_log.write(
                tx, actor, "key_create", info.subject, f"{name} {describe_limits(limits)}"
            )
        return ApiKeyInfo(info.id, info.name, info.created_at, info.created_by, None, limits), secret

    async def list_keys(self) -> list[ApiKeyInfo]:
        return [await self._with_limits(info) for info in await self.keys.all()]

    async def revoke_key(self, actor: Subject, key_id: str) -> bool:
        """True if an active key was revoked."""
        async with self.db.transaction() as tx:
            revoked = await self.keys.revoke(tx, key_id)
            if revoked:
                await self.audit_log.write(tx, actor, "key_revoke", Subject("http", "key", key_id))
        return revoked

    async def key_for_secret(self, secret: str) -> ApiKeyInfo | None:
        info = await self.keys.for_secret(secret)
        return None if info is None else await self._with_limits(info)

    async def _with_limits(self, info: ApiKeyInfo) -> ApiKeyInfo:
        limits = await self.quotas.override(info.subject)
        return ApiKeyInfo(
            info.id, info.name, info.created_at, info.created_by, info.revoked_at, limits
        )
