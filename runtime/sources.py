"""Frame sources: video files, image folders/globs, cameras, network streams, GStreamer pipelines,
DICOM files/series (`edgeclf.runtime.dicom`), watched folders (`edgeclf.runtime.watch`) and synthetic
cines, behind one API.

`open_source(uri)` picks the source from the URI; every source hands out `Frame`s whose image is
uint8 (H, W) gray or (H, W, 3) **RGB** (OpenCV's BGR is converted here, at the boundary, and nowhere
else). `read()` returns None at the end of a stream; iteration and `with` come from `BaseSource`.
Live sources (`live=True`: cameras, streams, watched folders) never end on their own: cameras and
streams raise SourceError when no frame comes (wrap them in `edgeclf.runtime.live.ReconnectingSource`
to reopen them), a watched folder returns None from `read(timeout)` when the timeout passes.

Rules kept here:
- Python 3.8 compatible (JetPack 5); numpy at import time, OpenCV only inside the functions that
  need it (through `edgeclf.errors.require`), never torch.
- Frame.meta never carries file names (they may carry patient names): images are named by their
  index in the folder, their extension and a short keyed hash of the name; with the environment variable
  EDGECLF_SOURCE_NAMES=index by their index alone.
- Messages and logs never quote a source path, glob or stream path either: a source is named by its kind
  and extension (`_ext_label`), a stream by scheme and host, and in logs by `source_id`.
- Every hash of a name or path (`source_id`, `name_hash`, the audit's `uri_hmac`) is an HMAC-SHA256 under a
  random per-install key (`source_hash`; the key file is `source_key_path()`: $EDGECLF_SOURCE_KEY, else
  $STATE_DIRECTORY, $XDG_STATE_HOME/edgeclf or ~/.local/state/edgeclf, made 0600 on first use): a plain short
  hash of a guessable name (DOE^JOHN, an MRN) can be matched against a list of names in a second; this one
  only by whoever can read the key. Where the key cannot be read or kept, a per-process key is used (DEBUG).
- A decode failure never silently ends or shortens a stream: video files log a WARNING with how
  many frames were read against how many the container claims, images raise SourceError (so does a
  multi-page TIFF, whose pages past the first OpenCV would drop).
- OpenCV gets no name that is not valid UTF-8 (it crashes the interpreter on one): SourceError.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import hmac
import logging
import os
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Tuple,
    TypeVar,
    Union,
    runtime_checkable,
)

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import SourceError
from edgeclf.runtime import _cv

__all__ = [
    "Frame",
    "FrameSource",
    "BaseSource",
    "VideoFileSource",
    "ImageSource",
    "CameraSource",
    "SyntheticSource",
    "StreamSource",
    "open_source",
    "gstreamer_available",
    "is_gstreamer_pipeline",
    "redact_uri",
    "GSTREAMER_ELEMENTS",
    "decode_image",
    "to_uint8",
    "natural_key",
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "SOURCE_NAMES_ENV",
    "source_name_policy",
    "SOURCE_KEY_ENV",
    "source_key_path",
    "source_key_info",
    "source_hash",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: Tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".mpeg", ".mpg", ".m4v", ".gif", ".webm")
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_STREAM_SCHEMES: Tuple[str, ...] = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
_DICOM_EXTENSIONS: Tuple[str, ...] = (".dcm", ".dicom")
# First elements that make a string a GStreamer pipeline even without ' ! ' (e.g. 'v4l2src device=...').
GSTREAMER_ELEMENTS: Tuple[str, ...] = (
    "v4l2src", "nvarguscamerasrc", "nvv4l2camerasrc", "libcamerasrc", "filesrc", "rtspsrc", "udpsrc",
    "souphttpsrc", "uridecodebin", "playbin", "videotestsrc", "appsink", "ksvideosrc", "avfvideosrc",
    "mfvideosrc", "decodebin",
)
_STREAM_OPEN_TIMEOUT_S = 10.0
_STREAM_READ_TIMEOUT_S = 5.0
_SYNTHETIC_SCENARIOS: Tuple[str, ...] = ("ultrasound",)
_SYNTHETIC_KEYS: Tuple[str, ...] = ("seed", "size", "fps", "frames")
_SYNTHETIC_FPS = 30.0

_SUPPORTED = (
    "a video file ("
    + " ".join(VIDEO_EXTENSIONS)
    + "), a folder or glob of images ("
    + " ".join(IMAGE_EXTENSIONS)
    + "), a DICOM file or folder (.dcm), a camera ('0' or /dev/videoN), rtsp:// or http(s):// streams, "
    "a GStreamer pipeline ('... ! appsink'), watch:FOLDER or synthetic:ultrasound"
)

# Extensions a message may name besides edgeclf's own: common files given as a source by mistake. Anything else that
# splitext calls an extension ("Jane.Doe", "DOE.JOHN.1", ".MRN7730142") may be part of a name, and is not repeated.
_OTHER_EXTENSIONS: Tuple[str, ...] = (
    ".pdf", ".txt", ".csv", ".json", ".xml", ".html", ".htm", ".zip", ".gz", ".tgz", ".tar", ".7z", ".rar",
    ".jp2", ".j2k", ".jpx", ".jxl", ".webp", ".heic", ".heif", ".svg", ".ico", ".raw", ".dat", ".bin", ".img",
    ".iso", ".nii", ".nrrd", ".mha", ".mhd", ".npy", ".npz", ".h5", ".hdf5", ".doc", ".docx", ".xls", ".xlsx",
    ".ppt", ".pptx", ".wmv", ".flv", ".3gp", ".ts", ".mts", ".m2ts", ".vob", ".ogv", ".ogg", ".dv", ".wav",
    ".mp3", ".exe", ".sh", ".py", ".onnx", ".engine", ".plan", ".log", ".jsonl",
)
# Schemes an "unknown source scheme" message may name; any other text before a ':' may be a name.
_NAMED_SCHEMES: Tuple[str, ...] = (
    "ftp", "ftps", "sftp", "scp", "ssh", "s3", "gs", "az", "abfs", "hdfs", "file", "smb", "cifs", "nfs",
    "webdav", "dav", "dicom", "dicomweb", "wado", "dimse", "pacs", "tcp", "udp", "rtp", "srt", "mms", "mmsh",
    "rtmps", "rtspt", "rtspu", "ws", "wss", "camera", "cam", "webcam", "video", "device", "v4l2", "usb", "data",
    "blob",
)


def _ext_label(path: str) -> str:
    """A file's extension as a message may show it: a known one (lower case), "no extension" or "another
    extension". Messages name a source by its kind and extension, never by its path: file and folder names
    (a PACS export's DOE^JOHN_<MRN>/DOE^JOHN.mp4) may carry a patient's name."""
    ext = os.path.splitext(path.rstrip("/\\"))[1].lower()
    if not ext:
        return "no extension"
    if ext in VIDEO_EXTENSIONS or ext in IMAGE_EXTENSIONS or ext in _DICOM_EXTENSIONS or ext in _OTHER_EXTENSIONS:
        return ext
    return "another extension"


_URI_PARTS = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#]*)(.*)$", re.S)


def _stream_label(uri: str) -> str:
    """A stream address as messages show it: scheme and host (user:password masked), the path and query cut to
    "/...": a WADO or HLS address may carry study UIDs or a patient's name."""
    m = _URI_PARTS.match(redact_uri(uri.strip()))
    if m is None:
        return "(an address)"
    host = m.group(2)
    return f"{m.group(1)}{host}{'/...' if m.group(3) else ''}"


def _pipeline_label(text: str) -> str:
    """A GStreamer pipeline as messages show it: its first element's name, when it is a known one (a filesrc
    location= may name a patient's file)."""
    first = text.strip().split(None, 1)[0].split("=", 1)[0].lower() if text.strip() else ""
    return f"GStreamer pipeline starting with {first}" if first in GSTREAMER_ELEMENTS else "GStreamer pipeline"


Image = NDArray[np.uint8]
_S = TypeVar("_S", bound="BaseSource")
Size = Tuple[int, int]


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame. eq=False: frames compare (and hash) by identity, since arrays have no truth value."""

    image: Image  # (H, W) gray or (H, W, 3) RGB, uint8
    index: int  # 0-based, counts every frame this source handed out (keeps counting across loops)
    timestamp: float  # time.monotonic() when the frame was captured/decoded
    meta: Mapping[str, Any] = field(default_factory=dict)  # no identifiers (no file names)


@runtime_checkable
class FrameSource(Protocol):
    kind: str  # "video" | "images" | "camera" | "stream" | "dicom" | "watch" | "synthetic"
    fps: Optional[float]
    size: Optional[Size]  # (width, height)
    frame_count: Optional[int]
    live: bool

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]: ...

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...

    def __enter__(self) -> FrameSource: ...

    def __exit__(self, *exc: object) -> None: ...


def _cv2() -> Any:
    """OpenCV (quiet), or a one-line MissingExtraError naming the `cv` extra."""
    return _cv.cv2()


SOURCE_NAMES_ENV = "EDGECLF_SOURCE_NAMES"
_NAME_POLICIES = ("hash", "index")


def source_name_policy() -> str:
    """How frame meta names source files: "hash" (index, extension and a short keyed hash of the name,
    `source_hash`; the default) or "index" (index and extension only), from the environment variable
    EDGECLF_SOURCE_NAMES. Never the name itself."""
    value = os.environ.get(SOURCE_NAMES_ENV, "").strip().lower() or "hash"
    if value not in _NAME_POLICIES:
        raise SourceError(f"{SOURCE_NAMES_ENV} is {value[:20]!r}; allowed: {', '.join(_NAME_POLICIES)}; "
                          "fix or unset the environment variable")
    return value


def _cv_text(text: str, what: str) -> str:
    """`text` as OpenCV may take it, or a SourceError (_cv.utf8_path: OpenCV dies on names that are not UTF-8)."""
    return _cv.utf8_path(text, what, SourceError)


# ------------------------------------------------------------------------------------- keyed hashes

SOURCE_KEY_ENV = "EDGECLF_SOURCE_KEY"
SOURCE_KEY_NAME = "source-key"
_KEY_FORM = re.compile(r"[0-9a-f]{64}")
_KEY_LOCK = threading.Lock()
_KEYS: Dict[str, Tuple[bytes, str]] = {}  # key file path ("" for none) -> (key, scope)


def source_key_path() -> Optional[str]:
    """The file that holds this install's source key: $EDGECLF_SOURCE_KEY, else $STATE_DIRECTORY/source-key
    (systemd's StateDirectory=, e.g. /var/lib/edgeclf for the cart unit), else $XDG_STATE_HOME/edgeclf/source-key,
    else ~/.local/state/edgeclf/source-key. None when no home folder is known."""
    given = os.environ.get(SOURCE_KEY_ENV, "").strip()
    if given:
        return os.path.abspath(os.path.expanduser(given))
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0].strip()
    if systemd and os.path.isabs(systemd):
        return os.path.join(systemd, SOURCE_KEY_NAME)
    xdg = os.path.expanduser(os.environ.get("XDG_STATE_HOME", "").strip())
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "edgeclf", SOURCE_KEY_NAME)
    home = os.path.expanduser("~")
    if not home or home == "~" or not os.path.isabs(home):
        return None
    return os.path.join(home, ".local", "state", "edgeclf", SOURCE_KEY_NAME)


def _read_key(path: str) -> Optional[bytes]:
    """The key in `path`; None when there is no such file. OSError when it cannot be read, ValueError when it
    holds no key (64 hex digits)."""
    try:
        with open(path, "rb") as f:
            data = f.read(256)
    except FileNotFoundError:
        return None
    text = data.decode("ascii", "replace").strip()
    if not _KEY_FORM.fullmatch(text):
        raise ValueError("not 64 lowercase hex digits")
    return bytes.fromhex(text)


def _create_key(path: str) -> None:
    """Write a new random key to `path` (0600, in a 0700 folder made if missing), unless one is there already:
    two processes starting at once end up with the same key (the first link wins)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    data = (os.urandom(32).hex() + "\n").encode("ascii")
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"

    def write_new(target: str) -> None:  # O_EXCL: never over an existing file
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    try:
        write_new(tmp)
        try:
            os.link(tmp, path)  # create-if-absent, whole: a reader never sees a half-written key
        except FileExistsError:
            pass
        except OSError:  # no hard links here (FAT, some shares): create it directly, still never overwriting
            with contextlib.suppress(FileExistsError):
                write_new(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _load_key(path: Optional[str]) -> Tuple[bytes, str]:
    """(key, scope): the install's key from `path` (made there on first use), scope "install"; or a random key
    for this process alone, scope "process", when none can be read or kept (its hashes cannot be recomputed)."""
    if path is None:
        logger.debug("no home folder for the source key; source hashes use a per-process key (set %s to a "
                     "writable file to keep one)", SOURCE_KEY_ENV)
        return os.urandom(32), "process"
    try:
        key = _read_key(path)
        if key is None:
            _create_key(path)
            key = _read_key(path)
        if key is not None:
            return key, "install"
        why = "it vanished after it was made"
    except ValueError as exc:  # there, but not a key: never overwritten (it may be an auditor's copy)
        logger.warning("the source key file %s holds no key (%s); source hashes in this process use a per-process "
                       "key; move the file away to have a new key made, or point %s at the right one",
                       path, exc, SOURCE_KEY_ENV)
        return os.urandom(32), "process"
    except OSError as exc:
        why = f"{type(exc).__name__}: {exc.strerror or exc}"
        if os.path.isfile(path):  # there but unreadable (permissions): hashes would silently differ from the key's
            logger.warning("the source key file %s cannot be read (%s); source hashes in this process use a "
                           "per-process key; fix its permissions or point %s at a key this user may read",
                           path, why, SOURCE_KEY_ENV)
            return os.urandom(32), "process"
    logger.debug("the source key file %s cannot be read or made (%s); source hashes in this process use a "
                 "per-process key, not comparable with other runs; set %s to a writable file to keep one",
                 path, why, SOURCE_KEY_ENV)
    return os.urandom(32), "process"


def _source_key() -> Tuple[bytes, str]:
    path = source_key_path()
    with _KEY_LOCK:
        got = _KEYS.get(path or "")
        if got is None:
            got = _load_key(path)
            _KEYS[path or ""] = got
        return got


def source_key_info() -> Dict[str, str]:
    """Which key `source_hash` uses: {"key_id": first 8 hex of sha256(key), "key_scope": "install" (kept in
    `source_key_path()`, so hashes can be recomputed with it) or "process" (random, gone with the process)}."""
    key, scope = _source_key()
    return {"key_id": hashlib.sha256(key).hexdigest()[:8], "key_scope": scope}


def source_hash(text: str, length: int = 12) -> str:
    """HMAC-SHA256 of `text` (UTF-8) under this install's source key (`source_key_path()`), `length` hex digits.

    Names sources and files in logs, frame meta and the audit. Unlike a plain hash of a path, it cannot be matched
    against a list of patient names or record numbers without the key; whoever holds the key (0600, per user) can
    recompute it: `printf '%s' TEXT | openssl dgst -sha256 -mac HMAC -macopt hexkey:$(cat KEYFILE)`."""
    key, _ = _source_key()
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:length]


def _short_hash(text: str) -> str:
    return source_hash(text, 12)


def natural_key(text: str) -> Tuple[Tuple[int, Union[int, str]], ...]:
    """Sort key that puts 'img2' before 'img10' (digit runs compare as numbers, the rest case-folded)."""
    parts = re.split(r"([0-9]+)", text)
    key: List[Tuple[int, Union[int, str]]] = []
    for i, part in enumerate(parts):
        if i % 2:
            key.append((0, int(part)))
        else:
            key.append((1, part.casefold()))
    key.append((2, text))  # tie-break so that the order is total and stable
    return tuple(key)


class BaseSource:
    """Iteration, context manager, idempotent close and thread-safe read on top of `_read`.

    Subclasses implement `_read() -> Optional[Tuple[image, meta]]` and `_release()`. `read` after
    `close` returns None (end of stream), so that closing from another thread stops a reader.
    """

    kind: str = ""

    def __init__(
        self,
        *,
        fps: Optional[float],
        size: Optional[Size],
        frame_count: Optional[int],
        live: bool,
        target_size: Optional[Size] = None,
        source_id: str = "",
    ) -> None:
        self.fps = fps
        self.size = target_size if target_size is not None else size
        self.frame_count = frame_count
        self.live = live
        self.source_id = source_id  # short keyed hash of the URI (source_hash): names the source in logs and meta
        self._target_size = target_size
        self._next_index = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        with self._lock:
            if self._closed:
                return None
            got = self._read(timeout)
            if got is None:
                return None
            image, meta = got
            stamp = time.monotonic()
            image = self._fit(image)
            frame = Frame(image=image, index=self._next_index, timestamp=stamp, meta=meta)
            self._next_index += 1
        logger.debug("%s %s frame %d %s", self.kind, self.source_id, frame.index, image.shape)
        return frame

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()
        logger.debug("closed %s %s after %d frames", self.kind, self.source_id, self._next_index)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} kind={self.kind} fps={self.fps} size={self.size} "
            f"frame_count={self.frame_count} live={self.live}{' closed' if self._closed else ''}>"
        )

    # -- for subclasses
    def _read(self, timeout: Optional[float]) -> Optional[Tuple[Image, Dict[str, Any]]]:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def _fit(self, image: Image) -> Image:
        """Resize to the requested (width, height), if one was asked for and the frame differs."""
        target = self._target_size
        if target is None or (image.shape[1], image.shape[0]) == target:
            return image
        cv2 = _cv2()
        out: Image = cv2.resize(image, target, interpolation=cv2.INTER_AREA)
        return out


def _bgr_to_rgb(image: Any) -> Image:
    """OpenCV frame (gray, BGR or BGRA) -> uint8 (H, W) or (H, W, 3) RGB, contiguous."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    cv2 = _cv2()
    code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
    out: Image = cv2.cvtColor(image, code)
    return out


# --------------------------------------------------------------------------------------------- video


class VideoFileSource(BaseSource):
    """A video file decoded with cv2.VideoCapture (FFMPEG backend first). Frames are always RGB.

    `frame_count` is what the container claims, which can be wrong both ways (a QuickTime edit list
    can hide samples the .mov still counts; MPEG-PS has no count and OpenCV estimates one from the
    duration): the stream ends when decoding ends, never at the claimed count. A read that fails before the claimed count is retried once (grab); if that
    fails too the stream ends with a WARNING saying how many frames were read against the claim.
    `frames_read` counts decoded frames and `frames_skipped` the undecodable ones passed over (both over all
    passes when looping); a frame's `file_frame` is its index in the file, so it counts skipped frames too.
    """

    kind = "video"

    def __init__(
        self, path: str, *, loop: bool = False, size: Optional[Size] = None, source_id: str = ""
    ) -> None:
        cv2 = _cv2()
        self._path = path
        self._loop = loop
        self._cap = self._open(path)
        claimed = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        # Decode the first frame now, so that a file that opens but cannot be decoded fails here.
        ok, first = self._cap.read()
        if not ok or first is None:
            self._cap.release()
            raise SourceError(
                f"the source video ({_ext_label(path)}) opened but its first frame could not be decoded; supported: "
                f"{' '.join(VIDEO_EXTENSIONS)} files that OpenCV/FFmpeg can decode; re-encode it, "
                "e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`"
            )
        if width <= 0 or height <= 0:
            height, width = first.shape[:2]
        super().__init__(
            fps=fps if fps > 0 else None,
            size=(width, height),
            frame_count=claimed if claimed > 0 else None,
            live=False,
            target_size=size,
            source_id=source_id or _short_hash(path),
        )
        self.backend: str = str(self._cap.getBackendName())
        self.frames_read = 1
        self.frames_skipped = 0
        self.passes = 1
        self._pass_read = 1
        self._pass_pos = 1  # frames advanced in this pass, skipped ones included: the next file_frame
        self._pending: Optional[Any] = first
        self._last_pos = -1.0
        logger.info(
            "opened video %s: %s frames claimed, %s fps, %dx%d, backend %s",
            self.source_id,
            self.frame_count,
            self.fps,
            width,
            height,
            self.backend,
        )

    @staticmethod
    def _open(path: str) -> Any:
        cv2 = _cv2()
        _cv_text(path, "video file")
        cap = None
        for api in (getattr(cv2, "CAP_FFMPEG", None), cv2.CAP_ANY):
            if api is None:
                continue
            cap = cv2.VideoCapture(path, api)
            if cap.isOpened():
                return cap
            cap.release()
        raise SourceError(
            f"the source video ({_ext_label(path)}) could not be opened by OpenCV (not a video, damaged, or a codec "
            "it lacks); "
            f"supported: {' '.join(VIDEO_EXTENSIONS)} files that OpenCV/FFmpeg can decode; check it with "
            "`ffprobe` or re-encode it, e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`"
        )

    def _read(self, timeout: Optional[float]) -> Optional[Tuple[Image, Dict[str, Any]]]:
        cv2 = _cv2()
        if self._pending is not None:
            raw, self._pending = self._pending, None
        else:
            raw = self._decode_next()
            if raw is None:
                if not self._loop or self._pass_read == 0:
                    return None
                self._restart()
                raw = self._decode_next()
                if raw is None:
                    return None
        pos: Optional[float] = float(self._cap.get(cv2.CAP_PROP_POS_MSEC))
        if self._pass_read > 1 and pos is not None and pos <= self._last_pos:
            # OpenCV reports 0.0 for a frame flushed from the decoder at the end of an MPEG-PS
            # file (no pts): a position that does not advance is unknown, not a jump back.
            pos = None
        else:
            self._last_pos = pos if pos is not None else self._last_pos
        meta: Dict[str, Any] = {
            "source": "video",
            "source_id": self.source_id,
            "pos_ms": pos,  # presentation time in the file, None where the backend does not know it
            "file_frame": self._pass_pos - 1,
            "pass": self.passes - 1,
        }
        return _bgr_to_rgb(raw), meta

    def _decode_next(self) -> Optional[Any]:
        ok, raw = self._cap.read()
        claimed = self.frame_count
        if (not ok or raw is None) and claimed is not None and self._pass_pos < claimed:
            # Ended before the container's count: a damaged frame or a wrong claim. Try once more.
            ok = bool(self._cap.grab())
            if ok:
                ok, raw = self._cap.retrieve()
            log = logger.warning if self.passes == 1 else logger.debug  # once, not on every loop
            if ok and raw is not None:
                log(
                    "video %s: frame %d could not be decoded and was skipped", self.source_id, self._pass_pos
                )
                self.frames_skipped += 1
                self._pass_pos += 1
            else:
                log(
                    "video %s: decoding ended after %d frames but the container claims %d "
                    "(a damaged or cut file, or a count the container gets wrong, e.g. a QuickTime edit list)",
                    self.source_id,
                    self._pass_read,
                    claimed,
                )
        if not ok or raw is None:
            return None
        self._pass_read += 1
        self._pass_pos += 1
        self.frames_read += 1
        return raw

    def stats(self) -> Dict[str, int]:
        """Decoded frames, undecodable frames skipped, and passes (for the run summary)."""
        return {"decoded": self.frames_read, "skipped": self.frames_skipped, "passes": self.passes}

    def _restart(self) -> None:
        self._cap.release()
        self._cap = self._open(self._path)
        self._pass_read = 0
        self._pass_pos = 0
        self._last_pos = -1.0
        self.passes += 1
        logger.debug("video %s: looping, pass %d", self.source_id, self.passes)

    def _release(self) -> None:
        self._cap.release()


# -------------------------------------------------------------------------------------------- images


def to_uint8(image: NDArray[Any]) -> Image:
    """uint8 as is; uint16 scaled over the full range, 0..65535 -> 0..255, rounded to nearest.

    The one 16-to-8-bit conversion: image sources, training data (edgeclf.data) and
    Preprocessor.geometry all use it, so a 16-bit image gives the same pixels everywhere. The same
    scale for every image, never per-image windowing. Other dtypes raise ValueError.
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype != np.uint16:
        raise ValueError(f"image dtype {image.dtype} is not supported; expected uint8 or uint16")
    out: Image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return out


_TIFF_REDUCED = 1  # NewSubfileType bit 0: a reduced-resolution copy (a thumbnail) of another page


def _tiff_pages(data: Any) -> int:
    """Full-resolution pages in a TIFF's IFD chain (bytes or a uint8 array): 1 for anything that is not a
    TIFF, or whose chain cannot be followed (what OpenCV decodes decides then). A thumbnail is no page."""
    head = bytes(data[:16])
    if head[:4] in (b"II*\0", b"MM\0*"):
        big = False
    elif head[:4] in (b"II+\0", b"MM\0+") and len(head) == 16:
        big = True
    else:
        return 1
    o = "<" if head[:2] == b"II" else ">"
    count_fmt, entry_size, value_at = (o + "Q", 20, 12) if big else (o + "H", 12, 8)
    offset = struct.unpack_from(o + ("Q" if big else "I"), head, 8 if big else 4)[0]
    size = len(data)
    pages = 0
    seen = set()
    while offset and offset not in seen:
        seen.add(offset)  # a chain that points back (damaged) ends here
        try:
            entries = struct.unpack_from(count_fmt, data, offset)[0]
            start = offset + struct.calcsize(count_fmt)
            if start + entries * entry_size > size:
                break
            reduced = False
            for k in range(entries):
                at = start + k * entry_size
                tag, kind = struct.unpack_from(o + "HH", data, at)
                if tag == 254 and kind in (3, 4, 16):  # SHORT, LONG or LONG8, left-justified in the field
                    fmt = o + {3: "H", 4: "I", 16: "Q"}[kind]
                    reduced = bool(struct.unpack_from(fmt, data, at + value_at)[0] & _TIFF_REDUCED)
            pages += not reduced
            offset = struct.unpack_from(o + ("Q" if big else "I"), data, start + entries * entry_size)[0]
        except struct.error:
            break
    return max(pages, 1)


def decode_image(path: str, where: Optional[str] = None) -> Tuple[Image, int]:
    """Read one image file as uint8 gray (H, W) or RGB (H, W, 3); returns it and its bit depth.

    16-bit files go through `to_uint8`, alpha is dropped, BGR becomes RGB. A file that cannot be
    read or decoded raises a one-line SourceError starting with `where` (default: "image (.ext)",
    which does not name the file; a caller that may name it passes its own). So does a multi-page
    TIFF (thumbnails aside): OpenCV would give its first page only, and a file here is one image
    (one frame of a folder, one labelled image of a training set).
    """
    cv2 = _cv2()
    if where is None:
        where = f"image ({_ext_label(path)})"
    try:
        # np.fromfile + imdecode rather than imread: works with any file name on every OS.
        buf = np.fromfile(path, dtype=np.uint8)
        raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    except (OSError, cv2.error) as exc:
        raise SourceError(
            f"{where} could not be read ({type(exc).__name__}); check that the file is readable"
        ) from None
    if raw is None:
        raise SourceError(
            f"{where} could not be decoded; supported: {' '.join(IMAGE_EXTENSIONS)} images; "
            "replace or remove that file"
        )
    pages = _tiff_pages(buf)
    if pages > 1:
        raise SourceError(
            f"{where} has {pages} pages; supported: single-page images (only the first page would be read); "
            "split it into one file per page, e.g. `convert IN.tif page_%03d.png` (ImageMagick), "
            "or save a cine as a video or DICOM file"
        )
    if raw.dtype == np.uint16:
        raw = to_uint8(raw)
        depth = 16
    elif raw.dtype == np.uint8:
        depth = 8
    else:
        raise SourceError(
            f"{where} has {raw.dtype} pixels; supported: 8- or 16-bit unsigned images; "
            "convert it to 8- or 16-bit PNG"
        )
    if raw.ndim == 3 and raw.shape[2] not in (1, 3, 4):
        raise SourceError(
            f"{where} has {raw.shape[2]} channels; supported: gray, BGR/RGB or with alpha; convert it to PNG"
        )
    if raw.ndim == 3 and raw.shape[2] == 4:
        raw = raw[:, :, :3]  # drop alpha; BGR -> RGB below
    return _bgr_to_rgb(raw), depth


def _decode_image(path: str, index: int, count: int) -> Tuple[Image, int]:
    """`decode_image`, with errors naming the file by its index only (never by its name)."""
    return decode_image(path, f"image {index} of {count} ({_ext_label(path)}, 0-based in natural sort order)")


class ImageSource(BaseSource):
    """A sorted list of image files (a folder's images, a glob's matches, or one file).

    Gray files stay (H, W); colour files become RGB; 16-bit files are scaled to 8-bit; alpha is
    dropped. A file that cannot be decoded, or a multi-page TIFF, raises SourceError naming its
    index: a frame is never skipped. `size` is the first image's (images may differ; frames are not resized unless a size
    was requested). `folders_skipped`: subfolders of the folder the files were listed from, which are not read
    (warned about once, never by name; in `stats()` when any).
    """

    kind = "images"

    def __init__(
        self,
        files: List[str],
        *,
        loop: bool = False,
        size: Optional[Size] = None,
        source_id: str = "",
        folders_skipped: int = 0,
    ) -> None:
        if not files:
            raise SourceError("no image files to read; supported: " + " ".join(IMAGE_EXTENSIONS))
        self._files = list(files)
        self.folders_skipped = int(folders_skipped)  # subfolders of the folder the files came from: not read
        self._loop = loop
        self._pos = 0
        self.passes = 1
        self._hash_names = source_name_policy() == "hash"
        first, depth = _decode_image(self._files[0], 0, len(self._files))
        self._pending: Optional[Tuple[Image, int]] = (first, depth)
        super().__init__(
            fps=None,
            size=(int(first.shape[1]), int(first.shape[0])),
            frame_count=len(self._files),
            live=False,
            target_size=size,
            source_id=source_id or _short_hash(self._files[0]),
        )
        logger.info(
            "opened images %s: %d files, first %dx%d",
            self.source_id,
            len(self._files),
            first.shape[1],
            first.shape[0],
        )
        _warn_subfolders(logger, self.folders_skipped)

    def stats(self) -> Dict[str, int]:
        """Files, passes and, when there were any, folders_skipped: subfolders not read (for the run summary)."""
        out = {"files": len(self._files), "passes": self.passes}
        if self.folders_skipped:
            out["folders_skipped"] = self.folders_skipped
        return out

    def _read(self, timeout: Optional[float]) -> Optional[Tuple[Image, Dict[str, Any]]]:
        if self._pos >= len(self._files):
            if not self._loop:
                return None
            self._pos = 0
            self.passes += 1
        i = self._pos
        path = self._files[i]
        if self._pending is not None and i == 0:
            image, depth = self._pending
        else:
            image, depth = _decode_image(path, i, len(self._files))
        self._pending = None
        self._pos += 1
        meta: Dict[str, Any] = {
            "source": "images",
            "source_id": self.source_id,
            "file_index": i,
            "ext": os.path.splitext(path)[1].lower()[:10],
            "bit_depth": depth,
            "pass": self.passes - 1,
        }
        if self._hash_names:
            meta["name_hash"] = _short_hash(os.path.basename(path))
        return image, meta


def _dicom_marker(path: str) -> bool:
    """The DICOM Part 10 'DICM' marker at byte 128 (files from modalities often have no extension)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _listdir(folder: str) -> List[str]:
    """os.listdir; a folder that cannot be listed is a one-line SourceError that does not name it (a
    folder may be named after the patient)."""
    try:
        return os.listdir(folder)
    except OSError as exc:
        raise SourceError(
            f"the source folder could not be listed ({type(exc).__name__}: {exc.strerror or 'error'}); "
            "supported: a folder the user running edgeclf may read; fix its permissions (read and execute)"
        ) from None


def _count_dicom(folder: str) -> int:
    """How many files of a folder (not hidden) are .dcm/.dicom files or have the DICM marker."""
    n = 0
    for name in _listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        ext = os.path.splitext(name)[1].lower()
        if ext in _DICOM_EXTENSIONS or (ext not in IMAGE_EXTENSIONS and _dicom_marker(path)):
            n += 1
    return n


def _subfolder_count(folder: str) -> int:
    """How many subfolders (not hidden: a USB stick's .Trashes or .Spotlight-V100 are no one's series) a folder
    holds. Folder sources read only the files directly in the folder; these are counted and warned about."""
    try:
        with os.scandir(folder) as entries:  # d_type: no stat per file of a large folder
            return sum(1 for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return 0  # listed a moment ago by the caller; what cannot be listed now holds nothing to count


def _subfolders_text(n: int) -> str:
    return f"{n} subfolder{'' if n == 1 else 's'}"


def _warn_subfolders(
    log: logging.Logger, n: int, what: str = "the source folder", fix: str = "give each subfolder as a source of its own"
) -> None:
    """One warning that `n` subfolders of `what` are not read; never their names (a folder may be named after
    a patient)."""
    if n > 0:
        log.warning("%s holds %s, not read: only the files directly in it are; %s (counted in "
                    "source_stats.folders_skipped)", what, _subfolders_text(n), fix)


def _image_files_in(folder: str) -> List[str]:
    names = [
        n
        for n in _listdir(folder)
        if not n.startswith(".")  # hidden files, e.g. macOS '._x.png' resource forks
        and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
        and os.path.isfile(os.path.join(folder, n))
    ]
    names.sort(key=natural_key)
    return [os.path.join(folder, n) for n in names]


# -------------------------------------------------------------------------------------------- camera


class CameraSource(BaseSource):
    """A live camera (cv2.VideoCapture; V4L2 for /dev paths on Linux), buffer of 1 frame, RGB out.

    A read that gets no frame (unplugged, busy, or `timeout` seconds passed where the backend
    supports a read timeout) raises SourceError: a live stream has no end.
    On V4L2 the camera is asked for `fourcc` (default MJPG: full size at full rate over USB 2; a
    device without it keeps its own format; `fourcc` then says what it uses). None keeps the device's
    format (e.g. uncompressed YUYV from a frame grabber, where JPEG artefacts are unwanted).
    """

    kind = "camera"

    def __init__(
        self,
        device: Union[int, str],
        *,
        size: Optional[Size] = None,
        fourcc: Optional[str] = "MJPG",
        source_id: str = "",
    ) -> None:
        if fourcc is not None and (not isinstance(fourcc, str) or len(fourcc) != 4):
            raise SourceError(
                f"fourcc {fourcc!r} is not valid; allowed: 4 characters, e.g. 'MJPG' or 'YUYV', or None to keep "
                "the camera's own format"
            )
        cv2 = _cv2()
        self._device = device
        label = str(device)
        hint = (
            f"camera {label} could not be opened: no such device or it is busy; "
            "list devices with `v4l2-ctl --list-devices`"
        )
        if isinstance(device, str) and not os.path.exists(device):
            raise SourceError(hint)
        if isinstance(device, str):
            _cv_text(device, "camera device")
        if isinstance(device, str) and sys.platform.startswith("linux"):
            cap = cv2.VideoCapture(device, cv2.CAP_V4L2)
        else:
            cap = cv2.VideoCapture(device)
        if not cap.isOpened():
            cap.release()
            raise SourceError(hint)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one queued seconds ago
        self.fourcc: Optional[str] = None
        if fourcc and str(cap.getBackendName()).upper() == "V4L2":
            # MJPG lets USB cameras and grabbers deliver full size at full rate; the driver refuses a
            # format the device lacks (set() is False) and keeps its own. Set before the size (V4L2).
            accepted = bool(cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*fourcc)))
            code = int(cap.get(cv2.CAP_PROP_FOURCC) or 0)
            self.fourcc = "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4)) if code else None
            logger.info("camera %s: asked for %s, %s; format now %s", device, fourcc,
                        "accepted" if accepted else "refused", self.fourcc)
        if size is not None:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, size[1])
        self._cap = cap
        self._timeout: Optional[float] = None
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        super().__init__(
            fps=fps if fps > 0 else None,
            size=(width, height) if width > 0 and height > 0 else None,
            frame_count=None,
            live=True,
            target_size=size,
            source_id=source_id or _short_hash(label),
        )
        self.frames_read = 0
        logger.info("opened camera %s: %s fps, size %s", label, self.fps, self.size)

    def _read(self, timeout: Optional[float]) -> Optional[Tuple[Image, Dict[str, Any]]]:
        cv2 = _cv2()
        if timeout != self._timeout and hasattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC"):
            # Supported by some backends only (V4L2, FFMPEG); others keep their own timeout.
            self._cap.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, -1 if timeout is None else timeout * 1000.0)
            self._timeout = timeout
        ok, raw = self._cap.read()
        if not ok or raw is None:
            raise SourceError(
                f"camera {self._device} delivered no frame after {self.frames_read} frames "
                "(unplugged, busy, or too slow for the timeout); check it with `v4l2-ctl --list-devices` "
                "and reopen the source"
            )
        self.frames_read += 1
        return _bgr_to_rgb(raw), {"source": "camera", "device": str(self._device)}

    def _release(self) -> None:
        self._cap.release()


# ------------------------------------------------------------------------------- streams, GStreamer

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@")


def redact_uri(uri: str) -> str:
    """The URI with any user:password@ replaced by ***@ (for logs and error messages)."""
    return _USERINFO.sub(r"\1***@", uri)


def gstreamer_available() -> bool:
    """Whether this OpenCV was built with GStreamer (cv2.getBuildInformation() says 'GStreamer: YES')."""
    cv2 = _cv2()
    return bool(re.search(r"GStreamer:\s*YES", str(cv2.getBuildInformation())))


def is_gstreamer_pipeline(text: str) -> bool:
    """A GStreamer pipeline string: contains ' ! ' or starts with a known element (v4l2src, ...)."""
    if " ! " in text:
        return True
    first = text.strip().split(None, 1)[0] if text.strip() else ""
    return first.split("=", 1)[0].lower() in GSTREAMER_ELEMENTS


class StreamSource(BaseSource):
    """A network stream (rtsp://, http(s)://) through FFmpeg, or a GStreamer pipeline; live, RGB out.

    `open_timeout` / `read_timeout` (seconds) are passed to OpenCV (CAP_PROP_OPEN/READ_TIMEOUT_MSEC;
    FFmpeg honours both). A read that gets no frame raises SourceError, as a camera does: a live stream
    has no end; `edgeclf.runtime.live.ReconnectingSource` reopens it. The URI's user:password never
    appears in logs or errors. RTSP goes over FFmpeg's default transport; set
    OPENCV_FFMPEG_CAPTURE_OPTIONS="rtsp_transport;tcp" before the first capture to force TCP.
    """

    kind = "stream"

    def __init__(
        self,
        uri: str,
        *,
        gstreamer: bool = False,
        size: Optional[Size] = None,
        open_timeout: float = _STREAM_OPEN_TIMEOUT_S,
        read_timeout: float = _STREAM_READ_TIMEOUT_S,
        source_id: str = "",
    ) -> None:
        cv2 = _cv2()
        _cv_text(uri, "GStreamer pipeline" if gstreamer else "stream address")
        shown = _pipeline_label(uri) if gstreamer else f"stream {_stream_label(uri)}"
        self._shown = shown
        if gstreamer:
            if not gstreamer_available():
                raise SourceError(
                    f"the {shown} cannot be opened: this OpenCV was built without GStreamer "
                    "(pip wheels are); on Jetson use the system OpenCV from JetPack, or give a device path/URL instead"
                )
            if "appsink" not in uri:
                raise SourceError(
                    f"the {shown} has no appsink; OpenCV reads frames from one; end it with "
                    "'! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1'"
                )
            cap = cv2.VideoCapture(uri, cv2.CAP_GSTREAMER)
            hint = "check it with `gst-launch-1.0` (replace appsink by fakesink)"
        else:
            params: List[int] = []
            for name, seconds in (("CAP_PROP_OPEN_TIMEOUT_MSEC", open_timeout), ("CAP_PROP_READ_TIMEOUT_MSEC", read_timeout)):
                if hasattr(cv2, name) and seconds and seconds > 0:
                    params += [int(getattr(cv2, name)), int(seconds * 1000)]
            cap = cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params) if params else cv2.VideoCapture(uri, cv2.CAP_FFMPEG)
            hint = "check the address, credentials and that the stream plays with `ffprobe URL`"
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"the {shown} could not be opened (unreachable, refused, or a codec OpenCV lacks); {hint}")
        self._cap = cap
        self._uri = uri
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        super().__init__(
            fps=fps if 0 < fps < 1000 else None,
            size=(width, height) if width > 0 and height > 0 else None,
            frame_count=None,
            live=True,
            target_size=size,
            source_id=source_id or _short_hash(uri),
        )
        self.backend: str = str(cap.getBackendName())
        self.frames_read = 0
        logger.info("opened stream %s (%s): %s fps, size %s", self.source_id, self.backend, self.fps, self.size)

    def _read(self, timeout: Optional[float]) -> Optional[Tuple[Image, Dict[str, Any]]]:
        ok, raw = self._cap.read()
        if not ok or raw is None:
            raise SourceError(
                f"the {self._shown} delivered no frame after {self.frames_read} frames (ended, dropped, "
                "or slower than the read timeout); reopen it, e.g. through edgeclf.runtime.live.ReconnectingSource"
            )
        self.frames_read += 1
        return _bgr_to_rgb(raw), {"source": "stream", "source_id": self.source_id, "stream_frame": self.frames_read - 1}

    def _release(self) -> None:
        self._cap.release()


# ----------------------------------------------------------------------------------------- synthetic


class SyntheticSource(BaseSource):
    """Frames of `edgeclf.runtime.synthetic.UltrasoundCine` as gray (H, W), as fast as read.

    `frames=N` hands out N frames (the cine repeats when N is longer than it); `loop` restarts at the
    end. `fps` is nominal (no pacing here: a pipeline that wants real time paces itself).
    """

    kind = "synthetic"

    def __init__(
        self,
        scenario: str = "ultrasound",
        *,
        seed: int = 0,
        cine_size: int = 256,
        fps: float = _SYNTHETIC_FPS,
        frames: Optional[int] = None,
        loop: bool = False,
        size: Optional[Size] = None,
        source_id: str = "",
    ) -> None:
        from edgeclf.errors import ConfigError
        from edgeclf.runtime.synthetic import UltrasoundCine

        try:
            self._cine = UltrasoundCine(size=cine_size, seed=seed)
        except ConfigError as exc:
            raise SourceError(f"synthetic:{scenario} cannot be made: {exc}") from None
        self._cine_len = len(self._cine)
        count = self._cine_len if frames is None else frames
        self._count = count
        self._loop = loop
        self._seed = seed
        self._scenario = scenario
        self._pos = 0
        self.passes = 1
        super().__init__(
            fps=fps,
            size=(cine_size, cine_size),
            frame_count=count,
            live=False,
            target_size=size,
            source_id=source_id or _short_hash(f"synthetic:{scenario}?seed={seed}"),
        )

    def _read(self, timeout: Optional[float]) -> Optional[Tuple[Image, Dict[str, Any]]]:
        if self._pos >= self._count:
            if not self._loop or self._count == 0:
                return None
            self._pos = 0
            self.passes += 1
        k = self._pos % self._cine_len if self._cine_len else 0
        image = np.ascontiguousarray(self._cine.frame(k), dtype=np.uint8)
        self._pos += 1
        meta: Dict[str, Any] = {
            "source": "synthetic",
            "source_id": self.source_id,
            "scenario": self._scenario,
            "seed": self._seed,
            "cine_frame": k,
            "label": self._cine.label_at(k),  # ground-truth class index (synthetic only)
            "pass": self.passes - 1,
        }
        return image, meta


def _parse_synthetic(uri: str) -> Tuple[str, Dict[str, str]]:
    rest = uri[len("synthetic:") :]
    name, _, query = rest.partition("?")
    if name not in _SYNTHETIC_SCENARIOS:
        raise SourceError(
            f"unknown synthetic source {name!r} in {uri!r}; supported: "
            + ", ".join("synthetic:" + s for s in _SYNTHETIC_SCENARIOS)
            + "; e.g. synthetic:ultrasound?seed=1&size=256&fps=30&frames=100"
        )
    params: Dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in _SYNTHETIC_KEYS or not eq:
            raise SourceError(
                f"bad synthetic option {item!r} in {uri!r}; allowed: "
                + ", ".join(k + "=N" for k in _SYNTHETIC_KEYS)
                + "; e.g. synthetic:ultrasound?seed=1&frames=100"
            )
        params[key] = value
    return name, params


def _open_synthetic(uri: str, loop: bool, size: Optional[Size], source_id: str) -> SyntheticSource:
    name, params = _parse_synthetic(uri)

    def number(key: str, conv: Callable[[str], Any], low: float, default: Any) -> Any:
        if key not in params:
            return default
        try:
            value = conv(params[key])
        except ValueError:
            value = None
        if value is None or value < low or value != value:
            raise SourceError(
                f"synthetic option {key}={params[key]!r} in {uri!r} is not valid; "
                f"allowed: a {'whole ' if conv is int else ''}number >= {low:g}; fix it in the URI"
            )
        return value

    seed = number("seed", int, 0, 0)
    fps = number("fps", float, 1e-3, _SYNTHETIC_FPS)
    frames = number("frames", int, 1, None)
    cine_size = number("size", int, 1, None)
    if cine_size is None:
        # Without size= in the URI, a square requested size is generated directly (no resize).
        cine_size = size[0] if size is not None and size[0] == size[1] else 256
    return SyntheticSource(
        name,
        seed=seed,
        cine_size=cine_size,
        fps=fps,
        frames=frames,
        loop=loop,
        size=size,
        source_id=source_id,
    )


# ------------------------------------------------------------------------------------------ dispatch


def _check_size(size: Optional[Size]) -> Optional[Size]:
    if size is None:
        return None
    ok = (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    )
    if not ok:
        raise SourceError(
            f"size {size!r} is not valid; allowed: (width, height) as two positive integers, "
            "or None to keep the source's size"
        )
    return (int(size[0]), int(size[1]))


_CAMERA_PATH = re.compile(r"^/dev/(video[0-9]+|v4l/.+)$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")


def open_source(
    uri: str, *, loop: bool = False, size: Optional[Size] = None, fourcc: Optional[str] = "MJPG"
) -> FrameSource:
    """Open a frame source from a URI.

    - "0", "1", ... (where no such file or folder exists: a folder named 20240101 is a folder) or
      /dev/videoN (or /dev/v4l/...) -> camera (`loop` is ignored; V4L2 cameras are asked for `fourcc`,
      MJPG by default, None keeps the device's format)
    - rtsp://, rtsps://, rtmp://, http(s):// -> network stream through FFmpeg (live)
    - a GStreamer pipeline ('... ! appsink', or starting with v4l2src, nvarguscamerasrc, ...) -> stream
      through CAP_GSTREAMER, where OpenCV was built with GStreamer (live)
    - watch:FOLDER[?poll=0.5&idle_exit=S&state=PATH] -> WatchFolderSource (live; `ack` each frame)
    - an existing video file (.mp4 .avi .mov .mkv .mpeg .mpg .m4v .gif .webm) -> video, RGB frames
    - a DICOM file (.dcm/.dicom or with the DICM marker) or a folder of them -> DicomSource
    - an existing folder of images, a glob ("frames/*.png", natural sort) or one image -> images
    - synthetic:ultrasound[?seed=1&size=256&fps=30&frames=N] -> synthetic gray frames

    `loop` restarts file and synthetic sources at their end; `size` (width, height) asks a camera
    for that size and resizes any frame that differs. Anything else raises a one-line SourceError.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(f"source {uri!r} is empty or not a string; supported: {_SUPPORTED}")
    target = _check_size(size)
    text = uri.strip()
    lower = text.lower()

    sid = _short_hash(text)
    if text.isdigit() and text.isascii() and not os.path.exists(os.path.expanduser(text)):
        return CameraSource(int(text), size=target, fourcc=fourcc, source_id=sid)
    if _CAMERA_PATH.match(text):
        return CameraSource(text, size=target, fourcc=fourcc, source_id=sid)
    if lower.startswith("synthetic:"):
        return _open_synthetic(text, loop, target, sid)
    if lower.startswith("watch:"):
        from edgeclf.runtime.watch import open_watch

        return open_watch(text, size=target, source_id=sid)
    if any(lower.startswith(s) for s in _STREAM_SCHEMES):
        return StreamSource(text, size=target, source_id=sid)
    if is_gstreamer_pipeline(text) and not os.path.exists(os.path.expanduser(text)):
        return StreamSource(text, gstreamer=True, size=target, source_id=sid)
    return _open_path(text, loop, target, sid)


_GLOB_MAGIC = re.compile(r"[*?[]")


def _open_path(text: str, loop: bool, size: Optional[Size], sid: str) -> BaseSource:
    path = os.path.expanduser(text)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        files = _image_files_in(path)
        dicoms = _count_dicom(path)
        if files and dicoms:  # e.g. a series with a preview.jpg: reading either kind alone loses the other
            raise SourceError(
                f"the source folder holds {len(files)} image files and {dicoms} DICOM files; supported: one kind "
                "per folder; point --source at one kind (move the other files to their own folder)"
            )
        if not files:
            if dicoms:
                from edgeclf.runtime.dicom import DicomSource

                return DicomSource(path, loop=loop, size=size, source_id=sid)
            folders = _subfolder_count(path)
            held = f" (it holds {_subfolders_text(folders)}; subfolders are not read)" if folders else ""
            raise SourceError(
                f"the source folder has no image or DICOM files{held}; supported: a folder of "
                f"{' '.join(IMAGE_EXTENSIONS)} images or of DICOM files, without its subfolders; point at the folder "
                "that holds the frames"
            )
        return ImageSource(files, loop=loop, size=size, source_id=sid, folders_skipped=_subfolder_count(path))
    if os.path.isfile(path) and (ext in _DICOM_EXTENSIONS or (ext not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS and _dicom_marker(path))):
        from edgeclf.runtime.dicom import DicomSource

        return DicomSource(path, loop=loop, size=size, source_id=sid)
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise SourceError(
                "the source path is not a regular file or folder (a device, pipe or socket); "
                f"supported: {_SUPPORTED}; give a file or a folder"
            )
        if ext in VIDEO_EXTENSIONS:
            if os.path.getsize(path) == 0:
                raise SourceError(
                    f"the source video ({ext}) is empty (0 bytes; e.g. a half-finished copy); supported: complete "
                    f"video files ({' '.join(VIDEO_EXTENSIONS)}); copy it again"
                )
            return VideoFileSource(path, loop=loop, size=size, source_id=sid)
        if ext in IMAGE_EXTENSIONS:
            return ImageSource([path], loop=loop, size=size, source_id=sid)
        label = _ext_label(path)
        what = (
            "has no extension" if label == "no extension"
            else f"has an unsupported extension {label!r}" if label.startswith(".")
            else "has an unsupported extension"
        )
        raise SourceError(
            f"the source file {what} and no DICOM marker; supported: {_SUPPORTED}; rename or convert it"
        )
    if _GLOB_MAGIC.search(path):
        matches = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        files = [p for p in matches if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
        if not files:
            found = f"{len(matches)} files but no images" if matches else "nothing"
            raise SourceError(
                f"the source pattern matched {found}; supported: a glob of {' '.join(IMAGE_EXTENSIONS)} "
                "images, e.g. 'frames/*.png'; check the pattern"
            )
        files.sort(key=natural_key)
        return ImageSource(files, loop=loop, size=size, source_id=sid)
    scheme = _SCHEME.match(text)
    if scheme:
        name = scheme.group(1).lower()
        shown = f"'{name}:'" if name in _NAMED_SCHEMES else "(the text before ':')"
        raise SourceError(f"unknown source scheme {shown}; supported: {_SUPPORTED}; give a supported address or a path")
    raise SourceError(
        f"the source path given ({_ext_label(path)}) does not exist; supported: {_SUPPORTED}; check the path "
        "(not repeated here: file and folder names may carry a patient's name)"
    )
