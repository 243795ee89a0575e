"""The per-frame pipeline: source -> preprocess -> infer -> postprocess -> sinks, every stage timed."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from edgeclf.runtime.backends import Backend
from edgeclf.runtime.bundle import Bundle
from edgeclf.runtime.postprocess import decide, probabilities
from edgeclf.runtime.preprocess import Preprocessor
from edgeclf.runtime.sinks import Sink
from edgeclf.runtime.sources import FrameSource

__all__ = ["STAGES", "RunSummary", "run_pipeline", "stage_stats"]

log = logging.getLogger(__name__)
STAGES = ("capture", "preprocess", "infer", "postprocess", "sink")


def stage_stats(values_ms: Sequence[float]) -> Dict[str, float]:
    """Median, p90, p99, mean and max of a list of milliseconds (empty -> zeros)."""
    if not values_ms:
        return {"n": 0, "median": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0}
    a = np.asarray(values_ms, np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "median": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()), "max": float(a.max())}


@dataclass
class RunSummary:
    frames: int = 0
    written: int = 0
    abstained: int = 0
    wall_s: float = 0.0
    label_counts: Dict[str, int] = field(default_factory=dict)
    timings_ms: Dict[str, List[float]] = field(default_factory=lambda: {s: [] for s in STAGES + ("latency",)})

    def to_dict(self) -> Dict[str, Any]:
        return {
            "frames": self.frames,
            "written": self.written,
            "abstained": self.abstained,
            "wall_s": round(self.wall_s, 3),
            "fps": round(self.frames / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "label_counts": dict(self.label_counts),
            "stages_ms": {k: stage_stats(v) for k, v in self.timings_ms.items()},
        }


def run_pipeline(
    bundle: Bundle,
    source: FrameSource,
    backend: Backend,
    sinks: Sequence[Sink],
    *,
    max_frames: Optional[int] = None,
    min_confidence: Optional[float] = None,
) -> RunSummary:
    """Classify every frame of `source`, writing one record per frame to each sink.

    Record: {"frame", "timestamp" (monotonic capture time), "time" (wall clock), "label" (None for multilabel or abstain),
    "labels" (multilabel), "abstain" (+ "abstain_reason": top probability below min_confidence), "probs", "latency_ms": {stage: ms, "total": capture-to-result}}.
    """
    m = bundle.manifest
    pre = Preprocessor(m.preprocess)
    floor = m.min_confidence if min_confidence is None else float(min_confidence)
    summary = RunSummary()
    t_start = time.perf_counter()
    while max_frames is None or summary.frames < max_frames:
        t0 = time.perf_counter()
        frame = source.read()
        t1 = time.perf_counter()
        if frame is None:
            break
        x = pre(frame.image)
        t2 = time.perf_counter()
        logits = backend.infer(x)
        t3 = time.perf_counter()
        probs = probabilities(logits, m.task, m.temperature)
        decision = decide(probs, m.decision)
        # timestamp: monotonic capture time (for latency); time: wall clock of the result (for people).
        record: Dict[str, Any] = {"frame": frame.index, "timestamp": round(frame.timestamp, 6), "time": round(time.time(), 3)}
        if m.task == "multilabel":
            present = [m.labels[k] for k in np.flatnonzero(decision[0])]
            record.update(label=None, labels=present, abstain=False)
            key = "+".join(present) or "(none)"
        elif float(probs[0].max()) < floor:
            # Not confident enough to show a label: say so rather than guess.
            record.update(label=None, abstain=True, abstain_reason="low_confidence")
            key = "(abstain)"
            summary.abstained += 1
        else:
            record.update(label=m.labels[int(decision[0])], abstain=False)
            key = str(record["label"])
        record["probs"] = {name: round(float(p), 6) for name, p in zip(m.labels, probs[0])}
        t4 = time.perf_counter()
        record["latency_ms"] = {
            "capture": round((t1 - t0) * 1e3, 3),
            "preprocess": round((t2 - t1) * 1e3, 3),
            "infer": round((t3 - t2) * 1e3, 3),
            "postprocess": round((t4 - t3) * 1e3, 3),
            "total": round((time.monotonic() - frame.timestamp) * 1e3, 3),
        }
        for sink in sinks:
            sink.write(record)
        t5 = time.perf_counter()
        summary.frames += 1
        summary.label_counts[key] = summary.label_counts.get(key, 0) + 1
        for stage, ms in zip(STAGES, ((t1 - t0), (t2 - t1), (t3 - t2), (t4 - t3), (t5 - t4))):
            summary.timings_ms[stage].append(ms * 1e3)
        summary.timings_ms["latency"].append(record["latency_ms"]["total"])
        log.debug("frame %d -> %s", frame.index, key)
    summary.wall_s = time.perf_counter() - t_start
    summary.written = min((s.written for s in sinks), default=summary.frames)
    return summary
