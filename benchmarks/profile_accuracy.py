"""Does `edgeclf profile` measure what a hand-written timing loop measures? Interleaved, same bundle, same source.

    python benchmarks/profile_accuracy.py --bundle BUNDLE                 # 1000 steady frames, chunks of 50
    python benchmarks/profile_accuracy.py --bundle BUNDLE --frames 200    # a quick look

`profile_bundles` runs the bundle through the real pipeline (quality gate off and smoothing off, so the
stages hold the same work as the reference); after each of its chunks (`on_round`) an in-process
reference loop times the same stages on its own backend and source with `time.perf_counter`:
capture (`source.read`), preprocess (`Preprocessor`), infer (`backend.infer` + probabilities + decision)
and inference alone (`backend.infer` on one preprocessed frame). Both take their warm-up first.

Pass: for each stage, the profile's median within 10% and its p90 within 20% of the reference's.
Prints a table; `--out FILE` also writes the figures as JSON. Exit 1 when a criterion fails.
A benchmark, not a test: its figures describe this machine and its load at the time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("capture", "preprocess", "infer", "infer_only")
P50_TOL, P90_TOL = 0.10, 0.20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="A bundle folder (e.g. the one `edgeclf demo` writes).")
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--source", default=None, help="[default: synthetic:ultrasound?frames=WARMUP+FRAMES]")
    ap.add_argument("--out", default=None, help="Also write the figures as JSON here.")
    args = ap.parse_args()

    from edgeclf.runtime.backends import create_backend
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.postprocess import decide, probabilities
    from edgeclf.runtime.preprocess import Preprocessor
    from edgeclf.runtime.profile import ProfileOptions, ProfileTarget, profile_bundles
    from edgeclf.runtime.sources import open_source

    uri = args.source or f"synthetic:ultrasound?frames={args.warmup + args.frames}"
    b = load_bundle(args.bundle)
    m = b.manifest
    pre = Preprocessor(m.preprocess)
    ref: Dict[str, List[float]] = {s: [] for s in STAGES}
    be = create_backend(str(b.model_path), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs,
                        backend="ort-cpu", threads=args.threads)
    state = {"src": open_source(uri)}
    with open_source(uri) as s0:
        first = s0.read()
    assert first is not None, "the source gives no frames"
    x0 = pre(first.image)

    def chunk(n: int, keep: bool) -> None:
        pc = time.perf_counter
        for _ in range(n):
            t0 = pc()
            frame = state["src"].read()
            if frame is None:  # rewind, as the profile does, and do not time the reopening
                state["src"].close()
                state["src"] = open_source(uri)
                t0 = pc()
                frame = state["src"].read()
            t1 = pc()
            x = pre(frame.image)
            t2 = pc()
            decide(probabilities(be.infer(x), m.task, m.temperature), m.decision)
            t3 = pc()
            if keep:
                ref["capture"].append((t1 - t0) * 1e3)
                ref["preprocess"].append((t2 - t1) * 1e3)
                ref["infer"].append((t3 - t2) * 1e3)
        for _ in range(n):
            t0 = pc()
            be.infer(x0)
            if keep:
                ref["infer_only"].append((pc() - t0) * 1e3)

    chunk(args.warmup, keep=False)
    rounds: List[int] = []

    def on_round(i: int) -> None:
        rounds.append(i)
        chunk(min(args.chunk, args.frames - args.chunk * i), keep=True)

    opts = ProfileOptions(source=uri, frames=args.frames, warmup=args.warmup, chunk=args.chunk, threads=args.threads,
                          bootstrap=0, run_options=RunOptions(smoothing="off", quality=False))
    res = profile_bundles([ProfileTarget(args.bundle)], opts, on_round=on_round)
    state["src"].close()
    be.close()

    t = res.doc["targets"][0]
    rows, ok = [], True
    figures: Dict[str, Dict[str, float]] = {}
    for s in STAGES:
        r = np.asarray(ref[s])
        p50r, p90r = np.percentile(r, [50, 90])
        p50, p90 = t["stages_ms"][s]["median"], t["stages_ms"][s]["p90"]
        e50, e90 = abs(p50 - p50r) / p50r, abs(p90 - p90r) / p90r
        good = e50 <= P50_TOL and e90 <= P90_TOL
        ok &= good
        figures[s] = {"profile_p50": p50, "reference_p50": float(p50r), "p50_rel_err": e50,
                      "profile_p90": p90, "reference_p90": float(p90r), "p90_rel_err": e90, "n_profile": t["stages_ms"][s]["n"],
                      "n_reference": int(r.size), "pass": good}
        rows.append(f"{s:<11} {p50:9.3f} {p50r:9.3f} {e50:7.1%}   {p90:9.3f} {p90r:9.3f} {e90:7.1%}   {'pass' if good else 'FAIL'}")
    print(f"{t['name']}: {t['frames']} profiled and {len(ref['infer'])} reference frames, {len(rounds)} interleaved rounds of {args.chunk}")
    print(f"{'stage':<11} {'prof p50':>9} {'ref p50':>9} {'err':>7}   {'prof p90':>9} {'ref p90':>9} {'err':>7}   "
          f"(limits {P50_TOL:.0%} / {P90_TOL:.0%})")
    print("\n".join(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"bundle": args.bundle, "source": uri, "frames": args.frames, "chunk": args.chunk,
                                              "threads": args.threads, "stages": figures, "pass": ok}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
