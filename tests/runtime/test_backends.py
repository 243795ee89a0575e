"""Backends made from a loaded bundle run the model bytes verified at load: a file changed or swapped after
`load_bundle` is refused or never read, and a model that would make the backend read files by path is refused."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeclf.errors import BackendError, BundleError, IntegrityError
from edgeclf.runtime.backends import BackendOptions, create_backend, ort_provider_options
from edgeclf.runtime.bundle import load_bundle, write_checksums
from tests.runtime.tiny_bundle import make_tiny_bundle

pytest.importorskip("onnxruntime")


def _reference(bundle: Path):
    with np.load(bundle / "reference.npz") as z:
        return z["inputs"], z["logits"]


def test_the_session_is_made_from_the_verified_bytes_even_if_the_file_is_swapped(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    import onnxruntime as ort

    bundle = make_tiny_bundle(tmp_path / "b")
    other = make_tiny_bundle(tmp_path / "other", seed=1)  # same graph, other weights
    b = load_bundle(bundle)
    real, swaps = ort.InferenceSession, []

    def swapped_just_before_opening(*args, **kwargs):  # a writer racing the session's creation
        shutil.copy(other / "model.onnx", bundle / "model.onnx")
        swaps.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", swapped_just_before_opening)
    x, want = _reference(bundle)
    with create_backend(str(b.model_path), (1, 8, 8), 3, bundle=b) as be:
        got = be.infer(x)
    assert swaps and np.allclose(got, want, atol=1e-5)  # the exported model's outputs, not the swapped one's


def test_a_model_changed_after_the_load_is_refused_not_run(tmp_path: Path):
    bundle = make_tiny_bundle(tmp_path / "b", variants=["int8-cpu"])
    other = make_tiny_bundle(tmp_path / "other", seed=1)
    b = load_bundle(bundle)
    shutil.copy(other / "model.onnx", bundle / "model.int8-cpu.onnx")
    path, vid = b.select("int8", "ort-cpu")
    assert vid == "int8-cpu"
    with pytest.raises(IntegrityError, match="'model.int8-cpu.onnx' changed after the bundle was verified") as info:
        create_backend(str(path), (1, 8, 8), 3, bundle=b)
    assert "\n" not in str(info.value)
    with create_backend(str(b.model_path), (1, 8, 8), 3, bundle=b) as be:  # the untouched fp32 model still runs
        x, want = _reference(bundle)
        assert np.allclose(be.infer(x), want, atol=1e-5)


def test_a_model_with_external_data_is_refused_and_a_tensor_named_location_is_not(tmp_path: Path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    # External weights would be opened by path (relative to the working directory for a model given as bytes).
    bundle = make_tiny_bundle(tmp_path / "b")
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.save_model(model, str(bundle / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    write_checksums(bundle)
    b = load_bundle(bundle)
    with pytest.raises(BundleError, match="'model.onnx' keeps its weights in external data files") as info:
        create_backend(str(b.model_path), (1, 8, 8), 3, bundle=b)
    assert "\n" not in str(info.value)

    # The bytes of an external-data key, as a node input's name, are not mistaken for one.
    w = np.ones((64, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["location"]), helper.make_node("Flatten", ["location"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    named = make_tiny_bundle(tmp_path / "named")
    (named / "model.onnx.data").unlink(missing_ok=True)
    onnx.save(m, str(named / "model.onnx"))
    assert b"\n\x08location\x12" in (named / "model.onnx").read_bytes()
    write_checksums(named)
    bn = load_bundle(named)
    with create_backend(str(bn.model_path), (1, 8, 8), 3, bundle=bn) as be:
        assert np.allclose(be.infer(np.ones((1, 1, 8, 8), np.float32)), 64.0)


def test_external_data_is_found_by_walking_the_model_not_by_matching_bytes() -> None:
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    from edgeclf.runtime.bundle import _uses_external_data

    def model(value_info=(), nodes=(), inits=()):
        g = helper.make_graph(list(nodes) or [helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
                              initializer=list(inits), value_info=list(value_info))
        return helper.make_model(g).SerializeToString()

    # value_info (GraphProto field 13, the tag of TensorProto.external_data) for a tensor named "location".
    assert not _uses_external_data(model(value_info=[helper.make_tensor_value_info("location", TensorProto.FLOAT, [1, 3])]))
    # An initializer, and a Constant node's tensor inside an If branch, kept in an external file.
    t = numpy_helper.from_array(np.ones(3, np.float32), "w")
    set_external_data(t, location="w.bin")
    t.data_location = TensorProto.EXTERNAL
    assert _uses_external_data(model(inits=[t]))
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=t)], "b", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])])
    cond = helper.make_node("If", ["input"], ["logits"], then_branch=branch, else_branch=branch)
    assert _uses_external_data(model(nodes=[cond]))
    assert not _uses_external_data(b"\xff\xff not a model")  # left to the backend to refuse


def test_tensorrt_ep_engines_of_a_model_given_as_bytes_are_kept_per_model(tmp_path: Path):
    # The EP names an engine by the model file's name and node names, never its weights: without a file name two
    # models of one architecture (two bundles, or the fp16 variant) would share an engine.
    digest = hashlib.sha256(b"model").hexdigest()
    opts = ort_provider_options("ort-tensorrt", BackendOptions(engine_cache=str(tmp_path)), model_sha256=digest)
    assert opts is not None and opts["trt_engine_cache_path"] == str(tmp_path / "ort-tensorrt" / digest[:16])
    assert (tmp_path / "ort-tensorrt" / digest[:16]).is_dir()


def test_without_the_bundle_the_file_is_opened_as_before(tmp_path: Path):
    bundle = make_tiny_bundle(tmp_path / "b")
    x, want = _reference(bundle)
    with create_backend(str(bundle / "model.onnx"), (1, 8, 8), 3) as be:
        assert np.allclose(be.infer(x), want, atol=1e-5)


def test_the_runtime_and_evaluate_open_models_through_the_verified_bytes(tmp_path: Path):
    # `edgeclf run` (open_backend), `profile` and `evaluate` make their sessions from the bytes checked at load.
    from edgeclf.runtime.app import open_backend, profile_backend_factory
    from edgeclf.runtime.profile import _default_factory

    bundle = make_tiny_bundle(tmp_path / "b")
    other = make_tiny_bundle(tmp_path / "other", seed=1)
    b = load_bundle(bundle)
    shutil.copy(other / "model.onnx", bundle / "model.onnx")
    target = type("T", (), {"backend": "ort-cpu"})()
    for make in (lambda: open_backend(b, "ort-cpu"),
                 lambda: profile_backend_factory()(b, str(b.model_path), target, 1),
                 lambda: _default_factory(b, str(b.model_path), target, 1)):
        with pytest.raises(IntegrityError, match="'model.onnx' changed after the bundle was verified"):
            make()


def test_a_fixed_batch_model_gets_padded_chunks_and_drops_the_padding(tmp_path: Path) -> None:
    # A model exported with batch 4 fixed: one frame (a cart's call) or 6 inputs must still be classified,
    # each row the same as when it is fed in a full batch.
    import onnx
    from onnx import TensorProto, helper

    w = np.arange(2 * 8 * 8, dtype=np.float32).reshape(64, 2) / 100.0
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])], "fixed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    with create_backend(str(path), (1, 8, 8), 2) as be:
        assert be.fixed_batch == 4
        one, six = be.infer(x[:1]), be.infer(x)
    expected = x.reshape(6, 64) @ w
    assert one.shape == (1, 2) and six.shape == (6, 2)
    np.testing.assert_allclose(six, expected, rtol=1e-5)
    np.testing.assert_allclose(one, expected[:1], rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's own warning: the state under test
@pytest.mark.parametrize("backend, listed", [
    ("ort-cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("ort-tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
])
def test_a_provider_the_session_dropped_is_refused_not_run_under_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          backend: str, listed: list) -> None:
    # onnxruntime-gpu lists CUDA/TensorRT whenever it was built with them; when their libraries cannot load, the
    # session warns and runs on the CPU. This CPU-only build, told to list them, is in that state.
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(listed))
    monkeypatch.setenv("EDGECLF_ENGINE_CACHE", str(tmp_path / "engines"))
    b = load_bundle(str(make_tiny_bundle(tmp_path / "b")))
    with pytest.raises(BackendError, match=f"asked onnxruntime for {listed[0]}, but the session runs on CPUExecutionProvider"):
        create_backend(str(b.path / b.manifest.raw["model"]["file"]), (1, 8, 8), 3, backend=backend, bundle=b)


def test_an_onnxruntime_that_fails_to_import_is_a_reason_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend_availability imported onnxruntime directly: a broken install (a C extension that did not initialise)
    raised out of `edgeclf devices detect` / backend choice instead of being the reason no ONNX Runtime backend runs."""
    import importlib

    from edgeclf.runtime.backends import backend_availability

    real = importlib.import_module

    def broken(name: str, *a: Any, **k: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("initialization failed")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", broken)
    got = backend_availability()
    assert got["ort-cpu"] is not None and "failed to import" in got["ort-cpu"] and "initialization failed" in got["ort-cpu"]
