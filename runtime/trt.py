"""The native TensorRT backend (`--backend trt`): an engine from the per-user cache, deserialized by a TensorRT
runtime of our own (its DLA_core set for a DLA engine: a fresh runtime's is -1) and run through Polygraphy's
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

from edgeclf.errors import BackendError, BundleError
from edgeclf.runtime.backends import Backend, BackendOptions
from edgeclf.runtime.engine import (
    EngineCache,
    EngineRecord,
    build_with_polygraphy,
    cache_dir,
    check_dla,
    ensure_engine,
    plan_engine,
    profile_for,
    require_tensorrt,
    tensorrt_runtime_facts,
)

__all__ = ["TrtBackend", "open_trt_engine", "trt_backend_for_model"]

log = logging.getLogger(__name__)


class TrtBackend(Backend):
    """A serialized engine run with Polygraphy's TrtRunner; batches above the engine's max are split, and an engine
    of one fixed batch (DLA) gets a smaller batch padded, the padding's outputs dropped."""

    name = "trt"

    def __init__(self, engine_path: str, input_shape: Tuple[int, int, int], num_outputs: Optional[int], *, max_batch: int,
                 record: Optional[EngineRecord] = None) -> None:
        super().__init__(input_shape, num_outputs)
        trt, _ = require_tensorrt()
        from polygraphy.backend.trt import TrtRunner, get_trt_logger

        self.engine_path = str(engine_path)
        self.record = record
        # The engine's own batch profile wins: it may have been built with another --max-batch (not part of the key).
        shapes = ((record.meta.get("build") or {}).get("shapes") or {}) if record is not None else {}
        self.max_batch = int((shapes.get("max") or [max_batch])[0])
        low = (shapes.get("min") or [None])[0]
        self.fixed_batch: Optional[int] = self.max_batch if low is not None and int(low) == self.max_batch else None
        self.threads = None  # inference runs on the GPU/DLA
        dla_core = record.key.dla_core if record is not None else None
        try:
            # Read once and deserialized from these bytes: the cache lookup hashed the file, and a file changed since
            # (another process rebuilding it) must not be what runs.
            data = Path(self.engine_path).read_bytes()
            want = record.meta.get("engine_sha256") if record is not None else None
            if want is not None and hashlib.sha256(data).hexdigest() != want:
                raise BackendError(f"the engine {self.engine_path} changed after it was checked (it no longer hashes to its "
                                   "recorded sha256); load it again, or rebuild it with `edgeclf build-engine --rebuild`")
            logger = get_trt_logger()  # Polygraphy's global TensorRT logger, the one its builder used
            trt.init_libnvinfer_plugins(logger, "")
            # Our own runtime: older Polygraphy's EngineFromBytes takes none and makes one whose DLA_core is -1, and
            # IRuntime.DLA_core is "the DLA core that the engine executes on".
            self._trt_runtime = trt.Runtime(logger)
            if dla_core is not None:
                self._trt_runtime.DLA_core = int(dla_core)
            self._engine = self._trt_runtime.deserialize_cuda_engine(data)
            del data
            if self._engine is None:
                raise RuntimeError("deserialize_cuda_engine returned None (see TensorRT's log above)")
            self._runner = TrtRunner(self._engine)  # given an engine (not a loader), the runner does not own it
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
        fixed = self.fixed_batch
        for i in range(0, len(x), self.max_batch):
            chunk = x[i : i + self.max_batch]
            n = len(chunk)
            if fixed is not None and n < fixed:  # DLA: the runtime shape must be the built one
                chunk = np.concatenate([chunk, np.zeros((fixed - n,) + chunk.shape[1:], dtype=chunk.dtype)])
            try:
                result: Dict[str, Any] = self._runner.infer(feed_dict={self._input: chunk})
            except Exception as exc:
                raise BackendError(f"TensorRT failed on an input of shape {chunk.shape}: {exc}") from None
            # A copy: Polygraphy's runners reuse their host output buffers from one call to the next.
            outs.append(np.array(next(iter(result.values()))[:n], dtype=np.float32))
        return np.concatenate(outs) if len(outs) != 1 else outs[0]

    def _close(self) -> None:
        self._runner.deactivate()
        del self._runner, self._engine, self._trt_runtime  # the engine before the runtime that made it


def open_trt_engine(bundle: Any, options: BackendOptions, progress: Any = None) -> EngineRecord:
    """The engine for a bundle on this device (building it into the cache when missing or stale)."""
    require_tensorrt()  # before anything else: the one line that names what to install
    profile = profile_for(options.device)
    check_dla(profile, options.dla_core)
    version, cc, gpu = tensorrt_runtime_facts(profile)
    plan = plan_engine(bundle, profile, precision=options.precision or "auto", dla_core=options.dla_core,
                       workspace_mb=options.workspace_mb, max_batch=options.max_batch, tensorrt=version)
    return ensure_engine(plan, EngineCache(cache_dir(options.engine_cache)), tensorrt=version, compute_capability=cc, gpu=gpu,
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
