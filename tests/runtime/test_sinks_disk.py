"""Sinks against a full disk and special files: a --record video cut short is an error, not a success; --summary
onto a pipe, device or symlink writes through it instead of replacing it.

A full disk is played by RLIMIT_FSIZE (writes past it fail with EFBIG as they fail with ENOSPC on a full disk;
Python ignores SIGXFSZ), lowered only around the writes and in this process's soft limit only."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest

from edgeclf.errors import ConfigError, EdgeclfError
from edgeclf.runtime import sinks as sinks_mod
from edgeclf.runtime.sinks import SummarySink, VideoRecorderSink

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes fail (EFBIG) until the block ends: a full disk for the writes inside it."""
    resource = pytest.importorskip("resource")
    import signal

    if signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN:
        pytest.skip("SIGXFSZ is not ignored here: a write past the limit would kill the test process")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _rec(i: int) -> Dict[str, Any]:
    return {"frame": i, "timestamp": i / 30, "time": 1.7e9 + i / 30, "label": "cyst", "abstain": False,
            "probs": {"normal": 0.2, "cyst": 0.8}, "latency_ms": {"total": 5.0}}


def _noise(n: int, h: int = 64, w: int = 64) -> List[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------------------- --record


@pytest.mark.parametrize("name", ["run.mp4", "run.avi", "run.mkv", "run.mov"])
def test_a_recording_cut_short_by_a_full_disk_is_an_error_naming_the_counts(tmp_path: Path, name: str) -> None:
    """OpenCV's writer reports no failed write: close() reads the file back (an .mp4 cut short has no index and
    plays nothing; an .avi claims 0 frames; an .mkv claims all but its last frame is missing)."""
    pytest.importorskip("cv2")
    path = tmp_path / name
    frames = _noise(100)  # about 110 kB (mp4v) to 330 kB (MJPG): well past the limit
    rec = VideoRecorderSink(path, fps=30, size=(64, 64), annotate=False)
    with file_size_limit(40_000), pytest.raises(EdgeclfError) as info:
        for i, img in enumerate(frames):
            rec.write(_rec(i), image=img)
        rec.close()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"--record {path} is incomplete: 100 frames were recorded but only "), msg
    assert "can be read back" in msg and "file size limit" in msg and "choose another --record" in msg, msg
    readable = int(msg.split("but only ")[1].split()[0])
    assert readable < 100
    if name.endswith((".mp4", ".mov")):
        assert readable == 0  # no moov atom: nothing plays
    rec.close()  # reported once; close stays idempotent


@pytest.mark.parametrize("name", ["run.mp4", "run.m4v", "run.mov", "run.mkv", "run.avi"])
@pytest.mark.parametrize("n", [1, 2, 37])
def test_a_complete_recording_passes_the_read_back(tmp_path: Path, name: str, n: int) -> None:
    """No false alarm: every container the recorder writes reports every frame and seeks to its last one."""
    pytest.importorskip("cv2")
    with VideoRecorderSink(tmp_path / name, fps=29.97, size=(48, 32)) as rec:
        for i, img in enumerate(_noise(n, 32, 48)):
            rec.write(_rec(i), image=img)
    assert rec.written == n


def test_the_read_back_counts_what_decodes_when_the_check_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting the readable frames (only after a failed check) stops at its time budget: an hour cut short must
    not hold up the end of a run; the message then says "or more"."""
    pytest.importorskip("cv2")
    path = tmp_path / "r.avi"
    rec = VideoRecorderSink(path, fps=30, size=(64, 64), annotate=False)
    for i, img in enumerate(_noise(20)):
        rec.write(_rec(i), image=img)
    rec.written = 25  # five frames the file cannot hold
    real = rec._count_readable
    monkeypatch.setattr(rec, "_count_readable", lambda api: real(api, budget_s=-1.0))
    with pytest.raises(EdgeclfError, match=r"25 frames were recorded but only 1 or more can be read back"):
        rec.close()


def test_a_recording_target_that_is_not_a_regular_file_is_refused_up_front(tmp_path: Path) -> None:
    """A pipe cannot take a container that is finished by seeking back (and opening one would wait for a reader)."""
    pytest.importorskip("cv2")
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that code which opens it anyway does not block
    try:
        with pytest.raises(ConfigError, match="not a regular file") as info:
            VideoRecorderSink(fifo, fps=30, size=(64, 64)).close()
        assert "\n" not in str(info.value)
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_full_disk_cause_reads_the_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"x")
    real = os.statvfs(tmp_path)

    class Vfs:
        f_frsize = real.f_frsize
        f_bavail = f_bfree = 3

    monkeypatch.setattr(sinks_mod.os, "statvfs", lambda p: Vfs)
    assert sinks_mod._full_disk_cause(str(f)) == f"the disk is full ({3 * real.f_frsize} bytes free)"
    Vfs.f_bavail = Vfs.f_bfree = 10 ** 9
    assert sinks_mod._full_disk_cause(str(f)) is None


_RUN_WITH_A_FULL_DISK = """
import json, resource, sys
sys.path.insert(0, {repo!r})
from edgeclf.errors import EdgeclfError
from edgeclf.runtime.app import run_bundle
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    run_bundle({bundle!r}, "synthetic:ultrasound?frames=200&size=64", out={out!r}, record={rec!r}, summary_path={summary!r})
    print(json.dumps({{"ok": True}}))
except EdgeclfError as e:
    print(json.dumps({{"error": str(e), "type": type(e).__name__}}))
"""


def test_run_bundle_reports_a_recording_cut_short_after_closing_the_other_outputs(tmp_path: Path) -> None:
    """End to end: the run's results file and clip summary are complete (they fit), the video does not, and the
    run ends with the recorder's error instead of success."""
    pytest.importorskip("cv2")
    pytest.importorskip("resource")
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    out, rec, summary = tmp_path / "r.jsonl", tmp_path / "r.mp4", tmp_path / "clip.json"
    # 120 kB: the 200 results (about 85 kB) fit, the video (about 180 kB) does not
    code = _RUN_WITH_A_FULL_DISK.format(repo=str(REPO), limit=120_000, bundle=str(bundle), out=str(out), rec=str(rec),
                                        summary=str(summary))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" in got, got
    assert got["error"].startswith(f"--record {rec} is incomplete: 200 frames were recorded but only 0 "), got
    assert json.loads(summary.read_text())["frames"] == 200  # closed and written before the error was passed on
    assert len(out.read_bytes().splitlines()) == 200


def test_cli_run_with_a_recording_cut_short_exits_2_with_the_error(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    resource = pytest.importorskip("resource")
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    rec = tmp_path / "run.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeclf", "run", "--bundle", str(bundle), "--source", "synthetic:ultrasound?frames=200&size=64",
         "--record", str(rec), "--json"],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("WARNING")]
    assert len(lines) == 1, proc.stderr  # not also logged as an ERROR by the close before the CLI says it
    assert lines[0].startswith(f"edgeclf: error: --record {rec} is incomplete: 200 frames were recorded"), proc.stderr
    assert "results written" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------- --summary


def _summary_sink(path: Path) -> SummarySink:
    s = SummarySink(path, labels=["normal", "cyst"])
    for i in range(3):
        s.write(_rec(i))
    return s


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root can make a device node")
def test_summary_onto_a_character_device_writes_through_it(tmp_path: Path) -> None:
    """As root, a rename onto /dev/null replaced the device node with a regular file: written in place now. The
    node is this test's own (the null device's numbers, in tmp_path), never the real /dev/null."""
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    _summary_sink(dev).close()
    assert stat.S_ISCHR(os.lstat(dev).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["null"]  # no .tmp left either


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            b = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


@pytest.mark.parametrize("via_link", [False, True])
def test_summary_onto_a_pipe_writes_through_it(tmp_path: Path, via_link: bool) -> None:
    """`--summary /dev/stdout | jq` is a symlink to a pipe: the reader gets the JSON, the pipe and the link stay."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = fifo
    if via_link:
        target = tmp_path / "stdout"
        target.symlink_to(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader first, so that opening it to write does not wait
    try:
        sink = _summary_sink(target)
        sink.close()
        got = json.loads(_read_all(reader).decode("utf-8"))
    finally:
        os.close(reader)
    assert got["frames"] == 3 and got == sink.result
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not via_link or os.path.islink(target)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
def test_summary_onto_a_redirected_stdout_survives_what_is_printed_after_it(tmp_path: Path) -> None:
    """`edgeclf run --summary /dev/stdout > run.log`: the summary opened again through /dev/stdout got an offset of
    its own, and the run's table, printed after the outputs close, was written over it."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("from edgeclf.runtime.sinks import SummarySink\nprint('before', flush=True)\n"
            "s = SummarySink('/dev/stdout', labels=['a', 'b'])\ns.close()\nprint('after')\n")
    log = tmp_path / "run.log"
    with open(log, "w") as f:  # the shell's `>`: truncated, not O_APPEND
        r = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.PIPE, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    text = log.read_text()
    assert text.startswith("before\n") and text.endswith("after\n"), text
    assert json.loads(text[len("before\n"):-len("after\n")])["frames"] == 0, text


@pytest.mark.parametrize("via_link", [False, True])
def test_summary_onto_a_redirected_stdout_appends_to_the_file(tmp_path: Path, via_link: bool) -> None:
    """`--summary /dev/stdout > run.log`: /dev/stdout is a link to /proc/self/fd/1, a regular file the shell holds
    open; the summary is appended to it (not renamed over it, which replaced the /dev/stdout link itself, or the
    file under the shell's open descriptor)."""
    log = tmp_path / "run.log"
    with open(log, "w", encoding="utf-8") as held:
        held.write("frame lines before\n")
        held.flush()
        fd_path = f"/proc/self/fd/{held.fileno()}"
        target: Any = fd_path
        if via_link:
            target = tmp_path / "stdout"
            target.symlink_to(fd_path)
        ino = os.fstat(held.fileno()).st_ino
        sink = _summary_sink(Path(target))
        sink.close()
        assert os.stat(log).st_ino == ino
    text = log.read_text(encoding="utf-8")
    assert text.startswith("frame lines before\n{") and json.loads(text.split("\n", 1)[1]) == sink.result
    assert not via_link or os.readlink(tmp_path / "stdout") == fd_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.log"] + (["stdout"] if via_link else []))


def test_summary_through_a_symlink_replaces_the_file_it_names_and_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "clip-1.json"
    real.write_text("old\n")
    link = tmp_path / "latest.json"
    link.symlink_to(Path("runs") / "clip-1.json")
    sink = _summary_sink(link)
    sink.close()
    assert os.path.islink(link) and json.loads(real.read_text()) == sink.result
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["clip-1.json"]


def test_summary_onto_a_new_or_regular_file_is_still_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replaced: List[Any] = []
    real_replace = os.replace
    monkeypatch.setattr(sinks_mod.os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    path = tmp_path / "clip.json"
    _summary_sink(path).close()
    path.write_text("old\n")
    _summary_sink(path).close()
    assert replaced == [(str(path) + ".tmp", str(path))] * 2 and json.loads(path.read_text())["frames"] == 3


def test_an_existing_writable_pipe_is_accepted_in_a_folder_that_is_not_writable(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's `--summary /dev/stdout` (or --out): /dev is not theirs to write, the pipe is."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    real_access = os.access
    monkeypatch.setattr(sinks_mod.os, "access",
                        lambda p, mode: False if os.fspath(p) == str(tmp_path) else real_access(p, mode))
    assert sinks_mod.check_output_path(fifo, option="--summary", example="clip.json") == str(fifo)
    with pytest.raises(ConfigError, match="is not writable"):  # a new file there still is refused
        sinks_mod.check_output_path(tmp_path / "new.json", option="--summary", example="clip.json")
