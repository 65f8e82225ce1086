"""Erasure and personalization in one ledger: does teaching a personal concept bring back an erased one, and does
a later erasure break a personal concept? (issue 16's ledger question, on the embedded text-to-image model)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/erase_personalize_interplay.py [--n 16] [--method custom-diffusion]

One diffusion ledger of the embedded model, probed on sneaker, sandal, ankle boot and flower (n seeded samples each,
judged by the ledger's judge), then four changes, each probed before and after:
  1. erase "sneaker" with UCE;
  2. personalize "<bzw>" (class drawing) from 8 real clip-art bugs (held out of the model's training): unrelated
     to sneakers;
  3. personalize "<my-shoe>" (class shoe) from 8 real Fashion-MNIST sneakers (train split): a user teaching the
     erased concept under a new name;
  4. erase "flower" with UCE.
The ledger has no probe of a personal concept, so after changes 2-4 this script also samples "a <bzw> drawing" and
"a <my-shoe> shoe" (n each) and reports the judge's rate of bug and of sneaker. Writes
benchmarks/results/erase_personalize_interplay.json (every change's probes before/after, the personal rates, the
interference matrix as `lifelong log --matrix` prints it, the command, seconds, versions).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
from PIL import Image

from lifelong import api
from lifelong.atomic import atomic_write_json
from lifelong.data import captioned
from lifelong.ledger import views
from lifelong.ledger.core import Ledger
from lifelong.metrics.judge import load_judge, predicted_concepts
from lifelong.personalize.bench import SUBJECTS, real_images
from lifelong.runtime import versions

ROOT = Path(__file__).resolve().parent.parent
PROBES = ["object/sneaker", "object/sandal", "object/ankle boot", "clipart/flower"]
PERSONAL = {"<bzw>": ("a <bzw> drawing", "clipart/bug"), "<my-shoe>": ("a <my-shoe> shoe", "object/sneaker")}


def write_folder(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder


def personal_rates(root: Path, judge, n: int, taught: list[str]) -> dict[str, float]:
    """The judge's rate (%) of each taught token's concept in n samples of its prompt from the ledger's model."""
    model = Ledger.open(root).materialize()
    rates = {}
    for token in taught:
        prompt, concept = PERSONAL[token]
        seen = predicted_concepts(judge, model.sample([prompt], n=n, seed=0))
        rates[token] = 100.0 * float(np.mean([fnmatchcase(s, concept) for s in seen]))
    return rates


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="seeded samples per probe and per personal prompt (default 16)")
    ap.add_argument("--method", default="custom-diffusion", help="the personalizer (default custom-diffusion)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "erase_personalize_interplay.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    judge = load_judge()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bugs = write_folder(real_images(SUBJECTS["bug"], "train", 8), tmp / "bugs")
        shoes, _ = captioned.concept_images(["object/sneaker"], "train", per_concept=8, seed=0)
        shoes = write_folder(shoes, tmp / "shoes")
        root = tmp / "ledger"
        api.init(root, family="diffusion", probes=PROBES, probe_items=args.n)
        steps, personal = [], {}
        for what, call, taught in (
                ("erase sneaker (uce)", lambda: api.erase(root, "sneaker", "uce"), []),
                (f"personalize <bzw> drawing: 8 clip-art bugs ({args.method})",
                 lambda: api.personalize(root, bugs, "<bzw>", "drawing", args.method), ["<bzw>"]),
                (f"personalize <my-shoe> shoe: 8 Fashion-MNIST sneakers ({args.method})",
                 lambda: api.personalize(root, shoes, "<my-shoe>", "shoe", args.method), ["<bzw>", "<my-shoe>"]),
                ("erase flower (uce)", lambda: api.erase(root, "flower", "uce"), ["<bzw>", "<my-shoe>"])):
            print(f"== {what}", flush=True)
            n = call()
            change = Ledger.open(root).change(n)
            personal = personal_rates(root, judge, args.n, taught) if taught else {}
            steps.append({"change": n, "what": what, "probes_before": change["probes_before"],
                          "probes_after": change["probes_after"], "personal_rates_after": personal})
            print(f"   probes after: {change['probes_after']}  personal: {personal}", flush=True)
        ledger = Ledger.open(root)
        matrix = views.format_matrix(ledger, markdown=True)
        baseline = ledger.manifest["baseline"]
    result = {"command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/erase_personalize_interplay.py "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": platform.processor() or platform.machine(), "versions": versions(),
              "n": args.n, "method": args.method, "baseline": baseline, "changes": steps, "matrix_markdown": matrix,
              "seconds": time.perf_counter() - t0}
    atomic_write_json(args.out, result)
    print(matrix + f"\n\nwrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
