"""The composition root: settings → engine, database, runner, adapters on one event loop.

This is the one module of bot/ that imports adapters; with bot/cli.py, the only ones that import
engine (its public face, `import engine`): the rest of bot/ knows engines through
bot/engine_port.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from bot.adapter import Adapter
from bot.admin import AdminPolicy, AdminService
from bot.core import BotCore
from bot.db import Database
from bot.engine_port import Engine
from bot.history import HistoryStore
from bot.jobqueue import JobQueue, LocalJobQueue
from bot.jobs import JobStore
from bot.logs import SecretRedactor, secret_values
from bot.models import GenerationParams
from bot.outbox import Outbox
from bot.runner import Runner
from bot.settings import Settings
from bot.triage.service import TriageService
from bot.usage import UsageLedger
from bot.webhooks import PresetResultWebhooks, WebhookWorker
from engine import IntakeLimits

log = logging.getLogger("vlbot.app")


def intake_limits(settings: Settings) -> IntakeLimits:
    return IntakeLimits(
        max_bytes=settings.max_image_bytes, max_visual_tokens=settings.max_visual_tokens
    )


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "openai":
        return remote_pool(settings)
    if settings.engine in ("ocr", "auto"):
        from engine import OcrEngine

        def make_ocr() -> Engine:
            return OcrEngine(limits=intake_limits(settings), threads=settings.threads)

        if settings.engine == "ocr":
            return make_ocr()
        from engine import AutoEngine

        return AutoEngine(
            settings.model, lambda: qwen_engine(settings), make_ocr, limits=intake_limits(settings)
        )
    return qwen_engine(settings)


def remote_pool(settings: Settings) -> Engine:
    """engine=openai: the configured servers (one or several) as a health-checked pool."""
    from engine import OpenAIRemoteEngine, RemotePool

    remote = settings.remote
    servers = [
        OpenAIRemoteEngine(
            base_url=server.base_url,
            api_key=server.api_key.get_secret_value() if server.api_key else None,
            model=server.model or remote.model,
            limits=intake_limits(settings),
            timeout_s=remote.timeout_s,
            connect_timeout_s=remote.connect_timeout_s,
        )
        for server in remote.server_list()
    ]
    return RemotePool(
        servers,
        first_token_timeout_s=remote.first_token_timeout_s,
        health_interval_s=remote.health_interval_s,
        max_backoff_s=remote.max_backoff_s,
    )


def qwen_engine(settings: Settings) -> Engine:
    from engine import QwenVLEngine

    vlm = QwenVLEngine(
        settings.model,
        dtype=settings.dtype,
        threads=settings.threads,
        limits=intake_limits(settings),
        max_images=max(8, settings.max_images_per_message),  # whole prompt, history included
        kv_cache_bytes=settings.kv_cache_mb * 2**20,
        max_batch=settings.max_batch,
        quantize=settings.quantize,
    )
    if not settings.ocr_hints:
        return vlm
    from engine import OcrEngine, OcrHintedEngine

    return OcrHintedEngine(vlm, OcrEngine(limits=intake_limits(settings), threads=settings.threads))


def build_adapters(settings: Settings) -> list[Adapter]:
    adapters: list[Adapter] = []
    if settings.telegram.enabled:
        from adapters.telegram import TelegramAdapter

        adapters.append(TelegramAdapter(settings))
    if settings.slack.enabled:
        from adapters.slack import SlackAdapter

        adapters.append(SlackAdapter(settings))
    if settings.http_enabled():
        from adapters.http import HttpAdapter

        adapters.append(HttpAdapter(settings))
    return adapters


class AdapterStartError(Exception):
    """An adapter could not start; the message names the settings to check."""


class App:
    """Owns the lifecycle: start everything, run until stopped, stop in reverse order."""

    def __init__(
        self, settings: Settings, engine: Engine, adapters: list[Adapter] | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.adapters = adapters if adapters is not None else build_adapters(settings)
        self.db: Database | None = None
        self.runner: Runner | None = None
        self.core: BotCore | None = None
        self.outbox: Outbox | None = None  # outbound webhook events (bot/outbox.py)
        self.webhooks: WebhookWorker | None = None  # delivers them
        self.triage: TriageService | None = None  # bot/triage/: grouping, routing, digest
        self._prune_task: asyncio.Task[None] | None = None

    async def start(self) -> BotCore:
        s = self.settings
        started = time.monotonic()
        self.db = await Database.open(s.database)
        self.outbox = Outbox(
            self.db, [e.url for e in s.webhooks.endpoints], event_types=s.webhooks.events
        )
        self.webhooks = WebhookWorker(self.outbox, s.webhooks)
        try:  # a refused endpoint URL stops the start here, named (WebhookConfigError)
            await self.webhooks.start()
        except BaseException:
            await self.stop()
            raise
        history = HistoryStore(self.db, s.history_turns, s.retention_days)
        jobs = JobStore(self.db, history)
        # admins, access, quotas (the runner's admission) and the usage ledger (its observer)
        admin = AdminService(self.db, AdminPolicy.from_settings(s), s.retention_days)
        try:  # a routing rule to a platform not configured here stops the start, named
            self.triage = TriageService.build(self.db, s, self.outbox, self.adapters,
                                              places=admin.auto_triage)
        except BaseException:
            await self.stop()
            raise
        queue: JobQueue = LocalJobQueue()
        if self.db.dialect == "postgres":  # replicas may share this database
            from bot.pgqueue import SharedJobQueue

            queue = SharedJobQueue(self.db, jobs, lease_s=s.job_lease_s)
        params = GenerationParams(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, system_prompt=s.system_prompt
        )
        self.runner = Runner(
            jobs,
            history,
            self.engine,
            max_concurrency=s.max_concurrency,
            max_queue=s.max_queue,
            job_timeout_s=s.job_timeout_s,
            max_attempts=s.max_attempts,
            max_images_per_message=s.max_images_per_message,
            max_question_chars=s.max_question_chars,
            params=params,
            queue=queue,
            admission=admin.admission,
            observers=[admin.ledger],
            result_hooks=[PresetResultWebhooks(self.outbox), self.triage.workflow],
        )
        self.runner.attach({a.platform: a for a in self.adapters})
        self.core = BotCore(self.runner, history, self.engine, admin)
        self.core.webhooks = self.webhooks
        self.core.load_engine_in_background()
        for adapter in self.adapters:
            try:
                await adapter.start(self.core)
            except Exception as exc:  # a wrong token, an unreachable platform, a busy port ...
                await self.stop()
                reason = SecretRedactor(secret_values(self.settings)).redact(str(exc))
                raise AdapterStartError(
                    f"the {adapter.platform} adapter could not start: {reason} "
                    f"(check the VLBOT_{adapter.platform.upper()}__* settings and the network)"
                ) from exc
            log.info("adapter %s started", adapter.platform)
        await self.runner.start()
        self.triage.start()  # the daily digest
        self._prune_task = asyncio.create_task(self._prune_forever(history, admin.ledger))
        log.info(
            "vlbot serving (%s) in %.2f s",
            ", ".join(a.platform for a in self.adapters) or "no adapters",
            time.monotonic() - started,
        )
        return self.core

    async def stop(self) -> None:
        log.info("shutting down")
        if self._prune_task:
            self._prune_task.cancel()
        if self.triage:
            await self.triage.stop()
        for adapter in reversed(self.adapters):
            try:
                await adapter.stop()
            except Exception as exc:
                log.warning("adapter %s did not stop cleanly: %r", adapter.platform, exc)
        if self.runner:
            await self.runner.stop(grace_s=10.0)
        if self.webhooks:  # after the runner: its last results are in the outbox
            await self.webhooks.stop()
        await self.engine.close()
        if self.db:
            await self.db.close()

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def _prune_forever(self, history: HistoryStore, ledger: UsageLedger) -> None:
        while True:
            try:
                deleted = await history.prune()
                if deleted:
                    log.info("retention: deleted %d old turns", deleted)
                rows = await ledger.prune()  # the usage ledger keeps history's retention
                if rows:
                    log.info("retention: deleted %d old usage rows", rows)
                if self.triage and (rows := await self.triage.store.prune()):  # so do triages
                    log.info("retention: deleted %d old triages", rows)
            except Exception as exc:
                log.warning("retention pass failed: %r", exc)
            await asyncio.sleep(3600)
