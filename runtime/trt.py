"""The native TensorRT backend (`--backend trt`): an engine from the per-user cache, run through Polygraphy's
TrtRunner (which owns the CUDA buffers and stream). No torch; TensorRT and Polygraphy are imported only when a
backend is created.

NOT RUN by this project's CI (no TensorRT, no GPU there): what is tested is everything around it, i.e. engine
choice and caching (runtime/engine.py), the error when TensorRT is missing, and the backend choice with fallback.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import BackendError, BundleError, ConfigError
from edgeclf.runtime.backends import Backend, BackendOptions
from edgeclf.runtime.engine import (
    EngineCache,
    EngineRecord,
    build_with_polygraphy,
    cache_dir,
    ensure_engine,
    plan_engine,
    require_tensorrt,
    tensorrt_runtime_facts,
)

__all__ = ["TrtBackend", "open_trt_engine", "trt_backend_for_model"]

log = logging.getLogger(__name__)


class TrtBackend(Backend):
    """A serialized engine run with Polygraphy's TrtRunner; batches above the engine's max are split."""

    name = "trt"

    def __init__(self, engine_path: str, input_shape: Tuple[int, int, int], num_outputs: Optional[int], *, max_batch: int,
                 record: Optional[EngineRecord] = None) -> None:
        super().__init__(input_shape, num_outputs)
        require_tensorrt()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.engine_path = str(engine_path)
        self.record = record
        # The engine's own batch profile wins: it may have been built with another --max-batch (not part of the key).
        shapes = ((record.meta.get("build") or {}).get("shapes") or {}) if record is not None else {}
        self.max_batch = int((shapes.get("max") or [max_batch])[0])
        self.threads = None  # inference runs on the GPU/DLA
        try:
            # Read once and deserialized from these bytes: the cache lookup hashed the file, and a file changed since
            # (another process rebuilding it) must not be what runs.
            data = Path(self.engine_path).read_bytes()
            want = record.meta.get("engine_sha256") if record is not None else None
            if want is not None and hashlib.sha256(data).hexdigest() != want:
                raise BackendError(f"the engine {self.engine_path} changed after it was checked (it no longer hashes to its "
                                   "recorded sha256); load it again, or rebuild it with `edgeclf build-engine --rebuild`")
            self._runner = TrtRunner(EngineFromBytes(data))
            del data
            self._runner.activate()
        except BackendError:
            raise
        except Exception as exc:  # TensorRT's own errors: a corrupt or foreign engine, no GPU, out of memory
            raise BackendError(f"TensorRT could not load the engine {self.engine_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                               "rebuild it with `edgeclf build-engine --rebuild`") from None
        meta = self._runner.get_input_metadata()
        self._input = next(iter(meta.keys()))

    def _infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        outs = []
        for i in range(0, len(x), self.max_batch):
            try:
                result: Dict[str, Any] = self._runner.infer(feed_dict={self._input: x[i : i + self.max_batch]})
            except Exception as exc:
                raise BackendError(f"TensorRT failed on an input of shape {x[i : i + self.max_batch].shape}: {exc}") from None
            # A copy: Polygraphy's runners reuse their host output buffers from one call to the next.
            outs.append(np.array(next(iter(result.values())), dtype=np.float32))
        return np.concatenate(outs) if len(outs) != 1 else outs[0]

    def _close(self) -> None:
        self._runner.deactivate()


def _profile_for(device: Optional[str]) -> Any:
    from edgeclf.devices import load_profile

    if device:
        return load_profile(device)
    from edgeclf.devices.detect import detect

    found = detect()
    if found.profile is None:
        raise ConfigError("--backend trt needs a device profile and none was detected here (" + "; ".join(found.reasons[-2:])
                          + "); give --device NAME (see `edgeclf devices list`)")
    log.info("device profile %s (detected): %s", found.profile, "; ".join(found.reasons))
    return load_profile(found.profile)


def open_trt_engine(bundle: Any, options: BackendOptions, progress: Any = None) -> EngineRecord:
    """The engine for a bundle on this device (building it into the cache when missing or stale)."""
    require_tensorrt()  # before anything else: the one line that names what to install
    profile = _profile_for(options.device)
    plan = plan_engine(bundle, profile, precision=options.precision or "auto", dla_core=options.dla_core,
                       workspace_mb=options.workspace_mb, max_batch=options.max_batch)
    version, cc = tensorrt_runtime_facts(profile)
    return ensure_engine(plan, EngineCache(cache_dir(options.engine_cache)), tensorrt=version, compute_capability=cc,
                         builder=build_with_polygraphy, progress=progress)


def trt_backend_for_model(model_path: str, input_shape: Tuple[int, int, int], num_outputs: Optional[int],
                          options: Optional[BackendOptions] = None, *, bundle: Any = None) -> TrtBackend:
    """`create_backend(..., backend="trt")` from a model file inside a bundle (as `profile` passes it): the bundle
    is its folder (loaded and verified here unless the loaded `bundle` is given), the precision that of the variant
    the file holds (unless options name one). An engine is built from the ONNX bytes verified with that bundle."""
    from edgeclf.runtime.bundle import load_bundle

    require_tensorrt()
    opts = options or BackendOptions()
    path = Path(model_path)
    if bundle is None:
        bundle = load_bundle(path.parent)
    m = bundle.manifest
    variant = next((v for v in m.variants if v.file == path.name), None)
    if variant is not None and variant.id == "int8-cpu":
        raise BundleError(f"{path.name} is the CPU INT8 form (unsigned activations), which TensorRT does not parse; "
                          "TensorRT runs the bundle's int8-tensorrt variant: ask for --precision int8 with --backend trt")
    precision = opts.precision or (variant.precision if variant is not None else "fp32")
    import dataclasses

    record = open_trt_engine(bundle, dataclasses.replace(opts, precision=precision))
    return TrtBackend(str(record.path), input_shape, num_outputs, max_batch=opts.max_batch, record=record)
