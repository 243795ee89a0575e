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
same frames. A run over several files (a DICOM folder of cines, an image folder, a watched folder) holds
several clips: :class:`FileClipAggregator` and :func:`aggregate_files` give one decision per file, as
``evaluate`` gives one per clip. Multiclass and binary tasks only. Python 3.8 compatible, numpy only, never torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edgeclf.errors import ConfigError
from edgeclf.runtime.postprocess import DecisionRule, decide, decide_frame

__all__ = [
    "AGGREGATIONS", "ClipAggregator", "ClipDecision", "FileClipAggregator", "aggregate_clip", "aggregate_files",
    "aggregate_records", "clip_of", "file_of", "group_frames",
]

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


#: The record fields that name the file a result came from (see :func:`file_of`).
FILE_KEYS: Tuple[str, ...] = ("run", "file_index", "watch_key")


def file_of(record: Mapping[str, Any]) -> Tuple[Any, ...]:
    """Which file of which run a result record came from: its (run, file_index, watch_key), each None where the
    record has none (all None: a video, camera or stream, one clip). The pipeline's smoother, sector detector and
    quality gate start afresh at a new file of a DICOM folder (pipeline._SegmentWatch): a new clip."""
    return tuple(record.get(k) for k in FILE_KEYS)


class FileClipAggregator:
    """Clip decisions of a run, one per file: consecutive records of one file (:func:`file_of`) are one clip,
    and the next file starts a new :class:`ClipAggregator`, so no decision mixes the frames of two cines.

    A file of one frame (an X-ray, a still image) is no clip: its own record is its decision; it is only counted
    (`stills`). Which files hold one frame the records say (``file_frames``, the frames the file holds): a cine the
    run read one frame of is a clip of one frame, not a still. Records without it (an image folder's, results files
    written before it was recorded) are judged by the frames they hold. Memory: a few numbers per clip held, none
    per frame. ``result()`` at any time:

    - records without a file (a video, camera or stream): ``{"decision": ...}``, one clip, as before;
    - records of files: ``{"decision", "decisions", "decisions_total", "stills"}``: ``decisions`` lists each clip (a
      file of several frames, however many of them were read) in order (the last MAX_DECISIONS of ``decisions_total``), its ``file_index``
      (``watch_key``, ``run`` where the records have them) beside the :meth:`ClipDecision.to_dict` fields; ``decision`` is that of the only clip when the run covered one file,
      else None: there is no one decision over several patients' or views' files.
    """

    MAX_DECISIONS = 1000

    def __init__(
        self,
        *,
        rule: Optional[DecisionRule] = None,
        min_confidence: float = 0.0,
        labels: Optional[Sequence[str]] = None,
    ) -> None:
        self._settings: Dict[str, Any] = {"rule": rule, "min_confidence": min_confidence, "labels": labels}
        self._current = ClipAggregator(**self._settings)  # checks the settings now
        self._key: Optional[Tuple[Any, ...]] = None
        self._file_frames: Optional[int] = None  # the frames the current file holds, where its records say
        self._last_frame: Optional[int] = None  # the file_frame of the current file's last record
        self._clips: List[Dict[str, Any]] = []  # finished clips (the last MAX_DECISIONS)
        self.clips_total = 0  # finished clips, all of them
        self.stills = 0  # finished files of one frame
        self.per_file = False  # whether the records name files

    @classmethod
    def like(cls, agg: ClipAggregator) -> FileClipAggregator:
        """One with the settings (rule, floor, labels) of `agg`; the frames `agg` holds are not taken."""
        return cls(rule=agg.rule, min_confidence=agg.min_confidence, labels=agg.labels)

    def add_record(self, record: Mapping[str, Any]) -> None:
        """One `edgeclf run` result record (see :meth:`ClipAggregator.add_record`)."""
        key = file_of(record)
        if self._key is not None and key != self._key:
            self._finish()
        self._key = key
        if any(v is not None for v in key):
            self.per_file = True
        self._current.add_record(record)
        self._file_frames, self._last_frame = _count(record.get("file_frames")), _count(record.get("file_frame"))

    def current_frames_left(self) -> Optional[bool]:
        """Whether the file of the last record has frames after it (the run stopped inside it): from the records'
        ``file_frame`` and ``file_frames``; None where they do not say (a video, older results)."""
        if self._file_frames is None or self._last_frame is None:
            return None
        return self._last_frame + 1 < self._file_frames

    def _still(self) -> bool:
        """Whether the current file is a still: it holds one frame (its records say so), else it gave one."""
        if self._file_frames is not None:
            return self._file_frames == 1
        return self._current.frames < 2

    def _entry(self) -> Optional[Dict[str, Any]]:
        """The current file's clip decision, None for a still (or before any record)."""
        if self._key is None or not self._current.frames or self._still():
            return None
        named = {k: v for k, v in zip(FILE_KEYS, self._key) if v is not None}
        return {**named, **self._current.result().to_dict()}

    def _finish(self) -> None:
        entry = self._entry()
        if entry is not None:
            self._clips.append(entry)
            self.clips_total += 1
            if len(self._clips) > self.MAX_DECISIONS:  # a cart's watched folder runs for months: bounded, counted
                del self._clips[0]
        elif self._current.frames:
            self.stills += 1
        self._current = ClipAggregator(**self._settings)
        self._file_frames = self._last_frame = None

    def result(self) -> Dict[str, Any]:
        if not self.per_file:
            return {"decision": self._current.result().to_dict()}
        entry = self._entry()
        clips = (self._clips + ([entry] if entry is not None else []))[-self.MAX_DECISIONS:]
        stills = self.stills + int(entry is None and self._current.frames > 0)
        total = self.clips_total + int(entry is not None)
        only = clips[0] if total == 1 and not stills else None
        decision = None if only is None else {k: v for k, v in only.items() if k not in FILE_KEYS}
        # decisions_total counts every clip; decisions holds the last MAX_DECISIONS (each file's frames are in the
        # results file, from which aggregate_files gives them all)
        return {"decision": decision, "decisions": clips, "decisions_total": total, "stills": stills}


def _count(value: Any) -> Optional[int]:
    """A record's frame number or count (an int, not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


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
    ``label`` and the smoother's own abstentions ("settling") are not frame decisions and are ignored.
    Records of several files or runs (:func:`file_of`) are several clips: ConfigError, never one decision
    that mixes them; :func:`aggregate_files` gives one per file."""
    agg = ClipAggregator(rule=rule, min_confidence=min_confidence, labels=labels)
    first: Optional[Tuple[Any, ...]] = None
    for r in records:
        key = file_of(r)
        if first is None:
            first = key
        elif key != first:
            raise ConfigError(
                f"the records come from more than one file or run ({_key_text(first)}, then {_key_text(key)}); "
                "one clip decision over them would mix clips; use aggregate_files for one decision per file"
            )
        agg.add_record(r)
    return agg.result()


def _key_text(key: Tuple[Any, ...]) -> str:
    return ", ".join(f"{k} {v}" for k, v in zip(FILE_KEYS, key) if v is not None) or "no file"


def aggregate_files(
    records: Iterable[Mapping[str, Any]],
    labels: Sequence[str],
    *,
    rule: Optional[DecisionRule] = None,
    min_confidence: float = 0.0,
) -> Dict[str, Any]:
    """The clip decisions of a run's result records, one per file: what ``edgeclf run``'s clip summary holds
    (its ``decision``, and for files ``decisions`` and ``stills``; see :class:`FileClipAggregator`)."""
    agg = FileClipAggregator(rule=rule, min_confidence=min_confidence, labels=labels)
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
