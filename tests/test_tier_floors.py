"""The CPU-tier floors of a benchmark result and their summary over rounds (benchmarks.tier_floors,
benchmarks.rounds): the judging arithmetic only; the rounds themselves take minutes each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.report import render_report
from benchmarks.rounds import default_plan, figures, load_rounds, summary
from benchmarks.tier_floors import tier_floors, tier_floors_section

GB = 1e9


def result(
    *,
    default_first: float = 6.0,
    default_rate: float = 12.0,
    raw_first: float = 7.0,
    raw_rate: float = 3.0,
    int4_rate: float = 35.0,
    q4_rate: float = 30.0,
    steady: float = 33.0,
    reads: tuple[float, float] = (40.0, 50.0),
    with_peers: bool = True,
) -> dict[str, Any]:
    """A benchmark result of one tier as benchmarks.run and the llama.cpp merge write it."""
    out: dict[str, Any] = {
        "machine": {"cpu": "Test CPU", "cores": 2, "cpu_tier": "avx2"},
        "config": {"new_tokens": 16, "images": ["640x480"]},
        "bandwidth": {"gb_s": 50.0, "decode_limit_tok_s": 16.0},
        "raw": {"runs": [{"image": "640x480", "variant": "defaults=budget", "ttft_s": raw_first}]},
        "vlbot": {
            "load_s": 2.5,
            "peak_rss_bytes": 6.0 * GB,
            "weights_bytes": 5.0 * GB,
            "bytes_per_token": 3.125 * GB,
            "runs": [
                {
                    "image": "640x480",
                    "ttft_s": default_first,
                    "decode_tok_s": default_rate,
                    "read_before_gb_s": reads[0],
                    "read_gb_s": reads[1],
                }
            ],
            "concurrent": {"steady_tok_s": steady, "single_tok_s": default_rate},
        },
        "quantized": [
            {"option": "quantize=int8", "image": "640x480", "ttft_s": 4.0, "decode_tok_s": 22.0,
             "load_s": 2.4, "peak_rss_bytes": 4.1 * GB, "weights_bytes": 4.0 * GB},
            {"option": "quantize=int4", "image": "640x480", "ttft_s": 3.9, "decode_tok_s": int4_rate,
             "load_s": 6.5, "peak_rss_bytes": 3.2 * GB, "weights_bytes": 3.2 * GB},
        ],
    }  # fmt: skip
    out["raw"]["runs"][0]["decode_tok_s"] = raw_rate
    if with_peers:
        out["llama_cpp"] = {
            "runs": [
                {"image": "640x480", "quant": "BF16", "first_token_s": 6.5, "decode_tok_s": 11.0},
                {"image": "640x480", "quant": "F16", "first_token_s": 6.25, "decode_tok_s": 12.0},
                {"image": "640x480", "quant": "Q8_0", "first_token_s": 7.0, "decode_tok_s": 19.0},
                {"image": "640x480", "quant": "Q4_K_M", "first_token_s": 6.0, "decode_tok_s": q4_rate},
            ]
        }
    return out


def by_key(found: list[Any]) -> dict[str, Any]:
    return {floor.key: floor for floor in found}


def test_each_floor_is_judged_against_its_peer_in_the_same_result() -> None:
    floors = by_key(tier_floors(result()))
    assert floors["decode_vs_raw"].value == 4.0 and floors["decode_vs_raw"].ok
    assert floors["int8_vs_Q8_0"].ok and floors["int4_vs_Q4_K_M"].ok
    assert floors["first_vs_raw"].ok and floors["first_vs_BF16"].ok and floors["first_vs_F16"].ok
    assert floors["first_vs_F16"].value == 6.0 / 6.25
    assert floors["int4_first_token"].value == 3.9 / 6.0
    assert floors["four_chats"].value == 33.0 / 12.0 and floors["four_chats"].ok
    # int4 loaded in 6.5 s: the load floor covers every mode, not only the default
    assert floors["load"].value == 6.5 and floors["load"].ok is False
    assert floors["memory"].value == 1.0 * GB and floors["memory"].ok


def test_a_slower_peer_or_a_slower_first_token_fails_its_floor() -> None:
    floors = by_key(tier_floors(result(int4_rate=28.0, q4_rate=30.0, default_first=7.5, steady=24.0)))
    assert floors["int4_vs_Q4_K_M"].ok is False
    assert floors["first_vs_raw"].ok is False and floors["first_vs_BF16"].ok is False
    assert floors["first_vs_F16"].ok is False
    assert floors["four_chats"].ok is False
    # between llama.cpp's F16 (6.25 s) and BF16 (6.5 s): only the faster peer's floor fails
    between = by_key(tier_floors(result(default_first=6.3)))
    assert between["first_vs_BF16"].ok and between["first_vs_F16"].ok is False
    assert "NO" in "\n".join(tier_floors_section(result(int4_rate=28.0)))


def test_the_bandwidth_share_uses_the_faster_read_around_the_decode() -> None:
    # 12 tok/s x 3.125 GB = 37.5 GB/s read; the faster read around it was 60 GB/s: 62.5 %;
    # the probe's limit (16 tok/s) gives 75 %
    share = by_key(tier_floors(result(reads=(60.0, 30.0))))["decode_share"]
    assert share.value == 37.5 / 60.0 and share.ok is False
    assert share.reached == "62 % (75 % of the probe's)"
    assert by_key(tier_floors(result(reads=(40.0, 45.0))))["decode_share"].ok


def test_missing_peers_are_not_measured_and_the_report_leaves_the_section_out() -> None:
    bare = result(with_peers=False)
    floors = by_key(tier_floors(bare))
    assert floors["int8_vs_Q8_0"].ok is None and floors["first_vs_BF16"].ok is None
    assert "first_vs_F16" not in floors  # a plan without F16 (older results): no such floor
    assert tier_floors_section(bare) == []
    assert "CPU tier floors" not in render_report(bare)
    assert "CPU tier floors (avx2, 640x480" in render_report(result())


def test_rounds_summary_counts_the_rounds_and_judges_the_median(tmp_path: Path) -> None:
    rounds = [result(steady=24.0), result(steady=33.0), result(steady=31.0)]
    for index, found in enumerate(rounds, start=1):
        folder = tmp_path / f"round-{index * 5}"  # round-5, round-10, round-15: numeric order
        folder.mkdir()
        (folder / "result.json").write_text(json.dumps(found), encoding="utf-8")
    loaded = load_rounds(tmp_path)
    assert [r["vlbot"]["concurrent"]["steady_tok_s"] for r in loaded] == [24.0, 33.0, 31.0]
    text, record = summary(loaded)
    four = next(f for f in record["floors"] if f["key"] == "four_chats")
    assert four["held"] == 2 and four["ok"] == [False, True, True]
    assert four["median"] == 31.0 / 12.0 and four["median_met"] is True
    load = next(f for f in record["floors"] if f["key"] == "load")
    assert load["held"] == 0 and load["median_met"] is False
    assert "| 4 concurrent chats' decode vs one chat's" in text and "2/3, median met" in text
    assert figures(loaded[0])["llama.cpp Q4_K_M", "decode"] == 30.0


def test_llama_cpp_build_follows_the_forced_tier() -> None:
    assert default_plan({}) == "native:BF16,F16,Q8_0,Q4_K_M"
    assert default_plan({"VLBOT_CPU": "avx2"}) == "avx2:BF16,F16,Q8_0,Q4_K_M"
    assert default_plan({"VLBOT_CPU": "AVX512"}) == "avx512:BF16,F16,Q8_0,Q4_K_M"
