"""`vlbot eval` end to end: the real OCR engine, the tiny random VLM, --compare, and the remote
engine against a fake OpenAI-compatible server that answers perfectly (or not at all)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot.cli import build_parser, evaluate, main
from bot.evaluation.dataset import Case, ensure_set
from bot.presets import get_preset


def eval_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["eval", "--out", str(tmp_path / "out" / "report.json"), "--set-dir",
            str(tmp_path / "set"), "--no-progress", *extra]


def read_report(tmp_path: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((tmp_path / "out" / "report.json").read_text("utf-8"))
    return report


def test_ocr_engine_is_scored_with_real_numbers(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(eval_args(tmp_path, "--engine", "ocr", "--limit", "1")) == 0
    report = read_report(tmp_path)
    run = report["runs"][0]
    assert run["engine"]["name"] == "ocr"
    summary = run["summary"]
    # the real PP-OCR reader on a clean 16 px dialog: a few wrong characters at most
    assert summary["ocr"]["cases"] == 1 and summary["ocr"]["cer"] < 0.1
    assert summary["ocr"]["word_accuracy"] > 0.8
    # it cannot fill the receipt's JSON; its text holds the receipt's printed values
    extract = next(c for c in run["cases"] if c["task"] == "extract")
    assert extract["mode"] == "text-only" and extract["preset"] == "ocr"
    assert summary["extract"]["fields_in_text"] > 0.7
    assert "CAFE AURORA" in extract["answer"]
    assert summary["describe"] == {"cases": 0, "skipped": 1}
    assert all(c["seconds"] > 0 for c in run["cases"] if c["mode"] != "skipped")
    out = capsys.readouterr().out
    assert "| /ocr | 1 | 0 |" in out
    markdown = (tmp_path / "out" / "report.md").read_text("utf-8")
    assert "Worst cases" in markdown and "extract-receipt-eur" in markdown
    page = (tmp_path / "out" / "report.html").read_text("utf-8")
    assert page.count("<img src='data:image/png;base64,") == 3  # the worst cases, with images


@pytest.mark.slow
def test_tiny_random_vlm_runs_every_task_end_to_end(tmp_path: Path, tiny_qwen3: Path) -> None:
    """Random weights write no valid JSON: scores are zero, as expected; the report's structure
    is what is checked."""
    args = eval_args(tmp_path, "--engine", "qwen", "--model", str(tiny_qwen3), "--limit", "1")
    assert main(args) == 0
    run = read_report(tmp_path)["runs"][0]
    assert run["engine"]["name"] == "transformers" and run["engine"]["model"] == str(tiny_qwen3)
    assert [c["task"] for c in run["cases"]] == ["ocr", "extract", "triage", "describe"]
    expected = {"ocr": {"cer", "word_accuracy"}, "extract": {"field_match", "anls"},
                "triage": {"field_match", "anls"}, "describe": {"keyword_recall"}}
    for case in run["cases"]:
        assert case["mode"] == "preset" and case["preset"] == case["task"]
        assert expected[case["task"]] <= set(case["scores"])
        assert isinstance(case["json_valid"], bool) and case["seconds"] > 0
        assert case["first_piece_s"] is not None and case["first_piece_s"] <= case["seconds"]
        if not case["json_valid"]:
            assert case["error"] == "preset_invalid_output" and case["answer"]  # what it wrote
    for task, entry in run["summary"].items():
        assert entry["cases"] == 1 and "seconds_per_image" in entry and "json_valid" in entry, task
    assert "## qwen" in (tmp_path / "out" / "report.md").read_text("utf-8")


def test_compare_runs_each_variant_with_its_settings(tmp_path: Path, tiny_qwen3: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = eval_args(tmp_path, "--model", str(tiny_qwen3), "--preset", "triage", "--limit", "1",
                     "--compare", "ocr,vlm+hints,max_visual_tokens=512")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| metric | ocr | vlm+hints | max_visual_tokens=512 |" in out
    assert "| /triage field match | — | 0.000 | 0.000 |" in out
    assert "| /triage fields found in text (text-only engine) | 1.000 | — | — |" in out
    runs = read_report(tmp_path)["runs"]
    assert [r["engine"]["name"] for r in runs] == ["ocr", "transformers", "transformers"]
    assert runs[1]["engine"]["details"]["ocr_hints"] == "on"
    assert "ocr_hints" not in runs[2]["engine"]["details"]
    assert runs[2]["engine"]["details"]["max_visual_tokens"] == "512"
    assert runs[1]["engine"]["details"]["max_visual_tokens"] == "1024"
    assert "## Side by side" in (tmp_path / "out" / "report.md").read_text("utf-8")


@pytest.mark.parametrize(("spec", "message"), [
    ("vlm+turbo", "'turbo' is neither an engine"),
    ("vlm,quantise=int4", "'quantise' is not a setting"),
    ("ocr+hints", "OCR hints go with the VLM"),
    ("quantize=int5", "invalid setting quantize"),
])
def test_a_bad_compare_item_is_one_clear_line(tmp_path: Path, spec: str, message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(eval_args(tmp_path, "--compare", spec)) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlbot: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_engine_and_compare_together_is_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(eval_args(tmp_path, "--engine", "ocr", "--compare", "ocr,vlm")) == 2
    assert "--engine and --compare do not go together" in capsys.readouterr().err


# --- the remote engine against a fake OpenAI-compatible server ------------------------------------


def ideal_answer(case: Case) -> dict[str, Any]:
    """What a perfect model answers for a case (built from the labels)."""
    if case.task == "ocr":
        return {"language": "en", "lines": list(case.text)}
    if case.task == "describe":
        return {"summary": "A picture with " + " and ".join(g[0] for g in case.keywords) + ".",
                "tags": [g[0] for g in case.keywords]}
    if case.task == "triage":
        return {**case.fields, "next_step": "Ask the user to try again."}
    document = {k: v for k, v in case.fields.items() if not k.startswith("field:")}
    items = [{"name": name} for name in case.items]
    if document["document_type"] == "menu":
        document["sections"] = [{"name": None, "items": items}]
    elif document["document_type"] == "form":
        document["fields"] = [{"label": k[6:], "value": v} for k, v in case.fields.items()
                              if k.startswith("field:")]
    else:
        document["items"] = items
    return document


def oracle(cases: dict[str, Case], asked: list[str], *, perfect: bool) -> Starlette:
    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "oracle", "object": "model"}]})

    async def chat(request: Request) -> Response:
        body = await request.json()
        parts = [p for m in body["messages"] if isinstance(m["content"], list)
                 for p in m["content"]]  # a repair turn's image is in the history
        image = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        digest = hashlib.sha256(base64.b64decode(image.split(",", 1)[1])).hexdigest()
        case = cases[digest]
        last = body["messages"][-1]["content"]
        asked.append(last if isinstance(last, str) else
                     next(p["text"] for p in last if p["type"] == "text"))
        text = json.dumps(ideal_answer(case), ensure_ascii=False) if perfect else "I am not sure."
        chunks = [text[i:i + 20] for i in range(0, len(text), 20)]
        events = "".join(
            f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': c}}]})}\n\n"
            for c in chunks
        )
        return Response(events + "data: [DONE]\n\n", media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        await task


async def run_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
                     perfect: bool) -> tuple[dict[str, Any], list[str]]:
    eval_set = ensure_set(tmp_path / "set", 0)
    asked: list[str] = []
    async with serving(oracle({c.sha256: c for c in eval_set.cases}, asked,
                              perfect=perfect)) as url:
        monkeypatch.setenv("VLBOT_REMOTE__BASE_URL", url)
        monkeypatch.setenv("VLBOT_REMOTE__MODEL", "oracle")
        args = build_parser().parse_args(eval_args(tmp_path, "--engine", "openai", "--limit", "2"))
        assert await evaluate(args) == 0
    return read_report(tmp_path)["runs"][0], asked


async def test_remote_engine_with_perfect_answers_scores_perfectly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, asked = await run_remote(tmp_path, monkeypatch, perfect=True)
    assert run["engine"]["name"] == "openai" and run["engine"]["model"] == "oracle"
    summary = run["summary"]
    assert summary["ocr"]["cer"] == 0.0 and summary["ocr"]["word_accuracy"] == 1.0
    assert summary["extract"]["field_match"] == 1.0 and summary["extract"]["anls"] == 1.0
    assert summary["triage"]["field_match"] == 1.0
    assert summary["describe"]["keyword_recall"] == 1.0
    assert all(entry["json_valid"] == 1.0 and entry["repaired"] == 0.0
               for entry in summary.values())
    # asked exactly as a user's /ocr, /extract, /triage, /describe asks
    for task in ("ocr", "extract", "triage", "describe"):
        preset = get_preset(task)
        assert preset is not None
        assert sum(text == preset.prompt() for text in asked) == 2, task


async def test_remote_engine_with_prose_answers_scores_zero_after_one_repair(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, asked = await run_remote(tmp_path, monkeypatch, perfect=False)
    assert len(asked) == 2 * len(run["cases"])  # the question, then one repair turn each
    summary = run["summary"]
    assert summary["ocr"]["cer"] == 1.0 and summary["extract"]["field_match"] == 0.0
    assert all(entry["json_valid"] == 0.0 and entry["errors"] == entry["cases"]
               for entry in summary.values())
    assert all(c["answer"] == "I am not sure.I am not sure." for c in run["cases"])
