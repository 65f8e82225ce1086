"""Multimodal LLaMA-Adapter: an image's global feature, projected, added to the zero-init gated adaption prompts
(Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of Large Language Models with Zero-initialized Attention",
ICLR 2024, Sec. 3.3 "Multi-modal Reasoning"; arXiv:2303.16199; official code github.com/OpenGVLab/LLaMA-Adapter).

A frozen image encoder gives the image's global feature f (F,); a learnable projection maps it to the LM's width,
and the result is added to each of the K adaption prompts of every adapted layer l (the top L):

    I_p   = LN(W_p f + b_p)                                      (B, C)      the visual prompt
    P_l^v = P_l + Repeat_K(I_p)                                  (B, K, C)   per image
    S_l   = Q_l (P_l^v W_k)^T / sqrt(d_head)                     (B, H, T, K)
    out_l = Attn_l(X_l) + W_o [ g_l * softmax(S_l) (P_l^v W_v) ]  (B, T, C)

the rest as in the text-only adapter (modules/llama_adapter.py: the prompts' own softmax, no position on the
prompt keys, grouped key/value heads repeated, W_o without its bias). With g_l = 0 the added term is a product
by zero, so at initialisation the logits are bit-identical to the base LM's whatever the image (tested). Trains
P_l ~ N(0, 1), g_l = 0, W_p, b_p (nn.Linear's init) and LN's affine: L * (K * C + 1) + F * C + 3 * C parameters.
Only the LM's forward runs per step: the image encoder's features are computed once per image (adapt/seeing.py).

Where the code comes from: written here for Llama/Mistral and GPT-2, as forward hooks on the top L attention
modules (the model's own parameter names do not change; `detach()` takes them off). peft's adaption prompt
cannot be used: it holds one (1, K, C) prompt per layer shared by the whole batch (`.view(1, K, ...)`), and the
visual prompt makes it one per image. The GPT-2 term is modules/llama_adapter.gpt2_prompt_term, the Llama term
`llama_prompt_term` below (the same arithmetic as peft's AdaptedAttention, with a per-image prompt).

Deviations from the paper:
- The projection is one linear layer followed by a LayerNorm, as `visual_proj` + `visual_proj_norm` of the
  official v2 multimodal code (llama_adapter_v2_multimodal7b/llama/llama_adapter.py, where the projected visual
  query is likewise added to every adapted layer's prompts: `dynamic_adapter = adapter[i] + visual_query`). The
  LayerNorm puts I_p on the unit scale of the N(0, 1) prompts. v1 describes a projection of the concatenated
  multi-scale CLIP features; here f is one global feature, the pooled output of the project's frozen
  EfficientNet-Lite0 (ImageNet) tower, not CLIP's; v2's visual query tokens and transformer blocks are left
  out (that is what the bridge of modules/query_bridge.py does instead).
- The gate is one scalar g_l per layer without tanh, as in modules/llama_adapter.py (same start, see there).
- Prompts and projection are drawn from a generator seeded by `seed`: the same seed gives the same adapter.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lifelong.modules.llama_adapter import gpt2_prompt_term

MODEL_TYPES = ("llama", "mistral", "gpt2")


class MultimodalAdapter(nn.Module):
    """Adaption prompts plus a visual projection; `attach(lm)` hooks them into the top `adapter_layers` attention
    layers, and every forward of the LM must run inside `with adapter.seeing(features):` (the images' features)."""

    def __init__(self, model_type: str, hidden_size: int, feature_dim: int, adapter_len: int = 10,
                 adapter_layers: int = 8, seed: int = 0):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"the multimodal adapter supports model types {', '.join(MODEL_TYPES)}, not {model_type!r}")
        if adapter_len < 1 or adapter_layers < 1:
            raise ValueError(f"adapter_len and adapter_layers must be >= 1, got {adapter_len}, {adapter_layers}")
        self.config = {"model_type": model_type, "hidden_size": hidden_size, "feature_dim": feature_dim,
                       "adapter_len": adapter_len, "adapter_layers": adapter_layers}
        g = torch.Generator().manual_seed(seed)
        self.prompts = nn.Parameter(torch.randn(adapter_layers, adapter_len, hidden_size, generator=g))  # P_l
        self.gates = nn.Parameter(torch.zeros(adapter_layers))  # g_l = 0: the base model at init
        self.visual_proj = nn.Linear(feature_dim, hidden_size)
        bound = 1 / math.sqrt(feature_dim)  # nn.Linear's own init, from the seeded generator
        with torch.no_grad():
            self.visual_proj.weight.copy_(torch.rand(hidden_size, feature_dim, generator=g) * 2 * bound - bound)
            self.visual_proj.bias.copy_(torch.rand(hidden_size, generator=g) * 2 * bound - bound)
        self.visual_norm = nn.LayerNorm(hidden_size)
        self._visual: torch.Tensor | None = None  # (B, C): I_p of the images being read, set by `seeing`
        self._handles: list = []

    @staticmethod
    def parameter_count(hidden_size: int, feature_dim: int, adapter_len: int, adapter_layers: int) -> int:
        return adapter_layers * (adapter_len * hidden_size + 1) + feature_dim * hidden_size + 3 * hidden_size

    def attach(self, lm: nn.Module) -> MultimodalAdapter:
        """Hook into the top L attention layers of `lm` (a transformers Llama/Mistral or GPT-2 causal LM)."""
        if self._handles:
            raise ValueError("this adapter is attached already: detach() first")
        model_type = getattr(lm.config, "model_type", None)
        if model_type != self.config["model_type"] or lm.config.hidden_size != self.config["hidden_size"]:
            raise ValueError(f"this adapter was built for a {self.config['model_type']} of width "
                             f"{self.config['hidden_size']}, not a {model_type} of width {lm.config.hidden_size}")
        blocks = getattr(lm.base_model, "layers", None) or lm.base_model.h  # Llama: model.layers; GPT-2: transformer.h
        n = self.config["adapter_layers"]
        if n > len(blocks):
            raise ValueError(f"adapter_layers={n} but the model has {len(blocks)} layers")
        for i, block in enumerate(blocks[-n:]):
            attn = block.attn if model_type == "gpt2" else block.self_attn
            self._handles.append(attn.register_forward_hook(partial(self._hook, i), with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def seeing(self, features: torch.Tensor):
        """Forwards of the LM inside read the images whose global features are `features` (B, F), one per sequence."""
        self._visual = self.visual_norm(self.visual_proj(features))  # (B, C): I_p
        try:
            yield self
        finally:
            self._visual = None

    def _hook(self, i: int, attn: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        if self._visual is None:
            raise RuntimeError("the multimodal adapter has no image: run the LM inside `with adapter.seeing(features):`")
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, C)
        prompt = self.prompts[i].unsqueeze(0) + self._visual.unsqueeze(1)  # (B, K, C): P_l + Repeat_K(I_p)
        if self.config["model_type"] == "gpt2":
            added = gpt2_prompt_term(attn, hidden, prompt, self.gates[i])
        else:
            added = llama_prompt_term(attn, hidden, kwargs["position_embeddings"], prompt, self.gates[i])
        out, *rest = output
        return (out + added, *rest)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def llama_prompt_term(attn: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      prompt: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """W_o [g * softmax(Q K_p^T / sqrt(d)) V_p] of a Llama/Mistral attention for its input `hidden` (B, T, C) and
    prompts `prompt` (1 or B, K, C): the word tokens' queries with RoPE, the prompt keys without position."""
    b, t, _ = hidden.shape
    k_len, d = prompt.shape[1], attn.head_dim
    cos, sin = position_embeddings  # (B, T, d) each, what the layer's own attention rotates with
    q = attn.q_proj(hidden).view(b, t, -1, d).transpose(1, 2)  # (B, H, T, d)
    q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)  # RoPE
    k = attn.k_proj(prompt).view(prompt.shape[0], k_len, -1, d).transpose(1, 2)  # (1 or B, H_kv, K, d)
    v = attn.v_proj(prompt).view(prompt.shape[0], k_len, -1, d).transpose(1, 2)  # (1 or B, H_kv, K, d)
    groups = q.shape[1] // k.shape[1]  # grouped-query attention: each key/value head serves `groups` query heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (1 or B, H, K, d)
    scores = q @ k.transpose(2, 3) / math.sqrt(d)  # (B, H, T, K)
    probs = gate * F.softmax(scores.float(), dim=-1).to(q.dtype)  # the prompts' own softmax, gated
    added = (probs @ v).transpose(1, 2).reshape(b, t, -1)  # (B, T, H * d)
    return F.linear(added, attn.o_proj.weight)  # W_o; a bias of o_proj is in the word path already
