"""Typed, strict run configuration: YAML plus `a.b=c` overrides.

Every section is a frozen dataclass. Unknown keys are errors that list the valid ones, and a value of
the wrong type is an error that names its key, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lifelong.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    family: str = "vlm"  # a name in lifelong.families.FAMILIES: vlm, classifier, lm, diffusion
    # "embedded" (EfficientNet-Lite0 + all-MiniLM-L6-v2 + the project's heads), a transformers CLIP
    # model's hub name or local path, or "tiny-embedded" / "tiny-clip" (random, for tests).
    name: str = "embedded"
    resolution: int = 112
    # The image tower trains its last `trainable_blocks` blocks (plus its head and projection); the
    # blocks below are frozen and their outputs are computed once per image and cached.
    trainable_blocks: int = 3
    train_text_projection: bool = True
    # family classifier, name mlp: the hidden layers' widths ([] = a linear model on the pixels).
    hidden_sizes: tuple[int, ...] = (256, 256)


@dataclass(frozen=True)
class AdapterConfig:
    # "none" (train the trainable blocks fully), "lora" (through peft) or "vpt" (visual prompt tuning of a
    # transformer image tower, modules/vpt.py)
    kind: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    tower: str = "image"  # "image", "text" or "both"
    target_modules: tuple[str, ...] | None = None  # None: the family's default targets per tower
    prompt_tokens: int = 5  # vpt: K prompt tokens per prompted layer (the official default NUM_TOKENS)
    deep_prompts: bool = False  # vpt: fresh prompts at every trunk layer (VPT-deep), else the first only (shallow)


@dataclass(frozen=True)
class TrainConfig:
    steps_per_task: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    eval_batch_size: int = 256
    grad_clip: float = 1.0
    checkpoints: bool = True
    # An Accelerate tracker for loss, lr, grad norm and accuracies ("tensorboard", "wandb", "mlflow", ...),
    # writing into the run's folder (runs/<name>/logs, a ledger's DIR/logs); "none" turns logging off.
    log_with: str = "tensorboard"


@dataclass(frozen=True)
class MethodConfig:
    """A method by name plus its own knobs, validated against the method's `Params` dataclass.

    `adapter`, when set, replaces the run's adapter section for this method only (e.g. a LoRA row
    beside full fine-tuning rows in one table). `train` holds keys of the run's train section that
    this method overrides (e.g. `train: {lr: 1.0e-3}` for a LoRA method beside full fine-tuning).
    """

    name: str = "finetune"
    label: str = ""  # the name in tables; defaults to the method name
    adapter: AdapterConfig | None = None
    train: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    stream: dict = field(default_factory=lambda: {"name": "mtil-mini"})
    train: TrainConfig = TrainConfig()
    adapter: AdapterConfig = AdapterConfig()
    methods: tuple[MethodConfig, ...] = (MethodConfig(),)
    # Run the stream in this many cyclic orders (rotation r = 0..orders-1 of its task order) and report
    # every metric's mean and standard deviation over them (Select-and-Distill uses 8).
    orders: int = 1


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or start from defaults), apply `a.b=c` overrides, validate strictly."""
    config = from_dict(RunConfig, read_raw(path, overrides), "")
    validate(config)
    return config


def read_raw(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML file's mapping (empty without a file) with `a.b=c` overrides applied; not yet typed."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict; list items by index (`methods.0.lr=1`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value (e.g. train.lr=1e-4)")
    key, _, text = item.partition("=")
    value = yaml.safe_load(text) if text else ""
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} has {len(node)} items, no index {part}")
            if last:
                node[int(part)] = value
            else:
                if isinstance(node[int(part)], str):  # methods: [lwf] -> [{name: lwf}]
                    node[int(part)] = {"name": node[int(part)]}
                node = node[int(part)]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if cls is MethodConfig and isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is MethodConfig:  # a method's own knobs sit beside `name`; its Params class checks them
        params = {k: v for k, v in raw.items() if k not in fields}
        params.update(raw.get("params") or {})
        raw = {"name": raw.get("name", "finetune"), "label": raw.get("label", ""),
               "adapter": raw.get("adapter"), "train": raw.get("train") or {}, "params": params}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(_dotted(where, k) for k in unknown)}; "
            f"valid keys{' in ' + where if where else ''}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(hints[k], v, _dotted(where, k)) for k, v in raw.items()}
    return cls(**values)


def method_train(config: RunConfig, method: MethodConfig, where: str = "method.train") -> TrainConfig:
    """The run's train section with the method's own overrides applied (validated like the section)."""
    if not method.train:
        return config.train
    return from_dict(TrainConfig, {**to_dict(config.train), **method.train}, where)


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        if isinstance(value, (str, dict)) and dataclasses.is_dataclass(inner):
            value = [value]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(inner, v, f"{where}.{i}") for i, v in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def validate(config: RunConfig) -> None:
    """Checks within and across sections that need no registry (the learn driver's `check_run` adds the
    family, method and stream checks). Runs before any model or data is loaded."""
    choices = {}
    for where, adapter in [("adapter", config.adapter)] + [
        (f"methods.{i}.adapter", m.adapter) for i, m in enumerate(config.methods) if m.adapter is not None
    ]:
        choices[f"{where}.kind"] = (adapter.kind, ("none", "lora", "vpt"))
        choices[f"{where}.tower"] = (adapter.tower, ("image", "text", "both"))
        if adapter.kind == "vpt":
            check_vpt(adapter, where)
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(valid)}")
    positive = {"model.resolution": config.model.resolution, "adapter.rank": config.adapter.rank, "orders": config.orders}
    trains = [("train", config.train)] + [
        (f"methods.{i}.train", method_train(config, m, f"methods.{i}.train")) for i, m in enumerate(config.methods)
    ]
    for where, train in trains:
        for key in ("steps_per_task", "batch_size", "eval_batch_size", "lr"):
            positive[f"{where}.{key}"] = getattr(train, key)
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if any(h <= 0 for h in config.model.hidden_sizes):
        raise ConfigError(f"model.hidden_sizes must be positive widths, got {list(config.model.hidden_sizes)}")
    labels = [m.display_name for m in config.methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"methods have duplicate names {labels}: give each a distinct `label`")


def check_vpt(adapter: AdapterConfig, where: str = "adapter") -> None:
    """VPT's knobs: prompts in the image tower, at least one token, and no prompt dropout (the towers run in
    inference mode, where it would never act; modules/vpt.py)."""
    if adapter.tower != "image":
        raise ConfigError(f"{where}.kind=vpt prompts the image tower only; set {where}.tower=image (got {adapter.tower!r})")
    if adapter.prompt_tokens <= 0:
        raise ConfigError(f"{where}.prompt_tokens must be positive, got {adapter.prompt_tokens}")
    if adapter.dropout != 0:
        raise ConfigError(f"{where}.dropout={adapter.dropout}: VPT's prompt dropout would never act here (the towers "
                          "always run in inference mode); set it to 0, the official default")


def to_dict(config: Any) -> Any:
    """The resolved config as plain data (for YAML/JSON)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def same_settings(stored: dict | None, current: dict, defaults: Any, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a bench's rows stored under `stored` settings (as JSON holds them) answer `current`: equal but for
    the keys in `ignore` (what selects rows, not how a row is measured), and for keys `stored` lacks (an older
    bench's results) whose current value is the default of `defaults` (a config field added since, unused)."""
    if stored is None:
        return False
    default = to_dict(defaults)
    missing = {k for k in current if k not in stored and k not in ignore}
    if not all(k in default and current[k] == default[k] for k in missing):
        return False
    skip = missing | set(ignore)
    return {k: v for k, v in current.items() if k not in skip} == {k: v for k, v in stored.items() if k not in skip}
