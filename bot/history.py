"""Per-conversation history (SQLite or Postgres): turns with their images, stored once by content hash."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from bot.db import Database, Tx
from bot.models import ConversationId, ImagePart, Part, Role, TextPart, Turn


def parts_to_json(parts: Sequence[Part]) -> str:
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            out.append({"text": part.text})
        else:
            out.append({"image": part.sha256, "mime": part.mime, "name": part.name})
    return json.dumps(out, ensure_ascii=False)


async def parts_from_json(conn: Tx, raw: str) -> tuple[Part, ...]:
    items: list[dict[str, Any]] = json.loads(raw)
    data = await load_images(conn, [item["image"] for item in items if "image" in item])
    return parts_from_items(items, data)


def parts_from_items(items: list[dict[str, Any]], data: dict[str, bytes]) -> tuple[Part, ...]:
    """Stored parts with their image bytes (`data` by sha256); unknown images are left out."""
    parts: list[Part] = []
    for item in items:
        if "text" in item:
            parts.append(TextPart(item["text"]))
        elif item["image"] in data:
            parts.append(ImagePart(data[item["image"]], item.get("mime") or "", item.get("name")))
    return tuple(parts)


async def save_images(conn: Tx, images: Iterable[ImagePart]) -> list[str]:
    shas = []
    for image in images:
        sha = image.sha256
        await conn.execute(
            "INSERT INTO images (sha256, mime, data, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (sha, image.mime, image.data, time.time()),
        )
        shas.append(sha)
    return shas


async def load_images(conn: Tx, shas: Sequence[str]) -> dict[str, bytes]:
    if not shas:
        return {}
    marks = ",".join("?" * len(shas))
    sql = f"SELECT sha256, data FROM images WHERE sha256 IN ({marks})"
    return {row["sha256"]: bytes(row["data"]) for row in await conn.fetchall(sql, tuple(shas))}


async def collect_unreferenced_images(conn: Tx) -> int:
    return await conn.execute(
        "DELETE FROM images WHERE sha256 NOT IN (SELECT sha256 FROM turn_images)"
        " AND sha256 NOT IN (SELECT sha256 FROM job_images)"
    )


class HistoryStore:
    """The narrow interface the runner and adapters need: append, recent, reset, export, prune."""

    def __init__(self, db: Database, turns_in_prompt: int = 10, retention_days: float = 30.0):
        self.db = db
        self.turns_in_prompt = turns_in_prompt
        self.retention_days = retention_days

    async def append(self, conversation: ConversationId, turns: Sequence[Turn]) -> None:
        async with self.db.transaction() as conn:
            await self.append_in(conn, conversation, turns)

    async def append_in(
        self, conn: Tx, conversation: ConversationId, turns: Sequence[Turn]
    ) -> None:
        """Append inside a caller's transaction (the runner commits turns with the job status)."""
        for turn in turns:
            shas = await save_images(conn, turn.images)
            inserted = await conn.fetchall(
                "INSERT INTO turns (conversation, role, parts, created_at, job_id)"
                " VALUES (?, ?, ?, ?, ?) RETURNING id",
                (
                    conversation.key(),
                    turn.role.value,
                    parts_to_json(turn.parts),
                    turn.created_at,
                    turn.job_id,
                ),
            )
            for sha in set(shas):
                await conn.execute(
                    "INSERT INTO turn_images (turn_id, sha256) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (inserted[0]["id"], sha),
                )

    async def recent(self, conversation: ConversationId, limit: int | None = None) -> list[Turn]:
        """The last `limit` turns (oldest first), starting at a user turn. If no image is in that
        window, the window is extended back to the latest turn that has one, so a follow-up
        keeps seeing the image it is about."""
        limit = self.turns_in_prompt if limit is None else limit
        rows = await self.db.fetchall(
            "SELECT id, role, parts, created_at, job_id FROM turns WHERE conversation = ?"
            " ORDER BY id DESC LIMIT ?",
            (conversation.key(), max(limit, 0)),
        )
        if not any('"image"' in row["parts"] for row in rows):
            oldest = rows[-1]["id"] if rows else 1 << 62
            with_image = await self.db.fetchall(
                "SELECT t.id FROM turns t JOIN turn_images ti ON ti.turn_id = t.id"
                " WHERE t.conversation = ? AND t.id < ? ORDER BY t.id DESC LIMIT 1",
                (conversation.key(), oldest),
            )
            if with_image:
                rows = await self.db.fetchall(
                    "SELECT id, role, parts, created_at, job_id FROM turns"
                    " WHERE conversation = ? AND id >= ? ORDER BY id DESC",
                    (conversation.key(), with_image[0]["id"]),
                )
        rows.reverse()
        while rows and rows[0]["role"] != Role.USER.value:
            rows.pop(0)
        items = [json.loads(row["parts"]) for row in rows]
        shas = sorted({part["image"] for parts in items for part in parts if "image" in part})
        async with self.db.reading() as conn:
            data = await load_images(conn, shas)  # one query for every image of the window
        return [
            Turn(Role(row["role"]), parts_from_items(parts, data), row["created_at"], row["job_id"])
            for row, parts in zip(rows, items, strict=True)
        ]

    async def reset(self, conversation: ConversationId) -> int:
        """Forget a conversation: its turns and every image no longer referenced."""
        async with self.db.transaction() as conn:
            deleted = await conn.execute(
                "DELETE FROM turns WHERE conversation = ?", (conversation.key(),)
            )
            await collect_unreferenced_images(conn)
        return deleted

    async def prune(self, now: float | None = None) -> int:
        """Delete turns older than the retention period (and images left unreferenced)."""
        cutoff = (now if now is not None else time.time()) - self.retention_days * 86400
        async with self.db.transaction() as conn:
            deleted = await conn.execute("DELETE FROM turns WHERE created_at < ?", (cutoff,))
            await collect_unreferenced_images(conn)
        return deleted

    async def export(self, conversation: ConversationId) -> dict[str, Any]:
        """The whole stored conversation as JSON-ready data; images by hash, mime and size."""
        rows = await self.db.fetchall(
            "SELECT t.id, t.role, t.parts, t.created_at, t.job_id FROM turns t"
            " WHERE t.conversation = ? ORDER BY t.id",
            (conversation.key(),),
        )
        sizes = {
            row["sha256"]: row["size"]
            for row in await self.db.fetchall(
                "SELECT i.sha256, length(i.data) AS size FROM images i WHERE i.sha256 IN"
                " (SELECT ti.sha256 FROM turn_images ti JOIN turns t ON t.id = ti.turn_id"
                "  WHERE t.conversation = ?)",
                (conversation.key(),),
            )
        }
        turns = []
        for row in rows:
            parts = json.loads(row["parts"])
            for part in parts:
                if "image" in part:
                    part["size"] = sizes.get(part["image"])
            turns.append(
                {
                    "role": row["role"],
                    "parts": parts,
                    "created_at": row["created_at"],
                    "job_id": row["job_id"],
                }
            )
        return {"conversation": conversation.key(), "turns": turns}

    async def image_in(self, sha256: str, key_prefix: str) -> bytes | None:
        """An image, only when a turn of a conversation whose key starts with `key_prefix` (the
        conversations of one owner) holds it; None otherwise, as for an unknown image."""
        rows = await self.db.fetchall(
            "SELECT i.data FROM images i WHERE i.sha256 = ? AND EXISTS (SELECT 1 FROM turn_images ti"
            " JOIN turns t ON t.id = ti.turn_id WHERE ti.sha256 = i.sha256"
            " AND substr(t.conversation, 1, length(CAST(? AS TEXT))) = ?)",
            (sha256, key_prefix, key_prefix),
        )
        return bytes(rows[0]["data"]) if rows else None
