from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from edgeclf.export.gate import gate_candidate
from edgeclf.runtime.postprocess import DecisionRule, probabilities

RULE = DecisionRule("threshold", (0.5,), positive=1, target_sensitivity=0.9)


def _binary(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = (y * 2.0 - 1.0) * 1.5 + rng.normal(size=n)
    return z[:, None].astype(np.float32), y


def test_identical_candidate_passes_with_zero_drop() -> None:
    z, y = _binary()
    g = gate_candidate(z, z.copy(), y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.0)
    assert g["passed"] and g["decision_agreement"] == 1.0 and g["disagreements"] == []
    assert all(c["drop"] == 0 and c["drop_ci95"] == [0.0, 0.0] for c in g["checks"])


def test_a_real_loss_fails_and_names_the_metric() -> None:
    z, y = _binary()
    noisy = z + np.random.default_rng(1).normal(scale=3.0, size=z.shape).astype(np.float32)
    g = gate_candidate(z, noisy, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.0001)
    auc = next(c for c in g["checks"] if c["metric"] == "auc_macro")
    assert not g["passed"] and "auc_macro" in g["failed_on"]
    assert auc["drop"] > 0.05 and auc["drop_ci95"][0] > 0
    # A generous limit lets the same candidate through, with the same numbers reported.
    assert gate_candidate(z, noisy, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.5)["passed"]


def test_one_flipped_case_does_not_decide_alone() -> None:
    y = np.array([1] * 20 + [0] * 20)
    z = np.where(y == 1, 2.0, -2.0)[:, None].astype(np.float32)
    cand = z.copy()
    cand[0, 0] = -0.1  # one positive now falls below the threshold
    g = gate_candidate(z, cand, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01, ids=[f"img{i}" for i in range(40)])
    sens = next(c for c in g["checks"] if c["metric"] == "sensitivity[pos]")
    assert sens["drop"] == pytest.approx(1 / 20) and sens["drop_ci95"][0] <= 0
    assert g["passed"] and g["disagreements"] == ["img0"] and g["decision_agreement"] == pytest.approx(39 / 40)


def test_multiclass_and_multilabel_checks_cover_every_class() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 150)
    z = rng.normal(size=(150, 3)).astype(np.float32)
    z[np.arange(150), y] += 2
    rule = DecisionRule("max-ratio", (0.3, 0.3, 0.3))
    g = gate_candidate(z, z, y, "multiclass", 1.0, rule, ["a", "b", "c"], max_drop=0.0)
    assert [c["metric"] for c in g["checks"]] == ["auc_macro", "sensitivity[a]", "sensitivity[b]", "sensitivity[c]",
                                                  "decision_agreement"]
    ym = (rng.random((150, 3)) < 0.4).astype(np.uint8)
    g = gate_candidate(z, z, ym, "multilabel", 1.0, DecisionRule("multilabel", (0.5, 0.5, 0.5)), ["a", "b", "c"], max_drop=0.0)
    assert g["passed"] and [c["metric"] for c in g["checks"]][:3] == ["auc_macro", "sensitivity[a]", "specificity[a]"]
    assert len(g["checks"]) == 8 and g["checks"][-1]["metric"] == "decision_agreement"


def test_a_candidate_that_calls_everything_positive_fails_on_the_negative_class() -> None:
    # A constant shift keeps the AUC and raises sensitivity: only the other class's rate can catch it.
    z, y = _binary()
    g = gate_candidate(z, z + 3.0, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01)
    auc = next(c for c in g["checks"] if c["metric"] == "auc_macro")
    assert abs(auc["drop"]) < 1e-12 and not g["passed"] and g["failed_on"] == ["sensitivity[neg]"]


def test_agreement_floor_fails_a_candidate_whose_metrics_pass() -> None:
    # 40 images, 4 decisions flipped both ways: no significant sensitivity drop, but 90% agreement.
    rng = np.random.default_rng(5)
    y = np.array([0, 1] * 20)
    z = np.where(y[:, None] == np.arange(2), 2.0, -2.0).astype(np.float32) + rng.normal(0, 0.1, (40, 2)).astype(np.float32)
    c = z.copy()
    for i in (0, 1, 2, 3):  # swap the two logits: the decision flips
        c[i] = c[i][::-1]
    rule = DecisionRule("max-ratio", (0.5, 0.5))
    g = gate_candidate(z, c, y, "multiclass", 1.0, rule, ["a", "b"], max_drop=0.5, min_agreement=0.98)
    agree = g["checks"][-1]
    assert agree["metric"] == "decision_agreement" and agree["candidate"] == pytest.approx(0.9)
    assert not g["passed"] and g["failed_on"] == ["decision_agreement"]
    assert gate_candidate(z, c, y, "multiclass", 1.0, rule, ["a", "b"], max_drop=0.5, min_agreement=0.9)["passed"]


def _few_flips(npos: int, flips: int, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small positive class with `flips` positives just above the threshold that the candidate moves just below."""
    y = np.zeros(n, np.int64)
    y[:npos] = 1
    rng = np.random.default_rng(0)
    parent = np.where(y == 1, 0.5 + rng.random(n) * 3, -3 - rng.random(n) * 3).reshape(-1, 1)
    parent[:flips, 0] = 0.05
    cand = parent.copy()
    cand[:flips, 0] = -0.05
    return parent, cand, y


@pytest.mark.parametrize("npos", [10, 5])
def test_a_large_drop_fails_even_when_its_interval_touches_zero(npos: int) -> None:
    # 3 flips in one direction: ~5% of resamples miss all of them, so the interval's lower end is 0.
    parent, cand, y = _few_flips(npos, 3)
    g = gate_candidate(parent, cand, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01, min_agreement=0.98)
    sens = next(c for c in g["checks"] if c["metric"] == "sensitivity[pos]")
    assert sens["drop"] == pytest.approx(3 / npos) and sens["drop_ci95"][0] <= 0
    assert g["decision_agreement"] >= 0.98 and not g["passed"] and g["failed_on"] == ["sensitivity[pos]"]
    assert g["ceiling"] == pytest.approx(0.05) and "ceiling" in g["rule"]


def test_one_flip_in_a_large_class_still_passes() -> None:
    parent, cand, y = _few_flips(100, 1)  # sensitivity 1.0 -> 0.99 among 200 images: noise, under the ceiling
    g = gate_candidate(parent, cand, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.001, min_agreement=0.98)
    sens = next(c for c in g["checks"] if c["metric"] == "sensitivity[pos]")
    assert sens["drop"] == pytest.approx(0.01) and g["passed"]
    assert g["ceiling"] == pytest.approx(0.05)
    # The ceiling scales with a loose limit: 5 * max_drop.
    assert gate_candidate(parent, cand, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.5)["ceiling"] == pytest.approx(2.5)


def test_a_drop_of_exactly_max_drop_passes() -> None:
    # 0.95 - 0.94 is 0.010000000000000009 in floats: the limit itself is allowed, as the ceiling is.
    y = np.array([1] * 500 + [0] * 500)
    z = np.where(y == 1, 2.0, -2.0)[:, None].astype(np.float32)
    z[:25, 0] = -0.5  # the parent misses 25 of 500 positives: sensitivity 0.95
    c = z.copy()
    c[25:30, 0] = -0.5  # the candidate misses 5 more, all one way: 0.94, a significant drop of exactly 0.01
    g = gate_candidate(z, c, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01)
    sens = next(ch for ch in g["checks"] if ch["metric"] == "sensitivity[pos]")
    assert sens["drop"] == pytest.approx(0.01) and sens["drop_ci95"][0] > 0
    assert g["passed"] and g["failed_on"] == []
    assert not gate_candidate(z, c, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.009)["passed"]


def test_resamples_without_a_figure_are_counted() -> None:
    # 2 positives among 200: some resamples hold none, so their sensitivity is undefined and left out, with a count.
    parent, cand, y = _few_flips(2, 0)
    g = gate_candidate(parent, cand, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01, n_boot=400)
    rows = {ch["metric"]: ch for ch in g["checks"]}
    assert 300 < rows["sensitivity[pos]"]["n_boot_used"] < 400 and rows["sensitivity[neg]"]["n_boot_used"] == 400
    assert rows["auc_macro"]["n_boot_used"] == rows["sensitivity[pos]"]["n_boot_used"]


def test_a_candidate_with_non_finite_outputs_fails_instead_of_raising() -> None:
    # An fp16 overflow: `--precision auto` must reject the candidate, not abort on a DataError.
    z, y = _binary(40)
    c = z.copy()
    c[3, 0] = np.inf
    c[7, 0] = np.nan
    g = gate_candidate(z, c, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.5, ids=[f"img{i}" for i in range(40)])
    assert not g["passed"] and g["failed_on"] == ["finite_outputs"]
    assert g["checks"][0]["n_non_finite"] == 2 and g["checks"][0]["drop"] == pytest.approx(2 / 40)
    assert {"img3", "img7"} <= set(g["disagreements"]) and g["decision_agreement"] <= 38 / 40
    json.dumps(g, allow_nan=False)  # it goes into the manifest


def _clips(n_clips: int, k: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A parent, a noisy candidate and labels for n_clips clips (one frame each)."""
    z, y = _binary(n_clips, seed=seed)
    noisy = z + np.random.default_rng(seed + 1).normal(scale=2.0, size=z.shape).astype(np.float32)
    return z, noisy, y


def test_frames_of_one_clip_are_resampled_together() -> None:
    # 40 clips of 6 identical frames. Drawn by clip, the gate must give exactly the figures of one frame
    # per clip; drawn by frame it treats 6 copies as 6 independent cases and narrows every interval.
    k = 6
    z, noisy, y = _clips(40, k)
    one = gate_candidate(z, noisy, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01)
    zz, nz, yy = np.repeat(z, k, axis=0), np.repeat(noisy, k, axis=0), np.repeat(y, k)
    clips = [f"clip{i:02d}.mp4" for i in range(40) for _ in range(k)]
    ids = [f"clip{i:02d}.mp4#{j}" for i in range(40) for j in range(k)]
    g = gate_candidate(zz, nz, yy, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01, ids=ids, groups=clips, group_unit="clip")
    assert g["unit"] == "clip" and g["n_units"] == 40 and g["n"] == 40 * k and one["unit"] == "image"
    assert [c["metric"] for c in g["checks"]] == [c["metric"] for c in one["checks"]]
    for a, b in zip(one["checks"], g["checks"]):
        assert b["drop"] == pytest.approx(a["drop"]) and b["drop_ci95"] == pytest.approx(a["drop_ci95"]), a["metric"]
        assert b.get("n_boot_used") == a.get("n_boot_used")
    frames = gate_candidate(zz, nz, yy, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01, ids=ids)
    assert frames["unit"] == "image" and frames["n_units"] == 40 * k
    width = [c["drop_ci95"][1] - c["drop_ci95"][0] for c in frames["checks"]]
    assert all(w < c["drop_ci95"][1] - c["drop_ci95"][0] for w, c in zip(width, g["checks"]))
    json.dumps(g, allow_nan=False)


def test_groups_of_one_image_resample_images_and_bad_groups_are_refused() -> None:
    from edgeclf.errors import ConfigError

    z, noisy, y = _clips(60, 1)
    plain = gate_candidate(z, noisy, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01)
    single = gate_candidate(z, noisy, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01, groups=[f"g{i}" for i in range(60)])
    assert single == plain and single["unit"] == "image" and single["n_units"] == 60
    # Near-copy groups: the unit is named "group".
    pairs = [f"g{i // 2}" for i in range(60)]
    assert gate_candidate(z, noisy, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01, groups=pairs)["unit"] == "group"
    with pytest.raises(ConfigError, match="59 groups for 60 validation images"):
        gate_candidate(z, noisy, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01, groups=pairs[:59])
    with pytest.raises(ConfigError, match="group unit 'patient' is unknown"):
        gate_candidate(z, noisy, y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01, groups=pairs, group_unit="patient")


def test_a_figure_undefined_for_both_models_neither_fails_the_gate_nor_writes_nan() -> None:
    # A validation split holding one class: AUC is undefined for the parent and for any candidate alike.
    z, _ = _binary()
    y = np.ones(len(z), np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "Mean of empty slice" noise either
        g = gate_candidate(z, z.copy(), y, "binary", 1.0, RULE, ["neg", "pos"], max_drop=0.01)
    auc = next(c for c in g["checks"] if c["metric"] == "auc_macro")
    assert g["passed"], g["failed_on"]
    assert auc["undefined"] and auc["parent"] is None and auc["candidate"] is None and auc["drop"] == 0.0
    json.loads(json.dumps(g), parse_constant=lambda c: pytest.fail(f"{c} in the gate record"))


def test_a_class_absent_from_validation_is_recorded_as_unchecked() -> None:
    """No validation image of class c: its sensitivity cannot be judged; the record says so instead of dropping it."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)  # classes a and b only
    z = rng.normal(size=(60, 3)).astype(np.float32)
    z[np.arange(60), y] += 2
    cand = z.copy()
    cand[:, 2] += 50.0  # the candidate calls every image "c"
    g = gate_candidate(z, cand, y, "multiclass", 1.0, DecisionRule("max-ratio", (0.3, 0.3, 0.3)), ["a", "b", "c"],
                       max_drop=0.01, min_agreement=0.0)
    assert [c["metric"] for c in g["checks"]] == ["auc_macro", "sensitivity[a]", "sensitivity[b]", "sensitivity[c]",
                                                  "decision_agreement"]
    c = next(c for c in g["checks"] if c["metric"] == "sensitivity[c]")
    assert c == {"metric": "sensitivity[c]", "parent": None, "candidate": None, "drop": 0.0, "drop_ci95": [0.0, 0.0],
                 "n_boot_used": 0, "undefined": True, "support": 0, "passed": True}
    assert "sensitivity[c]" not in g["failed_on"] and "sensitivity[a]" in g["failed_on"]  # a and b are still judged
    json.loads(json.dumps(g), parse_constant=lambda v: pytest.fail(f"{v} in the gate record"))
    # Multilabel: a label with no negatives has no specificity to check; recorded the same way.
    ym = (rng.random((60, 3)) < 0.4).astype(np.uint8)
    ym[:, 1] = 1
    g = gate_candidate(z, z, ym, "multilabel", 1.0, DecisionRule("multilabel", (0.5, 0.5, 0.5)), ["a", "b", "c"], max_drop=0.0)
    spec_b = next(c for c in g["checks"] if c["metric"] == "specificity[b]")
    assert g["passed"] and spec_b["undefined"] and spec_b["support"] == 0 and len(g["checks"]) == 8


# -- the macro AUC over resamples that lack a class ---------------------------------------------------------------
# Found by a review: the gate took a nanmean over classes, so a resample with no image of a rare class scored the
# macro over the other classes (no drop) and pulled the interval's low end to 0: a significant drop passed.
_RARE_N_BOOT, _RARE_SEED = 1000, 0



def _rare_class_case():
    # 60 validation images: 29 a, 29 b, 2 c (a rare class). Parent separates everything (macro AUC 1.0).
    n = 60
    y = np.array([0] * 29 + [1] * 29 + [2] * 2)
    z = np.zeros((n, 3))
    z[np.arange(n), y] = 3.0
    z[:29, 0] += np.linspace(0, 0.5, 29)
    z[29:58, 1] += np.linspace(0, 0.5, 29)
    cand = z.copy()
    cand[58:] = [0.0, 0.0, 0.3]   # both c images still decided c (p_c 0.40), but ...
    cand[:6] = [2.0, 0.0, 1.9]    # ... six a images now carry p_c 0.44 (still decided a): class c's AUC drops to 0.90
    return z, cand, y


def _paired_macro_auc_reference(z, cand, y):
    pp, pc = probabilities(z, "multiclass"), probabilities(cand, "multiclass")
    n = len(y)
    rng = np.random.default_rng(_RARE_SEED)  # the gate's own draws, so both sides see the same resamples
    drops = []
    for _ in range(_RARE_N_BOOT):
        idx = rng.integers(0, n, n)
        yy = y[idx]
        if any((yy == k).all() or not (yy == k).any() for k in range(3)):
            continue  # a class without positives (or negatives): no macro AUC over the three classes
        mp = np.mean([roc_auc_score(yy == k, pp[idx, k]) for k in range(3)])
        mc = np.mean([roc_auc_score(yy == k, pc[idx, k]) for k in range(3)])
        drops.append(mp - mc)
    point = np.mean([roc_auc_score(y == k, pp[:, k]) for k in range(3)]) - np.mean([roc_auc_score(y == k, pc[:, k]) for k in range(3)])
    return point, np.percentile(drops, [2.5, 97.5]), len(drops)


def test_macro_auc_drop_interval_matches_paired_reference() -> None:
    z, cand, y = _rare_class_case()
    rule = DecisionRule("max-ratio", (1 / 3, 1 / 3, 1 / 3))
    g = gate_candidate(z, cand, y, "multiclass", 1.0, rule, ["a", "b", "c"], max_drop=0.01, n_boot=_RARE_N_BOOT, seed=_RARE_SEED)
    auc = next(c for c in g["checks"] if c["metric"] == "auc_macro")
    point, (lo, hi), used = _paired_macro_auc_reference(z, cand, y)
    assert auc["drop"] == np.float64(point)  # 0.0345: 3.4x max_drop, under the 0.05 ceiling
    assert auc["n_boot_used"] == used, (auc["n_boot_used"], used)
    assert np.allclose(auc["drop_ci95"], [lo, hi]), (auc["drop_ci95"], [lo, hi])


def test_a_significant_macro_auc_drop_fails_the_gate() -> None:
    z, cand, y = _rare_class_case()
    rule = DecisionRule("max-ratio", (1 / 3, 1 / 3, 1 / 3))
    g = gate_candidate(z, cand, y, "multiclass", 1.0, rule, ["a", "b", "c"], max_drop=0.01, n_boot=_RARE_N_BOOT, seed=_RARE_SEED)
    _, (lo, _), _ = _paired_macro_auc_reference(z, cand, y)
    assert lo > 0  # the reference interval excludes 0: drop 0.034 > max_drop 0.01 is significant
    assert "auc_macro" in g["failed_on"], g["checks"][0]
