"""lifelong's side of the knowledge-editing peer benchmark (run by easyedit_run.py in lifelong's venv).

    .venv/bin/python benchmarks/peers/lifelong_edit_side.py --method rome \
        --hparams benchmarks/peers/easyedit_hparams/rome.yaml --work WORK --out OUT.json

The same model folder, requests and covariance text as EasyEdit's side; the editor's settings are read
from EasyEdit's hparams file (`lifelong_params`), so both frameworks run the same values. lifelong's cache
(C) lives in WORK, empty at the start, so the covariance is computed in this run as EasyEdit's is.
An edit is `editor.apply(request)` (MEMIT: `apply_batch(requests)`) timed alone, then edit_scores.score on
the edited model, then `editor.reset()`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def lifelong_params(method: str, hp: dict, cov_tokens: int) -> dict:
    """lifelong's editor parameters equal to EasyEdit's hparams `hp` (what the two call the same thing)."""
    if method == "ft":
        assert hp["weight_decay"] == 0 and hp["kl_factor"] == 0 and len(hp["layers"]) == 1
        eps = hp["norm_constraint"]
        return {"layer": hp["layers"][0], "lr": hp["lr"], "steps": hp["num_steps"],
                "norm_constraint": eps if type(eps) is float else 0.0,  # EasyEdit clamps only for a float
                "stop_loss": 1e-2}
    common = {"v_steps": hp["v_num_grad_steps"], "v_lr": hp["v_lr"], "v_weight_decay": hp["v_weight_decay"],
              "clamp_norm_factor": float(hp["clamp_norm_factor"]), "kl_factor": hp["kl_factor"],
              "corpus": "python-reference", "cov_tokens": cov_tokens, "seed": 0}
    assert hp["fact_token"] == "subject_last" and hp["v_loss_layer"] == 29
    if method == "rome":
        assert len(hp["layers"]) == 1
        # EasyEdit's template length counts the seed word; lifelong's counts the tokens sampled after it
        lengths = [length - 1 for length, _ in hp["context_template_length_params"]]
        per_length = {n // 5 * 5 for _, n in hp["context_template_length_params"]}
        assert len(per_length) == 1
        return {**common, "layer": hp["layers"][0], "prefix_lengths": tuple(lengths),
                "prefixes_per_length": per_length.pop(), "mom2_adjustment": bool(hp["mom2_adjustment"])}
    if method == "memit":
        assert hp["mom2_adjustment"]
        # EasyEdit's MEMIT: 5 prefixes of 10 tokens, the seed word included (fixed in its get_context_templates)
        return {**common, "layers": tuple(hp["layers"]), "mom2_update_weight": float(hp["mom2_update_weight"]),
                "prefix_lengths": (9,), "prefixes_per_length": 5}
    raise ValueError(method)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["ft", "rome", "memit"])
    ap.add_argument("--hparams", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ["LIFELONG_CACHE"] = str(args.work / "lifelong-cache")  # before lifelong reads it
    started = time.perf_counter()
    result = run(args)
    result["process_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(result, indent=1))


def run(args) -> dict:
    t0 = time.perf_counter()
    import edit_scores
    import torch
    import yaml

    from lifelong.data.edit_requests import EditRequest
    from lifelong.edit.ft_l import FTL
    from lifelong.edit.memit import MEMIT
    from lifelong.edit.rome import ROME
    from lifelong.families.lm import build_lm
    import_s = time.perf_counter() - t0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    hp = yaml.safe_load(args.hparams.read_text())
    hp = {k: float(v) if isinstance(v, str) and v[:1].isdigit() and "e" in v else v for k, v in hp.items()}
    meta = json.loads((args.work / "meta.json").read_text())
    params = lifelong_params(args.method, hp, meta["cov_tokens"])
    t0 = time.perf_counter()
    model, tok = build_lm(meta["model_folder"])
    load_s = time.perf_counter() - t0
    cls = {"ft": FTL, "rome": ROME, "memit": MEMIT}[args.method]
    editor = cls(model, tok, cls.Params(**params))

    records = json.loads((args.work / "requests.json").read_text())
    requests = [EditRequest(prompt=r["prompt"], target_new=r["target_new"], subject=r["subject"],
                            ground_truth=r["ground_truth"]) for r in records]
    before = [edit_scores.neighbor_argmax(model, r) for r in records]
    pre = [edit_scores.score(model, r, b) for r, b in zip(records, before)]

    edits, batch_s = [], None
    if args.method == "memit":
        t = time.perf_counter()
        editor.apply_batch(requests)
        batch_s = time.perf_counter() - t
        for i, r in enumerate(records):
            edits.append({"case_id": r["case_id"], "scores": edit_scores.score(model, r, before[i])})
        editor.reset()
    else:
        for i, (req, r) in enumerate(zip(requests, records)):
            t = time.perf_counter()
            editor.apply(req)
            seconds = time.perf_counter() - t
            edits.append({"case_id": r["case_id"], "edit_s": seconds, "scores": edit_scores.score(model, r, before[i])})
            editor.reset()
    from importlib import metadata
    return {"framework": "lifelong", "method": args.method, "params": params,
            "versions": {p: metadata.version(p) for p in ("torch", "transformers", "numpy")},
            "threads": torch.get_num_threads(), "import_s": import_s, "load_s": load_s, "batch_s": batch_s,
            "pre": pre, "edits": edits}


if __name__ == "__main__":
    main()
