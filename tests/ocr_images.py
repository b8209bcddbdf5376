"""Generated screenshots for OCR tests and the accuracy/time measurement.

Each sample is an image plus the strings a reader must find in it. Fonts are Debian's DejaVu and
Liberation (fonts-dejavu-core, fonts-liberation); a missing one is skipped, and with none at all
Pillow's bundled font stands in.

    python -m tests.ocr_images      # OCR accuracy and time per image on the whole generated set
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
FONT_FILES = {
    "DejaVu Sans": "DejaVuSans.ttf",
    "DejaVu Serif": "DejaVuSerif.ttf",
    "DejaVu Sans Mono": "DejaVuSansMono.ttf",
    "Liberation Sans": "LiberationSans-Regular.ttf",
    "Liberation Serif": "LiberationSerif-Regular.ttf",
    "Liberation Mono": "LiberationMono-Regular.ttf",
}
LIGHT = {"background": "#ffffff", "panel": "#f3f4f6", "text": "#111827", "muted": "#4b5563",
         "accent": "#b91c1c", "button": "#2563eb", "button_text": "#ffffff"}
DARK = {"background": "#1e1e1e", "panel": "#2d2d30", "text": "#e5e7eb", "muted": "#a1a1aa",
        "accent": "#f87171", "button": "#3b82f6", "button_text": "#ffffff"}

ERROR_LINES = (
    "Payment failed",
    "Error 402: Your card was declined.",
    "Request ID: req_8f3K29xQ",
    "Please update your billing details and try again.",
)


@dataclass(frozen=True)
class Sample:
    name: str
    image: Image.Image
    expected: tuple[str, ...]

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


def font_path(name: str) -> Path | None:
    for folder in FONT_DIRS:
        path = folder / FONT_FILES[name]
        if path.is_file():
            return path
    return None


def available_fonts() -> list[str]:
    return [name for name in FONT_FILES if font_path(name) is not None]


def load_font(name: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = font_path(name) if name else None
    if path is None:
        return ImageFont.load_default(size)
    return ImageFont.truetype(str(path), size)


def error_dialog(font: str | None, size: int, *, dark: bool = False) -> Sample:
    """An app's error dialog: title, message, request id, hint and two buttons."""
    theme = DARK if dark else LIGHT
    regular = load_font(font, size)
    title = load_font(font, round(size * 1.4))
    line_h = round(size * 2.0)
    width = max(640, round(size * 34))
    height = round(line_h * 7.5)
    image = Image.new("RGB", (width, height), theme["background"])
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((10, 10, width - 10, height - 10), radius=12, fill=theme["panel"])
    x, y = 32, 28
    draw.text((x, y), ERROR_LINES[0], font=title, fill=theme["accent"])
    y += round(line_h * 1.4)
    draw.text((x, y), ERROR_LINES[1], font=regular, fill=theme["text"])
    y += line_h
    draw.text((x, y), ERROR_LINES[2], font=regular, fill=theme["muted"])
    y += line_h
    draw.text((x, y), ERROR_LINES[3], font=regular, fill=theme["text"])
    y += round(line_h * 1.3)
    for index, label in enumerate(("Cancel", "Retry")):
        left = x + index * round(size * 8)
        box = (left, y, left + round(size * 7), y + round(size * 2.2))
        draw.rounded_rectangle(box, radius=6, fill=theme["button"])
        draw.text((left + size, y + round(size * 0.5)), label, font=regular,
                  fill=theme["button_text"])
    name = f"dialog {font or 'default'} {size}px {'dark' if dark else 'light'}"
    return Sample(name, image, (*ERROR_LINES, "Cancel", "Retry"))


def settings_page(fonts: list[str], sizes: tuple[int, ...] = (14, 18, 24)) -> Sample:
    """One page, many rows: each font at each size (fewer images to read in the fast tests)."""
    rows = [(f, s) for f in fonts for s in sizes]
    line_h = [round(s * 2.0) for _, s in rows]
    image = Image.new("RGB", (900, 40 + sum(line_h)), "#ffffff")
    draw = ImageDraw.Draw(image)
    y = 20
    expected = []
    for number, ((font, size), height) in enumerate(zip(rows, line_h, strict=True), 1):
        text = f"Setting {number}: Enable sync for {size}px"
        draw.text((24, y), text, font=load_font(font, size), fill="#111111")
        expected.append(text)
        y += height
    return Sample("settings page, mixed fonts and sizes", image, tuple(expected))


RECEIPT_ITEMS = (("Espresso", "2", "5.00"), ("Croissant", "1", "3.20"), ("Orange juice", "1", "4.50"))


def receipt(font: str | None = "DejaVu Sans", size: int = 18) -> Sample:
    """A till receipt: merchant, date, items with right-aligned prices, total."""
    regular = load_font(font, size)
    bold = load_font(font, round(size * 1.3))
    width, line_h = round(size * 24), round(size * 1.8)
    lines = 9 + len(RECEIPT_ITEMS)
    image = Image.new("RGB", (width, line_h * lines + 40), "#fbfaf5")
    draw = ImageDraw.Draw(image)
    y = 20

    def row(left: str, right: str = "", font_: ImageFont.FreeTypeFont | ImageFont.ImageFont = regular,
            centre: bool = False) -> None:
        nonlocal y
        if centre:
            length = draw.textlength(left, font=font_)
            draw.text(((width - length) / 2, y), left, font=font_, fill="#222222")
        else:
            draw.text((20, y), left, font=font_, fill="#222222")
        if right:
            length = draw.textlength(right, font=font_)
            draw.text((width - 20 - length, y), right, font=font_, fill="#222222")
        y += line_h

    row("CAFE AURORA", font_=bold, centre=True)
    row("12 Harbour Street", centre=True)
    row("2024-03-15  08:42")
    y += line_h // 2
    for name, quantity, price in RECEIPT_ITEMS:
        row(f"{quantity} x {name}", price)
    y += line_h // 2
    row("SUBTOTAL", "12.70")
    row("VAT 10%", "1.27")
    row("TOTAL EUR", "13.97", font_=bold)
    row("Paid by card", "13.97")
    expected = ("CAFE AURORA", "12 Harbour Street", "2024-03-15", "Espresso", "Croissant",
                "Orange juice", "12.70", "TOTAL EUR", "13.97")
    return Sample("receipt", image, expected)


def full_set() -> list[Sample]:
    fonts = available_fonts() or [None]  # type: ignore[list-item]
    samples = [
        error_dialog(font, size, dark=dark)
        for font in fonts
        for size in (12, 14, 18, 24)
        for dark in (False, True)
    ]
    return [*samples, settings_page([f for f in fonts if f]), receipt(),
            receipt("DejaVu Sans Mono")]


def found(expected: str, text: str) -> bool:
    return " ".join(expected.split()) in " ".join(text.split())


def main() -> None:
    from engine.ocr.reader import OcrReader

    started = time.monotonic()
    reader = OcrReader()
    print(f"load: {time.monotonic() - started:.2f} s")
    samples = full_set()
    reader.read(samples[0].image)  # warm-up
    hits = total = 0
    times = []
    for sample in samples:
        result = reader.read(sample.image)
        ok = [found(e, result.text) for e in sample.expected]
        hits += sum(ok)
        total += len(ok)
        times.append(result.seconds)
        missing = [e for e, good in zip(sample.expected, ok, strict=True) if not good]
        print(f"{sample.name:42s} {sum(ok)}/{len(ok)} {result.seconds:5.2f} s"
              f"{'  missing: ' + repr(missing) if missing else ''}")
    times.sort()
    print(f"strings found: {hits}/{total} = {hits / total:.1%}; images: {len(samples)}; "
          f"time per image: mean {sum(times) / len(times):.2f} s, "
          f"median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s")


if __name__ == "__main__":
    main()
