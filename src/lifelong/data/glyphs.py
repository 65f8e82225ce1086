"""Letters rendered from the real TrueType fonts that ship with matplotlib (DejaVu, STIX, Computer Modern).

A visual domain no MNIST-style set covers: 23 typefaces (sans, serif, mono, bold, italic, calligraphic),
each letter drawn black on white with a seeded random scale, rotation and offset. Fonts, not images,
are split: the test set is drawn only from 6 held-out fonts, so test accuracy measures generalisation
to unseen typefaces.

Rendering is done at 4x the output size and downsampled (box filter), which anti-aliases thin strokes.
Default: letters A..J (10 classes), 32 px, 8 renders per font and letter -> 1,360 train / 480 test.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lifelong.assets import package_file
from lifelong.data.splits import frozen
from lifelong.errors import ConfigError, DataNotFoundError

# Fonts whose A..Z are real letters (checked by eye). Left out: the Display and NonUnicode faces
# (no Latin letters), cmex10 (extension symbols at the letter code points), LastResort (boxes).
TRAIN_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmmi10.ttf", "cmsy10.ttf",
)
TEST_FONTS = (
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Italic.ttf",
    "STIXGeneralBol.ttf", "cmss10.ttf", "cmtt10.ttf",
)
DEFAULT_LETTERS = "ABCDEFGHIJ"

# Augmentation ranges: font size as a fraction of the image side, rotation in degrees, offset as a
# fraction of the image side. Small enough that every glyph stays inside the frame.
SCALE_RANGE = (0.55, 0.85)
MAX_ROTATION = 15.0
MAX_OFFSET = 0.08
OVERSAMPLE = 4
_SPLIT_SEEDS = {"train": 0, "test": 1}


def font_dir() -> Path:
    return package_file("matplotlib", "mpl-data/fonts/ttf", "the glyphs source renders matplotlib's fonts: pip install matplotlib==3.11.2")


def load_glyphs(split: str, letters: str = DEFAULT_LETTERS, size: int = 32, per_font: int = 8):
    """Images (N, size, size) uint8, black letters on white; labels index `letters`."""
    if not (isinstance(letters, str) and letters.isalpha() and len(set(letters)) == len(letters) >= 2):
        raise ConfigError(f"glyphs: `letters` must be a string of at least 2 distinct letters, got {letters!r}")
    if not (isinstance(size, int) and size >= 8):
        raise ConfigError(f"glyphs: `size` must be an integer >= 8, got {size!r}")
    if not (isinstance(per_font, int) and per_font >= 1):
        raise ConfigError(f"glyphs: `per_font` must be a positive integer, got {per_font!r}")
    images, labels = _render_split(split, letters, size, per_font)
    return images, labels, tuple(f"letter {c}" for c in letters)


@lru_cache(maxsize=8)
def _render_split(split: str, letters: str, size: int, per_font: int) -> tuple[np.ndarray, np.ndarray]:
    directory = font_dir()
    fonts = TRAIN_FONTS if split == "train" else TEST_FONTS
    missing = [f for f in fonts if not (directory / f).is_file()]
    if missing:
        raise DataNotFoundError(f"fonts {missing} are missing from {directory}: reinstall matplotlib==3.11.2")
    rng = np.random.default_rng(_SPLIT_SEEDS[split])
    images, labels = [], []
    for font in fonts:  # order: font, letter, render -- fixed, so the content hash is stable
        for label, letter in enumerate(letters):
            for _ in range(per_font):
                scale = rng.uniform(*SCALE_RANGE)
                angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
                dx, dy = rng.uniform(-MAX_OFFSET, MAX_OFFSET, size=2)
                images.append(render_glyph(directory / font, letter, size, scale, angle, dx, dy))
                labels.append(label)
    return frozen(np.stack(images)), frozen(np.array(labels, dtype=np.int64))


def render_glyph(font_path: Path, letter: str, size: int, scale: float, angle: float, dx: float, dy: float) -> np.ndarray:
    """One (size, size) uint8 image: `letter` centred by its ink box, scaled, rotated, shifted."""

    side = size * OVERSAMPLE
    font = _font(str(font_path), max(1, round(scale * side)))
    canvas = Image.new("L", (2 * side, 2 * side), 255)  # room to rotate without clipping
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    draw.text((side - (left + right) / 2, side - (top + bottom) / 2), letter, font=font, fill=0)
    # Rotate about the canvas centre, shift and crop in one affine map (as Image.rotate + crop would,
    # at a quarter of the cost): output pixel p reads canvas point M (p + origin - c) + c.
    t = -math.radians(angle)
    a, b, d, e = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
    ox, oy = side / 2 - dx * side - side, side / 2 - dy * side - side  # crop origin relative to c
    affine = (a, b, a * ox + b * oy + side, d, e, d * ox + e * oy + side)
    crop = canvas.transform((side, side), Image.Transform.AFFINE, affine, resample=Image.Resampling.BILINEAR, fillcolor=255)
    return np.asarray(crop.resize((size, size), Image.Resampling.BOX))


@lru_cache(maxsize=512)
def _font(path: str, pixel_size: int):

    return ImageFont.truetype(path, pixel_size)
