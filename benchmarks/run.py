"""Benchmark vlbot against raw transformers ``generate`` on the same model and images, in one run.

    .venv/bin/python -m benchmarks.run [--quick] [--out bench-out/result.json] [--model DIR]

Steps: build (or reuse) the full-size random-weight Qwen3-VL-2B (`engine.devmodel.make_model`,
size="full"; cached in ~/.cache/vlbot-bench), write the benchmark JPEGs, measure the memory
bandwidth (fp32 sum over 2 GiB, best of several) for the decode limit, then run the raw baseline
and vlbot each in a fresh process (so each one's load time and peak RSS are its own), print a
Markdown report and write the JSON (and the report next to it, as .md; each process's own JSON,
written as it goes, in OUT-parts/).

`--quick` (smoke test, a few minutes with the model cached): 640x480 only, 16 new tokens, the
follow-up, 4 concurrent chats, a 5-job queue burst.

JSON: machine, config, bandwidth {gb_s, bytes_per_token, decode_limit_tok_s}, raw {load_s,
peak_rss_bytes, runs: [{image, variant, visual_tokens, ttft_s, decode_tok_s, total_s}]}, vlbot
{load_s, peak_rss_bytes, weights_bytes, runs: [{image, visual_tokens, ttft_s, decode_tok_s, e2e_s,
bot_ttft_s, followup: {...}}], concurrent: {...}, queue: {...}, bytes_per_token}, quantized (one
entry per `--quant-option quantize=...`, each its own run and label: [{option, ttft_s,
decode_tok_s, bytes_per_token, decode_limit_tok_s, load_s, peak_rss_bytes, weights_bytes}]),
floors. Each decode limit is the bandwidth over the bytes that run's decode step reads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.helpers import (
    GIB,
    IMAGES,
    QWEN3_VL_2B_LM_PARAMS,
    bandwidth_bytes_per_s,
    decode_limit_tok_s,
    lm_bytes_per_token,
    parse_options,
    quant_variants,
)
from benchmarks.images import write_images
from benchmarks.report import evaluate_floors, render_report

CACHE = Path(os.environ.get("VLBOT_BENCH_CACHE", Path.home() / ".cache" / "vlbot-bench"))
FULL_HIDDEN_SIZE = 2048


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="640x480 only, 16 tokens (smoke test)")
    p.add_argument("--out", default="bench-out/result.json", help="JSON result path (report: .md)")
    p.add_argument(
        "--model",
        default=os.environ.get("VLBOT_BENCH_MODEL"),
        help="full-size model folder to use (built there if missing); default: the cache",
    )
    p.add_argument("--tokens", type=int, help="forced new tokens (default 64, quick 16)")
    p.add_argument("--images", help=f"comma-separated subset of {','.join(IMAGES)}")
    p.add_argument("--threads", type=int, help="torch threads (default: physical cores)")
    p.add_argument("--concurrent", type=int, default=4, help="concurrent chats (0: skip)")
    p.add_argument("--queue-jobs", type=int, help="queued text jobs for the RSS check (default 50, quick 5)")
    p.add_argument(
        "--raw-12mp-defaults",
        action="store_true",
        help="also run raw generate on the 12 MP photo at processor defaults (~11,800 visual"
        " tokens: tens of minutes on a small CPU)",
    )
    p.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra QwenVLEngine keyword for the vlbot run (JSON value or string)",
    )
    p.add_argument(
        "--quant-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="QwenVLEngine keyword(s) of the weight-only int4/int8 option: adds a decode"
        " run at 640x480 with it",
    )
    p.add_argument(
        "--any-model",
        action="store_true",
        help="accept any model folder given with --model (e.g. a tiny one, to try the harness)",
    )
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--skip-vlbot", action="store_true")
    p.add_argument("--part-timeout", type=float, default=4 * 3600.0, help="seconds per process")
    return p.parse_args(argv)


def options(pairs: list[str]) -> dict[str, Any]:
    try:
        return parse_options(pairs)
    except ValueError as e:
        raise SystemExit(str(e)) from None


# --- setup -------------------------------------------------------------------------------------


def is_full_model(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    text = config.get("text_config") or {}
    return text.get("hidden_size") == FULL_HIDDEN_SIZE and any(folder.glob("*.safetensors"))


def tokenizer_tokens(folder: Path) -> int:
    """How many tokens the folder's tokenizer.json holds (0 where it has none)."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return 0
    added = {token["content"] for token in data.get("added_tokens", [])}
    return len(set(data.get("model", {}).get("vocab", {})) | added)


def ensure_model(path: str | None, any_model: bool = False) -> Path:
    from engine.devmodel import FULL_VOCAB

    folder = Path(path).expanduser() if path else CACHE / "qwen3-vl-2b-random"
    stale = False
    if is_full_model(folder) or (any_model and (folder / "config.json").is_file()):
        tokens = tokenizer_tokens(folder)
        if tokens >= FULL_VOCAB or any_model:
            print(f"model: reusing {folder}", flush=True)
            return folder
        # made before the full-size model's tokenizer had the published size: its loads would
        # leave out what reading that tokenizer costs
        if path:
            print(f"model: {folder} has a {tokens}-token tokenizer, not the published size"
                  f" ({FULL_VOCAB}): its load-to-ready leaves out reading a real one", flush=True)
            return folder
        print(f"model: {folder} has a {tokens}-token tokenizer: making it again", flush=True)
        stale = True
    building = folder.with_name(folder.name + ".building")
    print(f"model: building the full-size random Qwen3-VL-2B into {folder} (~1 min, 4.3 GB)", flush=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "engine.devmodel", "--size", "full", str(building)], check=True)
    if stale:
        shutil.rmtree(folder)
    if folder.exists():
        raise SystemExit(f"{folder} exists but is not a full-size model: remove it or pass --model")
    building.rename(folder)
    print(f"model: built in {time.monotonic() - started:.0f} s", flush=True)
    return folder


def machine(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or "?"
    meminfo: dict[str, int] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            meminfo[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    from engine import cpu_supports_bf16, dtype_name, physical_cores, resolve_dtype
    from engine.cpu.summary import cpu_summary

    tier = cpu_summary(build=True)
    dtype = dtype_name(resolve_dtype("auto"))
    if dtype == "bfloat16" and not cpu_supports_bf16():  # engine.cpu.half_weights
        dtype += " weights, float32 compute"
    return {
        "cpu": cpu,
        "cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "memory_bytes": meminfo.get("MemTotal"),
        "bf16_native": cpu_supports_bf16(),
        "dtype": dtype,
        "cpu_tier": tier["cpu_tier"],
        "kernels": tier.get("kernels", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def measure_bandwidth(threads: int, nbytes: int = 2 * GIB, passes: int = 7) -> dict[str, Any]:
    """Best fp32 sum over `nbytes` (streams the buffer once per pass)."""
    import torch

    torch.set_num_threads(threads)
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    buffer.sum()  # fault the pages in
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - started)
    del buffer
    bandwidth = bandwidth_bytes_per_s(nbytes, times)
    return {"bytes": nbytes, "seconds": times, "gb_s": bandwidth / 1e9}


def set_decode_limits(result: dict[str, Any]) -> None:
    """Each run's decode limit: the best bandwidth over the bytes its decode step reads for the
    dtype and quantization in use (as the vlbot parts measured them from the loaded model;
    without that figure, the language model's parameters in bf16)."""
    bandwidth = result["bandwidth"]
    measured = (result.get("vlbot") or {}).get("bytes_per_token")
    if measured:
        bandwidth["bytes_per_token"] = measured
    bandwidth["decode_limit_tok_s"] = bandwidth["gb_s"] * 1e9 / bandwidth["bytes_per_token"]
    for quant in result.get("quantized") or []:
        if quant.get("bytes_per_token"):
            quant["decode_limit_tok_s"] = bandwidth["gb_s"] * 1e9 / quant["bytes_per_token"]


def run_part(module: str, spec: dict[str, Any], work: Path, name: str, timeout_s: float) -> dict[str, Any]:
    spec_path, out_path = work / f"{name}-spec.json", work / f"{name}.json"
    out_path.unlink(missing_ok=True)  # never read a previous run's figures
    spec = {**spec, "spawned_at": time.monotonic()}  # CLOCK_MONOTONIC: shared by processes
    spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    print(f"--- {name}: python -m {module}", flush=True)
    started = time.monotonic()
    try:
        rc = subprocess.run(
            [sys.executable, "-m", module, str(spec_path), str(out_path)], timeout=timeout_s
        ).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    part: dict[str, Any] = {}
    if out_path.exists():
        part = json.loads(out_path.read_text(encoding="utf-8"))
    part["returncode"] = rc
    part["wall_s"] = time.monotonic() - started
    if rc != 0:
        part["error"] = "timed out" if rc == -1 else f"exited with {rc}"
        print(f"--- {name}: {part['error']} (partial results kept)", flush=True)
    return part


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine import IntakeLimits, physical_cores

    threads = args.threads or physical_cores()
    tokens = args.tokens or (16 if args.quick else 64)
    labels = args.images.split(",") if args.images else (["640x480"] if args.quick else list(IMAGES))
    unknown = [label for label in labels if label not in IMAGES]
    if unknown:
        raise SystemExit(f"unknown image {unknown[0]!r}: choose from {', '.join(IMAGES)}")
    queue_jobs = args.queue_jobs if args.queue_jobs is not None else (5 if args.quick else 50)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    model = ensure_model(args.model, args.any_model)
    image_dir = CACHE / "images"
    images = write_images(image_dir, {label: IMAGES[label] for label in labels})
    conc_label = "640x480"
    conc_images = [
        write_images(image_dir, {conc_label: IMAGES[conc_label]}, seed=s)[conc_label]
        for s in range(1, 1 + args.concurrent)
    ]
    result: dict[str, Any] = {
        "machine": machine(threads),
        "config": {
            "quick": args.quick,
            "model": str(model),
            "new_tokens": tokens,
            "images": labels,
            "threads": threads,
            "concurrent": args.concurrent,
            "queue_jobs": queue_jobs,
            "engine_options": options(args.engine_option),
            "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        },
    }
    print("machine: " + json.dumps(result["machine"]), flush=True)
    bw = measure_bandwidth(threads)
    bandwidth = bw["gb_s"] * 1e9
    result["bandwidth"] = {
        **bw,
        "lm_params": QWEN3_VL_2B_LM_PARAMS,
        "bytes_per_token": lm_bytes_per_token(),
        "decode_limit_tok_s": decode_limit_tok_s(bandwidth),
    }
    print(
        f"bandwidth: {bw['gb_s']:.1f} GB/s"
        f" -> decode limit {result['bandwidth']['decode_limit_tok_s']:.1f} tok/s",
        flush=True,
    )

    budget_pixels = IntakeLimits().max_pixels
    base = {"model": str(model), "threads": threads, "new_tokens": tokens, "images": images}
    # each part writes its JSON here as it goes: a run stopped early still leaves its figures
    work = out.parent / (out.stem + "-parts")
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_raw:
        skip = [] if args.raw_12mp_defaults else ["4032x3024"]
        result["raw"] = run_part(
            "benchmarks.raw_part",
            {
                **base,
                "dtype": "auto",
                "budget_pixels": budget_pixels,
                "skip_defaults": skip,
                "question": "Describe this image in detail.",
            },
            work,
            "raw",
            args.part_timeout,
        )
        measured = result["raw"].get("lm_bytes_per_token")
        if measured:
            result["bandwidth"]["bytes_per_token_measured"] = measured
    if not args.skip_vlbot:
        result["vlbot"] = run_part(
            "benchmarks.vlbot_part",
            {
                **base,
                "engine_options": {"threads": threads, **options(args.engine_option)},
                "followup": True,
                "followup_tokens": min(16, tokens),
                "concurrent": args.concurrent,
                "concurrent_image": conc_label,
                "concurrent_images": conc_images,
                "queue_jobs": queue_jobs,
            },
            work,
            "vlbot",
            args.part_timeout,
        )
    quantized = []
    for label, quant in quant_variants(args.quant_option):
        part = run_part(
            "benchmarks.vlbot_part",
            {
                **base,
                "images": write_images(image_dir, {conc_label: IMAGES[conc_label]}),
                "engine_options": {"threads": threads, **quant},
                "followup": False,
                "concurrent": 0,
                "queue_jobs": 0,
            },
            work,
            "quantized-" + "-".join(str(v) for v in quant.values()),
            args.part_timeout,
        )
        run = (part.get("runs") or [{}])[0]
        quantized.append(
            {
                "option": label,
                "image": conc_label,
                "ttft_s": run.get("ttft_s"),
                "decode_tok_s": run.get("decode_tok_s"),
                "read_gb_s": run.get("read_gb_s"),
                "read_before_gb_s": run.get("read_before_gb_s"),
                "peak_rss_bytes": part.get("peak_rss_bytes"),
                "weights_bytes": part.get("weights_bytes"),
                "bytes_per_token": part.get("bytes_per_token"),
                "load_s": part.get("load_s"),
                "error": part.get("error") or run.get("error"),
            }
        )
    if quantized:
        result["quantized"] = quantized
    # measured again after the model runs (the figure varies on a shared VM): the best one counts
    again = measure_bandwidth(threads)
    result["bandwidth"]["gb_s_end"] = again["gb_s"]
    if again["gb_s"] > result["bandwidth"]["gb_s"]:
        result["bandwidth"]["gb_s_start"] = result["bandwidth"]["gb_s"]
        result["bandwidth"]["gb_s"] = again["gb_s"]
    set_decode_limits(result)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.monotonic() - started
    result["floors"] = evaluate_floors(result)
    report = render_report(result)
    out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    out.with_suffix(".md").write_text(report, encoding="utf-8")
    print()
    print(report)
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
