from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeclf.runtime.app import run_bundle, verify_bundle
from edgeclf.runtime.backends import FakeBackend
from edgeclf.runtime.bundle import load_bundle
from edgeclf.runtime.pipeline import STAGES, run_pipeline
from edgeclf.runtime.sinks import JsonlSink, ListSink
from edgeclf.runtime.sources import open_source

REPO = Path(__file__).resolve().parents[2]


def test_every_frame_gives_one_whole_record(bundle_dir: Path, tmp_path: Path) -> None:
    b = load_bundle(bundle_dir)
    out = tmp_path / "r.jsonl"
    with FakeBackend((1, 32, 32), 3) as be, open_source("synthetic:ultrasound?frames=25&size=96") as src:
        mem = ListSink()
        s = run_pipeline(b, src, be, [mem, JsonlSink(out)])
    lines = out.read_text().splitlines()
    assert s.frames == 25 and s.written == 25 and len(lines) == 25
    recs = [json.loads(ln) for ln in lines]
    assert [r["frame"] for r in recs] == list(range(25))
    for r in recs:
        assert r["label"] in ("normal", "cyst", "mass") and r["abstain"] is False
        assert abs(sum(r["probs"].values()) - 1) < 1e-5
        assert set(r["latency_ms"]) == {"capture", "preprocess", "infer", "postprocess", "total"}
        assert r["latency_ms"]["total"] >= r["latency_ms"]["infer"]
    stats = s.to_dict()["stages_ms"]
    assert set(stats) == set(STAGES) | {"latency"} and all(v["n"] == 25 for v in stats.values())


def test_fake_backend_logits_drive_the_decision(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    # Class 2 ("mass") always wins by a wide margin.
    with FakeBackend((1, 32, 32), 3, fn=lambda x: np.tile(np.array([[-9, -9, 9]], np.float32), (len(x), 1))) as be, \
            open_source("synthetic:ultrasound?frames=5") as src:
        mem = ListSink()
        run_pipeline(b, src, be, [mem])
    assert [r["label"] for r in mem.records] == ["mass"] * 5


def test_run_bundle_writes_as_many_lines_as_frames(bundle_dir: Path, tmp_path: Path) -> None:
    from edgeclf.runtime.synthetic import write_cine

    video = tmp_path / "c.mp4"
    tl = write_cine(video, timeline=[(0, 12), (1, 13)], size=96, fps=10)
    s = run_bundle(str(bundle_dir), str(video), out=str(tmp_path / "r.jsonl"))
    assert s["frames"] == tl["frames"] == 25 == len((tmp_path / "r.jsonl").read_text().splitlines())
    assert s["frame_count_claimed"] == 25


def test_verify_bundle_rechecks_reference_outputs(bundle_dir: Path) -> None:
    r = verify_bundle(str(bundle_dir))
    assert r["reference"]["n"] > 0 and r["reference"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("module", ["edgeclf.runtime.app", "edgeclf.runtime.pipeline", "edgeclf.devices"])
def test_runtime_never_imports_torch(module: str) -> None:
    code = f"import sys, {module}; bad = [m for m in ('torch', 'edgeclf.export', 'sklearn') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_run_help_loads_no_torch() -> None:
    code = ("import sys; from edgeclf.cli import main\n"
            "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "sys.exit('torch' in sys.modules or 'onnxruntime' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--bundle" in r.stdout, r.stderr
