"""benchmarks/soak.py fails (exit 1) on what it measures: lost, torn or out-of-order results, an audit log that does not
verify, RSS over its budget, open files or threads growing after warm-up; a clean soak passes."""
from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import load_benchmark


def _soak() -> Any:
    return load_benchmark("soak")


def _clean() -> dict[str, Any]:
    samples = [{"frames": f, "fds": 6 if f == 0 else 11, "threads": 2 if f == 0 else 5} for f in range(0, 1100, 100)]
    return {"lost_results": 0, "torn_lines": 0, "frame_gaps": 0, "audit": {"state": "intact"},
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
