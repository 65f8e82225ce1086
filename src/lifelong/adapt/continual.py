"""Continual instruction tuning: instruction tasks one after another through LoRA, three ways.

    sequential   a fresh LoRA per task, trained on that task alone, then folded into the weights
    o-lora       the same, plus O-LoRA's orthogonality term (Wang et al., "Orthogonal Subspace Learning for
                 Language Model Continual Learning", Findings of EMNLP 2023; official code
                 github.com/cmnfriend/O-LoRA), which pushes the new LoRA's A out of the earlier tasks' A:
                     L = NLL + lambda_1 * sum_{s < t} sum_layers sum_{j,k} |(A_s A_t^T)[j, k]|
                 lambda_1 = 0.5 (the official scripts), lambda_2 (the L2 term on the new LoRA) = 0
    replay       the same as sequential, with a share of earlier tasks' training examples mixed into the
                 current task's (experience replay; `replay_share` of the current task's count, split
                 evenly over the earlier tasks, drawn once per task from a seeded generator)

Every task starts a new LoRA (rank r on q_proj and v_proj; A drawn by peft from a generator seeded with the
task index, B = 0, so the task starts from the function the last one ended with) and ends by folding
scale * B A into the frozen weights, as learn/o_lora.py does: the official O-LoRA keeps earlier LoRAs as
frozen modules beside the new one, the same function. The A of each finished task is kept for the
orthogonality term.

Each task's record holds `overlap`, sum |A_s A_t^T| of its final A against the earlier ones: what O-LoRA
drives down. After each task, the model answers every task's held-out test items (`evaluate_task`, through
the chat template as it was trained): the accuracy matrix (T+1) x T, row 0 the untouched model, in %, and from it
the learn operation's metrics (metrics/continual.py): Avg, Last, forgetting (Chaudhry) and BWT. ROUGE-L
(bbc-headlines) and exact match (country-facts) stand in for accuracy on the tasks that have no labels.

The claim under test (O-LoRA's paper): orthogonal subspaces forget less than plain sequential LoRA. The
paper measures it on T5-large / LLaMA-7B over 4-15 classification tasks, 1 epoch each; here SmolLM2-135M-
Instruct on the project's short real-text tasks, a few dozen steps each (the numbers are this setting's).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from lifelong.adapt.instruct import AdapterSpec, TrainSettings, train_adapter
from lifelong.data.instructions import TASKS, InstructionTask, load_task
from lifelong.errors import ConfigError
from lifelong.metrics import continual as C
from lifelong.metrics.instructions import evaluate_task

METHODS = ("sequential", "o-lora", "replay")


@dataclass(frozen=True)
class StreamSettings:
    tasks: tuple[str, ...] = ("rt-sentiment", "bbc-topic", "country-facts")
    method: str = "sequential"
    train_items: int = 160      # training examples per task
    test_items: int = 40        # held-out examples per task, scored after every task
    steps: int = 40             # optimizer steps per task
    batch_size: int = 4         # as benchmarks/adapters_text.py
    rank: int = 2
    lr: float | None = None     # None: instruct.DEFAULT_LR["lora"]
    reg_weight: float = 0.5     # o-lora: lambda_1
    replay_share: float = 0.25  # replay: earlier tasks' examples, as a share of the current task's
    chat: bool = True           # prompts through the tokenizer's chat template (training and scoring)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"continual method {self.method!r} is not one of {', '.join(METHODS)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"tasks {unknown or '()'}: give one or more of {', '.join(TASKS)}")
        if self.steps < 1 or self.train_items < 1 or self.test_items < 1:
            raise ConfigError("steps, train_items and test_items must be >= 1")
        if self.reg_weight < 0 or not 0 <= self.replay_share <= 1:
            raise ConfigError(f"reg_weight >= 0 and replay_share in [0, 1], got {self.reg_weight}, {self.replay_share}")


def lora_a(adapted) -> dict[str, torch.Tensor]:
    """The new LoRA's A matrices (r, in) by module name (the same names for every task's LoRA)."""
    return {n: q for n, q in adapted.named_parameters() if ".lora_A." in n}


def orthogonality(earlier: list[dict[str, torch.Tensor]], weight: float):
    """O-LoRA's term as a function of the adapted model: weight * sum over earlier tasks and layers of the
    absolute entries of A_s A_t^T (A_s frozen, A_t the LoRA training now)."""

    def term(adapted) -> torch.Tensor:
        new = lora_a(adapted)
        total = sum((old[n].to(a) @ a.T).abs().sum() for old in earlier for n, a in new.items())
        return weight * total

    return term


def with_replay(task: InstructionTask, earlier: list[InstructionTask], share: float, seed: int) -> InstructionTask:
    """`task` with round(share * len(task.train)) training examples of the earlier tasks mixed in, split evenly."""
    if not earlier or share == 0:
        return task
    rng = random.Random(seed)
    per_task = max(1, round(share * len(task.train) / len(earlier)))
    extra = [e for old in earlier for e in rng.sample(old.train, min(per_task, len(old.train)))]
    return dataclasses.replace(task, train=task.train + tuple(extra))


def run_stream(model, tokenizer, settings: StreamSettings = StreamSettings(), progress=print) -> dict:
    """Train `model` (in place: each task's LoRA is folded into it) on `settings.tasks` in order; the accuracy
    matrix, the metrics and each task's training summary."""
    tasks = [load_task(name, max_train=settings.train_items, max_test=settings.test_items, seed=settings.seed)
             for name in settings.tasks]
    spec = AdapterSpec("lora", rank=settings.rank, alpha=2.0 * settings.rank)

    def scores(m) -> list[float]:
        m.eval()
        with torch.no_grad():
            return [100.0 * evaluate_task(m, tokenizer, t, chat=settings.chat)["score"] for t in tasks]

    started = time.perf_counter()
    acc = [scores(model)]
    progress(f"untouched: {dict(zip(settings.tasks, np.round(acc[0], 1)))}")
    earlier_a: list[dict[str, torch.Tensor]] = []
    runs = []
    for t, task in enumerate(tasks):
        train_on = with_replay(task, tasks[:t], settings.replay_share, settings.seed + t) \
            if settings.method == "replay" else task
        regularizer = orthogonality(earlier_a, settings.reg_weight) \
            if settings.method == "o-lora" and earlier_a else None
        train = TrainSettings(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                              chat=settings.chat, seed=settings.seed + t)
        run = train_adapter(model, tokenizer, train_on, spec, train, regularizer=regularizer)
        with torch.no_grad():  # how much the new A overlaps the earlier ones (the O-LoRA term, unweighted)
            overlap = float(orthogonality(earlier_a, 1.0)(run.model)) if earlier_a else 0.0
        earlier_a.append({n: a.detach().clone() for n, a in lora_a(run.model).items()})
        model = run.model.merge_and_unload()  # W <- W + scale * B A: the next task's base
        acc.append(scores(model))
        runs.append(run.summary() | {"task": task.name, "train_examples": len(train_on.train), "overlap": overlap})
        progress(f"after {task.name}: {dict(zip(settings.tasks, np.round(acc[-1], 1)))}")
    matrix = np.asarray(acc)
    return {"settings": dataclasses.asdict(settings), "accuracy_matrix": matrix.tolist(),
            "metrics": {"avg": C.avg(matrix), "last": C.last(matrix), "forgetting": C.chaudhry_forgetting(matrix),
                        "bwt": C.bwt(matrix)},
            "tasks": runs, "seconds": time.perf_counter() - started}
