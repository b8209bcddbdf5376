"""engine.cpu.kernels.prefill_ops: the prompt-wide RMSNorm, query/key norm + rotary and SiLU gate
in C round as transformers' bfloat16 operators do (the same value almost everywhere, one bfloat16
step at most elsewhere), and the swapped modules keep the language model's outputs: bit for bit in
float32, as close as that in bfloat16, with the cache and the decode step reading the same parameters."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, Qwen3VLTextConfig
from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl

from engine.cpu.kernels.prefill_ops import (
    FastMLP,
    FastRMSNorm,
    FastTextAttention,
    PrefillOps,
    load_ops,
    use_fast_prefill_ops,
)
from tests.engine_fixtures import built_or_skip


@pytest.fixture
def ops() -> PrefillOps:
    return built_or_skip(load_ops(), "prefill kernels")


def random(*shape: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * spread).to(torch.bfloat16)


def assert_rounds_as_torch(got: torch.Tensor, want: torch.Tensor, most: float = 0.999) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == torch.bfloat16
    assert (got == want).float().mean().item() >= most
    step = want.float().abs() * 2.0**-7 + 1e-30  # one bfloat16 step
    assert ((got.float() - want.float()).abs() <= step).all()


@pytest.mark.parametrize("shape", [(1, 37, 2048), (5, 128), (1, 3, 16, 64)])
def test_rms_norm_as_transformers(ops: PrefillOps, shape: tuple[int, ...]) -> None:
    norm = qwen3_vl.Qwen3VLTextRMSNorm(shape[-1], eps=1e-6).to(torch.bfloat16)
    norm.weight.data = random(shape[-1], seed=1, spread=2.0)
    x = random(*shape, seed=2, spread=3.0)
    with torch.inference_mode():
        assert_rounds_as_torch(ops.rms_norm(x, norm.weight, 1e-6), norm(x))


def test_silu_gate_as_transformers(ops: PrefillOps) -> None:
    gate, up = random(33, 4, 96, seed=3, spread=6.0), random(33, 4, 96, seed=4)
    gate[0, 0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])  # e^-g overflows, is huge, is 1
    with torch.inference_mode():
        assert_rounds_as_torch(ops.silu_gate(gate, up), F.silu(gate) * up)
    with pytest.raises(ValueError):
        ops.silu_gate(gate, up[:, :2])


def test_norm_and_rotary_as_transformers(ops: PrefillOps) -> None:
    batch, seq, dim = 2, 45, 128
    norm = qwen3_vl.Qwen3VLTextRMSNorm(dim, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = random(dim, seed=5, spread=2.0)
    q, k = random(batch, seq, 8, dim, seed=6, spread=3.0), random(batch, seq, 3, dim, seed=7)
    cos, sin = random(batch, seq, dim, seed=8), random(batch, seq, dim, seed=9)
    with torch.inference_mode():
        want_q, want_k = qwen3_vl.apply_rotary_pos_emb(
            norm(q).transpose(1, 2), norm(k).transpose(1, 2), cos, sin
        )
        got_q, got_k = (ops.norm_rotate(x, norm.weight, cos, sin, 1e-6) for x in (q, k))
    assert got_q.is_contiguous() and got_q.shape == (batch, 8, seq, dim)
    assert_rounds_as_torch(got_q, want_q)
    assert_rounds_as_torch(got_k, want_k)


def text_model(dtype: torch.dtype) -> Any:
    """A small text model with 64-channel heads (the fused rotary takes multiples of 32)."""
    config = Qwen3VLTextConfig(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [12, 10, 10],
                         "mrope_interleaved": True},
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model: Any = qwen3_vl.Qwen3VLTextModel(config)
    return model.to(dtype).eval()


class Wrapped:  # use_fast_prefill_ops takes the whole model (model.model.language_model)
    def __init__(self, language_model: Any) -> None:
        self.model = type("Inner", (), {"language_model": language_model})()


def swapped(model: Any) -> Any:
    copied = copy.deepcopy(model)
    assert (
        use_fast_prefill_ops(Wrapped(copied)) == 2 * (2 + 2 + 1 + 1) + 1
    )  # per layer 4 norms, MLP, attention; final norm
    layer = copied.layers[0]
    assert isinstance(layer.self_attn, FastTextAttention) and isinstance(layer.mlp, FastMLP)
    assert isinstance(layer.self_attn.q_norm, FastRMSNorm) and isinstance(copied.norm, FastRMSNorm)
    return copied


def test_float32_model_is_unchanged(ops: PrefillOps) -> None:
    model = text_model(torch.float32)
    fast = swapped(model)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(input_ids=ids).last_hidden_state
        got = fast(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)


def test_bfloat16_model_is_as_close_to_float32_as_transformers(
    ops: PrefillOps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill of a prompt and then of a follow-up through the cache: the swapped model runs the
    kernels, and its hidden states are as close to the float32 model's as transformers'
    bfloat16 ones."""
    calls: dict[str, int] = {}
    for name in ("rms_norm", "norm_rotate", "silu_gate"):
        original = getattr(PrefillOps, name)

        def counted(self: PrefillOps, *args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _original(self, *args)

        monkeypatch.setattr(PrefillOps, name, counted)
    model = text_model(torch.bfloat16)
    fast = swapped(model)
    exact = copy.deepcopy(model).float()
    ids = torch.randint(0, 300, (1, 70), generator=torch.Generator().manual_seed(1))
    results = []
    with torch.inference_mode():
        for m in (model, fast, exact):
            cache = qwen3_vl.DynamicCache(config=m.config)
            first = m(input_ids=ids[:, :50], cache=cache, use_cache=True).last_hidden_state
            second = m(input_ids=ids[:, 50:], cache=cache, use_cache=True).last_hidden_state
            results.append(torch.cat([first, second], dim=1).double())
    theirs, ours, truth = results
    # two forwards x (2 layers x (2 norms, q and k, 1 MLP) + the final norm)
    assert calls == {"rms_norm": 2 * (2 * 2 + 1), "norm_rotate": 2 * 2 * 2, "silu_gate": 2 * 2}
    assert (ours - truth).abs().mean() <= 1.1 * (theirs - truth).abs().mean()
    assert (ours - truth).abs().max() <= 1.5 * (theirs - truth).abs().max()


def test_engine_swaps_the_tiny_models_modules(tiny_qwen3: Path, ops: PrefillOps) -> None:
    model: Any = AutoModelForImageTextToText.from_pretrained(str(tiny_qwen3), dtype=torch.bfloat16)
    weight = model.model.language_model.layers[0].input_layernorm.weight
    assert use_fast_prefill_ops(model) > 0
    layer = model.model.language_model.layers[0]
    assert isinstance(layer.input_layernorm, FastRMSNorm) and layer.input_layernorm.weight is weight
    assert use_fast_prefill_ops(object()) == 0
