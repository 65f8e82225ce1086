"""The project's main claim, per method: on a small real stream (glyphs -> Fashion-MNIST -> MNIST, 300
training images each, the embedded model at 112 px, 30 steps per task, the same seed for every method),
each method the README says forgets less forgets less than sequential fine-tuning: full fine-tuning for
the full-model methods and MoE-Adapters (its own adapters), LoRA fine-tuning at the same rank and lr for
O-LoRA. Max forgetting (Select-and-Distill's), in points.

Measured when written (one thread; `OMP_NUM_THREADS=1 pytest -m slow -s tests/test_forgetting.py` prints them): finetune 7.5, lwf 6.8, ewc 4.2, replay 3.8, icarl -0.5,
select_distill 3.8, moe_adapters 1.5; LoRA finetune 37.0, o_lora 13.5. Integration tests on the embedded
model (15-60 s per method): marked slow.
"""

import copy
import dataclasses

import pytest

from lifelong.config import AdapterConfig, MethodConfig
from lifelong.data.streams import build_stream
from lifelong.families import prepare_trainable
from lifelong.learn import build_method
from lifelong.learn.driver import build_model, load_run_config
from lifelong.loop import compute_stem_features, run_stream
from lifelong.metrics.continual import summarize

pytestmark = pytest.mark.slow

FULL, LORA = AdapterConfig(), AdapterConfig(kind="lora", rank=8, alpha=16)
ADAPTER_LR = {"lr": 1e-3}  # the adapter papers' lr, as configs/mtil_all.yaml sets it
CASES = {  # method: (adapter, method knobs, train overrides, the baseline it is compared with)
    "lwf": (FULL, {}, {}, "finetune"),
    "ewc": (FULL, {"fisher_samples": 64}, {}, "finetune"),
    "replay": (FULL, {}, {}, "finetune"),
    "icarl": (FULL, {}, {}, "finetune"),
    "select_distill": (FULL, {"reference_images": 256}, {}, "finetune"),
    "moe_adapters": (FULL, {}, ADAPTER_LR, "finetune"),
    "o_lora": (LORA, {}, ADAPTER_LR, "finetune+lora"),
}
BASELINES = {"finetune": (FULL, {}), "finetune+lora": (LORA, ADAPTER_LR)}


@pytest.fixture(scope="module")
def setting():
    stream = build_stream({"name": "forgetting", "scenario": "task", "seed": 0, "tasks": [
        {"source": source, "train_items": 300, "test_items": 200, "options": {"invert": True}}
        for source in ("glyphs", "fashion-mnist", "mnist")]})
    config = load_run_config(None, ["model.name=embedded", "model.resolution=112", "model.trainable_blocks=3",
                                    "train.steps_per_task=30", "train.batch_size=32", "train.lr=1e-4",
                                    "train.checkpoints=false", "train.log_with=none"])
    base = build_model(config.model, stream)
    return stream, config, base, compute_stem_features(base, stream, 128), {}


def max_forgetting(setting, name, adapter, params, train) -> float:
    stream, config, base, stem, _ = setting
    model = copy.deepcopy(base)
    prepare_trainable(model, config.model, adapter, seed=config.seed)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **train))
    result = run_stream(model, build_method(MethodConfig(name=name, params=params)), stream, stem, config, None)
    return summarize(result.accuracy_matrix)["max_forgetting"]


def baseline(setting, label: str) -> float:
    memo = setting[-1]
    if label not in memo:
        adapter, train = BASELINES[label]
        memo[label] = max_forgetting(setting, "finetune", adapter, {}, train)
    return memo[label]


@pytest.mark.parametrize("name", list(CASES))
def test_method_forgets_less_than_sequential_finetuning(name, setting):
    adapter, params, train, against = CASES[name]
    reference = baseline(setting, against)
    assert reference > 5.0, f"{against} forgot only {reference:.1f} points: the stream no longer tests anything"
    forgetting = max_forgetting(setting, name, adapter, params, train)
    print(f"max forgetting: {name} {forgetting:.1f}, {against} {reference:.1f}")  # the figures, with pytest -s
    assert forgetting < reference, f"{name} forgot {forgetting:.1f} points, {against} {reference:.1f}"
