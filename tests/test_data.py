"""edgeclf.data: folder, clip, MedMNIST .npz and synthetic loaders; splits, class maps, one-line errors.

Every data set here is built in tmp_path (cv2.imwrite, cv2.VideoWriter MJPG .avi, np.savez).
"""
from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeclf.data import SPLITS, Dataset, load_dataset, parse_class_map
from edgeclf.errors import DataError, EdgeclfError

cv2 = pytest.importorskip("cv2")


# -- helpers -----------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, EdgeclfError)
    assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
    return msg


def _gray(seed: int, h: int = 12, w: int = 16) -> np.ndarray:
    """A gray image whose bytes are distinct per seed (pixel 0 carries the seed)."""
    img = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    img[0, 0], img[0, 1] = seed % 256, seed // 256
    return img


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path
    return path


def _image_tree(
    root: Path, counts: dict[str, int], *, seed0: int = 0, ext: str = ".png"
) -> dict[str, list[Path]]:
    """root/<class>/img<i><ext>, each image distinct; returns the files per class."""
    out: dict[str, list[Path]] = {}
    s = seed0
    for cls, n in counts.items():
        out[cls] = []
        for i in range(n):
            out[cls].append(_write(root / cls / f"img{i}{ext}", _gray(s)))
            s += 1
    return out


_CLIP_FPS = itertools.count()


def _write_clip(path: Path, n_frames: int, size: tuple[int, int] = (32, 24)) -> Path:
    """MJPG .avi whose frame j is uniformly 20 + 20 * j (recoverable from the decoded mean). Each clip written gets
    its own frame rate, so that no two are byte-identical (identical clips are one group: one side of a split)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5 + next(_CLIP_FPS) % 500, size)
    assert vw.isOpened()
    for j in range(n_frames):
        vw.write(np.full((size[1], size[0], 3), 20 + 20 * j, np.uint8))
    vw.release()
    return path


def _split_of(ds: Dataset) -> dict[str, str]:
    return {i: s for s, sp in ds.splits.items() for i in sp.ids}


def _medmnist_arrays(n: dict[str, int], *, rgb: bool = False, n_classes: int = 2) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    k = 0
    for s in SPLITS:
        shape = (n[s], 8, 8, 3) if rgb else (n[s], 8, 8)
        imgs = np.zeros(shape, np.uint8)
        for i in range(n[s]):
            imgs[i] = k  # each image carries a running index, so its origin can be checked
            k += 1
        arrays[f"{s}_images"] = imgs
        arrays[f"{s}_labels"] = (np.arange(n[s]) % n_classes).astype(np.uint8).reshape(-1, 1)
    return arrays


# -- parse_class_map ---------------------------------------------------------------------------------


def test_parse_class_map_result() -> None:
    got = parse_class_map("covid19,pneumonia=bacterial_pneumonia+viral_pneumonia,regular")
    assert got == [
        ("covid19", ["covid19"]),
        ("pneumonia", ["bacterial_pneumonia", "viral_pneumonia"]),
        ("regular", ["regular"]),
    ]
    assert parse_class_map(" a , b = x + y ,") == [("a", ["a"]), ("b", ["x", "y"])]
    assert parse_class_map(None) is None
    assert parse_class_map("") is None


@pytest.mark.parametrize("text", ["a,=b", "a,b=x+", "a,b=+y", "a", "a,a", "x=a,x=b", ",,"])
def test_parse_class_map_malformed(text: str) -> None:
    with pytest.raises(DataError) as exc:
        parse_class_map(text)
    assert "--classes" in _one_line(exc)


# -- image tree without split folders ------------------------------------------------------------


def test_image_tree_seeded_stratified_split(tmp_path: Path) -> None:
    files = _image_tree(tmp_path, {"benign": 8, "malignant": 7, "normal": 6})
    ds = load_dataset(str(tmp_path), seed=0)
    assert ds.kind == "images" and ds.task == "multiclass" and ds.modality == "generic"
    assert ds.labels == ["benign", "malignant", "normal"]
    assert ds.positive is None and ds.channels_hint == 1 and ds.notes == []
    assert set(ds.splits) == set(SPLITS)
    # Every file exactly once, in one split.
    all_ids = [i for sp in ds.splits.values() for i in sp.ids]
    expected = {p.relative_to(tmp_path).as_posix() for fs in files.values() for p in fs}
    assert len(all_ids) == len(expected) == 21 and set(all_ids) == expected
    # Stratified: each class (>= 3 files) has files in every split; labels follow the folder.
    for s, sp in ds.splits.items():
        assert sp.labels.dtype == np.int64 and sp.labels.shape == (len(sp),)
        assert set(sp.labels.tolist()) == {0, 1, 2}, s
        for i, y in zip(sp.ids, sp.labels):
            assert i.split("/")[0] == ds.labels[y]
        for im in sp.images:
            assert im.dtype == np.uint8 and im.shape == (12, 16)
    # Train is the largest split for every class.
    for c in range(3):
        n = {s: int((ds.splits[s].labels == c).sum()) for s in SPLITS}
        assert n["train"] > n["val"] and n["train"] > n["test"]

    again = load_dataset(str(tmp_path), seed=0)
    assert again.split_lists() == ds.split_lists()
    assert again.data_hash == ds.data_hash
    other = load_dataset(str(tmp_path), seed=1)
    assert other.split_lists() != ds.split_lists()
    assert sorted(i for v in other.split_lists().values() for i in v) == sorted(expected)


def test_split_fractions_and_small_classes(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"a": 20, "b": 2})
    ds = load_dataset(str(tmp_path), seed=3, val_frac=0.25, test_frac=0.25)
    assert ds.task == "binary"
    n_a = {s: int((ds.splits[s].labels == 0).sum()) for s in SPLITS}
    assert n_a == {"train": 10, "val": 5, "test": 5}
    # A class with fewer than 3 groups is not forced into val/test: 2 * 0.25 rounds to 0.
    n_b = {s: int((ds.splits[s].labels == 1).sum()) for s in SPLITS}
    assert n_b == {"train": 2, "val": 0, "test": 0}
    for bad in [(0.0, 0.2), (0.5, 0.5), (0.2, 1.0)]:
        with pytest.raises(DataError) as exc:
            load_dataset(str(tmp_path), val_frac=bad[0], test_frac=bad[1])
        assert "fractions" in _one_line(exc)


def test_natural_sort_of_class_folders(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"grade10": 3, "grade2": 3, "Grade1": 3})
    ds = load_dataset(str(tmp_path))
    assert ds.labels == ["Grade1", "grade2", "grade10"]


def test_exact_copies_land_in_one_split(tmp_path: Path) -> None:
    files = _image_tree(tmp_path, {"a": 6, "b": 6})
    src = files["a"][2]
    copies = [tmp_path / "a" / f"copy{k}.png" for k in range(3)]
    for c in copies:
        shutil.copyfile(src, c)
    dupe_ids = {p.relative_to(tmp_path).as_posix() for p in [src, *copies]}
    for seed in range(8):
        ds = load_dataset(str(tmp_path), seed=seed)
        where = _split_of(ds)
        assert len(where) == 15
        assert len({where[i] for i in dupe_ids}) == 1, (seed, {i: where[i] for i in dupe_ids})
        all_split = ds.split("all")
        group = dict(zip(all_split.ids, all_split.groups))
        assert len({group[i] for i in dupe_ids}) == 1
        # Distinct files keep distinct groups.
        assert len(set(all_split.groups)) == 15 - 3
        assert ds.notes == ["3 exact duplicate file(s) grouped with their copies before splitting"]
    # The copies are real bytes on disk: the data hash sees them.
    before = load_dataset(str(tmp_path)).data_hash
    copies[0].unlink()
    assert load_dataset(str(tmp_path)).data_hash != before


def test_split_lists_ids_are_relative_paths(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"a": 4, "b": 4})
    _write(tmp_path / "b" / "nested" / "deep.png", _gray(99))
    ds = load_dataset(str(tmp_path))
    lists = ds.split_lists()
    assert set(lists) == set(SPLITS)
    assert lists == {s: ds.splits[s].ids for s in SPLITS}
    flat = [i for v in lists.values() for i in v]
    assert "b/nested/deep.png" in flat and len(flat) == 9
    for i in flat:
        assert not Path(i).is_absolute() and "\\" not in i and str(tmp_path) not in i
        assert (tmp_path / i).is_file()
    # A copy of the list, not the split's own list.
    lists["train"].append("x")
    assert "x" not in ds.splits["train"].ids


def test_image_channels_and_bit_depth(tmp_path: Path) -> None:
    g = _gray(1, 10, 14)
    _write(tmp_path / "a" / "gray.png", g)
    _write(tmp_path / "a" / "rgb_equal.png", np.dstack([g, g, g]))
    _write(tmp_path / "a" / "rgb_equal.jpg", np.dstack([g, g, g]))
    red = np.zeros((6, 7, 3), np.uint8)
    red[:] = (0, 0, 255)  # BGR pure red
    red[0, 0] = (255, 0, 0)  # BGR pure blue
    _write(tmp_path / "a" / "red.png", red)
    sixteen = (np.arange(10 * 14, dtype=np.uint16).reshape(10, 14) * 471).astype(np.uint16)
    _write(tmp_path / "b" / "deep16.png", sixteen)
    rgba = np.zeros((5, 5, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 90, 30
    _write(tmp_path / "b" / "rgba_gray.png", rgba)
    _write(tmp_path / "b" / "other.png", _gray(2))

    ds = load_dataset(str(tmp_path))
    allsp = ds.split("all")
    by_id = dict(zip(allsp.ids, allsp.images))
    assert len(by_id) == 7
    for im in by_id.values():
        assert im.dtype == np.uint8

    assert by_id["a/gray.png"].shape == (10, 14)
    np.testing.assert_array_equal(by_id["a/gray.png"], g)
    assert by_id["a/rgb_equal.png"].shape == (10, 14)
    np.testing.assert_array_equal(by_id["a/rgb_equal.png"], g)
    assert by_id["a/rgb_equal.jpg"].ndim == 2  # gray saved as 3-channel JPEG stays 1-channel
    assert by_id["b/rgba_gray.png"].shape == (5, 5) and (by_id["b/rgba_gray.png"] == 90).all()

    r = by_id["a/red.png"]
    assert r.shape == (6, 7, 3)
    assert tuple(r[1, 1]) == (255, 0, 0)  # RGB order
    assert tuple(r[0, 0]) == (0, 0, 255)

    d = by_id["b/deep16.png"]
    assert d.shape == (10, 14) and d.dtype == np.uint8
    np.testing.assert_array_equal(d, ((sixteen.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    assert d.max() > 200  # full 16-bit range maps onto the full 8-bit range

    assert ds.channels_hint == 3  # one truly coloured image
    (tmp_path / "a" / "red.png").unlink()
    assert load_dataset(str(tmp_path)).channels_hint == 1  # only gray and gray-as-RGB left


def test_split_all_concatenates(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"a": 7, "b": 7})
    ds = load_dataset(str(tmp_path), seed=2)
    allsp = ds.split("all")
    parts = [ds.splits[s] for s in SPLITS]
    assert len(allsp) == sum(len(p) for p in parts) == 14
    assert allsp.ids == [i for p in parts for i in p.ids]
    assert allsp.groups == [g for p in parts for g in p.groups]
    np.testing.assert_array_equal(allsp.labels, np.concatenate([p.labels for p in parts]))
    assert all(a is b for a, b in zip(allsp.images, [im for p in parts for im in p.images]))
    assert ds.split("train") is ds.splits["train"]


def test_missing_split_is_one_line_error(tmp_path: Path) -> None:
    for s in ("train", "test"):
        for c in ("a", "b"):
            _write(tmp_path / s / c / "x.png", _gray(hash((s, c)) % 1000))
    ds = load_dataset(str(tmp_path))
    assert len(ds.splits["val"]) == 0
    with pytest.raises(DataError) as exc:
        ds.split("val")
    msg = _one_line(exc)
    assert "'val'" in msg and "train, test" in msg
    with pytest.raises(DataError) as exc:
        ds.split("validation")
    assert "'validation'" in _one_line(exc)
    assert len(ds.split("all")) == 4


# -- split folders -------------------------------------------------------------------------------------


def test_split_folders_used_as_given(tmp_path: Path) -> None:
    layout = {"train": 5, "val": 2, "test": 3}
    s0 = 0
    for s, n in layout.items():
        _image_tree(tmp_path / s, {"neg": n, "pos": n}, seed0=s0)
        s0 += 100
    # A byte-identical copy across given splits stays where the user put it.
    shutil.copyfile(tmp_path / "train" / "neg" / "img0.png", tmp_path / "test" / "neg" / "copy.png")
    ds = load_dataset(str(tmp_path), seed=0)
    assert ds.kind == "images" and ds.task == "binary" and ds.labels == ["neg", "pos"]
    for s, n in layout.items():
        sp = ds.splits[s]
        extra = 1 if s == "test" else 0
        assert len(sp) == 2 * n + extra
        assert all(i.startswith(f"{s}/") for i in sp.ids)
        for i, y in zip(sp.ids, sp.labels):
            assert i.split("/")[1] == ds.labels[y]
    assert "test/neg/copy.png" in ds.splits["test"].ids
    copy_note = "1 file(s) in a split folder duplicate a file in an earlier one byte for byte (train/test: 1)"
    assert len(ds.notes) == 1 and ds.notes[0].startswith(copy_note)  # kept where it is, but said
    assert load_dataset(str(tmp_path), seed=7).split_lists() == ds.split_lists()


def test_split_folders_without_train(tmp_path: Path) -> None:
    for s in ("val", "test"):
        _image_tree(tmp_path / s, {"a": 2, "b": 2})
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path))
    msg = _one_line(exc)
    assert "train/" in msg and "val" in msg and "test" in msg


def test_split_folders_class_in_one_split_only(tmp_path: Path) -> None:
    _image_tree(tmp_path / "train", {"a": 3, "b": 3})
    _image_tree(tmp_path / "val", {"a": 1, "b": 1, "c": 1}, seed0=50)
    ds = load_dataset(str(tmp_path))
    assert ds.labels == ["a", "b", "c"]
    assert sorted(ds.splits["val"].labels.tolist()) == [0, 1, 2]
    assert len(ds.splits["test"]) == 0


# -- class maps on folders --------------------------------------------------------------------------


def test_class_map_merges_and_drops(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"bacterial_pneumonia": 4, "covid19": 4, "regular": 4, "viral_pneumonia": 3})
    ds = load_dataset(str(tmp_path), classes="covid19,pneumonia=bacterial_pneumonia+viral_pneumonia")
    assert ds.labels == ["covid19", "pneumonia"] and ds.task == "binary"
    allsp = ds.split("all")
    assert len(allsp) == 11
    assert not any(i.startswith("regular/") for i in allsp.ids)
    for i, y in zip(allsp.ids, allsp.labels):
        assert y == (0 if i.startswith("covid19/") else 1)
    # The map is part of the data hash.
    plain = load_dataset(str(tmp_path))
    assert plain.labels == ["bacterial_pneumonia", "covid19", "regular", "viral_pneumonia"]
    assert plain.data_hash != ds.data_hash
    # Order follows the map, not the folders.
    rev = load_dataset(str(tmp_path), classes="regular,covid19")
    assert rev.labels == ["regular", "covid19"]
    rev_all = rev.split("all")
    assert all((y == 0) == i.startswith("regular/") for i, y in zip(rev_all.ids, rev_all.labels))


def test_class_map_unknown_or_twice(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"benign": 3, "malignant": 3})
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path), classes="benign,cancer")
    msg = _one_line(exc)
    assert "'cancer'" in msg and "benign, malignant" in msg
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path), classes="benign,x=benign+malignant")
    assert "twice" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path), classes="benign=")  # fewer than 2 classes
    _one_line(exc)


# -- MedMNIST .npz -----------------------------------------------------------------------------------


def test_medmnist_official_split(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 10, "val": 4, "test": 6})
    path = tmp_path / "mydata.npz"
    np.savez(path, **arrays)
    ds = load_dataset(str(path), seed=5)
    assert ds.kind == "medmnist" and ds.task == "binary"
    assert ds.labels == ["0", "1"] and ds.positive is None and ds.licence is None
    assert ds.channels_hint == 1 and ds.modality == "generic"
    for s in SPLITS:
        sp = ds.splits[s]
        assert sp.labels.shape == (len(arrays[f"{s}_labels"]),) and sp.labels.dtype == np.int64
        np.testing.assert_array_equal(sp.labels, arrays[f"{s}_labels"][:, 0])
        assert sp.ids == [f"{s}/{i}" for i in range(len(sp))]
        assert len(set(sp.groups)) == len(sp)
        for im, ref in zip(sp.images, arrays[f"{s}_images"]):
            assert im.shape == (8, 8)
            np.testing.assert_array_equal(im, ref)
    assert load_dataset(str(path), seed=9).data_hash == ds.data_hash


@pytest.mark.parametrize("name", ["breastmnist.npz", "BreastMNIST_224.npz"])
def test_medmnist_known_names(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    np.savez(path, **_medmnist_arrays({"train": 6, "val": 2, "test": 2}))
    ds = load_dataset(str(path))
    assert ds.labels == ["malignant", "normal_or_benign"]
    assert ds.positive == "malignant" and ds.task == "binary"
    assert ds.licence and "MedMNIST" in ds.licence
    # A class map keeps the clinically positive class when it survives.
    mapped = load_dataset(str(path), classes="benign=normal_or_benign,malignant")
    assert mapped.labels == ["benign", "malignant"] and mapped.positive == "malignant"
    np.testing.assert_array_equal(mapped.splits["train"].labels, 1 - ds.splits["train"].labels)
    with pytest.raises(DataError) as exc:
        load_dataset(str(path), classes="malignant,cancer")
    assert "'cancer'" in _one_line(exc)


def test_medmnist_multiclass_and_label_names(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 9, "val": 3, "test": 3}, rgb=True, n_classes=3)
    path = tmp_path / "organs.npz"
    np.savez(path, label_names=np.array(["liver", "kidney", "lung"]), **arrays)
    ds = load_dataset(str(path))
    assert ds.task == "multiclass" and ds.labels == ["liver", "kidney", "lung"]
    assert ds.channels_hint == 3 and ds.splits["train"].images[0].shape == (8, 8, 3)


def test_medmnist_missing_arrays(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 4, "val": 2, "test": 2})
    del arrays["val_labels"]
    path = tmp_path / "partial.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as exc:
        load_dataset(str(path))
    msg = _one_line(exc)
    assert "'val_labels'" in msg and "'train_labels'" not in msg.split("(it has")[0]


def test_medmnist_bad_arrays(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 4, "val": 2, "test": 2})
    arrays["test_labels"] = np.full((2, 1), 5, np.uint8)
    np.savez(tmp_path / "gap.npz", **arrays)
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path / "gap.npz"))
    assert "0..K-1" in _one_line(exc)
    arrays = _medmnist_arrays({"train": 4, "val": 2, "test": 2})
    arrays["val_images"] = arrays["val_images"].astype(np.float32)
    np.savez(tmp_path / "float.npz", **arrays)
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path / "float.npz"))
    assert "val_images" in _one_line(exc)


def test_corrupt_or_non_npz(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00\x01 this is not a zip archive " * 10)
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))  # a .npy under an .npz name
    truncated = tmp_path / "cut.npz"
    np.savez(truncated, **_medmnist_arrays({"train": 4, "val": 2, "test": 2}))
    truncated.write_bytes(truncated.read_bytes()[:100])
    for p in (junk, npy, truncated):
        with pytest.raises(DataError) as exc:
            load_dataset(str(p))
        assert "could not be read as an .npz" in _one_line(exc), p
    txt = tmp_path / "labels.csv"
    txt.write_text("a,b\n")
    with pytest.raises(DataError) as exc:
        load_dataset(str(txt))
    assert "not a MedMNIST .npz" in _one_line(exc)


def test_medmnist_multilabel(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 6, "val": 3, "test": 3})
    rng = np.random.default_rng(0)
    for s in SPLITS:
        arrays[f"{s}_labels"] = rng.integers(0, 2, (len(arrays[f"{s}_images"]), 3)).astype(np.uint8)
    path = tmp_path / "chest.npz"
    np.savez(path, label_names=np.array(["effusion", "nodule", "mass"]), **arrays)
    ds = load_dataset(str(path))
    assert ds.task == "multilabel" and ds.labels == ["effusion", "nodule", "mass"] and ds.positive is None
    assert ds.modality == "xray"
    for s in SPLITS:
        assert ds.splits[s].labels.shape == (len(arrays[f"{s}_images"]), 3)
        np.testing.assert_array_equal(ds.splits[s].labels, arrays[f"{s}_labels"])
    assert ds.split("all").labels.shape == (12, 3)
    # Wrong number of names for the label columns.
    np.savez(path, label_names=np.array(["effusion", "nodule"]), **arrays)
    with pytest.raises(DataError) as exc:
        load_dataset(str(path))
    assert "label_names" in _one_line(exc)
    # Without names: label0..label2.
    np.savez(path, **arrays)
    assert load_dataset(str(path)).labels == ["label0", "label1", "label2"]


def test_medmnist_multilabel_refuses_class_map(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 4, "val": 2, "test": 2})
    for s in SPLITS:
        arrays[f"{s}_labels"] = np.ones((len(arrays[f"{s}_images"]), 3), np.uint8)
    np.savez(tmp_path / "ml.npz", label_names=np.array(["a", "b", "c"]), **arrays)
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path / "ml.npz"), classes="a,b")
    assert _one_line(exc).startswith("--classes does not apply to multilabel data; ")


def test_medmnist_multilabel_labels_are_uint8(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 4, "val": 2, "test": 2})
    for s in SPLITS:
        arrays[f"{s}_labels"] = np.ones((len(arrays[f"{s}_images"]), 3), np.int64)
    np.savez(tmp_path / "ml.npz", **arrays)
    ds = load_dataset(str(tmp_path / "ml.npz"))
    assert ds.task == "multilabel"
    assert all(ds.splits[s].labels.dtype == np.uint8 for s in SPLITS)


# -- clips -------------------------------------------------------------------------------------------


@pytest.fixture
def clips_root(tmp_path: Path) -> Path:
    root = tmp_path / "pocus"
    lengths = {"covid": [10, 10, 10, 7], "pneumonia": [10, 10, 10], "regular": [10, 9, 10, 10]}
    for cls, ns in lengths.items():
        for k, n in enumerate(ns):
            _write_clip(root / cls / f"clip{k}.avi", n)
    return root


def test_clips_detected_and_split_by_clip(clips_root: Path) -> None:
    ds = load_dataset(str(clips_root), frames_per_clip=4, seed=0)
    assert ds.kind == "clips" and ds.modality == "ultrasound" and ds.task == "multiclass"
    assert ds.labels == ["covid", "pneumonia", "regular"]
    assert ds.licence is None and ds.notes == []
    allsp = ds.split("all")
    assert len(allsp) == 11 * 4
    where = _split_of(ds)
    clip_split: dict[str, set[str]] = {}
    for i, g in zip(allsp.ids, allsp.groups):
        clip, _, j = i.partition("#")
        assert g == clip and clip.endswith(".avi") and j.isdigit() and 0 <= int(j) < 4
        assert (clips_root / clip).is_file()
        clip_split.setdefault(clip, set()).add(where[i])
    assert len(clip_split) == 11
    assert all(len(v) == 1 for v in clip_split.values()), clip_split  # never split by frame
    for s in SPLITS:  # >= 3 clips per class: every class in every split
        assert set(ds.splits[s].labels.tolist()) == {0, 1, 2}, s
        for i, y in zip(ds.splits[s].ids, ds.splits[s].labels):
            assert i.split("/")[0] == ds.labels[y]
    for im in allsp.images:
        assert im.dtype == np.uint8 and im.shape[:2] == (24, 32)

    # Same seed, same split; other seeds move clips.
    assert load_dataset(str(clips_root), frames_per_clip=4, seed=0).split_lists() == ds.split_lists()
    others = [load_dataset(str(clips_root), frames_per_clip=4, seed=s).split_lists() for s in (1, 2)]
    assert any(o != ds.split_lists() for o in others)


def test_clip_frames_evenly_spaced(clips_root: Path) -> None:
    def frame_values(ds: Dataset, clip: str) -> list[int]:
        allsp = ds.split("all")
        return [
            int(round((float(im.mean()) - 20) / 20))
            for i, im in zip(allsp.ids, allsp.images)
            if i.partition("#")[0] == clip
        ]

    ds = load_dataset(str(clips_root), frames_per_clip=4)
    assert frame_values(ds, "covid/clip0.avi") == [0, 3, 6, 9]  # 10 frames -> 0, 3, 6, 9
    assert frame_values(ds, "covid/clip3.avi") == [0, 2, 4, 6]  # 7 frames -> 0, 2, 4, 6
    ids = [i for i in ds.split("all").ids if i.startswith("covid/clip0.avi")]
    assert sorted(ids) == [f"covid/clip0.avi#{j}" for j in range(4)]
    # More frames asked than a clip has: every frame once.
    many = load_dataset(str(clips_root), frames_per_clip=50)
    assert frame_values(many, "covid/clip0.avi") == list(range(10))
    assert frame_values(many, "regular/clip1.avi") == list(range(9))
    assert len(many.split("all")) == 10 * 9 + 7 + 9


def test_clips_ignore_stray_images_and_read_licences(clips_root: Path) -> None:
    _write(clips_root / "covid" / "poster.png", _gray(4))
    (clips_root / "clips.csv").write_text(
        "file,license\ncovid/clip0.avi,CC BY 4.0\nregular/clip0.avi,CC BY-NC 4.0\ncovid/clip1.avi,\n"
    )
    ds = load_dataset(str(clips_root), frames_per_clip=2)
    assert ds.kind == "clips"
    assert not any(i.endswith(".png") for i in ds.split("all").ids)
    assert ds.notes == ["ignored 1 image file(s) in a clip data set"]
    assert ds.licence == "per clip: CC BY 4.0; CC BY-NC 4.0"


def test_corrupt_clip_is_one_line_error(clips_root: Path) -> None:
    (clips_root / "covid" / "broken.avi").write_bytes(b"RIFF....AVI garbage" * 20)
    with pytest.raises(DataError) as exc:
        load_dataset(str(clips_root), frames_per_clip=2)
    assert "broken.avi" in _one_line(exc)


@pytest.mark.parametrize("k", [0, -1])
def test_frames_per_clip_below_one_is_refused(clips_root: Path, k: int) -> None:
    with pytest.raises(DataError):
        load_dataset(str(clips_root), frames_per_clip=k)


# -- synthetic -------------------------------------------------------------------------------------


def test_synthetic_ultrasound_sizes_and_hash() -> None:
    spec = "synthetic:ultrasound?n=60&size=32&seed=1"
    ds = load_dataset(spec)
    assert ds.kind == "synthetic" and ds.task == "multiclass" and ds.modality == "ultrasound"
    assert ds.labels == ["normal", "cyst", "mass"]
    assert {s: len(ds.splits[s]) for s in SPLITS} == {"train": 42, "val": 9, "test": 9}
    allsp = ds.split("all")
    assert len(set(allsp.ids)) == 60 and len(set(allsp.groups)) == 60
    assert all(im.shape == (32, 32) and im.dtype == np.uint8 for im in allsp.images)
    assert ds.splits["train"].labels.dtype == np.int64
    assert set(allsp.labels.tolist()) == {0, 1, 2}
    again = load_dataset(spec)
    assert again.data_hash == ds.data_hash and again.split_lists() == ds.split_lists()
    np.testing.assert_array_equal(again.splits["val"].images[0], ds.splits["val"].images[0])
    assert load_dataset("synthetic:ultrasound?n=60&size=32&seed=2").data_hash != ds.data_hash


def test_synthetic_xray_multilabel() -> None:
    ds = load_dataset("synthetic:xray?n=30&size=32")
    assert ds.task == "multilabel" and ds.labels == ["consolidation", "nodule", "effusion"]
    # round(30 * 0.15) = round(4.5) = 4 (round half to even)
    assert {s: len(ds.splits[s]) for s in SPLITS} == {"train": 22, "val": 4, "test": 4}
    assert ds.splits["train"].labels.shape == (22, 3) and ds.splits["train"].labels.dtype == np.uint8


@pytest.mark.parametrize(
    "spec, words",
    [
        ("synthetic:ultrasound?n=60&colour=1", "unknown parameter"),
        ("synthetic:ultrasound?n=abc", "malformed"),
        ("synthetic:ultrasound?n", "malformed"),
        ("synthetic:ultrasound?n=10", "n must be >= 30"),
        ("synthetic:ultrasound?n=60&size=8", "size"),
        ("synthetic:nope", "'nope' is unknown"),
        ("synthetic:", "unknown"),
    ],
)
def test_synthetic_bad_specs(spec: str, words: str) -> None:
    with pytest.raises(DataError) as exc:
        load_dataset(spec)
    assert words in _one_line(exc)


@pytest.mark.parametrize(
    "spec", ["synthetic:ultrasound?n=30&size=16", "synthetic:xray?n=30&size=24", "synthetic:ultrasound?n=30&size=32&seed=-1"]
)
def test_synthetic_out_of_range_parameters_are_data_errors(spec: str) -> None:
    # The generator draws at 32 px and more, and numpy seeds are non-negative: say so in one line.
    with pytest.raises(DataError) as exc:
        load_dataset(spec)
    assert "size 32..1024 and seed >= 0" in _one_line(exc)


def test_synthetic_refuses_class_map() -> None:
    with pytest.raises(DataError) as exc:
        load_dataset("synthetic:ultrasound?n=30&size=32", classes="normal,cyst")
    assert "--classes" in _one_line(exc)


# -- paths and folders that cannot be used ------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path / "nowhere"))
    assert "does not exist" in _one_line(exc)


def test_one_class_folder(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"only": 5})
    (tmp_path / ".hidden").mkdir()  # hidden folders are not classes
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path))
    assert "1 class folder" in _one_line(exc)
    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(DataError) as exc:
        load_dataset(str(empty))
    assert "0 class folder" in _one_line(exc)


def test_class_folders_without_images(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "readme.txt").write_text("no images\n")
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path))
    assert "no images" in _one_line(exc)


def test_undecodable_image(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as exc:  # a DataError (not the source's SourceError) naming the file
        load_dataset(str(tmp_path))
    assert type(exc.value) is DataError
    assert str(tmp_path / "b" / "broken.png") in _one_line(exc)
    (tmp_path / "b" / "broken.png").unlink()
    _write(tmp_path / "b" / "float.tiff", np.full((4, 4), 0.5, np.float32))
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path))
    assert "float.tiff" in _one_line(exc) and "float32" in str(exc.value)


# -- one implementation shared with the runtime -------------------------------------------------------


def test_16_bit_images_give_the_same_pixels_in_training_and_at_runtime(tmp_path: Path) -> None:
    from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec
    from edgeclf.runtime.sources import open_source, to_uint8

    # Values where a shift (>> 8) and rounding disagree: 255 -> 0 vs 1, 65535 -> 255 either way.
    edge = np.array([0, 128, 255, 257, 32767, 32768, 33023, 65407, 65535], np.uint16)
    assert to_uint8(edge).tolist() == [0, 0, 1, 1, 127, 128, 128, 255, 255]
    assert not np.array_equal(to_uint8(edge), edge >> 8)

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 65536, (12, 16), dtype=np.uint16)
    gray.flat[: edge.size] = edge
    bgr = rng.integers(0, 65536, (12, 16, 3), dtype=np.uint16)
    bgr.reshape(-1)[: edge.size] = edge
    _write(tmp_path / "a" / "gray16.png", gray)
    _write(tmp_path / "b" / "colour16.png", bgr)
    _write(tmp_path / "b" / "other.png", _gray(3))

    allsp = load_dataset(str(tmp_path)).split("all")
    by_id = dict(zip(allsp.ids, allsp.images))
    for rel, raw16, channels in (("a/gray16.png", gray, 1), ("b/colour16.png", bgr, 3)):
        [frame] = list(open_source(str(tmp_path / rel)))
        rgb16 = raw16 if raw16.ndim == 2 else np.ascontiguousarray(raw16[:, :, ::-1])
        pre = Preprocessor(PreprocessSpec(channels=channels, size=raw16.shape[:2], mean=(0.5,) * channels, std=(0.25,) * channels))
        geo = pre.geometry(rgb16)  # what a device does with a 16-bit frame handed to it directly
        trained = by_id[rel]
        assert trained.dtype == frame.image.dtype == geo.dtype == np.uint8
        np.testing.assert_array_equal(trained, frame.image)
        np.testing.assert_array_equal(geo.reshape(trained.shape), trained)
        np.testing.assert_array_equal(trained, to_uint8(rgb16))


def test_dataset_name_carries_no_workstation_path(tmp_path: Path) -> None:
    assert load_dataset("synthetic:ultrasound?n=30&size=32").name == "synthetic:ultrasound?n=30&size=32"
    path = tmp_path / "breastmnist.npz"
    np.savez(path, **_medmnist_arrays({"train": 4, "val": 2, "test": 2}))
    ds = load_dataset(str(path))
    assert ds.spec == str(path.resolve()) and ds.name == "breastmnist.npz"
    root = tmp_path / "pocus"
    _image_tree(root, {"a": 3, "b": 3})
    ds = load_dataset(str(root) + "/")
    assert Path(ds.spec).is_absolute() and ds.name == "pocus"
    assert str(tmp_path) not in ds.name


# -- folder options: near-copy dedup, committed split lists, folds, sector crop ------------------------

from edgeclf.data import FolderOptions, make_split_list, split_spec, with_options  # noqa: E402


def _textured(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random image (structure at thumbnail scale, so the difference hash sees it)."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def test_spec_options_parse_and_canonical_query() -> None:
    base, opts = split_spec("/d/busi?test=0.2&dedup=near")
    assert base == "/d/busi" and opts == FolderOptions(dedup="near", test=0.2)
    assert with_options("/d/busi?test=0.2&dedup=near") == "/d/busi?dedup=near&test=0.2"
    assert with_options("/d/busi", dedup="exact") == "/d/busi"  # defaults leave no query
    assert with_options("/d/p?folds=5&fold=1&group=source", fold=3) == "/d/p?folds=5&fold=3&group=source"
    for bad in ("/d?dedup=fuzzy", "/d?colour=1", "/d?near=x", "/d?folds=5&fold=5", "/d?split=a&folds=3", "/d?roi=box"):
        with pytest.raises(DataError) as exc:
            split_spec(bad)
        _one_line(exc)


def test_options_refused_on_npz_and_images(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", **_medmnist_arrays({"train": 6, "val": 4, "test": 4}))
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path / "m.npz") + "?dedup=near")
    assert "apply to folders" in _one_line(exc)
    _image_tree(tmp_path / "imgs", {"a": 4, "b": 4})
    with pytest.raises(DataError) as exc:
        load_dataset(str(tmp_path / "imgs") + "?roi=sector")
    assert "clip data sets" in _one_line(exc)


def test_near_copies_grouped_exact_copies_dropped(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls, seeds in {"a": range(0, 12), "b": range(100, 112)}.items():
        for s in seeds:
            _write(root / cls / f"i{s}.png", _textured(s))
    base = _textured(0)
    _write(root / "a" / "near_bright.png", np.clip(base.astype(int) + 6, 0, 255).astype(np.uint8))
    _write(root / "a" / "near_crop.png", cv2.resize(base[2:62, 2:62], (64, 64)))
    (root / "a" / "z_copy.png").write_bytes((root / "a" / "i0.png").read_bytes())  # sorts after i0: i0 is kept
    for seed in range(4):
        ds = load_dataset(f"{root}?dedup=near&test=0.25&val=0.25", seed=seed)
        where = _split_of(ds)
        assert "a/z_copy.png" not in where and len(where) == 26  # the exact copy is dropped, the rest kept
        assert where["a/i0.png"] == where["a/near_bright.png"] == where["a/near_crop.png"]
        assert any("dropped 1 exact" in n for n in ds.notes)
    # Distinct images are not merged: more than 20 groups remain.
    rows, _ = make_split_list(f"{root}?dedup=near&test=0.25&val=0.25")
    assert len({r[3] for r in rows}) >= 20
    assert {r[0]: r[2] for r in rows}["a/z_copy.png"] == "duplicate"
    assert {r[0]: r[3] for r in rows}["a/z_copy.png"] == {r[0]: r[3] for r in rows}["a/i0.png"]


def test_committed_split_list_round_trip(tmp_path: Path) -> None:
    import csv

    root = tmp_path / "imgs"
    _image_tree(root, {"a": 10, "b": 10})
    rows, _ = make_split_list(f"{root}?dedup=near&test=0.2&val=0.2", seed=1)
    lst = tmp_path / "list.csv"
    with open(lst, "w", newline="") as f:
        f.write("# a comment line\n")
        w = csv.writer(f)
        w.writerow(["path", "sha256", "split", "group"])
        w.writerows(rows)
    ds = load_dataset(f"{root}?split={lst}")
    assert _split_of(ds) == {r[0]: r[2] for r in rows}
    assert ds.name == "imgs?split=list.csv"  # no workstation path in provenance
    # A new file is left out (never trained on silently), with a note; a changed file is refused.
    _write(root / "a" / "new.png", _gray(999))
    ds2 = load_dataset(f"{root}?split={lst}")
    assert "a/new.png" not in _split_of(ds2) and any("does not name" in n for n in ds2.notes)
    assert ds2.data_hash != ds.data_hash
    _write(root / "a" / "img0.png", _gray(998))
    with pytest.raises(DataError) as exc:
        load_dataset(f"{root}?split={lst}")
    assert "changed since split list" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        load_dataset(f"{root}?split=no-such-list")
    assert "committed" in _one_line(exc)


def _clip_tree(root: Path, per_class: int = 4, n_frames: int = 6) -> Path:
    """root/<class>/c<k>.avi plus a clips.csv naming one source site per clip index."""
    lines = ["file,label,license,original_source"]
    for cls in ("covid19", "pneumonia", "regular"):
        for k in range(per_class):
            _write_clip(root / cls / f"c{k}.avi", n_frames)
            src = f"Data contributed by Site A, video{k}.avi" if k < 2 else f"https://www.site{k}.org/page{k}"
            lines.append(f'{cls}/c{k}.avi,{cls},CC BY 4.0,"{src}"')
    (root / "clips.csv").write_text("\n".join(lines) + "\n")
    return root


def test_site_of_original_source() -> None:
    from edgeclf.data import _site

    assert _site("Data contributed by Northumbria Specialist Emergency Care Hospital, Image004.avi") == \
        "northumbria specialist emergency care hospital"
    assert _site("http://www.thepocusatlas.com/covid19 (Day3)") == "thepocusatlas.com"
    assert _site("https://litfl.com/pneumonia-case-004/") == "litfl.com"
    assert _site("charlotte") == "charlotte" and _site("") == "unknown"


def test_folds_grouped_by_source(tmp_path: Path) -> None:
    from edgeclf.data import _clip_sources, load_folds

    root = _clip_tree(tmp_path / "pocus")
    # As written, Site A's two clips are two sources; reduced to sites they are one group.
    by_source = load_folds(str(root), 3, frames_per_clip=2, group="source")
    assert by_source[0].spec.endswith("group=source")
    src = _clip_sources(root)
    for ds in by_source:
        val, train = ({src[x.split("#")[0]] for x in ds.splits[s].ids} for s in ("val", "train"))
        assert val and train and not val & train
    dss = load_folds(str(root), 3, frames_per_clip=2, group="site")
    seen: dict[str, int] = {}
    for i, ds in enumerate(dss):
        assert ds.spec == f"{root}?folds=3&fold={i}&group=site"
        test_clips = {x.split("#")[0] for x in ds.splits["test"].ids}
        rest = {x.split("#")[0] for s in ("train", "val") for x in ds.splits[s].ids}
        assert test_clips and not test_clips & rest
        for c in test_clips:
            assert c not in seen
            seen[c] = i
        # No site on both sides, also between validation (early stopping, temperature) and training.
        assert not {ds.sources[c] for c in test_clips} & {ds.sources[c] for c in rest}
        val_clips = {x.split("#")[0] for x in ds.splits["val"].ids}
        train_clips = {x.split("#")[0] for x in ds.splits["train"].ids}
        assert val_clips and train_clips
        assert not {ds.sources[c] for c in val_clips} & {ds.sources[c] for c in train_clips}
        # The recorded spec rebuilds the same fold alone.
        assert load_dataset(ds.spec, frames_per_clip=2).split_lists() == ds.split_lists()
    assert len(seen) == 12  # every clip held out exactly once
    # A spec that names its folds' grouping keeps it, and says so in its spec (what cv.json records).
    assert load_folds(f"{root}?folds=3&group=site", 3, frames_per_clip=2, group="source")[0].spec.endswith("group=site")
    assert load_folds(f"{root}?folds=3", 3, frames_per_clip=2, group="source")[0].spec.endswith("group=clip")
    with pytest.raises(DataError) as exc:
        load_folds(f"{root}?val=0", 3, frames_per_clip=2, group="site")
    assert "val=0" in _one_line(exc)


def test_sector_crop_of_clips(tmp_path: Path) -> None:
    from edgeclf.runtime.sources import open_source

    with open_source("synthetic:ultrasound?frames=24&size=128&seed=1") as s:
        frames = [f.image for f in s]
    root = tmp_path / "us"
    for cls in ("a", "b"):
        for k in range(3):
            path = root / cls / f"c{k}.avi"
            path.parent.mkdir(parents=True, exist_ok=True)
            vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 128))
            for f in frames:
                vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
            vw.release()
    plain = load_dataset(str(root), frames_per_clip=3)
    cropped = load_dataset(f"{root}?roi=sector&frames=3")
    assert cropped.spec.endswith("?frames=3&roi=sector")
    assert all(im.shape[:2] == (128, 128) for im in plain.split("all").images)
    shapes = {im.shape[:2] for im in cropped.split("all").images}
    assert len(cropped.split("all")) == 18 and all(h < 128 and w < 128 for h, w in shapes), shapes
    # What training records as preprocess.sector, so that the runtime crops alike.
    assert cropped.sector_crops and not plain.sector_crops


def _video(path: Path, frames: list[np.ndarray]) -> Path:
    """MJPG .avi of gray frames, as given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    vw.release()
    return path


def _speckle(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [rng.integers(30, 220, (64, 64), dtype=np.uint8) for _ in range(n)]


def _fan(rng: np.random.Generator, black: bool = False) -> np.ndarray:
    """A speckle rectangle on a black screen (the sector detector locks on it after its 8-frame warm-up); `black`: the
    rectangle gone dark (a frozen-to-black output)."""
    f = np.zeros((96, 96), np.uint8)
    if not black:
        f[16:80, 24:72] = rng.integers(40, 220, (64, 48), dtype=np.uint8)
    return f


def test_clip_frames_the_quality_gate_stops_are_flagged_for_evaluation(tmp_path: Path) -> None:
    """`edgeclf run` does not classify the frames its quality gate stops (4 black frames of a fade-in: "blank"); evaluate
    must know them to abstain on them too. Only a load asked to gate (evaluate) flags them: training's frames, their
    flags and the data hash are unchanged."""
    from edgeclf.data import _sample_clip

    rng = np.random.default_rng(2)
    root = tmp_path / "clips"
    clip = _video(root / "a" / "x.avi", [np.zeros((64, 64), np.uint8)] * 4 + _speckle(rng, 4))
    _video(root / "b" / "y.avi", _speckle(rng, 8))
    frames, why = _sample_clip(clip, 8, quality=True)
    assert len(frames) == 8 and why == ["blank"] * 4 + [""] * 4
    assert _sample_clip(clip, 8)[1] == [""] * 8  # no gate asked (training, evaluate --no-quality)
    gated, plain = load_dataset(str(root), quality=True), load_dataset(str(root))
    assert gated.abstain == {f"a/x.avi#{j}": "blank" for j in range(4)} and plain.abstain == {}
    assert gated.data_hash == plain.data_hash and gated.split_lists() == plain.split_lists()


def test_the_gate_sees_every_frame_of_the_clip_not_only_the_sampled_ones(tmp_path: Path) -> None:
    """A still clip (20 identical frames) is "frozen" for run's gate from its 16th frame on: the gate's frozen run counts
    every frame between two sampled ones, as run feeds them. Fed the 2 sampled frames alone it would see none."""
    from edgeclf.data import _sample_clip

    clip = _video(tmp_path / "still.avi", _speckle(np.random.default_rng(0), 1) * 20)
    assert _sample_clip(clip, 2, quality=True)[1] == ["", "frozen"]


def test_sector_clip_flags_match_the_frames_run_does_not_classify(tmp_path: Path) -> None:
    """Frame by frame, the reasons a sector clip's frames get are those of `edgeclf run --roi sector`'s records: warm-up
    before the lock (not sampled), "blank" for frames gone black inside the locked sector (the gate judges the sector,
    through its mask), nothing for the classified ones."""
    import json

    from edgeclf.data import _sample_clip
    from edgeclf.runtime.app import run_bundle
    from edgeclf.runtime.bundle import write_checksums
    from tests.runtime.tiny_bundle import make_tiny_bundle

    rng = np.random.default_rng(0)
    clip = _video(tmp_path / "fan.avi", [_fan(rng) for _ in range(15)] + [_fan(rng, True) for _ in range(4)]
                  + [_fan(rng) for _ in range(3)])
    b = make_tiny_bundle(tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["preprocess"]["sector"] = True
    (b / "manifest.json").write_text(json.dumps(m))
    write_checksums(b)
    run_bundle(str(b), str(clip), out=str(tmp_path / "run.jsonl"))
    recs = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    run_why = [r["abstain_reason"] if r["probs"] is None else "" for r in recs]
    start = run_why.count("sector_warmup")
    assert start == 7 and run_why[:start] == ["sector_warmup"] * start
    frames, why = _sample_clip(clip, 100, roi="sector", quality=True)  # every frame from the lock on
    assert len(frames) == len(recs) - start and why == run_why[start:] and why.count("blank") == 4


def test_sector_clip_that_never_locks_is_flagged_sector_warmup(tmp_path: Path) -> None:
    """A clip shorter than the detector's warm-up never locks: run abstains on every frame (sector_warmup). Its frames
    stay whole for training (as before), flagged so that evaluate abstains on them with that reason, gate or not."""
    from edgeclf.data import _sample_clip

    rng = np.random.default_rng(0)
    root = tmp_path / "clips"
    short = _video(root / "a" / "short.avi", [_fan(rng) for _ in range(6)])
    _video(root / "b" / "long.avi", [_fan(rng) for _ in range(15)])
    for quality in (False, True):
        frames, why = _sample_clip(short, 4, roi="sector", quality=quality)
        assert why == ["sector_warmup"] * 4 and all(f.shape[:2] == (96, 96) for f in frames)  # whole
    ds = load_dataset(f"{root}?roi=sector&frames=4")
    assert ds.abstain == {f"a/short.avi#{j}": "sector_warmup" for j in range(4)}
    assert any("1 clip(s) with no sector found" in n and "sector_warmup" in n for n in ds.notes), ds.notes


def test_spec_name_keeps_no_workstation_path() -> None:
    from edgeclf.data import spec_name

    assert spec_name("/data/PATIENT_Doe_Jane/imgs?split=/data/PATIENT_Doe_Jane/splits.csv&test=0.2") == \
        "imgs?split=splits.csv&test=0.2"
    assert spec_name("/x/imgs?split=D:\\PATIENT_Doe\\l.csv") == "imgs?split=l.csv"
    assert spec_name("/x/imgs?split=brain-mri") == "imgs?split=brain-mri"
    assert spec_name("/x/pocus?frames=12&group=source") == "pocus?frames=12&group=source"
    assert spec_name("synthetic:ultrasound?n=60") == "synthetic:ultrasound?n=60"


# -- review: nothing ignored or dropped without a word --------------------------------------------------


@pytest.mark.parametrize(("spec", "words"), [
    ("/d?split=", "is empty"),  # was read as "no split list": the whole folder split afresh
    ("/d?dedup=near&near=", "is empty"),
    ("/d?frames=2&frames=3", "twice"),  # was: the last one silently
    ("/d?fold=2", "cross-validation"),  # was: dropped from the spec, one plain split
    ("/d?split=busi&group=site", "exclude each other"),  # group without folds groups a clip folder's split, never a list's
    ("/d?near=30", "dedup=near"),  # was: dropped from the spec, exact dedup
])
def test_spec_options_that_would_be_ignored_are_refused(spec: str, words: str) -> None:
    with pytest.raises(DataError) as exc:
        split_spec(spec)
    assert words in _one_line(exc)
    # What the recorded specs hold still parses.
    assert split_spec("/d?folds=5&fold=2&group=source")[1].fold == 2
    assert split_spec("/d?dedup=near&near=30")[1].near == 30


def test_split_list_with_an_unknown_split_is_refused(tmp_path: Path) -> None:
    import csv

    root = tmp_path / "imgs"
    _image_tree(root, {"a": 6, "b": 6})
    rows, _ = make_split_list(f"{root}?test=0.2&val=0.2")
    for bad in ([(*rows[0][:2], "tset", rows[0][3])], [rows[0]]):  # a typo (was: dropped like a duplicate); a row twice
        lst = tmp_path / "list.csv"
        with open(lst, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "sha256", "split", "group"])
            w.writerows(rows[1:] + bad if bad[0][2] == "tset" else rows + bad)
        with pytest.raises(DataError) as exc:
            load_dataset(f"{root}?split={lst}")
        _one_line(exc)


def test_split_list_duplicates_are_counted(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _image_tree(root, {"a": 8, "b": 8})
    (root / "a" / "z_copy.png").write_bytes((root / "a" / "img0.png").read_bytes())
    rows, _ = make_split_list(f"{root}?dedup=near&test=0.25&val=0.25")
    lst = tmp_path / "list.csv"
    lst.write_text("path,sha256,split,group\n" + "".join(",".join(r) + "\n" for r in rows))
    ds = load_dataset(f"{root}?split={lst}")
    assert "a/z_copy.png" not in _split_of(ds) and len(_split_of(ds)) == 16
    assert any("1 file(s) that split list" in n and "duplicates" in n for n in ds.notes), ds.notes


def test_classes_left_out_by_the_class_map_are_counted(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"bacterial_pneumonia": 4, "covid19": 4, "regular": 4, "viral_pneumonia": 3})
    ds = load_dataset(str(tmp_path), classes="covid19,pneumonia=bacterial_pneumonia,regular")
    assert len(ds.split("all")) == 12
    assert any("left out 3 image(s)" in n and "viral_pneumonia (3)" in n for n in ds.notes), ds.notes


def test_short_clips_are_counted(clips_root: Path) -> None:
    ds = load_dataset(str(clips_root), frames_per_clip=10)  # covid/clip3 has 7 frames, regular/clip1 9
    assert len(ds.split("all")) == 9 * 10 + 7 + 9  # sampling unchanged: every frame of a short clip once
    assert any(n.startswith("2 clip(s) gave fewer than 10 frames (7-9)") for n in ds.notes), ds.notes
    assert load_dataset(str(clips_root), frames_per_clip=4).notes == []


def test_fold_groups_without_a_source_are_counted(tmp_path: Path) -> None:
    from edgeclf.data import load_folds

    root = _clip_tree(tmp_path / "pocus")
    lines = (root / "clips.csv").read_text().splitlines()
    (root / "clips.csv").write_text("\n".join(ln for ln in lines if not ln.startswith("regular/c3.avi")) + "\n")
    for ds in load_folds(str(root), 3, frames_per_clip=2, group="source"):
        assert any("group=source: 1 clip(s) without a clips.csv original_source" in n for n in ds.notes), ds.notes
    assert not any("original_source" in n for n in load_folds(str(root), 3, frames_per_clip=2, group="clip")[0].notes)


def test_copies_filed_under_two_classes_are_noted(tmp_path: Path) -> None:
    files = _image_tree(tmp_path / "d", {"benign": 8, "malignant": 8})
    shutil.copy(files["benign"][0], tmp_path / "d" / "malignant" / "same.png")  # one picture, two labels
    ds = load_dataset(f"{tmp_path / 'd'}?dedup=exact&test=0.25&val=0.25", seed=0)
    assert any("1 copy group(s) hold images of different classes (benign + malignant: 1)" in n for n in ds.notes), ds.notes
    clean = load_dataset(f"{tmp_path / 'd'}?dedup=none&test=0.25&val=0.25", seed=0)  # no groups, nothing to say
    assert not any("different classes" in n for n in clean.notes)


# -- options that would have no effect are refused where a spec is typed ----------------------------------


@pytest.mark.parametrize(("query", "words"), [
    ("split=brain-mri&test=0.2", "option test has no effect with split=brain-mri"),  # was: recorded, and the list's split used
    ("split=brain-mri&dedup=near", "option dedup has no effect with split"),
    ("split=brain-mri&val=0.1", "option val has no effect with split"),
    ("folds=5&fold=1&test=0.2", "option test has no effect with cross-validation"),  # was: the fold is the test split
])
def test_typed_spec_options_without_effect_are_refused(query: str, words: str) -> None:
    from edgeclf.data import check_spec_options

    with pytest.raises(DataError) as exc:
        check_spec_options(f"/no/such/folder?{query}")
    assert words in _one_line(exc) and "leave" in str(exc.value)


def test_typed_spec_options_checked_against_the_data(tmp_path: Path, clips_root: Path) -> None:
    from edgeclf.data import check_spec_options

    with pytest.raises(DataError) as exc:  # --folds K from the command line makes the spec's test moot too
        check_spec_options(f"{tmp_path}/x?test=0.2", folds=5)
    assert "folds=5" in _one_line(exc)
    np.savez(tmp_path / "m.npz", **_medmnist_arrays({"train": 6, "val": 4, "test": 4}))
    with pytest.raises(DataError) as exc:  # was: accepted, since dedup=exact is the default value
        check_spec_options(f"{tmp_path / 'm.npz'}?dedup=exact")
    assert "apply to folders" in _one_line(exc)
    for s in SPLITS:
        _image_tree(tmp_path / "given" / s, {"a": 3, "b": 3}, seed0=10 * SPLITS.index(s))
    with pytest.raises(DataError) as exc:
        check_spec_options(f"{tmp_path / 'given'}?test=0.3")
    assert "train/ val/ test/ folders" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        check_spec_options(f"{clips_root}?dedup=near")
    assert "clip data set" in _one_line(exc)
    # What has an effect passes, and the kind of data comes back for the caller's own checks.
    _image_tree(tmp_path / "imgs", {"a": 4, "b": 4})
    assert check_spec_options(f"{tmp_path / 'imgs'}?dedup=near&near=30&test=0.2&val=0.1") == "images"
    assert check_spec_options(f"{tmp_path / 'imgs'}?folds=3&fold=1&val=0.2") == "images"
    assert check_spec_options(f"{clips_root}?frames=4&roi=sector") == "clips"
    assert check_spec_options(str(tmp_path / "m.npz")) == "medmnist"
    assert check_spec_options("synthetic:ultrasound?n=60") == "synthetic"
    assert check_spec_options(str(tmp_path / "absent")) is None
    # A run.json written before the check may record such a spec: evaluate, export and prune re-read it as it is.
    import csv

    rows, _ = make_split_list(str(tmp_path / "imgs"), seed=0)
    lst = tmp_path / "list.csv"
    with open(lst, "w", newline="") as f:
        csv.writer(f).writerows([["path", "sha256", "split", "group"], *rows])
    old = load_dataset(f"{tmp_path / 'imgs'}?split={lst}&test=0.3")
    assert _split_of(old) == _split_of(load_dataset(f"{tmp_path / 'imgs'}?split={lst}"))


def _thin_class_tree(root: Path) -> Path:
    """Three classes of 6 clips on 6 sites; `rare` has 4 clips from only 2 sites (the POCUS viral_pneumonia case)."""
    lines = ["file,label,license,original_source"]
    for cls, n, sites in (("common", 6, 6), ("other", 6, 6), ("rare", 4, 2)):
        for k in range(n):
            _write_clip(root / cls / f"c{k}.avi", 3)
            lines.append(f"{cls}/c{k}.avi,{cls},CC BY 4.0,https://www.{cls}{k % sites}.org/case")
    (root / "clips.csv").write_text("\n".join(lines) + "\n")
    return root


def test_folds_that_leave_a_class_out_of_training_say_how_to_fix_it(tmp_path: Path) -> None:
    import warnings

    from edgeclf.data import load_folds

    root = _thin_class_tree(tmp_path / "thin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's n_splits warning is not the user's business: our own message is
        with pytest.raises(DataError) as exc:
            load_folds(str(root), 2, frames_per_clip=2, group="source")
        msg = _one_line(exc)
        assert "rare" in msg and "2 source group(s)" in msg and "--group clip" in msg and "--classes" in msg
        # Grouped by clip, its 4 clips reach training and validation in every fold (no warning either).
        for ds in load_folds(str(root), 2, frames_per_clip=2, group="clip"):
            for s in ("train", "val"):
                assert set(ds.splits[s].labels.tolist()) == {0, 1, 2}


# -- provenance and held-out data: what the data hash covers, copies across splits, hidden folders ------------


def _write_list(rows, path: Path) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "sha256", "split", "group"])
        w.writerows(rows)
    return path


def test_regenerated_split_list_changes_the_data_hash(tmp_path: Path) -> None:
    from edgeclf.data import require_training_data

    root = tmp_path / "d"
    _image_tree(root, {"a": 10, "b": 10})
    rows, _ = make_split_list(f"{root}?test=0.2&val=0.2")
    lst = _write_list(rows, tmp_path / "list.csv")
    trained = load_dataset(f"{root}?split={lst}")
    recorded = {"spec": trained.spec, "name": trained.name, "hash": trained.data_hash}
    # Regenerated (another seed or threshold): train and test swap, the image files unchanged.
    swap = {"train": "test", "test": "train", "val": "val", "duplicate": "duplicate"}
    _write_list([(p, h, swap[s], g) for p, h, s, g in rows], lst)
    later = load_dataset(f"{root}?split={lst}")
    assert set(later.splits["test"].ids) & set(trained.splits["train"].ids)
    assert later.data_hash != trained.data_hash
    with pytest.raises(DataError) as exc:
        require_training_data(later, recorded, data_given=None, use="x")
    assert "changed since the model was trained" in _one_line(exc)
    # A run recorded before the list's contents were hashed still matches the unchanged list (former_hash),
    # and is not refused for it.
    _write_list(rows, lst)
    again = load_dataset(f"{root}?split={lst}")
    assert again.data_hash == trained.data_hash and again.former_hash and again.former_hash != again.data_hash
    require_training_data(again, {**recorded, "hash": again.former_hash}, data_given=None, use="x")
    # Plain folders keep their hash and have no former one.
    assert load_dataset(str(root)).former_hash is None


def test_frames_per_clip_is_part_of_the_data_hash(tmp_path: Path) -> None:
    root = tmp_path / "clips"
    for cls in ("covid", "regular"):
        for k in range(4):
            _write_clip(root / cls / f"c{k}.avi", 8)
    kw2, kw4, kw8 = (load_dataset(str(root), frames_per_clip=k) for k in (2, 4, 8))
    assert len(kw2.split("all")) == 16 and len(kw4.split("all")) == 32
    assert len({kw2.data_hash, kw4.data_hash, kw8.data_hash}) == 3
    # The same frames as the spec option frames=N: the same data, the same hash.
    assert kw2.data_hash == load_dataset(f"{root}?frames=2").data_hash
    assert kw8.former_hash is None and kw2.former_hash == kw4.former_hash == kw8.data_hash  # the default kept its hash
    assert load_dataset(f"{root}?frames=2", frames_per_clip=4).data_hash == kw2.data_hash  # the option wins


def test_near_dedup_notes_an_exact_copy_under_two_classes(tmp_path: Path) -> None:
    files = _image_tree(tmp_path / "d", {"benign": 10, "malignant": 10})
    shutil.copy(files["benign"][0], tmp_path / "d" / "malignant" / "same_lesion.png")
    for query in ("dedup=exact", "dedup=near"):
        ds = load_dataset(f"{tmp_path / 'd'}?{query}")
        assert any("1 copy group(s) hold images of different classes (benign + malignant: 1)" in n for n in ds.notes), \
            (query, ds.notes)


def test_split_list_duplicate_under_another_class_is_noted(tmp_path: Path) -> None:
    files = _image_tree(tmp_path / "d", {"benign": 8, "malignant": 8})
    shutil.copy(files["benign"][0], tmp_path / "d" / "malignant" / "same_lesion.png")
    rows, _ = make_split_list(f"{tmp_path / 'd'}?dedup=near&test=0.25&val=0.25")
    ds = load_dataset(f"{tmp_path / 'd'}?split={_write_list(rows, tmp_path / 'list.csv')}")
    assert any("1 file(s) that split list" in n for n in ds.notes), ds.notes  # the copy the list dropped ...
    assert any("(benign + malignant: 1)" in n for n in ds.notes), ds.notes  # ... had another label


def test_npz_class_map_counts_what_it_drops(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 30, "val": 9, "test": 9}, n_classes=3)
    np.savez(tmp_path / "three.npz", label_names=np.array(["a", "b", "c"]), **arrays)
    ds = load_dataset(str(tmp_path / "three.npz"), classes="a,b")
    assert len(ds.split("all")) == 32
    assert any("left out 16 item(s) of class(es) the class map does not name: c (16)" in n for n in ds.notes), ds.notes
    assert load_dataset(str(tmp_path / "three.npz")).notes == []


def test_copy_in_two_split_folders_is_noted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "d"
    _image_tree(root / "train", {"a": 6, "b": 6})
    _image_tree(root / "val", {"a": 2, "b": 2}, seed0=100)
    _image_tree(root / "test", {"a": 2, "b": 2}, seed0=200)
    assert not any("copies" in n for n in load_dataset(str(root)).notes)
    shutil.copy(root / "train" / "a" / "img0.png", root / "test" / "a" / "img9.png")
    shutil.copy(root / "train" / "b" / "img1.png", root / "test" / "b" / "img9.png")
    shutil.copy(root / "val" / "a" / "img0.png", root / "train" / "a" / "img9.png")
    with caplog.at_level("WARNING", logger="edgeclf.data"):
        ds = load_dataset(str(root))  # kept as given (the public Kaggle brain MRI layout has such copies), but said
    assert len(ds.split("test")) == 6
    note = "3 file(s) in a split folder duplicate a file in an earlier one byte for byte (train/val: 1, train/test: 2)"
    assert any(n.startswith(note) for n in ds.notes), ds.notes
    assert note in caplog.text


@pytest.mark.parametrize("hidden", [".thumbnails", ".AppleDouble", ".ipynb_checkpoints"])
def test_files_in_hidden_subfolders_are_skipped_and_counted(tmp_path: Path, hidden: str) -> None:
    root = tmp_path / "d"
    _image_tree(root, {"a": 10, "b": 10})
    _write(root / "a" / hidden / "img3.png", _gray(999, 8, 8))
    (root / "b" / hidden).mkdir()
    (root / "b" / hidden / "img0.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # an AppleDouble header
    ds = load_dataset(str(root))
    assert len(ds.split("all")) == 20 and not [i for i in ds.split("all").ids if "/." in i]
    assert any(n.startswith("skipped 2 hidden file(s)") for n in ds.notes), ds.notes


def test_byte_identical_clips_share_a_group(tmp_path: Path) -> None:
    from edgeclf.data import load_folds

    root = tmp_path / "clips"
    for cls in ("covid", "regular"):
        for k in range(6):
            _write_clip(root / cls / f"c{k}.avi", 4 + k)
    for k in range(6):  # the same recording saved twice (exported again, renamed)
        shutil.copy(root / "covid" / f"c{k}.avi", root / "covid" / f"copy_of_c{k}.avi")

    def side(ds: Dataset, rel: str) -> set[str]:
        return {s for s, sp in ds.splits.items() for i in sp.ids if i.split("#")[0] == rel}

    ds = load_dataset(str(root), frames_per_clip=2)
    for d in (ds, *load_folds(str(root), 3, frames_per_clip=2)):
        assert all(side(d, f"covid/c{k}.avi") == side(d, f"covid/copy_of_c{k}.avi") for k in range(6)), d.spec
    # The group is the first copy's name (clip figures are read by name), and the grouping is said.
    groups = {i.split("#")[0]: g for i, g in zip(ds.split("all").ids, ds.split("all").groups)}
    assert groups["covid/copy_of_c3.avi"] == groups["covid/c3.avi"] == "covid/c3.avi"
    assert groups["regular/c3.avi"] == "regular/c3.avi"
    assert any(n.startswith("6 clip(s) byte-identical to another clip") for n in ds.notes), ds.notes


def test_channels_hint_ignores_the_test_split(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _image_tree(root / "train", {"a": 6, "b": 6})
    _image_tree(root / "val", {"a": 2, "b": 2}, seed0=100)
    _image_tree(root / "test", {"a": 2, "b": 2}, seed0=200)
    _write(root / "test" / "a" / "colour.png", np.stack([_gray(300), _gray(301), _gray(302)], -1))
    assert load_dataset(str(root)).channels_hint == 1  # a held-out image does not choose the model's input
    _write(root / "val" / "b" / "colour.png", np.stack([_gray(303), _gray(304), _gray(305)], -1))
    assert load_dataset(str(root)).channels_hint == 3


# -- a CSV that is not UTF-8, an unreadable folder the class map drops, images through run's quality gate ----------


def test_clips_csv_that_is_not_utf8_is_one_line(clips_root: Path) -> None:
    """A clips.csv saved as Latin-1 (an accented contributor's name) was a UnicodeDecodeError traceback."""
    (clips_root / "clips.csv").write_bytes(b"file,label,license,original_source\ncovid/clip0.avi,covid,CC BY 4.0,"
                                           b"Data contributed by Dr. Ram\xedrez\n")
    for spec in (str(clips_root), f"{clips_root}?folds=2&group=source"):
        with pytest.raises(DataError) as exc:
            load_dataset(spec, frames_per_clip=1)
        msg = _one_line(exc)
        assert "clips.csv" in msg and "UTF-8" in msg and "line 2" in msg, msg


def test_split_list_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    from edgeclf.data import read_split_list

    lst = tmp_path / "list.csv"
    lst.write_bytes(b"# r\xe9sum\xe9\npath,sha256,split,group\na/img0.png,00,train,g\n")
    with pytest.raises(DataError) as exc:
        read_split_list(str(lst))
    msg = _one_line(exc)
    assert "split list" in msg and "list.csv" in msg and "UTF-8" in msg and "line 1" in msg, msg


def _unlistable(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Listing `folder` fails as it does for a user without read permission on it (the tests run as root, which reads
    anything: chmod 000 would not stop it)."""
    import os

    real = os.scandir

    def scandir(path="."):  # type: ignore[no-untyped-def]
        if Path(os.fsdecode(path)) == folder:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_class_folder_the_class_map_drops_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--classes that leaves a folder out: the data set does not hold it, so its permissions must not stop training (the
    spec check `edgeclf train` runs first included); a folder the map keeps is still refused, with its one line."""
    from edgeclf.data import check_spec_options

    _image_tree(tmp_path, {"a": 6, "b": 6, "c": 6})
    _unlistable(monkeypatch, tmp_path / "c")
    assert check_spec_options(str(tmp_path)) == "images"
    ds = load_dataset(str(tmp_path), classes="a,b")
    assert ds.labels == ["a", "b"] and len(ds.split("all")) == 12
    assert any("class map does not name" in n and "c (" in n for n in ds.notes), ds.notes
    for classes in (None, "a,c", "a,b=b+c"):
        with pytest.raises(DataError) as exc:
            load_dataset(str(tmp_path), classes=classes)
        assert _one_line(exc).startswith(f"cannot read folder {tmp_path / 'c'} (Permission denied)")


def _runs_quality_reasons(tmp_path: Path, folder: Path) -> list[str]:
    """The abstain reason `edgeclf run` records for each image of `folder` (in its order), "" where it classifies it."""
    import json

    from edgeclf.runtime.app import run_bundle
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = tmp_path / "bundle"
    if not b.is_dir():
        make_tiny_bundle(b)
    out = tmp_path / f"run-{folder.name}.jsonl"
    run_bundle(str(b), str(folder), out=str(out))
    return [r["abstain_reason"] if r["probs"] is None else "" for r in map(json.loads, out.read_text().splitlines())]


def test_images_the_quality_gate_stops_are_flagged_as_run_flags_them(tmp_path: Path) -> None:
    """`edgeclf run` on a folder of images does not classify the ones its quality gate stops (a black image: "blank", a
    saturated one); evaluate must abstain on them too. Only a load asked to gate flags them; the data and hash stay."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for i, img in enumerate(_speckle(rng, 6)):
        _write(root / "a" / f"img{i}.png", img)
        _write(root / "b" / f"img{i}.png", 255 - img)
    _write(root / "a" / "img6.png", np.zeros((64, 64), np.uint8))
    _write(root / "b" / "img6.png", np.full((64, 64, 3), 255, np.uint8))
    gated, plain = load_dataset(str(root), quality=True), load_dataset(str(root))
    assert gated.abstain == {"a/img6.png": "blank", "b/img6.png": "saturated"} and plain.abstain == {}
    assert gated.data_hash == plain.data_hash and gated.split_lists() == plain.split_lists()
    for cls in ("a", "b"):
        run = _runs_quality_reasons(tmp_path, root / cls)
        assert run == [gated.abstain.get(f"{cls}/img{i}.png", "") for i in range(7)], run


def test_image_folders_are_gated_image_by_image_as_run_gates_them(tmp_path: Path) -> None:
    """Run judges each image of a folder on its own (a still): 18 identical X-rays in a row are never "frozen", and a
    soft (low-texture, not empty) image after sharper ones is not "empty" for want of the others' texture; a black
    one is still "blank". Offline the same, image by image, whatever folder (a class, a sub-folder) run is pointed at."""
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    same = _speckle(rng, 1)[0]
    for i in range(18):  # img0..img17 identical: a stream would call img15..img17 frozen
        _write(root / "a" / f"img{i}.png", same)
    _write(root / "a" / "img18.png", (100 + rng.integers(0, 8, (64, 64))).astype(np.uint8))  # texture ~2.6 of ~63
    for i, img in enumerate(_speckle(rng, 4)):
        _write(root / "a" / "more" / f"img{i}.png", img)
        _write(root / "b" / f"img{i}.png", img // 2)
    _write(root / "b" / "img4.png", np.zeros((64, 64), np.uint8))
    _write(root / "b" / "img5.png", np.zeros((64, 64), np.uint8))  # two identical black images: blank, not frozen
    ds = load_dataset(str(root), quality=True)
    ids = {f"{f.parent.relative_to(root).as_posix()}": sorted((p for p in f.parent.glob("*.png")), key=lambda p: int(p.stem[3:]))
           for f in root.rglob("*.png")}
    for folder, files in ids.items():
        run = _runs_quality_reasons(tmp_path, root / folder)
        assert run == [ds.abstain.get(p.relative_to(root).as_posix(), "") for p in files], (folder, run)
    assert ds.abstain == {"b/img4.png": "blank", "b/img5.png": "blank"}


def test_images_a_split_list_leaves_out_do_not_change_how_the_kept_ones_are_gated(tmp_path: Path) -> None:
    """Run reads every image of a folder, also the copies a split list leaves out, but judges each alone: img1..img16
    (copies of img0, left out) do not make img17 (one pixel apart: kept) "frozen", offline or in run."""
    from edgeclf.data import make_split_list

    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    same = _speckle(rng, 1)[0]
    for i in range(17):
        _write(root / "a" / f"img{i}.png", same)
    near = same.copy()
    near[0, 0] ^= 1
    _write(root / "a" / "img17.png", near)
    for i, img in enumerate(_speckle(rng, 8)):
        _write(root / ("a" if i < 4 else "b") / f"z{i}.png", img)
    rows, _ = make_split_list(f"{root}?dedup=near")
    assert sum(r[2] == "duplicate" for r in rows) == 16
    lst = tmp_path / "list.csv"
    lst.write_text("path,sha256,split,group\n" + "".join(",".join(r) + "\n" for r in rows))
    ds = load_dataset(f"{root}?split={lst}", quality=True)
    assert ds.abstain == {} and "a/img17.png" in ds.split("all").ids
    run = _runs_quality_reasons(tmp_path, root / "a")
    assert run == [""] * len(run) and len(run) == 22


def test_a_missing_split_list_file_names_the_committed_lists(tmp_path: Path) -> None:
    """A .csv path that does not exist listed the .csv files of ITS folder as the "committed" lists ("none" where it
    had none): the committed lists are those under edgeclf/recipe_files/splits."""
    from edgeclf.data import read_split_list

    (tmp_path / "other.csv").write_text("path,sha256,split,group\n")
    for missing in (tmp_path / "typo.csv", tmp_path / "gone" / "list.csv"):
        with pytest.raises(DataError) as exc:
            read_split_list(str(missing))
        msg = _one_line(exc)
        assert "does not exist" in msg and "brain-mri" in msg and "busi" in msg and "other" not in msg, msg
    with pytest.raises(DataError) as exc:
        read_split_list("no-such-list")
    assert "committed: brain-mri, busi" in _one_line(exc)


# -- the training data's identity: a split list by content, the files alone ------------------------------------------

def _listed_tree(root: Path, lst: Path, seed: int = 0, seed0: int = 0) -> Path:
    """An image tree under root (images from `seed0` on) and a split list of it (drawn with `seed`) at `lst`."""
    _image_tree(root, {"benign": 10, "malignant": 10}, seed0=seed0)
    rows, _ = make_split_list(str(root), seed=seed)
    lst.parent.mkdir(parents=True, exist_ok=True)
    return _write_list(rows, lst)


def test_a_split_list_file_is_the_same_data_at_another_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The list's path as typed was part of the data hash: the same files and the same list elsewhere (another machine,
    or the list given relative from another folder) were refused as changed data. A bundle records only the list's
    file name, so its model could never be evaluated, exported or pruned elsewhere."""
    import logging

    from edgeclf.data import load_training_data, require_training_data, spec_name

    ws = tmp_path / "workstation" / "busi"
    lst = _listed_tree(ws, tmp_path / "workstation" / "lists" / "busi.csv")
    trained = load_dataset(f"{ws}?split={lst}")
    dev = shutil.copytree(ws, tmp_path / "device" / "busi")
    lst2 = tmp_path / "device" / "lists" / "busi.csv"
    lst2.parent.mkdir(parents=True)
    shutil.copy(lst, lst2)
    monkeypatch.chdir(tmp_path / "device")
    for given in (f"{dev}?split={lst2}", "busi?split=lists/busi.csv"):
        ds = load_dataset(given)
        assert ds.data_hash == trained.data_hash and ds.split("test").ids == trained.split("test").ids
        for recorded in ({"name": spec_name(trained.spec), "hash": trained.data_hash},  # a bundle's record
                         {"spec": trained.spec, "name": trained.name, "hash": trained.data_hash}):  # run.json's
            assert load_training_data(given, recorded, load_dataset, data_given=given, use="x").data_hash == ds.data_hash
    # Another list's content under the same name is still other data.
    _write_list([(p, h, {"train": "test", "test": "train"}.get(s, s), g) for p, h, s, g in
                 make_split_list(str(ws), seed=0)[0]], lst2)
    assert load_dataset(f"{dev}?split={lst2}").data_hash != trained.data_hash
    # A run recorded while the path was hashed too (its list's contents with it) still matches, with no warning.
    again = load_dataset(f"{ws}?split={lst}")
    assert again.path_hash and again.path_hash != again.data_hash
    with caplog.at_level(logging.WARNING, logger="edgeclf"):
        require_training_data(again, {"name": again.name, "hash": again.path_hash}, data_given=None, use="x")
    assert not caplog.records


def _bmp(path: Path, img: np.ndarray) -> None:
    """An 8-bit gray BMP written byte for byte here (no encoder version in its bytes): a hash over it can be pinned."""
    import struct

    h, w = img.shape
    row = (w + 3) // 4 * 4
    pixels = b"".join(img[y].tobytes() + b"\0" * (row - w) for y in range(h - 1, -1, -1))
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    off = 14 + 40 + len(palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"BM" + struct.pack("<IHHI", off + len(pixels), 0, 0, off)
                     + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 0, len(pixels), 2835, 2835, 256, 0) + palette + pixels)


def test_a_committed_split_list_keeps_the_data_hash_recorded_before(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A list named by its committed name (`split=busi`) is the same everywhere: its data keeps the hash the committed
    recipes' runs and bundles recorded (pinned: computed by edgeclf before split lists were hashed by content)."""
    import edgeclf.data as data

    for c, cls in enumerate(("benign", "malignant")):
        for i in range(6):
            _bmp(tmp_path / "d" / cls / f"case{i}.bmp", _gray(100 * c + i, 8, 8))
    rows, _ = make_split_list(str(tmp_path / "d"), seed=0)
    monkeypatch.setattr(data, "_COMMITTED_SPLITS", tmp_path / "splits")
    (tmp_path / "splits").mkdir()
    _write_list(rows, tmp_path / "splits" / "mine.csv")
    ds = load_dataset(f"{tmp_path / 'd'}?split=mine")
    assert ds.data_hash == "930aae90e8124b9b13cdd59f06a5b94d69192c8827cff9100f7b6dc7a00bf2f1"


def _record(ds: Dataset, classes: str | None = None) -> dict[str, object]:
    """What run.json records of a model's data (the parts identity is told by)."""
    return {"spec": ds.spec, "name": ds.name, "hash": ds.data_hash, "files_hash": ds.files_hash, "classes": classes}


def test_the_training_files_under_another_split_list_are_refused_for_a_held_out_split(tmp_path: Path) -> None:
    """A model trained on busi's seeded split, evaluated with `--data busi?split=other.csv`, passed as other data with
    its own split, though that list's test split holds training images: the files are known by their own hash."""
    from edgeclf.data import require_training_data

    root = tmp_path / "busi"
    lst = _listed_tree(root, tmp_path / "other.csv", seed=7)
    trained = load_dataset(str(root), seed=0)  # as `edgeclf train --data busi`
    given = f"{root}?split={lst}"
    ds = load_dataset(given)
    assert set(ds.split("test").ids) & set(trained.split("train").ids)  # the list's test split holds training images
    with pytest.raises(DataError) as exc:
        require_training_data(ds, _record(trained), data_given=given, use="its test split is not the held-out one")
    msg = _one_line(exc)
    assert "holds the files the model was trained on" in msg and "other.csv" in msg, msg
    assert f"--data {root})" in msg, msg  # how to evaluate on the held-out split as trained
    # Trained with a list: another list over its files is refused too, and the way back names the list to give.
    trained2 = load_dataset(given)
    other = _write_list(make_split_list(str(root), seed=3)[0], tmp_path / "third.csv")
    with pytest.raises(DataError) as exc:
        require_training_data(load_dataset(f"{root}?split={other}"), _record(trained2), data_given=f"{root}?split={other}",
                              use="x")
    assert f"--data '{root}?split={lst}')" in _one_line(exc)  # run.json's list path, where it still is
    # A run recorded before files_hash: as before, other data with its own split.
    require_training_data(ds, {k: v for k, v in _record(trained).items() if k != "files_hash"}, data_given=given, use="x")
    # Other files with a list of their own: passed.
    new = tmp_path / "new"
    lst_new = _listed_tree(new, tmp_path / "new.csv", seed0=500)
    require_training_data(load_dataset(f"{new}?split={lst_new}"), _record(trained), data_given=str(new), use="x")


def test_new_data_with_its_own_split_is_read_once(tmp_path: Path) -> None:
    """A model trained with options, given new data with its own train/ val/ test/ folders plainly: the folder was read
    twice (a trial with the recorded options, thrown away; for clips each reading decodes every clip). Where the run
    recorded its files' hash, other files are known without decoding. The training files under another name are still
    read once, with the recorded options, clips and a class map that drops a folder included."""
    from edgeclf.data import load_training_data

    calls: list[str] = []

    def counting(classes: str | None = None):  # noqa: ANN202
        def load(spec: str) -> Dataset:
            calls.append(spec)
            return load_dataset(spec, classes=classes)
        return load

    # Images, trained with shares.
    busi = tmp_path / "busi"
    _image_tree(busi, {"a": 8, "b": 8})
    recorded = _record(load_dataset(f"{busi}?test=0.3&val=0.3"))
    ext = tmp_path / "ext"
    for s in SPLITS:
        _image_tree(ext / s, {"a": 2, "b": 2}, seed0=500 + 10 * len(s))
    ds = load_training_data(str(ext), recorded, counting(), data_given=str(ext), use="x")
    assert calls == [str(ext)] and ds.split("test").ids
    calls.clear()
    copy = shutil.copytree(busi, tmp_path / "copy")
    ds = load_training_data(str(copy), recorded, counting(), data_given=str(copy), use="x")
    assert calls == [f"{copy}?test=0.3&val=0.3"] and ds.data_hash == recorded["hash"]
    # Clips, trained with frames=2 and a class map that leaves a class out; a hidden file beside them.
    clips = tmp_path / "clips"
    for cls in ("covid", "regular", "other"):
        for k in range(3):
            _write_clip(clips / cls / f"c{k}.avi", 4)
    _write_clip(clips / "covid" / ".c9.avi", 4)
    classes = "covid,regular"
    recorded = _record(load_dataset(f"{clips}?frames=2", classes=classes), classes)
    calls.clear()
    copy = shutil.copytree(clips, tmp_path / "clips-copy")
    ds = load_training_data(str(copy), recorded, counting(classes), data_given=str(copy), use="x")
    assert calls == [f"{copy}?frames=2"] and ds.data_hash == recorded["hash"]
    calls.clear()
    ext = tmp_path / "clips-ext"
    for s in SPLITS:
        for cls in ("covid", "regular"):
            _write_clip(ext / s / cls / "c.avi", 4)
    load_training_data(str(ext), recorded, counting(classes), data_given=str(ext), use="x")
    assert calls == [str(ext)]
    # New data without a split of its own: refused, never decoded.
    calls.clear()
    plain = tmp_path / "plain"
    _image_tree(plain, {"a": 4, "b": 4}, seed0=900)
    with pytest.raises(DataError) as exc:
        load_training_data(str(plain), _record(load_dataset(f"{busi}?test=0.3&val=0.3")), counting(), data_given=str(plain),
                           use="x")
    assert "not, by content, the data the model was trained on" in _one_line(exc) and calls == []


def test_the_training_files_whose_split_list_is_not_here_say_how_to_give_it(tmp_path: Path) -> None:
    """A bundle records its split list by file name (split=busi.csv): on another machine the folder given plainly cannot
    be read as trained without the list. The refusal says to give the list's path."""
    from edgeclf.data import load_training_data, spec_name

    ws = tmp_path / "ws" / "busi"
    lst = _listed_tree(ws, tmp_path / "ws" / "lists" / "busi.csv")
    trained = load_dataset(f"{ws}?split={lst}")
    dev = shutil.copytree(ws, tmp_path / "device" / "busi")
    bundle = {"name": spec_name(trained.spec), "hash": trained.data_hash, "files_hash": trained.files_hash}
    with pytest.raises(DataError) as exc:
        load_training_data(str(dev), bundle, load_dataset, data_given=str(dev), use="x")
    msg = _one_line(exc)
    assert "holds the files the model was trained on" in msg and "busi.csv) is not found here" in msg, msg
    assert f"--data '{dev}?split=/path/to/busi.csv'" in msg, msg
    # An older bundle (no files_hash): the same way to give it.
    with pytest.raises(DataError) as exc:
        load_training_data(str(dev), {k: v for k, v in bundle.items() if k != "files_hash"}, load_dataset,
                           data_given=str(dev), use="x")
    assert "--data 'DIR?split=/path/to/busi.csv'" in _one_line(exc)
    # Given so, it is the training data.
    ds = load_training_data(f"{dev}?split={lst}", bundle, load_dataset, data_given=f"{dev}?split={lst}", use="x")
    assert ds.split("test").ids == trained.split("test").ids
