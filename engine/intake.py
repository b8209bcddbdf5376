"""Image intake: turn untrusted bytes from strangers into a small, RGB, model-ready image.

`check_image` checks size, sniffed format and declared dimensions, then decodes the first frame
(so corrupt or truncated data is refused before a message is queued); `open_image` does the same,
then applies EXIF orientation, converts any mode to RGB and fits the result into the pixel
budget, aspect-ratio limit and minimum size the Qwen-VL processor needs.
Every failure is an `InputRejected` with one of the codes the bot's text catalogue knows.

Pillow's own `MAX_IMAGE_PIXELS` guard is left in place as a backstop (never disabled here); our
`max_decoded_pixels` is checked on the declared size before any pixel is decoded, and again after
decoding, so it is the limit that applies whenever it is the lower one (the default, 40 MP, is well
under Pillow's 89 MP). A Pillow `DecompressionBombError` is mapped to the same code.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from dataclasses import dataclass
from typing import Any, cast

from PIL import Image, ImageFile

from bot.models import ImagePart, InputRejected, size_text

log = logging.getLogger(__name__)

# Pillow format names we decode; the sniffed one is the only format Image.open may try.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF")
WHITE = (255, 255, 255)
# Smallest pixel count the Qwen3-VL processor scales up to (its default size["shortest_edge"] is
# 65536 = 64 tokens of 32x32); used only by visual_tokens_for's estimate.
_PROCESSOR_MIN_TOKENS = 64


@dataclass(frozen=True)
class IntakeLimits:
    max_bytes: int = 10 * 1024 * 1024  # 10 MiB default
    max_decoded_pixels: int = 40_000_000  # decompression-bomb guard, checked on every frame touched
    max_visual_tokens: int = 1024  # pixel budget per image
    token_pixels: int = 32 * 32  # pixels one visual token covers: (patch*merge)**2
    max_aspect_ratio: float = 150.0  # transformers' Qwen resizer fails past 200:1

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_decoded_pixels, self.max_visual_tokens) < 1:
            raise ValueError("IntakeLimits: sizes and budgets must be positive")
        if self.token_pixels < 4 or math.isqrt(self.token_pixels) ** 2 != self.token_pixels:
            raise ValueError("IntakeLimits.token_pixels must be a square number of pixels")
        if not 1.0 <= self.max_aspect_ratio <= 200.0:
            raise ValueError("IntakeLimits.max_aspect_ratio must be between 1 and 200")

    @property
    def max_pixels(self) -> int:
        """The pixel budget an image is downscaled into."""
        return self.max_visual_tokens * self.token_pixels

    @property
    def min_side(self) -> int:
        """One visual token's side (2x2 patches after the merge), the smallest usable side."""
        return math.isqrt(self.token_pixels)


# --- sniffing ----------------------------------------------------------------------------------

_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    # Images we recognise but do not accept (reported as unsupported_format).
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"8BPS", "PSD"),
    (b"gimp xcf", "XCF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
)
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "a PDF document"),
    (b"%!PS", "a PostScript document"),
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"PK\x05\x06", "a ZIP archive"),
    (b"\x7fELF", "an executable (ELF)"),
    (b"MZ", "an executable (Windows)"),
    (b"\xcf\xfa\xed\xfe", "an executable (Mach-O)"),
    (b"\xca\xfe\xba\xbe", "an executable (Mach-O) or Java class"),
    (b"\x00asm", "a WebAssembly module"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"Rar!", "a RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\x1a\x45\xdf\xa3", "a video (Matroska/WebM)"),
    (b"OggS", "an audio file (Ogg)"),
    (b"ID3", "an audio file (MP3)"),
    (b"fLaC", "an audio file (FLAC)"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def _sniff(data: bytes) -> tuple[str | None, str]:
    """(accepted Pillow format or None, what the bytes are); trusts only the bytes. The second
    item is an image format's name (capitalised) or a description of a non-image ("a PDF ...")."""
    for magic, name in _IMAGE_MAGIC:
        if data.startswith(magic):
            return (name if name in ACCEPTED_FORMATS else None), name
    if data[:4] == b"RIFF" and len(data) >= 12:
        kind = data[8:12]
        if kind == b"WEBP":
            return "WEBP", "WEBP"
        riff = {b"AVI ": "a video (AVI)", b"WAVE": "an audio file (WAV)"}
        return None, riff.get(kind, "a RIFF file")
    bmp_header_size = int.from_bytes(data[14:18], "little") if len(data) >= 18 else 0
    if data[:2] == b"BM" and bmp_header_size in _BMP_HEADER_SIZES:
        return "BMP", "BMP"
    if data[4:8] == b"ftyp":
        return _sniff_isobmff(data)
    for magic, what in _OTHER_MAGIC:
        if data.startswith(magic):
            return None, what
    return None, _sniff_text(data)


def _sniff_isobmff(data: bytes) -> tuple[str | None, str]:
    box_size = int.from_bytes(data[:4], "big")
    major = data[8:12]
    compatible = {data[i : i + 4] for i in range(16, min(box_size, len(data), 256) - 3, 4)}
    if major in (b"avif", b"avis") or (b"avif" in compatible and not compatible & _HEIF_BRANDS):
        return None, "AVIF"
    if major in _HEIF_BRANDS or compatible & _HEIF_BRANDS:
        return "HEIF", "HEIF"
    return None, "a video (MP4/QuickTime)"


def _sniff_text(data: bytes) -> str:
    head = data[:4096]
    for bom in (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"):
        if head.startswith(bom):
            return "a text file"
    lowered = head.lstrip().lower()
    if lowered.startswith(b"<svg") or (lowered.startswith(b"<?xml") and b"<svg" in lowered):
        return "SVG"
    if lowered.startswith(b"<!doctype html") or b"<html" in lowered[:1024]:
        return "an HTML page"
    if lowered.startswith(b"<?xml"):
        return "an XML document"
    text = head.decode("utf-8", errors="replace")
    controls = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\t\n\r\f"))
    if b"\x00" not in head and controls <= len(text) // 20:
        return "a text file"
    return "unrecognised binary data"


# --- checks ------------------------------------------------------------------------------------


def _number(value: float) -> float | int:
    """3 significant digits, an int when whole: 40, 10, 0.5, 12.3."""
    rounded = float(f"{value:.3g}")
    return int(rounded) if rounded.is_integer() else rounded


def _too_many_pixels(width: int, height: int, limits: IntakeLimits) -> InputRejected:
    limit_mp = _number(limits.max_decoded_pixels / 1e6)
    return InputRejected(
        "image_too_large_pixels",
        f"image is {width}x{height} pixels, over the {limit_mp} MP limit",
        width=width,
        height=height,
        limit_mp=limit_mp,
    )


def _corrupt(fmt: str, error: BaseException | str) -> InputRejected:
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return InputRejected("corrupt_image", f"cannot decode this {fmt} image ({reason})", format=fmt)


def _check_dimensions(size: tuple[int, int], fmt: str, limits: IntakeLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise _corrupt(fmt, f"zero-sized image {width}x{height}")
    if width * height > limits.max_decoded_pixels:
        raise _too_many_pixels(width, height, limits)


@functools.cache
def _heif_available() -> bool:
    """Register pillow-heif's opener on first use; False if it is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _declared_size(data: bytes, fmt: str) -> tuple[int, int]:
    """The header's size, read without Pillow's bomb check (which raised); (0, 0) if unknown."""
    try:
        factory = Image.OPEN[fmt][0]
        return factory(io.BytesIO(data), "").size
    except Exception:
        return 0, 0


def _open_checked(part: ImagePart, limits: IntakeLimits) -> tuple[ImageFile.ImageFile, str]:
    """All of check_image; returns the lazily opened image (header parsed, no pixels decoded)."""
    if not part.data:
        raise InputRejected("empty_file", "the file is empty")
    if part.size > limits.max_bytes:
        size, limit = size_text(part.size), size_text(limits.max_bytes)
        raise InputRejected("too_large", f"file is {size}, over the {limit} limit", size=size, limit=limit)
    fmt, looks_like = _sniff(part.data)
    if fmt is None:
        if not looks_like[:1].islower():  # an image format we recognise but do not take
            raise InputRejected(
                "unsupported_format", f"{looks_like} images are not supported", format=looks_like
            )
        raise InputRejected(
            "not_an_image",
            f"not an image: looks like {looks_like} (sent as {part.mime!r}, name {part.name!r})",
            looks_like=looks_like,
        )
    if fmt == "HEIF" and not _heif_available():
        raise InputRejected(
            "unsupported_format", "HEIF support (pillow-heif) is not installed", format="HEIF"
        )
    try:
        # formats=[fmt]: the sniffed format only, so no other plugin (e.g. EPS) ever sees the bytes.
        image = Image.open(io.BytesIO(part.data), formats=[fmt])
    except Image.DecompressionBombError:
        width, height = _declared_size(part.data, fmt)
        if width > 0 and height > 0:
            raise _too_many_pixels(width, height, limits) from None
        # the format's reader itself refused the size its header declares (WebP, a GIF frame),
        # so no size can be named: a real giant, a bomb, or a garbled header
        limit_mp = _number(limits.max_decoded_pixels / 1e6)
        raise InputRejected(
            "image_too_large_declared",
            f"the {fmt} header declares a size Pillow refuses (over {limit_mp} MP)",
            format=fmt,
            limit_mp=limit_mp,
        ) from None
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ...
        raise _corrupt(fmt, e) from e
    if not isinstance(image, ImageFile.ImageFile):  # pragma: no cover - Image.open's contract
        raise _corrupt(fmt, "unexpected image object")
    _check_dimensions(image.size, fmt, limits)
    return image, fmt


def _decoded(part: ImagePart, limits: IntakeLimits) -> tuple[ImageFile.ImageFile, str]:
    """_open_checked, then the first frame decoded (`load`, not just the header or `verify`), so
    image data that is corrupt or truncated is refused. A JPEG is decoded at the reduced scale
    open_image needs (libjpeg still reads every coefficient, so damage is found all the same)."""
    source, fmt = _open_checked(part, limits)
    try:
        if fmt == "JPEG":  # let libjpeg decode at 1/2, 1/4 or 1/8 scale when that is enough
            source.draft(None, _plan(source.width, source.height, limits)[0])
        source.load()
        _check_dimensions(source.size, fmt, limits)  # a GIF frame can outgrow the header
    except InputRejected:
        source.close()
        raise
    except (Image.DecompressionBombError, MemoryError):
        source.close()
        raise _too_many_pixels(source.width, source.height, limits) from None
    except Exception as e:  # anything Pillow or a codec raises on bad data
        source.close()
        log.debug("cannot decode %s image", fmt, exc_info=True)
        raise _corrupt(fmt, e) from e
    return source, fmt


def check_image(part: ImagePart, limits: IntakeLimits) -> None:
    """Every check open_image makes, the full decode included, without converting or fitting the
    result; raises InputRejected. (Callers run it off the event loop: a 12 MP JPEG takes
    tens of milliseconds.)"""
    image, _ = _decoded(part, limits)
    image.close()


# --- decoding and normalising --------------------------------------------------------------------

_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> int:
    """EXIF (or XMP) orientation as ImageOps.exif_transpose reads it; 1 if absent or corrupt."""
    try:
        value: Any = image.getexif().get(0x0112, 1)
        return int(value) if int(value) in _TRANSPOSE else 1
    except Exception:
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: high bit depths scaled to 8 bits, transparency composited over white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        wide = image if image.mode in ("I", "F") else image.convert("I")
        low, high = cast(tuple[float, float], wide.getextrema())
        if image.mode.startswith("I;16"):
            scale = 1 / 257
        elif image.mode == "F" and 0 <= low and high <= 1.0:
            scale = 255.0
        else:
            scale = 1.0 if high <= 255 else 1 / 257 if high <= 65535 else 255 / high
        return wide.point(lambda v: v * scale).convert("L").convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", image.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _canvas(width: int, height: int, limits: IntakeLimits) -> tuple[int, int]:
    """The padded size that brings (width, height) within the aspect ratio and minimum side."""
    ratio, side = limits.max_aspect_ratio, limits.min_side
    return (
        max(width, math.ceil(height / ratio), side),
        max(height, math.ceil(width / ratio), side),
    )


def _plan(width: int, height: int, limits: IntakeLimits) -> tuple[tuple[int, int], tuple[int, int]]:
    """(content size, canvas size): content scaled, canvas padded, canvas area within budget."""
    budget, side, ratio = limits.max_pixels, limits.min_side, limits.max_aspect_ratio
    long, short = max(width, height), min(width, height)
    # Upscale tiny images (unless they are strips, which get padded instead), then cap the scale
    # so the padded canvas fits: area w*h*s^2, strip padding (L*s)^2/ratio, min side side*L*s.
    scale = side / short if short < side and long / short <= ratio else 1.0
    scale = min(
        scale,
        math.sqrt(budget / (width * height)),
        math.sqrt(budget * ratio) / long,
        budget / (side * long),
    )
    for _ in range(200):
        content = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = _canvas(*content, limits)
        if canvas[0] * canvas[1] <= budget:
            break
        scale *= 0.995
    return content, canvas


def _fit(image: Image.Image, limits: IntakeLimits) -> Image.Image:
    content, canvas = _plan(image.width, image.height, limits)
    if content != image.size:
        upscale = content[0] * content[1] > image.width * image.height
        method = Image.Resampling.BICUBIC if upscale else Image.Resampling.LANCZOS
        image = image.resize(content, method, reducing_gap=None if upscale else 3.0)
    if canvas != content:
        padded = Image.new("RGB", canvas, WHITE)
        padded.paste(image, ((canvas[0] - content[0]) // 2, (canvas[1] - content[1]) // 2))
        image = padded
    return image


def open_image(part: ImagePart, limits: IntakeLimits) -> Image.Image:
    """check_image, then decode the first frame into a fully loaded RGB image that fits `limits`."""
    source, fmt = _decoded(part, limits)
    # the orientation only after the decode: reading EXIF can load a PNG itself, and that load's
    # error would be lost in _orientation's fallback (a damaged PNG was then answered)
    orientation = _orientation(source)
    try:
        image = _to_rgb(source)
    except (Image.DecompressionBombError, MemoryError):
        raise _too_many_pixels(source.width, source.height, limits) from None
    except Exception as e:  # anything Pillow or a codec raises on bad data
        log.debug("cannot decode %s image", fmt, exc_info=True)
        raise _corrupt(fmt, e) from e
    if orientation != 1:
        image = image.transpose(_TRANSPOSE[orientation])
    image = _fit(image, limits)
    if image is source:  # detach from the file object and drop EXIF (orientation is applied)
        image = image.copy()
    image.info.clear()
    return image


def visual_tokens_for(width: int, height: int, limits: IntakeLimits) -> int:
    """Visual tokens Qwen-VL's smart_resize gives a width x height image, its max_pixels set to
    the budget (estimate for logs and benchmarks)."""
    if width <= 0 or height <= 0:
        return 0
    factor = limits.min_side
    max_pixels = limits.max_pixels
    min_pixels = min(_PROCESSOR_MIN_TOKENS * limits.token_pixels, max_pixels)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar * w_bar // limits.token_pixels
