"""Review r2 (findings 1, 2, 3, 6): what an .npz's loader says about the positive class training takes, labels that are
not 0..K-1 integers, known_npz reading no image pixels, and evaluate --split all reading a folder's pixels once."""
from __future__ import annotations

import json
import logging
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeclf.data import known_npz, load_dataset
from edgeclf.errors import DataError
from tests.conftest import run_cli, write_gray_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _npz(path: Path, labels_of, *, side: int = 28, **extra: Any) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 20), ("val", 6), ("test", 6)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        arrays[f"{s}_labels"] = labels_of(n).reshape(-1, 1)
    np.savez(path, **arrays, **extra)
    return path


def _binary(n: int) -> np.ndarray:
    return (np.arange(n) % 2).astype(np.uint8)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _train(data: str, out: Path, **kw: Any) -> dict[str, Any]:
    from edgeclf.train import TrainConfig, train

    return train(TrainConfig(data=data, out=str(out), model="compact", size=28, epochs=1, patience=1, threads=1, **kw))


# -- 1 and 2: one warning about the positive class training falls back to, from training alone -------------------------

def test_label_names_under_a_medmnist_file_name_warn_about_the_positive_class_training_takes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """breastmnist.npz (not a known copy) whose own label_names say 0 = malignant, 1 = benign: the names are the file's
    and training falls back to the second class, 'benign'. No warning may say 'malignant' is the positive class."""
    path = _npz(tmp_path / "breastmnist.npz", _binary, label_names=np.array(["malignant", "benign"]))
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(str(path))
        assert ds.labels == ["malignant", "benign"] and ds.positive is None
        _train(str(path), tmp_path / "m", read_test=False)
    said = _warnings(caplog)
    assert not [w for w in said if "positive class 'malignant'" in w or "class names (0 = malignant" in w], said
    # Licence and augmentation still come from the file name: said, without claiming its class names.
    assert any("file name" in w and "BreastMNIST" in w for w in said), said
    fallback = [w for w in said if "as the positive class" in w]
    assert len(fallback) == 1 and "'benign'" in fallback[0] and "--positive" in fallback[0], said


def test_swapped_medmnist_labels_warn_once_at_training_about_the_fallback_class(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Unrecognised binary data: the loader (evaluate and export read it too) says nothing about the positive class;
    training says once which class it takes, without the file's folder."""
    path = _npz(tmp_path / "mine.npz", _binary, label_names=np.array(["benign", "malignant"]))
    with caplog.at_level(logging.WARNING):
        load_dataset(str(path))
    assert not [w for w in _warnings(caplog) if "positive" in w]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _train(str(path), tmp_path / "m", read_test=False)
    (line,) = [w for w in _warnings(caplog) if "positive" in w]
    assert "'malignant'" in line and "--positive" in line and str(tmp_path) not in line and "\n" not in line


def test_explicit_positive_is_not_contradicted_by_the_loaders_warning(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """--positive malignant on an unknown binary .npz: neither training nor evaluate says 'training takes benign'."""
    from edgeclf.evaluate import evaluate

    path = _npz(tmp_path / "lesions.npz", _binary, label_names=np.array(["malignant", "benign"]))
    with caplog.at_level(logging.WARNING):
        _train(str(path), tmp_path / "m", positive="malignant")
        evaluate(str(tmp_path / "m"), split="test", n_boot=0)
    said = [w for w in _warnings(caplog) if "positive class" in w]
    assert not said, said


# -- 3: labels that are not integers 0..K-1 ------------------------------------------------------------------------

def test_known_npz_on_huge_label_values_is_not_a_memory_error(tmp_path: Path) -> None:
    path = _npz(tmp_path / "renamed.npz", lambda n: (np.arange(n) % 2).astype(np.int64) * 2**40)
    with pytest.raises(DataError):
        load_dataset(str(path))
    assert known_npz(str(path)) is None


@pytest.mark.parametrize("labels", [lambda n: np.array(["cat", "dog"] * (n // 2)),
                                    lambda n: np.arange(n) % 2 + 0.5])
def test_labels_that_are_not_integers_are_a_one_line_error(tmp_path: Path, labels) -> None:
    """String labels (a ValueError traceback) and fractional ones (silently truncated to integers) are refused."""
    path = _npz(tmp_path / "renamed.npz", labels)
    assert known_npz(str(path)) is None
    with pytest.raises(DataError) as exc:
        load_dataset(str(path))
    assert "\n" not in str(exc.value) and "label" in str(exc.value)


def test_string_labels_under_a_recipe_are_a_one_line_error(tmp_path: Path) -> None:
    """`train --recipe breast-us --data x.npz` with string labels: exit 2 and one line, no traceback."""
    path = _npz(tmp_path / "renamed.npz", lambda n: np.array(["cat", "dog"] * (n // 2)))
    r = run_cli("train", "--recipe", "breast-us", "--data", str(path), "--out", str(tmp_path / "m"), "--epochs", "1")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "labels" in r.stderr


def test_whole_float_labels_still_read(tmp_path: Path) -> None:
    ds = load_dataset(str(_npz(tmp_path / "f.npz", lambda n: (np.arange(n) % 2).astype(np.float32))))
    assert ds.labels == ["0", "1"] and ds.splits["train"].labels.dtype == np.int64


# -- 6b: known_npz reads labels and image headers, not the images ---------------------------------------------------

def test_known_npz_does_not_decompress_the_images(tmp_path: Path) -> None:
    """A 224 px BreastMNIST-sized file: ~150 MB of pixels, which the variant lookup has no use for."""
    counts = {"train": (147, 399), "val": (21, 57), "test": (42, 114)}
    arrays = {}
    for s, (n0, n1) in counts.items():
        arrays[f"{s}_images"] = np.zeros((n0 + n1, 224, 224), np.uint8)
        arrays[f"{s}_labels"] = np.r_[np.zeros(n0, np.uint8), np.ones(n1, np.uint8)].reshape(-1, 1)
    path = tmp_path / "BreastMNIST (1).npz"
    np.savez_compressed(path, **arrays)
    del arrays
    tracemalloc.start()
    try:
        assert known_npz(str(path)) == "breastmnist"  # known by its content (the official split) under any name
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"known_npz allocated {peak / 2**20:.0f} MiB"


def test_known_npz_refuses_what_load_dataset_refuses(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError):
        known_npz(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "short.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError):
        known_npz(str(tmp_path / "short.npz"))


# -- 6a: evaluate --split all on a folder trained with options decodes each file once -------------------------------

def _image_tree(root: Path, per_class: int = 14) -> Path:
    import cv2

    for c, cls in enumerate(("benign", "malignant")):
        for i in range(per_class):
            img = np.random.default_rng(100 * c + i).integers(0, 256, (24, 24), dtype=np.uint8)
            img[:8] = 220 if c else 30
            (root / cls).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / cls / f"case{i}.png"), img)
    return root


def _bundle(run: Path, out: Path) -> str:
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle

    export_bundle(ExportConfig(out=str(out), model=str(run)))
    return str(out)


def _in_splits_as_trained(spec: str, seed: int = 0) -> dict[str, int]:
    ds = load_dataset(spec, seed=seed)
    return {s: len(ds.splits[s]) for s in ("train", "val", "test")}


@pytest.mark.parametrize("options", ["test=0.3&val=0.3", "dedup=near&test=0.3&val=0.3"])
def test_evaluate_all_on_images_trained_with_options_decodes_each_image_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str) -> None:
    import edgeclf.data as data
    from edgeclf.evaluate import evaluate

    root = _image_tree(tmp_path / "busi")
    _train(f"{root}?{options}", tmp_path / "m")
    bundle = _bundle(tmp_path / "m", tmp_path / "b")
    want = _in_splits_as_trained(f"{root}?{options}")
    calls: list[str] = []
    decoded = data._decoded
    monkeypatch.setattr(data, "_decoded", lambda p: calls.append(str(p)) or decoded(p))
    rep = evaluate(bundle, data=str(root), split="all", n_boot=0)
    assert rep["data"]["in_model_splits"] == want
    assert len(calls) == len(set(calls)) == 28, len(calls)


def test_evaluate_all_on_clips_trained_with_options_decodes_each_clip_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.data as data
    from edgeclf.evaluate import evaluate

    for c, cls in enumerate(("a_line", "b_line")):
        for i in range(8):
            rng = np.random.default_rng(10 * c + i)
            frames = [rng.integers(0, 120, (48, 48), dtype=np.uint8) + np.uint8(100 * c) for _ in range(6)]
            write_gray_clip(tmp_path / "pocus" / cls / f"clip{i}.avi", frames)
    spec = f"{tmp_path / 'pocus'}?test=0.25&val=0.25&frames=2"
    _train(spec, tmp_path / "m", frames_per_clip=2)
    bundle = _bundle(tmp_path / "m", tmp_path / "b")
    calls: list[str] = []
    sample = data._sample_clip
    monkeypatch.setattr(data, "_sample_clip", lambda p, *a, **k: calls.append(str(p)) or sample(p, *a, **k))
    rep = evaluate(bundle, data=str(tmp_path / "pocus"), split="all", n_boot=0)
    trained = json.loads((tmp_path / "m" / "run.json").read_text())["data"]["sizes"]
    assert rep["data"]["in_model_splits"] == trained  # every frame of the data, in its clip's split in training
    assert len(calls) == len(set(calls)) == 16, len(calls)
