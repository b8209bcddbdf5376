"""The triage workflow's parts as the composition root (bot/app.py) builds and runs them: the
store, the runner's result hook, the digest scheduler, and the chat adapters' `post` as one
`PostText`. Routing targets are checked against the platforms that are configured."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bot.adapter import Adapter
from bot.db import Database
from bot.settings import Settings
from bot.triage.digest import DigestScheduler
from bot.triage.store import Place, TriageStore
from bot.triage.workflow import EventSink, PostText, TriageWorkflow

PLATFORM_SETTING = {"slack": "VLBOT_SLACK__BOT_TOKEN", "telegram": "VLBOT_TELEGRAM__TOKEN"}


class TriageConfigError(Exception):
    """The triage settings cannot work with the configured platforms; the message names why."""


def check_targets(settings: Settings, adapters: Sequence[Adapter]) -> None:
    """Every routing rule posts into a platform that runs here, and can post."""
    can_post = {a.platform for a in adapters if callable(getattr(a, "post", None))}
    for number, rule in enumerate(settings.triage.rules, start=1):
        platform = rule.post_to.platform
        if platform not in can_post:
            raise TriageConfigError(
                f"routing rule {number} posts to {rule.post_to}, but {platform.capitalize()} is "
                f"not configured (set {PLATFORM_SETTING[platform]}) — see VLBOT_TRIAGE__RULES"
            )


def chat_poster(adapters: Sequence[Adapter]) -> PostText:
    """(platform, chat, text) -> link, through the adapter of that platform's `post`."""
    posts: dict[str, Callable[[str, str], Awaitable[Any]]] = {
        a.platform: a.post for a in adapters if callable(getattr(a, "post", None))  # type: ignore[attr-defined]
    }

    async def post(platform: str, chat: str, text: str) -> str | None:
        if platform not in posts:
            raise LookupError(f"no {platform} adapter that can post is running")
        link = await posts[platform](chat, text)
        return link if isinstance(link, str) else None

    return post


def auto_triage_places(settings: Settings) -> list[Place]:
    t = settings.triage
    return [Place("slack", c) for c in t.slack_channels] + [
        Place("telegram", str(c)) for c in t.telegram_chats
    ]


class TriageService:
    def __init__(self, store: TriageStore, workflow: TriageWorkflow, digest: DigestScheduler | None):
        self.store = store
        self.workflow = workflow
        self.digest = digest

    @classmethod
    def build(
        cls, db: Database, settings: Settings, outbox: EventSink | None, adapters: Sequence[Adapter]
    ) -> TriageService:
        check_targets(settings, adapters)
        t = settings.triage
        store = TriageStore(db, retention_days=settings.retention_days,
                            window_days=t.group_window_days, threshold=t.group_threshold)
        post = chat_poster(adapters)
        workflow = TriageWorkflow(store, rules=t.rules, outbox=outbox, post=post, language=t.language)
        places = auto_triage_places(settings)
        digest = (DigestScheduler(store, places, t.digest_hour, post, language=t.language)
                  if places and t.digest_hour is not None else None)
        return cls(store, workflow, digest)

    def start(self) -> None:
        if self.digest is not None:
            self.digest.start()

    async def stop(self) -> None:
        if self.digest is not None:
            await self.digest.stop()
