"""Compressed variants at export: INT8 (two flavours) and FP16, each gated against its fp32 parent.

`--precision int8|fp16` builds what was asked and refuses (writing nothing) when any candidate fails
the gate; `--precision auto` builds the candidates, keeps those that pass, measures their latency
side by side on this machine and deploys the fastest, falling back to fp32 with the reason. With a
device profile (`--device`), auto builds the candidates that profile's first preferred backend needs
and times them on that backend when this machine has it; otherwise it chooses by the profile's stated
preference (int8, then fp16, then fp32) and says that latency was not measured.

An INT8 candidate that fails the gate climbs a ladder, each rung recorded in the candidate's `rungs`:
plain INT8 -> the most harmful layers kept in float -> quantization-aware fine-tuning (export/qat.py,
needs the torch model and its training data) -> refused (int8) or left out (auto).

A candidate that cannot be built at all (BUILD_ERRORS: the converter rejects the model, e.g. an operator
ONNX Runtime's quantizer cannot handle, or the converter is not installed) is refused by an explicit
`--precision int8|fp16`; under auto it is recorded as not built, with the one-line reason, in the
candidates table and the deploy reason, and the others go on (fp32 is always there).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np

from edgeclf.errors import ConfigError, MissingExtraError, ModelError
from edgeclf.export.gate import gate_candidate
from edgeclf.export.onnx_export import ExportError
from edgeclf.runtime.postprocess import DecisionRule

__all__ = ["PRECISION_CHOICES", "DEVICE_CANDIDATES", "compress", "measure_latency", "device_plan"]

log = logging.getLogger(__name__)
PRECISION_CHOICES = ("fp32", "fp16", "int8", "auto")
VARIANT_FILES = {"int8-cpu": "model.int8-cpu.onnx", "int8-tensorrt": "model.int8-tensorrt.onnx", "fp16": "model.fp16.onnx"}
# What each backend can gain from, by the runtime's own choice of INT8 flavour (runtime/bundle.py:
# INT8_FLAVOUR_FOR_BACKEND); fp16 only on GPUs.
DEVICE_CANDIDATES = {"ort-cpu": ["int8-cpu"], "ort-cuda": ["int8-cpu", "fp16"], "ort-tensorrt": ["int8-tensorrt", "fp16"],
                     "trt": ["int8-tensorrt", "fp16"]}
PREFERENCE = ("int8", "fp16")  # a device's stated preference among passing variants when latency cannot be measured
QatRung = Callable[..., Dict[str, Any]]
# "This candidate cannot be built here", as opposed to a mistake that concerns every candidate or a bug.
# ModelError: quantize_int8/convert_fp16 wrap what ONNX Runtime's quantizer or the fp16 converter raise for a
# model they cannot convert (an unsupported operator, nothing left to quantize, a converted model ORT cannot
# run). MissingExtraError: this environment lacks the converter (fp16). Not caught: ConfigError and DataError
# (the user's options or calibration data, wrong for every candidate alike: fix and rerun) and anything else
# (TypeError, KeyError, ...: a bug, which keeps its traceback). Not bare Exception, which would record bugs
# as "not built" and ship a bundle without the variant asked for.
BUILD_ERRORS = (ModelError, MissingExtraError)


def measure_latency(paths: dict[str, Path], x: np.ndarray, *, batch: int = 1, runs: int = 200, warmup: int = 20,
                    threads: int | None = None, backend: str = "ort-cpu") -> dict[str, dict[str, Any]]:
    """ONNX Runtime latency per image of several models, all on the same batch, interleaved (A B A B ...) so drift
    hits all alike.

    The batch is `batch` images, or the models' fixed batch where they take one (a fixed-batch model refuses any
    other), drawn from x's first rows, repeated when x holds fewer. Each call's time is divided by the batch, so at
    batch 1 it is the time per call. Returns {id: {"median", "p90" (ms per image), "runs", "batch"}}.
    """
    from edgeclf.runtime.backends import OrtBackend

    shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    backends: dict[str, Any] = {}
    try:
        for k, p in paths.items():
            backends[k] = OrtBackend(str(p), shape, None, threads=threads, backend=backend)
        fixed = {be.fixed_batch for be in backends.values()} - {None}
        if len(fixed) > 1:
            raise ModelError(f"the models to time take different fixed batches ({', '.join(map(str, sorted(fixed)))}); "
                             "they cannot be timed side by side on the same input")
        n = fixed.pop() if fixed else int(batch)
        xb = np.ascontiguousarray(x[np.arange(n) % len(x)])
        times: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(warmup + runs):
            for k, be in backends.items():
                t0 = time.perf_counter()
                be.infer(xb)
                if i >= warmup:
                    times[k].append((time.perf_counter() - t0) * 1e3 / n)
    finally:
        for be in backends.values():
            be.close()
    return {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "runs": runs, "batch": n}
            for k, v in times.items()}


MAX_LADDER_NODES = 64  # one quantization per layer: beyond this the analysis costs more than it saves


def _worst(g: dict[str, Any], *, failing: bool = False) -> dict[str, Any] | None:
    """The accuracy check (AUC or a class rate) with the largest drop: {metric, drop, drop_ci95}; decision
    agreement has its own figure. failing: among the checks that failed only (None when none did): the largest
    drop may pass (its interval touching zero) while a smaller one fails."""
    pool = [ch for ch in g["checks"] if ch["metric"] != "decision_agreement" and not (failing and ch["passed"])]
    if not pool:
        return None
    w = max(pool, key=lambda ch: ch["drop"])
    return {k: w[k] for k in ("metric", "drop", "drop_ci95")}


def _one_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _float_fallback_ladder(fp32_path: Path, path: Path, calib_x: np.ndarray, flavour: str, method: str,
                           gate: Any) -> dict[str, Any]:
    """When plain INT8 fails the gate: quantize one layer at a time to find the harmful ones, then keep
    the worst 1, 2, 4, ... layers in float until the gate passes, the last rung half the layers.

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
    half = max(1, len(nodes) // 2)
    ks = [1 << i for i in range(half.bit_length()) if 1 << i < half] + [half]  # 1, 2, 4, ... and half itself last
    for k in ks:
        keep = order[:k]
        record = quantize_int8(fp32_path, path, calib_x, flavour=flavour, method=method, nodes_to_exclude=keep)
        g = gate(path)
        rungs.append({"kept_float": keep, "passed": g["passed"], "failed_on": g["failed_on"],
                      "worst_drop": max(c["drop"] for c in g["checks"]), "worst": _worst(g)})
        if g["passed"]:
            record["kept_float"] = keep
            return {"passed": True, "sensitivity": sensitivity, "rungs": rungs, "kept_float": keep, "record": record, "gate": g}
    return {"passed": False, "sensitivity": sensitivity, "rungs": rungs, "kept_float": []}


def _qat_rung(qat: QatRung | None, unavailable: str, epochs: int, *, flavour: str, path: Path, calib_x: np.ndarray,
              method: str, seed: int, gate: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run the QAT rung if it can run. Returns (rung figures, {"record", "qat", "gate"} when it ran, else None);
    on a pass `path` holds the QAT model."""
    from edgeclf.errors import EdgeclfError

    if qat is None:
        return {"rung": "qat", "passed": False, "skipped": unavailable}, None
    if epochs < 1:
        return {"rung": "qat", "passed": False, "skipped": "--qat-epochs is 0"}, None
    t0 = time.time()
    try:
        out = qat(flavour=flavour, out_path=path, calib_x=calib_x, calib_method=method, epochs=epochs, seed=seed)
    except EdgeclfError as exc:  # data or model the fine-tuning cannot use: the rung failed, say why
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("quantization-aware fine-tuning (%s) failed: %s", flavour, first)
        return {"rung": "qat", "passed": False, "epochs": epochs, "error": first,
                "seconds": round(time.time() - t0, 1)}, None
    g = gate(path)
    rec = out.get("qat", {})
    figures = {
        "rung": "qat", "passed": g["passed"], "failed_on": g["failed_on"], "worst": _worst(g), "worst_failing": _worst(g, failing=True),
        "decision_agreement": g["decision_agreement"],
        **{k: rec.get(k) for k in ("epochs", "lr", "best_epoch", "val_auc_fake_quant_before", "val_auc_fake_quant_best",
                                   "layers")},
        "seconds": round(time.time() - t0, 1),
    }
    return figures, {"record": out["record"], "qat": rec, "gate": g}


def device_plan(device: str) -> dict[str, Any]:
    """What auto does for a device profile: {"device", "accelerator", "backend" (its first preferred),
    "candidates", "available" (whether this machine has that backend's execution provider), "provider"}."""
    from edgeclf.devices import load_profile

    prof = load_profile(device)  # ConfigError for an unknown name
    backend = prof.preferred_backends[0] if prof.preferred_backends else "ort-cpu"
    if backend not in DEVICE_CANDIDATES:
        raise ConfigError(f"device profile {device!r} prefers backend {backend!r}; export knows {', '.join(DEVICE_CANDIDATES)}")
    if backend == "trt":  # the native TensorRT engine: no execution provider to ask for
        from edgeclf.runtime.engine import tensorrt_missing

        provider, available = "tensorrt (native engine)", tensorrt_missing() is None
        return {"device": prof.name, "accelerator": prof.accelerator, "backend": backend,
                "candidates": list(DEVICE_CANDIDATES[backend]), "available": bool(available), "provider": provider}
    from edgeclf.runtime.backends import _PROVIDERS

    provider = _PROVIDERS[backend][0]
    try:
        import onnxruntime as ort

        available = provider in ort.get_available_providers()
    except ImportError:
        available = False
    return {"device": prof.name, "accelerator": prof.accelerator, "backend": backend,
            "candidates": list(DEVICE_CANDIDATES[backend]), "available": bool(available), "provider": provider}


def _is_drop(metric: str) -> bool:
    """An accuracy drop judged against --max-drop (AUC or a class rate), as opposed to the agreement floor or
    unusable outputs."""
    return metric not in ("decision_agreement", "finite_outputs")


def _refusal(c: dict[str, Any], max_drop: float) -> str:
    """One line: why --precision int8|fp16 wrote nothing: what failed (each drop over its limit, the agreement
    floor), the rungs tried and what still failed after QAT, and the knobs of the checks that failed."""
    g = c["gate"]
    failing = [ch for ch in g["checks"] if not ch["passed"]]
    drops = [ch for ch in failing if _is_drop(ch["metric"])]
    agree = next((ch for ch in failing if ch["metric"] == "decision_agreement"), None)
    finite = next((ch for ch in failing if ch["metric"] == "finite_outputs"), None)
    why = []
    if finite is not None:  # gate.py: no figures to compare, the outputs are unusable
        why.append(f"it outputs NaN or infinity on {finite['n_non_finite']} of {g['n']} validation images")
    if drops:
        worst = max(drops, key=lambda ch: ch["drop"])
        cap = g.get("ceiling")
        # Past the hard ceiling a drop fails whatever its interval (which can touch zero on a few flips): say so.
        limit = (f"over the gate's hard ceiling {cap:g} (max(5 x --max-drop, 0.05)), whatever its interval"
                 if cap is not None and worst["drop"] > cap else f"over --max-drop {max_drop}")
        why.append(f"{worst['metric']} drops by {worst['drop']:.4f} (paired 95% CI {worst['drop_ci95'][0]:.4f} to "
                   f"{worst['drop_ci95'][1]:.4f}) against the fp32 parent, {limit}")
    if agree is not None:
        why.append(f"decision_agreement with the fp32 parent is {agree['candidate']:.3f} of the validation images, under "
                   f"--min-agreement {agree['floor']}")
    if not why:  # a check this function does not know: name it rather than say nothing
        why.append(f"failed on {', '.join(g.get('failed_on') or [ch['metric'] for ch in failing])}")
    text = f"{c['id']} fails the gate: {' and '.join(why)}; "
    if c.get("ladder") and c["ladder"].get("error"):
        text += f"keeping its most sensitive layers in float could not be tried ({c['ladder']['error']}); "
    if c.get("ladder") and c["ladder"].get("rungs"):
        text += f"it still fails with up to {len(c['ladder']['rungs'][-1]['kept_float'])} of its most sensitive layers kept in float; "
    qat = next((r for r in c.get("rungs", []) if r["rung"] == "qat"), None)
    if qat is not None:
        if qat.get("skipped"):
            text += f"quantization-aware fine-tuning was not tried ({qat['skipped']}); "
        elif qat.get("error"):
            text += f"quantization-aware fine-tuning failed ({qat['error']}); "
        else:
            text += f"after {qat['epochs']} epoch(s) of quantization-aware fine-tuning {_after_qat(qat, g, max_drop)}; "
    return text + "no bundle was written; " + _advice(c, max_drop)


def _after_qat(qat: dict[str, Any], g: dict[str, Any], max_drop: float) -> str:
    """What still fails after the QAT rung (its own gate's failed_on), and which of plain INT8's failures it fixed."""
    before = [ch["metric"] for ch in g["checks"] if not ch["passed"]]
    after = list(qat.get("failed_on") or [])
    still = []
    if "finite_outputs" in after:
        still.append("it still outputs NaN or infinity" if "finite_outputs" in before else "it outputs NaN or infinity")
    dropped = [m for m in after if _is_drop(m)]
    if dropped:
        w = qat.get("worst_failing")  # the largest failing drop; absent from records written before it was kept
        if w is None and qat.get("worst", {}).get("metric") in dropped:
            w = qat["worst"]
        if w is not None:
            lead = "still " if w["metric"] in before else ""
            still.append(f"{w['metric']} {lead}drops by {w['drop']:.4f}, over --max-drop {max_drop}")
        else:
            still.append(f"{', '.join(dropped)} {'still ' if set(dropped) & set(before) else ''}fail(s) --max-drop {max_drop}")
    if "decision_agreement" in after:
        lead = "still " if "decision_agreement" in before else ""
        floor = g.get("min_agreement")
        still.append(f"decision_agreement is {lead}{qat['decision_agreement']:.3f}"
                     + (f", under --min-agreement {floor}" if floor is not None else ", under --min-agreement"))
    fixed = [m for m in before if m not in after]
    text = " and ".join(still) if still else "it still fails the gate"
    if fixed:
        text = f"{', '.join(fixed)} {'passes' if len(fixed) == 1 else 'pass'} but {text}"
    elif "decision_agreement" in after and not dropped and "finite_outputs" not in after:
        text += " (its accuracy checks pass)"
    return text


def _advice(c: dict[str, Any], max_drop: float) -> str:
    """The fixes for the checks plain INT8/fp16 failed: --max-drop for a drop, --min-agreement for the agreement
    floor (both, when both failed: each alone leaves the other failing), another INT8 calibration, or fp32."""
    failing = [ch for ch in c["gate"]["checks"] if not ch["passed"]]
    knobs = []
    if any(_is_drop(ch["metric"]) for ch in failing):
        knobs.append(f"raise --max-drop (now {max_drop})")
    agree = next((ch for ch in failing if ch["metric"] == "decision_agreement"), None)
    if agree is not None:
        knobs.append(f"lower --min-agreement (now {agree['floor']})")
    options = [" and ".join(knobs)] if knobs else []
    if c["id"].startswith("int8"):  # fp16 calibrates nothing
        from edgeclf.export.quantize import CALIBRATION_METHODS

        tried = (c.get("quantization") or {}).get("method")
        options.append(f"try --calibration {' or '.join(m for m in CALIBRATION_METHODS if m != tried)}")
    return f"{options[0]} or export fp32" if len(options) == 1 else ", ".join(options + ["or export fp32"])


def compress(
    stage: Path,
    fp32_path: Path,
    *,
    precision: str,
    max_drop: float,
    calib_x: np.ndarray,
    min_agreement: float = 0.98,
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
    qat: QatRung | None = None,
    qat_epochs: int = 0,
    qat_unavailable: str = "no torch model and training data to fine-tune (an imported ONNX model)",
    device: str | None = None,
    val_groups: Sequence[str] | None = None,
    group_unit: str = "group",
    precision_from: str = "--precision",
) -> dict[str, Any]:
    """Build, gate and (for auto) time the candidates; returns {"variants", "deploy", "candidates", "calibration"}
    (calibration None when no INT8 candidate was built).

    A candidate that raises one of BUILD_ERRORS while being built: `int8`/`fp16` raise ExportError naming it
    and the reason; `auto` records it in `candidates` with "built": False and its "error", says so in the
    deploy reason, and goes on with the others.
    val_groups: (N,) the validation images' groups (clips, near-copy groups) for the gate's cluster bootstrap,
    named group_unit ("clip" or "group") in each gate record; None resamples images.

    qat: the last INT8 rung, a callable ``qat(flavour=, out_path=, calib_x=, calib_method=, epochs=, seed=)``
    returning {"record": quantization record, "qat": fine-tuning record} (see export/qat.py::make_qat_rung);
    None skips the rung with `qat_unavailable` as the reason. qat_epochs 0 turns it off.
    device: a device profile name (auto only): build that profile's backend's candidates and choose for it.
    precision_from: what set `precision` (the flag, a recipe's [export] settings), named in the int8/fp16 deploy reason.
    """
    from edgeclf.export.bundle_writer import _ort_logits
    from edgeclf.export.quantize import convert_fp16, quantize_int8

    def gate(path: Path) -> dict[str, Any]:
        logits = _ort_logits(path, val_x).astype(np.float32)
        return gate_candidate(parent_logits, logits, val_y, task, temperature, rule, labels, max_drop=max_drop,
                              min_agreement=min_agreement, ids=val_ids, groups=val_groups, group_unit=group_unit, seed=seed)

    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"--precision {precision!r} is unknown; allowed: {', '.join(PRECISION_CHOICES)}")
    if not 0 <= max_drop < 1:
        raise ConfigError(f"--max-drop is {max_drop}; give a fraction such as 0.01")
    if not 0 <= min_agreement <= 1:
        raise ConfigError(f"--min-agreement is {min_agreement}; give a fraction such as 0.98")
    if device is not None and precision != "auto":
        raise ConfigError(f"--device {device} chooses among compressed candidates: give it with --precision auto")
    plan = device_plan(device) if device is not None else None
    wanted = {"int8": ["int8-cpu", "int8-tensorrt"], "fp16": ["fp16"], "auto": ["int8-cpu", "int8-tensorrt"]}[precision]
    if plan is not None:
        wanted = plan["candidates"]
    candidates: list[dict[str, Any]] = []
    for vid in wanted:
        path = stage / VARIANT_FILES[vid]
        try:
            if vid == "fp16":
                record = convert_fp16(fp32_path, path)
            else:
                record = quantize_int8(fp32_path, path, calib_x, flavour=vid.split("-", 1)[1], method=calib_method)
        except BUILD_ERRORS as exc:
            path.unlink(missing_ok=True)
            why = _one_line(exc)
            if precision != "auto":  # asked for by name: no bundle without it
                raise ExportError(f"{vid} could not be built: {why}; no bundle was written; export with --precision auto "
                                  "(keeps the candidates that build, else fp32) or --precision fp32") from exc
            log.warning("candidate %s could not be built, going on without it: %s", vid, why)
            candidates.append({"id": vid, "built": False, "error": why, "_path": path})
            continue
        g = gate(path)
        # The size of the model `g` judges: later rungs overwrite `path`, and a failed ladder reports plain INT8's figures.
        size = path.stat().st_size
        rungs: list[dict[str, Any]] = [{"rung": "plain", "passed": g["passed"], "failed_on": g["failed_on"], "worst": _worst(g),
                                        "decision_agreement": g["decision_agreement"]}]
        ladder = None
        qat_record = None
        if not g["passed"] and vid != "fp16":
            flavour = vid.split("-", 1)[1]
            try:
                ladder = _float_fallback_ladder(fp32_path, path, calib_x, flavour, calib_method, gate)
            except BUILD_ERRORS as exc:  # a rung's model could not be built: the rung failed, say why
                log.warning("keeping layers of %s in float failed: %s", vid, _one_line(exc))
                ladder = {"passed": False, "error": _one_line(exc), "rungs": [], "kept_float": []}
            if ladder.get("error"):
                rungs.append({"rung": "float-fallback", "passed": False, "error": ladder["error"]})
            elif ladder.get("skipped"):
                rungs.append({"rung": "float-fallback", "passed": False, "skipped": ladder["skipped"]})
            else:
                last = ladder["rungs"][-1] if ladder["rungs"] else {}
                rungs.append({"rung": "float-fallback", "passed": ladder["passed"], "kept_float": last.get("kept_float", []),
                              "tried": len(ladder["rungs"]), "worst": last.get("worst")})
            if ladder["passed"]:
                record, g = ladder.pop("record"), ladder.pop("gate")
                size = path.stat().st_size
            else:
                ladder.pop("record", None), ladder.pop("gate", None)
                figures, ran = _qat_rung(qat, qat_unavailable, qat_epochs, flavour=flavour, path=path, calib_x=calib_x,
                                         method=calib_method, seed=seed, gate=gate)
                rungs.append(figures)
                if ran is not None:
                    qat_record = ran["qat"]
                    if ran["gate"]["passed"]:
                        record, g = ran["record"], ran["gate"]
                        size = path.stat().st_size
        candidates.append({"id": vid, "built": True, "file": path.name, "precision": record["precision"],
                           "flavour": record.get("flavour"), "quantization": record, "gate": g, "ladder": ladder, "rungs": rungs,
                           "qat": qat_record, "size_bytes": size, "_path": path})
    calibration = _calibration_record(candidates, calib_x, calib_method, seed)
    failed = [c for c in candidates if not _passed(c)]
    if failed and precision != "auto":
        raise ExportError(_refusal(failed[0], max_drop))
    for c in failed:
        c["_path"].unlink(missing_ok=True)
    passing = [c for c in candidates if _passed(c)]
    deploy: dict[str, Any]
    if precision in ("int8", "fp16"):
        deploy = {"precision": precision,
                  "reason": f"{precision} set by {precision_from}, and every {precision} variant passed the gate"}
        if precision == "fp16":
            deploy["reason"] += "; fp16 is for GPU backends: it brings no speed on a CPU, where run keeps fp32 unless asked"
    elif plan is not None:
        deploy = _deploy_for_device(plan, candidates, passing, failed, fp32_path, val_x)
    else:
        cpu = [c for c in passing if c["id"] == "int8-cpu"]
        if not cpu:
            deploy = {"precision": "fp32", "reason": next((_failure(c, "the int8-cpu candidate") for c in failed
                                                           if c["id"] == "int8-cpu"), "no int8-cpu candidate")}
        else:
            deploy = _deploy_by_latency(candidates, cpu, fp32_path, val_x, "ort-cpu", "here")
    for c in candidates:  # never silent: every candidate that could not be built is named where the choice is explained
        if not c["built"] and not any(f"{c['id']}{w} could not be built" in deploy["reason"] for w in ("", " candidate")):
            deploy["reason"] += f"; {_failure(c)}"
    variants = [{k: v for k, v in c.items() if not k.startswith("_")} for c in passing]
    table = []
    for c in candidates:
        if not c["built"]:  # no model, no figures: the reason is the record
            table.append({"id": c["id"], "built": False, "passed": False, "failed_on": ["build"], "error": c["error"],
                          "worst": None, "decision_agreement": None, "size_bytes": None, "kept_float": [], "qat": False,
                          "rungs": [{"rung": "build", "passed": False, "error": c["error"]}], "latency_ms": c.get("latency_ms")})
            continue
        table.append({"id": c["id"], "built": True, "passed": c["gate"]["passed"], "failed_on": c["gate"]["failed_on"],
                      "worst": _worst(c["gate"]),
                      "decision_agreement": c["gate"]["decision_agreement"], "size_bytes": c["size_bytes"],
                      "kept_float": c["quantization"].get("kept_float", []), "qat": bool(c["quantization"].get("qat")),
                      "rungs": c["rungs"], "latency_ms": c.get("latency_ms")})
    deploy["max_drop"] = max_drop
    deploy["min_agreement"] = min_agreement
    return {"variants": variants, "deploy": deploy, "candidates": table, "calibration": calibration}


def _calibration_record(candidates: list[dict[str, Any]], calib_x: np.ndarray, method: str, seed: int) -> dict[str, Any] | None:
    """Provenance of the calibration that ran: the images the quantizer read (a fixed-batch model reads whole batches
    only), as its records say. None when none ran: fp16 alone calibrates nothing, nor does an INT8 candidate that
    could not be built. `offered` keeps the size of the sample handed in when fewer were used; `per_variant` appears
    only if the candidates read different images (the QAT rung quantizes a re-exported model)."""
    used: dict[str, dict[str, Any]] = {
        c["id"]: {"n": int(c["quantization"]["calibration_n"]), "sha256": str(c["quantization"]["calibration_sha256"])}
        for c in candidates if c["id"].startswith("int8") and c["built"]}
    if not used:
        return None
    first = next(iter(used.values()))
    rec: dict[str, Any] = {"n": first["n"], "method": method, "split": "train", "seed": seed, "sha256": first["sha256"]}
    if any(u["n"] < len(calib_x) for u in used.values()):
        rec["offered"] = int(len(calib_x))
    if any(u != first for u in used.values()):
        rec["per_variant"] = used
    return rec


def _passed(c: dict[str, Any]) -> bool:
    return bool(c["built"] and c["gate"]["passed"])


def _failure(c: dict[str, Any], name: str | None = None) -> str:
    """Why a candidate is not deployable, in a few words: not built (with the reason) or failed the gate."""
    return f"{name or c['id']} could not be built ({c['error']})" if not c["built"] else f"{name or c['id']} failed the gate"


def _deploy_by_latency(candidates: list[dict[str, Any]], passing: list[dict[str, Any]], fp32_path: Path, val_x: np.ndarray,
                       backend: str, where: str) -> dict[str, Any]:
    """Time fp32 and the passing candidates on `backend`; deploy the fastest if it beats fp32 by 5%."""
    # Batch 1, or the model's fixed batch (every candidate keeps its parent's): all timed on the same batch.
    lat = measure_latency({"fp32": fp32_path, **{c["id"]: c["_path"] for c in passing}}, val_x, backend=backend)
    for c in candidates:
        c["latency_ms"] = lat.get(c["id"])
    best = min(passing, key=lambda c: lat[c["id"]]["median"])
    b, f = lat[best["id"]]["median"], lat["fp32"]["median"]
    speedup = f / b
    prec = best["precision"]
    unit = f"ms median per image, batch {lat['fp32']['batch']}"
    if speedup > 1.05:
        deploy = {"precision": prec, "reason": f"{prec} passed the gate and ran {speedup:.2f}x faster than fp32 {where} "
                  f"({b:.2f} vs {f:.2f} {unit})"}
    else:
        deploy = {"precision": "fp32", "reason": f"{prec} passed the gate but was not faster {where} ({b:.2f} vs "
                  f"{f:.2f} {unit}): fp32 kept"}
    deploy["latency_ms"] = lat
    return deploy


def _deploy_for_device(plan: dict[str, Any], candidates: list[dict[str, Any]], passing: list[dict[str, Any]],
                       failed: list[dict[str, Any]], fp32_path: Path, val_x: np.ndarray) -> dict[str, Any]:
    name, backend = plan["device"], plan["backend"]
    dev = {"device": name, "backend": backend}
    if not passing:
        why = ", ".join(_failure(c) for c in failed) or "no candidate"
        return {"precision": "fp32", "reason": f"for device {name} ({backend}): {why}", **dev, "latency_measured": False}
    if plan["available"]:
        d = _deploy_by_latency(candidates, passing, fp32_path, val_x, backend, f"on {backend} here")
        return {**d, "reason": f"for device {name}: " + d["reason"], **dev, "latency_measured": True}
    best = min(passing, key=lambda c: PREFERENCE.index(c["precision"]))
    return {"precision": best["precision"],
            "reason": (f"for device {name}: {best['id']} passed the gate and is its preferred precision among those that "
                       f"passed ({', '.join(c['id'] for c in passing)}; int8 before fp16 before fp32); latency was not "
                       f"measured because {backend} ({plan['provider']}) is not available on this machine"),
            **dev, "latency_measured": False}
