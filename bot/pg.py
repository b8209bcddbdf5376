"""The PostgreSQL backend of bot/db.py, for replicas sharing one database.

Driver: psycopg 3 (async) with psycopg_pool, not asyncpg: psycopg ships its own type hints
(mypy strict checks our calls), its DB-API shape (cursor, rowcount, executemany, `%s`
placeholders) matches aiosqlite's, so the stores' one SQL dialect needs only `?` → `%s`, and
psycopg_pool is its maintained pool with connection checks and reconnection. asyncpg is faster
on raw throughput, which does not matter next to a model answering a few images a minute.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bot.db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Database,
    DataDirError,
    Dialect,
    HeldLock,
    Row,
    Tx,
    check_version,
)

log = logging.getLogger("vlbot.db")

MIGRATION_LOCK = 7_291_022  # pg_advisory_xact_lock key: one replica migrates at a time

_PLACEHOLDER = re.compile(r"\?")


def to_pyformat(sql: str) -> str:
    """`?` placeholders → psycopg's `%s` (a literal `%` doubled). Our SQL has no `?` in strings."""
    return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class PostgresTx:
    def __init__(self, conn: psycopg.AsyncConnection[Row]) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = await self._run(sql, params)
        return cur.rowcount

    async def _run(self, sql: str, params: Sequence[Any]) -> psycopg.AsyncCursor[Row]:
        if not params:  # as written (a migration script may hold several statements)
            return await self.conn.execute(sql)
        return await self.conn.execute(to_pyformat(sql), tuple(params))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self.conn.cursor() as cur:
            await cur.executemany(to_pyformat(sql), [tuple(r) for r in rows])

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cur = await self._run(sql, params)
        return await cur.fetchall()


class PostgresDatabase(Database):
    """A connection pool; each transaction (or read) takes one connection for its duration."""

    dialect: Dialect = "postgres"

    def __init__(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]]) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, url: str, max_size: int = 10) -> PostgresDatabase:  # type: ignore[override]
        try:  # one plain connection first: a wrong URL fails at once, with the server's words
            probe = await psycopg.AsyncConnection.connect(url, connect_timeout=10)
            await probe.close()
        except psycopg.Error as exc:
            raise DataDirError(
                f"cannot connect to the database {redacted(url)}: {str(exc).strip()};"
                " check VLBOT_DATABASE_URL"
            ) from exc
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs={"row_factory": dict_row, "autocommit": True},
            open=False,
            name="vlbot",
        )
        try:
            await pool.open(wait=True, timeout=15.0)
        except Exception as exc:
            await pool.close()
            raise DataDirError(
                f"cannot connect to the database {redacted(url)}: {exc}; check VLBOT_DATABASE_URL"
            ) from exc
        db = cls(pool)
        try:
            await db.migrate()
        except BaseException:
            await pool.close()
            raise
        return db

    async def migrate(self) -> None:
        """Bring the schema up to date; replicas starting together wait for one another."""
        async with self.transaction() as tx:
            await tx.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            await tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = await tx.fetchall("SELECT version FROM schema_version")
            version = int(rows[0]["version"]) if rows else 0
            check_version(version, "VLBOT_DATABASE_URL")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                await tx.execute(MIGRATIONS[target - 1].script("postgres"))
                log.info("database schema migrated to version %d", target)
            if version < SCHEMA_VERSION:
                await tx.execute("DELETE FROM schema_version")
                await tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.pool.connection() as conn, conn.transaction():
            yield PostgresTx(conn)

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[Tx]:
        async with self.pool.connection() as conn:
            yield PostgresTx(conn)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self.reading() as tx:
            return await tx.fetchall(sql, params)

    async def try_lock(self, name: str) -> HeldLock | None:
        """A session advisory lock on a connection of its own, held until released (or until
        this process dies: Postgres frees it with the connection)."""
        conn = await self.pool.getconn()
        try:
            cur = await conn.execute("SELECT pg_try_advisory_lock(hashtext(%s)) AS got", (name,))
            row = await cur.fetchone()
        except BaseException:
            await self.pool.putconn(conn)
            raise
        if not row or not row["got"]:
            await self.pool.putconn(conn)
            return None
        return AdvisoryLock(self.pool, conn, name)

    async def close(self) -> None:
        await self.pool.close()


class AdvisoryLock(HeldLock):
    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]],
        conn: psycopg.AsyncConnection[Row],
        name: str,
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.name = name

    async def release(self) -> None:
        try:
            await self.conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.name,))
        finally:
            await self.pool.putconn(self.conn)
