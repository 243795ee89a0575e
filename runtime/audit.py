"""The audit log: an append-only, hash-chained record of one run, for a quality engineer to check later.

One JSON object per line, in one canonical spelling (sorted keys, no spaces, ASCII)::

    {"hash": H, "payload": {...}, "prev": P, "seq": n, "time": wall_s, "type": T}

`hash` is the sha256 of the canonical JSON of the record without `hash`; `prev` is the previous record's
hash (64 zeros for the first). So an edited, removed, inserted or reordered record breaks the chain at
that record, and :func:`verify_audit` names it. Record types:

- ``start`` (first, exactly once): format and version, a random session id, the bundle checksum, the
  device profile, the run configuration, package versions and whatever the caller adds.
- ``digest`` (every `digest_every` results and before ``end``): how many results since the last digest,
  the abstentions among them, the frame range, and the sha256 over those results' JSON lines exactly as
  the results file holds them (``json.dumps(record, separators=(",", ":")) + "\\n"``), so a results file
  can be checked against the log (:func:`verify_audit` with ``results=``).
- ``fault`` / ``recovery``: what went wrong (a source disconnect, a backend error, a full disk) and
  how the run came back.
- ``end`` (last, exactly once): how the run ended (ok, error, signal), totals and the caller's summary.

A log whose chain is whole and ends in ``end`` is *intact*. A log whose chain is whole up to its last
whole record but has no ``end`` (power loss, kill -9) is *unterminated*; a torn last line (cut mid-write)
is ignored and counted; an empty file is a run cut off before its first record (the writer creates the file,
then writes ``start``). Anything else is *tampered*, naming the first record that fails, unless the file holds
no audit record at all (a results file given by mistake): that is *not_audit*, no log. A chain proves
order and completeness up to its head, not who wrote it: someone who rewrites the tail and recomputes
every hash after it is caught only against a head hash kept elsewhere (``expected_head=``; the run's
summary carries :attr:`AuditLog.head` for that).

Records are written whole (one ``os.write`` of the full line) and fsynced on the results file's policy:
`fsync_every` seconds (0: every record; None: never), and always for ``start``, ``fault`` and ``end``.
A log is never overwritten: an existing path is refused, a folder gets a new uniquely named log.
No patient identifiers: the caller records bundle, device and configuration facts, never source paths;
:func:`source_fact` describes a source URI without naming it (its kind and a keyed hash, ``uri_hmac``, with the
``key_id`` of the key that made it), and every fault, recovery, event and end
text has the run's source (``AuditLog(source=...)``) and any URL replaced by ``<source>``
(:func:`scrub_source`): error messages quote the URI they failed on.

Python 3.8 compatible, stdlib only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import platform
import re
import stat
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, NoReturn, Optional, Tuple, Union

from edgeclf.errors import ConfigError, DataError, EdgeclfError
from edgeclf.runtime.sinks import Sink

__all__ = [
    "AUDIT_FORMAT",
    "AUDIT_VERSION",
    "GENESIS",
    "AuditLog",
    "AuditSink",
    "AuditReport",
    "verify_audit",
    "package_versions",
    "source_fact",
    "scrub_source",
    "SOURCE_PLACEHOLDER",
    "result_line",
    "STATES",
]

logger = logging.getLogger(__name__)

AUDIT_FORMAT = "edgeclf-audit"
AUDIT_VERSION = 1
GENESIS = "0" * 64
STATES = ("intact", "unterminated", "tampered", "not_audit")
_TYPES = ("start", "digest", "fault", "recovery", "event", "end")
_KEYS = ("hash", "payload", "prev", "seq", "time", "type")
_MAX_LINE = 1 << 20  # a record is small; a longer line is not one of ours
_RECORD_START = b'{"hash":"'  # every record's canonical spelling starts so (sorted keys)
_HEAD = re.compile(r"[0-9a-fA-F]{64}")
_WHAT_A_LOG_IS = ("an audit log is the hash-chained JSON-lines file `edgeclf run --audit` writes "
                  "(audit-<UTC>-<id>.jsonl in the --audit folder): give that file")
PathLike = Union[str, "os.PathLike[str]"]


def _clean(value: Any) -> Any:
    """A JSON-safe copy: non-finite floats and unknown objects become strings, keys strings, tuples lists."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    try:  # numpy scalars and the like
        item = value.item()
        if isinstance(item, (bool, int, float, str)):
            return _clean(item)
    except Exception:  # noqa: BLE001 - anything else is recorded by its text
        pass
    return str(value)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _record_hash(rec: Mapping[str, Any]) -> str:
    body = {k: v for k, v in rec.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode("ascii")).hexdigest()


def result_line(record: Mapping[str, Any]) -> bytes:
    """A result record as the results file holds it (JsonlSink's spelling), newline included."""
    return (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")


def package_versions() -> Dict[str, str]:
    """Versions of what shapes the results on this device (stdlib lookup; no imports of the packages)."""
    out = {"python": platform.python_version()}
    try:
        from importlib import metadata as md  # Python 3.8+
    except ImportError:  # pragma: no cover
        return out
    for dist in ("edgeclf", "numpy", "onnxruntime", "onnxruntime-gpu", "opencv-python-headless", "opencv-python",
                 "pydicom", "tensorrt"):
        try:
            out[dist] = md.version(dist)
        except Exception:  # noqa: BLE001 - not installed
            continue
    return out


def source_fact(uri: str) -> Dict[str, str]:
    """What the audit records about a source: its kind and a keyed hash of the URI, never the URI (paths and
    stream addresses may carry patient names or credentials).

    ``uri_hmac``: the first 16 hex of HMAC-SHA256(key, URI as given, stripped) under the install's source key
    (:func:`edgeclf.runtime.sources.source_hash`; the key file is ``sources.source_key_path()``, 0600, per user;
    ``$EDGECLF_SOURCE_KEY`` names another). Its first 12 hex are the ``source_id`` of the run's log lines. A plain
    hash of a path named after a patient or an MRN could be matched against a list of them in a second; this one
    only with the key. ``key_id``: the first 8 hex of sha256(key), saying which key made it; ``key_scope``:
    "install" (an auditor with the key file recomputes the hash, e.g. with this function under the same
    ``EDGECLF_SOURCE_KEY``) or "process" (no key could be kept: nobody can recompute it)."""
    from edgeclf.runtime.sources import source_hash, source_key_info  # noqa: PLC0415 - sources imports numpy

    text = str(uri).strip()
    lower = text.lower()
    if lower.startswith("synthetic:"):
        kind = "synthetic"
    elif lower.startswith("watch:"):
        kind = "watch"
    elif lower.split("://", 1)[0] in ("rtsp", "rtsps", "rtmp", "http", "https") and "://" in lower:
        kind = "stream"
    elif text.isdigit() or lower.startswith("/dev/video"):
        kind = "camera"
    elif " ! " in text:
        kind = "gstreamer"
    else:
        kind = "path"
    return {"kind": kind, "uri_hmac": source_hash(text, 16), **source_key_info()}


SOURCE_PLACEHOLDER = "<source>"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_SCHEME = re.compile(r"^(?:watch|synthetic|file|dicom):(?://)?", re.IGNORECASE)
_TOKEN_END = frozenset(" \t\r\n'\"()[]<>,;")
_MIN_FORM = 4  # shorter forms ("0": a camera index) name nobody and would mangle every number in the text
_MIN_PREFIX = 16  # messages clip long texts: this much of a form's start is enough to recognise it


def _source_forms(uri: str) -> List[str]:
    """How a source URI shows up in messages: as given, with user:password redacted, without its scheme,
    absolute, its last path part, and each as repr() quotes it; longest first."""
    text = str(uri).strip()
    from edgeclf.runtime.sources import redact_uri

    forms = {text, redact_uri(text)}
    bare = _SCHEME.sub("", text)
    paths = [bare]
    if text.lower().startswith("watch:"):
        # open_watch splits watch:FOLDER?poll=..&state=PATH at "?": messages quote FOLDER and PATH, never
        # the URI with its options (a short folder would otherwise match no form at all).
        bare, _, query = bare.partition("?")
        paths = [bare] + [item[len("state="):] for item in query.split("&") if item.startswith("state=")]
    for path in paths:
        if path and "://" not in path:  # a path (a file, a watched folder): also absolute and its file name
            forms.update({path, os.path.abspath(path), os.path.basename(path.rstrip("/\\"))})
    forms.update([repr(f)[1:-1] for f in list(forms)])
    return sorted((f for f in forms if len(f) >= _MIN_FORM), key=len, reverse=True)


def _cut_form(text: str, form: str) -> str:
    head = form[:_MIN_PREFIX]
    out: List[str] = []
    i = 0
    while True:
        j = text.find(head, i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        k = j + len(head)
        while k < len(text) and k - j < len(form) and text[k] == form[k - j]:  # as far as the form goes
            k += 1
        while k < len(text) and text[k] not in _TOKEN_END:  # and the rest of that word (a file in the folder)
            k += 1
        out.append(text[i:j] + SOURCE_PLACEHOLDER)
        i = k


def scrub_source(text: str, uri: Optional[str] = None) -> str:
    """`text` with the source URI (see :func:`_source_forms`; also when a message clipped it) and any
    other URL replaced by ``<source>``: for texts the audit log keeps, which must name no patient."""
    out = str(text)
    if uri:
        for form in _source_forms(uri):
            out = _cut_form(out, form)
    return _URL.sub(SOURCE_PLACEHOLDER, out)


def _scrub_payload(value: Any, uri: Optional[str]) -> Any:
    if isinstance(value, str):
        return scrub_source(value, uri)
    if isinstance(value, dict):
        return {k: _scrub_payload(v, uri) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_payload(v, uri) for v in value]
    return value


class AuditLog:
    """Write one run's audit log. A context manager: leaving it writes ``end`` if the caller did not
    (status "error" with the exception's message when one is propagating), then closes.

    path: a new file (an existing one is refused: logs are never overwritten), or an existing folder,
        in which ``audit-<UTC time>-<session>.jsonl`` is created.
    fsync_every: seconds between fsyncs (0: every record; None: never); ``start``, ``fault`` and
        ``end`` are always fsynced. Use the results file's value.
    digest_every: results per ``digest`` record (>= 1).
    source: the run's source URI; it (and any URL) never reaches the log: fault, recovery, event and end
        texts have it replaced by ``<source>`` (:func:`scrub_source`). The start record names the source
        by :func:`source_fact` only.

    Thread-safe: faults may be recorded from a reader thread while results come from the run loop.
    Writing failures (a full disk) raise EdgeclfError naming the log and how many records it holds;
    the file keeps only whole records.
    """

    def __init__(self, path: PathLike, *, fsync_every: Optional[float] = 1.0, digest_every: int = 1000,
                 source: Optional[str] = None) -> None:
        if fsync_every is not None and (isinstance(fsync_every, bool) or not isinstance(fsync_every, (int, float))
                                        or not (fsync_every >= 0 and math.isfinite(fsync_every))):
            raise ConfigError(f"audit fsync_every is {fsync_every!r}; allowed: seconds >= 0 (0 = every record) or None")
        if isinstance(digest_every, bool) or not isinstance(digest_every, int) or digest_every < 1:
            raise ConfigError(f"audit digest_every is {digest_every!r}; allowed: an integer >= 1 (results per digest)")
        self.session = uuid.uuid4().hex
        self._source = source
        target = os.fspath(path)
        if target.endswith(("/", os.sep)):  # "logs/": a folder, made if missing
            try:
                os.makedirs(target, exist_ok=True)
            except OSError as exc:
                raise EdgeclfError(f"cannot create the audit folder {target}: {exc.strerror}; choose another path") from None
        if os.path.isdir(target):
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            target = os.path.join(target, f"audit-{stamp}-{self.session[:8]}.jsonl")
        self.path = target
        self.fsync_every: Optional[float] = None if fsync_every is None else float(fsync_every)
        self.digest_every = digest_every
        self.records = 0  # whole records in the file
        self.results = 0  # results folded into digests (and pending)
        self.abstained = 0
        self.faults = 0
        self.fsyncs = 0
        self.head = GENESIS  # hash of the last record written: keep it elsewhere to anchor the log
        self.ended = False
        self.failed: Optional[str] = None
        self._lock = threading.RLock()
        self._size = 0
        self._last_sync = time.monotonic()
        self._unsynced = 0
        self._pending = hashlib.sha256()
        self._pending_n = 0
        self._pending_abstained = 0
        self._pending_first: Any = None
        self._pending_last: Any = None
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except FileExistsError:
            raise ConfigError(f"audit log {self.path} exists; audit logs are never overwritten: give a new file or a folder") from None
        except OSError as exc:
            raise EdgeclfError(f"cannot create the audit log {self.path}: {exc.strerror}; choose another path") from None
        self._sync_dir(parent)

    # -- writing

    @staticmethod
    def _sync_dir(parent: str) -> None:
        try:
            fd = os.open(parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # not everywhere (Windows, some network file systems)
            logger.debug("directory fsync not supported for %s", parent)
        finally:
            os.close(fd)

    def _append(self, rtype: str, payload: Mapping[str, Any], *, sync: bool = False) -> Dict[str, Any]:
        with self._lock:
            if self.failed is not None:
                raise EdgeclfError(self.failed)
            if self._fd is None:
                raise EdgeclfError(f"audit log {self.path} is already closed")
            if self.ended:
                raise EdgeclfError(f"audit log {self.path} already has its end record; start a new log for a new run")
            body = _clean(payload)
            if rtype not in ("start", "digest"):  # free texts (error messages) may quote the source
                body = _scrub_payload(body, self._source)
            rec: Dict[str, Any] = {"seq": self.records, "time": round(time.time(), 3), "type": rtype,
                                   "payload": body, "prev": self.head}
            rec["hash"] = _record_hash(rec)
            data = (_canonical(rec) + "\n").encode("ascii")
            try:
                self._write_all(data)
            except OSError as exc:
                self._fail(exc, "writing", rtype)
            self._size += len(data)
            self.records += 1
            self.head = rec["hash"]
            self._unsynced += 1
            every = self.fsync_every
            if sync or (every is not None and (every == 0.0 or time.monotonic() - self._last_sync >= every)):
                self._sync(rtype)
            return rec

    def _write_all(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:  # pragma: no cover - a regular file never takes 0 bytes without an error
                raise OSError(errno.EIO, "short write")
            view = view[n:]

    def _sync(self, rtype: str) -> None:
        fd = self._fd
        assert fd is not None
        try:
            os.fsync(fd)
        except OSError as exc:
            self._fail(exc, "syncing", rtype)
        self.fsyncs += 1
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def _fail(self, exc: OSError, doing: str, rtype: str) -> NoReturn:
        """Cut a partly written record off (the log keeps whole records only), remember and raise."""
        fd = self._fd
        if fd is not None:
            try:
                os.ftruncate(fd, self._size)
            except OSError:  # the truncate needs no space, but a dying disk may refuse it too
                logger.debug("could not cut a partial audit record from %s", self.path)
        self.failed = (f"{doing} the audit log {self.path} failed at its {rtype} record ({exc.strerror or exc}); it holds "
                       f"{self.records} whole records; free space or move the log, then start a new run")
        raise EdgeclfError(self.failed) from None

    # -- the record types

    def start(
        self,
        *,
        bundle_checksum: str,
        device_profile: Optional[Mapping[str, Any]] = None,
        config: Optional[Mapping[str, Any]] = None,
        packages: Optional[Mapping[str, str]] = None,
        **extra: Any,
    ) -> Dict[str, Any]:
        """The first record: what ran, where and how. Call once, before any result."""
        if self.records:
            raise EdgeclfError(f"audit log {self.path} has already started")
        payload: Dict[str, Any] = {
            "format": AUDIT_FORMAT, "version": AUDIT_VERSION, "session": self.session,
            "bundle_checksum": bundle_checksum, "device_profile": dict(device_profile) if device_profile else None,
            "config": dict(config or {}), "packages": dict(packages) if packages is not None else package_versions(),
            "platform": {"system": platform.system(), "machine": platform.machine(), "python": sys.version.split()[0]},
            "digest_every": self.digest_every, "fsync_every": self.fsync_every,
        }
        payload.update(extra)
        return self._append("start", payload, sync=True)

    def _require_started(self) -> None:
        if not self.records:
            raise EdgeclfError(f"audit log {self.path}: call start() before recording anything else")

    def result(self, record: Mapping[str, Any]) -> None:
        """Fold one result record (the dict the results sink got) into the running digest; writes a
        ``digest`` record every `digest_every` results."""
        self.result_bytes(result_line(record), frame=record.get("frame"), abstain=bool(record.get("abstain")))

    def result_bytes(self, line: bytes, *, frame: Any = None, abstain: bool = False) -> None:
        """As :meth:`result`, for a line already serialised as the results file holds it."""
        with self._lock:
            self._require_started()
            self._pending.update(line)
            self._pending_n += 1
            self._pending_abstained += int(abstain)
            if self._pending_first is None:
                self._pending_first = frame
            self._pending_last = frame
            self.results += 1
            self.abstained += int(abstain)
            if self._pending_n >= self.digest_every:
                self.digest()

    def digest(self) -> Optional[Dict[str, Any]]:
        """Write a ``digest`` of the results since the last one now (None when there are none)."""
        with self._lock:
            self._require_started()
            if not self._pending_n:
                return None
            payload = {"count": self._pending_n, "total": self.results, "abstained": self._pending_abstained,
                       "abstained_total": self.abstained, "first_frame": self._pending_first,
                       "last_frame": self._pending_last, "sha256": self._pending.hexdigest()}
            rec = self._append("digest", payload)
            self._pending = hashlib.sha256()
            self._pending_n = self._pending_abstained = 0
            self._pending_first = self._pending_last = None
            return rec

    def fault(self, kind: str, message: str, **details: Any) -> Dict[str, Any]:
        """Something went wrong (kind: e.g. "source", "backend", "sink", "disk"); fsynced at once.
        Pending results are digested first, so the log shows which results came before the fault."""
        with self._lock:
            self._require_started()
            self.digest()
            self.faults += 1
            return self._append("fault", {"kind": str(kind), "message": str(message), **details}, sync=True)

    def recovery(self, kind: str, message: str = "", **details: Any) -> Dict[str, Any]:
        """The run came back from a fault (e.g. a source reconnected after `attempts`)."""
        with self._lock:
            self._require_started()
            self.digest()
            return self._append("recovery", {"kind": str(kind), "message": str(message), **details})

    def event(self, name: str, **details: Any) -> Dict[str, Any]:
        """Anything else worth a line (a configuration change, an operator note)."""
        with self._lock:
            self._require_started()
            return self._append("event", {"name": str(name), **details})

    def end(self, status: str = "ok", *, error: Optional[str] = None, summary: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """The last record: pending results digested, then how the run ended; always fsynced.

        status: "ok", "signal", "error" (give `error`, one line) or any short word the caller uses.
        """
        with self._lock:
            self._require_started()
            self.digest()
            payload = {"status": str(status), "error": error, "results": self.results, "abstained": self.abstained,
                       "faults": self.faults, "summary": dict(summary) if summary is not None else None}
            rec = self._append("end", payload, sync=True)
            self.ended = True
            return rec

    def close(self) -> None:
        """Close the file (idempotent). Does not write ``end``: a log closed without it reads as unterminated."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._unsynced and self.fsync_every is not None and self.failed is None:
                os.fsync(fd)
                self.fsyncs += 1
                self._unsynced = 0
        except OSError as exc:
            logger.warning("audit log %s: final fsync failed (%s)", self.path, exc.strerror)
        finally:
            os.close(fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self.records and not self.ended and self.failed is None and self._fd is not None:
                if exc is None:
                    self.end("ok")
                elif isinstance(exc, KeyboardInterrupt):
                    self.end("signal", error="interrupted")
                else:
                    self.end("error", error=" ".join(str(exc).split())[:500] or type(exc).__name__)
        except EdgeclfError as end_exc:
            if exc is None:
                raise
            logger.error("%s", end_exc)  # the run's own error is the one to report
        finally:
            self.close()


class AuditSink(Sink):
    """A results sink (edgeclf.runtime.sinks.Sink protocol) that folds every result into an AuditLog's
    digests. Put it after the JSONL sink: it then records only results the results file holds.
    Closing it does not end the log (the run does, with its status)."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.written = 0

    def write(self, record: Dict[str, Any], image: Any = None) -> None:
        self.log.result(record)
        self.written += 1

    def close(self) -> None:
        if self.log.failed is None and self.log.records and not self.log.ended and self.log._fd is not None:
            self.log.digest()  # results so far are on record even if the run dies before end()



# ----------------------------------------------------------------------------------------------- verify


@dataclass
class AuditReport:
    """What :func:`verify_audit` found.

    state: "intact", "unterminated", "tampered" or "not_audit" (no audit log at all: a results file or
    anything else given by mistake; reason says what it is). records: whole records that verified (the chain up
    to the first bad one). bad_line / bad_seq / reason: the first bad record (tampered only); reason is one
    line. torn: partial last lines ignored (0 or 1). head: hash of the last good record. session, run, results,
    abstained, faults: from the records. end: the end record's payload. results_check: with `results=`,
    what the results file showed against the digests.
    """

    path: str
    state: str
    records: int = 0
    torn: int = 0
    head: str = GENESIS
    reason: str = ""
    bad_line: Optional[int] = None
    bad_seq: Optional[int] = None
    session: Optional[str] = None
    run: Optional[str] = None  # the run id of an appending run (its results are the lines tagged with it)
    results: int = 0
    abstained: int = 0
    faults: int = 0
    end: Optional[Dict[str, Any]] = None
    results_check: Optional[Dict[str, Any]] = None
    digests: List[Dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.state == "intact"

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "state": self.state, "records": self.records, "torn": self.torn, "head": self.head,
                "reason": self.reason, "bad_line": self.bad_line, "bad_seq": self.bad_seq, "session": self.session, "run": self.run,
                "results": self.results, "abstained": self.abstained, "faults": self.faults, "end": self.end,
                "results_check": self.results_check}


def _as_int(value: Any) -> int:
    """A count from a record; 0 for anything else (a forged record must not crash the verifier)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _split_lines(data: bytes) -> Tuple[List[bytes], bool]:
    """Lines of the file and whether the last one lacks its newline."""
    if not data:
        return [], False
    parts = data.split(b"\n")
    if parts[-1] == b"":
        return parts[:-1], False
    return parts, True


def _is_torn(raw: bytes, unterminated: bool) -> bool:
    """A power loss or kill -9 leaves a cut-short last line, or NUL bytes where data never reached the disk."""
    return unterminated or b"\x00" in raw


def _record_like(raw: bytes) -> bool:
    """Whether a line is, or was before an edit, an audit record (results and other JSON lines have no such pair)."""
    return b'"hash"' in raw and b'"prev"' in raw


def _torn_record(raw: bytes) -> bool:
    """Whether a cut-short first line is the beginning of a record (or zeros where it never reached the disk)."""
    text = raw.strip(b"\x00")
    return not text or text.startswith(_RECORD_START) or _RECORD_START.startswith(text)


def _not_audit_reason(first: Any) -> str:
    """What a file with no audit record in it is, when it can be told, and what to give instead."""
    if isinstance(first, dict) and "frame" in first and ({"probs", "label", "abstain"} & set(first)):
        return ("this is a results file (line 1 is a result); give the audit log (--audit of edgeclf run), "
                "and this file as --results to check it against the log")
    return f"line 1 is not an edgeclf audit record and no line is one; {_WHAT_A_LOG_IS}"


def _expected_head(value: str) -> str:
    text = str(value).strip()
    if not _HEAD.fullmatch(text):
        raise ConfigError(f"the expected head hash (--head) is {text[:80]!r} ({len(text)} characters); allowed: a SHA256 in 64 hex "
                          "characters, the run summary's audit head; copy it whole")
    return text.lower()  # hexdigest() spells it in lower case


def verify_audit(path: PathLike, *, results: Optional[PathLike] = None, expected_head: Optional[str] = None) -> AuditReport:
    """Check an audit log; returns an AuditReport (never raises for a damaged log: that is its state; a file
    that holds no audit record at all, or empty input that is not a regular file, is state "not_audit").

    results: a results file (JSON lines) to check against the digests: every digested result must be
        in it, in order, byte for byte (``results_check``: "match", or "mismatch" making the log's state
        "tampered"; results after the last digest are counted as "undigested", a mismatch when the log has
        its end record, which digests every result; a cut-short last line is counted as "torn").
    expected_head: the head hash recorded elsewhere at the end of the run; a log whose last record has
        another hash was cut or rewritten (tampered); 64 hex characters, any case.
    Raises DataError only when the file cannot be read, ConfigError for an `expected_head` that is no SHA256.
    """
    p = os.fspath(path)
    head = None if expected_head is None else _expected_head(expected_head)
    try:
        with open(p, "rb") as f:
            regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read audit log {p}: {exc.strerror}; check the path") from None
    rep = AuditReport(path=p, state="unterminated")
    if not data and not regular:  # /dev/null, a pipe that gave nothing: a run only ever writes regular files
        rep.state, rep.reason = "not_audit", f"empty, and not a regular file; {_WHAT_A_LOG_IS}"
        return rep
    lines, unterminated = _split_lines(data)
    prev = GENESIS
    ended = False

    def not_audit(first: Any) -> AuditReport:
        rep.state, rep.reason = "not_audit", _not_audit_reason(first)
        return rep

    def bad(line_no: int, seq: Optional[int], why: str) -> AuditReport:
        rep.state, rep.bad_line, rep.bad_seq = "tampered", line_no, seq
        rep.reason = f"line {line_no}" + (f" (record {seq})" if seq is not None else "") + f": {why}"
        return rep

    for i, raw in enumerate(lines):
        line_no = i + 1
        last = i == len(lines) - 1
        rec: Any = None
        if len(raw) <= _MAX_LINE:
            try:
                rec = json.loads(raw.decode("ascii"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                rec = None
        if not isinstance(rec, dict):
            if ended:  # end is fsynced and nothing follows it: a cut-short line after it is no power-loss tear
                return bad(line_no, None, "data after the end record (appended after the run ended)")
            if last and _is_torn(raw, unterminated):
                if line_no == 1 and not _torn_record(raw):  # one unfinished line that never began as a record
                    return not_audit(rec)
                rep.torn = 1
                break
            if line_no == 1 and not any(_record_like(x) for x in lines):
                return not_audit(rec)
            return bad(line_no, None, "not a whole audit record (edited, or a line was inserted)")
        seq = rec.get("seq") if isinstance(rec.get("seq"), int) and not isinstance(rec.get("seq"), bool) else None
        if ended:
            return bad(line_no, seq, "a record after the end record (appended after the run ended)")
        if tuple(sorted(rec)) != _KEYS or not isinstance(rec.get("payload"), dict) or rec.get("type") not in _TYPES:
            if line_no == 1 and not any(_record_like(x) for x in lines):
                return not_audit(rec)
            return bad(line_no, seq, "not an edgeclf audit record (fields or type changed)")
        try:
            canonical = _canonical(rec).encode("ascii")
        except ValueError:
            canonical = b""
        if canonical != raw:
            return bad(line_no, seq, "not in the canonical spelling the writer uses (the line was edited)")
        if _record_hash(rec) != rec["hash"]:
            return bad(line_no, seq, "its hash does not match its contents (the record was edited)")
        if seq != rep.records:
            return bad(line_no, seq, f"sequence number {seq}, expected {rep.records} (a record was removed, inserted or moved)")
        if rec["prev"] != prev:
            return bad(line_no, seq, "it does not follow the record before it (a record was removed, inserted or moved)")
        payload = rec["payload"]
        if seq == 0:
            if rec["type"] != "start" or payload.get("format") != AUDIT_FORMAT:
                return bad(line_no, seq, "the first record is not an edgeclf audit start record")
            rep.session = str(payload.get("session"))
            cfg = payload.get("config")
            run = cfg.get("run") if isinstance(cfg, dict) else None
            rep.run = run if isinstance(run, str) and run else None
        elif rec["type"] == "start":
            return bad(line_no, seq, "a second start record (two logs spliced together)")
        if rec["type"] == "digest":
            rep.digests.append(payload)
            rep.results = _as_int(payload.get("total"))
            rep.abstained = _as_int(payload.get("abstained_total"))
        elif rec["type"] == "fault":
            rep.faults += 1
        elif rec["type"] == "end":
            ended = True
            rep.end = payload
        prev = rec["hash"]
        rep.records += 1
        rep.head = prev
    rep.state = "intact" if ended else "unterminated"
    if rep.state == "unterminated" and not lines:
        rep.reason = ("empty: no record at all: the run was cut off before its first record (power loss, kill -9, or its "
                      "start record could not be written), or this is not an audit log")
    elif rep.state == "unterminated":
        rep.reason = (f"no end record after {rep.records} whole records" + (", a torn last line ignored" if rep.torn else "")
                      + ": the run was cut off (power loss, kill -9) before it ended")
    if head is not None and head != rep.head:
        rep.state, rep.bad_line, rep.bad_seq = "tampered", rep.records, rep.records - 1 if rep.records else None
        rep.reason = f"the last record's hash {rep.head[:16]}... is not the expected head {head[:16]}... (the log was cut or rewritten)"
    if results is not None:
        rep.results_check = _check_results(rep.digests, results, run=rep.run, end=rep.end if ended else None)
        if rep.results_check["state"] == "mismatch" and rep.state != "tampered":
            rep.state = "tampered"
            rep.reason = f"results file: {rep.results_check['reason']}"
    return rep


def _result_lines(path: PathLike, torn: List[bytes], run: Optional[str] = None, others: Optional[List[int]] = None) -> Iterator[bytes]:
    """Whole lines of a results file, newline included; a torn last line is left out and put in `torn`
    (so that it is counted, as read_jsonl counts it). run: only the lines of that run (`edgeclf run --append`
    writes ``{"run":"<id>",...`` first in each), the others counted in `others`[0]."""
    prefix = None if run is None else ('{"run":' + json.dumps(run) + ",").encode("ascii")
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                torn.append(raw)
            elif prefix is not None and not raw.startswith(prefix):
                if others is not None:
                    others[0] += 1
            else:
                yield raw


def _check_results(digests: List[Dict[str, Any]], results: PathLike, *, run: Optional[str] = None,
                   end: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """run: the audited run's id (its start record's config, written by `edgeclf run --append`): a results file
    that several runs appended to is checked on that run's lines only; the other runs' lines are counted.
    end: the end record's payload of an ended log. end() digests every pending result first, so with it a
    result after the last digest, or a result count other than the lines checked, is a mismatch."""
    p = os.fspath(results)
    others = [0]
    try:
        torn: List[bytes] = []
        lines = _result_lines(p, torn, run, others)
        checked = 0
        for n, d in enumerate(digests):
            h = hashlib.sha256()
            count = _as_int(d.get("count"))
            got = 0
            for line in lines:
                h.update(line)
                got += 1
                if got == count:
                    break
            if got < count:
                return {"state": "mismatch", "checked": checked, "reason": f"digest {n + 1} covers {count} results but the "
                        f"file has only {got} left after line {checked} (results were removed)"}
            if h.hexdigest() != d.get("sha256"):
                return {"state": "mismatch", "checked": checked, "reason": f"results lines {checked + 1}-{checked + count} do not "
                        f"match digest {n + 1} (a result was edited, removed, inserted or moved)"}
            checked += count
        undigested = sum(1 for _ in lines)
    except OSError as exc:
        raise DataError(f"cannot read results file {p}: {exc.strerror}; check the path") from None
    out: Dict[str, Any] = {"state": "match", "checked": checked, "undigested": undigested, "torn": len(torn), "reason": ""}
    if end is not None and undigested:
        out.update(state="mismatch", reason=f"{undigested} results after line {checked} are in no digest, but the log "
                   "ended, and its end digests every result (results were appended after the run)")
    elif end is not None and "results" in end and (type(end["results"]) is not int or end["results"] != checked):
        out.update(state="mismatch", reason=f"the end record counts {repr(end['results'])[:40]} results but the digests cover "
                   f"{checked} (the end record or the digests do not belong to these results)")
    if run is not None:
        out.update(run=run, other_runs_lines=others[0])
    return out
