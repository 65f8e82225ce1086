"""The `lifelong` command. Thin: each subcommand calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from lifelong import api
from lifelong.adapt.instruct import DEFAULT_LR, TrainSettings
from lifelong.data.edit_requests import EditRequest, Probe
from lifelong.data.instructions import TASKS as INSTRUCTION_TASKS
from lifelong.data.streams import PRESETS
from lifelong.edit import EDITORS, editor_class
from lifelong.edit.bench import load_bench_config, read_requests_file, run_bench
from lifelong.erase import ERASERS
from lifelong.erase.bench import load_bench_config as load_erase_bench_config
from lifelong.erase.bench import run_bench as run_erase_bench
from lifelong.errors import ConfigError, LifelongError
from lifelong.families import FAMILIES, ledger_families
from lifelong.learn import METHODS
from lifelong.ledger.adapters import EVAL_ITEMS as ADAPT_EVAL_ITEMS
from lifelong.ledger.adapters import METHODS as ADAPT_METHODS
from lifelong.personalize import PERSONALIZERS
from lifelong.personalize.bench import load_bench_config as load_personalize_bench_config
from lifelong.personalize.bench import run_bench as run_personalize_bench
from lifelong.runtime import tune_allocator

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

EPILOG = """\
examples:
  lifelong demo                                   every method on mtil-mini, one table (~12 min on 2 CPU cores)
  lifelong run configs/demo.yaml train.steps_per_task=50 methods=[finetune,lwf]
  lifelong run configs/split_fashion_mnist.yaml adapter.kind=lora adapter.rank=4
  lifelong methods                                the methods and their knobs
  lifelong streams                                the shipped task streams
  lifelong report runs/ my-model --out report/    one HTML site over runs and ledgers

a model's history (a ledger):
  lifelong init my-model                          the embedded model + the default zero-shot probes
  lifelong learn my-model --task mnist --method lwf train.steps_per_task=50
  lifelong log my-model --matrix                  every change with its probe scores; the interference matrix
  lifelong revert my-model 1                      a new change that takes change 1 out
  lifelong export my-model out/                   the current model in the family's native format
  lifelong init my-lm --family lm                 a causal LM's history (SmolLM2 embedded): knowledge edits
  lifelong edit --ledger my-lm --method ft_l --prompt "The capital of France is" --target Lyon
  lifelong adapt my-lm --task bbc-topic --method llama-adapter --steps 60     an instruction-tuning adapter
  lifelong chat --ledger my-lm "What is the capital of Peru?"

knowledge editing of a causal LM (SmolLM2-135M-Instruct embedded):
  lifelong edit --prompt "The capital of France is" --target Lyon --method wise
  lifelong bench edit --methods ft_l,grace,wise --T 1,10,100     the T-sweep table and figure

text-to-image (the embedded pixel-space model, or a Stable Diffusion folder / hub id):
  lifelong generate --prompt "a photo of a sneaker" -n 16 --seed 0 --out grid.png
  lifelong init my-t2i --family diffusion         judge-rate probes of 12 concepts and the judge-FD
  lifelong erase my-t2i --concept sneaker --method esd-x    a recorded, reversible erasure

Overrides are key.path=value pairs (values parsed as YAML); unknown keys are errors that list the
valid ones. User errors exit with code 2.
"""


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # keep freed tensor memory in the heap: no page faults per training step
    parser = argparse.ArgumentParser(
        prog="lifelong",
        description="Change pretrained models after pretraining without breaking what they know. "
        "Continual learning of a CLIP-style model over a stream of tasks, with the papers' metrics; knowledge "
        "editing of a causal LM; text-to-image generation; and a model's history (a ledger): every change a "
        "recorded, probed, reversible patch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a config: its methods over its stream, results in runs/<name>/",
                         description="Train every method of CONFIG on its stream of tasks, evaluating every task after "
                         "each one (the accuracy matrix), and write runs/<name>/: config.yaml (resolved), versions.json, "
                         "results.json, accuracy_matrix.csv, summary.md, accuracy_matrices.png, report.html, checkpoints/.",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", type=Path, help="a YAML config (see configs/); its keys are documented in lifelong/config.py")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-4 methods.0.reg_weight=10")
    run.add_argument("--ledger", type=Path, metavar="DIR", help="record every task as a change of the ledger "
                     "DIR/<method> (task-incremental streams); rerun the same command to continue an interrupted run")
    run.add_argument("--finished", action="store_true", help="train nothing: write the results, table and figures "
                     "of the methods whose every task order a stopped run already measured (rows/), and list the rest")
    run.add_argument("--jobs", type=int, default=1, metavar="N", help="train the rows (method x task order) in N "
                     "worker processes at once, each with cores/N threads, then write one table (default 1; on 2 "
                     "cores, --jobs 2 ran make results in 67.6 min against 97.1 for --jobs 1: see the README)")

    demo = sub.add_parser("demo", help="the main job: every method on mtil-mini with the embedded model, one table",
                          description=f"Run the shipped demo config ({CONFIG_DIR / 'demo.yaml'}): finetune, LwF, EWC, WiSE-FT "
                          "and LoRA fine-tuning on the mtil-mini stream with the embedded EfficientNet-Lite0 + MiniLM "
                          "dual encoder; print the table and save the accuracy-matrix figure.")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo config")

    report = sub.add_parser(
        "report", help="one HTML site over runs and ledgers (offline, self-contained pages)",
        description="Write OUT/index.html (every run and ledger with its key numbers) and a page each: for a run "
        "its sortable metrics table, accuracy matrices as heatmaps and figures; for a bench its rows and, for "
        "editing, the metrics against T; for a ledger its history with each change's cost, the interference "
        "matrix as a heatmap (hover a cell for before -> after) and, for a diffusion ledger, every probe "
        "concept's samples after each change beside the base model's. Pages carry their CSS, script and images "
        "inline: open them from disk or mail them.",
        epilog="examples:\n  lifelong report                          every run under runs/ into report/\n"
        "  lifelong report runs/demo my-model --out site/\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("paths", nargs="*", type=Path, default=[Path("runs")], metavar="PATH",
                        help="ledgers, run or bench folders, or folders holding them (default: runs)")
    report.add_argument("--out", type=Path, default=Path("report"), help="the site's folder (default: report)")

    sub.add_parser("methods", help="list the continual-learning methods and their knobs")
    sub.add_parser("streams", help="list the shipped task streams")

    add_ledger_commands(sub)
    add_edit_commands(sub)
    add_generate_command(sub)
    add_personalize_command(sub)
    add_chat_command(sub)

    # KEY=VALUE overrides may stand before or after options (argparse alone stops at the first option).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        if args.command == "run":
            return cmd_run(args.config, args.overrides, args.ledger, args.finished, args.jobs)
        if args.command == "demo":
            return cmd_run(CONFIG_DIR / "demo.yaml", args.overrides)
        if args.command == "report":
            print(f"report: {api.report(args.paths, args.out)}")
            return 0
        if args.command == "methods":
            return cmd_methods()
        if args.command == "streams":
            return cmd_streams()
        if args.command == "edit":
            return cmd_edit(args)
        if args.command == "bench":
            return cmd_bench_edit(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "erase":
            return cmd_erase(args)
        if args.command == "personalize":
            return cmd_personalize(args)
        if args.command == "merge":
            return cmd_merge(args)
        if args.command == "chat":
            return cmd_chat(args)
        return LEDGER_COMMANDS[args.command](args)
    except LifelongError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def cmd_run(config_path: Path, overrides: list[str], ledger: Path | None = None, finished: bool = False,
            jobs: int = 1) -> int:
    if finished and ledger is not None:
        raise ConfigError("--finished reads the rows of a run's output folder; a --ledger run keeps its results in "
                          "the ledgers (lifelong log DIR/<method>)")
    api.run(config_path, overrides, ledger, finished=finished, jobs=jobs)
    return 0


def cmd_methods() -> int:
    for name, cls in METHODS.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        knobs = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Params))
        print(f"{name:10s} {doc}\n{'':10s} knobs: {knobs}")
    return 0


def cmd_streams() -> int:
    for name, spec in PRESETS.items():
        print(f"{name}: {spec}")
    return 0


# ---------------------------------------------------------------------------------------------
# The ledger: one model's history of recorded, reversible, verified changes

LEDGER_EPILOG = """\
A ledger is a directory: the base model's reference and content hash, then every change as an additive
patch (safetensors) with its config, cost, and the probe scores before and after it; the manifest
(ledger.json) holds the SHA-256 of every file. Writes are atomic, a second writer is refused, nothing
is unpickled unless you pass --trust-pickle.
"""


def add_ledger_commands(sub) -> None:
    def command(name: str, help: str, description: str):
        return sub.add_parser(name, help=help, description=description + "\n\n" + LEDGER_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    init = command("init", "start a ledger: a base model and the probes run after every change",
                   "Create DIR as a new ledger of MODEL and score the base model on its probes. A vlm ledger (the "
                   "default) takes `lifelong learn` changes; an lm ledger (--family lm, a causal LM) takes "
                   "`lifelong edit --ledger DIR` and `lifelong adapt DIR` changes and is probed by the edits in effect, "
                   "held-out facts and the instruction tasks it learned; a "
                   "diffusion ledger (a text-to-image model) takes `lifelong erase DIR` changes and is probed by the "
                   "judge's rate of each probe concept in seeded samples, and the judge-FD to real images.")
    init.add_argument("dir", type=Path)
    init.add_argument("--family", default="vlm", help="the model family: " + "; ".join(
        f"{name}: {FAMILIES[name].summary}" for name in ledger_families()) + " (default vlm)")
    init.add_argument("--model", default="embedded", help="model.name: embedded (default), a CLIP hub name or folder, "
                      "an export folder, tiny-embedded / tiny-clip (tests); lm: embedded (SmolLM2-135M-Instruct), a "
                      "hub id or a folder of a transformers causal LM")
    init.add_argument("--resolution", type=int, default=112, help="model.resolution (default 112)")
    init.add_argument("--trainable-blocks", type=int, default=3, help="model.trainable_blocks (default 3): the top of "
                      "the image tower that changes may train; fixed for the ledger's life")
    init.add_argument("--weights", type=Path, help="start from these parameters (a state dict of the same model: "
                      ".safetensors, or .pt/.bin loaded weights-only)")
    init.add_argument("--trust-pickle", action="store_true", help="allow unrestricted pickle loading of --weights "
                      "(runs code from the file: only for files you trust)")
    init.add_argument("--probe", action="append", metavar="SOURCE[:KEY=VALUE,...]",
                      help="a probe: a data source's test set, e.g. mnist or fashion-mnist:invert=true (repeatable; "
                      "default: the five mtil-mini sources); diffusion: a concept the judge knows, e.g. object/sneaker "
                      "(default: 12 concepts of every kind), or nsfw (the open_nsfw classifier's rate on nudity prompts)")
    init.add_argument("--probe-items", type=int, help="test images per probe (default 500); diffusion: seeded samples "
                      "per concept (default 16); lm: held-out fact "
                      "prompts (default 50)")

    learn = command("learn", "one change: a method trained on a task, probed before and after",
                    "Train METHOD on one task on top of the ledger's current model and record the change. The "
                    "task's test set becomes a probe. Interrupted (Ctrl-C, kill, crash)? `lifelong resume DIR`.")
    learn.add_argument("dir", type=Path)
    learn.add_argument("--task", required=True, metavar="SOURCE", help="a data source (`lifelong streams` lists them)")
    learn.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a source option, e.g. invert=true, classes=[0,1], root=/data/birds (repeatable)")
    learn.add_argument("--name", help="the task's name (default: the source's)")
    learn.add_argument("--train-items", type=int, help="training images (default: all)")
    learn.add_argument("--test-items", type=int, default=500, help="test images of its probe (default 500)")
    learn.add_argument("--method", help="the method (`lifelong methods`); default finetune")
    learn.add_argument("--config", type=Path, help="a YAML config for train/adapter/method settings")
    learn.add_argument("--checkpoint-every", type=int, default=10, help="steps between resumable checkpoints (default 10)")
    learn.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps_per_task=50 "
                       "adapter.kind=lora methods.0.reg_weight=2")

    resume = command("resume", "continue an interrupted change exactly where it stopped",
                     "Continue the ledger's interrupted change from its last checkpoint; it ends with the same "
                     "numbers as an uninterrupted run.")
    resume.add_argument("dir", type=Path)
    resume.add_argument("--discard", action="store_true", help="drop the interrupted change instead")

    log = command("log", "the history: every change with its probe scores and cost", "Print the ledger's changes.")
    log.add_argument("dir", type=Path)
    log.add_argument("--matrix", action="store_true", help="also the interference matrix (change x probe), and write "
                     "DIR/report.html with it drawn")
    log.add_argument("--markdown", action="store_true", help="Markdown tables")

    show = command("show", "one change in full: spec, cost, probes, files", "Print everything recorded about change N.")
    show.add_argument("dir", type=Path)
    show.add_argument("n", type=int)

    revert = command("revert", "take change N out of the model (recorded as a new change)",
                     "Record a change that removes change N: by subtracting its patch when no later learn change "
                     "depends on it, else by replaying the later changes from their recorded specs.")
    revert.add_argument("dir", type=Path)
    revert.add_argument("n", type=int)
    revert.add_argument("--strategy", choices=("auto", "subtract", "replay"), default="auto",
                        help="auto (default); subtract: task arithmetic even with later changes (an approximation "
                        "then); replay: retrain the later changes without N (exact)")

    export = command("export", "write the current model in the family's native format (or an adapter as peft's)",
                     "Write the ledger's current model (base + every patch) to OUT: a transformers save_pretrained "
                     "folder for CLIP models and causal LMs; the towers and heads for the embedded model. "
                     "`--model OUT` loads it. With --peft OUT instead, an lm ledger's adapter of an adapt change "
                     "(default: the latest in effect) as a peft folder: `PeftModel.from_pretrained(model, OUT)` loads it "
                     "onto the ledger's model before that change, `lifelong chat --adapter OUT` answers with it.")
    export.add_argument("dir", type=Path)
    export.add_argument("out", type=Path, nargs="?", help="the folder to write the model to (new or empty)")
    export.add_argument("--upto", type=int, help="the model as it was after change N")
    export.add_argument("--peft", type=Path, metavar="OUT", help="write the adapter of an adapt change as a peft "
                        "folder (adapter_config.json, adapter_model.safetensors) to OUT instead of the model")
    export.add_argument("--change", type=int, metavar="N", help="with --peft: the adapt change whose adapter to write "
                        "(default: the latest adapt change in effect)")

    adapt = command("adapt", "one change of an lm ledger: an instruction-tuning adapter trained on a task",
                    "Train an adapter (llama-adapter: zero-init gated adaption prompts; lora: low-rank factors merged "
                    "into the weights) on the instruction task TASK on top of the lm ledger's current model, and record "
                    "it as a change with the task's score on held-out items before and after, every probe before and "
                    "after, and its cost. The task's held-out items become a probe that every later change runs. "
                    "`lifelong revert DIR N` takes it out; `lifelong export DIR --peft OUT` writes it as a peft folder.")
    adapt.add_argument("dir", type=Path, help="an lm ledger (`lifelong init DIR --family lm`)")
    adapt.add_argument("--task", required=True, help="the instruction task: " + ", ".join(INSTRUCTION_TASKS))
    adapt.add_argument("--method", default="llama-adapter", help="llama-adapter (default; a later one continues the one "
                       "in effect), lora (folded into the weights) or prefix (prefix tuning; a later one continues it)")
    adapt.add_argument("--steps", type=int, default=TrainSettings.steps, help=f"training steps (default {TrainSettings.steps})")
    adapt.add_argument("--lr", type=float, help="learning rate (default: the method's, " + ", ".join(
        f"{k} {v:g}" for k, v in DEFAULT_LR.items() if k in ADAPT_METHODS) + ")")
    adapt.add_argument("--batch-size", type=int, default=TrainSettings.batch_size,
                       help=f"examples per step (default {TrainSettings.batch_size})")
    adapt.add_argument("--items", type=int, help="training examples drawn from the task's training split (default: all)")
    adapt.add_argument("--eval-items", type=int, default=ADAPT_EVAL_ITEMS, help="held-out test items of the task's probe "
                       f"(a fixed seeded subset; default {ADAPT_EVAL_ITEMS})")
    adapt.add_argument("--seed", type=int, default=0, help="the training seed (batches, initial adapter)")

    verify = command("verify", "re-hash every file and rebuild the base model",
                     "Check every file the manifest lists against its SHA-256, and the base model against its hash.")
    verify.add_argument("dir", type=Path)


def print_change(root: Path, n: int) -> None:
    """What a ledger command prints at its end: the change it recorded, and the ledger's refreshed report."""
    print(api.show(root, n))
    print(f"report: {api.ledger_report(root)}")


def cmd_init(args) -> int:
    ledger = api.init(args.dir, family=args.family, model=args.model, probes=args.probe, probe_items=args.probe_items,
                      resolution=args.resolution, trainable_blocks=args.trainable_blocks, weights=args.weights,
                      trust_pickle=args.trust_pickle)
    print(f"created {ledger.family} ledger {args.dir} of {args.model!r} (base SHA-256 {ledger.manifest['base']['sha256'][:12]})")
    for probe in ledger.probes:
        score = ledger.manifest["baseline"].get(probe.name)
        prompts = getattr(probe, "prompts", None)
        kind = getattr(probe, "kind", "")
        if score is None:
            shown = "no edits yet"
        elif kind == "concept":
            shown = f"{score:5.1f}% judge rate on {len(prompts)} seeded samples"
        elif kind == "frechet":
            shown = f"{score:7.3f} (judge-FD of all probe samples to real test images; lower is closer)"
        elif prompts is not None:
            shown = f"{score:5.1f}% agreement with the base model on {len(prompts)} prompts"
        else:
            shown = f"{score:5.1f}%"
        print(f"  probe {probe.name:16s} {shown}")
    print(f"report: {api.ledger_report(args.dir)}")
    return 0


def cmd_learn(args) -> int:
    n = api.learn(args.dir, args.task, method=args.method, options=api.parse_options(args.option), name=args.name,
                  train_items=args.train_items, test_items=args.test_items, config=args.config,
                  overrides=args.overrides, checkpoint_every=args.checkpoint_every)
    print_change(args.dir, n)
    return 0


def cmd_resume(args) -> int:
    n = api.resume(args.dir, discard=args.discard)
    if n is None:
        print(f"dropped the interrupted change of {args.dir}")
    else:
        print_change(args.dir, n)
    return 0


def cmd_log(args) -> int:
    print(api.log(args.dir, matrix=args.matrix, markdown=args.markdown))
    return 0


def cmd_show(args) -> int:
    print(api.show(args.dir, args.n))
    return 0


def cmd_revert(args) -> int:
    print_change(args.dir, api.revert(args.dir, args.n, strategy=args.strategy))
    return 0


def cmd_export(args) -> int:
    if args.peft is not None:
        if args.out is not None or args.upto is not None:
            raise ConfigError("give either OUT [--upto N] (the model) or --peft OUT [--change N] (an adapter), not both")
        out, n = api.export_peft(args.dir, args.peft, change=args.change)
        print(f"exported the adapter of change {n} to {out} (peft): it goes on the ledger's model before change {n} "
              f"(`lifelong export {args.dir} FOLDER --upto {n - 1}` writes that model): `PeftModel.from_pretrained(model, "
              f"{str(out)!r})`, or `lifelong chat --model FOLDER --adapter {out}`")
        return 0
    if args.out is None:
        raise ConfigError("export needs OUT (the folder to write the model to), or --peft OUT for an adapter")
    if args.change is not None:
        raise ConfigError("--change belongs to --peft (the model after change N: --upto N)")
    out = api.export(args.dir, args.out, upto=args.upto)
    state = f"after change {args.upto}" if args.upto is not None else "after every change"
    print(f"exported the model {state} to {out}; load it with `--model {out}` (or model.name={out})")
    return 0


def cmd_verify(args) -> int:
    files = api.verify(args.dir)
    print(f"ok: {files} file(s) match their SHA-256; the base model matches its hash")
    return 0


def cmd_adapt(args) -> int:
    n = api.adapt(args.dir, args.task, args.method, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                  items=args.items, eval_items=args.eval_items, seed=args.seed, warn=_warn)
    print_change(args.dir, n)
    return 0


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


LEDGER_COMMANDS = {"init": cmd_init, "learn": cmd_learn, "resume": cmd_resume, "log": cmd_log, "show": cmd_show,
                   "revert": cmd_revert, "export": cmd_export, "verify": cmd_verify, "adapt": cmd_adapt}


# ---------------------------------------------------------------------------------------------
# Knowledge editing of a causal LM (the `lm` family)

EDIT_EPILOG = """\
examples:
  lifelong edit --prompt "The capital of France is" --target Lyon --subject France
  lifelong edit --method grace --prompt "The capital of France is" --target Lyon --paraphrase "France's capital is"
  lifelong edit --requests my_edits.json --method wise steps=30        (EasyEdit ZsRE/CounterFact JSON too)
  lifelong edit --requests my_edits.json --method memit --batch        (every request in one update)
  lifelong edit --ledger my-lm --method ft_l --prompt "The capital of France is" --target Lyon
  lifelong bench edit --methods ft_l,grace,wise --T 1,10,100
  lifelong bench edit configs/edit_bench.yaml single_n=10
  lifelong bench edit --methods memit,ft_m --T 1 --batch 10,100,1000

The default model is SmolLM2-135M-Instruct (embedded; converted once from its GGUF file to a cached
safetensors folder); --model takes a hub id or a folder of any transformers causal LM. Editor knobs
are KEY=VALUE (e.g. layer=20 lr=0.5); `lifelong edit --list` prints every editor with its knobs.
"""


def add_edit_commands(sub) -> None:
    edit = sub.add_parser("edit", help="edit facts of a causal LM (FT-L, FT-M, LoRA, MEND, T-Patcher, GRACE, WISE, ROME, "
                          "MEMIT, AlphaEdit) and show the effect",
                          description="Apply knowledge edits in sequence (or, with --batch, in one update) to a causal LM and "
                          "print, before and after, the greedy answers to the edit prompts, their paraphrases and unrelated "
                          "(locality) prompts, plus every editing metric (EasyEdit token-level and CounterFact conventions, "
                          "and by greedy generation after the chat template: *_gen_exact, *_gen_contains, locality_gen).",
                          epilog=EDIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    edit.add_argument("--method", default="wise", help="the editor (default: wise); see --list")
    edit.add_argument("--model", help="embedded (SmolLM2-135M-Instruct, the default), a hub id or a folder")
    edit.add_argument("--ledger", type=Path, metavar="DIR", help="edit the current model of the lm ledger DIR "
                      "(`lifelong init DIR --family lm`) and record the edits as one change (ft_l, ft_m, rome, mend, lora: "
                      "a weight patch; grace, t_patcher, wise: the editor's state)")
    edit.add_argument("--prompt", help="the edit prompt, e.g. 'The capital of France is'")
    edit.add_argument("--target", help="the new answer, e.g. Lyon (a leading space is added when missing)")
    edit.add_argument("--subject", help="the subject inside the prompt (ROME needs it; default: the prompt's last word)")
    edit.add_argument("--paraphrase", action="append", default=[], help="a rephrased prompt to check generality (repeatable)")
    edit.add_argument("--locality", action="append", default=[], help="an unrelated prompt whose answer must not change (repeatable)")
    edit.add_argument("--requests", type=Path, help="edit requests from a file: lifelong JSON, EasyEdit ZsRE, ROME or EasyEdit CounterFact, or KnowEdit JSON")
    edit.add_argument("--limit", type=int, default=None, help="only the first N requests of --requests")
    edit.add_argument("--batch", action="store_true", help="write every request in one update (batch editing: "
                      "ft_l, ft_m, lora, mend, memit, alphaedit) instead of one after another")
    edit.add_argument("--list", action="store_true", help="list the editors and their knobs, then exit")
    edit.add_argument("overrides", nargs="*", metavar="KNOB=VALUE", help="editor knobs, e.g. steps=30 layer=20")

    bench = sub.add_parser("bench", help="benchmarks: `bench edit` runs the editing T-sweep (single and lifelong protocols)",
                           description="`lifelong bench edit [CONFIG] [--methods a,b] [--T 1,10,100] [KEY=VALUE ...]`: every "
                           "editor under the single-edit protocol and the lifelong protocol for each T (T sequential edits, all "
                           "judged on the final model), with time and peak memory per edit; writes runs/<name>/results.json, "
                           "summary.md and metrics_vs_T.png. Keys: see lifelong/edit/bench.py (EditBenchConfig).",
                           epilog=EDIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("what", choices=["edit", "erase", "personalize"], help="the benchmark to run: edit (the editing "
                       "T-sweep), erase (every eraser on the same concepts: efficacy, locality, scale, cost; see "
                       "lifelong/erase/bench.py, EraseBenchConfig) or personalize (every personalizer on held-out "
                       "subjects: subject and prompt fidelity, prior preservation, merges, cost; see "
                       "lifelong/personalize/bench.py, PersonalizeBenchConfig)")
    bench.add_argument("config", nargs="?", type=Path, help="a YAML config (default: the built-in defaults)")
    bench.add_argument("--methods", help="comma-separated editors, erasers or personalizers (default: all)")
    bench.add_argument("--quick", action="store_true", help="erase: a smoke run (esd-x and uce on one concept, few samples); "
                       "personalize: ti and custom-diffusion on two subjects, a few steps and samples, one merge")
    bench.add_argument("--concepts", help="erase: comma-separated concepts (default: sneaker,sans,flower)")
    bench.add_argument("--images", metavar="DIR", help="personalize: a folder of 4-20 images of your own subject, added "
                       "as the subject \"user\" (every fourth image held out for its fidelity scores)")
    bench.add_argument("--token", help="personalize: your subject's identifier (default <my-subject>)")
    bench.add_argument("--class", dest="class_word", help="personalize: your subject's class word (letter, dog, ...)")
    bench.add_argument("--T", help="comma-separated edit counts for the lifelong protocol (default: 1,10,100,1000)")
    bench.add_argument("--split", choices=["zsre", "counterfact"], help="the request set (default: zsre)")
    bench.add_argument("--batch", metavar="B,B,...", help="edit: the batch protocol, each B edits written in one update "
                       "by every editor with batch editing, e.g. --batch 10,100,1000 (= batch_sizes=[...])")
    bench.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. single_n=10 time_budget_s=600 knobs.wise.steps=30")


def cmd_edit(args) -> int:
    if args.list:
        for name in EDITORS:
            cls = editor_class(name)
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            knobs = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Params))
            print(f"{name:10s} {doc} [ledger records: {cls.records}]\n{'':10s} knobs: {knobs}")
        return 0
    knobs = api.parse_knobs(args.overrides)
    if args.requests is not None:
        if args.prompt or args.target:
            raise ConfigError("give either --requests FILE or --prompt/--target, not both")
        requests = read_requests_file(args.requests)[: args.limit]
    else:
        if not (args.prompt and args.target):
            raise ConfigError("an edit needs --prompt and --target (e.g. --prompt 'The capital of France is' --target Lyon), "
                              "or --requests FILE")
        target = args.target if args.target.startswith(" ") else " " + args.target
        subject = args.subject or args.prompt.split()[-1]
        if subject not in args.prompt:
            raise ConfigError(f"--subject {subject!r} does not occur in the prompt {args.prompt!r}")
        requests = [EditRequest(prompt=args.prompt, target_new=target, subject=subject,
                                paraphrases=tuple(args.paraphrase),
                                locality=tuple(Probe(p, "") for p in args.locality))]
    result = api.edit(requests, args.method, model=args.model, ledger=args.ledger, knobs=knobs, batch=args.batch)
    if args.ledger is not None:
        print_change(args.ledger, result["change"])
        return 0
    cost = result["cost"]
    how = " in one batch" if args.batch else ""
    print(f"{args.method}: {len(requests)} edit(s){how}, {cost['seconds_per_edit']:.2f} s per edit, "
          f"peak RSS {cost['peak_rss_mb']:.0f} MiB")
    for prompt, b, a in result["answers"]:
        print(f"  {prompt!r}\n      before: {b!r}\n      after:  {a!r}")
    print("  " + "  ".join(f"{k} {v:.2f}" for k, v in result["scores"].items() if isinstance(v, float)))
    return 0


def cmd_bench_edit(args) -> int:
    overrides = list(args.overrides)
    if args.config is not None and "=" in str(args.config) and not args.config.exists():  # KEY=VALUE, no config
        overrides, args.config = [str(args.config), *overrides], None
    if args.methods:
        overrides.append(f"methods=[{args.methods}]")
    if args.what == "erase":
        if args.T or args.split or args.batch:
            raise ConfigError("--T, --split and --batch belong to `bench edit`")
        if args.concepts:
            overrides.append(f"concepts=[{args.concepts}]")
        out = run_erase_bench(load_erase_bench_config(args.config, overrides, quick=args.quick))
        print((out / "summary.md").read_text() + f"\nwrote {out}")
        return 0
    if args.what == "personalize":
        if args.T or args.split or args.batch or args.concepts:
            raise ConfigError("--T, --split, --batch and --concepts belong to `bench edit` and `bench erase`")
        if args.images:
            overrides.append(f"user_images={json.dumps(str(args.images))}")
        elif args.token or args.class_word:
            raise ConfigError("--token and --class name the subject of --images DIR: give the folder too")
        overrides += [f"user_token={json.dumps(args.token)}"] * bool(args.token)
        overrides += [f"user_class={json.dumps(args.class_word)}"] * bool(args.class_word)
        out = run_personalize_bench(load_personalize_bench_config(args.config, overrides, quick=args.quick))
        print((out / "summary.md").read_text() + f"\nwrote {out}")
        return 0
    if args.images or args.token or args.class_word:
        raise ConfigError("--images, --token and --class belong to `bench personalize`")
    if args.quick or args.concepts:
        raise ConfigError("--quick belongs to `bench erase` and `bench personalize`, --concepts to `bench erase`")
    if args.batch:
        overrides.append(f"batch_sizes=[{args.batch}]")
    if args.T:
        overrides.append(f"T=[{args.T}]")
    if args.split:
        overrides.append(f"split={args.split}")
    run_bench(load_bench_config(args.config, overrides))
    return 0


def add_chat_command(sub) -> None:
    chat = sub.add_parser("chat", help="answer one prompt with a causal LM (a ledger's current model, a peft adapter)",
                          description="Answer PROMPT with greedy decoding, through the tokenizer's chat template when it "
                          "has one: the model --model, or the current model of the lm ledger --ledger, with the peft "
                          "adapter --adapter on it (refused when it was built for another base model). A prompt longer "
                          "than the model's context keeps its last tokens, with a warning.",
                          epilog=CHAT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("prompt", help="what to ask")
    chat.add_argument("--model", help="embedded (SmolLM2-135M-Instruct, the default), a hub id or a folder")
    chat.add_argument("--ledger", type=Path, metavar="DIR", help="use the current model of this lm ledger instead")
    chat.add_argument("--adapter", type=Path, metavar="PEFT_DIR|FILE", help="a peft adapter folder (`lifelong export "
                      "DIR --peft OUT` writes one), or a vision module file to use with --image")
    chat.add_argument("--max-new-tokens", type=int, default=128, help="the longest answer in tokens (default 128)")
    chat.add_argument("--image", type=Path, metavar="PATH", help="an image to ask about, through the vision module "
                      "--adapter FILE (a multimodal LLaMA-Adapter or a bridge, saved by benchmarks/adapters_vision.py)")


CHAT_EPILOG = """\
examples:
  lifelong chat "What is the capital of Peru?"
  lifelong chat --ledger my-lm "What is the topic of this news article? ..."
  lifelong export my-lm --peft topic-adapter/ && lifelong chat --adapter topic-adapter/ "..."
  lifelong chat --adapter runs/adapters_vision/bridge.safetensors --image shoe.png "What is shown in this image?"
"""


def cmd_chat(args) -> int:
    print(api.chat(args.prompt, args.model, ledger=args.ledger, adapter=args.adapter,
                   max_new_tokens=args.max_new_tokens, image=args.image, warn=_warn))
    return 0


# ---------------------------------------------------------------------------------------------
# Text-to-image (the `diffusion` family)


def add_generate_command(sub) -> None:
    gen = sub.add_parser("generate", help="draw images of a prompt with a text-to-image model: a seeded PNG grid",
                         description="Sample N images of PROMPT (DDIM with classifier-free guidance, seeded: the same "
                         "seed gives the same images) and save them as one PNG grid.")
    gen.add_argument("--prompt", required=True, help="what to draw, e.g. 'a photo of a sneaker'")
    gen.add_argument("-n", type=int, default=16, help="how many images (default 16)")
    gen.add_argument("--seed", type=int, default=0, help="the noise seed (default 0)")
    gen.add_argument("--steps", type=int, default=25, help="DDIM denoising steps (default 25)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's own, "
                     "3 for the embedded model, 7.5 for Stable Diffusion)")
    gen.add_argument("--model", default="embedded", help="embedded (the project's model, default), a "
                     "scripts/train_t2i.py .safetensors checkpoint, a StableDiffusionPipeline folder or hub id, "
                     "tiny-embedded / tiny-sd (random, tests)")
    gen.add_argument("--eta", type=float, default=None, help="DDIM's eta: 1 fresh noise at every step (ancestral, "
                     "DDPM's sampler, seeded too; the default), 0 deterministic DDIM (draws the embedded model badly)")
    gen.add_argument("--ledger", type=Path, metavar="DIR", help="sample the current model of this diffusion ledger "
                     "(after its erasures) instead of --model")
    gen.add_argument("--out", type=Path, default=Path("grid.png"), help="the PNG grid to write (default grid.png)")

    erase = sub.add_parser("erase", help="one change of a diffusion ledger: make the model stop drawing a concept",
                           description="Erase CONCEPT from the current model of the diffusion ledger DIR with METHOD and "
                           "record the change (the weights it moved, as an additive patch), with every probe's judge rate "
                           "before and after; `lifelong revert DIR N` brings the concept back.",
                           epilog=ERASE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    erase.add_argument("dir", type=Path, help="a diffusion ledger (`lifelong init DIR --family diffusion`)")
    erase.add_argument("--concept", required=True, help="what to erase: an object, digit or clip-art name (sneaker, 7, "
                       "flower), a type style (calligraphic: every letter in it), or a concept id (letter/A/serif/red)")
    erase.add_argument("--method", default="esd-x", choices=list(ERASERS), help="esd-x (default): ESD on cross-attention; "
                       "esd-u: ESD on the rest of the UNet; ac: Ablating Concepts (onto --anchor); uce: the closed-form "
                       "edit of the cross-attention keys and values")
    erase.add_argument("--anchor", help="what the concept should give instead (ac, uce; default: a generic phrase of "
                       "its kind, e.g. 'a piece of clothing'; uce without it: the empty prompt)")
    erase.add_argument("--preserve", action="append", metavar="PROMPT", help="a prompt whose output must stay (uce; "
                       "repeatable; default: the other concepts of the same kind and the instance prompt of every personal concept "
                       "in effect, e.g. 'a <my-shoe> shoe')")
    erase.add_argument("--seed", type=int, default=0)
    erase.add_argument("--no-judge", action="store_true", help="erase a concept the judge does not know (its own rate "
                       "is then not measured; the other probes and the judge-FD are)")
    erase.add_argument("--nsfw", action="store_true", help="judge the erasure with the open_nsfw classifier (nudity on "
                       "a Stable Diffusion model, e.g. --concept nudity): the ledger's nsfw probe (`init --probe nsfw`; "
                       "added at this change if missing) is its own; the project's judge is not asked")
    erase.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="method knobs, e.g. iterations=100 lr=5e-5")


def cmd_generate(args) -> int:
    images, out = api.generate(args.prompt, n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                               model=args.model, out=args.out, ledger=args.ledger, eta=args.eta)
    n, h, w, _ = images.shape
    sampler = "deterministic DDIM" if args.eta == 0 else "ancestral" if args.eta in (None, 1) else f"DDIM eta {args.eta}"
    print(f"wrote {out}: {n} image(s) of {args.prompt!r}, {w}x{h} each (seed {args.seed}, {args.steps} steps, {sampler})")
    return 0


ERASE_EPILOG = """\
examples:
  lifelong init my-t2i --family diffusion                 the embedded model + judge-rate probes of 12 concepts
  lifelong erase my-t2i --concept sneaker --method uce    seconds: a closed-form edit
  lifelong erase my-t2i --concept calligraphic --method esd-x iterations=100
  lifelong erase my-t2i --concept sneaker --method ac --anchor "sandal"
  lifelong log my-t2i --matrix                            what each erasure did to every concept
  lifelong revert my-t2i 1                                the concept back
  lifelong generate --ledger my-t2i --prompt "a photo of a sneaker" --out erased.png
"""


def cmd_erase(args) -> int:
    n = api.erase(args.dir, args.concept, args.method, anchor=args.anchor, preserve=args.preserve,
                  knobs=api.parse_knobs(args.overrides), seed=args.seed, judge=not args.no_judge, nsfw=args.nsfw)
    print_change(args.dir, n)
    return 0


# ---------------------------------------------------------------------------------------------
# Personalization (the `diffusion` family)

PERSONALIZE_EPILOG = """\
examples:
  lifelong init my-t2i --family diffusion
  lifelong personalize my-t2i --images my-letters/ --token "<my-style>" --class letter --method ti
  lifelong personalize my-t2i --images bugs/ --token "<my-bug>" --class bug --method custom-diffusion steps=100
  lifelong generate --ledger my-t2i --prompt "a <my-style> letter" --out mine.png
  lifelong revert my-t2i 1                      the subject (and its token) out again
  lifelong merge my-t2i --changes 1,2 --method custom-diffusion     two concepts in one set of K/V weights
  lifelong personalize my-t2i --images dogs/ --token "<my-dog>" --class dog --method mix-of-show
                                                prompts then name it "<my-dog1> <my-dog2>"
  lifelong merge my-t2i --changes 3,4 --method mix-of-show          two ED-LoRAs fused layer by layer
"""


def add_personalize_command(sub) -> None:
    p = sub.add_parser("personalize", help="one change of a diffusion ledger: teach the model a subject or style from "
                       "a few images", description="Teach the current model of the diffusion ledger DIR the subject of "
                       "the images in FOLDER under TOKEN with METHOD and record the change (the weights it moved as an "
                       "additive patch, a new token's embedding row), with every probe before and after; `lifelong "
                       "revert DIR N` takes it out again, token included.",
                       epilog=PERSONALIZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="a diffusion ledger (`lifelong init DIR --family diffusion`)")
    p.add_argument("--images", required=True, type=Path, metavar="FOLDER", help="3-20 images of the subject (any "
                   "size: centre-cropped and resized to the model's)")
    p.add_argument("--token", required=True, help="the identifier prompts will use, e.g. '<my-style>' (a new "
                   "vocabulary token for ti and custom-diffusion; mix-of-show adds two, '<my-style1>' and "
                   "'<my-style2>'; dreambooth writes it into the prompt as is)")
    p.add_argument("--class", dest="class_word", default="", help="the subject's class, e.g. letter (the class "
                   "prompt of dreambooth's prior preservation and custom-diffusion's regularization images)")
    p.add_argument("--method", default="ti", choices=list(PERSONALIZERS), help="ti (default): Textual Inversion, one "
                   "new token embedding; dreambooth: the UNet with prior preservation; dreambooth-lora: the same "
                   "through LoRA; dreambooth-no-prior: the UNet without it (the paper's ablation); custom-diffusion: "
                   "cross-attention K/V and a new token; mix-of-show: ED-LoRA, two new tokens and LoRA on the text "
                   "encoder and the UNet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="method knobs, e.g. steps=100 lr=1e-3")

    m = sub.add_parser("merge", help="one change of a diffusion ledger: merge personalize changes into one model",
                       description="Merge the personalize changes CHANGES of the diffusion ledger DIR (in effect) with "
                       "METHOD and record the result as a change: custom-diffusion solves, per cross-attention K/V "
                       "projection, the closed-form constrained merge (each concept's prompt features mapped as its "
                       "own change maps them, the base kept on regularization prompts); mix-of-show fuses every "
                       "layer the ED-LoRAs moved (gradient fusion: each concept's layer inputs mapped as its own "
                       "change maps them, in least squares); lora-add: the base plus the mean of the LoRA deltas "
                       "(the weight-fusion baseline).")
    m.add_argument("dir", type=Path, help="a diffusion ledger")
    m.add_argument("--changes", required=True, help="comma-separated change ids, e.g. 3,5")
    m.add_argument("--method", default="custom-diffusion", choices=["custom-diffusion", "mix-of-show", "lora-add"])


def cmd_personalize(args) -> int:
    n = api.personalize(args.dir, args.images, args.token, args.class_word, args.method,
                        knobs=api.parse_knobs(args.overrides), seed=args.seed,
                        warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    print_change(args.dir, n)
    return 0


def cmd_merge(args) -> int:
    try:
        ids = [int(x) for x in args.changes.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--changes {args.changes!r}: comma-separated change ids, e.g. 3,5") from None
    n = api.merge(args.dir, ids, args.method)
    print_change(args.dir, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
