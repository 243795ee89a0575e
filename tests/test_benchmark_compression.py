"""benchmarks/compression.py fails (exit 1, one FAILED line each) where the compression issue's acceptance is missed:
each INT8 variant within the gate's limits of its own fp32 parent on the test split (AUC drop <= 0.01, decision
agreement >= 0.98 on validation and test), on BUSI and brain MRI a compressed model at least 3x faster than its
architecture unpruned in fp32 with AUC at most 0.01 below it, on BreastMNIST a deployed compressed model with AUC >= 0.90
and accuracy >= 0.86. Synthetic rows, checked through `--render` (nothing is trained or timed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import load_benchmark


def _group(dataset: str, model: str = "resnet18", auc: float = 0.95, speedup: float = 3.2, int8_auc: float | None = None,
           test_agreement: float = 1.0, accuracy: float = 0.9, refused: bool = False) -> list[dict[str, Any]]:
    """The four rows of one (dataset, model): unpruned fp32 and INT8, pruned fp32 and INT8 (deployed)."""
    def row(pruned: bool, precision: str, **kw: Any) -> dict[str, Any]:
        base = {"dataset": dataset, "model": model, "size": 64, "pruned": pruned, "precision": precision,
                "deployed": precision == "int8", "n_test": 100, "accuracy": accuracy, "auc": auc, "auc_ci95": [auc - 0.02, auc],
                "worst_sensitivity": 0.8, "ece": 0.05, "size_mb": 1.0, "latency_ms": {"median": 1.0, "p90": 1.2}, "speedup": 1.0}
        return {**base, **kw}
    i8 = {"val_agreement": 0.99, "test_agreement": test_agreement, "gate": {}, "kept_float": []}
    rows = [row(False, "fp32"), row(False, "int8", auc=auc if int8_auc is None else int8_auc, speedup=1.8, **i8),
            row(True, "fp32", speedup=1.5)]
    if refused:
        rows.append({"dataset": dataset, "model": model, "size": 64, "pruned": True, "precision": "int8", "deployed": False,
                     "refused": "auc_macro: drop 0.030", "gate": {"drop": 0.03}, "val_agreement": 0.9})
    else:
        rows.append(row(True, "int8", speedup=speedup, **i8))
    return rows


def _check(tmp_path: Path, rows: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    (tmp_path / "compression.json").write_text(json.dumps({"machine": {"cpu": "x", "cores": 2, "onnxruntime": "1",
                                                                         "torch": "2"}, "rows": rows}))
    rc = load_benchmark("compression").main(["--render", "--out", str(tmp_path)])
    return rc, capsys.readouterr().out


def _all(**busi: Any) -> list[dict[str, Any]]:
    return (_group("breastmnist", "compact", auc=0.91, accuracy=0.88) + _group("busi", "compact", speedup=2.2)
            + _group("busi", **busi) + _group("brain_mri"))


def test_a_table_meeting_every_target_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _check(tmp_path, _all(), capsys)
    assert rc == 0 and "FAILED" not in out, out
    assert "busi: a compressed model >= 3x faster than its unpruned fp32, AUC at most 0.01 below it: met (3.20x" in out
    assert "Targets" in (tmp_path / "compression.md").read_text()


def test_an_int8_variant_disagreeing_with_its_parent_on_test_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The committed table's BUSI compact INT8: 0.989 on validation (the gate passed it), 0.978 (91 of 93) on test."""
    rc, out = _check(tmp_path, _all(test_agreement=91 / 93), capsys)
    assert rc == 1
    assert "FAILED: busi resnet18 64 px int8: decision agreement with its fp32 parent 0.978 on test, under 0.98" in out
    assert out.count("FAILED") == 2  # the unpruned and the pruned INT8 of that group


def test_an_int8_variant_losing_auc_on_test_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _check(tmp_path, _all(int8_auc=0.93), capsys)
    assert rc == 1
    assert "FAILED: busi resnet18 64 px int8: test AUC 0.930, 0.020 below its fp32 parent's 0.950 (limit 0.01)" in out


def test_no_compressed_model_3x_faster_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _check(tmp_path, _all(speedup=2.9), capsys)
    assert rc == 1
    assert ("FAILED: busi: no compressed model is >= 3x faster than its architecture unpruned in fp32 with AUC at most "
            "0.01 below it (fastest such: 2.90x") in out


def test_a_refused_int8_is_the_gate_working_not_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _all() + _group("brain_mri", "compact", refused=True)
    rc, out = _check(tmp_path, rows, capsys)
    assert rc == 0, out


def test_breastmnist_under_the_published_baseline_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _group("breastmnist", "compact", auc=0.89, accuracy=0.88) + _group("busi") + _group("brain_mri")
    rc, out = _check(tmp_path, rows, capsys)
    assert rc == 1
    assert "FAILED: breastmnist: no deployed compressed model reaches AUC >= 0.9 and accuracy >= 0.86" in out


def test_nothing_measured_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _check(tmp_path, [], capsys)
    assert rc == 1 and "FAILED: no row measured" in out


def test_compression_targets_not_run_are_not_a_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A table without its BUSI and brain MRI rows (their data absent: the benchmark skips them): their 3x targets were
    never judged, so they are not met (one FAILED line each, exit 1), never 'met'."""
    rc, out = _check(tmp_path, _group("breastmnist", "compact", auc=0.91, accuracy=0.88), capsys)
    assert rc == 1
    assert "met (not judged" not in out, out
    for name in ("busi", "brain_mri"):
        assert (f"target: {name}: a compressed model >= 3x faster than its unpruned fp32, AUC at most 0.01 below it: "
                "NOT met (not run)") in out, out
        assert f"FAILED: {name}: not run (no row of it in the table); run it, e.g. --only {name}" in out, out
    assert "breastmnist: a deployed compressed model" in out and "FAILED: breastmnist" not in out
    assert "**NOT met** (not run)" in (tmp_path / "compression.md").read_text()


def test_the_breastmnist_target_not_run_is_not_a_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _check(tmp_path, _group("busi") + _group("brain_mri"), capsys)
    assert rc == 1
    assert "FAILED: breastmnist: not run (no row of it in the table); run it, e.g. --only breastmnist" in out, out
