"""write_cine (and `edgeclf data synth cine`) on a full disk: said as such, not put down to the OpenCV build, and
nothing cut short is left behind (a rerun would be refused: --out exists)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeclf.errors import DataError
from edgeclf.runtime import sinks as sinks_mod
from edgeclf.runtime import synthetic as syn
from tests.runtime.test_sinks_disk import file_size_limit

REPO = Path(__file__).resolve().parents[2]
TL = [(0, 10), (1, 10)]


def test_a_cine_cut_short_by_a_full_disk_is_named_so_and_removed(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    out = tmp_path / "loop.mp4"
    with file_size_limit(20_000), pytest.raises(DataError) as info:  # the 20 frames are about 60 kB
        syn.write_cine(out, timeline=TL, size=64)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{str(out)!r} could not be written completely (the file reached"), msg
    assert "reads back 0 of 20 frames" in msg and "was removed" in msg and "free space" in msg, msg
    assert "backend is incomplete" not in msg and "OpenCV build" not in msg, msg
    assert sorted(os.listdir(tmp_path)) == []


def _short_read_back(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """The video reads back short while this machine shows `free` bytes free (no file size limit in play)."""
    monkeypatch.setattr(syn, "_read_back", lambda cv2, path, size: (3, True))
    frsize = os.statvfs(REPO).f_frsize

    class Vfs:
        f_frsize = frsize
        f_bavail = f_bfree = free // frsize

    monkeypatch.setattr(sinks_mod.os, "statvfs", lambda p: Vfs)


def test_a_full_disk_shown_by_its_free_space_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2")
    _short_read_back(monkeypatch, 0)
    out = tmp_path / "loop.mp4"
    with pytest.raises(DataError, match=r"could not be written completely \(the disk is full \(0 bytes free\)\): it reads "
                                        r"back 3 of 20 frames") as info:
        syn.write_cine(out, timeline=TL, size=64)
    assert "OpenCV" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == []


def test_without_a_sign_of_a_full_disk_the_disk_is_still_named_before_opencv(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2")
    _short_read_back(monkeypatch, 10 ** 12)
    out = tmp_path / "loop.mp4"
    with pytest.raises(DataError) as info:
        syn.write_cine(out, timeline=TL, size=64)
    msg = str(info.value)
    assert "\n" not in msg and "(disk full or not writable?)" in msg and "OpenCV build with FFmpeg" in msg, msg
    assert msg.index("disk full") < msg.index("OpenCV"), msg
    assert sorted(os.listdir(tmp_path)) == []


def test_a_timeline_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2")
    real = Path.write_text

    def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.name.endswith(".timeline.json"):
            real(self, data[:10], *args, **kwargs)  # half of it went out, then the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DataError, match=r"cannot write the cine's timeline .*No space left on device; the cine was removed"):
        syn.write_cine(tmp_path / "loop.mp4", timeline=TL, size=64)
    assert sorted(os.listdir(tmp_path)) == []


def test_an_interrupted_cine_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2")

    def interrupted(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(syn, "_read_back", interrupted)
    with pytest.raises(KeyboardInterrupt):
        syn.write_cine(tmp_path / "loop.mp4", timeline=TL, size=64)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_complete_cine_keeps_both_files(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    meta = syn.write_cine(tmp_path / "loop.mp4", timeline=TL, size=64)
    assert meta["frames"] == 20 and sorted(os.listdir(tmp_path)) == ["loop.mp4", "loop.timeline.json"]


def test_cli_synth_cine_on_a_full_disk_is_one_line_and_a_rerun_works(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    resource = pytest.importorskip("resource")
    out = tmp_path / "loop.mp4"
    cmd = [sys.executable, "-m", "edgeclf", "data", "synth", "cine", "--out", str(out), "--size", "64"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(lines) == 1 and lines[0].startswith("edgeclf: error: "), full.stderr
    assert "could not be written completely" in lines[0] and "backend is incomplete" not in lines[0], lines[0]
    assert not out.exists() and not out.with_suffix(".timeline.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert out.exists() and out.with_suffix(".timeline.json").exists()
