"""Shared pieces of the property-based (Hypothesis) tests in tests/test_fuzz_*.py.

Profiles, chosen with the environment variable HYPOTHESIS_PROFILE:
- "ci" (default): 50 examples per target, so that all fuzz files together stay around a minute.
- "thorough": at least 2,000 examples per target, new ones each run (on demand:
  `HYPOTHESIS_PROFILE=thorough python -m pytest -q tests/test_fuzz_*.py`; a few minutes on 2 cores).
- "dev": 200 per target, for a quicker look.

Every target states the same property: an input either works, or fails with an EdgeclfError (or a click
usage error) whose message is one line; never another exception, never a hang (a wall-clock limit per
example, raised as `Hang`, a BaseException that no `except Exception` in the code under test swallows).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Dict, Iterator

from hypothesis import HealthCheck, settings

from edgeclf.errors import EdgeclfError

_COMMON: Dict[str, Any] = {
    "deadline": None,  # wall time is limited per example by `time_limit`, which also catches hangs
    "database": None,  # no .hypothesis folder in the checkout; failures print their reproducing example
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much],
    "print_blob": True,
}
# ci: the same examples on every run (no example database in a fresh clone): a red CI is reproducible.
settings.register_profile("ci", max_examples=50, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

# Seconds one example may take before it counts as a hang (a slow, shared 2-core machine: generous).
HANG_S = float(os.environ.get("EDGECLF_FUZZ_HANG_S", "30"))


class Hang(BaseException):
    """An example ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float = HANG_S) -> Iterator[None]:
    """Raise Hang in the main thread when the block runs longer than `seconds` (SIGALRM; POSIX)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_error(exc: BaseException) -> None:
    """The failure a user may see: an EdgeclfError with a non-empty one-line message."""
    assert isinstance(exc, EdgeclfError), f"{type(exc).__name__} is not an EdgeclfError: {exc!r}"
    msg = str(exc)
    assert msg.strip() and "\n" not in msg, repr(msg)
