"""Draw the result onto a frame, and show it in a window when the machine has a display.

:func:`draw_overlay` draws a banner across the top of a *copy* of the frame: the shown label and a
confidence bar with the confidence rounded down (only 1.0 reads 100%), or ``ABSTAIN: reason`` in amber, and on
the right, in the room the label and its confidence leave (shortened to the latency or the fps, or left out, on
narrow frames; never drawn over the label), the frame rate and the capture-to-display
latency ("cap-to-disp N ms": now minus the frame's capture timestamp, measured when drawn, so sinks that ran
before the display count; the recorded latency_ms["total"] is capture-to-result). The banner darkens the image under it instead of hiding it. It costs well under a millisecond
at 640x480 (plain OpenCV drawing: a copy, one darkened strip, a rectangle or two, three strings).

:class:`OverlayWindow` is a sink that shows the annotated frames with ``cv2.imshow``; 'q' or Esc (or
closing the window) sets ``stop_requested`` for the pipeline. When a live source stalls, the pipeline calls
its ``mark_stale(idle_s)``: the last frame is shown dimmed with "NO SIGNAL: no frame for N.N s" (:func:`draw_stale`;
"NO SIGNAL for N.N s" where that does not fit, e.g. 128 px) instead of its label, until the next frame. While a
source waits by design (a watched folder between files) the pipeline calls ``refresh()`` instead, so the window
keeps painting and 'q' still works. Without a display, or with an OpenCV that
has no GUI backend (pip ``opencv-python-headless``), it raises a one-line ConfigError at construction,
before the run starts, that points to ``--record FILE``.

Python 3.8 compatible; cv2 is imported inside the functions that use it (``edgeclf.runtime._cv``).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Dict, Optional, Set, Tuple

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime import _cv
from edgeclf.runtime.sinks import Sink, percent_text

__all__ = ["draw_overlay", "draw_stale", "latency_text", "to_bgr", "FpsMeter", "OverlayWindow", "display_problem",
           "NO_DISPLAY", "NO_SIGNAL"]

logger = logging.getLogger(__name__)

NO_DISPLAY = "no display/GUI-capable OpenCV"
_FIX = "use --record FILE instead"
# Colours as RGB; reversed for BGR output.
_WHITE = (255, 255, 255)
_AMBER = (255, 191, 0)
_BAR = (0, 200, 255)
_GREY = (200, 200, 200)
_QUIT_KEYS = (ord("q"), ord("Q"), 27)
_MIN_SCALE = 0.3  # the smallest text scale drawn where it fits (~6 px capitals)


def _check_image(image: Any) -> NDArray[np.uint8]:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise DataError(f"overlay needs a uint8 image, got {img.dtype}; convert the frame with to_uint8 first")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or img.shape[0] < 1 or img.shape[1] < 1:
        raise DataError(f"overlay needs an (H, W) gray or (H, W, 3) RGB image, got shape {img.shape}")
    return img


def to_bgr(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """A BGR copy, uint8 (H, W, 3), of a uint8 (H, W) gray or (H, W, 3) RGB frame (for cv2 writers/windows)."""
    cv2 = _cv.cv2()
    img = _check_image(image)
    code = cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR
    out: NDArray[np.uint8] = cv2.cvtColor(np.ascontiguousarray(img), code)
    return out


def _number(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        return None
    v = float(x)
    return v if np.isfinite(v) else None


def _confidence(record: Dict[str, Any], label: Any) -> Optional[float]:
    conf = _number(record.get("confidence"))
    if conf is None:
        probs = record.get("probs")
        if isinstance(probs, dict):
            conf = _number(probs.get(label))
    return None if conf is None else min(max(conf, 0.0), 1.0)


def latency_text(record: Dict[str, Any], now: Optional[float] = None) -> Optional[str]:
    """The latency shown on the banner: capture-to-display, ``now`` (monotonic s; None: now) minus the record's
    capture "timestamp", as "cap-to-disp N ms" (it includes every sink that ran before the display); without a
    usable timestamp, the recorded capture-to-result latency_ms["total"] as "cap-to-result N ms"; else None."""
    ts = _number(record.get("timestamp"))
    if ts is not None:
        d = (time.monotonic() if now is None else now) - ts
        if d >= 0:
            return f"cap-to-disp {d * 1e3:.0f} ms"
    lat = record.get("latency_ms")
    total = _number(lat.get("total")) if isinstance(lat, dict) else None
    return None if total is None else f"cap-to-result {total:.0f} ms"


def draw_overlay(
    image: NDArray[np.uint8], record: Dict[str, Any], *, fps: Optional[float] = None, order: str = "rgb",
    now: Optional[float] = None,
) -> NDArray[np.uint8]:
    """The frame with the result drawn on a banner across the top; `image` is not modified.

    image: uint8 (H, W) gray or (H, W, 3) RGB (the pipeline's frame). record: a per-frame record; read are
    "label" (or "labels" for multilabel), "abstain", "abstain_reason", "confidence" (else
    probs[label]), "timestamp" and latency_ms["total"] (see :func:`latency_text`: capture-to-display, measured
    when drawn, at `now`). fps: shown when given and there is room. The label is drawn whole (shrunk if wider than
    the frame); the confidence bar only where it fits, then fps/latency where they fit. order: "rgb" or "bgr", the channel order
    of the returned uint8 (H, W, 3) image ("bgr" for cv2.imshow / VideoWriter, saving a conversion).
    """
    if order not in ("rgb", "bgr"):
        raise ConfigError(f"overlay order is {order!r}; allowed: 'rgb', 'bgr'")
    cv2 = _cv.cv2()
    img = _check_image(image)
    bgr = order == "bgr"
    if img.ndim == 2:
        out: NDArray[np.uint8] = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR if bgr else cv2.COLOR_GRAY2RGB)
    elif bgr:
        out = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR)
    else:
        out = np.array(img, copy=True, order="C")

    def col(rgb: Tuple[int, int, int]) -> Tuple[int, int, int]:
        return (rgb[2], rgb[1], rgb[0]) if bgr else rgb

    h, w = out.shape[:2]
    bh = min(h, max(14, int(round(h * 0.075))))
    banner = out[:bh]
    np.right_shift(banner, 2, out=banner)  # darken to 1/4: the image stays visible under the text
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(_MIN_SCALE, bh / 58.0)
    pad = max(3, bh // 6)
    y = int(round(bh * 0.5 + 9.5 * scale))  # text baseline: the cap height of HERSHEY_SIMPLEX is ~19 px at scale 1
    line = cv2.LINE_AA

    # One line of text, in order of importance: the label (or the abstain reason), whole; then its confidence;
    # then fps and latency in what is left, shortened or left out, never drawn over the label.
    conf: Optional[float] = None
    if record.get("abstain"):
        text, colour = f"ABSTAIN: {record.get('abstain_reason') or 'unspecified'}", _AMBER
    else:
        label = record.get("label")
        colour = _WHITE
        if label is None and isinstance(record.get("labels"), (list, tuple)):
            text = "+".join(str(x) for x in record["labels"]) or "(none)"
        else:
            text = str(label)
            conf = _confidence(record, label)
    s = _fit(cv2, text, font, scale, w - 2 * pad)
    (tw, _), _ = cv2.getTextSize(text, font, s, _thickness(s))
    cv2.putText(out, text, (pad, y), font, s, col(colour), _thickness(s), line)
    x_used = pad + tw  # where the drawn text ends
    if conf is not None:
        x0 = x_used + 2 * pad
        bar_w = max(20, w // 6)
        pct = percent_text(conf)
        (pw, _), _ = cv2.getTextSize(pct, font, scale * 0.85, 1)
        if x0 + bar_w + pad + pw <= w - pad:  # room for the bar: draw it, else leave it out
            y0, y1 = int(bh * 0.3), int(bh * 0.7)
            cv2.rectangle(out, (x0, y0), (x0 + bar_w, y1), col(_GREY), 1)
            fill = int(round(conf * (bar_w - 2)))
            if fill > 0:
                cv2.rectangle(out, (x0 + 1, y0 + 1), (x0 + 1 + fill - 1, y1 - 1), col(_BAR), -1)
            cv2.putText(out, pct, (x0 + bar_w + pad, y), font, scale * 0.85, col(_WHITE), 1, line)
            x_used = x0 + bar_w + pad + pw

    # right: fps and latency, right-aligned; both, else the latency (how old the image is), else the fps
    fps_text = f"{fps:.1f} fps" if fps is not None and _number(fps) is not None else None
    lat_text = latency_text(record, now)
    both = "  ".join(t for t in (fps_text, lat_text) if t is not None)
    for cand in (both, lat_text, fps_text):
        if not cand:
            continue
        (rw, _), _ = cv2.getTextSize(cand, font, scale * 0.85, 1)
        if w - pad - rw >= x_used + 2 * pad:
            cv2.putText(out, cand, (w - pad - rw, y), font, scale * 0.85, col(_GREY), 1, line)
            break
    else:
        if both:
            _log_once(f"overlay: frames {w} px wide leave no room for the fps/latency text beside the label: left out "
                      "(the results keep latency_ms)")
    return out


def _thickness(scale: float) -> int:
    return 1 if scale < 0.9 else 2


def _fit(cv2: Any, text: str, font: int, scale: float, width: int) -> float:
    """`scale`, or the largest smaller one at which `text` is at most `width` px wide (never cut off at the edge)."""
    s = scale
    for _ in range(60):
        (tw, _), _ = cv2.getTextSize(text, font, s, _thickness(s))
        if tw <= width or s < 0.05:
            break
        s = s * max(0.5, min(0.97, width / max(tw, 1)))
    return s


_logged: Set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info("%s", msg)


NO_SIGNAL = "NO SIGNAL"


def draw_stale(shown: NDArray[np.uint8], idle_s: float, *, order: str = "rgb") -> NDArray[np.uint8]:
    """A copy of an annotated frame from :func:`draw_overlay` (`order` as it was drawn) marked stale: the whole
    image dimmed to half and the banner replaced by "NO SIGNAL: no frame for N.N s" in amber (shrunk to fit the
    width; "NO SIGNAL for N.N s" where it would be smaller than readable), so an old label is never read as the
    current one."""
    if order not in ("rgb", "bgr"):
        raise ConfigError(f"overlay order is {order!r}; allowed: 'rgb', 'bgr'")
    cv2 = _cv.cv2()
    img = _check_image(shown)
    out: NDArray[np.uint8] = np.right_shift(img, 1)  # a new array: dimmed to half
    if out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR if order == "bgr" else cv2.COLOR_GRAY2RGB)
    h, w = out.shape[:2]
    bh = min(h, max(14, int(round(h * 0.075))))
    out[:bh] = 0
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(_MIN_SCALE, bh / 58.0)
    pad = max(3, bh // 6)
    amber = (_AMBER[2], _AMBER[1], _AMBER[0]) if order == "bgr" else _AMBER
    idle = max(0.0, float(idle_s))
    # Shrunk to fit the width, down to the smallest readable size; past that the short form (a 128 px frame),
    # itself shrunk if need be: the idle time is never cut off at the edge.
    text = f"{NO_SIGNAL}: no frame for {idle:.1f} s"
    s = _fit(cv2, text, font, scale, w - 2 * pad)
    if s < _MIN_SCALE:
        text = f"{NO_SIGNAL} for {idle:.1f} s"
        s = _fit(cv2, text, font, scale, w - 2 * pad)
    cv2.putText(out, text, (pad, int(round(bh * 0.5 + 9.5 * s))), font, s, amber, _thickness(s), cv2.LINE_AA)
    return out


class FpsMeter:
    """Frame rate from successive timestamps (seconds), smoothed exponentially; None until two arrive."""

    def __init__(self, smoothing: float = 0.1) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ConfigError(f"fps smoothing is {smoothing!r}; allowed: (0, 1]")
        self.smoothing = float(smoothing)
        self._last: Optional[float] = None
        self._interval: Optional[float] = None

    def update(self, timestamp: Any = None) -> Optional[float]:
        """Add a frame captured at `timestamp` (seconds; None or not a number: now) and return the fps."""
        t = _number(timestamp)
        if t is None:
            t = time.monotonic()
        if self._last is not None:
            d = t - self._last
            if d > 0:
                self._interval = d if self._interval is None else self._interval + self.smoothing * (d - self._interval)
        self._last = t
        return None if not self._interval else 1.0 / self._interval


def _gui_backend(cv2: Any) -> Optional[str]:
    """The "GUI:" entry of OpenCV's build information ("NONE" for headless builds), or None if absent."""
    try:
        info = str(cv2.getBuildInformation())
    except Exception:  # an odd build: fall back to trying a window
        return None
    for ln in info.splitlines():
        s = ln.strip()
        if s.startswith("GUI:"):
            return s[4:].strip() or None
    return None


def display_problem() -> Optional[str]:
    """Why a window cannot be shown here (no display session, a headless OpenCV), or None if it may work."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "DISPLAY and WAYLAND_DISPLAY are not set (no desktop session, e.g. over ssh or as a service)"
    cv2 = _cv.cv2()
    if (_gui_backend(cv2) or "").upper() == "NONE":
        return (f"this OpenCV {getattr(cv2, '__version__', '?')} has no GUI backend (pip opencv-python-headless "
                "has none; a desktop needs opencv-python or the system OpenCV)")
    return None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


class OverlayWindow(Sink):
    """Show each annotated frame in a window; 'q', Esc or closing the window sets ``stop_requested``.

    Called as ``write(record, image=frame_image)`` (uint8 (H, W) gray or (H, W, 3) RGB); ``written``
    counts frames shown. wait_ms: the cv2.waitKey wait per frame (>= 1; it also lets the window paint).
    Raises ConfigError ("no display/GUI-capable OpenCV: ...; use --record FILE instead") at construction
    when no window can be shown.
    """

    needs_image = True

    def __init__(self, title: str = "edgeclf", *, wait_ms: int = 1) -> None:
        if isinstance(wait_ms, bool) or not isinstance(wait_ms, int) or wait_ms < 1:
            raise ConfigError(f"overlay wait_ms is {wait_ms!r}; allowed: a whole number of ms >= 1")
        problem = display_problem()
        if problem is not None:
            raise ConfigError(f"{NO_DISPLAY}: {problem}; {_FIX}")
        self.title = str(title)
        self.wait_ms = wait_ms
        self.written = 0
        self.stop_requested = False
        self.stop_reason: Optional[str] = None
        self._meter = FpsMeter()
        self._cv2 = _cv.cv2()
        try:
            self._cv2.namedWindow(self.title, self._cv2.WINDOW_NORMAL)
        except self._cv2.error as exc:
            raise ConfigError(f"{NO_DISPLAY}: cv2 cannot open a window ({_short(exc)}); {_FIX}") from None
        self._open = True
        self._visible_works: Optional[bool] = None
        self._last: Optional[NDArray[np.uint8]] = None  # the last annotated frame shown (BGR)
        self.stale = False  # the window shows "NO SIGNAL" (see mark_stale)

    def write(self, record: Dict[str, Any], image: Optional[NDArray[np.uint8]] = None) -> None:
        if not self._open:
            raise ConfigError(f"overlay window {self.title!r} is already closed")
        if image is None:
            raise TypeError("OverlayWindow.write needs the frame: call write(record, image=frame.image)")
        shown = draw_overlay(image, record, fps=self._meter.update(record.get("timestamp")), order="bgr")
        self._last = shown  # drawn afresh for this window: kept (no copy) to be marked stale if the source stalls
        self.stale = False
        self._show(shown, count=True)

    def mark_stale(self, idle_s: float) -> None:
        """The source gave no frame for `idle_s` seconds (the pipeline calls this while it stalls): show the last
        frame dimmed with "NO SIGNAL: no frame for N.N s" instead of its label; the next frame replaces it."""
        if not self._open or self._last is None:
            return
        self.stale = True
        self._show(draw_stale(self._last, idle_s, order="bgr"))

    def refresh(self) -> None:
        """Let the window paint and see keys while no frame comes (a watched folder between files): without
        this the window stops responding and 'q' or closing it takes effect only at the next file. Before the first
        frame only keys are read: some backends call a window not yet shown invisible, which would turn the close
        check off for good (see _show)."""
        if not self._open:
            return
        if self._last is not None:
            self._show(None)
            return
        try:
            key = int(self._cv2.waitKey(1)) & 0xFF
        except self._cv2.error as exc:
            raise ConfigError(f"{NO_DISPLAY}: cv2 cannot read the window's keys ({_short(exc)}); {_FIX}") from None
        self._key(key)

    def _show(self, shown: Optional[NDArray[np.uint8]], count: bool = False) -> None:
        cv2 = self._cv2
        try:
            if shown is not None:
                cv2.imshow(self.title, shown)
            key = int(cv2.waitKey(self.wait_ms if shown is not None else 1)) & 0xFF
            visible = float(cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE))
        except cv2.error as exc:
            raise ConfigError(f"{NO_DISPLAY}: cv2 cannot show the frame ({_short(exc)}); {_FIX}") from None
        if count:
            self.written += 1
        self._key(key)
        if self._visible_works is None:  # some backends do not report visibility: then never infer a close
            self._visible_works = visible >= 1
        elif visible < 1 and self._visible_works and not self.stop_requested:
            self.stop_requested, self.stop_reason = True, "window closed"
            logger.info("overlay window closed after %d frames; asking the pipeline to stop", self.written)

    def _key(self, key: int) -> None:
        if key in _QUIT_KEYS and not self.stop_requested:
            self.stop_requested, self.stop_reason = True, "key " + ("Esc" if key == 27 else chr(key))
            logger.info("overlay window: %s pressed after %d frames; asking the pipeline to stop", self.stop_reason,
                        self.written)

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._cv2.destroyWindow(self.title)
                self._cv2.waitKey(1)
            except self._cv2.error:  # already gone (closed by the user)
                pass
