"""Run a recipe end to end as a user would, through the CLI, and summarise its figures for benchmarks/recipes.md.

    python benchmarks/recipes.py chest-xray --data ../shared/data/medmnist/pneumoniamnist.npz --out /tmp/recipes/chest-xray
    python benchmarks/recipes.py lung-pocus --data ../shared/data/pocus --out /tmp/recipes/lung-pocus
    python benchmarks/recipes.py chest-xray --data ... --out /tmp/recipes/chest-xray-rerun --no-export   # reproduce check
    python benchmarks/recipes.py breast-us --data ... --out /tmp/recipes/busi --run /tmp/cand/busi-lr1e-3   # a run trained before

Steps: `edgeclf train --recipe R` (the recipe's thread count: the computation depends on it), then for each training folder (one, or one per fold)
`edgeclf export` with the recipe's [export] settings (also passed as flags, so the figures do not depend on
export reading run.json's record, which it now does), `edgeclf evaluate` of the fp32 training folder and of the deployed bundle on the held-out split (read
once per configuration), and ONNX Runtime latency (batch 1, 1 thread, median of 200 after 20 warm-up runs)
of fp32 and of the deployed model. Writes OUT/summary.json; prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_FLAGS = {"precision": "--precision", "max_drop": "--max-drop", "min_agreement": "--min-agreement", "calibration": "--calibration",
          "calibration_n": "--calibration-n", "qat_epochs": "--qat-epochs", "device": "--device"}


def cli(*args: str) -> tuple[dict[str, Any], float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t = time.time()
    res = subprocess.run([sys.executable, "-m", "edgeclf", *args, "--json"], capture_output=True, text=True, cwd=REPO, env=env)
    if res.returncode != 0:
        raise SystemExit(f"edgeclf {' '.join(args)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout), round(time.time() - t, 1)


def latency(bundle: Path, precision: str | None, data_x: Any) -> float:
    import numpy as np

    from edgeclf.runtime.backends import OrtBackend
    from edgeclf.runtime.bundle import load_bundle

    b = load_bundle(bundle)
    path, _ = b.select(precision, "ort-cpu")
    m = b.manifest
    x = data_x[:1]
    with OrtBackend(str(path), (m.preprocess.channels, *m.preprocess.size), m.num_outputs, threads=1) as be:
        for _ in range(20):
            be.infer(x)
        ts = []
        for _ in range(200):
            t = time.perf_counter()
            be.infer(x)
            ts.append(time.perf_counter() - t)
    return round(float(np.median(ts)) * 1e3, 3)


def summarise_eval(rep: dict[str, Any]) -> dict[str, Any]:
    m = rep["metrics"]
    out = {"n": m["n"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "auc": m["auc"]["macro"],
           "auc_ci95": m["auc"]["macro_ci95"]}
    if rep.get("clips"):
        c = rep["clips"]
        out["clips"] = {"n": c["clips"], "mean": {k: c["clip_mean"].get(k) for k in ("accuracy", "balanced_accuracy")},
                        "per_clip": {p["clip"]: p["mean"] for p in c["per_clip"]}}
    return out


def export_and_compare(run: Path, bundle: Path, export_cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    flags = [x for k, v in export_cfg.items() if k in _FLAGS for x in (_FLAGS[k], str(v))]
    manifest, t_export = cli("export", "--model", str(run), "--out", str(bundle), "--overwrite", *flags)
    run_rec = json.loads((run / "run.json").read_text())
    fp32, _ = cli("evaluate", "--model", str(run), "--split", "test", "--threads", "1")
    # A bundle keeps no workstation paths: the data is named again (the recorded spec, options included).
    deployed, _ = cli("evaluate", "--model", str(bundle), "--data", run_rec["data"]["spec"], "--split", "test", "--threads", "1")
    deploy = manifest.get("deploy") or {}
    from edgeclf.data import load_dataset
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.preprocess import Preprocessor

    ds = load_dataset(run_rec["data"]["spec"], classes=run_rec["data"].get("classes"), seed=run_rec["config"]["seed"],
                      frames_per_clip=run_rec["config"]["frames_per_clip"])
    x = Preprocessor(load_bundle(bundle).manifest.preprocess).batch(ds.splits["test"].images[:4])
    out = {"export_seconds": t_export, "deploy": {"precision": deploy.get("precision"), "reason": deploy.get("reason")},
           "fp32": summarise_eval(fp32), "deployed": summarise_eval(deployed),
           "latency_ms": {"fp32": latency(bundle, "fp32", x)}}
    if deploy.get("precision") not in (None, "fp32"):
        out["latency_ms"]["deployed"] = latency(bundle, None, x)
    if "clips" in out["fp32"]:
        a, b = out["fp32"]["clips"]["per_clip"], out["deployed"]["clips"]["per_clip"]
        out["clip_agreement"] = float(np.mean([a[k] == b.get(k) for k in a]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-export", action="store_true", help="train (and for CV pool) only: a reproduce check")
    ap.add_argument("--run", default=None, help="an existing training folder of this recipe (e.g. the candidate chosen on "
                    "validation): export and evaluate it instead of training again")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `edgeclf train` flags (overrides)")
    a = ap.parse_args()
    out = Path(a.out)
    if a.run:
        run = Path(a.run).resolve()
        rec = json.loads((run / ("cv.json" if (run / "cv.json").exists() else "run.json")).read_text())
        if (rec.get("recipe") or {}).get("name") != a.recipe:
            raise SystemExit(f"{run} was not trained with recipe {a.recipe!r} (its record says {(rec.get('recipe') or {}).get('name')!r})")
        t_train, command = rec.get("seconds"), f"(trained before: {run}, config {json.dumps(rec['config'])})"
    else:
        run = out / "run"
        rec, t_train = cli("train", "--recipe", a.recipe, "--data", a.data, "--out", str(run), *a.extra)
        command = f"edgeclf train --recipe {a.recipe} --data {a.data} --out {run} {' '.join(a.extra)}"
    summary: dict[str, Any] = {"recipe": a.recipe, "data": a.data, "train_seconds": t_train, "seed": rec["config"]["seed"],
                               "command": command}
    export_cfg = (rec.get("recipe") or {}).get("export") or {}
    if "pooled_out_of_fold" in rec:
        pooled = rec["pooled_out_of_fold"]
        if pooled is None:
            raise SystemExit(f"{run} was trained with --no-test: its held-out folds were not read; rerun the chosen setting "
                             "without --no-test (same seed, same host and threads: the same folds and weights)")
        summary["cv"] = {"folds": [{k: f[k] for k in ("fold", "test_clips", "test_sources", "test", "val", "val_without_tta") if k in f}
                                   for f in rec["folds"]],
                         **{k: rec[k] for k in ("inner_validation_mean", "inner_validation_mean_without_tta") if k in rec},
                         **{k: pooled.get(k) for k in ("clips", "frames", "frame_auc_macro")},
                         **{k: {m: pooled[k].get(m) for m in ("accuracy", "accuracy_ci95", "balanced_accuracy", "balanced_accuracy_ci95",
                                                            "per_class")} for k in ("clip_mean", "clip_vote", "frame") if k in pooled}}
        if not a.no_export:
            per_fold = [export_and_compare(Path(f["out"]), out / f"bundle-{f['fold']}", export_cfg) for f in rec["folds"]]
            agree = [v for pf in per_fold for v in [pf.get("clip_agreement")] if v is not None]
            n_clips = [pf["fp32"]["clips"]["n"] for pf in per_fold]
            summary["deployed"] = {"per_fold": per_fold,
                                   "clip_agreement_pooled": sum(x * n for x, n in zip(agree, n_clips)) / max(1, sum(n_clips))}
    else:
        if "test" in rec["metrics"]:
            test = rec["metrics"]["test"]
        else:  # trained with --no-test (chosen on validation): the test split is read now, once
            test = cli("evaluate", "--model", str(run), "--split", "test", "--threads", "1")[0]["metrics"]
        summary["test"] = {k: test.get(k) for k in ("n", "accuracy", "balanced_accuracy")}
        summary["test"]["auc"] = test["auc"]["macro"]
        summary["test"]["auc_ci95"] = test["auc"]["macro_ci95"]
        summary["test"]["per_class"] = test["per_class"]
        summary["best_epoch"] = rec["best_epoch"]
        # What a choice between configurations may look at (the same figures cross-validation keeps per fold).
        from edgeclf.train import _val_figures

        for key in ("val", "val_without_tta"):
            if key in rec["metrics"]:
                summary[key] = _val_figures(rec["metrics"][key])
        if not a.no_export:
            summary["deployed"] = export_and_compare(run, out / "bundle", export_cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
