"""`edgeclf run` (and `profile`, `evaluate`, `build-engine`, `bundle check`) outputs that would destroy something are
refused up front in one line (exit 2); what the run summary says is true (results kept or not, multilabel counts)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.runtime.tiny_bundle import inbox_with_one_xray, make_tiny_bundle

SRC = "synthetic:ultrasound?frames=4&size=64"


def _main(*argv: str) -> tuple[int, str, str]:
    from edgeclf.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out), pytest.raises(SystemExit) as ex:
        main(list(argv))
    return int(ex.value.code or 0), out.getvalue(), err.getvalue()


def _one_line(res: tuple[int, str, str], *needles: str) -> str:
    code, _, err = res
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("edgeclf: error: "), (code, err[-2000:])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _never(what: str) -> Any:
    def called(*a: Any, **k: Any) -> None:
        raise AssertionError(f"{what} started although its output is refused")

    return called


# -- an existing results file is never replaced silently ---------------------------------------------------------

def test_run_refuses_to_replace_an_earlier_results_file_unless_told(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    bundle = str(make_tiny_bundle(tmp_path / "b"))
    out = tmp_path / "r.jsonl"
    assert _main("run", "--bundle", bundle, "--source", SRC, "--out", str(out))[0] == 0
    first = out.read_text()
    assert len(first.splitlines()) == 4
    _one_line(_main("run", "--bundle", bundle, "--source", SRC, "--out", str(out)), "--out", "--append", "--overwrite")
    assert out.read_text() == first
    assert _main("run", "--bundle", bundle, "--source", SRC, "--out", str(out), "--append")[0] == 0
    assert len(out.read_text().splitlines()) == 8
    assert _main("run", "--bundle", bundle, "--source", SRC, "--out", str(out), "--overwrite")[0] == 0
    assert len(out.read_text().splitlines()) == 4
    _one_line(_main("run", "--bundle", bundle, "--source", SRC, "--out", str(out), "--append", "--overwrite"),
              "--append", "--overwrite")


def test_run_overwrite_needs_out(tmp_path: Path) -> None:
    _one_line(_main("run", "--bundle", str(tmp_path), "--source", SRC, "--overwrite"), "--overwrite", "--out")


def test_a_second_watch_run_without_append_is_refused_and_keeps_the_results(tmp_path: Path) -> None:
    """The reviewer's case: the second run truncated w.jsonl while the state kept the file done (never read again)."""
    pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    bundle = str(make_tiny_bundle(tmp_path / "b"))
    inbox = inbox_with_one_xray(tmp_path)
    uri = f"watch:{inbox}?poll=0.05&idle_exit=0.3"
    out = tmp_path / "w.jsonl"
    assert _main("run", "--bundle", bundle, "--source", uri, "--out", str(out))[0] == 0
    assert len(out.read_text().splitlines()) == 1
    for extra in ((), ("--overwrite",)):
        _one_line(_main("run", "--bundle", bundle, "--source", uri, "--out", str(out), *extra), "--append", "watch state")
    assert len(out.read_text().splitlines()) == 1


# -- outputs inside a source folder or the bundle folder -----------------------------------------------------------

def test_run_out_on_a_file_of_the_source_folder_is_refused(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((32, 32), 90, np.uint8))
    data = (folder / "a.png").read_bytes()
    for opt in ("--out", "--summary"):
        _one_line(_main("run", "--bundle", str(tmp_path / "b"), "--source", str(folder), opt, str(folder / "a.png")),
                  opt, "inside the source folder")
    assert (folder / "a.png").read_bytes() == data


def test_run_restarts_with_results_beside_the_images_of_a_glob_or_folder_source(tmp_path: Path) -> None:
    """The reviewer's cart unit: `--source 'case/*' --append --out case/results.jsonl` ran once, then every restart
    was refused (exit 2: a restart loop under systemd); `--source exam42/` with the same outputs was refused outright."""
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    bundle = str(make_tiny_bundle(tmp_path / "b"))
    folder = tmp_path / "case"
    folder.mkdir()
    cv2.imwrite(str(folder / "f1.png"), np.full((32, 32), 100, np.uint8))
    data = (folder / "f1.png").read_bytes()
    for source in (str(folder / "*"), str(folder) + "/"):
        for _start in (1, 2):
            code, _, err = _main("run", "--bundle", bundle, "--source", source, "--append", "--out", str(folder / "results.jsonl"),
                                 "--summary", str(folder / "summary.json"))
            assert code == 0, err[-2000:]
    assert len((folder / "results.jsonl").read_text().splitlines()) == 4 and (folder / "f1.png").read_bytes() == data


def test_an_engine_cache_from_the_environment_inside_the_bundle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$EDGECLF_ENGINE_CACHE (the cart unit's way to name it) counts as --engine-cache does: an engine built into the
    bundle folder makes it fail its checksums at the next start."""
    pytest.importorskip("onnx")
    import edgeclf.runtime.profile

    monkeypatch.setattr(edgeclf.runtime.profile, "profile_bundles", _never("profiling"))
    bundle = make_tiny_bundle(tmp_path / "b")
    monkeypatch.setenv("EDGECLF_ENGINE_CACHE", str(bundle / "engines"))
    for argv in (("run", "--bundle", str(bundle), "--source", SRC), ("build-engine", "--bundle", str(bundle)),
                 ("bundle", "check", str(bundle)), ("profile", "--bundle", str(bundle))):
        line = _one_line(_main(*argv), "$EDGECLF_ENGINE_CACHE", "inside the bundle folder")
        assert str(tmp_path) not in line
    assert not (bundle / "engines").exists()


def test_run_out_inside_the_bundle_folder_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    bundle = make_tiny_bundle(tmp_path / "b")
    _one_line(_main("run", "--bundle", str(bundle), "--source", SRC, "--out", str(bundle / "results.jsonl")),
              "--out", "inside the bundle folder")
    from edgeclf.runtime.bundle import load_bundle

    load_bundle(bundle)


def test_profile_report_inside_the_bundle_folder_is_refused_before_profiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    import edgeclf.runtime.profile

    monkeypatch.setattr(edgeclf.runtime.profile, "profile_bundles", _never("profiling"))
    bundle = make_tiny_bundle(tmp_path / "b")
    b2 = make_tiny_bundle(tmp_path / "b2")
    _one_line(_main("profile", "--bundle", str(bundle), "--report", str(bundle / "report")), "--report", "inside the bundle folder")
    _one_line(_main("profile", "--bundle", str(b2), "--bundle", str(bundle), "--report", str(bundle)), "--report", "inside the bundle folder")
    _one_line(_main("profile", "--bundle", str(bundle), "--engine-cache", str(bundle / "e")), "--engine-cache", "inside the bundle folder")
    assert not (bundle / "report").exists()


def test_evaluate_out_inside_the_bundle_is_refused_before_evaluating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    import edgeclf.evaluate

    monkeypatch.setattr(edgeclf.evaluate, "evaluate", _never("evaluate"))
    bundle = make_tiny_bundle(tmp_path / "b")
    _one_line(_main("evaluate", "--model", str(bundle), "--data", "synthetic:ultrasound", "--out", str(bundle / "eval")),
              "--out", "inside the bundle folder")


def test_engine_caches_inside_the_bundle_folder_are_refused(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    bundle = make_tiny_bundle(tmp_path / "b")
    _one_line(_main("build-engine", "--bundle", str(bundle), "--cache", str(bundle / "engines")), "--cache", "inside the bundle folder")
    _one_line(_main("bundle", "check", str(bundle), "--engine-cache", str(bundle / "engines")), "--engine-cache",
              "inside the bundle folder")


# -- what the run summary says -------------------------------------------------------------------------------------

def _summary(**over: Any) -> dict[str, Any]:
    stage = {"median": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}
    s = {"frames": 4, "wall_s": 0.1, "fps": 40, "written": 4, "abstained": 0, "stages_ms": {"infer": stage},
         "label_counts": {"a": 4}, "out": "r.jsonl", "smoothing": "cine",
         "clip": {"majority_label": "a", "abstain_rate": 0.0, "frames": 4, "label_frames": {"a": 4, "b": 0}}}
    s.update(over)
    return s


def test_a_run_without_out_says_its_results_were_not_kept(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeclf.cli import _print_run

    _print_run(_summary(out=None))
    out = capsys.readouterr().out
    assert "results written" not in out and "4 results not kept (no --out)" in out
    _print_run(_summary())
    assert "4 results written" in capsys.readouterr().out


def test_a_run_without_out_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    code, out, _ = _main("run", "--bundle", str(make_tiny_bundle(tmp_path / "b")), "--source", SRC)
    assert code == 0 and "results written" not in out and "not kept (no --out)" in out, out


def test_a_multilabel_run_prints_per_label_counts_and_nothing_about_smoothing(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeclf.cli import _print_run

    clip = {"majority_label": "consolidation", "abstain_rate": 0.25, "frames": 4, "abstained": 1,
            "label_frames": {"consolidation": 3, "nodule": 3, "effusion": 0}}
    _print_run(_summary(task="multilabel", smoothing="off", clip=clip, abstained=1,
                        label_counts={"consolidation+nodule": 3, "(abstain)": 1}))
    out = capsys.readouterr().out
    assert "most frames" not in out and "smoothing" not in out, out
    assert "consolidation 3, nodule 3, effusion 0 of 4 frames" in out, out


def test_an_unsmoothed_run_does_not_say_after_smoothing(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeclf.cli import _print_run

    _print_run(_summary(smoothing="off"))
    out = capsys.readouterr().out
    assert "smoothing" not in out and "shown labels: most frames a" in out, out


def test_a_multilabel_bundle_run_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    from edgeclf.runtime.bundle import write_checksums

    bundle = make_tiny_bundle(tmp_path / "b")
    m = json.loads((bundle / "manifest.json").read_text())
    m["task"] = "multilabel"
    m["postprocess"]["decision"] = {"kind": "multilabel", "thresholds": [0.5, 0.5, 0.5]}
    (bundle / "manifest.json").write_text(json.dumps(m))
    (bundle / "checksums.sha256").unlink()
    write_checksums(bundle)
    code, out, err = _main("run", "--bundle", str(bundle), "--source", SRC, "--json")
    assert code == 0, err
    assert json.loads(out)["task"] == "multilabel"
    code, out, err = _main("run", "--bundle", str(bundle), "--source", SRC)
    assert code == 0 and "most frames" not in out and "smoothing" not in out and "of 4 frames" in out, out
