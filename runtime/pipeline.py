"""The per-frame pipeline: source -> sector -> quality -> preprocess -> infer -> postprocess -> sinks.

Every frame the source delivers gives exactly one result record, also when it is not classified (a
frame failing the quality gate is recorded as an abstain with its reason, without inference). The
quality gate judges a still (an image file, a single-frame DICOM) on its own and a cine's frames as a
stream (see `run_pipeline`).
Every stage is timed; capture-to-result latency is measured from the frame's capture timestamp.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime.backends import Backend
from edgeclf.runtime.bundle import Bundle, Manifest
from edgeclf.runtime.postprocess import decide, decide_frame, frame_probabilities, probabilities
from edgeclf.runtime.preprocess import Preprocessor
from edgeclf.runtime.sinks import Sink
from edgeclf.runtime.sources import FrameSource

if TYPE_CHECKING:
    from edgeclf.runtime.quality import QualityGate
    from edgeclf.runtime.sector import SectorDetector
    from edgeclf.runtime.smoothing import CineSmoother

__all__ = ["STAGES", "PREPROCESS_PARTS", "FRAME_ERROR", "SECTOR_WARMUP", "NO_SECTOR_STILL", "RECORD_META", "RunOptions", "RunSummary", "run_pipeline",
           "PipelineState", "stage_stats", "parse_roi", "waits_by_design", "WAITING_KINDS"]

log = logging.getLogger(__name__)
STAGES = ("capture", "preprocess", "infer", "postprocess", "sink")
# What the preprocess stage is made of, timed apart in the summary (not in each record): the sector
# detector and mask, the quality gate, and the model input (resize, normalisation, layout).
PREPROCESS_PARTS = ("sector", "quality", "model_input")
SMOOTHING_CHOICES = ("auto", "cine", "off")
BACKEND_ERROR = "backend_error"  # abstain reason of a frame whose inference raised
INVALID_OUTPUT = "invalid_output"  # abstain reason of a frame whose outputs were not finite (NaN, inf)
# Abstain reason of a frame the sector or quality stage could not handle (a DataError on that frame's data, e.g. a
# sector mask too thin to judge): that frame abstains and is counted; the run goes on.
FRAME_ERROR = "frame_error"
_FRAME_ERROR_REASONS = (FRAME_ERROR,)
# Abstain reason of a frame that came before the sector locked (--roi sector: the first frames of a stream, segment
# or frame size): only the whole frame, text and UI included, is known then, an input a sector model never saw.
SECTOR_WARMUP = "sector_warmup"
_WARMUP_REASONS = (SECTOR_WARMUP,)
# Abstain reason of a still (an image file, a single-frame DICOM: see _still) under --roi sector: the sector is found
# from speckle moving over a cine's frames, so a still never has one, and its whole frame is an input a sector model
# never saw. Not warm-up: no later frame brings a lock. The run logs one warning saying what to do instead.
NO_SECTOR_STILL = "no_sector_still"
_NO_SECTOR_STILL_REASONS = (NO_SECTOR_STILL,)
_FRAME_ERRORS_LOGGED = 5  # frame errors logged at WARNING; later ones at DEBUG (a stream failing on every frame)
# Source meta copied into each record (when the source gives them): which file and which frame of it a record
# is, so that a repeat after a crash can be recognised (watched folders), and how many frames the file holds (a
# clip decision is of a cine or a still by the file, not by the frames read; whole when its last frame was read).
# Identifier-free: an index, frame numbers, and watch.py's watch_key (a keyed hash (HMAC) of name, size and mtime,
# never the name). Nothing else of the meta (no name hashes: a short hash of a name alone can be looked up from a
# list of names).
RECORD_META = ("file_index", "file_frame", "file_frames", "watch_key")
MAX_BATCH = 64  # frames per inference call: beyond this only memory grows
MAX_BACKEND_ERRORS = 5  # failures in a row (either kind) that end the run: a backend that is gone, not a hiccup
# A live source that gives no frame for max(STALE_MIN_S, STALE_FRAMES frame periods) has stalled: the display is
# marked stale (sinks with ``mark_stale(idle_s)``, e.g. the overlay window's "NO SIGNAL") and the smoother is reset,
# so the label from before the stall is never shown as current. No record is written (a stall is not a frame
# result); the summary counts stalls (extra["stalls"]). Seen at the pipeline's 0.5 s read poll.
STALE_MIN_S = 0.5
STALE_FRAMES = 3
# Live sources that wait for their next input by design (a watched folder: the next X-ray may come in an hour):
# their silence is neither a stall (the shown result stays current) nor a hung service (the watchdog is fed).
WAITING_KINDS = ("watch",)


def waits_by_design(source: Any) -> bool:
    """Whether a live source's silence is its normal state (WAITING_KINDS), not a stall."""
    return getattr(source, "kind", "") in WAITING_KINDS


def stage_stats(values_ms: Sequence[float]) -> Dict[str, float]:
    """Median, p90, p99, mean and max of a list of milliseconds (empty -> zeros)."""
    if not values_ms:
        return {"n": 0, "median": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0}
    a = np.asarray(values_ms, np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "median": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()), "max": float(a.max())}


def parse_roi(text: Optional[str]) -> Tuple[str, Optional[Tuple[int, int, int, int]]]:
    """'none' | 'sector' | 'x0,y0,x1,y1' -> (mode, box)."""
    t = (text or "none").strip().lower()
    if t in ("none", "sector"):
        return t, None
    parts = t.split(",")
    try:
        box = tuple(int(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or box[0] < 0 or box[1] < 0 or box[2] <= box[0] or box[3] <= box[1]:
        raise ConfigError(f"roi {text!r} is not valid; allowed: none, sector, or x0,y0,x1,y1 in pixels with x1>x0, y1>y0")
    return "fixed", (box[0], box[1], box[2], box[3])


@dataclass(frozen=True)
class RunOptions:
    """How frames are treated between the source and the sinks.

    min_confidence: abstain below this top probability (None: the bundle's).
    smoothing: "cine" (exponential smoothing, hysteresis, minimum dwell before the shown label changes),
        "off" (each frame shown as decided), "auto" (cine for video-like sources, off for images,
        watched folders and single DICOM images).
    roi: "none", "sector" (ultrasound: detect the fan or image area, lock it, mask and crop) or a fixed
        "x0,y0,x1,y1" box; None: the bundle's (sector for a model trained on sector crops, else none).
    quality: run the per-frame quality gate (frozen, dark, saturated, empty sector; a still is judged on its
        own: never frozen, never empty by comparison with other images, see run_pipeline).
    batch: frames per inference call for sources that are neither live nor paced (recorded files, folders,
        DICOM): more frames/s where the model runs faster on batches, each result later by up to a batch.
        Live sources and --realtime always infer one frame at a time (the newest frame, at once). Records,
        smoothing and order are those of batch 1; probabilities may differ in the last float digits.
    """

    min_confidence: Optional[float] = None
    smoothing: str = "auto"
    roi: Optional[str] = None
    quality: bool = True
    # Read and prepare the next frame in a feeder thread while this one is inferred.
    pipelined: bool = True
    batch: int = 1

    def __post_init__(self) -> None:
        if self.smoothing not in SMOOTHING_CHOICES:
            raise ConfigError(f"smoothing {self.smoothing!r} is unknown; allowed: {', '.join(SMOOTHING_CHOICES)}")
        if self.min_confidence is not None and not 0.0 <= self.min_confidence < 1.0:
            raise ConfigError(f"min confidence is {self.min_confidence}; allowed: 0 (never abstain) up to below 1")
        if self.roi is not None:
            parse_roi(self.roi)
        if not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"batch is {self.batch}; allowed: 1 to {MAX_BATCH} frames per inference")

    def confidence_floor(self, manifest: Manifest) -> float:
        """The top probability below which a frame abstains: this run's, else the bundle's."""
        return float(manifest.min_confidence if self.min_confidence is None else self.min_confidence)


WINDOW = 8192  # frames whose stage times give the percentiles: bounded memory over hours


class StageTimes:
    """One stage's times in constant memory: count, mean and max over the whole run; median, p90 and
    p99 over the last WINDOW frames (a ring buffer)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._buf = np.zeros(window, np.float64)
        self.count = 0
        self._total = 0.0
        self._max = 0.0

    def append(self, ms: float) -> None:
        self._buf[self.count % len(self._buf)] = ms
        self.count += 1
        self._total += ms
        self._max = max(self._max, ms)

    def __len__(self) -> int:
        return self.count

    def stats(self) -> Dict[str, float]:
        if not self.count:
            return stage_stats([])
        a = self._buf[: min(self.count, len(self._buf))]
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return {"n": int(self.count), "median": float(p50), "p90": float(p90), "p99": float(p99),
                "mean": self._total / self.count, "max": self._max, "window": int(a.size)}


@dataclass
class RunSummary:
    frames: int = 0
    written: int = 0
    abstained: int = 0
    quality_flagged: int = 0
    wall_s: float = 0.0
    stopped_by: Optional[str] = None
    label_counts: Dict[str, int] = field(default_factory=dict)
    abstain_reasons: Dict[str, int] = field(default_factory=dict)
    timings_ms: Dict[str, StageTimes] = field(default_factory=lambda: {s: StageTimes() for s in STAGES + ("latency",)})
    preprocess_parts_ms: Dict[str, StageTimes] = field(default_factory=lambda: {s: StageTimes() for s in PREPROCESS_PARTS})
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "frames": self.frames,
            "written": self.written,
            "abstained": self.abstained,
            "abstain_reasons": dict(self.abstain_reasons),
            "quality_flagged": self.quality_flagged,
            "wall_s": round(self.wall_s, 3),
            "fps": round(self.frames / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "stopped_by": self.stopped_by,
            "label_counts": dict(self.label_counts),
            "stages_ms": {k: v.stats() for k, v in self.timings_ms.items()},
            "preprocess_parts_ms": {k: v.stats() for k, v in self.preprocess_parts_ms.items()},
            **self.extra,
        }


_IDLE = object()


class _Feeder:
    """Runs `produce` in a thread, handing its results over through a bounded queue; an exception in
    the thread is raised in the consumer's `get`, after the items before it."""

    def __init__(self, produce: Callable[[], Any], depth: int) -> None:
        self._produce = produce
        self._q: "queue.Queue[Tuple[str, Any]]" = queue.Queue(maxsize=depth)  # noqa: UP037 (3.8: no generic at runtime)
        self._stop = threading.Event()
        self._refused = 0  # frames read and prepared, then not handed over because the run stopped
        self._thread = threading.Thread(target=self._run, name="edgeclf-feeder", daemon=True)
        self._thread.start()

    def _put(self, item: Tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        if item[0] == "item" and item[1] is not None:
            self._refused += 1
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._produce()
                if item is _IDLE:
                    continue
                if not self._put(("item", item)) or item is None:
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._put(("error", exc))

    def get(self, timeout: float) -> Any:
        try:
            kind, value = self._q.get(timeout=timeout)
        except queue.Empty:
            if not self._thread.is_alive() and self._q.empty():
                return None
            return _IDLE
        if kind == "error":
            raise value
        return value

    def close(self) -> int:
        """Stop the thread; returns how many frames it had read and not handed over (queued or held)."""
        self._stop.set()
        # Join first: a `_put` still running could otherwise slip its frame into the queue after the drain.
        self._thread.join(timeout=2.0)
        left = self._refused
        while True:
            try:
                kind, value = self._q.get_nowait()
            except queue.Empty:
                break
            left += int(kind == "item" and value is not None)
        return left


def _video_like(source: FrameSource) -> bool:
    kind = getattr(source, "kind", "")
    if kind == "reconnecting":  # a ReconnectingSource (camera, stream): judged by what it wraps, video if not yet known
        kind = getattr(source, "inner_kind", None) or "video"
    if kind == "dicom":
        # A cine only when one file holds several frames: a folder of single-frame files is independent images
        # (X-rays), whatever their sum. A wrapper that hides DicomSource.file_frames (realtime pacing) falls back
        # to the sum, and the pipeline still shows single-frame files as decided (see run_pipeline).
        per_file = getattr(source, "file_frames", None)
        if isinstance(per_file, tuple):
            return any(n > 1 for n in per_file)
        return bool((getattr(source, "frame_count", None) or 0) > 1)
    return kind in ("video", "camera", "stream", "synthetic", "gstreamer")


def _still(meta: Mapping[str, Any], video_like: bool) -> bool:
    """Whether a frame is a still, which the quality gate judges on its own: a frame of a file that holds one frame
    (meta "file_frames" of a DICOM folder's or a watched folder's file: an X-ray, an image file), else any frame of a
    source that is not video-like (image files, a folder of single-frame DICOM files). A cine's frames are not."""
    if meta.get("source") in ("dicom", "watch"):
        n = meta.get("file_frames")
        if isinstance(n, int) and not isinstance(n, bool):
            return n == 1
    return not video_like


def _segment(meta: Mapping[str, Any], dicom: bool) -> Tuple[Any, bool]:
    """(segment, cine) of a frame: ("file", file_index) of a DICOM file or ("watch", watch_key) of a watched folder's
    file (when `dicom`: per-file sources), ("connection", n) of a reconnecting live source, else None; cine: whether
    the segment holds several frames."""
    if dicom and meta.get("source") == "dicom":
        return ("file", meta.get("file_index")), (meta.get("file_frames") or 1) > 1
    if dicom and meta.get("source") == "watch" and meta.get("watch_key") is not None:
        return ("watch", meta["watch_key"]), (meta.get("file_frames") or 1) > 1
    if "connection" in meta:
        return ("connection", meta["connection"]), True
    return None, True


class _SegmentWatch:
    """Says when a frame starts a new segment, a new DICOM cine (of a folder or a watched folder) or a new connection
    of a live source, after which nothing carries over (a single-frame file after another starts none: stills are not
    smoothed together). One per thread that keeps per-segment state: the smoother in the consumer, the sector
    detector and gate in the feeder."""

    def __init__(self, dicom: bool) -> None:
        self.dicom = dicom
        self._last: Any = None
        self._cine = False

    def update(self, meta: Mapping[str, Any]) -> Tuple[bool, bool]:
        """(whether this frame starts a new segment, whether its segment is a cine)."""
        segment, cine = _segment(meta, dicom=self.dicom)
        new = False
        if segment is not None and segment != self._last:
            new = self._last is not None and (cine or self._cine)
            self._last, self._cine = segment, cine
        return new, cine


def _stack(xs: Sequence[np.ndarray], ring: Optional[np.ndarray]) -> np.ndarray:
    """One (N, C, H, W) input from per-frame (1, C, H, W) inputs: a view when they lie in consecutive ring slots
    (the usual case: gated frames take no slot), else a copy (a batch that wraps around the ring's end)."""
    if len(xs) == 1:
        return xs[0]
    if ring is not None and all(x.base is ring for x in xs):
        first = (xs[0].ctypes.data - ring.ctypes.data) // ring[0].nbytes
        if first + len(xs) <= len(ring) and all(x.ctypes.data == ring[first + k].ctypes.data for k, x in enumerate(xs)):
            return ring[first : first + len(xs)]
    return np.concatenate(xs)


def _choose_roi(text: Optional[str], m: Manifest) -> Tuple[str, Optional[Tuple[int, int, int, int]], Dict[str, Any]]:
    """(mode, box, summary record) of the run's ROI: the one asked for, else the bundle's. A model trained on sector
    crops and run on something else is allowed (a known layout, a test) but warned about and recorded."""
    trained = "sector" if m.trained_on_sector else "none"
    mode, box = parse_roi(trained if text is None else text)
    record: Dict[str, Any] = {"mode": mode, "chosen_by": "bundle" if text is None else "argument", "bundle": trained}
    if trained == "sector" and mode != "sector":
        record["warning"] = ("the model was trained on sector crops; this run feeds it " +
                             ("whole frames" if mode == "none" else "a fixed box") + ", which it never saw in training")
        log.warning("--roi %s: %s (leave --roi out to crop the sector as in training)", text, record["warning"])
    return mode, box, record


def _no_sector_still_warning(m: Manifest) -> str:
    """What a run under roi sector says once when a still comes: why it is not classified and what to pass instead."""
    why = ("a still image (an image file, a single-frame DICOM) has no ultrasound sector to crop: the sector is found "
           "from speckle moving over a cine's frames")
    if m.trained_on_sector:
        return (f"the model was trained on sector crops and {why}, so stills abstain ({NO_SECTOR_STILL}); to classify "
                "them pass --roi x0,y0,x1,y1 with the image area of the stills (the crop the model saw), or --roi none "
                "(whole frames, text and UI included, which the model never saw in training: expect worse results)")
    return (f"--roi sector: {why}, so stills abstain ({NO_SECTOR_STILL}); leave --roi out to classify them whole, as "
            "this model was trained, or pass --roi x0,y0,x1,y1 with their image area")


class _Stages(NamedTuple):
    """The stages of a run that keep state from frame to frame, and the segment watches that reset them."""

    detector: Optional[SectorDetector]
    gate: Optional[QualityGate]
    smoother: Optional[CineSmoother]
    still: Optional[CineSmoother]  # --smoothing auto on DICOM with a cine: single-frame files shown as decided
    consumer_segments: _SegmentWatch
    feed_segments: _SegmentWatch


class PipelineState:
    """The stateful stages of one stream (sector detector, quality gate, smoothers and the segment watches that reset
    them) for a caller that runs that stream in several `run_pipeline` calls (`edgeclf profile`'s interleaved chunks):
    passed to each call, they carry over as in one continuous run (the sector locks once, smoothing goes on). The
    first call makes them; later calls must use the same bundle, options and kind of source (else ValueError)."""

    def __init__(self) -> None:
        self.key: Any = None
        self.stages: Optional[_Stages] = None


def _make_stages(m: Manifest, opts: RunOptions, source: FrameSource, roi_mode: str,
                 roi_box: Optional[Tuple[int, int, int, int]], floor: float, multilabel: bool) -> _Stages:
    detector = None
    if roi_mode != "none":
        from edgeclf.runtime.sector import SectorDetector

        detector = SectorDetector(roi=roi_box)
    gate = None
    if opts.quality:
        from edgeclf.runtime.quality import QualityGate

        gate = QualityGate()
    smoother = None
    still = None
    # DICOM or a watched folder: each multi-frame file (cine) starts afresh, smoothed or not (even shown as decided,
    # its first gate-failed frames would otherwise show the last file's average: another patient's).
    per_file = getattr(source, "kind", "") in ("dicom", "watch")
    if not multilabel:
        from edgeclf.runtime.smoothing import CINE, SINGLE_IMAGE, CineSmoother

        cine = opts.smoothing == "cine" or (opts.smoothing == "auto" and _video_like(source))
        smoother = CineSmoother.from_manifest(m, config=CINE if cine else SINGLE_IMAGE, min_confidence=floor)
        if cine and per_file and opts.smoothing == "auto":
            still = CineSmoother.from_manifest(m, config=SINGLE_IMAGE, min_confidence=floor)
    # feed_segments: the feeder's segment (see _segment) of the last frame read, and whether it was a cine: the sector
    # detector and the gate run in that thread, so they are reset there.
    return _Stages(detector, gate, smoother, still, _SegmentWatch(dicom=per_file), _SegmentWatch(dicom=True))


def run_pipeline(
    bundle: Bundle,
    source: FrameSource,
    backend: Backend,
    sinks: Sequence[Sink],
    *,
    max_frames: Optional[int] = None,
    min_confidence: Optional[float] = None,
    options: Optional[RunOptions] = None,
    stop: Optional[threading.Event] = None,
    on_event: Optional[Callable[[str, str, Dict[str, Any]], None]] = None,
    state: Optional[PipelineState] = None,
) -> RunSummary:
    """Classify every frame of `source`, writing one record per frame to each sink.

    Record: {"frame", "timestamp" (monotonic capture time), "time" (wall clock), the source's RECORD_META fields it
    gives ("file_index", "file_frame", "watch_key": which file and frame of it; "file_frames": the frames that file
    holds), "label" (the shown label: smoothed
    for cine; None on abstain or multilabel), "labels" (multilabel), "abstain", "abstain_reason" (quality reasons
    joined by ",", "low_confidence", "settling", "backend_error", "invalid_output", "frame_error", "sector_warmup" or
    "no_sector_still"), "confidence", "smoothed_probs" ({label: p}, the smoother's average after this frame: for a
    cine frame the gate stopped, the average its clip holds through the gap; None for a still that was not
    classified), "label_changed" (the shown label differs from the previous frame's of the same stream; a still has
    none before it: true when it shows a label),
    "frame_label" (this frame's own decision, None when not classified), "probs" (this frame's calibrated
    probabilities, None when not classified), "quality" (list of reasons, empty when fine), "latency_ms": {stage: ms,
    "total": capture-to-result, taken before any sink runs (the overlay shows its own capture-to-display)}; "infer" is
    None for a frame that was not inferred (quality gate, frame error)}.
    Stage statistics (summary "stages_ms") are each over the frames that went through that stage: "infer" over the
    inferred frames only (its "n"; frames turned away are counted in "quality_flagged" and "frame_errors"), every
    other stage and "latency" over every recorded frame (a gated frame is still read, checked, decided and written).
    Sources with ``ack`` (watched folders) are acknowledged after every sink wrote the frame's record; for those
    that need acks, every sink's ``sync()`` (flush and fsync) runs first, so a file marked done has its results
    on disk. A DataError of the sector or quality stage on one frame (its data: e.g. a sector mask too thin to
    judge) does not end the run: that frame abstains with reason "frame_error" and is counted
    (summary.extra["frame_errors"]); any other exception there still ends the run.
    DICOM and watched folders: the smoother starts afresh at each multi-frame file, smoothed or not (one cine does not
    bleed into the next, nor do its first gate-failed frames show the file before's average); under "auto",
    single-frame files of a folder holding a cine are shown as decided. A still (see `_still`) shown as decided is
    independent of every other frame (``CineSmoother.update_still``): nothing carries over to or from it, and one the
    gate stopped has "smoothed_probs" None and "label_changed" false; only an explicit "cine" smooths stills as one
    cine (a cine exported one file per frame). Likewise the smoother
    starts afresh at each new connection of a reconnecting live source (meta "connection"), and after a live source
    stalled (no frame for max(STALE_MIN_S, STALE_FRAMES frame periods)): then sinks with ``mark_stale(idle_s)`` (the
    overlay window) are told, no record is written, and summary.extra["stalls"] counts it. A source that waits by
    design (``waits_by_design``: a watched folder between files) never stalls: its last result stays shown.
    ROI: `options.roi`, else the bundle's (``Manifest.trained_on_sector``); summary.extra["roi"] says which, with a
    "warning" when a model trained on sector crops is fed anything else. Under roi "sector", a frame that comes before
    the sector locks (the first frames of a stream, a segment or a frame size) is not inferred: it abstains with
    "sector_warmup" (counted in summary.extra["sector_warmup"], not in "quality_flagged"). A still (see below) has no
    sector to lock under roi "sector" and the detector never sees it: unless the gate stops it (too_small, blank...),
    it is not inferred and abstains with "no_sector_still" (counted in summary.extra["no_sector_still"]), and the run
    logs one warning and puts it in summary.extra["roi"]["warning"]: pass a fixed box, or roi "none". A new segment
    (DICOM cine, connection) also resets the sector detector and, when it is a cine, the quality gate: a new scanner
    gets its own sector. Stills are judged by the quality gate each on its own (``QualityGate.check(still=True)``: blank,
    saturated, too small, empty by their own figures; never "frozen", never "empty" against other images' texture):
    every frame of a source that is not video-like (image files, a folder of single-frame DICOM files) and, in a DICOM
    folder or a watched folder, every frame of a file holding one frame. They neither read nor change the gate's
    stream state, so a cine around them is judged as though they were not there (summary.extra["quality"]["stills"]
    counts them).
    `stop` (set by a signal handler) or a sink's ``stop_requested`` ends the run after the current frame (the
    current batch for a signal, with `options.batch` > 1; frames read and not recorded are counted).
    A source error in the middle of a batch is raised after the frames read before it are recorded.
    A backend error on a frame (a GPU hiccup) does not end the run: that frame's record abstains with reason
    "backend_error", the summary counts it, and `on_event("fault" | "recovery", message, details)` is told
    (the audit log). Non-finite outputs (NaN, inf: e.g. an fp16 overflow) are treated alike, with reason
    "invalid_output". MAX_BACKEND_ERRORS failures in a row (either kind) end the run with the last error,
    raised after that frame's abstain record is written.
    `state` (a PipelineState): the stateful stages carry over from the previous call given the same object, as
    though this call went on from where it stopped (one stream in several calls); None: a fresh start.
    """
    opts = options or RunOptions(min_confidence=min_confidence)
    if min_confidence is not None and options is not None and options.min_confidence is None:
        opts = dataclasses.replace(options, min_confidence=min_confidence)
    m = bundle.manifest
    pre = Preprocessor(m.preprocess)
    floor = opts.confidence_floor(m)
    multilabel = m.task == "multilabel"

    roi_mode, roi_box, roi_record = _choose_roi(opts.roi, m)
    if roi_mode != "none":
        from edgeclf.runtime.sector import apply_sector
    state_key = (id(m), roi_mode, roi_box, opts.quality, opts.smoothing, floor, getattr(source, "kind", ""))
    if state is not None and state.stages is not None:
        if state.key != state_key:
            raise ValueError("a PipelineState carries one stream's stages: pass it only to calls with the same bundle, "
                             "options and kind of source")
        stages = state.stages
    else:
        stages = _make_stages(m, opts, source, roi_mode, roi_box, floor, multilabel)
        if state is not None:
            state.key, state.stages = state_key, stages
    detector, gate, smoother, still = stages.detector, stages.gate, stages.smoother, stages.still
    consumer_segments, feed_segments = stages.consumer_segments, stages.feed_segments
    ack = getattr(source, "ack", None)
    # Sources that need acks (watched folders) mark a file done durably at the ack: the results must be on disk
    # first (flushed and fsynced), whatever the sinks' own fsync interval, or a power loss loses them for good.
    syncs: List[Callable[[], None]] = []
    if ack is not None and getattr(source, "needs_ack", False):
        syncs = [fn for fn in (getattr(sk, "sync", None) for sk in sinks) if callable(fn)]
    live = bool(getattr(source, "live", False))
    video_like = _video_like(source)  # frames of a source that is not are stills to the quality gate (_still)
    watch_stalls = live and not waits_by_design(source)  # a watched folder waiting for its next file is no stall

    summary = RunSummary()
    summary.extra["roi"] = roi_record
    cine_run = smoother is not None and smoother.config.min_dwell_frames > 1
    summary.extra["smoothing"] = "cine" if cine_run else "off"
    t_start = time.perf_counter()
    # Recorded files (not live, not paced) may be inferred several frames per call: more frames/s, later results.
    batch = opts.batch if not live else 1
    ring: Optional[np.ndarray] = None
    slot = [0]  # the feeder's next ring slot
    if batch > 1:
        # Slots in use at once: a batch held here, a queue of `batch` and one being prepared: 2 * batch + 1.
        spec = m.preprocess
        ring = np.empty((3 * batch, spec.channels, spec.size[0], spec.size[1]), np.float32)

    frame_errors = [0]  # counted in the feeder thread, read after it stopped
    warmups = [0]  # frames that abstained with SECTOR_WARMUP (counted in the feeder thread)
    sectorless = [0]  # stills that abstained with NO_SECTOR_STILL (counted in the feeder thread)
    stills_warning = _no_sector_still_warning(m) if roi_mode == "sector" else ""

    def frame_error(index: int, stage: str, exc: BaseException) -> Tuple[str, ...]:
        """Count and log a DataError of one frame's sector or quality stage; that frame abstains with FRAME_ERROR."""
        frame_errors[0] += 1
        level = log.warning if frame_errors[0] <= _FRAME_ERRORS_LOGGED else log.debug
        level("frame %d: the %s stage failed on it (%s); the frame abstains with reason %s", index, stage,
              " ".join(str(exc).split())[:300], FRAME_ERROR)
        return _FRAME_ERROR_REASONS

    def produce() -> Any:
        """Read one frame and prepare it: (frame, x or None, reasons, capture s, preprocess s, (sector s,
        gate s, model input s)), None at the end of the source, or IDLE while a live source has nothing new."""
        t0 = time.perf_counter()
        # Live sources are read with a timeout so that a stop request is seen while no frame comes.
        frame = source.read(0.5) if live else source.read()
        t1 = time.perf_counter()
        if frame is None:
            if live and not (getattr(source, "ended", False) or getattr(source, "closed", False)):
                return _IDLE  # nothing new yet (a watched folder, a stream reconnecting)
            return None
        image = frame.image
        still = _still(frame.meta, video_like)
        if feed_segments.update(frame.meta)[0]:
            # A new cine or connection (another scanner, layout or patient): its own sector and gate baseline. A still
            # leaves the gate's stream state alone: nothing to reset for it.
            if detector is not None:
                detector.reset()
            if gate is not None and not still:
                gate.reset()
        mask = None
        reasons: Tuple[str, ...] = ()
        t2 = t1
        stage = "sector"
        gated = False
        # A still has no sector to find (one frame, nothing moving) and is never fed to the detector: a "sector" locked
        # from unrelated images would be none of theirs. The gate still judges it on its own (too_small, blank first).
        sectorless_still = roi_mode == "sector" and still
        try:
            if detector is not None and not sectorless_still:
                sector = detector.update(image)
                if roi_mode == "sector" and detector.provisional:
                    reasons = _WARMUP_REASONS  # not locked yet: no crop to classify (nor to judge the quality of)
                    warmups[0] += 1
                else:
                    mask = sector.mask if sector.kind != "full" else None
                    image = apply_sector(image, sector)
            t2 = time.perf_counter()
            stage = "quality"
            if gate is not None and not reasons:
                gated = True
                # The gate subsamples before any colour conversion; a still is judged on its own.
                reasons = gate.check(frame.image, mask, still=still).reasons
        except DataError as exc:  # this frame's data (not the code): the frame abstains, the run goes on
            reasons = frame_error(frame.index, stage, exc)
        if sectorless_still and not reasons:
            reasons = _NO_SECTOR_STILL_REASONS
            sectorless[0] += 1
            if sectorless[0] == 1:  # once per run: a watched folder of stills would say it for ever
                log.warning("%s", stills_warning)
        t3 = time.perf_counter()
        x = None
        if not reasons:
            if ring is None:
                x = pre(image)
            else:  # straight into the next slot of the ring, so that a batch is a view of it, not a copy
                k = slot[0]
                x = pre(image, ring[k : k + 1])
                slot[0] = (k + 1) % len(ring)
        t4 = time.perf_counter()
        # A part that did not run is not timed (no zeros diluting the medians).
        parts = (t2 - t1 if detector is not None and not sectorless_still else None, t3 - t2 if gated else None,
                 t4 - t3 if x is not None else None)
        return frame, x, reasons, t1 - t0, t4 - t1, parts

    # Pipelined: a feeder thread reads and prepares frame n+1 while this thread infers frame n (OpenCV and
    # numpy release the GIL). It holds at most max(2, batch) prepared frames, so a live frame waits at most 2.
    feeder = _Feeder(produce, depth=max(2, batch)) if opts.pipelined else None
    unprocessed = 0
    held = 0  # frames of the current batch read and prepared but not yet recorded (counted if the run stops)
    backend_errors = invalid_outputs = errors_in_a_row = batch_retries = 0
    ended = False
    last_seen: List[Optional[float]] = [None]  # monotonic time of the last frame recorded (live sources)
    stale = [False]  # whether the current stall was already counted and the smoother reset
    stalls = [0]

    def stalled() -> None:
        """No frame from a live source for a while: past the threshold, reset and mark the display stale."""
        if last_seen[0] is None:
            return  # nothing shown yet
        idle = time.monotonic() - last_seen[0]
        fps = getattr(source, "fps", None)
        after = max(STALE_MIN_S, STALE_FRAMES / fps) if isinstance(fps, (int, float)) and fps > 0 else STALE_MIN_S
        if idle < after:
            return
        if not stale[0]:
            stale[0] = True
            stalls[0] += 1
            log.info("no frame from the live source for %.1fs: the display is marked stale and smoothing restarts", idle)
            for sm_ in (smoother, still):
                if sm_ is not None:
                    sm_.reset()
        for sink in sinks:
            mark = getattr(sink, "mark_stale", None)
            if callable(mark):
                mark(idle)

    try:
        while not ended and (max_frames is None or summary.frames < max_frames):
            if stop is not None and stop.is_set():
                summary.stopped_by = "signal"
                break
            want = batch if max_frames is None else min(batch, max_frames - summary.frames)
            items: List[Any] = []
            source_error: Optional[BaseException] = None  # raised once the frames read before it are recorded
            while len(items) < want:
                try:
                    item = feeder.get(0.5) if feeder is not None else produce()
                except Exception as exc:  # noqa: BLE001 - re-raised below, after this batch's earlier frames
                    if not items:
                        raise
                    source_error = exc
                    break
                if item is _IDLE:
                    if items:
                        break
                    if watch_stalls:
                        stalled()
                    if not stale[0]:  # a marked-stale display was just redrawn; any other is kept responsive
                        for sink in sinks:
                            refresh = getattr(sink, "refresh", None)
                            if callable(refresh):
                                refresh()
                    if any(s.stop_requested for s in sinks):  # e.g. 'q' on a window while no frame comes
                        summary.stopped_by = "sink"
                        break
                    if stop is not None and stop.is_set():
                        break
                    continue
                if item is None:
                    ended = True
                    break
                items.append(item)
            if not items:
                if summary.stopped_by == "sink":
                    break
                continue  # the source ended (the loop test sees it) or a stop was requested (seen above)
            held = len(items)
            # One inference call for the batch's classified frames (gated frames are not inferred).
            todo = [k for k, it in enumerate(items) if it[1] is not None]
            logits_of: Dict[int, Any] = {}  # item position -> its logits (1, K), or the exception its inference raised
            infer_s = stack_s = 0.0
            if todo:
                t_stack = time.perf_counter()
                xs = _stack([items[k][1] for k in todo], ring)
                t_inf = time.perf_counter()
                stack_s = (t_inf - t_stack) / len(todo)  # layout work: each frame's share goes to its preprocess time
                alone: Sequence[int] = ()  # frames inferred once more on their own
                try:
                    out = backend.infer(xs)  # the backend checks it returns one row per input
                    logits_of = {k: out[j : j + 1] for j, k in enumerate(todo)}
                    if len(todo) > 1:  # a row that is not finite: that frame alone, as batch 1 would have seen it
                        alone = [k for j, k in enumerate(todo) if not np.isfinite(out[j]).all()]
                except Exception as exc:  # noqa: BLE001 - recorded on the frame, counted, re-raised when it persists
                    if len(todo) == 1:
                        logits_of = {todo[0]: exc}
                    else:  # a hiccup must not fail a whole batch
                        alone = todo
                        log.warning("inference of a batch of %d frames failed (%s: %s); each frame is inferred on its own",
                                    len(todo), type(exc).__name__, " ".join(str(exc).split())[:200])
                if alone:
                    batch_retries += 1
                    for k in alone:
                        try:
                            logits_of[k] = backend.infer(items[k][1])
                        except Exception as one:  # noqa: BLE001 - as above
                            logits_of[k] = one
                infer_s = (time.perf_counter() - t_inf) / len(todo)  # each frame's share of the call
            for pos, (frame, x, reasons, cap_s, pre_s, parts_s) in enumerate(items):
                if x is not None and stack_s:
                    pre_s += stack_s
                    parts_s = (parts_s[0], parts_s[1], parts_s[2] + stack_s)
                t3 = time.perf_counter()  # postprocess starts here (inference was timed for the batch above)
                probs_row: Optional[Tuple[float, ...]] = None
                decision: Any = None
                # BACKEND_ERROR, INVALID_OUTPUT, FRAME_ERROR, SECTOR_WARMUP or NO_SECTOR_STILL: this frame abstains with
                # it (not a quality reason)
                fault: Optional[str] = (FRAME_ERROR if reasons is _FRAME_ERROR_REASONS else
                                        SECTOR_WARMUP if reasons is _WARMUP_REASONS else
                                        NO_SECTOR_STILL if reasons is _NO_SECTOR_STILL_REASONS else None)
                fatal: Optional[BaseException] = None  # the failure that ends the run, raised once the frame is recorded
                if x is not None:
                    logits = logits_of[pos]
                    if isinstance(logits, BaseException):
                        fault, fatal = BACKEND_ERROR, logits
                    else:
                        try:
                            if multilabel:
                                probs = probabilities(logits, m.task, m.temperature)
                                probs_row = tuple(probs[0].tolist())
                                decision = decide(probs, m.decision)[0]
                            else:  # one frame: plain floats, the same numbers as probabilities()/decide() on arrays
                                probs_row = frame_probabilities(logits, m.task, m.temperature)
                                decision = decide_frame(probs_row, m.decision)
                        except DataError as exc:  # a NaN or infinite logit (e.g. an fp16 overflow): this frame only
                            fault, fatal = INVALID_OUTPUT, exc
                            probs_row = decision = None
                    if fault is None:
                        if errors_in_a_row and on_event is not None:
                            on_event("recovery", f"inference works again after {errors_in_a_row} failed frame(s)", {"frame": frame.index})
                        errors_in_a_row = 0
                    else:
                        assert fatal is not None
                        if fault == BACKEND_ERROR:
                            backend_errors += 1
                        else:
                            invalid_outputs += 1
                        errors_in_a_row += 1
                        text = f"{type(fatal).__name__}: {' '.join(str(fatal).split())[:300]}"
                        log.warning("frame %d: %s (%s); the frame abstains", frame.index,
                                    "inference failed" if fault == BACKEND_ERROR else "the model's output is not finite", text)
                        if on_event is not None:
                            on_event("fault", text, {"frame": frame.index, "in_a_row": errors_in_a_row, "reason": fault})
                        if errors_in_a_row < MAX_BACKEND_ERRORS:
                            fatal = None
                        reasons = (fault,)
                # Postprocess is timed from t3, right after infer: probabilities, decision, smoothing and the record.
                # timestamp: monotonic capture time (for latency); time: wall clock of the result (for people).
                record: Dict[str, Any] = {"frame": frame.index, "timestamp": round(frame.timestamp, 6), "time": round(time.time(), 3)}
                meta = frame.meta
                for key in RECORD_META:
                    value = meta.get(key)
                    if isinstance(value, (int, str)) and not isinstance(value, bool):
                        record[key] = value
                if multilabel:
                    if decision is None:
                        record.update(label=None, labels=None, abstain=True, abstain_reason=",".join(reasons), confidence=None)
                    else:
                        present = [m.labels[k] for k in np.flatnonzero(decision)]
                        record.update(label=None, labels=present, abstain=False, abstain_reason=None, confidence=None)
                    record["frame_label"] = None
                else:
                    assert smoother is not None
                    sm = smoother
                    # A new segment (_SegmentWatch): the smoother starts afresh, as the sector detector and the gate
                    # do in produce(), the thread they run in.
                    new_segment, multi = consumer_segments.update(meta)
                    if new_segment:
                        smoother.reset()
                    if still is not None and not multi:
                        sm = still
                    # A still shown as decided (not under cine smoothing the user asked for: frames of one cine exported
                    # one per file) is independent of every other frame: nothing carries over to or from it.
                    if sm is still or (not cine_run and _still(meta, video_like)):
                        res = sm.update_still(probs_row, quality_ok=not reasons, reasons=reasons)
                    else:
                        res = sm.update(probs_row, quality_ok=not reasons, reasons=reasons)
                    record.update(sm.record_fields(res))
                    record["frame_label"] = None if decision is None else m.labels[decision]
                # Unrounded: the clip aggregator and offline aggregation of the results file use the very numbers
                # this frame's frame_label came from (rounding flipped near-ties); JSON keeps floats exactly.
                record["probs"] = None if probs_row is None else dict(zip(m.labels, probs_row))
                record["quality"] = [] if fault is not None else list(reasons)
                t4 = time.perf_counter()
                record["latency_ms"] = {
                    "capture": round(cap_s * 1e3, 3),
                    "preprocess": round(pre_s * 1e3, 3),
                    "infer": round(infer_s * 1e3, 3) if x is not None else None,  # None: not inferred (gated)
                    "postprocess": round((t4 - t3) * 1e3, 3),
                    "total": round((time.monotonic() - frame.timestamp) * 1e3, 3),
                }
                for sink in sinks:
                    if sink.needs_image:
                        sink.write(record, image=frame.image)
                    else:
                        sink.write(record)
                if ack is not None:
                    for sync in syncs:
                        sync()  # the record on disk before the source marks the frame done (watched folders)
                    ack(frame)  # only after every sink holds the record: a crash before this redoes the frame
                if fatal is not None:
                    raise fatal  # MAX_BACKEND_ERRORS failures in a row: the run ends, this frame's record written
                t5 = time.perf_counter()
                if live:
                    last_seen[0], stale[0] = time.monotonic(), False
                summary.frames += 1
                held -= 1
                if record.get("abstain"):
                    summary.abstained += 1
                    why = str(record.get("abstain_reason") or "")
                    summary.abstain_reasons[why] = summary.abstain_reasons.get(why, 0) + 1
                    key = "(abstain)"
                elif multilabel:
                    key = "+".join(record["labels"]) or "(none)"
                else:
                    key = str(record["label"])
                if reasons and fault is None:
                    summary.quality_flagged += 1
                summary.label_counts[key] = summary.label_counts.get(key, 0) + 1
                for stage, ms in zip(STAGES, (cap_s, pre_s, infer_s if x is not None else None, (t4 - t3), (t5 - t4))):
                    if ms is not None:  # a gated frame was not inferred: no 0 ms in the infer statistics
                        summary.timings_ms[stage].append(ms * 1e3)
                summary.timings_ms["latency"].append(record["latency_ms"]["total"])
                for part, sec in zip(PREPROCESS_PARTS, parts_s):
                    if sec is not None:
                        summary.preprocess_parts_ms[part].append(sec * 1e3)
                log.debug("frame %d -> %s", frame.index, key)
                if any(s.stop_requested for s in sinks):
                    summary.stopped_by = "sink"
                    break
            if summary.stopped_by == "sink":
                break
            if source_error is not None:
                raise source_error
    finally:
        # Frames read and prepared but not recorded when the run stopped early: the rest of a batch, the feeder's.
        unprocessed = held + (feeder.close() if feeder is not None else 0)
    summary.wall_s = time.perf_counter() - t_start
    summary.written = min((s.written for s in sinks), default=summary.frames)
    # Frames read and prepared when the run stopped early (max frames, a signal, a sink): counted.
    summary.extra["read_not_classified"] = unprocessed
    summary.extra["backend_errors"] = backend_errors
    summary.extra["invalid_outputs"] = invalid_outputs
    summary.extra["frame_errors"] = frame_errors[0]  # frames the sector or quality stage failed on (abstained)
    summary.extra["sector_warmup"] = warmups[0]  # frames before the sector locked (abstained, not inferred)
    summary.extra["no_sector_still"] = sectorless[0]  # stills under roi sector (abstained, not inferred)
    if sectorless[0] and not roi_record.get("warning"):
        roi_record["warning"] = (f"{sectorless[0]} still image(s) abstained ({NO_SECTOR_STILL}): a still has no sector to "
                                 "crop; pass --roi x0,y0,x1,y1 with their image area" +
                                 (", or --roi none (whole frames, which the model never saw in training)"
                                  if m.trained_on_sector else ", or leave --roi out"))
    summary.extra["batch"] = batch  # frames per inference call: 1 for live and paced sources whatever was asked
    summary.extra["stalls"] = stalls[0]  # times a live source gave no frame past the stale threshold
    summary.extra["batch_retries"] = batch_retries  # batches (some of) whose frames were inferred again one by one
    if detector is not None:
        sec = detector.sector
        summary.extra["sector"] = {"stats": detector.stats, "kind": sec.kind if sec is not None else None,
                                   "bbox": list(sec.bbox) if sec is not None else None}
    if gate is not None:
        summary.extra["quality"] = gate.stats
    if smoother is not None:
        counts = dict(smoother.counts)
        if still is not None and still.counts.get("frames"):
            for what, n in still.counts.items():
                if what != "resets":
                    counts[what] = counts.get(what, 0) + n
        summary.extra["smoother"] = counts
    stats = getattr(source, "stats", None)
    if callable(stats):
        summary.extra["source_stats"] = stats()
    return summary
