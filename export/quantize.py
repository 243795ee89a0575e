"""INT8 (ONNX Runtime static QDQ) and fp16 variants of an exported fp32 model. Workstation side only.

Two INT8 flavours, because the targets disagree:

* ``cpu``: QUInt8 activations (asymmetric), QInt8 per-channel weights, ``reduce_range`` (7-bit weights).
  Measured on an x86 workstation CPU: signed activations ran 3-4x *slower* than fp32 on
  MobileNetV3/EfficientNet, unsigned activations with reduce_range were the fast and accurate setting,
  unsigned without reduce_range drifted badly.
* ``tensorrt``: what TensorRT's ONNX parser accepts: symmetric QInt8 activations and weights with
  zero point 0, weights kept in float behind a dedicated QuantizeLinear/DequantizeLinear pair, bias
  left in float (TensorRT rejects an INT32 DequantizeLinear) and one Q/DQ pair per consumer. ONNX
  Runtime on a CPU runs it too (that is how it is checked here), but slowly: it is for TensorRT.

fp16 is for GPU targets only: on CPUs it brings no speed-up.

Calibration memory: ``minmax`` keeps two scalars per tensor and batch. ``entropy`` and
``percentile`` keep every intermediate tensor of a chunk in memory before histogramming it, so they
calibrate in chunks of ``HISTOGRAM_CHUNK`` images; memory is about chunk x (all activations of one
image): MobileNetV3-small at 224 px has 142 calibrated tensors, 15.5 MB per image, so ~0.5 GB per
chunk (ORT's own quantize_static would hold all n images: 2 GB at n=128). Histogram methods also
cost time (entropy ~0.15 s per tensor here). Keep calibration n modest (128-512).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeclf.errors import ConfigError, DataError, EdgeclfError, MissingExtraError, ModelError

__all__ = [
    "CALIBRATION_METHODS",
    "INT8_FLAVOURS",
    "calibration_sample",
    "calibration_indices",
    "quantize_int8",
    "convert_fp16",
    "quantizable_nodes",
]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_FLAVOURS = ("cpu", "tensorrt")
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
CALIB_BATCH = 16  # largest calibration batch (dynamic-batch models); batches are all the same size
HISTOGRAM_CHUNK = 32  # images held at once by the entropy/percentile calibrators
# Entropy: 512 bins (TensorRT uses 2048; ORT's pure-Python KL search costs ~0.7 s per tensor there,
# ~0.15 s at 512). Percentile: ORT's defaults, made explicit.
CALIB_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}


# ------------------------------------------------------------------------------ calibration data
def _strata(labels: np.ndarray, n: int) -> np.ndarray:
    """One stratum per row: the class (single label) or the first positive label (multi-hot), -1 for none."""
    if labels.ndim == 1:
        if labels.dtype.kind not in "iub":
            raise DataError(f"labels have dtype {labels.dtype}; expected integer class indices (N,) or multi-hot (N, K)")
        return labels.astype(np.int64)
    if labels.ndim == 2:
        pos = labels != 0
        first = np.argmax(pos, axis=1).astype(np.int64)
        return np.where(pos.any(axis=1), first, -1)
    raise DataError(f"labels have shape {labels.shape}; expected (N,) class indices or (N, K) multi-hot for {n} images")


def _allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Per-stratum sample sizes summing to n: largest remainder, every stratum at least one when n allows."""
    total = int(counts.sum())
    exact = counts * (n / total)
    take = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -(exact - take)))  # largest remainder first, ties by stratum order
    for i in order[: n - int(take.sum())]:
        take[i] += 1
    if n >= len(counts):  # a rare class still shows up once; the donor is the stratum furthest above its share
        for i in np.flatnonzero(take == 0):
            donor = int(np.argmax(np.where(take > 1, take - exact, -np.inf)))
            take[donor] -= 1
            take[i] = 1
    return take


def calibration_sample(images_x: np.ndarray, labels: np.ndarray, *, n: int = 128, seed: int = 0) -> tuple[np.ndarray, str]:
    """A seeded, class-stratified sample of preprocessed training inputs; returns (sample, sha256 hex).

    images_x: (N, C, H, W) float32, already preprocessed exactly as the runtime does.
    labels: (N,) int classes, or (N, K) multi-hot (stratified on the first positive label, or 'none').
    Each stratum gets its proportional share (largest remainder), and at least one image when n is at
    least the number of strata. n >= N returns every image in the original order. The hash is
    ``sha256(sample.tobytes())``, for provenance.
    """
    if not isinstance(images_x, np.ndarray) or images_x.ndim != 4 or images_x.dtype != np.float32:
        got = f"{images_x.dtype}{images_x.shape}" if isinstance(images_x, np.ndarray) else type(images_x).__name__
        raise DataError(f"calibration images are {got}; expected preprocessed float32 (N, C, H, W)")
    if len(images_x) == 0:
        raise DataError("there are no calibration images; give at least one preprocessed training image")
    labels = np.asarray(labels)
    if len(labels) != len(images_x):
        raise DataError(f"{len(labels)} labels for {len(images_x)} calibration images; they must match one to one")
    idx = calibration_indices(labels, int(n) if isinstance(n, (int, np.integer)) and not isinstance(n, bool) else -1, seed)
    sample = np.ascontiguousarray(images_x[idx])
    return sample, hashlib.sha256(sample.tobytes()).hexdigest()


def calibration_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a seeded, class-stratified calibration sample (see `calibration_sample`), so that a
    caller preprocesses only the images it needs. n >= N gives every index in order."""
    labels = np.asarray(labels)
    if n < 1:
        raise ConfigError(f"calibration n is {n!r}; expected an integer >= 1")
    if n >= len(labels):
        return np.arange(len(labels))
    strata = _strata(labels, len(labels))
    rng = np.random.default_rng(seed)
    keys, counts = np.unique(strata, return_counts=True)
    picks = [rng.choice(np.flatnonzero(strata == k), size=int(q), replace=False)
             for k, q in zip(keys, _allocate(counts, int(n))) if q > 0]
    return rng.permutation(np.concatenate(picks))  # classes mixed across calibration chunks


# ------------------------------------------------------------------------------------ helpers
def _check_choice(what: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} {value!r} is unknown; allowed: {', '.join(allowed)}")


def _load_onnx(path: Path) -> Any:
    import onnx

    if not Path(path).is_file():
        raise ModelError(f"ONNX file {path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data
        raise ModelError(f"{Path(path).name} is not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None


def _graph_input(proto: Any) -> Any:
    init = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs; edgeclf models take one (N, C, H, W) float32 input")
    return inputs[0]


def _toposort(graph: Any) -> None:
    """Order graph.node topologically in place, keeping the original order among ready nodes.

    The fp16 converter appends its input/output Cast nodes at the end; the ONNX checker and
    TensorRT's parser both need producers before consumers.
    """
    import heapq

    nodes = list(graph.node)
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    deps = [{producer[i] for i in n.input if i not in known and i in producer} for n in nodes]
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(k)
    waiting = [len(d) for d in deps]
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users.get(k, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ModelError("the converted graph has a cycle; it cannot be ordered for ONNX or TensorRT")
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)


def _save_single_file(proto: Any, out_path: Path, probe: np.ndarray) -> None:
    """Check, write one self-contained file (no external data), run it on `probe`, then move it into place."""
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx ValidationError
        raise ModelError(f"the converted model is not valid ONNX ({str(exc).splitlines()[0][:200]})") from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        _check_runs(tmp, probe, out_path.name)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_runs(path: Path, x: np.ndarray, name: str) -> None:
    """The written model loads and runs in ONNX Runtime on the CPU, or ModelError."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception as exc:  # onnxruntime's own error types
        raise ModelError(f"onnxruntime cannot run the converted {name}: {str(exc).splitlines()[0][:200]}") from None


def quantizable_nodes(path: Path) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes, in graph order (for per-layer sensitivity analysis).

    Unnamed nodes are left out: they cannot be named in ``nodes_to_exclude``.
    """
    proto = _load_onnx(Path(path))
    return [n.name for n in proto.graph.node if n.op_type in QUANTIZABLE_OPS and n.name]


# ----------------------------------------------------------------------------------------- int8
def _settings(flavour: str) -> dict[str, Any]:
    """The quantize_static settings of a flavour, as plain values (names of QuantType members)."""
    if flavour == "cpu":
        return {"activation": "QUInt8", "weight": "QInt8", "reduce_range": True, "symmetric": False, "extra": {}}
    return {
        "activation": "QInt8", "weight": "QInt8", "reduce_range": False, "symmetric": True,
        "extra": {
            "ActivationSymmetric": True,  # zero point 0 on every activation
            "WeightSymmetric": True,
            "AddQDQPairToWeight": True,  # float weights behind Q/DQ, the form TensorRT's parser consumes
            "DedicatedQDQPair": True,  # TensorRT cannot share one Q/DQ pair between consumers
            "QuantizeBias": False,  # TensorRT rejects INT32 DequantizeLinear on biases
        },
    }


def _batching(n: int, fixed: int | None) -> tuple[int, int]:
    """(batch size, usable images): every batch the same size (the histogram calibrators stack them)."""
    if fixed:
        if n < fixed:
            raise DataError(f"the model takes batches of exactly {fixed}; give at least {fixed} calibration images, got {n}")
        return fixed, n - n % fixed
    return max(b for b in range(1, min(CALIB_BATCH, n) + 1) if n % b == 0), n


def _make_reader(calib: np.ndarray, input_name: str, batch: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        """Equal batches of `calib`; len() and set_range() count batches (for chunked calibration)."""

        def __init__(self) -> None:
            self.n_batches = len(calib) // batch
            self.set_range(0, self.n_batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._next, self._end = int(start_index), min(int(end_index), self.n_batches)

        def __len__(self) -> int:
            return self.n_batches

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= self._end:
                return None
            i, self._next = self._next, self._next + 1
            return {input_name: calib[i * batch : (i + 1) * batch]}

    return _Reader()


def _float_outputs(graph: Any) -> list[str]:
    """Drop the Q/DQ pair in front of each graph output, so logits leave the model unrounded.

    The quantizer rounds the last Gemm's output to 8 bits over its calibration range: logits outside
    it clip and those inside move by up to half a step, which flips decisions near a fitted
    threshold. The last Gemm/MatMul then runs with int8 inputs and a float output (ORT's QGemm
    allows that; TensorRT too). Returns the outputs that were freed.
    """
    outs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    freed, drop = [], []
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.output[0] not in outs:
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or uses.get(q.output[0]) != 1:
            continue
        src = producer.get(q.input[0])
        if src is None or uses.get(q.input[0]) != 1 or q.input[0] in outs:
            continue
        src.output[list(src.output).index(q.input[0])] = dq.output[0]
        drop += [id(q), id(dq)]
        freed.append(dq.output[0])
    keep = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    dead = [t for t in graph.initializer if t.name not in used]
    for t in dead:
        graph.initializer.remove(t)
    return freed


def _tidy_opsets(proto: Any) -> None:
    """Keep only the opset imports the graph uses (the ORT optimiser adds every domain it knows)."""
    used = {n.domain for n in proto.graph.node} | {""}
    keep = [o for o in proto.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def _cache_supported() -> bool:
    """Whether this onnxruntime's quantize_static takes precomputed ranges (calibration_cache_path)."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _raised_in_onnx_tooling(exc: BaseException) -> bool:
    """Whether `exc` was raised by onnxruntime's or onnx's own code (the converter rejecting a model), as opposed
    to our code, even when ours runs inside theirs (ORT's calibrator calls our data reader): the verdict is the
    innermost frame that is theirs or ours; other installed packages (numpy called by ORT) do not decide it."""
    verdict, tb = False, exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.split(".")[0] in ("onnx", "onnxruntime"):
            verdict = True
        elif module.split(".")[0] == "edgeclf":
            verdict = False
        else:
            parts = Path(tb.tb_frame.f_code.co_filename).parts
            if "site-packages" not in parts and "dist-packages" not in parts:
                verdict = False  # not an installed package: a caller's code (a plugin, a test)
        tb = tb.tb_next
    return verdict


def _quantize(src: Path, raw: Path, calib: np.ndarray, input_name: str, batch: int, method: str,
              s: dict[str, Any], per_channel: bool, excluded: list[str], work: Path) -> None:
    """Calibrate with ORT's calibrators in bounded chunks, then ORT's quantize_static (QDQ) on those ranges.

    quantize_static cannot pass histogram sizes to its calibrators, and its entropy default (128
    bins, 128 quantized bins) leaves one candidate threshold: plain min/max. Calibrating here sets
    them (CALIB_OPTIONS) and bounds memory. An onnxruntime without calibration caches calibrates
    inside quantize_static with its defaults instead.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cal_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    reader = _make_reader(calib, input_name, batch)
    kwargs: dict[str, Any] = {}
    if _cache_supported():
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        calibrator = create_calibrator(src, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                       augmented_model_path=str(work / "augmented.onnx"), calibrate_method=cal_method,
                                       extra_options=dict(CALIB_OPTIONS[method]))
        n_batches = len(reader)
        chunk = n_batches if method == "minmax" else max(1, HISTOGRAM_CHUNK // batch)
        for start in range(0, n_batches, chunk):  # the histogram calibrators hold a whole chunk's tensors
            reader.set_range(start, start + chunk)
            calibrator.collect_data(reader)
        cache = work / "ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
        kwargs.update(calibration_data_reader=None, calibration_cache_path=str(cache))
    else:
        log.warning("this onnxruntime calibrates inside quantize_static with its own defaults (%s)", method)
        kwargs.update(calibration_data_reader=reader)
    quantize_static(
        str(src), str(raw),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        reduce_range=s["reduce_range"],
        activation_type=getattr(QuantType, s["activation"]),
        weight_type=getattr(QuantType, s["weight"]),
        nodes_to_exclude=list(excluded),
        calibrate_method=cal_method,
        extra_options=dict(s["extra"]),
        **kwargs,
    )


def _preprocess(src: Path, dst: Path, excluded: Sequence[str]) -> bool:
    """ORT's quant_pre_process (shape inference, basic optimisation) into dst; False where it cannot be used."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        names = {n.name for n in onnx.load(str(dst), load_external_data=False).graph.node}
    except Exception as exc:  # the optimiser or shape inference gave up: quantize the export as it is
        log.warning("quantization pre-processing failed (%s); quantizing the model as exported", str(exc).splitlines()[0][:200])
        return False
    lost = [e for e in excluded if e not in names]
    if lost:  # the optimiser renamed or fused a node the caller wants to keep in float
        log.info("pre-processing renames excluded node(s) %s; quantizing the model as exported", ", ".join(lost[:3]))
        return False
    return True


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calib: np.ndarray,
    *,
    flavour: str = "cpu",
    method: str = "minmax",
    per_channel: bool = True,
    nodes_to_exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """ORT static quantization in QDQ format, calibrated on `calib`; writes one self-contained file.

    flavour: ``cpu`` (QUInt8 activations, QInt8 weights with reduce_range) or ``tensorrt`` (symmetric
    QInt8 everywhere, zero point 0). method: minmax | entropy | percentile. nodes_to_exclude: node
    names (see `quantizable_nodes`) kept in float. The model must have been exported with one
    float32 (N, C, H, W) input; a dynamic batch axis calibrates in equal batches of up to
    CALIB_BATCH, a fixed batch B in batches of B (n is cut to a multiple of B).

    Returns {"precision": "int8", "flavour", "method", "per_channel", "activation_type",
    "weight_type", "reduce_range", "symmetric", "excluded", "calibration_n", "calibration_sha256" (sha256 of the
    calibration_n images used, ``calib[:calibration_n].tobytes()``), "preprocessed",
    "bias" (int32 or float32), "float_outputs" (graph outputs left unquantized), "onnxruntime"}.
    The graph outputs (logits) stay float: see `_float_outputs`.
    """
    _check_choice("INT8 flavour", flavour, INT8_FLAVOURS)
    _check_choice("calibration method", method, CALIBRATION_METHODS)
    if isinstance(nodes_to_exclude, str):
        raise ConfigError(f"nodes_to_exclude is the string {nodes_to_exclude!r}; give a list of node names")
    excluded = list(dict.fromkeys(str(e) for e in nodes_to_exclude))
    if not isinstance(calib, np.ndarray) or calib.ndim != 4 or calib.dtype != np.float32 or len(calib) == 0:
        got = f"{calib.dtype}{calib.shape}" if isinstance(calib, np.ndarray) else type(calib).__name__
        raise DataError(f"calibration data is {got}; expected a non-empty preprocessed float32 (N, C, H, W) array")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if fp32_path.resolve() == out_path.resolve():
        raise ConfigError(f"the INT8 model would overwrite its fp32 source {fp32_path.name}; choose another output path")
    proto = _load_onnx(fp32_path)
    inp = _graph_input(proto)
    names = {n.name for n in proto.graph.node}
    unknown = [e for e in excluded if e not in names]
    if unknown:
        raise ConfigError(f"node(s) {', '.join(unknown[:5])} to exclude are not in {fp32_path.name}; list them with quantizable_nodes()")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4 or any(m is not None and m != c for m, c in zip(dims[1:], calib.shape[1:])):
        raise DataError(f"calibration data has shape (N, {', '.join(map(str, calib.shape[1:]))}); the model's input {inp.name!r} "
                        f"is {dims}; preprocess the calibration images as the model expects")
    batch, usable = _batching(len(calib), dims[0] if dims[0] else None)
    if usable < len(calib):
        log.info("calibrating on %d of %d images: the model takes batches of exactly %d", usable, len(calib), batch)
    calib = np.ascontiguousarray(calib[:usable])
    del proto

    import onnx
    import onnxruntime as ort

    s = _settings(flavour)
    work = Path(tempfile.mkdtemp(prefix="edgeclf-quant-"))
    try:
        pre = work / "pre.onnx"
        preprocessed = _preprocess(fp32_path, pre, excluded)
        src = pre if preprocessed else fp32_path
        raw = work / "int8.onnx"
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink):  # ORT's histogram collector prints progress to stdout
                _quantize(src, raw, calib, inp.name, batch, method, s, bool(per_channel), excluded, work)
        except MemoryError:
            raise ModelError(f"{method} calibration ran out of memory on {usable} images; use fewer, or method minmax") from None
        except EdgeclfError:
            raise
        except Exception as exc:  # ORT raises ValueError/RuntimeError/its own Fail types
            if not _raised_in_onnx_tooling(exc):  # a bug in our own glue keeps its traceback: it is not "cannot be built"
                raise
            # Chained, not hidden: `--precision auto` records this as "not built", and the cause stays for a traceback.
            raise ModelError(f"onnxruntime could not quantize {fp32_path.name} ({method}, {flavour}): {str(exc).splitlines()[0][:200]}") from exc
        finally:
            if sink.getvalue().strip():
                log.debug("onnxruntime quantization: %s", sink.getvalue().strip())
        qproto = onnx.load(str(raw))
        if not any(n.op_type == "QuantizeLinear" for n in qproto.graph.node):
            raise ModelError(f"nothing in {fp32_path.name} was quantized (no Conv/Gemm/MatMul left after exclusions); ship the fp32 model")
        float_out = _float_outputs(qproto.graph)
        _tidy_opsets(qproto)
        _save_single_file(qproto, out_path, calib[:batch])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "precision": "int8",
        "flavour": flavour,
        "method": method,
        "per_channel": bool(per_channel),
        "activation_type": "uint8" if s["activation"] == "QUInt8" else "int8",
        "weight_type": "int8",
        "reduce_range": s["reduce_range"],
        "symmetric": s["symmetric"],
        "excluded": excluded,
        "calibration_n": int(usable),
        "calibration_sha256": hashlib.sha256(calib.tobytes()).hexdigest(),  # what was read, not what was handed in
        "preprocessed": preprocessed,
        "bias": "float32" if s["extra"].get("QuantizeBias") is False else "int32",
        "float_outputs": float_out,
        "onnxruntime": ort.__version__,
    }


# ----------------------------------------------------------------------------------------- fp16
def _fp16_converter() -> tuple[Any, str]:
    try:
        from onnxconverter_common import float16

        return float16.convert_float_to_float16, "onnxconverter-common"
    except ImportError:
        pass
    saved = list(sys.path)  # onnxruntime.transformers appends its own folder to sys.path on import
    try:
        from onnxruntime.transformers import float16 as ort_float16

        return ort_float16.convert_float_to_float16, "onnxruntime.transformers"
    except ImportError:
        raise MissingExtraError(
            "fp16 conversion needs onnxconverter-common (or onnxruntime with its transformers tools); "
            "install it with: pip install onnxconverter-common"
        ) from None
    finally:
        sys.path[:] = saved


def convert_fp16(fp32_path: Path, out_path: Path) -> dict[str, Any]:
    """fp16 weights and activations with float32 input/output (keep_io_types), for GPU targets.

    The runtime's float32 feeds work unchanged; on CPUs fp16 gives no speed-up. Returns
    {"precision": "fp16", "keep_io_types": True, "converter"}.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if fp32_path.resolve() == out_path.resolve():
        raise ConfigError(f"the fp16 model would overwrite its fp32 source {fp32_path.name}; choose another output path")
    convert, name = _fp16_converter()
    proto = _load_onnx(fp32_path)
    inp = _graph_input(proto)
    try:
        half = convert(proto, keep_io_types=True)
    except Exception as exc:  # converter asserts and ValueErrors
        raise ModelError(f"{name} could not convert {fp32_path.name} to fp16: {str(exc).splitlines()[0][:200]}") from exc
    _toposort(half.graph)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    _save_single_file(half, out_path, np.zeros(dims, np.float32))
    return {"precision": "fp16", "keep_io_types": True, "converter": name}
