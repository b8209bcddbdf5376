"""The baseline: raw transformers ``generate`` on the benchmark images, in its own process.

``python -m benchmarks.raw_part SPEC.json OUT.json`` (started by ``benchmarks.run``). The model is
loaded with ``AutoModelForImageTextToText.from_pretrained`` and the processor the way vlbot loads
it (``engine.qwen.loading.load_processor``: AutoProcessor itself needs torchvision for Qwen3-VL's video
processor). Each image runs at the processor's default size bounds and, where that gives a
different number of visual tokens, at vlbot's pixel budget (the "same input" for the end-to-end
comparison). Time to first token runs from opening the JPEG to the streamer's first token; decode
tokens/s from the first token to the last; new tokens are forced with min_new_tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from benchmarks.helpers import decode_rate, proc_status_bytes
from engine.qwen.loading import (
    cpu_supports_bf16,
    image_tokens,
    load_processor,
    physical_cores,
    processor_size,
    resolve_dtype,
)


class Clock(BaseStreamer):
    """A generate() streamer that timestamps every new token (the first put is the prompt)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.times: list[float] = []
        self.tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.monotonic())
        self.tokens += int(value.numel())

    def end(self) -> None:
        pass


def lm_read_bytes(model: Any) -> tuple[int, int]:
    """(bytes the language model reads per decode step, all weight bytes)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    lm = 0
    for name, p in model.named_parameters():
        if "visual" in name or "embed_tokens" in name:
            continue
        lm += p.numel() * p.element_size()
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        lm += head.weight.numel() * head.weight.element_size()  # tied: read once per step as lm_head
    return lm, total


def messages(question: str, with_image: bool) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def generate(
    model: Any,
    processor: Any,
    question: str,
    image_path: str | None,
    size: dict[str, int] | None,
    new_tokens: int,
) -> dict[str, Any]:
    clock = Clock()
    started = time.monotonic()
    kwargs: dict[str, Any] = {}
    if image_path is not None:
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
        kwargs = {"images": [image]}
        if size is not None:
            kwargs["size"] = size
    inputs = processor.apply_chat_template(
        messages(question, image_path is not None),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=kwargs,
    )
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            streamer=clock,
        )
    finished = time.monotonic()
    ids = inputs["input_ids"]
    first = clock.times[0] if clock.times else finished
    image_token_id = int(getattr(processor, "image_token_id", None) or model.config.image_token_id)
    return {
        "prompt_tokens": int(ids.shape[1]),
        "visual_tokens": int((ids == image_token_id).sum()),
        "tokens": clock.tokens,
        "ttft_s": first - started,
        "decode_tok_s": decode_rate(clock.tokens, clock.times[-1] - first) if clock.times else None,
        "total_s": finished - started,
    }


def main(spec_path: str, out_path: str) -> int:
    from transformers import AutoConfig, AutoModelForImageTextToText

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out = Path(out_path)
    result: dict[str, Any] = {"runs": []}

    def save() -> None:
        result["peak_rss_bytes"] = proc_status_bytes("VmHWM")
        out.write_text(json.dumps(result, indent=2), encoding="utf-8")

    threads = int(spec.get("threads") or physical_cores())
    torch.set_num_threads(threads)
    # raw transformers as a user runs it: bf16 where the CPU computes it natively, else float32
    # (vlbot's own "auto" keeps bf16 weights there too, engine.cpu.half_weights)
    wanted = spec.get("dtype", "auto")
    dtype = resolve_dtype(wanted) if wanted != "auto" or cpu_supports_bf16() else torch.float32
    started = time.monotonic()
    config = AutoConfig.from_pretrained(spec["model"])
    processor = load_processor(spec["model"], config)
    auto_model: Any = AutoModelForImageTextToText
    model = auto_model.from_pretrained(spec["model"], config=config, dtype=dtype)
    model.eval()
    result["load_s"] = time.monotonic() - started
    result["lm_bytes_per_token"], result["weights_bytes"] = lm_read_bytes(model)
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["threads"] = threads
    save()
    generate(model, processor, "Hello", None, None, 2)  # warm-up (allocator, kernels)

    defaults = dict(processor.image_processor.size)
    budget = processor_size(processor, int(spec["budget_pixels"]))
    new_tokens = int(spec["new_tokens"])
    for label, path in spec["images"].items():
        with Image.open(path) as image:
            width, height = image.size
        default_tokens = image_tokens(processor, height, width, defaults)
        budget_tokens = image_tokens(processor, height, width, budget)
        variants: list[tuple[str, dict[str, int] | None]] = []
        if default_tokens == budget_tokens:
            variants.append(("defaults=budget", None))
        else:
            variants += [("defaults", None), ("budget", budget)]
        for variant, size in variants:
            entry: dict[str, Any] = {"image": label, "variant": variant}
            if variant == "defaults" and label in spec.get("skip_defaults", []):
                entry.update(skipped=True, visual_tokens=default_tokens)
                result["runs"].append(entry)
                print(f"raw {label} {variant}: skipped ({default_tokens} visual tokens)", flush=True)
                continue
            try:
                entry.update(generate(model, processor, spec["question"], path, size, new_tokens))
            except Exception as e:  # record and go on with the next image
                entry["error"] = f"{type(e).__name__}: {e}"
            result["runs"].append(entry)
            save()
            print(f"raw {label} {variant}: {json.dumps(entry)}", flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
