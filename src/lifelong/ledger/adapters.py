"""The adapt changes of an lm ledger: an instruction-tuning adapter, trained on the current model, recorded as
one reversible change.

    lifelong adapt DIR --task bbc-topic --method llama-adapter --steps 60     one `adapt` change
    lifelong export DIR --peft OUT [--change N]                               its adapter as a peft folder

An adapt change trains `adapt.instruct.train_adapter` on the training split of one instruction task
(data/instructions.py) on top of the ledger's current model (base + every change in effect) and records, as
an edit change does: the method and its knobs (the adapter's spec and the training settings), the data (task,
training items), the task's score before and after (`own_before`, `own_after`: its metric on a fixed seeded
subset of `eval_items` items of its held-out test split), every probe before and after, and the cost
(training and wall time, peak RSS, trainable parameters, the adapter's bytes).

The task's test subset becomes a probe of the ledger from that change on (probes.instruction_probe, kind
"instructions"), so every later change, edits and reverts included, scores it: the interference matrix then
says whether an edit breaks a learned skill, and whether earlier edits survive instruction tuning.

How each adapter is recorded:
    lora            its factors merged into a dense additive weight patch, scale * B @ A on the plain model's
                    weight names, so materialize, revert (the negated patch) and export need nothing new; the
                    factors themselves are kept as the change's method state (FACTORS), for `--peft` export
    llama-adapter   a module, like GRACE: an empty patch, and the adapter's prompts and gates as the method
                    state; the model is re-attached with the latest llama-adapter change in effect on every
                    materialize (Ledger.attach), a later llama-adapter change continues training that one, and a
                    revert takes it off (Ledger.take_out: the base was never written, so the model is exactly
                    the one before it). A plain transformers export is refused while one is in effect.
    prefix          a module in the same way: its state is peft's `prompt_embeddings` (N, layers * 2 * kv dim);
                    materialize puts the prefixes on the model in place (modules/prefix.py: an attention
                    function that prepends them, positions shifted by N, as peft's model computes), a later
                    prefix change continues that one, a revert takes it off. One module adapter at a time: a
                    prefix is refused while a LLaMA-Adapter is in effect, and the other way round.

A peft folder (adapter_config.json + adapter_model.safetensors, and lifelong.json: the ledger, the change and
the SHA-256 of the model the adapter was trained on) loads with `PeftModel.from_pretrained(model, OUT)` onto
the model the change was trained on: the ledger's model just before it (its base when it is the first change).
LLaMA-Adapter on GPT-2 is this project's own code, which peft computes differently: its export is refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lifelong.adapt.chat import PEFT_META
from lifelong.adapt.instruct import (
    MODULE_KINDS,
    AdapterSpec,
    AttachedAdapter,
    TrainSettings,
    lora_weights,
    module_tensors,
    peft_config,
    take_off,
    train_adapter,
)
from lifelong.atomic import atomic_write_json
from lifelong.data.instructions import TASKS, load_task
from lifelong.errors import ConfigError, LedgerError
from lifelong.families.lm import attention_projections, decoder_layers, lm_fingerprint
from lifelong.ledger.core import Ledger
from lifelong.ledger.edits import edits_in_effect, revert_record
from lifelong.ledger.patch import apply_patch
from lifelong.ledger.probes import instruction_probe, run_fact_probes, unique_name
from lifelong.ledger.store import LedgerLock
from lifelong.metrics.cost import PeakMemory, count_parameters
from lifelong.modules.llama_adapter import plain_parameter_name

METHODS = ("llama-adapter", "lora", "prefix")  # the adapters a ledger records
FACTORS = "lora-factors"  # a LoRA change's method state: peft's factors (its weights are in the patch)
EVAL_ITEMS = 40


def check_adapt(task: str, method: str, steps: int, lr: float | None, batch_size: int, items: int | None,
                eval_items: int) -> None:
    """Refuse bad input with one message, before any model is loaded or anything written."""
    if task not in TASKS:
        raise ConfigError(f"unknown instruction task {task!r}; the tasks: {', '.join(TASKS)}")
    if method not in METHODS:
        raise ConfigError(f"unknown adapter method {method!r}; a ledger records: {', '.join(METHODS)}")
    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--eval-items", eval_items),
                        ("--items", 1 if items is None else items)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr must be > 0, got {lr}")


def adapt(root: str | Path, task: str, method: str = "llama-adapter", *, steps: int = 100, lr: float | None = None,
          batch_size: int = 8, items: int | None = None, eval_items: int = EVAL_ITEMS, seed: int = 0,
          warn=None) -> int:
    """Record one adapt change: a `method` adapter trained on `task` for `steps` steps on the current model of
    the lm ledger `root` (`items` training examples, default all); returns its id. `warn` gets warnings
    (prompts cut to the model's context)."""
    check_adapt(task, method, steps, lr, batch_size, items, eval_items)
    root = Path(root)
    Ledger.open(root).require_operation("adapt")
    with LedgerLock(root, "lifelong adapt"):
        ledger = Ledger.open(root)
        t_start = time.perf_counter()
        model, tokenizer, attached = ledger.materialize_with_editors()
        chat = bool(getattr(tokenizer, "chat_template", None))
        data = load_task(task, max_train=items, max_test=0, seed=seed)
        probe = instruction_probe(unique_name(task, {p.name for p in ledger.probes}), task, eval_items, chat,
                                  origin=f"change {ledger.next_id()}")
        same = [p for p in ledger.probes if p.same_data(probe)]
        probe, new_probes = (same[0], []) if same else (probe, [probe])  # a task already probed keeps its probe
        probes = ledger.probes + new_probes
        earlier = edits_in_effect(ledger)
        before = run_fact_probes(model, tokenizer, probes, earlier)

        # A module adapter change continues the one of its method in effect (its spec and tensors), taken off the
        # model first; the other module adapter kind in effect refuses it (the two do not stack here)
        others = {m: n for m, n in ledger.module_states().items() if m in MODULE_KINDS and m != method}
        if method in MODULE_KINDS and others:
            m, n = next(iter(others.items()))
            raise ConfigError(f"a {method} change cannot go on a model that holds a {m} (change {n}): one module "
                              f"adapter at a time; revert change {n} first, or train a lora")
        continues = ledger.module_states().get(method)
        prior = attached.pop(method, None)
        spec = prior.spec if prior is not None else default_spec(method, model)
        init = prior.state_dict() if prior is not None else None
        if prior is not None:
            prior.reset()
        trained_on = lm_fingerprint(model)  # the model the adapter sits on: what a peft export must be loaded onto
        settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, chat=chat, seed=seed)
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            run = train_adapter(model, tokenizer, data, spec, settings, init=init, warn=warn)
            t1 = time.perf_counter()
        if method in MODULE_KINDS:
            patch, states = {}, {method: module_tensors(run.model, spec)}
            take_off(run.model, spec)
            AttachedAdapter(model, spec, states[method])  # the recorded adapter, as materialize attaches it
        else:
            deltas, factors = lora_weights(run.model)  # the LoRA layers come off; the weights are as before
            patch, states = realized_patch(model, deltas), {FACTORS: factors}
            apply_patch(model, patch, where=f"change {ledger.next_id()}")  # so the scores are of the recorded model
        after = run_fact_probes(model, tokenizer, probes, earlier)
        summary = run.summary()
        record = {
            "id": ledger.next_id(),
            "kind": "adapt",
            "method": method,
            "label": method,
            "knobs": {"spec": dataclasses.asdict(spec), "settings": dataclasses.asdict(settings)},
            "data": {"task": task, "items": len(data.train), "probe": probe.name, "eval_items": probe.test_items},
            "adapter": {"records": "module" if method in MODULE_KINDS else "weights",
                        "model_type": model.config.model_type, "trained_on_sha256": trained_on,
                        "continues": continues},
            "losses": run.losses,
            "loss_first": summary["loss_first"],
            "loss_last": summary["loss_last"],
            "own_before": own_score(probe, before),
            "own_after": own_score(probe, after),
            "probes_before": before,
            "probes_after": after,
            "cost": {"train_seconds": t1 - t0, "seconds_per_step": run.seconds_per_step,
                     "wall_seconds": time.perf_counter() - t_start, "peak_rss_mb": memory.peak_mb,
                     "trainable_params": run.trainable, "adapter_bytes": run.patch_bytes,
                     "total_params": count_parameters(model)[1]},
        }
        return ledger.commit(record, patch, states, new_probes)


def revert_adapt(ledger: Ledger, n: int, strategy: str) -> int:
    """Record a change that takes adapt change `n` out (the caller holds the lock); its id.

    A LoRA: its negated patch (exact when no later change in effect was made on top of it). A LLaMA-Adapter:
    the method's previous change in effect put back (none: the module comes off; the base was never written),
    refused while a later llama-adapter change that continued from it is in effect (`Ledger.take_out`)."""
    change = ledger.change(n)
    t_start = time.perf_counter()
    model, tokenizer, attached = ledger.materialize_with_editors()
    edits = edits_in_effect(ledger)
    before = run_fact_probes(model, tokenizer, ledger.probes, edits)
    with PeakMemory() as memory:
        patch, how, exact = ledger.take_out(n, model, tokenizer, attached, strategy, "an adapt change")
    after = run_fact_probes(model, tokenizer, ledger.probes, edits)
    probe = next(p for p in ledger.probes if p.name == change["data"]["probe"])
    record = revert_record(ledger, n, how, exact, (own_score(probe, before), own_score(probe, after)), (before, after),
                           model, time.perf_counter() - t_start, memory.peak_mb)
    return ledger.commit(record, patch, {})


def export_peft(root: str | Path, out: str | Path, change: int | None = None) -> tuple[Path, int]:
    """The adapter of adapt change `change` (default: the latest adapt change in effect) as a peft folder in
    `out` (new or empty): adapter_config.json, adapter_model.safetensors and lifelong.json. Returns (out, the
    change's id). Loads with `PeftModel.from_pretrained(model, out)` on the model just before that change."""
    ledger = Ledger.open(root)
    out = Path(out)
    c = _adapt_change(ledger, change)
    spec = AdapterSpec.from_dict(c["knobs"]["spec"])
    config = peft_config(spec, c["adapter"]["model_type"])  # LLaMA-Adapter on GPT-2: refused here
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"cannot export into {out}: it exists and is not an empty folder")
    if spec.kind == "lora":
        tensors = ledger.state_of(c["id"], FACTORS)
    elif spec.kind == "prefix":  # peft's key as it is: the prompt encoder's table
        tensors = ledger.state_of(c["id"], spec.kind)
    else:  # peft's keys: its PeftModel's names, `base_model.model.` + the plain model's
        tensors = {f"base_model.model.{name}": t for name, t in ledger.state_of(c["id"], spec.kind).items()}
    config.base_model_name_or_path = ledger.manifest["base"]["name"]
    config.inference_mode = True
    meta = {"ledger": str(ledger.root), "change": c["id"], "method": c["method"], "task": c["data"]["task"],
            "base": ledger.manifest["base"]["name"], "base_sha256": ledger.manifest["base"]["sha256"],
            "trained_on_sha256": c["adapter"]["trained_on_sha256"],
            "load_onto": f"the model of ledger {ledger.root} before change {c['id']}"
                         + (" (its base)" if c["id"] == ledger.changes[0]["id"] else "")}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # written aside, then renamed: never half a folder
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        config.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        atomic_write_json(tmp / PEFT_META, meta)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, c["id"]


# ----------------------------------------------------------------------------- pieces

@torch.no_grad()
def realized_patch(model, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense patch entries of `deltas` as float arithmetic realizes them on the model's weights W: (W + d) - W,
    not d. Adding that to W gives fl(W + d) exactly, and subtracting it from the result gives W back exactly
    (Sterbenz: W + d and W are within a factor 2 of each other wherever d is small beside W), so a revert
    of the latest LoRA change restores the weights bit for bit, where d itself would leave rounding behind."""
    params = {plain_parameter_name(n): q for n, q in model.named_parameters()}
    return {f"delta::{name}": (params[name] + d.to(params[name].dtype)) - params[name] for name, d in deltas.items()}


def default_spec(method: str, model) -> AdapterSpec:
    """AdapterSpec's defaults on this model: LoRA on its query/value projections, LLaMA-Adapter in its top
    AdapterSpec.adapter_layers layers (all of them when it has fewer)."""
    layers = min(AdapterSpec.adapter_layers, len(decoder_layers(model)))
    return AdapterSpec(method, adapter_layers=layers, target_modules=attention_projections(model))


def own_score(probe, scores: dict[str, float]) -> dict:
    """An adapt change's own task score (a fraction, as an edit's own scores), from its probe's score (%)."""
    task = probe.instruction_task()
    return {"task": task.name, "metric": task.metric, "n": len(task.test), "score": scores[probe.name] / 100.0}


def _adapt_change(ledger: Ledger, n: int | None) -> dict:
    adapts = [c for c in ledger.changes if c["kind"] == "adapt"]
    if n is not None:
        c = ledger.change(n)
        if c["kind"] != "adapt":
            listed = ", ".join(str(a["id"]) for a in adapts) or "none"
            raise LedgerError(f"change {n} is a{'n' if c['kind'][0] in 'aeiou' else ''} {c['kind']} change, not an "
                              f"adapt change; the adapt changes of {ledger.root}: {listed}")
        return c
    gone = ledger.reverted_ids()
    live = [c for c in adapts if c["id"] not in gone]
    if not live:
        raise LedgerError(f"{ledger.root} has no adapt change in effect (`lifelong adapt {ledger.root} --task TASK` "
                          "records one; --change N exports a reverted one)")
    return live[-1]


__all__ = ["EVAL_ITEMS", "FACTORS", "METHODS", "adapt", "check_adapt", "export_peft", "revert_adapt"]
