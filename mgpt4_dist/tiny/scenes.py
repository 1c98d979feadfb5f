"""The synthetic scene world: one coloured shape on a plain background, and captions that name it.

Owns the scene distribution that the tiny assets, `mgpt4-make-shards --synthetic` and the
learning probe share: drawing a scene, describing it in varied wording, and reading a scene's
attributes back out of a caption (`caption_attributes`), which is how generated captions are scored.
"""
from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

from PIL import Image, ImageDraw

from mgpt4_dist.data import Sample  # (key, JPEG bytes, caption), as mgpt4_dist.data.shards writes them

SYNTHETIC_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 170), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SYNTHETIC_SHAPES = ("square", "circle", "triangle", "stripe")
_SIZES = {"small": (0.25, 0.4), "large": (0.5, 0.7)}  # shape extent as a fraction of the image side
# Varied wording, casing and punctuation, so caption cleaning has something to do. Every template
# names the foreground colour before the background colour (caption_attributes relies on it).
_TEMPLATES = (
    "A {fg} {shape} on a {bg} background.",
    "a photo of a {size} {fg} {shape} over a {bg} background",
    "There is a {size} {fg} {shape} in front of a {bg} background.",
    "{Size} {fg} {shape} on {bg}.",
    "An image of a {fg} {shape}; the background is {bg}.",
    "The picture shows a {fg} {shape} against a plain {bg} background!",
)
_ARTICLE_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


@dataclass(frozen=True)
class Scene:
    fg: str
    bg: str
    shape: str
    size: str


def random_scene(rng: random.Random) -> Scene:
    fg, bg = rng.sample(sorted(SYNTHETIC_COLOURS), 2)
    return Scene(fg=fg, bg=bg, shape=rng.choice(SYNTHETIC_SHAPES), size=rng.choice(sorted(_SIZES)))


def draw_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), SYNTHETIC_COLOURS[scene.bg])
    draw = ImageDraw.Draw(image)
    fill = SYNTHETIC_COLOURS[scene.fg]
    # A margin keeps the corners background, which tests use to check captions against pixels.
    margin = max(1, image_size // 8)
    extent = rng.uniform(*_SIZES[scene.size]) * image_size
    x0 = rng.uniform(margin, image_size - margin - extent)
    y0 = rng.uniform(margin, image_size - margin - extent)
    x1, y1 = x0 + extent, y0 + extent
    if scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif rng.random() < 0.5:  # stripe: a band a third of the extent thick, across the image
        draw.rectangle((margin, y0, image_size - 1 - margin, y0 + extent / 3), fill=fill)
    else:
        draw.rectangle((x0, margin, x0 + extent / 3, image_size - 1 - margin), fill=fill)
    return image


def describe(scene: Scene, rng: random.Random) -> str:
    text = rng.choice(_TEMPLATES).format(fg=scene.fg, bg=scene.bg, shape=scene.shape, size=scene.size,
                                         Size=scene.size.capitalize())
    return _ARTICLE_BEFORE_VOWEL.sub(r"\1n ", text)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def synthetic_scenes(n: int, seed: int = 0, image_size: int = 64) -> Iterator[Tuple[str, Image.Image, Scene, str]]:
    """n seeded (key, image, scene, caption); scene i depends only on (seed, i)."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    for i in range(n):
        rng = random.Random(f"synthetic:{seed}:{i}")
        scene = random_scene(rng)
        image = draw_scene(scene, image_size, rng)
        yield f"{i:08d}", image, scene, describe(scene, rng)


def synthetic_samples(n: int, seed: int = 0, image_size: int = 64) -> Iterator[Sample]:
    """n seeded (key, JPEG, caption) pairs: one coloured shape on a plain background, described in words.

    Keys are `00000000`, `00000001`, ...; sample i depends only on (seed, i). Captions name both
    colours and the shape (and sometimes its size), with varied wording.
    """
    for key, image, _, caption in synthetic_scenes(n, seed, image_size):
        yield key, encode_jpeg(image), caption


_WORD = re.compile(r"[a-z]+")


def caption_attributes(caption: str) -> Dict[str, Optional[str]]:
    """{"fg", "shape", "bg"} a caption names (None where it names none): the first colour word is
    the foreground, the next different one the background, as every template words it."""
    words = _WORD.findall(caption.lower())
    colours = [w for w in words if w in SYNTHETIC_COLOURS]
    shapes = [w for w in words if w in SYNTHETIC_SHAPES]
    fg = colours[0] if colours else None
    bg = next((c for c in colours[1:] if c != fg), None)
    return {"fg": fg, "shape": shapes[0] if shapes else None, "bg": bg}
