"""sd_notify for `Type=notify` services with a watchdog, in the stdlib (no python-systemd on a cart).

systemd passes NOTIFY_SOCKET (a unix datagram socket; '@' starts an abstract one) and, with WatchdogSec=,
WATCHDOG_USEC. The runtime sends READY=1 once the bundle and source are open, WATCHDOG=1 from its frame loop
and STOPPING=1 at the end; a capture that hangs stops the pings, and systemd restarts the service.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from typing import Callable, Mapping, Optional

__all__ = ["sd_notify", "Notifier"]

log = logging.getLogger(__name__)
# Control characters (C0, DEL): a newline in free text would start another VAR=value assignment of the datagram.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def sd_notify(state: str, *, socket_path: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> bool:
    """Send `state` (e.g. "READY=1") to systemd. False, doing nothing, when not run by systemd (no NOTIFY_SOCKET)."""
    path = socket_path if socket_path is not None else (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode("utf-8", "replace"))  # a non-UTF-8 folder name (lone surrogates) becomes "?"
        return True
    except OSError as exc:  # a vanished socket must never stop the frame loop
        log.warning("sd_notify(%s) to %s failed: %s", state.split("=")[0], path, exc)
        return False


class Notifier:
    """READY/WATCHDOG/STOPPING for one run. `ping()` is cheap and rate-limited to half the watchdog interval
    (systemd's own advice), so it can be called for every frame. Inactive (all no-ops) without NOTIFY_SOCKET."""

    def __init__(self, env: Optional[Mapping[str, str]] = None, clock: Callable[[], float] = time.monotonic) -> None:
        e = env if env is not None else os.environ
        self.socket_path = e.get("NOTIFY_SOCKET") or None
        usec = e.get("WATCHDOG_USEC")
        pid = e.get("WATCHDOG_PID")
        # WATCHDOG_PID names the process meant to ping; a child started by the service must not.
        mine = pid is None or pid == str(os.getpid())
        self.watchdog_s: Optional[float] = int(usec) / 1e6 if usec and usec.isdigit() and int(usec) > 0 and mine else None
        self._clock = clock
        self._last = float("-inf")
        self.pings = 0

    @property
    def active(self) -> bool:
        return self.socket_path is not None

    def _send(self, state: str) -> bool:
        return self.active and sd_notify(state, socket_path=self.socket_path)

    def ready(self, status: str = "") -> bool:
        """READY=1 with a STATUS= line; `status` is free text (it names the bundle folder): each control
        character becomes "?", so it stays one assignment."""
        status = _CONTROL.sub("?", status)
        return self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def ping(self) -> bool:
        """WATCHDOG=1 when the watchdog is on and half its interval has passed since the last ping."""
        if self.watchdog_s is None or not self.active:
            return False
        now = self._clock()
        if now - self._last < self.watchdog_s / 2:
            return False
        self._last = now
        self.pings += 1
        return self._send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self._send("STOPPING=1")
