"""The int8 kernel (one source, int8_matvec.c) on every CPU tier this machine can run, forced
lower tiers included: exact against its own arithmetic, close to torch's `_weight_int8pack_mm` on
the same 8-bit weights, and the layer that uses it (engine.cpu.quant.Int8Linear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.cpu.kernels.int8_kernel import Int8Kernel, dot_needs, kernel_for, pack, quantize
from engine.cpu.quant import Int8Linear
from engine.cpu.tiers import X86_TIERS, TierError, choose, cpu_flags
from tests.engine_fixtures import built_or_skip
from tests.test_int4_kernel import TIER_ISA


@pytest.fixture(scope="module", params=X86_TIERS)
def kernel(request: pytest.FixtureRequest) -> Int8Kernel:
    try:
        tier = choose(request.param, cpu_flags())
    except TierError as e:
        pytest.skip(f"this CPU cannot run tier {request.param}: {e}")
    if not tier.has(*dot_needs(tier)):
        pytest.skip(f"tier {request.param} keeps torch's kernels (no byte dot product)")
    built = built_or_skip(kernel_for(tier), f"int8 kernel for {request.param}")
    assert built.isa == TIER_ISA[request.param]  # built with that tier's instructions
    return built


def weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=generator).to(torch.int8)
    q[0, :8] = torch.tensor([-127, 127, -127, 127, -127, -127, 127, 127], dtype=torch.int8)  # extremes
    return q, torch.rand(n, generator=generator) * 0.01 + 1e-3


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """The kernel's arithmetic in float64: activations rounded to int8 per group (max / 127)."""
    rows, k = x.shape
    xg = x.double().reshape(rows, k // group, group)
    step = xg.abs().amax(dim=-1, keepdim=True) / 127
    xq = (torch.where(step > 0, torch.round(xg / step), torch.zeros_like(xg)) * step).reshape(rows, k)
    return (xq @ q.double().T) * scale.double()


@pytest.mark.parametrize(("n", "k", "rows"), [(16, 128, 1), (64, 256, 3), (48, 96, 16), (32, 384, 75)])
def test_matmul_is_its_arithmetic_exactly(kernel: Int8Kernel, n: int, k: int, rows: int) -> None:
    q, scale = weights(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    x[0, 0] = 50.0  # one large activation: its group's scale
    weights_ = pack(q, scale)
    got = kernel.matmul(x, weights_)
    want = reference(x, q, scale, weights_.group)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@torch.inference_mode()
def test_kernel_agrees_with_torchs_int8_kernel(kernel: Int8Kernel) -> None:
    q, scale = weights(64, 512, seed=4)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    want = torch.ops.aten._weight_int8pack_mm(x, q, scale.to(torch.bfloat16)).float()
    got = kernel.matmul(x, pack(q, scale))
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want).norm() / want.norm()) < 0.02


def test_rows_are_independent(kernel: Int8Kernel) -> None:
    """Batched decode gives each conversation exactly what it gets alone, and a prompt's rows
    (taken several per weight load: 19 rows are whole blocks of rows and a part on every tier)
    each what it gets alone."""
    q, scale = weights(32, 256)
    packed = pack(q, scale)
    x = torch.randn(19, 256, generator=torch.Generator().manual_seed(3))
    together = kernel.matmul(x, packed)
    for row in range(19):
        assert torch.equal(together[row], kernel.matmul(x[row : row + 1], packed)[0])


def test_pack_refuses_shapes_the_kernel_cannot_take() -> None:
    q, scale = weights(24, 128)  # 24 rows: not whole blocks of 16
    with pytest.raises(ValueError, match="does not fit"):
        pack(q, scale)


@torch.inference_mode()
def test_linear_uses_the_kernel_for_decode_and_prefill(kernel: Int8Kernel) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=True)
    fast = Int8Linear.from_linear(linear, kernel, torch.float32)
    plain = Int8Linear.from_linear(linear, None, torch.float32)
    assert (fast.kernel_name, plain.kernel_name) == (f"vlbot {kernel.isa}", "torch")
    q, scale = quantize(linear.weight)
    prefill = torch.randn(2, 150, 256)  # a prompt: the kernel, its 8-bit activations included
    want = reference(prefill.reshape(-1, 256), q, scale, 128).reshape(2, 150, 64) + linear.bias
    got = fast(prefill)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    direct = kernel.matmul(prefill.reshape(-1, 256), fast._weights()).reshape(2, 150, 64)
    assert torch.equal(got, direct + linear.bias)
    step = torch.randn(1, 1, 256)
    want = linear(step)
    for module in (fast, plain):  # both close to the original layer
        assert float((module(step) - want).norm() / want.norm()) < 0.02
    assert torch.allclose(fast(step)[0], kernel.matmul(step[0], fast._weights()) + linear.bias)
