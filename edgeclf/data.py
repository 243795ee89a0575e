"""Data sets behind one interface: `load_dataset(spec) -> Dataset` with train/val/test splits.

Specs:
- `synthetic:ultrasound` / `synthetic:xray` (query `?n=900&size=128&seed=0`): seeded phantoms.
- a MedMNIST `.npz` (its official train/val/test split).
- a class-per-folder image tree, with optional `train/ val/ test/` folders; otherwise a seeded,
  stratified split in which byte-identical files are grouped so copies never straddle splits.
- a class-per-folder tree of video clips: clip-level labels, frames sampled per clip, split by clip (or, with
  `group=source|site`, by clips.csv source).

Folder specs take options as a query, so that a training run's recorded spec rebuilds exactly its split
everywhere (evaluate, export, prune): `DIR?dedup=near&test=0.2&val=0.1`, `DIR?split=brain-mri` (a
committed split list), `DIR?roi=sector&frames=16` (clips), `DIR?group=source` (clips), `DIR?folds=5&fold=2&group=source`. See
`FolderOptions`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Collection, Mapping
from urllib.parse import parse_qsl

import numpy as np

from edgeclf.errors import DataError, SourceError
from edgeclf.runtime.sources import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, decode_image, natural_key

__all__ = ["Dataset", "Split", "load_dataset", "load_folds", "make_split_list", "read_split_list", "with_options", "parse_class_map", "spec_name", "split_spec", "FolderOptions",
           "check_option_table", "check_spec_options", "require_training_data", "load_training_data", "defines_split",
           "recorded_options", "near_hash", "classified_rows", "abstain_counts", "none_classified", "classify_fix",
           "known_npz", "split_ids", "SPLITS", "IMAGE_EXTS", "VIDEO_EXTS", "MODALITIES"]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
FRAMES_PER_CLIP = 8  # clips: frames sampled per clip unless the caller or the spec (frames=N) says otherwise
# The runtime sources' extensions: a data set reads exactly the files a device can be fed.
IMAGE_EXTS = IMAGE_EXTENSIONS
VIDEO_EXTS = VIDEO_EXTENSIONS
MODALITIES = ("ultrasound", "xray", "generic")  # Dataset.modality; an .npz may record its own (a `modality` array)


@dataclass(frozen=True)
class _Known:
    """A MedMNIST set known by its content: label names, clinically positive class, licence and modality."""

    title: str
    labels: tuple[str, ...]
    positive: str
    licence: str
    modality: str
    counts: dict[str, tuple[int, int]]  # MedMNIST v2's official split: per split, images of label 0 and of label 1


_MEDMNIST = {
    # Breast ultrasound, yet "generic": the augmentation BreastMNIST has always had by default, which the committed
    # figures (README, benchmarks, test_real_data) were trained with; the breast-us recipe asks for "ultrasound".
    "breastmnist": _Known("BreastMNIST", ("malignant", "normal_or_benign"), "malignant", "MedMNIST v2 (CC BY 4.0)",
                          "generic", {"train": (147, 399), "val": (21, 57), "test": (42, 114)}),
    "pneumoniamnist": _Known("PneumoniaMNIST", ("normal", "pneumonia"), "pneumonia", "MedMNIST v2 (CC BY 4.0)", "xray",
                             {"train": (1214, 3494), "val": (135, 389), "test": (234, 390)}),
}
# Files known by their bytes (sha256): the copies in ../shared/data. Its PneumoniaMNIST is a class-balanced re-split,
# which the official counts above do not match.
_MEDMNIST_SHA256 = {
    "5e68d79723fb3a63a399b0a66b66451799fc2eb3651f469cec0b679cfd743b68": "breastmnist",
    "f36c2b3e34de9d60c5c734118bc6daff281eaf76b67a57d26ad958da948274b0": "pneumoniamnist",
}
_MEDMNIST_SIDES = (28, 64, 128, 224)  # MedMNIST v2 (28 px) and MedMNIST+ image sizes
_NPZ_ARRAYS = tuple(f"{s}_{w}" for s in ("train", "val", "test") for w in ("images", "labels"))
# ChestMNIST (multilabel, 14 findings): its official split's sizes, for its modality only (its labels stay unnamed).
_CHESTMNIST_SIZES = {"train": 78468, "val": 11219, "test": 22433}


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
    # clips: clip id -> where it came from (clips.csv original_source, reduced to its site; the unit of group=site).
    # Both maps join byte-identical clips with their copy's source (sources joined by " + "; `_units`), so that
    # intervals resample the units the split keeps whole; a clip without a source: its copy group.
    sources: dict[str, str] = field(default_factory=dict)
    # clips: clip id -> clips.csv original_source as written (the unit of group=source)
    clip_source: dict[str, str] = field(default_factory=dict)
    # The hash this data had before a split list's assignments and frames_per_clip were hashed, or (group=source|site
    # with a clips.csv) before its sources were (None where it is data_hash): a run recorded then still matches it
    # (`require_training_data`).
    former_hash: str | None = None
    # A split list given as a file: the hash its data had while the list's path (as typed) was hashed beside its
    # contents (None otherwise). Now only the contents are (the same list elsewhere is the same data); a run recorded
    # then matches it, its list's contents checked (`require_training_data`).
    path_hash: str | None = None
    # Folders: the hash of the files alone (names, bytes, classes; the scan's hash before options and split lists), which
    # run.json and bundles record as data.files_hash: the training files under another split are known by it.
    files_hash: str | None = None
    # clips and image folders: frame (image) id -> why `edgeclf run` would abstain on it before classifying it, as its
    # records' abstain_reason (clips: "sector_warmup"; with load_dataset(quality=True) also the quality gate's reasons
    # or "frame_error"); frames it classifies are absent. Evaluate and training's test figures abstain on them; training
    # still learns from every sampled frame (the frames and the data hash do not depend on it).
    abstain: dict[str, str] = field(default_factory=dict)
    # A binary .npz without a clinically positive class: why it has none ("not a MedMNIST file known by its content",
    # the class map renamed it, ...), which training says where it falls back to the second class (None otherwise).
    positive_unknown: str | None = None

    @property
    def sector_crops(self) -> bool:
        """Whether every frame was cropped to the ultrasound sector (clips `?roi=sector`): a model trained on it must
        be fed sector crops too (recorded as `preprocess.sector`)."""
        return self.kind == "clips" and split_spec(self.spec)[1].roi == "sector"

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


_PATH_SEP = re.compile(r"[/\\]")  # either separator: a list path typed on Windows too


def spec_name(spec: str) -> str:
    """A data spec without workstation paths, for provenance: `synthetic:...` as given, else the last
    path component (`breastmnist.npz`, `pocus`)."""
    if spec.startswith("synthetic:"):
        return spec
    base, _, query = spec.partition("?")
    name = Path(base).name or base
    # An option may name a file too (split=/data/PATIENT_X/list.csv): keep only its last component.
    parts = [k + eq + _PATH_SEP.split(v)[-1] for k, eq, v in (p.partition("=") for p in query.split("&") if p)]
    return f"{name}?{'&'.join(parts)}" if parts else name


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
    frames_per_clip: int = FRAMES_PER_CLIP,
    quality: bool = False,
) -> Dataset:
    """The data set of `spec`. `quality`: run `edgeclf run`'s quality gate over each clip's frames (folders of images:
    on each image alone, as run judges a still) and record the frames it would stop in `Dataset.abstain` (evaluate,
    train, export and prune: their calibration, gates and figures leave those frames out)."""
    class_map = parse_class_map(classes)
    if frames_per_clip < 1:
        raise DataError(f"frames per clip is {frames_per_clip}; sample at least 1 frame per clip")
    if spec.startswith("synthetic:"):
        return _load_synthetic(spec, class_map)
    base, opts = split_spec(spec)
    # Recorded as an absolute path so that export and evaluate find the data from any folder.
    path = Path(base).expanduser().resolve()
    kind = _path_kind(path)
    if kind is None:
        raise DataError(f"data path {_shown(spec)} does not exist; give an image folder, a clips folder, a MedMNIST .npz or synthetic:ultrasound|xray")
    if kind == "file":
        if opts != _DEFAULT_OPTIONS:
            raise DataError(f"data spec {spec!r}: options (?...) apply to folders; an .npz keeps its own split")
        if path.suffix.lower() != ".npz":
            raise DataError(f"data file {spec} is not a MedMNIST .npz; give an .npz, a folder, or synthetic:ultrasound|xray")
        return _load_npz(path, class_map)
    return _load_folder(path, class_map, seed=seed, val_frac=val_frac, test_frac=test_frac, frames_per_clip=frames_per_clip,
                        opts=opts, quality=quality)


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

def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
        arrays = {k: npz[k] for k in npz.files}
    except PermissionError as exc:
        raise DataError(f"cannot read {_shown(path)} ({exc.strerror}); fix its permissions or give another .npz") from None
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError
        raise DataError(f"{path} could not be read as an .npz ({exc}); give a MedMNIST .npz") from None
    missing = [k for k in _NPZ_ARRAYS if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks the MedMNIST arrays {missing} (it has {sorted(arrays)}); expected train/val/test _images and _labels"
        )
    return arrays


def _load_npz(path: Path, class_map) -> Dataset:
    arrays = _read_npz(path)
    file_sha, digest = _npz_hashes(path, class_map)
    shown = _shown(path.name)  # logs name the file, never its folder
    multilabel = arrays["train_labels"].ndim == 2 and arrays["train_labels"].shape[1] > 1
    ys = {s: arrays[f"{s}_labels"] for s in SPLITS}
    given = [str(v) for v in arrays["label_names"]] if "label_names" in arrays else None
    recorded = _recorded_modality(path, arrays)
    known: _Known | None = None
    from_name = False  # the known set was taken from the file name (its content is not one this package knows)
    names_known = False  # the class names (and positive class) are the known set's, not the file's label_names
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
        ints = {s: _integer_labels(y) for s, y in ys.items()}
        for s, y in ints.items():
            if y is None:
                raw = ys[s]
                raise DataError(f"{_shown(path.name)}: {s}_labels is {raw.dtype}{raw.shape}, not integer class indices; "
                                "expected one integer 0..K-1 per image (or 0/1 multi-hot columns); fix the labels")
        ys = {s: y for s, y in ints.items() if y is not None}
        counts, values = _label_counts(ys)
        if counts is None:
            shown_values = values[:10] + (["..."] if len(values) > 10 else [])
            raise DataError(f"{path} labels are {shown_values}; expected 0..K-1")
        known = _medmnist_by_content(file_sha, _heads(arrays), counts)
        if known is None:
            known = _medmnist_by_name(path, counts)
            from_name = known is not None
        if given is not None and len(given) == len(values):
            names, positive = given, None
        elif known is not None:
            names, positive = list(known.labels), known.positive
            names_known = True
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
    notes: list[str] = []
    known_positive = positive
    if class_map is not None:
        new_names, lookup = _apply_class_map(names, class_map, str(path))
        dropped = {n: sum(int((sp.labels == i).sum()) for sp in splits.values()) for i, n in enumerate(names) if n not in lookup}
        if sum(dropped.values()):
            notes.append(f"left out {sum(dropped.values())} item(s) of class(es) the class map does not name: "
                         + ", ".join(f"{n} ({k})" for n, k in dropped.items()))
            log.warning(notes[-1])
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
    licence = known.licence if known is not None else None
    name_hint = not recorded and known is None and _xray_by_name(path)
    if recorded:
        modality = recorded
    elif known is not None:
        modality = known.modality
    elif _xray_by_content(arrays, multilabel, given) or name_hint:
        modality = "xray"
    else:
        modality = "generic"
    # One line when identity or augmentation came from the file name. A fallback positive class is said by training
    # alone (`positive_unknown`), where --positive is known: evaluate and export read this file too.
    not_known = "not a MedMNIST file known by its content (neither MedMNIST v2's official split nor a known copy)"
    if from_name and known is not None and names_known:
        log.warning("%s: %s, so its class names (%s), positive class %r, licence and augmentation (%s) are %s's, taken "
                    "from its file name: check its labels; --positive chooses the class to detect", shown, not_known,
                    ", ".join(f"{i} = {n}" for i, n in enumerate(known.labels)), known.positive, known.modality, known.title)
    elif from_name and known is not None:
        log.warning("%s: %s, so its licence and augmentation (%s) are %s's, taken from its file name (its class names "
                    "are its own label_names): check them; --augment chooses the augmentation", shown, not_known,
                    known.modality, known.title)
    elif name_hint:
        log.warning("%s: X-ray augmentation (no left-right flip) guessed from its file name; record it in the file "
                    "(a modality array: ultrasound, xray or generic) or choose it with --augment", shown)
    unknown = None
    if task == "binary" and positive is None:
        unknown = (f"the class map renamed {known_positive!r}" if known_positive else
                   f"its own label_names, not {known.title}'s" if known is not None else
                   "not a MedMNIST file known by its content")
    return Dataset(
        spec=str(path), kind="medmnist", task=task, labels=names, splits=splits, data_hash=digest,
        positive=positive, licence=licence, channels_hint=channels, modality=modality, notes=notes,
        positive_unknown=unknown,
    )


def _npz_hashes(path: Path, class_map) -> tuple[str, str]:
    """(sha256 of the file, the data hash: the file's bytes and the class map), read once in chunks."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                whole.update(chunk)
                data.update(chunk)
    except OSError as exc:
        raise _unreadable(path, exc, "file") from None
    data.update(repr(class_map).encode())
    return whole.hexdigest(), data.hexdigest()


def _integer_labels(y: np.ndarray) -> np.ndarray | None:
    """(N,) or (N, 1) class labels as (N,) int64; None unless every one is a whole number (strings, fractions and NaN
    are no class index: astype would raise or truncate them)."""
    if y.ndim == 0 or y.size != len(y):
        return None
    y = y.reshape(-1)
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and bool(np.isfinite(y).all()) and bool((y == np.round(y)).all()):
        return y.astype(np.int64)
    return None


def _label_counts(ys: Mapping[str, np.ndarray]) -> tuple[dict[str, tuple[int, ...]] | None, list[int]]:
    """(per split, its count of each label; the label values), the counts None unless the values are 0..K-1: checked
    before counting, as bincount allocates up to the largest value (2**40 is a MemoryError)."""
    values = np.unique(np.concatenate([np.asarray(y, np.int64) for y in ys.values()])).tolist()
    if values != list(range(len(values))):
        return None, values
    return {s: tuple(np.bincount(y, minlength=len(values)).tolist()) for s, y in ys.items()}, values


_Heads = Mapping[str, tuple[np.dtype | None, tuple[int, ...]]]  # .npz member -> (dtype, shape); None: not an array


def _heads(arrays: Mapping[str, Any]) -> dict[str, tuple[np.dtype | None, tuple[int, ...]]]:
    return {k: (getattr(a, "dtype", None), tuple(getattr(a, "shape", ()))) for k, a in arrays.items()}


def _npz_heads(path: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.dtype | None, tuple[int, ...]]]]:
    """The label arrays of an .npz and every member's dtype and shape, read from the .npy headers: its images are
    never decompressed (a 224 px set holds hundreds of MB). DataError as `_read_npz` where the file is no .npz or
    lacks the MedMNIST arrays."""
    import zipfile

    fmt = np.lib.format
    labels: dict[str, np.ndarray] = {}
    heads: dict[str, tuple[np.dtype | None, tuple[int, ...]]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if key == info.filename:  # np.load reads such a member as bytes
                    heads[key] = (None, ())
                    continue
                with zf.open(info) as f:
                    if key.endswith("_labels"):
                        labels[key] = fmt.read_array(f, allow_pickle=False)
                        heads[key] = (labels[key].dtype, labels[key].shape)
                        continue
                    version = fmt.read_magic(f)
                    read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
                    if read_header is None:  # a later header version: the array itself says
                        a = fmt.read_array(f, allow_pickle=False)
                        heads[key] = (a.dtype, a.shape)
                        continue
                    shape, _, dtype = read_header(f)
                    if dtype.hasobject:
                        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
                    heads[key] = (dtype, tuple(shape))
    except PermissionError as exc:
        raise DataError(f"cannot read {_shown(path)} ({exc.strerror}); fix its permissions or give another .npz") from None
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled object arrays, a bad header), OSError
        raise DataError(f"{path} could not be read as an .npz ({exc}); give a MedMNIST .npz") from None
    missing = [k for k in _NPZ_ARRAYS if k not in heads]
    if missing:
        raise DataError(
            f"{path} lacks the MedMNIST arrays {missing} (it has {sorted(heads)}); expected train/val/test _images and _labels"
        )
    return labels, heads


def _medmnist_by_content(file_sha: str, heads: _Heads, counts: Mapping[str, tuple[int, ...]]) -> _Known | None:
    """The MedMNIST set an .npz is (`heads`: its members' dtype and shape): a known file by its bytes, or MedMNIST v2's
    official split (exactly its six arrays, gray square images at one of its sizes, and every split's count of each
    label). A copy under any name is the same data; the official layout with other labels (swapped, say) is not."""
    if file_sha in _MEDMNIST_SHA256:
        return _MEDMNIST[_MEDMNIST_SHA256[file_sha]]
    if set(heads) != set(_NPZ_ARRAYS):
        return None
    for s in SPLITS:
        dtype, shape = heads[f"{s}_images"]
        if dtype != np.uint8 or len(shape) != 3 or shape[1] != shape[2] or shape[1] not in _MEDMNIST_SIDES:
            return None
    return next((k for k in _MEDMNIST.values() if dict(counts) == k.counts), None)


def _medmnist_by_name(path: Path, counts: Mapping[str, tuple[int, ...]]) -> _Known | None:
    """The MedMNIST set the file name names (`breastmnist.npz`, `BreastMNIST_224.npz`), for content no table knows
    (a re-split, a subset): how such files were always read, so runs trained on them stay readable. Not where the
    content contradicts it: another number of classes, or the official split's sizes with other label counts."""
    k = _MEDMNIST.get(path.stem.lower().split("_")[0])
    if k is None or any(len(c) != len(k.labels) for c in counts.values()):
        return None
    if {s: sum(c) for s, c in counts.items()} == {s: sum(c) for s, c in k.counts.items()}:
        return None  # the official images under other labels: relabelled data, not this set
    return k


def _recorded_modality(path: Path, arrays: Mapping[str, np.ndarray]) -> str | None:
    """The modality an .npz records (`edgeclf data synth` writes one), None where it records none."""
    if "modality" not in arrays:
        return None
    value = arrays["modality"]
    text = str(value.item()) if value.ndim == 0 or value.size == 1 else repr(value.tolist())[:40]
    if text not in MODALITIES:
        raise DataError(f"{_shown(path)}: its modality array is {text!r}; allowed: {', '.join(MODALITIES)} (it picks the "
                        "augmentation); fix the array or remove it (--augment also chooses)")
    return text


def _xray_by_content(arrays: Mapping[str, np.ndarray], multilabel: bool, given: list[str] | None) -> bool:
    """X-ray data known by content without a recorded modality: `edgeclf data synth xray` files written before it
    recorded one (its findings' names), and ChestMNIST's official split (14 findings, unnamed)."""
    from edgeclf.runtime.synthetic import XRAY_FINDINGS

    if multilabel and given == list(XRAY_FINDINGS):
        return True
    return (multilabel and arrays["train_labels"].shape[1] == 14
            and all(len(arrays[f"{s}_labels"]) == n for s, n in _CHESTMNIST_SIZES.items()))


def _xray_by_name(path: Path) -> bool:
    """The guess from a file name no content confirms (chest_films.npz): X-ray, so that no film is mirrored."""
    stem = path.stem.lower()
    return "pneumonia" in stem or "chest" in stem


def known_npz(spec: str) -> str | None:
    """The MedMNIST set (`breastmnist`, `pneumoniamnist`) an .npz data spec holds, known as `load_dataset` knows it
    (by content, else by a file name its content does not contradict); None for anything else, e.g. to choose a
    recipe's variant for a renamed copy. An .npz that cannot be read raises DataError as `load_dataset` does."""
    path = Path(split_spec(spec)[0]).expanduser()
    if spec.startswith("synthetic:") or path.suffix.lower() != ".npz" or not path.is_file():
        return None
    labels, heads = _npz_heads(path)  # the labels and image headers: the images are not decompressed
    y = labels["train_labels"]
    if y.ndim == 2 and y.shape[1] > 1:
        return None  # multilabel: no MedMNIST set this package names
    ints = {s: _integer_labels(labels[f"{s}_labels"]) for s in SPLITS}
    ys = {s: v for s, v in ints.items() if v is not None}
    if len(ys) != len(SPLITS):
        return None  # not class indices: load_dataset says so
    counts = _label_counts(ys)[0]
    if counts is None:
        return None  # not 0..K-1: load_dataset says so
    known = _medmnist_by_content(_npz_hashes(path, None)[0], heads, counts) or _medmnist_by_name(path, counts)
    return next((key for key, v in _MEDMNIST.items() if v is known), None)


# -- folders -------------------------------------------------------------------------------------

def _shown(path: str | Path) -> str:
    """`path` as text that prints and writes anywhere: bytes of a name that are not UTF-8 (which Python carries as
    surrogate escapes on POSIX, e.g. a Latin-1 name from a USB stick) shown as \\xNN; a UTF-8 name is unchanged.
    It is also a file's id in a data set (splits, split lists, the data hash), so such a file stays usable."""
    text = str(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte: never from a file system, but never a traceback
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unreadable(path: str | Path, exc: OSError, what: str = "folder") -> DataError:
    """The one line for a part of a data set the user cannot read (permissions, a damaged disk): never skipped."""
    why = exc.strerror or type(exc).__name__
    return DataError(f"cannot read {what} {_shown(path)} ({why}); fix its permissions or move it out of the data set")


def _path_kind(path: Path) -> str | None:
    """"dir", "file" (anything else that exists) or None (absent) for a data path; a path whose folders the user
    cannot search is one line (pathlib raises PermissionError there, where it reads absent paths as False)."""
    try:
        return "dir" if path.is_dir() else "file" if path.exists() else None
    except OSError as exc:
        raise DataError(f"cannot read data path {_shown(path)} ({exc.strerror or type(exc).__name__}); fix the "
                        "permissions of its folders or give another path") from None


def _open_text(path: Path) -> IO[str]:
    """A CSV of the data set (clips.csv, a split list) opened for reading; unreadable is one line."""
    try:
        return open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise _unreadable(path, exc, "file") from None


def _read_text(path: Path, what: str) -> IO[str]:
    """A CSV of the data set (clips.csv, a split list) read whole, as a file to iterate: unreadable, or not UTF-8 (a
    byte that fails while the rows are read), is one line; `what` names the file as the user knows it."""
    import io

    with _open_text(path) as f:
        try:
            text = f.read()
        except UnicodeDecodeError as exc:
            line = exc.object[:exc.start].count(b"\n") + 1
            raise DataError(f"{what} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); supported: "
                            "UTF-8 (or ASCII); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    return io.StringIO(text, newline="")


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError as exc:
        raise _unreadable(p.parent, exc) from None


def _class_dirs(root: Path) -> list[Path]:
    """The class folders of `root` (hidden ones skipped), in natural order. A folder the user cannot list is one
    line, and so is a class folder whose name is not UTF-8: its name is the class's label everywhere."""
    try:
        with os.scandir(root) as it:
            names = [e.name for e in it]
    except OSError as exc:
        raise _unreadable(root, exc) from None
    out = [root / n for n in names if not n.startswith(".") and _is_dir(root / n)]
    for p in out:
        if not _is_utf8(p.name):
            raise DataError(f"class folder {_shown(p)}: its name is not valid UTF-8 (e.g. a Latin-1 name from a USB stick "
                            "or a Windows share) and a folder's name is its class's label; supported: UTF-8 names; rename "
                            "the folder (e.g. convmv -f latin1 -t utf8)")
    return sorted(out, key=lambda p: natural_key(p.name))


def _files(d: Path, exts: Collection[str], hidden: list[int] | None = None) -> list[Path]:
    """Files under `d` with one of `exts`. Hidden files and folders (macOS "._x.png" forks, .AppleDouble/,
    .thumbnails/, .ipynb_checkpoints/) are not images of the data set: skipped, and counted in `hidden[0]`.
    A folder (or file) the user cannot read is a DataError, never skipped (pathlib's rglob skips such folders
    silently); one inside a hidden folder is skipped with it. Symlinked folders are not descended into, as with
    rglob; the order is natural over the whole path."""

    def is_hidden(p: Path) -> bool:
        return any(part.startswith(".") for part in p.relative_to(d).parts)

    def failed(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else d
        if not is_hidden(where):
            raise _unreadable(where, exc) from None

    out = []
    for folder, _, names in os.walk(d, onerror=failed):
        for name in names:
            p = Path(folder, name)
            if p.suffix.lower() not in exts:
                continue
            hide = is_hidden(p)
            try:
                is_file = p.is_file()
            except OSError as exc:  # e.g. its folder can be listed (r) but not searched (x)
                if not hide:
                    raise _unreadable(p, exc, "file") from None
                is_file = False
            if not is_file:
                continue
            if hide:
                if hidden is not None:
                    hidden[0] += 1
                continue
            out.append(p)
    return sorted(out, key=lambda p: natural_key(str(p)))


def _listed(d: Path) -> list[Path] | None:
    """`_files` of a class folder, or None where it cannot be listed (a folder the class map may drop)."""
    try:
        return _files(d, IMAGE_EXTS + VIDEO_EXTS)
    except DataError:
        return None


def _decoded(path: Path) -> np.ndarray:
    """Decoded by the runtime's image source (16-bit scaling, alpha, RGB order): the frame `edgeclf run` reads."""
    try:
        img, _ = decode_image(str(path), where=f"image {_shown(path)}")
    except SourceError as exc:
        raise DataError(str(exc)) from None
    return img


def _read_image(path: Path) -> np.ndarray:
    """`_decoded`, gray kept 1-channel."""
    return _gray_if_equal(_decoded(path))


def _gate_image(gate: Any, path: Path, img: np.ndarray) -> str:
    """`edgeclf run`'s quality gate (a QualityGate with run's defaults) on one image, as run gates an image of a
    folder: a still, judged on its own (no frozen run or texture baseline from the images before it, so neither the
    order nor the images a split list leaves out matter), the whole image as decoded (before `_gray_if_equal`). A
    DataError of the gate is run's frame_error: that image abstains."""
    from edgeclf.runtime.pipeline import FRAME_ERROR

    try:
        return ",".join(gate.check(img, None, still=True).reasons)
    except DataError as exc:
        log.warning("image %s: the quality gate failed on it (%s); it abstains with %s", _shown(path.name),
                    " ".join(str(exc).split())[:300], FRAME_ERROR)
        return FRAME_ERROR


def _gray_if_equal(img: np.ndarray) -> np.ndarray:
    """Gray images stored as RGB stay 1-channel: a model should not need 3 for them."""
    if img.ndim == 3 and np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 1], img[:, :, 2]):
        return np.ascontiguousarray(img[:, :, 0])
    return img


@dataclass(frozen=True)
class FolderOptions:
    """Options of a folder spec, given as its query (`DIR?dedup=near&test=0.2`); the defaults are the
    plain folder's behaviour, and a spec with only defaults records no query.

    split: a committed split list (a name under `edgeclf/recipe_files/splits/`, or a .csv path) that assigns
        every file to train/val/test (or marks it a duplicate); files it does not list are left out.
    dedup: exact (copies grouped, all kept) | near (exact copies dropped, near copies grouped: `near_hash`
        within `near` bits) | none.
    test, val: held-out fractions (seeded, stratified over groups) when there is no list and no folds.
    frames: clips, frames sampled per clip (overrides the caller's frames_per_clip).
    roi: clips, `sector` crops every frame with the runtime's own sector detector (`edgeclf run --roi sector`);
        a model trained so records `preprocess.sector`, and `run` then crops by default.
    folds, fold: cross-validation: the test split is fold `fold` of `folds`; val is drawn from the rest by group.
    group: what stays on one side of the split (folds, or clips' plain train/val/test split): clip, source
        (`original_source` in clips.csv as written) or site (that source reduced to its contributor or web site:
        `_site`). Byte-identical clips join their copy's source or site (`_units`).
    """

    split: str | None = None
    dedup: str = "exact"
    near: int = 24
    test: float | None = None
    val: float | None = None
    frames: int | None = None
    roi: str = "none"
    folds: int = 0
    fold: int = 0
    group: str = "clip"

    def __post_init__(self) -> None:
        if self.dedup not in ("none", "exact", "near"):
            raise DataError(f"data option dedup={self.dedup!r} is unknown; allowed: none, exact, near")
        if not 0 <= self.near <= 64:
            raise DataError(f"data option near={self.near} is out of range; give a Hamming distance 0..64 (bits of 256)")
        if self.roi not in ("none", "sector"):
            raise DataError(f"data option roi={self.roi!r} is unknown; allowed: none, sector")
        if self.group not in ("clip", "source", "site"):
            raise DataError(f"data option group={self.group!r} is unknown; allowed: clip, source, site")
        if self.folds == 1 or self.folds < 0 or (self.folds and not 0 <= self.fold < self.folds):
            raise DataError(f"data options folds={self.folds} fold={self.fold}: give folds >= 2 and 0 <= fold < folds")
        if self.frames is not None and self.frames < 1:
            raise DataError(f"data option frames={self.frames}; sample at least 1 frame per clip")
        if self.split is not None and self.folds:
            raise DataError("data options split and folds exclude each other; a split list fixes the test split, folds rotate it")
        if self.split is not None and self.group != "clip":
            raise DataError(f"data options split and group={self.group} exclude each other; a split list fixes every file's "
                            "split, group applies to a split edgeclf draws: leave group out")

    def query(self) -> str:
        """The canonical query ('' when every option is the default)."""
        out = []
        for f in ("split", "dedup", "near", "test", "val", "frames", "roi", "folds", "fold", "group"):
            v = getattr(self, f)
            if (f in ("fold", "group") and self.folds) or (f == "group" and v != "clip"):
                out.append(f"{f}={v}")  # always named with folds: the spec says which fold it is
            elif v != getattr(_DEFAULT_OPTIONS, f) and not (f == "near" and self.dedup != "near") \
                    and f not in ("fold", "group"):
                out.append(f"{f}={v}")
        return "&".join(out)


_DEFAULT_OPTIONS = FolderOptions()
_OPTION_TYPES = {"split": str, "dedup": str, "near": int, "test": float, "val": float, "frames": int, "roi": str,
                 "folds": int, "fold": int, "group": str}


def _parse_options(query: str, spec: str) -> FolderOptions:
    try:
        # Blank values kept: `split=` must be refused, not read as "no split list".
        pairs = parse_qsl(query, strict_parsing=True, keep_blank_values=True)
    except ValueError:
        raise DataError(f"data spec {spec!r} has a malformed query; use e.g. DIR?dedup=near&test=0.2") from None
    bad = sorted({k for k, _ in pairs} - set(_OPTION_TYPES))
    if bad:
        raise DataError(f"data spec {spec!r} has unknown option(s) {bad}; allowed: {', '.join(_OPTION_TYPES)}")
    kw = {}
    for k, v in pairs:
        if k in kw:
            raise DataError(f"data spec {spec!r} names option {k} twice; give it once")
        if not v.strip():
            raise DataError(f"data spec {spec!r}: option {k}= is empty; give a value or leave the option out")
        try:
            kw[k] = _OPTION_TYPES[k](v)
        except ValueError:
            raise DataError(f"data spec {spec!r}: option {k}={v!r} is not a {_OPTION_TYPES[k].__name__}") from None
    # Options that would be ignored (and dropped from the recorded spec) are refused instead.
    if not kw.get("folds") and "fold" in kw:
        raise DataError(f"data spec {spec!r}: option fold applies to cross-validation; add folds=K (K >= 2) or leave fold "
                        "out (edgeclf train --folds K)")
    if "near" in kw and kw.get("dedup") != "near":
        raise DataError(f"data spec {spec!r}: option near applies with dedup=near; add dedup=near or leave near out")
    return FolderOptions(**kw)


_LIST_MOOT = ("dedup", "near", "test", "val")  # what a split list (or split folders) decides instead


def check_option_table(named: Collection[str], opts: FolderOptions, *, folds: int = 0, where: str = "data option") -> None:
    """Refuse folder options that would have no effect in this combination (they would be recorded in the spec and
    silently not used). `named`: the options given; `folds`: cross-validation asked for outside the spec (--folds).
    Recorded specs are never checked here (an old run.json must keep rebuilding its data); `edgeclf train` checks
    the spec it is given and `edgeclf.recipes` the [data] tables."""
    named = set(named)
    if opts.split is not None:
        moot = [k for k in _LIST_MOOT if k in named]
        if moot:
            raise DataError(f"{where} {moot[0]} has no effect with split={opts.split}: the split list fixes every file's split "
                            f"and copy group; leave {', '.join(moot)} out (they are how a list is written: python -m "
                            "edgeclf.recipes splits, the recipe's [splits] table)")
    if (opts.folds or folds) and "test" in named:
        raise DataError(f"{where} test has no effect with cross-validation (folds={opts.folds or folds}): each fold is the "
                        "test split in turn; leave test out (val still sets the validation share)")
    if "near" in named and opts.dedup != "near":
        raise DataError(f"{where} near applies with dedup=near; add dedup=near or leave near out")
    if not opts.folds and "fold" in named:
        raise DataError(f"{where} fold applies to cross-validation; add folds=K (K >= 2) or leave fold out (edgeclf train "
                        "--folds K --group G)")
    if not opts.folds and "group" in named:
        if opts.split is not None:
            raise DataError(f"{where} group has no effect with split={opts.split}: the split list fixes every file's split; "
                            "leave group out")
        if folds:  # the grouping of --folds K is --group's (a recipe's [train] group), not this option's
            raise DataError(f"{where} group without folds= groups the single train/val/test split, not cross-validation "
                            f"(folds={folds}); leave it out and use --group (a recipe's [train] group), or write "
                            f"folds={folds}&group={opts.group} in the data spec")


def _layout(root: Path) -> tuple[bool, bool]:
    """(has train/ val/ test/ folders, holds clips rather than images), decided as `_scan_folder` decides it,
    from file names only."""
    split_dirs = [root / s for s in SPLITS if _is_dir(root / s)]
    n_video = n_image = 0
    for top in split_dirs or [root]:
        for d in _class_dirs(top):
            # A class folder that cannot be listed may be one --classes drops (no part of the data set): load_dataset
            # refuses it, with its one line, where the class map keeps it.
            for f in _listed(d) or []:
                if f.suffix.lower() in VIDEO_EXTS:
                    n_video += 1
                else:
                    n_image += 1
    return bool(split_dirs), n_video > n_image


def check_spec_options(spec: str, *, folds: int = 0) -> str | None:
    """Refuse a typed data spec whose options would have no effect (see `check_option_table`), also against the
    data itself: options on an .npz, dedup/near/test/val beside train/ val/ test/ folders, dedup/near on clips.
    `folds`: cross-validation asked for outside the spec. Returns the kind of data the spec names (synthetic,
    medmnist, images, clips), or None for a path that does not exist (`load_dataset` says so)."""
    if spec.startswith("synthetic:"):
        return "synthetic"
    base, opts = split_spec(spec)
    named = [k for k, _ in parse_qsl(spec.partition("?")[2], keep_blank_values=True)]
    where = f"data spec {spec!r}:"
    check_option_table(named, opts, folds=folds, where=f"{where} option")
    path = Path(base).expanduser()
    kind = _path_kind(path)
    if kind == "file":
        if named:
            raise DataError(f"{where} options (?{'&'.join(named)}) apply to folders; an .npz keeps its own split: leave "
                            "them out")
        return "medmnist" if path.suffix.lower() == ".npz" else None
    if kind is None:
        return None
    split_dirs, is_clips = _layout(path)
    moot = [k for k in _LIST_MOOT if k in named]
    if split_dirs and moot:
        raise DataError(f"{where} option {moot[0]} has no effect: {path.name} has train/ val/ test/ folders, which fix the "
                        f"split; leave {', '.join(moot)} out")
    if "group" in named and not (opts.folds or folds):
        if split_dirs:
            raise DataError(f"{where} option group has no effect: {path.name} has train/ val/ test/ folders, which fix the "
                            "split; leave group out")
        if not is_clips:
            raise DataError(f"{where} option group has no effect on a folder of images without folds (images have no "
                            "clips.csv sources; byte-identical copies are always kept together); leave group out")
    moot = [k for k in ("dedup", "near") if k in named]
    if is_clips and moot:
        raise DataError(f"{where} option {moot[0]} has no effect on a clip data set (clips are split whole, never searched "
                        f"for copies); leave {', '.join(moot)} out")
    return "clips" if is_clips else "images"


_FIX_CHANGED = "restore the data as it was or retrain"
_OWN_SPLIT = "give data with its own split (train/ val/ test/ folders, a split list, a MedMNIST .npz)"


def recorded_options(recorded: Mapping[str, Any]) -> str:
    """The options (query) a run recorded for its data: its spec's (run.json), else its name's (a bundle keeps no
    paths: an option naming a file, split=/x/list.csv, keeps only list.csv)."""
    spec = str(recorded.get("spec") or recorded.get("name") or "")
    return "" if spec.startswith("synthetic:") else spec.partition("?")[2]


def defines_split(spec: str) -> bool:
    """Whether the data at `spec` brings its own train/val/test split (a MedMNIST .npz, train/ val/ test/ folders, a
    split list, synthetic data) rather than one edgeclf draws from it (seeded shares, folds)."""
    if spec.startswith("synthetic:"):
        return True
    base, opts = split_spec(spec)
    path = Path(base).expanduser()
    kind = _path_kind(path)
    return opts.split is not None or kind == "file" or (kind == "dir" and any(_is_dir(path / s) for s in SPLITS))


def _recorded_name(recorded: Mapping[str, Any]) -> str:
    return str(recorded.get("name") or spec_name(str(recorded.get("spec", ""))))


def _as_trained(base: str, recorded: Mapping[str, Any]) -> str:
    """The --data that reads the folder `base` as the model was trained: with its recorded options, where a split list
    given as a file that is not here (a bundle records only its file name) is a path to fill in."""
    q = recorded_options(recorded)
    parts = []
    for k, eq, v in (p.partition("=") for p in q.split("&") if p):
        if k == "split" and not _committed_split(v) and not Path(v).expanduser().is_file():
            v = f"/path/to/{_PATH_SEP.split(v)[-1]}"
        parts.append(k + eq + v)
    return f"--data '{base}?{'&'.join(parts)}'" if parts else f"--data {base}"


def _list_missing(recorded: Mapping[str, Any]) -> str | None:
    """The file name of the split list the recorded options name where it is not here (as given, or a committed
    one), else None."""
    for k, _, v in (p.partition("=") for p in recorded_options(recorded).split("&") if p):
        if k == "split" and not _committed_split(v) and not Path(v).expanduser().is_file():
            return _PATH_SEP.split(v)[-1]
    return None


def _not_training_data(name: str, recorded: Mapping[str, Any], use: str, new_data: str, tried: str) -> DataError:
    rec = _recorded_name(recorded)
    q = recorded_options(recorded)
    ways = [w for w in (new_data, q and f"give the training data with the options it was trained with "
                                        f"({_as_trained('DIR', recorded)})", _OWN_SPLIT) if w]
    what = ", ".join(ways[:-1]) + f" or {ways[-1]}" if len(ways) > 1 else ways[0]
    return DataError(f"data {name} is not, by content, the data the model was trained on ({rec}): the hashes differ{tried}, "
                     f"and its splits would be drawn anew, where training images can land in any split, so {use}; {what}")


def classified_rows(ds: Dataset, ids: list[str]) -> np.ndarray:
    """Rows of the frames `ids` that `edgeclf run` classifies: those without a reason in `Dataset.abstain` (the sector
    locked; with load_dataset(quality=True), the quality gate passed them)."""
    return np.asarray([i for i, f in enumerate(ids) if not ds.abstain.get(f)], dtype=np.int64)


def abstain_counts(ds: Dataset, ids: list[str]) -> str:
    """How many of `ids` `edgeclf run` abstains on, per reason: 'blank: 4, sector_warmup: 8'."""
    why: dict[str, int] = {}
    for f in ids:
        if ds.abstain.get(f):
            why[ds.abstain[f]] = why.get(ds.abstain[f], 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(why.items()))


def _all_warmup(ds: Dataset, ids: list[str]) -> bool:
    return all(ds.abstain.get(f) in ("", None, "sector_warmup") for f in ids)


def none_classified(ds: Dataset, ids: list[str], split: str) -> str:
    """'none of the 8 val frames is one `edgeclf run` classifies (it abstains on every one: sector_warmup: 8; ...)'."""
    what = "; uncropped frames: their clip's ultrasound sector had not locked" if _all_warmup(ds, ids) else ""
    return f"none of the {len(ids)} {split} frames is one `edgeclf run` classifies (it abstains on every one: {abstain_counts(ds, ids)}{what})"


def classify_fix(ds: Dataset, ids: list[str]) -> str:
    """What gives run frames to classify: longer clips where the frames only wait for the sector, else frames its
    quality gate passes."""
    if _all_warmup(ds, ids):
        return "give clips long enough for the ultrasound sector to lock"
    return "give clips or images whose frames `edgeclf run` classifies (clips whose sector locks, frames its quality gate passes)"


def require_training_data(ds: Dataset, recorded: Mapping[str, Any], *, data_given: str | None, use: str,
                          fix: str = _FIX_CHANGED, new_data: str = "") -> None:
    """DataError unless `ds` may feed the held-out splits of a model trained on the data `recorded` (run.json's
    data record, or a bundle's provenance.data): re-drawing the splits of other data can put training images into
    the held-out ones. Identity is the content hash (files, options, split list), never a folder name: the
    training data passes (the hash it had before split lists, frames or sources were hashed too, with a warning);
    other data passes only where it brings its own split (`defines_split`). The recorded data itself (no --data,
    or --data of its recorded name) with another hash has changed: refused even with its own split. `use`
    completes "so ..." (what the splits feed), `fix` says what to do with changed data, `new_data` (optional) with new data.
    A run without a recorded hash passes. `load_training_data` reads a renamed copy with its recorded options."""
    if not recorded.get("hash") or recorded["hash"] in (ds.data_hash, ds.path_hash):
        return  # path_hash: recorded while a split list's path was hashed too; its contents match
    if recorded["hash"] == ds.former_hash:
        # Recorded before split lists, frames_per_clip or clips.csv sources were hashed: the files and options match.
        # Frames come from the run's own config; a split list or the sources cannot be checked against such a run.
        base, opts = split_spec(ds.spec)
        if opts.split:
            log.warning("%s was recorded before split-list contents were part of the data hash: its files match, but a "
                        "regenerated split list cannot be told apart; retrain to record it", ds.name)
        if opts.group != "clip" and ds.kind == "clips" and (Path(base) / "clips.csv").is_file():
            log.warning("%s was recorded before the clips.csv sources that group=%s splits by were part of the data hash: "
                        "its files match, but sources edited since (a re-drawn split) cannot be told apart; retrain to "
                        "record them", ds.name, opts.group)
        return
    if data_given is None or ds.name == _recorded_name(recorded):
        raise DataError(f"data {ds.name} changed since the model was trained (its hash differs), so {use}; {fix}")
    listed = split_spec(ds.spec)[1].split
    if recorded.get("files_hash") and recorded["files_hash"] == ds.files_hash and listed is not None:
        # The training files under another split list: its own split, but its held-out splits can hold training images.
        # (Runs recorded before files_hash: as before, other data with its own split.)
        raise DataError(f"data {ds.name} holds the files the model was trained on ({_recorded_name(recorded)}), but split "
                        f"list {_PATH_SEP.split(listed)[-1]} splits them otherwise than training did, so {use}; give them "
                        f"as trained ({_as_trained(split_spec(data_given)[0], recorded)}) or {fix}")
    if not defines_split(ds.spec):
        raise _not_training_data(ds.name, recorded, use, new_data, "")


class _Held(logging.Handler):
    """Log records kept back while a reading may be discarded (`load_training_data`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def load_training_data(spec: str, recorded: Mapping[str, Any], load: Callable[[str], Dataset], *,
                       data_given: str | None, use: str, fix: str = _FIX_CHANGED,
                       new_data: str = "") -> Dataset:
    """`load(spec)` for a use of the held-out splits of a model trained on the data `recorded`, checked by
    `require_training_data`. A plain folder (--data DIR, no options) whose content read with the recorded options
    has the recorded hash is the training data under another path or name (another machine, a copy): it is read
    so, and its splits are training's. Otherwise the folder reads as given, or is refused without being read again
    where that reading would be refused (no split of its own). Where the run recorded its files' hash, a folder of
    other files is known before any decoding and read once, as given. `load` reads a spec with the caller's settings."""
    q = recorded_options(recorded) if recorded.get("hash") else ""
    if not q or "?" in spec or spec.startswith("synthetic:") or _path_kind(Path(spec).expanduser()) != "dir":
        ds = load(spec)
        require_training_data(ds, recorded, data_given=data_given, use=use, fix=fix, new_data=new_data)
        return ds
    same = _same_files(spec, recorded)
    trial: Dataset | None = None
    held, failed = _Held(), ""
    if same is False:  # other files: under no options the training data, so not read with its options
        tried = " (its files are not the training data's)"
    else:
        optioned = f"{spec.rstrip('/') or spec}?{q}"
        # The reading's notes and warnings are kept back until it is known to be the one used: those of a discarded
        # reading (new data read with another set's split list: "left out N files") would only mislead.
        root = logging.getLogger("edgeclf")
        propagate, root.propagate = root.propagate, False
        root.addHandler(held)
        try:
            try:
                trial = load(optioned)
                tried = f" (also read with the recorded options ?{q})"
            except DataError as exc:  # not readable so: not the training data as recorded; said below if refused
                trial, failed = None, str(exc)
                tried = f" (read with the recorded options ?{q}: {exc})"
        finally:
            root.removeHandler(held)
            root.propagate = propagate
    if trial is not None and recorded["hash"] in (trial.data_hash, trial.former_hash, trial.path_hash):
        for r in held.records:
            logging.getLogger(r.name).handle(r)
        log.info("%s has the content of the training data %s: read with its recorded options ?%s (its held-out splits "
                 "are training's)", spec_name(spec), _recorded_name(recorded), q)
        require_training_data(trial, recorded, data_given=data_given, use=use, fix=fix, new_data=new_data)
        return trial
    if not defines_split(spec):
        if same:  # the training files, not readable as trained here
            lst = _list_missing(recorded)
            why = (f"but the split list it was trained with ({lst}) is not found here" if lst else
                   f"but they do not read as trained with the recorded options ?{q} ({failed or 'the hashes differ'})")
            raise DataError(f"data {spec_name(spec)} holds the files the model was trained on ({_recorded_name(recorded)}) "
                            f"{why}, so {use}; give them as trained: {_as_trained(spec, recorded)}")
        raise _not_training_data(spec_name(spec), recorded, use, new_data, tried)
    ds = load(spec)  # new data with its own split
    require_training_data(ds, recorded, data_given=data_given, use=use, fix=fix, new_data=new_data)
    return ds


def _same_files(spec: str, recorded: Mapping[str, Any]) -> bool | None:
    """Whether the plain folder `spec` holds the files of the training data `recorded` (its files_hash, under its
    class map), hashed without decoding; None where the run recorded no files_hash or the folder is no data set
    (the reading says why)."""
    if not recorded.get("files_hash"):
        return None
    try:
        root = Path(spec).expanduser().resolve()
        return _files_hash(root, parse_class_map(recorded.get("classes"))) == recorded["files_hash"]
    except DataError:
        return None


def split_spec(spec: str) -> tuple[str, FolderOptions]:
    """`DIR?opts` -> (DIR, options). Specs without a query get the defaults."""
    if not spec.partition("?")[0].strip():  # not the current folder: an unset variable or a missing value, most likely
        raise DataError(f"the data spec {spec!r} names no data; give an image folder, a clips folder, a MedMNIST .npz or "
                        "synthetic:ultrasound|xray (. for the current folder)")
    if spec.startswith("synthetic:") or "?" not in spec:
        return spec, _DEFAULT_OPTIONS
    base, _, query = spec.partition("?")
    return base, _parse_options(query, spec)


def with_options(spec: str, **changes) -> str:
    """The spec with options changed (`with_options("d?dedup=near", fold=2)`); canonical query order."""
    base, opts = split_spec(spec)
    import dataclasses

    q = dataclasses.replace(opts, **changes).query()
    return f"{base}?{q}" if q else base


def _site(source: str) -> str:
    """A clip's `original_source` reduced to where it came from: the contributor before the first comma
    ("Data contributed by X, file.avi" -> x), a URL's host without www., else the text itself."""
    import re

    s = source.strip()
    low = s.lower()
    if low.startswith("data contributed by"):
        return s[len("data contributed by"):].split(",")[0].strip().lower() or "unknown"
    m = re.match(r"https?://([^/\s]+)", low)
    if m:
        host = m.group(1)
        return host[4:] if host.startswith("www.") else host
    return low or "unknown"


def _clip_sources(root: Path) -> dict[str, str]:
    """clips.csv `file` -> `original_source` as written (whitespace collapsed); {} without a clips.csv."""
    import csv

    csv_path = root / "clips.csv"
    if not csv_path.is_file():
        return {}
    with _read_text(csv_path, f"clips.csv of {_shown(root)}") as f:
        return {row["file"]: " ".join((row.get("original_source") or "").split()) or "unknown"
                for row in csv.DictReader(f) if row.get("file")}


def near_hash(img: np.ndarray) -> bytes:
    """A 256-bit difference hash of a 17x16 gray thumbnail (INTER_AREA), 32 bytes: near copies (re-encoded,
    re-cropped, rescaled, re-windowed) differ in a few bits, different images in about half. Measured on
    BUSI and the brain MRI set: pairs within 24 bits were the same image or the neighbouring slice of the
    same scan; distinct BUSI images sit 80-95 bits apart."""
    import cv2

    g = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    t = cv2.resize(g, (17, 16), interpolation=cv2.INTER_AREA).astype(np.int16)
    return np.packbits((t[:, 1:] > t[:, :-1]).reshape(-1)).tobytes()


def _near_groups(hashes: list[bytes], threshold: int) -> list[int]:
    """Single-linkage groups of items within `threshold` bits (union-find); each item's root index."""
    parent = list(range(len(hashes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if not hashes:
        return []
    h = np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), -1)
    table = np.array([bin(i).count("1") for i in range(256)], np.uint8)
    for i in range(len(h) - 1):
        dist = table[np.bitwise_xor(h[i + 1 :], h[i])].sum(1, dtype=np.int32)
        for j in np.flatnonzero(dist <= threshold):
            a, b = find(i), find(i + 1 + int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(h))]


_COMMITTED_SPLITS = Path(__file__).resolve().parent / "recipe_files" / "splits"


def _split_list_path(name: str) -> Path:
    """A split list given as a .csv path, or by the name of a committed one (`recipe_files/splits/NAME.csv`)."""
    p = Path(name).expanduser()
    if p.suffix == ".csv" and p.is_file():
        return p
    packaged = _COMMITTED_SPLITS / f"{name}.csv"
    if packaged.is_file():
        return packaged
    # The committed folder itself: `packaged.parent` is the folder of an absolute or nested `name`, not this one.
    have = sorted(q.stem for q in _COMMITTED_SPLITS.glob("*.csv")) if _COMMITTED_SPLITS.is_dir() else []
    committed = ", ".join(have) or "none"
    if p.suffix == ".csv":
        raise DataError(f"split list file {name!r} does not exist (or is not a file); give the path of an existing .csv "
                        f"file, or the name of a committed list: {committed}")
    raise DataError(f"split list {name!r} is neither a .csv file nor a committed list; committed: {committed}")


def _committed_split(name: str) -> bool:
    """Whether split list `name` is a committed one named by its name (`split=busi`), not a .csv file."""
    p = Path(name).expanduser()
    return not (p.suffix == ".csv" and p.is_file()) and (_COMMITTED_SPLITS / f"{name}.csv").is_file()


def read_split_list(name: str) -> dict[str, tuple[str, str, str]]:
    """A committed split list: rel path -> (sha256 prefix, split, group)."""
    import csv

    path = _split_list_path(name)
    with _read_text(path, f"split list {name!r}") as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    if not rows or not {"path", "sha256", "split", "group"} <= set(rows[0]):
        raise DataError(f"split list {path} lacks the columns path, sha256, split, group; regenerate it with python -m edgeclf.recipes splits")
    out: dict[str, tuple[str, str, str]] = {}
    for n, r in enumerate(rows, 1):
        where = f"split list {path}, row {n}"
        if not all((r.get(c) or "").strip() for c in ("path", "sha256", "split", "group")):
            raise DataError(f"{where} has an empty or missing path, sha256, split or group; regenerate the list")
        # Any other split name would be dropped like a duplicate: a typo must not lose files silently.
        if r["split"] not in (*SPLITS, "duplicate"):
            raise DataError(f"{where}: split {r['split']!r} is unknown; allowed: {', '.join(SPLITS)}, duplicate")
        if r["path"] in out:
            raise DataError(f"{where} names {r['path']} a second time; each file once")
        out[r["path"]] = (r["sha256"], r["split"], r["group"])
    return out


# (relative id, group key, label, frames)
_Row = tuple[str, str, int, list[np.ndarray]]


@dataclass
class _Scan:
    rows: list[_Row]
    names: list[str]
    is_clips: bool
    file_hash: str
    assigned: dict[str, str]
    notes: list[str]
    split_dirs: bool
    sources: dict[str, str]
    # a split list's assignments of the files read (None without a list): part of the data hash
    list_hash: str | None = None
    # copies a split list drops, as (rel, group, label, []): checked for labels that disagree with their kept copy
    list_dropped: list[_Row] = field(default_factory=list)
    # frame id -> why `edgeclf run` would not classify it (Dataset.abstain)
    abstain: dict[str, str] = field(default_factory=dict)


@dataclass
class _Files:
    """The files of a folder data set, as `_scan_folder` reads them (`_folder_files`)."""

    tops: list[Path]  # the split folders, or [root]
    names: list[str]
    lookup: dict[str, int]
    files: dict[Path, list[Path]]  # class folder -> its files (of folders the class map drops too, where listable)
    dropped: dict[Path, list[Path] | None]  # class folders the class map drops -> their files (None: unlistable)
    hidden: int
    is_clips: bool


def _folder_files(root: Path, class_map, opts: FolderOptions | None = None) -> _Files:
    """The class folders and files of a folder data set, named only (nothing read); `opts` checked against its split
    folders where given."""
    split_dirs = [root / s for s in SPLITS if _is_dir(root / s)]
    if split_dirs and not (root / "train").is_dir():
        raise DataError(f"{root} has {', '.join(p.name for p in split_dirs)} but no train/ folder; add it or remove the split folders")
    if split_dirs and opts is not None and (opts.split or opts.folds or opts.group != "clip"):
        raise DataError(f"{root} has train/ val/ test/ folders, which fix the split; leave out the split, folds and group "
                        "options")
    tops = split_dirs or [root]
    class_names: list[str] = []
    for top in tops:
        for d in _class_dirs(top):
            if d.name not in class_names:
                class_names.append(d.name)
    if len(class_names) < 2:
        raise DataError(f"{root} holds {len(class_names)} class folder(s); expected one folder per class (at least 2)")
    names, lookup = _apply_class_map(class_names, class_map, str(root))
    hidden = [0]
    all_files = {d: _files(d, IMAGE_EXTS + VIDEO_EXTS, hidden) for top in tops for d in _class_dirs(top) if d.name in lookup}
    # A folder the class map drops is no part of the data set: its files are counted for the notes where it can be
    # listed, and its permissions do not matter (None: it could not be listed).
    dropped = {d: _listed(d) for top in tops for d in _class_dirs(top) if d.name not in lookup}
    all_files.update({d: fs for d, fs in dropped.items() if fs is not None})
    n_video = sum(1 for fs in all_files.values() for f in fs if f.suffix.lower() in VIDEO_EXTS)
    n_image = sum(1 for fs in all_files.values() for f in fs if f.suffix.lower() in IMAGE_EXTS)
    if n_video == 0 and n_image == 0:
        raise DataError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_EXTS))}) or videos in them")
    return _Files(tops, names, lookup, all_files, dropped, hidden[0], n_video > n_image)


def _files_hash(root: Path, class_map) -> str:
    """`Dataset.files_hash` of a folder without decoding it: its files' names and bytes hashed as `_scan_folder` hashes
    them (a cheap check that a folder holds, or does not hold, a model's training files)."""
    fl = _folder_files(root, class_map)
    digest = hashlib.sha256(repr(class_map).encode())
    for top in fl.tops:
        for d in _class_dirs(top):
            if d.name not in fl.lookup:
                continue
            for f in fl.files[d]:
                if (f.suffix.lower() in VIDEO_EXTS) != fl.is_clips:
                    continue
                try:
                    with open(f, "rb") as fh:
                        h = hashlib.file_digest(fh, "sha256").hexdigest()
                except OSError as exc:
                    raise _unreadable(f, exc, "clip" if fl.is_clips else "image") from None
                digest.update(f"{_shown(f.relative_to(root).as_posix())}:{h}:{d.name}\n".encode())
    return digest.hexdigest()


# A row's one frame where its pixels are not needed (`_scan_folder(pixels=False)`): the split and the hashes of a
# folder come from its files' names and bytes, not from decoded frames.
_NO_PIXELS = np.zeros((1, 1), np.uint8)


def _scan_folder(root: Path, class_map, opts: FolderOptions, frames_per_clip: int, quality: bool = False, *,
                 pixels: bool = True, decoded: Mapping[str, np.ndarray] | None = None) -> _Scan:
    """The rows of a folder data set. `pixels=False`: each row holds one placeholder frame (`_NO_PIXELS`; a clip's row
    is then the clip itself), except the images that dedup=near compares, taken from `decoded` (id -> image as read
    here) where there, else decoded."""
    fl = _folder_files(root, class_map, opts)
    tops, names, lookup, all_files, dropped, is_clips = fl.tops, fl.names, fl.lookup, fl.files, fl.dropped, fl.is_clips
    split_dirs = fl.tops if fl.tops != [root] else []
    hidden = [fl.hidden]
    if not is_clips and (opts.roi != "none" or opts.frames is not None):
        raise DataError(f"data options roi and frames apply to clip data sets; {root} holds images")
    if not is_clips and opts.group != "clip" and not opts.folds:
        raise DataError(f"data option group={opts.group} without folds applies to clip data sets (clips.csv sources); "
                        f"{root} holds images: leave group out")
    k = opts.frames or frames_per_clip
    listed = read_split_list(opts.split) if opts.split else None
    rows: list[_Row] = []
    assigned: dict[str, str] = {}  # rel -> split, from split folders or the list
    digest = hashlib.sha256(repr(class_map).encode())
    listing = hashlib.sha256()  # the list's split and group of every file read: a regenerated list changes it
    list_dropped: list[_Row] = []
    first_clip: dict[str, str] = {}  # clip sha256 -> the first clip with those bytes (the group of its copies)
    skipped = unlisted = list_dupes = clip_copies = 0
    left_out: dict[str, int] = defaultdict(int)  # class folders the class map does not name: files per folder
    unread: list[str] = []  # ... those that could not be listed
    short: list[int] = []  # clips that gave fewer than k frames: their frame counts
    no_lock = [0]  # roi=sector: clips in which the sector detector never locked
    abstain: dict[str, str] = {}
    seen: dict[str, Path] = {}  # id -> file: two names can show alike (`_shown`)
    # quality, images: run's quality gate, each image judged on its own (`_gate_image`).
    gate: Any = None
    if quality and not is_clips:
        from edgeclf.runtime.quality import QualityGate

        gate = QualityGate()  # run's defaults
    for top in tops:
        split_name = top.name if split_dirs else "pool"
        for d in _class_dirs(top):
            if d.name not in lookup:
                if dropped[d] is None:
                    unread.append(d.relative_to(root).as_posix())
                else:
                    left_out[d.name] += sum(1 for f in all_files[d] if (f.suffix.lower() in VIDEO_EXTS) == is_clips)
                continue
            for f in all_files[d]:
                is_video = f.suffix.lower() in VIDEO_EXTS
                if is_video != is_clips:
                    skipped += 1
                    continue
                # A name that is not UTF-8 is its bytes shown as \xNN (`_shown`): text that splits, split lists, run
                # records and the hash take as they are; UTF-8 names (all of them before) are unchanged.
                rel = _shown(f.relative_to(root).as_posix())
                if rel in seen:
                    raise DataError(f"files {_shown(seen[rel])} and {_shown(f)} show as the same name (one name is not "
                                    "UTF-8 and shows its bytes as \\xNN); supported: distinct names; rename one of them")
                seen[rel] = f
                what = "clip" if is_video else "image"
                try:
                    raw = f.read_bytes()
                except OSError as exc:
                    raise _unreadable(f, exc, what) from None
                h = _hash_bytes(raw)
                digest.update(f"{rel}:{h}:{d.name}\n".encode())
                if listed is not None:
                    entry = listed.get(rel)
                    listing.update(f"{rel}:{entry[1]}:{entry[2]}\n".encode() if entry else f"{rel}:-\n".encode())
                    if entry is None:
                        unlisted += 1
                        continue
                    if not h.startswith(entry[0]):
                        raise DataError(f"{rel} changed since split list {opts.split!r} was written (its sha256 differs); "
                                        "restore the file or regenerate the list (python -m edgeclf.recipes splits)")
                    if entry[1] not in SPLITS:
                        list_dupes += 1
                        list_dropped.append((rel, entry[2], lookup[d.name], []))
                        continue  # a duplicate the list dropped
                    split_name = entry[1]
                if is_clips and not _is_utf8(str(f)):  # OpenCV cannot open it (runtime `utf8_path`)
                    raise DataError(f"clip {_shown(f)}: its path is not valid UTF-8 (e.g. a Latin-1 name from a USB stick "
                                    "or a Windows share) and OpenCV cannot open it; supported: UTF-8 names; rename it "
                                    "(e.g. convmv -f latin1 -t utf8)")
                if not pixels:
                    near = not is_clips and opts.dedup == "near" and listed is None
                    img = (decoded.get(rel) if decoded is not None else None) if near else _NO_PIXELS
                    frames, why = [img if img is not None else _read_image(f)], [""]
                elif is_clips:
                    frames, why = _sample_clip(f, k, roi=opts.roi, no_lock=no_lock, quality=quality)
                else:
                    img = _decoded(f)
                    frames, why = [_gray_if_equal(img)], [_gate_image(gate, f, img) if gate is not None else ""]
                abstain.update((fid, w) for fid, w in zip(_frame_ids(rel, len(frames)), why) if w)
                if is_clips and pixels and len(frames) < k:
                    short.append(len(frames))
                # Exact copies share a group so that they land on one side of the split; a clip's group is the
                # name of the first clip with its bytes (clip figures are read by name).
                if is_clips:
                    group = first_clip.setdefault(h, rel)
                    clip_copies += group != rel
                else:
                    group = listed[rel][2] if listed is not None else h
                rows.append((rel, group, lookup[d.name], frames))
                assigned[rel] = split_name
    notes = []
    if hidden[0]:
        notes.append(f"skipped {hidden[0]} hidden file(s) (a name or folder starting with '.': resource forks, thumbnails, "
                     "checkpoints)")
        log.warning(notes[-1])
    if clip_copies:
        notes.append(f"{clip_copies} clip(s) byte-identical to another clip grouped with it (one side of every split)")
        log.warning(notes[-1])
    if skipped:
        notes.append(f"ignored {skipped} {'image' if is_clips else 'video'} file(s) in a {'clip' if is_clips else 'image'} data set")
        log.warning(notes[-1])
    if left_out or unread:
        what = "clip(s)" if is_clips else "image(s)"
        shown = ", ".join([f"{name} ({n})" for name, n in left_out.items()] + [f"{rel} (unreadable: not counted)"
                                                                               for rel in unread])
        notes.append(f"left out {f'{sum(left_out.values())} {what} in ' if left_out else ''}class folder(s) the class "
                     f"map does not name: {shown}")
        log.warning(notes[-1])
    if unlisted:
        notes.append(f"left out {unlisted} file(s) that split list {opts.split!r} does not name (new files are never trained on silently)")
        log.warning(notes[-1])
    if list_dupes:
        notes.append(f"left out {list_dupes} file(s) that split list {opts.split!r} marks as duplicates of kept files")
        log.warning(notes[-1])
    if short:
        notes.append(f"{len(short)} clip(s) gave fewer than {k} frames ({min(short)}-{max(short)}"
                     f"{' after the sector lock' if opts.roi == 'sector' else ''}): all of their frames are used")
        log.warning(notes[-1])
    if no_lock[0]:
        notes.append(f"{no_lock[0]} clip(s) with no sector found: their frames are kept whole (evaluate abstains on them, "
                     "sector_warmup, as `edgeclf run` does)")
        log.warning(notes[-1])
    if listed is not None:
        missing = len([r for r, e in listed.items() if e[1] in SPLITS and r.split("/", 1)[0] in lookup]) - len(rows)
        if missing > 0:
            notes.append(f"{missing} file(s) named by split list {opts.split!r} are absent")
            log.warning(notes[-1])
    sources = _clip_sources(root) if is_clips else {}
    return _Scan(rows, names, is_clips, digest.hexdigest(), assigned, notes, bool(split_dirs), sources,
                 listing.hexdigest() if listed is not None else None, list_dropped, abstain)


def _mixed_groups(rows: list[_Row], names: list[str]) -> list[str]:
    """A note when copy groups hold images filed under different classes: the same picture with two labels
    (BUSI has lesions filed as both benign and malignant), or near copies chained. The group still stays on
    one side of the split; its labels disagree, which a reader of the figures should know."""
    labels: dict[str, set[int]] = defaultdict(set)
    for _, g, y, _ in rows:
        labels[g].add(int(y))
    mixed = [ys for ys in labels.values() if len(ys) > 1]
    if not mixed:
        return []
    kinds: dict[str, int] = defaultdict(int)
    for ys in mixed:
        kinds[" + ".join(names[y] for y in sorted(ys))] += 1
    note = (f"{len(mixed)} copy group(s) hold images of different classes ("
            + ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())) + "): the same picture under two labels, or near "
            "copies chained; each group stays on one side of the split")
    log.warning(note)
    return [note]


def _dedup(scan: _Scan, opts: FolderOptions) -> tuple[list[_Row], list[str], list[_Row]]:
    """Apply `opts.dedup` to an image scan without a split list: returns (rows, notes, every file's row with its
    copy group, dropped copies included: what `_mixed_groups` checks; [] with dedup=none)."""
    rows: list[_Row] = scan.rows
    notes: list[str] = []
    if scan.is_clips or opts.split:
        return rows, notes, rows
    if opts.dedup == "none":
        return [(rel, rel, y, fr) for rel, _, y, fr in rows], notes, []
    n_dupes = len(rows) - len({g for _, g, _, _ in rows})
    if opts.dedup == "exact":
        if n_dupes:
            notes.append(f"{n_dupes} exact duplicate file(s) grouped with their copies before splitting")
        return rows, notes, rows
    seen: set[str] = set()
    kept = []
    for r in rows:
        if r[1] in seen:
            continue
        seen.add(r[1])
        kept.append(r)
    roots = _near_groups([near_hash(r[3][0]) for r in kept], opts.near)
    out = [(rel, kept[roots[i]][0], y, fr) for i, (rel, _, y, fr) in enumerate(kept)]
    n_groups = len(set(roots))
    notes.append(f"dropped {n_dupes} exact duplicate file(s); grouped {len(kept) - n_groups} near copies "
                 f"(difference hash within {opts.near} bits) into {n_groups} groups before splitting")
    # A dropped copy keeps its label in the check: filed under another class, it is the same picture with two labels.
    group_of = {r[1]: kept[roots[i]][0] for i, r in enumerate(kept)}
    return out, notes, [(rel, group_of[h], y, []) for rel, h, y, _ in rows]


def _split_folder_copies(parts: dict[str, list[_Row]]) -> list[str]:
    """A note when a file in train/ val/ test/ has a byte-identical copy in an earlier split folder (rows share a
    content group): kept where the folders put it (public sets ship such copies), but its held-out figures then
    count an image also trained or validated on."""
    first: dict[str, str] = {}
    pairs: dict[str, int] = defaultdict(int)
    for s in SPLITS:
        for g in [r[1] for r in parts[s]]:
            if first.setdefault(g, s) != s:
                pairs[f"{first[g]}/{s}"] += 1
    if not pairs:
        return []
    note = (f"{sum(pairs.values())} file(s) in a split folder duplicate a file in an earlier one byte for byte ("
            + ", ".join(f"{k}: {n}" for k, n in pairs.items()) + "): kept where the folders put them, so held-out "
            "figures count images also used in training or validation")
    log.warning(note)
    return [note]


def _units(rows: list[_Row], key: dict[str, str]) -> dict[str, str]:
    """Each row's unit for group=source|site: `key` (rel -> source or site) joined with the copy group (row[1]) by
    union-find, so that byte-identical clips under two sources, or a copy without a clips.csv row, are one unit with
    their original. Returns rel -> unit name: its keys joined by " + ", or the copy group where no member has a key."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for rel, g, _, _ in rows:
        if rel in key:
            a, b = find("g:" + g), find("k:" + key[rel])  # prefixed: a source may read like a clip's path
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[str, set[str]] = defaultdict(set)
    for rel, g, _, _ in rows:
        if rel in key:
            members[find("g:" + g)].add(key[rel])
    return {rel: " + ".join(sorted(members[find("g:" + g)])) or g for rel, g, _, _ in rows}


def _shared_sources(rows: list[_Row], side: list[str], unit: dict[str, str]) -> list[str]:
    """A note when a plain clip split (grouped by clip) puts val or test clips beside a training clip of the same
    clips.csv source: often one patient, site or scanner, so their figures may be optimistic."""
    trained = {unit[r[0]] for r, s in zip(rows, side) if s == "train"}
    count = {s: (sum(1 for r, t in zip(rows, side) if t == s and unit[r[0]] in trained), side.count(s)) for s in ("test", "val")}
    if not count["test"][0] and not count["val"][0]:
        return []
    note = (f"{count['test'][0]} of {count['test'][1]} test and {count['val'][0]} of {count['val'][1]} val clip(s) share "
            "their clips.csv original_source with a training clip (the split is by clip; a source is often one patient, "
            "site or scanner, so held-out figures may be optimistic); group=source in the data spec keeps each source on "
            "one side")
    log.warning(note)
    return [note]


def _fold_split(rows: list[_Row], names: list[str], opts: FolderOptions, keys: list[str], *, seed: int,
                val_frac: float) -> dict[str, Split]:
    """Test = fold `opts.fold` of `opts.folds`, val from the rest: both stratified and grouped by the fold key
    `keys` (per row: its clip's copy group, or its `_units` source or site). Every class must reach both training and
    validation, else DataError saying how to fix it."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < val_frac < 1:
        raise DataError(f"split fraction val={val_frac} must be in (0, 1); e.g. val=0.15")
    uniq = sorted(set(keys))
    if len(uniq) < opts.folds:
        raise DataError(f"{len(uniq)} {opts.group} group(s) cannot fill {opts.folds} folds; use fewer folds or group=clip")
    y = np.array([r[2] for r in rows])
    g = np.array([uniq.index(k) for k in keys])
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer items than folds: it then misses some folds, which is checked below
        # where it matters (training and validation need every class) and said in edgeclf's words.
        warnings.filterwarnings("ignore", message="The least populated class in y", category=UserWarning)
        folds = list(StratifiedGroupKFold(n_splits=opts.folds, shuffle=True, random_state=seed).split(np.zeros(len(rows)), y, g))
    test_idx = set(folds[opts.fold][1].tolist())
    rest = [i for i in range(len(rows)) if i not in test_idx]

    def too_few(c: int, left: int) -> DataError:
        mine = y == c
        fixes = ["group by clip (--group clip, or group=clip in a data spec that names folds)"] if opts.group != "clip" else []
        fixes += [f"add {names[c]} data from more {opts.group}s", f"merge {names[c]} into another class or drop it with --classes "
                  "(NAME=A+B merges; classes not named are dropped)"]
        return DataError(f"class {names[c]} has {int(mine.sum())} item(s) in {len(set(g[mine].tolist()))} {opts.group} group(s); "
                         f"fold {opts.fold} of the {opts.folds}-fold split leaves {left} of them outside its test fold, and "
                         f"training and validation need one each; " + ", or ".join(fixes))

    for c in range(len(names)):
        left = len(set(g[rest][y[rest] == c].tolist()))
        if left < 2:
            raise too_few(c, left)
    # Validation is grouped by the same key as the test fold: early stopping, the temperature and the
    # operating point must not be chosen on clips whose source also trains the model.
    n_rest = len(set(g[rest].tolist()))
    if n_rest < 2:
        raise DataError(f"{n_rest} {opts.group} group outside the test fold leaves none for validation; "
                        "use fewer folds or group=clip")
    # StratifiedGroupKFold needs n_splits <= the largest class's count (small sets: fewer, larger inner folds).
    n_val = max(2, min(round(1 / val_frac), n_rest, int(np.bincount(y[rest]).max())))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class in y", category=UserWarning)
        inner = list(StratifiedGroupKFold(n_splits=n_val, shuffle=True, random_state=seed).split(np.zeros(len(rest)), y[rest], g[rest]))
    present = set(y[rest].tolist())

    def lacks(f: tuple[np.ndarray, np.ndarray]) -> bool:
        return set(y[rest][f[0]].tolist()) != present or set(y[rest][f[1]].tolist()) != present

    # The inner fold closest to the asked share (one large source can make a fold several times too big), among
    # those that leave every class in training and validation (where one does: the choice is otherwise unchanged).
    best = min(inner, key=lambda f: (lacks(f), abs(len(f[1]) - val_frac * len(rest)), f[1].tolist()))
    if lacks(best):
        c = min(present - set(y[rest][best[1]].tolist()) or present - set(y[rest][best[0]].tolist()))
        raise too_few(c, len(set(g[rest][y[rest] == c].tolist())))
    val_idx = {rest[j] for j in best[1].tolist()}
    return {
        "train": _to_split([rows[i] for i in rest if i not in val_idx]),
        "val": _to_split([rows[i] for i in rest if i in val_idx]),
        "test": _to_split([r for i, r in enumerate(rows) if i in test_idx]),
    }


def _load_folder(root: Path, class_map, *, seed: int, val_frac: float, test_frac: float, frames_per_clip: int,
                 opts: FolderOptions = _DEFAULT_OPTIONS, scan: _Scan | None = None, quality: bool = False) -> Dataset:
    scan = scan or _scan_folder(root, class_map, opts, frames_per_clip, quality)
    names, notes = scan.names, list(scan.notes)
    # rel -> clips.csv source or site: joined with copy groups (`_units`) it is what group=source|site splits by and
    # what intervals resample.
    key_of = {"source": scan.sources, "site": {k: _site(v) for k, v in scan.sources.items()}}
    val_frac = opts.val if opts.val is not None else val_frac
    test_frac = opts.test if opts.test is not None else test_frac
    joined_copies = False  # copies under two sources now one unit: a split earlier code drew otherwise
    if scan.split_dirs or opts.split:
        parts: dict[str, list] = {s: [] for s in SPLITS}
        for row in scan.rows:
            parts[scan.assigned[row[0]]].append(row)
        splits = {s: _to_split(parts[s]) for s in SPLITS}
        if opts.split:
            notes += _mixed_groups(scan.rows + scan.list_dropped, names)
        else:
            notes += _split_folder_copies(parts)
    else:
        rows, more, check = _dedup(scan, opts)
        notes += more
        notes += _mixed_groups(check, names)
        # Over the rows as deduplicated: an image's copy group is then its near group (or itself with dedup=none).
        unit = _units(rows, key_of[opts.group]) if opts.group != "clip" else None
        if unit is not None:
            key, keyed = key_of[opts.group], defaultdict[str, set[str]](set)  # unit -> the sources (sites) in it
            for rel, *_ in rows:
                ks = keyed[unit[rel]]
                if rel in key:
                    ks.add(key[rel])
            alone = sum(1 for r in rows if not keyed[unit[r[0]]])
            if alone:
                what = "clip(s)" if scan.is_clips else "image(s) (or copy groups)"
                notes.append(f"group={opts.group}: {alone} {what} without a clips.csv original_source, each grouped "
                             "alone as with group=clip")
                log.warning(notes[-1])
            # Earlier code keyed each row by its own source (else its copy group): where a copy group spans two such
            # keys the split moved, and the hash must say so (a run recorded then would read training clips as held out).
            before: dict[str, set[str]] = defaultdict(set)
            for rel, g, *_ in rows:
                before[g].add(key.get(rel, g))
            joined_copies = any(len(ks) > 1 for ks in before.values())
            joined = [ks for ks in keyed.values() if len(ks) > 1]
            if joined:
                notes.append(f"group={opts.group}: byte-identical clips listed under different {opts.group}s join "
                             f"{sum(map(len, joined))} of them into {len(joined)} group(s), each kept on one side of the split")
                log.warning(notes[-1])
        keys = [unit[r[0]] for r in rows] if unit is not None else [r[1] for r in rows]
        if opts.folds:
            splits = _fold_split(rows, names, opts, keys, seed=seed, val_frac=val_frac)
        else:
            side = _grouped_assign(rows, len(names), seed=seed, val_frac=val_frac, test_frac=test_frac,
                                   keys=keys if unit is not None else None)
            if unit is not None:  # as with folds: training and validation (early stopping, calibration) need every class
                have = {(r[2], s) for r, s in zip(rows, side)}
                for c, name in enumerate(names):
                    lack = [s for s in ("train", "val") if (c, s) not in have]
                    if any(r[2] == c for r in rows) and lack:
                        n = len({unit[r[0]] for r in rows if r[2] == c})
                        raise DataError(f"group={opts.group}: the {name} clips' {n} {opts.group}(s) leave none of them in "
                                        f"the {lack[0]} split; use another seed, add {name} clips from more "
                                        f"{opts.group}s, {'use group=source (finer), ' if opts.group == 'site' else ''}"
                                        "or leave group out (clips are then split alone)")
            elif scan.is_clips and scan.sources:
                # "unknown": a clips.csv row with no original_source, which says nothing about where clips came from
                known = {k: v for k, v in scan.sources.items() if v != "unknown"}
                notes += _shared_sources(rows, side, _units(rows, known))
            drawn: dict[str, list] = {s: [] for s in SPLITS}
            for r, s in zip(rows, side):
                drawn[s].append(r)
            splits = {s: _to_split(drawn[s]) for s in SPLITS}
    licence = _clip_licences(root) if scan.is_clips else None
    # From the images the model learns and is tuned on, every one of them: never from the held-out test split.
    channels = 3 if any(im.ndim == 3 for s in ("train", "val") for im in splits[s].images) else 1
    q = opts.query()
    # Options change the split, so they are part of the data's identity; plain folders keep their old hash.
    former_hash = scan.file_hash if not q else _hash_bytes(scan.file_hash.encode(), q.encode())
    # Frames sampled and a split list's assignments are the data too. Added only where they are not the default
    # (frames_per_clip hashes as frames=N does), so the data hashed before keeps its hash where they are.
    import dataclasses

    hopts = opts
    if scan.is_clips and opts.frames is None and frames_per_clip != FRAMES_PER_CLIP:
        hopts = dataclasses.replace(opts, frames=frames_per_clip)

    def hashed(o: FolderOptions) -> str:
        hq = o.query() + ("&units=joined" if joined_copies else "")
        h = scan.file_hash if not hq else _hash_bytes(scan.file_hash.encode(), hq.encode())
        return h if scan.list_hash is None else _hash_bytes(h.encode(), b"split list", scan.list_hash.encode())

    # A split list given as a file enters by its contents (list_hash) alone: its path differs between machines and
    # folders. A committed list keeps its name in the hash (the same everywhere), so its data keeps the hash it had.
    by_path = opts.split is not None and not _committed_split(opts.split)
    data_hash = hashed(dataclasses.replace(hopts, split=None) if by_path else hopts)
    path_hash = hashed(hopts) if by_path else None
    former = former_hash if former_hash != data_hash and not joined_copies else None
    if opts.group != "clip" and scan.sources:
        # clips.csv decides this split: the source (site) of every clip read is the data too, else an edited clips.csv
        # re-draws the split under the same hash. A run recorded before they were hashed has the hash computed so far
        # (the same files and options): it is the former one (`require_training_data` warns that its sources are
        # unchecked); runs recorded before frames were hashed (the former hash until now) no longer match here.
        key = key_of[opts.group]
        read = sorted((rel, key[rel]) for rel, *_ in scan.rows if rel in key)
        former = data_hash
        data_hash = _hash_bytes(data_hash.encode(), b"sources", json.dumps(read).encode())
    return Dataset(
        spec=f"{root}?{q}" if q else str(root), kind="clips" if scan.is_clips else "images",
        task="binary" if len(names) == 2 else "multiclass",
        labels=names, splits=splits, data_hash=data_hash, licence=licence, channels_hint=channels,
        modality="ultrasound" if scan.is_clips else "generic", notes=notes,
        sources=_units(scan.rows, key_of["site"]) if scan.is_clips else {},
        clip_source=_units(scan.rows, key_of["source"]) if scan.is_clips else {},
        former_hash=former, path_hash=path_hash, files_hash=scan.file_hash, abstain=scan.abstain,
    )


def make_split_list(spec: str, *, seed: int = 0) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Split an image folder once, with the spec's options (e.g. `DIR?dedup=near&near=24&test=0.2&val=0.1`),
    into rows (path, sha256 prefix, split, group) to commit as a split list: exact copies dropped ("duplicate",
    with their kept copy's group), near copies grouped. Returns (rows sorted by path, notes)."""
    base, opts = split_spec(spec)
    root = Path(base).expanduser().resolve()
    if _path_kind(root) != "dir" or opts.split or opts.folds:
        raise DataError(f"a split list is made from an image folder without split or folds options; got {spec}")
    scan = _scan_folder(root, None, opts, 1)
    if scan.is_clips or scan.split_dirs:
        raise DataError(f"{root} holds clips or split folders; split lists are for image folders without train/ val/ test/")
    sha = {rel: g for rel, g, _, _ in scan.rows}
    rows, notes, _ = _dedup(scan, opts)
    parts = _grouped_split(rows, len(scan.names), seed=seed, val_frac=opts.val if opts.val is not None else 0.15,
                           test_frac=opts.test if opts.test is not None else 0.15)
    out, group_of_sha = [], {}
    for name in SPLITS:
        for rid, grp in zip(parts[name].ids, parts[name].groups):
            g = sha.get(grp, grp)[:12]
            out.append((rid, sha[rid][:16], name, g))
            group_of_sha[sha[rid]] = g
    kept = {r[0] for r in out}
    out += [(rel, h[:16], "duplicate", group_of_sha.get(h, h[:12])) for rel, h in sha.items() if rel not in kept]
    return sorted(out, key=lambda r: natural_key(r[0])), notes


def load_folds(spec: str, folds: int, *, classes: str | None = None, seed: int = 0, val_frac: float = 0.15,
               frames_per_clip: int = FRAMES_PER_CLIP, group: str = "clip", quality: bool = False) -> list[Dataset]:
    """The K data sets of a cross-validation over a folder, decoded once; each one's `spec` is the
    query spec (`...?folds=K&fold=i`) that rebuilds it alone with `load_dataset`."""
    base, opts = split_spec(spec)
    import dataclasses

    path = Path(base).expanduser().resolve()
    if _path_kind(path) != "dir":
        raise DataError(f"--folds needs a folder data set (images or clips); {spec} is not a folder")
    # The spec's own grouping wins (folds=K, or group= without folds); cv.json records it (not the request).
    named = bool(opts.folds) or opts.group != "clip"
    if named and opts.group != group:
        log.warning("data spec %s groups by %s: the requested group %s is not used", spec_name(spec), opts.group, group)
    opts = dataclasses.replace(opts, folds=folds, fold=0, group=opts.group if named else group)
    class_map = parse_class_map(classes)
    scan = _scan_folder(path, class_map, opts, frames_per_clip, quality)
    return [
        _load_folder(path, class_map, seed=seed, val_frac=val_frac, test_frac=0.15, frames_per_clip=frames_per_clip,
                     opts=dataclasses.replace(opts, fold=i), scan=scan)
        for i in range(folds)
    ]


def split_ids(spec: str, *, classes: str | None = None, seed: int = 0, frames_per_clip: int = FRAMES_PER_CLIP,
              like: Dataset | None = None) -> tuple[dict[str, list[str]], set[str]]:
    """Which split `load_dataset(spec, ...)` puts each item in, without decoding what the split does not depend on:
    (split -> its ids: an image's id, or a clip's (`clip_of` of its frames' ids); the hashes that reading is known by,
    as `require_training_data` compares them). A folder's split comes from its files' names and bytes; only dedup=near
    compares pixels, taken from `like` (the same folder read otherwise, e.g. plain) where it holds the image. Other
    data is read whole."""
    base, opts = split_spec(spec)
    root = Path(base).expanduser().resolve()
    if spec.startswith("synthetic:") or _path_kind(root) != "dir":
        ds = load_dataset(spec, classes=classes, seed=seed, frames_per_clip=frames_per_clip)
    else:
        class_map = parse_class_map(classes)
        decoded = ({i: im for sp in like.splits.values() for i, im in zip(sp.ids, sp.images)}
                   if like is not None and like.kind == "images" else None)
        scan = _scan_folder(root, class_map, opts, frames_per_clip, pixels=False, decoded=decoded)
        ds = _load_folder(root, class_map, seed=seed, val_frac=0.15, test_frac=0.15, frames_per_clip=frames_per_clip,
                          opts=opts, scan=scan)
    hashes = {h for h in (ds.data_hash, ds.former_hash, ds.path_hash) if h}
    return {n: list(sp.ids) for n, sp in ds.splits.items()}, hashes


def _sample_clip(path: Path, k: int, roi: str = "none", no_lock: list[int] | None = None,
                 quality: bool = False) -> tuple[list[np.ndarray], list[str]]:
    """k frames evenly spaced over the clip, decoded through the runtime's own video source. With
    roi="sector" every frame goes through the runtime's SectorDetector as `edgeclf run --roi sector` feeds it,
    and the frames are sampled from the first lock on (before it the runtime abstains with sector_warmup).

    Returns (frames, reasons): per sampled frame, the abstain_reason `edgeclf run`'s records would give it before
    classifying it, "" where run classifies it: "sector_warmup" while the detector is provisional (a clip that never
    locks: every frame); with `quality`, run's default QualityGate's reasons joined by "," or "frame_error"."""
    from edgeclf.runtime.pipeline import FRAME_ERROR, SECTOR_WARMUP
    from edgeclf.runtime.sources import open_source

    try:
        with open_source(str(path)) as src:
            frames = [f.image for f in src]
    except Exception as exc:
        raise DataError(f"clip {path} could not be decoded ({exc}); remove or re-encode it") from None
    if not frames:
        raise DataError(f"clip {path} has no decodable frames; remove or re-encode it")
    start, sectors = 0, None
    why = [""] * len(frames)
    if roi == "sector":
        from edgeclf.runtime.sector import SectorDetector

        det = SectorDetector()
        sectors = []
        for i, f in enumerate(frames):
            sectors.append(det.update(f))
            if det.provisional:  # pipeline.produce(): no crop yet, not classified nor gated
                why[i] = SECTOR_WARMUP
        first = next((i for i, s in enumerate(sectors) if s.locked), None)
        if first is None:
            log.warning("clip %s: no sector found; its frames stay whole (evaluate abstains on them: %s)", path.name,
                        SECTOR_WARMUP)
            if no_lock is not None:
                no_lock[0] += 1  # counted in the data set's notes
        start = first or 0
    idx = start + np.unique(np.linspace(0, len(frames) - 1 - start, num=min(k, len(frames) - start)).round().astype(int))
    if quality:
        from edgeclf.runtime.quality import QualityGate

        gate = QualityGate()  # run's defaults; one per clip, as run resets it at each new segment
        # Every frame up to the last sampled one, in order, as pipeline.produce() feeds the gate: its frozen run and
        # texture baseline depend on the frames between the sampled ones. The whole frame, with the sector's mask.
        for i in range(int(idx[-1]) + 1):
            if why[i]:
                continue
            mask = sectors[i].mask if sectors is not None and sectors[i].kind != "full" else None
            try:
                why[i] = ",".join(gate.check(frames[i], mask).reasons)
            except DataError as exc:  # run: this frame abstains with frame_error, the clip goes on
                log.warning("clip %s, frame %d: the quality gate failed on it (%s); it abstains with %s", path.name, i,
                            " ".join(str(exc).split())[:300], FRAME_ERROR)
                why[i] = FRAME_ERROR
    reasons = [why[i] for i in idx]
    if sectors is None:
        return [_gray_if_equal(frames[i]) for i in idx], reasons
    from edgeclf.runtime.sector import apply_sector

    return [_gray_if_equal(np.ascontiguousarray(apply_sector(frames[i], sectors[i]))) for i in idx], reasons


def _frame_ids(rel: str, n: int) -> list[str]:
    """The frame ids of a row of `n` frames: its relative path alone for one frame, else `rel#j`."""
    return [rel] if n == 1 else [f"{rel}#{j}" for j in range(n)]


def _to_split(rows: list[tuple[str, str, int, list[np.ndarray]]]) -> Split:
    images, labels, ids, groups = [], [], [], []
    for rel, group, label, frames in rows:
        for fid, im in zip(_frame_ids(rel, len(frames)), frames):
            images.append(im)
            labels.append(label)
            ids.append(fid)
            groups.append(group)
    return Split(images=images, labels=np.asarray(labels, np.int64), ids=ids, groups=groups)


def _grouped_split(rows, n_classes: int, *, seed: int, val_frac: float, test_frac: float) -> dict[str, Split]:
    """Stratified by class over groups (duplicate sets or clips), seeded."""
    side = _grouped_assign(rows, n_classes, seed=seed, val_frac=val_frac, test_frac=test_frac)
    parts: dict[str, list] = {s: [] for s in SPLITS}
    for row, s in zip(rows, side):
        parts[s].append(row)
    return {s: _to_split(parts[s]) for s in SPLITS}


def _grouped_assign(rows, n_classes: int, *, seed: int, val_frac: float, test_frac: float,
                    keys: list[str] | None = None) -> list[str]:
    """Each row's split, stratified by class over groups (row[1], or `keys` per row: sources or sites), seeded. A
    keyed group of several classes counts under its most frequent one (row[1] groups: their first row's, as always),
    and keyed groups fill the held-out shares by rows, not by groups: sources differ in size."""
    if not 0 < val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise DataError(f"split fractions val={val_frac} test={test_frac} must be in (0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    key = keys if keys is not None else [r[1] for r in rows]
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(key):
        by_group[g].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g, idx in sorted(by_group.items()):
        ys = [rows[i][2] for i in idx]
        by_class[max(ys, key=ys.count) if keys is not None else ys[0]].append(g)
    assign: dict[str, str] = {}
    for c in range(n_classes):
        gs = by_class.get(c, [])
        order = [gs[i] for i in rng.permutation(len(gs))]
        if keys is not None:
            size = {g: len(by_group[g]) for g in order}
            want = {"test": test_frac * sum(size.values()), "val": val_frac * sum(size.values())}
            got = dict.fromkeys(want, 0)
            for g in order:  # in the seeded order, each group to the first share it brings nearer its target
                s = next((s for s in ("test", "val") if got[s] + size[g] / 2 < want[s]), "train")
                assign[g] = s
                got[s] = got.get(s, 0) + size[g]
            for s in ("test", "val") if len(gs) >= 3 else ():
                left = [g for g in order if assign[g] == "train"]
                if not got[s] and want[s] > 0 and len(left) > 1:  # all too large for the share: the smallest, not the last
                    g = min(left, key=size.__getitem__)
                    assign[g], got[s] = s, size[g]
            continue
        n_test = int(round(len(gs) * test_frac))
        n_val = int(round(len(gs) * val_frac))
        if len(gs) >= 3:
            n_test, n_val = max(n_test, 1 if test_frac > 0 else 0), max(n_val, 1)
        for j, g in enumerate(order):
            assign[g] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    return [assign[g] for g in key]


def _clip_licences(root: Path) -> str | None:
    csv_path = root / "clips.csv"
    if not csv_path.is_file():
        return None
    import csv

    with _read_text(csv_path, f"clips.csv of {_shown(root)}") as f:
        lic = sorted({(row.get("license") or "").strip() for row in csv.DictReader(f)} - {""})
    return "per clip: " + "; ".join(lic) if lic else None
