"""The benchmark's pure parts: bandwidth math, rates, floors and the Markdown report.

The benchmark itself (benchmarks/run.py) needs the full-size model and minutes of CPU; these
checks only cover the arithmetic and formatting it reports with.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.helpers import (
    GB,
    GIB,
    bandwidth_bytes_per_s,
    decode_bytes_per_token,
    decode_limit_tok_s,
    decode_rate,
    growth_pct,
    interleaved,
    lm_bytes_per_token,
    markdown_table,
    overall_aggregate_rate,
    proc_status_bytes,
    quant_variants,
    steady_aggregate_rate,
)
from benchmarks.images import jpeg_bytes, make_image
from benchmarks.report import evaluate_floors, render_report


def test_bandwidth_uses_the_fastest_pass() -> None:
    assert bandwidth_bytes_per_s(2 * GIB, [0.1, 0.05, 0.2]) == pytest.approx(2 * GIB / 0.05)
    with pytest.raises(ValueError):
        bandwidth_bytes_per_s(GIB, [0.0])


def test_decode_limit_is_bandwidth_over_lm_weight_bytes() -> None:
    # the engineering notes: 1.72 G params x 2 bytes = 3.44 GB per token; 60 GB/s -> ~17 tok/s
    assert lm_bytes_per_token() == pytest.approx(3.44e9)
    assert decode_limit_tok_s(60 * GB) == pytest.approx(17.44, abs=0.01)
    assert decode_limit_tok_s(60 * GB, bytes_per_param=0.5) == pytest.approx(4 * 17.44, abs=0.05)


def test_decode_rate_excludes_the_prefill_token() -> None:
    assert decode_rate(65, 16.0) == pytest.approx(4.0)
    assert decode_rate(1, 1.0) is None
    assert decode_rate(10, 0.0) is None


def chat(
    first: float, step: float, n: int, tokens: int | None = None, final: float | None = None
) -> dict[str, Any]:
    times = [first + i * step for i in range(n)]
    return {
        "piece_times": times,
        "tokens": tokens if tokens is not None else n,
        "first_token_s": first,
        "final_s": final if final is not None else times[-1],
    }


def test_steady_rate_counts_only_the_window_where_all_chats_decode() -> None:
    # chat A decodes alone at 5 tok/s for 4 s, then B joins; both go at 4 tok/s each
    a = {"piece_times": [i * 0.2 for i in range(20)] + [4.0 + i * 0.25 for i in range(1, 41)], "tokens": 60}
    b = chat(4.0, 0.25, 40)
    rate = steady_aggregate_rate([a, b])
    assert rate == pytest.approx(8.0, rel=0.05)
    # overall includes A's solo part: lower than the steady figure
    overall = overall_aggregate_rate([a, b])
    assert overall is not None and rate is not None and overall < rate


def test_steady_rate_scales_pieces_to_tokens() -> None:
    # two tokens per text piece
    assert steady_aggregate_rate([chat(0.0, 0.5, 21, tokens=42)]) == pytest.approx(4.0, rel=0.06)


def test_steady_rate_is_none_when_chats_never_overlap() -> None:
    assert steady_aggregate_rate([chat(0.0, 0.1, 10), chat(5.0, 0.1, 10)]) is None
    assert steady_aggregate_rate([]) is None


def test_interleaved_detects_a_chat_waiting_for_another_whole_answer() -> None:
    assert interleaved([chat(1.0, 0.1, 10, final=9.0), chat(2.0, 0.1, 10, final=9.5)]) is True
    # the second chat's first token only after the first chat finished
    assert interleaved([chat(1.0, 0.1, 10, final=3.0), chat(4.0, 0.1, 10, final=6.0)]) is False
    assert interleaved([chat(1.0, 0.1, 10)]) is None


def test_proc_status_fields_are_read_in_bytes() -> None:
    status = "Name:\tpython\nVmHWM:\t 5120 kB\nVmRSS:\t 4096 kB\n"
    assert proc_status_bytes("VmHWM", status) == 5120 * 1024
    assert proc_status_bytes("VmRSS", status) == 4096 * 1024
    assert proc_status_bytes("VmSwap", status) is None


def test_growth_pct() -> None:
    assert growth_pct([100.0, 103.0, 110.0]) == pytest.approx(10.0)
    assert growth_pct([100.0]) is None


def test_markdown_table_pads_and_escapes() -> None:
    table = markdown_table(["a", "long header"], [["x|y", 1], ["z", 22]])
    lines = table.splitlines()
    assert lines[0] == "| a    | long header |"
    assert lines[1] == "|------|-------------|"
    assert lines[2] == "| x\\|y | 1           |"
    assert len({len(line) for line in lines}) == 1
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["only one"]])


def sample_result(vlbot_ttft_1080: float = 10.0, e2e: float = 20.0) -> dict[str, Any]:
    return {
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "threads": 2,
            "memory_bytes": 24 * GB,
            "torch": "2.x",
            "transformers": "5.x",
        },
        "config": {"images": ["640x480", "1920x1080"], "new_tokens": 64},
        "bandwidth": {"gb_s": 34.4, "bytes_per_token": 3.44e9, "decode_limit_tok_s": 10.0},
        "raw": {
            "load_s": 3.0,
            "peak_rss_bytes": 6 * GB,
            "runs": [
                {
                    "image": "640x480",
                    "variant": "defaults=budget",
                    "visual_tokens": 300,
                    "ttft_s": 4.0,
                    "decode_tok_s": 3.0,
                    "total_s": 25.0,
                },
                {
                    "image": "1920x1080",
                    "variant": "defaults",
                    "visual_tokens": 2040,
                    "ttft_s": 60.0,
                    "decode_tok_s": 3.5,
                    "total_s": 78.0,
                },
                {
                    "image": "1920x1080",
                    "variant": "budget",
                    "visual_tokens": 1008,
                    "ttft_s": 18.0,
                    "decode_tok_s": 4.0,
                    "total_s": 34.0,
                },
            ],
        },
        "vlbot": {
            "load_s": 2.5,
            "peak_rss_bytes": 5 * GB,
            "weights_bytes": 4.26 * GB,
            "runs": [
                {
                    "image": "640x480",
                    "visual_tokens": 300,
                    "ttft_s": 3.5,
                    "decode_tok_s": 7.0,
                    "e2e_s": e2e,
                    "followup": {"ttft_s": 0.3, "reused_tokens": 329},
                },
                {
                    "image": "1920x1080",
                    "visual_tokens": 1008,
                    "ttft_s": vlbot_ttft_1080,
                    "decode_tok_s": 7.5,
                    "e2e_s": 30.0,
                    "followup": {"ttft_s": 0.4},
                },
            ],
            "concurrent": {
                "n_chats": 4,
                "image": "640x480",
                "steady_tok_s": 21.0,
                "single_tok_s": 7.0,
                "interleaved": True,
                "chats": [{"first_token_s": 3.0}] * 4,
            },
            "queue": {"jobs": 50, "rss_growth_pct": 1.2, "peak_rss_bytes": 5 * GB},
        },
    }


def floors_by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"].split(" (")[0].split(":")[0]: f for f in evaluate_floors(result)}


def test_floors_report_the_figures_and_whether_they_are_met() -> None:
    floors = floors_by_name(sample_result())
    e2e = floors["end-to-end bot latency vs raw generate, same input"]
    # worst image: 30 / 34 at 1080p (raw at vlbot's budget), 20 / 25 at 640x480
    assert e2e["value"] == pytest.approx(30 / 34)
    assert e2e["ok"] is True
    follow = floors["follow-up TTFT vs first turn"]
    assert follow["value"] == pytest.approx(0.04) and follow["ok"] is True
    ttft = floors["1080p TTFT, vlbot defaults vs raw processor defaults"]
    assert ttft["value"] == pytest.approx(10 / 60) and ttft["ok"] is True
    conc = floors["4 concurrent chats"]
    assert conc["value"] == pytest.approx(3.0) and conc["ok"] is True
    decode = floors["bf16 decode vs raw generate"]
    assert decode["value"] == pytest.approx(7.5 / 4.0) and decode["ok"] is True
    assert "75 % of limit" in decode["reached"]
    assert floors["load-to-ready"]["ok"] is True
    assert floors["peak RSS vs weights + 1.5 GB"]["ok"] is True
    # the int4 option was not run: reported as not measured, neither met nor failed
    quant = next(f for f in evaluate_floors(sample_result()) if f["name"].startswith("quantized"))
    assert quant["ok"] is None and quant["reached"] == "not measured"


def test_floors_fail_when_figures_miss() -> None:
    floors = floors_by_name(sample_result(vlbot_ttft_1080=30.0, e2e=27.0))
    assert floors["end-to-end bot latency vs raw generate, same input"]["ok"] is False  # 27/25
    assert floors["1080p TTFT, vlbot defaults vs raw processor defaults"]["ok"] is False  # 0.5x


def test_report_has_the_tables() -> None:
    report = render_report(sample_result())
    assert "Machine: Test CPU, 2 cores" in report
    assert "| 1920x1080 | 2040" in report  # raw at processor defaults in the first table
    assert "1008 / 1008" in report  # same input table: raw at the budget
    assert "0.30 s (329 tokens cached)" in report
    assert "34.4 GB/s" in report and "10.0 tok/s" in report
    assert "| yes" in report and "| —" in report


def test_benchmark_images_have_structure_and_are_deterministic() -> None:
    image = make_image(320, 240, seed=3)
    assert image.size == (320, 240)
    colours = image.getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 1000
    assert jpeg_bytes(image) == jpeg_bytes(make_image(320, 240, seed=3))
    assert jpeg_bytes(image) != jpeg_bytes(make_image(320, 240, seed=4))


def test_each_quantize_option_is_its_own_run_with_its_own_label() -> None:
    variants = quant_variants(
        ["decode_mkldnn=false", "quantize=int8", "quantize=int4", "max_batch=2"]
    )
    assert variants == [
        ("decode_mkldnn=false, quantize=int8", {"decode_mkldnn": False, "quantize": "int8"}),
        (
            "decode_mkldnn=false, quantize=int4, max_batch=2",
            {"decode_mkldnn": False, "quantize": "int4", "max_batch": 2},
        ),
    ]
    assert quant_variants([]) == []


def test_report_shows_every_quantized_run_with_its_limit() -> None:
    result = sample_result()
    result["quantized"] = [
        {"option": "quantize=int8", "image": "640x480", "ttft_s": 3.4, "decode_tok_s": 12.0,
         "bytes_per_token": 1.9e9, "decode_limit_tok_s": 18.1},
        {"option": "quantize=int4", "image": "640x480", "ttft_s": 3.3, "decode_tok_s": 20.0,
         "bytes_per_token": 1.0e9, "decode_limit_tok_s": 34.4},
    ]  # fmt: skip
    report = render_report(result)
    assert "quantized (quantize=int8)" in report and "quantized (quantize=int4)" in report
    assert "12.0 tok/s (18.1 tok/s" in report and "20.0 tok/s (34.4 tok/s" in report
    floors = [f for f in evaluate_floors(result) if f["name"].startswith("quantized decode")]
    assert [f["value"] for f in floors] == [pytest.approx(12.0 / 3.0), pytest.approx(20.0 / 3.0)]


def test_decode_bytes_count_the_weights_as_held() -> None:
    torch = pytest.importorskip("torch")

    class Layers(torch.nn.Module):
        def __init__(self, dtype: Any) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 32, bias=False).to(dtype)])

    class Model(torch.nn.Module):
        def __init__(self, dtype: Any) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.language_model = Layers(dtype)
            self.lm_head = torch.nn.Linear(64, 100, bias=False).to(dtype)

    assert decode_bytes_per_token(Model(torch.bfloat16)) == (64 * 32 + 64 * 100) * 2
    model = Model(torch.float32)
    model.model.language_model.layers[0].register_buffer("q", torch.zeros(32, 32, dtype=torch.uint8))
    assert decode_bytes_per_token(model, head_bytes=6400) == 64 * 32 * 4 + 32 * 32 + 6400


def test_layer_read_rate_reads_every_large_layer_tensor_once() -> None:
    """The memory speed probe taken right after a decode sums the layers' large tensors (a tied
    tensor once; tensors under 1 MiB, whose sums time torch's call rather than memory, left out),
    so its rate is comparable with a decode step's reading of the weights."""
    import torch
    from torch import nn

    from benchmarks.helpers import layer_read_rate

    first, second = nn.Linear(1024, 512), nn.Linear(512, 1024, bias=False)
    second.weight = nn.Parameter(torch.zeros(1024, 512, dtype=torch.bfloat16))  # 1 MiB of bf16
    third = nn.Linear(512, 1024, bias=False)
    third.weight = second.weight  # tied: read once
    model = SimpleNamespace(
        model=SimpleNamespace(language_model=SimpleNamespace(layers=nn.ModuleList([first, second, third])))
    )
    probe = layer_read_rate(model, passes=3)
    assert probe["bytes"] == 1024 * 512 * 4 + 1024 * 512 * 2  # not first's 2 KiB bias
    assert probe["bytes_per_s"] > 0


def test_the_read_runs_apart_from_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's main thread must not run torch's parallel sums: their OpenMP workers
    would stay beside the engine's and slow every later decode step."""
    import threading

    from benchmarks import helpers

    seen: list[threading.Thread] = []

    def recording(model: Any, passes: int = 7) -> dict[str, float]:
        seen.append(threading.current_thread())
        return {"bytes": 8.0, "bytes_per_s": 4.0}

    monkeypatch.setattr(helpers, "layer_read_rate", recording)
    assert helpers.layer_read_rate_apart(object()) == {"bytes": 8.0, "bytes_per_s": 4.0}
    assert len(seen) == 1 and seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_read_share_puts_the_decode_against_the_memory_speed_of_the_moment() -> None:
    from benchmarks.report import read_share

    # 10 tok/s at 2 GB per token is 20 GB/s: half of a 40 GB/s read
    assert read_share(10.0, 40.0, 2e9) == " (50 % of a read right after, 40 GB/s)"
    assert read_share(10.0, None, 2e9) == ""
