"""tegrastats parsing (JetPack 4.x, 5.x, 6.x line formats), the background reader, nvpmodel and jetson_clocks,
and the profile's Jetson figures end to end with stand-in tools on PATH.

The lines below are written after the field formats in NVIDIA's tegrastats documentation (L4T 32 / JetPack 4:
rails as `NAME cur/avg` in mW without a unit; L4T 35 / JetPack 5: a date prefix, `GR3D_FREQ X%@[F,F]` and
`NAME curmW/avgmW`; L4T 36 / JetPack 6: `VDD_IN`, lower-case sensor names), not captured on a board.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from edgeclf.runtime.tegrastats import (
    TegrastatsReader,
    clocks_locked,
    nvpmodel_mode,
    parse_tegrastats_line,
    power_figure,
    total_power_mw,
)

JP4_NANO = ("RAM 2084/3964MB (lfb 2x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
            "CPU [3%@1479,1%@1479,off,0%@1479] EMC_FREQ 4%@1600 GR3D_FREQ 12%@921 APE 25 PLL@27C CPU@29.5C "
            "PMIC@100C GPU@28.5C AO@36C thermal@29C POM_5V_IN 2410/2380 POM_5V_GPU 120/110 POM_5V_CPU 407/400")
JP4_XAVIER = ("RAM 2447/7765MB (lfb 1124x4MB) SWAP 0/3883MB (cached 0MB) CPU [1%@1190,0%@1190,off,off,off,off] "
              "EMC_FREQ 0% GR3D_FREQ 0% AO@37C GPU@37.5C Tdiode@39C PMIC@100C AUX@36.5C CPU@38C thermal@37.35C Tboard@37C "
              "GPU 0/0 CPU 154/154 SOC 1231/1231 CV 0/0 VDDRQ 154/154 SYS5V 1085/1085")
JP5_ORIN = ("08-01-2022 20:20:36 RAM 2476/30536MB (lfb 6819x4MB) SWAP 0/15268MB (cached 0MB) "
            "CPU [0%@729,5%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 1%@2133 GR3D_FREQ 35%@[305,305] "
            "VIC_FREQ 729 APE 174 CV0@-256C CPU@43.781C Tboard@32C SOC2@40.781C Tdiode@33.75C SOC0@41.562C CV1@-256C "
            "GPU@44.5C tj@45.5C SOC1@40.687C CV2@-256C VDD_GPU_SOC 2384mW/2380mW VDD_CPU_CV 397mW/390mW "
            "VIN_SYS_5V0 2321mW/2320mW NC 0mW/0mW VDDQ_VDD2_1V8AO 302mW/300mW NC 0mW/0mW")
JP6_ORIN_NANO = ("11-23-2023 12:07:49 RAM 3437/7620MB (lfb 4x4MB) SWAP 0/3810MB (cached 0MB) "
                 "CPU [1%@729,0%@729,0%@729,0%@729,0%@729,0%@729] GR3D_FREQ 0% cpu@48.375C soc2@47.562C soc0@48.25C "
                 "gpu@47.968C tj@48.375C soc1@48.281C VDD_IN 4783mW/4700mW VDD_CPU_GPU_CV 517mW/510mW VDD_SOC 1433mW/1430mW")


def test_jetpack4_nano_line() -> None:
    s = parse_tegrastats_line(JP4_NANO)
    assert s is not None and s.time is None
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb, s.swap_total_mb) == (2084, 3964, 0, 1982)
    assert s.cpu_percent == [3, 1, None, 0] and s.cpu_mhz == [1479, 1479, None, 1479]
    assert (s.emc_percent, s.emc_mhz, s.gpu_percent, s.gpu_mhz) == (4, 1600, 12, [921])
    assert s.temperatures_c == {"PLL": 27.0, "CPU": 29.5, "PMIC": 100.0, "GPU": 28.5, "AO": 36.0, "thermal": 29.0}
    assert s.rails_mw == {"POM_5V_IN": (2410, 2380), "POM_5V_GPU": (120, 110), "POM_5V_CPU": (407, 400)}
    assert total_power_mw(s) == 2410.0  # the input rail, not the sum


def test_jetpack4_xavier_line_without_frequencies() -> None:
    s = parse_tegrastats_line(JP4_XAVIER)
    assert s is not None
    assert s.cpu_percent == [1, 0, None, None, None, None]
    assert (s.emc_percent, s.emc_mhz, s.gpu_percent, s.gpu_mhz) == (0, None, 0, [])
    assert s.temperatures_c["thermal"] == 37.35 and s.temperatures_c["Tboard"] == 37.0
    assert s.rails_mw == {"GPU": (0, 0), "CPU": (154, 154), "SOC": (1231, 1231), "CV": (0, 0), "VDDRQ": (154, 154),
                          "SYS5V": (1085, 1085)}
    assert total_power_mw(s) == 0 + 154 + 1231 + 0 + 154 + 1085  # no input rail: the sum


def test_jetpack5_orin_line() -> None:
    s = parse_tegrastats_line(JP5_ORIN)
    assert s is not None and s.time == "08-01-2022 20:20:36"
    assert s.ram_used_mb == 2476 and len(s.cpu_percent) == 8 and s.cpu_percent[1] == 5
    assert (s.emc_percent, s.emc_mhz, s.gpu_percent, s.gpu_mhz) == (1, 2133, 35, [305, 305])
    assert "CV0" not in s.temperatures_c  # -256C: sensor off
    assert s.temperatures_c["tj"] == 45.5 and s.temperatures_c["GPU"] == 44.5
    assert "NC" not in s.rails_mw and s.rails_mw["VDD_GPU_SOC"] == (2384, 2380)
    assert total_power_mw(s) == 2384 + 397 + 2321 + 302


def test_jetpack6_orin_nano_line() -> None:
    s = parse_tegrastats_line(JP6_ORIN_NANO)
    assert s is not None and s.time == "11-23-2023 12:07:49"
    assert s.cpu_percent == [1, 0, 0, 0, 0, 0] and s.emc_percent is None and s.gpu_percent == 0
    assert s.temperatures_c["gpu"] == 47.968 and s.temperatures_c["tj"] == 48.375
    assert s.rails_mw == {"VDD_IN": (4783, 4700), "VDD_CPU_GPU_CV": (517, 510), "VDD_SOC": (1433, 1430)}
    assert total_power_mw(s) == 4783.0
    d = s.to_dict()
    assert json.loads(json.dumps(d))["rails_mw"]["VDD_IN"] == {"current": 4783, "average": 4700}


def test_lines_without_fields_are_not_samples() -> None:
    assert parse_tegrastats_line("") is None
    assert parse_tegrastats_line("tegrastats: interval 100 ms") is None


def test_nvpmodel_and_jetson_clocks_outputs() -> None:
    assert nvpmodel_mode("NV Power Mode: MAXN\n0\n") == "MAXN"
    assert nvpmodel_mode("NVPM WARN: no mode") is None
    locked = "cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600\n" \
             "GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000\nEMC MinFreq=204000000 MaxFreq=3199000000"
    assert clocks_locked(locked) is False  # EMC still scales
    assert clocks_locked(locked.rsplit("\n", 1)[0]) is True
    assert clocks_locked("nothing here") is None


def _tool(folder: Path, name: str, body: str) -> None:
    p = folder / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_reader_runs_the_tool_in_the_background(tmp_path: Path) -> None:
    _tool(tmp_path, "tegrastats", f'while true; do echo "{JP6_ORIN_NANO}"; sleep 0.02; done')
    with TegrastatsReader(interval_ms=20, executable=str(tmp_path / "tegrastats")) as r:
        assert r.available
        import time

        deadline = time.monotonic() + 5
        while len(r.snapshot()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(r.samples) >= 3 and r.samples[0][1].rails_mw["VDD_IN"] == (4783, 4700)


def test_reader_without_the_tool_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no tegrastats
    with TegrastatsReader() as r:
        assert not r.available and r.reason is not None and "not on PATH" in r.reason
    assert r.samples == []


def test_profile_reports_jetson_figures_with_stand_in_tools(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hot line and unlocked clocks: energy per inference from VDD_IN, a thermal and a clocks warning."""
    import time

    from edgeclf.runtime.backends import FakeBackend
    from edgeclf.runtime.profile import ProfileOptions, ProfileTarget, profile_bundles

    hot = JP6_ORIN_NANO.replace("tj@48.375C", "tj@91.5C").replace("VDD_IN 4783mW/4700mW", "VDD_IN 5000mW/5000mW")
    _tool(tmp_path, "tegrastats", f'while true; do echo "{hot}"; sleep 0.02; done')
    _tool(tmp_path, "nvpmodel", 'echo "NV Power Mode: 15W"; echo 0')
    _tool(tmp_path, "jetson_clocks", 'echo "cpu0: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=1510400 CurrentFreq=729600"')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")

    def slow(x: np.ndarray) -> np.ndarray:
        time.sleep(0.01)
        return np.zeros((len(x), 3), np.float32)

    def factory(b, path, target, threads):  # type: ignore[no-untyped-def]
        return FakeBackend((1, 32, 32), 3, fn=slow)

    opts = ProfileOptions(source="synthetic:ultrasound?frames=40&size=64", frames=30, warmup=2, chunk=30, bootstrap=0,
                          sample_interval_s=0.02, infer_only=False)
    doc = profile_bundles([ProfileTarget(str(bundle_dir))], opts, backend_factory=factory).doc
    teg = doc["system"]["tegrastats"]
    assert teg["available"] and teg["samples"] > 0 and teg["temperatures_c_max"]["tj"] == 91.5
    assert teg["total_power_mw_mean"] == 5000.0
    assert doc["system"]["jetson"]["nvpmodel"] == {"available": True, "mode": "15W", "reason": None}
    assert doc["system"]["jetson"]["jetson_clocks"]["locked"] is False
    e = doc["targets"][0]["system"]["energy"]
    assert e["available"] and e["source"].startswith("tegrastats")
    assert e["energy_per_inference_mj"] == pytest.approx(5000.0 / doc["targets"][0]["fps"])
    assert any(w.startswith("thermal: tj reached 91.5") for w in doc["warnings"])
    assert any("jetson_clocks" in w for w in doc["warnings"])


def test_power_figure_says_whether_it_is_module_input_power() -> None:
    """VDD_IN / POM_5V_IN measure the module's input. AGX Orin reports no input rail: its figure is the sum of its
    rails, labelled as such and not as input power (the old label called every figure "total input power")."""
    nano = power_figure(parse_tegrastats_line(JP6_ORIN_NANO))  # type: ignore[arg-type]
    assert nano is not None and nano.module_input and nano.rails == ("VDD_IN",) and nano.mw == 4783.0
    assert nano.label == "VDD_IN (module input power)"
    jp4 = power_figure(parse_tegrastats_line(JP4_NANO))  # type: ignore[arg-type]
    assert jp4 is not None and jp4.module_input and jp4.rails == ("POM_5V_IN",)
    s = parse_tegrastats_line(JP5_ORIN)
    assert s is not None
    agx = power_figure(s)
    assert agx is not None and not agx.module_input
    assert agx.rails == ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO") and agx.mw == 2384 + 397 + 2321 + 302
    assert agx.label.startswith("sum of rails VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, VDDQ_VDD2_1V8AO (not module input power")
    d = json.loads(json.dumps(s.to_dict()))["power_figure"]
    assert d["module_input"] is False and d["rails"][2] == "VIN_SYS_5V0"
    no_rails = parse_tegrastats_line("RAM 1/2MB")
    assert no_rails is not None and power_figure(no_rails) is None and total_power_mw(no_rails) is None


def test_profile_on_agx_orin_does_not_call_the_rail_sum_input_power(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from edgeclf.runtime.backends import FakeBackend
    from edgeclf.runtime.profile import ProfileOptions, ProfileTarget, profile_bundles
    from tests.runtime.tiny_bundle import make_tiny_bundle

    tools = tmp_path / "bin"
    tools.mkdir()
    _tool(tools, "tegrastats", f'while true; do echo "{JP5_ORIN}"; sleep 0.02; done')
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ.get('PATH', '')}")
    bundle = make_tiny_bundle(tmp_path / "b")

    def slow(x: np.ndarray) -> np.ndarray:
        time.sleep(0.005)
        return np.zeros((len(x), 3), np.float32)

    def factory(b, path, target, threads):  # type: ignore[no-untyped-def]
        return FakeBackend((1, 8, 8), 3, fn=slow)

    opts = ProfileOptions(source="synthetic:ultrasound?frames=80&size=64", frames=60, warmup=2, chunk=60, bootstrap=0,
                          sample_interval_s=0.02, infer_only=False)
    doc = profile_bundles([ProfileTarget(str(bundle))], opts, backend_factory=factory).doc
    e = doc["targets"][0]["system"]["energy"]
    assert e["available"] and e["module_input_power"] is False
    assert e["source"].startswith("tegrastats sum of rails VDD_GPU_SOC") and "input power" not in e["source"].split("(")[0]
    assert e["power_mw_mean"] == 2384 + 397 + 2321 + 302
    assert doc["system"]["tegrastats"]["power_figure"]["module_input"] is False
    assert any("not the module's input power" in w for w in doc["warnings"])


# The line formats of NVIDIA's jetson_clocks script (2015-2023, tegra234 branch; a copy at e.g.
# https://github.com/rbonghi/jetson_stats/issues/323 quotes its do_emc paths): `sudo jetson_clocks` raises each CPU's
# and the GPU's MinFreq to MaxFreq, but locks the EMC through /sys/kernel/debug/bpmp/debug/clk/emc/mrq_rate_locked
# (shown as FreqOverride) and writes its max to `rate`, leaving its MinFreq low; DLA/PVA lines are shown, never set.
# Captured, unlocked (Orin, JetPack 5.0 DP; first lines, trailing blanks dropped), from
# https://github.com/rbonghi/jetson_stats/issues/381:
UNLOCKED_ORIN_CAPTURED = """SOC family:tegra234  Machine:NVIDIA Orin Jetson-Small Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=2201600 CurrentFreq=2112000 IdleStates: WFI=1 c7=1
cpu1: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=1 c7=1
"""
# Locked: written after the script's echo lines (no captured locked output was found); values of an AGX Orin.
LOCKED_ORIN = """SOC family:tegra234  Machine:Jetson AGX Orin Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
DLA0_CORE:   Online=1 MinFreq=0 MaxFreq=1600000000 CurrentFreq=1600000000
PVA0_VPS0: Online=1 MinFreq=0 MaxFreq=1152000000 CurrentFreq=1152000000
FAN Dynamic Speed control=active hwmon4_pwm=255
NV Power Mode: MAXN
"""


def test_locked_emc_override_counts_as_locked() -> None:
    assert clocks_locked(LOCKED_ORIN) is True


def test_unlocked_emc_and_cpus_are_not_locked() -> None:
    assert clocks_locked(UNLOCKED_ORIN_CAPTURED) is False
    unlocked_emc = LOCKED_ORIN.replace("CurrentFreq=3199000000 FreqOverride=1", "CurrentFreq=665600000 FreqOverride=0")
    assert clocks_locked(unlocked_emc) is False
    assert clocks_locked(LOCKED_ORIN.replace("FreqOverride=1", "FreqOverride=0")) is False  # at max now, not held there


def test_offline_cpus_are_skipped() -> None:
    offline = LOCKED_ORIN.replace("cpu1: Online=1 Governor=schedutil MinFreq=2201600", "cpu1: Online=0 Governor=schedutil MinFreq=115200")
    assert clocks_locked(offline) is True
