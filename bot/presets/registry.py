"""The presets: name, schema, prompt, and how users ask for them.

A preset turns "ask anything" into a fixed task with a JSON answer validated against a schema:
describe, ocr, extract (any document; or receipt / invoice / form / menu directly) and triage.
Users pick one with a prefix on the caption or message (`/triage what is wrong?`,
`triage: what is wrong?`, `/extract receipt`), Slack users with `/vlbot triage ...`, HTTP clients
with a `preset` field or a response_format json_schema, the CLI with `--preset`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from bot.presets.schemas import (
    DescribeResult,
    ExtractResult,
    FormResult,
    InvoiceResult,
    MenuResult,
    OcrResultModel,
    ReceiptResult,
    TriageResult,
)
from bot.texts import language_of

RULES = (
    "Answer with ONE JSON object and nothing else: no prose, no code fence. Copy text exactly as "
    "it appears in the image. Use null for anything the image does not show; never guess or "
    "invent values."
)


@dataclass(frozen=True)
class Preset:
    name: str
    model: type[BaseModel]
    task: str = field(repr=False)  # what to do, one paragraph
    skeleton: str = field(repr=False)  # the JSON shape, shown to the model
    max_new_tokens: int = 512
    family: str = ""  # "extract" for the document types
    redact: bool = False  # personal data is redacted from the result
    aliases: tuple[str, ...] = ()

    def prompt(self, user_text: str = "", language_code: str | None = None) -> str:
        """The instruction the model gets; the user's own words are passed on as a note."""
        parts = [self.task, f"JSON shape:\n{self.skeleton}", RULES]
        if language_of(language_code) == "zh" and self.name in ("describe", "triage"):
            parts.append("Write the free-text values (summary, tags, cause, next step) in Chinese.")
        if user_text.strip():
            parts.append(f"The user adds: {user_text.strip()}")
        return "\n\n".join(parts)


_DOC_SKELETON = {
    "receipt": (
        '{"document_type": "receipt", "merchant": str|null, "address": str|null, '
        '"date": "YYYY-MM-DD"|null, "time": str|null, "items": [{"name": str, '
        '"quantity": number|null, "unit_price": number|null, "price": number|null}], '
        '"subtotal": number|null, "tax": number|null, "tip": number|null, "total": number|null, '
        '"currency": "ISO 4217 code"|null, "payment_method": str|null}'
    ),
    "invoice": (
        '{"document_type": "invoice", "invoice_number": str|null, "seller": str|null, '
        '"buyer": str|null, "issue_date": "YYYY-MM-DD"|null, "due_date": "YYYY-MM-DD"|null, '
        '"items": [{"name": str, "quantity": number|null, "unit_price": number|null, '
        '"price": number|null}], "subtotal": number|null, "tax": number|null, '
        '"total": number|null, "currency": "ISO 4217 code"|null, "payment_terms": str|null}'
    ),
    "form": (
        '{"document_type": "form", "title": str|null, '
        '"fields": [{"label": str, "value": str|null}]}'
    ),
    "menu": (
        '{"document_type": "menu", "restaurant": str|null, "currency": "ISO 4217 code"|null, '
        '"sections": [{"name": str|null, "items": [{"name": str, "price": number|null, '
        '"description": str|null}]}]}'
    ),
}
_DOC_MODELS: dict[str, type[BaseModel]] = {
    "receipt": ReceiptResult,
    "invoice": InvoiceResult,
    "form": FormResult,
    "menu": MenuResult,
}
_DOC_ALIASES = {
    "receipt": ("小票", "收据"),
    "invoice": ("bill", "发票"),
    "form": ("表单", "表格"),
    "menu": ("菜单",),
}


def _document_preset(kind: str) -> Preset:
    return Preset(
        name=kind,
        model=_DOC_MODELS[kind],
        task=(
            f"Read the {kind} in the image and extract its fields. Amounts are numbers without "
            "currency symbols; put the currency in `currency`."
        ),
        skeleton=_DOC_SKELETON[kind],
        max_new_tokens=1024,
        family="extract",
        aliases=_DOC_ALIASES[kind],
    )


PRESETS: dict[str, Preset] = {
    "describe": Preset(
        name="describe",
        model=DescribeResult,
        task="Summarise the image in one sentence of at most 25 words, and give 1 to 8 tags.",
        skeleton='{"summary": str, "tags": [str]}',
        max_new_tokens=160,
        aliases=("summary", "summarize", "summarise", "描述", "总结"),
    ),
    "ocr": Preset(
        name="ocr",
        model=OcrResultModel,
        task=(
            "Transcribe all text in the image in reading order, one entry per line, and name the "
            "main language (ISO 639-1 code)."
        ),
        skeleton='{"language": "en"|"zh"|...|"unknown", "lines": [str]}',
        max_new_tokens=1024,
        aliases=("text", "read", "文字", "识别文字", "文字识别"),
    ),
    "extract": Preset(
        name="extract",
        model=ExtractResult,
        task=(
            "Decide whether the image shows a receipt, an invoice, a form or a menu, and extract "
            "its fields with the matching shape below. Amounts are numbers without currency "
            "symbols; put the currency in `currency`."
        ),
        skeleton="\n".join(f"{kind}: {shape}" for kind, shape in _DOC_SKELETON.items()),
        max_new_tokens=1024,
        family="extract",
        aliases=("fields", "提取"),
    ),
    **{kind: _document_preset(kind) for kind in _DOC_MODELS},
    "triage": Preset(
        name="triage",
        model=TriageResult,
        task=(
            "This is a customer's screenshot of a problem in an app. For a support agent, report: "
            "the app or product area; the error message copied verbatim; the error code if any; "
            "what the user was trying to do; the severity (blocker: the user cannot continue; "
            "major: a main feature fails; minor: cosmetic or a workaround exists); the likely "
            "cause; a suggested next step for support; and which kinds of personal data are "
            "visible (email, card, phone)."
        ),
        skeleton=(
            '{"product_area": str|null, "error_message": str|null, "error_code": str|null, '
            '"user_action": str|null, "severity": "blocker"|"major"|"minor", '
            '"likely_cause": str|null, "next_step": str, '
            '"personal_data": ["email"|"card"|"phone"]}'
        ),
        max_new_tokens=400,
        redact=True,
        aliases=("support", "bug", "分诊", "报错"),
    ),
}

_BY_WORD: dict[str, str] = {
    word.lower(): preset.name for preset in PRESETS.values() for word in (preset.name, *preset.aliases)
}


def get_preset(name: str) -> Preset | None:
    """A preset by name or alias (case-insensitive); "extract receipt" / "extract:receipt" work."""
    words = re.split(r"[\s:./_-]+", name.strip().lower())
    if len(words) == 2 and _BY_WORD.get(words[0]) == "extract" and words[1] in _BY_WORD:
        found = PRESETS[_BY_WORD[words[1]]]
        return found if found.family == "extract" else None
    key = _BY_WORD.get(name.strip().lower())
    return PRESETS[key] if key else None


# `/triage rest`, `/triage@my_bot rest`, `triage: rest`, `triage：rest`, `[triage] rest`
_COMMAND = re.compile(r"^\s*/([^\s/@:：]+)(?:@\w+)?(?:\s+|$)(.*)$", re.S)
_LABEL = re.compile(r"^\s*\[?([^\s:：\]]+)\]?\s*[:：]\s*(.*)$", re.S)
_BRACKET = re.compile(r"^\s*\[([^\s\]]+)\]\s*(.*)$", re.S)


def parse_preset_command(text: str | None, *, bare: bool = False) -> tuple[Preset | None, str]:
    """(the preset a message asks for, the rest of its text); (None, text) if it asks for none.

    Recognised: `/triage what is wrong?`, `/triage@vlbot_bot ...`, `triage: ...`, `[triage] ...`,
    aliases (`/summary`, `/收据`), and `/extract receipt ...` for a document type. With
    `bare=True` (Slack's `/vlbot triage ...`, whose text has no prefix) a first word that names a
    preset counts too.
    """
    if not text:
        return None, text or ""
    strict = True  # a label or a bare word must be a preset's name (or a non-English alias)
    for pattern in (_COMMAND, _BRACKET, _LABEL):
        match = pattern.match(text)
        if match:
            word, rest = match.group(1), match.group(2)
            strict = pattern is not _COMMAND
            break
    else:
        if not bare:
            return None, text
        word, _, rest = text.strip().partition(" ")
    preset = get_preset(word)
    if preset is None or (strict and word.lower() != preset.name and word.isascii()):
        return None, text
    rest = rest.strip()
    if preset.name == "extract":  # `/extract receipt ...` picks the document type
        first, _, after = rest.partition(" ")
        kind = get_preset(first) if first else None
        if kind is not None and kind.family == "extract":
            return kind, after.strip()
    return preset, rest


def preset_names() -> list[str]:
    return list(PRESETS)


def schema_json(preset: Preset) -> dict[str, Any]:
    """The JSON Schema of the preset's result (for response_format json_schema)."""
    return preset.model.model_json_schema()


def response_format(preset: Preset) -> dict[str, Any]:
    """An OpenAI-style response_format for the preset: {"type": "json_schema", "json_schema": ...}."""
    return {
        "type": "json_schema",
        "json_schema": {"name": f"vlbot_{preset.name}", "schema": schema_json(preset)},
    }


def preset_for_response_format(value: Any) -> Preset | None:
    """The preset a request's response_format names ({"type": "json_schema", "json_schema":
    {"name": "vlbot_receipt" | "receipt", ...}}), or whose schema it repeats; else None."""
    if not isinstance(value, dict) or value.get("type") != "json_schema":
        return None
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        return None
    name = spec.get("name")
    if isinstance(name, str):
        preset = get_preset(name.removeprefix("vlbot_"))
        if preset is not None:
            return preset
    schema = spec.get("schema")
    if isinstance(schema, dict):
        canonical = json.dumps(schema, sort_keys=True)
        for preset in PRESETS.values():
            if json.dumps(schema_json(preset), sort_keys=True) == canonical:
                return preset
    return None
