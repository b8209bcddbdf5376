"""A prompt's last decoder layer computes its projection and MLP for the last position only
(engine.qwen.last_position), and the first token's logits stay those of the whole forward."""

from __future__ import annotations

from pathlib import Path

import torch

from bot.models import GenerationParams, Message
from engine.qwen.engine import QwenVLEngine
from engine.qwen.last_position import LastPositionPrefill
from engine.qwen.prompt import build_prompt
from tests.test_engine_qwen import answer, png_image


async def test_the_last_layer_reads_one_row_and_the_last_logits_are_unchanged(tiny_qwen3: Path) -> None:
    engine = QwenVLEngine(str(tiny_qwen3), dtype="float32", threads=2)
    await engine.load()
    assert engine._loaded is not None
    model = engine.model
    message = Message.of("What is in this picture?", png_image())
    # a first answer: the compute thread's warm-up forward after loading is over (or gave way)
    await answer(engine, message, params=GenerationParams(max_new_tokens=2, temperature=0.0))
    inputs = engine._encode(engine._loaded, build_prompt((), message, limits=engine.limits, max_images=8))
    positions = int(inputs["input_ids"].shape[1])
    last_layer = model.model.language_model.layers[-1]
    seen: list[int] = []
    last_layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-2]))
    with torch.inference_mode():
        whole = model(**inputs).logits[0, -1]
        assert seen == [positions]
        seen.clear()
        hooks = LastPositionPrefill(model)
        assert hooks.hooked
        with hooks.active():
            hidden = model.model(**inputs).last_hidden_state
        assert seen == [1] and hidden.shape[1] == positions
        last = model.lm_head(hidden[0, -1])
        seen.clear()
        again = model(**inputs).logits[0, -1]  # inactive: every position again
    assert seen == [positions]
    torch.testing.assert_close(last, whole, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, whole)
    assert int(last.argmax()) == int(whole.argmax())
    await engine.close()


def test_a_model_without_decoder_layers_is_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    hooks = LastPositionPrefill(model)
    assert not hooks.hooked
    with hooks.active():
        assert model(torch.ones(3, 4)).shape == (3, 4)
