"""The Python API: the functions the `lifelong` command calls, for notebooks and scripts.

    import lifelong

    ledger = lifelong.init("my-model")                                # the embedded CLIP-style model, zero-shot probes
    lifelong.learn("my-model", "mnist", method="lwf", options={"invert": True}, overrides=["train.steps_per_task=50"])
    print(lifelong.log("my-model", matrix=True))                       # every change, the interference matrix
    lifelong.revert("my-model", 1)
    lifelong.export("my-model", "exported/")

    lm = lifelong.init("my-lm", family="lm")                          # SmolLM2-135M-Instruct
    lifelong.edit(lifelong.EditRequest("The capital of France is", " Lyon", "France"), method="grace", ledger="my-lm")
    lifelong.adapt("my-lm", "bbc-topic", method="llama-adapter", steps=60)   # an instruction-tuning adapter
    lifelong.export_peft("my-lm", "topic-adapter/")                     # that adapter as a peft folder
    print(lifelong.chat("What is the capital of Peru?", ledger="my-lm"))

    lifelong.run("configs/demo.yaml", ["train.steps_per_task=50"])   # a whole stream, every method, one table

    images, grid = lifelong.generate("a photo of a sneaker", n=16, seed=0)   # the embedded text-to-image model

Every function raises a `lifelong.errors.LifelongError` subclass for input a user can fix (the CLI prints
it and exits with code 2); nothing here prints except the drivers' progress bars and tables.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from lifelong.adapt.chat import answer, check_vision_request, load_adapter
from lifelong.adapt.seeing import answer_about_image
from lifelong.atomic import atomic_write_bytes, atomic_write_text
from lifelong.config import ModelConfig, RunConfig, apply_override
from lifelong.data.edit_requests import EditRequest, Probe
from lifelong.edit import check_batch, editor_params
from lifelong.edit.protocol import apply_all, evaluate, make_editor
from lifelong.errors import ConfigError, LedgerCorruptError
from lifelong.families import get_family, ledger_families
from lifelong.families.diffusion import DEFAULT_ETA, check_sampling
from lifelong.learn.driver import check_adapters, load_run_config, run_experiment
from lifelong.learn.jobs import run_jobs
from lifelong.ledger import adapters, changes, edits, erasures, personal, views
from lifelong.ledger.core import Ledger
from lifelong.ledger.probes import DEFAULT_PROBES, run_probes, unique_name
from lifelong.ledger.probes import Probe as ImageProbe
from lifelong.ledger.runs import run_into_ledgers
from lifelong.metrics.editing import base_generations, base_predictions
from lifelong.metrics.editing import generate as greedy_answers
from lifelong.report import pages as report_pages
from lifelong.report import site

__all__ = ["EditRequest", "Ledger", "Probe", "adapt", "chat", "edit", "erase", "export", "export_peft", "generate", "init",
           "learn", "load_run_config", "log", "ledger_report", "open_ledger", "report", "resume", "revert", "run", "show",
           "verify"]


def run(config: str | Path | RunConfig | None, overrides: Sequence[str] = (), ledger: str | Path | None = None,
        finished: bool = False, jobs: int = 1) -> Path:
    """Train every method of a run config over its stream; returns runs/<name>/ (results.json, report.html, ...).

    With `ledger`, every task of every method is recorded as a change of the ledger `ledger/<method>`. With
    `finished`, nothing trains: the results are written from the rows a stopped run already measured (the methods
    with every task order finished). `jobs` > 1: that many worker processes train the rows at once, each with
    cores/jobs threads (lifelong.learn.jobs)."""
    cfg = config if isinstance(config, RunConfig) else load_run_config(config, list(overrides))
    if jobs != 1 and (ledger is not None or finished):
        raise ConfigError("--jobs trains a run's rows in worker processes; it does not combine with "
                          + ("--ledger" if ledger is not None else "--finished (which trains nothing)"))
    if ledger is not None:
        return run_into_ledgers(cfg, Path(ledger))
    if jobs != 1:
        return run_jobs(cfg, jobs)
    return run_experiment(cfg, finished_only=finished)


def init(root: str | Path, family: str = "vlm", model: str = "embedded", *, probes: Sequence[str | dict] | None = None,
         probe_items: int | None = None, resolution: int = 112, trainable_blocks: int = 3,
         weights: str | Path | None = None, trust_pickle: bool = False) -> Ledger:
    """A new ledger of `model` with its base scored on the family's probes.

    Image families: `probes` are data sources ("mnist", or {"source": "mnist", "options": {...}}; default the
    five mtil-mini test sets), `probe_items` test images each (500). lm: the edits in effect and
    `probe_items` held-out facts (50). diffusion: `probes` are concepts the judge knows ("object/sneaker";
    default probes.DEFAULT_CONCEPTS), `probe_items` seeded samples each (16), and the judge-FD."""
    if family not in ledger_families():
        raise ConfigError(f"--family {family!r} is not a family a ledger holds; valid: {', '.join(ledger_families())}")
    spec = get_family(family)
    weights = Path(weights) if weights is not None else None
    if spec.probe_kind == "facts":
        if probes:
            raise ConfigError(f"--probe names image test sets; a {family} ledger's probes are the edits in effect "
                              "and --probe-items held-out facts")
        return edits.create_lm_ledger(root, model, heldout_items=probe_items or 50, weights=weights,
                                      trust_pickle=trust_pickle)
    if spec.probe_kind == "images-generated":
        if weights is not None:
            raise ConfigError("--weights: a diffusion ledger's base is a model name (--model: embedded, a "
                              "train_t2i.py .safetensors file, a pipeline folder)")
        return erasures.create_diffusion_ledger(root, model, concepts=probes, n=probe_items or 16)
    suite, taken = [], set()
    for raw in probes or DEFAULT_PROBES:
        raw = parse_probe(raw) if isinstance(raw, str) else raw
        name = unique_name(raw["source"], taken)
        taken.add(name)
        suite.append(ImageProbe(name=name, source=raw["source"], options=dict(raw.get("options", {})),
                                test_items=probe_items or 500))
    for probe in suite:  # a bad source or option fails before anything is written
        probe.dataset()
    config = ModelConfig(family=family, name=model, resolution=resolution, trainable_blocks=trainable_blocks)
    spec.validate(config, ())
    ledger = Ledger.create(root, config, suite, weights=weights, trust_pickle=trust_pickle)
    ledger.record_baseline(run_probes(ledger.materialize(), ledger.probes))
    return ledger


def parse_probe(text: str) -> dict:
    """"SOURCE[:key=value,...]" (values parsed as YAML) -> {"source", "options"}."""
    source, _, rest = text.partition(":")
    items = [item.strip() for item in rest.split(",") if item.strip()]
    if any("=" not in item for item in items):
        raise ConfigError(f"--probe {text!r}: options look like SOURCE:key=value,key=value")
    return {"source": source.strip(), "options": parse_options(items)}


def open_ledger(root: str | Path) -> Ledger:
    return Ledger.open(root)


def learn(root: str | Path, task: str, *, method: str | None = None, options: dict | None = None, name: str | None = None,
          train_items: int | None = None, test_items: int = 500, config: str | Path | None = None,
          overrides: Sequence[str] = (), checkpoint_every: int = 10) -> int:
    """One learn change: `method` trained on the data source `task` on top of the ledger's current model,
    probed before and after; returns the change's id. `overrides`: train.*, adapter.*, methods.*, seed."""
    fixed = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in ("model", "stream")]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)}: a ledger's model is fixed at `lifelong init` and a change's data is "
                          "given by --task/--option; override train.*, adapter.*, methods.*, seed")
    # the method first, so that knobs given as methods.0.KEY=VALUE apply to it (not to a default replaced after)
    overrides = ([f"methods=[{method}]"] if method else []) + list(overrides)
    cfg = load_run_config(config, ["stream.name=tiny"] + overrides)  # the stream section is unused here
    check_adapters(cfg, Ledger.open(root).model_config)
    spec = {"source": task, "options": dict(options or {}), "name": name, "train_items": train_items,
            "test_items": test_items}
    return changes.learn(root, changes.learn_spec(cfg, spec, checkpoint_every))


def parse_options(items: Sequence[str]) -> dict:
    """["key=value", ...] (values parsed as YAML) -> a dict."""
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--option {item!r} must look like KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value)
    return options


def parse_knobs(items: Sequence[str]) -> dict:
    """["steps=30", "layer=20", ...] -> the knob dict (values parsed as YAML)."""
    knobs: dict = {}
    for item in items:
        apply_override(knobs, item)
    return knobs


def edit(requests: EditRequest | Sequence[EditRequest], method: str = "wise", *, model: str | None = None,
         ledger: str | Path | None = None, knobs: dict | None = None, batch: bool = False) -> dict:
    """Apply edit requests in order with `method` (`batch`: all in one update, for editors with batch editing:
    ft_l, ft_m, lora, mend, memit, alphaedit).

    With `ledger`: the edits become one change of that lm ledger; returns {"change": id}. Without: on
    `model` (default: the embedded SmolLM2), returning the greedy answers before and after and the editing
    metrics, teacher-forced and by greedy generation after the chat template (`*_gen_*`, `locality_gen`):
    {"answers": [(prompt, before, after)], "scores": {...}, "cost": {...}}."""
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not requests:
        raise ConfigError("an edit needs at least one request")
    if batch:
        check_batch(method)
    if ledger is not None:
        if model is not None:
            raise ConfigError(f"--model: a ledger's model is fixed at `lifelong init` (see `lifelong log {ledger}`)")
        return {"change": edits.edit(ledger, method, requests, knobs, batch=batch)}
    editor_params(method, knobs)  # an unknown editor or a bad knob fails before the model loads
    lm, tokenizer = get_family("lm").build(ModelConfig(family="lm", name=model or "embedded"))
    requests = edits.with_answers(lm, tokenizer, requests)
    prompts = [p for r in requests for p in (r.prompt, *r.paraphrases, *(q.prompt for q in r.locality))]
    before = greedy_answers(lm, tokenizer, prompts, max_new_tokens=8)
    base = base_predictions(lm, tokenizer, requests)
    base_gen = base_generations(lm, tokenizer, requests, chat=True)
    editor = make_editor(method, lm, tokenizer, knobs)
    cost = apply_all(editor, requests, desc=method, batch=batch)
    after = greedy_answers(lm, tokenizer, prompts, max_new_tokens=8)
    return {"answers": list(zip(prompts, before, after)),
            "scores": evaluate(lm, tokenizer, requests, base, base_gen, chat=True), "cost": cost}


def adapt(root: str | Path, task: str, method: str = "llama-adapter", *, steps: int = 100, lr: float | None = None,
          batch_size: int = 8, items: int | None = None, eval_items: int = adapters.EVAL_ITEMS, seed: int = 0,
          warn=None) -> int:
    """One adapt change of the lm ledger `root`: a `method` adapter (llama-adapter, lora) trained for `steps` steps
    on the instruction task `task` (data.instructions.TASKS; `items` training examples, default all) on top of its
    current model; the task's held-out items (`eval_items`) become a probe. Returns the change's id. `lr` None:
    the method's default (adapt.instruct.DEFAULT_LR). `warn(message)` gets the warnings (prompts cut to the
    model's context)."""
    return adapters.adapt(root, task, method, steps=steps, lr=lr, batch_size=batch_size, items=items,
                          eval_items=eval_items, seed=seed, warn=warn)


def export_peft(root: str | Path, out: str | Path, change: int | None = None) -> tuple[Path, int]:
    """The adapter of adapt change `change` (default: the latest in effect) of the lm ledger `root` as a peft folder
    `out`; returns (out, the change's id). `PeftModel.from_pretrained(model, out)` loads it onto the ledger's
    model before that change."""
    return adapters.export_peft(root, out, change)


def chat(prompt: str, model: str | None = None, *, ledger: str | Path | None = None, adapter: str | Path | None = None,
         max_new_tokens: int = 128, image: str | Path | None = None, warn=None) -> str:
    """The greedy answer of a causal LM to `prompt` (through its chat template when it has one): `model` (default
    the embedded SmolLM2-135M-Instruct), or the current model of the lm ledger `ledger`, with the peft adapter
    folder `adapter` on it when given (refused when built for another model). A prompt longer than the model's
    context keeps its last tokens (`warn(message)` says so). `image`: a picture to ask about, which needs `adapter` to
    be a vision module file (adapt/seeing.py: a multimodal adapter or a bridge, trained on this model)."""
    vision = check_vision_request(image, adapter)
    if ledger is not None and model is not None:
        raise ConfigError(f"--model: a ledger's model is fixed at `lifelong init` (see `lifelong log {ledger}`); give "
                          "--model or --ledger")
    if ledger is not None:
        book = Ledger.open(ledger)
        book.require_operation("adapt")
        lm, tokenizer = book.materialize_with_tokenizer()
        name = f"the current model of ledger {ledger}"
    else:
        name = model or "embedded"
        lm, tokenizer = get_family("lm").build(ModelConfig(family="lm", name=name))
    if vision:
        return answer_about_image(lm, tokenizer, adapter, image, prompt, name, max_new_tokens, warn=warn)
    if adapter is not None:
        lm = load_adapter(lm, adapter, name)
    return answer(lm, tokenizer, prompt, max_new_tokens, warn=warn)


def erase(root: str | Path, concept: str, method: str = "esd-x", *, anchor: str | None = None,
          preserve: Sequence[str] | None = None, knobs: dict | None = None, seed: int = 0, judge: bool = True,
          nsfw: bool = False) -> int:
    """One erase change of the diffusion ledger `root`: `method` (esd-x, esd-u, ac, uce) makes prompts naming
    `concept` stop producing it; returns the change's id. `anchor`: what the concept should give instead
    (default: a generic phrase of its kind; ESD ignores it); `preserve`: prompts UCE keeps (default: the
    other concepts of its kind and the instance prompts of the personal concepts in effect); `judge=False` erases a concept the judge does not know; `nsfw=True` judges the
    erasure by the NSFW classifier (nudity on a Stable Diffusion model: the ledger's `nsfw` probe)."""
    return erasures.erase(root, concept, method, anchor=anchor, preserve=tuple(preserve) if preserve is not None else None,
                          knobs=knobs, seed=seed, judge=judge, nsfw=nsfw)


def personalize(root: str | Path, images: str | Path, token: str, class_word: str = "", method: str = "ti", *,
                knobs: dict | None = None, seed: int = 0, warn=None) -> int:
    """One personalize change of the diffusion ledger `root`: `method` (ti, dreambooth, dreambooth-lora,
    dreambooth-no-prior, custom-diffusion, mix-of-show) teaches the model the subject of the images in the folder
    `images` under `token` ("<my-style>"; `class_word`: its class, e.g. "letter"); returns the change's id.
    `warn(message)` gets the warnings (an identifier naming a known concept, resized or skipped images)."""
    return personal.personalize(root, images, token, class_word, method, knobs=knobs, seed=seed, warn=warn)


def merge(root: str | Path, changes: Sequence[int], method: str = "custom-diffusion") -> int:
    """One change of the diffusion ledger `root` that merges its personalize changes `changes` with `method`
    (custom-diffusion: the closed-form constrained merge of their cross-attention K/V; mix-of-show: gradient
    fusion of every layer their ED-LoRAs moved; lora-add: the base plus the mean of their LoRA deltas); returns its
    id."""
    return personal.merge(root, list(changes), method)


def generate(prompt: str, n: int = 16, seed: int = 0, steps: int = 25, guidance: float | None = None,
             model: str = "embedded", out: str | Path = "grid.png", ledger: str | Path | None = None,
             eta: float | None = None) -> tuple[np.ndarray, Path]:
    """`n` images of `prompt` from the text-to-image `model` (the diffusion family's names: embedded, a
    train_t2i.py checkpoint, a StableDiffusionPipeline folder or hub id), seeded, `steps` steps of DDIM with
    `eta` (None: DEFAULT_ETA, ancestral) and classifier-free `guidance` (None: the model's own, 3 embedded, 7.5
    Stable Diffusion), or the current model of the diffusion ledger `ledger` (after its erasures): uint8
    (n, H, W, 3), and the path of their grid saved as the PNG `out`. A progress bar follows the denoising steps."""
    eta = DEFAULT_ETA if eta is None else eta
    check_sampling([prompt], n, steps, guidance, eta)  # bad input fails before the model loads
    if ledger is not None:
        book = Ledger.open(ledger)
        book.require_operation("generate")
        pipeline = book.materialize()
    else:
        pipeline, _ = get_family("diffusion").build(ModelConfig(family="diffusion", name=model))
    images = pipeline.sample([prompt], n=n, seed=seed, steps=steps, guidance=guidance, progress=True, eta=eta)
    return images, save_grid(images, out)


def save_grid(images: np.ndarray, path: str | Path) -> Path:
    """`images` (N, H, W, 3) uint8 as one PNG: ceil(sqrt(N)) columns, black where the last row is short."""

    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cells = np.zeros((rows * cols, h, w, 3), np.uint8)
    cells[:n] = images
    grid = cells.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4)  # (rows, H, cols, W, 3)
    grid = grid.reshape(rows * h, cols * w, 3)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def revert(root: str | Path, n: int, strategy: str = "auto") -> int:
    """Record a change that takes change `n` out of the model; returns its id."""
    return changes.revert(root, n, strategy=strategy)


def resume(root: str | Path, discard: bool = False) -> int | None:
    """Continue the ledger's interrupted change (or drop it with `discard`); returns its id."""
    return changes.resume(root, discard=discard)


def export(root: str | Path, out: str | Path, upto: int | None = None) -> Path:
    """The ledger's model (after change `upto`, default all) in its family's native format, in `out`.

    Refuses a ledger whose files do not match their recorded hashes, and a model holding module edits
    (GRACE, T-Patcher, WISE) or a LLaMA-Adapter that the native format cannot hold (`export_peft` writes the
    adapter alone)."""
    return Ledger.open(root).export(out, upto)


def verify(root: str | Path) -> int:
    """Re-hash every file and rebuild the base; raises LedgerCorruptError listing the problems, else
    returns the number of files checked."""
    ledger = Ledger.open(root)
    problems = ledger.verify()
    if problems:
        raise LedgerCorruptError(f"{root} failed verification:\n  " + "\n  ".join(problems))
    return len(ledger.manifest["files"]) + sum(len(c["files"]) for c in ledger.changes)


def log(root: str | Path, matrix: bool = False, markdown: bool = False) -> str:
    """The history as a table (and the interference matrix; `matrix` also writes root/report.html)."""
    ledger = Ledger.open(root)
    text = views.format_log(ledger, markdown=markdown)
    if matrix:
        text += ("\n\ninterference matrix: probe score after each change (how much that change moved it)\n"
                 + views.format_matrix(ledger, markdown=markdown) + f"\n\nwrote {views.write_report(ledger)}")
    return text


def ledger_report(root: str | Path) -> Path:
    """Write root/report.html (the ledger's page: history, interference heatmap, samples) and return its path."""
    return views.write_report(Ledger.open(root))


def report(paths: Sequence[str | Path] = ("runs",), out: str | Path = "report") -> Path:
    """One self-contained HTML site over run folders and ledgers: OUT/index.html (every run and ledger with its
    key numbers) and a page each. A path is a ledger (DIR/ledger.json), a results folder (DIR/results.json: a
    `lifelong run` or a bench), or a folder of those (e.g. runs/). Returns the index's path."""
    found: list[Path] = []
    seen: set[Path] = set()  # resolved paths: a folder named twice (or through a link) gets one page
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"{path}: no such file or folder (give ledgers, run folders or a folder of them)")
        kids = [path] if _reportable(path) else sorted(p for p in path.iterdir() if p.is_dir() and _reportable(p))
        if not kids:
            raise ConfigError(f"{path}: neither a ledger (ledger.json) nor a results folder (results.json), nor a folder "
                              "holding some")
        for kid in kids:
            if kid.resolve() not in seen:
                seen.add(kid.resolve())
                found.append(kid)
    out = Path(out)
    entries, names = [], {"index"}
    for path in found:
        page = (views.ledger_page(Ledger.open(path)) if (path / "ledger.json").is_file()
                else report_pages.results_page(path))
        name = unique_name(_slug(path.name), names)
        names.add(name)
        atomic_write_text(out / f"{name}.html", page.html())
        entries.append({"name": path.name, "kind": page.kind, "key": page.key_numbers, "path": str(path),
                        "page": f"{name}.html"})
    index = site.page("lifelong report", site.section(
        "Runs and ledgers", site.table(entries, [("name", "name", ""), ("kind", "kind", ""), ("key", "key numbers", ""),
                                                 ("path", "folder", "")],
                                       table_id="index", links={e["name"]: e["page"] for e in entries})), index=None)
    return atomic_write_text(out / "index.html", index)


def _reportable(path: Path) -> bool:
    return (path / "ledger.json").is_file() or (path / "results.json").is_file()


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).strip(".") or "page"


def show(root: str | Path, n: int) -> str:
    """Everything recorded about change `n`."""
    return views.format_change(Ledger.open(root), n)
