"""Clip-level evaluation and cross-validation on a tiny synthetic clip data set (phantom frames per class)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")


def _phantom_clips(root: Path, per_class: int = 6, n_frames: int = 5, size: int = 64, blank: int = 0) -> Path:
    """root/<class>/c<k>.avi: each clip's frames are phantoms of its class, after `blank` black frames (a fade-in:
    run's quality gate stops them as "blank"); clips.csv names 3 sites."""
    from edgeclf.runtime.synthetic import ULTRASOUND_CLASSES, make_ultrasound

    images, labels = make_ultrasound(per_class * n_frames * 3 * 2, size=size, seed=5)
    lines = ["file,label,license,original_source"]
    for c, cls in enumerate(ULTRASOUND_CLASSES):
        pool = iter(images[labels == c])
        for k in range(per_class):
            path = root / cls / f"c{k}.avi"
            path.parent.mkdir(parents=True, exist_ok=True)
            vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
            for _ in range(blank):
                vw.write(np.zeros((size, size, 3), np.uint8))
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
    # A plain --data of the same content gets the recorded options back (same held-out clips).
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
    # The config records the frames the spec samples (frames=3), not TrainConfig's unused default (8).
    assert rec["config"]["frames_per_clip"] == 3
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


# -- evaluate abstains on the frames `edgeclf run` does not classify ---------------------------------------------------

_LABELS = ["normal", "cyst", "mass"]


def _video(path: Path, frames: list[np.ndarray]) -> Path:
    from tests.test_data import _video as gray_mjpg  # the same MJPG writer the sampling tests use

    return gray_mjpg(path, frames)


def _fan(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """A speckle rectangle on a black screen: the sector detector locks on it after its 8-frame warm-up."""
    out = []
    for _ in range(n):
        f = np.zeros((96, 96), np.uint8)
        f[16:80, 24:72] = rng.integers(40, 220, (64, 48), dtype=np.uint8)
        out.append(f)
    return out


def _tiny_bundle(folder: Path, *, sector: bool = False, seed: int = 0) -> Path:
    from edgeclf.runtime.bundle import write_checksums
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = make_tiny_bundle(folder, seed=seed)
    m = json.loads((b / "manifest.json").read_text())
    m["preprocess"]["sector"] = sector
    (b / "manifest.json").write_text(json.dumps(m))
    write_checksums(b)
    return b


def _offline_and_run(b: Path, root: Path, clip: Path, tmp: Path, **kw: object) -> tuple[dict, dict, dict]:
    """(evaluate's report on the whole folder, 8 frames per clip; its per-clip entry for `clip`; `edgeclf run`'s
    summary on `clip`)."""
    from edgeclf.evaluate import evaluate
    from edgeclf.runtime.app import run_bundle

    rep = evaluate(str(b), data=f"{root}?frames=8", split="all", classes=",".join(_LABELS), n_boot=0, **kw)  # type: ignore[arg-type]
    mine = {p["clip"]: p for p in rep["clips"]["per_clip"]}[clip.relative_to(root).as_posix()]
    return rep, mine, run_bundle(str(b), str(clip), out=str(tmp / "run.jsonl"))


def _gated_clips(tmp_path: Path) -> tuple[Path, Path, Path]:
    """4 black frames (a fade-in: the gate's "blank") then 4 live ones: 8 frames, as many as evaluate samples, so
    that evaluate and run see the very same frames."""
    rng = np.random.default_rng(2)
    root = tmp_path / "clips"
    clip = _video(root / "normal" / "a.avi", [np.zeros((64, 64), np.uint8)] * 4
                  + [rng.integers(30, 220, (64, 64), dtype=np.uint8) for _ in range(4)])
    for c in _LABELS[1:]:
        _video(root / c / "f.avi", [rng.integers(30, 220, (64, 64), dtype=np.uint8) for _ in range(8)])
    return _tiny_bundle(tmp_path / "b", seed=2), root, clip


def test_evaluate_abstains_on_the_frames_runs_quality_gate_stops(tmp_path: Path) -> None:
    """`edgeclf run` abstains on the 4 black frames (its quality gate: "blank"), so evaluate's frame figures count them
    as abstained, with run's reason; with --no-quality (as `run --no-quality`) they are classified."""
    from edgeclf.evaluate import evaluate

    b, root, clip = _gated_clips(tmp_path)
    rep, mine, s = _offline_and_run(b, root, clip, tmp_path)
    assert s["abstain_reasons"].get("blank") == 4
    m = rep["metrics"]
    assert m["abstained"] == 4 and m["abstain_reasons"] == {"blank": 4} and m["n"] == 20 and m["all_frames"]["n"] == 24
    assert mine["frames"] == 8
    ungated = evaluate(str(b), data=f"{root}?frames=8", split="all", classes=",".join(_LABELS), n_boot=0, quality=False)
    assert ungated["metrics"]["abstained"] == 0 and ungated["metrics"]["abstain_reasons"] == {}


def test_evaluate_clip_decision_leaves_out_the_gated_frames_as_run_does(tmp_path: Path) -> None:
    """Same bundle, same video, same 8 frames: the clip decision comes from run's 4 classified frames."""
    b, root, clip = _gated_clips(tmp_path)
    _, mine, s = _offline_and_run(b, root, clip, tmp_path)
    dev = s["clip"]["decision"]
    assert dev["used"] == 4
    assert (mine["mean"], mine["vote"], mine["used"]) == (dev["mean_label"], dev["vote_label"], dev["used"])
    assert mine["mean_probs"] == pytest.approx(list(dev["mean_probs"].values()), abs=1e-4)


def test_training_test_figures_leave_out_the_frames_run_would_not_classify(tmp_path: Path) -> None:
    """Training's own test and out-of-fold figures (the recipe figures) score the clips as evaluate and run do: each
    clip's 2 black fade-in frames, stopped by run's quality gate, abstain (they used to be scored, and a clip's decision
    averaged them in)."""
    from edgeclf.evaluate import evaluate
    from edgeclf.train import TrainConfig, train

    root = _phantom_clips(tmp_path / "phantoms", per_class=3, n_frames=3, blank=2)
    rec = train(TrainConfig(data=f"{root}?frames=5&test=0.34&val=0.34", out=str(tmp_path / "m"), size=32, epochs=1,
                            patience=1, threads=1))
    t, tc = rec["metrics"]["test"], rec["metrics"]["test_clips"]
    assert t["abstain_reasons"] == {"blank": 2 * tc["clips"]} and t["n"] == 3 * tc["clips"]
    assert all(p["used"] == 3 for p in tc["per_clip"])
    rep = evaluate(str(tmp_path / "m"), split="test")
    assert rep["clips"]["per_clip"] == tc["per_clip"]
    assert rep["metrics"]["accuracy"] == pytest.approx(t["accuracy"]) and rep["metrics"]["abstained"] == t["abstained"]
    res = train(TrainConfig(data=f"{root}?frames=5", out=str(tmp_path / "cv"), size=32, epochs=1, patience=1, threads=1,
                            folds=3, group="site"))
    pooled = res["pooled_out_of_fold"]
    assert pooled["clips"] == 9 and all(p["used"] == 3 for p in pooled["per_clip"])
    assert pooled["frame"]["abstained"] == 18


def _sector_clips(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A sector-trained bundle; normal/short.avi (6 frames, shorter than the warm-up: never locks), and 15-frame clips
    that lock at their 8th frame."""
    rng = np.random.default_rng(0)
    root = tmp_path / "clips"
    short = _video(root / "normal" / "short.avi", _fan(rng, 6))
    long = _video(root / "normal" / "long.avi", _fan(rng, 15))
    for c in _LABELS[1:]:
        _video(root / c / "f.avi", _fan(rng, 15))
    return _tiny_bundle(tmp_path / "b", sector=True), root, short, long


def test_evaluate_abstains_on_a_clip_whose_sector_never_locks(tmp_path: Path) -> None:
    """Run abstains on every frame of a clip whose sector never locks (sector_warmup: no crop a sector model has seen);
    evaluate no longer feeds those whole frames to the model: they are abstained, with that reason. A clip that locks
    is classified from the lock on, as run classifies it."""
    b, root, short, long = _sector_clips(tmp_path)
    rep, mine, s = _offline_and_run(b, root, short, tmp_path)
    assert s["sector_warmup"] == 6 and s["clip"]["decision"]["used"] == 0
    m = rep["metrics"]
    assert m["abstain_reasons"] == {"sector_warmup": 6} and m["abstained"] == 6 and mine["frames"] == 6
    rep, mine, s = _offline_and_run(b, root, long, tmp_path)
    dev = s["clip"]["decision"]
    assert s["sector_warmup"] == 7 and dev["used"] == 8 and mine["used"] == 8
    assert mine["mean_probs"] == pytest.approx(list(dev["mean_probs"].values()), abs=1e-4)


def test_evaluate_gives_no_clip_decision_where_the_sector_never_locks(tmp_path: Path) -> None:
    b, root, short, _ = _sector_clips(tmp_path)
    _, mine, s = _offline_and_run(b, root, short, tmp_path)
    dev = s["clip"]["decision"]
    assert dev["mean_label"] is None
    assert (mine["mean"], mine["vote"], mine["used"]) == (dev["mean_label"], dev["vote_label"], dev["used"]) == (None, None, 0)


def test_evaluate_clip_report_says_its_frames_are_sampled(tmp_path: Path) -> None:
    """Run's clip decision is over every frame; evaluate's over k sampled per clip: the report records k."""
    from edgeclf.evaluate import evaluate

    b, root, _ = _gated_clips(tmp_path)
    assert evaluate(str(b), data=f"{root}?frames=3", split="all", classes=",".join(_LABELS), n_boot=0)["clips"]["frames_per_clip"] == 3
