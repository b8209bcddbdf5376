"""What the runner lets other parts of the core take part in, narrowly: admitting a message
(quotas), a preset's structured result before it is delivered (triage grouping and routing), and
each job's outcome once it is settled (the usage ledger).

The runner calls these; they never call the runner. A hook that raises is logged and ignored,
except `Admission.admit`, whose InputRejected refuses the message (nothing is queued).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from bot.adapter import Incoming
from bot.models import ConversationId, Job, User

OutcomeStatus = Literal["answered", "failed", "cancelled", "rejected"]


@dataclass(frozen=True)
class JobOutcome:
    """One settled job, or one message refused before it became a job (status "rejected")."""

    conversation: ConversationId
    user: User
    origin: Mapping[str, Any]  # the adapter's reply context (api key id, channel, preset, ...)
    status: OutcomeStatus
    images: int
    job_id: str | None = None  # None: rejected before a job was written
    reason: str | None = None  # failed/cancelled/rejected: the texts.py code (quota_images, ...)
    engine_s: float = 0.0  # time the engine spent generating this job (all attempts)
    first_token_s: float | None = None  # from the start of generation to the first piece
    prompt_tokens: int | None = None  # as the engine counted them (None: it does not count)
    completion_tokens: int | None = None
    visual_tokens: int | None = None
    finished_at: float = field(default_factory=time.time)

    @classmethod
    def rejected(cls, incoming: Incoming, reason: str) -> JobOutcome:
        return cls(
            conversation=incoming.conversation,
            user=incoming.user,
            origin=dict(incoming.origin),
            status="rejected",
            images=len(incoming.message.images),
            reason=reason,
        )


class Admission(Protocol):
    async def admit(self, incoming: Incoming) -> None:
        """Raise bot.models.InputRejected (code + params for the user's text) to refuse the
        message before anything is queued; return to let it in."""


class JobObserver(Protocol):
    async def job_finished(self, outcome: JobOutcome) -> None:
        """Called once per settled job (answered and delivered, failed, cancelled) and once per
        refused message."""


class PresetResultHook(Protocol):
    async def preset_result(
        self, job: Job, preset: str, result: Mapping[str, Any]
    ) -> str | None:
        """A preset's validated JSON result, before the answer is stored and delivered. Return
        text to append to the chat answer (e.g. "seen 4 times since Monday"), or None."""
