"""sd_notify over a real unix datagram socket, the watchdog's rate limit, and the cart deployment files."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from edgeclf.devices.systemd import Notifier, sd_notify
from tests.conftest import notify_messages, run_cli

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
    assert 'PACKAGE="$SOURCE[ort,dicom,sign]"' in text and "[cv" not in text.replace("no [cv] extra", "").replace("No [cv] extra", "")
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


# --------------------------------------------------------------------------- the unit as systemd renders it

_LIST_KEYS = ("ExecStartPre", "ExecStart", "Environment")  # an empty assignment resets these (systemd.service(5))


def _entries(text: str) -> List[Tuple[str, str, str]]:
    """(section, key, value) of a unit or drop-in, in order; comments dropped, continuation lines joined."""
    out, section = [], ""
    for line in text.replace("\\\n", " ").splitlines():
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("["):
            section = s.strip("[]")
            continue
        key, _, value = s.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _render(dropin: str = "") -> Dict[str, Any]:
    """The unit plus a drop-in, as systemd applies them: Environment= (later wins), ExecStart*= lists (an empty
    assignment clears), ${VAR} in a command replaced by the exact value as one argument (systemd.service(5))."""
    settings: Dict[str, List[str]] = {}
    unit_section: Dict[str, List[str]] = {}
    for text in (_unit(), dropin):
        for section, key, value in _entries(text):
            target = settings if section == "Service" else unit_section
            if key in _LIST_KEYS and value == "":
                target[key] = []
            else:
                target.setdefault(key, []).append(value)
    env: Dict[str, str] = {}
    for value in settings.get("Environment", []):
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val

    def argv(cmd: str) -> List[str]:
        return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word) for word in shlex.split(cmd)]

    return {"pre": [argv(c) for c in settings.get("ExecStartPre", [])], "start": [argv(c) for c in settings.get("ExecStart", [])],
            "env": env, "service": settings, "unit": unit_section}


def _header_dropin(after: str) -> str:
    """The drop-in the unit's header shows after the comment line containing `after` (lines '#   ...')."""
    lines = _unit().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("#") and after in ln) + 1
    block = []
    for ln in lines[start:]:
        if not ln.startswith("#   "):
            break
        block.append(ln[4:])
    assert block and block[0] == "[Service]", block
    return "\n".join(block) + "\n"


def _run_params(argv: List[str]) -> Dict[str, Any]:
    """`edgeclf run` options as the CLI parses the unit's command line (an unknown option fails here)."""
    from edgeclf.cli import run as run_command

    assert argv[0] == "/opt/edgeclf/venv/bin/edgeclf" and argv[1] == "run", argv
    return dict(run_command.make_context("run", list(argv[2:])).params)


def _local(argv: List[str], bundle: Path, state: Path, source: str) -> List[str]:
    """The unit's `edgeclf run` arguments with the cart's paths moved here."""
    args = [a.replace("/opt/edgeclf/bundle", str(bundle)).replace("/var/lib/edgeclf", str(state)) for a in argv[1:]]
    args[args.index("--source") + 1] = source
    return args


def test_on_a_jetson_the_unit_lets_the_device_profile_pick_trt_and_builds_that_engine_first():
    from edgeclf.devices import load_profile

    r = _render()
    (pre,), (start,) = r["pre"], r["start"]
    params = _run_params(start)
    assert params["backend"] is None  # an explicit --backend would override every profile, x86 ones included
    assert params["device"] == "jetson-orin-nx" and load_profile(params["device"]).preferred_backends[0] == "trt"
    assert pre[1] == "build-engine" and pre[pre.index("--device") + 1] == params["device"]
    assert r["env"]["EDGECLF_ENGINE_CACHE"].startswith("/var/cache/" + r["service"]["CacheDirectory"][0] + "/")


def test_the_x86_instructions_in_the_unit_header_give_a_runnable_command(tmp_path: Path):
    pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    from edgeclf.runtime.app import resolve_backend
    from tests.runtime.tiny_bundle import make_tiny_bundle

    r = _render(_header_dropin("On an x86 cart"))
    assert r["pre"] == []  # no TensorRT engine build
    (start,) = r["start"]
    params = _run_params(start)
    assert params["device"] == "x86-cpu" and resolve_backend(params["backend"], params["device"])[0] == "ort-cpu"
    bundle = make_tiny_bundle(tmp_path / "bundle")
    done = run_cli(*_local(start, bundle, tmp_path / "state", "synthetic:ultrasound?frames=4&size=64"), "--json")
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "state" / "results.jsonl").read_text().splitlines()) == 4


def test_the_csi_example_in_the_unit_header_passes_the_profiles_pipeline_as_one_source():
    from edgeclf.devices import load_profile

    r = _render(_header_dropin("write a % in a source as %%"))
    params = _run_params(r["start"][0])
    assert params["source"] == load_profile(params["device"]).capture_pipeline("csi")


def test_the_unit_lets_csi_capture_reach_nvargus_daemon():
    """nvarguscamerasrc (the profiles' csi capture) is a libargus client of nvargus-daemon over /tmp/argus_socket;
    PrivateTmp=yes would give the service an empty /tmp of its own."""
    from edgeclf.devices import load_profile

    assert "nvarguscamerasrc" in load_profile("jetson-orin-nx").capture_pipeline("csi")
    r = _render()
    private = [v.lower() for v in r["service"].get("PrivateTmp", [])]
    assert not private or private[-1] in ("no", "false", "0", "off")
    assert "nvargus-daemon.service" in " ".join(r["unit"].get("After", []))


def test_a_restart_of_the_unit_keeps_the_earlier_results(tmp_path: Path):
    """Restart=on-failure (crash, watchdog kill) and reboots start the same command on the same --out."""
    pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    from edgeclf.runtime.sinks import read_jsonl
    from tests.runtime.tiny_bundle import make_tiny_bundle

    r = _render(_header_dropin("On an x86 cart"))
    assert r["service"]["Restart"] == ["on-failure"]
    args = _local(r["start"][0], make_tiny_bundle(tmp_path / "bundle"), tmp_path / "state", "synthetic:ultrasound?frames=5&size=64")
    out = tmp_path / "state" / "results.jsonl"
    for start in range(2):
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr
        if start == 0:
            with out.open("ab") as f:
                f.write(b'{"run":"x","frame":5,"labe')  # the power went mid-line
    recs, torn = read_jsonl(out)
    runs = [rec["run"] for rec in recs]
    assert torn == 0 and len(recs) == 10 and len(set(runs)) == 2 and runs[:5] == [runs[0]] * 5
    assert "cut off 1 torn line(s)" in done.stderr  # logged, never silent


def test_the_unit_with_the_x86_dropin_passes_systemd_analyze_verify(tmp_path: Path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    (tmp_path / "edgeclf-run.service").write_text(_unit().replace("/opt/edgeclf/venv/bin/edgeclf", shutil.which("true") or "/bin/true"),
                                                  encoding="utf-8")
    (tmp_path / "edgeclf-run.service.d").mkdir()
    (tmp_path / "edgeclf-run.service.d" / "override.conf").write_text(_header_dropin("On an x86 cart") + "NotAKey=1\n", encoding="utf-8")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    r = subprocess.run([tool, "verify", "edgeclf-run.service"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if "edgeclf-run.service" in ln]
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(complaints) == 1 and "NotAKey" in complaints[0], complaints  # the drop-in was read; nothing else in it is wrong


# --------------------------------------------------------------------------- setup-jetson.sh


def test_setup_script_makes_the_units_cache_and_state_folders_so_its_next_step_runs(tmp_path: Path):
    """The printed next step runs build-engine as the service user into the unit's engine cache before the service
    ever started (systemd makes CacheDirectory=/StateDirectory= only at a start). Runs the script for real in a
    private mount namespace: /etc as an overlay with a fake nv_tegra_release, empty /var/cache, /var/lib and /opt, and
    stubs for apt-get, python3 (the venv) and the venv's pip and edgeclf."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("runuser") is None or Path("/etc/nv_tegra_release").exists():
        pytest.skip("needs root, unshare and runuser on a machine that is not a Jetson")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("mount namespaces are not available here")
    r = _render()
    user = r["service"]["User"][0]
    cache, state = "/var/cache/" + r["service"]["CacheDirectory"][0], "/var/lib/" + r["service"]["StateDirectory"][0]
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "apt-get").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "python3").write_text(
        '#!/bin/sh\nif [ "$1" = - ]; then cat >/dev/null; exit 0; fi\n'
        'if [ "$1" = -m ] && [ "$2" = venv ]; then d="$4"; mkdir -p "$d/bin"\n'
        '  printf \'#!/bin/sh\\n[ "$1" = show ] && exit 1\\nexit 0\\n\' > "$d/bin/pip"\n'
        # the venv's python reads the script's import check from stdin
        '  printf \'#!/bin/sh\\ncat >/dev/null\\nexit 0\\n\' > "$d/bin/python"\n'
        # the real build-engine writes its engine into $EDGECLF_ENGINE_CACHE
        '  printf \'#!/bin/sh\\n[ "$1" = build-engine ] || exit 0\\nmkdir -p "$EDGECLF_ENGINE_CACHE/k" && touch "$EDGECLF_ENGINE_CACHE/k/e.plan"\\n\''
        ' > "$d/bin/edgeclf"\n  chmod +x "$d/bin/pip" "$d/bin/python" "$d/bin/edgeclf"; exit 0; fi\nexit 1\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    inner = f"""set -e
mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp_path}/upper,workdir={tmp_path}/work /etc
echo '# R36 (release), REVISION: 4.0' > /etc/nv_tegra_release
mount -t tmpfs tmpfs /var/cache
mount -t tmpfs tmpfs /var/lib
mount -t tmpfs -o mode=0755 tmpfs /opt
PATH={stubs}:$PATH bash {DEPLOY / 'setup-jetson.sh'} > {tmp_path}/setup.out 2> {tmp_path}/setup.err
stat -c '%U %G %a %n' {cache} {r['env']['EDGECLF_ENGINE_CACHE']} {state} > {tmp_path}/stat.out
step=$(grep -m1 ' build-engine ' {tmp_path}/setup.out | sed 's/^ *sudo -u \\([^ ]*\\) /runuser -u \\1 -- env /')
eval "$step"
ls {r['env']['EDGECLF_ENGINE_CACHE']}/k > {tmp_path}/engine.out
"""
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", inner], capture_output=True, text=True, timeout=120)
    err = (tmp_path / "setup.err").read_text() if (tmp_path / "setup.err").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + err
    group = subprocess.run(["unshare", "-m", "bash", "-c", f"mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp_path}/upper,"
                            f"workdir={tmp_path}/work /etc && id -gn {user}"], capture_output=True, text=True, timeout=30).stdout.strip()
    owners = [ln.split() for ln in (tmp_path / "stat.out").read_text().splitlines()]
    assert [(o[0], o[1], o[2]) for o in owners] == [(user, group, "755")] * 3, owners
    assert (tmp_path / "engine.out").read_text().split() == ["e.plan"]  # the printed step ran as the user and wrote its engine
    assert not Path("/etc/nv_tegra_release").exists()  # the host's /etc was never touched


@pytest.mark.parametrize("name", ["breast\nSTOPPING=1", "breast\r\nSTOPPING=1", "a\x00b\x1b[2Jc\x7f"])
def test_ready_status_with_control_characters_stays_one_assignment(notify_socket: socket.socket, name: str):
    n = Notifier(env={"NOTIFY_SOCKET": notify_socket.getsockname()})
    assert n.ready(f"classifying a camera source with {name} on ort-cpu")  # the bundle folder's name (runtime/app.py)
    msg = notify_socket.recv(4096).decode()
    assert [ln.split("=", 1)[0] for ln in msg.split("\n")] == ["READY", "STATUS"], msg
    assert msg.startswith("READY=1\nSTATUS=classifying a camera source with ") and msg.endswith(" on ort-cpu")
    assert not any(ord(c) < 32 and c != "\n" or c == "\x7f" for c in msg), msg


def test_ready_status_with_undecodable_bytes_is_still_sent(notify_socket: socket.socket):
    name = os.fsdecode(b"breast-\xff")  # a folder name that is not UTF-8 comes as a lone surrogate
    assert Notifier(env={"NOTIFY_SOCKET": notify_socket.getsockname()}).ready(f"with {name}")
    assert notify_socket.recv(4096).decode() == "READY=1\nSTATUS=with breast-?"


def test_unit_shows_how_to_require_signed_bundles():
    from edgeclf.runtime.bundle import TRUSTED_KEY_ENV

    line = f"#Environment={TRUSTED_KEY_ENV}=/opt/edgeclf/signing.pub.pem"
    assert line in _unit().splitlines()  # commented out: unsigned bundles run until the deployer sets a key
    r = _render(f"[Service]\n{line[1:]}\n")
    assert r["env"][TRUSTED_KEY_ENV] == "/opt/edgeclf/signing.pub.pem" and r["env"]["CART_PROFILE"] == "jetson-orin-nx"


# setup-jetson.sh's pip steps, run without root through stubs (tests/devices/setup_harness.py)
_R36 = "# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic, EABI: aarch64"


def _brings_cpu_onnxruntime(arg: str) -> bool:
    m = re.match(r"^(?P<name>[^\[<>=!~; ]+)(\[(?P<extras>[^\]]*)\])?", arg)
    if m is None:
        return False
    extras = {e.strip() for e in (m.group("extras") or "").split(",")}
    return m.group("name").lower().replace("_", "-") == "onnxruntime" or bool(extras & {"ort", "all"})


def test_setup_with_an_ort_gpu_wheel_never_installs_the_cpu_onnxruntime_over_it(tmp_path: Path):
    """onnxruntime (CPU) and onnxruntime-gpu are two distributions owning one onnxruntime/ folder: `edgeclf[ort]` after
    the GPU wheel wrote the CPU build over it, and the TensorRT and CUDA providers were gone."""
    from tests.devices.setup_harness import pip_installs, run_setup

    wheel = "/wheels/onnxruntime_gpu-1.19.0-cp310-cp310-linux_aarch64.whl"
    installs = pip_installs(run_setup(tmp_path, _R36, "--ort-gpu-wheel", wheel))
    at = next(i for i, a in enumerate(installs) if wheel in a)
    later = [arg for a in installs[at + 1:] for arg in a if not arg.startswith("-")]
    assert later and not [arg for arg in later if _brings_cpu_onnxruntime(arg)], later
    assert any(arg.startswith("edgeclf[") for arg in later)


def test_setup_keeps_numpy_1_and_imports_cv2_in_the_venv(tmp_path: Path):
    """JetPack 6: onnxruntime asks for numpy>=1.21.6 over the system's 1.21.5; unpinned, pip puts numpy 2 in the venv,
    which JetPack's OpenCV was not built for. The venv's own python then imports what the service will."""
    from tests.devices.setup_harness import pip_installs, run_setup

    calls = run_setup(tmp_path, _R36)
    installs = pip_installs(calls)
    assert any(re.search(r"numpy\s*<\s*2", arg) for a in installs for arg in a)
    assert any(arg.startswith("edgeclf[ort,") for a in installs for arg in a)  # without a GPU wheel: the CPU one
    last_pip = max(i for i, c in enumerate(calls) if c[:2] == ["venv-pip", "install"])
    assert any(c[0] == "venv-python" for c in calls[last_pip + 1:])
