"""What `lifelong log` and `lifelong show` print, and the ledger's HTML report.

The interference matrix has one row per state of the model (the base, then after each change) and one
column per probe: the score after that change, and how much the change moved it. A probe registered
by a later change has no score in the rows before it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lifelong.atomic import atomic_write_text
from lifelong.ledger.core import Ledger
from lifelong.ledger.probes import load_probe_samples, samples_path
from lifelong.report import site
from lifelong.report.pages import Page
from lifelong.report.table import format_table

LOG_COLUMNS = [
    ("id", "change", "d"),
    ("kind", "kind", ""),
    ("label", "method", ""),
    ("data", "data", ""),
    ("own", "own task before -> after", ""),
    ("others", "other probes (mean) before -> after", ""),
    ("seconds", "time (s)", ".1f"),
    ("peak_rss_mb", "peak RSS (MiB)", ".0f"),
    ("trainable_params", "trainable params", ","),
    ("patch_bytes", "patch bytes", ","),
]


def log_rows(ledger: Ledger) -> list[dict]:
    apart = {p.name for p in ledger.probes if getattr(p, "kind", "") == "frechet"}  # another unit: not averaged
    rows = []
    for c in ledger.changes:
        own = c["data"]["task"] if c["kind"] in ("learn", "erase") else c["data"]["probe"] if c["kind"] == "adapt" \
            else None
        before, after = c["probes_before"], c["probes_after"]
        others = [p for p in after if p != own and p in before and p not in apart]
        if "own_before" in c:  # an lm ledger's change: its own requests' reliability, or its task's score (%)
            key = "score" if "score" in c["own_before"] else "reliability_token"
            own_arrow = _arrow(*(100 * c[k][key] for k in ("own_before", "own_after")))
        else:
            own_arrow = _arrow(before.get(own), after.get(own)) if own else ""
        rows.append({
            "id": c["id"],
            "kind": c["kind"] + (f" ({c['strategy']})" if c["kind"] == "revert" else ""),
            "label": c["label"],
            "data": f"undo {c['reverts']}" if c["kind"] == "revert" else c["data"]["task"],
            "own": own_arrow,
            "others": _arrow(np.mean([before[p] for p in others]), np.mean([after[p] for p in others])) if others else "",
            "seconds": c["cost"]["wall_seconds"],
            "peak_rss_mb": c["cost"]["peak_rss_mb"],
            "trainable_params": c["cost"]["trainable_params"],
            # a module editor's change (GRACE, T-Patcher) stores its module's state instead of a weight patch
            "patch_bytes": c["cost"]["state_bytes" if _module_change(c) else "patch_bytes"],
        })
    return rows


def _module_change(c: dict) -> bool:
    """A change whose model part is its module's state (GRACE, T-Patcher, WISE, a LLaMA-Adapter), not a patch."""
    if c["kind"] == "adapt":
        return c["adapter"]["records"] == "module"
    return c["kind"] == "edit" and bool(c.get("method_states"))


def change_title(c: dict) -> str:
    if c["kind"] == "revert":
        return f"{c['id']} revert {c['reverts']}"
    return f"{c['id']} {c['label']} on {c['data']['task']}"


def _arrow(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:5.1f} -> {after:5.1f} ({after - before:+.1f})"


def interference_matrix(ledger: Ledger) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(row labels, probe names, scores (rows x probes), deltas (change rows x probes)); NaN = not measured."""
    probes = [p.name for p in ledger.probes]
    rows = ["base"] + [change_title(c) for c in ledger.changes]
    scores = np.full((len(rows), len(probes)), np.nan)
    deltas = np.full((len(rows), len(probes)), np.nan)
    for j, name in enumerate(probes):
        if name in ledger.manifest["baseline"]:
            scores[0, j] = ledger.manifest["baseline"][name]
    for i, c in enumerate(ledger.changes, start=1):
        for j, name in enumerate(probes):
            if name in c["probes_after"]:
                scores[i, j] = c["probes_after"][name]
                if name in c["probes_before"]:
                    deltas[i, j] = c["probes_after"][name] - c["probes_before"][name]
    return rows, probes, scores, deltas


def format_matrix(ledger: Ledger, markdown: bool = False) -> str:
    rows, probes, scores, deltas = interference_matrix(ledger)
    table = []
    for i, label in enumerate(rows):
        row = {"state": label}
        for j, name in enumerate(probes):
            s, d = scores[i, j], deltas[i, j]
            row[name] = "-" if np.isnan(s) else (f"{s:.1f}" if np.isnan(d) else f"{s:.1f} ({d:+.1f})")
        table.append(row)
    columns = [("state", "after change", "")] + [(name, name, "") for name in probes]
    return format_table(table, columns, markdown=markdown)


def format_log(ledger: Ledger, markdown: bool = False) -> str:
    base = ledger.manifest["base"]
    head = (f"ledger {ledger.root}: {ledger.manifest['family']} model {base['name']!r} "
            f"(base SHA-256 {base['sha256'][:12]}), {len(ledger.changes)} change(s), {len(ledger.probes)} probe(s)")
    kind = ledger.family_spec.probe_kind
    if not ledger.changes:
        how = {"facts": "`lifelong edit --ledger DIR --method ft_l --prompt ... --target ...` or "
                        "`lifelong adapt DIR --task TASK --method llama-adapter`",
               "images-generated": "`lifelong erase DIR --concept CONCEPT`"}.get(kind, "`lifelong learn DIR --task SOURCE`")
        return head + f"\nno changes yet: {how} adds one"
    note = {"facts": "(scores: token-level accuracy %, EasyEdit convention; `own task`: reliability on the change's own "
                     "edit requests, or an adapt change's task metric on its held-out items (a revert: the reverted "
                     "change's); other probes: the edits in effect before the change, agreement with the base model on "
                     "held-out facts, and the instruction tasks of adapt changes, each by its own metric %)",
            "images-generated": "(probe scores: judge rate %, the share of seeded samples in which the judge sees the "
                                "prompted concept; `own task`: the erased concept's; other probes: the mean judge rate of "
                                "the other concepts; judge-FD, not averaged: `lifelong log --matrix`)",
            }.get(kind, "(probe scores: top-1 accuracy %; `own task`: the probe of the change's own task)")
    return head + "\n" + format_table(log_rows(ledger), LOG_COLUMNS, markdown=markdown) + "\n" + note


def format_change(ledger: Ledger, n: int) -> str:
    c = ledger.change(n)
    what = f"of change {c['reverts']} ({c['strategy']})" if c["kind"] == "revert" else f"{c['label']} on {c['data']['task']}"
    lines = [f"change {c['id']}: {c['kind']} {what}  ({c['created']})"]
    if c["kind"] == "edit":
        lines.append(f"  method     {c['method']} {json.dumps(c['knobs'])}")
        for r in c["requests"]:
            lines.append(f"  request    {r['prompt']!r} -> {r['target_new']!r}"
                         + (f" (+{len(r['paraphrases'])} paraphrases)" if r["paraphrases"] else "")
                         + (f" (+{len(r['locality'])} locality)" if r["locality"] else ""))
    elif c["kind"] == "erase":
        r = c["request"]
        lines.append(f"  method     {c['method']} {json.dumps(c['knobs'])}  seed {c['seed']}")
        lines.append(f"  concept    {r['concept']!r}: judged as {', '.join(r['judged']) or '- (--no-judge)'}")
        lines.append(f"  prompts    {', '.join(map(repr, r['prompts']))}")
        lines.append(f"  anchor     {r['anchor']!r}" + (f"; preserved {', '.join(map(repr, r['preserve']))}"
                                                      if r["preserve"] else ""))
        lines.append("  stats      " + ", ".join(f"{k} {v:.4g}" for k, v in c["stats"].items()))
    elif c["kind"] == "personalize":
        r = c["request"]
        lines.append(f"  method     {c['method']} {json.dumps(c['knobs'])}  seed {c['seed']}")
        lines.append(f"  subject    {r['token']!r} (class {r['class_word'] or '-'!r}): {r['n_images']} images, pixels "
                     f"sha256 {r['images_sha256'][:12]}" + (f"; {'; '.join(r['notes'])}" if r["notes"] else ""))
        lines.append(f"  prompts    {r['instance_prompt']!r}; class {r['class_prompt']!r}")
        lines.append(f"  tokens     {', '.join(c['tokens']) or '- (none added: the identifier is text in the prompt)'}")
        lines.append("  stats      " + ", ".join(f"{k} {v:.4g}" for k, v in c["stats"].items()))
    elif c["kind"] == "adapt":
        d, spec, settings = c["data"], c["knobs"]["spec"], c["knobs"]["settings"]
        knobs = {k: spec[k] for k in (("adapter_len", "adapter_layers") if c["method"] == "llama-adapter"
                                      else ("rank", "alpha", "target_modules"))}
        lines.append(f"  method     {c['method']} {json.dumps(knobs)}"
                     + (f", continuing change {c['adapter']['continues']}" if c["adapter"]["continues"] else ""))
        lines.append(f"  train      {json.dumps(settings)}")
        lines.append(f"  task       {d['task']}: {d['items']} training examples; probe {d['probe']!r} ({d['eval_items']} "
                     "held-out test items)")
        lines.append(f"  loss       {c['loss_first']:.4f} -> {c['loss_last']:.4f} (mean of the first / last steps)")
    elif c["kind"] == "learn":
        spec = c["spec"]
        lines.append(f"  task       {c['data']['task']} ({c['data']['source']}, {c['data']['train_items']} training images, "
                     f"classes {', '.join(c['data']['classes'])})")
        lines.append(f"  method     {spec['method']['name']} {json.dumps(spec['method']['params'])}")
        lines.append(f"  adapter    {json.dumps(spec['adapter'])}")
        lines.append(f"  train      {json.dumps(spec['train'])}  seed {spec['seed']}")
        lines.append(f"  final loss {c['final_loss']:.4f}" if c.get("final_loss") is not None else "")
    else:
        lines.append(f"  reverts    change {c['reverts']} by {c['strategy']}"
                     + (f" (replayed {', '.join(map(str, c['replayed']))})" if c["replayed"] else ""))
        if "exact" in c:
            lines.append(f"  exact      {'yes' if c['exact'] else 'no: later edits in effect were made on top of it'}")
    cost = c["cost"]
    spent = (f"{cost['prepare_seconds']:.1f} s preparing the editor, {cost['edit_seconds']:.1f} s editing"
             if c["kind"] == "edit" else f"{cost['train_seconds']:.1f} s {'erasing' if c['kind'] == 'erase' else 'training'}")
    module = _module_change(c)  # a module editor (GRACE, T-Patcher) or a LLaMA-Adapter: its state
    changed = "trainable params" if c["kind"] != "edit" else "numbers in its module's state" if module else \
        "numbers in the patch"
    stored = f"state {cost['state_bytes']:,} bytes" if module else f"patch {cost['patch_bytes']:,} bytes"
    lines.append(f"  cost       {cost['wall_seconds']:.1f} s wall ({spent}), peak RSS "
                 f"{cost['peak_rss_mb']:.0f} MiB, {cost['trainable_params']:,} {changed}, {stored}")
    if "own_before" in c and "score" in c["own_before"]:  # an adapt change, or its revert: the task's metric
        own = c["own_before"]
        whose = "its task" if c["kind"] == "adapt" else f"change {c['reverts']}'s task"
        lines.append(f"  scores     on {whose}, {own['task']}: {own['metric']} on {own['n']} held-out items (%), "
                     f"before -> after")
        lines.append(f"    {own['metric']:24s} {_arrow(100 * own['score'], 100 * c['own_after']['score'])}")
    elif "own_before" in c:
        whose = "its own requests" if c["kind"] == "edit" else f"change {c['reverts']}'s requests"
        lines.append(f"  scores     on {whose} (token-level %, EasyEdit), before -> after")
        for key, after in c["own_after"].items():
            before = c["own_before"].get(key)
            if isinstance(after, float) and isinstance(before, float):
                lines.append(f"    {key:24s} {_arrow(100 * before, 100 * after)}")
    lines.append("  probes     before -> after")
    for name, after in c["probes_after"].items():
        before = c["probes_before"].get(name)
        lines.append(f"    {name:24s} {_arrow(before, after)}")
    lines.append("  files")
    for entry in c["files"]:
        lines.append(f"    {entry['path']}  {entry['bytes']:,} bytes  sha256 {entry['sha256']}")
    return "\n".join(line for line in lines if line)


def ledger_page(ledger: Ledger, name: str = "") -> Page:
    """The ledger's page: its history with each change's cost, the interference matrix as a heatmap (each cell's
    score before -> after in its tooltip), and for a diffusion ledger each concept probe's samples after every
    change beside the base model's."""
    rows, probes, scores, deltas = interference_matrix(ledger)
    titles = np.full(scores.shape, "", dtype=object)
    for i, c in enumerate(ledger.changes, start=1):
        for j, probe in enumerate(probes):
            before, after = c["probes_before"].get(probe), c["probes_after"].get(probe)
            if before is not None and after is not None:
                titles[i, j] = f"{probe}: {before:.2f} -> {after:.2f} (change {c['id']})"
    base = ledger.manifest["base"]
    unit = ledger.family_spec.score_unit
    sections = [
        site.section("History", site.table(log_rows(ledger), LOG_COLUMNS, table_id="history"),
                     note=f"{ledger.manifest['family']} model {base['name']!r} (base SHA-256 {base['sha256'][:12]}); "
                          "every change with its own task's score before -> after, the other probes' mean, and its cost."),
        site.section("Interference matrix", site.heatmap(rows, probes, scores, deltas=deltas, titles=titles,
                                                         table_id="interference"),
                     note=f"Scores: {unit}. Each cell: a probe's score after the change of its row, in brackets how "
                          "much that change moved it; blue up, red down, as deep as the largest move of the column. Hover a cell "
                          "for before -> after."),
    ]
    if ledger.family_spec.probe_kind == "images-generated":
        sections.append(_samples_section(ledger))
    last = ledger.changes[-1] if ledger.changes else None
    key = (f"{ledger.manifest['family']} model {base['name']}; {len(ledger.changes)} change(s)"
           + (f", last: {change_title(last)}" if last else ""))
    return Page(name or ledger.root.name, f"ledger {ledger.root.name}", "ledger", key, sections)


def _samples_section(ledger: Ledger) -> str:
    """Per change (and the base), each concept probe's first samples beside the base model's."""
    base = load_probe_samples(samples_path(ledger.root, None))
    parts = []
    states = [(None, "base")] + [(c["id"], change_title(c)) for c in ledger.changes]
    for n, title in states:
        samples = base if n is None else load_probe_samples(samples_path(ledger.root, n))
        if not samples:
            parts.append(f"<h3>{site.esc(title)}</h3><p class=\"note\">no samples kept (made before the ledger kept them)</p>")
            continue
        head = "<tr><th>probe</th><th>base model</th>" + ("" if n is None else f"<th>after change {n}</th>") + "</tr>"
        body = []
        for probe, images in samples.items():
            before = base.get(probe)
            cells = [site.strip(before, f"{probe}, base") if before is not None else "-"]
            if n is not None:
                cells.append(site.strip(images, f"{probe}, after change {n}"))
            body.append(f"<tr><th>{site.esc(probe)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append(f"<h3>{site.esc(title)}</h3><table class=\"samples\">{head}{''.join(body)}</table>")
    return site.section("Samples", *parts, note="The first seeded samples of every concept probe (the same noise "
                                                "in every row), drawn twice their size.")


def write_report(ledger: Ledger) -> Path:
    """DIR/report.html: the ledger's page on its own (a view derived from the history, not part of it)."""
    return atomic_write_text(ledger.root / "report.html", ledger_page(ledger).html(index=None))
