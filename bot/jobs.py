"""Durable jobs: every accepted message is a row before it is acknowledged."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from bot.db import Database, Row, Tx
from bot.history import (
    HistoryStore,
    collect_unreferenced_images,
    parts_from_json,
    parts_to_json,
    save_images,
)
from bot.models import ConversationId, ImagePart, Job, JobStatus, Message, Role, Turn, User

UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.ANSWERED)


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


class JobStore:
    def __init__(self, db: Database, history: HistoryStore) -> None:
        self.db = db
        self.history = history

    async def insert(
        self,
        job: Job,
        event_key: str | None = None,
        pinned_to: str | None = None,
        held_until: float | None = None,
    ) -> bool:
        """Persist a new job. Returns False (and writes nothing) if `event_key` was seen before.
        `pinned_to`: the replica that alone may run it while alive (its client waits there);
        `held_until`: no replica claims it before then (or before bot/pgqueue.py releases it)."""
        async with self.db.transaction() as conn:
            if event_key is not None:
                # the unique key decides between replicas too: the second insert changes no row
                added = await conn.execute(
                    "INSERT INTO seen_events (key, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (event_key, time.time()),
                )
                if added == 0:
                    return False
            shas = await save_images(conn, job.message.images)
            # Postgres numbers jobs from a sequence (concurrent replicas); SQLite has one writer
            seq = ", seq" if self.db.dialect == "sqlite" else ""
            next_seq = ", (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs)" if seq else ""
            await conn.execute(
                f'INSERT INTO jobs (id{seq}, conversation, "user", message, status, attempts, origin,'
                f" created_at, updated_at, pinned_to, lease_until)"
                f" VALUES (?{next_seq}, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.conversation.key(),
                    json.dumps(dataclasses.asdict(job.user)),
                    parts_to_json(job.message.parts),
                    job.status.value,
                    job.attempts,
                    json.dumps(job.origin),
                    job.created_at,
                    job.updated_at,
                    pinned_to,
                    held_until,
                ),
            )
            for sha in set(shas):
                await conn.execute(
                    "INSERT INTO job_images (job_id, sha256) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (job.id, sha),
                )
        return True

    async def update(self, job: Job, **changes: Any) -> Job:
        """Persist status/attempts/answer/error changes and return the new job; `origin` keys
        are merged into the stored origin (`merge_origin`)."""
        origin = changes.pop("origin", None)
        if origin is not None:
            changes["origin"] = await self.merge_origin(job.id, origin)
        job = dataclasses.replace(job, updated_at=time.time(), **changes)
        async with self.db.transaction() as conn:
            await self._write(conn, job)
        return job

    async def merge_origin(self, job_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Add reply context (a placeholder's message id …) to the stored origin and return it.
        Only origin is written: with replicas, the replica that accepted a job may record its
        placeholder while another one runs the job."""
        # NO KEY UPDATE: not blocked by a place-in-line send's KEY SHARE lock (bot/pgqueue.py)
        lock = " FOR NO KEY UPDATE" if self.db.dialect == "postgres" else ""
        async with self.db.transaction() as conn:
            rows = await conn.fetchall(f"SELECT origin FROM jobs WHERE id = ?{lock}", (job_id,))
            merged = {**(json.loads(rows[0]["origin"]) if rows else {}), **changes}
            await conn.execute(
                "UPDATE jobs SET origin = ? WHERE id = ?", (json.dumps(merged), job_id)
            )
        return merged

    async def _write(self, conn: Tx, job: Job) -> None:
        """Status and outcome (not origin); a job back in the queue loses its lease at once."""
        await conn.execute(
            "UPDATE jobs SET status = ?, attempts = ?, answer = ?, error = ?, updated_at = ?,"
            " lease_until = CASE WHEN ? = 'queued' THEN NULL ELSE lease_until END,"
            " lease_owner = CASE WHEN ? = 'queued' THEN NULL ELSE lease_owner END WHERE id = ?",
            (
                job.status.value,
                job.attempts,
                job.answer,
                job.error,
                job.updated_at,
                job.status.value,
                job.status.value,
                job.id,
            ),
        )

    async def complete(self, job: Job) -> Job:
        """Record a delivered answer: the two turns go into history and the job becomes DONE in
        ONE transaction, so there is no moment where the reply is recorded but the job is not
        done (or the reverse). The job's images move from the job to the history turns."""
        assert job.answer is not None
        job = dataclasses.replace(job, status=JobStatus.DONE, updated_at=time.time())
        turns = [
            Turn(Role.USER, job.message.parts, job.created_at, job.id),
            Turn(Role.ASSISTANT, Message.of(job.answer).parts, job.updated_at, job.id),
        ]
        async with self.db.transaction() as conn:
            await self.history.append_in(conn, job.conversation, turns)
            await self._write(conn, job)
            await conn.execute("DELETE FROM job_images WHERE job_id = ?", (job.id,))
        return job

    async def finish(self, job: Job, status: JobStatus, error: str | None = None) -> Job:
        """End a job without an answer (failed or cancelled) and drop its image references."""
        job = dataclasses.replace(job, status=status, error=error, updated_at=time.time())
        async with self.db.transaction() as conn:
            await self._write(conn, job)
            await conn.execute("DELETE FROM job_images WHERE job_id = ?", (job.id,))
            await collect_unreferenced_images(conn)
        return job

    async def unfinished(self) -> list[Job]:
        marks = ",".join("?" * len(UNFINISHED))
        rows = await self.db.fetchall(
            f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq",
            tuple(s.value for s in UNFINISHED),
        )
        return [await self.job_from_row(row) for row in rows]

    async def get(self, job_id: str) -> Job | None:
        rows = await self.db.fetchall("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return await self.job_from_row(rows[0]) if rows else None

    async def images_for_reply(
        self, conversation: ConversationId, message_ref: int | str
    ) -> list[ImagePart]:
        """The images a reply to an earlier platform message is about. The message is found in
        the origin of the job it belonged to (the user's question `message_id`/`message_ids`,
        the bot's `placeholder_id` or an answer part in `answer_ids`); the images are that
        job's own, or those of the latest earlier job of the conversation that had any.
        [] when unknown or reset."""
        rows = await self.db.fetchall(*self._origin_lookup(conversation, message_ref))
        if not rows:
            return []
        rows = await self.db.fetchall(
            "SELECT message FROM jobs WHERE conversation = ? AND seq <= ?"
            " AND message LIKE '%\"image\"%' ORDER BY seq DESC LIMIT 1",
            (conversation.key(), rows[0]["seq"]),
        )
        if not rows:
            return []
        async with self.db.reading() as conn:
            parts = await parts_from_json(conn, rows[0]["message"])
        return list(Message(parts).images)

    async def counts(self) -> dict[str, int]:
        rows = await self.db.fetchall("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    def _origin_lookup(
        self, conversation: ConversationId, ref: int | str
    ) -> tuple[str, tuple[object, ...]]:
        """The latest job of the conversation whose origin names platform message `ref`."""
        if self.db.dialect == "sqlite":
            return (
                "SELECT seq FROM jobs WHERE conversation = ?1 AND ("
                " json_extract(origin, '$.message_id') = ?2"
                " OR json_extract(origin, '$.placeholder_id') = ?2"
                " OR EXISTS (SELECT 1 FROM json_each(origin, '$.answer_ids') WHERE value = ?2)"
                " OR EXISTS (SELECT 1 FROM json_each(origin, '$.message_ids') WHERE value = ?2))"
                " ORDER BY seq DESC LIMIT 1",
                (conversation.key(), ref),
            )
        # Postgres: JSON values compared as text, the reference typed as its JSON would be
        ref_json = json.dumps(ref)
        return (
            "SELECT seq FROM jobs WHERE conversation = ? AND ("
            " (origin::jsonb -> 'message_id') = ?::jsonb OR (origin::jsonb -> 'placeholder_id') = ?::jsonb"
            " OR COALESCE(origin::jsonb -> 'answer_ids', '[]'::jsonb) @> ?::jsonb"
            " OR COALESCE(origin::jsonb -> 'message_ids', '[]'::jsonb) @> ?::jsonb)"
            " ORDER BY seq DESC LIMIT 1",
            (conversation.key(), ref_json, ref_json, f"[{ref_json}]", f"[{ref_json}]"),
        )

    async def job_from_row(self, row: Row) -> Job:
        async with self.db.reading() as conn:
            parts = await parts_from_json(conn, row["message"])
        return Job(
            id=row["id"],
            conversation=ConversationId.parse(row["conversation"]),
            message=Message(parts),
            user=User(**json.loads(row["user"])),
            status=JobStatus(row["status"]),
            attempts=row["attempts"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            origin=json.loads(row["origin"]),
            answer=row["answer"],
            error=row["error"],
        )
