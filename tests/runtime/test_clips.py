"""Clip-level aggregation (edgeclf.runtime.clips): mean probability and majority vote, abstained frames excluded."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgeclf.errors import ConfigError
from edgeclf.runtime.clips import aggregate_clip, aggregate_records, group_frames
from edgeclf.runtime.postprocess import DecisionRule


def test_mean_and_vote_can_disagree() -> None:
    # Two frames mildly for class 0, one frame strongly for class 1: the vote says 0, the mean says 1.
    probs = [[0.55, 0.45, 0.0], [0.55, 0.45, 0.0], [0.0, 1.0, 0.0]]
    r = aggregate_clip(probs)
    assert r.vote == 0 and r.mean == 1
    assert r.votes == (2, 1, 0) and r.frames == 3 and r.used == 3 and r.abstained == 0
    assert r.mean_probs is not None and r.mean_probs[1] == pytest.approx(1.9 / 3)


def test_abstained_frames_are_excluded() -> None:
    probs = [None, [0.1, 0.9], None, [0.2, 0.8]]
    r = aggregate_clip(probs)
    assert r.used == 2 and r.abstained == 2 and r.mean == 1 and r.vote == 1
    assert r.mean_probs == pytest.approx((0.15, 0.85))
    # Below min_confidence a frame abstains too: only the confident frame is left.
    r = aggregate_clip([[0.6, 0.4], [0.05, 0.95]], min_confidence=0.9)
    assert r.used == 1 and r.mean == 1 and r.vote == 1


def test_all_abstained_has_no_decision() -> None:
    r = aggregate_clip([None, None], labels=["a", "b"])
    assert r.mean is None and r.vote is None and r.used == 0 and r.abstained == 2
    assert r.to_dict()["mean_label"] is None


def test_vote_tie_goes_to_higher_mean_then_lower_index() -> None:
    r = aggregate_clip([[0.6, 0.4], [0.1, 0.9]])
    assert r.votes == (1, 1) and r.vote == 1  # mean 0.35 vs 0.65
    r = aggregate_clip([[0.7, 0.3], [0.3, 0.7]])
    assert r.vote == 0  # equal means: lower index
    assert aggregate_clip([[0.3, 0.7], [0.7, 0.3]]).vote == 0  # order does not matter


def test_decision_rule_is_applied_to_frames_and_mean() -> None:
    # Binary with a low operating point on the positive class 1: 0.3 already counts as positive.
    rule = DecisionRule(kind="threshold", thresholds=(0.25,), positive=1)
    r = aggregate_clip([[0.7, 0.3], [0.8, 0.2], [0.72, 0.28]], rule=rule)
    assert r.votes == (1, 2) and r.vote == 1 and r.mean == 1  # argmax would say 0 everywhere
    mr = DecisionRule(kind="max-ratio", thresholds=(0.9, 0.1))
    assert aggregate_clip([[0.8, 0.2]], rule=mr).mean == 1


def test_records_match_arrays() -> None:
    labels = ["covid19", "pneumonia", "regular"]
    recs = [
        {"frame": 0, "probs": {"covid19": 0.2, "pneumonia": 0.7, "regular": 0.1}, "abstain": True, "abstain_reason": "settling"},
        {"frame": 1, "probs": None, "abstain": True, "abstain_reason": "dark"},
        {"frame": 2, "probs": {"covid19": 0.6, "pneumonia": 0.3, "regular": 0.1}, "abstain": False},
    ]
    a = aggregate_records(recs, labels)
    b = aggregate_clip([[0.2, 0.7, 0.1], None, [0.6, 0.3, 0.1]], labels=labels)
    assert a == b and a.used == 2  # "settling" is the smoother's, not the frame's: the frame counts
    d = a.to_dict()
    assert d["mean_label"] == "pneumonia" and d["votes"] == {"covid19": 1, "pneumonia": 1, "regular": 0}
    with pytest.raises(ConfigError, match="lack class"):
        aggregate_records([{"probs": {"a": 1.0}}], labels)


def test_errors_are_one_line() -> None:
    with pytest.raises(ConfigError):
        aggregate_clip([[0.5, 0.5], [0.2, 0.3, 0.5]])
    with pytest.raises(ConfigError):
        aggregate_clip([[0.5, 0.5]], min_confidence=1.5)
    with pytest.raises(ConfigError):
        aggregate_clip([[0.5, 0.5]], rule=DecisionRule(kind="multilabel", thresholds=(0.5, 0.5)))


def test_group_frames() -> None:
    assert group_frames(["a.mp4#0", "b.mp4#0", "a.mp4#1", "c.png"]) == {"a.mp4": [0, 2], "b.mp4": [1], "c.png": [3]}
    # Only a trailing "#<digits>" is the frame: a '#' in the clip's own name must not merge clips.
    assert group_frames(["pt#1.avi#0", "pt#2.avi#0", "pt#1.avi#1", "pt#3.avi"]) == {
        "pt#1.avi": [0, 2], "pt#2.avi": [1], "pt#3.avi": [3]}


def test_no_torch_import() -> None:
    code = "import sys, edgeclf.runtime.clips; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_incremental_aggregator_matches_and_keeps_no_frames() -> None:
    import numpy as np

    from edgeclf.runtime.clips import ClipAggregator

    rng = np.random.default_rng(0)
    probs = [None if i % 7 == 0 else list(rng.dirichlet([1, 1, 1])) for i in range(500)]
    agg = ClipAggregator(labels=["a", "b", "c"], min_confidence=0.4)
    for p in probs:
        agg.add(p)
        if p is not None:
            assert agg.result().used <= agg.frames
    assert agg.result() == aggregate_clip(probs, labels=["a", "b", "c"], min_confidence=0.4)
    # Constant memory: only running sums and counts are held (K entries each), whatever the clip's length.
    held = [v for v in vars(agg).values() if isinstance(v, (list, tuple, dict, np.ndarray)) and v is not agg.labels]
    assert held and all(len(v) == 3 for v in held)


def test_aggregator_takes_arrays_nested_rows_and_integers_alike() -> None:
    import numpy as np

    from edgeclf.runtime.clips import ClipAggregator

    forms = [(0.2, 0.7, 0.1), [0.2, 0.7, 0.1], np.array([0.2, 0.7, 0.1]), np.array([[0.2, 0.7, 0.1]]), [[0.2, 0.7, 0.1]]]
    results = []
    for p in forms:
        agg = ClipAggregator(labels=["a", "b", "c"])
        agg.add(p)
        agg.add([0, 1, 0])
        results.append(agg.result())
    assert all(r == results[0] for r in results) and results[0].votes == (0, 2, 0)


def test_aggregator_treats_a_nan_row_as_numpy_does() -> None:
    import numpy as np

    from edgeclf.runtime.clips import ClipAggregator

    nan = float("nan")
    for row in ([0.1, nan, 0.5], [0.6, nan, 0.3]):
        agg = ClipAggregator(labels=["a", "b", "c"])
        agg.add(row)
        assert agg.result().votes == tuple(int(i == int(np.argmax(np.array(row)))) for i in range(3))


def test_the_floor_applies_to_the_decided_class_as_on_the_run_display() -> None:
    # A high-sensitivity binary operating point (positive at p >= 0.2) under a floor of 0.6: the frame is decided
    # positive with p 0.3, so it abstains, as the run's display does (its top probability 0.7 would not).
    from edgeclf.runtime.smoothing import SINGLE_IMAGE, CineSmoother

    rule = DecisionRule("threshold", (0.2,), positive=1)
    r = aggregate_clip([[0.7, 0.3], [0.1, 0.9]], rule=rule, min_confidence=0.6)
    assert r.used == 1 and r.abstained == 1 and r.vote == 1
    shown = CineSmoother(["normal", "pneumonia"], rule=rule, config=SINGLE_IMAGE, min_confidence=0.6).update(np.array([0.7, 0.3]))
    assert shown.abstain
    # A confident negative call (p_neg 0.9) is kept: the floor judges the class decided, not the positive one.
    r = aggregate_clip([[0.9, 0.1]], rule=rule, min_confidence=0.6)
    assert r.used == 1 and r.vote == 0


def _file_records(file_index: int, probs: list, **extra: object) -> list:
    return [{"frame": i, "file_index": file_index, "probs": dict(zip("abc", p)), **extra} for i, p in enumerate(probs)]


A, C = [0.9, 0.05, 0.05], [0.05, 0.05, 0.9]


def test_each_file_of_a_multi_file_run_is_its_own_clip() -> None:
    """A folder of cines is several clips (the smoother restarts at each): no decision mixes two files' frames;
    a file of one frame (a still) is its own record's decision, counted, not a clip."""
    from edgeclf.runtime.clips import FileClipAggregator, aggregate_files

    recs = _file_records(0, [A] * 4) + _file_records(1, [C] * 3) + _file_records(2, [A])
    agg = FileClipAggregator(labels=["a", "b", "c"])
    for r in recs:
        agg.add_record(r)
    res = agg.result()
    assert res["decision"] is None and res["stills"] == 1  # no one decision over several files
    assert [(d["file_index"], d["frames"], d["mean_label"], d["vote_label"], d["votes"]) for d in res["decisions"]] == [
        (0, 4, "a", "a", {"a": 4, "b": 0, "c": 0}), (1, 3, "c", "c", {"a": 0, "b": 0, "c": 3})]
    assert res["decisions"][1] == {"file_index": 1, **aggregate_records(recs[4:7], ["a", "b", "c"]).to_dict()}
    assert aggregate_files(recs, ["a", "b", "c"]) == res  # offline re-aggregation of a results file agrees
    assert agg.result() == res  # result() changes nothing


def test_a_single_file_or_a_video_keeps_one_clip_decision() -> None:
    from edgeclf.runtime.clips import aggregate_files

    labels = ["a", "b", "c"]
    video = [{"frame": i, "probs": dict(zip("abc", A))} for i in range(5)]
    assert aggregate_files(video, labels) == {"decision": aggregate_records(video, labels).to_dict()}  # as before
    cine = _file_records(0, [A, A, C])
    assert aggregate_files(cine, labels) == {"decision": aggregate_records(cine, labels).to_dict(),
                                             "decisions": [{"file_index": 0, **aggregate_records(cine, labels).to_dict()}],
                                             "decisions_total": 1, "stills": 0}
    stills = _file_records(0, [A]) + _file_records(1, [C]) + _file_records(2, [A])  # a folder of X-rays
    assert aggregate_files(stills, labels) == {"decision": None, "decisions": [], "decisions_total": 0, "stills": 3}
    assert aggregate_files([], labels)["decision"]["frames"] == 0


def test_aggregate_records_refuses_records_of_several_files_or_runs() -> None:
    """One clip's records only: a results file of two cines (or of two appending runs) must not become one
    decision that mixes them."""
    labels = ["a", "b", "c"]
    with pytest.raises(ConfigError, match="more than one file or run .*file_index 0, then file_index 1.*aggregate_files"):
        aggregate_records(_file_records(0, [A]) + _file_records(1, [C]), labels)
    with pytest.raises(ConfigError, match="run r1, then run r2"):
        aggregate_records([{"run": "r1", "probs": dict(zip("abc", A))}, {"run": "r2", "probs": dict(zip("abc", C))}], labels)
    assert aggregate_records(_file_records(3, [A, C]), labels).frames == 2


def test_a_new_run_in_an_appended_results_file_starts_a_new_clip() -> None:
    from edgeclf.runtime.clips import aggregate_files

    recs = [{"run": r, "frame": i, "probs": dict(zip("abc", p))} for r, p in (("r1", A), ("r2", C)) for i in range(2)]
    res = aggregate_files(recs, ["a", "b", "c"])
    assert res["decision"] is None and [(d["run"], d["mean_label"]) for d in res["decisions"]] == [("r1", "a"), ("r2", "c")]


def test_the_per_file_decisions_kept_are_bounded_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A watched folder of cines runs for months: the summary keeps the last MAX_DECISIONS clips and counts them all."""
    from edgeclf.runtime.clips import FileClipAggregator, aggregate_files

    monkeypatch.setattr(FileClipAggregator, "MAX_DECISIONS", 3)
    recs = [r for k in range(5) for r in _file_records(k, [A, C])]
    res = aggregate_files(recs, ["a", "b", "c"])
    assert res["decisions_total"] == 5 and [d["file_index"] for d in res["decisions"]] == [2, 3, 4]
    assert res["decision"] is None
