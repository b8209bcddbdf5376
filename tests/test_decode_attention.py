"""engine.cpu.kernels.decode_attention: one query per conversation attended over its cached keys and values in
C gives the attention (float64 reference) as closely as torch's kernel does, over bfloat16 and
float32 caches on every CPU tier this machine runs (forced with VLBOT_CPU), float32 queries over a
bfloat16 cache too (engine.cpu.half_weights), reading the cache in place (views with spare room)
and honouring each batch row's left padding."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from engine.cpu.kernels.decode_attention import DecodeAttention, left_padding, load_attention
from tests.engine_fixtures import built_or_skip
from tests.tier_helpers import KERNEL_TIERS, forced


@pytest.fixture(params=KERNEL_TIERS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[DecodeAttention]:
    with forced(monkeypatch, request.param, load_attention):
        yield built_or_skip(load_attention(), f"decode attention kernel on tier {request.param}")


def exact(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """(B, 1, H * D) in float64, row b attending to positions starts[b]: only."""
    batch, heads, _, dim = q.shape
    group = heads // keys.shape[1]
    rows = []
    for b in range(batch):
        k = keys[b, :, starts[b] :].double().repeat_interleave(group, dim=0)
        v = values[b, :, starts[b] :].double().repeat_interleave(group, dim=0)
        weights = torch.softmax(q[b].double() @ k.transpose(1, 2) * dim**-0.5, dim=-1)
        rows.append((weights @ v).reshape(1, heads * dim))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["bf16", "float32", "float32-over-bf16-cache"],
)
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "dim", "length", "pads"),
    [
        (1, 16, 8, 128, 300, [0]),
        (3, 16, 8, 128, 300, [0, 17, 299]),  # left padding; the last row has only its new token
        (2, 8, 2, 64, 45, [3, 0]),
        (1, 4, 4, 32, 1, [0]),
    ],
)
def test_attention_of_one_query_per_row(
    kernel: DecodeAttention,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    batch: int,
    heads: int,
    kv_heads: int,
    dim: int,
    length: int,
    pads: list[int],
) -> None:
    generator = torch.Generator().manual_seed(length)
    # cache views with spare room after them, as engine.qwen.kvbuffer holds them
    spare = (batch, kv_heads, length + 24, dim)
    keys = torch.randn(spare, generator=generator).to(cache_dtype)[:, :, :length]
    values = torch.randn(spare, generator=generator).to(cache_dtype)[:, :, :length]
    q = torch.randn(batch, 1, heads, dim, generator=generator).to(dtype).transpose(1, 2)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    starts = left_padding(mask)
    assert starts is not None and starts.tolist() == pads
    assert kernel.takes(q, keys, values)
    got = kernel(q, keys, values, starts if any(pads) else None, dim**-0.5)
    truth = exact(q, keys, values, pads)
    theirs = (
        F.scaled_dot_product_attention(
            q,
            keys.to(dtype),
            values.to(dtype),
            attn_mask=mask.bool()[:, None, None, :],
            scale=dim**-0.5,
            enable_gqa=True,
        )
        .transpose(1, 2)
        .reshape(batch, 1, heads * dim)
    )
    ours_error = float((got.double() - truth).norm() / truth.norm())
    torch_error = float((theirs.double() - truth).norm() / truth.norm())
    assert got.shape == theirs.shape and got.dtype == dtype
    if dtype == torch.bfloat16:  # one rounding of the result to bfloat16, as torch's
        assert ours_error < 4e-3 and ours_error <= 2 * torch_error + 1e-4
    else:
        assert ours_error < 1e-5 and ours_error <= 4 * torch_error + 1e-6


def test_left_padding_is_recognised_and_anything_else_refused() -> None:
    assert left_padding(torch.tensor([[1, 1, 1], [0, 1, 1]])).tolist() == [0, 1]  # type: ignore[union-attr]
    assert left_padding(torch.tensor([[1, 0, 1]])) is None  # a hole: not left padding
    assert left_padding(torch.tensor([[0, 0, 0]])) is None  # nothing to attend to


def test_only_caches_it_can_read_are_taken(kernel: DecodeAttention) -> None:
    keys = torch.randn(1, 8, 10, 128, dtype=torch.bfloat16)
    q = torch.randn(1, 16, 1, 256, dtype=torch.bfloat16)[..., :128]  # heads not packed together
    assert not kernel.takes(q, keys, keys)
    q = q.contiguous()
    assert kernel.takes(q, keys, keys)
    assert kernel.takes(q.float(), keys.float(), keys.float())
    assert kernel.takes(q.float(), keys, keys)  # float32 queries over a bf16 cache
    assert not kernel.takes(q, keys.float(), keys.float())  # but not bf16 ones over a float32 cache
    assert not kernel.takes(q.float(), keys, keys.float())  # keys and values of one dtype
    assert not kernel.takes(q.half(), keys.half(), keys.half())
    assert not kernel.takes(q, keys, keys.transpose(2, 3).contiguous().transpose(2, 3))
    assert not kernel.takes(q, torch.randn(1, 5, 10, 128, dtype=torch.bfloat16), keys)
