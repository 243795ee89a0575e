"""ONNX export at opset 17 (what TensorRT 8.6 parses) and the torch-vs-ONNX Runtime parity check."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import EdgeclfError
from edgeclf.runtime.postprocess import DecisionRule, decide, probabilities

__all__ = ["export_onnx", "parity_report", "ExportError", "OPSET", "INPUT_NAME", "OUTPUT_NAME"]

log = logging.getLogger(__name__)
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(EdgeclfError):
    """Export produced a model that does not match its source."""


def export_onnx(model: Any, example: np.ndarray, path: Path, *, opset: int = OPSET) -> dict[str, Any]:
    """Write a single-file ONNX model with a dynamic batch axis; returns {opset, ir_version}.

    The dynamo exporter refuses opsets below 18 (it silently raises them), so the TorchScript
    exporter is used; parity is checked afterwards by `parity_report`.
    """
    import onnx
    import torch

    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(
                model,
                (torch.from_numpy(example[:1]),),
                str(path),
                opset_version=opset,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        except torch.onnx.errors.OnnxExporterError as exc:  # e.g. a --from-torch model with an operator opset 17 lacks
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ExportError(f"torch cannot export this model to ONNX opset {opset} ({first}); replace that operator, "
                              "or export the model to ONNX yourself and use --from-onnx") from None
    # One self-contained file: the TorchScript exporter never writes external data for models < 2 GB.
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    got = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if got != opset:
        raise ExportError(f"the exporter wrote opset {got}, not the requested {opset}; this torch version cannot export for TensorRT 8.6")
    return {"opset": got, "ir_version": int(proto.ir_version)}


def parity_report(
    ref_logits: np.ndarray, onnx_logits: np.ndarray, task: str, temperature: float, rule: DecisionRule
) -> dict[str, Any]:
    """Compare reference (torch) and ONNX Runtime outputs on the same real inputs."""
    a, b = ref_logits.astype(np.float64), onnx_logits.astype(np.float64)
    da, db = decide(probabilities(a, task, temperature), rule), decide(probabilities(b, task, temperature), rule)
    agree = (da == db).all(axis=1) if da.ndim == 2 else da == db
    pa, pb = probabilities(a, task, temperature), probabilities(b, task, temperature)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
    return {
        "n": int(len(a)),
        "decision_agreement": float(agree.mean()) if len(a) else 1.0,
        "max_abs_diff_logits": float(np.abs(a - b).max()) if len(a) else 0.0,
        "max_abs_diff_probs": float(np.abs(pa - pb).max()) if len(a) else 0.0,
        # Logit differences relative to the reference's size, floored at 1: large logits carry more float error.
        "max_rel_diff_logits": float((np.abs(a - b) / np.maximum(1.0, np.abs(a))).max()) if len(a) else 0.0,
        "min_cosine": float(cos.min()) if len(a) else 1.0,
    }
