"""A watched folder (portable X-ray, PACS drop folders): every new complete file classified exactly once.

`WatchFolderSource(folder)` (or `open_source("watch:FOLDER?poll=0.5&idle_exit=10&state=PATH")`) polls the
folder (no inotify: works on network shares and every OS) and hands out the frames of each new image
(.png .jpg .jpeg .bmp .tif .tiff) or DICOM file (.dcm/.dicom or any file with the 'DICM' marker;
multi-frame files give one frame each).

When is a file new and complete?
- Only files directly in the folder are read: a subfolder's are not (a file is not complete until it is
  in the folder itself). Subfolders are counted (`folders_skipped`) and warned about the first time, never
  by name (a folder may be named after a patient).
- Hidden files (dotfiles) and partial downloads (.part .partial .tmp .temp .crdownload .download
  .filepart .swp, or a trailing ~) are never read. Writers that write to such a name and rename it
  into place are picked up on the next poll after the rename.
- Any other file is read once its size and mtime are the same on two consecutive polls (and it is
  not empty). A file that still fails to decode (e.g. a writer that stalled longer than a poll) is
  recorded as failed under its (size, mtime), so it is tried again only when it changes. A file that
  cannot be opened (permissions not yet set, a share's lock) is not recorded: it is tried at every poll
  (counted in `files_unreadable` while it stays so; its retries do not keep `idle_exit` from ending).
- A file whose size or mtime changed between the listing and its read (replaced under the same name) is
  not classified under the identity it was listed with: it is put back and read under its new identity
  once two listings agree again (counted in `files_changed`). The same holds while a multi-frame DICOM's
  frames are read (they are read lazily): the frames handed out before the change stay, the rest are not
  taken from the new content, and the new file is read whole.

Exactly once, across restarts: a state file (default FOLDER/.edgeclf-watch.json, or `state_path`)
records each file's identity, a sha256 of name + size + mtime (never the name, never contents), with
how many of its frames were acknowledged. That identity stays in the state file: records and logs name a
file by its `watch_key`, an HMAC of the identity under the install's source key
(`edgeclf.runtime.sources.source_hash`), which a list of names cannot be matched against without the key.
The state does not depend on the key: a new or lost key never makes the folder's files classified again
(only the `watch_key` of a file's records changes with it, e.g. where no key can be kept and every process
uses its own). A file counts as processed only when the consumer calls
`ack(frame)` for its frames, after its result was written (sinks flushed). Frames handed out but not
acknowledged before a crash are handed out again after a restart (at-least-once delivery); with the
state's dedupe this is exactly once as long as the consumer writes the result before it acks. A crash
between the write and the ack can repeat that one frame: records carry `meta["watch_key"]` and
`meta["file_frame"]`, so a downstream consumer can drop such a repeat (the same key as long as the source
key is the same). Messages never quote the folder, a file or the state path: a folder may be named after
a patient. The state is written atomically
(temp file, fsync, os.replace) on every ack; a lock file keeps a second process off the same state.
The state keeps an entry for each file in the folder, and for a file gone from it for `forget` seconds
(default 30 days) no longer: it stays bounded on a cart that archives its inbox. A gone file put back
unchanged after that (same name, size and mtime) is classified again, a repeat with the same `watch_key`.

`read(timeout)` returns None when `timeout` passes without a frame (a live source); `ended` says
whether the stream is over (closed, or `idle_exit` seconds passed with no new file and nothing being
written). Iteration ends only then. Never wrap it in a reader that drops frames (see `needs_ack`).

Python 3.8 compatible; pydicom and OpenCV are imported when a file of that kind shows up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Iterator, List, Optional, Set, Tuple

from edgeclf.errors import SourceError
from edgeclf.runtime.sources import (
    IMAGE_EXTENSIONS,
    Frame,
    Image,
    Size,
    _dicom_marker,
    _short_hash,
    _warn_subfolders,
    decode_image,
    natural_key,
    source_hash,
)

__all__ = [
    "WatchFolderSource", "open_watch", "watch_state", "watch_state_of", "watch_state_counts", "describe_watch_state", "STATE_NAME",
    "PARTIAL_SUFFIXES",
]

logger = logging.getLogger(__name__)

STATE_NAME = ".edgeclf-watch.json"
PARTIAL_SUFFIXES: Tuple[str, ...] = (
    ".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart", ".swp", "~",
)
_DICOM_EXTENSIONS = (".dcm", ".dicom")
_STATE_FORMAT = "edgeclf-watch-state"
_STATE_VERSION = 1
_OPTIONS = ("poll", "idle_exit", "state", "forget")
_NUMBERISH = re.compile(r"[0-9.eE+\-]{1,16}|[+\-]?(?i:nan|inf|infinity)")  # option values a message may repeat
FORGET_DEFAULT = 30 * 24 * 3600.0  # seconds a file is gone from the folder before its state entry is dropped


def _identity(name: str, size: int, mtime_ns: int) -> str:
    """A file's identity: sha256 of name, size and mtime (20 hex), the state file's key. Names never reach the
    state file; the identity itself never leaves it (records and logs carry `_watch_key` of it)."""
    text = f"{name}\0{size}\0{mtime_ns}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _watch_key(identity: str) -> str:
    """What records and logs call a file: a keyed hash (HMAC, `source_hash`) of its identity, 20 hex. A name's
    plain hash with a guessable size and a whole-second mtime can be matched against a list of names."""
    return source_hash(identity, 20)


@dataclass
class _Entry:
    key: str  # the identity: the state file's key, never logged or exported
    wkey: str  # _watch_key(key): records' watch_key, and how messages name the file
    path: str
    ext: str
    size: int
    mtime_ns: int
    kind: str  # "image" | "dicom"
    frames: Optional[int] = None
    start: int = 0
    acked: Set[int] = field(default_factory=set)
    exhausted: bool = False

    def acked_prefix(self) -> int:
        n = 0
        while n in self.acked:
            n += 1
        return n


class WatchFolderSource:
    """Frames of each new complete file in `folder`, each file exactly once (with `ack`), see module doc.

    - `poll`: seconds between folder listings (a file is read after two equal listings).
    - `idle_exit`: end the stream after this many seconds with no new file and nothing half-written
      (batch runs and tests); None (default) watches until closed.
    - `state_path`: where to keep the state (default FOLDER/.edgeclf-watch.json); give one when the
      folder is read-only or shared.
    - `forget`: seconds a file must be gone from the folder before its entry leaves the state (default
      30 days; None keeps every entry for good).
    - `size`: (width, height) to resize every frame to (files in a folder often differ in size).
    """

    kind = "watch"
    live = True
    needs_ack = True  # frames must reach the consumer and be acked: never drop them
    fps: Optional[float] = None
    frame_count: Optional[int] = None

    def __init__(
        self,
        folder: str,
        *,
        poll: float = 0.5,
        idle_exit: Optional[float] = None,
        state_path: Optional[str] = None,
        forget: Optional[float] = FORGET_DEFAULT,
        size: Optional[Size] = None,
        source_id: str = "",
    ) -> None:
        folder = os.path.expanduser(folder)
        if not os.path.isdir(folder):
            raise SourceError(
                "the watched folder (watch:FOLDER) does not exist or is not a folder; create it or fix the path "
                "(not repeated here: a folder may be named after a patient)"
            )
        if (not (poll > 0) or (idle_exit is not None and not (idle_exit > 0))
                or (forget is not None and not (0 < forget < float("inf")))):
            raise SourceError(
                f"watch options poll={poll!r} idle_exit={idle_exit!r} forget={forget!r} are not valid; allowed: "
                "poll > 0 seconds, idle_exit > 0 seconds or None, forget > 0 seconds or None; fix them"
            )
        self.folder = folder
        self.poll = float(poll)
        self.idle_exit = None if idle_exit is None else float(idle_exit)
        self.forget = None if forget is None else float(forget)
        self.state_path = os.path.abspath(os.path.expanduser(state_path or os.path.join(folder, STATE_NAME)))
        # how messages name the state file: never by its path (the default one is in the watched folder)
        self._state_label = (
            "the watch state file (state=PATH)" if state_path else f"the watch state file ({STATE_NAME} in the watched folder)"
        )
        self.size: Optional[Size] = size
        self.source_id = source_id or _short_hash("watch:" + os.path.abspath(folder))
        self._lock = threading.RLock()  # state, in-flight files, counters (read and ack may be two threads)
        self._read_lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._ended = False
        self._seen: Dict[str, Tuple[int, int]] = {}
        self._unstable = 0
        self._queue: List[_Entry] = []
        self._inflight: Dict[str, _Entry] = {}
        self._ignored: Set[str] = set()
        self._unreadable: Set[str] = set()  # keys that could not be opened: said once at INFO, then DEBUG
        self._subfolders: Set[str] = set()  # names of subfolders seen (never read, logged or exported: counted)
        self._current: Optional[Tuple[_Entry, Iterator[Tuple[Image, Dict[str, Any]]]]] = None
        self._next_index = 0
        self._next_poll = 0.0
        self._last_activity = time.monotonic()
        self._counts: Dict[str, int] = dict.fromkeys(
            ("files_seen", "files_done", "files_failed", "files_ignored", "files_changed", "files_forgotten",
             "folders_skipped", "frames_read", "frames_acked"), 0
        )
        self._lock_file: Optional[IO[str]] = None
        self._take_lock()
        try:
            self._state: Dict[str, Dict[str, Any]] = self._load()
            self._save()  # fails now, not at the first ack, when the state cannot be written
        except BaseException:
            self._release_lock()
            raise
        logger.info(
            "watching %s: poll %.2fs, %d files already in the state, idle_exit %s",
            self.source_id,
            self.poll,
            len(self._state),
            self.idle_exit,
        )

    # ----------------------------------------------------------------------------------- public

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ended(self) -> bool:
        """True once the stream is over: closed, or idle for `idle_exit` seconds."""
        return self._ended or self._closed

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next frame; None when `timeout` seconds pass without one, or when the stream has ended.

        One reader at a time; `close()` from another thread wakes a blocked read.
        """
        with self._read_lock:
            try:
                return self._read(timeout)
            finally:
                if self._closed:
                    self._close_current()

    def _read(self, timeout: Optional[float]) -> Optional[Frame]:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            if self.ended:
                return None
            frame = self._next_frame()
            if frame is not None:
                return frame
            if self._queue:
                self._start_next()
                continue
            now = time.monotonic()
            if now >= self._next_poll:
                self._scan()
                self._next_poll = now + self.poll
                if self._queue:
                    continue
            if (
                self.idle_exit is not None
                and self._unstable == 0
                and now - self._last_activity >= self.idle_exit
            ):
                logger.info("watch %s: idle for %.1fs, ending", self.source_id, self.idle_exit)
                if self._unreadable:  # still there, never classified: say so (stats() counts them too)
                    logger.warning("watch %s: ending with %d files that could not be read; they are tried again at "
                                   "the next run", self.source_id, len(self._unreadable))
                self._ended = True
                return None
            wake = self._next_poll
            if self.idle_exit is not None:
                wake = min(wake, self._last_activity + self.idle_exit)
            if deadline is not None:
                if now >= deadline:
                    return None
                wake = min(wake, deadline)
            self._stop.wait(max(0.0, wake - now))

    def ack(self, frame: Frame) -> None:
        """Record that `frame`'s result was written. Call it after the sinks wrote (and flushed) it.

        Idempotent; frames of other sources are ignored, and so are acks after `close()` (such a
        frame is handed out again after a restart). A file is done when all its frames are acked;
        the state is written (atomically, fsynced) before this returns.
        """
        wkey = frame.meta.get("watch_key")
        k = frame.meta.get("file_frame")
        if not isinstance(wkey, str) or not isinstance(k, int):
            return
        with self._lock:
            if self._closed:
                logger.debug("watch %s: ack after close ignored", self.source_id)
                return
            entry = next((en for en in self._inflight.values() if en.wkey == wkey), None)
            if entry is None or k in entry.acked:
                return
            key = entry.key
            entry.acked.add(k)
            self._counts["frames_acked"] += 1
            prefix = entry.acked_prefix()
            if entry.frames is not None and prefix >= entry.frames:
                self._finish(entry, "done")
            else:
                self._state[key] = {"status": "partial", "frames": entry.frames, "acked": prefix}
                self._save()

    def stats(self) -> Dict[str, int]:
        """files_seen, files_done, files_failed, files_ignored, files_changed (re-read under a new identity),
        files_unreadable (in the folder, could not be opened at the last try), folders_skipped (subfolders seen,
        whose files are never read), frames_read, frames_acked, pending."""
        with self._lock:
            out = dict(self._counts)
            out["files_unreadable"] = len(self._unreadable)
            out["pending"] = len(self._queue) + len(self._inflight) + self._unstable
            return out

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._read_lock.acquire(blocking=False):  # else the reader cleans up as it returns
            try:
                self._close_current()
            finally:
                self._read_lock.release()
        with self._lock:
            self._release_lock()
        logger.debug("closed watch %s: %s", self.source_id, self._counts)

    def __enter__(self) -> WatchFolderSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<WatchFolderSource {self.source_id} poll={self.poll} idle_exit={self.idle_exit}{' closed' if self._closed else ''}>"

    # ----------------------------------------------------------------------------------- folder

    def _scan(self) -> None:
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            logger.warning("watch %s: folder cannot be listed (%s); retrying", self.source_id, type(exc).__name__)
            return
        current: Dict[str, Tuple[int, int]] = {}
        listed: Set[str] = set()
        ready: List[_Entry] = []
        unstable = 0
        subfolders: List[str] = []
        for e in entries:
            name = e.name
            low = name.lower()
            if name.startswith("."):
                continue
            try:
                if e.is_dir():
                    subfolders.append(name)
                    continue
                if low.endswith(PARTIAL_SUFFIXES) or not e.is_file():
                    continue
                st = e.stat()
            except OSError:
                continue
            ident = (int(st.st_size), int(st.st_mtime_ns))
            current[name] = ident
            key = _identity(name, ident[0], ident[1])
            listed.add(key)
            if self._known(key):
                continue
            if self._seen.get(name) != ident:
                unstable += 1  # new or still changing: read it once two listings agree
                continue
            path = os.path.join(self.folder, name)
            ext = os.path.splitext(low)[1]
            kind = ""
            if ident[0] > 0:
                if ext in IMAGE_EXTENSIONS:
                    kind = "image"
                elif ext in _DICOM_EXTENSIONS or _dicom_marker(path):
                    kind = "dicom"
            if not kind:
                self._ignored.add(key)
                self._counts["files_ignored"] += 1
                logger.info(
                    "watch %s: ignoring file %s (%s, %d bytes): not an image or DICOM file",
                    self.source_id, _watch_key(key), "another extension" if ext else "no extension", ident[0],
                )
                continue
            # What splitext calls the extension of "Jane.Doe" (a DICOM found by its marker) is part of a
            # name: only a known extension reaches messages and result records.
            known = ext if ext in IMAGE_EXTENSIONS or ext in _DICOM_EXTENSIONS else ""
            ready.append(_Entry(key=key, wkey=_watch_key(key), path=path, ext=known, size=ident[0], mtime_ns=ident[1],
                                kind=kind))
        self._seen = current
        self._unstable = unstable
        self._count_subfolders(subfolders)
        self._unreadable &= listed  # gone or changed: no longer an unread file of this folder
        self._age_out(listed)
        if unstable:
            self._last_activity = time.monotonic()
        if ready:
            ready.sort(key=lambda en: (en.mtime_ns, natural_key(os.path.basename(en.path))))
            self._queue.extend(ready)
            fresh = sum(1 for en in ready if en.key not in self._unreadable)
            self._counts["files_seen"] += fresh  # retries: once
            if fresh:  # retrying a file that stays unreadable is no activity: it must not hold idle_exit off
                self._last_activity = time.monotonic()

    def _count_subfolders(self, names: List[str]) -> None:
        """Count subfolders never seen before (files in them are never read), and say so: a warning the first
        time, INFO for later ones (a drop folder with a folder per study would warn at every study). Never by
        name: a folder may be named after a patient. The state file's own folder, where state=PATH puts it
        inside the watched folder, is not counted."""
        own = os.path.dirname(self.state_path)
        new = [n for n in names if n not in self._subfolders and os.path.abspath(os.path.join(self.folder, n)) != own]
        if not new:
            return
        first = not self._subfolders
        self._subfolders.update(new)
        with self._lock:
            self._counts["folders_skipped"] = len(self._subfolders)
        if first:
            _warn_subfolders(logger, len(new), f"watch {self.source_id}: the watched folder",
                             "have the sender write into the watched folder itself, or watch each subfolder")
        else:
            logger.info("watch %s: %d more subfolder(s) in the watched folder, not read (%d in all)", self.source_id,
                        len(new), len(self._subfolders))

    def _age_out(self, listed: Set[str]) -> None:
        """Stamp state entries whose file is no longer listed (wall-clock time: it must hold across restarts),
        clear the stamp of one that is back, and drop those gone for `forget` seconds. Writes the state only
        when something changed; a listing that fails never gets here."""
        now = time.time()
        changed = forgotten = 0
        with self._lock:
            for key in list(self._state):
                entry = self._state[key]
                if key in listed or key in self._inflight:
                    if "gone" in entry:
                        del entry["gone"]
                        changed += 1
                elif "gone" not in entry:
                    entry["gone"] = int(now)
                    changed += 1
                elif self.forget is not None and now - entry["gone"] >= self.forget:
                    del self._state[key]
                    forgotten += 1
            if forgotten:
                self._counts["files_forgotten"] += forgotten
                logger.info("watch %s: forgot %d files gone from the folder for %.0f s or more", self.source_id,
                            forgotten, self.forget)
            if changed or forgotten:
                self._save()

    def _known(self, key: str) -> bool:
        with self._lock:
            if key in self._inflight or key in self._ignored or any(en.key == key for en in self._queue):
                return True
            status = self._state.get(key, {}).get("status")
            return status in ("done", "failed")

    # ----------------------------------------------------------------------------------- frames

    def _start_next(self) -> None:
        entry = self._queue.pop(0)
        where = f"watched file {entry.wkey} ({entry.ext or 'no extension'})"
        with self._lock:
            saved = self._state.get(entry.key, {})
            entry.start = int(saved.get("acked", 0)) if saved.get("status") == "partial" else 0
        try:
            # Opened here first: the decoders turn OSError into SourceError ("failed" for good), but a file
            # that is briefly unreadable (permissions set after writing, a share's lock) is retried.
            with open(entry.path, "rb") as f:
                opened = os.fstat(f.fileno())
                f.read(1)
            if (int(opened.st_size), int(opened.st_mtime_ns)) != (entry.size, entry.mtime_ns):
                self._put_back(entry, where)
                return
            frames = self._open_frames(entry, where)
        except SourceError as exc:
            if self._changed(entry):  # replaced while decoding: the error is not the listed file's
                self._put_back(entry, where)
                return
            logger.warning("watch %s: %s; it is skipped until it changes", self.source_id, exc)
            with self._lock:
                self._finish(entry, "failed")
            return
        except OSError as exc:  # vanished or unreadable between the listing and now: not recorded, retried
            level = logging.DEBUG if entry.key in self._unreadable else logging.INFO
            self._unreadable.add(entry.key)
            logger.log(level, "watch %s: %s could not be read (%s); retrying at the next poll", self.source_id,
                       where, type(exc).__name__)
            return
        self._unreadable.discard(entry.key)
        if frames is not None and self._changed(entry):  # decoded by path: maybe the new file's content
            close = getattr(frames, "close", None)
            if close is not None:
                close()
            self._put_back(entry, where)
            return
        if frames is None:
            with self._lock:
                self._ignored.add(entry.key)
                self._counts["files_ignored"] += 1
            logger.info("watch %s: %s is not a DICOM image (not DICOM, or no pixel data); ignored", self.source_id, where)
            return
        entry.acked = set(range(entry.start))
        with self._lock:
            self._inflight[entry.key] = entry
            if entry.frames is not None and entry.start >= entry.frames:
                self._finish(entry, "done")
                return
        self._current = (entry, frames)
        logger.info(
            "watch %s: %s, %s frames%s", self.source_id, where, entry.frames,
            f", resuming at frame {entry.start}" if entry.start else "",
        )

    def _changed(self, entry: _Entry) -> bool:
        """Whether the file at entry.path no longer has the (size, mtime) it was listed with. A file that
        vanished cannot be told: False (what was read is taken as the listed file's)."""
        try:
            st = os.stat(entry.path)
        except OSError:
            return False
        return (int(st.st_size), int(st.st_mtime_ns)) != (entry.size, entry.mtime_ns)

    def _abandon_if_changed(self, entry: _Entry) -> bool:
        """If the file being read changed since its listing: stop reading it, forget it as in flight (acks of its
        frames already handed out are then ignored; those frames were the listed file's) and put it back."""
        if not self._changed(entry):
            return False
        self._close_current()
        with self._lock:
            self._inflight.pop(entry.key, None)
        self._put_back(entry, f"watched file {entry.wkey} ({entry.ext or 'no extension'})")
        return True

    def _put_back(self, entry: _Entry, where: str) -> None:
        """The file changed since the listing: nothing is recorded under the listed identity; the next
        listings find it under its new one (two equal listings first, like any new file)."""
        self._unreadable.discard(entry.key)
        with self._lock:
            self._counts["files_changed"] += 1
        self._last_activity = time.monotonic()
        logger.info("watch %s: %s changed while it was being read; it is read again once it is stable",
                    self.source_id, where)

    def _open_frames(self, entry: _Entry, where: str) -> Optional[Iterator[Tuple[Image, Dict[str, Any]]]]:
        if entry.kind == "image":
            image, depth = decode_image(entry.path, where)
            entry.frames = 1

            def one() -> Iterator[Tuple[Image, Dict[str, Any]]]:
                if entry.start == 0:
                    yield image, {"format": "image", "bit_depth": depth, "file_frame": 0, "file_frames": 1}

            return one()
        from edgeclf.runtime.dicom import DicomFile

        df = DicomFile.probe(entry.path, where, force=True, images_only=True)
        if df is None:
            return None
        entry.frames = df.frames
        return df.iter_frames(entry.start)

    def _next_frame(self) -> Optional[Frame]:
        if self._current is None:
            return None
        entry, frames = self._current
        try:
            image, meta = next(frames)
        except StopIteration:
            entry.exhausted = True
            self._current = None
            return None
        except SourceError as exc:
            if self._abandon_if_changed(entry):  # the error is the new file's, read under the old identity
                return None
            self._current = None
            logger.warning("watch %s: %s; the rest of the file is skipped until it changes", self.source_id, exc)
            with self._lock:
                self._finish(entry, "failed")
            return None
        # A DICOM's frames are read lazily from its path: a file re-sent in place partway through would give its
        # later frames from the new content under the old identity. Checked after decoding, so a frame decoded
        # before the change is kept and one that may be the new file's is not handed out.
        if entry.kind == "dicom" and self._abandon_if_changed(entry):
            return None
        if self.size is not None and (image.shape[1], image.shape[0]) != tuple(self.size):
            from edgeclf.runtime import _cv

            cv2 = _cv.cv2()
            image = cv2.resize(image, tuple(self.size), interpolation=cv2.INTER_AREA)
        out_meta: Dict[str, Any] = dict(meta)
        out_meta.update(
            {
                "source": "watch",
                "source_id": self.source_id,
                "format": "dicom" if entry.kind == "dicom" else "image",
                "ext": entry.ext,
                "watch_key": entry.wkey,
            }
        )
        frame = Frame(image=image, index=self._next_index, timestamp=time.monotonic(), meta=out_meta)
        self._next_index += 1
        self._last_activity = time.monotonic()
        with self._lock:
            self._counts["frames_read"] += 1
        return frame

    def _finish(self, entry: _Entry, status: str) -> None:
        """Record a file as done or failed (caller holds the lock)."""
        self._inflight.pop(entry.key, None)
        self._state[entry.key] = {"status": status, "frames": entry.frames, "acked": entry.acked_prefix()}
        self._counts["files_done" if status == "done" else "files_failed"] += 1
        self._save()

    def _close_current(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            close = getattr(current[1], "close", None)
            if close is not None:
                close()

    # ------------------------------------------------------------------------------------ state

    def _load(self) -> Dict[str, Dict[str, Any]]:
        path = self.state_path
        label = self._state_label
        if not os.path.exists(path):
            return {}
        fix = "move it away to classify every file in the folder again"
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{label} cannot be read ({type(exc).__name__}); {fix}") from None
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("format") != _STATE_FORMAT or not isinstance(files, dict):
            raise SourceError(
                f"{label} is not an edgeclf watch state (format {_STATE_FORMAT!r}); {fix}"
            )
        if data.get("version") != _STATE_VERSION:
            raise SourceError(
                f"{label} has version {str(data.get('version'))[:20]!r}; supported: {_STATE_VERSION}; {fix}"
            )
        out = {str(k): dict(v) for k, v in files.items() if isinstance(v, dict)}
        for entry in out.values():  # hand-edited or damaged values would fail later, as a traceback
            bad = [
                f"{key}={entry.get(key)!r}"[:40]
                for key, none_ok in (("acked", False), ("frames", True), ("gone", False))
                if key in entry and not _count_or_none(entry[key], none_ok)
            ]
            if entry.get("status") not in ("done", "failed", "partial"):
                bad.append(f"status={entry.get('status')!r}"[:40])
            if bad:
                raise SourceError(
                    f"{label} has a bad entry ({', '.join(bad)}); allowed: status done, failed or "
                    f"partial, acked, frames and gone whole numbers >= 0; {fix}"
                )
        return out

    def _save(self) -> None:
        path = self.state_path
        tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path).lstrip(".") + ".tmp")
        data = {"format": _STATE_FORMAT, "version": _STATE_VERSION, "files": self._state}
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, separators=(",", ":"), sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise SourceError(
                f"{self._state_label} cannot be written ({type(exc).__name__}: {exc.strerror}); "
                "free space or fix permissions, or keep it elsewhere with watch:FOLDER?state=PATH"
            ) from None

    def _take_lock(self) -> None:
        lock_path = os.path.join(
            os.path.dirname(self.state_path), "." + os.path.basename(self.state_path).lstrip(".") + ".lock"
        )
        try:
            f = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held open until close()
        except OSError as exc:
            raise SourceError(
                f"the folder of {self._state_label} is not writable ({type(exc).__name__}); "
                "fix permissions, or keep the state elsewhere with watch:FOLDER?state=PATH"
            ) from None
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock; one watcher per folder is then up to the user
            self._lock_file = f
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise SourceError(
                f"{self._state_label} is in use by another edgeclf process; supported: one "
                "watcher per folder; stop the other one or give this one its own state=PATH and folder"
            ) from None
        self._lock_file = f

    def _release_lock(self) -> None:
        f, self._lock_file = self._lock_file, None
        if f is not None:
            f.close()  # closing the descriptor releases the flock


def _count_or_none(value: Any, none_ok: bool) -> bool:
    """A whole number >= 0 (not a bool), or None where `none_ok`."""
    if value is None:
        return none_ok
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fsync_dir(folder: str) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _state_files(uri: str) -> Tuple[bool, Dict[str, Any]]:
    """(whether `uri` names its own state=PATH, the entries of its state file: {} without one, or with one that
    cannot be read as a state), read without opening the source or taking its lock."""
    rest = uri.strip()[len("watch:"):]
    folder, _, query = rest.partition("?")
    given = [v for k, _, v in (item.partition("=") for item in query.split("&")) if k == "state" and v]
    path = os.path.abspath(os.path.expanduser(given[-1] if given else os.path.join(os.path.expanduser(folder), STATE_NAME)))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return bool(given), {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == _STATE_FORMAT else None
    return bool(given), (files if isinstance(files, dict) else {})


def watch_state(uri: str) -> Tuple[bool, Dict[str, int]]:
    """(whether `uri` names its own state=PATH, `watch_state_counts`), from one read of the state file."""
    given, files = _state_files(uri)
    return given, _counts_of(files)


def watch_state_counts(uri: str) -> Dict[str, int]:
    """What the state of watched folder `uri` records, read without opening the source or taking its lock:
    `done` files (all frames classified: never handed out again), `failed` ones (could not be decoded: handed out
    again only once they change, under a new identity), `partial` ones (some frames classified: the next run
    resumes after them) and `with_results`, the files of these with a result written (done, or frames
    acknowledged; a file that failed at open has none). All 0 without a state file, or with one that cannot be
    read as a state (opening the source says what is wrong with it)."""
    return watch_state(uri)[1]


def _counts_of(files: Dict[str, Any]) -> Dict[str, int]:
    out = dict.fromkeys(("done", "failed", "partial", "with_results"), 0)
    for e in files.values():
        if not isinstance(e, dict):
            continue
        acked = _count_or_none(e.get("acked"), False) and e["acked"] > 0
        status = e.get("status")
        if status in ("done", "failed") or (status == "partial" and acked):
            out[str(status)] += 1
            out["with_results"] += int(status == "done" or acked)
    return out


def describe_watch_state(counts: Dict[str, int]) -> str:
    """`watch_state_counts` in words, for a message: what each kind of handled file becomes at the next run."""
    parts = []
    if counts.get("done"):
        parts.append(f"{counts['done']} classified, never to be classified again")
    if counts.get("partial"):
        parts.append(f"{counts['partial']} partly classified, the next run going on after the frames classified")
    if counts.get("failed"):
        parts.append(f"{counts['failed']} failed to decode, read again only once they change")
    return "; ".join(parts) if parts else "no file handled"


def watch_state_of(uri: str) -> Tuple[bool, int]:
    """(whether `uri` names its own state=PATH, how many files its state records as handled: done, failed, or with
    frames acknowledged; see `watch_state_counts` for what they are), read without opening the source or taking
    its lock. (False, 0) without a state file, or with one that cannot be read as a state."""
    given, counts = watch_state(uri)
    return given, counts["done"] + counts["failed"] + counts["partial"]


def open_watch(uri: str, *, size: Optional[Size] = None, source_id: str = "") -> WatchFolderSource:
    """`watch:FOLDER[?poll=0.5&idle_exit=10&state=PATH&forget=SECONDS]` -> WatchFolderSource."""
    rest = uri[len("watch:") :]
    folder, _, query = rest.partition("?")
    if not folder:
        raise SourceError("the watch source names no folder; supported: watch:FOLDER; e.g. watch:/data/incoming?poll=0.5")
    params: Dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in _OPTIONS or not eq or not value:
            shown = f"{key!r}" if key in _OPTIONS else "(not repeated here)"
            raise SourceError(
                f"bad watch option {shown} in the watch source (an unknown option, or one without a value); allowed: "
                "poll=SECONDS, idle_exit=SECONDS, state=PATH, "
                "forget=SECONDS; "
                "e.g. watch:/data/incoming?poll=0.5&state=/var/lib/edgeclf/incoming.json"
            )
        params[key] = value

    def seconds(key: str, default: Optional[float]) -> Optional[float]:
        if key not in params:
            return default
        try:
            value = float(params[key])
        except ValueError:
            value = float("nan")
        if not (value > 0) or value == float("inf"):
            given = params[key]
            shown = repr(given) if _NUMBERISH.fullmatch(given) else "(not a number)"
            raise SourceError(
                f"watch option {key}={shown} in the watch source is not valid; allowed: a number of seconds > 0; "
                "fix it in the URI"
            )
        return value

    poll = seconds("poll", 0.5)
    return WatchFolderSource(
        folder,
        poll=0.5 if poll is None else poll,
        idle_exit=seconds("idle_exit", None),
        state_path=params.get("state"),
        forget=seconds("forget", FORGET_DEFAULT),
        size=size,
        source_id=source_id,
    )
