"""Latency profiling on the device: per-stage timing through the real pipeline, side by side.

`profile_bundles(targets, options)` runs each target (a bundle on a backend at a precision) through
`run_pipeline` with a JSONL sink to a temporary file, and times inference alone (`backend.infer` on one
preprocessed frame). Targets are interleaved in chunks (A B A B ...), so drift of the machine (clocks,
heat, other load) falls on every target alike; each target's stateful stages (sector lock, quality gate,
smoothing) carry over from one of its chunks to the next, as in one continuous run, and OpenCV runs one
thread, as `edgeclf run` sets it. The first `warmup` frames of each target are reported apart from the
steady state; cold start (bundle load, session creation, time to the first result, and process start to
the first result) on its own: each target's on its own first frame (with warmup 0, one frame run for it
alone and left out of every other figure). Each record's per-stage times are kept in full (the
pipeline's own StageTimes keeps only a window for its percentiles).

While it runs, a background thread samples process CPU % and RSS (psutil, else /proc), GPU utilisation,
memory and power through NVML (pynvml, optional) and, on a Jetson, tegrastats (power rails, temperatures).
Process and NVML samples are also taken at every change of target or phase, so each covers one state's interval
and is credited to it (means weighted by interval). Each tegrastats reading is credited to the target and phase in force when it arrived (every change is recorded
with its monotonic time); energy per inference uses only the readings inside a target's own steady pipeline
chunks, so it resolves nothing shorter than the tegrastats interval (the reading count is reported).

The result is one JSON document (`runtime/profile_schema.json`, schema_version 1); `compare_profiles`
checks two of them for regressions and `write_report` writes report.md and PNG plots (matplotlib).

Python 3.8 compatible; numpy at import; psutil, pynvml and matplotlib inside the functions that use them.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edgeclf.errors import ConfigError, MissingExtraError, SourceError
from edgeclf.runtime import _cv
from edgeclf.runtime.backends import Backend, create_backend
from edgeclf.runtime.bundle import Bundle, load_bundle
from edgeclf.runtime.pipeline import STAGES, PipelineState, RunOptions, run_pipeline
from edgeclf.runtime.preprocess import Preprocessor
from edgeclf.runtime.sinks import JsonlSink, Sink
from edgeclf.runtime.sources import FrameSource, open_source

__all__ = [
    "SCHEMA_VERSION",
    "FRAME_STAGE",
    "PROFILE_STAGES",
    "ProfileTarget",
    "ProfileOptions",
    "ProfileResult",
    "BackendFactory",
    "profile_bundles",
    "latency_stats",
    "bootstrap_ci",
    "ratio_ci",
    "rss_slope_mb_per_10k",
    "compare_profiles",
    "load_profile_json",
    "profile_schema",
    "build_figures",
    "render_markdown",
    "write_report",
]

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
#: Pipeline stages; frame: the pipeline's time per frame as its consumer sees it, the interval between consecutive
#: results (at batch N: the interval spanning the last N results, over N; a chunk's first results: since the chunk
#: began, the pipeline's start included), so its mean is about 1000 / fps. It is not the stages' sum: pipelined (the
#: default), capture and preprocess run in the feeder thread while the previous frame is inferred, and overlap.
#: latency: from the frame's capture timestamp (as its source sets it) to the result; infer_only: `backend.infer`
#: alone on one preprocessed frame (at batch N: one call on N copies of it, divided by N, one value per call). Each
#: stage's statistics are over the frames that went through it: infer over the inferred frames only (frames the
#: quality gate turned away are counted in the target's "frames_not_inferred"), every other pipeline stage, frame
#: and latency over all frames.
PROFILE_STAGES: Tuple[str, ...] = STAGES + ("frame", "latency", "infer_only")
#: What "frame" is, recorded in the config: profiles without it (older) hold the stages' sum there, not comparable.
FRAME_STAGE = "result_interval"
_QUANTILES = (50.0, 90.0, 99.0)
_QNAMES = ("median", "p90", "p99")

BackendFactory = Callable[[Bundle, str, "ProfileTarget", Optional[int]], Backend]


@dataclass(frozen=True)
class ProfileTarget:
    """One thing to profile: a bundle folder on a backend at a precision (None: the bundle's deploy choice)."""

    bundle: str
    backend: str = "ort-cpu"
    precision: Optional[str] = None
    label: Optional[str] = None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        # The absolute path's folder: `--bundle .` or `bundle/` is named as the folder it is, not ''.
        return f"{Path(os.path.abspath(self.bundle)).name}:{self.backend}:{self.precision or 'deploy'}"


@dataclass(frozen=True)
class ProfileOptions:
    """frames: steady-state frames per target (after `warmup`); chunk: frames per turn when interleaving;
    source: a source URI (None: ``synthetic:ultrasound?frames=warmup+frames``, reopened at its end);
    bootstrap: resamples for the 95% intervals (0: none); sample_interval_s: system sampling period."""

    source: Optional[str] = None
    frames: int = 500
    warmup: int = 50
    chunk: int = 50
    threads: Optional[int] = None
    bootstrap: int = 1000
    seed: int = 0
    sample_interval_s: float = 0.1
    infer_only: bool = True
    throttle_temp_c: float = 85.0
    run_options: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ConfigError(f"frames is {self.frames}; allowed: 1 or more steady-state frames per target")
        if self.warmup < 0:
            raise ConfigError(f"warmup is {self.warmup}; allowed: 0 or more frames")
        if self.chunk < 1:
            raise ConfigError(f"chunk is {self.chunk}; allowed: 1 or more frames per interleaved turn")
        if self.bootstrap != 0 and self.bootstrap < 100:
            raise ConfigError(f"bootstrap is {self.bootstrap}; allowed: 0 (no intervals) or at least 100 resamples")
        if not self.sample_interval_s > 0:
            raise ConfigError(f"sample interval is {self.sample_interval_s}; allowed: a positive number of seconds")


@dataclass
class ProfileResult:
    """doc: the JSON document; series: per target, per stage, every value in ms (warm-up first);
    warmup: per target, per stage, how many leading values of that series are warm-up (at batch N infer_only
    holds one value per call, so its count differs from the pipeline stages')."""

    doc: Dict[str, Any]
    series: Dict[str, Dict[str, List[float]]]
    warmup: Dict[str, Dict[str, int]]


# ---------------------------------------------------------------------------------------------- statistics

def bootstrap_ci(values: Sequence[float], quantiles: Sequence[float] = _QUANTILES, *, n_boot: int = 1000,
                 seed: int = 0) -> List[Tuple[float, float]]:
    """95% percentile-bootstrap intervals of the given percentiles (0-100) of `values`."""
    a = np.asarray(values, np.float64)
    if a.size == 0 or n_boot <= 0:
        return [(float("nan"), float("nan")) for _ in quantiles]
    rng = np.random.default_rng(seed)
    batch = max(1, min(n_boot, 2_000_000 // max(a.size, 1)))
    est: List[np.ndarray] = []
    done = 0
    while done < n_boot:
        b = min(batch, n_boot - done)
        idx = rng.integers(0, a.size, size=(b, a.size))
        est.append(np.percentile(a[idx], list(quantiles), axis=1))  # (Q, b)
        done += b
    q = np.concatenate(est, axis=1)
    lo, hi = np.percentile(q, [2.5, 97.5], axis=1)
    return [(float(x), float(y)) for x, y in zip(lo, hi)]


def ratio_ci(base: Sequence[float], other: Sequence[float], *, n_boot: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """median(other) / median(base) with a 95% bootstrap interval (each resampled on its own)."""
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    if a.size == 0 or b.size == 0:
        return {"median_ratio": None, "ci95": None}
    ma = float(np.median(a))
    ratio = float(np.median(b)) / ma if ma > 0 else None
    if n_boot <= 0 or ratio is None:
        return {"median_ratio": ratio, "ci95": None}
    rng = np.random.default_rng(seed)
    ra, rb = _boot_medians(a, n_boot, rng), _boot_medians(b, n_boot, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = rb / ra
    r = r[np.isfinite(r)]
    if not r.size:
        return {"median_ratio": ratio, "ci95": None}
    lo, hi = np.percentile(r, [2.5, 97.5])
    return {"median_ratio": ratio, "ci95": [float(lo), float(hi)]}


def _boot_medians(a: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of n_boot resamples of `a`, in batches of bounded memory."""
    batch = max(1, min(n_boot, 2_000_000 // max(a.size, 1)))
    parts = []
    done = 0
    while done < n_boot:
        k = min(batch, n_boot - done)
        parts.append(np.median(a[rng.integers(0, a.size, size=(k, a.size))], axis=1))
        done += k
    return np.concatenate(parts)


def latency_stats(values_ms: Sequence[float], *, n_boot: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """n, mean, std, min, median, p90, p99 (each percentile with a 95% bootstrap interval), max and
    throughput (1000 / mean: items per second were this stage alone) of a list of milliseconds."""
    a = np.asarray(values_ms, np.float64)
    if a.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "median": None, "p90": None, "p99": None, "max": None,
                "throughput_per_s": None, "ci95": None}
    qs = np.percentile(a, list(_QUANTILES))
    mean = float(a.mean())
    out: Dict[str, Any] = {
        "n": int(a.size), "mean": mean, "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "min": float(a.min()),
        "median": float(qs[0]), "p90": float(qs[1]), "p99": float(qs[2]), "max": float(a.max()),
        "throughput_per_s": 1000.0 / mean if mean > 0 else None, "ci95": None,
    }
    if n_boot > 0:
        cis = bootstrap_ci(values_ms, _QUANTILES, n_boot=n_boot, seed=seed)
        out["ci95"] = {k: [lo, hi] for k, (lo, hi) in zip(_QNAMES, cis)}
    return out


def _warmup_stats(values_ms: Sequence[float]) -> Dict[str, Any]:
    a = np.asarray(values_ms, np.float64)
    if a.size == 0:
        return {"n": 0, "first": None, "median": None, "mean": None, "max": None}
    return {"n": int(a.size), "first": float(a[0]), "median": float(np.median(a)), "mean": float(a.mean()), "max": float(a.max())}


def rss_slope_mb_per_10k(frames: Sequence[float], rss_mb: Sequence[float], *, method: str = "theil-sen") -> Optional[float]:
    """Slope of RSS (MB) against frames processed, in MB per 10,000 frames (None: fewer than two
    distinct frame counts).

    method "theil-sen" (default): the median of the slopes between every pair of samples. The
    allocator moves RSS in steps of tens of MB while the heap is trimmed and regrown (seen here: 131,
    90, 137 MB within 500 frames of a flat run); a least-squares line ("ls") takes such a step near
    either end for a trend, the median of pairwise slopes does not, while a real leak moves every pair.
    """
    x, y = np.asarray(frames, np.float64), np.asarray(rss_mb, np.float64)
    if x.size != y.size:
        raise ValueError(f"{x.size} frame counts but {y.size} RSS values")
    if method not in ("theil-sen", "ls"):
        raise ValueError(f"method {method!r}; allowed: theil-sen, ls")
    if x.size < 2 or float(np.ptp(x)) == 0.0:
        return None
    if method == "ls":
        xm = x - x.mean()
        return float((xm * (y - y.mean())).sum() / (xm * xm).sum()) * 10_000.0
    if x.size > 1500:  # O(n^2) pairs: keep it to about a million
        keep = np.linspace(0, x.size - 1, 1500).round().astype(int)
        x, y = x[keep], y[keep]
    i, j = np.triu_indices(x.size, k=1)
    dx = x[j] - x[i]
    ok = dx != 0
    return float(np.median((y[j] - y[i])[ok] / dx[ok])) * 10_000.0


# ------------------------------------------------------------------------------------------ system sampling

def _process_start_time() -> Tuple[Optional[float], Optional[str]]:
    """Wall-clock time this process started, and where it came from (psutil, or None)."""
    try:
        import psutil  # noqa: PLC0415

        return float(psutil.Process().create_time()), "psutil"
    except ImportError:
        return None, None


class _ProcessProbe:
    """Process CPU % (of one core) and RSS in MB: psutil where installed, else stdlib and /proc."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        try:
            import psutil  # noqa: PLC0415

            self._ps: Any = psutil.Process()
            self._ps.cpu_percent(None)
            self.method = "psutil"
        except ImportError:
            self._ps = None
            self.method = "stdlib"
        self._last = (time.monotonic(), time.process_time())

    def cpu_percent(self) -> Optional[float]:
        if self._ps is not None:
            return float(self._ps.cpu_percent(None))
        now = (time.monotonic(), time.process_time())
        dt = now[0] - self._last[0]
        pct = 100.0 * (now[1] - self._last[1]) / dt if dt > 0 else None
        self._last = now
        return pct

    def rss_mb(self) -> Optional[float]:
        if self._ps is not None:
            return float(self._ps.memory_info().rss) / 1e6
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
        except (OSError, ValueError, IndexError, AttributeError):
            self.reason = "RSS needs psutil or /proc (pip install psutil)"
            return None


class _Nvml:
    """GPU 0 utilisation %, memory used (MB) and power (mW) through NVML, where pynvml is installed."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.name: Optional[str] = None
        self.reason: Optional[str] = None
        try:
            import pynvml  # noqa: PLC0415
        except ImportError:
            self.reason = "pynvml is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            raw = pynvml.nvmlDeviceGetName(self.handle)
            self.name = raw.decode() if isinstance(raw, bytes) else str(raw)
            self._nv: Any = pynvml
        except Exception as exc:  # pynvml raises NVMLError subclasses: no driver, no GPU
            self.handle, self.reason = None, f"NVML is not usable here: {exc}"

    @property
    def available(self) -> bool:
        return self.handle is not None

    def sample(self) -> Dict[str, Optional[float]]:
        out: Dict[str, Optional[float]] = {"gpu_util": None, "gpu_mem_mb": None, "gpu_power_mw": None}
        if self.handle is None:
            return out
        nv = self._nv
        try:
            out["gpu_util"] = float(nv.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            out["gpu_mem_mb"] = float(nv.nvmlDeviceGetMemoryInfo(self.handle).used) / 1e6
        except Exception:  # a transient NVML error loses one sample, not the run
            pass
        with contextlib.suppress(Exception):  # not every board reports power
            out["gpu_power_mw"] = float(nv.nvmlDeviceGetPowerUsage(self.handle))
        return out

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(Exception):  # shutting down a failed library is not the run's problem
                self._nv.nvmlShutdown()
            self.handle = None


class _Sampler:
    """Background thread: every `interval` s, one sample of process, GPU and the current target/phase.

    A sample's CPU % covers the interval since the previous sample ("dt" s). profile_bundles takes a sample under
    `lock` just before every change of target or phase, so each interval lies within one state, the one the
    sample names; means are weighted by dt (the samples at changes close intervals of any length)."""

    def __init__(self, interval: float, state: Callable[[], Tuple[int, Optional[int], str]]) -> None:
        self.interval = interval
        self._state = state
        self.proc = _ProcessProbe()
        self.nvml = _Nvml()
        self.samples: List[Dict[str, Any]] = []
        self._stop = threading.Event()
        self.lock = threading.RLock()  # held across a sample and a change of state (see profile_bundles)
        self._last_t = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="profile-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample_now(self) -> None:
        with self.lock:
            frames, target, phase = self._state()
            now = time.monotonic()
            s: Dict[str, Any] = {"t": now, "dt": now - self._last_t, "frames": frames, "target": target, "phase": phase,
                                 "cpu_percent": self.proc.cpu_percent(), "rss_mb": self.proc.rss_mb()}
            self._last_t = now
            s.update(self.nvml.sample())
            self.samples.append(s)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample_now()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.nvml.close()


# ------------------------------------------------------------------------------------------------ the run

class _TimedSink(Sink):
    """Wraps the real sink: times its write (the "sink" stage), the interval since the previous result (the "frame"
    stage, see PROFILE_STAGES) and keeps every record's stage times."""

    def __init__(self, inner: Sink, on_record: Callable[[Dict[str, float]], None]) -> None:
        self.inner = inner
        self._on_record = on_record
        self._start = time.perf_counter()
        self._ends: "collections.deque[float]" = collections.deque(maxlen=1)  # noqa: UP037 (3.8: no generic at runtime)

    def begin(self, t0: float, batch: int) -> None:
        """A run_pipeline call (a chunk) starts at t0: results before it (another target's turn between) do not count.
        At batch N a result comes N at a time, so one frame's time is the span of the last N results over N."""
        self._start = t0
        self._ends = collections.deque(maxlen=max(1, batch))

    def write(self, record: Dict[str, Any], image: Optional[Any] = None) -> None:
        t0 = time.perf_counter()
        self.inner.write(record)
        t1 = time.perf_counter()
        sink_ms = (t1 - t0) * 1e3
        ends = self._ends
        if len(ends) == ends.maxlen:
            frame_ms = (t1 - ends[0]) * 1e3 / len(ends)
        else:  # the chunk's first results: no N results before them in this chunk
            frame_ms = (t1 - self._start) * 1e3 / (len(ends) + 1)
        ends.append(t1)
        lat = record["latency_ms"]
        self.written += 1
        stages = {"capture": float(lat["capture"]), "preprocess": float(lat["preprocess"]),
                  "postprocess": float(lat["postprocess"]), "sink": sink_ms}
        if lat.get("infer") is not None:  # None: the frame was not inferred (gated); infer holds inferred frames only
            stages["infer"] = float(lat["infer"])
        stages["frame"] = frame_ms
        stages["latency"] = float(lat["total"])
        self._on_record(stages)

    def close(self) -> None:
        self.inner.close()


def _default_factory(bundle: Bundle, model_path: str, target: ProfileTarget, threads: Optional[int]) -> Backend:
    m = bundle.manifest
    return create_backend(model_path, (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs,
                          backend=target.backend, threads=threads, bundle=bundle)


class _Series:
    """Per-frame milliseconds in a float64 buffer sized for the whole run up front: a Python list of
    floats costs about 32 bytes a value and grows the process by several MB per 10,000 frames, which
    the profile's own RSS slope would then report. Grows by doubling if the run is longer than sized."""

    def __init__(self, capacity: int) -> None:
        self._buf = np.empty(max(16, capacity), np.float64)
        self._n = 0

    def append(self, v: float) -> None:
        if self._n == len(self._buf):
            self._buf = np.concatenate([self._buf, np.empty_like(self._buf)])
        self._buf[self._n] = v
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[float]:
        return iter(self._buf[: self._n].tolist())

    def __getitem__(self, sl: slice) -> List[float]:
        return self._buf[: self._n][sl].tolist()  # type: ignore[no-any-return]

    def clear(self) -> None:
        self._n = 0


class _TargetRun:
    def __init__(self, target: ProfileTarget, index: int, uri: str, opts: ProfileOptions, tmp: str) -> None:
        self.target, self.index, self.uri, self.opts = target, index, uri, opts
        per_target = opts.warmup + opts.frames + 16
        self.series: Dict[str, _Series] = {s: _Series(per_target) for s in PROFILE_STAGES}
        self.phase = "setup"
        self.warm_n: Dict[str, int] = {}
        self.first_result_wall: Optional[float] = None
        self.first_result_perf: Optional[float] = None
        self.steady_wall_s = 0.0
        self.steady_frames = 0
        self.steady_not_inferred = 0  # steady frames the pipeline did not infer (quality gate, frame error)
        self.infer_only_wall_s = 0.0
        self.source: Optional[FrameSource] = None
        self.reopened = 0
        self.summary_check: Dict[str, Any] = {}
        self.jsonl = os.path.join(tmp, f"target{index}.jsonl")
        self.sink = _TimedSink(JsonlSink(self.jsonl, fsync_every=1.0), self._record)
        self.backend: Optional[Backend] = None
        self.x: Optional[np.ndarray] = None
        self.batch: Optional[int] = None  # frames per inference call the pipeline used (1 for live sources)
        # The sector lock, quality gate and smoothing carry over from chunk to chunk: a fresh start at every chunk
        # would abstain the sector's warm-up frames again each time (not inferred), a cost `edgeclf run` pays once.
        self.state = PipelineState()

    def _record(self, stages: Dict[str, float]) -> None:
        if self.first_result_wall is None:
            self.first_result_wall, self.first_result_perf = time.time(), time.perf_counter()
        if self.phase == "steady" and "infer" not in stages:
            self.steady_not_inferred += 1
        for k, v in stages.items():
            self.series[k].append(v)

    def clear_series(self) -> None:
        for v in self.series.values():
            v.clear()

    def setup(self, factory: BackendFactory) -> None:
        t0 = time.perf_counter()
        self.setup_perf = t0
        self.bundle = load_bundle(self.target.bundle)
        t1 = time.perf_counter()
        model_path, self.variant = self.bundle.select(self.target.precision, self.target.backend)
        self.backend = factory(self.bundle, str(model_path), self.target, self.opts.threads)
        t2 = time.perf_counter()
        self.bundle_load_ms = (t1 - t0) * 1e3
        self.backend_create_ms = (t2 - t1) * 1e3
        sm = getattr(self.backend, "session_ms", None)
        self.session_ms = float(sm) if isinstance(sm, (int, float)) else None
        self.pre = Preprocessor(self.bundle.manifest.preprocess)

    def _open(self) -> FrameSource:
        if self.source is None:
            self.source = open_source(self.uri)
        return self.source

    def run_frames(self, n: int) -> None:
        """Exactly n frames through the pipeline, reopening the source at its end."""
        assert self.backend is not None
        left = n
        empty_in_a_row = 0
        while left > 0:
            src = self._open()
            t0 = time.perf_counter()
            self.sink.begin(t0, self.batch or self.opts.run_options.batch)
            s = run_pipeline(self.bundle, src, self.backend, [self.sink], max_frames=left, options=self.opts.run_options,
                             state=self.state)
            if self.phase == "steady":
                self.steady_wall_s += time.perf_counter() - t0
                self.steady_frames += s.frames
            left -= s.frames
            self.batch = int(s.extra.get("batch", 1))
            self.summary_check = {"pipeline_sink_mean_ms": s.timings_ms["sink"].stats()["mean"]}
            if left > 0:  # the source ended: rewind by reopening it
                src.close()
                self.source = None
                self.reopened += 1
                empty_in_a_row = empty_in_a_row + 1 if s.frames == 0 else 0
                if empty_in_a_row >= 2:
                    raise SourceError(f"the source ({_source_text(self.uri)}) gives no frames; give a source with at least one frame")

    def _input(self) -> np.ndarray:
        if self.x is None:
            with open_source(self.uri) as src:
                frame = src.read()
            if frame is None:
                raise SourceError(f"the source ({_source_text(self.uri)}) gives no frames; give a source with at least one frame")
            x = self.pre(frame.image)
            # The batch the pipeline ran at, so infer_only is comparable with its infer stage.
            b = self.batch or 1
            self.x = np.ascontiguousarray(np.repeat(x, b, axis=0)) if b > 1 else x
        return self.x

    def infer_only(self, n: int) -> None:
        """n frames' worth of `backend.infer` on a prepared input: n calls at batch 1, ceil(n / batch) calls
        at batch N, each recorded as its time per frame."""
        assert self.backend is not None
        x = self._input()
        b = x.shape[0]
        out = self.series["infer_only"]
        t_start = time.perf_counter()
        for _ in range(-(-n // b)):
            t0 = time.perf_counter()
            self.backend.infer(x)
            out.append((time.perf_counter() - t0) * 1e3 / b)
        if self.phase == "steady":
            self.infer_only_wall_s += time.perf_counter() - t_start

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
        self.sink.close()
        if self.backend is not None:
            self.backend.close()


@contextlib.contextmanager
def _one_opencv_thread() -> Iterator[Optional[int]]:
    """OpenCV at one thread, as `edgeclf run` sets it around its pipeline (its default pool on every core, beside the
    feeder thread and the backend's threads, is a configuration run never uses); restored after. Yields the count
    set (None: OpenCV is not installed, nothing set)."""
    try:
        cv2 = _cv.cv2()
    except MissingExtraError:
        yield None
        return
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield 1
    finally:
        cv2.setNumThreads(before)


def _default_source(opts: ProfileOptions) -> str:
    return f"synthetic:ultrasound?frames={opts.warmup + opts.frames}"


def _version() -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("edgeclf")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
        return "unknown"


def _told_apart(targets: Sequence[ProfileTarget]) -> List[ProfileTarget]:
    """Unlabelled targets are named by their bundle's folder; bundles in different folders of one name (runs/a/bundle,
    runs/b/bundle) get as many parent folders in their names as tell them apart. One folder given twice keeps one name
    (a repeat)."""
    out = list(targets)
    groups: Dict[str, List[int]] = {}
    for i, t in enumerate(out):
        if t.label is None:
            groups.setdefault(t.name, []).append(i)
    for idx in groups.values():
        parts = {i: Path(os.path.abspath(out[i].bundle)).parts for i in idx}
        if len(idx) < 2 or len(set(parts.values())) < 2:
            continue
        k = 2
        while len({p[-k:] for p in set(parts.values())}) < len(set(parts.values())):
            k += 1
        for i in idx:
            t = out[i]
            out[i] = replace(t, label=f"{'/'.join(parts[i][-k:])}:{t.backend}:{t.precision or 'deploy'}")
    return out


def profile_bundles(
    targets: Sequence[ProfileTarget],
    options: Optional[ProfileOptions] = None,
    *,
    backend_factory: Optional[BackendFactory] = None,
    started_at: Optional[float] = None,
    on_round: Optional[Callable[[int], None]] = None,
) -> ProfileResult:
    """Profile every target, interleaved in chunks; returns the JSON document and the per-frame series.

    started_at: wall-clock time of the CLI's entry (for cold start: entry to first result).
    backend_factory: builds the backend (tests pass FakeBackends); default: `create_backend`.
    on_round: called with the round number after every interleaved round of steady chunks (a reference
        timing can run its own chunk there, interleaved with the profile's).
    """
    if not targets:
        raise ConfigError("no bundle to profile; give at least one --bundle")
    opts = options or ProfileOptions()
    targets = _told_apart(targets)
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ConfigError(f"targets repeat: {names}; give each bundle/backend/precision combination once")
    uri = opts.source or _default_source(opts)
    factory = backend_factory or _default_factory
    runs: List[_TargetRun] = []
    state: Dict[str, Any] = {"frames": 0, "target": None, "phase": "setup"}
    # Every change of target or phase with its monotonic time: a tegrastats reading is credited to the state in
    # force when it arrived (see _target_power). Process samples close their interval at each change (set_state).
    timeline: List[Tuple[float, Optional[int], str]] = []

    def set_state(target: Optional[int], phase: str) -> None:
        # A sample closes the interval of the state ending here, so its CPU % is credited to that state alone.
        with sampler.lock:
            sampler.sample_now()
            state.update(target=target, phase=phase)
            timeline.append((time.monotonic(), target, phase))

    def current() -> Tuple[int, Optional[int], str]:
        return int(state["frames"]), state["target"], str(state["phase"])

    from edgeclf.runtime.tegrastats import TegrastatsReader, jetson_settings  # noqa: PLC0415

    sampler = _Sampler(opts.sample_interval_s, current)
    tegra = TegrastatsReader(interval_ms=max(10, int(opts.sample_interval_s * 1000)))
    t_wall0 = time.time()
    with tempfile.TemporaryDirectory(prefix="edgeclf-profile-") as tmp, _one_opencv_thread() as cv_threads:
        try:
            set_state(None, "setup")
            tegra.start()
            sampler.start()
            # Set-up and warm-up, one target after the other: the first target's first result is the cold start.
            for i, t in enumerate(targets):
                r = _TargetRun(t, i, uri, opts, tmp)
                runs.append(r)
                set_state(i, "setup")
                r.setup(factory)
                set_state(r.index, "warmup")
                r.phase = "warmup"
                if opts.warmup:
                    r.run_frames(opts.warmup)
                    if opts.infer_only:
                        r.infer_only(opts.warmup)
                else:
                    # No warm-up: one frame of its own gives this target's cold start (else its first result would come
                    # after the other targets' steady chunks); it is left out of every other figure.
                    r.run_frames(1)
                    r.clear_series()
                r.warm_n = {k: len(v) for k, v in r.series.items()}
            # Steady state, interleaved in chunks: A B A B ...
            for r in runs:
                r.phase = "steady"
            left, rnd = opts.frames, 0
            while left > 0:
                n = min(opts.chunk, left)
                for r in runs:
                    set_state(r.index, "steady")
                    r.run_frames(n)
                    state["frames"] = int(state["frames"]) + n
                    if opts.infer_only:
                        set_state(r.index, "steady_infer_only")
                        r.infer_only(n)
                left -= n
                if on_round is not None:
                    set_state(None, "external")
                    on_round(rnd)
                rnd += 1
            set_state(None, "done")
        finally:
            sampler.close()
            tegra.close()
            for r in runs:
                r.close()
    doc = _document(runs, opts, uri, sampler, tegra, t_wall0, started_at, timeline)
    doc["config"]["opencv_threads"] = cv_threads
    doc["config"]["frame_stage"] = FRAME_STAGE
    doc["system"]["jetson"] = jetson_settings() if tegra.executable else {
        "nvpmodel": {"available": False, "mode": None, "reason": "not a Jetson (no tegrastats)"},
        "jetson_clocks": {"available": False, "locked": None, "reason": "not a Jetson (no tegrastats)"}}
    _warn(doc)
    series = {r.target.name: {k: list(v) for k, v in r.series.items()} for r in runs}
    warm = {r.target.name: dict(r.warm_n) for r in runs}
    return ProfileResult(doc=doc, series=series, warmup=warm)


def _source_text(uri: str) -> str:
    """The source as the report names it: synthetic URIs as they are, anything else by kind and a hash (a file
    or folder name may carry a patient's name; a stream address may carry credentials)."""
    from edgeclf.runtime.audit import source_fact  # noqa: PLC0415

    fact = source_fact(uri)
    return uri if fact["kind"] == "synthetic" else f"{fact['kind']}:hmac:{fact['uri_hmac']}"


def _document(runs: List[_TargetRun], opts: ProfileOptions, uri: str, sampler: _Sampler, tegra: Any,
              t_wall0: float, started_at: Optional[float],
              timeline: Sequence[Tuple[float, Optional[int], str]] = ()) -> Dict[str, Any]:
    nb = opts.bootstrap
    targets: List[Dict[str, Any]] = []
    steady: List[Dict[str, List[float]]] = []
    for r in runs:
        st = {k: v[r.warm_n.get(k, 0):] for k, v in r.series.items()}
        wu = {k: v[: r.warm_n.get(k, 0)] for k, v in r.series.items()}
        steady.append(st)
        first_ms = (r.first_result_perf - r.setup_perf) * 1e3 if r.first_result_perf is not None else None
        targets.append({
            "name": r.target.name,
            "bundle": str(r.bundle.path),
            "bundle_checksum": r.bundle.checksum,
            "backend": getattr(r.backend, "name", r.target.backend),
            "precision": r.target.precision,
            "model": r.variant,
            "threads": getattr(r.backend, "threads", opts.threads),
            "batch": r.batch or 1,
            "frames": r.steady_frames,
            "frames_not_inferred": r.steady_not_inferred,
            "wall_s": r.steady_wall_s,
            "fps": r.steady_frames / r.steady_wall_s if r.steady_wall_s > 0 else None,
            "source_reopened": r.reopened,
            "cold_start": {"bundle_load_ms": r.bundle_load_ms, "backend_create_ms": r.backend_create_ms,
                           "session_ms": r.session_ms, "time_to_first_result_ms": first_ms,
                           "first_result_frame": "first warm-up frame" if opts.warmup else
                           "a frame run for the cold start alone (warmup 0), left out of every other figure"},
            "warmup": {"frames": opts.warmup, "stages_ms": {k: _warmup_stats(v) for k, v in wu.items() if k != "infer_only" or opts.infer_only}},
            "stages_ms": {k: latency_stats(v, n_boot=nb, seed=opts.seed) for k, v in st.items() if k != "infer_only" or opts.infer_only},
            "ratio_to_first": None,
            "system": {},
        })
    for i in range(1, len(targets)):
        targets[i]["ratio_to_first"] = {k: ratio_ci(steady[0][k], steady[i][k], n_boot=nb, seed=opts.seed)
                                        for k in targets[i]["stages_ms"] if steady[0].get(k) and steady[i].get(k)}
    first = runs[0] if runs else None
    pstart, how = _process_start_time()
    cold: Dict[str, Any] = {
        "process_start_to_first_result_ms": (first.first_result_wall - pstart) * 1e3
        if first is not None and first.first_result_wall is not None and pstart is not None else None,
        "cli_entry_to_first_result_ms": (first.first_result_wall - started_at) * 1e3
        if first is not None and first.first_result_wall is not None and started_at is not None else None,
        "process_start_source": how,
    }
    system = _system_section(runs, targets, opts, sampler, tegra, timeline)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "edgeclf-profile",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_wall0)),
        "host": {"edgeclf": _version(), "python": platform.python_version(), "platform": platform.platform(),
                 "machine": platform.machine(), "cpu": _cpu_model(), "cpu_count": os.cpu_count()},
        "config": {"source": _source_text(uri), "frames": opts.frames, "warmup": opts.warmup, "chunk": opts.chunk, "threads": opts.threads,
                   "batch": opts.run_options.batch, "bootstrap": opts.bootstrap, "seed": opts.seed, "sample_interval_s": opts.sample_interval_s,
                   "infer_only": opts.infer_only, "smoothing": opts.run_options.smoothing, "roi": opts.run_options.roi,
                   "quality": opts.run_options.quality},
        "cold_start": cold,
        "targets": targets,
        "system": system,
        "warnings": [],
    }


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    v = [float(x) for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _wmean(samples: Sequence[Dict[str, Any]], key: str) -> Optional[float]:
    """Mean of a sampler quantity weighted by each sample's interval (dt): samples at changes of state close
    intervals of any length, and a 1 ms interval must not weigh as much as a full sampling period."""
    pairs = [(float(s[key]), float(s.get("dt") or 0.0)) for s in samples if s.get(key) is not None]
    total = sum(w for _, w in pairs)
    if total <= 0:
        return _mean([v for v, _ in pairs])
    return sum(v * w for v, w in pairs) / total


def _system_section(runs: List[_TargetRun], targets: List[Dict[str, Any]], opts: ProfileOptions, sampler: _Sampler,
                    tegra: Any, timeline: Sequence[Tuple[float, Optional[int], str]] = ()) -> Dict[str, Any]:
    samples = list(sampler.samples)
    steady = [s for s in samples if s["phase"] in ("steady", "steady_infer_only")]
    rss_steady = [(s["frames"], s["rss_mb"]) for s in steady if s["rss_mb"] is not None]
    rss_all = [s["rss_mb"] for s in samples if s["rss_mb"] is not None]
    proc = {
        "available": bool(rss_all),
        "method": sampler.proc.method,
        "reason": None if rss_all else (sampler.proc.reason or "no samples (the run was shorter than one sampling period)"),
        "samples": len(samples),
        "cpu_percent_mean": _wmean(steady, "cpu_percent"),
        # Over whole sampling periods: a few-ms interval closed at a change of state is too short for a peak.
        "cpu_percent_max": max((s["cpu_percent"] for s in steady if s["cpu_percent"] is not None
                                and s.get("dt", opts.sample_interval_s) >= opts.sample_interval_s / 2), default=None),
        "rss_mb_start": rss_all[0] if rss_all else None,
        "rss_mb_end": rss_all[-1] if rss_all else None,
        "rss_mb_max": max(rss_all) if rss_all else None,
        "rss_slope_mb_per_10k_frames": rss_slope_mb_per_10k([f for f, _ in rss_steady], [m for _, m in rss_steady]),
        "rss_slope_ls_mb_per_10k_frames": rss_slope_mb_per_10k([f for f, _ in rss_steady], [m for _, m in rss_steady], method="ls"),
    }
    gpu: Dict[str, Any] = {"available": sampler.nvml.available, "reason": sampler.nvml.reason, "name": sampler.nvml.name}
    if sampler.nvml.available:
        gpu.update(util_percent_mean=_wmean(steady, "gpu_util"),
                   util_percent_max=max((s["gpu_util"] for s in steady if s["gpu_util"] is not None), default=None),
                   memory_mb_max=max((s["gpu_mem_mb"] for s in samples if s["gpu_mem_mb"] is not None), default=None),
                   power_mw_mean=_wmean(steady, "gpu_power_mw"))
    # Per target: CPU %, GPU % and energy per inference from the samples taken while it ran its pipeline.
    tsamples = tegra.snapshot() if tegra.available else []
    interval_ms = tegra.interval_ms
    bursty = _bursty(tsamples, interval_ms)
    for r, t in zip(runs, targets):
        mine = [s for s in samples if s["target"] == r.index and s["phase"] == "steady"]
        energy: Dict[str, Any] = {"available": False, "source": None, "energy_per_inference_mj": None, "power_mw_mean": None,
                                  "reason": "no power readings (needs tegrastats on a Jetson or NVML power on a GPU)"}
        fps = t["fps"]
        if tsamples and bursty is not None:
            energy["reason"] = bursty
        elif tsamples:
            power, figures = _target_power(tsamples, timeline, r.index)
            if power is not None and fps:
                module_input = all(f.module_input for f in figures)
                energy = {"available": True, "source": f"tegrastats {figures[0].label}", "power_mw_mean": power,
                          "energy_per_inference_mj": power / fps, "reason": None, "module_input_power": module_input,
                          "rails": list(figures[0].rails), "samples": len(figures), "interval_ms": interval_ms,
                          "attribution": "each tegrastats reading goes to the target and phase in force when it arrived; "
                                         "only readings inside this target's steady pipeline chunks count; time "
                                         "resolution: the tegrastats interval"}
            elif power is None:
                energy["reason"] = (f"no tegrastats reading arrived while this target ran its steady pipeline chunks "
                                    f"(interval {interval_ms} ms): raise --frames or --chunk")
        elif sampler.nvml.available:
            power = _wmean(mine, "gpu_power_mw")
            if power is not None and fps:
                energy = {"available": True, "source": "NVML GPU board power", "power_mw_mean": power,
                          "energy_per_inference_mj": power / fps, "reason": None}
        t["system"] = {"cpu_percent_mean": _wmean(mine, "cpu_percent"),
                       "gpu_util_percent_mean": _wmean(mine, "gpu_util"), "energy": energy}
    teg: Dict[str, Any] = {"available": bool(tegra.available), "reason": tegra.reason, "samples": len(tsamples)}
    if tegra.available and not tsamples:
        teg["reason"] = "tegrastats printed no parseable line during the run"
    if tsamples:
        from edgeclf.runtime.tegrastats import total_power_mw  # noqa: PLC0415

        temps: Dict[str, float] = {}
        for _, s in tsamples:
            for k, v in s.temperatures_c.items():
                temps[k] = max(v, temps.get(k, -1e9))
        teg.update(
            ram_used_mb_max=max((s.ram_used_mb for _, s in tsamples if s.ram_used_mb is not None), default=None),
            gpu_percent_mean=_mean([s.gpu_percent for _, s in tsamples]),
            emc_percent_mean=_mean([s.emc_percent for _, s in tsamples]),
            cpu_percent_mean_per_core=[_mean([s.cpu_percent[i] if i < len(s.cpu_percent) else None for _, s in tsamples])
                                       for i in range(max(len(s.cpu_percent) for _, s in tsamples))],
            temperatures_c_max=temps,
            total_power_mw_mean=_mean([total_power_mw(s) for _, s in tsamples]),
            power_figure=_figure_of(tsamples),
            rails_mw_mean={k: _mean([s.rails_mw[k][0] if k in s.rails_mw else None for _, s in tsamples])
                           for k in sorted({k for _, s in tsamples for k in s.rails_mw})},
            last=tsamples[-1][1].to_dict(),
        )
    return {"process": proc, "gpu": gpu, "tegrastats": teg, "throttle_temp_c": opts.throttle_temp_c}


def _target_power(tsamples: List[Any], timeline: Sequence[Tuple[float, Optional[int], str]],
                  index: int) -> Tuple[Optional[float], List[Any]]:
    """Mean tegrastats power (see tegrastats.power_figure) over the readings that arrived while target `index`
    ran its steady pipeline chunks, and the figures used.

    Each reading is credited to the entry of `timeline` (every change of target or phase, with its monotonic
    time) in force when the reader received it. A reading is the power monitor's latest conversion when
    tegrastats read it (a window of milliseconds), not an average over the tegrastats interval, so a reading
    whose interval spans a change of target is credited by the moment it was taken, not split. The figure thus
    follows the work to within the pipe's delivery delay; what it cannot resolve is anything shorter than the
    interval: a target whose chunks are shorter than the interval gets few readings (their count is reported)."""
    if not tsamples or not timeline:
        return None, []
    from edgeclf.runtime.tegrastats import power_figure  # noqa: PLC0415

    times = np.asarray([t for t, _, _ in timeline])
    figures: List[Any] = []
    for t, s in tsamples:
        k = int(np.searchsorted(times, t, side="right")) - 1
        if k >= 0 and timeline[k][1] == index and timeline[k][2] == "steady":
            f = power_figure(s)
            if f is not None:
                figures.append(f)
    return (float(np.mean([f.mw for f in figures])) if figures else None), figures


def _bursty(tsamples: List[Any], interval_ms: Optional[int]) -> Optional[str]:
    """Why arrival times cannot place readings in time (None: they can). Lines that arrive in bursts, far closer
    together than the interval, were held in a buffer: their arrival says nothing about when they were taken."""
    if not interval_ms or len(tsamples) < 5:
        return None
    gaps = np.diff(np.asarray([t for t, _ in tsamples], np.float64)) * 1e3
    median = float(np.median(gaps))
    if median >= interval_ms / 4:
        return None
    return (f"tegrastats lines arrived in bursts (median gap {median:.1f} ms for a {interval_ms} ms interval): its "
            "output was buffered, so a line's arrival time does not say which target ran when it was measured")


def _figure_of(tsamples: List[Any]) -> Optional[Dict[str, Any]]:
    """What the run's power figure is (the first sample with rails): which rails, whether it is module input."""
    from edgeclf.runtime.tegrastats import power_figure  # noqa: PLC0415

    for _, s in tsamples:
        f = power_figure(s)
        if f is not None:
            return {"rails": list(f.rails), "module_input": f.module_input, "label": f.label}
    return None


def _warn(doc: Dict[str, Any]) -> None:
    w: List[str] = doc["warnings"]
    teg = doc["system"]["tegrastats"]
    limit = doc["system"]["throttle_temp_c"]
    for k, v in (teg.get("temperatures_c_max") or {}).items():
        if v >= limit:
            w.append(f"thermal: {k} reached {v:.1f} C (>= {limit:g} C): the SoC may be throttling; cool the device or "
                     "check the timings for a downward drift")
    locked = ((doc["system"].get("jetson") or {}).get("jetson_clocks") or {}).get("locked")
    if locked is False:
        w.append("clocks are not locked (jetson_clocks): timings vary with DVFS; run `sudo jetson_clocks` for stable figures")
    slope = doc["system"]["process"].get("rss_slope_mb_per_10k_frames")
    steady = sum(int(t["frames"]) for t in doc["targets"])
    if slope is not None and slope > 10.0 and steady >= 2000:  # shorter runs: allocator noise, not a trend
        w.append(f"memory: RSS grows {slope:.1f} MB per 10,000 frames after warm-up: a possible leak; profile a longer run")
    energies = [(t["name"], (t.get("system") or {}).get("energy") or {}) for t in doc["targets"]]
    for name, e in energies:
        n = e.get("samples")
        if e.get("available") and n is not None and n < 10:
            w.append(f"energy: {name}'s power rests on {n} tegrastats reading(s) {e.get('interval_ms')} ms apart: "
                     "raise --frames for a steadier figure")
    summed = next((e for _, e in energies if e.get("available") and e.get("module_input_power") is False), None)
    if summed is not None:
        w.append(f"energy: the power figure is the sum of rails {', '.join(summed.get('rails') or [])}, not the module's "
                 "input power (this board reports no VDD_IN or POM_5V_IN rail): compare it only between runs on this board")
    for t in doc["targets"]:
        lat = t["stages_ms"].get("latency") or {}
        if lat.get("n") and lat["n"] < 100:
            w.append(f"{t['name']}: only {lat['n']} steady frames: p99 and its interval are rough; raise --frames")
            break
    for msg in w:
        log.warning("%s", msg)


# ------------------------------------------------------------------------------------------------- schema, I/O

def profile_schema() -> Dict[str, Any]:
    """The JSON Schema of the profile document (package data)."""
    path = Path(__file__).with_name("profile_schema.json")
    schema: Dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


def load_profile_json(path: str) -> Dict[str, Any]:
    """Read a profile written by `edgeclf profile --json`; a ConfigError names what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"profile {p} does not exist; give a file written by `edgeclf profile --json > FILE`")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"profile {p} is not JSON ({exc}); give a file written by `edgeclf profile --json > FILE`") from None
    if not isinstance(doc, dict) or doc.get("kind") != "edgeclf-profile":
        raise ConfigError(f"profile {p} is not an edgeclf profile; give a file written by `edgeclf profile --json > FILE`")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"profile {p} has schema_version {doc.get('schema_version')!r}; this edgeclf reads {SCHEMA_VERSION}; "
                          "re-run the profile with this edgeclf")
    check_compared_fields(doc, f"profile {p}")
    return doc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _field_problem(doc: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a field compare_profiles reads, or None. Only those fields: a profile written before
    others were recorded (batch, frames_not_inferred, the CPU model) still compares."""
    for key in ("host", "config", "system"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            return f"{key} is {type(doc[key]).__name__}, not an object"
    gpu = (doc.get("system") or {}).get("gpu")
    if gpu is not None and not isinstance(gpu, dict):
        return "system.gpu is not an object"
    targets = doc.get("targets", [])
    if not isinstance(targets, list):
        return f"targets is {json.dumps(targets)[:40]}, not a list"
    seen = set()
    for i, t in enumerate(targets):
        where = f"targets[{i}]"
        if not isinstance(t, dict):
            return f"{where} is not an object"
        if not isinstance(t.get("name"), str) or not t["name"]:
            return f"{where} has no name (a text)"
        if t["name"] in seen:
            return f"target {t['name']} appears twice"
        seen.add(t["name"])
        if "batch" in t and not (_is_int(t["batch"]) and t["batch"] >= 1):
            return f"{where}.batch is {json.dumps(t['batch'])}, not a whole number >= 1"
        for k in ("threads", "frames", "frames_not_inferred"):
            if t.get(k) is not None and not (_is_int(t[k]) and t[k] >= 0):
                return f"{where}.{k} is {json.dumps(t[k])[:40]}, not a whole number >= 0 (or null)"
        stages = t.get("stages_ms")
        if stages is not None and not isinstance(stages, dict):
            return f"{where}.stages_ms is not an object"
        for stage, st in (stages or {}).items():
            if st is None:
                continue
            if not isinstance(st, dict):
                return f"{where}.stages_ms.{stage} is not an object"
            if st.get("median") is not None and not _is_number(st["median"]):
                return f"{where}.stages_ms.{stage}.median is {json.dumps(st['median'])[:40]}, not a number (or null)"
            ci = st.get("ci95")
            if ci is not None and not isinstance(ci, dict):
                return f"{where}.stages_ms.{stage}.ci95 is not an object"
            med = (ci or {}).get("median")
            if med is not None and not (isinstance(med, list) and len(med) == 2 and all(v is None or _is_number(v) for v in med)):
                return f"{where}.stages_ms.{stage}.ci95.median is {json.dumps(med)[:40]}, not two numbers"
    return None


def check_compared_fields(doc: Dict[str, Any], what: str) -> None:
    """A ConfigError (one line) when a field compare_profiles reads is missing or of another type: a hand-edited or
    half-written profile is a user's error, not a crash that exits 1 as a regression does. `what` names the profile."""
    problem = _field_problem(doc) if isinstance(doc, dict) else "it is not a JSON object"
    if problem is not None:
        raise ConfigError(f"{what} is damaged: {problem}; give a file written by `edgeclf profile --json > FILE`, "
                          "unedited (see runtime/profile_schema.json)")


# The facts that make another machine; "platform" (OS and kernel release) is not one: a kernel update on the same
# cart changes it, so a difference there is a warning only. A fact one profile does not record is not compared.
_HOST_FIELDS = ("machine", "cpu", "cpu_count")


def _cpu_model() -> Optional[str]:
    """The CPU's model name as `edgeclf devices detect` reads it (/proc/cpuinfo), else platform.processor(), or None."""
    from edgeclf.devices.detect import _cpu

    return _cpu(Path("/"))["model"] or platform.processor() or None


def _host_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """'field: old -> new' for each recorded fact of the machine that differs (host fields, NVML GPU name)."""
    oh, nh = old.get("host") or {}, new.get("host") or {}
    diffs = [f"{k}: {oh.get(k)!r} -> {nh.get(k)!r}" for k in _HOST_FIELDS
             if k in oh and k in nh and oh.get(k) != nh.get(k)]
    og = ((old.get("system") or {}).get("gpu") or {}).get("name")
    ng = ((new.get("system") or {}).get("gpu") or {}).get("name")
    if og and ng and og != ng:  # a name only one records: NVML (pynvml) missing on one run, not another GPU
        diffs.append(f"GPU: {og!r} -> {ng!r}")
    return diffs


# What else a profile's times depend on besides the target's batch and threads: another value of any of these is
# other work (the quality gate on or off, another ROI, smoothing, frame size or OpenCV thread count), not the same
# code faster or slower.
_CONFIG_FIELDS = ("source", "quality", "roi", "smoothing", "opencv_threads")


def _source_key(text: Any) -> Any:
    """A recorded source as compared: a synthetic URI without its frame count (--frames sets the default's; it changes
    how often the source is reopened, not a frame's work); anything else as recorded."""
    if isinstance(text, str) and text.startswith("synthetic:"):
        head, _, query = text.partition("?")
        params = sorted(p for p in query.split("&") if p and not p.startswith("frames="))
        return head + ("?" + "&".join(params) if params else "")
    return text


def _config_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """'field: old -> new' for each recorded pipeline setting (_CONFIG_FIELDS) that differs; one not recorded in both
    profiles (written before it was) is not compared."""
    oc, nc = old.get("config") or {}, new.get("config") or {}
    diffs: List[str] = []
    for k in _CONFIG_FIELDS:
        if k not in oc or k not in nc:
            continue
        a, b = (_source_key(oc[k]), _source_key(nc[k])) if k == "source" else (oc[k], nc[k])
        if a != b:
            diffs.append(f"{k}: {oc[k]!r} -> {nc[k]!r}")
    return diffs


def _median_ci(stats: Dict[str, Any]) -> Optional[Tuple[float, float]]:
    """A stage's recorded 95% interval of its median, None when the profile has none (--bootstrap 0)."""
    ci = (stats.get("ci95") or {}).get("median")
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or ci[0] is None or ci[1] is None:
        return None
    lo, hi = float(ci[0]), float(ci[1])
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def _pct(change: Optional[float]) -> str:
    return "n/a" if change is None else format(change, "+.1%")


def compare_profiles(old: Dict[str, Any], new: Dict[str, Any], *, max_regression: float = 0.1,
                     min_delta_ms: float = 0.0, allow_other_host: bool = False, allow_other_config: bool = False,
                     allow_missing: bool = False) -> Dict[str, Any]:
    """Compare the steady-state medians of every stage of every target present in both (matched by name,
    else, when each holds one target, those two, said in "warnings"). A profile whose compared fields are
    missing or of another type (hand-edited, half-written) is refused (ConfigError).

    A stage regressed when its new median exceeds the old by more than `max_regression` (a fraction) and by more
    than `min_delta_ms`, and the 95% intervals of the two medians do not overlap (new low above old high). A slow-down
    past the limit whose intervals overlap is "inconclusive": said in "warnings" and the row's "status", not a
    regression (the run's own noise covers it; more --frames narrow the intervals). Where either profile has no
    intervals (--bootstrap 0), the medians alone decide.

    What the old profile measured and the new one lacks fails the comparison as a regression does ("regressed" is
    True), listed in "missing" and "warnings", unless `allow_missing`: a target absent from the new profile, or a stage
    with an old median and none now (e.g. a gate that turns every frame away: no infer, and every other stage looks
    faster). A larger share of steady frames not inferred than before is a warning.

    Only like configurations compare: a target at another batch or thread count is refused (ConfigError); so are
    another pipeline configuration (source, quality gate, ROI, smoothing, OpenCV threads differ) unless
    `allow_other_config`, and profiles from another machine (machine, CPU model, core count or GPU name differ)
    unless `allow_other_host`; allowed, each is said in "warnings" (and "config_differences", "host_differences"):
    the changes are the configurations' or the machines', not a regression of the code. A fact one profile does not
    record is not compared. A changed platform (OS, kernel) is a warning only."""
    if not max_regression >= 0:
        raise ConfigError(f"max regression is {max_regression}; allowed: a fraction >= 0 (0.1 = 10% slower)")
    if not min_delta_ms >= 0:
        raise ConfigError(f"min delta is {min_delta_ms} ms; allowed: 0 or more")
    check_compared_fields(old, "the old profile")
    check_compared_fields(new, "the new profile")
    old_t = {t["name"]: t for t in old.get("targets", [])}
    new_t = {t["name"]: t for t in new.get("targets", [])}
    pairs = [(n, old_t[n], new_t[n]) for n in old_t if n in new_t]
    missing_targets = [n for n in old_t if n not in new_t]
    warnings: List[str] = []
    if not pairs and len(old_t) == 1 and len(new_t) == 1:
        # A target's name depends on the other bundles of its run (runs/a/bundle beside runs/b/bundle is
        # 'a/bundle:...', alone 'bundle:...'): one target each is paired, and said to be.
        (on, ot), (nn, nt) = next(iter(old_t.items())), next(iter(new_t.items()))
        pairs, missing_targets = [(f"{on} -> {nn}", ot, nt)], []
        warnings.append(f"the profiles share no target name: their only targets, {on} (old) and {nn} (new), are compared "
                        "with each other; make sure they are the same bundle, backend and precision")
    if not pairs:
        raise ConfigError(f"the profiles share no target (old: {sorted(old_t)}, new: {sorted(new_t)}); "
                          "profile the same bundle/backend/precision in both")
    for name, ot, nt in pairs:
        ob, nb = int(ot.get("batch", 1)), int(nt.get("batch", 1))  # profiles before --batch ran at 1
        if ob != nb:
            raise ConfigError(f"target {name} ran at batch {ob} in the old profile and {nb} in the new one; per-frame times "
                              "at different batches are not comparable: profile both with the same --batch")
        othr, nthr = ot.get("threads"), nt.get("threads")
        if othr != nthr:
            raise ConfigError(f"target {name} ran with threads {othr if othr is not None else 'default'} in the old profile and "
                              f"{nthr if nthr is not None else 'default'} in the new one; times at different thread counts are "
                              "not comparable: profile both with the same --threads")
    host = _host_differences(old, new)
    if host and not allow_other_host:
        raise ConfigError(f"the profiles come from different machines ({'; '.join(host)}); a change between machines is not "
                          "a regression: compare profiles from one machine, or allow it explicitly (--allow-other-host)")
    config = _config_differences(old, new)
    if config and not allow_other_config:
        raise ConfigError(f"the profiles ran different pipelines ({'; '.join(config)}); a change of configuration is not a "
                          "regression: profile both with the same settings, or allow it explicitly (--allow-other-config)")
    if host:
        warnings.append(f"the profiles come from different machines ({'; '.join(host)}): the changes below are between "
                        "machines, not a regression of one")
    if config:
        warnings.append(f"the profiles ran different pipelines ({'; '.join(config)}): the changes below include the "
                        "configuration's, not only the code's")
    op, np_ = (old.get("host") or {}).get("platform"), (new.get("host") or {}).get("platform")
    if op and np_ and op != np_:
        warnings.append(f"the operating system or kernel changed ({op} -> {np_}): it can change timings too")
    missing: List[Dict[str, Any]] = [{"target": n, "stage": None} for n in missing_targets]
    for n in missing_targets:
        warnings.append(f"target {n} of the old profile is missing from the new one: nothing of it was compared")
    frame_kinds = [(d.get("config") or {}).get("frame_stage", "sum") for d in (old, new)]
    rows: List[Dict[str, Any]] = []
    for name, ot, nt in pairs:
        of, nf = ot.get("frames"), nt.get("frames")
        oni, nni = ot.get("frames_not_inferred"), nt.get("frames_not_inferred")
        if of and nf and oni is not None and nni is not None and nni / nf > oni / of:
            warnings.append(f"target {name}: {nni} of {nf} steady frames were not inferred (quality gate, sector warm-up, "
                            f"frame errors), {oni} of {of} before: stages over every frame are cheaper by the inference "
                            "skipped")
        for stage in PROFILE_STAGES:
            a = (ot.get("stages_ms") or {}).get(stage) or {}
            b = (nt.get("stages_ms") or {}).get(stage) or {}
            if a.get("median") is None:
                continue
            if stage == "frame" and frame_kinds[0] != frame_kinds[1]:
                warnings.append(f"target {name}: stage frame is not compared: one profile holds the sum of the stages there "
                                "(written before frame became the interval between results); profile the baseline again")
                continue
            if b.get("median") is None:
                missing.append({"target": name, "stage": stage})
                warnings.append(f"target {name}: stage {stage} had a median of {float(a['median']):.3f} ms in the old profile "
                                "and has none in the new one (not run, or no frame went through it)")
                continue
            om, nm = float(a["median"]), float(b["median"])
            change: Optional[float] = (nm - om) / om if om > 0 else None  # None: nothing to scale by (0 ms before)
            slower = (nm - om) > min_delta_ms and (change is None and nm > om or change is not None and change > max_regression)
            oci, nci = _median_ci(a), _median_ci(b)
            status = "ok"
            if slower:
                # Without intervals on both sides (--bootstrap 0) the medians alone decide, as they always did.
                status = "regressed" if oci is None or nci is None or nci[0] > oci[1] else "inconclusive"
            if status == "inconclusive":
                assert oci is not None and nci is not None
                warnings.append(f"target {name} stage {stage}: median {om:.3f} -> {nm:.3f} ms ({_pct(change)}) is inconclusive: "
                                f"the 95% intervals overlap ({oci[0]:.3f}-{oci[1]:.3f} vs {nci[0]:.3f}-{nci[1]:.3f}); "
                                "profile more --frames to decide")
            rows.append({"target": name, "stage": stage, "old_median_ms": om, "new_median_ms": nm, "change": change,
                         "old_ci95": list(oci) if oci else None, "new_ci95": list(nci) if nci else None,
                         "status": status, "regressed": status == "regressed"})
    regressions = [r for r in rows if r["regressed"]]
    return {"max_regression": max_regression, "min_delta_ms": min_delta_ms, "rows": rows,
            "regressions": regressions, "inconclusive": [r for r in rows if r["status"] == "inconclusive"],
            "missing": missing, "regressed": bool(regressions) or bool(missing and not allow_missing),
            "host_differences": host, "config_differences": config, "warnings": warnings}


# --------------------------------------------------------------------------------------------------- report

def _matplotlib_figure() -> Any:
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        raise MissingExtraError("--report needs matplotlib, which is not installed; install it with: pip install matplotlib "
                                "(or leave --report out)") from None
    return Figure


def _rolling(values: np.ndarray, window: int, q: float) -> np.ndarray:
    out = np.empty(values.size)
    for i in range(values.size):
        out[i] = np.percentile(values[max(0, i - window + 1): i + 1], q)
    return out


def build_figures(result: ProfileResult) -> Dict[str, Any]:
    """matplotlib Figures by file name: hist_<stage>.png (steady-state histogram per stage, every target)
    and timeline.png (capture-to-result latency against frame index, warm-up shaded, rolling median and p90)."""
    Figure = _matplotlib_figure()
    figs: Dict[str, Any] = {}
    for stage in PROFILE_STAGES:
        data = {n: np.asarray(s.get(stage, [])[result.warmup.get(n, {}).get(stage, 0):], np.float64)
                for n, s in result.series.items()}
        data = {n: v for n, v in data.items() if v.size}
        if not data:
            continue
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
        allv = np.concatenate(list(data.values()))
        hi = float(np.percentile(allv, 99.5)) if allv.size > 1 else float(allv.max())
        lo = float(allv.min())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 50)
        for n, v in data.items():
            ax.hist(np.clip(v, lo, bins[-1]), bins=bins, alpha=0.5, label=f"{n} (median {np.median(v):.3f} ms)")
        title = "inference alone (backend.infer)" if stage == "infer_only" else (
            "capture-to-result latency" if stage == "latency" else f"stage: {stage}")
        ax.set_title(f"Steady-state {title}")
        ax.set_xlabel("time per frame (ms)")
        ax.set_ylabel("frames")
        ax.legend(fontsize="small")
        fig.tight_layout()
        figs[f"hist_{stage}.png"] = fig
    fig = Figure(figsize=(9, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    warm = 0
    for n, s in result.series.items():
        v = np.asarray(s.get("latency", []), np.float64)
        if not v.size:
            continue
        warm = max(warm, result.warmup.get(n, {}).get("latency", 0))
        idx = np.arange(v.size)
        dots = ax.plot(idx, v, ".", markersize=2, alpha=0.4, label=f"{n}: per frame")[0]
        colour = dots.get_color()
        ax.plot(idx, _rolling(v, 50, 50), linewidth=1.2, color=colour, label=f"{n}: rolling median (50)")
        ax.plot(idx, _rolling(v, 50, 90), linewidth=0.8, linestyle="--", color=colour, label=f"{n}: rolling p90 (50), jitter")
    if warm:
        ax.axvspan(0, warm, color="orange", alpha=0.15, label="warm-up (excluded)")
    ax.set_title("Capture-to-result latency over the run (warm-up shaded)")
    ax.set_xlabel("frame index (per target)")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize="x-small", loc="upper right")
    fig.tight_layout()
    figs["timeline.png"] = fig
    return figs


def _f(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def render_markdown(doc: Dict[str, Any], images: Sequence[str] = ()) -> str:
    lines = [f"# edgeclf latency profile ({doc['created']})", "",
             f"Source `{doc['config']['source']}`, {doc['config']['frames']} steady frames per target after "
             f"{doc['config']['warmup']} warm-up frames, interleaved in chunks of {doc['config']['chunk']}.",
             f"Host: {doc['host']['platform']}, Python {doc['host']['python']}, edgeclf {doc['host']['edgeclf']}.", ""]
    for t in doc["targets"]:
        lines += [f"## {t['name']}", "", f"Model {t['model']} on {t['backend']}, batch {t.get('batch', 1)}, {t['frames']} frames, "
                  f"{_f(t['fps'], '.1f')} fps; times per frame.", "",
                  "| stage | median ms (95% CI) | p90 ms | p99 ms (95% CI) | max ms | std ms | per s | ratio to first (95% CI) |",
                  "|---|---|---|---|---|---|---|---|"]
        for stage, s in t["stages_ms"].items():
            ci = s.get("ci95") or {}
            r = (t.get("ratio_to_first") or {}).get(stage) or {}
            rci = r.get("ci95")
            lines.append(f"| {stage} | {_f(s['median'])} ({_f((ci.get('median') or [None])[0])}-{_f((ci.get('median') or [None, None])[1])}) | "
                         f"{_f(s['p90'])} | {_f(s['p99'])} ({_f((ci.get('p99') or [None])[0])}-{_f((ci.get('p99') or [None, None])[1])}) | "
                         f"{_f(s['max'])} | {_f(s['std'])} | {_f(s['throughput_per_s'], '.1f')} | "
                         + ("-" if t.get("ratio_to_first") is None else f"{_f(r.get('median_ratio'))} ({_f(rci[0])}-{_f(rci[1])})"
                            if rci else _f(r.get("median_ratio"))) + " |")
        c = t["cold_start"]
        lines += ["", f"Cold start: bundle load {_f(c['bundle_load_ms'], '.1f')} ms, backend {_f(c['backend_create_ms'], '.1f')} ms "
                  f"(session {_f(c['session_ms'], '.1f')} ms), first result {_f(c['time_to_first_result_ms'], '.1f')} ms after setup began.",
                  f"Warm-up: first frame latency {_f(t['warmup']['stages_ms'].get('latency', {}).get('first'))} ms, "
                  f"warm-up median {_f(t['warmup']['stages_ms'].get('latency', {}).get('median'))} ms.",
                  "Energy per inference: " + (f"{_f(t['system']['energy']['energy_per_inference_mj'])} mJ ({t['system']['energy']['source']})"
                                               if t["system"]["energy"]["available"] else f"not available ({t['system']['energy']['reason']})"), ""]
    sysd = doc["system"]
    p = sysd["process"]
    lines += ["## System", "", f"- Process ({p['method']}): CPU {_f(p['cpu_percent_mean'], '.0f')}% mean, RSS {_f(p['rss_mb_start'], '.1f')} -> "
              f"{_f(p['rss_mb_end'], '.1f')} MB, slope after warm-up {_f(p['rss_slope_mb_per_10k_frames'], '.2f')} MB per 10,000 frames.",
              "- GPU (NVML): " + (f"{sysd['gpu']['name']}, utilisation {_f(sysd['gpu'].get('util_percent_mean'), '.0f')}% mean"
                                   if sysd["gpu"]["available"] else f"not available ({sysd['gpu']['reason']})"),
              "- tegrastats: " + ("available" if sysd["tegrastats"]["available"] else f"not available ({sysd['tegrastats']['reason']})")]
    for k, v in (sysd.get("jetson") or {}).items():
        lines.append(f"- {k}: " + (json.dumps({kk: vv for kk, vv in v.items() if kk != 'reason'}) if v["available"] else f"not available ({v['reason']})"))
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in doc["warnings"]] or ["none"]) + [""]
    if images:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in images] + [""]
    c = doc["cold_start"]
    lines.insert(4, f"Cold start: process start to first result {_f(c['process_start_to_first_result_ms'], '.0f')} ms, "
                    f"CLI entry to first result {_f(c['cli_entry_to_first_result_ms'], '.0f')} ms.")
    return "\n".join(lines)


def write_report(result: ProfileResult, out_dir: str) -> List[str]:
    """report.md and the PNG plots in `out_dir` (created); returns the written paths."""
    figs = build_figures(result)  # before anything is written: a missing matplotlib writes nothing
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"report folder {out} cannot be created ({exc}); give a writable --report folder") from None
    written: List[str] = []
    for name, fig in figs.items():
        fig.savefig(str(out / name))
        written.append(str(out / name))
    md = out / "report.md"
    md.write_text(render_markdown(result.doc, list(figs)), encoding="utf-8")
    written.append(str(md))
    return written

