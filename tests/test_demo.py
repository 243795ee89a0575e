from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeclf.demo import timeline_agreement

TIMELINE = {"frames": 6, "segments": [{"label": "normal", "start": 0, "end": 3}, {"label": "cyst", "start": 3, "end": 6}]}


def test_timeline_agreement_per_frame_and_segment() -> None:
    r = timeline_agreement(["normal", "normal", "cyst", "cyst", "cyst", "normal"], TIMELINE)
    assert r["agreement"] == pytest.approx(4 / 6)
    assert [s["majority"] for s in r["segments"]] == ["normal", "cyst"]
    assert [s["agreement"] for s in r["segments"]] == pytest.approx([2 / 3, 2 / 3])
    short = timeline_agreement(["normal"] * 4, TIMELINE)  # a run that stopped early is compared on what it produced
    assert short["frames_compared"] == 4 and short["frames_predicted"] == 4 and short["frames_in_timeline"] == 6
    assert short["segments"][1]["agreement"] == 0.0


@pytest.mark.slow
def test_demo_meets_its_acceptance(tmp_path: Path) -> None:
    from edgeclf.demo import run_demo

    r = run_demo(str(tmp_path / "demo"))
    assert min(r["held_out_test"]["per_class_accuracy"].values()) >= 0.95, r["held_out_test"]
    assert r["cine"]["agreement"] >= 0.9 and r["cine"]["frames_predicted"] == r["cine"]["frames_in_timeline"]
    assert r["runtime"]["written"] == r["runtime"]["frames"] == r["cine"]["frames_in_timeline"]
    for f in ("bundle/manifest.json", "results.jsonl", "timeline.png", "evaluation/roc.png", "evaluation/confusion.png", "demo.json"):
        assert (tmp_path / "demo" / f).is_file(), f
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["cine"]["agreement"] == r["cine"]["agreement"]
    assert {"cine.mp4", "bundle/manifest.json", "model/run.json", "demo.json"} <= set(r["files"]) and r["seconds"]["cine_s"] > 0


# -- the --out folder and the step timings, with the slow steps replaced by fakes that write what they would -----

def _fake_steps(monkeypatch: pytest.MonkeyPatch, calls: list[str], cine_s: float = 0.0) -> None:
    """Replace training, export, evaluation, the cine writer and the runtime with fast fakes writing their files.
    cine_s: seconds the cine writer "takes" on a virtual clock (time.perf_counter plus what it spent), without sleeping."""
    import time

    import edgeclf.demo as demo
    import edgeclf.evaluate as ev
    import edgeclf.export.bundle_writer as bw
    import edgeclf.runtime.app as app
    import edgeclf.runtime.synthetic as syn
    import edgeclf.train as tr

    def train(cfg, on_epoch=None):  # type: ignore[no-untyped-def]
        calls.append("train")
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "run.json").write_text("{}")
        return {"best_epoch": 1, "seconds": 0.0}

    def export_bundle(cfg):  # type: ignore[no-untyped-def]
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "manifest.json").write_text("{}")
        return {}

    def evaluate(target, data=None, split="test", out=None):  # type: ignore[no-untyped-def]
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text("{}")
        return {"data": {"n": 6}, "metrics": {"per_class": {"normal": {"sensitivity": 1.0}}, "accuracy": 1.0, "auc": {"macro": 1.0}}}

    real_clock, spent = time.perf_counter, [0.0]
    if cine_s:
        monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + spent[0])

    def write_cine(path, seed=0):  # type: ignore[no-untyped-def]
        spent[0] += cine_s
        Path(path).write_bytes(b"mp4")
        Path(path).with_suffix(".timeline.json").write_text(json.dumps(TIMELINE))
        return TIMELINE

    def run_bundle(bundle, source, out=None, extra_sinks=()):  # type: ignore[no-untyped-def]
        Path(out).write_text("")
        for s in extra_sinks:
            for i, label in enumerate(["normal"] * 3 + ["cyst"] * 3):
                s.write({"frame": i, "file_frame": i, "frame_label": label, "label": label, "abstain": False})
        return {"frames": 6, "written": 6, "fps": 30.0, "stages_ms": {}}

    monkeypatch.setattr(tr, "train", train)
    monkeypatch.setattr(bw, "export_bundle", export_bundle)
    monkeypatch.setattr(app, "verify_bundle", lambda b: {"checksum": "x", "reference": {}})
    monkeypatch.setattr(ev, "evaluate", evaluate)
    monkeypatch.setattr(syn, "write_cine", write_cine)
    monkeypatch.setattr(app, "run_bundle", run_bundle)
    monkeypatch.setattr(demo, "_plot_timeline", lambda p, t, c, path: Path(path).write_bytes(b"png"))


def test_demo_lists_its_own_files_and_times_the_cine_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.demo import run_demo

    calls: list[str] = []
    _fake_steps(monkeypatch, calls, cine_s=100.0)
    out = tmp_path / "demo"
    out.mkdir()
    # A previous demo's folder with a user's file beside it: reused, the old record removed, the user's file kept, unlisted.
    (out / "demo.json").write_text('{"stale": true}')
    (out / "notes.txt").write_text("mine")
    (out / "evaluation").mkdir()
    (out / "evaluation" / "metrics.json").write_text("{}")
    (out / "evaluation" / "old.png").write_bytes(b"from the previous demo")
    r = run_demo(str(out))
    assert r["files"] == ["bundle/manifest.json", "cine.mp4", "cine.timeline.json", "demo.json", "evaluation/metrics.json",
                          "model/run.json", "results.jsonl", "timeline.png"]
    assert (out / "notes.txt").read_text() == "mine" and not (out / "evaluation" / "old.png").exists()
    assert json.loads((out / "demo.json").read_text())["files"] == r["files"]
    # Writing the cine loop (100 s on the virtual clock here) is its own step, not part of the runtime's time on it.
    s = r["seconds"]
    assert s["cine_s"] >= 100 and s["run_s"] < 100 and s["total"] >= 100, s


@pytest.mark.parametrize("case", ["file", "under_a_file", "foreign_folder", "not_a_bundle", "model_is_a_file"])
def test_unusable_out_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    from edgeclf.demo import run_demo
    from edgeclf.errors import ConfigError

    calls: list[str] = []
    _fake_steps(monkeypatch, calls)
    out = tmp_path / "demo"
    if case == "file":
        out.write_text("")
    elif case == "under_a_file":
        out.write_text("")
        out = out / "sub"
    elif case == "foreign_folder":  # e.g. --out ~: never walked, never written into
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:  # a previous demo's folder with something else where the demo writes
        out.mkdir()
        (out / "demo.json").write_text("{}")
        if case == "not_a_bundle":
            (out / "bundle").mkdir()
            (out / "bundle" / "notes.txt").write_text("mine")
        else:
            (out / "model").write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError):
        run_demo(str(out))
    assert calls == [], "trained before refusing the folder"
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing removed or written


def test_failed_rerun_leaves_no_stale_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.train as tr
    from edgeclf.demo import run_demo

    (tmp_path / "demo.json").write_text('{"stale": true}')

    def fail(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("training failed")

    monkeypatch.setattr(tr, "train", fail)
    with pytest.raises(RuntimeError):
        run_demo(str(tmp_path))
    assert not (tmp_path / "demo.json").exists()
    # A rerun into the folder the failed (or stopped) run left behind is the demo's own folder, not refused.
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "half-written.bin").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="training failed"):  # got past the folder checks to training again
        run_demo(str(tmp_path))


def test_missing_opencv_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from edgeclf.demo import run_demo
    from edgeclf.errors import MissingExtraError

    calls: list[str] = []
    _fake_steps(monkeypatch, calls)
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    with pytest.raises(MissingExtraError, match="cv"):
        run_demo(str(tmp_path / "demo"))
    assert calls == []


def test_cli_out_a_file_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    (tmp_path / "afile").write_text("")
    r = run_cli("demo", "--out", str(tmp_path / "afile"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-500:]
    assert r.stderr.strip().count("\n") == 0 and "is a file" in r.stderr


# -- the cine comparison: frames that were not classified, or never came back -----------------------------------

def _runtime(records: list[dict[str, Any]]) -> Any:
    def run_bundle(bundle, source, out=None, extra_sinks=()):  # type: ignore[no-untyped-def]
        Path(out).write_text("")
        for s in extra_sinks:
            for r in records:
                s.write(r)
        return {"frames": len(records), "written": len(records), "fps": 30.0, "stages_ms": {}}
    return run_bundle


def test_a_gated_frame_does_not_crash_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.runtime.app as app
    from edgeclf.demo import UNCLASSIFIED, run_demo

    _fake_steps(monkeypatch, [])
    # no file_frame (a source that does not give it): the runtime's frame index places each frame
    recs = [{"frame": i, "frame_label": lab, "label": lab, "abstain": False}
            for i, lab in enumerate(["normal"] * 3 + ["cyst"] * 3)]
    # frame 1 failed the quality gate: the pipeline records frame_label None (not inferred) and abstains with the reason
    recs[1] = {"frame": 1, "frame_label": None, "label": None, "abstain": True, "abstain_reason": "frozen"}
    monkeypatch.setattr(app, "run_bundle", _runtime(recs))
    r = run_demo(str(tmp_path / "demo"))  # was a TypeError in np.unique, after training and export
    c = r["cine"]
    assert c["agreement"] == pytest.approx(5 / 6) and c["frames_unclassified"] == 1 and c["frames_missing"] == 0
    assert c["segments"][0]["unclassified"] == 1 and c["abstained"] == 1
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["cine"]["frames_unclassified"] == 1
    # a segment most of whose frames were not classified says so, instead of naming a class
    most = timeline_agreement([None, None, "normal", "cyst", "cyst", "cyst"], TIMELINE)
    assert most["segments"][0]["majority"] == UNCLASSIFIED and most["frames_unclassified"] == 2


def test_agreement_aligns_frames_by_their_place_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.runtime.app as app
    from edgeclf.demo import run_demo
    from edgeclf.errors import DataError

    _fake_steps(monkeypatch, [])
    truth = ["normal"] * 3 + ["cyst"] * 3
    # The video source skipped undecodable frame 2: records keep their file_frame (RECORD_META), every label correct.
    recs = [{"frame": k, "file_frame": f, "frame_label": truth[f], "label": truth[f], "abstain": False}
            for k, f in enumerate([0, 1, 3, 4, 5])]
    monkeypatch.setattr(app, "run_bundle", _runtime(recs))
    # The demo's own cine must decode whole: a missing frame fails it loudly, after recording the comparison.
    with pytest.raises(DataError, match=r"frames_missing 1, missing frames \[2\]"):
        run_demo(str(tmp_path / "demo"))
    c = json.loads((tmp_path / "demo" / "demo.json").read_text())["cine"]
    assert c["agreement"] == 1.0 and c["frames_compared"] == 5 and c["frames_missing"] == 1, c
    assert c["missing_frames"] == [2] and c["segments"][0]["missing"] == 1
    # Labels given by file frame; a result past the end of the timeline is counted, not compared.
    r = timeline_agreement({0: "normal", 1: "normal", 3: "cyst", 4: "cyst", 5: "cyst", 9: "cyst"}, TIMELINE)
    assert r["agreement"] == 1.0 and r["frames_missing"] == 1 and r["frames_outside"] == 1
