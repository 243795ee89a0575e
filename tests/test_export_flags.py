"""`edgeclf export`: compression flags that the chosen precision never uses are refused, not silently ignored."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("precision, flags, named", [
    ("fp32", ["--calibration", "entropy", "--max-drop", "0.2"], ["--max-drop", "--calibration"]),
    ("fp32", ["--qat-epochs", "3"], ["--qat-epochs"]),
    ("fp16", ["--calibration-n", "10", "--qat-epochs", "7"], ["--calibration-n", "--qat-epochs"]),
])
def test_compression_flags_the_precision_never_uses_are_refused(trained_dir: Path, tmp_path: Path, precision: str,
                                                                flags: list[str], named: list[str]) -> None:
    r = run_cli("export", "--model", str(trained_dir), "--out", str(tmp_path / "b"), "--precision", precision, *flags)
    assert r.returncode == 2, r.stderr[-500:]
    line = r.stderr.strip().splitlines()[-1]
    assert all(n in line for n in named) and precision in line and "leave" in line, line
    assert not (tmp_path / "b").exists()


def test_the_gate_flags_apply_to_fp16(trained_dir: Path, tmp_path: Path) -> None:
    r = run_cli("export", "--model", str(trained_dir), "--out", str(tmp_path / "b"), "--precision", "fp16",
                "--max-drop", "0.05", "--min-agreement", "0.9")
    assert r.returncode == 0, r.stderr[-500:]
