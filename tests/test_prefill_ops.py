"""engine.cpu.kernels.prefill_ops: the prompt-wide RMSNorm, query/key norm + rotary and SiLU gate
in C round as transformers' bfloat16 operators do (the same value almost everywhere, one bfloat16
step at most elsewhere) and in float32 stay within a few units in the last place, built for every
x86 tier this machine runs (forced ones too). The swapped modules keep the language model's
outputs: as close as that in bfloat16, with the cache and the decode step reading the same
parameters; a float32 model keeps transformers' arithmetic bit for bit where the tier has bf16
arithmetic and takes the kernels (within float32 rounding) where it has not (the half-size-weights
model computes in float32 there)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
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
from tests.tier_helpers import forced


@pytest.fixture(params=["avx2", "avx512", "avx512_bf16"])
def ops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrefillOps]:
    """The kernels built for each x86 tier (forced where the CPU has more)."""
    with forced(monkeypatch, request.param, load_ops):
        yield built_or_skip(load_ops(), f"prefill kernels ({request.param})")


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


def float32(*shape: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * spread


def test_float32_within_float_rounding_of_transformers(ops: PrefillOps) -> None:
    """The float32 forms of the three kernels against transformers' float32 modules: a few units
    in the last place (another summation order, another exponential), never more."""
    norm = qwen3_vl.Qwen3VLTextRMSNorm(2048, eps=1e-6)
    norm.weight.data = float32(2048, seed=1, spread=2.0)
    x = float32(1, 37, 2048, seed=2, spread=3.0)
    gate, up = float32(33, 4, 96, seed=3, spread=6.0), float32(33, 4, 96, seed=4)
    gate[0, 0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])
    head = qwen3_vl.Qwen3VLTextRMSNorm(128, eps=1e-6)
    head.weight.data = float32(128, seed=5, spread=2.0)
    q = float32(2, 45, 8, 128, seed=6, spread=3.0)
    cos, sin = float32(2, 45, 128, seed=8), float32(2, 45, 128, seed=9)
    with torch.inference_mode():
        torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=4e-6, atol=1e-6)
        torch.testing.assert_close(ops.silu_gate(gate, up), F.silu(gate) * up, rtol=4e-6, atol=1e-6)
        want, _ = qwen3_vl.apply_rotary_pos_emb(head(q).transpose(1, 2), head(q).transpose(1, 2), cos, sin)
        got = ops.norm_rotate(q, head.weight, cos, sin, 1e-6)
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (2, 8, 45, 128)
    torch.testing.assert_close(got, want, rtol=4e-6, atol=1e-6)
    with pytest.raises(ValueError):  # one dtype for all
        ops.rms_norm(x, norm.weight.to(torch.bfloat16), 1e-6)


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
    """A copy of `model` with the modules swapped (for the active tier)."""
    copied = copy.deepcopy(model)
    assert (
        use_fast_prefill_ops(Wrapped(copied)) == 2 * (2 + 2 + 1 + 1) + 1
    )  # per layer 4 norms, MLP, attention; final norm
    layer = copied.layers[0]
    assert isinstance(layer.self_attn, FastTextAttention) and isinstance(layer.mlp, FastMLP)
    assert isinstance(layer.self_attn.q_norm, FastRMSNorm) and isinstance(copied.norm, FastRMSNorm)
    return copied


def counted_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each kernel is called from now on (filled in as they are)."""
    calls: dict[str, int] = {}
    for name in ("rms_norm", "norm_rotate", "silu_gate"):
        original = getattr(PrefillOps, name)

        def counted(self: PrefillOps, *args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _original(self, *args)

        monkeypatch.setattr(PrefillOps, name, counted)
    return calls


def float32_outputs(
    monkeypatch: pytest.MonkeyPatch, tier: str, positions: int = 40
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """transformers' and the swapped float32 model's hidden states for two sequences of
    `positions` tokens with `tier` active, and how often the swapped one called each kernel."""
    calls = counted_calls(monkeypatch)
    with forced(monkeypatch, tier, load_ops):
        built_or_skip(load_ops(), f"prefill kernels ({tier})")
        model = text_model(torch.float32)
        fast = swapped(model)
        ids = torch.randint(0, 300, (2, positions), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want = model(input_ids=ids).last_hidden_state
            got = fast(input_ids=ids).last_hidden_state
    return got, want, calls


def test_float32_model_is_unchanged_where_the_tier_has_bf16_arithmetic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    got, want, calls = float32_outputs(monkeypatch, "avx512_bf16")
    assert calls == {}
    assert torch.equal(got, want)


@pytest.mark.parametrize("tier", ["avx2", "avx512"])
def test_float32_model_takes_the_kernels_without_bf16_arithmetic(
    monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    """The half-size-weights model computes in float32 on these tiers: its prefill goes through
    the kernels, and its hidden states stay within float32 rounding of transformers'."""
    got, want, calls = float32_outputs(monkeypatch, tier)
    assert calls == {"rms_norm": 2 * 2 + 1, "norm_rotate": 2 * 2, "silu_gate": 2}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_float32_decode_steps_keep_transformers_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """One new position per sequence is a decode step (transformers' generate runs them through
    these modules): transformers' arithmetic, which the engine's own decode steps reproduce, so
    that the two agree token for token."""
    got, want, calls = float32_outputs(monkeypatch, "avx2", positions=1)
    assert calls == {}
    assert torch.equal(got, want)


def test_bfloat16_model_is_as_close_to_float32_as_transformers(
    ops: PrefillOps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill of a prompt and then of a follow-up through the cache: the swapped model runs the
    kernels, and its hidden states are as close to the float32 model's as transformers'
    bfloat16 ones."""
    calls = counted_calls(monkeypatch)
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
