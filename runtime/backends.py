"""Inference backends. `Backend.infer` validates the input and times the call; subclasses implement `_infer`."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import BackendError, ProviderUnavailableError, require

if TYPE_CHECKING:
    from edgeclf.runtime.bundle import Bundle

__all__ = ["Backend", "OrtBackend", "FakeBackend", "create_backend", "BACKENDS", "default_threads", "available_backends",
           "BackendOptions", "backend_availability", "choose_backend", "ort_provider_options"]

log = logging.getLogger(__name__)
# trt: a native TensorRT engine (edgeclf.runtime.trt); the rest are ONNX Runtime execution providers.
BACKENDS = ("ort-cpu", "ort-cuda", "ort-tensorrt", "trt")
_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclass(frozen=True)
class BackendOptions:
    """What GPU backends need beyond the model file. device: the device profile (None: detected, for trt);
    precision: what the model/engine runs ("fp32", "fp16", "int8"; None: the bundle's or engine's default);
    dla_core: a DLA core (Jetson); workspace_mb: TensorRT builder workspace; engine_cache: the engine folder
    (None: $EDGECLF_ENGINE_CACHE or ~/.cache/edgeclf/engines); max_batch: the engine's largest batch."""

    device: Optional[str] = None
    precision: Optional[str] = None
    dla_core: Optional[int] = None
    workspace_mb: Optional[int] = None
    engine_cache: Optional[str] = None
    max_batch: int = 8


def default_threads() -> int:
    """Threads for intra-op work: the cores this process may use (oversubscription costs 3-7x here)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Backend:
    """Template: public `infer` checks shape and dtype, times the call; `_infer` does the work.

    input_shape is (C, H, W); the batch axis is free.
    """

    name = "backend"

    def __init__(self, input_shape: Tuple[int, int, int], num_outputs: Optional[int]) -> None:
        self.input_shape = tuple(int(v) for v in input_shape)
        # None: not known yet (an imported model being inspected); the output shape is then not checked.
        self.num_outputs = None if num_outputs is None else int(num_outputs)
        self.last_ms = 0.0
        self._closed = False

    def infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """(N, C, H, W) float32 -> (N, K) float32 logits, an array the caller owns: a backend whose runner reuses
        its output buffers (Polygraphy's) copies, so results of earlier calls stay as they were."""
        if self._closed:
            raise BackendError(f"{self.name} backend is closed")
        if x.dtype != np.float32 or x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise BackendError(
                f"input {x.dtype}{tuple(x.shape)} does not match the model's float32(N, {', '.join(map(str, self.input_shape))})"
            )
        t0 = time.perf_counter()
        out = self._infer(np.ascontiguousarray(x))
        self.last_ms = (time.perf_counter() - t0) * 1000.0
        if self.num_outputs is not None and out.shape != (x.shape[0], self.num_outputs):
            raise BackendError(f"{self.name} returned shape {out.shape}; expected {(x.shape[0], self.num_outputs)}")
        return out

    def _infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OrtBackend(Backend):
    """ONNX Runtime on any execution provider.

    model_bytes: the model itself (a bundle's verified bytes, `Bundle.read_model`); model_path then only names it in
    messages. Without it the session opens model_path (a file outside any bundle, e.g. the exporter's own).
    """

    name = "ort"

    def __init__(
        self,
        model_path: str,
        input_shape: Tuple[int, int, int],
        num_outputs: Optional[int],
        *,
        backend: str = "ort-cpu",
        threads: Optional[int] = None,
        spinning: bool = False,
        provider_options: Optional[Dict[str, str]] = None,
        model_bytes: Optional[bytes] = None,
        max_batch: Optional[int] = None,
    ) -> None:
        super().__init__(input_shape, num_outputs)
        # The largest batch per run() (the TensorRT EP's profile max): larger batches are split, never a rebuild.
        self.max_batch = int(max_batch) if max_batch else None
        ort: Any = require("onnxruntime", "ort")
        if backend not in _PROVIDERS:
            raise BackendError(f"backend {backend!r} is not an ONNX Runtime backend; allowed: {', '.join(_PROVIDERS)}")
        wanted = _PROVIDERS[backend]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendError(
                f"backend {backend} needs {wanted[0]}, which this onnxruntime does not have (it has {', '.join(available)}); "
                "use --backend ort-cpu or install an onnxruntime build with that provider"
            )
        self.name = backend
        so = ort.SessionOptions()
        self.threads = int(threads) if threads else default_threads()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers steal the cores that capture and preprocessing threads need.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        providers: List[Any] = [p for p in wanted if p in available]
        if provider_options:
            providers[0] = (providers[0], dict(provider_options))
        self.provider_options = dict(provider_options or {})
        t0 = time.perf_counter()
        try:
            model: Any = str(model_path) if model_bytes is None else model_bytes
            self._session = ort.InferenceSession(model, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendError(f"onnxruntime could not load {model_path}: {str(exc).splitlines()[0]}") from None
        self.session_ms = (time.perf_counter() - t0) * 1000.0
        self.providers: List[str] = list(self._session.get_providers())
        if not self.providers or self.providers[0] != wanted[0]:
            # ORT lists a provider it was built with even when its libraries (CUDA, cuDNN, TensorRT) cannot load, and
            # then runs on the next one with only a warning: figures would carry this backend's name for a CPU run.
            got = self.providers[0] if self.providers else "none"
            del self._session
            raise ProviderUnavailableError(
                f"backend {backend} asked onnxruntime for {wanted[0]}, but the session runs on {got} (the provider's "
                f"libraries did not load, or it refused its options; onnxruntime's warning above says which); "
                "fix the install, or use --backend ort-cpu"
            )
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        self._output = self._session.get_outputs()[0].name
        # A model exported with a fixed batch takes exactly that many inputs per call.
        self.fixed_batch: Optional[int] = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None

    def _infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        step = self.fixed_batch or (min(len(x), self.max_batch) if self.max_batch else len(x))
        outs = []
        for i in range(0, len(x), max(step, 1)):
            chunk = x[i : i + step]
            n = len(chunk)
            if self.fixed_batch is not None and n < step:
                # A fixed-batch model takes exactly its batch (a single frame on a cart, a short last chunk): pad with
                # zeros and drop the padding's outputs, as the TensorRT backend does; inference is per image.
                chunk = np.concatenate([chunk, np.zeros((step - n,) + chunk.shape[1:], dtype=chunk.dtype)])
            try:
                outs.append(self._session.run([self._output], {self._input: chunk})[0][:n])
            except Exception as exc:  # onnxruntime's own error types: shape, type, provider failures
                raise BackendError(f"onnxruntime failed on an input of shape {chunk.shape}: {str(exc).splitlines()[0]}") from None
        out: NDArray[np.float32] = np.concatenate(outs) if len(outs) != 1 else outs[0]
        return out

    def _close(self) -> None:
        del self._session


class FakeBackend(Backend):
    """A backend computing `fn(x)` in numpy, for hermetic tests of everything around inference."""

    name = "fake"

    def __init__(
        self,
        input_shape: Tuple[int, int, int],
        num_outputs: int,
        fn: Optional[Callable[[NDArray[np.float32]], NDArray[np.float32]]] = None,
    ) -> None:
        super().__init__(input_shape, num_outputs)
        self._fn = fn

    def _infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._fn is not None:
            return self._fn(x)
        # Deterministic logits from per-channel means, so tests can predict them.
        means = x.mean(axis=(1, 2, 3)).astype(np.float32)
        return np.stack([means * (k + 1) for k in range(self.num_outputs or 1)], axis=1)


def backend_availability() -> Dict[str, Optional[str]]:
    """Every backend -> None when it can run here, else why not. Imports neither tensorrt nor polygraphy."""
    from edgeclf.errors import MissingExtraError, require
    from edgeclf.runtime.engine import tensorrt_missing

    out: Dict[str, Optional[str]] = {}
    have: Optional[set] = None  # type: ignore[type-arg]
    why = "onnxruntime is not installed (pip install 'edgeclf[ort]')"
    if importlib.util.find_spec("onnxruntime") is not None:
        try:  # installed but broken (a C extension that did not initialise): the reason, not a traceback
            have = set(require("onnxruntime", "ort").get_available_providers())
        except MissingExtraError as exc:
            why = str(exc)
    for b, providers in _PROVIDERS.items():
        if have is None:
            out[b] = why
        else:
            out[b] = None if providers[0] in have else f"this onnxruntime has no {providers[0]} (it has {', '.join(sorted(have))})"
    missing = tensorrt_missing()
    out["trt"] = None if missing is None else f"{missing} (TensorRT's Python bindings and polygraphy)"
    return out


def available_backends() -> List[str]:
    """The backends that can run here: ONNX Runtime providers this build has, and trt where TensorRT is importable."""
    return [b for b, why in backend_availability().items() if why is None]


def choose_backend(preferred: Sequence[str], availability: Dict[str, Optional[str]], *, profile: str) -> Tuple[str, List[str]]:
    """The first of a profile's preferred backends that can run here, and one line per backend passed over.

    Raises ConfigError when none can run: the user gives --backend or installs what is missing.
    """
    from edgeclf.errors import ConfigError

    skipped: List[str] = []
    for b in preferred:
        why = availability.get(b, "unknown backend")
        if why is None:
            return b, skipped
        skipped.append(f"{b}: {why}")
    raise ConfigError(f"device profile {profile} prefers {', '.join(preferred)}, none of which can run here ("
                      + "; ".join(skipped) + "); give --backend or install what is missing")


def _version_tuple(version: str) -> Tuple[int, ...]:
    """(1, 17, 0) from "1.17.0", "1.17.0rc1", "1.17.0+cu118"."""
    parts: List[int] = []
    for p in str(version).split(".")[:3]:
        digits = re.match(r"\d+", p)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


# trt_profile_{min,opt,max}_shapes came with onnxruntime PR #15546 (1.15); 1.16 is the floor edgeclf[ort] asks for.
# An option the EP does not know is not ignored: the Python binding raises "Invalid TensorRT EP option" and the session
# silently falls back to the CUDA EP, hence the version gate.
ORT_PROFILE_SHAPES_SINCE = (1, 16)


def ort_provider_options(backend: str, options: Optional[BackendOptions], *, model_sha256: Optional[str] = None,
                         input_name: Optional[str] = None, input_shape: Optional[Sequence[int]] = None,
                         ort_version: Optional[str] = None) -> Optional[Dict[str, str]]:
    """ONNX Runtime TensorRT execution provider options (onnxruntime.ai TensorRT-ExecutionProvider "Configurations"):
    fp16/int8 (int8 for the bundle's explicit-QDQ variant: TensorRT 8.x needs the flag for Q/DQ; fp16 with it, so
    that layers left unquantized do not run in fp32), engine and timing caches under the per-user engine folder (the
    EP keeps its timing cache in trt_engine_cache_path unless trt_timing_cache_path, an option only from 1.17, says
    otherwise), workspace, DLA, and an explicit batch profile. None for the other backends.

    DLA is checked as for --backend trt (the profile has the core; fp16 or int8, Q/DQ int8 only from TensorRT 10): the
    EP itself ignores trt_dla_enable without fp16/int8 and takes core 0 for a core it does not have, both silently.

    input_name, input_shape (C, H, W): the model's dynamic-batch input. With them the EP gets trt_profile_min/opt/max
    _shapes ("input:1x3x224x224", batch 1 .. max_batch; DLA: batch 1 fixed, DLA has no dynamic shapes) and builds its
    engine when the session is made, not at the first run() nor again when a larger batch arrives. Without them
    (a model outside a bundle, a fixed-batch model) none are given.

    model_sha256: the model's digest, for a model handed over as bytes: its engines get a folder of their own. The
    EP names an engine by a hash of the model's file name and node names, not its weights; with no file name two
    models of one architecture (another bundle, the fp16 variant) would share an engine."""
    if backend != "ort-tensorrt":
        return None
    from edgeclf.runtime.engine import cache_dir, check_dla, check_dla_precision, profile_for

    o = options or BackendOptions()
    if o.dla_core is not None:
        prof = profile_for(o.device, "--backend ort-tensorrt --dla")
        check_dla(prof, o.dla_core)
        check_dla_precision(o.precision, o.dla_core, prof.tensorrt, backend="ort-tensorrt")
    folder = cache_dir(o.engine_cache) / "ort-tensorrt"
    if model_sha256:
        folder = folder / model_sha256[:16]
    folder.mkdir(parents=True, exist_ok=True)
    opts = {
        "trt_fp16_enable": str(o.precision in ("fp16", "int8")),
        "trt_int8_enable": str(o.precision == "int8"),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(folder),
        "trt_timing_cache_enable": "True",
    }
    if o.workspace_mb:
        opts["trt_max_workspace_size"] = str(int(o.workspace_mb) << 20)
    if o.dla_core is not None:
        opts.update(trt_dla_enable="True", trt_dla_core=str(int(o.dla_core)))
    if input_name and input_shape is not None:
        if ort_version is None:
            ort_version = str(require("onnxruntime", "ort").__version__)
        if any(ch in input_name for ch in ",:"):
            log.warning("input name %r cannot be written in trt_profile_*_shapes; the TensorRT EP builds its engine at the first run",
                        input_name)
        elif _version_tuple(ort_version) < ORT_PROFILE_SHAPES_SINCE:
            log.warning("onnxruntime %s predates trt_profile_*_shapes (%s): the TensorRT EP builds its engine at the first run "
                        "and again for a larger batch", ort_version, ".".join(map(str, ORT_PROFILE_SHAPES_SINCE)))
        else:
            c, h, w = (int(v) for v in input_shape)
            top = 1 if o.dla_core is not None else max(1, int(o.max_batch))
            opts.update(trt_profile_min_shapes=f"{input_name}:1x{c}x{h}x{w}", trt_profile_opt_shapes=f"{input_name}:1x{c}x{h}x{w}",
                        trt_profile_max_shapes=f"{input_name}:{top}x{c}x{h}x{w}")
    return opts


def _profile_batch(opts: Optional[Dict[str, str]]) -> Optional[int]:
    """The batch the EP profile allows at most (None: no explicit profile)."""
    shape = (opts or {}).get("trt_profile_max_shapes")
    return int(shape.rsplit(":", 1)[1].split("x")[0]) if shape else None


def create_backend(
    bundle_model_path: str,
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    backend: str = "ort-cpu",
    threads: Optional[int] = None,
    options: Optional[BackendOptions] = None,
    bundle: Optional[Bundle] = None,
) -> Backend:
    """A backend for a model file of a bundle. trt builds (or reuses) an engine in the per-user cache.

    bundle: the loaded bundle the file belongs to. Give it: the model is then read once, checked against the
    digest verified when the bundle was loaded, and those bytes are what the session is made from, so a file
    changed after `load_bundle` is refused, never run. Without it the file is opened by path, unchecked.
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    c, h, w = (int(v) for v in input_shape)
    if backend == "trt":
        from edgeclf.runtime.trt import trt_backend_for_model

        return trt_backend_for_model(bundle_model_path, (c, h, w), num_outputs, options, bundle=bundle)
    if bundle is None:
        provider_options = ort_provider_options(backend, options)
        return OrtBackend(bundle_model_path, (c, h, w), num_outputs, backend=backend, threads=threads,
                          provider_options=provider_options, max_batch=_profile_batch(provider_options))
    m = bundle.manifest
    # Only the selected model's bytes, alive while the session is made (ONNX Runtime keeps its own copy of what it
    # needs): re-hashing on use costs one more read of one model and keeps every variant out of memory otherwise.
    data = bundle.read_model(bundle_model_path)
    digest = hashlib.sha256(data).hexdigest() if backend == "ort-tensorrt" else None
    batch_dim = ((m.raw.get("model") or {}).get("input_shape") or [None])[0]
    dynamic = not isinstance(batch_dim, int)  # an int: exported with a fixed batch, nothing to profile
    provider_options = ort_provider_options(backend, options, model_sha256=digest, input_name=m.input_name if dynamic else None,
                                            input_shape=(c, h, w))
    return OrtBackend(bundle_model_path, (c, h, w), num_outputs, backend=backend,
                      threads=threads, provider_options=provider_options, model_bytes=data,
                      max_batch=_profile_batch(provider_options))


