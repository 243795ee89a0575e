"""benchmarks/preprocess_stages.py fails (exit 1, one FAILED line each) when edgeclf's stand-alone preprocessing plus
quality gate exceeds the runtime issue's 0.5 ms per 640x480 frame by more than the 10% noise (that budget also holds
postprocess and sink, so this part alone must fit in it), or when edgeclf's preprocessing is slower than the plain numpy
chain a user would write. Measurements are faked: nothing here times anything."""
from __future__ import annotations

import types
from pathlib import Path

import pytest

from tests.conftest import load_benchmark

# The AMD EPYC host's figures in benchmarks/results/preprocess_stages.md: every target held.
QUIET = {"blob": 0.206, "numpy": 0.682, "edgeclf preprocess": 0.239, "  area by 2": 0.074, "  linear to 224": 0.081,
         "  normalise": 0.067, "edgeclf quality gate": 0.072}


def _run(monkeypatch: pytest.MonkeyPatch, reps: list[dict[str, float]], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    bench = load_benchmark("preprocess_stages")
    fake = types.SimpleNamespace(make_video=lambda path, frames: Path(path).write_bytes(b""),
                                 machine=lambda: {"cpu": "x", "cores": 2, "opencv": "4", "python": "3"})
    monkeypatch.setattr(bench, "_runtime_bench", lambda: fake)
    it = iter(reps)
    monkeypatch.setattr(bench, "measure", lambda video: next(it))
    rc = bench.main(["--reps", str(len(reps)), "--frames", "30"])
    return rc, capsys.readouterr().out


def test_quiet_figures_pass(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _run(monkeypatch, [QUIET] * 3, capsys)
    assert rc == 0 and "FAILED" not in out
    assert "preprocess + quality gate 0.311 ms per frame, within the 0.5 ms budget: met" in out


def test_preprocessing_over_the_budget_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The Intel Xeon host's committed figures (0.720 + 0.174 ms): the script printed them and exited 0."""
    slow = {**QUIET, "blob": 0.565, "numpy": 1.625, "edgeclf preprocess": 0.720, "edgeclf quality gate": 0.174}
    rc, out = _run(monkeypatch, [slow, QUIET, slow], capsys)  # the median over repetitions is judged
    assert rc == 1
    assert "FAILED: edgeclf preprocess + quality gate 0.894 ms per frame (median over 3 repetitions), over the 0.5 ms " \
           "budget by more than 10%" in out
    assert out.count("FAILED") == 1


def test_within_the_noise_passes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _run(monkeypatch, [{**QUIET, "edgeclf preprocess": 0.45, "edgeclf quality gate": 0.09}], capsys)
    assert rc == 0, out


def test_preprocessing_slower_than_the_numpy_chain_fails(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _run(monkeypatch, [{**QUIET, "numpy": 0.2}], capsys)
    assert rc == 1
    assert "FAILED: edgeclf preprocess 0.239 ms per frame, slower than the plain numpy chain (0.200 ms)" in out
