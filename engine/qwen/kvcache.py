"""Per-conversation KV caches kept between turns, so a follow-up question prefills only its new tokens.

A conversation's cache holds the key/value tensors of every token the model has seen in it (the
prompt, images included, and the answer but its last token). The store keeps them within a byte
budget and evicts the least recently used conversation first.

Reuse is decided on *keys*, not text: the token ids of the prompt, with every image token replaced
by a marker derived from the image's bytes (two different pictures of the same size give the same
token ids, but must not share a cache). The longest common prefix of the cached keys and the new
prompt's keys is kept; a prefix that ends inside an image is moved back to the image's start (an
image is always encoded whole).

The budget bounds all KV memory, not only the caches kept: the scheduler tells the store how many
bytes the conversations being answered hold (and how many a prompt about to be prefilled will
need), and kept caches are evicted to leave that room. Without it, four chats answered together
came on top of a full store: ~0.2 GB more at the benchmark's peak.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_KV_CACHE_BYTES = 512 << 20  # ≈ 4,600 tokens of Qwen3-VL-2B in bf16: ~4 one-image chats


def image_marker(digest: bytes) -> int:
    """A negative int standing for one image's tokens in a key sequence (never a token id)."""
    return -1 - int.from_bytes(digest[:7], "big")


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's tokens sit in a prompt: [start, end)."""

    start: int
    end: int


def image_spans(ids: Sequence[int], image_token_id: int) -> list[ImageSpan]:
    """The runs of image tokens in `ids`, in order (one run per image)."""
    spans: list[ImageSpan] = []
    start = -1
    for i, token in enumerate(ids):
        if token == image_token_id:
            if start < 0:
                start = i
        elif start >= 0:
            spans.append(ImageSpan(start, i))
            start = -1
    if start >= 0:
        spans.append(ImageSpan(start, len(ids)))
    return spans


def prompt_keys(ids: Sequence[int], spans: Sequence[ImageSpan], digests: Sequence[bytes]) -> list[int]:
    """Token ids with each image's tokens replaced by that image's marker."""
    if len(spans) != len(digests):
        raise ValueError(f"{len(spans)} image token runs but {len(digests)} images")
    keys = list(ids)
    for span, digest in zip(spans, digests, strict=True):
        marker = image_marker(digest)
        keys[span.start : span.end] = [marker] * (span.end - span.start)
    return keys


def reusable_prefix(cached: Sequence[int], new: Sequence[int], spans: Sequence[ImageSpan]) -> int:
    """How many leading tokens of `new` a cache holding `cached` can serve.

    At least one token is always left to prefill (its logits give the first answer token), and a
    prefix never ends inside an image.
    """
    limit = min(len(cached), len(new) - 1)
    n = 0
    while n < limit and cached[n] == new[n]:
        n += 1
    for span in spans:
        if span.start < n < span.end:
            return span.start
    return max(n, 0)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in every layer of a model with `config` (0 when
    the config does not say: the store then counts only what it measures)."""
    text = getattr(config, "text_config", None) or config
    try:
        layers = int(text.num_hidden_layers)
        heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    except (AttributeError, TypeError, ValueError):
        return 0
    return 2 * layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def cache_nbytes(cache: Any) -> int:
    """Bytes of memory behind a transformers Cache's key/value tensors.

    Counts each tensor's whole storage once: a view of a larger buffer (engine.qwen.kvbuffer's spare
    room, a cropped cache) holds all of it.
    """
    seen: set[int] = set()
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += int(storage.nbytes())
    return total


@dataclass
class SessionCache:
    """One conversation's cache and the keys of the tokens it holds (len(keys) == cached length)."""

    keys: list[int]
    cache: Any
    nbytes: int


class SessionCacheStore:
    """Conversation caches within a byte budget, least recently used evicted first. Thread-safe.

    `take` hands a cache out exclusively (a conversation's cache is extended in place while it
    answers); `put` stores it back once the answer is done.
    """

    def __init__(self, budget_bytes: int = DEFAULT_KV_CACHE_BYTES) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: OrderedDict[str, SessionCache] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, session: object) -> bool:
        with self._lock:
            return session in self._entries

    def take(self, session: str | None) -> SessionCache | None:
        if session is None:
            return None
        with self._lock:
            entry = self._entries.pop(session, None)
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
            return entry

    def put(self, session: str | None, keys: list[int], cache: Any, in_use: int = 0) -> bool:
        """Store a conversation's cache, evicting others so that they and `in_use` bytes (the
        caches of conversations being answered) fit the budget; False when it does not fit
        beside `in_use` alone (not stored)."""
        if session is None:
            return False
        nbytes = cache_nbytes(cache)
        with self._lock:
            self._entries.pop(session, None)
            if nbytes + max(0, in_use) > self.budget_bytes or not keys:
                return False
            self._entries[session] = SessionCache(keys, cache, nbytes)
            self._evict_to(self.budget_bytes - max(0, in_use))
            return True

    def make_room(self, in_use: int) -> int:
        """Evict least recently used caches until the kept ones and `in_use` bytes fit the
        budget; returns how many were evicted."""
        with self._lock:
            return self._evict_to(self.budget_bytes - max(0, in_use))

    def _evict_to(self, limit: int) -> int:
        total = sum(e.nbytes for e in self._entries.values())
        evicted = 0
        while self._entries and total > limit:
            _, entry = self._entries.popitem(last=False)
            total -= entry.nbytes
            evicted += 1
        self.evictions += evicted
        return evicted

    def drop(self, session: str) -> None:
        with self._lock:
            self._entries.pop(session, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
