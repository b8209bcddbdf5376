"""The CPU-tier floors of one benchmark result with llama.cpp's rows merged in.

`benchmarks.run` measures raw transformers and vlbot (default, int8, int4) on one CPU tier;
`benchmarks.peers.llama_cpp --merge-into` adds llama.cpp's BF16, F16, Q8_0 and Q4_K_M rows for
the same tier's build. `tier_floors` judges what a CPU tier must show, each figure against its
peer in the same result:

- default decode >= 1.8x raw transformers' decode, and >= 80 % of the memory's limit at the
  bytes a step reads (the limit: the layers' memory read plainly right before and right after
  that decode, the faster of the two; the 2 GiB probe's best figure beside it);
- int8 decode >= llama.cpp Q8_0's, int4 >= Q4_K_M's; their first token <= the default's;
- the default's first token <= raw transformers' at the same input and <= llama.cpp BF16's, and
  <= its F16's where the result has it (on a CPU without bf16 arithmetic llama.cpp's F16, F16C
  conversions, is the faster of the two: on an AVX2-only Zen3 19.0 s against 22.0 s);
- 4 concurrent chats: aggregate decode >= 2.5x one chat;
- load-to-ready <= 5 s and peak RSS <= weights as held + 1.5 GB, quantized too.

A floor whose figures are missing is None (not measured), never met.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from benchmarks.helpers import GB, fmt_rate, fmt_ratio, fmt_s, markdown_table, ratio
from benchmarks.report import BUDGET, quantized_runs, vlbot_run
from benchmarks.report import raw_run as report_raw_run

Result = Mapping[str, Any]

IMAGE = "640x480"  # the image the quantized runs and llama.cpp's rows share
PEER_OF = {"quantize=int8": "Q8_0", "quantize=int4": "Q4_K_M"}


@dataclass(frozen=True)
class Floor:
    """One floor of one result: its figure (a ratio, a share, seconds or bytes), the limit it is
    held to (`at_least` it, or at most), whether it holds, in words."""

    key: str
    name: str
    target: str
    limit: float
    at_least: bool
    value: float | None
    ok: bool | None
    reached: str

    def holds(self, value: float) -> bool:
        """Whether `value` (this floor's figure, e.g. a median over rounds) meets the floor."""
        return value >= self.limit if self.at_least else value <= self.limit


def _floor(
    key: str, name: str, target: str, limit: float, at_least: bool, value: float | None, reached: str
) -> Floor:
    floor = Floor(key, name, target, limit, at_least, value, None, reached)
    return floor if value is None else replace(floor, ok=floor.holds(value))


def _first(runs: Any, **match: Any) -> Mapping[str, Any] | None:
    for run in runs or []:
        if all(run.get(k) == v for k, v in match.items()) and not run.get("error"):
            return run  # type: ignore[no-any-return]
    return None


def default_run(result: Result) -> Mapping[str, Any] | None:
    return vlbot_run(result, IMAGE)


def raw_run(result: Result) -> Mapping[str, Any] | None:
    return report_raw_run(result, IMAGE, *BUDGET)


def peer_run(result: Result, quant: str) -> Mapping[str, Any] | None:
    return _first((result.get("llama_cpp") or {}).get("runs"), image=IMAGE, quant=quant)


def quantized_run(result: Result, option: str) -> Mapping[str, Any] | None:
    return _first(quantized_runs(result), option=option)


def _num(run: Mapping[str, Any] | None, key: str) -> float | None:
    value = None if run is None else run.get(key)
    return float(value) if isinstance(value, int | float) else None


def _at_most(key: str, name: str, value: float | None, limit: float | None, text: str) -> Floor:
    r = ratio(value, limit)
    shown = "not measured" if r is None else f"{text} = {fmt_ratio(r)}"
    return _floor(key, name, "≤ 1.0×", 1.0, False, r, shown)


def _first_token(key: str, name: str, first: float | None, limit: float | None) -> Floor:
    """A first token no slower than `limit`'s (seconds)."""
    return _at_most(key, name, first, limit, f"{fmt_s(first)} vs {fmt_s(limit)}")


def _at_least(key: str, name: str, floor: float, value: float | None, base: float | None, text: str) -> Floor:
    r = ratio(value, base)
    shown = "not measured" if r is None else f"{text} = {fmt_ratio(r)}"
    return _floor(key, name, f"≥ {floor:g}×", floor, True, r, shown)


def bandwidth_share(result: Result) -> tuple[float | None, float | None]:
    """The default decode as a share of (the limit at the plain reads around it, the 2 GiB
    probe's limit)."""
    bot = default_run(result)
    rate = _num(bot, "decode_tok_s")
    per_token = (result.get("vlbot") or {}).get("bytes_per_token")
    reads = [v for v in (_num(bot, "read_before_gb_s"), _num(bot, "read_gb_s")) if v]
    around = None
    if rate and per_token and reads:
        around = rate * float(per_token) / (max(reads) * 1e9)
    limit = (result.get("bandwidth") or {}).get("decode_limit_tok_s")
    probe = ratio(rate, float(limit)) if limit else None
    return around, probe


def tier_floors(result: Result) -> list[Floor]:
    floors: list[Floor] = []
    bot, raw = default_run(result), raw_run(result)
    bot_rate, bot_first = _num(bot, "decode_tok_s"), _num(bot, "ttft_s")

    floors.append(
        _at_least(
            "decode_vs_raw", "default decode vs raw transformers", 1.8, bot_rate, _num(raw, "decode_tok_s"),
            f"{fmt_rate(bot_rate)} vs {fmt_rate(_num(raw, 'decode_tok_s'))}",
        )
    )  # fmt: skip
    around, probe = bandwidth_share(result)
    of_probe = "" if probe is None else f" ({100 * probe:.0f} % of the probe's)"
    floors.append(
        _floor(
            "decode_share",
            "default decode vs the memory's limit (reads around it; 2 GiB probe)",
            "≥ 80 %",
            0.8,
            True,
            around,
            "not measured"
            if around is None
            else f"{100 * around:.0f} %{of_probe}",
        )
    )
    for option, peer in PEER_OF.items():
        quant, llama = quantized_run(result, option), peer_run(result, peer)
        rate, peer_rate = _num(quant, "decode_tok_s"), _num(llama, "decode_tok_s")
        label = option.partition("=")[2]
        floors.append(
            _at_least(
                f"{label}_vs_{peer}", f"{label} decode vs llama.cpp {peer}", 1.0, rate, peer_rate,
                f"{fmt_rate(rate)} vs {fmt_rate(peer_rate)}",
            )
        )  # fmt: skip
        first = _num(quant, "ttft_s")
        name = f"{label} first token vs the default's"
        floors.append(_first_token(f"{label}_first_token", name, first, bot_first))
    raw_first = _num(raw, "ttft_s")
    name = "default first token vs raw transformers (same input)"
    floors.append(_first_token("first_vs_raw", name, bot_first, raw_first))
    for peer in ("BF16", "F16"):
        llama = peer_run(result, peer)
        if llama is None and peer == "F16":
            continue  # results from before F16 was in the plan
        name = f"default first token vs llama.cpp {peer}"
        floors.append(_first_token(f"first_vs_{peer}", name, bot_first, _num(llama, "first_token_s")))
    conc = (result.get("vlbot") or {}).get("concurrent") or {}
    steady, single = conc.get("steady_tok_s"), conc.get("single_tok_s")
    floors.append(
        _at_least(
            "four_chats", "4 concurrent chats' decode vs one chat's", 2.5, steady, single,
            f"{fmt_rate(steady)} vs {fmt_rate(single)}",
        )
    )  # fmt: skip
    floors.append(_loads(result))
    floors.append(_memory(result))
    return floors


def _parts(result: Result) -> list[tuple[str, Mapping[str, Any]]]:
    vl = result.get("vlbot")
    parts: list[tuple[str, Mapping[str, Any]]] = [("default", vl)] if vl else []
    parts += [(str(q.get("option")), q) for q in quantized_runs(result)]
    return parts


def _loads(result: Result) -> Floor:
    loads = [(label, _num(part, "load_s")) for label, part in _parts(result)]
    known = [(label, s) for label, s in loads if s is not None]
    worst = max((s for _, s in known), default=None)
    return _floor(
        "load",
        "load-to-ready, every mode",
        "≤ 5 s",
        5.0,
        False,
        None if len(known) != len(loads) else worst,
        ", ".join(f"{label} {fmt_s(s)}" for label, s in known) or "not measured",
    )


def _memory(result: Result) -> Floor:
    overs: list[tuple[str, float | None]] = []
    for label, part in _parts(result):
        peak, weights = _num(part, "peak_rss_bytes"), _num(part, "weights_bytes")
        overs.append((label, None if peak is None or weights is None else peak - weights))
    known = [(label, o) for label, o in overs if o is not None]
    worst = max((o for _, o in known), default=None)
    return _floor(
        "memory",
        "peak RSS over weights as held, every mode",
        "≤ +1.5 GB",
        1.5 * GB,
        False,
        None if len(known) != len(overs) else worst,
        ", ".join(f"{label} {o / GB:+.2f} GB" for label, o in known) or "not measured",
    )


def shown(floor: Floor, value: float | None) -> str:
    """A floor's figure in its own unit: a ratio, a share, seconds or bytes over the weights."""
    if value is None:
        return "—"
    if floor.key == "load":
        return fmt_s(value)
    if floor.key == "memory":
        return f"{value / GB:+.2f} GB"
    if floor.key == "decode_share":
        return f"{100 * value:.0f} %"
    return fmt_ratio(value)


MARKS = {True: "yes", False: "NO", None: "—"}


def tier_floors_section(result: Result) -> list[str]:
    """The report's "CPU tier floors" section: only once llama.cpp's rows are merged in."""
    if not (result.get("llama_cpp") or {}).get("runs"):
        return []
    rows = [[f.name, f.target, f.reached, MARKS[f.ok]] for f in tier_floors(result)]
    tier = (result.get("machine") or {}).get("cpu_tier", "?")
    return [
        "",
        f"CPU tier floors ({tier}, {IMAGE}; each figure against its peer in this run)",
        "",
        markdown_table(["floor", "target", "reached", "met"], rows),
    ]
