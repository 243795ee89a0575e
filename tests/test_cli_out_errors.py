"""Where output cannot be written, and training folders that are damaged: one line and exit 2, before the work where
it can be known before it (a training, an export, a profile), never a traceback after it."""
from __future__ import annotations

import io
import os
import resource
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, TINY_DATA


def _main(argv: list[str]) -> tuple[int, str]:
    from edgeclf.cli import main

    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as ex:
        main(argv)
    return int(ex.value.code or 0), err.getvalue()


def _one_line(code: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("edgeclf: error: "), (code, err[-2000:])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _never(what: str) -> Any:
    def called(*a: Any, **k: Any) -> None:
        raise AssertionError(f"{what} started although its output can never be written")

    return called


@pytest.mark.parametrize("cmd", ["train", "ensemble", "evaluate", "export", "prune", "synth", "demo", "profile"])
def test_an_out_under_a_file_is_refused_before_the_work(cmd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    import edgeclf.demo
    import edgeclf.evaluate
    import edgeclf.export.bundle_writer
    import edgeclf.export.prune
    import edgeclf.runtime.profile
    import edgeclf.synth_cli
    import edgeclf.train

    for mod, name in ((edgeclf.train, "train"), (edgeclf.train, "ensemble_runs"), (edgeclf.evaluate, "evaluate"),
                      (edgeclf.export.bundle_writer, "export_bundle"), (edgeclf.export.prune, "prune_trained"),
                      (edgeclf.synth_cli, "synth"), (edgeclf.demo, "run_demo"), (edgeclf.runtime.profile, "profile_bundles")):
        monkeypatch.setattr(mod, name, _never(name))
    f = tmp_path / "notes.txt"
    f.write_text("x")
    out = str(f / "out")
    argv = {
        "train": ["train", "--data", TINY_DATA, "--size", "32", "--epochs", "1", "--out", out],
        "ensemble": ["ensemble", "--member", str(tmp_path), "--member", str(tmp_path), "--out", out],
        "evaluate": ["evaluate", "--model", str(tmp_path), "--out", out],
        "export": ["export", "--model", str(tmp_path), "--out", out],
        "prune": ["prune", "--model", str(tmp_path), "--out", out],
        "synth": ["data", "synth", "ultrasound", "--out", out],
        "demo": ["demo", "--out", out],
        "profile": ["profile", "--bundle", str(tmp_path), "--report", out],
    }[cmd]
    _one_line(*_main(argv), f"{f} is a file, not a folder")


def test_profile_report_that_is_a_file_is_refused_before_profiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.runtime.profile

    monkeypatch.setattr(edgeclf.runtime.profile, "profile_bundles", _never("profiling"))
    f = tmp_path / "report.txt"
    f.write_text("x")
    _one_line(*_main(["profile", "--bundle", str(tmp_path), "--report", str(f)]), "--report", "takes a folder")


def test_devices_detect_with_a_root_that_does_not_exist(tmp_path: Path) -> None:
    """A typo answered "profile: x86-cpu" with exit 0, from this machine's probes and an empty root."""
    _one_line(*_main(["devices", "detect", "--root", str(tmp_path / "no-such-copy")]), "--root", "is not a folder")


def test_a_disk_filling_up_during_training_is_one_line(tmp_path: Path) -> None:
    """model.safetensors (about 2 MB) past a 500 kB file-size limit fails as on a full disk: it was a SafetensorError
    traceback after the whole training."""
    pytest.importorskip("torch")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "edgeclf", "train", "--data", TINY_DATA, "--size", "32", "--epochs", "1",
                        "--out", str(tmp_path / "run"), "--json"], capture_output=True, text=True, env=env, timeout=600,
                       preexec_fn=limit)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = _one_line(r.returncode, r.stderr, "model.safetensors")
    assert "File too large" in line or "No space" in line


_DAMAGE = {
    "weights missing": lambda d: (d / "model.safetensors").unlink(),
    "weights cut short": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
    "model.json not JSON": lambda d: (d / "model.json").write_text("{"),
    "model.json a list": lambda d: (d / "model.json").write_text("[]"),
    "model.json without labels": lambda d: (d / "model.json").write_text('{"task": "binary"}'),
    "run.json not JSON": lambda d: (d / "run.json").write_text("{"),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_a_damaged_training_folder_is_one_line(damage: str, trained_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "run"
    shutil.copytree(trained_dir, d)
    _DAMAGE[damage](d)
    _one_line(*_main(["evaluate", "--model", str(d), "--data", TINY_DATA, "--split", "all"]),
              "restore the training folder or retrain")


def test_a_permission_error_naming_no_path_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-line form is for the disk and for a path the error names; an EACCES without one is likelier a bug."""
    import errno

    import edgeclf.cli

    def boom(*a: Any, **k: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(edgeclf.cli.cli, "main", boom)
    with pytest.raises(PermissionError):
        edgeclf.cli.main(["--help"])
