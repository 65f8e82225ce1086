"""The `lm` family: any transformers causal LM (Llama-style and GPT-2-style decoders).

Layer access for editors lives here so that methods never hard-code a module path:
`decoder_layers(model)`, `ffn_out(model, l)` (the FFN's output projection: Llama `mlp.down_proj`,
GPT-2 `mlp.c_proj`), and `linear_weight(module)`, which returns that projection's weight as
(out_features, in_features) whatever the storage (GPT-2's Conv1D stores it transposed).
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: no decoder layers found (expected model.layers or transformer.h)")
    return layers


def ffn_out(model: nn.Module, layer: int) -> nn.Module:
    block = decoder_layers(model)[layer]
    mlp = block.mlp
    return mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D computes x @ W + b with W of shape (in, out)."""
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a view, so in-place edits reach the module."""
    return module.weight.T if is_transposed(module) else module.weight
