"""Pure helpers of the benchmark: bandwidth and decode-limit math, rates, Markdown formatting.

Nothing here loads a model or touches the clock, so the test suite checks it quickly
(tests/test_benchmark_helpers.py); the floors and the report are in ``benchmarks.report``.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

GB = 1e9
GIB = 1024**3
# Parameters the language model reads per generated token (28 layers 1.41 G + the tied lm_head
# 0.31 G; the embedding lookup reads one row): Qwen3-VL-2B.
QWEN3_VL_2B_LM_PARAMS = 1.72e9
BF16_BYTES = 2.0

# Image labels in benchmark order, with their sizes.
IMAGES: dict[str, tuple[int, int]] = {
    "640x480": (640, 480),
    "1280x960": (1280, 960),
    "1920x1080": (1920, 1080),
    "4032x3024": (4032, 3024),
}


# --- math --------------------------------------------------------------------------------------


def bandwidth_bytes_per_s(nbytes: int, seconds: Sequence[float]) -> float:
    """Bytes per second of the best (fastest) of several timed passes over `nbytes`."""
    valid = [s for s in seconds if s > 0]
    if not valid:
        raise ValueError("no positive timing")
    return nbytes / min(valid)


def lm_bytes_per_token(
    lm_params: float = QWEN3_VL_2B_LM_PARAMS, bytes_per_param: float = BF16_BYTES
) -> float:
    return lm_params * bytes_per_param


def decode_limit_tok_s(
    bandwidth: float, lm_params: float = QWEN3_VL_2B_LM_PARAMS, bytes_per_param: float = BF16_BYTES
) -> float:
    """Tokens/s if every decode step only had to stream the language model's weights once."""
    return bandwidth / lm_bytes_per_token(lm_params, bytes_per_param)


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of `tensors` (torch tensors), each storage counted once (tied weights are one); an
    opaque oneDNN tensor (engine.cpu.onednn_linear's reordered weights: no storage to point at)
    counts its elements."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        key = id(tensor) if tensor.is_mkldnn else tensor.data_ptr()
        if tensor.numel() == 0 or key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def decode_bytes_per_token(model: Any, head_bytes: int | None = None) -> int:
    """Bytes a decode step reads from the weights as they are held: every tensor of the language
    model's layers (bf16, fp32, int8 or packed int4 with their scales) plus the output head's
    (`head_bytes` where the engine reads it through a smaller copy); the embedding lookup reads
    one row and is left out."""
    layers = model.model.language_model.layers
    held = tensor_bytes([*layers.parameters(), *layers.buffers()])
    if head_bytes is None:
        head = model.lm_head
        head_bytes = tensor_bytes([*head.parameters(), *head.buffers()])
    return held + head_bytes


READ_MIN_BYTES = 1 << 20


def layer_read_rate(model: Any, passes: int = 7) -> dict[str, float]:
    """How fast this process reads the language model's layers right now: the median of
    `passes` plain float32 sums over their memory as held (every tensor of at least 1 MiB whose
    bytes make whole floats, viewed as floats), in bytes/s, with the bytes read per pass. Taken
    right after a decode, it is the bandwidth that decode had to share its machine with, measured
    the same way: on a shared VM the 2 GiB probe before and after the runs can be minutes away
    from the decode and its figure has swung 25-75 GB/s within one session."""
    import torch

    layers = model.model.language_model.layers
    seen: set[int] = set()
    floats = []
    for tensor in [*layers.parameters(), *layers.buffers()]:
        nbytes = tensor.numel() * tensor.element_size()
        small = nbytes < READ_MIN_BYTES  # a call per tiny tensor would time torch, not memory
        if small or nbytes % 4 or not tensor.is_contiguous() or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        floats.append(tensor.detach().view(-1).view(torch.uint8).view(torch.float32))
    nbytes = sum(t.numel() * 4 for t in floats)
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        for values in floats:
            values.sum()
        times.append(time.perf_counter() - started)
    return {"bytes": float(nbytes), "bytes_per_s": nbytes / statistics.median(times)}


def layer_read_rate_apart(model: Any, passes: int = 7) -> dict[str, float]:
    """`layer_read_rate` on a thread of its own that ends with it. torch's OpenMP workers belong to
    the thread that ran a parallel operator and live as long as it does: run on the benchmark's
    main thread, the sums left a second team of workers beside the engine's compute thread's for
    the rest of the process, and on 2 cores every decode step after them was ~30-45 % slower
    (forced AVX2, 64 tokens: bf16 14.1 -> 9.9 tok/s, int4 32.6 -> 18.2)."""
    found: dict[str, float] = {}
    reader = threading.Thread(target=lambda: found.update(layer_read_rate(model, passes)), name="read-rate")
    reader.start()
    reader.join()
    return found


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs as keywords (a value is JSON where it parses, else the string)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def quant_variants(pairs: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """`--quant-option` pairs as separate runs, (label, keywords) each: every `quantize=` pair
    starts a run of its own; other pairs join the run they follow (or every run when they come
    before the first `quantize=`)."""
    shared: list[str] = []
    runs: list[list[str]] = []
    for pair in pairs:
        if pair.partition("=")[0].strip() == "quantize":
            runs.append([pair])
        elif runs:
            runs[-1].append(pair)
        else:
            shared.append(pair)
    if not runs:
        runs = [[]] if shared else []
    return [(", ".join([*shared, *run]), parse_options([*shared, *run])) for run in runs]


def decode_rate(tokens: int, decode_seconds: float) -> float | None:
    """Decode tokens/s: the first token belongs to the prefill, so `tokens - 1` over the time
    from the first token to the last."""
    if tokens < 2 or decode_seconds <= 0:
        return None
    return (tokens - 1) / decode_seconds


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def steady_aggregate_rate(chats: Sequence[Mapping[str, Any]]) -> float | None:
    """Aggregate decode tokens/s while every chat is decoding.

    Each chat gives ``piece_times`` (monotonic times of its streamed text pieces) and ``tokens``
    (tokens generated). The window runs from the last chat's first piece to the first chat's last
    piece; a chat's tokens in the window are its pieces there times its tokens per piece.
    """
    traced = [c for c in chats if len(c.get("piece_times") or []) >= 2 and c.get("tokens")]
    if len(traced) != len(chats) or not chats:
        return None
    start = float(max(c["piece_times"][0] for c in traced))
    end = float(min(c["piece_times"][-1] for c in traced))
    if end <= start:
        return None
    tokens = 0.0
    for chat in traced:
        times: list[float] = chat["piece_times"]
        per_piece = chat["tokens"] / len(times)
        tokens += per_piece * sum(1 for t in times if start < t <= end)
    return tokens / (end - start)


def overall_aggregate_rate(chats: Sequence[Mapping[str, Any]]) -> float | None:
    """All chats' tokens over the time from the earliest first piece to the latest last piece
    (prefills of the later chats included)."""
    traced = [c for c in chats if c.get("piece_times") and c.get("tokens")]
    if not traced:
        return None
    start = float(min(c["piece_times"][0] for c in traced))
    end = float(max(c["piece_times"][-1] for c in traced))
    if end <= start:
        return None
    return sum(float(c["tokens"]) for c in traced) / (end - start)


def interleaved(chats: Sequence[Mapping[str, Any]]) -> bool | None:
    """True when every chat's first token came before any other chat's answer was complete."""
    if len(chats) < 2 or any(c.get("first_token_s") is None or c.get("final_s") is None for c in chats):
        return None
    for i, chat in enumerate(chats):
        others = [c["final_s"] for j, c in enumerate(chats) if j != i]
        if chat["first_token_s"] >= min(others):
            return False
    return True


def proc_status_bytes(field: str, status_text: str | None = None) -> int | None:
    """A kB field of /proc/self/status in bytes: VmRSS (now) or VmHWM (this process's peak).

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child
    would report its parent's peak (here: the 2 GiB bandwidth buffer) when that is higher.
    """
    if status_text is None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                status_text = f.read()
        except OSError:
            return None
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) * 1024
    return None


def growth_pct(samples: Sequence[float]) -> float | None:
    """Percent change from the first to the last sample (RSS flatness over a run of requests)."""
    if len(samples) < 2 or samples[0] <= 0:
        return None
    return 100.0 * (samples[-1] - samples[0]) / samples[0]


# --- formatting --------------------------------------------------------------------------------


def fmt_s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} tok/s"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}×" if value < 0.995 else f"{value:.2f}×"


def fmt_gb(value: float | None) -> str:
    return "—" if value is None else f"{value / GB:.2f} GB"


def fmt_int(value: Any) -> str:
    return "—" if value is None else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are str()-ed, pipes escaped, columns padded."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    table = [[cell(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    for row in table[1:]:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, headers {len(headers)}")
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
