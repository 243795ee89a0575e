"""Backend choice from device profiles with logged fallbacks, the TensorRT EP options, the native trt backend's
error without TensorRT, and `bundle check` on ONNX Runtime. The engine itself runs only where TensorRT is."""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

from edgeclf.errors import ConfigError, MissingExtraError
from edgeclf.runtime import app
from edgeclf.runtime.backends import (
    BACKENDS,
    BackendOptions,
    OrtBackend,
    backend_availability,
    choose_backend,
    create_backend,
    ort_provider_options,
)
from edgeclf.runtime.engine import tensorrt_missing
from tests.runtime.tiny_bundle import make_tiny_bundle

NOTHING_BUT_CPU: Dict[str, Optional[str]] = {
    "ort-cpu": None, "ort-cuda": "this onnxruntime has no CUDAExecutionProvider",
    "ort-tensorrt": "this onnxruntime has no TensorrtExecutionProvider", "trt": "tensorrt and polygraphy are not importable",
}
needs_no_tensorrt = pytest.mark.skipif(tensorrt_missing() is None, reason="TensorRT is installed here: the missing-TensorRT path cannot run")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_tiny_bundle(tmp_path / "tiny", variants=["int8-tensorrt", "int8-cpu"])


def test_trt_is_a_backend_and_availability_names_every_one():
    assert "trt" in BACKENDS
    avail = backend_availability()
    assert set(avail) == set(BACKENDS) and avail["ort-cpu"] is None
    if tensorrt_missing() is not None:
        assert "not importable" in str(avail["trt"])


def test_choose_backend_takes_the_first_that_runs_and_says_what_it_passed_over():
    chosen, skipped = choose_backend(("trt", "ort-tensorrt", "ort-cuda", "ort-cpu"), NOTHING_BUT_CPU, profile="jetson-orin-nx")
    assert chosen == "ort-cpu"
    assert skipped == ["trt: tensorrt and polygraphy are not importable", "ort-tensorrt: this onnxruntime has no TensorrtExecutionProvider",
                       "ort-cuda: this onnxruntime has no CUDAExecutionProvider"]
    assert choose_backend(("trt", "ort-cpu"), {**NOTHING_BUT_CPU, "trt": None}, profile="p") == ("trt", [])


def test_choose_backend_with_nothing_usable_is_one_line():
    with pytest.raises(ConfigError) as info:
        choose_backend(("trt",), NOTHING_BUT_CPU, profile="jetson-orin-nano")
    msg = str(info.value)
    assert "\n" not in msg and "jetson-orin-nano prefers trt" in msg and "give --backend" in msg


def test_profile_preferring_trt_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    import edgeclf.runtime.backends as backends

    monkeypatch.setattr(backends, "backend_availability", lambda: dict(NOTHING_BUT_CPU))
    with caplog.at_level(logging.WARNING):
        backend, why, device = app.resolve_backend(None, "jetson-orin-nx")
    assert (backend, device) == ("ort-cpu", "jetson-orin-nx")
    assert why.startswith("device profile jetson-orin-nx (first of trt, ort-tensorrt, ort-cuda, ort-cpu available here; passed over trt:")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("prefers trt, falling back" in w and "tensorrt and polygraphy are not importable" in w for w in warnings)


def test_explicit_backend_and_default():
    assert app.resolve_backend("trt", None) == ("trt", "argument", None)
    assert app.resolve_backend(None, None) == ("ort-cpu", "default", None)


def test_ort_tensorrt_options(tmp_path: Path):
    opts = ort_provider_options("ort-tensorrt", BackendOptions(device="jetson-agx-orin", precision="int8", dla_core=1, workspace_mb=512,
                                                               engine_cache=str(tmp_path)))
    # int8 with fp16: unquantized layers in fp16, not fp32 (which DLA cannot run). The timing cache goes to the engine
    # cache folder (the EP's fallback when trt_timing_cache_path, an option only from ORT 1.17, is not given).
    assert opts == {"trt_fp16_enable": "True", "trt_int8_enable": "True", "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(tmp_path / "ort-tensorrt"), "trt_timing_cache_enable": "True",
                    "trt_max_workspace_size": str(512 << 20), "trt_dla_enable": "True", "trt_dla_core": "1"}
    assert (tmp_path / "ort-tensorrt").is_dir()
    fp16 = ort_provider_options("ort-tensorrt", BackendOptions(precision="fp16", engine_cache=str(tmp_path)))
    assert fp16 is not None and (fp16["trt_fp16_enable"], fp16["trt_int8_enable"]) == ("True", "False")
    fp32 = ort_provider_options("ort-tensorrt", BackendOptions(precision="fp32", engine_cache=str(tmp_path)))
    assert fp32 is not None and (fp32["trt_fp16_enable"], fp32["trt_int8_enable"]) == ("False", "False")
    assert ort_provider_options("ort-cpu", BackendOptions(precision="fp16")) is None


@pytest.mark.parametrize(("device", "precision", "core", "want"), [
    ("jetson-orin-nano", "fp16", 0, "device profile jetson-orin-nano has no DLA cores"),
    ("jetson-agx-orin", "fp16", 2, "has DLA cores 0-1"),  # the EP would silently take core 0
    ("jetson-agx-orin", "fp32", 0, "DLA runs fp16 or int8 only"),  # the EP would silently ignore trt_dla_enable
    ("jetson-agx-orin", None, 0, "with fp32 on ort-tensorrt"),
    ("jetson-xavier-nx", "int8", 0, "only from TensorRT 10"),  # JetPack 5: Q/DQ int8 would run on the GPU
])
def test_ort_tensorrt_dla_is_checked_as_for_trt(tmp_path: Path, device: str, precision: Optional[str], core: int, want: str):
    with pytest.raises(ConfigError) as info:
        ort_provider_options("ort-tensorrt", BackendOptions(device=device, precision=precision, dla_core=core, engine_cache=str(tmp_path)))
    assert want in str(info.value) and "\n" not in str(info.value)
    ok = ort_provider_options("ort-tensorrt", BackendOptions(device="jetson-xavier-nx", precision="fp16", dla_core=1, engine_cache=str(tmp_path)))
    assert ok is not None and ok["trt_dla_core"] == "1"


def test_ort_tensorrt_dla_without_device_uses_the_detected_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import edgeclf.devices.detect as detect_mod

    monkeypatch.setattr(detect_mod, "detect", lambda probe=None: detect_mod.Detection("x86-nvidia-gpu", ("nvidia-smi: RTX A2000",)))
    with pytest.raises(ConfigError, match="x86-nvidia-gpu has no DLA cores"):
        ort_provider_options("ort-tensorrt", BackendOptions(precision="fp16", dla_core=0, engine_cache=str(tmp_path)))


def test_ort_tensorrt_gets_an_explicit_batch_profile(tmp_path: Path):
    # Without one the EP builds its engine at the first run() and again when a larger batch arrives.
    base = BackendOptions(device="jetson-orin-nx", precision="fp16", engine_cache=str(tmp_path), max_batch=4)
    opts = ort_provider_options("ort-tensorrt", base, input_name="input", input_shape=(3, 224, 224), ort_version="1.17.3")
    assert opts is not None
    assert (opts["trt_profile_min_shapes"], opts["trt_profile_opt_shapes"], opts["trt_profile_max_shapes"]) == (
        "input:1x3x224x224", "input:1x3x224x224", "input:4x3x224x224")
    dla = ort_provider_options("ort-tensorrt", dataclasses.replace(base, dla_core=0), input_name="input", input_shape=(3, 224, 224),
                               ort_version="1.16.0")
    assert dla is not None and dla["trt_profile_max_shapes"] == "input:1x3x224x224"  # DLA: one fixed batch
    # An onnxruntime that does not know the option would reject it and fall back to the CUDA EP: not given.
    old = ort_provider_options("ort-tensorrt", base, input_name="input", input_shape=(3, 224, 224), ort_version="1.15.1")
    assert old is not None and not any(k.startswith("trt_profile_") for k in old)
    assert "trt_profile_min_shapes" not in (ort_provider_options("ort-tensorrt", base) or {})


def test_ort_tensorrt_backend_gets_the_bundle_input_and_splits_at_the_profile_max(tiny: Path, monkeypatch: pytest.MonkeyPatch):
    import edgeclf.runtime.backends as backends
    from edgeclf.runtime.bundle import load_bundle

    made: Dict[str, Any] = {}

    class Ort:  # stands in for OrtBackend: this onnxruntime has no TensorRT EP
        def __init__(self, path: str, shape: Any, k: int, **kw: Any) -> None:
            made.update(kw)

    monkeypatch.setattr(backends, "OrtBackend", Ort)
    b = load_bundle(tiny)
    create_backend(str(b.model_path), (1, 8, 8), 3, backend="ort-tensorrt", bundle=b,
                   options=BackendOptions(precision="fp16", max_batch=2, engine_cache=str(tiny.parent / "c")))
    assert made["provider_options"]["trt_profile_max_shapes"] == f"{b.manifest.input_name}:2x1x8x8" and made["max_batch"] == 2


def test_ort_backend_splits_batches_at_max_batch(tiny: Path):
    be = OrtBackend(str(tiny / "model.onnx"), (1, 8, 8), 3, backend="ort-cpu", max_batch=2)
    seen: List[int] = []
    run = be._session.run

    class Session:
        def run(self, names: Any, feed: Dict[str, Any]) -> Any:
            seen.append(len(next(iter(feed.values()))))
            return run(names, feed)

    whole = be.infer(np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32))
    be._session = Session()
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    assert np.allclose(be.infer(x), whole, atol=1e-6) and seen == [2, 2, 1]


def test_ort_backend_still_runs_with_options(tiny: Path):
    be = create_backend(str(tiny / "model.onnx"), (1, 8, 8), 3, backend="ort-cpu", options=BackendOptions(device="x86-cpu"))
    with be:
        out = be.infer(np.zeros((2, 1, 8, 8), np.float32))
    assert out.shape == (2, 3) and be.provider_options == {}


@needs_no_tensorrt
def test_explicit_trt_without_tensorrt_names_what_to_install(tiny: Path):
    with pytest.raises(MissingExtraError) as info:
        create_backend(str(tiny / "model.onnx"), (1, 8, 8), 3, backend="trt")
    assert "python3-libnvinfer" in str(info.value) and "polygraphy" in str(info.value)
    with pytest.raises(MissingExtraError):
        app.run_bundle(str(tiny), "synthetic:ultrasound?frames=2&size=64", backend="trt", device="jetson-orin-nx")


def test_trt_refuses_the_cpu_int8_form(tiny: Path, monkeypatch: pytest.MonkeyPatch):
    # As `profile --backend trt --precision int8` would hand it over while the bundle maps trt to the CPU flavour.
    import edgeclf.runtime.trt as trt

    monkeypatch.setattr(trt, "require_tensorrt", lambda: (None, None))
    from edgeclf.errors import BundleError

    with pytest.raises(BundleError, match="CPU INT8 form .* int8-tensorrt"):
        trt.trt_backend_for_model(str(tiny / "model.int8-cpu.onnx"), (1, 8, 8), 3)


def test_trt_without_device_and_nothing_detected(tiny: Path, monkeypatch: pytest.MonkeyPatch):
    import edgeclf.devices.detect as detect_mod
    import edgeclf.runtime.trt as trt

    monkeypatch.setattr(trt, "require_tensorrt", lambda: (None, None))
    monkeypatch.setattr(detect_mod, "detect", lambda probe=None: detect_mod.Detection(None, ("machine riscv64 ...", "no profile")))
    with pytest.raises(ConfigError, match="give --device NAME"):
        trt.profile_for(None)


# -- bundle check (parity on the device) -----------------------------------------------------------------------

def test_check_on_ort_cpu_reports_error_and_agreement(tiny: Path):
    r = app.verify_bundle(str(tiny), backend="ort-cpu")
    ref = r["reference"]
    assert ref["model"] == "fp32" and ref["n"] == 6 and ref["backend"] == "ort-cpu"
    assert ref["max_abs_diff"] < 1e-4 and ref["mean_abs_diff"] <= ref["max_abs_diff"]
    assert ref["decision_agreement"] == 1.0 and ref["vs_fp32"]["decision_agreement"] == 1.0
    assert [v["model"] for v in ref["variants"]] == ["int8-tensorrt", "int8-cpu"]


def test_check_one_precision_and_the_tensorrt_ep_skips_the_cpu_form(tiny: Path):
    r = app.verify_bundle(str(tiny), backend="ort-cpu", precision="int8")
    assert [r["reference"]["model"]] + [v["model"] for v in r["reference"]["variants"]] == ["int8-tensorrt", "int8-cpu"]
    from edgeclf.errors import BundleError

    with pytest.raises(BundleError, match="nothing at precision fp16"):
        app.verify_bundle(str(tiny), backend="ort-cpu", precision="fp16")


def test_check_fails_when_outputs_drift(tiny: Path):
    from edgeclf.errors import IntegrityError
    from edgeclf.runtime.bundle import write_checksums

    with np.load(tiny / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["logits"] = arrays["logits"] + 0.01
    np.savez(tiny / "reference.npz", **arrays)
    write_checksums(tiny)
    with pytest.raises(IntegrityError, match="model fp32 on ort-cpu differs .* by 1.00e-02"):
        app.verify_bundle(str(tiny), backend="ort-cpu")


def test_multilabel_agreement_counts_whole_rows():
    a = np.array([[1, 0, 1], [0, 0, 1]], bool)
    assert app._agreement(a, a.copy()) == 1.0
    b = a.copy()
    b[1, 0] = True
    assert app._agreement(a, b) == 0.5


NO_TENSORRT_IMPORT = r"""
import sys
from edgeclf.runtime.app import resolve_backend, verify_bundle
from edgeclf.runtime.backends import available_backends, backend_availability

assert backend_availability()["trt"] is None and "trt" in available_backends()  # the stand-ins count as installed
assert resolve_backend(None, "jetson-orin-nx")[0] == "trt"
verify_bundle(sys.argv[1], backend="ort-cpu")
print(sorted(m for m in ("tensorrt", "polygraphy") if m in sys.modules))
"""


def test_choosing_a_backend_and_checking_on_onnx_runtime_never_import_tensorrt(tiny: Path, tmp_path: Path):
    """Whether trt can run is judged without importing TensorRT (importing it loads CUDA: seconds on a Jetson), and
    an ONNX Runtime check never imports it. A fresh interpreter, so what other tests imported does not count, with
    importable stand-ins for tensorrt 10.3 and polygraphy first on its path, so trt counts as installed and the
    check means the same with or without TensorRT here."""
    import os
    import subprocess

    stubs = tmp_path / "stubs"
    for name in ("tensorrt", "polygraphy"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text("__version__ = '10.3.0'\n")
    meta = stubs / "tensorrt-10.3.0.dist-info"  # the version a pip-installed TensorRT is judged by
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt\nVersion: 10.3.0\n")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stubs), str(repo)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", NO_TENSORRT_IMPORT, str(tiny)], capture_output=True, text=True,
                          env=env, cwd=str(repo), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_trt_outputs_are_copied_before_the_runner_reuses_its_buffer():
    from edgeclf.runtime.trt import TrtBackend

    class Runner:  # like Polygraphy's TrtRunner: the same host output buffer on every call
        buf = np.zeros((2, 3), np.float32)

        def infer(self, feed_dict):
            x = next(iter(feed_dict.values()))
            self.buf[: len(x)] = x.reshape(len(x), -1)
            return {"logits": self.buf[: len(x)]}

    be = object.__new__(TrtBackend)  # no engine here: only the chunking and copying of _infer
    be._runner, be._input, be.max_batch, be.fixed_batch = Runner(), "input", 2, None
    x = np.arange(12, dtype=np.float32).reshape(4, 3, 1, 1)
    assert np.array_equal(be._infer(x), x.reshape(4, 3))  # chunks of the engine's max batch, each kept
    first = be._infer(x[:2])
    be._infer(x[2:])
    assert np.array_equal(first, x[:2].reshape(2, 3))


class _FakeTensorRT:
    """TensorRT and Polygraphy as TrtBackend uses them: trt.Runtime/init_libnvinfer_plugins, TrtRunner, get_trt_logger.
    `loaded` records (runtime DLA_core at deserialization, the bytes deserialized); runners record their feeds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, batch_of: Any = None) -> None:
        import types

        import edgeclf.runtime.trt as trt_mod

        self.loaded: List[Any] = []
        fake = self

        class Runtime:  # a fresh TensorRT runtime's DLA_core is -1 (IRuntime::setDLACore: "Defaults to -1")
            def __init__(self, logger: Any) -> None:
                self.DLA_core = -1

            def deserialize_cuda_engine(self, data: bytes) -> Any:
                fake.loaded.append((self.DLA_core, bytes(data)))
                return object()

        class TrtRunner:
            def __init__(self, engine: Any) -> None:
                self.engine, self.feeds = engine, []

            def activate(self) -> None:
                pass

            def get_input_metadata(self) -> Dict[str, Any]:
                return {"input": None}

            def infer(self, feed_dict: Dict[str, Any]) -> Dict[str, Any]:
                x = feed_dict["input"]
                self.feeds.append(len(x))
                return {"logits": x.reshape(len(x), -1)[:, :3] + 1.0}

            def deactivate(self) -> None:
                pass

        self.trt = types.SimpleNamespace(Runtime=Runtime, init_libnvinfer_plugins=lambda logger, ns: True)
        poly_trt = types.ModuleType("polygraphy.backend.trt")
        # No EngineFromBytes: the backend deserializes with a runtime of its own.
        poly_trt.__dict__.update(TrtRunner=TrtRunner, get_trt_logger=lambda: "polygraphy's logger")
        for name, mod in (("polygraphy", types.ModuleType("polygraphy")), ("polygraphy.backend", types.ModuleType("polygraphy.backend")),
                          ("polygraphy.backend.trt", poly_trt)):
            monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: (self.trt, None))


def _record(engine: Path, data: bytes, dla_core: Optional[int] = None, shapes: Optional[Dict[str, Any]] = None) -> Any:
    import hashlib

    from edgeclf.runtime.engine import EngineKey, EngineRecord

    meta: Dict[str, Any] = {"engine_sha256": hashlib.sha256(data).hexdigest()}
    if shapes is not None:
        meta["build"] = {"shapes": shapes}
    return EngineRecord(engine, meta, EngineKey("d", "10.3.0", "8.7", "fp16", dla_core, "x", "Orin"), built=False)


def test_an_engine_changed_after_the_cache_checked_it_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The cache lookup hashes the engine file; what is deserialized must be those bytes, not a file rewritten since.
    import edgeclf.runtime.trt as trt
    from edgeclf.errors import BackendError

    fake = _FakeTensorRT(monkeypatch)
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"the engine that was checked")
    record = _record(engine, b"the engine that was checked")
    with trt.TrtBackend(str(engine), (1, 8, 8), 3, max_batch=2, record=record):
        pass
    assert fake.loaded == [(-1, b"the engine that was checked")]  # a GPU engine: the runtime's DLA_core untouched
    engine.write_bytes(b"an engine written since")
    with pytest.raises(BackendError, match="changed after it was checked") as info:
        trt.TrtBackend(str(engine), (1, 8, 8), 3, max_batch=2, record=record)
    assert len(fake.loaded) == 1 and "\n" not in str(info.value)


def test_a_dla_engine_is_deserialized_for_its_dla_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Polygraphy's EngineFromBytes(data) makes a fresh runtime whose DLA_core is -1; a DLA engine needs its core set.
    import edgeclf.runtime.trt as trt

    fake = _FakeTensorRT(monkeypatch)
    engine = tmp_path / "dla.engine"
    engine.write_bytes(b"dla engine")
    with trt.TrtBackend(str(engine), (1, 8, 8), 3, max_batch=8, record=_record(engine, b"dla engine", dla_core=1)):
        pass
    assert fake.loaded == [(1, b"dla engine")]


def test_a_fixed_batch_dla_engine_gets_padded_batches_and_drops_the_padding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # DLA: "the runtime dimensions must be the same as the dimensions used for building".
    import edgeclf.runtime.trt as trt

    _FakeTensorRT(monkeypatch)
    engine = tmp_path / "dla.engine"
    engine.write_bytes(b"dla engine")
    fixed = {"min": [2, 1, 8, 8], "opt": [2, 1, 8, 8], "max": [2, 1, 8, 8]}
    be = trt.TrtBackend(str(engine), (1, 8, 8), 3, max_batch=8, record=_record(engine, b"dla engine", dla_core=0, shapes=fixed))
    assert (be.max_batch, be.fixed_batch) == (2, 2)
    x = np.arange(3 * 64, dtype=np.float32).reshape(3, 1, 8, 8)
    out = be.infer(x)
    assert be._runner.feeds == [2, 2]  # 3 frames: one full batch, then one frame padded to 2
    assert out.shape == (3, 3) and np.array_equal(out, x.reshape(3, -1)[:, :3] + 1.0)
    assert be.infer(x[:1]).shape == (1, 3) and be._runner.feeds[-1] == 2
    be.close()
    gpu = trt.TrtBackend(str(engine), (1, 8, 8), 3, max_batch=8,
                         record=_record(engine, b"dla engine", shapes={"min": [1, 1, 8, 8], "opt": [1, 1, 8, 8], "max": [8, 1, 8, 8]}))
    gpu.infer(x)
    assert gpu.fixed_batch is None and gpu._runner.feeds == [3]  # a dynamic-batch engine is fed as it is
