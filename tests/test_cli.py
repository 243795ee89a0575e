"""The CLI as a user meets it: one clear line and exit code 2 for their mistakes, JSON on stdout with --json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

COMMANDS = [[], ["demo"], ["data"], ["data", "synth"], ["train"], ["evaluate"], ["export"], ["run"], ["bundle"],
            ["bundle", "info"], ["bundle", "verify"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "edgeclf")
def test_help_on_every_command(cmd: list[str]) -> None:
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout, r.stderr


def _one_line_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeclf: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_path(tmp_path: Path) -> None:
    _one_line_error(run_cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "does not exist")
    _one_line_error(run_cli("run", "--bundle", str(tmp_path / "nope"), "--source", "synthetic:ultrasound"), "does not exist")


def test_unknown_model_name(tmp_path: Path) -> None:
    _one_line_error(run_cli("train", "--data", "synthetic:ultrasound", "--model", "resnet999", "--out", str(tmp_path)),
                    "resnet999", "compact")


def test_npz_without_expected_arrays(tmp_path: Path) -> None:
    f = tmp_path / "bad.npz"
    np.savez(f, images=np.zeros((3, 8, 8), np.uint8))
    _one_line_error(run_cli("train", "--data", str(f), "--out", str(tmp_path / "o")), "train_images")


def test_unreadable_video(bundle_dir: Path, tmp_path: Path) -> None:
    v = tmp_path / "clip.mp4"
    v.write_text("this is not a video")
    _one_line_error(run_cli("run", "--bundle", str(bundle_dir), "--source", str(v)), "clip.mp4")


@pytest.mark.parametrize("name", ["manifest.json", "model.onnx", "reference.npz"])
def test_bundle_with_a_changed_byte(bundle_copy: Path, name: str) -> None:
    p = bundle_copy / name
    data = bytearray(p.read_bytes())
    data[-10] ^= 0x20
    p.write_bytes(bytes(data))
    for cmd in (["bundle", "verify", str(bundle_copy)], ["run", "--bundle", str(bundle_copy), "--source", "synthetic:ultrasound"],
                ["evaluate", "--model", str(bundle_copy)]):
        _one_line_error(run_cli(*cmd), name)


def test_usage_errors_are_one_line_too() -> None:
    _one_line_error(run_cli("train", "--epochs", "many"), "many")
    _one_line_error(run_cli("evaluate", "--split", "holdout", "--model", "x"), "holdout")


def test_json_output_is_exactly_one_document(bundle_dir: Path, tmp_path: Path) -> None:
    r = run_cli("bundle", "info", str(bundle_dir), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "edgeclf-bundle" and doc["labels"] == ["normal", "cyst", "mass"]
    out = tmp_path / "r.jsonl"
    r = run_cli("run", "--bundle", str(bundle_dir), "--source", "synthetic:ultrasound?frames=30", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["frames"] == doc["written"] == 30 == len(out.read_text().splitlines())
    r = run_cli("bundle", "verify", str(bundle_dir), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["checksums"] == "ok"


def test_data_synth_writes_loadable_sets(tmp_path: Path) -> None:
    from edgeclf.data import load_dataset

    r = run_cli("data", "synth", "ultrasound", "--out", str(tmp_path / "us"), "--n", "60", "--size", "48", "--json")
    assert r.returncode == 0, r.stderr
    ds = load_dataset(json.loads(r.stdout)["folder"])
    assert ds.labels == ["cyst", "mass", "normal"] and sum(len(s) for s in ds.splits.values()) == 60
    r = run_cli("data", "synth", "xray", "--out", str(tmp_path / "xr"), "--n", "60", "--size", "48", "--json")
    ds = load_dataset(json.loads(r.stdout)["npz"])
    assert ds.task == "multilabel" and ds.labels == ["consolidation", "nodule", "effusion"]
    r = run_cli("data", "synth", "cine", "--out", str(tmp_path / "cine"), "--size", "64", "--json")
    doc = json.loads(r.stdout)
    tl = json.loads(Path(doc["timeline"]).read_text())
    assert Path(doc["video"]).is_file() and tl["frames"] == doc["frames"] == tl["segments"][-1]["end"]


def test_human_output_renders_for_bundle_run_and_evaluate(bundle_dir: Path) -> None:
    r = run_cli("bundle", "info", str(bundle_dir))
    assert r.returncode == 0 and "parity:" in r.stdout and "metrics[val_onnx_fp32]" in r.stdout, r.stderr
    r = run_cli("run", "--bundle", str(bundle_dir), "--source", "synthetic:ultrasound", "--max-frames", "7")
    assert r.returncode == 0 and "7 frames" in r.stdout and "infer" in r.stdout, r.stderr
    r = run_cli("evaluate", "--model", str(bundle_dir), "--split", "val")
    assert r.returncode == 0 and "AUC (95% CI)" in r.stdout and "[val] at the recorded operating points" in r.stdout, r.stderr
    r = run_cli("bundle", "verify", str(bundle_dir))
    assert r.returncode == 0 and r.stdout.startswith("OK "), r.stderr


def test_out_of_range_numbers_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    _one_line_error(run_cli("run", "--bundle", str(bundle_dir), "--source", "synthetic:ultrasound", "--max-frames", "0"), "max-frames")
    _one_line_error(run_cli("train", "--data", "synthetic:ultrasound", "--out", str(tmp_path), "--batch-size", "1"), "batch-size")
    _one_line_error(run_cli("train", "--data", "synthetic:ultrasound", "--out", str(tmp_path), "--threads", "-1"), "threads")


def test_low_confidence_frames_abstain_and_are_counted(bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    r = run_cli("run", "--bundle", str(bundle_dir), "--source", "synthetic:ultrasound?frames=20", "--out", str(out),
                "--min-confidence", "0.999999", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    abstained = [x for x in recs if x["abstain"]]
    assert len(recs) == 20 and doc["abstained"] == len(abstained) > 0
    assert all(x["label"] is None and x["abstain_reason"] == "low_confidence" for x in abstained)
    assert all(max(x["probs"].values()) < 0.999999 for x in abstained)


def test_a_bad_source_does_not_truncate_earlier_results(bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text('{"frame": 0}\n')
    _one_line_error(run_cli("run", "--bundle", str(bundle_dir), "--source", str(tmp_path / "typo.mp4"), "--out", str(out)))
    assert out.read_text() == '{"frame": 0}\n'
