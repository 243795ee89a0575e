"""Workstation review (h1): what an ensemble takes from its members, which split a --no-test run leaves unread, and what
evaluate says about figures over items the model was trained, early-stopped or calibrated on."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeclf.errors import ConfigError, EdgeclfError
from tests.conftest import TINY_DATA, run_cli

pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(out: Path, data: str = TINY_DATA, **kw: Any) -> str:
    from edgeclf.train import TrainConfig, train

    train(TrainConfig(data=data, out=str(out), model="compact", size=32, epochs=1, patience=1, threads=1, **kw))
    return str(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One-epoch runs on the tiny set, each with its own seed (a copy of one training is refused as a member)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("review")
    try:
        return {"plain": _train(tmp / "plain", seed=0), "plain2": _train(tmp / "plain2", seed=5),
                "blind1": _train(tmp / "blind1", seed=1, read_test=False),
                "blind2": _train(tmp / "blind2", seed=2, read_test=False),
                "accuracy": _train(tmp / "accuracy", seed=3, operating_point="accuracy"),
                "target": _train(tmp / "target", seed=4, target_sensitivity=0.5)}
    finally:
        torch.set_num_threads(n)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert isinstance(exc.value, EdgeclfError)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- 2: the ensemble's refit takes its operating point from the members: they must agree, whatever their order -----------

@pytest.mark.parametrize("other,setting,values", [("accuracy", "operating_point", ("'accuracy'", "'sensitivity'")),
                                                  ("target", "target_sensitivity", ("0.5", "0.9"))])
def test_ensemble_refuses_members_trained_for_another_operating_point_in_either_order(
        runs: dict[str, str], tmp_path: Path, other: str, setting: str, values: tuple[str, str]) -> None:
    from edgeclf.train import ensemble_runs

    for k, members in enumerate(([runs["plain"], runs[other]], [runs[other], runs["plain"]])):
        with pytest.raises(ConfigError) as exc:
            ensemble_runs(members, str(tmp_path / f"e{k}"))
        msg = _one_line(exc)
        assert setting in msg and all(v in msg for v in values), msg
        assert not (tmp_path / f"e{k}").exists()


def _image_tree(root: Path, per_class: int = 14) -> Path:
    for c, cls in enumerate(("benign", "malignant")):
        for i in range(per_class):
            img = np.random.default_rng(100 * c + i).integers(0, 256, (24, 24), dtype=np.uint8)
            img[:8] = 220 if c else 30  # learnable, every image's bytes distinct
            (root / cls).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / cls / f"case{i}.png"), img)
    return root


OPTIONS = "test=0.3&val=0.3"  # not the default shares: the folder read plain draws another split


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A binary image folder and runs on it: `malignant` positive (the default, the second class) and `benign`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("folder")
    data = _image_tree(tmp / "busi")
    try:
        _train(tmp / "mal", data=f"{data}?{OPTIONS}", seed=0)
        _train(tmp / "ben", data=f"{data}?{OPTIONS}", seed=0, lr=2e-3, positive="benign")  # the seed draws the split
    finally:
        torch.set_num_threads(n)
    return {"data": data, "mal": tmp / "mal", "ben": tmp / "ben"}


def test_ensemble_refuses_members_fitted_for_another_positive_class(folder_runs: dict[str, Path], tmp_path: Path) -> None:
    from edgeclf.train import ensemble_runs

    with pytest.raises(ConfigError) as exc:
        ensemble_runs([str(folder_runs["ben"]), str(folder_runs["mal"])], str(tmp_path / "e"))
    msg = _one_line(exc)
    assert "positive" in msg and "'benign'" in msg and "'malignant'" in msg and "--positive" in msg, msg


# -- 3: an ensemble of --no-test members leaves the test split unread unless asked -------------------------------------

def test_ensemble_reads_the_test_split_only_if_every_member_did(runs: dict[str, str], tmp_path: Path) -> None:
    from edgeclf.train import ensemble_runs

    for k, members in enumerate(([runs["blind1"], runs["blind2"]], [runs["plain"], runs["blind1"]])):
        rec = ensemble_runs(members, str(tmp_path / f"e{k}"))
        assert "test" not in rec["metrics"] and rec["config"]["read_test"] is False, members
        assert json.loads((tmp_path / f"e{k}" / "run.json").read_text())["config"]["read_test"] is False
    asked = ensemble_runs([runs["blind1"], runs["blind2"]], str(tmp_path / "asked"), read_test=True)  # asked for: read
    assert asked["metrics"]["test"]["n"] > 0 and asked["config"]["read_test"] is True
    both = ensemble_runs([runs["plain"], runs["plain2"]], str(tmp_path / "both"))  # every member read it: read
    assert both["metrics"]["test"]["n"] > 0 and both["config"]["read_test"] is True
    said_no = ensemble_runs([runs["plain"], runs["plain2"]], str(tmp_path / "no"), read_test=False)
    assert "test" not in said_no["metrics"] and said_no["config"]["read_test"] is False


def test_cli_ensemble_of_no_test_members_leaves_test_unread(runs: dict[str, str], tmp_path: Path) -> None:
    r = run_cli("ensemble", "--member", runs["blind1"], "--member", runs["blind2"], "--out", str(tmp_path / "ens"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert "test" not in doc["metrics"] and doc["config"]["read_test"] is False


# -- 6: evaluate says how many evaluated items the model was trained or early-stopped and calibrated on -----------------

@pytest.fixture(scope="module")
def plain_bundle(runs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "plain"
    export_bundle(ExportConfig(out=str(out), model=runs["plain"]))
    return out


@pytest.mark.parametrize("target", ["run", "bundle"])
def test_evaluate_all_on_the_training_data_counts_and_warns_about_trained_items(
        runs: dict[str, str], plain_bundle: Path, caplog: pytest.LogCaptureFixture, target: str) -> None:
    from edgeclf.evaluate import evaluate

    sizes = json.loads((Path(runs["plain"]) / "run.json").read_text())["data"]["sizes"]
    with caplog.at_level(logging.WARNING):
        rep = evaluate(runs["plain"] if target == "run" else str(plain_bundle), data=TINY_DATA, split="all", n_boot=0)
    assert rep["data"]["in_model_splits"] == sizes  # every item of the data, in the split it had in training
    said = [w for w in _warnings(caplog) if "optimistic" in w]
    assert len(said) == 1 and f"{sizes['train']} in its train split" in said[0] and f"{sizes['val']} in its val split" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        held = evaluate(runs["plain"] if target == "run" else str(plain_bundle), data=TINY_DATA, split="test", n_boot=0)
    assert held["data"]["in_model_splits"] == {"train": 0, "val": 0, "test": sizes["test"]}
    assert not [w for w in _warnings(caplog) if "optimistic" in w]


def test_evaluate_on_other_data_counts_nothing(runs: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    from edgeclf.evaluate import evaluate

    with caplog.at_level(logging.WARNING):
        rep = evaluate(runs["plain"], data="synthetic:ultrasound?n=60&size=64&seed=9", split="all", n_boot=0)
    assert rep["data"]["in_model_splits"] is None and not [w for w in _warnings(caplog) if "optimistic" in w]


@pytest.mark.parametrize("target", ["run", "bundle"])
def test_evaluate_all_on_a_plain_copy_of_the_training_folder_counts_by_the_training_split(
        folder_runs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, target: str) -> None:
    """--split all reads a folder as given (another split than training's): the model's own splits still count."""
    from edgeclf.evaluate import evaluate
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle

    run = folder_runs["mal"]
    model = str(run)
    if target == "bundle":
        export_bundle(ExportConfig(out=str(tmp_path / "b"), model=model))
        model = str(tmp_path / "b")
    copy = shutil.copytree(folder_runs["data"], tmp_path / "Dataset_BUSI_with_GT")
    with caplog.at_level(logging.WARNING):
        rep = evaluate(model, data=str(copy), split="all", n_boot=0)
    want = {s: len((run / "splits" / f"{s}.txt").read_text().split()) for s in ("train", "val", "test")}
    assert rep["data"]["n"] == sum(want.values()) and rep["data"]["in_model_splits"] == want
    assert any(f"{want['train']} in its train split" in w for w in _warnings(caplog))


def test_evaluate_on_the_test_split_of_a_no_test_run_says_training_never_read_it(runs: dict[str, str]) -> None:
    from edgeclf.evaluate import evaluate

    rep = evaluate(runs["blind1"], split="test", n_boot=0)
    assert rep["data"]["test_read_at_training"] is False
    assert "test_read_at_training" not in evaluate(runs["plain"], split="test", n_boot=0)["data"]


# -- 4: an imported model is calibrated on --data's val split, whatever --split; evaluate flags figures over it ---------

def _import(bundle: Path, out: Path, split: str) -> dict[str, Any]:
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle

    m = json.loads((bundle / "manifest.json").read_text())
    pre = m["preprocess"]
    return export_bundle(ExportConfig(out=str(out), from_onnx=str(bundle / "model.onnx"), labels=",".join(m["labels"]),
                                      task=m["task"], size=pre["size"][0], channels=pre["channels"],
                                      mean=",".join(map(str, pre["mean"])), std=",".join(map(str, pre["std"])),
                                      data=TINY_DATA, split=split))


def test_imported_model_is_calibrated_on_val_and_evaluate_flags_figures_over_it(
        plain_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edgeclf.evaluate import evaluate

    on_test = _import(plain_bundle, tmp_path / "t", "test")
    on_val = _import(plain_bundle, tmp_path / "v", "val")
    assert on_test["postprocess"] == on_val["postprocess"]  # --split is parity and reference samples only
    assert on_test["provenance"]["export_data"]["split"] == "test"
    assert on_test["provenance"]["export_data"]["decision_fitted_on"] == "val"
    with caplog.at_level(logging.WARNING):
        rep = evaluate(str(tmp_path / "t"), data=TINY_DATA, split="val", n_boot=0)
    said = [w for w in _warnings(caplog) if "optimistic" in w]
    assert rep["data"]["in_model_splits"] == {"val": rep["data"]["n"]}
    assert len(said) == 1 and "fitted on them at export" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        held = evaluate(str(tmp_path / "t"), data=TINY_DATA, split="test", n_boot=0)
    assert held["data"]["in_model_splits"] == {"val": 0} and not [w for w in _warnings(caplog) if "optimistic" in w]


def test_export_of_a_no_test_run_on_the_test_split_records_that_it_read_no_labels(runs: dict[str, str],
                                                                                   tmp_path: Path) -> None:
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle

    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=runs["blind1"], split="test"))
    assert "no labels, no figures" in m["provenance"]["export_data"]["test_split"]
    assert "test_training" not in m["metrics"]
    plain = export_bundle(ExportConfig(out=str(tmp_path / "p"), model=runs["blind1"]))
    assert "test_split" not in plain["provenance"]["export_data"]


def test_ensemble_refuses_members_from_recipes_with_other_export_settings(runs: dict[str, str], tmp_path: Path) -> None:
    """Export applies the recipe's [export] settings recorded by member 0: members of recipes that export differently
    would make the bundle's precision depend on the member order."""
    import shutil

    from edgeclf.train import ensemble_runs

    folders = []
    for k, (src, precision) in enumerate(((runs["plain"], "fp32"), (runs["plain2"], "auto"))):
        dst = tmp_path / f"m{k}"
        shutil.copytree(src, dst)
        doc = json.loads((dst / "run.json").read_text())
        doc["recipe"] = {"name": "r", "version": 1, "export": {"precision": precision}}
        (dst / "run.json").write_text(json.dumps(doc))
        folders.append(str(dst))
    for order in (folders, folders[::-1]):
        with pytest.raises(ConfigError) as exc:
            ensemble_runs(order, str(tmp_path / "e"))
        msg = _one_line(exc)
        assert "export" in msg and "'fp32'" in msg and "'auto'" in msg, msg
