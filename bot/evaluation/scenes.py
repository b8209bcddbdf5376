"""Plain pictures for /describe: simple drawn scenes, saved as noisy JPEGs like photos, each with
the words a correct description would use (groups of synonyms; one hit per group counts)."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from bot.evaluation.canvas import Drawn, add_noise

SIZE = (640, 480)


def _sky(top: tuple[int, int, int], bottom: tuple[int, int, int], height: int) -> Image.Image:
    image = Image.new("RGB", SIZE, bottom)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line((0, y, SIZE[0], y), fill=tuple(round(a + (b - a) * t)
                                                 for a, b in zip(top, bottom, strict=True)))
    return image


def sunset(rng: random.Random) -> Drawn:
    horizon = rng.randint(260, 300)
    image = _sky((255, 120, 40), (255, 200, 120), horizon)
    draw = ImageDraw.Draw(image)
    x = rng.randint(220, 420)
    draw.ellipse((x - 60, horizon - 70, x + 60, horizon + 50), fill=(255, 236, 140))
    draw.rectangle((0, horizon, SIZE[0], SIZE[1]), fill=(20, 60, 120))
    for y in range(horizon + 10, SIZE[1], 14):
        draw.line((x - 80, y, x + 80, y), fill=(230, 150, 80), width=2)
    return Drawn("describe-sunset-sea", "describe", image,
                 keywords=[["sunset", "sunrise", "dusk", "sun"], ["sea", "ocean", "water"]])


def apple(rng: random.Random) -> Drawn:
    image = Image.new("RGB", SIZE, (235, 228, 215))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 330, SIZE[0], SIZE[1]), fill=(140, 90, 50))
    cx = rng.randint(260, 380)
    draw.ellipse((cx - 90, 170, cx + 90, 350), fill=(200, 20, 30))
    draw.ellipse((cx - 50, 200, cx - 20, 240), fill=(240, 120, 120))
    draw.line((cx, 175, cx + 8, 130), fill=(90, 60, 30), width=8)
    draw.ellipse((cx + 10, 125, cx + 60, 150), fill=(60, 150, 50))
    return Drawn("describe-red-apple", "describe", image,
                 keywords=[["apple", "fruit"], ["red"], ["table", "wood", "wooden"]])


def house(rng: random.Random) -> Drawn:
    image = _sky((110, 170, 240), (190, 220, 250), 360)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 360, SIZE[0], SIZE[1]), fill=(70, 160, 60))
    left = rng.randint(120, 200)
    draw.rectangle((left, 230, left + 200, 380), fill=(230, 220, 200))
    draw.polygon([(left - 20, 230), (left + 100, 150), (left + 220, 230)], fill=(170, 40, 40))
    draw.rectangle((left + 80, 300, left + 120, 380), fill=(110, 70, 40))
    draw.rectangle((left + 20, 260, left + 60, 295), fill=(150, 200, 240))
    draw.rectangle((left + 140, 260, left + 180, 295), fill=(150, 200, 240))
    draw.rectangle((500, 260, 520, 380), fill=(100, 70, 40))
    draw.ellipse((450, 170, 570, 290), fill=(40, 120, 40))
    return Drawn("describe-house-tree", "describe", image,
                 keywords=[["house", "home", "cottage", "building"], ["tree"]])


def night(rng: random.Random) -> Drawn:
    image = _sky((5, 10, 40), (30, 40, 90), SIZE[1])
    draw = ImageDraw.Draw(image)
    for _ in range(70):
        x, y = rng.randrange(SIZE[0]), rng.randrange(SIZE[1] - 100)
        draw.ellipse((x, y, x + 3, y + 3), fill=(255, 255, 230))
    draw.ellipse((420, 60, 520, 160), fill=(250, 245, 210))
    draw.ellipse((450, 50, 550, 150), fill=(12, 20, 55))  # the crescent's shadow
    draw.polygon([(0, 480), (160, 360), (300, 480)], fill=(10, 15, 25))
    draw.polygon([(200, 480), (420, 330), (640, 480)], fill=(15, 20, 30))
    return Drawn("describe-night-moon", "describe", image,
                 keywords=[["moon", "crescent"], ["night", "star", "stars", "starry"]])


def describe_cases(rng: random.Random) -> list[Drawn]:
    out = []
    for make in (sunset, apple, house, night):
        case = make(rng)
        case.image = add_noise(case.image, rng, 10)
        case.jpeg_quality = 85
        case.tags.append("photo")
        out.append(case)
    return out
