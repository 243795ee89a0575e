"""Does `edgeclf profile` measure what a hand-written timing loop measures? Interleaved, same bundles, same source.

    python benchmarks/profile_accuracy.py --bundle A --bundle B --frames 2000   # the acceptance run
    python benchmarks/profile_accuracy.py --bundle A --frames 200               # a quick look

`profile_bundles` runs the bundles side by side through the real pipeline (A B A B ..., in chunks;
quality gate off, smoothing off and, unless `--pipelined`, no feeder thread, so the stages hold the
same work as the reference); after each
of its rounds (`on_round`) an in-process reference loop times the same stages for every bundle, on
its own backend and source, with `time.perf_counter`: capture (`source.read`), preprocess
(`Preprocessor`), infer (`backend.infer` on the frame just preprocessed, as the pipeline's infer stage: probabilities
and the decision are its postprocess stage, which is not compared; the reference still computes them,
untimed, so its loop does the pipeline's work between two frames) and inference alone (`backend.infer`
on one preprocessed frame). Both take their warm-up first.

Pass: for each stage whose reference median is at least 1 ms (`--min-ms`; shorter stages are shown,
not judged: a few microseconds of timer and call overhead are a large share of them), the profile's
median within 10% and its p90 within 20% of the reference's. Prints a table and the run's RSS slope
after warm-up; `--out FILE` also writes the figures as JSON. Exit 1 when a criterion fails, and when no stage
reached `--min-ms` (nothing was compared).
A benchmark, not a test: its figures describe this machine and its load at the time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("capture", "preprocess", "infer", "infer_only")
P50_TOL, P90_TOL = 0.10, 0.20


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", dest="bundles", action="append", required=True,
                    help="A bundle folder (e.g. the one `edgeclf demo` writes); repeat to profile several side by side.")
    ap.add_argument("--pipelined", action="store_true",
                    help="Profile the pipelined run (capture and preprocess in the feeder thread, overlapping inference): "
                         "the stages then contend for the cores, which the serial reference does not, so the figures "
                         "differ by that contention, not by the timing [default: serial, the same work as the reference].")
    ap.add_argument("--min-ms", type=float, default=1.0, help="Judge only stages whose reference median is at least this.")
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--source", default=None, help="[default: synthetic:ultrasound?frames=WARMUP+FRAMES]")
    ap.add_argument("--out", default=None, help="Also write the figures as JSON here.")
    args = ap.parse_args(argv)

    from edgeclf.runtime.backends import create_backend
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.postprocess import decide, probabilities
    from edgeclf.runtime.preprocess import Preprocessor
    from edgeclf.runtime.profile import ProfileOptions, ProfileTarget, profile_bundles
    from edgeclf.runtime.sources import open_source

    uri = args.source or f"synthetic:ultrasound?frames={args.warmup + args.frames}"
    with open_source(uri) as s0:
        first = s0.read()
    assert first is not None, "the source gives no frames"

    class Reference:
        """The hand-written loop for one bundle: its own backend, preprocessor and source."""

        def __init__(self, path: str) -> None:
            b = load_bundle(path)
            self.m = m = b.manifest
            self.pre = Preprocessor(m.preprocess)
            self.be = create_backend(str(b.model_path), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs,
                                     backend="ort-cpu", threads=args.threads)
            self.src = open_source(uri)
            self.x0 = self.pre(first.image)
            self.ref: Dict[str, List[float]] = {s: [] for s in STAGES}

        def chunk(self, n: int, keep: bool) -> None:
            pc, m, ref = time.perf_counter, self.m, self.ref
            for _ in range(n):
                t0 = pc()
                frame = self.src.read()
                if frame is None:  # rewind, as the profile does, and do not time the reopening
                    self.src.close()
                    self.src = open_source(uri)
                    t0 = pc()
                    frame = self.src.read()
                t1 = pc()
                x = self.pre(frame.image)
                t2 = pc()
                logits = self.be.infer(x)
                t3 = pc()  # the profile's infer stage is backend.infer alone; probabilities and decision: postprocess
                decide(probabilities(logits, m.task, m.temperature), m.decision)
                if keep:
                    ref["capture"].append((t1 - t0) * 1e3)
                    ref["preprocess"].append((t2 - t1) * 1e3)
                    ref["infer"].append((t3 - t2) * 1e3)
            for _ in range(n):
                t0 = pc()
                self.be.infer(self.x0)
                if keep:
                    ref["infer_only"].append((pc() - t0) * 1e3)

        def close(self) -> None:
            self.src.close()
            self.be.close()

    refs = [Reference(p) for p in args.bundles]
    for r in refs:
        r.chunk(args.warmup, keep=False)
    rounds: List[int] = []

    def on_round(i: int) -> None:
        rounds.append(i)
        for r in refs:
            r.chunk(min(args.chunk, args.frames - args.chunk * i), keep=True)

    opts = ProfileOptions(source=uri, frames=args.frames, warmup=args.warmup, chunk=args.chunk, threads=args.threads,
                          bootstrap=0, run_options=RunOptions(smoothing="off", quality=False, pipelined=args.pipelined))
    res = profile_bundles([ProfileTarget(p) for p in args.bundles], opts, on_round=on_round)
    for r in refs:
        r.close()

    ok, out = True, []
    hdr = (f"{'stage':<11} {'prof p50':>9} {'ref p50':>9} {'err':>7}   {'prof p90':>9} {'ref p90':>9} {'err':>7}   "
           f"(limits {P50_TOL:.0%} / {P90_TOL:.0%} for stages >= {args.min_ms:g} ms)")
    for t, r in zip(res.doc["targets"], refs):
        rows: List[str] = []
        figures: Dict[str, Dict[str, float]] = {}
        for s in STAGES:
            a = np.asarray(r.ref[s])
            p50r, p90r = np.percentile(a, [50, 90])
            p50, p90 = t["stages_ms"][s]["median"], t["stages_ms"][s]["p90"]
            e50, e90 = abs(p50 - p50r) / p50r, abs(p90 - p90r) / p90r
            judged = p50r >= args.min_ms
            good = e50 <= P50_TOL and e90 <= P90_TOL
            ok &= good or not judged
            figures[s] = {"profile_p50": p50, "reference_p50": float(p50r), "p50_rel_err": e50,
                          "profile_p90": p90, "reference_p90": float(p90r), "p90_rel_err": e90,
                          "n_profile": t["stages_ms"][s]["n"], "n_reference": int(a.size), "judged": bool(judged), "pass": bool(good)}
            verdict = ("pass" if good else "FAIL") if judged else "(not judged: < min-ms)"
            rows.append(f"{s:<11} {p50:9.3f} {p50r:9.3f} {e50:7.1%}   {p90:9.3f} {p90r:9.3f} {e90:7.1%}   {verdict}")
        print(f"{t['name']}: {t['frames']} profiled and {len(r.ref['infer'])} reference frames, "
              f"{len(rounds)} interleaved rounds of {args.chunk}")
        print(hdr)
        print("\n".join(rows))
        out.append({"bundle": t["bundle"], "name": t["name"], "stages": figures})
    # A run in which no stage reached --min-ms compared nothing: that is no evidence the profile is accurate.
    if not any(f["judged"] for o in out for f in o["stages"].values()):
        print(f"FAILED: no stage's reference median reached --min-ms {args.min_ms:g} ms; nothing was compared "
              "(lower --min-ms or profile a heavier bundle)")
        ok = False
    proc = res.doc["system"]["process"]
    slope = proc.get("rss_slope_mb_per_10k_frames")
    print(f"RSS {proc.get('rss_mb_start')} -> {proc.get('rss_mb_end')} MB; slope after warm-up: "
          f"{'n/a' if slope is None else format(slope, '.3f')} MB per 10,000 frames")
    if args.out:
        Path(args.out).write_text(json.dumps({"source": uri, "frames": args.frames, "chunk": args.chunk, "threads": args.threads,
                                              "min_ms": args.min_ms, "targets": out, "rss_slope_mb_per_10k_frames": slope,
                                              "pass": bool(ok)}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
