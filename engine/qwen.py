"""QwenVLEngine: Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on CPU through Hugging Face transformers.

One code path for every family: `AutoModelForImageTextToText` and the processor class transformers
maps the model's config to (loaded without its torchvision-only video processor). The model comes
from a local folder or a hub id (downloaded into the HF cache on first use).

Generation runs in a worker thread, one `generate` at a time (a lock: the model object holds
per-call state such as Qwen's rope deltas, and two calls would only share the same cores anyway).
Text pieces flow back to the async generator through a queue. Closing or cancelling the
generator sets a stop flag that ends generation at the next token, or mid-forward through abort
hooks, and the generator waits for the worker to finish before it returns.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from bot.models import GenerationParams, InputRejected, Message, Turn
from engine.base import EngineError, EngineInfo, EngineNotReady, ModelNotFound, StreamStats
from engine.intake import IntakeLimits, check_image
from engine.loading import (
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
from engine.prompt import Prompt, build_prompt
from engine.streaming import FINISHED, Aborted, StopFlag, TokenPipe, install_abort_hooks

logger = logging.getLogger("vlbot.engine")


@dataclass
class _Loaded:
    model: Any
    processor: Any
    source: ModelSource
    dtype: torch.dtype
    image_token_id: int
    size: dict[str, int]
    architecture: str


@dataclass
class _Run:
    """One stream's shared state between the event loop and the worker thread."""

    stop: threading.Event
    done: asyncio.Future[None]
    started: float = 0.0
    prompt_tokens: int = 0
    visual_tokens: int = 0
    images: int = 0


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
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        threads: int | None = None,
        limits: IntakeLimits | None = None,
        max_images: int | None = 8,
    ) -> None:
        self._model_name = model
        self._dtype = resolve_dtype(dtype)  # ValueError for a bad name, before any loading
        self._threads = threads if threads and threads > 0 else physical_cores()
        self._limits = limits or IntakeLimits()
        self._max_images = max_images
        self._loaded: _Loaded | None = None
        self._load_lock = asyncio.Lock()
        self._generate_lock = threading.Lock()
        self._active_stop: threading.Event | None = None
        self._closed = False
        self.last_stats: StreamStats | None = None
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
        }
        if loaded is not None:
            details["architecture"] = loaded.architecture
            details["source"] = loaded.source.kind
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

    async def load(self) -> None:
        async with self._load_lock:
            if self._loaded is not None:
                return
            if self._closed:
                raise EngineNotReady("the engine is closed")
            self._loaded = await asyncio.to_thread(self._load_blocking)

    def check(self, message: Message) -> None:
        for part in message.images:
            check_image(part, self._limits)

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncIterator[str]:
        loaded = self._loaded
        if loaded is None or self._closed:
            raise EngineNotReady("the model is not loaded" if not self._closed else "closed")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        run = _Run(stop=threading.Event(), done=loop.create_future())
        pipe = TokenPipe(loaded.processor.tokenizer, loop, queue)
        worker = threading.Thread(
            target=self._work,
            args=(loaded, run, pipe, history, message, params),
            name="vlbot-generate",
            daemon=True,
        )
        worker.start()
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
            run.stop.set()
            await asyncio.shield(run.done)

    async def close(self) -> None:
        self._closed = True
        active = self._active_stop
        if active is not None:
            active.set()
        await asyncio.to_thread(self._wait_idle)
        self._loaded = None

    # --- loading ---------------------------------------------------------------------------------

    def _load_blocking(self) -> _Loaded:
        from transformers import AutoConfig, AutoModelForImageTextToText

        started = time.monotonic()
        torch.set_num_threads(self._threads)
        source = resolve_source(self._model_name)
        logger.info(
            "loading %s (%s, %d threads)", source, dtype_name(self._dtype), self._threads
        )
        try:
            config = AutoConfig.from_pretrained(source.location)
            processor = load_processor(source.location, config)
            auto_model: Any = AutoModelForImageTextToText
            model = auto_model.from_pretrained(
                source.location, config=config, dtype=self._dtype
            )
        except ModelNotFound:
            raise
        except Exception as e:  # OSError, ValueError, safetensors/json errors, hub errors, ...
            raise load_failure(source, e) from e
        model.eval()
        install_abort_hooks(model, self._should_abort)
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

    # --- generation (worker thread) ----------------------------------------------------------

    def _should_abort(self) -> bool:
        active = self._active_stop
        return active is not None and active.is_set()

    def _wait_idle(self) -> None:
        with self._generate_lock:
            pass

    def _work(
        self,
        loaded: _Loaded,
        run: _Run,
        pipe: TokenPipe,
        history: Sequence[Turn],
        message: Message,
        params: GenerationParams,
    ) -> None:
        error: BaseException | None = None
        try:
            with self._generate_lock:
                if run.stop.is_set():
                    return
                if self._closed:
                    raise EngineNotReady("the engine was closed")
                self._active_stop = run.stop
                try:
                    self._generate(loaded, run, pipe, history, message, params)
                finally:
                    self._active_stop = None
        except Aborted:
            pass
        except BaseException as e:  # handed to the consumer, raised there
            error = e
        finally:
            self._finish(run, pipe, error)

    def _generate(
        self,
        loaded: _Loaded,
        run: _Run,
        pipe: TokenPipe,
        history: Sequence[Turn],
        message: Message,
        params: GenerationParams,
    ) -> None:
        run.started = time.monotonic()
        torch.set_num_threads(self._threads)
        prompt = build_prompt(
            history,
            message,
            limits=self._limits,
            system_prompt=params.system_prompt,
            max_images=self._max_images,
        )
        inputs = self._encode(loaded, prompt)
        input_ids = inputs["input_ids"]
        run.prompt_tokens = int(input_ids.shape[1])
        run.visual_tokens = int((input_ids == loaded.image_token_id).sum())
        run.images = prompt.image_count
        if run.stop.is_set():
            return
        with torch.inference_mode():
            loaded.model.generate(
                **inputs,
                **_sampling(params),
                max_new_tokens=max(1, params.max_new_tokens),
                streamer=pipe,
                stopping_criteria=[StopFlag(run.stop)],
            )

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

    def _finish(self, run: _Run, pipe: TokenPipe, error: BaseException | None) -> None:
        now = time.monotonic()
        started = run.started or now
        stats = StreamStats(
            prompt_tokens=run.prompt_tokens,
            visual_tokens=run.visual_tokens,
            completion_tokens=pipe.token_count,
            time_to_first_token_s=(pipe.first_token_at - started) if pipe.first_token_at else 0.0,
            total_s=now - started,
        )
        if run.started:
            self.last_stats = stats
            decode_s = now - pipe.first_token_at if pipe.first_token_at else 0.0
            rate = (pipe.token_count - 1) / decode_s if decode_s > 0 else 0.0
            logger.info(
                "stream %s: prompt_tokens=%d visual_tokens=%d images=%d completion_tokens=%d"
                " ttft_s=%.2f total_s=%.2f decode_tok_s=%.2f",
                "failed" if error else ("stopped" if run.stop.is_set() else "done"),
                stats.prompt_tokens,
                stats.visual_tokens,
                run.images,
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
        try:
            run.done.get_loop().call_soon_threadsafe(_resolve, run.done)
        except RuntimeError:  # the event loop is gone
            pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _sampling(params: GenerationParams) -> dict[str, Any]:
    if params.temperature <= 0:
        # greedy; clear sampling settings a model's generation_config may carry
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": float(params.temperature)}
