"""The fonts the evaluation set is drawn with, each from a Debian package.

DejaVu (fonts-dejavu-core), Liberation (fonts-liberation) and WenQuanYi Micro Hei for Chinese
(fonts-wqy-microhei). Nothing falls back to another font: a different font would give different
images, so a missing one stops the generator with the package to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

FONT_ROOT = Path("/usr/share/fonts/truetype")


@dataclass(frozen=True)
class FontFile:
    path: str  # under FONT_ROOT
    package: str  # the Debian package that ships it


FONTS: dict[str, FontFile] = {
    "sans": FontFile("dejavu/DejaVuSans.ttf", "fonts-dejavu-core"),
    "sans-bold": FontFile("dejavu/DejaVuSans-Bold.ttf", "fonts-dejavu-core"),
    "serif": FontFile("dejavu/DejaVuSerif.ttf", "fonts-dejavu-core"),
    "mono": FontFile("dejavu/DejaVuSansMono.ttf", "fonts-dejavu-core"),
    "liberation-sans": FontFile("liberation/LiberationSans-Regular.ttf", "fonts-liberation"),
    "liberation-sans-bold": FontFile("liberation/LiberationSans-Bold.ttf", "fonts-liberation"),
    "liberation-serif": FontFile("liberation/LiberationSerif-Regular.ttf", "fonts-liberation"),
    "liberation-mono": FontFile("liberation/LiberationMono-Regular.ttf", "fonts-liberation"),
    "cjk": FontFile("wqy/wqy-microhei.ttc", "fonts-wqy-microhei"),
}


class FontMissing(RuntimeError):
    """A font the evaluation set needs is not installed; the message names the package."""


def font_path(name: str, root: Path | None = None) -> Path:
    entry = FONTS[name]
    path = (root or FONT_ROOT) / entry.path
    if not path.is_file():
        raise FontMissing(
            f"the evaluation set needs the font {path} from the Debian package {entry.package}: "
            f"install it with `apt-get install {entry.package}` (scripts/test does this as root)"
        )
    return path


def check_fonts(root: Path | None = None) -> dict[str, str]:
    """Every font's file (raises FontMissing naming the first missing package)."""
    return {name: str(font_path(name, root)) for name in FONTS}


@lru_cache(maxsize=64)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size)
