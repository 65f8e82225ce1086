"""Continual-learning metrics against hand-computed values, and the cost helpers.

The two matrices are built so that a wrong index range gives a different number:
A separates "row 0 included or not" (Transfer, Avg, ZD) and Chaudhry vs Avalanche forgetting;
B separates "t = j included in ZD's min", "row 0 in CF's max" and CF vs Chaudhry.
"""

import math

import numpy as np
import pytest

from lifelong.metrics import (
    METRIC_DOCS,
    PeakMemory,
    Stopwatch,
    avalanche_forgetting,
    average_incremental_accuracy,
    avg,
    bwt,
    chaudhry_forgetting,
    count_parameters,
    fwt,
    gain_over_zero_shot,
    last,
    max_forgetting,
    summarize,
    summarize_runs,
    transfer,
    zero_shot_degradation,
)

# rows: zero-shot, after task 1, 2, 3; columns: datasets of tasks 1, 2, 3
A = np.array(
    [
        [50.0, 60.0, 70.0],  # ZS
        [90.0, 65.0, 74.0],  # after task 1
        [92.0, 95.0, 58.0],  # after task 2
        [70.0, 85.0, 99.0],  # after task 3
    ]
)
B = np.array(
    [
        [40.0, 90.0, 30.0],
        [60.0, 85.0, 25.0],
        [55.0, 70.0, 35.0],
        [50.0, 65.0, 10.0],
    ]
)

# A
# transfer: j=2: a[1,2]=65; j=3: (a[1,3]+a[2,3])/2 = (74+58)/2 = 66  -> (65+66)/2 = 65.5
#           (with row 0: (60+65)/2=62.5, (70+74+58)/3=67.33 -> 64.92)
# avg: rows 1..3 = (229 + 245 + 254)/9 = 728/9 = 80.889   (with row 0: 908/12 = 75.67)
# last: (70+85+99)/3 = 254/3 = 84.667
# max_forgetting: j=1: max(90,92)-70 = 22; j=2: max(65,95)-85 = 10 -> 16
# zero_shot_degradation: j=2: 60-min(65) = -5; j=3: 70-min(74,58) = 12 -> 3.5
#           (with row 0 in the min: 0 and 12 -> 6)
# chaudhry: j=1: max_{l=1,2}(90,92)-70 = 22; j=2: max_{l=2}(95)-85 = 10 -> 16
# avalanche: j=1: a[1,1]-a[3,1] = 90-70 = 20; j=2: 95-85 = 10 -> 15
# bwt: -15
# gain_over_zero_shot: j=2: a[1,2]-60 = 5; j=3: a[2,3]-70 = -12 -> -3.5
# fwt, b = (10, 20, 30): j=2: 65-20 = 45; j=3: 58-30 = 28 -> 36.5
EXPECTED_A = {
    "transfer": 65.5,
    "avg": 728 / 9,
    "last": 254 / 3,
    "max_forgetting": 16.0,
    "zero_shot_degradation": 3.5,
    "chaudhry_forgetting": 16.0,
    "avalanche_forgetting": 15.0,
    "bwt": -15.0,
    "gain_over_zero_shot": -3.5,
}

# B
# transfer: j=2: 85; j=3: (25+35)/2 = 30 -> 57.5
# avg: (170 + 160 + 125)/9 = 455/9 = 50.556
# last: 125/3 = 41.667
# max_forgetting: j=1: max(60,55)-50 = 10; j=2: max(85,70)-65 = 20 -> 15
#           (with row 0 in the max: j=2: max(90,85,70)-65 = 25 -> 17.5)
# zero_shot_degradation: j=2: 90-min(85) = 5; j=3: 30-min(25,35) = 5 -> 5
#           (with t = j in the min: 90-min(85,70) = 20; 30-min(25,35,10) = 20 -> 20)
# chaudhry: j=1: max(60,55)-50 = 10; j=2: max_{l=2}(70)-65 = 5 -> 7.5
# avalanche: j=1: 60-50 = 10; j=2: 70-65 = 5 -> 7.5
# bwt: -7.5
# gain_over_zero_shot: j=2: 85-90 = -5; j=3: 35-30 = 5 -> 0
EXPECTED_B = {
    "transfer": 57.5,
    "avg": 455 / 9,
    "last": 125 / 3,
    "max_forgetting": 15.0,
    "zero_shot_degradation": 5.0,
    "chaudhry_forgetting": 7.5,
    "avalanche_forgetting": 7.5,
    "bwt": -7.5,
    "gain_over_zero_shot": 0.0,
}

FUNCTIONS = {
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


@pytest.mark.parametrize("matrix, expected", [(A, EXPECTED_A), (B, EXPECTED_B)], ids=["A", "B"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_metric_matches_hand_computed(matrix, expected, name):
    assert FUNCTIONS[name](matrix) == pytest.approx(expected[name])


@pytest.mark.parametrize("matrix, expected", [(A, EXPECTED_A), (B, EXPECTED_B)], ids=["A", "B"])
def test_summarize_returns_every_metric(matrix, expected):
    summary = summarize(matrix)
    assert list(summary) == list(METRIC_DOCS)
    assert summary == pytest.approx(expected)
    assert all(isinstance(v, float) for v in summary.values())


def test_fwt_with_given_baseline():
    # j=2: a[1,2]-b_2 = 65-20 = 45; j=3: a[2,3]-b_3 = 58-30 = 28 -> 36.5
    assert fwt(A, [10.0, 20.0, 30.0]) == pytest.approx(36.5)
    assert fwt(A, A[0]) == pytest.approx(gain_over_zero_shot(A))
    with pytest.raises(ValueError, match="one value per task"):
        fwt(A, [10.0, 20.0])


def test_identities_between_metrics():
    for m in (A, B):
        assert avalanche_forgetting(m) == pytest.approx(-bwt(m))
        # Chaudhry's max starts at l = j, a subset of CF's t = 1..T-1
        assert chaudhry_forgetting(m) <= max_forgetting(m)


def test_accepts_nested_lists():
    assert summarize(A.tolist()) == pytest.approx(EXPECTED_A)


def test_t_equals_one():
    one = np.array([[30.0], [80.0]])
    summary = summarize(one)
    assert summary["avg"] == 80.0
    assert summary["last"] == 80.0
    undefined = set(METRIC_DOCS) - {"avg", "last"}
    for name in undefined:
        assert math.isnan(summary[name]), name
    assert math.isnan(fwt(one, [10.0]))


def test_t_equals_two():
    m = np.array([[50.0, 40.0], [90.0, 60.0], [80.0, 95.0]])
    # transfer: a[1,2] = 60; avg: (90+60+80+95)/4 = 81.25; last: 87.5
    # CF: max_{t=1}(90)-80 = 10; ZD: 40-60 = -20; gain: 60-40 = 20; bwt: 80-90 = -10
    assert transfer(m) == 60.0
    assert avg(m) == 81.25
    assert last(m) == 87.5
    assert max_forgetting(m) == 10.0
    assert chaudhry_forgetting(m) == 10.0
    assert zero_shot_degradation(m) == -20.0
    assert gain_over_zero_shot(m) == 20.0
    assert bwt(m) == -10.0


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((3, 3)), r"shape \(T \+ 1, T\)"),  # square: zero-shot row missing?
        (np.zeros((3,)), "2-D"),
        (np.zeros((1, 0)), "T >= 1"),
        (np.zeros((4, 2)), r"got shape \(4, 2\)"),
        (np.array([[50.0], [float("nan")]]), "non-finite"),
        (np.array([[0.5], [0.9]]) * 200, r"\[0, 100\]"),
    ],
)
def test_shape_and_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        summarize(bad)
    with pytest.raises(ValueError, match=message):
        transfer(bad)


def test_summarize_runs_mean_and_std():
    stats = summarize_runs([A, B])
    assert list(stats) == list(METRIC_DOCS)
    mean, std = stats["transfer"]
    # (65.5 + 57.5)/2 = 61.5; population std = |65.5 - 57.5|/2 = 4
    assert mean == pytest.approx(61.5)
    assert std == pytest.approx(4.0)
    mean, std = stats["chaudhry_forgetting"]
    assert (mean, std) == pytest.approx(((16 + 7.5) / 2, (16 - 7.5) / 2))
    assert summarize_runs([A])["avg"] == pytest.approx((728 / 9, 0.0))


def test_summarize_runs_errors():
    with pytest.raises(ValueError, match="at least one"):
        summarize_runs([])
    one = np.array([[30.0], [80.0]])
    with pytest.raises(ValueError, match="NaN for some runs"):
        summarize_runs([A, one])
    assert all(math.isnan(v) for v in summarize_runs([one, one])["transfer"])


def test_average_incremental_accuracy():
    # A_t = 90, 80, 70 -> mean 80, last 70
    assert average_incremental_accuracy([90.0, 80.0, 70.0]) == (80.0, 70.0)
    assert average_incremental_accuracy(np.array([55.0])) == (55.0, 55.0)
    with pytest.raises(ValueError, match="non-empty"):
        average_incremental_accuracy([])


def test_metric_docs_state_conventions():
    assert set(METRIC_DOCS) == set(FUNCTIONS)
    assert "t=1..T-1" in METRIC_DOCS["max_forgetting"]
    assert "t=1..j-1" in METRIC_DOCS["zero_shot_degradation"]
    assert "l=j..T-1" in METRIC_DOCS["chaudhry_forgetting"]
    for name, fn in FUNCTIONS.items():
        assert fn.__doc__ and "mean" in fn.__doc__, name


# ---------------------------------------------------------------- cost


def test_count_parameters_with_frozen_and_tied():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    # Linear(4,3): 12 + 3 = 15; Linear(3,2): 6 + 2 = 8; total 23
    assert count_parameters(model) == (23, 23)
    model[0].weight.requires_grad_(False)  # freeze 12
    assert count_parameters(model) == (11, 23)
    for p in model.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == (0, 23)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(5, 5, bias=False)
            self.b = torch.nn.Linear(5, 5, bias=False)
            self.b.weight = self.a.weight  # shared: counted once

    assert count_parameters(Tied()) == (25, 25)


def test_peak_memory_sees_a_200_mb_array():
    with PeakMemory() as mem:
        x = np.ones(200 * 2**20 // 8)  # 200 MiB, written so the pages are resident
        x.sum()
        del x
    if math.isnan(mem.delta_mb):
        pytest.skip("no /proc on this platform: PeakMemory cannot sample RSS")
    assert mem.baseline_mb > 0
    assert 180 <= mem.delta_mb <= 400
    assert mem.peak_mb == pytest.approx(mem.baseline_mb + mem.delta_mb)


def test_peak_memory_after_a_bigger_earlier_peak():
    # The process already peaked higher before the block: a lifetime high-water mark would report
    # that old peak; the sampled delta must stay small for a block that allocates little.
    big = np.ones(300 * 2**20 // 8)
    del big
    with PeakMemory() as mem:
        small = np.ones(2**20 // 8)  # 1 MiB
        small.sum()
    if math.isnan(mem.delta_mb):
        pytest.skip("no /proc on this platform")
    assert mem.delta_mb < 100


def test_stopwatch():
    import time

    sw = Stopwatch()
    with pytest.raises(RuntimeError):
        _ = sw.elapsed
    with sw:
        time.sleep(0.05)
        assert sw.elapsed > 0
    first = sw.elapsed
    assert 0.04 <= first < 1.0
    time.sleep(0.01)
    assert sw.elapsed == first  # frozen after the block
