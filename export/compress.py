"""Compressed variants at export: INT8 (two flavours) and FP16, each gated against its fp32 parent.

`--precision int8|fp16` builds what was asked and refuses (writing nothing) when any candidate fails
the gate; `--precision auto` builds the candidates, keeps those that pass, measures their latency
side by side on this machine and deploys the fastest, falling back to fp32 with the reason.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import ConfigError
from edgeclf.export.gate import gate_candidate
from edgeclf.export.onnx_export import ExportError
from edgeclf.runtime.postprocess import DecisionRule

__all__ = ["PRECISION_CHOICES", "compress", "measure_latency"]

log = logging.getLogger(__name__)
PRECISION_CHOICES = ("fp32", "fp16", "int8", "auto")
VARIANT_FILES = {"int8-cpu": "model.int8-cpu.onnx", "int8-tensorrt": "model.int8-tensorrt.onnx", "fp16": "model.fp16.onnx"}


def measure_latency(paths: dict[str, Path], x1: np.ndarray, *, runs: int = 200, warmup: int = 20,
                    threads: int | None = None) -> dict[str, dict[str, float]]:
    """Batch-1 ONNX Runtime latency of several models, interleaved (A B A B ...) so drift hits all alike."""
    from edgeclf.runtime.backends import OrtBackend

    shape = (int(x1.shape[1]), int(x1.shape[2]), int(x1.shape[3]))
    backends = {k: OrtBackend(str(p), shape, None, threads=threads) for k, p in paths.items()}
    try:
        times: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(warmup + runs):
            for k, be in backends.items():
                t0 = time.perf_counter()
                be.infer(x1)
                if i >= warmup:
                    times[k].append((time.perf_counter() - t0) * 1e3)
    finally:
        for be in backends.values():
            be.close()
    return {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "runs": runs} for k, v in times.items()}


MAX_LADDER_NODES = 64  # one quantization per layer: beyond this the analysis costs more than it saves


def _float_fallback_ladder(fp32_path: Path, path: Path, calib_x: np.ndarray, flavour: str, method: str,
                           gate: Any) -> dict[str, Any]:
    """When plain INT8 fails the gate: quantize one layer at a time to find the harmful ones, then keep
    the worst 1, 2, 4, ... layers in float until the gate passes (at most half the layers).

    Returns {"passed", "sensitivity": [{node, worst_drop}], "rungs": [...], "kept_float", "record", "gate"};
    on success `path` holds the passing model.
    """
    from edgeclf.export.quantize import quantizable_nodes, quantize_int8

    nodes = quantizable_nodes(fp32_path)
    if not nodes or len(nodes) > MAX_LADDER_NODES:
        return {"passed": False, "skipped": f"{len(nodes)} quantizable layers (analysis runs for 1..{MAX_LADDER_NODES})"}
    probe = path.with_name(path.stem + ".probe.onnx")
    sensitivity = []
    try:
        for n in nodes:  # only layer n quantized
            quantize_int8(fp32_path, probe, calib_x, flavour=flavour, method=method, nodes_to_exclude=[m for m in nodes if m != n])
            g = gate(probe)
            sensitivity.append({"node": n, "worst_drop": max(c["drop"] for c in g["checks"])})
    finally:
        probe.unlink(missing_ok=True)
    order = [s["node"] for s in sorted(sensitivity, key=lambda s: -s["worst_drop"])]
    rungs: list[dict[str, Any]] = []
    k = 1
    while k <= max(1, len(nodes) // 2):
        keep = order[:k]
        record = quantize_int8(fp32_path, path, calib_x, flavour=flavour, method=method, nodes_to_exclude=keep)
        g = gate(path)
        rungs.append({"kept_float": keep, "passed": g["passed"], "failed_on": g["failed_on"],
                      "worst_drop": max(c["drop"] for c in g["checks"])})
        if g["passed"]:
            record["kept_float"] = keep
            return {"passed": True, "sensitivity": sensitivity, "rungs": rungs, "kept_float": keep, "record": record, "gate": g}
        k *= 2
    return {"passed": False, "sensitivity": sensitivity, "rungs": rungs, "kept_float": []}


def compress(
    stage: Path,
    fp32_path: Path,
    *,
    precision: str,
    max_drop: float,
    calib_x: np.ndarray,
    calib_method: str,
    val_x: np.ndarray,
    val_y: np.ndarray,
    val_ids: Sequence[str],
    parent_logits: np.ndarray,
    task: str,
    temperature: float,
    rule: DecisionRule,
    labels: Sequence[str],
    seed: int = 0,
) -> dict[str, Any]:
    """Build, gate and (for auto) time the candidates; returns {"variants", "deploy", "candidates", "calibration"}."""
    from edgeclf.export.bundle_writer import _ort_logits
    from edgeclf.export.quantize import convert_fp16, quantize_int8

    def gate(path: Path) -> dict[str, Any]:
        logits = _ort_logits(path, val_x).astype(np.float32)
        return gate_candidate(parent_logits, logits, val_y, task, temperature, rule, labels, max_drop=max_drop, ids=val_ids, seed=seed)

    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"--precision {precision!r} is unknown; allowed: {', '.join(PRECISION_CHOICES)}")
    if not 0 <= max_drop < 1:
        raise ConfigError(f"--max-drop is {max_drop}; give a fraction such as 0.01")
    wanted = {"int8": ["int8-cpu", "int8-tensorrt"], "fp16": ["fp16"], "auto": ["int8-cpu", "int8-tensorrt"]}[precision]
    calibration = {"n": int(len(calib_x)), "method": calib_method, "split": "train", "seed": seed,
                   "sha256": hashlib.sha256(np.ascontiguousarray(calib_x).tobytes()).hexdigest()}
    candidates: list[dict[str, Any]] = []
    for vid in wanted:
        path = stage / VARIANT_FILES[vid]
        if vid == "fp16":
            record = convert_fp16(fp32_path, path)
        else:
            record = quantize_int8(fp32_path, path, calib_x, flavour=vid.split("-", 1)[1], method=calib_method)
        g = gate(path)
        ladder = None
        if not g["passed"] and vid != "fp16":
            ladder = _float_fallback_ladder(fp32_path, path, calib_x, vid.split("-", 1)[1], calib_method, gate)
            if ladder["passed"]:
                record, g = ladder.pop("record"), ladder.pop("gate")
            else:
                ladder.pop("record", None), ladder.pop("gate", None)
        candidates.append({"id": vid, "file": path.name, "precision": record["precision"], "flavour": record.get("flavour"),
                           "quantization": record, "gate": g, "ladder": ladder, "size_bytes": path.stat().st_size, "_path": path})
    failed = [c for c in candidates if not c["gate"]["passed"]]
    if failed and precision != "auto":
        c = failed[0]
        worst = max((ch for ch in c["gate"]["checks"] if not ch["passed"]), key=lambda ch: ch["drop"])
        raise ExportError(
            f"{c['id']} fails the gate: {worst['metric']} drops by {worst['drop']:.4f} (paired 95% CI "
            f"{worst['drop_ci95'][0]:.4f} to {worst['drop_ci95'][1]:.4f}) against the fp32 parent, over --max-drop {max_drop}; "
            + (f"even with up to {len(c['ladder']['rungs'][-1]['kept_float'])} of its most sensitive layers kept in float; "
               if c.get("ladder") and c["ladder"].get("rungs") else "")
            + "no bundle was written; raise --max-drop, try --calibration entropy or percentile, or export fp32"
        )
    for c in failed:
        c["_path"].unlink()
    passing = [c for c in candidates if c["gate"]["passed"]]
    deploy: dict[str, Any] = {"precision": "fp32", "reason": "fp32 requested"}
    if precision in ("int8", "fp16"):
        deploy = {"precision": precision, "reason": f"{precision} requested and every {precision} variant passed the gate"}
        if precision == "fp16":
            deploy["reason"] += "; fp16 is for GPU backends: it brings no speed on a CPU, where run keeps fp32 unless asked"
    else:
        cpu = [c for c in passing if c["id"] == "int8-cpu"]
        if not cpu:
            deploy["reason"] = ("the int8-cpu candidate failed the gate" if any(c["id"] == "int8-cpu" for c in failed)
                                else "no int8-cpu candidate")
        else:
            lat = measure_latency({"fp32": fp32_path, "int8-cpu": cpu[0]["_path"]}, val_x[:1])
            for c in candidates:
                c["latency_ms"] = lat.get(c["id"])
            speedup = lat["fp32"]["median"] / lat["int8-cpu"]["median"]
            if speedup > 1.05:
                deploy = {"precision": "int8", "reason": f"int8 passed the gate and ran {speedup:.2f}x faster than fp32 here "
                          f"({lat['int8-cpu']['median']:.2f} vs {lat['fp32']['median']:.2f} ms median, batch 1)"}
            else:
                deploy["reason"] = (f"int8 passed the gate but was not faster here ({lat['int8-cpu']['median']:.2f} vs "
                                    f"{lat['fp32']['median']:.2f} ms median, batch 1): fp32 kept")
            deploy["latency_ms"] = lat
    variants = [{k: v for k, v in c.items() if not k.startswith("_")} for c in passing]
    table = []
    for c in candidates:
        worst = max(c["gate"]["checks"], key=lambda ch: ch["drop"])
        table.append({"id": c["id"], "passed": c["gate"]["passed"], "failed_on": c["gate"]["failed_on"],
                      "worst": {k: worst[k] for k in ("metric", "drop", "drop_ci95")},
                      "decision_agreement": c["gate"]["decision_agreement"], "size_bytes": c["size_bytes"],
                      "kept_float": c["quantization"].get("kept_float", []), "latency_ms": c.get("latency_ms")})
    deploy["max_drop"] = max_drop
    return {"variants": variants, "deploy": deploy, "candidates": table, "calibration": calibration}
