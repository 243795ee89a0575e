"""Ctrl-C while a command sets up: an interrupted import is neither "not installed" nor a traceback."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeclf.errors import MissingExtraError, require
from tests.conftest import REPO
from tests.runtime.tiny_bundle import make_tiny_bundle

posix_only = pytest.mark.skipif(os.name != "posix", reason="a process killed by SIGINT is a POSIX notion")

# A stand-in for onnxruntime's C extension, imported when `edgeclf run` creates its backend: Ctrl-C comes during
# its init, which reports ImportError("initialization failed"), with the interrupt chained (pybind11) or not (an
# init that printed and cleared it, as numpy's import_array does).
_FAKE_ORT = '''
import os, signal, time
interrupted = None
try:
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(500):
        time.sleep(0.01)
except KeyboardInterrupt as exc:
    interrupted = exc
    if {chained}:
        raise ImportError("initialization failed") from exc
if interrupted is not None:
    raise ImportError("initialization failed")
raise AssertionError("SIGINT never came")
'''


def test_an_extension_module_that_fails_to_initialise_is_not_called_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during `import onnxruntime` surfaces as ImportError('initialization failed') from the C extension,
    with no exception chained; require() called it 'onnxruntime is not installed ... pip install'."""

    def init_failed(name: str, *a: Any) -> Any:
        raise ImportError("initialization failed")

    monkeypatch.setattr(importlib, "import_module", init_failed)
    with pytest.raises(MissingExtraError) as exc:
        require("onnxruntime", "ort")
    text = str(exc.value)
    assert "not installed" not in text, text
    assert "onnxruntime is installed but failed to import: initialization failed" in text, text
    assert "pip install --force-reinstall 'edgeclf[ort]'" in text, text


@pytest.mark.parametrize("missing", ["onnxruntime", "timm"])
def test_a_module_or_package_that_is_absent_is_called_not_installed(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    def absent(name: str, *a: Any) -> Any:
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(importlib, "import_module", absent)
    module = "onnxruntime" if missing == "onnxruntime" else "timm.models"
    with pytest.raises(MissingExtraError, match=f"^{module} is not installed .*pip install 'edgeclf\\[x\\]'"):
        require(module, "x")


def test_a_missing_dependency_of_an_installed_module_is_not_called_its_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken install: the module is there, something it imports is not."""

    def broken(name: str, *a: Any) -> Any:
        raise ModuleNotFoundError("No module named 'flatbuffers'", name="flatbuffers")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(MissingExtraError, match="^onnxruntime is installed but failed to import: No module named 'flatbuffers'"):
        require("onnxruntime", "ort")


def test_ctrl_c_chained_to_a_failed_import_stays_a_keyboard_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(name: str, *a: Any) -> Any:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(importlib, "import_module", interrupted)
    with pytest.raises(KeyboardInterrupt):
        require("onnxruntime", "ort")


@posix_only
@pytest.mark.parametrize("how", ["chained", "unchained", "plain"])
def test_ctrl_c_while_run_creates_its_backend_ends_as_interrupted(tmp_path: Path, how: str) -> None:
    """Ctrl-C during set-up (here while onnxruntime initialises) ends `edgeclf run` as it ends after frames: killed
    by SIGINT (a shell loop stops there), with no misleading 'not installed' line and no traceback."""
    fake = tmp_path / "fake" / "onnxruntime"
    fake.mkdir(parents=True)
    if how == "plain":  # Ctrl-C in Python code: a KeyboardInterrupt comes out as it is
        (fake / "__init__.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n")
    else:
        (fake / "__init__.py").write_text(_FAKE_ORT.format(chained=how == "chained"))
    bundle = make_tiny_bundle(tmp_path / "b")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "edgeclf", "run", "--bundle", str(bundle), "--backend", "ort-cpu",
                        "--source", "synthetic:ultrasound?frames=12&size=32", "--out", str(tmp_path / "r.jsonl")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGINT, (r.returncode, r.stderr[-800:])
    assert "Traceback" not in r.stderr and "not installed" not in r.stderr and "failed to import" not in r.stderr, r.stderr
    assert "edgeclf: aborted" in r.stderr, r.stderr
    assert not (tmp_path / "r.jsonl").exists()
