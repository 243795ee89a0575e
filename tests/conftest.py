"""Shared fixtures: a tiny trained model and its bundle (built once per session), real-data paths."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source hashes are keyed with a per-install key (runtime/sources.py): tests keep theirs out of the user's home.
if "EDGECLF_SOURCE_KEY" not in os.environ:
    _KEY_DIR = tempfile.mkdtemp(prefix="edgeclf-key-")
    os.environ["EDGECLF_SOURCE_KEY"] = str(Path(_KEY_DIR) / "source-key")
    # Removed when the session ends (each run used to leave one behind in /tmp).
    atexit.register(shutil.rmtree, _KEY_DIR, ignore_errors=True)
# CI may start the suite as a background job, which inherits SIGINT ignored (POSIX); the tests of Ctrl-C need it as a
# foreground run has it, in this process and (a handled signal resets at exec) in the commands they start.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
SHARED_DATA = Path(os.environ.get("EDGECLF_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY_DATA = "synthetic:ultrasound?n=240&size=64&seed=3"


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data {p} is absent (it lives in ../shared/data beside a development checkout)")
    return p


def load_benchmark(name: str) -> Any:
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_gray_clip(path: Path, frames: list[Any], fps: float = 10) -> None:
    """Write gray uint8 frames as an MJPG .avi (what OpenCV's pip wheels can encode), creating its folder."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    vw.release()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m edgeclf ARGS` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "edgeclf", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env=env, timeout=timeout)


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from edgeclf.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained")
    train(TrainConfig(data=TINY_DATA, out=str(out), model="compact", size=32, epochs=3, patience=3, seed=0))
    return out


@pytest.fixture(scope="session")
def bundle_dir(trained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportConfig(out=str(out), model=str(trained_dir)))
    return out


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: fine-tuning in tests is quicker without contention on a small, shared machine."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def notify_socket():
    """A systemd-style notify socket (unix datagram) to receive sd_notify messages in tests."""
    import shutil
    import socket
    import tempfile

    # A short folder: unix socket paths are limited to about 107 bytes, pytest's tmp_path can be longer.
    folder = tempfile.mkdtemp(prefix="sdn")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(Path(folder) / "notify"))
    s.settimeout(2)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(folder, ignore_errors=True)


def notify_messages(s) -> list[str]:
    """Every message waiting on a notify socket, in order (stops after 0.2 s of silence)."""
    import socket

    out = []
    s.settimeout(0.2)
    try:
        while True:
            out.append(s.recv(4096).decode())
    except (socket.timeout, BlockingIOError):
        return out
