"""edgeclf.metrics: evaluation against scikit-learn and hand-computed values, bootstrap CI, ECE, plots."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
)

from edgeclf.errors import ConfigError, DataError
from edgeclf.metrics import (
    _weighted_auc,
    clip_metrics,
    decision_metrics,
    evaluate_predictions,
    expected_calibration_error,
    plot_confusion,
    plot_roc,
)
from edgeclf.runtime.postprocess import DecisionRule, decide, probabilities

NAMES3 = ["normal", "benign", "malignant"]


def _multiclass_case(n: int, seed: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(n, 3))
    z[np.arange(n), y] += shift
    return probabilities(z, "multiclass"), y


def _binary_probs(p_pos: list[float]) -> np.ndarray:
    p = np.asarray(p_pos, dtype=float)
    return np.stack([1 - p, p], axis=1)


def test_binary_hand_computed() -> None:
    probs = _binary_probs([0.9, 0.4, 0.6, 0.1])
    y = np.array([1, 1, 0, 0])
    rule = DecisionRule("threshold", (0.5,), positive=1)
    m = evaluate_predictions(probs, y, "binary", rule, ["benign", "malignant"], n_boot=0)
    # Pairs (pos, neg): 0.9>0.6, 0.9>0.1, 0.4<0.6, 0.4>0.1 -> AUC 3/4.
    assert m["auc"]["macro"] == pytest.approx(0.75)
    assert m["auc"]["per_class"] == {"malignant": pytest.approx(0.75)}
    assert m["auc"]["macro_ci95"] is None and m["auc"]["n_boot_used"] == 0
    # Decisions [1, 0, 1, 0] vs truth [1, 1, 0, 0].
    assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]
    assert m["per_class"]["malignant"] == {"sensitivity": 0.5, "specificity": 0.5, "support": 2}
    assert m["per_class"]["benign"] == {"sensitivity": 0.5, "specificity": 0.5, "support": 2}
    # Top-label confidences 0.9 0.6 0.6 0.9, correct T F F T: bins (0.8667, 0.9] and (0.5333, 0.6].
    assert m["ece"] == pytest.approx(0.5 * abs(1 - 0.9) + 0.5 * abs(0 - 0.6))
    assert m["operating_point"] == rule.to_dict()
    assert m["n"] == 4 and m["task"] == "binary"


def test_binary_with_positive_zero() -> None:
    probs = _binary_probs([0.9, 0.4, 0.6, 0.1])  # p[:, 0] = 0.1 0.6 0.4 0.9
    y = np.array([1, 1, 0, 0])
    rule = DecisionRule("threshold", (0.5,), positive=0)
    m = evaluate_predictions(probs, y, "binary", rule, ["benign", "malignant"], n_boot=0)
    assert m["auc"]["per_class"] == {"benign": pytest.approx(0.75)}
    assert decide(probs, rule).tolist() == [1, 0, 1, 0]


def test_multiclass_matches_sklearn() -> None:
    probs, y = _multiclass_case(600, seed=0)
    rule = DecisionRule("max-ratio", (0.3, 0.35, 0.4))
    pred = decide(probs, rule)
    m = evaluate_predictions(probs, y, "multiclass", rule, NAMES3, n_boot=200)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    sens = recall_score(y, pred, average=None)
    cm = confusion_matrix(y, pred)
    for k, name in enumerate(NAMES3):
        tn = cm.sum() - cm[k, :].sum() - cm[:, k].sum() + cm[k, k]
        fp = cm[:, k].sum() - cm[k, k]
        assert m["per_class"][name]["sensitivity"] == pytest.approx(sens[k])
        assert m["per_class"][name]["specificity"] == pytest.approx(tn / (tn + fp))
        assert m["per_class"][name]["support"] == int((y == k).sum())
        assert m["auc"]["per_class"][name] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
    assert m["auc"]["macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    lo, hi = m["auc"]["macro_ci95"]
    assert lo < m["auc"]["macro"] < hi
    assert m["auc"]["n_boot"] == 200 and m["auc"]["n_boot_used"] == 200
    json.dumps(m, allow_nan=False)


def test_multilabel_matches_sklearn_and_hand_values() -> None:
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.3, 0.8], [0.1, 0.4]])
    y = np.array([[1, 0], [0, 1], [0, 1], [0, 0]])
    rule = DecisionRule("multilabel", (0.5, 0.5))
    m = evaluate_predictions(probs, y, "multilabel", rule, ["edema", "nodule"], n_boot=50)
    # Decisions [[1,0],[1,1],[0,1],[0,0]]: rows 0, 2, 3 match exactly; 7 of 8 label decisions right.
    assert m["accuracy"] == 0.75 and m["label_accuracy"] == 0.875
    assert m["confusion_matrix"] == multilabel_confusion_matrix(y, decide(probs, rule).astype(int)).tolist()
    assert m["confusion_matrix"][0] == [[2, 1], [0, 1]]
    assert m["per_class"]["edema"] == {"sensitivity": 1.0, "specificity": pytest.approx(2 / 3), "support": 1}
    assert m["balanced_accuracy"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)
    assert m["auc"]["macro"] == pytest.approx(roc_auc_score(y, probs, average="macro"))
    json.dumps(m, allow_nan=False)


def test_weighted_auc_matches_sklearn_with_ties_and_repeats() -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(300), 1)  # many ties
    is_pos = rng.random(300) < 0.4
    ones = np.ones((1, 300))
    assert _weighted_auc(scores, is_pos, ones)[0] == pytest.approx(roc_auc_score(is_pos, scores))
    counts = rng.integers(0, 4, size=(3, 300)).astype(float)
    got = _weighted_auc(scores, is_pos, counts)
    for b in range(3):
        rep = np.repeat(np.arange(300), counts[b].astype(int))
        assert got[b] == pytest.approx(roc_auc_score(is_pos[rep], scores[rep]))
    assert np.isnan(_weighted_auc(scores, np.zeros(300, bool), ones)[0])


def test_auc_ci_contains_estimate_and_narrows_with_n() -> None:
    rule = DecisionRule("max-ratio", (0.5, 0.5, 0.5))
    widths = []
    for n in (150, 1500):
        probs, y = _multiclass_case(n, seed=2)
        m = evaluate_predictions(probs, y, "multiclass", rule, NAMES3, n_boot=300, seed=1)
        lo, hi = m["auc"]["macro_ci95"]
        assert lo <= m["auc"]["macro"] <= hi
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]  # ~ 1 / sqrt(10) expected


def test_auc_ci_resamples_groups_when_given() -> None:
    """40 clips of 24 identical frames: the interval must be the 40-clip interval, not a 960-item one."""
    rule = DecisionRule("max-ratio", (0.5, 0.5, 0.5))
    probs, y = _multiclass_case(40, seed=6)
    frames = np.repeat(np.arange(40), 24)
    clip = evaluate_predictions(probs, y, "multiclass", rule, NAMES3, n_boot=400, seed=1)
    naive = evaluate_predictions(probs[frames], y[frames], "multiclass", rule, NAMES3, n_boot=400, seed=1)
    grouped = evaluate_predictions(probs[frames], y[frames], "multiclass", rule, NAMES3, n_boot=400, seed=1,
                                   groups=[f"c{i}" for i in frames])
    width = {k: m["auc"]["macro_ci95"][1] - m["auc"]["macro_ci95"][0] for k, m in
             (("clip", clip), ("naive", naive), ("grouped", grouped))}
    assert width["naive"] < 0.5 * width["clip"]  # the defect: frames counted as independent
    assert 0.7 * width["clip"] < width["grouped"] < 1.4 * width["clip"]
    assert grouped["auc"]["bootstrap_unit"] == "group" and naive["auc"]["bootstrap_unit"] == "item"
    assert grouped["auc"]["macro"] == naive["auc"]["macro"]
    with pytest.raises(ConfigError):
        evaluate_predictions(probs, y, "multiclass", rule, NAMES3, n_boot=10, groups=["a"])


def test_bootstrap_skips_resamples_without_a_class() -> None:
    # One positive in 60 samples: about (59/60)^60 = 36 % of resamples lack it and are skipped.
    rng = np.random.default_rng(3)
    y = np.zeros(60, dtype=int)
    y[0] = 1
    probs = _binary_probs(list(rng.random(60)))
    m = evaluate_predictions(
        probs, y, "binary", DecisionRule("threshold", (0.5,), positive=1), ["a", "b"], n_boot=500
    )
    used = m["auc"]["n_boot_used"]
    assert 250 < used < 400
    assert m["auc"]["macro_ci95"] is not None


def test_bootstrap_is_seeded() -> None:
    # Reproducible for a seed, different for another; its speed is a benchmark's business, not a test's.
    probs, y = _multiclass_case(600, seed=4)
    rule = DecisionRule("max-ratio", (0.5, 0.5, 0.5))
    a = evaluate_predictions(probs, y, "multiclass", rule, NAMES3, n_boot=1000, seed=7)
    b = evaluate_predictions(probs, y, "multiclass", rule, NAMES3, n_boot=1000, seed=7)
    c = evaluate_predictions(probs, y, "multiclass", rule, NAMES3, n_boot=1000, seed=8)
    assert a == b and a["auc"]["macro_ci95"] != c["auc"]["macro_ci95"]


def test_class_absent_from_evaluation_set() -> None:
    probs, y = _multiclass_case(90, seed=5)
    y[y == 2] = 0
    rule = DecisionRule("max-ratio", (0.5, 0.5, 0.5))
    m = evaluate_predictions(probs, y, "multiclass", rule, NAMES3, n_boot=100)
    assert m["auc"]["per_class"]["malignant"] is None
    expected = np.mean([roc_auc_score(y == k, probs[:, k]) for k in (0, 1)])
    assert m["auc"]["macro"] == pytest.approx(expected)
    assert m["per_class"]["malignant"]["sensitivity"] is None
    assert m["per_class"]["malignant"]["support"] == 0
    pred = decide(probs, rule)
    with warnings.catch_warnings():  # sklearn warns about the absent class
        warnings.simplefilter("ignore")
        ref = balanced_accuracy_score(y, pred)
    assert m["balanced_accuracy"] == pytest.approx(ref)
    json.dumps(m, allow_nan=False)


# ---------------------------------------------------------------- ECE


def test_ece_small_for_calibrated_and_large_for_overconfident() -> None:
    rng = np.random.default_rng(6)
    z = rng.normal(scale=1.5, size=(20000, 3))
    y = np.minimum((np.cumsum(probabilities(z, "multiclass"), axis=1) < rng.random((20000, 1))).sum(1), 2)
    assert expected_calibration_error(probabilities(z, "multiclass"), y, "multiclass") < 0.02
    assert expected_calibration_error(probabilities(4 * z, "multiclass"), y, "multiclass") > 0.1

    zb = rng.normal(scale=2.0, size=(20000, 1))
    yb = (rng.random(20000) < probabilities(zb, "binary")[:, 1]).astype(int)
    assert expected_calibration_error(probabilities(zb, "binary"), yb, "binary") < 0.02
    assert expected_calibration_error(probabilities(5 * zb, "binary"), yb, "binary") > 0.1

    zl = rng.normal(scale=2.0, size=(20000, 2))
    yl = (rng.random(zl.shape) < probabilities(zl, "multilabel")).astype(int)
    assert expected_calibration_error(probabilities(zl, "multilabel"), yl, "multilabel") < 0.02
    assert expected_calibration_error(probabilities(5 * zl, "multilabel"), yl, "multilabel") > 0.1


def test_ece_hand_computed() -> None:
    probs = np.array([[0.2, 0.8], [0.2, 0.8], [0.9, 0.1]])
    y = np.array([1, 0, 0])
    # Bin of 0.8: accuracy 1/2, confidence 0.8; bin of 0.9: accuracy 1, confidence 0.9.
    assert expected_calibration_error(probs, y, "binary") == pytest.approx(2 / 3 * 0.3 + 1 / 3 * 0.1)
    # One bin: mean accuracy 2/3 vs mean confidence 0.8333.
    assert expected_calibration_error(probs, y, "binary", n_bins=1) == pytest.approx(abs(2 / 3 - 2.5 / 3))
    # Multilabel is the mean of per-label binary ECEs.
    pl = np.array([[0.8, 0.1], [0.8, 0.3], [0.1, 0.6]])
    yl = np.array([[1, 0], [0, 0], [0, 1]])
    per_label = [
        expected_calibration_error(np.stack([1 - pl[:, j], pl[:, j]], axis=1), yl[:, j], "binary")
        for j in range(2)
    ]
    assert expected_calibration_error(pl, yl, "multilabel") == pytest.approx(np.mean(per_label))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"rule": DecisionRule("multilabel", (0.5, 0.5, 0.5))},
            ConfigError,
            "does not fit task 'multiclass'",
        ),
        (
            {"rule": DecisionRule("max-ratio", (0.5, 0.5))},
            ConfigError,
            "2 thresholds but the predictions have 3",
        ),
        ({"label_names": ["a", "b"]}, ConfigError, "needs 3 label names"),
        ({"label_names": ["a", "a", "b"]}, ConfigError, "unique"),
        ({"n_boot": -1}, ConfigError, "n_boot"),
        ({"labels": np.zeros(5, dtype=int)}, DataError, "shape"),
        ({"probs": np.full((6, 3), 2.0)}, DataError, "in \\[0, 1\\]"),
        ({"task": "segmentation"}, ConfigError, "unknown task"),
    ],
)
def test_evaluate_errors(kwargs, error, match) -> None:  # type: ignore[no-untyped-def]
    probs, y = _multiclass_case(6, seed=7)
    args = {"probs": probs, "labels": y, "task": "multiclass", "rule": DecisionRule("max-ratio", (0.5,) * 3)}
    args.update(label_names=NAMES3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        evaluate_predictions(**args)


# ---------------------------------------------------------------- plots


def _is_png(path) -> bool:  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_roc_writes_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    probs, y = _multiclass_case(120, seed=8)
    plot_roc(probs, y, "multiclass", NAMES3, tmp_path / "mc" / "roc.png")
    assert _is_png(tmp_path / "mc" / "roc.png")
    plot_roc(_binary_probs([0.9, 0.4, 0.6, 0.1]), [1, 1, 0, 0], "binary", ["neg", "pos"], tmp_path / "b.png")
    assert _is_png(tmp_path / "b.png")
    plot_roc(
        probs[:, :2], np.array([[1, 0], [0, 0]] * 60), "multilabel", ["x", "y"], str(tmp_path / "ml.png")
    )
    assert _is_png(tmp_path / "ml.png")  # label "y" has no positives: drawn as undefined


def test_plot_confusion_writes_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    plot_confusion([[5, 1, 0], [2, 7, 1], [0, 3, 9]], NAMES3, tmp_path / "cm.png", title="test set")
    assert _is_png(tmp_path / "cm.png")
    plot_confusion([[[5, 1], [2, 3]], [[0, 0], [0, 0]]], ["a", "b"], tmp_path / "ml.png")
    assert _is_png(tmp_path / "ml.png")
    with pytest.raises(DataError, match="does not fit 2 label names"):
        plot_confusion([[1, 2, 3], [4, 5, 6], [7, 8, 9]], ["a", "b"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ---------------------------------------------------------------- clip-level figures


def test_clip_names_with_a_hash_stay_separate_clips() -> None:
    """Frame ids are `<clip path>#<frame>`: a '#' in the clip's own file name must not merge clips."""
    from edgeclf.data import _to_split
    from edgeclf.metrics import clip_metrics
    from edgeclf.runtime.clips import group_frames

    img = np.zeros((4, 4), np.uint8)
    sp = _to_split([("pt#1.avi", "pt#1.avi", 1, [img, img]), ("pt#2.avi", "pt#2.avi", 1, [img, img]),
                    ("pt#3.avi", "pt#3.avi", 0, [img])])
    assert group_frames(sp.ids) == {"pt#1.avi": [0, 1], "pt#2.avi": [2, 3], "pt#3.avi": [4]}
    p = _binary_probs([0.9, 0.8, 0.1, 0.2, 0.3])
    m = clip_metrics(p, sp.labels, sp.ids, DecisionRule("threshold", (0.5,), positive=1), ["neg", "pos"], n_boot=0)
    assert m["clips"] == 3 and [c["mean"] for c in m["per_clip"]] == ["pos", "neg", "neg"]
    assert m["clip_mean"]["accuracy"] == pytest.approx(2 / 3)


def test_clip_metrics_applies_each_folds_rule_and_refuses_a_mismatch() -> None:
    from edgeclf.metrics import clip_metrics

    lo = DecisionRule("threshold", (0.2,), positive=1)
    hi = DecisionRule("threshold", (0.9,), positive=1)
    p, y, ids = _binary_probs([0.3] * 4), np.ones(4, int), ["a#0", "a#1", "b#0", "b#1"]
    m = clip_metrics(p, y, ids, [lo, hi], ["neg", "pos"], folds=[0, 0, 1, 1], n_boot=0)
    assert [(c["clip"], c["fold"], c["mean"]) for c in m["per_clip"]] == [("a", 0, "pos"), ("b", 1, "neg")]
    assert m["frame"]["confusion_matrix"] == [[0, 0], [2, 2]] and m["frame"]["abstained"] == 0
    with pytest.raises(ConfigError, match="folds"):  # two rules, no folds: the second was silently ignored
        clip_metrics(p, y, ids, [lo, hi], ["neg", "pos"], n_boot=0)
    with pytest.raises(ConfigError, match="fold"):  # fold -1: its frames counted as abstained, its clip given rule -1
        clip_metrics(p, y, ids, [lo, hi], ["neg", "pos"], folds=[0, 0, -1, -1], n_boot=0)
    with pytest.raises(ConfigError, match="fold"):
        clip_metrics(p, y, ids, [lo, hi], ["neg", "pos"], folds=[0, 0, 1], n_boot=0)
    with pytest.raises(DataError, match="several folds"):  # one clip, two operating points: which is its decision?
        clip_metrics(p, y, ids, [lo, hi], ["neg", "pos"], folds=[0, 1, 0, 1], n_boot=0)


def test_clip_whose_frames_all_abstain_is_counted() -> None:
    from edgeclf.metrics import clip_metrics

    rule = DecisionRule("threshold", (0.5,), positive=1)
    p, y = _binary_probs([0.45, 0.52, 0.9, 0.95]), np.ones(4, int)
    m = clip_metrics(p, y, ["a#0", "a#1", "b#0", "b#1"], rule, ["neg", "pos"], min_confidence=0.8, n_boot=20)
    assert m["clips"] == 2 and m["per_clip"][0]["used"] == 0 and m["per_clip"][0]["mean"] is None
    for key in ("clip_mean", "clip_vote"):
        assert m[key]["n"] == 1 and m[key]["abstained"] == 1 and m[key]["accuracy"] == 1.0
    assert m["frame"]["n"] == 2 and m["frame"]["abstained"] == 2


def test_abstained_frames_judges_the_decided_class() -> None:
    from edgeclf.metrics import abstained_frames
    from edgeclf.runtime.smoothing import SINGLE_IMAGE, CineSmoother

    # Positive at p >= 0.2, floor 0.6: [0.7, 0.3] is decided positive with p 0.3 and abstains on the run's display;
    # evaluate must count it abstained too (its top probability, 0.7, would keep it).
    rule = DecisionRule("threshold", (0.2,), positive=1)
    p = np.array([[0.7, 0.3], [0.9, 0.1], [0.3, 0.7]])
    got = abstained_frames(p, 0.6, decide(p, rule))
    assert got.tolist() == [True, False, False]
    shown = [CineSmoother(["n", "p"], rule=rule, config=SINGLE_IMAGE, min_confidence=0.6).update(row).abstain for row in p]
    assert shown == got.tolist()
    assert abstained_frames(p, 0.6).tolist() == [False, False, False]  # argmax decisions: the top probability
    assert abstained_frames(p, 0.0, decide(p, rule)).tolist() == [False] * 3
    with pytest.raises(ConfigError, match="decisions"):
        abstained_frames(p, 0.6, [0, 1])
    # clip_metrics frames follow the same rule
    from edgeclf.metrics import clip_metrics

    m = clip_metrics(p, np.ones(3, int), ["a#0", "a#1", "a#2"], rule, ["n", "p"], min_confidence=0.6, n_boot=0)
    assert m["frame"]["abstained"] == 1


def test_balanced_accuracy_interval_leaves_out_resamples_missing_a_class() -> None:
    from edgeclf.metrics import decision_metrics

    # Every resample holding all three classes has balanced accuracy 2/3, 5/6 or 1 (only class 2 errs); one
    # missing class 1 would average two sensitivities and could reach 0.5, a figure of another statistic.
    y, d = [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 0]
    m = decision_metrics(y, d, ["a", "b", "c"], n_boot=1000, seed=0)
    assert m["balanced_accuracy"] == pytest.approx(5 / 6)
    assert 0 < m["balanced_accuracy_n_boot_used"] < 1000
    assert m["balanced_accuracy_ci95"][0] >= 2 / 3 - 1e-9
    assert m["n_boot"] == 1000 and len(m["accuracy_ci95"]) == 2  # accuracy needs no class: every resample counts


def test_clip_figures_carry_intervals_over_clusters_when_given() -> None:
    from edgeclf.metrics import clip_metrics
    from edgeclf.runtime.postprocess import DecisionRule

    # 12 clips of 2 frames in 2 classes from 3 sources; source s2's clips are all wrong: errors cluster.
    ids, probs, labels, clusters = [], [], [], {}
    for c in range(12):
        y, src = c % 2, f"s{c % 3}"
        right = src != "s2"
        for j in range(2):
            ids.append(f"clip{c}.mp4#{j}")
            labels.append(y)
            probs.append([0.9, 0.1] if (y == 0) == right else [0.1, 0.9])
        clusters[f"clip{c}.mp4"] = src
    rule = DecisionRule("max-ratio", (1.0, 1.0))  # the most probable class
    plain = clip_metrics(probs, labels, ids, rule, ["a", "b"], n_boot=500)
    assert "clustered" not in plain["clip_mean"]
    m = clip_metrics(probs, labels, ids, rule, ["a", "b"], n_boot=500, clusters=clusters, cluster_unit="source")
    c = m["clip_mean"]["clustered"]
    assert c["unit"] == "source" and c["clusters"] == 3 and m["clip_vote"]["clustered"]["clusters"] == 3
    lo_c, hi_c = c["accuracy_ci95"]
    lo, hi = m["clip_mean"]["accuracy_ci95"]
    assert m["clip_mean"]["accuracy"] == pytest.approx(8 / 12)
    assert hi_c - lo_c > hi - lo  # three clusters resampled: wider than twelve independent clips
    assert lo_c == pytest.approx(1 / 3) or lo_c < lo  # a resample of s2 twice and one other: a third right


# -- one resampling unit: no interval ------------------------------------------------------------------------------
# With one clip or one group every resample is the sample itself: a zero-width "95% interval" (e.g. `evaluate
# --split all` on one clip printed frame accuracy 0.725 (0.725-0.725)) says nothing; None, as for too few resamples.
_ONE_UNIT_RULE = DecisionRule("threshold", (0.5,), positive=1)



def _one_unit_data(n: int = 40):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    s = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    return np.stack([1 - s, s], 1), y


def test_auc_interval_over_one_group_is_not_a_point() -> None:
    p, y = _one_unit_data()
    m = evaluate_predictions(p, y, "binary", _ONE_UNIT_RULE, ["a", "b"], n_boot=100, groups=["clip0"] * len(y))
    assert m["auc"]["macro_ci95"] is None, m["auc"]  # got [0.803, 0.803]


def test_accuracy_interval_over_one_group_is_not_a_point() -> None:
    p, y = _one_unit_data()
    m = decision_metrics(y, (p[:, 1] >= 0.5).astype(int), ["a", "b"], groups=["clip0"] * len(y), n_boot=100)
    assert m["accuracy_ci95"] is None, m["accuracy_ci95"]  # got [0.725, 0.725]


def test_one_clip_gives_no_frame_or_clip_interval() -> None:
    p, y = _one_unit_data()
    y[:] = 1  # one clip, one label
    ids = [f"scan.mp4#{j}" for j in range(len(y))]
    m = clip_metrics(p, y, ids, _ONE_UNIT_RULE, ["a", "b"], n_boot=100)
    assert m["frame"]["accuracy_ci95"] is None, m["frame"]["accuracy_ci95"]
    assert m["clip_mean"]["accuracy_ci95"] is None, m["clip_mean"]["accuracy_ci95"]
