"""Patches: what one change did to the model's weights, as named tensors.

A patch is additive: the model after a change is the model before it plus the patch, so a ledger's
current model is its base plus every patch in order. Two entry kinds, keyed `kind::parameter name`
(the parameter names of the plain model, without adapters):

    delta::W                     a dense weight delta (full fine-tuning of the trainable part)
    lora_A::W, lora_B::W, lora_scale::W
                                 a low-rank delta scale * B @ A (peft LoRA on a Linear or 1x1 Conv),
                                 stored as its factors: r * (in + out) numbers instead of in * out

`patch_from_model` reads either kind off a trained model; `apply_patch` adds a patch to a plain model.
"""

from __future__ import annotations

import torch

from lifelong.errors import LedgerCorruptError, LedgerError

LORA_ADAPTER = "default"  # the adapter name peft's inject_adapter_in_model uses


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """scale * B @ A for Linear (B: (out, r), A: (r, in)) and 1x1 Conv ((out, r, 1, 1), (r, in, 1, 1)) layers."""
    return (scale * (b.flatten(1) @ a.flatten(1))).view(shape)


@torch.no_grad()
def patch_from_model(model, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The patch that turns the plain model whose parameters were `before` into the trained `model`.

    LoRA layers (peft) give their factors, checked against peft's own `get_delta_weight` (a layer whose
    delta is not B @ A, e.g. a k x k convolution, is stored dense). Every other parameter that moved
    gives a dense delta; parameters that did not change are left out.
    """
    from peft.tuners.lora import LoraLayer  # heavy optional dependency, imported at first use

    patch: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or LORA_ADAPTER not in module.lora_A:
            continue
        weight = f"{name}.weight"
        a = module.lora_A[LORA_ADAPTER].weight.detach().clone()
        b = module.lora_B[LORA_ADAPTER].weight.detach().clone()
        scale = torch.tensor(float(module.scaling[LORA_ADAPTER]))
        reference = module.get_delta_weight(LORA_ADAPTER)
        if reference.shape == before[weight].shape and torch.allclose(lora_delta(a, b, scale, reference.shape), reference, atol=1e-6):
            patch.update({f"lora_A::{weight}": a, f"lora_B::{weight}": b, f"lora_scale::{weight}": scale})
        else:
            patch[f"delta::{weight}"] = reference.clone()
    # Every other parameter that moved, trainable or not (a method may fold an adapter into frozen
    # weights, as O-LoRA does), under its plain-model name.
    check_recordable(model, before)
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        delta = p.detach() - before[plain]
        if delta.any():
            key = f"delta::{plain}"
            patch[key] = patch[key] + delta if key in patch else delta
    return patch


def check_recordable(model, before: dict[str, torch.Tensor], method: str = "the method") -> None:
    """Refuse a model with modules the plain model lacks (beside peft LoRA): a patch cannot hold them."""
    for name, _ in model.named_parameters():
        if "lora_" not in name and name.replace(".base_layer.", ".") not in before:
            raise LedgerError(f"{method} adds modules the plain model does not have (e.g. {name!r}); a ledger records "
                              "weight changes and LoRA adapters, not new modules (yet): use `lifelong run` for it")


def dense_patch(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A patch of dense deltas between two full parameter sets (what a replayed revert records)."""
    return {f"delta::{n}": after[n] - before[n] for n in after if not torch.equal(after[n], before[n])}


def negate(patch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The patch that undoes `patch` (B and the scale keep their sign on one factor only)."""
    out = {}
    for key, t in patch.items():
        kind = key.partition("::")[0]
        out[key] = -t if kind in ("delta", "lora_scale") else t.clone()
    return out


@torch.no_grad()
def apply_patch(model, patch: dict[str, torch.Tensor], where: str = "patch") -> None:
    """Add `patch` to a plain model's parameters in place."""
    params = dict(model.named_parameters())
    for key, t in patch.items():
        kind, _, name = key.partition("::")
        if kind in ("lora_A", "lora_scale"):
            continue  # used with their lora_B entry
        if name not in params:
            raise LedgerCorruptError(f"{where} changes the parameter {name!r}, which this model does not have")
        p = params[name]
        if kind == "delta":
            delta = t
        elif kind == "lora_B":
            delta = lora_delta(patch[f"lora_A::{name}"], t, patch[f"lora_scale::{name}"], p.shape)
        else:
            raise LedgerCorruptError(f"{where}: unknown entry {key!r}")
        if delta.shape != p.shape:
            raise LedgerCorruptError(f"{where}: {name} has shape {tuple(p.shape)}, the patch {tuple(delta.shape)}")
        p.add_(delta.to(p.dtype))


def patch_numel(patch: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in patch.values())
