"""Export leaves out what `edgeclf run` does not classify: frames its quality gate stops (blank frames of a clip) neither
count in the bundle's validation figures nor calibrate an imported model nor judge the compression gate."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from edgeclf.export.bundle_writer import ExportConfig, _ort_logits, export_bundle
from edgeclf.export.onnx_export import ExportError
from tests.conftest import write_gray_clip

onnx = pytest.importorskip("onnx")
cv2 = pytest.importorskip("cv2")
SIZE = 32
BLANK = 4  # val frames the quality gate stops: the last two sampled frames of one clip per class


def _first_val_clip(split: str, cls: str, j: int) -> bool:
    return split == "val" and j == 0


def write_gated_clips(root: Path, blanked: Callable[[str, str, int], bool] = _first_val_clip) -> str:
    """Clips in train/ val/ test/ folders, 3 of 8 frames per class and split, class b brighter than a on the whole; the
    clips `blanked(split, cls, j)` names (by default in val, one clip per class) turn black half-way (run's quality gate: "blank"). Sampled 4 frames per clip: 24 val
    frames, BLANK of them stopped."""
    from edgeclf.runtime.sources import open_source

    with open_source("synthetic:ultrasound?frames=200&size=64&seed=1") as s:
        frames = [f.image for f in s]
    k = 0
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            for j in range(3):
                clip = frames[k:k + 8]
                k += 8
                # Brightness per clip: class b brighter on the whole, with an overlap (no split is perfectly separated).
                gain = {"a": (1.0, 1.3, 1.15), "b": (1.1, 1.25, 1.4)}[cls][j]
                clip = [np.clip(f * gain, 0, 255).astype(np.uint8) for f in clip]
                if blanked(split, cls, j):
                    clip = clip[:4] + [np.zeros_like(f) for f in clip[4:]]
                write_gray_clip(root / split / cls / f"c{j}.avi", clip)
    return f"{root}?frames=4"


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_gated_clips(tmp_path_factory.mktemp("gated") / "clips")


def _model(path: Path) -> Path:
    """GlobalAveragePool -> Gemm, (N, 1, SIZE, SIZE) -> (N, 1): the logit of class b, from -1.3 on the darkest clip to
    1.3 on the brightest; a blank frame gets a confident -7.7 whatever its label, which drags a temperature fitted on
    it far from the one fitted on the frames run classifies."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)],
        "user", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array([[10.0]], np.float32), "w"), numpy_helper.from_array(np.array([12.3], np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _config(tmp_path: Path, data: str, **kw: Any) -> ExportConfig:
    return ExportConfig(out=str(tmp_path / "b"), from_onnx=str(_model(tmp_path / "m.onnx")), labels="a,b", task="binary",
                        size=SIZE, channels=1, data=data, **kw)


def _val(data: str, bundle: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, labels, classified mask) of the val frames, through the bundle's model, as `edgeclf run` would see them."""
    from edgeclf.data import load_dataset
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.preprocess import Preprocessor

    ds = load_dataset(data, quality=True)
    va = ds.split("val")
    kept = np.array([not ds.abstain.get(f) for f in va.ids])
    assert int((~kept).sum()) == BLANK, "the fixture must have frames the quality gate stops"
    x = Preprocessor(load_bundle(bundle).manifest.preprocess).batch(va.images)
    return _ort_logits(bundle / "model.onnx", x), va.labels, kept


def test_val_figures_are_over_the_frames_run_classifies(gated: str, tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate

    m = export_bundle(_config(tmp_path, gated))
    val = m["metrics"]["val_onnx_fp32"]
    assert val["n"] == 24 - BLANK and val["all_frames"]["n"] == 24
    assert val["abstained"] == BLANK and val["abstain_reasons"] == {"blank": BLANK}
    assert val["coverage"] == pytest.approx((24 - BLANK) / 24)
    # The figures a reviewer reads in the manifest are those `edgeclf evaluate` gives the bundle on its val split.
    ev = evaluate(str(tmp_path / "b"), data=gated, split="val", n_boot=500)["metrics"]
    for k in ("n", "accuracy", "balanced_accuracy", "confusion_matrix", "abstained", "abstain_reasons"):
        assert val[k] == ev[k], k
    assert val["auc"]["macro"] == pytest.approx(ev["auc"]["macro"])


def test_an_imported_model_is_calibrated_on_the_frames_run_classifies(gated: str, tmp_path: Path) -> None:
    from edgeclf.calibration import fit_decision_rule, fit_temperature
    from edgeclf.runtime.postprocess import probabilities

    m = export_bundle(_config(tmp_path, gated))
    lv, y, kept = _val(gated, tmp_path / "b")
    t_kept, t_all = fit_temperature(lv[kept], y[kept], "binary"), fit_temperature(lv, y, "binary")
    assert t_all > 2 * t_kept and t_kept != 1.0, "the blank frames must pull the fit away from a real fit on the others"
    assert m["postprocess"]["temperature"] == pytest.approx(t_kept, rel=1e-4)
    rule = fit_decision_rule(probabilities(lv[kept], "binary", t_kept), y[kept], "binary", target_sensitivity=0.9,
                             positive=m["postprocess"]["decision"]["positive"])
    assert m["postprocess"]["decision"]["thresholds"] == pytest.approx(rule.thresholds, abs=1e-5)


def test_the_compression_gate_sees_only_frames_the_quality_gate_passes(gated: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.export.compress as compress_mod

    seen: dict[str, Any] = {}

    def spy(stage: Path, fp32: Path, **kw: Any) -> dict[str, Any]:
        seen.update(kw)
        return {"variants": [], "deploy": {"precision": "fp32", "reason": "spy"}, "candidates": [], "calibration": None}

    monkeypatch.setattr(compress_mod, "compress", spy)
    export_bundle(_config(tmp_path, gated, precision="int8", samples=False))
    lv, _, kept = _val(gated, tmp_path / "b")  # the spy writes no variant: the bundle is fp32, its model the parent
    assert len(seen["val_x"]) == len(seen["val_y"]) == 24 - BLANK
    np.testing.assert_allclose(seen["parent_logits"], lv[kept], atol=1e-5)
    assert len(seen["calib_x"]) == 24  # no train frame is blank


def test_an_imported_model_with_no_val_frame_run_classifies_is_refused(gated: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.export import bundle_writer

    real = bundle_writer.load_dataset

    def load(*args: Any, **kw: Any) -> Any:
        ds = real(*args, **kw)
        ds.abstain.update(dict.fromkeys(ds.split("val").ids, "dark"))
        return ds

    monkeypatch.setattr(bundle_writer, "load_dataset", load)
    with pytest.raises(ExportError, match=r"none of the 24 val frames is one `edgeclf run` classifies \(it abstains on every "
                                          r"one: dark: 24\), so there is nothing to fit the imported model's temperature and "
                                          "decision rule on; no bundle was written"):
        export_bundle(_config(tmp_path, gated))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))
