"""Soak benchmark: many synthetic frames through the full runtime pipeline, watching memory and losses.

    python benchmarks/soak.py                     # 100,000 frames (about an hour of 30 fps cine)
    python benchmarks/soak.py --frames 3000       # a quick look

Builds a tiny bundle the way the tests do (the compact CNN on synthetic ultrasound, 32 px; or give
--bundle), then runs `edgeclf.runtime.app.run_bundle` (what `edgeclf run` calls) on
`synthetic:ultrasound?frames=N` with a JSONL results file (fsync every second, as `run` defaults to), the
clip summary and an audit log (a digest every 1,000 results). A probe sink samples, every
`--sample-every` frames: RSS (psutil), open file descriptors and threads, and the throughput over the
last interval. At the end it counts the frames the source delivered against --frames, the results file's
lines against the frames delivered, and the results that decided a label (a soak where every frame abstains
exercised no decision: it fails), checks the audit log against the results file, and fits the RSS slope after
warm-up (least squares, MB per 10,000 frames; fewer than 3 samples after warm-up leave it unmeasured, which
fails the soak). Writes benchmarks/results/soak.{json,md} (`--out-dir`) and removes its work folder (a bundle it
trained included) unless --keep, which prints where it is. Exit 1, one FAILED line each, on any failure
(`failures`). A benchmark, not a test: its figures describe this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


_MAKE_BUNDLE = """
import sys
from edgeclf.export.bundle_writer import ExportConfig, export_bundle
from edgeclf.train import TrainConfig, train
folder, bundle = sys.argv[1], sys.argv[2]
train(TrainConfig(data="synthetic:ultrasound?n=600&size=64&seed=3", out=folder, model="compact", size=32,
                  epochs=15, patience=15, seed=0))
export_bundle(ExportConfig(out=bundle, model=folder))
"""


def make_bundle(work: Path) -> Path:
    """A tiny bundle: the compact CNN, 15 epochs on 600 synthetic ultrasound images, 32 px (about 20 s). Trained
    enough to decide on the cine's frames: the tests' 3-epoch model gives near-uniform probabilities, so every result
    abstains ("settling") and the decision path, smoothing and label changes would go unexercised.

    Built in a child process, so that torch is never loaded into the process being measured (a device
    runs without torch)."""
    import subprocess

    folder, bundle = work / "trained", work / "bundle"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", _MAKE_BUNDLE, str(folder), str(bundle)], check=True, env=env)
    return bundle


class Probe:
    """A results sink that only samples the process every `every` records (edgeclf.runtime.sinks.Sink)."""

    needs_image = False
    stop_requested = False

    def __init__(self, every: int) -> None:
        import psutil

        self.every = every
        self.written = 0
        self.proc = psutil.Process()
        self.samples: List[Dict[str, Any]] = []
        self._t0 = time.perf_counter()
        self._last = (0, self._t0)
        self.sample()

    def sample(self) -> None:
        now = time.perf_counter()
        frames, t_prev = self._last
        mem = self.proc.memory_info()
        self.samples.append({
            "frames": self.written, "t_s": round(now - self._t0, 3), "rss_mb": round(mem.rss / 2**20, 3),
            "fps": round((self.written - frames) / (now - t_prev), 2) if now > t_prev and self.written > frames else None,
            "fds": self.proc.num_fds() if hasattr(self.proc, "num_fds") else None, "threads": self.proc.num_threads(),
        })
        self._last = (self.written, now)

    def write(self, record: Dict[str, Any], image: Any = None) -> None:
        self.written += 1
        if self.written % self.every == 0:
            self.sample()

    def close(self) -> None:
        if not self.samples or self.samples[-1]["frames"] != self.written:
            self.sample()


def slope_mb_per_10k(samples: List[Dict[str, Any]], warmup: int) -> Optional[float]:
    """Least-squares slope of RSS against frames after warm-up, in MB per 10,000 frames."""
    pts = [(s["frames"], s["rss_mb"]) for s in samples if s["frames"] >= warmup]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    return sxy / sxx * 10_000


def _theil_sen(samples: List[Dict[str, Any]], warmup: int) -> Optional[float]:
    """The estimator `edgeclf profile` reports (median of pairwise slopes: allocator steps are not a trend)."""
    from edgeclf.runtime.profile import rss_slope_mb_per_10k

    pts = [(s["frames"], s["rss_mb"]) for s in samples if s["frames"] >= warmup]
    return rss_slope_mb_per_10k([x for x, _ in pts], [y for _, y in pts]) if len(pts) >= 3 else None


def count_results(path: Path) -> Dict[str, Any]:
    """Stream the results file: whole lines, torn lines, whether frames run 0..n-1 without a gap, and how many results
    decided a label against how many abstained, per reason."""
    lines = torn = decided = 0
    reasons: Dict[str, int] = {}
    expected = 0
    gaps = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                torn += 1
                continue
            rec = json.loads(raw)
            gaps += int(rec["frame"] != expected)
            expected = rec["frame"] + 1
            lines += 1
            if rec.get("abstain"):
                why = str(rec.get("abstain_reason") or "unknown")
                reasons[why] = reasons.get(why, 0) + 1
            else:
                decided += 1
    return {"lines": lines, "torn": torn, "frame_gaps": gaps, "decided": decided, "abstained_by_reason": reasons}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The soak in a fresh temporary folder, removed afterwards unless args.keep (then recorded as "work")."""
    work = Path(tempfile.mkdtemp(prefix="edgeclf-soak-"))
    try:
        out = _run(args, work)
    finally:
        if not args.keep:  # the trained bundle (about 4 MB) too; a --bundle the user gave lives elsewhere
            shutil.rmtree(work)
    if args.keep:
        out["work"] = str(work)
    return out


def _run(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    from edgeclf.runtime.app import run_bundle
    from edgeclf.runtime.audit import AuditLog, AuditSink, source_fact, verify_audit
    from edgeclf.runtime.bundle import load_bundle

    bundle = Path(args.bundle) if args.bundle else make_bundle(work)
    uri = f"synthetic:ultrasound?frames={args.frames}&size={args.size}&seed=0"
    results, clip, audit_path = work / "results.jsonl", work / "clip.json", work / "audit.jsonl"
    probe = Probe(args.sample_every)
    t0 = time.perf_counter()
    with AuditLog(audit_path, fsync_every=1.0, digest_every=1000) as log:
        log.start(bundle_checksum=load_bundle(bundle).checksum, config={"source": source_fact(uri), "soak": True})
        summary = run_bundle(str(bundle), uri, out=str(results), summary_path=str(clip), threads=args.threads,
                             fsync_every=1.0, extra_sinks=[probe, AuditSink(log)])
        log.end("ok", summary={k: summary.get(k) for k in ("frames", "written", "abstained", "stopped_by")})
    wall = time.perf_counter() - t0
    probe.close()
    counted = count_results(results)
    delivered = int(summary["frames"]) + int(summary.get("read_not_classified") or 0)
    audit = verify_audit(audit_path, results=results)
    warmup = args.warmup if args.warmup is not None else max(args.frames // 10, args.sample_every)
    steady = [s for s in probe.samples if s["frames"] >= warmup]
    fps = [s["fps"] for s in probe.samples[1:] if s["fps"]]
    out = {
        "frames_requested": args.frames, "frames_delivered": delivered, "frames_classified": summary["frames"],
        "result_lines": counted["lines"], "torn_lines": counted["torn"], "frame_gaps": counted["frame_gaps"],
        "lost_results": delivered - counted["lines"], "wall_s": round(wall, 1), "fps_mean": round(summary["frames"] / wall, 1),
        "fps_min_interval": min(fps) if fps else None, "fps_max_interval": max(fps) if fps else None,
        "rss_start_mb": probe.samples[0]["rss_mb"], "rss_after_warmup_mb": steady[0]["rss_mb"] if steady else None,
        "rss_end_mb": probe.samples[-1]["rss_mb"], "rss_max_mb": max(s["rss_mb"] for s in probe.samples),
        "rss_slope_mb_per_10k_frames": slope_mb_per_10k(probe.samples, warmup), "warmup_frames": warmup,
        "rss_slope_theil_sen_mb_per_10k_frames": _theil_sen(probe.samples, warmup),
        "fds_start": probe.samples[0]["fds"], "fds_end": probe.samples[-1]["fds"],
        "threads_start": probe.samples[0]["threads"], "threads_end": probe.samples[-1]["threads"],
        "audit": {"state": audit.state, "records": audit.records, "results": audit.results,
                  "results_check": audit.results_check},
        "abstained": summary["abstained"], "frames_decided": counted["decided"],
        "abstained_by_reason": counted["abstained_by_reason"], "stages_ms": {k: {m: round(v, 3) for m, v in st.items()}
                                                         for k, st in summary["stages_ms"].items()},
        "config": {"source": uri, "sample_every": args.sample_every, "threads": summary.get("threads"),
                   "backend": summary.get("backend"), "bundle": "given" if args.bundle else "tiny compact CNN, 32 px"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "torch_loaded": "torch" in sys.modules,
        "samples": probe.samples,
    }
    return out


def render(r: Dict[str, Any]) -> str:
    slope, rise, span = _rss_rise(r)
    if slope is None:
        verdict = "n/a (too few samples after warm-up)"
    elif abs(slope) < RSS_BUDGET_MB_PER_10K:
        verdict = f"{slope:+.3f} MB per 10,000 frames (under the {RSS_BUDGET_MB_PER_10K:g} MB budget)"
    elif rise < RSS_FLOOR_MB:
        verdict = (f"{slope:+.3f} MB per 10,000 frames (over the {RSS_BUDGET_MB_PER_10K:g} MB budget, but a rise of {rise:.1f} MB "
                   f"over {span} frames is under the {RSS_FLOOR_MB:g} MB floor: too short a run to judge)")
    else:
        verdict = f"{slope:+.3f} MB per 10,000 frames (OVER the {RSS_BUDGET_MB_PER_10K:g} MB budget)"
    lines = [
        "# Soak: synthetic frames through the full pipeline",
        "",
        f"`python benchmarks/soak.py --frames {r['frames_requested']}` on {r['machine']['platform']}, "
        f"{r['machine']['cpus']} CPUs; source `{r['config']['source']}`, backend {r['config']['backend']}, "
        f"{r['config']['threads']} threads, bundle: {r['config']['bundle']}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| frames delivered by the source | {r['frames_delivered']} |",
        f"| result lines in the JSONL file | {r['result_lines']} (torn {r['torn_lines']}, frame gaps {r['frame_gaps']}) |",
        f"| lost results | {r['lost_results']} |",
        f"| results deciding a label | {r.get('frames_decided')} of {r['result_lines']}; abstained: "
        f"{', '.join(f'{k} {v}' for k, v in sorted((r.get('abstained_by_reason') or {}).items())) or 'none'} |",
        f"| audit log | {r['audit']['state']}, {r['audit']['records']} records, results file "
        f"{(r['audit']['results_check'] or {}).get('state')} ({(r['audit']['results_check'] or {}).get('checked')} digested) |",
        f"| wall time | {r['wall_s']} s, mean {r['fps_mean']} frames/s (intervals {r['fps_min_interval']} - {r['fps_max_interval']}) |",
        f"| RSS | start {r['rss_start_mb']:.1f} MB, after warm-up ({r['warmup_frames']} frames) "
        f"{r['rss_after_warmup_mb'] if r['rss_after_warmup_mb'] is None else round(r['rss_after_warmup_mb'], 1)} MB, end {r['rss_end_mb']:.1f} MB, max {r['rss_max_mb']:.1f} MB |",
        f"| RSS slope after warm-up | {verdict} (least squares); Theil-Sen "
        f"{'n/a' if r.get('rss_slope_theil_sen_mb_per_10k_frames') is None else format(r['rss_slope_theil_sen_mb_per_10k_frames'], '+.3f')} MB |",
        f"| open files / threads | {r['fds_start']} -> {r['fds_end']} / {r['threads_start']} -> {r['threads_end']} |",
        "",
        "RSS and throughput over the run (every sample up to 25 rows, evenly spaced):",
        "",
        "| frames | time s | RSS MB | frames/s in interval |",
        "|---|---|---|---|",
    ]
    samples = r["samples"]
    step = max(1, len(samples) // 25)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    lines += [f"| {s['frames']} | {s['t_s']} | {s['rss_mb']:.1f} | {s['fps'] if s['fps'] is not None else ''} |" for s in shown]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100_000, help="synthetic frames to run (default 100000)")
    ap.add_argument("--size", type=int, default=256, help="synthetic frame side in px (default 256, as `run` defaults to)")
    ap.add_argument("--sample-every", type=int, default=None, help="frames between samples (default frames/200, at least 100)")
    ap.add_argument("--warmup", type=int, default=None, help="frames left out of the RSS slope (default 10%% of the run)")
    ap.add_argument("--threads", type=int, default=None, help="inference threads (default: as `edgeclf run`)")
    ap.add_argument("--bundle", default=None, help="a bundle to use instead of training the tiny one (needs torch)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"), help="where soak.json and soak.md go")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work folder: results, clip summary, audit log and a bundle soak trained (its path is printed)")
    args = ap.parse_args(argv)
    if args.frames < 10:
        ap.error("--frames must be at least 10")
    if args.sample_every is None:
        args.sample_every = max(100, args.frames // 200)
    r = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "soak.md").write_text(render(r))
    print(render(r).split("RSS and throughput")[0].rstrip())
    print(f"wrote {out / 'soak.json'} and {out / 'soak.md'}")
    if r.get("work"):
        print(f"kept the results, clip summary and audit log in {r['work']}")
    failed = failures(r)
    for f in failed:
        print(f"FAILED: {f}")
    return 1 if failed else 0


RSS_BUDGET_MB_PER_10K = 1.0
# A slope over the budget fails only where the rise it implies over the measured frames is past the allocator's step
# size: a 3,000-frame run fitted +0.8 MB per 10k frames from a 0.2 MB rise, noise; a real leak rises far past it.
RSS_FLOOR_MB = 4.0


def _rss_rise(r: Dict[str, Any]) -> tuple:
    """(slope in MB per 10k frames or None, the rise it implies in MB over the frames after warm-up, those frames)."""
    slope = r["rss_slope_mb_per_10k_frames"]
    steady = [x["frames"] for x in r["samples"] if x["frames"] >= r["warmup_frames"]]
    span = steady[-1] - steady[0] if steady else 0
    return slope, (abs(slope) * span / 10_000 if slope is not None else 0.0), span


def failures(r: Dict[str, Any]) -> List[str]:
    """What the soak found wrong: fewer frames delivered than asked for, lost, torn or out-of-order results, an audit
    log that does not verify, RSS growing faster than the budget after warm-up or not measured, open files or threads
    growing after warm-up. Empty: it passed."""
    out = []
    # Results are counted against the frames delivered: a source that stopped early would lose nothing.
    if r["frames_delivered"] < r["frames_requested"]:
        out.append(f"the source delivered {r['frames_delivered']} of {r['frames_requested']} frames")
    if r["lost_results"]:
        out.append(f"{r['lost_results']} results lost")
    if r["torn_lines"]:
        out.append(f"{r['torn_lines']} torn result lines")
    if r["frame_gaps"]:
        out.append(f"{r['frame_gaps']} frame gaps in the results")
    if r["result_lines"] and r.get("frames_decided") == 0:
        why = ", ".join(f"{k} {v}" for k, v in sorted((r.get("abstained_by_reason") or {}).items()))
        out.append(f"no result decided a label (every one abstained: {why}): the decision path was not exercised; "
                   "give a bundle that decides on these frames")
    if r["audit"]["state"] != "intact":
        out.append(f"audit log {r['audit']['state']}")
    slope, rise, span = _rss_rise(r)
    if slope is None:  # a soak's point is memory: an unmeasured slope is not a pass
        n = sum(1 for x in r["samples"] if x["frames"] >= r["warmup_frames"])
        out.append(f"RSS slope not measured: {n} samples after warm-up (3 needed); raise --frames or lower --sample-every")
    elif abs(slope) >= RSS_BUDGET_MB_PER_10K and rise >= RSS_FLOOR_MB:
        out.append(f"RSS slope {slope:+.3f} MB per 10,000 frames, over the {RSS_BUDGET_MB_PER_10K:g} MB budget "
                   f"({rise:.1f} MB over the {span} frames after warm-up)")
    steady = [x for x in r["samples"] if x["frames"] >= r["warmup_frames"]]
    for key in ("fds", "threads"):
        seen = [x[key] for x in steady if x.get(key) is not None]
        if len(seen) >= 2 and seen[-1] > seen[0]:
            out.append(f"{key} grew after warm-up: {seen[0]} -> {seen[-1]}")
    return out


if __name__ == "__main__":
    sys.exit(main())
