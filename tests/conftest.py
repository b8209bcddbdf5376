from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.db import Database
from bot.history import HistoryStore
from bot.jobs import JobStore
from bot.runner import Runner
from tests.fakes import RecordingAdapter, ScriptedEngine


@dataclass
class Stack:
    db: Database
    history: HistoryStore
    jobs: JobStore
    runner: Runner
    adapter: RecordingAdapter
    engine: ScriptedEngine


async def make_stack(db_path: Path, engine: ScriptedEngine | None = None, **runner_kw: object) -> Stack:
    db = await Database.open(db_path)
    history = HistoryStore(db, turns_in_prompt=10)
    jobs = JobStore(db, history)
    engine = engine or ScriptedEngine()
    runner = Runner(jobs, history, engine, **runner_kw)  # type: ignore[arg-type]
    adapter = RecordingAdapter()
    runner.attach({"test": adapter})
    await adapter.start(runner)
    return Stack(db, history, jobs, runner, adapter, engine)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await make_stack(tmp_path / "vlbot.sqlite3", retry_backoff_s=0.01)
    yield s
    await s.runner.stop(grace_s=1)
    await s.db.close()
