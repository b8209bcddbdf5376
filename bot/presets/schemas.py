"""The presets' result schemas (pydantic): what a model's JSON answer must look like.

Conventions every schema follows:
- A value the image does not show is null. The model may also write "unknown", "n/a", "" or "-"
  (it often does); these become null. Nothing is invented: the prompts say so, and there is no
  default that looks like data.
- Amounts are numbers; "$1,234.50", "12,50 €" and "1.234,50" are read as numbers, the currency
  goes into `currency`.
- Extra keys the model adds are ignored (not an error); wrong types are errors (then repaired).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, field_validator

_UNKNOWN = frozenset({"", "-", "—", "?", "unknown", "n/a", "na", "none", "null", "not visible",
                      "not shown", "unclear", "未知", "无"})


def _unknown_to_none(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in _UNKNOWN:
        return None
    return value


_AMOUNT = re.compile(r"[-+]?\d[\d.,' \u00a0]*")


def parse_amount(value: Any) -> Any:
    """'$1,234.50' → 1234.5, '12,50 €' → 12.5, '1.234,50' → 1234.5; other values unchanged."""
    value = _unknown_to_none(value)
    if not isinstance(value, str):
        return value
    match = _AMOUNT.search(value.replace("−", "-"))
    if match is None:
        return value  # left for the float validator to reject
    number = re.sub(r"[' \u00a0]", "", match.group()).rstrip(".,")
    if "," in number and "." in number:  # the later separator is the decimal one
        decimal = "," if number.rfind(",") > number.rfind(".") else "."
        number = number.replace("." if decimal == "," else ",", "").replace(",", ".")
    elif "," in number:  # 12,50 → decimal comma; 1,234 / 1,234,567 → thousands
        head, _, tail = number.rpartition(",")
        number = number.replace(",", "") if len(tail) == 3 else f"{head.replace(',', '')}.{tail}"
    elif number.count(".") > 1:  # 1.234.567 → thousands
        number = number.replace(".", "")
    return number


Text = Annotated[str | None, BeforeValidator(_unknown_to_none)]
Amount = Annotated[float | None, BeforeValidator(parse_amount)]


class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


# --- describe ------------------------------------------------------------------------------------


class DescribeResult(Schema):
    """A one-line summary (at most 25 words) and a few tags."""

    summary: str = Field(min_length=1, description="one sentence, at most 25 words")
    tags: list[str] = Field(default_factory=list, max_length=12, description="1-8 short tags")

    @field_validator("summary")
    @classmethod
    def _short(cls, value: str) -> str:
        words = len(value.split())
        cjk = len(re.findall(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]", value))
        if words > 25 or cjk > 60:
            raise ValueError(f"the summary has {words} words; at most 25 are allowed")
        return value

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [t for t in re.split(r"[,;#]", value)]
        if isinstance(value, list):
            seen: list[str] = []
            for tag in value:
                if isinstance(tag, str) and tag.strip() and tag.strip().lower() not in seen:
                    seen.append(tag.strip().lower())
            return seen
        return value


# --- ocr -----------------------------------------------------------------------------------------


class OcrLineModel(Schema):
    text: str
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    box: list[list[int]] | None = Field(default=None, description="corner points [[x, y], ...]")


def _line_objects(value: Any) -> Any:
    if isinstance(value, str):
        value = value.splitlines()
    if isinstance(value, list):
        return [{"text": item} if isinstance(item, str) else item for item in value]
    return value


class OcrResultModel(Schema):
    """All text in reading order (one entry per line) and its language."""

    language: str = Field(description="ISO 639-1 code of the main language, or 'unknown'")
    lines: Annotated[list[OcrLineModel], BeforeValidator(_line_objects)]

    @field_validator("language", mode="before")
    @classmethod
    def _language(cls, value: Any) -> Any:
        value = _unknown_to_none(value)
        return "unknown" if value is None else value

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)


# --- extract -------------------------------------------------------------------------------------


class LineItem(Schema):
    name: str
    quantity: Amount = None
    unit_price: Amount = None
    price: Amount = Field(default=None, description="the line's total as printed")


class ReceiptResult(Schema):
    document_type: Literal["receipt"] = "receipt"
    merchant: Text = None
    address: Text = None
    date: Text = Field(default=None, description="YYYY-MM-DD when readable, else as printed")
    time: Text = None
    items: list[LineItem] = Field(default_factory=list)
    subtotal: Amount = None
    tax: Amount = None
    tip: Amount = None
    total: Amount = None
    currency: Text = Field(default=None, description="ISO 4217 code (EUR, USD, CNY) if known")
    payment_method: Text = None


class InvoiceResult(Schema):
    document_type: Literal["invoice"] = "invoice"
    invoice_number: Text = None
    seller: Text = None
    buyer: Text = None
    issue_date: Text = None
    due_date: Text = None
    items: list[LineItem] = Field(default_factory=list)
    subtotal: Amount = None
    tax: Amount = None
    total: Amount = None
    currency: Text = None
    payment_terms: Text = None


class FormField(Schema):
    label: str
    value: Text = None


class FormResult(Schema):
    document_type: Literal["form"] = "form"
    title: Text = None
    fields: list[FormField] = Field(default_factory=list)


class MenuItem(Schema):
    name: str
    price: Amount = None
    description: Text = None


class MenuSection(Schema):
    name: Text = None
    items: list[MenuItem] = Field(default_factory=list)


class MenuResult(Schema):
    document_type: Literal["menu"] = "menu"
    restaurant: Text = None
    currency: Text = None
    sections: list[MenuSection] = Field(default_factory=list)


def _document_type(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("document_type"), str):
        value = {**value, "document_type": value["document_type"].strip().lower()}
    return value


Document = Annotated[
    ReceiptResult | InvoiceResult | FormResult | MenuResult,
    Field(discriminator="document_type"),
]


DOCUMENT_MODELS: tuple[type[Schema], ...] = (ReceiptResult, InvoiceResult, FormResult, MenuResult)


class ExtractResult(RootModel[Annotated[Document, BeforeValidator(_document_type)]]):
    """Any of the four document types, told apart by `document_type`."""


def unwrap(model: BaseModel) -> BaseModel:
    """The document inside an ExtractResult; any other result unchanged."""
    root = getattr(model, "root", None) if isinstance(model, RootModel) else None
    return root if isinstance(root, BaseModel) else model


# --- triage --------------------------------------------------------------------------------------

_SEVERITY_WORDS = {
    "blocker": "blocker", "critical": "blocker", "urgent": "blocker", "high": "major",
    "major": "major", "medium": "major", "moderate": "major", "minor": "minor", "low": "minor",
    "trivial": "minor",
}
PiiKind = Literal["email", "card", "phone"]


def _severity(value: Any) -> Any:
    if isinstance(value, str):
        return _SEVERITY_WORDS.get(value.strip().lower(), value)
    return value


def _pii_kinds(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        kinds: list[str] = []
        for item in value:
            word = str(item).strip().lower()
            kind = ("email" if "mail" in word else "card" if "card" in word or "credit" in word
                    else "phone" if "phone" in word or "tel" in word or "mobile" in word else None)
            if kind and kind not in kinds:
                kinds.append(kind)
        return kinds
    return value


class TriageResult(Schema):
    """A customer's error screenshot, summarised for a support agent."""

    product_area: Text = Field(default=None, description="the app, page or product area")
    error_message: Text = Field(default=None, description="the error message, verbatim")
    error_code: Text = None
    user_action: Text = Field(default=None, description="what the user was trying to do")
    severity: Annotated[Literal["blocker", "major", "minor"], BeforeValidator(_severity)]
    likely_cause: Text = None
    next_step: str = Field(min_length=1, description="a suggested next step for support")
    personal_data: Annotated[list[PiiKind], BeforeValidator(_pii_kinds)] = Field(
        default_factory=list, description="kinds of personal data visible: email, card, phone"
    )
