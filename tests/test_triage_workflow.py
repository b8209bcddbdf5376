"""The triage workflow through the real Runner: a triage result is recorded, grouped with
repeats (the reply says so), enqueued for the webhooks with group_id and count, and routed by the
rules into other channels; bad rules stop `vlbot serve` with an error naming the rule."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from bot.adapter import Final, Incoming
from bot.cli import main
from bot.models import ConversationId, ImagePart, Message, Turn, User
from bot.outbox import Outbox
from bot.triage.rules import parse_rules
from bot.triage.store import TriageStore
from bot.triage.workflow import TriageWorkflow
from tests.conftest import Stack, make_stack
from tests.fakes import ScriptedEngine
from tests.http_helpers import png

MONDAY = datetime(2026, 12, 7, 9, 14, tzinfo=timezone.utc).timestamp()
DAY = 86400.0
ENDPOINT = "https://hooks.example.test/triage"


def triage_json(message: str | None, severity: str = "major", area: str = "Billing",
                code: str | None = None) -> str:
    return json.dumps({"product_area": area, "error_message": message, "error_code": code,
                       "user_action": "paying", "severity": severity, "likely_cause": None,
                       "next_step": "Ask the customer to retry.", "personal_data": []})


# the engine answers by the case named in the user's question
SCRIPT = {
    "case-declined-1": triage_json("Payment failed for order #48213: card declined (ref 8f7ad9c2e1)"),
    "case-declined-2": triage_json("Payment failed for order #99120: card declined (ref 0b1c2d3e4f)"),
    "case-declined-3": triage_json("Payment failed for order #10007: card declined (ref 77aa88bb99)"),
    "case-funds": triage_json("Payment failed: insufficient funds"),
    "case-outage": triage_json("Service unavailable, error 503", severity="blocker", area="Login"),
    "case-typo": triage_json("Button label misaligned", severity="minor", area="Settings"),
    "case-receipt": '{"document_type": "receipt", "merchant": "Cafe", "total": "4.50"}',
}


def script_reply(history: Sequence[Turn], message: Message) -> str:
    return next(answer for case, answer in SCRIPT.items() if case in message.text)


@dataclass
class RecordingPoster:
    """Stands in for the chat adapters' `post` (they are tested through the fake Slack and
    Telegram servers): records each post and answers with a link."""

    posts: list[tuple[str, str, str]] = field(default_factory=list)
    fail: bool = False

    async def __call__(self, platform: str, chat: str, text: str) -> str | None:
        if self.fail:
            raise ConnectionError("the platform refused the post")
        self.posts.append((platform, chat, text))
        return f"https://{platform}.example/{chat}/{len(self.posts)}"


@dataclass
class Clock:
    now: float = MONDAY

    def __call__(self) -> float:
        return self.now


@dataclass
class Triage:
    stack: Stack
    workflow: TriageWorkflow
    poster: RecordingPoster
    clock: Clock

    async def ask(self, case: str, *, chat: str = "C0SUP", preset: str = "triage",
                  link: str | None = None, lang: str | None = None) -> str:
        origin: dict[str, Any] = {"chat": chat, "preset": preset, "auto_triage": True}
        if link:
            origin["link"] = link
        n = len(self.stack.adapter.finals())
        await self.stack.runner.submit(Incoming(
            conversation=ConversationId("slack", chat, case),
            user=User(platform_id="U42", display_name="Agent Smith", language_code=lang),
            message=Message.of(case, ImagePart(png(), "image/png", "shot.png")),
            origin=origin,
        ))
        finals = await self.stack.adapter.wait_for_finals(n + 1)
        event = finals[n].event
        assert isinstance(event, Final), event
        return event.text

    async def events(self) -> list[dict[str, Any]]:
        rows = await self.stack.db.fetchall(
            "SELECT event_id, event_type, payload FROM outbox ORDER BY created_at, event_id"
        )
        return [{"id": r["event_id"], "type": r["event_type"], **json.loads(r["payload"])}
                for r in rows]


RULES = [
    {"when": {"severity": ["blocker"]}, "post_to": "slack:C0ONCALL"},
    {"when": {"product_area": "billing", "place": "slack:C0SUP"}, "post_to": "telegram:-1009"},
]


@pytest.fixture
async def triage(database_target: Path | str) -> AsyncIterator[Triage]:
    stack = await make_stack(database_target, ScriptedEngine(reply=script_reply))
    poster, clock = RecordingPoster(), Clock()
    workflow = TriageWorkflow(
        TriageStore(stack.db), rules=parse_rules(RULES),
        outbox=Outbox(stack.db, [ENDPOINT], event_types=["triage.result", "preset.result"]),
        post=poster, clock=clock,
    )
    stack.runner.result_hooks.append(workflow)
    stack.runner.attach({"slack": stack.adapter})  # the recording adapter answers "Slack"
    await stack.runner.start()
    yield Triage(stack, workflow, poster, clock)
    await stack.runner.stop(grace_s=1)
    await stack.db.close()


async def test_a_repeat_is_noted_in_the_reply_and_grouped_in_the_webhook(triage: Triage) -> None:
    first_link = "https://acme.slack.com/archives/C0SUP/p1"
    first = await triage.ask("case-declined-1", link=first_link)
    assert "Seen" not in first and "card declined" in first
    triage.clock.now = MONDAY + 2 * DAY  # Wednesday
    await triage.ask("case-funds", link="https://acme.slack.com/archives/C0SUP/p2")
    third = await triage.ask("case-declined-2", link="https://acme.slack.com/archives/C0SUP/p3")
    # the note follows the readable fields, before the JSON block
    assert f"Seen 2 times since Monday, first here: {first_link}\n\n```json\n" in third
    fourth = await triage.ask("case-declined-3", lang="zh-CN")
    assert f"自周一以来已出现 3 次，首次在这里：{first_link}\n\n```json\n" in fourth

    events = await triage.events()
    assert [e["type"] for e in events] == ["triage.result"] * 4
    declined = [e for e in events if "card declined" in e["result"]["error_message"]]
    funds = next(e for e in events if "insufficient" in e["result"]["error_message"])
    assert len({e["group_id"] for e in declined}) == 1
    assert [e["count"] for e in declined] == [1, 2, 3]
    assert funds["group_id"] != declined[0]["group_id"] and funds["count"] == 1
    assert declined[1]["link"] == "https://acme.slack.com/archives/C0SUP/p3"
    assert declined[1]["first_link"] == first_link
    assert declined[1]["place"] == {"platform": "slack", "chat": "C0SUP", "thread": "case-declined-2"}
    assert declined[1]["user"] == {"id": "U42", "name": "Agent Smith"}
    assert declined[1]["result"]["severity"] == "major"
    assert declined[1]["event_time"] == "2026-12-09T09:14:00Z"
    assert len({e["id"] for e in events}) == 4


async def test_rules_route_a_blocker_to_on_call_and_billing_to_its_chat(triage: Triage) -> None:
    link = "https://acme.slack.com/archives/C0SUP/p9"
    await triage.ask("case-outage", link=link)
    await triage.ask("case-typo")
    assert len(triage.poster.posts) == 1
    platform, chat, text = triage.poster.posts[0]
    assert (platform, chat) == ("slack", "C0ONCALL")
    assert "blocker" in text and "Login" in text and "Service unavailable, error 503" in text
    assert link in text

    await triage.ask("case-declined-1", link=link)
    assert triage.poster.posts[-1][:2] == ("telegram", "-1009")
    assert "card declined" in triage.poster.posts[-1][2]
    # the billing rule names one place: billing screenshots from elsewhere stay there
    await triage.ask("case-funds", chat="C0OTHER")
    assert len(triage.poster.posts) == 2


async def test_a_failed_routing_post_costs_the_user_nothing(triage: Triage) -> None:
    triage.poster.fail = True
    await triage.ask("case-outage", link="https://acme.slack.com/archives/C0SUP/p1")
    answer = await triage.ask("case-outage")
    assert "Service unavailable" in answer
    assert ("Seen 2 times since 09:14 UTC, first here: "
            "https://acme.slack.com/archives/C0SUP/p1\n\n```json\n") in answer
    assert [e["count"] for e in await triage.events()] == [1, 2]


async def test_other_presets_are_not_triages(triage: Triage) -> None:
    answer = await triage.ask("case-receipt", preset="receipt")
    assert "Cafe" in answer and "Seen" not in answer
    assert await triage.events() == []  # bot/webhooks.py's preset.result, when subscribed
    assert await triage.workflow.store.between(0, MONDAY + DAY) == []


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ('[{"when": {"severity": ["blocker"]}, "post_to": "slack:C0ONCALL"},'
         ' {"when": {"colour": "red"}, "post_to": "slack:C0RED"}]',
         ['routing rule 2 {"when": {"colour": "red"}', "unknown condition 'colour'"]),
        ('[{"when": {"severity": ["critical"]}, "post_to": "slack:C0ONCALL"}]',
         ["routing rule 1", "unknown severity 'critical'", "blocker, major, minor"]),
        ('[{"when": {"severity": "blocker"}, "post_to": "slack:#on-call"}]',
         ["routing rule 1", "slack:#on-call", "its ID"]),
        ('[{"when": {}, "post_to": "teams:oncall"}]', ["routing rule 1", "unknown platform 'teams'"]),
        ('[{"when": {}, "post_to": "telegram:oncall"}]', ["routing rule 1", "its numeric id"]),
        ('[{"when": {}, "send_to": "slack:C0X"}]', ["routing rule 1", "unknown key 'send_to'"]),
    ],
)
def test_bad_rules_stop_the_start_naming_the_rule(
    rules: str, says: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VLBOT_HTTP__ENABLED", "false")  # with good rules: "no adapter is enabled"
    monkeypatch.setenv("VLBOT_TRIAGE__RULES", rules)
    assert main(["serve", "--engine", "ocr"]) == 2
    error = capsys.readouterr().err
    for words in says:
        assert words in error
    assert not (tmp_path / "data").exists()  # refused before anything started


def test_rules_read_back_as_doctor_shows_them() -> None:
    rules = parse_rules(json.dumps([*RULES, {"post_to": "telegram:-1001"}]))
    assert [str(r) for r in rules] == [
        "severity blocker -> slack:C0ONCALL",
        "product_area billing, place slack:C0SUP -> telegram:-1009",
        "any result -> telegram:-1001",
    ]
