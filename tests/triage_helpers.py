"""Shared pieces of the auto-triage end-to-end tests (tests/test_slack_triage.py,
tests/test_telegram_triage.py): a scripted engine that answers the triage preset's JSON for each
screenshot, as the model would for a support screenshot."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.models import Message, Turn
from tests.fakes import ScriptedEngine


def triage_json(severity: str, area: str, error: str, code: str | None = None) -> dict[str, Any]:
    return {"product_area": area, "error_message": error, "error_code": code,
            "user_action": "paying for the order", "severity": severity,
            "likely_cause": "the payment provider refused the charge",
            "next_step": "Ask the customer to retry with another card", "personal_data": []}


@dataclass
class TriageScript:
    """The triage JSON per screenshot (by SHA-256 of its bytes); `seen` lists the screenshots
    the engine was asked about, in order."""

    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)

    def add(self, image: bytes, answer: dict[str, Any]) -> None:
        self.answers[hashlib.sha256(image).hexdigest()] = answer

    def __call__(self, history: Sequence[Turn], message: Message) -> str:
        assert message.images, "a triage is asked about the screenshot of its own message"
        sha = message.images[-1].sha256
        self.seen.append(sha)
        return json.dumps(self.answers[sha])

    def engine(self) -> ScriptedEngine:
        return ScriptedEngine(reply=self, delay_s=0.005)

