"""Which data a held-out split may be drawn from: the training data is identified by content, never by folder name.

A model's data is recorded as a hash of its files and spec options; on another machine (a bundle keeps no paths) the
same files sit under another folder name and are given without the options. Evaluate and export read them with the
recorded options (their splits are training's); data that is not the training data and brings no split of its own is
refused for a held-out split (its split drawn anew could hold training images).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeclf.errors import DataError, EdgeclfError

cv2 = pytest.importorskip("cv2")
pytest.importorskip("torch")

OPTIONS = "test=0.3&val=0.3"  # not the default shares: the folder read plain draws another split


def _image_tree(root: Path, per_class: int, seed0: int) -> Path:
    for c, cls in enumerate(("benign", "malignant")):
        for i in range(per_class):
            rng = np.random.default_rng(seed0 + 100 * c + i)
            img = rng.integers(0, 256, (24, 24), dtype=np.uint8)
            img[:8] = 220 if c else 30  # learnable, every image's bytes distinct
            (root / cls).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / cls / f"case{i}.png"), img)
    return root


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert isinstance(exc.value, EdgeclfError)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a run trained on `busi?test=0.3&val=0.3`, its bundle)."""
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("identity")
    data = _image_tree(tmp / "busi", 14, 0)
    train(TrainConfig(data=f"{data}?{OPTIONS}", out=str(tmp / "run"), model="compact", size=32, epochs=1, patience=1,
                      threads=1))
    export_bundle(ExportConfig(out=str(tmp / "bundle"), model=str(tmp / "run")))
    return tmp / "run", tmp / "bundle"


def _held_out(run: Path, split: str = "test") -> list[str]:
    return (run / "splits" / f"{split}.txt").read_text().split()


@pytest.mark.parametrize("target", ["run", "bundle"])
def test_a_renamed_copy_of_the_training_data_is_evaluated_on_the_held_out_images(trained: tuple[Path, Path],
                                                                                 tmp_path: Path, target: str) -> None:
    """The reviewer's case: `cp -r busi Dataset_BUSI_with_GT` given plain scored training images as "test"."""
    from edgeclf.data import load_dataset
    from edgeclf.evaluate import evaluate

    run, bundle = trained
    copy = shutil.copytree(run.parent / "busi", tmp_path / "Dataset_BUSI_with_GT")
    rep = evaluate(str(run if target == "run" else bundle), data=str(copy), split="test", n_boot=0)
    recorded = json.loads((run / "run.json").read_text())["data"]
    assert rep["data"]["hash"] == recorded["hash"]  # read as trained: the recorded options applied
    assert rep["data"]["n"] == len(_held_out(run))
    ids = load_dataset(rep["data"]["spec"], seed=0).split("test").ids
    assert ids == _held_out(run) and not set(ids) & set(_held_out(run, "train"))


def test_changed_data_under_another_name_is_refused_for_a_held_out_split(trained: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate

    run, bundle = trained
    copy = shutil.copytree(run.parent / "busi", tmp_path / "cart")
    _image_tree(tmp_path / "more", 1, 5000)
    shutil.copy(tmp_path / "more" / "benign" / "case0.png", copy / "benign" / "new.png")  # one image more
    for target in (run, bundle):
        for split in ("test", "val"):
            with pytest.raises(DataError) as exc:
                evaluate(str(target), data=str(copy), split=split, n_boot=0)
            msg = _one_line(exc)
            assert "cart" in msg and "not, by content, the data the model was trained on" in msg, msg
            assert "--split all" in msg and f"?{OPTIONS}" in msg and "its own split" in msg, msg
    # All of it, as new data: evaluated.
    assert evaluate(str(bundle), data=str(copy), split="all", n_boot=0)["data"]["n"] == 29


def test_new_data_evaluates_whole_or_on_its_own_split(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate

    run, bundle = trained
    new = _image_tree(tmp_path / "site2", 6, 7000)
    rep = evaluate(str(bundle), data=str(new), split="all", n_boot=0)
    assert rep["data"]["n"] == 12 and rep["data"]["spec"] == str(new)
    with pytest.raises(DataError, match="--split all"):
        evaluate(str(bundle), data=str(new), split="test", n_boot=0)
    own = tmp_path / "site3"  # train/ val/ test/ folders: the data's own split
    for s, n in (("train", 4), ("val", 2), ("test", 3)):
        _image_tree(own / s, n, 8000 + 100 * len(s) + n)
    for target in (run, bundle):
        rep = evaluate(str(target), data=str(own), split="test", n_boot=0)
        assert rep["data"]["n"] == 6 and rep["data"]["spec"] == str(own)


def test_the_training_data_by_its_recorded_path_still_evaluates(trained: tuple[Path, Path]) -> None:
    from edgeclf.evaluate import evaluate

    run, _ = trained
    assert evaluate(str(run), split="test", n_boot=0)["data"]["n"] == len(_held_out(run))
    # The same folder given plain: its recorded options back, by content.
    rep = evaluate(str(run), data=str(run.parent / "busi"), split="test", n_boot=0)
    assert rep["data"]["spec"] == f"{run.parent / 'busi'}?{OPTIONS}" and rep["data"]["n"] == len(_held_out(run))


def test_export_reads_a_renamed_copy_as_trained_and_refuses_changed_data(trained: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """Export's val split (gate, parity, calibration of variants) must be training's held-out one too."""
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle

    run, _ = trained
    recorded = json.loads((run / "run.json").read_text())["data"]
    copy = shutil.copytree(run.parent / "busi", tmp_path / "elsewhere")
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(run), data=str(copy)))
    assert m["provenance"]["export_data"]["hash"] == recorded["hash"]
    (copy / "malignant" / "case0.png").unlink()  # changed: its split re-drawn could put training images in val
    with pytest.raises(DataError) as exc:
        export_bundle(ExportConfig(out=str(tmp_path / "b2"), model=str(run), data=str(copy)))
    assert "not, by content, the data the model was trained on" in _one_line(exc)
    assert not (tmp_path / "b2").exists()


def test_require_training_data_passes_new_data_only_with_its_own_split(tmp_path: Path) -> None:
    from edgeclf.data import load_dataset, require_training_data

    trained = load_dataset(f"{_image_tree(tmp_path / 'a', 6, 0)}?{OPTIONS}")
    recorded = {"spec": trained.spec, "hash": trained.data_hash}
    plain = load_dataset(str(_image_tree(tmp_path / "b", 6, 900)))
    with pytest.raises(DataError) as exc:
        require_training_data(plain, recorded, data_given=str(tmp_path / "b"), use="its test split is not training's")
    assert "its own split" in _one_line(exc)
    for s in ("train", "val", "test"):
        _image_tree(tmp_path / "c" / s, 3, 1000 + len(s))
    require_training_data(load_dataset(str(tmp_path / "c")), recorded, data_given=str(tmp_path / "c"), use="x")


def test_prune_reads_a_renamed_copy_as_trained(trained: tuple[Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning re-draws train and val: a renamed copy is read with the recorded options, so it fine-tunes on training's
    train split and is validated on its val split (not refused, not re-split)."""
    import edgeclf.export.prune as prune
    import edgeclf.train as train_module

    run, _ = trained
    copy = shutil.copytree(run.parent / "busi", tmp_path / "renamed")
    seen: dict[str, object] = {}

    def stop(ds, *a, **k):  # type: ignore[no-untyped-def]
        seen["ds"] = ds
        raise RuntimeError("stop after loading")

    monkeypatch.setattr(train_module, "_require_every_class", stop)
    with pytest.raises(RuntimeError, match="stop after loading"):
        prune.prune_trained(prune.PruneConfig(model=str(run), out=str(tmp_path / "pruned"), data=str(copy)))
    ds = seen["ds"]
    recorded = json.loads((run / "run.json").read_text())["data"]
    assert ds.data_hash == recorded["hash"]  # type: ignore[attr-defined]
    assert ds.split("val").ids == _held_out(run, "val")  # type: ignore[attr-defined]


def test_the_training_files_under_another_split_list_are_refused(trained: tuple[Path, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`--data busi?split=other.csv` over the training files passed as other data with its own split, though that
    list's test split holds training images. run.json and the bundle record the files' own hash, which tells them."""
    import csv

    import edgeclf.export.prune as prune
    from edgeclf.data import make_split_list
    from edgeclf.evaluate import evaluate
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle

    run, bundle = trained
    recorded = json.loads((run / "run.json").read_text())["data"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert len(recorded["files_hash"]) == 64 and manifest["provenance"]["data"]["files_hash"] == recorded["files_hash"]
    busi = run.parent / "busi"
    lst = tmp_path / "other.csv"
    with open(lst, "w", newline="") as f:
        csv.writer(f).writerows([("path", "sha256", "split", "group"), *make_split_list(str(busi), seed=7)[0]])
    given = f"{busi}?split={lst}"
    for target in (run, bundle):
        with pytest.raises(DataError) as exc:
            evaluate(str(target), data=given, split="test", n_boot=0)
        msg = _one_line(exc)
        assert "holds the files the model was trained on" in msg and f"--data '{busi}?{OPTIONS}'" in msg, msg
    assert evaluate(str(bundle), data=given, split="all", n_boot=0)["data"]["n"] == 28  # all of it: no held-out claim
    with pytest.raises(DataError, match="holds the files the model was trained on"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(run), data=given))
    with pytest.raises(DataError, match="holds the files the model was trained on"):
        prune.prune_trained(prune.PruneConfig(model=str(run), out=str(tmp_path / "pruned"), data=given))
    # A run recorded before files_hash: as before.
    old = shutil.copytree(run, tmp_path / "old-run")
    rec = json.loads((old / "run.json").read_text())
    del rec["data"]["files_hash"]
    (old / "run.json").write_text(json.dumps(rec))
    assert evaluate(str(old), data=given, split="test", n_boot=0)["data"]["spec"] == given


def test_a_model_trained_with_a_split_list_file_evaluates_and_exports_elsewhere(tmp_path: Path) -> None:
    """The list's path was part of the data hash: the same files and list on another machine were refused as changed,
    and a bundle (which records only the list's file name) could not be evaluated anywhere but the workstation."""
    import csv

    from edgeclf.data import make_split_list
    from edgeclf.evaluate import evaluate
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.train import TrainConfig, train

    ws = _image_tree(tmp_path / "ws" / "busi", 10, 300)
    lst = tmp_path / "ws" / "lists" / "busi.csv"
    lst.parent.mkdir(parents=True)
    with open(lst, "w", newline="") as f:
        csv.writer(f).writerows([("path", "sha256", "split", "group"), *make_split_list(str(ws), seed=0)[0]])
    run = tmp_path / "ws" / "run"
    train(TrainConfig(data=f"{ws}?split={lst}", out=str(run), model="compact", size=32, epochs=1, patience=1, threads=1))
    export_bundle(ExportConfig(out=str(tmp_path / "ws" / "bundle"), model=str(run)))
    dev = shutil.copytree(ws, tmp_path / "cart" / "data" / "busi")
    lst2 = tmp_path / "cart" / "busi.csv"
    shutil.copy(lst, lst2)
    shutil.rmtree(lst.parent)  # the workstation's list is not on the cart
    bundle = shutil.copytree(tmp_path / "ws" / "bundle", tmp_path / "cart" / "bundle")
    given = f"{dev}?split={lst2}"
    for target in (run, bundle):
        rep = evaluate(str(target), data=given, split="test", n_boot=0)
        assert rep["data"]["n"] == len(_held_out(run))
    m = export_bundle(ExportConfig(out=str(tmp_path / "cart" / "b2"), model=str(run), data=given))
    assert m["provenance"]["export_data"]["hash"] == json.loads((run / "run.json").read_text())["data"]["hash"]
    # Given plainly, the list cannot be found: the refusal says how to give it.
    with pytest.raises(DataError) as exc:
        evaluate(str(bundle), data=str(dev), split="test", n_boot=0)
    assert f"--data '{dev}?split=/path/to/busi.csv'" in _one_line(exc)
