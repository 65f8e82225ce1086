"""The operations that add a change to a ledger: learn (and resume), revert.

Each runs under the ledger's write lock. A learn change first writes its spec to DIR/pending/, then the
probe scores before it, then trains with a checkpoint every `checkpoint_every` steps; `resume` picks up
from the last checkpoint and ends with the numbers an uninterrupted run gives (the loop restores
model, optimizer, scheduler, method state, RNG and data position; see loop.TrainState). The change
enters the history with one atomic manifest write, after which the pending directory is removed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from lifelong.atomic import atomic_write_bytes, atomic_write_json
from lifelong.config import (
    AdapterConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    method_train,
    to_dict,
)
from lifelong.data.base import Task
from lifelong.data.sources import default_task_name, load_source
from lifelong.errors import DataFormatError, LedgerError, LifelongError
from lifelong.families import prepare_trainable
from lifelong.learn import build_method, method_params
from lifelong.ledger.adapters import revert_adapt
from lifelong.ledger.core import Ledger
from lifelong.ledger.edits import revert_edit
from lifelong.ledger.erasures import revert_erase
from lifelong.ledger.patch import apply_patch, check_recordable, dense_patch, negate, patch_from_model
from lifelong.ledger.personal import revert_personal
from lifelong.ledger.probes import Probe, run_probes, unique_name
from lifelong.ledger.store import LedgerLock
from lifelong.loop import (
    TaskData,
    TrainState,
    finish_trackers,
    leaves_parameters_unused,
    make_accelerator,
    stem_outputs,
    tracker_scalars,
    train_task,
)
from lifelong.metrics.cost import PeakMemory, count_parameters

PENDING = "pending"


@dataclass(frozen=True)
class TaskRef:
    """The data of a learn change: `load_source(source, split, max_items=..., seed=seed, **options)`."""

    source: str
    name: str
    options: dict = field(default_factory=dict)
    train_items: int | None = None
    test_items: int | None = 500
    seed: int = 0


@dataclass(frozen=True)
class LearnSpec:
    """What a learn change records and replays: one method on one task, with its training settings.
    Stored in the change's record (and pending/change.json) as `to_dict()`; `from_dict` reads it back."""

    method: MethodConfig
    adapter: AdapterConfig
    train: TrainConfig
    seed: int
    task: TaskRef
    checkpoint_every: int = 10
    id: int | None = None  # the change id, once it is pending in a ledger

    def to_dict(self) -> dict:
        out = {"kind": "learn", "method": {"name": self.method.name, "label": self.method.label,
                                           "params": dict(self.method.params)},
               "adapter": to_dict(self.adapter), "train": to_dict(self.train), "seed": self.seed,
               "task": dataclasses.asdict(self.task), "checkpoint_every": self.checkpoint_every}
        return {"id": self.id, **out} if self.id is not None else out

    @classmethod
    def from_dict(cls, raw: dict) -> LearnSpec:
        return cls(method=from_dict(MethodConfig, raw["method"], "spec.method"),
                   adapter=from_dict(AdapterConfig, raw["adapter"], "spec.adapter"),
                   train=from_dict(TrainConfig, raw["train"], "spec.train"), seed=raw["seed"],
                   task=TaskRef(**raw["task"]), checkpoint_every=raw.get("checkpoint_every", 10), id=raw.get("id"))


def learn_spec(config: RunConfig, task: dict, checkpoint_every: int) -> LearnSpec:
    """One method on one task from a run config (the method's own train overrides applied)."""
    if len(config.methods) != 1:
        raise LedgerError(f"a change is one method; the config names {len(config.methods)}: "
                          f"{', '.join(m.display_name for m in config.methods)}")
    mc = config.methods[0]
    method_params(mc)  # unknown knobs fail now, not after the model is loaded
    task = {"name": None, "train_items": None, "test_items": 500, "options": {}, "seed": config.seed, **task}
    task["name"] = task["name"] or default_task_name(task["source"], task["options"])
    return LearnSpec(method=MethodConfig(name=mc.name, label=mc.label, params=dict(mc.params)),
                     adapter=mc.adapter or config.adapter, train=method_train(config, mc), seed=config.seed,
                     task=TaskRef(**task), checkpoint_every=checkpoint_every)


def learn(root: str | Path, spec: LearnSpec) -> int:
    """Record one learn change (a method on a task); returns its id."""
    root = Path(root)
    Ledger.open(root).require_operation("learn")  # a clear error before the lock file is created in a non-ledger
    with LedgerLock(root, "lifelong learn"):
        ledger = Ledger.open(root)
        pending = _pending_raw(root)
        if pending is not None:
            raise LedgerError(
                f"{root} has an interrupted change {pending.get('id')} ({pending.get('method', {}).get('name')} on "
                f"{pending.get('task', {}).get('name')}): `lifelong resume {root}` continues it, "
                f"`lifelong resume {root} --discard` drops it"
            )
        spec = dataclasses.replace(spec, id=ledger.next_id())
        task = load_task(spec)
        check_task(task)  # bad data (an empty split, a class without images) fails before anything is written
        atomic_write_json(root / PENDING / "change.json", spec.to_dict())
        try:
            return _complete_learn(ledger, spec, task)
        except LifelongError:  # bad input or a diverged loss: resuming would fail the same way
            shutil.rmtree(root / PENDING, ignore_errors=True)
            raise


def resume(root: str | Path, discard: bool = False) -> int | None:
    """Continue the interrupted change of a ledger (or drop it); returns its id."""
    root = Path(root)
    Ledger.open(root)
    with LedgerLock(root, "lifelong resume"):
        ledger = Ledger.open(root)
        raw = _pending_raw(root)
        if raw is None:
            raise LedgerError(f"{root} has no interrupted change to resume (`lifelong log {root}` shows its history)")
        if discard:
            shutil.rmtree(root / PENDING)
            return None
        return _complete_learn(ledger, LearnSpec.from_dict(raw))


def _pending_raw(root: Path) -> dict | None:
    path = root / PENDING / "change.json"
    if not path.is_file():
        if (root / PENDING).exists():  # killed before the spec was written: nothing to continue
            shutil.rmtree(root / PENDING)
        return None
    return json.loads(path.read_text())


def _complete_learn(ledger: Ledger, spec: LearnSpec, loaded: Task | None = None) -> int:
    """Train and record the pending change `spec` (`loaded`: its task, when the caller has it already)."""
    root, n = ledger.root, spec.id
    pending = root / PENDING
    if any(c["id"] == n for c in ledger.changes):  # committed just before the crash; only the clean-up is left
        shutil.rmtree(pending)
        return n
    t_start = time.perf_counter()
    model = ledger.materialize()
    if not ledger.manifest["baseline"] and not ledger.changes:
        ledger.record_baseline(run_probes(model, ledger.probes))
    task = spec.task
    probe = Probe(name=unique_name(task.name, {p.name for p in ledger.probes}), source=task.source,
                  options=task.options, test_items=task.test_items, seed=task.seed, origin=f"change {n}")
    same = [p for p in ledger.probes if p.same_data(probe)]
    probe, new_probes = (same[0], []) if same else (probe, [probe])  # a task already probed keeps its probe
    probes = ledger.probes + new_probes

    before_path = pending / "before.json"
    if before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        before = ledger.current_scores()
        before.update(run_probes(model, [p for p in probes if p.name not in before]))
        atomic_write_json(before_path, before)

    method = spec.method.name
    active = ledger.active_learn_changes()
    plain = copy.deepcopy(model)
    checkpoint = pending / "train_state.safetensors"
    with PeakMemory() as memory:
        trained = train_change(model, ledger.model_config, spec, task=loaded, prior_state=ledger.method_state(method),
                               seen_class_names=seen_classes(active), old_label_spaces=label_spaces(active),
                               index=len(active), checkpoint=checkpoint, checkpoint_every=spec.checkpoint_every, log_dir=root / "logs")
    apply_patch(plain, trained["patch"], where=f"change {n}")
    after = run_probes(plain, probes)
    trainable, total = count_parameters(model)
    record = {
        "id": n,
        "kind": "learn",
        "method": method,
        "label": spec.method.label or method,
        "data": {"task": probe.name, "source": task.source, "train_items": trained["train_items"],
                 "classes": list(trained["class_names"])},
        "spec": spec.to_dict(),
        "probes_before": before,
        "probes_after": after,
        "final_loss": trained["losses"][-1] if trained["losses"] else None,
        "cost": {"train_seconds": trained["train_seconds"], "wall_seconds": time.perf_counter() - t_start,
                 "peak_rss_mb": memory.peak_mb, "trainable_params": trainable, "total_params": total,
                 "resumed": trained["resumed"]},
    }
    ledger.commit(record, trained["patch"], {method: trained["method_state"]}, new_probes)
    shutil.rmtree(pending)
    return n


def seen_classes(changes: list[dict]) -> tuple[str, ...]:
    """The class names of earlier learn changes, in order: the old tasks' heads (LwF, iCaRL...)."""
    return tuple(name for c in changes for name in c["data"]["classes"])


def label_spaces(changes: list[dict]) -> tuple[tuple[str, ...], ...]:
    """Each earlier learn change's own label space: a ledger's tasks are task-incremental (every change
    is probed among its own classes), so each is one old head (LwF's one distillation term per task)."""
    return tuple(tuple(c["data"]["classes"]) for c in changes)


def load_task(spec: LearnSpec) -> Task:
    task = spec.task
    train = load_source(task.source, "train", max_items=task.train_items, seed=task.seed, **task.options)
    test = load_source(task.source, "test", max_items=task.test_items, seed=task.seed, **task.options)
    return Task(name=task.name, train=train, test=test, class_ids=tuple(range(len(train.class_names))))


def check_task(task: Task) -> None:
    """Refuse a task the loop cannot train or probe, saying what to fix."""
    for split, data in (("train", task.train), ("test", task.test)):
        if len(data) == 0:
            raise DataFormatError(f"task {task.name}: its {split} split is empty; check the source's options "
                                  f"(--option) and --train-items/--test-items")


def train_change(model, model_config: ModelConfig, spec: LearnSpec, *, task: Task | None = None, prior_state: dict,
                 seen_class_names: tuple[str, ...], old_label_spaces: tuple[tuple[str, ...], ...] = (),
                 index: int, checkpoint: Path | None = None, checkpoint_every: int = 0, log_dir: Path | None = None) -> dict:
    """Train one learn change on the plain `model` (in place; adapters are injected into it).

    Returns the patch (relative to the model as it came in), the method's state, the losses and the
    training time (summed over interrupted sessions). With `checkpoint`, training resumes from that
    file when it exists and writes it every `checkpoint_every` steps. With `log_dir`, the trackers of
    `train.log_with` (TensorBoard by default) record every step's loss, lr and grad norm there.
    """

    mc, train_cfg, adapter = spec.method, spec.train, spec.adapter
    task = task if task is not None else load_task(spec)
    inputs = stem_outputs(model, task.train, train_cfg.eval_batch_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepare_trainable(model, model_config, adapter, seed=spec.seed)
    method = build_method(mc)
    method.prepare(model)
    check_recordable(model, before, mc.name)  # before any training time is spent
    if prior_state:
        method.load_state_dict(prior_state)
    set_seed(spec.seed)
    data = TaskData(index=index, task=task, inputs=inputs, targets=torch.as_tensor(task.train.labels),
                    class_names=task.class_names, seen_class_names=seen_class_names, old_label_spaces=old_label_spaces)

    resume_from = checkpoint if checkpoint is not None and checkpoint.is_file() else None
    elapsed = TrainState.load(resume_from).meta.get("elapsed_seconds", 0.0) if resume_from else 0.0
    t0 = time.perf_counter()

    def save(state: TrainState) -> None:
        state.meta["elapsed_seconds"] = elapsed + time.perf_counter() - t0
        atomic_write_bytes(checkpoint, state.to_bytes())

    accelerator = make_accelerator(leaves_parameters_unused(method), train_cfg.log_with if log_dir else "none", log_dir)
    if log_dir is not None:
        accelerator.init_trackers(f"change_{spec.id:04d}" if spec.id is not None else "change",
                                  config=tracker_scalars({"method": mc.name, "task": task.name, "seed": spec.seed},
                                                         train=train_cfg))
    losses = train_task(model, method, data, train_cfg, seed=spec.seed, desc=f"{mc.name} on {task.name}",
                        accelerator=accelerator, resume_from=resume_from, checkpoint_every=checkpoint_every,
                        on_checkpoint=save if checkpoint is not None else None)
    finish_trackers(accelerator)
    return {"patch": patch_from_model(model, before), "method_state": method.state_dict(), "losses": losses,
            "train_seconds": elapsed + time.perf_counter() - t0, "resumed": resume_from is not None,
            "train_items": len(task.train), "class_names": task.class_names}


def revert(root: str | Path, n: int, strategy: str = "auto") -> int:
    """Record a change that takes change `n` out of the model; returns its id.

    subtract: add the negated patch of change n (exact when n is the latest change in effect; with
              later changes it is the task-arithmetic approximation, since they were trained on top of n).
    replay:   rebuild base + the changes before n, then train every later learn change again from its
              recorded spec and seed: exactly the model the history would give without change n.
    auto:     subtract when no later learn change is in effect, else replay.
    """
    if strategy not in ("auto", "subtract", "replay"):
        raise LedgerError(f"revert strategy must be auto, subtract or replay, got {strategy!r}")
    root = Path(root)
    Ledger.open(root)
    with LedgerLock(root, "lifelong revert"):
        ledger = Ledger.open(root)
        if _pending_raw(root) is not None:
            raise LedgerError(f"{root} has an interrupted change: `lifelong resume {root}` (or --discard) first")
        target = ledger.change(n)
        if target["kind"] not in ("learn", "edit", "erase", "personalize", "adapt"):
            raise LedgerError(f"change {n} is a {target['kind']}; only learn, edit, erase, personalize and adapt changes "
                              "can be reverted")
        if n in ledger.reverted_ids():
            by = next(c["id"] for c in ledger.changes if c.get("reverts") == n)
            raise LedgerError(f"change {n} is already reverted (by change {by})")
        if target["kind"] == "edit":
            return revert_edit(ledger, n, strategy)
        if target["kind"] == "erase":
            return revert_erase(ledger, n, strategy)
        if target["kind"] == "personalize":
            return revert_personal(ledger, n, strategy)
        if target["kind"] == "adapt":
            return revert_adapt(ledger, n, strategy)
        later = [c for c in ledger.active_learn_changes() if c["id"] > n]
        if strategy == "auto":
            strategy = "replay" if later else "subtract"
        t_start = time.perf_counter()
        current = ledger.materialize()
        states: dict[str, dict] = {}
        train_seconds, trainable = 0.0, 0
        with PeakMemory() as memory:
            if strategy == "subtract":
                patch = negate(ledger.patch(n))
            else:
                rebuilt, states, train_seconds, trainable = _replay(ledger, n, later)
                now = {k: p.detach() for k, p in current.named_parameters()}
                patch = dense_patch({k: p.detach() for k, p in rebuilt.named_parameters()}, now)
        before = ledger.current_scores()
        apply_patch(current, patch, where=f"revert of change {n}")
        after = run_probes(current, ledger.probes)
        record = {
            "id": ledger.next_id(),
            "kind": "revert",
            "reverts": n,
            "strategy": strategy,
            "replayed": [c["id"] for c in later] if strategy == "replay" else [],
            "method": "-",
            "label": "-",
            "data": {"task": f"change {n}", "classes": []},
            "probes_before": before,
            "probes_after": after,
            "cost": {"train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t_start,
                     "peak_rss_mb": memory.peak_mb, "trainable_params": trainable, "total_params": count_parameters(current)[1]},
        }
        return ledger.commit(record, patch, states)


def _replay(ledger: Ledger, n: int, later: list[dict]):
    """The model without change n: base + changes before n, then every later learn change retrained.
    Returns the model, the methods' states, the training seconds and the most trainable parameters."""
    model = ledger.materialize(upto=n - 1)
    states: dict[str, dict] = {}
    seconds, trainable = 0.0, 0
    kept = ledger.active_learn_changes(before=n)
    for c in later:
        spec = LearnSpec.from_dict(c["spec"])
        method = spec.method.name
        prior = states[method] if method in states else ledger.method_state(method, before=n)
        work = copy.deepcopy(model)
        trained = train_change(work, ledger.model_config, spec, prior_state=prior,
                               seen_class_names=seen_classes(kept), old_label_spaces=label_spaces(kept), index=len(kept))
        apply_patch(model, trained["patch"], where=f"replay of change {c['id']}")
        states[method] = trained["method_state"]
        seconds += trained["train_seconds"]
        trainable = max(trainable, count_parameters(work)[0])
        kept.append(c)
    return model, states, seconds, trainable
