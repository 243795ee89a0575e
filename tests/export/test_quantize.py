"""INT8 (cpu / tensorrt flavours) and fp16 variants of an exported model, checked in the graph and in ONNX Runtime."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeclf.errors import ConfigError, DataError, ModelError

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from edgeclf.export import quantize as Q  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`compact` after a few seeded SGD steps on synthetic ultrasound, exported at 32 px, and its fp32 ORT logits."""
    from edgeclf.data import load_dataset
    from edgeclf.export.onnx_export import export_onnx
    from edgeclf.models import create_model, normalization
    from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec

    ds = load_dataset(f"synthetic:ultrasound?n=90&size={SIZE}")
    mean, std = normalization("compact", 1, False)
    pre = Preprocessor(PreprocessSpec(channels=1, size=(SIZE, SIZE), mean=tuple(mean), std=tuple(std)))
    xtr, ytr = pre.batch(ds.split("train").images), ds.split("train").labels
    xte = np.concatenate([pre.batch(ds.split("val").images), pre.batch(ds.split("test").images)])
    torch.manual_seed(0)
    net = create_model("compact", num_outputs=3, in_chans=1).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(25):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    d = tmp_path_factory.mktemp("quant")
    path = d / "fp32.onnx"
    export_onnx(net.eval(), xtr, path)
    calib, digest = Q.calibration_sample(xtr, ytr, n=32, seed=0)
    return {"dir": d, "fp32": path, "xtr": xtr, "ytr": ytr, "xte": xte, "ref": _run(path, xte), "calib": calib, "hash": digest}


@pytest.fixture(scope="module")
def int8(model: dict[str, Any]) -> dict[str, tuple[Path, dict[str, Any]]]:
    out = {}
    for flavour in Q.INT8_FLAVOURS:
        path = model["dir"] / f"int8-{flavour}.onnx"
        out[flavour] = (path, Q.quantize_int8(model["fp32"], path, model["calib"], flavour=flavour))
    return out


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x})[0]
    assert out.dtype == np.float32
    return out


def _close_to_fp32(model: dict[str, Any], path: Path, what: str) -> float:
    """Held-out argmax agreement >= 90% and logits within 15% of their spread; returns max |diff|."""
    ref, got = model["ref"], _run(path, model["xte"])
    diff = float(np.abs(got - ref).max())
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    spread = float(ref.max() - ref.min())
    print(f"{what}: max|diff| {diff:.4f} (logit spread {spread:.2f}), argmax agreement {agree:.3f} on {len(ref)} held-out")
    assert agree >= 0.9, (what, agree)
    assert diff < 0.15 * spread, (what, diff, spread)
    return diff


def _graph(path: Path) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    return proto, inits, producer


def _axis(node: Any) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _weight_dq(proto: Any, producer: dict[str, Any], op: Any) -> Any:
    """The DequantizeLinear feeding a Conv/Gemm's weight input, or None when the weight stays float."""
    dq = producer.get(op.input[1])
    return dq if dq is not None and dq.op_type == "DequantizeLinear" else None


# ---------------------------------------------------------------------------- calibration_sample
def _indexed(n: int) -> np.ndarray:
    x = np.random.default_rng(1).normal(size=(n, 1, 4, 4)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(n)  # each row names its index, so a sample can be traced back
    return x


def test_calibration_sample_is_seeded_stratified_and_hashed() -> None:
    x = _indexed(100)
    y = np.repeat([0, 1, 2], [50, 30, 20]).astype(np.int64)
    a, ha = Q.calibration_sample(x, y, n=20, seed=0)
    b, hb = Q.calibration_sample(x, y, n=20, seed=0)
    c, hc = Q.calibration_sample(x, y, n=20, seed=1)
    assert a.shape == (20, 1, 4, 4) and a.dtype == np.float32 and a.flags.c_contiguous
    assert np.array_equal(a, b) and ha == hb == hashlib.sha256(a.tobytes()).hexdigest()
    assert hc != ha and not np.array_equal(np.sort(a[:, 0, 0, 0]), np.sort(c[:, 0, 0, 0]))
    for s in (a, c):
        idx = s[:, 0, 0, 0].astype(int)
        assert len(set(idx)) == 20  # no image twice
        assert np.bincount(y[idx], minlength=3).tolist() == [10, 6, 4]  # exactly in proportion
    everything, h = Q.calibration_sample(x, y, n=500)
    assert np.array_equal(everything, x) and h == hashlib.sha256(x.tobytes()).hexdigest()


def test_calibration_sample_keeps_rare_classes_and_multilabel_none() -> None:
    x = _indexed(100)
    rare = np.array([0] * 97 + [1] * 3)
    idx = Q.calibration_sample(x, rare, n=10, seed=3)[0][:, 0, 0, 0].astype(int)
    assert np.bincount(rare[idx], minlength=2).tolist() == [9, 1]  # 0.3 rounds to 0; a rare class still shows up
    multi = np.zeros((100, 3), np.uint8)
    multi[:40, 0] = 1
    multi[40:70, 1] = 1
    multi[40:70, 2] = 1  # first positive label is 1
    multi[70:80, 2] = 1  # rows 80.. have no finding: stratum 'none'
    idx = Q.calibration_sample(x, multi, n=10, seed=0)[0][:, 0, 0, 0].astype(int)
    strata = np.select([idx < 40, idx < 70, idx < 80], [0, 1, 2], 3)
    assert np.bincount(strata, minlength=4).tolist() == [4, 3, 1, 2]


def test_calibration_sample_rejects_bad_inputs() -> None:
    x, y = _indexed(10), np.zeros(10, np.int64)
    with pytest.raises(DataError, match="float32"):
        Q.calibration_sample(x.astype(np.float64), y)
    with pytest.raises(DataError, match="labels"):
        Q.calibration_sample(x, y[:5])
    with pytest.raises(ConfigError, match="integer >= 1"):
        Q.calibration_sample(x, y, n=0)


# ------------------------------------------------------------------------------------ int8 cpu
def test_cpu_flavour_uint8_activations_int8_per_channel_weights(model: dict[str, Any], int8: dict[str, Any]) -> None:
    path, rec = int8["cpu"]
    assert rec == {
        "precision": "int8", "flavour": "cpu", "method": "minmax", "per_channel": True, "activation_type": "uint8",
        "weight_type": "int8", "reduce_range": True, "symmetric": False, "excluded": [], "calibration_n": 32,
        "calibration_sha256": model["hash"], "preprocessed": True, "bias": "int32", "float_outputs": ["logits"], "onnxruntime": ort.__version__,
    }
    proto, inits, producer = _graph(path)
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert {o.domain for o in proto.opset_import} == {""}  # no stray domains from ORT's optimiser
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(p.name for p in model["dir"].iterdir() if p.name.startswith("int8-cpu")) == ["int8-cpu.onnx"]
    acts = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert acts and all(inits[n.input[2]].dtype == np.uint8 and inits[n.input[2]].ndim == 0 for n in acts)
    weighted = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 6
    for op in weighted:
        dq = _weight_dq(proto, producer, op)
        assert dq is not None, op.name
        w, zp, scale = inits[dq.input[0]], inits[dq.input[2]], inits[dq.input[1]]
        assert w.dtype == np.int8 and zp.dtype == np.int8 and not zp.any()
        assert _axis(dq) == 0 and scale.shape == zp.shape == (w.shape[0],)  # per output channel
        assert w.min() >= -64 and w.max() <= 64  # reduce_range: 7-bit weights
    out = proto.graph.output[0]
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and producer[out.name].op_type == "Gemm"
    _close_to_fp32(model, path, "int8 cpu minmax")


def test_tensorrt_flavour_is_symmetric_int8_with_zero_points_0(model: dict[str, Any], int8: dict[str, Any]) -> None:
    path, rec = int8["tensorrt"]
    assert rec["activation_type"] == rec["weight_type"] == "int8" and rec["symmetric"] is True
    assert rec["reduce_range"] is False and rec["bias"] == "float32"
    proto, inits, producer = _graph(path)
    qs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert qs and dqs
    for n in qs + dqs:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
    # TensorRT parses DequantizeLinear only on activation types: every DQ input comes from a Q, none from an
    # INT8/INT32 initializer (float weights behind a Q/DQ pair, float biases).
    assert all(n.input[0] not in inits and producer[n.input[0]].op_type == "QuantizeLinear" for n in dqs)
    for op in (n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")):
        dq = _weight_dq(proto, producer, op)
        assert dq is not None, op.name
        q = producer[dq.input[0]]
        w = inits[q.input[0]]
        assert w.dtype == np.float32 and _axis(q) == 0 and inits[q.input[1]].shape == (w.shape[0],)
        if len(op.input) > 2:
            assert op.input[2] in inits and inits[op.input[2]].dtype == np.float32  # bias stays float
    assert len({n.output[0] for n in qs}) == len(qs)
    _close_to_fp32(model, path, "int8 tensorrt minmax")


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods_run(model: dict[str, Any], int8: dict[str, Any], method: str) -> None:
    path = model["dir"] / f"int8-cpu-{method}.onnx"
    rec = Q.quantize_int8(model["fp32"], path, model["calib"], flavour="cpu", method=method)
    assert rec["method"] == method and rec["calibration_n"] == 32
    scales = {}
    for p in (path, int8["cpu"][0]):
        proto, inits, _ = _graph(p)
        scales[p] = {n.input[0]: float(inits[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    # a real histogram method, not min/max under another name
    assert scales[path].keys() == scales[int8["cpu"][0]].keys() and scales[path] != scales[int8["cpu"][0]]
    _close_to_fp32(model, path, f"int8 cpu {method}")


def test_exclusions_and_quantizable_nodes(model: dict[str, Any]) -> None:
    names = Q.quantizable_nodes(model["fp32"])
    proto = onnx.load(str(model["fp32"]))
    assert names == [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(names) == 6 and names[-1].endswith("Gemm") and all("Conv" in n for n in names[:-1])
    path = model["dir"] / "int8-excl.onnx"
    rec = Q.quantize_int8(model["fp32"], path, model["calib"], nodes_to_exclude=[names[0]])
    assert rec["excluded"] == [names[0]]
    qproto, _, producer = _graph(path)
    by_name = {n.name: n for n in qproto.graph.node}
    assert _weight_dq(qproto, producer, by_name[names[0]]) is None  # first conv stays float
    assert _weight_dq(qproto, producer, by_name[names[1]]) is not None
    with pytest.raises(ConfigError, match="quantizable_nodes"):
        Q.quantize_int8(model["fp32"], path, model["calib"], nodes_to_exclude=["no/such/Conv"])
    with pytest.raises(ConfigError, match="list of node names"):
        Q.quantize_int8(model["fp32"], path, model["calib"], nodes_to_exclude=names[0])  # type: ignore[arg-type]


def test_fixed_batch_model_calibrates_in_whole_batches(model: dict[str, Any]) -> None:
    proto = onnx.load(str(model["fp32"]))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 4
    fixed = model["dir"] / "fixed4.onnx"
    onnx.save(proto, str(fixed))
    rec = Q.quantize_int8(fixed, model["dir"] / "fixed4-int8.onnx", model["calib"][:10])
    assert rec["calibration_n"] == 8
    # The hash names the 8 images calibrated on, not the 10 handed in.
    assert rec["calibration_sha256"] == hashlib.sha256(np.ascontiguousarray(model["calib"][:8]).tobytes()).hexdigest()
    with pytest.raises(DataError, match="exactly 4"):
        Q.quantize_int8(fixed, model["dir"] / "x.onnx", model["calib"][:3])


def test_quantize_static_calibrating_by_itself_still_works(model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for onnxruntime versions without calibration caches."""
    monkeypatch.setattr(Q, "_cache_supported", lambda: False)
    path = model["dir"] / "int8-nocache.onnx"
    Q.quantize_int8(model["fp32"], path, model["calib"], flavour="tensorrt")
    _close_to_fp32(model, path, "int8 tensorrt minmax, calibrated by quantize_static")


def test_bad_options_are_one_line_errors(model: dict[str, Any], tmp_path: Path) -> None:
    cases = [
        (ConfigError, "flavour", dict(flavour="arm")),
        (ConfigError, "calibration method", dict(method="kl")),
    ]
    for err, match, kw in cases:
        with pytest.raises(err, match=match) as info:
            Q.quantize_int8(model["fp32"], tmp_path / "q.onnx", model["calib"], **kw)
        msg = str(info.value)
        assert "\n" not in msg and "allowed:" in msg
    with pytest.raises(ConfigError, match="allowed: cpu, tensorrt$"):
        Q.quantize_int8(model["fp32"], tmp_path / "q.onnx", model["calib"], flavour="gpu")
    with pytest.raises(ConfigError, match="allowed: minmax, entropy, percentile$"):
        Q.quantize_int8(model["fp32"], tmp_path / "q.onnx", model["calib"], method="max")
    with pytest.raises(DataError, match="shape"):
        Q.quantize_int8(model["fp32"], tmp_path / "q.onnx", np.zeros((4, 1, 16, 16), np.float32))
    with pytest.raises(DataError, match="float32"):
        Q.quantize_int8(model["fp32"], tmp_path / "q.onnx", model["calib"].astype(np.float64))
    with pytest.raises(ModelError, match="does not exist"):
        Q.quantize_int8(tmp_path / "missing.onnx", tmp_path / "q.onnx", model["calib"])
    with pytest.raises(ConfigError, match="overwrite"):
        Q.quantize_int8(model["fp32"], model["fp32"], model["calib"])
    assert not (tmp_path / "q.onnx").exists()


# ----------------------------------------------------------------------------------------- fp16
def test_fp16_weights_with_float32_io(model: dict[str, Any]) -> None:
    path = model["dir"] / "fp16.onnx"
    rec = Q.convert_fp16(model["fp32"], path)
    assert rec["precision"] == "fp16" and rec["keep_io_types"] is True
    proto, inits, _ = _graph(path)
    onnx.checker.check_model(proto)
    conv_w = [inits[n.input[1]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(conv_w) == 6 and all(w.dtype == np.float16 for w in conv_w)
    assert all(t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for t in [*proto.graph.input, *proto.graph.output])
    assert path.stat().st_size < 0.6 * model["fp32"].stat().st_size
    diff = _close_to_fp32(model, path, "fp16")
    assert diff < 0.05


def test_fp16_without_a_converter_names_the_package(model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from edgeclf.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "onnxruntime.transformers", None)
    with pytest.raises(MissingExtraError, match="pip install onnxconverter-common"):
        Q.convert_fp16(model["fp32"], model["dir"] / "never.onnx")
    assert not (model["dir"] / "never.onnx").exists()


def test_only_errors_from_onnx_tooling_count_as_cannot_be_built() -> None:
    # ORT rejecting its input: the converter's verdict, recorded as "not built" under --precision auto.
    with pytest.raises(Exception) as from_ort:
        ort.InferenceSession(b"not a model")
    assert Q._raised_in_onnx_tooling(from_ort.value)

    def ours() -> None:
        raise KeyError("calibration_data_reader")  # a bug in edgeclf's own glue

    with pytest.raises(KeyError) as from_us:
        ours()
    assert not Q._raised_in_onnx_tooling(from_us.value)


def test_a_bug_in_our_reader_called_by_onnxruntime_is_not_cannot_be_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ORT's calibrator calls our data reader: an error raised there is ours, though ORT's frames lie above it.
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = make_tiny_bundle(tmp_path / "b")
    real = Q._make_reader

    def buggy(*a: Any, **kw: Any) -> Any:
        r = real(*a, **kw)

        def get_next() -> None:
            raise KeyError("a typo in edgeclf's own reader")

        r.get_next = get_next
        return r

    monkeypatch.setattr(Q, "_make_reader", buggy)
    x = np.random.default_rng(0).normal(size=(8, 1, 8, 8)).astype(np.float32)
    with pytest.raises(KeyError, match="own reader"):
        Q.quantize_int8(b / "model.onnx", tmp_path / "q.onnx", x)


def test_a_bug_in_our_quantization_glue_keeps_its_traceback_under_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.export.compress as cm
    from edgeclf.export.bundle_writer import _ort_logits
    from edgeclf.export.onnx_export import export_onnx
    from edgeclf.models import create_model
    from edgeclf.runtime.postprocess import DecisionRule

    torch.manual_seed(0)
    onnx_path = tmp_path / "m.onnx"
    export_onnx(create_model("compact", num_outputs=3, in_chans=1), np.zeros((1, 1, 32, 32), np.float32), onnx_path)

    def buggy(*a: Any, **kw: Any) -> None:
        raise KeyError("calibration_data_reader")

    monkeypatch.setattr(Q, "_quantize", buggy)
    x = np.random.default_rng(0).normal(size=(12, 1, 32, 32)).astype(np.float32)
    with pytest.raises(KeyError):  # not swallowed into "int8-cpu could not be built" with fp32 deployed
        cm.compress(tmp_path, onnx_path, precision="auto", max_drop=0.01, calib_x=x[:4], calib_method="minmax",
                    val_x=x, val_y=np.arange(12) % 3, val_ids=[str(i) for i in range(12)],
                    parent_logits=_ort_logits(onnx_path, x), task="multiclass", temperature=1.0,
                    rule=DecisionRule("max-ratio", (0.3, 0.3, 0.3)), labels=["a", "b", "c"])
