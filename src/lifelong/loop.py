"""The one training loop: a method over a stream of tasks, on HF Accelerate.

For every task: the method's begin_task, `steps_per_task` optimizer steps of the method's loss over
the task's cached stem outputs, the method's end_task, a checkpoint, and an evaluation of every task
of the stream, which fills one row of the accuracy matrix (row 0 is the model before any training).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from lifelong.config import RunConfig, TrainConfig
from lifelong.data.base import Stream
from lifelong.errors import TrainingDivergedError
from lifelong.learn.common import TaskData
from lifelong.report.io import atomic_write_bytes


@dataclass
class StemFeatures:
    """The frozen stem's outputs for every task's train and test images, computed once."""

    train: list[torch.Tensor]
    test: list[torch.Tensor]


@dataclass
class StreamResult:
    accuracy_matrix: np.ndarray  # (T + 1, T), percent
    seen_accuracy: list[float] = field(default_factory=list)  # class-incremental A_t, t = 1..T
    losses: list[list[float]] = field(default_factory=list)  # per task, per step
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


def label_spaces(stream: Stream) -> list[tuple[str, ...]]:
    """The class names each task trains on: its own (task-incremental) or all seen so far (class-incremental)."""
    spaces, seen = [], ()
    for task in stream.tasks:
        if stream.scenario == "class":
            seen = seen + tuple(stream.class_names[c] for c in task.class_ids)
            spaces.append(seen)
        else:
            spaces.append(task.class_names)
    return spaces


def targets_in(stream: Stream, t: int, labels: np.ndarray) -> torch.Tensor:
    """Local labels of task t -> indices into its label space."""
    offset = sum(len(task.class_ids) for task in stream.tasks[:t]) if stream.scenario == "class" else 0
    return torch.as_tensor(labels, dtype=torch.long) + offset


@torch.no_grad()
def evaluate(model, stream: Stream, stem: StemFeatures, after_task: int, batch_size: int) -> tuple[list[float], float]:
    """Accuracy (%) on every task's test set after `after_task` tasks (0 = before training).

    Task-incremental: among the task's own classes. Class-incremental: among the classes seen so far
    plus the task's own (so that not-yet-learned tasks are measured zero-shot). Also returns the
    class-incremental A_t: accuracy over the test sets of tasks 1..t among the classes seen so far.
    """
    row, spaces = [], label_spaces(stream)
    seen_correct, seen_total = 0, 0
    for j, task in enumerate(stream.tasks):
        if stream.scenario == "class":
            names = spaces[after_task - 1] if after_task else ()  # every class seen so far
            if j >= after_task:  # a task still ahead is measured zero-shot, its classes added
                names = names + task.class_names
            offset = names.index(task.class_names[0])
        else:
            names, offset = task.class_names, 0
        class_emb = model.class_embeddings(names)
        x, y = stem.test[j], torch.as_tensor(task.test.labels) + offset
        pred = torch.cat([model.logits(x[i : i + batch_size], class_emb).argmax(-1) for i in range(0, len(x), batch_size)])
        correct = int((pred == y).sum())
        row.append(100.0 * correct / len(y))
        if stream.scenario == "class" and j < after_task:
            seen_correct, seen_total = seen_correct + correct, seen_total + len(y)
    return row, (100.0 * seen_correct / seen_total if seen_total else float("nan"))


def run_stream(model, method, stream: Stream, stem: StemFeatures, config: RunConfig, checkpoint_dir: Path | None) -> StreamResult:
    """Train `method` on every task of `stream` in order; return the accuracy matrix and the costs."""
    train_cfg: TrainConfig = config.train
    set_seed(config.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    method.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]

    T = len(stream.tasks)
    matrix = np.zeros((T + 1, T))
    result = StreamResult(matrix)
    t0 = time.perf_counter()
    matrix[0], _ = evaluate(model, stream, stem, 0, train_cfg.eval_batch_size)
    result.eval_seconds += time.perf_counter() - t0

    spaces = label_spaces(stream)
    seen: tuple[str, ...] = ()
    last_good: Path | None = None
    for t, task in enumerate(stream.tasks):
        data = TaskData(
            index=t,
            task=task,
            inputs=stem.train[t],
            targets=targets_in(stream, t, task.train.labels),
            class_names=spaces[t],
            seen_class_names=seen if stream.scenario == "task" else (spaces[t - 1] if t else ()),
        )
        t0 = time.perf_counter()
        method.begin_task(model, data)
        optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(train_cfg.warmup_steps, train_cfg.steps_per_task))
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        order = batch_order(len(data.inputs), train_cfg.batch_size, train_cfg.steps_per_task, seed=config.seed * 1000 + t)
        losses = []
        bar = tqdm(order, desc=f"task {t + 1}/{T} {task.name}", leave=False, disable=not accelerator.is_local_main_process)
        for step, index in enumerate(bar):
            batch = {"inputs": data.inputs[index], "targets": data.targets[index], "index": index}
            loss, logs = method.loss(model, batch, data)
            if not math.isfinite(loss.item()):
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint yet (it diverged in the first task)"
                raise TrainingDivergedError(
                    f"loss is {loss.item()} at task {t + 1} ({task.name}), step {step + 1} ({logs}); training stopped, "
                    f"{where}. Lower train.lr (now {train_cfg.lr}) or the method's reg_weight."
                )
            accelerator.backward(loss)
            if train_cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(params, train_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        method.end_task(model, data)
        result.losses.append(losses)
        result.train_seconds += time.perf_counter() - t0
        seen = seen + task.class_names

        if checkpoint_dir is not None and train_cfg.checkpoints:
            last_good = save_checkpoint(checkpoint_dir / f"task_{t + 1}.safetensors", model, method, t + 1)
        t0 = time.perf_counter()
        matrix[t + 1], seen_acc = evaluate(model, stream, stem, t + 1, train_cfg.eval_batch_size)
        result.seen_accuracy.append(seen_acc)
        result.eval_seconds += time.perf_counter() - t0
    return result


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches for `steps` steps: reshuffled epochs, seeded, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    out, pool = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(pool) < batch_size:
            pool = torch.cat([pool, torch.randperm(n, generator=g)])
        out.append(pool[:batch_size])
        pool = pool[batch_size:]
    return out


def cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def save_checkpoint(path: Path, model, method, tasks_done: int) -> Path:
    """The trainable parameters and the method's state after a task, in safetensors (atomic)."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.contiguous() for k, v in model.trainable_state().items()}
    tensors.update({f"method.{k}": v.detach().contiguous() for k, v in method.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata={"tasks_done": str(tasks_done)}))
    return path
