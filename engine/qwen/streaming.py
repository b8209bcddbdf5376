"""The bridge between the engine's compute thread and an async generator.

- `TokenPipe` takes the tokens of the engine's decode loop (`push`), decodes them incrementally
  (never splitting a multi-byte character) and hands text pieces to the event loop's queue.
- `install_abort_hooks` makes a set flag abort even inside one long forward pass (the vision
  encoder and the prefill of a large image take seconds on a CPU), by raising `Aborted` from a
  forward pre-hook on every block of the model's layer lists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import torch


class Aborted(Exception):
    """Raised inside generate() when the stream's consumer has gone away."""


class Finished:
    """The queue item that ends a stream."""


FINISHED = Finished()


class TokenPipe:
    """Sends the decoded text of generated tokens to an asyncio queue.

    Decoding uses a sliding window (decode the last
    few ids with and without the newest ones, emit the difference) so the cost per token stays
    constant and a character split over several byte-level tokens is emitted whole.
    """

    def __init__(
        self,
        tokenizer: Any,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[object],
    ) -> None:
        self._tokenizer = tokenizer
        self._loop = loop
        self._queue = queue
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of what has been emitted
        self.first_token_at: float | None = None
        self.token_count = 0

    def push(self, token: int) -> None:
        """One generated token."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.token_count += 1
        self._ids.append(token)
        piece = self._next_piece(final=False)
        if piece:
            self.send(piece)

    def end(self) -> None:
        piece = self._next_piece(final=True)
        if piece:
            self.send(piece)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _next_piece(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        return piece

    def send(self, item: object) -> None:
        """Hand an item to the event loop (ignored once the loop has closed)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            pass


def install_abort_hooks(model: torch.nn.Module, should_abort: Callable[[], bool]) -> int:
    """Check `should_abort` before every block in the model's ModuleLists; returns hook count.

    Model-agnostic: decoder layers, vision blocks and mergers all sit in ModuleLists. A check costs
    a Python call per block (tens per token), which is nothing next to a block's matrix products.
    """

    def hook(module: torch.nn.Module, args: Any) -> None:
        if should_abort():
            raise Aborted("generation stopped")

    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                block.register_forward_pre_hook(hook)
                count += 1
    return count
