"""`run` under systemd: READY once open, WATCHDOG pings from the frame loop, STOPPING at the end, through a real
unix datagram socket; a watched folder keeps pinging while it waits, a silent camera does not."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import List, Optional

import pytest

from edgeclf.devices.systemd import Notifier
from edgeclf.runtime import app
from tests.conftest import notify_messages
from tests.runtime.tiny_bundle import make_tiny_bundle


def test_run_notifies_ready_watchdog_and_stopping(tmp_path: Path, notify_socket: socket.socket):
    pytest.importorskip("cv2")
    bundle = make_tiny_bundle(tmp_path / "b")
    # WATCHDOG_USEC 2 us: every frame may ping (half the interval has always passed).
    n = Notifier(env={"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "2"})
    s = app.run_bundle(str(bundle), "synthetic:ultrasound?frames=6&size=64", notifier=n, reconnect=False)
    got = notify_messages(notify_socket)
    # The status names the kind of source, never its URI (a path may carry a patient's name).
    assert got[0].startswith("READY=1\nSTATUS=classifying a synthetic source") and got[-1] == "STOPPING=1"
    assert "ultrasound?frames" not in got[0]
    pings = got.count("WATCHDOG=1")
    assert pings == n.pings and pings >= s["frames"] == 6  # at least one ping per classified frame
    assert s["systemd"]["pings"] == pings and s["systemd"]["watchdog_s"] == 2e-6


def test_run_outside_systemd_sends_nothing(tmp_path: Path):
    pytest.importorskip("cv2")
    bundle = make_tiny_bundle(tmp_path / "b")
    s = app.run_bundle(str(bundle), "synthetic:ultrasound?frames=2&size=64", notifier=Notifier(env={}), reconnect=False)
    assert s["frames"] == 2 and "systemd" not in s


class _Source:
    def __init__(self, kind: str, frames: List[Optional[str]]) -> None:
        self.kind, self._frames = kind, list(frames)
        self.closed = False

    def read(self, timeout: Optional[float] = None) -> Optional[str]:
        return self._frames.pop(0)

    def close(self) -> None:
        self.closed = True


class _Counter:
    def __init__(self) -> None:
        self.pings = 0

    def ping(self) -> bool:
        self.pings += 1
        return True


@pytest.mark.parametrize(("kind", "want"), [("watch", 3), ("reconnecting", 1), ("video", 1)])
def test_idle_reads_ping_only_for_watched_folders(kind: str, want: int):
    counter = _Counter()
    src = app._ProgressSource(_Source(kind, ["frame", None, None]), app._watchdog_hook(counter, kind))  # type: ignore[arg-type]
    for _ in range(3):
        src.read(0.5)
    assert counter.pings == want
    assert src.kind == kind  # everything else is the wrapped source's
    with src:
        pass
    assert src.closed
