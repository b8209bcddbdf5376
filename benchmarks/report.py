"""The floors of issue 6 and the Markdown report, read from the result JSON of ``benchmarks.run``
(its shape is described there). Pure: tested in tests/test_benchmark_helpers.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.helpers import (
    GB,
    fmt_gb,
    fmt_int,
    fmt_rate,
    fmt_ratio,
    fmt_s,
    markdown_table,
    ratio,
)

FOLLOW_UP_IMAGE = "1920x1080"  # the floor is stated for a 1080p screenshot

Result = Mapping[str, Any]


# --- reading a result --------------------------------------------------------------------------


def get(run: Mapping[str, Any] | None, key: str) -> Any:
    """`run[key]`, or None when the run (or the key) is missing."""
    return None if run is None else run.get(key)


def raw_run(result: Result, image: str, *variants: str) -> Mapping[str, Any] | None:
    """The raw-transformers run for `image` whose variant is one of `variants`."""
    for run in (result.get("raw") or {}).get("runs", []):
        if run.get("image") == image and run.get("variant") in variants and not run.get("error"):
            return run  # type: ignore[no-any-return]
    return None


def vlbot_run(result: Result, image: str) -> Mapping[str, Any] | None:
    for run in (result.get("vlbot") or {}).get("runs", []):
        if run.get("image") == image and not run.get("error"):
            return run  # type: ignore[no-any-return]
    return None


DEFAULTS = ("defaults", "defaults=budget")
BUDGET = ("budget", "defaults=budget")


def _images(result: Result) -> list[str]:
    return [str(i) for i in (result.get("config") or {}).get("images", [])]


def evaluate_floors(result: Result) -> list[dict[str, Any]]:
    """The issue's floors, each with the figure reached: name, target, value, reached, ok
    (None where this run did not measure it)."""
    floors: list[dict[str, Any]] = []

    def add(name: str, target: str, value: float | None, ok: bool | None, reached: str) -> None:
        floors.append({"name": name, "target": target, "value": value, "ok": ok, "reached": reached})

    # 1. end-to-end through the runner against raw generate on the same input
    e2e = []
    for image in _images(result):
        bot, raw = vlbot_run(result, image), raw_run(result, image, *BUDGET)
        r = ratio(get(bot, "e2e_s"), get(raw, "total_s"))
        if r is not None:
            e2e.append((image, r))
    worst = max(e2e, key=lambda x: x[1]) if e2e else None
    add(
        "end-to-end bot latency vs raw generate, same input",
        "≤ 1.05×",
        worst[1] if worst else None,
        worst[1] <= 1.05 if worst else None,
        ", ".join(f"{i}: {fmt_ratio(r)}" for i, r in e2e) or "not measured",
    )

    # 2. follow-up time to first token against the first turn's
    images = _images(result)
    follow_image = FOLLOW_UP_IMAGE if FOLLOW_UP_IMAGE in images else (images[0] if images else "")
    bot = vlbot_run(result, follow_image)
    follow = (bot or {}).get("followup") or {}
    r = ratio(follow.get("ttft_s"), get(bot, "ttft_s"))
    add(
        f"follow-up TTFT vs first turn ({follow_image})",
        "≤ 0.10×",
        r,
        None if r is None else r <= 0.10,
        "not measured"
        if r is None
        else f"{fmt_s(follow.get('ttft_s'))} vs {fmt_s(get(bot, 'ttft_s'))} = {fmt_ratio(r)}",
    )

    # 3. 1080p time to first token with defaults against raw at processor defaults
    bot, raw = vlbot_run(result, "1920x1080"), raw_run(result, "1920x1080", *DEFAULTS)
    r = ratio(get(bot, "ttft_s"), get(raw, "ttft_s"))
    add(
        "1080p TTFT, vlbot defaults vs raw processor defaults",
        "≤ 0.35×",
        r,
        None if r is None else r <= 0.35,
        "not measured"
        if r is None
        else f"{fmt_s(get(bot, 'ttft_s'))} vs {fmt_s(get(raw, 'ttft_s'))} = {fmt_ratio(r)}",
    )

    # 4. concurrent chats
    conc = (result.get("vlbot") or {}).get("concurrent") or {}
    r = ratio(conc.get("steady_tok_s"), conc.get("single_tok_s"))
    inter = conc.get("interleaved")
    ok = None if r is None else (r >= 2.5 and inter is not False)
    add(
        f"{conc.get('n_chats', 4)} concurrent chats: aggregate decode vs one chat; first tokens interleaved",
        "≥ 2.5×, yes",
        r,
        ok,
        "not measured"
        if r is None
        else f"{fmt_rate(conc.get('steady_tok_s'))} vs {fmt_rate(conc.get('single_tok_s'))}"
        f" = {fmt_ratio(r)}; interleaved: {inter}",
    )

    # 5. bf16 decode against raw generate, and as % of the bandwidth limit
    limit = (result.get("bandwidth") or {}).get("decode_limit_tok_s")
    pairs = []
    for image in images:
        bot, raw = vlbot_run(result, image), raw_run(result, image, *BUDGET)
        r = ratio(get(bot, "decode_tok_s"), get(raw, "decode_tok_s"))
        if r is not None and bot is not None:
            pairs.append((image, r, bot.get("decode_tok_s")))
    low = min(pairs, key=lambda p: p[1]) if pairs else None
    bytes_per_token = (result.get("vlbot") or {}).get("bytes_per_token")
    pct = ", ".join(
        f"{i}: {100 * v / limit:.0f} % of limit"
        + read_share(v, get(vlbot_run(result, i), "read_gb_s"), bytes_per_token)
        for i, _, v in pairs
        if limit and v
    )
    add(
        "bf16 decode vs raw generate (same run)",
        "≥ 1.8×",
        low[1] if low else None,
        None if low is None else low[1] >= 1.8,
        "not measured"
        if low is None
        else ", ".join(f"{i}: {fmt_ratio(r)}" for i, r, _ in pairs) + (f"; {pct}" if pct else ""),
    )

    # 6. the quantized options, each its own run
    for quant in quantized_runs(result) or [{}]:
        raw = raw_run(result, str(quant.get("image", "")), *BUDGET)
        r = ratio(quant.get("decode_tok_s"), get(raw, "decode_tok_s"))
        limit = quant.get("decode_limit_tok_s")
        share = f", {100 * quant['decode_tok_s'] / limit:.0f} % of its limit" if limit and r else ""
        share += read_share(quant.get("decode_tok_s"), quant.get("read_gb_s"), quant.get("bytes_per_token"))
        reached = None if r is None else f"{fmt_rate(quant.get('decode_tok_s'))} = {fmt_ratio(r)}{share}"
        add(
            f"quantized decode ({quant.get('option', 'int4 option')}) vs raw generate",
            "≥ 2.8×",
            r,
            None if r is None else r >= 2.8,
            quant.get("error")
            or reached
            or "not measured",
        )

    # 7. ready time
    vl = result.get("vlbot") or {}
    load = vl.get("load_s")
    add(
        "load-to-ready (engine.load(), model on local disk)",
        "≤ 5 s",
        load,
        None if load is None else load <= 5.0,
        "not measured" if load is None else fmt_s(load),
    )

    # 8. memory
    peak, weights = vl.get("peak_rss_bytes"), vl.get("weights_bytes")
    over = None if peak is None or weights is None else peak - weights
    add(
        "peak RSS vs weights + 1.5 GB",
        "≤ +1.5 GB",
        over,
        None if over is None else over <= 1.5 * GB,
        "not measured"
        if over is None
        else f"{fmt_gb(peak)} peak, {fmt_gb(weights)} weights (+{fmt_gb(over)})",
    )
    queue = vl.get("queue") or {}
    g = queue.get("rss_growth_pct")
    add(
        f"RSS flat over {queue.get('jobs', 'N')} queued requests",
        "±5 %",
        g,
        None if g is None else abs(g) <= 5.0,
        "not measured" if g is None else f"{g:+.1f} % (peak {fmt_gb(queue.get('peak_rss_bytes'))})",
    )
    return floors


# --- the report --------------------------------------------------------------------------------


def read_share(rate: Any, read_gb_s: Any, bytes_per_token: Any) -> str:
    """", N % of a read right after": decode tok/s against the limit that the memory speed
    measured right after that decode gives (a plain sum over the layers' memory; see
    benchmarks.helpers.layer_read_rate), or "" where the run lacks a figure."""
    if not (rate and read_gb_s and bytes_per_token):
        return ""
    limit = float(read_gb_s) * 1e9 / float(bytes_per_token)
    return f" ({100 * float(rate) / limit:.0f} % of a read right after, {float(read_gb_s):.0f} GB/s)"


def quantized_runs(result: Result) -> list[dict[str, Any]]:
    """The quantized runs, one per `--quant-option quantize=...` (older results: one dict)."""
    quant = result.get("quantized")
    if isinstance(quant, dict):
        return [quant]
    return list(quant or [])


def machine_line(result: Result) -> str:
    m = result.get("machine") or {}
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('threads', '?')} torch threads),"
        f" {fmt_gb(m.get('memory_bytes'))} RAM; torch {m.get('torch', '?')},"
        f" transformers {m.get('transformers', '?')}; {m.get('dtype', 'bfloat16')};"
        f" {(result.get('config') or {}).get('new_tokens', '?')} new tokens per answer"
        f"{_load_note(m)}{_tier_note(m)}"
    )


def _tier_note(machine: Mapping[str, Any]) -> str:
    """The CPU tier the kernels were built for (VLBOT_CPU may force a lower one) and those in use."""
    if not machine.get("cpu_tier"):
        return ""
    return f"; CPU tier {machine['cpu_tier']} (C kernels: {machine.get('kernels') or 'none'})"


def _load_note(machine: Mapping[str, Any]) -> str:
    """The 1-minute load average before and after the run: other work skews every figure."""
    start, end = machine.get("loadavg_start"), machine.get("loadavg_end")
    if not start or not end:
        return ""
    return f"; load average {float(start[0]):.1f} at start, {float(end[0]):.1f} at end"


def render_report(result: Result) -> str:
    images = _images(result)
    first_rows = []
    same_rows = []
    for image in images:
        raw_d, raw_b, bot = (
            raw_run(result, image, *DEFAULTS),
            raw_run(result, image, *BUDGET),
            vlbot_run(result, image),
        )
        follow = (bot or {}).get("followup") or {}
        first_rows.append(
            [
                image,
                fmt_int(get(raw_d, "visual_tokens")),
                fmt_s(get(raw_d, "ttft_s")),
                fmt_rate(get(raw_d, "decode_tok_s")),
                fmt_int(get(bot, "visual_tokens")),
                fmt_s(get(bot, "ttft_s")),
                fmt_rate(get(bot, "decode_tok_s")),
                fmt_ratio(ratio(get(bot, "ttft_s"), get(raw_d, "ttft_s"))),
                fmt_s(follow.get("ttft_s"))
                + (f" ({follow['reused_tokens']} tokens cached)" if follow.get("reused_tokens") else ""),
            ]
        )
        same_rows.append(
            [
                image,
                f"{fmt_int(get(raw_b, 'visual_tokens'))} / {fmt_int(get(bot, 'visual_tokens'))}",
                f"{fmt_int(get(raw_b, 'tokens'))} / {fmt_int(get(bot, 'tokens'))}",
                fmt_s(get(raw_b, "total_s")),
                fmt_s(get(bot, "e2e_s")),
                fmt_ratio(ratio(get(bot, "e2e_s"), get(raw_b, "total_s"))),
                fmt_rate(get(raw_b, "decode_tok_s")),
                fmt_rate(get(bot, "decode_tok_s")),
                fmt_ratio(ratio(get(bot, "decode_tok_s"), get(raw_b, "decode_tok_s"))),
            ]
        )
    parts = [f"Machine: {machine_line(result)}", ""]
    parts.append("First turn: raw transformers `generate` at processor defaults vs vlbot defaults")
    parts.append("")
    parts.append(
        markdown_table(
            [
                "image",
                "raw visual tokens",
                "raw TTFT",
                "raw decode",
                "vlbot visual tokens",
                "vlbot TTFT",
                "vlbot decode",
                "TTFT vlbot/raw",
                "vlbot follow-up TTFT",
            ],
            first_rows,
        )
    )
    parts += [
        "",
        "Same input (raw at vlbot's pixel budget): whole answer, raw `generate` vs bot submit → Final",
        "",
    ]
    parts.append(
        markdown_table(
            [
                "image",
                "visual tokens raw / vlbot",
                "new tokens raw / vlbot",
                "raw generate",
                "bot end-to-end",
                "ratio",
                "raw decode",
                "vlbot decode",
                "decode ratio",
            ],
            same_rows,
        )
    )
    parts += ["", markdown_table(["figure", "value"], summary_rows(result))]
    parts += llama_cpp_section(result)
    from benchmarks.tier_floors import tier_floors_section  # it reads results with this module's helpers

    parts += tier_floors_section(result)
    parts += ["", "Floors", ""]
    parts.append(
        markdown_table(
            ["floor", "target", "reached", "met"],
            [
                [f["name"], f["target"], f["reached"], {True: "yes", False: "NO", None: "—"}[f["ok"]]]
                for f in evaluate_floors(result)
            ],
        )
    )
    return "\n".join(parts) + "\n"


def summary_rows(result: Result) -> list[list[str]]:
    bw = result.get("bandwidth") or {}
    vl = result.get("vlbot") or {}
    raw = result.get("raw") or {}
    conc = vl.get("concurrent") or {}
    rows = [
        [
            "memory bandwidth (fp32 sum over 2 GiB, best of 7 before and 7 after the runs)",
            f"{bw.get('gb_s', 0):.1f} GB/s" if bw else "—",
        ],
        [
            "decode limit (bandwidth ÷ LM bytes per token)",
            f"{fmt_rate(bw.get('decode_limit_tok_s'))} ({fmt_gb(bw.get('bytes_per_token'))} per token)"
            if bw
            else "—",
        ],
        [
            "load-to-ready: vlbot engine.load() / raw from_pretrained",
            f"{fmt_s(vl.get('load_s'))} / {fmt_s(raw.get('load_s'))}",
        ],
        [
            "peak RSS: vlbot / raw (weights)",
            f"{fmt_gb(vl.get('peak_rss_bytes'))} / {fmt_gb(raw.get('peak_rss_bytes'))}"
            f" ({fmt_gb(vl.get('weights_bytes'))})",
        ],
    ]
    if conc:
        ttfts = ", ".join(fmt_s(c.get("first_token_s")) for c in conc.get("chats", []))
        rows += [
            [f"{conc.get('n_chats')} concurrent chats ({conc.get('image')}): each chat's TTFT", ttfts],
            [
                f"{conc.get('n_chats')} concurrent chats: aggregate decode while all decode (overall)",
                f"{fmt_rate(conc.get('steady_tok_s'))} ({fmt_rate(conc.get('overall_tok_s'))})"
                f"; one chat alone {fmt_rate(conc.get('single_tok_s'))}",
            ],
        ]
    for quant in quantized_runs(result):
        limit = quant.get("decode_limit_tok_s")
        rows.append(
            [
                f"quantized ({quant.get('option')}) at {quant.get('image')}: TTFT / decode (limit)"
                " / load / peak RSS (weights)",
                quant.get("error")
                or f"{fmt_s(quant.get('ttft_s'))} / {fmt_rate(quant.get('decode_tok_s'))}"
                f" ({fmt_rate(limit)}, {fmt_gb(quant.get('bytes_per_token'))} per token)"
                f" / {fmt_s(quant.get('load_s'))} / {fmt_gb(quant.get('peak_rss_bytes'))}"
                f" ({fmt_gb(quant.get('weights_bytes'))})",
            ]
        )
    return rows


def llama_cpp_section(result: Result) -> list[str]:
    """The section "llama.cpp on the same machine": the rows `benchmarks.peers.llama_cpp
    --merge-into` stored under "llama_cpp", beside this run's vlbot figures at the same images;
    nothing when the result has none."""
    peers = result.get("llama_cpp") or {}
    if not peers.get("runs"):
        return []
    vl = result.get("vlbot") or {}
    rows: list[list[str]] = []
    for image in dict.fromkeys(str(r.get("image")) for r in peers["runs"]):
        bot = vlbot_run(result, image)
        if bot is not None:
            rows.append(
                [
                    "vlbot",
                    "default",
                    image,
                    fmt_int(get(bot, "visual_tokens")),
                    fmt_s(get(bot, "ttft_s")),
                    fmt_rate(get(bot, "decode_tok_s")),
                    fmt_gb(vl.get("peak_rss_bytes")),
                ]
            )
        for quant in quantized_runs(result):
            if quant.get("image") == image and not quant.get("error"):
                rows.append(
                    [
                        "vlbot",
                        str(quant.get("option")),
                        image,
                        "",
                        fmt_s(quant.get("ttft_s")),
                        fmt_rate(quant.get("decode_tok_s")),
                        fmt_gb(quant.get("peak_rss_bytes")),
                    ]
                )
        for run in (r for r in peers["runs"] if r.get("image") == image):
            head = [f"llama.cpp {run.get('build')}", str(run.get("quant")), image]
            if run.get("error"):
                rows.append([*head, str(run["error"]), "", "", ""])
                continue
            first = (
                f"{fmt_s(run.get('first_token_s'))} ({fmt_s(run.get('encode_s'))} vision encode,"
                f" {fmt_s(run.get('image_prefill_s'))} image prefill)"
            )
            rows.append(
                [
                    *head,
                    fmt_int(run.get("visual_tokens")),
                    first,
                    fmt_rate(run.get("decode_tok_s")),
                    fmt_gb(run.get("peak_rss_bytes")),
                ]
            )
    note = (
        f"llama-mtmd-cli from the {peers.get('source', '?')}, {peers.get('threads', '?')} threads,"
        f" {peers.get('mmproj', 'F16')} vision projector, at most {peers.get('max_visual_tokens', '?')}"
        f" visual tokens, {peers.get('new_tokens', '?')} forced new tokens, greedy{_load_note(peers)}."
        " Its first token: from the prompt's start to the first token (the log's timestamps)."
    )
    headers = ["engine", "weights", "image", "visual tokens", "first token", "decode", "peak RSS"]
    return ["", "llama.cpp on the same machine", "", note, "", markdown_table(headers, rows)]
