"""Quantize once, keep the result: the language model's quantized layers saved beside the model.

The first start with `quantize=int8|int4` quantizes the language model (engine.cpu.quant) and
writes its quantized layers (packed weights, scales, biases) to one safetensors file in the cache
folder (`VLBOT_QUANT_CACHE`, else `$XDG_CACHE_HOME/vlbot/quantized`, else
`~/.cache/vlbot/quantized`; `VLBOT_QUANT_CACHE=off` keeps nothing). Later starts map that file
(safetensors maps it; pages are read as the layers are used) and put its layers in place of the
bf16 ones, whose weights are never read, so a start neither quantizes nor holds both copies.

The file's name is a hash of what its content depends on, and its metadata repeats it:
- `FORMAT_VERSION` (raise it when the packed layouts or the quantization change),
- the mode, the model's dtype (biases follow it) and torch's version (layers the byte kernels
  cannot take keep torch's packing),
- the source model: its config.json's SHA-256 and each weight file's name, size and mtime.
A changed model or format gives another name, so it is quantized again; a file that cannot be
read or does not match the model (truncated, damaged header, other shapes) is logged, deleted and
rebuilt. The packed layouts are the same on every CPU tier (one kernel source), so the file is
too; where the byte kernels do not build (no C compiler), layers are quantized at every start into
torch's layouts and nothing is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.cpu.hugepages import file_mappings, release_file_pages
from engine.cpu.quant import (
    Int4Linear,
    Int8Linear,
    Quantize,
    check_mode,
    int4_group,
    load_mode_kernel,
    quantizable,
    quantize_in_place,
)

logger = logging.getLogger("vlbot.engine")

FORMAT = "vlbot-quantized"
FORMAT_VERSION = 2  # 2: the int4 kernel's scales and lows in float16 (float32 in 1)
ENVIRONMENT = "VLBOT_QUANT_CACHE"
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


class StoreMismatch(ValueError):
    """A saved file that does not belong to this model, mode or format."""


def cache_root() -> Path | None:
    """Where quantized models are kept (None: `VLBOT_QUANT_CACHE=off`)."""
    configured = os.environ.get(ENVIRONMENT, "").strip()
    if configured.lower() in ("off", "none", "0", "false", "no"):
        return None
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlbot" / "quantized"


def model_folder(model: Any) -> Path | None:
    """The folder the model's weights were loaded from: a local folder, or the hub cache's
    snapshot of a hub id; None where it cannot be found."""
    name = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", ""))
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name).resolve()
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub library refuses: nothing to key the file on
        return None
    return Path(config).parent if isinstance(config, str) else None


def source_identity(folder: Path) -> dict[str, Any]:
    """What identifies the source model's weights: config.json's hash and the weight files'
    names, sizes and modification times."""
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern)})
    stats = {p.name: p.stat() for p in files}
    return {
        "config_sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        "files": {name: [s.st_size, s.st_mtime_ns] for name, s in stats.items()},
    }


def store_key(mode: Quantize, dtype: torch.dtype, identity: dict[str, Any]) -> dict[str, str]:
    """The metadata a saved file carries (and its name's hash is taken of)."""
    return {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,  # torch's own packing (layers the byte kernels cannot take)
        "source": json.dumps(identity, sort_keys=True),
    }


def store_path(root: Path, key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / f"{key['mode']}-{digest}.safetensors"


def _layer_spec(module: Int8Linear | Int4Linear) -> dict[str, Any]:
    spec: dict[str, Any] = {"out": module.out_features, "in": module.in_features}
    spec["layout"] = "vlbot" if getattr(module, "_kernel", None) is not None else "torch"
    if isinstance(module, Int4Linear):
        spec["group"] = module.group
    return spec


def save(
    path: Path, key: dict[str, str], layers: dict[str, Int8Linear | Int4Linear], folder: Path | None = None
) -> int:
    """Write `layers` (path -> quantized module) to `path` atomically, noting the model's `folder`
    (for `remove_superseded`); returns its size."""
    tensors = {
        f"{name}.{part}": tensor.contiguous()
        for name, module in layers.items()
        for part, tensor in [*module.named_buffers(), *module.named_parameters()]
    }
    specs = {name: _layer_spec(module) for name, module in layers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        metadata = {**key, "layers": json.dumps(specs, sort_keys=True)}
        if folder is not None:
            metadata["folder"] = str(folder)
        save_file(tensors, str(scratch), metadata=metadata)
        os.replace(scratch, path)  # atomic: a reader sees the whole file or none
    finally:
        scratch.unlink(missing_ok=True)
    return path.stat().st_size


def _expected_shapes(mode: Quantize, spec: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """The tensors a layer's entry holds and their shapes (None: torch's own packing, any shape)."""
    n, k = spec["out"], spec["in"]
    if spec["layout"] == "torch":
        if mode == "int8":
            return {"qweight": (n, k), "scale": (n,)}
        return {"packed": None, "scales_zeros": (k // spec["group"], n, 2)}
    if mode == "int8":
        return {"packed": (n // 16, k // 4, 64), "scales": (n,)}
    blocks, groups = n // 16, k // spec["group"]
    return {"packed": (blocks, k // 8, 64), "scales": (blocks, groups, 16), "lows": (blocks, groups, 16)}


def load(
    path: Path, key: dict[str, str], model: Any, mode: Quantize, kernel: Any
) -> dict[str, Int8Linear | Int4Linear]:
    """The quantized layers saved in `path`, mapped, checked against `model` before anything is
    replaced; then swapped in. Raises StoreMismatch (or safetensors' / the OS's errors)."""
    layers: dict[str, tuple[nn.Module, str, Int8Linear | Int4Linear]] = {}
    with safe_open(str(path), framework="pt") as saved:
        metadata = saved.metadata() or {}
        differing = [name for name, value in key.items() if metadata.get(name) != value]
        if differing:
            raise StoreMismatch(f"saved for another {', '.join(differing)}")
        specs = json.loads(metadata.get("layers", "{}"))
        names = set(saved.keys())
        for name, parent, attribute, linear in quantizable(model):
            spec = specs.get(name)
            if spec is None:
                continue
            if (spec["out"], spec["in"]) != (linear.out_features, linear.in_features):
                raise StoreMismatch(f"{name} is {spec['out']}x{spec['in']} in the file")
            tensors = {}
            for part, shape in _expected_shapes(mode, spec).items():
                tensor = saved.get_tensor(f"{name}.{part}")
                if shape is not None and tuple(tensor.shape) != shape:
                    raise StoreMismatch(f"{name}.{part} has shape {tuple(tensor.shape)}, not {shape}")
                tensors[part] = tensor
            if f"{name}.bias" in names:
                tensors["bias"] = saved.get_tensor(f"{name}.bias")
            layer_kernel = kernel if spec["layout"] == "vlbot" else None
            if mode == "int8":
                module: Int8Linear | Int4Linear = Int8Linear(spec["out"], spec["in"], tensors, layer_kernel)
            else:
                module = Int4Linear(spec["out"], spec["in"], spec["group"], tensors, layer_kernel)
            layers[name] = (parent, attribute, module)
        missing = set(specs) - set(layers)
        if missing:
            raise StoreMismatch(f"the model has no layer {sorted(missing)[0]}")
    mappings = file_mappings()
    for name, (parent, attribute, module) in layers.items():
        replaced = getattr(parent, attribute)
        setattr(parent, attribute, module)
        if name != "lm_head":  # the head's weights are the embedding's too
            release_file_pages([replaced.weight.data], mappings)
    return {name: module for name, (_, _, module) in layers.items()}


def quantize_language_model(model: Any, mode: str) -> int:
    """Replace the language model's nn.Linear layers (and the output head) in place with `mode`'s
    quantized layers: from the saved file where there is one for this model, else quantized now
    (and saved). Returns how many layers were replaced; 0 for "none". Layers whose shape the
    kernels cannot take are left as they are."""
    key = check_mode(mode)
    return 0 if key == "none" else load_or_quantize(model, key)


def load_or_quantize(model: Any, mode: Quantize) -> int:
    """Put `mode`'s quantized layers into `model`: from the saved file where there is one for this
    model, else quantized now (and saved). Returns how many layers were replaced."""
    started = time.monotonic()
    kernel = load_mode_kernel(mode)
    dtype = next(model.model.language_model.parameters()).dtype
    root = cache_root() if kernel is not None else None
    folder = model_folder(model) if root is not None else None
    path = key = None
    if root is not None and folder is not None:
        try:
            key = store_key(mode, dtype, source_identity(folder))
            path = store_path(root, key)
        except OSError as e:
            logger.warning("cannot identify the model in %s for its saved quantized weights (%s)", folder, e)
    if path is not None and key is not None and path.exists():
        try:
            layers = load(path, key, model, mode, kernel)
        except Exception as e:  # damaged or foreign file: rebuilt below
            logger.warning("saved quantized weights %s are unusable (%s); quantizing again", path, e)
            path.unlink(missing_ok=True)
        else:
            logger.info(
                "loaded %d %s language-model layers from %s (%s kernel, %.1f s)",
                len(layers), mode, path, _kernel_name(kernel), time.monotonic() - started,
            )  # fmt: skip
            return len(layers)
    layers = quantize_in_place(model, mode, kernel)
    logger.info(
        "quantized %d language-model layers to %s (weight-only, %s kernel) in %.1f s",
        len(layers), mode, _kernel_name(kernel), time.monotonic() - started,
    )  # fmt: skip
    if path is not None and key is not None:
        try:
            size = save(path, key, layers, folder)
        except OSError as e:
            logger.warning("could not save the quantized weights to %s (%s)", path, e)
        else:
            logger.info(
                "saved the quantized weights to %s (%.2f GB): later starts load them", path, size / 1e9
            )
            remove_superseded(path, key, folder)
    return len(layers)


def remove_superseded(path: Path, key: dict[str, str], folder: Path | None = None) -> None:
    """Delete the saved files that `path` replaces, which this code would never load again (each
    is a language model's size): for the same mode, dtype and torch, the same model in another
    format version, or those saved from the same model `folder` before its weights or config
    changed (a new download, a model made again). Files of other models or another torch stay
    (another install may share the folder)."""
    same = ("format", "mode", "dtype", "torch")
    for other in path.parent.glob(f"{key['mode']}-*.safetensors"):
        if other == path:
            continue
        try:
            with safe_open(str(other), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # not ours or damaged: left alone (a load would say so)
            continue
        if not all(meta.get(k) == key[k] for k in same):
            continue
        if meta.get("source") == key["source"] and meta.get("version") != key["version"]:
            why = f"quantized weights of format version {meta.get('version')}, superseded"
        elif folder is not None and meta.get("folder") == str(folder):
            why = f"quantized weights of the model in {folder} before it changed, superseded"
        else:
            continue
        other.unlink(missing_ok=True)
        logger.info("removed %s: %s", other, why)


def _kernel_name(kernel: Any) -> str:
    return f"vlbot {kernel.isa}" if kernel is not None else "torch"


__all__ = ["cache_root", "int4_group", "load_or_quantize", "quantize_language_model", "source_identity"]
