"""HTTP API keys made at run time by an admin: stored as a SHA-256 of the secret (the secret is
a random 256-bit token, so a plain hash is enough), shown once when made, revocable.

A key's id ("k-" and 12 hex digits) is what the HTTP adapter uses as the caller's user id: the
ledger's api_key, and the subject ("http", "key", id) of the key's quota and allow/deny entries.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from bot.admin_types import ApiKeyInfo, Subject
from bot.db import Database, Row, Tx

SECRET_PREFIX = "vlb-"


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, secret)."""
    return "k-" + secrets.token_hex(6), SECRET_PREFIX + secrets.token_urlsafe(32)


class ApiKeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def insert(tx: Tx, name: str, actor: Subject) -> tuple[ApiKeyInfo, str]:
        key_id, secret = new_key()
        info = ApiKeyInfo(id=key_id, name=name, created_at=time.time(), created_by=str(actor))
        await tx.execute(
            "INSERT INTO api_keys (id, name, secret_sha256, created_at, created_by)"
            " VALUES (?, ?, ?, ?, ?)",
            [info.id, info.name, secret_hash(secret), info.created_at, info.created_by],
        )
        return info, secret

    @staticmethod
    async def revoke(tx: Tx, key_id: str) -> bool:
        """True if the key existed and was active."""
        changed = await tx.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            [time.time(), key_id],
        )
        return changed > 0

    async def all(self) -> list[ApiKeyInfo]:
        """Every key made at run time, revoked ones included, oldest first."""
        rows = await self.db.fetchall(
            "SELECT id, name, created_at, created_by, revoked_at FROM api_keys ORDER BY created_at"
        )
        return [info_from(r) for r in rows]

    async def for_secret(self, secret: str) -> ApiKeyInfo | None:
        """The active key with this secret, or None."""
        rows = await self.db.fetchall(
            "SELECT id, name, created_at, created_by, revoked_at FROM api_keys"
            " WHERE secret_sha256 = ? AND revoked_at IS NULL",
            [secret_hash(secret)],
        )
        return info_from(rows[0]) if rows else None


def info_from(row: Row) -> ApiKeyInfo:
    revoked = row["revoked_at"]
    return ApiKeyInfo(
        id=row["id"],
        name=row["name"],
        created_at=float(row["created_at"]),
        created_by=row["created_by"],
        revoked_at=None if revoked is None else float(revoked),
    )
