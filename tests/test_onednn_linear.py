"""engine.cpu.onednn_linear: float32 linears through oneDNN on the x86 tiers this machine runs
(forced with VLBOT_CPU), close to F.linear; the swapped linears' weights are reordered into
oneDNN's layout in the engine's idle time (the plain ones released); bf16 layers are left to torch."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engine.cpu import onednn_linear
from engine.cpu.onednn_linear import (
    EVEN_ROWS_FROM,
    OneDnnLinear,
    available,
    reorder_weights,
    use_onednn_linears,
)
from tests.tier_helpers import forced


@pytest.fixture(params=["avx2", "avx512", "avx512_bf16"])
def tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with forced(monkeypatch, request.param, available):
        if not available():
            pytest.skip("this torch has no oneDNN float32 linear")
        yield request.param


@torch.inference_mode()
@pytest.mark.parametrize("shape", [(3, 64), (2, 37, 64), (1, 1, 64)])
def test_products_match_torchs_linear(tier: str, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=generator)
    weight, bias = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
    got = onednn_linear.linear(x, weight, bias)
    assert got.shape == (*shape[:-1], 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_only_float32_linears_are_swapped_and_their_weights_reordered_later(tier: str) -> None:
    """The swapped linear keeps its parameters until `reorder_weights` (the engine's idle-time
    preparation) replaces the weight with oneDNN's reordered copy, the plain one released (the
    same bytes held); before and after, F.linear's result for inputs of any leading dimensions."""
    model = nn.Sequential(nn.Linear(16, 8), nn.Sequential(nn.Linear(8, 4).to(torch.bfloat16)), nn.ReLU())
    first = model[0]
    weight, bias = first.weight.detach().clone(), first.bias
    assert use_onednn_linears(model) == 1
    swapped = model[0]
    assert isinstance(swapped, OneDnnLinear) and swapped.weight is first.weight and swapped.bias is bias
    assert type(model[1][0]) is nn.Linear  # bf16: torch's own
    x = torch.randn(5, 16)
    with torch.inference_mode():
        before = swapped(x)
    torch.testing.assert_close(before, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    plain = weakref.ref(first.weight)
    del first
    assert reorder_weights(model, should_stop=lambda: True) is False  # a request came: later
    assert not swapped.reordered
    assert reorder_weights(model) is True and swapped.reordered
    gc.collect()
    assert plain() is None and swapped.weight.is_mkldnn and tuple(swapped.weight.shape) == (8, 16)
    assert dict(swapped.named_buffers()).keys() == {"weight"} and swapped.bias is bias
    with torch.inference_mode():
        assert torch.equal(swapped(x), before)  # the same bits
        assert torch.equal(swapped(x[None]), before[None])
    assert reorder_weights(model) is True  # nothing left to do


def test_with_gradients_torchs_linear_is_used() -> None:
    layer = OneDnnLinear(nn.Linear(4, 2))
    x = torch.randn(3, 4)
    out = layer(x)
    out.sum().backward()  # F.linear's graph: the weights get their gradients
    assert layer.weight.grad is not None
    weight = layer.weight.detach().clone()
    layer.reorder()
    out = layer(x)  # over a dense copy of the reordered weight: the bias still gets its gradient
    out.sum().backward()
    assert layer.bias is not None and layer.bias.grad is not None
    torch.testing.assert_close(out.detach(), F.linear(x, weight, layer.bias.detach()))


@torch.inference_mode()
@pytest.mark.parametrize("rows", [EVEN_ROWS_FROM + 1, EVEN_ROWS_FROM + 2])
def test_an_odd_count_of_many_rows_is_multiplied_with_one_row_more(
    tier: str, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    """oneDNN is slow over some odd row counts: the layer multiplies one zero row more and
    drops its result; the rows' products are those of F.linear (reordered weight or not)."""
    seen: list[int] = []
    product = OneDnnLinear._product

    def counted(self: OneDnnLinear, x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return product(self, x)

    monkeypatch.setattr(OneDnnLinear, "_product", counted)
    layer = OneDnnLinear(nn.Linear(32, 24))
    weight, bias = layer.weight.detach().clone(), layer.bias
    x = torch.randn(1, rows, 32)
    want = F.linear(x, weight, bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
    layer.reorder()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
    assert seen == [rows + rows % 2] * 2
