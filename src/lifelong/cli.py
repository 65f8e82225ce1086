"""The `lifelong` command. Thin: each subcommand calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lifelong.errors import LifelongError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

EPILOG = """\
examples:
  lifelong demo                                   every method on mtil-mini, one table (~12 min on 2 CPU cores)
  lifelong run configs/demo.yaml train.steps_per_task=50 methods=[finetune,lwf]
  lifelong run configs/split_fashion_mnist.yaml adapter.kind=lora adapter.rank=4
  lifelong methods                                the methods and their knobs
  lifelong streams                                the shipped task streams

Overrides are key.path=value pairs (values parsed as YAML); unknown keys are errors that list the
valid ones. User errors exit with code 2.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lifelong",
        description="Change pretrained models after pretraining without breaking what they know. "
        "Continual learning of a CLIP-style model over a stream of tasks, with the papers' metrics.",
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

    demo = sub.add_parser("demo", help="the main job: every method on mtil-mini with the embedded model, one table",
                          description=f"Run the shipped demo config ({CONFIG_DIR / 'demo.yaml'}): finetune, LwF, EWC, WiSE-FT "
                          "and LoRA fine-tuning on the mtil-mini stream with the embedded EfficientNet-Lite0 + MiniLM "
                          "dual encoder; print the table and save the accuracy-matrix figure.")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo config")

    sub.add_parser("methods", help="list the continual-learning methods and their knobs")
    sub.add_parser("streams", help="list the shipped task streams")

    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args.config, args.overrides)
        if args.command == "demo":
            return cmd_run(CONFIG_DIR / "demo.yaml", args.overrides)
        if args.command == "methods":
            return cmd_methods()
        if args.command == "streams":
            return cmd_streams()
    except LifelongError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def cmd_run(config_path: Path, overrides: list[str]) -> int:
    from lifelong.config import load_config
    from lifelong.runner import run_experiment

    config = load_config(config_path, overrides)
    run_experiment(config)
    return 0


def cmd_methods() -> int:
    from lifelong.learn import METHODS

    for name, cls in METHODS.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        knobs = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Params))
        print(f"{name:10s} {doc}\n{'':10s} knobs: {knobs}")
    return 0


def cmd_streams() -> int:
    from lifelong.data.streams import PRESETS

    for name, spec in PRESETS.items():
        print(f"{name}: {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
