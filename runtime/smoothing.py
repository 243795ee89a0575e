"""Temporal postprocessing for cine: smooth per-frame probabilities so the shown label is stable.

A classifier run frame by frame on an ultrasound cine gives a label that flickers whenever one frame is
noisy (probe lift-off, a shadow, a speckle burst). :class:`CineSmoother` turns the per-frame
probabilities into the label a clinician is shown, in four steps per frame:

1. **Quality gate.** A frame that failed the gate (``quality_ok=False``) does not touch the running
   average or the dwell count, and gives an explicit abstain whose reason is the gate's reason(s).
2. **Exponential smoothing.** ``avg = alpha * probs + (1 - alpha) * avg``; ``alpha`` is per frame, a
   time constant of about ``1 / alpha`` frames. After construction or :meth:`CineSmoother.reset` the
   average starts at the rule's neutral point, on its decision boundary (binary: ``p_pos = t``;
   multiclass: ``p_k`` proportional to ``t_k``, uniform for equal thresholds), so the first frame weighs
   ``alpha`` like every other and a noisy first frame cannot pick the first label.
3. **Decision at the bundle's operating point, with hysteresis.** The candidate label is the bundle's
   :class:`~edgeclf.runtime.postprocess.DecisionRule` applied to the *smoothed* probabilities
   (a binary bundle's threshold, a multiclass bundle's max-ratio thresholds; never a plain argmax unless
   the rule is one). A candidate ``c`` other than the shown label ``s`` must clear the decision boundary
   by ``hysteresis`` in probability units: ``avg[c] - avg[s] * t_c / t_s >= hysteresis`` (equal
   thresholds: ``avg[c] >= avg[s] + hysteresis``). For a binary rule with threshold ``t`` on the positive
   class this is a band around the operating point: the label turns positive when
   ``p_pos >= t + hysteresis * (1 - t)`` and negative again when ``p_pos < t * (1 - hysteresis)``.
4. **Minimum dwell.** The same candidate must qualify on ``min_dwell_frames`` consecutive (gate-passing)
   frames before the shown label changes. The first label (after construction or a reset) must clear the
   margin against every other label for the same count; until then the result abstains with
   ``"settling"`` (also while two classes stay within the margin of each other, up to the limit below).

No label is held against the rule for ever: when the rule's winner on the smoothed probabilities has been one
other label for ``HOLD_LIMIT`` x ``min_dwell_frames`` consecutive frames, that label is shown even if it never
clears the margin (with max-ratio thresholds a rare class can win by ratio with a probability below the margin,
and hysteresis then held the old label while a third class led it by far). The same bound applies to the first
label: a stream the rule decides the same way on every frame, just beside the operating point (0.507 against a
0.5067 threshold), shows that label after ``HOLD_LIMIT`` x ``min_dwell_frames`` frames instead of settling for ever.
A single outlier frame cannot do this unless the two labels' steady averages lie within about 3e-4 of each other
(cine defaults), where either is honest.

Finally, a frame abstains with ``"low_confidence"`` when the smoothed probability of the label that would
be shown (the committed one, which hysteresis may hold while another leads; before the first label, the top
one) is below ``min_confidence``. An abstaining result has ``shown_label=None``; the label the smoother has
committed to is kept, so a short run of bad frames does not restart the dwell. A longer run of gate-failed
frames, more than ``min_dwell_frames`` in a row (a probe lifted off), resets the smoother (counted in
``counts["resets"]``): the first good frame after it abstains with ``"settling"`` instead of showing the
label from before the gap as current.

Single-frame outliers: from a steady state in which the shown label wins, one outlying frame can keep
another label ahead by the margin for at most :func:`max_outlier_lead` ``(alpha, hysteresis)`` frames
(whatever the thresholds), so with ``min_dwell_frames`` above that it never changes the shown label,
nor picks the first one after a reset. The cine defaults (alpha 0.3, hysteresis 0.1, dwell 5; lead at
most 4) satisfy this; a sustained clear change of class (0.9 -> 0.9 elsewhere) shows on the 7th frame,
~0.23 s at 30 fps and ~0.47 s at 15 fps
(:meth:`SmoothingConfig.for_fps` derives the values from a frame rate and a time constant instead).
Single images (portable X-ray, one image per exam) use :data:`SINGLE_IMAGE`: alpha 1, dwell 1,
hysteresis 0, which makes the shown label exactly ``decide(probs, rule)`` of each image. Independent images
(two films may be two patients) go through :meth:`CineSmoother.update_still`: each is decided as the first frame of
a fresh smoother and shares no state with any other, so an image the gate stopped has no smoothed probabilities
(None) and no label change, never the image's before it.

Multilabel bundles are not smoothed by this class (there is no single shown label).
Python 3.8 compatible, numpy only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime.postprocess import DecisionRule, decide_frame

if TYPE_CHECKING:  # only for annotations: bundle is not needed to smooth
    from edgeclf.runtime.bundle import Manifest

__all__ = [
    "SmoothingConfig",
    "SmoothedResult",
    "CineSmoother",
    "CINE",
    "SINGLE_IMAGE",
    "max_outlier_lead",
    "ABSTAIN_LOW_CONFIDENCE",
    "ABSTAIN_SETTLING",
    "ABSTAIN_QUALITY",
]

logger = logging.getLogger(__name__)

ABSTAIN_LOW_CONFIDENCE = "low_confidence"
ABSTAIN_SETTLING = "settling"
ABSTAIN_QUALITY = "quality"  # used only when the gate failed a frame without giving a reason
_PROB_TOLERANCE = 1e-3  # how far from [0, 1] / sum 1 a probability vector may stray (float32 models)
HOLD_LIMIT = 4  # x min_dwell_frames: frames the rule may pick another label before it is shown (module doc)


def _num(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.floating, np.integer))


def max_outlier_lead(alpha: float, hysteresis: float) -> int:
    """The most consecutive frames one outlying frame can keep another label ahead by the margin.

    Worst case: the shown label only just wins in the steady state and the outlier gives the other label
    probability 1; its lead over the boundary is ``alpha * (1 - alpha) ** n`` on the n-th frame
    (n = 0 for the outlier itself), which must stay >= ``hysteresis``. ``min_dwell_frames`` greater than
    this means an isolated single-frame outlier never changes the shown label. With ``hysteresis`` 0 the
    lead never ends in theory (returns a large number).
    """
    a, h = float(alpha), float(hysteresis)
    if a >= 1.0:
        return 1 if h <= 1.0 else 0
    if h <= 0.0:
        return 1 << 30
    if a < h:
        return 0
    return int(math.floor(math.log(h / a) / math.log(1.0 - a))) + 1


@dataclass(frozen=True)
class SmoothingConfig:
    """Validated smoothing settings (see the module docstring).

    alpha: weight of the newest frame in the running average, in (0, 1]; 1 = no smoothing.
    hysteresis: margin in probability units a new label must clear, in [0, 1).
    min_dwell_frames: consecutive frames a new label must lead before it is shown, >= 1.
    min_confidence: abstain "low_confidence" below this smoothed probability of the shown label, in [0, 1);
        0 = never.
    """

    alpha: float = 0.3
    hysteresis: float = 0.1
    min_dwell_frames: int = 5
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        a, h, d, c = self.alpha, self.hysteresis, self.min_dwell_frames, self.min_confidence
        if not _num(a) or not (0.0 < float(a) <= 1.0):
            raise ConfigError(f"smoothing.alpha is {a!r}; allowed: a number in (0, 1] (1 = no smoothing), e.g. 0.3")
        if not _num(h) or not (0.0 <= float(h) < 1.0):
            raise ConfigError(f"smoothing.hysteresis is {h!r}; allowed: a number in [0, 1) (0 = none), e.g. 0.1")
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or int(d) < 1:
            raise ConfigError(f"smoothing.min_dwell_frames is {d!r}; allowed: a whole number >= 1 (1 = no dwell), e.g. 5")
        if not _num(c) or not (0.0 <= float(c) < 1.0):
            raise ConfigError(f"smoothing.min_confidence is {c!r}; allowed: a number in [0, 1) (0 = never abstain)")
        object.__setattr__(self, "alpha", float(a))
        object.__setattr__(self, "hysteresis", float(h))
        object.__setattr__(self, "min_dwell_frames", int(d))
        object.__setattr__(self, "min_confidence", float(c))

    @classmethod
    def for_fps(
        cls, fps: float, *, time_constant_s: float = 0.1, dwell_s: float = 0.15, hysteresis: float = 0.1,
        min_confidence: float = 0.0,
    ) -> SmoothingConfig:
        """Settings for a cine at `fps` frames per second: ``alpha = 1 - exp(-1 / (fps * time_constant_s))``
        and a dwell of ``dwell_s`` seconds, raised if needed so a single-frame outlier never changes the
        shown label (``min_dwell_frames > max_outlier_lead(alpha, hysteresis)``)."""
        if not _num(fps) or not (float(fps) > 0 and math.isfinite(float(fps))):
            raise ConfigError(f"smoothing fps is {fps!r}; allowed: a frame rate > 0, e.g. 30")
        for key, v in (("time_constant_s", time_constant_s), ("dwell_s", dwell_s)):
            if not _num(v) or not (float(v) >= 0 and math.isfinite(float(v))):
                raise ConfigError(f"smoothing.{key} is {v!r}; allowed: seconds >= 0")
        f = float(fps)
        alpha = 1.0 if time_constant_s == 0 else 1.0 - math.exp(-1.0 / (f * float(time_constant_s)))
        alpha = min(1.0, max(alpha, 1e-3))
        dwell = max(1, int(round(float(dwell_s) * f)))
        if hysteresis > 0 and dwell > 1:
            dwell = max(dwell, max_outlier_lead(alpha, hysteresis) + 1)
        return cls(alpha=alpha, hysteresis=hysteresis, min_dwell_frames=dwell, min_confidence=min_confidence)

    def to_dict(self) -> Dict[str, Any]:
        return {"alpha": self.alpha, "hysteresis": self.hysteresis, "min_dwell_frames": self.min_dwell_frames,
                "min_confidence": self.min_confidence}


#: Cine (ultrasound, 15-30 fps): ~3-frame time constant, 0.1 margin, 5-frame dwell.
CINE = SmoothingConfig()
#: Single images (portable X-ray): no smoothing, no hysteresis, no dwell; the shown label is decide() of each image.
SINGLE_IMAGE = SmoothingConfig(alpha=1.0, hysteresis=0.0, min_dwell_frames=1)


@dataclass(frozen=True, eq=False)  # eq=False: it holds an array
class SmoothedResult:
    """What to show for one frame.

    shown_label: the label to show, None when abstaining.
    shown_confidence: the smoothed probability of `shown_label`; None when abstaining.
    smoothed_probs: (K,) float64, the running average after this frame (unchanged by a gate-failed frame of
        a cine: the average its clip holds through the gap; the rule's neutral point before the first
        gate-passing frame); None for a gate-failed still (:meth:`CineSmoother.update_still`).
    abstain / abstain_reason: "low_confidence", "settling", or the quality gate's reason(s) joined by
        ","; None when not abstaining.
    changed: `shown_label` differs from the previous result's (abstaining counts as None; a reset does not
        forget the previous result); False on the very first frame when it abstains. A still has no previous
        result: True when it shows a label, False when it abstains.
    """

    shown_label: Optional[str]
    shown_confidence: Optional[float]
    smoothed_probs: Optional[NDArray[np.float64]]
    abstain: bool
    abstain_reason: Optional[str]
    changed: bool


class CineSmoother:
    """Stateful smoother for one stream (see the module docstring). Not thread-safe; one per source.

    labels: the bundle's class names (K >= 2); probabilities passed to :meth:`update` are (K,) in
        this order (binary: ``[1 - p, p]`` as ``probabilities(..., "binary")`` gives them).
    rule: the bundle's operating point ("threshold" for binary, "max-ratio" for multiclass); None =
        plain argmax (equal thresholds).
    config: a :class:`SmoothingConfig`; the keyword arguments override its fields.
    """

    def __init__(
        self,
        labels: Sequence[str],
        *,
        alpha: Optional[float] = None,
        hysteresis: Optional[float] = None,
        min_dwell_frames: Optional[int] = None,
        min_confidence: Optional[float] = None,
        rule: Optional[DecisionRule] = None,
        config: SmoothingConfig = CINE,
    ) -> None:
        self.labels: Tuple[str, ...] = tuple(str(x) for x in labels)
        k = len(self.labels)
        if k < 2:
            raise ConfigError(f"smoothing needs at least 2 labels, got {list(self.labels)!r}; pass the bundle's labels")
        over: Dict[str, Any] = {}
        for key, v in (("alpha", alpha), ("hysteresis", hysteresis), ("min_dwell_frames", min_dwell_frames),
                       ("min_confidence", min_confidence)):
            if v is not None:
                over[key] = v
        cfg = config if not over else SmoothingConfig(**{**config.to_dict(), **over})
        self.config = cfg
        if rule is None:
            rule = DecisionRule("max-ratio", (1.0,) * k)
        if rule.kind == "multilabel":
            raise ConfigError(
                "smoothing supports binary and multiclass bundles, got a multilabel decision rule; "
                "run a multilabel bundle without smoothing"
            )
        if rule.kind == "threshold" and k != 2:
            raise ConfigError(f"a binary ('threshold') rule needs exactly 2 labels, got {k}: {list(self.labels)!r}")
        if rule.kind == "max-ratio" and len(rule.thresholds) != k:
            raise ConfigError(
                f"the decision rule has {len(rule.thresholds)} thresholds but there are {k} labels; "
                "pass the bundle's labels and its decision rule together"
            )
        self.rule = rule
        if rule.kind == "threshold":
            t = rule.thresholds[0]
            pos = int(rule.positive if rule.positive is not None else 1)
            self._pos = pos
            self._t = t
        else:
            self._pos = -1
            self._t = 0.0
        # Plain floats, not arrays: per frame this is arithmetic on a handful of numbers, where numpy's
        # per-call cost would be most of the time (the results are the same float64 operations).
        self._th: Tuple[float, ...] = tuple(float(v) for v in rule.thresholds)
        if self._pos >= 0:
            prior = [0.0, 0.0]
            prior[self._pos], prior[1 - self._pos] = self._t, 1.0 - self._t
        else:
            total = float(np.sum(np.asarray(self._th, np.float64)))
            prior = [v / total for v in self._th]
        self._prior: Tuple[float, ...] = tuple(prior)
        #: Counts since construction (reset() keeps them): frames; abstains by kind (quality_failed,
        #: low_confidence, settling); label_changes (the committed label switched); resets.
        self.counts: Dict[str, int] = {"frames": 0, "quality_failed": 0, "low_confidence": 0, "settling": 0,
                                       "label_changes": 0, "resets": 0}
        self._last_shown: Optional[str] = None
        self._gate_failed = 0  # consecutive gate-failed frames (reset() keeps it: one reset per gap)
        self.reset()
        self.counts["resets"] = 0

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, *, config: Optional[SmoothingConfig] = None, min_confidence: Optional[float] = None,
    ) -> CineSmoother:
        """A smoother for a bundle: its labels, its decision rule and (unless given) its min_confidence.
        `config` defaults to :data:`CINE`; pass :data:`SINGLE_IMAGE` for X-ray."""
        floor = manifest.min_confidence if min_confidence is None else min_confidence
        return cls(manifest.labels, rule=manifest.decision, config=config or CINE, min_confidence=floor)

    # ----------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget the average, the shown label and the dwell (call when the source changes or reconnects)."""
        self._avg: Tuple[float, ...] = self._prior
        self._shown: Optional[int] = None
        self._candidate: Optional[int] = None
        self._streak = 0
        self._overruled: Tuple[Optional[int], int] = (None, 0)  # the rule's winner other than the shown label, frames in a row
        self.counts["resets"] += 1

    @property
    def committed_label(self) -> Optional[str]:
        """The label the smoother has settled on (shown unless the frame abstains), or None."""
        return None if self._shown is None else self.labels[self._shown]

    # ----------------------------------------------------------------- decision

    def _decide(self, p: Sequence[float]) -> int:
        return decide_frame(p, self.rule)

    def _clears_margin(self, p: Sequence[float], c: int, s: int) -> bool:
        h = self.config.hysteresis
        if self._pos >= 0:  # the binary band around the operating point (see the module docstring)
            if c == self._pos:
                return bool(p[self._pos] >= self._t + h * (1.0 - self._t))
            return bool(p[self._pos] < self._t * (1.0 - h))
        excess = p[c] - p[s] * self._th[c] / self._th[s]
        return bool(excess >= h)

    def _check_probs(self, probs: Optional[npt.ArrayLike]) -> Tuple[float, ...]:
        if probs is None:
            raise DataError("smoothing got no probabilities for a frame that passed the quality gate; pass them")
        k = len(self.labels)
        if isinstance(probs, tuple) and len(probs) == k and all(type(v) is float for v in probs):
            q = probs  # the pipeline's own frame_probabilities: no array round trip
            if all(-_PROB_TOLERANCE <= v <= 1 + _PROB_TOLERANCE for v in q) and abs(math.fsum(q) - 1.0) <= _PROB_TOLERANCE * k:
                return q
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim == 2 and p.shape[0] == 1:
            p = p[0]
        if p.shape != (k,):
            raise DataError(
                f"smoothing expects probabilities of shape ({k},) for labels {list(self.labels)!r}, got {p.shape}; "
                "pass one frame's probabilities"
            )
        if not np.all(np.isfinite(p)) or p.min() < -_PROB_TOLERANCE or p.max() > 1 + _PROB_TOLERANCE \
                or abs(float(p.sum()) - 1.0) > _PROB_TOLERANCE * k:
            raise DataError(
                f"smoothing expects probabilities in [0, 1] summing to 1, got {np.round(p, 4).tolist()}; "
                "pass probabilities(logits, task), not logits"
            )
        return tuple(p.tolist())

    def update(
        self, probs: Optional[npt.ArrayLike], quality_ok: bool = True,
        reasons: Union[str, Sequence[str], None] = (),
    ) -> SmoothedResult:
        """Add one frame: probs (K,) float (or (1, K)) in label order; `quality_ok` False with the gate's
        `reasons` (a string or a sequence of strings) makes the frame abstain without touching the state
        (`probs` may then be None, for a pipeline that skips inference on such frames).

        Abstain reasons, first match wins: the gate's reasons, "low_confidence", "settling". Raises
        DataError for a wrong shape or values that are not probabilities (the frame is then not counted).
        """
        if probs is not None or quality_ok:
            p = self._check_probs(probs)
        self.counts["frames"] += 1
        cfg = self.config
        if not quality_ok:
            self.counts["quality_failed"] += 1
            self._gate_failed += 1
            if self._gate_failed == cfg.min_dwell_frames + 1:
                # A long gap (probe lifted): what was shown before it is no longer current; settle afresh.
                self.reset()
            if isinstance(reasons, str):
                why = reasons
            else:
                why = ",".join(str(r) for r in (reasons or ()))
            return self._result(None, True, why or ABSTAIN_QUALITY)

        self._gate_failed = 0
        a, b = cfg.alpha, 1.0 - cfg.alpha
        avg = tuple(a * v + b * o for v, o in zip(p, self._avg))
        self._avg = avg
        c = self._decide(avg)
        s = self._shown
        if s is None:  # the first label: a margin over every other one
            qualifies = all(self._clears_margin(avg, c, r) for r in range(len(self.labels)) if r != c)
        else:
            qualifies = c != s and self._clears_margin(avg, c, s)
        if not qualifies or c == s:
            self._candidate, self._streak = None, 0
        elif c == self._candidate:
            self._streak += 1
        else:
            self._candidate, self._streak = c, 1
        # The rule's winner other than the shown one (or before the first label, the winner), and for how many frames
        # in a row (HOLD_LIMIT, module doc): the bound holds for the first label as for a change.
        held = (c, self._overruled[1] + 1 if self._overruled[0] == c else 1) if c != s else (None, 0)
        self._overruled = held
        if held[1] >= HOLD_LIMIT * cfg.min_dwell_frames:
            self._candidate, self._streak = c, cfg.min_dwell_frames
        if self._candidate is not None and self._streak >= cfg.min_dwell_frames:
            if s is not None:
                self.counts["label_changes"] += 1
                logger.debug("smoothed label %s -> %s", self.labels[s], self.labels[c])
            self._shown, self._candidate, self._streak, self._overruled = c, None, 0, (None, 0)

        # The floor applies to what is shown: the committed label's smoothed probability (hysteresis may hold it
        # while another label leads); before the first label, to the top one.
        if (max(avg) if self._shown is None else avg[self._shown]) < cfg.min_confidence:
            self.counts["low_confidence"] += 1
            return self._result(None, True, ABSTAIN_LOW_CONFIDENCE)
        if self._shown is None:
            self.counts["settling"] += 1
            return self._result(None, True, ABSTAIN_SETTLING)
        return self._result(self._shown, False, None)

    def update_still(
        self, probs: Optional[npt.ArrayLike], quality_ok: bool = True,
        reasons: Union[str, Sequence[str], None] = (),
    ) -> SmoothedResult:
        """Add one independent image (an X-ray film, an image file, a single-frame file of a folder): its result
        is the one a fresh smoother gives for it as its first frame (with :data:`SINGLE_IMAGE` settings
        ``decide(probs, rule)``, or a low_confidence abstain), and this smoother's stream state (average,
        committed label, dwell, gap count, previous result) is neither read nor changed, so nothing of one
        image reaches another's result, nor a cine's around it. An image the gate stopped (`quality_ok`
        False) has ``smoothed_probs`` None and ``changed`` False. Counted in `counts` as a frame (never as a
        reset or a label change). Arguments and errors as :meth:`update`.
        """
        stream = (self._avg, self._shown, self._candidate, self._streak, self._overruled, self._last_shown,
                  self._gate_failed)
        resets = self.counts["resets"]
        self._avg, self._shown, self._candidate, self._streak, self._overruled = self._prior, None, None, 0, (None, 0)
        self._last_shown, self._gate_failed = None, 0
        try:
            res = self.update(probs, quality_ok, reasons)
        finally:
            (self._avg, self._shown, self._candidate, self._streak, self._overruled, self._last_shown,
             self._gate_failed) = stream
            self.counts["resets"] = resets
        if not quality_ok:  # not inferred: the fresh average is only the rule's neutral point, not this image's
            res = dataclasses.replace(res, smoothed_probs=None)
        return res

    def _result(self, shown: Optional[int], abstain: bool, reason: Optional[str]) -> SmoothedResult:
        avg = self._avg
        label = None if shown is None else self.labels[shown]
        changed = label != self._last_shown
        self._last_shown = label
        return SmoothedResult(
            shown_label=label,
            shown_confidence=None if shown is None else float(avg[shown]),
            smoothed_probs=np.array(avg, np.float64),
            abstain=abstain,
            abstain_reason=reason,
            changed=changed,
        )

    def record_fields(self, result: SmoothedResult, *, ndigits: int = 6) -> Dict[str, Any]:
        """The per-frame record fields for `result` (JSON-ready): label, abstain, abstain_reason (only when
        abstaining), confidence, smoothed_probs {label: p} (None for a still the gate stopped), label_changed."""
        out: Dict[str, Any] = {"label": result.shown_label, "abstain": result.abstain}
        if result.abstain:
            out["abstain_reason"] = result.abstain_reason
        out["confidence"] = None if result.shown_confidence is None else round(result.shown_confidence, ndigits)
        sp = result.smoothed_probs
        out["smoothed_probs"] = None if sp is None else {n: round(v, ndigits) for n, v in zip(self.labels, sp.tolist())}
        out["label_changed"] = result.changed
        return out
