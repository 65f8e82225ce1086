"""ROME: Rank-One Model Editing (Meng, Bau, Andonian, Belinkov, NeurIPS 2022, "Locating and Editing
Factual Associations in GPT").

One edit rewrites one FFN output projection W (out x in) so that the subject's key k* (the
projection's input at the subject's last token) maps to a value v* that makes the model say the
new object, while keys of other text move as little as possible (least squares under C):

    W <- W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*),      C = E[k k^T] over a text corpus

- k*: the key averaged over the bare prompt and the prompt behind short texts that the model itself
  samples (top-5) from the paper's seed words ("The", "Therefore", ...): `prefixes_per_length` texts
  for each of `prefix_lengths`.
- v* = W k* + delta. delta is optimised (Adam, `v_steps` steps, `v_lr`) while it is added to the FFN
  output at the subject's last token of every prefixed prompt, minimising
      NLL(target) + kl_factor * KL(P_edited || P_0)[next token of "{subject} is a"]
      + v_weight_decay * ||delta|| / ||o||^2,      ||delta|| <= clamp_norm_factor * ||o||
  with o the FFN output at the subject's last token of the bare prompt (the official compute_v:
  these exact terms, the un-squared decay, the 5e-2 early stop).
- C: the uncentered second moment of the projection's inputs over `cov_tokens` tokens of a corpus,
  computed once per (model, layer, corpus, size) and cached as safetensors under
  `cache_dir()/rome/`. There is no Wikipedia offline, so the corpus is the Python Language Reference
  that ships inside every CPython (`pydoc_data.topics`: ~465k characters of English prose about
  Python, ~113k SmolLM2 tokens). It is narrower than Wikipedia; C only needs to be a reasonable
  estimate of which key directions ordinary text uses.

Defaults: EasyEdit's Llama hparams (v_lr 0.5, 25 steps, weight decay 1e-3, clamp 4, kl 0.0625) with
the paper's covariance adjustment on (EasyEdit switches it off for Llama for lack of statistics; we
have them). Layer 7 of SmolLM2's 30: ROME edits the early-middle MLP where causal tracing peaks
(GPT-2 XL 17/48; EasyEdit uses 5 for Llama-2-7B and Llama-3.2-1B). Measured on SmolLM2 (12 "The
capital of X is" facts, subject embeddings noised at 3x their std, clean MLP outputs restored at the
subject's last token over a window of 5 layers, mean gain in P(capital)): windows that include
layer 0 (centred on 0-2) restore the token itself (+0.44, the embedding-like first MLP); past them
the effect peaks at layer 7 (+0.071; layers 5, 6, 8: +0.049, +0.049, +0.046) and is below +0.002 from layer 16 on.

The key, C and the value come from `key_value.py` (shared with MEMIT): the KL prompt rides in the
same batch as the prefixed prompts (as the official compute_v does), the blocks below the edited one
run once per edit, and the output layer only where the loss reads it.

Deviations: 10 prefixes (5 of 5 tokens, 5 of 10) instead of 20, and C from 2e4 tokens of the Python
reference instead of 1e5 Wikipedia samples, both for CPU time (C took ~2.5 min on a busy shared core,
then is cached; a first edit with a cold cache took 87 s on a quieter one); the closed form uses the
averaged key k* on both sides (the paper's equation; the official code takes the bare prompt's key
for W k*). On SmolLM2 one edit takes 30-50 s on one shared CPU core (each of up to 25 steps is a
forward and backward pass over the 11 prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor
from lifelong.edit.key_value import (  # noqa: F401 - corpus_chunks, key_covariance: re-exported for old imports
    capture_io,
    context_prefixes,
    corpus_chunks,
    fit_values,
    key_covariance,
    read_at,
    subject_last_token,
    subject_positions,
)
from lifelong.families.lm import ffn_out, linear_weight, resolve_layer


@dataclass(frozen=True)
class Params:
    layer: int = 7                 # which FFN output projection to rewrite (negative counts from the end)
    v_steps: int = 25              # Adam steps on delta
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    prefix_lengths: tuple[int, ...] = (5, 10)   # tokens per sampled prefix, one group per length
    prefixes_per_length: int = 5
    mom2_adjustment: bool = True   # False: C = I (plain least-norm rank-one update)
    corpus: str = "python-reference"
    cov_tokens: int = 20_000
    seed: int = 0


class ROME(Editor):
    name = "rome"
    records = "weights"  # how a ledger records an edit: an additive weight patch
    Params = Params

    def __init__(self, model, tokenizer, params: Params = Params()) -> None:
        super().__init__(model, tokenizer, params)
        self.layer = resolve_layer(model, params.layer, 0.25)
        self.module = ffn_out(model, self.layer)
        self.original = linear_weight(self.module).detach().clone()  # (out, in): reset copies it back
        self._prefixes: list[str] | None = None
        self._cov: torch.Tensor | None = None
        # The last edit's closed-form pieces, for inspection and tests.
        self.last_key = self.last_value = self.last_update = None

    # ------------------------------------------------------------------ the edit

    def apply(self, request: EditRequest) -> dict:
        p, tok = self.params, self.tokenizer
        prefixes = self.prefixes()
        texts, idxs = subject_positions(tok, request, prefixes)
        ((inputs, _),) = read_at(self.model, tok, [self.module], texts, idxs)
        key = inputs.mean(0)                                            # k*: (in,)
        fit = fit_values(self.model, tok, self.module, self.layer, [request], prefixes, steps=p.v_steps, lr=p.v_lr,
                         weight_decay=p.v_weight_decay, clamp_norm_factor=p.clamp_norm_factor,
                         kl_factor=p.kl_factor)
        delta = fit.delta[0]
        weight = linear_weight(self.module)
        value = weight.detach().float() @ key + delta                   # v* = W k* + delta
        u = self.covariance_solve(key) if p.mom2_adjustment else key   # C^-1 k*
        update = torch.outer(value - weight.detach().float() @ key, u) / (u @ key)  # (out, in), rank one
        with torch.no_grad():
            weight.add_(update.to(weight.dtype))
        self.last_key, self.last_value, self.last_update = key, value, update
        return {"nll_before": float(fit.nll_before[0]), "nll_v": float(fit.nll_after[0]), "steps": float(fit.steps[0]),
                "delta_norm": float(delta.norm()), "update_norm": float(update.norm())}

    def reset(self) -> None:
        with torch.no_grad():
            linear_weight(self.module).copy_(self.original)
        self.last_key = self.last_value = self.last_update = None

    # ------------------------------------------------------------------ pieces

    def prefixes(self) -> list[str]:
        """"" and the sampled prefixes, each ending in ". " (sampled once per editor, seeded)."""
        if self._prefixes is None:
            p = self.params
            self._prefixes = context_prefixes(self.model, self.tokenizer, p.prefix_lengths, p.prefixes_per_length,
                                              p.seed)
        return self._prefixes

    def covariance_solve(self, key: torch.Tensor) -> torch.Tensor:
        if self._cov is None:
            self._cov = key_covariance(self.model, self.tokenizer, self.layer, self.params.corpus,
                                       self.params.cov_tokens)
        return torch.linalg.solve(self._cov.double(), key.double()).float()


__all__ = ["ROME", "Params", "capture_io", "subject_last_token"]
