"""`edgeclf export`: a trained folder, a user's ONNX file or a user's torch module -> a verified bundle."""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.data import Dataset, load_dataset
from edgeclf.errors import ConfigError, DataError, ModelError
from edgeclf.export.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, ExportError, export_onnx, parity_report
from edgeclf.runtime.bundle import FORMAT, MANIFEST_FILE, SCHEMA_VERSION, load_bundle, write_checksums
from edgeclf.runtime.postprocess import TASKS, probabilities
from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec

__all__ = ["ExportConfig", "export_bundle"]

log = logging.getLogger(__name__)
MAX_REFERENCE = 64


@dataclass(frozen=True)
class ExportConfig:
    out: str
    model: str | None = None  # a training folder
    from_onnx: str | None = None
    from_torch: str | None = None  # module:factory
    weights: str | None = None
    data: str | None = None
    classes: str | None = None
    split: str = "val"
    samples: bool = True
    # For models that were not trained by edgeclf:
    labels: str | None = None
    task: str | None = None
    size: int | None = None
    channels: int | None = None
    mean: str | None = None
    std: str | None = None
    target_sensitivity: float = 0.9
    positive: str | None = None
    name: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        sources = [s for s in (self.model, self.from_onnx, self.from_torch) if s]
        if len(sources) != 1:
            raise ConfigError("give exactly one of --model DIR, --from-onnx FILE or --from-torch module:factory")
        if self.from_torch and not self.weights:
            raise ConfigError("--from-torch needs --weights FILE (a .safetensors or a tensors-only torch file)")
        if (self.from_onnx or self.from_torch) and not (self.labels and self.task and self.size and self.data):
            raise ConfigError("--from-onnx/--from-torch need --labels, --task, --size and --data (real validation images for parity and calibration)")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"--task {self.task!r} is unknown; allowed: {', '.join(TASKS)}")


def _floats(text: str | None, n: int, default: float) -> tuple[float, ...]:
    if not text:
        return (default,) * n
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{text!r} is not a comma-separated list of numbers") from None
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise ConfigError(f"{text!r} has {len(vals)} values; the model has {n} input channel(s)")
    return vals


def _load_torch_factory(target: str, weights: str):
    import torch

    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise ConfigError(f"--from-torch {target!r} must look like package.module:factory")
    sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"--from-torch {target!r} could not be imported ({exc}); check the module path and PYTHONPATH") from None
    finally:
        sys.path.pop(0)
    model = factory()
    wpath = Path(weights)
    if not wpath.is_file():
        raise ModelError(f"weights file {weights} does not exist")
    if wpath.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(wpath))
    else:
        try:
            state = torch.load(str(wpath), map_location="cpu", weights_only=True)  # never unpickle code
        except Exception as exc:
            raise ModelError(f"weights file {weights} is not a tensors-only state dict ({str(exc).splitlines()[0]})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"weights {weights} do not fit {target}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _torch_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i : i + 256])).numpy() for i in range(0, len(x), 256)])


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Raw ONNX Runtime outputs, batched where the model's batch axis allows it."""
    import onnxruntime as ort

    from edgeclf.runtime.backends import default_threads

    so = ort.SessionOptions()
    so.intra_op_num_threads = default_threads()
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelError(f"onnxruntime cannot load {path.name}: {str(exc).splitlines()[0]}") from None
    inp = sess.get_inputs()[0]
    step = 256 if not isinstance(inp.shape[0], int) else max(1, inp.shape[0])
    try:
        return np.concatenate([sess.run(None, {inp.name: x[i : i + step]})[0] for i in range(0, len(x), step)])
    except Exception as exc:  # shape or type mismatch between the data and the model
        raise ModelError(f"the ONNX model rejects inputs of shape {x.shape[1:]}: {str(exc).splitlines()[0]}; check --size/--channels") from None


def export_bundle(cfg: ExportConfig) -> dict[str, Any]:
    """Write and verify a bundle; returns its manifest."""
    from edgeclf.calibration import fit_decision_rule, fit_temperature
    from edgeclf.metrics import evaluate_predictions
    from edgeclf.train import load_trained, package_versions

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite or not (out / MANIFEST_FILE).is_file():
            raise ConfigError(f"output folder {out} is not empty; choose a new --out or pass --overwrite to replace a bundle")
        shutil.rmtree(out)
    provenance: dict[str, Any] = {"exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    torch_model = None
    in_name = INPUT_NAME
    if cfg.model:
        tm = load_trained(cfg.model)
        task, labels, spec = tm.task, tm.labels, tm.preprocess
        temperature, rule = tm.temperature, tm.decision
        torch_model = tm.model
        data_spec = cfg.data or tm.run.get("data", {}).get("spec")
        classes = cfg.classes or tm.run.get("data", {}).get("classes")
        seed = tm.run.get("config", {}).get("seed", 0)
        arch = tm.meta["architecture"]
        provenance.update(source="trained", training={k: tm.run.get(k) for k in ("config", "best_epoch", "seconds", "packages")},
                          data=tm.run.get("data"))
        train_metrics = tm.run.get("metrics", {})
    else:
        task = str(cfg.task)
        labels = [s.strip() for s in str(cfg.labels).split(",") if s.strip()]
        if len(labels) < 2 and task != "multilabel" or (task == "binary" and len(labels) != 2):
            raise ConfigError(f"--labels {cfg.labels!r} does not fit a {task} task")
        ch = cfg.channels or 3
        side = int(cfg.size or 0)  # validated by ExportConfig
        spec = PreprocessSpec(channels=ch, size=(side, side), mean=_floats(cfg.mean, ch, 0.5), std=_floats(cfg.std, ch, 0.25))
        data_spec, classes, seed = cfg.data, cfg.classes, 0
        arch = "user"
        temperature, rule = 1.0, None
        train_metrics = {}
        if cfg.from_torch:
            torch_model = _load_torch_factory(str(cfg.from_torch), str(cfg.weights))
            provenance.update(source="torch", factory=cfg.from_torch, weights=Path(str(cfg.weights)).name)
        else:
            src = Path(str(cfg.from_onnx))
            if not src.is_file():
                raise ModelError(f"ONNX file {src} does not exist")
            provenance.update(source="onnx", file=src.name)
    if not data_spec:
        raise ConfigError("no --data given and the training folder does not record its data; pass --data SPEC")
    ds: Dataset = load_dataset(data_spec, classes=classes, seed=seed)
    if ds.task != task or (cfg.model and ds.labels != labels):
        raise DataError(f"data {data_spec} is a {ds.task} set with labels {ds.labels}; the model is {task} with {labels}")
    split = ds.split(cfg.split)
    pre = Preprocessor(spec)
    x = pre.normalize(np.stack([pre.geometry(im) for im in split.images]))
    y = split.labels
    if cfg.model is None:
        provenance["data"] = {"spec": ds.spec, "hash": ds.data_hash, "licence": ds.licence, "classes": classes}

    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    try:
        if torch_model is not None:
            info = export_onnx(torch_model, x, onnx_path)
            ref = _torch_logits(torch_model, x)
        else:
            import onnx

            proto = onnx.load(str(cfg.from_onnx))
            onnx.checker.check_model(proto)
            opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
            if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
                raise ModelError("the ONNX model must have one input (N, C, H, W) and one output (N, K) of logits")
            if opset > OPSET:
                log.warning("ONNX opset %d is above %d: TensorRT 8.6 (JetPack 5) cannot parse it", opset, OPSET)
            shutil.copyfile(str(cfg.from_onnx), onnx_path)
            info = {"opset": opset, "ir_version": int(proto.ir_version)}
            ref = None
            in_name = proto.graph.input[0].name
        onnx_logits = _ort_logits(onnx_path, x).astype(np.float32)
        n_out = 1 if task == "binary" else len(labels)
        if onnx_logits.ndim != 2 or onnx_logits.shape[1] != n_out:
            raise ModelError(f"the model outputs shape {onnx_logits.shape}; a {task} model with {len(labels)} labels must output (N, {n_out}) logits")
        if rule is None:
            positive = labels.index(cfg.positive) if cfg.positive else 1
            temperature = fit_temperature(onnx_logits, y, task)
            rule = fit_decision_rule(probabilities(onnx_logits, task, temperature), y, task,
                                     target_sensitivity=cfg.target_sensitivity, positive=positive)
        parity = parity_report(ref if ref is not None else onnx_logits, onnx_logits, task, temperature, rule)
        parity.update(reference="torch" if ref is not None else "none (source is ONNX)", split=cfg.split, precision="fp32")
        if parity["decision_agreement"] < 1.0:
            raise ExportError(
                f"ONNX Runtime disagrees with torch on {round((1 - parity['decision_agreement']) * parity['n'])} of {parity['n']} "
                f"{cfg.split} images (max logit diff {parity['max_abs_diff_logits']:.2e}); the export is not faithful, so no bundle was written"
            )
        probs = probabilities(onnx_logits, task, temperature)
        metrics = {f"{cfg.split}_onnx_fp32": evaluate_predictions(probs, y, task, rule, labels, n_boot=500)}
        if "test" in train_metrics:
            metrics["test_training"] = train_metrics["test"]
        reference = None
        if cfg.samples:
            k = min(MAX_REFERENCE, len(x))
            # Preprocessed tensors only: no file names, no metadata.
            np.savez_compressed(out / "reference.npz", inputs=x[:k], logits=onnx_logits[:k])
            reference = {"file": "reference.npz", "count": k, "split": cfg.split}
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave half a bundle behind
        raise
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "name": cfg.name or out.name,
        "created": provenance["exported_at"],
        "task": task,
        "labels": list(labels),
        "model": {
            "file": "model.onnx", "architecture": arch, "precision": "fp32", "opset": info["opset"], "ir_version": info["ir_version"],
            "input_name": in_name, "output_name": OUTPUT_NAME,
            "input_shape": ["batch", spec.channels, spec.size[0], spec.size[1]],
            "output_shape": ["batch", 1 if task == "binary" else len(labels)],
        },
        "variants": [],
        "preprocess": spec.to_dict(),
        "postprocess": {"temperature": temperature, "decision": rule.to_dict()},
        "provenance": {**provenance, "packages": package_versions()},
        "parity": parity,
        "metrics": metrics,
        "reference": reference,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    write_checksums(out)
    load_bundle(out)  # the bundle we hand over must load exactly as a device would load it
    return manifest


