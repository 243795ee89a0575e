"""edgeclf.devices: device profiles shipped as JSON package data, readable with the 3.8 stdlib.

A profile feeds defaults (backend order, threads, precisions) into the runtime. Stdlib only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from edgeclf.errors import ConfigError

__all__ = ["DeviceProfile", "list_profiles", "load_profile", "PROFILE_DIR"]

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
_FIELDS = {"name", "description", "accelerator", "precisions", "preferred_backends", "threads", "max_onnx_opset", "notes"}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    accelerator: str  # "cpu" | "nvidia-gpu" | "jetson"
    precisions: Tuple[str, ...]
    preferred_backends: Tuple[str, ...]
    threads: Optional[int]  # None: the cores available to the process
    max_onnx_opset: int
    notes: str = ""

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str) -> DeviceProfile:
        unknown = sorted(set(d) - _FIELDS)
        missing = sorted(_FIELDS - {"notes", "threads"} - set(d))
        if unknown or missing:
            raise ConfigError(f"device profile {where}: unknown field(s) {unknown}, missing field(s) {missing}")
        return cls(
            name=str(d["name"]),
            description=str(d["description"]),
            accelerator=str(d["accelerator"]),
            precisions=tuple(str(p) for p in d["precisions"]),
            preferred_backends=tuple(str(b) for b in d["preferred_backends"]),
            threads=int(d["threads"]) if d.get("threads") else None,
            max_onnx_opset=int(d["max_onnx_opset"]),
            notes=str(d.get("notes", "")),
        )


def list_profiles() -> List[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name: str) -> DeviceProfile:
    path = PROFILE_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"device profile {name!r} is unknown; available: {', '.join(list_profiles())}")
    with open(path, encoding="utf-8") as f:
        prof = DeviceProfile.from_dict(json.load(f), path.name)
    if prof.name != name:
        raise ConfigError(f"device profile file {path.name} names itself {prof.name!r}")
    return prof
