"""Webhook mode: a small aiohttp server that receives Telegram's POSTs, checks the secret-token
header, and feeds the updates to the running PTB application (same loop, same handlers).

PTB's own webhook server needs tornado; this keeps the dependency set as it is.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Update
from telegram.ext import Application

from adapters.telegram.durable import DurableUpdateQueue
from bot.settings import Settings

log = logging.getLogger("vlbot.telegram")
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
HANDLED_WAIT_S = 10.0  # longest wait for an update's job before the 200 (it stays pending)


class WebhookServer:
    def __init__(self, settings: Settings, app: Application[Any, Any, Any, Any, Any, Any]) -> None:
        tg = settings.telegram
        if not tg.webhook_url:
            raise ValueError("Telegram webhook mode needs VLBOT_TELEGRAM__WEBHOOK_URL (public https URL)")
        if tg.webhook_secret is None:
            raise ValueError("Telegram webhook mode needs VLBOT_TELEGRAM__WEBHOOK_SECRET")
        self.url = tg.webhook_url
        self.secret = tg.webhook_secret.get_secret_value()
        self.listen = tg.webhook_listen
        self.port = tg.webhook_port
        self.path = urlsplit(tg.webhook_url).path or "/"
        self.app = app
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        server = web.Application(client_max_size=1024 * 1024)
        server.router.add_post(self.path, self._receive)
        self._runner = web.AppRunner(server, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self.port
        await self.app.bot.set_webhook(
            self.url, secret_token=self.secret, allowed_updates=["message"],
            drop_pending_updates=False,
        )
        log.info("telegram: webhook listening on %s:%s%s", self.listen, self.bound_port, self.path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _receive(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            log.warning("telegram webhook: request without the right secret token refused")
            return web.Response(status=403)
        try:
            data = await request.json()
            update = Update.de_json(data, self.app.bot)
        except ValueError:
            return web.Response(status=400)
        await self.app.update_queue.put(update)
        queue = self.app.update_queue
        if isinstance(queue, DurableUpdateQueue):  # 200 once the job is written (replicas)
            await queue.handled(update.update_id, HANDLED_WAIT_S)
        return web.Response(status=200)
