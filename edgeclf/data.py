"""Data sets behind one interface: `load_dataset(spec) -> Dataset` with train/val/test splits.

Specs:
- `synthetic:ultrasound` / `synthetic:xray` (query `?n=900&size=128&seed=0`): seeded phantoms.
- a MedMNIST `.npz` (its official train/val/test split).
- a class-per-folder image tree, with optional `train/ val/ test/` folders; otherwise a seeded,
  stratified split in which byte-identical files are grouped so copies never straddle splits.
- a class-per-folder tree of video clips: clip-level labels, frames sampled per clip, split by clip.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection
from urllib.parse import parse_qsl

import numpy as np

from edgeclf.errors import DataError, SourceError
from edgeclf.runtime.sources import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, decode_image, natural_key

__all__ = ["Dataset", "Split", "load_dataset", "parse_class_map", "spec_name", "SPLITS", "IMAGE_EXTS", "VIDEO_EXTS"]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
# The runtime sources' extensions: a data set reads exactly the files a device can be fed.
IMAGE_EXTS = IMAGE_EXTENSIONS
VIDEO_EXTS = VIDEO_EXTENSIONS
# Known MedMNIST files: label names and the clinically positive class.
_MEDMNIST = {
    "breastmnist": (["malignant", "normal_or_benign"], "malignant", "MedMNIST v2 (CC BY 4.0)"),
    "pneumoniamnist": (["normal", "pneumonia"], "pneumonia", "MedMNIST v2 (CC BY 4.0)"),
}


@dataclass
class Split:
    """Raw images, (H, W) gray or (H, W, 3) RGB uint8; labels (N,) int64 or (N, K) uint8 multi-hot."""

    images: list[np.ndarray]
    labels: np.ndarray
    ids: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Dataset:
    spec: str
    kind: str  # synthetic | medmnist | images | clips
    task: str  # binary | multiclass | multilabel
    labels: list[str]
    splits: dict[str, Split]
    data_hash: str
    positive: str | None = None
    licence: str | None = None
    channels_hint: int = 1
    modality: str = "generic"  # ultrasound | xray | generic: picks the augmentation
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The spec without workstation paths (see `spec_name`); `spec` stays absolute for export and evaluate."""
        return spec_name(self.spec)

    def split(self, name: str) -> Split:
        if name == "all":
            parts = [self.splits[s] for s in SPLITS if s in self.splits]
            return Split(
                images=[im for p in parts for im in p.images],
                labels=np.concatenate([p.labels for p in parts]),
                ids=[i for p in parts for i in p.ids],
                groups=[g for p in parts for g in p.groups],
            )
        if name not in self.splits or len(self.splits[name]) == 0:
            have = ", ".join(s for s in self.splits if len(self.splits[s])) or "none"
            raise DataError(f"data set {self.spec} has no {name!r} split (it has: {have}); use --split all or one of those")
        return self.splits[name]

    def split_lists(self) -> dict[str, list[str]]:
        return {name: list(s.ids) for name, s in self.splits.items()}


def spec_name(spec: str) -> str:
    """A data spec without workstation paths, for provenance: `synthetic:...` as given, else the last
    path component (`breastmnist.npz`, `pocus`)."""
    if spec.startswith("synthetic:"):
        return spec
    return Path(spec).name or spec


def parse_class_map(text: str | None) -> list[tuple[str, list[str]]] | None:
    """`a,b=x+y,c` -> [("a", ["a"]), ("b", ["x", "y"]), ("c", ["c"])]; classes not named are dropped."""
    if not text:
        return None
    out: list[tuple[str, list[str]]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, members = part.partition("=")
        srcs = [m.strip() for m in members.split("+")] if members else [name.strip()]
        if not name.strip() or not all(srcs):
            raise DataError(f"--classes entry {part!r} is malformed; use name or name=src1+src2, comma-separated")
        out.append((name.strip(), srcs))
    names = [n for n, _ in out]
    if len(set(names)) != len(names) or len(out) < 2:
        raise DataError(f"--classes {text!r} must name at least 2 distinct classes")
    return out


def _apply_class_map(labels: list[str], class_map, where: str) -> tuple[list[str], dict[str, int]]:
    """Returns (new label names, old name -> new index) with dropped classes absent."""
    if class_map is None:
        return list(labels), {n: i for i, n in enumerate(labels)}
    lookup: dict[str, int] = {}
    for i, (_, srcs) in enumerate(class_map):
        for s in srcs:
            if s not in labels:
                raise DataError(f"--classes names {s!r}, which {where} does not have; it has: {', '.join(labels)}")
            if s in lookup:
                raise DataError(f"--classes maps {s!r} twice")
            lookup[s] = i
    return [n for n, _ in class_map], lookup


def _hash_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def load_dataset(
    spec: str,
    *,
    classes: str | None = None,
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    frames_per_clip: int = 8,
) -> Dataset:
    class_map = parse_class_map(classes)
    if frames_per_clip < 1:
        raise DataError(f"frames per clip is {frames_per_clip}; sample at least 1 frame per clip")
    if spec.startswith("synthetic:"):
        return _load_synthetic(spec, class_map)
    # Recorded as an absolute path so that export and evaluate find the data from any folder.
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise DataError(f"data path {spec} does not exist; give an image folder, a clips folder, a MedMNIST .npz or synthetic:ultrasound|xray")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"data file {spec} is not a MedMNIST .npz; give an .npz, a folder, or synthetic:ultrasound|xray")
        return _load_npz(path, class_map)
    return _load_folder(path, class_map, seed=seed, val_frac=val_frac, test_frac=test_frac, frames_per_clip=frames_per_clip)


# -- synthetic ---------------------------------------------------------------------------------

def _load_synthetic(spec: str, class_map) -> Dataset:
    from edgeclf.runtime import synthetic as syn

    kind, _, query = spec[len("synthetic:"):].partition("?")
    try:
        params = {k: int(v) for k, v in parse_qsl(query, strict_parsing=bool(query))}
    except ValueError:
        raise DataError(f"data spec {spec!r} has a malformed query; use e.g. synthetic:ultrasound?n=900&size=128&seed=0") from None
    bad = set(params) - {"n", "size", "seed"}
    if bad:
        raise DataError(f"data spec {spec!r} has unknown parameter(s) {sorted(bad)}; allowed: n, size, seed")
    n, size, seed = params.get("n", 900), params.get("size", 128), params.get("seed", 0)
    if n < 30 or not 32 <= size <= 1024 or seed < 0:
        raise DataError(f"data spec {spec!r}: n must be >= 30, size 32..1024 and seed >= 0")
    if kind == "ultrasound":
        images, labels = syn.make_ultrasound(n, size=size, seed=seed)
        names, task, modality = list(syn.ULTRASOUND_CLASSES), "multiclass", "ultrasound"
    elif kind == "xray":
        images, labels = syn.make_xray(n, size=size, seed=seed)
        names, task, modality = list(syn.XRAY_FINDINGS), "multilabel", "xray"
    else:
        raise DataError(f"synthetic data {kind!r} is unknown; allowed: synthetic:ultrasound, synthetic:xray")
    if class_map is not None:
        raise DataError("--classes does not apply to synthetic data; leave it out")
    n_test = n_val = int(round(n * 0.15))
    cut = {"test": (0, n_test), "val": (n_test, n_test + n_val), "train": (n_test + n_val, n)}
    splits = {
        s: Split(
            images=list(images[a:b]),
            labels=labels[a:b].astype(np.int64 if task != "multilabel" else np.uint8),
            ids=[f"{kind}-{seed}-{i}" for i in range(a, b)],
            groups=[f"{i}" for i in range(a, b)],
        )
        for s, (a, b) in cut.items()
    }
    return Dataset(
        spec=spec, kind="synthetic", task=task, labels=names, splits=splits,
        data_hash=_hash_bytes(images.tobytes(), labels.tobytes()), licence="synthetic (generated by edgeclf)",
        modality=modality,
    )


# -- MedMNIST npz ------------------------------------------------------------------------------

def _load_npz(path: Path, class_map) -> Dataset:
    try:
        npz = np.load(path, allow_pickle=False)
        arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError
        raise DataError(f"{path} could not be read as an .npz ({exc}); give a MedMNIST .npz") from None
    need = [f"{s}_{w}" for s in SPLITS for w in ("images", "labels")]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks the MedMNIST arrays {missing} (it has {sorted(arrays)}); expected train/val/test _images and _labels"
        )
    stem = path.stem.lower().split("_")[0]
    multilabel = arrays["train_labels"].ndim == 2 and arrays["train_labels"].shape[1] > 1
    ys = {s: arrays[f"{s}_labels"] for s in SPLITS}
    given = [str(v) for v in arrays["label_names"]] if "label_names" in arrays else None
    if multilabel and class_map is not None:
        raise DataError(f"--classes does not apply to multilabel data; {path} has {ys['train'].shape[1]} label columns, leave it out")
    if multilabel:
        n_lab = ys["train"].shape[1]
        if any(not np.isin(y, (0, 1)).all() for y in ys.values()):
            raise DataError(f"{path}: multilabel labels must be 0/1 multi-hot")
        ys = {s: y.astype(np.uint8) for s, y in ys.items()}
        names, task, positive = given or [f"label{i}" for i in range(n_lab)], "multilabel", None
        if len(names) != n_lab:
            raise DataError(f"{path}: label_names has {len(names)} entries for {n_lab} label columns")
    else:
        ys = {s: y.reshape(len(y), -1)[:, 0].astype(np.int64) for s, y in ys.items()}
        values = sorted(set(np.concatenate(list(ys.values())).tolist()))
        if values != list(range(len(values))):
            raise DataError(f"{path} labels are {values}; expected 0..K-1")
        if given is not None and len(given) == len(values):
            names, positive = given, None
        elif stem in _MEDMNIST and len(_MEDMNIST[stem][0]) == len(values):
            names, positive = list(_MEDMNIST[stem][0]), _MEDMNIST[stem][1]
        else:
            names, positive = [str(v) for v in values], None
        task = "binary" if len(values) == 2 else "multiclass"
    splits: dict[str, Split] = {}
    for s in SPLITS:
        imgs = arrays[f"{s}_images"]
        if imgs.dtype != np.uint8 or imgs.ndim not in (3, 4):
            raise DataError(f"{path}: {s}_images is {imgs.dtype}{imgs.shape}; expected uint8 (N, H, W[, 3])")
        if len(imgs) != len(ys[s]):
            raise DataError(f"{path}: {s}_images has {len(imgs)} items but {s}_labels {len(ys[s])}")
        splits[s] = Split(images=list(imgs), labels=ys[s], ids=[f"{s}/{i}" for i in range(len(imgs))], groups=[f"{s}/{i}" for i in range(len(imgs))])
    if class_map is not None:
        new_names, lookup = _apply_class_map(names, class_map, str(path))
        for s, sp in splits.items():
            keep = [i for i, y in enumerate(sp.labels) if names[y] in lookup]
            splits[s] = Split(
                images=[sp.images[i] for i in keep],
                labels=np.array([lookup[names[sp.labels[i]]] for i in keep], np.int64),
                ids=[sp.ids[i] for i in keep], groups=[sp.groups[i] for i in keep],
            )
        names = new_names
        positive = positive if positive in names else None
        task = "binary" if len(names) == 2 else "multiclass"
    channels = 3 if arrays["train_images"].ndim == 4 else 1
    licence = _MEDMNIST[stem][2] if stem in _MEDMNIST else None
    with open(path, "rb") as f:
        digest = _hash_bytes(f.read(), repr(class_map).encode())
    return Dataset(
        spec=str(path), kind="medmnist", task=task, labels=names, splits=splits, data_hash=digest,
        positive=positive, licence=licence, channels_hint=channels,
        modality="xray" if "pneumonia" in stem or "chest" in stem else "generic",
    )


# -- folders -------------------------------------------------------------------------------------

def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name))


def _files(d: Path, exts: Collection[str]) -> list[Path]:
    # Hidden files (macOS "._x.png" forks, editor droppings) are not images of the data set.
    return sorted(
        (p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")),
        key=lambda p: natural_key(str(p)),
    )


def _read_image(path: Path) -> np.ndarray:
    """Decoded by the runtime's image source (16-bit scaling, alpha, RGB order), gray kept 1-channel."""
    try:
        img, _ = decode_image(str(path), where=f"image {path}")
    except SourceError as exc:
        raise DataError(str(exc)) from None
    return _gray_if_equal(img)


def _gray_if_equal(img: np.ndarray) -> np.ndarray:
    """Gray images stored as RGB stay 1-channel: a model should not need 3 for them."""
    if img.ndim == 3 and np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 1], img[:, :, 2]):
        return np.ascontiguousarray(img[:, :, 0])
    return img


def _load_folder(root: Path, class_map, *, seed: int, val_frac: float, test_frac: float, frames_per_clip: int) -> Dataset:
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if split_dirs and not (root / "train").is_dir():
        raise DataError(f"{root} has {', '.join(p.name for p in split_dirs)} but no train/ folder; add it or remove the split folders")
    tops = split_dirs or [root]
    class_names: list[str] = []
    for top in tops:
        for d in _class_dirs(top):
            if d.name not in class_names:
                class_names.append(d.name)
    if len(class_names) < 2:
        raise DataError(f"{root} holds {len(class_names)} class folder(s); expected one folder per class (at least 2)")
    all_files = {d: _files(d, IMAGE_EXTS + VIDEO_EXTS) for top in tops for d in _class_dirs(top)}
    n_video = sum(1 for fs in all_files.values() for f in fs if f.suffix.lower() in VIDEO_EXTS)
    n_image = sum(1 for fs in all_files.values() for f in fs if f.suffix.lower() in IMAGE_EXTS)
    if n_video == 0 and n_image == 0:
        raise DataError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_EXTS))}) or videos in them")
    is_clips = n_video > n_image
    names, lookup = _apply_class_map(class_names, class_map, str(root))
    # (relative id, group key, label, loader)
    items: dict[str, list[tuple[str, str, int, list[np.ndarray]]]] = defaultdict(list)
    digest = hashlib.sha256(repr(class_map).encode())
    skipped = 0
    for top in tops:
        split_name = top.name if split_dirs else "pool"
        for d in _class_dirs(top):
            if d.name not in lookup:
                continue
            for f in all_files[d]:
                is_video = f.suffix.lower() in VIDEO_EXTS
                if is_video != is_clips:
                    skipped += 1
                    continue
                rel = f.relative_to(root).as_posix()
                raw = f.read_bytes()
                h = _hash_bytes(raw)
                digest.update(f"{rel}:{h}:{d.name}\n".encode())
                frames = _sample_clip(f, frames_per_clip) if is_clips else [_read_image(f)]
                # Exact copies share a group so that they land on one side of the split.
                group = rel if is_clips else h
                items[split_name].append((rel, group, lookup[d.name], frames))
    notes = []
    if skipped:
        notes.append(f"ignored {skipped} {'image' if is_clips else 'video'} file(s) in a {'clip' if is_clips else 'image'} data set")
        log.warning(notes[-1])
    if split_dirs:
        splits = {s: _to_split(items.get(s, [])) for s in SPLITS}
    else:
        splits = _grouped_split(items["pool"], len(names), seed=seed, val_frac=val_frac, test_frac=test_frac)
        n_dupes = len(items["pool"]) - len({g for _, g, _, _ in items["pool"]})
        if n_dupes:
            notes.append(f"{n_dupes} exact duplicate file(s) grouped with their copies before splitting")
    licence = _clip_licences(root) if is_clips else None
    channels = 3 if any(im.ndim == 3 for s in splits.values() for im in s.images[:200]) else 1
    return Dataset(
        spec=str(root), kind="clips" if is_clips else "images", task="binary" if len(names) == 2 else "multiclass",
        labels=names, splits=splits, data_hash=digest.hexdigest(), licence=licence, channels_hint=channels,
        modality="ultrasound" if is_clips else "generic", notes=notes,
    )


def _sample_clip(path: Path, k: int) -> list[np.ndarray]:
    """k frames evenly spaced over the clip, decoded through the runtime's own video source."""
    from edgeclf.runtime.sources import open_source

    try:
        with open_source(str(path)) as src:
            frames = [f.image for f in src]
    except Exception as exc:
        raise DataError(f"clip {path} could not be decoded ({exc}); remove or re-encode it") from None
    if not frames:
        raise DataError(f"clip {path} has no decodable frames; remove or re-encode it")
    idx = np.unique(np.linspace(0, len(frames) - 1, num=min(k, len(frames))).round().astype(int))
    return [_gray_if_equal(frames[i]) for i in idx]


def _to_split(rows: list[tuple[str, str, int, list[np.ndarray]]]) -> Split:
    images, labels, ids, groups = [], [], [], []
    for rel, group, label, frames in rows:
        for j, im in enumerate(frames):
            images.append(im)
            labels.append(label)
            ids.append(rel if len(frames) == 1 else f"{rel}#{j}")
            groups.append(group)
    return Split(images=images, labels=np.asarray(labels, np.int64), ids=ids, groups=groups)


def _grouped_split(rows, n_classes: int, *, seed: int, val_frac: float, test_frac: float) -> dict[str, Split]:
    """Stratified by class over groups (duplicate sets or clips), seeded."""
    if not 0 < val_frac < 1 or not 0 < test_frac < 1 or val_frac + test_frac >= 1:
        raise DataError(f"split fractions val={val_frac} test={test_frac} must be in (0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, (_, g, _, _) in enumerate(rows):
        by_group[g].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g, idx in sorted(by_group.items()):
        by_class[rows[idx[0]][2]].append(g)
    assign: dict[str, str] = {}
    for c in range(n_classes):
        gs = by_class.get(c, [])
        order = [gs[i] for i in rng.permutation(len(gs))]
        n_test = int(round(len(gs) * test_frac))
        n_val = int(round(len(gs) * val_frac))
        if len(gs) >= 3:
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        for j, g in enumerate(order):
            assign[g] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    parts: dict[str, list] = {s: [] for s in SPLITS}
    for row in rows:
        parts[assign[row[1]]].append(row)
    return {s: _to_split(parts[s]) for s in SPLITS}


def _clip_licences(root: Path) -> str | None:
    csv_path = root / "clips.csv"
    if not csv_path.is_file():
        return None
    import csv

    with open(csv_path, newline="", encoding="utf-8") as f:
        lic = sorted({(row.get("license") or "").strip() for row in csv.DictReader(f)} - {""})
    return "per clip: " + "; ".join(lic) if lic else None
