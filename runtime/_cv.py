"""OpenCV, imported once and quietly."""
from __future__ import annotations

import os
from typing import Any

from edgeclf.errors import require

__all__ = ["cv2"]


def cv2() -> Any:
    """The cv2 module, or a one-line error naming the `cv` extra.

    FFmpeg and OpenCV print their own warnings straight to stderr (e.g. "moov atom not found" for a
    damaged mp4), which would break the one-line error contract; our own SourceError says what went
    wrong. Setting either variable before the first import turns them back on.
    """
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    return require("cv2", "cv")
