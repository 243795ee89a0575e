"""Which device profile fits this machine, and why: Jetson board from the device tree and L4T release,
NVIDIA GPUs from NVML, CPU features from /proc/cpuinfo. Stdlib only; every path is under `Probe.root`, so
tests (and `edgeclf devices detect --root DIR`) read sample files instead of the machine's own.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["Detection", "Probe", "detect", "parse_tegra_release", "jetpack_for_l4t", "query_gpus", "board_profile"]

GpuQuery = Callable[[], Tuple[List[Dict[str, Optional[str]]], str]]

# Device-tree model strings (the developer kits' and the modules'), matched in this order, case-insensitively.
_BOARDS: Tuple[Tuple[str, str], ...] = (
    ("orin nano", "jetson-orin-nano"),
    ("orin nx", "jetson-orin-nx"),
    ("agx orin", "jetson-agx-orin"),
    ("xavier nx", "jetson-xavier-nx"),
    ("agx xavier", "jetson-agx-xavier"),
    ("jetson-agx", "jetson-agx-xavier"),  # the AGX Xavier developer kit's L4T model string
)
# Module part numbers in /proc/device-tree/compatible, when the model string names no board.
_MODULES: Tuple[Tuple[str, str], ...] = (
    ("p3767-0000", "jetson-orin-nx"), ("p3767-0001", "jetson-orin-nx"), ("p3767-0003", "jetson-orin-nano"),
    ("p3767-0004", "jetson-orin-nano"), ("p3767-0005", "jetson-orin-nano"), ("p3701", "jetson-agx-orin"),
    ("p3668", "jetson-xavier-nx"), ("p2888", "jetson-agx-xavier"),
)
# Jetson Linux release -> JetPack, exact releases only (trailing ".0" dropped: /etc/nv_tegra_release says
# "R36 ... REVISION: 4.0" for the release NVIDIA calls 36.4). Sources: NVIDIA's JetPack and Jetson Linux archives
# (developer.nvidia.com/embedded/jetpack-archive, docs.nvidia.com/jetson/archives: JetPack 6.2.1 = Jetson Linux
# 36.4.4, 6.2 = 36.4.3, 6.1 = 36.4, 7.0 = 38.2/38.2.1, 7.1 = 38.4); 35.6.1/35.6.2 -> 5.1.5 and 36.4.7 -> 6.2.1 as
# NVIDIA's jetson-containers (l4t_version.py) maps them. A release not listed is reported by major only, saying so.
_JETPACK = {"35.1": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5": "5.1.3", "35.6": "5.1.4",
            "35.6.1": "5.1.5", "35.6.2": "5.1.5",
            "36.2": "6.0 DP", "36.3": "6.0", "36.4": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4.7": "6.2.1",
            "38.2": "7.0", "38.2.1": "7.0", "38.4": "7.1"}
_JETPACK_MAJOR = {"32": "4", "35": "5", "36": "6", "38": "7"}


@dataclass(frozen=True)
class Probe:
    """Where detection looks. root: the filesystem root (tests: a sample tree); machine: platform.machine()
    when None; gpu_query: NVIDIA GPUs as ([{"name", "compute_capability"}], how they were asked) - default NVML."""

    root: Path = Path("/")
    machine: Optional[str] = None
    gpu_query: Optional[GpuQuery] = None


@dataclass(frozen=True)
class Detection:
    """profile: the profile name, or None when none fits; reasons: one evidence line each; facts: what was read."""

    profile: Optional[str]
    reasons: Tuple[str, ...]
    facts: Dict[str, Any] = field(default_factory=dict)
    warnings: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return {"profile": self.profile, "reasons": list(self.reasons), "warnings": list(self.warnings), "facts": dict(self.facts)}


def _read(root: Path, rel: str) -> Optional[str]:
    p = root / rel
    try:
        # Device-tree strings end in NUL (compatible holds several, NUL-separated).
        return p.read_bytes().decode("utf-8", errors="replace").replace("\x00", "\n").strip()
    except OSError:
        return None


def parse_tegra_release(text: str) -> Optional[str]:
    """'# R35 (release), REVISION: 4.1, GCID: ...' -> '35.4.1'; None when the line is not of that form."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", text)
    return f"{m.group(1)}.{m.group(2).rstrip('.')}" if m else None


def _release_key(l4t: str) -> str:
    """'36.4.0' -> '36.4', '35.1.0' -> '35.1', '36.4.4' unchanged: the release as NVIDIA names it."""
    parts = l4t.split(".")
    while len(parts) > 2 and parts[-1].strip("0") == "":
        parts.pop()
    return ".".join(parts)


def jetpack_for_l4t(l4t: str) -> Optional[str]:
    """JetPack for a Jetson Linux release: exact ('35.4.1' -> '5.1.2', '36.4.0' -> '6.1'); a release not in the
    table by major, saying so ('36.4.9' -> '6.x (L4T 36.4.9 not in the table)'), never a neighbouring release's
    JetPack (36.4.4 is 6.2.1, not 36.4's 6.1); None for an unknown major."""
    key = _release_key(l4t)
    if key in _JETPACK:
        return _JETPACK[key]
    major = _JETPACK_MAJOR.get(l4t.split(".")[0])
    return f"{major}.x (L4T {l4t} not in the table)" if major else None


def board_profile(model: str, compatible: str = "") -> Optional[str]:
    """The profile for a device-tree model string (then module part numbers in `compatible`), or None."""
    low = model.lower()
    for needle, name in _BOARDS:
        if needle in low:
            return name
    for needle, name in _MODULES:
        if needle in compatible.lower():
            return name
    return None


def query_gpus() -> Tuple[List[Dict[str, Optional[str]]], str]:
    """NVIDIA GPUs through NVML (pynvml where importable, else nvidia-smi). ([], why none) when there are none."""
    try:
        import pynvml  # optional; not a dependency of the device side
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                gpus: List[Dict[str, Optional[str]]] = []
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    name = pynvml.nvmlDeviceGetName(h)
                    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                    gpus.append({"name": name.decode() if isinstance(name, bytes) else str(name),
                                 "compute_capability": f"{major}.{minor}"})
                return gpus, "NVML (pynvml)"
            finally:
                pynvml.nvmlShutdown()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no usable NVIDIA driver
            nvml_reason = f"NVML failed ({exc})"
    else:
        nvml_reason = "pynvml is not importable"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], f"{nvml_reason} and nvidia-smi is not on PATH"
    for fields in ("name,compute_cap", "name"):  # compute_cap needs a recent driver
        try:
            r = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [], f"{nvml_reason}; nvidia-smi failed ({exc})"
        if r.returncode == 0:
            out = []
            for line in r.stdout.strip().splitlines():
                parts = [p.strip() for p in line.split(",")]
                out.append({"name": parts[0], "compute_capability": parts[1] if len(parts) > 1 else None})
            return out, "nvidia-smi"
    return [], f"{nvml_reason}; nvidia-smi found no GPU ({(r.stderr or r.stdout).strip()[:120]})"


def _cpu(root: Path) -> Dict[str, Any]:
    text = _read(root, "proc/cpuinfo") or ""
    flags: List[str] = []
    model = None
    cores = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "processor":
            cores += 1
        elif key in ("flags", "features") and not flags:  # x86 "flags", arm64 "Features"
            flags = value.split()
        elif key in ("model name", "hardware") and model is None:  # arm64 kernels may name the SoC in "Hardware"
            model = value.strip() or None
    vnni = [f for f in ("avx512_vnni", "avx_vnni") if f in flags]
    return {"model": model, "logical_cores": cores or None, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "vnni": vnni, "asimddp": "asimddp" in flags, "read": bool(text)}


def _cpu_line(cpu: Dict[str, Any], machine: str) -> str:
    if not cpu["read"]:
        return "CPU: /proc/cpuinfo is not readable"
    head = f"CPU: {cpu['model'] or machine}, {cpu['logical_cores']} logical cores"
    if machine in ("x86_64", "amd64", "i686", "i386"):
        vnni = (f"VNNI yes ({', '.join(cpu['vnni'])}): INT8 dot products in hardware" if cpu["vnni"]
                else "VNNI no (neither avx512_vnni nor avx_vnni in the flags): the int8-cpu variant's unsigned activations are what keep it fast here")
        return f"{head}; AVX2 {'yes' if cpu['avx2'] else 'no'}, AVX-512 {'yes' if cpu['avx512f'] else 'no'}, {vnni}"
    return f"{head}; dot-product instructions (asimddp) {'yes' if cpu['asimddp'] else 'no'}"


def detect(probe: Optional[Probe] = None) -> Detection:
    """Name the profile that fits, with the evidence for it (one line per source read)."""
    p = probe or Probe()
    root = Path(p.root)
    machine = (p.machine or platform.machine() or "unknown").lower()
    reasons: List[str] = []
    warnings: List[str] = []
    facts: Dict[str, Any] = {"machine": machine}
    cpu = _cpu(root)
    facts["cpu"] = cpu

    model = _read(root, "proc/device-tree/model")
    compatible = _read(root, "proc/device-tree/compatible") or ""
    release = _read(root, "etc/nv_tegra_release")
    if model is not None or release is not None:
        model_line = (model or "").splitlines()[0] if model else None
        facts.update(board=model_line, compatible=compatible.split() if compatible else [])
        l4t = parse_tegra_release(release) if release else None
        facts.update(l4t=l4t, jetpack=jetpack_for_l4t(l4t) if l4t else None)
        tegra = release is not None or "jetson" in (model or "").lower() or "nvidia,tegra" in compatible.lower()
        if tegra:
            name = board_profile(model or "", compatible)
            if model_line:
                reasons.append(f"/proc/device-tree/model: {model_line!r}" + (f" -> {name}" if name else " names no board edgeclf has a profile for"))
            else:
                reasons.append("/proc/device-tree/model is absent (a container without the device tree?)"
                               + (f"; /proc/device-tree/compatible -> {name}" if name else ""))
            if release is not None:
                reasons.append(f"/etc/nv_tegra_release: L4T {l4t} (JetPack {facts['jetpack'] or 'unknown'})" if l4t
                               else "/etc/nv_tegra_release is empty" if not release.strip("\x00 \t\r\n")
                               else f"/etc/nv_tegra_release is present but unreadable as a release line: {release.splitlines()[0][:80]!r}")
            reasons.append(_cpu_line(cpu, "aarch64"))  # every Jetson is arm64, also when --root reads one elsewhere
            if "p3767-0001" in compatible.lower():
                warnings.append("module p3767-0001 is the Orin NX 8GB: 6 CPU cores and 1 DLA core (the profile describes the 16GB); "
                                "use --dla 0 only and --threads 4")
            if name is None:
                reasons.append(f"no profile fits this Jetson; available Jetson profiles: {', '.join(n for _, n in _BOARDS[:5])}")
                return Detection(None, tuple(reasons), facts, tuple(warnings))
            if l4t:
                from edgeclf.devices import load_profile

                prof = load_profile(name)
                if prof.l4t and l4t.split(".")[0] != prof.l4t.split(".")[0]:
                    warnings.append(f"this board runs L4T {l4t} (JetPack {facts['jetpack']}) but {name} was written for L4T {prof.l4t} "
                                    f"(JetPack {prof.jetpack}, TensorRT {prof.tensorrt}): engines follow the TensorRT installed; "
                                    f"--print-trtexec takes --trt-version")
            return Detection(name, tuple(reasons), facts, tuple(warnings))
        reasons.append(f"/proc/device-tree/model: {model_line!r} is not a Jetson")
    else:
        reasons.append("no /proc/device-tree/model and no /etc/nv_tegra_release: not a Jetson")

    gpus, how = (p.gpu_query or query_gpus)()
    facts.update(gpus=gpus, gpu_query=how)
    reasons.append(_cpu_line(cpu, machine))
    if machine not in ("x86_64", "amd64", "i686", "i386"):
        reasons.append(f"machine {machine} is neither a Jetson nor x86: no profile fits; give --device")
        return Detection(None, tuple(reasons), facts, tuple(warnings))
    if gpus:
        listed = ", ".join(f"{g['name']} (compute {g.get('compute_capability') or 'unknown'})" for g in gpus)
        reasons.append(f"NVIDIA GPU(s) via {how}: {listed} -> x86-nvidia-gpu")
        return Detection("x86-nvidia-gpu", tuple(reasons), facts, tuple(warnings))
    reasons.append(f"no NVIDIA GPU: {how}")
    reasons.append(f"machine {machine} without an NVIDIA GPU -> x86-cpu")
    return Detection("x86-cpu", tuple(reasons), facts, tuple(warnings))
