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
    r = run_cli("run", "--bundle", str(bundle_dir), "--source", str(v))
    _one_line_error(r, "the source video (.mp4)")
    assert "clip" not in r.stderr  # named by kind and extension, never by path (names may carry a patient's name)


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


def test_data_synth_prints_a_summary_without_json(tmp_path: Path) -> None:
    """It printed the JSON document with or without --json."""
    r = run_cli("data", "synth", "ultrasound", "--out", str(tmp_path / "us"), "--n", "30", "--size", "32")
    assert r.returncode == 0, r.stderr
    assert not r.stdout.lstrip().startswith("{"), r.stdout
    assert r.stdout.startswith(f"wrote 30 synthetic ultrasound images (classes normal, cyst, mass) to {tmp_path / 'us'}"), r.stdout


def test_human_output_renders_for_bundle_run_and_evaluate(bundle_dir: Path) -> None:
    r = run_cli("bundle", "info", str(bundle_dir))
    assert r.returncode == 0 and "parity:" in r.stdout and "metrics[val_onnx_fp32]" in r.stdout, r.stderr
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert f"deploy: {m['deploy']['precision']} ({m['deploy']['reason']})" in r.stdout  # what a device runs by default
    assert f"data {m['provenance']['data']['name']} " in r.stdout and "data None" not in r.stdout
    r = run_cli("run", "--bundle", str(bundle_dir), "--source", "synthetic:ultrasound", "--max-frames", "7")
    assert r.returncode == 0 and "7 frames" in r.stdout and "infer" in r.stdout, r.stderr
    r = run_cli("evaluate", "--model", str(bundle_dir), "--split", "val")
    assert r.returncode == 0 and "AUC (95% CI)" in r.stdout and "[val] at the recorded operating points" in r.stdout, r.stderr
    r = run_cli("bundle", "verify", str(bundle_dir))
    assert r.returncode == 0 and r.stdout.startswith("OK "), r.stderr


def test_out_of_range_numbers_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    _one_line_error(run_cli("run", "--bundle", str(bundle_dir), "--source", "synthetic:ultrasound", "--max-frames", "0"), "max-frames")
    _one_line_error(run_cli("run", "--bundle", str(bundle_dir), "--source", "synthetic:ultrasound", "--batch", "0"), "batch")
    _one_line_error(run_cli("train", "--data", "synthetic:ultrasound", "--out", str(tmp_path), "--batch-size", "1"), "batch-size")
    _one_line_error(run_cli("train", "--data", "synthetic:ultrasound", "--out", str(tmp_path), "--threads", "-1"), "threads")


def test_run_batch_reaches_the_pipeline_and_is_reported(bundle_dir: Path) -> None:
    r = run_cli("run", "--bundle", str(bundle_dir), "--source", "synthetic:ultrasound?frames=9", "--batch", "4", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["batch"] == 4 and doc["frames"] == 9 and doc["read_not_classified"] == 0


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


# -- device side: profiles, detection, engines, parity on the device (no TensorRT here) -------------------------

SAMPLES = Path(__file__).resolve().parent / "devices" / "samples"
NEW_COMMANDS = [["devices"], ["devices", "list"], ["devices", "show"], ["devices", "detect"], ["build-engine"], ["bundle", "check"],
                ["profile"]]


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    from tests.runtime.tiny_bundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path / "tiny", variants=["int8-tensorrt"])


def _no_tensorrt() -> None:
    from edgeclf.runtime.engine import tensorrt_missing

    if tensorrt_missing() is None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT error cannot be shown")


@pytest.mark.parametrize("cmd", NEW_COMMANDS, ids=lambda c: " ".join(c))
def test_help_on_device_commands(cmd: list[str]) -> None:
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout, r.stderr


def test_devices_list_and_show() -> None:
    r = run_cli("devices", "list")
    assert r.returncode == 0, r.stderr
    for name in ("jetson-xavier-nx", "jetson-agx-xavier", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "x86-cpu", "x86-nvidia-gpu"):
        assert name in r.stdout
    doc = json.loads(run_cli("devices", "list", "--json").stdout)
    assert {d["name"]: d["dla_cores"] for d in doc}["jetson-orin-nano"] == 0
    r = run_cli("devices", "show", "jetson-xavier-nx")
    assert r.returncode == 0 and "compute capability 7.2" in r.stdout and "8 MODE_20W_6CORE" in r.stdout, r.stderr
    assert "csi capture (--source): nvarguscamerasrc sensor-id=0" in r.stdout
    _one_line_error(run_cli("devices", "show", "jetson-tx2"), "jetson-tx2", "x86-cpu")


def test_devices_detect_from_sample_files() -> None:
    r = run_cli("devices", "detect", "--root", str(SAMPLES / "jetson-agx-orin"))
    assert r.returncode == 0 and r.stdout.startswith("profile: jetson-agx-orin\nbecause:\n"), r.stderr
    assert "'NVIDIA Jetson AGX Orin Developer Kit' -> jetson-agx-orin" in r.stdout
    doc = json.loads(run_cli("devices", "detect", "--root", str(SAMPLES / "jetson-xavier-nx"), "--json").stdout)
    assert doc["profile"] == "jetson-xavier-nx" and doc["facts"]["l4t"] == "35.4.1"
    r = run_cli("devices", "detect", "--root", str(SAMPLES / "jetson-nano"))
    assert r.returncode == 1 and r.stdout.startswith("no device profile fits this machine"), r.stderr


def test_build_engine_prints_trtexec_for_the_profiles_tensorrt(tiny_bundle: Path) -> None:
    r = run_cli("build-engine", "--bundle", str(tiny_bundle), "--device", "jetson-orin-nx", "--precision", "int8", "--dla", "1",
                "--print-trtexec", "--cache", "/tmp/engines")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert line.startswith(f"trtexec --onnx={tiny_bundle / 'model.int8-tensorrt.onnx'} --minShapes=input:1x1x8x8 ")
    # int8 builds enable fp16 too (DLA runs fp16/int8 only; layers without Q/DQ would fall back to fp32 on the GPU),
    # TF32 off as Polygraphy builds it, and a DLA engine has one fixed batch (DLA has no dynamic shapes).
    assert " --fp16 --int8 --noTF32 --memPoolSize=workspace:2048M --useDLACore=1 --allowGPUFallback --saveEngine=/tmp/engines/jetson-orin-nx-int8-dla1-" in line
    assert "--maxShapes=input:1x1x8x8" in line
    assert line.endswith("--timingCacheFile=/tmp/engines/timing-trt10.3-sm87.cache")
    assert "TensorRT 10.3" in r.stderr
    r = run_cli("build-engine", "--bundle", str(tiny_bundle), "--device", "jetson-xavier-nx", "--precision", "fp16", "--print-trtexec",
                "--trt-version", "8.6", "--json")
    doc = json.loads(r.stdout)
    assert doc["tensorrt"] == "8.6" and "--fp16" in doc["command"] and "--memPoolSize=workspace:1024" in doc["command"]


def test_build_engine_refuses_dla_on_orin_nano_in_one_line(tiny_bundle: Path) -> None:
    _one_line_error(run_cli("build-engine", "--bundle", str(tiny_bundle), "--device", "jetson-orin-nano", "--dla", "0"),
                    "jetson-orin-nano has no DLA cores", "leave --dla out")


def test_build_engine_and_run_trt_without_tensorrt_name_what_to_install(tiny_bundle: Path) -> None:
    _no_tensorrt()
    _one_line_error(run_cli("build-engine", "--bundle", str(tiny_bundle), "--device", "jetson-orin-nx"),
                    "TensorRT is not available here", "python3-libnvinfer", 'pip install "tensorrt<11"', "polygraphy")
    _one_line_error(run_cli("run", "--bundle", str(tiny_bundle), "--source", "synthetic:ultrasound", "--backend", "trt"),
                    "TensorRT is not available here", "python3-libnvinfer", "polygraphy")
    _one_line_error(run_cli("bundle", "check", str(tiny_bundle), "--backend", "trt", "--device", "jetson-orin-nano"),
                    "python3-libnvinfer")


def test_cli_backend_names_are_the_runtimes() -> None:
    from edgeclf.cli import BACKEND_NAMES
    from edgeclf.runtime.backends import BACKENDS

    assert BACKEND_NAMES == BACKENDS


def test_unknown_backend_is_one_line(tiny_bundle: Path) -> None:
    _one_line_error(run_cli("run", "--bundle", str(tiny_bundle), "--source", "synthetic:ultrasound", "--backend", "tensorrt"),
                    "'tensorrt'", "ort-cpu, ort-cuda, ort-tensorrt, trt")


def test_bundle_check_on_ort_cpu(tiny_bundle: Path) -> None:
    r = run_cli("bundle", "check", str(tiny_bundle), "--backend", "ort-cpu")
    assert r.returncode == 0, r.stderr
    assert "agreement vs fp32" in r.stdout and "int8-tensorrt" in r.stdout and r.stdout.rstrip().endswith("manifest valid)")
    doc = json.loads(run_cli("bundle", "check", str(tiny_bundle), "--backend", "ort-cpu", "--json").stdout)
    ref = doc["reference"]
    assert ref["backend"] == "ort-cpu" and ref["chosen_by"] == "argument" and ref["decision_agreement"] == 1.0
    assert ref["vs_fp32"]["max_abs_diff"] < 1e-4
    r = run_cli("bundle", "verify", str(tiny_bundle))  # the older name keeps working
    assert r.returncode == 0 and r.stdout.startswith("OK "), r.stderr


def test_run_on_a_device_profile_falls_back_to_what_runs_here(tiny_bundle: Path) -> None:
    from edgeclf.runtime.backends import available_backends

    if set(available_backends()) & {"trt", "ort-tensorrt", "ort-cuda"}:
        pytest.skip("this machine runs a GPU backend: no fallback to show")
    r = run_cli("run", "--bundle", str(tiny_bundle), "--source", "synthetic:ultrasound?frames=3&size=64", "--device", "jetson-orin-nx",
                "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    from edgeclf.runtime.backends import default_threads

    # The profile's 6 threads, capped at the cores this process may use (2 on the CI machines).
    assert doc["backend"] == "ort-cpu" and doc["threads"] == min(6, default_threads()) and "passed over trt" in doc["chosen_by"]["backend"]
    assert ("capped" in doc["chosen_by"]["threads"]) == (default_threads() < 6)
    assert "WARNING" in r.stderr and "prefers trt, falling back" in r.stderr


def test_clip_table_shows_abstained_clips_and_run_names_the_shown_label_majority(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeclf.cli import _print_clips, _print_run

    m = {"n": 8, "abstained": 2, "accuracy": 0.75, "balanced_accuracy": 0.7, "per_class": {"a": {"sensitivity": 0.5}}}
    _print_clips({"clips": 10, "frames": 100, "clip_mean": m, "clip_vote": m, "frame": dict(m, n=90, abstained=10)})
    out = capsys.readouterr().out
    assert "abstained" in out.splitlines()[1]  # the header: figures over n decided, the rest counted beside them
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("clip,", "frame"))]
    assert [r[4] if r[0] == "clip," else r[2] for r in rows] == ["2", "2", "10"]  # after the 3-word level and n
    stage = {"median": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}
    _print_run({"frames": 3, "wall_s": 0.1, "fps": 30, "written": 3, "abstained": 0, "stages_ms": {"infer": stage},
                "label_counts": {"a": 3}, "clip": {"majority_label": "a", "abstain_rate": 0.0,
                                                   "decision": {"frames": 3, "used": 3, "abstained": 0, "mean_label": "a",
                                                                "vote_label": "a"}}})
    out = capsys.readouterr().out
    assert "shown labels (after smoothing): most frames a" in out and "clip decision (as `edgeclf evaluate`" in out


def test_the_clip_decision_line_does_not_call_settling_frames_unabstained(capsys: pytest.CaptureFixture[str]) -> None:
    """The run's title counted 6 abstained (2 blank, 4 settling) and the decision line said '(2 abstained)': settling
    frames are classified and count in the decision; what the decision leaves out is said as such."""
    from edgeclf.cli import _print_run

    stage = {"median": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}
    dec = {"frames": 20, "used": 18, "abstained": 2, "mean_label": "a", "vote_label": "a"}
    _print_run({"frames": 20, "wall_s": 0.1, "fps": 30, "written": 20, "abstained": 6, "stages_ms": {"infer": stage},
                "label_counts": {"a": 14}, "clip": {"majority_label": "a", "abstain_rate": 0.3, "decision": dec}})
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("clip decision"))
    assert "over 18 of 20 frames (2 left out: not classified or under the confidence floor)" in line, line


def test_evaluate_clip_table_names_the_sampling(tmp_path: Path) -> None:
    """`edgeclf evaluate` aggregates k frames sampled per clip, `edgeclf run` every frame: the printed clip table and its
    JSON must say so, else the two printed figures read as one aggregation over the same frames."""
    cv2 = pytest.importorskip("cv2")
    from click.testing import CliRunner

    from edgeclf.cli import cli
    from tests.runtime.tiny_bundle import make_tiny_bundle

    rng = np.random.default_rng(0)
    b = make_tiny_bundle(tmp_path / "b")
    labels = json.loads((b / "manifest.json").read_text())["labels"]
    for c in labels:
        (tmp_path / "clips" / c).mkdir(parents=True)
        vw = cv2.VideoWriter(str(tmp_path / "clips" / c / "a.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
        for _ in range(40):
            vw.write(cv2.cvtColor(rng.integers(30, 220, (64, 64), dtype=np.uint8), cv2.COLOR_GRAY2BGR))
        vw.release()
    args = ["evaluate", "--model", str(b), "--data", str(tmp_path / "clips"), "--split", "all", "--classes", ",".join(labels)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert f"{len(labels)} clips, 24 frames (8 sampled evenly per clip; `edgeclf run` aggregates every frame" in res.output
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["clips"]["frames_per_clip"] == 8, res.output


def test_clip_table_without_a_sampling_says_none(capsys: pytest.CaptureFixture[str]) -> None:
    """Reports that record no frames_per_clip (cross-validation's pooled figures, older metrics.json) keep their title."""
    from edgeclf.cli import _abstain_why, _print_clips

    m = {"n": 8, "abstained": 0, "accuracy": 0.75, "balanced_accuracy": 0.7, "per_class": {"a": {"sensitivity": 0.5}}}
    _print_clips({"clips": 8, "frames": 64, "clip_mean": m, "clip_vote": m, "frame": m})
    assert capsys.readouterr().out.startswith("8 clips, 64 frames (intervals: bootstrap over clips)")
    # The frame table's title names why frames abstained: the floor in words, the gate's reasons as run counts them.
    assert _abstain_why({"min_confidence": 0.8, "abstain_reasons": {"low_confidence": 3}}) == \
        "decided class's probability below min_confidence 0.8"
    assert _abstain_why({"min_confidence": 0.8, "abstain_reasons": {"blank": 4, "low_confidence": 1}}) == \
        "4 blank, 1 decided class's probability below min_confidence 0.8"


def test_build_engine_help_names_the_whole_cache_key_and_default_folder() -> None:
    """The help must say what runtime/engine.py keys engines by (GPU name, batch profile and workspace too) and where
    they go without $EDGECLF_ENGINE_CACHE and $XDG_CACHE_HOME (~/.cache/edgeclf/engines)."""
    from edgeclf.runtime.engine import KEY_FIELDS

    r = run_cli("build-engine", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for part in ("device profile", "TensorRT version", "compute capability", "GPU name", "precision", "DLA core",
                 "bundle's checksum", "batch profile", "workspace"):
        assert part in text, part
    assert len(KEY_FIELDS) == 9  # one named above per key field: a new one must be named in the help too
    assert "$XDG_CACHE_HOME/edgeclf/engines, else ~/.cache/edgeclf/engines" in text


def test_cv_summary_names_the_recipes_reported_clip_figure(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeclf.cli import _print_cv

    def fig(bal: float) -> dict:
        return {"n": 10, "abstained": 0, "accuracy": 0.7, "accuracy_ci95": [0.5, 0.9], "balanced_accuracy": bal,
                "balanced_accuracy_ci95": [bal - 0.1, bal + 0.1], "per_class": {}}

    fold = {"fold": 0, "test_items": 40, "test_clips": 10, "test": {"accuracy": 0.7, "balanced_accuracy": 0.6}, "test_sources": ["a"]}
    r = {"folds": [fold], "data": {"grouped_by": "source"}, "seconds": 1.0, "recipe": {"name": "lung-pocus", "evaluate": {"aggregate": "vote"}},
         "pooled_out_of_fold": {"clips": 10, "frames": 40, "clip_mean": fig(0.61), "clip_vote": fig(0.66), "frame": fig(0.55)}}
    _print_cv(r)
    out = capsys.readouterr().out
    assert "reported figure (recipe lung-pocus: [evaluate] aggregate = vote): clip balanced accuracy 0.660 (0.560-0.760)" in out
    del r["recipe"]
    _print_cv(r)
    assert "reported figure" not in capsys.readouterr().out  # no recipe, nothing claimed


def _edgeclf(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`edgeclf ARGS` in this process (main: the user's exit codes and one-line errors): (code, stdout, stderr)."""
    from edgeclf.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_run_watch_without_out_is_one_line_exit_2_and_consumes_nothing(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cv2 = pytest.importorskip("cv2")
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = tmp_path / "in"
    inbox.mkdir()
    cv2.imwrite(str(inbox / "x.png"), np.full((32, 32), 90, np.uint8))
    state = tmp_path / "state.json"
    code, out, err = _edgeclf(capsys, "run", "--bundle", str(bundle), "--source", f"watch:{inbox}?idle_exit=0.3&state={state}",
                              "--audit", str(tmp_path / "audit.jsonl"))
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("edgeclf: error: --source watch:") and "give --out results.jsonl" in lines[0]
    assert not state.exists() and not (tmp_path / "audit.jsonl").exists()


def _sector_tiny_bundle(folder: Path) -> Path:
    from edgeclf.runtime.bundle import write_checksums
    from tests.runtime.tiny_bundle import make_tiny_bundle

    make_tiny_bundle(folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["preprocess"]["sector"] = True
    m["provenance"]["data"] = {"name": "pocus?frames=8&roi=sector", "kind": "clips"}
    (folder / "manifest.json").write_text(json.dumps(m))
    write_checksums(folder)
    return folder


def test_run_without_roi_crops_a_sector_bundle_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    bundle = str(_sector_tiny_bundle(tmp_path / "b"))
    code, out, _ = _edgeclf(capsys, "run", "--bundle", bundle, "--source", "synthetic:ultrasound?frames=6&size=64", "--json")
    s = json.loads(out)
    assert code == 0 and s["roi"]["mode"] == "sector" and s["preprocess_parts_ms"]["sector"]["n"] == 6
    code, out, err = _edgeclf(capsys, "run", "--bundle", bundle, "--source", "synthetic:ultrasound?frames=6&size=64", "--roi", "none")
    assert code == 0 and "WARNING roi none: the model was trained on sector crops" in out, out


def _clip_folder(root: Path) -> Path:
    for cls in ("normal", "cyst", "mass"):
        (root / cls).mkdir(parents=True)
        (root / cls / "c0.avi").write_bytes(b"")  # the layout is judged by file names
    return root


def test_evaluate_crops_the_clips_of_a_sector_model_unless_the_data_names_a_roi(tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from edgeclf.evaluate import _sector_spec
    from edgeclf.runtime.bundle import load_bundle

    # The spec evaluate() reads for this bundle and --data (the training data's recorded options, when the data is the
    # training data by content, are tested in tests/test_evaluate_training_data.py).
    def _sector_data_spec(target: str, data: str) -> str:
        return _sector_spec(data, target) if load_bundle(target).manifest.trained_on_sector else data

    bundle = str(_sector_tiny_bundle(tmp_path / "b"))
    other = _clip_folder(tmp_path / "new_site")
    assert _sector_data_spec(bundle, str(other)) == f"{other}?roi=sector"
    assert _sector_data_spec(bundle, f"{other}?frames=4") == f"{other}?frames=4&roi=sector"
    with caplog.at_level(logging.WARNING):
        assert _sector_data_spec(bundle, f"{other}?roi=none") == f"{other}?roi=none"  # asked for: kept, with a warning
    assert any("trained on sector crops" in r.getMessage() for r in caplog.records)
    from tests.runtime.tiny_bundle import make_tiny_bundle

    plain = str(make_tiny_bundle(tmp_path / "plain"))
    assert _sector_data_spec(plain, str(other)) == str(other)  # a model of whole frames: the data as given


# -- outputs are never replaced or mixed silently; options without effect are refused ---------------------------

def _refused_in_one_line(res, *words: str) -> str:  # type: ignore[no-untyped-def]
    from edgeclf.errors import EdgeclfError

    assert isinstance(res.exception, EdgeclfError), (res.output, res.exception)
    msg = str(res.exception)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_data_synth_refuses_a_used_out_a_file_and_size_0(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeclf.cli import cli

    def synth(*args: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(cli, ["data", "synth", *args])

    assert synth("ultrasound", "--out", str(tmp_path / "us"), "--n", "30", "--size", "32").exit_code == 0
    _refused_in_one_line(synth("ultrasound", "--out", str(tmp_path / "us"), "--n", "30", "--size", "32"), "not empty")
    assert sum(1 for p in (tmp_path / "us").rglob("*.png")) == 30  # nothing mixed in
    (tmp_path / "afile.txt").write_text("mine")
    for kind in ("ultrasound", "xray", "cine"):
        _refused_in_one_line(synth(kind, "--out", str(tmp_path / "afile.txt")), "is a file")
    assert (tmp_path / "afile.txt").read_text() == "mine"
    _refused_in_one_line(synth("ultrasound", "--out", str(tmp_path / "z"), "--size", "0"), "size=0")
    _refused_in_one_line(synth("cine", "--out", str(tmp_path / "c"), "--n", "5"), "--n", "ultrasound", "xray")
    _refused_in_one_line(synth("cine", "--out", str(tmp_path / "us")), "not empty")
    (tmp_path / "c.mp4").write_text("")
    _refused_in_one_line(synth("cine", "--out", str(tmp_path / "c.mp4")), "exists")
    help_text = " ".join(CliRunner().invoke(cli, ["data", "synth", "--help"], terminal_width=200).output.split())
    assert "ultrasound and xray only" in help_text


def test_evaluate_refuses_an_out_that_is_a_file_before_evaluating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import edgeclf.evaluate
    from edgeclf.cli import cli

    monkeypatch.setattr(edgeclf.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before --out was checked"))
    (tmp_path / "afile.txt").write_text("")
    res = CliRunner().invoke(cli, ["evaluate", "--model", str(tmp_path), "--data", "synthetic:ultrasound", "--out",
                                   str(tmp_path / "afile.txt")])
    _refused_in_one_line(res, "--out", "is a file")


@pytest.mark.parametrize("flag", [["--target-sensitivity", "0.8"], ["--positive", "cyst"], ["--size", "64"], ["--channels", "1"],
                                  ["--labels", "a,b"], ["--task", "binary"], ["--mean", "0.5"], ["--std", "0.5"]])
def test_export_of_a_trained_model_refuses_the_import_only_options(flag: list[str], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import edgeclf.export.bundle_writer as bw
    from edgeclf.cli import cli

    monkeypatch.setattr(bw, "export_bundle", lambda cfg: pytest.fail("exported with an option that has no effect"))
    res = CliRunner().invoke(cli, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "b"), *flag])
    msg = _refused_in_one_line(res, flag[0], "--from-onnx")
    if flag[0] == "--target-sensitivity":
        assert "edgeclf train --target-sensitivity" in msg
    help_text = " ".join(CliRunner().invoke(cli, ["export", "--help"], terminal_width=300).output.split())
    assert help_text.count("(--from-onnx/--from-torch only)") == 8


def test_export_of_a_trained_model_with_defaults_reaches_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import edgeclf.export.bundle_writer as bw
    from edgeclf.cli import cli

    seen = {}

    def stub(cfg):  # type: ignore[no-untyped-def]
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(bw, "export_bundle", stub)
    CliRunner().invoke(cli, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "b")])
    assert seen["cfg"].target_sensitivity == 0.9 and seen["cfg"].size is None


def test_train_and_ensemble_refuse_an_out_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile.txt").write_text("mine")
    r = run_cli("train", "--data", "synthetic:ultrasound?n=90&size=32", "--out", str(tmp_path / "afile.txt"), "--epochs", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a file" in r.stderr, r.stderr
    r = run_cli("ensemble", "--member", str(tmp_path / "a"), "--member", str(tmp_path / "b"), "--out", str(tmp_path / "afile.txt"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a file" in r.stderr, r.stderr
    assert (tmp_path / "afile.txt").read_text() == "mine"


def test_profile_compare_of_two_machines_is_one_line_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.runtime.test_profile import _doc

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_doc(4, "x86_64", 2.0)))
    new.write_text(json.dumps(_doc(4, "aarch64", 2.0)))
    code, out, err = _edgeclf(capsys, "profile", "compare", str(old), str(new))
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and "different machines" in lines[0] and "--allow-other-host" in lines[0]
    code, out, err = _edgeclf(capsys, "profile", "compare", str(old), str(new), "--allow-other-host", "--json")
    assert code == 0 and json.loads(out)["host_differences"] == ["machine: 'x86_64' -> 'aarch64'"]
    assert "warning: the profiles come from different machines" in err


# ---------------------------------------------------------------- bundle info / verify on manifests load accepts


def _edit_manifest(b: Path, **fields: object) -> None:
    from edgeclf.runtime.bundle import write_checksums

    m = json.loads((b / "manifest.json").read_text())
    m.update(fields)
    (b / "manifest.json").write_text(json.dumps(m))
    write_checksums(b)


def test_bundle_info_fills_in_optional_preprocess_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = make_tiny_bundle(tmp_path / "b")  # preprocess without "resize": optional, "stretch" by default
    code, out, err = _edgeclf(capsys, "bundle", "info", str(b))
    assert code == 0, err
    assert "preprocess: 1 ch, 8x8 stretch" in out


@pytest.mark.parametrize("key, value, shown", [
    ("provenance", {"source": "tests", "data": "ultrasound"}, "data None (sha256 None..."),  # data: a string, not an object
    ("metrics", {"val": 0.93}, "metrics[val]: n n/a, accuracy n/a, AUC n/a"),              # an entry: a number
    ("metrics", {"val": {"n": 5, "accuracy": "high", "auc": {"macro": 0.9, "macro_ci95": "x"}}},
     "metrics[val]: n 5, accuracy n/a, AUC 0.900 (n/a-n/a)"),
    ("parity", {"n": 6, "max_abs_diff_logits": "small"}, "max |logit diff| n/a"),             # a figure: a string
])
def test_bundle_info_shows_mistyped_informational_fields_as_na(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                key: str, value: object, shown: str) -> None:
    from edgeclf.runtime.bundle import load_bundle
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = make_tiny_bundle(tmp_path / "b")
    _edit_manifest(b, **{key: value})
    load_bundle(b)  # open objects: accepted at load, so info must print them
    code, out, err = _edgeclf(capsys, "bundle", "info", str(b))
    assert code == 0 and "Traceback" not in err, err
    assert shown in out, out


def test_bundle_verify_with_a_reference_without_inputs_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeclf.runtime.bundle import write_checksums
    from tests.runtime.tiny_bundle import make_tiny_bundle

    pytest.importorskip("onnxruntime")
    b = make_tiny_bundle(tmp_path / "b")
    np.savez(b / "reference.npz", logits=np.zeros((6, 3), np.float32))
    write_checksums(b)  # a valid checksum: only the content is wrong
    code, out, err = _edgeclf(capsys, "bundle", "verify", str(b))
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("edgeclf: error: ") and "'reference.npz' is not an npz with inputs" in lines[0]


def test_bundle_verify_refuses_a_reference_that_names_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = make_tiny_bundle(tmp_path / "b")
    _edit_manifest(b, reference={"file": "model.onnx", "count": 6})
    code, out, err = _edgeclf(capsys, "bundle", "verify", str(b))
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert "manifest.reference.file is 'model.onnx'" in lines[0]
