"""Metrics: the papers' formulas and scorers, and the cost of a change.

``continual``: Transfer/Avg/Last (MTIL), max forgetting and zero-shot degradation
(Select-and-Distill), Chaudhry and Avalanche forgetting, GEM BWT/FWT, average incremental accuracy.
``editing``: reliability, generality, locality, portability (token-level and CounterFact conventions).
``judge`` (imports torch models; not imported here): the text-to-image judge's rates and the Fréchet
distance on its features.
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
