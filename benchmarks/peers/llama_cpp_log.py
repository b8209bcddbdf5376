"""Timings from the log of one ``llama-mtmd-cli`` run (one image, one prompt, N new tokens).

What the log holds: the vision encoder's time, as ``mtmd batch encoding done in X ms`` (llama.cpp
of 2026, lines prefixed with a timestamp) or ``<name> slice encoded in X ms`` per slice (2025);
where mtmd's helper logs at INFO, ``decoding image batch i/n, n_tokens_batch = N`` and
``image decoded (batch i/n) in X ms`` per batch of image embeddings fed to the language model; at
the end ``llama_perf_context_print`` with the prompt eval (every prompt token, image embeddings
included) and the eval (one decode step per generated token after the first) times.

First token: the time from the prompt's start (the CLI's "experimental CLI" warning, printed right
before the image is loaded and the message evaluated) to the first token, taken from the log's
timestamps as the end of the run minus the eval time. The perf line's prompt eval time is not used
for it: libllama synchronises lazily, so the vision encoder's seconds (run between two prompt
chunks) land in it too. Logs without timestamps (older llama.cpp) fall back to encode + prompt eval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENCODED = re.compile(r"(?:(?:image|audio|video) slice encoded|mtmd batch encoding done) in (\d+) ms")
_DECODED = re.compile(r"(?:image|audio|video) decoded \(batch \d+/\d+\) in (\d+) ms")
_BATCH_TOKENS = re.compile(r"decoding (?:image|audio|video) batch \d+/\d+, n_tokens_batch = (\d+)")
_PERF = r"llama_perf_context_print:\s+{label} time =\s*([\d.]+) ms /\s*(\d+) {unit}"
_PROMPT = re.compile(_PERF.format(label="prompt eval", unit="tokens"))
_EVAL = re.compile(_PERF.format(label="eval", unit="runs"))
_LOAD = re.compile(r"llama_perf_context_print:\s+load time =\s*([\d.]+) ms")
_STAMP = r"^(\d+)\.(\d\d)\.(\d{{3}})\.(\d{{3}}) [A-Z] .*{text}"  # minutes.seconds.ms.us
_START = re.compile(_STAMP.format(text="This is an experimental CLI"), re.M)
_END = re.compile(_STAMP.format(text="llama_perf_context_print:"), re.M)


def _stamp_s(match: re.Match[str] | None) -> float | None:
    if match is None:
        return None
    minutes, seconds, ms, us = (int(g) for g in match.groups())
    return minutes * 60 + seconds + ms / 1e3 + us / 1e6


class LlamaCppLogError(ValueError):
    """The log lacks the timings of a finished run (the run failed or was cut short)."""


@dataclass(frozen=True)
class MtmdTimings:
    encode_ms: float  # vision encoder, all slices
    image_decode_ms: float  # image embeddings through the language model (part of prompt eval)
    visual_tokens: int | None  # None where the log does not say (mtmd's helper not at INFO)
    prompt_eval_ms: float
    prompt_tokens: int
    eval_ms: float
    eval_runs: int
    load_ms: float | None
    prompt_start_s: float | None  # log timestamps, where the log has them
    run_end_s: float | None

    @property
    def first_token_s(self) -> float:
        if self.prompt_start_s is not None and self.run_end_s is not None:
            return self.run_end_s - self.eval_ms / 1000.0 - self.prompt_start_s
        return (self.encode_ms + self.prompt_eval_ms) / 1000.0

    @property
    def decode_tok_s(self) -> float | None:
        return self.eval_runs * 1000.0 / self.eval_ms if self.eval_ms > 0 else None


def parse_mtmd_log(text: str) -> MtmdTimings:
    """The timings of one llama-mtmd-cli run; LlamaCppLogError if it did not finish."""
    prompt, evals = _PROMPT.search(text), _EVAL.search(text)
    encoded = [float(m) for m in _ENCODED.findall(text)]
    if prompt is None or evals is None:
        raise LlamaCppLogError("no llama_perf_context_print timings: the run did not finish")
    if not encoded:
        raise LlamaCppLogError("no 'encoding done' line: the image was not encoded")
    load = _LOAD.search(text)
    return MtmdTimings(
        encode_ms=sum(encoded),
        image_decode_ms=sum(float(m) for m in _DECODED.findall(text)),
        visual_tokens=sum(int(m) for m in batches) if (batches := _BATCH_TOKENS.findall(text)) else None,
        prompt_eval_ms=float(prompt.group(1)),
        prompt_tokens=int(prompt.group(2)),
        eval_ms=float(evals.group(1)),
        eval_runs=int(evals.group(2)),
        load_ms=float(load.group(1)) if load else None,
        prompt_start_s=_stamp_s(_START.search(text)),
        run_end_s=_stamp_s(_END.search(text)),
    )
