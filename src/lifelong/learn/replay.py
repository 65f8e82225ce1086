"""Experience replay with a fixed-size buffer (Chaudhry et al., "On Tiny Episodic Memories in Continual
Learning", 2019, arXiv:1902.10486; the form Avalanche's ReplayPlugin implements).

L = mean over B u R of CE(s(x), y)

B is the current batch and R a batch of `replay_batch` samples (0 = as many as B) drawn from a buffer
of at most `memory_size` stored samples (their cached stem outputs and labels), concatenated into one
batch: one mean of cross-entropies, as Avalanche's ReplayDataLoader does. On the first task the
buffer is empty and the loss is plain cross-entropy.

Buffer update after every task (`policy`), with random choices as Avalanche's default storage policy:
- experience (default; Avalanche's ExperienceBalancedBuffer, adaptive): with g tasks seen, every task
  keeps memory_size // g samples (the first memory_size % g tasks one more). The new task's share is a
  uniformly random subset of its training set; an older task's share is cut to the first samples of its
  random subset, so it stays a uniform subset.
- class (Avalanche's ClassBalancedBuffer): the same, per class seen ((task, label) pairs) instead of per task.

A replayed sample is classified among the current label space when its class is in it (class-incremental:
always, as the old classes are part of it), else among the label space of the task it came from
(task-incremental, as iCaRL's exemplars are here).

Deviations from Avalanche: the replay batch is drawn without replacement from the whole buffer at every
step, from a generator seeded by (seed, task, step) (Avalanche cycles a shuffled loader over the buffer);
the random subsets are drawn from a generator seeded by (seed, task). Both draws are then functions of
the method's state (the step counter, the seed), so a resumed task draws the same batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData, classification_loss, process_share

POLICIES = ("experience", "class")


@dataclass(frozen=True)
class Params:
    memory_size: int = 200  # stored samples in total (Avalanche's ReplayPlugin default mem_size)
    replay_batch: int = 0  # buffer samples per step; 0 = as many as the current batch
    policy: str = "experience"  # how the buffer is shared: per task ("experience") or per class
    seed: int = 0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.memory_size < 1:
            raise ConfigError(f"replay memory_size must be a positive number of samples, got {self.memory_size}")
        if self.replay_batch < 0:
            raise ConfigError(f"replay replay_batch must be >= 0 (0 = the training batch size), got {self.replay_batch}")
        if self.policy not in POLICIES:
            raise ConfigError(f"replay policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"replay label_smoothing must be in [0, 1), got {self.label_smoothing}")


class Replay:
    Params = Params
    adapter_kinds = ("none", "lora")

    def __init__(self, params: Params):
        self.params = params
        # The buffer, grouped by task (then by label under the class policy), each group in random order.
        self.inputs: torch.Tensor | None = None  # (M, ...) stem outputs
        self.targets = torch.empty(0, dtype=torch.long)  # (M,) index into its task's label space
        self.tasks = torch.empty(0, dtype=torch.long)  # (M,) task index
        self.label_spaces: dict[int, tuple[str, ...]] = {}  # task index -> the names it trained on
        self.replay_step = 0

    def prepare(self, model) -> None:
        pass

    def begin_task(self, model, data: TaskData) -> None:
        self.replay_step = 0

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        if self.inputs is None:
            ce = classification_loss(model, batch, data, p.label_smoothing)
            return ce, {"ce": ce.item()}
        # drawn for the global batch (the same draw in every process), of which this process takes its share
        replay = process_share(batch, self.replay_indices(data.index, p.replay_batch or batch.global_size))
        self.replay_step += 1
        inputs = torch.cat([batch.inputs, self.inputs[replay]])  # (B + R, ...)
        names, groups = self.label_space_groups(batch.targets, replay, data)
        logits = model(inputs, names)  # (B + R, U): one pass scores every class any sample needs
        ce = sum(F.cross_entropy(logits[rows][:, columns], targets, reduction="sum", label_smoothing=p.label_smoothing)
                 for rows, columns, targets in groups) / len(inputs)
        return ce, {"ce": ce.item()}

    def label_space_groups(self, targets: torch.Tensor, replay: torch.Tensor, data: TaskData):
        """The class names to score, and per label space (rows of the batch, their columns among those
        names, the rows' targets inside that space). The current batch and every replayed sample whose
        class is a current class form the first group; in task-incremental streams the other replayed
        samples form one group per task they came from."""
        current = {n: i for i, n in enumerate(data.class_names)}
        names = dict(current)  # name -> column
        n_new = len(targets)
        rows, in_current = list(range(n_new)), targets.tolist()
        others: dict[int, tuple[list[int], list[int]]] = {}  # task -> (rows, targets in its space)
        for i, (k, y) in enumerate(zip(self.tasks[replay].tolist(), self.targets[replay].tolist())):
            name = self.label_spaces[k][y]
            if name in current:
                rows.append(n_new + i)
                in_current.append(current[name])
            else:
                for n in self.label_spaces[k]:
                    names.setdefault(n, len(names))
                group = others.setdefault(k, ([], []))
                group[0].append(n_new + i)
                group[1].append(y)
        groups = [(torch.tensor(rows), torch.arange(len(current)), torch.tensor(in_current))]
        for k, (r, y) in others.items():
            columns = torch.tensor([names[n] for n in self.label_spaces[k]])
            groups.append((torch.tensor(r), columns, torch.tensor(y)))
        return tuple(names), groups

    def replay_indices(self, task_index: int, size: int) -> torch.Tensor:
        """The buffer rows replayed at this step, without replacement; a function of (seed, task, step)."""
        g = torch.Generator().manual_seed(hash_seed(self.params.seed, task_index, self.replay_step))
        return torch.randperm(len(self.inputs), generator=g)[:size]

    @torch.no_grad()
    def end_task(self, model, data: TaskData) -> None:
        self.label_spaces[data.index] = tuple(data.class_names)
        g = torch.Generator().manual_seed(hash_seed(self.params.seed, data.index, -1))
        # the new task's samples in random order: any prefix is a uniform subset
        order = torch.randperm(len(data.inputs), generator=g)
        new_targets = data.targets[order]
        new_tasks = torch.full((len(order),), data.index, dtype=torch.long)
        if self.inputs is None:
            inputs, targets, tasks = data.inputs[order], new_targets, new_tasks
        else:
            inputs = torch.cat([self.inputs, data.inputs[order]])
            targets, tasks = torch.cat([self.targets, new_targets]), torch.cat([self.tasks, new_tasks])
        keep = self.balanced_rows(targets, tasks)
        self.inputs, self.targets, self.tasks = inputs[keep], targets[keep], tasks[keep]

    def balanced_rows(self, targets: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Rows to keep: the first `share` rows of every group (task, or (task, label)), in order."""
        keys = list(zip(tasks.tolist(), targets.tolist())) if self.params.policy == "class" else [(k,) for k in tasks.tolist()]
        groups: dict[tuple, list[int]] = {}
        for row, key in enumerate(keys):
            groups.setdefault(key, []).append(row)
        shares = group_shares(self.params.memory_size, len(groups))
        rows = [r for share, members in zip(shares, groups.values()) for r in members[:share]]
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"replay_step": torch.tensor(self.replay_step)}
        if self.inputs is not None:
            state.update({"buffer.inputs": self.inputs, "buffer.targets": self.targets, "buffer.tasks": self.tasks,
                          "buffer.label_spaces": encode_json({str(k): list(v) for k, v in self.label_spaces.items()})})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.replay_step = int(state["replay_step"])
        self.inputs = state.get("buffer.inputs")
        if self.inputs is not None:
            self.targets, self.tasks = state["buffer.targets"], state["buffer.tasks"]
            self.label_spaces = {int(k): tuple(v) for k, v in decode_json(state["buffer.label_spaces"]).items()}


def group_shares(memory_size: int, groups: int) -> list[int]:
    """memory_size // groups each, the first memory_size % groups one more (Avalanche's adaptive size)."""
    shares = [memory_size // groups] * groups
    for i in range(memory_size - sum(shares)):
        shares[i] += 1
    return shares


def hash_seed(*parts: int) -> int:
    """A generator seed from small integers (distinct for distinct tuples while steps < 1e6)."""
    seed = 0
    for p in parts:
        seed = seed * 1_000_003 + (p + 1)
    return seed % (2**63)


def encode_json(value) -> torch.Tensor:
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def decode_json(t: torch.Tensor):
    return json.loads(bytes(t.tolist()).decode())
