"""The building blocks of MoE-Adapters (Yu et al., "Boosting Continual Learning of Vision-Language
Models via Mixture-of-Experts Adapters", CVPR 2024; arXiv:2403.11549; code: JiazuoYu/MoE-Adapters4CL).

    y = block(x) + sum_{e in top_k(h)} G_e(x) * A_e(x),   G = softmax over the top k of h,
    h = r(x) W_g + eps * (softplus(r(x) W_noise) + 1e-2),  eps ~ N(0, 1) while training, 0 at inference

- `BottleneckAdapter`: one expert, A(x) = s * W_up relu(W_down x) (AdaptFormer's parallel adapter,
  bottleneck 64, s = 0.1, W_up = 0 at init as in the official code, so a new expert starts as a no-op).
- `NoisyTopKRouter`: Shazeer et al. 2017 noisy top-k gating (W_g = W_noise = 0 at init, as in the official
  code); it also returns the expert load: the smooth P(expert in top k | noise) summed over the batch
  while noisy, the count of selections otherwise.
- `load_balancing_loss`: cv^2(importance) + cv^2(load), importance = sum_x G(x), cv^2 = var / mean^2.
- `MixtureOfAdapters`: E experts and one router per task beside one block. `attach` hooks it onto the
  block (a forward pre-hook keeps the block's input, a forward hook adds the mixture to its output), so
  the wrapped model keeps its parameter names. With `task = None` the hooks do nothing: the model is
  exactly the original one.
- `TaskAutoencoder`: the per-task autoencoder of the Distribution Discriminative Auto-Selector (one
  hidden ReLU layer, 100 units in the official code), scored by its mean squared reconstruction error.

Routing is per sample, as in the official code (which routes on the CLS token and applies the gates to
every token): `r(x)` is the first token ("first"), the spatial mean of a feature map ("map") or the
attention-masked mean of the tokens ("masked_mean", for text). Experts run only on the samples routed to
them (sparse dispatch, as the official SparseDispatcher).

Deviations: the mixture sits beside a block through hooks instead of a rewritten block (the official
code edits CLIP's residual block), so parameter names, checkpoints and LoRA targets are unchanged; on a
feature map an expert is a per-pixel (1x1) map sampled at the block's stride; the autoencoder's output is
linear on normalised features (the official one squashes both input and output with a sigmoid); no
adapter dropout (0.1 there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NOISE_EPSILON = 1e-2  # the noise standard deviation's floor (Shazeer et al.; official code)


class BottleneckAdapter(nn.Module):
    """x (..., d_in) -> scale * up(relu(down(x))) (..., d_out)."""

    def __init__(self, d_in: int, d_out: int, bottleneck: int = 64, scale: float = 0.1):
        super().__init__()
        self.down = nn.Linear(d_in, bottleneck)
        self.up = nn.Linear(bottleneck, d_out)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.relu(self.down(x)))


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating (Shazeer et al., ICLR 2017; arXiv:1701.06538)."""

    def __init__(self, d_in: int, n_experts: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(d_in, n_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_in, n_experts))

    def forward(self, x: torch.Tensor, top_k: int, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, d_in), noise (B, E) standard normal or None -> gates (B, E), k nonzeros a row; load (E,)."""
        n_experts = self.w_gate.shape[1]
        clean = x @ self.w_gate  # (B, E)
        if noise is None:
            logits = clean
        else:
            std = F.softplus(x @ self.w_noise) + NOISE_EPSILON
            logits = clean + noise * std
        top, index = logits.topk(min(top_k + 1, n_experts), dim=1)  # one more than k: the load estimate needs it
        gates = torch.zeros_like(logits).scatter(1, index[:, :top_k], F.softmax(top[:, :top_k], dim=1))
        if noise is not None and top_k < n_experts:
            load = prob_in_top_k(clean, logits, std, top, top_k).sum(0)
        else:
            load = (gates > 0).sum(0).to(gates.dtype)
        return gates, load


def prob_in_top_k(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, top: torch.Tensor,
                  k: int) -> torch.Tensor:
    """P(expert e stays in the top k when its own noise is redrawn), (B, E): differentiable in W_g, W_noise.

    An expert in the top k stays there while its logit beats the (k+1)-th value; one outside must beat the k-th.
    """
    threshold_if_in, threshold_if_out = top[:, k : k + 1], top[:, k - 1 : k]  # (B, 1)
    prob_if_in = torch.special.ndtr((clean - threshold_if_in) / std)
    prob_if_out = torch.special.ndtr((clean - threshold_if_out) / std)
    return torch.where(noisy > threshold_if_in, prob_if_in, prob_if_out)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(x) / mean(x)^2 (0 for a single value)."""
    if x.numel() < 2:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def load_balancing_loss(gates: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """cv^2(importance) + cv^2(load), importance = gates (B, E) summed over the batch."""
    return cv_squared(gates.sum(0)) + cv_squared(load)


class MixtureOfAdapters(nn.Module):
    """`n_experts` bottleneck experts and `max_tasks` routers beside one block.

    Set by the method around a forward pass (plain attributes, never state): `task` (whose router
    routes; None = off), `noise` (a torch.Generator: noisy gating while training; None = clean gates).
    After a routed pass, `gates` (B, E) and `load` (E,) hold the last routing (`reset` clears them).
    """

    def __init__(self, d_in: int, d_out: int, *, n_experts: int, top_k: int, bottleneck: int, max_tasks: int,
                 pooling: str, scale: float = 0.1):
        super().__init__()
        if pooling not in ("first", "map", "masked_mean"):
            raise ValueError(f"pooling must be first, map or masked_mean, got {pooling!r}")
        self.experts = nn.ModuleList(BottleneckAdapter(d_in, d_out, bottleneck, scale) for _ in range(n_experts))
        self.routers = nn.ModuleList(NoisyTopKRouter(d_in, n_experts) for _ in range(max_tasks))
        self.top_k, self.pooling = top_k, pooling
        self.reset()

    def reset(self) -> None:
        self.task: int | None = None
        self.noise: torch.Generator | None = None
        self.gates = self.load = None
        self._input = self._mask = None

    def attach(self, input_module: nn.Module, output_module: nn.Module, mask_module: nn.Module | None = None) -> None:
        """Add the mixture of `input_module`'s input to `output_module`'s output (the same module for a
        block); `mask_module(input_ids, attention_mask)` gives the token mask for "masked_mean" routing."""
        input_module.register_forward_pre_hook(self._keep_input)
        output_module.register_forward_hook(self._add_mixture)
        if mask_module is not None:
            mask_module.register_forward_pre_hook(self._keep_mask)

    def _keep_input(self, module, args) -> None:
        if self.task is not None:
            self._input = args[0]

    def _keep_mask(self, module, args) -> None:
        self._mask = args[1] if self.task is not None else None

    def _add_mixture(self, module, args, output):
        if self.task is None:
            return None
        x, self._input = self._input, None
        return output + self(x, output.shape)

    def route_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) block input -> (B, d_in) what the router sees."""
        if self.pooling == "map":
            return x.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        if self.pooling == "first":
            return x[:, 0]  # (B, L, H) -> (B, H): CLS
        mask = self._mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
        return (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, x: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
        """The gated sum of the routed experts' outputs, shaped as the block's output `out_shape`."""
        noise = None
        n_experts = len(self.experts)
        if self.noise is not None:
            noise = torch.randn(x.shape[0], n_experts, generator=self.noise).to(x.device, x.dtype)  # (B, E)
        self.gates, self.load = self.routers[self.task](self.route_features(x), self.top_k, noise)
        if self.pooling == "map":  # a 1x1 conv per expert (on the block's output grid), run channels-last
            stride = math.ceil(x.shape[-1] / out_shape[-1])
            x = x[:, :, ::stride, ::stride].movedim(1, -1)  # (B, h, w, C_in)
        out = x.new_zeros(*x.shape[:-1], self.experts[0].up.out_features)
        for e in torch.unique(self.gates.nonzero()[:, 1]).tolist():
            rows = self.gates[:, e].nonzero().squeeze(1)
            y = self.experts[e](x[rows])
            out = out.index_add(0, rows, self.gates[rows, e].view(-1, *[1] * (y.dim() - 1)) * y)
        return out.movedim(-1, 1) if self.pooling == "map" else out


class TaskAutoencoder(nn.Module):
    """x (N, d) -> reconstruction (N, d) through a ReLU code of `hidden` units."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.encoder = nn.Linear(d, hidden)
        self.decoder = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(F.relu(self.encoder(x)))

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) mean squared reconstruction error per sample."""
        return (self(x) - x).pow(2).mean(dim=-1)

    def fit(self, x: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int) -> None:
        """Adam on the mean reconstruction error of seeded minibatches of `x` (N, d)."""
        g, x = torch.Generator().manual_seed(seed), x.detach()
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                index = torch.randint(len(x), (min(batch_size, len(x)),), generator=g).to(x.device)
                loss = self.errors(x[index]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
