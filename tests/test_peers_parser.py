"""benchmarks/peers: the llama-mtmd-cli timing parser (on a recorded run), the converter's
tokenizer-hash patch, and the report's "llama.cpp on the same machine" section.

llama.cpp itself is never built or run here (benchmarks.peers.llama_cpp does that, by hand).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks.peers.convert_driver import check_text, teach_hash, token_hash
from benchmarks.peers.llama_cpp_log import LlamaCppLogError, parse_mtmd_log
from benchmarks.report import llama_cpp_section, render_report

FIXTURES = Path(__file__).parent / "fixtures" / "llama_cpp"
RECORDED = FIXTURES / "mtmd-cli-0.3.36-native-BF16-640x480.log"  # a real run, verbatim (on a busy machine)


def recorded() -> str:
    return RECORDED.read_text(encoding="utf-8", errors="replace")  # the random model's bytes


def test_recorded_run_gives_encode_prefill_and_decode_timings() -> None:
    t = parse_mtmd_log(recorded())
    # the figures of the recorded log's own lines
    assert t.encode_ms == 19906.0  # "mtmd batch encoding done in 19906 ms"
    assert t.image_decode_ms == 15564.0
    assert t.visual_tokens == 300
    assert (t.prompt_eval_ms, t.prompt_tokens) == (44100.32, 329)
    assert (t.eval_ms, t.eval_runs) == (140926.71, 63)
    assert t.load_ms == 2629.51
    assert t.decode_tok_s == pytest.approx(63 / 140.92671)
    # first token: prompt start (0:04.044910) to the run's end (3:10.433418) less the 63 decode
    # steps; not encode + prompt eval, which counts the encoder twice in this llama.cpp
    assert t.first_token_s == pytest.approx(190.433418 - 140.92671 - 4.04491)
    assert t.first_token_s < (t.encode_ms + t.prompt_eval_ms) / 1000


def test_a_log_without_timestamps_falls_back_to_encode_plus_prompt_eval() -> None:
    plain = re.sub(r"^\d+\.\d\d\.\d{3}\.\d{3} [A-Z] ", "", recorded(), flags=re.M)
    t = parse_mtmd_log(plain)
    assert t.prompt_start_s is None
    assert t.first_token_s == pytest.approx((19906.0 + 44100.32) / 1000)


def test_a_run_cut_short_is_an_error_not_a_figure() -> None:
    text = recorded()
    with pytest.raises(LlamaCppLogError, match="did not finish"):
        parse_mtmd_log(text[: text.index("llama_perf_context_print")])
    lines = [line for line in text.splitlines() if "encoding done in" not in line]
    with pytest.raises(LlamaCppLogError, match="not encoded"):
        parse_mtmd_log("\n".join(lines))


def test_older_per_slice_lines_add_up() -> None:
    text = recorded().replace(
        "mtmd batch encoding done in 19906 ms",
        "image slice encoded in 5000 ms\nencoding image slice...\nimage slice encoded in 717 ms",
    )
    assert parse_mtmd_log(text).encode_ms == 5717.0


class _TextModel:
    def get_vocab_base_pre(self, tokenizer: Any) -> str:
        raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")


class _Tokenizer:
    def __init__(self, shift: int) -> None:
        self.shift = shift

    def encode(self, text: str) -> list[int]:
        return [ord(c) + self.shift for c in text]


def test_converter_is_taught_only_the_given_tokenizer(tmp_path: Path) -> None:
    base_py = tmp_path / "base.py"
    base_py.write_text(
        "class TextModel:\n"
        "    def get_vocab_base_pre(self, tokenizer):\n"
        "        chktxt = 'abc \\n 123'\n"
        "        return chktxt\n",
        encoding="utf-8",
    )
    text = check_text(base_py)
    assert text == "abc \n 123"
    ours, other = _Tokenizer(0), _Tokenizer(1)
    base = type("Base", (), {"TextModel": type("TextModel", (_TextModel,), {})})
    teach_hash(base, text, token_hash(ours.encode(text)), "qwen2")
    model = base.TextModel()
    assert model.get_vocab_base_pre(ours) == "qwen2"
    with pytest.raises(NotImplementedError):  # any other tokenizer: the converter's own verdict
        model.get_vocab_base_pre(other)


def test_check_text_missing_is_reported(tmp_path: Path) -> None:
    base_py = tmp_path / "base.py"
    base_py.write_text("def get_vocab_base_pre(self, tokenizer):\n    return None\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no chktxt"):
        check_text(base_py)


def _result_with_peers() -> dict[str, Any]:
    t = parse_mtmd_log(recorded())
    return {
        "config": {"images": ["640x480"], "new_tokens": 64},
        "vlbot": {
            "peak_rss_bytes": 5.0e9,
            "runs": [{"image": "640x480", "visual_tokens": 300, "ttft_s": 4.28, "decode_tok_s": 9.6}],
        },
        "quantized": [{"option": "quantize=int4", "image": "640x480", "ttft_s": 5.5, "decode_tok_s": 23.0}],
        "llama_cpp": {
            "source": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp",
            "threads": 2,
            "new_tokens": 64,
            "max_visual_tokens": 1024,
            "loadavg_start": [1.0, 1.0, 1.0],
            "loadavg_end": [2.0, 2.0, 2.0],
            "runs": [
                {
                    "build": "native",
                    "quant": "BF16",
                    "image": "640x480",
                    "visual_tokens": t.visual_tokens,
                    "first_token_s": t.first_token_s,
                    "encode_s": t.encode_ms / 1000,
                    "image_prefill_s": t.image_decode_ms / 1000,
                    "decode_tok_s": t.decode_tok_s,
                    "peak_rss_bytes": 5.05e9,
                },
                {"build": "avx2", "quant": "Q8_0", "image": "640x480", "error": "exit 1: no timings"},
            ],
        },
    }


def _rows(section: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|")
    ]


def test_report_shows_llama_cpp_rows_beside_vlbot_at_the_same_image() -> None:
    report = render_report(_result_with_peers())
    assert "llama.cpp on the same machine" in report
    section = report[report.index("llama.cpp on the same machine") :]
    rows = _rows(section)
    assert ["vlbot", "default", "640x480", "300", "4.28 s", "9.6 tok/s", "5.00 GB"] in rows
    assert ["vlbot", "quantize=int4", "640x480", "", "5.50 s", "23.0 tok/s", "—"] in rows
    native = next(r for r in rows if r[0] == "llama.cpp native")
    # the recorded run: first token with its parts, decode, peak RSS
    assert native == [
        "llama.cpp native",
        "BF16",
        "640x480",
        "300",
        "45.5 s (19.9 s vision encode, 15.6 s image prefill)",
        "0.4 tok/s",
        "5.05 GB",
    ]
    avx2 = next(r for r in rows if r[0] == "llama.cpp avx2")
    assert avx2[1:4] == ["Q8_0", "640x480", "exit 1: no timings"]
    assert "load average 1.0 at start, 2.0 at end" in section


def test_report_without_llama_cpp_rows_has_no_such_section() -> None:
    result = _result_with_peers()
    del result["llama_cpp"]
    assert llama_cpp_section(result) == []
    assert "llama.cpp on the same machine" not in render_report(result)


def test_plan_names_builds_and_weights_and_refuses_unknown_ones() -> None:
    from benchmarks.peers.llama_cpp import parse_plan

    assert parse_plan("native:BF16,Q8_0;avx2:Q4_K_M") == [
        ("native", "BF16"),
        ("native", "Q8_0"),
        ("avx2", "Q4_K_M"),
    ]
    assert parse_plan("avx512:Q8_0") == [("avx512", "Q8_0")]  # the forced avx512 tier's peer
    with pytest.raises(SystemExit, match="unknown build 'avx10'"):
        parse_plan("avx10:Q8_0")
    with pytest.raises(SystemExit, match="unknown weights 'Q5_K'"):
        parse_plan("native:Q5_K")


def test_a_model_made_again_gets_its_own_gguf_folder(tmp_path: Path) -> None:
    """The converted GGUFs are kept per model as it is: a new tokenizer (or weights) means a new
    conversion, never the old model's files under the same folder name."""
    from benchmarks.peers.llama_cpp import gguf_dir

    model = tmp_path / "qwen3-vl-2b-random"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen3_vl"}', encoding="utf-8")
    (model / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}', encoding="utf-8")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    first = gguf_dir(model, "0.3.36")
    assert gguf_dir(model, "0.3.36") == first
    assert gguf_dir(model, "0.3.37") != first
    (model / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}}', encoding="utf-8")
    second = gguf_dir(model, "0.3.36")
    assert second != first
    (model / "model.safetensors").write_bytes(b"\1" * 65)
    assert gguf_dir(model, "0.3.36") not in (first, second)
