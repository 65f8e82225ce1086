"""What every concept eraser shares: the request, the eraser contract, and the pieces ESD-style methods use.

An eraser changes a text-to-image model (`families.diffusion.TextToImage`) in place so that prompts
naming a concept stop producing it, while other prompts produce what they did:

    Eraser(params)                    knobs only; nothing is changed yet
    erase(model, request, seed) -> dict
                                      changes the model's weights in place; returns stats (floats: the
                                      loss at the start and end, steps, trainable parameters)

Erasers record their change as a weight patch (`records = "weights"`): the ledger reads it off the model
(`ledger.patch.patch_from_model`), reverts it by subtraction and exports it as a diffusers folder. Receler
adds modules instead (`records = "module"`: eraser adapters, modules/eraser_adapter.py): the ledger stores
their state, re-attaches it on materialize, takes it off on revert and refuses to export it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from lifelong.data import captioned
from lifelong.errors import ConfigError
from lifelong.modules.eraser_adapter import ERASER

PROMPTS_PER_CONCEPT = 4  # training captions per judged concept in a request's prompts (besides the name)


@dataclass(frozen=True)
class EraseRequest:
    """One concept to erase.

    concept   what the user named ("sneaker", "calligraphic", "7")
    prompts   the prompts that name it: `concept` first, then training captions of the concepts it covers
    anchor    what those prompts should produce instead ("" = the unconditional output: ESD's and UCE's
              default; Ablating Concepts maps onto an anchor concept)
    preserve  prompts whose outputs must stay (UCE's preserved concepts)
    judged    the judge's concepts it covers, whose judge rate measures the erasure (() with --no-judge)
    """

    concept: str
    prompts: tuple[str, ...]
    anchor: str = ""
    preserve: tuple[str, ...] = ()
    judged: tuple[str, ...] = ()


def erase_request(concept: str, anchor: str | None = None, preserve: tuple[str, ...] | None = None,
                  judge: bool = True, seed: int = 0) -> EraseRequest:
    """The request for the concept a user named, checked: the concepts it covers (by
    `captioned.find_concepts`), up to PROMPTS_PER_CONCEPT training captions of each (seeded), the default
    anchor (a generic phrase of its kind) and preserved prompts (the other concepts of its kind, by their
    first name). With `judge=False` an unknown concept is erased by its name alone and nothing is judged."""
    concept = " ".join(concept.split())
    if not concept:
        raise ConfigError("the concept is empty: name what to erase, e.g. --concept sneaker")
    covered = captioned.find_concepts(concept)
    if not covered and judge:
        known = sorted({c.names[0] for c in captioned.training_concepts() if c.kind != "letter-style"}
                       | set(captioned.FONT_STYLES))
        raise ConfigError(f"the judge knows no concept {concept!r}; it knows {', '.join(known)} (and the ids of "
                          "lifelong.data.captioned.all_concepts(), e.g. letter/A/serif/red). Pass --no-judge to "
                          "erase it anyway and report only distances")
    generator = torch.Generator().manual_seed(seed)
    prompts = [concept]
    for c in covered[:PROMPTS_PER_CONCEPT * 4]:
        captions = captioned.train_captions(c)
        order = torch.randperm(len(captions), generator=generator)[:PROMPTS_PER_CONCEPT].tolist()
        prompts += [captions[i] for i in order if captions[i] not in prompts]
    kinds = {c.kind for c in covered}
    if anchor is None:
        anchor = captioned.concept_kind_word(covered[0]) if len(kinds) == 1 else ""
    if " ".join(anchor.split()).lower() == concept.lower():
        raise ConfigError(f"the anchor {anchor!r} is the concept itself: give another concept to map it onto, "
                          "e.g. --anchor 'a piece of clothing' (or none)")
    if preserve is None:
        names = {c.name for c in covered}
        preserve = tuple(dict.fromkeys(c.names[0] for c in captioned.training_concepts()
                                       if c.kind in kinds and c.name not in names and c.kind != "letter-style"))
    return EraseRequest(concept, tuple(prompts), anchor, tuple(preserve), tuple(c.name for c in covered) if judge else ())


@runtime_checkable
class EraserProtocol(Protocol):
    """The contract of every registered eraser (tests/test_erase.py checks each one in `ERASERS`)."""

    name: ClassVar[str]
    Params: ClassVar[type]
    records: ClassVar[str]  # "weights": the ledger records a weight patch; "module": the state of added modules

    def erase(self, model, request: EraseRequest, seed: int = 0) -> dict[str, float]: ...


# --- which parameters a fine-tuning eraser trains ---------------------------------------------------------

def unet_parameters(unet: nn.Module, which: str) -> list[tuple[str, nn.Parameter]]:
    """The UNet parameters an eraser trains, by ESD's `train_method` names:

    xattn      cross-attention only (diffusers `attn2.*`): ESD-x
    noxattn    everything but cross-attention, the time embedding and the output layers
               (`conv_norm_out`, `conv_out`; the official code's `out.`): ESD-u
    kv         the text-side key and value projections (`attn2.to_k`, `attn2.to_v`): Ablating Concepts'
               `crossattn_kv`
    full       every parameter

    Receler's eraser adapters (`attn2.eraser.*`) are never in a set: they are modules of their own change."""
    def keep(name: str) -> bool:
        if f".{ERASER}." in name:
            return False
        if which == "xattn":
            return ".attn2." in name
        if which == "noxattn":
            return ".attn2." not in name and not name.startswith(("time_embedding", "conv_norm_out", "conv_out"))
        if which == "kv":
            return ".attn2.to_k." in name or ".attn2.to_v." in name
        if which == "full":
            return True
        raise ConfigError(f"unknown parameter set {which!r}; choose xattn, noxattn, kv or full")

    chosen = [(n, p) for n, p in unet.named_parameters() if keep(n)]
    if not chosen:
        raise ConfigError(f"the UNet has no parameter in the set {which!r} (no cross-attention layers?)")
    return chosen


def train_only(unet: nn.Module, which: str) -> list[nn.Parameter]:
    """Freeze the UNet but for the set `which` (see `unet_parameters`); returns those parameters."""
    unet.requires_grad_(False)
    params = [p for _, p in unet_parameters(unet, which)]
    for p in params:
        p.requires_grad_(True)
    return params


def prompt_batch(prompts: tuple[str, ...], batch_size: int, generator: torch.Generator) -> list[str]:
    """`batch_size` prompts drawn with replacement (seeded), as ESD draws one of its words per iteration."""
    picks = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
    return [prompts[i] for i in picks]


