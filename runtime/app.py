"""Device-side entry points used by the CLI: run a bundle on a source, verify a bundle."""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import io
import logging
import os
import re
import signal
import stat
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from edgeclf.errors import BundleError, ConfigError, EdgeclfError, IntegrityError
from edgeclf.runtime import _cv
from edgeclf.runtime.audit import AuditSink, source_fact
from edgeclf.runtime.backends import Backend, BackendOptions, create_backend
from edgeclf.runtime.bundle import Bundle, load_bundle
from edgeclf.runtime.pipeline import WAITING_KINDS, RunOptions, RunSummary, run_pipeline
from edgeclf.runtime.postprocess import decide, probabilities
from edgeclf.runtime.sinks import JsonlSink, Sink, check_append_tail, tag_run
from edgeclf.runtime.sources import Frame, FrameSource, open_source

__all__ = ["run_bundle", "check_distinct_outputs", "check_outside_bundle", "engine_cache_output", "watch_state_output", "check_results_file", "check_consumed_results", "verify_bundle", "resolve_backend", "with_profile_fallback", "open_backend", "profile_backend_factory", "PARITY_TOLERANCE",
           "VARIANT_TOLERANCE"]

log = logging.getLogger(__name__)
# Same model, same inputs, another machine or ORT build: logits may differ by float rounding only.
PARITY_TOLERANCE = 1e-3
VARIANT_TOLERANCE = 0.05  # relative to the largest reference logit


def _install_stop_handlers(stop: threading.Event, received: Optional[List[int]] = None) -> Callable[[], None]:
    """SIGINT/SIGTERM end the run after the current frame (summary written); returns the restorer. Each signal
    that came is appended to `received` (the CLI exits as interrupted after a SIGINT, 0 after a SIGTERM). A signal
    the process was started ignoring (SIGINT of a background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        if received is not None:
            received.append(signum)
        if stop.is_set():  # a second Ctrl-C while files close must not cut them (or the audit log) short
            log.warning("signal %d: already stopping; finishing the results files first", signum)
        else:
            log.warning("signal %d: stopping after the current frame", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) == signal.SIG_IGN:
            continue  # ignored since start (a background job, nohup): keep ignoring it, as every POSIX tool does
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    return restore


def _open(uri: str, realtime: bool, reconnect: bool) -> FrameSource:
    """The source, wrapped for live use: cameras and streams reconnect and keep only the newest frame;
    files paced to their frame rate with `realtime` (late frames dropped and counted)."""
    from edgeclf.runtime.live import LatestFrameReader, ReconnectingSource

    src = open_source(uri)
    kind = getattr(src, "kind", "")
    if reconnect and kind in ("camera", "stream", "gstreamer"):
        first = [src]

        def reopen() -> FrameSource:
            return first.pop() if first else open_source(uri)

        return ReconnectingSource(reopen, drop="latest", source=uri)
    if realtime and not getattr(src, "live", False):
        if not src.fps:
            src.close()
            raise ConfigError(f"--realtime needs a frame rate; source {kind} has none; leave --realtime out")
        return LatestFrameReader(src, drop="latest", realtime=True)
    return src


class _ProgressSource:
    """Wraps a source so that every read tells `on_read` (the systemd watchdog) the frame loop is alive.

    The pipeline reads ahead at most max(2, batch) frames, so reads stop when inference or a sink hangs, too.
    Everything else is the wrapped source's."""

    def __init__(self, src: FrameSource, on_read: Callable[[Optional[Frame]], None]) -> None:
        self._src = src
        self._on_read = on_read

    def read(self, *args: Any, **kwargs: Any) -> Optional[Frame]:
        frame = self._src.read(*args, **kwargs)
        self._on_read(frame)
        return frame

    def __getattr__(self, name: str) -> Any:
        return getattr(self._src, name)

    def __iter__(self) -> Any:
        return iter(self._src)

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> _ProgressSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _watchdog_hook(notifier: Any, kind: str) -> Callable[[Optional[Frame]], None]:
    """Ping on every frame; a watched folder (portable X-ray) also pings while it waits, since waiting is its job.
    A camera or stream that delivers nothing stops the pings, and systemd restarts the service."""
    idle_ok = kind in WAITING_KINDS

    def on_read(frame: Optional[Frame]) -> None:
        if frame is not None or idle_ok:
            notifier.ping()

    return on_read


def resolve_backend(backend: Optional[str], device: Optional[str]) -> Tuple[str, str, Optional[str]]:
    """(backend, why it was chosen, device profile name). Precedence: --backend, else the profile's first
    preferred backend that can run here (each one passed over logged as a WARNING with the reason), else ort-cpu."""
    if backend:
        return backend, "argument", device
    if device is None:
        return "ort-cpu", "default", None
    from edgeclf.devices import load_profile
    from edgeclf.runtime.backends import backend_availability, choose_backend

    prof = load_profile(device)
    chosen, skipped = choose_backend(prof.preferred_backends, backend_availability(), profile=device)
    for line in skipped:
        log.warning("device profile %s prefers %s, falling back: %s", device, line.split(":")[0], line)
    why = f"device profile {device} (first of {', '.join(prof.preferred_backends)} available here"
    return chosen, why + (f"; passed over {'; '.join(skipped)})" if skipped else ")"), device


def with_profile_fallback(backend: str, how: str, device: Optional[str], explicit: bool,
                          attempt: Callable[[str], Any]) -> Tuple[Any, str, str]:
    """(attempt(backend), the backend it ran with, why). A backend a device profile chose (not --backend) whose
    onnxruntime provider is listed but does not load here (pip onnxruntime-gpu without TensorRT's libraries lists the
    TensorRT provider) gives way to the profile's next backend that can run, with a warning, as resolve_backend does
    for one that is not installed at all."""
    from edgeclf.errors import ProviderUnavailableError

    while True:
        try:
            return attempt(backend), backend, how
        except ProviderUnavailableError as exc:
            if explicit or device is None:
                raise
            from edgeclf.devices import load_profile
            from edgeclf.runtime.backends import backend_availability

            prefs = list(load_profile(device).preferred_backends)
            have = backend_availability()
            rest = [bk for bk in prefs[prefs.index(backend) + 1:] if have.get(bk) is None] if backend in prefs else []
            if not rest:
                raise
            log.warning("device profile %s prefers %s, falling back to %s: %s", device, backend, rest[0], exc)
            how += f"; {backend} did not load here, fell back to {rest[0]}"
            backend = rest[0]


def open_backend(b: Bundle, backend: str, *, precision: Optional[str] = None, threads: Optional[int] = None,
                 options: Optional[BackendOptions] = None) -> Tuple[Backend, str]:
    """The backend for a loaded bundle and the model id it runs. trt: the engine for the device profile
    (built into the per-user cache when missing or stale); precision None means auto, as `build-engine`."""
    m = b.manifest
    shape = (m.preprocess.channels,) + tuple(m.preprocess.size)
    opts = options or BackendOptions()
    if backend == "trt":
        from edgeclf.runtime.trt import TrtBackend, open_trt_engine

        # Only a build speaks (minutes on a Jetson: never silently); a valid cached engine loads without a word.
        record = open_trt_engine(b, dataclasses.replace(opts, precision=precision or opts.precision),
                                 progress=lambda msg: log.warning("TensorRT engine: %s", msg))
        be = TrtBackend(str(record.path), (int(shape[0]), int(shape[1]), int(shape[2])), m.num_outputs,
                        max_batch=opts.max_batch, record=record)
        return be, f"trt-{record.key.precision}" + (f"-dla{record.key.dla_core}" if record.key.dla_core is not None else "")
    model_path, variant = b.select(precision, backend)
    vprec = "int8" if variant.startswith("int8") else variant
    return create_backend(str(model_path), shape, m.num_outputs, backend=backend, threads=threads,
                          options=dataclasses.replace(opts, precision=vprec), bundle=b), variant


_GLOB_MAGIC = re.compile(r"[*?[]")


class _SourcePaths:
    """What a source URI names on disk: `files` it reads or keeps (the file itself, the images a glob matches, a
    watch state), `folders` it reads files of (a folder of images or DICOM; a watched folder, `watched`, reads
    every new file), a glob's `pattern`, and `states`: the watch state files it writes (state=PATH, or the default
    one in the watched folder)."""

    def __init__(self, files: Optional[List[str]] = None, folders: Optional[List[str]] = None,
                 pattern: Optional[str] = None, watched: bool = False, states: Optional[List[str]] = None) -> None:
        self.files = files or []
        self.folders = folders or []
        self.pattern = pattern
        self.watched = watched
        self.states = states or []


def _source_paths(uri: str) -> _SourcePaths:
    """The files and folders a source URI names (see _SourcePaths). Nothing for cameras, streams and synthetic
    sources."""
    text = uri.strip() if isinstance(uri, str) else ""
    if text.lower().startswith("watch:"):
        folder, _, query = text[len("watch:"):].partition("?")
        from edgeclf.runtime.watch import STATE_NAME

        state = [os.path.expanduser(v) for k, _, v in (item.partition("=") for item in query.split("&")) if k == "state" and v]
        folders = [os.path.expanduser(folder)] if folder else []
        states = state or [os.path.join(f, STATE_NAME) for f in folders]
        return _SourcePaths(state, folders, watched=True, states=states)
    if not text or text.lower().startswith("synthetic:"):
        return _SourcePaths()
    path = os.path.expanduser(text)
    if os.path.isfile(path):
        return _SourcePaths([path])
    if os.path.isdir(path):  # as open_source: a folder of that name wins over a camera index
        return _SourcePaths(folders=[path])
    if _GLOB_MAGIC.search(path) and not os.path.exists(path):
        try:
            # only the images: the source reads nothing else a glob matches (a glob of DICOM files is refused)
            return _SourcePaths([p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and _is_image_name(p)],
                                pattern=path)
        except (OSError, ValueError):  # a pattern no file can match (a NUL byte): the source fails on its own
            return _SourcePaths()
    return _SourcePaths()


def _is_image_name(path: str) -> bool:
    from edgeclf.runtime.sources import IMAGE_EXTENSIONS

    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _names(path: str) -> List[str]:
    """`path` as the disk sees it: resolved, and its own name in its resolved folder (a symlink there is read by
    that name, and written through to its target)."""
    try:
        return [os.path.realpath(path), os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))),
                                                     os.path.basename(os.path.abspath(path)))]
    except (OSError, ValueError):
        return []


def _named_inside(path: str, folder: str) -> bool:
    """Whether `path` lies inside `folder`, by either of its _names (a symlink in the folder counts)."""
    try:
        f = os.path.realpath(folder)
        return any(os.path.commonpath([n, f]) == f for n in _names(path))
    except (OSError, ValueError):  # another drive (Windows), a NUL byte
        return False


def _folder_reads(path: str) -> bool:
    """Whether a folder source (images or DICOM) would read `path`, or its next run trip over it: a name with an
    image or DICOM extension (a folder holding both kinds is refused), or an existing file with the DICM marker.
    Anything else is skipped: an image folder lists only images, a DICOM folder counts it in source_stats.skipped.
    Checked at any depth inside the folder (the sources do not recurse: this errs on the side of refusing)."""
    from edgeclf.runtime.dicom import DICOM_EXTENSIONS, is_dicom_file

    names = _names(path)
    return (any(_is_image_name(n) or os.path.splitext(n)[1].lower() in DICOM_EXTENSIONS for n in names)
            or (bool(names) and is_dicom_file(names[0])))


def _same_file(a: str, b: str) -> bool:
    try:
        # hard links: samefile; it raises OSError while either does not exist
        return os.path.realpath(a) == os.path.realpath(b) or os.path.samefile(a, b)
    except (OSError, ValueError):  # ValueError: a NUL byte (no such file can exist)
        return False


def _inside(path: str, folder: str) -> bool:
    try:
        p, f = os.path.realpath(path), os.path.realpath(folder)
        return os.path.commonpath([p, f]) == f
    except (OSError, ValueError):  # another drive (Windows), a NUL byte
        return False


def _pattern_reads(pattern: str, path: str) -> bool:
    """Whether the image source of glob `pattern` would read `path` (once it exists) as a frame: an image file
    the pattern matches, compared as given and with symlinks resolved (fnmatch's '*' also spans '/': it errs on
    the side of refusing)."""
    from edgeclf.runtime.sources import IMAGE_EXTENSIONS

    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        return False
    pat = os.path.abspath(pattern)
    head = pat
    while _GLOB_MAGIC.search(head):  # the folder before the first wildcard, resolved: the pattern as the disk sees it
        head = os.path.dirname(head)
    pats = {pat, os.path.join(os.path.realpath(head), os.path.relpath(pat, head))}
    try:
        names = {os.path.abspath(path), os.path.realpath(path)}
    except (OSError, ValueError):
        return False
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in pats)


def check_distinct_outputs(source_uri: str, outputs: Dict[str, Optional[str]]) -> None:
    """Raise ConfigError (one line) when two output options name the same file, when one is the source file
    (or a file it keeps: a watch state, an image a glob source matches or would match), when one lies inside a
    watched folder (new files there are consumed as input), or when one inside a folder of images or DICOM is
    a file that folder reads or would read (see _folder_reads; results, summary, a video record or an --audit
    folder beside the images are allowed: the source skips them). Checked before anything is opened: such a
    run would overwrite the recording it classifies or mix its outputs. Paths are compared resolved
    (os.path.realpath; symlinks and hard links count as the same file). An --audit folder (an existing one, or
    a path ending in '/') only matters for the watched-folder check.
    No path is quoted: a source path may carry a patient's name."""
    named = [(opt, os.fspath(p)) for opt, p in outputs.items() if p]
    src = _source_paths(source_uri)
    for i, (opt, p) in enumerate(named):
        is_folder = opt == "--audit" and (p.endswith(("/", os.sep)) or os.path.isdir(p))
        for folder in src.folders:
            if not _named_inside(p, folder):
                continue
            if src.watched:
                raise ConfigError(
                    f"{opt} lies inside the watched folder of --source; allowed: outputs outside a folder being "
                    f"consumed (new files there are read as incoming ones); give {opt} a path outside that folder"
                )
            if not is_folder and _folder_reads(p):
                raise ConfigError(
                    f"{opt} lies inside the source folder (--source) and is a file it reads (an image or DICOM file, by "
                    f"its name or its DICM marker: it would be overwritten, or read by the next run); allowed: other "
                    f"files there (results.jsonl, summary.json, a video) or a path outside it; give {opt} another name"
                )
        if is_folder:
            continue  # a new, uniquely named log inside it
        if any(_same_file(p, f) for f in src.files):
            raise ConfigError(
                f"{opt} is the source file itself (or its watch state); allowed: an output path that is not an input; "
                f"give {opt} another path"
            )
        if src.pattern is not None and _pattern_reads(src.pattern, p):
            raise ConfigError(
                f"{opt} matches the --source pattern (the next run on it would read that file as a frame); allowed: an "
                f"output the pattern does not match; give {opt} another path"
            )
        for opt2, p2 in named[i + 1:]:
            if _same_file(p, p2):
                raise ConfigError(
                    f"{opt} and {opt2} name the same file; allowed: a file of its own for each output; "
                    f"give {opt2} another path"
                )


def engine_cache_output(flag: Optional[str], option: str = "--engine-cache") -> Dict[str, Optional[str]]:
    """The engine cache folder a TensorRT build would write into, for check_outside_bundle, named by where it came
    from: `option` (the flag given), else $EDGECLF_ENGINE_CACHE, else $XDG_CACHE_HOME's or ~/.cache's folder."""
    from edgeclf.runtime.engine import ENGINE_CACHE_ENV, cache_dir

    if flag:
        return {option: flag}
    if os.environ.get(ENGINE_CACHE_ENV):
        label = f"${ENGINE_CACHE_ENV}"
    elif os.environ.get("XDG_CACHE_HOME"):
        label = "the engine cache in $XDG_CACHE_HOME (edgeclf/engines; set $EDGECLF_ENGINE_CACHE or give " + option + ")"
    else:
        label = "the engine cache (~/.cache/edgeclf/engines; set $EDGECLF_ENGINE_CACHE or give " + option + ")"
    return {label: str(cache_dir(None))}


def watch_state_output(source_uri: str) -> Dict[str, Optional[str]]:
    """The watch state file(s) a watched folder source writes at every start, for check_outside_bundle."""
    src = _source_paths(source_uri)
    if not src.watched:
        return {}
    label = "the watch state (state=PATH of --source)" if src.files else \
        "the watch state (.edgeclf-watch.json in the watched folder; or give state=PATH)"
    return {label if n == 0 else f"{label} #{n + 1}": p for n, p in enumerate(src.states)}


def check_outside_bundle(bundle_path: str, outputs: Dict[str, Optional[str]]) -> None:
    """ConfigError (one line) when an output (file or folder) lies inside the bundle folder: a bundle holds only the
    files its checksums list, so any other file there makes it refuse to load from then on. Paths are compared
    resolved (symlinks, relative paths)."""
    for opt, p in outputs.items():
        if p and _inside(os.fspath(p), bundle_path):
            raise ConfigError(
                f"{opt} lies inside the bundle folder; allowed: outputs outside it (a bundle holds only the files its "
                f"checksums.sha256 lists: any other file there makes it refuse to load); give {opt} a path outside the bundle"
            )


def check_results_file(source_uri: str, out: Optional[str], *, append: bool, overwrite: Optional[bool]) -> None:
    """ConfigError (one line) before a run replaces an --out that holds results: always when the source is a watched
    folder whose state records files with results (they are not classified again: their results would be lost for good),
    and, with `overwrite` False (the CLI's default), for any non-empty file. `overwrite` None: replaced (the
    library's default, as before). What is not a regular file (/dev/stdout, a pipe) is never refused."""
    if not out or append:
        return
    try:
        st = os.stat(out)
    except (OSError, ValueError):
        return  # nothing there yet (or no such path can exist): check_output_path has judged it
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return
    if source_uri.strip().lower().startswith("watch:"):
        from edgeclf.runtime.watch import STATE_NAME, describe_watch_state, watch_state

        state, counts = watch_state(source_uri)
        if counts["with_results"]:  # files that failed at open have no results: replacing the file loses none of theirs
            where = "the state=PATH file" if state else f"{STATE_NAME} in the watched folder"
            raise ConfigError(
                f"--out already holds results and the watch state records files of the watched folder: "
                f"{describe_watch_state(counts)}; replacing it would lose the results of {counts['with_results']} "
                "file(s) for good; allowed: --append (keeps them and adds the new files'); add --append, or to start "
                f"over move the results file and the watch state ({where}) away"
            )
    if overwrite is False:
        raise ConfigError(
            f"--out already holds results (an existing file of {st.st_size} bytes); allowed: a new file, --append to add "
            "this run's results to it, or --overwrite to replace it; add one of them or give --out another path"
        )


def _durable(sink: Sink) -> bool:
    """Whether a sink keeps the results on disk: its own ``sync`` (flush and fsync, as JsonlSink). The audit log's
    digests, the clip summary, a video or a window hold no frame's result a later run could use."""
    return type(sink).sync is not Sink.sync


def check_consumed_results(source_uri: str, out: Optional[str], extra_sinks: Optional[List[Sink]] = None) -> None:
    """ConfigError unless the results of a source that consumes its input (a watched folder marks each file done
    for good once classified) are kept somewhere durable: --out, or a sink of the caller's with its own sync."""
    if not source_uri.strip().lower().startswith("watch:") or out or any(_durable(s) for s in extra_sinks or []):
        return
    raise ConfigError(
        "--source watch: marks each file done for good once it is classified, but without --out no result is kept "
        "(a later run would skip those files); allowed: watch: with --out FILE; give --out results.jsonl (with --append "
        "for a service), or copy a few files to a folder of images and run on that to try it out"
    )


def device_threads(device: str) -> Tuple[Optional[int], str]:
    """The inference threads a device profile asks for, capped at the cores this process may use, and how they were
    chosen (for ``chosen_by``); (None, ...) when the profile names no count. `run` and `profile` both take it from
    here, so a profile times what a run would do. The cap is logged as a warning."""
    from edgeclf.devices import load_profile
    from edgeclf.runtime.backends import default_threads

    wanted = load_profile(device).threads
    how = f"device profile {device}"
    if not wanted:
        return None, how
    # The profile's count is the board's cores; a cpuset, taskset or CPUAffinity= may leave fewer to this
    # process, and more threads than cores ran 3x slower here.
    usable = default_threads()
    if wanted > usable:
        how += f" ({wanted}, capped at the {usable} cores this process may use)"
        log.warning("device profile %s asks for %d threads; this process may use %d cores: %d threads",
                    device, wanted, usable, usable)
    return min(wanted, usable), how


def run_bundle(
    bundle_path: str,
    source_uri: str,
    *,
    out: Optional[str] = None,
    max_frames: Optional[int] = None,
    backend: Optional[str] = None,
    threads: Optional[int] = None,
    min_confidence: Optional[float] = None,
    precision: Optional[str] = None,
    extra_sinks: Optional[List[Sink]] = None,
    options: Optional[RunOptions] = None,
    device: Optional[str] = None,
    realtime: bool = False,
    reconnect: bool = True,
    fsync_every: Optional[float] = 1.0,
    record: Optional[str] = None,
    show: bool = False,
    summary_path: Optional[str] = None,
    backend_options: Optional[BackendOptions] = None,
    notifier: Any = None,
    audit: Optional[str] = None,
    audit_digest_every: int = 1000,
    trusted_key: Optional[str] = None,
    append: bool = False,
    overwrite: Optional[bool] = None,
) -> Dict[str, Any]:
    """Verify and load the bundle, open the source, classify every frame; returns the run summary.

    Also a clip-level summary (per-class time share, majority label, abstain rate; a recorded clip's times on its
    own timeline, frame index / fps: see SummarySink.set_clock). `record` writes an annotated video (frames of
    another size than the first letterboxed, counted in ``record.resized``), `show` opens the overlay window (a clear error where
    there is no display).
    The summary's ``status`` says how the run ended: "ok" (the source read to its end) or "stopped" (``stopped_by``
    "signal", "max_frames" or "sink"); ``signal`` names the first stop signal that came ("SIGINT", "SIGTERM").
    SIGINT/SIGTERM end the run cleanly with the summary written. The `summary_path` file says the same (and
    "error" with its text for a run that failed midway, see SummarySink.end_run). An exception raised after the
    run started classifying carries what the run did until then as ``exc.run_summary`` (``status`` "error",
    ``error``: its one-line text without source paths). Under systemd (NOTIFY_SOCKET set) it sends
    READY=1 once bundle, backend and source are open, WATCHDOG=1 from the frame loop and STOPPING=1 at the end
    (`notifier`: an edgeclf.devices.systemd.Notifier; default: one from the environment).
    `audit`: a hash-chained audit log (a new file, or a folder for a new one): start (bundle checksum, device
    profile, config, package versions), digests of the results the results file holds, source and backend
    faults and recoveries, and an end record with the run's status. `trusted_key`: an Ed25519 public key
    (PEM) the bundle must be signed with (default: $EDGECLF_TRUSTED_KEY).
    `append`: add to an existing `out` instead of replacing it (a service restarting onto one file): a torn
    last line a power loss left is cut off first, counted and logged (``JsonlSink(append=True)``); every line
    of this run carries ``"run"``, a random id also in the summary (``run``, with ``append``: what was
    repaired) and the audit log, so the runs one file holds can be told apart.
    `overwrite`: False refuses (ConfigError, before anything is opened) to replace an `out` that holds anything,
    unless `append`; True replaces it; None (the library's default) replaces it, as True. The CLI passes False
    unless --overwrite. Whatever it says, an `out` holding results of a watched folder whose state marks files done
    is replaced only by starting over (see check_results_file).
    A watched folder (``watch:``) marks each file done for good: it needs `out` (or an `extra_sinks` sink with its
    own ``sync``), else ConfigError before anything is opened. No output may be a file the source reads or would read,
    lie inside a watched folder, or lie inside the bundle folder, nor may the watch state or the engine cache
    ($EDGECLF_ENGINE_CACHE included) (check_distinct_outputs, check_outside_bundle).
    """
    from edgeclf.devices.systemd import Notifier
    from edgeclf.runtime.sinks import SummarySink, VideoRecorderSink, check_output_path, check_video_path

    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"max frames is {max_frames}; give a positive number or leave it out for the whole source")
    # Output paths first: a typo must fail in a second, before a bundle loads or an engine builds, and
    # before any earlier output file is truncated.
    if append and not out:
        raise ConfigError("--append adds to the --out results file; give --out FILE or leave --append out")
    if overwrite and not out:
        raise ConfigError("--overwrite replaces the --out results file; give --out FILE or leave --overwrite out")
    if overwrite and append:
        raise ConfigError("--append adds to the --out results file, --overwrite replaces it; give one of them")
    if out:
        check_output_path(out, option="--out", example="results.jsonl")
        if append:
            check_append_tail(out)  # an edited or foreign file is refused now, not after the engine built
    if record:
        check_video_path(record)
        check_output_path(record, option="--record", example="run.mp4")
    if summary_path:
        check_output_path(summary_path, option="--summary", example="clip.json")
    outputs = {"--out": out, "--record": record, "--summary": summary_path, "--audit": audit}
    check_distinct_outputs(source_uri, outputs)
    # and what the run writes without an option: the watch state, the engine cache (a TensorRT backend may be chosen later)
    check_outside_bundle(bundle_path, {**outputs, **watch_state_output(source_uri),
                                       **engine_cache_output(backend_options.engine_cache if backend_options else None)})
    check_consumed_results(source_uri, out, extra_sinks)
    check_results_file(source_uri, out, append=append, overwrite=overwrite)
    opts = options or RunOptions(min_confidence=min_confidence)
    if min_confidence is not None and opts.min_confidence is None:
        opts = dataclasses.replace(opts, min_confidence=min_confidence)
    # Precedence: defaults < device profile < explicit arguments (the CLI's flags).
    chosen = {"backend": "argument" if backend else "default", "threads": "argument" if threads else "default"}
    explicit = bool(backend)
    backend, chosen["backend"], _ = resolve_backend(backend, device)
    if device is not None:
        from edgeclf.devices import load_profile

        load_profile(device)  # an unknown profile is refused whatever else was given
        told, how = device_threads(device) if threads is None else (None, "")
        if told is not None:
            threads, chosen["threads"] = told, how
    bopts = dataclasses.replace(backend_options or BackendOptions(), device=device or (backend_options.device if backend_options else None))
    notify = notifier if notifier is not None else Notifier()
    b = load_bundle(bundle_path, trusted_key=trusted_key)
    m = b.manifest
    sinks: List[Sink] = list(extra_sinks or [])
    aggregator = None
    if m.task != "multilabel":
        from edgeclf.runtime.clips import FileClipAggregator

        # One clip decision per file: a folder of cines is several clips, as the smoother sees it.
        aggregator = FileClipAggregator(rule=m.decision, min_confidence=opts.confidence_floor(m), labels=list(m.labels))
    clip = SummarySink(summary_path, labels=list(m.labels), aggregator=aggregator)
    run_id = uuid.uuid4().hex[:12] if append else None
    stop = threading.Event()
    # Source and backend first: a typo in --source must not truncate an earlier results file.
    (be, variant), backend, chosen["backend"] = with_profile_fallback(
        backend, chosen["backend"], device, explicit,
        lambda bk: open_backend(b, bk, precision=precision, threads=threads, options=bopts))
    alog = None
    restore: Callable[[], None] = lambda: None  # noqa: E731
    received: List[int] = []  # the signals that came during the run
    partial: Dict[str, Any] = {}  # the summary of a run that failed after it started classifying
    try:
        with be, _open(source_uri, realtime, reconnect) as opened:
            src: Any = _ProgressSource(opened, _watchdog_hook(notify, getattr(opened, "kind", ""))) if notify.active else opened
            if audit:
                config = {
                    "source": source_fact(source_uri), "backend": be.name, "model": variant, "threads": getattr(be, "threads", threads),
                    "precision": precision, "max_frames": max_frames, "realtime": realtime, "fsync_every": fsync_every,
                    "options": dataclasses.asdict(opts), "chosen_by": chosen}
                if run_id is not None:
                    config.update(append=True, run=run_id)
                alog = _start_audit(audit, b, device, fsync_every, audit_digest_every, source_uri, config)
                if hasattr(opened, "on_event"):  # a live source that reconnects: its disconnects and reopens go on record
                    opened.on_event = _audit_source_events(alog)
            # Restored only in the outer finally: after every sink closed and the audit log ended.
            restore = _install_stop_handlers(stop, received)
            # A recorded clip's time figures follow its own timeline; a live source's the clock.
            clip.set_clock(getattr(opened, "fps", None), bool(getattr(opened, "live", False)))
            # Never the URI: a file or folder name may carry a patient's name, and STATUS= lands in the journal.
            notify.ready(f"classifying a {getattr(opened, 'kind', 'source')} source with {b.path.name} on {be.name}")
            # OpenCV's own worker pool would put resize and colour conversion on every core, on top of the
            # feeder thread and ONNX Runtime's threads: one OpenCV thread, the pipeline parallelises by stage.
            cv2 = _cv.cv2()
            cv_threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
            drawn: List[Sink] = []
            recorder: Optional[VideoRecorderSink] = None
            summary: Optional[RunSummary] = None
            run_error: Optional[BaseException] = None
            jsonl: Optional[JsonlSink] = None
            try:
                # Window and recorder before the results file: a bad --show or --record must not truncate it.
                if show:
                    from edgeclf.runtime.overlay import OverlayWindow

                    drawn.append(OverlayWindow())
                if record:
                    size = src.size or (m.preprocess.size[0], m.preprocess.size[1])
                    recorder = VideoRecorderSink(record, float(src.fps or 15.0), size)
                    drawn.append(recorder)
                if out:
                    jsonl = JsonlSink(out, fsync_every=fsync_every, append=append, run_id=run_id)
                    sinks.append(jsonl)
                    if alog is not None and (jsonl.torn_cut or jsonl.newline_restored):
                        alog.event("results_file_repaired", torn_cut=jsonl.torn_cut, newline_restored=jsonl.newline_restored)
                if alog is not None:
                    # After the results file: digests cover only results it holds, spelt as it holds them.
                    sinks.append(AuditSink(alog) if run_id is None else _RunAuditSink(alog, run_id))
                sinks.extend(drawn)
                sinks.append(clip)
                on_fault = None if alog is None else _audit_pipeline_events(alog)
                summary = run_pipeline(b, src, be, sinks, max_frames=max_frames, options=opts, stop=stop, on_event=on_fault)
                if summary.stopped_by is None and max_frames is not None and summary.frames >= max_frames \
                        and _frames_left(opened, summary) is not False:
                    summary.stopped_by = "max_frames"  # the source holds (or may hold) more: the run did not read on
            except BaseException as exc:
                run_error = exc
                raise
            finally:
                notify.stopping()
                cv2.setNumThreads(cv_threads)
                started = clip in sinks  # it classified (or was about to): the summary says how the run ended
                close_error: Optional[BaseException] = None
                try:
                    _close_all([s for s in sinks if s is not clip] + [s for s in drawn if s not in sinks])
                except BaseException as exc:  # noqa: BLE001 - raised below (or said, when the run failed first)
                    close_error = exc
                failure = run_error if run_error is not None else close_error
                if started:
                    # Last: told how the run ended, whatever another output's close did.
                    stats = _source_stats(src)
                    error = None if failure is None else _error_text(failure, source_uri)
                    stopped_by = None if failure is not None or summary is None else summary.stopped_by
                    clip.end_run("error" if failure is not None else ("ok" if stopped_by is None else "stopped"),
                                 stopped_by=stopped_by, error=error, frame_count_claimed=src.frame_count,
                                 source_stats=stats, multi_file=_multi_file(src, stats),
                                 frames_left=None if summary is None else _frames_left(opened, summary))
                    try:
                        clip.close()
                    except BaseException as exc:  # noqa: BLE001 - raised below like the others
                        if close_error is not None:
                            log.error("closing SummarySink failed: %s", " ".join(str(exc).split()) or type(exc).__name__)
                        close_error = close_error or exc
                    failure = run_error if run_error is not None else close_error
                    if failure is not None:
                        partial = {
                            "status": "error", "error": error or _error_text(failure, source_uri), "stopped_by": None,
                            "frames": clip.written, "written": min((s.written for s in sinks), default=0),
                            "signal": _signal_name(received), "frame_count_claimed": src.frame_count,
                            "source_stats": stats, "bundle": str(b.path), "bundle_checksum": b.checksum, "task": m.task,
                            "source_kind": src.kind, "backend": be.name, "model": variant, "out": out, "clip": clip.result,
                            "threads": getattr(be, "threads", threads), "device": device, "chosen_by": chosen,
                            "record": _record_stats(recorder)}
                if close_error is not None:
                    if run_error is None:
                        raise close_error
                    # the run's own error is the one to report; this one is said, not lost
                    log.error("closing an output failed too: %s", " ".join(str(close_error).split()) or type(close_error).__name__)
            assert summary is not None  # run_pipeline returned
            result = summary.to_dict()
            result.update(
                status="ok" if summary.stopped_by is None else "stopped", signal=_signal_name(received),
                bundle=str(b.path), bundle_checksum=b.checksum, task=m.task, source_kind=src.kind, backend=be.name, model=variant,
                frame_count_claimed=src.frame_count, out=out, clip=clip.result, threads=getattr(be, "threads", threads),
                device=device, chosen_by=chosen, record=_record_stats(recorder),
            )
            if jsonl is not None and run_id is not None:
                result["run"] = run_id
                result["append"] = {"torn_cut": jsonl.torn_cut, "newline_restored": jsonl.newline_restored}
            if notify.active:
                result["systemd"] = {"notify_socket": notify.socket_path, "watchdog_s": notify.watchdog_s, "pings": notify.pings}
            engine = getattr(be, "record", None)
            if engine is not None:
                result["engine"] = {"path": str(engine.path), "built": engine.built, "key": engine.key.fields()}
        if alog is not None:
            alog.end("signal" if result.get("stopped_by") == "signal" else "ok",
                     summary={k: result.get(k) for k in ("frames", "written", "abstained", "abstain_reasons", "backend_errors", "invalid_outputs",
                                                         "frame_errors", "sector_warmup", "no_sector_still", "stopped_by", "source_stats", "read_not_classified")})
            result["audit"] = {"path": alog.path, "head": alog.head, "records": alog.records}
            alog.close()
    except BaseException as exc:
        if alog is not None:  # whatever failed (the run, a sink's close, the source's): the log gets its end
            _end_audit_on_error(alog, exc)
            if partial:
                partial["audit"] = {"path": alog.path, "head": alog.head, "records": alog.records}
                try:  # the failed run's summary file names the head too; the run's error is the one raised
                    clip.add_audit(partial["audit"])
                except EdgeclfError as summary_exc:
                    log.error("the clip summary could not take the audit head: %s", summary_exc)
        if partial:
            # The caller (the CLI's --json) still gets what the run did before it failed.
            exc.run_summary = partial  # type: ignore[attr-defined]
        raise
    finally:
        restore()
    if alog is not None:
        try:
            clip.add_audit(result["audit"])  # the head, for `audit verify --head`, in the --summary file too
        except EdgeclfError as exc:
            exc.run_summary = result  # type: ignore[attr-defined]  # the run is complete: --json still prints it
            raise
    return result


def _error_text(exc: BaseException, source_uri: str) -> str:
    """An error as one line for the outputs (the summary file, --json): the source's path and any URL replaced by
    <source>, as the audit log writes it (a file name may carry a patient's name)."""
    from edgeclf.runtime.audit import scrub_source

    return scrub_source(" ".join(str(exc).split())[:500] or type(exc).__name__, source_uri)


def _signal_name(received: List[int]) -> Optional[str]:
    """The first stop signal the run got ("SIGINT", "SIGTERM"), None without one."""
    if not received:
        return None
    try:
        return signal.Signals(received[0]).name
    except ValueError:
        return str(received[0])


def _source_stats(src: Any) -> Optional[Dict[str, Any]]:
    stats = getattr(src, "stats", None)
    if not callable(stats):
        return None
    try:
        got = stats()
    except Exception as exc:  # noqa: BLE001 - a source that cannot count after a failure: said, and the summary has none
        log.warning("the source's counts are not available: %s", " ".join(str(exc).split()) or type(exc).__name__)
        return None
    return dict(got) if isinstance(got, dict) else None


def _multi_file(src: Any, stats: Optional[Dict[str, Any]]) -> bool:
    """Whether the source is several files (a watched folder, a DICOM or image folder of more than one): no clip
    decision over all of them, whatever part of them the run read."""
    kind = getattr(src, "kind", "")
    files = (stats or {}).get("files")
    return kind == "watch" or (isinstance(files, int) and files > 1) or \
        (kind == "images" and isinstance(src.frame_count, int) and src.frame_count > 1)


# Sources whose frame_count is exact (a video's is what its container claims, which may be off either way).
_EXACT_COUNT_KINDS = ("synthetic", "dicom", "images")


def _frames_left(src: Any, summary: RunSummary) -> Optional[bool]:
    """Whether the source had frames after the last one the run classified: True when frames read ahead were not
    classified; False when a recorded source of an exact length was classified whole (--max-frames equal to its
    length, a signal after its last frame); None when not known (a live source, a video)."""
    if summary.extra.get("read_not_classified"):
        return True
    n = getattr(src, "frame_count", None)
    if getattr(src, "live", False) or getattr(src, "kind", "") not in _EXACT_COUNT_KINDS or \
            isinstance(n, bool) or not isinstance(n, int):
        return None
    return summary.frames < n


def _record_stats(recorder: Any) -> Optional[Dict[str, Any]]:
    """--record's counts: frames written, those of another size than the first frame's (`resized`), the video's size."""
    if recorder is None:
        return None
    return {"frames": recorder.written, "resized": recorder.resized, "size": list(recorder.size)}


class _RunAuditSink(AuditSink):
    """The audit digests of an appending run: each result as the results file holds it, with its ``run`` id."""

    def __init__(self, log: Any, run_id: str) -> None:
        super().__init__(log)
        self.run_id = run_id

    def write(self, record: Dict[str, Any], image: Any = None) -> None:
        super().write(tag_run(record, self.run_id), image)


def _start_audit(path: str, b: Bundle, device: Optional[str], fsync_every: Optional[float], digest_every: int,
                 source_uri: str, config: Dict[str, Any]) -> Any:
    from edgeclf.runtime.audit import AuditLog

    profile = None
    if device is not None:
        from edgeclf.devices import load_profile

        profile = load_profile(device).to_dict()
    # source: error texts quote the URI they failed on; the log replaces it by <source>.
    alog = AuditLog(path, fsync_every=fsync_every, digest_every=digest_every, source=source_uri)
    try:
        alog.start(bundle_checksum=b.checksum, bundle_signature=b.signature, device_profile=profile, config=config)
    except BaseException:
        alog.close()
        raise
    return alog


def _audit_source_events(alog: Any) -> Callable[[str, str, Dict[str, int]], None]:
    def on_event(kind: str, message: str, counts: Dict[str, int]) -> None:
        (alog.fault if kind == "fault" else alog.recovery)("source", message, counts=counts)

    return on_event


def _audit_pipeline_events(alog: Any) -> Callable[[str, str, Dict[str, Any]], None]:
    def on_event(kind: str, message: str, details: Dict[str, Any]) -> None:
        (alog.fault if kind == "fault" else alog.recovery)("backend", message, **details)

    return on_event


def _end_audit_on_error(alog: Any, exc: BaseException) -> None:
    """The run failed: put the error and an end record on the log, then close it; the run's error is what
    the caller sees, also when the log's own disk is what failed."""
    status = "signal" if isinstance(exc, KeyboardInterrupt) else "error"
    text = " ".join(str(exc).split())[:500] or type(exc).__name__
    try:
        if alog.ended or alog.failed is not None:  # the end is on record (or the log's disk failed): just close
            return
        alog.fault("run", text)
        alog.end(status, error=text)
    except EdgeclfError as log_exc:
        log.error("the audit log could not record the run's end: %s", log_exc)
    finally:
        alog.close()


def _close_all(sinks: List[Sink]) -> None:
    """Close every sink, also when one fails to (the clip summary must still be written); the first
    failure is raised after all were tried (its caller reports it), later ones are logged here."""
    first: Optional[BaseException] = None
    for s in sinks:
        try:
            s.close()
        except BaseException as exc:  # noqa: BLE001 - also KeyboardInterrupt: re-raised below, after the others closed
            if first is not None:
                log.error("closing %s failed: %s", type(s).__name__, " ".join(str(exc).split()) or type(exc).__name__)
            first = first or exc
    if first is not None:
        raise first


def _decisions(m: Any, logits: np.ndarray) -> np.ndarray:
    """(N, K) logits -> per-sample decisions (N,) or (N, K) for multilabel, with the bundle's temperature and rule."""
    return np.asarray(decide(probabilities(np.asarray(logits, np.float64), m.task, m.temperature), m.decision))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0:
        return 1.0
    same = a == b
    return float(np.mean(np.all(same, axis=tuple(range(1, same.ndim))) if same.ndim > 1 else same))


def _read_reference(b: Bundle, ref: Path) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """The reference file's inputs and recorded outputs ("logits", "logits__<variant>"), shapes checked against
    the manifest; BundleError (one line) when it is not such an npz."""
    m = b.manifest
    data = b.read_file(ref)  # the verified bytes, not the path again
    x: Any = None
    recorded: Dict[str, np.ndarray] = {}
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(z, np.lib.npyio.NpzFile):  # else one .npy array: not a reference file either
            with z:
                x = z["inputs"] if "inputs" in z.files else None
                recorded = {k: z[k] for k in z.files if k.startswith("logits")}
    except Exception:  # noqa: BLE001 - any failure to parse these bytes (not a zip, a bad member, pickled objects) means the same
        x = None
    n_in = (m.preprocess.channels, *m.preprocess.size)
    ok = (isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.ndim == 4 and tuple(x.shape[1:]) == n_in
          and all(v.dtype.kind == "f" and v.shape == (len(x), m.num_outputs) for v in recorded.values()))
    if not ok:
        raise BundleError(f"bundle {b.path.name}: reference file {ref.name!r} is not an npz with inputs {list(n_in)} and "
                          f"logits [n, {m.num_outputs}]; re-export the bundle")
    return x, recorded


def verify_bundle(bundle_path: str, *, parity: bool = True, backend: str = "ort-cpu", precision: Optional[str] = None,
                  options: Optional[BackendOptions] = None, trusted_key: Optional[str] = None,
                  require_signature: Optional[bool] = None) -> Dict[str, Any]:
    """Checksums and schema (load_bundle), then, if present, re-run reference.npz on `backend` through the fp32
    model and every variant this backend runs (trt: the engine for the device profile), each against the outputs
    it gave at export: max and mean absolute error, decision agreement; plus the same against the recorded fp32
    outputs. Fails (IntegrityError) when a model's error exceeds its tolerance."""
    b = load_bundle(bundle_path, trusted_key=trusted_key, require_signature=require_signature)
    result: Dict[str, Any] = {"path": str(b.path), "checksum": b.checksum, "checksums": "ok", "manifest": "ok", "reference": None}
    ref = b.reference_path
    if parity and ref is not None:
        m = b.manifest
        x, recorded = _read_reference(b, ref)
        if "logits" not in recorded:
            raise IntegrityError(f"bundle {Path(bundle_path)}: {ref.name} has no fp32 outputs; re-export the bundle")
        fp32_want = recorded["logits"].astype(np.float64)
        fp32_dec = _decisions(m, fp32_want)
        if backend == "trt":
            targets: List[Tuple[str, Optional[str]]] = [("engine", precision)]
        else:
            # TensorRT rejects the CPU INT8 form (unsigned activations): check what this backend may run.
            runnable = [v for v in m.variants if not (backend == "ort-tensorrt" and v.id == "int8-cpu")]
            if precision is not None:
                runnable = [v for v in runnable if v.precision == precision]
            fp32_target: List[Tuple[str, Optional[str]]] = [("fp32", "fp32")] if precision in (None, "fp32") else []
            targets = fp32_target + [(v.id, v.precision) for v in runnable]
        if not targets:
            have = ", ".join(["fp32"] + [v.id for v in m.variants])
            raise BundleError(f"bundle {b.path.name} holds {have}: nothing at precision {precision} for {backend}; choose another --precision")
        checks: List[Dict[str, Any]] = []
        for vid, prec in targets:
            be: Backend
            if backend == "trt":
                be, model_id = open_backend(b, "trt", precision=prec, options=options)
                # An engine is checked against what its source model gave at export (fp16 engines: the fp32 model).
                key = "logits__int8-tensorrt" if "int8" in model_id else "logits"
            else:
                path = b.model_path if vid == "fp32" else b.path / next(v.file for v in m.variants if v.id == vid)
                be = create_backend(str(path), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs, backend=backend,
                                    options=dataclasses.replace(options or BackendOptions(), precision=prec), bundle=b)
                model_id, key = vid, ("logits" if vid == "fp32" else f"logits__{vid}")
            with be:
                got = be.infer(x).astype(np.float64)
            if key not in recorded:
                raise IntegrityError(f"bundle {Path(bundle_path)}: reference.npz has no outputs for model {model_id}; re-export the bundle")
            want = recorded[key].astype(np.float64)
            err = np.abs(got - want) if len(x) else np.zeros(1)
            err32 = np.abs(got - fp32_want) if len(x) else np.zeros(1)
            diff = float(err.max())
            # Quantized kernels legitimately differ between CPUs (e.g. with or without VNNI); fp16 engines round.
            exact = model_id == "fp32"
            tol = PARITY_TOLERANCE if exact else VARIANT_TOLERANCE * max(1.0, float(np.abs(want).max()) if len(x) else 1.0)
            dec = _decisions(m, got)
            checks.append({"model": model_id, "n": int(len(x)), "max_abs_diff": diff, "mean_abs_diff": float(err.mean()),
                           "tolerance": tol, "decision_agreement": _agreement(dec, _decisions(m, want)),
                           "vs_fp32": {"max_abs_diff": float(err32.max()), "mean_abs_diff": float(err32.mean()),
                                       "decision_agreement": _agreement(dec, fp32_dec)}})
            if diff > tol:
                raise IntegrityError(
                    f"bundle {Path(bundle_path)}: model {model_id} on {backend} differs from its exported reference outputs by "
                    f"{diff:.2e} (> {tol:.1e}); this backend cannot be trusted with this model"
                )
        result["reference"] = {**checks[0], "backend": backend, "variants": checks[1:]} if checks else None
    return result


def profile_backend_factory(options: Optional[BackendOptions] = None) -> Callable[..., Backend]:
    """A `profile_bundles` backend factory that passes GPU options (device, DLA, engine cache) to every target;
    ort-tensorrt gets the TensorRT EP options for the model's precision, trt builds or reuses its engine."""
    base = options or BackendOptions()

    def factory(bundle: Bundle, model_path: str, target: Any, threads: Optional[int]) -> Backend:
        m = bundle.manifest
        variant = next((v for v in m.variants if v.file == Path(model_path).name), None)
        precision = None if target.backend == "trt" else (variant.precision if variant is not None else "fp32")
        return create_backend(model_path, (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs,
                              backend=target.backend, threads=threads, options=dataclasses.replace(base, precision=precision),
                              bundle=bundle)

    return factory
