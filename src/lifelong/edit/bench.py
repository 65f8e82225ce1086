"""`lifelong bench edit`: every editor under the single-edit protocol, the lifelong T-sweep and, with
`batch_sizes`, the batch protocol (B edits written in one update, for editors with `batch = True`).

First the unedited model f_0 on the same requests (the pre-edit rows, method "unedited"). Then for each
method: the single-edit protocol on `single_n` requests, then the lifelong protocol for each T in `T`
(each from f_0), all on the same request set. With `generation` (the default), every row also has the
greedy-generation metrics (`_gen_exact`, `_gen_contains`, `locality_gen`), decoded after the model's
chat template when `chat` and the tokenizer has one. A method whose next T would exceed
`time_budget_s` (estimated from its measured time per edit) stops there: the table records the largest
T it ran and its time per edit; a T whose edits run past twice the budget (editors slow down as edits
accumulate) is stopped and recorded the same way. For each B of `batch_sizes` (e.g. 10, 100, 1000) each
batch editor writes the first B requests in one `apply_batch` from f_0 and is scored on all B (rows with
protocol "batch", their T column = B); a B whose estimated time exceeds the budget is skipped the same
way, and editors without batch editing record why they have no batch rows. Writes results.json (every metric, both conventions, named), summary.md
and metrics_vs_T.png under output_dir/name.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lifelong.atomic import atomic_write_json, atomic_write_text
from lifelong.config import from_dict, read_raw, to_dict
from lifelong.edit import EDITORS, editor_class, editor_params
from lifelong.edit.protocol import OverBudget, batch, lifelong, make_editor, single, unedited
from lifelong.edit.readers import read_counterfact, read_easyedit_counterfact, read_easyedit_zsre, read_knowedit
from lifelong.edit.requests import build_requests, counterfact_requests, load_requests
from lifelong.errors import ConfigError, DataFormatError
from lifelong.families.lm import build_lm
from lifelong.metrics.editing import base_generations, cached_base_predictions
from lifelong.report.pages import write_run_report
from lifelong.runtime import versions

TABLE_METRICS = ("reliability_token", "generality_token", "locality_token", "portability_token",
                 "reliability_cf", "generality_cf", "locality_cf", "reliability_gen_exact", "reliability_gen_contains",
                 "generality_gen_contains", "locality_gen", "fluency_ngram_entropy")
UNEDITED = "unedited"  # the pre-edit rows' name in results.json and the table


@dataclass(frozen=True)
class EditBenchConfig:
    name: str = "edit-bench"
    output_dir: str = "runs"
    model: str = "embedded"              # SmolLM2-135M-Instruct, or a hub id / folder of a causal LM
    split: str = "zsre"                  # "zsre" (insertion, no filter) or "counterfact" (facts f_0 knows)
    requests_file: str = ""              # instead of the split: our JSON, or EasyEdit ZsRE/CounterFact JSON
    methods: tuple[str, ...] = ("ft_l", "ft_m", "lora", "grace", "wise", "rome", "t_patcher", "mend")
    T: tuple[int, ...] = (1, 10, 100, 1000)
    batch_sizes: tuple[int, ...] = ()    # the batch protocol: B edits in one update each, e.g. [10, 100, 1000]
    single_n: int = 20                   # requests edited one at a time (reset in between)
    time_budget_s: float = 900.0         # per method and T: skip a T whose estimated edit time exceeds it
    train_n: int = 200                   # MEND's training requests (the disjoint `train` split)
    seed: int = 0
    generation: bool = True              # also score by greedy generation (exact and contains match)
    chat: bool = True                    # decode after the chat template where the tokenizer has one
    knobs: dict = field(default_factory=dict)  # {method: {knob: value}}, validated by the editor's Params


def load_bench_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> EditBenchConfig:
    config = from_dict(EditBenchConfig, read_raw(path, overrides), "")
    for m in config.methods:
        if m not in EDITORS:
            raise ConfigError(f"methods: {m!r} is not an editor; valid: {', '.join(EDITORS)}")
        editor_params(m, config.knobs.get(m), f"knobs.{m}")
    # knobs of an editor this run leaves out are kept for the runs that list it (a shipped config pins
    # MEND's training; `--methods grace` still uses that config), but a name that is no editor is a typo
    unknown = sorted(set(config.knobs) - set(EDITORS))
    if unknown:
        raise ConfigError(f"knobs for {', '.join(unknown)}, which is not an editor; valid: {', '.join(EDITORS)}")
    if config.split not in ("zsre", "counterfact"):
        raise ConfigError(f"split={config.split!r} is not one of: zsre, counterfact")
    if not config.T or min(config.T) < 1 or config.single_n < 0:
        raise ConfigError(f"T must list positive edit counts (got {list(config.T)}) and single_n must be >= 0")
    if config.batch_sizes and min(config.batch_sizes) < 1:
        raise ConfigError(f"batch_sizes must list positive batch sizes (got {list(config.batch_sizes)})")
    return config


def read_requests_file(path: str | Path) -> list:
    """Our request JSON, EasyEdit's ZsRE JSON (records with `src`), ROME's CounterFact JSON (records with
    `requested_rewrite`), EasyEdit's flat CounterFact (`locality_prompt`) or KnowEdit (`locality` groups),
    told apart by their fields."""


    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: not a readable JSON file ({e})") from e
    if isinstance(data, dict):
        return load_requests(path)
    first = data[0] if isinstance(data, list) and data else {}
    if isinstance(first, dict) and "requested_rewrite" in first:
        return read_counterfact(path)
    if isinstance(first, dict) and "src" in first:
        return read_easyedit_zsre(path)
    if isinstance(first, dict) and "locality_prompt" in first:
        return read_easyedit_counterfact(path)
    if isinstance(first, dict) and isinstance(first.get("locality"), dict):
        return read_knowedit(path)
    raise DataFormatError(f"{path}: neither a lifelong request file nor an EasyEdit ZsRE / CounterFact (ROME's or "
                          "flat) / KnowEdit list of records")


def evaluation_requests(config: EditBenchConfig, model, tokenizer) -> tuple[list, dict]:
    """The evaluated requests (enough for the largest T) and a description of where they came from."""

    need = max(max(config.T), config.single_n, *config.batch_sizes)
    if config.requests_file:
        requests = read_requests_file(config.requests_file)
        source = {"requests_file": config.requests_file}
    elif config.split == "counterfact":
        requests, report = counterfact_requests(model, tokenizer, seed=config.seed)
        source = {"split": "counterfact", "known_by_relation": report,
                  "qualifying": len(requests), "candidates": sum(r["total"] for r in report.values())}
    else:
        requests = build_requests("zsre", n=need, seed=config.seed)
        source = {"split": "zsre"}
    if len(requests) < need:
        print(f"note: {len(requests)} requests available, fewer than the {need} asked for; T is capped at {len(requests)}")
    return requests, {**source, "available": len(requests)}


def run_bench(config: EditBenchConfig) -> Path:

    out = Path(config.output_dir) / config.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    model, tokenizer = build_lm(config.model)
    requests, source = evaluation_requests(config, model, tokenizer)
    evaluated = requests[: max(max(config.T), config.single_n, *config.batch_sizes)]
    base = cached_base_predictions(model, tokenizer, evaluated)
    base_gen = base_generations(model, tokenizer, evaluated, chat=config.chat) if config.generation else None
    train = build_requests("train", n=config.train_n, seed=config.seed)

    results = {"config": to_dict(config), "requests": source, "versions": versions(), "methods": {}}
    done = finished_rows(out / "results.json", config)
    results["methods"][UNEDITED] = done.get(UNEDITED, {}).get("rows") or pre_edit_rows(
        config, model, tokenizer, requests, base, base_gen)
    print(f"== {UNEDITED} (f_0)")
    for row in ([results["methods"][UNEDITED]["single"]] if config.single_n else []) + results["methods"][UNEDITED]["lifelong"]:
        print(f"   {row['protocol']} T={row['T']}: " + _line(row))
    gen = {"base_gen": base_gen, "chat": config.chat}
    for method in config.methods:
        t0 = time.perf_counter()
        editor = make_editor(method, model, tokenizer, config.knobs.get(method), train, log_dir=out / "logs")
        rows = {"prepare_seconds": time.perf_counter() - t0, "params": to_dict(editor.params), "lifelong": [], "skipped": [],
                "batch": []}
        print(f"== {method}")
        earlier = done.get(method, {})
        if config.single_n:
            rows["single"] = earlier.get("single") or single(editor, model, tokenizer, requests[: config.single_n], base,
                                                             **gen)
            print(f"   single (N={config.single_n}): " + _line(rows["single"]))
        per_edit = rows.get("single", {}).get("seconds_per_edit")
        for T in sorted(config.T):
            if T in earlier.get("lifelong", {}):  # measured by an earlier run of this same benchmark
                rows["lifelong"].append(earlier["lifelong"][T])
                per_edit = earlier["lifelong"][T]["seconds_per_edit"]
                print(f"   T={T} (earlier run): " + _line(rows["lifelong"][-1]))
                continue
            if T > len(requests):
                rows["skipped"].append({"T": T, "why": f"only {len(requests)} requests"})
                continue
            if per_edit is not None and per_edit * T > config.time_budget_s:
                rows["skipped"].append({"T": T, "why": f"estimated {per_edit * T:.0f} s of edits > time_budget_s "
                                                       f"{config.time_budget_s:.0f} ({per_edit:.2f} s per edit)"})
                print(f"   T={T}: skipped, {rows['skipped'][-1]['why']}")
                continue
            try:
                # twice the budget: the estimate above comes from fewer, earlier edits
                row = lifelong(editor, model, tokenizer, requests[:T], base, budget_s=2 * config.time_budget_s, **gen)
            except OverBudget as e:
                rows["skipped"].append({"T": T, "why": f"{e} > 2 x time_budget_s", "seconds_per_edit": e.seconds / e.done})
                print(f"   T={T}: {rows['skipped'][-1]['why']}")
                per_edit = e.seconds / e.done
                continue
            per_edit = row["seconds_per_edit"]
            rows["lifelong"].append(row)
            print(f"   T={T}: " + _line(row))
            atomic_write_json(out / "results.json", {**results, "methods": {**results["methods"], method: rows}})
        run_batches(config, editor, model, tokenizer, requests, base, gen, rows, earlier,
                    per_edit=rows.get("single", {}).get("seconds_per_edit"),
                    save=lambda: atomic_write_json(out / "results.json", {**results, "methods": {**results["methods"], method: rows}}))
        results["methods"][method] = rows
        atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "summary.md", summary(results))
    plot_vs_T(results, out / "metrics_vs_T.png")
    print(summary(results))
    write_run_report(out)
    print(f"wrote {out}/ (results.json, summary.md, metrics_vs_T.png, report.html)")
    print(f"report: {out / 'report.html'}")
    return out


def run_batches(config: EditBenchConfig, editor, model, tokenizer, requests: list, base: dict, gen: dict, rows: dict,
                earlier: dict, per_edit: float | None, save) -> None:
    """The batch protocol for each B of `config.batch_sizes` into rows["batch"] (skips into rows["skipped"])."""
    if not config.batch_sizes:
        return
    if not editor_class(editor.name).batch:
        rows["skipped"].append({"protocol": "batch", "T": "B", "why": f"{editor.name} has no batch editing"})
        print(f"   batch: skipped, {rows['skipped'][-1]['why']}")
        return
    for B in sorted(config.batch_sizes):
        if B in earlier.get("batch", {}):
            rows["batch"].append(earlier["batch"][B])
            per_edit = earlier["batch"][B]["seconds_per_edit"]
            print(f"   B={B} (earlier run): " + _line(rows["batch"][-1]))
            continue
        if B > len(requests):
            rows["skipped"].append({"protocol": "batch", "T": B, "why": f"only {len(requests)} requests"})
            continue
        if per_edit is not None and per_edit * B > config.time_budget_s:
            rows["skipped"].append({"protocol": "batch", "T": B, "why": f"estimated {per_edit * B:.0f} s of edits > "
                                    f"time_budget_s {config.time_budget_s:.0f} ({per_edit:.2f} s per edit)"})
            print(f"   B={B}: skipped, {rows['skipped'][-1]['why']}")
            continue
        row = batch(editor, model, tokenizer, requests[:B], base, **gen)
        per_edit = row["seconds_per_edit"]
        rows["batch"].append(row)
        print(f"   B={B}: " + _line(row))
        save()


def pre_edit_rows(config: EditBenchConfig, model, tokenizer, requests: list, base: dict, base_gen: dict | None) -> dict:
    """f_0 on the single-edit requests and on the first T requests of each T (no edit, no time)."""
    kw = {"base_gen": base_gen, "chat": config.chat}
    rows = {"prepare_seconds": 0.0, "params": {}, "skipped": [],
            "lifelong": [unedited(model, tokenizer, requests[:T], base, **kw)
                         for T in sorted(set(config.T) | set(config.batch_sizes)) if T <= len(requests)]}
    if config.single_n:
        rows["single"] = {**unedited(model, tokenizer, requests[: config.single_n], base, with_fluency=False, **kw),
                          "protocol": "pre-edit (single requests)", "n_requests": config.single_n}
    return rows


def finished_rows(path: Path, config: EditBenchConfig) -> dict:
    """What an earlier run of the same benchmark (same config but for methods, T and the time budget)
    already measured: {method: {"single": row, "lifelong": {T: row}}}. Rerunning the command with a
    larger budget or more T continues the sweep instead of starting over; skipped T are retried."""

    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except ValueError:
        return {}
    free = ("methods", "T", "batch_sizes", "time_budget_s", "knobs")
    same = {k: v for k, v in to_dict(config).items() if k not in free}
    if {k: v for k, v in earlier.get("config", {}).items() if k not in free} != same:
        return {}
    done = {}
    if (UNEDITED in earlier.get("methods", {}) and list(earlier["config"].get("T", ())) == list(config.T)
            and list(earlier["config"].get("batch_sizes", ())) == list(config.batch_sizes)):
        done[UNEDITED] = {"rows": earlier["methods"][UNEDITED]}
    for method, rows in earlier.get("methods", {}).items():
        if method == UNEDITED:
            continue
        if earlier["config"].get("knobs", {}).get(method) != config.knobs.get(method):
            continue  # other knobs: other numbers
        done[method] = {"single": rows.get("single"), "lifelong": {r["T"]: r for r in rows.get("lifelong", [])},
                        "batch": {r["T"]: r for r in rows.get("batch", [])}}
    return done


def _line(row: dict) -> str:
    f = lambda k: "-" if row.get(k) is None else f"{row[k]:.2f}"  # noqa: E731
    return (f"rel {f('reliability_token')}  gen {f('generality_token')}  loc {f('locality_token')}  "
            f"port {f('portability_token')}  rel-gen {f('reliability_gen_exact')}/{f('reliability_gen_contains')}  "
            f"loc-gen {f('locality_gen')}  ({row['seconds_per_edit']:.2f} s/edit)")


def summary(results: dict) -> str:
    """The table: one row per method and protocol/T; metrics in [0, 1] (fluency in bits)."""
    heads = ["method", "protocol", "T or B", *TABLE_METRICS, "s/edit", "peak RSS (MiB)"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for method, rows in results["methods"].items():
        for row in ([rows["single"]] if "single" in rows else []) + rows["lifelong"] + rows.get("batch", []):
            cells = [method, row["protocol"], str(row["T"])]
            cells += ["-" if row.get(k) is None else f"{row[k]:.2f}" for k in TABLE_METRICS]
            cells += [f"{row['seconds_per_edit']:.2f}", f"{row['peak_rss_mb']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        for skip in rows["skipped"]:
            lines.append(f"| {method} | {skip.get('protocol', 'lifelong')} | {skip['T']} | skipped: {skip['why']} |"
                         + " |" * (len(heads) - 4))
    names = {"reliability": "Rel", "generality": "Gen", "locality": "Loc", "portability": "Port"}
    legend = ", ".join(f"{v} = {k}" for k, v in names.items())
    return ("Knowledge editing: `_token` = EasyEdit token-level teacher-forced accuracy, `_cf` = CounterFact "
            "probability comparison, `_gen_exact` / `_gen_contains` = greedy generation starts with / contains the "
            "target, `locality_gen` = greedy generation unchanged from f_0; fluency = ROME's n-gram entropy; "
            "protocol `lifelong`: T edits in sequence, `batch`: B edits in one update, all judged on the final model; "
            f"`unedited` = f_0 on the same requests. {legend}.\n\n" + "\n".join(lines) + "\n")


def plot_vs_T(results: dict, path: Path) -> None:
    import matplotlib  # matplotlib is imported only when a figure is drawn (slow to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib is imported only when a figure is drawn (slow to import)

    metrics = ("reliability_token", "generality_token", "locality_token", "portability_token")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), sharey=True)
    for ax, metric in zip(axes, metrics):
        for method, rows in results["methods"].items():
            points = [(r["T"], r[metric]) for r in rows["lifelong"] if r.get(metric) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("T (sequential edits)")
        ax.set_title(metric.replace("_token", " (token)"))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score on the final model")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
