"""Rounds of the benchmark on one CPU tier, llama.cpp's rows in each, and the tier's floors over
all of them.

    python -m benchmarks.rounds --rounds 3 --out bench-out/avx2 -- --quick \\
        --quant-option quantize=int8 --quant-option quantize=int4

Each round runs ``benchmarks.run`` (the options after ``--``) into OUT/round-N/result.json and
then ``benchmarks.peers.llama_cpp --merge-into`` it, so every round holds vlbot, raw transformers
and llama.cpp measured within the same few minutes; rounds follow each other, so a VM whose memory
speed drifts slows every engine of a round alike. The tier is the process environment's (force
a lower one with ``VLBOT_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``); llama.cpp's
build follows it (``native``, or the forced tier's build) unless ``--peers`` names a plan.

OUT/summary.md (and .json): each floor of benchmarks.tier_floors per round, its median over the
rounds and in how many rounds it held; the main figures per round and their medians.
``--summarize`` only rewrites the summary from the rounds already in OUT.

A manual tool: never part of the test suite (a round takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.helpers import fmt_rate, fmt_s, markdown_table
from benchmarks.tier_floors import (
    MARKS,
    default_run,
    peer_run,
    quantized_run,
    raw_run,
    shown,
    tier_floors,
)

PEER_QUANTS = "BF16,F16,Q8_0,Q4_K_M"


def default_plan(environ: Mapping[str, str]) -> str:
    """llama.cpp's build for this process's tier: the forced tier's, else the native one."""
    forced = environ.get("VLBOT_CPU", "").strip().lower()
    build = forced if forced in ("avx2", "avx512") else "native"
    return f"{build}:{PEER_QUANTS}"


def run_round(index: int, out: Path, run_args: Sequence[str], plan: str | None) -> Path:
    folder = out / f"round-{index}"
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / "result.json"
    subprocess.run([sys.executable, "-m", "benchmarks.run", *run_args, "--out", str(result)], check=True)
    if plan:
        peers = [sys.executable, "-m", "benchmarks.peers.llama_cpp", "--plan", plan]
        peers += ["--merge-into", str(result), "--out", str(folder / "llama_cpp.json")]
        subprocess.run(peers, check=True)
    return result


def load_rounds(out: Path) -> list[dict[str, Any]]:
    found = sorted(out.glob("round-*/result.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return [json.loads(p.read_text(encoding="utf-8")) for p in found]


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


Records = list[dict[str, Any]]


def floors_table(rounds: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]], Records]:
    """Markdown headers and rows (a floor per row, a column per round, the median, the count of
    rounds that held it) and the same as records."""
    per_round = [tier_floors(result) for result in rounds]
    headers = ["floor", "target", *(f"round {i + 1}" for i in range(len(rounds))), "median", "held"]
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for position, first in enumerate(per_round[0] if per_round else []):
        floors = [found[position] for found in per_round]
        values = [f.value for f in floors]
        median = _median(values)
        held = sum(f.ok is True for f in floors)
        # the median judged like one round's figure (ratios; seconds for the load; bytes over)
        median_ok = None if median is None else first.holds(median)
        verdict = "" if median_ok is None else f", median {'met' if median_ok else 'missed'}"
        rows.append(
            [
                first.name,
                first.target,
                *("—" if f.value is None else f"{shown(f, f.value)} {MARKS[f.ok]}" for f in floors),
                shown(first, median),
                f"{held}/{len(floors)}{verdict}",
            ]
        )
        records.append(
            {
                "key": first.key,
                "name": first.name,
                "target": first.target,
                "values": values,
                "ok": [f.ok for f in floors],
                "median": median,
                "median_met": median_ok,
                "held": held,
            }
        )
    return headers, rows, records


ENGINES = (
    "raw", "default", "int8", "int4", "llama.cpp BF16", "llama.cpp F16", "llama.cpp Q8_0", "llama.cpp Q4_K_M",
)  # fmt: skip


def engine_runs(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any] | None]:
    """Each engine's run at the shared image, by the name ENGINES gives it."""
    return {
        "raw": raw_run(result),
        "default": default_run(result),
        "int8": quantized_run(result, "quantize=int8"),
        "int4": quantized_run(result, "quantize=int4"),
        **{f"llama.cpp {quant}": peer_run(result, quant) for quant in PEER_QUANTS.split(",")},
    }


def figures(result: Mapping[str, Any]) -> dict[tuple[str, str], float | None]:
    """(engine, "first token" | "decode") -> seconds or tokens/s."""
    out: dict[tuple[str, str], float | None] = {}
    for engine, run in engine_runs(result).items():
        first_key = "first_token_s" if engine.startswith("llama") else "ttft_s"
        for what, key in (("first token", first_key), ("decode", "decode_tok_s")):
            value = None if run is None else run.get(key)
            out[engine, what] = float(value) if isinstance(value, int | float) else None
    return out


def figures_table(rounds: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    found = [figures(result) for result in rounds]
    headers = ["figure", *(f"round {i + 1}" for i in range(len(rounds))), "median"]
    rows = []
    for engine in ENGINES:
        for what, fmt in (("first token", fmt_s), ("decode", fmt_rate)):
            values = [f[engine, what] for f in found]
            rows.append([f"{engine} {what}", *(fmt(v) for v in values), fmt(_median(values))])
    return headers, rows


def summary(rounds: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The Markdown summary of the rounds and its JSON record."""
    if not rounds:
        return "no rounds found\n", {"rounds": 0}
    machine = rounds[0].get("machine") or {}
    tier = machine.get("cpu_tier", "?")
    bandwidths = [(r.get("bandwidth") or {}).get("gb_s") for r in rounds]
    head = (
        f"{len(rounds)} rounds on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores),"
        f" CPU tier {tier}; {(rounds[0].get('config') or {}).get('new_tokens', '?')} new tokens;"
        f" 2 GiB probe per round: {', '.join(f'{b:.0f}' for b in bandwidths if b)} GB/s."
    )
    f_headers, f_rows, records = floors_table(rounds)
    g_headers, g_rows = figures_table(rounds)
    floors, numbers = markdown_table(f_headers, f_rows), markdown_table(g_headers, g_rows)
    text = "\n".join([head, "", "Floors", "", floors, "", "Figures", "", numbers, ""])
    return text, {"rounds": len(rounds), "tier": tier, "floors": records}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, run_args = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(prog="python -m benchmarks.rounds", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench-out/rounds", help="folder of the rounds and the summary")
    p.add_argument("--peers", help="llama.cpp plan (default: this tier's build with BF16, F16, Q8_0, Q4_K_M)")
    p.add_argument("--no-peers", action="store_true", help="no llama.cpp rows")
    p.add_argument("--summarize", action="store_true", help="only rewrite the summary of OUT's rounds")
    return p.parse_args(argv), run_args


def main(argv: Sequence[str] | None = None) -> int:
    args, run_args = parse_args(argv)
    out = Path(args.out)
    if not args.summarize:
        plan = None if args.no_peers else (args.peers or default_plan(os.environ))
        for index in range(1, args.rounds + 1):
            print(f"=== round {index} of {args.rounds}", flush=True)
            try:
                run_round(index, out, run_args, plan)
            except subprocess.CalledProcessError as e:
                raise SystemExit(
                    f"round {index}: `{' '.join(map(str, e.cmd))}` exited with {e.returncode};"
                    f" the rounds before it are in {out} (--summarize sums them up)"
                ) from None
    text, record = summary(load_rounds(out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(text)
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
