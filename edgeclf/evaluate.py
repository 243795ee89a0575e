"""`edgeclf evaluate`: the same metrics for a training folder (torch) and a bundle (ONNX Runtime)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.data import load_dataset
from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime.bundle import MANIFEST_FILE, load_bundle
from edgeclf.runtime.postprocess import probabilities
from edgeclf.runtime.preprocess import Preprocessor

__all__ = ["evaluate"]

log = logging.getLogger(__name__)


def _with_recorded_options(data_spec: str, recorded: dict[str, Any]) -> str:
    """A bundle or folder trained on `DIR?options` (a split list, dedup, folds, sector crop) evaluated with a
    plain `--data DIR` of the same name gets the recorded options, so that its test split is the held-out one."""
    rec = str(recorded.get("name") or Path(str(recorded.get("spec", "")).partition("?")[0]).name + (
        "?" + str(recorded.get("spec", "")).partition("?")[2] if "?" in str(recorded.get("spec", "")) else ""))
    base, _, query = rec.partition("?")
    if not query or "?" in data_spec or data_spec.startswith("synthetic:"):
        return data_spec
    if Path(data_spec.rstrip("/")).name != base:
        return data_spec
    return f"{data_spec.rstrip('/')}?{query}"


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
) -> dict[str, Any]:
    """Evaluate a training folder or a bundle on a data split; writes metrics.json and PNGs into `out`."""
    from edgeclf.metrics import evaluate_predictions, plot_confusion, plot_roc

    path = Path(target)
    if (path / MANIFEST_FILE).is_file():
        bundle = load_bundle(path)
        m = bundle.manifest
        model_path, variant = bundle.select(precision, "ort-cpu")
        task, labels, spec, temperature, rule = m.task, list(m.labels), m.preprocess, m.temperature, m.decision
        recorded = m.raw["provenance"].get("data") or {}
        train_cfg = (m.raw["provenance"].get("training") or {}).get("config") or {}
        seed = train_cfg.get("seed", 0)
        min_confidence = float(getattr(m, "min_confidence", 0.0) or 0.0)
        source = f"bundle (onnxruntime, {variant})"

        def infer(x: np.ndarray) -> np.ndarray:
            from edgeclf.runtime.backends import OrtBackend

            with OrtBackend(str(model_path), (spec.channels, *spec.size), m.num_outputs, threads=threads) as be:
                return np.concatenate([be.infer(x[i : i + 64]) for i in range(0, len(x), 64)])
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
    # Bundles name their data without workstation paths: a synthetic spec is its own name.
    data_spec = data or recorded.get("spec") or (recorded.get("name") if str(recorded.get("name", "")).startswith("synthetic:") else None)
    if not data_spec:
        raise ConfigError(f"{target} does not say where its data is (bundles keep no workstation paths); pass --data SPEC")
    data_spec = _with_recorded_options(data_spec, recorded)
    ds = load_dataset(data_spec, classes=classes if classes is not None else recorded.get("classes"), seed=seed,
                      frames_per_clip=int(train_cfg.get("frames_per_clip", 8)))
    same_set = data is None or ds.name == (recorded.get("name") or Path(str(recorded.get("spec", ""))).name)
    if same_set and recorded.get("hash") and ds.data_hash != recorded["hash"] and split != "all":
        # Re-splitting changed data can move training images into the test split.
        raise DataError(
            f"data {ds.name} changed since the model was trained (its hash differs), so its {split} split is no longer the one "
            "held out in training; evaluate with --split all on new data, or retrain"
        )
    if ds.labels != labels or ds.task != task:
        raise ConfigError(f"data {data_spec} has {ds.task} labels {ds.labels}; the model has {task} labels {labels}; use --classes to map them")
    sp = ds.split(split)
    pre = Preprocessor(spec)
    x = pre.batch(sp.images)
    probs = probabilities(infer(x), task, temperature)
    report: dict[str, Any] = {
        "target": str(path),
        "evaluated_with": source,
        "data": {"spec": data_spec, "split": split, "n": len(sp), "hash": ds.data_hash},
        "metrics": evaluate_predictions(probs, sp.labels, task, rule, labels, n_boot=n_boot, seed=0, groups=sp.groups),
    }
    if ds.kind == "clips" and task != "multilabel":
        from edgeclf.metrics import clip_metrics

        # Clip-level figures: the aggregation `edgeclf run` applies at the end of a clip (edgeclf.runtime.clips).
        report["clips"] = clip_metrics(probs, sp.labels, sp.ids, rule, labels, min_confidence=min_confidence, n_boot=n_boot, seed=0)
    if out:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "metrics.json").write_text(json.dumps(report, indent=2))
        plot_roc(probs, sp.labels, task, labels, o / "roc.png", positive=rule.positive if rule.positive is not None else 1)
        plot_confusion(report["metrics"]["confusion_matrix"], labels, o / "confusion.png", title=f"{path.name} on {split}")
        report["files"] = [str(o / f) for f in ("metrics.json", "roc.png", "confusion.png")]
    return report
