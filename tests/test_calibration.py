"""edgeclf.calibration: temperature scaling and operating-point fitting."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from edgeclf.calibration import (
    TEMPERATURE_BOUNDS,
    _highest_threshold,
    _nll,
    fit_decision_rule,
    fit_temperature,
)
from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime.postprocess import DecisionRule, probabilities


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sample_classes(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class per row drawn from the row's probabilities."""
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)


def _nll_multiclass(z: np.ndarray, y: np.ndarray, t: float) -> float:
    p = _softmax(z / t)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


# ---------------------------------------------------------------- fit_temperature


def test_fit_temperature_recovers_known_temperature_multiclass() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(20000, 4))
    y = _sample_classes(_softmax(z), rng)  # labels are calibrated for z ...
    t = fit_temperature(3.0 * z, y, "multiclass")  # ... so a model reporting 3 z is 3x over-confident
    assert t == pytest.approx(3.0, rel=0.05)
    assert _nll_multiclass(3 * z, y, t) < _nll_multiclass(3 * z, y, 1.0)


def test_fit_temperature_recovers_known_temperature_binary_and_multilabel() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.5, size=(20000, 1))
    y = (rng.random(20000) < 1 / (1 + np.exp(-z[:, 0]))).astype(int)
    # An under-confident model (logits halved) needs T = 0.5.
    assert fit_temperature(0.5 * z, y, "binary") == pytest.approx(0.5, rel=0.06)

    zm = rng.normal(scale=2.0, size=(8000, 3))
    ym = (rng.random(zm.shape) < 1 / (1 + np.exp(-zm))).astype(int)
    assert fit_temperature(2.0 * zm, ym, "multilabel") == pytest.approx(2.0, rel=0.06)


def test_fit_temperature_minimises_nll() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(scale=3.0, size=(500, 3))
    y = _sample_classes(_softmax(z / 1.7), rng)
    t = fit_temperature(z, y, "multiclass")
    best = _nll_multiclass(z, y, t)
    for other in (t * 0.97, t * 1.03, 1.0):
        assert best <= _nll_multiclass(z, y, other) + 1e-12


def test_fit_temperature_degenerate_returns_one_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    z = np.random.default_rng(3).normal(size=(50, 3))
    with caplog.at_level(logging.WARNING, logger="edgeclf.calibration"):
        assert fit_temperature(z, np.full(50, 2), "multiclass") == 1.0
    assert "only class 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeclf.calibration"):
        assert fit_temperature(z[:, :1], np.ones(50, dtype=int), "binary") == 1.0
        assert fit_temperature(z, np.zeros((50, 3), dtype=int), "multilabel") == 1.0
    assert caplog.text.count("T = 1.0") == 2


def test_fit_temperature_separable_data_keeps_logits_unscaled(caplog: pytest.LogCaptureFixture) -> None:
    # Perfect separation drives the NLL minimum to T -> 0; an overconfident T would be a lie.
    y = np.array([0, 1] * 20)
    z = np.where(y == 1, 1.0, -1.0)[:, None]
    assert _nll(z, y, "binary", TEMPERATURE_BOUNDS[0]) < _nll(z, y, "binary", 1.0)
    with caplog.at_level(logging.WARNING, logger="edgeclf.calibration"):
        t = fit_temperature(z, y, "binary")
    assert t == 1.0
    assert "perfectly separated" in caplog.text


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
@pytest.mark.parametrize("margin", [4.0, 20.0])
def test_fit_temperature_separated_by_large_margins_keeps_logits_unscaled(task: str, margin: float,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Large margins underflow the NLL to 0 over a stretch of T, where a bounded search can stop midway: the demo's
    bundle (smallest margin 3.7) got T = 0.084, twelve times sharper, and no warning."""
    rng = np.random.default_rng(1)
    n = 135
    if task == "multiclass":
        y = np.arange(n) % 3
        z = rng.normal(0, 1, (n, 3))
        z[np.arange(n), y] = z.max(axis=1) + margin + rng.uniform(0, 30, n)
    else:
        y = (np.arange(n) % 2)[:, None] if task == "multilabel" else np.arange(n) % 2
        sign = np.where(np.asarray(y).reshape(n, -1) == 1, 1.0, -1.0)
        z = sign * (margin + rng.uniform(0, 30, (n, 1)))
    with caplog.at_level(logging.WARNING, logger="edgeclf.calibration"):
        t = fit_temperature(z, y, task)
    assert t == 1.0 and "perfectly separated" in caplog.text


def test_fit_temperature_underconfident_overlapping_data_gets_the_lower_bound(caplog: pytest.LogCaptureFixture) -> None:
    # Overlapping classes with logits 50x too small: the NLL optimum lies below 0.05, but the set is not separated,
    # so the bound is a real improvement (NLL ~0.52 against log 2 at T = 1), not a sign of a too-easy set.
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 200)
    z = (0.02 * (np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.0, len(y))))[:, None]
    lo = TEMPERATURE_BOUNDS[0]
    with caplog.at_level(logging.WARNING, logger="edgeclf.calibration"):
        t = fit_temperature(z, y, "binary")
    assert t == lo
    assert _nll(z, y, "binary", t) < _nll(z, y, "binary", 1.0) - 0.1
    assert "lower edge" in caplog.text and "not separated" in caplog.text
    # Multiclass: the same with softmax; one item whose true class is not strictly ahead breaks separation.
    zm = np.tile(np.array([[0.01, 0.0, 0.0], [0.0, 0.01, 0.0], [0.0, 0.0, 0.01]]), (20, 1))
    ym = np.tile(np.arange(3), 20)
    assert fit_temperature(zm, ym, "multiclass") == 1.0  # separated: every true class ahead by 0.01
    zm[0] = [0.0, 0.0, 0.0]  # a tie: not ahead
    zm[1] = [0.01, 0.0, 0.0]  # wrong class ahead
    assert fit_temperature(zm, ym, "multiclass") == lo


@pytest.mark.parametrize(
    ("logits", "labels", "task", "error", "match"),
    [
        (np.zeros((4, 3)), np.zeros(5, dtype=int), "multiclass", DataError, r"shape \(4,\)"),
        (np.zeros((4, 3)), np.array([0, 1, 2, 3]), "multiclass", DataError, "0..2"),
        (np.zeros((4, 1)), np.array([0, 1, 2, 1]), "binary", DataError, "0 or 1"),
        (np.zeros((4, 1)), np.array([0.0, 1.0, 0.5, 1.0]), "binary", DataError, "whole numbers"),
        (np.zeros((4, 2)), np.zeros(4, dtype=int), "multilabel", DataError, r"\(4, 2\)"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "multiclass", DataError, "empty"),
        (np.zeros((4, 2)), np.zeros(4, dtype=int), "binary", ConfigError, r"\(N, 1\)"),
        (np.zeros((4, 2)), np.zeros(4, dtype=int), "ordinal", ConfigError, "unknown task"),
    ],
)
def test_fit_temperature_input_errors(logits, labels, task, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        fit_temperature(logits, labels, task)


# ---------------------------------------------------------------- fit_decision_rule


def _binary_probs(p_pos: list[float]) -> np.ndarray:
    p = np.asarray(p_pos, dtype=float)
    return np.stack([1 - p, p], axis=1)


def _ovr_sensitivity(scores: np.ndarray, is_pos: np.ndarray, t: float) -> float:
    return float(np.mean(scores[is_pos] >= t))


def _ovr_specificity(scores: np.ndarray, is_pos: np.ndarray, t: float) -> float:
    return float(np.mean(scores[~is_pos] < t))


def test_binary_threshold_hand_computed() -> None:
    # positives score 0.9 0.8 0.7 0.6 0.2; negatives 0.65 0.5 0.1
    probs = _binary_probs([0.9, 0.8, 0.7, 0.6, 0.2, 0.65, 0.5, 0.1])
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    rule = fit_decision_rule(probs, y, "binary", target_sensitivity=0.8)
    # 4 of 5 positives needed: the highest threshold meeting that is 0.6 (the 4th highest positive).
    # Every t in (0.5, 0.6] keeps negatives 0.5 and 0.1 out (specificity 2/3); the lowest positive above
    # the negative 0.5 is 0.6 itself, so the threshold sits midway: (0.5 + 0.6) / 2 = 0.55.
    assert rule.kind == "threshold" and rule.positive == 1 and rule.target_sensitivity == 0.8
    assert rule.thresholds == pytest.approx((0.55,))
    assert _ovr_sensitivity(probs[:, 1], y == 1, rule.thresholds[0]) == 0.8
    assert _ovr_specificity(probs[:, 1], y == 1, rule.thresholds[0]) == pytest.approx(2 / 3)

    def fitted(target: float) -> float:
        (t,) = fit_decision_rule(probs, y, "binary", target_sensitivity=target).thresholds
        return t

    # 0.9 and 1.0: all 5 positives -> t_hi 0.2; highest negative below 0.1 -> (0.1 + 0.2) / 2.
    assert fitted(0.9) == pytest.approx(0.15)
    assert fitted(1.0) == pytest.approx(0.15)
    # 0.2: 1 positive -> t_hi 0.9; highest negative below is 0.65, and the lowest positive above it is
    # 0.7 -> 0.675. Same specificity (1.0) as 0.9 but sensitivity 3/5 instead of 1/5.
    assert fitted(0.2) == pytest.approx(0.675)
    assert _ovr_sensitivity(probs[:, 1], y == 1, fitted(0.2)) == pytest.approx(0.6)
    # 0.6: 3 positives -> t_hi 0.7 -> the same interval (0.65, 0.7] -> 0.675.
    assert fitted(0.6) == pytest.approx(0.675)
    # 0.61: 3.05 -> 4 positives -> t_hi 0.6 -> 0.55.
    assert fitted(0.61) == pytest.approx(0.55)


def test_binary_threshold_no_negative_below() -> None:
    # positives 0.9 0.4; negative 0.95. Target 0.5 -> t_hi 0.9; no negative scores below it, so the floor
    # is 0.0 and the lowest positive above it is 0.4 -> 0.2 (sensitivity 1.0, specificity 0 either way).
    probs = _binary_probs([0.9, 0.4, 0.95])
    y = np.array([1, 1, 0])
    (t,) = fit_decision_rule(probs, y, "binary", target_sensitivity=0.5).thresholds
    assert t == pytest.approx(0.2)
    assert _ovr_sensitivity(probs[:, 1], y == 1, t) == 1.0


def test_well_separated_keeps_all_positives() -> None:
    # Every positive scores above every negative: the threshold goes midway between the highest negative
    # (0.3) and the lowest positive (0.6), keeping all positives (the old rule kept only ceil(0.9 * 10)).
    pos = np.linspace(0.6, 0.95, 10)
    neg = np.array([0.05, 0.1, 0.2, 0.3])
    probs = _binary_probs(list(pos) + list(neg))
    y = np.array([1] * 10 + [0] * 4)
    (t,) = fit_decision_rule(probs, y, "binary", target_sensitivity=0.9).thresholds
    assert t == pytest.approx(0.45)
    assert _ovr_sensitivity(probs[:, 1], y == 1, t) == 1.0
    assert _ovr_specificity(probs[:, 1], y == 1, t) == 1.0
    # Multilabel, per label. Label 0 (positives 0.9 0.8 0.6, negatives 0.3 0.1) is separated: 0.45 for
    # both targets. Label 1 (positives 0.9 0.8 0.6, negatives 0.7 0.2): target 2/3 -> t_hi 0.8, highest
    # negative below 0.7 -> 0.75; target 1.0 -> t_hi 0.6, highest negative below 0.2 -> 0.4.
    pl = np.array([[0.9, 0.9], [0.8, 0.8], [0.6, 0.6], [0.3, 0.7], [0.1, 0.2]])
    yl = np.array([[1, 1], [1, 1], [1, 1], [0, 0], [0, 0]])
    rl = fit_decision_rule(pl, yl, "multilabel", target_sensitivity=2 / 3)
    assert rl.kind == "multilabel" and rl.thresholds == pytest.approx((0.45, 0.75))
    assert fit_decision_rule(pl, yl, "multilabel", target_sensitivity=1.0).thresholds == pytest.approx(
        (0.45, 0.4)
    )


def test_binary_threshold_with_positive_zero() -> None:
    probs = _binary_probs([0.9, 0.8, 0.7, 0.6, 0.2, 0.65, 0.5, 0.1])  # p[:, 0] = 1 - these
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    rule = fit_decision_rule(probs, y, "binary", target_sensitivity=2 / 3, positive=0)
    # class-0 scores of the class-0 samples: 0.35 0.5 0.9; of the class-1 samples: 0.1 0.2 0.3 0.4 0.8.
    # 2 of 3 needed -> t_hi 0.5; highest class-1 score below is 0.4 -> (0.4 + 0.5) / 2 = 0.45.
    assert rule.positive == 0 and rule.thresholds == pytest.approx((0.45,))
    # All 3 -> t_hi 0.35; highest class-1 score below is 0.3 -> 0.325.
    rule = fit_decision_rule(probs, y, "binary", target_sensitivity=1.0, positive=0)
    assert rule.positive == 0 and rule.thresholds == pytest.approx((0.325,))


def test_target_times_count_rounding() -> None:
    # 0.56 * 25 = 14.000000000000002 in floating point; 14 of 25 positives meet the target, so the highest
    # threshold is the 14th positive (0.69), not the 15th (0.67).
    assert 0.56 * 25 > 14
    scores = np.linspace(0.95, 0.47, 25)  # step 0.02
    is_pos = np.array([True] * 25 + [False, False])
    all_scores = np.concatenate([scores, [0.68, 0.01]])
    assert _highest_threshold(all_scores, is_pos, 0.56) == scores[13]
    # The negative 0.68 lies between the two, so the fitted threshold shows which one was used:
    # 14 positives -> (0.68 + 0.69) / 2 = 0.685; 15 would give (0.01 + 0.47) / 2 = 0.24.
    probs = _binary_probs(list(all_scores))
    (t,) = fit_decision_rule(probs, is_pos.astype(int), "binary", target_sensitivity=0.56).thresholds
    assert t == pytest.approx(0.685)
    assert _ovr_sensitivity(all_scores, is_pos, t) == 14 / 25


def _check_operating_point(scores: np.ndarray, is_pos: np.ndarray, t: float, target: float) -> None:
    """`t` meets the target, has the best specificity there and, among those, the best sensitivity."""
    sens = _ovr_sensitivity(scores, is_pos, t)
    spec = _ovr_specificity(scores, is_pos, t)
    # (a) the target is met
    assert sens >= target
    # (b) the specificity is the best reachable at the target, i.e. that of the highest such threshold
    t_hi = _highest_threshold(scores, is_pos, target)
    assert _ovr_sensitivity(scores, is_pos, t_hi) >= target
    assert _ovr_sensitivity(scores, is_pos, float(np.nextafter(t_hi, 2.0))) < target
    assert spec == _ovr_specificity(scores, is_pos, t_hi)
    # (c) no threshold with that specificity keeps more positives: sensitivity equals that just above
    # the highest negative below t_hi (lower thresholds let that negative in)
    neg_below = scores[~is_pos & (scores < t_hi)]
    floor = float(neg_below.max()) if neg_below.size else 0.0
    assert sens == _ovr_sensitivity(scores, is_pos, float(np.nextafter(floor, 2.0)))
    if neg_below.size:
        assert _ovr_specificity(scores, is_pos, floor) < spec
    # (d) strictly between that negative and the lowest positive above it
    lowest_pos = float(scores[is_pos & (scores > floor)].min())
    assert floor < t < lowest_pos <= t_hi
    # Brute force over every distinct threshold (sensitivity and specificity only change at scores).
    candidates = [c for c in np.unique(scores) if _ovr_sensitivity(scores, is_pos, c) >= target]
    best_spec = max(_ovr_specificity(scores, is_pos, c) for c in candidates)
    assert spec == best_spec
    same_spec = [c for c in candidates if _ovr_specificity(scores, is_pos, c) == best_spec]
    assert sens == max(_ovr_sensitivity(scores, is_pos, c) for c in same_spec)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_fitted_thresholds_meet_target_with_best_specificity(target: float) -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(size=(300, 3))
    y = rng.integers(0, 3, 300)
    z[np.arange(300), y] += 1.0
    # binary
    pb = probabilities(z[:, :1], "binary")
    yb = (rng.random(300) < pb[:, 1]).astype(int)
    rb = fit_decision_rule(pb, yb, "binary", target_sensitivity=target)
    assert rb.kind == "threshold" and rb.positive == 1 and rb.target_sensitivity == target
    _check_operating_point(pb[:, 1], yb == 1, rb.thresholds[0], target)
    # multiclass: one-vs-rest per class
    pm = probabilities(z, "multiclass")
    rm = fit_decision_rule(pm, y, "multiclass", target_sensitivity=target)
    assert rm.kind == "max-ratio" and rm.positive is None and rm.target_sensitivity == target
    assert len(rm.thresholds) == 3
    for k, t in enumerate(rm.thresholds):
        _check_operating_point(pm[:, k], y == k, t, target)
    # multilabel
    pl = probabilities(z, "multilabel")
    yl = (rng.random(z.shape) < pl).astype(int)
    rl = fit_decision_rule(pl, yl, "multilabel", target_sensitivity=target)
    assert rl.kind == "multilabel" and len(rl.thresholds) == 3
    for k, t in enumerate(rl.thresholds):
        _check_operating_point(pl[:, k], yl[:, k] == 1, t, target)


def test_class_without_positives_is_named() -> None:
    probs = probabilities(np.random.default_rng(5).normal(size=(6, 3)), "multiclass")
    with pytest.raises(DataError, match=r"class 'effusion' \(index 2\) has no positive samples") as info:
        fit_decision_rule(
            probs, [0, 1, 0, 1, 0, 1], "multiclass", label_names=["normal", "pneumonia", "effusion"]
        )
    assert "split" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="label index 1 has no positive"):
        fit_decision_rule(probs[:, :2], [[1, 0], [0, 0], [1, 0], [0, 0], [1, 0], [0, 0]], "multilabel")
    with pytest.raises(DataError, match="class index 1"):
        fit_decision_rule(_binary_probs([0.2, 0.3]), [0, 0], "binary")


def test_zero_probability_positive_gets_smallest_threshold(caplog: pytest.LogCaptureFixture) -> None:
    probs = _binary_probs([0.9, 0.0, 0.3])  # positives 0.9 0.0; negative 0.3
    with caplog.at_level(logging.WARNING, logger="edgeclf.calibration"):
        rule = fit_decision_rule(probs, [1, 1, 0], "binary", target_sensitivity=1.0)
    # Both positives needed -> t_hi 0.0, no positive in (0.0, 0.0] to go midway to -> 0 -> floored at
    # 1e-12, which keeps only the 0.9 positive.
    assert rule.thresholds == (1e-12,)
    assert "reaches 0.500" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeclf.calibration"):
        # One positive needed -> t_hi 0.9, highest negative below 0.3 -> (0.3 + 0.9) / 2; no warning.
        assert fit_decision_rule(probs, [1, 1, 0], "binary", target_sensitivity=0.5).thresholds == (
            pytest.approx(0.6),
        )
        # No negative below t_hi 0.9 -> floor 0.0; the 0.0 positive is not above it (no t > 0 keeps it),
        # so the lowest positive above the floor is 0.9 itself -> 0.45.
        assert fit_decision_rule(
            _binary_probs([0.9, 0.0, 0.95]), [1, 1, 0], "binary", target_sensitivity=0.5
        ).thresholds == (pytest.approx(0.45),)
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_sensitivity": 0.0}, ConfigError, "target_sensitivity"),
        ({"target_sensitivity": 1.5}, ConfigError, "target_sensitivity"),
        ({"target_sensitivity": "0.9"}, ConfigError, "target_sensitivity"),
        ({"positive": 2}, ConfigError, "positive must be 0 or 1"),
    ],
)
def test_fit_decision_rule_option_errors(kwargs, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        fit_decision_rule(_binary_probs([0.2, 0.8]), [0, 1], "binary", **kwargs)


@pytest.mark.parametrize(
    ("probs", "labels", "task", "match"),
    [
        (np.array([[0.2, 0.8]]), [1], "multiclass", r"0\.\.1"),  # labels out of range below
        (np.array([[0.2, 0.3, 0.5]]), [1], "binary", r"\(N, 2\)"),
        (np.array([[-0.1, 1.1]]), [1], "binary", "in \\[0, 1\\]"),
        (np.array([[0.2, 0.3]]), [1], "multilabel", r"shape \(1, 2\)"),
        (np.zeros((0, 2)), [], "binary", "empty"),
    ],
)
def test_fit_decision_rule_data_errors(probs, labels, task, match) -> None:  # type: ignore[no-untyped-def]
    if task == "multiclass":
        labels = [5]
    with pytest.raises(DataError, match=match):
        fit_decision_rule(probs, labels, task)


def test_rule_applies_on_device() -> None:
    """The fitted rule serialises and, applied with decide, reaches the target on its own data."""
    rng = np.random.default_rng(6)
    z = rng.normal(size=(400, 1)) + 0.8 * (y := rng.integers(0, 2, 400))[:, None]
    p = probabilities(z, "binary", temperature=fit_temperature(z, y, "binary"))
    rule = DecisionRule.from_dict(fit_decision_rule(p, y, "binary", target_sensitivity=0.85).to_dict())
    from edgeclf.runtime.postprocess import decide

    pred = decide(p, rule)
    assert np.mean(pred[y == 1] == 1) >= 0.85
    _check_operating_point(p[:, 1], y == 1, rule.thresholds[0], 0.85)
    assert np.mean(pred[y == 0] == 0) == _ovr_specificity(p[:, 1], y == 1, rule.thresholds[0])
    assert math.isclose(rule.target_sensitivity or 0, 0.85)


def test_accuracy_objective_binary_picks_the_most_accurate_threshold():
    # negatives 0.1..0.4, positives 0.35..0.9: the best cut keeps one error either side or less
    neg = np.array([0.1, 0.2, 0.3, 0.4])
    pos = np.array([0.35, 0.6, 0.7, 0.9])
    p1 = np.concatenate([neg, pos])
    probs = np.stack([1 - p1, p1], 1)
    y = np.array([0] * 4 + [1] * 4)
    rule = fit_decision_rule(probs, y, "binary", objective="accuracy")
    t = rule.thresholds[0]
    acc = np.mean((p1 >= t) == (y == 1))
    best = max(np.mean((p1 >= c) == (y == 1)) for c in np.linspace(0, 1, 1001))
    assert acc == best == 7 / 8
    assert rule.target_sensitivity is None
    assert 0.4 < t <= 0.6  # the tie nearest 0.5 among equally accurate cuts


def test_accuracy_objective_multiclass_is_argmax():
    probs = np.array([[0.5, 0.3, 0.2], [0.2, 0.45, 0.35], [0.1, 0.2, 0.7]])
    rule = fit_decision_rule(probs, np.array([0, 1, 2]), "multiclass", objective="accuracy")
    assert rule.thresholds == (1 / 3, 1 / 3, 1 / 3)


def test_unknown_objective_is_a_config_error():
    with pytest.raises(ConfigError, match="allowed: sensitivity, accuracy"):
        fit_decision_rule(np.array([[0.5, 0.5]]), np.array([1]), "binary", objective="youden")


def test_a_fit_at_the_upper_edge_says_what_it_means_and_what_to_do(caplog: pytest.LogCaptureFixture) -> None:
    """Logits that do not tell the classes apart push T to the upper bound: the warning says the probabilities will be
    flattened (borderline frames) and what to do, not only where T landed."""
    from edgeclf.calibration import TEMPERATURE_BOUNDS

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (400, 3)).astype(np.float32)
    y = rng.integers(0, 3, 400)
    with caplog.at_level(logging.WARNING, logger="edgeclf.calibration"):
        t = fit_temperature(z, y, "multiclass")
    assert t == pytest.approx(TEMPERATURE_BOUNDS[1], rel=1e-2)
    (msg,) = [r.getMessage() for r in caplog.records if "upper edge" in r.getMessage()]
    assert "barely tell the validation classes apart" in msg and "train longer" in msg
