"""Personalization of a text-to-image model (`diffusion` family), one file per method (see `base.py` for
the contract).

Adding a method = its file (paper, loss, deviations from the official code in the docstring), one line in
PERSONALIZERS (with the knobs that define the registered variant, which a user cannot override), its
tiny-model knobs in tests/test_personalize.py.
"""

from __future__ import annotations

import importlib

from lifelong.config import from_dict
from lifelong.errors import ConfigError
from lifelong.personalize.base import (
    PersonalizeRequest,
    PersonalizerProtocol,
    check_token,
    new_tokens,
    read_images,
)

# name -> ("module:Class", the knobs that make this variant)
PERSONALIZERS: dict[str, tuple[str, dict]] = {
    "ti": ("lifelong.personalize.textual_inversion:TextualInversion", {}),
    "dreambooth": ("lifelong.personalize.dreambooth:DreamBooth", {"lora": False}),
    "dreambooth-lora": ("lifelong.personalize.dreambooth:DreamBooth", {"lora": True}),
    # the paper's ablation: no class images, no prior term (what drifts, Sec. 4.3)
    "dreambooth-no-prior": ("lifelong.personalize.dreambooth:DreamBooth", {"lora": False, "prior_loss_weight": 0.0}),
    "custom-diffusion": ("lifelong.personalize.custom_diffusion:CustomDiffusion", {}),
    "mix-of-show": ("lifelong.personalize.mix_of_show:MixOfShow", {}),
}


def personalizer_class(name: str) -> type:
    if name not in PERSONALIZERS:
        raise ConfigError(f"unknown personalization method {name!r}; available: {', '.join(PERSONALIZERS)}")
    module, cls = PERSONALIZERS[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def personalizer_params(name: str, knobs: dict | None = None):
    """The method's validated `Params`: the variant's fixed knobs plus the user's (unknown ones fail and
    list the valid ones; a fixed one cannot be changed)."""
    fixed = PERSONALIZERS[name][1] if name in PERSONALIZERS else {}
    clash = sorted(set(knobs or {}) & set(fixed))
    if clash:
        raise ConfigError(f"--method {name} fixes {', '.join(f'{k}={fixed[k]}' for k in clash)}; "
                          f"choose another method instead (e.g. dreambooth or dreambooth-lora)")
    try:
        return from_dict(personalizer_class(name).Params, {**fixed, **(knobs or {})}, f"personalizer {name}")
    except (ValueError, TypeError) as e:
        raise ConfigError(f"personalizer {name}: {e}") from None


def build_personalizer(name: str, knobs: dict | None = None):
    return personalizer_class(name)(personalizer_params(name, knobs))


__all__ = ["PERSONALIZERS", "PersonalizeRequest", "PersonalizerProtocol", "build_personalizer", "check_token",
           "new_tokens", "personalizer_class", "personalizer_params", "read_images"]
