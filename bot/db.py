"""The SQLite file behind history and jobs: opening, WAL mode and versioned migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiosqlite

log = logging.getLogger("vlbot.db")

# Each entry migrates the schema from version i to i + 1. Never edit a released entry: append.
MIGRATIONS: tuple[str, ...] = (
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
    """
    CREATE TABLE seen_events (
        key        TEXT PRIMARY KEY,  -- platform event ids already accepted (redelivery dedupe)
        created_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE pending_updates (
        platform   TEXT NOT NULL,
        id         TEXT NOT NULL,     -- the platform's update id
        body       TEXT NOT NULL,     -- the raw update, JSON
        created_at REAL NOT NULL,
        PRIMARY KEY (platform, id)
    );
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


class DataDirError(Exception):
    """The data folder cannot be created or written; the message names the fix."""


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
    if version > SCHEMA_VERSION:
        raise DataDirError(
            f"the database was written by a newer vlbot (schema {version} > {SCHEMA_VERSION}); "
            "upgrade vlbot or point VLBOT_DATA_DIR elsewhere"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        script = MIGRATIONS[target - 1]
        await conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;")
        log.info("database schema migrated to version %d", target)


class Database:
    """One connection shared by the stores; `transaction()` serializes writers on this loop."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, db_path: Path) -> Database:
        return cls(await connect(db_path))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
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
                yield self.conn
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
    async def reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, with no other statement of this process interleaved."""
        async with self._lock:
            yield self.conn

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[aiosqlite.Row]:
        async with self._lock, self.conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def close(self) -> None:
        await self.conn.close()
