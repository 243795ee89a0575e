"""Where the per-frame CPU time before inference goes, against the reference operations the runtime issue quotes.

    python benchmarks/preprocess_stages.py            # 300 frames of 640x480 mp4, 5 repetitions
    python benchmarks/preprocess_stages.py --reps 3

On frames decoded fresh from the runtime benchmark's 640x480 mp4 (as the pipeline sees them), one thread,
nothing else running in this process:

- reference operations: OpenCV's fused blob path (`cv2.dnn.blobFromImage`: resize to 224, mean, scale, BGR->RGB,
  no anti-aliasing) and the plain numpy chain a user would write (cvtColor, resize, float, mean/std, transpose);
  their ratio to the figures quoted in the issue (0.24 and 0.96 ms) says how fast this machine is;
- edgeclf's preprocessing for a 224 px, 3-channel model (`fast-area`: INTER_AREA by 2, INTER_LINEAR to 224,
  normalisation by table into NCHW) split into its steps, and the quality gate.

Medians over frames (the first 20 skipped), then median and range over repetitions. A benchmark, not a test:
run it alone, the machine is shared. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

QUOTED_MS = {"blob": 0.24, "numpy": 0.96}  # measured where the issue was written


def measure(video: Path) -> dict[str, float]:
    import cv2

    from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec
    from edgeclf.runtime.quality import QualityGate

    pre = Preprocessor(PreprocessSpec(channels=3, size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    mean = np.float32([0.5, 0.5, 0.5]).reshape(1, 1, 3)
    std = np.float32([0.25, 0.25, 0.25]).reshape(1, 1, 3)
    cap = cv2.VideoCapture(str(video))
    gate = QualityGate()
    times: dict[str, list[float]] = {k: [] for k in ("blob", "numpy", "edgeclf preprocess", "  area by 2", "  linear to 224",
                                                     "  normalise", "edgeclf quality gate")}
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        t = [time.perf_counter()]
        cv2.dnn.blobFromImage(bgr, 1 / (0.25 * 255), (224, 224), (127.5, 127.5, 127.5), swapRB=True)
        t.append(time.perf_counter())
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        x = cv2.resize(rgb, (224, 224)).astype(np.float32) / 255.0
        np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1)[None])
        t.append(time.perf_counter())
        pre(rgb)
        t.append(time.perf_counter())
        half = cv2.resize(rgb, (320, 240), interpolation=cv2.INTER_AREA)
        t.append(time.perf_counter())
        small = cv2.resize(half, (224, 224), interpolation=cv2.INTER_LINEAR)
        t.append(time.perf_counter())
        pre.normalize(small[None])
        t.append(time.perf_counter())
        gate.check(rgb, None)
        t.append(time.perf_counter())
        for k, a, b in zip(times, t[:-1], t[1:]):
            times[k].append((b - a) * 1e3)
    cap.release()
    return {k: float(np.median(v[20:])) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from runtime import machine, make_video  # benchmarks/runtime.py

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "v.mp4"
        make_video(video, a.frames)
        reps = [measure(video) for _ in range(a.reps)]
    m = machine()
    print(f"Machine: {m['cpu']}, {m['cores']} cores, OpenCV {m['opencv']}, Python {m['python']}. {a.frames} frames of 640x480 mp4, "
          f"{a.reps} repetitions. Command: `python benchmarks/preprocess_stages.py`.\n")
    print("| step | median ms | range over repetitions | quoted in the issue | this machine / quoted |")
    print("|---|---|---|---|---|")
    for k in reps[0]:
        v = [r[k] for r in reps]
        q = QUOTED_MS.get(k)
        ratio = f"{np.median(v) / q:.2f}x" if q else ""
        print(f"| {k} | {np.median(v):.3f} | {min(v):.3f}-{max(v):.3f} | {q or ''} | {ratio} |")


if __name__ == "__main__":
    main()
