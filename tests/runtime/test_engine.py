"""Engine cache keys and invalidation, precision/DLA choices, the trtexec command per TensorRT version, progress:
all pure Python, tested without TensorRT. The build itself (Polygraphy) runs only where TensorRT is installed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest

from edgeclf.devices import load_profile
from edgeclf.errors import BundleError, ConfigError, EdgeclfError, MissingExtraError
from edgeclf.runtime.engine import (
    ENGINE_CACHE_ENV,
    EngineCache,
    EngineKey,
    EnginePlan,
    Heartbeat,
    cache_dir,
    check_dla,
    ensure_engine,
    plan_engine,
    require_tensorrt,
    resolve_precision,
    tensorrt_missing,
    trtexec_command,
)
from tests.runtime.tiny_bundle import make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
KEY = EngineKey("jetson-orin-nx", "10.3.0", "8.7", "fp16", None, "ab" * 32)
needs_tensorrt = pytest.mark.skipif(tensorrt_missing() is not None, reason=f"needs TensorRT and a GPU: {tensorrt_missing()}")


# -- cache folder ------------------------------------------------------------------------------------------

def test_cache_dir_precedence(tmp_path: Path):
    env = {"HOME": str(tmp_path / "home")}
    assert cache_dir(env=env) == tmp_path / "home" / ".cache" / "edgeclf" / "engines"
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    assert cache_dir(env=env) == tmp_path / "xdg" / "edgeclf" / "engines"
    env["XDG_CACHE_HOME"] = "relative/ignored"  # the XDG spec: relative paths are invalid and ignored
    assert cache_dir(env=env) == tmp_path / "home" / ".cache" / "edgeclf" / "engines"
    env[ENGINE_CACHE_ENV] = str(tmp_path / "env")
    assert cache_dir(env=env) == tmp_path / "env"
    assert cache_dir(str(tmp_path / "flag"), env=env) == tmp_path / "flag"


# -- keys --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("device", "jetson-agx-orin"), ("tensorrt", "10.3.1"), ("compute_capability", "8.6"),
                                         ("gpu", "NVIDIA RTX A2000"), ("precision", "int8"), ("dla_core", 0),
                                         ("bundle_checksum", "cd" * 32)])
def test_every_key_part_changes_the_digest_and_the_file(field: str, value: Any):
    other = dataclasses.replace(KEY, **{field: value})
    assert other.digest() != KEY.digest()
    cache = EngineCache(Path("/c"))
    assert cache.paths(other)[0] != cache.paths(KEY)[0]
    assert KEY.differences(other.fields()) == [f"{field}: {value!r} -> {getattr(KEY, field)!r}"]


def test_key_digest_is_stable_and_the_stem_readable():
    assert KEY.digest() == EngineKey(**KEY.fields()).digest()
    assert KEY.stem.startswith("jetson-orin-nx-fp16-") and dataclasses.replace(KEY, dla_core=1).stem.startswith("jetson-orin-nx-fp16-dla1-")


# -- lookup and invalidation -------------------------------------------------------------------------------

def _store(cache: EngineCache, key: EngineKey = KEY, data: bytes = b"engine-bytes") -> Tuple[Path, Path]:
    cache.store(key, data, {"build": {"seconds": 1}})
    return cache.paths(key)


def test_store_then_hit(tmp_path: Path):
    cache = EngineCache(tmp_path)
    assert cache.lookup(KEY).status == "missing"
    engine, meta = _store(cache)
    found = cache.lookup(KEY)
    assert found.status == "hit" and found.engine_path == engine
    recorded = json.loads(meta.read_text())
    assert recorded["key"] == KEY.fields() and recorded["engine_bytes"] == len(b"engine-bytes")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_changed_engine_bytes_are_stale(tmp_path: Path):
    cache = EngineCache(tmp_path)
    engine, _ = _store(cache)
    engine.write_bytes(b"engine-bytez")
    found = cache.lookup(KEY)
    assert found.status == "stale" and "not the recorded" in found.reason


def test_metadata_for_another_key_is_stale(tmp_path: Path):
    cache = EngineCache(tmp_path)
    engine, meta = _store(cache)
    doc = json.loads(meta.read_text())
    doc["key"]["tensorrt"] = "8.6.2"  # e.g. copied over from another board
    meta.write_text(json.dumps(doc))
    found = cache.lookup(KEY)
    assert found.status == "stale" and "tensorrt: '8.6.2' -> '10.3.0'" in found.reason


@pytest.mark.parametrize("remove", ["engine", "meta"])
def test_half_an_entry_is_stale(tmp_path: Path, remove: str):
    cache = EngineCache(tmp_path)
    engine, meta = _store(cache)
    (engine if remove == "engine" else meta).unlink()
    found = cache.lookup(KEY)
    assert found.status == "stale" and ("missing" in found.reason)


def test_garbled_metadata_is_stale(tmp_path: Path):
    cache = EngineCache(tmp_path)
    _, meta = _store(cache)
    meta.write_text("{")
    assert cache.lookup(KEY).status == "stale"


def test_a_jetpack_upgrade_is_explained(tmp_path: Path):
    cache = EngineCache(tmp_path)
    old = dataclasses.replace(KEY, tensorrt="8.5.2")
    _store(cache, old)
    found = cache.lookup(KEY)
    assert found.status == "missing" and "tensorrt: '8.5.2' -> '10.3.0'" in found.reason


# -- ensure_engine with a stand-in builder (the cache logic; the real builder needs TensorRT) ---------------

def _plan(tmp_path: Path, **kw: Any) -> EnginePlan:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    base = dict(device="jetson-orin-nx", onnx_path=onnx, source_model="fp32", input_name="input", input_shape=(1, 8, 8),
                precision="fp16", precision_reason="requested", dla_core=None, workspace_mb=2048, max_batch=8, opt_batch=1,
                bundle_path=tmp_path, bundle_name="tiny", bundle_checksum="ab" * 32)
    base.update(kw)
    return EnginePlan(**base)  # type: ignore[arg-type]


class Builder:
    def __init__(self, ineligible: List[str] = ()) -> None:  # type: ignore[assignment]
        self.calls = 0
        self.ineligible = list(ineligible)

    def __call__(self, plan: EnginePlan, timing: Path, say: Any) -> Tuple[bytes, Dict[str, Any]]:
        self.calls += 1
        timing.write_bytes(b"timing")
        return f"engine-{self.calls}".encode(), {"dla_ineligible_layers": self.ineligible}


def test_ensure_builds_once_then_reuses(tmp_path: Path):
    cache, builder, said = EngineCache(tmp_path / "c"), Builder(), []
    plan = _plan(tmp_path)
    rec = ensure_engine(plan, cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder, progress=said.append)
    assert rec.built and builder.calls == 1 and rec.path.read_bytes() == b"engine-1"
    assert any(m.startswith("building fp16 engine for jetson-orin-nx (TensorRT 10.3.0, compute 8.7)") for m in said)
    meta = rec.meta
    assert meta["source_model"]["variant"] == "fp32" and meta["build"]["shapes"]["max"] == [8, 1, 8, 8]
    again = ensure_engine(plan, cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder)
    assert not again.built and builder.calls == 1 and again.path == rec.path


def test_a_tampered_engine_is_rebuilt_with_a_message_never_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cache, builder, said = EngineCache(tmp_path / "c"), Builder(), []
    plan = _plan(tmp_path)
    rec = ensure_engine(plan, cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder)
    rec.path.write_bytes(b"garbage")
    again = ensure_engine(plan, cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder, progress=said.append)
    assert again.built and builder.calls == 2 and again.path.read_bytes() == b"engine-2"
    assert said[0].startswith("rebuilding: ") and "hashes to" in said[0]
    assert "rebuilding" in caplog.text


@pytest.mark.parametrize("change", [{"tensorrt": "10.3.1"}, {"compute_capability": "8.6"},
                                    {"gpu": "NVIDIA RTX A4000"}])  # same compute capability 8.6, another card
def test_new_tensorrt_or_gpu_builds_a_new_engine(tmp_path: Path, change: Dict[str, str]):
    cache, builder, said = EngineCache(tmp_path / "c"), Builder(), []
    plan = _plan(tmp_path)
    first = ensure_engine(plan, cache, tensorrt="10.3.0", compute_capability="8.7", gpu="NVIDIA RTX A2000", builder=builder)
    args = {"tensorrt": "10.3.0", "compute_capability": "8.7", "gpu": "NVIDIA RTX A2000", **change}
    second = ensure_engine(plan, cache, builder=builder, progress=said.append, **args)
    assert second.built and second.path != first.path and builder.calls == 2
    assert "does not fit" in said[0]


def test_rebuild_flag_and_dla_eligibility_report(tmp_path: Path):
    cache, said = EngineCache(tmp_path / "c"), []
    plan = _plan(tmp_path, dla_core=1)
    rec = ensure_engine(plan, cache, tensorrt="10.3.0", compute_capability="8.7", builder=Builder(["Softmax_3", "Gemm_2"]),
                        progress=said.append)
    assert "DLA core 1: 2 layer(s) cannot run on the DLA and fall back to the GPU: Softmax_3, Gemm_2" in said
    assert rec.meta["build"]["dla_ineligible_layers"] == ["Softmax_3", "Gemm_2"] and rec.key.dla_core == 1
    assert any("DLA core 1 with GPU fallback, fixed batch 1" in m for m in said)
    again = ensure_engine(plan, cache, tensorrt="10.3.0", compute_capability="8.7", builder=Builder(), rebuild=True,
                          progress=said.append)
    # can_run_on_DLA judges layer types; it does not say where the built engine put them: never "runs on the DLA".
    assert again.built and "rebuilding as asked (--rebuild)" in said
    assert ("DLA core 1: every layer is eligible for the DLA by type (TensorRT's can_run_on_DLA); placement not verified" in said)
    assert not any("runs on the DLA" in m for m in said)


def test_heartbeat_speaks_during_a_long_step():
    said: List[str] = []
    with Heartbeat(said.append, "building", every_s=0.02) as hb:
        time.sleep(0.15)
    assert hb.beats >= 2 and all(m.startswith("building: ") and m.endswith(" s so far") for m in said)
    n = len(said)
    time.sleep(0.06)
    assert len(said) == n  # stopped


# -- precision, DLA and the plan -------------------------------------------------------------------------------

V_QDQ = SimpleNamespace(id="int8-tensorrt")
V_CPU = SimpleNamespace(id="int8-cpu")


@pytest.mark.parametrize(("requested", "variants", "profile", "want"), [
    ("auto", [V_QDQ], "jetson-orin-nx", ("int8", "int8-tensorrt")),
    ("auto", [V_CPU], "jetson-orin-nx", ("fp16", "fp32")),
    ("auto", [], "jetson-xavier-nx", ("fp16", "fp32")),
    ("fp16", [V_QDQ], "jetson-orin-nano", ("fp16", "fp32")),
    ("fp32", [], "x86-nvidia-gpu", ("fp32", "fp32")),
    ("int8", [V_QDQ, V_CPU], "jetson-agx-xavier", ("int8", "int8-tensorrt")),
])
def test_precision_choice(requested, variants, profile, want):
    prec, source, reason = resolve_precision(requested, load_profile(profile), variants)
    assert (prec, source) == want and reason


def test_int8_needs_the_qdq_variant_not_a_calibrator():
    with pytest.raises(BundleError, match="int8-tensorrt variant .*explicit QDQ.*edgeclf export --precision int8"):
        resolve_precision("int8", load_profile("jetson-orin-nx"), [V_CPU])


def test_precision_the_profile_does_not_run_is_refused():
    with pytest.raises(ConfigError, match="runs fp32, int8"):
        resolve_precision("fp16", load_profile("x86-cpu"), [])


def test_dla_is_refused_without_dla_cores_and_out_of_range():
    with pytest.raises(ConfigError) as info:
        check_dla(load_profile("jetson-orin-nano"), 0)
    assert str(info.value) == "--dla 0: device profile jetson-orin-nano has no DLA cores; leave --dla out to build for the GPU"
    with pytest.raises(ConfigError, match="DLA cores 0-1"):
        check_dla(load_profile("jetson-agx-orin"), 2)
    check_dla(load_profile("jetson-agx-orin"), 1)
    with pytest.raises(ConfigError, match="DLA runs fp16 or int8"):
        resolve_precision("fp32", load_profile("jetson-agx-orin"), [], dla_core=0)


def test_plan_from_a_real_bundle(tmp_path: Path):
    from edgeclf.runtime.bundle import load_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b", variants=["int8-tensorrt"]))
    plan = plan_engine(b, load_profile("jetson-orin-nx"), max_batch=4)
    assert plan.precision == "int8" and plan.onnx_path.name == "model.int8-tensorrt.onnx"
    assert plan.input_name == "input" and plan.shapes() == {"min": (1, 1, 8, 8), "opt": (1, 1, 8, 8), "max": (4, 1, 8, 8)}
    assert plan.workspace_mb == 2048 and plan.bundle_checksum == b.checksum
    fp16 = plan_engine(b, load_profile("jetson-orin-nx"), precision="fp16", workspace_mb=512, dla_core=1)
    assert fp16.onnx_path.name == "model.onnx" and fp16.workspace_mb == 512 and fp16.dla_core == 1
    with pytest.raises(ConfigError, match="no NVIDIA GPU"):
        plan_engine(b, load_profile("x86-cpu"))
    with pytest.raises(ConfigError, match="not ordered"):
        plan_engine(b, load_profile("jetson-orin-nx"), max_batch=0)


# -- trtexec: flags per TensorRT version (see trtexec_command's docstring for the documentation checked) ------

def _cmd(version: str, **kw: Any) -> str:
    plan = EnginePlan(  # fixed paths, no files: the command is only text
        device="d", onnx_path=Path("/b/model.onnx"), source_model="fp32", input_name="input", input_shape=(3, 224, 224),
        precision=kw.get("precision", "fp16"), precision_reason="", dla_core=kw.get("dla_core"), workspace_mb=1024, max_batch=8,
        opt_batch=1, bundle_path=Path("/b"), bundle_name="b", bundle_checksum="x")
    return " ".join(trtexec_command(plan, tensorrt=version, save_engine="/e/m.engine", timing_cache="/e/t.cache"))


SHAPES = "--minShapes=input:1x3x224x224 --optShapes=input:1x3x224x224 --maxShapes=input:8x3x224x224"
# DLA has no dynamic dimensions: min = opt = max (dla-layer-restrictions: "the profile's min, max, and opt values must be equal").
DLA_SHAPES = "--minShapes=input:1x3x224x224 --optShapes=input:1x3x224x224 --maxShapes=input:1x3x224x224"


@pytest.mark.parametrize(("version", "kw", "want"), [
    ("8.6", {"precision": "fp16"},
     f"trtexec --onnx=/b/model.onnx {SHAPES} --fp16 --noTF32 --memPoolSize=workspace:1024 --saveEngine=/e/m.engine "
     "--timingCacheFile=/e/t.cache"),
    ("8.6", {"precision": "int8"},
     f"trtexec --onnx=/b/model.onnx {SHAPES} --fp16 --int8 --noTF32 --memPoolSize=workspace:1024 --saveEngine=/e/m.engine "
     "--timingCacheFile=/e/t.cache"),
    ("8.6", {"precision": "fp16", "dla_core": 1},
     f"trtexec --onnx=/b/model.onnx {DLA_SHAPES} --fp16 --noTF32 --memPoolSize=workspace:1024 --useDLACore=1 --allowGPUFallback "
     "--saveEngine=/e/m.engine --timingCacheFile=/e/t.cache"),
    ("10.3", {"precision": "fp16"},
     f"trtexec --onnx=/b/model.onnx {SHAPES} --fp16 --noTF32 --memPoolSize=workspace:1024M --saveEngine=/e/m.engine "
     "--timingCacheFile=/e/t.cache"),
    ("10.3", {"precision": "int8"},
     f"trtexec --onnx=/b/model.onnx {SHAPES} --fp16 --int8 --noTF32 --memPoolSize=workspace:1024M --saveEngine=/e/m.engine "
     "--timingCacheFile=/e/t.cache"),
    ("10.3.0", {"precision": "int8", "dla_core": 0},
     f"trtexec --onnx=/b/model.onnx {DLA_SHAPES} --fp16 --int8 --noTF32 --memPoolSize=workspace:1024M --useDLACore=0 "
     "--allowGPUFallback --saveEngine=/e/m.engine --timingCacheFile=/e/t.cache"),
    ("8.5.2", {"precision": "fp32"},
     f"trtexec --onnx=/b/model.onnx {SHAPES} --noTF32 --memPoolSize=workspace:1024 --saveEngine=/e/m.engine --timingCacheFile=/e/t.cache"),
])
def test_trtexec_command(version: str, kw: Dict[str, Any], want: str):
    assert _cmd(version, **kw) == want


def test_trtexec_never_uses_the_removed_workspace_flag():
    for v in ("8.5.2", "8.6", "10.0", "10.3"):
        assert "--workspace=" not in _cmd(v)


def test_trtexec_versions_outside_8_and_10_are_refused():
    with pytest.raises(ConfigError, match="8.x and 10.x"):
        _cmd("7.1")
    with pytest.raises(ConfigError, match="8.x and 10.x"):  # TensorRT 11's trtexec has no --fp16/--int8
        _cmd("11.4")
    with pytest.raises(ConfigError, match="not a version"):
        _cmd("latest")


# -- TensorRT absent ----------------------------------------------------------------------------------------

def test_missing_tensorrt_is_one_line_naming_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert tensorrt_missing() is not None and "tensorrt" in str(tensorrt_missing())
    with pytest.raises(MissingExtraError) as info:
        require_tensorrt()
    msg = str(info.value)
    assert isinstance(info.value, EdgeclfError) and "\n" not in msg
    assert "python3-libnvinfer" in msg and 'pip install "tensorrt<11"' in msg and "polygraphy" in msg


@pytest.mark.parametrize("version", ["11.4.0.106", "7.2.3", ""])
def test_a_tensorrt_edgeclf_cannot_build_with_is_one_line_naming_the_pin(monkeypatch: pytest.MonkeyPatch, version: str):
    """`pip install tensorrt` now gives 11.x, which removed BuilderFlag.FP16/INT8: Polygraphy's CreateConfig then raises a
    raw PolygraphyException on every fp16 or int8 build. Refused up front, naming the pin."""
    from types import ModuleType

    import edgeclf.runtime.engine as engine_mod

    monkeypatch.setattr(engine_mod, "tensorrt_missing", lambda: None)
    trt = ModuleType("tensorrt")
    if version:
        trt.__dict__["__version__"] = version
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "polygraphy", ModuleType("polygraphy"))
    with pytest.raises(MissingExtraError) as info:
        require_tensorrt()
    msg = str(info.value)
    assert "\n" not in msg and "8.x or 10.x" in msg and 'pip install "tensorrt<11"' in msg
    trt.__dict__["__version__"] = "10.3.0"
    assert require_tensorrt()[0] is trt


@pytest.mark.parametrize("module", ["edgeclf.runtime", "edgeclf.runtime.engine", "edgeclf.runtime.trt", "edgeclf.runtime.backends",
                                    "edgeclf.runtime.app"])
def test_runtime_imports_no_tensorrt_until_asked(module: str):
    code = (f"import sys, {module}\n"
            "from edgeclf.runtime.backends import available_backends; available_backends()\n"
            "bad = [m for m in ('tensorrt', 'polygraphy', 'torch', 'pycuda', 'cuda') if m in sys.modules]\n"
            "print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_tensorrt
def test_build_and_check_an_engine_on_this_gpu(tmp_path: Path):  # pragma: no cover - needs TensorRT and a GPU
    """Hardware: build an fp16 engine for the tiny bundle, reuse it, and pass `bundle check --backend trt`."""
    from edgeclf.devices.detect import detect
    from edgeclf.runtime.app import verify_bundle
    from edgeclf.runtime.backends import BackendOptions
    from edgeclf.runtime.engine import build_engine

    device = detect().profile
    if device in (None, "x86-cpu"):
        pytest.skip(f"no GPU profile detected here ({device})")
    bundle = make_tiny_bundle(tmp_path / "b")
    rec = build_engine(str(bundle), device=str(device), precision="fp16", cache=str(tmp_path / "c"))
    assert rec.built and rec.path.is_file()
    assert not build_engine(str(bundle), device=str(device), precision="fp16", cache=str(tmp_path / "c")).built
    r = verify_bundle(str(bundle), backend="trt", precision="fp16", options=BackendOptions(device=device, engine_cache=str(tmp_path / "c")))
    assert r["reference"]["vs_fp32"]["decision_agreement"] == 1.0


def test_trtexec_for_a_bundle_needs_no_tensorrt(tmp_path: Path):
    from edgeclf.runtime.engine import trtexec_for

    b = make_tiny_bundle(tmp_path / "b", variants=["int8-tensorrt"])
    doc = trtexec_for(str(b), device="x86-nvidia-gpu", cache=str(tmp_path / "c"))
    assert doc["tensorrt"] == "8.6" and doc["precision"] == "int8" and "--memPoolSize=workspace:4096" in doc["command"]
    assert any(a.startswith(f"--saveEngine={tmp_path / 'c'}/x86-nvidia-gpu-int8-") for a in doc["command"])
    assert f"--timingCacheFile={tmp_path / 'c' / 'timing-trt8.6-smunknown.cache'}" in doc["command"]
    assert "--memPoolSize=workspace:4096M" in trtexec_for(str(b), device="x86-nvidia-gpu", tensorrt="10.7")["command"]
    with pytest.raises(ConfigError, match="no NVIDIA GPU"):
        trtexec_for(str(b), device="x86-cpu")


# -- the ONNX TensorRT parses is the ONNX verified with the bundle (no check/use window) ---------------------------

class _Layer:  # trt.ILayer: name
    def __init__(self, name: str, dla_ok: bool = True) -> None:
        self.name, self.dla_ok = name, dla_ok


class _Network:  # trt.INetworkDefinition: num_layers, get_layer(i)
    def __init__(self, layers: List[_Layer]) -> None:
        self._layers = layers
        self.num_layers = len(layers)

    def get_layer(self, i: int) -> _Layer:
        return self._layers[i]


class _BuilderConfig:  # trt.IBuilderConfig: DLA_core, can_run_on_DLA(layer)
    def __init__(self, use_dla: bool) -> None:
        self.DLA_core = 0 if use_dla else -1  # Polygraphy's CreateConfig(use_dla=True) sets core 0

    def can_run_on_DLA(self, layer: _Layer) -> bool:
        return layer.dla_ok


def _fake_polygraphy(monkeypatch: pytest.MonkeyPatch, parsed: List[bytes], calls: Any = None,
                     layers: Optional[List[_Layer]] = None) -> None:
    """Polygraphy's loaders as documented (polygraphy.backend.trt, 0.49): NetworkFromOnnxBytes(bytes)() -> (builder,
    network, parser); CreateConfig(<keywords>)(builder, network) -> IBuilderConfig, with only the keywords edgeclf
    passes (a misspelt one fails here as it would on a board); PostprocessConfig(config, func)(builder, network)
    makes the config and calls func(builder, network, config), which edits it in place; EngineBytesFromNetwork(
    network, config=None, save_timing_cache=None)() makes the config from (builder, network) and builds. The network
    loader records the ONNX it parses; `calls` (a dict) what Profile.add and CreateConfig were given ("profile",
    "config") and the IBuilderConfig the engine was built with ("built_with")."""
    calls = {} if calls is None else calls
    import types

    import edgeclf.runtime.engine as engine_mod

    network = _Network(layers or [_Layer("Conv_0")])

    def from_bytes(data: bytes) -> Any:
        parsed.append(bytes(data))
        return lambda: (SimpleNamespace(), network, SimpleNamespace())

    class Profile:
        def add(self, name: str, min: Any, opt: Any, max: Any) -> Profile:  # noqa: A002 - Polygraphy's names
            calls["profile"] = (name, {"min": min, "opt": opt, "max": max})
            return self

    def create_config(*, tf32: Any = None, fp16: Any = None, int8: Any = None, profiles: Any = None,
                      load_timing_cache: Any = None, use_dla: Any = None, allow_gpu_fallback: Any = None,
                      memory_pool_limits: Any = None, progress_monitor: Any = None) -> Any:
        calls["config"] = dict(tf32=tf32, fp16=fp16, int8=int8, profiles=profiles, load_timing_cache=load_timing_cache,
                               use_dla=use_dla, allow_gpu_fallback=allow_gpu_fallback,
                               memory_pool_limits=memory_pool_limits, progress_monitor=progress_monitor)
        return lambda builder, net: _BuilderConfig(bool(use_dla))

    def postprocess_config(config: Any, func: Any) -> Any:
        assert callable(func)

        def make(builder: Any, net: Any) -> Any:
            cfg = config(builder, net) if callable(config) else config
            func(builder, net, cfg)
            return cfg
        return make

    def engine_bytes(network: Any, config: Any = None, save_timing_cache: Any = None) -> Any:
        def build() -> bytes:
            builder, net, _parser = network() if callable(network) else network
            calls["built_with"] = config(builder, net)
            return b"engine"
        return build

    trt_mod = types.ModuleType("polygraphy.backend.trt")
    trt_mod.__dict__.update(
        NetworkFromOnnxBytes=from_bytes, Profile=Profile, CreateConfig=create_config,
        PostprocessConfig=postprocess_config, EngineBytesFromNetwork=engine_bytes)
    poly = types.ModuleType("polygraphy")
    poly.__dict__["__version__"] = "0.49"
    backend = types.ModuleType("polygraphy.backend")
    for name, mod in (("polygraphy", poly), ("polygraphy.backend", backend), ("polygraphy.backend.trt", trt_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    fake_trt = SimpleNamespace(MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"), __version__="10.3.0")
    monkeypatch.setattr(engine_mod, "require_tensorrt", lambda: (fake_trt, poly))


def test_the_engine_is_built_from_the_verified_onnx_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.engine import build_with_polygraphy

    parsed: List[bytes] = []
    _fake_polygraphy(monkeypatch, parsed)
    bundle = make_tiny_bundle(tmp_path / "b", variants=["int8-tensorrt"])
    original = (bundle / "model.int8-tensorrt.onnx").read_bytes()
    plan = plan_engine(load_bundle(bundle), load_profile("jetson-orin-nx"), precision="int8")
    data, report = build_with_polygraphy(plan, tmp_path / "timing.cache", lambda msg: None)
    assert data == b"engine" and parsed == [original]
    rec = ensure_engine(plan, EngineCache(tmp_path / "c"), tensorrt="10.3.0", compute_capability="8.7",
                        builder=build_with_polygraphy)
    assert rec.meta["source_model"]["sha256"] == hashlib.sha256(original).hexdigest()

    # Written over after the bundle was loaded and checked (a copy still running, another tool): never parsed.
    parsed.clear()
    (bundle / "model.int8-tensorrt.onnx").write_bytes(make_tiny_bundle(tmp_path / "other", seed=1).joinpath("model.onnx").read_bytes())
    with pytest.raises(EdgeclfError, match="'model.int8-tensorrt.onnx' changed after the bundle was verified") as info:
        build_with_polygraphy(plan, tmp_path / "timing.cache", lambda msg: None)
    assert parsed == [] and "\n" not in str(info.value)


# -- DLA: fixed shapes, precisions it runs; builder flags; the GPU in the key -----------------------------------------

def test_a_dla_build_has_one_fixed_batch_and_int8_also_enables_fp16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.engine import build_with_polygraphy

    calls: Dict[str, Any] = {}
    layers = [_Layer("Conv_0"), _Layer("Softmax_3", dla_ok=False), _Layer("Relu_1"), _Layer("Gemm_2", dla_ok=False)]
    _fake_polygraphy(monkeypatch, [], calls, layers)
    b = load_bundle(make_tiny_bundle(tmp_path / "b", variants=["int8-tensorrt"]))
    plan = plan_engine(b, load_profile("jetson-agx-orin"), precision="int8", dla_core=1, max_batch=8, tensorrt="10.3.0")
    assert plan.shapes() == {"min": (1, 1, 8, 8), "opt": (1, 1, 8, 8), "max": (1, 1, 8, 8)}  # DLA: no dynamic dimensions
    _, report = build_with_polygraphy(plan, tmp_path / "timing.cache", lambda msg: None)
    assert calls["profile"] == ("input", {"min": (1, 1, 8, 8), "opt": (1, 1, 8, 8), "max": (1, 1, 8, 8)})
    cfg = calls["config"]
    assert (cfg["int8"], cfg["fp16"], cfg["tf32"], cfg["use_dla"], cfg["allow_gpu_fallback"]) == (True, True, False, True, True)
    assert calls["built_with"].DLA_core == 1  # the core asked for, not the 0 CreateConfig(use_dla=True) sets
    # eligibility as TensorRT judges it for this config, in network order
    assert report["dla_placement"] == "not verified" and report["dla_ineligible_layers"] == ["Softmax_3", "Gemm_2"]
    gpu = plan_engine(b, load_profile("jetson-agx-orin"), precision="fp16", max_batch=8)
    assert gpu.shapes()["max"] == (8, 1, 8, 8)
    _, report = build_with_polygraphy(gpu, tmp_path / "timing.cache", lambda msg: None)
    assert (calls["config"]["fp16"], calls["config"]["int8"], calls["config"]["tf32"]) == (True, False, False)
    assert (calls["config"]["use_dla"], calls["config"]["allow_gpu_fallback"]) == (False, False)
    assert calls["built_with"].DLA_core == -1 and "dla_ineligible_layers" not in report  # no DLA: config untouched


def test_the_engine_record_names_its_builder_flags(tmp_path: Path):
    rec = ensure_engine(_plan(tmp_path, precision="int8", source_model="int8-tensorrt"), EngineCache(tmp_path / "c"),
                        tensorrt="10.3.0", compute_capability="8.7", builder=Builder())
    assert rec.meta["build"]["flags"] == {"fp16": True, "int8": True, "tf32": False}  # trtexec: --fp16 --int8 --noTF32


def test_dla_int8_is_refused_before_tensorrt_10_and_auto_takes_fp16():
    # TensorRT 8.x DLA takes INT8 from calibration/dynamic ranges, not Q/DQ: the layers would quietly run on the GPU.
    xavier = load_profile("jetson-xavier-nx")  # JetPack 5.1.2, TensorRT 8.5.2
    with pytest.raises(ConfigError) as info:
        resolve_precision("int8", xavier, [V_QDQ], dla_core=0, tensorrt="8.5.2")
    assert "only from TensorRT 10" in str(info.value) and "\n" not in str(info.value)
    prec, source, reason = resolve_precision("auto", xavier, [V_QDQ], dla_core=0, tensorrt="8.5.2")
    assert (prec, source) == ("fp16", "fp32") and "DLA on TensorRT 8.5.2 does not run the Q/DQ int8 variant" in reason
    assert resolve_precision("auto", load_profile("jetson-agx-orin"), [V_QDQ], dla_core=0, tensorrt="10.3.0")[0] == "int8"
    assert resolve_precision("int8", xavier, [V_QDQ], tensorrt="8.5.2")[0] == "int8"  # on the GPU: fine


def test_ensure_engine_refuses_a_dla_int8_engine_on_tensorrt_8(tmp_path: Path):
    builder = Builder()
    with pytest.raises(ConfigError, match="only from TensorRT 10"):
        ensure_engine(_plan(tmp_path, precision="int8", dla_core=0), EngineCache(tmp_path / "c"), tensorrt="8.6.2",
                      compute_capability="8.7", builder=builder)
    assert builder.calls == 0


def test_trtexec_for_dla_on_jetpack_5(tmp_path: Path):
    from edgeclf.runtime.engine import trtexec_for

    b = make_tiny_bundle(tmp_path / "b", variants=["int8-tensorrt"])
    with pytest.raises(ConfigError, match="only from TensorRT 10"):
        trtexec_for(str(b), device="jetson-xavier-nx", precision="int8", dla_core=0)
    doc = trtexec_for(str(b), device="jetson-xavier-nx", dla_core=0, cache=str(tmp_path / "c"))
    assert doc["precision"] == "fp16" and "--useDLACore=0" in doc["command"] and "--maxShapes=input:1x1x8x8" in doc["command"]


def test_an_engine_recorded_without_the_gpu_name_is_rebuilt(tmp_path: Path):
    cache = EngineCache(tmp_path / "c")
    named = dataclasses.replace(KEY, gpu="NVIDIA RTX A2000")
    engine, meta = _store(cache, named)
    doc = json.loads(meta.read_text())
    del doc["key"]["gpu"]  # written before the key had it
    meta.write_text(json.dumps(doc))
    found = cache.lookup(named)
    assert found.status == "stale" and "gpu: None -> 'NVIDIA RTX A2000'" in found.reason


def test_runtime_facts_name_the_cuda_device(monkeypatch: pytest.MonkeyPatch):
    import edgeclf.devices.detect as detect_mod
    import edgeclf.runtime.engine as engine_mod

    monkeypatch.setattr(engine_mod, "require_tensorrt", lambda: (SimpleNamespace(__version__="10.3.0"), None))
    monkeypatch.setattr(engine_mod, "cuda_device_name", lambda: "NVIDIA RTX A2000 12GB")
    monkeypatch.setattr(detect_mod, "query_gpus", lambda: ([{"name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"}], "NVML"))
    x86 = load_profile("x86-nvidia-gpu")
    assert engine_mod.tensorrt_runtime_facts(x86) == ("10.3.0", "8.6", "NVIDIA RTX A2000 12GB")
    monkeypatch.setattr(engine_mod, "cuda_device_name", lambda: None)  # no driver API: NVML's name
    assert engine_mod.tensorrt_runtime_facts(x86) == ("10.3.0", "8.6", "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(detect_mod, "query_gpus", lambda: ([], "no NVML"))
    assert engine_mod.tensorrt_runtime_facts(load_profile("jetson-orin-nx")) == ("10.3.0", "8.7", "")


def test_cuda_device_name_without_a_driver_is_none(monkeypatch: pytest.MonkeyPatch):
    import ctypes

    from edgeclf.runtime.engine import cuda_device_name

    def no_lib(name: str) -> Any:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    assert cuda_device_name() is None


def test_cuda_device_name_reads_device_0_through_the_driver_api(monkeypatch: pytest.MonkeyPatch):
    import ctypes

    from edgeclf.runtime.engine import cuda_device_name

    asked: List[Any] = []

    def get_name(buf: Any, size: int, dev: Any) -> int:
        asked.append(("name", size))
        buf.value = b"Orin"
        return 0

    lib = SimpleNamespace(cuInit=lambda flags: asked.append(("init", flags)) or 0,
                          cuDeviceGet=lambda ref, ordinal: asked.append(("get", ordinal)) or 0, cuDeviceGetName=get_name)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: lib if name == "libcuda.so.1" else None)
    assert cuda_device_name() == "Orin" and asked == [("init", 0), ("get", 0), ("name", 256)]
    lib.cuInit = lambda flags: 100  # CUDA_ERROR_NO_DEVICE
    assert cuda_device_name() is None


def test_a_larger_max_batch_is_not_served_by_a_smaller_cached_engine(tmp_path: Path) -> None:
    cache, builder, said = EngineCache(tmp_path / "c"), Builder(), []
    ensure_engine(_plan(tmp_path, max_batch=4), cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder)
    rec = ensure_engine(_plan(tmp_path, max_batch=16), cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder,
                        progress=said.append)
    assert rec.built and builder.calls == 2 and rec.meta["build"]["shapes"]["max"][0] == 16
    assert rec.meta["key"]["batch_profile"] == "1/1/16"
    assert any("batch_profile: '1/1/4' -> '1/1/16'" in m for m in said), said  # says why the cached one does not fit
    # Both stay cached: asking for max batch 4 again reuses the first engine.
    again = ensure_engine(_plan(tmp_path, max_batch=4), cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder)
    assert not again.built and again.meta["build"]["shapes"]["max"][0] == 4 and builder.calls == 2


def test_another_workspace_is_not_served_silently(tmp_path: Path) -> None:
    cache, builder = EngineCache(tmp_path / "c"), Builder()
    ensure_engine(_plan(tmp_path, workspace_mb=256), cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder)
    rec = ensure_engine(_plan(tmp_path, workspace_mb=4096), cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder)
    assert rec.built and rec.meta["build"]["workspace_mb"] == 4096 and rec.meta["key"]["workspace_mb"] == 4096
    assert any("workspace_mb: 256 -> 4096" in m for m in rec.messages), rec.messages


def test_an_engine_recorded_before_the_batch_profile_was_keyed_is_rebuilt_with_a_message(tmp_path: Path) -> None:
    cache, builder = EngineCache(tmp_path / "c"), Builder()
    plan = _plan(tmp_path)
    key = plan.key("10.3.0", "8.7")
    old = EngineKey(**{k: v for k, v in key.fields().items() if k not in ("batch_profile", "workspace_mb")})
    cache.store(old, b"old", {"build": {"shapes": {"max": [8, 1, 8, 8]}}})
    rec = ensure_engine(plan, cache, tensorrt="10.3.0", compute_capability="8.7", builder=builder)
    assert rec.built and any("batch_profile: '' -> '1/1/8'" in m for m in rec.messages), rec.messages


def test_a_pip_tensorrt_11_is_reported_unusable_so_backend_choice_moves_on(monkeypatch: pytest.MonkeyPatch):
    """require_tensorrt refuses 11.x; availability must say so too, or a profile preferring trt picks it and the run
    fails instead of falling back to ort-cuda / ort-cpu."""
    import importlib.machinery
    import importlib.metadata
    from types import ModuleType

    from edgeclf.runtime.app import resolve_backend
    from edgeclf.runtime.backends import backend_availability

    for name in ("tensorrt", "polygraphy"):
        mod = ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
    real = importlib.metadata.version

    def version(dist: str) -> str:
        if dist == "tensorrt":
            return installed[0]
        return real(dist)

    installed = ["11.4.0.106"]
    monkeypatch.setattr(importlib.metadata, "version", version)
    assert "11.4.0.106" in str(tensorrt_missing()) and backend_availability()["trt"] is not None
    chosen, _, _ = resolve_backend(None, "x86-nvidia-gpu")
    assert chosen != "trt"
    installed[0] = "10.3.0"
    assert tensorrt_missing() is None and backend_availability()["trt"] is None
