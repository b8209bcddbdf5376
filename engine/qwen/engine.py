"""QwenVLEngine: Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on CPU through Hugging Face transformers.

One code path for every family: `AutoModelForImageTextToText` and the processor class transformers
maps the model's config to (loaded without its torchvision-only video processor). The model comes
from a local folder or a hub id (downloaded into the HF cache on first use).

Generation runs on one compute thread (engine.qwen.scheduler), the thread that loaded the model (torch's
thread pool is per thread; see `Scheduler.run`): each new request is prefilled on its own
— reusing its conversation's KV cache from the previous turn when the new prompt extends it
(engine.qwen.kvcache), with explicit 3-D rotary positions — and then decodes in a batch with every other
active conversation, one forward per step (engine.qwen.batching). Text pieces flow back to each async
generator through a queue. Closing or cancelling a generator sets its stop flag: a decoding stream
leaves the batch before the next step, a prefill is aborted mid-forward through abort hooks, and
the generator waits until its request has ended before it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from bot.engine_port import EngineError, EngineInfo, EngineNotReady, ModelNotFound, StreamStats
from bot.models import GenerationParams, InputRejected, Message, Turn
from engine.cpu.quant import check_mode
from engine.cpu.summary import cpu_summary
from engine.cpu.swap import decode_parts, swap_modules
from engine.intake import IntakeLimits, check_image
from engine.qwen.kvcache import DEFAULT_KV_CACHE_BYTES, SessionCacheStore
from engine.qwen.loading import (
    DEFAULT_MODEL,
    ModelSource,
    budget_size,
    dtype_name,
    load_failure,
    load_processor,
    physical_cores,
    processor_size,
    resolve_dtype,
    resolve_source,
    visual_token_pixels,
)
from engine.qwen.prompt import Prompt, RecentImages, build_prompt, remember_processed_images
from engine.qwen.scheduler import Encoded, Request, SamplingDefaults, Scheduler, make_encoded
from engine.qwen.streaming import FINISHED, TokenPipe, install_abort_hooks

logger = logging.getLogger("vlbot.engine")
MAX_KEPT_STATS = 64


@dataclass
class _Loaded:
    model: Any
    processor: Any
    source: ModelSource
    dtype: torch.dtype
    image_token_id: int
    size: dict[str, int]
    architecture: str


class QwenVLEngine:
    """The Engine protocol over a Qwen-VL model in transformers (CPU).

    Args:
        model: hub id (default Qwen/Qwen3-VL-2B-Instruct) or a local folder saved with
            save_pretrained.
        dtype: "auto" (bfloat16 where the CPU has AVX512-BF16/AMX, else float32), "float32" or
            "bfloat16".
        threads: torch intra-op threads; default: physical cores.
        limits: image intake limits; `token_pixels` is replaced by the loaded processor's
            (patch_size * merge_size) ** 2.
        max_images: most images one prompt shows (the new message's always; the most recent
            earlier ones fill the rest); None = no limit.
        kv_cache_bytes: memory for keeping conversations' KV caches between turns (least recently
            used evicted first); 0 turns follow-up reuse off. Needs `GenerationParams.session`.
        max_batch: most conversations decoding together; more wait for a free row.
        decode_mkldnn: use oneDNN for single-conversation decode steps (True), or torch's native
            kernel (False: about twice as fast for bf16 on CPUs without AMX); None (default)
            times both on the model's own weights while warming up, after load, and picks.
        quantize: "none" (default), "int8" or "int4": weight-only quantization of the language
            model (engine.cpu.quant) — faster decode, answers no longer exactly the model's.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        threads: int | None = None,
        limits: IntakeLimits | None = None,
        max_images: int | None = 8,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        max_batch: int = 8,
        decode_mkldnn: bool | None = None,
        quantize: str = "none",
    ) -> None:
        self._model_name = model
        self._dtype = resolve_dtype(dtype)  # ValueError for a bad name, before any loading
        self._threads = threads if threads and threads > 0 else physical_cores()
        self._limits = limits or IntakeLimits()
        self._max_images = max_images
        self._recent_images = RecentImages()  # a follow-up's earlier images, decoded once
        self._loaded: _Loaded | None = None
        self._load_lock = asyncio.Lock()
        self._quantize = check_mode(quantize)  # ValueError for a bad name, before any loading
        self._caches = SessionCacheStore(kv_cache_bytes)
        self._max_batch = max_batch
        self._decode_mkldnn = decode_mkldnn
        self._scheduler: Scheduler | None = None
        self._closed = False
        self.last_reused_tokens = 0
        self.last_stats: StreamStats | None = None
        self._session_stats: dict[str, StreamStats] = {}  # see take_stats
        self.load_seconds: float | None = None

    # --- Engine protocol -----------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        loaded = self._loaded
        details = {
            "device": "cpu",
            "torch": torch.__version__,
            "max_visual_tokens": str(self._limits.max_visual_tokens),
            "token_pixels": str(self._limits.token_pixels),
            "quantize": self._quantize,
            "kv_cache_bytes": str(self._caches.budget_bytes),
        }
        if loaded is not None:
            details["architecture"] = loaded.architecture
            details["source"] = loaded.source.kind
        details.update(cpu_summary())  # the CPU tier and the C kernels loaded so far
        return EngineInfo(
            name="transformers",
            model=self._model_name,
            dtype=dtype_name(self._dtype),
            threads=self._threads,
            details=details,
        )

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    @property
    def limits(self) -> IntakeLimits:
        """The intake limits in force (token_pixels follows the loaded model)."""
        return self._limits

    @property
    def model(self) -> Any:
        """The loaded transformers model (None before load), for benchmarks and diagnostics."""
        return self._loaded.model if self._loaded is not None else None

    @property
    def processor(self) -> Any:
        """The loaded processor (None before load)."""
        return self._loaded.processor if self._loaded is not None else None

    @property
    def caches(self) -> SessionCacheStore:
        """The conversations' kept KV caches (for tests, metrics and diagnostics)."""
        return self._caches

    @property
    def scheduler(self) -> Scheduler | None:
        return self._scheduler

    async def load(self) -> None:
        async with self._load_lock:
            if self._loaded is not None:
                return
            if self._closed:
                raise EngineNotReady("the engine is closed")
            self._loaded = await self._load_on_engine_thread()

    def check(self, message: Message) -> None:
        for part in message.images:
            check_image(part, self._limits)

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        loaded = self._loaded
        scheduler = self._scheduler
        if loaded is None or scheduler is None or self._closed:
            raise EngineNotReady("the model is not loaded" if not self._closed else "closed")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        done: asyncio.Future[None] = loop.create_future()
        pipe = TokenPipe(loaded.processor.tokenizer, loop, queue)

        def on_done(request: Request, error: BaseException | None) -> None:
            self._finish(request, error)
            try:
                loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:  # the event loop is gone
                pass

        request = Request(
            encode=self._encoder(loaded, history, message, params),
            session=params.session,
            max_new_tokens=max(1, params.max_new_tokens),
            temperature=float(params.temperature),
            pipe=pipe,
            stop=threading.Event(),
            on_done=on_done,
        )
        scheduler.submit(request)
        try:
            while True:
                item = await queue.get()
                if item is FINISHED:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, (InputRejected, EngineError)):
                        raise item
                    raise EngineError(f"generation failed: {type(item).__name__}: {item}") from item
                assert isinstance(item, str)
                yield item
        finally:
            request.stop.set()
            scheduler.wake()
            await asyncio.shield(done)

    def take_stats(self, session: str | None) -> StreamStats | None:
        """The stats of the last completed stream of a conversation (`params.session`), once:
        what the runner reports with the answer (the prompt's real token count, and whether
        max_new_tokens cut it). Per conversation, so concurrent streams never mix them up."""
        return self._session_stats.pop(session, None) if session is not None else None

    async def close(self) -> None:
        self._closed = True
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.close)
        self._caches.clear()
        self._loaded = None

    # --- loading ---------------------------------------------------------------------------------

    async def _load_on_engine_thread(self) -> _Loaded:
        """Load the model on a new thread that then runs the compute loop: all torch work on one
        thread (see `Scheduler.run`)."""
        result: concurrent.futures.Future[_Loaded] = concurrent.futures.Future()

        def engine_thread() -> None:
            try:
                loaded = self._load_blocking()
            except BaseException as e:  # reported to load()'s caller
                result.set_exception(e)
                return
            scheduler = self._scheduler
            result.set_result(loaded)
            if scheduler is not None:
                scheduler.run()

        threading.Thread(target=engine_thread, name="vlbot-engine", daemon=True).start()
        return await asyncio.wrap_future(result)

    def _load_blocking(self) -> _Loaded:
        from transformers import AutoConfig, AutoModelForImageTextToText

        started = time.monotonic()
        torch.set_num_threads(self._threads)
        source = resolve_source(self._model_name)
        logger.info("loading %s (%s, %d threads)", source, dtype_name(self._dtype), self._threads)
        try:
            config = AutoConfig.from_pretrained(source.location)
            processor = load_processor(source.location, config)
            remember_processed_images(processor)  # a follow-up's earlier image, processed once
            auto_model: Any = AutoModelForImageTextToText
            model = auto_model.from_pretrained(source.location, config=config, dtype=self._dtype)
        except ModelNotFound:
            raise
        except Exception as e:  # OSError, ValueError, safetensors/json errors, hub errors, ...
            raise load_failure(source, e) from e
        model.eval()
        swap_modules(model, self._quantize)  # engine.cpu.swap: the list of what is swapped
        install_abort_hooks(model, self._should_abort)
        self._scheduler = self._start_scheduler(model)
        token_pixels = visual_token_pixels(processor)
        if token_pixels != self._limits.token_pixels:
            self._limits = replace(self._limits, token_pixels=token_pixels)
        budget = self._limits.max_visual_tokens * self._limits.token_pixels
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = config.image_token_id
        architectures = getattr(config, "architectures", None) or [type(model).__name__]
        self.load_seconds = time.monotonic() - started
        logger.info(
            "loaded %s: %s, dtype %s, %d threads, %d pixels per visual token, %.1f s",
            source,
            architectures[0],
            dtype_name(self._dtype),
            self._threads,
            token_pixels,
            self.load_seconds,
        )
        return _Loaded(
            model=model,
            processor=processor,
            source=source,
            dtype=self._dtype,
            image_token_id=int(image_token_id),
            size=processor_size(processor, budget),
            architecture=str(architectures[0]),
        )

    def _should_abort(self) -> bool:
        scheduler = self._scheduler
        return self._closed or (scheduler is not None and scheduler.should_abort())

    def _start_scheduler(self, model: Any) -> Scheduler:
        from engine.qwen.kvbuffer import appending_cache  # imports transformers: only once loading

        config = model.config
        parts = decode_parts(model)

        def new_cache() -> Any:
            return appending_cache(config, parts.cache_dtype)

        generation = model.generation_config
        eos = generation.eos_token_id
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        return Scheduler(
            model,
            new_cache,
            self._caches,
            SamplingDefaults(
                eos=frozenset(int(i) for i in eos_ids),
                top_k=getattr(generation, "top_k", None),
                top_p=getattr(generation, "top_p", None),
            ),
            threads=self._threads,
            max_batch=self._max_batch,
            decode_mkldnn=self._decode_mkldnn,
            decode_step=parts.decode_step,
            head=parts.head,
            prepare=parts.prepare,
            cache_dtype=parts.cache_dtype,
        )

    # --- generation ------------------------------------------------------------------------------

    def _encoder(
        self,
        loaded: _Loaded,
        history: Sequence[Turn],
        message: Message,
        params: GenerationParams,
    ) -> Callable[[], Encoded]:
        def encode() -> Encoded:
            prompt = build_prompt(
                history,
                message,
                limits=self._limits,
                system_prompt=params.system_prompt,
                max_images=self._max_images,
                opener=self._recent_images,
            )
            inputs = self._encode(loaded, prompt)
            return make_encoded(dict(inputs), loaded.image_token_id, prompt.digests, prompt.image_count)

        return encode

    def _encode(self, loaded: _Loaded, prompt: Prompt) -> Any:
        processor_kwargs: dict[str, Any] = {}
        if prompt.images:
            limits = self._limits
            size = budget_size(
                loaded.processor,
                prompt.images,
                loaded.size,
                limits.max_visual_tokens,
                limits.token_pixels,
            )
            processor_kwargs = {"images": prompt.images, "size": size}
        return loaded.processor.apply_chat_template(
            prompt.messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            # user text cannot write <|im_end|>, <|image_pad|>, ...: they are encoded as text
            sanitize_control_tokens=True,
            processor_kwargs=processor_kwargs,
        )

    def _finish(self, request: Request, error: BaseException | None) -> None:
        """Called on the compute thread when a request ends (done, stopped or failed)."""
        pipe = request.pipe
        now = time.monotonic()
        started = request.started or now
        stats = StreamStats(
            prompt_tokens=request.prompt_tokens,
            visual_tokens=request.visual_tokens,
            completion_tokens=pipe.token_count,
            time_to_first_token_s=(pipe.first_token_at - started) if pipe.first_token_at else 0.0,
            total_s=now - started,
            finish_reason="length" if request.cut else "stop",
        )
        if request.started:
            self.last_stats = stats
            if request.session is not None and error is None:
                self._session_stats[request.session] = stats
                while len(self._session_stats) > MAX_KEPT_STATS:  # streams nobody asked about
                    self._session_stats.pop(next(iter(self._session_stats)), None)
            self.last_reused_tokens = request.reused_tokens
            decode_s = now - pipe.first_token_at if pipe.first_token_at else 0.0
            rate = (pipe.token_count - 1) / decode_s if decode_s > 0 else 0.0
            logger.info(
                "stream %s: prompt_tokens=%d reused_tokens=%d visual_tokens=%d images=%d"
                " completion_tokens=%d ttft_s=%.2f total_s=%.2f decode_tok_s=%.2f",
                "failed" if error else ("stopped" if request.stop.is_set() else "done"),
                stats.prompt_tokens,
                request.reused_tokens,
                stats.visual_tokens,
                request.images,
                stats.completion_tokens,
                stats.time_to_first_token_s,
                stats.total_s,
                rate,
            )
        if error is None:
            pipe.end()
        else:
            pipe.send(error)
        pipe.send(FINISHED)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
