"""Calibrate a classifier on its validation set: a temperature for the logits and a decision rule.

Both are fitted on held-out validation data (never the test set) and written to the bundle manifest;
the device applies them with :mod:`edgeclf.runtime.postprocess`.

Label conventions: binary/multiclass labels are (N,) class indices; multilabel labels are (N, K) 0/1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime.postprocess import DecisionRule, _check_task, probabilities, rule_kind_for_task

__all__ = ["fit_temperature", "fit_decision_rule", "TEMPERATURE_BOUNDS"]

logger = logging.getLogger(__name__)

#: The temperature search interval of :func:`fit_temperature`.
TEMPERATURE_BOUNDS = (0.05, 20.0)
# The smallest threshold a fitted rule may hold (a DecisionRule needs thresholds > 0).
_MIN_THRESHOLD = 1e-12


def _as_labels(labels: npt.ArrayLike, task: str, n: int, k: int) -> NDArray[np.int64]:
    """Validate labels against N samples and K model outputs; return them as int64.

    binary: (N,) in {0, 1}; multiclass: (N,) in [0, K); multilabel: (N, K) in {0, 1}.
    """
    y = np.asarray(labels)
    want = (n, k) if task == "multilabel" else (n,)
    if y.shape != want:
        raise DataError(
            f"{task} labels must have shape {want} to match the predictions, got {y.shape}; "
            + ("multilabel labels are an (N, K) 0/1 matrix" if task == "multilabel" else "pass class indices")
        )
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(
            f"labels must be integers, got dtype {y.dtype}; map label names to class indices first"
        )
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise DataError(
            "labels must be whole numbers (class indices or 0/1); found a fractional or NaN value"
        )
    yi = y.astype(np.int64)
    hi = k if task == "multiclass" else 2
    if yi.size and (yi.min() < 0 or yi.max() >= hi):
        allowed = f"0..{hi - 1}" if task == "multiclass" else "0 or 1"
        raise DataError(
            f"{task} labels must be {allowed}, found values {yi.min()}..{yi.max()}; check the label mapping"
        )
    return yi


def _as_probs(probs: npt.ArrayLike, task: str) -> NDArray[np.float64]:
    """Validate probabilities (binary (N, 2), multiclass (N, K >= 2), multilabel (N, K >= 1))."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise DataError(f"probabilities must be 2-D (N, K), got shape {p.shape}")
    k = p.shape[1]
    if task == "binary" and k != 2:
        raise DataError(
            f"binary probabilities must have shape (N, 2) ([1 - p, p]), got {p.shape}; "
            "use edgeclf.runtime.postprocess.probabilities(logits, 'binary')"
        )
    if task == "multiclass" and k < 2:
        raise DataError(f"multiclass probabilities need K >= 2 columns, got shape {p.shape}")
    if task == "multilabel" and k < 1:
        raise DataError(f"multilabel probabilities need K >= 1 columns, got shape {p.shape}")
    if p.shape[0] == 0:
        raise DataError("no samples: probabilities are empty; the validation set must not be empty")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise DataError("probabilities must be finite and in [0, 1]; pass probabilities, not logits")
    return p


def _class_name(k: int, label_names: Sequence[str] | None) -> str:
    if label_names is not None and 0 <= k < len(label_names):
        return f"{label_names[k]!r} (index {k})"
    return f"index {k}"


def _nll(z: NDArray[np.float64], y: NDArray[np.int64], task: str, temperature: float) -> float:
    """Mean negative log-likelihood of labels `y` under logits `z` / `temperature` (per sample)."""
    s = z / temperature
    if task == "multiclass":
        m = s.max(axis=1)
        lse = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
        return float(np.mean(lse - s[np.arange(s.shape[0]), y]))
    # Binary cross-entropy with logits: log(1 + e^s) - y s, summed over labels (one for binary).
    yy = y[:, None] if task == "binary" else y
    return float(np.mean(np.sum(np.logaddexp(0.0, s) - yy * s, axis=1)))


def _separated(z: NDArray[np.float64], y: NDArray[np.int64], task: str) -> bool:
    """Whether every validation item is classified with a positive margin: its true class's logit above every other
    class's (softmax), or each logit's sign agreeing with its label (sigmoid: binary, every multilabel entry). Exactly
    then the NLL keeps falling towards 0 as T -> 0; one item at or past the boundary keeps it from 0 (or sends it to
    infinity), so a fit at the lower bound is then a real optimum, not a sign of an easy set."""
    if task == "multiclass":
        rows = np.arange(z.shape[0])
        true = z[rows, y]
        other = z.copy()
        other[rows, y] = -np.inf
        return bool(np.all(true > other.max(axis=1)))
    yy = y[:, None] if task == "binary" else y
    return bool(np.all(np.where(yy == 1, z, -z) > 0))


def fit_temperature(logits: npt.ArrayLike, labels: npt.ArrayLike, task: str) -> float:
    """The temperature T > 0 that minimises the validation negative log-likelihood of softmax/sigmoid(z / T).

    Temperature scaling (Guo et al. 2017) rescales all logits by one scalar, so it changes confidence
    but never the ranking (AUC) or the argmax. The search is a bounded 1-D minimisation (scipy
    ``minimize_scalar``, method "bounded") over log T in log(TEMPERATURE_BOUNDS) = [log 0.05, log 20];
    the NLL is convex in 1/T, so the minimum in the interval is the global one there. Perfectly separated
    validation data (every item's true-class margin > 0, see `_separated`: the NLL falls towards 0 as
    T -> 0) returns 1.0 with a warning, before any search, rather than an overconfident T; on data that is
    not separated, a result at the lower bound (a very underconfident model) returns the bound, with a
    warning. A result at the upper bound is returned and logged.

    Returns 1.0 (no scaling) on degenerate input, logging why: binary/multiclass labels with a single
    class present; multilabel labels where no label has both values. Raises DataError for empty or
    mismatched inputs and ConfigError for an unknown task or a logits shape that does not fit it.
    """
    from scipy.optimize import minimize_scalar

    _check_task(task)
    z = np.asarray(logits, dtype=np.float64)
    # Reuse the runtime's shape/finiteness validation so that the two sides agree on what logits are.
    probabilities(z, task)
    n, k = z.shape
    if n == 0:
        raise DataError("no samples: logits are empty; fit the temperature on a non-empty validation set")
    y = _as_labels(labels, task, n, k)
    if task == "multilabel":
        informative = (y.min(axis=0) != y.max(axis=0)).any()
        if not informative:
            logger.warning(
                "fit_temperature: no label has both positives and negatives in the validation set; "
                "returning T = 1.0 (no scaling)"
            )
            return 1.0
    elif np.unique(y).size < 2:
        logger.warning(
            "fit_temperature: only class %d is present in the validation labels; returning T = 1.0 (no scaling)",
            int(y[0]),
        )
        return 1.0

    if _separated(z, y, task):
        # Perfectly separated validation data: every term of the NLL falls as T -> 0, so the "fit" only says the set
        # is too easy to calibrate on. Decided before the search: with large margins the NLL underflows to 0 over a
        # stretch of T and the bounded search can stop inside it (the demo's bundle got T = 0.084, 12x sharper, with
        # no warning). Sharpening would make the model claim certainty on unseen images; leave the logits unscaled.
        logger.warning(
            "fit_temperature: the validation set is perfectly separated (the NLL keeps falling towards the lower bound "
            "%g); keeping T = 1.0, since such a set cannot show how confident the model should be",
            TEMPERATURE_BOUNDS[0],
        )
        return 1.0
    lo, hi = math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1])
    res = minimize_scalar(
        lambda log_t: _nll(z, y, task, math.exp(log_t)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-5},
    )
    t = float(math.exp(float(res.x)))
    before, after = _nll(z, y, task, 1.0), _nll(z, y, task, t)
    if after > before:  # cannot happen for a converged search on a convex objective; be safe anyway
        logger.warning("fit_temperature: search did not improve on T = 1 (NLL %.4f); keeping 1.0", before)
        return 1.0
    if abs(float(res.x) - lo) < 1e-3:
        # A real optimum at or below the bound (the set is not separated, see above): the model is far too unsure
        # of itself (e.g. near-zero logits from an early best epoch). The bound itself is the best temperature on
        # offer (the NLL rises with T above an optimum below it); T = 1 would be the worst.
        t = float(TEMPERATURE_BOUNDS[0])
        logger.warning(
            "fit_temperature: T = %g is the lower edge of the search interval [%g, %g] (validation NLL %.4f -> %.4f): "
            "the model's logits are far too small; the validation set is not separated, so the bound is used",
            t, *TEMPERATURE_BOUNDS, before, _nll(z, y, task, t),
        )
        return t
    if abs(float(res.x) - hi) < 1e-3:
        logger.warning(
            "fit_temperature: T = %.3g is at the upper edge of the search interval [%g, %g] (validation NLL %.4f -> %.4f): "
            "the model's scores barely tell the validation classes apart, so every probability is flattened towards "
            "uniform and most frames will sit near the decision threshold (borderline, often abstaining); train longer "
            "or on more data, or check that the validation labels match the images",
            t, *TEMPERATURE_BOUNDS, before, after)
    logger.info("fit_temperature: T = %.4f, validation NLL %.4f -> %.4f (n = %d)", t, before, after, n)
    return t


def _highest_threshold(scores: NDArray[np.float64], is_pos: NDArray[np.bool_], target: float) -> float:
    """The highest t with mean(scores[is_pos] >= t) >= target (is_pos must have a positive)."""
    pos = np.sort(scores[is_pos])[::-1]  # descending
    n_pos = pos.shape[0]
    # The m-th highest positive score keeps m positives at or above it; m/P >= target needs m = ceil(target P).
    # Round first so that e.g. 0.9 * 10 = 9.000000000000002 asks for 9 positives, not 10.
    m = min(n_pos, max(1, math.ceil(round(target * n_pos, 9))))
    return float(pos[m - 1])


def _operating_threshold(scores: NDArray[np.float64], is_pos: NDArray[np.bool_], target: float) -> float:
    """The best specificity reachable at sensitivity >= target; among thresholds giving that
    specificity, the one with the highest sensitivity, placed midway between the neighbouring
    negative and positive scores (a margin on both sides instead of sitting on a validation score).

    The highest threshold alone would, on well-separated data, cut off (1 - target) of the positives
    for no gain in specificity.
    """
    t_hi = _highest_threshold(scores, is_pos, target)
    neg_below = scores[~is_pos & (scores < t_hi)]
    floor = float(neg_below.max()) if neg_below.size else 0.0
    # Every threshold in (floor, t_hi] keeps the same negatives out; the lowest positive in that range
    # is where sensitivity stops rising.
    pos_in = scores[is_pos & (scores > floor) & (scores <= t_hi)]
    return (floor + float(pos_in.min())) / 2.0 if pos_in.size else t_hi


OBJECTIVES = ("sensitivity", "accuracy")


def _accuracy_threshold(scores: NDArray[np.float64], is_pos: NDArray[np.bool_]) -> float:
    """The threshold with the highest accuracy of `scores >= t` (midway between neighbouring scores);
    among equally accurate ones, the one nearest 0.5 (calibrated probabilities: the Bayes cut)."""
    s = np.unique(scores)
    cuts = np.concatenate([[s[0] / 2.0], (s[:-1] + s[1:]) / 2.0, [(s[-1] + 1.0) / 2.0]])
    pos = np.sort(scores[is_pos])
    neg = np.sort(scores[~is_pos])
    # correct = positives at or above t + negatives below t
    correct = (len(pos) - np.searchsorted(pos, cuts, side="left")) + np.searchsorted(neg, cuts, side="left")
    best = np.flatnonzero(correct == correct.max())
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def fit_decision_rule(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    task: str,
    *,
    target_sensitivity: float = 0.9,
    positive: int = 1,
    label_names: Sequence[str] | None = None,
    objective: str = "sensitivity",
) -> DecisionRule:
    """Fit the operating point on validation probabilities for a target sensitivity.

    binary: one threshold on p[:, positive] giving the highest validation specificity at a
        sensitivity >= target; among such thresholds, the highest sensitivity, midway between the
        neighbouring negative and positive scores (see `_operating_threshold`); rule "threshold".
    multiclass: per class k, the same one-vs-rest threshold t_k on p_k; rule "max-ratio" (decide
        argmax_k p_k / t_k).
    multilabel: per label, the same; rule "multilabel" (label k present iff p_k >= t_k).

    Thresholds are midpoints between neighbouring validation scores (floored at 1e-12 because a rule
    needs t > 0). Note that
    for "max-ratio" the per-class thresholds are fitted one-vs-rest: the argmax couples the classes,
    so the final per-class sensitivities are close to, not guaranteed at, the target.

    objective "accuracy" instead fits the most accurate operating point on validation: binary and
    multilabel, the threshold with the highest validation accuracy (per label); multiclass, plain
    argmax (equal thresholds). The rule then records no target sensitivity.

    Raises DataError naming a class (or label) that has no positives in the validation set (fix the
    split, e.g. stratify it), and ConfigError for a bad target, positive or task. `label_names`, if
    given, is only used in messages.
    """
    _check_task(task)
    if objective not in OBJECTIVES:
        raise ConfigError(f"operating point objective {objective!r} is unknown; allowed: {', '.join(OBJECTIVES)}")
    if isinstance(target_sensitivity, bool) or not isinstance(target_sensitivity, (int, float, np.floating)):
        raise ConfigError(f"target_sensitivity must be a number in (0, 1], got {target_sensitivity!r}")
    target = float(target_sensitivity)
    if not (0.0 < target <= 1.0):
        raise ConfigError(f"target_sensitivity must be in (0, 1], got {target_sensitivity!r}; e.g. 0.9")
    if task == "binary" and (isinstance(positive, bool) or positive not in (0, 1)):
        raise ConfigError(f"positive must be 0 or 1 (the index of the positive class), got {positive!r}")
    p = _as_probs(probs, task)
    n, k = p.shape
    y = _as_labels(labels, task, n, k)

    if task == "binary":
        columns = [(int(positive), p[:, positive], y == positive)]
    elif task == "multiclass":
        columns = [(c, p[:, c], y == c) for c in range(k)]
    else:
        columns = [(c, p[:, c], y[:, c] == 1) for c in range(k)]

    if objective == "accuracy":
        if task == "multiclass":
            thresholds_acc = [1.0 / k] * k
        else:
            thresholds_acc = [max(_MIN_THRESHOLD, _accuracy_threshold(scores, is_pos)) for _, scores, is_pos in columns]
        return DecisionRule(kind=rule_kind_for_task(task), thresholds=tuple(thresholds_acc),
                            positive=int(positive) if task == "binary" else None, target_sensitivity=None)

    thresholds = []
    what = "label" if task == "multilabel" else "class"
    for c, scores, is_pos in columns:
        if not is_pos.any():
            raise DataError(
                f"{what} {_class_name(c, label_names)} has no positive samples in the validation set, so no "
                f"threshold can be fitted for it; every {what} needs positives there: fix the split (stratify it)"
            )
        t = _operating_threshold(scores, is_pos, target)
        if t < _MIN_THRESHOLD:
            achieved = float(np.mean(scores[is_pos] >= _MIN_THRESHOLD))
            logger.warning(
                "fit_decision_rule: %s %s needs a threshold of %.3g to reach sensitivity %.3f; using %g, "
                "which reaches %.3f on the validation set",
                what,
                _class_name(c, label_names),
                t,
                target,
                _MIN_THRESHOLD,
                achieved,
            )
            t = _MIN_THRESHOLD
        thresholds.append(t)
        logger.info(
            "fit_decision_rule: %s %s threshold %.6g (validation sensitivity %.4f, %d positives)",
            what,
            _class_name(c, label_names),
            t,
            float(np.mean(scores[is_pos] >= t)),
            int(is_pos.sum()),
        )
    return DecisionRule(
        kind=rule_kind_for_task(task),
        thresholds=tuple(thresholds),
        positive=int(positive) if task == "binary" else None,
        target_sensitivity=target,
    )
