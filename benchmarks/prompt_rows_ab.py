"""A/B of a short prompt's prefill over half-size weights (engine.cpu.half_weights): through the
bf16 kernel, MAX_ROWS rows per pass over the weights, against weights widened for torch's float32
product (engine.cpu.kernels.bf16_kernel.FLOAT_PROMPT_MAX_ROWS sets where one gives way to the
other).

The benchmark's full-size model is loaded as the engine loads it (swaps, huge pages), a context
of `--context` text tokens is prefilled once, then for each row count the language model's
forward over that many new tokens (a follow-up question) runs with each path in turn, the cache
cropped back after each, so a machine loaded by other work slows both alike. Printed: the best
time of each per row count. Meaningful on a tier without bf16 arithmetic (elsewhere both
variants are oneDNN's bf16 product):

    VLBOT_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        .venv/bin/python -m benchmarks.prompt_rows_ab --rows 12,16,24,32,40 --rounds 7

A manual tool: never part of the test suite.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.run import ensure_model
from engine.cpu.kernels import bf16_kernel
from engine.cpu.swap import decode_parts, swap_modules
from engine.cpu.tiers import active_tier
from engine.qwen.batching import crop_cache
from engine.qwen.kvbuffer import appending_cache

# FLOAT_PROMPT_MAX_ROWS per variant: every prompt row count through the kernel, or none
VARIANTS = {"kernel": 1 << 30, "widened": 0}


def text_positions(start: int, stop: int) -> torch.Tensor:
    """M-RoPE positions of text tokens (equal on the three axes): (3, 1, stop - start)."""
    return torch.arange(start, stop).view(1, 1, -1).expand(3, 1, -1)


def forward(model: Any, ids: torch.Tensor, start: int, stop: int, cache: Any) -> torch.Tensor:
    out = model.model(
        input_ids=ids[:, start:stop],
        attention_mask=torch.ones(1, stop, dtype=torch.long),
        position_ids=text_positions(start, stop),
        cache=cache,
        use_cache=True,
    )
    hidden: torch.Tensor = out.last_hidden_state[:, -1]
    return hidden


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="full-size model folder (default: the cache)")
    parser.add_argument("--context", type=int, default=350, help="cached tokens before the prompt")
    parser.add_argument("--rows", default="12,16,24,32,40", help="prompt lengths, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(args.threads)
    folder = ensure_model(args.model)
    loader: Any = AutoModelForImageTextToText
    model = loader.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    swap_modules(model, "none")
    parts = decode_parts(model)
    parts.prepare(lambda: False)  # the head's 8-bit copy and huge pages, as the engine has them
    rows = [int(r) for r in args.rows.split(",")]
    print(f"tier {active_tier().name}, {args.threads} threads, context {args.context}", flush=True)
    ids = torch.randint(100, 5000, (1, args.context + max(rows)))
    kept = bf16_kernel.FLOAT_PROMPT_MAX_ROWS
    with torch.inference_mode():
        cache = appending_cache(model.config)
        forward(model, ids, 0, args.context, cache)
        for count in rows:
            best = dict.fromkeys(VARIANTS, float("inf"))
            for _ in range(args.rounds):
                for name, limit in VARIANTS.items():
                    bf16_kernel.FLOAT_PROMPT_MAX_ROWS = limit
                    started = time.perf_counter()
                    parts.head(forward(model, ids, args.context, args.context + count, cache), 1)
                    best[name] = min(best[name], time.perf_counter() - started)
                    crop_cache(cache, args.context)
            bf16_kernel.FLOAT_PROMPT_MAX_ROWS = kept
            shown = "  ".join(f"{name} {seconds:.3f} s" for name, seconds in best.items())
            print(f"{count:4d} rows: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
