"""The int4 kernel (one source, int4_matvec.c) on every CPU tier this machine can run, forced
lower tiers included: exact against its own arithmetic, close to the float weights and torch's
result; torch's kernel where it is not loaded (building and fallback: tests/test_native_kernels.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.cpu.kernels.int4_kernel import Int4Kernel, PackedInt4, kernel_for, pack
from engine.cpu.kernels.int8_kernel import dot_needs
from engine.cpu.quant import Int4Linear
from engine.cpu.tiers import X86_TIERS, TierError, choose, cpu_flags
from tests.engine_fixtures import built_or_skip

# what quant_dot.h picks on each tier
TIER_ISA = {"generic": "generic", "avx2": "avx2", "avx512": "avx512bw", "avx512_bf16": "avx512_vnni",
            "amx": "avx512_vnni", "aarch64": "neon_dotprod"}  # fmt: skip


def tier_kernel(name: str) -> Int4Kernel:
    try:
        tier = choose(name, cpu_flags())
    except TierError as e:
        pytest.skip(f"this CPU cannot run tier {name}: {e}")
    if not tier.has(*dot_needs(tier)):
        pytest.skip(f"tier {name} keeps torch's kernels (no byte dot product)")
    kernel = built_or_skip(kernel_for(tier), f"int4 kernel for {name}")
    if name in TIER_ISA and tier.name != "aarch64":
        assert kernel.isa == TIER_ISA[name]  # built with that tier's instructions
    return kernel


@pytest.fixture(scope="module", params=X86_TIERS)
def kernel(request: pytest.FixtureRequest) -> Int4Kernel:
    return tier_kernel(request.param)


def quantized(n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=generator)
    scale = torch.rand(n, k // group, generator=generator) * 0.02 + 1e-3
    low = -8 * scale + torch.randn(n, k // group, generator=generator) * 1e-3
    # the kernel keeps scales and lows in float16: values it holds exactly
    return q, scale.half().float(), low.half().float()


def float_weights(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    grouped = q.double().reshape(n, k // group, group)
    return (grouped * scale.double()[..., None] + low.double()[..., None]).reshape(n, k)


def unpack(packed: PackedInt4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack` undone: q (N, K), scale and low (N, K/group) as floats."""
    n, k = packed.out_features, packed.in_features
    chunks = packed.packed.reshape(n // 16, k // 8, 16, 4)
    nibbles = torch.stack([chunks & 15, chunks >> 4], dim=3)  # (blocks, K/8, 16, 2, 4)
    q = nibbles.permute(0, 2, 1, 3, 4).reshape(n, k)

    def per_row(values: torch.Tensor) -> torch.Tensor:
        return values.float().permute(0, 2, 1).reshape(n, k // packed.group)

    return q, per_row(packed.scales), per_row(packed.lows)


def reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int
) -> torch.Tensor:
    """The kernel's arithmetic in float64: activations rounded to int8 per group (scale max/127),
    the group's exact sum times `low`."""
    rows, k = x.shape
    xg = x.double().reshape(rows, k // group, group)
    step = xg.abs().amax(dim=-1, keepdim=True) / 127
    xq = torch.where(step > 0, torch.round(xg / step), torch.zeros_like(xg)) * step
    n = q.shape[0]
    qg = q.double().reshape(n, k // group, group)
    dots = torch.einsum("rgi,ngi->rng", xq, qg)
    return (dots * scale.double()[None]).sum(-1) + torch.einsum("rg,ng->rn", xg.sum(-1), low.double())


@pytest.mark.parametrize(
    ("n", "k", "group", "rows"), [(16, 128, 128, 1), (64, 256, 64, 3), (48, 384, 128, 16), (32, 256, 32, 75)]
)
def test_matmul_is_its_arithmetic_exactly(kernel: Int4Kernel, n: int, k: int, group: int, rows: int) -> None:
    q, scale, low = quantized(n, k, group)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    if k > group:
        x[0, :group] = 0  # an all-zero group quantizes to zeros, not NaN
    got = kernel.matmul(x, pack(q, scale, low, group))
    want = reference(x, q, scale, low, group)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    exact = x.double() @ float_weights(q, scale, low, group).T  # int8 activations: ~1 % off
    assert float((got.double() - exact).norm() / exact.norm()) < 0.03


def test_bfloat16_in_and_out(kernel: Int4Kernel) -> None:
    q, scale, low = quantized(32, 256, 128)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    weights = pack(q, scale, low, 128)
    got = kernel.matmul(x.to(torch.bfloat16), weights)
    want = kernel.matmul(x.to(torch.bfloat16).float(), weights)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_rows_are_independent(kernel: Int4Kernel) -> None:
    """Batched decode gives each conversation exactly what it gets alone, and a prompt's rows
    (taken several per weight load: 19 rows are whole blocks of rows and a part on every tier)
    each what it gets alone."""
    q, scale, low = quantized(32, 256, 64)
    weights = pack(q, scale, low, 64)
    x = torch.randn(19, 256, generator=torch.Generator().manual_seed(3))
    together = kernel.matmul(x, weights)
    for row in range(19):
        assert torch.equal(together[row], kernel.matmul(x[row : row + 1], weights)[0])


def test_scales_and_lows_are_kept_in_half_precision(kernel: Int4Kernel) -> None:
    """Scales and lows that float16 cannot hold are rounded to it once, at packing: the product
    is the arithmetic with the rounded values (and the packed weights a sixteenth smaller)."""
    q, scale, low = quantized(32, 256, 128, seed=3)
    scale, low = scale * (1 + 1e-3 / 3), low * (1 - 1e-3 / 7)  # not float16 values any more
    packed = pack(q, scale, low, 128)
    assert packed.scales.dtype == packed.lows.dtype == torch.float16
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(4))
    want = reference(x, q, scale.half().float(), low.half().float(), 128)
    got = kernel.matmul(x, packed)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_pack_refuses_shapes_the_kernel_cannot_take() -> None:
    q, scale, low = quantized(24, 128, 128)  # 24 rows: not whole blocks of 16
    with pytest.raises(ValueError, match="does not fit"):
        pack(q, scale, low, 128)


@torch.inference_mode()
def test_linear_uses_the_kernel_for_decode_and_prefill(kernel: Int4Kernel) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=True)
    fast, plain = Int4Linear.from_linear(linear, 128, kernel), Int4Linear.from_linear(linear, 128, None)
    assert (fast.kernel_name, plain.kernel_name) == (f"vlbot {kernel.isa}", "torch")
    prefill = torch.randn(1, 150, 256)  # a prompt: the kernel, its 8-bit activations included
    packed = fast._weights()
    want = reference(prefill[0], *unpack(packed), 128)
    got = fast(prefill)[0]
    assert torch.allclose((got - linear.bias).double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(got, kernel.matmul(prefill[0], packed) + linear.bias)
    step = torch.randn(1, 1, 256)
    want = linear(step)
    for module in (fast, plain):  # both close to the original layer
        assert float((module(step) - want).norm() / want.norm()) < 0.15
    assert torch.allclose(fast(step)[0], kernel.matmul(step[0], packed) + linear.bias)


@torch.inference_mode()
def test_kernel_agrees_with_torchs_int4_kernel(kernel: Int4Kernel) -> None:
    """Same 4-bit weights through torch's `_weight_int4pack_mm_for_cpu` (dequantized reference):
    the two differ only by the 8-bit activations."""
    q, scale, low = quantized(64, 512, 128, seed=5)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    zero = low + 8.0 * scale
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, scales_zeros).float()
    got = kernel.matmul(x, pack(q, scale, low, 128)).float()
    assert float((got - want).norm() / want.norm()) < 0.03
