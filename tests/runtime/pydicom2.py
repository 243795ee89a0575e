"""pydicom 2 for the tests of edgeclf.runtime.dicom's pydicom 2 path (JetPack 5 boards run Python 3.8, where pydicom 3
cannot be installed). pydicom 2.4 is pip-installed once per test session into a temporary folder, removed when the
session ends; the checks run in a fresh interpreter with that folder first on PYTHONPATH, whatever pydicom the test
environment has. EDGECLF_PYDICOM2 may name a folder holding one already (no install then). Skipped, with pip's
reason, only when the install fails (no network, no index)."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Union

import pytest

REPO = Path(__file__).resolve().parents[2]
SPEC = "pydicom>=2.4,<3"
# Every module importing the fixture gets a fixture of its own (pytest keys fixtures by module): the install is
# shared through this, so a session installs once.
_TREE: Dict[str, Union[Path, str]] = {}


def _install() -> Union[Path, str]:
    """The folder pydicom 2 was installed into, or why it could not be."""
    target = Path(tempfile.mkdtemp(prefix="edgeclf-pydicom2-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)  # also when the session is cut short
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
           "--timeout", "20", "--retries", "1", "--target", str(target), SPEC]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return f"could not install {SPEC} for the pydicom 2 path: pip took over 300 s"
    if proc.returncode != 0 or not (target / "pydicom").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        return f"could not install {SPEC} for the pydicom 2 path (pip exit {proc.returncode}: {last})"
    return target


@pytest.fixture(scope="session", name="pydicom2_tree")
def pydicom2_tree_fixture() -> Iterator[Path]:
    """pydicom2_tree: a folder with pydicom 2.4 in it, for PYTHONPATH. Import pydicom2_tree_fixture to use it."""
    given = os.environ.get("EDGECLF_PYDICOM2")
    if given:
        if not (Path(given) / "pydicom").is_dir():
            pytest.fail(f"EDGECLF_PYDICOM2={given} has no pydicom package in it: give a folder made with "
                        f"`pip install --target DIR '{SPEC}'`, or unset it to have the tests install one")
        yield Path(given)
        return
    if "tree" not in _TREE:
        _TREE["tree"] = _install()
    tree = _TREE["tree"]
    if isinstance(tree, str):
        pytest.skip(tree)
    yield tree
    shutil.rmtree(tree, ignore_errors=True)  # the session is over: every test that used it has run


def run_under_pydicom2(tree: Path, code: str, *args: str) -> str:
    """Run `code` (argv: args) in a fresh interpreter that imports pydicom from `tree`; its stdout."""
    prelude = "import pydicom\nassert pydicom.__version__.startswith('2.'), pydicom.__version__\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(REPO)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
