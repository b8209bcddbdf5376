"""The Telegram adapter: python-telegram-bot v22 on the caller's asyncio loop.

`start` initialises the bot (getMe), registers the commands, starts the application and long
polling (or the webhook server) and returns; with the Bot API unreachable it returns at once and
keeps trying in the background with backoff. `stop` undoes it. Received updates are persisted
before Telegram's acknowledgement (adapters.telegram.durable) in the bot's SQLite file, through a
connection of the adapter's own. Handlers never block the update
loop (block=False). Replies go through `Replier` (placeholder, throttled edits, final answer);
all bot calls pass PTB's AIORateLimiter, which also waits out 429 retry_after and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any
from urllib.parse import quote

from telegram import BotCommand
from telegram.error import NetworkError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CommandHandler,
    MessageHandler,
    filters,
)

from adapters.telegram.admin_commands import ADMIN_COMMANDS, register_admin_menus, with_usage
from adapters.telegram.auto_triage import post_text, warn_if_privacy_on
from adapters.telegram.durable import DurableUpdateQueue
from adapters.telegram.handlers import COMMAND_NAMES, Handlers
from adapters.telegram.ledger import ChatLedger
from adapters.telegram.replies import Replier
from adapters.telegram.webhook import WebhookServer
from bot.adapter import Core, Queued, ReplyEvent
from bot.db import Database, HeldLock
from bot.jobqueue import REPLICA_ID
from bot.models import Job
from bot.pending import PendingUpdates
from bot.settings import Settings

log = logging.getLogger("vlbot.telegram")

COMMANDS = {
    "en": [
        ("ask", "Ask about an image (in groups: /ask your question)"),
        ("help", "What I can do, the model and the limits"),
        ("reset", "Forget this chat's history"),
        ("cancel", "Stop the running or queued answer"),
        ("export", "This chat as Markdown and JSON files"),
        ("start", "Start"),
    ],
    "zh": [
        ("ask", "就图片提问（群组中：/ask 你的问题）"),
        ("help", "功能、模型与限制"),
        ("reset", "清除本对话历史"),
        ("cancel", "停止正在进行或排队的回答"),
        ("export", "以 Markdown 和 JSON 文件导出本对话"),
        ("start", "开始"),
    ],
}
# Loggers that may see request URLs (which contain the bot token).
_URL_LOGGERS = ("httpx", "httpcore", "telegram", "aiohttp.access")


class TokenRedactor(logging.Filter):
    """Formats each record at once (PTB logs dicts it mutates afterwards: getFile's result gets
    the file URL, token included, after it was logged) and replaces the token."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret
        self.quoted = quote(secret, safe="")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record: let logging report it as usual
            return True
        record.msg = self.redact(message)
        record.args = None
        return True

    def redact(self, text: str) -> str:
        return text.replace(self.secret, "<token>").replace(self.quoted, "<token>")


class TelegramAdapter:
    platform = "telegram"

    def __init__(
        self,
        settings: Settings,
        *,
        edit_interval_s: float = 1.0,
        group_edit_interval_s: float = 3.0,
        album_wait_s: float = 1.0,
        poll_timeout_s: float = 10.0,
        connect_backoff_s: float = 2.0,
        connect_backoff_max_s: float = 60.0,
    ) -> None:
        if settings.telegram.token is None:
            raise ValueError("Telegram is not configured: set VLBOT_TELEGRAM__TOKEN")
        self.settings = settings
        self.edit_interval_s = edit_interval_s
        self.group_edit_interval_s = group_edit_interval_s
        self.album_wait_s = album_wait_s
        self.poll_timeout_s = poll_timeout_s
        self.connect_backoff_s = connect_backoff_s
        self.connect_backoff_max_s = connect_backoff_max_s
        self.app: Application[Any, Any, Any, Any, Any, Any] | None = None
        self.replier: Replier | None = None
        self.handlers: Handlers | None = None
        self.webhook: WebhookServer | None = None
        self.core: Core | None = None
        self.queue: DurableUpdateQueue | None = None
        self._db: Database | None = None
        self._poll_lock: HeldLock | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._redactor = TokenRedactor(settings.telegram.token.get_secret_value())

    async def start(self, core: Core) -> None:
        """Connect to the Bot API and start receiving. If the Bot API cannot be reached (network
        error, 5xx), keep trying in the background with backoff and return: the other adapters
        serve meanwhile. A wrong token still fails here, at once."""
        tg = self.settings.telegram
        assert tg.token is not None
        self.core = core
        _protect_logs(self._redactor)
        self._db = await Database.open(self.settings.database)
        self.queue = DurableUpdateQueue(PendingUpdates(self._db, self.platform, REPLICA_ID))
        builder = (
            ApplicationBuilder()
            .token(tg.token.get_secret_value())
            .rate_limiter(AIORateLimiter(max_retries=3))
            .update_queue(self.queue)
        )
        if tg.base_url:
            builder = builder.base_url(tg.base_url)
        if tg.base_file_url:
            builder = builder.base_file_url(tg.base_file_url)
        if tg.mode == "webhook":
            builder = builder.updater(None)
        self.app = builder.build()
        try:
            await self._connect(self.app)
        except NetworkError as exc:
            self._log_unreachable(exc, 1, self.connect_backoff_s)
            self._connecting = asyncio.create_task(self._keep_connecting(self.app),
                                                   name="tg-connect")

    async def _keep_connecting(self, app: Application[Any, Any, Any, Any, Any, Any]) -> None:
        delay = self.connect_backoff_s
        attempt = 1
        while True:
            await asyncio.sleep(delay)
            attempt += 1
            delay = min(delay * 2, self.connect_backoff_max_s)
            try:
                await self._connect(app)
                return
            except NetworkError as exc:
                self._log_unreachable(exc, attempt, delay)
            except Exception as exc:  # e.g. the token was revoked meanwhile: stop trying
                log.error("telegram: cannot start: %s", self._redactor.redact(str(exc)))
                return

    def _log_unreachable(self, exc: Exception, attempt: int, delay: float) -> None:
        log.warning("telegram: the Bot API is unreachable (attempt %d: %s: %s); retrying in %.0f s",
                    attempt, type(exc).__name__, self._redactor.redact(str(exc)), delay)

    async def _connect(self, app: Application[Any, Any, Any, Any, Any, Any]) -> None:
        """Everything that talks to the Bot API at start; safe to call again after a failure."""
        tg = self.settings.telegram
        assert self.queue is not None and self.core is not None
        await app.initialize()  # getMe: fails here, clearly, on a wrong token
        warn_if_privacy_on(app.bot, self.settings.triage.telegram_chats)
        if self.handlers is None:
            ledger = ChatLedger(app.bot)
            self.handlers = Handlers(self.settings, app.bot, self.core,
                                     album_wait_s=self.album_wait_s, queue=self.queue,
                                     ledger=ledger)
            self.replier = Replier(
                app.bot,
                ledger=ledger,
                max_concurrency=self.settings.max_concurrency,
                edit_interval_s=self.edit_interval_s,
                group_edit_interval_s=self.group_edit_interval_s,
            )
            commands = filters.UpdateType.MESSAGE
            names = [n for n in (*COMMAND_NAMES, *ADMIN_COMMANDS) if n != "ask"]  # /ask: on_message
            app.add_handler(CommandHandler(names, self.handlers.on_command, filters=commands,
                                           block=False))
            app.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self.handlers.on_message,
                                           block=False))
            app.add_error_handler(self.handlers.on_error, block=False)
        menus = {lang: with_usage(items, lang) for lang, items in COMMANDS.items()}
        for lang, items in menus.items():
            await app.bot.set_my_commands(
                [BotCommand(name, about) for name, about in items],
                language_code=None if lang == "en" else lang,
            )
        await register_admin_menus(app.bot, self.core.admin.policy.access.admins.get("telegram", ()),
                                   menus)
        if not app.running:
            await app.start()
            await self.queue.replay(app.bot)  # what an earlier run received but did not finish
        if tg.mode == "webhook":
            if self.webhook is None:
                self.webhook = WebhookServer(self.settings, app)
            await self.webhook.start()
        else:
            assert app.updater is not None and self._db is not None
            if self._poll_lock is None:
                self._poll_lock = await self._db.try_lock(f"telegram-polling:{app.bot.id}")
            if self._poll_lock is None:  # Telegram hands each update to one getUpdates caller
                log.error("telegram: another replica is already long-polling this bot; this one "
                          "will not poll (long polling has one consumer: run replicas with "
                          "VLBOT_TELEGRAM__MODE=webhook)")
                return
            await app.updater.start_polling(
                timeout=dt.timedelta(seconds=self.poll_timeout_s),
                allowed_updates=["message"],
                drop_pending_updates=False,
            )
        self._ready.set()
        log.info("telegram: @%s ready (%s)", app.bot.username, tg.mode)

    async def stop(self) -> None:
        self._ready.clear()
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
            self._connecting = None
        app, self.app = self.app, None
        if app is not None:
            await self._stop_app(app)
        if self._poll_lock is not None:
            with contextlib.suppress(Exception):
                await self._poll_lock.release()
            self._poll_lock = None
        if self._db is not None:
            await self._db.close()
            self._db = None
        log.info("telegram: stopped")

    async def _stop_app(self, app: Application[Any, Any, Any, Any, Any, Any]) -> None:
        if self.webhook is not None:
            await self.webhook.stop()
            self.webhook = None
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if self.handlers is not None:
            await self.handlers.close()
        if self.replier is not None:
            await self.replier.close()
        self.handlers = self.replier = None
        if app.running:
            await app.stop()
        await app.shutdown()

    async def send(self, job: Job, event: ReplyEvent) -> dict[str, Any] | None:
        # Resumed jobs may be delivered before start() finished: wait for the bot (the runner
        # retries a delivery that raises).
        await asyncio.wait_for(self._ready.wait(), timeout=30)
        assert self.replier is not None and self.core is not None
        if isinstance(event, Queued):
            status = self.core.status()
            self.replier.running, self.replier.queue_depth = status.running, status.queue_depth
        return await self.replier.send(job, event)

    async def post(self, chat: str, text: str) -> str | None:
        """bot.adapter.Poster: plain text into chat `chat` (its numeric id); the new message's
        t.me link, None where Telegram has none (private chats, basic groups)."""
        await asyncio.wait_for(self._ready.wait(), timeout=30)
        assert self.handlers is not None and self.app is not None
        return await post_text(self.app.bot, self.handlers.ledger, chat, text)


def _protect_logs(redactor: TokenRedactor) -> None:
    """httpx logs every request URL at INFO, and URLs contain the token: keep httpx/httpcore at
    WARNING and redact the token from any record of the loggers that may see URLs."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    names = [n for n in logging.Logger.manager.loggerDict if n.startswith(_URL_LOGGERS)]
    for name in {*_URL_LOGGERS, *names}:
        logger = logging.getLogger(name)
        if redactor not in logger.filters:
            logger.addFilter(redactor)
