"""iCaRL: incremental classifier and representation learning (Rebuffi et al., CVPR 2017; arXiv:1611.07725).

L = mean_{(x, y, k) in B u R} [ CE(s_k(x), y) + reg_weight * T^2 * KL(softmax(s_old^prev(x) / T) || softmax(s_old(x) / T)) ]

B is the current batch, R a replay batch of exemplars from the memory, s_k(x) the image-text logits of
x over the label space of the task x belongs to (k), s_old the logits over the classes of the tasks
before this one and s_old^prev those of the model at the start of the task (T = 2).

Three parts, as in the paper:
- Exemplar memory of at most `memory_size` images in total, m = memory_size // classes_seen per class.
  After a task, each of its classes gets m exemplars chosen by herding (Algorithm 4) in feature space
  (the model's L2-normalised image embeddings): greedily, the sample whose addition brings the running
  mean of the chosen set closest to the class mean; the sets of older classes are cut to their first m
  (Algorithm 5), so the memory never exceeds the budget. Following the paper's footnote, every average
  of features is re-normalised (class mean and running means).
- Training on new data plus exemplars, with distillation to the task-start model on the old classes.
  The teacher never changes within a task, so its logits are computed once at begin_task, on the task's
  images and on the memory (the paper's q_i^y, Algorithm 3), never per step.
- Nearest-mean-of-exemplars classification (`eval_logits`): a class's score is
  logit_scale * cos(image embedding, normalised mean of its exemplars' embeddings).

Deviations:
- Task-incremental, as the MTIL benchmark's iCaRL baseline: each sample is classified among the class
  names of its own task (current images among the task's classes, each exemplar among its task's
  classes). On a class-incremental stream a task's label space is every class seen so far, which is the
  paper's single head again.
- Softmax cross-entropy and KL distillation (T = 2, as LwF) instead of the paper's per-class sigmoid
  binary cross-entropy: an image-text head is a softmax over class names, and the KL is the faithful
  analogue of distilling its old-class outputs. The old classes' names are deduplicated.
- `memory_size` defaults to 500, not the paper's 2000: that was for CIFAR-100's 100 classes, while
  mtil-mini has about 42 (about 12 exemplars per class at the end, against the paper's 20).
- A replay batch of `replay_batch` exemplars joins every step (the paper shuffles the union of new data
  and exemplars into one training set). It is drawn without replacement from a generator seeded by
  (task index, step), not from torch's global RNG: the draw is then part of the method's state (the step
  counter), so a resumed task and a state round-trip draw the same batches.
- A class in the budget is a (task, class) pair, but the classifier sees class names: the nearest-mean
  prototype of a name pools the exemplars of every task that has that name (MNIST's and digits' "zero"
  share one mean), so a task not trained yet whose names were learned before is scored by those means,
  not zero-shot. Names without exemplars (tasks not learned yet) keep their text embedding, on the same
  logit_scale * cos scale: evaluation mixes NME and text scores where a label space holds both.
- The class means are computed at end_task under the model just trained and kept in the state (the model
  does not change between tasks), instead of recomputed on every evaluation batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData, batched_logits, distillation_loss, process_share


@dataclass(frozen=True)
class Params:
    memory_size: int = 500  # exemplars in total, all classes together
    replay_batch: int = 0  # exemplars per step; 0 = as many as the current batch
    temperature: float = 2.0
    reg_weight: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.memory_size < 1:
            raise ConfigError(f"icarl memory_size must be a positive number of exemplars, got {self.memory_size}")
        if self.replay_batch < 0:
            raise ConfigError(f"icarl replay_batch must be >= 0 (0 = the training batch size), got {self.replay_batch}")
        if self.temperature <= 0:
            raise ConfigError(f"icarl temperature must be > 0 (the paper's distillation uses 2), got {self.temperature}")
        if self.reg_weight < 0:
            raise ConfigError(f"icarl reg_weight must be >= 0, got {self.reg_weight}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"icarl label_smoothing must be in [0, 1), got {self.label_smoothing}")


class ICaRL:
    Params = Params
    adapter_kinds = ("none", "lora")

    def __init__(self, params: Params):
        self.params = params
        # The exemplar memory, sets ordered by (task, label), each set in herding order.
        self.memory_inputs: torch.Tensor | None = None  # (M, ...) stem outputs
        self.memory_targets = torch.empty(0, dtype=torch.long)  # (M,) index into its task's label space
        self.memory_tasks = torch.empty(0, dtype=torch.long)  # (M,) task index
        self.label_spaces: dict[int, tuple[str, ...]] = {}  # task index -> the names it trained on
        # Nearest-mean-of-exemplars prototypes, one per class name, under the model after the last task.
        self.mean_names: tuple[str, ...] = ()
        self.class_means: torch.Tensor | None = None  # (K, D), L2-normalised
        # Within a task: the task-start model's logits over the old classes, and the replay step.
        self.teacher_logits: torch.Tensor | None = None  # (N_train, C_old)
        self.teacher_memory_logits: torch.Tensor | None = None  # (M, C_old)
        self.replay_step = 0

    def prepare(self, model) -> None:
        pass

    def begin_task(self, model, data: TaskData) -> None:
        n_sets = len(self.exemplar_sets()) + len(data.targets.unique())
        if self.params.memory_size < n_sets:
            raise ConfigError(
                f"icarl memory_size {self.params.memory_size} leaves no exemplar for some of the {n_sets} classes "
                f"seen after task {data.index + 1}: set method params memory_size >= {n_sets}"
            )
        old = old_class_names(data)
        self.teacher_logits = batched_logits(model, data.inputs, old) if old else None
        has_memory = bool(old) and self.memory_inputs is not None
        self.teacher_memory_logits = batched_logits(model, self.memory_inputs, old) if has_memory else None
        self.replay_step = 0

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        inputs, n_new = batch.inputs, len(batch.inputs)
        replay = process_share(batch, self.replay_indices(data.index, p.replay_batch or batch.global_size))
        self.replay_step += 1
        replay_tasks, replay_targets = self.memory_tasks[replay], self.memory_targets[replay]
        if len(replay):
            inputs = torch.cat([inputs, self.memory_inputs[replay]])  # (B + R, ...)

        # One pass of the image tower scores every class any sample of the batch needs.
        old = old_class_names(data)
        spaces = {k: self.label_spaces[k] for k in replay_tasks.unique().tolist()}
        names = tuple(dict.fromkeys(data.class_names + old + sum(spaces.values(), ())))
        column = {name: i for i, name in enumerate(names)}
        logits = model(inputs, names)  # (B + R, U)

        def columns(label_space):
            return torch.tensor([column[n] for n in label_space], device=logits.device)

        # Cross-entropy of every sample among the classes of its own task.
        ce = F.cross_entropy(logits[:n_new, columns(data.class_names)], batch.targets,
                             label_smoothing=p.label_smoothing, reduction="sum")
        for k, label_space in spaces.items():
            rows = (replay_tasks == k).nonzero().squeeze(1)
            ce = ce + F.cross_entropy(logits[n_new + rows][:, columns(label_space)], replay_targets[rows],
                                      label_smoothing=p.label_smoothing, reduction="sum")
        ce = ce / len(inputs)
        if self.teacher_logits is None:
            return ce, {"ce": ce.item()}

        # Distillation on the old classes, over the current images and the replayed exemplars.
        teacher = self.teacher_logits[batch.index]
        if len(replay):
            teacher = torch.cat([teacher, self.teacher_memory_logits[replay]])  # (B + R, C_old)
        kd = distillation_loss(logits[:, columns(old)], teacher, p.temperature)
        return ce + p.reg_weight * kd, {"ce": ce.item(), "kd": kd.item()}

    def replay_indices(self, task_index: int, size: int) -> torch.Tensor:
        """The exemplars replayed at this step, without replacement; a function of (task, step) only."""
        n = 0 if self.memory_inputs is None else len(self.memory_inputs)
        g = torch.Generator().manual_seed(100_000 * task_index + self.replay_step)  # distinct while steps < 100k
        return torch.randperm(n, generator=g)[:size]

    @torch.no_grad()
    def end_task(self, model, data: TaskData) -> None:
        self.teacher_logits = self.teacher_memory_logits = None
        old_sets = self.exemplar_sets()
        new_labels = data.targets.unique().tolist()
        m = self.params.memory_size // (len(old_sets) + len(new_labels))

        # Algorithm 5: keep the first m of every old set (they are stored in herding order).
        keep = torch.cat([rows[:m] for rows in old_sets.values()]) if old_sets else torch.empty(0, dtype=torch.long)
        parts = [(self.memory_inputs[keep], self.memory_targets[keep], self.memory_tasks[keep])] if old_sets else []
        # Algorithm 4: herd m exemplars of each new class in the current feature space.
        features = image_features(model, data.inputs)  # (N, D)
        for label in new_labels:
            rows = (data.targets == label).nonzero().squeeze(1)
            chosen = rows[herding_order(features[rows], min(m, len(rows)))]
            parts.append((data.inputs[chosen], data.targets[chosen], torch.full((len(chosen),), data.index)))
        self.memory_inputs, self.memory_targets, self.memory_tasks = (torch.cat(t) for t in zip(*parts))
        self.label_spaces[data.index] = tuple(data.class_names)
        self.update_class_means(model)

    def exemplar_sets(self) -> dict[tuple[int, int], torch.Tensor]:
        """(task, label) -> the rows of the memory holding that class's exemplars, in herding order."""
        sets: dict[tuple[int, int], torch.Tensor] = {}
        for k, y in dict.fromkeys(zip(self.memory_tasks.tolist(), self.memory_targets.tolist())):
            sets[(k, y)] = ((self.memory_tasks == k) & (self.memory_targets == y)).nonzero().squeeze(1)
        return sets

    def exemplar_names(self) -> list[str]:
        return [self.label_spaces[k][y] for k, y in zip(self.memory_tasks.tolist(), self.memory_targets.tolist())]

    @torch.no_grad()
    def update_class_means(self, model) -> None:
        """The NME prototypes: per class name, the re-normalised mean embedding of its exemplars."""
        features = image_features(model, self.memory_inputs)  # (M, D)
        names = self.exemplar_names()
        self.mean_names = tuple(dict.fromkeys(names))
        which = torch.tensor([self.mean_names.index(n) for n in names])
        sums = torch.zeros(len(self.mean_names), features.shape[1]).index_add_(0, which, features)
        self.class_means = F.normalize(sums, dim=-1)  # (K, D); normalising the sum = normalising the mean

    @torch.no_grad()
    def eval_logits(self, model, inputs: torch.Tensor, class_names: tuple[str, ...]) -> torch.Tensor:
        """(N, C): logit_scale * cos(image, class prototype); the prototype is the exemplar mean where the
        class has exemplars, else its text embedding (zero-shot)."""
        prototype = {n: self.class_means[i] for i, n in enumerate(self.mean_names)}
        unseen = tuple(dict.fromkeys(n for n in class_names if n not in prototype))
        if unseen:
            prototype.update(zip(unseen, model.class_embeddings(unseen)))
        weights = torch.stack([prototype[n] for n in class_names])  # (C, D)
        return model.logit_scale * model.image_embeddings(inputs) @ weights.T

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"replay_step": torch.tensor(self.replay_step)}
        if self.memory_inputs is not None:
            state.update({
                "memory.inputs": self.memory_inputs, "memory.targets": self.memory_targets,
                "memory.tasks": self.memory_tasks,
                "memory.label_spaces": encode_json({str(k): list(v) for k, v in self.label_spaces.items()}),
                "class_means": self.class_means, "class_mean_names": encode_json(list(self.mean_names)),
            })
        if self.teacher_logits is not None:
            state["teacher_logits"] = self.teacher_logits
        if self.teacher_memory_logits is not None:
            state["teacher_memory_logits"] = self.teacher_memory_logits
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.replay_step = int(state["replay_step"])
        self.memory_inputs = state.get("memory.inputs")
        if self.memory_inputs is not None:
            self.memory_targets, self.memory_tasks = state["memory.targets"], state["memory.tasks"]
            self.label_spaces = {int(k): tuple(v) for k, v in decode_json(state["memory.label_spaces"]).items()}
            self.class_means, self.mean_names = state["class_means"], tuple(decode_json(state["class_mean_names"]))
        self.teacher_logits = state.get("teacher_logits")
        self.teacher_memory_logits = state.get("teacher_memory_logits")


def old_class_names(data: TaskData) -> tuple[str, ...]:
    """The classes of the tasks before this one, each name once."""
    return tuple(dict.fromkeys(data.seen_class_names))


def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL Algorithm 4: m row indices of `features` (n, D), each chosen so that the (re-normalised)
    mean of the rows chosen so far is closest to the (re-normalised) mean of all rows."""
    target = F.normalize(features.mean(0), dim=0)  # (D,)
    chosen_sum = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool)
    order = []
    for _ in range(m):
        # The mean of the chosen set if each candidate joined it; normalising the sum = normalising the mean.
        candidate_means = F.normalize(chosen_sum + features, dim=-1)  # (n, D)
        distance = (candidate_means - target).norm(dim=-1).masked_fill(~available, float("inf"))
        i = int(distance.argmin())
        order.append(i)
        available[i] = False
        chosen_sum += features[i]
    return torch.tensor(order, dtype=torch.long)


@torch.no_grad()
def image_features(model, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, D) L2-normalised image embeddings of stem outputs: iCaRL's feature map phi."""
    return torch.cat([model.image_embeddings(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def encode_json(value) -> torch.Tensor:
    """A JSON value as a uint8 tensor of its UTF-8 bytes (method state holds tensors only)."""
    return torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8)


def decode_json(tensor: torch.Tensor):
    return json.loads(bytes(tensor.tolist()).decode("utf-8"))
