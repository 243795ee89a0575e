"""Turn a classifier's raw logits into probabilities and decisions (device side).

Kept Python 3.8 compatible and numpy-only: this module runs on point-of-care devices.

Conventions:
    task "binary":     logits (N, 1), the logit of class index 1 of a 2-entry label list;
                       probabilities (N, 2) = [1 - p, p] with p = sigmoid(logit / T).
    task "multiclass": logits (N, K), K >= 2; probabilities softmax(logits / T).
    task "multilabel": logits (N, K), K >= 1; probabilities sigmoid(logits / T), one per label.

A :class:`DecisionRule` maps probabilities to decisions:
    "threshold"  (binary)     class ``positive`` iff p[:, positive] >= thresholds[0], else the other one.
    "max-ratio"  (multiclass) argmax_k p_k / t_k (ties: the lowest index).
    "multilabel" (multilabel) label k present iff p_k >= t_k.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from edgeclf.errors import ConfigError, DataError

__all__ = ["TASKS", "RULE_KINDS", "DecisionRule", "probabilities", "decide", "frame_probabilities", "decide_frame",
           "rule_kind_for_task"]

logger = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "multilabel")
RULE_KINDS = ("threshold", "max-ratio", "multilabel")
_KIND_FOR_TASK = {"binary": "threshold", "multiclass": "max-ratio", "multilabel": "multilabel"}
_RULE_KEYS = ("kind", "thresholds", "positive", "target_sensitivity")


def rule_kind_for_task(task: str) -> str:
    """The DecisionRule kind that goes with `task` ("binary" -> "threshold", ...)."""
    _check_task(task)
    return _KIND_FOR_TASK[task]


def _check_task(task: object) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}; fix the task in the config")


def _sigmoid_pair(z: NDArray[np.float64]) -> Tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(sigmoid(z), sigmoid(-z)), each computed without overflow and without 1 - p cancellation."""
    e = np.exp(-np.abs(z))  # in (0, 1]
    big = 1.0 / (1.0 + e)
    small = e / (1.0 + e)
    nonneg = z >= 0
    return np.where(nonneg, big, small), np.where(nonneg, small, big)


def probabilities(logits: npt.ArrayLike, task: str, temperature: float = 1.0) -> NDArray[np.float64]:
    """Probabilities from raw logits (N, K), scaled by 1 / `temperature` first.

    binary: (N, 2) [1 - p, p] with p = sigmoid(logit / T) (K must be 1); multiclass: softmax(logits / T)
    (N, K), numerically stable; multilabel: sigmoid(logits / T) (N, K). Raises ConfigError for a wrong
    task, shape or temperature and DataError for logits that are not finite
    after dividing by the temperature (NaN, inf, or finite but overflowing under a tiny temperature).
    """
    _check_task(task)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)):
        raise ConfigError(f"temperature must be a number, got {temperature!r}; use a float > 0 (1.0 = none)")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ConfigError(
            f"temperature must be finite and > 0, got {temperature!r}; use a float > 0 (1.0 = none)"
        )
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ConfigError(
            f"logits must be 2-D (N, K), got shape {z.shape}; reshape the model output to (batch, outputs)"
        )
    k = z.shape[1]
    if task == "binary" and k != 1:
        raise ConfigError(
            f"binary logits must have shape (N, 1), got {z.shape}; a binary model outputs one logit "
            "(of class index 1), or use task 'multiclass' for a 2-output model"
        )
    if task == "multiclass" and k < 2:
        raise ConfigError(
            f"multiclass logits need K >= 2 columns, got shape {z.shape}; use task 'binary' for a 1-output model"
        )
    if task == "multilabel" and k < 1:
        raise ConfigError(f"multilabel logits need K >= 1 columns, got shape {z.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        z = z / t
    # Checked after scaling: finite huge logits over a tiny temperature overflow to infinity (then NaN).
    if not np.all(np.isfinite(z)):
        raise DataError(
            "logits (divided by the temperature) contain NaN or infinity; all must be finite; check the model, "
            "its input and the temperature"
        )
    if task == "binary":
        p, q = _sigmoid_pair(z[:, 0])
        return np.stack([q, p], axis=1)
    if task == "multilabel":
        return _sigmoid_pair(z)[0]
    shifted = z - np.max(z, axis=1, keepdims=True)
    ez = np.exp(shifted)
    out: NDArray[np.float64] = ez / np.sum(ez, axis=1, keepdims=True)
    return out


def frame_probabilities(logits: npt.ArrayLike, task: str, temperature: float = 1.0) -> Tuple[float, ...]:
    """One frame's probabilities as a tuple of floats, for the per-frame path of a live run: the same
    numbers as ``probabilities(logits, task, temperature)[0]`` bit for bit (the same float64 operations in
    the same order, numpy's own exp), at a fraction of its cost (a dozen array calls on three numbers cost
    more than the arithmetic). `logits` is one frame's (K,) or (1, K) output; binary and multiclass only
    (multilabel: use :func:`probabilities`). Raises as :func:`probabilities` does."""
    if task == "multilabel" or task not in TASKS:
        return tuple(probabilities(np.asarray(logits).reshape(1, -1), task, temperature)[0].tolist())
    arr = np.asarray(logits)
    if arr.ndim > 2 or (arr.ndim == 2 and arr.shape[0] != 1):
        raise ConfigError(f"frame_probabilities takes one frame's logits, (K,) or (1, K), got shape {arr.shape}; use probabilities() for a batch")
    z = arr.reshape(-1).tolist()
    k = len(z)
    if (task == "binary" and k != 1) or (task == "multiclass" and k < 2) \
            or isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(float(temperature)) and float(temperature) > 0) \
            or not all(math.isfinite(v / float(temperature)) for v in z):  # after scaling, as probabilities()
        return tuple(probabilities(np.asarray(logits, np.float64).reshape(1, -1), task, temperature)[0].tolist())  # raises
    t = float(temperature)
    if task == "binary":
        zt = z[0] / t
        e = float(np.exp(np.array([-abs(zt)]))[0])
        big, small = 1.0 / (1.0 + e), e / (1.0 + e)
        return (small, big) if zt >= 0 else (big, small)
    zt = [v / t for v in z]
    top = max(zt)
    ez = np.exp(np.array([v - top for v in zt])).tolist()
    if k < 8:  # numpy's pairwise sum adds fewer than 8 numbers one after another, as this loop does
        total = 0.0
        for v in ez:
            total += v
    else:
        total = float(np.sum(np.array(ez)))
    return tuple(v / total for v in ez)


def decide_frame(probs: Sequence[float], rule: DecisionRule) -> int:
    """:func:`decide` for one frame's probabilities of a binary or multiclass model: the class index."""
    if rule.kind == "threshold":
        if len(probs) != 2:
            return int(decide(np.asarray(probs, np.float64).reshape(1, -1), rule)[0])  # raises
        pos = int(rule.positive) if rule.positive is not None else 1
        return pos if probs[pos] >= rule.thresholds[0] else 1 - pos
    if rule.kind != "max-ratio" or len(probs) != len(rule.thresholds):
        raise ConfigError(
            f"decide_frame needs a 'threshold' or 'max-ratio' rule with one threshold per class; got {rule.kind!r} "
            f"with {len(rule.thresholds)} thresholds for {len(probs)} probabilities"
        )
    ratios = [p / t for p, t in zip(probs, rule.thresholds)]
    return max(range(len(ratios)), key=ratios.__getitem__)  # the first of equal maxima, as np.argmax


def _is_number(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.floating, np.integer))


@dataclass(frozen=True)
class DecisionRule:
    """How probabilities become decisions; see the module docstring for the three kinds.

    thresholds: one per class (max-ratio) or label (multilabel); exactly one for "threshold";
        each in (0, 1].
    positive: binary only, the index (0 or 1) of the positive class; None for the other kinds.
    target_sensitivity: the sensitivity the thresholds were fitted for (recorded for the manifest),
        in (0, 1] or None.
    """

    kind: str
    thresholds: Tuple[float, ...]
    positive: Optional[int] = None
    target_sensitivity: Optional[float] = None

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ConfigError(
                f"decision rule kind {self.kind!r} is unknown; allowed: {', '.join(RULE_KINDS)}"
            )
        raw: object = self.thresholds
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (Sequence, np.ndarray)):
            raise ConfigError(f"decision rule thresholds must be a list of numbers in (0, 1], got {raw!r}")
        values = []
        for t in raw:
            if not _is_number(t) or not (0.0 < float(t) <= 1.0):
                raise ConfigError(
                    f"decision rule threshold {t!r} is not a number in (0, 1]; each threshold must be "
                    "0 < t <= 1; refit the decision rule or fix the manifest"
                )
            values.append(float(t))
        object.__setattr__(self, "thresholds", tuple(values))
        n = len(values)
        if self.kind == "threshold":
            if n != 1:
                raise ConfigError(f"a 'threshold' decision rule needs exactly 1 threshold, got {n}")
            if self.positive is None or isinstance(self.positive, bool) or self.positive not in (0, 1):
                raise ConfigError(
                    f"a 'threshold' decision rule needs positive = 0 or 1 (index of the positive class), "
                    f"got {self.positive!r}"
                )
            object.__setattr__(self, "positive", int(self.positive))
        else:
            if self.positive is not None:
                raise ConfigError(
                    f"positive is only for 'threshold' (binary) rules, got positive={self.positive!r} "
                    f"for kind {self.kind!r}; drop it"
                )
            need = 2 if self.kind == "max-ratio" else 1
            if n < need:
                raise ConfigError(
                    f"a {self.kind!r} decision rule needs at least {need} thresholds (one per class/label), got {n}"
                )
        ts = self.target_sensitivity
        if ts is not None:
            if not _is_number(ts) or not (0.0 < float(ts) <= 1.0):
                raise ConfigError(f"target_sensitivity must be a number in (0, 1] or null, got {ts!r}")
            object.__setattr__(self, "target_sensitivity", float(ts))

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` reads it back."""
        return {
            "kind": self.kind,
            "thresholds": list(self.thresholds),
            "positive": self.positive,
            "target_sensitivity": self.target_sensitivity,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecisionRule:
        """Build and validate a rule from :meth:`to_dict` output; ConfigError names the bad key."""
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"a decision rule must be a mapping with keys {', '.join(_RULE_KEYS)}, got {type(d).__name__}"
            )
        unknown = sorted(str(k) for k in d if k not in _RULE_KEYS)
        if unknown:
            raise ConfigError(
                f"decision rule has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_RULE_KEYS)}"
            )
        for key in ("kind", "thresholds"):
            if key not in d:
                raise ConfigError(f"decision rule is missing key {key!r}; it needs kind and thresholds")
        kind = d["kind"]
        if not isinstance(kind, str):
            raise ConfigError(f"decision rule key 'kind' must be a string, got {kind!r}")
        thresholds = d["thresholds"]
        if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, (list, tuple)):
            raise ConfigError(f"decision rule key 'thresholds' must be a list of numbers, got {thresholds!r}")
        positive = d.get("positive")
        if positive is not None and (isinstance(positive, bool) or not isinstance(positive, int)):
            raise ConfigError(f"decision rule key 'positive' must be 0, 1 or null, got {positive!r}")
        ts = d.get("target_sensitivity")
        if ts is not None and not _is_number(ts):
            raise ConfigError(f"decision rule key 'target_sensitivity' must be a number or null, got {ts!r}")
        return cls(kind=kind, thresholds=tuple(thresholds), positive=positive, target_sensitivity=ts)


def decide(probs: npt.ArrayLike, rule: DecisionRule) -> NDArray[Any]:
    """Apply `rule` to probabilities.

    Returns (N,) int64 class indices for "threshold" (probs (N, 2)) and "max-ratio" (probs (N, K),
    K = len(thresholds)); (N, K) bool for "multilabel". Raises ConfigError when the shapes disagree.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(rule.thresholds, dtype=np.float64)
    if rule.kind == "threshold":
        if p.ndim != 2 or p.shape[1] != 2:
            raise ConfigError(
                f"a 'threshold' (binary) rule needs probabilities of shape (N, 2), got {p.shape}; "
                "use probabilities(logits, 'binary')"
            )
        pos = int(rule.positive) if rule.positive is not None else 1
        hit = p[:, pos] >= t[0]
        return np.where(hit, pos, 1 - pos).astype(np.int64)
    if p.ndim != 2 or p.shape[1] != t.shape[0]:
        raise ConfigError(
            f"a {rule.kind!r} rule with {t.shape[0]} thresholds needs probabilities of shape (N, {t.shape[0]}), "
            f"got {p.shape}; the rule and the model must have the same classes"
        )
    if rule.kind == "multilabel":
        return p >= t
    out: NDArray[np.int64] = np.argmax(p / t, axis=1).astype(np.int64)
    return out
