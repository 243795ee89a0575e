"""Clip-level decisions from frame predictions: what a clinician reads is the clip, not one frame.

Two aggregations, both over the frames that were classified (abstained frames are excluded):

- ``mean``: the mean of the frames' calibrated probabilities, then the bundle's decision rule (its
  operating point) on that mean, or argmax when no rule is given.
- ``vote``: the majority of the frames' own decisions; a tie goes to the tied class with the higher
  mean probability, then to the lower class index, so the result never depends on frame order.

A frame is abstained when it has no probabilities (the quality gate stopped it: ``None``) or when the
probability of the class it decides is below ``min_confidence`` (0 = never), the floor the run's display applies
to the label it shows. A clip whose frames all abstained has no
decision (``None``) and counts as abstained.

The same functions serve ``edgeclf evaluate`` (offline, sampled frames) and ``edgeclf run``'s end-of-clip
summary (every frame, from the result records: :func:`aggregate_records`), so the two agree on the
same frames. Multiclass and binary tasks only. Python 3.8 compatible, numpy only, never torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edgeclf.errors import ConfigError
from edgeclf.runtime.postprocess import DecisionRule, decide, decide_frame

__all__ = ["AGGREGATIONS", "ClipAggregator", "ClipDecision", "aggregate_clip", "aggregate_records", "clip_of", "group_frames"]

AGGREGATIONS: Tuple[str, ...] = ("mean", "vote")


@dataclass(frozen=True)
class ClipDecision:
    """One clip's aggregated result. Labels are class indices; None when every frame abstained."""

    mean: Optional[int]
    vote: Optional[int]
    mean_probs: Optional[Tuple[float, ...]]
    votes: Tuple[int, ...]
    frames: int
    used: int
    abstained: int
    labels: Optional[Tuple[str, ...]] = field(default=None)

    def label(self, how: str = "mean") -> Optional[int]:
        if how not in AGGREGATIONS:
            raise ConfigError(f"clip aggregation {how!r} is unknown; allowed: {', '.join(AGGREGATIONS)}")
        return self.mean if how == "mean" else self.vote

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready; keyed by label name where the labels are known, else by class index."""
        names = self.labels

        def name(k: Optional[int]) -> Any:
            return k if k is None or names is None else names[k]

        probs: Any = None
        if self.mean_probs is not None:
            rounded = [round(p, 6) for p in self.mean_probs]
            probs = dict(zip(names, rounded)) if names is not None else rounded
        return {
            "frames": self.frames, "used": self.used, "abstained": self.abstained,
            "mean_label": name(self.mean), "vote_label": name(self.vote), "mean_probs": probs,
            "votes": dict(zip(names, self.votes)) if names is not None else list(self.votes),
        }


class ClipAggregator:
    """Incremental clip aggregation in constant memory (a running sum of probabilities and vote counts), for
    a live run: `add(probs)` per frame, `result()` at any time. `aggregate_clip` is this class applied to a
    list, so offline and on-device figures come from the same arithmetic."""

    def __init__(
        self,
        *,
        rule: Optional[DecisionRule] = None,
        min_confidence: float = 0.0,
        labels: Optional[Sequence[str]] = None,
    ) -> None:
        if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) or not 0.0 <= float(min_confidence) < 1.0:
            raise ConfigError(f"min_confidence is {min_confidence!r}; allowed: a number in [0, 1) (0 = never abstain)")
        if rule is not None and rule.kind == "multilabel":
            raise ConfigError("clip aggregation applies to binary and multiclass models; a multilabel model has no single clip label")
        self.rule = rule
        self.min_confidence = float(min_confidence)
        self.labels = None if labels is None else tuple(str(x) for x in labels)
        # Plain lists: one frame's update is a few additions, cheaper than numpy calls on a live run.
        self._sum: Optional[List[float]] = None
        self._votes: Optional[List[int]] = None
        self.frames = 0
        self.used = 0

    def add(self, probs: Optional[Sequence[float]]) -> None:
        """One frame: its calibrated probabilities (K,), or None when it was not classified."""
        self.frames += 1
        if probs is None:
            return
        if isinstance(probs, (tuple, list)) and all(isinstance(v, float) for v in probs):
            a = [float(v) for v in probs]
        else:  # arrays, (1, K) nested lists, integers
            a = np.asarray(probs, np.float64).reshape(-1).tolist()
        k = len(a) if self._sum is None else len(self._sum)
        if len(a) != k:
            raise ConfigError(f"frame probabilities have {len(a)} classes after {k}; every frame of a clip needs the same classes")
        if self.labels is not None and len(self.labels) != k:
            raise ConfigError(f"{len(self.labels)} label names for {k} classes; pass the bundle's labels")
        finite = all(math.isfinite(v) for v in a)
        if not finite:  # NaN rows as before: numpy's argmax propagates NaN
            row = np.asarray(a, np.float64)[None, :]
            dec = int(decide(row, self.rule)[0]) if self.rule is not None else int(np.argmax(row))
        else:
            dec = decide_frame(a, self.rule) if self.rule is not None else max(range(k), key=a.__getitem__)
        if self.min_confidence > 0 and a[dec] < self.min_confidence:
            return  # a NaN probability fails no comparison: it is kept, as before
        if self._sum is None or self._votes is None:
            self._sum, self._votes = [0.0] * k, [0] * k
        sums = self._sum
        for j in range(k):
            sums[j] += a[j]
        self._votes[dec] += 1
        self.used += 1

    def add_record(self, record: Mapping[str, Any]) -> None:
        """One `edgeclf run` result record: its ``probs`` ({label: p} or None) is the frame's own prediction."""
        pr = record.get("probs")
        if pr is None or not isinstance(pr, Mapping):
            self.add(None if pr is None else [float(v) for v in pr])
            return
        if self.labels is None:
            raise ConfigError("records carry probabilities by label name; give the aggregator the bundle's labels")
        try:
            self.add([float(pr[n]) for n in self.labels])
        except KeyError as exc:
            raise ConfigError(f"a result record's probs lack class {exc.args[0]!r}; pass the bundle's labels {list(self.labels)}") from None

    def result(self) -> ClipDecision:
        n, names = self.frames, self.labels
        if self._sum is None or self._votes is None or self.used == 0:
            k = 0 if self._sum is None else len(self._sum)
            return ClipDecision(None, None, None, tuple([0] * (k or (len(names) if names else 0))), n, 0, n, names)
        mean = np.asarray(self._sum, np.float64) / self.used
        mean_dec = int(decide(mean[None, :], self.rule)[0]) if self.rule is not None else int(np.argmax(mean))
        votes = np.asarray(self._votes, np.int64)
        tied = np.flatnonzero(votes == votes.max())
        # Ties: the higher mean probability, then the lower index (np.argmax takes the first).
        vote = int(tied[int(np.argmax(mean[tied]))])
        return ClipDecision(mean_dec, vote, tuple(float(v) for v in mean), tuple(int(v) for v in votes), n, self.used,
                            n - self.used, names)


def aggregate_clip(
    frame_probs: Sequence[Optional[Sequence[float]]],
    *,
    rule: Optional[DecisionRule] = None,
    min_confidence: float = 0.0,
    labels: Optional[Sequence[str]] = None,
) -> ClipDecision:
    """Aggregate one clip. `frame_probs`: per frame, its calibrated probabilities (K,) (binary: (2,)) or None
    for a frame the quality gate stopped. `rule`: the bundle's decision rule ("threshold" or "max-ratio");
    frames are decided with it and so is the mean; None: argmax."""
    agg = ClipAggregator(rule=rule, min_confidence=min_confidence, labels=labels)
    for fp in frame_probs:
        agg.add(fp)
    return agg.result()


def aggregate_records(
    records: Iterable[Mapping[str, Any]],
    labels: Sequence[str],
    *,
    rule: Optional[DecisionRule] = None,
    min_confidence: float = 0.0,
) -> ClipDecision:
    """Aggregate `edgeclf run` result records (the JSONL lines) of one clip. Each record's ``probs``
    (a {label: p} dict, or None when the quality gate stopped the frame) is what counts; the smoothed
    ``label`` and the smoother's own abstentions ("settling") are not frame decisions and are ignored."""
    agg = ClipAggregator(rule=rule, min_confidence=min_confidence, labels=labels)
    for r in records:
        agg.add_record(r)
    return agg.result()


def clip_of(frame_id: str) -> str:
    """The clip of a frame id ``clip#j`` (a plain id is its own clip). Only a trailing ``#<digits>`` is the
    frame: a '#' in the clip's own file name (``pt#1.avi#0``) must not merge it with other clips."""
    s = str(frame_id)
    head, sep, tail = s.rpartition("#")
    return head if sep and tail.isdigit() else s


def group_frames(clip_ids: Sequence[str]) -> Dict[str, List[int]]:
    """Frame ids ``clip#j`` (or plain clip ids) -> {clip: [row indices]}, in first-seen order."""
    out: Dict[str, List[int]] = {}
    for i, cid in enumerate(clip_ids):
        out.setdefault(clip_of(cid), []).append(i)
    return out
