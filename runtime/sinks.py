"""Where results go. Every sink counts what it wrote, so nothing is dropped without a count.

The pipeline hands each sink one record per frame (see ``edgeclf.runtime.pipeline.run_pipeline``):
``{"frame", "timestamp" (monotonic capture s), "time" (wall clock s), "label", "abstain", "abstain_reason",
"probs" {label: p}, "latency_ms" {stage: ms, "total"}}``. Sinks that draw the frame (:class:`VideoRecorderSink`
here, ``edgeclf.runtime.overlay.OverlayWindow``) have ``needs_image = True`` and are called as
``sink.write(record, image=frame.image)`` with the frame's uint8 (H, W) gray or (H, W, 3) **RGB** image;
the others are called as ``sink.write(record)``. A sink may set ``stop_requested`` to ask the pipeline to
stop (the overlay window's q/Esc, a closed stdout pipe).

Sinks are context managers; ``close()`` is idempotent. ``sync()`` makes what a sink wrote durable (the
results file: fsync); the pipeline calls it before acknowledging a frame of a watched folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import stat
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import ConfigError, DataError, EdgeclfError
from edgeclf.runtime.clips import FILE_KEYS, ClipAggregator, FileClipAggregator, file_of

__all__ = [
    "Sink",
    "JsonlSink",
    "ListSink",
    "read_jsonl",
    "check_append_tail",
    "tag_run",
    "VideoRecorderSink",
    "VIDEO_FOURCC",
    "ClipSummary",
    "SummarySink",
    "summarize",
    "StdoutSink",
    "percent_text",
    "check_output_path",
    "check_video_path",
]

logger = logging.getLogger(__name__)

#: Container extension -> the FourCC the recorder uses (pip OpenCV has no H.264 encoder).
VIDEO_FOURCC: Dict[str, str] = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}


def check_output_path(path: Union[str, os.PathLike[str]], *, option: str, example: str) -> str:
    """Raise ConfigError (one line) when `path` cannot become a file: it is a folder, or the nearest existing
    folder above it is a file or not writable. Checked before a run starts, so a bad path fails in a second
    instead of after the whole run (and before any other output file is truncated). Returns the path."""
    p = os.fspath(path)
    if not p or p.endswith(("/", os.sep)) or os.path.isdir(p):
        raise ConfigError(f"{option} {p} is a folder; {option} takes a file name, e.g. {os.path.join(p, example)}")
    if os.path.exists(p) and os.access(p, os.W_OK):
        # an existing writable file (a service's pre-made results file in a read-only folder), or a pipe or
        # device such as /dev/stdout (written in place, never replaced: see SummarySink)
        return p
    probe = os.path.dirname(os.path.abspath(p))
    while not os.path.exists(probe):  # missing folders are made at open: what matters is the nearest existing one
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if not os.path.isdir(probe):
        raise ConfigError(f"{option} {p}: {probe} is a file, not a folder; choose another path for {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {p}: folder {probe} is not writable; choose a writable folder for {option}")
    return p


def check_video_path(path: Union[str, os.PathLike[str]], fourcc: Optional[str] = None) -> str:
    """The FourCC for recording to `path` (`fourcc` wins when given); ConfigError for an extension the
    recorder does not know (checked before anything is opened: a typo must cost nothing)."""
    p = os.fspath(path)
    ext = os.path.splitext(p)[1].lower()
    if fourcc is None:
        if ext not in VIDEO_FOURCC:
            raise ConfigError(
                f"cannot record video to {p}: extension {ext or '(none)'!r} is not one of "
                f"{', '.join(VIDEO_FOURCC)}; name the file e.g. run.mp4 or run.avi"
            )
        fourcc = VIDEO_FOURCC[ext]
    if not isinstance(fourcc, str) or len(fourcc) != 4:
        raise ConfigError(f"video fourcc is {fourcc!r}; allowed: 4 characters, e.g. 'mp4v' or 'MJPG'")
    return fourcc


def _full_disk_cause(path: str) -> Optional[str]:
    """Why writing `path` stopped short, where this machine shows it: this process's file size limit
    (``ulimit -f``) reached, or the disk's free space gone; None when neither shows (then it is only a guess)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    try:
        import resource  # POSIX only

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY and size >= soft:
            return f"the file reached this process's file size limit (ulimit -f) of {soft} bytes"
    except (ImportError, OSError, ValueError):
        pass
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except (AttributeError, OSError):  # no statvfs on Windows
        return None
    root = getattr(os, "geteuid", lambda: -1)() == 0
    free = (st.f_bfree if root else st.f_bavail) * st.f_frsize  # root may also fill the reserved blocks
    if free < _FULL_BELOW:
        return f"the disk is full ({free} bytes free)"
    return None


_FULL_BELOW = 1 << 20  # free bytes under which a write that stopped short is put down to a full disk


class Sink:
    """Base class. ``write(record, image=None)`` once per frame; ``written`` counts records handled.

    needs_image: True when the sink needs the frame image (passed as ``image=``).
    stop_requested: set by a sink that asks the pipeline to stop after this frame.
    """

    written = 0
    needs_image = False
    stop_requested = False

    def write(self, record: Dict[str, Any], image: Optional[NDArray[np.uint8]] = None) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Make every record written so far durable (flushed and on disk). The pipeline calls it before it
        acknowledges a frame to a source that needs acks (a watched folder marks the file done on disk).
        A no-op for sinks that keep nothing that must survive a power loss."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- JSONL


class JsonlSink(Sink):
    """One JSON object per line, written whole and flushed per line, so a killed run leaves only whole lines.

    Each line goes to the OS in one unbuffered write (nothing waits in a Python buffer). Surviving a
    power loss also needs fsync:
    fsync_every: seconds between fsyncs (checked when a line is written) and one at close; 0 = after
        every line; None (default) = never (the OS writes back within its own interval). ``fsync=True``
        is the older spelling of ``fsync_every=0``. On a cart that may lose power, 1.0 costs one fsync
        a second and loses at most about a second of results; :func:`read_jsonl` tolerates the torn
        last line such a loss can leave.
    A write or fsync that fails (a full disk: ENOSPC, a failing one: EIO) is never skipped: the partial
    line is cut off again (the file keeps whole lines only; a line whose own fsync failed is cut off and not
    counted too, as the sinks after this one never get that result), the sink remembers the failure (``failed``)
    and raises EdgeclfError naming the file and how many results it holds against how many were
    produced; every later write raises the same, and close() does not raise it a second time.
    ``sync()`` fsyncs now when lines are unsynced, whatever `fsync_every` says (even None): the pipeline calls
    it before a watched folder marks a file done, one fsync per file at X-ray rates.
    Counts: ``written`` lines, ``fsyncs`` done, ``unsynced`` lines written since the last fsync.

    append: keep what the file holds and add after it (a service that restarts writes one file across runs);
        default: the file is replaced. Before the first line is added, the end of the file is checked as
        :func:`read_jsonl` reads it: a torn last line that a power loss left (cut short, or NUL bytes where
        data never reached the disk) is cut off, counted in ``torn_cut`` and logged as a warning; a whole last
        result that only lost its newline is kept and the newline restored (``newline_restored``). An end that
        is not a torn write (an edited or foreign file) raises DataError and nothing is written. Only the
        file's end is read, so opening a large file stays fast.
    run_id: written as ``"run"`` first in every line (:func:`tag_run`), so that the runs one file holds can be
        told apart (frame numbers start again at each run).
    """

    def __init__(
        self, path: Union[str, os.PathLike[str]], *, fsync: bool = False, fsync_every: Optional[float] = None,
        append: bool = False, run_id: Optional[str] = None,
    ) -> None:
        self.path = os.fspath(path)
        if fsync_every is not None and (isinstance(fsync_every, bool) or not isinstance(fsync_every, (int, float))
                                        or not (fsync_every >= 0 and math.isfinite(fsync_every))):
            raise ConfigError(f"fsync_every is {fsync_every!r}; allowed: seconds >= 0 (0 = every line) or None (never)")
        self.fsync_every: Optional[float] = 0.0 if fsync else (None if fsync_every is None else float(fsync_every))
        self.fsync = self.fsync_every == 0.0
        self.written = 0
        self.fsyncs = 0
        self.failed: Optional[str] = None  # the error message once a write or fsync failed
        self._synced = 0
        self._bytes = 0  # size of the whole lines written: where a failed write is cut back to
        self._last_sync = time.monotonic()
        self._dir_synced = False
        self.append = bool(append)
        self.run_id = run_id
        self.torn_cut = 0  # torn lines cut off the end of the existing file (append)
        self.newline_restored = False  # the existing file's last result got back its newline (append)
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            # Unbuffered: a line is in the OS or not at all, never half in a Python buffer. "a+b": every write
            # goes to the end (O_APPEND); reading and truncating the end stay possible.
            self._f: Optional[Any] = open(self.path, "a+b" if self.append else "wb", buffering=0)  # noqa: SIM115
        except OSError as exc:
            raise EdgeclfError(f"cannot write results to {self.path}: {exc.strerror}; choose another --out") from None
        if self.append:
            try:
                self._bytes = self._repair_end(self._f)
            except OSError as exc:
                self._f.close()
                self._f = None
                raise EdgeclfError(f"cannot append results to {self.path}: {exc.strerror}; check the disk or choose another --out") from None
            except BaseException:
                self._f.close()
                self._f = None
                raise

    def _repair_end(self, f: Any) -> int:
        """Make the existing file end in a whole line before anything is appended; returns its size then."""
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return 0  # a pipe or device: nothing to repair, and it cannot be cut
        size = os.fstat(f.fileno()).st_size
        keep, torn, add_newline = _plan_end(f, size, self.path)
        if keep < size:
            f.truncate(keep)
            self.torn_cut = torn
            logger.warning("results file %s: cut off %d torn line(s) (%d bytes) at its end, left by a power loss, "
                           "before appending", self.path, torn, size - keep)
        if add_newline:
            f.write(b"\n")
            keep += 1
            self.newline_restored = True
            logger.warning("results file %s: its last result had lost its newline (power loss); restored it before appending",
                           self.path)
        return keep

    @property
    def unsynced(self) -> int:
        """Lines written since the last fsync (all of them when fsync is off)."""
        return self.written - self._synced

    def _sync(self, f: Any, lines: Optional[int] = None) -> None:
        """fsync `f`; on success `lines` (default: ``written``) are the lines on disk."""
        os.fsync(f.fileno())
        if not self._dir_synced:  # the new file's directory entry must survive too
            self._dir_synced = True
            try:
                fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:  # not supported everywhere (e.g. Windows); the file's own fsync still holds
                logger.debug("directory fsync not supported for %s", self.path)
        self.fsyncs += 1
        self._synced = self.written if lines is None else lines
        self._last_sync = time.monotonic()

    def _fail(self, f: Any, exc: OSError, doing: str) -> None:
        """Cut a partly written (or written but unsynced) line off, remember the failure and raise it as one line.

        doing: "write" (the line did not go out whole), "sync line" (it went out but its fsync failed: it is cut
        off too, so the file never holds a result the sinks after this one did not get) or "sync" (sync())."""
        cut = ""
        try:
            f.truncate(self._bytes)
        except (OSError, ValueError, AttributeError) as cut_exc:  # /dev/full and pipes cannot be truncated
            logger.debug("could not cut a partial line from %s: %s", self.path, cut_exc)
            cut = f" (it could not be cut off again: result {self.written + 1} may be in the file too)"
        why = exc.strerror or str(exc) or type(exc).__name__
        earlier = " after the earlier runs' results" if self.append else ""
        if doing == "write":
            self.failed = (
                f"writing result {self.written + 1} to {self.path} failed ({why}); the file holds {self.written} "
                f"whole results of the {self.written + 1} produced so far{earlier} and the run stopped there; free space "
                "or choose another --out"
            )
        elif doing == "sync line":
            unsafe = f" (the last {self.unsynced} may not survive a power loss)" if self.unsynced else ""
            self.failed = (
                f"syncing result {self.written + 1} to {self.path} to disk failed ({why}); the file holds {self.written} "
                f"whole results{unsafe} of the {self.written + 1} produced so far{earlier}{cut} and the run stopped "
                "there; check the disk or choose another --out"
            )
        else:
            self.failed = (
                f"syncing {self.path} to disk failed ({why}); {self.written} results were written but the last "
                f"{self.unsynced} may not survive a power loss; the run stopped there; check the disk"
            )
        raise EdgeclfError(self.failed)

    def write(self, record: Dict[str, Any], image: Optional[NDArray[np.uint8]] = None) -> None:
        if self.failed is not None:
            raise EdgeclfError(self.failed)
        f = self._f
        if f is None:
            raise EdgeclfError(f"results file {self.path} is already closed")
        line = record if self.run_id is None else tag_run(record, self.run_id)
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                n = f.write(view)
                if not n:  # a raw write that takes nothing (a non-blocking pipe): not a whole line
                    raise OSError(errno.EIO, "the file took no bytes")
                view = view[n:]
        except OSError as exc:
            self._fail(f, exc, "write")
        every = self.fsync_every
        if every is not None and (every == 0.0 or time.monotonic() - self._last_sync >= every):
            try:
                self._sync(f, self.written + 1)
            except OSError as exc:
                # Not counted and cut off again: a raise here means the sinks after this one never see the
                # result, so the file must not keep it either (the audit log would read it as appended later).
                self._fail(f, exc, "sync line")
        self._bytes += len(data)
        self.written += 1

    def sync(self) -> None:
        """fsync the lines written since the last fsync (nothing to do when none are): each line already
        went to the OS whole in an unbuffered write, so this puts them on the disk. A failure raises
        EdgeclfError (as a failed write does) and every later write raises it again."""
        if self.failed is not None:
            raise EdgeclfError(self.failed)
        f = self._f
        if f is None or not self.unsynced:
            return
        try:
            self._sync(f)
        except OSError as exc:
            self._fail(f, exc, "sync")

    def close(self) -> None:
        f = self._f
        if f is None:
            return
        self._f = None
        try:
            if self.failed is None and self.fsync_every is not None and self.unsynced:
                self._sync(f)
        except OSError as exc:
            self.failed = (
                f"finishing {self.path} failed ({exc.strerror}); the last {self.unsynced} of {self.written} "
                "results may not be on disk"
            )
            raise EdgeclfError(self.failed) from None
        finally:
            try:
                f.close()
            except OSError:  # nothing is buffered; a close error changes nothing that was written
                logger.debug("closing %s failed", self.path)


def tag_run(record: Dict[str, Any], run_id: str) -> Dict[str, Any]:
    """The record as an appending run writes it: ``{"run": run_id, ...record}``. A reader keeps one run's
    results with ``r.get("run") == run_id`` (lines from a run without a run id have none)."""
    return {"run": run_id, **{k: v for k, v in record.items() if k != "run"}}


_END_WINDOW = 1 << 16  # bytes read from a results file's end at first; grown until a whole result is found


def _has_data(raw: bytes) -> bool:
    return bool(raw.strip(b" \t\r\x00"))


def _is_record(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def _plan_window(data: bytes, whole_file: bool, start: int, path: str) -> Optional[Tuple[int, int, bool]]:
    """(bytes of the file to keep, torn lines after them, whether the last kept line lacks its newline), judged
    as :func:`read_jsonl` judges lines; None when `data` (the file from byte `start`) holds no whole record."""
    lines = data.split(b"\n")  # the last piece is the unterminated rest (b"" when data ends with a newline)
    end = len(data)
    torn = 0
    torn_data = False
    # Without the file's start, the window's first piece may be the cut-off end of a line: it is not judged.
    for i in range(len(lines) - 1, -1 if whole_file else 0, -1):
        raw = lines[i]
        terminated = i < len(lines) - 1
        seg_start = end - len(raw) - (1 if terminated else 0)
        if not raw.strip(b" \t\r"):
            pass  # blank: not a result
        elif not _has_data(raw):  # only NUL bytes: the size grew but the data never reached the disk
            if torn_data:
                raise _damaged(path, start + end)
            torn += 1
        elif _is_record(raw):
            return start + end, torn, not terminated
        elif torn_data or (terminated and b"\x00" not in raw):
            raise _damaged(path, start + end)
        else:  # the last line with data, cut short or NUL-padded: a torn write
            torn_data = True
            torn += 1
        end = seg_start
    return (0, torn, False) if whole_file else None


def _damaged(path: str, at: int) -> DataError:
    return DataError(
        f"results file {path}: the line ending at byte {at} is neither a whole result nor a torn last line (the file was "
        "edited or is not an edgeclf results file); --append only cuts a torn last line; move the file away or choose another --out"
    )


def _plan_end(f: Any, size: int, path: str) -> Tuple[int, int, bool]:
    """How to make the results file `f` (`size` bytes) end in a whole line: (bytes to keep, torn lines cut, whether
    to restore the last result's newline). Reads only the file's end. DataError when the end is damaged."""
    window = _END_WINDOW
    while True:
        start = max(0, size - window)
        f.seek(start)
        chunks: List[bytes] = []
        want = size - start
        while want > 0:
            chunk = f.read(want)
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        plan = _plan_window(b"".join(chunks), start == 0, start, path)
        if plan is not None:
            return plan
        window *= 4


def check_append_tail(path: Union[str, os.PathLike[str]]) -> Tuple[int, int, bool]:
    """What ``JsonlSink(path, append=True)`` will do to the end of an existing results file, without changing
    it: (bytes kept, torn lines to cut, newline to restore). DataError (one line) when its end is damaged, so
    that a run can refuse before it loads a bundle. A file that does not exist or is not a regular file: (0, 0, False)."""
    p = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            return 0, 0, False  # a pipe or device (opening a FIFO to read it would wait for a writer)
        with open(p, "rb") as f:
            return _plan_end(f, os.fstat(f.fileno()).st_size, p)
    except FileNotFoundError:
        return 0, 0, False
    except OSError as exc:
        raise DataError(f"cannot read results file {p} to append to it: {exc.strerror}; check the path") from None


def read_jsonl(path: Union[str, os.PathLike[str]]) -> Tuple[List[Dict[str, Any]], int]:
    """Read a results file written by :class:`JsonlSink`: (records, torn).

    A power loss can leave the last line cut short (or padded with NUL bytes): that line is skipped and
    counted in `torn` (normally 0 or 1). A bad line anywhere else is not a torn write but a damaged file and raises
    DataError naming the line. Blank lines are skipped.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read results file {p}: {exc.strerror}; check the path") from None
    lines = data.split(b"\n")  # the last element is b"" when the file ends with a newline

    def has_data(raw: bytes) -> bool:
        return bool(raw.strip(b" \t\r\x00"))

    last = max((i for i, ln in enumerate(lines) if has_data(ln)), default=-1)
    records: List[Dict[str, Any]] = []
    torn = 0
    for i, raw in enumerate(lines):
        if not raw.strip(b" \t\r"):
            continue  # blank
        if not has_data(raw):  # only NUL bytes: the size grew but the data never reached the disk
            if i > last:
                torn += 1
                continue
            raise DataError(f"results file {p} line {i + 1} holds only NUL bytes before the end; the file is damaged")
        try:
            rec = json.loads(raw.decode("utf-8"))
            ok = isinstance(rec, dict)
        except (UnicodeDecodeError, ValueError):
            ok = False
        if ok:
            records.append(rec)
        elif i == last and (i == len(lines) - 1 or b"\x00" in raw):
            torn += 1
        else:
            raise DataError(
                f"results file {p} line {i + 1} is not a JSON object and is not a torn last line; the file is "
                "damaged (only a cut-short last line is tolerated)"
            )
    if torn:
        logger.warning("results file %s: skipped %d torn line(s) at the end after %d records", p, torn, len(records))
    return records, torn


class ListSink(Sink):
    """Keeps records in memory (tests, the demo's summary)."""

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []
        self.written = 0

    def write(self, record: Dict[str, Any], image: Optional[NDArray[np.uint8]] = None) -> None:
        self.records.append(record)
        self.written += 1


# --------------------------------------------------------------------------------------------- video


class VideoRecorderSink(Sink):
    """Write the frames, annotated with the overlay, to a video file.

    path: .mp4/.m4v/.mov/.mkv (FourCC mp4v) or .avi (MJPG); `fourcc` overrides.
    fps: the frame rate stored in the file (the source's fps), > 0.
    size: (width, height) of the video (the source's frame size), each rounded down to an even number (the
        encoders need even sizes): a frame of that size loses its odd last row or column (cropped, not scaled).
        A frame of another size is scaled to fit the video with its aspect ratio kept and black bars on the other
        sides (letterboxed: never stretched), warned about once; ``resized`` counts the frames whose size differs
        from the first frame's (a folder of images of mixed sizes).
    annotate: draw the overlay (label, confidence bar, abstain reason, fps, latency); False = raw frames.

    Called as ``write(record, image=frame_image)`` with uint8 (H, W) gray or (H, W, 3) RGB; ``written``
    counts frames handed to the encoder. The file is complete after close().
    """

    needs_image = True

    def __init__(
        self, path: Union[str, os.PathLike[str]], fps: float, size: Tuple[int, int], *,
        fourcc: Optional[str] = None, annotate: bool = True,
    ) -> None:
        from edgeclf.runtime import _cv
        from edgeclf.runtime.overlay import FpsMeter

        self.path = os.fspath(path)
        fourcc = check_video_path(self.path, fourcc)
        if os.path.exists(self.path) and not (os.path.isfile(self.path) or os.path.isdir(self.path)):
            # the container is finished by seeking back to its start: a pipe or device cannot take it
            raise ConfigError(f"--record {self.path} is not a regular file (a pipe or device); --record takes a video "
                              "file name, e.g. run.mp4")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (fps > 0 and math.isfinite(fps)):
            raise ConfigError(
                f"recording frame rate is {fps!r}; allowed: a number > 0; the source reports none, so give one "
                "(e.g. 30)"
            )
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ConfigError(f"recording size is {size!r}; allowed: (width, height) in pixels, both > 0")
        self.fps = float(fps)
        if min(size) < 2:
            raise ConfigError(f"recording size is {tuple(size)!r}; allowed: (width, height), both >= 2 pixels")
        self.size: Tuple[int, int] = (int(size[0]) // 2 * 2, int(size[1]) // 2 * 2)
        self.fourcc = fourcc
        self.annotate = annotate
        self.written = 0
        self.resized = 0
        self._first: Optional[Tuple[int, int]] = None  # the first frame's (width, height)
        self._letterboxed = False
        self._meter = FpsMeter()
        self._cv2 = _cv.cv2()
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot record video to {self.path}: {exc.strerror}; choose another --record") from None
        cv2 = self._cv2
        _cv.utf8_path(self.path, "--record file", ConfigError)
        self._vw: Any = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*fourcc), self.fps, self.size, True)
        if not self._vw.isOpened():
            self._vw.release()
            self._vw = None
            raise ConfigError(
                f"cannot record video to {self.path} with FourCC {fourcc!r}: OpenCV could not open a writer; "
                "check the folder is writable, or use .avi (MJPG)"
            )

    def write(self, record: Dict[str, Any], image: Optional[NDArray[np.uint8]] = None) -> None:
        if self._vw is None:
            raise EdgeclfError(f"video {self.path} is already closed")
        if image is None:
            raise TypeError("VideoRecorderSink.write needs the frame: call write(record, image=frame.image)")
        from edgeclf.runtime.overlay import draw_overlay, to_bgr

        cv2 = self._cv2
        img = np.asarray(image)
        h, w = img.shape[:2]
        if self._first is None:
            self._first = (w, h)
        elif (w, h) != self._first:
            self.resized += 1
        vw, vh = self.size
        if (w, h) != self.size:
            if 0 <= w - vw <= 1 and 0 <= h - vh <= 1:  # an odd size rounded down to even: crop that pixel
                img = np.ascontiguousarray(img[:vh, :vw])
            else:
                if not self._letterboxed:
                    self._letterboxed = True
                    logger.warning("recording %s: frames of %dx%d are scaled to fit %dx%d, aspect ratio kept (black "
                                   "bars); those of another size than the first frame are counted in the summary's "
                                   "record.resized", self.path, w, h, vw, vh)
                img = _letterbox(cv2, img, self.size)
        fps = self._meter.update(record.get("timestamp"))
        out = draw_overlay(img, record, fps=fps, order="bgr") if self.annotate else to_bgr(img)
        self._vw.write(out)
        self.written += 1

    def close(self) -> None:
        """Finish the file and read it back: OpenCV reports no failed write, so a full disk shows only here, as a
        file that holds fewer frames than were recorded (an .mp4 cut short has no index and plays none). Raises
        EdgeclfError (one line) then; the check costs an open and one seek, whatever the length."""
        if self._vw is not None:
            vw, self._vw = self._vw, None
            vw.release()
            self._check_complete()
            logger.info("recorded %d frames to %s (%d of another size)", self.written, self.path, self.resized)

    def _check_complete(self) -> None:
        cv2 = self._cv2
        api = getattr(cv2, "CAP_FFMPEG", None)
        has_backend = getattr(getattr(cv2, "videoio_registry", None), "hasBackend", None)  # OpenCV >= 4.2
        if not self.written or api is None or (has_backend is not None and not has_backend(api)):
            # what the frame count and seek say is only known to be exact for FFmpeg: no false alarms elsewhere
            return
        cap = cv2.VideoCapture(self.path, api)
        try:
            # An .avi cut short claims 0 frames, an .mkv all of them but has no last frame: both are checked.
            complete = (cap.isOpened() and cap.get(cv2.CAP_PROP_FRAME_COUNT) >= self.written
                        and cap.set(cv2.CAP_PROP_POS_FRAMES, self.written - 1) and cap.grab())
        finally:
            cap.release()
        if complete:
            return
        readable, whole = self._count_readable(api)
        if whole and readable >= self.written:  # every frame decodes: only the seek or the count was off
            logger.debug("recording %s: frame count or seek disagrees, but all %d frames decode", self.path, readable)
            return
        shown = str(readable) if whole else f"{readable} or more"
        why = _full_disk_cause(self.path) or "the disk was full or the file not writable"
        raise EdgeclfError(
            f"--record {self.path} is incomplete: {self.written} frames were recorded but only {shown} can be "
            f"read back ({why}); free space or choose another --record"
        )

    def _count_readable(self, api: int, budget_s: float = 5.0) -> Tuple[int, bool]:
        """(frames that decode from the start, whether all were counted): only after a failed check, and
        within `budget_s` (hours of video cut short must not hold up the end of a run for minutes)."""
        cap = self._cv2.VideoCapture(self.path, api)
        n = 0
        try:
            end = time.monotonic() + budget_s
            while cap.isOpened() and n < self.written and cap.grab():
                n += 1
                if time.monotonic() > end:
                    return n, False
        finally:
            cap.release()
        return n, True


def _letterbox(cv2: Any, img: NDArray[np.uint8], size: Tuple[int, int]) -> NDArray[np.uint8]:
    """`img` scaled to fit (width, height) `size` with its aspect ratio kept, centred on black."""
    h, w = img.shape[:2]
    scale = min(size[0] / w, size[1] / h)
    nw, nh = min(size[0], max(1, round(w * scale))), min(size[1], max(1, round(h * scale)))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.zeros((size[1], size[0]) + img.shape[2:], np.uint8)
    x0, y0 = (size[0] - nw) // 2, (size[1] - nh) // 2
    out[y0:y0 + nh, x0:x0 + nw] = small.reshape((nh, nw) + img.shape[2:])
    return out


# --------------------------------------------------------------------------------------------- summary

_ABSTAIN = "(abstain)"


@dataclass
class ClipSummary:
    """What a clip showed, over all frames.

    frames: records seen. label_frames: frames per label (multilabel: frames where the label is present).
    share_frames: label_frames / frames. majority_label: most frames (ties: more time, then label order);
        None when every frame abstained.
    abstained, abstain_rate (of frames), abstain_reasons: {reason: frames}.
    time_basis: what the time figures below measure. "clip": the clip's own timeline, frame index / `fps` (a
        recorded video, DICOM cine or synthetic source: how long the scan showed each label, the same on every
        run whatever the machine's speed); "capture": the frames' capture timestamps (a live source, a watched
        folder, --realtime: time as it passed); None: not measured (a recorded source without a frame rate,
        e.g. a folder of images), and every time figure is None.
    fps: the frame rate of the "clip" timeline (None otherwise).
    duration_s: summed frame durations on that basis (each frame lasts until the next one; the last one the
        median interval); None with fewer than 2 timed frames. Intervals longer than
        `max_gap_s` (a stalled or reconnecting source) give the frame the median interval and count the
        rest as ``gap_s`` (``gaps`` of them). span_s: last - first frame's time.
    label_time_s / share_time: per-label time and its share of duration_s (None without a duration);
        abstain_share_time: the abstaining share.
    untimed: records counted in frames but not in time (no numeric "timestamp", resp. "frame" for the clip
        timeline; every record when time is not measured). unlabeled: records with neither a label, labels
        nor an abstain (not expected from the pipeline).
    """

    frames: int = 0
    label_frames: Dict[str, int] = field(default_factory=dict)
    share_frames: Dict[str, float] = field(default_factory=dict)
    majority_label: Optional[str] = None
    abstained: int = 0
    abstain_rate: float = 0.0
    abstain_reasons: Dict[str, int] = field(default_factory=dict)
    duration_s: Optional[float] = None
    span_s: Optional[float] = None
    label_time_s: Optional[Dict[str, float]] = None
    share_time: Optional[Dict[str, float]] = None
    abstain_share_time: Optional[float] = None
    gaps: int = 0
    gap_s: float = 0.0
    untimed: int = 0
    unlabeled: int = 0
    time_basis: Optional[str] = "capture"
    fps: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        def r(v: Optional[float]) -> Optional[float]:
            return None if v is None else round(v, 6)

        def rd(d: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
            return None if d is None else {k: round(v, 6) for k, v in d.items()}

        return {
            "frames": self.frames, "time_basis": self.time_basis, "fps": r(self.fps),
            "duration_s": r(self.duration_s), "span_s": r(self.span_s),
            "majority_label": self.majority_label, "label_frames": dict(self.label_frames),
            "share_frames": rd(self.share_frames), "label_time_s": rd(self.label_time_s),
            "share_time": rd(self.share_time), "abstained": self.abstained, "abstain_rate": r(self.abstain_rate),
            "abstain_share_time": r(self.abstain_share_time), "abstain_reasons": dict(self.abstain_reasons),
            "gaps": self.gaps, "gap_s": r(self.gap_s), "untimed": self.untimed, "unlabeled": self.unlabeled,
        }


def _keys_of(record: Dict[str, Any]) -> Tuple[Tuple[str, ...], Optional[str]]:
    """(labels shown, abstain reason or None) of one record."""
    if record.get("abstain"):
        return (), str(record.get("abstain_reason") or "unspecified")
    label = record.get("label")
    if label is not None:
        return (str(label),), None
    present = record.get("labels")
    if isinstance(present, (list, tuple)):
        return tuple(str(x) for x in present), None
    return (), None


def percent_text(conf: float, decimals: int = 0) -> str:
    """A confidence (a fraction) as the user sees it, e.g. "99%": rounded *down*, so only 1.0 reads 100% (0.996 is
    "99%", never "100%"). Not finite: printed as it is ("nan%")."""
    if not math.isfinite(conf):
        return f"{100 * conf:.{decimals}f}%"
    unit = 10 ** decimals
    # the epsilon keeps 0.29 at 29% (0.29 * 100 is 28.999999999999996 in binary floating point)
    v = math.floor(conf * 100 * unit + 1e-6)
    if conf < 1.0:
        v = min(v, 100 * unit - 1)  # ... but no nearly-1 value is lifted to 100%
    return f"{v / unit:.{decimals}f}%"


def _timestamp(record: Dict[str, Any]) -> Optional[float]:
    ts = record.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return None
    return float(ts)


_RECENT_STEPS = 256  # intervals kept for the "typical" frame interval: bounded memory over hours


class _ClipAccumulator:
    """The clip summary built frame by frame in constant memory (a cart runs for hours).

    Each frame lasts until the next one; an interval longer than `max_gap_s` (a stalled or reconnecting
    source) gives the frame the typical interval (the median of the last 256 normal ones) and counts
    the rest as a gap; the last frame also gets the typical interval.
    """

    def __init__(self, labels: Optional[Sequence[str]], max_gap_s: float, basis: Optional[str] = "capture",
                 fps: Optional[float] = None) -> None:
        self.order: List[str] = [str(x) for x in labels] if labels else []
        self.counts: Dict[str, int] = {k: 0 for k in self.order}
        self.t_lab: Dict[str, float] = {k: 0.0 for k in self.order}
        self.max_gap_s = max_gap_s
        self.s = ClipSummary(time_basis=basis, fps=fps)
        self.t_abs = 0.0
        self.total = 0.0
        self.first: Optional[float] = None
        self.prev: Optional[Tuple[float, Tuple[str, ...], Optional[str]]] = None
        self.recent: Deque[float] = deque(maxlen=_RECENT_STEPS)
        self.timed = 0

    def _typical(self) -> float:
        return float(statistics.median(self.recent)) if self.recent else 0.0

    def _credit(self, keys: Tuple[str, ...], reason: Optional[str], d: float) -> None:
        self.total += d
        if reason is not None:
            self.t_abs += d
        for k in keys:
            self.t_lab[k] = self.t_lab.get(k, 0.0) + d

    def add(self, ts: Optional[float], keys: Tuple[str, ...], reason: Optional[str], unlabeled: bool) -> None:
        s = self.s
        s.frames += 1
        if reason is not None:
            s.abstained += 1
            s.abstain_reasons[reason] = s.abstain_reasons.get(reason, 0) + 1
        if unlabeled:
            s.unlabeled += 1
        for k in keys:
            if k not in self.counts:
                self.counts[k] = 0
                self.order.append(k)
            self.counts[k] += 1
        if ts is None:
            s.untimed += 1
            return
        self.timed += 1
        if self.first is None:
            self.first = ts
        if self.prev is not None:
            d = ts - self.prev[0]
            if 0.0 <= d <= self.max_gap_s:
                self.recent.append(d)
            else:
                s.gaps += 1
                s.gap_s += max(d - self._typical(), 0.0)
                d = self._typical()
            self._credit(self.prev[1], self.prev[2], d)
        self.prev = (ts, keys, reason)

    def result(self) -> ClipSummary:
        s = dataclasses.replace(self.s, abstain_reasons=dict(self.s.abstain_reasons))
        counts = dict(self.counts)
        s.label_frames = counts
        n = max(s.frames, 1)
        s.share_frames = {k: v / n for k, v in counts.items()}
        s.abstain_rate = s.abstained / n if s.frames else 0.0
        if self.timed >= 2 and self.prev is not None and self.first is not None:
            typical = self._typical()
            total, t_abs = self.total + typical, self.t_abs + (typical if self.prev[2] is not None else 0.0)
            t_lab = {k: self.t_lab.get(k, 0.0) for k in counts}
            for k in self.prev[1]:
                t_lab[k] += typical
            s.duration_s = total
            s.span_s = self.prev[0] - self.first
            s.label_time_s = t_lab
            s.share_time = {k: (v / total if total > 0 else 0.0) for k, v in t_lab.items()}
            s.abstain_share_time = t_abs / total if total > 0 else 0.0
        shown = [k for k in self.order if counts.get(k, 0) > 0]
        if shown:
            rank = {k: i for i, k in enumerate(self.order)}
            times = s.label_time_s or {}
            s.majority_label = max(shown, key=lambda k: (counts[k], times.get(k, 0.0), -rank[k]))
        return s


def summarize(
    records: Sequence[Dict[str, Any]], labels: Optional[Sequence[str]] = None, *, max_gap_s: float = 1.0,
) -> ClipSummary:
    """A :class:`ClipSummary` of per-frame records (e.g. from :func:`read_jsonl`); `labels` (the bundle's)
    lists every class, shown or not, in order."""
    acc = _ClipAccumulator(labels, max_gap_s)
    for rec in records:
        keys, reason = _keys_of(rec)
        acc.add(_timestamp(rec), keys, reason, not keys and reason is None and "labels" not in rec)
    return acc.result()


_FD_LINK = re.compile(r"/(?:dev|proc/[^/]+)/fd/\d+")


def _summary_target(path: str) -> Tuple[str, bool]:
    """(the file to write, whether to write it in place). A file is replaced atomically (a temporary file renamed
    onto it); through a symlink, the file it names (the link stays). Written in place: what exists but is not a
    regular file (a pipe, terminal or device: /dev/stdout piped on, /dev/null), which a rename would replace (as
    root, the device node itself), and an open stream (/dev/stdout or /dev/fd/N redirected to a file: the shell
    holds that file open, so it is appended to, not replaced)."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = True  # nothing there yet (or a dangling link): a new file
    if not regular:
        return path, True
    link, hops = os.path.abspath(path), 0
    while os.path.islink(link) and hops < 40:  # 40: the kernel's own limit on links in a row
        if _FD_LINK.fullmatch(link):
            return path, True
        link, hops = os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link))), hops + 1
    if _FD_LINK.fullmatch(link):
        return path, True
    return (os.path.realpath(path) if hops else path), False


_ANY_FD = re.compile(r"/(?:dev|proc/([^/]+))/fd/(\d+)")


def _own_fd(path: str) -> Optional[int]:
    """N when `path` is, or links through, one of this process's own descriptors (/dev/stdout -> /proc/self/fd/1):
    written through N itself, whose offset the process's later output shares. Opening the path again would start a
    new offset there, and what the process prints next (the run's table) would overwrite the summary."""
    link, hops = os.path.abspath(path), 0
    while hops <= 40:
        m = _ANY_FD.fullmatch(link)
        if m and m.group(1) in (None, "self", "thread-self", str(os.getpid())):
            return int(m.group(2))
        if not os.path.islink(link):
            return None
        link, hops = os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link))), hops + 1
    return None


class SummarySink(Sink):
    """Collects a clip-level :class:`ClipSummary`; ``summary()`` at any time, and at close() it is written
    as JSON to `path` when one is given (atomically: a temporary file renamed into place). `labels` (the
    bundle's) keeps classes that never showed in the summary with 0.

    aggregator: the clip decision (as ``edgeclf evaluate`` aggregates), one per file of a multi-file source
    (:class:`FileClipAggregator`; a :class:`ClipAggregator` given here lends its settings): the JSON's
    ``decision``, and for files ``decisions`` (one per clip) and ``stills`` (files of one frame).

    The run that feeds it tells it, before the first frame, how its source keeps time (:meth:`set_clock`: a
    recorded clip's time figures come from its own timeline, not from how fast it was decoded), and before
    close() how the run ended (:meth:`end_run`). The file then says so: ``status`` ("ok": the source was read to
    its end; "stopped": ``stopped_by`` "signal", "max_frames" or "sink"; "error": ``error`` holds the one-line
    text), ``frame_count_claimed`` and ``source_stats``; the clip decision of the last frame read carries
    ``"complete": false`` when the run stopped or failed inside that clip (its file, or the source, had frames
    left: it covers only the frames read before the run stopped); a clip read to its last frame is whole whatever
    ended the run. Without :meth:`end_run` (a library caller's own loop) the file holds the summary alone, as
    :func:`summarize` gives it."""

    def __init__(
        self, path: Union[str, os.PathLike[str], None] = None, *, labels: Optional[Sequence[str]] = None,
        max_gap_s: float = 1.0, aggregator: Union[ClipAggregator, FileClipAggregator, None] = None,
    ) -> None:
        # A folder or unwritable place must fail now, not in close() after the whole run.
        self.path = None if path is None else check_output_path(path, option="--summary", example="clip.json")
        if self.path is not None:
            dest, in_place = _summary_target(self.path)
            if not in_place and os.path.isdir(dest + ".tmp"):
                raise ConfigError(f"--summary {self.path}: {dest}.tmp is a folder in the way; remove it or choose another path")
        self.labels = None if labels is None else tuple(str(x) for x in labels)
        if isinstance(max_gap_s, bool) or not isinstance(max_gap_s, (int, float)) or not max_gap_s > 0:
            raise ConfigError(f"summary max_gap_s is {max_gap_s!r}; allowed: seconds > 0, e.g. 1.0")
        self.max_gap_s = float(max_gap_s)
        self.written = 0
        self._fps: Optional[float] = None  # set: the clip's own timeline (frame index / fps)
        self._basis: Optional[str] = "capture"
        self._acc = _ClipAccumulator(self.labels, self.max_gap_s)
        self._closed = False
        self._write_failed = False  # close() could not write the file (its error was raised)
        self._end: Optional[Dict[str, Any]] = None  # how the run ended (end_run): written with the summary
        self._multi_file = False
        self._frames_left: Optional[bool] = None  # end_run's: whether the source had frames after the last read
        self._last_file: Optional[Tuple[Any, ...]] = None  # the file (clips.file_of) of the last record
        self.result: Optional[Dict[str, Any]] = None  # summary().to_dict() and the run's end, set at close()
        # The clip decision `edgeclf evaluate` computes offline (mean probability and majority vote of the
        # frames' own predictions), from the same records: on-device and offline clip figures agree. Per file: a new
        # file (another cine, patient or view) is another clip. A live source's reconnection restarts the smoother,
        # sector detector and gate but stays one clip (the same scan, resumed).
        self.aggregator: Optional[FileClipAggregator] = (
            FileClipAggregator.like(aggregator) if isinstance(aggregator, ClipAggregator) else aggregator)

    def set_clock(self, fps: Optional[float], live: bool) -> None:
        """How the time figures are measured, from the source's `fps` and `live` (before the first write). Live
        (a camera, stream, watched folder, or a file paced by --realtime): the capture timestamps, time as it
        passed. Recorded with a frame rate (a video, DICOM cine, synthetic): the clip's own timeline, frame
        index / fps (decode instants measure this machine's speed, not the scan). Recorded without one (a folder
        of images or stills): not measured (``time_basis`` None, time figures None)."""
        if self.written:
            raise RuntimeError("SummarySink.set_clock must come before the first record")
        rate = float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) else math.nan
        if live:
            self._basis, self._fps = "capture", None
            self._acc = _ClipAccumulator(self.labels, self.max_gap_s)
        elif math.isfinite(rate) and rate > 0:
            self._basis, self._fps = "clip", rate
            # frame indexes are contiguous: a frame period above max_gap_s (a slow cine) is no gap
            self._acc = _ClipAccumulator(self.labels, max(self.max_gap_s, 1.5 / rate), "clip", rate)
        else:
            self._basis, self._fps = None, None
            self._acc = _ClipAccumulator(self.labels, self.max_gap_s, None)

    def end_run(self, status: str, *, stopped_by: Optional[str] = None, error: Optional[str] = None,
                frame_count_claimed: Optional[int] = None, source_stats: Optional[Dict[str, Any]] = None,
                multi_file: bool = False, frames_left: Optional[bool] = None) -> None:
        """How the run ended, written with the summary at close(). status: "ok" (the source was read to its end),
        "stopped" (`stopped_by`: "signal", "max_frames", "sink") or "error" (`error`: its one-line text, naming no
        source path). multi_file: the source is several files (a DICOM folder, a watched folder): ``decision``
        stays empty whatever the run read (one decision per file, in ``decisions``). frames_left: whether the
        source had frames after the last one read (None: not known); what the records say of their own file
        (``file_frame`` and ``file_frames``) comes first."""
        if status not in ("ok", "stopped", "error"):
            raise ValueError(f"run status {status!r}; allowed: ok, stopped, error")
        self._end = {"status": status, "stopped_by": stopped_by, "error": error,
                     "frame_count_claimed": frame_count_claimed,
                     "source_stats": None if source_stats is None else dict(source_stats)}
        self._multi_file = bool(multi_file)
        self._frames_left = frames_left

    def _time_of(self, record: Dict[str, Any]) -> Optional[float]:
        if self._basis == "capture":
            return _timestamp(record)
        idx = record.get("frame")
        if self._fps is None or isinstance(idx, bool) or not isinstance(idx, int):
            return None
        return idx / self._fps

    def write(self, record: Dict[str, Any], image: Optional[NDArray[np.uint8]] = None) -> None:
        keys, reason = _keys_of(record)
        self._acc.add(self._time_of(record), keys, reason, not keys and reason is None and "labels" not in record)
        if self.aggregator is not None:
            self.aggregator.add_record(record)
        self._last_file = file_of(record)
        self.written += 1

    def summary(self) -> ClipSummary:
        return self._acc.result()

    def decision(self) -> Optional[Dict[str, Any]]:
        """The clip decision (ClipDecision.to_dict()) of the run's one clip; None without an aggregator, or
        when the run covered several files (see :meth:`decisions`) or only a still."""
        return None if self.aggregator is None else self.aggregator.result()["decision"]

    def decisions(self) -> Optional[List[Dict[str, Any]]]:
        """One clip decision per file (see :class:`FileClipAggregator`); None for a source without files (a
        video, camera or stream: :meth:`decision`) or without an aggregator."""
        if self.aggregator is None:
            return None
        per_file: Optional[List[Dict[str, Any]]] = self.aggregator.result().get("decisions")
        return per_file

    def _clip_result(self) -> Dict[str, Any]:
        """The aggregator's result as the file gives it: no decision over several files, and the decision of a clip
        the run stopped in (frames of it left unread) marked ``"complete": false``."""
        assert self.aggregator is not None
        res = dict(self.aggregator.result())
        if self._multi_file and "decisions" in res:
            res["decision"] = None
        if self._end is None or self._end["status"] == "ok":
            return res
        # The last file's own records say whether it was read to its last frame; else the source's end (unknown:
        # the clip is taken as cut short, never a partial clip as whole).
        left = self.aggregator.current_frames_left()
        if left is None:
            left = self._frames_left is not False
        if not left:
            return res
        if res.get("decision") is not None:  # a single clip's decision is that of the clip being read
            res["decision"] = {**res["decision"], "complete": False}
        per_file = list(res.get("decisions") or [])
        if per_file and self._last_file is not None and \
                tuple(per_file[-1].get(k) for k in FILE_KEYS) == self._last_file:
            per_file[-1] = {**per_file[-1], "complete": False}
            res["decisions"] = per_file
        return res

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.result = self.summary().to_dict()
        if self.aggregator is not None:
            self.result.update(self._clip_result())
        if self._end is not None:
            self.result.update(self._end)
        if self.path is not None:
            text = json.dumps(self.result, indent=2) + "\n"
            dest, in_place = _summary_target(self.path)
            self._write_failed = True  # until written: add_audit must not retry a write the run reports as failed
            if in_place:
                try:
                    fd = _own_fd(dest)
                    if fd is None:
                        with open(dest, "a", encoding="utf-8") as f:  # append: a redirected stream keeps what it holds
                            f.write(text)
                    else:
                        for stream in (sys.stdout, sys.stderr):  # what was printed before comes before the summary
                            with contextlib.suppress(OSError, ValueError):  # closed or broken: the write below says so
                                stream.flush()
                        data = text.encode("utf-8")
                        while data:
                            data = data[os.write(fd, data):]
                except OSError as exc:
                    raise EdgeclfError(f"cannot write the clip summary to {self.path}: {exc.strerror}; choose another path") from None
                self._write_failed = False
                return
            self._replace(dest, text)
            self._write_failed = False

    def _replace(self, dest: str, text: str) -> None:
        tmp = dest + ".tmp"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, dest)
        except OSError as exc:
            with contextlib.suppress(OSError):  # no half-written .tmp left behind
                os.remove(tmp)
            raise EdgeclfError(f"cannot write the clip summary to {self.path}: {exc.strerror}; choose another path") from None

    def add_audit(self, audit: Dict[str, Any]) -> None:
        """After close(): the run's audit log (``path``, ``head``, ``records``) joins the summary as ``audit``, the head
        `edgeclf audit verify --head` checks. The log ends after the summary is written (its end records how the run,
        summary included, ended), so a summary file is replaced once more, atomically; one written in place (a pipe,
        terminal or open stream) already holds the summary and is left alone, as is one close() could not write
        (its error is the run's)."""
        if not self._closed or self.result is None:
            raise RuntimeError("SummarySink.add_audit comes after close()")
        self.result = {**self.result, "audit": dict(audit)}  # a new dict: the run summary's "clip" stays the clip's
        if self.path is None or self._write_failed:
            return
        dest, in_place = _summary_target(self.path)
        if not in_place:
            self._replace(dest, json.dumps(self.result, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- stdout


class StdoutSink(Sink):
    """One short line per result, for the CLI: ``frame  t  label  confidence  latency`` or the abstain reason.

    stream: where to write (default: sys.stdout at the time of each write). only_changes: print only when
    the shown label or abstain reason changes (``written`` still counts every record; ``lines`` counts
    printed lines). A closed pipe (``| head``) sets ``stop_requested`` and ``lost`` counts the records
    not printed.
    """

    def __init__(self, stream: Optional[TextIO] = None, *, only_changes: bool = False) -> None:
        self.stream = stream
        self.only_changes = only_changes
        self.written = 0
        self.lines = 0
        self.lost = 0
        self._t0: Optional[float] = None
        self._last: Optional[Tuple[Any, ...]] = None

    @staticmethod
    def format(record: Dict[str, Any], t0: Optional[float] = None) -> str:
        """The line for `record` (no newline); `t0` is the first timestamp (times are relative to it)."""
        parts = [f"{record.get('frame', '?'):>6}"]
        ts = _timestamp(record)
        if ts is not None and t0 is not None:
            parts.append(f"{ts - t0:8.2f}s")
        if record.get("abstain"):
            parts.append(f"abstain ({record.get('abstain_reason') or 'unspecified'})")
        else:
            label = record.get("label")
            if label is None and isinstance(record.get("labels"), (list, tuple)):
                parts.append("+".join(str(x) for x in record["labels"]) or "(none)")
            else:
                parts.append(f"{label!s:<14}")
                conf = record.get("confidence")
                if conf is None:
                    probs = record.get("probs")
                    conf = probs.get(label) if isinstance(probs, dict) else None
                if isinstance(conf, (int, float)):
                    parts.append(f"{percent_text(float(conf), 1):>6}")
        lat = record.get("latency_ms")
        total = lat.get("total") if isinstance(lat, dict) else None
        if isinstance(total, (int, float)):
            parts.append(f"{total:7.1f} ms")
        return "  ".join(parts)

    def write(self, record: Dict[str, Any], image: Optional[NDArray[np.uint8]] = None) -> None:
        self.written += 1
        ts = _timestamp(record)
        if self._t0 is None and ts is not None:
            self._t0 = ts
        if self.only_changes:
            state = (record.get("label"), tuple(record.get("labels") or ()), bool(record.get("abstain")),
                     record.get("abstain_reason"))
            if state == self._last:
                return
            self._last = state
        if self.stop_requested:
            self.lost += 1
            return
        stream = self.stream if self.stream is not None else sys.stdout
        try:
            stream.write(self.format(record, self._t0) + "\n")
            stream.flush()
        except BrokenPipeError:
            self.stop_requested = True
            self.lost += 1
            logger.info("stdout was closed after %d lines; asking the pipeline to stop", self.lines)
            return
        self.lines += 1
