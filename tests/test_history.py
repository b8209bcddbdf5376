"""History store, on SQLite and on Postgres: images stored once, reset and retention really
delete, the SQLite folder is private."""

from __future__ import annotations

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


async def counts(db: Database) -> tuple[int, int]:
    turns = await db.fetchall("SELECT COUNT(*) AS n FROM turns")
    images = await db.fetchall("SELECT COUNT(*) AS n FROM images")
    return turns[0]["n"], images[0]["n"]


def turn(role: Role, text: str, *images: ImagePart, at: float | None = None) -> Turn:
    return Turn(role, Message.of(text, *images).parts, at if at is not None else time.time())


async def test_images_are_stored_once_and_reset_deletes_rows_and_images(
    database_target: Path | str,
) -> None:
    db = await Database.open(database_target)
    history = HistoryStore(db)
    await history.append(A, [turn(Role.USER, "total?", PHOTO), turn(Role.ASSISTANT, "42")])
    await history.append(B, [turn(Role.USER, "same photo?", PHOTO), turn(Role.ASSISTANT, "yes")])
    await history.append(A, [turn(Role.USER, "and this?", OTHER), turn(Role.ASSISTANT, "7")])
    assert await counts(db) == (6, 2)  # PHOTO stored once for both conversations
    if isinstance(database_target, Path):
        assert stat.S_IMODE(database_target.parent.stat().st_mode) == 0o700

    await history.reset(A)
    assert await counts(db) == (2, 1)  # OTHER gone; PHOTO still used by B
    assert await history.recent(A) == []
    assert [t.images[0].data for t in await history.recent(B) if t.images] == [PHOTO.data]
    await history.reset(B)
    assert await counts(db) == (0, 0)
    await db.close()


async def test_retention_deletes_old_turns_and_their_images(database_target: Path | str) -> None:
    db = await Database.open(database_target)
    history = HistoryStore(db, retention_days=30)
    old = time.time() - 31 * 86400
    await history.append(A, [turn(Role.USER, "old", OTHER, at=old), turn(Role.ASSISTANT, "x", at=old)])
    await history.append(A, [turn(Role.USER, "new", PHOTO), turn(Role.ASSISTANT, "y")])
    assert await history.prune() == 2
    assert await counts(db) == (2, 1)
    assert [t.text for t in await history.recent(A)] == ["new", "y"]
    await db.close()


async def test_a_follow_up_window_keeps_the_image_it_is_about(database_target: Path | str) -> None:
    db = await Database.open(database_target)
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
