"""Device profiles: every shipped profile loads, the Jetson facts hold, errors name what is wrong, and the
module stays stdlib-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import pytest

import edgeclf.devices as devices
from edgeclf.devices import DeviceProfile, list_profiles, load_profile
from edgeclf.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (REPO / "devices" / "profiles").glob("*.json"))
EXPORT_OPSET = 17  # edgeclf.export.onnx_export.OPSET: what TensorRT 8.5/8.6 (JetPack 5) parses
REQUIRED = ["name", "description", "accelerator", "compute_capability", "cpu_cores", "precisions", "dla_cores", "workspace_mb",
            "memory_budget_mb", "preferred_backends", "max_onnx_opset", "gstreamer", "power_modes", "jetpack", "l4t", "tensorrt"]
JETSONS = ["jetson-xavier-nx", "jetson-agx-xavier", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"]


def _valid() -> Dict[str, Any]:
    return {
        "name": "test-board",
        "description": "a board for the tests",
        "accelerator": "cpu",
        "compute_capability": None,
        "cpu_cores": None,
        "precisions": ["fp32"],
        "dla_cores": 0,
        "workspace_mb": None,
        "memory_budget_mb": None,
        "preferred_backends": ["ort-cpu"],
        "threads": None,
        "max_onnx_opset": 17,
        "gstreamer": {"csi": None, "usb": "v4l2src device={device} ! videoconvert ! appsink"},
        "power_modes": [],
        "jetpack": None,
        "l4t": None,
        "tensorrt": None,
        "notes": "",
    }


def _jetson() -> Dict[str, Any]:
    return {**_valid(), "accelerator": "jetson", "compute_capability": "8.7", "dla_cores": 2, "workspace_mb": 1024,
            "preferred_backends": ["trt", "ort-cpu"], "jetpack": "6.1", "l4t": "36.4", "tensorrt": "10.3",
            "power_modes": [{"id": 0, "name": "MAXN"}]}


@pytest.fixture
def profile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(devices, "PROFILE_DIR", tmp_path)
    return tmp_path


def _write(folder: Path, stem: str, data: Dict[str, Any]) -> None:
    (folder / f"{stem}.json").write_text(json.dumps(data), encoding="utf-8")


def test_profiles_are_shipped_and_listed_sorted():
    assert SHIPPED, "no profiles found under devices/profiles"
    names = list_profiles()
    assert names == sorted(names)
    assert names == SHIPPED
    assert {"x86-cpu", "x86-nvidia-gpu", *JETSONS} <= set(names)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_and_names_its_file(name):
    prof = load_profile(name)
    assert isinstance(prof, DeviceProfile)
    assert prof.name == name
    assert prof.description and prof.accelerator
    assert prof.precisions and prof.preferred_backends
    assert prof.threads is None or prof.threads > 0
    raw = json.loads((REPO / "devices" / "profiles" / f"{name}.json").read_text(encoding="utf-8"))
    assert raw["name"] == name


@pytest.mark.parametrize("name", SHIPPED)
def test_preferred_backends_are_known(name):
    from edgeclf.runtime.backends import BACKENDS

    prof = load_profile(name)
    assert set(prof.preferred_backends) <= set(BACKENDS), prof.preferred_backends
    assert len(set(prof.preferred_backends)) == len(prof.preferred_backends)


def test_devices_backend_names_match_the_runtime():
    from edgeclf.runtime.backends import BACKENDS

    assert set(devices.BACKEND_NAMES) == set(BACKENDS)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_profile_parses_the_exported_opset(name):
    # Bundles are opset 17; a profile whose TensorRT parses less could not run any bundle.
    assert load_profile(name).max_onnx_opset >= EXPORT_OPSET


# Facts from NVIDIA's module data sheets and JetPack release notes (see the profiles' notes):
# compute capability 7.2 (Volta, Xavier) / 8.7 (Ampere, Orin); DLA cores; JetPack 5 = TensorRT 8.5.2 (ONNX opset <= 17),
# JetPack 6.1 = TensorRT 10.3 (opsets 9-20).
@pytest.mark.parametrize(("name", "cc", "dla", "cores", "trt", "opset"), [
    ("jetson-xavier-nx", "7.2", 2, 6, "8.5.2", 17),
    ("jetson-agx-xavier", "7.2", 2, 8, "8.5.2", 17),
    ("jetson-orin-nano", "8.7", 0, 6, "10.3", 20),
    ("jetson-orin-nx", "8.7", 2, 8, "10.3", 20),
    ("jetson-agx-orin", "8.7", 2, 12, "10.3", 20),
])
def test_jetson_profiles_state_the_board(name, cc, dla, cores, trt, opset):
    p = load_profile(name)
    assert (p.accelerator, p.compute_capability, p.dla_cores, p.cpu_cores, p.tensorrt, p.max_onnx_opset) == (
        "jetson", cc, dla, cores, trt, opset)
    assert p.preferred_backends[0] == "trt" and p.preferred_backends[-1] == "ort-cpu"
    assert set(p.precisions) == {"fp32", "fp16", "int8"}
    assert p.workspace_mb and p.memory_budget_mb and p.threads and p.threads < cores  # leaves cores to capture
    assert p.power_modes and len({m.id for m in p.power_modes}) == len(p.power_modes)
    assert "nvarguscamerasrc" in str(p.gstreamer["csi"]) and "v4l2src" in str(p.gstreamer["usb"])
    assert p.l4t and p.jetpack and p.l4t.split(".")[0] == ("35" if p.tensorrt.startswith("8.") else "36")


def test_orin_nx_notes_the_8gb_module():
    assert "1 DLA core" in load_profile("jetson-orin-nx").notes


def test_x86_profiles():
    cpu, gpu = load_profile("x86-cpu"), load_profile("x86-nvidia-gpu")
    assert cpu.preferred_backends == ("ort-cpu",) and cpu.dla_cores == 0 and cpu.tensorrt is None and cpu.gstreamer["csi"] is None
    # export --precision auto --device x86-nvidia-gpu plans for the first backend: the ONNX Runtime TensorRT provider.
    assert gpu.preferred_backends[0] == "ort-tensorrt" and "trt" in gpu.preferred_backends
    assert gpu.compute_capability is None and gpu.tensorrt_major == 8


@pytest.mark.parametrize("name", SHIPPED)
def test_to_dict_round_trips(name):
    p = load_profile(name)
    assert DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict())), "x") == p
    raw = json.loads((REPO / "devices" / "profiles" / f"{name}.json").read_text(encoding="utf-8"))
    assert p.to_dict() == {**raw, "threads": raw.get("threads"), "notes": raw.get("notes", "")}


def test_capture_pipeline_fills_the_template():
    p = load_profile("jetson-orin-nano")
    csi = p.capture_pipeline("csi", sensor_id=1, width=1280, height=720, fps=60)
    assert csi.startswith("nvarguscamerasrc sensor-id=1 ") and "width=1280,height=720,framerate=60/1" in csi
    assert csi.endswith("appsink drop=true max-buffers=1")
    assert "device=/dev/video2" in p.capture_pipeline("usb", device="/dev/video2")
    with pytest.raises(ConfigError, match="no csi capture"):
        load_profile("x86-cpu").capture_pipeline("csi")
    with pytest.raises(ConfigError, match="allowed: csi, usb"):
        p.capture_pipeline("hdmi")


def test_export_opset_constant_matches():
    onnx_export = pytest.importorskip("edgeclf.export.onnx_export")
    assert onnx_export.OPSET == EXPORT_OPSET


def test_unknown_profile_lists_the_available_ones_on_one_line():
    with pytest.raises(ConfigError) as info:
        load_profile("no-such-board")
    msg = str(info.value)
    assert "\n" not in msg
    assert "no-such-board" in msg
    for name in SHIPPED:
        assert name in msg


def test_tmp_profile_dir_loads(profile_dir):
    _write(profile_dir, "test-board", {**_valid(), "threads": 4})
    _write(profile_dir, "a-board", {**_valid(), "name": "a-board"})
    assert list_profiles() == ["a-board", "test-board"]
    prof = load_profile("test-board")
    assert prof.threads == 4 and prof.preferred_backends == ("ort-cpu",) and prof.precisions == ("fp32",)


def test_jetson_profile_loads(profile_dir):
    _write(profile_dir, "test-board", _jetson())
    prof = load_profile("test-board")
    assert prof.dla_cores == 2 and prof.tensorrt_major == 10 and prof.power_modes[0].name == "MAXN"


@pytest.mark.parametrize(("edit", "needle"), [
    ({"dla_cores": -1}, "dla_cores"),
    ({"dla_cores": "two"}, "dla_cores"),
    ({"compute_capability": 8.7}, "compute_capability"),
    ({"precisions": ["fp32", "bf16"]}, "precisions"),
    ({"preferred_backends": ["tensorrt"]}, "preferred_backends"),
    ({"accelerator": "tpu"}, "accelerator"),
    ({"gstreamer": {"csi": None}}, "gstreamer"),
    ({"gstreamer": {"csi": None, "usb": "v4l2src ! fakesink"}}, "gstreamer.usb"),
    ({"power_modes": [{"id": "0", "name": "MAXN"}]}, "power_modes[0]"),
    ({"tensorrt": "ten"}, "tensorrt"),
    ({"workspace_mb": 0}, "workspace_mb"),
])
def test_bad_values_are_named(profile_dir, edit, needle):
    _write(profile_dir, "test-board", {**_jetson(), **edit})
    with pytest.raises(ConfigError) as info:
        load_profile("test-board")
    msg = str(info.value)
    assert needle in msg and "test-board.json" in msg and "\n" not in msg


def test_dla_only_on_jetson_and_jetson_names_its_software(profile_dir):
    _write(profile_dir, "test-board", {**_valid(), "dla_cores": 1})
    with pytest.raises(ConfigError, match="only Jetson modules have DLA cores"):
        load_profile("test-board")
    _write(profile_dir, "test-board", {**_jetson(), "tensorrt": None})
    with pytest.raises(ConfigError, match="compute_capability, tensorrt and l4t"):
        load_profile("test-board")
    _write(profile_dir, "test-board", {**_jetson(), "workspace_mb": None})
    with pytest.raises(ConfigError, match="workspace_mb is null but the profile prefers TensorRT"):
        load_profile("test-board")


def test_invalid_json_is_one_line(profile_dir):
    (profile_dir / "test-board.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="test-board.json is not valid JSON"):
        load_profile("test-board")


@pytest.mark.parametrize("optional", ["notes", "threads"])
def test_optional_fields_may_be_omitted(profile_dir, optional):
    data = _valid()
    del data[optional]
    _write(profile_dir, "test-board", data)
    prof = load_profile("test-board")
    assert prof.notes == "" and prof.threads is None


def test_unknown_field_is_named(profile_dir):
    _write(profile_dir, "test-board", {**_valid(), "clock_mhz": 1400})
    with pytest.raises(ConfigError) as info:
        load_profile("test-board")
    msg = str(info.value)
    assert "clock_mhz" in msg and "test-board.json" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_field_is_named(profile_dir, field):
    data = _valid()
    del data[field]
    _write(profile_dir, "test-board", data)
    with pytest.raises(ConfigError) as info:
        load_profile("test-board")
    msg = str(info.value)
    assert repr(field) in msg and "test-board.json" in msg
    assert "\n" not in msg


def test_profile_whose_name_differs_from_its_file_is_rejected(profile_dir):
    _write(profile_dir, "test-board", {**_valid(), "name": "other-board"})
    with pytest.raises(ConfigError) as info:
        load_profile("test-board")
    assert "other-board" in str(info.value) and "test-board.json" in str(info.value)


def test_unknown_name_in_tmp_dir_lists_its_profiles(profile_dir):
    _write(profile_dir, "test-board", _valid())
    with pytest.raises(ConfigError) as info:
        load_profile("x86-cpu")
    assert "available: test-board" in str(info.value)


def test_module_imports_only_the_stdlib():
    code = textwrap.dedent(
        """
        import sys
        before = set(sys.modules)
        import edgeclf.devices, edgeclf.devices.detect, edgeclf.devices.systemd
        assert not any(m in sys.modules for m in ("numpy", "torch", "cv2", "pynvml")), sorted(sys.modules)
        if hasattr(sys, "stdlib_module_names"):
            new = {m.split(".")[0] for m in set(sys.modules) - before}
            extra = new - set(sys.stdlib_module_names) - {"edgeclf"}
            assert not extra, sorted(extra)
        edgeclf.devices.list_profiles()
        edgeclf.devices.detect.detect()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert r.returncode == 0, r.stderr
