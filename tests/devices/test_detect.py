"""Device detection from sample files of each kind (device tree, L4T release, cpuinfo), NVML stand-ins, and
this machine."""
from __future__ import annotations

import os
import platform
import shutil
import stat
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from edgeclf.devices.detect import (
    Probe,
    board_profile,
    detect,
    jetpack_for_l4t,
    parse_tegra_release,
    query_gpus,
)

SAMPLES = Path(__file__).resolve().parent / "samples"


def no_gpu() -> Tuple[List[Dict[str, Optional[str]]], str]:
    return [], "pynvml is not importable and nvidia-smi is not on PATH"


def one_gpu() -> Tuple[List[Dict[str, Optional[str]]], str]:
    return [{"name": "NVIDIA RTX A2000", "compute_capability": "8.6"}], "NVML (pynvml)"


def _detect(sample: str, machine: str = "aarch64", gpus=no_gpu):
    return detect(Probe(root=SAMPLES / sample, machine=machine, gpu_query=gpus))


@pytest.mark.parametrize(("sample", "profile", "model"), [
    ("jetson-xavier-nx", "jetson-xavier-nx", "NVIDIA Jetson Xavier NX Developer Kit"),
    ("jetson-agx-xavier", "jetson-agx-xavier", "Jetson-AGX"),
    ("jetson-orin-nano", "jetson-orin-nano", "NVIDIA Jetson Orin Nano Developer Kit"),
    ("jetson-orin-nx", "jetson-orin-nx", "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"),
    ("jetson-agx-orin", "jetson-agx-orin", "NVIDIA Jetson AGX Orin Developer Kit"),
])
def test_each_board_is_detected_with_its_evidence(sample, profile, model):
    d = _detect(sample)
    assert d.profile == profile
    assert d.facts["board"] == model  # the trailing NUL of the device tree is gone
    assert any(r.startswith("/proc/device-tree/model:") and model in r and profile in r for r in d.reasons)
    assert any(r.startswith("/etc/nv_tegra_release: L4T 3") for r in d.reasons)
    assert d.warnings == ()  # each sample runs the JetPack its profile was written for
    assert d.to_dict()["profile"] == profile


def test_release_and_jetpack_are_read():
    assert _detect("jetson-xavier-nx").facts["l4t"] == "35.4.1" and _detect("jetson-xavier-nx").facts["jetpack"] == "5.1.2"
    d = _detect("jetson-orin-nano")
    assert (d.facts["l4t"], d.facts["jetpack"]) == ("36.4.0", "6.1")
    assert any("6 logical cores" in r and "asimddp) yes" in r for r in d.reasons)


def test_board_on_another_jetpack_is_detected_with_a_warning():
    d = _detect("jetson-agx-orin-jetpack5")
    assert d.profile == "jetson-agx-orin"
    (w,) = d.warnings
    assert "L4T 35.4.1 (JetPack 5.1.2)" in w and "TensorRT 10.3" in w and "--trt-version" in w


def test_orin_nx_8gb_module_is_named():
    d = _detect("jetson-orin-nx-8gb")
    assert d.profile == "jetson-orin-nx"
    assert any("p3767-0001" in w and "1 DLA core" in w for w in d.warnings)


def test_container_without_model_falls_back_to_compatible():
    d = _detect("jetson-container-no-model")
    assert d.profile == "jetson-orin-nano"
    assert any("model is absent" in r and "compatible -> jetson-orin-nano" in r for r in d.reasons)


def test_unsupported_jetson_names_no_profile_and_why():
    d = _detect("jetson-nano")
    assert d.profile is None
    assert any("Jetson Nano Developer Kit" in r and "no board" in r for r in d.reasons)
    assert any("JetPack 4.x" in r for r in d.reasons)
    assert any("available Jetson profiles" in r for r in d.reasons)


def test_other_arm_boards_are_not_jetsons():
    d = _detect("raspberry-pi", machine="aarch64")
    assert d.profile is None
    assert any("is not a Jetson" in r for r in d.reasons) and any("neither a Jetson nor x86" in r for r in d.reasons)


@pytest.mark.parametrize(("sample", "vnni"), [("x86-avx2", False), ("x86-vnni", True)])
def test_x86_cpu_and_its_vnni(sample, vnni):
    d = _detect(sample, machine="x86_64")
    assert d.profile == "x86-cpu"
    cpu_line = next(r for r in d.reasons if r.startswith("CPU:"))
    assert "4 logical cores" in cpu_line and "AVX2 yes" in cpu_line
    assert ("VNNI yes (avx512_vnni)" in cpu_line) is vnni and ("VNNI no" in cpu_line) is (not vnni)
    assert d.facts["cpu"]["vnni"] == (["avx512_vnni"] if vnni else [])
    assert "no NVIDIA GPU: pynvml is not importable and nvidia-smi is not on PATH" in d.reasons
    assert d.reasons[-1] == "machine x86_64 without an NVIDIA GPU -> x86-cpu"


def test_x86_with_an_nvidia_gpu():
    d = _detect("x86-avx2", machine="x86_64", gpus=one_gpu)
    assert d.profile == "x86-nvidia-gpu"
    assert d.reasons[-1] == "NVIDIA GPU(s) via NVML (pynvml): NVIDIA RTX A2000 (compute 8.6) -> x86-nvidia-gpu"


def test_empty_root_is_a_cpu_machine_with_unreadable_cpuinfo(tmp_path: Path):
    d = detect(Probe(root=tmp_path, machine="x86_64", gpu_query=no_gpu))
    assert d.profile == "x86-cpu" and "CPU: /proc/cpuinfo is not readable" in d.reasons


@pytest.mark.parametrize("content", [b"", b"\n", b"\x00", b"  \n\n"])
def test_an_empty_release_file_is_a_reason_not_a_crash(tmp_path: Path, content: bytes):
    """A container that touches /etc/nv_tegra_release or mounts a truncated one: said, no IndexError."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_bytes(content)
    d = detect(Probe(root=tmp_path, machine="aarch64", gpu_query=no_gpu))
    assert d.profile is None and "/etc/nv_tegra_release is empty" in d.reasons


@pytest.mark.parametrize(("text", "l4t", "jetpack"), [
    ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64", "35.4.1", "5.1.2"),
    ("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic", "36.4.3", "6.2"),
    ("# R36 (release), REVISION: 3.0, GCID: 1", "36.3.0", "6.0"),
    ("# R35 (release), REVISION: 9.9, GCID: 1", "35.9.9", "5.x (L4T 35.9.9 not in the table)"),
    ("# R32 (release), REVISION: 7.4, GCID: 1", "32.7.4", "4.x (L4T 32.7.4 not in the table)"),
    # Jetson Linux 36.4.4 ships with JetPack 6.2.1 (NVIDIA's JetPack archive), not 36.4's 6.1.
    ("# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64", "36.4.4", "6.2.1"),
    ("# R36 (release), REVISION: 4.0, GCID: 1", "36.4.0", "6.1"),
    ("# R35 (release), REVISION: 6.1, GCID: 1", "35.6.1", "5.1.5"),
    ("# R38 (release), REVISION: 2.1, GCID: 1", "38.2.1", "7.0"),
    ("# R38 (release), REVISION: 4.0, GCID: 1", "38.4.0", "7.1"),
])
def test_release_line_parsing(text, l4t, jetpack):
    assert parse_tegra_release(text) == l4t
    assert jetpack_for_l4t(l4t) == jetpack


@pytest.mark.parametrize("l4t", ["36.4.9", "36.4.5", "36.5.0", "35.6.9"])
def test_patch_release_not_in_the_table_is_not_given_a_neighbours_jetpack(l4t):
    # The old lookup fell back from 36.4.N to the 36.4 entry and reported JetPack 6.1 with confidence.
    major = l4t.split(".")[0]
    assert jetpack_for_l4t(l4t) == f"{int(major) - 30}.x (L4T {l4t} not in the table)"


def test_release_garbage_is_none():
    assert parse_tegra_release("hello") is None
    assert jetpack_for_l4t("99.1") is None


@pytest.mark.parametrize(("model", "compatible", "profile"), [
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "", "jetson-orin-nano"),
    ("Jetson AGX Orin", "", "jetson-agx-orin"),
    ("NVIDIA Jetson AGX Xavier", "", "jetson-agx-xavier"),
    ("", "nvidia,p3668-0001 nvidia,tegra194", "jetson-xavier-nx"),
    ("", "nvidia,p3701-0004 nvidia,tegra234", "jetson-agx-orin"),
    ("NVIDIA Jetson TX2", "nvidia,p3310 nvidia,tegra186", None),
])
def test_board_strings(model, compatible, profile):
    assert board_profile(model, compatible) == profile


def _fake_tool(folder: Path, name: str, script: str) -> None:
    p = folder / name
    p.write_text("#!/bin/sh\n" + script + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def test_nvidia_smi_is_asked_when_pynvml_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # import pynvml -> ImportError
    _fake_tool(tmp_path, "nvidia-smi", 'echo "NVIDIA L4, 8.9"; echo "Tesla T4, 7.5"')
    monkeypatch.setenv("PATH", str(tmp_path))
    gpus, how = query_gpus()
    assert how == "nvidia-smi"
    assert gpus == [{"name": "NVIDIA L4", "compute_capability": "8.9"}, {"name": "Tesla T4", "compute_capability": "7.5"}]


def test_no_pynvml_and_no_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert query_gpus() == ([], "pynvml is not importable and nvidia-smi is not on PATH")


def test_nvidia_smi_that_finds_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)
    _fake_tool(tmp_path, "nvidia-smi", 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."; exit 9')
    monkeypatch.setenv("PATH", str(tmp_path))
    gpus, how = query_gpus()
    assert gpus == [] and "nvidia-smi found no GPU" in how and "could not communicate" in how


def test_this_machine_is_x86_cpu_and_says_why():
    """Acceptance: on this project's CI machine (x86, no NVIDIA GPU) detect says x86-cpu, with the reasons."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"this machine is {platform.machine()}, not x86")
    if os.path.exists("/proc/device-tree/model") or os.path.exists("/etc/nv_tegra_release") or shutil.which("nvidia-smi"):
        pytest.skip("this machine has a device tree, an L4T release or nvidia-smi: not the CI machine")
    d = detect()
    if d.facts.get("gpus"):
        pytest.skip("NVML sees an NVIDIA GPU here")
    assert d.profile == "x86-cpu"
    assert d.reasons[0] == "no /proc/device-tree/model and no /etc/nv_tegra_release: not a Jetson"
    assert d.reasons[-1].endswith("without an NVIDIA GPU -> x86-cpu")
