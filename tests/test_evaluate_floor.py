"""`edgeclf evaluate` on a bundle with a confidence floor (manifest postprocess.min_confidence): the frame figures
are over the classified frames, as `edgeclf run` and the clip table decide, with the abstained count beside them
and the all-frames figures kept. No torch: a tiny ONNX bundle and a few phantom clips."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.tiny_bundle import make_tiny_bundle

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

LABELS = ["cyst", "mass", "normal"]  # a clip folder's classes, sorted


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeclf.runtime.synthetic import ULTRASOUND_CLASSES, make_ultrasound

    root = tmp_path_factory.mktemp("floor") / "clips"
    images, labels = make_ultrasound(4 * 4 * 3 * 2, size=32, seed=5)
    for c, cls in enumerate(ULTRASOUND_CLASSES):
        pool = iter(images[labels == c])
        for k in range(4):
            path = root / cls / f"c{k}.avi"
            path.parent.mkdir(parents=True, exist_ok=True)
            vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
            for _ in range(4):
                vw.write(cv2.cvtColor(next(pool), cv2.COLOR_GRAY2BGR))
            vw.release()
    return root


def _bundle(folder: Path, min_confidence: float, temperature: float = 5.0) -> Path:
    from edgeclf.runtime.bundle import write_checksums

    make_tiny_bundle(folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["labels"] = LABELS
    m["postprocess"].update(temperature=temperature, min_confidence=min_confidence)
    (folder / "manifest.json").write_text(json.dumps(m))
    write_checksums(folder)
    return folder


def _probs(bundle: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's probabilities on every frame, computed here through the runtime pieces `edgeclf run` uses."""
    from edgeclf.data import load_dataset
    from edgeclf.runtime.backends import OrtBackend
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.postprocess import probabilities
    from edgeclf.runtime.preprocess import Preprocessor

    m = load_bundle(bundle).manifest
    sp = load_dataset(str(root)).split("all")
    x = Preprocessor(m.preprocess).batch(sp.images)
    with OrtBackend(str(bundle / "model.onnx"), (m.preprocess.channels, *m.preprocess.size), m.num_outputs) as be:
        logits = be.infer(x)
    return probabilities(logits, m.task, m.temperature), sp.labels


def test_frame_figures_follow_the_bundles_confidence_floor(clip_root: Path, tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate

    b = _bundle(tmp_path / "b", min_confidence=0.8)
    probs, y = _probs(b, clip_root)
    kept = probs.max(axis=1) >= 0.8
    assert 0 < kept.sum() < len(kept)  # the floor abstains on some frames, not all
    r = evaluate(str(b), data=str(clip_root), split="all", n_boot=50, out=str(tmp_path / "ev"))
    m = r["metrics"]
    # Over the classified frames, the abstained ones counted beside them.
    assert m["n"] == int(kept.sum()) and m["abstained"] == int((~kept).sum()) and r["data"]["n"] == len(y)
    assert m["min_confidence"] == 0.8 and m["coverage"] == pytest.approx(kept.mean())
    assert m["accuracy"] == pytest.approx(np.mean(np.argmax(probs[kept], axis=1) == y[kept]))
    assert sum(v["support"] for v in m["per_class"].values()) == m["n"] == int(np.sum(m["confusion_matrix"]))
    # The same frames as the clip table's frame row (which abstains as the device does).
    f = r["clips"]["frame"]
    assert (f["n"], f["abstained"]) == (m["n"], m["abstained"]) and f["accuracy"] == pytest.approx(m["accuracy"])
    # Nothing hidden: the figures at 100% coverage, every frame decided.
    a = m["all_frames"]
    assert a["n"] == len(y) and a["accuracy"] == pytest.approx(np.mean(np.argmax(probs, axis=1) == y))
    assert "abstained" not in a and a["auc"]["macro"] is not None
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert written["abstained"] == m["abstained"] and written["all_frames"]["n"] == len(y)


def test_without_a_floor_every_frame_counts_and_nothing_is_duplicated(clip_root: Path, tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate

    r = evaluate(str(_bundle(tmp_path / "b", min_confidence=0.0)), data=str(clip_root), split="all", n_boot=0)
    m = r["metrics"]
    assert m["n"] == r["data"]["n"] and m["abstained"] == 0 and m["coverage"] == 1.0 and "all_frames" not in m


def test_every_frame_abstained_gives_undefined_figures_not_a_crash(clip_root: Path, tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate

    b = _bundle(tmp_path / "b", min_confidence=0.99, temperature=50.0)
    r = evaluate(str(b), data=str(clip_root), split="all", n_boot=20, out=str(tmp_path / "ev"))
    m = r["metrics"]
    assert m["n"] == 0 and m["abstained"] == r["data"]["n"] == m["all_frames"]["n"] and m["coverage"] == 0.0
    assert m["accuracy"] is None and m["balanced_accuracy"] is None and m["ece"] is None and m["auc"]["macro"] is None
    assert np.sum(m["confusion_matrix"]) == 0 and all(v["support"] == 0 for v in m["per_class"].values())
    assert r["clips"]["frame"]["n"] == 0
    # No ROC without a classified frame; the rest is written and listed.
    assert [Path(f).name for f in r["files"]] == ["metrics.json", "confusion.png"]
    assert not (tmp_path / "ev" / "roc.png").exists()


def test_the_cli_table_names_the_abstained_frames_and_shows_all_frames_beside(clip_root: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    b = _bundle(tmp_path / "b", min_confidence=0.8)
    probs, y = _probs(b, clip_root)
    n_abs = int((probs.max(axis=1) < 0.8).sum())
    r = run_cli("evaluate", "--model", str(b), "--data", str(clip_root), "--split", "all")
    assert r.returncode == 0, r.stderr
    assert f"{n_abs} abstained (decided class's probability below min_confidence 0.8), figures over the {len(y) - n_abs} classified" in r.stdout
    assert "all, all frames" in r.stdout  # the 100%-coverage row, beside


def test_frame_figures_abstain_on_the_decided_class_as_the_run_does() -> None:
    # Positive at p >= 0.2, floor 0.6: [0.7, 0.3] is a positive call with p 0.3, which the run's display abstains on.
    from edgeclf.evaluate import _frame_metrics
    from edgeclf.runtime.postprocess import DecisionRule

    rule = DecisionRule("threshold", (0.2,), positive=1)
    probs = np.array([[0.7, 0.3], [0.9, 0.1], [0.2, 0.8]])
    m = _frame_metrics(probs, np.array([1, 0, 1]), "binary", rule, ["n", "p"], ["a", "b", "c"], 0.6, n_boot=0)
    assert m["abstained"] == 1 and m["coverage"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("provenance", [{"source": "tests", "data": "clips", "training": "yes"},
                                        {"source": "tests", "data": ["x"], "training": {"config": "seed=3"}}])
def test_a_bundle_whose_provenance_members_are_not_objects_evaluates_on_given_data(clip_root: Path, tmp_path: Path,
                                                                                  provenance: dict) -> None:
    from edgeclf.evaluate import evaluate
    from edgeclf.runtime.bundle import write_checksums

    b = _bundle(tmp_path / "b", min_confidence=0.0)
    m = json.loads((b / "manifest.json").read_text())
    m["provenance"] = provenance  # an open object: load_bundle accepts any members
    (b / "manifest.json").write_text(json.dumps(m))
    write_checksums(b)
    r = evaluate(str(b), data=str(clip_root), split="all", n_boot=0)
    assert r["metrics"]["n"] == r["data"]["n"] > 0
