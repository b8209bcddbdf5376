"""engine.cpu.kernels.output_head: the screened bfloat16 head gives each row's top logits bit for bit as the
bf16 kernel computes them over the whole head (ties and near-ties included), so greedy and top-k
answers do not change; the engine uses it once built and answers as without it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import engine.cpu.kernels.output_head
import engine.qwen.engine
from bot.models import Message
from engine.cpu.hugepages import on_huge_pages
from engine.cpu.kernels.bf16_kernel import Bf16Kernel, DecodeLinear
from engine.cpu.kernels.bf16_kernel import load_kernel as load_bf16_kernel
from engine.cpu.kernels.output_head import MAX_TOP, OutputHead, load_screen
from engine.cpu.tiers import active_tier
from tests.engine_fixtures import built_or_skip
from tests.test_engine_qwen import answer, png_image
from tests.tier_helpers import forced

pytest_plugins = ["tests.engine_fixtures"]


def kernels() -> tuple[Any, Bf16Kernel]:
    screen = built_or_skip(load_screen(), "int8 screen kernel")
    return screen, built_or_skip(load_bf16_kernel(), "bf16 kernel")


def built_head(weight: torch.Tensor) -> tuple[OutputHead, Bf16Kernel]:
    screen, kernel = kernels()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    head = OutputHead(DecodeLinear(linear, kernel), screen, kernel)
    assert not head.screens
    assert head.prepare() is True and head.screens
    return head, kernel


def random_weight(rows: int, channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, channels, generator=generator) * 0.02).to(torch.bfloat16)


def check_top(head: OutputHead, kernel: Bf16Kernel, hidden: torch.Tensor, top: int) -> None:
    """Every logit the screen returns is the kernel's, and every row's `top` largest kernel
    logits (and any logit tied with the smallest of them) are among those returned."""
    weight = head.weight.detach()
    with torch.inference_mode():
        want = kernel.matmul(hidden, weight, None)
        got = head(hidden, top)
    assert got.shape == want.shape
    finite = torch.isfinite(got)
    assert torch.equal(got[finite], want[finite])
    kth = want.float().topk(top, dim=-1).values[:, -1:]
    assert bool(finite[want.float() >= kth].all())
    assert torch.equal(got.argmax(dim=-1), want.argmax(dim=-1))  # the first of tied maxima too
    assert int(finite.sum()) < want.numel()  # it did screen: not every logit was computed


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("top", [1, 20])
def test_the_screen_gives_the_kernels_top_logits(rows: int, top: int) -> None:
    # 4,099 rows (odd, not a multiple of any block) of 200 channels (not a multiple of 64)
    head, kernel = built_head(random_weight(4099, 200, seed=rows))
    generator = torch.Generator().manual_seed(100 + rows)
    for _ in range(4):
        hidden = torch.randn(rows, 200, generator=generator).to(torch.bfloat16)
        check_top(head, kernel, hidden, top)
    assert head.screened_steps == 4


@pytest.mark.parametrize("tier", ["avx2", "avx512", "avx512_bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_x86_tier_screens_bf16_and_float32_activations(
    tier: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy's dot products (VNNI's, or vpmaddubsw's on AVX2 and AVX-512 without VNNI) over
    bfloat16 activations and float32 ones (a half-size-weights model computing in float32):
    every returned logit is the bf16 kernel's, the top ones all there, with outlier channels."""
    with forced(monkeypatch, tier, load_screen, load_bf16_kernel):
        head, kernel = built_head(random_weight(4099, 200, seed=7))
        generator = torch.Generator().manual_seed(8)
        for rows in (1, 2, 4, 9):
            hidden = torch.randn(rows, 200, generator=generator)
            hidden[:, 17] = 40.0 * (1 + rows)
            for top in (1, 20):
                check_top(head, kernel, hidden.to(dtype), top)
        assert head.screened_steps == 8


def test_ties_and_near_ties_pick_the_first_row_as_the_full_head_does() -> None:
    weight = random_weight(2048, 128, seed=7)
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(1, 128, generator=generator).to(torch.bfloat16)
    # the row with the largest logit, copied further down (an exact tie) and copied with its
    # last weight nudged by one bf16 step (a tie after rounding, or the next value)
    best = int((weight.float() @ hidden.float().T).argmax())
    weight[1500] = weight[best]
    weight[2046] = weight[best]
    weight[2046, -1] = torch.nextafter(weight[best, -1].float(), torch.tensor(1.0)).to(torch.bfloat16)
    weight[:best] = weight[:best] * 0.5  # rows before it are smaller: the tie decides
    head, kernel = built_head(weight)
    check_top(head, kernel, hidden, 1)
    check_top(head, kernel, hidden, 3)


def test_the_bound_holds_where_it_is_tight() -> None:
    """Two channels, the activation on the second only: the 8-bit error of a row is then all of
    its bound. Row 1's copy rounds down by almost half a step, row 2 (finer scale) rounds up:
    the copy ranks row 2 first, the bf16 head row 1."""
    weight = torch.zeros(24, 2)
    weight[:, 0], weight[:, 1] = 0.5, -0.5  # the rest: far below
    weight[1] = torch.tensor([1.0, 10.45 / 127])  # scale 1/127: copy 10/127 = 0.0787
    weight[2] = torch.tensor([0.5, 0.0815])  # scale 0.5/127: copy 21 * 0.5/127 = 0.0827
    head, kernel = built_head(weight.to(torch.bfloat16))
    hidden = torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16)
    with torch.inference_mode():
        assert int(kernel.matmul(hidden, head.weight.detach(), None).argmax()) == 1
    check_top(head, kernel, hidden, 1)


def test_a_logit_that_rounds_to_the_maximum_is_kept() -> None:
    """Rows whose 8-bit copy is exact (entries k/128, one of them 127/128): the bounds are
    nearly zero. Row 3's logit, 1 - 2^-10, is below row 5's 1.0 but rounds to it in bfloat16,
    and the first of tied maxima is the answer."""
    weight = torch.zeros(16, 64)
    weight[:, 0] = -127 / 128
    weight[3, 0], weight[3, 1] = 127 / 128, 7 / 128
    weight[5, 0], weight[5, 1] = 127 / 128, 8 / 128
    head, kernel = built_head(weight.to(torch.bfloat16))
    hidden = torch.zeros(1, 64)
    hidden[0, 0], hidden[0, 1] = 1.0, 0.125
    hidden = hidden.to(torch.bfloat16)
    with torch.inference_mode():
        full = kernel.matmul(hidden, head.weight.detach(), None)
    assert float(full[0, 3]) == float(full[0, 5]) == 1.0 and int(full.argmax()) == 3
    check_top(head, kernel, hidden, 1)


def test_outlier_channels_and_an_odd_row_count_stay_exact() -> None:
    # final hidden states of real models have a few channels far larger than the rest
    weight = random_weight(1027, 256, seed=3)
    head, kernel = built_head(weight)
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(4, 256, generator=generator)
    hidden[:, 17] = 400.0
    hidden[:, 200] = -250.0
    check_top(head, kernel, hidden.to(torch.bfloat16), 1)
    hidden = torch.zeros(1, 256)  # every logit 0: all tied, the first one wins
    with torch.inference_mode():
        got = head(hidden.to(torch.bfloat16), 1)
    assert int(got.argmax()) == 0


def test_the_full_head_answers_before_the_copy_and_beyond_its_top() -> None:
    screen, kernel = kernels()
    weight = random_weight(600, 64, seed=1)
    linear = nn.Linear(64, 600, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    head = OutputHead(linear, screen, kernel)
    hidden = torch.randn(2, 64).to(torch.bfloat16)
    with torch.inference_mode():
        want = linear(hidden)
        assert torch.equal(head(hidden, 1), want)  # not built yet
        assert head.prepare(should_stop=lambda: True) is False  # a request came: later
        assert head.prepare() is True
        assert torch.equal(head(hidden, MAX_TOP + 1), want)  # beyond what it screens
        assert torch.equal(head(hidden, None), want)  # sampling without top-k


def test_heads_it_cannot_screen_are_used_as_they_are() -> None:
    model = nn.Module()
    model.lm_head = nn.Linear(64, 100, bias=False)  # float32
    head = OutputHead.for_model(model)
    assert head.prepare() is True and not head.screens and head.kept_in_file() == []
    model.lm_head = nn.Linear(64, 100, bias=True).to(torch.bfloat16)  # with a bias
    head = OutputHead.for_model(model)
    assert head.prepare() is True and not head.screens


async def answers(tiny_engine: engine.qwen.engine.QwenVLEngine, messages: list[Message]) -> list[str]:
    return [await answer(tiny_engine, message) for message in messages]


async def same_answers_screened_or_not(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, computes_in: torch.dtype
) -> None:
    """The engine (its final norm, hence the head's activations, in `computes_in`) screens once
    its copy is built, keeps the bf16 head in its file and answers as an engine without the
    screen does."""
    kernels()
    messages = [Message.of("What is in this picture?", png_image()), Message.of("Say something.")]
    screened = engine.qwen.engine.QwenVLEngine(str(tiny_qwen3), dtype=dtype, threads=2)
    await screened.load()
    scheduler = screened.scheduler
    assert scheduler is not None
    for _ in range(500):
        if scheduler.prepared:
            break
        await asyncio.sleep(0.01)
    head = scheduler.head
    assert isinstance(head, OutputHead) and head.screens and head.weight.dtype == torch.bfloat16
    assert screened.model.model.language_model.norm.weight.dtype == computes_in
    assert not on_huge_pages(screened.model, head.weight)  # the bf16 head stays in its file
    got = await answers(screened, messages)
    assert head.screened_steps > 0
    await screened.close()

    with monkeypatch.context() as patch:
        patch.setattr(engine.cpu.kernels.output_head, "load_screen", lambda: None)
        full = engine.qwen.engine.QwenVLEngine(str(tiny_qwen3), dtype=dtype, threads=2)
        await full.load()
        assert full.scheduler is not None and not full.scheduler.head.screens  # type: ignore[attr-defined]
        assert got == await answers(full, messages)
        assert all(text.strip() for text in got)
        await full.close()


async def test_the_engine_answers_the_same_with_the_screened_head(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    computes_in = torch.bfloat16 if active_tier().bf16_arithmetic else torch.float32  # half_weights
    await same_answers_screened_or_not(tiny_qwen3, monkeypatch, "bfloat16", computes_in)


async def test_a_float32_engine_over_bf16_weights_screens_too(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AVX2 forced: the bf16 model computes in float32 (engine/cpu/half_weights.py) and its
    float32 decode steps are screened, with the same answers."""
    with forced(monkeypatch, "avx2", load_screen, load_bf16_kernel):
        await same_answers_screened_or_not(tiny_qwen3, monkeypatch, "auto", torch.float32)
