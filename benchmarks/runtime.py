"""Runtime benchmark: the full pipeline against backend-only inference and a naive loop, interleaved.

    python benchmarks/runtime.py                 # mobilenet_v3_small and resnet18 at 224 px, 640x480 video
    python benchmarks/runtime.py --frames 60 --rounds 1   # a quick look

For each model (an untrained-but-exported bundle at 224 px, 3 channels: speed does not depend on the
weights), on a 640x480 mp4 of synthetic ultrasound with burned-in text:

- backend only: ONNX Runtime `infer` on one preprocessed frame, over and over (the ceiling);
- pipeline: `run_bundle` (prefetching decoder thread, preprocess, quality gate, infer, cine smoothing,
  JSONL sink), its own frames/s over the loop and its per-stage medians;
- naive: the loop a user would write: `cv2.VideoCapture.read`, numpy preprocessing, `session.run`
  with ONNX Runtime's default settings, one thread of Python.

With `--batches 1,8` (the default) the pipeline and backend-only also run 8 frames per inference call
(`edgeclf run --batch 8`, for recorded files); backend-only at a batch is the ceiling for the pipeline at it.

Rounds interleave every mode (A B C A B C ...) so drift on this shared machine hits all alike; every
figure is its own median over rounds (runtime.json keeps each round's record beside them). Pipeline and
backend-only run with 1 and 2 intra-op threads. Writes benchmarks/results/runtime.{json,md}; with
`--markdown-from runtime.json`, only rewrites runtime.md from a run's results and judges them.

Exit 1, with one line per failure, when a target is missed by more than the noise (`failures`):
pre+quality+post+sink per frame over 0.5 ms (the README's target), and the runtime issue's ratios that
runtime-notes.md reads the figures against: resnet18 pipeline under 0.85x backend-only, mobilenet_v3_small
pipeline under 1.2x the naive loop (ratios: medians of the per-round ratios). A benchmark, not a test:
its figures describe this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("mobilenet_v3_small", "resnet18")

# Targets. The README: "the 0.5 ms this project aims for" (preprocess + quality gate + postprocess + sink per frame,
# inside the pipeline); the ratios are the runtime issue's, as runtime-notes.md reads them. A model without a ratio
# target here has none (mobilenet_v3_small against backend-only: decoding and preprocessing are a third of its frame).
OVERHEAD_TARGET_MS = 0.5
PIPELINE_VS_BACKEND_MIN = {"resnet18": 0.85}
PIPELINE_VS_NAIVE_MIN = {"mobilenet_v3_small": 1.2}
# A target fails only when missed by more than this share: in three runs on the same quiet host (runtime-notes.md,
# 2026-12-06, seventh session) the 2-thread batch-1 medians spread about 9% either side of their mean (overhead,
# mobilenet_v3_small 0.491-0.582 ms; its pipeline / naive 1.22-1.45x).
NOISE = 0.10


def make_video(path: Path, frames: int) -> None:
    """640x480 mp4: a 480x480 synthetic ultrasound cine centred, UI text on both sides."""
    import cv2

    from edgeclf.runtime.synthetic import write_cine

    square = path.with_name("square.mp4")
    write_cine(square, size=480, fps=30.0, seed=3, timeline=[(0, frames // 2), (2, frames - frames // 2)])
    cap = cv2.VideoCapture(str(square))
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (640, 480))
    k = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        canvas = np.zeros((480, 640, 3), np.uint8)
        canvas[:, 80:560] = img
        cv2.putText(canvas, f"C5-1  {k:04d}", (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (200, 200, 200), 1)
        cv2.putText(canvas, "MI 0.9 TIS 0.4", (565, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (200, 200, 200), 1)
        vw.write(canvas)
        k += 1
    cap.release()
    vw.release()


def make_bundle(model: str, work: Path) -> Path:
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.train import TrainConfig, train

    folder, bundle = work / model, work / f"{model}.bundle"
    train(TrainConfig(data="synthetic:ultrasound?n=60&size=128", out=str(folder), model=model, size=224, channels=3,
                      epochs=1, batch_size=16, patience=1))
    export_bundle(ExportConfig(out=str(bundle), model=str(folder), overwrite=True))
    return bundle


def backend_only(bundle: Path, frames: int, threads: int, batch: int = 1) -> dict:
    from edgeclf.runtime.backends import OrtBackend
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.preprocess import Preprocessor

    m = load_bundle(bundle).manifest
    x = np.repeat(Preprocessor(m.preprocess)(np.zeros((480, 640, 3), np.uint8)), batch, axis=0)
    calls = max(1, frames // batch)
    with OrtBackend(str(bundle / m.raw["model"]["file"]), (3, 224, 224), m.num_outputs, threads=threads) as be:
        for _ in range(5):
            be.infer(x)
        t0 = time.perf_counter()
        for _ in range(calls):
            be.infer(x)
        wall = time.perf_counter() - t0
    return {"fps": calls * batch / wall, "ms_per_frame": wall / (calls * batch) * 1e3}


def pipeline(bundle: Path, video: Path, threads: int, out: Path, batch: int = 1) -> dict:
    from edgeclf.runtime.app import run_bundle
    from edgeclf.runtime.pipeline import RunOptions

    s = run_bundle(str(bundle), str(video), out=str(out), threads=threads, options=RunOptions(batch=batch))
    assert s["batch"] == batch and s["frames"] == s["written"]
    stages = {k: v["median"] for k, v in s["stages_ms"].items()}
    overhead = stages["preprocess"] + stages["postprocess"] + stages["sink"]
    parts = {k: v["median"] for k, v in s["preprocess_parts_ms"].items()}
    return {"fps": s["fps"], "frames": s["frames"], "written": s["written"], "stages_ms": stages, "preprocess_parts_ms": parts,
            "pre_quality_post_sink_ms": overhead, "latency_p90_ms": s["stages_ms"]["latency"]["p90"]}


def naive(bundle: Path, video: Path) -> dict:
    """What a user would write first: read, numpy preprocess, session.run with ORT defaults."""
    import cv2
    import onnxruntime as ort

    from edgeclf.runtime.bundle import load_bundle

    m = load_bundle(bundle).manifest
    mean = np.asarray(m.preprocess.mean, np.float32).reshape(1, 1, 3)
    std = np.asarray(m.preprocess.std, np.float32).reshape(1, 1, 3)
    sess = ort.InferenceSession(str(bundle / m.raw["model"]["file"]), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    cap = cv2.VideoCapture(str(video))
    n = 0
    t0 = time.perf_counter()
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        x = cv2.resize(rgb, (224, 224)).astype(np.float32) / 255.0
        x = ((x - mean) / std).transpose(2, 0, 1)[None]
        logits = sess.run(None, {name: np.ascontiguousarray(x)})[0]
        e = np.exp(logits - logits.max())
        _ = e / e.sum()
        n += 1
    wall = time.perf_counter() - t0
    cap.release()
    return {"fps": n / wall, "frames": n}


def machine() -> dict:
    import cv2
    import onnxruntime

    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else ""
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__}


def _key(mode: str, threads: int, batch: int) -> str:
    return f"{mode}_t{threads}" + (f"_b{batch}" if batch > 1 else "")


def markdown(doc: dict) -> str:
    info, res = doc["machine"], doc["results"]
    batches = doc.get("batches", [1])
    combos = [(t, bt) for t in doc["threads"] for bt in batches]
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, ONNX Runtime {info['onnxruntime']}, OpenCV {info['opencv']}, "
             f"Python {info['python']}. {doc['frames']} frames of 640x480 mp4 per run, {doc['rounds']} interleaved rounds, "
             f"medians over rounds. Command: `python benchmarks/runtime.py --rounds {doc['rounds']}`.", "",
             "| model | mode | threads | batch | frames/s | vs naive | vs backend only (same threads, batch) | "
             "pre+quality+post+sink ms | capture-to-result p90 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for model, r in res.items():
        nv = r["naive"]["fps"]
        lines.append(f"| {model} | naive loop | ORT default | 1 | {nv:.1f} | 1.00x | | | |")
        for t, bt in combos:
            bo = r[_key("backend", t, bt)]["fps"]
            pl = r[_key("pipeline", t, bt)]
            lines.append(f"| {model} | backend only | {t} | {bt} | {bo:.1f} | {bo / nv:.2f}x | 1.00x | | |")
            lines.append(f"| {model} | pipeline | {t} | {bt} | {pl['fps']:.1f} | {pl['fps'] / nv:.2f}x | {pl['fps'] / bo:.2f}x | "
                         f"{_overhead(pl):.3f} | {pl['latency_p90_ms']:.2f} |")
    lines += ["", "Ratios within each round (the modes of a round ran back to back, so drift between rounds cancels); "
              "median and per-round values:", "",
              "| model | threads | batch | pipeline / naive | pipeline / backend only | pre+quality+post+sink ms |", "|---|---|---|---|---|---|"]
    for model, r in res.items():
        for t, bt in combos:
            pk = _key("pipeline", t, bt)
            vs_naive, vs_backend = _round_ratios(r, t, bt)
            ov = r[pk].get("overhead_runs", [])
            lines.append(f"| {model} | {t} | {bt} | {np.median(vs_naive):.2f}x ({', '.join(f'{v:.2f}' for v in vs_naive)}) | "
                         f"{np.median(vs_backend):.2f}x ({', '.join(f'{v:.2f}' for v in vs_backend)}) | "
                         f"{_overhead(r[pk]):.3f} ({', '.join(f'{v:.3f}' for v in ov)}) |")
    lines += ["", "Pipeline per-stage medians (ms; with a batch, infer is each frame's share of its call):", "",
              "| model | threads | batch | " + " | ".join(doc["stages"]) + " |", "|---|---|---|" + "---|" * len(doc["stages"])]
    for model, r in res.items():
        for t, bt in combos:
            st = r[_key("pipeline", t, bt)]["stages_ms"]
            lines.append(f"| {model} | {t} | {bt} | " + " | ".join(f"{st[s]:.3f}" for s in doc["stages"]) + " |")
    lines += ["", "Inside the preprocess stage (medians, ms; the quality gate and the model input are timed apart):", "",
              "| model | threads | batch | quality gate | model input (resize, normalise, layout) |", "|---|---|---|---|---|"]
    for model, r in res.items():
        for t, bt in combos:
            pp = r[_key("pipeline", t, bt)]["preprocess_parts_ms"]
            lines.append(f"| {model} | {t} | {bt} | {pp['quality']:.3f} | {pp['model_input']:.3f} |")
    if any(_legacy(e) for r in res.values() for k, e in r.items() if k.startswith("pipeline")):
        lines += ["", "This runtime.json was written before every figure was a median over rounds: it keeps per-round values "
                  "of frames/s and of pre+quality+post+sink only, so those are medians over rounds here, while the "
                  "capture-to-result p90, the per-stage and the preprocess-part figures are those of the one round whose "
                  "frames/s was the median."]
    failed = failures(doc)
    lines += ["", f"Targets (missed by more than {NOISE:.0%}, the run-to-run noise of the medians, fails the run): "
              f"pre+quality+post+sink <= {OVERHEAD_TARGET_MS:g} ms per frame; "
              + "; ".join(f"{m} pipeline / backend only >= {v:g}x" for m, v in PIPELINE_VS_BACKEND_MIN.items()) + "; "
              + "; ".join(f"{m} pipeline / naive >= {v:g}x" for m, v in PIPELINE_VS_NAIVE_MIN.items())
              + " (ratios: medians of the per-round ratios). "
              + ("All held." if not failed else f"{len(failed)} missed:"), ""]
    lines += [f"- FAILED: {f}" for f in failed]
    return "\n".join(lines).rstrip("\n") + "\n"


def _med(values: List[Any]) -> Any:
    """The median of one figure over rounds; dicts key by key; None when a round has none; counts stay ints."""
    if isinstance(values[0], dict):
        return {k: _med([v[k] for v in values]) for k in values[0]}
    if any(v is None for v in values):
        return None
    m = float(np.median(values))
    return int(m) if all(isinstance(v, int) for v in values) and m.is_integer() else m


def _median(runs: List[dict]) -> dict:
    """One mode's rounds as one record: every figure its own median over the rounds (not the figures of the round
    whose frames/s was the median), the per-round frames/s and overhead, and each round's record under "runs"."""
    out = {k: _med([r[k] for r in runs]) for k in runs[0]}
    out["fps_runs"] = [round(r["fps"], 2) for r in runs]
    if "pre_quality_post_sink_ms" in runs[0]:
        out["overhead_runs"] = [round(r["pre_quality_post_sink_ms"], 4) for r in runs]
    out["runs"] = [dict(r) for r in runs]
    return out


def _legacy(entry: dict) -> bool:
    """A runtime.json written before per-figure medians: only frames/s and the overhead have per-round values, and its
    other figures are those of the round with the median frames/s."""
    return "runs" not in entry


def _overhead(entry: dict) -> float:
    """pre+quality+post+sink ms per frame, the median over rounds (from the per-round values in an older runtime.json)."""
    if _legacy(entry) and entry.get("overhead_runs"):
        return float(np.median(entry["overhead_runs"]))
    return float(entry["pre_quality_post_sink_ms"])


def _round_ratios(r: dict, threads: int, batch: int) -> Tuple[List[float], List[float]]:
    """Pipeline / naive and pipeline / backend-only within each round (the modes of a round ran back to back)."""
    pl, nv = r[_key("pipeline", threads, batch)]["fps_runs"], r["naive"]["fps_runs"]
    bo = r[_key("backend", threads, batch)]["fps_runs"]
    return [a / b for a, b in zip(pl, nv)], [a / b for a, b in zip(pl, bo)]


def failures(doc: dict) -> List[str]:
    """The targets missed by more than NOISE, one line each; empty: every target held."""
    out = []
    for model, r in doc["results"].items():
        for t in doc["threads"]:
            for bt in doc.get("batches", [1]):
                where = f"{model}, {t} thread{'s' if t != 1 else ''}, batch {bt}"
                ov = _overhead(r[_key("pipeline", t, bt)])
                if ov > OVERHEAD_TARGET_MS * (1 + NOISE):
                    out.append(f"{where}: pre+quality+post+sink {ov:.3f} ms per frame (median over rounds), over the "
                               f"{OVERHEAD_TARGET_MS:g} ms target by more than {NOISE:.0%}")
                vs_naive, vs_backend = _round_ratios(r, t, bt)
                for name, ratios, targets in (("naive loop", vs_naive, PIPELINE_VS_NAIVE_MIN),
                                              ("backend only", vs_backend, PIPELINE_VS_BACKEND_MIN)):
                    floor = targets.get(model)
                    if floor is not None and ratios and float(np.median(ratios)) < floor * (1 - NOISE):
                        out.append(f"{where}: pipeline / {name} {float(np.median(ratios)):.2f}x (median of the per-round "
                                   f"ratios), under the {floor:g}x target by more than {NOISE:.0%}")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,8", help="frames per inference call for pipeline and backend-only")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--markdown-from", default=None, metavar="JSON",
                    help="Run nothing: write runtime.md in --out from this runtime.json and judge its results.")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.markdown_from:
        doc: Dict[str, Any] = json.loads(Path(args.markdown_from).read_text())
    else:
        doc = run(args)
        out.mkdir(parents=True, exist_ok=True)
        (out / "runtime.json").write_text(json.dumps(doc, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime.md").write_text(markdown(doc))
    print(markdown(doc))
    failed = failures(doc)
    for f in failed:
        print(f"FAILED: {f}")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> Dict[str, Any]:
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        video = work / "us640x480.mp4"
        make_video(video, args.frames)
        bundles = {m: make_bundle(m, work) for m in MODELS}
        runs: dict = {m: {} for m in MODELS}
        for rnd in range(args.rounds):
            for m, b in bundles.items():
                runs[m].setdefault("naive", []).append(naive(b, video))
                for t in threads:
                    for bt in batches:
                        runs[m].setdefault(_key("backend", t, bt), []).append(backend_only(b, args.frames, t, bt))
                        runs[m].setdefault(_key("pipeline", t, bt), []).append(pipeline(b, video, t, work / "r.jsonl", bt))
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    results = {m: {k: _median(v) for k, v in r.items()} for m, r in runs.items()}
    from edgeclf.runtime.pipeline import STAGES

    return {"machine": machine(), "frames": args.frames, "rounds": args.rounds, "threads": threads, "batches": batches,
            "stages": list(STAGES) + ["latency"], "results": results}


if __name__ == "__main__":
    sys.exit(main())
