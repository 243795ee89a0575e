"""edgeclf.runtime.postprocess: probabilities, DecisionRule and decide, against hand-computed values."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime.postprocess import (
    TASKS,
    DecisionRule,
    decide,
    decide_frame,
    frame_probabilities,
    probabilities,
    rule_kind_for_task,
)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- probabilities


def test_binary_probabilities_hand_computed() -> None:
    p = probabilities([[0.0], [2.0], [-3.0]], "binary")
    expected = [[0.5, 0.5], [1 - _sig(2.0), _sig(2.0)], [1 - _sig(-3.0), _sig(-3.0)]]
    assert p.dtype == np.float64 and p.shape == (3, 2)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-15)


def test_multiclass_probabilities_hand_computed() -> None:
    p = probabilities([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], "multiclass")
    e = [math.exp(1), math.exp(2), math.exp(3)]
    np.testing.assert_allclose(p[0], [v / sum(e) for v in e], rtol=1e-12)
    np.testing.assert_allclose(p[1], [1 / 3] * 3, rtol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-15)


def test_multilabel_probabilities_are_independent_sigmoids() -> None:
    p = probabilities([[0.0, 1.0, -1.0]], "multilabel")
    np.testing.assert_allclose(p, [[0.5, _sig(1.0), _sig(-1.0)]], rtol=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_extreme_logits_are_stable(task: str) -> None:
    k = 1 if task == "binary" else 3
    z = np.full((2, k), 800.0)
    z[1] = -800.0
    if task == "multiclass":
        z = np.array([[1000.0, 1000.0, -1000.0], [-1e6, 0.0, 1e6]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = probabilities(z, task)
    assert np.all(np.isfinite(p)) and p.min() >= 0 and p.max() <= 1
    if task == "multiclass":
        np.testing.assert_allclose(p, [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    if task != "multilabel":
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
    if task == "binary":
        np.testing.assert_allclose(p, [[0.0, 1.0], [1.0, 0.0]])
        # 1 - p is computed as sigmoid(-z), so a tiny probability is not lost to cancellation.
        assert probabilities([[40.0]], "binary")[0, 0] == pytest.approx(math.exp(-40.0), rel=1e-9)


def test_probabilities_of_random_logits_sum_to_one() -> None:
    rng = np.random.default_rng(0)
    for task, k in (("binary", 1), ("multiclass", 5)):
        p = probabilities(rng.normal(scale=5, size=(200, k)), task, temperature=0.7)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)


def test_temperature_scaling_flattens() -> None:
    z = np.array([[2.0, 0.5, -1.0]])
    p1 = probabilities(z, "multiclass")
    p2 = probabilities(z, "multiclass", temperature=2.0)
    np.testing.assert_allclose(p2, probabilities(z / 2.0, "multiclass"), rtol=1e-12)
    assert p2.max() < p1.max() and p2.min() > p1.min()
    entropy = [float(-(p * np.log(p)).sum()) for p in (p1, p2)]
    assert entropy[1] > entropy[0]
    np.testing.assert_allclose(probabilities(z, "multiclass", temperature=1e6), [[1 / 3] * 3], atol=1e-5)
    # Binary: p moves towards 0.5 but the decision side is kept.
    b1, b2 = probabilities([[3.0]], "binary"), probabilities([[3.0]], "binary", temperature=3.0)
    assert 0.5 < b2[0, 1] < b1[0, 1]
    assert b2[0, 1] == pytest.approx(_sig(1.0))


def test_empty_batch() -> None:
    assert probabilities(np.zeros((0, 4)), "multiclass").shape == (0, 4)
    assert probabilities(np.zeros((0, 1)), "binary").shape == (0, 2)


@pytest.mark.parametrize(
    ("logits", "task", "match"),
    [
        ([[0.1, 0.2]], "binary", "binary logits must have shape"),
        ([[0.1]], "multiclass", "K >= 2"),
        ([0.1, 0.2], "multiclass", "2-D"),
        (np.zeros((2, 2, 2)), "multilabel", "2-D"),
        ([[0.1]], "regression", "unknown task"),
    ],
)
def test_probabilities_rejects_bad_shapes_and_tasks(logits: object, task: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        probabilities(logits, task)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), True, "2"])
def test_probabilities_rejects_bad_temperature(temperature: object) -> None:
    with pytest.raises(ConfigError, match="temperature"):
        probabilities([[0.0, 1.0]], "multiclass", temperature=temperature)  # type: ignore[arg-type]


def test_probabilities_rejects_non_finite_logits() -> None:
    with pytest.raises(DataError, match="NaN or infinity"):
        probabilities([[0.0, float("nan")]], "multiclass")


# ---------------------------------------------------------------- decide


def test_decide_threshold_positive_one() -> None:
    rule = DecisionRule("threshold", (0.5,), positive=1)
    probs = [[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]]
    out = decide(probs, rule)
    assert out.dtype == np.int64
    assert out.tolist() == [0, 1, 1]  # p >= t is positive, so the tie at 0.5 is class 1


def test_decide_threshold_positive_zero() -> None:
    rule = DecisionRule("threshold", (0.6,), positive=0)
    assert decide([[0.7, 0.3], [0.4, 0.6], [0.6, 0.4]], rule).tolist() == [0, 1, 0]


def test_decide_max_ratio() -> None:
    probs = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.4, 0.2, 0.4]]
    # Equal thresholds: plain argmax; ties go to the lowest index.
    assert decide(probs, DecisionRule("max-ratio", (0.5, 0.5, 0.5))).tolist() == [0, 2, 0]
    # Ratios row 0: 0.5/0.5 = 1, 0.3/0.2 = 1.5, 0.2/0.5 = 0.4 -> class 1.
    # Row 1: 0.2, 0.5, 1.6 -> 2. Row 2: 0.8, 1.0, 0.8 -> 1.
    out = decide(probs, DecisionRule("max-ratio", (0.5, 0.2, 0.5)))
    assert out.dtype == np.int64 and out.tolist() == [1, 2, 1]


def test_decide_multilabel() -> None:
    rule = DecisionRule("multilabel", (0.5, 0.2))
    out = decide([[0.5, 0.1], [0.49, 0.2], [0.9, 0.9]], rule)
    assert out.dtype == np.bool_
    assert out.tolist() == [[True, False], [False, True], [True, True]]


@pytest.mark.parametrize(
    ("probs", "rule"),
    [
        ([[0.2, 0.3, 0.5]], DecisionRule("threshold", (0.5,), positive=1)),
        ([[0.5, 0.5]], DecisionRule("max-ratio", (0.5, 0.5, 0.5))),
        ([0.5, 0.5], DecisionRule("multilabel", (0.5, 0.5))),
    ],
)
def test_decide_rejects_shape_mismatch(probs: object, rule: DecisionRule) -> None:
    with pytest.raises(ConfigError, match="shape"):
        decide(probs, rule)  # type: ignore[arg-type]


# ---------------------------------------------------------------- DecisionRule


@pytest.mark.parametrize(
    "rule",
    [
        DecisionRule("threshold", (0.25,), positive=1, target_sensitivity=0.9),
        DecisionRule("threshold", (1.0,), positive=0),
        DecisionRule("max-ratio", (0.2, 0.3, 0.4), target_sensitivity=0.95),
        DecisionRule("multilabel", (0.1,)),
    ],
)
def test_rule_round_trip_through_json(rule: DecisionRule) -> None:
    d = json.loads(json.dumps(rule.to_dict(), allow_nan=False))
    assert set(d) == {"kind", "thresholds", "positive", "target_sensitivity"}
    assert DecisionRule.from_dict(d) == rule


def test_rule_normalises_and_is_frozen() -> None:
    rule = DecisionRule("max-ratio", [np.float32(0.5), 1], target_sensitivity=1)  # type: ignore[arg-type]
    assert rule.thresholds == (0.5, 1.0) and all(type(t) is float for t in rule.thresholds)
    assert type(rule.target_sensitivity) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.kind = "multilabel"  # type: ignore[misc]


def test_rule_kind_for_task() -> None:
    assert [rule_kind_for_task(t) for t in TASKS] == ["threshold", "max-ratio", "multilabel"]
    with pytest.raises(ConfigError):
        rule_kind_for_task("ranking")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "argmax", "thresholds": (0.5, 0.5)}, "kind 'argmax' is unknown"),
        ({"kind": "max-ratio", "thresholds": (0.0, 0.5)}, r"threshold 0.0 is not a number in \(0, 1\]"),
        ({"kind": "max-ratio", "thresholds": (1.5, 0.5)}, "1.5"),
        ({"kind": "multilabel", "thresholds": (float("nan"),)}, "nan"),
        ({"kind": "multilabel", "thresholds": (True,)}, "True"),
        ({"kind": "multilabel", "thresholds": "0.5"}, "list of numbers"),
        ({"kind": "threshold", "thresholds": (0.5, 0.5), "positive": 1}, "exactly 1 threshold"),
        ({"kind": "threshold", "thresholds": (0.5,)}, "positive = 0 or 1"),
        ({"kind": "threshold", "thresholds": (0.5,), "positive": 2}, "positive = 0 or 1"),
        ({"kind": "max-ratio", "thresholds": (0.5, 0.5), "positive": 1}, "only for 'threshold'"),
        ({"kind": "max-ratio", "thresholds": (0.5,)}, "at least 2 thresholds"),
        ({"kind": "multilabel", "thresholds": ()}, "at least 1 thresholds"),
        ({"kind": "multilabel", "thresholds": (0.5,), "target_sensitivity": 0.0}, "target_sensitivity"),
        ({"kind": "multilabel", "thresholds": (0.5,), "target_sensitivity": 1.2}, "target_sensitivity"),
    ],
)
def test_rule_validation(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=match) as info:
        DecisionRule(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"kind": "multilabel", "thresholds": [0.5], "threshold": 0.5}, "unknown key.*threshold"),
        ({"thresholds": [0.5]}, "missing key 'kind'"),
        ({"kind": "multilabel"}, "missing key 'thresholds'"),
        ({"kind": 3, "thresholds": [0.5]}, "key 'kind'"),
        ({"kind": "multilabel", "thresholds": 0.5}, "key 'thresholds'"),
        ({"kind": "threshold", "thresholds": [0.5], "positive": "1"}, "key 'positive'"),
        ({"kind": "threshold", "thresholds": [0.5], "positive": True}, "key 'positive'"),
        (
            {"kind": "multilabel", "thresholds": [0.5], "target_sensitivity": "high"},
            "key 'target_sensitivity'",
        ),
        ({"kind": "multilabel", "thresholds": [0.0]}, "threshold 0.0"),
        (["kind", "thresholds"], "mapping"),
    ],
)
def test_rule_from_dict_names_the_bad_key(d: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DecisionRule.from_dict(d)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the per-frame path


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 11])
def test_frame_probabilities_and_decision_equal_the_batch_path_bit_for_bit(k: int) -> None:
    # The live pipeline decides each frame with plain floats; `edgeclf evaluate` uses arrays. The clip figures
    # of the two must agree, so the numbers must be the same, not merely close.
    rng = np.random.default_rng(k)
    task = "binary" if k == 1 else "multiclass"
    for scale, temperature in ((0.3, 1.0), (4.0, 0.7), (60.0, 19.99)):
        z = rng.normal(0.0, scale, (200, k)).astype(np.float32)
        batch = probabilities(z, task, temperature)
        if k == 1:
            rule = DecisionRule("threshold", (0.37,), positive=1)
        else:
            rule = DecisionRule("max-ratio", tuple(rng.uniform(0.1, 1.0, k)))
        decided = decide(batch, rule)
        for i in range(len(z)):
            row = frame_probabilities(z[i], task, temperature)
            assert row == tuple(batch[i].tolist())
            assert frame_probabilities(z[i : i + 1], task, temperature) == row  # (1, K) as well as (K,)
            assert decide_frame(row, rule) == int(decided[i])


def test_decide_frame_breaks_ties_to_the_first_class_as_argmax() -> None:
    rule = DecisionRule("max-ratio", (0.5, 0.25, 0.25))
    assert decide_frame((0.5, 0.25, 0.25), rule) == 0 == int(decide(np.array([[0.5, 0.25, 0.25]]), rule)[0])
    assert decide_frame((0.2, 0.4, 0.4), rule) == 1


def test_frame_probabilities_rejects_what_probabilities_rejects() -> None:
    with pytest.raises(DataError, match="NaN or infinity"):
        frame_probabilities(np.array([0.0, np.nan, 1.0], np.float32), "multiclass")
    with pytest.raises(ConfigError, match="temperature"):
        frame_probabilities(np.array([0.0, 1.0], np.float32), "multiclass", 0.0)
    with pytest.raises(ConfigError, match="binary logits"):
        frame_probabilities(np.array([0.0, 1.0], np.float32), "binary")
    with pytest.raises(ConfigError, match="unknown task"):
        frame_probabilities(np.array([0.0, 1.0], np.float32), "regression")
    # Multilabel has no single-frame fast path but gives the same numbers.
    z = np.array([[0.3, -2.0]], np.float32)
    assert frame_probabilities(z, "multilabel") == tuple(probabilities(z, "multilabel")[0].tolist())
    with pytest.raises(ConfigError, match="decide_frame needs"):
        decide_frame((0.2, 0.8), DecisionRule("multilabel", (0.5, 0.5)))


def test_frame_probabilities_refuses_a_batch() -> None:
    with pytest.raises(ConfigError, match="one frame"):
        frame_probabilities(np.zeros((2, 3), np.float32), "multiclass")


@pytest.mark.parametrize("task,logits", [("multiclass", [3e38, 0.0]), ("binary", [3e38]), ("multiclass", [-3e38, 0.0])])
def test_finite_logits_that_overflow_under_a_tiny_temperature_raise_data_error(task: str, logits: list) -> None:  # type: ignore[type-arg]
    # Finite float32 logits, a temperature the manifest accepts: logit / T is infinite. Both paths must refuse
    # (DataError, so the pipeline's frame abstains "invalid_output") instead of giving NaN probabilities.
    z = np.array([logits], np.float32)
    with pytest.raises(DataError, match="NaN or infinity"):
        probabilities(z, task, 1e-300)
    with pytest.raises(DataError, match="NaN or infinity"):
        frame_probabilities(z[0], task, 1e-300)
