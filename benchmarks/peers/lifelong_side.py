"""One peer-benchmark run in lifelong: one backbone x one method x one seed (see README.md).

Launched by run.py in lifelong's environment, in a fresh process with an empty stem cache (the frozen
stem's outputs are computed inside the timed experiment, as on a first run). It reads the arrays run.py
wrote with lifelong's loader (data_<backbone>.npz, the file Avalanche's side reads too) into lifelong's
Stream, builds the classifier family's model (its initial weights are checked against init.npz), and
runs the method through the one training loop, `lifelong.loop.run_stream`. It writes one JSON file.

    python lifelong_side.py SETTINGS RUN_DIR BACKBONE METHOD SEED
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from lifelong.data.base import ImageDataset, Stream, Task  # noqa: E402
from lifelong.families import prepare_trainable  # noqa: E402
from lifelong.learn import build_method  # noqa: E402
from lifelong.learn.driver import (
    build_model,  # noqa: E402
    load_run_config,  # noqa: E402
)
from lifelong.loop import (
    compute_stem_features,  # noqa: E402
    run_stream,  # noqa: E402
)

# Each shared setting in lifelong's terms. Avalanche's EWC adds lambda * sum F (theta - theta*)^2 (no 1/2)
# and its LwF alpha * KL at temperature T (no T^2), where lifelong's add (reg_weight / 2) * ... and
# reg_weight * T^2 * KL: the same loss needs reg_weight = 2 lambda and reg_weight = alpha / T^2.
METHOD_NAMES = {"naive": "finetune", "ewc": "ewc", "lwf": "lwf", "replay": "replay"}


def method_params(method: str, params: dict, train_items: int, seed: int) -> dict:
    if method == "ewc":  # online EWC with decay 1 (Avalanche: mode online, decay_factor 1); labels as given
        return {"reg_weight": 2.0 * params["ewc_lambda"], "mode": "online", "decay": 1.0, "fisher": "empirical", "fisher_samples": train_items}
    if method == "lwf":
        return {"reg_weight": params["alpha"] / params["temperature"] ** 2, "temperature": params["temperature"]}
    if method == "replay":  # Avalanche's default storage policy; a replay batch as large as the current one;
        # the buffer's random draws follow the run's seed, as Avalanche's (seeded by RNGManager)
        return {"memory_size": params["mem_size"], "policy": "experience", "replay_batch": 0, "seed": seed}
    return {}


def run_config(settings: dict, backbone: str, method: str, seed: int):
    """The shared settings as a lifelong run config (validated like any config)."""
    train, spec = settings["train"], settings["backbones"][backbone]
    overrides = [
        "model.family=classifier", f"model.name={backbone}", f"model.resolution={spec['resolution']}",
        f"stream.name={settings['stream']}", f"stream.train_items={spec['train_items']}",
        f"stream.test_items={spec['test_items']}", f"train.steps_per_task={steps_per_task(settings, backbone)}",
        f"train.batch_size={train['batch_size']}", f"train.lr={train['lr']}", f"train.eval_batch_size={train['eval_batch_size']}",
        f"train.weight_decay={train['weight_decay']}", "train.grad_clip=0", "train.checkpoints=false", f"seed={seed}",
        f"methods=[{METHOD_NAMES[method]}]",
    ]
    if backbone == "mlp":
        overrides.append(f"model.hidden_sizes={json.dumps(spec['hidden_sizes'])}")
    for key, value in method_params(method, settings["methods"][method], spec["train_items"], seed).items():
        overrides.append(f"methods.0.{key}={json.dumps(value)}")
    return load_run_config(None, overrides)


def steps_per_task(settings: dict, backbone: str) -> int:
    spec = settings["backbones"][backbone]
    return spec["epochs"] * math.ceil(spec["train_items"] / settings["train"]["batch_size"])


def stream_from_arrays(data, name: str) -> Stream:
    """The class-incremental Stream held in data_<backbone>.npz (global labels -> each task's own)."""
    tasks, offset = [], 0
    for t in range(int(data["n_tasks"])):
        names = tuple(str(n) for n in data[f"class_names_{t}"])
        train = ImageDataset(str(data[f"name_{t}"]), "train", data[f"train_images_{t}"], data[f"train_labels_{t}"] - offset, names)
        test = ImageDataset(str(data[f"name_{t}"]), "test", data[f"test_images_{t}"], data[f"test_labels_{t}"] - offset, names)
        tasks.append(Task(str(data[f"name_{t}"]), train, test, tuple(range(offset, offset + len(names)))))
        offset += len(names)
    return Stream(name, "class", tuple(tasks), tuple(n for task in tasks for n in task.class_names))


def main() -> None:
    settings_path, run_dir, backbone, method, seed = sys.argv[1:6]
    settings = yaml.safe_load(Path(settings_path).read_text())
    run_dir, seed = Path(run_dir), int(seed)
    os.environ["LIFELONG_CACHE"] = str(run_dir / f"cache-lifelong-{backbone}-{method}-{seed}")  # cold stem cache
    torch.set_num_threads(settings["threads"])
    # The first optimizer imports torch._dynamo (seconds); Avalanche imports it through torchvision before
    # its clock starts, so lifelong does it before its clock too.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    t_imported, cpu_imported = time.perf_counter(), time.process_time()

    config = run_config(settings, backbone, method, seed)
    stream = stream_from_arrays(np.load(run_dir / f"data_{backbone}.npz"), settings["stream"])
    model = build_model(config.model, stream)
    init = np.load(run_dir / f"init_{backbone}.npz")  # written by run.py from the same builder
    for name, value in model.named_parameters():
        if name in init.files and not np.array_equal(value.detach().numpy(), init[name]):
            raise SystemExit(f"initial {name} differs from init_{backbone}.npz")
    stem = compute_stem_features(model, stream, config.train.eval_batch_size)
    prepare_trainable(model, config.model, config.adapter)
    method_obj = build_method(config.methods[0])
    with torch.no_grad():  # the model check: run.py compares these with Avalanche's initial logits
        probe = model(stem.test[0][:8], stream.class_names)

    t0 = time.perf_counter()
    result = run_stream(model, method_obj, stream, stem, config, checkpoint_dir=None)
    t1 = time.perf_counter()
    out = {
        "framework": "lifelong", "backbone": backbone, "method": method, "seed": seed,
        "lifelong_method": config.methods[0].name, "lifelong_params": dict(config.methods[0].params),
        "accuracy_matrix": result.accuracy_matrix.tolist(),
        "initial_logits": probe.tolist(),
        "steps_per_task": config.train.steps_per_task,
        "data_fingerprints": [[t.train.fingerprint, t.test.fingerprint] for t in stream.tasks],
        "seconds": {"import": t_imported - T_START, "experiment": t1 - t_imported, "train_eval": t1 - t0,
                    "train": result.train_seconds, "eval": result.eval_seconds,
                    "experiment_cpu": time.process_time() - cpu_imported},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    (run_dir / f"lifelong-{backbone}-{method}-{seed}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
