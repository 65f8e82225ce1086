"""MEMIT: Mass-Editing Memory in a Transformer (Meng, Sharma, Andonian, Belinkov, Bau, ICLR 2023).

ROME writes one fact into one FFN; MEMIT writes a batch of B facts at once and spreads each over the
critical FFN layers R = (l_1 < ... < l_L). For every request i:

    z_i = h_i^L + delta_i      the target hidden state at the top critical layer's output (the residual
                               stream) at the subject's last token; delta_i optimised as in ROME (`key_value.fit_values`:
                               target NLL over prefixed prompts + KL on "{subject} is a" + decay, L2-clamped)

then, layer by layer from the bottom, with the keys and residuals recomputed on the model as edited so far:

    K_l = [k_1 ... k_B]        (in x B) FFN l's output-projection inputs at the subject's last token
    R_l = [r_1 ... r_B] / (L - j),   r_i = z_i - h_i^L(current)      (the j-th layer takes its share)
    Delta_l = R_l K_l^T (lambda C_l + K_l K_l^T)^-1,    W_l <- W_l + Delta_l,
    C_l = E[k k^T] over text (as in ROME, `key_value.key_covariances`), lambda = `mom2_update_weight`

Delta_l is the least-squares solution of min ||Delta K_l - R_l||^2 + lambda tr(Delta C_l Delta^T): the
new keys map to their residuals while the keys of ordinary text (weighted lambda-fold) move as little
as possible. With B = 1 and one layer this is ROME's update up to the KK^T term.

Official hyperparameters (kmeng01/memit hparams, EasyEdit hparams/MEMIT): GPT-J layers 3-8, GPT-2 XL
13-17; v_num_grad_steps 25 (GPT-2 XL 20), v_lr 0.5, clamp_norm_factor 0.75 and v_weight_decay 0.5
(GPT-J, GPT-2 XL); EasyEdit's Llama-2-7B and Llama-3.2-1B: layers 4-8, clamp 4, decay 1e-3; kl_factor
0.0625 and mom2_update_weight 15000 (GPT-2 XL 20000) everywhere; C from 1e5 Wikipedia samples.
Defaults here: EasyEdit's Llama values (SmolLM2 is a Llama), except:
- layers 3-7 of SmolLM2's 30: five layers as every official config, ending at the layer where causal
  tracing of SmolLM2 peaks (7, measured for ROME, see rome.py), as MEMIT's GPT-2 XL range 13-17 ends at
  ROME's layer 17.
- mom2_update_weight: lambda C competes with K K^T, and for a key of ordinary text k^T C^-1 k averages the
  key width d (tr(C^-1 E[k k^T]) = d), so the same lambda is a 7x stronger brake on SmolLM2 (d = 1536)
  than on Llama-2-7B (d = 11008). lambda = 15000 * 1536 / 11008 ~ 2100 keeps EasyEdit's Llama ratio
  lambda / d; give 15000 for the official value.

Deviations from the official code (kmeng01/memit, EasyEdit's memit):
- C from 2e4 tokens of the Python Language Reference (the text ROME uses here; no Wikipedia offline),
  computed for all critical layers in one pass and cached; 1 + 5 prefixes of 10 tokens as the official
  templates (the official code: also 1 + 5 of 10).
- the B target values are optimised together (`fit_values`, `value_batch` requests per batch; each
  request's delta is what a run on it alone gives, up to float rounding); the official code loops.
- the key k_i is the mean of the bare prompt's key and the prefixed prompts' mean key (as the official
  compute_ks); the edited weights are written as the loop goes (the official code restores them and adds
  the same deltas after the loop: the same model).
- requests whose subject does not occur in the prompt are refused (the official code needs it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor
from lifelong.edit.key_value import context_prefixes, fit_values, key_covariances, read_at, subject_positions
from lifelong.families.lm import decoder_layers, ffn_out, linear_weight, resolve_layer


@dataclass(frozen=True)
class Params:
    layers: tuple[int, ...] = (3, 4, 5, 6, 7)   # the critical FFN layers (negative: from the end)
    v_steps: int = 25              # passes of the target-value optimisation (official v_num_grad_steps)
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_update_weight: float = 2100.0   # lambda (official 15000; scaled by key width, see above)
    prefix_lengths: tuple[int, ...] = (10,)
    prefixes_per_length: int = 5
    corpus: str = "python-reference"
    cov_tokens: int = 20_000
    value_batch: int = 16          # requests whose values are optimised in one batch (bounds memory)
    seed: int = 0


class MEMIT(Editor):
    name = "memit"
    records = "weights"  # how a ledger records an edit: an additive weight patch
    batch = True          # apply_batch writes B requests in one update
    Params = Params

    def __init__(self, model, tokenizer, params: Params = Params()) -> None:
        super().__init__(model, tokenizer, params)
        if not params.layers:
            raise ValueError("memit: `layers` must name at least one decoder layer")
        self.layers = sorted({resolve_layer(model, layer, 0.25) for layer in params.layers})
        self.layer = self.layers[-1]  # the top critical layer: where the target values z live
        self.modules = [ffn_out(model, layer) for layer in self.layers]
        self.originals = [linear_weight(m).detach().clone() for m in self.modules]  # (out, in) each
        self._prefixes: list[str] | None = None
        self._covs: list[torch.Tensor] | None = None
        # The last batch's Delta_l, K_l (B, in) and R_l (B, D, this layer's share), for inspection and tests.
        self.last_updates: list[torch.Tensor] = []
        self.last_keys: list[torch.Tensor] = []
        self.last_residuals: list[torch.Tensor] = []

    def apply(self, request: EditRequest) -> dict:
        return self.apply_batch([request])

    def apply_batch(self, requests: list[EditRequest]) -> dict:
        if not requests:
            raise ValueError("memit: apply_batch needs at least one request")
        p, tok = self.params, self.tokenizer
        covs = self.covariances()  # before any weight changes: C is a statistic of f_0
        prefixes = self.prefixes()
        top = decoder_layers(self.model)[self.layer]
        fit = fit_values(self.model, tok, top, self.layer, requests, prefixes, steps=p.v_steps, lr=p.v_lr,
                         weight_decay=p.v_weight_decay, clamp_norm_factor=p.clamp_norm_factor,
                         kl_factor=p.kl_factor, group=p.value_batch)
        z = fit.init + fit.delta                                                   # (B, D)
        texts, positions = [], []
        for r in requests:
            t, idx = subject_positions(tok, r, prefixes)
            texts += t
            positions += idx
        n_pre = len(prefixes)
        bare = torch.arange(0, len(texts), n_pre)
        self.last_updates, self.last_keys, self.last_residuals = [], [], []
        errors = []
        for j, (module, cov) in enumerate(zip(self.modules, covs)):
            (keys, _), (_, hidden) = read_at(self.model, tok, [module, top], texts, positions)
            k = self.request_keys(keys, len(requests), n_pre)                      # (B, in)
            residual = z - hidden[bare]                                            # (B, D)
            errors.append(float(residual.norm(dim=1).mean()))
            residual = residual / (len(self.layers) - j)                           # this layer's share
            update = self.layer_update(j, k.double().T, residual.double().T, cov)  # (D, in)
            weight = linear_weight(module)
            with torch.no_grad():
                weight.add_(update.to(weight.dtype))
            self.last_updates.append(update)
            self.last_keys.append(k)
            self.last_residuals.append(residual)
        self.after_batch(texts, positions, len(requests), n_pre)
        return {"requests": float(len(requests)), "nll_before": float(fit.nll_before.mean()),
                "nll_v": float(fit.nll_after.mean()), "steps": float(fit.steps.mean()),
                "delta_norm": float(fit.delta.norm(dim=1).mean()), "z_error_first": errors[0],
                "z_error_last": errors[-1], "update_norm": float(sum(u.norm() for u in self.last_updates))}

    def reset(self) -> None:
        with torch.no_grad():
            for module, original in zip(self.modules, self.originals):
                linear_weight(module).copy_(original)
        self.last_updates, self.last_keys, self.last_residuals = [], [], []

    # ------------------------------------------------------------------ pieces

    @staticmethod
    def request_keys(keys: torch.Tensor, n_requests: int, n_pre: int) -> torch.Tensor:
        """(B, in): each request's key, the mean of its bare prompt's key and its prefixed prompts' mean key."""
        keys = keys.view(n_requests, n_pre, -1)                                    # (B, P, in)
        return 0.5 * (keys[:, 0] + keys[:, 1:].mean(1)) if n_pre > 1 else keys[:, 0]

    def layer_update(self, j: int, K: torch.Tensor, R: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Delta_l = R K^T (lambda C + K K^T)^-1 for the j-th critical layer; K (in, B), R (D, B) in float64."""
        A = self.params.mom2_update_weight * cov.double() + K @ K.T               # (in, in), symmetric
        return R @ torch.linalg.solve(A, K).T                                      # (D, in)

    def after_batch(self, texts: list[str], positions: list[int], n_requests: int, n_pre: int) -> None:
        """A hook after every batch is written (AlphaEdit remembers the batch's keys here)."""

    def prefixes(self) -> list[str]:
        if self._prefixes is None:
            p = self.params
            self._prefixes = context_prefixes(self.model, self.tokenizer, p.prefix_lengths, p.prefixes_per_length,
                                              p.seed)
        return self._prefixes

    def covariances(self) -> list[torch.Tensor]:
        if self._covs is None:
            self._covs = key_covariances(self.model, self.tokenizer, self.layers, self.params.corpus,
                                         self.params.cov_tokens)
        return self._covs


__all__ = ["MEMIT", "Params"]
