"""The model inside a peft wrapper, with the marks peft leaves on it removed (one place for every adapter)."""

from __future__ import annotations

from torch import nn

PEFT_MARKS = ("peft_config", "_hf_peft_config_loaded")  # what peft sets on the model it wraps


def bare_model(model: nn.Module) -> nn.Module:
    """`model` itself, or the model a peft wrapper holds (`get_base_model()`), without peft's marks. The
    modules are not touched: a LoRA's layers must have been unloaded first, a prompt-learning wrapper (prefix
    tuning) changes none."""
    from peft import PeftModel  # heavy optional dependency, imported at first use

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for attr in PEFT_MARKS:
        if attr in vars(base):
            delattr(base, attr)
    return base
