"""Compression benchmark: train, prune, quantize and evaluate on real data; one table out.

    python benchmarks/compression.py                     # every dataset found under ../shared/data
    python benchmarks/compression.py --only breastmnist  # one of them

For each (dataset, model): the unpruned fp32 parent, its gated INT8 (cpu flavour), the model pruned
to 50% of its MACs (fine-tuned, recalibrated) and that one's INT8. Each is evaluated once on the
test split (choices were made on validation only) and timed with ONNX Runtime, batch 1, fixed input
size, 2 threads, all four interleaved in one process. Writes benchmarks/results/compression.{json,md}.
This is a benchmark, not a test: its figures are measurements of this machine, committed with it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGECLF_SHARED_DATA", REPO.parent / "shared" / "data"))
# (name, data spec, model, input size, epochs); BUSI and brain MRI have no split folders: seeded,
# stratified, duplicate-grouped splits.
CONFIGS = [
    ("breastmnist", "medmnist/breastmnist.npz", "compact", 32, 40),
    ("busi", "busi", "compact", 64, 30),
    ("busi", "busi", "resnet18", 96, 15),
    ("brain_mri", "brain_mri", "compact", 64, 15),
]


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else ""
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": 2}


def run_config(name: str, spec: str, model: str, size: int, epochs: int, work: Path) -> list[dict]:
    from edgeclf.evaluate import evaluate
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.export.compress import measure_latency
    from edgeclf.export.prune import PruneConfig, prune_trained
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.preprocess import Preprocessor
    from edgeclf.train import TrainConfig, train

    data = str(SHARED / spec)
    tag = f"{name}-{model}-{size}"
    t0 = time.time()
    train(TrainConfig(data=data, out=str(work / tag), model=model, size=size, epochs=epochs, patience=max(5, epochs // 4)))
    prune_trained(PruneConfig(model=str(work / tag), out=str(work / f"{tag}-p50"), target_macs=0.5, steps=2,
                              finetune_epochs=max(4, epochs // 4)))
    rows, paths = [], {}
    for folder, pruned in ((tag, False), (f"{tag}-p50", True)):
        bundle = work / f"{folder}.bundle"
        m = export_bundle(ExportConfig(out=str(bundle), model=str(work / folder), precision="auto", max_drop=0.01, overwrite=True))
        b = load_bundle(bundle)
        gate = {c["id"]: c for c in m["deploy"]["candidates"]}
        for precision in ("fp32", "int8"):
            if precision == "int8" and not any(v["id"] == "int8-cpu" for v in m["variants"]):
                rows.append({"dataset": name, "model": model, "size": size, "pruned": pruned, "precision": "int8",
                             "refused": f"gate: {gate['int8-cpu']['failed_on']}"})
                continue
            path, vid = b.select(precision, "ort-cpu")
            ev = evaluate(str(bundle), data=data, split="test", precision=precision)["metrics"]
            sens = [v["sensitivity"] for v in ev["per_class"].values() if v["sensitivity"] is not None]
            key = f"{'p50' if pruned else 'base'}-{vid}"
            paths[key] = path
            rows.append({"dataset": name, "model": model, "size": size, "pruned": pruned, "precision": precision, "key": key,
                         "n_test": ev["n"], "accuracy": ev["accuracy"], "auc": ev["auc"]["macro"], "auc_ci95": ev["auc"]["macro_ci95"],
                         "worst_sensitivity": min(sens) if sens else None, "ece": ev["ece"], "size_mb": path.stat().st_size / 1e6,
                         "gate": gate.get(vid, {}).get("worst") if precision == "int8" else None})
    x1 = Preprocessor(b.manifest.preprocess).batch([np.zeros((size, size), np.uint8)])
    lat = measure_latency(paths, x1, runs=300, warmup=30, threads=2)
    base = lat["base-fp32"]["median"]
    for r in rows:
        if "key" in r:
            r["latency_ms"] = lat[r["key"]]
            r["speedup"] = base / lat[r["key"]]["median"]
    for r in rows:
        r["seconds_for_config"] = round(time.time() - t0, 1)
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    head = ("| dataset | model | px | pruned | precision | test acc | test AUC (95% CI) | worst-class sens | ECE | MB | "
            "median ms | p90 ms | speedup |\n|" + "---|" * 13)
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, ONNX Runtime {info['onnxruntime']}, torch {info['torch']}; "
             "batch 1, 2 threads, interleaved, 300 runs.", "",
             "Command: `python benchmarks/compression.py`. Speedup is against the unpruned fp32 model of the same row group. "
             "Brain MRI: exact copies are grouped before the split, near copies are not yet, so its figures may flatter.", "", head]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['dataset']} | {r['model']} | {r['size']} | {'50% MACs' if r['pruned'] else 'no'} | int8 | "
                         f"refused by the gate ({r['refused']}) | | | | | | | |")
            continue
        ci = r["auc_ci95"] or [None, None]
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['size']} | {'50% MACs' if r['pruned'] else 'no'} | {r['precision']} | "
            f"{r['accuracy']:.3f} | {r['auc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) | {r['worst_sensitivity']:.3f} | {r['ece']:.3f} | "
            f"{r['size_mb']:.2f} | {r['latency_ms']['median']:.2f} | {r['latency_ms']['p90']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated dataset names")
    ap.add_argument("--work", default="/tmp/edgeclf-bench", help="scratch folder for runs and bundles")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--render", action="store_true", help="only rewrite compression.md from compression.json")
    args = ap.parse_args()
    if args.render:
        doc = json.loads((Path(args.out) / "compression.json").read_text())
        (Path(args.out) / "compression.md").write_text(markdown(doc["rows"], doc["machine"]))
        return
    wanted = set(args.only.split(",")) if args.only else None
    info = machine()
    rows: list[dict] = []
    for name, spec, model, size, epochs in CONFIGS:
        if wanted and name not in wanted:
            continue
        if not (SHARED / spec).exists():
            print(f"skip {name}: {SHARED / spec} is absent")
            continue
        print(f"== {name} {model} {size}px", flush=True)
        rows += run_config(name, spec, model, size, epochs, Path(args.work))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compression.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2, default=float))
        (out / "compression.md").write_text(markdown(rows, info))
        print(markdown(rows, info), flush=True)


if __name__ == "__main__":
    main()
