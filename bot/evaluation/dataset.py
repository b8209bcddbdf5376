"""The evaluation set: generated images plus a manifest of what each one shows.

    eval_set = ensure_set(folder, seed=0)   # generate once, reuse while the files match
    for case in eval_set.cases: ...

`generate(folder, seed)` draws every case (bot.evaluation.screens, documents, scenes), writes the
images and `manifest.json` (labels and the SHA-256 of each file). The same seed gives the same bytes
(no timestamps, seeded randomness only, fixed fonts). `ensure_set` reuses a folder whose manifest
has the same version and seed and whose files still hash the same, else generates it anew.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from bot.evaluation.canvas import Drawn
from bot.evaluation.documents import extract_cases
from bot.evaluation.fonts import FONTS, check_fonts
from bot.evaluation.scenes import describe_cases
from bot.evaluation.screens import ocr_cases, triage_cases

SET_VERSION = 1  # bump when a case changes: cached sets of another version are regenerated
TASKS = ("ocr", "extract", "triage", "describe")
MANIFEST = "manifest.json"
# An EXIF orientation tag and the turn that stores an upright image so that a viewer applying
# the tag shows it upright again (6: the viewer turns it 90 degrees clockwise).
_STORED_TURN = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                8: Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class Case:
    id: str
    task: str  # one of TASKS; the preset asked (the user's /ocr, /extract, /triage, /describe)
    image: str  # file name in the set's folder
    sha256: str
    mime: str
    text: tuple[str, ...] = ()  # every line shown, in reading order
    fields: dict[str, Any] = field(default_factory=dict)
    items: tuple[str, ...] = ()
    keywords: tuple[tuple[str, ...], ...] = ()
    tags: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Case:
        return cls(
            id=data["id"], task=data["task"], image=data["image"], sha256=data["sha256"],
            mime=data["mime"], text=tuple(data.get("text", ())), fields=dict(data.get("fields", {})),
            items=tuple(data.get("items", ())),
            keywords=tuple(tuple(group) for group in data.get("keywords", ())),
            tags=tuple(data.get("tags", ())),
        )


@dataclass(frozen=True)
class EvalSet:
    folder: Path
    seed: int
    cases: tuple[Case, ...]

    def path(self, case: Case) -> Path:
        return self.folder / case.image

    def select(self, task: str | None = None, limit: int | None = None) -> list[Case]:
        """The cases of `task` (all tasks if None), at most `limit` of each task."""
        chosen: list[Case] = []
        for name in TASKS:
            if task is not None and name != task:
                continue
            of_task = [case for case in self.cases if case.task == name]
            chosen += of_task[:limit] if limit is not None else of_task
        return chosen


def default_folder(seed: int) -> Path:
    """Where generated sets are kept: $XDG_CACHE_HOME/vlbot/eval-set/v<version>-seed<seed>."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vlbot" / "eval-set" / f"v{SET_VERSION}-seed{seed}"


def encode(drawn: Drawn) -> tuple[bytes, str, str]:
    """(file bytes, mime type, suffix): PNG, or JPEG; turned and tagged for EXIF cases."""
    image = drawn.image
    exif = Image.Exif()
    if drawn.exif_orientation is not None:
        image = image.transpose(_STORED_TURN[drawn.exif_orientation])
        exif[0x0112] = drawn.exif_orientation
    buffer = io.BytesIO()
    if drawn.jpeg_quality is not None or drawn.exif_orientation is not None:
        image.save(buffer, format="JPEG", quality=drawn.jpeg_quality or 92, exif=exif.tobytes())
        return buffer.getvalue(), "image/jpeg", ".jpg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png", ".png"


def draw_all(seed: int) -> list[Drawn]:
    """Every case, drawn. Each family gets its own stream of randomness, so adding a case to one
    family leaves the others' bytes unchanged."""
    families = (ocr_cases, extract_cases, triage_cases, describe_cases)
    drawn: list[Drawn] = []
    for number, family in enumerate(families):
        drawn += family(random.Random(seed * 1000 + number))
    return drawn


def generate(folder: Path, seed: int = 0) -> EvalSet:
    """Draw the set into `folder` (created) and write its manifest. Raises FontMissing."""
    check_fonts()
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for drawn in draw_all(seed):
        data, mime, suffix = encode(drawn)
        name = f"{drawn.id}{suffix}"
        (folder / name).write_bytes(data)
        cases.append(Case(
            id=drawn.id, task=drawn.task, image=name, sha256=hashlib.sha256(data).hexdigest(),
            mime=mime, text=tuple(drawn.text), fields=drawn.fields, items=tuple(drawn.items),
            keywords=tuple(tuple(g) for g in drawn.keywords), tags=tuple(drawn.tags),
        ))
    manifest = {
        "version": SET_VERSION,
        "seed": seed,
        "fonts": {name: f"{entry.path} (Debian {entry.package})" for name, entry in FONTS.items()},
        "cases": [asdict(case) for case in cases],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n",
                                   encoding="utf-8")
    return EvalSet(folder, seed, tuple(cases))


def load(folder: Path) -> EvalSet:
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    return EvalSet(folder, int(manifest["seed"]),
                   tuple(Case.from_json(c) for c in manifest["cases"]))


def intact(folder: Path, seed: int) -> bool:
    """Whether `folder` holds this version's set for `seed`, every file as the manifest hashed it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("version") != SET_VERSION or manifest.get("seed") != seed:
            return False
        return all(
            hashlib.sha256((folder / c["image"]).read_bytes()).hexdigest() == c["sha256"]
            for c in manifest["cases"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_set(folder: Path | None = None, seed: int = 0) -> EvalSet:
    folder = folder or default_folder(seed)
    return load(folder) if intact(folder, seed) else generate(folder, seed)
