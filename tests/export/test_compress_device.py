"""`--precision auto --device PROFILE`: the profile's backend decides the candidates; latency is measured
only where that backend exists on this machine, otherwise the profile's stated preference decides."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeclf.errors import ConfigError
from edgeclf.export.bundle_writer import ExportConfig, export_bundle
from edgeclf.runtime.bundle import load_bundle
from tests.conftest import run_cli
from tests.export import _calibrated_on

pytest.importorskip("onnxruntime.quantization")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # QAT fine-tunes in torch


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as most are here: ONNX Runtime with the CPU provider only."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def test_device_cpu_times_its_one_candidate_on_this_machine(trained_dir: Path, tmp_path: Path) -> None:
    m = export_bundle(ExportConfig(out=str(tmp_path / "a"), model=str(trained_dir), precision="auto", max_drop=0.5, min_agreement=0.5,
                                   device="x86-cpu"))
    dep = m["deploy"]
    assert [c["id"] for c in dep["candidates"]] == ["int8-cpu"]
    assert dep["device"] == "x86-cpu" and dep["backend"] == "ort-cpu" and dep["latency_measured"] is True
    assert set(dep["latency_ms"]) == {"fp32", "int8-cpu"} and all(v["median"] > 0 for v in dep["latency_ms"].values())
    faster = dep["latency_ms"]["int8-cpu"]["median"] * 1.05 < dep["latency_ms"]["fp32"]["median"]
    assert dep["precision"] == ("int8" if faster else "fp32") and dep["reason"].startswith("for device x86-cpu: ")
    json.dumps(m, allow_nan=False)


def test_device_gpu_without_its_backend_chooses_by_preference_and_says_so(trained_dir: Path, tmp_path: Path,
                                                                          no_gpu: None) -> None:
    pytest.importorskip("onnxruntime.transformers")  # the fp16 converter
    m = export_bundle(ExportConfig(out=str(tmp_path / "a"), model=str(trained_dir), precision="auto", max_drop=0.5, min_agreement=0.5,
                                   device="x86-nvidia-gpu"))
    dep = m["deploy"]
    assert [c["id"] for c in dep["candidates"]] == ["int8-tensorrt", "fp16"]
    assert [v["id"] for v in m["variants"]] == ["int8-tensorrt", "fp16"]
    assert dep["precision"] == "int8" and dep["device"] == "x86-nvidia-gpu" and dep["backend"] == "ort-tensorrt"
    assert dep["latency_measured"] is False and "latency_ms" not in dep
    assert "latency was not measured because ort-tensorrt (TensorrtExecutionProvider) is not available" in dep["reason"]
    assert all(c["latency_ms"] is None for c in dep["candidates"])
    b = load_bundle(tmp_path / "a")
    assert b.select(None, "ort-tensorrt")[1] == "int8-tensorrt"
    assert b.select(None, "ort-cpu")[1] == "fp32"  # no cpu flavour in a GPU bundle: never guess


def test_device_preference_falls_to_fp16_when_int8_fails(trained_dir: Path, tmp_path: Path, no_gpu: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime.transformers")
    torch = pytest.importorskip("torch")
    import edgeclf.export.quantize as q
    from edgeclf.export.onnx_export import export_onnx
    from edgeclf.models import create_model

    torch.manual_seed(123)
    other = tmp_path / "other.onnx"
    export_onnx(create_model("compact", num_outputs=3, in_chans=1), np.zeros((1, 1, 32, 32), np.float32), other)

    def broken(fp32_path, out_path, calib, *, flavour="cpu", method="minmax", **kw):
        shutil.copyfile(other, out_path)
        return {"precision": "int8", "flavour": flavour, "method": method, **_calibrated_on(calib)}

    monkeypatch.setattr(q, "quantize_int8", broken)
    m = export_bundle(ExportConfig(out=str(tmp_path / "a"), model=str(trained_dir), precision="auto", max_drop=0.0001,
                                   device="x86-nvidia-gpu", qat_epochs=0))
    dep = m["deploy"]
    assert [v["id"] for v in m["variants"]] == ["fp16"] and dep["precision"] == "fp16"
    assert "fp16 passed the gate" in dep["reason"] and "not measured" in dep["reason"]


def test_device_gpu_with_its_backend_times_there(trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the profile's backend exists, the candidates are timed on it (the timing is stood in for here)."""
    pytest.importorskip("onnxruntime.transformers")
    import onnxruntime as ort

    import edgeclf.export.compress as cm

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                                 "CPUExecutionProvider"])
    calls: list[tuple[list[str], str]] = []

    def timed(paths, x1, *, backend="ort-cpu", **kw):
        calls.append((list(paths), backend))
        ms = {"fp32": 2.0, "int8-tensorrt": 1.5, "fp16": 1.0}
        return {k: {"median": ms[k], "p90": ms[k], "runs": 1, "batch": 1} for k in paths}

    monkeypatch.setattr(cm, "measure_latency", timed)
    m = export_bundle(ExportConfig(out=str(tmp_path / "a"), model=str(trained_dir), precision="auto", max_drop=0.5, min_agreement=0.5,
                                   device="x86-nvidia-gpu"))
    dep = m["deploy"]
    assert calls == [(["fp32", "int8-tensorrt", "fp16"], "ort-tensorrt")]
    assert dep["precision"] == "fp16" and dep["latency_measured"] is True and "2.00x faster" in dep["reason"]
    assert "on ort-tensorrt here" in dep["reason"] and dep["latency_ms"]["fp16"]["median"] == 1.0


def test_device_is_checked_before_any_work(trained_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device profile 'no-such-board' is unknown; available: .*jetson-orin-nx.*x86-cpu"):
        ExportConfig(out=str(tmp_path / "a"), model=str(trained_dir), precision="auto", device="no-such-board")
    with pytest.raises(ConfigError, match="--precision auto"):
        ExportConfig(out=str(tmp_path / "a"), model=str(trained_dir), precision="int8", device="x86-cpu")
    r = run_cli("export", "--model", str(trained_dir), "--out", str(tmp_path / "c"), "--precision", "auto", "--device", "no-such-board")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no-such-board" in lines[0] and r.stdout == "", r.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("board", ["jetson-orin-nx", "jetson-xavier-nx", "jetson-orin-nano"])
def test_jetson_profiles_plan_tensorrt_candidates_and_say_it_is_missing_here(board: str) -> None:
    from edgeclf.export.compress import device_plan
    from edgeclf.runtime.engine import tensorrt_missing

    plan = device_plan(board)
    assert plan["backend"] == "trt" and plan["candidates"] == ["int8-tensorrt", "fp16"]
    assert plan["available"] is (tensorrt_missing() is None)
