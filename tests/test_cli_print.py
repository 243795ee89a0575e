"""The CLI's human-readable summaries show what the reports hold: candidates that could not be built, and the
copy-group interval of an image cross-validation."""
from __future__ import annotations

import pytest

from edgeclf import cli


def test_export_summary_names_a_candidate_that_could_not_be_built(capsys: pytest.CaptureFixture[str]) -> None:
    m = {"name": "b", "model": {"architecture": "compact"}, "task": "binary", "parity": None, "provenance": {"parity": "skipped"},
         "deploy": {"precision": "fp32", "reason": "int8-cpu could not be built", "max_drop": 0.01,
                    "candidates": [{"id": "int8-cpu", "built": False, "error": "onnxruntime could not quantize model.onnx (x)"}]}}
    cli._print_export(m)
    out = capsys.readouterr().out
    assert "NOT BUILT" in out and "int8-cpu could not be built: onnxruntime could not quantize model.onnx (x)" in out


def test_image_cross_validation_prints_the_copy_group_interval(capsys: pytest.CaptureFixture[str]) -> None:
    dec = {"accuracy": 0.8, "accuracy_ci95": [0.7, 0.9], "balanced_accuracy": 0.75, "balanced_accuracy_ci95": [0.65, 0.85],
           "clustered": {"unit": "copy group", "clusters": 40, "accuracy_ci95": [0.6, 0.95], "balanced_accuracy_ci95": [0.55, 0.9]}}
    r = {"pooled_out_of_fold": {"decisions": dec}, "data": {"grouped_by": "group"}, "seconds": 1,
         "folds": [{"fold": 0, "test_items": 10, "test": {"accuracy": 0.8, "balanced_accuracy": 0.75}}]}
    cli._print_cv(r)
    out = capsys.readouterr().out
    assert "bootstrap over the 40 copy groups instead: 0.550-0.900" in out
