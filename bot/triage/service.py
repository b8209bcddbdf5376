"""The triage workflow's parts as the composition root (bot/app.py) builds and runs them: the
store, the runner's result hook and the digest scheduler, posting through the chat adapters
(bot.adapter.Posters). Routing targets are checked against the platforms that can post here."""

from __future__ import annotations

from collections.abc import Sequence

from bot.adapter import Adapter, Poster, Posters
from bot.db import Database
from bot.settings import Settings
from bot.triage.digest import DigestScheduler
from bot.triage.places import AutoTriagePlaces
from bot.triage.store import TriageStore
from bot.triage.workflow import EventSink, TriageWorkflow

PLATFORM_SETTING = {"slack": "VLBOT_SLACK__BOT_TOKEN", "telegram": "VLBOT_TELEGRAM__TOKEN"}


class TriageConfigError(Exception):
    """The triage settings cannot work with the configured platforms; the message names why."""


def check_targets(settings: Settings, adapters: Sequence[Adapter]) -> None:
    """Every routing rule posts into a platform that runs here, and can post."""
    can_post = {a.platform for a in adapters if isinstance(a, Poster)}
    for number, rule in enumerate(settings.triage.rules, start=1):
        platform = rule.post_to.platform
        if platform not in can_post:
            raise TriageConfigError(
                f"routing rule {number} posts to {rule.post_to}, but {platform.capitalize()} is "
                f"not configured (set {PLATFORM_SETTING[platform]}) — see VLBOT_TRIAGE__RULES"
            )


class TriageService:
    def __init__(self, store: TriageStore, workflow: TriageWorkflow, digest: DigestScheduler | None):
        self.store = store
        self.workflow = workflow
        self.digest = digest

    @classmethod
    def build(
        cls, db: Database, settings: Settings, outbox: EventSink | None, adapters: Sequence[Adapter],
        places: AutoTriagePlaces,
    ) -> TriageService:
        check_targets(settings, adapters)
        t = settings.triage
        store = TriageStore(db, retention_days=settings.retention_days,
                            window_days=t.group_window_days, threshold=t.group_threshold)
        post = Posters(adapters)
        workflow = TriageWorkflow(store, rules=t.rules, outbox=outbox, post=post, language=t.language)
        # the places are listed at each pass: an admin may turn one on at any time
        digest = (DigestScheduler(store, places.all, t.digest_hour, post, language=t.language)
                  if t.digest_hour is not None else None)
        return cls(store, workflow, digest)

    def start(self) -> None:
        if self.digest is not None:
            self.digest.start()

    async def stop(self) -> None:
        if self.digest is not None:
            await self.digest.stop()
