"""The engine's one compute thread: prefill with KV-cache reuse, then batched decode.

Requests arrive from any number of concurrent streams. The loop admits one waiting request at a
time — it encodes the prompt, takes the conversation's cached KV (if its keys are a prefix of the
new prompt's), prefills only the tokens the cache lacks with explicit 3-D positions, and streams
the first token at once — then runs one decode step for every conversation in the batch, and
repeats. So a new chat's first token waits for at most one prefill and one decode step of the
others, never for their whole answers; a stream whose consumer has gone leaves the batch before the
next step.

Positions are always explicit (`get_rope_index` on the whole prompt, sliced to the new tokens;
decode tokens at n + delta): the model's shared `rope_deltas` is never used, so conversations can
interleave freely.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bot.engine_port import EngineNotReady
from engine.qwen.batching import Batch, Row, cache_length, crop_cache
from engine.qwen.kvcache import (
    ImageSpan,
    SessionCacheStore,
    cache_nbytes,
    kv_bytes_per_token,
    prompt_keys,
    reusable_prefix,
)
from engine.qwen.last_position import LastPositionPrefill
from engine.qwen.loading import onednn_decodes_faster
from engine.qwen.streaming import Aborted, TokenPipe

logger = logging.getLogger("vlbot.engine")


@dataclass(frozen=True)
class Encoded:
    """A prompt ready to prefill: processor outputs plus its keys and image spans."""

    inputs: dict[str, Any]
    ids: list[int]
    keys: list[int]
    spans: list[ImageSpan]
    images: int


@dataclass
class Request:
    """One stream's work, shared between its async consumer and the compute thread."""

    encode: Callable[[], Encoded]
    session: str | None
    max_new_tokens: int
    temperature: float
    pipe: TokenPipe
    stop: threading.Event
    on_done: Callable[[Request, BaseException | None], None]
    started: float = 0.0
    prompt_tokens: int = 0
    visual_tokens: int = 0
    reused_tokens: int = 0
    images: int = 0
    generated: int = 0
    finished: bool = False
    cut: bool = False  # max_new_tokens ended the answer, not the model


@dataclass
class SamplingDefaults:
    eos: frozenset[int] = frozenset()
    top_k: int | None = None
    top_p: float | None = None


@dataclass
class Positions:
    """Explicit M-RoPE positions of a whole prompt (3, 1, L) and its rope delta."""

    ids: torch.Tensor = field(repr=False)
    delta: int


def rope_positions(model: Any, encoded: Encoded) -> Positions:
    """Positions for every prompt token from the model's own `get_rope_index`."""
    inputs = encoded.inputs
    ids = inputs["input_ids"]
    token_types = inputs.get("mm_token_type_ids")
    if token_types is None:
        token_types = torch.zeros_like(ids)
    positions, deltas = model.model.get_rope_index(
        ids, token_types, image_grid_thw=inputs.get("image_grid_thw")
    )
    return Positions(positions, int(deltas.reshape(-1)[0]))


# Decode steps between checks that the batch's growing caches and the kept ones fit the KV budget
# (also the room reserved for a new prompt's first tokens of answer).
KV_CHECK_STEPS = 64


class Scheduler:
    """Runs requests on `model` in one thread, the one that calls `run()` (prefill one at a time,
    decode all together)."""

    def __init__(
        self,
        model: Any,
        new_cache: Callable[[], Any],
        store: SessionCacheStore,
        sampling: SamplingDefaults,
        *,
        threads: int,
        max_batch: int = 8,
        decode_mkldnn: bool | None = None,
        positions: Callable[[Any, Encoded], Positions] = rope_positions,
        decode_step: Callable[..., torch.Tensor] | None = None,
        head: Callable[[torch.Tensor, int | None], torch.Tensor] | None = None,
        prepare: Callable[[Callable[[], bool]], bool] | None = None,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        # a prefill's last layer computes its projection and MLP for the last position only
        self._last_position = LastPositionPrefill(model)
        # the last hidden states (B, H) for a step's inputs; None: the model's own forward
        self.decode_step = decode_step
        # logits (B, V) from last hidden states, exact at least for each row's `top` largest
        # (engine.cpu.kernels.output_head); None: the model's lm_head, every logit
        self.head = head if head is not None else lambda hidden, top: model.lm_head(hidden)
        self._prepare = prepare  # idle-time work after loading; stops when asked (a request came)
        self.prepared = prepare is None  # True once `prepare` reported it is done
        self.store = store
        # what one more token of context costs in KV memory (to make room before a prefill)
        # (in the dtype the cache keeps, `new_cache`'s: `cache_dtype`, or else the model's)
        stored = cache_dtype if cache_dtype is not None else getattr(model, "dtype", torch.float32)
        self.kv_per_token = kv_bytes_per_token(model.config, stored)
        self.sampling = sampling
        self.positions = positions
        self.max_batch = max(1, max_batch)
        self.decode_mkldnn = decode_mkldnn
        self._threads = threads
        self._new_cache = new_cache
        self._batch = Batch(new_cache)
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._prefilling: Request | None = None
        self._warming = False
        self.peak_batch = 0  # most conversations that have decoded together
        # decode throughput counters: steps run, tokens they produced, seconds they took
        self.decode_steps = 0
        self.decode_tokens = 0
        self.decode_seconds = 0.0
        self._running = False
        self._stopped = threading.Event()

    def run(self) -> None:
        """The compute loop, on the calling thread, until `close()`.

        Call it on the thread that loaded the model: torch's OpenMP thread pool belongs to the
        thread that uses it, and a second thread doing torch work (the loader) makes every
        parallel kernel here ~20 % slower on 2 cores (int4 decode step 99-102 ms on the loading
        thread, 117-127 ms on another)."""
        self._running = True
        try:
            self._run()
        finally:
            self._stopped.set()

    # --- called from other threads -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise EngineNotReady("the engine is closed")
            self._pending.append(request)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def should_abort(self) -> bool:
        """For the model's abort hooks: stop the prefill in progress once its stream has gone."""
        current = self._prefilling
        if self._warming and self._pending:  # the warm-up yields to the first real request
            return True
        return self._closed or (current is not None and current.stop.is_set())

    def close(self, timeout: float | None = None) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._running:
            self._stopped.wait(timeout)

    @property
    def idle(self) -> bool:
        """No request waiting, prefilling or decoding."""
        with self._cond:
            return not self._pending and not self._batch.rows and self._prefilling is None

    @property
    def batch_size(self) -> int:
        return len(self._batch)

    # --- the compute thread --------------------------------------------------------------------

    def _idle_work(self) -> None:
        """Run `prepare` (engine.cpu.hugepages moves the weights) while nothing waits; a request
        stops it between steps, and the next idle moment resumes it until it is done."""
        if self._prepare is None or self.prepared:
            return
        self._warming = True
        try:
            self.prepared = bool(self._prepare(self.should_abort))
        except Exception:  # an optimisation only: never fatal, not retried
            logger.exception("the engine's idle-time preparation failed")
            self.prepared = True
        finally:
            self._warming = False

    def _warm_up(self) -> None:
        """Use the idle time after load: the idle work, the single-row decode backend (when not
        set), then one tiny forward, since the first pass over freshly loaded weights (page
        faults, oneDNN kernel setup) costs seconds a user's first question should not pay. A
        request that arrives meanwhile stops the work, aborts the forward and goes first."""
        started = time.monotonic()
        self._idle_work()
        self._warming = True
        try:
            if self.decode_mkldnn is None:  # from the CPU flags
                self.decode_mkldnn = onednn_decodes_faster()
            with torch.inference_mode():
                ids = torch.zeros((1, 2), dtype=torch.long)
                hidden = self._last_hidden(input_ids=ids, cache=self._new_cache(), use_cache=True)
                self.head(hidden, 1)
        except Exception as e:  # never fatal (Aborted included): the first request pays instead
            logger.info("warm-up stopped: %s", e)
            return
        finally:
            self._warming = False
        logger.info(
            "warm-up done in %.1f s (oneDNN for single-row decode: %s)",
            time.monotonic() - started,
            self.decode_mkldnn,
        )

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        self._warm_up()
        while True:
            if not self.prepared and self.idle and not self._closed:
                self._idle_work()
                continue
            with self._cond:
                while not self._closed and not self._pending and not self._batch.rows:
                    self._cond.wait()
                if self._closed:
                    break
                gone = [r for r in self._pending if r.stop.is_set()]
                for stopped in gone:
                    self._pending.remove(stopped)
                request: Request | None = None
                if self._pending and len(self._batch) < self.max_batch:
                    request = self._pending.popleft()
            try:
                for stopped in gone:
                    self._finish(stopped, None)
                if request is not None:
                    self._admit(request)
                self._reap()
                if self._batch.rows:
                    self._step()
            except BaseException as e:  # a bug must not leave every stream waiting forever
                logger.exception("the engine's compute loop failed")
                if request is not None:
                    self._finish(request, e)
                rows = list(self._batch.rows)
                self._batch = Batch(self._new_cache)
                for row in rows:
                    self._finish(row.owner, e)
        self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
        for request in pending:
            self._finish(request, EngineNotReady("the engine was closed"))
        self._leave(list(self._batch.rows))

    def _admit(self, request: Request) -> None:
        if request.stop.is_set():
            self._finish(request, None)
            return
        request.started = time.monotonic()
        entry = None
        cache = None
        prefix = 0
        try:
            encoded = request.encode()
            request.prompt_tokens = len(encoded.ids)
            request.visual_tokens = sum(s.end - s.start for s in encoded.spans)
            request.images = encoded.images
            entry = self.store.take(request.session)
            if entry is not None:
                prefix = reusable_prefix(entry.keys, encoded.keys, encoded.spans)
            if entry is not None and prefix > 0:
                cache = entry.cache
                crop_cache(cache, prefix)
            else:
                cache, prefix = self._new_cache(), 0
            request.reused_tokens = prefix
            # the budget covers this prompt's cache and the batch's too: kept ones make room
            growth = (len(encoded.ids) - prefix + KV_CHECK_STEPS) * self.kv_per_token
            self.store.make_room(self.kv_in_use_bytes + cache_nbytes(cache) + growth)
            positions = self.positions(self.model, encoded)
            self._prefilling = request
            logits = self._prefill(request, encoded, positions, cache, prefix)
        except Aborted:
            if cache is not None and prefix:  # layers the aborted forward reached grew: undo
                crop_cache(cache, prefix)
                self._keep(request.session, encoded.keys[:prefix], cache, prefix)
            self._finish(request, None)
            return
        except BaseException as e:  # bad input or a model failure: this request fails alone
            self._finish(request, e)
            return
        finally:
            self._prefilling = None
        token = self._sample(logits, request)
        request.pipe.push(token)
        request.generated = 1
        row = Row(request, positions.delta, len(encoded.ids), token, list(encoded.keys))
        if self._done(row):
            self._keep(request.session, row.keys, cache, row.length)
            self._finish(request, None)
            return
        self._batch.join(row, cache)
        self.peak_batch = max(self.peak_batch, len(self._batch))

    def _prefill(
        self, request: Request, encoded: Encoded, positions: Positions, cache: Any, prefix: int
    ) -> torch.Tensor:
        inputs = encoded.inputs
        ids = inputs["input_ids"]
        kwargs: dict[str, Any] = {
            "input_ids": ids[:, prefix:],
            "attention_mask": torch.ones_like(ids),
            "position_ids": positions.ids[:, :, prefix:],
            "cache": cache,
            "use_cache": True,
        }
        shown = [i for i, span in enumerate(encoded.spans) if span.start >= prefix]
        if shown:
            grid = inputs["image_grid_thw"]
            patches = grid.prod(dim=1).tolist()
            first = sum(patches[: shown[0]])
            kwargs["pixel_values"] = inputs["pixel_values"][first:]
            kwargs["image_grid_thw"] = grid[shown[0] :]
        with torch.inference_mode():
            with self._last_position.active():
                hidden = self._last_hidden(**kwargs)
            return self.head(hidden, self._top([request]))[0]

    def _last_hidden(self, **inputs: Any) -> torch.Tensor:
        """The model's forward without its output head: the last position's hidden states."""
        out = self.model.model(**inputs)
        hidden: torch.Tensor = out.last_hidden_state[:, -1]
        return hidden

    def _top(self, requests: list[Request]) -> int | None:
        """How many of each row's largest logits sampling needs: 1 when every request is
        greedy, the sampler's top-k otherwise (None: all of them)."""
        if all(request.temperature <= 0 for request in requests):
            return 1
        return self.sampling.top_k or None

    def _step(self) -> None:
        inputs = self._batch.step_inputs()
        started = time.perf_counter()
        try:
            with torch.inference_mode(), self._decode_backend():
                if self.decode_step is not None:
                    hidden = self.decode_step(**inputs)
                else:
                    hidden = self._last_hidden(**inputs)
                logits = self.head(hidden, self._top([row.owner for row in self._batch.rows]))
        except BaseException as e:  # a failed step fails every row in it
            rows = list(self._batch.rows)
            self._batch.remove(rows)
            for row in rows:
                self._finish(row.owner, None if isinstance(e, Aborted) else e)
            return
        self._batch.advance(inputs["attention_mask"])
        done: list[Row] = []
        for index, row in enumerate(self._batch.rows):
            request: Request = row.owner
            row.last = self._sample(logits[index], request)
            request.pipe.push(row.last)
            request.generated += 1
            if self._done(row):
                done.append(row)
        self.decode_steps += 1
        self.decode_tokens += len(self._batch.rows)
        self.decode_seconds += time.perf_counter() - started
        if self.decode_steps % KV_CHECK_STEPS == 0:  # the batch's caches grew: keep to the budget
            self.store.make_room(self.kv_in_use_bytes)
        self._leave(done)

    def _reap(self) -> None:
        self._leave([row for row in self._batch.rows if row.owner.stop.is_set()])

    def _leave(self, rows: list[Row]) -> None:
        for row, cache in self._batch.remove(rows):
            try:
                self._keep(row.owner.session, row.keys, cache, row.length)
            except Exception:  # the answer is complete: only the next turn's reuse is lost
                logger.exception("could not keep a conversation's KV cache")
            finally:
                self._finish(row.owner, None)

    def _keep(self, session: str | None, keys: list[int], cache: Any, length: int) -> None:
        if session is None or cache is None or not keys:
            return
        if cache_length(cache) != length or len(keys) != length:  # never store an inconsistent one
            logger.warning("not keeping a KV cache of %d tokens for %d keys", length, len(keys))
            return
        self.store.put(session, keys, cache, in_use=self.kv_in_use_bytes)

    @property
    def kv_in_use_bytes(self) -> int:
        """KV memory of the conversations decoding now (the batch's stacked cache)."""
        return 0 if self._batch.cache is None else cache_nbytes(self._batch.cache)

    def _done(self, row: Row) -> bool:
        request: Request = row.owner
        if row.last in self.sampling.eos or request.stop.is_set():
            return True
        request.cut = request.generated >= request.max_new_tokens
        return request.cut

    @contextlib.contextmanager
    def _decode_backend(self) -> Iterator[None]:
        """oneDNN off for single-row decode steps when `decode_mkldnn` is False.

        Without AMX, oneDNN's bf16 matrix-vector product reads weights at about half the speed of
        torch's native kernel; with several rows torch's native bf16 matrix-matrix product is the
        slower one, so batched steps and prefill always keep oneDNN.
        """
        if self.decode_mkldnn is not False or len(self._batch) != 1:
            yield
            return
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            yield
        finally:
            torch._C._set_mkldnn_enabled(enabled)

    def _sample(self, logits: torch.Tensor, request: Request) -> int:
        if request.temperature <= 0:
            return int(torch.argmax(logits).item())
        scores = logits.float() / request.temperature
        top_k = self.sampling.top_k
        if top_k and top_k < scores.shape[-1]:
            kth = torch.topk(scores, top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        top_p = self.sampling.top_p
        if top_p is not None and 0 < top_p < 1:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            cut = cumulative - torch.softmax(ordered, dim=-1) > top_p
            scores[order[cut]] = float("-inf")
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1).item())

    def _finish(self, request: Request, error: BaseException | None) -> None:
        if request.finished:
            return
        request.finished = True
        request.on_done(request, error)


def make_encoded(inputs: dict[str, Any], image_token_id: int, digests: list[bytes], images: int) -> Encoded:
    from engine.qwen.kvcache import image_spans

    ids = [int(i) for i in inputs["input_ids"][0].tolist()]
    spans = image_spans(ids, image_token_id)
    return Encoded(inputs, ids, prompt_keys(ids, spans, digests), spans, images)
