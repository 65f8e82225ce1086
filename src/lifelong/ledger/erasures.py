"""The changes of a diffusion ledger: concept erasures of a text-to-image model, each one reversible change.

    lifelong init DIR --family diffusion                   base model + its concept probes (probes.concept_probes)
    lifelong erase DIR --concept sneaker --method esd-x    one `erase` change

A diffusion ledger's probes are judge rates (%) of seeded samples of a set of concepts (default: every
kind, with the close objects sneaker, sandal and ankle boot) and the judge-FD of all their samples
against real images (lower is closer). An erase change runs one eraser (lifelong.erase) on the ledger's
current model and records: the method and its resolved knobs, the request (the prompts it erased, the
anchor, the preserved prompts, the judge's concepts it covers), the eraser's statistics, the patch (the
weights it changed, as additive deltas), the cost, and every probe before and after. The erased concept
gets a probe of its own when no probe covers it exactly (its `data.task`, the log's "own task" column).

The preserved prompts (UCE's constraint set), when the user gives none, are the other concepts of the erased
one's kind and the instance prompt of every personal concept in effect ("a <my-shoe> shoe"): the ledger knows
what personalize changes taught, and an erasure should not take a user's concept with it (measured in the
README's "Erasure and personalization in one ledger": without them, a UCE flower erasure cut a personal bug
from 75 to 25%).

A module eraser (Receler: eraser adapters after the cross-attention layers) records an empty patch and the
state of every eraser set on the model after it (method_state.safetensors, accumulated as lm module
editors do: a second Receler change trains a new set on top of the first's and records both). The
current model is the base plus every weight patch, then the latest Receler state in effect re-attached.

A revert subtracts the change's patch: exact when no later change is in effect (the record says so). A
revert of a Receler change puts back the eraser sets of the previous Receler change in effect (none: the
erasers come off and the UNet is bit-identical to before them); a change that a later Receler change
continued from is reverted after it. Export is refused while erasers are in effect (`Ledger.export`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lifelong.config import ModelConfig
from lifelong.erase import erase_request, eraser_class, eraser_params
from lifelong.errors import ConfigError
from lifelong.ledger.core import Ledger
from lifelong.ledger.patch import patch_from_model, patch_numel
from lifelong.ledger.probes import (
    DEFAULT_CONCEPTS,
    NSFW,
    concept_probe,
    concept_probes,
    nsfw_probe,
    run_concept_probes,
    samples_path,
    unique_name,
)
from lifelong.ledger.store import LedgerLock
from lifelong.metrics.cost import PeakMemory, count_parameters
from lifelong.metrics.nsfw import load_nsfw_classifier


def create_diffusion_ledger(root: str | Path, name: str = "embedded", concepts=None, n: int = 16,
                            seed: int = 0) -> Ledger:
    """A new diffusion ledger of the text-to-image model `name` (build_pipeline), its probes scored on the base."""
    if n < 1:
        raise ConfigError(f"--probe-items {n}: each concept probe needs at least one image")
    try:
        probes = concept_probes(tuple(concepts) if concepts else DEFAULT_CONCEPTS, n=n, seed=seed)
    except ValueError as e:
        raise ConfigError(f"--probe: {e}") from None
    ledger = Ledger.create(root, ModelConfig(family="diffusion", name=name), probes)
    ledger.record_baseline(run_concept_probes(ledger.materialize(), ledger.probes, keep=samples_path(ledger.root, None)))
    return ledger


def erase(root: str | Path, concept: str, method: str = "esd-x", *, anchor: str | None = None,
          preserve: tuple[str, ...] | None = None, knobs: dict | None = None, seed: int = 0, judge: bool = True,
          nsfw: bool = False, progress: bool = True) -> int:
    """One erase change on the ledger at `root`; returns its id. Everything is checked before any work.

    `nsfw`: the erasure is judged by the NSFW classifier (nudity on a Stable Diffusion model): the concept is
    erased by its name, the project's judge is not asked, and the ledger's `nsfw` probe (added at this change
    when it has none) is the change's own."""
    ledger = Ledger.open(root)
    ledger.require_operation("erase")
    request = erase_request(concept, anchor, preserve, judge=judge and not nsfw, seed=seed)
    if nsfw:
        load_nsfw_classifier()  # a missing package fails here, before any work
    params = eraser_params(method, knobs)
    eraser = eraser_class(method)(params)
    if method == "ac" and not request.anchor.strip():
        raise ConfigError(f"--method ac maps {concept!r} onto an anchor concept: give one with --anchor")
    with LedgerLock(Path(root), "lifelong erase"):
        ledger = Ledger.open(root)
        if preserve is None:
            request = dataclasses.replace(request, preserve=tuple(dict.fromkeys(request.preserve
                                                                                + personal_prompts(ledger))))
        n = ledger.next_id()
        own, new_probes = _own_nsfw_probe(ledger, n) if nsfw else _own_probe(ledger, request, n)
        t_start = time.perf_counter()
        model = ledger.materialize()  # erasers of module changes in effect re-attached
        before = ledger.current_scores()
        if new_probes:
            before.update(run_concept_probes(model, new_probes))
        weights = {k: p.detach().clone() for k, p in model.named_parameters()}
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            stats = eraser.erase(model, request, seed=seed, progress=progress)
            erase_seconds = time.perf_counter() - t0
        if eraser.records == "module":  # new modules: their state, every set in effect (this change's included)
            patch, states = {}, {method: eraser.state(model)}
            size = sum(t.numel() for t in states[method].values())
        else:
            patch, states = patch_from_model(model, weights), {}
            size = patch_numel(patch)
        after = run_concept_probes(model, ledger.probes + new_probes, keep=samples_path(ledger.root, n))
        record = {
            "id": n,
            "kind": "erase",
            "method": method,
            "label": method,
            "knobs": dataclasses.asdict(params),
            "seed": seed,
            "request": dataclasses.asdict(request),
            "stats": stats,
            "data": {"task": own or "-", "classes": list(request.judged)},
            "probes_before": before,
            "probes_after": after,
            "cost": {"train_seconds": erase_seconds, "wall_seconds": time.perf_counter() - t_start,
                     "peak_rss_mb": memory.peak_mb, "trainable_params": int(stats.get("trainable_params", 0)),
                     "patch_numel": size, "total_params": count_parameters(model)[1]},
        }
        return ledger.commit(record, patch, states, new_probes=new_probes)


def personal_prompts(ledger: Ledger) -> tuple[str, ...]:
    """The instance prompts of the personalize changes in effect ("a <my-shoe> shoe"), in change order (a merge
    adds none of its own: the changes it merged are in effect and give theirs)."""
    gone = ledger.reverted_ids()
    return tuple(c["request"]["instance_prompt"] for c in ledger.changes
                 if c.get("kind") == "personalize" and not c.get("merges") and c["id"] not in gone)


def _own_nsfw_probe(ledger: Ledger, n: int):
    """(the ledger's NSFW probe, [a new one when it has none])."""
    for probe in ledger.probes:
        if probe.kind == "nsfw":
            return probe.name, []
    spec = ledger.probes[0]
    return NSFW, [nsfw_probe(n=len(spec.prompts) or 16, seed=spec.seed, steps=spec.steps, origin=f"change {n}")]


def _own_probe(ledger: Ledger, request, n: int):
    """(the name of the probe that measures the erased concept, [a new probe for it if none does])."""
    if not request.judged:
        return None, []
    for probe in ledger.probes:
        if probe.kind == "concept" and set(probe.targets) == set(request.judged):
            return probe.name, []
    name = unique_name(f"erased: {request.concept}", {p.name for p in ledger.probes})
    spec = ledger.probes[0]
    probe = concept_probe(name, request.judged, n=max(len(spec.prompts), len(request.judged)), seed=spec.seed,
                          steps=spec.steps, origin=f"change {n}")
    return name, [probe]


def revert_erase(ledger: Ledger, n: int, strategy: str) -> int:
    """Record a change that takes erase change `n` out (the caller holds the lock); its id.

    A weight erasure: its negated patch. A module erasure (Receler): the eraser sets of the method's previous
    change in effect (none: the erasers come off), refused while later changes of the method that continued
    from it are in effect (`Ledger.take_out`)."""
    t_start = time.perf_counter()
    model, _, attached = ledger.materialize_with_editors()
    with PeakMemory() as memory:
        patch, how, exact = ledger.take_out(n, model, None, attached, strategy, "an erasure")
    return commit_revert(ledger, n, model, patch, how, exact, t_start, memory.peak_mb)


def commit_revert(ledger: Ledger, n: int, model, patch: dict, strategy: str, exact: bool, t_start: float,
                  peak_mb: float) -> int:
    """Probe `model` (the ledger's model with change n taken out) and record that as the revert of change n;
    `exact` is False when later changes in effect were made on top of change n. Returns the new id."""
    n_new = ledger.next_id()
    record = {
        "id": n_new,
        "kind": "revert",
        "reverts": n,
        "strategy": strategy,
        "replayed": [],
        "exact": exact,
        "method": "-",
        "label": "-",
        "data": {"task": f"change {n}", "classes": []},
        "probes_before": ledger.current_scores(),
        "probes_after": run_concept_probes(model, ledger.probes, keep=samples_path(ledger.root, n_new)),
        "cost": {"train_seconds": 0.0, "wall_seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_mb,
                 "trainable_params": 0, "total_params": count_parameters(model)[1]},
    }
    return ledger.commit(record, patch, {})
