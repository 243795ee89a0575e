"""Streams in edgeclf.runtime.sources: http(s)/rtsp through FFmpeg, GStreamer pipelines, URI dispatch.

An HTTP server on localhost stands in for a network camera; no outside network is needed.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="OpenCV (the 'cv' extra) reads streams")

from edgeclf.errors import SourceError  # noqa: E402
from edgeclf.runtime.live import ReconnectingSource  # noqa: E402
from edgeclf.runtime.sources import (  # noqa: E402
    StreamSource,
    gstreamer_available,
    is_gstreamer_pipeline,
    open_source,
    redact_uri,
)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """http://user:pw@127.0.0.1:PORT/clip.avi: 8 MJPG frames, the first pure red."""
    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(8):
        writer.write(np.full((48, 64, 3), (0, 0, 255) if i == 0 else (20 * i,) * 3, np.uint8))
    writer.release()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://user:s3cret@127.0.0.1:{server.server_address[1]}/clip.avi"
    finally:
        server.shutdown()
        server.server_close()


def test_http_stream_is_live_rgb_and_raises_when_it_stops(served: str) -> None:
    src = open_source(served)
    assert isinstance(src, StreamSource) and src.live and src.kind == "stream"
    assert src.fps == pytest.approx(10.0) and src.size == (64, 48) and src.frame_count is None
    first = src.read()
    assert first is not None and first.image.shape == (48, 64, 3)
    assert first.image[0, 0, 0] > 200 and first.image[0, 0, 2] < 50  # RGB, not BGR
    for _ in range(7):
        assert src.read() is not None
    with pytest.raises(SourceError, match="delivered no frame after 8 frames") as exc:
        src.read()
    msg = str(exc.value)
    assert "s3cret" not in msg and "***@127.0.0.1" in msg and "\n" not in msg
    src.close()


def test_a_stream_that_stops_is_reopened(served: str) -> None:
    src = ReconnectingSource(lambda: open_source(served), drop="none", read_timeout=2.0, backoff_initial=0.01)
    frames = [src.read(timeout=5.0) for _ in range(20)]  # 8 per connection: reconnects twice
    src.close()
    assert all(f is not None for f in frames)
    assert [f.index for f in frames if f is not None] == list(range(20))
    assert src.stats()["reconnects"] == 2 and src.stats()["errors"] == 2


@pytest.mark.parametrize("uri", ["rtsp://admin:pw@127.0.0.1:1/live", "http://127.0.0.1:1/a.mjpg"])
def test_unreachable_stream_is_one_line_without_credentials(uri: str) -> None:
    with pytest.raises(SourceError, match="could not be opened") as exc:
        open_source(uri)
    msg = str(exc.value)
    assert "\n" not in msg and ":pw@" not in msg and "ffprobe" in msg


def test_gstreamer_pipelines_are_recognised() -> None:
    for text in ("videotestsrc ! appsink", "v4l2src device=/dev/video0", "nvarguscamerasrc sensor-id=0",
                 "filesrc location=a.mp4 ! decodebin ! videoconvert ! appsink"):
        assert is_gstreamer_pipeline(text)
    for text in ("clip.mp4", "frames/", "0", "rtsp://host/x", "a!b.png"):
        assert not is_gstreamer_pipeline(text)


def test_gstreamer_without_gstreamer_says_why() -> None:
    if gstreamer_available():
        with pytest.raises(SourceError, match="has no appsink"):
            open_source("videotestsrc num-buffers=2 ! videoconvert")
        src = open_source("videotestsrc num-buffers=3 ! videoconvert ! video/x-raw,format=BGR ! appsink")
        assert src.read() is not None
        src.close()
        return
    with pytest.raises(SourceError) as exc:
        open_source("v4l2src device=/dev/video0 ! videoconvert ! appsink")
    assert str(exc.value).endswith(
        "this OpenCV was built without GStreamer (pip wheels are); on Jetson use the system OpenCV "
        "from JetPack, or give a device path/URL instead"
    )


def test_redact_uri() -> None:
    assert redact_uri("rtsp://admin:pw@10.0.0.2:554/s") == "rtsp://***@10.0.0.2:554/s"
    assert redact_uri("http://host/a@b") == "http://host/a@b"
    assert redact_uri("clip.mp4") == "clip.mp4"


def test_camera_fourcc_is_checked() -> None:
    with pytest.raises(SourceError, match="fourcc 'MJPEG' is not valid") as exc:
        open_source("/dev/video57", fourcc="MJPEG")
    assert "\n" not in str(exc.value)
    with pytest.raises(SourceError, match="could not be opened"):
        open_source("/dev/video57", fourcc=None)
