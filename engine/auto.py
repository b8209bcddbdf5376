"""engine=auto: the vision-language model when its weights are here or can be downloaded, else
the OCR engine, with a notice the bot shows once per conversation and /health shows always.

`vlm_availability(model)` answers cheaply whether the VLM can be had: a local folder with a
config.json, a hub id already in the Hugging Face cache, or a hub id the hub answers for (skipped
when HF_HUB_OFFLINE is set). `AutoEngine` decides when it loads (in the background, so start-up
never waits on the network): it loads the VLM, and falls back to OCR when the VLM is unavailable
or its load fails. The engines are built by factories, so this module imports neither torch nor
onnxruntime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.engine_port import Engine, EngineError, EngineInfo, EngineNotReady, ModelNotFound
from bot.models import GenerationParams, Message, Turn
from engine.intake import IntakeLimits, check_image

logger = logging.getLogger("vlbot.engine.auto")

# The catalogue key of the one-time notice (bot.texts); engine/ does not import bot.texts.
FALLBACK_NOTICE = "engine_fallback_ocr"


@dataclass(frozen=True)
class Availability:
    available: bool
    where: str  # "local folder", "hf cache", "hub", or why not


def _looks_like_path(model: str) -> bool:
    """Not shaped like a hub id ("org/name")."""
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") != 1
        or (os.sep != "/" and os.sep in model)
    )


def names_a_folder(model: str) -> bool:
    """VLBOT_MODEL is a folder (existing or not), rather than a hub id; blocking (stat)."""
    return _looks_like_path(model) or Path(model).expanduser().exists()


def _hub_reachable(model: str, timeout_s: float) -> bool:
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model, timeout=timeout_s)
    except Exception as exc:  # offline, DNS, 401/404, timeouts ...
        logger.info("hub check for %s failed: %s", model, type(exc).__name__)
        return False
    return True


def vlm_availability(model: str, *, timeout_s: float = 5.0, check_hub: bool = True) -> Availability:
    """Whether the VLM `model` (a folder or a hub id) can be loaded here; blocking (network)."""
    path = Path(model).expanduser()
    if path.exists():
        if (path / "config.json").is_file():
            return Availability(True, "local folder")
        return Availability(False, f"{path} has no config.json")
    if _looks_like_path(model):
        return Availability(False, f"no such model folder: {path}")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return Availability(True, "hf cache")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return Availability(False, "not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    if check_hub and _hub_reachable(model, timeout_s):
        return Availability(True, "hub")
    return Availability(False, "not in the Hugging Face cache and the hub cannot be reached")


def unusable_folder(availability: Availability) -> str:
    """What to tell the operator when VLBOT_MODEL names a folder that cannot be loaded (ask,
    serve and doctor say the same)."""
    return (
        f"{availability.where} — point VLBOT_MODEL at a folder saved with save_pretrained or a "
        "hub id such as Qwen/Qwen3-VL-2B-Instruct (or set VLBOT_ENGINE=ocr)"
    )


def local_model_problem(model: str) -> str | None:
    """unusable_folder's text when `model` names a folder that is missing or not a saved model;
    None for a usable folder or a hub id (which is fetched on first use). Blocking (stat)."""
    if not names_a_folder(model):
        return None
    availability = vlm_availability(model, check_hub=False)
    return None if availability.available else unusable_folder(availability)


class AutoEngine:
    """The Engine protocol over whichever engine `load()` picks.

    Args:
        model: the VLM's folder or hub id (for the availability check).
        make_vlm / make_ocr: build the engines (called at most once each, in load()).
        limits: intake limits for `check()` before an engine is picked.
        probe: the availability check (tests pass a stub).
    """

    def __init__(
        self,
        model: str,
        make_vlm: Callable[[], Engine],
        make_ocr: Callable[[], Engine],
        *,
        limits: IntakeLimits | None = None,
        probe: Callable[[str], Availability] = vlm_availability,
    ) -> None:
        self._model = model
        self._make_vlm = make_vlm
        self._make_ocr = make_ocr
        self._limits = limits or IntakeLimits()
        self._probe = probe
        self._engine: Engine | None = None
        self._lock = asyncio.Lock()
        self._noticed: set[str] = set()
        self.fallback_reason: str | None = None

    # --- what /health and the CLI show --------------------------------------------------------

    @property
    def fallback(self) -> bool:
        """True when the OCR engine answers because the VLM is not available."""
        return self.fallback_reason is not None

    @property
    def notice(self) -> str | None:
        """The catalogue key of the fallback notice, or None while the VLM answers."""
        return FALLBACK_NOTICE if self.fallback else None

    def take_notice(self, session: str | None) -> str | None:
        """The notice's catalogue key the first time a conversation (`session`) asks, else None."""
        if not self.fallback:
            return None
        key = session or ""
        if key in self._noticed:
            return None
        self._noticed.add(key)
        return FALLBACK_NOTICE

    @property
    def chosen(self) -> Engine | None:
        return self._engine

    @property
    def last_stats(self) -> object:
        """The chosen engine's StreamStats of its last stream (None if it keeps none)."""
        return getattr(self._engine, "last_stats", None)

    def take_stats(self, session: str | None) -> object:
        """The chosen engine's take_stats (see QwenVLEngine.take_stats); None if it has none."""
        take = getattr(self._engine, "take_stats", None)
        return take(session) if take is not None else None

    # --- Engine protocol ------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        engine = self._engine
        if engine is None:
            return EngineInfo(name="auto", model=self._model, details={"engine": "not chosen yet"})
        inner = engine.info
        details = {**inner.details, "engine": "auto"}
        if self.fallback_reason:
            details["fallback"] = self.fallback_reason
        return EngineInfo(inner.name, inner.model, inner.dtype, inner.threads, details)

    @property
    def ready(self) -> bool:
        return self._engine is not None and self._engine.ready

    async def load(self) -> None:
        async with self._lock:
            if self._engine is not None and self._engine.ready:
                return
            availability, local = await asyncio.to_thread(
                lambda: (self._probe(self._model), names_a_folder(self._model))
            )
            if local and not availability.available:
                # a folder the operator named is a setting to fix, not a reason to fall back
                raise ModelNotFound(unusable_folder(availability))
            if availability.available:
                vlm = self._make_vlm()
                try:
                    await vlm.load()
                except EngineError as exc:
                    if local:
                        raise
                    logger.warning("the VLM %s did not load (%s); using OCR", self._model, exc)
                    await _close_quietly(vlm)
                    await self._use_ocr(f"{self._model} did not load: {exc}")
                    return
                self._engine = vlm
                logger.info("engine=auto: using the VLM %s (%s)", self._model, availability.where)
                return
            await self._use_ocr(f"{self._model}: {availability.where}")

    def check(self, message: Message) -> None:
        engine = self._engine
        if engine is not None:
            engine.check(message)
            return
        for part in message.images:
            check_image(part, self._limits)

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        engine = self._engine
        if engine is None or not engine.ready:
            raise EngineNotReady("no engine has been loaded yet")
        inner = engine.stream(history, message, params)
        async with contextlib.aclosing(inner):  # closing this stream stops the inner one too
            async for piece in inner:
                yield piece

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.close()

    async def _use_ocr(self, reason: str) -> None:
        ocr = self._make_ocr()
        await ocr.load()
        self._engine = ocr
        self.fallback_reason = reason
        logger.warning(
            "engine=auto: the vision-language model is not available (%s); answering with OCR"
            " only: the text found in images", reason
        )


async def _close_quietly(engine: Engine) -> None:
    try:
        await engine.close()
    except Exception as exc:
        logger.debug("closing the failed engine: %r", exc)
