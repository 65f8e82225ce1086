"""Continual-learning metrics over an accuracy matrix (formulas: docs METHODS.md section 1).

The accuracy matrix ``acc`` has shape (T + 1, T), in percent (0-100):

    acc[0, j - 1]  = a[0, j]  zero-shot accuracy on dataset j, before any training (ZS_j)
    acc[t, j - 1]  = a[t, j]  accuracy on dataset j after training task t, t = 1..T

Rows use the math's index directly (row t = after task t); columns are shifted by one because
task j (1-based in every formula below) lives in column j - 1. Each function writes its loops in
the 1-based notation of the papers so that a formula can be checked against its code line by line.

A metric whose sum is empty (it needs j >= 2 or j < T, and T = 1) returns float('nan'): there is
nothing to measure, and 0.0 would read as "no forgetting" in a table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "METRIC_DOCS",
    "average_incremental_accuracy",
    "avalanche_forgetting",
    "avg",
    "bwt",
    "chaudhry_forgetting",
    "fwt",
    "gain_over_zero_shot",
    "last",
    "max_forgetting",
    "summarize",
    "summarize_runs",
    "transfer",
    "validate_accuracy_matrix",
    "zero_shot_degradation",
]

NAN = float("nan")


def validate_accuracy_matrix(acc: np.ndarray) -> np.ndarray:
    """Return ``acc`` as a float64 array of shape (T + 1, T), or raise ValueError saying what is wrong."""
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(
            f"accuracy matrix must be 2-D with shape (T + 1, T) (row 0 = zero-shot, row t = after "
            f"task t); got an array with shape {a.shape}"
        )
    rows, cols = a.shape
    if cols < 1 or rows != cols + 1:
        raise ValueError(
            f"accuracy matrix must have shape (T + 1, T) with T >= 1 (row 0 = zero-shot, row t = "
            f"after task t, column j - 1 = dataset of task j); got shape {a.shape}"
        )
    if not np.all(np.isfinite(a)):
        bad = [tuple(int(i) for i in idx) for idx in np.argwhere(~np.isfinite(a))[:5]]
        raise ValueError(f"accuracy matrix has non-finite entries at (row, column) {bad}")
    if a.min() < 0.0 or a.max() > 100.0:
        raise ValueError(
            f"accuracies must be percentages in [0, 100]; got values in [{a.min():g}, {a.max():g}]"
        )
    return a


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else NAN


def transfer(acc: np.ndarray) -> float:
    """Transfer (MTIL; Zheng et al. 2023, ZSCL): zero-shot ability kept on datasets not yet trained.

    ``Transfer_j = mean_{t=1..j-1} a[t, j]`` for j = 2..T;  ``Transfer = mean_j Transfer_j``.
    Row 0 (the zero-shot model) is not included; dataset 1 has no term. NaN when T = 1.
    """
    a = validate_accuracy_matrix(acc)
    T = a.shape[1]
    per_dataset = [a[1:j, j - 1].mean() for j in range(2, T + 1)]  # rows t = 1..j-1
    return _mean(per_dataset)


def avg(acc: np.ndarray) -> float:
    """Avg (MTIL; Zheng et al. 2023, ZSCL): mean accuracy over every step, past or future.

    ``Avg = mean_j mean_{t=1..T} a[t, j]`` (row 0 excluded).
    """
    a = validate_accuracy_matrix(acc)
    return float(a[1:, :].mean())


def last(acc: np.ndarray) -> float:
    """Last (MTIL; Zheng et al. 2023, ZSCL): mean accuracy of the final model, ``mean_j a[T, j]``."""
    a = validate_accuracy_matrix(acc)
    return float(a[-1, :].mean())


def max_forgetting(acc: np.ndarray) -> float:
    """Max catastrophic forgetting (Select-and-Distill; Yu et al. 2024).

    ``CF = mean_{j<T} (max_{t<T} a[t, j] - a[T, j])`` with t = 1..T-1: row 0 (zero-shot) is excluded,
    as in the official code, whose matrix holds only the trained steps (``res.iloc[:-1].max()``).
    Rows t < j (before task j was trained) do take part in the max. NaN when T = 1.
    """
    a = validate_accuracy_matrix(acc)
    T = a.shape[1]
    per_dataset = [a[1:T, j - 1].max() - a[T, j - 1] for j in range(1, T)]  # t = 1..T-1
    return _mean(per_dataset)


def zero_shot_degradation(acc: np.ndarray) -> float:
    """Max zero-shot degradation (Select-and-Distill; Yu et al. 2024): the gap before a task is fine-tuned.

    ``ZD = mean_{j>1} (ZS_j - min_{t<j} a[t, j])`` with ``ZS_j = a[0, j]`` and t = 1..j-1.
    Row 0 is excluded from the min (it is ZS_j itself, which would clip every term at >= 0 and hide
    a positive transfer); t = j is excluded because by then task j has been trained. The official
    script slices ``res.loc[:dataset, dataset]`` (pandas, end-inclusive), which also takes t = j; the
    two agree unless training task j lowered a[j, j] below every earlier a[t, j]. Can be negative
    (earlier tasks improved dataset j). NaN when T = 1.
    """
    a = validate_accuracy_matrix(acc)
    T = a.shape[1]
    per_dataset = [a[0, j - 1] - a[1:j, j - 1].min() for j in range(2, T + 1)]  # t = 1..j-1
    return _mean(per_dataset)


def chaudhry_forgetting(acc: np.ndarray) -> float:
    """Forgetting (Chaudhry et al. 2018, RWalk): drop from the best accuracy since the task was learned.

    ``f_j = max_{l in [j, T-1]} a[l, j] - a[T, j]``,  ``F = mean_{j<T} f_j``.
    Unlike ``max_forgetting`` the max starts at l = j (after the task was trained), so a pretrained
    model's accuracy before task j never counts as knowledge to forget. NaN when T = 1.
    """
    a = validate_accuracy_matrix(acc)
    T = a.shape[1]
    per_dataset = [a[j:T, j - 1].max() - a[T, j - 1] for j in range(1, T)]  # l = j..T-1
    return _mean(per_dataset)


def avalanche_forgetting(acc: np.ndarray) -> float:
    """Forgetting as Avalanche computes it (no max): ``mean_{j<T} (a[j, j] - a[T, j])``. NaN when T = 1.

    Equal to ``-bwt(acc)``.
    """
    a = validate_accuracy_matrix(acc)
    T = a.shape[1]
    per_dataset = [a[j, j - 1] - a[T, j - 1] for j in range(1, T)]
    return _mean(per_dataset)


def bwt(acc: np.ndarray) -> float:
    """Backward transfer (GEM; Lopez-Paz & Ranzato 2017): ``BWT = mean_{j<T} (a[T, j] - a[j, j])``.

    Negative means forgetting. NaN when T = 1.
    """
    a = validate_accuracy_matrix(acc)
    T = a.shape[1]
    per_dataset = [a[T, j - 1] - a[j, j - 1] for j in range(1, T)]
    return _mean(per_dataset)


def fwt(acc: np.ndarray, baseline: Sequence[float] | np.ndarray) -> float:
    """Forward transfer (GEM; Lopez-Paz & Ranzato 2017): ``FWT = mean_{j>=2} (a[j-1, j] - b_j)``.

    ``baseline`` holds b_1..b_T (length T; b_1 is unused), the accuracy of a reference model on each
    dataset: random init in GEM; for a pretrained model see ``gain_over_zero_shot``. NaN when T = 1.
    """
    a = validate_accuracy_matrix(acc)
    T = a.shape[1]
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape != (T,):
        raise ValueError(f"baseline must have one value per task, shape ({T},); got shape {b.shape}")
    per_dataset = [a[j - 1, j - 1] - b[j - 1] for j in range(2, T + 1)]
    return _mean(per_dataset)


def gain_over_zero_shot(acc: np.ndarray) -> float:
    """GEM's FWT with the zero-shot model as baseline (b_j = ZS_j = a[0, j]).

    ``mean_{j>=2} (a[j-1, j] - ZS_j)``: how training tasks 1..j-1 changed dataset j just before it
    is trained. NaN when T = 1.
    """
    a = validate_accuracy_matrix(acc)
    return fwt(a, a[0])


def average_incremental_accuracy(a_seen: Sequence[float]) -> tuple[float, float]:
    """Average incremental accuracy (class-incremental; Rebuffi et al. 2017, iCaRL).

    ``a_seen[t-1] = A_t``, the accuracy on all classes seen so far after step t. Returns
    ``(mean_t A_t, A_T)``.
    """
    values = np.asarray(a_seen, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"a_seen must be a non-empty 1-D sequence of A_t; got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("a_seen has non-finite entries")
    return float(values.mean()), float(values[-1])


# Stable names: these are the keys of summarize() and of every results table and JSON file.
METRIC_DOCS: dict[str, str] = {
    "transfer": "MTIL Transfer: mean_{j>=2} mean_{t=1..j-1} a[t,j] (row 0 excluded)",
    "avg": "MTIL Avg: mean over rows t=1..T and all datasets (row 0 excluded)",
    "last": "MTIL Last: mean_j a[T,j], the final model",
    "max_forgetting": "Select-and-Distill CF: mean_{j<T} (max_{t=1..T-1} a[t,j] - a[T,j])",
    "zero_shot_degradation": "Select-and-Distill ZD: mean_{j>=2} (a[0,j] - min_{t=1..j-1} a[t,j])",
    "chaudhry_forgetting": "Chaudhry 2018 forgetting: mean_{j<T} (max_{l=j..T-1} a[l,j] - a[T,j])",
    "avalanche_forgetting": "Avalanche forgetting: mean_{j<T} (a[j,j] - a[T,j]), no max (= -bwt)",
    "bwt": "GEM BWT: mean_{j<T} (a[T,j] - a[j,j]); negative = forgetting",
    "gain_over_zero_shot": "GEM FWT with b_j = zero-shot: mean_{j>=2} (a[j-1,j] - a[0,j])",
}

_MATRIX_METRICS = {
    "transfer": transfer,
    "avg": avg,
    "last": last,
    "max_forgetting": max_forgetting,
    "zero_shot_degradation": zero_shot_degradation,
    "chaudhry_forgetting": chaudhry_forgetting,
    "avalanche_forgetting": avalanche_forgetting,
    "bwt": bwt,
    "gain_over_zero_shot": gain_over_zero_shot,
}
assert _MATRIX_METRICS.keys() == METRIC_DOCS.keys()


def summarize(acc: np.ndarray) -> dict[str, float]:
    """Every matrix metric of one run, keyed by the names in ``METRIC_DOCS`` (same order)."""
    a = validate_accuracy_matrix(acc)
    return {name: fn(a) for name, fn in _MATRIX_METRICS.items()}


def summarize_runs(matrices: Sequence[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each metric over several runs (seeds, or task orders as in
    Select-and-Distill's 8 cyclic orders): ``{name: (mean, std)}``.

    The metric is computed per run, then averaged. The std is the population std (ddof=0, numpy's
    default), so one run gives std 0.0. Runs may differ in task order and in T.
    """
    if len(matrices) == 0:
        raise ValueError("summarize_runs needs at least one accuracy matrix")
    per_run = [summarize(m) for m in matrices]
    out: dict[str, tuple[float, float]] = {}
    for name in METRIC_DOCS:
        values = np.array([s[name] for s in per_run])
        if np.all(np.isnan(values)):
            out[name] = (NAN, NAN)
        elif np.any(np.isnan(values)):
            # Mixed T = 1 and T > 1 runs: refuse rather than average a different set of runs.
            raise ValueError(f"metric {name!r} is NaN for some runs but not others (T = 1 runs mixed in?)")
        else:
            out[name] = (float(values.mean()), float(values.std()))
    return out
