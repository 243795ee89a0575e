"""benchmarks/profile_accuracy.py compares each profiled stage with a reference loop that times the same work: its
reference infer is `backend.infer` alone, as the pipeline's infer stage (probabilities and the decision belong to the
pipeline's postprocess stage). Timed on a virtual clock, so the figures do not depend on this machine's load."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from tests.conftest import load_benchmark
from tests.runtime.tiny_bundle import make_tiny_bundle

INFER_MS, POSTPROCESS_MS = 50.0, 30.0  # virtual: far above the microseconds the real calls take


def _bench() -> Any:
    return load_benchmark("profile_accuracy")


class _Clock:
    """time.perf_counter plus the virtual milliseconds the fakes below spend (no sleeping)."""

    def __init__(self) -> None:
        self.real: Callable[[], float] = time.perf_counter
        self.offset = 0.0

    def __call__(self) -> float:
        return self.real() + self.offset

    def spend(self, ms: float) -> None:
        self.offset += ms / 1e3


def test_reference_infer_times_the_backend_alone_as_the_profile_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A backend that takes 50 ms a call and probabilities that take 30 ms: the profile's infer stage is 50 ms, and so
    must the reference's be (it was 80 ms, backend + probabilities + decision: the exact profile failed by 37.5%)."""
    import edgeclf.runtime.backends as backends
    import edgeclf.runtime.postprocess as post
    import edgeclf.runtime.profile as prof
    from edgeclf.runtime.backends import FakeBackend

    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)

    def fake_create(model_path: str, shape: Any, num_outputs: int, **kw: Any) -> FakeBackend:
        def fn(x: np.ndarray) -> np.ndarray:
            clock.spend(INFER_MS)
            return np.zeros((x.shape[0], num_outputs), np.float32)
        return FakeBackend(tuple(shape), num_outputs, fn=fn)

    calls = []

    def slow(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            calls.append(real.__name__)
            clock.spend(POSTPROCESS_MS)
            return real(*a, **k)
        return wrapped

    monkeypatch.setattr(backends, "create_backend", fake_create)
    monkeypatch.setattr(prof, "create_backend", fake_create)
    monkeypatch.setattr(post, "probabilities", slow(post.probabilities))
    bundle = make_tiny_bundle(tmp_path / "tiny")
    out = tmp_path / "pa.json"
    monkeypatch.setattr(sys, "argv", ["profile_accuracy.py", "--bundle", str(bundle), "--frames", "20", "--warmup", "4",
                                      "--chunk", "10", "--source", "synthetic:ultrasound?frames=30&size=64", "--out", str(out)])
    rc = _bench().main()
    infer = json.loads(out.read_text())["targets"][0]["stages"]["infer"]
    assert infer["n_reference"] == 20 and infer["judged"]
    assert infer["reference_p50"] == pytest.approx(INFER_MS, rel=0.05), infer  # not INFER_MS + POSTPROCESS_MS
    assert infer["pass"] and rc == 0, infer
    assert "probabilities" in calls  # the reference still does the postprocess work between frames, untimed


def test_it_fails_when_no_stage_was_judged(tmp_path: Path) -> None:
    """Every stage of a tiny bundle is far under --min-ms 1000, so nothing is compared: it passed (exit 0, "pass":
    true) having compared nothing. Now that is a FAILED line and exit 1."""
    bundle = make_tiny_bundle(tmp_path / "tiny")
    out = tmp_path / "pa.json"
    rc = _bench().main(["--bundle", str(bundle), "--frames", "20", "--warmup", "2", "--chunk", "10",
                        "--source", "synthetic:ultrasound?frames=30&size=64", "--out", str(out), "--min-ms", "1000"])
    doc = json.loads(out.read_text())
    assert not any(s["judged"] for t in doc["targets"] for s in t["stages"].values())
    assert rc == 1 and doc["pass"] is False
