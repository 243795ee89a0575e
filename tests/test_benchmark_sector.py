"""benchmarks/sector.py fails (exit 1, one FAILED line each) when a clip's detected sector has IoU under 0.9 with the
fan placed by eye (the bar tests/runtime/test_sector.py and the runtime issue set), or when fewer than 10 clips with a
reference fan were measured (the issue's count; `--limit` leaves clips out). Fake clips and figures: nothing here
decodes a video."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import load_benchmark

N = 10


def _row(iou: float) -> dict[str, Any]:
    return {"frames": 30, "kind": "fan", "area": 0.7, "redetections": 0, "deferred": 0, "detect_ms": 5.0, "update_us": 4.0,
            "update_p99_us": 9.0, "apply_us": 90.0, "check_us": 80.0, "flagged": 0.0, "reasons": {}, "size": [300, 300],
            "iou": iou, "iou_last": iou, "png": "sector/x.png"}


@pytest.fixture
def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The benchmark over N fake clips, each with a reference fan; `bench.ious` sets each clip's IoU."""
    sector = load_benchmark("sector")
    pocus = tmp_path / "shared" / "pocus"
    pocus.mkdir(parents=True)
    clips = [f"regular/clip{i}.mp4" for i in range(N)]
    (pocus / "clips.csv").write_text("file,probe\n" + "".join(f"{c},convex\n" for c in clips))
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"clips": [{"clip": c} for c in clips]}))
    monkeypatch.setattr(sector, "SHARED", tmp_path / "shared")
    monkeypatch.setattr(sector, "REFS", refs)
    monkeypatch.setattr(sector, "OUT", tmp_path / "results")
    sector.ious = {c: 0.95 for c in clips}
    monkeypatch.setattr(sector, "run_clip", lambda path, ref: _row(sector.ious[ref["clip"]]))
    monkeypatch.setattr(sector, "synthetic_costs", lambda: dict.fromkeys(
        ("update_us", "apply_gray_us", "apply_rgb_us", "check_us", "detect_ms"), 1.0))
    return sector


def test_every_reference_fan_matched_passes(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([]) == 0
    assert "FAILED" not in capsys.readouterr().out
    assert "IoU >= 0.9 with each of the 10 reference fans: met" in (bench.OUT / "sector.md").read_text()


def test_a_clip_under_the_iou_bar_fails_the_run(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """It printed the IoU and exited 0 whatever it was."""
    bench.ious["regular/clip3.mp4"] = 0.85
    assert bench.main([]) == 1
    out = capsys.readouterr().out
    assert "FAILED: regular/clip3.mp4: IoU 0.850 with its reference fan, under 0.9" in out
    assert out.count("FAILED") == 1
    assert "NOT met" in (bench.OUT / "sector.md").read_text()


def test_too_few_reference_fans_measured_fails_the_run(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`--limit 3` measures 3 of the reference fans: no evidence for the other 7."""
    assert bench.main(["--limit", "3"]) == 1
    assert "FAILED: only 3 clips with a reference fan were measured; at least 10 are needed" in capsys.readouterr().out
