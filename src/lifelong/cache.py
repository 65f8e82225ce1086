"""The one disk cache: content-keyed safetensors files, written atomically, recomputed when damaged.

What does not change between runs is computed once and kept under `$LIFELONG_CACHE` (default
`~/.cache/lifelong`): the frozen image stem's outputs, request filters, ROME's key statistics, MEND's
trained editors, zero-shot accuracy rows, text-encoder states of fixed prompts. A key is a digest of
everything the value depends on (weights, data fingerprints, settings), so a stale entry is never read:
a changed input is a different file. A file that fails to parse is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load, save

from lifelong.atomic import atomic_write_bytes, atomic_write_json

Tensors = dict[str, torch.Tensor]


def cache_dir() -> Path:
    return Path(os.environ.get("LIFELONG_CACHE", Path.home() / ".cache" / "lifelong"))


def content_key(*parts) -> str:
    """A short SHA-256 of JSON-serialisable parts (strings, numbers, lists, dicts): the file name of an entry."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_path(namespace: str, key: str, suffix: str = ".safetensors") -> Path:
    return cache_dir() / namespace / f"{key}{suffix}"


def load_cached(namespace: str, key: str) -> Tensors | None:
    """The entry's tensors, or None when it is absent or unreadable (then the caller recomputes it)."""
    path = cache_path(namespace, key)
    try:
        return load(path.read_bytes())  # one read: a concurrent atomic replace cannot mix two versions
    except Exception:  # noqa: BLE001 - any damage (missing, truncated, foreign) means recompute
        return None


def store_cached(namespace: str, key: str, tensors: Tensors, metadata: dict[str, str] | None = None) -> Path:
    return atomic_write_bytes(cache_path(namespace, key), save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata))


def cached(namespace: str, key: str, compute: Callable[[], Tensors]) -> Tensors:
    """`compute()`'s tensors, from the cache when this key was computed before."""
    hit = load_cached(namespace, key)
    if hit is not None:
        return hit
    value = compute()
    store_cached(namespace, key, value)
    return value


def load_cached_json(namespace: str, key: str):
    """A JSON entry's value, or None when it is absent or unreadable."""
    try:
        return json.loads(cache_path(namespace, key, ".json").read_text())
    except (OSError, ValueError):
        return None


def store_cached_json(namespace: str, key: str, value) -> Path:
    return atomic_write_json(cache_path(namespace, key, ".json"), value, indent=None)
