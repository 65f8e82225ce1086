"""Clip-art from Debian's `openclipart-png` (8,121 PNG drawings filed in about 100 category folders,
installed by `scripts/install_t2i_data.sh`): classification tasks made of category folders, and the
drawings of every other folder as reference data for distillation (ZSCL, Select-and-Distill).

Tasks (`load_openclipart(split, group=...)`, the `openclipart` source): each group is one task of five
classes, each class one or more category folders with their subfolders:

    animals   bird, mammal, fish, insect, dinosaur
    food      fruit, dessert, drink, bread, meat
    signs     road sign, clock, weather symbol, map symbol, flag
    leisure   music, sport, toy, playing card, party
    nature    flower, tree, smiley face, stick figure, house

Every drawing is alpha-composited on white, cropped to its visible content, centred on a white square and
resized (antialiased) to `size` px (default 64). Split 80/20 per class by file, with a fixed seed. Files
over 40 Mpx (a few huge renders) are skipped unread. Decoded groups are cached through lifelong.cache.

Reference drawings (`reference_clipart(n, size, seed)`): a seeded subset of the drawings in the folders
no task uses (computer icons, office, tools, shapes, transport, buildings, people, ...: about 5,900
files), so they never share an image with the stream. Their texts (`reference_clipart_texts()`) are their
file names made readable ("ballpoint_pen_jonathan_d_01.png" -> "a drawing of a ballpoint pen jonathan d,
office"): descriptive, with some author names left in.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lifelong.cache import cached, content_key
from lifelong.errors import ConfigError, DataNotFoundError

ROOT = Path("/usr/share/openclipart/png")
INSTALL_HINT = "install Debian's openclipart-png: `sudo bash scripts/install_t2i_data.sh`"
VERSION = 1  # bump when decoding changes: a new cache key
SEED = 18
TEST_FRACTION = 0.2
MAX_PIXELS = 40_000_000

# group -> ((class name, (folders under ROOT, each with its subfolders)), ...)
GROUPS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "animals": (("bird", ("animals/birds",)), ("mammal", ("animals/mammals",)), ("fish", ("animals/fish",)),
                ("insect", ("animals/bugs",)), ("dinosaur", ("animals/dinosaurs",))),
    "food": (("fruit", ("food/fruit",)), ("dessert", ("food/desserts",)), ("drink", ("food/beverages",)),
             ("bread", ("food/breads_and_carbs",)), ("meat", ("food/meats_and_eggs",))),
    "signs": (("road sign", ("transportation/roadsigns",)), ("clock", ("signs_and_symbols/clocks",)),
              ("weather symbol", ("signs_and_symbols/weather",)), ("map symbol", ("signs_and_symbols/map_symbols",)),
              ("flag", ("signs_and_symbols/flags",))),
    "leisure": (("music", ("recreation/music",)), ("sport", ("recreation/sports",)), ("toy", ("recreation/toys",)),
                ("playing card", ("recreation/games/cards",)), ("party", ("recreation/party",))),
    "nature": (("flower", ("plants/flowers",)), ("tree", ("plants/trees",)), ("smiley face", ("people/smilies",)),
               ("stick figure", ("people/stickmen",)), ("house", ("buildings/homes",))),
}


def _require_root() -> None:
    if not ROOT.is_dir():
        raise DataNotFoundError(f"{ROOT} not found: {INSTALL_HINT}")


def _readable(paths) -> list[Path]:
    """The PNGs among `paths` small enough to decode (the header alone is read to decide)."""
    keep = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for path in paths:
            try:
                with Image.open(path) as im:
                    if im.size[0] * im.size[1] <= MAX_PIXELS:
                        keep.append(path)
            except Image.DecompressionBombError:  # over Pillow's own limit: far over MAX_PIXELS too
                continue
    return keep


@lru_cache(maxsize=None)
def class_files(folders: tuple[str, ...]) -> tuple[Path, ...]:
    """Every readable PNG in the folders and their subfolders, sorted."""
    _require_root()
    paths = sorted({p for folder in folders for p in (ROOT / folder).rglob("*.png")})
    if not paths:
        raise DataNotFoundError(f"no PNG under {[str(ROOT / f) for f in folders]}: {INSTALL_HINT}")
    return tuple(_readable(paths))


def decode(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the drawing on white, cropped to its content, centred, antialiased."""
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box:
        rgba = rgba.crop(box)
    w, h = rgba.size
    side = max(w, h, 1)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((side - w) // 2, (side - h) // 2))
    inner = canvas.convert("RGB").resize((size - 4, size - 4), Image.LANCZOS, reducing_gap=3.0)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(inner, (2, 2))
    return np.asarray(out, np.uint8)


def _manifest(paths) -> list[tuple[str, int]]:
    return [(str(p.relative_to(ROOT)), p.stat().st_size) for p in paths]


def load_openclipart(split: str, group: str = "animals", size: int = 64) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One group of clip-art categories as a classification task (see the module docstring)."""
    if group not in GROUPS:
        raise ConfigError(f"openclipart: group must be one of {', '.join(GROUPS)}, got {group!r}")
    if not isinstance(size, int) or size < 8:
        raise ConfigError(f"openclipart: size must be an integer >= 8 (pixels), got {size!r}")
    chosen: list[tuple[int, Path]] = []
    for label, (_, folders) in enumerate(GROUPS[group]):
        files = class_files(folders)
        order = np.random.default_rng([SEED, label, len(files)]).permutation(len(files))
        n_test = max(1, round(TEST_FRACTION * len(files)))
        picked = order[:n_test] if split == "test" else order[n_test:]
        chosen += [(label, files[i]) for i in sorted(picked)]
    key = content_key("openclipart", VERSION, group, split, size, _manifest(p for _, p in chosen))

    def compute() -> dict[str, torch.Tensor]:
        images = np.stack([decode(p, size) for _, p in chosen])
        return {"images": torch.from_numpy(images), "labels": torch.tensor([lab for lab, _ in chosen])}

    pool = cached("openclipart", key, compute)
    return pool["images"].numpy(), pool["labels"].numpy(), tuple(name for name, _ in GROUPS[group])


@lru_cache(maxsize=1)
def reference_files() -> tuple[Path, ...]:
    """Every readable drawing outside the task groups' folders: data no openclipart task holds."""
    _require_root()
    used = tuple(ROOT / f for classes in GROUPS.values() for _, folders in classes for f in folders)
    paths = sorted(p for p in ROOT.rglob("*.png") if not any(p.is_relative_to(u) for u in used))
    return tuple(_readable(paths))


def reference_clipart(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n', size, size, 3) uint8: a seeded subset of n' = min(n, available) reference drawings."""
    files = reference_files()
    pick = sorted(np.random.default_rng([SEED, seed]).permutation(len(files))[: min(n, len(files))].tolist())
    chosen = [files[i] for i in pick]
    key = content_key("openclipart-reference", VERSION, size, _manifest(chosen))
    return cached("openclipart", key, lambda: {"images": torch.from_numpy(np.stack([decode(p, size) for p in chosen]))}
                  )["images"].numpy()


def description(path: Path) -> str:
    """A readable caption from a file name and its folder: "a drawing of a ballpoint pen jonathan d, office"."""
    words = re.sub(r"[_\-.]+", " ", path.stem)
    words = re.sub(r"\b\d+\b|\b(md|pt\d*|step)\b", " ", words)
    words = " ".join(words.split()).lower() or "shape"
    where = str(path.parent.relative_to(ROOT)).replace("/", ", ").replace("_", " ")
    return f"a drawing of a {words}, {where}"


@lru_cache(maxsize=1)
def reference_clipart_texts() -> tuple[str, ...]:
    """One caption per reference drawing, each distinct caption once, sorted."""
    return tuple(sorted({description(p) for p in reference_files()}))
