"""Task streams: an ordered list of (train, test) datasets, built from a small spec.

A spec is a plain dict (YAML-friendly) or a StreamSpec:

    {"name": "mtil-mini", "scenario": "task", "seed": 0, "order": [4, 3, 2, 1, 0],
     "tasks": [{"source": "fashion-mnist", "train_items": 1000, "test_items": 500, "options": {"invert": True}},
               ...]}

Global class ids are consecutive in stream order (first task 0..k1-1, the next k1..k1+k2-1, ...) and
Stream.class_names is the concatenation of the tasks' class names, so the classes seen after any number
of tasks are always 0..m-1. scenario "task" (task-incremental, MTIL): a model classifies among the
task's own classes. scenario "class" (class-incremental): among all classes seen so far; the tasks
must then have disjoint classes ((source, class name) pairs).

Task order is `order` (a permutation of the task indices) or `rotation` (start at task r, wrap around).
Reordering never changes a task's content: task i of the spec is always subsampled with seed `seed + i`
and named by its source (suffixed -1, -2, ... when a source repeats) unless it has a `name`.
`train_items` / `test_items` cap the split sizes (None = all the source has).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from lifelong.data.base import Stream, Task
from lifelong.data.sources import COMMON_OPTIONS, SOURCES, default_task_name, load_source
from lifelong.errors import ConfigError

SCENARIOS = ("task", "class")


@dataclass(frozen=True)
class TaskSpec:
    source: str
    train_items: int | None = None
    test_items: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # source options, incl. `classes`, `invert`
    name: str | None = None


@dataclass(frozen=True)
class StreamSpec:
    name: str
    scenario: str
    tasks: tuple[TaskSpec, ...]
    seed: int = 0
    order: tuple[int, ...] | None = None
    rotation: int = 0


def _split_fashion_mnist_tasks() -> list[dict]:
    return [{"source": "fashion-mnist", "train_items": 1000, "test_items": 500, "options": {"classes": [c, c + 1]}}
            for c in range(0, 10, 2)]


PRESETS: dict[str, dict] = {
    # Five real visual domains, task-incremental. Sizes are caps: lfw has 140 / 60, glyphs' test 480,
    # digits' test 450. The gray sources are light-on-dark; inverted (dark on light, as most ImageNet
    # objects are photographed) they suit the ImageNet tower better (scripts/fit_vlm_heads.log).
    "mtil-mini": {"name": "mtil-mini", "scenario": "task", "seed": 0, "tasks": [
        {"source": "fashion-mnist", "train_items": 1000, "test_items": 500, "options": {"invert": True}},
        {"source": "mnist", "train_items": 1000, "test_items": 500, "options": {"invert": True}},
        {"source": "lfw"},
        {"source": "glyphs", "train_items": 1000, "test_items": 500, "options": {"invert": True}},
        {"source": "digits", "train_items": 1000, "test_items": 500, "options": {"invert": True}},
    ]},
    # A longer stream, closer to MTIL's eleven datasets: mtil-mini's five tasks, then five groups of
    # openclipart drawings (Debian openclipart-png; lifelong.data.openclipart), 10 tasks in all.
    "mtil-long": {"name": "mtil-long", "scenario": "task", "seed": 0, "tasks": [
        {"source": "fashion-mnist", "train_items": 1000, "test_items": 500, "options": {"invert": True}},
        {"source": "mnist", "train_items": 1000, "test_items": 500, "options": {"invert": True}},
        {"source": "lfw"},
        {"source": "glyphs", "train_items": 1000, "test_items": 500, "options": {"invert": True}},
        {"source": "digits", "train_items": 1000, "test_items": 500, "options": {"invert": True}},
        *({"source": "openclipart", "options": {"group": group}} for group in ("animals", "food", "signs", "leisure", "nature")),
    ]},
    # Fashion-MNIST in 5 tasks of 2 classes, (0, 1), (2, 3), ..., class-incremental.
    "split-fashion-mnist": {"name": "split-fashion-mnist", "scenario": "class", "seed": 0,
                            "tasks": _split_fashion_mnist_tasks()},
    # Three small real tasks for end-to-end tests; loads in a fraction of a second.
    "tiny": {"name": "tiny", "scenario": "task", "seed": 0, "tasks": [
        {"source": "digits", "train_items": 40, "test_items": 20},
        {"source": "lfw", "train_items": 40, "test_items": 20},
        {"source": "mnist", "train_items": 40, "test_items": 20},
    ]},
}

_PER_TASK_OVERRIDES = ("train_items", "test_items")


def stream_spec(name_or_dict: str | Mapping[str, Any] | StreamSpec, **overrides) -> StreamSpec:
    """A validated StreamSpec from a preset name, a dict or a spec, with top-level overrides.

    A dict without `tasks` whose `name` is a preset means that preset, its other keys overrides.

    Overrides are StreamSpec fields (seed=1, order=[...], rotation=2, ...) or `train_items` /
    `test_items`, which set that size on every task.
    """
    if isinstance(name_or_dict, str):
        if name_or_dict not in PRESETS:
            raise ConfigError(f"unknown stream {name_or_dict!r}; presets: {', '.join(sorted(PRESETS))}")
        raw = copy.deepcopy(PRESETS[name_or_dict])
    elif isinstance(name_or_dict, StreamSpec):
        raw = {f.name: getattr(name_or_dict, f.name) for f in fields(StreamSpec)}
    elif isinstance(name_or_dict, Mapping) and "tasks" not in name_or_dict and name_or_dict.get("name") in PRESETS:
        # {"name": "mtil-mini", "seed": 1, ...}: a preset with overrides (the shape a run config holds)
        rest = {k: v for k, v in name_or_dict.items() if k != "name"}
        return stream_spec(name_or_dict["name"], **{**rest, **overrides})
    elif isinstance(name_or_dict, Mapping):
        raw = copy.deepcopy(dict(name_or_dict))
    else:
        raise ConfigError(f"a stream spec must be a preset name, a dict or a StreamSpec, got {type(name_or_dict).__name__}")

    valid = [*(f.name for f in fields(StreamSpec)), *_PER_TASK_OVERRIDES]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(f"stream: unknown override(s) {unknown}; valid overrides: {', '.join(valid)}")
    per_task = {k: overrides.pop(k) for k in _PER_TASK_OVERRIDES if k in overrides}
    raw.update(overrides)
    spec = _parse_stream(raw)
    if per_task:
        spec = replace(spec, tasks=tuple(replace(t, **per_task) for t in spec.tasks))
        _check_sizes(spec.tasks)
    return spec


def stream_from_section(raw: Mapping[str, Any]) -> StreamSpec:
    """A config's `stream` section -> a validated StreamSpec. `{name: <preset>, key: value}` is that preset
    with overrides (seed, order, rotation, train_items, test_items); a section with `tasks` is a full spec."""
    raw = dict(raw)
    if "tasks" not in raw and raw.get("name") in PRESETS:
        return stream_spec(raw.pop("name"), **raw)
    return stream_spec(raw)


def build_stream(spec: str | Mapping[str, Any] | StreamSpec) -> Stream:
    """Load every task of a stream (see the module docstring for ids, order and naming)."""
    spec = stream_spec(spec)
    names = task_names(spec.tasks)
    class_names: list[str] = []
    seen: dict[tuple[str, str], str] = {}  # (source, class name) -> task name, for the class scenario
    tasks = []
    for i in task_order(spec):
        t = spec.tasks[i]
        train = load_source(t.source, "train", max_items=t.train_items, seed=spec.seed + i, **t.options)
        test = load_source(t.source, "test", max_items=t.test_items, seed=spec.seed + i, **t.options)
        if spec.scenario == "class":
            for class_name in train.class_names:
                if (t.source, class_name) in seen:
                    raise ConfigError(f"stream {spec.name}: class {class_name!r} of {t.source} is in tasks "
                                      f"{seen[t.source, class_name]!r} and {names[i]!r}; class-incremental "
                                      f"tasks must have disjoint classes")
                seen[t.source, class_name] = names[i]
        ids = tuple(range(len(class_names), len(class_names) + len(train.class_names)))
        class_names.extend(train.class_names)
        tasks.append(Task(name=names[i], train=train, test=test, class_ids=ids))
    return Stream(name=spec.name, scenario=spec.scenario, tasks=tuple(tasks), class_names=tuple(class_names))


def task_order(spec: StreamSpec) -> list[int]:
    """Indices into spec.tasks, in stream order."""
    n = len(spec.tasks)
    if spec.order is not None:
        return list(spec.order)
    r = spec.rotation % n
    return list(range(r, n)) + list(range(r))


def task_names(tasks: tuple[TaskSpec, ...]) -> list[str]:
    """Explicit names, else the source's default name (an image folder's own name), suffixed -1, -2, ...
    when it repeats."""
    defaults = [default_task_name(t.source, dict(t.options)) for t in tasks]
    repeats = Counter(d for t, d in zip(tasks, defaults) if t.name is None)
    seen: Counter = Counter()
    names = []
    for t, default in zip(tasks, defaults):
        if t.name is not None:
            names.append(t.name)
        elif repeats[default] > 1:
            seen[default] += 1
            names.append(f"{default}-{seen[default]}")
        else:
            names.append(default)
    duplicated = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicated:
        raise ConfigError(f"task names must be unique; repeated: {duplicated}")
    return names


def _parse_stream(raw: Mapping[str, Any]) -> StreamSpec:
    _check_keys("stream", raw, StreamSpec)
    for key in ("name", "scenario", "tasks"):
        if key not in raw:
            raise ConfigError(f"stream: missing key {key!r}")
    if raw["scenario"] not in SCENARIOS:
        raise ConfigError(f"stream: scenario must be one of {SCENARIOS}, got {raw['scenario']!r}")
    tasks = tuple(_parse_task(t, i) for i, t in enumerate(raw["tasks"] or ()))
    if not tasks:
        raise ConfigError("stream: `tasks` is empty")
    order = raw.get("order")
    rotation = raw.get("rotation", 0)
    if order is not None:
        order = tuple(order)
        if sorted(order) != list(range(len(tasks))):
            raise ConfigError(f"stream: order must be a permutation of 0..{len(tasks) - 1}, got {list(order)}")
        if rotation:
            raise ConfigError("stream: give `order` or `rotation`, not both")
    if not isinstance(rotation, int) or not isinstance(raw.get("seed", 0), int):
        raise ConfigError("stream: `rotation` and `seed` must be integers")
    spec = StreamSpec(name=str(raw["name"]), scenario=raw["scenario"], tasks=tasks, seed=raw.get("seed", 0),
                      order=order, rotation=rotation)
    _check_sizes(spec.tasks)
    task_names(spec.tasks)  # fails early on repeated names
    return spec


def _parse_task(raw: Mapping[str, Any] | TaskSpec, index: int) -> TaskSpec:
    if isinstance(raw, TaskSpec):
        raw = {f.name: getattr(raw, f.name) for f in fields(TaskSpec)}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"task {index}: expected a mapping, got {raw!r}")
    _check_keys(f"task {index}", raw, TaskSpec)
    source = raw.get("source")
    if source not in SOURCES:
        raise ConfigError(f"task {index}: unknown source {source!r}; valid sources: {', '.join(sorted(SOURCES))}")
    options = dict(raw.get("options") or {})
    valid = sorted([*SOURCES[source].options, *COMMON_OPTIONS])
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"task {index} ({source}): unknown option(s) {unknown}; valid options: {', '.join(valid)}")
    return TaskSpec(source=source, train_items=raw.get("train_items"), test_items=raw.get("test_items"),
                    options=options, name=raw.get("name"))


def _check_sizes(tasks: tuple[TaskSpec, ...]) -> None:
    for i, t in enumerate(tasks):
        for key in _PER_TASK_OVERRIDES:
            value = getattr(t, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"task {i} ({t.source}): {key} must be a positive integer or null, got {value!r}")


def _check_keys(where: str, raw: Mapping[str, Any], schema) -> None:
    valid = [f.name for f in fields(schema)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
