"""TensorRT engines built on the device, cached per user, never loaded when anything they were built for changed.

Everything here but `build_with_polygraphy` (and what it calls) is pure Python and tested without TensorRT:
the cache folder, the cache key and its invalidation, precision and DLA choices, the equivalent `trtexec`
command per TensorRT version, progress output. TensorRT and Polygraphy are imported only inside the functions
that build or load an engine; importing this module imports neither.

Cache key: (device profile, TensorRT version, compute capability, precision, DLA core, bundle checksum). The
engine file's name holds the key's digest and a metadata JSON beside it records the key and the engine's sha256;
an engine whose metadata names another key, or whose bytes no longer hash to the recorded value, is rebuilt
with a message, never loaded.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from edgeclf.errors import BundleError, ConfigError, MissingExtraError
from edgeclf.runtime.bundle import _read_checked, sha256_file

__all__ = [
    "ENGINE_CACHE_ENV", "EngineKey", "EngineCache", "Lookup", "EnginePlan", "EngineRecord", "Heartbeat",
    "cache_dir", "plan_engine", "resolve_precision", "check_dla", "trtexec_command", "ensure_engine",
    "build_engine", "build_with_polygraphy", "require_tensorrt", "tensorrt_missing", "TENSORRT_INSTALL_HINT", "trtexec_for",
]

log = logging.getLogger(__name__)
ENGINE_CACHE_ENV = "EDGECLF_ENGINE_CACHE"
FORMAT = "edgeclf-engine"
KEY_FIELDS = ("device", "tensorrt", "compute_capability", "precision", "dla_core", "bundle_checksum")
TENSORRT_INSTALL_HINT = (
    "install TensorRT's Python bindings (on a Jetson JetPack's python3-libnvinfer: `sudo apt install python3-libnvinfer`, "
    "for the system python3; on x86 `pip install tensorrt`) and `pip install polygraphy`"
)
Progress = Callable[[str], None]


# -- TensorRT availability --------------------------------------------------------------------------------

def tensorrt_missing() -> Optional[str]:
    """Why the native TensorRT backend cannot run here (None when it can), without importing anything."""
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ValueError, ImportError):  # sys.modules[name] is None: import blocked (tests do this)
            return True

    missing = [m for m in ("tensorrt", "polygraphy") if absent(m)]
    return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not importable" if missing else None


def require_tensorrt() -> Tuple[Any, Any]:
    """(tensorrt, polygraphy), or one MissingExtraError line naming what to install."""
    why = tensorrt_missing()
    if why is None:
        try:
            import polygraphy
            import tensorrt as trt

            return trt, polygraphy
        except (ImportError, OSError) as exc:  # bindings present but libnvinfer missing or mismatched
            why = f"importing it failed ({str(exc).splitlines()[0]})"
    raise MissingExtraError(f"TensorRT is not available here ({why}); {TENSORRT_INSTALL_HINT}")


# -- cache folder and key --------------------------------------------------------------------------------

def cache_dir(flag: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> Path:
    """Where engines live: --engine-cache, else $EDGECLF_ENGINE_CACHE, else $XDG_CACHE_HOME/edgeclf/engines,
    else ~/.cache/edgeclf/engines (per user: engines are built for one machine, not shipped)."""
    e = os.environ if env is None else env
    if flag:
        return Path(flag).expanduser()
    if e.get(ENGINE_CACHE_ENV):
        return Path(e[ENGINE_CACHE_ENV]).expanduser()
    xdg = e.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and os.path.isabs(os.path.expanduser(xdg)) else Path(e.get("HOME") or Path.home()) / ".cache"
    return base / "edgeclf" / "engines"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine is only valid for. dla_core None: GPU only."""

    device: str
    tensorrt: str
    compute_capability: str
    precision: str
    dla_core: Optional[int]
    bundle_checksum: str

    def fields(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in KEY_FIELDS}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode("utf-8")).hexdigest()

    def differences(self, other: Mapping[str, Any]) -> List[str]:
        """'name: recorded -> wanted' for each key part that differs from a recorded key."""
        return [f"{k}: {other.get(k)!r} -> {getattr(self, k)!r}" for k in KEY_FIELDS if other.get(k) != getattr(self, k)]

    @property
    def stem(self) -> str:
        dla = f"-dla{self.dla_core}" if self.dla_core is not None else ""
        return f"{self.device}-{self.precision}{dla}-{self.digest()[:20]}"


@dataclass(frozen=True)
class Lookup:
    """status: "hit" (use it), "missing" (build), "stale" (rebuild: `reason` says why)."""

    status: str
    engine_path: Path
    meta_path: Path
    reason: str = ""
    meta: Optional[Dict[str, Any]] = None


class EngineCache:
    """Engines and their metadata in one folder: STEM.engine + STEM.json, STEM from the key's digest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def paths(self, key: EngineKey) -> Tuple[Path, Path]:
        return self.root / f"{key.stem}.engine", self.root / f"{key.stem}.json"

    def timing_cache_path(self, tensorrt: str, compute_capability: str) -> Path:
        # Timing caches hold per-GPU, per-TensorRT kernel timings: one per pair.
        return self.root / f"timing-trt{tensorrt}-sm{compute_capability.replace('.', '')}.cache"

    def _meta(self, path: Path) -> Optional[Dict[str, Any]]:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None

    def lookup(self, key: EngineKey) -> Lookup:
        engine, meta_path = self.paths(key)
        if not engine.exists() and not meta_path.exists():
            return Lookup("missing", engine, meta_path, self._previous(key))
        if not engine.is_file():
            return Lookup("stale", engine, meta_path, f"{engine.name} is missing but its metadata is there")
        meta = self._meta(meta_path)
        if meta is None:
            return Lookup("stale", engine, meta_path, f"{meta_path.name} is missing or unreadable: how {engine.name} was built is unknown")
        recorded: Dict[str, Any] = meta["key"] if isinstance(meta.get("key"), dict) else {}
        diffs = key.differences(recorded)
        if diffs:
            return Lookup("stale", engine, meta_path, f"{engine.name} was built for another key ({'; '.join(diffs)})", meta)
        digest = sha256_file(engine)
        if digest != meta.get("engine_sha256"):
            return Lookup("stale", engine, meta_path,
                          f"{engine.name} hashes to {digest[:12]}..., not the recorded {str(meta.get('engine_sha256'))[:12]}... "
                          "(changed or truncated)", meta)
        return Lookup("hit", engine, meta_path, "", meta)

    def _previous(self, key: EngineKey) -> str:
        """Why an engine built for this bundle/device/precision before does not fit now (a JetPack upgrade ...)."""
        if not self.root.is_dir():
            return ""
        same = ("device", "precision", "dla_core", "bundle_checksum")
        for p in sorted(self.root.glob("*.json")):
            meta = self._meta(p)
            rec = (meta or {}).get("key")
            if isinstance(rec, dict) and all(rec.get(k) == getattr(key, k) for k in same):
                return f"the cached engine {p.with_suffix('.engine').name} does not fit ({'; '.join(key.differences(rec))})"
        return ""

    def store(self, key: EngineKey, data: bytes, info: Mapping[str, Any]) -> Tuple[Path, Dict[str, Any]]:
        """Write the engine, then its metadata, each atomically (a crash leaves no half engine that looks valid)."""
        self.root.mkdir(parents=True, exist_ok=True)
        engine, meta_path = self.paths(key)
        tmp = engine.with_name(f".{engine.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, engine)
        meta = {"format": FORMAT, "version": 1, "key": key.fields(), "key_digest": key.digest(), "engine_file": engine.name,
                "engine_sha256": hashlib.sha256(data).hexdigest(), "engine_bytes": len(data),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **dict(info)}
        tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        os.replace(tmp_meta, meta_path)
        return engine, meta


# -- what to build ---------------------------------------------------------------------------------------------

def check_dla(profile: Any, dla_core: Optional[int]) -> None:
    """Refuse --dla where the profile has no such core (Orin Nano has none)."""
    if dla_core is None:
        return
    if profile.dla_cores == 0:
        raise ConfigError(f"--dla {dla_core}: device profile {profile.name} has no DLA cores; leave --dla out to build for the GPU")
    if not 0 <= dla_core < profile.dla_cores:
        raise ConfigError(f"--dla {dla_core}: device profile {profile.name} has DLA cores 0-{profile.dla_cores - 1}; give one of them")


def resolve_precision(requested: str, profile: Any, variants: Sequence[Any], dla_core: Optional[int] = None) -> Tuple[str, str, str]:
    """(precision, source model id, reason). fp32 and fp16 build from the fp32 ONNX (TensorRT chooses fp16 kernels);
    int8 builds from the bundle's symmetric QDQ variant (explicit quantization: the calibration edgeclf did on
    real data, no TensorRT calibrator). auto: int8 when the bundle has that variant and the profile runs int8,
    else fp16 where supported, else fp32. DLA runs fp16 or int8 only."""
    allowed = ("fp32", "fp16", "int8", "auto")
    if requested not in allowed:
        raise ConfigError(f"--precision {requested!r} is unknown; allowed: {', '.join(allowed)}")
    has_qdq = any(getattr(v, "id", None) == "int8-tensorrt" for v in variants)
    if requested == "auto":
        if has_qdq and "int8" in profile.precisions:
            precision, reason = "int8", "auto: the bundle has a gated int8-tensorrt variant and the profile runs int8"
        elif "fp16" in profile.precisions:
            precision, reason = "fp16", "auto: " + ("no int8-tensorrt variant in the bundle; " if not has_qdq else "") + "fp16 on this profile"
        else:
            precision, reason = "fp32", f"auto: profile {profile.name} runs neither int8 nor fp16 through TensorRT"
    else:
        precision, reason = requested, "requested"
    if precision not in profile.precisions:
        raise ConfigError(f"--precision {precision}: device profile {profile.name} runs {', '.join(profile.precisions)}; choose one of them")
    if precision == "int8" and not has_qdq:
        raise BundleError("--precision int8 needs the bundle's symmetric int8-tensorrt variant (explicit QDQ), which this bundle "
                          "lacks; re-export it with `edgeclf export --precision int8` (or auto --device ...), or build fp16")
    if dla_core is not None and precision == "fp32":
        if requested == "auto":
            raise ConfigError(f"--dla {dla_core}: DLA runs fp16 or int8 and profile {profile.name} offers neither; leave --dla out")
        raise ConfigError(f"--dla {dla_core} with --precision fp32: DLA runs fp16 or int8; give --precision fp16 or int8")
    return precision, ("int8-tensorrt" if precision == "int8" else "fp32"), reason


@dataclass(frozen=True)
class EnginePlan:
    """What one engine is built from: the ONNX file, its input, the batch profile, precision and DLA."""

    device: str
    onnx_path: Path
    source_model: str  # "fp32" or "int8-tensorrt"
    input_name: str
    input_shape: Tuple[int, int, int]  # (C, H, W)
    precision: str
    precision_reason: str
    dla_core: Optional[int]
    workspace_mb: int
    max_batch: int
    opt_batch: int
    bundle_path: Path
    bundle_name: str
    bundle_checksum: str
    # sha256 of the ONNX file as verified when the bundle was loaded (None: loaded without verification). The
    # builder parses the bytes it reads only if they still hash to it: what TensorRT builds is what was verified.
    onnx_sha256: Optional[str] = None

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        c, h, w = self.input_shape
        return {"min": (1, c, h, w), "opt": (self.opt_batch, c, h, w), "max": (self.max_batch, c, h, w)}


def plan_engine(bundle: Any, profile: Any, *, precision: str = "auto", dla_core: Optional[int] = None,
                workspace_mb: Optional[int] = None, max_batch: int = 8, opt_batch: int = 1) -> EnginePlan:
    """Decide everything about an engine without TensorRT (validates --dla, --precision, --workspace, batch)."""
    if profile.accelerator not in ("jetson", "nvidia-gpu"):
        raise ConfigError(f"device profile {profile.name} has no NVIDIA GPU ({profile.accelerator}); TensorRT engines are built on "
                          "jetson-* and x86-nvidia-gpu devices; give --device with --print-trtexec to see the command for one")
    check_dla(profile, dla_core)
    if workspace_mb is not None and workspace_mb < 1:
        raise ConfigError(f"--workspace {workspace_mb}: give the builder workspace in MiB (at least 1)")
    if max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise ConfigError(f"batch profile 1/{opt_batch}/{max_batch} (min/opt/max) is not ordered; give 1 <= opt <= max")
    m = bundle.manifest
    prec, source, reason = resolve_precision(precision, profile, m.variants, dla_core)
    onnx = bundle.model_path if source == "fp32" else bundle.path / next(v.file for v in m.variants if v.id == source)
    digests: Mapping[str, str] = getattr(bundle, "digests", None) or {}
    return EnginePlan(
        device=profile.name, onnx_path=Path(onnx), source_model=source, input_name=m.input_name,
        input_shape=(int(m.preprocess.channels), int(m.preprocess.size[0]), int(m.preprocess.size[1])),
        precision=prec, precision_reason=reason, dla_core=dla_core,
        workspace_mb=int(workspace_mb or profile.workspace_mb or 1024), max_batch=max_batch, opt_batch=opt_batch,
        bundle_path=Path(bundle.path), bundle_name=str(m.raw.get("name", Path(bundle.path).name)), bundle_checksum=bundle.checksum,
        onnx_sha256=digests.get(Path(onnx).name),
    )


# -- trtexec ------------------------------------------------------------------------------------------------------

def trtexec_command(plan: EnginePlan, *, tensorrt: str, save_engine: str, timing_cache: Optional[str] = None) -> List[str]:
    """The trtexec invocation that builds the same engine, for TensorRT `tensorrt` ("8.5.2", "8.6", "10.3").

    Flags as documented by trtexec's own help (NVIDIA/TensorRT samples/common/sampleOptions.cpp, 8.x and 10.x
    branches; samples/trtexec/README.md examples 2 and 3):
    - workspace: 8.4+ deprecates `--workspace=N` for `--memPoolSize=workspace:N` (N in MiB, a bare number in 8.x);
      10.x drops `--workspace` and takes a unit suffix, default MiB, so `workspace:NM` is explicit.
    - `--fp16`, `--int8` "enable ... in addition to fp32". The 8.x developer guide requires the INT8 flag for
      any quantized (Q/DQ) network; 10.x honours Q/DQ either way and still accepts `--int8` (deprecated in favour
      of `--stronglyTyped` only in late 10.x), so it is passed for both.
    - DLA: `--useDLACore=N --allowGPUFallback` (README example 2).
    - `--minShapes/--optShapes/--maxShapes=input:BxCxHxW` for the batch axis (README example 3).
    - `--saveEngine=<file>`, `--timingCacheFile=<file>` (save/load the timing cache).
    No `--skipInference`: 8.4 names it `--buildOnly`; trtexec then also times the engine, which is harmless.
    """
    try:
        major = int(str(tensorrt).split(".")[0])
    except ValueError:
        raise ConfigError(f"TensorRT version {tensorrt!r} is not a version; give e.g. 8.6 or 10.3") from None
    if major < 8:
        raise ConfigError(f"TensorRT {tensorrt}: edgeclf writes trtexec commands for 8.x and 10.x (JetPack 5 and 6)")
    shapes = plan.shapes()
    cmd = ["trtexec", f"--onnx={plan.onnx_path}"]
    for which in ("min", "opt", "max"):
        cmd.append(f"--{which}Shapes={plan.input_name}:{'x'.join(str(v) for v in shapes[which])}")
    if plan.precision == "fp16":
        cmd.append("--fp16")
    elif plan.precision == "int8":
        cmd.append("--int8")
    cmd.append(f"--memPoolSize=workspace:{plan.workspace_mb}" + ("M" if major >= 10 else ""))
    if plan.dla_core is not None:
        cmd += [f"--useDLACore={plan.dla_core}", "--allowGPUFallback"]
    cmd.append(f"--saveEngine={save_engine}")
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


# -- progress -------------------------------------------------------------------------------------------------------

class Heartbeat:
    """Calls `progress` every `every_s` seconds while a long step runs, so a minutes-long build is never silent."""

    def __init__(self, progress: Progress, what: str, every_s: float = 15.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._progress, self._what, self._every = progress, what, every_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.beats = 0

    def __enter__(self) -> Heartbeat:
        self._t0 = self._clock()
        self._thread = threading.Thread(target=self._run, name="edgeclf-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.beats += 1
            self._progress(f"{self._what}: {self._clock() - self._t0:.0f} s so far")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# -- building -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineRecord:
    """An engine ready to load: its path, metadata, and whether this call built it (and why)."""

    path: Path
    meta: Dict[str, Any]
    key: EngineKey
    built: bool
    reason: str = ""
    plan: Optional[EnginePlan] = None
    messages: Tuple[str, ...] = field(default_factory=tuple)


Builder = Callable[[EnginePlan, Path, Progress], Tuple[bytes, Dict[str, Any]]]


def ensure_engine(plan: EnginePlan, cache: EngineCache, *, tensorrt: str, compute_capability: str, builder: Builder,
                  rebuild: bool = False, progress: Optional[Progress] = None) -> EngineRecord:
    """The cached engine for `plan` when it is valid, else a freshly built one (with a message saying why)."""
    say = progress or (lambda msg: log.info("%s", msg))
    key = EngineKey(plan.device, str(tensorrt), str(compute_capability), plan.precision, plan.dla_core, plan.bundle_checksum)
    found = cache.lookup(key)
    messages: List[str] = []
    if found.status == "hit" and not rebuild:
        assert found.meta is not None
        return EngineRecord(found.engine_path, found.meta, key, built=False, plan=plan)
    if found.status == "stale":
        why = f"rebuilding: {found.reason}"
        log.warning("%s", why)
    elif rebuild:
        why = "rebuilding as asked (--rebuild)"
    else:
        why = "no cached engine for this key" + (f"; {found.reason}" if found.reason else "")
    messages.append(why)
    say(why)
    timing = cache.timing_cache_path(str(tensorrt), str(compute_capability))
    cache.root.mkdir(parents=True, exist_ok=True)
    say(f"building {plan.precision} engine for {plan.device} (TensorRT {tensorrt}, compute {compute_capability}"
        + (f", DLA core {plan.dla_core} with GPU fallback" if plan.dla_core is not None else "") + f") from {plan.onnx_path.name}")
    t0 = time.perf_counter()
    with Heartbeat(say, "building the engine (TensorRT times kernels; minutes on a Jetson)"):
        data, report = builder(plan, timing, say)
    seconds = round(time.perf_counter() - t0, 1)
    info = {
        "bundle": {"path": str(plan.bundle_path), "name": plan.bundle_name, "checksum": plan.bundle_checksum},
        "source_model": {"file": plan.onnx_path.name, "variant": plan.source_model,
                         "sha256": plan.onnx_sha256 or sha256_file(plan.onnx_path)},
        "build": {"seconds": seconds, "precision_reason": plan.precision_reason, "workspace_mb": plan.workspace_mb,
                  "input": plan.input_name, "shapes": {k: list(v) for k, v in plan.shapes().items()},
                  "timing_cache": str(timing), **report},
    }
    path, meta = cache.store(key, data, info)
    fell_back = report.get("dla_gpu_fallback_layers") or []
    if plan.dla_core is not None:
        msg = (f"DLA core {plan.dla_core}: {len(fell_back)} layer(s) fell back to the GPU: {', '.join(fell_back[:10])}"
               + (" ..." if len(fell_back) > 10 else "") if fell_back else f"DLA core {plan.dla_core}: every layer runs on the DLA")
        messages.append(msg)
        say(msg)
    say(f"engine written: {path} ({len(data) / 1e6:.1f} MB, {seconds} s)")
    return EngineRecord(path, meta, key, built=True, reason=why, plan=plan, messages=tuple(messages))


def build_with_polygraphy(plan: EnginePlan, timing_cache: Path, progress: Progress) -> Tuple[bytes, Dict[str, Any]]:
    """Build with NVIDIA's Polygraphy loaders (TensorRT 8.5+ / 10.x). NOT RUN by this project's CI: no TensorRT there.

    NetworkFromOnnxBytes -> CreateConfig(fp16/int8, one batch profile, workspace pool, timing cache, DLA with GPU
    fallback) -> EngineBytesFromNetwork(save_timing_cache=...). INT8 comes from the QDQ model's own scales, so
    no calibrator is given. Layers that cannot run on the DLA are listed through IBuilderConfig.can_run_on_DLA.
    The ONNX is read once and parsed from those bytes (OnnxParser.parse), after checking them against the digest
    verified with the bundle (plan.onnx_sha256): never re-opened by path.
    """
    trt, _ = require_tensorrt()
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxBytes,
        PostprocessConfig,
        Profile,
    )

    shapes = plan.shapes()
    profile = Profile().add(plan.input_name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    kwargs: Dict[str, Any] = dict(
        fp16=plan.precision == "fp16", int8=plan.precision == "int8", profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(plan.workspace_mb) << 20},
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
        use_dla=plan.dla_core is not None, allow_gpu_fallback=plan.dla_core is not None,
    )
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        kwargs["progress_monitor"] = monitor
    config: Any = CreateConfig(**kwargs)
    fallback: List[str] = []
    if plan.dla_core is not None:
        core = int(plan.dla_core)

        def on_dla(_builder: Any, network: Any, cfg: Any) -> None:
            cfg.DLA_core = core  # CreateConfig(use_dla=True) always picks core 0
            fallback.extend(network.get_layer(i).name for i in range(network.num_layers)
                            if not cfg.can_run_on_DLA(network.get_layer(i)))

        config = PostprocessConfig(config, on_dla)
    onnx_bytes = _read_checked(plan.onnx_path, plan.onnx_sha256, plan.onnx_path.name, model=True)
    data = EngineBytesFromNetwork(NetworkFromOnnxBytes(onnx_bytes), config=config, save_timing_cache=str(timing_cache))()
    del onnx_bytes
    import polygraphy

    return bytes(data), {"dla_gpu_fallback_layers": fallback, "tensorrt": trt.__version__, "polygraphy": polygraphy.__version__}


def _progress_monitor(trt: Any, progress: Progress) -> Any:
    """A TensorRT IProgressMonitor reporting build phases (TensorRT 10); None where TensorRT has none."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()  # TensorRT's pybind11 base must be initialised

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            if parent_phase is None:
                progress(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            pass

    return _Monitor()


def tensorrt_runtime_facts(profile: Any) -> Tuple[str, str]:
    """(installed TensorRT version, compute capability): the profile's capability, else the GPU's via NVML."""
    trt, _ = require_tensorrt()
    cc = profile.compute_capability
    if cc is None:
        from edgeclf.devices.detect import query_gpus

        gpus, how = query_gpus()
        cc = next((g["compute_capability"] for g in gpus if g.get("compute_capability")), None)
        if cc is None:
            from edgeclf.errors import BackendError

            raise BackendError(f"the GPU's compute capability is unknown ({how}); engines are keyed by it: install pynvml or a "
                               "driver whose nvidia-smi reports compute_cap")
    return str(trt.__version__), str(cc)


def build_engine(bundle_path: str, *, device: str, precision: str = "auto", dla_core: Optional[int] = None,
                 workspace_mb: Optional[int] = None, cache: Optional[str] = None, max_batch: int = 8, rebuild: bool = False,
                 progress: Optional[Progress] = None, builder: Optional[Builder] = None) -> EngineRecord:
    """`edgeclf build-engine`: validate the request, then build (or reuse) the engine in the per-user cache."""
    from edgeclf.devices import load_profile
    from edgeclf.runtime.bundle import load_bundle

    profile = load_profile(device)
    plan = plan_engine(load_bundle(bundle_path), profile, precision=precision, dla_core=dla_core, workspace_mb=workspace_mb,
                       max_batch=max_batch)
    version, cc = tensorrt_runtime_facts(profile)
    return ensure_engine(plan, EngineCache(cache_dir(cache)), tensorrt=version, compute_capability=cc,
                         builder=builder or build_with_polygraphy, rebuild=rebuild, progress=progress)


def trtexec_for(bundle_path: str, *, device: str, precision: str = "auto", dla_core: Optional[int] = None,
                workspace_mb: Optional[int] = None, max_batch: int = 8, cache: Optional[str] = None,
                tensorrt: Optional[str] = None) -> Dict[str, Any]:
    """`build-engine --print-trtexec`: the trtexec command for the profile's TensorRT (or `tensorrt`), writing where
    edgeclf's cache would keep that engine. Needs no TensorRT."""
    from edgeclf.devices import load_profile
    from edgeclf.runtime.bundle import load_bundle

    prof = load_profile(device)
    plan = plan_engine(load_bundle(bundle_path), prof, precision=precision, dla_core=dla_core, workspace_mb=workspace_mb,
                       max_batch=max_batch)
    version = tensorrt or prof.tensorrt
    if version is None:
        raise ConfigError(f"device profile {device} names no TensorRT version; give --trt-version (e.g. 8.6 or 10.3)")
    cc = prof.compute_capability or "unknown"  # x86-nvidia-gpu: the GPU's, known only on the machine
    cache_ = EngineCache(cache_dir(cache))
    key = EngineKey(device, version, cc, plan.precision, dla_core, plan.bundle_checksum)
    cmd = trtexec_command(plan, tensorrt=version, save_engine=str(cache_.paths(key)[0]),
                          timing_cache=str(cache_.timing_cache_path(version, cc)))
    return {"command": cmd, "tensorrt": version, "precision": plan.precision, "precision_reason": plan.precision_reason,
            "device": device}
