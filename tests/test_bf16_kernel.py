"""The bf16 matrix-vector kernel behind the language model's decode steps (engine.cpu.kernels.bf16_kernel),
on every CPU tier this machine runs (forced with VLBOT_CPU): bf16 and float32 activations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engine.cpu.kernels import bf16_gemm
from engine.cpu.kernels.bf16_kernel import (
    FLOAT_PROMPT_MAX_ROWS,
    Bf16Kernel,
    DecodeLinear,
    load_kernel,
    use_for_decode,
)
from engine.cpu.onednn_linear import EVEN_ROWS_FROM
from tests.engine_fixtures import built_or_skip
from tests.tier_helpers import KERNEL_TIERS, forced


@pytest.fixture(params=KERNEL_TIERS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bf16Kernel]:
    with forced(monkeypatch, request.param, load_kernel):
        yield built_or_skip(load_kernel(), f"bf16 kernel on tier {request.param}")


@pytest.fixture
def widening(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts' weights widened for oneDNN, also where engine.cpu.kernels.bf16_gemm's product
    would take them (tested in tests/test_bf16_gemm.py)."""
    monkeypatch.setattr(bf16_gemm, "load_kernel", lambda: None)


@pytest.mark.parametrize(
    ("rows", "n", "k"),
    [(1, 64, 256), (1, 38, 100), (1, 39, 300), (2, 33, 200), (3, 37, 100), (4, 70, 2088), (8, 130, 2048)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_products_match_float64(kernel: Bf16Kernel, rows: int, n: int, k: int, bias: bool) -> None:
    """Whole blocks and the tails (outputs not a multiple of 4 or of the weight rows one
    activation row reads together, inputs not of 32), with a bias; one row goes through its own
    loop."""
    generator = torch.Generator().manual_seed(n + k)
    x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
    weight = torch.randn(n, k, generator=generator).to(torch.bfloat16)
    offset = torch.randn(n, generator=generator).to(torch.bfloat16) if bias else None
    got = kernel.matmul(x, weight, offset)
    want = x.double() @ weight.double().T + (0 if offset is None else offset.double())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the sum
    assert float((got.double() - want).abs().max()) <= 2**-7 * float(want.abs().max())


@pytest.mark.parametrize(
    ("rows", "n", "k"),
    [(1, 64, 256), (1, 39, 300), (2, 33, 200), (3, 37, 100), (4, 71, 2088), (8, 130, 2048)],
)
def test_float32_activations_against_bf16_weights(
    kernel: Bf16Kernel, widening: None, rows: int, n: int, k: int
) -> None:
    """The half-size-weights path: float32 in and out, only the weights are bf16 (so the
    result is torch's float32 product with those weights, to float32 summation order)."""
    generator = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, k, generator=generator)
    weight = torch.randn(n, k, generator=generator).to(torch.bfloat16)
    offset = torch.randn(n, generator=generator).to(torch.bfloat16)
    want = F.linear(x.double(), weight.double(), offset.double())
    got = kernel.matmul(x, weight, offset)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    wide = kernel.widened_matmul(x, weight, offset)  # the prompt path: weights widened in blocks
    torch.testing.assert_close(wide.double(), want, rtol=1e-5, atol=1e-4)


def test_a_prompt_widens_the_weights_block_by_block(
    kernel: Bf16Kernel, widening: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("engine.cpu.kernels.bf16_kernel.WIDEN_BLOCK", 3 * 64)  # 3 rows a block
    x = torch.randn(FLOAT_PROMPT_MAX_ROWS + 5, 64)
    weight = torch.randn(11, 64).to(torch.bfloat16)
    layer = DecodeLinear(nn.Linear(64, 11, bias=False).to(torch.bfloat16), kernel)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    with torch.inference_mode():
        got = layer(x[None])[0]
    torch.testing.assert_close(got, F.linear(x, weight.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [9, 21, FLOAT_PROMPT_MAX_ROWS, FLOAT_PROMPT_MAX_ROWS + 1])
def test_a_short_float32_prompt_goes_through_the_kernel(
    kernel: Bf16Kernel, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    """A follow-up's short text prompt over half-size weights: up to FLOAT_PROMPT_MAX_ROWS rows
    the kernel takes them (MAX_ROWS rows a pass, the last pass partial) instead of widening the
    weights; longer prompts widen. Either way the float32 product with the bf16 weights."""
    widened: list[int] = []
    widen = Bf16Kernel.widened_matmul

    def counted(self: Bf16Kernel, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        widened.append(x.shape[0])
        return widen(self, x, *args)

    monkeypatch.setattr(Bf16Kernel, "widened_matmul", counted)
    generator = torch.Generator().manual_seed(rows)
    linear = nn.Linear(200, 37, bias=True).to(torch.bfloat16)
    layer = DecodeLinear(linear, kernel)
    x = torch.randn(1, rows, 200, generator=generator)
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert widened == ([] if rows <= FLOAT_PROMPT_MAX_ROWS else [rows])


@pytest.mark.parametrize("rows", [EVEN_ROWS_FROM - 1, EVEN_ROWS_FROM, EVEN_ROWS_FROM + 73])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_long_prompt_is_multiplied_over_an_even_number_of_rows(
    kernel: Bf16Kernel, widening: None, monkeypatch: pytest.MonkeyPatch, rows: int, dtype: torch.dtype
) -> None:
    """oneDNN is slow over some odd row counts (engine.cpu.onednn_linear): a prompt of an odd
    number of rows from EVEN_ROWS_FROM on gets one zero row more for the product, which is
    dropped again; every row's result is the product of its own input."""
    seen: list[int] = []
    product = F.linear

    def counted(x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        seen.append(x.shape[0])
        return product(x, *args)

    monkeypatch.setattr(F, "linear", counted)
    monkeypatch.setattr("engine.cpu.onednn_linear.available", lambda: False)  # every product seen
    generator = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    layer = DecodeLinear(linear, kernel)
    x = torch.randn(1, rows, 96, generator=generator).to(dtype)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (1, rows, 40) and got.dtype == dtype
    want = x.double() @ linear.weight.double().T + linear.bias.double()
    rtol, atol = (1e-2, 5e-2) if dtype == torch.bfloat16 else (1e-5, 1e-4)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    padded = rows + 1 if rows % 2 and rows >= EVEN_ROWS_FROM else rows  # 255, 256, 330
    assert seen and set(seen) == {padded}


@pytest.mark.parametrize("rows", [3, 5])
def test_rows_are_independent(kernel: Bf16Kernel, rows: int) -> None:
    """A row's result never depends on the other rows of its batch (bit for bit); alone it goes
    through the single-row loop, whose summation order differs: equal up to rounding."""
    x = torch.randn(rows, 96).to(torch.bfloat16)
    weight = torch.randn(40, 96).to(torch.bfloat16)
    together = kernel.matmul(x, weight, None)
    for row in range(rows):
        others = torch.randn(rows, 96).to(torch.bfloat16)
        others[row] = x[row]
        assert torch.equal(together[row], kernel.matmul(others, weight, None)[row])
        alone = kernel.matmul(x[row : row + 1], weight, None)[0]
        torch.testing.assert_close(alone.float(), together[row].float(), rtol=1e-2, atol=1e-2)


def test_refuses_other_dtypes(kernel: Bf16Kernel) -> None:
    with pytest.raises(TypeError):
        kernel.matmul(torch.randn(1, 32), torch.randn(8, 32), None)


@torch.inference_mode()
def test_decode_linear_shares_the_weights_and_leaves_prefill_to_torch(kernel: Bf16Kernel) -> None:
    linear = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    layer = DecodeLinear(linear, kernel)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    step = torch.randn(min(2, kernel.max_rows), 1, 64).to(torch.bfloat16)
    assert torch.equal(layer(step)[:, 0], kernel.matmul(step[:, 0], linear.weight, linear.bias))
    prefill = torch.randn(1, kernel.max_rows + 1, 64).to(torch.bfloat16)
    assert torch.equal(layer(prefill), F.linear(prefill, linear.weight, linear.bias))
    as_float = torch.randn(1, 1, 64)  # float32 activations: the half-size-weights path
    want = F.linear(as_float, linear.weight.float(), linear.bias.float())
    torch.testing.assert_close(layer(as_float), want, rtol=1e-5, atol=1e-5)


def test_use_for_decode_skips_float32_models(kernel: Bf16Kernel) -> None:
    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.language_model = Text()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(8, 16)

    model = Model()
    assert use_for_decode(model) == 0 and isinstance(model.lm_head, nn.Linear)
    model = model.to(torch.bfloat16)
    assert use_for_decode(model) == 2
    assert isinstance(model.lm_head, DecodeLinear)
    assert isinstance(model.model.language_model.proj, DecodeLinear)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adjacent_layers_are_read_as_one_matrix(kernel: Bf16Kernel, dtype: torch.dtype) -> None:
    """q/k/v-like layers whose weights lie back to back: one call gives each layer's own
    product (bf16 activations, and float32 ones against bf16 weights)."""
    from engine.cpu.kernels.bf16_kernel import AdjacentLinears

    block = torch.randn(24, 64).to(torch.bfloat16)
    layers: list[nn.Module] = []
    for rows in (slice(0, 10), slice(10, 24)):
        linear = nn.Linear(64, rows.stop - rows.start, bias=False).to(torch.bfloat16)
        linear.weight = nn.Parameter(block[rows], requires_grad=False)  # views of one storage
        layers.append(DecodeLinear(linear, kernel))
    joined = AdjacentLinears(layers)
    x = torch.randn(3, 1, 64).to(dtype)
    out = joined.project(x)
    assert out is not None and out.dtype == dtype
    for part, layer in zip(joined.parts(out), layers, strict=True):
        assert torch.equal(part, layer(x))
