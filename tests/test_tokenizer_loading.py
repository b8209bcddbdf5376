"""The tokenizer a model folder loads with (engine.qwen.loading.load_tokenizer: its tokenizer.json
read by the tokenizers library), against the class its tokenizer_config.json names
(Qwen2Tokenizer, which rebuilds it from the vocabulary and merges); and the tokenizer the
random-weight models are made with (engine.devmodel), of the published size for the full-size
model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from engine.devmodel import SPECIAL_TOKENS, build_tokenizer
from engine.qwen.loading import load_processor, load_tokenizer

TEXTS = [
    "Describe this image in one sentence.",
    "Der Hund läuft schnell. 猫が好きです。 Привет, мир.  \n\n  spaces\tand tabs 12345 3.14159",
    "def main(): return 0  # code () [] {} <> = + - * / % & | ^ ~ ! ? . , ; : ' \" don't",
    "😀🎉 emoji ÅÄÖ café naïve " * 3,
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What?<|im_end|>\n",
]


@pytest.fixture(params=["tiny_qwen3", "tiny_qwen25"])
def model_folder(request: pytest.FixtureRequest) -> Path:
    folder: Path = request.getfixturevalue(request.param)
    return folder


def test_the_tokenizer_gives_the_ids_and_text_its_named_class_gives(model_folder: Path) -> None:
    """Prompts, special tokens, chat template and decoding: what the model was made with."""
    named = AutoTokenizer.from_pretrained(str(model_folder))
    assert type(named).__name__ == "Qwen2Tokenizer"  # what tokenizer_config.json names
    processor = load_processor(str(model_folder), AutoConfig.from_pretrained(str(model_folder)))
    loaded = processor.tokenizer
    assert type(loaded).__name__ == "TokenizersBackend"  # read from tokenizer.json
    for text in TEXTS:
        ids = loaded(text)["input_ids"]
        assert ids == named(text)["input_ids"]
        assert loaded.decode(ids) == named.decode(ids) == text
        assert loaded.decode(ids, skip_special_tokens=True) == named.decode(ids, skip_special_tokens=True)
    for token in SPECIAL_TOKENS:
        assert loaded.convert_tokens_to_ids(token) == named.convert_tokens_to_ids(token)
    assert (loaded.eos_token, loaded.pad_token) == (named.eos_token, named.pad_token)
    assert len(loaded) == len(named)
    assert loaded.padding_side == "left"  # set by load_processor for batched prompts
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        named.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def test_a_folder_without_tokenizer_json_loads_its_named_class(tiny_qwen3: Path, tmp_path: Path) -> None:
    """A model shipping only vocab.json/merges.txt still loads, through its processor's own
    tokenizer class."""
    folder = tmp_path / "no-tokenizer-json"
    shutil.copytree(tiny_qwen3, folder)
    named = AutoTokenizer.from_pretrained(str(folder))
    bpe = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer.json").unlink()
    assert load_tokenizer(str(folder)) is None
    processor = load_processor(str(folder), AutoConfig.from_pretrained(str(folder)))
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert processor.tokenizer(TEXTS[1])["input_ids"] == named(TEXTS[1])["input_ids"]


def test_a_larger_vocabulary_than_the_corpus_gives_is_a_working_bpe() -> None:
    """The full-size model's tokenizer has the published tokenizer's size; its merges beyond the
    trained ones join tokens it has, so any text still encodes and decodes back."""
    tokenizer = build_tokenizer(6000, seed=3)
    assert len(tokenizer) == 6000
    merged = [t for t in tokenizer.get_vocab() if len(t) > 1 and t not in SPECIAL_TOKENS]
    assert len(merged) > 6000 - 256 - len(SPECIAL_TOKENS) - 10
    for text in TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert build_tokenizer(6000, seed=3).get_vocab() == tokenizer.get_vocab()  # reproducible


def test_the_made_tokenizer_config_lists_its_special_tokens_as_published(tiny_qwen3: Path) -> None:
    """tokenizer_config.json names each special token with its id, as the published files do."""
    config = json.loads((tiny_qwen3 / "tokenizer_config.json").read_text(encoding="utf-8"))
    listed = {entry["content"]: int(index) for index, entry in config["added_tokens_decoder"].items()}
    named = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    assert listed == {token: named.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert all(entry["special"] for entry in config["added_tokens_decoder"].values())
