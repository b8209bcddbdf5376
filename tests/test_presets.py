"""Presets: schemas, JSON extraction, the repair and failure paths, PII redaction, commands."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from pydantic import BaseModel

from bot import texts
from bot.models import GenerationParams, ImagePart, InputRejected, Message, Role, Turn
from bot.presets import (
    PRESETS,
    PresetFailed,
    PresetOutputInvalid,
    extract_json,
    generate_preset,
    get_preset,
    parse_preset_command,
    parse_preset_output,
    preset_for_response_format,
    redact,
    render_answer,
    render_text,
    response_format,
    schema_json,
)
from bot.presets.schemas import ExtractResult, InvoiceResult, ReceiptResult, TriageResult, unwrap
from tests.fakes import ScriptedEngine

PNG = ImagePart(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32, "image/png", "shot.png")

GOOD = {
    "describe": '{"summary": "A login form showing an expired-session error.", '
    '"tags": ["Login", "error", "web"]}',
    "ocr": '{"language": "en", "lines": ["Payment failed", "Error 402: Your card was declined."]}',
    "receipt": '{"document_type": "receipt", "merchant": "Cafe Aurora", "date": "2024-03-15", '
    '"items": [{"name": "Espresso", "quantity": 2, "price": 5.0}], "total": "13.97", '
    '"currency": "EUR", "tip": "unknown"}',
    "invoice": '{"document_type": "invoice", "invoice_number": "INV-0042", "seller": "Acme GmbH", '
    '"total": "1.234,50", "currency": "EUR", "due_date": null}',
    "form": '{"document_type": "form", "title": "Sign up", '
    '"fields": [{"label": "Name", "value": "Ada"}, {"label": "Phone", "value": ""}]}',
    "menu": '{"document_type": "menu", "restaurant": "Luigi", "currency": "USD", '
    '"sections": [{"name": "Pizza", "items": [{"name": "Margherita", "price": "$9.50"}]}]}',
    "triage": '{"product_area": "Billing", "error_message": "Your card was declined.", '
    '"error_code": "402", "user_action": "paying an invoice", "severity": "Critical", '
    '"likely_cause": "the bank declined the charge", '
    '"next_step": "Ask the customer to update the card", "personal_data": []}',
}


def test_every_preset_has_a_canned_good_output_that_validates() -> None:
    assert set(PRESETS) == {"describe", "ocr", "extract", "receipt", "invoice", "form", "menu",
                            "triage"}
    for name, raw in GOOD.items():
        model = parse_preset_output(PRESETS[name], raw)
        assert isinstance(model, PRESETS[name].model)
    extracted = parse_preset_output(PRESETS["extract"], GOOD["invoice"])
    assert isinstance(extracted, ExtractResult) and isinstance(unwrap(extracted), InvoiceResult)


def test_schema_values_are_normalised_not_invented() -> None:
    receipt = parse_preset_output(PRESETS["receipt"], GOOD["receipt"])
    assert isinstance(receipt, ReceiptResult)
    assert receipt.total == 13.97 and receipt.tip is None and receipt.address is None
    invoice = parse_preset_output(PRESETS["invoice"], GOOD["invoice"])
    assert isinstance(invoice, InvoiceResult) and invoice.total == 1234.5
    triage = parse_preset_output(PRESETS["triage"], GOOD["triage"])
    assert isinstance(triage, TriageResult) and triage.severity == "blocker"
    describe = parse_preset_output(PRESETS["describe"], GOOD["describe"])
    assert describe.model_dump()["tags"] == ["login", "error", "web"]


@pytest.mark.parametrize(
    ("preset", "raw", "complaint"),
    [
        ("describe", '{"summary": "' + "word " * 30 + '", "tags": []}', "at most 25"),
        ("triage", GOOD["triage"].replace('"Critical"', '"catastrophic"'), "severity"),
        ("receipt", '{"document_type": "receipt", "total": "about a tenner"}', "total"),
        ("receipt", '{"answer": "I cannot read this"}', "none of the expected keys"),
        ("extract", '{"document_type": "passport", "merchant": "x"}', "document_type"),
        ("ocr", '["just", "a", "list"]', "JSON object"),
        ("describe", "It is a cat sitting on a mat.", "no JSON object"),
        ("describe", '{"summary": "A cat", "tags": ["ca', "cut off"),
    ],
)
def test_invalid_answers_are_rejected_with_a_repair_prompt(
    preset: str, raw: str, complaint: str
) -> None:
    with pytest.raises(PresetOutputInvalid) as caught:
        parse_preset_output(PRESETS[preset], raw)
    assert complaint in str(caught.value)
    assert complaint in caught.value.repair_prompt
    assert "only the corrected JSON object" in caught.value.repair_prompt
    assert PRESETS[preset].skeleton in caught.value.repair_prompt


def test_json_is_found_in_fences_prose_and_thinking() -> None:
    wrapped = [
        '```json\n{"a": 1}\n```',
        'Sure! Here is the result:\n{"a": 1}\nHope that helps {really}.',
        '<think>the user wants {json}</think>\n{"a": 1,}',
        "Result: {\u201ca\u201d: 1}",
        'The set {x} is not JSON, but this is: {"a": 1}',
    ]
    for raw in wrapped:
        assert extract_json(raw) == {"a": 1}, raw


def _scripted(*answers: str) -> ScriptedEngine:
    replies = iter(answers)
    return ScriptedEngine(reply=lambda history, message: next(replies))


async def test_good_answer_is_accepted_first_time() -> None:
    engine = _scripted(GOOD["receipt"])
    result = await generate_preset(engine, [], Message.of("", PNG), GenerationParams(),
                                   PRESETS["receipt"], user_text="what did I pay?")
    assert not result.repaired and len(engine.calls) == 1
    prompt = engine.calls[0].message
    assert prompt.images == (PNG,) and "what did I pay?" in prompt.text and "null" in prompt.text
    assert engine.calls[0].params.max_new_tokens >= PRESETS["receipt"].max_new_tokens
    assert json.loads(result.json())["merchant"] == "Cafe Aurora"


async def test_one_repair_turn_fixes_an_invalid_answer() -> None:
    engine = _scripted("The receipt is from Cafe Aurora, total 13.97 EUR.", GOOD["receipt"])
    result = await generate_preset(engine, [], Message.of("", PNG), GenerationParams(),
                                   PRESETS["receipt"])
    assert result.repaired and len(engine.calls) == 2
    repair = engine.calls[1]
    assert "not valid" in repair.message.text and not repair.message.images
    # the repair turn sees the image and its own first answer in the history
    assert [t.role for t in repair.history] == [Role.USER, Role.ASSISTANT]
    assert repair.history[0].images == (PNG,)
    assert "Cafe Aurora, total" in repair.history[1].text
    assert render_text(result.data).splitlines()[0] == "Merchant: Cafe Aurora"
    chat = render_answer(result, "en")
    assert chat.startswith("Merchant: Cafe Aurora\n") and "```json\n{" in chat
    assert json.loads(render_answer(result, json_only=True))["total"] == 13.97


async def test_second_invalid_answer_fails_clearly() -> None:
    engine = _scripted('{"summary": "half', "still not JSON")
    with pytest.raises(PresetFailed) as caught:
        await generate_preset(engine, [], Message.of("", PNG), GenerationParams(),
                              PRESETS["describe"])
    assert len(engine.calls) == 2
    failure = caught.value
    assert isinstance(failure, InputRejected)  # the runner reports it as Failed(code), no retries
    message = texts.text(failure.code, "en", ref="r1", **failure.params)
    assert "describe format" in message and "r1" in message
    assert "describe" in texts.text(failure.code, "zh", ref="r1", **failure.params)


async def test_ocr_engine_only_serves_the_ocr_preset() -> None:
    class OcrLike(ScriptedEngine):
        @property
        def info(self):  # type: ignore[no-untyped-def]
            from bot.engine_port import EngineInfo

            return EngineInfo(name="ocr", model="ocr")

    engine = OcrLike(reply=lambda h, m: GOOD["ocr"])
    with pytest.raises(PresetFailed) as caught:
        await generate_preset(engine, [], Message.of("", PNG), GenerationParams(),
                              PRESETS["triage"])
    assert caught.value.code == "preset_needs_vlm" and not engine.calls
    result = await generate_preset(engine, [], Message.of("", PNG), GenerationParams(),
                                   PRESETS["ocr"])
    assert "[vlbot:ocr-json]" in engine.calls[0].message.text
    assert render_text(result.data) == "Payment failed\nError 402: Your card was declined."


async def test_triage_output_is_redacted() -> None:
    leaky = json.loads(GOOD["triage"])
    leaky["error_message"] = "Card 4111 1111 1111 1111 declined for jane.roe@example.org"
    leaky["next_step"] = "Call the customer on +44 20 7946 0958"
    engine = _scripted(json.dumps(leaky))
    history: Sequence[Turn] = []
    result = await generate_preset(engine, history, Message.of("", PNG), GenerationParams(),
                                   PRESETS["triage"])
    shown = render_text(result.data) + result.json()
    for secret in ("4111 1111 1111 1111", "jane.roe", "7946"):
        assert secret not in shown
    assert "[card ••••1111]" in shown and "[email]" in shown and "[phone]" in shown
    data = result.as_dict()
    assert sorted(data["personal_data"]) == ["card", "email", "phone"]
    assert result.redacted == {"card", "email", "phone"}


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("write to ops+alerts@mail.example.co.uk today", {"email"}),
        ("card 4242-4242-4242-4242 on file", {"card"}),
        ("call (415) 555-2671 or +49 30 1234567", {"phone"}),
        ("手机 138 0013 8000", {"phone"}),
        ("phone: 4155552671", {"phone"}),
        # not personal data: failing Luhn, dates, times, IPs, codes, amounts, ids
        ("card 4242 4242 4242 4241", set()),
        ("on 2024-01-15 12:30:45 from 192.168.100.200", set()),
        ("error 0x80070005, HTTP 502, build 1.2.3.4567, order 123456789", set()),
        ("total 1,234.56 EUR for 10 000 000 users, ticket #48213", set()),
    ],
)
def test_redaction_finds_personal_data_and_leaves_the_rest(text: str, kinds: set[str]) -> None:
    cleaned, found = redact(text)
    assert found == kinds
    if not kinds:
        assert cleaned == text


@pytest.mark.parametrize(
    ("text", "bare", "preset", "rest"),
    [
        ("/triage what is wrong?", False, "triage", "what is wrong?"),
        ("/triage@vlbot_bot what is wrong?", False, "triage", "what is wrong?"),
        ("triage: what is wrong?", False, "triage", "what is wrong?"),
        ("Triage：为什么", False, "triage", "为什么"),
        ("[ocr] please", False, "ocr", "please"),
        ("/OCR", False, "ocr", ""),
        ("/extract receipt what did I pay?", False, "receipt", "what did I pay?"),
        ("/extract the total", False, "extract", "the total"),
        ("/summary", False, "describe", ""),
        ("收据：合计多少", False, "receipt", "合计多少"),
        ("triage why does it fail", True, "triage", "why does it fail"),
        # not preset commands
        ("triage why does it fail", False, None, None),
        ("Text: what does it say?", False, None, None),
        ("/reset", False, None, None),
        ("What does the receipt say?", False, None, None),
        ("", False, None, None),
    ],
)
def test_preset_commands(text: str, bare: bool, preset: str | None, rest: str | None) -> None:
    found, remainder = parse_preset_command(text, bare=bare)
    assert (found.name if found else None) == preset
    assert remainder == (rest if preset else text)


def test_schemas_for_the_http_api() -> None:
    for name, preset in PRESETS.items():
        schema = schema_json(preset)
        assert schema.get("properties") or schema.get("oneOf"), name
        rf = response_format(preset)
        assert rf["type"] == "json_schema"
        assert preset_for_response_format(rf) is preset
        same_schema = {"type": "json_schema", "json_schema": {"name": "mine", "schema": schema}}
        assert preset_for_response_format(same_schema) is preset
    triage = schema_json(PRESETS["triage"])
    assert triage["properties"]["severity"]["enum"] == ["blocker", "major", "minor"]
    assert set(triage["required"]) == {"severity", "next_step"}
    assert preset_for_response_format({"type": "json_object"}) is None
    unknown = {"type": "json_schema", "json_schema": {"name": "other", "schema": {"type": "object"}}}
    assert preset_for_response_format(unknown) is None
    assert get_preset("extract:invoice") is PRESETS["invoice"]


def test_prompts_name_every_schema_field() -> None:
    for name, preset in PRESETS.items():
        members: list[type[BaseModel]] = (
            [preset.model] if name != "extract" else [ReceiptResult, InvoiceResult]
        )
        for model in members:
            for field_name in model.model_fields:
                assert f'"{field_name}"' in preset.skeleton, (name, field_name)
    assert "Chinese" in PRESETS["triage"].prompt("", "zh-CN")
    assert "Chinese" not in PRESETS["triage"].prompt("", "en")


def test_rendering_is_short_and_localised() -> None:
    triage = parse_preset_output(PRESETS["triage"], GOOD["triage"])
    en = render_text(triage, "en")
    assert en.splitlines()[0] == "Severity: blocker"
    assert "Next step: Ask the customer to update the card" in en
    assert render_text(triage, "zh").splitlines()[0] == "严重程度: 阻断"
    menu = render_text(parse_preset_output(PRESETS["menu"], GOOD["menu"]))
    assert menu.splitlines() == ["Luigi", "Pizza:", "• Margherita — 9.50 USD"]
    form = render_text(parse_preset_output(PRESETS["form"], GOOD["form"]))
    assert form.splitlines() == ["Sign up", "• Name: Ada", "• Phone: —"]
    describe = render_text(parse_preset_output(PRESETS["describe"], GOOD["describe"]))
    assert describe.endswith("#login #error #web")
    empty = parse_preset_output(PRESETS["receipt"], '{"document_type": "receipt", "total": null}')
    assert render_text(empty) == "Nothing found."
