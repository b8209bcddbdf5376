"""Presets: fixed tasks with validated JSON answers (describe, ocr, extract, triage).

    preset, rest = parse_preset_command(caption)        # "/triage what is wrong?"
    result = await generate_preset(engine, history, message, params, preset, user_text=rest)
    chat_text = render_text(result.data, language_code)   # plus result.json() for the raw JSON
"""

from bot.presets.parsing import (
    PresetFailed,
    PresetOutputInvalid,
    PresetResult,
    accept,
    extract_json,
    finish,
    generate_preset,
    parse_preset_output,
    repair_prompt,
)
from bot.presets.redact import redact
from bot.presets.registry import (
    PRESETS,
    Preset,
    get_preset,
    parse_preset_command,
    preset_for_response_format,
    preset_names,
    response_format,
    schema_json,
)
from bot.presets.render import render_answer, render_text
from bot.presets.schemas import unwrap

__all__ = [
    "PRESETS",
    "Preset",
    "PresetFailed",
    "PresetOutputInvalid",
    "PresetResult",
    "accept",
    "extract_json",
    "finish",
    "generate_preset",
    "get_preset",
    "parse_preset_command",
    "parse_preset_output",
    "preset_for_response_format",
    "preset_names",
    "redact",
    "render_answer",
    "render_text",
    "repair_prompt",
    "response_format",
    "schema_json",
    "unwrap",
]
