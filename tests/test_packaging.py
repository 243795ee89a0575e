"""The wheel a user installs holds every module and the device profiles; help is instant and torch-free."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("edgeclf-*.whl")
    return whl


def test_wheel_contains_every_module_and_profile(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, pkg in (("edgeclf", "edgeclf"), ("export", "edgeclf/export"), ("runtime", "edgeclf/runtime"), ("devices", "edgeclf/devices")):
        for f in (REPO / folder).glob("*.py"):
            expected.add(f"{pkg}/{f.name}")
    expected |= {f"edgeclf/devices/profiles/{p.name}" for p in (REPO / "devices" / "profiles").glob("*.json")}
    assert len(expected) >= 25  # guards against the glob silently finding nothing
    missing = sorted(expected - names)
    assert not missing, f"wheel lacks {missing}"
    assert not [n for n in names if n.startswith(("tests/", "runtime/", "export/", "devices/"))]
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    requires = [ln for ln in text.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert sorted(r.split()[1].split(">")[0].split("=")[0] for r in requires) == ["click", "numpy"]  # the base install stays small
    assert "opencv-python-headless<5,>=4.8" in text.replace(" ", "") or "opencv-python-headless>=4.8,<5" in text.replace(" ", "")


def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter from the repo root."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_help_imports_nothing_heavy() -> None:
    code = ("import sys; from edgeclf.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'cv2', 'onnxruntime', 'sklearn', 'matplotlib', 'rich') if m in sys.modules]\n"
            "sys.stderr.write(repr(heavy)); sys.exit(1 if heavy else 0)")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert "demo" in r.stdout and "export" in r.stdout


def test_missing_extra_is_named_in_one_line() -> None:
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from edgeclf.runtime.backends import OrtBackend\n"
            "try:\n    OrtBackend('m.onnx', (1, 8, 8), 2)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    r = _python(code)
    assert r.stdout.startswith("MissingExtraError") and "pip install 'edgeclf[ort]'" in r.stdout, r.stdout + r.stderr


def test_cli_names_the_extra_for_a_missing_workstation_module(tmp_path: Path) -> None:
    # A device install ([ort,cv]) has no torch: `train` must say which extra brings it, in one line.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgeclf.cli import main\n"
            f"main(['train', '--data', 'synthetic:ultrasound?n=60&size=32', '--out', {str(tmp_path / 'o')!r}])\n")
    r = _python(code, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["edgeclf: error: this command needs torch, which is not installed; "
                                             "install it with: pip install 'edgeclf[train]'"]


def test_ci_runs_the_readmes_test_command_and_stops_when_it_fails() -> None:
    import re

    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    # The README's command 2: the venv, the install and pytest, as one && list.
    cmd = re.search(r"^# 2\. set up and run the tests\n(.+)$", readme, re.M)
    assert cmd is not None, "README lost its second command"
    line = next((ln for ln in ci.splitlines() if ln.startswith(cmd.group(1))), None)
    assert line is not None, f"{cmd.group(1)!r} is not in .ci/run"
    # set -e does not stop at a failed install inside an && list: the line itself must end the script.
    assert line.rstrip().endswith("|| exit 1"), line
    out = subprocess.run(["bash", "-c", "set -euo pipefail; false && true || exit 1; echo continued"], capture_output=True, text=True)
    assert out.returncode == 1 and "continued" not in out.stdout
