"""Patches: what one change did to the model's weights, as named tensors.

A patch is additive: the model after a change is the model before it plus the patch, so a ledger's
current model is its base plus every patch in order. Two entry kinds, keyed `kind::parameter name`
(the parameter names of the plain model, without adapters: peft's LoRA `base_layer` and adaption-prompt
`.model` hops are left out, so a patch taken on a model with a LLaMA-Adapter attached applies without it):

    delta::W                     a dense weight delta (full fine-tuning of the trainable part)
    lora_A::W, lora_B::W, lora_scale::W
                                 a low-rank delta scale * B @ A (peft LoRA on a Linear or 1x1 Conv),
                                 stored as its factors: r * (in + out) numbers instead of in * out
    prompts::S, prompts_before::S
                                 the VPT prompts (n, K, D) the layer stack S holds after the change and
                                 before it ((0,) when it held none; modules/vpt.py). Prompts are new tokens,
                                 not a weight delta, so this entry sets them, after checking that S holds
                                 `prompts_before`; its negation swaps the two, so a revert takes them off (or
                                 puts the earlier ones back) bit for bit.

`patch_from_model` reads any kind off a trained model; `apply_patch` adds a patch to a plain model.
"""

from __future__ import annotations

import torch

from lifelong.errors import LedgerCorruptError, LedgerError
from lifelong.modules.llama_adapter import plain_parameter_name
from lifelong.modules.vpt import PROMPT_PARAMETER, is_prompt_parameter, set_prompts

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

    before = {plain_name(n): t for n, t in before.items()}
    patch: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or LORA_ADAPTER not in module.lora_A:
            continue
        weight = plain_name(f"{name}.weight")
        a = module.lora_A[LORA_ADAPTER].weight.detach().clone()
        b = module.lora_B[LORA_ADAPTER].weight.detach().clone()
        scale = torch.tensor(float(module.scaling[LORA_ADAPTER]))
        reference = module.get_delta_weight(LORA_ADAPTER)
        if reference.shape == before[weight].shape and torch.allclose(lora_delta(a, b, scale, reference.shape), reference, atol=1e-6):
            patch.update({f"lora_A::{weight}": a, f"lora_B::{weight}": b, f"lora_scale::{weight}": scale})
        else:
            patch[f"delta::{weight}"] = reference.clone()
    params = dict(model.named_parameters())
    patch.update(prompt_entries({n: p.detach() for n, p in params.items() if is_prompt_parameter(n)}, before))
    # Every other parameter that moved, trainable or not (a method may fold an adapter into frozen
    # weights, as O-LoRA does), under its plain-model name.
    check_recordable(model, before)
    for name, p in params.items():
        if "lora_" in name or is_prompt_parameter(name):
            continue
        plain = plain_name(name)
        delta = p.detach() - before[plain]
        if delta.any():
            key = f"delta::{plain}"
            patch[key] = patch[key] + delta if key in patch else delta
    return patch


def plain_name(name: str) -> str:
    """A parameter's name in the plain model: without peft LoRA's `base_layer` or an adaption prompt's hop."""
    return plain_parameter_name(name.replace(".base_layer.", "."))


def prompt_entries(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """prompts / prompts_before entries for every VPT prompt parameter that differs between two parameter
    sets (`after` and `before`: name -> tensor; a name missing from one means no prompts there)."""
    entries = {}
    none = torch.zeros(0)
    for name in sorted({n for n in (*after, *before) if is_prompt_parameter(n)}):
        new, old = after.get(name, none), before.get(name, none)
        if new.shape == old.shape and torch.equal(new, old):
            continue
        stack = name.removesuffix(PROMPT_PARAMETER).rstrip(".")
        entries[f"prompts::{stack}"] = new.detach().clone()
        entries[f"prompts_before::{stack}"] = old.detach().clone()
    return entries


def check_recordable(model, before: dict[str, torch.Tensor], method: str = "the method") -> None:
    """Refuse a model with modules the plain model lacks (beside peft LoRA and VPT prompts): a patch cannot
    hold them."""
    before = {plain_name(n) for n in before}
    for name, _ in model.named_parameters():
        if "lora_" not in name and not is_prompt_parameter(name) and plain_name(name) not in before:
            raise LedgerError(f"{method} adds modules the plain model does not have (e.g. {name!r}); a ledger records "
                              "weight changes and LoRA adapters, not new modules (yet): use `lifelong run` for it")


def dense_patch(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A patch of dense deltas between two full parameter sets (what a replayed revert records); VPT prompts,
    which one side may lack, as prompts entries."""
    patch = prompt_entries(after, before)
    patch.update({f"delta::{n}": after[n] - before[n] for n in after
                  if not is_prompt_parameter(n) and not torch.equal(after[n], before[n])})
    return patch


def negate(patch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The patch that undoes `patch` (B and the scale keep their sign on one factor only; VPT prompts swap
    their after and before)."""
    swap = {"prompts": "prompts_before", "prompts_before": "prompts"}
    out = {}
    for key, t in patch.items():
        kind, _, name = key.partition("::")
        if kind in swap:
            out[f"{swap[kind]}::{name}"] = t.clone()
        else:
            out[key] = -t if kind in ("delta", "lora_scale") else t.clone()
    return out


@torch.no_grad()
def apply_patch(model, patch: dict[str, torch.Tensor], where: str = "patch") -> None:
    """Add `patch` to a plain model's parameters in place (or to a model with LLaMA-Adapters attached)."""
    params = {plain_parameter_name(n): p for n, p in model.named_parameters()}
    for key, t in patch.items():
        kind, _, name = key.partition("::")
        if kind in ("lora_A", "lora_scale", "prompts_before"):
            continue  # used with their lora_B / prompts entry
        if kind == "prompts":
            set_prompts_checked(model, name, t, patch[f"prompts_before::{name}"], where)
            continue
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


def set_prompts_checked(model, stack: str, prompts: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    """Set the VPT prompts of the layer stack `stack` to `prompts` ((0,): none), after checking that it holds
    `expected` now: a patch sets prompts, so it applies only to the model it was taken from."""
    try:
        holder = model.get_submodule(stack)
    except AttributeError:
        raise LedgerCorruptError(f"{where} sets VPT prompts on {stack!r}, which this model does not have") from None
    if not hasattr(holder, "prompts"):
        raise LedgerCorruptError(f"{where} sets VPT prompts on {stack!r}, which takes none")
    now = holder.prompts.embeddings.detach() if holder.prompts is not None else torch.zeros(0)
    if now.shape != expected.shape or not torch.equal(now, expected.to(now.dtype)):
        raise LedgerCorruptError(f"{where} sets the VPT prompts of {stack!r} from ones of shape {tuple(expected.shape)}, "
                                 f"but the model holds ones of shape {tuple(now.shape)} (or other values)")
    set_prompts(holder, prompts)


def patch_numel(patch: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in patch.values())
