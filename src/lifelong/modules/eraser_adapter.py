"""Eraser adapters (Receler, Huang et al. 2023): a small residual MLP after each cross-attention layer.

    o_l = CrossAttn_l(h, c)                           the layer's output (B, HW, C), after its to_out
    o_l <- o_l + E_l(o_l),  E_l(o) = W_up GELU(W_down o + b_down) + b_up
                                                      W_down: (rank, C), W_up: (C, rank), W_up = 0 and b_up = 0
                                                      at creation, so a new eraser starts as the identity

As the official `AdapterEraser` and `AttentionWithEraser` (jasper0314-huang/Receler,
receler/erasers/utils.py and diffusers_erasers.py), with one difference in how it is attached: the
official code replaces `attn2` with a wrapper (so the UNet's parameter names change, `attn2.attn.to_k`);
here the erasers live in an `EraserStack` registered as the submodule `eraser` of each `attn2`, applied by a
forward hook. The UNet's own parameter names stay as they were (`attn2.to_k`: what UCE, Ablating
Concepts and the ledger's patches name), the erasers move with `.to()`, follow `train()/eval()` and
survive `copy.deepcopy` (the hook is a module-level function that reads the copy's own stack), and their
parameters are named `...attn2.eraser.<set>.down.weight`.

Erasers stack: each Receler erasure adds one set (one eraser per cross-attention layer), applied in order
after the earlier sets, o <- o + E_1(o), then o <- o + E_2(o), ... `eraser_state` / `load_erasers` write
and read every set (`<set>/<layer>/<param>`); `remove_erasers` takes them all off and leaves the UNet
exactly as it was before the first one.
"""

from __future__ import annotations

import torch
from torch import nn

ERASER = "eraser"  # the submodule name of an attn2's EraserStack


class AdapterEraser(nn.Module):
    """E(o) = up(GELU(down(o))), up zero-initialised. `enabled` False: E(o) = 0 (the official DisableEraser)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(o)))  # (B, HW, C)


class EraserStack(nn.ModuleList):
    """The eraser sets of one cross-attention layer, applied in order: o <- o + E_i(o)."""

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        for eraser in self:
            if eraser.enabled:
                o = o + eraser(o)
        return o


def _apply_erasers(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """attn2's forward hook: its output through its own stack (looked up on the module: deepcopy-safe)."""
    stack = getattr(module, ERASER, None)
    return output if stack is None else stack(output)


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Every cross-attention layer of a diffusers UNet (the `attn2` of each transformer block), by name."""
    return {name: m for name, m in unet.named_modules() if name.endswith("attn2") and hasattr(m, "to_out")}


def _stack(attn: nn.Module) -> EraserStack:
    stack = getattr(attn, ERASER, None)
    if stack is None:
        stack = EraserStack()
        attn.add_module(ERASER, stack)
    if _apply_erasers not in attn._forward_hooks.values():
        attn.register_forward_hook(_apply_erasers)
    return stack


def add_erasers(unet: nn.Module, rank: int, seed: int = 0) -> dict[str, AdapterEraser]:
    """A new eraser set: one AdapterEraser after each cross-attention layer (down drawn from `seed`, up zero),
    appended to the layers' stacks; returns them by layer name. The model's output is unchanged until
    they train (up = 0)."""
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError("the UNet has no cross-attention layer (attn2) to put an eraser after")
    device = next(unet.parameters()).device
    new = {}
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's generator left alone
        torch.manual_seed(seed)
        for name, attn in layers.items():
            eraser = AdapterEraser(attn.to_out[0].out_features, rank).to(device)
            _stack(attn).append(eraser)
            new[name] = eraser
    return new


def eraser_sets(unet: nn.Module) -> int:
    """How many eraser sets are attached (0: none)."""
    stacks = [getattr(m, ERASER, None) for m in cross_attention_layers(unet).values()]
    return max((len(s) for s in stacks if s is not None), default=0)


def remove_erasers(unet: nn.Module) -> None:
    """Take every eraser off: the UNet is again exactly the module it was before the first `add_erasers`."""
    for attn in cross_attention_layers(unet).values():
        if hasattr(attn, ERASER):
            delattr(attn, ERASER)
        for key in [k for k, hook in attn._forward_hooks.items() if hook is _apply_erasers]:
            del attn._forward_hooks[key]


def eraser_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Every attached eraser's tensors, keyed `<set>/<layer name>/<param>` (e.g. `0/down_blocks.1...attn2/down.weight`)."""
    state = {}
    for name, attn in cross_attention_layers(unet).items():
        for i, eraser in enumerate(getattr(attn, ERASER, ())):
            state.update({f"{i}/{name}/{k}": v.detach().cpu().clone() for k, v in eraser.state_dict().items()})
    return state


def load_erasers(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Attach the eraser sets of `state` (from `eraser_state`) to a UNet that has none."""
    if eraser_sets(unet):
        raise ValueError("the UNet already holds erasers: remove_erasers first")
    layers = cross_attention_layers(unet)
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        index, name, param = key.split("/")
        if name not in layers:
            raise ValueError(f"the eraser state names a cross-attention layer {name!r} this UNet does not have")
        grouped.setdefault((int(index), name), {})[param] = value
    device = next(unet.parameters()).device
    for (index, name), params in sorted(grouped.items()):
        stack = _stack(layers[name])
        if index != len(stack):
            raise ValueError(f"the eraser state of {name} skips set {len(stack)}")
        rank, dim = params["down.weight"].shape
        eraser = AdapterEraser(dim, rank)
        eraser.load_state_dict(params)
        stack.append(eraser.to(device))


class AttachedErasers:
    """What a ledger holds for the erasers it re-attached (the interface of its module editors)."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def state_dict(self) -> dict[str, torch.Tensor]:
        return eraser_state(self.unet)

    def reset(self) -> None:
        remove_erasers(self.unet)
