"""Compression benchmark: train, prune, quantize and evaluate on real data; one table out.

    python benchmarks/compression.py                     # every dataset found under ../shared/data
    python benchmarks/compression.py --only breastmnist  # one of them

For each (dataset, model): the unpruned fp32 parent, its gated INT8 (cpu flavour), the model pruned
to 50% of its MACs (fine-tuned, recalibrated) and that one's INT8. Each is evaluated once on the
test split (choices were made on validation only) and timed with ONNX Runtime, batch 1, fixed input
size, 2 threads, all four interleaved in one process. Writes benchmarks/results/compression.{json,md}.
This is a benchmark, not a test: its figures are measurements of this machine, committed with it.

Targets (the compression issue's acceptance; `failures`), judged on the whole table, kept row groups included:
each INT8 variant built stays within the gate's limits of its own fp32 parent on the test split too (AUC drop
<= 0.01, decision agreement >= 0.98 on validation and test; the limits it was exported with); on BUSI and on brain
MRI some compressed model is at least 3x faster than its architecture unpruned in fp32 with AUC at most 0.01 below
it; on BreastMNIST a deployed compressed model reaches AUC >= 0.90 and accuracy >= 0.86 (the published ResNet-18 at
28 px), AUC at most 0.01 below its unpruned fp32. A variant the gate refused is the gate at work, not a failure;
a target whose data set has no row (its data absent, so skipped, or a table without it) is not met: "not run".
Prints a line per target; exit 1, one FAILED line each, when one is missed (`--render` checks the committed table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
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
# The gate's limits every variant is exported with (ExportConfig's defaults), checked again on the test split.
MAX_DROP, MIN_AGREEMENT = 0.01, 0.98
EPS = 1e-9  # k/n in floats: exactly the limit passes, as in export/gate.py
# The compression issue's acceptance: per data set, the speedup of some compressed model over its architecture
# unpruned in fp32, and for BreastMNIST the figures of the published ResNet-18 (28 px) a deployed model must reach.
SPEEDUP_TARGETS = {"busi": 3.0, "brain_mri": 3.0}
FIGURE_TARGETS = {"breastmnist": {"auc": 0.90, "accuracy": 0.86}}


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
        m = export_bundle(ExportConfig(out=str(bundle), model=str(work / folder), precision="auto", max_drop=MAX_DROP,
                                          min_agreement=MIN_AGREEMENT, overwrite=True))
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
    lines += ["", "Targets (the compression issue's acceptance; `python benchmarks/compression.py` exits 1 when one is missed):", ""]
    lines += [f"- {what}: {'met' if met else '**NOT met**'} ({shown})" for what, met, shown, _ in targets(rows)]
    lines += [f"- FAILED: {f}" for f in failures(rows)]
    return "\n".join(lines) + "\n"


def _label(r: dict) -> str:
    return f"{r['dataset']} {r['model']} {r['size']} px {'pruned ' if r['pruned'] else ''}{r['precision']}"


def _not_run(what: str, name: str) -> tuple[str, bool, str, list[str]]:
    """A target whose data set has no measured row (its data absent, or left out): never judged, so not met."""
    return (what, False, "not run", [f"{name}: not run (no row of it in the table); run it, e.g. --only {name}"])


def targets(rows: list[dict]) -> list[tuple[str, bool, str, list[str]]]:
    """(what, met, the figures behind the verdict, failure lines) per target, over the whole table."""
    measured = [r for r in rows if "refused" not in r]
    if not measured:
        return [("rows measured", False, "none", ["no row measured: nothing to judge (no data set found, or an empty table)"])]
    unpruned = {(r["dataset"], r["model"], r["size"]): r for r in measured if not r["pruned"] and r["precision"] == "fp32"}
    parent = {(r["dataset"], r["model"], r["size"], r["pruned"]): r for r in measured if r["precision"] == "fp32"}
    out: list[tuple[str, bool, str, list[str]]] = []
    # Each INT8 variant the gate let through, against its own fp32 parent, on the test split as well.
    gate: list[str] = []
    int8 = [r for r in measured if r["precision"] == "int8"]
    for r in int8:
        fp = parent.get((r["dataset"], r["model"], r["size"], r["pruned"]))
        if fp is not None and fp["auc"] - r["auc"] > MAX_DROP + EPS:
            gate.append(f"{_label(r)}: test AUC {r['auc']:.3f}, {fp['auc'] - r['auc']:.3f} below its fp32 parent's "
                        f"{fp['auc']:.3f} (limit {MAX_DROP:g})")
        for split in ("val", "test"):
            a = r.get(f"{split}_agreement")
            if a is None or a < MIN_AGREEMENT - EPS:
                gate.append(f"{_label(r)}: decision agreement with its fp32 parent "
                            f"{'not measured' if a is None else format(a, '.3f')} on {split}, under {MIN_AGREEMENT:g}")
    out.append((f"INT8 variants within the gate's limits of their fp32 parents on test (AUC drop <= {MAX_DROP:g}, "
                f"agreement >= {MIN_AGREEMENT:g})", not gate, f"{len(int8)} variants, {len(gate)} missed", gate))

    def kept(r: dict) -> bool:
        """A compressed model whose AUC is at most MAX_DROP below its architecture unpruned in fp32."""
        base = unpruned.get((r["dataset"], r["model"], r["size"]))
        return (r["pruned"] or r["precision"] != "fp32") and base is not None and r["auc"] >= base["auc"] - MAX_DROP - EPS

    for name, floor in SPEEDUP_TARGETS.items():
        what = f"{name}: a compressed model >= {floor:g}x faster than its unpruned fp32, AUC at most {MAX_DROP:g} below it"
        cands = sorted((r for r in measured if r["dataset"] == name and kept(r)), key=lambda r: r["speedup"])
        if not any(r["dataset"] == name for r in measured):
            out.append(_not_run(what, name))
            continue
        best = cands[-1] if cands else None
        shown = f"{best['speedup']:.2f}x, {_label(best)}" if best else "none"
        met = best is not None and best["speedup"] >= floor
        out.append((what, met, shown, [] if met else [
            f"{name}: no compressed model is >= {floor:g}x faster than its architecture unpruned in fp32 with AUC at most "
            f"{MAX_DROP:g} below it (fastest such: {shown})"]))
    for name, floors in FIGURE_TARGETS.items():
        want = " and ".join(f"{k} >= {v:g}" for k, v in floors.items()).replace("auc", "AUC")
        what = f"{name}: a deployed compressed model with {want}, AUC at most {MAX_DROP:g} below its unpruned fp32"
        if not any(r["dataset"] == name for r in measured):
            out.append(_not_run(what, name))
            continue
        hits = [r for r in measured if r["dataset"] == name and r.get("deployed") and kept(r)
                and all(r[k] >= v - EPS for k, v in floors.items())]
        shown = ", ".join(f"{_label(r)}: AUC {r['auc']:.3f}, accuracy {r['accuracy']:.3f}" for r in hits) or "none"
        out.append((what, bool(hits), shown, [] if hits else [
            f"{name}: no deployed compressed model reaches {want} with AUC at most {MAX_DROP:g} below its unpruned fp32"]))
    return out


def failures(rows: list[dict]) -> list[str]:
    """The targets missed, one line each; empty: every target held."""
    return [line for *_, lines in targets(rows) for line in lines]


def report(rows: list[dict]) -> int:
    """Print a line per target and a FAILED line per miss; the exit code."""
    for what, met, shown, _ in targets(rows):
        print(f"target: {what}: {'met' if met else 'NOT met'} ({shown})")
    failed = failures(rows)
    for f in failed:
        print(f"FAILED: {f}")
    return 1 if failed else 0


def _selected(name: str, model: str, wanted: set[str] | None) -> bool:
    return wanted is None or name in wanted or f"{name}:{model}" in wanted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated dataset or dataset:model names; other row groups are kept")
    ap.add_argument("--work", default="/tmp/edgeclf-bench", help="scratch folder for runs and bundles")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--render", action="store_true", help="only rewrite compression.md from compression.json (and check its targets)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        doc = json.loads((out / "compression.json").read_text())
        (out / "compression.md").write_text(markdown(doc["rows"], doc["machine"]))
        return report(doc["rows"])
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
    return report([r for c in CONFIGS for r in done.get((c[0], c[2], c[3]), [])])


if __name__ == "__main__":
    sys.exit(main())
