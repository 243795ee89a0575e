"""`edgeclf export --from-onnx`: user ONNX models built with onnx.helper, binary data, --out mistakes."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from edgeclf.errors import ConfigError, ModelError
from edgeclf.export.bundle_writer import ExportConfig, _ort_logits, export_bundle
from edgeclf.runtime.bundle import load_bundle
from edgeclf.runtime.postprocess import probabilities
from tests.conftest import TINY_DATA, run_cli

onnx = pytest.importorskip("onnx")
LABELS = "malignant,normal_or_benign"  # BreastMNIST's order; the data's positive class is malignant (index 0)


def _classifier(path: Path, outputs: int, side: int | None = 28, channels: int = 1, batch: int | str = "N") -> Path:
    """GlobalAveragePool -> Gemm: (batch, channels, side, side) -> (batch, outputs) logits; side None: dynamic H, W."""
    from onnx import TensorProto, helper, numpy_helper

    hw: list[int | str] = [side, side] if side else ["H", "W"]
    w = np.linspace(-3.0, 2.5, outputs * channels, dtype=np.float32).reshape(outputs, channels)
    b = np.linspace(0.4, -0.2, outputs, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["scores"], transB=1)],
        "user", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, channels, *hw])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, outputs])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _binary_data(tmp_path: Path) -> str:
    """A tiny BreastMNIST-named .npz (random 28x28 images, alternating labels)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 24), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    return str(tmp_path / "breastmnist.npz")


def _common(tmp_path: Path, **kw) -> dict:
    return dict(labels=LABELS, task="binary", size=28, channels=1, data=_binary_data(tmp_path), **kw)


def _val_inputs(bundle: Path, data: str) -> np.ndarray:
    from edgeclf.data import load_dataset
    from edgeclf.runtime.preprocess import Preprocessor

    return Preprocessor(load_bundle(bundle).manifest.preprocess).batch(load_dataset(data).split("val").images)


@pytest.mark.parametrize("batch", ["N", 4])
def test_two_logit_binary_model_is_imported_as_one_logit(tmp_path: Path, batch: int | str) -> None:
    """softmax(l)[1] == sigmoid(l[1] - l[0]): the bundle's model outputs that logit, says so, and is checksummed."""
    src = _classifier(tmp_path / "two.onnx", 2, batch=batch)
    common = _common(tmp_path)
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), **common))
    out = tmp_path / "b"
    assert m["model"]["output_shape"] == [batch if batch != "N" else "batch", 1]
    conv = m["provenance"]["two_logit_binary"]
    assert conv["binary_logit"] == "output[1] - output[0]" and conv["logit_of"] == {"output_index": 1, "label": "normal_or_benign"}
    assert conv["parity"]["n"] == 24 and conv["parity"]["max_abs_diff_probs"] <= conv["parity"]["tolerance"] <= 1e-5
    assert m["postprocess"]["decision"]["positive"] == 0  # the data's positive class decides on p[:, 0], as for any binary model
    model = onnx.load(str(out / "model.onnx"))
    assert [n.op_type for n in model.graph.node][-1] == "MatMul" and len(model.graph.node) == 4
    assert [o.name for o in model.graph.output] == [m["model"]["output_name"]]
    # The checksums cover the model as written, and the runtime's own loader verifies them.
    digest = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert f"{digest}  model.onnx\n" in (out / "checksums.sha256").read_text()
    load_bundle(out)
    x = _val_inputs(out, common["data"])
    np.testing.assert_allclose(probabilities(_ort_logits(out / "model.onnx", x), "binary"),
                               probabilities(_ort_logits(src, x), "multiclass"), atol=1e-6)


def test_two_logit_import_decides_as_the_equivalent_one_logit_model(tmp_path: Path) -> None:
    """A (N, 2) model and the (N, 1) model of its logit difference give the same calibration and rule."""
    from onnx import numpy_helper

    two = _classifier(tmp_path / "two.onnx", 2)
    one = onnx.load(str(two))
    params = {t.name: numpy_helper.to_array(t) for t in one.graph.initializer}
    del one.graph.initializer[:]
    one.graph.initializer.extend([numpy_helper.from_array(params["w"][1:] - params["w"][:1], "w"),
                                  numpy_helper.from_array(params["b"][1:] - params["b"][:1], "b")])
    one.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(one, str(tmp_path / "one.onnx"))
    common = _common(tmp_path, samples=False)
    a = export_bundle(ExportConfig(out=str(tmp_path / "a"), from_onnx=str(two), **common))
    b = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(tmp_path / "one.onnx"), **common))
    assert a["postprocess"]["temperature"] == pytest.approx(b["postprocess"]["temperature"], rel=1e-4)
    assert a["postprocess"]["decision"]["thresholds"] == pytest.approx(b["postprocess"]["decision"]["thresholds"], abs=1e-5)
    assert a["metrics"]["val_onnx_fp32"]["confusion_matrix"] == b["metrics"]["val_onnx_fp32"]["confusion_matrix"]
    # The (N, 1) path is left as it was: the user's graph unchanged, nothing claimed.
    assert "two_logit_binary" not in b["provenance"] and b["model"]["output_name"] == "scores"
    assert len(onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node) == 3


def test_an_unfaithful_two_logit_conversion_writes_no_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.export import bundle_writer
    from edgeclf.export.onnx_export import ExportError

    real = bundle_writer._ort_logits

    def skewed(path: Path, x: np.ndarray) -> np.ndarray:  # the converted model's logit shifted: its softmax no longer matches
        out = real(path, x)
        return out + 0.5 if out.shape[1] == 1 else out

    monkeypatch.setattr(bundle_writer, "_ort_logits", skewed)
    src = _classifier(tmp_path / "two.onnx", 2)
    with pytest.raises(ExportError, match=r"differ from .*softmax .*no bundle was written") as info:
        export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), **_common(tmp_path)))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_two_probabilities_are_not_taken_for_logits(tmp_path: Path) -> None:
    """output[1] - output[0] of a softmax's output is no logit (and would match its own softmax): refused."""
    from onnx import helper

    src = _classifier(tmp_path / "two.onnx", 2)
    model = onnx.load(str(src))
    model.graph.node[-1].output[0] = "raw"
    model.graph.node.append(helper.make_node("Softmax", ["raw"], ["scores"], axis=1))
    onnx.save(model, str(src))
    with pytest.raises(ModelError, match="look like probabilities .*without its final softmax") as info:
        export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), **_common(tmp_path)))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_binary_with_three_outputs_and_a_binary_set_imported_as_multiclass_name_the_fix(tmp_path: Path) -> None:
    common = _common(tmp_path)
    with pytest.raises(ModelError, match=r"outputs shape \(24, 3\); a binary model .* \(N, 1\) logits .* or \(N, 2\) logits .*: give a model"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(_classifier(tmp_path / "three.onnx", 3)), **common))
    from edgeclf.errors import DataError

    with pytest.raises(DataError, match="is a binary set; .*--task multiclass: give --task binary") as info:
        export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(_classifier(tmp_path / "two.onnx", 2)),
                                   **{**common, "task": "multiclass"}))
    assert "--classes" not in str(info.value)
    with pytest.raises(DataError, match="is a multiclass set; .*--task binary: give --task multiclass$"):  # synthetic: no --classes
        export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(_classifier(tmp_path / "two.onnx", 2)),
                                   **{**common, "data": TINY_DATA, "labels": "normal,cyst"}))
    assert not (tmp_path / "b").exists()


# --- --out ---------------------------------------------------------------------------------------

def _occupied(tmp_path: Path, what: str) -> Path:
    out = tmp_path / "precious"
    if what == "file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / ("manifest.json" if what == "bundle" else "notes.txt")).write_text("{}")
    return out


@pytest.mark.parametrize("what, overwrite, match", [
    ("folder", True, r"^--out .*precious holds other files, not a bundle \(no manifest.json\); --overwrite replaces only a previous "
                     r"bundle: choose another --out"),
    ("folder", False, r"^--out .*precious is a folder that is not empty and holds no bundle .*choose another --out"),
    ("file", True, r"^--out .*precious is a file, not a folder; .*choose another --out"),
    ("file", False, r"^--out .*precious is a file, not a folder; .*choose another --out"),
    ("bundle", False, r"^--out .*precious already holds a bundle; pass --overwrite to replace it or choose another --out"),
])
def test_an_occupied_out_says_what_is_there_and_the_real_fix(tmp_path: Path, what: str, overwrite: bool, match: str) -> None:
    out = _occupied(tmp_path, what)
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()
    src = _classifier(tmp_path / "one.onnx", 1)
    with pytest.raises(ConfigError, match=match) as info:
        export_bundle(ExportConfig(out=str(out), from_onnx=str(src), overwrite=overwrite, **_common(tmp_path)))
    assert "\n" not in str(info.value)
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()) == before  # untouched


def test_cli_overwrite_of_a_folder_that_is_no_bundle_is_one_line(tmp_path: Path) -> None:
    out = _occupied(tmp_path, "folder")
    r = run_cli("export", "--from-onnx", str(_classifier(tmp_path / "one.onnx", 1)), "--labels", LABELS, "--task", "binary",
                "--size", "28", "--channels", "1", "--data", _binary_data(tmp_path), "--out", str(out), "--overwrite")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite replaces only a previous bundle" in lines[0], r.stderr
    assert (out / "notes.txt").is_file()


# --- input size ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, match", [
    (dict(size=64), r"takes inputs \(N, 1, 32, 32\); --size 64 --channels 1 give \(N, 1, 64, 64\): give --size 32 --channels 1"),
    (dict(size=32, channels=3), r"takes inputs \(N, 1, 32, 32\); --size 32 --channels 3 give \(N, 3, 32, 32\): give --size 32 --channels 1"),
    (dict(size=32, channels=None), r"--channels 3 give \(N, 3, 32, 32\): give --size 32 --channels 1"),  # 3: the default
])
def test_input_size_that_the_model_does_not_take_is_refused_before_the_data_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: dict, match: str) -> None:
    from edgeclf.export import bundle_writer

    def no_data(*args, **kw):
        raise AssertionError("the data was read before the model's input was checked")

    common = {**_common(tmp_path), **flags}
    monkeypatch.setattr(bundle_writer, "load_dataset", no_data)
    with pytest.raises(ModelError, match=match) as info:
        export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(_classifier(tmp_path / "m.onnx", 1, side=32)), **common))
    assert "\n" not in str(info.value) and str(info.value).startswith("m.onnx takes inputs")
    assert not (tmp_path / "b").exists()


def test_a_model_with_dynamic_height_and_width_takes_any_size(tmp_path: Path) -> None:
    src = _classifier(tmp_path / "dyn.onnx", 1, side=None, batch=2)
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), **{**_common(tmp_path), "size": 40}))
    assert m["model"]["input_shape"] == [2, 1, 40, 40]


def test_cli_wrong_size_is_one_line_naming_the_flags(tmp_path: Path) -> None:
    r = run_cli("export", "--from-onnx", str(_classifier(tmp_path / "m.onnx", 1, side=32)), "--labels", LABELS, "--task", "binary",
                "--size", "64", "--channels", "1", "--data", _binary_data(tmp_path), "--out", str(tmp_path / "b"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeclf: error: ") and "give --size 32 --channels 1" in lines[0], r.stderr
