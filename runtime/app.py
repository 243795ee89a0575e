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

__all__ = ["run_bundle", "verify_bundle", "PARITY_TOLERANCE"]

log = logging.getLogger(__name__)
# Same model, same inputs, another machine or ORT build: logits may differ by float rounding only.
PARITY_TOLERANCE = 1e-3


def run_bundle(
    bundle_path: str,
    source_uri: str,
    *,
    out: Optional[str] = None,
    max_frames: Optional[int] = None,
    backend: str = "ort-cpu",
    threads: Optional[int] = None,
    min_confidence: Optional[float] = None,
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
    with create_backend(str(b.model_path), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs,
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
            bundle=str(b.path), bundle_checksum=b.checksum, source_kind=src.kind, backend=be.name,
            frame_count_claimed=src.frame_count, out=out,
        )
    return result


def verify_bundle(bundle_path: str, *, parity: bool = True, backend: str = "ort-cpu") -> Dict[str, Any]:
    """Checksums and schema (load_bundle), then, if present, re-run reference.npz on `backend`."""
    b = load_bundle(bundle_path)
    result: Dict[str, Any] = {"path": str(b.path), "checksum": b.checksum, "checksums": "ok", "manifest": "ok", "reference": None}
    ref = b.reference_path
    if parity and ref is not None:
        m = b.manifest
        with np.load(str(ref), allow_pickle=False) as z:
            x, want = z["inputs"], z["logits"]
        with create_backend(str(b.model_path), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs,
                            backend=backend) as be:
            got = be.infer(x)
        diff = float(np.abs(got.astype(np.float64) - want).max()) if len(x) else 0.0
        result["reference"] = {"n": int(len(x)), "max_abs_diff": diff, "tolerance": PARITY_TOLERANCE, "backend": backend}
        if diff > PARITY_TOLERANCE:
            raise IntegrityError(
                f"bundle {Path(bundle_path)}: this device's outputs differ from the exported reference by {diff:.2e} "
                f"(> {PARITY_TOLERANCE}); this backend cannot be trusted with this model"
            )
    return result
