"""Metrics: continual-learning scores over an accuracy matrix, and the cost of a method.

``continual``: Transfer/Avg/Last (MTIL), max forgetting and zero-shot degradation
(Select-and-Distill), Chaudhry and Avalanche forgetting, GEM BWT/FWT, average incremental accuracy.
``cost``: trainable parameter counts, peak memory, wall-clock time.
"""

from lifelong.metrics.continual import (
    METRIC_DOCS,
    avalanche_forgetting,
    average_incremental_accuracy,
    avg,
    bwt,
    chaudhry_forgetting,
    fwt,
    gain_over_zero_shot,
    last,
    max_forgetting,
    summarize,
    summarize_runs,
    transfer,
    validate_accuracy_matrix,
    zero_shot_degradation,
)
from lifelong.metrics.cost import PeakMemory, Stopwatch, count_parameters

__all__ = [
    "METRIC_DOCS",
    "PeakMemory",
    "Stopwatch",
    "average_incremental_accuracy",
    "avalanche_forgetting",
    "avg",
    "bwt",
    "chaudhry_forgetting",
    "count_parameters",
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
