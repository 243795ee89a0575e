"""sd_notify over a real unix datagram socket, the watchdog's rate limit, and the cart deployment files."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from edgeclf.devices.systemd import Notifier, sd_notify
from tests.conftest import notify_messages

DEPLOY = Path(__file__).resolve().parents[2] / "devices" / "deploy"


def test_sd_notify_sends_the_state(notify_socket: socket.socket):
    path = notify_socket.getsockname()
    assert sd_notify("READY=1", env={"NOTIFY_SOCKET": path}) is True
    assert notify_socket.recv(4096) == b"READY=1"


def test_sd_notify_without_systemd_does_nothing():
    assert sd_notify("READY=1", env={}) is False


def test_sd_notify_to_a_vanished_socket_only_warns(caplog: pytest.LogCaptureFixture):
    assert sd_notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "/nonexistent/notify"}) is False
    assert "WATCHDOG" in caplog.text


def test_abstract_socket_names_are_understood():
    name = f"edgeclf-test-{id(object())}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind("\0" + name)
        assert sd_notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        s.settimeout(2)
        assert s.recv(100) == b"READY=1"
    finally:
        s.close()


def test_notifier_pings_at_half_the_watchdog_interval(notify_socket: socket.socket):
    now = [100.0]
    n = Notifier(env={"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "4000000"}, clock=lambda: now[0])
    assert n.active and n.watchdog_s == 4.0
    assert n.ready("classifying") is True
    sent = [n.ping()]
    for t in (100.5, 101.9, 102.0, 103.0, 104.1):
        now[0] = t
        sent.append(n.ping())
    n.stopping()
    assert sent == [True, False, False, True, False, True]
    assert n.pings == 3
    assert notify_messages(notify_socket) == ["READY=1\nSTATUS=classifying", "WATCHDOG=1", "WATCHDOG=1", "WATCHDOG=1", "STOPPING=1"]


def test_notifier_is_inert_outside_systemd_and_for_other_pids(notify_socket: socket.socket):
    n = Notifier(env={})
    assert not n.active and n.ready() is False and n.ping() is False and n.stopping() is False
    other = Notifier(env={"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_s is None and other.ping() is False  # the watchdog is for PID 1's pings, not ours
    assert other.ready() is True  # READY still goes to the socket


def _unit() -> str:
    return (DEPLOY / "edgeclf-run.service").read_text(encoding="utf-8")


def test_unit_restarts_and_uses_the_watchdog():
    text = _unit()
    service = text.split("[Service]", 1)[1].split("[Install]", 1)[0]
    settings = dict(re.findall(r"^(\w+)=(.*)$", service, flags=re.M))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure" and settings["RestartSec"] == "5s" and settings["WatchdogSec"] == "30s"
    assert "edgeclf run --bundle" in settings["ExecStart"] and "build-engine" in settings["ExecStartPre"]
    assert "WantedBy=multi-user.target" in text


def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify also checks that the executables exist: point them at one that does.
    unit = tmp_path / "edgeclf-run.service"
    unit.write_text(_unit().replace("/opt/edgeclf/venv/bin/edgeclf", shutil.which("true") or "/bin/true"), encoding="utf-8")
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if "edgeclf-run.service" in ln]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


def test_systemd_analyze_catches_a_broken_unit(tmp_path: Path):
    # Proves the check above can fail: an unknown key is reported.
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = tmp_path / "edgeclf-run.service"
    unit.write_text(_unit().replace("/opt/edgeclf/venv/bin/edgeclf", "/bin/true").replace("RestartSec=", "RestartSecs="), encoding="utf-8")
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "RestartSecs" in r.stdout + r.stderr


def test_setup_script_is_valid_bash_and_keeps_the_system_opencv():
    script = DEPLOY / "setup-jetson.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = script.read_text(encoding="utf-8")
    assert "--system-site-packages" in text and "python3-libnvinfer" in text and "polygraphy" in text
    assert 'PACKAGE="edgeclf[ort,dicom]"' in text and "[cv" not in text.replace("no [cv] extra", "").replace("No [cv] extra", "")
    assert "Jetson_Zoo" in text  # where onnxruntime-gpu wheels for JetPack come from
    help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and "Usage:" in help_text.stdout


def test_setup_script_refuses_a_non_jetson(tmp_path: Path):
    if not Path("/etc/nv_tegra_release").exists() and subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0":
        r = subprocess.run(["bash", str(DEPLOY / "setup-jetson.sh")], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "not a Jetson" in r.stderr
    else:
        pytest.skip("needs root on a machine that is not a Jetson (it would otherwise install packages)")


def test_capture_card_notes_cover_the_basics():
    text = (DEPLOY / "capture-cards.md").read_text(encoding="utf-8")
    for needle in ("--list-formats-ext", "nvarguscamerasrc", "appsink drop=true max-buffers=1", "MJPG", "video"):
        assert needle in text
