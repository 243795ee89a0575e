"""Acceptance on the real public data in ../shared/data (skipped with a reason where it is absent)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import shared

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


def test_breastmnist_default_training_reaches_auc_085_and_bundle_agrees(tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.train import TrainConfig, train

    npz = shared("medmnist", "breastmnist.npz")
    record = train(TrainConfig(data=str(npz), out=str(tmp_path / "m")))
    assert record["model"]["preprocess"]["size"] == [32, 32]  # 28 px native, rounded up to 8
    assert record["data"]["sizes"] == {"train": 546, "val": 78, "test": 156}
    export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(tmp_path / "m")))
    a = evaluate(str(tmp_path / "m"), split="test")
    b = evaluate(str(tmp_path / "b"), data=str(npz), split="test")  # bundles keep no workstation paths
    assert a["metrics"]["auc"]["macro"] >= 0.85, a["metrics"]["auc"]
    assert abs(a["metrics"]["auc"]["macro"] - b["metrics"]["auc"]["macro"]) < 0.005
    assert a["metrics"]["operating_point"]["positive"] == 0  # malignant is the positive class


def test_run_on_every_pocus_clip_writes_one_line_per_frame(bundle_dir: Path, tmp_path: Path) -> None:
    from edgeclf.runtime.app import run_bundle

    root = shared("pocus")
    with open(root / "clips.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 91
    mismatches = []
    for i, row in enumerate(rows):
        out = tmp_path / f"{i}.jsonl"
        summary = run_bundle(str(bundle_dir), str(root / row["file"]), out=str(out))
        lines = out.read_text().splitlines()
        if not (len(lines) == summary["frames"] == summary["written"] == int(row["frames"])):
            mismatches.append((row["file"], int(row["frames"]), len(lines)))
        assert json.loads(lines[-1])["frame"] == len(lines) - 1
    assert mismatches == []


def test_brain_mri_exact_duplicates_never_straddle_splits() -> None:
    from edgeclf.data import load_dataset

    ds = load_dataset(str(shared("brain_mri")))
    assert ds.labels == ["glioma", "meningioma", "notumor", "pituitary"]
    total = sum(len(s) for s in ds.splits.values())
    assert total == 5708
    assert any("207 exact duplicate" in n for n in ds.notes), ds.notes
    where: dict[str, set[str]] = {}
    for name, sp in ds.splits.items():
        for g in sp.groups:
            where.setdefault(g, set()).add(name)
    assert all(len(v) == 1 for v in where.values())
    assert len(where) == total - 207


def test_run_on_every_dicom_file_writes_one_line_per_frame(bundle_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom", reason="pydicom is not installed (pip install 'edgeclf[dicom]')")
    import pydicom

    from edgeclf.runtime.app import run_bundle

    root = shared("dicom")
    files = sorted(root.glob("*.dcm"))
    assert len(files) >= 14
    mismatches = []
    for i, path in enumerate(files):
        frames = int(getattr(pydicom.dcmread(str(path), stop_before_pixels=True), "NumberOfFrames", 1) or 1)
        out = tmp_path / f"{i}.jsonl"
        summary = run_bundle(str(bundle_dir), str(path), out=str(out))
        lines = [json.loads(ln) for ln in out.read_text().splitlines()]
        if not (len(lines) == summary["frames"] == summary["written"] == frames):
            mismatches.append((path.name, frames, len(lines)))
        # No identifiers in results: a result line carries no file name or DICOM UID.
        assert not any(path.stem in json.dumps(r) for r in lines)
    assert mismatches == []
