"""`edgeclf demo`: the whole chain offline in about a minute.

synthetic B-mode data -> train the compact CNN -> export and verify a bundle -> run the torch-free
runtime on a synthetic cine loop read back through OpenCV -> compare with the ground-truth timeline.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["run_demo", "timeline_agreement", "UNCLASSIFIED"]

log = logging.getLogger(__name__)


UNCLASSIFIED = "(not classified)"


def timeline_agreement(predicted: Sequence[str | None] | Mapping[int, str | None], timeline: dict[str, Any]) -> dict[str, Any]:
    """Frame-level agreement with a ground-truth timeline, and per segment (majority label, agreement).

    predicted: each result's label by its frame's place in the file ({file frame: label}; a list is frames 0, 1, ...);
    None: the frame was not classified (failed the quality gate, a frame error), counted in "frames_unclassified"
    and as a disagreement. Timeline frames with no result are counted in "frames_missing" (listed, up to 20, in
    "missing_frames"), results outside the timeline in "frames_outside"; agreement is over the frames compared."""
    pred = dict(enumerate(predicted)) if not isinstance(predicted, Mapping) else dict(predicted)
    truth = [""] * timeline["frames"]
    for seg in timeline["segments"]:
        for i in range(seg["start"], seg["end"]):
            truth[i] = seg["label"]
    compared = [i for i in range(len(truth)) if i in pred]
    missing = [i for i in range(len(truth)) if i not in pred]
    segments = []
    for seg in timeline["segments"]:
        got = [UNCLASSIFIED if pred[i] is None else str(pred[i]) for i in range(seg["start"], seg["end"]) if i in pred]
        counts = Counter(got)
        segments.append({
            "label": seg["label"], "start": seg["start"], "end": seg["end"],
            # ties: the alphabetically first, as np.unique gave
            "majority": min(counts, key=lambda k: (-counts[k], k)) if got else "",
            "agreement": float(np.mean([p == seg["label"] for p in got])) if got else 0.0,
            "unclassified": counts[UNCLASSIFIED],
            "missing": sum(1 for i in range(seg["start"], seg["end"]) if i not in pred),
        })
    return {
        "frames_compared": len(compared),
        "frames_in_timeline": len(truth),
        "frames_predicted": len(pred),
        "frames_unclassified": sum(1 for i in compared if pred[i] is None),
        "frames_missing": len(missing),
        "missing_frames": missing[:20],
        "frames_outside": sum(1 for i in pred if not 0 <= i < len(truth)),
        "agreement": float(np.mean([pred[i] == truth[i] for i in compared])) if compared else 0.0,
        "segments": segments,
    }


def _plot_timeline(predicted: Mapping[int, str | None], timeline: dict[str, Any], classes: list[str], path: Path) -> None:
    """Truth and each frame's label at its place in the file; a frame not classified is drawn below the classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = {c: i for i, c in enumerate(classes)}
    truth = np.zeros(timeline["frames"])
    for seg in timeline["segments"]:
        truth[seg["start"] : seg["end"]] = idx[seg["label"]]
    fig, ax = plt.subplots(figsize=(9, 2.6), dpi=110)
    ax.step(range(len(truth)), truth, where="post", lw=3, alpha=0.5, label="ground truth")
    frames = sorted(predicted)
    ax.plot(frames, [idx.get(str(predicted[i]), -1) for i in frames], ".", ms=3, label="runtime")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("frame")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("cine loop: runtime labels vs ground truth")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# What the demo writes into its --out folder: folders (walked) and files. Nothing else there is its own.
DEMO_DIRS = ("model", "bundle", "evaluation")
DEMO_FILES = ("cine.mp4", "cine.timeline.json", "results.jsonl", "timeline.png", "demo.json")
# Written first into a folder the demo takes: a rerun after a run that failed or was stopped (no demo.json yet)
# recognises the folder as the demo's own.
MARKER = ".edgeclf-demo"


def _is_demo_folder(o: Path) -> bool:
    return (o / "demo.json").is_file() or (o / MARKER).is_file()


def _prepare_out(o: Path) -> None:
    """Check, before a minute of training, that `o` can take the demo's artifacts; raise ConfigError (one line) if not.

    `o` must be a new or empty folder, or a previous demo's (it holds demo.json or MARKER): the demo's own artifacts there
    (DEMO_DIRS, DEMO_FILES) are then removed, demo.json first, before anything is written (a rerun that fails
    leaves no demo.json beside artifacts it did not describe); anything else there is left alone and not listed."""
    from edgeclf.errors import ConfigError, require
    from edgeclf.runtime import _cv

    _cv.cv2()  # the cine loop is written and read back through OpenCV
    require("matplotlib", "train")  # timeline.png
    if o.exists() and not o.is_dir():
        raise ConfigError(f"--out {o} is a file; the demo writes a folder of artifacts: give a new folder, e.g. --out edgeclf-demo")
    try:
        _check_contents(o)
        o.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {o} cannot be used as the demo's folder ({exc.strerror or exc}); choose a writable folder") from None
    if not os.access(o, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {o} is not writable; choose a writable folder")
    if _is_demo_folder(o):
        log.warning("%s holds a previous demo: its artifacts (%s) are removed and written again; other files there are "
                    "left alone", o, ", ".join([*(d + "/" for d in DEMO_DIRS), *DEMO_FILES]))
        try:  # demo.json first: a rerun that fails leaves no record describing artifacts it did not write
            for name in ("demo.json", *DEMO_FILES, *DEMO_DIRS):
                q = o / name
                if q.is_dir() and not q.is_symlink():
                    shutil.rmtree(q)
                elif q.exists() or q.is_symlink():
                    q.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot remove the previous demo's {q} ({exc.strerror or exc}); remove it or choose another --out") from None
    (o / MARKER).write_text("a folder written by `edgeclf demo`; a rerun replaces the demo's own artifacts here\n")


def _check_contents(o: Path) -> None:
    from edgeclf.errors import ConfigError
    from edgeclf.runtime.bundle import MANIFEST_FILE

    if o.is_dir():
        if any(o.iterdir()) and not _is_demo_folder(o):
            raise ConfigError(f"--out {o} is a folder that is not empty and holds no demo.json (not a previous demo's); "
                              "give a new or empty folder, or a previous demo's to replace its artifacts")
        for name in DEMO_DIRS:
            if (o / name).exists() and not (o / name).is_dir():
                raise ConfigError(f"{o / name} is a file where the demo writes its {name}/ folder; move it away or choose another --out")
        for name in DEMO_FILES:
            if (o / name).is_dir():
                raise ConfigError(f"{o / name} is a folder where the demo writes its file {name}; move it away or choose another --out")
        # A previous demo's folders are replaced: each must be what the demo wrote there (a bundle, as `edgeclf export
        # --overwrite` requires; a training folder; an evaluation), never someone's other files.
        if (o / MARKER).is_file():  # the demo took this folder (a stopped run may have left a half-written model/)
            return
        for name, marker, what in (("bundle", MANIFEST_FILE, "a bundle"), ("model", "run.json", "a training folder"),
                                   ("evaluation", "metrics.json", "an evaluation")):
            d = o / name
            if d.is_dir() and any(d.iterdir()) and not (d / marker).is_file():
                raise ConfigError(f"{d} is not empty and is not {what} (no {marker}); the demo replaces only its own "
                                  f"{name}/: move it away or choose another --out")


def _written(o: Path) -> list[str]:
    """The demo's own files under `o` (relative paths), not whatever else the folder holds."""
    files = [p for d in DEMO_DIRS for p in (o / d).rglob("*") if p.is_file()]
    files += [o / f for f in DEMO_FILES if (o / f).is_file()]
    return sorted(str(p.relative_to(o)) for p in files)


def run_demo(out: str = "edgeclf-demo", *, seed: int = 0, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the demo into the folder `out` (new, empty, or a previous demo's: see `_prepare_out`); returns demo.json's
    content. `seconds` times each step; `cine_s` (writing the synthetic cine loop) is kept apart from `run_s`
    (the runtime on it)."""
    from edgeclf.evaluate import evaluate
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.runtime.app import run_bundle, verify_bundle
    from edgeclf.runtime.sinks import ListSink
    from edgeclf.runtime.synthetic import ULTRASOUND_CLASSES, write_cine
    from edgeclf.train import TrainConfig, train

    o = Path(out)
    _prepare_out(o)
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
    steps["cine_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sink = ListSink()
    summary = run_bundle(str(bundle_dir), str(cine), out=str(o / "results.jsonl"), extra_sinks=[sink])
    steps["run_s"] = time.perf_counter() - t
    # Each frame's own decision is what is compared with the truth; the shown (smoothed) label lags
    # a change by design, so its agreement is reported beside it. Frames are matched by their place in the
    # file: a frame the source skipped must not shift every later comparison.
    place = [r.get("file_frame", r["frame"]) for r in sink.records]
    predicted = dict(zip(place, (r["frame_label"] for r in sink.records)))
    agreement = timeline_agreement(predicted, timeline)
    shown = timeline_agreement(dict(zip(place, (r["label"] or "(abstain)" for r in sink.records))), timeline)
    agreement["shown_label_agreement"] = shown["agreement"]
    agreement["abstained"] = sum(1 for r in sink.records if r["abstain"])
    agreement["frames_repeated"] = len(place) - len(predicted)
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
        "files": sorted({*_written(o), "demo.json"}),
    }
    (o / "demo.json").write_text(json.dumps(result, indent=2))
    # The demo writes its own cine: every frame of it must come back once, each at its own place.
    incomplete = {k: agreement[k] for k in ("frames_missing", "frames_outside", "frames_repeated") if agreement[k]}
    if incomplete:
        from edgeclf.errors import DataError

        raise DataError(f"the runtime did not return every frame of the demo's cine ({agreement['frames_in_timeline']} "
                        f"frames): {', '.join(f'{k} {v}' for k, v in incomplete.items())}, missing frames "
                        f"{agreement['missing_frames']}; see {o / 'demo.json'} and {o / 'results.jsonl'}")
    return result
