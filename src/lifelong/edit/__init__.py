"""Knowledge editors for the `lm` family, one file each (see `base.py` for the contract).

Adding an editor = its file (with its `records`, `learns_to_edit` and `batch` metadata), one line in EDITORS, its
tiny-model knobs in tests/test_editors_a.py (the registry-wide contract tests then pick it up), a docs entry.
"""

from __future__ import annotations

import importlib

from lifelong.config import from_dict
from lifelong.data.edit_requests import EditRequest, Probe
from lifelong.edit.base import Editor
from lifelong.errors import ConfigError

# name -> "module:Class"; imported on first use so that `lifelong --help` stays fast
EDITORS = {
    "ft_l": "lifelong.edit.ft_l:FTL",      # the target at the prompt's last position (EasyEdit prompt_last)
    "ft_m": "lifelong.edit.ft_m:FTM",      # every target token, teacher-forced (EasyEdit target_new)
    "lora": "lifelong.edit.lora:LoRAEdit",
    "mend": "lifelong.edit.mend:MEND",
    "t_patcher": "lifelong.edit.t_patcher:TPatcher",
    "grace": "lifelong.edit.grace:GRACE",
    "wise": "lifelong.edit.wise:WISE",
    "rome": "lifelong.edit.rome:ROME",
    "memit": "lifelong.edit.memit:MEMIT",  # batch editing over several layers
    "alphaedit": "lifelong.edit.alpha_edit:AlphaEdit",  # MEMIT with null-space projected updates
}


def editor_class(name: str) -> type[Editor]:

    if name not in EDITORS:
        raise ConfigError(f"unknown editor {name!r}; available: {', '.join(EDITORS)}")
    module, cls = EDITORS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def editor_params(name: str, knobs: dict | None = None, where: str = "editor"):
    """The editor's validated `Params` (unknown knobs fail and list the valid ones)."""

    try:
        return from_dict(editor_class(name).Params, dict(knobs or {}), where)
    except (ValueError, TypeError) as e:  # a knob's own check (e.g. a WISE ratio outside (0, 1]): a user error
        raise ConfigError(f"{where} {name}: {e}") from None


def check_batch(name: str) -> None:
    """`name` can write many requests in one update (`apply_batch`), or a ConfigError says which editors can."""
    if not editor_class(name).batch:
        raise ConfigError(f"--batch: {name} edits one request at a time; editors with batch editing: "
                          f"{', '.join(n for n in EDITORS if editor_class(n).batch)}")


def build_editor(name: str, model, tokenizer, knobs: dict | None = None) -> Editor:
    return editor_class(name)(model, tokenizer, editor_params(name, knobs))


__all__ = ["EDITORS", "EditRequest", "Editor", "Probe", "build_editor", "check_batch", "editor_class", "editor_params"]
