"""A ledger: one model's history as a directory.

    DIR/ledger.json                    the manifest: schema version, family, model config, the base
                                       model's content hash, the probe suite, and every change with
                                       its record and the SHA-256 of each of its files
    DIR/base/weights.safetensors       only when the base was initialised from a weights file
    DIR/changes/0001/patch.safetensors the change's additive patch (see patch.py)
    DIR/changes/0001/method_state.safetensors
                                       the method's state after the change (Fisher, anchors, a GRACE
                                       codebook, T-Patcher neurons, a WISE side memory...), keyed
                                       `<method>/<name>`: what the next change of that method continues from
    DIR/pending/                       a change in progress: its spec, probe scores before it, and the
                                       last training checkpoint (`lifelong resume DIR` continues it)

The model family decides the base and the changes: a `vlm` ledger (a CLIP-style dual encoder) takes
`learn` changes probed by image test sets (probes.py); an `lm` ledger (a causal LM) takes `edit`
changes (edits.py) and `adapt` changes (adapters.py), probed by the edits in effect, held-out facts and
the instruction tasks its adapt changes learned. Both record `revert` changes.

The current model is the base plus every patch in order (an lm ledger then re-attaches the modules of
its module editors, GRACE, T-Patcher and WISE, and its LLaMA-Adapter, from their latest states in effect;
a diffusion ledger those of its module erasers, Receler's eraser adapters). Nothing is
rewritten in place: a revert is a new change whose patch undoes the reverted one (or, for a module
editor, whose record takes the reverted state out of effect). A change becomes part of the history at
one atomic write of the manifest, after its files are on disk; a crash before that leaves the previous
history intact, and the pending directory lets the change continue.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lifelong.adapt.instruct import MODULE_KINDS, AdapterSpec, AttachedAdapter
from lifelong.config import ModelConfig, from_dict
from lifelong.edit import build_editor
from lifelong.erase import eraser_class
from lifelong.errors import LedgerCorruptError, LedgerError
from lifelong.families import Family, get_family, ledger_families
from lifelong.ledger.patch import apply_patch, negate
from lifelong.ledger.probes import PROBE_KINDS, Probe
from lifelong.ledger.store import (
    check_file,
    file_entry,
    load_tensors,
    read_manifest,
    save_tensors,
    verify,
    write_manifest,
)

BASE_WEIGHTS = "base/weights.safetensors"
TOKENS = "tokens"  # the method state of a change that added vocabulary tokens: {"embeddings": (K, D)}


class Ledger:
    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> Ledger:
        root = Path(root)
        return cls(root, read_manifest(root))

    @classmethod
    def create(cls, root: str | Path, model: ModelConfig, probes: list[Probe], weights: Path | None = None,
               trust_pickle: bool = False) -> Ledger:
        """A new ledger whose base is `model` (optionally with its parameters from a weights file)."""
        root = Path(root)
        if model.family not in ledger_families():
            raise LedgerError(f"a ledger's model.family is one of {', '.join(ledger_families())}, not {model.family!r}")
        if (root / "ledger.json").exists():
            raise LedgerError(f"{root} is already a ledger; `lifelong log {root}` shows it")
        if root.exists() and any(root.iterdir()):
            raise LedgerError(f"{root} exists and is not empty: give a new or empty directory")
        family = get_family(model.family)
        base, _ = family.build(model)
        files = []
        if weights is not None:
            load_base_weights(base, load_tensors(weights, trust_pickle=trust_pickle), weights)
            save_tensors(root / BASE_WEIGHTS, {k: v.detach().clone() for k, v in base.state_dict().items()},
                         {"source": str(weights)})
            files.append(file_entry(root, BASE_WEIGHTS))
        manifest = {
            "created": _now(),
            "family": model.family,
            "model": asdict(model),
            "base": {"name": model.name, "weights": str(weights) if weights else None,
                     "sha256": family.fingerprint(base)},
            "files": files,
            "probes": [p.to_dict() for p in probes],
            "baseline": {},  # probe scores of the base model
            "changes": [],
        }
        write_manifest(root, manifest)
        return cls(root, manifest)

    # -- what it holds ------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def family_spec(self) -> Family:
        return get_family(self.family)

    def require_operation(self, operation: str) -> None:
        """Refuse a change (learn, edit) that this ledger's family does not take, saying which families do."""
        if operation not in self.family_spec.operations:
            takes = ", ".join(f"`lifelong {op}`" for op in sorted(self.family_spec.operations))
            others = [n for n in ledger_families() if operation in get_family(n).operations]
            raise LedgerError(f"{self.root} is a ledger of a {self.family} model: it takes {takes} changes, not "
                              f"{operation} changes; those need a ledger of {' or '.join(others)} "
                              f"(`lifelong init DIR --family {others[0] if others else '...'}`)")

    @property
    def model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, self.manifest["model"], "model")

    @property
    def probes(self) -> list:
        """The probe suite: the family's probe kind (`Probe`: image test sets, `FactProbe`: edits and facts)."""
        cls = PROBE_KINDS[self.family_spec.probe_kind]
        return [cls.from_dict(p) for p in self.manifest["probes"]]

    @property
    def changes(self) -> list[dict]:
        return self.manifest["changes"]

    def change(self, n: int) -> dict:
        for c in self.changes:
            if c["id"] == n:
                return c
        ids = ", ".join(str(c["id"]) for c in self.changes) or "none yet"
        raise LedgerError(f"{self.root} has no change {n}; its changes: {ids}")

    def reverted_ids(self, upto: int | None = None) -> set[int]:
        """The changes a revert took out (only reverts with id <= `upto` when given)."""
        return {c["reverts"] for c in self.changes if c.get("reverts") and (upto is None or c["id"] <= upto)}

    def active_learn_changes(self, before: int | None = None) -> list[dict]:
        """Learn changes in effect (not reverted), optionally only those with id < `before`."""
        gone = self.reverted_ids()
        return [c for c in self.changes if c["kind"] == "learn" and c["id"] not in gone and (before is None or c["id"] < before)]

    def current_scores(self) -> dict[str, float]:
        """The latest score of every probe (the base's when no change has run)."""
        return dict(self.changes[-1]["probes_after"]) if self.changes else dict(self.manifest["baseline"])

    def change_dir(self, n: int) -> Path:
        return self.root / "changes" / f"{n:04d}"

    def next_id(self) -> int:
        return self.changes[-1]["id"] + 1 if self.changes else 1

    # -- models -------------------------------------------------------------------------------
    def base_model(self):
        """The base model, checked against the content hash recorded at init."""
        return self._base()[0]

    def _base(self):
        """(base model, its tokenizer for an lm ledger, else None), checked against the recorded hash."""
        model, tokenizer = self.family_spec.build(self.model_config)
        for entry in self.manifest["files"]:
            if entry["path"] == BASE_WEIGHTS:
                load_base_weights(model, load_tensors(check_file(self.root, entry)), self.root / BASE_WEIGHTS)
        found = self.family_spec.fingerprint(model)
        if found != self.manifest["base"]["sha256"]:
            raise LedgerCorruptError(
                f"the base model {self.manifest['base']['name']!r} built here does not match the one this ledger was "
                f"created from (SHA-256 {found[:12]}... vs {self.manifest['base']['sha256'][:12]}...): its weights "
                "changed since `lifelong init` (another package version?). Install the versions in the ledger's "
                "manifest or start a new ledger."
            )
        return model, tokenizer

    def patch(self, n: int) -> dict[str, torch.Tensor]:
        return load_tensors(check_file(self.root, self._entry(n, "patch.safetensors")))

    def method_state(self, method: str, before: int | None = None) -> dict[str, torch.Tensor]:
        """The state the latest change in effect left for `method` ({} when none did)."""
        gone = self.reverted_ids()
        for c in reversed(self.changes):
            if (before is not None and c["id"] >= before) or c["id"] in gone or method not in c.get("method_states", ()):
                continue
            return self.state_of(c["id"], method)
        return {}

    def state_of(self, n: int, method: str) -> dict[str, torch.Tensor]:
        """The state change `n` recorded for `method`."""
        state = load_tensors(check_file(self.root, self._entry(n, "method_state.safetensors")))
        prefix = f"{method}/"
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    def module_states(self, upto: int | None = None) -> dict[str, int]:
        """The module editors (an lm ledger's GRACE, T-Patcher, WISE), module adapters (its LLaMA-Adapter) and
        module erasers (a diffusion ledger's Receler) in effect after change `upto` (all when None): method -> the
        id of its latest change in effect then, whose recorded state holds all it added."""
        gone = self.reverted_ids(upto)
        latest: dict[str, int] = {}
        for c in self.changes:
            if upto is not None and c["id"] > upto:
                break
            if c["id"] in gone:
                continue
            if c["kind"] in ("edit", "erase"):  # a learn change's state is its method's, not a module
                latest.update((method, c["id"]) for method in c.get("method_states", ()))
            elif c["kind"] == "adapt":  # a LoRA's state is its factors (for export); its weights are in the patch
                latest.update((method, c["id"]) for method in c.get("method_states", ()) if method in MODULE_KINDS)
        return latest

    def materialize(self, upto: int | None = None):
        """Base + the patches of every change with id <= `upto` (all when None): the model at that point."""
        return self.materialize_with_tokenizer(upto)[0]

    def materialize_with_tokenizer(self, upto: int | None = None):
        """(model, tokenizer or None) after change `upto` (all changes when None)."""
        model, tokenizer, _ = self.materialize_with_editors(upto)
        return model, tokenizer

    def materialize_with_editors(self, upto: int | None = None):
        """(model, tokenizer, {method: editor}) after change `upto`: base + every weight patch in order, then
        each module editor in effect (GRACE, T-Patcher, WISE) re-attached with the state of its latest change
        in effect (`module_states`); the editors hold those modules (their `reset` takes them off). Every
        file used is checked against its recorded SHA-256 first."""
        model, tokenizer = self._base()
        self._patched(model, upto)
        tokens, rows = self.personal_tokens(upto)
        if tokens:  # after every patch: patches hold the base's parameter shapes
            model.add_tokens(tokens, rows)
        editors = {method: self.attach(model, tokenizer, method, n) for method, n in self.module_states(upto).items()}
        return model, tokenizer, editors

    def personal_tokens(self, upto: int | None = None) -> tuple[list[str], torch.Tensor | None]:
        """The vocabulary tokens that personalize changes in effect after change `upto` (all when None) added, in
        order, and their embedding rows (K, D) (method state TOKENS of each change; ledger/personal.py)."""
        gone = self.reverted_ids(upto)
        tokens, rows = [], []
        for c in self.changes:
            if upto is not None and c["id"] > upto:
                break
            if c.get("tokens") and c["id"] not in gone:
                tokens += c["tokens"]
                rows.append(self.state_of(c["id"], TOKENS)["embeddings"])
        return tokens, (torch.cat(rows) if rows else None)

    def attach(self, model, tokenizer, method: str, n: int):
        """An editor of `method` (with change n's knobs) on `model`, holding the state change `n` recorded; for an
        erase change, the modules of its eraser put back on `model`; for an adapt change, its LLaMA-Adapter
        (their holder's `reset` takes them off)."""
        if self.change(n)["kind"] == "erase":
            return eraser_class(method).attach(model, self.state_of(n, method))
        if self.change(n)["kind"] == "adapt":
            return AttachedAdapter(model, AdapterSpec.from_dict(self.change(n)["knobs"]["spec"]), self.state_of(n, method))
        editor = build_editor(method, model, tokenizer, self.change(n)["knobs"])
        editor.load_state_dict(self.state_of(n, method))
        return editor

    def take_out(self, n: int, model, tokenizer, attached: dict, strategy: str, noun: str) -> tuple[dict, str, bool]:
        """Take change `n` (an edit, erasure or adapter, a `noun`) out of `model`, the current model materialized with
        its module editors `attached`: a module change puts its method's previous state in effect back (none:
        the module comes off), a weight change subtracts its patch. Refuses `replay` (that retrains learn
        changes) and a module change that later changes of its method continued from. Returns (the patch to
        record, "restore" or "subtract", exact: no later change in effect was made on top of change n)."""
        method = self.change(n)["method"]
        module = method in self.change(n).get("method_states", ())
        if strategy == "replay":
            how = f"putting {method}'s previous state back" if module else "subtracting its patch"
            raise LedgerError(f"change {n} is {noun}: it is reverted by {how} (--strategy subtract or auto); "
                              "replay retrains learn changes")
        gone = self.reverted_ids()
        later = [c["id"] for c in self.changes if c["id"] > n and c["id"] not in gone and c["kind"] != "revert"]
        built_on = [i for i in later if method in self.change(i).get("method_states", ())]
        if module and built_on:
            order = ", ".join(str(i) for i in reversed(built_on))
            raise LedgerError(f"change {n} is a {method} change that later {method} change(s) "
                              f"{', '.join(map(str, built_on))} continued from (each holds its predecessors' {method} "
                              f"state plus its own): revert {'them' if len(built_on) > 1 else 'it'} first ({order}, "
                              f"latest first), then change {n}")
        if module:
            attached.pop(method).reset()
            previous = [c["id"] for c in self.changes
                        if c["id"] < n and c["id"] not in gone and method in c.get("method_states", ())]
            if previous:
                self.attach(model, tokenizer, method, previous[-1])
            return {}, "restore", not later
        patch = negate(self.patch(n))
        apply_patch(model, patch, where=f"revert of change {n}")
        return patch, "subtract", not later

    def _patched(self, model, upto: int | None):
        for c in self.changes:
            if upto is not None and c["id"] > upto:
                break
            apply_patch(model, self.patch(c["id"]), where=f"change {c['id']}")
        return model

    def _entry(self, n: int, filename: str) -> dict:
        path = f"changes/{n:04d}/{filename}"
        for entry in self.change(n)["files"]:
            if entry["path"] == path:
                return entry
        raise LedgerCorruptError(f"change {n} lists no file {path} in {self.root / 'ledger.json'}")

    # -- writing ------------------------------------------------------------------------------
    def record_baseline(self, scores: dict[str, float], new_probes: list = ()) -> None:
        """The base model's probe scores (and the probes they come from, when not registered yet)."""
        self.manifest["probes"].extend(p.to_dict() for p in new_probes)
        self.manifest["baseline"].update(scores)
        write_manifest(self.root, self.manifest)

    def commit(self, record: dict, patch: dict[str, torch.Tensor], method_states: dict[str, dict[str, torch.Tensor]],
               new_probes: list[Probe] = ()) -> int:
        """Write the change's files, then the manifest (the commit point). Returns the change id."""
        n = record["id"]
        folder = self.change_dir(n)
        patch_path = save_tensors(folder / "patch.safetensors", patch, {"change": str(n)})
        states = {f"{m}/{k}": v.detach().clone() for m, s in method_states.items() for k, v in s.items()}
        state_path = save_tensors(folder / "method_state.safetensors", states, {"change": str(n)})
        record["files"] = [file_entry(self.root, p.relative_to(self.root).as_posix()) for p in (patch_path, state_path)]
        record["method_states"] = sorted(method_states)
        record["cost"]["patch_bytes"] = patch_path.stat().st_size
        record["cost"]["state_bytes"] = state_path.stat().st_size
        record["created"] = _now()
        manifest = copy.deepcopy(self.manifest)
        manifest["probes"].extend(p.to_dict() for p in new_probes)
        manifest["changes"].append(record)
        write_manifest(self.root, manifest)
        self.manifest = manifest
        return n

    def export(self, out: str | Path, upto: int | None = None) -> Path:
        """The model after change `upto` (all when None) in its family's native format, into `out`.

        Refused when any recorded file fails its SHA-256 (what `lifelong verify` checks), and when the model
        holds module edits (GRACE, T-Patcher, WISE) or a LLaMA-Adapter that the native format cannot hold."""
        if upto is not None:
            self.change(upto)
        problems = verify(self.root, self.manifest)
        if problems:
            raise LedgerCorruptError(f"{self.root}: cannot export, files fail verification:\n  " + "\n  ".join(problems))
        modules = self.module_states(upto)
        if modules:
            held = ", ".join(f"{method} (change {n})" for method, n in modules.items())
            peft = "; `--peft OUT` writes a LLaMA-Adapter or prefix alone, as a peft folder" \
                if set(modules) & set(MODULE_KINDS) else ""
            raise LedgerError(f"the model {f'after change {upto}' if upto is not None else 'now'} holds modules that a "
                              f"{self.family} export cannot: {held}; revert those changes (or export an earlier "
                              f"change with --upto) to export the weights alone{peft}")
        model, tokenizer = self.materialize_with_tokenizer(upto)
        return self.family_spec.export(model, tokenizer, Path(out))

    def verify(self) -> list[str]:
        """Every recorded file re-hashed, and the base rebuilt and checked; a list of problems."""
        problems = verify(self.root, self.manifest)
        try:
            self.base_model()
        except LedgerCorruptError as e:
            problems.append(str(e))
        return problems


def load_base_weights(model, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load a full state dict into the base model, with an error that lists what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[:3]})" if wrong else ""]
        raise LedgerError(f"{source} does not fit the model: " + "; ".join(p for p in parts if p) +
                          ". Give a state dict saved from the same model (same model.name and model.trainable_blocks).")
    model.load_state_dict(state)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
