"""Train the judge (lifelong.metrics.judge) on real images only, test it on the real test splits, ship it.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_judge.py
        writes src/lifelong/assets/t2i_judge.safetensors (fp16 weights; labels, config, accuracy in metadata)
        and docs/t2i_judge.json (per-concept test accuracy of each head, averages, Frechet baselines)

Data: the train split of every captioned pool (lifelong.data.captioned.load_pool("train")) and of the
held-out subjects (the URW Gothic letters, the bug clip-art), so the judge can also score personalization.
No generated image is ever used. The test numbers are on the real test splits (pool + held-out subjects).

How (defaults = the shipped run):
  * batches of 128 drawn with replacement: each kind gets a fixed share of the batch (`kind_weights`), and
    within a kind every concept is equally likely (the clip-art categories have 11 to 71 training images,
    the objects 2,000 each; drawing by image would starve the small ones);
  * augmentation: a random shift of up to 2 px (white fill); objects and clip-art are also mirrored at
    random (letters and digits are not: a mirrored glyph is another glyph);
  * AdamW (lr 2e-3, weight decay 0.05), 100 warm-up steps then cosine decay to 0; loss = the sum of the
    three heads' cross-entropies, style and ink on letter images only (judge_loss);
  * deterministic: weights from torch.manual_seed(seed), every batch and augmentation from a generator
    seeded with `seed`; one CPU thread gives the same file every time (same torch build).

Evaluation, of the saved fp16 file reloaded (the numbers describe what ships):
  * per concept and head, accuracy on the real test images (judge_accuracy); averages weigh each concept 1;
  * the judge rate on the real test images with their concepts shuffled (the chance level of the rate);
  * judge-FD (FID formula on the judge's penultimate features; not Inception-FID), the real-vs-real
    baselines: (a) the test set against a train subset with the same concept counts (drawn without
    replacement), overall and per kind; (b) two disjoint concept-stratified halves of the test set, overall
    and per kind; and for scale, (c) 1,000 test images of one kind against 1,000 of another.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lifelong.atomic import atomic_write_json
from lifelong.data import captioned
from lifelong.metrics import judge as J

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "t2i_judge.json"

DEFAULT_CONFIG: dict = {
    "seed": 0,
    "steps": 1500,
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "warmup_steps": 100,
    "max_shift": 2,
    "kind_weights": {"object": 0.25, "digit": 0.15, "letter": 0.45, "clipart": 0.15},
    "mirror_kinds": ["object", "clipart"],
    "width": 32,
    "feature_dim": 128,
}


def kind_of(name: str) -> str:
    return name.split("/")[0]


load_real = captioned.labelled_images  # the pool of a split plus its held-out subjects, with concept names


def sampling_weights(names: list[str], kind_weights: dict[str, float]) -> torch.Tensor:
    """float64 (N,): each kind its share, split equally over its concepts, then over each concept's images."""
    names_arr = np.asarray(names)
    kinds = np.asarray([kind_of(n) for n in names])
    weights = np.zeros(len(names))
    for kind, share in kind_weights.items():
        concepts = np.unique(names_arr[kinds == kind])
        for concept in concepts:
            members = names_arr == concept
            weights[members] = share / len(concepts) / members.sum()
    if (weights == 0).any():
        missing = sorted({kind_of(n) for n, w in zip(names, weights) if w == 0})
        raise ValueError(f"no kind_weights entry for kinds {missing}")
    return torch.from_numpy(weights / weights.sum())


def augment(x: torch.Tensor, mirror: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: shift each image by up to `max_shift` px (white fill), mirror where `mirror`."""
    b, _, h, w = x.shape
    flip = mirror & (torch.rand(b, generator=generator) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_shift == 0:
        return x
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=1.0)  # (B, 3, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(b)])


def learning_rate(config: dict, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0 at `steps`."""
    if step < config["warmup_steps"]:
        return config["lr"] * (step + 1) / config["warmup_steps"]
    progress = (step - config["warmup_steps"]) / max(1, config["steps"] - config["warmup_steps"])
    return config["lr"] * 0.5 * (1 + np.cos(np.pi * progress))


def train(images: np.ndarray, names: list[str], config: dict, labels: dict | None = None,
          log_every: int = 100, log=print) -> tuple[J.Judge, list[float]]:
    """Train a judge on uint8 (N, 32, 32, 3) images labelled by concept name; returns it and the step losses."""
    torch.manual_seed(config["seed"])
    judge = J.Judge(labels or J.default_labels(), width=config["width"], feature_dim=config["feature_dim"])
    judge = judge.to(memory_format=torch.channels_last)  # ~1.3x faster convolutions on the CPU
    targets = J.concept_targets(judge, names)
    pixels = torch.from_numpy(np.ascontiguousarray(images))  # uint8 (N, H, W, 3), converted per batch
    weights = sampling_weights(names, config["kind_weights"])
    mirror = torch.tensor([kind_of(n) in config["mirror_kinds"] for n in names])
    optimizer = torch.optim.AdamW(judge.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    generator = torch.Generator().manual_seed(config["seed"])
    losses: list[float] = []
    judge.train()
    start = time.perf_counter()
    for step in range(config["steps"]):
        idx = torch.multinomial(weights, config["batch_size"], replacement=True, generator=generator)
        x = augment(J.as_input(pixels[idx]), mirror[idx], config["max_shift"], generator)
        x = x.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = J.judge_loss(judge, x, targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == config["steps"]):
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{config['steps']}  loss {np.mean(losses[-log_every:]):.4f}  "
                f"lr {learning_rate(config, step):.2e}  {elapsed:.0f}s")
    return judge.to(memory_format=torch.contiguous_format).eval(), losses


def matched_subset(train_names: list[str], test_names: list[str], rng: np.random.Generator) -> np.ndarray:
    """Indices of train images with the test set's concept counts, drawn without replacement."""
    train_arr, picks = np.asarray(train_names), []
    for concept, count in zip(*np.unique(np.asarray(test_names), return_counts=True)):
        picks.append(rng.choice(np.flatnonzero(train_arr == concept), count, replace=False))
    return np.sort(np.concatenate(picks))


def stratified_halves(names: list[str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets, each holding half (rounded down / up) of every concept's images."""
    arr, first, second = np.asarray(names), [], []
    for concept in np.unique(arr):
        members = rng.permutation(np.flatnonzero(arr == concept))
        first.append(members[: len(members) // 2])
        second.append(members[len(members) // 2:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def evaluate(judge: J.Judge, train: tuple[np.ndarray, list[str]], test: tuple[np.ndarray, list[str]], seed: int) -> dict:
    """Test accuracy, the shuffled-concept rate and the real-vs-real judge-FD baselines."""
    (train_images, train_names), (test_images, test_names) = train, test
    rng = np.random.default_rng([seed, 1])
    accuracy = J.judge_accuracy(judge, test_images, test_names)
    shuffled = [test_names[i] for i in rng.permutation(len(test_names))]
    shuffled_rate = float(np.mean(list(J.judge_rates(judge, test_images, shuffled).values())))

    subset = matched_subset(train_names, test_names, rng)
    feats_test = J.judge_features(judge, test_images).numpy()
    feats_train = J.judge_features(judge, train_images[subset]).numpy()
    train_kinds = np.asarray([kind_of(train_names[i]) for i in subset])
    test_kinds = np.asarray([kind_of(n) for n in test_names])
    half_a, half_b = stratified_halves(test_names, rng)
    frechet = {
        "train_matched_vs_test": {"all": J.frechet_distance(feats_train, feats_test), "n": len(test_names)},
        "test_half_vs_half": {"all": J.frechet_distance(feats_test[half_a], feats_test[half_b]),
                              "n": [len(half_a), len(half_b)]},
    }
    for kind in sorted(set(test_kinds)):
        frechet["train_matched_vs_test"][kind] = J.frechet_distance(feats_train[train_kinds == kind],
                                                                    feats_test[test_kinds == kind])
        a, b = half_a[test_kinds[half_a] == kind], half_b[test_kinds[half_b] == kind]
        frechet["test_half_vs_half"][kind] = J.frechet_distance(feats_test[a], feats_test[b])
    # the scale of a large distance: 1,000 test images of one kind against 1,000 of another
    draws = {kind: rng.choice(np.flatnonzero(test_kinds == kind), 1000, replace=False)
             for kind in ("digit", "letter", "object") if (test_kinds == kind).sum() >= 1000}
    pairs = [(a, b) for i, a in enumerate(draws) for b in list(draws)[i + 1:]]
    frechet["test_kind_vs_kind"] = {f"{a}~{b}": J.frechet_distance(feats_test[draws[a]], feats_test[draws[b]])
                                    for a, b in pairs}
    frechet["test_kind_vs_kind"]["n"] = 1000
    counts = {kind: int((test_kinds == kind).sum()) for kind in sorted(set(test_kinds))}
    return {"accuracy": accuracy, "rate_with_shuffled_concepts": shuffled_rate, "frechet": frechet,
            "test_images_per_kind": counts}


def rounded(value, digits: int = 4):
    """`value` with every float rounded (JSON without float noise such as 57.199999999999996)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def print_table(report: dict) -> None:
    acc = report["test_accuracy"]
    print("\njudge accuracy on the real test images (%, each concept weighs 1)")
    print(f"  {'':24s}{'concept':>9s}{'what':>8s}{'style':>8s}{'ink':>8s}")
    print(f"  {'average':24s}" + "".join(f"{acc['average'].get(k, float('nan')):8.1f}" for k in ("concept",) + J.HEADS))
    for kind, value in acc["average_by_kind"].items():
        print(f"  {'  ' + kind:24s}{value:8.1f}")
    worst = sorted(acc["per_concept"].items(), key=lambda kv: kv[1]["concept"])[:8]
    print("  worst concepts: " + ", ".join(f"{name} {entry['concept']:.0f}" for name, entry in worst))
    print(f"  judge rate with shuffled concepts (chance): {report['rate_with_shuffled_concepts']:.1f}")
    print("judge-FD (FID formula on the judge's features; not Inception-FID)")
    for key, values in report["frechet"].items():
        print(f"  {key:24s}" + "  ".join(f"{k} {v:.3f}" for k, v in values.items() if k != "n") + f"  (n {values['n']})")
    print(f"training {report['train_seconds']:.0f}s on {report['threads']} thread(s); file {report['file_bytes'] / 1e6:.2f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_CONFIG["steps"])
    parser.add_argument("--seed", type=int, default=DEFAULT_CONFIG["seed"])
    parser.add_argument("--out", type=Path, default=J.JUDGE_ASSET)
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    config = dict(DEFAULT_CONFIG, steps=args.steps, seed=args.seed)
    command = "OMP_NUM_THREADS=1 .venv/bin/python scripts/train_judge.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))

    train_set, test_set = load_real("train"), load_real("test")
    print(f"real images: {len(train_set[1])} train, {len(test_set[1])} test; {torch.get_num_threads()} thread(s)")
    start = time.perf_counter()
    judge, losses = train(*train_set, config)
    train_seconds = time.perf_counter() - start

    J.save_judge(judge, args.out, {"training": {"config": config, "command": command}})
    shipped = J.load_judge(args.out)  # evaluate what ships: the fp16 weights
    evaluation = evaluate(shipped, train_set, test_set, config["seed"])
    report = {
        "what": "the judge (lifelong.metrics.judge): accuracy on real test images and real-vs-real judge-FD baselines",
        "command": command,
        "seed": config["seed"],
        "config": config,
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "file": str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else str(args.out),
        "file_bytes": args.out.stat().st_size,
        "train_images": len(train_set[1]),
        "test_images": len(test_set[1]),
        "test_images_per_kind": evaluation["test_images_per_kind"],
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "test_accuracy": {k: evaluation["accuracy"][k] for k in ("average", "average_by_kind", "per_concept")},
        "rate_with_shuffled_concepts": evaluation["rate_with_shuffled_concepts"],
        "frechet": evaluation["frechet"],
        "frechet_note": ("judge-FD: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) on the judge's 128-d penultimate "
                         "features; NOT Inception-FID. Biased upward for small sets: compare sets of equal size."),
    }
    atomic_write_json(args.report, rounded(report))
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
