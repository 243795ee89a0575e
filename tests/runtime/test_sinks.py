"""edgeclf.runtime.sinks: durable JSONL and its torn-line reader, the video recorder, clip summary, stdout."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from edgeclf.errors import ConfigError, DataError, EdgeclfError
from edgeclf.runtime import sinks as sinks_mod
from edgeclf.runtime.sinks import (
    JsonlSink,
    ListSink,
    Sink,
    StdoutSink,
    SummarySink,
    VideoRecorderSink,
    check_append_tail,
    read_jsonl,
    summarize,
    tag_run,
)


def _rec(i: int, label: Any = "cyst", *, ts: float = 0.0, abstain: str = "", conf: float = 0.8) -> Dict[str, Any]:
    r: Dict[str, Any] = {"frame": i, "timestamp": ts, "time": 1.7e9 + ts, "label": None if abstain else label,
                         "abstain": bool(abstain), "probs": {"normal": 1 - conf, "cyst": conf},
                         "latency_ms": {"capture": 1.0, "total": 12.5}}
    if abstain:
        r["abstain_reason"] = abstain
    return r


# ------------------------------------------------------------------------------------------- base


def test_base_sink_defaults() -> None:
    assert Sink.written == 0 and Sink.needs_image is False and Sink.stop_requested is False
    assert VideoRecorderSink.needs_image is True and JsonlSink.needs_image is False
    mem = ListSink()
    mem.write({"a": 1})
    mem.write({"a": 2}, image=np.zeros((2, 2), np.uint8))
    assert mem.written == 2 and [r["a"] for r in mem.records] == [1, 2]


# ------------------------------------------------------------------------------------------- JSONL


def test_jsonl_lines_are_whole_and_flushed_while_open(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "r.jsonl"
    with JsonlSink(out) as sink:
        for i in range(5):
            sink.write(_rec(i))
            text = out.read_text()  # another reader sees every line, whole, before close
            assert text.endswith("\n") and len(text.splitlines()) == i + 1
    recs, torn = read_jsonl(out)
    assert torn == 0 and [r["frame"] for r in recs] == list(range(5)) and sink.written == 5
    sink.close()  # idempotent
    with pytest.raises(EdgeclfError, match="already closed"):
        sink.write(_rec(9))


def test_jsonl_fsync_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[int] = []
    real = os.fsync
    monkeypatch.setattr(sinks_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    clock = [100.0]
    monkeypatch.setattr(sinks_mod.time, "monotonic", lambda: clock[0])

    every = JsonlSink(tmp_path / "a.jsonl", fsync_every=0)
    for i in range(4):
        every.write(_rec(i))
    assert every.fsyncs == 4 and every.unsynced == 0
    every.close()
    assert every.fsyncs == 4  # nothing left to sync at close

    legacy = JsonlSink(tmp_path / "b.jsonl", fsync=True)
    legacy.write(_rec(0))
    assert legacy.fsync_every == 0 and legacy.fsyncs == 1
    legacy.close()

    timed = JsonlSink(tmp_path / "c.jsonl", fsync_every=1.0)
    for i in range(10):  # 0.25 s apart: a sync when a second has passed since the last one
        timed.write(_rec(i))
        clock[0] += 0.25
    assert timed.fsyncs == 2 and timed.unsynced == 1  # synced after lines 5 (t=+1 s) and 9 (t=+2 s)
    timed.close()
    assert timed.fsyncs == 3 and timed.unsynced == 0

    n = len(calls)
    never = JsonlSink(tmp_path / "d.jsonl")
    never.write(_rec(0))
    never.close()
    assert never.fsyncs == 0 and never.unsynced == 1 and len(calls) == n

    with pytest.raises(ConfigError, match="fsync_every"):
        JsonlSink(tmp_path / "e.jsonl", fsync_every=-1)


@pytest.mark.parametrize("every", [None, 1.0, 0])
def test_jsonl_sync_puts_every_line_on_disk_now_whatever_the_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      every: Any) -> None:
    # Before a watched folder marks a file done, its result must be on disk (the pipeline calls sync()).
    calls: List[int] = []
    real = os.fsync
    monkeypatch.setattr(sinks_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    monkeypatch.setattr(sinks_mod.time, "monotonic", lambda: 100.0)  # the interval never passes
    sink = JsonlSink(tmp_path / "r.jsonl", fsync_every=every)
    sink.write(_rec(0))
    sink.write(_rec(1))
    before = sink.fsyncs
    sink.sync()
    assert sink.unsynced == 0 and sink.fsyncs == before + (every != 0)
    n = len(calls)
    sink.sync()  # nothing new: no fsync
    assert len(calls) == n
    sink.close()
    sink.sync()  # after close: nothing to do, no error
    Sink().sync()
    ListSink().sync()  # sinks that keep nothing on disk: a no-op


def test_a_failing_sync_is_reported_and_sticks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = JsonlSink(tmp_path / "r.jsonl")
    sink.write(_rec(0))

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(sinks_mod.os, "fsync", failing_fsync)
    with pytest.raises(EdgeclfError, match=r"syncing .*r.jsonl to disk failed .*the last 1 may not survive"):
        sink.sync()
    with pytest.raises(EdgeclfError, match="syncing"):
        sink.write(_rec(1))
    sink.close()


def _write(path: Path, n: int) -> bytes:
    with JsonlSink(path) as sink:
        for i in range(n):
            sink.write(_rec(i, ts=i / 30))
    return path.read_bytes()


def test_read_jsonl_skips_and_counts_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    data = _write(path, 10)
    start_last = data.rstrip(b"\n").rfind(b"\n") + 1
    for cut in range(start_last + 1, len(data) - 1):  # every cut inside the last line (power loss mid-write)
        path.write_bytes(data[:cut])
        recs, torn = read_jsonl(path)
        assert torn == 1 and [r["frame"] for r in recs] == list(range(9)), cut
    path.write_bytes(data[:start_last])  # cut at a line boundary: nothing torn
    assert read_jsonl(path) == (json.loads("[" + data[:start_last].decode().strip().replace("\n", ",") + "]"), 0)
    path.write_bytes(data[:-1])  # only the newline missing: the record is whole
    recs, torn = read_jsonl(path)
    assert torn == 0 and len(recs) == 10


def test_read_jsonl_nul_padded_tail_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    data = _write(path, 6)
    path.write_bytes(data + b"\x00" * 300)  # the size reached the disk, the data did not
    recs, torn = read_jsonl(path)
    assert torn == 1 and len(recs) == 6
    path.write_bytes(data[:-40] + b"\x00" * 100 + b"\n")  # a half-written last line padded with NULs
    recs, torn = read_jsonl(path)
    assert torn == 1 and len(recs) == 5


def test_read_jsonl_raises_on_a_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    lines = _write(path, 8).decode().splitlines()
    for bad in (lines[4][:-7], "[1, 2]", "\x00\x00\x00"):
        damaged = lines[:4] + [bad] + lines[5:]
        path.write_text("\n".join(damaged) + "\n")
        with pytest.raises(DataError, match="line 5"):
            read_jsonl(path)
    # a bad, newline-terminated last line without NULs is damage too, not a torn write
    path.write_text("\n".join(lines[:-1] + [lines[-1][:-5]]) + "\n")
    with pytest.raises(DataError, match="line 8"):
        read_jsonl(path)
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # blank lines are harmless
    assert read_jsonl(path) == ([json.loads(x) for x in lines], 0)
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------- video


def _frames(n: int, h: int = 48, w: int = 64, gray: bool = False) -> List[np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (h, w) if gray else (h, w, 3)
    return [np.clip(rng.normal(140, 20, size=shape), 0, 255).astype(np.uint8) for _ in range(n)]


def _read_video(path: Path) -> List[np.ndarray]:
    cv2 = pytest.importorskip("cv2")
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


@pytest.mark.parametrize("name", ["run.mp4", "run.avi"])
def test_recorder_writes_a_readable_video_with_every_frame(tmp_path: Path, name: str) -> None:
    pytest.importorskip("cv2")
    path = tmp_path / "rec" / name
    with VideoRecorderSink(path, fps=30, size=(64, 48)) as rec:
        for i, img in enumerate(_frames(17)):
            rec.write(_rec(i, ts=i / 30, abstain="low_confidence" if i % 5 == 0 else ""), image=img)
    assert rec.written == 17 and rec.resized == 0
    back = _read_video(path)
    assert len(back) == 17 and back[0].shape == (48, 64, 3)
    # the banner darkens the top rows (annotated), the rest keeps the frame's brightness
    assert back[3][:3].mean() < 0.6 * back[3][20:].mean()


def test_recorder_resizes_gray_and_odd_frames_and_counts_them(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    path = tmp_path / "r.avi"
    rec = VideoRecorderSink(path, fps=12.5, size=(65, 49), annotate=False)
    assert rec.size == (64, 48)  # even sizes for the encoder
    for i, img in enumerate(_frames(4, 48, 64, gray=True) + _frames(3, 100, 80)):
        rec.write(_rec(i), image=img)
    rec.close()
    rec.close()
    assert rec.written == 7 and rec.resized == 3
    back = _read_video(path)
    assert len(back) == 7 and all(f.shape == (48, 64, 3) for f in back)
    with pytest.raises(EdgeclfError, match="already closed"):
        rec.write(_rec(0), image=_frames(1)[0])


def test_recorder_crops_the_odd_pixel_of_frames_of_its_own_odd_size_and_counts_none(tmp_path: Path) -> None:
    """A 607x607 ultrasound export: the video is 606x606 (encoders need even sizes); its frames lose the odd row and
    column, pixel for pixel, instead of being scaled down with a 1-px black bar, and none is "of another size"."""
    pytest.importorskip("cv2")
    path = tmp_path / "r.avi"
    frame = np.full((49, 65), 100, np.uint8)
    frame[-1, :] = frame[:, -1] = 255  # a white last row and column: cropped away, never scaled into the picture
    with VideoRecorderSink(path, fps=10, size=(65, 49), annotate=False) as rec:
        for i in range(3):
            rec.write(_rec(i), image=frame)
    assert rec.size == (64, 48) and rec.written == 3 and rec.resized == 0
    back = _read_video(path)
    assert len(back) == 3
    # MJPG is lossy, within a few levels on a flat frame; a scaled frame blends the white edge into its last row
    assert abs(back[0][-1].mean() - 100) < 6 and abs(back[0][:, -1].mean() - 100) < 6
    assert abs(back[0].mean() - 100) < 3


def test_recorder_counts_only_frames_whose_size_differs_from_the_first_frames(tmp_path: Path) -> None:
    """The video's size need not be the frames' (a source that reports none gets the model's): frames of the first
    frame's size are fitted, but only those of another size are counted as such."""
    pytest.importorskip("cv2")
    with VideoRecorderSink(tmp_path / "r.avi", fps=10, size=(64, 64), annotate=False) as rec:
        for i, img in enumerate(_frames(3, 48, 64) + _frames(1, 40, 40)):
            rec.write(_rec(i), image=img)
    assert rec.written == 4 and rec.resized == 1


def test_recorder_letterboxes_a_frame_of_another_shape_instead_of_stretching_it(tmp_path: Path) -> None:
    """A folder of images of mixed sizes: a square image in a 2:1 video keeps its shape (black bars beside it)."""
    pytest.importorskip("cv2")
    path = tmp_path / "r.avi"
    with VideoRecorderSink(path, fps=10, size=(64, 32), annotate=False) as rec:
        rec.write(_rec(0), image=np.full((32, 64), 200, np.uint8))  # the video's own size
        rec.write(_rec(1), image=np.full((40, 40, 3), 200, np.uint8))  # square: scaled to 32x32, centred
    assert rec.written == 2 and rec.resized == 1
    first, second = _read_video(path)
    assert first.shape == second.shape == (32, 64, 3)
    assert first[:, :12].mean() > 150  # the full-size frame fills the video
    assert second[:, :12].mean() < 30 and second[:, -12:].mean() < 30  # bars beside the square
    assert second[:, 24:40].mean() > 150  # the image itself, not stretched over the whole width


def test_recorder_errors_are_one_line(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    with pytest.raises(ConfigError, match=r"extension '\.gif'"):
        VideoRecorderSink(tmp_path / "a.gif", 30, (64, 48))
    with pytest.raises(ConfigError, match="frame rate"):
        VideoRecorderSink(tmp_path / "a.mp4", 0, (64, 48))
    with pytest.raises(ConfigError, match="size"):
        VideoRecorderSink(tmp_path / "a.mp4", 30, (64,))  # type: ignore[arg-type]
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ConfigError, match="could not open a writer"):
        VideoRecorderSink(tmp_path / "d.mp4", 30, (64, 48))
    with VideoRecorderSink(tmp_path / "ok.mp4", 30, (64, 48)) as rec, pytest.raises(TypeError, match="image="):
        rec.write(_rec(0))


# ------------------------------------------------------------------------------------------- summary


def test_summary_counts_frames_time_and_abstains(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    sink = SummarySink(out, labels=("normal", "cyst", "mass"))
    labels = ["cyst"] * 20 + ["normal"] * 6 + [""] * 4
    reasons = ["low_confidence"] * 3 + ["too_dark"]
    recs = []
    for i, lab in enumerate(labels):
        r = _rec(i, lab or None, ts=1000 + i / 30, abstain="" if lab else reasons[i - 26])
        recs.append(r)
        sink.write(r)
    sink.close()
    s = sink.result
    assert s is not None and sink.written == 30
    assert s["frames"] == 30 and s["majority_label"] == "cyst"
    assert s["label_frames"] == {"normal": 6, "cyst": 20, "mass": 0}
    assert s["share_frames"]["cyst"] == pytest.approx(20 / 30, abs=1e-6)
    assert s["abstained"] == 4 and s["abstain_rate"] == pytest.approx(4 / 30, abs=1e-6)
    assert s["abstain_reasons"] == {"low_confidence": 3, "too_dark": 1}
    assert s["duration_s"] == pytest.approx(1.0, abs=1e-6) and s["span_s"] == pytest.approx(29 / 30, abs=1e-6)
    assert s["share_time"]["cyst"] == pytest.approx(20 / 30, abs=1e-6)
    assert s["abstain_share_time"] == pytest.approx(4 / 30, abs=1e-6)
    assert json.loads(out.read_text()) == s and not (tmp_path / "summary.json.tmp").exists()
    assert summarize(recs, ("normal", "cyst", "mass")).to_dict() == s
    sink.close()  # idempotent



def test_a_summary_path_that_cannot_be_written_is_refused_at_construction(tmp_path: Path) -> None:
    # A folder used to fail only in close(), after the whole run, leaving the .tmp behind.
    (tmp_path / "sums").mkdir()
    with pytest.raises(ConfigError, match=r"--summary .*sums is a folder.*clip\.json") as err:
        SummarySink(tmp_path / "sums")
    assert "\n" not in str(err.value)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        SummarySink(tmp_path / "afile" / "deeper" / "clip.json")
    (tmp_path / "c.json.tmp").mkdir()
    with pytest.raises(ConfigError, match=r"c\.json\.tmp is a folder in the way"):
        SummarySink(tmp_path / "c.json")
    SummarySink(tmp_path / "new" / "sub" / "clip.json").close()  # missing folders are still made
    assert (tmp_path / "new" / "sub" / "clip.json").exists()


def test_check_output_path_refuses_a_folder_that_is_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks_mod.os, "access", lambda p, mode: False)  # root may write anywhere: pretend
    with pytest.raises(ConfigError, match="is not writable; choose a writable folder for --out"):
        sinks_mod.check_output_path(tmp_path / "r.jsonl", option="--out", example="r.jsonl")


def test_check_output_path_accepts_a_writable_file_in_a_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = tmp_path / "r.jsonl"
    made.write_text("")  # a service's pre-made results file; its folder is read-only
    monkeypatch.setattr(sinks_mod.os, "access", lambda p, mode: os.fspath(p) == str(made))
    assert sinks_mod.check_output_path(made, option="--out", example="r.jsonl") == str(made)
    with pytest.raises(ConfigError, match="is not writable"):
        sinks_mod.check_output_path(tmp_path / "new.jsonl", option="--out", example="r.jsonl")


def test_a_summary_that_fails_at_close_leaves_no_tmp_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = SummarySink(tmp_path / "clip.json")
    sink.write(_rec(0))

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sinks_mod.os, "replace", refuse)
    with pytest.raises(EdgeclfError, match="cannot write the clip summary"):
        sink.close()
    assert os.listdir(tmp_path) == []


def test_recorder_extension_is_checked_without_opening_anything(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"extension '\.mp44'.*run\.mp4"):
        sinks_mod.check_video_path(tmp_path / "run.mp44")
    assert sinks_mod.check_video_path("a.AVI") == "MJPG" and sinks_mod.check_video_path("a.gif", "mp4v") == "mp4v"
    assert os.listdir(tmp_path) == []

def test_summary_time_share_follows_timestamps_not_frame_counts() -> None:
    # 10 frames of "normal" at 10 fps, then 20 of "cyst" at 100 fps: cyst has more frames, normal more time
    recs = [_rec(i, "normal", ts=i * 0.1) for i in range(10)]
    recs += [_rec(10 + i, "cyst", ts=1.0 + i * 0.01) for i in range(20)]
    s = summarize(recs)
    assert s.majority_label == "cyst" and s.share_frames["cyst"] == pytest.approx(2 / 3)
    assert s.label_time_s is not None and s.share_time is not None
    assert s.label_time_s["normal"] == pytest.approx(1.0) and s.share_time["normal"] > 0.8
    assert s.duration_s == pytest.approx(1.0 + 19 * 0.01 + 0.01 * 1, abs=0.05)


def test_summary_gaps_are_not_credited_to_a_label() -> None:
    recs = [_rec(i, "normal", ts=i * 0.1) for i in range(5)] + [_rec(5 + i, "cyst", ts=10.0 + i * 0.1) for i in range(5)]
    s = summarize(recs, max_gap_s=1.0)
    assert s.gaps == 1 and s.gap_s == pytest.approx(9.6 - 0.1, abs=1e-6)
    assert s.duration_s == pytest.approx(1.0) and s.span_s == pytest.approx(10.4)
    assert s.share_time == {"normal": pytest.approx(0.5), "cyst": pytest.approx(0.5)}


def test_summary_edge_cases() -> None:
    one = summarize([_rec(0, "normal", ts=5.0)])  # a single X-ray image
    assert one.frames == 1 and one.majority_label == "normal" and one.duration_s is None and one.share_time is None
    empty = SummarySink().summary()
    assert empty.frames == 0 and empty.majority_label is None and empty.abstain_rate == 0.0
    all_abstain = summarize([_rec(i, ts=i, abstain="low_confidence") for i in range(3)])
    assert all_abstain.majority_label is None and all_abstain.abstain_rate == 1.0
    tie = summarize([_rec(0, "b", ts=0), _rec(1, "a", ts=1), _rec(2, "a", ts=1.5), _rec(3, "b", ts=2.5)])
    assert tie.majority_label == "b"  # equal frames: more time wins
    untimed = summarize([{"frame": 0, "label": "x", "abstain": False}, {"frame": 1, "abstain": False}])
    assert untimed.untimed == 2 and untimed.unlabeled == 1 and untimed.duration_s is None
    ml = summarize([{"frame": i, "timestamp": i, "label": None, "labels": ["a", "b"][: i % 3], "abstain": False}
                    for i in range(6)])
    assert ml.label_frames == {"a": 4, "b": 2} and ml.unlabeled == 0
    with pytest.raises(ConfigError, match="max_gap_s"):
        SummarySink(max_gap_s=0)


def test_a_recorded_clips_time_figures_come_from_its_timeline_not_its_decode_instants() -> None:
    """40 frames at 10 fps are 4 s of scan, however fast (and unevenly) they were decoded."""
    rng = np.random.default_rng(0)
    stamps = np.cumsum(rng.uniform(0.0001, 0.003, 40))  # decode instants: a few ms in all, uneven
    labels = ["normal"] * 20 + ["cyst"] * 20
    sink = SummarySink(labels=("normal", "cyst"))
    sink.set_clock(10.0, live=False)
    for i, (lab, ts) in enumerate(zip(labels, stamps)):
        sink.write(_rec(i, lab, ts=float(ts)))
    s = sink.summary()
    assert s.time_basis == "clip" and s.fps == 10.0
    assert s.duration_s == pytest.approx(4.0) and s.span_s == pytest.approx(3.9)
    assert s.share_time == {"normal": pytest.approx(0.5), "cyst": pytest.approx(0.5)} and s.gaps == 0
    assert s.majority_label == "normal"  # a tie in frames and time: the label order, not decode noise
    slow = SummarySink()
    slow.set_clock(0.5, live=False)  # a slow cine: 2 s a frame is its period, not a gap
    for i in range(3):
        slow.write(_rec(i, "cyst", ts=i * 0.001))
    assert slow.summary().duration_s == pytest.approx(6.0) and slow.summary().gaps == 0


def test_time_is_not_measured_for_a_recorded_source_without_a_frame_rate_and_kept_for_a_live_one() -> None:
    stills = SummarySink(labels=("normal", "cyst"))
    stills.set_clock(None, live=False)  # a folder of images
    for i, lab in enumerate(["cyst", "normal", "normal"]):
        stills.write(_rec(i, lab, ts=i * 0.01))
    s = stills.summary().to_dict()
    assert s["time_basis"] is None and s["duration_s"] is None and s["share_time"] is None
    assert s["majority_label"] == "normal" and s["untimed"] == 3
    live = SummarySink()
    live.set_clock(30.0, live=True)  # a camera: time as it passed
    for i in range(5):
        live.write(_rec(i, "cyst", ts=100 + i * 0.5))
    assert live.summary().time_basis == "capture" and live.summary().duration_s == pytest.approx(2.5)
    with pytest.raises(RuntimeError, match="before the first record"):
        live.set_clock(30.0, live=False)


def _file_rec(i: int, file_index: int, label: str = "cyst") -> Dict[str, Any]:
    r = _rec(i, label, ts=i * 0.1)
    r.update(file_index=file_index, probs={"normal": 0.2, "cyst": 0.8} if label == "cyst" else {"normal": 0.8, "cyst": 0.2},
             frame_label=label)
    return r


def test_the_summary_file_says_how_the_run_ended_and_marks_a_clip_it_stopped_in(tmp_path: Path) -> None:
    from edgeclf.runtime.clips import FileClipAggregator

    out = tmp_path / "clip.json"
    sink = SummarySink(out, labels=("normal", "cyst"), aggregator=FileClipAggregator(labels=["normal", "cyst"]))
    sink.set_clock(10.0, live=False)
    for i in range(6):  # file 0 whole (4 frames), file 1 cut after 2
        sink.write(_file_rec(i, 0 if i < 4 else 1))
    sink.end_run("error", error="writing result 7 failed (No space left on device)", frame_count_claimed=12,
                 source_stats={"files": 3, "skipped": 0}, multi_file=True)
    sink.close()
    s = json.loads(out.read_text())
    assert s == sink.result
    assert s["status"] == "error" and "No space left" in s["error"] and s["stopped_by"] is None
    assert s["frame_count_claimed"] == 12 and s["source_stats"] == {"files": 3, "skipped": 0}
    assert s["decision"] is None  # several files: none over all of them, even when the run read only one
    assert [(d["file_index"], d["frames"], d.get("complete")) for d in s["decisions"]] == [(0, 4, None), (1, 2, False)]


def test_a_stopped_single_clip_decision_is_marked_incomplete_and_an_ok_one_is_unmarked(tmp_path: Path) -> None:
    from edgeclf.runtime.clips import FileClipAggregator

    for status, stopped_by in (("stopped", "max_frames"), ("ok", None)):
        sink = SummarySink(tmp_path / f"{status}.json", aggregator=FileClipAggregator(labels=["normal", "cyst"]))
        for i in range(5):
            sink.write({**_file_rec(i, 0), "file_index": None})
        sink.end_run(status, stopped_by=stopped_by, frame_count_claimed=40)
        sink.close()
        s = json.loads((tmp_path / f"{status}.json").read_text())
        assert s["status"] == status and s["stopped_by"] == stopped_by and s["decision"]["frames"] == 5
        assert s["decision"].get("complete") == (False if status == "stopped" else None)
    with pytest.raises(ValueError, match="allowed: ok, stopped, error"):
        SummarySink().end_run("done")


def _cine_rec(i: int, file_index: int, file_frame: int, file_frames: int) -> Dict[str, Any]:
    return {**_file_rec(i, file_index), "file_frame": file_frame, "file_frames": file_frames}


def test_a_clip_read_to_its_last_frame_is_complete_whatever_stopped_the_run(tmp_path: Path) -> None:
    """The run stopped (a signal) after the last frame of its file: that decision is whole. One stopped inside a
    file, frames of it unread, is marked incomplete."""
    from edgeclf.runtime.clips import FileClipAggregator

    for read, complete in ((3, None), (2, False)):
        sink = SummarySink(tmp_path / "clip.json", aggregator=FileClipAggregator(labels=["normal", "cyst"]))
        for i in range(read):
            sink.write(_cine_rec(i, 0, i, 3))
        sink.end_run("stopped", stopped_by="signal", multi_file=True)
        sink.close()
        (dec,) = json.loads((tmp_path / "clip.json").read_text())["decisions"]
        assert dec["frames"] == read and dec.get("complete") == complete


def test_a_cine_of_which_one_frame_was_read_is_a_clip_not_a_still(tmp_path: Path) -> None:
    """Still or cine is the file's own frame count, not the frames the run read of it."""
    from edgeclf.runtime.clips import FileClipAggregator

    sink = SummarySink(tmp_path / "clip.json", aggregator=FileClipAggregator(labels=["normal", "cyst"]))
    sink.write(_cine_rec(0, 0, 0, 1))  # an X-ray
    sink.write(_cine_rec(1, 1, 0, 6))  # the first frame of a 6-frame cine, then the run stopped
    sink.end_run("stopped", stopped_by="max_frames", multi_file=True)
    sink.close()
    s = json.loads((tmp_path / "clip.json").read_text())
    assert s["stills"] == 1 and s["decisions_total"] == 1
    assert [(d["file_index"], d["frames"], d["complete"]) for d in s["decisions"]] == [(1, 1, False)]


def test_a_single_clip_the_source_had_no_frames_left_of_is_complete(tmp_path: Path) -> None:
    """Records that do not say their file's length (a video): the run tells whether the source had frames left."""
    from edgeclf.runtime.clips import FileClipAggregator

    for left, complete in ((False, None), (True, False), (None, False)):
        sink = SummarySink(tmp_path / "clip.json", aggregator=FileClipAggregator(labels=["normal", "cyst"]))
        for i in range(4):
            sink.write(_rec(i, "cyst"))
        sink.end_run("stopped", stopped_by="signal", frames_left=left)
        sink.close()
        assert json.loads((tmp_path / "clip.json").read_text())["decision"].get("complete") == complete


# ------------------------------------------------------------------------------------------- stdout


def test_stdout_one_short_line_per_result() -> None:
    buf = io.StringIO()
    sink = StdoutSink(buf)
    sink.write(_rec(0, "cyst", ts=50.0, conf=0.93))
    sink.write(_rec(1, ts=50.5, abstain="too_dark"))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and sink.written == 2 and sink.lines == 2
    assert "cyst" in lines[0] and "93.0%" in lines[0] and "12.5 ms" in lines[0] and "0.00s" in lines[0]
    assert "abstain (too_dark)" in lines[1] and "0.50s" in lines[1]
    assert all(len(ln) < 80 for ln in lines)


def test_stdout_defaults_to_sys_stdout_and_can_print_only_changes(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink(only_changes=True)
    for i, lab in enumerate(["a", "a", "a", "b", "b", "a"]):
        sink.write(_rec(i, lab, ts=i))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and sink.written == 6 and sink.lines == 3


def test_stdout_closed_pipe_asks_to_stop() -> None:
    class Closed(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    sink = StdoutSink(Closed())  # type: ignore[arg-type]
    sink.write(_rec(0))
    sink.write(_rec(1))
    assert sink.stop_requested and sink.written == 2 and sink.lines == 0 and sink.lost == 2


# ------------------------------------------------------------------------------------------- full disk


class _FailingFile:
    """A real unbuffered file whose write fails with `err` after `ok` writes, the failing write half done
    (what a disk filling up mid-line does)."""

    def __init__(self, real: Any, ok: int, err: int = errno.ENOSPC) -> None:
        self.real, self.ok, self.err = real, ok, err

    def write(self, data: Any) -> int:
        if self.ok <= 0:
            self.real.write(bytes(data[: len(data) // 2]))
            raise OSError(self.err, os.strerror(self.err))
        self.ok -= 1
        return int(self.real.write(data))

    def fileno(self) -> int:
        return int(self.real.fileno())

    def truncate(self, n: int) -> int:
        return int(self.real.truncate(n))

    def close(self) -> None:
        self.real.close()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_full_disk_stops_the_sink_with_whole_lines_and_the_counts(tmp_path: Path, err: int) -> None:
    out = tmp_path / "r.jsonl"
    sink = JsonlSink(out, fsync_every=0)
    sink._f = _FailingFile(sink._f, ok=3, err=err)
    for i in range(3):
        sink.write(_rec(i))
    with pytest.raises(EdgeclfError) as info:
        sink.write(_rec(3))
    msg = str(info.value)
    assert str(out) in msg and os.strerror(err) in msg and "holds 3 whole results of the 4 produced" in msg
    assert "\n" not in msg and sink.failed == msg
    with pytest.raises(EdgeclfError, match="holds 3 whole results"):  # never silently resumed
        sink.write(_rec(4))
    sink.close()  # the failure was reported once: close does not raise it again
    sink.close()
    recs, torn = read_jsonl(out)
    assert torn == 0 and [r["frame"] for r in recs] == [0, 1, 2]  # the half line was cut off again


def test_a_failing_fsync_is_reported_not_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A line whose own fsync fails is reported like a failed write: the sinks after this one never get that
    result, so it is cut off again and not counted (the file holds only results every sink saw)."""
    out = tmp_path / "r.jsonl"
    sink = JsonlSink(out, fsync_every=0)
    sink.write(_rec(0))

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(sinks_mod.os, "fsync", failing_fsync)
    with pytest.raises(EdgeclfError) as info:
        sink.write(_rec(1))
    msg = str(info.value)
    assert msg.startswith("syncing result 2 to ") and str(out) in msg and "to disk failed (Input/output error)" in msg
    assert "holds 1 whole results of the 2 produced" in msg and "\n" not in msg and sink.failed == msg
    assert sink.written == 1 and sink.unsynced == 0
    with pytest.raises(EdgeclfError, match="syncing result 2"):  # never silently resumed
        sink.write(_rec(2))
    sink.close()
    recs, torn = read_jsonl(out)
    assert torn == 0 and [r["frame"] for r in recs] == [0]


def test_a_failing_interval_fsync_cuts_only_its_own_line_and_names_the_unsynced_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an fsync interval, the lines written since the last fsync stay (every sink saw them) but the message
    says they may not survive a power loss; the line whose write triggered the failing fsync is cut off."""
    clock = [1000.0]
    monkeypatch.setattr(sinks_mod.time, "monotonic", lambda: clock[0])
    out = tmp_path / "r.jsonl"
    sink = JsonlSink(out, fsync_every=1.0)
    for i in range(3):  # within the interval: no fsync
        sink.write(_rec(i))

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(sinks_mod.os, "fsync", failing_fsync)
    clock[0] += 1.5
    with pytest.raises(EdgeclfError, match=r"holds 3 whole results \(the last 3 may not survive a power loss\) of the 4 produced"):
        sink.write(_rec(3))
    assert sink.written == 3
    sink.close()
    assert [r["frame"] for r in read_jsonl(out)[0]] == [0, 1, 2]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full is Linux-only")
def test_dev_full_is_reported_on_the_first_line() -> None:
    sink = JsonlSink("/dev/full")
    with pytest.raises(EdgeclfError, match="writing result 1 to /dev/full failed .*holds 0 whole results of the 1 produced"):
        sink.write(_rec(0))
    sink.close()


def test_a_full_disk_mid_run_stops_the_run_cleanly(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through run_bundle: the run stops at the failing line with one clear error, the results file keeps
    every line written before it, and the other sinks (the clip summary) are closed and written."""
    from edgeclf.runtime.app import run_bundle

    out, summary = tmp_path / "r.jsonl", tmp_path / "clip.json"
    real_open = open

    def open_filling_up(path: Any, *args: Any, **kwargs: Any) -> Any:
        f = real_open(path, *args, **kwargs)
        return _FailingFile(f, ok=25) if os.fspath(path) == str(out) else f

    monkeypatch.setattr(sinks_mod, "open", open_filling_up, raising=False)
    with pytest.raises(EdgeclfError) as info:
        run_bundle(str(bundle_dir), "synthetic:ultrasound?frames=200&size=64", out=str(out), summary_path=str(summary))
    assert "holds 25 whole results of the 26 produced" in str(info.value)
    monkeypatch.undo()
    recs, torn = read_jsonl(out)
    assert torn == 0 and [r["frame"] for r in recs] == list(range(25))
    assert json.loads(summary.read_text())["frames"] == 25


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full is Linux-only")
def test_cli_reports_a_full_disk_in_one_line(bundle_dir: Path) -> None:
    from tests.conftest import run_cli

    p = run_cli("run", "--bundle", str(bundle_dir), "--source", "synthetic:ultrasound?frames=20&size=64", "--out", "/dev/full",
                timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "/dev/full" in lines[0] and "No space left on device" in lines[0], p.stderr


# ------------------------------------------------------------------------------------------- append


def _tails(data: bytes) -> Dict[str, bytes]:
    """What a power loss can leave at the end of a results file `data` (whole lines), by name."""
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    return {
        "whole": data,
        "cut_short": data[:-25],
        "nul_padded_size": data + b"\x00" * 300,
        "half_line_then_nuls": data[:-40] + b"\x00" * 100 + b"\n",
        "nul_line_then_nuls": data + b"\x00" * 50 + b"\n" + b"\x00" * 20,
        "newline_lost": data[:-1],
        "only_the_last_line_cut": data[: last + 3],
        "empty": b"",
        "only_a_torn_line": data[:30],
    }


@pytest.mark.parametrize("window", [1 << 16, 8])  # 8: the end is found by growing the window over long lines
@pytest.mark.parametrize("tail", list(_tails(b"x\n")))
def test_append_keeps_every_earlier_result_and_cuts_only_a_torn_last_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture, tail: str,
                                                                           window: int) -> None:
    monkeypatch.setattr(sinks_mod, "_END_WINDOW", window)
    path = tmp_path / "r.jsonl"
    before = _tails(_write(path, 6))[tail]
    path.write_bytes(before)
    kept, torn_before = read_jsonl(path)
    keep, torn_planned, _ = check_append_tail(path)
    assert torn_planned == torn_before and path.read_bytes() == before  # the check changes nothing
    caplog.set_level("WARNING", logger=sinks_mod.__name__)
    caplog.clear()
    with JsonlSink(path, append=True, run_id="r2") as sink:
        sink.write(_rec(100))
        sink.write(_rec(101))
    assert sink.torn_cut == torn_before and sink.newline_restored == (tail == "newline_lost")
    recs, torn = read_jsonl(path)
    assert torn == 0 and recs[:len(kept)] == kept  # nothing earlier lost, nothing invented
    assert [(r.get("run"), r["frame"]) for r in recs[len(kept):]] == [("r2", 100), ("r2", 101)]
    assert path.read_bytes().startswith(before[:keep])  # appended after, never rewritten
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if torn_before:
        assert any(f"cut off {torn_before} torn line(s)" in m for m in warned), warned
    else:
        assert not any("cut off" in m for m in warned), warned


def test_append_refuses_an_end_that_is_not_a_torn_write_and_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    data = _write(path, 4)
    for bad in (data + b"not json\n", data + b"[1, 2]\n", data + b"\x00\x00\n" + b'{"frame": 9, "la'):
        path.write_bytes(bad)
        with pytest.raises(DataError) as info:
            read_jsonl(path)  # the reader calls it damaged too
        with pytest.raises(DataError, match="neither a whole result nor a torn last line") as info:
            JsonlSink(path, append=True)
        assert "\n" not in str(info.value) and path.read_bytes() == bad


def test_without_append_the_results_file_is_replaced_as_before(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    _write(path, 5)
    _write(path, 2)
    recs, _ = read_jsonl(path)
    assert [r["frame"] for r in recs] == [0, 1] and all("run" not in r for r in recs)


def test_a_full_disk_while_appending_cuts_back_only_this_runs_partial_line(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    earlier = _write(out, 3)
    sink = JsonlSink(out, fsync_every=0, append=True, run_id="r2")
    sink._f = _FailingFile(sink._f, ok=1)
    sink.write(_rec(10))
    with pytest.raises(EdgeclfError, match="holds 1 whole results of the 2 produced so far after the earlier runs"):
        sink.write(_rec(11))
    sink.close()
    recs, torn = read_jsonl(out)
    assert torn == 0 and out.read_bytes().startswith(earlier) and [r["frame"] for r in recs] == [0, 1, 2, 10]


def test_tag_run_puts_the_run_first_and_changes_nothing_else() -> None:
    rec = _rec(3)
    tagged = tag_run(rec, "abc")
    assert list(tagged)[0] == "run" and tagged["run"] == "abc" and {k: v for k, v in tagged.items() if k != "run"} == rec
    assert "run" not in rec


_WRITE_IN_A_CHILD = (
    "import os, sys\n"
    "sys.path.insert(0, {repo!r})\n"
    "from edgeclf.errors import ConfigError\n"
    "name = os.fsdecode({target!r})\n"
    "try:\n"
    "    {call}\n"
    "    print('written')\n"
    "except ConfigError as e:\n"
    "    print('refused', e)\n"
)


@pytest.mark.parametrize("what", ["record", "cine", "synth"])
def test_a_target_name_that_is_not_utf8_is_refused_not_a_crash(tmp_path: Path, what: str) -> None:
    """cv2.VideoWriter and cv2.imwrite die (SIGSEGV) on a surrogate-escaped name (a Latin-1 folder from sys.argv):
    run in a child so that a crash fails the test, not the session."""
    import os
    import subprocess
    import sys

    base = os.fsencode(str(tmp_path))
    call = {
        "record": "from edgeclf.runtime.sinks import VideoRecorderSink; VideoRecorderSink(name, 10.0, (32, 32), fourcc='MJPG').close()",
        "cine": "from edgeclf.runtime.synthetic import write_cine; write_cine(name, size=64, seed=0)",
        "synth": "from edgeclf.synth_cli import synth; synth('ultrasound', name, n=30, size=32)",
    }[what]
    target = os.path.join(base, {"record": b"rec\xe9.avi", "cine": b"cine\xe9.mp4", "synth": b"ph\xe9"}[what])
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", _WRITE_IN_A_CHILD.format(repo=repo, target=target, call=call)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"the interpreter died with {proc.returncode}: {proc.stderr[-300:]}"
    out = proc.stdout.strip()
    if what == "synth":  # written by Python, not OpenCV: any name the file system takes is fine
        assert out == "written" and len(os.listdir(target)) == 3, out
    else:
        assert out.startswith("refused") and "not valid UTF-8" in out and "\n" not in out, out


@pytest.mark.parametrize("conf, text", [(0.9996, " 99.9%"), (0.999, " 99.9%"), (1.0, "100.0%"), (0.29, " 29.0%"),
                                        (0.0, "  0.0%")])
def test_stdout_confidence_is_rounded_down_so_only_certainty_reads_100_percent(conf: float, text: str) -> None:
    line = StdoutSink.format({"frame": 1, "label": "cyst", "abstain": False, "confidence": conf})
    assert line.endswith("  " + text), line


def test_percent_text_rounds_down_but_not_below_the_decimal_value() -> None:
    from edgeclf.runtime.sinks import percent_text

    assert [percent_text(c) for c in (0.995, 0.996, 0.999, 0.9999999999, 1.0)] == ["99%", "99%", "99%", "99%", "100%"]
    # 0.29 * 100 is 28.999999999999996 in binary floating point: still 29%, not 28%
    assert [percent_text(c) for c in (0.29, 0.57, 0.0)] == ["29%", "57%", "0%"]
    assert percent_text(0.12345, 1) == "12.3%" and percent_text(float("nan"), 1) == "nan%"


def test_a_summary_takes_the_audit_head_after_close(tmp_path: Path) -> None:
    """The audit log ends after the summary is written; its head then joins the file (replaced, not appended to), and
    a summary written in place to a stream is not written twice."""
    audit = {"path": "aud/audit-x.jsonl", "head": "ab" * 32, "records": 7}
    sink = SummarySink(tmp_path / "clip.json", labels=("normal", "cyst"))
    sink.write(_rec(0))
    sink.end_run("ok")
    sink.close()
    before = json.loads((tmp_path / "clip.json").read_text())
    clip = sink.result
    sink.add_audit(audit)
    after = json.loads((tmp_path / "clip.json").read_text())
    assert after == {**before, "audit": audit} and os.listdir(tmp_path) == ["clip.json"]
    assert clip is not None and "audit" not in clip  # the run summary's "clip" stays what it was
    r, w = os.pipe()
    try:
        piped = SummarySink(f"/dev/fd/{w}")
        piped.write(_rec(0))
        piped.close()
        piped.add_audit(audit)
        os.close(w)
        w = -1
        with os.fdopen(r, encoding="utf-8") as f:
            r = -1
            text = f.read()
        assert "audit" not in json.loads(text)  # one document, as close() wrote it
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    with pytest.raises(RuntimeError):
        SummarySink().add_audit(audit)  # before close: the summary is not final yet


def test_a_summary_whose_write_failed_is_not_written_again_for_the_audit_head(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """close() failed to write the file (the run then fails with that error): adding the audit head tried the write a
    second time, a second error line for one problem, or a file the command had said it could not write."""
    sink = SummarySink(tmp_path / "clip.json", labels=("normal", "cyst"))
    sink.write(_rec(0))
    calls = []

    def failing(dest: str, text: str) -> None:
        calls.append(dest)
        raise EdgeclfError("cannot write the clip summary to clip.json: No space left on device; choose another path")

    monkeypatch.setattr(sink, "_replace", failing)
    with pytest.raises(EdgeclfError):
        sink.close()
    sink.add_audit({"path": "a.jsonl", "head": "ab" * 32, "records": 3})
    assert len(calls) == 1 and sink.result is not None and sink.result["audit"]["records"] == 3
