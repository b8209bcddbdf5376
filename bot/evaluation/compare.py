"""Several engine set-ups on the same cases, side by side.

    --compare ocr,vlm,vlm+hints,quantize=int4,max_visual_tokens=512

Each comma-separated item is one variant: an engine (`ocr`, `vlm` or `qwen`, `auto`, `openai`)
and `+`-joined changes to the settings: `hints` (VLBOT_OCR_HINTS) or any setting as `name=value`
(`quantize=int4`, `dtype=float32`, `max_visual_tokens=512`). An item with only changes is the VLM
with those changes; `vlm+hints+quantize=int4` combines them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.evaluation.dataset import Case, EvalSet
from bot.evaluation.results import RunResult
from bot.evaluation.running import Engine, evaluate
from bot.models import GenerationParams
from bot.settings import Settings

ENGINES = {"ocr": "ocr", "vlm": "qwen", "qwen": "qwen", "auto": "auto", "openai": "openai",
           "remote": "openai"}


class VariantError(ValueError):
    """A --compare item that names no engine or setting; the message says which."""


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)


def parse_variant(item: str, default_engine: str | None = None) -> Variant:
    words = [w.strip() for w in item.strip().split("+") if w.strip()]
    if not words:
        raise VariantError("an empty --compare item")
    overrides: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if sep:
            name = key.strip().lower().replace("-", "_")
            if name not in Settings.model_fields or name in ("telegram", "slack", "http", "remote"):
                raise VariantError(f"{item!r}: {key!r} is not a setting (e.g. quantize=int4, "
                                   "max_visual_tokens=512, dtype=float32)")
            overrides[name] = value.strip()
        elif word.lower() in ("hints", "ocr_hints"):
            overrides["ocr_hints"] = True
        elif word.lower() in ENGINES:
            overrides["engine"] = ENGINES[word.lower()]
        else:
            raise VariantError(f"{item!r}: {word!r} is neither an engine ({', '.join(ENGINES)}), "
                               "`hints` nor a setting=value")
    overrides.setdefault("engine", default_engine or "qwen")
    if overrides.get("ocr_hints") and overrides["engine"] not in ("qwen", "auto"):
        raise VariantError(f"{item!r}: OCR hints go with the VLM (vlm+hints)")
    return Variant(item.strip(), overrides)


def parse_variants(spec: str) -> list[Variant]:
    variants = [parse_variant(item) for item in spec.split(",") if item.strip()]
    labels = [v.label for v in variants]
    if not variants:
        raise VariantError("--compare needs at least one variant, e.g. ocr,vlm,vlm+hints")
    if len(set(labels)) != len(labels):
        raise VariantError(f"--compare names a variant twice: {spec}")
    return variants


async def run_variants(
    variants: Sequence[Variant],
    eval_set: EvalSet,
    cases: list[Case],
    make_settings: Callable[[dict[str, Any]], Settings],
    make_engine: Callable[[Settings], Engine],
    *,
    progress: bool = True,
) -> list[RunResult]:
    """Each variant in turn: its settings, its engine (closed before the next one loads)."""
    runs = []
    for variant in variants:
        settings = make_settings(variant.overrides)
        engine = make_engine(settings)
        params = GenerationParams(max_new_tokens=settings.max_new_tokens,
                                  temperature=settings.temperature,
                                  system_prompt=settings.system_prompt)
        try:
            runs.append(await evaluate(engine, eval_set, cases, params, label=variant.label,
                                       settings=variant.overrides, progress=progress))
        finally:
            await engine.close()
    return runs


# (task, metric, label): the rows of the side-by-side table
ROWS = (
    ("ocr", "cer", "/ocr character error rate ↓"),
    ("ocr", "word_accuracy", "/ocr word accuracy"),
    ("extract", "field_match", "/extract field match"),
    ("extract", "anls", "/extract ANLS"),
    ("extract", "fields_in_text", "/extract fields found in text (text-only engine)"),
    ("extract", "json_valid", "/extract JSON valid"),
    ("triage", "field_match", "/triage field match"),
    ("triage", "anls", "/triage ANLS"),
    ("triage", "fields_in_text", "/triage fields found in text (text-only engine)"),
    ("triage", "json_valid", "/triage JSON valid"),
    ("describe", "keyword_recall", "/describe keyword recall"),
    ("describe", "json_valid", "/describe JSON valid"),
)


def cell(summary: dict[str, dict[str, Any]], task: str, metric: str) -> str:
    entry = summary.get(task)
    if entry is None:
        return "—"
    if metric not in entry:
        return "skipped" if entry.get("skipped") and not entry.get("cases") else "—"
    return f"{entry[metric]:.3f}"


def side_by_side(runs: Sequence[RunResult]) -> str:
    """A Markdown table: one column per run, one row per metric any run has."""
    summaries = [run.summary() for run in runs]
    lines = ["| metric | " + " | ".join(run.label for run in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    for task, metric, label in ROWS:
        cells = [cell(s, task, metric) for s in summaries]
        if any(c not in ("—", "skipped") for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    timing: list[tuple[str, list[float | None]]] = [
        ("seconds per image", [run.seconds_per_image() for run in runs]),
        ("load seconds", [run.load_s for run in runs]),
    ]
    for label, values in timing:
        lines.append(f"| {label} | " + " | ".join("—" if v is None else f"{v:.2f}"
                                                  for v in values) + " |")
    firsts = []
    for run in runs:
        seen = [c.first_piece_s for c in run.cases if c.first_piece_s is not None]
        firsts.append(f"{sum(seen) / len(seen):.2f}" if seen else "—")
    lines.append("| seconds to first text | " + " | ".join(firsts) + " |")
    return "\n".join(lines)
