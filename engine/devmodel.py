"""Build random-weight Qwen-VL models that load through the engine's normal path.

Tests and benchmarks cannot download weights, so this module makes them locally: the real
architecture class, the real processor class and image processor, a byte-level BPE tokenizer
made here with every Qwen special token (small, or of the published size for the full-size
model), and a Qwen-style chat template. The model, tokenizer
and image processor are saved with ``save_pretrained`` in the published checkpoints' file layout, so
``QwenVLEngine(model=<folder>)`` loads it exactly like a downloaded model.

- ``size="tiny"`` (qwen3 or qwen2_5): hidden size 64, 2 layers, a 2-block vision tower, float32;
  weights drawn with a large spread so greedy output varies. Builds in about 2 s.
- ``size="full"`` (qwen3 only): the published shape of Qwen3-VL-2B-Instruct (2.13 B parameters,
  bf16, 4 GB on disk, ~45 s to build) with random weights, for speed and memory measurements;
  its compute is that of the real model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger("vlbot.engine")

Size = Literal["tiny", "full"]
Family = Literal["qwen3", "qwen2_5"]

# Qwen's special tokens, in the order the published tokenizers number them.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# A Qwen-style chat template (written for these test models; the published models ship their own).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tiny BPE is trained on: enough variety for a few hundred merges.
_CORPUS = """
The picture shows a small red house next to a tall green tree under a clear blue sky.
A cat is sleeping on the sofa while two dogs play in the garden behind the kitchen window.
What is in this image? There is a person holding an umbrella on a rainy street at night.
Describe the chart: the numbers rise from one to nine, then fall back to three by Friday.
The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.
Yes, no, maybe. Left, right, top, bottom, center. Black, white, yellow, orange, purple.
I can see text on the sign that says "Open 24 hours" and a bicycle parked near the door.
Please answer briefly and clearly. Thank you! How many apples are on the table? About 12.
Der Hund läuft schnell. Le chat est noir. El cielo es azul. 猫が好きです。 Привет, мир.
def main(): return 0  # code, punctuation: () [] {} <> = + - * / % & | ^ ~ ! ? . , ; : ' "
"""

_TINY_VOCAB = 1024
# the full-size model's tokenizer: the published Qwen2/Qwen3 tokenizers' 151,643 regular tokens
# (ids below their special tokens') plus the special tokens above
FULL_VOCAB = 151_643 + len(SPECIAL_TOKENS)
_LONGEST_TOKEN = 16  # characters: the published vocabulary's tokens are mostly far shorter


def build_tokenizer(vocab_size: int = _TINY_VOCAB, seed: int = 0) -> Any:
    """Train a byte-level BPE on a built-in corpus and wrap it as a Qwen2 tokenizer. A vocabulary
    larger than the corpus yields (the full-size model's: the published one's size) is filled up
    with merges of tokens drawn at random (`_grow_merges`): loading it costs what loading the
    published tokenizer costs (its tokenizer.json is of the same size), which the tiny
    vocabulary's would not."""
    return _made_tokenizer(vocab_size, seed)[0]


def _made_tokenizer(vocab_size: int, seed: int) -> tuple[Any, int]:
    """`build_tokenizer`'s tokenizer and how many of its tokens were trained (ids below that;
    the grown merges' ids are above)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
    )
    raw.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    spec = json.loads(raw.to_str())["model"]
    vocab: dict[str, int] = spec["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    trained = len(vocab)
    _grow_merges(vocab, merges, vocab_size, seed)
    tokenizer_class: Any = Qwen2Tokenizer  # its stubs type merges as strings; tuples are right
    tokenizer = tokenizer_class(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS),
        model_max_length=262144,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, trained


def _grow_merges(vocab: dict[str, int], merges: list[tuple[str, ...]], size: int, seed: int) -> None:
    """Add merges of two tokens already in `vocab` (the first short, as most of a real BPE's are)
    until it holds `size` tokens, each merge a new token: a valid byte-level BPE, ranked after
    the trained merges."""
    import random

    rng = random.Random(seed)
    tokens = list(vocab)
    short = [t for t in tokens if len(t) <= 5 and t not in SPECIAL_TOKENS]
    while len(vocab) < size:
        first = rng.choice(short)
        second = rng.choice(short if rng.random() < 0.7 else tokens)
        token = first + second
        if token in vocab or len(token) > _LONGEST_TOKEN or second in SPECIAL_TOKENS:
            continue
        vocab[token] = len(vocab)
        merges.append((first, second))
        tokens.append(token)
        if len(token) <= 5:
            short.append(token)


def _token_ids(tokenizer: Any) -> dict[str, int]:
    return {tok: int(tokenizer.convert_tokens_to_ids(tok)) for tok in SPECIAL_TOKENS}


def _tiny_config(family: Family, vocab_size: int, ids: dict[str, int]) -> Any:
    common_text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    token_ids: dict[str, Any] = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if family == "qwen3":
        from transformers import Qwen3VLConfig

        text = dict(common_text, head_dim=16)
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        }
        return Qwen3VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids
        )
    from transformers import Qwen2_5_VLConfig

    text = dict(common_text)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": [2, 3, 3],
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "out_hidden_size": 64,
    }
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids
    )


def _save_processor_files(out: Path, family: Family, tokenizer: Any) -> None:
    """Write the processor files in the layout the published checkpoints use.

    The real ``Qwen3VLProcessor`` / ``Qwen2_5_VLProcessor`` is what reads them back. The processor
    object itself cannot be built here to call its ``save_pretrained``: its video processor needs
    torchvision, which vlbot does not install. So the tokenizer and the image processor are saved
    with their own ``save_pretrained`` and the remaining small JSON files are written as published.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer.save_pretrained(out)
    _publish_added_tokens(out, tokenizer)
    if family == "qwen3":
        processor_class = "Qwen3VLProcessor"
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=16,
            temporal_patch_size=2,
            merge_size=2,
            size={"shortest_edge": 65536, "longest_edge": 16777216},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        video = {
            "video_processor_type": "Qwen3VLVideoProcessor",
            "processor_class": processor_class,
            "size": {"shortest_edge": 4096, "longest_edge": 25165824},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
        _write_json(out / "video_preprocessor_config.json", video)
    else:
        processor_class = "Qwen2_5_VLProcessor"
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
            size={"shortest_edge": 3136, "longest_edge": 12845056},
        )
    image_processor.save_pretrained(out)
    preprocessor = json.loads((out / "preprocessor_config.json").read_text(encoding="utf-8"))
    preprocessor["processor_class"] = processor_class
    _write_json(out / "preprocessor_config.json", preprocessor)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def _publish_added_tokens(out: Path, tokenizer: Any) -> None:
    """tokenizer_config.json as published: with its special tokens listed ("added_tokens_decoder",
    written by the transformers that saved the published files, not by transformers 5), which
    spares a loader reading them out of the whole tokenizer.json."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(index): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for index, token in sorted(tokenizer.added_tokens_decoder.items())
    }
    _write_json(path, config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw the weights so greedy decoding of a tiny random model does not collapse.

    With the usual small init the residual stream carries mostly the current token's embedding,
    so the next token is a fixed function of the current one and greedy output soon repeats one
    token. Matrices drawn with std 0.2, small token embeddings (0.02), separate input and output
    embeddings and sharper attention (query/key norm gain 2) make each step depend on the context.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                std = 0.02 if "embed_tokens" in name else 0.2
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
                param.copy_(noise.to(param.dtype))
            elif "q_norm" in name or "k_norm" in name:
                param.fill_(2.0)


def make_model(
    out_dir: str | Path,
    size: Size = "tiny",
    family: Family = "qwen3",
    seed: int = 0,
) -> Path:
    """Build a random-weight model + processor and save both into ``out_dir``; return the folder."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    auto_model: Any = AutoModelForImageTextToText
    generation_config: Any = GenerationConfig

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    if family not in ("qwen3", "qwen2_5"):
        raise ValueError(f"family must be 'qwen3' or 'qwen2_5', not {family!r}")
    if size == "full" and family != "qwen3":
        raise ValueError("size='full' exists only for family='qwen3' (Qwen3-VL-2B-Instruct)")
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer, trained = _made_tokenizer(FULL_VOCAB if size == "full" else _TINY_VOCAB, seed)
    ids = _token_ids(tokenizer)
    if size == "tiny":
        vocab = len(tokenizer)
        config = _tiny_config(family, vocab, ids)
        dtype = torch.float32
    else:
        config = _full_config(ids)
        dtype = torch.bfloat16
    model = auto_model.from_config(config, dtype=dtype)
    if size == "tiny":
        _spread_weights(model, seed=seed)
    else:
        _silence_unused_rows(model, trained)
    model.generation_config = generation_config(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out)
    _save_processor_files(out, family, tokenizer)
    logger.info(
        "made %s %s model in %s (%.1f s)", size, family, out, time.monotonic() - started
    )
    return out


# The published shape of Qwen/Qwen3-VL-2B-Instruct (from /work/shared/reference/
# qwen3-vl-2b-instruct.json): 2,127,532,032 parameters, 4.26 GB in bf16.
QWEN3_VL_2B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-06,
    "attention_bias": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
QWEN3_VL_2B_VISION: dict[str, Any] = {
    "depth": 24,
    "hidden_size": 1024,
    "hidden_act": "gelu_pytorch_tanh",
    "intermediate_size": 4096,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 2048,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}


def _full_config(ids: dict[str, int]) -> Any:
    """The published Qwen3-VL-2B-Instruct shape, with token ids of the locally made tokenizer."""
    from transformers import Qwen3VLConfig

    text = dict(
        QWEN3_VL_2B_TEXT,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=dict(QWEN3_VL_2B_VISION),
        tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _silence_unused_rows(model: Any, used: int) -> None:
    """Zero the (tied) embedding rows from the first grown merge on (`_made_tokenizer`), so the
    full-size model generates only trained tokens: its answers decode to text that encodes back
    to about as many tokens, as a real model's do (answers of the grown merges' random byte
    strings do not: 16 tokens came back as 180, and a follow-up's prompt with them). Compute
    stays that of the 151,936-row matrix."""
    with torch.no_grad():
        model.get_input_embeddings().weight[used:].zero_()


def main(argv: Sequence[str] | None = None) -> int:
    """``vlbot dev make-model [--size tiny|full] [--family qwen3|qwen2_5] [--seed N] OUT``."""
    parser = argparse.ArgumentParser(
        prog="vlbot dev make-model",
        description="Build a random-weight Qwen-VL model (for tests and benchmarks) into OUT.",
    )
    parser.add_argument("out", metavar="OUT", help="folder to write the model into")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--family", choices=["qwen3", "qwen2_5"], default="qwen3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.size == "full" and args.family != "qwen3":
        parser.error("--size full is only available for --family qwen3")
    started = time.monotonic()
    out = make_model(args.out, size=args.size, family=args.family, seed=args.seed)
    print(f"{args.size} {args.family} model written to {out} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
