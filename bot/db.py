"""The database behind history, jobs, seen events and pending updates: one narrow interface,
two backends. SQLite (a file in the data folder, WAL) is the embedded default; PostgreSQL
(`VLBOT_DATABASE_URL=postgresql://…`, bot/pg.py) lets several `vlbot serve` replicas share state.

Stores write one SQL dialect: `?` placeholders, `ON CONFLICT DO NOTHING`, `RETURNING`, quoted
"user" (a reserved word in Postgres), types both accept (TEXT, BIGINT, DOUBLE PRECISION). Rows
come back as dicts. A migration is one script for both backends unless its DDL differs
(`Migration(sql, postgres=…)`); a new store appends its tables to MIGRATIONS and runs on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import aiosqlite

log = logging.getLogger("vlbot.db")

Row = dict[str, Any]
Dialect = Literal["sqlite", "postgres"]


@dataclass(frozen=True)
class Migration:
    """Moves the schema one version up; `postgres` only where its DDL differs from `sql`."""

    sql: str
    postgres: str | None = None

    def script(self, dialect: Dialect) -> str:
        return self.postgres if dialect == "postgres" and self.postgres is not None else self.sql


# Each entry migrates the schema from version i to i + 1. Never edit a released entry: append.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        """
    CREATE TABLE images (
        sha256     TEXT PRIMARY KEY,
        mime       TEXT NOT NULL,
        data       BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE turns (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation TEXT NOT NULL,
        role         TEXT NOT NULL,
        parts        TEXT NOT NULL,   -- JSON: [{"text": ...} | {"image": sha256, "mime", "name"}]
        created_at   REAL NOT NULL,
        job_id       TEXT
    );
    CREATE INDEX turns_by_conversation ON turns (conversation, id);
    CREATE TABLE turn_images (
        turn_id INTEGER NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
        sha256  TEXT NOT NULL,
        PRIMARY KEY (turn_id, sha256)
    );
    CREATE INDEX turn_images_by_sha ON turn_images (sha256);
    CREATE TABLE jobs (
        id           TEXT PRIMARY KEY,
        seq          INTEGER NOT NULL,
        conversation TEXT NOT NULL,
        user         TEXT NOT NULL,   -- JSON
        message      TEXT NOT NULL,   -- JSON parts, images by sha256
        status       TEXT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        origin       TEXT NOT NULL,   -- JSON reply context from the adapter
        answer       TEXT,
        error        TEXT,
        created_at   REAL NOT NULL,
        updated_at   REAL NOT NULL
    );
    CREATE INDEX jobs_by_status ON jobs (status, seq);
    CREATE TABLE job_images (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (job_id, sha256)
    );
    CREATE INDEX job_images_by_sha ON job_images (sha256);
    """,
        postgres="""
    CREATE TABLE images (
        sha256     TEXT PRIMARY KEY,
        mime       TEXT NOT NULL,
        data       BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE turns (
        id           BIGSERIAL PRIMARY KEY,
        conversation TEXT NOT NULL,
        role         TEXT NOT NULL,
        parts        TEXT NOT NULL,
        created_at   DOUBLE PRECISION NOT NULL,
        job_id       TEXT
    );
    CREATE INDEX turns_by_conversation ON turns (conversation, id);
    CREATE TABLE turn_images (
        turn_id BIGINT NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
        sha256  TEXT NOT NULL,
        PRIMARY KEY (turn_id, sha256)
    );
    CREATE INDEX turn_images_by_sha ON turn_images (sha256);
    CREATE SEQUENCE jobs_seq;
    CREATE TABLE jobs (
        id           TEXT PRIMARY KEY,
        seq          BIGINT NOT NULL DEFAULT nextval('jobs_seq'),
        conversation TEXT NOT NULL,
        "user"       TEXT NOT NULL,
        message      TEXT NOT NULL,
        status       TEXT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        origin       TEXT NOT NULL,
        answer       TEXT,
        error        TEXT,
        created_at   DOUBLE PRECISION NOT NULL,
        updated_at   DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX jobs_by_status ON jobs (status, seq);
    CREATE TABLE job_images (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (job_id, sha256)
    );
    CREATE INDEX job_images_by_sha ON job_images (sha256);
    """,
    ),
    Migration(
        """
    CREATE TABLE seen_events (
        key        TEXT PRIMARY KEY,  -- platform event ids already accepted (redelivery dedupe)
        created_at DOUBLE PRECISION NOT NULL
    );
    """
    ),
    Migration(
        """
    CREATE TABLE pending_updates (
        platform   TEXT NOT NULL,
        id         TEXT NOT NULL,     -- the platform's update id
        body       TEXT NOT NULL,     -- the raw update, JSON
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (platform, id)
    );
    """
    ),
    Migration(
        """
    -- replicas sharing one database (Postgres): the job queue's leases and heartbeats
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;        -- the replica running the job
    ALTER TABLE jobs ADD COLUMN lease_until DOUBLE PRECISION;
    ALTER TABLE jobs ADD COLUMN pinned_to TEXT;          -- only this replica may claim it (HTTP)
    ALTER TABLE pending_updates ADD COLUMN owner TEXT;   -- the replica that received it
    CREATE TABLE replicas (
        id         TEXT PRIMARY KEY,
        alive_until DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE queue_turns (                           -- when each conversation last got a turn
        conversation TEXT PRIMARY KEY,
        served_at    DOUBLE PRECISION NOT NULL
    );
    """
    ),
    Migration(
        """
    CREATE TABLE outbox (                                -- outbound webhooks (bot/outbox.py)
        event_id        TEXT NOT NULL,                   -- the webhook-id header
        endpoint        TEXT NOT NULL,                   -- the endpoint's URL
        event_type      TEXT NOT NULL,
        payload         TEXT NOT NULL,                   -- JSON
        state           TEXT NOT NULL,                   -- pending / delivered / dead
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        lease_until     DOUBLE PRECISION,                -- a delivery in flight holds the row
        last_error      TEXT,
        created_at      DOUBLE PRECISION NOT NULL,
        updated_at      DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (event_id, endpoint)
    );
    CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
    """
    ),
    Migration(
        """
    CREATE TABLE usage_ledger (                          -- one row per settled or refused job
        finished_at       DOUBLE PRECISION NOT NULL,
        platform          TEXT NOT NULL,
        user_id           TEXT NOT NULL,                 -- HTTP: the API key id
        user_name         TEXT NOT NULL DEFAULT '',
        chat              TEXT,                          -- chat/channel id (NULL on HTTP)
        conversation      TEXT NOT NULL,
        api_key           TEXT,                          -- HTTP: the API key id
        job_id            TEXT,                          -- NULL: refused before it was a job
        status            TEXT NOT NULL,                 -- answered/failed/cancelled/rejected
        reason            TEXT,
        images            INTEGER NOT NULL,
        visual_tokens     INTEGER,
        prompt_tokens     INTEGER,
        completion_tokens INTEGER,
        engine_s          DOUBLE PRECISION NOT NULL,
        first_token_s     DOUBLE PRECISION
    );
    CREATE INDEX usage_by_time ON usage_ledger (finished_at);
    CREATE INDEX usage_by_user ON usage_ledger (platform, user_id, finished_at);
    CREATE UNIQUE INDEX usage_by_job ON usage_ledger (job_id);  -- a job is settled once
    CREATE TABLE access_rules (                          -- allow/deny entries made by admins
        platform   TEXT NOT NULL,
        kind       TEXT NOT NULL,                        -- user / chat / key
        subject_id TEXT NOT NULL,
        rule       TEXT NOT NULL,                        -- allow / deny
        updated_at DOUBLE PRECISION NOT NULL,
        updated_by TEXT NOT NULL,
        PRIMARY KEY (platform, kind, subject_id)
    );
    CREATE TABLE quota_overrides (                       -- NULL: not set at this level
        platform               TEXT NOT NULL,
        kind                   TEXT NOT NULL,
        subject_id             TEXT NOT NULL,
        images_per_day         INTEGER,
        requests_per_day       INTEGER,
        engine_seconds_per_day DOUBLE PRECISION,
        max_waiting            INTEGER,
        updated_at             DOUBLE PRECISION NOT NULL,
        updated_by             TEXT NOT NULL,
        PRIMARY KEY (platform, kind, subject_id)
    );
    CREATE TABLE audit_log (
        at      DOUBLE PRECISION NOT NULL,
        actor   TEXT NOT NULL,                           -- platform:kind:id
        action  TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail  TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_by_time ON audit_log (at);
    CREATE TABLE api_keys (                              -- HTTP keys made at run time
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created_at    DOUBLE PRECISION NOT NULL,
        created_by    TEXT NOT NULL,
        revoked_at    DOUBLE PRECISION
    );
    """
    ),
    Migration(
        """
    CREATE TABLE triages (                               -- triage results (bot/triage/store.py)
        job_id        TEXT PRIMARY KEY,
        platform      TEXT NOT NULL,                     -- where the image was posted
        chat          TEXT NOT NULL,
        link          TEXT,                              -- to the original message
        user_id       TEXT NOT NULL,
        user_name     TEXT NOT NULL DEFAULT '',
        severity      TEXT NOT NULL,
        product_area  TEXT,
        error_message TEXT,                              -- as the result has it (redacted)
        error_code    TEXT,
        normalized    TEXT NOT NULL,                     -- masked error text ('' : none)
        group_id      TEXT NOT NULL,                     -- repeats of one error share it
        auto_triage   INTEGER NOT NULL DEFAULT 0,
        created_at    DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX triages_by_place ON triages (platform, chat, created_at);
    CREATE INDEX triages_by_group ON triages (group_id);
    CREATE INDEX triages_by_time ON triages (created_at);
    CREATE TABLE triage_digests (                        -- one daily digest per place and day
        platform TEXT NOT NULL,
        chat     TEXT NOT NULL,
        day      TEXT NOT NULL,                          -- YYYY-MM-DD (UTC)
        sent_at  DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (platform, chat, day)
    );
    """
    ),
    Migration(
        """
    CREATE TABLE triage_places (                         -- auto-triage places set by an admin
        platform TEXT NOT NULL,
        chat     TEXT NOT NULL,
        set_by   TEXT NOT NULL,                          -- platform:kind:id
        set_at   DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (platform, chat)
    );
    """
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


class DataDirError(Exception):
    """The data folder (or database) cannot be used; the message names the fix."""


def prepare_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataDirError(
            f"cannot write to the data folder {path} ({exc.strerror or exc}); "
            "set VLBOT_DATA_DIR to a folder this user can write"
        ) from exc
    if os.name == "posix":
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass


def check_version(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise DataDirError(
            f"the database was written by a newer vlbot (schema {version} > {SCHEMA_VERSION}); "
            f"upgrade vlbot or point {where} elsewhere"
        )


class Tx(Protocol):
    """A transaction's statements (or the one connection of `Database.reading`)."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...


class Database(ABC):
    """What the stores use: transactions, reads, the dialect for the few statements that differ."""

    dialect: Dialect

    @staticmethod
    async def open(target: Path | str) -> Database:
        """SQLite for a path, Postgres for a `postgresql://` (or `postgres://`) URL."""
        if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):  # noqa: ASYNC240
            from bot.pg import PostgresDatabase

            return await PostgresDatabase.open(target)
        return await SqliteDatabase.open(Path(target))

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """All or nothing (rolled back on any exception, cancellation included)."""

    @abstractmethod
    def reading(self) -> AbstractAsyncContextManager[Tx]:
        """A connection for a few reads in a row (no transaction guarantees)."""

    @abstractmethod
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def try_lock(self, name: str) -> HeldLock | None:
        """Hold `name` across every process on this database until released; None if another
        process holds it. SQLite serves one process per data folder: always granted."""
        return HeldLock()


class HeldLock:
    """A lock from `Database.try_lock`; `release` lets the next process take it."""

    async def release(self) -> None:
        return None


class SqliteTx:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = await self.conn.execute(sql, tuple(params))
        return cur.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self.conn.executemany(sql, [tuple(r) for r in rows])

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self.conn.execute(sql, tuple(params)) as cur:
            return [dict(row) for row in await cur.fetchall()]


async def connect(db_path: Path) -> aiosqlite.Connection:
    """Open (creating if needed) the database, enable WAL and bring the schema up to date."""
    prepare_data_dir(db_path.parent)
    try:
        conn = await aiosqlite.connect(db_path, isolation_level=None)
    except sqlite3.Error as exc:
        raise DataDirError(f"cannot open {db_path}: {exc}; check VLBOT_DATA_DIR") from exc
    conn.row_factory = aiosqlite.Row
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute("PRAGMA synchronous=NORMAL")
    await conn.execute("PRAGMA foreign_keys=ON")
    await conn.execute("PRAGMA busy_timeout=5000")
    await migrate(conn)
    return conn


async def migrate(conn: aiosqlite.Connection) -> None:
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    check_version(version, "VLBOT_DATA_DIR")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        script = MIGRATIONS[target - 1].script("sqlite")
        await conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;")
        log.info("database schema migrated to version %d", target)


class SqliteDatabase(Database):
    """One connection shared by the stores; `transaction()` serializes writers on this loop."""

    dialect: Dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self._tx = SqliteTx(conn)
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, db_path: Path | str) -> SqliteDatabase:  # type: ignore[override]
        return cls(await connect(Path(db_path)))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any exception — cancellation included.

        aiosqlite runs a statement on its thread even when the awaiting task is cancelled, so
        BEGIN, ROLLBACK and COMMIT are awaited to the end (`_settle`) and a cancelled task never
        leaves the shared connection inside a transaction."""
        async with self._lock:
            try:
                await self._settle("BEGIN IMMEDIATE")
            except asyncio.CancelledError:  # BEGIN itself ran: end what it started
                await self._settle("ROLLBACK", quiet=True)
                raise
            try:
                yield self._tx
            except BaseException:
                await self._settle("ROLLBACK", quiet=True)  # queued after any pending write
                raise
            await self._settle("COMMIT")

    async def _settle(self, sql: str, quiet: bool = False) -> None:
        """Run `sql` and wait until it has run even if this task is cancelled meanwhile; a
        cancellation is re-raised afterwards. `quiet`: ignore the statement's own sqlite error."""
        statement = asyncio.ensure_future(self.conn.execute(sql))
        cancelled = False
        while not statement.done():
            try:
                await asyncio.shield(statement)
            except asyncio.CancelledError:
                cancelled = True
            except sqlite3.Error:
                break
        if cancelled:
            raise asyncio.CancelledError
        error = statement.exception()
        if error is not None and not (quiet and isinstance(error, sqlite3.Error)):
            raise error

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[Tx]:
        """The connection, with no other statement of this process interleaved."""
        async with self._lock:
            yield self._tx

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self._lock:
            return await self._tx.fetchall(sql, params)

    async def close(self) -> None:
        await self.conn.close()
