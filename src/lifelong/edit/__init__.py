"""Knowledge editors for the `lm` family, one file each (see `base.py` for the contract).

Adding an editor = its file, one line in EDITORS, a contract-test case, a docs entry.
"""

from __future__ import annotations

import importlib

from lifelong.edit.base import EditRequest, Editor, Probe

# name -> "module:Class"; imported on first use so that `lifelong --help` stays fast
EDITORS = {
    "ft_l": "lifelong.edit.ft_l:FTL",
    "lora": "lifelong.edit.lora:LoRAEdit",
    "mend": "lifelong.edit.mend:MEND",
    "t_patcher": "lifelong.edit.t_patcher:TPatcher",
    "grace": "lifelong.edit.grace:GRACE",
    "wise": "lifelong.edit.wise:WISE",
    "rome": "lifelong.edit.rome:ROME",
}


def editor_class(name: str) -> type[Editor]:
    from lifelong.errors import ConfigError

    if name not in EDITORS:
        raise ConfigError(f"unknown editor {name!r}; available: {', '.join(EDITORS)}")
    module, cls = EDITORS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def editor_params(name: str, knobs: dict | None = None, where: str = "editor"):
    """The editor's validated `Params` (unknown knobs fail and list the valid ones)."""
    from lifelong.config import from_dict

    return from_dict(editor_class(name).Params, dict(knobs or {}), where)


def build_editor(name: str, model, tokenizer, knobs: dict | None = None) -> Editor:
    return editor_class(name)(model, tokenizer, editor_params(name, knobs))


__all__ = ["EDITORS", "EditRequest", "Editor", "Probe", "build_editor", "editor_class", "editor_params"]
