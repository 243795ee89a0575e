"""Compressed variants at export: gated, recorded, re-checked on the device, chosen by the runtime."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeclf.errors import BundleError
from edgeclf.export.bundle_writer import ExportConfig, export_bundle
from edgeclf.export.onnx_export import ExportError
from edgeclf.export.quantize import calibration_indices
from edgeclf.runtime.app import run_bundle, verify_bundle
from edgeclf.runtime.bundle import load_bundle
from tests.export import _calibrated_on

pytest.importorskip("onnxruntime.quantization")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # QAT fine-tunes in torch


def test_int8_bundle_holds_both_flavours_each_rechecked_and_selectable(trained_dir: Path, tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate

    out = tmp_path / "b"
    # The fixture's tiny model sits near its threshold: only the structure is tested here, not agreement.
    m = export_bundle(ExportConfig(out=str(out), model=str(trained_dir), precision="int8", max_drop=0.5, min_agreement=0.5))
    assert [v["id"] for v in m["variants"]] == ["int8-cpu", "int8-tensorrt"]
    assert m["deploy"]["precision"] == "int8"
    cal = m["provenance"]["calibration"]
    assert cal["split"] == "train" and cal["n"] > 0 and len(cal["sha256"]) == 64
    for v in m["variants"]:
        assert (out / v["file"]).is_file() and v["gate"]["passed"]
        assert all(d.startswith("val[") for d in v["gate"]["disagreements"])  # indices, never file names
    with np.load(out / "reference.npz") as z:
        assert {"logits__int8-cpu", "logits__int8-tensorrt"} <= set(z.files)
    r = verify_bundle(str(out))
    assert [c["model"] for c in r["reference"]["variants"]] == ["int8-cpu", "int8-tensorrt"]
    b = load_bundle(out)
    assert b.select(None, "ort-cpu")[1] == "int8-cpu" and b.select(None, "ort-tensorrt")[1] == "int8-tensorrt"
    assert b.select("fp32", "ort-cpu")[1] == "fp32"
    with pytest.raises(BundleError, match="not fp16"):
        b.select("fp16", "ort-cpu")
    assert run_bundle(str(out), "synthetic:ultrasound?frames=4")["model"] == "int8-cpu"
    assert evaluate(str(out), split="test", n_boot=50)["evaluated_with"].endswith("int8-cpu)")


def _broken_quantizer(monkeypatch: pytest.MonkeyPatch, other_onnx: Path) -> None:
    """Stand in for an INT8 conversion that ruins the model: it writes an unrelated network."""
    import edgeclf.export.quantize as q

    def fake(fp32_path, out_path, calib, *, flavour="cpu", method="minmax", **kw):
        shutil.copyfile(other_onnx, out_path)
        return {"precision": "int8", "flavour": flavour, "method": method, **_calibrated_on(calib)}

    monkeypatch.setattr(q, "quantize_int8", fake)


@pytest.fixture
def scrambled_onnx(tmp_path: Path) -> Path:
    torch = pytest.importorskip("torch")
    from edgeclf.export.onnx_export import export_onnx
    from edgeclf.models import create_model

    torch.manual_seed(123)
    path = tmp_path / "other.onnx"
    export_onnx(create_model("compact", num_outputs=3, in_chans=1), np.zeros((1, 1, 32, 32), np.float32), path)
    return path


def test_int8_that_loses_accuracy_is_refused_and_named(trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        scrambled_onnx: Path) -> None:
    _broken_quantizer(monkeypatch, scrambled_onnx)
    with pytest.raises(ExportError, match=r"int8-cpu fails the gate: (auc_macro|sensitivity\[\w+\]) drops by") as info:
        export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(trained_dir), precision="int8", max_drop=0.0001, qat_epochs=1))
    assert "\n" not in str(info.value) and "quantization-aware fine-tuning" in str(info.value)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))
    # auto with the same limit falls back to fp32 and says why; nothing failing is shipped.
    m = export_bundle(ExportConfig(out=str(tmp_path / "a"), model=str(trained_dir), precision="auto", max_drop=0.0001, qat_epochs=1))
    assert m["deploy"]["precision"] == "fp32" and "int8-cpu candidate failed the gate" in m["deploy"]["reason"]
    assert m["variants"] == [] and all(not c["passed"] for c in m["deploy"]["candidates"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checksums.sha256", "manifest.json", "model.onnx", "reference.npz"]


def test_auto_records_latency_and_its_choice(trained_dir: Path, tmp_path: Path) -> None:
    m = export_bundle(ExportConfig(out=str(tmp_path / "a"), model=str(trained_dir), precision="auto", max_drop=0.5, min_agreement=0.5))
    dep = m["deploy"]
    assert set(dep["latency_ms"]) == {"fp32", "int8-cpu"} and all(v["median"] > 0 for v in dep["latency_ms"].values())
    faster = dep["latency_ms"]["int8-cpu"]["median"] * 1.05 < dep["latency_ms"]["fp32"]["median"]
    assert dep["precision"] == ("int8" if faster else "fp32") and dep["reason"]
    json.dumps(m, allow_nan=False)


def test_calibration_indices_are_stratified_and_seeded() -> None:
    y = np.array([0] * 80 + [1] * 20)
    a, b = calibration_indices(y, 10, 0), calibration_indices(y, 10, 1)
    assert len(a) == 10 and (y[a] == 1).sum() == 2 and not np.array_equal(np.sort(a), np.sort(b))
    assert np.array_equal(a, calibration_indices(y, 10, 0))
    assert np.array_equal(calibration_indices(y, 500, 0), np.arange(100))


def test_ladder_keeps_the_one_harmful_layer_in_float(trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      scrambled_onnx: Path) -> None:
    """A quantizer that ruins the model only when one particular layer is quantized: the per-layer
    analysis must find that layer, and the first rung (keep it in float) must pass."""
    import edgeclf.export.quantize as q

    real_nodes = q.quantizable_nodes
    calls: list[list[str]] = []

    def fake(fp32_path, out_path, calib, *, flavour="cpu", method="minmax", nodes_to_exclude=(), **kw):
        bad = real_nodes(fp32_path)[1]
        calls.append(list(nodes_to_exclude))
        shutil.copyfile(fp32_path if bad in nodes_to_exclude else scrambled_onnx, out_path)
        return {"precision": "int8", "flavour": flavour, "method": method, **_calibrated_on(calib)}

    monkeypatch.setattr(q, "quantize_int8", fake)
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(trained_dir), precision="int8", max_drop=0.01))
    bad = real_nodes(tmp_path / "b" / "model.onnx")[1]
    for v in m["variants"]:
        assert v["gate"]["passed"] and v["quantization"]["kept_float"] == [bad]
        lad = v["ladder"]
        assert lad["passed"] is True and lad["rungs"][0]["kept_float"] == [bad]
        worst = max(lad["sensitivity"], key=lambda s: s["worst_drop"])
        assert worst["node"] == bad and worst["worst_drop"] > 0.01
    assert [c["kept_float"] for c in m["deploy"]["candidates"]] == [[bad], [bad]]


def test_cli_refusal_is_one_line_exit_2_and_writes_nothing(trained_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    # The fixture's tiny model flips a few validation decisions under INT8: below the 0.98 agreement floor.
    out = tmp_path / "b"
    r = run_cli("export", "--model", str(trained_dir), "--out", str(out), "--precision", "int8", "--qat-epochs", "0")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "fails the gate" in lines[0] and "no bundle was written" in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".b*"))


def _candidate(drop: float, lo: float, ceiling: float) -> dict:
    check = {"metric": "benign", "drop": drop, "drop_ci95": [lo, drop + 0.1], "passed": False}
    return {"id": "int8-cpu", "gate": {"ceiling": ceiling, "checks": [check]}}


def test_refusal_names_the_limit_that_failed() -> None:
    from edgeclf.export.compress import _refusal

    # Over the ceiling with an interval touching zero (three flips): the ceiling decided, not --max-drop.
    text = _refusal(_candidate(0.3, 0.0, 0.05), 0.01)
    assert "hard ceiling 0.05" in text and "whatever its interval" in text and "over --max-drop" not in text
    # Under the ceiling, interval clear of zero: --max-drop decided.
    text = _refusal(_candidate(0.03, 0.01, 0.05), 0.01)
    assert "over --max-drop 0.01" in text and "ceiling" not in text


def test_refusal_of_non_finite_outputs_says_so() -> None:
    from edgeclf.export.compress import _refusal

    check = {"metric": "finite_outputs", "drop": 0.05, "drop_ci95": [0.05, 0.05], "n_non_finite": 2, "passed": False}
    text = _refusal({"id": "fp16", "gate": {"ceiling": 0.05, "n": 40, "checks": [check]}}, 0.01)
    assert text.startswith("fp16 fails the gate: it outputs NaN or infinity on 2 of 40 validation images; ") and "\n" not in text


def test_fp16_alone_records_no_calibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scrambled_onnx: Path) -> None:
    """Provenance names a calibration only where an INT8 model was calibrated: fp16 uses none."""
    import edgeclf.export.quantize as q
    from edgeclf.export.bundle_writer import _ort_logits
    from edgeclf.export.compress import compress
    from edgeclf.runtime.postprocess import DecisionRule

    def same(fp32_path, out_path):  # a lossless stand-in for the converter
        shutil.copyfile(fp32_path, out_path)
        return {"precision": "fp16", "keep_io_types": True, "converter": "test"}

    monkeypatch.setattr(q, "convert_fp16", same)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1, 32, 32)).astype(np.float32)
    y = np.arange(12) % 3
    out = compress(tmp_path, scrambled_onnx, precision="fp16", max_drop=0.01, calib_x=x[:4], calib_method="minmax",
                   val_x=x, val_y=y, val_ids=[f"val[{i}]" for i in range(12)], parent_logits=_ort_logits(scrambled_onnx, x),
                   task="multiclass", temperature=1.0, rule=DecisionRule("max-ratio", (0.3, 0.3, 0.3)), labels=["a", "b", "c"])
    assert out["calibration"] is None and [v["id"] for v in out["variants"]] == ["fp16"]


def _val_args(onnx_path: Path) -> dict:
    """compress() keyword arguments for a 3-class model on 12 random 32 px validation images."""
    from edgeclf.export.bundle_writer import _ort_logits
    from edgeclf.runtime.postprocess import DecisionRule

    x = np.random.default_rng(0).normal(size=(12, 1, 32, 32)).astype(np.float32)
    return dict(max_drop=0.01, calib_x=x[:4], calib_method="minmax", val_x=x, val_y=np.arange(12) % 3,
                val_ids=[f"val[{i}]" for i in range(12)], parent_logits=_ort_logits(onnx_path, x), task="multiclass",
                temperature=1.0, rule=DecisionRule("max-ratio", (0.3, 0.3, 0.3)), labels=["a", "b", "c"])


def _quantizer_failing_on(monkeypatch: pytest.MonkeyPatch, bad: set[str], exc: Exception) -> None:
    """INT8 that raises `exc` for the flavours in `bad` and is lossless (a copy of fp32) for the others."""
    import edgeclf.export.quantize as q

    def fake(fp32_path, out_path, calib, *, flavour="cpu", method="minmax", **kw):
        if flavour in bad:
            raise exc
        shutil.copyfile(fp32_path, out_path)
        return {"precision": "int8", "flavour": flavour, "method": method, **_calibrated_on(calib)}

    monkeypatch.setattr(q, "quantize_int8", fake)


UNSUPPORTED = "onnxruntime could not quantize model.onnx (minmax, tensorrt): unsupported operator FancyPool"


def test_auto_records_a_candidate_that_cannot_be_built_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   scrambled_onnx: Path) -> None:
    import edgeclf.export.compress as cm
    from edgeclf.errors import ConfigError, ModelError

    monkeypatch.setattr(cm, "measure_latency", lambda paths, x1, **kw: {
        k: {"median": 1.0 if k == "fp32" else 0.5, "p90": 1.0, "runs": 1, "batch": 1} for k in paths})
    _quantizer_failing_on(monkeypatch, {"tensorrt"}, ModelError(UNSUPPORTED))
    out = cm.compress(tmp_path, scrambled_onnx, precision="auto", **_val_args(scrambled_onnx))
    assert [v["id"] for v in out["variants"]] == ["int8-cpu"] and out["deploy"]["precision"] == "int8"
    trt = next(c for c in out["candidates"] if c["id"] == "int8-tensorrt")
    assert trt["built"] is False and trt["passed"] is False and trt["failed_on"] == ["build"] and trt["error"] == UNSUPPORTED
    assert trt["rungs"] == [{"rung": "build", "passed": False, "error": UNSUPPORTED}]
    assert f"int8-tensorrt could not be built ({UNSUPPORTED})" in out["deploy"]["reason"]  # printed with the deploy line
    assert out["calibration"] is not None and not (tmp_path / "model.int8-tensorrt.onnx").exists()
    json.dumps(out, allow_nan=False)
    # Only "cannot build this candidate" is caught: a wrong option or a bug still stops the export as it is.
    _quantizer_failing_on(monkeypatch, {"tensorrt"}, ConfigError("calibration method 'foo' is unknown"))
    with pytest.raises(ConfigError, match="'foo' is unknown"):
        cm.compress(tmp_path, scrambled_onnx, precision="auto", **_val_args(scrambled_onnx))
    _quantizer_failing_on(monkeypatch, {"tensorrt"}, KeyError("a bug"))
    with pytest.raises(KeyError, match="a bug"):
        cm.compress(tmp_path, scrambled_onnx, precision="auto", **_val_args(scrambled_onnx))


def test_auto_with_no_buildable_candidate_keeps_fp32_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  scrambled_onnx: Path) -> None:
    from edgeclf.errors import MissingExtraError, ModelError
    from edgeclf.export.compress import compress

    _quantizer_failing_on(monkeypatch, {"cpu", "tensorrt"}, ModelError(UNSUPPORTED))
    out = compress(tmp_path, scrambled_onnx, precision="auto", **_val_args(scrambled_onnx))
    dep = out["deploy"]
    assert out["variants"] == [] and dep["precision"] == "fp32" and out["calibration"] is None  # nothing was calibrated
    assert dep["reason"].startswith(f"the int8-cpu candidate could not be built ({UNSUPPORTED})")
    assert f"int8-tensorrt could not be built ({UNSUPPORTED})" in dep["reason"]
    assert [(c["id"], c["built"]) for c in out["candidates"]] == [("int8-cpu", False), ("int8-tensorrt", False)]
    # A device whose candidates include fp16, without the fp16 converter here: named per candidate, fp32 kept.
    import edgeclf.export.quantize as q

    def no_converter(fp32_path, out_path):
        raise MissingExtraError("fp16 conversion needs onnxconverter-common; install it with: pip install onnxconverter-common")

    monkeypatch.setattr(q, "convert_fp16", no_converter)
    out = compress(tmp_path, scrambled_onnx, precision="auto", device="x86-nvidia-gpu", **_val_args(scrambled_onnx))
    assert out["deploy"]["precision"] == "fp32" and "fp16 could not be built (fp16 conversion needs" in out["deploy"]["reason"]
    assert "int8-tensorrt could not be built" in out["deploy"]["reason"]


def test_explicit_int8_that_cannot_be_built_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   scrambled_onnx: Path) -> None:
    from edgeclf.errors import ModelError
    from edgeclf.export.compress import compress

    _quantizer_failing_on(monkeypatch, {"tensorrt"}, ModelError(UNSUPPORTED))
    with pytest.raises(ExportError, match=r"^int8-tensorrt could not be built: .*FancyPool; no bundle was written; .*--precision auto") \
            as info:
        compress(tmp_path, scrambled_onnx, precision="int8", **_val_args(scrambled_onnx))
    assert "\n" not in str(info.value)


def test_export_auto_ships_what_builds_and_records_what_did_not(trained_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.export.quantize as q
    from edgeclf.errors import ModelError

    real = q.quantize_int8

    def trt_unsupported(fp32_path, out_path, calib, *, flavour="cpu", **kw):
        if flavour == "tensorrt":
            raise ModelError(UNSUPPORTED)
        return real(fp32_path, out_path, calib, flavour=flavour, **kw)

    monkeypatch.setattr(q, "quantize_int8", trt_unsupported)
    out = tmp_path / "a"
    m = export_bundle(ExportConfig(out=str(out), model=str(trained_dir), precision="auto", max_drop=0.5, min_agreement=0.5))
    assert [v["id"] for v in m["variants"]] == ["int8-cpu"]
    trt = next(c for c in m["deploy"]["candidates"] if c["id"] == "int8-tensorrt")
    assert trt["built"] is False and trt["error"] == UNSUPPORTED and "int8-tensorrt could not be built" in m["deploy"]["reason"]
    assert json.loads((out / "manifest.json").read_text())["deploy"]["candidates"] == m["deploy"]["candidates"]
    assert not (out / "model.int8-tensorrt.onnx").exists()
    verify_bundle(str(out))


def test_export_gate_resamples_the_validation_groups(trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the data's validation split has groups of several images (near copies, frames of a clip), the gate
    draws groups; its record names the unit."""
    from edgeclf.export import bundle_writer

    real = bundle_writer.load_dataset

    def paired(*args, **kw):  # the synthetic set's images are their own groups: pair them up as near copies
        ds = real(*args, **kw)
        val = ds.splits["val"]
        val.groups = [val.groups[i - i % 2] for i in range(len(val.groups))]
        return ds

    monkeypatch.setattr(bundle_writer, "load_dataset", paired)
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(trained_dir), precision="int8", max_drop=0.5, min_agreement=0.5,
                                   qat_epochs=0))
    n = m["metrics"]["val_onnx_fp32"]["n"]
    for v in m["variants"]:
        assert v["gate"]["unit"] == "group" and v["gate"]["n_units"] == (n + 1) // 2 and v["gate"]["n"] == n


def _fixed_batch_onnx(path: Path, batch: int) -> None:
    """`compact` exported with no dynamic axes: it takes batches of exactly `batch` (as users' ONNX files may)."""
    import warnings

    torch = pytest.importorskip("torch")
    from edgeclf.models import create_model

    torch.manual_seed(0)
    m = create_model("compact", num_outputs=3, in_chans=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.zeros(batch, 1, 32, 32),), str(path), opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["logits"])


def _fixed_batch_args(path: Path, calib_n: int) -> dict:
    """compress() keyword arguments for a fixed-batch-4 model on 12 validation images (3 whole batches)."""
    from edgeclf.export.bundle_writer import _ort_logits
    from edgeclf.runtime.postprocess import DecisionRule

    _fixed_batch_onnx(path, 4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1, 32, 32)).astype(np.float32)
    calib = rng.normal(size=(calib_n, 1, 32, 32)).astype(np.float32)
    return dict(max_drop=0.99, min_agreement=0.0, calib_x=calib, calib_method="minmax", val_x=x, val_y=np.arange(12) % 3,
                val_ids=[str(i) for i in range(12)], parent_logits=_ort_logits(path, x), task="multiclass", temperature=1.0,
                rule=DecisionRule("max-ratio", (0.3, 0.3, 0.3)), labels=["a", "b", "c"])


def test_calibration_record_names_the_images_the_quantizer_used(tmp_path: Path) -> None:
    """6 calibration images, batches of exactly 4: 4 are read, and provenance must describe those 4."""
    import hashlib

    from edgeclf.export.compress import compress

    args = _fixed_batch_args(tmp_path / "model.onnx", 6)
    out = compress(tmp_path, tmp_path / "model.onnx", precision="int8", **args)
    calib = args["calib_x"]
    for v in out["variants"]:
        assert v["quantization"]["calibration_n"] == 4
    assert out["calibration"] == {"n": 4, "method": "minmax", "split": "train", "seed": 0, "offered": 6,
                                  "sha256": hashlib.sha256(np.ascontiguousarray(calib[:4]).tobytes()).hexdigest()}


def test_auto_times_a_fixed_batch_model_on_a_full_batch_per_image(tmp_path: Path) -> None:
    from edgeclf.export.compress import compress

    args = _fixed_batch_args(tmp_path / "model.onnx", 8)
    out = compress(tmp_path, tmp_path / "model.onnx", precision="auto", **args)
    lat = out["deploy"]["latency_ms"]
    assert set(lat) == {"fp32", "int8-cpu"} and all(v["batch"] == 4 and v["median"] > 0 for v in lat.values())
    assert "ms median per image, batch 4" in out["deploy"]["reason"]
    assert next(c for c in out["candidates"] if c["id"] == "int8-cpu")["latency_ms"] == lat["int8-cpu"]


def test_measure_latency_is_per_image_on_one_shared_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed batch of 4 from 3 images: every model gets the same 4 rows, and 8 ms a call is 2 ms an image."""
    import types

    import edgeclf.export.compress as cm
    import edgeclf.runtime.backends as backends
    from edgeclf.errors import ModelError

    fed: list[tuple[str, tuple[int, ...]]] = []

    class Fake:
        def __init__(self, path: str, shape, num_outputs, **kw) -> None:  # noqa: ANN001
            self.path, self.fixed_batch = path, 4 if "fixed" in path else None

        def infer(self, x: np.ndarray) -> np.ndarray:
            fed.append((self.path, x.shape))
            return np.zeros((len(x), 3), np.float32)

        def close(self) -> None:
            pass

    clock = iter(range(10**6))
    monkeypatch.setattr(backends, "OrtBackend", Fake)
    monkeypatch.setattr(cm, "time", types.SimpleNamespace(perf_counter=lambda: next(clock) * 0.008))
    x = np.zeros((3, 1, 8, 8), np.float32)
    lat = cm.measure_latency({"a": Path("fixed-a"), "b": Path("dynamic-b")}, x, runs=5, warmup=1)
    assert lat == {k: {"median": pytest.approx(2.0), "p90": pytest.approx(2.0), "runs": 5, "batch": 4} for k in ("a", "b")}
    assert {s for _, s in fed} == {(4, 1, 8, 8)}
    lat = cm.measure_latency({"b": Path("dynamic-b")}, x, runs=5, warmup=1)  # no fixed batch: batch 1, per call
    assert lat["b"]["batch"] == 1 and lat["b"]["median"] == pytest.approx(8.0)
    monkeypatch.setattr(Fake, "__init__", lambda self, path, *a, **kw: setattr(self, "fixed_batch", 2 if "2" in path else 4))
    with pytest.raises(ModelError, match="different fixed batches"):
        cm.measure_latency({"a": Path("m2"), "b": Path("m4")}, x, runs=1, warmup=0)


def test_a_failed_candidates_size_is_that_of_the_model_its_figures_are_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate that fails every rung is reported with plain INT8's gate figures: its size is plain INT8's too,
    not that of the last rung's model (a QAT model here), which overwrote the file before it was deleted."""
    import edgeclf.export.compress as cm
    from edgeclf.export.onnx_export import export_onnx

    torch = pytest.importorskip("torch")

    def biased(width: int, cls: int) -> torch.nn.Module:  # a network whose decision is `cls` on any image
        head = torch.nn.Linear(width, 3)
        with torch.no_grad():
            head.bias.copy_(torch.eye(3)[cls] * 5)
        return torch.nn.Sequential(torch.nn.Conv2d(1, width, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   head).eval()

    x1 = np.zeros((1, 1, 32, 32), np.float32)
    parent, plain, wide = tmp_path / "parent.onnx", tmp_path / "plain.onnx", tmp_path / "wide.onnx"
    export_onnx(biased(4, 0), x1, parent)
    export_onnx(biased(8, 2), x1, plain)  # what plain INT8 writes: it fails the gate
    export_onnx(biased(64, 1), x1, wide)  # what the QAT rung writes: fails too, and is of another size
    assert wide.stat().st_size != plain.stat().st_size
    _broken_quantizer(monkeypatch, plain)
    monkeypatch.setattr(cm, "MAX_LADDER_NODES", 0)  # no float-fallback rung: straight to QAT

    def qat(*, flavour, out_path, calib_x, **kw):
        shutil.copyfile(wide, out_path)
        return {"record": {"precision": "int8", "flavour": flavour, "qat": True, **_calibrated_on(calib_x)}, "qat": {"epochs": 1}}

    out = cm.compress(tmp_path, parent, precision="auto", qat=qat, qat_epochs=1, **_val_args(parent))
    assert out["variants"] == [] and out["deploy"]["precision"] == "fp32"
    for row in out["candidates"]:
        assert not row["passed"] and [r["rung"] for r in row["rungs"]] == ["plain", "float-fallback", "qat"]
        assert row["worst"] == row["rungs"][0]["worst"] and not row["qat"]  # plain INT8's figures ...
        assert row["size_bytes"] == plain.stat().st_size  # ... and plain INT8's size
    # A QAT model that passes is what ships: its figures, its size.
    monkeypatch.setattr(cm, "measure_latency", lambda paths, x, **kw: {
        k: {"median": 1.0 if k == "fp32" else 0.5, "p90": 1.0, "runs": 1, "batch": 1} for k in paths})

    def faithful_qat(*, flavour, out_path, calib_x, **kw):
        shutil.copyfile(parent, out_path)
        return {"record": {"precision": "int8", "flavour": flavour, "qat": True, **_calibrated_on(calib_x)}, "qat": {"epochs": 1}}

    out = cm.compress(tmp_path, parent, precision="auto", qat=faithful_qat, qat_epochs=1, **_val_args(parent))
    assert [v["id"] for v in out["variants"]] == ["int8-cpu", "int8-tensorrt"]
    for row, v in zip(out["candidates"], out["variants"]):
        assert row["passed"] and row["qat"] and row["size_bytes"] == v["size_bytes"] == parent.stat().st_size
        assert (tmp_path / v["file"]).stat().st_size == parent.stat().st_size


def _agreement_only_refusal() -> dict:
    """Plain INT8 fails only the agreement floor (1.0); after QAT it still does, its accuracy drops all passing."""
    checks = [{"metric": "auc_macro", "drop": 0.001, "drop_ci95": [-0.002, 0.004], "passed": True},
              {"metric": "sensitivity[normal]", "drop": 0.0074, "drop_ci95": [-0.001, 0.02], "passed": True},
              {"metric": "decision_agreement", "candidate": 0.993, "drop": 0.007, "drop_ci95": [0.0, 0.013], "floor": 1.0,
               "passed": False}]
    qat = {"rung": "qat", "passed": False, "failed_on": ["decision_agreement"], "decision_agreement": 0.996, "epochs": 1,
           "worst": {"metric": "sensitivity[normal]", "drop": 0.0074, "drop_ci95": [-0.001, 0.02]}}
    gate = {"ceiling": 0.05, "n": 150, "min_agreement": 1.0, "checks": checks, "failed_on": ["decision_agreement"]}
    return {"id": "int8-tensorrt", "quantization": {"method": "minmax"}, "gate": gate,
            "rungs": [{"rung": "plain", "passed": False, "failed_on": ["decision_agreement"]}, qat]}


def test_refusal_on_agreement_alone_advises_the_agreement_floor_not_max_drop() -> None:
    from edgeclf.export.compress import _refusal

    text = _refusal(_agreement_only_refusal(), 0.01)
    assert "decision_agreement with the fp32 parent is 0.993" in text and "\n" not in text
    assert "--max-drop" not in text  # no drop failed: raising it changes nothing
    assert "lower --min-agreement" in text
    # The QAT clause says what still fails after fine-tuning, not a passing drop as if it failed.
    after = text.split("quantization-aware fine-tuning", 1)[1]
    assert "0.0074" not in text and "decision_agreement is still 0.996" in after


def test_refusal_on_a_drop_advises_max_drop_and_the_other_calibrations() -> None:
    from edgeclf.export.compress import _refusal

    c = _candidate(0.03, 0.01, 0.05)
    c["quantization"] = {"method": "entropy"}
    text = _refusal(c, 0.01)
    assert "raise --max-drop" in text and "--min-agreement" not in text
    assert "--calibration minmax or percentile" in text  # entropy already ran


def test_refusal_after_qat_names_what_qat_fixed_and_what_still_fails() -> None:
    from edgeclf.export.compress import _refusal

    c = _candidate(0.03, 0.01, 0.05)
    c["gate"]["min_agreement"] = 0.98
    c["rungs"] = [{"rung": "qat", "passed": False, "epochs": 2, "failed_on": ["decision_agreement"], "decision_agreement": 0.97,
                   "worst": {"metric": "benign", "drop": 0.004, "drop_ci95": [-0.01, 0.02]}}]
    after = _refusal(c, 0.01).split("quantization-aware fine-tuning", 1)[1]
    assert "decision_agreement is 0.970, under --min-agreement 0.98" in after and "benign passes" in after
    assert "0.004" not in after
