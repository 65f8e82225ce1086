"""Deterministic index selection shared by every source: fixed train/test splits and subsamples.

Everything here is a pure function of its inputs (labels, a fraction or a count, an integer seed), so the
same call gives the same indices in every process and on every machine with the same numpy.
"""

from __future__ import annotations

import numpy as np

# The seed of every fixed train/test split. It is deliberately not the run seed: changing the run seed
# must not move items between train and test, or results across seeds would mix split variance with
# training variance (and one run's test items would be another run's training items).
SPLIT_SEED = 0


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Split indices class by class: round(n_c * test_fraction) of each class go to test.

    A class with at least 2 items keeps at least one item on each side. Returns sorted (train, test) indices.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def subsample_indices(labels: np.ndarray, max_items: int | None, seed: int) -> np.ndarray:
    """Pick `max_items` indices with each class represented in proportion to its size.

    Items are shuffled within each class, ranked by their fractional position in their class
    (k / n_c), and the lowest ranks are kept: class proportions are preserved up to rounding.
    Returns sorted indices (dataset order is kept); all indices when max_items is None or >= len.
    """
    n = len(labels)
    if max_items is None or max_items >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    rank = np.empty(n, dtype=np.float64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        rank[idx] = (np.arange(len(idx)) + rng.random()) / len(idx)
    keep = np.argsort(rank, kind="stable")[:max_items]
    return np.sort(keep)


def to_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1|3|4) uint8 -> (N, H, W, 3) uint8; grayscale is replicated to 3 channels."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] == 4:  # drop alpha
        return np.ascontiguousarray(images[..., :3])
    return images


def readable(name: str) -> str:
    """A folder or label name as it should read in a text prompt: `golden_retriever` -> `golden retriever`."""
    return " ".join(name.replace("_", " ").split())


def frozen(array: np.ndarray) -> np.ndarray:
    """Mark a cached array read-only, so that no caller can alter what later calls receive."""
    array.flags.writeable = False
    return array
