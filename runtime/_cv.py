"""OpenCV, imported once and quietly."""
from __future__ import annotations

import os
from typing import Any, Type

from edgeclf.errors import require

__all__ = ["cv2", "utf8_path"]


def cv2() -> Any:
    """The cv2 module, or a one-line error naming the `cv` extra.

    FFmpeg and OpenCV print their own warnings straight to stderr (e.g. "moov atom not found" for a
    damaged mp4), which would break the one-line error contract; our own SourceError says what went
    wrong. Setting either variable before the first import turns them back on.
    """
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    return require("cv2", "cv")


def utf8_path(text: str, what: str, error: Type[Exception]) -> str:
    """`text` (a path, URI or pipeline) as OpenCV may take it. OpenCV converts a str to UTF-8 without a check: a
    surrogate-escaped name (bytes that are not UTF-8, e.g. a Latin-1 name from a USB stick) kills the interpreter
    (SIGSEGV) in VideoCapture, VideoWriter and imwrite alike. Raises `error` without echoing the name (its
    undecodable bytes cannot be shown)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(
            f"the {what} name is not valid UTF-8 (e.g. a Latin-1 name from a USB stick or a Windows share) and "
            f"OpenCV cannot use it; supported: UTF-8 names; rename the {what} (or use a UTF-8 name)"
        ) from None
    return text
