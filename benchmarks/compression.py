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
import shutil
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGECLF_SHARED_DATA", REPO.parent / "shared" / "data"))
# (name, data spec, model, input size, training options). BUSI and brain MRI have no split folders:
# seeded, stratified, duplicate-grouped splits. BreastMNIST is judged on accuracy (the MedMNIST
# baselines' metric), so its operating point is the most accurate one on validation.
CONFIGS = [
    ("breastmnist", "medmnist/breastmnist.npz", "compact", 32, {"epochs": 40, "operating_point": "accuracy"}),
    ("busi", "busi", "compact", 64, {"epochs": 30}),
    ("busi", "busi", "resnet18", 96, {"epochs": 25}),
    # 4,000 training images: fewer, cheaper epochs so that the whole table fits in an hour on 2 cores.
    ("brain_mri", "brain_mri", "resnet18", 64, {"epochs": 8, "prune": {"steps": 2, "finetune_epochs": 4}}),
]
PRUNE = {"target_macs": 0.5, "steps": 3, "finetune_epochs": 8}  # fine-tuned with the parent as teacher


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


def _test_agreement(bundle, data: str, fp32_path: Path, int8_path: Path) -> dict:
    """Decision agreement of the INT8 variant with its fp32 parent on the test split (the gate's is on val)."""
    from edgeclf.data import load_dataset
    from edgeclf.runtime.backends import OrtBackend
    from edgeclf.runtime.postprocess import decide, probabilities
    from edgeclf.runtime.preprocess import Preprocessor

    m = bundle.manifest
    seed = ((m.raw["provenance"].get("training") or {}).get("config") or {}).get("seed", 0)
    ds = load_dataset(data, classes=(m.raw["provenance"].get("data") or {}).get("classes"), seed=seed)
    x = Preprocessor(m.preprocess).batch(ds.split("test").images)
    decisions = []
    for path in (fp32_path, int8_path):
        with OrtBackend(str(path), (m.preprocess.channels, *m.preprocess.size), m.num_outputs, threads=2) as be:
            logits = np.concatenate([be.infer(x[i : i + 64]) for i in range(0, len(x), 64)])
        decisions.append(decide(probabilities(logits, m.task, m.temperature), m.decision))
    a, b = decisions
    same = (a == b).all(axis=1) if a.ndim == 2 else a == b
    return {"agreement": float(same.mean()), "disagreeing": [f"test[{i}]" for i in np.flatnonzero(~same)]}


def run_config(name: str, spec: str, model: str, size: int, opts: dict, work: Path) -> list[dict]:
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
    opts = dict(opts)
    prune = {**PRUNE, **opts.pop("prune", {})}
    epochs = int(opts["epochs"])
    train(TrainConfig(data=data, out=str(work / tag), model=model, size=size, patience=max(5, epochs // 4), **opts))
    prune_trained(PruneConfig(model=str(work / tag), out=str(work / f"{tag}-p50"), **prune))
    rows, paths, exports = [], {}, {}
    for folder, pruned in ((tag, False), (f"{tag}-p50", True)):
        bundle = work / f"{folder}.bundle"
        m = export_bundle(ExportConfig(out=str(bundle), model=str(work / folder), precision="auto", max_drop=0.01, overwrite=True))
        b = load_bundle(bundle)
        gate = {c["id"]: c for c in m["deploy"]["candidates"]}
        exports[folder] = {"deploy": {k: v for k, v in m["deploy"].items() if k != "candidates"}, "candidates": m["deploy"]["candidates"]}
        fp32_path = None
        for precision in ("fp32", "int8"):
            base = {"dataset": name, "model": model, "size": size, "pruned": pruned, "precision": precision,
                    "deployed": m["deploy"]["precision"] == precision}
            if precision == "int8" and not any(v["id"] == "int8-cpu" for v in m["variants"]):
                c = gate["int8-cpu"]
                if c.get("built") is False:  # could not be built: no gate figures to show
                    rows.append({**base, "refused": f"not built: {c['error']}", "gate": None, "val_agreement": None})
                    continue
                rows.append({**base, "refused": f"{', '.join(c['failed_on'])}: drop {c['worst']['drop']:.3f}",
                             "gate": c["worst"], "val_agreement": c["decision_agreement"]})
                continue
            path, vid = b.select(precision, "ort-cpu")
            ev = evaluate(str(bundle), data=data, split="test", precision=precision)["metrics"]
            sens = [v["sensitivity"] for v in ev["per_class"].values() if v["sensitivity"] is not None]
            key = f"{'p50' if pruned else 'base'}-{vid}"
            paths[key] = path
            row = {**base, "key": key, "n_test": ev["n"], "accuracy": ev["accuracy"], "auc": ev["auc"]["macro"],
                   "auc_ci95": ev["auc"]["macro_ci95"], "worst_sensitivity": min(sens) if sens else None, "ece": ev["ece"],
                   "size_mb": path.stat().st_size / 1e6}
            if precision == "fp32":
                fp32_path = path
            else:
                c = gate[vid]
                row.update(gate=c["worst"], val_agreement=c["decision_agreement"], kept_float=c.get("kept_float", []),
                           test_agreement=_test_agreement(b, data, fp32_path, path)["agreement"])
            rows.append(row)
    x1 = Preprocessor(b.manifest.preprocess).batch([np.zeros((size, size), np.uint8)])
    lat = measure_latency(paths, x1, runs=300, warmup=30, threads=2)
    base_ms = lat["base-fp32"]["median"]
    for r in rows:
        if "key" in r:
            r["latency_ms"] = lat[r["key"]]
            r["speedup"] = base_ms / lat[r["key"]]["median"]
        r["seconds_for_config"] = round(time.time() - t0, 1)
        r["options"] = {**opts, "prune": prune}
    rows[0]["exports"] = exports
    return rows


def _cell_agreement(r: dict) -> str:
    if r.get("val_agreement") is None:
        return ""
    test = f" / {r['test_agreement']:.3f}" if "test_agreement" in r else ""
    return f"{r['val_agreement']:.3f}{test}"


def markdown(rows: list[dict], info: dict) -> str:
    head = ("| dataset | model | px | pruned | precision | test acc | test AUC (95% CI) | worst-class sens | ECE | MB | "
            "median ms | p90 ms | speedup | agreement with fp32 (val / test) |\n|" + "---|" * 14)
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, ONNX Runtime {info['onnxruntime']}, torch {info['torch']}; "
             "batch 1, 2 threads, interleaved, 300 runs.", "",
             "Command: `python benchmarks/compression.py` (`--only busi:resnet18` re-runs one row group and keeps the rest). "
             "Speedup is against the unpruned fp32 model of the same row group. Pruned: 50% of the MACs in "
             f"{PRUNE['steps']} prune-then-fine-tune steps of {PRUNE['finetune_epochs']} epochs (brain MRI: 2 of 4), distilled from "
             "the unpruned parent. "
             "INT8: ONNX Runtime static QDQ, cpu flavour (unsigned activations, per-channel weights with reduced (7-bit) range), gated "
             "against its own fp32 parent on validation with --max-drop 0.01; `(deployed)` marks what `--precision auto` chose. "
             "Brain MRI: exact copies are grouped before the split, near copies are not, so its figures may flatter. "
             "Row groups re-run with `--only` keep their own options (in compression.json); the brain MRI group ran after "
             "preprocessing's shrink became 'fast-area', the others with exact 'area'.", "", head]
    for r in rows:
        pruned = "50% MACs" if r["pruned"] else "no"
        if "refused" in r:
            lines.append(f"| {r['dataset']} | {r['model']} | {r['size']} | {pruned} | int8 | "
                         f"refused by the gate ({r['refused']}) | | | | | | | | {_cell_agreement(r)} |")
            continue
        ci = r["auc_ci95"] or [None, None]
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['size']} | {pruned} | {r['precision']}{' (deployed)' if r.get('deployed') else ''} | "
            f"{r['accuracy']:.3f} | {r['auc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) | {r['worst_sensitivity']:.3f} | {r['ece']:.3f} | "
            f"{r['size_mb']:.2f} | {r['latency_ms']['median']:.2f} | {r['latency_ms']['p90']:.2f} | {r['speedup']:.2f}x | "
            f"{_cell_agreement(r)} |")
    return "\n".join(lines) + "\n"


def _selected(name: str, model: str, wanted: set[str] | None) -> bool:
    return wanted is None or name in wanted or f"{name}:{model}" in wanted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated dataset or dataset:model names; other row groups are kept")
    ap.add_argument("--work", default="/tmp/edgeclf-bench", help="scratch folder for runs and bundles")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--render", action="store_true", help="only rewrite compression.md from compression.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        doc = json.loads((out / "compression.json").read_text())
        (out / "compression.md").write_text(markdown(doc["rows"], doc["machine"]))
        return
    wanted = set(args.only.split(",")) if args.only else None
    info = machine()
    done: dict[tuple, list[dict]] = {}
    if wanted and (out / "compression.json").is_file():  # keep the row groups not re-run, in CONFIGS order
        for r in json.loads((out / "compression.json").read_text())["rows"]:
            done.setdefault((r["dataset"], r["model"], r["size"]), []).append(r)
    for name, spec, model, size, opts in CONFIGS:
        if not _selected(name, model, wanted):
            continue
        if not (SHARED / spec).exists():
            print(f"skip {name}: {SHARED / spec} is absent")
            continue
        print(f"== {name} {model} {size}px", flush=True)
        work = Path(args.work)
        for folder in (f"{name}-{model}-{size}", f"{name}-{model}-{size}-p50"):
            shutil.rmtree(work / folder, ignore_errors=True)
        done[(name, model, size)] = run_config(name, spec, model, size, opts, work)
        rows = [r for c in CONFIGS for r in done.get((c[0], c[2], c[3]), [])]
        out.mkdir(parents=True, exist_ok=True)
        (out / "compression.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2, default=float))
        (out / "compression.md").write_text(markdown(rows, info))
        print(markdown(rows, info), flush=True)


if __name__ == "__main__":
    main()
