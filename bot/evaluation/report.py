"""The reports of an evaluation: JSON (everything), Markdown (the summary) and HTML (the summary
plus the worst cases with their images, for looking rather than reading)."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from bot.evaluation.compare import side_by_side
from bot.evaluation.results import HEADLINE, CaseResult, RunResult

WORST = 8  # worst cases shown per run
_EXCERPT = 240
_METRIC_ORDER = ("cer", "word_accuracy", "field_match", "anls", "fields_in_text",
                 "keyword_recall", "json_valid", "repaired", "seconds_per_image", "first_piece_s")
NOTE_TEXT_ONLY = ("A text-only engine (engine=ocr) cannot fill the /extract or /triage JSON: it is "
                  "asked /ocr on those images, scored by the share of printed field values its "
                  "text contains (fields_in_text), and skips /describe.")


def report_json(runs: Sequence[RunResult], meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "runs": [run.to_json() for run in runs]}


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _task_table(run: RunResult) -> list[str]:
    summary = run.summary()
    lines = ["| task | cases | errors | " + " | ".join(_METRIC_ORDER) + " |",
             "|---|---:|---:|" + "---:|" * len(_METRIC_ORDER)]
    for task, entry in summary.items():
        if not entry.get("cases"):
            lines.append(f"| /{task} | 0 ({entry.get('skipped', 0)} skipped) | — | "
                         + " | ".join("—" for _ in _METRIC_ORDER) + " |")
            continue
        cells = [_number(entry[m]) if m in entry else "—" for m in _METRIC_ORDER]
        lines.append(f"| /{task} | {entry['cases']} | {entry['errors']} | " + " | ".join(cells) + " |")
    return lines


def _headline(case: CaseResult) -> str:
    value = case.headline
    metric = HEADLINE[case.task][0] if case.mode != "text-only" else "fields_in_text"
    return "—" if value is None else f"{metric} {value:.3f}"


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT else flat[: _EXCERPT - 1] + "…"


def markdown(runs: Sequence[RunResult], meta: dict[str, Any]) -> str:
    out = [f"# vlbot eval: {meta.get('cases', '?')} cases (set seed {meta.get('seed')})", ""]
    if len(runs) > 1:
        out += ["## Side by side", "", side_by_side(runs), ""]
    for run in runs:
        engine = run.engine
        changed = ", ".join(f"{k}={v}" for k, v in run.settings.items()) or "settings as configured"
        out += [f"## {run.label}", "",
                f"Engine `{engine['name']}`, model `{engine['model']}`, dtype {engine['dtype']} "
                f"({changed}); loaded in {run.load_s:.1f} s.", ""]
        out += _task_table(run)
        if any(c.mode == "text-only" for c in run.cases):
            out += ["", NOTE_TEXT_ONLY]
        out += ["", "Worst cases:", "", "| case | score | error | seconds | answer |",
                "|---|---|---|---:|---|"]
        for case in run.worst(WORST):
            answer = _excerpt(case.answer).replace("|", "\\|")
            out.append(f"| {case.case_id} | {_headline(case)} | {case.error or ''} | "
                       f"{case.seconds:.2f} | {answer} |")
        out.append("")
    return "\n".join(out)


def _thumbnail(path: str, size: int = 360) -> str:
    """The image as a small PNG data: URL (upright, as a viewer shows it)."""
    try:
        with Image.open(path) as image:
            shown = ImageOps.exif_transpose(image).convert("RGB")
    except OSError:
        return ""
    shown.thumbnail((size, size))
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#111}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}td.n{text-align:right}img{max-width:360px}
pre{white-space:pre-wrap;max-width:48em;margin:0;font-size:85%}"""


def _html_table(markdown_lines: list[str]) -> str:
    """A Markdown table (as _task_table / side_by_side write them) as HTML."""
    rows = [line.strip().strip("|").split("|") for line in markdown_lines
            if not line.startswith("|---")]
    head, body = rows[0], rows[1:]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"]
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>")
    return "".join(out) + "</table>"


def page(runs: Sequence[RunResult], meta: dict[str, Any]) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>vlbot eval</title>",
             f"<style>{_STYLE}</style>",
             f"<h1>vlbot eval: {meta.get('cases', '?')} cases (set seed "
             f"{html.escape(str(meta.get('seed')))})</h1>"]
    if len(runs) > 1:
        parts += ["<h2>Side by side</h2>", _html_table(side_by_side(runs).splitlines())]
    for run in runs:
        parts += [f"<h2>{html.escape(run.label)}</h2>",
                  f"<p>Engine <code>{html.escape(run.engine['name'])}</code>, model "
                  f"<code>{html.escape(run.engine['model'])}</code></p>",
                  _html_table(_task_table(run)), "<h3>Worst cases</h3>",
                  "<table><tr><th>image</th><th>case</th><th>score</th><th>answer</th></tr>"]
        for case in run.worst(WORST):
            thumb = _thumbnail(case.image)
            image = f"<img src='{thumb}' alt='{html.escape(case.case_id)}'>" if thumb else ""
            error = f"<br>error: {html.escape(case.error)}" if case.error else ""
            parts.append(
                f"<tr><td>{image}</td><td>{html.escape(case.case_id)}<br>{case.seconds:.2f} s</td>"
                f"<td>{html.escape(_headline(case))}{error}</td>"
                f"<td><pre>{html.escape(case.answer[:2000])}</pre></td></tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def write_reports(runs: Sequence[RunResult], meta: dict[str, Any], out: Path) -> list[Path]:
    """`out` (JSON) and, beside it, the .md and .html reports; returns the three paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out, out.with_suffix(".md"), out.with_suffix(".html")]
    paths[0].write_text(json.dumps(report_json(runs, meta), ensure_ascii=False, indent=1) + "\n",
                        encoding="utf-8")
    paths[1].write_text(markdown(runs, meta), encoding="utf-8")
    paths[2].write_text(page(runs, meta), encoding="utf-8")
    return paths
