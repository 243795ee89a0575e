"""`run --audit`: the run's own hash-chained record, and a backend that fails on a frame without ending the run."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from edgeclf.errors import BackendError, EdgeclfError
from edgeclf.runtime import app
from edgeclf.runtime import sinks as sinks_mod
from edgeclf.runtime.audit import verify_audit
from edgeclf.runtime.backends import FakeBackend
from edgeclf.runtime.bundle import load_bundle
from edgeclf.runtime.pipeline import MAX_BACKEND_ERRORS, RunOptions, run_pipeline
from edgeclf.runtime.sinks import JsonlSink, read_jsonl
from edgeclf.runtime.sources import open_source
from tests.conftest import run_cli
from tests.runtime.tiny_bundle import make_tiny_bundle

pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
SRC = "synthetic:ultrasound?frames=12&size=64"


def _lines(path: Path) -> List[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_cli_run_writes_an_intact_audit_log_that_matches_the_results(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    out, log = tmp_path / "r.jsonl", tmp_path / "audit.jsonl"
    r = run_cli("run", "--bundle", str(bundle), "--source", SRC, "--out", str(out), "--audit", str(log), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["audit"]["path"] == str(log) and s["audit"]["records"] >= 3
    rep = verify_audit(log, results=out)
    assert rep.state == "intact" and rep.results == 12
    assert rep.results_check is not None and rep.results_check["state"] == "match" and rep.results_check["checked"] == 12
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert recs[0]["type"] == "start" and recs[-1]["type"] == "end" and recs[-1]["payload"]["status"] == "ok"
    assert recs[0]["payload"]["bundle_checksum"] == s["bundle_checksum"]
    assert "ultrasound?frames" not in log.read_text()  # the source by kind and hash only
    v = run_cli("audit", "verify", str(log))
    assert v.returncode == 0 and "intact" in v.stdout


def test_a_backend_that_fails_once_costs_one_frame_which_is_recorded_and_audited(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    b = load_bundle(bundle)
    calls = {"n": 0}

    def flaky(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return np.zeros((x.shape[0], 3), np.float32)

    be = FakeBackend((1, 8, 8), 3, fn=flaky)
    events: List[Any] = []
    out = tmp_path / "r.jsonl"
    with open_source(SRC) as src, JsonlSink(str(out)) as sink:
        s = run_pipeline(b, src, be, [sink], options=RunOptions(quality=False),
                         on_event=lambda kind, msg, d: events.append((kind, msg, d)))
    recs = _lines(out)
    assert s.frames == len(recs) == 12 and s.extra["backend_errors"] == 1
    bad = [r for r in recs if r["abstain_reason"] == "backend_error"]
    assert len(bad) == 1 and bad[0]["frame"] == 3 and bad[0]["probs"] is None and bad[0]["quality"] == []
    assert [e[0] for e in events] == ["fault", "recovery"] and "illegal memory access" in events[0][1]


def test_a_backend_that_keeps_failing_ends_the_run_with_its_error(tmp_path: Path) -> None:
    b = load_bundle(make_tiny_bundle(tmp_path / "b"))

    def broken(x: np.ndarray) -> np.ndarray:
        raise BackendError("device lost")

    out = tmp_path / "r.jsonl"
    with open_source(SRC) as src, JsonlSink(str(out)) as sink, pytest.raises(BackendError, match="device lost"):
        run_pipeline(b, src, FakeBackend((1, 8, 8), 3, fn=broken), [sink], options=RunOptions(quality=False))
    recs = _lines(out)  # every frame is on record, the last failure too, each an abstain
    assert len(recs) == MAX_BACKEND_ERRORS and all(r["abstain_reason"] == "backend_error" for r in recs)


def test_a_failed_run_ends_its_audit_log_with_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")

    def broken(*a: Any, **k: Any) -> Any:
        raise BackendError("device lost")

    monkeypatch.setattr(FakeBackend, "_infer", broken)
    monkeypatch.setattr(app, "open_backend", lambda b, *a, **k: (FakeBackend((1, 8, 8), 3), "fake"))
    log = tmp_path / "audit.jsonl"
    with pytest.raises(BackendError):
        app.run_bundle(str(bundle), SRC, out=str(tmp_path / "r.jsonl"), audit=str(log), reconnect=False)
    rep = verify_audit(log)
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert rep.state == "intact" and recs[-1]["type"] == "end" and recs[-1]["payload"]["status"] == "error"
    assert "device lost" in recs[-1]["payload"]["error"] and rep.faults >= MAX_BACKEND_ERRORS


class _DroppingStream:
    """A reconnecting stream as run_bundle sees it: on_event hears of disconnects, whose text quotes the URI
    (edgeclf.runtime.live builds it from the source's own error)."""

    kind = "stream"
    live = True

    def __init__(self, uri: str) -> None:
        self._src = open_source(SRC)
        self._uri = uri
        self.on_event: Any = None
        self.ended = False  # a live source that has ended: the pipeline stops instead of waiting for more
        self.fps, self.size, self.frame_count = self._src.fps, self._src.size, None

    def read(self, *a: Any, **k: Any) -> Any:
        frame = self._src.read(*a, **k)
        self.ended = frame is None
        if frame is not None and frame.index % 4 == 1 and self.on_event is not None:
            self.on_event("fault", f"a read failed (SourceError: stream {self._uri!r} delivered no frame after 0 frames)",
                          {"disconnects": frame.index})
            self.on_event("recovery", "reconnected (connection 2)", {"reconnects": frame.index})
        return frame

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_source_faults_in_the_audit_log_name_no_patient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "http://127.0.0.1:18731/c.mp4?patient=DOE_JOHN_MRN123"
    monkeypatch.setattr(app, "_open", lambda u, realtime, reconnect: _DroppingStream(u))
    log = tmp_path / "audit.jsonl"
    s = app.run_bundle(str(make_tiny_bundle(tmp_path / "b")), uri, out=str(tmp_path / "r.jsonl"), audit=str(log))
    text = log.read_text()
    rep = verify_audit(log)
    assert rep.state == "intact" and rep.faults == 3 and s["frames"] == 12
    assert "DOE_JOHN" not in text and "127.0.0.1" not in text
    faults = [r for r in _lines(log) if r["type"] == "fault"]
    assert all("stream '<source>' delivered no frame" in r["payload"]["message"] for r in faults)


def test_a_failed_fsync_leaves_the_results_file_and_the_audit_log_in_agreement(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The results file's fsync fails (EIO) mid-run: the audit sink and the clip summary after it never get that
    result, so the results file must not keep it either; otherwise verify calls a plain disk error tampering."""
    bundle = make_tiny_bundle(tmp_path / "b")
    out, log, clip = tmp_path / "r.jsonl", tmp_path / "audit.jsonl", tmp_path / "clip.json"
    real_fsync = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target == str(out):
            calls[0] += 1
            if calls[0] == 6:  # the disk starts failing at the 6th line
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell the results file's fsync apart")
    monkeypatch.setattr(sinks_mod.os, "fsync", fsync)
    with pytest.raises(EdgeclfError, match="syncing result 6 .*holds 5 whole results of the 6 produced"):
        app.run_bundle(str(bundle), "synthetic:ultrasound?frames=40&size=64", out=str(out), audit=str(log),
                       summary_path=str(clip), fsync_every=0, reconnect=False)
    monkeypatch.undo()
    recs, torn = read_jsonl(out)
    rep = verify_audit(log, results=out)
    assert torn == 0 and len(recs) == 5 == json.loads(clip.read_text())["frames"]
    assert rep.end is not None and rep.end["status"] == "error"
    assert rep.state != "tampered", rep.reason
