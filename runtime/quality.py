"""Per-frame quality gate: frozen, blank, saturated and empty-sector frames of streams; blank, saturated and empty stills.

:class:`QualityGate` looks at every 4th pixel of every 4th row of a gray frame (160x120 of a 640x480
frame, a strided view) inside the sector mask when one is given, and returns a
:class:`QualityResult`: ``ok`` and the ``reasons`` a frame should not be classified, with the
``figures`` behind them. Its median cost on this project's
2-core AMD EPYC host: 40 us for a 640x480 gray frame, 60 us in RGB, 160 us for a 607x607 RGB frame (a side that
is not a multiple of 4 takes a slower copy); more on the rare stills whose white border is measured.

Reasons (QUALITY_REASONS) and the default thresholds, calibrated on the 91 POCUS clips in
``../shared/data/pocus`` (gray levels 0-255, on the sector):

* ``"too_small"``: a side of the frame is below MIN_SIDE (8) pixels (a thumbnail, a scout image, a
  damaged file): too few pixels to judge, and to classify. The other checks are skipped; the frame
  does not touch the frozen run or the texture baseline.
* ``"blank"``: the image is black: mean <= 10 and 99th percentile <= 40 (a frozen-to-black output,
  a fade-in). Real clips reach these only on black frames.
* ``"saturated"``: >= 20% of the pixels at >= 250 (gain far too high). Real clips stay below 2%. In a still
  (a film), a white border (its collimation or shutter border, a letterbox) is left out first: in a still over the
  20%, the solid white (>= 250 with all 8 neighbours) connected to the frame's edge is a border if it is at most 75%
  of the pixels, the largest region left (the field) holds >= 20% of them and is convex (>= 0.97 of its hull) and
  rectangle-like (>= 0.85 of its smallest enclosing rectangle, turned or not), and the border lies on two opposite
  sides of the field (left and right, above and below, or all round it: at least half of the strip between the
  field's bounding box and the frame's edge, >= 2% of the frame thick); the share is then taken on the field
  ("border" in the figures). Gain far too high leaves a ragged or blob-shaped remainder, white inside the field,
  or white along one side (a near field burnt out) or in one corner, and stays saturated; so does a still white
  through and through. A stream's frame is judged on its whole share: white along a cine's edge is gain. The CR
  films RG3_J2KI/RG3_J2KR in ``../shared/data/dicom`` (45% white border, left and right; field 0.97 of its
  rectangle, 0.99 of its hull) pass; none of the 624 BUSI images (which fill the frame) made saturated by a gain
  x3 or x6 passes, nor any POCUS frame so made judged as a still. Only stills over the 20% with white on the
  frame's edge pay for the search (~0.05-0.08 ms at 152x152 subsampled, ~0.3 ms for a 1760x1760 film).
* ``"empty"`` (probe lifted, lost contact): not blank, but >= 90% of the pixels at <= 12, or the mean
  absolute difference of horizontal pairs ("texture") <= 1.0, or (streams only) below 0.3x the median
  texture of the last 32 accepted frames (refreshed every 8). The pairs lie sector width / 128 pixels apart (at least
  4), so that a bigger capture of the same scan measures the same texture. Per clip, the median texture
  of live speckle is 1.6-13 on these clips (1.5-9.1 captured at 2x), and never fell below 0.37x its
  running median. 12 frames in a row flagged by that ratio alone (the image live and textured, only
  softer: another patient, preset or gain) re-seed the baseline from them, so the gate never locks out.
* ``"frozen"`` (streams only): the mean absolute difference to the previous frame stays <= 0.25 for >= 15
  consecutive frames (not reported for blank frames). Re-encoded clips repeat frames: near-identical
  runs (difference 0-0.1) of up to 9 frames occur in the 60 fps ``Cov_denault`` clips and up to 4 in
  the ``prospective`` ones; new frames of slow, live clips differ by >= 0.2 (1st percentile ~0.3).
  The GIF clips repeat no frame (their dithering alone changes >= 0.5 per frame).

Stills (``check(..., still=True)``: an image file, a single-frame DICOM such as an X-ray exposure) are each
judged on their own: only "too_small", "blank", "saturated" and the absolute "empty" (dark share, texture
<= empty_texture) apply. A still neither reads nor changes the stream's state (previous frame, frozen run,
texture baseline, re-seeding): two alike X-rays in a row are two exposures, not a frozen scanner, and a
soft image after sharper ones (another patient) is not a lifted probe. Stills are counted in `stats`
("frames", "flagged", each reason, and "stills"); a cine checked around them goes on as though they were
never checked.

Pass the sector mask (see :mod:`edgeclf.runtime.sector`): without one the whole frame is used, and
the black screen around a fan makes "empty" fire on a normal image. ``reset()`` on a new segment
(connection, cine file): the previous frame and the baseline belong to the one before.

Python 3.8 compatible, numpy at import time, OpenCV inside the functions that use it, never torch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Mapping, Optional, Tuple

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime import _cv

__all__ = ["MIN_SIDE", "QUALITY_REASONS", "QualityConfig", "QualityGate", "QualityResult"]

logger = logging.getLogger(__name__)

QUALITY_REASONS: Tuple[str, ...] = ("too_small", "blank", "saturated", "empty", "frozen")
_STEP = 4  # subsampling: every _STEP-th pixel of every _STEP-th row
# Smallest side (pixels) the gate judges: the subsampled frame then holds >= 2x2 pixels (a horizontal pair
# for the texture). Smaller frames are flagged "too_small".
MIN_SIDE = 2 * _STEP
_BASELINE_FRAMES = 32
_BASELINE_MIN = 8
# Texture is measured between pixels sector width / _TEXTURE_SAMPLES apart (at least _STEP): the same scan captured
# at 2x gives the same texture (a fixed pixel distance measured finer detail, and less of it, on bigger captures).
_TEXTURE_SAMPLES = 128
# Frames in a row that only the baseline ratio flagged "empty" (all else fine) after which the baseline is re-seeded
# from them: a softer live image (another patient, preset, gain) must not lock the gate out for the session.
_RESEED_FRAMES = 12
# A still's white border (collimation/shutter, letterbox) is left out of "saturated" when it is at most _BORDER_MAX of
# the judged pixels, lies on two opposite sides of the field (or all round it) and the largest region left (the field)
# holds at least _FIELD_MIN of the judged pixels, _FIELD_CONVEX of its convex hull and _FIELD_RECT of its smallest
# enclosing rectangle: blades and bars leave a convex, rectangle-like field between them; gain far too high leaves a
# ragged remainder, a dark blob (a cyst, a vessel: an ellipse fills 0.79 of its rectangle), or white along one side
# (the near field) or in one corner.
_BORDER_MAX = 0.75  # RG3_J2KI's border: 0.45; four blades in (tests): 0.68
_FIELD_MIN = 0.20
_FIELD_CONVEX = 0.97
_FIELD_RECT = 0.85
# A side of the field has the border when the strip between the field's bounding box and the frame's edge there is at
# least _SIDE_MIN of the frame's extent across it (and a subsampled pixel) and at least half of it is border.
_SIDE_MIN = 0.02
_KERNEL = np.ones((3, 3), np.uint8)


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality gate (see the module docstring for how they were chosen)."""

    frozen_frames: int = 15
    frozen_diff: float = 0.25
    blank_mean: float = 10.0
    blank_p99: float = 40.0
    saturated_level: int = 250
    saturated_share: float = 0.20
    dark_level: int = 12
    empty_dark_share: float = 0.90
    empty_texture: float = 1.0
    empty_ratio: float = 0.30

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str, example: str) -> ConfigError:
            return ConfigError(f"quality.{name} is {getattr(self, name)!r}; allowed: {allowed}, e.g. {example}")

        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise bad(name, "a number", str(getattr(QualityConfig, name)))
            return float(v)

        f = self.frozen_frames
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 1 <= int(f) <= 100_000:
            raise bad("frozen_frames", "an int from 1 to 100000 (frames)", "15")
        if not 0.0 <= num("frozen_diff") <= 255.0:
            raise bad("frozen_diff", "a gray-level difference from 0 to 255", "0.25")
        for name in ("blank_mean", "blank_p99"):
            if not 0.0 <= num(name) <= 255.0:
                raise bad(name, "a gray level from 0 to 255", str(getattr(QualityConfig, name)))
        for name in ("saturated_level", "dark_level"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= 255:
                raise bad(name, "an int gray level from 0 to 255", str(getattr(QualityConfig, name)))
        for name in ("saturated_share", "empty_dark_share", "empty_ratio"):
            if not 0.0 < num(name) <= 1.0:
                raise bad(name, "a share in (0, 1]", str(getattr(QualityConfig, name)))
        if not 0.0 <= num("empty_texture") <= 255.0:
            raise bad("empty_texture", "a gray-level difference from 0 to 255", "1.0")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QualityConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"quality has unknown field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**dict(d))


@dataclass(frozen=True)
class QualityResult:
    """``ok`` iff ``reasons`` is empty; ``reasons`` ordered as QUALITY_REASONS.

    ``figures``: mean, p99 (computed only when the mean is <= blank_mean, else -1), saturated
    (share, of the field when a still's white border was left out), border (share of the pixels left out as a
    white border; 0 when none, and always for a stream's frame), dark (share), texture, diff (to the previous
    frame; -1 for the first), frozen_run (consecutive near-identical frames), baseline (running texture median; -1
    until known); a still has diff -1, frozen_run 0 and baseline -1 (none is used); a "too_small" frame only width
    and height.
    """

    ok: bool
    reasons: Tuple[str, ...]
    figures: Dict[str, float] = field(default_factory=dict)


class QualityGate:
    """Check frames one by one; keeps the previous frame and a texture baseline (one gate per stream).

    ``check(gray, sector_mask, still=False)``: `gray` (H, W) uint8 (an (H, W, 3) RGB frame is converted
    after subsampling); `sector_mask` (H, W) bool/uint8 or None for the whole frame. The mask is
    subsampled once and cached while the same array object is passed. ``still=True``: the frame is judged
    on its own (see the module docstring), the stream's state left as it was.
    """

    def __init__(self, **thresholds: Any) -> None:
        known = [f.name for f in dataclasses.fields(QualityConfig)]
        unknown = sorted(set(thresholds) - set(known))
        if unknown:
            raise ConfigError(f"unknown quality threshold(s) {unknown}; allowed: {known}")
        self.config = QualityConfig(**thresholds)
        self._cv2: Any = _cv.cv2()  # once: the import helper touches os.environ on every call
        self._nearest_exact = getattr(self._cv2, "INTER_NEAREST_EXACT", None)  # OpenCV >= 4.5
        self._clear()

    @classmethod
    def from_config(cls, config: QualityConfig) -> QualityGate:
        return cls(**config.to_dict())

    def _clear(self) -> None:
        self._counts: Dict[str, int] = {"frames": 0, "flagged": 0}
        self._counts.update({r: 0 for r in QUALITY_REASONS})
        self._counts.update(stills=0, resets=0, reseeds=0)
        self._clear_state()

    def _clear_state(self) -> None:
        self._prev: Optional[NDArray[np.uint8]] = None
        self._mask_src: Optional[NDArray[Any]] = None
        self._mask: Optional[NDArray[np.uint8]] = None  # subsampled, 0/255
        self._pairs: Optional[NDArray[np.uint8]] = None  # horizontal pairs _gap apart, both inside
        self._pairs2: Optional[NDArray[np.uint8]] = None  # ... _gap + 1 apart (None when _blend is 0)
        self._gap = 1  # texture pair distance in subsampled pixels (with _blend, see _texture)
        self._blend = 0.0
        self._count = 1.0  # pixels in the subsampled mask
        self._shape: Tuple[int, int] = (0, 0)
        self._run = 0
        self._textures: Deque[float] = deque(maxlen=_BASELINE_FRAMES)
        self._baseline = -1.0  # median of _textures, refreshed every _BASELINE_MIN accepted frames
        self._fresh = 0
        self._low: Deque[float] = deque(maxlen=_RESEED_FRAMES)  # textures of frames only the ratio flagged, in a row

    def reset(self) -> None:
        """Forget the previous frame and the baseline (a new stream or segment); the counts in `stats` go on."""
        self._clear_state()
        self._counts["resets"] += 1

    @property
    def stats(self) -> Dict[str, int]:
        """Frames checked (stills included), frames flagged, frames per reason, stills (frames checked as
        stills), resets, and reseeds (of the texture baseline); counted over every reset."""
        return dict(self._counts)

    def _masks(
        self, sector_mask: Optional[NDArray[Any]], small_shape: Tuple[int, int], full: Tuple[int, int]
    ) -> Tuple[NDArray[np.uint8], NDArray[np.uint8]]:
        if sector_mask is not None and sector_mask.shape != full:
            raise DataError(
                f"sector mask of shape {sector_mask.shape} does not match the {full[1]}x{full[0]} frame; "
                "pass the mask of the sector detected on this stream"
            )
        if self._mask is not None and self._pairs is not None and sector_mask is self._mask_src and self._shape == small_shape:
            return self._mask, self._pairs
        cv2 = self._cv2
        if sector_mask is None:
            m = np.full(small_shape, 255, np.uint8)
        else:
            m = np.ascontiguousarray(sector_mask[_STEP // 2 :: _STEP, _STEP // 2 :: _STEP] > 0).astype(np.uint8) * np.uint8(255)
        if not m[:, 1:].any() or not np.any(m[:, 1:] & m[:, :-1]):
            raise DataError("sector mask is empty (or thinner than 8 px); pass None to check the whole frame")
        pairs: NDArray[np.uint8] = cv2.bitwise_and(m[:, 1:], m[:, :-1])
        # The texture's pair distance follows the sector's width (capture size), between two whole gaps: blended.
        cols = np.flatnonzero(m.any(axis=0))
        width = float(cols[-1] - cols[0] + 1) * _STEP  # the sector's width in frame pixels
        d = max(1.0, width / _TEXTURE_SAMPLES / _STEP)  # the pair distance in subsampled pixels
        gap, blend = int(d), d - int(d)
        far = cv2.bitwise_and(m[:, gap:], m[:, :-gap]) if gap > 1 else pairs
        far2 = cv2.bitwise_and(m[:, gap + 1 :], m[:, : -gap - 1]) if blend > 0 else None
        if not far.any() or (far2 is not None and not far2.any()):
            far, far2, gap, blend = pairs, None, 1, 0.0  # too thin for the wider gap
        self._gap, self._blend, self._pairs2 = gap, blend, far2
        pairs = far
        self._mask_src, self._mask, self._pairs, self._shape = sector_mask, m, pairs, small_shape
        self._count = float(np.count_nonzero(m))
        return m, pairs

    def _subsample(self, image: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Every _STEP-th pixel from offset _STEP // 2, in gray: (h, w) uint8, contiguous."""
        cv2 = self._cv2
        h, w = image.shape[:2]
        c = image.shape[2] if image.ndim == 3 else 1
        if self._nearest_exact is not None and h % _STEP == 0 and w % _STEP == 0 and c in (1, 3):
            # INTER_NEAREST_EXACT at 1/_STEP picks source pixel _STEP * i + _STEP // 2: the same pixels as the
            # strided slice, gathered by OpenCV in a fifth of the time of copying the strided view (tested).
            sub = cv2.resize(image, (w // _STEP, h // _STEP), interpolation=self._nearest_exact)
        else:
            sub = np.ascontiguousarray(image[_STEP // 2 :: _STEP, _STEP // 2 :: _STEP])
        if sub.ndim == 3:
            sub = cv2.cvtColor(np.ascontiguousarray(sub[:, :, :3]), cv2.COLOR_RGB2GRAY) if sub.shape[2] >= 3 else sub[:, :, 0]
        return np.ascontiguousarray(sub)

    def _too_small(self, gray: NDArray[Any]) -> QualityResult:
        """A frame with a side below MIN_SIDE: flagged, nothing else measured; the stream's state is kept."""
        self._counts["frames"] += 1
        self._counts["flagged"] += 1
        self._counts["too_small"] += 1
        h, w = gray.shape[0], gray.shape[1]
        logger.debug("frame of %dx%d flagged too_small (a side below %d px)", w, h, MIN_SIDE)
        return QualityResult(False, ("too_small",), {"width": float(w), "height": float(h)})

    def check(self, gray: NDArray[Any], sector_mask: Optional[NDArray[Any]] = None, *, still: bool = False) -> QualityResult:
        """Check one frame; see QualityResult. `still`: judge it on its own (an image, not a frame of a stream): no
        "frozen", no "empty" by the baseline ratio, and the stream's state (previous frame, baseline) untouched."""
        cv2 = self._cv2
        cfg = self.config
        if gray.dtype != np.uint8 or gray.ndim not in (2, 3):
            raise DataError(f"frame of shape {gray.shape} and dtype {gray.dtype} is not supported; expected (H, W) uint8")
        if still:
            self._counts["stills"] += 1
        if min(gray.shape[0], gray.shape[1]) < MIN_SIDE:
            return self._too_small(gray)
        small = self._subsample(gray)
        mask, pairs = self._masks(sector_mask, (small.shape[0], small.shape[1]), (gray.shape[0], gray.shape[1]))

        n = self._count
        mean = float(cv2.mean(small, mask=mask)[0])
        dark = cv2.countNonZero(cv2.bitwise_and(cv2.compare(small, cfg.dark_level, cv2.CMP_LE), mask)) / n
        white = cv2.bitwise_and(cv2.compare(small, cfg.saturated_level, cv2.CMP_GE), mask)
        saturated = cv2.countNonZero(white) / n
        border = 0.0
        # A film's white border is looked for only in a still (white along a stream's edge is gain far too high) over
        # the share: the search costs ~0.05-0.3 ms.
        if still and saturated >= cfg.saturated_share:
            saturated, border = self._without_border(white, saturated, mask)
        # The 99th percentile only matters for "blank", which needs a dark mean: skip it otherwise.
        p99 = float(np.percentile(small[mask > 0], 99)) if mean <= cfg.blank_mean else -1.0
        g = self._gap
        texture = float(cv2.mean(cv2.absdiff(small[:, g:], small[:, :-g]), mask=pairs)[0])
        if self._pairs2 is not None:  # linear in the gap between g and g + 1 subsampled pixels
            far = float(cv2.mean(cv2.absdiff(small[:, g + 1 :], small[:, : -g - 1]), mask=self._pairs2)[0])
            texture += self._blend * (far - texture)
        blank = mean <= cfg.blank_mean and 0.0 <= p99 <= cfg.blank_p99
        sat = saturated >= cfg.saturated_share
        absolute = dark >= cfg.empty_dark_share or texture <= cfg.empty_texture
        if still:  # on its own: nothing to compare with, and nothing kept for the stream
            reasons = tuple(r for r, hit in zip(QUALITY_REASONS[1:4], (blank, sat, not blank and not sat and absolute)) if hit)
            figures = {"mean": mean, "p99": p99, "saturated": saturated, "border": border, "dark": dark,
                       "texture": texture, "diff": -1.0, "frozen_run": 0.0, "baseline": -1.0}
            return self._result(reasons, figures)
        if self._prev is not None and self._prev.shape != small.shape:
            self._prev = None  # another frame size: nothing to compare with
        if self._prev is None:
            diff = -1.0
            self._run = 0
        else:
            diff = float(cv2.mean(cv2.absdiff(small, self._prev), mask=mask)[0])
            self._run = self._run + 1 if diff <= cfg.frozen_diff else 0
        self._prev = small
        baseline = self._baseline

        relative = baseline > 0 and texture <= cfg.empty_ratio * baseline
        empty = not blank and not sat and (absolute or relative)
        frozen = not blank and self._run >= cfg.frozen_frames
        reasons = tuple(r for r, hit in zip(QUALITY_REASONS[1:], (blank, sat, empty, frozen)) if hit)
        if reasons == ("empty",) and not absolute:
            self._low.append(texture)
            if len(self._low) >= _RESEED_FRAMES:
                # A steady, softer live image, not a lifted probe (dark or textureless): it becomes the baseline.
                self._textures = deque(self._low, maxlen=_BASELINE_FRAMES)
                self._baseline = float(np.median(np.asarray(self._textures)))
                self._fresh = 0
                self._low.clear()
                self._counts["reseeds"] += 1
                logger.info("texture baseline re-seeded at %.2f after %d frames below %.0f%% of it",
                            self._baseline, _RESEED_FRAMES, 100 * cfg.empty_ratio)
        else:
            self._low.clear()
        if not reasons:
            self._textures.append(texture)
            self._fresh += 1
            if self._fresh >= _BASELINE_MIN:  # a median every few frames keeps the check cheap
                self._baseline = float(np.median(np.asarray(self._textures)))
                self._fresh = 0
        figures = {
            "mean": mean, "p99": p99, "saturated": saturated, "border": border, "dark": dark, "texture": texture,
            "diff": diff, "frozen_run": float(self._run), "baseline": baseline,
        }  # fmt: skip
        return self._result(reasons, figures)

    def _without_border(self, white: NDArray[np.uint8], share: float, mask: NDArray[np.uint8]) -> Tuple[float, float]:
        """(saturated share of the field, border share): the share with a white border left out (see the module
        docstring), or (share, 0.0) when the frame has none. `white`: the subsampled saturated pixels (0/255)."""
        cv2 = self._cv2
        if not (white[0].any() or white[-1].any() or white[:, 0].any() or white[:, -1].any()):
            return share, 0.0  # nothing white on the frame's edge (a sector inside the frame): no border
        # Solid white only: the dark speckle left in tissue clipped by a high gain breaks it up.
        core = cv2.erode(white, _KERNEL)
        # The solid white that touches the frame's edge: one flood fill from a white frame put around it.
        framed = cv2.copyMakeBorder(core, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=255)
        cv2.floodFill(framed, None, (0, 0), 128, flags=8)
        edge = cv2.compare(framed[1:-1, 1:-1], 128, cv2.CMP_EQ)
        border = cv2.bitwise_and(cv2.dilate(edge, _KERNEL), white)  # back to its full extent
        n = self._count
        b = cv2.countNonZero(border)
        if b == 0 or b > _BORDER_MAX * n or share * n - b >= self.config.saturated_share * (n - b):
            return share, 0.0  # no border, mostly border, or saturated even without it: the frame's share stands
        contours, _ = cv2.findContours(cv2.bitwise_and(mask, cv2.bitwise_not(border)), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            return share, 0.0  # white through and through: nothing but the border to judge
        field = max(contours, key=cv2.contourArea)
        area = cv2.contourArea(field)
        _, (rw, rh), _ = cv2.minAreaRect(field)
        if area < _FIELD_MIN * n or area < _FIELD_CONVEX * cv2.contourArea(cv2.convexHull(field)) or area < _FIELD_RECT * rw * rh:
            return share, 0.0
        if not self._between(border, mask, cv2.boundingRect(field)):
            return share, 0.0
        return (share * n - b) / (n - b), b / n

    @staticmethod
    def _between(border: NDArray[np.uint8], mask: NDArray[np.uint8], box: Tuple[int, int, int, int]) -> bool:
        """Whether the border lies on two opposite sides of the field's bounding `box` (x, y, w, h): left and right,
        or above and below (three or four sides hold such a pair), as blades and bars do. A near field burnt white
        lies on one side only, white in a corner on two adjacent ones."""
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1  # the judged area
        x, y, w, h = box

        def side(strip: NDArray[np.uint8], area: NDArray[np.uint8], thickness: int, extent: int) -> bool:
            judged = int(np.count_nonzero(area))
            return thickness >= max(1.0, _SIDE_MIN * extent) and judged > 0 and 2 * int(np.count_nonzero(strip)) >= judged

        # The strips beside the field, over the field's extent along the side.
        above = side(border[top:y, x : x + w], mask[top:y, x : x + w], y - top, bottom - top)
        below = side(border[y + h : bottom, x : x + w], mask[y + h : bottom, x : x + w], bottom - y - h, bottom - top)
        before = side(border[y : y + h, left:x], mask[y : y + h, left:x], x - left, right - left)
        after = side(border[y : y + h, x + w : right], mask[y : y + h, x + w : right], right - x - w, right - left)
        return (above and below) or (before and after)

    def _result(self, reasons: Tuple[str, ...], figures: Dict[str, float]) -> QualityResult:
        """Count a judged frame and wrap it up."""
        self._counts["frames"] += 1
        if reasons:
            self._counts["flagged"] += 1
            for r in reasons:
                self._counts[r] += 1
            logger.debug("frame flagged %s: %s", reasons, figures)
        return QualityResult(not reasons, reasons, figures)
