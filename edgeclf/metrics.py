"""Evaluate a classifier's probabilities and decisions, and plot ROC curves and confusion matrices.

Workstation side: scikit-learn for the point metrics, matplotlib (Agg, imported inside the plotting
functions) for the figures. All results are plain JSON-serialisable Python values; a metric that is
undefined on the given data (e.g. the sensitivity of a class with no samples) is None.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from edgeclf.calibration import _as_labels, _as_probs, _check_task
from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime.postprocess import DecisionRule, decide, rule_kind_for_task

__all__ = ["evaluate_predictions", "expected_calibration_error", "plot_roc", "plot_confusion", "ECE_BINS", "decision_metrics",
           "clip_metrics", "abstained_frames"]

logger = logging.getLogger(__name__)

#: Number of equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
# Bootstrap work is done in chunks of at most this many (resample x sample) cells to bound memory.
_BOOT_CELLS = 2_000_000


def _check_names(label_names: Sequence[str], task: str, k: int) -> list[str]:
    names = [str(n) for n in label_names] if not isinstance(label_names, str) else [label_names]
    want = 2 if task == "binary" else k
    if len(names) != want:
        raise ConfigError(
            f"{task} needs {want} label names ({'both classes' if task == 'binary' else 'one per output'}), "
            f"got {len(names)}: {names}; pass the label list the model was trained with"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"label names must be unique, got {names}")
    return names


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _ece_top_label(conf: NDArray[np.float64], correct: NDArray[np.bool_], n_bins: int) -> float:
    """sum_b n_b / N |accuracy_b - mean confidence_b| over equal-width bins (lo, hi] of [0, 1]."""
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    acc = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)
    cf = np.bincount(bins, weights=conf, minlength=n_bins)
    return float(np.sum(np.abs(acc - cf)) / conf.shape[0])


def expected_calibration_error(
    probs: npt.ArrayLike, labels: npt.ArrayLike, task: str, *, n_bins: int = ECE_BINS
) -> float:
    """Expected calibration error with `n_bins` equal-width bins.

    binary/multiclass: top-label ECE (confidence = max_k p_k, correct = argmax == label).
    multilabel: the mean over labels of each label's binary top-label ECE (confidence max(p, 1 - p),
    correct = (p >= 0.5) == label).
    """
    _check_task(task)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    p = _as_probs(probs, task)
    y = _as_labels(labels, task, p.shape[0], p.shape[1])
    if task == "multilabel":
        conf = np.maximum(p, 1.0 - p)
        correct = (p >= 0.5) == (y == 1)
        return float(np.mean([_ece_top_label(conf[:, j], correct[:, j], n_bins) for j in range(p.shape[1])]))
    return _ece_top_label(p.max(axis=1), np.argmax(p, axis=1) == y, n_bins)


def _weighted_auc(
    scores: NDArray[np.float64], is_pos: NDArray[np.bool_], counts: NDArray[np.float64]
) -> NDArray[np.float64]:
    """ROC AUC (Mann-Whitney, ties count 1/2) of each row of sample weights `counts` (B, N); NaN if undefined.

    With all-ones weights this equals sklearn's roc_auc_score; with bootstrap counts it is the AUC of
    the resample, computed for all B resamples at once in O(B N).
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos = is_pos[order]
    c = counts[:, order]
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # last index of each group of tied scores
    cum_p = np.cumsum(c * pos, axis=1)[:, ends]
    cum_n = np.cumsum(c * ~pos, axis=1)[:, ends]
    w_p = np.diff(cum_p, axis=1, prepend=0.0)
    w_n = np.diff(cum_n, axis=1, prepend=0.0)
    # Each positive beats the negatives in lower groups and ties half of those in its own group.
    num = np.sum(w_p * (cum_n - 0.5 * w_n), axis=1)
    den = cum_p[:, -1] * cum_n[:, -1]
    out = np.full(counts.shape[0], np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def _bootstrap_macro_auc(
    columns: list[tuple[NDArray[np.float64], NDArray[np.bool_]]], n: int, n_boot: int, seed: int,
    group_of: NDArray[np.int64] | None = None,
) -> NDArray[np.float64]:
    """Macro AUC of each bootstrap resample over samples, or over groups when `group_of` (N,) gives each
    sample's group index (a cluster bootstrap: every sample weighs as often as its group was drawn);
    resamples where a class is absent are dropped."""
    rng = np.random.default_rng(seed)
    m = n if group_of is None else int(group_of.max()) + 1
    chunk = max(1, _BOOT_CELLS // max(n, 1))
    kept = []
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, m, size=(b, m))
        counts = np.bincount((idx + (np.arange(b) * m)[:, None]).ravel(), minlength=b * m).reshape(b, m)
        counts_f = (counts if group_of is None else counts[:, group_of]).astype(np.float64)
        aucs = np.stack([_weighted_auc(s, p, counts_f) for s, p in columns], axis=1)  # (b, classes)
        macro = aucs.mean(axis=1)
        kept.append(macro[np.isfinite(macro)])
        done += b
    return np.concatenate(kept) if kept else np.zeros(0)


def evaluate_predictions(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    task: str,
    rule: DecisionRule,
    label_names: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of probabilities `probs` against `labels`, with decisions made by `rule`.

    Returns a JSON-serialisable dict:
        n, task, label_names;
        accuracy: fraction of correct decisions (multilabel: exact-match ratio, plus label_accuracy,
            the mean per-label accuracy);
        balanced_accuracy: mean per-class sensitivity over classes present (multilabel: mean over
            labels of (sensitivity + specificity) / 2);
        auc: {macro, macro_ci95: [lo, hi] | None, n_boot, n_boot_used, per_class: {name: auc}}; one-vs-rest
            per class (binary: only the positive class, which is also the macro); the CI is a percentile
            bootstrap over samples, or over `groups` when given (frames of one clip, near copies of one
            image: not independent), skipping resamples where a class lacks positives or negatives
            (n_boot_used counts the rest; bootstrap_unit says which); classes whose AUC is undefined on
            the full data are left out of macro;
        per_class: {name: {sensitivity, specificity, support}} at the rule's decisions;
        confusion_matrix: rows true, columns predicted, (K, K) (binary: 2 x 2); multilabel: one
            [[tn, fp], [fn, tp]] per label, (K, 2, 2);
        ece: expected calibration error (see :func:`expected_calibration_error`, 15 bins);
        operating_point: rule.to_dict().
    """
    from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix, roc_auc_score

    _check_task(task)
    if not isinstance(rule, DecisionRule):
        raise ConfigError(f"rule must be a DecisionRule, got {type(rule).__name__}")
    if rule.kind != rule_kind_for_task(task):
        raise ConfigError(
            f"decision rule kind {rule.kind!r} does not fit task {task!r}; it needs {rule_kind_for_task(task)!r}"
        )
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ConfigError(f"n_boot must be an integer >= 0 (0 = no confidence interval), got {n_boot!r}")
    p = _as_probs(probs, task)
    n, k = p.shape
    if task != "binary" and len(rule.thresholds) != k:
        raise ConfigError(
            f"the decision rule has {len(rule.thresholds)} thresholds but the predictions have {k} columns; "
            "refit the rule for this model"
        )
    y = _as_labels(labels, task, n, k)
    names = _check_names(label_names, task, k)
    pred = decide(p, rule)

    out: dict[str, Any] = {"n": int(n), "task": task, "label_names": names}

    # Decisions: accuracy, per-class sensitivity/specificity, confusion.
    per_class: dict[str, dict[str, Any]] = {}
    balanced: list[float] = []
    if task == "multilabel":
        yb = y == 1
        out["accuracy"] = float(np.mean(np.all(pred == yb, axis=1)))
        out["label_accuracy"] = float(np.mean(pred == yb))
        cms = multilabel_confusion_matrix(yb.astype(np.int64), pred.astype(np.int64))
        for j, name in enumerate(names):
            (tn, fp), (fn, tp) = cms[j]
            sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
            per_class[name] = {"sensitivity": sens, "specificity": spec, "support": int(tp + fn)}
            if sens is not None and spec is not None:
                balanced.append((sens + spec) / 2)
        confusion = cms.astype(int).tolist()
    else:
        out["accuracy"] = float(np.mean(pred == y))
        cm = confusion_matrix(y, pred, labels=list(range(len(names))))
        total = int(cm.sum())
        for j, name in enumerate(names):
            tp = int(cm[j, j])
            support = int(cm[j, :].sum())
            fp = int(cm[:, j].sum()) - tp
            tn = total - support - fp
            sens = _ratio(tp, support)
            per_class[name] = {"sensitivity": sens, "specificity": _ratio(tn, tn + fp), "support": support}
            if sens is not None:
                balanced.append(sens)
        confusion = cm.astype(int).tolist()
    out["balanced_accuracy"] = float(np.mean(balanced)) if balanced else None

    # Ranking: per-class one-vs-rest AUC and a bootstrap CI of the macro.
    if task == "binary":
        pos = int(rule.positive if rule.positive is not None else 1)
        cols = [(pos, p[:, pos], y == pos)]
    elif task == "multiclass":
        cols = [(j, p[:, j], y == j) for j in range(k)]
    else:
        cols = [(j, p[:, j], y[:, j] == 1) for j in range(k)]
    auc_per: dict[str, float | None] = {}
    defined: list[tuple[NDArray[np.float64], NDArray[np.bool_]]] = []
    for j, scores, is_pos in cols:
        if is_pos.all() or not is_pos.any():
            logger.warning(
                "AUC of %r is undefined: the evaluation set has %s of it",
                names[j],
                "only samples" if is_pos.all() else "no samples",
            )
            auc_per[names[j]] = None
            continue
        auc_per[names[j]] = float(roc_auc_score(is_pos, scores))
        defined.append((scores, is_pos))
    values = [v for v in auc_per.values() if v is not None]
    macro = float(np.mean(values)) if values else None
    ci: list[float] | None = None
    used = 0
    if defined and n_boot > 0:
        group_of = None
        if groups is not None:
            if len(groups) != n:
                raise ConfigError(f"{len(groups)} groups for {n} samples; give one group per sample")
            group_of = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1).astype(np.int64)
        boots = _bootstrap_macro_auc(defined, n, n_boot, seed, group_of)
        used = int(boots.shape[0])
        # One unit (one clip, one group): every resample is the sample itself, a zero-width "interval" that says
        # nothing about how the figure varies between units. None, as for too few usable resamples.
        units = n if group_of is None else int(group_of.max()) + 1
        if used >= 2 and units >= 2:
            lo, hi = np.percentile(boots, [2.5, 97.5])
            ci = [float(lo), float(hi)]
        if used < n_boot:
            logger.info("AUC bootstrap: %d of %d resamples used (the rest lacked a class)", used, n_boot)
    out["auc"] = {
        "macro": macro,
        "macro_ci95": ci,
        "n_boot": int(n_boot),
        "n_boot_used": used,
        "bootstrap_unit": "group" if groups is not None else "item",
        "per_class": auc_per,
    }
    out["per_class"] = per_class
    out["confusion_matrix"] = confusion
    out["ece"] = expected_calibration_error(p, y, task)
    out["operating_point"] = rule.to_dict()
    return out


def abstained_frames(probs: npt.ArrayLike, min_confidence: float, decisions: npt.ArrayLike | None = None) -> NDArray[np.bool_]:
    """(N,) bool: the frames `edgeclf run` abstains on, those whose decided class's probability is below
    `min_confidence` (0 = none): the label shown must itself reach the floor, as on the run's display
    (edgeclf.runtime.smoothing) and in its clip summary (edgeclf.runtime.clips.ClipAggregator). `decisions` (N,) are
    the frames' decided classes under the bundle's rule; without them, the argmax (an argmax rule's decision). With a
    threshold operating point below the floor, the calls between the two abstain. probs (N, K); for multilabel
    probabilities (no one decided class) pass no decisions: the top probability is used."""
    p = np.asarray(probs, dtype=np.float64)
    if min_confidence <= 0 or p.shape[0] == 0:
        return np.zeros(p.shape[0], bool)
    if decisions is None:
        return np.asarray(p.max(axis=1) < min_confidence)
    d = np.asarray(decisions, dtype=np.int64).reshape(-1)
    if d.shape[0] != p.shape[0] or (len(d) and (d.min() < 0 or d.max() >= p.shape[1])):
        raise ConfigError(f"decisions must give each of the {p.shape[0]} frames a class in 0..{p.shape[1] - 1}")
    return np.asarray(p[np.arange(len(d)), d] < min_confidence)


def _clustered(labels: npt.ArrayLike, decisions: npt.ArrayLike, label_names: Sequence[str], clusters: Sequence[str], unit: str,
               *, n_boot: int, seed: int) -> dict[str, Any]:
    """The intervals of decision_metrics bootstrapped over `clusters` (one key per item: its source, its copy group),
    for the "clustered" entry beside the per-item intervals."""
    m = decision_metrics(labels, decisions, label_names, groups=clusters, n_boot=n_boot, seed=seed)
    return {"unit": unit, "clusters": len(set(clusters)),
            **{k: m.get(k) for k in ("accuracy_ci95", "balanced_accuracy_ci95", "balanced_accuracy_n_boot_used")}}


def _balanced(y: NDArray[np.int64], pred: NDArray[np.int64], k: int) -> float:
    sens = [np.mean(pred[y == c] == c) for c in range(k) if (y == c).any()]
    return float(np.mean(sens)) if sens else float("nan")


def decision_metrics(
    labels: npt.ArrayLike,
    decisions: npt.ArrayLike,
    label_names: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class sensitivity and the confusion matrix of class decisions
    (N,) int against labels (N,) int; a decision of -1 is an abstention (counted, left out of the figures).

    The 95% intervals are percentile bootstraps over `groups` when given (a cluster bootstrap: frames of one
    clip are not independent), else over items.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    d = np.asarray(decisions, dtype=np.int64).reshape(-1)
    if y.shape != d.shape:
        raise ConfigError(f"{y.shape[0]} labels but {d.shape[0]} decisions; give one decision per item")
    names = [str(n) for n in label_names]
    k = len(names)
    g = np.asarray(groups if groups is not None else np.arange(len(y)).astype(str))
    keep = d >= 0
    y, d, g = y[keep], d[keep], g[keep]
    out: dict[str, Any] = {"n": int(len(y)), "abstained": int((~keep).sum())}
    if len(y) == 0:
        return {**out, "accuracy": None, "balanced_accuracy": None, "per_class": {}, "confusion_matrix": []}
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y, d), 1)
    out["accuracy"] = float(np.mean(y == d))
    out["balanced_accuracy"] = _balanced(y, d, k)
    out["per_class"] = {
        names[c]: {"sensitivity": _ratio(cm[c, c], cm[c].sum()), "precision": _ratio(cm[c, c], cm[:, c].sum()),
                   "support": int(cm[c].sum())}
        for c in range(k)
    }
    out["confusion_matrix"] = cm.tolist()
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        uniq, inv = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inv == j) for j in range(len(uniq))]
        present = np.unique(y)
        acc, bal = [], []
        for _ in range(n_boot):
            idx = np.concatenate([members[j] for j in rng.integers(0, len(uniq), len(uniq))])
            acc.append(np.mean(y[idx] == d[idx]))
            # A resample missing a class would average fewer sensitivities (another statistic): left out and
            # counted, as the AUC bootstrap does.
            if len(np.unique(y[idx])) == len(present):
                bal.append(_balanced(y[idx], d[idx], k))
        one = len(uniq) < 2  # one unit: every resample is the sample itself, no interval (see evaluate_predictions)
        out["accuracy_ci95"] = None if one else [float(np.quantile(acc, 0.025)), float(np.quantile(acc, 0.975))]
        out["balanced_accuracy_ci95"] = ([float(np.quantile(bal, 0.025)), float(np.quantile(bal, 0.975))]
                                         if bal and not one else None)
        out["balanced_accuracy_n_boot_used"] = len(bal)
        out["n_boot"] = int(n_boot)
        out["bootstrap_unit"] = "group" if groups is not None else "item"
    return out


def clip_metrics(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    frame_ids: Sequence[str],
    rules: DecisionRule | Sequence[DecisionRule],
    label_names: Sequence[str],
    *,
    folds: Sequence[int] | None = None,
    min_confidence: float = 0.0,
    n_boot: int = 1000,
    seed: int = 0,
    clusters: Mapping[str, str] | None = None,
    cluster_unit: str = "source",
    stopped: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """Clip-level figures from frame probabilities (N, K) and frame ids `clip#j`, aggregated by
    `edgeclf.runtime.clips.aggregate_clip` (mean probability and majority vote, abstained frames excluded),
    with frame-level figures beside them (bootstrapped over clips). Pooled out-of-fold predictions pass
    one rule per fold and each frame's fold in `folds`.

    clusters: clip -> where it came from (e.g. its source). Clips of one source share a scanner, a screen
    layout and often a patient, so they are not independent: the clip figures then also carry intervals
    bootstrapped over those clusters ("clustered"), wider and the honest ones for a new site.

    stopped: per frame, whether `edgeclf run` would not classify it (its quality gate, a sector not locked yet):
    abstained, in the frame figure and in its clip's aggregation (a None frame), whatever its probabilities."""
    from edgeclf.runtime.clips import aggregate_clip, clip_of, group_frames

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    rule_list = [rules] if isinstance(rules, DecisionRule) else list(rules)
    if len(frame_ids) != len(y):
        raise ConfigError(f"{len(frame_ids)} frame ids for {len(y)} labels; give one id per frame")
    # Each frame must name one of the rules: a fold without a rule would leave its frames at -1 (counted as
    # abstained) and give its clips another fold's operating point (rule_list[-1]), silently.
    if folds is None and len(rule_list) != 1:
        raise ConfigError(f"{len(rule_list)} decision rules without folds; pass each frame's fold (an index into the rules)")
    fold = np.zeros(len(y), np.int64) if folds is None else np.asarray(folds, np.int64).reshape(-1)
    if len(fold) != len(y) or (len(fold) and (fold.min() < 0 or fold.max() >= len(rule_list))):
        raise ConfigError(f"folds must give each of the {len(y)} frames a fold in 0..{len(rule_list) - 1} (one per rule)")
    frame_dec = np.full(len(y), -1, np.int64)
    for f, rule in enumerate(rule_list):
        sel = fold == f
        if sel.any():
            frame_dec[sel] = decide(p[sel], rule)
    gate = np.zeros(len(y), bool) if stopped is None else np.asarray(stopped, bool).reshape(-1)
    if len(gate) != len(y):
        raise ConfigError(f"{len(gate)} stopped flags for {len(y)} frames; give one per frame")
    frame_dec[abstained_frames(p, min_confidence, frame_dec) | gate] = -1
    clips = group_frames(frame_ids)
    clip_ids = [clip_of(i) for i in frame_ids]
    per_clip, cy, cmean, cvote = [], [], [], []
    for cid, rows in clips.items():
        labs = set(y[rows].tolist())
        if len(labs) != 1:
            raise DataError(f"clip {cid} has frames of several classes {sorted(labs)}; clip labels must be one class")
        if len(set(fold[rows].tolist())) != 1:  # its frames were decided by several rules: the clip has no one rule
            raise DataError(f"clip {cid} has frames in several folds {sorted(set(fold[rows].tolist()))}; a clip is held out whole")
        res = aggregate_clip([None if gate[r] else p[r] for r in rows], rule=rule_list[int(fold[rows[0]])],
                             min_confidence=min_confidence)
        cy.append(int(y[rows[0]]))
        cmean.append(-1 if res.mean is None else res.mean)
        cvote.append(-1 if res.vote is None else res.vote)
        per_clip.append({"clip": cid, "label": str(label_names[cy[-1]]),
                         "mean": None if res.mean is None else str(label_names[res.mean]),
                         "vote": None if res.vote is None else str(label_names[res.vote]),
                         "frames": res.frames, "used": res.used,
                         "mean_probs": None if res.mean_probs is None else [round(v, 4) for v in res.mean_probs],
                         **({"fold": int(fold[rows[0]])} if folds is not None else {})})
    out: dict[str, Any] = {
        "clips": len(per_clip),
        "frames": int(len(y)),
        "aggregation": "mean probability (the decision rule on the mean) and majority vote; abstained frames excluded",
        "clip_mean": decision_metrics(cy, cmean, label_names, n_boot=n_boot, seed=seed),
        "clip_vote": decision_metrics(cy, cvote, label_names, n_boot=n_boot, seed=seed),
        "frame": decision_metrics(y, frame_dec, label_names, groups=clip_ids, n_boot=n_boot, seed=seed),
        "per_clip": per_clip,
    }
    if clusters is not None and n_boot > 0:
        keys = [str(clusters.get(c["clip"], c["clip"])) for c in per_clip]  # a clip without one is its own cluster
        for name, dec in (("clip_mean", cmean), ("clip_vote", cvote)):
            out[name]["clustered"] = _clustered(cy, dec, label_names, keys, cluster_unit, n_boot=n_boot, seed=seed)
    return out


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png", bbox_inches="tight")  # long class names must not be cut off


def plot_roc(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    task: str,
    label_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    positive: int = 1,
) -> None:
    """Write a PNG with one ROC curve per class (binary: the `positive` class), AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    _check_task(task)
    p = _as_probs(probs, task)
    n, k = p.shape
    y = _as_labels(labels, task, n, k)
    names = _check_names(label_names, task, k)
    if task == "binary":
        if isinstance(positive, bool) or positive not in (0, 1):
            raise ConfigError(f"positive must be 0 or 1, got {positive!r}")
        cols = [(positive, p[:, positive], y == positive)]
    elif task == "multiclass":
        cols = [(j, p[:, j], y == j) for j in range(k)]
    else:
        cols = [(j, p[:, j], y[:, j] == 1) for j in range(k)]

    fig = _new_figure(6.0, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for j, scores, is_pos in cols:
        if is_pos.all() or not is_pos.any():
            ax.plot([], [], label=f"{names[j]} (AUC undefined: one class only)")
            continue
        fpr, tpr, _ = roc_curve(is_pos, scores)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{names[j]} (AUC {roc_auc_score(is_pos, scores):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"ROC ({task}, n = {n})")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def _draw_matrix(ax: Any, cm: NDArray[np.int64], ticks: Sequence[str], title: str) -> None:
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    half = cm.max() / 2.0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(int(cm[i, j])),
                ha="center",
                va="center",
                color="white" if cm[i, j] > half else "black",
            )
    ax.set_xticks(range(len(ticks)))
    ax.set_yticks(range(len(ticks)))
    ax.set_xticklabels(
        ticks, rotation=45 if len(ticks) > 3 else 0, ha="right" if len(ticks) > 3 else "center"
    )
    ax.set_yticklabels(ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)


def plot_confusion(
    confusion: npt.ArrayLike, label_names: Sequence[str], path: str | os.PathLike[str], *, title: str = ""
) -> None:
    """Write an annotated confusion matrix PNG (rows true, columns predicted).

    `confusion` is (K, K) with K label names, or, for multilabel, (K, 2, 2) per-label matrices (as in
    evaluate_predictions' "confusion_matrix"), drawn as one panel per label.
    """
    cm = np.asarray(confusion)
    names = [str(n) for n in label_names]
    if cm.size and not np.issubdtype(cm.dtype, np.number):
        raise DataError(f"confusion must hold counts, got dtype {cm.dtype}")
    cm = cm.astype(np.int64)
    if cm.ndim == 2 and cm.shape == (len(names), len(names)) and len(names) > 0:
        fig = _new_figure(max(4.0, 0.8 * len(names) + 2.5), max(3.5, 0.8 * len(names) + 2.0))
        _draw_matrix(fig.add_subplot(1, 1, 1), cm, names, title)
    elif cm.ndim == 3 and cm.shape == (len(names), 2, 2) and len(names) > 0:
        cols = min(4, len(names))
        rows = -(-len(names) // cols)
        fig = _new_figure(3.2 * cols, 3.0 * rows + (0.4 if title else 0.0))
        for j, name in enumerate(names):
            _draw_matrix(fig.add_subplot(rows, cols, j + 1), cm[j], ["absent", "present"], name)
        if title:
            fig.suptitle(title)
    else:
        raise DataError(
            f"confusion of shape {cm.shape} does not fit {len(names)} label names; pass a (K, K) matrix or, "
            "for multilabel, (K, 2, 2) per-label matrices, with K names"
        )
    fig.tight_layout()
    _save(fig, path)
