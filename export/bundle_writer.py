"""`edgeclf export`: a trained folder, a user's ONNX file or a user's torch module -> a verified bundle."""
from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.data import (
    Dataset,
    abstain_counts,
    classified_rows,
    classify_fix,
    load_dataset,
    load_training_data,
    none_classified,
    spec_name,
)
from edgeclf.errors import ConfigError, DataError, ModelError
from edgeclf.export.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, ExportError, export_onnx, parity_report
from edgeclf.export.prune import TRAINING_FACTS
from edgeclf.runtime.bundle import (
    CHECKSUM_FILE,
    FORMAT,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    write_checksums,
)
from edgeclf.runtime.postprocess import TASKS, probabilities
from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec

__all__ = ["ExportConfig", "export_bundle", "infer_all"]

log = logging.getLogger(__name__)
MAX_REFERENCE = 64


TIE_TOLERANCE = 1e-6  # logits this close: float rounding, not an unfaithful export
# fp32 ONNX Runtime vs torch agree to ~1e-5; compressed variants are held to the accuracy gate instead.
TORCH_ONNX_TOLERANCE = 1e-3  # on probabilities, and on logits relative to max(1, |torch logit|)
# One float32 rounding of l[1] - l[0] through a sigmoid (slope <= 1/4): far below this on any probability.
TWO_LOGIT_TOLERANCE = 1e-5


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
    # Compression (see export/compress.py).
    precision: str = "fp32"
    max_drop: float = 0.01
    min_agreement: float = 0.98  # decisions a variant must share with its fp32 parent on validation
    calibration: str = "minmax"
    calibration_n: int = 128
    # Last rung of the INT8 ladder: quantization-aware fine-tuning epochs (0: off). Needs a training folder.
    qat_epochs: int = 4
    # auto: choose for this device profile's preferred backend instead of timing on this machine.
    device: str | None = None

    def __post_init__(self) -> None:
        sources = [s for s in (self.model, self.from_onnx, self.from_torch) if s]
        if len(sources) != 1:
            raise ConfigError("give exactly one of --model DIR, --from-onnx FILE or --from-torch module:factory")
        if self.from_torch and not self.weights:
            raise ConfigError("--from-torch needs --weights FILE (a .safetensors or a tensors-only torch file)")
        if (self.from_onnx or self.from_torch) and not (self.labels and self.task and self.size and self.data):
            raise ConfigError("--from-onnx/--from-torch need --labels, --task, --size and --data (real validation images for parity and calibration)")
        from edgeclf.export.compress import PRECISION_CHOICES

        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"--precision {self.precision!r} is unknown; allowed: {', '.join(PRECISION_CHOICES)}")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"--task {self.task!r} is unknown; allowed: {', '.join(TASKS)}")
        if self.positive and self.task is not None and self.task != "binary":
            raise ConfigError(f"--positive applies to binary tasks only; this is a {self.task} task: leave --positive out")
        for flag, text in (("--mean", self.mean), ("--std", self.std)):  # imported models: checked before any data is read
            if not self.model:
                _floats(text, self.channels or 3, 0.0, flag)
        if self.qat_epochs < 0:
            raise ConfigError(f"--qat-epochs is {self.qat_epochs}; give 0 (off) or more")
        if self.device is not None:
            from edgeclf.devices import load_profile

            load_profile(self.device)  # an unknown name: ConfigError listing the known ones
            if self.precision != "auto":
                raise ConfigError(f"--device {self.device} chooses among compressed candidates: give it with --precision auto")


def _floats(text: str | None, n: int, default: float, flag: str) -> tuple[float, ...]:
    """`flag`'s comma-separated values, one per channel (one value: every channel)."""
    if not text:
        return (default,) * n
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of numbers; give e.g. {flag} 0.5 or 0.5,0.5,0.5") from None
    if not all(math.isfinite(v) for v in vals):  # float() takes nan and inf; the model's logits would carry them
        raise ConfigError(f"{flag} {text!r} holds a value that is not finite; give finite numbers, e.g. {flag} 0.5")
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise ConfigError(f"{flag} {text!r} has {len(vals)} values; the model has {n} input channel(s): give 1 or {n}")
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
    try:  # a factory that needs arguments is a usage mistake; a TypeError inside its body stays a bug
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise ModelError(f"--from-torch {target} must build the model with no arguments ({exc}); "
                         "point it at a function that takes none") from None
    except ValueError:  # no signature to inspect (a builtin): just call it
        pass
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"--from-torch {target} returned a {type(model).__name__}, not a torch.nn.Module; "
                         "the factory must return the (untrained) model")
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
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {weights} holds a {type(state).__name__}, not a state dict of named tensors")
    _check_fit(model.state_dict(), state, weights, target)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ModelError(f"weights {weights} do not fit {target}: {(lines[1:] or lines)[0][:300]}") from None
    return model.eval()


def _describe(out: Any) -> str:
    """What a model returned, briefly: 'a tuple of (Tensor (1, 3), Tensor (1, 4))', 'a Tensor (1, 3, 2)'."""
    shape = getattr(out, "shape", None)
    if shape is not None:
        return f"a {type(out).__name__} {tuple(shape)}"
    if isinstance(out, (tuple, list)):
        parts = [f"{type(v).__name__} {tuple(v.shape)}" if hasattr(v, "shape") else type(v).__name__ for v in out[:4]]
        return f"a {type(out).__name__} of ({', '.join(parts)}{', ...' if len(out) > 4 else ''})"
    if isinstance(out, dict):
        return f"a {type(out).__name__} with keys {_few([str(k) for k in out])}"
    return f"a {type(out).__name__}"


def _check_torch_output(model: Any, x: np.ndarray, target: str) -> None:
    """A --from-torch model must return one logits tensor (N, K): a tuple (logits, features), a dict or an
    aux-head output cannot be exported as a classifier. Checked on one input before anything is exported."""
    import torch

    try:
        with torch.inference_mode():
            out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    except RuntimeError as exc:
        raise ModelError(f"the model rejects inputs of shape {x.shape[1:]}: {str(exc).splitlines()[0]}; check --size/--channels") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ModelError(f"--from-torch {target} returns {_describe(out)}; a classifier must return one logits tensor (N, K): "
                         "wrap the model so that forward returns the logits only")


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _check_fit(expected: dict[str, Any], state: dict[str, Any], weights: str, target: str) -> None:
    """One line naming a few missing, unexpected or mis-shaped keys (torch's own message spans many lines)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(set(state) & set(expected))
              if tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = ([f"missing keys {_few(missing)}"] if missing else []) + ([f"unexpected keys {_few(unexpected)}"] if unexpected else []) + (
        [f"shape mismatch {_few(shapes)}"] if shapes else [])
    if parts:
        raise ModelError(f"weights {weights} do not fit {target}: {'; '.join(parts)}; "
                         "give the weights saved from this model's state_dict()")


def infer_all(be: Any, x: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Outputs (N, K) of every row of x through backend `be`, `chunk` rows per call (a fixed-batch model's backend
    pads a short chunk itself and drops the padding's outputs)."""
    return np.concatenate([be.infer(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Raw ONNX Runtime outputs (N, K) of any model file, through the runtime's own backend."""
    from edgeclf.runtime.backends import OrtBackend

    with OrtBackend(str(path), (int(x.shape[1]), int(x.shape[2]), int(x.shape[3])), None) as be:
        return infer_all(be, x)


def _data_record(ds: Dataset, classes: str | None) -> dict[str, Any]:
    """What a bundle says about its data: a name and a hash, never a workstation path."""
    return {"name": ds.name, "kind": ds.kind, "hash": ds.data_hash, "files_hash": ds.files_hash, "licence": ds.licence,
            "classes": classes,
            "sizes": {s: len(v) for s, v in ds.splits.items()}}


def export_bundle(cfg: ExportConfig) -> dict[str, Any]:
    """Write a bundle into a temporary sibling folder, verify it as a device would, then move it into place.

    Returns the manifest. Nothing is left behind on failure, and an existing bundle replaced with
    --overwrite survives a failed export.
    """
    from edgeclf.calibration import fit_decision_rule, fit_temperature
    from edgeclf.evaluate import _frame_metrics
    from edgeclf.runtime.app import verify_bundle
    from edgeclf.train import _positive_index, load_trained, package_versions, torch_logits

    out = Path(cfg.out)
    _check_out(out, cfg.overwrite)
    provenance: dict[str, Any] = {"exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    torch_model = None
    tm = None
    user_onnx: tuple[Any, dict[str, Any], str, str] | None = None
    train_metrics: dict[str, Any] = {}
    if cfg.model:
        tm = load_trained(cfg.model)
        task, labels, spec = tm.task, list(tm.labels), tm.preprocess
        temperature, rule = tm.temperature, tm.decision
        torch_model = tm.model
        recorded = tm.run.get("data", {})
        data_spec = cfg.data or recorded.get("spec")
        classes = cfg.classes or recorded.get("classes")
        seed = tm.run.get("config", {}).get("seed", 0)
        arch = tm.meta["architecture"]
        cfg_rec = dict(tm.run.get("config") or {})
        cfg_rec.pop("data", None), cfg_rec.pop("out", None)  # workstation paths stay on the workstation
        pr = tm.run.get("pruning") or {}
        # This run's best epoch, seconds and packages: its training's, or for a pruned run its fine-tuning's.
        own = {k: tm.run.get(k) for k in TRAINING_FACTS}
        # A pruned run records its parent's training config and, under pruning.training, that training's own facts
        # (a run pruned before they were recorded no longer knows them: null, never the fine-tuning's).
        trained = (pr.get("training") or dict.fromkeys(TRAINING_FACTS)) if pr else own
        provenance.update(source="trained", training={"config": cfg_rec, **{k: trained.get(k) for k in TRAINING_FACTS}})
        if tm.tta != "none":  # the graph runs the network on the image and its mirror: twice the compute
            provenance["test_time_augmentation"] = tm.tta
        if tm.members > 1:  # the graph runs every member: N times the compute; each member's own figures recorded
            ens = tm.run.get("ensemble") or {}
            provenance["ensemble"] = {"members": tm.members, "combined": ens.get("combined"),
                                      # combined afterwards by `edgeclf ensemble`: the recipe recorded is the first member's
                                      "from_folders": bool(ens.get("from_folders")),
                                      "members_val": [{"seed": m.get("seed"), **(m.get("val") or {})} for m in ens.get("members", [])]}
        if tm.run.get("recipe"):
            provenance["recipe"] = {k: tm.run["recipe"].get(k) for k in ("name", "version", "sha256", "variant", "export")}
        if pr:
            provenance["pruning"] = {
                # metrics_before: the figures of the model the last pass pruned (its parent): that pass's accuracy cost.
                # original: the unpruned model's (name, MACs, parameters, metrics): the whole pruning's cost (null for a
                # run pruned by an edgeclf that did not record it). previous: the parent's own pruning, if it was pruned.
                **{k: pr.get(k) for k in ("target_macs", "macs", "params", "latency_ms", "pays", "verdict", "parent",
                                          "metrics_before", "original")},
                **({"previous": pr["previous"]} if pr.get("previous") else {}),
                # How the deployed weights were fine-tuned after pruning (per step: MACs, best epoch, val AUC).
                **{k: pr.get(k) for k in ("steps", "finetune_epochs", "lr", "distill", "round_to")},
                **own,
            }
        train_metrics = tm.run.get("metrics", {})
    else:
        task = str(cfg.task)
        labels = [s.strip() for s in str(cfg.labels).split(",") if s.strip()]
        if len(labels) < 2 and task != "multilabel" or (task == "binary" and len(labels) != 2):
            raise ConfigError(f"--labels {cfg.labels!r} does not fit a {task} task")
        ch = cfg.channels or 3
        side = int(cfg.size or 0)  # validated by ExportConfig
        spec = PreprocessSpec(channels=ch, size=(side, side), mean=_floats(cfg.mean, ch, 0.5, "--mean"),
                              std=_floats(cfg.std, ch, 0.25, "--std"))
        data_spec, classes, seed = cfg.data, cfg.classes, 0
        arch = "user"
        temperature, rule = 1.0, None
        if cfg.positive is not None and cfg.positive not in labels:
            raise ConfigError(f"--positive {cfg.positive!r} is not one of --labels {', '.join(labels)}")
        if cfg.from_torch:
            torch_model = _load_torch_factory(str(cfg.from_torch), str(cfg.weights))
            provenance.update(source="torch", factory=cfg.from_torch, weights=Path(str(cfg.weights)).name)
        else:
            if not Path(str(cfg.from_onnx)).is_file():
                raise ModelError(f"ONNX file {cfg.from_onnx} does not exist")
            # Read and checked against --size/--channels before the data: a wrong flag costs no data loading.
            user_onnx = _read_onnx(Path(str(cfg.from_onnx)), ch, side)
            provenance.update(source="onnx", file=Path(str(cfg.from_onnx)).name)
            cleaned = _strip_onnx_text(user_onnx[0])
            if cleaned:  # what was removed, by count only: its contents may name a patient or a workstation path
                provenance["onnx_cleaned"] = cleaned
    if not data_spec:
        raise ConfigError("no --data given and the training folder does not record its data; pass --data SPEC")
    # Clip models: sample the frames they were trained and validated on (as train, prune and evaluate do).
    fpc = int((tm.run.get("config") or {}).get("frames_per_clip", 8)) if tm is not None else 8
    def load(s: str) -> Dataset:
        # quality: the frames `edgeclf run`'s quality gate stops are known too (Dataset.abstain), as evaluate knows them:
        # the figures, the imported model's calibration and the compression gate leave out every frame run does not classify.
        return load_dataset(s, classes=classes, seed=seed, frames_per_clip=fpc, quality=True)

    if tm is not None:  # other data re-draws the split: export's "val" (gate, parity, metrics) would hold training images
        # The training data is known by content: a copy under another name is read with the recorded options.
        ds = load_training_data(str(data_spec), recorded, load, data_given=cfg.data,
                                use="its val split is no longer the one held out in training")
    else:
        ds = load(str(data_spec))
    if ds.task != task and tm is None:  # --task is the user's: name it (--classes can merge classes, never add them)
        merge = task == "binary" and ds.task == "multiclass" and ds.kind != "synthetic"
        raise DataError(f"data {ds.name} is a {ds.task} set; the model was given --task {task}: give --task {ds.task}"
                        + (" (a binary model may output (N, 1) or (N, 2) logits)" if ds.task == "binary" else "")
                        + (f", or merge the data's classes onto --labels {','.join(labels)} with --classes" if merge else ""))
    if ds.task != task or ds.labels != labels:
        raise DataError(f"data {ds.name} is a {ds.task} set with labels {ds.labels}; the model is {task} with labels {labels} "
                        "(same names, same order); use --classes to map the data or fix --labels")
    pre = Preprocessor(spec)
    xv, yv = pre.batch(ds.split("val").images), ds.split("val").labels
    xp = xv if cfg.split == "val" else pre.batch(ds.split(cfg.split).images)
    val_ids, val_groups = ds.split("val").ids, ds.split("val").groups
    split_ids = ds.split(cfg.split).ids  # "all" joins the splits in the order pre.batch read them
    if cfg.model is None:
        provenance["data"] = _data_record(ds, classes)
    else:  # the training data, as run.json recorded it, less its workstation path
        provenance["data"] = {**{k: recorded.get(k) for k in ("kind", "hash", "files_hash", "licence", "classes", "sizes")},
                              "name": spec_name(str(recorded.get("spec", "")))}
    # split: what parity and the reference samples were measured on. An imported model's temperature and operating point
    # are fitted on the val split whatever --split is (said as decision_fitted_on: evaluate warns on figures over it).
    provenance["export_data"] = {"name": ds.name, "hash": ds.data_hash, "split": cfg.split,
                                 **({"decision_fitted_on": "val"} if tm is None else {})}
    if tm is not None and cfg.split in ("test", "all") and (tm.run.get("config") or {}).get("read_test", True) is False:
        # As prune keeps a --no-test parent's test split unread, export reads it only when asked, and for no figure.
        provenance["export_data"]["test_split"] = ("read for parity and reference samples only (no labels, no figures): "
                                                   "the training ran with --no-test")
        log.info("%s was trained with --no-test: --split %s reads its test images for parity and reference samples only "
                 "(no labels, no figures)", cfg.model, cfg.split)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_path = stage / "model.onnx"
        if torch_model is not None:
            if cfg.from_torch:
                _check_torch_output(torch_model, xv[:1] if len(xv) else np.zeros((1, spec.channels, *spec.size), np.float32),
                                    str(cfg.from_torch))
            try:
                ref = torch_logits(torch_model, xp)
            except RuntimeError as exc:
                raise ModelError(f"the model rejects inputs of shape {xp.shape[1:]}: {str(exc).splitlines()[0]}; check --size/--channels") from None
            info = export_onnx(torch_model, xp, onnx_path)
            in_name, out_name = INPUT_NAME, OUTPUT_NAME
        else:
            assert user_onnx is not None
            proto, info, in_name, out_name = user_onnx
            _save_onnx(proto, onnx_path, Path(str(cfg.from_onnx)).name)
            ref = None
        lv = _ort_logits(onnx_path, xv).astype(np.float32)
        n_out = 1 if task == "binary" else len(labels)
        if user_onnx is not None and task == "binary" and lv.ndim == 2 and lv.shape[1] == 2:
            lv, out_name, provenance["two_logit_binary"] = _binary_from_two_logits(onnx_path, xv, lv, out_name, labels)
        if lv.ndim != 2 or lv.shape[1] != n_out:
            want = f"(N, {n_out}) logits"
            if task == "binary" and user_onnx is not None:
                want = "(N, 1) logits (of the second label) or (N, 2) logits (in --labels order)"
            elif task == "binary":  # a torch model is exported as it is: its forward must give the one logit
                want += " (of the second label; a 2-logit model: return logits[:, 1:] - logits[:, :1])"
            raise ModelError(f"the model outputs shape {lv.shape}; a {task} model with {len(labels)} labels must output {want}: "
                             "give a model with that output, or the --task and --labels it was trained for")
        cv = classified_rows(ds, val_ids)  # the validation frames `edgeclf run` classifies
        if rule is None:  # imported models: calibrate on the validation split, whatever --split is
            if not len(cv):
                raise ExportError(f"{none_classified(ds, val_ids, 'val')}, so there is nothing to fit the imported model's "
                                  f"temperature and decision rule on; no bundle was written; {classify_fix(ds, val_ids)}")
            # The data set's clinically positive class unless --positive names one, as `edgeclf train` does.
            positive = _positive_index(ds, cfg.positive, imported=True)
            # On the frames run classifies only: those it abstains on never meet the threshold on a device.
            temperature = fit_temperature(lv[cv], yv[cv], task)
            rule = fit_decision_rule(probabilities(lv[cv], task, temperature), yv[cv], task,
                                     target_sensitivity=cfg.target_sensitivity, positive=positive)
        lp = lv if cfg.split == "val" else _ort_logits(onnx_path, xp).astype(np.float32)
        parity: dict[str, Any] | None = None
        # Parity on every frame, abstained ones too: it compares two implementations of one model, not a figure.
        if ref is not None:
            parity = parity_report(ref, lp, task, temperature, rule)
            parity.update(reference="torch", split=cfg.split, precision="fp32")
            # A flipped decision counts only when the logits really differ: two backends may break an exact
            # tie (an untrained model's equal logits) differently without the export being unfaithful.
            if parity["decision_agreement"] < 1.0 and parity["max_abs_diff_logits"] > TIE_TOLERANCE:
                raise ExportError(
                    f"ONNX Runtime disagrees with torch on {round((1 - parity['decision_agreement']) * parity['n'])} of {parity['n']} "
                    f"{cfg.split} images (max logit diff {parity['max_abs_diff_logits']:.2e}); the export is not faithful, so no bundle was written"
                )
            parity["tolerance"] = TORCH_ONNX_TOLERANCE
            if parity["max_abs_diff_probs"] > TORCH_ONNX_TOLERANCE or parity["max_rel_diff_logits"] > TORCH_ONNX_TOLERANCE:
                raise ExportError(
                    f"ONNX Runtime's outputs differ from torch's on the {cfg.split} images (max probability diff "
                    f"{parity['max_abs_diff_probs']:.2e}, max logit diff {parity['max_abs_diff_logits']:.2e}) beyond the fp32 tolerance "
                    f"{TORCH_ONNX_TOLERANCE:g}; the export is not faithful, so no bundle was written"
                )
        else:
            provenance["parity"] = "not measured: the source is ONNX, there is no torch reference to compare with"
        # As `edgeclf evaluate` reports them: over the frames run classifies, the others counted per reason beside the
        # figures (abstained, abstain_reasons, coverage), and with some left out, the every-frame figures as all_frames.
        # Its resamples (evaluate's default n_boot) and seed (the training seed; 0 for imports) too: `evaluate --split val`
        # of the bundle gives this interval.
        metrics = {"val_onnx_fp32": _frame_metrics(probabilities(lv, task, temperature), yv, task, rule, labels, val_groups,
                                                   0.0, n_boot=1000, seed=seed, why=[ds.abstain.get(f, "") for f in val_ids])}
        if not len(cv):
            log.warning("%s: the validation figures are undefined", none_classified(ds, val_ids, "val"))
        if "test" in train_metrics:
            metrics["test_training"] = train_metrics["test"]
        precision_from = _precision_origin(cfg, tm.run if tm is not None else None)
        fp32_reason = (f"fp32 set by {precision_from}" if precision_from != "the default" else
                       "fp32, the default precision (--precision int8, fp16 or auto adds gated compressed variants)")
        compression: dict[str, Any] = {"variants": [], "deploy": {"precision": "fp32", "reason": fp32_reason}}
        if cfg.precision != "fp32":
            from edgeclf.export.compress import compress
            from edgeclf.export.quantize import calibration_indices

            tr = ds.split("train")
            # Frames `edgeclf run` never classifies (a sector model's frames before its clip's sector locked: whole,
            # uncropped; those its quality gate stops) neither set the INT8 ranges nor judge the gate: they are not what
            # the deployed model sees.
            ct = classified_rows(ds, tr.ids)
            if not len(cv):
                raise ExportError(f"--precision {cfg.precision}: {none_classified(ds, val_ids, 'val')}, so the accuracy gate has "
                                  "nothing to judge a compressed model on; no bundle was written; export with --precision fp32, "
                                  f"or {classify_fix(ds, val_ids)}")
            if not len(ct) and cfg.precision != "fp16":
                raise ExportError(f"--precision {cfg.precision}: {none_classified(ds, tr.ids, 'train')}, so there is nothing to "
                                  "calibrate INT8 on; no bundle was written; export with --precision fp32 or fp16, or "
                                  f"{classify_fix(ds, tr.ids)}")
            idx = ct[calibration_indices(tr.labels[ct], cfg.calibration_n, seed)] if len(ct) else ct
            qat, qat_unavailable = _qat_rung(cfg, tm, ds)
            compression = compress(
                stage, onnx_path, precision=cfg.precision, max_drop=cfg.max_drop, min_agreement=cfg.min_agreement,
                calib_x=pre.batch([tr.images[i] for i in idx]), calib_method=cfg.calibration,
                # Indices into the training folder's splits/val.txt, never file names.
                val_x=xv[cv], val_y=yv[cv], val_ids=[f"val[{i}]" for i in cv], parent_logits=lv[cv],
                # The gate resamples these (frames of a clip, near copies) rather than images, where a group holds more.
                val_groups=[val_groups[i] for i in cv], group_unit="clip" if ds.kind == "clips" else "group",
                task=task, temperature=temperature, rule=rule, labels=labels, seed=seed,
                qat=qat, qat_epochs=cfg.qat_epochs, qat_unavailable=qat_unavailable, device=cfg.device,
                precision_from=precision_from,
            )
            if compression["calibration"] is not None:  # None: no INT8 candidate, nothing was calibrated
                provenance["calibration"] = compression["calibration"]
            compression["deploy"]["candidates"] = compression["candidates"]
        reference = None
        # Only frames `edgeclf run` classifies: a sector model's frames before its clip's sector locked are whole,
        # the scanner's burned-in text included, and parity on the device never needs them.
        keep = classified_rows(ds, split_ids) if cfg.samples else np.arange(0)
        if cfg.samples and len(keep) < len(xp):
            if not len(keep):
                why = f"{none_classified(ds, split_ids, cfg.split)}: such frames stay out of a bundle, so there is nothing to re-check parity on"
                provenance["reference"] = f"not written: {why}"
                log.warning("reference.npz not written: %s; `edgeclf bundle check` cannot run on this bundle", why)
            else:
                left_out = f"{len(xp) - len(keep)} {cfg.split} frames `edgeclf run` does not classify ({abstain_counts(ds, split_ids)})"
                provenance["reference"] = f"{cfg.split} frames `edgeclf run` classifies only; left out: {left_out}"
                log.info("reference samples: left out %s", left_out)
        if len(keep):
            rows = keep[:MAX_REFERENCE]  # any count: a fixed-batch backend pads a short call
            xr = xp[rows]
            # Preprocessed tensors only: no file names, no metadata. Each variant's own outputs too,
            # so a device re-checks every model it may run.
            per_variant = {f"logits__{v['id']}": _ort_logits(stage / v["file"], xr) for v in compression["variants"]}
            arrays: dict[str, Any] = {"inputs": xr, "logits": lp[rows], **per_variant}
            np.savez_compressed(stage / "reference.npz", **arrays)
            reference = {"file": "reference.npz", "count": len(rows), "split": cfg.split}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": FORMAT,
            "name": cfg.name or out.name,
            "created": provenance["exported_at"],
            "task": task,
            "labels": list(labels),
            "model": {
                "file": "model.onnx", "architecture": arch, "precision": "fp32", "opset": info["opset"], "ir_version": info["ir_version"],
                "input_name": in_name, "output_name": out_name,
                "input_shape": [info.get("batch", "batch"), spec.channels, spec.size[0], spec.size[1]],
                "output_shape": [info.get("batch", "batch"), n_out],
            },
            "variants": compression["variants"],
            "deploy": compression["deploy"],
            "preprocess": spec.to_dict(),
            "postprocess": {"temperature": temperature, "decision": rule.to_dict()},
            "provenance": {**provenance, "packages": package_versions()},
            "metrics": metrics,
            "reference": reference,
        }
        if parity is not None:
            manifest["parity"] = parity
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False))
        write_checksums(stage)
        # What a device does (checksums, schema, reference outputs); not signed yet: `bundle sign` comes after export.
        verify_bundle(str(stage), require_signature=False)
        _permissions_per_umask(stage)
        _swap_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def _precision_origin(cfg: ExportConfig, run: dict[str, Any] | None) -> str:
    """What set cfg.precision, for the deploy reason: the recipe's [export] settings recorded in the training run
    (`edgeclf export` applies them unless --precision is typed), --precision, or "the default".

    ExportConfig does not say which: a precision equal to the recorded recipe's is the recipe's (typing the same
    value changes nothing), one that differs was given; with no recipe precision, fp32 is the default."""
    rec = (run or {}).get("recipe")
    asked = ((rec.get("export") or {}).get("precision") if isinstance(rec, dict) else None)
    if asked is not None and isinstance(rec, dict):
        recipe = f"recipe {rec.get('name')}'s [export] settings"
        if asked == cfg.precision:
            return f"{recipe}, as the training run recorded them"
        return f"--precision, over {recipe} (precision {asked})"
    return "the default" if cfg.precision == "fp32" else "--precision"


def _qat_rung(cfg: ExportConfig, tm: Any, ds: Dataset) -> tuple[Any, str]:
    """The INT8 ladder's last rung (export/qat.py) for compress(), or None and the reason it cannot run."""
    if cfg.from_onnx:
        return None, "the source is an ONNX file: there is no torch model to fine-tune"
    if tm is None:
        return None, "it needs a training folder (--model): a --from-torch model comes without its training recipe"
    if cfg.qat_epochs < 1:
        return None, "--qat-epochs is 0"
    from edgeclf.export.qat import make_qat_rung

    return make_qat_rung(tm, ds), ""


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that holds anything but a bundle --overwrite may replace, saying what is there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; a bundle is a folder (--overwrite replaces only a previous "
                          "bundle): choose another --out")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST_FILE).is_file():
        if overwrite:
            raise ConfigError(f"--out {out} holds other files, not a bundle (no {MANIFEST_FILE}); --overwrite replaces only a "
                              "previous bundle: choose another --out")
        raise ConfigError(f"--out {out} is a folder that is not empty and holds no bundle (no {MANIFEST_FILE}); "
                          "choose another --out (a new or empty folder)")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a bundle; pass --overwrite to replace it or choose another --out")
    _refuse_other_files(out)


def _other_files(out: Path) -> list[str]:
    """What a previous bundle's folder holds besides that bundle: entries its checksums.sha256 does not list (all but
    the manifest where there is none), shown from the top (`eval/` for a folder of them). The swap replaces the whole
    folder, so these would be deleted with it (notes, an evaluation, run outputs kept beside the bundle)."""
    own = {MANIFEST_FILE, CHECKSUM_FILE, SIGNATURE_FILE}
    try:
        for line in (out / CHECKSUM_FILE).read_text(encoding="utf-8").splitlines():
            own.add(line.partition("  ")[2])
    except (OSError, UnicodeDecodeError):
        pass  # no readable list: every file but the manifest counts as other, and is named
    found: list[str] = []
    for top in sorted(out.iterdir()):
        if top.is_dir() and not top.is_symlink():
            inner = [p for p in top.rglob("*") if not p.is_dir() or p.is_symlink()]
            if not inner or any(p.relative_to(out).as_posix() not in own for p in inner):
                found.append(top.name + "/")
        elif top.name not in own or top.is_symlink():
            found.append(top.name)
    return found


def _refuse_other_files(out: Path) -> None:
    other = _other_files(out)
    if other:
        shown = ", ".join(other[:4]) + (f" and {len(other) - 4} more" if len(other) > 4 else "")
        raise ConfigError(f"--out {out} also holds {shown}, which are not the previous bundle's files (not in its "
                          f"{CHECKSUM_FILE}); --overwrite replaces only a previous bundle and would delete them: move them "
                          "away or choose another --out")


def _read_onnx(src: Path, channels: int, side: int) -> tuple[Any, dict[str, Any], str, str]:
    """Check a user's ONNX file; returns (proto, {opset, ir_version[, batch]}, input name, output name).

    The input's static dimensions must be (channels, side, side): a mismatch is the user's flags, named before any run.
    """
    import onnx

    try:
        proto = onnx.load(str(src))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf DecodeError, onnx ValidationError
        raise ModelError(f"{src.name} is not a valid ONNX model ({str(exc).splitlines()[0][:200]})") from None
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ModelError("the ONNX model must have one input (N, C, H, W) and one output (N, K) of logits")
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > OPSET:
        log.warning("ONNX opset %d is above %d: TensorRT 8.6 (JetPack 5) cannot parse it", opset, OPSET)
    info: dict[str, Any] = {"opset": opset, "ir_version": int(proto.ir_version)}
    tt = inputs[0].type.tensor_type
    dims = list(tt.shape.dim) if tt.HasField("shape") else []
    if dims and dims[0].HasField("dim_value"):
        info["batch"] = int(dims[0].dim_value)  # a fixed batch: the runtime feeds it exactly that many
    _check_input_dims(src.name, dims, channels, side)
    return proto, info, inputs[0].name, proto.graph.output[0].name


def _check_input_dims(name: str, dims: list[Any], channels: int, side: int) -> None:
    """The model's declared input against --channels/--size; dynamic (named or unset) dimensions take any value."""
    if not dims:  # no shape declared: onnxruntime's own check is all there is
        return
    declared = [int(d.dim_value) if d.HasField("dim_value") else None for d in dims]
    shown = ", ".join(str(v) if v is not None else (d.dim_param or "?") for v, d in zip(declared, dims))
    if len(dims) != 4:
        raise ModelError(f"{name} takes inputs ({shown}); a bundle's model takes images (N, C, H, W): export it with a 4-D input")
    c, h, w = declared[1:]
    if h is not None and w is not None and h != w:
        raise ModelError(f"{name} takes inputs ({shown}), {h}x{w} images; --size gives square images only: export the model "
                         "with a square (or dynamic) input")
    want_c, want_side = c or channels, h or w or side
    if (want_c, want_side) == (channels, side):
        return
    batch = shown.split(", ")[0]
    raise ModelError(f"{name} takes inputs ({shown}); --size {side} --channels {channels} give ({batch}, {channels}, {side}, {side}): "
                     f"give --size {want_side} --channels {want_c}")


def _strip_onnx_text(proto: Any) -> dict[str, int]:
    """Clear every metadata_props and doc_string of a user's ONNX model, its graph, nodes, attributes, subgraphs and
    functions, in place; returns the counts removed (none: {}).

    Exporters and training scripts write source paths, stack traces and data locations there (tf2onnx, torch's verbose
    export, set_model_props), and a bundle never holds workstation paths; the quantizers keep what model.onnx holds."""
    counts = {"metadata_props": 0, "doc_strings": 0}

    def walk(msg: Any) -> None:
        for f in msg.DESCRIPTOR.fields:
            if f.name == "doc_string" and getattr(msg, f.name):
                msg.ClearField(f.name)
                counts["doc_strings"] += 1
            elif f.name == "metadata_props" and len(msg.metadata_props):
                counts["metadata_props"] += len(msg.metadata_props)
                msg.ClearField(f.name)
            elif f.message_type is not None:  # message fields only: a weight's bytes are never read here
                # protobuf 6+ says is_repeated; older ones only label
                if getattr(f, "is_repeated", None) or getattr(f, "label", None) == getattr(f, "LABEL_REPEATED", -1):
                    for m in getattr(msg, f.name):
                        walk(m)
                elif msg.HasField(f.name):  # unset ones hold nothing (and types nest without end)
                    walk(getattr(msg, f.name))

    walk(proto)
    return {k: v for k, v in counts.items() if v}


def _save_onnx(proto: Any, dst: Path, name: str) -> None:
    """Saved from the loaded proto as one file: a copy would leave an external-data side file behind."""
    import onnx

    try:
        onnx.save_model(proto, str(dst), save_as_external_data=False)
    except ValueError as exc:  # over protobuf's 2 GB limit
        raise ModelError(f"{name} cannot be stored as one ONNX file ({str(exc).splitlines()[0][:200]}); a bundle holds a single-file model") from None


def _binary_from_two_logits(path: Path, xv: np.ndarray, lv: np.ndarray, out_name: str,
                            labels: list[str]) -> tuple[np.ndarray, str, dict[str, Any]]:
    """A 2-logit binary model (softmax over `labels` in order) -> the bundle's one binary logit, in place at `path`.

    A binary bundle's logit is always that of labels[1] (runtime/postprocess.py; `positive` only picks the class the
    threshold is on), so one MatMul by [[-1], [1]] appends l[1] - l[0]: softmax(l)[1] == sigmoid(l[1] - l[0]) exactly,
    and the products by +-1 round nothing. Checked against the original softmax on the validation images.
    Returns (new logits, new output name, the provenance record).
    """
    import onnx
    from onnx import helper, numpy_helper

    if np.all(lv >= 0) and np.allclose(lv.sum(axis=1), 1.0, atol=1e-4):  # l[1] - l[0] of probabilities is no logit
        raise ModelError(f"the model's 2 outputs look like probabilities (every row is >= 0 and sums to 1 on the {len(lv)} "
                         "validation images); a bundle needs logits: export the model without its final softmax")
    proto = onnx.load(str(path))
    old = proto.graph.output[0]
    names = {t for n in proto.graph.node for t in (*n.input, *n.output)} | {t.name for t in proto.graph.initializer}
    new_name = f"{out_name}_binary_logit"
    while new_name in names:
        new_name += "_"
    elem = old.type.tensor_type.elem_type or onnx.TensorProto.FLOAT
    weights = np.array([[-1.0], [1.0]], dtype=helper.tensor_dtype_to_np_dtype(elem))
    w_name = f"{new_name}_weights"
    proto.graph.initializer.append(numpy_helper.from_array(weights, w_name))
    proto.graph.node.append(helper.make_node("MatMul", [out_name, w_name], [new_name], name="edgeclf_two_logits_to_binary"))
    dims = list(old.type.tensor_type.shape.dim)
    batch: int | str = (dims[0].dim_value if dims[0].HasField("dim_value") else dims[0].dim_param or "batch") if dims else "batch"
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info(new_name, elem, [batch, 1]))
    onnx.checker.check_model(proto)
    _save_onnx(proto, path, path.name)
    new = _ort_logits(path, xv).astype(np.float32)
    diff = float(np.max(np.abs(probabilities(new, "binary")[:, 1] - probabilities(lv, "multiclass")[:, 1]), initial=0.0))
    if not diff <= TWO_LOGIT_TOLERANCE:  # `not <=`: a NaN fails too
        raise ExportError(f"the converted binary logit's probabilities differ from the model's own softmax by {diff:.2e} on "
                          f"the validation images (tolerance {TWO_LOGIT_TOLERANCE:g}); no bundle was written")
    record = {"outputs": 2, "binary_logit": "output[1] - output[0]", "logit_of": {"output_index": 1, "label": labels[1]},
              "node": "MatMul by [[-1], [1]] appended to the model's output",
              "parity": {"reference": "the imported model's softmax", "split": "val", "n": int(len(lv)),
                         "max_abs_diff_probs": diff, "tolerance": TWO_LOGIT_TOLERANCE}}
    log.info("2-logit binary model: bundle logit = output[1] - output[0] (max probability diff %.2e)", diff)
    return new, new_name, record


def _permissions_per_umask(stage: Path) -> None:
    """mkdtemp makes the folder owner-only (0700): give it, and its files, the modes a plain mkdir/open would,
    so a service running as another user (the systemd unit's User=edgeclf) can read a copied bundle."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(stage, 0o777 & ~mask)
    for p in stage.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _swap_into_place(stage: Path, out: Path) -> None:
    """Replace `out` by `stage` with renames, so an old bundle is gone only once the new one is whole."""
    old = None
    if out.exists():
        _refuse_other_files(out)  # again: files put beside the old bundle while this one was made
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
