"""Concept erasers for the `diffusion` family, one file each (see `base.py` for the contract).

Adding an eraser = its file (paper, loss, deviations from the official code in the docstring), one line in
ERASERS (with the knobs that define the registered variant, which a user cannot override), its tiny-model
knobs in tests/test_erase.py.
"""

from __future__ import annotations

import importlib

from lifelong.config import from_dict
from lifelong.erase.base import EraseRequest, EraserProtocol, erase_request
from lifelong.errors import ConfigError

# name -> ("module:Class", the knobs that make this variant)
ERASERS: dict[str, tuple[str, dict]] = {
    "esd-x": ("lifelong.erase.esd:ESD", {"train_method": "xattn"}),
    "esd-u": ("lifelong.erase.esd:ESD", {"train_method": "noxattn"}),
    "ac": ("lifelong.erase.ablating:AblatingConcepts", {}),
    "uce": ("lifelong.erase.uce:UCE", {}),
    "receler": ("lifelong.erase.receler:Receler", {}),
}


def eraser_class(name: str) -> type:
    if name not in ERASERS:
        raise ConfigError(f"unknown erasure method {name!r}; available: {', '.join(ERASERS)}")
    module, cls = ERASERS[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def eraser_params(name: str, knobs: dict | None = None):
    """The method's validated `Params`: the variant's fixed knobs plus the user's (unknown ones fail and
    list the valid ones; a fixed one cannot be changed)."""
    fixed = ERASERS[name][1] if name in ERASERS else {}
    clash = sorted(set(knobs or {}) & set(fixed))
    if clash:
        raise ConfigError(f"--method {name} fixes {', '.join(f'{k}={fixed[k]}' for k in clash)}; "
                          f"choose another method instead (e.g. esd-x or esd-u)")
    try:
        return from_dict(eraser_class(name).Params, {**fixed, **(knobs or {})}, f"eraser {name}")
    except (ValueError, TypeError) as e:
        raise ConfigError(f"eraser {name}: {e}") from None


def build_eraser(name: str, knobs: dict | None = None):
    return eraser_class(name)(eraser_params(name, knobs))


__all__ = ["ERASERS", "EraseRequest", "EraserProtocol", "build_eraser", "erase_request", "eraser_class", "eraser_params"]
