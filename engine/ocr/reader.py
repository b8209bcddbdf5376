"""Reading text from one decoded image with RapidOCR's PP-OCRv4 models (onnxruntime, CPU, offline).

The wheel of rapidocr-onnxruntime (1.4.x) ships the detection, direction and recognition models, so
nothing is downloaded. RapidOCR's own pipeline cuts each detected line tightly and lets the
recogniser stretch small crops, which makes the Chinese/English model drop the spaces between
English words on small screenshot text ("Couldnotsaveinvoice"). This module uses RapidOCR's
detector and recogniser directly and cuts each line itself: with a margin of a third of the line's
height and scaled with Lanczos to at least 48 pixels high, the spaces come back; stretched 1.6 times
horizontally, double letters ("tt", "ll") stop merging.

Dark-theme screenshots (light text on a dark background) are inverted before reading.
"""

from __future__ import annotations

import math
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Detection runs on the image scaled so its long side is within [_DET_MIN_SIDE, _DET_MAX_SIDE].
_DET_MIN_SIDE = 960
_DET_MAX_SIDE = 2000
_DET_MAX_UPSCALE = 3.0
_REC_MIN_HEIGHT = 48  # crops are scaled (Lanczos) to at least the recogniser's input height
_REC_MARGIN = 0.33  # margin around a detected line, as a fraction of its height
_REC_STRETCH = 1.6  # horizontal stretch of crops: room for the recogniser between narrow letters
_DARK_MEAN = 110  # mean luminance below which an image counts as dark-themed


@dataclass(frozen=True)
class OcrLine:
    """One detected piece of text: its text, the recogniser's confidence, and its corner points
    (clockwise from top-left) in the decoded image's pixel coordinates."""

    text: str
    confidence: float
    box: tuple[tuple[int, int], ...]

    @property
    def top(self) -> float:
        return min(y for _, y in self.box)

    @property
    def bottom(self) -> float:
        return max(y for _, y in self.box)

    @property
    def left(self) -> float:
        return min(x for x, _ in self.box)

    @property
    def height(self) -> float:
        return max(1.0, self.bottom - self.top)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "confidence": round(self.confidence, 4),
            "box": [list(p) for p in self.box],
        }


@dataclass(frozen=True)
class OcrResult:
    """Everything read from one image; `rows` is the text in reading order, one row per line of
    the page (pieces side by side on one row joined by a space)."""

    lines: tuple[OcrLine, ...]
    rows: tuple[str, ...]
    width: int
    height: int
    seconds: float
    inverted: bool = False

    @property
    def text(self) -> str:
        return "\n".join(self.rows)

    @property
    def language(self) -> str:
        return guess_language(self.text)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of the ocr preset: lines in reading order plus boxes and confidence."""
        return {
            "language": self.language,
            "text": self.text,
            "lines": [line.to_dict() for line in self.lines],
            "width": self.width,
            "height": self.height,
        }


def guess_language(text: str) -> str:
    """ISO 639-1 code of the dominant script the model reads: "zh" (Han), "en" (Latin), else
    "unknown". The PP-OCRv4 recogniser reads Chinese and Latin script only."""
    han = latin = 0
    for char in text:
        if "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf":
            han += 1
        elif char.isalpha() and unicodedata.name(char, "").startswith("LATIN"):
            latin += 1
    if han == 0 and latin == 0:
        return "unknown"
    # A Han character carries about as much as a Latin word: weigh them so.
    return "zh" if han * 4 >= latin else "en"


def group_rows(lines: list[OcrLine]) -> list[list[OcrLine]]:
    """Reading order: rows top to bottom (pieces whose vertical extents overlap by more than half
    the smaller height share a row), pieces in a row left to right."""
    rows: list[list[OcrLine]] = []
    for line in sorted(lines, key=lambda item: (item.top, item.left)):
        for row in rows:
            top = min(item.top for item in row)
            bottom = max(item.bottom for item in row)
            height = min(line.height, bottom - top)
            overlap = min(bottom, line.bottom) - max(top, line.top)
            if overlap > 0.5 * height:
                row.append(line)
                break
        else:
            rows.append([line])
    for row in rows:
        row.sort(key=lambda item: item.left)
    rows.sort(key=lambda row: min(item.top for item in row))
    return rows


def _is_dark(image: Image.Image) -> bool:
    small = image.convert("L").resize((64, 64), Image.Resampling.BILINEAR)
    histogram = small.histogram()
    mean = sum(i * n for i, n in enumerate(histogram)) / max(1, sum(histogram))
    return mean < _DARK_MEAN


def _det_scale(width: int, height: int) -> float:
    long = max(width, height)
    if long > _DET_MAX_SIDE:
        return _DET_MAX_SIDE / long
    if long < _DET_MIN_SIDE:
        return min(_DET_MAX_UPSCALE, _DET_MIN_SIDE / long)
    return 1.0


def _crop_line(cv2: Any, bgr: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The line inside `points` (4x2, clockwise from top-left) with a margin, rectified and
    scaled to at least _REC_MIN_HEIGHT pixels high."""
    top_left, top_right, bottom_right, bottom_left = points.astype(np.float32)
    width = max(
        1.0,
        float(np.linalg.norm(top_right - top_left)),
        float(np.linalg.norm(bottom_right - bottom_left)),
    )
    height = max(
        1.0,
        float(np.linalg.norm(bottom_left - top_left)),
        float(np.linalg.norm(bottom_right - top_right)),
    )
    across = (top_right - top_left) / width  # unit vector along the line
    down = (bottom_left - top_left) / height  # unit vector across it
    margin = _REC_MARGIN * height
    grown = np.array(
        [
            top_left - margin * across - margin * down,
            top_right + margin * across - margin * down,
            bottom_right + margin * across + margin * down,
            bottom_left - margin * across + margin * down,
        ],
        dtype=np.float32,
    )
    out_h_src = height + 2 * margin
    out_w_src = width + 2 * margin
    scale = max(1.0, _REC_MIN_HEIGHT / out_h_src)
    out_w = max(1, round(out_w_src * scale * _REC_STRETCH))
    out_h = max(1, round(out_h_src * scale))
    target = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(grown, target)
    crop: np.ndarray = cv2.warpPerspective(
        bgr,
        matrix,
        (out_w, out_h),
        borderMode=cv2.BORDER_REPLICATE,
        flags=cv2.INTER_LANCZOS4 if scale > 1.0 else cv2.INTER_AREA,
    )
    if out_h >= 1.5 * out_w:  # a vertical line of text: read it rotated
        crop = np.rot90(crop)
    return crop


class OcrReader:
    """Detection and recognition over RapidOCR's onnxruntime sessions. Not thread-safe: the
    engine calls `read` from one worker thread at a time."""

    def __init__(self, *, threads: int | None = None, min_confidence: float = 0.5) -> None:
        from rapidocr_onnxruntime import RapidOCR

        options: dict[str, Any] = {
            "Det.limit_type": "max",
            "Det.limit_side_len": _DET_MAX_SIDE,
        }
        if threads and threads > 0:
            options["Global.intra_op_num_threads"] = threads
            for part in ("Det", "Cls", "Rec"):
                options[f"{part}.intra_op_num_threads"] = threads
        self._ocr: Any = RapidOCR(**options)
        self._min_confidence = min_confidence
        import cv2

        self._cv2: Any = cv2

    def read(self, image: Image.Image) -> OcrResult:
        started = time.monotonic()
        rgb = image.convert("RGB")
        inverted = _is_dark(rgb)
        if inverted:
            rgb = ImageOps.invert(rgb)
        scale = _det_scale(rgb.width, rgb.height)
        work = rgb
        if scale != 1.0:
            size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            work = rgb.resize(size, Image.Resampling.LANCZOS)
        bgr = np.ascontiguousarray(np.asarray(work)[:, :, ::-1])
        boxes, _ = self._ocr.text_det(bgr)
        lines: list[OcrLine] = []
        if boxes is not None and len(boxes):
            crops = [_crop_line(self._cv2, bgr, np.asarray(box)) for box in boxes]
            recognised, _ = self._ocr.text_rec(crops)
            for box, (text, score) in zip(boxes, recognised, strict=True):
                text = " ".join(str(text).split())
                if not text or float(score) < self._min_confidence:
                    continue
                points = tuple(
                    (
                        min(rgb.width, max(0, math.floor(x / scale))),
                        min(rgb.height, max(0, math.floor(y / scale))),
                    )
                    for x, y in np.asarray(box).tolist()
                )
                lines.append(OcrLine(text, float(score), points))
        rows = group_rows(lines)
        ordered = tuple(line for row in rows for line in row)
        return OcrResult(
            lines=ordered,
            rows=tuple(" ".join(line.text for line in row) for row in rows),
            width=rgb.width,
            height=rgb.height,
            seconds=time.monotonic() - started,
            inverted=inverted,
        )
