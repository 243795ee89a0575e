"""The accuracy gate for compressed variants: each candidate against its own fp32 parent, paired.

Both models see the same validation inputs, so every comparison is paired: the bootstrap resamples
once and recomputes parent and candidate figures on the same resample. The unit resampled is the image,
or, where the caller passes `groups` (the frames of one clip, the near copies of one picture), the group:
correlated frames drawn as if independent would make the interval too narrow. The record says which
(`unit`: "image", "clip" or "group", and `n_units`).

A drop counts when it exceeds the limit *and* its paired 95% interval excludes zero, so one flipped
case among a few dozen does not decide alone; a drop above the hard ceiling (`ceiling`) fails whatever its
interval, because with three or fewer flips in one direction ~5% of resamples miss them all and the
interval touches zero however large the drop. The numbers are reported either way. Decisions must
also agree with the parent's on at least `min_agreement` of the images (a plain floor).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edgeclf.errors import ConfigError
from edgeclf.metrics import _weighted_auc
from edgeclf.runtime.postprocess import DecisionRule, decide, probabilities

__all__ = ["gate_candidate", "ceiling"]

EPS = 1e-9  # k/n computed in floats: a drop of exactly max_drop or the ceiling must not fail on rounding
GROUP_UNITS = ("clip", "group")  # what a caller's groups are: the frames of a clip, or near copies (any other grouping)


def ceiling(max_drop: float) -> float:
    """The point drop that fails regardless of its interval: max(5 * max_drop, 0.05)."""
    return max(5.0 * max_drop, 0.05)


def _columns(probs: np.ndarray, labels: np.ndarray, task: str, rule: DecisionRule) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class index, scores, is_positive) per class scored by AUC (binary: the positive class only)."""
    if task == "binary":
        pos = int(rule.positive if rule.positive is not None else 1)
        return [(pos, probs[:, pos], labels == pos)]
    if task == "multilabel":
        return [(k, probs[:, k], labels[:, k] == 1) for k in range(probs.shape[1])]
    return [(k, probs[:, k], labels == k) for k in range(probs.shape[1])]


def _per_class(
    dp: np.ndarray, dc: np.ndarray, labels: np.ndarray, task: str, names: Sequence[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(metric name, members of the class, parent hits, candidate hits) for each rate the gate checks."""
    f = np.float64
    if task == "multilabel":
        for k, name in enumerate(names):
            pos, neg = labels[:, k] == 1, labels[:, k] == 0
            yield f"sensitivity[{name}]", pos, (dp[:, k] & pos).astype(f), (dc[:, k] & pos).astype(f)
            yield f"specificity[{name}]", neg, (~dp[:, k] & neg).astype(f), (~dc[:, k] & neg).astype(f)
        return
    for k, name in enumerate(names):
        member = labels == k
        yield f"sensitivity[{name}]", member, ((dp == k) & member).astype(f), ((dc == k) & member).astype(f)


def gate_candidate(
    parent_logits: np.ndarray,
    cand_logits: np.ndarray,
    labels: np.ndarray,
    task: str,
    temperature: float,
    rule: DecisionRule,
    label_names: Sequence[str],
    *,
    max_drop: float,
    min_agreement: float = 0.0,
    ids: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    group_unit: str = "group",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare a candidate's validation outputs with its fp32 parent's; returns the gate record.

    groups: (N,) each image's group (e.g. the data's `Split.groups`: its clip, or its near-copy group); the
    bootstrap then resamples groups, every image weighing as often as its group is drawn (a cluster
    bootstrap). group_unit names them in the record: "clip" or "group". Without groups, or when every group
    holds one image, images are resampled and the unit is "image".

    Record: decision agreement and the disagreeing samples; macro AUC of both, the drop and its paired
    95% interval; per class the sensitivity of both at the recorded operating point, the drop and its
    interval; `passed` and, when it fails, `failed_on` naming the metric; `unit` and `n_units` resampled.
    A check with no figure for either model (a class absent from the split: "support": 0) is recorded with
    "undefined": true, parent and candidate null, and passes: not judged, never left out.
    """
    n = len(labels)
    group_of, unit = _units(groups, n, group_unit)
    n_units = n if group_of is None else int(group_of.max()) + 1
    cand = np.asarray(cand_logits, np.float64)
    bad = np.asarray(~np.isfinite(cand).reshape(len(cand), -1).all(axis=1))
    if bad.any():  # e.g. an fp16 overflow: a failed gate, not a DataError that aborts `--precision auto`
        return {**_non_finite(parent_logits, cand, bad, task, temperature, rule, ids, max_drop, min_agreement, n_boot),
                "unit": unit, "n_units": n_units}
    pp = probabilities(parent_logits, task, temperature)
    pc = probabilities(cand_logits, task, temperature)
    dp, dc = decide(pp, rule), decide(pc, rule)
    same = (dp == dc).all(axis=1) if dp.ndim == 2 else dp == dc
    ids = list(ids) if ids is not None else [str(i) for i in range(n)]
    rng = np.random.default_rng(seed)
    m = n_units
    counts = np.stack([np.bincount(rng.integers(0, m, m), minlength=m) for _ in range(n_boot)]).astype(np.float64)
    if group_of is not None:
        counts = counts[:, group_of]  # each image weighs as often as its group was drawn
    counts = np.vstack([np.ones((1, n)), counts])  # row 0: the sample itself

    cols_p, cols_c = _columns(pp, labels, task, rule), _columns(pc, labels, task, rule)
    # The macro over the classes scorable on the whole validation set, a plain mean: a resample missing one of them
    # is NaN (skipped and counted in _drop). A nanmean there would score that resample on the other classes only,
    # another statistic that shows no drop where a rare class was harmed and pulls the interval's low end to 0.
    with warnings.catch_warnings():  # a resample (or the sample) with no class to score is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        ap = np.stack([_weighted_auc(s, y, counts) for _, s, y in cols_p], axis=1)
        ac = np.stack([_weighted_auc(s, y, counts) for _, s, y in cols_c], axis=1)
    defined = np.isfinite(ap[0]) & np.isfinite(ac[0])
    auc_p = ap[:, defined].mean(axis=1) if defined.any() else np.full(len(counts), np.nan)
    auc_c = ac[:, defined].mean(axis=1) if defined.any() else np.full(len(counts), np.nan)
    cap = ceiling(max_drop)
    checks: list[dict[str, Any]] = [_drop("auc_macro", auc_p, auc_c, max_drop, cap)]
    # Every class's sensitivity (binary: both classes, so the negative class's sensitivity is the
    # positive's specificity); multilabel: each label's sensitivity and specificity. A shifted
    # candidate that calls everything positive keeps its AUC but fails here.
    for name, member, hit_p, hit_c in _per_class(dp, dc, labels, task, label_names):
        if not member.any():  # no image to judge it on: recorded as not checked, never dropped from the record
            checks.append({**_undefined(name), "support": 0})
            continue
        support = counts @ member.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            checks.append(_drop(name, (counts @ hit_p) / support, (counts @ hit_c) / support, max_drop, cap))
    # Decision-level parity: a point floor, not a significance test. On a few dozen validation images a
    # candidate can flip a quarter of its decisions and still show no "significant" sensitivity drop.
    # Divided by each resample's own weight: a resample of groups need not hold n images.
    agree = (counts @ same.astype(np.float64)) / counts.sum(axis=1) if n else np.ones(len(counts))
    lo, hi = (float(v) for v in np.percentile(1.0 - agree[1:], [2.5, 97.5]))
    checks.append({"metric": "decision_agreement", "parent": 1.0, "candidate": float(agree[0]), "drop": float(1.0 - agree[0]),
                   "drop_ci95": [lo, hi], "floor": min_agreement, "passed": bool(agree[0] >= min_agreement - 1e-12)})
    failed = [c["metric"] for c in checks if not c["passed"]]
    return {
        "max_drop": max_drop,
        "ceiling": cap,
        "n": int(n),
        "decision_agreement": float(same.mean()) if n else 1.0,
        "disagreements": [ids[i] for i in np.flatnonzero(~same)],
        "checks": checks,
        "passed": not failed,
        "failed_on": failed,
        "min_agreement": min_agreement,
        "rule": "fail when drop > max_drop and the paired bootstrap 95% interval of the drop excludes 0, "
                "or when drop > ceiling (max(5 * max_drop, 0.05)) whatever the interval, "
                "or when decision agreement with the parent is below min_agreement",
        "n_boot": n_boot,
        "unit": unit,
        "n_units": n_units,
    }


def _units(groups: Sequence[str] | None, n: int, group_unit: str) -> tuple[np.ndarray | None, str]:
    """(each image's group index (N,), or None to resample images; the unit's name)."""
    if groups is None:
        return None, "image"
    if group_unit not in GROUP_UNITS:
        raise ConfigError(f"group unit {group_unit!r} is unknown; allowed: {', '.join(GROUP_UNITS)}")
    if len(groups) != n:
        raise ConfigError(f"{len(groups)} groups for {n} validation images; give one group per image")
    keys, group_of = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    if len(keys) == n:  # one image per group: resampling groups is resampling images
        return None, "image"
    return group_of.reshape(-1).astype(np.int64), group_unit


def _non_finite(parent_logits: np.ndarray, cand: np.ndarray, bad: np.ndarray, task: str, temperature: float, rule: DecisionRule,
                ids: Sequence[str] | None, max_drop: float, min_agreement: float, n_boot: int) -> dict[str, Any]:
    """The gate record of a candidate with NaN or infinite outputs on some images: failed on `finite_outputs`
    (the share of images without a usable output); those images count as disagreeing with the parent."""
    n, ok = len(bad), ~bad
    same = np.zeros(n, bool)
    if ok.any():
        dp = decide(probabilities(np.asarray(parent_logits)[ok], task, temperature), rule)
        dc = decide(probabilities(cand[ok], task, temperature), rule)
        same[ok] = (dp == dc).all(axis=1) if dp.ndim == 2 else dp == dc
    ids = list(ids) if ids is not None else [str(i) for i in range(n)]
    share = float(bad.mean())
    check = {"metric": "finite_outputs", "parent": 1.0, "candidate": 1.0 - share, "drop": share, "drop_ci95": [share, share],
             "n_boot_used": 0, "n_non_finite": int(bad.sum()), "passed": False}
    return {"max_drop": max_drop, "ceiling": ceiling(max_drop), "n": int(n), "decision_agreement": float(same.mean()),
            "disagreements": [ids[i] for i in np.flatnonzero(~same)], "checks": [check], "passed": False,
            "failed_on": ["finite_outputs"], "min_agreement": min_agreement,
            "rule": "fail when the candidate outputs NaN or infinity on any validation image", "n_boot": n_boot}


def _undefined(metric: str) -> dict[str, Any]:
    """A check that could not be judged (no figure for either model): passed, marked undefined, zero drop."""
    return {"metric": metric, "parent": None, "candidate": None, "drop": 0.0, "drop_ci95": [0.0, 0.0],
            "n_boot_used": 0, "undefined": True, "passed": True}


def _drop(metric: str, parent: np.ndarray, cand: np.ndarray, max_drop: float, cap: float) -> dict[str, Any]:
    """Row 0 holds the point estimates, the rest the paired bootstrap resamples."""
    if not np.isfinite(parent[0]) and not np.isfinite(cand[0]):
        # Undefined for both (a class absent from the validation split): nothing to compare, so no drop. NaN
        # would fail the gate on every candidate, a copy of the parent included, and is not valid JSON.
        return _undefined(metric)
    d = parent - cand
    boot = d[1:][np.isfinite(d[1:])]
    lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5])) if boot.size else (float("nan"), float("nan"))
    drop = float(d[0])
    significant = bool(boot.size) and lo > 0
    undefined = not np.isfinite(drop)  # a figure the candidate cannot even produce is a failure
    return {
        "metric": metric,
        "parent": float(parent[0]),
        "candidate": float(cand[0]),
        "drop": drop,
        "drop_ci95": [lo, hi],
        # Resamples lacking the class (or every class) have no figure: the interval is over the rest, counted here.
        "n_boot_used": int(boot.size),
        # 0.95 - 0.94 is 0.010000000000000009 in floats: a drop of exactly max_drop is allowed, not failed.
        "passed": not undefined and not (drop > max_drop + EPS and significant) and not drop > cap + EPS,
    }
