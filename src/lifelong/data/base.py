"""The in-memory dataset every source returns, and the task a stream is made of."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image set held in memory.

    images: (N, H, W, 3) uint8 RGB, one size per dataset (the family resizes).
    labels: (N,) int64 in [0, len(class_names)).
    fingerprint: SHA-256 over the pixels, the labels and the class names: it names this exact split.
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be (N, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint(self.images, self.labels, self.class_names))

    def __len__(self) -> int:
        return len(self.labels)


def fingerprint(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update("\x00".join(class_names).encode())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Task:
    """One step of a stream.

    class_ids: the stream-global ids of this task's classes; `train.labels`/`test.labels` index
    into `train.class_names` (local ids), and class_ids[local] is the global id.
    """

    name: str
    train: ImageDataset
    test: ImageDataset
    class_ids: tuple[int, ...]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names


@dataclass(frozen=True, eq=False)
class Stream:
    """An ordered list of tasks.

    scenario: "task" (task-incremental, MTIL: classify among the task's own classes) or
    "class" (class-incremental: classify among all classes seen so far).
    class_names: every class of the stream, indexed by global id.
    """

    name: str
    scenario: str
    tasks: tuple[Task, ...]
    class_names: tuple[str, ...]
