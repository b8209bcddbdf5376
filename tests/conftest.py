from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot.adapter import Adapter
from bot.admin import AdminPolicy, AdminService
from bot.core import BotCore
from bot.db import Database
from bot.history import HistoryStore
from bot.jobs import JobStore
from bot.pgqueue import SharedJobQueue
from bot.runner import Runner
from tests.fakes import RecordingAdapter, ScriptedEngine
from tests.postgres_server import PostgresServer, bin_dir

pytest_plugins = ["tests.engine_fixtures"]

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session", autouse=True)
def quantized_models_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Models the tests quantize are saved under the session's temporary folder, not the user's
    ~/.cache/vlbot/quantized (subprocesses inherit it; a test may set its own folder)."""
    saved = os.environ.get("VLBOT_QUANT_CACHE")
    os.environ["VLBOT_QUANT_CACHE"] = str(tmp_path_factory.mktemp("quantized"))
    yield
    if saved is None:
        os.environ.pop("VLBOT_QUANT_CACHE", None)
    else:
        os.environ["VLBOT_QUANT_CACHE"] = saved


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (skipped only where its binaries are missing:
    scripts/test installs Debian's `postgresql` where it may)."""
    bindir = bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server."""
    url = postgres_server.fresh_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(params=BACKENDS)
def database_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """What `Database.open` takes, once per backend: a SQLite file, then a Postgres URL."""
    if request.param == "sqlite":
        return tmp_path / "data" / "vlbot.sqlite3"
    url: str = request.getfixturevalue("postgres_url")
    return url


@dataclass
class Stack:
    db: Database
    history: HistoryStore
    jobs: JobStore
    runner: Runner
    adapter: RecordingAdapter
    engine: ScriptedEngine
    admin: AdminService | None = None


def with_admin(
    db: Database, policy: AdminPolicy | None, runner_kw: dict[str, Any]
) -> AdminService | None:
    """An AdminService when a policy is given (its quota admission and usage ledger wired into
    the runner's keyword arguments), else None."""
    if policy is None:
        return None
    admin = AdminService(db, policy)
    runner_kw.setdefault("admission", admin.admission)
    runner_kw.setdefault("observers", [admin.ledger])
    return admin


async def make_stack(
    db_path: Path | str,
    engine: ScriptedEngine | None = None,
    admin_policy: AdminPolicy | None = None,
    **runner_kw: object,
) -> Stack:
    """A runner on SQLite (a path: the in-memory queue) or Postgres (a URL: the shared queue).
    With `admin_policy`: quotas and the usage ledger wired in (Stack.admin, bot/admin.py)."""
    db = await Database.open(db_path)
    admin = with_admin(db, admin_policy, runner_kw)
    history = HistoryStore(db, turns_in_prompt=10)
    jobs = JobStore(db, history)
    engine = engine or ScriptedEngine()
    if db.dialect == "postgres" and "queue" not in runner_kw:
        runner_kw["queue"] = SharedJobQueue(db, jobs, lease_s=5, poll_s=0.05)
    runner = Runner(jobs, history, engine, **runner_kw)  # type: ignore[arg-type]
    adapter = RecordingAdapter()
    runner.attach({"test": adapter})
    await adapter.start(BotCore(runner, history, engine, admin))
    return Stack(db, history, jobs, runner, adapter, engine, admin)


@pytest.fixture
async def stack(database_target: Path | str) -> AsyncIterator[Stack]:
    s = await make_stack(database_target, retry_backoff_s=0.01)
    yield s
    await s.runner.stop(grace_s=1)
    await s.db.close()


@dataclass
class CoreStack:
    """A real runner + SQLite history behind a BotCore, for adapter tests."""

    db: Database
    history: HistoryStore
    jobs: JobStore
    runner: Runner
    core: BotCore
    engine: ScriptedEngine

    async def close(self) -> None:
        await self.runner.stop(grace_s=1)
        await self.db.close()


async def make_core(
    db_path: Path, adapters: Sequence[Adapter], engine: ScriptedEngine | None = None,
    admin_policy: AdminPolicy | None = None, **runner_kw: Any,
) -> CoreStack:
    """Build the core around `adapters`, start the runner and then the adapters. With
    `admin_policy`: quotas and the usage ledger wired in (core.admin, bot/admin.py)."""
    db = await Database.open(db_path)
    admin = with_admin(db, admin_policy, runner_kw)
    history = HistoryStore(db, turns_in_prompt=10)
    jobs = JobStore(db, history)
    engine = engine or ScriptedEngine()
    runner = Runner(jobs, history, engine, **runner_kw)
    runner.attach({a.platform: a for a in adapters})
    core = BotCore(runner, history, engine, admin)
    await runner.start()
    for adapter in adapters:
        await adapter.start(core)
    return CoreStack(db, history, jobs, runner, core, engine)
