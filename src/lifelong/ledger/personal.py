"""The personalize changes of a diffusion ledger: a text-to-image model taught a subject or style from a few
images, each one reversible change.

    lifelong personalize DIR --images FOLDER --token "<my-style>" --class letter --method ti

A personalize change runs one personalizer (lifelong.personalize) on the ledger's current model and
records: the method and its resolved knobs, the request (token, class word, prompts, the number of images
and the SHA-256 of their pixels), the method's statistics, the cost, every probe before and after, and

  - the patch: the weights it moved (the UNet, the cross-attention K/V, LoRA factors), as additive deltas
    on parameters of the base's shapes;
  - the tokens it added to the vocabulary (the record's `tokens`) and their embedding rows (method state
    `tokens`, {"embeddings": (K, D)}). A patch cannot hold them: a new row changes the shape of the
    token-embedding table. The current model is the base plus every patch in order, then the tokens of
    the personalize changes in effect added in order (`Ledger.personal_tokens`, `TextToImage.add_tokens`).
    The rows of the tokens that were there before must not move (every method here holds them; a change
    that moved them is refused).

`lifelong merge DIR --changes 3,5 --method M` records a merge of personalize changes in effect as a
personalize change of its own (method M-merge, no tokens), with W_0 = the current weights minus the changes'
deltas (with both changes in effect the current model is the naive sum W_0 + sum_i dW_i):

  - custom-diffusion: its patch turns the cross-attention K/V into Custom Diffusion's closed-form
    constrained optimum (personalize/custom_diffusion.py);
  - mix-of-show: its patch turns every layer the changes' ED-LoRAs moved (text encoder and UNet) into
    Mix-of-Show's gradient fusion of them (personalize/mix_of_show.py); the concepts' tokens stay those their
    own changes added;
  - lora-add: those layers at W_0 + the mean of the deltas, the weight-fusion baseline of Mix-of-Show's paper
    and code (Weight_Fusion_EDLoRA.py; mix-of-show or dreambooth-lora changes).

A change that an earlier merge in effect already merged is refused (W_0 would be wrong): revert the merge
first. Reverting a merge gives the naive sum back.

A revert subtracts the change's patch, and its tokens leave the vocabulary with it (the change is no
longer in effect): base + personalize + revert is the base, bit for bit in its tokenizer and embedding
table, up to float rounding in the subtracted weights.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from lifelong.errors import ConfigError, LedgerError
from lifelong.ledger.core import TOKENS, Ledger
from lifelong.ledger.erasures import commit_revert
from lifelong.ledger.patch import apply_patch, lora_delta, negate, patch_from_model, patch_numel
from lifelong.ledger.probes import run_concept_probes, samples_path
from lifelong.ledger.store import LedgerLock
from lifelong.metrics.cost import PeakMemory, count_parameters
from lifelong.personalize import (
    PersonalizeRequest,
    build_personalizer,
    check_token,
    new_tokens,
    personalizer_params,
    read_images,
)
from lifelong.personalize.base import MIN_IMAGES
from lifelong.personalize.custom_diffusion import default_reg_prompts, kv_parameters, merge_kv, text_features
from lifelong.personalize.mix_of_show import gradient_fusion, weight_fusion

# merge method -> the personalize methods whose changes it merges
MERGE_METHODS = {"custom-diffusion": ("custom-diffusion",), "mix-of-show": ("mix-of-show",),
                 "lora-add": ("mix-of-show", "dreambooth-lora")}


def personalize(root: str | Path, images: str | Path, token: str, class_word: str = "", method: str = "ti", *,
                knobs: dict | None = None, seed: int = 0, progress: bool = True,
                warn=None) -> int:
    """One personalize change on the ledger at `root`; returns its id. Every input is checked before any
    training; `warn(message)` receives the warnings (an identifier that names a known concept, resized or
    skipped images)."""
    warn = warn or (lambda message: None)
    ledger = Ledger.open(root)
    ledger.require_operation("personalize")
    params = personalizer_params(method, knobs)
    personalizer = build_personalizer(method, knobs)
    class_word = " ".join(class_word.split())
    if getattr(params, "prior_loss_weight", 0) > 0 and not class_word:
        raise ConfigError(f"--method {method} draws class images for its prior term: give the subject's class "
                          "(--class letter), or turn the term off (prior_loss_weight=0)")
    token = token.strip()
    tokens = new_tokens(personalizer, token)
    earlier = {t: c["id"] for c in ledger.changes if c.get("tokens") and c["id"] not in ledger.reverted_ids()
               for t in c["tokens"]}
    for t in [token, *tokens]:
        if t in earlier:
            raise ConfigError(f"--token {token!r}: {t!r} is already in the vocabulary: change {earlier[t]} added it; "
                              f"choose a new one, or revert change {earlier[t]} first")
    with LedgerLock(Path(root), "lifelong personalize"):
        ledger = Ledger.open(root)
        n = ledger.next_id()
        t_start = time.perf_counter()
        model = ledger.materialize()
        for message in check_token(model, token, tokens == [token]):
            warn(message)
        for t in tokens:
            if t != token:  # a method's own tokens for the identifier (Mix-of-Show's pair): new ones too
                check_token(model, t, new_token=True)
        pixels, notes = read_images(images, model.image_size, min_images=MIN_IMAGES)
        for message in notes:
            warn(message)
        request = PersonalizeRequest(pixels, token, class_word, notes)
        before = ledger.current_scores()
        weights = {k: p.detach().clone() for k, p in model.named_parameters()}
        table = _table_name(model)
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            stats = personalizer.personalize(model, request, seed=seed, progress=progress)
            train_seconds = time.perf_counter() - t0
        patch, rows = _patch_and_rows(model, weights, table, tokens)
        after = run_concept_probes(model, ledger.probes, keep=samples_path(ledger.root, n))
        record = {
            "id": n,
            "kind": "personalize",
            "method": method,
            "label": method,
            "knobs": dataclasses.asdict(params),
            "seed": seed,
            "request": _summary(request, tokens),
            "tokens": tokens,
            "stats": stats,
            "data": {"task": token, "classes": []},
            "probes_before": before,
            "probes_after": after,
            "cost": {"train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t_start,
                     "peak_rss_mb": memory.peak_mb, "trainable_params": int(stats.get("trainable_params", 0)),
                     "patch_numel": patch_numel(patch) + (rows.numel() if rows is not None else 0),
                     "total_params": count_parameters(model)[1]},
        }
        states = {TOKENS: {"embeddings": rows}} if rows is not None else {}
        return ledger.commit(record, patch, states)


def _summary(request: PersonalizeRequest, tokens: list[str]) -> dict:
    """The request's record; a method that names the subject by tokens of its own (Mix-of-Show's "<tok1> <tok2>",
    which carry the class) prompts "a <tok1> <tok2>"."""
    summary = request.summary()
    if len(tokens) > 1:
        summary["instance_prompt"] = " ".join(["a", *tokens])
    return summary


def _table_name(model) -> str:
    """The parameter name of the text encoder's token-embedding table."""
    table = model.token_embeddings().weight
    return next(name for name, p in model.named_parameters() if p is table)


def _patch_and_rows(model, before: dict[str, torch.Tensor], table: str, tokens: list[str]):
    """(the patch of every weight the change moved, on the shapes before it; the new tokens' embedding rows
    (K, D) or None). Rows of the embedding table that existed before must not have moved."""
    weight = model.token_embeddings().weight.detach()
    old = before[table]
    moved = (weight[: len(old)] != old).any(dim=1).nonzero().flatten().tolist()
    if moved:
        raise LedgerError(f"the personalization moved {len(moved)} existing row(s) of the token-embedding table "
                          f"(e.g. id {moved[0]}); a ledger records new tokens' rows, not changes to existing ones")
    plain = dict(before)
    plain[table] = weight.clone()  # the table's delta is recorded as new rows, not in the patch
    patch = patch_from_model(model, plain)
    if not tokens:
        return patch, None
    ids = [model.token_ids(t)[0] for t in tokens]
    return patch, weight[ids].clone()


def revert_personal(ledger: Ledger, n: int, strategy: str) -> int:
    """Record a change that takes personalize change `n` out (the caller holds the lock): its negated patch;
    its tokens leave the vocabulary with it. Returns the new change's id."""
    if strategy == "replay":
        raise LedgerError(f"change {n} is a personalization: it is reverted by subtracting its patch (--strategy "
                          "subtract or auto); replay retrains learn changes")
    gone = ledger.reverted_ids()
    later = [c["id"] for c in ledger.changes if c["id"] > n and c["id"] not in gone and c["kind"] != "revert"]
    t_start = time.perf_counter()
    with PeakMemory() as memory:
        patch = negate(ledger.patch(n))
        model = ledger.materialize(upto=None)
        apply_patch(model, patch, where=f"revert of change {n}")
        if ledger.change(n).get("tokens"):  # the vocabulary without this change's tokens: rebuilt from the history
            model = _without(ledger, n, model)
    return commit_revert(ledger, n, model, patch, "subtract", not later, t_start, memory.peak_mb)


def _without(ledger: Ledger, n: int, patched):
    """`patched` (the current weights minus change n's patch) with the vocabulary of the history without
    change n: the base's table plus the other changes' tokens in effect."""
    model = ledger.base_model()
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in patched.state_dict().items() if k in own and v.shape == own[k].shape},
                          strict=False)  # every weight but the token table, whose base rows never move
    gone = ledger.reverted_ids() | {n}
    tokens, rows = [], []
    for c in ledger.changes:
        if c.get("tokens") and c["id"] not in gone:
            tokens += c["tokens"]
            rows.append(ledger.state_of(c["id"], TOKENS)["embeddings"])
    if tokens:
        model.add_tokens(tokens, torch.cat(rows))
    return model


def merge(root: str | Path, change_ids: list[int], method: str = "custom-diffusion",
          reg_prompts: tuple[str, ...] | None = None) -> int:
    """One change that merges the personalize changes `change_ids` (in effect) with `method`; returns its id.
    custom-diffusion: `reg_prompts` are the regularization prompts of its merge (default: the first training
    caption of every concept the embedded model was trained on). mix-of-show: gradient fusion of every layer
    the changes' LoRA moved. lora-add: those layers at W_0 + the mean of the changes' deltas."""
    if method not in MERGE_METHODS:
        raise ConfigError(f"--method {method!r}: merging is implemented for {', '.join(MERGE_METHODS)}")
    ids = list(dict.fromkeys(change_ids))
    if len(ids) < 2:
        raise ConfigError(f"--changes {','.join(map(str, change_ids))}: a merge needs at least two changes")
    ledger = Ledger.open(root)
    ledger.require_operation("personalize")
    gone = ledger.reverted_ids()
    accepted = MERGE_METHODS[method]
    for n in ids:
        c = ledger.change(n)
        if c["kind"] != "personalize" or c["method"] not in accepted:
            raise ConfigError(f"change {n} is a {c['kind']} ({c['method']}), not a {' or '.join(accepted)} "
                              f"personalization: --method {method} merges only those")
        if n in gone:
            raise ConfigError(f"change {n} is reverted: only changes in effect can be merged")
    for c in ledger.changes:  # W_0 = the current weights minus the changes' deltas holds only without an earlier merge
        if c.get("merges") and c["id"] not in gone and set(c["merges"]) & set(ids):
            raise ConfigError(f"change {c['id']} already merges change(s) {', '.join(map(str, c['merges']))} and is in "
                              f"effect: revert it first (lifelong revert DIR {c['id']}), then merge again")
    with LedgerLock(Path(root), "lifelong merge"):
        ledger = Ledger.open(root)
        t_start = time.perf_counter()
        model = ledger.materialize()
        with PeakMemory() as memory:
            if method == "custom-diffusion":
                reg_prompts = tuple(reg_prompts or default_reg_prompts())
                patch, knobs, stats = _custom_diffusion_merge(ledger, model, ids, reg_prompts)
            else:
                patch, knobs, stats = _lora_merge(ledger, model, ids, method)
        apply_patch(model, patch, where="merge")
        changes = [ledger.change(n) for n in ids]
        record = {
            "id": ledger.next_id(),
            "kind": "personalize",
            "method": f"{method}-merge",
            "label": f"{method}-merge",
            "knobs": knobs,
            "seed": 0,
            "merges": ids,
            "request": {"token": "+".join(c["request"]["token"] for c in changes), "class_word": "",
                        "n_images": 0, "images_sha256": "", "notes": [f"merge of changes {', '.join(map(str, ids))}"],
                        "instance_prompt": "; ".join(c["request"]["instance_prompt"] for c in changes),
                        "class_prompt": ""},
            "tokens": [],
            "stats": stats,
            "data": {"task": "+".join(c["request"]["token"] for c in changes), "classes": []},
            "probes_before": ledger.current_scores(),
            "probes_after": run_concept_probes(model, ledger.probes, keep=samples_path(ledger.root, ledger.next_id())),
            "cost": {"train_seconds": 0.0, "wall_seconds": time.perf_counter() - t_start, "peak_rss_mb": memory.peak_mb,
                     "trainable_params": 0, "patch_numel": patch_numel(patch), "total_params": count_parameters(model)[1]},
        }
        return ledger.commit(record, patch, {})


def _custom_diffusion_merge(ledger: Ledger, model, ids: list[int], reg_prompts: tuple[str, ...]):
    """(patch, knobs, stats) of Custom Diffusion's closed-form merge of the cross-attention K/V."""
    current = {name: p.detach().clone() for name, p in kv_parameters(model).items()}
    deltas = [{name: ledger.patch(n).get(f"delta::{name}", torch.zeros_like(w)) for name, w in current.items()}
              for n in ids]
    w0 = {name: w - sum(d[name] for d in deltas) for name, w in current.items()}
    finetuned = [{name: w0[name] + d[name] for name in w0} for d in deltas]
    targets = [text_features(model, [ledger.change(n)["request"]["instance_prompt"]]) for n in ids]
    merged = merge_kv(w0, finetuned, targets, text_features(model, list(reg_prompts)))
    patch = {f"delta::{name}": merged[name].to(w.dtype) - w for name, w in current.items()}
    stats = {"target_rows": float(sum(len(t) for t in targets)), "reg_rows": float(len(reg_prompts))}
    return patch, {"reg_prompts": len(reg_prompts)}, stats


def weight_deltas(patch: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense weight delta of every parameter a patch moves (LoRA factors multiplied out): name -> tensor."""
    out: dict[str, torch.Tensor] = {}
    for key, t in patch.items():
        kind, _, name = key.partition("::")
        if kind == "delta":
            delta = t
        elif kind == "lora_B":
            delta = lora_delta(patch[f"lora_A::{name}"], t, patch[f"lora_scale::{name}"], params[name].shape)
        else:
            continue  # lora_A / lora_scale go with their lora_B
        out[name] = out[name] + delta if name in out else delta.clone()
    return out


def _lora_merge(ledger: Ledger, model, ids: list[int], method: str, fusion_steps: int = 10, fusion_samples: int = 2,
                ridge: float = 1e-6):
    """(patch, knobs, stats) of Mix-of-Show's gradient fusion (mix-of-show) or of the weight-fusion baseline
    (lora-add: W_0 + the mean of the deltas) on every layer the changes moved, W_0 = the current weights minus
    the changes' deltas (the sum W_0 + sum_i dW_i is the current model itself)."""
    params = {name: p for name, p in model.named_parameters()}
    deltas = [weight_deltas(ledger.patch(n), params) for n in ids]
    names = sorted(set().union(*deltas))
    current = {name: params[name].detach().clone() for name in names}
    summed = {name: sum(d[name] for d in deltas if name in d) for name in names}
    if method == "lora-add":
        fused = weight_fusion({name: current[name] - summed[name] for name in names}, deltas)
        patch = {f"delta::{name}": fused[name] - current[name] for name in names}
        return patch, {"weight": 1 / len(ids)}, {"layers": float(len(names))}
    with torch.no_grad():
        for name in names:
            params[name].copy_(current[name] - summed[name])  # W_0
    fused, stats = gradient_fusion(model, deltas, [ledger.change(n)["tokens"] for n in ids], steps=fusion_steps,
                                   samples=fusion_samples, ridge=ridge)
    with torch.no_grad():  # back to the current model: the caller adds the patch, as `materialize` will
        for name in names:
            params[name].copy_(current[name])
    model.clear_cache()
    patch = {f"delta::{name}": fused[name] - current[name] for name in names}
    return patch, {"fusion_steps": fusion_steps, "fusion_samples": fusion_samples, "ridge": ridge}, stats
