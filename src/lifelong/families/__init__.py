"""The model families and their registry: what operations ask instead of a checkpoint's attribute names.

A family knows how to build its models (by name, hub id or folder), a tiny random instance for tests,
the content fingerprint a ledger records, its native export, the probes a new ledger of it runs, the
operations it takes and which methods run on it. Operations look a family up here (`get_family`) and
never test `family == "..."`.

Adding a family = its module (the model code and builders) + one `Family` entry in `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from lifelong.config import AdapterConfig, ModelConfig
from lifelong.errors import ConfigError
from lifelong.families import classifier, diffusion, lm, vlm


@runtime_checkable
class Family(Protocol):
    """What an operation may ask of a model family."""

    name: str
    summary: str
    operations: frozenset[str]  # the operations its models take: "learn", "edit", ...
    probe_kind: str  # the probes a ledger of it runs: "images" (test sets), "facts" (edits, held-out facts) or
    # "images-generated" (generated images scored by a judge)
    score_unit: str  # what a probe score means, for tables
    ledger: bool  # whether a ledger can hold its models (`lifelong init --family NAME`)

    def build(self, config: ModelConfig, class_names: tuple[str, ...] = ()) -> tuple[Any, Any]:
        """(model, tokenizer or None); a classifier gets a head row per class name."""

    def tiny(self) -> ModelConfig:
        """A random instance small enough for unit tests."""

    def fingerprint(self, model) -> str:
        """SHA-256 of the model's content: what a ledger records for its base."""

    def export(self, model, tokenizer, out: Path) -> Path:
        """The model in the family's native format, into a new or empty folder that `build` loads back."""

    def validate(self, config: ModelConfig, methods: tuple[str, ...]) -> None:
        """Reject model knobs that do not apply to this family and methods that do not run on it."""


@dataclass(frozen=True)
class FamilySpec:
    """A `Family` made of plain functions (each family module provides them)."""

    name: str
    summary: str
    operations: frozenset[str]
    probe_kind: str
    score_unit: str
    build_fn: Callable[[ModelConfig, tuple[str, ...]], tuple[Any, Any]]
    fingerprint_fn: Callable[[Any], str]
    export_fn: Callable[[Any, Any, Path], Path] | None
    validate_fn: Callable[[ModelConfig, tuple[str, ...]], None]
    tiny_name: str
    ledger: bool = True  # `lifelong init --family NAME` accepts it
    tiny_overrides: dict = field(default_factory=dict)

    def build(self, config: ModelConfig, class_names: tuple[str, ...] = ()):
        return self.build_fn(config, tuple(class_names))

    def tiny(self) -> ModelConfig:
        return ModelConfig(family=self.name, name=self.tiny_name, **self.tiny_overrides)

    def fingerprint(self, model) -> str:
        return self.fingerprint_fn(model)

    def export(self, model, tokenizer, out: Path) -> Path:
        if self.export_fn is None:
            raise ConfigError(f"the {self.name} family has no native export")
        return self.export_fn(model, tokenizer, Path(out))

    def validate(self, config: ModelConfig, methods: tuple[str, ...]) -> None:
        self.validate_fn(config, methods)


FAMILIES: dict[str, Family] = {
    "vlm": FamilySpec(
        name="vlm", summary="a CLIP-style dual encoder (the embedded one, or any transformers CLIPModel)",
        operations=frozenset({"learn"}), probe_kind="images", score_unit="top-1 %",
        build_fn=lambda config, class_names: (vlm.build_vlm(config), None),
        fingerprint_fn=vlm.model_fingerprint, export_fn=lambda model, tokenizer, out: vlm.export_native(model, out),
        validate_fn=vlm.validate_config, tiny_name="tiny-embedded", tiny_overrides={"resolution": 32, "trainable_blocks": 2},
    ),
    "classifier": FamilySpec(
        name="classifier", summary="an image classifier (EfficientNet-Lite0 with a linear head, or an MLP)",
        operations=frozenset({"learn"}), probe_kind="images", score_unit="top-1 %",
        build_fn=classifier.build_for_classes, fingerprint_fn=classifier.fingerprint, export_fn=None,
        validate_fn=classifier.validate_config, tiny_name="tiny-efficientnet-lite0", ledger=False,
        tiny_overrides={"resolution": 32},
    ),
    "lm": FamilySpec(
        name="lm", summary="a causal language model (SmolLM2-135M-Instruct embedded, or any transformers causal LM)",
        operations=frozenset({"edit", "adapt"}), probe_kind="facts",
        score_unit="token-level accuracy % (an instruction task's probe: its own metric, %)",
        build_fn=lambda config, class_names: lm.build_lm(config.name),
        fingerprint_fn=lm.lm_fingerprint, export_fn=lm.export_pretrained,
        validate_fn=lm.validate_config, tiny_name="tiny-llama",
    ),
    "diffusion": FamilySpec(
        name="diffusion", summary="a text-to-image diffusion model (the embedded pixel-space UNet, or any diffusers "
        "StableDiffusionPipeline)",
        operations=frozenset({"generate", "erase", "personalize"}), probe_kind="images-generated",
        score_unit="judge rate % (judge-FD: lower is closer to real images)",
        build_fn=diffusion.build, fingerprint_fn=diffusion.fingerprint,
        export_fn=lambda model, tokenizer, out: model.export(out),
        validate_fn=diffusion.validate_config, tiny_name="tiny-embedded",
    ),
}


def get_family(name: str) -> Family:
    """The registered family `name`; a wrong name lists the valid ones."""
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r} is not a model family; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def ledger_families() -> tuple[str, ...]:
    """The families a ledger can hold (`lifelong init --family`)."""
    return tuple(name for name, f in FAMILIES.items() if f.ledger)


def prepare_trainable(model, model_config: ModelConfig, adapter: AdapterConfig, seed: int = 0) -> None:
    """Choose what trains: LoRA through peft on the adapter's targets, VPT prompts (families/vlm.py `add_vpt`),
    or the family's default trainable part.

    peft draws LoRA's A matrices from torch's global generator; drawn as is, they depended on everything
    that ran before in the process (the methods before it in a run, a cold or warm cache), and the demo's
    LoRA row moved by points between runs of the same code. They are drawn from `seed` instead, and the
    caller's generator is left as it was."""
    if adapter.kind == "lora":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.add_lora(adapter)
    elif adapter.kind == "vpt":
        if not hasattr(model, "add_vpt"):
            raise ConfigError(f"adapter.kind=vpt prompts a vision transformer; a {model_config.family} model has none: "
                              "use adapter.kind=lora or none")
        model.add_vpt(adapter, seed=seed)
    else:
        model.default_trainable(model_config.train_text_projection)


__all__ = ["FAMILIES", "Family", "FamilySpec", "get_family", "ledger_families", "prepare_trainable"]
