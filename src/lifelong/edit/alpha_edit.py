"""AlphaEdit: null-space constrained knowledge editing (Fang, Jiang, Wang, Ma, Shi, Wang, He, Chua, ICLR 2025).

MEMIT (memit.py) trades the new keys' fit against the keys of ordinary text with a soft penalty
lambda tr(Delta C Delta^T), so sequential batches slowly erode what the model knew and what earlier batches
wrote. AlphaEdit projects every update onto the null space of the preserved knowledge instead: with
C = E[k k^T] over text (the same covariance as MEMIT), P = U0 U0^T where U0 are C's eigenvectors of
eigenvalue below `nullspace_threshold`, an update Delta P leaves every preserved key k (C k != 0 along
U0's complement) where it was: (Delta P) k ~ 0. Per critical layer, as in MEMIT's loop:

    Delta_l = R_l K_l^T P (P (K_l K_l^T + K_p K_p^T) + L2 I)^-T       (official: solve(P (K K^T + cache_c)
                                                                         + L2 I, P K R^T), transposed)

K_p K_p^T (`cache_c`) holds the keys of every batch already written by this editor (recomputed on the
model after each batch, as the official code does), so a new batch is also asked not to move the old
edits' keys. The target values z, the keys and the layer-by-layer residual spreading are MEMIT's.

Official code (jianghoucheng/AlphaEdit, AlphaEdit_main.py and experiments/evaluate.py's get_project) and its
Llama3-8B hparams: MEMIT's z settings, nullspace_threshold 2e-2 (absolute, on the singular values of C),
L2 = 10, P computed once on the unedited model.
Deviations:
- the z settings are this project's MEMIT's (EasyEdit's Llama values, layers 3-7 of SmolLM2; memit.py), so
  that the two differ only by the projection, as in the paper's own MEMIT/AlphaEdit hparams pair.
- C is MEMIT's here (2e4 tokens of the Python Language Reference, not 1e5 Wikipedia samples), so the count
  of eigenvalues under the absolute threshold differs from the paper's model; `apply_batch` reports the
  null space's dimension per layer (`null_dim_*`), and a threshold that leaves none is refused.
- a ledger records the edit as a weight patch: a later change's AlphaEdit starts with an empty cache_c
  (within one change, its batches and sequential requests share it, as in the official runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.edit.key_value import read_at
from lifelong.edit.memit import MEMIT
from lifelong.edit.memit import Params as MemitParams


@dataclass(frozen=True)
class Params(MemitParams):
    nullspace_threshold: float = 2e-2   # eigenvalues of C below it span the null space (official 2e-2)
    L2: float = 10.0                    # the ridge on Delta P (official 10)


class AlphaEdit(MEMIT):
    name = "alphaedit"
    records = "weights"
    batch = True
    Params = Params

    def __init__(self, model, tokenizer, params: Params = Params()) -> None:
        super().__init__(model, tokenizer, params)
        self._projections: list[torch.Tensor] | None = None
        self.cache: list[torch.Tensor | None] = [None] * len(self.layers)  # K_p K_p^T per layer

    def projections(self) -> list[torch.Tensor]:
        """P_l = U0 U0^T per critical layer, from the unedited model's key covariance (computed once)."""
        if self._projections is None:
            self._projections = []
            for layer, cov in zip(self.layers, self.covariances()):
                U, S, _ = torch.linalg.svd(cov.double())
                null = U[:, S < self.params.nullspace_threshold]
                if null.shape[1] == 0:
                    raise ValueError(f"alphaedit: no eigenvalue of layer {layer}'s key covariance is below "
                                     f"nullspace_threshold={self.params.nullspace_threshold:g} (smallest "
                                     f"{float(S.min()):.3g}); give a larger threshold")
                self._projections.append(null @ null.T)
        return self._projections

    def layer_update(self, j: int, K: torch.Tensor, R: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        P = self.projections()[j]
        kept = K @ K.T if self.cache[j] is None else K @ K.T + self.cache[j]
        A = P @ kept + self.params.L2 * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        return torch.linalg.solve(A, P @ K @ R.T).T                                # (D, in)

    def after_batch(self, texts: list[str], positions: list[int], n_requests: int, n_pre: int) -> None:
        """Remember the batch's keys, read on the model as now edited (the official cache_c update)."""
        for j, module in enumerate(self.modules):
            ((keys, _),) = read_at(self.model, self.tokenizer, [module], texts, positions)
            k = self.request_keys(keys, n_requests, n_pre).double().T               # (in, B)
            self.cache[j] = k @ k.T if self.cache[j] is None else self.cache[j] + k @ k.T

    def apply_batch(self, requests) -> dict:
        stats = super().apply_batch(requests)
        stats.update({f"null_dim_{layer}": float(torch.trace(P)) for layer, P in zip(self.layers, self.projections())})
        return stats

    def reset(self) -> None:
        super().reset()
        self.cache = [None] * len(self.layers)


__all__ = ["AlphaEdit", "Params"]
