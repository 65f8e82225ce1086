"""Peer benchmark: FT, ROME and MEMIT of EasyEdit and of lifelong, side by side on the same edits.

    bash benchmarks/peers/easyedit_setup.sh               # once: EasyEdit's own venv (.venv-easyedit)
    .venv/bin/python benchmarks/peers/easyedit_run.py     # every method, both frameworks

Issue 19 ("Side by side with EasyEdit"). Both frameworks get
- the same model: the embedded SmolLM2-135M-Instruct, lifelong's converted safetensors folder; EasyEdit
  reads a copy (WORK/smollm2-135m-as-gpt: the weights linked, a config in the transformers 4.x format,
  GPT-2 tokenizer files from the same vocabulary, "gpt" in the path so that EasyEdit picks the GPT-2
  tokenizer class);
- the same requests: the first `--n` CounterFact-style requests of lifelong's counterfact split (facts
  the model knows, from the installed country / city tables: `edit.requests.counterfact_requests`),
  each with its paraphrases and neighbourhood prompts;
- the same settings: EasyEdit's hparams files (easyedit_hparams/*.yaml) are read by both sides;
  lifelong_edit_side.lifelong_params maps each value to lifelong's name for it;
- the same covariance text: the first `mom2_n_samples` 128-token chunks of the Python Language Reference
  (lifelong's ROME corpus); EasyEdit's layer_stats is handed them instead of Wikipedia. Both compute C
  in the run (empty caches), so the first edit of ROME and MEMIT includes it on both sides.
Each (method, framework) runs in a fresh process (easyedit_side.py in EasyEdit's venv,
lifelong_edit_side.py in this one), one thread each; which framework goes first alternates from one
method to the next, so that a change in the machine's load hits both. Every score comes from
edit_scores.py, the same code in both processes, on token ids the driver made once.

Comparison: per method, the mean of every score over the requests, and the paired difference
(lifelong - EasyEdit) with its standard error; "agree" when |difference| <= 2 standard errors (or both
equal). Time per edit: each `apply` call alone (MEMIT: the one batch / B); the first edit (which also
samples the prefixes and computes C) is reported apart, the speed-up compares the median of the rest.
Writes benchmarks/results/easyedit_peer.json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EASYEDIT_PYTHON = HERE / ".venv-easyedit" / "bin" / "python"
METHODS = ("ft", "rome", "memit")
LIFELONG_NAME = {"ft": "ft_l", "rome": "rome", "memit": "memit"}
SCORES = ("rewrite_success", "rewrite_acc", "paraphrase_success", "paraphrase_acc", "neighborhood_success",
          "neighborhood_acc", "rewrite_nll")
CHUNK_LEN = 128  # tokens per covariance text chunk (lifelong's key_covariances chunk_len)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=10, help="requests")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "easyedit_peer.json")
    ap.add_argument("--work-dir", type=Path, default=None, help="model copy, requests, caches (default: a temp dir)")
    ap.add_argument("--easyedit-python", type=Path, default=EASYEDIT_PYTHON)
    ap.add_argument("--reuse", action="store_true",
                    help="take a (method, framework) result already in --work-dir instead of running it again")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if not args.easyedit_python.exists():
        sys.exit(f"{args.easyedit_python} missing: run `bash benchmarks/peers/easyedit_setup.sh` first")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="easyedit-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = os.getloadavg()

    prepared = prepare(work, args.n, methods)  # the same files again for the same arguments
    runs: dict[str, dict[str, dict]] = {}
    for k, method in enumerate(methods):
        order = ("lifelong", "easyedit") if k % 2 == 0 else ("easyedit", "lifelong")
        runs[method] = {}
        for framework in order:
            done = work / f"{method}-{framework}.json"
            if args.reuse and done.exists():
                print(f"[{method}] {framework}: reusing {done}", flush=True)
                runs[method][framework] = json.loads(done.read_text()) | {"reused_from": str(done)}
                continue
            print(f"[{method}] {framework} ...", flush=True)
            runs[method][framework] = run_side(framework, method, work, args.easyedit_python)
    comparison = {m: compare(runs[m]) for m in methods}
    result = {
        "command": "bash benchmarks/peers/easyedit_setup.sh && .venv/bin/python benchmarks/peers/easyedit_run.py"
                   + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                    "threads_per_process": 1, "load_average_start": load_start, "load_average_end": os.getloadavg(),
                    "note": "a shared machine: other jobs ran beside this one; the frameworks alternate"},
        "wall_s": time.time() - started,
        "setup": prepared,
        "hparams": {m: yaml.safe_load((HERE / "easyedit_hparams" / f"{m}.yaml").read_text()) for m in methods},
        "lifelong_editor": {m: LIFELONG_NAME[m] for m in methods},
        "runs": runs,
        "comparison": comparison,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {args.out}")
    return result


# ---------------------------------------------------------------------- preparation

def prepare(work: Path, n: int, methods: list[str]) -> dict:
    """The model copy for EasyEdit, the requests (texts and token ids) and the covariance text, in `work`."""
    from lifelong.edit.key_value import corpus_chunks, corpus_hash
    from lifelong.edit.requests import counterfact_requests
    from lifelong.families.lm import build_lm, embedded_lm_folder

    folder = embedded_lm_folder()
    model, tok = build_lm("embedded")
    requests, _ = counterfact_requests(model, tok)
    chosen = [r for r in requests if r.prompt.count(r.subject) == 1 and r.ground_truth and r.locality][:n]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    records = [{"case_id": r.case_id, "relation": r.relation, "prompt": r.prompt, "subject": r.subject,
                "target_new": r.target_new, "ground_truth": r.ground_truth, "paraphrases": list(r.paraphrases),
                "neighbors": [{"prompt": p.prompt, "answer": p.answer, "prompt_ids": ids(p.prompt),
                               "answer_ids": ids(p.answer)} for p in r.locality],
                "prompt_ids": ids(r.prompt), "new_ids": ids(r.target_new), "true_ids": ids(r.ground_truth),
                "paraphrase_ids": [ids(p) for p in r.paraphrases]} for r in chosen]
    (work / "requests.json").write_text(json.dumps(records, indent=1))

    n_samples = {yaml.safe_load((HERE / "easyedit_hparams" / f"{m}.yaml").read_text()).get("mom2_n_samples")
                 for m in methods} - {None}
    if len(n_samples) > 1:
        raise SystemExit(f"the hparams files disagree on mom2_n_samples: {sorted(n_samples)}")
    n_chunks = n_samples.pop() if n_samples else 160
    chunks = corpus_chunks(tok, "python-reference", CHUNK_LEN, 10**9)[:n_chunks]
    cov_tokens = sum(map(len, chunks))
    assert corpus_chunks(tok, "python-reference", CHUNK_LEN, cov_tokens) == chunks  # lifelong reads exactly these
    texts = [tok.decode(c) for c in chunks]
    roundtrip = sum(ids(t) != c for t, c in zip(texts, chunks))
    (work / "cov_texts.json").write_text(json.dumps(texts))

    easyedit_folder = work / "smollm2-135m-as-gpt"
    write_easyedit_model(folder, easyedit_folder)
    meta = {"model_folder": str(folder), "cov_tokens": cov_tokens}
    (work / "meta.json").write_text(json.dumps(meta))
    return {"work_dir": str(work), "model": "SmolLM2-135M-Instruct (embedded GGUF, fp32 safetensors)",
            "model_folder": str(folder), "easyedit_model_folder": str(easyedit_folder),
            "requests": {"source": "lifelong counterfact split (edit.requests.counterfact_requests, seed 0), first "
                                   f"{len(records)} with the subject once in the prompt",
                         "items": [{k: r[k] for k in ("case_id", "relation", "prompt", "subject", "target_new",
                                                      "ground_truth", "paraphrases")}
                                   | {"neighbors": [[p["prompt"], p["answer"]] for p in r["neighbors"]]}
                                   for r in records]},
            "covariance_text": {"corpus": "python-reference", "corpus_sha256_12": corpus_hash("python-reference"),
                                "chunks": len(chunks), "chunk_len": CHUNK_LEN, "tokens": cov_tokens,
                                "chunks_whose_decoded_text_reencodes_differently": roundtrip}}


def write_easyedit_model(source: Path, dest: Path) -> None:
    """SmolLM2 as transformers 4.40 and EasyEdit's GPT-2 branch read it: the same weights (linked), the
    config in the 4.x format, and vocab.json / merges.txt from the same byte-level BPE."""
    dest.mkdir(parents=True, exist_ok=True)
    link = dest / "model.safetensors"
    if not link.exists():
        link.symlink_to(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)   # the GGUF marker: the weights are plain fp32
    config["torch_dtype"] = config.pop("dtype", "float32")
    rope = config.pop("rope_parameters", {}) or {}
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config["transformers_version"] = "4.40.0"
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(source / "generation_config.json", dest / "generation_config.json")
    spec = json.loads((source / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["pre_tokenizer"]["type"] == "ByteLevel"
    (dest / "vocab.json").write_text(json.dumps(spec["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok_config = json.loads((source / "tokenizer_config.json").read_text())
    added = {str(t["id"]): {"content": t["content"], "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for t in spec["added_tokens"]}
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": config["max_position_embeddings"],
        "bos_token": tok_config["bos_token"], "eos_token": tok_config["eos_token"],
        "unk_token": tok_config["unk_token"], "pad_token": tok_config["pad_token"],
        "added_tokens_decoder": added}, indent=1))


# ---------------------------------------------------------------------- running

def run_side(framework: str, method: str, work: Path, easyedit_python: Path) -> dict:
    for cache in ("lifelong-cache", "easyedit-stats"):  # C computed in every run, not read from the last
        shutil.rmtree(work / cache, ignore_errors=True)
    python = easyedit_python if framework == "easyedit" else Path(sys.executable)
    script = HERE / ("easyedit_side.py" if framework == "easyedit" else "lifelong_edit_side.py")
    out = work / f"{method}-{framework}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.run([str(python), str(script), "--method", method, "--hparams",
                           str(HERE / "easyedit_hparams" / f"{method}.yaml"), "--work", str(work), "--out", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    (work / f"{method}-{framework}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{framework} {method} failed (log: {work / f'{method}-{framework}.log'}):\n"
                         + (proc.stdout + proc.stderr)[-3000:])
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t
    return result


# ---------------------------------------------------------------------- comparing

def summary(run: dict) -> dict:
    scores = {k: statistics.fmean(e["scores"][k] for e in run["edits"]) for k in SCORES}
    pre = {k: statistics.fmean(p[k] for p in run["pre"]) for k in SCORES}
    if run["batch_s"] is not None:  # MEMIT: one batch
        times = {"batch_s": run["batch_s"], "per_edit_s": run["batch_s"] / len(run["edits"])}
    else:
        edit_s = [e["edit_s"] for e in run["edits"]]
        times = {"first_edit_s": edit_s[0], "median_edit_s_after_first": statistics.median(edit_s[1:]),
                 "mean_edit_s": statistics.fmean(edit_s), "per_edit_s": statistics.median(edit_s[1:])}
    return {"scores": scores, "pre_scores": pre, "times": times}


def compare(by_framework: dict[str, dict]) -> dict:
    ours, peer = by_framework["lifelong"], by_framework["easyedit"]
    agreement = {}
    for k in SCORES:
        diffs = [a["scores"][k] - b["scores"][k] for a, b in zip(ours["edits"], peer["edits"])]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        agreement[k] = {"lifelong_minus_easyedit": mean, "standard_error": se,
                        "agree": bool(abs(mean) <= 2 * se) if se > 0 else mean == 0}
    pre_gap = max(abs(a[k] - b[k]) for a, b in zip(ours["pre"], peer["pre"]) for k in SCORES)
    s_ours, s_peer = summary(ours), summary(peer)
    speedup = {"per_edit": s_peer["times"]["per_edit_s"] / s_ours["times"]["per_edit_s"]}
    if "first_edit_s" in s_ours["times"]:
        speedup["first_edit"] = s_peer["times"]["first_edit_s"] / s_ours["times"]["first_edit_s"]
    return {"lifelong": s_ours, "easyedit": s_peer, "paired_difference": agreement,
            "unedited_model_max_score_gap": pre_gap, "speedup_easyedit_over_lifelong": speedup}


def table(result: dict) -> str:
    head = ("| method | framework | rewrite success | rewrite acc | paraphrase success | neighbourhood success | "
            "neighbourhood acc | rewrite NLL | s per edit | first edit s |")
    lines = [head, "|---" * 10 + "|"]
    for method, c in result["comparison"].items():
        for framework in ("easyedit", "lifelong"):
            s, t = c[framework]["scores"], c[framework]["times"]
            name = "EasyEdit FT (FT-L)" if method == "ft" and framework == "easyedit" else (
                f"lifelong {LIFELONG_NAME[method]}" if framework == "lifelong" else f"EasyEdit {method.upper()}")
            first = f"{t['first_edit_s']:.1f}" if "first_edit_s" in t else f"batch {t['batch_s']:.1f}"
            lines.append(f"| {method} | {name} | {s['rewrite_success']:.2f} | {s['rewrite_acc']:.2f} | "
                         f"{s['paraphrase_success']:.2f} | {s['neighborhood_success']:.2f} | "
                         f"{s['neighborhood_acc']:.2f} | {s['rewrite_nll']:.2f} | {t['per_edit_s']:.2f} | {first} |")
        lines.append(f"| {method} | speed-up (EasyEdit / lifelong) | | | | | | | "
                     f"{c['speedup_easyedit_over_lifelong']['per_edit']:.2f}x | |")
    pre = next(iter(result["comparison"].values()))["lifelong"]["pre_scores"]
    lines.append(f"| - | unedited model | {pre['rewrite_success']:.2f} | {pre['rewrite_acc']:.2f} | "
                 f"{pre['paraphrase_success']:.2f} | {pre['neighborhood_success']:.2f} | "
                 f"{pre['neighborhood_acc']:.2f} | {pre['rewrite_nll']:.2f} | | |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
