"""Quantization-aware fine-tuning (QAT): the last rung of the INT8 ladder (see export/compress.py).

When plain INT8 and the float-fallback ladder both fail the gate, a copy of the trained torch model is
fine-tuned with fake quantization that mimics what ONNX Runtime's static QDQ quantization
(`export/quantize.py::quantize_int8`) will do for the flavour, so that the weights learn to sit where
rounding does not hurt:

* weights of every Conv/Linear: per output channel, symmetric, zero point 0, range 2 * absmax /
  (qmax - qmin) as ORT computes it: ``cpu`` int8 with reduce_range ([-64, 64], 7 bits),
  ``tensorrt`` int8 symmetric ([-127, 127]);
* the input activation of every Conv/Linear: per tensor, from a min/max observer initialised on the
  calibration images, then followed by an exponential moving average on the training batches
  (frozen at evaluation): ``cpu`` uint8 asymmetric [0, 255] (ORT applies reduce_range to weights
  only), ``tensorrt`` int8 symmetric [-127, 127], zero point 0.

Straight-through estimators are what ``torch.fake_quantize_per_*_affine`` give. torch.ao.quantization's
eager QAT (prepare_qat, convert) is deprecated in this torch, so the plain ops are used through a weight
parametrization and a forward pre-hook. BatchNorm keeps its running statistics during QAT (ORT folds it
into the convolution before quantizing; per-channel symmetric quantization commutes with that fold).

Fine-tuning reuses the training loop (`edgeclf.train.fit`: augmentation, the best epoch by validation
AUC of the fake-quantized model) with distillation to the fp32 parent as the whole loss, at the parent's
fitted temperature: the probabilities the gate decides on. The fake quantization is then removed: what
is left is a plain fp32 module (same architecture, weights robust to rounding) that is exported with the
project's exporter and quantized by ``quantize_int8`` with the same flavour and calibration images, so
the runtime gets the same QDQ form as for any INT8 variant. The parent's temperature and decision rule
stay; compress() gates the result against the original fp32 parent.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from edgeclf.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["FakeQuantSpec", "fake_quant_spec", "wrap_fake_quant", "qat_finetune", "make_qat_rung", "QAT_LR"]

QAT_LR = 1e-4  # small: the weights only have to move to where rounding does not hurt
EMA = 0.01  # activation range moving-average constant during fine-tuning (torch's observers use the same)
CALIB_BATCH = 64


@dataclass(frozen=True)
class FakeQuantSpec:
    """Integer ranges of one INT8 flavour as ONNX Runtime quantizes it."""

    flavour: str
    weight_qmin: int
    weight_qmax: int
    act_qmin: int
    act_qmax: int
    act_symmetric: bool


def fake_quant_spec(flavour: str) -> FakeQuantSpec:
    """cpu: int8 weights with reduce_range ([-64, 64]), uint8 asymmetric activations; tensorrt: int8 symmetric both."""
    if flavour == "cpu":
        return FakeQuantSpec("cpu", -64, 64, 0, 255, False)
    if flavour == "tensorrt":
        return FakeQuantSpec("tensorrt", -127, 127, -127, 127, True)
    raise ConfigError(f"INT8 flavour {flavour!r} is unknown; allowed: cpu, tensorrt")


def _quantizable(m: Any) -> bool:
    from torch import nn

    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and isinstance(getattr(m, "weight", None), nn.Parameter)


def _weight_fq(spec: FakeQuantSpec) -> nn.Module:
    import torch
    from torch import nn

    class _WeightFakeQuant(nn.Module):
        """Per output channel (axis 0), symmetric, zero point 0; the scale follows the weights."""

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            absmax = w.detach().abs().amax(dim=tuple(range(1, w.ndim)))
            scale = torch.where(absmax > 0, 2 * absmax / (spec.weight_qmax - spec.weight_qmin), torch.ones_like(absmax))
            zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, spec.weight_qmin, spec.weight_qmax)

    return _WeightFakeQuant()


def _act_fq(spec: FakeQuantSpec) -> Any:
    import torch
    from torch import nn

    class _ActFakeQuant(nn.Module):
        """Per-tensor fake quantization of a layer's input with a min/max range (ORT's formulas)."""

        lo: torch.Tensor
        hi: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("lo", torch.tensor(math.inf))
            self.register_buffer("hi", torch.tensor(-math.inf))
            self.calibrating = False

        def qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
            lo, hi = torch.clamp(self.lo, max=0.0), torch.clamp(self.hi, min=0.0)  # the range holds 0
            span = spec.act_qmax - spec.act_qmin
            if spec.act_symmetric:
                scale = 2 * torch.maximum(-lo, hi) / span
                zero = torch.round(torch.tensor((spec.act_qmin + spec.act_qmax) / 2.0))
            else:
                scale = (hi - lo) / span
                zero = torch.round(spec.act_qmin - lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
            ok = bool(torch.isfinite(scale)) and float(scale) >= float(np.finfo(np.float32).tiny)
            if not ok:
                scale, zero = torch.tensor(1.0), torch.tensor(0.0)
            zero = torch.clamp(zero, spec.act_qmin, spec.act_qmax)
            return scale.reshape(1).float(), zero.reshape(1).to(torch.int32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.calibrating or self.training:
                with torch.no_grad():
                    lo, hi = x.detach().min(), x.detach().max()
                    if self.calibrating or not torch.isfinite(self.lo):
                        self.lo.copy_(torch.minimum(self.lo, lo))
                        self.hi.copy_(torch.maximum(self.hi, hi))
                    else:
                        self.lo.add_(EMA * (lo - self.lo))
                        self.hi.add_(EMA * (hi - self.hi))
                if self.calibrating:
                    return x
            scale, zero = self.qparams()
            return torch.fake_quantize_per_tensor_affine(x, scale.to(x.device), zero.to(x.device), spec.act_qmin, spec.act_qmax)

    return _ActFakeQuant()


def wrap_fake_quant(model: nn.Module, flavour: str) -> Any:
    """`model` (changed in place: pass a copy) inside a torch module that fake-quantizes it as `flavour`.

    The returned module has ``.calibrate(x)`` (min/max of each quantized input over x), ``.unwrap()``
    (removes every hook and parametrization and returns the inner plain module, fp32 weights kept),
    ``.layers`` (the names of the fake-quantized Conv/Linear layers) and ``.spec``. Its train() keeps
    BatchNorm layers in eval mode (running statistics, as ORT folds them).
    """
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    spec = fake_quant_spec(flavour)

    class _Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.spec = spec
            self.observers = nn.ModuleDict()
            self.layers: List[str] = []
            self._handles: List[Any] = []
            targets = [(n, m) for n, m in model.named_modules() if _quantizable(m)]
            if not targets:
                raise ModelError("the model has no Conv or Linear layer: there is nothing to quantize")
            for i, (name, m) in enumerate(targets):
                parametrize.register_parametrization(m, "weight", _weight_fq(spec))
                obs = _act_fq(spec)
                self.observers[f"l{i}"] = obs
                self._handles.append(m.register_forward_pre_hook(_pre_hook(obs)))
                self.layers.append(name or "<root>")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def train(self, mode: bool = True) -> _Wrapped:
            super().train(mode)
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            return self

        def calibrate(self, x: np.ndarray, batch: int = CALIB_BATCH) -> None:
            obs: List[Any] = list(self.observers.values())
            was = self.training
            self.eval()
            for o in obs:
                o.lo.fill_(math.inf)
                o.hi.fill_(-math.inf)
                o.calibrating = True
            try:
                with torch.no_grad():
                    for i in range(0, len(x), batch):
                        self.model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch], dtype=np.float32)))
            finally:
                for o in obs:
                    o.calibrating = False
                self.train(was)

        def unwrap(self) -> nn.Module:
            for h in self._handles:
                h.remove()
            self._handles = []
            for m in list(self.model.modules()):
                if parametrize.is_parametrized(m, "weight"):
                    parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            return self.model.eval()

    return _Wrapped()


def _pre_hook(obs: Any) -> Callable[..., Any]:
    def hook(_module: Any, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return (obs(args[0]), *args[1:])

    return hook


def qat_finetune(model: nn.Module, prepared: Any, *, flavour: str, epochs: int, lr: float = QAT_LR, seed: int = 0,
                 calib_x: np.ndarray, batch_size: int = 64, temperature: float = 1.0,
                 on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Fine-tune a copy of `model` with `flavour`'s fake quantization; returns (plain fp32 module, record).

    prepared: `edgeclf.train._Prepared` (the training and validation data at the model's input size).
    temperature: the parent's fitted temperature (1.0: none); the loss distils its probabilities at that
    temperature, the ones the gate's decisions are made from (make_qat_rung passes the training folder's).
    The model itself is left untouched. The record holds flavour, epochs, lr, the quantized layers'
    count, the fake-quantized validation AUC before fine-tuning and at the best epoch, best_epoch,
    history and seconds.
    """
    import torch

    from edgeclf.runtime.postprocess import probabilities
    from edgeclf.train import _macro_auc, fit, torch_logits

    if epochs < 1:
        raise ConfigError(f"QAT epochs is {epochs}; give at least 1 (0 turns the rung off)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature is {temperature!r}; give the parent's fitted temperature, a finite number above 0")
    t0 = time.time()
    torch.manual_seed(seed)
    wrapped = wrap_fake_quant(copy.deepcopy(model).eval(), flavour)
    wrapped.calibrate(calib_x)
    ds, yva = prepared.ds, prepared.ds.splits["val"].labels

    def val_auc(m: Any) -> Optional[float]:
        auc = _macro_auc(probabilities(torch_logits(m, prepared.xva), ds.task), yva, ds.task, prepared.positive)
        return None if np.isnan(auc) else float(auc)

    before = val_auc(wrapped)
    # The target is the fp32 parent itself (its outputs, not the labels): the gate compares with the
    # parent at the parent's temperature and thresholds, so QAT must not move the operating point. Distilled at
    # that temperature, the loss compares the very probabilities the gate decides on; at 1 it weighs the logits
    # otherwise (a test model fitted at T 20 kept 0.61 of its decisions distilled at 1, 0.76 at 20, over 8 seeds).
    teacher = copy.deepcopy(model).eval()
    history, best = fit(wrapped, prepared, epochs=epochs, lr=lr, batch_size=batch_size, patience=epochs, seed=seed,
                        on_epoch=on_epoch, teacher=teacher, kd_weight=1.0, kd_temperature=float(temperature))
    plain = wrapped.unwrap()
    record = {
        "flavour": flavour, "epochs": int(epochs), "lr": float(lr), "seed": int(seed), "layers": len(wrapped.layers),
        "loss": f"distillation to the fp32 parent's outputs at its temperature {float(temperature):g}",
        "temperature": float(temperature),
        "weights": f"int8 per output channel, symmetric [{wrapped.spec.weight_qmin}, {wrapped.spec.weight_qmax}]",
        "activations": (f"per tensor, {'int8 symmetric' if wrapped.spec.act_symmetric else 'uint8 asymmetric'} "
                        f"[{wrapped.spec.act_qmin}, {wrapped.spec.act_qmax}], min/max on calibration then EMA {EMA}"),
        "val_auc_fake_quant_before": before,
        "best_epoch": int(best),
        "val_auc_fake_quant_best": history[best - 1]["val_auc"] if best else None,
        "history": history,
        "seconds": round(time.time() - t0, 1),
    }
    return plain, record


def make_qat_rung(trained: Any, dataset: Any, *, lr: float = QAT_LR) -> Callable[..., Dict[str, Any]]:
    """The QAT rung for compress(): ``rung(flavour=, out_path=, calib_x=, calib_method=, epochs=, seed=)``.

    trained: `edgeclf.train.TrainedModel` (a training folder); dataset: the data set it was trained on
    (its train split is used for fine-tuning, val for choosing the epoch). The rung fine-tunes, exports
    the plain fp32 result to ONNX and quantizes it with `quantize_int8` into out_path. Returns
    {"record": quantize_int8's record plus "qat": True, "qat": qat_finetune's record}. The data are
    prepared once, on first use.
    """
    cache: Dict[str, Any] = {}

    def prepared() -> Any:
        if "p" not in cache:
            from edgeclf.train import _prepare, _require_every_class

            _require_every_class(dataset, "val")
            tcfg = trained.run.get("config", {}) or {}
            positive = trained.decision.positive if trained.decision.positive is not None else 1
            cache["p"] = _prepare(dataset, trained.preprocess, str(tcfg.get("augment", "auto")), positive)
        return cache["p"]

    def rung(*, flavour: str, out_path: Path, calib_x: np.ndarray, calib_method: str, epochs: int, seed: int = 0) -> Dict[str, Any]:
        from edgeclf.export import quantize
        from edgeclf.export.onnx_export import export_onnx

        tcfg = trained.run.get("config", {}) or {}
        plain, rec = qat_finetune(trained.model, prepared(), flavour=flavour, epochs=epochs, lr=lr, seed=seed,
                                  calib_x=calib_x, batch_size=int(tcfg.get("batch_size", 64)),
                                  temperature=float(trained.temperature))
        with tempfile.TemporaryDirectory(prefix="edgeclf-qat-") as tmp:
            fp32 = Path(tmp) / "qat.fp32.onnx"
            export_onnx(plain, calib_x[:1], fp32)
            qrec = quantize.quantize_int8(fp32, out_path, calib_x, flavour=flavour, method=calib_method)
        return {"record": {**qrec, "qat": True}, "qat": rec}

    return rung
