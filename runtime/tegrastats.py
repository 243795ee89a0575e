"""Jetson system figures: a parser for `tegrastats` lines, a background reader, nvpmodel and jetson_clocks.

tegrastats prints one line per interval. The fields follow NVIDIA's documented format (L4T 32 / JetPack 4,
L4T 35 / JetPack 5, L4T 36 / JetPack 6); which fields appear depends on the board and release:

- ``RAM X/YMB (lfb NxZMB)``, ``SWAP X/YMB (cached ZMB)``
- ``CPU [X%@F,Y%@F,off,...]`` (per core load % at frequency F MHz, or ``off``); older boards: ``CPU [X%,Y%]@F``
- ``EMC_FREQ X%@F`` or ``EMC_FREQ X%`` (external memory controller)
- ``GR3D_FREQ X%@F``, ``GR3D_FREQ X%@[F,F]`` (JetPack 5: one frequency per GPC) or ``GR3D_FREQ X%`` (the iGPU)
- temperatures ``NAME@T C`` (``CPU@29.5C``, ``tj@43.781C``; -256C means the sensor is off and is dropped)
- power rails: JetPack 4 ``NAME cur/avg`` in mW without a unit (``POM_5V_IN 2410/2410``, ``GPU 0/0``);
  JetPack 5 and 6 ``NAME curmW/avgmW`` (``VDD_IN 4783mW/4783mW``, ``VDD_CPU_GPU_CV 517mW/517mW``)
- JetPack 5/6 lines start with a date and time (``11-23-2023 12:07:49``), to the second only: too coarse to
  tell which sub-second stretch of work a line belongs to, so the reader stamps each line with
  ``time.monotonic()`` as it arrives.

Power: a rail's first number is its current reading (the INA3221 power monitor's latest conversion when
tegrastats reads it, an average over the monitor's conversion window of milliseconds, not over the tegrastats
interval), the second the average since tegrastats started. Which figure stands for "the board's power" depends
on the board: VDD_IN (Orin NX/Nano, Xavier NX) and POM_5V_IN (Nano, TX) measure the module's input; AGX Orin
(VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, VDDQ_VDD2_1V8AO) and AGX Xavier (GPU, CPU, SOC, CV, VDDRQ, SYS5V) report
no input rail. There `power_figure` gives the sum of the rails and says so (`module_input` False): the rails
measure separate supply domains, and their sum may miss regulator losses or count a rail fed from another
twice (on AGX Orin, VDDQ_VDD2_1V8AO may be fed from VIN_SYS_5V0), so it is not labelled module input power.

Python 3.8 compatible, stdlib only.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "TegraSample",
    "parse_tegrastats_line",
    "total_power_mw",
    "PowerFigure",
    "power_figure",
    "TegrastatsReader",
    "nvpmodel_mode",
    "clocks_locked",
    "jetson_settings",
    "TOTAL_RAILS",
]

log = logging.getLogger(__name__)

# Rails that measure the whole module's input: when present, they are the total; else the rails are summed.
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")

_TIME = re.compile(r"^\s*(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"(?<![\w@])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL_MW = re.compile(r"(?<![\w/])([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW")
_RAIL_BARE = re.compile(r"(?<![\w/])([A-Z][A-Z0-9_]*) (\d+)/(\d+)(?=\s|$)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM", "NC"}


@dataclass
class TegraSample:
    """One tegrastats line. Missing fields are None or empty; power in mW, temperatures in C, memory in MB."""

    time: Optional[str] = None
    ram_used_mb: Optional[int] = None
    ram_total_mb: Optional[int] = None
    swap_used_mb: Optional[int] = None
    swap_total_mb: Optional[int] = None
    cpu_percent: List[Optional[int]] = field(default_factory=list)  # per core; None: core off
    cpu_mhz: List[Optional[int]] = field(default_factory=list)
    emc_percent: Optional[int] = None
    emc_mhz: Optional[int] = None
    gpu_percent: Optional[int] = None
    gpu_mhz: List[int] = field(default_factory=list)
    temperatures_c: Dict[str, float] = field(default_factory=dict)
    rails_mw: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # name -> (current, average)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "time": self.time, "ram_used_mb": self.ram_used_mb, "ram_total_mb": self.ram_total_mb,
            "swap_used_mb": self.swap_used_mb, "swap_total_mb": self.swap_total_mb,
            "cpu_percent": list(self.cpu_percent), "cpu_mhz": list(self.cpu_mhz),
            "emc_percent": self.emc_percent, "emc_mhz": self.emc_mhz,
            "gpu_percent": self.gpu_percent, "gpu_mhz": list(self.gpu_mhz),
            "temperatures_c": dict(self.temperatures_c),
            "rails_mw": {k: {"current": v[0], "average": v[1]} for k, v in self.rails_mw.items()},
            "total_power_mw": total_power_mw(self),
            "power_figure": _figure_dict(power_figure(self)),
        }


def parse_tegrastats_line(line: str) -> Optional[TegraSample]:
    """Parse one tegrastats line (JetPack 4.x, 5.x, 6.x); None for a line with none of its fields."""
    s = TegraSample()
    text = line.strip()
    m = _TIME.match(text)
    if m:
        s.time = m.group(1)
        text = text[m.end():]
    m = _RAM.search(text)
    if m:
        s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    m = _SWAP.search(text)
    if m:
        s.swap_used_mb, s.swap_total_mb = int(m.group(1)), int(m.group(2))
    m = _CPU.search(text)
    if m:
        shared = int(m.group(2)) if m.group(2) else None  # old form: CPU [X%,Y%]@F
        for part in (p.strip() for p in m.group(1).split(",")):
            c = _CORE.match(part)
            if c:
                s.cpu_percent.append(int(c.group(1)))
                s.cpu_mhz.append(int(c.group(2)) if c.group(2) else shared)
            elif part:  # "off"
                s.cpu_percent.append(None)
                s.cpu_mhz.append(None)
    m = _EMC.search(text)
    if m:
        s.emc_percent = int(m.group(1))
        s.emc_mhz = int(m.group(2)) if m.group(2) else None
    m = _GR3D.search(text)
    if m:
        s.gpu_percent = int(m.group(1))
        s.gpu_mhz = [int(v) for v in (m.group(2) or "").split(",") if v]
    for name, value in _TEMP.findall(text):
        t = float(value)
        if t > -200:  # -256C: sensor powered off
            s.temperatures_c[name] = t
    rails = _RAIL_MW.findall(text) or _RAIL_BARE.findall(text)
    for name, cur, avg in rails:
        if name not in _NOT_RAILS:
            s.rails_mw[name] = (int(cur), int(avg))
    found = (s.ram_total_mb is not None or s.cpu_percent or s.gpu_percent is not None or s.temperatures_c or s.rails_mw)
    return s if found else None


@dataclass(frozen=True)
class PowerFigure:
    """One power figure of a tegrastats sample and what it is. mw: the current reading(s) in mW; rails: the rails
    it comes from; module_input: True when it is a rail that measures the module's input (VDD_IN, POM_5V_IN),
    False when it is the sum of the rails of a board that reports no such rail (AGX Orin, AGX Xavier)."""

    mw: float
    rails: Tuple[str, ...]
    module_input: bool

    @property
    def label(self) -> str:
        if self.module_input:
            return f"{self.rails[0]} (module input power)"
        return (f"sum of rails {', '.join(self.rails)} (not module input power: no VDD_IN or POM_5V_IN rail on this "
                "board; a sum of supply domains may miss regulator losses or count one rail twice)")


def power_figure(sample: TegraSample) -> Optional[PowerFigure]:
    """The module's input rail (VDD_IN / POM_5V_IN) where the board reports one; else the sum of its rails,
    marked as not module input power; None without rails."""
    for name in TOTAL_RAILS:
        if name in sample.rails_mw:
            return PowerFigure(float(sample.rails_mw[name][0]), (name,), True)
    if not sample.rails_mw:
        return None
    return PowerFigure(float(sum(cur for cur, _ in sample.rails_mw.values())), tuple(sample.rails_mw), False)


def _figure_dict(f: Optional[PowerFigure]) -> Optional[Dict[str, Any]]:
    return None if f is None else {"mw": f.mw, "rails": list(f.rails), "module_input": f.module_input, "label": f.label}


def total_power_mw(sample: TegraSample) -> Optional[float]:
    """`power_figure(sample).mw` (None: no rails): the module input rail where there is one, else the sum of the
    rails, which is not module input power; `power_figure` says which."""
    f = power_figure(sample)
    return None if f is None else f.mw


class TegrastatsReader:
    """Runs `tegrastats --interval MS` in the background, parsing each line with a monotonic timestamp taken
    when the line arrives (`samples`: (time.monotonic(), TegraSample)); a reading is thus placed in time to within
    the pipe's delivery delay, and readings are `interval_ms` apart.

    A context manager; `available` is False (with `reason`) where tegrastats is not on PATH.
    """

    def __init__(self, interval_ms: int = 100, executable: Optional[str] = None) -> None:
        self.interval_ms = int(interval_ms)
        self.executable = executable or shutil.which("tegrastats")
        self.available = self.executable is not None
        self.reason: Optional[str] = None if self.available else "tegrastats is not on PATH (not a Jetson, or JetPack tools missing)"
        self.samples: List[Tuple[float, TegraSample]] = []
        self._proc: Optional[Any] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def start(self) -> TegrastatsReader:
        if not self.available or self._proc is not None:
            return self
        try:
            self._proc = subprocess.Popen([str(self.executable), "--interval", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as exc:
            self.available, self.reason = False, f"tegrastats could not start: {exc}"
            return self
        self._thread = threading.Thread(target=self._pump, name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            sample = parse_tegrastats_line(line)
            if sample is not None:
                with self._lock:
                    self.samples.append((time.monotonic(), sample))

    def snapshot(self) -> List[Tuple[float, TegraSample]]:
        with self._lock:
            return list(self.samples)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def __enter__(self) -> TegrastatsReader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_tool(args: List[str]) -> Tuple[Optional[str], Optional[str]]:
    """(stdout, None) or (None, why not)."""
    exe = shutil.which(args[0])
    if exe is None:
        return None, f"{args[0]} is not on PATH"
    try:
        r = subprocess.run([exe] + args[1:], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{args[0]} failed: {exc}"
    if r.returncode != 0:
        first = (r.stderr or r.stdout or "").strip().splitlines()
        return None, f"{args[0]} exited {r.returncode}" + (f": {first[0]}" if first else "")
    return r.stdout, None


def nvpmodel_mode(text: str) -> Optional[str]:
    """The power mode name from `nvpmodel -q` output ('NV Power Mode: MAXN')."""
    m = re.search(r"NV Power Mode:\s*(\S.*)", text)
    return m.group(1).strip() if m else None


_CLOCK_LINE = re.compile(r"^\s*(\S+?):?\s.*?MinFreq=(\d+)\s+MaxFreq=(\d+)(?:\s+CurrentFreq=(\d+))?(?:\s+FreqOverride=(\d+))?")
# jetson_clocks shows these engines but never sets them: their MinFreq stays below MaxFreq on a locked board.
_NOT_LOCKED_BY_JETSON_CLOCKS = ("DLA", "PVA", "CVNAS")


def clocks_locked(text: str) -> Optional[bool]:
    """From `jetson_clocks --show`: True when every clock jetson_clocks locks runs at its maximum, None when the
    output lists no frequencies. As NVIDIA's jetson_clocks script sets and shows them: CPUs and the GPU lock with
    MinFreq raised to MaxFreq (offline CPUs, Online=0, are skipped); the EMC locks through the BPMP override
    (mrq_rate_locked), so its MinFreq stays low and it counts as locked with FreqOverride=1 and CurrentFreq ==
    MaxFreq; DLA, PVA and CVNAS lines are skipped (jetson_clocks leaves them alone)."""
    seen = False
    for line in text.splitlines():
        m = _CLOCK_LINE.match(line)
        if m is None:
            continue
        name, lo, hi, cur, override = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)
        if name.upper().startswith(_NOT_LOCKED_BY_JETSON_CLOCKS) or re.search(r"\bOnline=0\b", line):
            continue
        seen = True
        if name.upper() == "EMC" and override is not None:
            locked = override == "1" and cur is not None and int(cur) == hi
        else:
            locked = lo == hi
        if not locked:
            return False
    return True if seen else None


def jetson_settings() -> Dict[str, Any]:
    """nvpmodel mode and clock locking where the tools exist; each with the reason when not available."""
    out: Dict[str, Any] = {}
    text, why = _run_tool(["nvpmodel", "-q"])
    out["nvpmodel"] = {"available": text is not None, "mode": nvpmodel_mode(text) if text else None, "reason": why}
    text, why = _run_tool(["jetson_clocks", "--show"])
    out["jetson_clocks"] = {"available": text is not None, "locked": clocks_locked(text) if text else None, "reason": why}
    return out
