"""The judge: an independent classifier of the text-to-image model's concepts, trained on real images only.

It reads a 32x32 RGB image and names what it shows with three heads on one shared CNN trunk, because a
letter concept of lifelong.data.captioned is three things at once (letter, type style, ink colour):

    what    every object, digit, letter identity and clip-art category, the held-out subjects' included
            ("object/sneaker", "digit/7", "letter/A", "clipart/flower", ..., "clipart/bug")
    style   the letters' type styles, the held-out URW Gothic as its own style ("serif", ..., "gothic")
    ink     the letters' ink colours ("black", "red", "green", "blue")

The judge's reading of an image is one concept name: the `what` label, and for a letter also the style
and ink heads' labels, "letter/<L>/<style>/<ink>" (`predicted_concepts`). It never saw a generated image
(scripts/train_judge.py trains it on the real train splits; docs/t2i_judge.json holds its accuracy on the
real test splits), so it can score the generator without sharing its errors.

Metrics (all in %, per concept c; I_c = the images prompted with / labelled as c):

    judge rate         rate(c) = 100 * mean_{x in I_c} 1[predicted_concept(x) == c]
                       For a letter concept this means the letter AND the style AND the ink are right; for
                       every other concept, the `what` head's label. On generated images: how often the
                       judge sees the prompted concept (erased-concept rate, attack success rate, prior
                       preservation, subject fidelity by class). On real test images: the judge's accuracy.
    head accuracy      acc_h(c) = 100 * mean_{x in I_c} 1[argmax head_h(x) == c's label for h]
                       (style and ink: letter concepts only)
    averages           plain means over concepts (each concept weighs 1, however many images it has)

    Frechet distance on the judge's features (FID-style, NOT Inception-FID):
        FD(A, B) = ||mu_A - mu_B||^2 + Tr(S_A + S_B - 2 (S_A^1/2 S_B S_A^1/2)^1/2)
    with mu, S the mean and covariance (ddof 1) of the judge's penultimate features (`judge_features`,
    D = 128) of image sets A and B: the formula of Heusel et al. (2017) on another network's features, so
    its scale is not comparable with any published FID. Read it against the real-vs-real baselines in
    docs/t2i_judge.json (train vs test, and two halves of the test set; the estimate is biased upward
    for small sets, so compare sets of equal size; with fewer images than D it rests on a singular
    covariance and only orders sets of one size).

Reading either number on generated images takes two baselines: real vs real (above: the floor) and
shuffled captions (images generated from other concepts' captions, scored against the prompted ones:
the ceiling of "not the concept"; on real test images with shuffled concepts the rate is ~0.5%).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from lifelong.assets import PACKAGE_ASSETS
from lifelong.atomic import atomic_write_bytes
from lifelong.data import captioned
from lifelong.data.captioned import Concept
from lifelong.errors import DataNotFoundError

JUDGE_ASSET = PACKAGE_ASSETS / "t2i_judge.safetensors"
FORMAT = "lifelong-t2i-judge-v1"
TRAIN_COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python scripts/train_judge.py"
HEADS = ("what", "style", "ink")
IGNORE = -1  # target of a head that does not apply (style and ink of a non-letter image)


def default_labels() -> dict[str, list[str]]:
    """The heads' label lists: every concept of the captioned pools and its held-out subjects."""
    concepts = captioned.training_concepts() + [
        c for subject in captioned.HELDOUT_SUBJECTS for c in captioned.heldout_subject_concepts(subject)]
    what = []
    for concept in concepts:
        label = what_label(concept.name)
        if label not in what:
            what.append(label)
    return {"what": what, "style": list(captioned.FONT_STYLES) + [captioned.HELDOUT_FONT_STYLE[0]],
            "ink": list(captioned.INK_COLOURS)}


def concept_parts(name: str) -> tuple[str, str | None, str | None]:
    """(what label, style, ink) of a concept name: "letter/A/serif/red" -> ("letter/A", "serif", "red");
    any other concept is its own `what` label with no style or ink."""
    parts = name.split("/")
    if parts[0] == "letter":
        if len(parts) != 4:
            raise ValueError(f"a letter concept is 'letter/<letter>/<style>/<ink>', not {name!r}")
        return f"letter/{parts[1]}", parts[2], parts[3]
    return name, None, None


def what_label(name: str) -> str:
    return concept_parts(name)[0]


def _name(concept: Concept | str) -> str:
    return concept if isinstance(concept, str) else concept.name


# --- the network ---------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Judge(nn.Module):
    """A VGG-style CNN: three stages of two 3x3 convs (width w, 2w, 4w) with 2x2 max pooling, global average
    pooling, one linear layer to the D-dim penultimate features, and one linear head per label list.
    Width 32, D 128: ~0.31 M parameters. Inputs: see `as_input`."""

    def __init__(self, labels: dict[str, list[str]], width: int = 32, feature_dim: int = 128):
        super().__init__()
        missing = [h for h in HEADS if not labels.get(h)]
        if missing:
            raise ValueError(f"the judge needs non-empty label lists for {missing}")
        self.labels = {h: list(labels[h]) for h in HEADS}
        self.config = {"width": width, "feature_dim": feature_dim}
        w = width
        self.trunk = nn.Sequential(
            *_conv(3, w), *_conv(w, w), nn.MaxPool2d(2),  # (B, w, 16, 16)
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, 8, 8)
            *_conv(2 * w, 4 * w), *_conv(4 * w, 4 * w), nn.MaxPool2d(2),  # (B, 4w, 4, 4)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 4w)
            nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True),  # (B, D): the penultimate features
        )
        self.heads = nn.ModuleDict({h: nn.Linear(feature_dim, len(self.labels[h])) for h in HEADS})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [0, 1] -> (B, D)."""
        return self.trunk(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, 32, 32) in [0, 1] -> {head: logits (B, n_labels)}."""
        feats = self.features(x)
        return {h: head(feats) for h, head in self.heads.items()}


def as_input(images) -> torch.Tensor:
    """Images as the judge reads them: float32 (N, 3, 32, 32) in [0, 1].

    Accepts uint8 (N, 32, 32, 3) (the pools' and `sample`'s layout, divided by 255), or float in [0, 1] as
    (N, 3, 32, 32) or (N, 32, 32, 3); numpy arrays or tensors.
    """
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim != 4 or (x.shape[1] != 3 and x.shape[-1] != 3):
        raise ValueError(f"images must be (N, 32, 32, 3) or (N, 3, 32, 32), not {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC (N, 32, 32, 3), not {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float().div(255)
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], not {x.dtype}")
    x = x.float()
    return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)


def concept_targets(judge: Judge, concepts: Sequence[Concept | str]) -> torch.Tensor:
    """int64 (N, 3): each image's label index for what, style, ink (IGNORE where a head does not apply)."""
    index = {h: {label: i for i, label in enumerate(judge.labels[h])} for h in HEADS}
    rows = []
    for name in map(_name, concepts):
        parts = concept_parts(name)
        row = []
        for head, part in zip(HEADS, parts):
            if part is None:
                row.append(IGNORE)
            elif part in index[head]:
                row.append(index[head][part])
            else:
                raise ValueError(f"the judge has no {head} label {part!r} (concept {name!r}); "
                                 f"it knows {judge.labels[head]}")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def judge_loss(judge: Judge, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the cross-entropy on the images the head applies to (targets from `concept_targets`)."""
    logits = judge(x)
    loss = x.new_zeros(())
    for i, head in enumerate(HEADS):
        applies = targets[:, i] != IGNORE
        if applies.any():
            loss = loss + F.cross_entropy(logits[head][applies], targets[applies, i])
    return loss


# --- reading images ------------------------------------------------------------------------------------


@torch.no_grad()
def _run(judge: Judge, images, batch_size: int, fn) -> list:
    was_training = judge.training
    judge.eval()
    x = as_input(images)
    out = [fn(x[i: i + batch_size]) for i in range(0, len(x), batch_size)]
    judge.train(was_training)
    return out


def head_predictions(judge: Judge, images, batch_size: int = 512) -> torch.Tensor:
    """int64 (N, 3): argmax label index of the what, style and ink heads."""
    parts = _run(judge, images, batch_size,
                 lambda x: torch.stack([logits.argmax(-1) for logits in judge(x).values()], dim=1))
    return torch.cat(parts) if parts else torch.zeros((0, 3), dtype=torch.int64)


def _seen(judge: Judge, preds: torch.Tensor) -> list[str]:
    """Concept names from head predictions (N, 3): the `what` label, plus "/<style>/<ink>" for a letter."""
    names = []
    for what, style, ink in preds.tolist():
        label = judge.labels["what"][what]
        if label.startswith("letter/"):
            label = f"{label}/{judge.labels['style'][style]}/{judge.labels['ink'][ink]}"
        names.append(label)
    return names


def predicted_concepts(judge: Judge, images, batch_size: int = 512) -> list[str]:
    """The concept the judge sees in each image: its `what` label, plus "/<style>/<ink>" for a letter."""
    return _seen(judge, head_predictions(judge, images, batch_size))


def judge_features(judge: Judge, images, batch_size: int = 512) -> torch.Tensor:
    """float32 (N, D): the penultimate features (after the last ReLU, before the heads) of each image."""
    parts = _run(judge, images, batch_size, judge.features)
    return torch.cat(parts) if parts else torch.zeros((0, judge.config["feature_dim"]))


def _rates(names: list[str], seen: list[str]) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for name, pred in zip(names, seen):
        hits.setdefault(name, []).append(pred == name)
    return {name: 100.0 * float(np.mean(h)) for name, h in hits.items()}


def _checked_names(judge: Judge, images, concepts) -> tuple[list[str], torch.Tensor]:
    names = [_name(c) for c in concepts]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} concepts for {len(images)} images")
    return names, concept_targets(judge, names)  # every concept must be one the judge can name


def judge_rates(judge: Judge, images, concepts: Sequence[Concept | str], batch_size: int = 512) -> dict[str, float]:
    """Per concept (in order of first appearance): the % of its images in which the judge sees exactly it.

    `concepts[i]` is the concept image i was prompted with (a Concept or its name). A letter concept counts
    only when letter, style and ink all match (see the module docstring)."""
    names, _ = _checked_names(judge, images, concepts)
    return _rates(names, predicted_concepts(judge, images, batch_size))


def judge_accuracy(judge: Judge, images, concepts: Sequence[Concept | str], batch_size: int = 512) -> dict:
    """The judge's accuracy on labelled (real) images, per concept and averaged over concepts.

    Returns {"per_concept": {name: {"concept": %, "what": %, "style": %, "ink": %}} (style/ink for letters
    only), "average": {"concept": %, "what": %, "style": %, "ink": %}, "average_by_kind": {kind: %}}, where
    "concept" is the judge rate on the concept's own images (all heads right) and the averages weigh every
    concept equally (style and ink: over letter concepts)."""
    names, targets = _checked_names(judge, images, concepts)
    preds = head_predictions(judge, images, batch_size)
    rates = _rates(names, _seen(judge, preds))
    correct = preds == targets  # (N, 3)
    name_array = np.asarray(names)
    per_concept: dict[str, dict[str, float]] = {}
    for name, rate in rates.items():
        rows = torch.from_numpy(name_array == name)
        entry = {"concept": rate}
        for i, head in enumerate(HEADS):
            if targets[rows, i][0] != IGNORE:
                entry[head] = 100.0 * correct[rows, i].double().mean().item()
        per_concept[name] = entry
    average = {key: float(np.mean([e[key] for e in per_concept.values() if key in e]))
               for key in ("concept",) + HEADS if any(key in e for e in per_concept.values())}
    by_kind: dict[str, list[float]] = {}
    for name, entry in per_concept.items():
        by_kind.setdefault(name.split("/")[0], []).append(entry["concept"])
    return {"per_concept": per_concept, "average": average,
            "average_by_kind": {k: float(np.mean(v)) for k, v in by_kind.items()}}


# --- the Frechet distance ------------------------------------------------------------------------------


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root (eigenvalues below 0 from rounding are clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64.

    Tr((S_a S_b)^1/2) is computed as Tr((S_a^1/2 S_b S_a^1/2)^1/2): the two matrices are similar, and the
    second is symmetric PSD, so its square root comes from `eigh` with real eigenvalues (no imaginary
    parts to discard, as scipy.linalg.sqrtm of the non-symmetric S_a S_b leaves)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    root_a = _sqrtm_psd(cov_a)
    values = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_cross = np.sqrt(np.clip(values, 0, None)).sum()
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_cross)
    return max(distance, 0.0)  # rounding can leave -1e-12 for identical moments


def frechet_distance(feats_a, feats_b) -> float:
    """FID-style Frechet distance between two feature sets (N_a, D) and (N_b, D), each N >= 2.

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) with the sets' means and covariances (ddof 1),
    the formula of FID (Heusel et al. 2017). On `judge_features` it is the project's judge-FD: NOT
    Inception-FID (other features, other scale); read it against the real-vs-real baselines."""
    a = np.asarray(feats_a.detach().cpu() if isinstance(feats_a, torch.Tensor) else feats_a, np.float64)
    b = np.asarray(feats_b.detach().cpu() if isinstance(feats_b, torch.Tensor) else feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of one D, not {a.shape} and {b.shape}")
    return frechet_distance_from_moments(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --- the shipped file ----------------------------------------------------------------------------------


def save_judge(judge: Judge, path: str | Path, extra: dict | None = None) -> Path:
    """Weights in fp16 (BatchNorm's step counters dropped); labels, config and `extra` in the metadata."""
    tensors = {k: v.detach().cpu().to(torch.float16).contiguous()
               for k, v in judge.state_dict().items() if not k.endswith("num_batches_tracked")}
    metadata = {"format": FORMAT, "labels": json.dumps(judge.labels), "config": json.dumps(judge.config)}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    return atomic_write_bytes(path, save(tensors, metadata))


def load_judge(path: str | Path | None = None) -> Judge:
    """The judge from `path` (default: the shipped src/lifelong/assets/t2i_judge.safetensors), in eval mode."""
    path = Path(path) if path is not None else JUDGE_ASSET
    if not path.is_file():
        raise DataNotFoundError(f"the judge's weights {path} are missing: train them with `{TRAIN_COMMAND}` "
                                "(a few minutes on one CPU thread; needs the captioned pools)")

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise DataNotFoundError(f"{path} is not a judge file (format {metadata.get('format')!r}): "
                                f"rebuild it with `{TRAIN_COMMAND}`")
    judge = Judge(json.loads(metadata["labels"]), **json.loads(metadata["config"]))
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    judge.load_state_dict(state, strict=False)  # only the num_batches_tracked counters are absent
    missing = [k for k in judge.state_dict() if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise DataNotFoundError(f"{path} lacks {missing[:3]}: rebuild it with `{TRAIN_COMMAND}`")
    return judge.eval()
