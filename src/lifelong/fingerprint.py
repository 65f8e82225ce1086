"""SHA-256 of named tensors: the one content hash behind a ledger's base hash, cache keys and digests."""

from __future__ import annotations

import hashlib
import json

import torch


def tensor_digest(tensors: dict[str, torch.Tensor], prefix: bytes = b"") -> str:
    """SHA-256 of `prefix`, then every tensor in name order: its name, dtype and shape (JSON) and bytes."""
    h = hashlib.sha256(prefix)
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
