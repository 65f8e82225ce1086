"""Personalization metrics: how close generated images of a subject come to its real images.

Subject fidelity (Ruiz et al., DreamBooth, CVPR 2023, sec. 4.1): the mean cosine similarity over every pair
(generated image g, real image r) of their embeddings by an image network phi,

    fidelity(G, R) = 1 / (|G| |R|) * sum_{g in G} sum_{r in R} <phi(g), phi(r)> / (||phi(g)|| ||phi(r)||)

DINO (ViT-S/16 self-supervised features) in the paper's DINO score, CLIP's image encoder in its CLIP-I score.
Here phi is whatever network gives the features (the benches pass the judge's and the embedded EfficientNet's),
so the value is on that network's scale: read it against the same network's value for a reference pair of
sets (real vs real, the base model's class samples vs real), never against the paper's numbers.
"""

from __future__ import annotations

import numpy as np


def mean_pairwise_cosine(a, b) -> float:
    """The mean cosine similarity of every row of `a` (N, D) with every row of `b` (M, D) (formula above)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"two non-empty feature sets of one width, not {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a @ b.T).mean())
