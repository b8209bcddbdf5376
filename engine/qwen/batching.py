"""Continuous batching: several conversations decode together, one forward per step.

Each conversation is prefilled on its own (the scheduler streams its first token at once) and then
joins the batch: the caches are left-padded to a common length and stacked along the batch
dimension, an attention mask hides the padding, and every row gets its own rotary positions
(Qwen-VL's 3-D M-RoPE: after the prompt, a text token at absolute index n has position n + delta on
all three axes, delta being the row's rope delta from `get_rope_index`). A finished row leaves with
its own cache (padding stripped) so it can be kept for the conversation's next turn.

Only tensor bookkeeping lives here; the scheduler owns threads, streams and sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Row:
    """One conversation in the batch.

    `length` is the number of real (unpadded) tokens in its cache, `keys` their keys (prompt keys
    then the generated ids that have been fed), `last` the newest sampled token, not yet fed.
    """

    owner: Any
    delta: int
    length: int
    last: int
    keys: list[int] = field(default_factory=list)


def layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def set_layer_tensors(cache: Any, tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
        _set_layer(layer, keys, values)


def _set_layer(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    layer.is_initialized = True
    layer.device = keys.device


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first `length` positions of every layer (in place)."""
    set_layer_tensors(
        cache, [(k[..., :length, :], v[..., :length, :]) for k, v in layer_tensors(cache)]
    )


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length())


def _left_pad(tensor: torch.Tensor, pad: int) -> torch.Tensor:
    if pad <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[2] = pad
    return torch.cat([tensor.new_zeros(shape), tensor], dim=2)


class Batch:
    """The rows decoding together, their stacked cache and attention mask."""

    def __init__(self, new_cache: Callable[[], Any]) -> None:
        self._new_cache = new_cache
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (rows, cache length), 1 = real token

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return 0 if self.cache is None else cache_length(self.cache)

    def join(self, row: Row, cache: Any) -> None:
        """Add a prefilled conversation (its cache holds exactly `row.length` tokens)."""
        if not self.rows or self.cache is None or self.mask is None:
            self.rows = [row]
            self.cache = cache
            self.mask = torch.ones((1, row.length), dtype=torch.long)
            return
        width = max(self.width, row.length)
        grow, pad = width - self.width, width - row.length
        # layer by layer, letting go of each layer's old tensors as it goes: the stacked cache
        # and the newcomer's are never held twice over (4 chats: ~0.15 GB less at the peak)
        for layer, own in zip(self.cache.layers, cache.layers, strict=True):
            keys = torch.cat([_left_pad(layer.keys, grow), _left_pad(own.keys, pad)], dim=0)
            values = torch.cat([_left_pad(layer.values, grow), _left_pad(own.values, pad)], dim=0)
            own.keys = own.values = None  # the newcomer's cache is consumed
            _set_layer(layer, keys, values)
        mask = torch.zeros((len(self.rows) + 1, width), dtype=torch.long)
        mask[:-1, grow:] = self.mask
        mask[-1, pad:] = 1
        self.mask = mask
        self.rows.append(row)

    def step_inputs(self) -> dict[str, Any]:
        """Model inputs for one decode step: every row's newest token at its own position."""
        assert self.mask is not None
        count = len(self.rows)
        ids = torch.tensor([[r.last] for r in self.rows], dtype=torch.long)
        positions = torch.tensor([r.length + r.delta for r in self.rows], dtype=torch.long)
        mask = torch.cat([self.mask, torch.ones((count, 1), dtype=torch.long)], dim=1)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions.view(1, count, 1).expand(3, count, 1),
            "cache": self.cache,
            "use_cache": True,
        }

    def advance(self, attention_mask: torch.Tensor) -> None:
        """After a step: every row's newest token is now in the cache."""
        self.mask = attention_mask
        for row in self.rows:
            row.keys.append(row.last)
            row.length += 1

    def remove(self, rows: Sequence[Row]) -> list[tuple[Row, Any]]:
        """Take rows out; returns each with its own unpadded cache (a fresh Cache object)."""
        if not rows:
            return []
        leaving = {id(r) for r in rows}
        width = self.width
        keep = [i for i, r in enumerate(self.rows) if id(r) not in leaving]
        taken: list[tuple[Row, Any]] = []
        copies: list[tuple[Row, int, Any]] = []  # (row, its index, its own new cache)
        for index, row in enumerate(self.rows):
            if id(row) in leaving:
                if len(self.rows) == 1 and width == row.length:  # alone, unpadded: the batch's cache
                    taken.append((row, self.cache))
                else:
                    copies.append((row, index, self._new_cache()))
        trim = min((width - self.rows[i].length for i in keep), default=0)  # padding all kept share
        index_tensor = torch.tensor(keep, dtype=torch.long)
        # layer by layer (see join): each layer's old stacked tensors go before the next is copied
        for number, layer in enumerate(self.cache.layers if copies or keep else ()):
            keys, values = layer.keys, layer.values
            for row, index, own in copies:
                start = width - row.length
                _set_layer(
                    own.layers[number],
                    keys[index : index + 1, :, start:].clone(),
                    values[index : index + 1, :, start:].clone(),
                )
            if keep:
                _set_layer(layer, keys[index_tensor, :, trim:, :], values[index_tensor, :, trim:, :])
            else:
                layer.keys = layer.values = None  # the batch's cache is done with
        taken.extend((row, own) for row, _, own in copies)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return taken
        assert self.mask is not None
        self.mask = self.mask[index_tensor, trim:]
        return taken
