"""edgeclf.runtime.smoothing: outliers never flip the label, sustained changes show, the operating point holds."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime.postprocess import DecisionRule, decide
from edgeclf.runtime.smoothing import CINE, SINGLE_IMAGE, CineSmoother, SmoothingConfig, max_outlier_lead

LABELS = ("normal", "cyst", "mass")


def _steady(rng: np.random.Generator, k: int, cls: int, n: int, lead: float = 0.0) -> np.ndarray:
    """(n, k) noisy probability rows in which `cls` always wins by at least `lead`."""
    rows = rng.dirichlet(np.ones(k), size=n)
    top = rows.max(axis=1)
    rows[np.arange(n), cls] = np.maximum(rows[np.arange(n), cls], top + lead)
    return rows / rows.sum(axis=1, keepdims=True)


def _run(sm: CineSmoother, rows: np.ndarray) -> List[Optional[str]]:
    return [sm.update(r).shown_label for r in rows]


def test_cine_defaults_reject_any_single_frame_outlier() -> None:
    assert CINE.min_dwell_frames > max_outlier_lead(CINE.alpha, CINE.hysteresis)
    assert max_outlier_lead(0.3, 0.1) == 4 and max_outlier_lead(1.0, 0.0) == 1 and max_outlier_lead(0.05, 0.1) == 0


@pytest.mark.parametrize("seed", range(60))
def test_single_frame_outliers_never_flip_the_shown_label(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 5))
    labels = [f"c{i}" for i in range(k)]
    steady = int(rng.integers(k))
    # barely winning steady frames (the worst case for an outlier), with a 1-frame outlier every 12-30 frames
    rows = _steady(rng, k, steady, 400, lead=float(rng.choice([0.0, 0.01, 0.2])))
    at = 0 if seed % 2 else int(rng.integers(1, 12))  # odd seeds: the very first frame is an outlier
    n_out = 0
    while at < len(rows):
        other = int(rng.choice([i for i in range(k) if i != steady]))
        rows[at] = np.eye(k)[other]  # the most extreme outlier: probability 1 for another class
        n_out += 1
        at += int(rng.integers(12, 31))
    sm = CineSmoother(labels)
    shown = _run(sm, rows)
    assert n_out > 10
    assert set(shown) <= {labels[steady], None}
    assert shown[-1] == labels[steady] and sm.counts["label_changes"] == 0


@pytest.mark.parametrize("seed", range(40))
def test_binary_single_frame_outliers_never_cross_the_operating_point(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    t, h = float(rng.uniform(0.05, 0.95)), CINE.hysteresis
    positive = bool(seed % 2)
    lo, hi = (t + h * (1 - t), 1.0) if positive else (0.0, t * (1 - h))
    p = rng.uniform(lo, hi, size=300)
    at = int(rng.integers(0, 3))
    while at < len(p):
        p[at] = 0.0 if positive else 1.0
        at += int(rng.integers(12, 31))
    rule = DecisionRule("threshold", (t,), positive=1)
    sm = CineSmoother(("normal", "abnormal"), rule=rule)
    shown = _run(sm, np.stack([1 - p, p], axis=1))
    want = "abnormal" if positive else "normal"
    assert set(shown) <= {want, None} and shown[-1] == want


@pytest.mark.parametrize("seed", range(20))
def test_a_sustained_change_shows_within_the_alpha_and_dwell_bound(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    a, b = (int(x) for x in rng.choice(3, size=2, replace=False))
    pa = np.full(3, 0.05)
    pa[a] = 0.9
    pb = np.full(3, 0.05)
    pb[b] = 0.9
    cfg = CINE
    sm = CineSmoother(LABELS, config=cfg)
    for _ in range(30):
        r = sm.update(pa)
    assert r.shown_label == LABELS[a] and not r.abstain
    # excess of b over a starts at 0.05 - 0.9 and moves toward 0.85 by (1 - alpha) per frame; it must reach the
    # hysteresis, then lead for min_dwell_frames frames.
    e_old, e_new = pa[b] - pa[a], pb[b] - pb[a]
    cross = math.ceil(math.log((e_new - cfg.hysteresis) / (e_new - e_old)) / math.log(1 - cfg.alpha))
    bound = cross + cfg.min_dwell_frames - 1
    results = [sm.update(pb) for _ in range(bound + 5)]
    first = next(i for i, r in enumerate(results) if r.shown_label == LABELS[b])
    assert first <= bound and first >= cfg.min_dwell_frames - 1
    assert results[first].changed and not any(r.changed for r in results[first + 1:])
    assert all(r.shown_label == LABELS[a] for r in results[:first])


def test_hysteresis_stops_oscillation_between_two_close_classes() -> None:
    rng = np.random.default_rng(7)
    # two classes within a few points of each other, the lead switching every frame or two
    p = 0.5 + rng.choice([-1, 1], size=600) * rng.uniform(0.0, 0.04, size=600)
    rows = np.stack([p, 1 - p], axis=1)
    flicker = CineSmoother(("a", "b"), alpha=1.0, hysteresis=0.0, min_dwell_frames=1)
    raw = _run(flicker, rows)
    changes_raw = sum(x != y for x, y in zip(raw, raw[1:]))
    assert changes_raw > 100  # per-frame decisions flicker
    sm = CineSmoother(("a", "b"))  # the cine defaults
    shown = _run(sm, rows)
    assert sm.counts["label_changes"] == 0
    assert sum(x != y for x, y in zip(shown, shown[1:])) <= 1  # at most the first appearance
    # The margin alone (no smoothing, dwell 1): a change needs the margin, or the rule's pick on HOLD_LIMIT x 1 frames
    # in a row; far fewer changes than per frame, each after the new label won its last HOLD_LIMIT frames.
    from edgeclf.runtime.smoothing import HOLD_LIMIT

    sm = CineSmoother(("a", "b"), alpha=1.0, min_dwell_frames=1, hysteresis=0.1)
    shown = _run(sm, rows)
    changes = [i for i in range(1, len(shown)) if shown[i] != shown[i - 1]]
    assert len(changes) * 3 < changes_raw
    won = ["a" if r[0] >= r[1] else "b" for r in rows]
    assert all(won[i - HOLD_LIMIT + 1 : i + 1] == [shown[i]] * HOLD_LIMIT for i in changes)


def test_hysteresis_band_is_in_probability_units() -> None:
    sm = CineSmoother(("a", "b"), alpha=1.0, hysteresis=0.1, min_dwell_frames=1)
    assert sm.update([0.9, 0.1]).shown_label == "a"
    assert sm.update([0.46, 0.54]).shown_label == "a"  # b leads by 0.08 < 0.1
    assert sm.update([0.44, 0.56]).shown_label == "b"  # by 0.12
    assert sm.update([0.54, 0.46]).shown_label == "b"


def test_quality_failed_frames_abstain_with_the_gates_reason_and_leave_the_state() -> None:
    sm = CineSmoother(LABELS, min_dwell_frames=3)  # 3 gate-failed frames in a row: not more than the dwell, kept
    sm.update([0.8, 0.1, 0.1])
    sm.update([0.8, 0.1, 0.1])
    r = sm.update([0.8, 0.1, 0.1])
    assert r.shown_label == "normal"
    before = r.smoothed_probs
    bad = sm.update([0.0, 0.0, 1.0], quality_ok=False, reasons=["too_dark", "frozen"])
    assert bad.abstain and bad.shown_label is None and bad.abstain_reason == "too_dark,frozen" and bad.changed
    np.testing.assert_array_equal(bad.smoothed_probs, before)
    assert sm.update([0, 0, 1], quality_ok=False, reasons="blank").abstain_reason == "blank"
    assert sm.update(None, quality_ok=False).abstain_reason == "quality"  # inference skipped on a bad frame
    back = sm.update([0.8, 0.1, 0.1])
    assert back.shown_label == "normal" and back.changed and not back.abstain
    np.testing.assert_allclose(back.smoothed_probs, 0.3 * np.array([0.8, 0.1, 0.1]) + 0.7 * before)
    assert sm.counts["quality_failed"] == 3 and sm.counts["frames"] == 7 and sm.counts["resets"] == 0


def test_binary_shows_the_operating_point_not_argmax() -> None:
    rule = DecisionRule("threshold", (0.2,), positive=1)
    sm = CineSmoother(("normal", "abnormal"), rule=rule, config=SINGLE_IMAGE)
    r = sm.update([0.7, 0.3])  # argmax says normal; the clinical operating point says abnormal
    assert r.shown_label == "abnormal" and r.shown_confidence == pytest.approx(0.3)
    assert sm.update([0.85, 0.15]).shown_label == "normal"
    # cine: the smoothed probability crosses 0.2 + 0.1 * 0.8 = 0.28 to turn positive, < 0.18 to turn back
    cine = CineSmoother(("normal", "abnormal"), rule=rule, alpha=1.0, min_dwell_frames=1, hysteresis=0.1)
    assert [cine.update([1 - p, p]).shown_label for p in (0.1, 0.25, 0.27, 0.29, 0.19, 0.181, 0.179)] == [
        "normal", "normal", "normal", "abnormal", "abnormal", "abnormal", "normal"]
    # positive = 0 flips the roles
    rule0 = DecisionRule("threshold", (0.2,), positive=0)
    assert CineSmoother(("a", "b"), rule=rule0, config=SINGLE_IMAGE).update([0.25, 0.75]).shown_label == "a"


def test_single_image_preset_equals_decide_per_image() -> None:
    rng = np.random.default_rng(3)
    th = (0.5, 0.3, 0.2)
    rule = DecisionRule("max-ratio", th)
    probs = rng.dirichlet(np.ones(3), size=300)
    sm = CineSmoother(LABELS, rule=rule, config=SINGLE_IMAGE)
    shown = [sm.update(p).shown_label for p in probs]
    assert shown == [LABELS[i] for i in decide(probs, rule)]
    brule = DecisionRule("threshold", (0.35,), positive=1)
    pb = rng.uniform(size=300)
    rows = np.stack([1 - pb, pb], axis=1)
    bs = CineSmoother(("n", "p"), rule=brule, config=SINGLE_IMAGE)
    assert [bs.update(r).shown_label for r in rows] == [("n", "p")[i] for i in decide(rows, brule)]


def test_max_ratio_thresholds_pick_the_candidate() -> None:
    rule = DecisionRule("max-ratio", (0.6, 0.2, 0.2))
    sm = CineSmoother(LABELS, rule=rule, config=SINGLE_IMAGE)
    assert sm.update([0.5, 0.3, 0.2]).shown_label == "cyst"  # 0.5/0.6 < 0.3/0.2


def test_low_confidence_and_settling() -> None:
    sm = CineSmoother(LABELS, min_confidence=0.6, min_dwell_frames=3)
    r = sm.update([0.9, 0.05, 0.05])  # the average starts at the neutral point: 0.3 * 0.9 + 0.7 / 3 = 0.503
    np.testing.assert_allclose(r.smoothed_probs, 0.3 * np.array([0.9, 0.05, 0.05]) + 0.7 / 3)
    assert r.abstain and r.abstain_reason == "low_confidence" and r.shown_label is None and not r.changed
    r = sm.update([0.9, 0.05, 0.05])
    assert r.abstain and r.abstain_reason == "settling" and not r.changed
    r = sm.update([0.9, 0.05, 0.05])
    assert r.shown_label == "normal" and r.changed and r.shown_confidence == pytest.approx(0.9 - 0.7**3 * (0.9 - 1 / 3))
    for _ in range(10):
        r = sm.update([0.4, 0.35, 0.25])
    assert r.abstain and r.abstain_reason == "low_confidence" and sm.committed_label == "normal"
    assert sm.counts["settling"] == 1 and sm.counts["low_confidence"] >= 2


def test_reset_forgets_everything() -> None:
    sm = CineSmoother(LABELS, min_dwell_frames=2)
    for _ in range(5):
        sm.update([0.1, 0.8, 0.1])
    assert sm.committed_label == "cyst"
    sm.reset()
    assert sm.committed_label is None and sm.counts["resets"] == 1
    r = sm.update([0.8, 0.1, 0.1])
    assert r.abstain_reason == "settling" and r.changed  # the display went from cyst to nothing
    np.testing.assert_allclose(r.smoothed_probs, 0.3 * np.array([0.8, 0.1, 0.1]) + 0.7 / 3)  # no old average
    assert sm.update([0.8, 0.1, 0.1]).shown_label == "normal"


def test_record_fields_are_json_ready() -> None:
    sm = CineSmoother(LABELS, config=SINGLE_IMAGE)
    f = sm.record_fields(sm.update(np.array([[0.7, 0.2, 0.1]], np.float32)))
    assert f["label"] == "normal" and f["abstain"] is False and "abstain_reason" not in f
    assert f["confidence"] == pytest.approx(0.7) and set(f["smoothed_probs"]) == set(LABELS)


def test_for_fps_scales_with_the_frame_rate_and_stays_outlier_safe() -> None:
    for fps in (10, 15, 25, 30, 60):
        cfg = SmoothingConfig.for_fps(fps)
        assert cfg.min_dwell_frames > max_outlier_lead(cfg.alpha, cfg.hysteresis)
    assert SmoothingConfig.for_fps(30).alpha < SmoothingConfig.for_fps(15).alpha
    assert SmoothingConfig.for_fps(30, time_constant_s=0, dwell_s=0, hysteresis=0.0) == SINGLE_IMAGE


@pytest.mark.parametrize(
    "kwargs, key",
    [({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"hysteresis": 1.0}, "hysteresis"),
     ({"min_dwell_frames": 0}, "min_dwell_frames"), ({"min_dwell_frames": 2.5}, "min_dwell_frames"),
     ({"min_confidence": -0.1}, "min_confidence"), ({"alpha": True}, "alpha")],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=f"smoothing.{key}"):
        CineSmoother(LABELS, **kwargs)


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="multilabel"):
        CineSmoother(LABELS, rule=DecisionRule("multilabel", (0.5, 0.5, 0.5)))
    with pytest.raises(ConfigError, match="2 labels"):
        CineSmoother(LABELS, rule=DecisionRule("threshold", (0.5,), positive=1))
    with pytest.raises(ConfigError, match="thresholds"):
        CineSmoother(LABELS, rule=DecisionRule("max-ratio", (0.5, 0.5)))
    sm = CineSmoother(LABELS)
    with pytest.raises(DataError, match=r"shape \(3,\)"):
        sm.update([0.5, 0.5])
    with pytest.raises(DataError, match="not logits"):
        sm.update([2.0, -1.0, 0.5])
    with pytest.raises(DataError):
        sm.update([float("nan"), 0.5, 0.5])
    with pytest.raises(DataError, match="no probabilities"):
        sm.update(None)
    assert sm.counts["frames"] == 0


def test_confidence_floor_applies_to_the_shown_label_not_the_top_one() -> None:
    # Hysteresis holds "a" while "b" leads by less than the margin: "a" at 46% must not be shown over a 0.5 floor.
    sm = CineSmoother(["a", "b"], min_confidence=0.5)
    for _ in range(30):
        r = sm.update([1.0, 0.0])
    assert r.shown_label == "a"
    for _ in range(20):
        r = sm.update([0.46, 0.54])  # b leads by 0.08 < hysteresis 0.1: "a" stays committed (for now: HOLD_LIMIT)
    assert sm.committed_label == "a"
    assert r.abstain and r.abstain_reason == "low_confidence" and r.shown_label is None
    # Above the floor the held label is shown with its own probability.
    sm2 = CineSmoother(["a", "b"], min_confidence=0.4)
    for p in [[1.0, 0.0]] * 30 + [[0.46, 0.54]] * 20:
        r = sm2.update(p)
    assert r.shown_label == "a" and r.shown_confidence == pytest.approx(0.46, abs=1e-3)


def test_no_label_is_held_against_the_rule_for_ever() -> None:
    from edgeclf.runtime.smoothing import HOLD_LIMIT

    # Equal thresholds: b wins every frame by less than the margin; after HOLD_LIMIT x dwell frames it is shown.
    sm = CineSmoother(["a", "b"])
    for _ in range(30):
        sm.update([1.0, 0.0])
    shown = [sm.update([0.46, 0.54]).shown_label for _ in range(60)]
    assert shown[-1] == "b" and shown.index("b") <= 8 + HOLD_LIMIT * 5  # b is the rule's winner from about frame 8
    # Max-ratio thresholds (0.5, 0.05, 0.5): the rule picks "rare" (ratio 2.0) whose probability 0.1 can never clear
    # the 0.1 margin, while "c" leads "a" by 0.3 and was never tested: "a" was held at 30% for ever.
    sm = CineSmoother(["a", "rare", "c"], rule=DecisionRule("max-ratio", (0.5, 0.05, 0.5)))
    for _ in range(40):
        sm.update([0.9, 0.05, 0.05])
    for _ in range(60):
        r = sm.update([0.3, 0.1, 0.6])
    assert r.shown_label == "rare" == sm.committed_label  # what the bundle's rule decides on these probabilities
    # One outlier frame in a steady state does not switch (hysteresis keeps its purpose).
    sm = CineSmoother(["a", "b"])
    for p in [[0.9, 0.1]] * 30:
        sm.update(p)
    for p in [[0.0, 1.0]] + [[0.9, 0.1]] * 60:
        assert sm.update(p).shown_label == "a"


def test_a_long_gate_failed_gap_resets_so_the_old_label_is_not_shown_as_current() -> None:
    sm = CineSmoother(LABELS)  # CINE: dwell 5
    for _ in range(30):
        r = sm.update([0.0, 0.0, 1.0])
    assert r.shown_label == "mass"
    for _ in range(30 * 60):  # probe lifted for a minute at 30 fps
        assert sm.update(None, quality_ok=False, reasons=["blank"]).abstain_reason == "blank"
    assert sm.counts["resets"] == 1  # once per gap, not once per frame
    r = sm.update([1.0, 0.0, 0.0])  # probe back on: the pre-lift label is not current
    assert r.abstain and r.abstain_reason == "settling" and sm.committed_label is None


def test_a_short_gate_failed_run_keeps_the_label() -> None:
    sm = CineSmoother(LABELS)
    for _ in range(30):
        sm.update([0.0, 0.0, 1.0])
    for _ in range(sm.config.min_dwell_frames):  # up to min_dwell_frames in a row: kept (a shadow, a speckle burst)
        sm.update(None, quality_ok=False, reasons=["blank"])
    assert sm.update([0.0, 0.0, 1.0]).shown_label == "mass" and sm.counts["resets"] == 0
    for _ in range(sm.config.min_dwell_frames + 1):  # one more: reset
        sm.update(None, quality_ok=False, reasons=["blank"])
    assert sm.committed_label is None and sm.counts["resets"] == 1


def _frame_the_change_shows(labels: List[str], steady: List[float], new: List[float]) -> Optional[int]:
    sm = CineSmoother(labels, config=CINE)
    for _ in range(60):
        sm.update(steady)
    assert sm.committed_label == labels[0]
    for n in range(1, 30):
        if sm.update(new).shown_label == labels[1]:
            return n
    return None


def test_the_documented_delay_of_a_clear_change_is_the_measured_one() -> None:
    import edgeclf.runtime.smoothing as smoothing_mod

    got = [_frame_the_change_shows(["a", "b"], [0.9, 0.1], [0.1, 0.9]),
           _frame_the_change_shows(["a", "b", "c"], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05])]
    assert got == [7, 7]
    doc = " ".join(str(smoothing_mod.__doc__).split())
    assert "shows on the 7th frame, ~0.23 s at 30 fps and ~0.47 s at 15 fps" in doc


@pytest.mark.parametrize("how", ["binary", "multiclass", "dwell 3", "after a reset"])
def test_a_borderline_first_label_is_shown_within_the_hold_limit(how: str) -> None:
    """The rule picks one class on every frame, always too close to the boundary to clear the margin (a clip at
    0.507-0.508 against a 0.5067 threshold): the first label is the rule's pick after HOLD_LIMIT x dwell frames at
    most, as a change of a shown label is, not "settling" for ever."""
    from edgeclf.runtime.smoothing import HOLD_LIMIT

    if how == "multiclass":
        sm = CineSmoother(LABELS)
        rows, want = [[0.34, 0.33, 0.33]] * 60, "normal"
    else:
        sm = CineSmoother(("benign", "malignant"), rule=DecisionRule("threshold", (0.5067,), positive=1),
                          min_dwell_frames=3 if how == "dwell 3" else None)
        rows, want = [[1 - p, p] for p in np.linspace(0.5070, 0.5080, 60)], "malignant"
    if how == "after a reset":
        for _ in range(30):
            sm.update([0.9, 0.1])
        assert sm.committed_label == "benign"
        sm.reset()
    bound = HOLD_LIMIT * sm.config.min_dwell_frames
    results = [sm.update(r) for r in rows]
    shown = [r.shown_label for r in results]
    first = shown.index(want)  # raises if never shown
    assert first <= bound - 1, f"first shown on frame {first + 1}, bound {bound}"
    assert all(r.abstain_reason == "settling" for r in results[:first])
    assert set(shown[first:]) == {want} and sm.counts["label_changes"] == 0


# -- independent images (X-rays, image files, watched files) never share smoothing state ------------------------
# The pipeline's source kinds: a still is decided on its own, as by a fresh smoother, and one that was not inferred
# says nothing about any other image; a cine's frames (video, DICOM cine, live) keep the documented stream behaviour.


def test_a_still_is_decided_as_by_a_fresh_smoother_and_leaves_the_stream_state_alone() -> None:
    sm = CineSmoother(LABELS, config=SINGLE_IMAGE, min_confidence=0.5)
    first = sm.update_still([0.7, 0.2, 0.1])
    assert first.shown_label == "normal" and first.changed and not first.abstain
    np.testing.assert_allclose(first.smoothed_probs, [0.7, 0.2, 0.1])  # type: ignore[arg-type]
    # The next patient's image, blank (the gate stopped it, no inference): nothing of the image before on its line.
    blank = sm.update_still(None, quality_ok=False, reasons=("blank",))
    assert blank.abstain and blank.abstain_reason == "blank" and blank.shown_label is None
    assert blank.smoothed_probs is None and blank.changed is False
    f = sm.record_fields(blank)
    assert f["smoothed_probs"] is None and f["label_changed"] is False and f["confidence"] is None
    # Same label as the image before: still its own first result (changed), never a "change" of a committed label.
    again = sm.update_still([0.6, 0.3, 0.1])
    assert again.shown_label == "normal" and again.changed
    low = sm.update_still([0.4, 0.35, 0.25])  # below the floor: inferred, so it has its (own) smoothed value
    assert low.abstain_reason == "low_confidence" and not low.changed
    np.testing.assert_allclose(low.smoothed_probs, [0.4, 0.35, 0.25])  # type: ignore[arg-type]
    assert sm.counts == {"frames": 4, "quality_failed": 1, "low_confidence": 1, "settling": 0, "label_changes": 0,
                         "resets": 0}
    assert sm.committed_label is None  # no stream state was touched


def test_stills_between_cine_frames_do_not_disturb_the_cine() -> None:
    rows = [[0.1, 0.8, 0.1]] * 8 + [[0.2, 0.7, 0.1]] * 4
    plain = CineSmoother(LABELS)
    want = [plain.update(r) for r in rows]
    mixed = CineSmoother(LABELS)
    got = []
    for k, r in enumerate(rows):
        if k in (3, 9):
            mixed.update_still([0.9, 0.05, 0.05])
            mixed.update_still(None, quality_ok=False, reasons="blank")
        got.append(mixed.update(r))
    assert [(g.shown_label, g.abstain_reason, g.changed) for g in got] == \
        [(w.shown_label, w.abstain_reason, w.changed) for w in want]
    np.testing.assert_allclose(got[-1].smoothed_probs, want[-1].smoothed_probs)  # type: ignore[arg-type]


def test_a_stills_bad_input_is_a_one_line_error_that_changes_nothing() -> None:
    sm = CineSmoother(LABELS, config=SINGLE_IMAGE)
    with pytest.raises(DataError, match="shape"):
        sm.update_still([0.5, 0.5])
    assert sm.counts["frames"] == 0


def test_a_gate_failed_cine_frame_keeps_the_running_average_of_its_own_clip() -> None:
    """Documented cine behaviour, kept: a short gate-failed gap inside one clip holds the committed label and the
    average (the next frame continues from it), so its line shows that held average; label_changed says the
    display went from the label to an abstain."""
    sm = CineSmoother(LABELS)
    last = [sm.update([0.1, 0.8, 0.1]) for _ in range(10)][-1]
    assert last.shown_label == "cyst"
    gap = sm.update(None, quality_ok=False, reasons="blank")
    np.testing.assert_array_equal(gap.smoothed_probs, last.smoothed_probs)  # type: ignore[arg-type]
    assert gap.changed and sm.record_fields(gap)["smoothed_probs"] == sm.record_fields(last)["smoothed_probs"]
    assert sm.update([0.1, 0.8, 0.1]).shown_label == "cyst"


# -- the same through `edgeclf run` (tiny ONNX bundle, no torch) --------------------------------------------------

def _lines(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def _png(path: Path, img: np.ndarray) -> None:
    cv2 = pytest.importorskip("cv2")
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def _xray(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 200, size=(64, 64), dtype=np.uint8)


def _edgeclf_run(tmp_path: Path, source: str, smoothing: str = "auto") -> List[Dict[str, Any]]:
    pytest.importorskip("onnxruntime")
    from edgeclf.runtime import app
    from edgeclf.runtime.pipeline import RunOptions
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    app.run_bundle(str(bundle), source, out=str(out), options=RunOptions(smoothing=smoothing))
    return _lines(out)


def _unclassified_line_is_its_own(rec: Dict[str, Any]) -> None:
    assert rec["abstain"] is True and rec["probs"] is None
    assert rec["smoothed_probs"] is None and rec["label_changed"] is False, rec


def test_an_unclassified_still_does_not_carry_the_previous_images_probabilities(tmp_path: Path) -> None:
    """(review h2, 1) A folder of X-rays of two patients: a1 is classified, a2 is blank and abstains without
    inference; a2's line showed a1's probabilities under smoothed_probs, and label_changed true."""
    folder = tmp_path / "exam"
    _png(folder / "a1.png", _xray())
    _png(folder / "a2.png", np.zeros((64, 64), np.uint8))  # blank: the gate stops it
    _png(folder / "a3.png", _xray(1))
    first, second, third = _edgeclf_run(tmp_path, str(folder))
    assert first["abstain"] is False and first["smoothed_probs"] == pytest.approx(first["probs"], abs=1e-6)
    assert second["abstain_reason"] == "blank"
    _unclassified_line_is_its_own(second)
    assert third["abstain"] is False and third["smoothed_probs"] == pytest.approx(third["probs"], abs=1e-6)


def test_an_unclassified_file_in_a_watched_folder_does_not_carry_the_previous_files_probabilities(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    _png(inbox / "p1.png", _xray())
    _png(inbox / "p2.png", np.zeros((64, 64), np.uint8))
    t = time.time() - 100
    os.utime(inbox / "p1.png", (t, t))
    os.utime(inbox / "p2.png", (t + 5, t + 5))  # read after p1
    recs = _edgeclf_run(tmp_path, f"watch:{inbox}?poll=0.05&idle_exit=0.5")
    assert [r["abstain_reason"] if r["abstain"] else None for r in recs] == [None, "blank"]
    _unclassified_line_is_its_own(recs[1])


def _film(level: int, frames: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (frames, 32, 32) if frames > 1 else (32, 32)
    return np.clip(rng.normal(level, 20, size=shape), 0, 255).astype(np.uint8)


def test_an_unclassified_single_frame_dicom_beside_a_cine_does_not_carry_the_previous_film(tmp_path: Path) -> None:
    """A DICOM folder holding a cine and two films (auto: the cine smoothed, the films shown as decided): the blank
    film's line has nothing of the film before it."""
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom

    folder = tmp_path / "dcm"
    folder.mkdir()
    write_dicom(folder / "a.dcm", _film(100, 12), instance=1, frame_time=33.3)
    write_dicom(folder / "b.dcm", _film(100, seed=1), instance=2)
    write_dicom(folder / "c.dcm", np.zeros((32, 32), np.uint8), instance=3)
    recs = _edgeclf_run(tmp_path, str(folder))
    film, blank = recs[12], recs[13]
    assert film["abstain"] is False and blank["abstain_reason"] == "blank"
    _unclassified_line_is_its_own(blank)


@pytest.mark.parametrize("where", ["dicom folder, smoothing off", "watched folder"])
def test_the_first_gated_frames_of_a_cine_file_show_nothing_of_the_file_before(tmp_path: Path, where: str) -> None:
    """Two DICOM cines (two patients), the second starting with blank frames. Without cine smoothing (--smoothing
    off, or a watched folder under auto) each frame is shown as decided, and the second file's blank frames showed
    the first file's last probabilities as smoothed_probs. Each file starts afresh: the neutral point."""
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom

    folder = tmp_path / "in"
    folder.mkdir()
    second = _film(100, 8, seed=1)
    second[:3] = 0
    a = write_dicom(folder / "a.dcm", _film(100, 8), instance=1, frame_time=33.3)
    b = write_dicom(folder / "b.dcm", second, instance=2, frame_time=33.3)
    t = time.time() - 100
    os.utime(a, (t, t))
    os.utime(b, (t + 5, t + 5))
    if where == "watched folder":
        recs = _edgeclf_run(tmp_path, f"watch:{folder}?poll=0.05&idle_exit=0.5")
    else:
        recs = _edgeclf_run(tmp_path, str(folder), smoothing="off")
    assert len(recs) == 16 and recs[7]["abstain"] is False
    for r in recs[8:11]:
        assert r["abstain_reason"] == "blank" and r["probs"] is None
        assert r["smoothed_probs"] == pytest.approx({k: 1 / 3 for k in recs[7]["probs"]}, abs=1e-6), r
    assert recs[11]["abstain"] is False


def test_a_gate_failed_frame_mid_clip_shows_its_clips_running_average(tmp_path: Path) -> None:
    """A recorded cine (auto: smoothed) with a short blank gap: the gap's lines hold the clip's own average (the
    documented cine behaviour: the next frame continues from it)."""
    cv2 = pytest.importorskip("cv2")
    clip = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    for k in range(20):
        img = np.zeros((64, 64), np.uint8) if k in (12, 13) else _xray(0)
        vw.write(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    vw.release()
    recs = _edgeclf_run(tmp_path, str(clip))
    assert [k for k, r in enumerate(recs) if r["probs"] is None] == [12, 13]
    assert recs[12]["smoothed_probs"] == recs[13]["smoothed_probs"] == recs[11]["smoothed_probs"]
    assert recs[12]["label_changed"] is (recs[11]["label"] is not None)
