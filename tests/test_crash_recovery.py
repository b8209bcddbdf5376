"""SIGKILL the real `vlbot serve` with jobs accepted (some queued, one running): after a restart
every job is answered exactly once, counted in the fake Telegram, and history is intact."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from tests.fake_telegram import TOKEN, FakeTelegram
from tests.telegram_harness import BLUE, GREEN, RED, Harness, fake_server, jpeg

__all__ = ["fake_server"]

pytestmark = pytest.mark.slow

CHATS = (301, 302, 303, 304)


async def start_serve(fake: FakeTelegram, model: Path, data: Path) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLBOT_MODEL": str(model),
        "VLBOT_DATA_DIR": str(data),
        "VLBOT_MAX_CONCURRENCY": "1",
        "VLBOT_MAX_NEW_TOKENS": "150",
        "VLBOT_TELEGRAM__TOKEN": TOKEN,
        "VLBOT_TELEGRAM__BASE_URL": fake.base_url,
        "VLBOT_TELEGRAM__BASE_FILE_URL": fake.base_file_url,
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "serve", env=env, cwd=data.parent,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )


def job_statuses(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())


async def test_sigkill_with_jobs_accepted_then_restart_answers_each_once(
    fake: FakeTelegram, tiny_qwen3: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    helper = Harness(fake, None, None)  # type: ignore[arg-type]  # only its update builders
    first = await start_serve(fake, tiny_qwen3, data)
    try:
        for chat, image in zip(CHATS, (RED, GREEN, BLUE, jpeg((90, 90, 90))), strict=True):
            await fake.push(helper.photo(image, "What colour is this?", chat=chat, user=chat))
        # all four accepted (a placeholder each) and the first one generating (typing action)
        await fake.wait_for(lambda: all(fake.bot_messages(c) for c in CHATS), timeout=90)
        await fake.wait_for(lambda: any(c.method == "sendChatAction" for c in fake.calls), 90)
        await asyncio.sleep(0.3)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    before = job_statuses(data / "vlbot.sqlite3")
    assert sum(before.values()) == 4 and before.get("done", 0) < 4, before

    await fake.redeliver_all()  # offsets were not confirmed: Telegram hands the updates out again
    second = await start_serve(fake, tiny_qwen3, data)
    try:
        await fake.wait_for(lambda: job_statuses(data / "vlbot.sqlite3") == {"done": 4}, 180)
        await asyncio.sleep(1.0)  # anything duplicated would show up now
    finally:
        second.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 0, stderr.decode()[-2000:]
    for chat in CHATS:
        shown = fake.bot_messages(chat)
        assert len(shown) == 1, (chat, [m.text for m in shown])  # one reply per photo
        assert shown[0].text and not shown[0].text.startswith(("thinking", "queued"))
    with sqlite3.connect(data / "vlbot.sqlite3") as conn:
        turns = conn.execute(
            "SELECT conversation, role FROM turns ORDER BY id").fetchall()
        images = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    assert sorted(turns) == sorted(
        [(f"telegram:{c}", "user") for c in CHATS] + [(f"telegram:{c}", "assistant") for c in CHATS]
    )
    assert images == 4


async def push_album(fake: FakeTelegram, helper: Harness, chat: int, images: list[bytes]) -> int:
    """An album of `images` in `chat`; returns its last update id."""
    last = 0
    for i, image in enumerate(images):
        update = helper.photo(image, "What colours are these?" if i == 0 else None,
                              chat=chat, user=chat)
        update["message"]["media_group_id"] = f"album-{chat}"
        last = await fake.push(update)
    return last


async def test_an_album_inside_its_window_survives_sigkill_and_sigterm(
    fake: FakeTelegram, tiny_qwen3: Path, tmp_path: Path
) -> None:
    """Telegram is told the album's updates arrived (the offset moves past them) and the process
    dies inside the album's collection window, before any job exists: by SIGKILL, then by a
    normal SIGTERM restart. Each album is answered once after the next start."""
    data = tmp_path / "data"
    db = data / "vlbot.sqlite3"
    helper = Harness(fake, None, None)  # type: ignore[arg-type]  # only its update builders
    albums = {401: [RED, GREEN, BLUE], 402: [jpeg((90, 90, 90)), jpeg((250, 250, 20))]}
    run = await start_serve(fake, tiny_qwen3, data)
    try:
        last = await push_album(fake, helper, 401, albums[401])
        await fake.wait_for(lambda: fake.confirmed_offset > last, timeout=90)  # acknowledged
    finally:
        run.send_signal(signal.SIGKILL)
        await run.wait()
    assert job_statuses(db) == {}  # killed inside the window: no job was written

    run = await start_serve(fake, tiny_qwen3, data)  # Telegram does not send the album again
    try:
        await fake.wait_for(lambda: job_statuses(db) == {"done": 1}, 180)
        last = await push_album(fake, helper, 402, albums[402])
        await fake.wait_for(lambda: fake.confirmed_offset > last, timeout=90)
    finally:
        run.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(run.communicate(), 30)
    assert run.returncode == 0, stderr.decode()[-2000:]
    assert job_statuses(db) == {"done": 1}  # stopped inside the second album's window

    run = await start_serve(fake, tiny_qwen3, data)
    try:
        await fake.wait_for(lambda: job_statuses(db) == {"done": 2}, 180)
        await asyncio.sleep(1.0)  # anything duplicated would show up now
    finally:
        run.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(run.communicate(), 30)
    assert run.returncode == 0, stderr.decode()[-2000:]
    for chat, images in albums.items():
        shown = fake.bot_messages(chat)
        assert len(shown) == 1, (chat, [m.text for m in shown])  # one reply per album
        assert shown[0].text and not shown[0].text.startswith(("thinking", "queued"))
        with sqlite3.connect(db) as conn:
            (parts,) = conn.execute(
                "SELECT parts FROM turns WHERE conversation = ? AND role = 'user'",
                (f"telegram:{chat}",)).fetchone()
        assert parts.count('"image"') == len(images)  # the whole album, in one turn
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM pending_updates").fetchone()[0] == 0
