"""The one training loop: a method over a stream of tasks, on HF Accelerate.

For every task: the method's begin_task, `steps_per_task` optimizer steps of the method's loss over
the task's cached stem outputs, the method's end_task, a checkpoint, and an evaluation of every task
of the stream, which fills one row of the accuracy matrix (row 0 is the model before any training).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, gather_object, set_seed
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from lifelong.atomic import atomic_write_bytes
from lifelong.cache import content_key, load_cached, store_cached
from lifelong.config import RunConfig, TrainConfig
from lifelong.data.base import ImageDataset, Stream, Task
from lifelong.errors import ConfigError, TrainingDivergedError
from lifelong.fingerprint import tensor_digest
from lifelong.runtime import tune_allocator


@dataclass
class TaskData:
    """One task as the training loop hands it to a method.

    inputs: the frozen stem's outputs for the task's training images (cached, never recomputed).
    targets: each image's index into `class_names`, the label space the task trains on (the task's
    own classes when task-incremental; every class seen so far when class-incremental).
    seen_class_names: the label spaces of the tasks before this one, for distillation on old classes.
    old_label_spaces: the same, one entry per head the earlier tasks trained: task-incremental, each
    earlier task's own class names; class-incremental, one entry, every class seen before (a single head).
    Empty where the caller does not know them (a ledger passes each earlier learn change's classes).
    """

    index: int
    task: Task
    inputs: torch.Tensor
    targets: torch.Tensor
    class_names: tuple[str, ...]
    seen_class_names: tuple[str, ...]
    old_label_spaces: tuple[tuple[str, ...], ...] = ()
    # (N, C) bool, or None: the columns of `class_names` each sample is classified among, where that is not
    # all of them (joint training on a task-incremental stream: each sample among its own task's classes)
    allowed: torch.Tensor | None = None


@dataclass(frozen=True)
class Batch:
    """One training step's batch as a method's `loss` sees it: this process's share of the global batch.

    inputs: the frozen stem's outputs; targets: indices into the task's label space; index: each item's
    position in the task's training set (what cached teacher outputs are looked up by); share: (rank,
    world) under several processes, each taking every world-th item of the same global batch.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    share: tuple[int, int] = (0, 1)

    @property
    def global_size(self) -> int:
        """The size of the global batch this process's share belongs to."""
        return len(self.inputs) * self.share[1]


def process_share(batch: Batch, drawn: torch.Tensor) -> torch.Tensor:
    """This process's share of samples a method draws for the whole batch (e.g. replayed exemplars).

    Whatever a method draws per step must be drawn for the global batch (the same draw in every
    process: seeded by task and step) and split the same way as the batch; else every process would
    replay the same samples and the run would differ from one process.
    """
    rank, world = batch.share
    return drawn[rank::world]


def stem_outputs(model, dataset: ImageDataset, batch_size: int = 256) -> torch.Tensor:
    """The frozen stem's outputs for a dataset, from the disk cache when this exact stem saw it before."""
    key = f"{model.stem_fingerprint()}-{dataset.fingerprint[:16]}"
    hit = load_cached("stem", key)
    if hit is not None:
        return _stem_layout(hit["stem"])
    out = model.encode_stem(dataset.images, batch_size)
    store_cached("stem", key, {"stem": out})
    return _stem_layout(out)


def _stem_layout(out: torch.Tensor) -> torch.Tensor:
    """Conv feature maps in channels-last layout, as the conv stem returns them, whether computed or
    loaded from the cache: the trunk's kernels round differently on the two layouts, so without this a
    cold and a warm cache would train to different numbers."""
    return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out.contiguous()


def compute_stem_features(model, stream: Stream, batch_size: int) -> "StemFeatures":
    train, test = [], []
    for task in tqdm(stream.tasks, desc="stem features", leave=False):
        train.append(stem_outputs(model, task.train, batch_size))
        test.append(stem_outputs(model, task.test, batch_size))
    return StemFeatures(train, test)


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


def old_label_spaces(stream: Stream, t: int) -> tuple[tuple[str, ...], ...]:
    """The heads the tasks before task t trained: one per task (task-incremental), or one holding every
    class seen before (class-incremental: a single head that grows)."""
    if t == 0:
        return ()
    if stream.scenario == "class":
        return (label_spaces(stream)[t - 1],)
    return tuple(task.class_names for task in stream.tasks[:t])


def targets_in(stream: Stream, t: int, labels: np.ndarray) -> torch.Tensor:
    """Local labels of task t -> indices into its label space."""
    offset = sum(len(task.class_ids) for task in stream.tasks[:t]) if stream.scenario == "class" else 0
    return torch.as_tensor(labels, dtype=torch.long) + offset


@torch.no_grad()
def count_correct(model, stem_out: torch.Tensor, targets: torch.Tensor, class_names: tuple[str, ...], batch_size: int,
                  method=None, accelerator: Accelerator | None = None) -> int:
    """How many stem outputs the model assigns to their target among `class_names` (top-1).

    A method with its own inference (iCaRL's nearest mean of exemplars, MoE-Adapters' selector)
    defines `eval_logits(model, stem_out, class_names) -> (N, C)`; otherwise the image-text logits.
    Under several processes each scores every `num_processes`-th item and the counts are summed.
    """
    if accelerator is not None and accelerator.num_processes > 1:
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = count_correct(model, stem_out[rank::world], targets[rank::world], class_names, batch_size, method)
        return int(accelerator.reduce(torch.tensor([mine]), reduction="sum").item())
    if method is not None and hasattr(method, "eval_logits"):  # the EvalLogits protocol
        def score(x):
            return method.eval_logits(model, x, class_names)
    else:
        class_emb = model.class_embeddings(class_names)

        def score(x):
            return model.logits(x, class_emb)
    pred = torch.cat([score(stem_out[i : i + batch_size]).argmax(-1) for i in range(0, len(stem_out), batch_size)])
    return int((pred == targets).sum())


@torch.no_grad()
def evaluate(model, stream: Stream, stem: StemFeatures, after_task: int, batch_size: int, method=None,
             accelerator: Accelerator | None = None) -> tuple[list[float], float]:
    """Accuracy (%) on every task's test set after `after_task` tasks (0 = before training).

    Task-incremental: among the task's own classes. Class-incremental: a learned task among the classes
    seen so far; a task j not learned yet among the classes of tasks 1..j, the label space it will be
    learned in. So a[t, j] for t < j (row 0 included) is measured among the same classes for every t,
    and a[j, j] too: zero-shot degradation, transfer and the gain over zero-shot compare the model, not
    label spaces of different sizes. Also returns the class-incremental A_t: accuracy over the test sets
    of tasks 1..t among the classes seen so far.
    """
    row, spaces = [], label_spaces(stream)
    seen_correct, seen_total = 0, 0
    for j, task in enumerate(stream.tasks):
        if stream.scenario == "class":
            names = spaces[max(after_task - 1, j)]  # seen so far, or up to task j while j is ahead
            offset = names.index(task.class_names[0])
        else:
            names, offset = task.class_names, 0
        correct = count_correct(model, stem.test[j], torch.as_tensor(task.test.labels) + offset, names, batch_size, method,
                                accelerator)
        row.append(100.0 * correct / len(task.test))
        if stream.scenario == "class" and j < after_task:
            seen_correct, seen_total = seen_correct + correct, seen_total + len(task.test)
    return row, (100.0 * seen_correct / seen_total if seen_total else float("nan"))


def run_stream(model, method, stream: Stream, stem: StemFeatures, config: RunConfig, checkpoint_dir: Path | None,
               reuse_zero_shot: bool = True, log_dir: Path | None = None,
               log_name: str = "run") -> StreamResult:
    """Train `method` on every task of `stream` in order; return the accuracy matrix and the costs.

    `reuse_zero_shot`: row 0 (the model before training) comes from the disk cache when a model with the
    same weights was scored on the same test sets the same way before (keyed by a digest of the model's
    whole state, the test sets' fingerprints, the label spaces and the batch size): methods that start
    from the same model evaluate it once, across runs too. Not for methods with their own inference
    (`eval_logits`), and not under several processes (they must all evaluate, the counts are reduced).

    `log_dir`: where the trackers of `train.log_with` write (TensorBoard event files under
    log_dir/`log_name`): every step's loss, lr and grad norm, and every task's accuracy after each task."""
    train_cfg: TrainConfig = config.train
    set_seed(config.seed)
    accelerator = make_accelerator(leaves_parameters_unused(method), train_cfg.log_with if log_dir else "none", log_dir)
    if log_dir is not None:
        accelerator.init_trackers(log_name, config=tracker_config(config))
    if train_cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} must be a multiple of the number of processes "
                          f"({accelerator.num_processes}): each process takes an equal share of every batch")
    method.prepare(model)

    T = len(stream.tasks)
    matrix = np.zeros((T + 1, T))
    result = StreamResult(matrix)
    t0 = time.perf_counter()
    cacheable = reuse_zero_shot and not hasattr(method, "eval_logits") and accelerator.num_processes == 1
    key = zero_shot_key(model, stream, train_cfg.eval_batch_size) if cacheable else None
    hit = load_cached("zero_shot", key) if key is not None else None
    if hit is not None:
        matrix[0] = hit["row"].numpy()
    else:
        matrix[0], _ = evaluate(model, stream, stem, 0, train_cfg.eval_batch_size, method, accelerator)
        if key is not None:
            store_cached("zero_shot", key, {"row": torch.from_numpy(matrix[0].copy())})
    result.eval_seconds += time.perf_counter() - t0

    if getattr(method, "trains_jointly", False):
        return _run_joint(model, method, stream, stem, config, checkpoint_dir, accelerator, result)

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
            old_label_spaces=old_label_spaces(stream, t),
        )
        t0 = time.perf_counter()
        try:
            losses = train_task(model, method, data, train_cfg, seed=config.seed * 1000 + t, accelerator=accelerator,
                                desc=f"task {t + 1}/{T} {task.name}", log_step=t * train_cfg.steps_per_task)
        except TrainingDivergedError as e:
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint yet (it diverged in the first task)"
            raise TrainingDivergedError(f"{e} {where}") from None
        assert_replicated(accelerator, model, method, f"task {t + 1} ({task.name})")
        result.losses.append(losses)
        result.train_seconds += time.perf_counter() - t0
        seen = seen + task.class_names

        if checkpoint_dir is not None and train_cfg.checkpoints and accelerator.is_main_process:
            last_good = save_checkpoint(checkpoint_dir / f"task_{t + 1}.safetensors", model, method, t + 1)
        t0 = time.perf_counter()
        matrix[t + 1], seen_acc = evaluate(model, stream, stem, t + 1, train_cfg.eval_batch_size, method, accelerator)
        result.seen_accuracy.append(seen_acc)
        result.eval_seconds += time.perf_counter() - t0
        accelerator.log({f"accuracy/{u.name}": float(a) for u, a in zip(stream.tasks, matrix[t + 1])},
                        step=(t + 1) * train_cfg.steps_per_task)
    finish_trackers(accelerator)
    return result


def joint_task_data(stream: Stream, stem: StemFeatures) -> TaskData:
    """Every task's training data as one task (Avalanche's JointTraining): the inputs side by side, each
    target an index into the stream's class names with each name once (MNIST's and digits' "zero" is one
    class). Task-incremental streams: `allowed` restricts each sample to its own task's classes, the
    label space the sequential methods train it in; class-incremental: every class (one head)."""
    names = tuple(dict.fromkeys(stream.class_names))
    column = {n: i for i, n in enumerate(names)}
    targets, allowed = [], []
    for task in stream.tasks:
        targets.append(torch.tensor([column[task.class_names[y]] for y in task.train.labels], dtype=torch.long))
        own = torch.zeros(len(names), dtype=torch.bool)
        own[[column[n] for n in task.class_names]] = True
        allowed.append(own.expand(len(task.train), -1))
    # A Task is needed for its name only (messages); its datasets are the first task's, never read.
    first = stream.tasks[0]
    task = Task(name="joint(" + "+".join(t.name for t in stream.tasks) + ")", train=first.train, test=first.test,
                class_ids=tuple(range(len(stream.class_names))))
    return TaskData(index=0, task=task, inputs=torch.cat(stem.train), targets=torch.cat(targets), class_names=names,
                    seen_class_names=(), allowed=torch.cat(allowed) if stream.scenario == "task" else None)


def _run_joint(model, method, stream: Stream, stem: StemFeatures, config: RunConfig, checkpoint_dir: Path | None,
               accelerator: Accelerator, result: StreamResult) -> StreamResult:
    """A method that `trains_jointly` (the joint upper bound): one training on every task's data at once,
    as many optimizer steps as the whole stream gets (T x steps_per_task), then rows 1..T of the matrix,
    each the final model's evaluation in that row's label spaces (the joint model is the only one: no
    intermediate state exists, so its forgetting is 0 by construction; Last is the number to read)."""
    T = len(stream.tasks)
    data = joint_task_data(stream, stem)
    train_cfg = dataclasses.replace(config.train, steps_per_task=config.train.steps_per_task * T)
    t0 = time.perf_counter()
    result.losses.append(train_task(model, method, data, train_cfg, seed=config.seed * 1000, accelerator=accelerator,
                                    desc=f"joint: {T} tasks at once"))
    assert_replicated(accelerator, model, method, "joint training")
    result.train_seconds += time.perf_counter() - t0
    if checkpoint_dir is not None and config.train.checkpoints and accelerator.is_main_process:
        save_checkpoint(checkpoint_dir / f"task_{T}.safetensors", model, method, T)
    t0 = time.perf_counter()
    for t in range(1, T + 1):
        result.accuracy_matrix[t], seen_acc = evaluate(model, stream, stem, t, config.train.eval_batch_size, method,
                                                       accelerator)
        result.seen_accuracy.append(seen_acc)
    result.eval_seconds += time.perf_counter() - t0
    accelerator.log({f"accuracy/{u.name}": float(a) for u, a in zip(stream.tasks, result.accuracy_matrix[T])},
                    step=T * config.train.steps_per_task)
    finish_trackers(accelerator)
    return result


def zero_shot_key(model, stream: Stream, batch_size: int) -> str:
    """What row 0 depends on: the model's whole state, the test sets, the label spaces, the batch size."""
    # v2: class-incremental tasks ahead are scored among the classes up to their own (evaluate)
    return content_key("zero-shot-row-v2", tensor_digest(model.state_dict()), [t.test.fingerprint for t in stream.tasks],
                       label_spaces(stream), stream.scenario, batch_size)


def finish_trackers(accelerator: Accelerator) -> None:
    """Flush and close the trackers' files. Not `accelerator.end_training()`: that also destroys the process
    group, which the next method or change of the same run still needs under DDP."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def leaves_parameters_unused(method) -> bool:
    """Whether the method's forward leaves trainable parameters without a gradient in some steps (experts
    outside the top-k): only then must DDP search for them, an extra autograd traversal every step."""
    return bool(getattr(method, "leaves_parameters_unused", False))


def tracker_config(config: RunConfig) -> dict:
    """The run's settings as the flat scalars and strings trackers accept (TensorBoard's hparams)."""
    return tracker_scalars({"seed": config.seed, "model": config.model.name, "family": config.model.family,
                            "adapter": config.adapter.kind, "methods": ",".join(m.display_name for m in config.methods)},
                           train=config.train)


def tracker_scalars(values: dict, **sections) -> dict:
    """`values` and each dataclass section's fields (as `section.field`), keeping what trackers accept:
    numbers, strings and booleans."""
    flat = dict(values)
    for name, section in sections.items():
        flat.update({f"{name}.{k}": v for k, v in vars(section).items()})
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}


def train_task(model, method, data: TaskData, train_cfg: TrainConfig, *, seed: int, accelerator: Accelerator | None = None,
               desc: str = "", resume_from: Path | None = None, checkpoint_every: int = 0,
               on_checkpoint=None, log_step: int = 0) -> list[float]:
    """One task: the method's begin_task, `steps_per_task` optimizer steps of its loss, its end_task.

    Returns the per-step losses. With `on_checkpoint(state)`, a `TrainState` is handed over every
    `checkpoint_every` steps and after the last step (the caller writes it atomically). With
    `resume_from` (a file written from such a state), training continues exactly where that state
    stopped: model, optimizer, scheduler, method state (teacher outputs, Fisher, buffers, weight
    averages), RNG states and the position in the data order are restored, begin_task is not run
    again, and the run ends with the same numbers as an uninterrupted one (bit-identical on CPU).
    Every step's loss, lr and grad norm go to the accelerator's trackers at step `log_step` + step.
    """
    tune_allocator()
    accelerator = accelerator or make_accelerator(leaves_parameters_unused(method))
    # begin_task may choose what trains (a new router, frozen experts), so it runs before the optimizer
    # is built; a resumed task gets those choices back from its checkpoint instead.
    saved = TrainState.load(resume_from) if resume_from is not None else None
    if saved is not None:
        saved.restore_trainable(model)
    else:
        method.begin_task(model, data)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for every parameter's update (3x faster than the per-tensor loop on the CPU)
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(train_cfg.warmup_steps, train_cfg.steps_per_task))
    # One process: `step_loss` is the method's loss as is. Several (accelerate launch): it is wrapped in
    # DistributedDataParallel, which all-reduces (averages) the gradients in backward. Without mixed precision
    # the optimizer and the scheduler stay plain torch objects: Accelerate's wrappers then add nothing this loop
    # uses (no gradient accumulation, no loss scaler, split batches: one scheduler step per step), but its
    # optimizer's step searches sys.path for the `lomo_optim` package twice per call and its zero_grad inspects a
    # signature, which cost a fifth of a small MLP's step on a CPU (benchmarks/peers). With mixed precision
    # (`accelerate launch --mixed_precision fp16`) they are wrapped: the fp16 loss scaler's unscale and skip live
    # in Accelerate's optimizer.
    if accelerator.mixed_precision == "no":
        step_loss = accelerator.prepare(MethodLoss(model, method, data))
    else:
        step_loss, optimizer, scheduler = accelerator.prepare(MethodLoss(model, method, data), optimizer, scheduler)
    order = batch_order(len(data.inputs), train_cfg.batch_size, train_cfg.steps_per_task, seed=seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    losses = saved.restore(model, method, optimizer, scheduler) if saved is not None else []
    start = len(losses)
    bar = tqdm(range(start, len(order)), desc=desc, leave=False, initial=start, total=len(order),
               disable=not accelerator.is_local_main_process)
    for step in bar:
        # every process draws the same global batch (same seed) and takes an equal share of it, so the
        # averaged gradient is the full batch's: the same training as one process, to float rounding
        index = order[step][rank::world]
        batch = Batch(inputs=data.inputs[index], targets=data.targets[index], index=index, share=(rank, world))
        loss, logs = step_loss(batch)
        if not math.isfinite(loss.item()):
            raise TrainingDivergedError(
                f"loss is {loss.item()} at task {data.index + 1} ({data.task.name}), step {step + 1} ({logs}); training "
                f"stopped, the model before this task is kept. Lower train.lr (now {train_cfg.lr}) or the method's reg_weight."
            )
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, train_cfg.grad_clip) if train_cfg.grad_clip > 0 else None
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if accelerator.trackers:
            values = {"loss": loss.item(), "lr": lr, **{f"loss/{k}": v for k, v in logs.items()}}
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)  # before clipping
            accelerator.log(values, step=log_step + step + 1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if on_checkpoint is not None and (done == len(order) or (checkpoint_every and done % checkpoint_every == 0)):
            on_checkpoint(TrainState.capture(model, method, optimizer, scheduler, losses))
    method.end_task(model, data)
    return losses


def make_accelerator(find_unused_parameters: bool = False, log_with: str = "none",
                     log_dir: Path | None = None) -> Accelerator:
    """CPU unless CUDA is there. Several processes: DDP, told to search for parameters a step leaves
    unused only for methods that do (`leaves_parameters_unused`). `split_batches`: the processes share
    each global batch (train_task splits it), so the lr schedule steps once per optimizer step, not once
    per process. `log_with`: an Accelerate tracker ("tensorboard", "wandb", ...; "none": off) writing
    under `log_dir`."""
    return Accelerator(cpu=not torch.cuda.is_available(), dataloader_config=DataLoaderConfiguration(split_batches=True),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
                       log_with=None if log_with == "none" else log_with, project_dir=log_dir)


def assert_replicated(accelerator: Accelerator, model, method, where: str) -> None:
    """Under several processes, every process must end a task with the same weights and the same
    method state (exemplar and replay buffers, Fisher, teacher outputs), bit for bit: DDP averages the
    gradients and everything else is computed from identical data and seeds. Compared by digest."""
    if accelerator.num_processes == 1:
        return

    state = {f"model.{k}": v for k, v in model.trainable_state().items()}
    state.update({f"method.{k}": v for k, v in method.state_dict().items()})
    digests = gather_object([tensor_digest(state)])
    if len(set(digests)) > 1:
        raise TrainingDivergedError(f"after {where} the {accelerator.num_processes} processes hold different weights or "
                                    f"method state ({', '.join(d[:8] for d in digests)}): a method draws randomness or "
                                    "data that differs per process")


class MethodLoss(torch.nn.Module):
    """The method's loss for one batch, as a module: DDP hooks the forward pass of the module it wraps,
    so the whole step (the method's calls into the model, teachers, regularisers) runs inside it."""

    def __init__(self, model, method, data: TaskData):
        super().__init__()
        self.model, self.method, self.data = model, method, data

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.method.loss(self.model, batch, self.data)


@dataclass
class TrainState:
    """Everything needed to continue a task exactly: one safetensors file (tensors + JSON metadata).

    The position in the data order is `len(losses)`: the batch order is a pure function of the seed.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict

    @classmethod
    def capture(cls, model, method, optimizer, scheduler, losses: list[float]) -> TrainState:
        tensors = {f"model.{k}": v for k, v in model.trainable_state().items()}
        tensors.update({f"method.{k}": v.detach().clone() for k, v in method.state_dict().items()})
        opt = optimizer.state_dict()
        for i, s in opt["state"].items():
            for k, v in s.items():
                tensors[f"optim.{i}.{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        np_state = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
        meta = {
            "losses": list(losses),
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
            "param_groups": opt["param_groups"],
            "optim_keys": {str(i): sorted(s) for i, s in opt["state"].items()},
            "scheduler": scheduler.state_dict(),
            "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "rng_python": _python_rng_state(),
        }
        return cls(tensors, meta)

    def to_bytes(self) -> bytes:

        return save({k: v.contiguous() for k, v in self.tensors.items()}, metadata={"train_state": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: Path) -> TrainState:

        with safe_open(str(path), framework="pt") as f:
            return cls({k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["train_state"]))

    def restore_trainable(self, model) -> None:
        """Which parameters train, as when the state was captured (before the optimizer is built)."""
        trainable = set(self.meta["trainable"])
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)

    def restore(self, model, method, optimizer, scheduler) -> list[float]:
        """Put every saved state back; returns the losses so far."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in self.tensors.items():
                if k.startswith("model."):
                    params[k.removeprefix("model.")].copy_(v)
        method.load_state_dict({k.removeprefix("method."): v for k, v in self.tensors.items() if k.startswith("method.")})
        state = {int(i): {k: self.tensors[f"optim.{i}.{k}"] for k in keys} for i, keys in self.meta["optim_keys"].items()}
        optimizer.load_state_dict({"state": state, "param_groups": self.meta["param_groups"]})
        scheduler.load_state_dict(self.meta["scheduler"])
        torch.set_rng_state(self.tensors["rng.torch"])
        name, pos, has_gauss, cached = self.meta["rng_numpy"]
        np.random.set_state((name, self.tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = self.meta["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        return list(self.meta["losses"])


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


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

    tensors = {f"model.{k}": v.contiguous() for k, v in model.trainable_state().items()}
    tensors.update({f"method.{k}": v.detach().contiguous() for k, v in method.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata={"tasks_done": str(tasks_done)}))
    return path


def check_finite(loss: torch.Tensor, method: str, step: int) -> None:
    """Stop a method's own training loop (erasers, personalizers) on a NaN or infinite loss with the error
    the main loop raises for it: nothing has been recorded yet."""
    if not math.isfinite(loss.item()):
        raise TrainingDivergedError(f"{method}: the loss is {loss.item()} at step {step}; nothing was recorded. "
                                    "Lower its lr (a KEY=VALUE knob) and run it again")


def mean_ends(losses: list[float]) -> tuple[float, float]:
    """The mean of the first and of the last tenth of `losses` (at least one value each)."""
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k
