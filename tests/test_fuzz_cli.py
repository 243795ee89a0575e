"""Property-based tests of the command line: random strings and numbers for `edgeclf run` and
`edgeclf bundle verify`, invoked in-process through click's CliRunner (profiles: tests/_fuzz.py).

A user sees either a result (exit 0), a click usage error (exit 2 with a one-line message), or an
EdgeclfError (exit 2, one line, from edgeclf.cli.main); anything else is a bug with a traceback.
"""
from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path
from typing import Any, List

import click
import pytest
from click.testing import CliRunner
from hypothesis import assume, event, given
from hypothesis import strategies as st

from edgeclf.cli import cli
from tests._fuzz import check_error, time_limit

# Sources left out of random generation, each for a reason that is not a bug:
# - network streams (rtsp://, http(s)://, rtmp://) wait up to 10 s per try for a server that is not there;
# - watch:FOLDER is a live source that waits for files until stopped;
# - '**' globs walk every folder below the current one (or below / for an absolute pattern).
_SLOW = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "watch:")


def _allowed_source(s: str) -> bool:
    low = s.strip().lower()
    return not any(low.startswith(p) for p in _SLOW) and "**" not in s and "\x00" not in s


text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
numberish = st.one_of(st.integers(-10, 10**9).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                      text, st.sampled_from(["", "0", "1", "-1", "1e309", "nan", "0x10", " 3 ", "1_000"]))
_SAFE = string.ascii_letters + string.digits + "._-"
# Output names stay inside the test's own folder (a random '../x' would write elsewhere).
out_name = st.text(st.sampled_from(_SAFE), min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


def _few_threads(s: str) -> str:
    """Known and reported, not fuzzed again: a huge --threads makes onnxruntime start that many threads
    (thousands hang session creation; the CLI accepts any count >= 1)."""
    try:
        return s if int(s) <= 64 else "64"
    except ValueError:
        return s


def _mostly(valid: Any, wild: Any = numberish, odds: int = 8) -> Any:
    """`valid` with odds to 1 against `wild`, so that most runs get going (one_of would pick more wild ones)."""
    return st.sampled_from([False] * odds + [True]).flatmap(lambda is_wild: wild if is_wild else valid)


@st.composite
def synthetic_uri(draw: st.DrawFn) -> str:
    keys = draw(st.lists(st.sampled_from(["frames", "size", "seed", "fps", "bogus", ""]), max_size=4))
    vals = [draw(st.one_of(st.integers(-3, 300).map(str), numberish)) for _ in keys]
    query = "&".join(f"{k}={v}" for k, v in zip(keys, vals))
    scenario = draw(st.sampled_from(["ultrasound", "ultrasound", "xray", "", "ULTRASOUND"]))
    if "frames" not in keys:  # an endless synthetic source: keep the run short
        query = (query + "&" if query else "") + "frames=3"
    return f"synthetic:{scenario}" + (f"?{query}" if draw(st.booleans()) or keys else "")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> List[str]:
    """A few files a --source may name: random bytes with media extensions, an empty folder, a real image."""
    import cv2
    import numpy as np

    folder = tmp_path_factory.mktemp("media")
    for ext in (".mp4", ".png", ".dcm", ".avi", ".txt", ""):
        (folder / f"junk{ext}").write_bytes(bytes(range(256)) * 3)
    (folder / "empty").mkdir()
    cv2.imwrite(str(folder / "ok.png"), np.full((40, 40), 128, np.uint8))
    return [str(p) for p in sorted(folder.iterdir())]


def _invoke(args: List[str]) -> None:
    """Run `edgeclf ARGS` in-process; the outcome must be one a user can read."""
    runner = CliRunner()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # relative --out/--record/--summary land here
        try:
            with time_limit():
                res = runner.invoke(cli, args, standalone_mode=False, catch_exceptions=True)
        finally:
            os.chdir(cwd)
    exc = res.exception
    event(f"{args[0]}: " + ("ok" if exc is None else type(exc).__name__))
    if exc is None or isinstance(exc, SystemExit):
        assert res.exit_code in (0, 2), (args, res.exit_code, res.output)
        return
    if isinstance(exc, click.ClickException):  # usage errors: `main` prints them as one line, exit code 2
        assert exc.format_message().strip(), args
        return
    if isinstance(exc, click.exceptions.Exit):
        return
    if isinstance(exc, (KeyboardInterrupt, click.exceptions.Abort)):
        pytest.fail(f"{args}: aborted")
    try:
        check_error(exc)
    except AssertionError:
        import traceback

        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        raise AssertionError(f"edgeclf {args!r} raised a traceback:\n{tb}") from None


@given(data=st.data())
def test_run_with_random_arguments_fails_in_one_line(bundle_dir: Path, media: List[str], data: st.DataObject) -> None:
    bundle = data.draw(_mostly(st.just(str(bundle_dir)), st.one_of(text, st.sampled_from(media)), 5))
    source = data.draw(_mostly(synthetic_uri(), st.one_of(st.sampled_from(media), text, st.sampled_from(
        ["0", "/dev/video9", "v4l2src ! appsink", "frames/*.png", "", " "])), 4))
    assume(_allowed_source(source))
    args = ["run", "--bundle", bundle, "--source", source]
    options: List[Any] = [
        ("--max-frames", _mostly(st.integers(1, 5).map(str), numberish, 11)),
        ("--min-confidence", _mostly(st.floats(0, 0.99).map(str), numberish, 11)),
        ("--threads", _mostly(st.integers(1, 4).map(str), numberish.map(_few_threads), 11)),
        ("--fsync-every", _mostly(st.sampled_from(["0", "0.5", "1"]), numberish, 11)),
        ("--roi", _mostly(st.sampled_from(["sector", "none", "1,2,30,40"]), st.one_of(text, st.just("5,5,1,1")))),
        ("--smoothing", _mostly(st.sampled_from(["auto", "cine", "off"]), text)),
        ("--precision", _mostly(st.just("fp32"), st.one_of(text, st.sampled_from(["fp16", "int8"])))),
        ("--backend", _mostly(st.just("ort-cpu"), st.one_of(text, st.sampled_from(["ort-cuda", "ort-tensorrt"])))),
        ("--device", _mostly(st.just("x86-cpu"), st.one_of(text, st.just("x86-nvidia-gpu")))),
        ("--out", out_name), ("--summary", out_name),
        ("--record", out_name.map(lambda s: s + data.draw(st.sampled_from([".mp4", ".avi", ".avi", "", ".xyz"])))),
    ]
    for flag, strategy in options:
        if data.draw(st.integers(0, 3)) == 0:
            args += [flag, data.draw(strategy)]
    for flag in ("--no-quality", "--realtime", "--json"):
        if data.draw(st.integers(0, 4)) == 0:
            args.append(flag)
    if "--max-frames" not in args:
        args += ["--max-frames", "3"]
    _invoke(args)


@given(data=st.data())
def test_bundle_verify_and_info_with_random_arguments_fail_in_one_line(bundle_dir: Path, media: List[str],
                                                                      data: st.DataObject) -> None:
    path = data.draw(st.one_of(st.just(str(bundle_dir)), text, st.sampled_from(media), st.just("")))
    cmd = data.draw(st.sampled_from([["bundle", "verify"], ["bundle", "info"]]))
    args = cmd + [path]
    if cmd[1] == "verify":
        if data.draw(st.booleans()):
            args += ["--backend", data.draw(st.one_of(text, st.sampled_from(["ort-cpu", "ort-cuda", "ort-tensorrt"])))]
        if data.draw(st.booleans()):
            args.append(data.draw(st.sampled_from(["--parity", "--no-parity"])))
    if data.draw(st.booleans()):
        args.append("--json")
    if data.draw(st.integers(0, 5)) == 0:  # stray arguments
        args.append(data.draw(text))
    _invoke(args)
