"""CPU efficiency of the demo's training step: how close it gets to the machine's fp32 matmul peak,
and where its time goes.

    python benchmarks/cpu_efficiency.py                 # the demo's model and settings, fashion-mnist task
    python benchmarks/cpu_efficiency.py --steps 10      # a quick look

Three measurements, in one process, with torch's thread count as it is (pin it with OMP_NUM_THREADS
and taskset to measure one core):

1. **Peak**: fp32 `torch.mm` of two n x n matrices (n = 512, 1024, 2048), best of `--repeats`, in
   GFLOP/s (2 n^3 FLOPs). The best size is the machine's measured peak.
2. **Step**: the demo's training step as `lifelong demo` runs it (model `embedded`, 112 px, the last 3
   blocks trainable, batch 32, `finetune`, fused AdamW, grad clipping) on cached stem outputs, with the
   allocator tuned as the CLI runs it (lifelong/runtime.py). Its FLOPs: the forward pass's matmul and
   convolution FLOPs counted by `torch.utils.flop_counter.FlopCounterMode`, times 3 for forward +
   backward (the input and the weight gradient each cost one forward; torch 2.13's counter ignores
   `groups` in convolution_backward and would count a depthwise backward 192x too high). The median
   step time gives GFLOP/s and the fraction of the peak; minor page faults per step are recorded.
3. **Where the time goes**: `torch.profiler` over `--profile-steps` steps, the self CPU time of every
   op grouped into convolution / matmul / optimizer / normalisation and activation / other, plus the
   top ops; every convolution of the trunk alone (forward + backward on its real input), in GFLOP/s;
   and, for the demo's methods whose per-task work is not a training step (EWC's Fisher, LwF's
   teacher logits), the time of that work on one task against the time of the task's 100 steps.
   EWC's Fisher is timed both ways: in closed form (what EWC runs) and through torch.func vmap.

Results: benchmarks/results/cpu_efficiency.json (atomic write), with the machine and the command.
Exit status: non-zero only on an error.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import machine, one_task_stream  # noqa: E402  (benchmarks/ is not a package)

from lifelong.atomic import atomic_write_json  # noqa: E402
from lifelong.config import to_dict  # noqa: E402
from lifelong.families import prepare_trainable  # noqa: E402
from lifelong.families.vlm import build_vlm  # noqa: E402
from lifelong.learn import build_method  # noqa: E402
from lifelong.learn.common import TaskData  # noqa: E402
from lifelong.learn.driver import load_run_config  # noqa: E402
from lifelong.loop import (  # noqa: E402
    batch_order,
    compute_stem_features,  # noqa: E402
    targets_in,
)
from lifelong.runtime import (
    tune_allocator,  # noqa: E402
    versions,  # noqa: E402
)

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak(sizes=(512, 1024, 2048), repeats: int = 5) -> dict:
    """Best fp32 GFLOP/s of torch.mm per matrix size."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out[str(n)] = 2 * n**3 / best / 1e9
    return out


def demo_step(task_source: str = "fashion-mnist", overrides=()):
    """The demo's training step as `lifelong demo` runs it, on one mtil-mini task's cached stem outputs:
    (config, model, task data, step(index) -> loss), finetune with fused AdamW and clipping."""
    config = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                         ["train.checkpoints=false", *overrides])
    stream = one_task_stream(task_source, test_items=64)
    task = stream.tasks[0]
    model = build_vlm(config.model)
    stem = compute_stem_features(model, stream, config.train.eval_batch_size)
    data = TaskData(index=0, task=task, inputs=stem.train[0], targets=targets_in(stream, 0, task.train.labels),
                    class_names=task.class_names, seen_class_names=())
    prepare_trainable(model, config.model, config.adapter)
    finetune = build_method(next(m for m in config.methods if m.name == "finetune"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay, fused=True)

    def step(index):
        batch = {"inputs": data.inputs[index], "targets": data.targets[index], "index": index}
        loss, _ = finetune.loss(model, batch, data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return config, model, data, step


def conv_layers(model, stem_batch: torch.Tensor, repeats: int = 20) -> list[dict]:
    """Each convolution of the image trunk alone: median forward + backward time on the input it gets
    in the model (same shape and memory layout), and its GFLOP/s (3x the forward FLOPs)."""
    inputs = {}
    def keep(name):
        def hook(_module, args, _output):
            inputs.setdefault(name, args[0].detach())  # returns None: the output is left as it is
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in model.image_trunk.named_modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.image_trunk(stem_batch)
    for h in hooks:
        h.remove()
    rows = []
    for name, conv in model.image_trunk.named_modules():
        if name not in inputs:
            continue
        x = inputs[name].clone().requires_grad_(True)
        out = conv(x)
        grad = torch.ones_like(out)
        forward = 2 * out.numel() * conv.weight[0].numel()  # per output: in/groups * kh * kw multiply-adds
        times = []
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            torch.autograd.grad(conv(x), [x, conv.weight], grad)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times[2:])
        rows.append({"name": name, "kernel": conv.kernel_size[0], "groups": conv.groups, "input": list(x.shape),
                     "ms": median * 1e3, "gflops": 3 * forward / median / 1e9})
    return rows


def op_category(name: str) -> str:
    n = name.lower()
    if "conv" in n:
        return "convolution"
    if n.startswith(("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")):
        return "matmul"
    if "adam" in n or "_foreach" in n or "clip_grad" in n or "norm" == n.rsplit("::", 1)[-1]:
        return "optimizer and clipping"
    if any(k in n for k in ("batch_norm", "silu", "sigmoid", "relu", "hardtanh", "native_batch_norm")):
        return "normalisation and activation"
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed training steps (default 40)")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps under torch.profiler (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each matmul size (default 5)")
    parser.add_argument("--task", default="fashion-mnist", help="the mtil-mini task (default fashion-mnist)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_efficiency.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides of the demo config")
    args = parser.parse_args(argv)
    tuned = tune_allocator()

    peak = matmul_peak(repeats=args.repeats)
    peak_gflops = max(peak.values())
    print(f"fp32 matmul peak: {peak_gflops:.1f} GFLOP/s ({', '.join(f'n={n}: {g:.1f}' for n, g in peak.items())})")

    config, model, data, step = demo_step(args.task, args.overrides)
    task = data.task
    order = batch_order(len(data.inputs), config.train.batch_size, args.steps + args.profile_steps + 3, seed=0)

    from torch.utils.flop_counter import FlopCounterMode

    step(order[0])  # warm-up (first-call allocations, the frozen text cache)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(data.inputs[order[1]], data.class_names)
    forward_flops = counter.get_total_flops()
    flops = 3 * forward_flops
    by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    step(order[1])

    import resource

    times, faults0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(order[2 + i])
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.steps
    median = statistics.median(times)
    achieved = flops / median / 1e9
    print(f"training step: {flops / 1e9:.2f} GFLOP, median {median * 1e3:.1f} ms -> {achieved:.1f} GFLOP/s "
          f"= {100 * achieved / peak_gflops:.1f}% of the matmul peak; {faults:.0f} minor page faults per step "
          f"(allocator tuned: {tuned})")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.profile_steps):
            step(order[2 + args.steps + i])
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    categories: dict[str, float] = defaultdict(float)
    for e in events:
        categories[op_category(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    share = {k: 100 * v / total_self for k, v in sorted(categories.items(), key=lambda kv: -kv[1])}
    print("self CPU time by category (% of the profiled steps):")
    for k, v in share.items():
        print(f"  {k:32s} {v:5.1f}%")
    print("top ops:")
    for e in top:
        print(f"  {e.key:45s} {100 * e.self_cpu_time_total / total_self:5.1f}%  calls {e.count}")

    layers = conv_layers(model, data.inputs[order[0]])
    print("trunk convolutions alone, forward + backward (input and weight gradients) on their real inputs:")
    for row in layers:
        print(f"  {row['name']:28s} k{row['kernel']} groups {row['groups']:5d}  {row['ms']:6.2f} ms  {row['gflops']:6.1f} GFLOP/s")

    # per-task work outside the steps: EWC's Fisher and LwF's teacher logits, on this task
    extra = {}
    for name in ("ewc", "lwf"):
        mc = next((m for m in config.methods if m.name == name), None)
        if mc is None:
            continue
        method = build_method(mc)
        t0 = time.perf_counter()
        if name == "ewc":
            method.end_task(model, data)
            extra[name] = time.perf_counter() - t0
            # the same Fisher through torch.func.vmap (the fallback, and how EWC computed it before)
            from lifelong.learn.fisher import diagonal_fisher

            n = min(method.params.fisher_samples, len(data.inputs))
            t0 = time.perf_counter()
            diagonal_fisher(model, data.inputs[:n], data.targets[:n], data.class_names, method.params.fisher,
                            method.params.fisher_chunk, method="vmap")
            extra["ewc_fisher_vmap"] = time.perf_counter() - t0
            print(f"ewc's Fisher through vmap instead: {extra['ewc_fisher_vmap']:.2f} s")
        else:
            method.begin_task(model, TaskData(**{**data.__dict__, "seen_class_names": task.class_names}))
            extra[name] = time.perf_counter() - t0
        print(f"{name} per-task work ({'Fisher' if name == 'ewc' else 'teacher logits'}): {extra[name]:.2f} s "
              f"= {extra[name] / (median * config.train.steps_per_task):.2f} x the task's {config.train.steps_per_task} steps")

    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "config": to_dict(config),
        "matmul_peak_gflops": peak,
        "allocator_tuned": tuned,
        "step": {"flops": flops, "forward_flops": forward_flops, "forward_flops_by_op": by_op, "median_seconds": median,
                 "seconds": times, "gflops": achieved, "fraction_of_peak": achieved / peak_gflops,
                 "minor_page_faults_per_step": faults},
        "profile": {"steps": args.profile_steps, "self_cpu_share_percent": share,
                    "top_ops": [{"op": e.key, "self_percent": 100 * e.self_cpu_time_total / total_self, "calls": e.count}
                                for e in top]},
        "conv_layers": layers,
        "per_task_work_seconds": extra,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
