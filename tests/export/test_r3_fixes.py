"""Review r3's compression findings 1, 3, 4 and 5: imported ONNX metadata stays out of bundles, recorded validation
intervals equal a fresh `edgeclf evaluate`, an import says which class its operating point targets, and the INT8 ladder
tries up to half the layers."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edgeclf.export.bundle_writer import ExportConfig, export_bundle
from tests.conftest import TINY_DATA

onnx = pytest.importorskip("onnx")
LABELS = "malignant,normal_or_benign"
SECRET_PATH = "/home/drsmith/patients/MRN-00123_Jane_Doe/scans.csv"


def _classifier(path: Path, outputs: int = 2, side: int = 28, *, leak: bool = False) -> Path:
    """GlobalAveragePool -> Gemm, (N, 1, side, side) -> (N, outputs); leak: metadata and doc strings naming a patient path,
    as other exporters and training scripts write them (tf2onnx, torch.onnx verbose, a user's own set_model_props)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.linspace(-3.0, 2.5, outputs, dtype=np.float32).reshape(outputs, 1)
    b = np.linspace(0.4, -0.2, outputs, dtype=np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["scores"], transB=1)]
    graph = helper.make_graph(nodes, "user", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, side, side])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", outputs])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if leak:
        helper.set_model_props(model, {"training_data": SECRET_PATH})
        model.doc_string = f"trained on {SECRET_PATH}"
        model.graph.doc_string = f"graph from {SECRET_PATH}"
        model.graph.node[0].doc_string = f'File "{SECRET_PATH}", line 12'
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _npz(tmp_path: Path, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 40), ("val", 40), ("test", 16)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    p = tmp_path / "breastmnist.npz"
    np.savez(p, **arrays)
    return str(p)


def _folder(tmp_path: Path) -> str:
    """Two classes of gray PNGs in a folder (no known clinically positive class)."""
    import cv2

    rng = np.random.default_rng(1)
    root = tmp_path / "lesions"
    for k, name in enumerate(("malignant", "normal_or_benign")):
        (root / name).mkdir(parents=True)
        for i in range(30):
            cv2.imwrite(str(root / name / f"{i}.png"), rng.integers(40 * k, 200 + 40 * k, (28, 28), dtype=np.uint8).clip(0, 255)
                        .astype(np.uint8))
    return str(root)


# 1 -------------------------------------------------------------------------------------------------- privacy
def test_imported_onnx_metadata_and_doc_strings_do_not_reach_the_bundle(tmp_path: Path) -> None:
    """README: 'Engines and caches never live inside a bundle, and neither do workstation paths'; house rule: no patient
    identifiers or source paths in outputs. A user's ONNX file's metadata_props and doc strings are copied verbatim into
    model.onnx and every compressed variant."""
    src = _classifier(tmp_path / "user.onnx", leak=True)
    out = tmp_path / "b"
    export_bundle(ExportConfig(out=str(out), from_onnx=str(src), labels=LABELS, task="binary", size=28, channels=1,
                               data=_npz(tmp_path), precision="int8", max_drop=0.99,
                               min_agreement=0.0))
    leaks = [p.name for p in sorted(out.iterdir()) if b"MRN-00123" in p.read_bytes() or b"/home/drsmith" in p.read_bytes()]
    assert leaks == [], f"patient path carried into the bundle by: {leaks}"


# 3 ------------------------------------------------------------------------------------- recorded vs fresh figures
def test_bundle_validation_interval_matches_a_fresh_evaluate(tmp_path: Path) -> None:
    """`bundle info` prints metrics.val_onnx_fp32's AUC interval; `edgeclf evaluate --split val` of the same bundle gives
    another one for the same model and images (export bootstraps with n_boot=500 and seed 0, evaluate with 1000 and the
    model's seed). README: 'seeded with the model's recorded training seed ...: one model, one interval'."""
    from edgeclf.evaluate import evaluate

    data = _npz(tmp_path, seed=5)
    src = _classifier(tmp_path / "user.onnx")
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), labels=LABELS, task="binary", size=28,
                                   channels=1, data=data))
    fresh = evaluate(str(tmp_path / "b"), data=data, split="val")["metrics"]
    recorded = m["metrics"]["val_onnx_fp32"]
    assert recorded["auc"]["macro"] == pytest.approx(fresh["auc"]["macro"])
    assert recorded["auc"]["macro_ci95"] == pytest.approx(fresh["auc"]["macro_ci95"])


# 4 ------------------------------------------------------------------------- imported model's positive class
def test_import_says_which_class_its_operating_point_targets_when_it_falls_back(tmp_path: Path, caplog) -> None:
    """An imported binary model on data with no known clinically positive class: the target sensitivity is fitted on
    the SECOND class (here normal_or_benign) with no word on stderr, and `bundle info` does not show it either."""
    src = _classifier(tmp_path / "user.onnx")
    with caplog.at_level(logging.INFO):
        m = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), labels=LABELS, task="binary", size=28,
                                       channels=1, data=_folder(tmp_path)))
    assert m["postprocess"]["decision"]["positive"] == 1
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("normal_or_benign" in s and "positive" in s for s in said), said


# 5 ------------------------------------------------------------------------------------------------ INT8 ladder
def test_float_fallback_ladder_tries_up_to_half_the_layers(tmp_path: Path, monkeypatch) -> None:
    """README: 'the worst 1, 2, 4, ... layers (up to half) are kept in float'. With 6 quantizable layers half is 3, but
    the doubling stops at 2: a model that passes with its 3 worst layers in float is refused."""
    import edgeclf.export.quantize as q
    from edgeclf.export.compress import _float_fallback_ladder

    nodes = [f"n{i}" for i in range(6)]
    monkeypatch.setattr(q, "quantizable_nodes", lambda p: list(nodes))
    state: dict = {}

    def fake_quantize(src, dst, calib, *, flavour, method, nodes_to_exclude=()):
        state["float"] = set(nodes_to_exclude)
        Path(dst).write_bytes(b"x")
        return {"precision": "int8", "flavour": flavour}

    def fake_gate(path):
        quantized = [n for n in nodes if n not in state["float"]]
        harm = {"n0": 0.3, "n1": 0.2, "n2": 0.1}  # three harmful layers
        drop = sum(harm.get(n, 0.0) for n in quantized)
        ok = drop == 0.0
        return {"passed": ok, "failed_on": [] if ok else ["auc_macro"],
                "checks": [{"metric": "auc_macro", "drop": drop, "drop_ci95": [drop, drop], "passed": ok}]}

    monkeypatch.setattr(q, "quantize_int8", fake_quantize)
    res = _float_fallback_ladder(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", np.zeros((1, 1, 4, 4), np.float32),
                                 "cpu", "minmax", fake_gate)
    assert res["passed"], [r["kept_float"] for r in res["rungs"]]


def test_imported_onnx_cleaning_is_recorded_as_counts(tmp_path: Path) -> None:
    """What was removed from a user's ONNX file is recorded by count, never by content; a clean file records nothing."""
    from edgeclf.runtime.bundle import load_bundle

    data = _npz(tmp_path)
    common = dict(labels=LABELS, task="binary", size=28, channels=1, data=data)
    leaky = export_bundle(ExportConfig(out=str(tmp_path / "a"), from_onnx=str(_classifier(tmp_path / "l.onnx", leak=True)),
                                       **common))
    assert leaky["provenance"]["onnx_cleaned"] == {"metadata_props": 1, "doc_strings": 3}
    clean = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(_classifier(tmp_path / "c.onnx")), **common))
    assert "onnx_cleaned" not in clean["provenance"]
    for b in ("a", "b"):  # the bundles still verify and load
        load_bundle(tmp_path / b)


def test_recorded_validation_intervals_of_a_trained_model_match_a_fresh_evaluate(tmp_path: Path) -> None:
    """A model trained with seed 5: training's metrics.val and its bundle's val_onnx_fp32 give the intervals that
    `edgeclf evaluate --split val` gives for the training folder and for the bundle."""
    pytest.importorskip("torch")
    import json

    from edgeclf.evaluate import evaluate
    from edgeclf.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(data=TINY_DATA, out=str(run), model="compact", size=32, epochs=1, patience=1, seed=5, threads=1))
    recorded = json.loads((run / "run.json").read_text())["metrics"]["val"]
    fresh = evaluate(str(run), split="val")["metrics"]
    assert recorded["auc"]["n_boot"] == fresh["auc"]["n_boot"]
    assert recorded["auc"]["macro_ci95"] == pytest.approx(fresh["auc"]["macro_ci95"])
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(run)))
    fresh_b = evaluate(str(tmp_path / "b"), split="val")["metrics"]
    assert m["metrics"]["val_onnx_fp32"]["auc"]["macro_ci95"] == pytest.approx(fresh_b["auc"]["macro_ci95"])


def test_import_with_positive_named_or_known_does_not_warn(tmp_path: Path, caplog) -> None:
    """--positive names the class: nothing to say, and the operating point targets it."""
    src = _classifier(tmp_path / "user.onnx")
    with caplog.at_level(logging.INFO):
        m = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), labels=LABELS, task="binary", size=28,
                                       channels=1, data=_folder(tmp_path), positive="malignant"))
    assert m["postprocess"]["decision"]["positive"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "positive" in r.getMessage()]


@pytest.mark.parametrize("n, tried", [(1, [1]), (2, [1]), (6, [1, 2, 3]), (8, [1, 2, 4]), (10, [1, 2, 4, 5])])
def test_float_fallback_ladder_rungs(tmp_path: Path, monkeypatch, n: int, tried: list[int]) -> None:
    """The rungs keep the worst 1, 2, 4, ... layers in float, the last one half of them (never more)."""
    import edgeclf.export.quantize as q
    from edgeclf.export.compress import _float_fallback_ladder

    nodes = [f"n{i}" for i in range(n)]
    monkeypatch.setattr(q, "quantizable_nodes", lambda p: list(nodes))

    def fake_quantize(src, dst, calib, *, flavour, method, nodes_to_exclude=()):
        Path(dst).write_bytes(b"x")
        return {"precision": "int8", "flavour": flavour}

    def never(path):
        return {"passed": False, "failed_on": ["auc_macro"],
                "checks": [{"metric": "auc_macro", "drop": 1.0, "drop_ci95": [1.0, 1.0], "passed": False}]}

    monkeypatch.setattr(q, "quantize_int8", fake_quantize)
    res = _float_fallback_ladder(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", np.zeros((1, 1, 4, 4), np.float32),
                                 "cpu", "minmax", never)
    assert not res["passed"]
    assert [len(r["kept_float"]) for r in res["rungs"]] == tried


def test_bundle_info_and_the_export_summary_name_the_positive_class(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A binary bundle's operating point targets one class; neither printout said which."""
    from edgeclf.cli import _print_export, _print_info

    src = _classifier(tmp_path / "user.onnx")
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), labels=LABELS, task="binary", size=28,
                                   channels=1, data=_folder(tmp_path), positive="malignant"))
    capsys.readouterr()
    _print_info(m)
    info = capsys.readouterr().out
    assert "positive class malignant" in info, info
    _print_export(m)
    assert "positive class malignant" in capsys.readouterr().out
