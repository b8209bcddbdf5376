"""Opt-in weight-only int8 / int4 quantization of the language model, and its saved copy
(engine.cpu.quant_store): quantized once, loaded at later starts, rebuilt when stale or damaged."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bot.models import Message
from engine.cpu import quant, quant_store
from engine.cpu.kernels import int4_kernel, int8_kernel
from engine.cpu.quant import Int4Linear, Int8Linear
from engine.cpu.quant_store import quantize_language_model
from engine.qwen.engine import QwenVLEngine
from tests.engine_fixtures import resident_file_bytes
from tests.test_engine_qwen import answer, png_image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def quant_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Saved quantized weights go to the test's folder, never the user's cache."""
    folder = tmp_path / "quantized"
    monkeypatch.setenv(quant_store.ENVIRONMENT, str(folder))
    return folder


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantized_linear_is_close_to_the_original(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    if cls is Int8Linear:
        q: nn.Module = Int8Linear.from_linear(linear, int8_kernel.load_kernel(), torch.bfloat16)
    else:
        q = Int4Linear.from_linear(linear, 128, int4_kernel.load_kernel())
    want, got = linear(x).float(), q(x).float()
    assert got.shape == want.shape and got.dtype == torch.float32
    error = (got - want).norm() / want.norm()
    assert error < (0.02 if cls is Int8Linear else 0.15), float(error)


@pytest.mark.parametrize("mode", ["int8", "int4"])
async def test_engine_answers_with_a_quantized_language_model(tiny_qwen3: Path, mode: str) -> None:
    engine = QwenVLEngine(str(tiny_qwen3), dtype="float32", threads=2, quantize=mode)
    await engine.load()
    assert engine.info.details["quantize"] == mode
    kinds = {type(m) for m in engine.model.model.language_model.modules()}
    assert Int8Linear in kinds or Int4Linear in kinds
    assert not any(isinstance(m, nn.Linear) for m in engine.model.model.language_model.layers.modules())
    head = engine.model.lm_head  # int4 packs rows in eights: the tiny vocabulary (685) is not
    assert isinstance(head, (Int8Linear, Int4Linear)) == (mode == "int8" or head.out_features % 8 == 0)
    assert isinstance(engine.model.model.language_model.embed_tokens.weight, torch.Tensor)
    message = Message.of("What is in this picture?", png_image())
    text = await answer(engine, message)
    assert text.strip() and text == await answer(engine, message)
    await engine.close()


def test_unknown_quantize_setting_is_rejected() -> None:
    with pytest.raises(ValueError, match="quantize"):
        QwenVLEngine("/nowhere", quantize="int3")
    assert quantize_language_model(object(), "none") == 0


def test_each_replaced_layer_lets_go_of_its_file_pages_at_once(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading with int4 peaked at 8.9 GB on the full-size model while every bf16 weight stayed
    resident until the end; each layer's file pages now go as soon as it is quantized (6.1 GB)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_qwen3), dtype=torch.float32)
    events: list[tuple[str, int]] = []
    quantize_one = quant.quantize_one

    def quantized(linear: nn.Linear, *args: object) -> nn.Module | None:
        events.append(("quantize", linear.weight.data_ptr()))
        return quantize_one(linear, *args)  # type: ignore[arg-type]

    def release(tensors: list[torch.Tensor], mappings: object = None) -> None:
        events.extend(("release", t.data_ptr()) for t in tensors)

    monkeypatch.setattr(quant, "quantize_one", quantized)
    monkeypatch.setattr(quant, "release_file_pages", release)
    layers = quantize_language_model(model, "int8")
    linears = len(model.model.language_model.layers) * 7
    # each layer's weights are released right after it is quantized, before the next one, and
    # then the output head's (a lookup in its tied embedding pages in the rows it reads)
    assert layers == linears + 1 and len(events) == 2 * layers
    for at in range(layers):
        (first, pointer), (then, released) = events[2 * at], events[2 * at + 1]
        assert (first, then) == ("quantize", "release") and released == pointer


def test_the_quantized_output_heads_file_pages_leave_memory(wide_qwen3: Path) -> None:
    """Quantizing the head reads the whole bf16 table (0.6 GB in Qwen3-VL-2B): its pages then
    leave this process (they stayed resident, beside the quantized copy)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(wide_qwen3), dtype=torch.bfloat16)
    head_bytes = model.lm_head.weight.numel() * 2
    assert quantize_language_model(model, "int8") > 0
    assert isinstance(model.lm_head, Int8Linear)
    assert resident_file_bytes(wide_qwen3 / "model.safetensors") < head_bytes / 4


PEAK_SCRIPT = """
import sys, torch
from pathlib import Path
from engine.cpu.quant import load_mode_kernel, quantize_one
from tests.engine_fixtures import peak_rss, reset_peak_rss
head = torch.nn.Linear(256, 65536, bias=False, dtype=torch.bfloat16)
with torch.no_grad():
    head.weight.normal_()
start = reset_peak_rss()
quantized = quantize_one(head, sys.argv[1], torch.bfloat16, load_mode_kernel(sys.argv[1]))
assert quantized is not None
print(peak_rss() - start, head.weight.numel() * 2)
"""


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_a_large_layer_holds_little_more_than_its_result(mode: str) -> None:
    """Quantizing Qwen3-VL-2B's output head at the first start held ~4 GB of float temporaries
    (the whole head in float32, several times over: here 6x the bf16 weight's size); now a
    block of rows at a time: the peak is the quantized copy and its packed layout (~1.6x)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, mode],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    growth, weight_bytes = (int(x) for x in done.stdout.split())
    assert growth < 2.5 * weight_bytes, (growth, weight_bytes)


# --- the saved copy ------------------------------------------------------------------------------

LOGITS_SCRIPT = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from transformers import AutoModelForImageTextToText
from engine.cpu.quant_store import quantize_language_model
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32)
if sys.argv[2] != "none":
    quantize_language_model(model, sys.argv[2])
with torch.inference_mode():
    logits = model(input_ids=torch.tensor([[1, 5, 9, 22, 40, 3, 17, 8]])).logits
torch.save(logits, sys.argv[3])
"""


def logits_in_fresh_process(model: Path, mode: str, out: Path, cache: Path) -> tuple[torch.Tensor, str]:
    """A new Python process loads the model, quantizes (or loads the saved copy) and computes
    logits; returns them with its log."""
    env = {**os.environ, quant_store.ENVIRONMENT: str(cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", LOGITS_SCRIPT, str(model), mode, str(out)],
        env=env, cwd=out.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out), done.stderr


def model_copy(tiny_qwen3: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_qwen3, tmp_path / "model"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_quantized_model_gives_the_same_logits_in_a_fresh_process(
    tiny_qwen3: Path, tmp_path: Path, quant_cache: Path, mode: str
) -> None:
    plain, _ = logits_in_fresh_process(tiny_qwen3, "none", tmp_path / "plain.pt", quant_cache)
    first, log = logits_in_fresh_process(tiny_qwen3, mode, tmp_path / "first.pt", quant_cache)
    assert f"to {mode}" in log and "saved the quantized weights" in log
    saved = list(quant_cache.glob(f"{mode}-*.safetensors"))
    assert len(saved) == 1
    again, log = logits_in_fresh_process(tiny_qwen3, mode, tmp_path / "again.pt", quant_cache)
    assert "loaded" in log and f"to {mode}" not in log  # not quantized again
    assert torch.equal(again, first)
    assert not torch.allclose(first, plain, atol=1e-6)  # quantization is in effect
    # torch's own int4 kernel is as far (0.40) from the float model: 4 bits on tiny random weights
    assert float((first - plain).norm() / plain.norm()) < (0.2 if mode == "int8" else 0.6)


def quantized_model(folder: Path, mode: str = "int8") -> nn.Module:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    quantize_language_model(model, mode)
    return model


def test_a_changed_source_model_or_format_is_quantized_again(
    tiny_qwen3: Path,
    tmp_path: Path,
    quant_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = model_copy(tiny_qwen3, tmp_path)
    quantized_model(folder)
    assert len(list(quant_cache.iterdir())) == 1
    caplog.set_level(logging.INFO, logger="vlbot.engine")
    quantized_model(folder)
    assert "loaded" in caplog.text and "quantized 15" not in caplog.text  # the same model: loaded
    caplog.clear()
    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # new weights
    quantized_model(folder)
    assert "quantized" in caplog.text and "saved" in caplog.text
    # the file of the folder's former weights is removed: it would never be loaded again
    assert "before it changed, superseded" in caplog.text
    assert len(list(quant_cache.iterdir())) == 1
    other = model_copy(tiny_qwen3, tmp_path / "other")  # another model's file stays
    quantized_model(other)
    assert len(list(quant_cache.iterdir())) == 2
    caplog.clear()
    monkeypatch.setattr(quant_store, "FORMAT_VERSION", quant_store.FORMAT_VERSION + 1)
    quantized_model(folder)
    # a new format replaces this model's file of the old one (the other model's file stays)
    assert "quantized" in caplog.text and "superseded" in caplog.text
    assert len(list(quant_cache.iterdir())) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other model"])
def test_a_damaged_saved_file_is_rebuilt_with_a_log_line(
    tiny_qwen3: Path, tmp_path: Path, quant_cache: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    folder = model_copy(tiny_qwen3, tmp_path)
    want = quantized_model(folder, "int4")
    (saved,) = quant_cache.iterdir()
    data = saved.read_bytes()
    if damage == "garbage":
        saved.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        saved.write_bytes(data[: len(data) // 2])
    else:  # a valid file whose metadata names another source
        other = quant_cache / "other.safetensors"
        other.write_bytes(data.replace(b'"config_sha256', b'"config_sha257'))
        os.replace(other, saved)
    caplog.set_level(logging.INFO, logger="vlbot.engine")
    model = quantized_model(folder, "int4")
    assert "are unusable" in caplog.text and "saved the quantized weights" in caplog.text
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, want(input_ids=ids).logits)
    caplog.clear()
    quantized_model(folder, "int4")
    assert "loaded" in caplog.text and "unusable" not in caplog.text  # the rebuilt file is good


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.inference_mode()
def test_quantized_model_on_the_forced_avx2_tier(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """On a tier without bf16 arithmetic the bf16 model computes in float32 (engine.cpu.half_weights
    swaps its linears first); quantization still replaces every one of them, with the AVX2 build
    of the byte kernels, and the logits stay close to the unquantized model's."""
    from transformers import AutoModelForImageTextToText

    from engine.cpu.kernels import bf16_kernel
    from engine.cpu.swap import swap_modules
    from tests.tier_helpers import forced

    with forced(
        monkeypatch, "avx2", bf16_kernel.load_kernel, int8_kernel.load_kernel, int4_kernel.load_kernel
    ):
        if int8_kernel.load_kernel() is None:
            pytest.skip("no C compiler: the byte kernels cannot be built")
        models = {}
        for setting in ("none", mode):
            model = AutoModelForImageTextToText.from_pretrained(str(tiny_qwen3), dtype=torch.bfloat16).eval()
            swap_modules(model, setting)
            models[setting] = model
        layers = list(models[mode].model.language_model.layers.modules())
        quantized = [m for m in layers if isinstance(m, (Int8Linear, Int4Linear))]
        assert len(quantized) == 14 and {m.kernel_name for m in quantized} == {"vlbot avx2"}
        ids = torch.tensor([[1, 5, 9, 22, 40, 3, 17, 8]])
        want, got = (models[s](input_ids=ids).logits.float() for s in ("none", mode))
        assert float((got - want).norm() / want.norm()) < (0.2 if mode == "int8" else 0.6)
