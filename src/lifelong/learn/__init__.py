"""Continual-learning methods. Each is one file with a `Params` dataclass and a class that implements

    prepare(model)                 once, after the trainable parameters are chosen
    begin_task(model, data)        before a task's first step (e.g. cache a frozen teacher's outputs)
    loss(model, batch, data)       -> (loss, {name: float}) for one batch
    end_task(model, data)          after a task's last step (e.g. Fisher, weight interpolation)
    state_dict() / load_state_dict(state)   tensors to checkpoint: everything `loss` and `end_task`
                                   depend on (teacher outputs, Fisher, exemplar buffers, weight
                                   averages), so that a resumed task ends bit-identical
    eval_logits(model, inputs, class_names) -> (N, C)   optional: the method's own inference
                                   (nearest mean of exemplars, routing); else the image-text logits

Adding a method = its file, one line in METHODS, a test case, a docs entry.
"""

from __future__ import annotations

from lifelong.learn.ewc import EWC
from lifelong.learn.finetune import Finetune
from lifelong.learn.icarl import ICaRL
from lifelong.learn.lwf import LwF
from lifelong.learn.moe_adapters import MoEAdapters
from lifelong.learn.wise_ft import WiSEFT
from lifelong.learn.o_lora import OLoRA
from lifelong.learn.replay import Replay
from lifelong.learn.select_distill import SelectAndDistill
from lifelong.learn.zscl import ZSCL

METHODS = {
    "finetune": Finetune,
    "lwf": LwF,
    "ewc": EWC,
    "wise_ft": WiSEFT,
    "o_lora": OLoRA,
    "icarl": ICaRL,
    "replay": Replay,
    "zscl": ZSCL,
    "select_distill": SelectAndDistill,
    "moe_adapters": MoEAdapters,
}


def method_params(method_config, where: str = "method"):
    """The method's validated `Params` (unknown knobs fail and list the valid ones)."""
    from lifelong.config import from_dict

    return from_dict(METHODS[method_config.name].Params, dict(method_config.params), where)


def build_method(method_config):
    return METHODS[method_config.name](method_params(method_config))
