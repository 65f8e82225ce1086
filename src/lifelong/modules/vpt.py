"""Visual Prompt Tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022; arXiv:2203.12119; official code
KMnP/vpt, src/models/vit_prompt/vit.py): learnable tokens in a frozen ViT's token sequence.

With x_0 the CLS token, E_{i-1} the patch tokens entering layer i and P_i (K, D) the prompts of layer i:

    shallow:  [x_1, Z_1, E_1] = L_1([x_0, P, E_0]);    [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}])
    deep:     [x_i, _,   E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])   for every layer i
    y = Head(x_N)   (the CLS token only: the official VIT_POOL_TYPE "original")

So the sequence grows by K tokens once, right after CLS and before the patches (no position embedding
on prompts); deep VPT *replaces* the K prompt outputs of the previous layer with the next layer's fresh
prompts (they are never accumulated), and shallow VPT lets layer i's outputs at the prompt positions
flow on as ordinary tokens. Only the prompts train; the tower stays frozen. Parameters: K * D (shallow)
and L * K * D (deep), held as one (n, K, D) tensor `embeddings`: row i enters at prompted layer i, n = 1
is shallow, n = L is deep (1 < n < L is the official code's partial-deep NUM_DEEP_LAYERS).

Checked against the official code (vit.py, config.py at 7f3942e): prompts uniform in [-v, v] with
v = sqrt(6 / (3 * patch * patch + D)) (Xavier uniform for a fan-in of one RGB patch), no prompt projection
(PROJECT = -1), prompt dropout on the prompts before they are concatenated (DROPOUT, default 0.0), the
CLS token pooled, the backbone kept in eval mode while the prompts train (its `train` override).

Deviations:
- Prompts enter at the first layer of the dual encoder's trainable trunk (families/vlm.py), after the
  frozen, cached stem. With `model.trainable_blocks` = the tower's depth (the stem is then only the patch
  embedding and CLIP's pre-LayerNorm) this is the paper's VPT; with fewer, prompts start higher up (as in the
  paper's prompt-depth ablation), and the stem cache stays valid since prompts never reach it.
- CLIP normalises its embeddings with a pre-LayerNorm before the first layer; prompts enter after it (the
  first layer's input, as deep prompts enter every later layer's), so they are not normalised by it. The
  initial scale is the official one, chosen for un-normalised patch embeddings.
- Prompt dropout is not offered: the towers here always run in inference mode (families/vlm.py), where a
  dropout never acts, so `adapter.dropout` > 0 with vpt is refused rather than silently ignored (the
  official default is 0.0 too).
- The official recipe is SGD with a base lr grid of 0.1-50 (x batch / 256), cosine, 5-10 warm-up epochs;
  here the run's optimizer and lr (train.lr) apply, as for every adapter kind.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PROMPTS = "prompts"  # the attribute of the layer stack that holds them: parameter `<stack>.prompts.embeddings`
PROMPT_PARAMETER = f"{PROMPTS}.embeddings"


class VisualPrompts(nn.Module):
    """n rows of K prompt tokens of width D; `forward(h, i)` is the token sequence entering layer i."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings)  # (n, K, D)

    @classmethod
    def init(cls, layers: int, tokens: int, dim: int, patch_size: int, generator: torch.Generator | None = None):
        """The official random init: uniform in [-v, v], v = sqrt(6 / (3 * patch^2 + D))."""
        v = math.sqrt(6.0 / (3 * patch_size * patch_size + dim))
        embeddings = (torch.rand(layers, tokens, dim, generator=generator) * 2 - 1) * v  # (n, K, D)
        return cls(embeddings)

    @property
    def tokens(self) -> int:
        return self.embeddings.shape[1]

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """h: (N, 1 + T, D) entering layer `layer` (at layer 0: CLS + patches; later: CLS + K prompt outputs
        + patches) -> (N, 1 + K + T', D) with this layer's prompts right after CLS."""
        if layer >= len(self.embeddings):
            return h  # above the prompted layers (shallow: every layer but the first)
        prompts = self.embeddings[layer].to(h.dtype).expand(h.shape[0], -1, -1)  # (N, K, D)
        rest = h[:, 1:] if layer == 0 else h[:, 1 + self.tokens :]  # deep: drop the previous layer's prompt outputs
        return torch.cat([h[:, :1], prompts, rest], dim=1)


def set_prompts(stack: nn.Module, embeddings: torch.Tensor | None) -> None:
    """Put prompts (n, K, D) on a layer stack that calls `self.prompts(h, i)` before its layer i (None: take
    them off, so the stack is the plain one again). An empty tensor means none, as a ledger patch stores it."""
    if embeddings is None or embeddings.numel() == 0:
        setattr(stack, PROMPTS, None)
    else:
        setattr(stack, PROMPTS, VisualPrompts(embeddings.detach().clone()))


def is_prompt_parameter(name: str) -> bool:
    return name == PROMPT_PARAMETER or name.endswith(f".{PROMPT_PARAMETER}")


def count_prompt_parameters(layers: int, tokens: int, dim: int, deep: bool) -> int:
    """K * D (shallow) or L * K * D (deep)."""
    return (layers if deep else 1) * tokens * dim
