from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeclf.demo import timeline_agreement

TIMELINE = {"frames": 6, "segments": [{"label": "normal", "start": 0, "end": 3}, {"label": "cyst", "start": 3, "end": 6}]}


def test_timeline_agreement_per_frame_and_segment() -> None:
    r = timeline_agreement(["normal", "normal", "cyst", "cyst", "cyst", "normal"], TIMELINE)
    assert r["agreement"] == pytest.approx(4 / 6)
    assert [s["majority"] for s in r["segments"]] == ["normal", "cyst"]
    assert [s["agreement"] for s in r["segments"]] == pytest.approx([2 / 3, 2 / 3])
    short = timeline_agreement(["normal"] * 4, TIMELINE)  # a run that stopped early is compared on what it produced
    assert short["frames_compared"] == 4 and short["frames_predicted"] == 4 and short["frames_in_timeline"] == 6
    assert short["segments"][1]["agreement"] == 0.0


@pytest.mark.slow
def test_demo_meets_its_acceptance(tmp_path: Path) -> None:
    from edgeclf.demo import run_demo

    r = run_demo(str(tmp_path / "demo"))
    assert min(r["held_out_test"]["per_class_accuracy"].values()) >= 0.95, r["held_out_test"]
    assert r["cine"]["agreement"] >= 0.9 and r["cine"]["frames_predicted"] == r["cine"]["frames_in_timeline"]
    assert r["runtime"]["written"] == r["runtime"]["frames"] == r["cine"]["frames_in_timeline"]
    for f in ("bundle/manifest.json", "results.jsonl", "timeline.png", "evaluation/roc.png", "evaluation/confusion.png", "demo.json"):
        assert (tmp_path / "demo" / f).is_file(), f
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["cine"]["agreement"] == r["cine"]["agreement"]
