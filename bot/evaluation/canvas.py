"""Drawing pages line by line, recording every line of text drawn (the ground truth for OCR)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from bot.evaluation.fonts import font

Colour = str | tuple[int, int, int]

LIGHT = {"background": "#ffffff", "panel": "#f3f4f6", "text": "#111827", "muted": "#4b5563",
         "accent": "#b91c1c", "button": "#2563eb", "button_text": "#ffffff", "rule": "#d1d5db"}
DARK = {"background": "#1e1e1e", "panel": "#2d2d30", "text": "#e5e7eb", "muted": "#a1a1aa",
        "accent": "#f87171", "button": "#3b82f6", "button_text": "#ffffff", "rule": "#52525b"}


@dataclass
class Drawn:
    """One case before it is written: the image and its labels."""

    id: str
    task: str  # ocr | extract | triage | describe
    image: Image.Image
    text: list[str] = field(default_factory=list)  # every line drawn, in reading order
    fields: dict[str, Any] = field(default_factory=dict)  # extract / triage: expected values
    items: list[str] = field(default_factory=list)  # extract: expected item names
    keywords: list[list[str]] = field(default_factory=list)  # describe: groups of synonyms
    tags: list[str] = field(default_factory=list)  # what it exercises: dark, zh, jpeg, exif ...
    jpeg_quality: int | None = None  # saved as JPEG (else PNG)
    exif_orientation: int | None = None  # stored turned, with this EXIF orientation tag


class Page:
    """A canvas drawn top to bottom; `lines` is what a perfect reader would transcribe."""

    def __init__(self, width: int, background: Colour, *, margin: int = 28, height: int = 2400):
        self.width = width
        self.margin = margin
        self.image = Image.new("RGB", (width, height), background)
        self.draw = ImageDraw.Draw(self.image)
        self.y = margin
        self.lines: list[str] = []

    def text(self, text: str, face: str, size: int, fill: Colour, *, right: str = "",
             centre: bool = False, x: int | None = None, gap: float = 0.6) -> None:
        """One line: `text` at the left (or centred), `right` flush right on the same row."""
        typeface = font(face, size)
        left = self.margin if x is None else x
        if centre:
            left = round((self.width - self.draw.textlength(text, font=typeface)) / 2)
        self.draw.text((left, self.y), text, font=typeface, fill=fill)
        if right:
            width = self.draw.textlength(right, font=typeface)
            self.draw.text((self.width - self.margin - width, self.y), right, font=typeface,
                           fill=fill)
        self.lines.append(" ".join(part for part in (text, right) if part))
        self.y += round(size * (1 + gap))

    def row(self, cells: list[str], columns: list[int], face: str, size: int, fill: Colour,
            gap: float = 0.8) -> None:
        """A table row: each cell at its column's x."""
        typeface = font(face, size)
        for cell, x in zip(cells, columns, strict=True):
            self.draw.text((x, self.y), cell, font=typeface, fill=fill)
        self.lines.append(" ".join(cells))
        self.y += round(size * (1 + gap))

    def button(self, label: str, x: int, face: str, size: int, fill: Colour, ink: Colour) -> int:
        """A button at (x, y) without advancing; returns the x after it. Not recorded: call
        `record` once for a row of buttons."""
        typeface = font(face, size)
        width = round(self.draw.textlength(label, font=typeface)) + 2 * size
        self.draw.rounded_rectangle((x, self.y, x + width, self.y + round(size * 2)), radius=6,
                                    fill=fill)
        self.draw.text((x + size, self.y + round(size * 0.45)), label, font=typeface, fill=ink)
        return x + width + size

    def record(self, line: str, advance: int) -> None:
        self.lines.append(line)
        self.y += advance

    def rule(self, colour: Colour, space: int = 12) -> None:
        self.y += space // 2
        self.draw.line((self.margin, self.y, self.width - self.margin, self.y), fill=colour, width=1)
        self.y += space // 2

    def skip(self, pixels: int) -> None:
        self.y += pixels

    def finish(self) -> Image.Image:
        return self.image.crop((0, 0, self.width, self.y + self.margin))


def add_noise(image: Image.Image, rng: random.Random, amount: int = 16) -> Image.Image:
    """A slight blur plus grey noise of +-`amount` levels, reproducible from `rng`."""
    noise = Image.frombytes("L", image.size, rng.randbytes(image.width * image.height))
    noise = noise.point(lambda v: v * 2 * amount // 255).convert("RGB")
    blurred = image.filter(ImageFilter.GaussianBlur(0.6))
    return ImageChops.add(blurred, noise, 1.0, -amount)
