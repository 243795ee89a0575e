"""edgeclf.runtime.watch: a watched folder classifies each file exactly once, across restarts and crashes."""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="OpenCV (the 'cv' extra) decodes the images")

from edgeclf.errors import SourceError  # noqa: E402
from edgeclf.runtime.sources import open_source  # noqa: E402
from edgeclf.runtime.watch import STATE_NAME, WatchFolderSource  # noqa: E402

POLL = 0.02
IDLE = 0.4


def _png(path: Path, value: int) -> Path:
    """A tiny gray PNG whose pixel (0, 0) says which file it is."""
    img = np.full((6, 8), 7, np.uint8)
    img[0, 0] = value
    ok, buf = cv2.imencode(".png", img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _dicom(path: Path, values: List[int]) -> Path:
    pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) reads DICOM")
    from tests.runtime.test_dicom import write_dicom

    frames = np.full((len(values), 6, 8), 7, np.uint8)
    for k, v in enumerate(values):
        frames[k, 0, 0] = v
    return write_dicom(path, frames if len(values) > 1 else frames[0])


def _consume(
    folder: Path,
    results: List[int],
    *,
    crash_after: Optional[int] = None,
    idle_exit: float = IDLE,
    state: Optional[str] = None,
) -> WatchFolderSource:
    """A pipeline stand-in: read, 'write' the result (append), then ack. `crash_after` acked results,
    the next frame is read but never written nor acked (a crash between capture and sink)."""
    src = WatchFolderSource(str(folder), poll=POLL, idle_exit=idle_exit, state_path=state)
    done = 0
    try:
        for frame in src:
            if crash_after is not None and done >= crash_after:
                break
            results.append(int(frame.image[0, 0]))
            src.ack(frame)
            done += 1
    finally:
        src.close()
    return src


def test_fifty_files_exactly_once_across_restarts_and_a_crash(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    results: List[int] = []

    # run 1: 20 files dropped while stopped; runs until idle
    for i in range(20):
        _png(inbox / f"cr_{i:03d}.png", i)
    _consume(inbox, results)
    assert sorted(results) == list(range(20))

    # run 2: 10 more dropped while stopped; the consumer crashes after 4 results
    for i in range(20, 30):
        _png(inbox / f"cr_{i:03d}.png", i)
    _consume(inbox, results, crash_after=4)
    assert len(results) == 24

    # run 3 (restart 1): the other 6 are redone, 20 more arrive while it runs, in every way a writer may
    def drop() -> None:
        time.sleep(0.05)
        for i in range(30, 40):  # written in place
            _png(inbox / f"cr_{i:03d}.png", i)
            time.sleep(0.005)
        for i in range(40, 44):  # written to .part / dotfile, then renamed into place
            tmp = _png(inbox / f"cr_{i:03d}.png.part", i) if i % 2 else _png(inbox / f".cr_{i:03d}.png", i)
            time.sleep(3 * POLL)  # the partial name sits there for several polls: never read
            os.replace(tmp, inbox / f"cr_{i:03d}.png")
        slow = inbox / "cr_044.png"  # written slowly, in pieces
        data = _png(tmp_path / "slow.png", 44).read_bytes()
        with open(slow, "wb") as f:
            for k in range(0, len(data), 16):
                f.write(data[k : k + 16])
                f.flush()
                time.sleep(POLL / 4)
        for i in range(45, 48):  # DICOM: .dcm, no extension
            _dicom(inbox / (f"IM{i}" if i % 2 else f"img{i}.dcm"), [i])
        _dicom(inbox / "cine.dcm", [48, 49])  # a 2-frame cine: 2 results
        (inbox / "notes.txt").write_text("not an image")

    dropper = threading.Thread(target=drop)
    dropper.start()
    _consume(inbox, results, idle_exit=1.0)
    dropper.join()
    # run 4 (restart 2): nothing redone (on a loaded host run 3 may idle out before the last files land: run 4 takes
    # them then, still once each)
    src = _consume(inbox, results)
    count = collections.Counter(results)
    assert set(count) == set(range(50)), sorted(set(range(50)) - set(count))
    assert all(n == 1 for n in count.values()), {k: n for k, n in count.items() if n != 1}
    stats = src.stats()  # the last run's: it saw every file, notes.txt among them
    assert stats["files_ignored"] == 1 and stats["pending"] == 0
    # the state holds hashes only: no file names
    text = (inbox / STATE_NAME).read_text()
    state = json.loads(text)
    assert state["format"] == "edgeclf-watch-state" and len(state["files"]) >= 49
    assert "cr_" not in text and "png" not in text and "IM4" not in text


def test_a_multi_frame_file_resumes_after_the_last_acked_frame(tmp_path: Path) -> None:
    _dicom(tmp_path / "cine.dcm", [10, 11, 12, 13])
    results: List[int] = []
    _consume(tmp_path, results, crash_after=2)
    assert results == [10, 11]
    state = json.loads((tmp_path / STATE_NAME).read_text())
    (entry,) = state["files"].values()
    assert entry == {"status": "partial", "frames": 4, "acked": 2}
    _consume(tmp_path, results)
    assert results == [10, 11, 12, 13]
    (entry,) = json.loads((tmp_path / STATE_NAME).read_text())["files"].values()
    assert entry["status"] == "done"


def test_frames_not_acked_are_redone_and_meta_names_no_file(tmp_path: Path) -> None:
    _png(tmp_path / "patient_smith.png", 5)
    with WatchFolderSource(str(tmp_path), poll=POLL, idle_exit=IDLE) as src:
        frame = src.read(timeout=2.0)
        assert frame is not None and frame.image[0, 0] == 5
        assert "smith" not in repr(dict(frame.meta))
        assert frame.meta["format"] == "image" and frame.meta["file_frame"] == 0
        assert isinstance(frame.meta["watch_key"], str) and src.stats()["frames_read"] == 1
    with WatchFolderSource(str(tmp_path), poll=POLL, idle_exit=IDLE) as src:
        again = src.read(timeout=2.0)
        assert again is not None and again.image[0, 0] == 5  # never acked: delivered again
        src.ack(again)
        src.ack(again)  # idempotent
        assert src.stats()["files_done"] == 1 and src.stats()["frames_acked"] == 1
        assert src.read(timeout=0.1) is None and not src.ended
        assert list(src) == [] and src.ended


def test_a_damaged_file_fails_once_and_is_retried_when_it_changes(tmp_path: Path, caplog: Any) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    results: List[int] = []
    src = _consume(tmp_path, results)
    assert results == [] and src.stats()["files_failed"] == 1
    assert "could not be decoded" in caplog.text and "x.png" not in caplog.text
    _consume(tmp_path, results)
    assert results == []  # failed under this identity: not retried
    time.sleep(0.01)
    _png(bad, 9)  # rewritten: a new identity
    _consume(tmp_path, results)
    assert results == [9]


def _returned(call: Callable[[], Any]) -> Any:
    """call() in a thread, its result: a read that waits for its next poll (an hour below) fails the test instead of
    hanging it. The 60 s is no speed bound: a read that works returns in about 0.1 s."""
    out: List[Any] = []

    def run() -> None:
        try:
            out.append(("value", call()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out.append(("error", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60.0)
    assert out, "the read still waits: it waits for the next poll, not for its timeout or close()"
    kind, value = out[0]
    if kind == "error":
        raise value
    return value


def test_read_timeout_idle_exit_and_close_from_another_thread(tmp_path: Path) -> None:
    # Polling once an hour: only the read's own timeout, or close(), can end these reads in time.
    src = WatchFolderSource(str(tmp_path), poll=3600.0)
    assert src.live and src.needs_ack and src.kind == "watch"
    t0 = time.monotonic()
    assert _returned(lambda: src.read(timeout=0.1)) is None
    assert time.monotonic() - t0 >= 0.08 and not src.ended  # it waited for its timeout; the stream goes on
    t0 = time.monotonic()
    threading.Timer(0.1, src.close).start()
    assert _returned(src.read) is None  # blocks until closed
    assert time.monotonic() - t0 >= 0.08 and src.ended and src.closed


def test_one_watcher_per_state_and_state_elsewhere(tmp_path: Path) -> None:
    with WatchFolderSource(str(tmp_path), poll=POLL), pytest.raises(SourceError, match="in use by another"):
        WatchFolderSource(str(tmp_path), poll=POLL)
    ro = tmp_path / "ro"
    ro.mkdir()
    _png(ro / "a.png", 3)
    state = tmp_path / "state" / "ro.json"
    state.parent.mkdir()
    results: List[int] = []
    _consume(ro, results, state=str(state))
    assert results == [3] and state.exists() and not (ro / STATE_NAME).exists()


def test_bad_state_file(tmp_path: Path) -> None:
    (tmp_path / STATE_NAME).write_text("{not json")
    with pytest.raises(SourceError, match="cannot be read .* move .* away") as exc:
        WatchFolderSource(str(tmp_path))
    assert "\n" not in str(exc.value)
    (tmp_path / STATE_NAME).write_text(json.dumps({"format": "other", "files": {}}))
    with pytest.raises(SourceError, match="not an edgeclf watch state"):
        WatchFolderSource(str(tmp_path))


def test_open_source_watch_uri(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 1)
    src = open_source(f"watch:{tmp_path}?poll=0.02&idle_exit=0.3", size=(4, 3))
    assert isinstance(src, WatchFolderSource) and src.live
    frames = list(src)
    src.close()
    assert len(frames) == 1 and frames[0].image.shape == (3, 4)
    for bad in (f"watch:{tmp_path}?poll=0", f"watch:{tmp_path}?every=1", "watch:", f"watch:{tmp_path}/nope"):
        with pytest.raises(SourceError) as exc:
            open_source(bad)
        assert "\n" not in str(exc.value)


def test_a_dropping_reader_is_refused(tmp_path: Path) -> None:
    from edgeclf.runtime.live import LatestFrameReader

    with WatchFolderSource(str(tmp_path), poll=POLL) as src:
        with pytest.raises(SourceError, match="drop='none'"):
            LatestFrameReader(src, drop="latest")
        _png(tmp_path / "a.png", 2)
        reader = LatestFrameReader(src, drop="none")
        frame = reader.read(timeout=2.0)
        assert frame is not None and frame.image[0, 0] == 2
        reader.ack(frame)
        assert src.stats()["files_done"] == 1
        reader.close()


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_a_briefly_unreadable_file_is_retried_not_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         kind: str) -> None:
    """Permissions set after writing, or a share's lock: the first open fails, the file is classified later
    (once), and nothing is recorded as failed (the state would keep it from ever being read)."""
    import builtins

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = _png(inbox / "a.png", 5) if kind == "png" else _dicom(inbox / "a.dcm", [5])
    real_open = builtins.open
    refused: List[str] = []

    def flaky_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(file) == str(path) and not refused:
            refused.append("once")
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", flaky_open)
    results: List[int] = []
    src = _consume(inbox, results)
    assert refused and results == [5]
    stats = src.stats()
    assert stats["files_failed"] == 0 and stats["files_done"] == 1 and stats["files_seen"] == 1
    state = json.loads((inbox / STATE_NAME).read_text())
    assert [v["status"] for v in state["files"].values()] == ["done"]


@pytest.mark.parametrize("when", ["before_open", "while_decoding"])
def test_a_file_replaced_between_listing_and_read_is_read_once_under_its_new_identity(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, when: str) -> None:
    """The modality re-sends a study under the same name just as it is picked up: its new content was read and
    acked under the old (size, mtime) identity, then classified again under the new one."""
    import builtins

    import edgeclf.runtime.watch as watch

    inbox = tmp_path / "in"
    inbox.mkdir()
    path = _png(inbox / "QUIMBY_study.png", 1)
    replaced: List[bool] = []

    def replace() -> None:
        if not replaced:
            replaced.append(True)
            img = np.full((40, 8), 7, np.uint8)  # another size: another identity
            img[0, 0] = 2
            path.write_bytes(cv2.imencode(".png", img)[1].tobytes())
            t = time.time() + 5
            os.utime(path, (t, t))

    if when == "before_open":
        real_open = builtins.open

        def replacing_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if os.fspath(file) == str(path):
                replace()
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", replacing_open)
    else:
        real_decode = watch.decode_image

        def replacing_decode(file: str, where: Optional[str] = None) -> Any:
            replace()
            return real_decode(file, where)

        monkeypatch.setattr(watch, "decode_image", replacing_decode)
    caplog.set_level("DEBUG")
    results: List[int] = []
    src = _consume(inbox, results, state=str(tmp_path / "state.json"))
    assert replaced and results == [2]
    stats = src.stats()
    assert stats["files_changed"] == 1 and stats["files_done"] == 1 and stats["files_failed"] == 0
    assert "changed while it was being read" in caplog.text and "quimby" not in caplog.text.lower()
    (entry,) = json.loads((tmp_path / "state.json").read_text())["files"].values()  # the new identity only
    assert entry["status"] == "done"


def test_a_file_that_stays_unreadable_lets_idle_exit_end_and_is_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Every poll re-queued the unreadable file and called that activity: a batch run with idle_exit never ended."""
    import builtins

    inbox = tmp_path / "in"
    inbox.mkdir()
    bad = _png(inbox / "locked.png", 1)
    _png(inbox / "fine.png", 2)
    real_open = builtins.open

    def locked_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(file) == str(bad):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", locked_open)
    results: List[int] = []
    src = WatchFolderSource(str(inbox), poll=POLL, idle_exit=0.3, state_path=str(tmp_path / "s.json"))

    def consume() -> None:
        for frame in src:
            results.append(int(frame.image[0, 0]))
            src.ack(frame)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    try:
        t.join(5.0)
        assert not t.is_alive(), "idle_exit=0.3 s: still watching after 5 s because of one unreadable file"
    finally:
        src.close()
        t.join(2.0)
    assert results == [2]
    stats = src.stats()
    assert stats["files_unreadable"] == 1 and stats["files_seen"] == 2 and stats["files_done"] == 1
    assert stats["files_failed"] == 0 and "1 files that could not be read" in caplog.text
    # not recorded: tried again at the next run, and classified once it can be read
    monkeypatch.setattr(builtins, "open", real_open)
    src = _consume(inbox, results, state=str(tmp_path / "s.json"))
    assert results == [2, 1] and src.stats()["files_unreadable"] == 0


@pytest.mark.parametrize("entry", [
    {"status": "partial", "frames": 1, "acked": None},
    {"status": "partial", "frames": 2, "acked": -1},
    {"status": "partial", "frames": 2, "acked": "1"},
    {"status": "done", "frames": "two", "acked": 2},
    {"status": "done", "frames": 1, "acked": True},
    {"status": 7, "frames": 1, "acked": 1},
])
def test_a_bad_value_in_the_state_file_is_one_line_not_a_traceback(tmp_path: Path, entry: dict) -> None:
    from edgeclf.runtime.watch import _identity

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    png = _png(inbox / "a.png", 1)
    st = png.stat()
    state = {"format": "edgeclf-watch-state", "version": 1,
             "files": {_identity("a.png", st.st_size, st.st_mtime_ns): entry}}
    (inbox / STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(SourceError, match=r"has a bad entry .*allowed: .*move .* away") as exc:
        _consume(inbox, [])
    assert "\n" not in str(exc.value)


def test_a_failed_entry_without_frames_is_a_valid_state(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    state = {"format": "edgeclf-watch-state", "version": 1,
             "files": {"0" * 20: {"status": "failed", "frames": None, "acked": 0}}}
    (inbox / STATE_NAME).write_text(json.dumps(state))
    results: List[int] = []
    _png(inbox / "b.png", 4)
    _consume(inbox, results)
    assert results == [4]


def test_a_name_that_looks_like_an_extension_stays_out_of_records_and_logs(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _dicom(inbox / "Jane.Doe", [7])  # DICOM found by its marker; splitext calls ".doe" its extension
    _png(inbox / "b.png", 8)
    (inbox / "John.Smith").write_text("not an image")  # ignored, logged
    caplog.set_level("DEBUG")
    src = WatchFolderSource(str(inbox), poll=POLL, idle_exit=IDLE)
    metas = []
    try:
        for frame in src:
            metas.append(dict(frame.meta))
            src.ack(frame)
    finally:
        src.close()
    assert sorted(m["ext"] for m in metas) == ["", ".png"]
    text = json.dumps(metas, default=str) + caplog.text
    assert "doe" not in text.lower() and "smith" not in text.lower() and "jane" not in text.lower()


# ------------------------------------------------------------------------------------- through the pipeline


def _pipeline_png(path: Path, shape: tuple, mtime: float) -> None:
    cv2.imwrite(str(path), np.random.default_rng(0).integers(30, 200, size=shape, dtype=np.uint8))
    os.utime(path, (mtime, mtime))


def _run_watch(tmp_path: Path, inbox: Path, sinks: List[Any], src: Optional[WatchFolderSource] = None) -> Any:
    from edgeclf.runtime.backends import FakeBackend
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.pipeline import run_pipeline
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))
    src = src or WatchFolderSource(str(inbox), poll=POLL, idle_exit=IDLE)
    try:
        with FakeBackend((1, 8, 8), 3) as be:
            return run_pipeline(b, src, be, sinks), src
    finally:
        src.close()


def test_a_tiny_image_is_abstained_and_acked_not_the_end_of_the_service(tmp_path: Path) -> None:
    # A 6x6 thumbnail raised DataError in the quality gate: the run ended, the file was never acked, and the
    # service died on the same file at every restart.
    from edgeclf.runtime.sinks import ListSink

    inbox = tmp_path / "in"
    inbox.mkdir()
    now = time.time() - 100
    _pipeline_png(inbox / "a_small.png", (6, 6), now)
    _pipeline_png(inbox / "b_big.png", (64, 64), now + 1)
    mem = ListSink()
    s, src = _run_watch(tmp_path, inbox, [mem])
    assert s.frames == 2 and [r.get("abstain_reason") for r in mem.records][0] == "too_small"
    assert src.stats()["files_done"] == 2
    again = ListSink()
    s2, _ = _run_watch(tmp_path, inbox, [again])  # a restart: both files are done
    assert s2.frames == 0 and again.records == []


def test_a_file_is_marked_done_only_once_its_result_is_on_disk(tmp_path: Path) -> None:
    # The state (fsynced at every ack) said "done" while the result line waited up to --fsync-every (1 s) for
    # its fsync: a power loss then lost the result for good.
    from edgeclf.runtime.sinks import JsonlSink

    inbox = tmp_path / "in"
    inbox.mkdir()
    for i in range(3):
        _pipeline_png(inbox / f"x{i}.png", (64, 64), time.time() - 100 + i)
    out = JsonlSink(tmp_path / "r.jsonl", fsync_every=None)  # even a sink told never to fsync
    unsynced_at_ack: List[int] = []

    class Watched(WatchFolderSource):
        def ack(self, frame: Any) -> None:
            unsynced_at_ack.append(out.unsynced)
            super().ack(frame)

    try:
        _run_watch(tmp_path, inbox, [out], Watched(str(inbox), poll=POLL, idle_exit=IDLE))
    finally:
        out.close()
    assert unsynced_at_ack == [0, 0, 0] and out.fsyncs >= 3


def test_result_lines_say_which_file_and_frame_they_are_without_naming_it(tmp_path: Path) -> None:
    # watch.py promises meta["watch_key"] and meta["file_frame"] so that a repeat after a crash can be dropped;
    # the records carried neither.
    from edgeclf.runtime.sinks import JsonlSink, read_jsonl

    inbox = tmp_path / "in"
    inbox.mkdir()
    _pipeline_png(inbox / "ZYQUIST_ORVILLE.png", (64, 64), time.time() - 100)
    _dicom(inbox / "QUILLFEATHER_MARGOLINE.dcm", [10, 20, 30])
    os.utime(inbox / "QUILLFEATHER_MARGOLINE.dcm", (time.time() - 99,) * 2)
    out = JsonlSink(tmp_path / "r.jsonl")
    try:
        _run_watch(tmp_path, inbox, [out])
    finally:
        out.close()
    recs, _ = read_jsonl(tmp_path / "r.jsonl")
    assert [r["file_frame"] for r in recs] == [0, 0, 1, 2]
    keys = [r["watch_key"] for r in recs]
    assert len(set(keys)) == 2 and keys[1] == keys[2] == keys[3]
    assert all(len(k) == 20 and int(k, 16) >= 0 for k in keys)  # watch.py's hash of name, size and mtime
    text = (tmp_path / "r.jsonl").read_text().lower()
    assert not any(w in text for w in ("zyquist", "orville", "quillfeather", "margoline"))
    assert all("name_hash" not in r and "source_id" not in r for r in recs)


def _state_entries(folder: Path) -> dict:
    return json.loads((folder / STATE_NAME).read_text())["files"]


def _drain(folder: Path, results: List[int], **kw: Any) -> dict:
    with WatchFolderSource(str(folder), poll=POLL, idle_exit=IDLE, **kw) as src:
        for frame in src:
            results.append(int(frame.image[0, 0]))
            src.ack(frame)
        return src.stats()


def test_the_state_forgets_a_file_gone_for_forget_seconds_and_keeps_the_rest(tmp_path: Path) -> None:
    """A cart that archives its inbox: the state must not keep an entry per file ever seen, for good."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    results: List[int] = []
    for day in range(6):  # each "day" one new file arrives and yesterday's is archived
        if day:
            (inbox / f"{day - 1}.png").unlink()
        _png(inbox / f"{day}.png", day + 1)
        _drain(inbox, results, forget=0.1)
    assert results == [1, 2, 3, 4, 5, 6]  # each file once: forgetting never re-reads a file still there
    entries = _state_entries(inbox)
    # today's file, and at most yesterday's (gone less than forget when the last run listed the folder)
    assert 1 <= len(entries) <= 2, entries


def test_a_file_back_before_forget_is_not_read_again_and_loses_its_gone_stamp(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    png = _png(inbox / "a.png", 5)
    results: List[int] = []
    _drain(inbox, results)
    st = png.stat()
    kept = png.read_bytes()
    png.unlink()
    stats = _drain(inbox, results)  # default forget (30 days): the entry stays, stamped gone
    (entry,) = _state_entries(inbox).values()
    assert isinstance(entry.get("gone"), int) and stats["files_forgotten"] == 0
    png.write_bytes(kept)
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns))  # put back unchanged (mv from an archive keeps mtime)
    _drain(inbox, results)
    assert results == [5]
    (entry,) = _state_entries(inbox).values()
    assert "gone" not in entry and entry["status"] == "done"


def test_forget_none_keeps_every_entry_and_a_forgotten_file_back_is_read_again(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    png = _png(inbox / "a.png", 7)
    results: List[int] = []
    _drain(inbox, results)
    st, kept = png.stat(), png.read_bytes()
    png.unlink()
    _drain(inbox, results, forget=None)
    assert len(_state_entries(inbox)) == 1
    stats = _drain(inbox, results, forget=0.05)
    assert stats["files_forgotten"] == 1 and _state_entries(inbox) == {}
    png.write_bytes(kept)
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns))
    _drain(inbox, results)
    assert results == [7, 7]  # documented: a forgotten file put back is a repeat (same watch_key)


def test_forget_option_in_the_uri(tmp_path: Path) -> None:
    with open_source(f"watch:{tmp_path}?forget=86400") as src:
        assert isinstance(src, WatchFolderSource) and src.forget == 86400.0
    with open_source(f"watch:{tmp_path}") as src:
        assert src.forget == 30 * 24 * 3600
    for bad in ("forget=0", "forget=-1", "forget=inf", "forget=soon"):
        with pytest.raises(SourceError, match="forget") as exc:
            open_source(f"watch:{tmp_path}?{bad}")
        assert "\n" not in str(exc.value)
    with pytest.raises(SourceError, match="forget"):
        WatchFolderSource(str(tmp_path), forget=float("nan"))


def test_a_bad_gone_stamp_in_the_state_is_one_line(tmp_path: Path) -> None:
    state = {"format": "edgeclf-watch-state", "version": 1,
             "files": {"0" * 20: {"status": "done", "frames": 1, "acked": 1, "gone": "yesterday"}}}
    (tmp_path / STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(SourceError, match=r"bad entry \(gone=.*allowed: .*gone whole numbers") as exc:
        WatchFolderSource(str(tmp_path))
    assert "\n" not in str(exc.value)


def test_a_multi_frame_dicom_replaced_partway_is_not_finished_from_the_new_file(tmp_path: Path) -> None:
    """Frames are decoded lazily: a cine re-sent under the same name while its frames were being read must not
    have its remaining frames taken from the new file under the old identity. The frames read before stay (they
    are the old file's); the new file is read whole under its own identity."""
    pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) reads DICOM")
    from tests.runtime.test_dicom import write_dicom

    def cine(values: List[int]) -> np.ndarray:  # frames larger than a read buffer, so that reading is really lazy
        frames = np.full((len(values), 256, 256), 7, np.uint8)
        frames[:, 0, 0] = values
        return frames

    inbox = tmp_path / "in"
    inbox.mkdir()
    path = write_dicom(inbox / "cine.dcm", cine([10, 11, 12, 13]))
    got: List[tuple] = []
    with WatchFolderSource(str(inbox), poll=POLL, idle_exit=IDLE, state_path=str(tmp_path / "s.json")) as src:
        for frame in src:
            got.append((frame.meta["watch_key"], int(frame.image[0, 0])))
            src.ack(frame)
            if len(got) == 2:
                write_dicom(path, cine([20, 21, 22, 23, 24]))  # re-sent in place: another size, another identity
                t = time.time() + 5
                os.utime(path, (t, t))
        stats = src.stats()
    old, new = got[0][0], got[-1][0]
    assert old != new
    assert [v for k, v in got if k == old] == [10, 11], got  # nothing of the new file under the old identity
    assert [v for k, v in got if k == new] == [20, 21, 22, 23, 24], got
    assert stats["files_changed"] == 1
