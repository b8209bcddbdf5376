"""Results for people: a short list per preset, labels from the text catalogue (en/zh).

Values the image did not show (null) are left out; item lists become one line per item
("2 × Coffee — 7.00"). Plain text: each adapter adds its own markup. The JSON stays available
through `PresetResult.json()`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bot import texts
from bot.presets.parsing import PresetResult
from bot.presets.schemas import (
    DescribeResult,
    FormResult,
    InvoiceResult,
    LineItem,
    MenuResult,
    OcrResultModel,
    ReceiptResult,
    TriageResult,
    unwrap,
)

_MAX_ITEMS = 30  # a chat message stays short; the JSON has all


def _label(name: str, lang: str | None) -> str:
    key = f"pf_{name}"
    if key in texts.CATALOGUE["en"]:
        return texts.text(key, lang)
    return name.replace("_", " ").capitalize()


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.2f}"


def _money(value: float | None, currency: str | None = None) -> str:
    if value is None:
        return ""
    text = f"{value:,.2f}"
    return f"{text} {currency}" if currency else text


def _pairs(model: BaseModel, names: list[str], lang: str | None) -> list[str]:
    out = []
    for name in names:
        value = getattr(model, name)
        if value is None or value == []:
            continue
        out.append(f"{_label(name, lang)}: {value}")
    return out


def _items(items: list[LineItem], currency: str | None) -> list[str]:
    out = []
    for item in items[:_MAX_ITEMS]:
        amount = item.price if item.price is not None else item.unit_price
        quantity = f"{_number(item.quantity)} × " if item.quantity not in (None, 1) else ""
        price = f" — {_money(amount, None)}" if amount is not None else ""
        out.append(f"• {quantity}{item.name}{price}")
    if len(items) > _MAX_ITEMS:
        out.append(f"• … (+{len(items) - _MAX_ITEMS})")
    return out


def _totals(model: ReceiptResult | InvoiceResult, lang: str | None) -> list[str]:
    names = ["subtotal", "tax", "tip", "total"] if isinstance(model, ReceiptResult) else [
        "subtotal", "tax", "total"]
    out = []
    for name in names:
        value = getattr(model, name)
        if value is not None:
            out.append(f"{_label(name, lang)}: {_money(value, model.currency)}")
    return out


def _receipt(model: ReceiptResult, lang: str | None) -> list[str]:
    lines = _pairs(model, ["merchant", "address", "date", "time"], lang)
    lines += _items(model.items, model.currency)
    lines += _totals(model, lang)
    return lines + _pairs(model, ["payment_method"], lang)


def _invoice(model: InvoiceResult, lang: str | None) -> list[str]:
    lines = _pairs(model, ["invoice_number", "seller", "buyer", "issue_date", "due_date"], lang)
    lines += _items(model.items, model.currency)
    lines += _totals(model, lang)
    return lines + _pairs(model, ["payment_terms"], lang)


def _form(model: FormResult, lang: str | None) -> list[str]:
    lines = [model.title] if model.title else []
    for entry in model.fields[:_MAX_ITEMS]:
        lines.append(f"• {entry.label}: {entry.value if entry.value is not None else '—'}")
    return lines


def _menu(model: MenuResult, lang: str | None) -> list[str]:
    lines = [model.restaurant] if model.restaurant else []
    shown = 0
    for section in model.sections:
        if section.name:
            lines.append(f"{section.name}:")
        for item in section.items:
            if shown >= _MAX_ITEMS:
                break
            shown += 1
            price = f" — {_money(item.price, model.currency)}" if item.price is not None else ""
            lines.append(f"• {item.name}{price}")
    return lines


def _triage(model: TriageResult, lang: str | None) -> list[str]:
    lines = [f"{_label('severity', lang)}: {_label('severity_' + model.severity, lang)}"]
    lines += _pairs(model, ["product_area", "error_message", "error_code", "user_action",
                            "likely_cause", "next_step"], lang)
    if model.personal_data:
        kinds = ", ".join(_label("pii_" + kind, lang) for kind in model.personal_data)
        lines.append(f"{_label('personal_data', lang)}: {kinds} ({texts.text('pf_redacted', lang)})")
    return lines


def _describe(model: DescribeResult, lang: str | None) -> list[str]:
    lines = [model.summary]
    if model.tags:
        lines.append(" ".join("#" + tag.replace(" ", "_") for tag in model.tags))
    return lines


def _ocr(model: OcrResultModel, lang: str | None) -> list[str]:
    return [line.text for line in model.lines]


_RENDERERS: dict[type[BaseModel], Any] = {
    DescribeResult: _describe,
    OcrResultModel: _ocr,
    ReceiptResult: _receipt,
    InvoiceResult: _invoice,
    FormResult: _form,
    MenuResult: _menu,
    TriageResult: _triage,
}


def render_text(model: BaseModel, language_code: str | None = None) -> str:
    """A short, readable rendering of a preset result for a chat message."""
    document = unwrap(model)
    renderer = _RENDERERS.get(type(document))
    if renderer is None:
        return document.model_dump_json(indent=2)
    lines: list[str] = renderer(document, language_code)
    return "\n".join(lines) if lines else texts.text("pf_nothing_found", language_code)


def render_answer(result: PresetResult, language_code: str | None = None, *,
                  json_only: bool = False, note: str = "") -> str:
    """The answer a job stores and delivers: for chats the readable list, any `note` (e.g. a
    triage's "seen 4 times"), then the JSON in a fenced block (the raw JSON stays available);
    `json_only` for API clients that asked for a response_format (no note)."""
    if json_only:
        return result.json(indent=None)
    readable = render_text(result.data, language_code) + (f"\n\n{note}" if note else "")
    return f"{readable}\n\n```json\n{result.json()}\n```"
