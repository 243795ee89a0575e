"""edgeclf.runtime.live: latest-frame-wins capture, realtime pacing, and reconnecting live sources.

All with a test double (tiny frames, small timeouts): the whole file runs in a few seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

from edgeclf.errors import SourceError
from edgeclf.runtime.live import LatestFrameReader, ReconnectingSource, open_reconnecting, valid_frame
from edgeclf.runtime.sources import Frame, SyntheticSource


class _Shared:
    """What survives a reconnect: the sequence the double delivers and what it did."""

    def __init__(self, every: int, limit: int, corrupt_every: int = 0) -> None:
        self.every = every
        self.limit = limit
        self.corrupt_every = corrupt_every
        self.reads = 0
        self.next_seq = 0
        self.delivered: List[int] = []
        self.failures: Dict[str, int] = {"raise": 0, "hang": 0, "none": 0}
        self.corrupt = 0
        self.opens = 0
        self.lock = threading.Lock()


class FlakyCamera:
    """A live source double. Every `every`-th read fails, in turn by raising, hanging (until closed)
    and returning None; every `corrupt_every`-th read returns a corrupt frame. After `limit` good
    frames it hangs (a camera with nothing more to send). Good frames carry their sequence number."""

    kind = "camera"
    live = True
    fps: Optional[float] = 1000.0
    size = (3, 2)
    frame_count = None
    MODES = ("raise", "hang", "none")

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.closed = False
        self._gone = threading.Event()
        self._k = 0
        shared.opens += 1

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        s = self.shared
        if self.closed:
            return None
        with s.lock:
            s.reads += 1
            reads = s.reads
            fail = reads % s.every == 0 and s.next_seq < s.limit
            mode = self.MODES[sum(s.failures.values()) % 3] if fail else ""
            if fail:
                s.failures[mode] += 1
        if mode == "raise":
            raise SourceError("camera unplugged")
        if mode == "hang" or s.next_seq >= s.limit:
            self._gone.wait()
            return None
        if mode == "none":
            return None
        self._k += 1
        if s.corrupt_every and reads % s.corrupt_every == 0:
            s.corrupt += 1
            bad = [np.zeros((0, 3), np.uint8), np.zeros((2, 3), np.float32), np.zeros((2, 3, 4), np.uint8)]
            return Frame(image=bad[s.corrupt % 3], index=self._k, timestamp=time.monotonic())
        with s.lock:
            seq = s.next_seq
            s.next_seq += 1
            s.delivered.append(seq)
        img = np.full((2, 3), seq % 256, np.uint8)
        return Frame(image=img, index=self._k, timestamp=time.monotonic(), meta={"seq": seq})

    def close(self) -> None:
        self.closed = True
        self._gone.set()


def _fast(**kw: Any) -> Dict[str, Any]:
    base: Dict[str, Any] = {"read_timeout": 0.05, "backoff_initial": 0.001, "backoff_max": 0.004}
    base.update(kw)
    return base


# ------------------------------------------------------------------------------ ReconnectingSource


def test_every_failure_is_recovered_and_no_frame_is_lost_or_repeated() -> None:
    shared = _Shared(every=100, limit=1000, corrupt_every=37)
    waits: List[float] = []  # the backoff waits before reopening (really slept)

    def sleep(s: float) -> None:
        waits.append(s)
        time.sleep(s)

    src = ReconnectingSource(lambda: FlakyCamera(shared), drop="none", sleep=sleep, **_fast())
    got: List[Frame] = []
    while len(got) < 1000:
        frame = src.read(timeout=2.0)  # a read that hangs past read_timeout is a disconnect, not a stall
        assert frame is not None, f"stalled after {len(got)} frames: {src.stats()}"
        got.append(frame)
    stats = src.stats()
    src.close()
    # Every failure follows a frame, which resets the backoff: no reopen waits longer than backoff_initial.
    assert max(waits, default=0.0) <= _fast()["backoff_initial"] + 1e-9, waits
    seqs = [f.meta["seq"] for f in got]
    assert seqs == shared.delivered == list(range(1000))  # each delivered frame exactly once, in order
    assert [f.index for f in got] == list(range(1000))  # indexes keep counting across reconnects
    assert all(f.image[0, 0] == f.meta["seq"] % 256 for f in got)
    failures = sum(shared.failures.values())
    assert failures >= 9 and min(shared.failures.values()) >= 3, shared.failures
    assert stats["errors"] == shared.failures["raise"]
    assert stats["timeouts"] == shared.failures["hang"]
    assert stats["empty"] == shared.failures["none"]
    assert stats["reconnects"] == stats["disconnects"] == failures == shared.opens - 1
    assert stats["skipped"] == shared.corrupt > 0
    assert stats["delivered"] == 1000 and stats["dropped"] == 0
    assert got[-1].meta["connection"] == shared.opens


def test_latest_policy_drops_for_a_slow_consumer_and_still_recovers() -> None:
    shared = _Shared(every=150, limit=10**9)
    src = ReconnectingSource(lambda: FlakyCamera(shared), drop="latest", **_fast())
    got = []
    for _ in range(40):
        frame = src.read(timeout=2.0)
        assert frame is not None
        got.append(frame.meta["seq"])
        time.sleep(0.003)
    stats = src.stats()
    src.close()
    assert got == sorted(set(got))  # newest first, never an older frame after a newer one
    assert stats["dropped"] > 0 and stats["captured"] >= stats["delivered"] + stats["dropped"]


def test_backoff_doubles_to_the_cap_with_an_injected_clock() -> None:
    now = [100.0]
    sleeps: List[float] = []

    def sleep(s: float) -> None:
        sleeps.append(round(s, 6))
        now[0] += s

    shared = _Shared(every=10**9, limit=10**9)
    fails = [5]

    def open_fn() -> FlakyCamera:
        if fails[0]:
            fails[0] -= 1
            raise SourceError("no such device")
        return FlakyCamera(shared)

    src = ReconnectingSource(open_fn, connect_now=False, backoff_initial=0.1, backoff_max=0.5,
                             clock=lambda: now[0], sleep=sleep, read_timeout=1.0)
    frame = src.read()
    assert frame is not None and frame.index == 0
    assert sleeps == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert src.stats()["open_failures"] == 5 and src.stats()["reconnects"] == 0
    src.close()


def test_gives_up_after_max_retries_and_fails_fast_on_a_bad_first_open() -> None:
    def never() -> FlakyCamera:
        raise OSError("refused")

    with pytest.raises(SourceError, match="could not be opened .OSError: refused.") as exc:
        ReconnectingSource(never)
    assert "\n" not in str(exc.value)
    src = ReconnectingSource(never, connect_now=False, max_retries=3, sleep=lambda s: None, backoff_initial=0.001)
    with pytest.raises(SourceError, match="after 4 attempts"):
        src.read()
    assert src.ended and src.read() is None and src.stats()["open_failures"] == 4


def test_a_file_ends_normally_and_timeouts_return_none() -> None:
    src = ReconnectingSource(lambda: SyntheticSource(cine_size=32, frames=5), drop="none", read_timeout=1.0)
    frames = list(src)
    assert [f.index for f in frames] == list(range(5)) and src.ended and src.stats()["reconnects"] == 0

    shared = _Shared(every=10**9, limit=0)  # connected, but never sends a frame
    live = ReconnectingSource(lambda: FlakyCamera(shared), read_timeout=10.0)
    t0 = time.monotonic()
    assert live.read(timeout=0.1) is None and not live.ended
    assert time.monotonic() - t0 >= 0.1  # it waited its own timeout...
    stats = live.stats()  # ...and gave up then: the read's 10 s read_timeout did not pass, no disconnect
    assert stats["timeouts"] == stats["disconnects"] == stats["reconnects"] == 0 and shared.opens == 1, stats
    threading.Timer(0.1, live.close).start()
    assert live.read() is None and live.ended  # close() from another thread wakes a blocked read


def test_bad_settings() -> None:
    for kw in ({"drop": "oldest"}, {"read_timeout": 0}, {"backoff_initial": 2.0, "backoff_max": 1.0},
               {"backoff_factor": 0.5}, {"max_retries": -1}):
        with pytest.raises(SourceError) as exc:
            ReconnectingSource(lambda: SyntheticSource(cine_size=32), **kw)
        assert "\n" not in str(exc.value)


def test_open_reconnecting_over_open_source() -> None:
    src = open_reconnecting("synthetic:ultrasound?size=32&frames=3", drop="none")
    assert [f.index for f in src] == [0, 1, 2]
    src.close()


def test_the_wrapped_sources_kind_is_exposed() -> None:
    # The pipeline judges a reconnecting source (cine smoothing or not) by what it wraps.
    with ReconnectingSource(lambda: FlakyCamera(_Shared(every=10**9, limit=10)), **_fast()) as src:
        assert src.kind == "reconnecting" and src.inner_kind == "camera"
    later = ReconnectingSource(lambda: SyntheticSource(cine_size=32, frames=3), drop="none", connect_now=False)
    assert later.inner_kind is None
    assert later.read() is not None and later.inner_kind == "synthetic"
    later.close()


# -------------------------------------------------------------------------------- LatestFrameReader


def test_latest_reader_keeps_only_the_newest_frame() -> None:
    shared = _Shared(every=10**9, limit=10**9)
    cam = FlakyCamera(shared)
    with LatestFrameReader(cam) as reader:
        got = []
        for _ in range(15):
            frame = reader.read(timeout=2.0)
            assert frame is not None
            got.append(frame)
            time.sleep(0.005)  # a consumer slower than the camera
        stats = reader.stats()
    assert [f.meta["seq"] for f in got] == sorted({f.meta["seq"] for f in got})
    assert stats["delivered"] == 15 and stats["dropped"] > 0
    assert stats["captured"] >= stats["delivered"] + stats["dropped"]
    assert cam.closed


def test_latest_reader_none_policy_blocks_instead_of_dropping() -> None:
    shared = _Shared(every=10**9, limit=200)
    with LatestFrameReader(FlakyCamera(shared), drop="none") as reader:
        got = [reader.read(timeout=2.0) for _ in range(200)]
        stats = reader.stats()
    assert [f.meta["seq"] for f in got if f is not None] == list(range(200))
    assert stats["dropped"] == 0 and stats["delivered"] == 200


def test_latest_reader_raises_the_source_error_after_the_frames_before_it() -> None:
    shared = _Shared(every=5, limit=10**9)  # the 5th read raises
    reader = LatestFrameReader(FlakyCamera(shared), drop="none")
    seqs = [reader.read(timeout=2.0).meta["seq"] for _ in range(4)]  # type: ignore[union-attr]
    with pytest.raises(SourceError, match="unplugged"):
        reader.read(timeout=2.0)
    assert seqs == [0, 1, 2, 3] and reader.ended and reader.read() is None
    reader.close()


def test_a_file_is_read_directly_or_paced_to_its_fps() -> None:
    direct = LatestFrameReader(SyntheticSource(cine_size=32, frames=6))
    assert direct._capture is None and not direct.live
    assert [f.index for f in direct] == list(range(6))
    assert direct.stats() == {"captured": 6, "delivered": 6, "dropped": 0}
    direct.close()

    paced = LatestFrameReader(SyntheticSource(cine_size=32, frames=10, fps=100.0), realtime=True, drop="none")
    t0 = time.monotonic()
    frames = list(paced)
    took = time.monotonic() - t0
    paced.close()
    assert [f.index for f in frames] == list(range(10)) and paced.live
    assert 0.08 <= took < 1.5
    gaps = np.diff([f.timestamp for f in frames])
    assert np.median(gaps) == pytest.approx(0.01, abs=0.005)

    slow = LatestFrameReader(SyntheticSource(cine_size=32, frames=30, fps=200.0), realtime=True)
    got = []
    for frame in slow:
        got.append(frame.index)
        time.sleep(0.02)  # 50 fps consumer on a 200 fps file: most frames are dropped, as live
    stats = slow.stats()
    slow.close()
    assert got == sorted(got) and stats["dropped"] > 10
    assert stats["captured"] == 30 == stats["delivered"] + stats["dropped"]


def test_realtime_needs_an_fps() -> None:
    class NoFps:
        kind = "images"
        live = False
        fps = None

        def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
            return None

        def close(self) -> None:
            pass

    with pytest.raises(SourceError, match="realtime pacing needs frames per second"):
        LatestFrameReader(NoFps(), realtime=True)  # type: ignore[arg-type]
    LatestFrameReader(NoFps(), realtime=True, fps=5.0).close()  # type: ignore[arg-type]


def test_valid_frame() -> None:
    ok = Frame(image=np.zeros((2, 2), np.uint8), index=0, timestamp=0.0)
    assert valid_frame(ok) and valid_frame(Frame(image=np.zeros((2, 2, 3), np.uint8), index=0, timestamp=0.0))
    for bad in (None, np.zeros((2, 2), np.uint8), Frame(image=np.zeros((0, 2), np.uint8), index=0, timestamp=0.0),
                Frame(image=np.zeros((2, 2), np.float32), index=0, timestamp=0.0),
                Frame(image=np.zeros((2, 2, 2), np.uint8), index=0, timestamp=0.0)):
        assert not valid_frame(bad)


def test_each_disconnect_and_reopen_is_reported_to_on_event() -> None:
    # What the audit log receives: one fault per disconnect, one recovery per reopen, in order.
    shared = _Shared(every=50, limit=300)
    src = ReconnectingSource(lambda: FlakyCamera(shared), drop="none", **_fast())
    events: List[Any] = []
    src.on_event = lambda kind, msg, counts: events.append((kind, msg, counts["disconnects"]))
    got = 0
    while got < 300:
        assert src.read(timeout=2.0) is not None, src.stats()
        got += 1
    stats = src.stats()
    src.close()
    kinds = [k for k, _, _ in events]
    assert kinds == ["fault", "recovery"] * stats["disconnects"] and stats["disconnects"] >= 5
    assert "camera unplugged" in " ".join(m for _, m, _ in events)
    assert [n for k, _, n in events if k == "fault"] == list(range(1, stats["disconnects"] + 1))


class _FailingWithText(FlakyCamera):
    """A live source whose every read fails with `text`, as OpenCV/ffmpeg failures quote their URI."""

    def __init__(self, shared: _Shared, kind: str, text: str) -> None:
        super().__init__(shared)
        self.kind, self._text = kind, text

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        raise SourceError(self._text)


@pytest.mark.parametrize(("kind", "source", "text"), [
    ("stream", None, "stream http://10.0.0.5/c.mp4?patient=DOE_JOHN_MRN123 stopped"),
    ("gstreamer", "filesrc location=/data/DOE_JOHN/clip.mp4 ! decodebin ! appsink",
     "stream 'filesrc location=/data/DOE_JOHN/clip.mp4 ! decodebin ! appsink' delivered no frame"),
])
def test_a_disconnect_warning_names_no_uri_or_path(caplog: pytest.LogCaptureFixture, kind: str, source: Optional[str],
                                                    text: str) -> None:
    src = ReconnectingSource(lambda: _FailingWithText(_Shared(every=10**9, limit=10), kind, text), drop="none",
                             source=source, **_fast())
    events: List[Any] = []
    src.on_event = lambda kind, msg, counts: events.append(msg)
    with caplog.at_level("WARNING", logger="edgeclf.runtime.live"):
        deadline = time.monotonic() + 5.0
        while not events and time.monotonic() < deadline:
            src.read(timeout=0.2)
    src.close()
    assert events, "no disconnect seen"
    assert "disconnected" in caplog.text and "DOE_JOHN" not in caplog.text and "<source>" in caplog.text


class _Counting(FlakyCamera):
    """A FlakyCamera with its own stats(), one key of which ("skipped") a wrapper counts too."""

    def stats(self) -> Dict[str, int]:
        return {"decoded": self._k, "skipped": 1}


def test_realtime_reader_keeps_the_videos_decode_counts(tmp_path: Any) -> None:
    """--realtime wraps the video in LatestFrameReader, and the run summary takes stats() from the wrapper."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (the 'cv' extra) writes and reads the video")
    from edgeclf.runtime.sources import open_source

    path = str(tmp_path / "c.avi")
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 200, (32, 24))
    for i in range(6):
        w.write(np.full((24, 32, 3), i * 40, np.uint8))
    w.release()
    with LatestFrameReader(open_source(path), drop="none", realtime=True) as reader:
        assert sum(1 for _ in reader) == 6
        stats = reader.stats()
    assert stats == {"captured": 6, "delivered": 6, "dropped": 0, "decoded": 6, "skipped": 0, "passes": 1}


def test_a_wrapped_sources_stats_are_kept_and_a_clash_is_prefixed() -> None:
    with LatestFrameReader(_Counting(_Shared(every=10**9, limit=3)), drop="none") as reader:
        assert [reader.read(timeout=2.0) is not None for _ in range(3)] == [True] * 3
        stats = reader.stats()
    assert stats["decoded"] == 3 and stats["skipped"] == 1 and stats["delivered"] == 3
    shared = _Shared(every=4, limit=6)  # every 4th read fails: reconnects in between
    with ReconnectingSource(lambda: _Counting(shared), drop="none", **_fast()) as src:
        assert [src.read(timeout=2.0) is not None for _ in range(6)] == [True] * 6
        stats = src.stats()
    # summed over every connection; the source's "skipped" beside the wrapper's own (corrupt frames)
    assert stats["decoded"] == 6 and stats["source_skipped"] == shared.opens and stats["skipped"] == 0
    assert stats["reconnects"] == shared.opens - 1 >= 1


# ------------------------------------------------------------------------------ close while busy, counts at close


class _SlowCam:
    """A live camera double that delivers a frame every 50 ms (its fps attribute says 100), `limit` of them, then idles
    (reads return None)."""

    kind = "camera"
    live = True
    fps = 100.0
    size = (3, 2)
    frame_count = None

    def __init__(self, limit: int = 3, fail: bool = False) -> None:
        self.n = 0
        self.reads = 0
        self.limit = limit
        self.fail = fail
        self.closed = False

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        self.reads += 1
        if self.fail:
            raise SourceError("camera unplugged")
        if self.n >= self.limit:
            time.sleep(min(timeout or 0.05, 0.05))
            return None
        time.sleep(0.05)
        self.n += 1
        return Frame(image=np.zeros((2, 3), np.uint8), index=self.n, timestamp=time.monotonic())

    def close(self) -> None:
        self.closed = True


def _settle(cond: Any, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)


def test_a_source_opened_while_close_runs_is_closed_and_its_thread_stops() -> None:
    """close() from the main thread while the feeder thread reopens (a slow RTSP open): the source that open
    returns afterwards is closed, gets no capture thread, and no "recovery" is reported after close()."""
    opened: List[_SlowCam] = []
    in_open, release = threading.Event(), threading.Event()

    def open_fn() -> _SlowCam:
        if opened:
            in_open.set()
            release.wait(5)
        cam = _SlowCam(limit=10**9, fail=not opened)
        opened.append(cam)
        return cam

    rs = ReconnectingSource(open_fn, read_timeout=1.0, backoff_initial=0.001, backoff_max=0.001)
    events: List[str] = []
    rs.on_event = lambda kind, msg, counts: events.append(kind)
    got: List[Optional[Frame]] = []
    reader = threading.Thread(target=lambda: got.append(rs.read(0.5)), daemon=True)
    reader.start()
    assert in_open.wait(5), "the reader never tried to reopen"
    rs.close()
    release.set()
    reader.join(5)
    assert not reader.is_alive() and got == [None]
    late = opened[1]
    _settle(lambda: late.closed)
    reads_then = late.reads
    time.sleep(0.2)
    assert late.closed and late.reads == reads_then == 0
    assert not [t for t in threading.enumerate() if t.name == "edgeclf-reconnecting"]
    assert events == ["fault"] and rs.stats()["reconnects"] == 0


def test_latest_reader_counts_the_frame_left_in_the_slot_at_close() -> None:
    """A frame captured into the hand-off slot and never taken when the reader closes is counted as dropped."""
    r = LatestFrameReader(_SlowCam(limit=3), drop="latest", read_timeout=0.05)
    first = r.read(2.0)
    assert first is not None and first.index == 1
    _settle(lambda: r.stats()["captured"] == 3)
    r.close()
    s = r.stats()
    assert s["captured"] == 3 == s["delivered"] + s["dropped"], s


def test_reconnecting_source_counts_the_frame_left_in_the_slot_at_close() -> None:
    rs = ReconnectingSource(lambda: _SlowCam(limit=3), drop="latest", read_timeout=5.0)
    first = rs.read(2.0)
    assert first is not None and first.meta["source_index"] == 1
    _settle(lambda: rs.stats()["captured"] == 3)
    rs.close()
    s = rs.stats()
    assert s["captured"] == 3 == s["delivered"] + s["dropped"] + s["skipped"], s


def test_a_frame_the_pacing_gives_up_on_at_close_is_counted() -> None:
    """realtime pacing holds a captured frame until its time; closing then must not lose it uncounted."""
    r = LatestFrameReader(SyntheticSource(cine_size=32, frames=10, fps=2.0), realtime=True)
    assert r.read(2.0) is not None
    _settle(lambda: r.stats()["captured"] == 2)  # frame 2 waits ~0.5 s for its time
    r.close()
    s = r.stats()
    assert s["captured"] == 2 and s["delivered"] == 1 and s["dropped"] == 1, s


def test_open_reconnecting_scrubs_the_uri_from_its_disconnect_warning(caplog: pytest.LogCaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The public helper must keep a GStreamer pipeline's file path (or a URL's query) off stderr, as run_bundle does."""
    from edgeclf.runtime import sources as sources_mod

    pipeline = "filesrc location=/data/DOE_JOHN_MRN123/clip.mp4 ! decodebin ! videoconvert ! appsink"
    text = f"stream {pipeline!r} delivered no frame after 0 frames"
    monkeypatch.setattr(sources_mod, "open_source",
                        lambda uri, size=None: _FailingWithText(_Shared(every=10**9, limit=10), "gstreamer", text))
    src = open_reconnecting(pipeline, read_timeout=0.05, backoff_initial=0.001, backoff_max=0.002)
    events: List[str] = []
    src.on_event = lambda kind, msg, counts: events.append(msg)
    with caplog.at_level("WARNING", logger="edgeclf.runtime.live"):
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            src.read(timeout=0.2)
    src.close()
    assert "disconnected" in caplog.text and "DOE_JOHN" not in caplog.text and "<source>" in caplog.text
