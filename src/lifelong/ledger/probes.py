"""Probe suites: what a ledger measures after every change.

A probe is one labelled test set and a score on it. For the `vlm` family the score is top-1 accuracy
(%) among the test set's own class names (task-incremental, as MTIL), so a probe of a dataset the
model never trained on measures its zero-shot ability, and the probe a `learn` change adds for its
own task measures what the change learned. Every change runs every probe registered so far; the
ledger keeps the scores before and after, which makes the interference matrix (change x probe).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch

from lifelong.data.base import ImageDataset
from lifelong.data.sources import load_source
from lifelong.loop import count_correct

# The held-out zero-shot suite a new ledger gets when `lifelong init` names no probe: the test sets of
# the five mtil-mini sources, as that stream uses them.
DEFAULT_PROBES = (
    {"source": "fashion-mnist", "options": {"invert": True}},
    {"source": "mnist", "options": {"invert": True}},
    {"source": "lfw", "options": {}},
    {"source": "glyphs", "options": {"invert": True}},
    {"source": "digits", "options": {"invert": True}},
)


@dataclass(frozen=True)
class Probe:
    """One test set: `load_source(source, "test", max_items=test_items, seed=seed, **options)`."""

    name: str
    source: str
    options: dict = field(default_factory=dict)
    test_items: int | None = 500
    seed: int = 0
    origin: str = "init"  # "init", or the change that registered it ("change 3")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Probe:
        return cls(**raw)

    def same_data(self, other: Probe) -> bool:
        return (self.source, self.options, self.test_items, self.seed) == (other.source, other.options, other.test_items, other.seed)

    def dataset(self) -> ImageDataset:
        return _load_test_set(self.source, json.dumps(self.options, sort_keys=True), self.test_items, self.seed)


@lru_cache(maxsize=32)
def _load_test_set(source: str, options_json: str, test_items: int | None, seed: int) -> ImageDataset:
    return load_source(source, "test", max_items=test_items, seed=seed, **json.loads(options_json))


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`, ... when a probe of that name exists."""
    if name not in taken:
        return name
    k = 2
    while f"{name}-{k}" in taken:
        k += 1
    return f"{name}-{k}"


@torch.no_grad()
def run_probes(model, probes: list[Probe], batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy (%) of `model` on every probe, each among its own classes."""
    from lifelong.runner import stem_outputs

    scores = {}
    for probe in probes:
        data = probe.dataset()
        inputs = stem_outputs(model, data, batch_size)  # from the disk cache after the first time
        correct = count_correct(model, inputs, torch.as_tensor(data.labels), data.class_names, batch_size)
        scores[probe.name] = 100.0 * correct / len(data)
    return scores
