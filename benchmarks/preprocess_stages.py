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
run it alone, the machine is shared. Prints a markdown table and a line per target.

Targets, on the medians over repetitions: edgeclf preprocess + quality gate at most 0.5 ms per frame, the runtime
issue's budget for preprocess + gate + postprocess + sink per 640x480 frame (this part alone must fit in it; missed
only by more than 10%, the run-to-run noise `benchmarks/runtime.py` allows), and edgeclf preprocess no slower than
the plain numpy chain measured beside it. Exit 1, one FAILED line each, when one is missed.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

import numpy as np

QUOTED_MS = {"blob": 0.24, "numpy": 0.96}  # measured where the issue was written
# The runtime issue: "Preprocess + quality gate + postprocess + JSONL sink: median at most 0.5 ms per 640x480 frame".
OVERHEAD_TARGET_MS = 0.5
NOISE = 0.10  # as benchmarks/runtime.py: a target fails only when missed by more than this share


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


def _runtime_bench() -> ModuleType:
    """benchmarks/runtime.py, by path: a plain `import runtime` could find the repository's runtime/ package."""
    spec = importlib.util.spec_from_file_location("runtime_bench", Path(__file__).resolve().parent / "runtime.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def targets(reps: List[dict]) -> List[Tuple[str, bool, str]]:
    """(what, met, the failure line) per target, on the medians over repetitions (a NaN misses)."""
    pre = float(np.median([r["edgeclf preprocess"] for r in reps]))
    both = float(np.median([r["edgeclf preprocess"] + r["edgeclf quality gate"] for r in reps]))
    naive = float(np.median([r["numpy"] for r in reps]))
    return [
        (f"preprocess + quality gate {both:.3f} ms per frame, within the {OVERHEAD_TARGET_MS:g} ms budget",
         both <= OVERHEAD_TARGET_MS * (1 + NOISE),
         f"edgeclf preprocess + quality gate {both:.3f} ms per frame (median over {len(reps)} repetitions), over the "
         f"{OVERHEAD_TARGET_MS:g} ms budget by more than {NOISE:.0%}"),
        (f"edgeclf preprocess {pre:.3f} ms no slower than the numpy chain's {naive:.3f} ms", pre <= naive,
         f"edgeclf preprocess {pre:.3f} ms per frame, slower than the plain numpy chain ({naive:.3f} ms)"),
    ]


def failures(reps: List[dict]) -> List[str]:
    """The targets missed, one line each; empty: both held."""
    return [why for _, met, why in targets(reps) if not met]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    bench = _runtime_bench()

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "v.mp4"
        bench.make_video(video, a.frames)
        reps = [measure(video) for _ in range(a.reps)]
    m = bench.machine()
    print(f"Machine: {m['cpu']}, {m['cores']} cores, OpenCV {m['opencv']}, Python {m['python']}. {a.frames} frames of 640x480 mp4, "
          f"{a.reps} repetitions. Command: `python benchmarks/preprocess_stages.py`.\n")
    print("| step | median ms | range over repetitions | quoted in the issue | this machine / quoted |")
    print("|---|---|---|---|---|")
    for k in reps[0]:
        v = [r[k] for r in reps]
        q = QUOTED_MS.get(k)
        ratio = f"{np.median(v) / q:.2f}x" if q else ""
        print(f"| {k} | {np.median(v):.3f} | {min(v):.3f}-{max(v):.3f} | {q or ''} | {ratio} |")
    print("\nTargets: " + "; ".join(f"{what}: {'met' if met else 'NOT met'}" for what, met, _ in targets(reps)) + ".")
    failed = failures(reps)
    for f in failed:
        print(f"FAILED: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
