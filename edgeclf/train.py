"""Training on the workstation: seeded, class-weighted, early-stopped on validation AUC, then
calibrated (temperature) and given an explicit operating point per class on the validation frames
`edgeclf run` classifies (as export and evaluate count them).

The run folder holds `model.safetensors` (no pickle), `model.json` (everything needed to rebuild and
export the model), `run.json` (config, data hash, split lists, history, metrics) and `splits/*.txt`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeclf.data import Dataset, Split, load_dataset, require_training_data
from edgeclf.errors import ConfigError, DataError, ModelError
from edgeclf.runtime.clips import clip_of
from edgeclf.runtime.postprocess import DecisionRule, probabilities
from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec

__all__ = ["TrainConfig", "train", "cross_validate", "ensemble_runs", "default_size", "load_trained", "TrainedModel", "package_versions", "AUGMENTS",
           "dist_info", "check_out"]

log = logging.getLogger(__name__)
AUGMENTS = ("auto", "ultrasound", "xray", "generic", "none")
# The head-only (probe) epochs' constant rate, as a multiple of the fine-tuning peak rate: a linear head on
# fixed features takes larger steps than the whole network can.
PROBE_LR_FACTOR = 10.0
SEED_MAX = 2**32 - 1  # numpy's global seed (np.random.seed) takes 0..2**32-1


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    model: str = "compact"
    size: int | None = None
    channels: int | None = None
    pretrained: bool = False
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 10
    seed: int = 0
    target_sensitivity: float = 0.9
    # "sensitivity": best specificity at target_sensitivity; "accuracy": the most accurate point on val.
    operating_point: str = "sensitivity"
    classes: str | None = None
    positive: str | None = None
    augment: str = "auto"
    frames_per_clip: int = 8
    threads: int | None = None
    # Cross-validation: K folds (0 = one train/val/test split), grouped by `group`: clip, source (clips.csv
    # original_source as written) or site (that source reduced to its contributor or web site); both fall back to clip.
    folds: int = 0
    group: str = "source"
    # The recipe this run came from (name); its resolved settings are recorded in run.json["recipe"].
    recipe: str | None = None
    # Test-time augmentation baked into the model after training (see edgeclf.models.TTA_MODES).
    tta: str = "none"
    # LP-FT: epochs that train only the new head on the frozen pretrained network before fine-tuning.
    probe_epochs: int = 0
    # Exponential moving average of the weights (timm's ModelEmaV3, with warm-up) during fine-tuning, 0 = off: the
    # averaged weights are validated, early-stopped on and saved (the usual smoothing of a noisy small-data run).
    ema: float = 0.0
    # False: the test split (for --folds, each held-out fold) is not evaluated, so settings can be chosen on
    # validation without a test figure in sight; `edgeclf evaluate --split test` reads it for the chosen run.
    read_test: bool = True
    # Seed ensemble: this many members trained alike with seeds seed, seed+1, ... on the same split (member 0 is the
    # plain run), deployed as one model averaging them (probabilities, or logits for binary and multilabel: edgeclf.models.ensemble_of): N times the compute.
    ensemble: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or self.frames_per_clip < 1:
            raise ConfigError("epochs, patience and frames-per-clip must be positive integers")
        if self.batch_size < 2:
            raise ConfigError(f"batch-size is {self.batch_size}; BatchNorm needs at least 2 images per batch")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads is {self.threads}; give a positive number or leave it out")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr is {self.lr}; expected a value in (0, 1), e.g. 3e-3")
        if not 0 < self.target_sensitivity <= 1:
            raise ConfigError(f"target-sensitivity is {self.target_sensitivity}; expected a value in (0, 1]")
        if self.operating_point not in ("sensitivity", "accuracy"):
            raise ConfigError(f"operating-point is {self.operating_point!r}; allowed: sensitivity, accuracy")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels is {self.channels}; allowed: 1 or 3")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"augment is {self.augment!r}; allowed: {', '.join(AUGMENTS)}")
        if self.size is not None and not 16 <= self.size <= 1024:
            raise ConfigError(f"size is {self.size}; expected 16..1024 pixels")
        if self.folds == 1 or self.folds < 0 or self.folds > 20:
            raise ConfigError(f"folds is {self.folds}; give 2..20 for cross-validation or 0 for one split")
        if self.group not in ("clip", "source", "site"):
            raise ConfigError(f"group is {self.group!r}; allowed: clip, source, site")
        if self.probe_epochs < 0:
            raise ConfigError(f"probe-epochs is {self.probe_epochs}; give 0 (off) or a positive number of epochs")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema is {self.ema}; give 0 (off) or a decay below 1, e.g. 0.99")
        if not 1 <= self.ensemble <= 16:
            raise ConfigError(f"ensemble is {self.ensemble}; give 1 (one model) up to 16 members")
        # numpy's global seed (np.random.seed) takes 0..2**32-1, and ensemble member k is seeded with seed + k.
        if not 0 <= self.seed <= SEED_MAX - (self.ensemble - 1):
            raise ConfigError(f"seed is {self.seed}; give 0..{SEED_MAX - (self.ensemble - 1)}"
                              + (f" (member {self.ensemble - 1} of the ensemble is seeded with seed + {self.ensemble - 1})"
                                 if self.ensemble > 1 else ""))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight-decay is {self.weight_decay}; give a finite value >= 0, e.g. 1e-4 (0 = off)")
        if self.probe_epochs and not self.pretrained:
            raise ConfigError("probe-epochs trains a head on pretrained features; add --pretrained or give --probe-epochs 0")
        from edgeclf.models import TTA_MODES

        if self.tta not in TTA_MODES:
            raise ConfigError(f"tta is {self.tta!r}; allowed: {', '.join(TTA_MODES)}")


def package_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for n in names or ("edgeclf", "numpy", "torch", "torchvision", "timm", "onnx", "onnxruntime", "opencv-python-headless"):
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            continue
    return out


KERNEL_PIN_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "ONEDNN_MAX_CPU_ISA",
                        "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")


def host_info() -> dict[str, Any]:
    """The CPU a run trained on: the same seed reproduces bit for bit on one host, not across CPUs whose
    math libraries pick other kernels (lung-pocus: 0.729 on an Intel Xeon, 0.698 on an AMD EPYC)."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass  # not Linux: platform's answer stands
    # Variables that pin the math libraries' kernels (set before torch loads): with them two CPUs can run the
    # same code paths; without them a rerun elsewhere is a different computation (see benchmarks/recipes.md).
    pins = {k: os.environ[k] for k in KERNEL_PIN_VARIABLES if os.environ.get(k)}
    return {"cpu": cpu, "machine": platform.machine(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "kernel_pins": pins}


def default_size(model_default: int, model_min: int, images: list[np.ndarray]) -> int:
    """The model's input size, but never more than the data's native size rounded up to a multiple of 8:
    upsampling adds compute, not information (BreastMNIST's 28 px: 32 px gave test AUC 0.911 against
    0.884 at 64 px here)."""
    sample = images[:: max(1, len(images) // 64)]
    native = int(np.median([max(im.shape[:2]) for im in sample])) if sample else model_default
    return max(model_min, min(model_default, -(-native // 8) * 8))


def _num_outputs(task: str, labels: list[str]) -> int:
    return 1 if task == "binary" else len(labels)


def _positive_index(ds: Dataset, positive: str | None, recipe: str | None = None, *, warn: bool = False,
                    imported: bool = False) -> int:
    """The index of the positive class: `positive` (--positive, or the recipe's), else the data set's clinical one,
    else the second class. `warn` (training, once): say so where it falls back to the second class of a data set that
    records why it names none (`Dataset.positive_unknown`); the refits read the same data and stay quiet. `imported`
    (export of an imported model, whose operating point is fitted there): say so on every fallback to the second class."""
    if ds.task != "binary":
        if positive:
            whence = f" (typed, or set by recipe {recipe})" if recipe else ""
            raise ConfigError(f"--positive {positive!r}{whence} applies to binary tasks only; this data set has "
                              f"{len(ds.labels)} classes ({', '.join(ds.labels)}); give binary data, or --positive auto "
                              "to leave it unset")
        return 1
    name = positive or ds.positive or ds.labels[1]
    if name not in ds.labels:
        raise ConfigError(f"--positive {name!r} is not a class; classes: {', '.join(ds.labels)}")
    fallback = not (positive or ds.positive)
    if imported and fallback:
        # Class folders record no clinically positive class (and no reason): the fit would target the second one unsaid.
        why = f" ({ds.positive_unknown})" if ds.positive_unknown else ""
        log.warning("%s: binary data with no known clinically positive class%s: the imported model's operating point "
                    "(--target-sensitivity) is fitted on the second class, %r, as the positive class; give --positive %s "
                    "if that is the class to detect", ds.name, why, name, ds.labels[0])
    elif warn and fallback and ds.positive_unknown:
        log.warning("%s: binary data with no known clinically positive class (%s): training takes %r as the positive "
                    "class unless --positive names another", ds.name, ds.positive_unknown, name)
    return ds.labels.index(name)


def cache_split(split: Split, pre: Preprocessor) -> np.ndarray:
    """Raw images -> (N, H, W, C) uint8 at the model's size, through the runtime's preprocessing."""
    if len(split) == 0:
        return np.zeros((0, *pre.spec.size, pre.spec.channels), np.uint8)
    return np.stack([pre.geometry(im) for im in split.images])


def _json_object(path: Path) -> dict[str, Any]:
    """A training folder's JSON file as a dict; ModelError (one line) when it is unreadable or not an object."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path} could not be read ({type(exc).__name__}: {exc}); restore the training folder or retrain") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{path} does not hold a JSON object; restore the training folder or retrain")
    return doc


class TrainedModel:
    """A training folder, loaded: the torch model in eval mode plus its recorded metadata."""

    def __init__(self, folder: Path) -> None:
        from safetensors.torch import load_file

        from edgeclf.models import create_model, ensemble_of, with_tta

        meta_path = folder / "model.json"
        if not meta_path.is_file():
            if (folder / "cv.json").is_file():  # `train --folds K`: one model per fold, in fold-0 .. fold-(K-1)
                folds = sorted((d.name for d in folder.glob("fold-*") if (d / "model.json").is_file()),
                               key=lambda n: int(n.rpartition("-")[2]) if n.rpartition("-")[2].isdigit() else 0)
                raise ModelError(f"{folder} is a cross-validation folder (cv.json): it holds one model per fold "
                                 f"({', '.join(folds) or 'none complete'}), not one model; give a fold's folder, e.g. "
                                 f"{folder / (folds[0] if folds else 'fold-0')}")
            raise ModelError(f"{folder} is not a training folder (no model.json); give the --out folder of `edgeclf train`")
        self.folder = folder
        self.meta = _json_object(meta_path)
        fix = "restore the training folder or retrain"
        try:
            self.task: str = self.meta["task"]
            self.labels: list[str] = self.meta["labels"]
            self.preprocess = PreprocessSpec.from_dict(self.meta["preprocess"])
            self.temperature = float(self.meta["temperature"])
            self.decision = DecisionRule.from_dict(self.meta["decision"])
            members = int(self.meta.get("ensemble", 1))  # absent: one model
            arch, outputs = self.meta["architecture"], int(self.meta["num_outputs"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{meta_path} is damaged ({type(exc).__name__}: {exc}); {fix}") from None
        nets = [create_model(arch, num_outputs=outputs, in_chans=self.preprocess.channels, pretrained=False)
                for _ in range(members)]
        base = nets[0] if members == 1 else ensemble_of(nets, self.task)
        from safetensors import SafetensorError

        def unloadable(exc: BaseException) -> ModelError:
            return ModelError(f"{folder}: the weights could not be loaded ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}); {fix}")

        # Only the folder's files become a one-line ModelError (missing, cut short, not matching model.json);
        # any other error is a bug and keeps its traceback.
        try:
            if (folder / "pruned.json").is_file():  # a pruned model: rebuild its channel structure first
                from edgeclf.export.prune import load_pruned

                # ModelError itself for a damaged pruned.json or weights that do not fit it
                self.model = load_pruned(base, folder)
            else:
                state = load_file(str(folder / "model.safetensors"))
                self.model = base
                try:
                    self.model.load_state_dict(state)
                except RuntimeError as exc:
                    if not str(exc).startswith("Error(s) in loading state_dict"):  # torch's missing/unexpected/size
                        raise
                    raise unloadable(exc) from None
        except (OSError, SafetensorError) as exc:
            raise unloadable(exc) from None
        self.tta: str = self.meta.get("tta", "none")  # absent in runs written before the field existed
        self.members = members
        self.net = self.model.eval()  # the network alone (pruning, fine-tuning); `model` is what is deployed
        self.model = with_tta(self.net, self.tta)
        run_path = folder / "run.json"
        self.run = _json_object(run_path) if run_path.is_file() else {}

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 -> (N, K) float32."""
        return torch_logits(self.model, x)


def torch_logits(model: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, C, H, W) float32 -> (N, K) float32 through a torch model in eval mode."""
    import torch

    model.eval()
    with torch.inference_mode():
        outs = [model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def load_trained(folder: str | Path) -> TrainedModel:
    p = Path(folder)
    if not p.is_dir():
        raise ModelError(f"model folder {folder} does not exist; give the --out folder of `edgeclf train`")
    return TrainedModel(p)


def _augment(x, profile: str, gen):
    """Batch augmentation on (N, C, H, W) float tensors in [0, 1] pixel scale."""
    import torch
    import torch.nn.functional as F

    if profile == "none":
        return x
    n = x.shape[0]
    dev = x.device

    def u(lo, hi):
        return torch.rand(n, generator=gen, device=dev) * (hi - lo) + lo

    rot = {"ultrasound": 10.0, "xray": 7.0, "generic": 10.0}[profile] * np.pi / 180
    angle = u(-rot, rot)
    scale = u(0.9, 1.1)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    flip = torch.ones(n, device=dev)
    if profile != "xray":  # left and right are anatomy on a chest film
        flip = torch.where(torch.rand(n, generator=gen, device=dev) < 0.5, -flip, flip)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = u(0.8, 1.2).view(n, 1, 1, 1)
    bias = u(-0.08, 0.08).view(n, 1, 1, 1)
    x = x * gain + bias
    if profile == "ultrasound":  # speckle-like multiplicative noise
        x = x * (1 + 0.08 * torch.randn(x.shape, generator=gen, device=dev))
    else:
        gamma = u(0.8, 1.25).view(n, 1, 1, 1)
        x = x.clamp(0, 1) ** gamma
    return x.clamp(0, 1)


def _require_every_class(ds: Dataset, split: str) -> None:
    """Early stopping and operating points need every class in the split; say which one is missing."""
    y = ds.splits[split].labels
    if ds.task == "multilabel":
        missing = [ds.labels[k] for k in range(y.shape[1]) if y[:, k].sum() == 0]
    else:
        missing = [ds.labels[k] for k in range(len(ds.labels)) if not (y == k).any()]
    if missing:
        raise DataError(
            f"the {split} split of {ds.name} has no images of {', '.join(missing)}; "
            "add images of every class (a class needs at least 3 images, or 3 distinct files, to reach every split)"
        )


def _classified_val(ds: Dataset) -> np.ndarray:
    """(N,) bool over the val frames: those `edgeclf run` classifies (no reason in Dataset.abstain: the sector locked, the
    quality gate passed them), the only ones a deployed threshold ever meets. DataError (one line) when there are none,
    or when a class has none of them: no temperature or operating point can be fitted. Run before training, so that a
    refusal costs no training."""
    from edgeclf.data import abstain_counts, classify_fix, none_classified

    va = ds.splits["val"]
    kept = np.array([not ds.abstain.get(i) for i in va.ids], bool)
    if kept.all():
        return kept
    if not kept.any():
        raise DataError(f"{ds.name}: {none_classified(ds, va.ids, 'val')}, so there is nothing to fit the model's "
                        f"temperature and decision rule on; {classify_fix(ds, va.ids)}")
    y = va.labels[kept]
    if ds.task == "multilabel":
        missing = [ds.labels[k] for k in range(y.shape[1]) if y[:, k].sum() == 0]
    else:
        missing = [ds.labels[k] for k in range(len(ds.labels)) if not (y == k).any()]
    if missing:
        raise DataError(f"the val frames of {ds.name} that `edgeclf run` classifies hold no images of {', '.join(missing)} "
                        f"(it abstains on {int((~kept).sum())} of {len(va)}: {abstain_counts(ds, va.ids)}), so no operating "
                        f"point can be fitted for it; {classify_fix(ds, va.ids)}")
    return kept


def _macro_auc(probs: np.ndarray, labels: np.ndarray, task: str, positive: int) -> float:
    from sklearn.metrics import roc_auc_score

    try:
        if task == "binary":
            return float(roc_auc_score(labels == positive, probs[:, positive]))
        if task == "multilabel":
            cols = [k for k in range(labels.shape[1]) if 0 < labels[:, k].sum() < len(labels)]
            return float(np.mean([roc_auc_score(labels[:, k], probs[:, k]) for k in cols])) if cols else float("nan")
        present = [k for k in range(probs.shape[1]) if 0 < (labels == k).sum() < len(labels)]
        return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present])) if present else float("nan")
    except ValueError:
        return float("nan")


@dataclass
class _Prepared:
    """A data set loaded and cached at the model's input size, ready for fitting."""

    ds: Dataset
    spec: PreprocessSpec
    pre: Preprocessor
    profile: str
    positive: int
    xtr: Any  # torch uint8 (N, C, H, W)
    xva: np.ndarray  # (N, C, H, W) float32, normalised


def _prepare(ds: Dataset, spec: PreprocessSpec, augment: str, positive: int) -> _Prepared:
    import torch

    pre = Preprocessor(spec)
    profile = augment if augment != "auto" else ds.modality if ds.modality in ("ultrasound", "xray") else "generic"
    xtr = torch.from_numpy(cache_split(ds.splits["train"], pre)).permute(0, 3, 1, 2).contiguous()
    return _Prepared(ds, spec, pre, profile, positive, xtr, pre.batch(ds.splits["val"].images))


def _targets(task: str, y: np.ndarray) -> Any:
    import torch

    if task == "multiclass":
        return torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy((y == 1).astype(np.float32)[:, None] if task == "binary" else y.astype(np.float32))


def _loss(p: _Prepared) -> Any:
    """Class-weighted loss: inverse frequency normalised to mean 1 (pos_weight for sigmoid heads)."""
    import torch

    ds, y = p.ds, p.ds.splits["train"].labels
    if ds.task == "multiclass":
        counts = np.bincount(y, minlength=len(ds.labels)).astype(np.float64)
        if (counts == 0).any():
            raise DataError(f"class(es) {[ds.labels[k] for k in np.flatnonzero(counts == 0)]} have no training images")
        return torch.nn.CrossEntropyLoss(weight=torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32))
    y2 = _targets(ds.task, y).numpy()
    pos = y2.sum(0)
    if ((pos == 0) | (pos == len(y2))).any():
        raise DataError("a class or label has no positive or no negative training images; fix the split or --classes")
    return torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y2) - pos) / pos, dtype=torch.float32))


def _distill(student: Any, teacher: Any, task: str, t: float) -> Any:
    """Hinton distillation at temperature t (scaled by t^2): KL on softmax for multiclass heads,
    binary cross-entropy against the teacher's soft sigmoid for binary and multilabel heads."""
    import torch
    import torch.nn.functional as F

    if task == "multiclass":
        return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    return F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)) * t * t


def dist_info() -> tuple[int, int]:
    """(rank, world size) of a torchrun process group, initialising it on first use; (0, 1) outside torchrun.

    The group is gloo, on every host: training runs on the CPU (the model and data are CPU tensors, even where
    CUDA is visible), and NCCL carries CUDA tensors only. GPU training is not implemented."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def _sync_buffers(model: Any) -> None:
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def _sum_over_ranks(total: float, count: int) -> tuple[float, int]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]), int(t[1])


def _agreed_stop(stop: bool, world: int) -> bool:
    """Rank 0 decides early stopping for all: every process must run the same number of steps."""
    if world <= 1:
        return stop
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if stop else 0], dtype=torch.int64)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def fit(
    model: Any,
    p: _Prepared,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    patience: int = 10,
    seed: int = 0,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    teacher: Any | None = None,
    kd_weight: float = 0.5,
    kd_temperature: float = 4.0,
    probe_epochs: int = 0,
    ema: float = 0.0,
) -> tuple[list[dict[str, Any]], int]:
    """Train `model` in place with early stopping on validation AUC (ties: validation loss); the best
    epoch's weights are loaded at the end. Returns (history, best epoch). Also used to fine-tune
    pruned models: with `teacher` (their unpruned parent) the loss mixes in distillation, the usual
    way to recover accuracy after pruning on a small data set.

    `probe_epochs` > 0 first trains only the classification head for that many epochs on the frozen
    network, BatchNorm statistics re-estimated on this data (LP-FT, Kumar et al., ICLR 2022: fine-tuning
    from a fitted head moves the pretrained features less, which holds up better on data from elsewhere);
    those epochs are in the history with "probe": True and are not candidates for the best epoch.

    `ema` > 0 keeps an exponential moving average of the weights over the fine-tuning steps (timm's ModelEmaV3,
    decay warming up to `ema`); the average is what is validated, chosen as the best epoch and loaded at the end."""
    import torch

    ds, spec = p.ds, p.spec
    if teacher is not None:
        teacher.eval()
    loss_fn = _loss(p)  # the caller seeds torch; `seed` drives the batch order and augmentation
    ytr, yva = _targets(ds.task, ds.splits["train"].labels), ds.splits["val"].labels
    yva_t = _targets(ds.task, yva)
    mean_t = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    rank, world = dist_info()
    gen = torch.Generator().manual_seed(seed + rank)  # each process augments its own shard differently
    sampler: Any = None
    if world > 1:
        # One process per shard (torchrun): DistributedDataParallel averages the gradients, so a global batch
        # of `batch_size` is split over the processes and the schedule matches a single-process run.
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(p.xtr)), num_replicas=world, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        batch_size = max(2, batch_size // world)

    def wrap() -> Any:
        # Built after (un)freezing: DistributedDataParallel registers the parameters that need gradients then.
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model) if world > 1 else model

    averaged: Any = None  # the ModelEmaV3 once fine-tuning starts, with ema > 0

    def judged() -> Any:
        """The weights validated and kept: the running average when there is one."""
        return model if averaged is None else averaged.module

    def run_epoch(net: Any, opt: Any, sched: Any, epoch: int, train_mode: bool) -> float:
        model.train(train_mode)
        if sampler is not None:
            sampler.set_epoch(epoch)
            perm = torch.tensor(list(sampler), dtype=torch.int64)
        else:
            perm = torch.randperm(len(p.xtr), generator=gen)
        total = 0.0
        seen = 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm cannot train on one sample (shards have equal lengths: every process skips alike)
            seen += len(idx)
            xb = (_augment(p.xtr[idx].float() * spec.scale, p.profile, gen) - mean_t) / std_t
            out = net(xb)
            loss = loss_fn(out, ytr[idx])
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(xb)
                loss = (1 - kd_weight) * loss + kd_weight * _distill(out, soft, ds.task, kd_temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if averaged is not None:  # only while fine-tuning, which counts its steps in the schedule
                averaged.update(model, step=sched.last_epoch)
            total += loss.item() * len(idx)
        if world > 1:
            _sync_buffers(model)  # BatchNorm statistics: rank 0's, so that every process validates the same model
            total, seen = _sum_over_ranks(total, seen)  # the recorded loss is over every shard, not rank 0's
        return total / max(1, seen)

    def validate() -> tuple[float | None, float]:
        # Over every val frame, those `edgeclf run` abstains on too: only the best epoch is picked here; the deployed
        # temperature, operating point and reported figures (calibrate_and_measure) leave those frames out.
        lv = torch_logits(judged(), p.xva)
        auc = _macro_auc(probabilities(lv, ds.task), yva, ds.task, p.positive)
        with torch.no_grad():
            vloss = float(loss_fn(torch.from_numpy(lv), yva_t))
        return (None if np.isnan(auc) else auc), vloss

    history: list[dict[str, Any]] = []
    if probe_epochs > 0:
        from edgeclf.models import head_module

        head = head_module(model)
        in_head = {id(q) for q in head.parameters()}
        frozen = [q for q in model.parameters() if q.requires_grad and id(q) not in in_head]
        for q in frozen:
            q.requires_grad_(False)
        popt = torch.optim.AdamW(head.parameters(), lr=lr * PROBE_LR_FACTOR, weight_decay=weight_decay)
        pnet = wrap()
        for epoch in range(probe_epochs):
            # Training mode, as fine-tuning will run: BatchNorm normalises by batch statistics (and re-estimates its
            # running ones on this data) while the weights stay frozen, so the head fits the features fine-tuning
            # starts from. With the pretrained statistics instead (eval mode) the first fine-tuning epoch's loss
            # jumped from 0.57 to 1.62 on BUSI: gray ultrasound is far from ImageNet's statistics.
            loss_e = run_epoch(pnet, popt, None, epoch, train_mode=True)
            auc_or_none, vloss = validate()
            history.append({"epoch": epoch + 1, "probe": True, "loss": loss_e, "val_auc": auc_or_none, "val_loss": vloss})
            if on_epoch is not None:
                on_epoch({**history[-1], "epochs": probe_epochs})
        for q in frozen:
            q.requires_grad_(True)
        del pnet, popt
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if ema > 0:
        from timm.utils import ModelEmaV3

        averaged = ModelEmaV3(model, decay=ema, use_warmup=True)
    net = wrap()
    # The steps run_epoch actually takes: a final batch of one image is skipped (BatchNorm), so it is not counted,
    # or with n % batch_size == 1 the one-cycle schedule would end before its annealing did.
    per_epoch = len(sampler) if sampler is not None else len(p.xtr)
    steps_per_epoch = max(1, per_epoch // batch_size + (1 if per_epoch % batch_size >= 2 else 0))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    best_loss = float("inf")
    for epoch in range(epochs):
        loss_e = run_epoch(net, opt, sched, probe_epochs + epoch, train_mode=True)
        auc_or_none, vloss = validate()
        history.append({"epoch": epoch + 1, "loss": loss_e, "val_auc": auc_or_none, "val_loss": vloss})
        # Validation AUC decides; on a tie (small or easy sets saturate at 1.0) the lower validation loss.
        auc_cmp = -1.0 if auc_or_none is None else auc_or_none
        if auc_cmp > best[0] + 1e-4 or (auc_cmp >= best[0] - 1e-4 and vloss < best_loss):
            best = (max(auc_cmp, best[0]), epoch + 1, copy.deepcopy(judged().state_dict()))
            best_loss = vloss
        if on_epoch is not None:
            on_epoch({**history[-1], "epochs": epochs, "best_epoch": best[1], "best_val_auc": best[0]})
        if _agreed_stop(epoch + 1 - best[1] >= patience, world):
            log.info("early stop at epoch %d (best val AUC %.4f at %d)", epoch + 1, best[0], best[1])
            break
    model.load_state_dict(best[2])
    model.eval()
    return history, best[1]


def calibrate_and_measure(model: Any, p: _Prepared, *, target_sensitivity: float, seed: int = 0,
                          operating_point: str = "sensitivity", test: bool = True) -> tuple[float, Any, dict[str, Any]]:
    """Fit temperature and operating points on the val frames `edgeclf run` classifies (Dataset.abstain: load the data
    with quality=True); measure val as `edgeclf evaluate` and export do (`_frame_metrics`: over those frames, the others
    counted per reason beside the figures, every frame's figures as all_frames), and test, if any and `test` (clip data
    sets also per clip). Returns (T, rule, metrics). DataError when no val frame is classified."""
    from edgeclf.calibration import fit_decision_rule, fit_temperature
    from edgeclf.evaluate import _frame_metrics

    ds, va = p.ds, p.ds.splits["val"]
    kept = _classified_val(ds)
    lv = torch_logits(model, p.xva)
    # Frames run abstains on never meet the threshold on a device: they would pull the fit towards frames it never decides.
    temperature = fit_temperature(lv[kept], va.labels[kept], ds.task)
    pv = probabilities(lv, ds.task, temperature)
    rule = fit_decision_rule(pv[kept], va.labels[kept], ds.task, target_sensitivity=target_sensitivity, positive=p.positive,
                             objective=operating_point)
    # Intervals resample groups (a clip's frames, an image's near copies), not items; as many resamples as
    # `edgeclf evaluate` draws (its default n_boot), so that `evaluate --split val` gives this interval: one model, one interval.
    metrics = {"val": _frame_metrics(pv, va.labels, ds.task, rule, ds.labels, va.groups, 0.0, n_boot=1000, seed=seed,
                                     why=[ds.abstain.get(i, "") for i in va.ids])}
    if test and len(ds.splits.get("test", [])):
        ts = ds.splits["test"]
        lt = torch_logits(model, p.pre.batch(ts.images))
        pt = probabilities(lt, ds.task, temperature)
        # As `edgeclf evaluate` scores them: the frames `edgeclf run` would not classify (the sector not locked, the
        # quality gate: Dataset.abstain) abstain.
        why = [ds.abstain.get(i, "") for i in ts.ids]
        metrics["test"] = _frame_metrics(pt, ts.labels, ds.task, rule, ds.labels, ts.groups, 0.0, n_boot=1000, seed=seed,
                                         why=why)
        if ds.kind == "clips":  # and at the level a clinician reads: the clip
            from edgeclf.metrics import clip_metrics

            metrics["test_clips"] = clip_metrics(pt, ts.labels, ts.ids, rule, ds.labels, n_boot=1000, seed=seed,
                                                 stopped=np.array([bool(w) for w in why], bool))
    return temperature, rule, metrics


# A training folder's own files (save_run, train, cross_validate; a pruned run adds pruned.json): what --overwrite
# replaces. Anything else there (an evaluation, a bundle, notes) is the user's.
RUN_FILES = ("run.json", "model.json", "model.safetensors", "recipe.toml", "cv.json", "pruned.json")
_FOLD_DIR = re.compile(r"fold-\d+")


def _own(entry: Path) -> bool:
    if entry.is_symlink():
        return False
    if entry.is_file():
        return entry.name in RUN_FILES
    if entry.name == "splits":
        return entry.is_dir() and all(f.is_file() and f.suffix == ".txt" for f in entry.iterdir())
    return bool(_FOLD_DIR.fullmatch(entry.name)) and (entry / "run.json").is_file()


def _foreign(folder: Path) -> list[str]:
    """What in `folder` no training wrote (names relative to it); a cross-validation's fold folders are looked into."""
    found: list[str] = []
    for e in sorted(folder.iterdir()):
        if not _own(e):
            found.append(e.name + ("/" if e.is_dir() and not e.is_symlink() else ""))
        elif _FOLD_DIR.fullmatch(e.name):
            found += [f"{e.name}/{n}" for n in _foreign(e)]
    return found


def check_out(out: str, *, overwrite: bool = False) -> None:
    """Before any work: --out must be a new or empty folder, or, with `overwrite`, a previous training folder that
    holds only its own files (its evaluation or bundle left beside a new model would describe the old one)."""
    o = Path(out)
    if o.exists() and not o.is_dir():
        raise ConfigError(f"--out {out} is a file; training writes a folder: give a new folder")
    if not o.is_dir() or not any(o.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} is not empty; give a new or empty folder, or add --overwrite to replace the "
                          "previous training there")
    if not ((o / "run.json").is_file() or (o / "cv.json").is_file()):
        raise ConfigError(f"--out {out} is not empty and is not a training folder (no run.json or cv.json); --overwrite "
                          "replaces only a previous training: give a new or empty folder")
    foreign = _foreign(o)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"--out {out} also holds {shown}, which training did not write (they would describe the old model); "
                          "--overwrite replaces only a training's own files: move them away or give a new folder")


def _clear_run(out: Path) -> None:
    """Remove a previous training's own files (see check_out) just before the new one is written, so that none of it
    (another recipe.toml, a longer cross-validation's fold-4/) stays beside the new run; anything else is left alone."""
    if not out.is_dir():
        return
    for e in out.iterdir():
        if not _own(e):
            continue
        if e.is_file():
            e.unlink()
        elif _FOLD_DIR.fullmatch(e.name):
            _clear_run(e)
            with contextlib.suppress(OSError):  # not empty: something else appeared there meanwhile, kept
                e.rmdir()
        else:
            shutil.rmtree(e)


def save_run(out: Path, model: Any, p: _Prepared, meta: dict[str, Any], record: dict[str, Any]) -> None:
    """Write the run folder: weights (safetensors), model.json, run.json, split lists."""
    from safetensors.torch import save_file

    (out / "splits").mkdir(parents=True, exist_ok=True)
    from safetensors import SafetensorError

    from edgeclf.models import unwrap_tta

    # The network's own weights: a test-time-augmentation wrapper is rebuilt from model.json["tta"].
    weights = out / "model.safetensors"
    try:
        save_file({k: v.contiguous() for k, v in unwrap_tta(model).state_dict().items()}, str(weights))
    except SafetensorError as exc:  # an I/O error (disk full) comes as "... (os error 28)": an OSError, for main's one line
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        n = int(code.group(1))
        raise OSError(n, os.strerror(n), str(weights)) from None
    for name, ids in p.ds.split_lists().items():
        (out / "splits" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    (out / "run.json").write_text(json.dumps(record, indent=2, allow_nan=False))


def train(cfg: TrainConfig, *, on_epoch: Callable[[dict[str, Any]], None] | None = None,
          recipe: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train, calibrate and record; returns the run record (also written to `<out>/run.json`).

    `on_epoch` receives each epoch's record plus the best so far (the CLI draws its progress bar
    from it; the library itself never prints). With `cfg.folds` it cross-validates (`cross_validate`).
    `recipe` (see `edgeclf.recipes`) is recorded as run.json["recipe"] and copied as recipe.toml.

    Under torchrun (WORLD_SIZE > 1) every process trains on its shard of each batch and only rank 0
    writes the folder; the others return {"rank": r, "world_size": w}.

    `cfg.out` must be new or empty, or with `overwrite` a previous training folder (`check_out`): every rank checks it
    before training, and rank 0 replaces the previous training's own files only when the new one is written.
    """
    check_out(cfg.out, overwrite=overwrite)
    from edgeclf.data import split_spec

    spec_frames = split_spec(cfg.data)[1].frames
    if spec_frames is not None and spec_frames != cfg.frames_per_clip:  # the spec's frames= wins: record what is sampled
        cfg = replace(cfg, frames_per_clip=spec_frames)
    if cfg.ensemble > 1 and dist_info()[1] > 1:
        raise ConfigError("--ensemble trains its members one after another in one process; run it without torchrun, or train "
                          "each member under torchrun with its own --seed and combine them with `edgeclf ensemble`")
    if cfg.folds:
        return cross_validate(cfg, on_epoch=on_epoch, recipe=recipe, overwrite=overwrite)
    world = dist_info()[1]
    if world > 1 and (cfg.batch_size % world or cfg.batch_size < 2 * world):
        # Each process takes batch_size / world: an uneven split would change the batch run.json records.
        raise ConfigError(f"--batch-size {cfg.batch_size} does not split into {world} processes of at least 2; give a multiple "
                          f"of {world} of at least {2 * world} (e.g. {max(2 * world, cfg.batch_size - cfg.batch_size % world)})")
    t_start = time.time()
    # quality: the frames run's quality gate would stop are known (Dataset.abstain), with or without the test split
    # read: calibration and the val figures leave them out, as the test figures, evaluate and export do.
    ds = load_dataset(cfg.data, classes=cfg.classes, seed=cfg.seed, frames_per_clip=cfg.frames_per_clip, quality=True)
    record, model, p = _train_on(ds, cfg, on_epoch=on_epoch, recipe=recipe)
    rank, world = dist_info()
    record["seconds"] = round(time.time() - t_start, 1)
    if world > 1:
        # DistributedSampler pads each epoch to a multiple of the world size by repeating a few samples.
        n_train = len(ds.splits["train"])
        record["distributed"] = {"world_size": world, "backend": _backend_name(), "batch_per_process": cfg.batch_size // world,
                                 "samples_repeated_per_epoch": (-n_train) % world}
    if rank != 0:
        return {"rank": rank, "world_size": world}
    _clear_run(Path(cfg.out))
    save_run(Path(cfg.out), model, p, record.pop("_meta"), record)
    if recipe is not None and recipe.get("_text"):
        (Path(cfg.out) / "recipe.toml").write_text(recipe["_text"])
    return record


def _backend_name() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else None


def _train_on(ds: Dataset, cfg: TrainConfig, *, on_epoch: Callable[[dict[str, Any]], None] | None,
              recipe: dict[str, Any] | None) -> tuple[dict[str, Any], Any, _Prepared]:
    """Fit, calibrate and measure on a loaded data set; returns (record with its "_meta", model, prepared data)."""
    import torch

    from edgeclf.models import create_model, model_info, normalization
    from edgeclf.runtime.backends import default_threads

    info = model_info(cfg.model)
    for s in ("train", "val"):
        if len(ds.splits.get(s, [])) == 0:
            raise DataError(f"data set {cfg.data} has an empty {s} split; it needs train and val images")
    positive = _positive_index(ds, cfg.positive, cfg.recipe, warn=True)
    _require_every_class(ds, "val")
    _classified_val(ds)  # what calibrate_and_measure fits on, checked before any training
    channels = cfg.channels or ds.channels_hint
    size = cfg.size or default_size(info.default_size, info.min_size, ds.splits["train"].images)
    if size < info.min_size:
        raise ConfigError(f"size {size} is below {cfg.model}'s minimum of {info.min_size} px; use --size {info.min_size} or more")
    mean, std = normalization(cfg.model, channels, cfg.pretrained)
    # sector: the runtime must crop as this data was cropped (run defaults to --roi sector for such a bundle).
    spec = PreprocessSpec(channels=channels, size=(size, size), mean=tuple(mean), std=tuple(std), sector=ds.sector_crops)
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    n_out = _num_outputs(ds.task, ds.labels)
    model = create_model(cfg.model, num_outputs=n_out, in_chans=channels, pretrained=cfg.pretrained)
    p = _prepare(ds, spec, cfg.augment, positive)
    t_fit = time.time()
    history, best = fit(model, p, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                        patience=cfg.patience, seed=cfg.seed, on_epoch=_tag(on_epoch, 0, cfg.ensemble), probe_epochs=cfg.probe_epochs,
                        ema=cfg.ema)
    best_epoch: int | list[int] = best  # an ensemble's: one per member
    members_record: list[dict[str, Any]] | None = None
    if cfg.ensemble > 1:
        from edgeclf.models import ensemble_of

        # Member k is seeded as a plain run with --seed seed+k would be (same weights on a fixed split list).
        nets, best_epochs, seconds, members_record = [model], [best], [round(time.time() - t_fit, 1)], []
        history = [{**h, "member": 0} for h in history]
        for k in range(1, cfg.ensemble):
            t_fit = time.time()
            torch.manual_seed(cfg.seed + k)
            np.random.seed(cfg.seed + k)
            net = create_model(cfg.model, num_outputs=n_out, in_chans=channels, pretrained=cfg.pretrained)
            h, b = fit(net, p, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                       patience=cfg.patience, seed=cfg.seed + k, on_epoch=_tag(on_epoch, k, cfg.ensemble), probe_epochs=cfg.probe_epochs,
                       ema=cfg.ema)
            nets.append(net)
            best_epochs.append(b)
            seconds.append(round(time.time() - t_fit, 1))
            history += [{**e, "member": k} for e in h]
        for k, net in enumerate(nets):  # each member alone, calibrated on validation: what the ensemble adds
            alone = calibrate_and_measure(net, p, target_sensitivity=cfg.target_sensitivity, seed=cfg.seed,
                                          operating_point=cfg.operating_point, test=False)[2]["val"]
            members_record.append({"member": k, "seed": cfg.seed + k, "best_epoch": best_epochs[k], "seconds": seconds[k],
                                   "val": _val_figures(alone)})
        model, best_epoch = ensemble_of(nets, ds.task), best_epochs
    val_plain = None
    if cfg.tta != "none":
        from edgeclf.models import with_tta

        # The same weights without it, on validation only: what the augmentation bought, for choosing it.
        val_plain = calibrate_and_measure(model, p, target_sensitivity=cfg.target_sensitivity, seed=cfg.seed,
                                          operating_point=cfg.operating_point, test=False)[2]["val"]
        model = with_tta(model, cfg.tta)
    temperature, rule, metrics = calibrate_and_measure(model, p, target_sensitivity=cfg.target_sensitivity, seed=cfg.seed,
                                                       operating_point=cfg.operating_point, test=cfg.read_test)
    if val_plain is not None:
        metrics["val_without_tta"] = val_plain
    meta = {
        "architecture": cfg.model,
        "num_outputs": n_out,
        "task": ds.task,
        "labels": ds.labels,
        "preprocess": spec.to_dict(),
        "temperature": temperature,
        "decision": rule.to_dict(),
        "pretrained": cfg.pretrained,
        "tta": cfg.tta,
        **({"ensemble": cfg.ensemble} if cfg.ensemble > 1 else {}),
    }
    record: dict[str, Any] = {
        "config": asdict(cfg),
        # files_hash: the training files known under another split list too (require_training_data)
        "data": {"spec": ds.spec, "kind": ds.kind, "hash": ds.data_hash, "files_hash": ds.files_hash, "licence": ds.licence,
                 "classes": cfg.classes,
                 "sizes": {s: len(v) for s, v in ds.splits.items()}, "notes": ds.notes, "augment": p.profile},
        "model": {**meta, "parameters": int(sum(t.numel() for t in model.parameters()))},
        "best_epoch": best_epoch,
        "history": history,
        "metrics": metrics,
        "threads": threads,
        "packages": package_versions(),
        "host": host_info(),
        "_meta": meta,
    }
    if members_record is not None:
        record["ensemble"] = {"members": members_record, "combined": _combined(ds.task)}
    if ds.kind == "clips":
        record["data"]["clips"] = {s: len({clip_of(i) for i in v.ids}) for s, v in ds.splits.items()}
    if recipe is not None:
        record["recipe"] = {k: v for k, v in recipe.items() if not k.startswith("_")}
    return record, model, p


def _combined(task: str) -> str:
    """How edgeclf.models.ensemble_of combines its members' outputs for this task."""
    return "mean probability" if task == "multiclass" else "mean logit"


def _tag(on_epoch: Callable[[dict[str, Any]], None] | None, member: int, members: int) -> Callable[[dict[str, Any]], None] | None:
    """The progress callback with the ensemble member added to each epoch's record (unchanged for one model)."""
    if on_epoch is None or members == 1:
        return on_epoch
    return lambda rec: on_epoch({**rec, "member": member, "members": members})


def _val_figures(m: dict[str, Any]) -> dict[str, Any]:
    """A fold's validation accuracy, balanced accuracy and macro AUC (None where undefined), over its n classified frames,
    with the frames `edgeclf run` abstains on beside them (None in a record from before they were counted)."""
    auc = m.get("auc") or {}
    return {"accuracy": m.get("accuracy"), "balanced_accuracy": m.get("balanced_accuracy"), "auc_macro": auc.get("macro"), "n": m.get("n"),
            "abstained": m.get("abstained")}


def _pooled_decisions(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, rules: list[DecisionRule],
                      label_names: list[str], groups: list[str], *, n_boot: int, seed: int,
                      stopped: np.ndarray | None = None) -> dict[str, Any]:
    """Pooled out-of-fold decision figures of an image data set: probs (N, K), labels (N,), each item's fold (N,)
    and `rules[fold]` deciding it; `stopped` (N,): images `edgeclf run` does not classify (its quality gate),
    abstained (-1) as the folds' own test figures and evaluate count them. Intervals bootstrap over images; where `groups` (N,) puts several images in one
    copy group (near or exact copies) they are not independent, so the figures also carry intervals bootstrapped over
    those groups ("clustered", unit "copy group"), as the clip figures do over sources."""
    from edgeclf.metrics import _clustered, decision_metrics
    from edgeclf.runtime.postprocess import decide

    dec = np.concatenate([decide(probs[folds == f], r) for f, r in enumerate(rules)])
    order = np.concatenate([np.flatnonzero(folds == f) for f in range(len(rules))])
    if stopped is not None:
        dec[np.asarray(stopped, bool)[order]] = -1
    out = decision_metrics(labels[order], dec, label_names, n_boot=n_boot, seed=seed)
    keys = [str(groups[i]) for i in order]
    if n_boot > 0 and len(set(keys)) < len(keys):
        out["clustered"] = _clustered(labels[order], dec, label_names, keys, "copy group", n_boot=n_boot, seed=seed)
    return out


def cross_validate(cfg: TrainConfig, *, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                   recipe: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """K-fold cross-validation over a folder data set, grouped by clip or by source (clips.csv
    `original_source`, reduced to its site), stratified by class. Each fold is an ordinary training folder
    (`<out>/fold-<i>`, its test split the held-out fold, its recorded spec `...?folds=K&fold=i` rebuilding
    exactly that split); `<out>/cv.json` holds the pooled out-of-fold figures (each fold's own temperature
    and operating point), clip-level for clip data sets, with bootstrap intervals."""
    import dataclasses

    from edgeclf.data import load_folds, split_spec
    from edgeclf.metrics import clip_metrics

    if dist_info()[1] > 1:
        raise ConfigError("--folds runs its folds one after another in one process; run it without torchrun")
    check_out(cfg.out, overwrite=overwrite)
    t_start = time.time()
    # quality: as train loads its data (each fold's calibration and val figures leave out what run does not classify)
    datasets = load_folds(cfg.data, cfg.folds, classes=cfg.classes, seed=cfg.seed, frames_per_clip=cfg.frames_per_clip,
                          group=cfg.group, quality=True)
    for ds in datasets:  # every fold checked before the first one trains
        _require_every_class(ds, "val")
        _classified_val(ds)
    out = Path(cfg.out)
    folds, probs, labels, ids, fold_of, rules, stopped = [], [], [], [], [], [], []
    for i, ds in enumerate(datasets):
        fcfg = dataclasses.replace(cfg, data=ds.spec, out=str(out / f"fold-{i}"), folds=0)

        def tagged(rec: dict[str, Any], i: int = i) -> None:
            if on_epoch is not None:
                on_epoch({**rec, "fold": i, "folds": cfg.folds})

        t0 = time.time()
        record, model, p = _train_on(ds, fcfg, on_epoch=tagged, recipe=recipe)
        record["seconds"] = round(time.time() - t0, 1)
        if i == 0:  # the first write: a previous run's own files go (a longer one's last folds too)
            _clear_run(out)
        save_run(Path(fcfg.out), model, p, record.pop("_meta"), record)
        test = ds.splits["test"]
        if cfg.read_test:
            temperature = record["model"]["temperature"]
            probs.append(probabilities(torch_logits(model, p.pre.batch(test.images)), ds.task, temperature))
            labels.append(test.labels)
            ids += list(test.ids)
            fold_of += [i] * len(test)
            stopped += [bool(ds.abstain.get(x)) for x in test.ids]  # frames run would not classify, as in evaluate
            rules.append(DecisionRule.from_dict(record["model"]["decision"]))
        held = sorted({clip_of(x) for x in test.ids})
        folds.append({"fold": i, "out": fcfg.out, "spec": ds.spec, "test_items": len(test), "test_clips": len(held),
                      "test_sources": sorted({ds.sources.get(c, c) for c in held}) if ds.sources else None,
                      "sizes": record["data"]["sizes"], "best_epoch": record["best_epoch"], "seconds": record["seconds"],
                      "test": ({k: record["metrics"]["test"].get(k) for k in ("accuracy", "balanced_accuracy")}
                               if cfg.read_test else None),
                      "val": _val_figures(record["metrics"]["val"]),
                      **({"val_without_tta": _val_figures(record["metrics"]["val_without_tta"])}
                         if "val_without_tta" in record["metrics"] else {})})
        del model
    ds0 = datasets[0]
    pooled: dict[str, Any] | None = None
    if cfg.read_test:
        pr, y = np.concatenate(probs), np.concatenate(labels)
        fold_arr = np.array(fold_of)
        pooled = {"items": int(len(y)), "task": ds0.task, "labels": ds0.labels}
        if ds0.kind == "clips":
            # Folds grouped by source or site: intervals over those too (clips of one source are not independent).
            # The grouping the folds were made with (a spec's own group= wins over cfg.group), as "grouped_by" says.
            grouped_by = split_spec(ds0.spec)[1].group
            clusters = {"source": ds0.clip_source, "site": ds0.sources}.get(grouped_by)
            pooled.update(clip_metrics(pr, y, ids, rules, ds0.labels, folds=fold_of, n_boot=2000, seed=cfg.seed,
                                       clusters=clusters or None, cluster_unit=grouped_by, stopped=stopped))
        else:
            # Each held-out image's copy group (exact or near copies, data.py): copies are not independent.
            copy_group = {i: g for ds in datasets for i, g in zip(ds.splits["test"].ids, ds.splits["test"].groups)}
            pooled["decisions"] = _pooled_decisions(pr, y, fold_arr, rules, ds0.labels, [copy_group.get(i, i) for i in ids],
                                                    n_boot=2000, seed=cfg.seed, stopped=np.array(stopped, bool))
        kept = ~np.array(stopped, bool)
        auc = _macro_auc(pr[kept], y[kept], ds0.task, _positive_index(ds0, cfg.positive)) if kept.any() else float("nan")
        pooled["frame_auc_macro"] = None if np.isnan(auc) else auc
    # What a choice between settings may look at: the folds' own validation splits (frames of training
    # clips), never the out-of-fold figures above.
    def inner_mean(key: str) -> dict[str, Any]:
        vals = {k: [f[key][k] for f in folds if f[key].get(k) is not None] for k in ("accuracy", "balanced_accuracy", "auc_macro")}
        return {k: (float(np.mean(v)) if v else None) for k, v in vals.items()}
    result = {
        "config": asdict(cfg),
        "data": {"spec": cfg.data, "name": ds0.name.split("?", 1)[0], "hash": ds0.data_hash, "kind": ds0.kind,
                 "grouped_by": split_spec(ds0.spec)[1].group, "notes": ds0.notes},
        "folds": folds,
        "pooled_out_of_fold": pooled,
        "inner_validation_mean": inner_mean("val"),
        **({"inner_validation_mean_without_tta": inner_mean("val_without_tta")} if cfg.tta != "none" else {}),
        "seconds": round(time.time() - t_start, 1),
        "packages": package_versions(),
        "host": host_info(),
    }
    if recipe is not None:
        result["recipe"] = {k: v for k, v in recipe.items() if not k.startswith("_")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv.json").write_text(json.dumps(result, indent=2))
    if recipe is not None and recipe.get("_text"):
        (out / "recipe.toml").write_text(recipe["_text"])
    return result


def ensemble_runs(folders: list[str], out: str, *, read_test: bool | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Combine finished training folders (same data split, architecture, input and labels; e.g. the same settings
    with other seeds) into one ensemble training folder, as `--ensemble` would have written it: temperature and
    operating point refit on validation, validation (and, with `read_test`, test) measured, each member's own
    validation figures recorded. Their data split must be the same: each member was early-stopped on it, and so must
    the settings the refit takes (operating point, target sensitivity, positive class, class map): one is refit for all.
    `read_test` None: the test split is read only if every member read its own (none was trained with --no-test), as
    prune keeps a --no-test parent's unread; True reads it anyway, False never."""
    if len(folders) < 2:
        raise ConfigError(f"an ensemble needs at least 2 training folders, got {len(folders)}")
    import dataclasses
    import hashlib

    if Path(out).resolve() in {Path(f).resolve() for f in folders}:
        raise ConfigError(f"--out {out} is one of the members; give a new folder")
    check_out(out, overwrite=overwrite)
    # One model twice is that model at twice the compute, not an ensemble: by path, then by weights (a copy).
    given: dict[Path, str] = {}
    for f in folders:
        if Path(f).resolve() in given:
            raise ConfigError(f"--member {f} is given twice (also as {given[Path(f).resolve()]}); give each training folder once")
        given[Path(f).resolve()] = f

    from edgeclf.models import ensemble_of, with_tta

    runs = [load_trained(f) for f in folders]
    first = runs[0]
    weights: dict[str, str] = {}
    for f, tm in zip(folders, runs):
        digest = hashlib.sha256((tm.folder / "model.safetensors").read_bytes()).hexdigest()
        if digest in weights:
            raise ConfigError(f"--member {f} has the same weights as --member {weights[digest]} (a copy of one training); "
                              "combine trainings with other seeds (`edgeclf train --seed`)")
        weights[digest] = f
    def facts(t: TrainedModel) -> dict[str, Any]:  # what members must share
        return {"architecture": t.meta["architecture"], "outputs": t.meta["num_outputs"], "task": t.task,
                "labels": t.labels, "input": t.meta["preprocess"], "tta": t.tta}

    def settings(t: TrainedModel) -> dict[str, Any]:
        """What the ensemble's refit takes from member 0's config: members must agree, or the member order would pick
        the deployed decision rule. A target sensitivity counts only where the operating point uses it."""
        c = t.run["config"]
        op = c.get("operating_point", "sensitivity")
        return {"operating_point": op, "target_sensitivity": c.get("target_sensitivity", 0.9) if op == "sensitivity" else None,
                # the class the rule was fitted for (a binary task's --positive, or the data set's clinical one)
                "positive": t.labels[t.decision.positive] if t.decision.positive is not None else None,
                "classes": c.get("classes")}

    for f, tm in zip(folders, runs):
        if (tm.folder / "pruned.json").is_file() or tm.members > 1:
            raise ConfigError(f"{f} is a pruned model or an ensemble already; combine plain training folders")
        if not tm.run.get("config"):
            raise ConfigError(f"{f} has no run.json config; combine folders written by `edgeclf train`")
        have, want = facts(tm), facts(first)
        differ = [k for k in have if have[k] != want[k]]
        if differ:
            fact = differ[0]
            this, that = have[fact], want[fact]
            if isinstance(this, dict) and isinstance(that, dict):  # the input spec: only its fields that differ
                keys = [x for x in {**that, **this} if this.get(x) != that.get(x)]
                this, that = {x: this.get(x) for x in keys}, {x: that.get(x) for x in keys}
            raise ConfigError(f"{f} differs from {folders[0]} in {', '.join(differ)} ({fact}: {this!r} against {that!r}); "
                              "an ensemble combines runs of one model on one input")
        # Export applies the [export] settings member 0's recipe recorded: members must agree on them.
        here, there = ((t.run.get("recipe") or {}).get("export") for t in (tm, first))
        if here != there:
            raise ConfigError(f"{f} was trained from a recipe that exports otherwise than {folders[0]}'s (export: {here!r} "
                              f"in {f}, {there!r} in {folders[0]}); `edgeclf export` would apply member 0's: combine runs "
                              "of one recipe's export settings")
        have, want = settings(tm), settings(first)
        differ = [k for k in have if have[k] != want[k]]
        # Beside an accuracy operating point there is no target sensitivity to compare: the operating point is the difference.
        differ = [k for k in differ if not (k == "target_sensitivity" and "operating_point" in differ)]
        if differ:
            values = "; ".join(f"{k}: {have[k]!r} in {f}, {want[k]!r} in {folders[0]}" for k in differ)
            flags = ", ".join("--" + k.replace("_", "-") for k in differ)
            raise ConfigError(f"{f} was trained with another {', '.join(differ)} than {folders[0]} ({values}); the ensemble's "
                              f"temperature and operating point are refit once for all members: combine runs trained with the "
                              f"same {flags}")
        # Runs without a recorded hash: their specs must match (runs with one are checked against the data below).
        if not (tm.run.get("data", {}).get("hash") and first.run.get("data", {}).get("hash")) and (
                tm.run["config"].get("data") != first.run["config"].get("data")):
            raise ConfigError(f"{f} was trained on other data than {folders[0]}; combine runs of one data set")
    unread = [f for f, tm in zip(folders, runs) if tm.run["config"].get("read_test", True) is False]
    if read_test is None:
        read_test = not unread
        if unread:
            log.info("%s trained with --no-test: the ensemble leaves the test split unread too; `edgeclf evaluate --model %s "
                     "--split test` reads it", ", ".join(unread), out)
    elif read_test and unread:
        log.info("%s trained with --no-test: the ensemble reads the test split, as asked", ", ".join(unread))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{**{k: v for k, v in first.run["config"].items() if k in known}, "out": out, "read_test": read_test,
                         "ensemble": len(runs)})
    t_start = time.time()
    # quality: as train loads it (the temperature, operating point and val figures leave out what run does not classify)
    ds = load_dataset(cfg.data, classes=cfg.classes, seed=cfg.seed, frames_per_clip=cfg.frames_per_clip, quality=True)
    # The data's content hash, not its spec: one folder is often given by other paths (../data, /work/data). A member
    # recorded before split lists were hashed carries the data's former hash: the same files, so it combines, with the
    # warning export and prune give such a run (require_training_data; once, whichever member carries that hash).
    hashes = [(f, tm.run.get("data", {}).get("hash")) for f, tm in zip(folders, runs)]
    if any(h for _, h in hashes):
        warned = False
        for k, (f, h) in enumerate(hashes):
            if not h:
                raise ConfigError(f"{f} records no data hash while other members do, so it cannot be shown to have trained "
                                  "on the same data; retrain it with this edgeclf to combine it")
            if k and h not in (ds.data_hash, ds.former_hash, ds.path_hash):
                raise ConfigError(f"{f} was trained on other data than {folders[0]}; combine runs of one data set")
            if h not in (ds.data_hash, ds.path_hash) and not warned:  # member 0's changed data is its DataError; a former hash, its warning
                require_training_data(ds, runs[k].run["data"], data_given=None,
                                      use=f"its splits are no longer those {f} was trained and early-stopped on",
                                      fix="restore the data as it was or retrain the members")
                warned = True
    for f, tm in zip(folders, runs):
        for name in ("train", "val", "test"):
            mine, theirs = tm.folder / "splits" / f"{name}.txt", first.folder / "splits" / f"{name}.txt"
            if mine.is_file() != theirs.is_file() or (mine.is_file() and mine.read_text() != theirs.read_text()):
                raise ConfigError(f"{f} has another {name} split than {folders[0]} (the seed chose the split?); "
                                  "fix the split (a committed split list) and retrain")
    for name, ids in ds.split_lists().items():
        recorded = first.folder / "splits" / f"{name}.txt"
        if recorded.is_file() and recorded.read_text().splitlines() != [str(i) for i in ids]:
            raise DataError(f"the data at {cfg.data} no longer gives the {name} split {folders[0]} was trained on; "
                            "point to the same data")
    p = _prepare(ds, first.preprocess, cfg.augment, _positive_index(ds, cfg.positive))
    members = []
    for k, tm in enumerate(runs):
        alone = calibrate_and_measure(tm.net, p, target_sensitivity=cfg.target_sensitivity, seed=cfg.seed,
                                      operating_point=cfg.operating_point, test=False)[2]["val"]
        members.append({"member": k, "folder": str(tm.folder), "seed": tm.run["config"].get("seed"),
                        "best_epoch": tm.run.get("best_epoch"), "seconds": tm.run.get("seconds"), "val": _val_figures(alone)})
    net = ensemble_of([tm.net for tm in runs], ds.task)
    model = with_tta(net, first.tta)
    temperature, rule, metrics = calibrate_and_measure(model, p, target_sensitivity=cfg.target_sensitivity, seed=cfg.seed,
                                                       operating_point=cfg.operating_point, test=cfg.read_test)
    if first.tta != "none":  # as train --ensemble records it: the same weights without the augmentation
        metrics["val_without_tta"] = calibrate_and_measure(net, p, target_sensitivity=cfg.target_sensitivity, seed=cfg.seed,
                                                           operating_point=cfg.operating_point, test=False)[2]["val"]
    meta = {**first.meta, "temperature": temperature, "decision": rule.to_dict(), "ensemble": len(runs)}
    record: dict[str, Any] = {
        "config": asdict(cfg),
        "data": first.run["data"],
        "model": {**meta, "parameters": int(sum(t.numel() for t in net.parameters()))},
        "best_epoch": [m["best_epoch"] for m in members],
        "history": [{**e, "member": k} for k, tm in enumerate(runs) for e in tm.run.get("history", [])],
        "metrics": metrics,
        "ensemble": {"members": members, "combined": _combined(ds.task), "from_folders": True},
        "threads": first.run.get("threads"),
        "packages": package_versions(),
        "host": host_info(),
        "seconds": round(time.time() - t_start, 1),
    }
    if first.run.get("recipe") is not None:
        record["recipe"] = first.run["recipe"]
    _clear_run(Path(out))
    save_run(Path(out), net, p, meta, record)
    if (first.folder / "recipe.toml").is_file():  # export takes its compression settings from the recipe
        (Path(out) / "recipe.toml").write_text((first.folder / "recipe.toml").read_text())
    return record
