"""Judge the embedded text-to-image model: per-concept prompt accuracy and judge-FD, resumable.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/eval_t2i.py                       # the shipped model, every concept
    .venv/bin/python scripts/eval_t2i.py --model checkpoints/t2i/checkpoint.safetensors --max-concepts 8 --n 8

writes docs/t2i_quality.json (settings, per-concept rates, averages by kind, judge-FD with baselines) and
docs/t2i_grid.png (one seeded sample of a selection of concepts, row per kind). Every concept's result is
written as soon as it is done, with its generated images' judge features in --work (default
runs/t2i_eval/), so a killed run continues where it stopped (same model file and settings; otherwise it
starts over).

For each training concept, `n` seeded samples (default 50; 25 steps of the default sampler, ancestral
(families.diffusion.DEFAULT_ETA); the model's guidance) from:
  training prompts   its training captions, cycled (what the model was trained on);
  held-out prompts   captions it never saw: held-out templates and held-out synonyms, cycled.
The judge (lifelong.metrics.judge, trained on real images only) reads each sample; the rate is the % in
which it sees exactly the prompted concept (for a letter: letter, style and ink all right). Averages
weigh every concept equally, within its kind and over all concepts.

judge-FD (the FID formula on the judge's penultimate features; NOT Inception-FID) is computed for the
kinds with at least 100 real test images per concept (objects, digits), concept by concept, and averaged:
  matched            FD(generated from c's training prompts, real test images of c)
  shuffled-caption   FD(generated from the prompts of another concept c' of the same kind, real of c)
                     (c' = the next concept in a fixed rotation): the value when the prompt is ignored
  real-vs-real       FD(n real train images of c, real test images of c): the floor at this sample size
plus `all`: every generated sample against every real test image of the evaluated concepts (the mix
differs: real test sets are not balanced by concept; read it against its real-vs-real counterpart).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lifelong.atomic import atomic_write_bytes, atomic_write_json
from lifelong.data import captioned
from lifelong.families.diffusion import DEFAULT_ETA, build_pipeline, embedded_weights
from lifelong.ledger.store import sha256_file
from lifelong.metrics import judge as J

ROOT = Path(__file__).resolve().parent.parent
FD_KINDS = ("object", "digit")
GRID_CONCEPTS = (
    [f"object/{names[0]}" for names, _ in captioned.OBJECT_NAMES]
    + [f"digit/{d}" for d in range(10)]
    + [f"letter/{letter}/{style}/{ink}" for letter, style, ink in zip(
        "ABCEGKRSABCE", ["serif", "sans", "mono", "bold", "italic", "calligraphic"] * 2,
        ["black", "red", "green", "blue"] * 3)]
    + [f"clipart/{c}" for c in captioned.CLIPART_CATEGORIES]
)


def cycled(prompts: list[str], n: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(n)]


def sample(model, prompts: list[str], seed: int, steps: int, bf16: bool, eta: float) -> np.ndarray:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model.sample(prompts, n=1, seed=seed, steps=steps, batch_size=64, eta=eta)


def evaluate(args) -> dict:
    model_path = Path(args.model) if args.model != "embedded" else None
    model = build_pipeline(args.model)
    judge = J.load_judge()
    weights_file = model_path or embedded_weights()
    settings = {"model": args.model, "weights_sha256": sha256_file(weights_file), "n": args.n, "steps": args.steps,
                "guidance": model.guidance, "seed": args.seed, "bf16": args.bf16, "eta": args.eta}
    concepts = captioned.training_concepts()
    if args.kinds:
        concepts = [c for c in concepts if c.kind in args.kinds]
    if args.max_concepts:
        concepts = concepts[:: max(1, len(concepts) // args.max_concepts)][: args.max_concepts]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("settings") != settings:
        state = {"settings": settings, "per_concept": {}}
    started = time.perf_counter()
    position = {c.name: k for k, c in enumerate(captioned.training_concepts())}  # a concept's seed and files, in any subset
    for concept in concepts:
        i = position[concept.name]
        if concept.name in state["per_concept"]:
            continue
        t0 = time.perf_counter()
        seed = args.seed + i
        entry = {}
        for which, prompts in (("train", captioned.train_captions(concept)), ("heldout", captioned.heldout_captions(concept))):
            images = sample(model, cycled(prompts, args.n), seed, args.steps, args.bf16, args.eta)
            seen = J.predicted_concepts(judge, images)
            entry[f"rate_{which}"] = 100.0 * float(np.mean([s == concept.name for s in seen]))
            if which == "train":
                save_file({"features": J.judge_features(judge, images).contiguous()},
                          str(work / f"features_{i:03d}.safetensors"))
                if concept.name in GRID_CONCEPTS:
                    Image.fromarray(images[0]).save(work / f"grid_{i:03d}.png")
        entry["index"], entry["seconds"] = i, time.perf_counter() - t0
        state["per_concept"][concept.name] = entry
        atomic_write_json(state_file, state)
        done = len(state["per_concept"])
        print(f"[{done}/{len(concepts)}] {concept.name:32s} train {entry['rate_train']:5.1f}%  held-out "
              f"{entry['rate_heldout']:5.1f}%  ({entry['seconds']:.0f} s)", flush=True)
    return summarise(state, concepts, judge, work, time.perf_counter() - started)


def summarise(state: dict, concepts, judge, work: Path, seconds: float) -> dict:
    per = state["per_concept"]
    by_kind: dict[str, dict[str, list[float]]] = {}
    for c in concepts:
        for which in ("train", "heldout"):
            by_kind.setdefault(c.kind, {}).setdefault(which, []).append(per[c.name][f"rate_{which}"])
    averages = {which: float(np.mean([per[c.name][f"rate_{which}"] for c in concepts])) for which in ("train", "heldout")}
    features = {c.name: load_file(str(work / f"features_{per[c.name]['index']:03d}.safetensors"))["features"] for c in concepts}
    return {
        "what": "the embedded text-to-image model judged by lifelong.metrics.judge (trained on real images only)",
        "command": " ".join([f"OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python scripts/eval_t2i.py", *sys.argv[1:]]),
        "settings": state["settings"],
        "concepts": len(concepts),
        "average": averages,
        "average_by_kind": {k: {w: float(np.mean(v)) for w, v in d.items()} for k, d in by_kind.items()},
        "judge_fd": judge_fd(judge, features, concepts, state["settings"]["n"]),
        "per_concept": {c.name: {k: round(v, 2) for k, v in per[c.name].items() if k.startswith("rate")} for c in concepts},
        "generation_seconds_total": float(sum(per[c.name]["seconds"] for c in concepts)),
        "seconds_this_run": seconds,
        "threads": torch.get_num_threads(),
    }


def judge_fd(judge, generated: dict[str, torch.Tensor], concepts, n: int) -> dict:
    out: dict = {"note": "FID formula on the judge's 128-d penultimate features, not Inception-FID; "
                         "biased upward for small sets, so compare values at equal set sizes"}
    names = [c.name for c in concepts]
    real, labels = captioned.concept_images(names, "test")
    real_feats = J.judge_features(judge, real)
    out["all"] = {"generated_vs_real": J.frechet_distance(torch.cat(list(generated.values())), real_feats),
                  "n_generated": int(sum(len(v) for v in generated.values())), "n_real": len(labels)}
    labels = np.asarray(labels)
    for kind in FD_KINDS:
        members = [c.name for c in concepts if c.kind == kind]
        if len(members) < 2:
            continue
        train, train_labels = captioned.concept_images(members, "train", per_concept=n, seed=0)
        train_feats, train_labels = J.judge_features(judge, train), np.asarray(train_labels)
        rows = {"matched": [], "shuffled_caption": [], "real_vs_real": []}
        for j, name in enumerate(members):
            real_c = real_feats[torch.from_numpy(labels == name)]
            other = members[(j + 1) % len(members)]
            rows["matched"].append(J.frechet_distance(generated[name], real_c))
            rows["shuffled_caption"].append(J.frechet_distance(generated[other], real_c))
            rows["real_vs_real"].append(J.frechet_distance(train_feats[torch.from_numpy(train_labels == name)], real_c))
        out[kind] = {key: float(np.mean(v)) for key, v in rows.items()} | {"concepts": len(members), "n_generated": n}
    return out


def write_grid(work: Path, concepts, out: Path) -> None:
    """One training-prompt sample per grid concept, a row per kind, scaled 2x."""
    index = {c.name: i for i, c in enumerate(captioned.training_concepts())}
    rows = []
    for kind in ("object", "digit", "letter", "clipart"):
        cells = [work / f"grid_{index[name]:03d}.png" for name in GRID_CONCEPTS if name.startswith(kind + "/")]
        cells = [np.asarray(Image.open(p)) for p in cells if p.is_file()]
        if cells:
            rows.append(np.concatenate(cells + [np.full_like(cells[0], 255)] * (12 - len(cells)), axis=1))
    if rows:
        grid = Image.fromarray(np.concatenate(rows, axis=0)).resize((rows[0].shape[1] * 2, 64 * len(rows)), Image.NEAREST)
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        atomic_write_bytes(out, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default="embedded", help="embedded (the shipped weights) or a train_t2i.py .safetensors file")
    parser.add_argument("--n", type=int, default=50, help="seeded samples per concept and prompt set (default 50)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eta", type=float, default=DEFAULT_ETA,
                        help=f"DDIM's eta (default {DEFAULT_ETA}: ancestral; 0: deterministic DDIM)")
    parser.add_argument("--bf16", action="store_true", help="sample under bfloat16 autocast (about 2x faster on CPU)")
    parser.add_argument("--kinds", nargs="*", choices=captioned.KINDS, help="only these kinds")
    parser.add_argument("--max-concepts", type=int, help="an evenly spaced subset (smoke runs)")
    parser.add_argument("--work", default="runs/t2i_eval", help="resumable state and features (default runs/t2i_eval)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "t2i_quality.json")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "t2i_grid.png")
    args = parser.parse_args(argv)
    if args.n < 2 or args.steps < 1:
        parser.error("--n must be at least 2 (the judge-FD needs two samples) and --steps at least 1")
    report = evaluate(args)
    atomic_write_json(args.out, report)
    concepts = [c for c in captioned.training_concepts() if c.name in report["per_concept"]]
    write_grid(Path(args.work), concepts, args.grid)
    print(json.dumps({k: report[k] for k in ("average", "average_by_kind", "judge_fd")}, indent=1))
    print(f"wrote {args.out} and {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
