"""EasyEdit's side of the knowledge-editing peer benchmark (run by easyedit_run.py in .venv-easyedit).

    benchmarks/peers/.venv-easyedit/bin/python benchmarks/peers/easyedit_side.py \
        --method rome --hparams benchmarks/peers/easyedit_hparams/rome.yaml --work WORK --out OUT.json

EasyEdit (PyPI easyeditor 0.0.1.dev0) runs unchanged. Two shims live here, in this process only:
- `cuda:{device}`: EasyEdit moves every tensor and the model to f"cuda:{hparams.device}" (about 30
  places). `map_cuda_to_cpu` makes the calls it does that through map a CUDA device to the CPU, so its
  code runs as written on a machine without a GPU.
- the covariance text: EasyEdit's layer_stats reads Wikipedia with `datasets.load_dataset`; the name in
  its module is pointed at the driver's local text (WORK/cov_texts.json: the chunks of the Python Language
  Reference that lifelong's ROME/MEMIT read), so both frameworks estimate C = E[k k^T] from the same text.
The model is the driver's copy of SmolLM2 (WORK/smollm2-135m-as-gpt: a 4.x config, and "gpt" in the
path so that EasyEdit picks the GPT-2 tokenizer class, which SmolLM2 uses).

An edit is EasyEdit's own call, as `BaseEditor.edit` (single requests) and `batch_edit` (MEMIT) make it:
`apply_algo(model, tok, requests, hparams, copy=False, return_orig_weights=True, keep_original_weight=True)`
timed alone; then edit_scores.score on the edited model, then the original weights back, as `edit` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import edit_scores  # noqa: E402  (the shared scorer, beside this file)


def _cpu(device):
    """A CUDA device (string, torch.device or index) becomes the CPU; anything else is kept."""
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


def map_cuda_to_cpu() -> None:
    """The entry points through which EasyEdit's code names `cuda:{device}` (Tensor.to, Module.to and the
    `device=` of torch.tensor / torch.zeros) map CUDA to the CPU. Only these Python-level calls are wrapped,
    so a forward pass costs what it costs without the shim (a TorchFunctionMode would intercept every op)."""
    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to

    def to(self, *args, **kwargs):
        if args:
            args = (_cpu(args[0]), *args[1:])
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    def module_to_cpu(self, *args, **kwargs):
        if args:
            args = (_cpu(args[0]), *args[1:])
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return module_to(self, *args, **kwargs)

    def with_cpu_device(factory):
        def made(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            return factory(*args, **kwargs)
        return made

    torch.Tensor.to = to
    torch.nn.Module.to = module_to_cpu
    torch.tensor = with_cpu_device(torch.tensor)
    torch.zeros = with_cpu_device(torch.zeros)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["ft", "rome", "memit"])
    ap.add_argument("--hparams", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    map_cuda_to_cpu()
    result = run(args)
    result["process_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(result, indent=1))


def run(args) -> dict:
    t0 = time.perf_counter()
    import easyeditor  # noqa: F401
    from easyeditor import BaseEditor, FTHyperParams, MEMITHyperParams, ROMEHyperParams
    from easyeditor.models.rome import layer_stats as rome_layer_stats
    from easyeditor.util import nethook
    import_s = time.perf_counter() - t0

    texts = json.loads((args.work / "cov_texts.json").read_text())

    def local_text(_name, _config):  # the shim for datasets.load_dataset inside layer_stats
        return {"train": [{"text": t} for t in texts]}

    rome_layer_stats.load_dataset = local_text

    params_cls = {"ft": FTHyperParams, "rome": ROMEHyperParams, "memit": MEMITHyperParams}[args.method]
    hparams = params_cls.from_hparams(str(args.hparams))
    hparams.model_name = str(args.work / "smollm2-135m-as-gpt")
    if hasattr(hparams, "stats_dir"):
        hparams.stats_dir = str(args.work / "easyedit-stats")  # empty: C is computed in this run, not read
    t0 = time.perf_counter()
    editor = BaseEditor.from_hparams(hparams)
    load_s = time.perf_counter() - t0
    model, tok = editor.model, editor.tok
    model.eval()

    records = json.loads((args.work / "requests.json").read_text())
    # EasyEdit prepends the space to target_new itself: it gets the bare word
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"].strip(),
                 "ground_truth": r["ground_truth"].strip(), "portability": {}, "locality": {}, "case_id": i}
                for i, r in enumerate(records)]
    # Its tokenizer must see the texts as lifelong's does (the scores use the driver's ids).
    mismatches = [r["prompt"] for r in records
                  if tok.encode(r["prompt"]) != r["prompt_ids"] or tok.encode(r["target_new"]) != r["new_ids"]]

    torch.manual_seed(0)  # EasyEdit samples its context templates with the global generator
    before = [edit_scores.neighbor_argmax(model, r) for r in records]
    pre = [edit_scores.score(model, r, b) for r, b in zip(records, before)]

    def edit(chunk):
        t = time.perf_counter()
        edited, weights_copy = editor.apply_algo(model, tok, chunk, hparams, copy=False, return_orig_weights=True,
                                                 keep_original_weight=True)
        return edited, weights_copy, time.perf_counter() - t

    def restore(weights_copy):
        with torch.no_grad():
            for name, value in weights_copy.items():
                nethook.get_parameter(model, name)[...] = value

    edits = []
    if args.method == "memit":  # batch_edit: all requests in one update
        hparams.batch_size = len(requests)
        edited, weights_copy, seconds = edit(requests)
        for i, r in enumerate(records):
            edits.append({"case_id": r["case_id"], "scores": edit_scores.score(edited, r, before[i])})
        restore(weights_copy)
        batch_s = seconds
    else:
        batch_s = None
        for i, (req, r) in enumerate(zip(requests, records)):
            edited, weights_copy, seconds = edit([req])
            edits.append({"case_id": r["case_id"], "edit_s": seconds, "scores": edit_scores.score(edited, r, before[i])})
            restore(weights_copy)
    from importlib import metadata
    return {"framework": "easyedit", "method": args.method, "hparams": {k: v for k, v in vars(hparams).items()},
            "versions": {p: metadata.version(p) for p in ("easyeditor", "torch", "transformers", "numpy")},
            "threads": torch.get_num_threads(), "import_s": import_s, "load_s": load_s, "batch_s": batch_s,
            "tokenizer_mismatches": mismatches, "pre": pre, "edits": edits}


if __name__ == "__main__":
    main()
