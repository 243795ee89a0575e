"""Live capture without lag, and sources that survive disconnects.

- `LatestFrameReader(source, drop="latest")`: a capture thread reads the source as fast as it delivers
  and keeps only the newest frame (latest-frame-wins), so a consumer slower than the camera always
  gets the newest frame instead of one queued seconds ago; dropped frames are counted. `drop="none"`
  blocks the capture thread instead (recording, tests: every frame reaches the consumer, in order).
  For files, `realtime=True` paces frames to the file's fps (a camera stand-in); without it, a file is
  read directly as fast as the consumer reads (no thread).
- `ReconnectingSource(open_fn)`: a live source that is reopened, with exponential backoff, when it
  disconnects: a read raises, returns nothing (None) although the source is live, or hangs longer
  than `read_timeout` (reads run in a capture thread, so a hung read is abandoned, not waited for).
  Corrupt frames (no image, empty, wrong dtype or shape) are skipped and counted. Frame indexes keep
  counting across reconnects. Same `drop` policies.

Both hand-offs hold at most one frame (bounded). Both expose `stats()` (with the wrapped source's own
counts, e.g. a video's undecodable frames) and pass `ack(frame)` on to the source they wrap (see
`edgeclf.runtime.watch`). Python 3.8 compatible; no OpenCV import here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from edgeclf.errors import SourceError
from edgeclf.runtime.audit import scrub_source
from edgeclf.runtime.sources import Frame, FrameSource, Size

__all__ = ["LatestFrameReader", "ReconnectingSource", "open_reconnecting", "DROP_POLICIES", "valid_frame"]

logger = logging.getLogger(__name__)

DROP_POLICIES: Tuple[str, ...] = ("latest", "none")
_JOIN_S = 1.0  # how long close() waits for a capture thread before leaving it (daemon) behind
_POLL_S = 0.05  # longest single wait inside read() (lets close() and clocks be noticed)


def _check_drop(drop: str) -> str:
    if drop not in DROP_POLICIES:
        raise SourceError(
            f"drop policy {drop!r} is not valid; allowed: 'latest' (live cameras: keep the newest frame) "
            "or 'none' (recording, tests: never drop, block the capture instead)"
        )
    return drop


def valid_frame(frame: Any) -> bool:
    """A usable frame: a Frame whose image is a non-empty uint8 (H, W) or (H, W, 3) array."""
    if not isinstance(frame, Frame):
        return False
    image = frame.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.size == 0:
        return False
    return image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)


def _ended(source: Any) -> bool:
    """After read() returned None: whether the stream is over (not just a timeout of a live source)."""
    if not getattr(source, "live", False):
        return True
    return bool(getattr(source, "ended", False) or getattr(source, "closed", False))


class _Mailbox:
    """The hand-off between one capture thread and the consumer: one frame slot + one final item.

    "latest": `put_frame` never blocks and replaces a frame not yet taken (counted in `dropped`).
    "none": `put_frame` blocks until the slot is free. The final item ("error", exc) or ("end", None)
    is delivered after the frame before it. `cancel()` wakes everyone; puts then return False. Every frame
    put and never taken is counted in `dropped`: one replaced, one refused after `cancel()`, one left in
    the slot at `cancel()`, one the capture gave up on (`discard()`).
    """

    def __init__(self, drop: str) -> None:
        self._drop = drop
        self._cond = threading.Condition()
        self._frame: Optional[Frame] = None
        self._final: Optional[Tuple[str, Any]] = None
        self.cancelled = False
        self.dropped = 0

    def put_frame(self, frame: Frame) -> bool:
        with self._cond:
            if self._drop == "none":
                while self._frame is not None and not self.cancelled:
                    self._cond.wait(_POLL_S)
            if self.cancelled:
                self.dropped += 1  # captured, never to be delivered
                return False
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify_all()
            return True

    def put_final(self, kind: str, value: Any) -> None:
        with self._cond:
            self._final = (kind, value)
            self._cond.notify_all()

    def get(self, timeout: float) -> Optional[Tuple[str, Any]]:
        """("frame", Frame) | ("error", exc) | ("end", None), or None after `timeout` seconds."""
        end = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                if self._frame is not None:
                    frame, self._frame = self._frame, None
                    self._cond.notify_all()
                    return ("frame", frame)
                if self._final is not None:
                    return self._final
                left = end - time.monotonic()
                if left <= 0 or self.cancelled:
                    return None
                self._cond.wait(left)

    def discard(self) -> None:
        """Count a captured frame that is never put (the capture stopped while pacing it)."""
        with self._cond:
            self.dropped += 1

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            if self._frame is not None:  # captured, never taken: nothing may vanish uncounted
                self.dropped += 1
                self._frame = None
            self._cond.notify_all()


class _Capture:
    """One capture thread over one opened source, feeding a mailbox.

    `reading_since` is the monotonic time the current `source.read` started (None between reads and
    while waiting for the consumer), which is what a hang is measured on. A None from `read` ends the
    capture ("end") when `none_means_end` or the source has ended; otherwise it is a live source's
    read timeout and the capture reads again.
    """

    def __init__(
        self,
        source: FrameSource,
        drop: str,
        *,
        read_timeout: Optional[float],
        pace_fps: Optional[float] = None,
        none_means_end: bool = False,
        stop: Optional[threading.Event] = None,
        name: str = "edgeclf-capture",
    ) -> None:
        self.source = source
        self.mailbox = _Mailbox(drop)
        self.reading_since: Optional[float] = None
        self.captured = 0
        self._read_timeout = read_timeout
        self._pace = pace_fps
        self._none_means_end = none_means_end
        self._stop = stop if stop is not None else threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = 1.0 / self._pace if self._pace else 0.0
        anchor: Optional[float] = None
        k = 0
        try:
            while not self.mailbox.cancelled:
                self.reading_since = time.monotonic()
                try:
                    frame = self.source.read(self._read_timeout)
                finally:
                    self.reading_since = None
                if frame is None:
                    if self.mailbox.cancelled:
                        return
                    if self._none_means_end or _ended(self.source):
                        self.mailbox.put_final("end", None)
                        return
                    continue  # a live source's read timed out: no frame yet
                self.captured += 1
                if period:
                    now = time.monotonic()
                    if anchor is None or now - (anchor + k * period) > period:
                        anchor, k = now, 0  # first frame, or late by more than a frame: re-anchor
                    due = anchor + k * period
                    k += 1
                    if due > now and self._stop.wait(due - now):
                        self.mailbox.discard()
                        return
                    frame = dataclasses.replace(frame, timestamp=time.monotonic())
                if not self.mailbox.put_frame(frame):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self.mailbox.put_final("error", exc)

    def cancel(self) -> None:
        self.mailbox.cancel()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _source_stats(source: Any) -> Dict[str, int]:
    """The wrapped source's own counts (a video's decoded/skipped frames, a DICOM series' skipped files), {}
    when it has no stats()."""
    stats = getattr(source, "stats", None)
    return dict(stats()) if callable(stats) else {}


def _merged(own: Dict[str, int], inner: Dict[str, int]) -> Dict[str, int]:
    """`own` plus the wrapped source's counts: the run summary sees only the outermost stats(). A key both
    have keeps the wrapper's meaning; the source's value goes under "source_<key>" (lost neither way)."""
    out = {("source_" + k if k in own else k): v for k, v in inner.items()}
    out.update(own)
    return out


def _close_quietly(source: Any, wait: float) -> None:
    """Close `source` from a helper thread (a hung capture may block close); wait up to `wait` s."""

    def run() -> None:
        try:
            source.close()
        except Exception as exc:  # noqa: BLE001 - a source that fails to close is already gone
            logger.debug("closing a disconnected source failed: %s", exc)

    t = threading.Thread(target=run, name="edgeclf-close", daemon=True)
    t.start()
    t.join(wait)


class LatestFrameReader:
    """Read `source` without lag: see the module doc.

    `drop`: "latest" (default; live cameras/streams) keeps only the newest frame, counting the ones a
    slow consumer never saw in `stats()["dropped"]`; "none" never drops while the reader is open (the capture
    waits); a frame captured but not yet taken when it closes is counted in "dropped" too.
    `realtime`: pace a file to `fps` (default: the source's fps) in a capture thread, as a camera
    would deliver it. A live source always gets a capture thread; a file without `realtime` is read
    directly. Frames keep the source's index (a gap = dropped frames); with `realtime` their
    timestamp is the time they were handed over (what a camera's capture time would be).
    Errors the source raises reach the consumer's `read` (after the frame before them).
    `read_timeout` is passed to a live source's `read` (None: block; closing the reader wakes it).
    """

    def __init__(
        self,
        source: FrameSource,
        *,
        drop: str = "latest",
        realtime: bool = False,
        fps: Optional[float] = None,
        read_timeout: Optional[float] = None,
    ) -> None:
        self.source = source
        self.drop = _check_drop(drop)
        if drop == "latest" and getattr(source, "needs_ack", False):
            raise SourceError(
                f"a {getattr(source, 'kind', 'source')} source needs every frame acknowledged and cannot drop "
                "frames; allowed: drop='none' for it; use LatestFrameReader(source, drop='none')"
            )
        pace: Optional[float] = None
        if realtime:
            pace = fps if fps is not None else getattr(source, "fps", None)
            if pace is None or not (pace > 0):
                raise SourceError(
                    f"realtime pacing needs frames per second, and this {getattr(source, 'kind', '')} source "
                    "has none (e.g. an image folder); pass fps=N or realtime=False"
                )
        self.realtime = realtime
        self.fps: Optional[float] = pace if pace is not None else getattr(source, "fps", None)
        self.size: Optional[Size] = getattr(source, "size", None)
        self.frame_count: Optional[int] = getattr(source, "frame_count", None)
        self.live: bool = bool(getattr(source, "live", False) or realtime)
        self.kind: str = getattr(source, "kind", "")
        self._threaded = bool(getattr(source, "live", False)) or realtime
        self._stop = threading.Event()
        self._closed = False
        self._ended = False
        self._delivered = 0
        self._direct_captured = 0
        self._capture: Optional[_Capture] = None
        if self._threaded:
            self._capture = _Capture(
                source, drop, read_timeout=read_timeout if source.live else None, pace_fps=pace, stop=self._stop,
                name="edgeclf-latest",
            )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ended(self) -> bool:
        return self._ended or self._closed

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The newest frame not yet handed out; None after `timeout` s (live) or at the end of the stream."""
        if self.ended:
            return None
        if self._capture is None:
            frame = self.source.read(timeout)
            if frame is None:
                if _ended(self.source):
                    self._ended = True
                return None
            self._direct_captured += 1
            self._delivered += 1
            return frame
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while not self._closed:
            wait = _POLL_S if deadline is None else min(_POLL_S, max(0.0, deadline - time.monotonic()))
            item = self._capture.mailbox.get(wait)
            if item is not None:
                kind, value = item
                if kind == "frame":
                    self._delivered += 1
                    frame_out: Frame = value
                    return frame_out
                self._ended = True
                if kind == "error":
                    raise value
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None
        return None

    def ack(self, frame: Frame) -> None:
        """Pass the acknowledgement on to the source (watched folders); a no-op for other sources."""
        ack = getattr(self.source, "ack", None)
        if ack is not None:
            ack(frame)

    def stats(self) -> Dict[str, int]:
        """captured (frames read from the source), delivered (handed to the consumer), dropped, and the
        source's own stats() (see `_merged`: a clashing key of the source's comes as "source_<key>")."""
        if self._capture is None:
            own = {"captured": self._direct_captured, "delivered": self._delivered, "dropped": 0}
        else:
            own = {
                "captured": self._capture.captured,
                "delivered": self._delivered,
                "dropped": self._capture.mailbox.dropped,
            }
        return _merged(own, _source_stats(self.source))

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read()
            if frame is None:
                if self.ended:
                    return
                continue
            yield frame

    def close(self) -> None:
        """Stop the capture thread and close the source (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._capture is not None:
            self._capture.cancel()
        _close_quietly(self.source, _JOIN_S)
        if self._capture is not None and not self._capture.join(_JOIN_S):
            logger.warning("capture thread of %s did not stop within %.1fs; left behind", self.kind, _JOIN_S)

    def __enter__(self) -> LatestFrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LatestFrameReader drop={self.drop} realtime={self.realtime} {self.stats()}>"


class ReconnectingSource:
    """A live source that survives disconnects: see the module doc.

    `open_fn()` opens the underlying source (e.g. `lambda: open_source("rtsp://...")`); it is called
    once in the constructor (a wrong address fails at once, unless `connect_now=False`) and again after
    each disconnect, waiting `backoff_initial` seconds, doubling (`backoff_factor`) up to `backoff_max`,
    reset after a frame arrives. `max_retries` consecutive failed opens (None: forever) end the run with
    a SourceError. A read that takes longer than `read_timeout` seconds counts as a disconnect (the
    hung read is abandoned in its thread). A source that is not live (a file) ends normally at its end.

    `read(timeout)` returns the next frame, or None when `timeout` passes (a live source) or when the
    stream ended (`ended`). Reopening runs in the caller's thread, bounded by the source's own open
    timeout (e.g. StreamSource's `open_timeout`). A None from the wrapped source's `read` is a
    disconnect (live) or the end (not live): do not wrap sources whose `read(timeout)` returns None on
    a timeout (watched folders). `clock` and `sleep` (the backoff wait) can be injected for tests.
    `stats()`: captured, delivered, dropped, skipped (corrupt frames), reconnects (successful reopens),
    disconnects, errors (reads that raised), timeouts (hung reads), empty (None from a live source),
    open_failures; and the wrapped sources' own stats(), summed over connections (a clashing key of
    theirs comes as "source_<key>", e.g. "source_skipped" beside the corrupt frames' "skipped").
    """

    kind = "reconnecting"
    live = True

    def __init__(
        self,
        open_fn: Callable[[], FrameSource],
        *,
        drop: str = "latest",
        read_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        backoff_factor: float = 2.0,
        max_retries: Optional[int] = None,
        connect_now: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Optional[Callable[[float], None]] = None,
        name: str = "",
        source: Optional[str] = None,
    ) -> None:
        self.drop = _check_drop(drop)
        if not (read_timeout > 0) or not (0 < backoff_initial <= backoff_max) or not (backoff_factor >= 1):
            raise SourceError(
                f"reconnect settings read_timeout={read_timeout!r} backoff_initial={backoff_initial!r} "
                f"backoff_max={backoff_max!r} backoff_factor={backoff_factor!r} are not valid; allowed: "
                "read_timeout > 0, 0 < backoff_initial <= backoff_max, backoff_factor >= 1; fix them"
            )
        if max_retries is not None and max_retries < 0:
            raise SourceError(f"max_retries={max_retries!r} is not valid; allowed: an integer >= 0 or None (forever)")
        self._open_fn = open_fn
        self._read_timeout = float(read_timeout)
        self._backoff_initial = float(backoff_initial)
        self._backoff_max = float(backoff_max)
        self._backoff_factor = float(backoff_factor)
        self._max_retries = max_retries
        self._clock = clock
        self._stop = threading.Event()
        self._sleep: Callable[[float], None] = sleep if sleep is not None else self._interruptible_sleep
        self.name = name
        self._source = source  # the URI or pipeline, kept out of the warnings (see _disconnect)
        self._closed = False
        self._ended = False
        self._capture: Optional[_Capture] = None
        # Guards _closed against _capture: close() may run in another thread while read() reopens. Reentrant:
        # on_event runs under it, and a caller may close from there.
        self._lock = threading.RLock()
        self._backoff = self._backoff_initial
        self._next_attempt = clock()
        self._failures = 0  # consecutive failed opens
        # on_event(kind, message, counts): called on each disconnect ("fault") and reopen ("recovery").
        self.on_event: Optional[Callable[[str, str, Dict[str, int]], None]] = None
        self._next_index = 0
        self._connection = 0
        self._opened_once = False
        self._counts: Dict[str, int] = dict.fromkeys(
            ("captured", "delivered", "dropped", "skipped", "reconnects", "disconnects", "errors", "timeouts",
             "empty", "open_failures"),
            0,
        )
        self._old_captured = 0
        self._old_dropped = 0
        self._old_inner: Dict[str, int] = {}  # stats() of the sources of earlier connections, summed
        self.fps: Optional[float] = None
        self.size: Optional[Size] = None
        self.frame_count: Optional[int] = None
        # The wrapped source's kind ("camera", "stream", ...): the pipeline judges this source by it.
        self.inner_kind: Optional[str] = None
        if connect_now:
            self._connect(raise_errors=True)

    # ----------------------------------------------------------------------------------- public

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ended(self) -> bool:
        return self._ended or self._closed

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next frame (index counting across reconnects); None after `timeout` s or at the end."""
        deadline = None if timeout is None else self._clock() + max(0.0, timeout)
        while not self.ended:
            if self._capture is None:
                now = self._clock()
                if now < self._next_attempt:
                    wait = self._next_attempt - now
                    if deadline is not None:
                        if now >= deadline:
                            return None
                        wait = min(wait, deadline - now)
                    self._sleep(wait)
                    continue
                self._connect(raise_errors=False)
                continue
            cap = self._capture
            wait = _POLL_S
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - self._clock()))
            item = cap.mailbox.get(wait)
            if item is None:
                started = cap.reading_since
                if started is not None and time.monotonic() - started > self._read_timeout:
                    self._counts["timeouts"] += 1
                    self._disconnect(f"a read hung for more than {self._read_timeout:g}s")
                    continue
                if deadline is not None and self._clock() >= deadline:
                    return None
                continue
            kind, value = item
            if kind == "frame":
                if not valid_frame(value):
                    self._counts["skipped"] += 1
                    logger.debug("%s: skipped a corrupt frame", self._label())
                    continue
                self._backoff = self._backoff_initial
                frame: Frame = value
                meta = dict(frame.meta)
                meta["connection"] = self._connection
                meta["source_index"] = frame.index
                out = Frame(image=frame.image, index=self._next_index, timestamp=frame.timestamp, meta=meta)
                self._next_index += 1
                self._counts["delivered"] += 1
                return out
            if kind == "end":
                if not getattr(cap.source, "live", False):
                    self._ended = True  # a file ended: that is the end, not a disconnect
                    self._drop_capture(cap)
                    return None
                self._counts["empty"] += 1
                self._disconnect("the source returned no frame")
                continue
            self._counts["errors"] += 1
            self._disconnect(f"a read failed ({type(value).__name__}: {_one_line(value)})")
        return None

    def ack(self, frame: Frame) -> None:
        """Pass the acknowledgement on to the current source, where it has `ack`."""
        cap = self._capture
        ack = getattr(cap.source, "ack", None) if cap is not None else None
        if ack is not None:
            ack(frame)

    def stats(self) -> Dict[str, int]:
        with self._lock:  # not halfway through folding a dropped capture into the totals
            out = dict(self._counts)
            cap = self._capture
            out["captured"] = self._old_captured + (cap.captured if cap is not None else 0)
            out["dropped"] = self._old_dropped + (cap.mailbox.dropped if cap is not None else 0)
            inner = dict(self._old_inner)
            for k, v in (_source_stats(cap.source) if cap is not None else {}).items():
                inner[k] = inner.get(k, 0) + v
        return _merged(out, inner)

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read()
            if frame is None:
                if self.ended:
                    return
                continue
            yield frame

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            cap = self._capture
        if cap is not None:
            self._drop_capture(cap)

    def __enter__(self) -> ReconnectingSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ReconnectingSource {self._label()} drop={self.drop} {self.stats()}>"

    # ----------------------------------------------------------------------------------- internals

    def _label(self) -> str:
        return self.name or (getattr(self._capture.source, "source_id", "") if self._capture else "") or "source"

    def _interruptible_sleep(self, seconds: float) -> None:
        self._stop.wait(min(seconds, _POLL_S * 4))

    def _connect(self, *, raise_errors: bool) -> None:
        try:
            source = self._open_fn()
        except Exception as exc:  # noqa: BLE001 - any failure to open is retried
            self._counts["open_failures"] += 1
            self._failures += 1
            if raise_errors:
                if isinstance(exc, SourceError):
                    raise
                raise SourceError(
                    f"live source could not be opened ({type(exc).__name__}: {_one_line(exc)}); "
                    "check that it is connected and reachable"
                ) from None
            if self._max_retries is not None and self._failures > self._max_retries:
                self._ended = True
                raise SourceError(
                    f"live source {self._label()} could not be reopened after {self._failures} attempts "
                    f"(last: {type(exc).__name__}: {_one_line(exc)}); check the device or stream, or raise max_retries"
                ) from None
            delay = self._backoff
            self._backoff = min(self._backoff * self._backoff_factor, self._backoff_max)
            self._next_attempt = self._clock() + delay
            logger.info("%s: reopen failed (%s); next try in %.2fs", self._label(), type(exc).__name__, delay)
            return
        with self._lock:
            if not self._closed:
                self._failures = 0
                if self._opened_once:
                    self._counts["reconnects"] += 1
                self._opened_once = True
                self._connection += 1
                self.fps = getattr(source, "fps", None) if self.fps is None else self.fps
                self.size = getattr(source, "size", None) if self.size is None else self.size
                self.inner_kind = getattr(source, "kind", None) if self.inner_kind is None else self.inner_kind
                self._capture = _Capture(
                    source, self.drop, read_timeout=self._read_timeout, none_means_end=True, stop=self._stop,
                    name="edgeclf-reconnecting",
                )
                if self._connection > 1:
                    logger.info("%s: reconnected (connection %d)", self._label(), self._connection)
                    self._emit("recovery", f"reconnected (connection {self._connection})")
                return
        # close() ran while the (slow) open was in flight: the new source is ours to close, and no capture
        # thread may start reading it.
        logger.debug("%s: closed while reopening; closing the source just opened", self._label())
        _close_quietly(source, _JOIN_S)

    def _emit(self, kind: str, message: str) -> None:
        """Tell `on_event` (the audit log) of a disconnect ("fault") or a reopen ("recovery")."""
        if self.on_event is not None:
            self.on_event(kind, message, dict(self._counts))

    def _disconnect(self, why: str) -> None:
        with self._lock:
            cap = self._capture
            if cap is None or self._closed:  # close() takes the capture down: no disconnect to report
                return
            self._counts["disconnects"] += 1
            # A stream's error text quotes its URI, which may carry a patient's name: never on stderr.
            logger.warning("%s: disconnected: %s; reopening in %.2fs", self._label(), scrub_source(why, self._source),
                           self._backoff)
            self._emit("fault", why)
        self._drop_capture(cap)
        self._next_attempt = self._clock() + self._backoff
        self._backoff = min(self._backoff * self._backoff_factor, self._backoff_max)

    def _drop_capture(self, cap: _Capture) -> None:
        """Stop `cap`, fold its counts into the totals and close its source, once (close() and the reader's
        disconnect may both get here)."""
        with self._lock:
            if self._capture is not cap:
                return
            self._capture = None
            cap.cancel()  # counts a frame left in its slot as dropped
            self._old_captured += cap.captured
            self._old_dropped += cap.mailbox.dropped
            for k, v in _source_stats(cap.source).items():
                self._old_inner[k] = self._old_inner.get(k, 0) + v
        closing = self._closed
        _close_quietly(cap.source, _JOIN_S if closing else 0.0)
        if closing:
            cap.join(_JOIN_S)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def open_reconnecting(
    uri: str,
    *,
    size: Optional[Size] = None,
    drop: str = "latest",
    read_timeout: float = 5.0,
    **kwargs: Any,
) -> ReconnectingSource:
    """`ReconnectingSource` over `open_source(uri, size=size)`, for cameras and streams."""
    from edgeclf.runtime.sources import open_source

    kwargs.setdefault("source", uri)  # scrubbed from the disconnect warnings (a pipeline's path, a URL's query)
    return ReconnectingSource(
        lambda: open_source(uri, size=size), drop=drop, read_timeout=read_timeout, **kwargs
    )
