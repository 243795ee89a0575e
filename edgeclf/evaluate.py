"""`edgeclf evaluate`: the same metrics for a training folder (torch) and a bundle (ONNX Runtime)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.data import Dataset, load_dataset, load_training_data, split_spec
from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime.bundle import MANIFEST_FILE, load_bundle
from edgeclf.runtime.postprocess import decide, probabilities
from edgeclf.runtime.preprocess import Preprocessor

__all__ = ["evaluate"]

log = logging.getLogger(__name__)


def _sector_spec(spec: str, target: str) -> str:
    """The data spec for a model trained on sector crops: a clip folder that names no roi is cropped to the sector as
    in training and as `edgeclf run` feeds the model (whole screens would measure another input than the one
    deployed). An explicit roi is kept, with a warning unless it is sector; images (no sector crop for them) are
    warned about."""
    from urllib.parse import parse_qsl

    from edgeclf.data import check_spec_options, with_options

    if spec.startswith("synthetic:"):
        return spec
    if "roi" in {k for k, _ in parse_qsl(spec.partition("?")[2], keep_blank_values=True)}:
        if split_spec(spec)[1].roi != "sector":
            log.warning("%s was trained on sector crops; data spec roi=%s evaluates it on whole frames, which it never saw "
                        "in training", target, split_spec(spec)[1].roi)
        return spec
    kind = check_spec_options(spec)
    if kind == "clips":
        log.info("%s was trained on sector crops: the clips are cropped to the sector (roi=sector) as in training", target)
        return with_options(spec, roi="sector")
    if kind == "images":
        log.warning("%s was trained on sector crops of clips; %s holds images, which are evaluated whole (roi=sector "
                    "applies to clips); evaluate on the clips or on images cropped to the sector", target, spec)
    return spec


def _abstained(probs: np.ndarray, task: str, rule: Any, min_confidence: float) -> np.ndarray:
    """(N,) bool: the frames `edgeclf run` abstains on (metrics.abstained_frames on the rule's decisions)."""
    from edgeclf.metrics import abstained_frames

    if task == "multilabel" or min_confidence <= 0:
        return abstained_frames(probs, min_confidence)
    return abstained_frames(probs, min_confidence, decide(probs, rule))


def _frame_metrics(probs: np.ndarray, y: np.ndarray, task: str, rule: Any, labels: list[str], groups: list[str],
                   min_confidence: float, n_boot: int, seed: int = 0, why: list[str] | None = None) -> dict[str, Any]:
    """Frame figures as `edgeclf run` decides: over the classified frames, those run does not stop before classifying
    (`why`: per frame its abstain reason, "" for none: see Dataset.abstain) and whose decided class's probability
    reaches the bundle's `min_confidence` (probs (N, K) float, y (N,) or (N, K)), with abstained, abstain_reasons
    (frames per reason, as run's summary counts them), coverage (classified / N) and min_confidence beside them. With
    frames abstained, `all_frames` holds the figures at 100% coverage (every frame decided, the gate and the floor
    ignored); when every frame abstained the figures are None (undefined). `seed` seeds the bootstrap intervals
    (evaluate passes the model's training seed, so that training's own test figures, computed here too, come out the
    same)."""
    from edgeclf.metrics import evaluate_predictions
    from edgeclf.runtime.smoothing import ABSTAIN_LOW_CONFIDENCE

    why = why if why is not None else [""] * len(probs)
    gated = np.array([bool(w) for w in why], bool)
    low = _abstained(probs, task, rule, min_confidence) & ~gated
    kept = ~(gated | low)
    n, n_kept = len(kept), int(kept.sum())
    reasons: dict[str, int] = {}
    for w in [w for w in why if w] + [ABSTAIN_LOW_CONFIDENCE] * int(low.sum()):
        reasons[w] = reasons.get(w, 0) + 1
    beside = {"abstained": n - n_kept, "abstain_reasons": reasons, "coverage": n_kept / n if n else None,
              "min_confidence": float(min_confidence)}
    if n_kept == n:
        return {**evaluate_predictions(probs, y, task, rule, labels, n_boot=n_boot, seed=seed, groups=groups), **beside}
    log.info("%d of %d frames abstained (%s): figures over the %d classified", n - n_kept, n,
             ", ".join(f"{k} {v}" for k, v in reasons.items()), n_kept)
    every = evaluate_predictions(probs, y, task, rule, labels, n_boot=n_boot, seed=seed, groups=groups)
    if n_kept:
        figures = evaluate_predictions(probs[kept], y[kept], task, rule, labels, n_boot=n_boot, seed=seed,
                                       groups=[g for g, k in zip(groups, kept) if k])
    else:  # nothing classified: every figure is undefined, the layout stays the same
        k = len(every["confusion_matrix"])
        figures = {**every, "n": 0, "accuracy": None, "balanced_accuracy": None, "ece": None,
                   "auc": {**every["auc"], "macro": None, "macro_ci95": None, "n_boot_used": 0,
                           "per_class": {name: None for name in every["auc"]["per_class"]}},
                   "per_class": {name: {"sensitivity": None, "specificity": None, "support": 0} for name in every["per_class"]},
                   "confusion_matrix": [[0] * k for _ in range(k)]}
    return {**figures, **beside, "all_frames": every}


def _model_splits(ds: Dataset, recorded: dict[str, Any], folder: Path | None, imported: bool,
                  as_trained: Any) -> dict[str, set[str]] | None:
    """The clips (an image is its own) of the model's train, val and test splits, where `ds` is its training data: the
    recorded content hash, or a folder's files under other options (`--split all` reads a plain folder as given). An
    imported model's recorded data is export's: only its val split is known (its temperature and operating point were
    fitted there), not what the model trained on. None for other data. `as_trained()` gives the ids of each split of the
    data read with the recorded options (a bundle keeps no split lists), None where that reading is not the recorded
    data."""
    from edgeclf.runtime.clips import clip_of

    rec_hash, files_hash = recorded.get("hash"), recorded.get("files_hash")
    same_data = bool(rec_hash) and rec_hash in (ds.data_hash, ds.former_hash, ds.path_hash)
    if not (same_data or (files_hash and files_hash == ds.files_hash)):
        return None
    names = ("val",) if imported else ("train", "val", "test")
    listed = [folder / "splits" / f"{n}.txt" for n in names] if folder is not None else []
    lists: dict[str, list[str]]
    if listed and all(f.is_file() for f in listed):  # a training folder's own split lists
        lists = {n: f.read_text().splitlines() for n, f in zip(names, listed)}
    else:
        ids = {n: list(sp.ids) for n, sp in ds.splits.items()} if same_data else as_trained()
        if ids is None:
            return None
        lists = {n: ids[n] for n in names if n in ids}
    return {n: {clip_of(i) for i in ids} for n, ids in lists.items()}


def _say_what_the_model_saw(report: dict[str, Any], target: str, ids: list[str], splits: dict[str, set[str]] | None,
                            imported: bool, read_test: bool) -> None:
    """Count the evaluated items in the model's own splits (report["data"]["in_model_splits"]; None: other data) and warn
    where figures include items it was trained, early-stopped or calibrated on; note a --no-test run's unread test split."""
    from edgeclf.runtime.clips import clip_of

    if splits is None:
        report["data"]["in_model_splits"] = None
        return
    clips = [clip_of(i) for i in ids]
    counts = {n: sum(c in members for c in clips) for n, members in splits.items()}
    report["data"]["in_model_splits"] = counts
    seen = []
    if counts.get("train"):
        seen.append(f"{counts['train']} in its train split (trained on)")
    if counts.get("val"):
        seen.append(f"{counts['val']} in its val split (" + ("its temperature and operating point were fitted on them at export)"
                    if imported else "early-stopped on, its temperature and operating point fitted on them)"))
    if seen:
        # An imported model's training data is not known: its test split is only known not to be calibrated on.
        log.warning("%s: of the %d items evaluated, %s: these figures are optimistic, not held-out; --split test gives %s",
                    target, len(ids), " and ".join(seen), "figures on items it was not calibrated on" if imported else
                    "the held-out ones (--split all is for new data)")
    if counts.get("test") and not read_test:
        report["data"]["test_read_at_training"] = False
        log.info("%s was trained with --no-test: %d of the items evaluated are in its test split, which its training never "
                 "read; settings chosen after seeing these figures make them validation figures", target, counts["test"])


def evaluate(
    target: str,
    *,
    data: str | None = None,
    split: str = "test",
    classes: str | None = None,
    out: str | None = None,
    precision: str | None = None,
    n_boot: int = 1000,
    threads: int | None = None,
    quality: bool = True,
) -> dict[str, Any]:
    """Evaluate a training folder or a bundle on a data split; writes metrics.json and PNGs into `out`.

    The frames and images `edgeclf run` would not classify abstain here too: on clips, frames before the sector locks
    (roi=sector); with `quality` (on by default, as in run; off as `run --no-quality`), the clip frames and the images
    its quality gate stops (an image judged on its own, as run judges a still).

    On the model's own data, report["data"]["in_model_splits"] counts the items evaluated per split of the model (train,
    val, test; an imported model: its export's val split, where it was calibrated), with a warning where figures include
    items it was trained, early-stopped or calibrated on (`--split all`, `val`, `train`); None for other data."""
    from edgeclf.metrics import plot_confusion, plot_roc

    path = Path(target)
    if (path / MANIFEST_FILE).is_file():
        bundle = load_bundle(path)
        m = bundle.manifest
        model_path, variant = bundle.select(precision, "ort-cpu")
        task, labels, spec, temperature, rule = m.task, list(m.labels), m.preprocess, m.temperature, m.decision
        # provenance is an open object: its members are checked for type here, not at load.
        rec, training = m.raw["provenance"].get("data"), m.raw["provenance"].get("training")
        config = training.get("config") if isinstance(training, dict) else None
        recorded: dict[str, Any] = rec if isinstance(rec, dict) else {}
        train_cfg: dict[str, Any] = config if isinstance(config, dict) else {}
        seed = train_cfg.get("seed", 0)
        min_confidence = float(getattr(m, "min_confidence", 0.0) or 0.0)
        source = f"bundle (onnxruntime, {variant})"
        sector = m.trained_on_sector
        # An imported model's temperature and operating point were fitted at export, on the val split of its data.
        imported = m.raw["provenance"].get("source") in ("onnx", "torch")
        folder: Path | None = None

        def infer(x: np.ndarray) -> np.ndarray:
            from edgeclf.export.bundle_writer import infer_all
            from edgeclf.runtime.backends import create_backend

            # bundle=: the session is made from the bytes verified at load
            with create_backend(str(model_path), (spec.channels, *spec.size), m.num_outputs, threads=threads, bundle=bundle) as be:
                return infer_all(be, x)  # a fixed-batch model: the last chunk padded, the padding's outputs dropped
    else:
        from edgeclf.train import load_trained

        if precision not in (None, "fp32"):
            raise ConfigError(f"a training folder holds the fp32 torch model only; evaluate {precision} on the exported bundle")
        tm = load_trained(path)
        task, labels, spec, temperature, rule = tm.task, tm.labels, tm.preprocess, tm.temperature, tm.decision
        recorded = tm.run.get("data", {})
        train_cfg = tm.run.get("config", {}) or {}
        seed = train_cfg.get("seed", 0)
        min_confidence = 0.0
        source = "training folder (torch)"
        infer = tm.logits
        imported, folder = False, path
        # Runs from before preprocess.sector was recorded say it in their data spec.
        sector = spec.sector or (bool(recorded.get("spec")) and split_spec(str(recorded["spec"]))[1].roi == "sector")
    # Bundles name their data without workstation paths: a synthetic spec is its own name.
    data_spec = data or recorded.get("spec") or (recorded.get("name") if str(recorded.get("name", "")).startswith("synthetic:") else None)
    if not data_spec:
        raise ConfigError(f"{target} does not say where its data is (bundles keep no workstation paths); pass --data SPEC")
    fpc = int(train_cfg.get("frames_per_clip", 8))
    read: list[str] = []  # the spec read last: the one reported

    def load(s: str) -> Dataset:
        read.append(_sector_spec(s, str(target)) if sector else s)
        return load_dataset(read[-1], classes=classes if classes is not None else recorded.get("classes"), seed=seed,
                            frames_per_clip=fpc, quality=quality)

    if split == "all":  # the data whole, as given: no held-out split to keep apart from training
        ds = load(data_spec)
    else:  # the training data by content, read as trained (another folder name too); other data only with its own split
        ds = load_training_data(data_spec, recorded, load, data_given=data,
                                use=f"its {split} split is no longer the one held out in training",
                                fix="evaluate with --split all on new data, or retrain",
                                new_data="evaluate new data with --split all")
    data_spec = read[-1]
    if ds.labels != labels or ds.task != task:
        raise ConfigError(f"data {data_spec} has {ds.task} labels {ds.labels}; the model has {task} labels {labels}; use --classes to map them")
    sp = ds.split(split)
    why = [ds.abstain.get(i, "") for i in sp.ids]  # frames run would not classify: abstained here too
    stopped = np.array([bool(w) for w in why], bool)

    def as_trained() -> dict[str, list[str]] | None:
        """The split ids of the data read with its recorded options (the same files given plain), for the model's split
        lists: from the files' names and bytes, the pixels `ds` decoded reused where the split compares them (its
        frames are not decoded a second time)."""
        from edgeclf.data import recorded_options, split_ids

        q = recorded_options(recorded)
        try:
            ids, hashes = split_ids(f"{split_spec(ds.spec)[0]}?{q}" if q else split_spec(ds.spec)[0],
                                    classes=classes if classes is not None else recorded.get("classes"), seed=seed,
                                    frames_per_clip=fpc, like=ds)
        except DataError as exc:
            log.warning("%s holds the model's training files, but read with the recorded options ?%s it fails (%s): which "
                        "of them it trained on is not known here", ds.name, q, exc)
            return None
        return ids if recorded.get("hash") in hashes else None

    splits_seen = _model_splits(ds, recorded, folder, imported, as_trained)
    pre = Preprocessor(spec)
    x = pre.batch(sp.images)
    probs = probabilities(infer(x), task, temperature)
    if task == "multilabel" and min_confidence > 0:
        # `edgeclf run` applies the floor to binary and multiclass models only (one decided class per frame).
        log.info("the bundle's min_confidence %.3f does not apply to a multilabel model: every frame is classified", min_confidence)
        min_confidence = 0.0
    report: dict[str, Any] = {
        "target": str(path),
        "evaluated_with": source,
        "data": {"spec": data_spec, "split": split, "n": len(sp), "hash": ds.data_hash},
        # Bootstrap seeded with the model's training seed (as training's own test figures are): one model, one interval.
        "metrics": _frame_metrics(probs, sp.labels, task, rule, labels, sp.groups, min_confidence, n_boot, seed=seed, why=why),
    }
    _say_what_the_model_saw(report, str(target), list(sp.ids), splits_seen, imported, bool(train_cfg.get("read_test", True)))
    if ds.kind == "clips" and task != "multilabel":
        from edgeclf.metrics import clip_metrics

        # Clip-level figures: the aggregation `edgeclf run` applies at the end of a clip (edgeclf.runtime.clips).
        report["clips"] = clip_metrics(probs, sp.labels, sp.ids, rule, labels, min_confidence=min_confidence, n_boot=n_boot, seed=seed,
                                       stopped=stopped)
        # Sampled frames, not every frame as run's clip decision: said beside the figures (short clips give all theirs).
        report["clips"]["frames_per_clip"] = split_spec(ds.spec)[1].frames or fpc
    if out:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "metrics.json").write_text(json.dumps(report, indent=2))
        # The figures' frames: the classified ones (all of them without a confidence floor or a stopped frame).
        kept = ~_abstained(probs, task, rule, min_confidence) & ~stopped
        files = ["metrics.json"]
        if kept.any():
            plot_roc(probs[kept], sp.labels[kept], task, labels, o / "roc.png", positive=rule.positive if rule.positive is not None else 1)
            files.append("roc.png")
        else:
            log.warning("every frame abstained (%s): no roc.png",
                        ", ".join(f"{k} {v}" for k, v in report["metrics"]["abstain_reasons"].items()))
        n_abs = report["metrics"]["abstained"]
        plot_confusion(report["metrics"]["confusion_matrix"], labels, o / "confusion.png",
                       title=f"{path.name} on {split}" + (f" ({n_abs} abstained)" if n_abs else ""))
        files.append("confusion.png")
        report["files"] = [str(o / f) for f in files]
    return report
