"""A device profile's backend whose onnxruntime provider is listed but does not load gives way to its next one.

pip's onnxruntime-gpu lists TensorrtExecutionProvider also where libnvinfer cannot load; the session then runs on CUDA
and OnnxBackend refuses it. Simulated with a wrapper around the real CPU onnxruntime whose session reports the
provider that would really load."""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

real_ort = pytest.importorskip("onnxruntime")
pytest.importorskip("cv2")


def _gpu_ort_without_tensorrt_libraries() -> types.ModuleType:
    fake = types.ModuleType("onnxruntime")
    for k in dir(real_ort):
        if not k.startswith("__"):
            setattr(fake, k, getattr(real_ort, k))
    fake.__version__ = real_ort.__version__
    fake.__spec__ = real_ort.__spec__
    fake.get_available_providers = lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]  # type: ignore[attr-defined]

    class Session:
        def __init__(self, model: Any, sess_options: Any = None, providers: Any = None) -> None:
            names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
            self._s = real_ort.InferenceSession(model, sess_options=sess_options, providers=["CPUExecutionProvider"])
            self._got = [p for p in names if p != "TensorrtExecutionProvider"]  # libnvinfer missing; CUDA loads

        def get_providers(self) -> list[str]:
            return self._got

        def __getattr__(self, name: str) -> Any:
            return getattr(self._s, name)

    fake.InferenceSession = Session  # type: ignore[attr-defined]
    return fake


@pytest.fixture
def gpu_cart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", _gpu_ort_without_tensorrt_libraries())
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # no TensorRT bindings: trt is passed over too


def test_run_with_a_profile_moves_past_a_provider_that_does_not_load(gpu_cart: None, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    from edgeclf.runtime.app import run_bundle
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    s = run_bundle(str(bundle), "synthetic:ultrasound?frames=3&size=32", device="x86-nvidia-gpu")
    assert s["backend"] == "ort-cuda" and s["frames"] == 3
    assert "ort-tensorrt did not load here, fell back to ort-cuda" in s["chosen_by"]["backend"]
    assert any("falling back to ort-cuda" in r.getMessage() for r in caplog.records)


def test_an_explicit_backend_that_does_not_load_still_fails(gpu_cart: None, tmp_path: Path) -> None:
    from edgeclf.errors import ProviderUnavailableError
    from edgeclf.runtime.app import run_bundle
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    with pytest.raises(ProviderUnavailableError, match="asked onnxruntime for TensorrtExecutionProvider"):
        run_bundle(str(bundle), "synthetic:ultrasound?frames=3&size=32", backend="ort-tensorrt", device="x86-nvidia-gpu")


def test_bundle_check_with_a_profile_moves_past_it_too(gpu_cart: None, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeclf.cli import cli
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    r = CliRunner().invoke(cli, ["bundle", "check", str(bundle), "--device", "x86-nvidia-gpu", "--json"])
    assert r.exit_code == 0, r.output
    assert '"backend": "ort-cuda"' in r.output and "fell back to ort-cuda" in r.output


def test_profile_with_a_device_moves_past_it_too(gpu_cart: None, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from edgeclf.cli import cli
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    r = CliRunner().invoke(cli, ["profile", "--bundle", str(bundle), "--device", "x86-nvidia-gpu", "--source",
                                 "synthetic:ultrasound?frames=12&size=32", "--frames", "6", "--warmup", "2",
                                 "--bootstrap", "0", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    doc = json.loads(r.output[r.output.index("{"):])
    assert [t["backend"] for t in doc["targets"]] == ["ort-cuda"]
