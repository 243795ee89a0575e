"""Clip-level evaluation and cross-validation on a tiny synthetic clip data set (phantom frames per class)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")


def _phantom_clips(root: Path, per_class: int = 6, n_frames: int = 5, size: int = 64) -> Path:
    """root/<class>/c<k>.avi: each clip's frames are phantoms of its class; clips.csv names 3 sites."""
    from edgeclf.runtime.synthetic import ULTRASOUND_CLASSES, make_ultrasound

    images, labels = make_ultrasound(per_class * n_frames * 3 * 2, size=size, seed=5)
    lines = ["file,label,license,original_source"]
    for c, cls in enumerate(ULTRASOUND_CLASSES):
        pool = iter(images[labels == c])
        for k in range(per_class):
            path = root / cls / f"c{k}.avi"
            path.parent.mkdir(parents=True, exist_ok=True)
            vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
            for _ in range(n_frames):
                vw.write(cv2.cvtColor(next(pool), cv2.COLOR_GRAY2BGR))
            vw.release()
            lines.append(f"{cls}/c{k}.avi,{cls},CC BY 4.0,https://site{k % 3}.org/v{k}")
    (root / "clips.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _phantom_clips(tmp_path_factory.mktemp("clips") / "phantoms")


def test_clip_level_evaluate_beside_frame_level(clip_root: Path, tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate
    from edgeclf.train import TrainConfig, train

    spec = f"{clip_root}?frames=4&test=0.34&val=0.34"
    rec = train(TrainConfig(data=spec, out=str(tmp_path / "m"), size=32, epochs=4, patience=4, threads=1))
    assert rec["data"]["spec"] == f"{clip_root}?test=0.34&val=0.34&frames=4"
    assert rec["data"]["clips"]["test"] == 6 and "test_clips" in rec["metrics"]
    rep = evaluate(str(tmp_path / "m"), split="test", n_boot=100)
    c = rep["clips"]
    assert c["clips"] == 6 and c["frames"] == 24 == rep["data"]["n"]
    for key in ("clip_mean", "clip_vote", "frame"):
        m = c[key]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["balanced_accuracy"] <= 1
        assert set(m["per_class"]) == {"normal", "cyst", "mass"}
        lo, hi = m["balanced_accuracy_ci95"]
        assert lo <= m["balanced_accuracy"] <= hi
    assert c["frame"]["bootstrap_unit"] == "group"
    # The frame-level accuracy beside it equals the ordinary metric's.
    assert c["frame"]["accuracy"] == pytest.approx(rep["metrics"]["accuracy"])
    clips = {p["clip"] for p in c["per_clip"]}
    assert len(clips) == 6 and all(p["used"] == 4 for p in c["per_clip"])
    # Training measured the same clip-level figures on the same held-out clips.
    assert c["per_clip"] == rec["metrics"]["test_clips"]["per_clip"]
    # A plain --data of the same name gets the recorded options back (same held-out clips).
    rep2 = evaluate(str(tmp_path / "m"), data=str(clip_root), split="test", n_boot=0)
    assert rep2["data"]["spec"] == f"{clip_root}?test=0.34&val=0.34&frames=4"
    assert {p["clip"] for p in rep2["clips"]["per_clip"]} == clips


def test_evaluate_bootstrap_uses_the_training_seed(clip_root: Path, tmp_path: Path) -> None:
    """One model, one interval: evaluate's bootstrap is seeded with the model's recorded training seed, so its frame and
    clip intervals on the held-out split are the ones training recorded (seed 1 here; evaluate used seed 0 before)."""
    from edgeclf.evaluate import evaluate
    from edgeclf.train import TrainConfig, train

    rec = train(TrainConfig(data=f"{clip_root}?frames=3&test=0.34&val=0.34", out=str(tmp_path / "m"), size=32, epochs=1,
                            patience=1, threads=1, seed=1))
    rep = evaluate(str(tmp_path / "m"), split="test")  # n_boot 1000, as training's test figures
    frame, clips = rec["metrics"]["test"], rec["metrics"]["test_clips"]
    lo, hi = frame["auc"]["macro_ci95"]
    assert lo < hi, "a degenerate interval would not tell the seeds apart"
    assert rep["metrics"]["auc"]["macro_ci95"] == pytest.approx(frame["auc"]["macro_ci95"])
    for level in ("clip_mean", "clip_vote", "frame"):
        for key in ("accuracy_ci95", "balanced_accuracy_ci95"):
            assert rep["clips"][level][key] == pytest.approx(clips[level][key]), (level, key)


def test_cross_validation_pooled_out_of_fold(clip_root: Path, tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate
    from edgeclf.train import TrainConfig, train

    out = tmp_path / "cv"
    res = train(TrainConfig(data=f"{clip_root}?frames=3", out=str(out), size=32, epochs=3, patience=3, threads=1, folds=3,
                            group="site"))
    assert json.loads((out / "cv.json").read_text())["pooled_out_of_fold"]["clips"] == 18
    pooled = res["pooled_out_of_fold"]
    assert pooled["clips"] == 18 and pooled["frames"] == 54
    assert len({p["clip"] for p in pooled["per_clip"]}) == 18  # each clip held out exactly once
    held = [set(f["test_sources"]) for f in res["folds"]]
    assert all(len(h) == 1 for h in held) and len(set.union(*held)) == 3  # 3 sites, one per fold
    lo, hi = pooled["clip_mean"]["balanced_accuracy_ci95"]
    assert lo <= pooled["clip_mean"]["balanced_accuracy"] <= hi
    # Folds grouped by site: the clip figures also carry intervals over the 3 sites (clips of one site are not independent)
    for key in ("clip_mean", "clip_vote"):
        c = pooled[key]["clustered"]
        assert c["unit"] == "site" and c["clusters"] == 3 and len(c["accuracy_ci95"]) == 2
    # Settings are compared on the folds' own validation splits: recorded per fold, from the fold's run.json, and averaged.
    for f in res["folds"]:
        run_val = json.loads((Path(f["out"]) / "run.json").read_text())["metrics"]["val"]
        assert f["val"]["n"] == run_val["n"] > 0 and f["val"]["accuracy"] == run_val["accuracy"]
        assert f["val"]["auc_macro"] == run_val["auc"]["macro"]
    inner = res["inner_validation_mean"]
    assert inner["accuracy"] == pytest.approx(np.mean([f["val"]["accuracy"] for f in res["folds"]]))
    assert 0.0 <= inner["balanced_accuracy"] <= 1.0
    # Each fold is an ordinary training folder whose recorded spec rebuilds its held-out fold.
    for f in res["folds"]:
        rep = evaluate(f["out"], split="test", n_boot=0)
        assert rep["data"]["n"] == f["test_items"]
        assert rep["metrics"]["accuracy"] == pytest.approx(f["test"]["accuracy"])
        mine = [p for p in pooled["per_clip"] if p["fold"] == f["fold"]]
        assert {p["clip"]: p["mean"] for p in mine} == {p["clip"]: p["mean"] for p in rep["clips"]["per_clip"]}


def test_cross_validation_with_tta_keeps_both_validation_figures(clip_root: Path, tmp_path: Path) -> None:
    from edgeclf.train import TrainConfig, train

    res = train(TrainConfig(data=f"{clip_root}?frames=2", out=str(tmp_path / "cv"), size=32, epochs=1, patience=1, threads=1, folds=3,
                            group="site", tta="hflip"))
    for f in res["folds"]:
        run = json.loads((Path(f["out"]) / "run.json").read_text())
        assert f["val_without_tta"]["accuracy"] == run["metrics"]["val_without_tta"]["accuracy"]
        assert json.loads((Path(f["out"]) / "model.json").read_text())["tta"] == "hflip"
    plain = res["inner_validation_mean_without_tta"]
    assert plain["accuracy"] == pytest.approx(np.mean([f["val_without_tta"]["accuracy"] for f in res["folds"]]))


def test_decision_metrics_cluster_bootstrap() -> None:
    from edgeclf.metrics import decision_metrics

    y = np.array([0, 0, 1, 1, 1, 2])
    d = np.array([0, 1, 1, 1, -1, 2])
    m = decision_metrics(y, d, ["a", "b", "c"], n_boot=200, seed=0)
    assert m["n"] == 5 and m["abstained"] == 1
    assert m["accuracy"] == pytest.approx(0.8) and m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["per_class"]["a"]["sensitivity"] == 0.5 and m["confusion_matrix"][0] == [1, 1, 0]
    g = decision_metrics(y, d, ["a", "b", "c"], groups=["x", "x", "y", "y", "y", "z"], n_boot=200, seed=0)
    assert g["bootstrap_unit"] == "group" and g["accuracy"] == m["accuracy"]


def test_cross_validation_without_test_reads_no_held_out_fold(clip_root: Path, tmp_path: Path) -> None:
    """--no-test: the folds train exactly as before, only their validation figures are reported, none of the held-out folds'."""
    from click.testing import CliRunner

    from edgeclf.cli import cli
    from edgeclf.train import TrainConfig, train

    kw = dict(size=32, epochs=1, patience=1, threads=1, folds=3, group="site")
    full = train(TrainConfig(data=f"{clip_root}?frames=2", out=str(tmp_path / "full"), **kw))
    blind = train(TrainConfig(data=f"{clip_root}?frames=2", out=str(tmp_path / "blind"), read_test=False, **kw))
    assert blind["pooled_out_of_fold"] is None and json.loads((tmp_path / "blind" / "cv.json").read_text())["pooled_out_of_fold"] is None
    assert all(f["test"] is None for f in blind["folds"])
    assert [f["val"] for f in blind["folds"]] == [f["val"] for f in full["folds"]]
    assert blind["inner_validation_mean"] == full["inner_validation_mean"]
    for f in blind["folds"]:
        metrics = json.loads((Path(f["out"]) / "run.json").read_text())["metrics"]
        assert "test" not in metrics and "test_clips" not in metrics and "val" in metrics
    res = CliRunner().invoke(cli, ["train", "--data", f"{clip_root}?frames=2", "--out", str(tmp_path / "cli"), "--size", "32",
                                   "--epochs", "1", "--patience", "1", "--threads", "1", "--folds", "3", "--group", "site", "--no-test"])
    assert res.exit_code == 0, res.output
    assert "held-out folds not read (--no-test)" in res.output and "inner validation mean" in res.output
    assert "pooled out-of-fold" not in res.output


def test_cross_validation_intervals_cluster_by_the_grouping_the_folds_used(clip_root: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec's own group= decides the folds over the run's group setting (a recipe's "source"); the clustered
    intervals must name and use that grouping, as cv.json's grouped_by does. Training is stubbed."""
    import types

    import edgeclf.train as tr
    from edgeclf.train import TrainConfig

    def fake_train_on(ds, cfg, *, on_epoch=None, recipe=None):  # noqa: ANN001, ANN202
        rule = {"kind": "max-ratio", "thresholds": [1.0, 1.0, 1.0], "positive": None}
        record = {"data": {"sizes": {s: len(v) for s, v in ds.splits.items()}}, "best_epoch": 1, "_meta": {},
                  "metrics": {"test": {"accuracy": None, "balanced_accuracy": None}, "val": {"n": len(ds.splits["val"])}},
                  "model": {"temperature": 1.0, "decision": rule}}
        pre = types.SimpleNamespace(batch=lambda ims: np.array([[float(np.mean(im)) / 50.0, 1.0, 2.0] for im in ims]))
        return record, object(), types.SimpleNamespace(pre=pre)

    monkeypatch.setattr(tr, "_train_on", fake_train_on)
    monkeypatch.setattr(tr, "save_run", lambda *a, **k: None)
    monkeypatch.setattr(tr, "torch_logits", lambda model, x: x)
    res = tr.cross_validate(TrainConfig(data=f"{clip_root}?frames=3&folds=3&group=site", out=str(tmp_path / "cv"), folds=3, group="source"))
    assert res["data"]["grouped_by"] == "site"
    for key in ("clip_mean", "clip_vote"):
        c = res["pooled_out_of_fold"][key]["clustered"]
        assert c["unit"] == "site" and c["clusters"] == 3
