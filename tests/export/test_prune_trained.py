"""`edgeclf prune`: a training folder in, a smaller recalibrated training folder out, with the truth about time."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_DATA, run_cli

pytest.importorskip("torch_pruning")


def test_prune_fine_tune_record_and_export(trained_dir: Path, tmp_path: Path) -> None:
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.export.prune import PruneConfig, prune_trained
    from edgeclf.recipes import recorded_export
    from edgeclf.train import load_trained

    # A folder trained from a recipe: the pruned folder carries the record, so export keeps applying it.
    parent = tmp_path / "parent"
    shutil.copytree(trained_dir, parent)
    run = json.loads((parent / "run.json").read_text())
    (parent / "run.json").write_text(json.dumps({**run, "recipe": {"name": "tiny", "version": 1, "export": {"max_drop": 0.02}}}))
    out = tmp_path / "pruned"
    rec = prune_trained(PruneConfig(model=str(parent), out=str(out), target_macs=0.5, steps=2, finetune_epochs=1))
    assert recorded_export(out) == ("tiny", {"max_drop": 0.02})
    pr = rec["pruning"]
    assert pr["macs"]["ratio"] <= 0.5 and pr["params"]["after"] < pr["params"]["before"]
    assert [s["step"] for s in pr["steps"]] == [1, 2] and pr["steps"][0]["macs_ratio"] > pr["steps"][1]["macs_ratio"]
    lat = pr["latency_ms"]
    assert lat["before"]["median"] > 0 and lat["after"]["median"] > 0 and lat["speedup"] == pytest.approx(
        lat["before"]["median"] / lat["after"]["median"])
    assert pr["pays"] == (lat["speedup"] >= 1.1) and ("saves MACs but not time" in pr["verdict"]) != pr["pays"]
    assert {"val", "test"} <= set(pr["metrics_before"]) and {"val", "test"} <= set(rec["metrics"])
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "pruned.json", "run.json", "splits"]
    tm = load_trained(out)  # rebuilt through pruned.json, recalibrated operating point
    assert tm.meta["pruned"] and json.loads((out / "run.json").read_text())["pruning"]["target_macs"] == 0.5
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(out)))
    assert m["parity"]["decision_agreement"] == 1.0
    # Provenance: the training entry is the parent's (its config with its own best epoch, seconds and packages),
    # the pruning entry how the deployed weights were pruned and fine-tuned.
    tr, prov = m["provenance"]["training"], m["provenance"]["pruning"]
    assert tr["config"]["epochs"] == run["config"]["epochs"] and tr["config"]["lr"] == run["config"]["lr"]
    assert {k: tr[k] for k in ("best_epoch", "seconds", "packages")} == {k: run[k] for k in ("best_epoch", "seconds", "packages")}
    assert {k: prov[k] for k in ("finetune_epochs", "lr", "distill", "round_to")} == {"finetune_epochs": 1, "lr": 1e-3, "distill": True,
                                                                                     "round_to": 8}
    assert [s["step"] for s in prov["steps"]] == [1, 2] and prov["best_epoch"] == rec["best_epoch"] == pr["steps"][-1]["best_epoch"]
    assert prov["seconds"] == rec["seconds"] and "torch-pruning" in prov["packages"]
    written = json.loads((out / "run.json").read_text())
    assert prov["metrics_before"] == written["pruning"]["metrics_before"] and m["metrics"]["test_training"] == written["metrics"]["test"]


def test_a_run_trained_without_test_is_pruned_and_exported_without_reading_test(tmp_path: Path) -> None:
    """`train --no-test` leaves the test split unread: pruning it measures validation only, and export carries no test figures."""
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.export.prune import PruneConfig, prune_trained
    from edgeclf.train import TrainConfig, train

    parent = tmp_path / "parent"
    train(TrainConfig(data=TINY_DATA, out=str(parent), model="compact", size=32, epochs=1, patience=1, seed=0, threads=1,
                      read_test=False))
    rec = prune_trained(PruneConfig(model=str(parent), out=str(tmp_path / "p"), target_macs=0.6, steps=1, finetune_epochs=1))
    assert rec["config"]["read_test"] is False
    assert set(rec["pruning"]["metrics_before"]) == {"val"} and set(rec["metrics"]) == {"val"}
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(tmp_path / "p")))
    assert "test_training" not in m["metrics"] and set(m["provenance"]["pruning"]["metrics_before"]) == {"val"}
    # Pruned again: still no test split, and the training facts stay the unpruned parent's.
    rec2 = prune_trained(PruneConfig(model=str(tmp_path / "p"), out=str(tmp_path / "p2"), target_macs=0.8, steps=1, finetune_epochs=1))
    assert set(rec2["metrics"]) == {"val"} and rec2["pruning"]["training"] == rec["pruning"]["training"]
    parent_run = json.loads((parent / "run.json").read_text())
    assert rec["pruning"]["training"] == {k: parent_run[k] for k in ("best_epoch", "seconds", "packages")}


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("lr", -1e-3, "--lr"), ("lr", 0.0, "--lr"), ("lr", math.nan, "--lr"), ("lr", math.inf, "--lr"),
    ("target_macs", math.nan, "--target-macs"), ("steps", 0, "--steps"), ("finetune_epochs", 1.5, "--finetune-epochs"),
    ("round_to", 0, "round_to"), ("min_speedup", math.nan, "min_speedup"),
])
def test_bad_numbers_are_refused_before_any_data_is_loaded(tmp_path: Path, field: str, value: float, flag: str) -> None:
    from edgeclf.errors import ConfigError
    from edgeclf.export.prune import PruneConfig

    with pytest.raises(ConfigError, match=f"^{flag} is ") as info:
        PruneConfig(model=str(tmp_path / "m"), out=str(tmp_path / "p"), **{field: value})
    assert "\n" not in str(info.value)


def test_prune_cli_reports_and_refuses_bad_targets(trained_dir: Path, tmp_path: Path) -> None:
    r = run_cli("prune", "--model", str(trained_dir), "--out", str(tmp_path / "p"), "--steps", "1", "--finetune-epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "of its MACs" in r.stdout and "ONNX Runtime" in r.stdout and "val AUC" in r.stdout
    r = run_cli("prune", "--model", str(trained_dir), "--out", str(tmp_path / "q"), "--target-macs", "1.5")
    assert r.returncode == 2 and "target-macs" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for lr in ("-1e-3", "nan"):  # refused before any data is loaded, never AdamW's traceback
        r = run_cli("prune", "--model", str(trained_dir), "--out", str(tmp_path / "q"), "--lr", lr)
        assert r.returncode == 2 and "--lr" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "q").exists()


def test_prune_never_overwrites_a_training_folder(trained_dir: Path, tmp_path: Path) -> None:
    from edgeclf.errors import ConfigError
    from edgeclf.export.prune import PruneConfig

    with pytest.raises(ConfigError, match="parent survives"):
        PruneConfig(model=str(trained_dir), out=str(trained_dir))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        PruneConfig(model=str(trained_dir), out=str(tmp_path / "busy"))


def test_a_pruning_that_buys_no_time_says_so(trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.export.prune as prune_mod

    # The measured latency is what decides: fake a machine where fewer MACs bought 2%.
    flat = {"before": {"median": 1.0, "p90": 1.1, "runs": 1}, "after": {"median": 0.98, "p90": 1.08, "runs": 1}, "speedup": 1.0 / 0.98}
    monkeypatch.setattr(prune_mod, "ort_latency", lambda *a, **k: flat)
    rec = prune_mod.prune_trained(prune_mod.PruneConfig(model=str(trained_dir), out=str(tmp_path / "p"), steps=1, finetune_epochs=1))
    pr = rec["pruning"]
    assert pr["pays"] is False and "saves MACs but not time" in pr["verdict"] and "keep the unpruned model" in pr["verdict"]


def test_an_ensemble_is_not_pruned(tmp_path: Path) -> None:
    from edgeclf.errors import ConfigError
    from edgeclf.export.prune import PruneConfig, prune_trained
    from edgeclf.train import TrainConfig, train

    train(TrainConfig(data="synthetic:ultrasound?n=90&size=48&seed=4", out=str(tmp_path / "ens"), size=32, epochs=1, patience=1,
                      threads=1, ensemble=2))
    with pytest.raises(ConfigError, match="is an ensemble of 2"):
        prune_trained(PruneConfig(model=str(tmp_path / "ens"), out=str(tmp_path / "p"), target_macs=0.5, steps=1, finetune_epochs=1))


def test_data_changed_since_training_is_refused_before_any_fine_tuning(trained_dir: Path, tmp_path: Path) -> None:
    """Export's data-hash check: re-drawn splits of changed data would fine-tune on validation images."""
    from edgeclf.errors import DataError
    from edgeclf.export.prune import PruneConfig, prune_trained

    src = tmp_path / "trained"
    shutil.copytree(trained_dir, src)
    run = json.loads((src / "run.json").read_text())
    run["data"]["hash"] = "0" * 64  # as if images were added to the data after training
    (src / "run.json").write_text(json.dumps(run))
    with pytest.raises(DataError, match=r"changed since the model was trained .*train and val splits .* restore the data as it "
                                        r"was or retrain") as info:
        prune_trained(PruneConfig(model=str(src), out=str(tmp_path / "p"), steps=1, finetune_epochs=1))
    assert "\n" not in str(info.value) and not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.*"))


def test_a_model_pruned_twice_records_the_whole_pruning(trained_dir: Path, tmp_path: Path) -> None:
    """Pruning a pruned folder keeps the first pass (previous) and the unpruned model (original) in the record and
    the bundle: the second pass's own figures alone say ~0.5 of the MACs of a model that keeps ~0.25 of the trained one's."""
    import torch

    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.export.prune import PruneConfig, count_macs, prune_trained
    from edgeclf.train import load_trained

    rec1 = prune_trained(PruneConfig(model=str(trained_dir), out=str(tmp_path / "p1"), target_macs=0.5, steps=1, finetune_epochs=1))
    rec2 = prune_trained(PruneConfig(model=str(tmp_path / "p1"), out=str(tmp_path / "p2"), target_macs=0.5, steps=1, finetune_epochs=1))
    macs, params = count_macs(load_trained(trained_dir).net, torch.zeros(1, 1, 32, 32))
    pr1, pr2 = rec1["pruning"], rec2["pruning"]
    # Once pruned: only additive keys; original is the parent itself.
    assert "previous" not in pr1 and pr1["macs"]["before"] == macs and pr1["macs"]["ratio_of_original"] == pr1["macs"]["ratio"]
    assert pr1["original"] == {"model": trained_dir.name, "macs": macs, "params": params, "metrics": pr1["metrics_before"]}
    # Twice: this pass against p1 (its figures are p1's), the whole pruning against the trained model.
    assert pr2["parent"] == "p1" and pr2["macs"]["before"] == pr1["macs"]["after"] and pr2["metrics_before"] == rec1["metrics"]
    assert pr2["previous"] == pr1 and pr2["original"] == pr1["original"]
    assert pr2["macs"]["ratio_of_original"] == pytest.approx(pr2["macs"]["after"] / macs) and pr2["macs"]["ratio_of_original"] < 0.3
    assert pr2["params"]["ratio_of_original"] == pytest.approx(pr2["params"]["after"] / params)
    assert "of the unpruned model's" in pr2["verdict"]
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(tmp_path / "p2")))
    prov = m["provenance"]["pruning"]
    assert prov["original"] == pr1["original"] and prov["previous"] == pr1 and prov["macs"] == pr2["macs"]
    assert prov["metrics_before"] == rec1["metrics"]



def test_the_unpruned_model_of_a_pruned_parent_comes_from_its_records_or_is_counted() -> None:
    """original: from the parent's record where it has one; from its macs.before / metrics_before where that pass pruned
    the unpruned model (a record from before original existed); MACs always counted on the unpruned registry model."""
    from types import SimpleNamespace

    import torch

    from edgeclf.export.prune import _original, count_macs
    from edgeclf.models import create_model

    x = torch.zeros(1, 1, 32, 32)
    macs, params = count_macs(create_model("compact", num_outputs=3, in_chans=1), x)
    tm = SimpleNamespace(meta={"architecture": "compact", "num_outputs": 3}, preprocess=SimpleNamespace(channels=1))
    figures = {"val": {"auc": 0.9}}
    chained = {"macs": {"before": macs // 2}, "parent": "p1", "metrics_before": {"val": {"auc": 0.8}},
               "original": {"model": "t", "macs": macs, "params": params, "metrics": figures}}
    assert _original(tm, x, chained) == {"model": "t", "macs": macs, "params": params, "metrics": figures}
    first = {"macs": {"before": macs}, "parent": "t", "metrics_before": figures}
    assert _original(tm, x, first) == {"model": "t", "macs": macs, "params": params, "metrics": figures}
    # pruned twice by an edgeclf without original: its macs.before is the once-pruned model's; name and figures unknown
    second = {"macs": {"before": macs // 2}, "parent": "p1", "metrics_before": {"val": {"auc": 0.8}}}
    assert _original(tm, x, second) == {"model": None, "macs": macs, "params": params, "metrics": None}
