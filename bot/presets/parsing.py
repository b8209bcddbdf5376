"""From a model's text to a validated result: find the JSON, validate it, repair once, or fail.

`parse_preset_output(preset, raw)` returns the validated model or raises `PresetOutputInvalid`,
which carries the one repair prompt to send. `generate_preset(...)` runs the whole flow against an
engine: the preset's prompt, the answer, one repair turn if needed, then `PresetFailed` (an
`InputRejected` whose code is a catalogue key, so the runner reports it like bad input: no
retries, a clear message). A half-parsed answer is never returned as data.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pydantic import BaseModel, ValidationError

from bot.engine_port import Engine
from bot.models import (
    GenerationParams,
    ImagePart,
    InputRejected,
    Message,
    Role,
    TextPart,
    Turn,
)
from bot.presets.redact import redact
from bot.presets.registry import RULES, Preset
from bot.presets.schemas import DOCUMENT_MODELS, ExtractResult, unwrap

OCR_JSON_MARKER = "[vlbot:ocr-json]"  # engine.ocr.engine.JSON_MARKER: the OCR engine answers in JSON
_MAX_ERRORS = 5


class PresetFailed(InputRejected):
    """The model could not give a valid result; `code` is a bot.texts catalogue key."""


class PresetOutputInvalid(ValueError):
    """The answer is not a valid result; `repair_prompt` asks the model to correct it."""

    def __init__(self, preset: Preset, raw: str, errors: list[str]) -> None:
        super().__init__(f"{preset.name}: " + "; ".join(errors))
        self.preset = preset
        self.raw = raw
        self.errors = errors
        self.repair_prompt = repair_prompt(preset, errors)


@dataclass(frozen=True)
class PresetResult:
    preset: Preset
    data: BaseModel
    raw: str  # the model's last answer, as written (not redacted: keep it out of chats and logs)
    repaired: bool = False
    redacted: frozenset[str] = field(default_factory=frozenset)  # kinds of personal data removed

    @property
    def document(self) -> BaseModel:
        """The result model (an extract result's document, unwrapped)."""
        return unwrap(self.data)

    def json(self, indent: int | None = 2) -> str:
        """The result as JSON (personal data already redacted for triage)."""
        return self.document.model_dump_json(indent=indent)

    def as_dict(self) -> dict[str, Any]:
        return self.document.model_dump(mode="json")


# --- finding the JSON ---------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S)
_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript)?[ \t]*\n?(.*?)(?:```|$)", re.S)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_SMART_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"'})


class JsonNotFound(ValueError):
    pass


def _balanced_end(text: str, start: int) -> int | None:
    """Index after the bracket that closes text[start]; None if it is never closed."""
    stack: list[str] = []
    in_string = escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append("}" if char == "{" else "]")
        elif char in "}]":
            if not stack or stack.pop() != char:
                return None
            if not stack:
                return index + 1
    return None


def _loads(candidate: str) -> Any:
    try:
        return json.loads(candidate)
    except json.JSONDecodeError:
        cleaned = _TRAILING_COMMA.sub(r"\1", candidate.translate(_SMART_QUOTES))
        return json.loads(cleaned)


def extract_json(raw: str) -> Any:
    """The first JSON object (or array) in a model's answer: inside a code fence, after leading
    prose, with trailing commas or typographic quotes forgiven. Raises JsonNotFound."""
    text = _THINK.sub("", raw).strip()
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    cut_off = False
    for candidate in candidates:
        for start in [m.start() for m in re.finditer(r"[{\[]", candidate)][:20]:
            end = _balanced_end(candidate, start)
            if end is None:
                cut_off = cut_off or candidate[start] == "{"
                continue
            try:
                return _loads(candidate[start:end])
            except json.JSONDecodeError:
                continue
    if cut_off:
        raise JsonNotFound("the JSON object is incomplete (cut off before its closing brace)")
    raise JsonNotFound("no JSON object found in the answer")


# --- validating --------------------------------------------------------------------------------


def _expected_keys(model: type[BaseModel]) -> set[str]:
    if model is ExtractResult:
        return {key for sub in DOCUMENT_MODELS for key in sub.model_fields}
    return set(model.model_fields)


def _format_errors(error: ValidationError) -> list[str]:
    out = []
    for item in error.errors()[:_MAX_ERRORS]:
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        out.append(f"{where}: {item['msg']}")
    return out


def parse_preset_output(preset: Preset, raw: str) -> BaseModel:
    """The validated result in `raw`; raises PresetOutputInvalid (with a repair prompt)."""
    try:
        value = extract_json(raw)
    except JsonNotFound as exc:
        raise PresetOutputInvalid(preset, raw, [str(exc)]) from None
    if isinstance(value, dict):
        expected = _expected_keys(preset.model) - {"document_type"}
        if not set(value) & expected:
            found = ", ".join(sorted(value)[:8]) or "none"
            raise PresetOutputInvalid(
                preset, raw, [f"none of the expected keys is present (found: {found})"]
            )
    else:
        raise PresetOutputInvalid(preset, raw, ["the answer must be a JSON object, not a list"])
    try:
        return preset.model.model_validate(value)
    except ValidationError as exc:
        raise PresetOutputInvalid(preset, raw, _format_errors(exc)) from None


def repair_prompt(preset: Preset, errors: Sequence[str]) -> str:
    listed = "\n".join(f"- {e}" for e in errors[:_MAX_ERRORS])
    return (
        f"Your previous answer is not valid:\n{listed}\n\n"
        f"Reply again with only the corrected JSON object in this shape:\n{preset.skeleton}\n\n"
        f"{RULES}"
    )


def finish(preset: Preset, data: BaseModel) -> tuple[BaseModel, frozenset[str]]:
    """Apply the preset's post-processing: for triage, redact personal data from every text
    value and record the kinds found in `personal_data`."""
    if not preset.redact:
        return data, frozenset()
    found: set[str] = set()

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            cleaned, kinds = redact(value)
            found.update(kinds)
            return cleaned
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        return value

    dumped = scrub(data.model_dump(mode="json"))
    if isinstance(dumped, dict) and "personal_data" in dumped:
        kinds = list(dumped["personal_data"] or [])
        dumped["personal_data"] = kinds + sorted(k for k in found if k not in kinds)
    return type(data).model_validate(dumped), frozenset(found)


def accept(preset: Preset, raw: str, *, repaired: bool = False) -> PresetResult:
    """parse_preset_output + finish, as a PresetResult (raises PresetOutputInvalid)."""
    data, kinds = finish(preset, parse_preset_output(preset, raw))
    return PresetResult(preset, data, raw, repaired=repaired, redacted=kinds)


# --- the whole flow against an engine -------------------------------------------------------------

OnPiece = Callable[[str], Awaitable[None]]


def preset_message(preset: Preset, message: Message, user_text: str, language_code: str | None,
                   *, for_ocr_engine: bool = False) -> Message:
    """The message the engine gets: the images, then the preset's prompt."""
    prompt = preset.prompt(user_text, language_code)
    if for_ocr_engine:
        prompt = f"{OCR_JSON_MARKER}\n{prompt}"
    images: list[ImagePart] = list(message.images)
    return Message((*images, TextPart(prompt)))


def _with_preset(params: GenerationParams, preset: Preset) -> GenerationParams:
    changes: dict[str, Any] = {"max_new_tokens": max(params.max_new_tokens, preset.max_new_tokens)}
    if "preset" in {f.name for f in fields(params)}:  # once GenerationParams carries it
        changes["preset"] = preset.name
    return replace(params, **changes)


async def _answer(engine: Engine, history: Sequence[Turn], message: Message,
                  params: GenerationParams, on_piece: OnPiece | None) -> str:
    pieces: list[str] = []
    stream = engine.stream(history, message, params)
    async with contextlib.aclosing(stream):
        async for piece in stream:
            pieces.append(piece)
            if on_piece is not None:
                await on_piece(piece)
    return "".join(pieces).strip()


async def generate_preset(
    engine: Engine,
    history: Sequence[Turn],
    message: Message,
    params: GenerationParams,
    preset: Preset,
    *,
    user_text: str = "",
    language_code: str | None = None,
    on_piece: OnPiece | None = None,
) -> PresetResult:
    """Ask `engine` for the preset's result, repair once if the answer is invalid, else raise
    PresetFailed("preset_invalid_output"). With the OCR engine only the ocr preset works
    (PresetFailed("preset_needs_vlm") for the others)."""
    ocr_engine = engine.info.name == "ocr"
    if ocr_engine and preset.name != "ocr":
        raise PresetFailed(
            "preset_needs_vlm", f"the {preset.name} preset needs the VLM", preset=preset.name
        )
    asked = preset_message(preset, message, user_text, language_code, for_ocr_engine=ocr_engine)
    params = _with_preset(params, preset)
    raw = await _answer(engine, history, asked, params, on_piece)
    try:
        return accept(preset, raw)
    except PresetOutputInvalid as first:
        repair_history = [
            *history,
            Turn(Role.USER, asked.parts),
            Turn(Role.ASSISTANT, (TextPart(raw),)),
        ]
        retry = Message.of(first.repair_prompt)
        raw_again = await _answer(engine, repair_history, retry, params, on_piece)
        try:
            return accept(preset, raw_again, repaired=True)
        except PresetOutputInvalid as second:
            raise PresetFailed(
                "preset_invalid_output",
                f"{preset.name}: invalid after one repair: {second}",
                preset=preset.name,
            ) from None
