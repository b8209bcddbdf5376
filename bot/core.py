"""The Core handed to adapters: submit/cancel/reset through the runner, history, and status."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bot.adapter import Acceptance, CoreStatus, Incoming
from bot.admin import AdminService
from bot.engine_port import Engine, UpstreamStatus
from bot.history import HistoryStore
from bot.models import ConversationId, ImagePart
from bot.runner import Runner

if TYPE_CHECKING:
    from bot.webhooks import WebhookWorker

log = logging.getLogger("vlbot.core")


def public_model_name(model: str) -> str:
    """The model as users and API clients see it: a hub id as it is, a local folder by its name
    only (the server's paths are nobody else's business)."""
    text = model.strip().rstrip("/")
    if text.startswith(("/", ".", "~")) or text.count("/") != 1 or Path(text).expanduser().is_dir():
        return Path(text).expanduser().name or text
    return text


class BotCore:
    def __init__(
        self,
        runner: Runner,
        history: HistoryStore,
        engine: Engine,
        admin: AdminService | None = None,
    ) -> None:
        self.runner = runner
        self._history = history
        # no admin service given (tests): one on the jobs' database, with no admins or defaults
        self._admin = admin or AdminService(runner.jobs.db)
        self.engine = engine
        self.started_at = time.time()
        self.engine_error: str | None = None
        self._load_task: asyncio.Task[None] | None = None
        self.webhooks: WebhookWorker | None = None  # outbound webhooks (set by bot/app.py)

    @property
    def history(self) -> HistoryStore:
        return self._history

    @property
    def admin(self) -> AdminService:
        return self._admin

    def load_engine_in_background(self) -> asyncio.Task[None]:
        """Start loading the model without delaying readiness of the adapters."""

        async def _load() -> None:
            started = time.monotonic()
            try:
                await self.engine.load()
            except Exception as exc:
                self.engine_error = str(exc)
                log.error("engine failed to load: %s", exc)
            else:
                log.info("engine ready in %.1f s", time.monotonic() - started)

        self._load_task = asyncio.create_task(_load(), name="vlbot-engine-load")
        return self._load_task

    def status(self) -> CoreStatus:
        info = self.engine.info
        state = "failed" if self.engine_error else ("ready" if self.engine.ready else "loading")
        return CoreStatus(
            engine_state=state,
            engine_error=self.engine_error,
            model=public_model_name(info.model),
            engine=info.name,
            dtype=info.dtype,
            queue_depth=self.runner.queue_depth,
            running=self.runner.running_count,
            uptime_s=time.time() - self.started_at,
            job_seconds=self.runner.job_seconds(),
            fallback=info.details.get("fallback"),
            cpu_tier=info.details.get("cpu_tier"),
            kernels=info.details.get("kernels"),
            upstreams=self.upstreams(),
            webhooks=dict(self.webhooks.counts) if self.webhooks is not None else None,
        )

    def upstreams(self) -> tuple[UpstreamStatus, ...]:
        """The model servers behind the engine when it is a pool (engine=openai), else ()."""
        report = getattr(self.engine, "upstreams", None)
        found = report() if callable(report) else ()
        return tuple(u for u in found if isinstance(u, UpstreamStatus))

    async def job_counts(self) -> dict[str, int]:
        """Stored jobs by status (all platforms), for metrics."""
        return await self.runner.jobs.counts()

    async def images_for_reply(
        self, conversation: ConversationId, message_ref: int | str
    ) -> list[ImagePart]:
        """The images a reply to an earlier platform message (question, placeholder or answer,
        as recorded in job origins) is about."""
        return await self.runner.jobs.images_for_reply(conversation, message_ref)

    async def submit(self, incoming: Incoming) -> Acceptance:
        return await self.runner.submit(incoming)

    async def cancel(self, conversation: ConversationId) -> int:
        return await self.runner.cancel(conversation)

    async def reset(self, conversation: ConversationId) -> None:
        await self.runner.reset(conversation)
