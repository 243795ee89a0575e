"""Device-side entry points used by the CLI: run a bundle on a source, verify a bundle."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from edgeclf.errors import ConfigError, IntegrityError
from edgeclf.runtime.backends import create_backend
from edgeclf.runtime.bundle import load_bundle
from edgeclf.runtime.pipeline import run_pipeline
from edgeclf.runtime.sinks import JsonlSink, Sink
from edgeclf.runtime.sources import open_source

__all__ = ["run_bundle", "verify_bundle", "PARITY_TOLERANCE", "VARIANT_TOLERANCE"]

log = logging.getLogger(__name__)
# Same model, same inputs, another machine or ORT build: logits may differ by float rounding only.
PARITY_TOLERANCE = 1e-3
VARIANT_TOLERANCE = 0.05  # relative to the largest reference logit


def run_bundle(
    bundle_path: str,
    source_uri: str,
    *,
    out: Optional[str] = None,
    max_frames: Optional[int] = None,
    backend: str = "ort-cpu",
    threads: Optional[int] = None,
    min_confidence: Optional[float] = None,
    precision: Optional[str] = None,
    extra_sinks: Optional[List[Sink]] = None,
) -> Dict[str, Any]:
    """Verify and load the bundle, open the source, classify every frame; returns the run summary."""
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"max frames is {max_frames}; give a positive number or leave it out for the whole source")
    if min_confidence is not None and not 0.0 <= min_confidence < 1.0:
        raise ConfigError(f"min confidence is {min_confidence}; allowed: 0 (never abstain) up to below 1")
    b = load_bundle(bundle_path)
    m = b.manifest
    sinks: List[Sink] = list(extra_sinks or [])
    # Source and backend first: a typo in --source must not truncate an earlier results file.
    model_path, variant = b.select(precision, backend)
    with create_backend(str(model_path), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs,
                        backend=backend, threads=threads) as be, open_source(source_uri) as src:
        try:
            if out:
                sinks.append(JsonlSink(out))
            summary = run_pipeline(b, src, be, sinks, max_frames=max_frames, min_confidence=min_confidence)
        finally:
            for s in sinks:
                s.close()
        result = summary.to_dict()
        result.update(
            bundle=str(b.path), bundle_checksum=b.checksum, source_kind=src.kind, backend=be.name, model=variant,
            frame_count_claimed=src.frame_count, out=out,
        )
    return result


def verify_bundle(bundle_path: str, *, parity: bool = True, backend: str = "ort-cpu") -> Dict[str, Any]:
    """Checksums and schema (load_bundle), then, if present, re-run reference.npz on `backend` through
    the fp32 model and every variant, each against the outputs it gave at export."""
    b = load_bundle(bundle_path)
    result: Dict[str, Any] = {"path": str(b.path), "checksum": b.checksum, "checksums": "ok", "manifest": "ok", "reference": None}
    ref = b.reference_path
    if parity and ref is not None:
        m = b.manifest
        with np.load(str(ref), allow_pickle=False) as z:
            x = z["inputs"]
            recorded = {k: z[k] for k in z.files if k.startswith("logits")}
        # TensorRT rejects the CPU INT8 form (unsigned activations): check what this backend may run.
        runnable = [v for v in m.variants if not (backend == "ort-tensorrt" and v.id == "int8-cpu")]
        models = [("fp32", b.model_path, "logits")] + [(v.id, b.path / v.file, f"logits__{v.id}") for v in runnable]
        checks = []
        for vid, path, key in models:
            if key not in recorded:
                raise IntegrityError(f"bundle {Path(bundle_path)}: reference.npz has no outputs for model {vid}; re-export the bundle")
            with create_backend(str(path), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs, backend=backend) as be:
                got = be.infer(x).astype(np.float64)
            want = recorded[key]
            diff = float(np.abs(got - want).max()) if len(x) else 0.0
            # Quantized kernels legitimately differ between CPUs (e.g. with or without VNNI).
            tol = PARITY_TOLERANCE if vid == "fp32" else VARIANT_TOLERANCE * max(1.0, float(np.abs(want).max()) if len(x) else 1.0)
            checks.append({"model": vid, "n": int(len(x)), "max_abs_diff": diff, "tolerance": tol})
            if diff > tol:
                raise IntegrityError(
                    f"bundle {Path(bundle_path)}: model {vid} on {backend} differs from its exported reference outputs by "
                    f"{diff:.2e} (> {tol:.1e}); this backend cannot be trusted with this model"
                )
        result["reference"] = {**checks[0], "backend": backend, "variants": checks[1:]} if checks else None
    return result
