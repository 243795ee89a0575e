"""Structured channel pruning to a MAC budget (workstation side), with Torch-Pruning's dependency graph.

    >>> from edgeclf.export.prune import prune_step, save_pruned, load_pruned
    >>> info = prune_step(model, torch.zeros(1, 1, 96, 96), target_macs_ratio=0.5)   # prunes `model` in place
    >>> save_pruned(model, folder)                                  # folder/pruned.json + folder/model.safetensors
    >>> model = load_pruned(create_model(arch, num_outputs=k, in_chans=c), folder)

One pass of local (per layer group) L2-magnitude channel pruning: the dependency graph keeps coupled
layers consistent (residual sums in resnet18, depthwise convs and squeeze-excite in MobileNetV3 and
EfficientNet), the final classifier keeps its outputs, and every pruned group keeps a multiple of
`round_to` channels (at least `round_to`; groups already smaller are left alone). Torch-Pruning's
`pruning_ratio` is a per-layer channel fraction, not a MAC fraction, so the ratio is bisected (then a
few layers get the next smaller one) until the MACs land at or just under `target_macs_ratio` of the
original. A pruned model needs
fine-tuning before use: pruning an already trained model costs accuracy.

Saved without pickle: `pruned.json` records the structural attributes of every module (conv in/out
channels and groups, norm features, linear in/out features, ...) and `model.safetensors` the weights.
`load_pruned` starts from the unpruned registry model, applies the recorded structure, checks every
tensor shape against it, loads the weights and runs the model once.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from edgeclf.errors import ConfigError, EdgeclfError, ModelError, require

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["PruneConfig", "prune_trained", "count_macs", "prune_step", "save_pruned", "load_pruned", "ort_latency", "IMPORTANCES",
           "PRUNED_JSON", "WEIGHTS_FILE", "FORMAT", "TRAINING_FACTS"]

_TRAIN_EXTRA = "train"
IMPORTANCES = ("l2", "l1")
PRUNED_JSON = "pruned.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "edgeclf.pruned"
_VERSION = 1
_MAX_RATIO = 0.95  # largest per-layer channel pruning ratio the search tries
_BISECT_TOL = 1e-3  # bisection stops when the ratio is known to this
_CLOSE = 0.98  # MACs within 2% under the target end the search
_MAX_REFINE = 40  # most per-layer trials after the bisection
_PROBE_SIZE = 64  # input side of the test forward pass in load_pruned (every registry model runs at 64 px)


def _tp() -> Any:
    require("torch", _TRAIN_EXTRA)
    return require("torch_pruning", _TRAIN_EXTRA)


def _as_example(example: Any) -> torch.Tensor:
    import torch

    if isinstance(example, np.ndarray):
        example = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    if not isinstance(example, torch.Tensor) or example.ndim != 4 or not example.is_floating_point():
        shape = tuple(example.shape) if hasattr(example, "shape") else type(example).__name__
        raise ConfigError(f"example input is {shape}; expected a float tensor (N, C, H, W), e.g. torch.zeros(1, 1, 96, 96)")
    return example[:1]


def count_macs(model: nn.Module, example: torch.Tensor) -> Tuple[int, int]:
    """(MACs, parameters) of `model` for one image shaped like `example`, via Torch-Pruning's op counter."""
    import torch

    tp = _tp()
    x = _as_example(example)
    training = model.training
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model.eval(), x)
    finally:
        model.train(training)
    return int(macs), int(params)


# ------------------------------------------------------------------------------------ pruning
def _classifier(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The final classifier: the last Linear (else conv) with as many outputs as the model."""
    import torch
    from torch import nn

    with torch.no_grad():
        out = model(example)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ModelError(f"the model returns {getattr(out, 'shape', type(out).__name__)}; pruning expects logits (N, K)")
    k = int(out.shape[1])
    heads: List[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == k]
    heads = heads or [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == k]
    if not heads:
        raise ModelError(f"no final Linear layer with {k} outputs found; cannot tell which layer is the classifier")
    return heads[-1]


def _make_pruner(tp: Any, model: nn.Module, example: torch.Tensor, ratio: float, round_to: int, importance: str,
                 layer_ratios: Optional[Dict[nn.Module, float]] = None) -> Any:
    if not callable(getattr(tp.pruner.BasePruner, "_round_to", None)):  # the hook overridden below
        raise ModelError(f"torch-pruning {getattr(tp, '__version__', '?')} is not supported; "
                         "install it with: pip install 'torch-pruning>=1.6.1,<1.7'")
    class _Pruner(tp.pruner.BasePruner):  # type: ignore[misc]
        """Torch-Pruning rounds the kept channels *down* to a multiple of round_to, which can keep none
        (or halve a 16-channel layer for a 1% ratio); keep the nearest multiple, at least round_to,
        and leave groups smaller than round_to whole."""

        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            keep = current_channels - n_pruned
            keep = min(current_channels, max(round_to, int(round(keep / round_to)) * round_to))
            return max(current_channels - keep, 0)

    return _Pruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2 if importance == "l2" else 1),
        pruning_ratio=ratio,
        pruning_ratio_dict=layer_ratios or None,
        global_pruning=False,
        ignored_layers=[_classifier(model, example)],
        round_to=round_to,
    )


def _out_channels(model: nn.Module) -> Dict[str, int]:
    from torch import nn

    return {n: int(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


class _Search:
    """Prunes deep copies of the model at a ratio (plus per-layer exceptions) and remembers the outcome."""

    def __init__(self, tp: Any, model: nn.Module, example: torch.Tensor, round_to: int, importance: str) -> None:
        self.tp, self.model, self.x, self.round_to, self.importance = tp, model, example, round_to, importance

    def apply(self, model: nn.Module, ratio: float, layers: Dict[str, float]) -> Tuple[int, Dict[str, int]]:
        """Prune `model` in place; returns (MACs, out channels by layer name)."""
        try:
            if ratio > 0:
                mods = dict(model.named_modules())
                per_layer = {mods[n]: r for n, r in layers.items()}
                _make_pruner(self.tp, model, self.x, ratio, self.round_to, self.importance, per_layer).step()
            return count_macs(model, self.x)[0], _out_channels(model)
        except EdgeclfError:
            raise
        except Exception as exc:  # Torch-Pruning's own errors: a graph it cannot trace or prune
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelError(f"Torch-Pruning could not prune this model: {type(exc).__name__}: {first}") from None

    def trial(self, ratio: float, layers: Dict[str, float]) -> Tuple[int, Dict[str, int]]:
        return self.apply(copy.deepcopy(self.model), ratio, layers)


def prune_step(model: nn.Module, example: torch.Tensor, *, target_macs_ratio: float, round_to: int = 8,
               importance: str = "l2") -> Dict[str, Any]:
    """Prune `model` in place (one structured channel-pruning pass) until MACs <= target_macs_ratio x original.

    The per-layer channel ratio is bisected to the smallest one that meets the target; as channels move in
    steps of `round_to`, many layers cross a step together, so the layers that differ between the two ends of
    the bisection are then given back the smaller ratio one by one while the target still holds.

    Returns {"macs_before", "macs_after", "params_before", "params_after", "ratio" (macs_after / macs_before),
    "target_macs_ratio", "channel_ratio" (Torch-Pruning's pruning_ratio found), "layer_ratios" (the exceptions),
    "round_to", "importance"}.
    ConfigError: a ratio outside (0, 1), round_to < 1, an unknown importance, or a target the model cannot reach.
    ModelError: a model whose dependency graph Torch-Pruning cannot build or prune.
    """
    if isinstance(target_macs_ratio, bool) or not isinstance(target_macs_ratio, (int, float)) \
            or not math.isfinite(target_macs_ratio) or not 0 < target_macs_ratio < 1:
        raise ConfigError(f"target MACs ratio is {target_macs_ratio!r}; expected a fraction in (0, 1), e.g. 0.5")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to is {round_to!r}; expected an integer >= 1, e.g. 8")
    if importance not in IMPORTANCES:
        raise ConfigError(f"importance {importance!r} is unknown; allowed: {', '.join(IMPORTANCES)}")
    tp = _tp()
    x = _as_example(example)
    training = model.training
    model.eval()  # tracing runs forward passes: BatchNorm must not update its statistics
    try:
        macs0, params0 = count_macs(model, x)
        target = target_macs_ratio * macs0
        close = _CLOSE * target  # at or above this (and <= target) is close enough
        search = _Search(tp, model, x, round_to, importance)
        before = _out_channels(model)

        # 1. bisect one ratio for all layers: MACs(lo) > target >= MACs(hi); MACs fall step-wise as it grows
        lo, lo_ch = 0.0, before
        hi = _MAX_RATIO
        hi_macs, hi_ch = search.trial(hi, {})
        if hi_macs > target:
            raise ConfigError(
                f"pruning cannot reach {target_macs_ratio:.0%} of the MACs with channels in multiples of {round_to} "
                f"(at most down to {hi_macs / macs0:.0%}); ask for {math.ceil(hi_macs / macs0 * 100) / 100:.2f} or more"
            )
        while hi - lo > _BISECT_TOL and hi_macs < close:
            mid = (lo + hi) / 2
            m, ch = search.trial(mid, {})
            if m <= target:
                hi, hi_macs, hi_ch = mid, m, ch
            else:
                lo, lo_ch = mid, ch

        # 2. give layers that differ between lo and hi the smaller ratio, one at a time, while MACs <= target
        layers: Dict[str, float] = {}
        current = hi_ch
        tries = 0
        for name in [n for n in before if hi_ch[n] != lo_ch[n]]:
            if hi_macs >= close or tries >= _MAX_REFINE:
                break
            if current[name] == lo_ch[name]:  # already changed with a coupled layer
                continue
            tries += 1
            m, ch = search.trial(hi, {**layers, name: lo})
            if m <= target:
                layers[name], hi_macs, current = lo, m, ch

        macs1, _ = search.apply(model, hi, layers)
        if macs1 != hi_macs:
            raise ModelError(f"pruning at ratio {hi:.4f} gave {macs1} MACs, not the {hi_macs} of the trial run")
        macs1, params1 = count_macs(model, x)
    finally:
        model.train(training)
    after = _out_channels(model)
    odd = [n for n, c in after.items() if c != before.get(n) and (c % round_to or c < round_to)]
    if odd:
        raise ModelError(f"pruned layers {odd[:3]} have channels that are not positive multiples of {round_to}")
    return {"macs_before": macs0, "macs_after": macs1, "params_before": params0, "params_after": params1,
            "ratio": macs1 / macs0, "target_macs_ratio": float(target_macs_ratio), "channel_ratio": round(hi, 6),
            "layer_ratios": {n: round(r, 6) for n, r in layers.items()}, "round_to": round_to, "importance": importance}


# ---------------------------------------------------------------------------- save and load
def _structure(m: nn.Module) -> Optional[Dict[str, Any]]:
    """The attributes that fix the shapes of `m`'s own tensors (those Torch-Pruning changes), or None."""
    from torch import nn

    if isinstance(m, nn.modules.conv._ConvNd):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features}
    if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*, timm's BatchNormAct2d
        return {"num_features": m.num_features}
    if isinstance(m, nn.GroupNorm):
        return {"num_groups": m.num_groups, "num_channels": m.num_channels}
    if isinstance(m, nn.LayerNorm):
        return {"normalized_shape": list(m.normalized_shape)}
    if isinstance(m, nn.PReLU):
        return {"num_parameters": m.num_parameters}
    return None


def _expected_shapes(m: nn.Module, attrs: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Tensor name (in `m`) -> the shape the attributes imply."""
    from torch import nn

    if isinstance(m, nn.modules.conv._ConvNd):
        cin, cout, g = attrs["in_channels"], attrs["out_channels"], attrs["groups"]
        if g < 1 or cin % g or cout % g:
            raise ModelError(f"in/out channels {cin}/{cout} are not divisible by groups {g}")
        transposed = bool(getattr(m, "transposed", False))
        w = (cin, cout // g) if transposed else (cout, cin // g)
        return {"weight": (*w, *m.kernel_size), "bias": (cout,)}
    if isinstance(m, nn.Linear):
        return {"weight": (attrs["out_features"], attrs["in_features"]), "bias": (attrs["out_features"],)}
    if isinstance(m, nn.modules.batchnorm._NormBase):
        n = attrs["num_features"]
        return {"weight": (n,), "bias": (n,), "running_mean": (n,), "running_var": (n,), "num_batches_tracked": ()}
    if isinstance(m, nn.GroupNorm):
        if attrs["num_groups"] < 1 or attrs["num_channels"] % attrs["num_groups"]:
            raise ModelError(f"num_channels {attrs['num_channels']} is not divisible by num_groups {attrs['num_groups']}")
        return {"weight": (attrs["num_channels"],), "bias": (attrs["num_channels"],)}
    if isinstance(m, nn.LayerNorm):
        return {"weight": tuple(attrs["normalized_shape"]), "bias": tuple(attrs["normalized_shape"])}
    return {"weight": (attrs["num_parameters"],)}  # PReLU


def _type_name(m: Any) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def save_pruned(model: nn.Module, folder: Path, *, record: Optional[Dict[str, Any]] = None) -> None:
    """Write `folder/pruned.json` (module structure, JSON) and `folder/model.safetensors` (weights). No pickle.

    `record` (e.g. prune_step's result) is stored under "pruning". ModelError: a module holding tensors
    whose structure cannot be recorded.
    """
    require("safetensors", _TRAIN_EXTRA)
    from safetensors.torch import save_file

    modules: List[Dict[str, Any]] = []
    for name, m in model.named_modules():
        entry: Dict[str, Any] = {"name": name, "type": _type_name(m)}
        attrs = _structure(m)
        own = [n for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)] if t is not None]
        if attrs is not None:
            entry["attrs"] = attrs
        elif own:
            raise ModelError(f"module {name or '<root>'} ({type(m).__name__}) holds tensors {own[:3]} whose shape "
                             "save_pruned cannot record; supported: Conv, Linear, BatchNorm/InstanceNorm, GroupNorm, LayerNorm, PReLU")
        modules.append(entry)
    meta = {"format": FORMAT, "version": _VERSION, "weights": WEIGHTS_FILE, "modules": modules}
    if record is not None:
        meta["pruning"] = record
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    (folder / PRUNED_JSON).write_text(json.dumps(meta, indent=1))


def _read_meta(folder: Path) -> Dict[str, Any]:
    path = folder / PRUNED_JSON
    if not path.is_file():
        raise ModelError(f"{folder} holds no {PRUNED_JSON}; give a folder written by save_pruned")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not readable JSON ({exc}); write it again with save_pruned") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("modules"), list):
        raise ModelError(f"{path} is not an {FORMAT} file; write it with save_pruned")
    if meta.get("version") != _VERSION:
        raise ModelError(f"{path} has format version {meta.get('version')!r}; this edgeclf reads version {_VERSION}")
    return meta


def _probe(model: nn.Module, x: torch.Tensor, folder: Path) -> Tuple[int, ...]:
    import torch

    try:
        with torch.inference_mode():
            return tuple(model(x).shape)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"the model rebuilt from {folder} does not run ({type(exc).__name__}: {first}); "
                         "its files do not belong to this model") from None


def load_pruned(arch_model: nn.Module, folder: Path) -> nn.Module:
    """Rebuild a pruned model: `arch_model` is the *unpruned* registry model (same architecture, num_outputs and
    in_chans, e.g. ``create_model(arch, num_outputs=k, in_chans=c)``); it is reshaped in place to the recorded
    structure, every tensor shape is checked, the weights are loaded and it is returned in eval mode.

    ModelError: missing or foreign files, a structure that does not belong to this architecture, tensors that
    do not match the structure, or a rebuilt model that does not run.
    """
    import torch
    from torch import nn

    require("safetensors", _TRAIN_EXTRA)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = _read_meta(folder)
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        raise ModelError(f"{folder} holds no {WEIGHTS_FILE}; give a folder written by save_pruned")
    try:
        tensors = load_file(str(wpath))
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"{wpath} could not be read ({exc}); write it again with save_pruned") from None

    recorded = meta["modules"]
    live = list(arch_model.named_modules())
    names = [(e.get("name"), e.get("type")) for e in recorded if isinstance(e, dict)]
    if names != [(n, _type_name(m)) for n, m in live]:
        diff = next((i for i, (a, (n, m)) in enumerate(zip(names, live)) if a != (n, _type_name(m))), min(len(names), len(live)))
        got = names[diff] if diff < len(names) else "nothing"
        want = (live[diff][0], _type_name(live[diff][1])) if diff < len(live) else "nothing"
        raise ModelError(
            f"{folder / PRUNED_JSON} was pruned from another architecture (module {diff}: recorded {got}, model has {want}); "
            "pass the unpruned model it came from (same architecture, num_outputs and in_chans)"
        )
    model_keys = set(arch_model.state_dict())
    if set(tensors) != model_keys:
        missing, extra = sorted(model_keys - set(tensors)), sorted(set(tensors) - model_keys)
        raise ModelError(f"{wpath} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")

    # Check everything before changing the model: the input channels and the outputs are never pruned.
    arch_model.eval()
    convs = [m for m in arch_model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    probe = torch.zeros(1, convs[0].in_channels, *([_PROBE_SIZE] * (convs[0].weight.ndim - 2))) if convs else None
    out_shape = _probe(arch_model, probe, folder) if probe is not None else None
    plan = []
    for entry, (name, m) in zip(recorded, live):
        attrs = entry.get("attrs")
        fresh = _structure(m)
        where = f"{folder / PRUNED_JSON}: module {name or '<root>'}"
        if (attrs is None) != (fresh is None) or (attrs is not None and set(attrs) != set(fresh or {})):
            raise ModelError(f"{where} records {attrs!r}; expected the keys of {fresh!r}")
        prefix = f"{name}." if name else ""
        own = {n: t for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)] if t is not None}
        if attrs is None or fresh is None:
            for n, t in own.items():  # a module without recorded structure keeps its tensor shapes
                if tuple(tensors[prefix + n].shape) != tuple(t.shape):
                    raise ModelError(f"{wpath}: {prefix + n} is {tuple(tensors[prefix + n].shape)}; the model has {tuple(t.shape)}")
            continue
        for k, v in attrs.items():
            vals = v if k == "normalized_shape" and isinstance(v, list) else [v]
            refs = fresh[k] if k == "normalized_shape" else [fresh[k]]
            if len(vals) != len(refs) or not all(isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= r
                                                 for g, r in zip(vals, refs)):
                raise ModelError(f"{where} records {k}={v!r}; pruning leaves 1..{fresh[k]} (the unpruned model's value): "
                                 "the file does not belong to this model (same architecture, num_outputs and in_chans)")
        if m is (convs[0] if convs else None) and attrs["in_channels"] != fresh["in_channels"]:
            raise ModelError(f"{where} takes {attrs['in_channels']} input channels; the model takes {fresh['in_channels']}: "
                             "pass the unpruned model with the same in_chans")
        expected = _expected_shapes(m, attrs)
        for n in own:
            shape = tuple(tensors[prefix + n].shape)
            if n not in expected or shape != tuple(expected[n]):
                raise ModelError(f"{wpath}: {prefix + n} is {shape}; module {name} with {attrs} needs {expected.get(n)}")
        plan.append((m, attrs, own, prefix))

    for m, attrs, own, prefix in plan:
        for n, t in own.items():
            shape = tuple(tensors[prefix + n].shape)
            if isinstance(t, nn.Parameter):
                m._parameters[n] = nn.Parameter(torch.empty(shape, dtype=t.dtype), requires_grad=t.requires_grad)
            else:
                m._buffers[n] = torch.empty(shape, dtype=t.dtype)
        for k, v in attrs.items():
            setattr(m, k, tuple(v) if k == "normalized_shape" else v)
    try:
        arch_model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{wpath} does not fit the recorded structure: {str(exc).splitlines()[-1].strip()}") from None
    if probe is not None and _probe(arch_model, probe, folder) != out_shape:
        raise ModelError(f"the model rebuilt from {folder} no longer gives outputs shaped {out_shape}; "
                         "pass the unpruned model with the same num_outputs")
    return arch_model


# ------------------------------------------------------------------------------------ latency
def ort_latency(before: nn.Module, after: nn.Module, example_size: Tuple[int, int, int], *, runs: int = 200,
                warmup: int = 20, threads: Optional[int] = None, seed: int = 0) -> Dict[str, Any]:
    """Batch-1 ONNX Runtime latency of two models (e.g. unpruned and pruned), exported at opset 17 to a temporary
    folder and timed interleaved with the same threads (`export.compress.measure_latency`).

    example_size is (C, H, W). Returns {"before": {"median", "p90", "runs"}, "after": {...},
    "speedup": before median / after median}.
    """
    from edgeclf.export.compress import measure_latency
    from edgeclf.export.onnx_export import export_onnx

    if len(example_size) != 3 or not all(isinstance(v, int) and v >= 1 for v in example_size):
        raise ConfigError(f"example size is {example_size!r}; expected (channels, height, width), e.g. (1, 96, 96)")
    x = np.random.default_rng(seed).standard_normal((1, *example_size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="edgeclf-prune-") as tmp:
        paths = {"before": Path(tmp) / "before.onnx", "after": Path(tmp) / "after.onnx"}
        export_onnx(before, x, paths["before"])
        export_onnx(after, x, paths["after"])
        lat = measure_latency(paths, x, runs=runs, warmup=warmup, threads=threads)
    return {"before": lat["before"], "after": lat["after"], "speedup": lat["before"]["median"] / lat["after"]["median"]}


# ------------------------------------------------------------------ prune a training folder
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What run.json records about how a model's weights were trained; a pruned run keeps its parent's under pruning.training.
TRAINING_FACTS = ("best_epoch", "seconds", "packages")


@dataclass(frozen=True)
class PruneConfig:
    model: str  # a training folder (pruned or not)
    out: str
    # Keep this fraction of the --model folder's MACs: for a pruned folder, of its MACs (pruning.original has the unpruned model's).
    target_macs: float = 0.5
    steps: int = 3  # prune-then-fine-tune rounds, MACs falling linearly to the target
    finetune_epochs: int = 6
    lr: float = 1e-3
    data: Optional[str] = None
    round_to: int = 8
    distill: bool = True  # fine-tune against the unpruned parent's soft outputs as well as the labels
    # A pruning that speeds ONNX Runtime up by less than this is reported as not paying.
    min_speedup: float = 1.1

    def __post_init__(self) -> None:
        # Refused here, before any data is loaded: a NaN passes every comparison, a negative lr reaches AdamW.
        if not _is_number(self.target_macs) or not 0.0 < self.target_macs < 1.0:
            raise ConfigError(f"--target-macs is {self.target_macs!r}; give the fraction of MACs to keep, above 0 and below 1, e.g. 0.5")
        for flag, n in (("--steps", self.steps), ("--finetune-epochs", self.finetune_epochs), ("round_to", self.round_to)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"{flag} is {n!r}; give a whole number of at least 1")
        if not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"--lr is {self.lr!r}; give the fine-tuning learning rate as a finite number above 0, e.g. 1e-3")
        if not _is_number(self.min_speedup) or not math.isfinite(self.min_speedup) or self.min_speedup <= 0:
            raise ConfigError(f"min_speedup is {self.min_speedup!r}; give a finite speed-up above 0, e.g. 1.1")
        out = Path(self.out)
        if out.resolve() == Path(self.model).resolve():
            raise ConfigError("--out is the --model folder; write the pruned model to a new folder so its parent survives")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {out} is not empty; choose a new folder")


def _original(tm: Any, example: torch.Tensor, prev: Dict[str, Any]) -> Dict[str, Any]:
    """The unpruned model of a pruned folder `tm` whose pruning record is `prev`: {"model", "macs", "params", "metrics"}.

    MACs and parameters are counted on the registry model, which is the unpruned one (load_pruned reshapes it), so they
    are right whatever the records say. Name and metrics come from the records: prev["original"], else prev itself when it
    pruned the unpruned model (its macs.before is those MACs); a record that chains to neither (a folder pruned more than
    once by an edgeclf that kept no "original") leaves them None.
    """
    from edgeclf.models import create_model

    unpruned = create_model(tm.meta["architecture"], num_outputs=tm.meta["num_outputs"], in_chans=tm.preprocess.channels,
                            pretrained=False)
    macs, params = count_macs(unpruned, example)
    rec = prev.get("original")
    if isinstance(rec, dict):
        name, metrics = rec.get("model"), rec.get("metrics")
    elif (prev.get("macs") or {}).get("before") == macs:
        name, metrics = prev.get("parent"), prev.get("metrics_before")
    else:
        name, metrics = None, None
    return {"model": name, "macs": macs, "params": params, "metrics": metrics}


def prune_trained(cfg: PruneConfig, *, on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Iteratively prune and fine-tune a trained model, recalibrate it, and write a new training folder.

    The record holds MACs, parameters, measured ONNX Runtime latency (same input, same threads) and
    validation/test metrics before and after, and says plainly when fewer MACs bought no time.

    "before" (macs.before, metrics_before, latency) is the --model folder, which may itself be pruned: pruning an
    already pruned folder keeps that folder's pruning record under "previous" (a chain back to the first pass), and
    every record has "original" (the unpruned model: name, MACs, parameters, metrics) and macs/params.ratio_of_original.
    """
    import time

    import torch

    from edgeclf.data import load_dataset
    from edgeclf.train import (
        _prepare,
        _require_every_class,
        calibrate_and_measure,
        fit,
        load_trained,
        package_versions,
        save_run,
    )

    t0 = time.time()
    tm = load_trained(cfg.model)
    if tm.members > 1:
        raise ConfigError(f"{cfg.model} is an ensemble of {tm.members}; prune each member's training folder and combine the "
                          "pruned runs' settings by retraining, or export the ensemble unpruned")
    run = tm.run
    recorded = run.get("data", {})
    tcfg = run.get("config", {})
    seed = int(tcfg.get("seed", 0))
    # A run trained with --no-test never reads its test split; neither does pruning it (export copies these figures).
    read_test = bool(tcfg.get("read_test", True))
    # quality: as train loads it. The frames `edgeclf run` does not classify (Dataset.abstain) are left out of the
    # recalibration and of the val and test figures (calibrate_and_measure); fine-tuning still learns from every frame.
    from edgeclf.data import Dataset, load_training_data

    def load(spec: str) -> Dataset:
        return load_dataset(spec, classes=recorded.get("classes"), seed=seed, frames_per_clip=int(tcfg.get("frames_per_clip", 8)),
                            quality=True)

    # Export's check (one function): fine-tuning re-draws train and val from the data; changed data would fine-tune on
    # validation images and fit the operating point and the reported figures on training ones. The training data under
    # another name or path (a copy, another machine) is known by its content and read with its recorded options.
    ds = load_training_data(cfg.data or recorded.get("spec", ""), recorded, load, data_given=cfg.data,
                            use="its train and val splits are no longer the ones the model was trained and validated on "
                                "(fine-tuning would learn validation images)")
    if ds.labels != tm.labels:
        raise ConfigError(f"data {ds.name} has labels {ds.labels}; the model has {tm.labels}")
    _require_every_class(ds, "val")
    positive = tm.decision.positive if tm.decision.positive is not None else 1
    p = _prepare(ds, tm.preprocess, str(tcfg.get("augment", "auto")), positive)
    torch.manual_seed(seed)
    from edgeclf.models import with_tta

    model = tm.net  # pruned and fine-tuned alone; measured as deployed, with the run's test-time augmentation
    parent = copy.deepcopy(model).eval()
    example = torch.zeros(1, tm.preprocess.channels, *tm.preprocess.size)
    macs0, params0 = count_macs(model, example)
    # Refitted as training fits them (on the val frames run classifies): this pass's before and after compare alike.
    _, _, before = calibrate_and_measure(with_tta(parent, tm.tta), p, target_sensitivity=tm.decision.target_sensitivity or 0.9,
                                         seed=seed, operating_point=str(tcfg.get("operating_point", "sensitivity")), test=read_test)
    steps: List[Dict[str, Any]] = []
    history: List[Dict[str, Any]] = []
    for i in range(1, cfg.steps + 1):
        goal = 1.0 - (1.0 - cfg.target_macs) * i / cfg.steps  # of the --model folder's MACs
        macs_now, _ = count_macs(model, example)
        info = prune_step(model, example, target_macs_ratio=min(1.0 - 1e-6, goal * macs0 / macs_now), round_to=cfg.round_to)
        h, best = fit(model, p, epochs=cfg.finetune_epochs, lr=cfg.lr, batch_size=int(tcfg.get("batch_size", 64)),
                      patience=cfg.finetune_epochs, seed=seed + i, on_epoch=on_epoch,
                      teacher=parent if cfg.distill else None)
        history += [{**e, "step": i} for e in h]
        steps.append({"step": i, "macs_ratio": count_macs(model, example)[0] / macs0, "best_epoch": best,
                      "val_auc": h[best - 1]["val_auc"] if best else None, **{k: info[k] for k in ("channel_ratio",)}})
    temperature, rule, after = calibrate_and_measure(with_tta(model, tm.tta), p, target_sensitivity=tm.decision.target_sensitivity or 0.9,
                                                     seed=seed, operating_point=str(tcfg.get("operating_point", "sensitivity")),
                                                     test=read_test)
    macs1, params1 = count_macs(model, example)
    lat = ort_latency(parent, model, (tm.preprocess.channels, *tm.preprocess.size))
    pays = lat["speedup"] >= cfg.min_speedup
    prev = run.get("pruning") or None
    original: Dict[str, Any] = _original(tm, example, prev) if prev else {
        "model": Path(cfg.model).name, "macs": macs0, "params": params0, "metrics": {k: v for k, v in before.items()}}
    if prev is None:
        verdict = f"pruning to {macs1 / macs0:.0%} of the MACs made ONNX Runtime {lat['speedup']:.2f}x faster here"
    else:  # the latency compares with the pruned parent: say so, and where the model stands against the unpruned one
        verdict = (f"pruning the pruned {Path(cfg.model).name} to {macs1 / macs0:.0%} of its MACs "
                   f"({macs1 / original['macs']:.0%} of the unpruned model's) made ONNX Runtime {lat['speedup']:.2f}x faster here")
    if not pays:
        verdict += (f": it saves MACs but not time (below {cfg.min_speedup}x); "
                    + ("keep the unpruned model" if prev is None else f"keep {Path(cfg.model).name}"))
    pruning = {
        "target_macs": cfg.target_macs, "steps": steps, "round_to": cfg.round_to, "finetune_epochs": cfg.finetune_epochs, "lr": cfg.lr,
        "distill": cfg.distill,
        # before and ratio: against the --model folder (this pass); ratio_of_original: against the unpruned model.
        "macs": {"before": macs0, "after": macs1, "ratio": macs1 / macs0, "ratio_of_original": macs1 / original["macs"]},
        "params": {"before": params0, "after": params1, "ratio": params1 / params0,
                   "ratio_of_original": params1 / original["params"]},
        "latency_ms": lat, "pays": pays, "verdict": verdict,
        # The --model folder's figures: this pass's accuracy cost (the whole pruning's is against original["metrics"]).
        "metrics_before": {k: v for k, v in before.items()}, "parent": Path(cfg.model).name,
        "original": original,
        # The unpruned model's own training (best epoch, seconds, packages): this run's top-level ones are the fine-tuning's.
        # A parent pruned before this field existed no longer knows them.
        "training": ((run["pruning"].get("training") or dict.fromkeys(TRAINING_FACTS)) if run.get("pruning")
                     else {k: run.get(k) for k in TRAINING_FACTS}),
        # The parent's own pruning record, which chains to the first pass: its settings, MACs and figures.
        **({"previous": prev} if prev else {}),
    }
    meta = {**tm.meta, "temperature": temperature, "decision": rule.to_dict(), "pruned": True}
    record = {
        **{k: run.get(k) for k in ("config", "data")},
        **({"recipe": run["recipe"]} if run.get("recipe") else {}),  # export keeps applying the recipe's settings
        "model": {**meta, "parameters": params1},
        "best_epoch": steps[-1]["best_epoch"],
        "history": history,
        "metrics": after,
        "pruning": pruning,
        "seconds": round(time.time() - t0, 1),
        "packages": package_versions("edgeclf", "torch", "torch-pruning", "onnxruntime"),
    }
    # Written whole into a temporary sibling and renamed: never half a training folder.
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_run(stage, model, p, meta, record)
        save_pruned(model, stage, record={k: pruning[k] for k in ("target_macs", "macs", "params")})
        if out.exists():
            out.rmdir()  # empty, checked above
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return record
