"""The prompt product of float32 rows and bf16 weights (engine.cpu.kernels.bf16_gemm) on every CPU
tier this machine runs (forced with VLBOT_CPU), against float64; and where the engine uses it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engine.cpu import tiers
from engine.cpu.kernels import bf16_gemm
from engine.cpu.kernels.bf16_gemm import Bf16Gemm
from engine.cpu.kernels.bf16_kernel import FLOAT_PROMPT_MAX_ROWS, DecodeLinear
from engine.cpu.kernels.bf16_kernel import load_kernel as load_bf16_kernel
from engine.cpu.native import kernel_status
from tests.engine_fixtures import built_or_skip
from tests.tier_helpers import KERNEL_TIERS, forced


@pytest.fixture(params=KERNEL_TIERS)
def tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with forced(monkeypatch, request.param, load_bf16_kernel):
        yield request.param


@pytest.fixture
def gemm(tier: str) -> Bf16Gemm:
    return built_or_skip(bf16_gemm.build_kernel(), f"bf16 product on tier {tier}")


@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [
        (330, 2048, 160),  # a photo's prompt: whole 6-row panels, 8 column blocks
        (25, 300, 70),  # rows, columns and outputs all leaving partial blocks
        (1, 7, 3),
        (97, 513, 530),  # more than one block of outputs per thread, the last partial
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_products_match_float64(gemm: Bf16Gemm, rows: int, k: int, n: int, bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(rows, k, generator=generator)
    weight = torch.randn(n, k, generator=generator).to(torch.bfloat16)
    offset = torch.randn(n, generator=generator) if bias else None
    got = gemm(x, weight, offset)
    want = F.linear(x.double(), weight.double(), None if offset is None else offset.double())
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * k**0.5)


def test_rows_are_independent(gemm: Bf16Gemm) -> None:
    """A row's result does not depend on the rows packed beside it (the zero rows past the last
    panel's end, other prompts' rows)."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(13, 256, generator=generator)
    weight = torch.randn(48, 256, generator=generator).to(torch.bfloat16)
    whole = gemm(x, weight, None)
    assert torch.equal(gemm(x[4:5], weight, None)[0], whole[4])
    assert torch.equal(gemm(x[6:12], weight, None), whole[6:12])


def test_shapes_that_do_not_fit_are_refused(gemm: Bf16Gemm) -> None:
    with pytest.raises(ValueError, match="columns"):
        gemm(torch.randn(4, 32), torch.randn(8, 16).to(torch.bfloat16), None)
    with pytest.raises(ValueError, match="bfloat16 weight"):
        gemm(torch.randn(4, 16), torch.randn(8, 16), None)


def test_a_long_float32_prompt_goes_through_it_on_the_avx2_tier_only(
    tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the AVX2 tier (where it was measured to win) a half-size-weights layer's long prompt is
    this product; on AVX-512 tiers the weights are widened for oneDNN as before, on aarch64 too.
    The result is the float32 product with the bf16 weights either way."""
    kernel = built_or_skip(load_bf16_kernel(), f"bf16 kernel on tier {tier}")
    used: list[int] = []
    product = Bf16Gemm.__call__

    def counted(self: Bf16Gemm, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        used.append(x.shape[0])
        return product(self, x, *args)

    monkeypatch.setattr(Bf16Gemm, "__call__", counted)
    linear = nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    layer = DecodeLinear(linear, kernel)
    rows = FLOAT_PROMPT_MAX_ROWS + 9
    x = torch.randn(1, rows, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert used == ([rows] if tier == "avx2" else [])


@pytest.mark.parametrize(
    ("flags", "machine", "tier_name", "why"),
    [
        (frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}), "x86_64",
         "avx512", "oneDNN's float32 product is unmeasured against it"),
        (frozenset({"asimd"}), "aarch64", "aarch64", "speed not measurable here"),
    ],
)  # fmt: skip
def test_doctor_says_why_it_is_not_used_on_avx512_and_aarch64(
    flags: frozenset[str], machine: str, tier_name: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the product is kept off (a policy, not a missing instruction), the kernel summary that
    `vlbot doctor`, /health and the benchmark report print names the tier and the reason. Nothing
    of that tier is built or run: the decision comes first."""
    monkeypatch.setattr(bf16_gemm, "active_tier", lambda: tiers.detect(flags, machine))
    bf16_gemm._kernel_for.cache_clear()
    try:
        assert bf16_gemm.load_kernel() is None
        assert kernel_status()["bf16_gemm"] == f"not used on tier {tier_name}: {why}"
    finally:
        bf16_gemm._kernel_for.cache_clear()
