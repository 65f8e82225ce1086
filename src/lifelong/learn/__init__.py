"""Continual-learning methods: one file each, meeting `lifelong.learn.base.LearningMethod`, and their registry.

Adding a method = its file, one line in METHODS, a test case (the parametrized contract tests pick it up),
a docs entry.
"""

from __future__ import annotations

from lifelong.config import from_dict
from lifelong.errors import ConfigError
from lifelong.learn.base import LearningMethod
from lifelong.learn.ewc import EWC
from lifelong.learn.finetune import Finetune
from lifelong.learn.icarl import ICaRL
from lifelong.learn.joint import Joint
from lifelong.learn.lwf import LwF
from lifelong.learn.lwf_mtil import LwFMTIL
from lifelong.learn.moe_adapters import MoEAdapters
from lifelong.learn.o_lora import OLoRA
from lifelong.learn.replay import Replay
from lifelong.learn.select_distill import SelectAndDistill
from lifelong.learn.wise_ft import WiSEFT
from lifelong.learn.zscl import ZSCL

METHODS = {
    "finetune": Finetune,
    "lwf": LwF,
    "lwf_mtil": LwFMTIL,
    "ewc": EWC,
    "wise_ft": WiSEFT,
    "o_lora": OLoRA,
    "icarl": ICaRL,
    "replay": Replay,
    "zscl": ZSCL,
    "select_distill": SelectAndDistill,
    "moe_adapters": MoEAdapters,
    "joint": Joint,
}


def method_params(method_config, where: str = "method"):
    """The method's validated `Params` (unknown knobs fail and list the valid ones)."""

    try:
        return from_dict(METHODS[method_config.name].Params, dict(method_config.params), where)
    except (ValueError, TypeError) as e:  # a knob's own check in the method's Params: a user error
        raise ConfigError(f"{where} {method_config.name}: {e}") from None


def build_method(method_config) -> LearningMethod:
    return METHODS[method_config.name](method_params(method_config))
