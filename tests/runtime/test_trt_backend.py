"""Backend choice from device profiles with logged fallbacks, the TensorRT EP options, the native trt backend's
error without TensorRT, and `bundle check` on ONNX Runtime. The engine itself runs only where TensorRT is."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest

from edgeclf.errors import ConfigError, MissingExtraError
from edgeclf.runtime import app
from edgeclf.runtime.backends import (
    BACKENDS,
    BackendOptions,
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
    opts = ort_provider_options("ort-tensorrt", BackendOptions(precision="int8", dla_core=1, workspace_mb=512, engine_cache=str(tmp_path)))
    assert opts == {"trt_fp16_enable": "False", "trt_int8_enable": "True", "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(tmp_path / "ort-tensorrt"), "trt_timing_cache_enable": "True",
                    "trt_max_workspace_size": str(512 << 20), "trt_dla_enable": "True", "trt_dla_core": "1"}
    assert (tmp_path / "ort-tensorrt").is_dir()
    assert ort_provider_options("ort-tensorrt", BackendOptions(precision="fp16", engine_cache=str(tmp_path)))["trt_fp16_enable"] == "True"
    assert ort_provider_options("ort-cpu", BackendOptions(precision="fp16")) is None


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
        trt._profile_for(None)


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


def test_no_tensorrt_module_was_imported_by_these_tests():
    assert tensorrt_missing() is None or "tensorrt" not in sys.modules


def test_trt_outputs_are_copied_before_the_runner_reuses_its_buffer():
    from edgeclf.runtime.trt import TrtBackend

    class Runner:  # like Polygraphy's TrtRunner: the same host output buffer on every call
        buf = np.zeros((2, 3), np.float32)

        def infer(self, feed_dict):
            x = next(iter(feed_dict.values()))
            self.buf[: len(x)] = x.reshape(len(x), -1)
            return {"logits": self.buf[: len(x)]}

    be = object.__new__(TrtBackend)  # no engine here: only the chunking and copying of _infer
    be._runner, be._input, be.max_batch = Runner(), "input", 2
    x = np.arange(12, dtype=np.float32).reshape(4, 3, 1, 1)
    assert np.array_equal(be._infer(x), x.reshape(4, 3))  # chunks of the engine's max batch, each kept
    first = be._infer(x[:2])
    be._infer(x[2:])
    assert np.array_equal(first, x[:2].reshape(2, 3))


def test_an_engine_changed_after_the_cache_checked_it_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The cache lookup hashes the engine file; what is deserialized must be those bytes, not a file rewritten since.
    import hashlib
    import types

    import edgeclf.runtime.trt as trt
    from edgeclf.errors import BackendError
    from edgeclf.runtime.engine import EngineKey, EngineRecord

    loaded = []

    class EngineFromBytes:  # Polygraphy's loader: bytes, or a callable giving them (lazily, on activate)
        def __init__(self, data):
            self.data = data

    class TrtRunner:
        def __init__(self, loader):
            self.loader = loader

        def activate(self):
            data = self.loader.data
            loaded.append(data() if callable(data) else data)

        def get_input_metadata(self):
            return {"input": None}

        def deactivate(self):
            pass

    poly_trt = types.ModuleType("polygraphy.backend.trt")
    poly_trt.__dict__.update(EngineFromBytes=EngineFromBytes, TrtRunner=TrtRunner)
    common = types.ModuleType("polygraphy.backend.common")
    common.__dict__["BytesFromPath"] = lambda path: (lambda: Path(path).read_bytes())
    for name, mod in (("polygraphy", types.ModuleType("polygraphy")), ("polygraphy.backend", types.ModuleType("polygraphy.backend")),
                      ("polygraphy.backend.trt", poly_trt), ("polygraphy.backend.common", common)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(trt, "require_tensorrt", lambda: (None, None))
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"the engine that was checked")
    record = EngineRecord(engine, {"engine_sha256": hashlib.sha256(b"the engine that was checked").hexdigest()},
                          EngineKey("d", "10.3.0", "8.7", "fp16", None, "x"), built=False)
    with trt.TrtBackend(str(engine), (1, 8, 8), 3, max_batch=2, record=record):
        pass
    assert loaded == [b"the engine that was checked"]
    engine.write_bytes(b"an engine written since")
    with pytest.raises(BackendError, match="changed after it was checked") as info:
        trt.TrtBackend(str(engine), (1, 8, 8), 3, max_batch=2, record=record)
    assert loaded == [b"the engine that was checked"] and "\n" not in str(info.value)
