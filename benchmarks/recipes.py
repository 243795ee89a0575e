"""Run a recipe end to end as a user would, through the CLI, and summarise its figures for benchmarks/recipes.md.

    python benchmarks/recipes.py chest-xray --data ../shared/data/medmnist/pneumoniamnist.npz --out /tmp/recipes/chest-xray
    python benchmarks/recipes.py lung-pocus --data ../shared/data/pocus --out /tmp/recipes/lung-pocus
    python benchmarks/recipes.py chest-xray --data ... --out /tmp/recipes/chest-xray-rerun --no-export   # reproduce check
    python benchmarks/recipes.py breast-us --data ... --out /tmp/recipes/busi --run /tmp/cand/busi-lr1e-3   # a run trained before

Steps: `edgeclf train --recipe R` (the recipe's thread count: the computation depends on it), then for each training folder (one, or one per fold)
`edgeclf export` with the recipe's [export] settings (also passed as flags, so the figures do not depend on
export reading run.json's record, which it now does), `edgeclf evaluate` of the fp32 training folder and of the deployed bundle on the held-out split (read
once per configuration), and ONNX Runtime latency (batch 1, 1 thread, median of 200 after 20 warm-up runs; fp32 and the deployed model interleaved in 5 rounds of 40)
of fp32 and of the deployed model. Writes OUT/summary.json; prints it.

Relative --data, --out and --run paths are taken from the folder you run this in (made absolute, and every `edgeclf`
step runs there too). Trained with `--extra ... --no-test`, the test split stays unread: the summary says so
(`test_unread`), keeps the validation figures, and the export is gated and timed without test figures. With --run
the figures come from that run's recorded data: --data may be left out, and the summary records the run's spec.

Target: the recipe's [target] table (the recipes issue's acceptance, for the variant the data selects; see
edgeclf/recipe_files/*.toml) is judged on the summary: the reported figure against its minimum (test split, or the
pooled out-of-fold clip figure of a cross-validation run), the deployed bundle's figure within `deployed_within` of
fp32's, the deployed bundles' clip agreement with fp32 at least `min_clip_agreement`, and a cross-validation run's folds
and grouping (cv.json) those the target's `folds` / `group` name (another protocol is NOT met). A line per target, met / NOT
met with the figure (a figure the run lacks is NOT met); parts left unread on purpose (--no-test, --no-export) are
"not judged"; a variant without a target prints "no target". Recorded in summary.json ("target"). Exit 1 when a
target is NOT met.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
_FLAGS = {"precision": "--precision", "max_drop": "--max-drop", "min_agreement": "--min-agreement", "calibration": "--calibration",
          "calibration_n": "--calibration-n", "qat_epochs": "--qat-epochs", "device": "--device"}


def cli(*args: str) -> tuple[dict[str, Any], float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t = time.time()
    # In the user's folder, as typed: a relative path in --extra (or a data option) means what it meant to the user.
    res = subprocess.run([sys.executable, "-m", "edgeclf", *args, "--json"], capture_output=True, text=True, cwd=os.getcwd(), env=env)
    if res.returncode != 0:
        raise SystemExit(f"edgeclf {' '.join(args)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout), round(time.time() - t, 1)


def absolute_spec(spec: str) -> str:
    """A data spec with its path made absolute from the current folder (`synthetic:...` as it is; options kept)."""
    if spec.startswith("synthetic:"):
        return spec
    base, sep, query = spec.partition("?")
    return os.path.abspath(os.path.expanduser(base)) + sep + query


def _data_path(spec: str) -> str:
    """The data a spec names, without its options (a recipe adds its own to the recorded spec)."""
    return spec if spec.startswith("synthetic:") else str(Path(spec.partition("?")[0]).expanduser().resolve())


def latency(bundle: Path, precisions: list[str | None], data_x: Any, *, rounds: int = 5, runs: int = 40) -> list[float]:
    """Median ms per call (batch 1, 1 thread) of each precision's model in `bundle` (None: the deployed one). With
    several, their runs interleave (`rounds` rounds of `runs` calls each, after 20 warm-up calls each), so a shared
    machine's load falls on all of them alike and the comparison is side by side."""
    import contextlib

    import numpy as np

    from edgeclf.runtime.backends import OrtBackend
    from edgeclf.runtime.bundle import load_bundle

    b = load_bundle(bundle)
    m = b.manifest
    x = data_x[:1]
    with contextlib.ExitStack() as stack:
        backends = [stack.enter_context(OrtBackend(str(b.select(p, "ort-cpu")[0]), (m.preprocess.channels, *m.preprocess.size),
                                                   m.num_outputs, threads=1)) for p in precisions]
        for be in backends:
            for _ in range(20):
                be.infer(x)
        ts: list[list[float]] = [[] for _ in backends]
        for _ in range(rounds):
            for be, t_be in zip(backends, ts):
                for _ in range(runs):
                    t = time.perf_counter()
                    be.infer(x)
                    t_be.append(time.perf_counter() - t)
    return [round(float(np.median(t_be)) * 1e3, 3) for t_be in ts]


def summarise_eval(rep: dict[str, Any]) -> dict[str, Any]:
    m = rep["metrics"]
    out = {"n": m["n"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "auc": m["auc"]["macro"],
           "auc_ci95": m["auc"]["macro_ci95"]}
    if rep.get("clips"):
        c = rep["clips"]
        out["clips"] = {"n": c["clips"], "mean": {k: c["clip_mean"].get(k) for k in ("accuracy", "balanced_accuracy")},
                        "per_clip": {p["clip"]: p["mean"] for p in c["per_clip"]}}
    return out


def export_and_compare(run: Path, bundle: Path, export_cfg: dict[str, Any], read_test: bool = True) -> dict[str, Any]:
    """Export `run`, evaluate fp32 and deployed on the test split and time both; with read_test=False the test split
    is not read: no figures, and the latency input comes from the validation split."""
    import numpy as np

    from edgeclf.recipes import EXPORT_PRECISIONS

    # The recipe's settings a precision never uses stay out (export refuses them typed; fp32 keeps its gate settings
    # in the recipe for `--precision auto`).
    precision = str(export_cfg.get("precision", "fp32"))
    flags = [x for k, v in export_cfg.items() if k in _FLAGS and precision in EXPORT_PRECISIONS.get(k, (precision,))
             for x in (_FLAGS[k], str(v))]
    manifest, t_export = cli("export", "--model", str(run), "--out", str(bundle), "--overwrite", *flags)
    run_rec = json.loads((run / "run.json").read_text())
    if read_test:
        fp32, _ = cli("evaluate", "--model", str(run), "--split", "test", "--threads", "1")
        # A bundle keeps no workstation paths: the data is named again (the recorded spec, options included).
        deployed, _ = cli("evaluate", "--model", str(bundle), "--data", run_rec["data"]["spec"], "--split", "test", "--threads", "1")
    deploy = manifest.get("deploy") or {}
    from edgeclf.data import load_dataset
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.preprocess import Preprocessor

    ds = load_dataset(run_rec["data"]["spec"], classes=run_rec["data"].get("classes"), seed=run_rec["config"]["seed"],
                      frames_per_clip=run_rec["config"]["frames_per_clip"])
    x = Preprocessor(load_bundle(bundle).manifest.preprocess).batch(ds.splits["test" if read_test else "val"].images[:4])
    out: dict[str, Any] = {"export_seconds": t_export, "deploy": {"precision": deploy.get("precision"), "reason": deploy.get("reason")}}
    if read_test:
        out.update(fp32=summarise_eval(fp32), deployed=summarise_eval(deployed))
    else:
        out["test_unread"] = "trained with --no-test: no test figures; latency timed on validation images"
    both = deploy.get("precision") not in (None, "fp32")
    times = latency(bundle, ["fp32", None] if both else ["fp32"], x)
    out["latency_ms"] = dict(zip(["fp32", "deployed"], times))
    if "clips" in out.get("fp32", {}):
        a, b = out["fp32"]["clips"]["per_clip"], out["deployed"]["clips"]["per_clip"]
        out["clip_agreement"] = float(np.mean([a[k] == b.get(k) for k in a]))
    return out


EPS = 1e-9  # figures are k/n in floats: exactly the minimum meets it


def check_target(summary: dict[str, Any], target: dict[str, Any], aggregate: str = "mean") -> list[tuple[str, Optional[bool]]]:
    """(line, verdict) per part of a recipe's [target]: True met, False NOT met (a figure the run lacks included),
    None not judged (the test split or the export left out on purpose; or no target at all)."""
    if not target:
        return [("no target", None)]
    cv = "cv" in summary
    unread = not cv and summary.get("test") is None  # --no-test
    exported = summary.get("deployed")
    out: list[tuple[str, Optional[bool]]] = []

    def judged(what: str, fig: Any, ok: Any, shown: str) -> tuple[str, Optional[bool]]:
        if unread:
            return f"{what}: not judged (the test split was left unread: --no-test)", None
        if fig is None:
            return f"{what}: NOT met (this run has no such figure)", False
        return f"{what}: {'met' if ok else 'NOT met'} ({shown})", bool(ok)

    if "folds" in target:
        # The protocol the figure must come from (e.g. the "5 source-grouped folds"): the run's own folds and
        # grouping, from its cv.json. A run cross-validated otherwise is not met, whatever its figure.
        k, group = int(target["folds"]), target.get("group")
        what = f"cross-validation with {k} folds" + (f" grouped by {group}" if group else "")
        if not cv:
            out.append((f"{what}: NOT met (not a cross-validation run)", False))
        else:
            n, by = len(summary["cv"].get("folds") or []), summary["cv"].get("grouped_by")
            ok = n == k and (group is None or by == group)
            shown = f"{n} folds grouped by {by}" if by else f"{n} folds, grouping not recorded"
            out.append((f"{what}: {'met' if ok else 'NOT met'} ({shown})", ok))
    metric, floor = target["metric"], float(target["minimum"])
    if metric.startswith("clip_"):
        name = metric[len("clip_"):]
        pooled = (summary.get("cv") or {}).get(f"clip_{aggregate}") or {}
        fig, ci = pooled.get(name), pooled.get(f"{name}_ci95")
        what = f"pooled out-of-fold clip {name.replace('_', ' ')} ({aggregate}) >= {floor:g}"
    else:
        test = summary.get("test") or {}
        fig, ci = (None, None) if cv else (test.get(metric), test.get(f"{metric}_ci95"))
        what = f"test {metric.replace('_', ' ')} >= {floor:g}"
    shown = "" if fig is None else f"{fig:.3f}" + (f", 95% CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else "")
    out.append(judged(what, fig, fig is not None and fig >= floor - EPS, shown))
    if "deployed_within" in target:
        tol = float(target["deployed_within"])
        what = f"deployed bundle's test {metric.replace('_', ' ')} within {tol:g} of fp32's"
        if exported is None:
            out.append((f"{what}: not judged (--no-export)", None))
        else:
            fp = (exported.get("fp32") or {}).get(metric)
            dep = (exported.get("deployed") or {}).get(metric)
            both = None if fp is None or dep is None else (fp, dep)
            out.append(judged(what, both, both is not None and abs(both[1] - both[0]) <= tol + EPS,
                              "" if both is None else f"{both[1]:.3f} against {both[0]:.3f}"))
    if "min_clip_agreement" in target:
        floor = float(target["min_clip_agreement"])
        what = f"deployed bundles agree with fp32 on >= {floor:g} of clips"
        if exported is None:
            out.append((f"{what}: not judged (--no-export)", None))
        else:
            a = exported.get("clip_agreement_pooled" if cv else "clip_agreement")
            out.append(judged(what, a, a is not None and a >= floor - EPS, "" if a is None else f"{a:.3f}"))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--data", default=None, help="the data spec to train on (not with --run: the run's recorded data is used)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-export", action="store_true", help="train (and for CV pool) only: a reproduce check")
    ap.add_argument("--run", default=None, help="an existing training folder of this recipe (e.g. the candidate chosen on "
                    "validation): export and evaluate it instead of training again")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `edgeclf train` flags (overrides)")
    a = ap.parse_args(argv)
    # Paths as the user typed them, from the user's folder (not the repository's).
    out = Path(os.path.abspath(os.path.expanduser(a.out)))
    if a.run:
        if a.extra:
            raise SystemExit(f"--extra ({' '.join(a.extra)}) sets training flags; with --run nothing is trained: leave it out")
        run = Path(os.path.abspath(os.path.expanduser(a.run)))
        rec_file = run / ("cv.json" if (run / "cv.json").exists() else "run.json")
        if not rec_file.is_file():
            raise SystemExit(f"--run {run} is not a training folder (no run.json or cv.json); give the --out of `edgeclf train`")
        rec = json.loads(rec_file.read_text())
        if (rec.get("recipe") or {}).get("name") != a.recipe:
            raise SystemExit(f"{run} was not trained with recipe {a.recipe!r} (its record says {(rec.get('recipe') or {}).get('name')!r})")
        # The figures come from the run's own recorded data: that is what the summary names.
        data = (rec.get("data") or {}).get("spec")
        if a.data is not None and _data_path(a.data) != _data_path(str(data)):
            raise SystemExit(f"--data {a.data} is not the data {run} was trained on ({data}), which its figures come from; "
                             "leave --data out with --run")
        t_train, command = rec.get("seconds"), f"(trained before: {run}, config {json.dumps(rec['config'])})"
    else:
        if a.data is None:
            raise SystemExit("--data is required to train (or give --run RUN, a folder trained before)")
        data = absolute_spec(a.data)
        run = out / "run"
        rec, t_train = cli("train", "--recipe", a.recipe, "--data", data, "--out", str(run), *a.extra)
        command = f"edgeclf train --recipe {a.recipe} --data {data} --out {run} {' '.join(a.extra)}"
    summary: dict[str, Any] = {"recipe": a.recipe, "data": data, "train_seconds": t_train, "seed": rec["config"]["seed"],
                               "command": command}
    export_cfg = (rec.get("recipe") or {}).get("export") or {}
    if "pooled_out_of_fold" in rec:
        pooled = rec["pooled_out_of_fold"]
        if pooled is None:
            raise SystemExit(f"{run} was trained with --no-test: its held-out folds were not read; rerun the chosen setting "
                             "without --no-test (same seed, same host and threads: the same folds and weights)")
        summary["cv"] = {"folds": [{k: f[k] for k in ("fold", "test_clips", "test_sources", "test", "val", "val_without_tta") if k in f}
                                   for f in rec["folds"]],
                         # What the folds kept together (clip, source, site): a [target]'s group is judged by it.
                         "grouped_by": (rec.get("data") or {}).get("grouped_by"),
                         **{k: rec[k] for k in ("inner_validation_mean", "inner_validation_mean_without_tta") if k in rec},
                         **{k: pooled.get(k) for k in ("clips", "frames", "frame_auc_macro")},
                         **{k: {m: pooled[k].get(m) for m in ("accuracy", "accuracy_ci95", "balanced_accuracy", "balanced_accuracy_ci95",
                                                            "per_class")} for k in ("clip_mean", "clip_vote", "frame") if k in pooled}}
        if not a.no_export:
            per_fold = [export_and_compare(Path(f["out"]), out / f"bundle-{f['fold']}", export_cfg) for f in rec["folds"]]
            summary["deployed"] = {"per_fold": per_fold}
            # Clip figures only where the folds hold clips (an image data set has none).
            with_clips = [(pf["clip_agreement"], pf["fp32"]["clips"]["n"]) for pf in per_fold if "clip_agreement" in pf]
            if with_clips:
                summary["deployed"]["clip_agreement_pooled"] = (sum(x * n for x, n in with_clips) /
                                                                max(1, sum(n for _, n in with_clips)))
    else:
        # Trained here with --no-test (chosen on validation): the test split stays unread, as for cross-validation.
        # A run trained before (--run, the chosen candidate) has its test split read now, once.
        read_test = "test" in rec["metrics"] or bool(a.run)
        if "test" in rec["metrics"]:
            test = rec["metrics"]["test"]
        elif read_test:
            test = cli("evaluate", "--model", str(run), "--split", "test", "--threads", "1")[0]["metrics"]
        if read_test:
            summary["test"] = {k: test.get(k) for k in ("n", "accuracy", "balanced_accuracy")}
            summary["test"]["auc"] = test["auc"]["macro"]
            summary["test"]["auc_ci95"] = test["auc"]["macro_ci95"]
            summary["test"]["per_class"] = test["per_class"]
        else:
            summary["test"] = None
            summary["test_unread"] = (f"trained with --no-test: the test split was not read (nor by the export step); to read it "
                                      f"once for the chosen setting: python benchmarks/recipes.py {a.recipe} --out DIR --run {run}")
        summary["best_epoch"] = rec["best_epoch"]
        # What a choice between configurations may look at (the same figures cross-validation keeps per fold).
        from edgeclf.train import _val_figures

        for key in ("val", "val_without_tta"):
            if key in rec["metrics"]:
                summary[key] = _val_figures(rec["metrics"][key])
        if not a.no_export:
            summary["deployed"] = export_and_compare(run, out / "bundle", export_cfg, read_test=read_test)
    # The target of the recipe as it is now (the acceptance), for the variant the run's data selects.
    from edgeclf.recipes import load_recipe, recipe_target

    target = recipe_target(load_recipe(a.recipe), str(data))
    aggregate = ((rec.get("recipe") or {}).get("evaluate") or {}).get("aggregate", "mean")
    verdicts = check_target(summary, target, aggregate)
    summary["target"] = {"table": target, "verdicts": [{"line": line, "met": met} for line, met in verdicts]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    for line, _ in verdicts:
        print(f"target: {line}")
    return 1 if any(met is False for _, met in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
