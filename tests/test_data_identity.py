"""A .npz data set is known by its content, never by its file name: class names, the clinically positive class,
licence and modality (which picks the augmentation) are the same for a renamed copy, and where none is known the
loader says which positive class training falls back to."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeclf.data import load_dataset
from edgeclf.errors import DataError
from tests.conftest import shared

# MedMNIST v2's official splits, per split (label 0, label 1) counts.
_BREAST = {"train": (147, 399), "val": (21, 57), "test": (42, 114)}
_PNEUMONIA = {"train": (1214, 3494), "val": (135, 389), "test": (234, 390)}


def _official(path: Path, counts: dict[str, tuple[int, int]], *, size: int = 28, swap: bool = False,
              column: bool = True) -> Path:
    """An .npz with a MedMNIST v2 official split's layout and class counts (random pixels)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for s, (n0, n1) in counts.items():
        y = np.r_[np.zeros(n0, np.uint8), np.ones(n1, np.uint8)]
        y = rng.permutation(1 - y if swap else y)
        arrays[f"{s}_images"] = rng.integers(0, 256, (n0 + n1, size, size), dtype=np.uint8)
        arrays[f"{s}_labels"] = y.reshape(-1, 1) if column else y
    np.savez(path, **arrays)
    return path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _identity(ds) -> tuple:
    return ds.labels, ds.positive, ds.licence, ds.modality, ds.task, ds.data_hash


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["breastmnist.npz", "pneumoniamnist.npz"])
def test_renamed_copy_of_a_shared_medmnist_file_is_the_same_data_set(tmp_path: Path, name: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    src = shared("medmnist", name)
    copy = tmp_path / "download (1).npz"  # what a browser names a second download
    shutil.copyfile(src, copy)
    with caplog.at_level(logging.WARNING):
        orig, ren = load_dataset(str(src)), load_dataset(str(copy))
    assert _identity(ren) == _identity(orig)
    assert not _warnings(caplog)  # both recognised by their bytes: nothing to warn about
    if name == "breastmnist.npz":
        assert ren.labels == ["malignant", "normal_or_benign"] and ren.positive == "malignant"
        # The augmentation BreastMNIST has always had (the committed figures were trained with it).
        assert ren.modality == "generic"
    else:
        assert ren.labels == ["normal", "pneumonia"] and ren.positive == "pneumonia"
        assert ren.modality == "xray"  # chest films: no left-right flip
    assert ren.licence and "MedMNIST" in ren.licence


@pytest.mark.parametrize("size", [28, 64])
def test_official_breastmnist_split_is_recognised_under_any_name(tmp_path: Path, size: int,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = _official(tmp_path / "data.npz", _BREAST, size=size)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(str(path))
    assert ds.labels == ["malignant", "normal_or_benign"] and ds.positive == "malignant"
    assert ds.licence and "MedMNIST" in ds.licence and ds.modality == "generic"
    assert not _warnings(caplog)


def test_official_pneumoniamnist_split_is_recognised_under_any_name(tmp_path: Path) -> None:
    ds = load_dataset(str(_official(tmp_path / "x.npz", _PNEUMONIA, column=False)))
    assert ds.labels == ["normal", "pneumonia"] and ds.positive == "pneumonia" and ds.modality == "xray"


def test_swapped_labels_are_not_taken_for_medmnist_even_under_its_name(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The official layout with 0 and 1 swapped is other data: naming label 0 malignant would detect benign."""
    path = _official(tmp_path / "breastmnist.npz", _BREAST, swap=True)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(str(path))
    assert ds.labels == ["0", "1"] and ds.positive is None and ds.licence is None
    # Which class training then takes is said by `edgeclf train` alone (tests/test_data_npz_review.py), not by every
    # command that reads the file; the data records why it has no positive class.
    assert not [w for w in _warnings(caplog) if "--positive" in w] and ds.positive_unknown


def test_unrecognised_binary_npz_says_which_positive_class_training_takes(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    arrays = {}
    for s, n in (("train", 20), ("val", 6), ("test", 6)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, 16, 16), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 2).astype(np.uint8)
    np.savez(tmp_path / "mine.npz", label_names=np.array(["benign", "malignant"]), **arrays)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(str(tmp_path / "mine.npz"))
    assert ds.labels == ["benign", "malignant"] and ds.positive is None and ds.positive_unknown
    assert not [w for w in _warnings(caplog) if "--positive" in w]  # said by `edgeclf train` alone
    from edgeclf.train import _positive_index

    with caplog.at_level(logging.WARNING):
        caplog.clear()
        assert _positive_index(ds, None, warn=True) == 1
    (line,) = _warnings(caplog)
    assert "'malignant'" in line and "--positive" in line and str(tmp_path) not in line


def test_a_medmnist_file_name_on_other_content_is_not_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Content that is not a known MedMNIST file keeps the names its file name gives (runs trained on it stay readable),
    with one warning that they come from the name."""
    rng = np.random.default_rng(2)
    arrays = {}
    for s, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(-1, 1)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(str(tmp_path / "breastmnist.npz"))
    assert ds.labels == ["malignant", "normal_or_benign"] and ds.positive == "malignant"
    (line,) = _warnings(caplog)
    assert "file name" in line and "'malignant'" in line and "--positive" in line


def test_synthesized_xray_npz_is_augmented_as_xray_under_any_name(tmp_path: Path) -> None:
    from edgeclf.synth_cli import synth

    synth("xray", str(tmp_path / "xr"), n=30, size=32)
    (npz,) = (tmp_path / "xr").glob("*.npz")
    assert load_dataset(str(npz)).modality == "xray"
    renamed = tmp_path / "phantoms.npz"
    shutil.copyfile(npz, renamed)
    assert load_dataset(str(renamed)).modality == "xray"
    # A file synthesized before the modality was recorded: known by its findings' names.
    with np.load(npz) as z:
        older = {k: z[k] for k in z.files if k != "modality"}
    np.savez(tmp_path / "older.npz", **older)
    assert load_dataset(str(tmp_path / "older.npz")).modality == "xray"


def test_a_recorded_modality_is_read_and_checked(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = {}
    for s, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, 16, 16), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 3).astype(np.uint8)
    np.savez(tmp_path / "us.npz", modality=np.array("ultrasound"), **arrays)
    assert load_dataset(str(tmp_path / "us.npz")).modality == "ultrasound"
    np.savez(tmp_path / "mri.npz", modality=np.array("mri"), **arrays)
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path / "mri.npz"))
    msg = str(exc.value)
    assert "\n" not in msg and "'mri'" in msg and "ultrasound" in msg and "xray" in msg


@pytest.mark.slow
def test_training_on_a_synthesized_xray_file_uses_the_xray_augmentation(tmp_path: Path, one_torch_thread) -> None:
    from edgeclf.synth_cli import synth
    from edgeclf.train import TrainConfig, train

    synth("xray", str(tmp_path / "xr"), n=60, size=32)
    rec = train(TrainConfig(data=str(tmp_path / "xr" / "xray.npz"), out=str(tmp_path / "m"), size=32, epochs=1,
                            patience=1, read_test=False))
    assert rec["data"]["augment"] == "xray"


def test_known_npz_names_the_set_of_a_renamed_copy(tmp_path: Path) -> None:
    """What a recipe needs to pick its BreastMNIST variant for `BreastMNIST (1).npz`."""
    from edgeclf.data import known_npz

    assert known_npz(str(_official(tmp_path / "BreastMNIST (1).npz", _BREAST))) == "breastmnist"
    assert known_npz(str(_official(tmp_path / "breastmnist.npz", _BREAST, swap=True))) is None
    assert known_npz("synthetic:xray") is None and known_npz(str(tmp_path)) is None
