"""The engine's speed paths give the same numbers as the code they replace.

- engine.qwen.kvbuffer: KV-cache layers that append in place (no whole-cache copy per token) hold
  exactly what transformers' concatenating DynamicLayer holds, also across reallocations and after
  outside code replaced their tensors (batch join / crop / split), and may keep them in bfloat16
  for a float32 model (half the bytes);
- engine.cpu.patch_embed: the vision patch embedding as a matrix product equals the Conv3d.
"""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig
from transformers.cache_utils import DynamicLayer

from bot.models import GenerationParams, Message
from engine.cpu.patch_embed import PatchLinear, linearize_patch_embedding
from engine.qwen.engine import QwenVLEngine
from engine.qwen.kvbuffer import MIN_SPARE_TOKENS, SPARE_TOKENS, AppendingLayer, appending_cache
from engine.qwen.kvcache import cache_nbytes
from engine.qwen.prompt import build_prompt
from tests.test_engine_qwen import png_image


def kv(tokens: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, tokens, 8), torch.randn(batch, 2, tokens, 8)


def test_appending_layer_holds_what_dynamic_layer_holds() -> None:
    torch.manual_seed(0)
    fast, slow = AppendingLayer(spare=16), DynamicLayer()
    capacities: list[int] = []
    for tokens in [7] + [1] * 60 + [5]:
        k, v = kv(tokens)
        got, want = fast.update(k, v), slow.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert fast.get_seq_length() == slow.get_seq_length()
        if fast.capacity not in capacities:
            capacities.append(fast.capacity)
    assert fast.get_seq_length() == 72
    # reallocated with room for an eighth more (at least 8, at most 16), not once per token
    assert capacities == [15, 24, 33, 42, 51, 60, 69, 72 + 9]


def test_appending_layer_adopts_tensors_replaced_from_outside() -> None:
    torch.manual_seed(1)
    layer = AppendingLayer(spare=8)
    k, v = kv(10, batch=2)
    layer.update(k, v)
    # what engine.qwen.batching does: crop, then keep one row of the batch
    layer.keys, layer.values = layer.keys[1:, :, :6].clone(), layer.values[1:, :, :6].clone()
    k2, v2 = kv(1)
    keys, values = layer.update(k2, v2)
    assert keys.shape == (1, 2, 7, 8)
    assert torch.equal(keys, torch.cat([k[1:, :, :6], k2], dim=2))
    assert torch.equal(values, torch.cat([v[1:, :, :6], v2], dim=2))
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.capacity == 0


def test_appending_layer_can_keep_float32_keys_in_bf16() -> None:
    """A float32 model over bf16 weights keeps its cache in bf16: transformers' update still hands
    out float32 (the bf16-rounded values), `append` the stored bf16 views, across reallocations
    and tensors replaced from outside; the cache counts 2 bytes a value."""
    torch.manual_seed(3)
    layer, plain = AppendingLayer(spare=8, storage=torch.bfloat16), AppendingLayer(spare=8)
    added: list[tuple[torch.Tensor, torch.Tensor]] = []
    for tokens in [9] + [1] * 20:
        k, v = kv(tokens)
        added.append((k, v))
        keys, values = layer.update(k, v)
        plain.update(k, v)
        assert keys.dtype == values.dtype == torch.float32
        assert torch.equal(keys, torch.cat([a for a, _ in added], dim=2).bfloat16().float())
        assert torch.equal(values, torch.cat([b for _, b in added], dim=2).bfloat16().float())
    assert layer.keys is not None and layer.keys.dtype == torch.bfloat16
    assert layer.keys.untyped_storage().nbytes() * 2 == plain.keys.untyped_storage().nbytes()  # type: ignore[union-attr]
    stored_keys, stored_values = layer.append(*kv(1))
    assert stored_keys.dtype == stored_values.dtype == torch.bfloat16
    assert stored_keys.data_ptr() == layer.keys.data_ptr()  # the buffer itself, no copy
    layer.keys, layer.values = layer.keys[:, :, :5].clone(), layer.values[:, :, :5].clone()
    keys, _ = layer.update(*kv(1))  # adopted into a fresh bf16 buffer
    assert keys.shape[2] == 6 and layer.keys.dtype == torch.bfloat16
    assert torch.equal(keys[:, :, :5], torch.cat([a for a, _ in added], dim=2)[:, :, :5].bfloat16().float())


def test_appending_layer_holds_no_buffer_but_its_views() -> None:
    """Replacing a layer's tensors (batch join / split) frees the old buffer at once: the layer
    keeps no tensor of its own besides `keys` and `values`."""
    layer = AppendingLayer(spare=8)
    layer.update(*kv(10))
    assert layer.capacity == 18
    held = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert len(held) == 2 and held[0] is layer.keys and held[1] is layer.values
    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    assert layer.capacity == 0  # no longer its own views: adopted into a new buffer next update


def test_cache_size_counts_the_spare_room() -> None:
    config = AutoConfig.for_model(
        "qwen3", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, intermediate_size=64, head_dim=8, vocab_size=100,
    )
    cache = appending_cache(config)
    assert all(isinstance(layer, AppendingLayer) for layer in cache.layers)
    for index in range(3):
        cache.update(*kv(10), layer_idx=index)
    per_token = 2 * 2 * 8 * 4  # K and V x 2 heads x 8 dims x float32
    assert cache.get_seq_length() == 10
    assert cache_nbytes(cache) == 3 * (10 + MIN_SPARE_TOKENS) * per_token
    cache.update(*kv(600), layer_idx=0)  # a long prompt: room for 64 more (the cap), not 610 / 8
    assert cache.layers[0].capacity == 610 + SPARE_TOKENS


def test_patch_linear_equals_the_convolution() -> None:
    torch.manual_seed(2)
    conv = nn.Conv3d(3, 16, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=True)
    patches = torch.randn(37, 3, 2, 4, 4)
    fast = PatchLinear(conv)
    assert fast.weight is conv.weight  # shared, not copied
    torch.testing.assert_close(fast(patches), conv(patches), rtol=1e-5, atol=1e-5)
    bigger = torch.randn(2, 3, 4, 8, 8)  # not one patch per row: the convolution itself
    torch.testing.assert_close(fast(bigger), conv(bigger), rtol=1e-5, atol=1e-5)


async def test_loaded_engine_encodes_images_as_the_convolution_does(tiny_qwen3: Path) -> None:
    engine = QwenVLEngine(str(tiny_qwen3), dtype="float32", threads=2)
    await engine.load()
    embed = engine.model.model.visual.patch_embed
    assert isinstance(embed.proj, PatchLinear)
    assert engine._loaded is not None
    prompt = build_prompt((), Message.of("What is this?", png_image()), limits=engine.limits)
    inputs = engine._encode(engine._loaded, prompt)
    with torch.inference_mode():
        fast = engine.model.model.visual.patch_embed(inputs["pixel_values"])
        conv = nn.Conv3d(  # rebuilt around the same weights
            embed.proj.weight.shape[1], embed.proj.out_channels,
            kernel_size=embed.proj.kernel_size, stride=embed.proj.stride,
        )
        conv.weight, conv.bias = embed.proj.weight, embed.proj.bias
        embed.proj = conv
        slow = embed(inputs["pixel_values"])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert not linearize_patch_embedding(object())
    await engine.close()


async def test_a_kept_conversation_cache_is_counted_with_its_spare_room(tiny_qwen3: Path) -> None:
    engine = QwenVLEngine(str(tiny_qwen3), dtype="float32", threads=2)
    await engine.load()
    params = GenerationParams(max_new_tokens=20, temperature=0.0, session="chat-1")
    async with aclosing(engine.stream((), Message.of("What is this?", png_image()), params)) as s:
        async for _ in s:
            pass
    text = engine.model.config.get_text_config()
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * 4
    entry = engine.caches.take("chat-1")
    assert entry is not None and len(entry.keys) > 20
    assert entry.cache.get_seq_length() == len(entry.keys)
    room = entry.cache.layers[0].capacity - len(entry.keys)
    assert 0 <= room <= max(MIN_SPARE_TOKENS, len(entry.keys) // 8)  # little unused room kept
    assert entry.nbytes == cache_nbytes(entry.cache) == (len(entry.keys) + room) * per_token
    await engine.close()
