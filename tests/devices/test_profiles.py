"""Device profiles: every shipped profile loads, errors name what is wrong, and the module stays stdlib-only."""

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
EXPORT_OPSET = 17  # edgeclf.export.onnx_export.OPSET: what TensorRT 8.6 (JetPack 5) parses


def _valid() -> Dict[str, Any]:
    return {
        "name": "test-board",
        "description": "a board for the tests",
        "accelerator": "cpu",
        "precisions": ["fp32"],
        "preferred_backends": ["ort-cpu"],
        "threads": None,
        "max_onnx_opset": 17,
        "notes": "",
    }


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
    assert {"x86-cpu", "x86-nvidia-gpu"} <= set(names)


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


@pytest.mark.parametrize("name", SHIPPED)
def test_max_onnx_opset_is_the_export_opset(name):
    assert load_profile(name).max_onnx_opset == EXPORT_OPSET


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


@pytest.mark.parametrize(
    "field", ["name", "description", "accelerator", "precisions", "preferred_backends", "max_onnx_opset"]
)
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
        import edgeclf.devices
        assert not any(m in sys.modules for m in ("numpy", "torch", "cv2")), sorted(sys.modules)
        if hasattr(sys, "stdlib_module_names"):
            new = {m.split(".")[0] for m in set(sys.modules) - before}
            extra = new - set(sys.stdlib_module_names) - {"edgeclf"}
            assert not extra, sorted(extra)
        edgeclf.devices.list_profiles()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert r.returncode == 0, r.stderr
