"""edgeclf.devices: device profiles shipped as JSON package data, readable with the 3.8 stdlib.

A profile feeds defaults (backend order, threads, precisions, engine workspace, DLA) into the runtime
and records the JetPack/TensorRT it was written for. Stdlib only: detection (`edgeclf.devices.detect`)
and the systemd notifier (`edgeclf.devices.systemd`) too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from edgeclf.errors import ConfigError

__all__ = ["DeviceProfile", "PowerMode", "list_profiles", "load_profile", "PROFILE_DIR", "ACCELERATORS", "BACKEND_NAMES",
           "PRECISIONS"]

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
ACCELERATORS = ("cpu", "nvidia-gpu", "jetson")
PRECISIONS = ("fp32", "fp16", "int8")
# The runtime's backend names (edgeclf.runtime.backends.BACKENDS; a test keeps the two equal).
BACKEND_NAMES = ("trt", "ort-tensorrt", "ort-cuda", "ort-cpu")
_REQUIRED = ("name", "description", "accelerator", "compute_capability", "cpu_cores", "precisions", "dla_cores",
             "workspace_mb", "memory_budget_mb", "preferred_backends", "max_onnx_opset", "gstreamer", "power_modes",
             "jetpack", "l4t", "tensorrt")
_OPTIONAL = ("threads", "notes")  # older profiles may leave these out
_FIELDS = set(_REQUIRED) | set(_OPTIONAL)
_GSTREAMER_KEYS = ("csi", "usb")
_VERSION = re.compile(r"^\d+(\.\d+)*$")


@dataclass(frozen=True)
class PowerMode:
    """An nvpmodel mode: `sudo nvpmodel -m ID` selects it, `nvpmodel -q` shows the current one."""

    id: int
    name: str


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    accelerator: str  # "cpu" | "nvidia-gpu" | "jetson"
    compute_capability: Optional[str]  # "7.2" (Xavier), "8.7" (Orin); None: depends on the GPU fitted (asked from NVML)
    cpu_cores: Optional[int]  # None: whatever the machine has
    precisions: Tuple[str, ...]
    dla_cores: int
    workspace_mb: Optional[int]  # TensorRT builder workspace; None on devices without TensorRT
    memory_budget_mb: Optional[int]  # what edgeclf may take of the (on Jetson: shared CPU/GPU) memory
    preferred_backends: Tuple[str, ...]
    threads: Optional[int]  # None: the cores available to the process
    max_onnx_opset: int  # the newest opset the profile's TensorRT (or ONNX Runtime) parses
    gstreamer: Mapping[str, Optional[str]]  # capture templates: "csi" (nvarguscamerasrc), "usb" (v4l2src)
    power_modes: Tuple[PowerMode, ...]
    jetpack: Optional[str]  # the JetPack the profile was written for
    l4t: Optional[str]  # its Jetson Linux (L4T) release, as /etc/nv_tegra_release reports it
    tensorrt: Optional[str]  # the TensorRT version the profile was written for (trtexec flags follow it)
    notes: str = ""

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str) -> DeviceProfile:
        """Validate a profile's JSON object; every error names the file and the dotted key."""
        if not isinstance(d, dict):
            raise ConfigError(f"device profile {where} must hold a JSON object")
        unknown = sorted(set(d) - _FIELDS)
        missing = sorted(set(_REQUIRED) - set(d))
        if unknown or missing:
            raise ConfigError(f"device profile {where}: unknown field(s) {unknown}, missing field(s) {missing}; "
                              f"allowed: {sorted(_FIELDS)}")

        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"device profile {where}: {key} is {d.get(key.split('.')[0])!r}; expected {expected}")

        def count(key: str, *, nullable: bool, minimum: int = 0) -> Optional[int]:
            v = d.get(key)
            if v is None and nullable:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise bad(key, f"a whole number >= {minimum}" + (" or null" if nullable else ""))
            return int(v)

        def text(key: str, *, nullable: bool = False, pattern: Any = None) -> Optional[str]:  # pattern: a compiled re
            v = d.get(key)
            if v is None and nullable:
                return None
            if not isinstance(v, str) or not v or (pattern is not None and not pattern.match(v)):
                raise bad(key, ("a version such as '8.7'" if pattern is not None else "a non-empty string") + (" or null" if nullable else ""))
            return v

        def names(key: str, allowed: Tuple[str, ...]) -> Tuple[str, ...]:
            v = d.get(key)
            if not isinstance(v, list) or not v or any(x not in allowed for x in v) or len(set(v)) != len(v):
                raise bad(key, f"a non-empty list without repeats of {', '.join(allowed)}")
            return tuple(str(x) for x in v)

        accelerator = text("accelerator")
        if accelerator not in ACCELERATORS:
            raise bad("accelerator", f"one of {', '.join(ACCELERATORS)}")
        gst = d.get("gstreamer")
        if not isinstance(gst, dict) or set(gst) != set(_GSTREAMER_KEYS):
            raise ConfigError(f"device profile {where}: gstreamer is {gst!r}; expected an object with exactly the keys "
                              f"{', '.join(_GSTREAMER_KEYS)} (a pipeline ending in appsink, or null)")
        for k, v in gst.items():
            if v is not None and (not isinstance(v, str) or "appsink" not in v):
                raise ConfigError(f"device profile {where}: gstreamer.{k} is {v!r}; expected a pipeline ending in appsink, or null")
        modes = d.get("power_modes")
        if not isinstance(modes, list):
            raise bad("power_modes", "a list of {\"id\": int, \"name\": str}")
        power: List[PowerMode] = []
        for i, m in enumerate(modes):
            if (not isinstance(m, dict) or set(m) != {"id", "name"} or isinstance(m["id"], bool) or not isinstance(m["id"], int)
                    or not isinstance(m["name"], str)):
                raise ConfigError(f"device profile {where}: power_modes[{i}] is {m!r}; expected {{\"id\": int, \"name\": str}}")
            power.append(PowerMode(int(m["id"]), str(m["name"])))
        prof = cls(
            name=str(text("name")),
            description=str(text("description")),
            accelerator=str(accelerator),
            compute_capability=text("compute_capability", nullable=True, pattern=_VERSION),
            cpu_cores=count("cpu_cores", nullable=True, minimum=1),
            precisions=names("precisions", PRECISIONS),
            dla_cores=int(count("dla_cores", nullable=False) or 0),
            workspace_mb=count("workspace_mb", nullable=True, minimum=1),
            memory_budget_mb=count("memory_budget_mb", nullable=True, minimum=1),
            preferred_backends=names("preferred_backends", BACKEND_NAMES),
            threads=count("threads", nullable=True, minimum=1),
            max_onnx_opset=int(count("max_onnx_opset", nullable=False, minimum=1) or 0),
            gstreamer={k: gst[k] for k in _GSTREAMER_KEYS},
            power_modes=tuple(power),
            jetpack=text("jetpack", nullable=True, pattern=_VERSION),
            l4t=text("l4t", nullable=True, pattern=_VERSION),
            tensorrt=text("tensorrt", nullable=True, pattern=_VERSION),
            notes=str(d.get("notes") or ""),
        )
        if prof.dla_cores and prof.accelerator != "jetson":
            raise ConfigError(f"device profile {where}: dla_cores is {prof.dla_cores}; only Jetson modules have DLA cores")
        if prof.accelerator == "jetson" and (prof.compute_capability is None or prof.tensorrt is None or prof.l4t is None):
            raise ConfigError(f"device profile {where}: a Jetson profile names its compute_capability, tensorrt and l4t")
        if {"trt", "ort-tensorrt"} & set(prof.preferred_backends) and prof.workspace_mb is None:
            raise ConfigError(f"device profile {where}: workspace_mb is null but the profile prefers TensorRT; give the builder workspace in MiB")
        return prof

    def to_dict(self) -> Dict[str, Any]:
        """The profile as its JSON file spells it."""
        return {
            "name": self.name, "description": self.description, "accelerator": self.accelerator,
            "compute_capability": self.compute_capability, "cpu_cores": self.cpu_cores, "precisions": list(self.precisions),
            "dla_cores": self.dla_cores, "workspace_mb": self.workspace_mb, "memory_budget_mb": self.memory_budget_mb,
            "preferred_backends": list(self.preferred_backends), "threads": self.threads, "max_onnx_opset": self.max_onnx_opset,
            "gstreamer": dict(self.gstreamer), "power_modes": [{"id": m.id, "name": m.name} for m in self.power_modes],
            "jetpack": self.jetpack, "l4t": self.l4t, "tensorrt": self.tensorrt, "notes": self.notes,
        }

    @property
    def tensorrt_major(self) -> Optional[int]:
        return int(self.tensorrt.split(".")[0]) if self.tensorrt else None

    def capture_pipeline(self, kind: str = "usb", *, device: str = "/dev/video0", sensor_id: int = 0, width: int = 1920,
                         height: int = 1080, fps: int = 30) -> str:
        """The profile's GStreamer template for `kind` ("csi" or "usb") filled in; give it to `edgeclf run --source`."""
        if kind not in _GSTREAMER_KEYS:
            raise ConfigError(f"capture kind {kind!r} is unknown; allowed: {', '.join(_GSTREAMER_KEYS)}")
        template = self.gstreamer.get(kind)
        if template is None:
            raise ConfigError(f"device profile {self.name} has no {kind} capture (no {'CSI camera connector' if kind == 'csi' else 'template'}); "
                              f"use {'usb' if kind == 'csi' else 'a device path'} instead")
        return template.format(device=device, sensor_id=sensor_id, width=width, height=height, fps=fps)


def list_profiles() -> List[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name: str) -> DeviceProfile:
    path = PROFILE_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"device profile {name!r} is unknown; available: {', '.join(list_profiles())}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as exc:
        raise ConfigError(f"device profile {path.name} is not valid JSON ({exc}); fix or remove it") from None
    prof = DeviceProfile.from_dict(raw, path.name)
    if prof.name != name:
        raise ConfigError(f"device profile file {path.name} names itself {prof.name!r}")
    return prof
