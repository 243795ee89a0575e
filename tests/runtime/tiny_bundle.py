"""A tiny valid bundle without torch (onnx's helper builds the model), for tests of device-side commands."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from edgeclf.runtime.bundle import write_checksums

LABELS = ["normal", "cyst", "mass"]


def make_tiny_bundle(folder: Path, *, variants: Sequence[str] = (), n_ref: int = 6, size: int = 8, seed: int = 0) -> Path:
    """model.onnx: Flatten -> Gemm on a (N, 1, size, size) input, 3 logits; reference.npz with its outputs.

    variants: ids such as "int8-tensorrt" or "fp16", each a copy of the fp32 model (same outputs recorded)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(size * size, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    x = rng.normal(size=(n_ref, 1, size, size)).astype(np.float32)
    logits = (x.reshape(n_ref, -1) @ w + b).astype(np.float32)
    arrays = {"inputs": x, "logits": logits}
    entries = []
    for vid in variants:
        precision, _, flavour = vid.partition("-")
        shutil.copy(folder / "model.onnx", folder / f"model.{vid}.onnx")
        entries.append({"file": f"model.{vid}.onnx", "precision": precision, **({"flavour": flavour} if flavour else {})})
        arrays[f"logits__{vid}"] = logits
    np.savez(folder / "reference.npz", **arrays)
    manifest = {
        "schema_version": 2, "format": "edgeclf-bundle", "name": "tiny", "created": "2026-01-01T00:00:00+00:00",
        "task": "multiclass", "labels": LABELS,
        "model": {"file": "model.onnx", "architecture": "tiny", "precision": "fp32", "opset": 17, "ir_version": 8,
                  "input_name": "input", "output_name": "logits", "input_shape": ["batch", 1, size, size], "output_shape": ["batch", 3]},
        "variants": entries, "deploy": {"precision": "fp32", "reason": "tests"},
        "preprocess": {"channels": 1, "size": [size, size], "mean": [0.5], "std": [0.25]},
        "postprocess": {"temperature": 1.0, "decision": {"kind": "max-ratio", "thresholds": [1 / 3] * 3}},
        "provenance": {"source": "tests"},
        "reference": {"file": "reference.npz", "count": n_ref, "split": "val"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    write_checksums(folder)
    return folder


def inbox_with_one_xray(tmp_path: Path) -> Path:
    """tmp_path/in holding one gray 64 px PNG whose mtime lies well in the past, so a watched folder takes it as
    complete at once."""
    import os
    import time

    cv2 = pytest.importorskip("cv2")
    inbox = tmp_path / "in"
    inbox.mkdir()
    p = inbox / "chest.png"
    cv2.imwrite(str(p), np.random.default_rng(0).integers(30, 200, size=(64, 64), dtype=np.uint8))
    t = time.time() - 100
    os.utime(p, (t, t))
    return inbox
