"""`run_bundle`'s outputs never land where they destroy something: inside a source folder (the files it classifies),
inside the bundle folder (which then refuses to load), over the results of a watched folder's done files, or (with
overwrite=False, the CLI's default) over an earlier results file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from edgeclf.errors import ConfigError
from edgeclf.runtime import app
from edgeclf.runtime.bundle import load_bundle
from tests.runtime.tiny_bundle import inbox_with_one_xray, make_tiny_bundle

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
SRC = "synthetic:ultrasound?frames=4&size=64"
PREVIOUS = '{"frame":0,"label":"cyst"}\n'


def _folder_of_images(folder: Path, n: int = 2) -> Dict[Path, bytes]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(30, 200, size=(32, 32), dtype=np.uint8))
    return {p: p.read_bytes() for p in folder.iterdir()}


def _refused(match: str, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError, match=match) as err:
        app.run_bundle(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def _lines(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


# -- finding: --out naming a file inside a source FOLDER overwrote that file ------------------------------------

def test_an_output_a_source_folder_reads_is_refused_and_its_files_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "exam"
    before = _folder_of_images(folder)
    (tmp_path / "link").symlink_to(folder)
    (tmp_path / "elsewhere.json").write_text("{}")
    (folder / "alias.json").symlink_to(folder / "img1.png")  # a name the source skips, resolving to one it reads
    (folder / "frame.png").symlink_to(tmp_path / "elsewhere.json")  # read by the source (its name), kept elsewhere
    before = {p: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.chdir(tmp_path)
    for kw in ({"out": str(folder / "img0.png")},  # the reviewer's case: the PNG was replaced by result lines
               {"out": "exam/../exam/new.jpg"},  # relative, not normalised; the next run would read it as a frame
               {"summary_path": str(tmp_path / "link" / "img1.png")},  # through a symlink to the folder
               {"summary_path": str(folder / "alias.json")},
               {"out": str(folder / "frame.png")},
               {"out": str(folder / "new.dcm")},  # the next run: a folder of images and DICOM, refused
               {"audit": str(folder / "audit.TIFF")}):
        for source in (str(folder), "link", "exam/"):
            msg = _refused("inside the source folder", str(bundle), source, **kw)
            assert str(tmp_path) not in msg and "exam" not in msg  # no path: a folder may be named after a patient
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_results_summary_record_and_audit_beside_the_images_of_a_folder_source_run_and_rerun(tmp_path: Path,
                                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`--source exam42/ --out exam42/results.jsonl` was refused though the image source never reads a .jsonl (the
    glob 'exam42/*.png' over the same files passed): outputs the source does not read may lie beside its images."""
    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "exam42"
    before = _folder_of_images(folder)
    monkeypatch.chdir(tmp_path)
    kw: Dict[str, Any] = {"out": "exam42/results.jsonl", "summary_path": str(folder / "summary.json"),
                          "record": str(folder / "run.mp4"), "audit": str(folder) + "/", "append": True}
    for run in (1, 2):  # the restart reads the same two images, nothing it wrote
        s = app.run_bundle(str(bundle), "exam42/", **kw)
        assert s["frames"] == 2 and len(_lines(folder / "results.jsonl")) == 2 * run
    assert {p: p.read_bytes() for p in before} == before
    assert (folder / "summary.json").exists() and (folder / "run.mp4").exists()
    assert len(list(folder.glob("audit-*.jsonl"))) == 2


def test_an_output_inside_a_dicom_source_folder_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom

    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "dcm"
    folder.mkdir()
    write_dicom(folder / "US1.dcm", np.full((32, 32), 90, np.uint8))
    write_dicom(folder / "IM2", np.full((32, 32), 60, np.uint8))  # no extension: read for its DICM marker
    before = {p: p.read_bytes() for p in folder.iterdir()}
    for kw in ({"out": str(folder / "US1.dcm")}, {"summary_path": str(folder / "IM2")},
               {"out": str(folder / "new.DICOM")}, {"out": str(folder / "new.png")}):  # .png: a folder of both, refused
        _refused("inside the source folder", str(bundle), str(folder), **kw)
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_results_beside_a_dicom_series_run_and_the_restart_counts_them_as_skipped(tmp_path: Path) -> None:
    """A DICOM folder reads .dcm/.dicom files and files with the DICM marker: the results and summary written there
    have neither, so the restart skips them, and says so (source_stats.skipped)."""
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom

    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "dcm"
    folder.mkdir()
    write_dicom(folder / "US1.dcm", np.full((32, 32), 90, np.uint8))
    write_dicom(folder / "IM2", np.full((32, 32), 60, np.uint8))
    data = {p: p.read_bytes() for p in folder.iterdir()}
    kw: Dict[str, Any] = {"out": str(folder / "results.jsonl"), "summary_path": str(folder / "summary.json"), "append": True}
    first = app.run_bundle(str(bundle), str(folder), **kw)
    second = app.run_bundle(str(bundle), str(folder), **kw)
    assert first["frames"] == second["frames"] == 2 and len(_lines(folder / "results.jsonl")) == 4
    assert first["source_stats"]["skipped"] == 0 and second["source_stats"]["skipped"] == 2
    assert {p: p.read_bytes() for p in data} == data


def test_a_broad_glob_source_restarts_onto_the_results_it_wrote_beside_its_images(tmp_path: Path) -> None:
    """The reviewer's case: `--source 'case/*' --append --out case/results.jsonl` ran once, then every restart was
    refused ('is the source file itself'): the glob's files counted results.jsonl, which the image source never reads."""
    bundle = make_tiny_bundle(tmp_path / "b")
    case = tmp_path / "case"
    before = _folder_of_images(case)
    pattern = str(case / "*")
    kw: Dict[str, Any] = {"out": str(case / "results.jsonl"), "summary_path": str(case / "summary.json"), "append": True}
    for run in (1, 2):
        s = app.run_bundle(str(bundle), pattern, **kw)
        assert s["frames"] == 2 and len(_lines(case / "results.jsonl")) == 2 * run
    assert {p: p.read_bytes() for p in before} == before
    _refused("is the source file itself", str(bundle), pattern, out=str(case / "img0.png"))  # an image it reads


def test_a_glob_source_refuses_its_files_and_any_output_the_pattern_would_read(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "frames"
    before = _folder_of_images(folder)
    pattern = str(folder / "*.png")
    _refused("is the source file itself", str(bundle), pattern, out=str(folder / "img1.png"))
    # not there yet, but the next run on the same glob would read it as a frame
    _refused("matches the --source pattern", str(bundle), pattern, summary_path=str(folder / "new.png"))
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    # beside the frames, not matched by the pattern: allowed
    s = app.run_bundle(str(bundle), pattern, out=str(folder / "results.jsonl"))
    assert s["frames"] == 2 and len(_lines(folder / "results.jsonl")) == 2


def test_outputs_outside_a_source_folder_run(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "exam"
    _folder_of_images(folder)
    s = app.run_bundle(str(bundle), str(folder), out=str(tmp_path / "exam.jsonl"), summary_path=str(tmp_path / "exam-clip.json"))
    assert s["frames"] == 2 and len(_lines(tmp_path / "exam.jsonl")) == 2


# -- finding: outputs written into the bundle folder were accepted, then the bundle refused to load -------------

@pytest.mark.parametrize("kw", [{"out": "results.jsonl"}, {"summary_path": "eval/clip.json"}, {"record": "run.mp4"},
                                {"audit": "/"}, {"audit": "logs/audit.jsonl"}])
def test_an_output_inside_the_bundle_folder_is_refused_and_the_bundle_still_loads(tmp_path: Path, kw: Dict[str, str]) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    (tmp_path / "blink").symlink_to(bundle)
    for where in (bundle, tmp_path / "blink"):
        option, name = next(iter(kw.items()))
        path = str(where) + name if name == "/" else str(where / name)
        msg = _refused("inside the bundle folder", str(bundle), SRC, **{option: path})
        assert "checksums" in msg and str(tmp_path) not in msg
    load_bundle(bundle)  # nothing was added to it


def test_an_engine_cache_inside_the_bundle_folder_is_refused(tmp_path: Path) -> None:
    from edgeclf.runtime.backends import BackendOptions

    bundle = make_tiny_bundle(tmp_path / "b")
    _refused("--engine-cache lies inside the bundle folder", str(bundle), SRC,
             backend_options=BackendOptions(engine_cache=str(bundle / "engines")))
    load_bundle(bundle)


def test_a_watch_state_inside_the_bundle_folder_is_refused(tmp_path: Path) -> None:
    """The state (and its lock file) is written at every start: inside the bundle, the next start fails its checksums."""
    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = inbox_with_one_xray(tmp_path)
    (tmp_path / "blink").symlink_to(bundle)
    for uri in (f"watch:{inbox}?idle_exit=0.2&state={bundle / 'watch.json'}",
                f"watch:{inbox}?idle_exit=0.2&state={tmp_path / 'blink' / 'watch.json'}",
                f"watch:{bundle}?idle_exit=0.2"):  # the default state, .edgeclf-watch.json in the watched folder
        msg = _refused("inside the bundle folder", str(bundle), uri, out=str(tmp_path / "w.jsonl"))
        assert "state" in msg and str(tmp_path) not in msg
    load_bundle(bundle)
    assert not (tmp_path / "w.jsonl").exists()


def test_an_engine_cache_from_the_environment_inside_the_bundle_folder_is_refused(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The cart unit names its cache with $EDGECLF_ENGINE_CACHE, not --engine-cache: the folder actually used counts."""
    from edgeclf.runtime.backends import BackendOptions

    bundle = make_tiny_bundle(tmp_path / "b")
    monkeypatch.setenv("EDGECLF_ENGINE_CACHE", str(bundle / "engines"))
    msg = _refused("EDGECLF_ENGINE_CACHE lies inside the bundle folder", str(bundle), SRC, out=str(tmp_path / "r.jsonl"))
    assert str(tmp_path) not in msg
    monkeypatch.delenv("EDGECLF_ENGINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(bundle))  # the default: $XDG_CACHE_HOME/edgeclf/engines
    _refused("XDG_CACHE_HOME.* lies inside the bundle folder", str(bundle), SRC)
    monkeypatch.setenv("EDGECLF_ENGINE_CACHE", str(bundle / "engines"))
    # --engine-cache outside the bundle is the folder used, whatever the environment says
    s = app.run_bundle(str(bundle), SRC, backend_options=BackendOptions(engine_cache=str(tmp_path / "engines")))
    assert s["frames"] == 4
    load_bundle(bundle)


# -- finding: re-running a watched folder without --append wiped the earlier results for good -------------------

def test_a_second_watch_run_without_append_keeps_the_earlier_results(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = inbox_with_one_xray(tmp_path)
    uri = f"watch:{inbox}?poll=0.05&idle_exit=0.3"
    out = tmp_path / "w.jsonl"
    assert app.run_bundle(str(bundle), uri, out=str(out))["frames"] == 1
    first = out.read_text()
    for overwrite in (False, True):  # replacing them is never what is meant: the done files are not read again
        msg = _refused("watch state", str(bundle), uri, out=str(out), overwrite=overwrite)
        assert "--append" in msg and ".edgeclf-watch.json" in msg and str(tmp_path) not in msg
    assert out.read_text() == first
    # as the README says: with --append a restart keeps them (and classifies nothing twice)
    s = app.run_bundle(str(bundle), uri, out=str(out), append=True)
    assert s["frames"] == 0 and out.read_text() == first


def test_the_watch_refusal_says_what_the_state_holds_and_failed_files_alone_lose_nothing(tmp_path: Path) -> None:
    """The refusal said the state 'marks 4 file(s) done, which are never classified again' when 1 was classified and
    3 had failed to decode (those have no results and are read again once they change)."""
    from edgeclf.runtime.watch import STATE_NAME

    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = tmp_path / "in"
    inbox.mkdir()
    uri = f"watch:{inbox}?poll=0.05&idle_exit=0.3"
    out = tmp_path / "w.jsonl"
    out.write_text('{"frame": 0}\n')
    files = {"a": {"status": "done", "frames": 1, "acked": 1}, "b": {"status": "failed", "frames": None, "acked": 0},
             "c": {"status": "failed", "frames": None, "acked": 0}, "d": {"status": "failed", "frames": None, "acked": 0}}
    state = inbox / STATE_NAME
    state.write_text(json.dumps({"format": "edgeclf-watch-state", "version": 1, "files": files}))
    msg = _refused("watch state", str(bundle), uri, out=str(out), overwrite=True)
    assert "1 classified, never to be classified again" in msg and "3 failed to decode" in msg, msg
    assert "4 file(s)" not in msg and "results of 1 file(s)" in msg, msg
    # Only failed files: replacing the results file loses none of theirs, so --overwrite may replace it.
    state.write_text(json.dumps({"format": "edgeclf-watch-state", "version": 1,
                                 "files": {k: v for k, v in files.items() if k != "a"}}))
    app.check_results_file(uri, str(out), append=False, overwrite=True)


def test_a_watch_state_kept_elsewhere_is_found_too(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = inbox_with_one_xray(tmp_path)
    uri = f"watch:{inbox}?poll=0.05&idle_exit=0.3&state={tmp_path / 'st.json'}"
    out = tmp_path / "w.jsonl"
    app.run_bundle(str(bundle), uri, out=str(out))
    msg = _refused("watch state", str(bundle), uri, out=str(out))
    assert "state=PATH" in msg


def test_a_watch_run_onto_a_new_results_file_or_with_a_fresh_state_runs(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = inbox_with_one_xray(tmp_path)
    uri = f"watch:{inbox}?poll=0.05&idle_exit=0.3"
    out = tmp_path / "w.jsonl"
    out.write_text(PREVIOUS)  # results of something else; the state marks nothing done
    assert app.run_bundle(str(bundle), uri, out=str(out))["frames"] == 1  # the library's default replaces, as before
    os.remove(inbox / ".edgeclf-watch.json")  # starting over, as the message says
    assert app.run_bundle(str(bundle), uri, out=str(out))["frames"] == 1 and len(_lines(out)) == 1


# -- an existing results file is replaced only when asked (the CLI's default) -----------------------------------

def test_overwrite_false_refuses_an_existing_results_file_before_the_bundle_loads(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text(PREVIOUS)
    msg = _refused("already holds", str(tmp_path / "no-bundle"), SRC, out=str(out), overwrite=False)
    assert "--append" in msg and "--overwrite" in msg and str(tmp_path) not in msg
    assert out.read_text() == PREVIOUS


def test_overwrite_false_takes_an_empty_or_new_file_and_append_adds(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    out.write_text("")
    assert app.run_bundle(str(bundle), SRC, out=str(out), overwrite=False)["frames"] == 4
    assert app.run_bundle(str(bundle), SRC, out=str(out), overwrite=False, append=True)["frames"] == 4
    assert len(_lines(out)) == 8
    assert app.run_bundle(str(bundle), SRC, out=str(out), overwrite=True)["frames"] == 4 and len(_lines(out)) == 4
