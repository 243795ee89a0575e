"""Device-side entry points used by the CLI: run a bundle on a source, verify a bundle."""
from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from edgeclf.errors import ConfigError, IntegrityError
from edgeclf.runtime import _cv
from edgeclf.runtime.backends import create_backend
from edgeclf.runtime.bundle import load_bundle
from edgeclf.runtime.pipeline import RunOptions, run_pipeline
from edgeclf.runtime.sinks import JsonlSink, Sink
from edgeclf.runtime.sources import FrameSource, open_source

__all__ = ["run_bundle", "verify_bundle", "PARITY_TOLERANCE", "VARIANT_TOLERANCE"]

log = logging.getLogger(__name__)
# Same model, same inputs, another machine or ORT build: logits may differ by float rounding only.
PARITY_TOLERANCE = 1e-3
VARIANT_TOLERANCE = 0.05  # relative to the largest reference logit


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM end the run after the current frame (summary written); returns the restorer."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %d: stopping after the current frame", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    return restore


def _open(uri: str, realtime: bool, reconnect: bool) -> FrameSource:
    """The source, wrapped for live use: cameras and streams reconnect and keep only the newest frame;
    files paced to their frame rate with `realtime` (late frames dropped and counted)."""
    from edgeclf.runtime.live import LatestFrameReader, ReconnectingSource

    src = open_source(uri)
    kind = getattr(src, "kind", "")
    if reconnect and kind in ("camera", "stream", "gstreamer"):
        first = [src]

        def reopen() -> FrameSource:
            return first.pop() if first else open_source(uri)

        return ReconnectingSource(reopen, drop="latest")
    if realtime and not getattr(src, "live", False):
        if not src.fps:
            src.close()
            raise ConfigError(f"--realtime needs a frame rate; source {kind} has none; leave --realtime out")
        return LatestFrameReader(src, drop="latest", realtime=True)
    return src


def run_bundle(
    bundle_path: str,
    source_uri: str,
    *,
    out: Optional[str] = None,
    max_frames: Optional[int] = None,
    backend: Optional[str] = None,
    threads: Optional[int] = None,
    min_confidence: Optional[float] = None,
    precision: Optional[str] = None,
    extra_sinks: Optional[List[Sink]] = None,
    options: Optional[RunOptions] = None,
    device: Optional[str] = None,
    realtime: bool = False,
    reconnect: bool = True,
    fsync_every: Optional[float] = 1.0,
    record: Optional[str] = None,
    show: bool = False,
    summary_path: Optional[str] = None,
) -> Dict[str, Any]:
    """Verify and load the bundle, open the source, classify every frame; returns the run summary.

    Also a clip-level summary (per-class time share, majority label, abstain rate). `record` writes an
    annotated video, `show` opens the overlay window (a clear error where there is no display).
    SIGINT/SIGTERM end the run cleanly with the summary written.
    """
    from edgeclf.runtime.sinks import SummarySink

    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"max frames is {max_frames}; give a positive number or leave it out for the whole source")
    opts = options or RunOptions(min_confidence=min_confidence)
    if min_confidence is not None and opts.min_confidence is None:
        opts = dataclasses.replace(opts, min_confidence=min_confidence)
    # Precedence: defaults < device profile < explicit arguments (the CLI's flags).
    chosen = {"backend": "argument" if backend else "default", "threads": "argument" if threads else "default"}
    if device is not None:
        from edgeclf.devices import load_profile
        from edgeclf.runtime.backends import available_backends

        prof = load_profile(device)
        if backend is None:
            have = available_backends()
            usable = [bk for bk in prof.preferred_backends if bk in have]
            if not usable:
                raise ConfigError(f"device profile {device} prefers {', '.join(prof.preferred_backends)}, none of which this "
                                  f"onnxruntime has ({', '.join(have)}); give --backend or install the right onnxruntime")
            backend = usable[0]
            chosen["backend"] = f"device profile {device} (first of {', '.join(prof.preferred_backends)} available here)"
        if threads is None and prof.threads:
            threads, chosen["threads"] = prof.threads, f"device profile {device}"
    backend = backend or "ort-cpu"
    b = load_bundle(bundle_path)
    m = b.manifest
    sinks: List[Sink] = list(extra_sinks or [])
    clip = SummarySink(summary_path, labels=list(m.labels))
    stop = threading.Event()
    # Source and backend first: a typo in --source must not truncate an earlier results file.
    model_path, variant = b.select(precision, backend)
    with create_backend(str(model_path), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs,
                        backend=backend, threads=threads) as be, _open(source_uri, realtime, reconnect) as src:
        restore = _install_stop_handlers(stop)
        # OpenCV's own worker pool would put resize and colour conversion on every core, on top of the
        # feeder thread and ONNX Runtime's threads: one OpenCV thread, the pipeline parallelises by stage.
        cv2 = _cv.cv2()
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            if out:
                sinks.append(JsonlSink(out, fsync_every=fsync_every))
            if show:
                from edgeclf.runtime.overlay import OverlayWindow

                sinks.append(OverlayWindow())
            if record:
                from edgeclf.runtime.sinks import VideoRecorderSink

                size = src.size or (m.preprocess.size[0], m.preprocess.size[1])
                sinks.append(VideoRecorderSink(record, float(src.fps or 15.0), size))
            sinks.append(clip)
            summary = run_pipeline(b, src, be, sinks, max_frames=max_frames, options=opts, stop=stop)
        finally:
            restore()
            cv2.setNumThreads(cv_threads)
            for s in sinks:
                s.close()
        result = summary.to_dict()
        result.update(
            bundle=str(b.path), bundle_checksum=b.checksum, source_kind=src.kind, backend=be.name, model=variant,
            frame_count_claimed=src.frame_count, out=out, clip=clip.result, threads=getattr(be, "threads", threads),
            device=device, chosen_by=chosen,
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
