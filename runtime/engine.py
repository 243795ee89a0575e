"""TensorRT engines built on the device, cached per user, never loaded when anything they were built for changed.

Everything here but `build_with_polygraphy` (and what it calls) is pure Python and tested without TensorRT:
the cache folder, the cache key and its invalidation, precision and DLA choices, the equivalent `trtexec`
command per TensorRT version, progress output. TensorRT and Polygraphy are imported only inside the functions
that build or load an engine; importing this module imports neither.

Cache key: (device profile, TensorRT version, compute capability, GPU name, precision, DLA core, bundle checksum,
batch profile min/opt/max, workspace MiB).
The GPU name is that of CUDA device 0, the one TensorRT builds on and runs on: two card models of one compute
capability (an RTX A2000 and an RTX 3090) never share an engine. The engine file's name holds the key's digest and a metadata JSON beside it records the key and the engine's sha256;
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
    "cache_dir", "plan_engine", "resolve_precision", "check_dla", "check_dla_precision", "builder_flags", "trtexec_command",
    "ensure_engine", "profile_for", "cuda_device_name",
    "build_engine", "build_with_polygraphy", "require_tensorrt", "tensorrt_missing", "TENSORRT_INSTALL_HINT", "trtexec_for",
]

log = logging.getLogger(__name__)
ENGINE_CACHE_ENV = "EDGECLF_ENGINE_CACHE"
FORMAT = "edgeclf-engine"
# batch_profile and workspace_mb: an engine serves batches up to its max only, and was tuned within its workspace.
KEY_FIELDS = ("device", "tensorrt", "compute_capability", "gpu", "precision", "dla_core", "bundle_checksum", "batch_profile",
              "workspace_mb")
TENSORRT_INSTALL_HINT = (
    "install TensorRT's Python bindings (on a Jetson JetPack's python3-libnvinfer: `sudo apt install python3-libnvinfer`, "
    "for the system python3; on x86 `pip install \"tensorrt<11\"`) and `pip install polygraphy`"
)
# TensorRT 11 removed the weak-typing builder flags (BuilderFlag.FP16, BuilderFlag.INT8) and trtexec's --fp16/--int8
# that edgeclf's fp16 and int8 builds use; 8.x is JetPack 5, 10.x JetPack 6 and current x86 (9.x was a short release).
TENSORRT_MAJORS = (8, 9, 10)
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
    if missing:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not importable"
    # A pip-installed TensorRT edgeclf cannot build with (11.x): not usable, so automatic backend choice moves on.
    # JetPack's apt bindings carry no pip metadata: judged at import (require_tensorrt).
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python 3.8 has it
        return None
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"):
        try:
            installed = version(dist)
        except PackageNotFoundError:
            continue
        if _tensorrt_major(installed) not in TENSORRT_MAJORS:
            return f"TensorRT {installed} is installed; edgeclf builds with 8.x or 10.x"
        return None
    return None


def _tensorrt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return -1


def require_tensorrt() -> Tuple[Any, Any]:
    """(tensorrt, polygraphy), or one MissingExtraError line naming what to install."""
    why = tensorrt_missing()
    if why is None:
        try:
            import polygraphy
            import tensorrt as trt
        except (ImportError, OSError) as exc:  # bindings present but libnvinfer missing or mismatched
            why = f"importing it failed ({str(exc).splitlines()[0]})"
        else:
            _check_tensorrt_version(str(getattr(trt, "__version__", "")))
            return trt, polygraphy
    raise MissingExtraError(f"TensorRT is not available here ({why}); {TENSORRT_INSTALL_HINT}")


def _check_tensorrt_version(version: str) -> None:
    """MissingExtraError unless `version` is a TensorRT major edgeclf builds with (TENSORRT_MAJORS)."""
    if _tensorrt_major(version) not in TENSORRT_MAJORS:
        raise MissingExtraError(
            f"TensorRT {version or '(no version)'} is installed; edgeclf builds engines with TensorRT 8.x or 10.x (TensorRT 11 "
            f"removed the fp16 and int8 builder flags its builds use); {TENSORRT_INSTALL_HINT}"
        )


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
    """Everything an engine is only valid for. dla_core None: GPU only. gpu: the CUDA device's name ("" when it could
    not be read: an engine recorded without one is rebuilt once). batch_profile: "min/opt/max" batch of its
    optimisation profile; workspace_mb: the builder's workspace (an engine recorded without them is rebuilt once)."""

    device: str
    tensorrt: str
    compute_capability: str
    precision: str
    dla_core: Optional[int]
    bundle_checksum: str
    gpu: str = ""
    batch_profile: str = ""
    workspace_mb: int = 0

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


def _trt_major(version: Optional[str]) -> Optional[int]:
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


def dla_runs_qdq_int8(tensorrt: Optional[str]) -> bool:
    """Whether DLA runs an explicitly quantized (Q/DQ) INT8 network on this TensorRT (True when the version is unknown).
    Before TensorRT 10 (JetPack 5) DLA INT8 came from calibration or per-tensor dynamic ranges only, so NVIDIA's
    Deep-Learning-Accelerator-SW ships a qdq-translator that strips Q/DQ nodes into a calibration cache for DLA
    (and names JetPack 6's DLA stack as its minimum); a Q/DQ network's layers then run on the GPU instead."""
    major = _trt_major(tensorrt)
    return major is None or major >= 10


def check_dla_precision(precision: Optional[str], dla_core: Optional[int], tensorrt: Optional[str], *, backend: str = "trt") -> None:
    """Refuse DLA requests whose layers would silently run on the GPU: DLA runs fp16 or int8 only (ONNX Runtime's
    TensorRT EP ignores trt_dla_enable without fp16/int8), and not a Q/DQ int8 model before TensorRT 10."""
    if dla_core is None:
        return
    if precision not in ("fp16", "int8"):
        raise ConfigError(f"--dla {dla_core} with {precision or 'fp32'} on {backend}: DLA runs fp16 or int8 only (the layers would "
                          "silently run on the GPU); give --precision fp16 or int8")
    if precision == "int8" and not dla_runs_qdq_int8(tensorrt):
        raise ConfigError(f"--dla {dla_core} with int8 on TensorRT {tensorrt}: DLA runs the bundle's explicitly quantized (Q/DQ) "
                          "int8 model only from TensorRT 10 (JetPack 6); here it would silently run on the GPU: give --precision "
                          "fp16 for the DLA, or leave --dla out for int8 on the GPU")


def resolve_precision(requested: str, profile: Any, variants: Sequence[Any], dla_core: Optional[int] = None,
                      tensorrt: Optional[str] = None) -> Tuple[str, str, str]:
    """(precision, source model id, reason). fp32 and fp16 build from the fp32 ONNX (TensorRT chooses fp16 kernels);
    int8 builds from the bundle's symmetric QDQ variant (explicit quantization: the calibration edgeclf did on
    real data, no TensorRT calibrator). auto: int8 when the bundle has that variant and the profile runs int8,
    else fp16 where supported, else fp32. DLA runs fp16 or int8 only, and Q/DQ int8 only from TensorRT 10
    (`tensorrt`: the version the engine is for; None: not known yet)."""
    allowed = ("fp32", "fp16", "int8", "auto")
    if requested not in allowed:
        raise ConfigError(f"--precision {requested!r} is unknown; allowed: {', '.join(allowed)}")
    has_qdq = any(getattr(v, "id", None) == "int8-tensorrt" for v in variants)
    dla_no_qdq = dla_core is not None and not dla_runs_qdq_int8(tensorrt)
    if requested == "auto":
        if has_qdq and "int8" in profile.precisions and not dla_no_qdq:
            precision, reason = "int8", "auto: the bundle has a gated int8-tensorrt variant and the profile runs int8"
        elif "fp16" in profile.precisions:
            why = ("no int8-tensorrt variant in the bundle; " if not has_qdq
                   else f"DLA on TensorRT {tensorrt} does not run the Q/DQ int8 variant; " if dla_no_qdq and "int8" in profile.precisions
                   else "")
            precision, reason = "fp16", "auto: " + why + "fp16 on this profile"
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
    check_dla_precision(precision, dla_core, tensorrt)
    return precision, ("int8-tensorrt" if precision == "int8" else "fp32"), reason


def builder_flags(precision: str) -> Dict[str, bool]:
    """The builder precision flags for one precision, shared by the Polygraphy build, the trtexec command and the
    engine record. int8 also enables fp16: the builder flags allow precisions, and layers the Q/DQ model leaves
    unquantized would otherwise run in fp32, which DLA cannot run (GPU fallback). TF32 stays off (Polygraphy's
    CreateConfig clears it unless asked; trtexec enables it unless --noTF32): an fp32 engine computes in fp32."""
    return {"fp16": precision in ("fp16", "int8"), "int8": precision == "int8", "tf32": False}


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
        """The batch profile. DLA has no dynamic dimensions (its min, opt and max must be equal): a DLA engine has one
        fixed batch, opt_batch (1 unless asked), and the backend pads a smaller batch and splits a larger one."""
        c, h, w = self.input_shape
        if self.dla_core is not None:
            fixed = (self.opt_batch, c, h, w)
            return {"min": fixed, "opt": fixed, "max": fixed}
        return {"min": (1, c, h, w), "opt": (self.opt_batch, c, h, w), "max": (self.max_batch, c, h, w)}

    def batch_profile(self) -> str:
        """The engine key's "min/opt/max" batch (DLA: the one fixed batch three times)."""
        shapes = self.shapes()
        return "/".join(str(shapes[k][0]) for k in ("min", "opt", "max"))

    def key(self, tensorrt: str, compute_capability: str, gpu: str = "") -> EngineKey:
        return EngineKey(self.device, str(tensorrt), str(compute_capability), self.precision, self.dla_core,
                         self.bundle_checksum, str(gpu), self.batch_profile(), int(self.workspace_mb))


def plan_engine(bundle: Any, profile: Any, *, precision: str = "auto", dla_core: Optional[int] = None,
                workspace_mb: Optional[int] = None, max_batch: int = 8, opt_batch: int = 1,
                tensorrt: Optional[str] = None) -> EnginePlan:
    """Decide everything about an engine without TensorRT (validates --dla, --precision, --workspace, batch).
    tensorrt: the TensorRT version the engine is for, where known (DLA runs Q/DQ int8 only from 10)."""
    if profile.accelerator not in ("jetson", "nvidia-gpu"):
        raise ConfigError(f"device profile {profile.name} has no NVIDIA GPU ({profile.accelerator}); TensorRT engines are built on "
                          "jetson-* and x86-nvidia-gpu devices; give --device with --print-trtexec to see the command for one")
    check_dla(profile, dla_core)
    if workspace_mb is not None and workspace_mb < 1:
        raise ConfigError(f"--workspace {workspace_mb}: give the builder workspace in MiB (at least 1)")
    if max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise ConfigError(f"batch profile 1/{opt_batch}/{max_batch} (min/opt/max) is not ordered; give 1 <= opt <= max")
    m = bundle.manifest
    prec, source, reason = resolve_precision(precision, profile, m.variants, dla_core, tensorrt)
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
      of `--stronglyTyped` only in late 10.x), so it is passed for both. int8 also gets `--fp16` (`builder_flags`).
    - `--noTF32` "Disable tf32 precision (default is to enable tf32, in addition to fp32)": Polygraphy's
      CreateConfig clears TF32 unless asked, so the command builds what `build-engine` builds.
    - DLA: `--useDLACore=N --allowGPUFallback` (README example 2); min=opt=max shapes (DLA has no dynamic shapes).
    - `--minShapes/--optShapes/--maxShapes=input:BxCxHxW` for the batch axis (README example 3).
    - `--saveEngine=<file>`, `--timingCacheFile=<file>` (save/load the timing cache).
    No `--skipInference`: 8.4 names it `--buildOnly`; trtexec then also times the engine, which is harmless.
    """
    major = _tensorrt_major(str(tensorrt))
    if major < 0:
        raise ConfigError(f"TensorRT version {tensorrt!r} is not a version; give e.g. 8.6 or 10.3")
    if major not in TENSORRT_MAJORS:  # 11 has no --fp16/--int8 any more: the command would fail or build fp32
        raise ConfigError(f"TensorRT {tensorrt}: edgeclf writes trtexec commands for 8.x and 10.x (JetPack 5 and 6)")
    shapes = plan.shapes()
    cmd = ["trtexec", f"--onnx={plan.onnx_path}"]
    for which in ("min", "opt", "max"):
        cmd.append(f"--{which}Shapes={plan.input_name}:{'x'.join(str(v) for v in shapes[which])}")
    flags = builder_flags(plan.precision)
    cmd += [f"--{name}" for name in ("fp16", "int8") if flags[name]]
    if not flags["tf32"]:
        cmd.append("--noTF32")
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
                  rebuild: bool = False, progress: Optional[Progress] = None, gpu: str = "") -> EngineRecord:
    """The cached engine for `plan` when it is valid, else a freshly built one (with a message saying why).
    gpu: the name of the CUDA device the engine is for (part of the key)."""
    say = progress or (lambda msg: log.info("%s", msg))
    check_dla_precision(plan.precision, plan.dla_core, str(tensorrt))
    key = plan.key(str(tensorrt), str(compute_capability), str(gpu))
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
    shapes = plan.shapes()
    say(f"building {plan.precision} engine for {plan.device} (TensorRT {tensorrt}, compute {compute_capability}"
        + (f", {gpu}" if gpu else "")
        + (f", DLA core {plan.dla_core} with GPU fallback, fixed batch {shapes['opt'][0]}" if plan.dla_core is not None else "")
        + f") from {plan.onnx_path.name}")
    t0 = time.perf_counter()
    with Heartbeat(say, "building the engine (TensorRT times kernels; minutes on a Jetson)"):
        data, report = builder(plan, timing, say)
    seconds = round(time.perf_counter() - t0, 1)
    info = {
        "bundle": {"path": str(plan.bundle_path), "name": plan.bundle_name, "checksum": plan.bundle_checksum},
        "source_model": {"file": plan.onnx_path.name, "variant": plan.source_model,
                         "sha256": plan.onnx_sha256 or sha256_file(plan.onnx_path)},
        "build": {"seconds": seconds, "precision_reason": plan.precision_reason, "workspace_mb": plan.workspace_mb,
                  "flags": builder_flags(plan.precision), "input": plan.input_name,
                  "shapes": {k: list(v) for k, v in shapes.items()}, "timing_cache": str(timing), **report},
    }
    path, meta = cache.store(key, data, info)
    if plan.dla_core is not None:
        # can_run_on_DLA judges a layer by its type and parameters; where the built engine placed it is not read back.
        ineligible = report.get("dla_ineligible_layers") or []
        head = f"DLA core {plan.dla_core}: "
        msg = (head + f"{len(ineligible)} layer(s) cannot run on the DLA and fall back to the GPU: {', '.join(ineligible[:10])}"
               + (" ..." if len(ineligible) > 10 else "") if ineligible
               else head + "every layer is eligible for the DLA by type (TensorRT's can_run_on_DLA); placement not verified")
        messages.append(msg)
        say(msg)
    say(f"engine written: {path} ({len(data) / 1e6:.1f} MB, {seconds} s)")
    return EngineRecord(path, meta, key, built=True, reason=why, plan=plan, messages=tuple(messages))


def build_with_polygraphy(plan: EnginePlan, timing_cache: Path, progress: Progress) -> Tuple[bytes, Dict[str, Any]]:
    """Build with NVIDIA's Polygraphy loaders (TensorRT 8.5+ / 10.x). NOT RUN by this project's CI: no TensorRT there.

    NetworkFromOnnxBytes -> CreateConfig(tf32/fp16/int8 from `builder_flags`, one batch profile (fixed for DLA),
    workspace pool, timing cache, DLA with GPU fallback) -> EngineBytesFromNetwork(save_timing_cache=...). INT8 comes
    from the QDQ model's own scales, so no calibrator is given. Layers IBuilderConfig.can_run_on_DLA rejects are
    listed (eligibility by layer type, not the placement in the built engine). The ONNX is read once and parsed
    from those bytes (OnnxParser.parse), after checking them against the digest verified with the bundle
    (plan.onnx_sha256): never re-opened by path.
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
    flags = builder_flags(plan.precision)
    kwargs: Dict[str, Any] = dict(
        tf32=flags["tf32"], fp16=flags["fp16"], int8=flags["int8"], profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(plan.workspace_mb) << 20},
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
        use_dla=plan.dla_core is not None, allow_gpu_fallback=plan.dla_core is not None,
    )
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        kwargs["progress_monitor"] = monitor
    config: Any = CreateConfig(**kwargs)
    ineligible: List[str] = []
    if plan.dla_core is not None:
        core = int(plan.dla_core)

        def on_dla(_builder: Any, network: Any, cfg: Any) -> None:
            cfg.DLA_core = core  # CreateConfig(use_dla=True) always picks core 0
            ineligible.extend(network.get_layer(i).name for i in range(network.num_layers)
                              if not cfg.can_run_on_DLA(network.get_layer(i)))

        config = PostprocessConfig(config, on_dla)
    onnx_bytes = _read_checked(plan.onnx_path, plan.onnx_sha256, plan.onnx_path.name, model=True)
    data = EngineBytesFromNetwork(NetworkFromOnnxBytes(onnx_bytes), config=config, save_timing_cache=str(timing_cache))()
    del onnx_bytes
    import polygraphy

    report: Dict[str, Any] = {"tensorrt": trt.__version__, "polygraphy": polygraphy.__version__}
    if plan.dla_core is not None:
        report.update(dla_ineligible_layers=ineligible, dla_placement="not verified")
    return bytes(data), report


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


def cuda_device_name() -> Optional[str]:
    """The name of CUDA device 0, the device TensorRT builds on and runs on (CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER
    applied as for TensorRT), through the CUDA driver API (cuInit, cuDeviceGet, cuDeviceGetName in libcuda, which every
    NVIDIA driver and JetPack installs). None where it cannot be read."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0 or cuda.cuDeviceGetName(name, 256, dev) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return name.value.decode("utf-8", "replace").strip() or None


def tensorrt_runtime_facts(profile: Any) -> Tuple[str, str, str]:
    """(installed TensorRT version, compute capability, GPU name): the profile's capability, else the GPU's via NVML;
    the name of CUDA device 0 (driver API), else NVML's first GPU."""
    trt, _ = require_tensorrt()
    cc = profile.compute_capability
    gpu = cuda_device_name()
    if cc is None or gpu is None:
        from edgeclf.devices.detect import query_gpus

        gpus, how = query_gpus()
        if cc is None:
            cc = next((g["compute_capability"] for g in gpus if g.get("compute_capability")), None)
        if gpu is None:
            gpu = next((str(g["name"]) for g in gpus if g.get("name")), None)
            if gpu is None:
                log.warning("the GPU's name is unknown (%s); engines are keyed without it", how)
        if cc is None:
            from edgeclf.errors import BackendError

            raise BackendError(f"the GPU's compute capability is unknown ({how}); engines are keyed by it: install pynvml or a "
                               "driver whose nvidia-smi reports compute_cap")
    return str(trt.__version__), str(cc), gpu or ""


def profile_for(device: Optional[str], what: str = "--backend trt") -> Any:
    """The device profile named by --device, else the one detected here (ConfigError naming --device when none is)."""
    from edgeclf.devices import load_profile

    if device:
        return load_profile(device)
    from edgeclf.devices.detect import detect

    found = detect()
    if found.profile is None:
        raise ConfigError(f"{what} needs a device profile and none was detected here (" + "; ".join(found.reasons[-2:])
                          + "); give --device NAME (see `edgeclf devices list`)")
    log.info("device profile %s (detected): %s", found.profile, "; ".join(found.reasons))
    return load_profile(found.profile)


def build_engine(bundle_path: str, *, device: str, precision: str = "auto", dla_core: Optional[int] = None,
                 workspace_mb: Optional[int] = None, cache: Optional[str] = None, max_batch: int = 8, rebuild: bool = False,
                 progress: Optional[Progress] = None, builder: Optional[Builder] = None) -> EngineRecord:
    """`edgeclf build-engine`: validate the request, then build (or reuse) the engine in the per-user cache."""
    from edgeclf.devices import load_profile
    from edgeclf.runtime.bundle import load_bundle

    profile = load_profile(device)
    bundle = load_bundle(bundle_path)
    args: Dict[str, Any] = dict(precision=precision, dla_core=dla_core, workspace_mb=workspace_mb, max_batch=max_batch)
    plan_engine(bundle, profile, **args)  # a request that cannot be built is refused before TensorRT is looked for
    version, cc, gpu = tensorrt_runtime_facts(profile)
    plan = plan_engine(bundle, profile, tensorrt=version, **args)
    return ensure_engine(plan, EngineCache(cache_dir(cache)), tensorrt=version, compute_capability=cc, gpu=gpu,
                         builder=builder or build_with_polygraphy, rebuild=rebuild, progress=progress)


def trtexec_for(bundle_path: str, *, device: str, precision: str = "auto", dla_core: Optional[int] = None,
                workspace_mb: Optional[int] = None, max_batch: int = 8, cache: Optional[str] = None,
                tensorrt: Optional[str] = None) -> Dict[str, Any]:
    """`build-engine --print-trtexec`: the trtexec command for the profile's TensorRT (or `tensorrt`), writing where
    edgeclf's cache would keep that engine. Needs no TensorRT."""
    from edgeclf.devices import load_profile
    from edgeclf.runtime.bundle import load_bundle

    prof = load_profile(device)
    version = tensorrt or prof.tensorrt
    plan = plan_engine(load_bundle(bundle_path), prof, precision=precision, dla_core=dla_core, workspace_mb=workspace_mb,
                       max_batch=max_batch, tensorrt=version)
    if version is None:
        raise ConfigError(f"device profile {device} names no TensorRT version; give --trt-version (e.g. 8.6 or 10.3)")
    cc = prof.compute_capability or "unknown"  # x86-nvidia-gpu: the GPU's, known only on the machine (so is its name)
    cache_ = EngineCache(cache_dir(cache))
    key = plan.key(version, cc)
    cmd = trtexec_command(plan, tensorrt=version, save_engine=str(cache_.paths(key)[0]),
                          timing_cache=str(cache_.timing_cache_path(version, cc)))
    return {"command": cmd, "tensorrt": version, "precision": plan.precision, "precision_reason": plan.precision_reason,
            "device": device}
