"""Train the second judge (lifelong.metrics.probe_judge): linear heads on the frozen ImageNet EfficientNet-Lite0.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_probe_judge.py
        writes src/lifelong/assets/t2i_probe_judge.safetensors (the heads and the feature standardisation)
        and docs/t2i_probe_judge.json (accuracy on the real test images, per concept and averaged)

Data: the real train splits the main judge is trained on (every captioned pool plus the held-out subjects),
at most `max_per_concept` images per concept (drawn with the seed: the 2,000 images of each Fashion-MNIST
class add little to a linear probe), never a generated image. The trunk's features of every image are
computed once and kept in the lifelong cache (namespace probe-judge-features).

How: the features standardised by their train mean and std; three linear heads (what, style, ink: the
main judge's label lists) trained together, AdamW (lr `lr`, weight decay `weight_decay`), `steps`
mini-batches of `batch_size` drawn with replacement so that every concept is equally likely; the loss is
metrics.judge.judge_loss (style and ink on letter images only). Deterministic under one thread and a seed.
Evaluation: metrics.judge.judge_accuracy of the saved file reloaded, on every real test image, and the rate
with the concepts shuffled (chance).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lifelong.atomic import atomic_write_json
from lifelong.cache import cached, content_key
from lifelong.data import captioned
from lifelong.fingerprint import tensor_digest
from lifelong.metrics import judge as J
from lifelong.metrics.probe_judge import PROBE_JUDGE_ASSET, ProbeJudge, load_probe_judge, save_probe_judge

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "t2i_probe_judge.json"
DEFAULT_CONFIG: dict = {"seed": 0, "steps": 1500, "batch_size": 1024, "lr": 3e-3, "weight_decay": 1e-4,
                        "max_per_concept": 500}


load_real = captioned.labelled_images  # the pool of a split plus its held-out subjects, with concept names


def capped(names: list[str], cap: int, seed: int) -> np.ndarray:
    """Indices of at most `cap` images per concept (seeded), in order."""
    rng = np.random.default_rng(seed)
    array = np.asarray(names)
    keep = [rng.choice(rows, cap, replace=False) if len(rows) > cap else rows
            for rows in (np.flatnonzero(array == n) for n in dict.fromkeys(names))]
    return np.sort(np.concatenate(keep))


def trunk_features(judge: ProbeJudge, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """The frozen trunk's features (N, 1280) of uint8 images, from the cache when computed before."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    key = content_key("probe-judge", judge.config, tensor_digest(judge.trunk.state_dict()), digest)

    def compute() -> dict[str, torch.Tensor]:
        x = J.as_input(images)
        parts = [judge.trunk_features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return {"features": torch.cat(parts)}

    return cached("probe-judge-features", key, compute)["features"]


def train(judge: ProbeJudge, features: torch.Tensor, names: list[str], config: dict) -> list[float]:
    """Fit the standardisation and the heads on trunk features (N, 1280) of images named `names`."""
    generator = torch.Generator().manual_seed(config["seed"])
    torch.manual_seed(config["seed"])
    for head in judge.heads.values():
        head.reset_parameters()
    judge.mean.copy_(features.mean(0))
    judge.std.copy_(features.std(0).clamp(min=1e-6))
    f = judge.standardised(features)
    targets = J.concept_targets(judge, names)
    array = np.asarray(names)
    counts = {n: int((array == n).sum()) for n in dict.fromkeys(names)}
    weights = torch.tensor([1.0 / counts[n] for n in names], dtype=torch.float64)  # every concept equally likely
    optimizer = torch.optim.AdamW(judge.heads.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    losses = []
    for _ in range(config["steps"]):
        pick = torch.multinomial(weights, config["batch_size"], replacement=True, generator=generator)
        logits = judge.logits(f[pick])
        loss = sum(torch.nn.functional.cross_entropy(logits[h][targets[pick, i] != J.IGNORE],
                                                     targets[pick, i][targets[pick, i] != J.IGNORE])
                   for i, h in enumerate(J.HEADS) if (targets[pick, i] != J.IGNORE).any())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_CONFIG["steps"])
    parser.add_argument("--seed", type=int, default=DEFAULT_CONFIG["seed"])
    parser.add_argument("--out", type=Path, default=PROBE_JUDGE_ASSET)
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    config = dict(DEFAULT_CONFIG, steps=args.steps, seed=args.seed)
    command = "OMP_NUM_THREADS=1 .venv/bin/python scripts/train_probe_judge.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))

    start = time.perf_counter()
    images, names = load_real("train")
    keep = capped(names, config["max_per_concept"], config["seed"])
    images, names = images[keep], [names[i] for i in keep]
    test_images, test_names = load_real("test")
    judge = ProbeJudge(J.default_labels())
    features = trunk_features(judge, images)
    feature_seconds = time.perf_counter() - start
    print(f"{len(names)} train images ({feature_seconds:.0f}s to read and embed), {len(test_names)} test")
    t0 = time.perf_counter()
    losses = train(judge, features, names, config)
    train_seconds = time.perf_counter() - t0
    save_probe_judge(judge, args.out, {"training": {"config": config, "command": command}})

    shipped = load_probe_judge(args.out)
    t0 = time.perf_counter()
    accuracy = J.judge_accuracy(shipped, test_images, test_names)
    rng = np.random.default_rng([config["seed"], 1])
    shuffled = [test_names[i] for i in rng.permutation(len(test_names))]
    chance = float(np.mean(list(J.judge_rates(shipped, test_images, shuffled).values())))
    report = {
        "what": "the second judge (lifelong.metrics.probe_judge: linear heads on the frozen ImageNet EfficientNet-Lite0 "
                "at 64 px): accuracy on every real test image, each concept weighing 1",
        "command": command,
        "config": config,
        "file": str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else str(args.out),
        "file_bytes": args.out.stat().st_size,
        "train_images": len(names),
        "test_images": len(test_names),
        "threads": torch.get_num_threads(),
        "feature_seconds": round(feature_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 4),
        "rate_with_shuffled_concepts": round(chance, 2),
        "test_accuracy": {"average": {k: round(v, 2) for k, v in accuracy["average"].items()},
                          "average_by_kind": {k: round(v, 2) for k, v in accuracy["average_by_kind"].items()},
                          "per_concept": {n: {k: round(v, 1) for k, v in e.items()}
                                          for n, e in accuracy["per_concept"].items()}},
    }
    atomic_write_json(args.report, report)
    print(f"probe judge: concept accuracy {accuracy['average']['concept']:.1f}% (chance {chance:.1f}%), by kind "
          + ", ".join(f"{k} {v:.1f}" for k, v in accuracy["average_by_kind"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
