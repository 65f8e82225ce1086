"""A BLIP-2 / ChatBridge-style bridge: learnable queries read an image's spatial features and become soft prompts
of a frozen LM (Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
Language Models", ICML 2023, the Q-Former; Zhao et al., "ChatBridge: Bridging Modalities with Large Language Model
as a Language Catalyst", 2023, whose perceiver bridge does the same per modality).

N learnable queries Z (N, D) pass through `blocks` layers, each self-attention among the queries, cross-attention
to the frozen image encoder's S spatial tokens X (B, S, F), and an MLP (pre-LayerNorm residual blocks); the
result is projected to the LM's width and prepended to the prompt's token embeddings:

    V     = W_x LN(X)                                          (B, S, D)     the image tokens at the bridge's width
    Z    <- Z + SelfAttn(LN(Z));  Z <- Z + CrossAttn(LN(Z), V);  Z <- Z + MLP(LN(Z))     per block, Z (B, N, D)
    E     = W_o LN(Z) + b_o                                    (B, N, C)     soft prompts
    LM input = [E ; Embed(prompt tokens)]                      (B, N + T, C)

Everything here trains; the LM and the image encoder stay frozen. Z ~ N(0, 0.02^2) (BLIP-2's initializer_range);
W_o ~ N(0, sigma^2 / D) with sigma the standard deviation of the LM's token embeddings, b_o = 0, so the soft
prompts start at the scale of real token embeddings; the other layers keep torch's init (from a generator seeded
by `seed`: the same seed gives the same bridge).

Deviations from BLIP-2:
- A Q-Former-lite: 1-2 small blocks trained from scratch on the task, where BLIP-2's Q-Former is a 12-layer BERT
  initialised from BERT-base, with 32 queries of width 768, pre-trained in two stages (image-text contrastive,
  matching and captioning losses, then generative learning through the LLM). Here only the last stage's loss (the
  answer's NLL through the frozen LM) trains it, and its width is sized to a parameter budget.
- Pre-LayerNorm blocks (BLIP-2's BERT layers are post-LayerNorm), and no text input to the queries.
- The image tokens are the project's frozen EfficientNet-Lite0's head-conv map before its global pool (4x4 cells
  of 1280 channels at 112 px), not a ViT's patch tokens (BLIP-2 uses EVA-CLIP ViT-g's second-to-last layer).
- BLIP-2 feeds OPT the soft prompts first too ("prepended to the input text embeddings"); with the chat template
  they come before the template's system turn.
"""

from __future__ import annotations

import torch
from torch import nn


class QueryBlock(nn.Module):
    """Self-attention among the queries, cross-attention to the image tokens, MLP; pre-LayerNorm residuals."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.self_norm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, z: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.self_norm(z)  # (B, N, D)
        z = z + self.self_attn(h, h, h, need_weights=False)[0]
        z = z + self.cross_attn(self.cross_norm(z), image, image, need_weights=False)[0]  # queries read the image
        return z + self.mlp(self.mlp_norm(z))  # (B, N, D)


class QueryBridge(nn.Module):
    """(B, S, F) spatial image features -> (B, N, C) soft prompts for an LM of width C."""

    def __init__(self, feature_dim: int, hidden_size: int, width: int = 256, num_queries: int = 8, blocks: int = 1,
                 heads: int = 4, embed_std: float = 0.02, seed: int = 0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.config = {"feature_dim": feature_dim, "hidden_size": hidden_size, "width": width,
                       "num_queries": num_queries, "blocks": blocks, "heads": heads, "embed_std": embed_std}
        with torch.random.fork_rng(devices=[]):  # torch's own inits draw from the global RNG: seed it, then restore it
            torch.manual_seed(seed)
            self.feature_norm = nn.LayerNorm(feature_dim)
            self.feature_proj = nn.Linear(feature_dim, width)
            self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)  # Z
            self.blocks = nn.ModuleList(QueryBlock(width, heads) for _ in range(blocks))
            self.out_norm = nn.LayerNorm(width)
            self.out_proj = nn.Linear(width, hidden_size)
            nn.init.normal_(self.out_proj.weight, std=embed_std / width ** 0.5)
            nn.init.zeros_(self.out_proj.bias)

    @staticmethod
    def parameter_count(**config) -> int:
        with torch.device("meta"):  # shapes only, no memory
            return sum(q.numel() for q in QueryBridge(**config).parameters())

    def forward(self, spatial: torch.Tensor) -> torch.Tensor:
        image = self.feature_proj(self.feature_norm(spatial))  # (B, S, D)
        z = self.queries.unsqueeze(0).expand(spatial.shape[0], -1, -1)  # (B, N, D)
        for block in self.blocks:
            z = block(z, image)
        return self.out_proj(self.out_norm(z))  # (B, N, C)


def width_for_budget(budget: int, multiple: int = 16, **config) -> int:
    """The bridge width (a multiple of `multiple`) whose parameter count is nearest `budget`, the rest of the
    bridge as `config` says."""
    best, width = None, multiple
    while True:
        count = QueryBridge.parameter_count(**{**config, "width": width})
        if best is None or abs(count - budget) < abs(best[1] - budget):
            best = (width, count)
        if count > budget:
            return best[0]
        width += multiple
