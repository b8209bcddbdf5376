"""Everything about getting a Qwen-VL model into memory: CPU features, dtype, threads, the model
source (hub id or local folder), the processor, and turning load failures into one-sentence fixes.

Kept apart from the engine so `vlbot doctor` can reuse `cpu_supports_bf16`, `resolve_dtype`,
`physical_cores` and `resolve_source` without loading anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from bot.engine_port import ModelNotFound
from engine.cpu.kernels.bf16_kernel import load_kernel as load_bf16_kernel
from engine.cpu.tiers import active_tier, parse_cpu_flags

logger = logging.getLogger("vlbot.engine")

DEFAULT_MODEL = "Qwen/Qwen3-VL-2B-Instruct"
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
_FIX = (
    "point VLBOT_MODEL at a folder saved with save_pretrained or a hub id such as " + DEFAULT_MODEL
)


# --- hardware ----------------------------------------------------------------------------------


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX): the active CPU tier's
    (engine.cpu.tiers, so VLBOT_CPU=avx2 says no), or that of the /proc/cpuinfo text given."""
    if cpuinfo is None:
        return active_tier().bf16_arithmetic
    return bool(parse_cpu_flags(cpuinfo) & _BF16_FLAGS)


def onednn_decodes_faster(cpuinfo: str | None = None) -> bool:
    """Whether to keep oneDNN for single-row bf16 decode steps. Measured on full-size Qwen3-VL-2B:
    with AMX (Intel Sapphire Rapids) oneDNN decodes at 4.6 tok/s against 3.4 with torch's native
    kernel; without AMX (AMD EPYC, AVX512-BF16 only) the native kernel reads weights about twice
    as fast (6.7 against 3.8 tok/s). A one-matrix timing at load picked wrongly here, so the
    rule follows the CPU's flags."""
    flags = active_tier().features if cpuinfo is None else parse_cpu_flags(cpuinfo)
    return "amx_bf16" in flags or not flags & _BF16_FLAGS


def resolve_dtype(name: str = "auto", cpuinfo: str | None = None) -> torch.dtype:
    """"auto" → bfloat16 where the CPU tier has native bf16, or where it has the bf16 kernel that
    lets a bf16 model compute in float32 (engine.cpu.half_weights: half the memory and bytes per
    decode step of float32 weights), else float32; or an explicit name. With `cpuinfo` given,
    only that text's bf16 flags decide (no kernel is built)."""
    key = name.strip().lower()
    if key == "auto":
        if cpu_supports_bf16(cpuinfo):
            return torch.bfloat16
        if cpuinfo is None and load_bf16_kernel() is not None:
            return torch.bfloat16
        return torch.float32
    if key in DTYPE_NAMES:
        return DTYPE_NAMES[key]
    raise ValueError(f"unknown dtype {name!r}: use auto, float32 or bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return max(1, allowed)
    cores: set[tuple[str, str]] = set()
    logical = 0
    physical = core = ""
    for line in [*cpuinfo.splitlines(), ""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            logical += 1
        elif key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip() and core:
            cores.add((physical, core))
            physical = core = ""
    if not cores or not logical:
        return max(1, allowed)
    # Scale to the CPUs we may use (a container may see all of the host's cores in cpuinfo).
    per_core = max(1, logical // len(cores))
    return max(1, min(len(cores), allowed // per_core or 1))


# --- model source ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a local folder, or a hub id (downloaded into the HF cache)."""

    kind: Literal["folder", "hub"]
    location: str

    def __str__(self) -> str:
        return self.location if self.kind == "hub" else f"folder {self.location}"


def resolve_source(model: str) -> ModelSource:
    """Decide whether `model` is a local folder or a hub id; check a folder's files cheaply."""
    text = model.strip()
    if not text:
        raise ModelNotFound(f"no model configured — {_FIX}")
    path = Path(text).expanduser()
    if path.exists() or text.startswith(("/", ".", "~")) or not _HUB_ID.match(text):
        return ModelSource("folder", str(check_folder(path)))
    return ModelSource("hub", text)


def check_folder(path: Path) -> Path:
    """The folder must hold a readable config.json (with a model_type) and weight files."""
    if not path.exists():
        raise ModelNotFound(f"model folder {path.absolute()} does not exist — {_FIX}")
    if not path.is_dir():
        raise ModelNotFound(f"model path {path} is a file, not a folder — {_FIX}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelNotFound(f"model folder {path} has no config.json — {_FIX}")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelNotFound(
            f"model folder {path} has an unreadable config.json ({_short(e)}) — re-save the model"
            f" with save_pretrained or download it again, or {_FIX}"
        ) from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise ModelNotFound(
            f"model folder {path} has a config.json without a model_type — re-save the model with"
            f" save_pretrained or download it again, or {_FIX}"
        )
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ModelNotFound(
            f"model folder {path} has no weights (*.safetensors) — copy the complete model"
            f" folder, or {_FIX}"
        )
    return path.resolve()


def load_failure(source: ModelSource, error: BaseException) -> ModelNotFound:
    """Turn an exception raised while loading into ModelNotFound with one sentence naming the fix."""
    if source.kind == "folder":
        return ModelNotFound(
            f"model {source} could not be loaded ({_short(error)}) — re-save it with"
            f" save_pretrained or download it again, or {_FIX}"
        )
    from huggingface_hub import constants

    name = source.location
    kinds = {type(e).__name__ for e in _chain(error)}
    text = " ".join(str(e) for e in _chain(error)).lower()
    if "GatedRepoError" in kinds:
        return ModelNotFound(
            f"{name} on the Hugging Face hub needs an access token — run `hf auth login` or set"
            " HF_TOKEN, or point VLBOT_MODEL at a local folder saved with save_pretrained"
        )
    if "RepositoryNotFoundError" in kinds or "is not a valid model identifier" in text:
        return ModelNotFound(
            f"there is no model {name} on the Hugging Face hub — check the id (for example"
            f" {DEFAULT_MODEL}) or point VLBOT_MODEL at a local folder saved with save_pretrained"
        )
    if kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} or "connect" in text:
        return ModelNotFound(
            f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub"
            " cannot be reached — connect to the internet once so it is downloaded, or point"
            " VLBOT_MODEL at a local folder saved with save_pretrained"
        )
    return ModelNotFound(
        f"cannot load {name} from the Hugging Face hub ({_short(error)}) — check the id, or point"
        " VLBOT_MODEL at a local folder saved with save_pretrained"
    )


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- processor ---------------------------------------------------------------------------------


def image_only_processor_class(config: Any) -> type[Any]:
    """The processor class AutoProcessor would pick for `config`, without its video processor.

    Qwen-VL processors take (image_processor, tokenizer, video_processor); the video processors
    need torchvision, which a CPU install must not pull in (PyPI's torchvision wheels are built
    against CUDA torch). vlbot never sends video, so the subclass drops that argument: the
    processor loads only the tokenizer and the image processor (whose PIL backend needs nothing).
    """
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    mapping: Any = PROCESSOR_MAPPING
    try:
        base: type[Any] = mapping[type(config)]
    except KeyError:
        raise ModelNotFound(
            f"model type {getattr(config, 'model_type', '?')!r} has no image-text processor in"
            f" transformers — {_FIX}"
        ) from None

    def __init__(
        self: Any,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__})


def load_tokenizer(location: str) -> Any | None:
    """The tokenizer as its tokenizer.json describes it, read in one pass by the tokenizers library
    (transformers' `TokenizersBackend`, which it also uses for Pixtral's published tokenizers), or
    None where the model has no tokenizer.json (the processor then loads its own).

    The class tokenizer_config.json names (Qwen2Tokenizer) reads the same file with Python's json
    and rebuilds the byte-level BPE from its vocabulary and merges. With a tokenizer of the
    published size (`vlbot dev make-model --size full`: 151,665 tokens, 12.7 MB) on the Zen3,
    the processor's load took 1.00 s of CPU that way against 0.52 s this way (medians of 8
    alternations in one process), 1.10 against 0.77 s as the first in a new process (6 of 6
    alternations; nearly all of it the tokenizers library reading the file),
    with the same token ids, special tokens, chat template and decoding
    (tests/test_tokenizer_loading.py)."""
    from transformers import TokenizersBackend
    from transformers.utils.hub import cached_file

    if cached_file(location, "tokenizer.json", _raise_exceptions_for_missing_entries=False) is None:
        return None
    return TokenizersBackend.from_pretrained(location)


def load_processor(location: str, config: Any) -> Any:
    tokenizer = load_tokenizer(location)
    processor_class = image_only_processor_class(config)
    if tokenizer is None:
        processor = processor_class.from_pretrained(location)
    else:
        processor = processor_class.from_pretrained(location, tokenizer=tokenizer)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # for batched generation: prompts end at the same column
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def visual_token_pixels(processor: Any) -> int:
    """Pixels one visual token covers: (patch_size * merge_size) ** 2 (32² Qwen3-VL, 28² 2.5)."""
    image_processor = processor.image_processor
    side = int(image_processor.patch_size) * int(image_processor.merge_size)
    return side * side


def processor_size(processor: Any, max_pixels: int) -> dict[str, int]:
    """The image processor's size bounds with the upper one set to the pixel budget.

    The lower bound (Qwen3-VL: 64 tokens) is kept so small images are still scaled up as the
    model expects; `budget_size` covers the case where that would overshoot the budget.
    """
    size = processor.image_processor.size
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size.shortest_edge
    lower = int(shortest) if shortest else max_pixels
    return {"shortest_edge": min(lower, max_pixels), "longest_edge": max_pixels}


def image_tokens(processor: Any, height: int, width: int, size: dict[str, int]) -> int:
    """Visual tokens the processor makes of a height x width image with these size bounds."""
    image_processor = processor.image_processor
    bounds = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
    patches = int(image_processor.get_number_of_image_patches(height, width, bounds))
    return patches // int(image_processor.merge_size) ** 2


def budget_size(
    processor: Any, images: Sequence[Any], size: dict[str, int], max_tokens: int, token_pixels: int
) -> dict[str, int]:
    """`size`, or bounds that never scale up, when scaling up a small image (to the processor's
    minimum) would round past `max_tokens` for one of `images` (PIL images)."""
    if all(image_tokens(processor, i.height, i.width, size) <= max_tokens for i in images):
        return size
    return {"shortest_edge": token_pixels, "longest_edge": size["longest_edge"]}
