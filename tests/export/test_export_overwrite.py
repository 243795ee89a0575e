"""`export --overwrite` replaces a previous bundle, never the user's other files kept in its folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgeclf.errors import ConfigError
from edgeclf.export.bundle_writer import ExportConfig, export_bundle
from edgeclf.runtime.bundle import CHECKSUM_FILE, SIGNATURE_FILE
from tests.conftest import run_cli


def _no_data(*a: object, **k: object) -> None:
    raise AssertionError("data was read: --out must be checked before any work")


def _with_user_files(bundle_dir: Path, out: Path, n_notes: int = 1) -> dict[str, bytes]:
    shutil.copytree(bundle_dir, out)
    for i in range(n_notes):
        (out / f"NOTES{i or ''}.txt").write_text("reader's notes\n")
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}\n")
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_overwrite_refuses_a_bundle_folder_that_also_holds_other_files(bundle_dir: Path, trained_dir: Path,
                                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.export.bundle_writer as bw

    out = tmp_path / "B"
    before = _with_user_files(bundle_dir, out)
    monkeypatch.setattr(bw, "load_dataset", _no_data)
    with pytest.raises(ConfigError) as exc:
        export_bundle(ExportConfig(out=str(out), model=str(trained_dir), overwrite=True))
    msg = str(exc.value)
    assert "\n" not in msg and "NOTES.txt" in msg and "eval/" in msg and "move them away" in msg, msg
    assert "model.onnx" not in msg and "manifest.json" not in msg  # the previous bundle's own files are not "other"
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_names_a_few_other_files_and_counts_the_rest(bundle_dir: Path, trained_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "B"
    _with_user_files(bundle_dir, out, n_notes=8)
    with pytest.raises(ConfigError, match=r"also holds .* and \d+ more"):
        export_bundle(ExportConfig(out=str(out), model=str(trained_dir), overwrite=True))


def test_overwrite_replaces_a_signed_previous_bundle(bundle_dir: Path, trained_dir: Path, tmp_path: Path) -> None:
    """A signature (`bundle sign`) is the previous bundle's own file: replaced with it, not counted as other."""
    out = tmp_path / "B"
    shutil.copytree(bundle_dir, out)
    (out / SIGNATURE_FILE).write_text("{}\n")
    export_bundle(ExportConfig(out=str(out), model=str(trained_dir), overwrite=True))
    assert (out / CHECKSUM_FILE).is_file() and not (out / SIGNATURE_FILE).exists()


def test_cli_overwrite_with_other_files_is_one_line_exit_2(bundle_dir: Path, trained_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "B"
    before = _with_user_files(bundle_dir, out)
    r = run_cli("export", "--model", str(trained_dir), "--out", str(out), "--overwrite")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "NOTES.txt" in lines[0] and "eval/" in lines[0], r.stderr
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
