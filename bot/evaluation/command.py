"""`vlbot eval`: make (or reuse) the set, run each engine variant, write and print the reports."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.evaluation.compare import Variant, VariantError, parse_variants, run_variants, side_by_side
from bot.evaluation.dataset import ensure_set
from bot.evaluation.fonts import FontMissing
from bot.evaluation.report import markdown, write_reports
from bot.evaluation.running import Engine
from bot.settings import Settings


class EvalError(Exception):
    """A clear one-line reason `vlbot eval` cannot run (a bad --compare item, a missing font)."""


@dataclass(frozen=True)
class EvalOptions:
    out: Path
    engine: str | None = None  # without --compare: the engine to score (default: settings)
    compare: str | None = None
    task: str | None = None  # only this task's cases (ocr, extract, triage, describe)
    limit: int | None = None  # at most this many cases per task
    seed: int = 0
    set_dir: Path | None = None  # default: the cache folder
    progress: bool = True


def variants_of(options: EvalOptions, configured_engine: str) -> list[Variant]:
    if options.compare:
        if options.engine:
            raise EvalError("--engine and --compare do not go together: name each engine in "
                            "--compare (e.g. --compare ocr,vlm)")
        try:
            return parse_variants(options.compare)
        except VariantError as exc:
            raise EvalError(str(exc)) from None
    engine = options.engine or configured_engine
    return [Variant(engine, {"engine": engine})]


async def run_eval(options: EvalOptions, make_settings: Callable[..., Settings],
                   make_engine: Callable[[Settings], Engine]) -> str:
    """Run the evaluation; returns the summary printed to stdout (reports are written to
    options.out and beside it)."""
    if options.limit is not None and options.limit < 1:
        raise EvalError("--limit must be at least 1")
    variants = variants_of(options, make_settings().engine)
    try:
        eval_set = ensure_set(options.set_dir, options.seed)
    except FontMissing as exc:
        raise EvalError(str(exc)) from None
    cases = eval_set.select(options.task, options.limit)
    out = options.out if options.out.suffix else options.out.with_suffix(".json")

    def settings_for(overrides: dict[str, Any]) -> Settings:
        return make_settings(**overrides)

    runs = await run_variants(variants, eval_set, cases, settings_for, make_engine,
                              progress=options.progress)
    meta = {"seed": eval_set.seed, "set_folder": str(eval_set.folder), "cases": len(cases),
            "task": options.task, "limit": options.limit}
    paths = write_reports(runs, meta, out)
    print("reports: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    if len(runs) > 1:
        return side_by_side(runs)
    return markdown(runs, meta)
