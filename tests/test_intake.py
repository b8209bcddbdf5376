"""Tests for engine.intake; every sample is made in memory with Pillow / pillow-heif."""

from __future__ import annotations

import io
import math
import random
import struct
import time
import zipfile
import zlib
from typing import Any

import pytest
from PIL import EpsImagePlugin, Image, ImageDraw

from bot import texts
from bot.models import ImagePart, InputRejected
from engine import intake
from engine.intake import IntakeLimits, check_image, open_image, visual_tokens_for
from tests.hostile import Case, corrupt_png, image_damage_cases

LIMITS = IntakeLimits()
BUDGET = LIMITS.max_visual_tokens * LIMITS.token_pixels  # 1024 * 1024


def encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def part(data: bytes, mime: str = "image/jpeg", name: str | None = "photo.jpg") -> ImagePart:
    return ImagePart(data=data, mime=mime, name=name)


def rejected(data: bytes, code: str, *, check_only: bool = False, **kw: Any) -> InputRejected:
    with pytest.raises(InputRejected) as info:
        (check_image if check_only else open_image)(part(data, **kw), LIMITS)
    assert info.value.code == code, info.value.detail
    return info.value


def near(pixel: Any, expected: tuple[int, int, int], tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def png_chunk(tag: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(tag + body)
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)


def huge_png(width: int, height: int) -> bytes:
    """A tiny PNG file declaring enormous dimensions (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + png_chunk(b"IEND", b"")
    )


def frames(fmt: str) -> bytes:
    colours = [(220, 20, 20), (20, 220, 20), (20, 20, 220)]
    images = [Image.new("RGB", (48, 40), c) for c in colours]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0)


# --- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    data = encode(Image.new("RGB", (64, 48), (200, 30, 30)), fmt)
    check_image(part(data), LIMITS)  # the claimed mime/name (JPEG) do not matter
    image = open_image(part(data), LIMITS)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert near(image.getpixel((32, 24)), (200, 30, 30), tol=20)


def test_heic() -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    buf = io.BytesIO()
    try:
        pillow_heif.from_pillow(Image.new("RGB", (64, 48), (200, 30, 30))).save(buf, quality=90)
    except Exception as e:  # pragma: no cover - depends on the libheif build
        pytest.skip(f"this pillow-heif build cannot encode HEIC: {e}")
    image = open_image(part(buf.getvalue(), mime="image/heic", name="IMG_0001.HEIC"), LIMITS)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert near(image.getpixel((32, 24)), (200, 30, 30), tol=25)


def test_animated_gif_gives_first_frame() -> None:
    image = open_image(part(frames("GIF"), mime="image/gif"), LIMITS)
    assert image.mode == "RGB" and image.size == (48, 40)
    assert near(image.getpixel((10, 10)), (220, 20, 20), tol=20)


def test_animated_webp_gives_first_frame() -> None:
    image = open_image(part(frames("WEBP"), mime="image/webp"), LIMITS)
    assert image.mode == "RGB" and image.size == (48, 40)
    assert near(image.getpixel((10, 10)), (220, 20, 20), tol=25)


# --- orientation and modes ---------------------------------------------------------------------


def test_exif_orientation_6_is_applied() -> None:
    source = Image.new("RGB", (80, 40), (255, 0, 0))
    source.paste((0, 0, 255), (40, 0, 80, 40))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    image = open_image(part(encode(source, "JPEG", exif=exif.tobytes(), quality=95)), LIMITS)
    assert image.size == (40, 80)
    assert near(image.getpixel((20, 10)), (255, 0, 0), tol=40)  # left came to the top
    assert near(image.getpixel((20, 70)), (0, 0, 255), tol=40)
    assert not image.getexif().get(0x0112)


@pytest.mark.parametrize(
    "exif",
    [b"Exif\x00\x00garbage-garbage", b"Exif\x00\x00MM\x00*\xff\xff\xff\xf0", b"Exif\x00\x00II*\x00"],
)
def test_corrupt_exif_still_decodes(exif: bytes) -> None:
    data = encode(Image.new("RGB", (64, 48), (10, 200, 10)), "JPEG", exif=exif)
    image = open_image(part(data), LIMITS)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95)
    image = open_image(part(data), LIMITS)
    assert image.mode == "RGB" and near(image.getpixel((32, 24)), (255, 0, 0), tol=30)


def test_16_bit_png_mid_grey_stays_mid_grey() -> None:
    data = encode(Image.new("I;16", (64, 48), 32768), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = open_image(part(data, mime="image/png"), LIMITS)
    assert near(image.getpixel((10, 10)), (127, 127, 127), tol=2)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("I", 32768, 127), ("F", 0.5, 127), ("F", 200.0, 200), ("1", 1, 255), ("L", 90, 90)],
)
def test_wide_and_narrow_modes_in_tiff(mode: str, value: float, expected: int) -> None:
    data = encode(Image.new(mode, (40, 40), value), "TIFF")
    image = open_image(part(data, mime="image/tiff"), LIMITS)
    assert image.mode == "RGB" and near(image.getpixel((5, 5)), (expected,) * 3, tol=2)


def test_rgba_screenshot_transparent_background_black_text() -> None:
    source = Image.new("RGBA", (120, 40), (0, 0, 0, 0))
    draw = ImageDraw.Draw(source)
    draw.text((5, 5), "Hello world", fill=(0, 0, 0, 255))
    draw.rectangle((80, 10, 110, 30), fill=(0, 0, 0, 255))
    image = open_image(part(encode(source, "PNG"), mime="image/png"), LIMITS)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((95, 20)) == (0, 0, 0)
    assert image.getextrema() == ((0, 255), (0, 255), (0, 255))


def test_palette_png_with_transparency() -> None:
    source = Image.new("P", (64, 48), 0)
    source.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    ImageDraw.Draw(source).rectangle((20, 10, 40, 30), fill=1)
    data = encode(source, "PNG", transparency=0)
    image = open_image(part(data, mime="image/png"), LIMITS)
    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((30, 20)) == (255, 0, 0)


def test_la_png() -> None:
    source = Image.new("LA", (64, 48), (0, 0))
    ImageDraw.Draw(source).rectangle((20, 10, 40, 30), fill=(30, 255))
    image = open_image(part(encode(source, "PNG"), mime="image/png"), LIMITS)
    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((30, 20)) == (30, 30, 30)


# --- rejections --------------------------------------------------------------------------------


def test_decompression_bomb_rejected_without_decoding() -> None:
    data = huge_png(100_000, 100_000)
    assert len(data) < 200
    start = time.perf_counter()
    error = rejected(data, "image_too_large_pixels", check_only=True)
    error = rejected(data, "image_too_large_pixels")
    assert time.perf_counter() - start < 1.0
    assert error.params == {"width": 100_000, "height": 100_000, "limit_mp": 40}


def gif_with_big_first_frame(frame_w: int, frame_h: int) -> bytes:
    """A 10x10 GIF whose first frame declares a far larger extent than the logical screen."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, frame_w, frame_h, 0x80) + b"\0\0\0\xff\xff\xff"
    return screen + frame + b"\x02\x02\x44\x01\x00;"


def test_gif_first_frame_extent_is_checked() -> None:
    error = rejected(gif_with_big_first_frame(10_000, 5_000), "image_too_large_pixels")
    assert (error.params["width"], error.params["height"]) == (10_000, 5_000)
    # past Pillow's own guard, which refuses it inside the GIF reader: no size to name, never 0x0
    error = rejected(gif_with_big_first_frame(60_000, 60_000), "image_too_large_declared")
    assert "0x0" not in error.detail and error.params == {"format": "GIF", "limit_mp": 40}


def test_our_pixel_limit_applies_below_pillows() -> None:
    error = rejected(huge_png(8000, 6000), "image_too_large_pixels")  # 48 MP: Pillow allows it
    assert (error.params["width"], error.params["height"]) == (8000, 6000)
    small = IntakeLimits(max_decoded_pixels=1000)
    with pytest.raises(InputRejected, match=r"40x30 pixels, over the 0\.001 MP limit"):
        check_image(part(encode(Image.new("RGB", (40, 30)), "PNG")), small)


def test_size_limit_is_inclusive() -> None:
    png = encode(Image.new("RGB", (64, 48), (1, 2, 3)), "PNG")
    exact = png + b"\x00" * (LIMITS.max_bytes - len(png))
    assert len(exact) == 10 * 1024 * 1024
    check_image(part(exact), LIMITS)  # trailing bytes after IEND are ignored
    error = rejected(exact + b"\x00", "too_large", check_only=True)
    assert error.params == {"size": "10.1 MiB", "limit": "10 MiB"}  # one byte over: never "10"
    assert texts.text("too_large", **error.params) == "That file is 10.1 MiB; the limit is 10 MiB."


def test_empty_file() -> None:
    rejected(b"", "empty_file", check_only=True)


@pytest.mark.parametrize(
    ("data", "looks_like"),
    [
        (b"Dear bot, this is not a photo at all.\n", "text"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "HTML"),
        (b"  <html lang='en'><head></head></html>", "HTML"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
        (b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56, "executable"),
        (b"MZ\x90\x00\x03\x00\x00\x00", "executable"),
        (b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b" * 8, "binary"),
    ],
)
def test_not_an_image(data: bytes, looks_like: str) -> None:
    error = rejected(data, "not_an_image", mime="image/jpeg", name="cat.jpg")
    assert looks_like in error.detail


def test_zip_is_not_an_image() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("photo.jpg", b"not really")
    assert "ZIP" in rejected(buf.getvalue(), "not_an_image").detail


def test_postscript_named_jpg_is_never_opened_as_eps(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("EPS plugin was used")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    error = rejected(eps, "not_an_image", mime="image/jpeg", name="cat.jpg")
    assert "PostScript" in error.detail


def test_image_open_is_restricted_to_the_sniffed_format(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    real_open = Image.open

    def spy(fp: Any, mode: Any = "r", formats: Any = None) -> Any:
        seen.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    open_image(part(encode(Image.new("RGB", (40, 40)), "JPEG")), LIMITS)
    assert seen and all(f == ["JPEG"] for f in seen)


def test_recognised_but_unsupported_formats() -> None:
    ico = encode(Image.new("RGB", (32, 32)), "ICO")
    assert rejected(ico, "unsupported_format").params == {"format": "ICO"}
    assert rejected(b"8BPS\x00\x01" + b"\x00" * 40, "unsupported_format").params["format"] == "PSD"
    svg = b"<?xml version='1.0'?>\n<svg xmlns='http://www.w3.org/2000/svg'></svg>"
    assert rejected(svg, "unsupported_format").params["format"] == "SVG"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_corrupt(fmt: str) -> None:
    noise = Image.effect_noise((256, 256), 60).convert("RGB")
    data = encode(noise, fmt)
    rejected(data[: len(data) // 2], "corrupt_image")


@pytest.mark.parametrize("case", image_damage_cases(), ids=lambda c: c.name)
def test_damaged_image_data_is_refused_before_queueing_with_the_real_reason(case: Case) -> None:
    """check_image (run before a message is queued) decodes the pixels, so damage inside the
    compressed data is found there, and the reply says what is wrong (never "0×0 pixels")."""
    file = case.files[0]
    for check_only in (True, False):
        error = rejected(file.data, case.expect, check_only=check_only, mime=file.mime, name=file.name)
    for lang in ("en", "zh"):
        reply = texts.text(error.code, lang, **error.params)
        assert "{" not in reply and "0×0" not in reply
    if case.expect == "corrupt_image":
        assert "corrupt or truncated" in texts.text(error.code, **error.params)
    else:
        assert "header declares" in texts.text(error.code, **error.params)


def test_a_damaged_png_stream_is_refused_although_its_header_and_crcs_are_valid() -> None:
    data = corrupt_png()
    assert Image.open(io.BytesIO(data)).size == (320, 240)  # the header reads fine
    Image.open(io.BytesIO(data)).verify()  # so do the chunks and their CRCs
    error = rejected(data, "corrupt_image", check_only=True, mime="image/png")
    assert error.params == {"format": "PNG"}


def test_garbage_after_magic_is_corrupt() -> None:
    rejected(b"\x89PNG\r\n\x1a\n" + b"\x13" * 100, "corrupt_image")
    rejected(b"\xff\xd8\xff\xe0" + b"\x00" * 100, "corrupt_image")


def test_zero_sized_png_is_rejected() -> None:
    with pytest.raises(InputRejected) as info:
        check_image(part(huge_png(0, 10)), LIMITS)
    assert info.value.code == "corrupt_image"


def test_mutated_files_only_ever_raise_input_rejected() -> None:
    rng = random.Random(1234)
    seeds = [
        encode(Image.effect_noise((40, 30), 50).convert("RGB"), fmt)
        for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
    ]
    for _ in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        try:
            image = open_image(part(bytes(data)), LIMITS)
        except InputRejected:
            continue
        assert image.mode == "RGB" and image.width * image.height <= BUDGET


# --- geometry ----------------------------------------------------------------------------------


def assert_usable(image: Image.Image) -> None:
    assert image.mode == "RGB"
    width, height = image.size
    assert min(width, height) >= 32
    assert max(width, height) / min(width, height) <= LIMITS.max_aspect_ratio
    assert width * height <= BUDGET
    assert visual_tokens_for(width, height, LIMITS) <= LIMITS.max_visual_tokens


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (3, 100_000), (20, 3500)])
def test_extreme_aspect_ratio_is_padded(size: tuple[int, int]) -> None:
    image = open_image(part(encode(Image.new("RGB", size, (0, 0, 0)), "PNG")), LIMITS)
    assert_usable(image)
    long = max(image.size)
    assert long == min(max(size), long)  # the long side is kept unless over the budget
    assert image.getpixel((0, 0)) == (255, 255, 255)  # white padding
    assert image.convert("L").getextrema() == (0, 255)  # the black content is still there


def test_one_pixel_image_is_usable() -> None:
    image = open_image(part(encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG")), LIMITS)
    assert_usable(image)
    assert image.size == (32, 32) and image.getpixel((16, 16)) == (9, 99, 199)


def test_small_image_upscaled_to_min_side() -> None:
    image = open_image(part(encode(Image.new("RGB", (16, 8)), "PNG")), LIMITS)
    assert image.size == (64, 32)


def test_12_mp_photo_is_downscaled_within_budget() -> None:
    photo = Image.radial_gradient("L").resize((4032, 3024)).convert("RGB")
    data = encode(photo, "JPEG", quality=85)
    image = open_image(part(data), LIMITS)
    assert_usable(image)
    assert image.width * image.height <= 1024 * 1024
    assert image.width * image.height > 0.97 * 1024 * 1024
    assert math.isclose(image.width / image.height, 4032 / 3024, rel_tol=0.01)


def test_screenshot_is_downscaled_within_budget() -> None:
    data = encode(Image.new("RGB", (1920, 1080), (40, 40, 40)), "PNG")
    image = open_image(part(data, mime="image/png"), LIMITS)
    assert_usable(image)
    assert math.isclose(image.width / image.height, 1920 / 1080, rel_tol=0.01)


def test_640x480_is_left_alone() -> None:
    image = open_image(part(encode(Image.new("RGB", (640, 480), (5, 6, 7)), "PNG")), LIMITS)
    assert image.size == (640, 480) and image.getpixel((0, 0)) == (5, 6, 7)


def test_visual_tokens_for() -> None:
    assert visual_tokens_for(1024, 1024, LIMITS) == 1024
    assert visual_tokens_for(640, 480, LIMITS) == 300
    assert visual_tokens_for(4032, 3024, LIMITS) <= 1024
    assert visual_tokens_for(0, 10, LIMITS) == 0
    assert visual_tokens_for(32, 32, LIMITS) == 64  # the processor scales tiny images up


def test_limits_validation() -> None:
    with pytest.raises(ValueError):
        IntakeLimits(token_pixels=1000)
    with pytest.raises(ValueError):
        IntakeLimits(max_aspect_ratio=500)
    assert intake.IntakeLimits().max_pixels == BUDGET
