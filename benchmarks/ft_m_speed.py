"""FT-M's speed-ups, side by side on SmolLM2-135M: the editor as shipped (the blocks below the edited one run once
per edit, the output layer only at the target positions) against the plain loop of the same edit (every block and
every logit in every step), on the same counterfact requests (`edit.requests.counterfact_requests`), alternating A/B so that the machine's load hits both
alike. Both should end at the same edit: the bench reports the target NLL after each and the largest weight difference
(float rounding of the reordered sums, which Adam's normalised steps can carry up to about lr per step on weights
whose gradient is near zero). The ratio is of the paired seconds (median, min, max).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ft_m_speed.py [--requests 6]

Writes benchmarks/results/ft_m_speed.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapters_text import write_record  # noqa: E402  (benchmarks/ is not a package)

from lifelong.edit.base import fit_target  # noqa: E402
from lifelong.edit.ft_m import FTM, Params  # noqa: E402
from lifelong.edit.requests import counterfact_requests  # noqa: E402
from lifelong.families.lm import build_lm, ffn_out, target_batch, target_nll  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "ft_m_speed.json"


def plain_edit(model, tok, request, layer: int, p: Params) -> tuple[float, float]:
    """The edit without either speed-up: every parameter but W frozen, `fit_target` on the full target NLL.
    Returns (seconds, the target NLL after)."""
    w = ffn_out(model, layer).weight
    w0 = w.detach().clone()
    batch = target_batch(tok, [request.prompt], [request.target_new], w.device)
    flags = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in flags:
        q.requires_grad_(q is w)

    def project():
        with torch.no_grad():
            w.copy_(torch.clamp(w, w0 - p.norm_constraint, w0 + p.norm_constraint))

    start = time.perf_counter()
    fit_target(model, batch, [w], lr=p.lr, steps=p.steps, stop_loss=p.stop_loss, after_step=project)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        loss_after = target_nll(model, batch).item()
    for q, flag in flags:
        q.requires_grad_(flag)
    w.grad = None
    return seconds, loss_after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started, load_before = time.time(), os.getloadavg()
    model, tok = build_lm("embedded")
    requests = counterfact_requests(model, tok)[0][: args.requests]
    editor = FTM(model, tok, Params())
    original = ffn_out(model, editor.layer).weight.detach().clone()
    rows = []
    for i, request in enumerate(requests):
        runs = {}
        for which in (("shipped", "plain") if i % 2 == 0 else ("plain", "shipped")):
            editor.reset()
            if which == "shipped":
                t0 = time.perf_counter()
                stats = editor.apply(request)
                runs[which], runs["shipped_loss"] = time.perf_counter() - t0, stats["loss_after"]
            else:
                runs[which], runs["plain_loss"] = plain_edit(model, tok, request, editor.layer, editor.params)
            runs[f"{which}_weight"] = ffn_out(model, editor.layer).weight.detach().clone()
        diff = (runs.pop("shipped_weight") - runs.pop("plain_weight")).abs().max().item()
        rows.append({"prompt": request.prompt, "target": request.target_new, "steps": stats["steps"],
                     "shipped_s": runs["shipped"], "plain_s": runs["plain"], "max_abs_weight_difference": diff,
                     "shipped_nll_after": runs["shipped_loss"], "plain_nll_after": runs["plain_loss"]})
        print(f"{request.prompt!r} -> {request.target_new!r}: {runs['plain']:.2f} s plain, {runs['shipped']:.2f} s "
              f"shipped ({runs['plain'] / runs['shipped']:.2f}x), {stats['steps']:.0f} steps, max |dW| diff {diff:.1e}, "
              f"target NLL after {runs['plain_loss']:.4f} / {runs['shipped_loss']:.4f}",
              flush=True)
    editor.reset()
    assert torch.equal(ffn_out(model, editor.layer).weight, original)
    ratios = [r["plain_s"] / r["shipped_s"] for r in rows]
    summary = {"median_plain_s": statistics.median(r["plain_s"] for r in rows),
               "median_shipped_s": statistics.median(r["shipped_s"] for r in rows),
               "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
               "max_abs_weight_difference": max(r["max_abs_weight_difference"] for r in rows)}
    print(f"median {summary['median_plain_s']:.2f} s plain vs {summary['median_shipped_s']:.2f} s shipped: "
          f"{summary['median_ratio']:.2f}x [{summary['min_ratio']:.2f}-{summary['max_ratio']:.2f}]")
    write_record(args.out, {"model": "SmolLM2-135M-Instruct (embedded)", "layer": editor.layer,
                            "params": vars(editor.params), "rows": rows, "summary": summary}, started, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
