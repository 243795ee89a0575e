"""A sector-cropped model's bundle: frames `edgeclf run` never classifies (sector_warmup: before their clip's sector
locked, so whole, the scanner's burned-in text included) stay out of reference.npz, the INT8 calibration set and the
accuracy gate."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeclf.export.bundle_writer import ExportConfig, export_bundle
from edgeclf.export.onnx_export import ExportError
from edgeclf.runtime.bundle import load_bundle


def _write(path: Path, frames: list[np.ndarray]) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 96))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    vw.release()


@pytest.fixture(scope="module")
def sector_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Clips in train/ val/ test/ folders: train and val hold per class one clip whose sector locks (24 frames; the
    detector locks at frame 7) and one too short to lock (6 frames: its frames stay whole); test holds short ones only."""
    pytest.importorskip("cv2")
    pytest.importorskip("torch")
    from edgeclf.runtime.sources import open_source
    from edgeclf.train import TrainConfig, train

    with open_source("synthetic:ultrasound?frames=40&size=96&seed=1") as s:
        frames = [f.image for f in s]
    root = tmp_path_factory.mktemp("sector") / "pocus"
    k = 0
    for split, kinds in (("train", (24, 6)), ("val", (24, 6)), ("test", (6, 6))):
        for cls in ("a", "b"):
            for j, n in enumerate(kinds):
                _write(root / split / cls / f"c{j}.avi", frames[k:k + n])  # every clip different: none is a copy
                k += 1
    spec = f"{root}?roi=sector&frames=2"
    out = root.parent / "run"
    train(TrainConfig(data=spec, out=str(out), model="compact", size=32, epochs=1, patience=1, threads=1))
    return spec, out


def _frames(spec: str, split: str, bundle: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(preprocessed frames run classifies, preprocessed frames it abstains on, the split's ids) of one split."""
    from edgeclf.data import load_dataset
    from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec

    ds = load_dataset(spec, frames_per_clip=2)
    sp = ds.split(split)
    pre = Preprocessor(PreprocessSpec.from_dict(json.loads((bundle / "manifest.json").read_text())["preprocess"]))
    warm = [i for i, f in enumerate(sp.ids) if ds.abstain.get(f) == "sector_warmup"]
    assert warm and len(warm) < len(sp.ids) or split == "test", "the fixture must mix both kinds of frame"
    ok = [i for i in range(len(sp.ids)) if i not in warm]
    return pre.batch([sp.images[i] for i in ok]), pre.batch([sp.images[i] for i in warm]), list(sp.ids)


def _rows_in(x: np.ndarray, pool: np.ndarray) -> list[int]:
    return [r for r in range(len(x)) if any(np.allclose(x[r], p, atol=1e-6) for p in pool)]


def test_reference_holds_only_frames_run_classifies(sector_run: tuple[str, Path], tmp_path: Path) -> None:
    spec, run = sector_run
    out = tmp_path / "b"
    m = export_bundle(ExportConfig(out=str(out), model=str(run)))
    assert m["preprocess"]["sector"] is True
    ok, whole, _ = _frames(spec, "val", out)
    with np.load(out / "reference.npz") as z:
        inputs, logits = z["inputs"], z["logits"]
    assert _rows_in(inputs, whole) == [], "whole frames (burned-in text included) were shipped"
    assert len(inputs) == len(ok) == len(logits) and _rows_in(inputs, ok) == list(range(len(ok)))
    assert m["reference"] == {"file": "reference.npz", "count": len(ok), "split": "val"}
    assert m["provenance"]["reference"] == (f"val frames `edgeclf run` classifies only; left out: {len(whole)} val frames "
                                            f"`edgeclf run` does not classify (sector_warmup: {len(whole)})")


def test_no_frame_run_classifies_writes_no_reference_and_says_so(sector_run: tuple[str, Path], tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from edgeclf.runtime.app import verify_bundle

    spec, run = sector_run
    out = tmp_path / "b"
    with caplog.at_level(logging.INFO, logger="edgeclf.export.bundle_writer"):
        m = export_bundle(ExportConfig(out=str(out), model=str(run), split="test"))
    assert not (out / "reference.npz").exists()
    assert m["reference"] is None and load_bundle(out).manifest.raw["reference"] is None  # as --no-samples writes it
    note = m["provenance"]["reference"]
    assert note == ("not written: none of the 8 test frames is one `edgeclf run` classifies (it abstains on every one: "
                    "sector_warmup: 8; uncropped frames: their clip's ultrasound sector had not locked): such frames stay out "
                    "of a bundle, so there is nothing to re-check parity on"), note
    said = [r.getMessage() for r in caplog.records if "reference.npz" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("reference.npz not written: none of the 8 test frames") and \
        "`edgeclf bundle check` cannot run on this bundle" in said[0], said
    assert verify_bundle(str(out), require_signature=False)["reference"] is None  # a valid bundle, nothing to re-run
    from click.testing import CliRunner

    from edgeclf.cli import cli

    res = CliRunner().invoke(cli, ["bundle", "check", str(out)])  # says why, not "re-export without --no-samples"
    assert "export left it out: none of the 8 test frames" in str(res.exception), res.exception


class _Spy:
    """Stands in for compress(): records what it was handed, builds nothing."""

    def __init__(self) -> None:
        self.kw: dict[str, Any] = {}

    def __call__(self, stage: Path, fp32: Path, **kw: Any) -> dict[str, Any]:
        self.kw = kw
        return {"variants": [], "deploy": {"precision": "fp32", "reason": "spy"}, "candidates": [], "calibration": None}


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    import edgeclf.export.compress as compress_mod

    s = _Spy()
    monkeypatch.setattr(compress_mod, "compress", s)
    return s


def test_calibration_and_gate_see_only_frames_run_classifies(sector_run: tuple[str, Path], tmp_path: Path,
                                                             spy: _Spy) -> None:
    spec, run = sector_run
    out = tmp_path / "b"
    export_bundle(ExportConfig(out=str(out), model=str(run), precision="int8", qat_epochs=0))
    ok_tr, whole_tr, _ = _frames(spec, "train", out)
    ok_v, whole_v, ids_v = _frames(spec, "val", out)
    calib = spy.kw["calib_x"]
    assert _rows_in(calib, whole_tr) == [] and len(calib) == len(ok_tr) and len(_rows_in(calib, ok_tr)) == len(ok_tr)
    val_x = spy.kw["val_x"]
    assert _rows_in(val_x, whole_v) == [] and len(val_x) == len(ok_v) and _rows_in(val_x, ok_v) == list(range(len(ok_v)))
    assert len(spy.kw["val_y"]) == len(spy.kw["parent_logits"]) == len(spy.kw["val_groups"]) == len(ok_v)
    from edgeclf.data import load_dataset

    ds = load_dataset(spec, frames_per_clip=2)
    # Still indices into the whole val split (splits/val.txt), of the frames kept.
    assert spy.kw["val_ids"] == [f"val[{i}]" for i, f in enumerate(ids_v) if not ds.abstain.get(f)]


def _all_abstain(monkeypatch: pytest.MonkeyPatch, split: str) -> None:
    """The data set as export loads it, with every frame of `split` marked sector_warmup."""
    from edgeclf.export import bundle_writer

    real = bundle_writer.load_dataset

    def load(*args: Any, **kw: Any) -> Any:
        ds = real(*args, **kw)
        ds.abstain.update(dict.fromkeys(ds.split(split).ids, "sector_warmup"))
        return ds

    monkeypatch.setattr(bundle_writer, "load_dataset", load)


@pytest.mark.parametrize("split, precision, words", [
    ("val", "int8", r"--precision int8: none of the 8 val frames is one `edgeclf run` classifies \(it abstains on every one: .*\), so the accuracy gate has nothing to judge"),
    ("val", "fp16", "--precision fp16: none of the 8 val frames .* nothing to judge"),
    ("train", "int8", r"--precision int8: none of the 8 train frames is one `edgeclf run` classifies \(.*\), so there is nothing to calibrate INT8"),
])
def test_compression_with_no_frame_run_classifies_is_refused(sector_run: tuple[str, Path], tmp_path: Path, spy: _Spy,
                                                             monkeypatch: pytest.MonkeyPatch, split: str, precision: str,
                                                             words: str) -> None:
    _all_abstain(monkeypatch, split)
    with pytest.raises(ExportError, match=words):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(sector_run[1]), precision=precision, qat_epochs=0))
    assert spy.kw == {} and not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_fp16_needs_no_calibration_frames(sector_run: tuple[str, Path], tmp_path: Path, spy: _Spy,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _all_abstain(monkeypatch, "train")
    export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(sector_run[1]), precision="fp16"))
    assert len(spy.kw["calib_x"]) == 0 and len(spy.kw["val_x"]) == 4
