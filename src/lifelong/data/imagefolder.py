"""Your own images: one folder per class.

    root/<class name>/*.{png,jpg,jpeg,bmp,gif,webp}                      fixed seeded split (test_fraction)
    root/train/<class name>/...  and  root/test/<class name>/...         the split you made

Class names are the folder names, sorted, with underscores read as spaces ("golden_retriever" ->
"golden retriever"). Each image is converted to RGB, centre-cropped to a square and resized to
`size` x `size`. Files with other extensions and hidden files are ignored. Nothing is cached: the
folder may change between calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lifelong.data.splits import SPLIT_SEED, readable, stratified_split
from lifelong.errors import ConfigError, DataFormatError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_imagefolder(split: str, root: str | Path | None = None, size: int = 64, test_fraction: float = 0.2):
    if root is None:
        raise ConfigError("imagefolder: option `root` is required (a folder with one sub-folder per class)")
    if not (isinstance(size, int) and size >= 1):
        raise ConfigError(f"imagefolder: `size` must be a positive integer, got {size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"imagefolder: `test_fraction` must be in (0, 1), got {test_fraction!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataFormatError(f"imagefolder: root folder {root} does not exist")

    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        found, absent = ("train", "test") if has_train else ("test", "train")
        raise DataFormatError(f"imagefolder: {root / found} exists but {root / absent} does not; "
                              f"make both, or put the class folders directly in {root}")
    if has_train:
        train_classes = class_files(root / "train")
        test_classes = class_files(root / "test")
        if sorted(train_classes) != sorted(test_classes):
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise DataFormatError(f"imagefolder: class folders differ between {root / 'train'} and "
                                  f"{root / 'test'}: only in train {only_train}, only in test {only_test}")
        files, labels, names = _flatten(train_classes if split == "train" else test_classes)
    else:
        files, labels, names = _flatten(class_files(root))
        few = [f"{names[c]} ({n})" for c, n in enumerate(np.bincount(labels, minlength=len(names))) if n < 2]
        if few:
            raise DataFormatError(f"imagefolder: every class needs at least 2 images in {root} (one goes to the test "
                                  f"split); too few: {', '.join(few)}. Add images, or make {root}/train/<class>/ and "
                                  f"{root}/test/<class>/ folders yourself")
        train, test = stratified_split(labels, test_fraction, SPLIT_SEED)
        keep = train if split == "train" else test
        files, labels = [files[i] for i in keep], labels[keep]

    images = np.stack([read_image(f, size) for f in files]) if files else np.zeros((0, size, size, 3), np.uint8)
    return images, labels, tuple(readable(n) for n in names)


def class_files(folder: Path) -> dict[str, list[Path]]:
    """{class folder name: sorted image files}; every class folder must hold at least one image."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataFormatError(f"imagefolder: no class folders in {folder} (expected {folder}/<class name>/<image>)")
    out = {}
    for c in classes:
        files = sorted(f for f in c.iterdir()
                       if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataFormatError(f"imagefolder: class folder {c} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        out[c.name] = files
    return out


def _flatten(classes: dict[str, list[Path]]) -> tuple[list[Path], np.ndarray, list[str]]:
    names = sorted(classes)
    files = [f for name in names for f in classes[name]]
    labels = np.array([i for i, name in enumerate(names) for _ in classes[name]], dtype=np.int64)
    return files, labels, names


def read_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the image file as RGB, centre-cropped to a square and resized."""

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataFormatError(f"imagefolder: cannot read image {path}: {e}") from e
    return square_resize(im, size)


def square_resize(im, size: int) -> np.ndarray:
    """A PIL RGB image -> (size, size, 3) uint8: centre-cropped to a square, resized with a bicubic filter."""

    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)),
                      dtype=np.uint8)
