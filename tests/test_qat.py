"""Quantization-aware fine-tuning: the fake quantization mimics ONNX Runtime's QDQ, comes off cleanly,
and is the INT8 ladder's last rung, recorded (or skipped with its reason) in the bundle."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeclf.export.bundle_writer import ExportConfig, export_bundle
from edgeclf.export.onnx_export import ExportError
from tests.conftest import TINY_DATA
from tests.export import _calibrated_on

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

from edgeclf.export.qat import fake_quant_spec, wrap_fake_quant  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()


def _round_trip(v: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return (np.clip(np.rint(v / scale) + zero, qmin, qmax) - zero) * scale


@pytest.mark.parametrize("flavour", ["cpu", "tensorrt"])
def test_fake_quant_matches_an_explicit_per_channel_round_trip(flavour: str) -> None:
    import torch.nn.functional as F

    conv = torch.nn.Conv2d(2, 3, 3, bias=True).eval()
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([1.0, 10.0, 0.01]).view(3, 1, 1, 1))  # very different channel ranges
    x = np.random.default_rng(0).standard_normal((4, 2, 6, 6)).astype(np.float32) + 0.3
    wrapped = wrap_fake_quant(copy.deepcopy(conv), flavour)
    wrapped.calibrate(x)
    s = fake_quant_spec(flavour)

    w = conv.weight.detach().numpy().astype(np.float64)
    wscale = 2 * np.abs(w).reshape(3, -1).max(1) / (s.weight_qmax - s.weight_qmin)
    wq = _round_trip(w, wscale.reshape(3, 1, 1, 1), np.zeros((3, 1, 1, 1)), s.weight_qmin, s.weight_qmax)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if s.act_symmetric:
        ascale, azero = 2 * max(-lo, hi) / (s.act_qmax - s.act_qmin), 0.0
    else:
        ascale = (hi - lo) / (s.act_qmax - s.act_qmin)
        azero = float(np.rint(s.act_qmin - lo / ascale))
    xq = _round_trip(x.astype(np.float64), ascale, azero, s.act_qmin, s.act_qmax)
    expect = F.conv2d(torch.from_numpy(xq).float(), torch.from_numpy(wq).float(), conv.bias).detach().numpy()

    with torch.no_grad():
        got = wrapped(torch.from_numpy(x)).numpy()
        plain = conv(torch.from_numpy(x)).numpy()
    assert np.abs(got - plain).max() > 1e-3  # it really quantizes
    np.testing.assert_allclose(got, expect, atol=2e-5, rtol=1e-5)
    assert wrapped.layers == ["<root>"]


def test_removing_fake_quant_gives_back_a_plain_module_that_exports(tmp_path: Path) -> None:
    from edgeclf.export.bundle_writer import _ort_logits
    from edgeclf.export.onnx_export import export_onnx

    model = _tiny()
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    wrapped = wrap_fake_quant(copy.deepcopy(model), "cpu")
    wrapped.calibrate(x)
    assert wrapped.layers == ["0", "4"] and len(wrapped.observers) == 2
    wrapped.train()
    assert not any(m.training for m in wrapped.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    plain = wrapped.unwrap()
    assert type(plain[0]) is torch.nn.Conv2d and type(plain[4]) is torch.nn.Linear
    assert set(plain.state_dict()) == set(model.state_dict())
    assert all(not m._forward_pre_hooks for m in plain.modules())
    with torch.no_grad():
        np.testing.assert_array_equal(plain(torch.from_numpy(x)).numpy(), model(torch.from_numpy(x)).numpy())
    export_onnx(plain, x, tmp_path / "m.onnx")
    np.testing.assert_allclose(_ort_logits(tmp_path / "m.onnx", x), model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("flavour", ["cpu", "tensorrt"])
def test_input_ranges_are_onnxruntimes_own(flavour: str, tmp_path: Path) -> None:
    """The first layer's input scale and zero point are those ORT's static QDQ writes for the same images."""
    import onnx
    from onnx import numpy_helper

    from edgeclf.export.onnx_export import export_onnx
    from edgeclf.export.quantize import quantize_int8

    model = _tiny()
    x = np.random.default_rng(2).standard_normal((16, 1, 8, 8)).astype(np.float32) * 0.7 + 0.2
    export_onnx(model, x, tmp_path / "m.onnx")
    quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", x, flavour=flavour)
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    wrapped = wrap_fake_quant(copy.deepcopy(model), flavour)
    wrapped.calibrate(x)
    scale, zero = list(wrapped.observers.values())[0].qparams()
    assert float(scale) == pytest.approx(float(inits[q.input[1]]), rel=1e-6)
    assert int(zero) == int(inits[q.input[2]])


# ------------------------------------------------------------------------------------ the rung
def _quantizer(monkeypatch: pytest.MonkeyPatch, scrambled: Path, *, qat_fixes: bool) -> list[str]:
    """An INT8 conversion that ruins every model (it writes an unrelated network), except - when
    qat_fixes - the one the QAT rung hands it, for which it writes the fp32 parent (the tiny test model's
    logits span less than one unit, so any real fine-tuning moves its decisions: this test is about the
    ladder, not about how well QAT works)."""
    import edgeclf.export.quantize as q

    seen: list[str] = []
    parent: list[Path] = []

    def fake(fp32_path, out_path, calib, *, flavour="cpu", method="minmax", **kw):
        seen.append(Path(fp32_path).name)
        if Path(fp32_path).name == "model.onnx" and not parent:
            parent.append(Path(fp32_path))
        ok = qat_fixes and Path(fp32_path).name == "qat.fp32.onnx"
        shutil.copyfile(parent[0] if ok else scrambled, out_path)
        return {"precision": "int8", "flavour": flavour, "method": method, **_calibrated_on(calib)}

    monkeypatch.setattr(q, "quantize_int8", fake)
    return seen


@pytest.fixture
def scrambled(tmp_path: Path) -> Path:
    from edgeclf.export.onnx_export import export_onnx
    from edgeclf.models import create_model

    torch.manual_seed(123)
    path = tmp_path / "other.onnx"
    export_onnx(create_model("compact", num_outputs=3, in_chans=1), np.zeros((1, 1, 32, 32), np.float32), path)
    return path


def test_qat_rung_is_reached_and_recorded_when_the_ladder_fails(trained_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, scrambled: Path) -> None:
    seen = _quantizer(monkeypatch, scrambled, qat_fixes=True)
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(trained_dir), precision="int8", max_drop=0.01, qat_epochs=1))
    assert seen.count("qat.fp32.onnx") == 2  # one fine-tuning per flavour
    assert [v["id"] for v in m["variants"]] == ["int8-cpu", "int8-tensorrt"]
    for v in m["variants"]:
        assert [r["rung"] for r in v["rungs"]] == ["plain", "float-fallback", "qat"]
        plain, fallback, qat = v["rungs"]
        assert not plain["passed"] and not fallback["passed"] and fallback["kept_float"]
        assert qat["passed"] and qat["epochs"] == 1 and qat["best_epoch"] == 1 and qat["seconds"] >= 0
        assert set(qat["worst"]) == {"metric", "drop", "drop_ci95"} and qat["worst"]["drop"] <= 0.01
        assert v["gate"]["passed"] and v["quantization"]["qat"] is True
        assert v["qat"]["flavour"] == v["flavour"] and len(v["qat"]["history"]) == 1
    assert all(c["qat"] and c["passed"] for c in m["deploy"]["candidates"])
    assert [r["rung"] for r in m["deploy"]["candidates"][0]["rungs"]] == ["plain", "float-fallback", "qat"]


def test_refusal_says_qat_was_tried(trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scrambled: Path) -> None:
    _quantizer(monkeypatch, scrambled, qat_fixes=False)
    with pytest.raises(ExportError, match=r"int8-cpu fails the gate: \S+ drops by .*after 1 epoch\(s\) of quantization-aware "
                                          r"fine-tuning \S+ still drops by") as info:
        export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(trained_dir), precision="int8", max_drop=0.0001, qat_epochs=1))
    assert "\n" not in str(info.value) and not (tmp_path / "b").exists()
    m = export_bundle(ExportConfig(out=str(tmp_path / "a"), model=str(trained_dir), precision="auto", max_drop=0.0001, qat_epochs=0))
    assert m["deploy"]["precision"] == "fp32"
    assert m["deploy"]["candidates"][0]["rungs"][-1] == {"rung": "qat", "passed": False, "skipped": "--qat-epochs is 0"}


def test_qat_is_skipped_with_its_reason_for_an_imported_onnx_model(bundle_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, scrambled: Path) -> None:
    seen = _quantizer(monkeypatch, scrambled, qat_fixes=True)
    common = dict(from_onnx=str(bundle_dir / "model.onnx"), labels="normal,cyst,mass", task="multiclass", size=32, channels=1,
                  data=TINY_DATA, max_drop=0.0001)
    with pytest.raises(ExportError, match=r"drops by .*quantization-aware fine-tuning was not tried \(the source is an ONNX file"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), precision="int8", **common))
    m = export_bundle(ExportConfig(out=str(tmp_path / "a"), precision="auto", **common))
    assert "qat.fp32.onnx" not in seen and m["deploy"]["precision"] == "fp32"
    for c in m["deploy"]["candidates"]:
        assert c["rungs"][-1]["rung"] == "qat" and "ONNX file" in c["rungs"][-1]["skipped"] and not c["qat"]
