"""engine.cpu.onednn_linear: float32 linears through oneDNN on the x86 tiers this machine runs
(forced with VLBOT_CPU), close to F.linear; the swapped linears hold their weights reordered into
oneDNN's layout instead of the plain ones; bf16 layers are left to torch."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engine.cpu import onednn_linear
from engine.cpu.onednn_linear import OneDnnLinear, available, use_onednn_linears
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


def test_only_float32_linears_are_swapped_and_hold_reordered_weights(tier: str) -> None:
    """The swapped linear holds oneDNN's reordered copy of its weight, the plain one released
    (the same bytes held), the same bias, and gives F.linear's result for inputs of any leading
    dimensions."""
    model = nn.Sequential(nn.Linear(16, 8), nn.Sequential(nn.Linear(8, 4).to(torch.bfloat16)), nn.ReLU())
    weight, bias = model[0].weight.detach().clone(), model[0].bias
    plain = weakref.ref(model[0].weight)
    assert use_onednn_linears(model) == 1
    gc.collect()
    swapped = model[0]
    assert isinstance(swapped, OneDnnLinear) and swapped.bias is bias
    assert plain() is None and swapped.weight.is_mkldnn and tuple(swapped.weight.shape) == (8, 16)
    assert dict(swapped.named_buffers()).keys() == {"weight"}
    assert type(model[1][0]) is nn.Linear  # bf16: torch's own
    x = torch.randn(5, 16)
    with torch.inference_mode():
        torch.testing.assert_close(swapped(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(swapped(x[None]), F.linear(x, weight, bias)[None], rtol=1e-5, atol=1e-5)


def test_with_gradients_torchs_linear_is_used() -> None:
    source = nn.Linear(4, 2)
    weight = source.weight.detach().clone()
    layer = OneDnnLinear(source)
    x = torch.randn(3, 4)
    out = layer(x)
    out.sum().backward()  # F.linear's graph over the dense weight: the bias gets its gradient
    assert layer.bias is not None and layer.bias.grad is not None
    torch.testing.assert_close(out.detach(), F.linear(x, weight, layer.bias.detach()))
