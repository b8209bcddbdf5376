"""History store: images stored once, reset and retention really delete, the folder is private."""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path

from bot.db import Database
from bot.history import HistoryStore
from bot.models import ConversationId, ImagePart, Message, Role, Turn

A = ConversationId("test", "a")
B = ConversationId("test", "b", "thread-1")
PHOTO = ImagePart(b"\x89PNG receipt", "image/png", "receipt.png")
OTHER = ImagePart(b"\x89PNG other", "image/png", "other.png")


def counts(db_path: Path) -> tuple[int, int]:
    with sqlite3.connect(db_path) as conn:
        turns = conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
        images = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    return turns, images


def turn(role: Role, text: str, *images: ImagePart, at: float | None = None) -> Turn:
    return Turn(role, Message.of(text, *images).parts, at if at is not None else time.time())


async def test_images_are_stored_once_and_reset_deletes_rows_and_images(tmp_path: Path) -> None:
    db_path = tmp_path / "data" / "vlbot.sqlite3"
    db = await Database.open(db_path)
    history = HistoryStore(db)
    await history.append(A, [turn(Role.USER, "total?", PHOTO), turn(Role.ASSISTANT, "42")])
    await history.append(B, [turn(Role.USER, "same photo?", PHOTO), turn(Role.ASSISTANT, "yes")])
    await history.append(A, [turn(Role.USER, "and this?", OTHER), turn(Role.ASSISTANT, "7")])
    assert counts(db_path) == (6, 2)  # PHOTO stored once for both conversations
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700

    await history.reset(A)
    assert counts(db_path) == (2, 1)  # OTHER gone; PHOTO still used by B
    assert await history.recent(A) == []
    assert [t.images[0].data for t in await history.recent(B) if t.images] == [PHOTO.data]
    await history.reset(B)
    assert counts(db_path) == (0, 0)
    await db.close()


async def test_retention_deletes_old_turns_and_their_images(tmp_path: Path) -> None:
    db_path = tmp_path / "vlbot.sqlite3"
    db = await Database.open(db_path)
    history = HistoryStore(db, retention_days=30)
    old = time.time() - 31 * 86400
    await history.append(A, [turn(Role.USER, "old", OTHER, at=old), turn(Role.ASSISTANT, "x", at=old)])
    await history.append(A, [turn(Role.USER, "new", PHOTO), turn(Role.ASSISTANT, "y")])
    assert await history.prune() == 2
    assert counts(db_path) == (2, 1)
    assert [t.text for t in await history.recent(A)] == ["new", "y"]
    await db.close()


async def test_a_follow_up_window_keeps_the_image_it_is_about(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "vlbot.sqlite3")
    history = HistoryStore(db, turns_in_prompt=4)
    await history.append(A, [turn(Role.USER, "what is this?", PHOTO), turn(Role.ASSISTANT, "a receipt")])
    for i in range(5):
        await history.append(A, [turn(Role.USER, f"follow-up {i}"), turn(Role.ASSISTANT, f"answer {i}")])
    recent = await history.recent(A)
    assert recent[0].images[0].data == PHOTO.data  # extended back to the image
    assert recent[-1].text == "answer 4" and recent[0].role is Role.USER
    export = await history.export(A)
    assert export["turns"][0]["parts"][0] == {
        "image": PHOTO.sha256, "mime": "image/png", "name": "receipt.png", "size": len(PHOTO.data)}
    await db.close()
