"""`run_bundle`: a second Ctrl-C while files close, and bad output options that must cost nothing; `verify_bundle`
with a reference file that is not the npz it expects."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from edgeclf.errors import BundleError, ConfigError, EdgeclfError
from edgeclf.runtime import app
from edgeclf.runtime.audit import verify_audit
from edgeclf.runtime.sinks import Sink
from tests.conftest import run_cli
from tests.runtime.tiny_bundle import inbox_with_one_xray, make_tiny_bundle

pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
SRC = "synthetic:ultrasound?frames=12&size=64"
LONG_SRC = "synthetic:ultrasound?frames=100000&size=32"
PREVIOUS = '{"frame":0,"label":"cyst"}\n'

main_thread_only = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                      reason="signal handlers are installed only from the main thread")


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


class CtrlCTwice(Sink):
    """Ctrl-C on the third frame (stop), and again while the run closes its sinks (a slow mp4 or fsync)."""

    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def write(self, record: Any, image: Any = None) -> None:
        self.written += 1
        if self.written == 3:
            _ctrl_c()

    def close(self) -> None:
        _ctrl_c()
        threading.Event().wait(0.05)  # the handler runs here; the default one would raise KeyboardInterrupt
        self.closed = True


class FailsToClose(Sink):
    def __init__(self, exc: BaseException) -> None:
        self.exc, self.written = exc, 0

    def write(self, record: Any, image: Any = None) -> None:
        self.written += 1

    def close(self) -> None:
        raise self.exc


class Closes(Sink):
    def __init__(self) -> None:
        self.written, self.closed = 0, False

    def write(self, record: Any, image: Any = None) -> None:
        self.written += 1

    def close(self) -> None:
        self.closed = True


def _lines(path: Path) -> List[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@main_thread_only
def test_a_second_ctrl_c_while_sinks_close_still_closes_them_all_and_ends_the_audit(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    out, clip, log = tmp_path / "r.jsonl", tmp_path / "clip.json", tmp_path / "audit.jsonl"
    before = signal.getsignal(signal.SIGINT)
    slow = CtrlCTwice()
    s = app.run_bundle(str(bundle), LONG_SRC, out=str(out), summary_path=str(clip), audit=str(log), extra_sinks=[slow])
    assert slow.closed and s["stopped_by"] == "signal"
    assert clip.exists() and json.loads(clip.read_text())["frames"] == s["frames"] == len(_lines(out))
    rep = verify_audit(log, results=out)
    assert rep.state == "intact" and rep.end is not None and rep.end["status"] == "signal", rep.reason
    assert signal.getsignal(signal.SIGINT) is before  # put back once everything is closed


def test_close_all_closes_every_sink_after_a_keyboard_interrupt_and_raises_the_first() -> None:
    later = Closes()
    with pytest.raises(KeyboardInterrupt):
        app._close_all([FailsToClose(KeyboardInterrupt()), FailsToClose(EdgeclfError("second")), later])
    assert later.closed


def test_a_sink_that_fails_to_close_still_gets_the_audit_log_its_end(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    log, clip = tmp_path / "audit.jsonl", tmp_path / "clip.json"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(EdgeclfError, match="disk went away"):
        app.run_bundle(str(bundle), SRC, out=str(tmp_path / "r.jsonl"), summary_path=str(clip), audit=str(log),
                       extra_sinks=[FailsToClose(EdgeclfError("disk went away"))], reconnect=False)
    assert clip.exists()  # the sinks after the failing one still closed
    rep = verify_audit(log)
    assert rep.state == "intact" and rep.end is not None and rep.end["status"] == "error", rep.reason
    assert "disk went away" in str(rep.end["error"])
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("bad", ["record", "show"])
def test_a_bad_record_or_show_leaves_an_earlier_results_file_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  bad: str) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    out.write_text(PREVIOUS)
    kwargs: dict = {}
    if bad == "record":
        kwargs["record"] = str(tmp_path / "run.mp44")  # a typo
    else:
        from edgeclf.runtime import overlay

        monkeypatch.setattr(overlay, "display_problem", lambda: "no DISPLAY or WAYLAND_DISPLAY is set")
        kwargs["show"] = True
    with pytest.raises(ConfigError) as err:
        app.run_bundle(str(bundle), SRC, out=str(out), reconnect=False, **kwargs)
    assert "\n" not in str(err.value)
    assert out.read_text() == PREVIOUS


def test_a_record_typo_fails_before_the_bundle_is_even_loaded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.mp44.*run\.mp4"):
        app.run_bundle(str(tmp_path / "no-such-bundle"), SRC, record=str(tmp_path / "run.mp44"))


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_a_summary_path_that_cannot_be_written_fails_before_the_run(tmp_path: Path, where: str) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    out.write_text(PREVIOUS)
    if where == "folder":
        summary = tmp_path / "sums"
        summary.mkdir()
    else:
        (tmp_path / "afile").write_text("x")
        summary = tmp_path / "afile" / "clip.json"
    with pytest.raises(ConfigError, match="--summary") as err:
        app.run_bundle(str(bundle), SRC, out=str(out), summary_path=str(summary), reconnect=False)
    assert "\n" not in str(err.value)
    assert out.read_text() == PREVIOUS  # failed up front: nothing ran, nothing was truncated
    assert not Path(str(summary) + ".tmp").exists()


def test_cli_summary_to_a_folder_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    out.write_text(PREVIOUS)
    (tmp_path / "sums").mkdir()
    r = run_cli("run", "--bundle", str(bundle), "--source", SRC, "--out", str(out), "--summary", str(tmp_path / "sums"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--summary" in lines[0] and "folder" in lines[0]
    assert out.read_text() == PREVIOUS


# -------------------------------------------------------------------------- outputs that collide


def test_out_that_is_the_source_video_is_refused_and_the_recording_kept(tmp_path: Path) -> None:
    # `--source exam.mp4 --out exam.mp4` truncated the recording it was about to classify.
    from edgeclf.runtime.synthetic import write_cine

    bundle = make_tiny_bundle(tmp_path / "b")
    video = tmp_path / "exam.mp4"
    write_cine(video, timeline=[(0, 20)], size=64, fps=10)
    data = video.read_bytes()
    link = tmp_path / "link.mp4"
    link.symlink_to(video)
    for option, path in (("out", video), ("record", video), ("summary_path", link), ("out", link)):
        with pytest.raises(ConfigError, match="is the source file itself") as err:
            app.run_bundle(str(bundle), str(video), **{option: str(path)})
        assert "\n" not in str(err.value) and str(tmp_path) not in str(err.value)  # no path: it may name a patient
        assert video.read_bytes() == data


@pytest.mark.parametrize("other", ["summary_path", "audit", "record"])
def test_two_outputs_on_one_file_are_refused_before_anything_is_written(tmp_path: Path, other: str) -> None:
    # --summary or --audit equal to --out replaced or mixed the results file.
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / ("r.mp4" if other == "record" else "r.jsonl")
    out.write_text(PREVIOUS)
    with pytest.raises(ConfigError, match=r"--out and --\w+ name the same file"):
        app.run_bundle(str(bundle), SRC, out=str(out), **{other: str(tmp_path / "." / out.name)})
    assert out.read_text() == PREVIOUS


def test_an_output_inside_the_watched_folder_is_refused(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = tmp_path / "in"
    inbox.mkdir()
    state = tmp_path / "state.json"
    for kw in ({"out": str(inbox / "r.jsonl")}, {"audit": str(inbox) + "/"}, {"summary_path": str(inbox / "sub" / "c.json")}):
        with pytest.raises(ConfigError, match="inside the watched folder"):
            app.run_bundle(str(bundle), f"watch:{inbox}?poll=0.05&idle_exit=0.2", **kw)
    with pytest.raises(ConfigError, match="is the source file itself"):  # the watch state kept elsewhere
        app.run_bundle(str(bundle), f"watch:{inbox}?idle_exit=0.2&state={state}", out=str(state))
    assert list(inbox.iterdir()) == [] and not state.exists()


def test_distinct_outputs_beside_the_source_run(tmp_path: Path) -> None:
    from edgeclf.runtime.synthetic import write_cine

    bundle = make_tiny_bundle(tmp_path / "b")
    video = tmp_path / "exam.mp4"
    write_cine(video, timeline=[(0, 6)], size=64, fps=10)
    (tmp_path / "logs").mkdir()
    s = app.run_bundle(str(bundle), str(video), out=str(tmp_path / "exam.jsonl"), summary_path=str(tmp_path / "clip.json"),
                       audit=str(tmp_path / "logs"))
    assert s["frames"] == 6 and len(_lines(tmp_path / "exam.jsonl")) == 6 and (tmp_path / "clip.json").is_file()


def test_cli_out_equal_to_summary_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    out.write_text(PREVIOUS)
    r = run_cli("run", "--bundle", str(bundle), "--source", SRC, "--out", str(out), "--summary", str(out))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--out and --summary name the same file" in lines[0], lines
    assert out.read_text() == PREVIOUS


def _runs(path: Path) -> List[Any]:
    """The run id of every line, in order (None for a line without one)."""
    return [rec.get("run") for rec in _lines(path)]


def test_append_keeps_the_results_of_earlier_runs_and_tells_them_apart(tmp_path: Path) -> None:
    """A service restarts (crash, watchdog, reboot) onto the same --out: every start must keep the earlier results."""
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    out.write_text(PREVIOUS)  # a line written before the service used --append
    first = app.run_bundle(str(bundle), SRC, out=str(out), append=True, reconnect=False)
    with out.open("ab") as f:
        f.write(b'{"run":"' + first["run"].encode() + b'","frame":12,"lab')  # power loss mid-line
    second = app.run_bundle(str(bundle), SRC, out=str(out), append=True, reconnect=False)
    assert first["run"] != second["run"] and len(first["run"]) == 12
    assert first["append"] == {"torn_cut": 0, "newline_restored": False}
    assert second["append"] == {"torn_cut": 1, "newline_restored": False}
    assert _runs(out) == [None] + [first["run"]] * 12 + [second["run"]] * 12
    assert [r["frame"] for r in _lines(out)[1:]] == list(range(12)) * 2
    assert out.read_text().startswith(PREVIOUS)
    # Without --append the file is replaced, as before, and lines carry no run id.
    plain = app.run_bundle(str(bundle), SRC, out=str(out), reconnect=False)
    assert "run" not in plain and "append" not in plain and _runs(out) == [None] * 12


def test_append_needs_out_and_a_damaged_results_file_is_refused_before_the_bundle_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--append adds to the --out results file"):
        app.run_bundle(str(tmp_path / "no-bundle"), SRC, append=True)
    out = tmp_path / "r.jsonl"
    out.write_text(PREVIOUS + "edited by hand\n")
    with pytest.raises(EdgeclfError, match="neither a whole result nor a torn last line"):
        app.run_bundle(str(tmp_path / "no-bundle"), SRC, out=str(out), append=True)  # not "no bundle": checked first
    assert out.read_text() == PREVIOUS + "edited by hand\n"


def test_cli_append_without_out_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    r = run_cli("run", "--bundle", str(bundle), "--source", SRC, "--append")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--append" in lines[0] and "--out" in lines[0], r.stderr


def test_each_appending_run_verifies_against_its_own_lines_of_the_shared_file(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    logs = []
    for k in range(2):
        res = app.run_bundle(str(bundle), SRC, out=str(out), append=True, reconnect=False, audit=str(tmp_path / f"a{k}.jsonl"),
                             audit_digest_every=5)
        logs.append((res["run"], tmp_path / f"a{k}.jsonl"))
        with out.open("ab") as f:
            f.write(b'{"frame":99,"lab')  # torn: the next start cuts it off and puts that on the audit record
    for k, (run_id, log) in enumerate(logs):
        records = [json.loads(ln) for ln in log.read_text().splitlines()]
        assert records[0]["payload"]["config"]["run"] == run_id and records[0]["payload"]["config"]["append"] is True
        repaired = [r["payload"] for r in records if r["type"] == "event" and r["payload"]["name"] == "results_file_repaired"]
        assert repaired == ([{"name": "results_file_repaired", "torn_cut": 1, "newline_restored": False}] if k else [])
        mine = tmp_path / f"run{k}.jsonl"  # as the README says: grep '^{"run":"ID",' results.jsonl > run.jsonl
        mine.write_bytes(b"".join(ln for ln in out.read_bytes().splitlines(keepends=True)
                                  if ln.startswith(b'{"run":"' + run_id.encode() + b'",')))
        rep = verify_audit(log, results=mine)
        assert rep.state == "intact" and rep.results_check is not None and rep.results_check["checked"] == 12, rep.to_dict()
        # The shared file itself: the log's start record names the run, and only its lines are checked.
        rep = verify_audit(log, results=out)
        assert rep.state == "intact" and rep.run == run_id, rep.to_dict()
        assert rep.results_check["checked"] == 12 and rep.results_check["other_runs_lines"] == 12, rep.results_check


@pytest.mark.parametrize("kw", [{}, {"audit": "audit.jsonl"}, {"summary_path": "clip.json"}])
def test_a_watched_folder_without_out_is_refused_before_any_file_is_consumed(tmp_path: Path, kw: dict) -> None:
    """Each watched file is marked done for good: without a results file a try-out would use the inbox up."""
    from edgeclf.runtime.sinks import ListSink, read_jsonl

    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = inbox_with_one_xray(tmp_path)
    state = tmp_path / "state.json"
    uri = f"watch:{inbox}?poll=0.05&idle_exit=0.5&state={state}"
    kw = {k: str(tmp_path / v) for k, v in kw.items()}
    with pytest.raises(ConfigError, match="without --out no result is kept") as exc:
        app.run_bundle(str(bundle), uri, extra_sinks=[ListSink()], **kw)  # a sink that keeps nothing on disk
    assert "\n" not in str(exc.value) and "give --out" in str(exc.value)
    assert not state.exists() and not any((tmp_path / v).exists() for v in ("audit.jsonl", "clip.json"))
    out = tmp_path / "r.jsonl"
    assert app.run_bundle(str(bundle), uri, out=str(out))["frames"] == 1  # the service as deployed still gets it
    assert len(read_jsonl(out)[0]) == 1


def test_a_watched_folder_may_run_with_a_durable_sink_of_the_callers(tmp_path: Path) -> None:
    """A sink with its own sync (it keeps the results on disk) records what the watched folder consumes."""
    class Durable(Sink):
        def __init__(self) -> None:
            self.records: List[Any] = []
            self.syncs = 0

        def write(self, record: Any, image: Any = None) -> None:
            self.records.append(record)
            self.written += 1

        def sync(self) -> None:
            self.syncs += 1

    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = inbox_with_one_xray(tmp_path)
    sink = Durable()
    s = app.run_bundle(str(bundle), f"watch:{inbox}?poll=0.05&idle_exit=0.5&state={tmp_path / 's.json'}", extra_sinks=[sink])
    assert s["frames"] == 1 and len(sink.records) == 1 and sink.syncs >= 1


# ------------------------------------------------------------------ verify_bundle: the reference file's content


def _reference(b: Path, kind: str) -> None:
    from edgeclf.runtime.bundle import write_checksums

    x, logits = np.zeros((6, 1, 8, 8), np.float32), np.zeros((6, 3), np.float32)
    ref = b / "reference.npz"
    if kind == "no inputs":
        np.savez(ref, logits=logits)
    elif kind == "inputs of another shape":
        np.savez(ref, inputs=np.zeros((6, 3, 8, 8), np.float32), logits=logits)
    elif kind == "logits of another shape":
        np.savez(ref, inputs=x, logits=np.zeros((6, 2), np.float32))
    elif kind == "pickled objects":
        np.savez(ref, inputs=np.array([{"a": 1}] * 6, dtype=object), logits=logits)
    elif kind == "one npy array":
        with open(ref, "wb") as f:
            np.save(f, x)
    elif kind == "not a zip":
        ref.write_bytes(b"PK\x03\x04 not really a zip")
    write_checksums(b)  # valid checksums: only the content is wrong


@pytest.mark.parametrize("kind", ["no inputs", "inputs of another shape", "logits of another shape", "pickled objects",
                                  "one npy array", "not a zip"])
def test_verify_with_an_unusable_reference_is_one_bundle_error(tmp_path: Path, kind: str) -> None:
    b = make_tiny_bundle(tmp_path / "b")
    _reference(b, kind)
    with pytest.raises(BundleError, match="reference file 'reference.npz' is not an npz with inputs \\[1, 8, 8\\] and logits "
                                          "\\[n, 3\\]; re-export the bundle") as info:
        app.verify_bundle(str(b))
    assert "\n" not in str(info.value)
    assert app.verify_bundle(str(b), parity=False)["reference"] is None  # without parity the file is not read


def test_device_profile_threads_are_capped_by_the_cores_the_process_may_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from tests.runtime.tiny_bundle import make_tiny_bundle

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a cpuset or CPUAffinity= leaves 2 cores
    s = app.run_bundle(str(make_tiny_bundle(tmp_path / "b")), "synthetic:ultrasound?frames=3&size=32", device="jetson-orin-nano",
                       backend="ort-cpu", reconnect=False)
    assert s["threads"] == 2 and "capped at the 2 cores" in s["chosen_by"]["threads"], s["chosen_by"]


# ------------------------------------------------------------------------------------------- clip decisions per file


def _two_cines_and_a_still(folder: Path) -> None:
    from tests.runtime.test_dicom import write_dicom
    from tests.runtime.test_pipeline import _film

    rng = np.random.default_rng(1)
    folder.mkdir()
    write_dicom(folder / "a.dcm", _film(rng, 40, 12), instance=1, frame_time=33.3)   # every frame "normal"
    write_dicom(folder / "b.dcm", _film(rng, 220, 12), instance=2, frame_time=33.3)  # every frame "mass"
    write_dicom(folder / "c.dcm", _film(rng, 40), instance=3)  # a still of the same study


def test_a_second_cine_is_not_aggregated_into_the_first_cines_clip_decision(tmp_path: Path) -> None:
    """Wired as run_bundle wires it (a ClipAggregator handed to the SummarySink): each cine of a DICOM folder is
    its own clip, as `edgeclf evaluate` aggregates each clip on its own and the smoother restarts at each."""
    pytest.importorskip("pydicom")
    from edgeclf.runtime.backends import FakeBackend
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.clips import ClipAggregator
    from edgeclf.runtime.pipeline import RunOptions, run_pipeline
    from edgeclf.runtime.sinks import ListSink, SummarySink
    from edgeclf.runtime.sources import open_source
    from tests.runtime.test_pipeline import _by_brightness

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))
    m = b.manifest
    _two_cines_and_a_still(tmp_path / "dcm")
    clip = SummarySink(labels=list(m.labels), aggregator=ClipAggregator(rule=m.decision, min_confidence=m.min_confidence,
                                                                       labels=list(m.labels)))
    mem = ListSink()
    with FakeBackend((1, 8, 8), 3, fn=_by_brightness) as be, open_source(str(tmp_path / "dcm")) as src:
        s = run_pipeline(b, src, be, [mem, clip], options=RunOptions(quality=False))
    assert s.extra["smoothing"] == "cine" and s.frames == 25
    assert [r["file_index"] for r in mem.records] == [0] * 12 + [1] * 12 + [2]
    assert clip.decision() is None  # several files: no one decision that mixes them
    per_file = clip.decisions()
    assert per_file is not None
    assert [(d["file_index"], d["frames"], d["mean_label"], d["vote_label"], d["votes"]["normal"], d["votes"]["mass"])
            for d in per_file] == [(0, 12, "normal", "normal", 12, 0), (1, 12, "mass", "mass", 0, 12)]


def test_run_summary_holds_one_clip_decision_per_file_and_offline_agrees(tmp_path: Path) -> None:
    """`edgeclf run` on a DICOM folder: the clip summary lists each cine's decision (the still is counted, its own
    record is its decision), and re-aggregating the results file offline gives the same."""
    pytest.importorskip("pydicom")
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.clips import aggregate_files
    from edgeclf.runtime.sinks import read_jsonl

    bundle = make_tiny_bundle(tmp_path / "b")
    m = load_bundle(bundle).manifest
    _two_cines_and_a_still(tmp_path / "dcm")
    out, path = tmp_path / "r.jsonl", tmp_path / "clip.json"
    s = app.run_bundle(str(bundle), str(tmp_path / "dcm"), out=str(out), summary_path=str(path))
    clip = json.loads(path.read_text())
    assert s["clip"] == clip and s["frames"] == clip["frames"] == 25
    assert clip["decision"] is None and clip["stills"] == 1
    assert [(d["file_index"], d["frames"]) for d in clip["decisions"]] == [(0, 12), (1, 12)]
    offline = aggregate_files(read_jsonl(out)[0], m.labels, rule=m.decision, min_confidence=m.min_confidence)
    assert offline == {k: clip[k] for k in ("decision", "decisions", "decisions_total", "stills")}


def test_a_folder_of_single_images_has_no_clip_decision_and_a_video_keeps_its_one(tmp_path: Path) -> None:
    """Each X-ray of a folder is decided on its own (its record); a "clip decision" over unrelated images would be
    noise. A single video's summary is as before: one decision, no per-file list."""
    import cv2

    folder = tmp_path / "xrays"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(folder / f"im{i}.png"), rng.integers(0, 255, (48, 48), dtype=np.uint8))
    bundle = make_tiny_bundle(tmp_path / "b")
    s = app.run_bundle(str(bundle), str(folder), out=str(tmp_path / "r.jsonl"))
    assert s["frames"] == 4 and s["clip"]["decision"] is None
    assert s["clip"]["decisions"] == [] and s["clip"]["stills"] == 4
    v = app.run_bundle(str(bundle), SRC, out=str(tmp_path / "v.jsonl"))
    assert v["clip"]["decision"]["frames"] == 12 and "decisions" not in v["clip"] and "stills" not in v["clip"]


# ------------------------------------------------------------------------------------------- how a run ended


def _clip(path: Path, n: int = 40, fps: int = 10) -> Path:
    import cv2

    rng = np.random.default_rng(1)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 64))
    for _ in range(n):
        vw.write(cv2.cvtColor(rng.integers(30, 200, size=(64, 64), dtype=np.uint8), cv2.COLOR_GRAY2BGR))
    vw.release()
    return path


class FailsOnFrame(Sink):
    """An output that fails on its n-th record (a full disk), with a message that quotes `text`."""

    def __init__(self, n: int, text: str) -> None:
        self.n, self.text, self.written = n, text, 0

    def write(self, record: Any, image: Any = None) -> None:
        if self.written + 1 == self.n:
            raise EdgeclfError(self.text)
        self.written += 1


class SignalOnFrame(Sink):
    def __init__(self, n: int, sig: int) -> None:
        self.n, self.sig, self.written = n, sig, 0

    def write(self, record: Any, image: Any = None) -> None:
        self.written += 1
        if self.written == self.n:
            os.kill(os.getpid(), self.sig)


def test_the_summary_file_of_a_run_cut_short_by_max_frames_says_so(tmp_path: Path) -> None:
    """clip.json of 10 of a clip's 40 frames must not read as the whole clip's decision."""
    bundle = make_tiny_bundle(tmp_path / "b")
    clip = _clip(tmp_path / "clip.avi")
    summary = tmp_path / "clip.json"
    s = app.run_bundle(str(bundle), str(clip), max_frames=10, summary_path=str(summary))
    assert s["frames"] == 10 and s["frame_count_claimed"] == 40
    assert s["status"] == "stopped" and s["stopped_by"] == "max_frames"
    written = json.loads(summary.read_text())
    assert written["status"] == "stopped" and written["stopped_by"] == "max_frames" and written["error"] is None
    assert written["frame_count_claimed"] == 40 and written["source_stats"]["decoded"] >= 10
    assert written["decision"]["frames"] == 10 and written["decision"]["complete"] is False
    whole = app.run_bundle(str(bundle), str(clip), summary_path=str(summary))
    written = json.loads(summary.read_text())
    assert whole["status"] == written["status"] == "ok" and written["stopped_by"] is None
    assert written["decision"]["frames"] == 40 and "complete" not in written["decision"]


@main_thread_only
def test_the_summary_file_of_a_run_stopped_by_sigterm_says_so(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    summary = tmp_path / "clip.json"
    s = app.run_bundle(str(bundle), LONG_SRC, summary_path=str(summary), extra_sinks=[SignalOnFrame(3, signal.SIGTERM)])
    assert s["stopped_by"] == "signal" and s["signal"] == "SIGTERM" and s["status"] == "stopped"
    written = json.loads(summary.read_text())
    assert written["status"] == "stopped" and written["stopped_by"] == "signal" and written["frame_count_claimed"] == 100000
    assert written["decision"]["complete"] is False and written["frames"] == s["frames"]


def test_the_summary_file_of_a_dicom_folder_run_that_failed_says_so_and_holds_no_folder_wide_decision(tmp_path: Path) -> None:
    """A folder of cines whose run dies in its first file (a full disk): the file says "error" with the error's
    text (without the source's path), keeps `decision` empty as for any multi-file source, and marks the one
    cine decision it has as incomplete."""
    pytest.importorskip("pydicom")
    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "DOE_JOHN"
    _two_cines_and_a_still(folder)
    summary = tmp_path / "clip.json"
    failing = FailsOnFrame(6, f"writing to {folder / 'a.dcm'}.out failed (No space left on device)")
    with pytest.raises(EdgeclfError, match="No space left") as err:
        app.run_bundle(str(bundle), str(folder), summary_path=str(summary), extra_sinks=[failing])
    text = summary.read_text()
    written = json.loads(text)
    assert written["status"] == "error" and "No space left on device" in written["error"] and "DOE_JOHN" not in text
    assert written["frames"] == 5 and written["frame_count_claimed"] == 25 and written["source_stats"]["files"] == 3
    assert written["decision"] is None
    assert [(d["file_index"], d["frames"], d["complete"]) for d in written["decisions"]] == [(0, 5, False)]
    # the caller (the CLI's --json) gets the same from the exception
    partial = err.value.run_summary  # type: ignore[attr-defined]
    assert partial["status"] == "error" and partial["frames"] == 5 and partial["clip"] == written
    assert "DOE_JOHN" not in json.dumps(partial["error"])


def test_a_sink_that_fails_to_close_makes_the_summary_file_say_error(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    clip = tmp_path / "clip.json"
    with pytest.raises(EdgeclfError, match="disk went away"):
        app.run_bundle(str(bundle), SRC, summary_path=str(clip), extra_sinks=[FailsToClose(EdgeclfError("disk went away"))],
                       reconnect=False)
    written = json.loads(clip.read_text())
    assert written["status"] == "error" and written["error"] == "disk went away" and written["frames"] == 12


def test_the_time_figures_of_a_recorded_clip_follow_the_clip_not_the_processing_speed(tmp_path: Path) -> None:
    """40 frames at 10 fps are 4 s of scan, on every run and every machine; a folder of images has no time."""
    import cv2

    bundle = make_tiny_bundle(tmp_path / "b")
    clip = _clip(tmp_path / "clip.avi", n=40)
    summary = tmp_path / "clip.json"
    app.run_bundle(str(bundle), str(clip), summary_path=str(summary))
    written = json.loads(summary.read_text())
    assert written["time_basis"] == "clip" and written["fps"] == 10.0
    assert written["duration_s"] == pytest.approx(4.0) and written["span_s"] == pytest.approx(3.9)
    assert written["share_time"] == pytest.approx(written["share_frames"])
    folder = tmp_path / "xrays"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"im{i}.png"), np.random.default_rng(i).integers(30, 200, (48, 48), dtype=np.uint8))
    s = app.run_bundle(str(bundle), str(folder))
    assert s["clip"]["time_basis"] is None and s["clip"]["duration_s"] is None and s["clip"]["share_time"] is None


def test_a_record_of_a_folder_of_mixed_sizes_counts_the_letterboxed_frames(tmp_path: Path) -> None:
    import cv2

    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "a.png"), rng.integers(30, 200, (48, 64), dtype=np.uint8))
    cv2.imwrite(str(folder / "b.png"), rng.integers(30, 200, (64, 64), dtype=np.uint8))
    cv2.imwrite(str(folder / "c.png"), rng.integers(30, 200, (48, 64), dtype=np.uint8))
    s = app.run_bundle(str(bundle), str(folder), record=str(tmp_path / "run.avi"))
    assert s["record"] == {"frames": 3, "resized": 1, "size": [64, 48]}


@main_thread_only
def test_a_watch_service_stopped_by_sigterm_does_not_call_a_wholly_classified_cine_incomplete(tmp_path: Path) -> None:
    """systemd stops the cart's watch service with SIGTERM after every frame of the last cine was classified (the
    state marks it done, it is never read again): its decision is whole, not "complete": false."""
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom as _write
    from tests.runtime.test_folder_sources import _cine

    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = tmp_path / "in"
    inbox.mkdir()
    _write(inbox / "a.dcm", _cine(3, 32))
    old = time.time() - 100
    os.utime(inbox / "a.dcm", (old, old))
    summary = tmp_path / "clip.json"
    s = app.run_bundle(str(bundle), f"watch:{inbox}?poll=0.05&idle_exit=30", out=str(tmp_path / "r.jsonl"),
                       summary_path=str(summary), extra_sinks=[SignalOnFrame(3, signal.SIGTERM)])
    assert s["frames"] == 3 and s["source_stats"]["files_done"] == 1, s["source_stats"]
    state = json.loads((inbox / ".edgeclf-watch.json").read_text())
    assert [e["status"] for e in state["files"].values()] == ["done"]
    written = json.loads(summary.read_text())
    assert written["status"] == "stopped" and written["stopped_by"] == "signal"
    (dec,) = written["decisions"]
    assert dec["frames"] == 3 and "complete" not in dec, dec


@main_thread_only
def test_a_watch_service_stopped_inside_a_cine_marks_that_cine_incomplete(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom as _write
    from tests.runtime.test_folder_sources import _cine

    bundle = make_tiny_bundle(tmp_path / "b")
    inbox = tmp_path / "in"
    inbox.mkdir()
    _write(inbox / "a.dcm", _cine(6, 32))
    old = time.time() - 100
    os.utime(inbox / "a.dcm", (old, old))
    summary = tmp_path / "clip.json"
    app.run_bundle(str(bundle), f"watch:{inbox}?poll=0.05&idle_exit=30", out=str(tmp_path / "r.jsonl"),
                   summary_path=str(summary), extra_sinks=[SignalOnFrame(2, signal.SIGTERM)])
    (dec,) = json.loads(summary.read_text())["decisions"]
    assert dec["frames"] < 6 and dec["complete"] is False, dec


def test_a_cine_stopped_after_its_first_frame_is_not_counted_as_a_single_frame_file(tmp_path: Path) -> None:
    """--max-frames 1 on a DICOM folder of 6-frame cines: one frame of an incomplete cine, not a single-frame file
    decided by its own result."""
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom as _write
    from tests.runtime.test_folder_sources import _cine

    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "series"
    folder.mkdir()
    _write(folder / "a.dcm", _cine(6, 32))
    _write(folder / "b.dcm", _cine(6, 32))
    summary = tmp_path / "clip.json"
    app.run_bundle(str(bundle), str(folder), max_frames=1, summary_path=str(summary))
    written = json.loads(summary.read_text())
    assert written["status"] == "stopped" and written["stopped_by"] == "max_frames"
    assert written["stills"] == 0, (written["stills"], written["decisions"])
    assert [(d["file_index"], d["frames"], d["complete"]) for d in written["decisions"]] == [(0, 1, False)]


def test_a_record_of_an_odd_sized_clip_counts_no_frame_of_another_size(tmp_path: Path) -> None:
    """Every frame of a 65x49 DICOM cine (607x607 ultrasound exports are common) is the source's own size: the
    recorder's even 64x48 crops the odd pixel; no frame is "of another size" nor scaled with a black bar."""
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom as _write

    bundle = make_tiny_bundle(tmp_path / "b")
    cine = np.random.default_rng(0).integers(30, 200, size=(12, 49, 65), dtype=np.uint8)
    path = _write(tmp_path / "odd.dcm", cine)
    s = app.run_bundle(str(bundle), str(path), record=str(tmp_path / "rec.avi"))
    assert s["frames"] == 12
    assert s["record"] == {"frames": 12, "resized": 0, "size": [64, 48]}, s["record"]


def test_max_frames_equal_to_the_source_length_reads_it_to_its_end(tmp_path: Path) -> None:
    """A 12-frame source run with --max-frames 12 is read whole: status ok, a whole decision; one frame fewer is
    stopped by max_frames with the decision marked incomplete."""
    bundle = make_tiny_bundle(tmp_path / "b")
    summary = tmp_path / "clip.json"
    s = app.run_bundle(str(bundle), SRC, max_frames=12, summary_path=str(summary))
    written = json.loads(summary.read_text())
    assert s["frames"] == 12 == s["frame_count_claimed"]
    assert s["status"] == written["status"] == "ok" and s["stopped_by"] is None and written["stopped_by"] is None
    assert "complete" not in written["decision"], (written["status"], written["decision"].get("complete"))
    s = app.run_bundle(str(bundle), SRC, max_frames=11, summary_path=str(summary))
    written = json.loads(summary.read_text())
    assert s["status"] == written["status"] == "stopped" and s["stopped_by"] == written["stopped_by"] == "max_frames"
    assert written["decision"]["complete"] is False


# ------------------------------------------------------------------------------------------- the CLI's ending


def _run_and_signal(tmp_path: Path, sig: int, *extra: str) -> Any:
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "edgeclf", "run", "--bundle", str(bundle), "--source", LONG_SRC, "--out", str(out),
                          *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert out.stat().st_size > 0, stderr[-500:]
    return p.returncode, stdout, stderr


def test_ctrl_c_ends_the_cli_run_as_interrupted_after_writing_everything(tmp_path: Path) -> None:
    """`for f in clips/*; do edgeclf run ...; done`: bash leaves the loop at Ctrl-C only when the child died of SIGINT;
    an exit 0 made every Ctrl-C start the next clip, and a script could not tell an interrupted clip from a whole one."""
    code, stdout, stderr = _run_and_signal(tmp_path, signal.SIGINT, "--json", "--summary", str(tmp_path / "clip.json"))
    assert code == -signal.SIGINT, (code, stderr[-300:])  # died of SIGINT, as bash needs (not exit 130)
    doc = json.loads(stdout)  # the summary came out whole before the end
    assert doc["stopped_by"] == "signal" and doc["signal"] == "SIGINT" and doc["status"] == "stopped"
    assert json.loads((tmp_path / "clip.json").read_text())["stopped_by"] == "signal"
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == doc["frames"]


def test_sigterm_ends_the_cli_run_with_status_0_for_systemd(tmp_path: Path) -> None:
    """systemd stops the service with SIGTERM: a clean stop (Restart=on-failure must not restart it)."""
    code, stdout, stderr = _run_and_signal(tmp_path, signal.SIGTERM)
    assert code == 0, (code, stderr[-300:])
    assert "stopped by SIGTERM after" in stdout


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path: Path) -> None:
    """A job started in the background (`edgeclf run ... &`, nohup) inherits SIGINT ignored, by POSIX convention so
    that a Ctrl-C at the terminal leaves it alone; the run's stop handler took SIGINT over and stopped it."""
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "edgeclf", "run", "--bundle", str(bundle), "--source", LONG_SRC, "--out",
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    time.sleep(1.0)
    running = p.poll() is None
    p.send_signal(signal.SIGTERM)  # how such a job is stopped
    _, stderr = p.communicate(timeout=120)
    assert running, stderr[-300:]
    assert p.returncode == 0 and "signal 2" not in stderr, (p.returncode, stderr[-300:])


def test_cli_json_still_prints_the_partial_runs_summary_after_a_mid_run_error(tmp_path: Path) -> None:
    """README: --json prints exactly one JSON document. A run whose results file fills up midway exits 2 with the
    error on stderr, and its summary (what it did, how it ended) on stdout."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    bundle = make_tiny_bundle(tmp_path / "b")
    summary = tmp_path / "clip.json"
    r = run_cli("run", "--bundle", str(bundle), "--source", SRC, "--out", "/dev/full", "--summary", str(summary), "--json")
    assert r.returncode == 2 and "edgeclf: error:" in r.stderr and "No space left" in r.stderr, r.stderr[-500:]
    doc = json.loads(r.stdout)
    assert doc["status"] == "error" and "No space left" in doc["error"] and doc["frames"] == 0 and doc["written"] == 0
    assert doc["frame_count_claimed"] == 12 and doc["clip"]["status"] == "error"
    assert json.loads(summary.read_text())["status"] == "error"


def test_the_printed_summary_of_a_watch_run_shows_the_files_it_failed_on(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeclf.cli import _print_run

    stage = {"median": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}
    _print_run({"frames": 3, "wall_s": 1.0, "fps": 3.0, "written": 3, "abstained": 0, "stages_ms": {"infer": stage},
                "label_counts": {"a": 3}, "out": "r.jsonl", "clip": {},
                "source_stats": {"files_seen": 5, "files_done": 3, "files_failed": 2}})
    assert "files_failed 2" in capsys.readouterr().out
