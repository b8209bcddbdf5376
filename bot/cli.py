"""`vlbot` command line: ask, serve, doctor, eval, usage, dev make-model."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from bot import texts
from bot.app import AdapterStartError
from bot.db import DataDirError, prepare_data_dir
from bot.engine_port import Engine, EngineError
from bot.models import GenerationParams, ImagePart, InputRejected, Message, size_text
from bot.presets import preset_names
from bot.runner import check_message
from bot.settings import Settings
from bot.triage.service import TriageConfigError
from bot.webhooks import WebhookConfigError, doctor_report

MIME_BY_SUFFIX = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".heic": "image/heic",
    ".heif": "image/heif",
}


class CliError(Exception):
    """One clear line for the user, no traceback."""


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CliError(f"invalid setting {where}: {first['msg']} (see .env.example)") from exc


def read_image(path_text: str, settings: Settings) -> ImagePart:
    path = Path(path_text)
    if not path.is_file():
        raise CliError(f"no such image file: {path}")
    size = path.stat().st_size
    if size > settings.max_image_bytes:  # refuse before reading a huge file into memory
        raise CliError(
            texts.text("too_large", size=size_text(size), limit=size_text(settings.max_image_bytes))
        )
    mime = MIME_BY_SUFFIX.get(path.suffix.lower(), "application/octet-stream")
    return ImagePart(path.read_bytes(), mime, path.name)


async def ask(args: argparse.Namespace) -> int:
    from bot.app import build_engine

    if not args.items:
        raise CliError('usage: vlbot ask IMAGE... "question"')
    *image_paths, question = args.items
    if not image_paths and Path(question).is_file():  # noqa: ASYNC240 (one stat, at start-up)
        image_paths, question = [question], ""
    settings = load_settings(model=args.model, engine=args.engine, dtype=args.dtype)
    images = [read_image(p, settings) for p in image_paths]
    if not question.strip() and not images:
        raise CliError(texts.text("empty_question"))
    message = Message.of(question.strip() or texts.text("default_prompt"), *images)
    check_message(message, settings.max_question_chars, settings.max_images_per_message)
    engine = build_engine(settings)
    engine.check(message)
    await engine.load()
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens or settings.max_new_tokens,
        temperature=settings.temperature,
        system_prompt=settings.system_prompt,
    )
    if args.preset:
        return await ask_preset(args, engine, message, params)
    started = time.monotonic()
    pieces: list[str] = []
    async for piece in engine.stream([], message, params):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    answer = "".join(pieces).strip()
    if args.json:
        stats = getattr(engine, "last_stats", None)
        out: dict[str, Any] = {"answer": answer, "model": engine.info.model,
                               "seconds": round(time.monotonic() - started, 3)}
        if stats is not None:
            out["stats"] = {k: getattr(stats, k) for k in type(stats).__dataclass_fields__}
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    await engine.close()
    return 0


async def ask_preset(
    args: argparse.Namespace, engine: Engine, message: Message, params: GenerationParams
) -> int:
    """--preset: validated JSON (printed with --json) or its readable rendering."""
    from bot.presets import generate_preset, get_preset, render_answer

    preset = get_preset(args.preset)
    assert preset is not None  # argparse choices
    result = await generate_preset(engine, [], message, params, preset, user_text=message.text)
    print(result.json() if args.json else render_answer(result))
    await engine.close()
    return 0


async def serve(args: argparse.Namespace) -> int:
    from bot.app import App, build_engine
    from bot.logs import setup_logging

    settings = load_settings(model=args.model, engine=args.engine)
    setup_logging(settings)
    prepare_data_dir(settings.data_dir)
    app = App(settings, build_engine(settings))
    if not app.adapters:
        raise CliError("no adapter is enabled: set VLBOT_TELEGRAM__TOKEN, VLBOT_SLACK__BOT_TOKEN "
                       "or VLBOT_HTTP__ENABLED=true (see .env.example)")
    await app.run_until_signalled()
    return 0


def mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        return f"{secret[:4]}…({len(secret)} chars)" if len(secret) > 8 else "***"
    if isinstance(value, BaseModel):  # a settings sub-model (telegram, webhooks, …), nested too
        return {k: mask(getattr(value, k)) for k in type(value).model_fields}
    if isinstance(value, dict):
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def doctor(args: argparse.Namespace) -> int:
    """The settings and what this machine offers; exit status 1 when something found here would
    stop `ask` or `serve` (a model folder that is missing or not a model, an unusable data
    folder)."""
    from engine import (
        cpu_summary,
        cpu_supports_bf16,
        dtype_name,
        local_model_problem,
        physical_cores,
        resolve_dtype,
    )

    settings = load_settings()
    shown = mask(settings)
    print("settings:")
    print(json.dumps(shown, indent=2, ensure_ascii=False, default=str))
    print(f"python: {platform.python_version()}  machine: {platform.machine()}  "
          f"cpus: {os.cpu_count()}  physical cores: {physical_cores()}")
    problems: list[str] = []
    cpu = cpu_summary(build=True)
    print(f"CPU tier: {cpu['cpu_tier']} (VLBOT_CPU forces a lower one)")
    if "kernels" in cpu:
        print(f"C kernels in use: {cpu['kernels']}")
    if "kernels_not_here" in cpu:
        print(f"C kernels not on this tier: {cpu['kernels_not_here']}")
    try:
        dtype = dtype_name(resolve_dtype(settings.dtype))
        bf16 = cpu_supports_bf16()
    except ValueError as e:  # a VLBOT_CPU above this CPU, or an unknown dtype name
        problems.append(str(e))
        print(f"dtype: {e}")
    else:
        print(f"bf16 arithmetic (avx512_bf16/amx): {'yes' if bf16 else 'no'}")
        if dtype == "bfloat16" and not bf16:
            dtype += " weights, float32 compute"
        print(f"dtype that would be used: {dtype}")
    try:
        import torch

        print(f"torch: {torch.__version__} (cuda build: {torch.version.cuda or 'no'})")
    except ImportError:
        print("torch: NOT INSTALLED — run scripts/setup")
    model_problem = (
        local_model_problem(settings.model) if settings.engine in ("auto", "qwen") else None
    )
    if model_problem is not None:  # the same check and words as `ask` and `serve`
        problems.append(model_problem)
        print(f"model: {settings.model} — {model_problem}")
    else:
        print(f"model: {settings.model} — {describe_model(settings.model)}")
    try:
        prepare_data_dir(settings.data_dir)
        print(f"data folder: {settings.data_dir} (writable)")
    except DataDirError as exc:
        problems.append(str(exc))
        print(f"data folder: {exc}")
    if not problems:  # the data folder (or database) is usable: the webhook outbox in it
        webhook_lines, webhook_problems = asyncio.run(
            doctor_report(settings.database, settings.webhooks)
        )
        print("\n".join(webhook_lines))
        problems += webhook_problems
    for problem in problems:
        print(f"vlbot: {problem}", file=sys.stderr)
    return 1 if problems else 0


def describe_model(model: str) -> str:
    path = Path(model).expanduser()
    if path.exists():
        return "local folder, config.json found" if (path / "config.json").is_file() else (
            "local folder WITHOUT config.json — not a saved model")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return "found in the Hugging Face cache"
    return "not downloaded yet: it is fetched from the Hugging Face hub on first use"


async def evaluate(args: argparse.Namespace) -> int:
    """`vlbot eval`: score an engine (or --compare several) on the generated evaluation set."""
    from bot.app import build_engine
    from bot.evaluation.command import EvalError, EvalOptions, run_eval

    options = EvalOptions(
        out=Path(args.out), engine=args.engine, compare=args.compare, task=args.preset,
        limit=args.limit, seed=args.seed, set_dir=Path(args.set_dir) if args.set_dir else None,
        progress=not args.no_progress,
    )
    base = {"model": args.model, "dtype": args.dtype}
    try:
        summary = await run_eval(options, lambda **changes: load_settings(**{**base, **changes}),
                                 build_engine)
    except EvalError as exc:
        raise CliError(str(exc)) from None
    print(summary)
    return 0


async def usage(args: argparse.Namespace) -> int:
    """`vlbot usage`: the usage ledger of the last `--since` (a report, or `--csv` rows)."""
    from bot.db import Database
    from bot.usage import UsageLedger
    from bot.usage_view import csv_text, parse_since, parse_subject, report_text

    try:
        period = parse_since(args.since)
        subject = parse_subject(args.user) if args.user else None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    settings = load_settings()
    db = await Database.open(settings.database)
    try:
        ledger = UsageLedger(db)
        since = time.time() - period
        if args.csv:
            sys.stdout.write(csv_text(await ledger.records(since, subject=subject)))
        else:
            print(report_text(await ledger.report(subject, since)))
    finally:
        await db.close()
    return 0


async def triage_report(args: argparse.Namespace) -> int:
    """`vlbot triage-report`: the triages of the last `--since` (a summary, or `--csv` rows)."""
    from bot.db import Database
    from bot.triage.report import report_csv, report_text
    from bot.triage.store import TriageStore
    from bot.usage_view import parse_since

    try:
        period = parse_since(args.since)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    settings = load_settings()
    db = await Database.open(settings.database)
    try:
        end = time.time()
        rows = await TriageStore(db).between(end - period, end)
        if args.csv:
            sys.stdout.write(report_csv(rows))
        else:
            print(report_text(rows, end - period, end))
    finally:
        await db.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlbot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_ask = sub.add_parser("ask", help="answer a question about images, streamed to stdout")
    p_ask.add_argument("items", nargs="+", metavar='IMAGE... "question"')
    p_ask.add_argument("--model", help="hub id or local folder (default: settings)")
    p_ask.add_argument("--engine", choices=["auto", "qwen", "ocr", "openai"])
    p_ask.add_argument("--dtype", choices=["auto", "bfloat16", "float32"])
    p_ask.add_argument("--max-new-tokens", type=int)
    p_ask.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p_ask.add_argument("--preset", choices=preset_names(),
                       help="answer as validated JSON: describe, ocr, extract, triage, …")
    p_serve = sub.add_parser("serve", help="run the configured adapters, runner and engine")
    p_serve.add_argument("--model")
    p_serve.add_argument("--engine", choices=["auto", "qwen", "ocr", "openai"])
    sub.add_parser("doctor", help="print settings (secrets masked), CPU features, model status")
    p_eval = sub.add_parser("eval", help="score answers on the generated evaluation set")
    p_eval.add_argument("--engine", choices=["auto", "qwen", "ocr", "openai"])
    p_eval.add_argument("--model", help="hub id or local folder (default: settings)")
    p_eval.add_argument("--dtype", choices=["auto", "bfloat16", "float32"])
    p_eval.add_argument("--preset", choices=["ocr", "extract", "triage", "describe"],
                        help="only this task's cases")
    p_eval.add_argument("--limit", type=int, help="at most N cases of each task")
    p_eval.add_argument("--compare", metavar="VARIANTS",
                        help="side by side, e.g. ocr,vlm,vlm+hints,quantize=int4,max_visual_tokens=512")
    p_eval.add_argument("--out", default="eval-report.json",
                        help="the JSON report; .md and .html are written beside it")
    p_eval.add_argument("--seed", type=int, default=0, help="the evaluation set's seed")
    p_eval.add_argument("--set-dir", help="where the generated set is kept (default: the cache)")
    p_eval.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p_usage = sub.add_parser("usage", help="who used the bot: a report, or the ledger as CSV")
    p_usage.add_argument("--since", default="7d", help="the period: 7d (default), 12h, 30m")
    p_usage.add_argument("--csv", action="store_true", help="one CSV row per job, to stdout")
    p_usage.add_argument("--user", help="only this user: telegram:42, slack:user:U1, http:k-1a2b")
    p_triage = sub.add_parser("triage-report", help="support triage: counts, repeated errors, CSV")
    p_triage.add_argument("--since", default="7d", help="the period: 7d (default), 12h, 30m")
    p_triage.add_argument("--csv", action="store_true", help="one CSV row per triage, to stdout")
    p_dev = sub.add_parser("dev", help="developer tools")
    p_dev.add_argument("tool", choices=["make-model"])
    p_dev.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ask":
            return asyncio.run(ask(args))
        if args.command == "serve":
            return asyncio.run(serve(args))
        if args.command == "doctor":
            return doctor(args)
        if args.command == "eval":
            return asyncio.run(evaluate(args))
        if args.command == "usage":
            return asyncio.run(usage(args))
        if args.command == "triage-report":
            return asyncio.run(triage_report(args))
        from engine import make_model_main

        return make_model_main(args.rest)
    except CliError as exc:
        print(f"vlbot: {exc}", file=sys.stderr)
        return 2
    except InputRejected as exc:
        print(f"vlbot: {texts.text(exc.code, **exc.params)}", file=sys.stderr)
        return 2
    except (EngineError, DataDirError, AdapterStartError, WebhookConfigError,
            TriageConfigError) as exc:
        print(f"vlbot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
