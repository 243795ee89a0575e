"""The accuracy gate for compressed variants: each candidate against its own fp32 parent, paired.

Both models see the same validation inputs, so every comparison is paired: the bootstrap resamples
images once and recomputes parent and candidate figures on the same resample. A drop counts only
when it exceeds the limit *and* its paired 95% interval excludes zero, so one flipped case among a
few dozen does not decide alone; the numbers are reported either way.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeclf.metrics import _weighted_auc
from edgeclf.runtime.postprocess import DecisionRule, decide, probabilities

__all__ = ["gate_candidate"]


def _columns(probs: np.ndarray, labels: np.ndarray, task: str, rule: DecisionRule) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class index, scores, is_positive) per class scored by AUC (binary: the positive class only)."""
    if task == "binary":
        pos = int(rule.positive if rule.positive is not None else 1)
        return [(pos, probs[:, pos], labels == pos)]
    if task == "multilabel":
        return [(k, probs[:, k], labels[:, k] == 1) for k in range(probs.shape[1])]
    return [(k, probs[:, k], labels == k) for k in range(probs.shape[1])]


def _hits(decisions: np.ndarray, labels: np.ndarray, task: str, k: int) -> np.ndarray:
    """Per sample: 1 where a true member of class k was decided as k, else 0."""
    if task == "multilabel":
        return (decisions[:, k] & (labels[:, k] == 1)).astype(np.float64)
    return ((decisions == k) & (labels == k)).astype(np.float64)


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
    ids: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare a candidate's validation outputs with its fp32 parent's; returns the gate record.

    Record: decision agreement and the disagreeing samples; macro AUC of both, the drop and its paired
    95% interval; per class the sensitivity of both at the recorded operating point, the drop and its
    interval; `passed` and, when it fails, `failed_on` naming the metric.
    """
    pp = probabilities(parent_logits, task, temperature)
    pc = probabilities(cand_logits, task, temperature)
    dp, dc = decide(pp, rule), decide(pc, rule)
    same = (dp == dc).all(axis=1) if dp.ndim == 2 else dp == dc
    n = len(labels)
    ids = list(ids) if ids is not None else [str(i) for i in range(n)]
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(np.float64)
    counts = np.vstack([np.ones((1, n)), counts])  # row 0: the sample itself

    cols_p, cols_c = _columns(pp, labels, task, rule), _columns(pc, labels, task, rule)
    auc_p = np.nanmean(np.stack([_weighted_auc(s, y, counts) for _, s, y in cols_p], axis=1), axis=1)
    auc_c = np.nanmean(np.stack([_weighted_auc(s, y, counts) for _, s, y in cols_c], axis=1), axis=1)
    checks: list[dict[str, Any]] = [_drop("auc_macro", auc_p, auc_c, max_drop)]
    for k, _, is_pos in cols_p:
        if not is_pos.any():
            continue
        support = counts @ is_pos.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens_p = (counts @ _hits(dp, labels, task, k)) / support
            sens_c = (counts @ _hits(dc, labels, task, k)) / support
        checks.append(_drop(f"sensitivity[{label_names[k]}]", sens_p, sens_c, max_drop))
    failed = [c["metric"] for c in checks if not c["passed"]]
    return {
        "max_drop": max_drop,
        "n": int(n),
        "decision_agreement": float(same.mean()) if n else 1.0,
        "disagreements": [ids[i] for i in np.flatnonzero(~same)],
        "checks": checks,
        "passed": not failed,
        "failed_on": failed,
        "rule": "fail when drop > max_drop and the paired bootstrap 95% interval of the drop excludes 0",
        "n_boot": n_boot,
    }


def _drop(metric: str, parent: np.ndarray, cand: np.ndarray, max_drop: float) -> dict[str, Any]:
    """Row 0 holds the point estimates, the rest the paired bootstrap resamples."""
    d = parent - cand
    boot = d[1:][np.isfinite(d[1:])]
    lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5])) if boot.size else (float("nan"), float("nan"))
    drop = float(d[0])
    significant = bool(boot.size) and lo > 0
    return {
        "metric": metric,
        "parent": float(parent[0]),
        "candidate": float(cand[0]),
        "drop": drop,
        "drop_ci95": [lo, hi],
        "passed": not (drop > max_drop and significant),
    }
