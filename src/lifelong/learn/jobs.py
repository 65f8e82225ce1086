"""`lifelong run --jobs N`: the rows of a run config trained by N worker processes at once, then one table.

A run config's rows, one per (method, task order), are independent: each starts from a fresh copy of the
pretrained model and is written atomically to rows/<method>/order_<k>.json (lifelong.learn.driver). On a
machine with few cores, N processes with cores/N threads each train more rows per hour than one process
with every thread (small models do not keep many threads busy; benchmarks/results_time.py records both).

Each worker (`worker`, in a new Python process) runs the same `run_experiment` over the resolved config,
taking the next unfinished row that no other worker has claimed (an exclusive create of
CLAIMS/<method>/order_<k>; CLAIMS is new for every invocation, so claims of a killed run are never
inherited, and the kept rows make a rerun continue). When every worker has exited, this process writes the
results from the rows, as `lifelong run --finished` does. Rows do not depend on which worker trained them,
but a row trained with 1 thread can differ from one trained with 2 in the last digits (float reductions
split differently).

This schedules whole rows on one machine; training across machines or devices goes through Accelerate
(`accelerate launch -m lifelong.cli run ...`), which the two do not combine with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from lifelong.atomic import atomic_write_text
from lifelong.config import RunConfig, to_dict
from lifelong.errors import ConfigError, WorkerError
from lifelong.learn.driver import load_run_config, run_experiment
from lifelong.loop import make_accelerator


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_jobs(config: RunConfig, jobs: int, poll_seconds: float = 2.0) -> Path:
    """Train the missing rows of `config` with `jobs` worker processes, then write the results; the run dir."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: the number of worker processes is at least 1")
    if make_accelerator().num_processes > 1:
        raise ConfigError("--jobs runs whole rows in separate processes on this machine; under `accelerate launch` "
                          "every process already trains each row together (DDP): use one or the other")
    out = Path(config.output_dir) / config.name
    claims = out / "claims" / uuid.uuid4().hex[:12]
    claims.mkdir(parents=True)
    atomic_write_text(claims / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    threads = max(1, usable_cpus() // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{jobs} workers x {threads} thread(s); their output: {logs}/worker_<n>.log")
    # progress: rows written since the start, of those not on disk at the start (an earlier run's rows are kept
    # unless their settings changed: then they train again and the count passes the total)
    files = [out / "rows" / m.display_name / f"order_{k}.json" for m in config.methods for k in range(1, config.orders + 1)]
    started, missing = time.time(), sum(not f.is_file() for f in files)
    workers = []
    try:
        for n in range(1, jobs + 1):
            with (logs / f"worker_{n}.log").open("w") as log:
                workers.append(subprocess.Popen([sys.executable, "-c", WORKER, str(claims)],
                                                stdout=log, stderr=subprocess.STDOUT, env=env))
        with tqdm(total=missing, desc="rows trained", unit="row") as bar:
            while any(w.poll() is None for w in workers):
                time.sleep(poll_seconds)
                bar.update(sum(f.is_file() and f.stat().st_mtime >= started for f in files) - bar.n)
    finally:  # interrupted: stop the workers; their finished rows are kept, the next run continues (new claims)
        for w in workers:
            if w.poll() is None:
                w.terminate()
                w.wait()
        shutil.rmtree(claims, ignore_errors=True)
        try:
            claims.parent.rmdir()  # when no other invocation holds claims there
        except OSError:
            pass
    failed = [(n, w.returncode) for n, w in enumerate(workers, 1) if w.returncode != 0]
    if failed:
        tails = "\n".join(f"--- worker {n} (exit {rc}), {logs / f'worker_{n}.log'}:\n"
                          + (logs / f"worker_{n}.log").read_text(errors="replace")[-1500:] for n, rc in failed)
        raise WorkerError(f"{len(failed)} of {jobs} workers failed; the rows they finished are kept (rerun to continue)"
                          f"\n{tails}")
    return run_experiment(config, finished_only=True)


def worker(claims: Path) -> None:
    """One worker: the rows of CLAIMS/config.yaml that this process claims first."""
    run_experiment(load_run_config(claims / "config.yaml"), claims=claims)


WORKER = "import sys; from pathlib import Path; from lifelong.learn.jobs import worker; worker(Path(sys.argv[1]))"
