"""benchmarks/soak.py fails (exit 1) on what it measures: fewer frames than asked for, lost, torn or out-of-order results,
an audit log that does not verify, RSS over its budget or not measured at all, open files or threads growing after
warm-up; a clean soak passes. It leaves nothing behind in the temporary folder unless --keep."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import load_benchmark
from tests.runtime.tiny_bundle import make_tiny_bundle


def _soak() -> Any:
    return load_benchmark("soak")


def _clean() -> dict[str, Any]:
    samples = [{"frames": f, "fds": 6 if f == 0 else 11, "threads": 2 if f == 0 else 5} for f in range(0, 1100, 100)]
    return {"frames_requested": 1000, "frames_delivered": 1000, "lost_results": 0, "torn_lines": 0, "frame_gaps": 0, "audit": {"state": "intact"},
            "result_lines": 1000, "frames_decided": 990, "abstained_by_reason": {"settling": 10},
            "rss_slope_mb_per_10k_frames": 0.006, "warmup_frames": 100, "samples": samples}


@pytest.mark.parametrize("change, says", [
    ({"frame_gaps": 2}, "2 frame gaps"),
    ({"rss_slope_mb_per_10k_frames": 192.3}, "over the 1 MB budget"),
    ({"lost_results": 1}, "1 results lost"),
    ({"torn_lines": 1}, "torn"),
    ({"audit": {"state": "tampered"}}, "audit log tampered"),
    ({"frames_decided": 0, "abstained_by_reason": {"settling": 1000}}, "every one abstained: settling 1000"),
])
def test_each_problem_fails_the_soak(change: dict[str, Any], says: str) -> None:
    soak = _soak()
    assert soak.failures(_clean()) == []  # the pipeline's threads and files open before warm-up ends: not growth
    got = soak.failures({**_clean(), **change})
    assert len(got) == 1 and says in got[0], got


def test_files_or_threads_growing_after_warm_up_fail_it() -> None:
    soak = _soak()
    r = _clean()
    r["samples"][-1] = {**r["samples"][-1], "fds": 40}
    assert soak.failures(r) == ["fds grew after warm-up: 11 -> 40"]


def test_main_exits_1_and_names_the_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    soak = _soak()
    leak = {**_clean(), "rss_slope_mb_per_10k_frames": 192.3}
    monkeypatch.setattr(soak, "run", lambda args: leak)
    monkeypatch.setattr(soak, "render", lambda r: "soak\nRSS and throughput\n")
    assert soak.main(["--frames", "100", "--out-dir", str(tmp_path)]) == 1
    assert "FAILED: RSS slope +192.300" in capsys.readouterr().out
    monkeypatch.setattr(soak, "run", lambda args: _clean())
    assert soak.main(["--frames", "100", "--out-dir", str(tmp_path)]) == 0


def test_a_slope_over_budget_from_a_short_runs_small_rise_is_not_a_failure() -> None:
    """A 3,000-frame run fitted +0.795 MB per 10k frames from allocator noise (0.2 MB); the same slope over 100k frames
    (8 MB) is a leak, and so is a large slope on a short run."""
    soak = _soak()
    short = {**_clean(), "rss_slope_mb_per_10k_frames": 1.5,
             "samples": [{"frames": f, "fds": 11, "threads": 5} for f in range(300, 3100, 100)], "warmup_frames": 300}
    assert soak.failures(short) == []
    long = {**short, "samples": [{"frames": f, "fds": 11, "threads": 5} for f in range(10_000, 100_001, 1000)],
            "warmup_frames": 10_000}
    (got,) = soak.failures(long)
    assert "over the 1 MB budget (13.5 MB over the 90000 frames" in got
    planted = {**short, "rss_slope_mb_per_10k_frames": 192.3}
    assert len(soak.failures(planted)) == 1


def test_count_results_counts_decisions_and_abstentions_by_reason(tmp_path: Any) -> None:
    """A soak whose every result abstains has not exercised the decision path: the counts say so."""
    import json

    rows = [{"frame": 0, "abstain": True, "abstain_reason": "settling", "label": None},
            {"frame": 1, "abstain": False, "label": "cyst"},
            {"frame": 2, "abstain": True, "abstain_reason": "dark", "label": None},
            {"frame": 3, "abstain": True, "abstain_reason": "settling", "label": None}]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"frame": 4, "abs')
    got = _soak().count_results(path)
    assert got == {"lines": 4, "torn": 1, "frame_gaps": 0, "decided": 1, "abstained_by_reason": {"settling": 2, "dark": 1}}


def test_a_source_that_delivered_fewer_frames_than_asked_fails_it() -> None:
    """Results were counted against the frames *delivered*, never against --frames: a source that stopped at frame 0
    wrote 0 lines, lost 0 and skipped the 'every result abstained' check (result_lines 0), and the soak passed."""
    soak = _soak()
    empty = {**_clean(), "frames_delivered": 0, "result_lines": 0, "frames_decided": 0, "abstained_by_reason": {}}
    got = soak.failures(empty)
    assert len(got) == 1 and "delivered 0 of 1000 frames" in got[0], got
    (got,) = soak.failures({**_clean(), "frames_delivered": 10, "result_lines": 10, "frames_decided": 10})
    assert "delivered 10 of 1000 frames" in got


def test_a_soak_whose_rss_slope_could_not_be_fitted_fails() -> None:
    """A soak's point is memory: with fewer than 3 samples after warm-up the slope is None, and the RSS check was
    skipped without a word."""
    soak = _soak()
    r = {**_clean(), "rss_slope_mb_per_10k_frames": None, "warmup_frames": 900}
    (got,) = soak.failures(r)
    assert got.startswith("RSS slope not measured: 2 samples after warm-up"), got


def _args(bundle: Path, keep: bool) -> Any:
    return type("A", (), dict(frames=20, size=64, sample_every=5, warmup=5, threads=1, bundle=str(bundle), keep=keep))()


def test_run_removes_its_work_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --keep only the results, clip summary and audit log were unlinked: the folder (and a bundle soak trained
    in it, about 4 MB) stayed in /tmp after every run. A bundle the user gave lives elsewhere and is left alone."""
    import tempfile

    soak = _soak()
    bundle = make_tiny_bundle(tmp_path / "given")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = soak.run(_args(bundle, keep=False))
    assert r["frames_delivered"] == 20 and "work" not in r
    assert list(scratch.iterdir()) == []
    assert (bundle / "manifest.json").is_file()


def test_keep_keeps_the_work_folder_and_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import tempfile

    soak = _soak()
    bundle = make_tiny_bundle(tmp_path / "given")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = soak.run(_args(bundle, keep=True))
    (work,) = scratch.iterdir()
    assert r["work"] == str(work) and (work / "results.jsonl").is_file() and (work / "audit.jsonl").is_file()
    monkeypatch.setattr(soak, "run", lambda args: {**_clean(), "work": str(work)})
    monkeypatch.setattr(soak, "render", lambda r: "soak\nRSS and throughput\n")
    assert soak.main(["--frames", "100", "--keep", "--out-dir", str(tmp_path / "out")]) == 0
    assert f"kept the results, clip summary and audit log in {work}" in capsys.readouterr().out
