"""`edgeclf demo`: the whole chain offline in about a minute.

synthetic B-mode data -> train the compact CNN -> export and verify a bundle -> run the torch-free
runtime on a synthetic cine loop read back through OpenCV -> compare with the ground-truth timeline.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["run_demo", "timeline_agreement"]

log = logging.getLogger(__name__)


def timeline_agreement(predicted: list[str], timeline: dict[str, Any]) -> dict[str, Any]:
    """Frame-level agreement with a ground-truth timeline, and per segment (majority label, agreement)."""
    truth = [""] * timeline["frames"]
    for seg in timeline["segments"]:
        for i in range(seg["start"], seg["end"]):
            truth[i] = seg["label"]
    n = min(len(predicted), len(truth))
    segments = []
    for seg in timeline["segments"]:
        pred = predicted[seg["start"] : min(seg["end"], n)]
        labels, counts = np.unique(pred, return_counts=True) if pred else (np.array([""]), np.array([0]))
        segments.append({
            "label": seg["label"], "start": seg["start"], "end": seg["end"],
            "majority": str(labels[int(np.argmax(counts))]),
            "agreement": float(np.mean([p == seg["label"] for p in pred])) if pred else 0.0,
        })
    return {
        "frames_compared": n,
        "frames_in_timeline": len(truth),
        "frames_predicted": len(predicted),
        "agreement": float(np.mean([p == t for p, t in zip(predicted[:n], truth[:n])])) if n else 0.0,
        "segments": segments,
    }


def _plot_timeline(predicted: list[str], timeline: dict[str, Any], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = {c: i for i, c in enumerate(classes)}
    truth = np.zeros(timeline["frames"])
    for seg in timeline["segments"]:
        truth[seg["start"] : seg["end"]] = idx[seg["label"]]
    fig, ax = plt.subplots(figsize=(9, 2.6), dpi=110)
    ax.step(range(len(truth)), truth, where="post", lw=3, alpha=0.5, label="ground truth")
    ax.plot(range(len(predicted)), [idx.get(p, -1) for p in predicted], ".", ms=3, label="runtime")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("frame")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("cine loop: runtime labels vs ground truth")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(out: str = "edgeclf-demo", *, seed: int = 0, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    from edgeclf.evaluate import evaluate
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.runtime.app import run_bundle, verify_bundle
    from edgeclf.runtime.sinks import ListSink
    from edgeclf.runtime.synthetic import ULTRASOUND_CLASSES, write_cine
    from edgeclf.train import TrainConfig, train

    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps: dict[str, float] = {}
    data_spec = f"synthetic:ultrasound?n=900&size=128&seed={seed}"

    t = time.perf_counter()
    record = train(
        TrainConfig(data=data_spec, out=str(o / "model"), model="compact", size=48, epochs=10, patience=10, seed=seed),
        on_epoch=on_epoch,
    )
    steps["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    bundle_dir = o / "bundle"
    export_bundle(ExportConfig(out=str(bundle_dir), model=str(o / "model"), overwrite=True, name="demo-ultrasound"))
    verified = verify_bundle(str(bundle_dir))
    steps["export_verify_s"] = time.perf_counter() - t

    t = time.perf_counter()
    test_eval = evaluate(str(bundle_dir), data=data_spec, split="test", out=str(o / "evaluation"))
    steps["evaluate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cine = o / "cine.mp4"
    timeline = write_cine(cine, seed=seed + 1)
    sink = ListSink()
    summary = run_bundle(str(bundle_dir), str(cine), out=str(o / "results.jsonl"), extra_sinks=[sink])
    steps["run_s"] = time.perf_counter() - t
    # Each frame's own decision is what is compared with the truth; the shown (smoothed) label lags
    # a change by design, so its agreement is reported beside it.
    predicted = [r["frame_label"] for r in sink.records]
    agreement = timeline_agreement(predicted, timeline)
    shown = timeline_agreement([r["label"] or "(abstain)" for r in sink.records], timeline)
    agreement["shown_label_agreement"] = shown["agreement"]
    agreement["abstained"] = sum(1 for r in sink.records if r["abstain"])
    _plot_timeline(predicted, timeline, list(ULTRASOUND_CLASSES), o / "timeline.png")

    per_class = {k: v["sensitivity"] for k, v in test_eval["metrics"]["per_class"].items()}
    result = {
        "out": str(o),
        "data": data_spec,
        "held_out_test": {
            "n": test_eval["data"]["n"],
            "per_class_accuracy": per_class,
            "accuracy": test_eval["metrics"]["accuracy"],
            "auc_macro": test_eval["metrics"]["auc"]["macro"],
        },
        "bundle": {"path": str(bundle_dir), "checksum": verified["checksum"], "reference_parity": verified["reference"]},
        "cine": {"video": str(cine), **agreement},
        "runtime": {"frames": summary["frames"], "written": summary["written"], "fps": summary["fps"],
                    "stages_ms": {k: {"median": v["median"], "p90": v["p90"]} for k, v in summary["stages_ms"].items()}},
        "training": {"best_epoch": record["best_epoch"], "seconds": record["seconds"]},
        "seconds": {**{k: round(v, 1) for k, v in steps.items()}, "total": round(time.perf_counter() - t0, 1)},
        "files": sorted(str(p.relative_to(o)) for p in o.rglob("*") if p.is_file()),
    }
    (o / "demo.json").write_text(json.dumps(result, indent=2))
    return result
