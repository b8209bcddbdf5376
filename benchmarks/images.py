"""Benchmark images: deterministic pictures with structure (gradient, shapes, lines of text, a
little noise) so JPEG sizes and preprocessing behave like a photo or screenshot, not a flat fill."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORDS = (
    "invoice total amount due date order number customer address quantity price "
    "error warning settings network battery screen photo receipt street sign open"
).split()


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = random.Random(seed * 1_000_003 + width * 7 + height)
    # vertical/horizontal gradient background
    gx = Image.linear_gradient("L").resize((width, height))
    gy = Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).resize((width, height))
    base = Image.merge("RGB", (gx, gy, Image.new("L", (width, height), rng.randrange(60, 200))))
    draw = ImageDraw.Draw(base)
    scale = max(1, min(width, height) // 240)
    for _ in range(12 + 4 * scale):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = min(width, x0 + rng.randrange(width // 20, width // 3))
        y1 = min(height, y0 + rng.randrange(height // 20, height // 3))
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice(("rect", "ellipse", "line"))
        if shape == "rect":
            draw.rectangle((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0), width=scale)
        elif shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=2 * scale)
    font = _font(12 * scale)
    line_height = 16 * scale
    for row in range(min(12, height // (line_height * 3))):
        text = " ".join(rng.choice(WORDS) for _ in range(6)) + f" {rng.randrange(10_000)}"
        y = line_height + row * line_height * 2
        draw.rectangle(
            (line_height, y - 2, line_height + len(text) * 7 * scale, y + line_height), fill="white"
        )
        draw.text((line_height, y), text, fill=(10, 10, 10), font=font)
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height)).convert("RGB")
    return Image.blend(base, noise, 0.08)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_images(folder: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, str]:
    """Write one JPEG per label into `folder`; return label -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for label, (width, height) in sizes.items():
        path = folder / f"{label}-s{seed}.jpg"
        if not path.exists():
            path.write_bytes(jpeg_bytes(make_image(width, height, seed)))
        paths[label] = str(path)
    return paths
