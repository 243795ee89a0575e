"""edgeclf.data: a folder data set with parts the user cannot read, a file name that is not UTF-8, or an empty spec.

Unreadable folders and files are one line naming them (never skipped: pathlib's rglob drops unreadable folders
silently), an image whose name is not UTF-8 stays usable under an id that shows its bytes as \\xNN, and an empty
spec is refused rather than read as the current folder.

Permission cases run `load_dataset` (or the CLI) in a child process as the user sees it: as root, without
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (`setpriv`), which root would otherwise use to read anything. Skipped where
permissions cannot be made to apply."""
from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeclf.data import check_spec_options, load_dataset, make_split_list, split_spec
from edgeclf.errors import DataError, EdgeclfError
from edgeclf.runtime.sources import natural_key

cv2 = pytest.importorskip("cv2")

REPO = Path(__file__).resolve().parents[1]
_DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
_LOAD = """
import json, sys
from edgeclf.data import check_spec_options, load_dataset
from edgeclf.errors import EdgeclfError
try:
    kind = check_spec_options(sys.argv[1]) if sys.argv[2] == "check" else None
    ds = load_dataset(sys.argv[1], classes=sys.argv[3] if len(sys.argv) > 3 else None)
    print(json.dumps({"kind": kind, "ids": sorted(i for s in ds.splits.values() for i in s.ids), "notes": ds.notes}))
except EdgeclfError as exc:
    print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
"""


def _as_user(*cmd: str) -> list[str]:
    return [*_DROP, *cmd] if os.geteuid() == 0 else list(cmd)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def permissions_apply(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless a child process started by `_as_user` is refused a file with mode 000 (root without setpriv, or a
    setpriv that cannot drop the capabilities here, or a user who holds them)."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file permissions cannot be made to apply")
    probe = tmp_path_factory.mktemp("probe") / "secret"
    probe.write_text("x")
    probe.chmod(0)
    try:
        r = subprocess.run(_as_user(sys.executable, "-c", f"open({str(probe)!r}).read()"), capture_output=True, text=True)
    finally:
        probe.chmod(0o644)
    if r.returncode == 0 or "PermissionError" not in r.stderr:
        pytest.skip(f"file permissions do not apply to a child process here ({r.stderr.strip()[-200:] or 'it read the file'})")


def _load_as_user(spec: str, *, check: bool = False, classes: str | None = None) -> dict:
    """load_dataset(spec, classes=classes) (after check_spec_options(spec) with `check`) in a child process without
    root's override: {"ids": [...], "notes": [...]} or {"error": one line}; anything else (a traceback) fails the test."""
    r = subprocess.run(_as_user(sys.executable, "-c", _LOAD, spec, "check" if check else "-", *([classes] if classes else [])),
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), f"rc {r.returncode}: {r.stderr[-2500:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _png_bytes(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (12, 16), dtype=np.uint8)
    img[0, 0] = seed % 256
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _tree(root: Path, per_class: int = 8, classes: tuple[str, ...] = ("benign", "normal")) -> Path:
    """A folder of distinct PNGs, `per_class` per class folder."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"img{i}.png").write_bytes(_png_bytes(100 * c + i))
    return root


def _bytes_name(folder: Path, name: bytes) -> bytes:
    """The path `folder/name` as bytes, or skip where the file system refuses names that are not UTF-8 (macOS)."""
    path = os.fsencode(folder) + b"/" + name
    try:
        with open(path, "wb") as f:
            f.write(b"")
    except OSError as exc:
        pytest.skip(f"this file system refuses a name that is not UTF-8 ({exc})")
    return path


def _error(out: dict, *needles: str) -> str:
    assert "error" in out, f"no error; loaded {len(out.get('ids', []))} items: {out}"
    line = out["error"]
    assert out["type"] == "DataError" and "\n" not in line and "Traceback" not in line, out
    for n in needles:
        assert n in line, line
    return line


# -- 1. unreadable folders: one line naming the folder, never a silent skip or a misleading "no images of" ----------

def test_unreadable_sub_folder_of_a_class_is_refused_not_skipped(tmp_path: Path, permissions_apply: None) -> None:
    root = _tree(tmp_path / "ds")
    sub = root / "normal" / "sub"
    sub.mkdir()
    for p in sorted((root / "normal").glob("*.png"))[:3]:
        shutil.move(str(p), sub / p.name)
    sub.chmod(0)
    try:
        out = _load_as_user(str(root))
        checked = _load_as_user(str(root), check=True)  # edgeclf train checks the spec first: the same line there
    finally:
        sub.chmod(0o755)
    # before: 13 images loaded, the 3 under sub/ dropped without a word
    line = _error(out, f"cannot read folder {sub}", "Permission denied", "fix its permissions or move it out")
    assert _error(checked) == line


def test_unreadable_class_folder_is_named_not_called_empty(tmp_path: Path, permissions_apply: None) -> None:
    root = _tree(tmp_path / "ds", classes=("benign", "cyst", "normal"))
    (root / "cyst").chmod(0)
    try:
        out = _load_as_user(str(root))
    finally:
        (root / "cyst").chmod(0o755)
    # before: "the val split of ds has no images of cyst; add images of every class": the wrong reason and fix
    _error(out, f"cannot read folder {root / 'cyst'}", "Permission denied")


def test_unreadable_class_folder_the_class_map_drops_is_not_read(tmp_path: Path, permissions_apply: None) -> None:
    """--classes that leaves the unreadable folder out: no part of the data set, so it loads (after the spec check that
    `edgeclf train` runs first), and the note says the folder was not counted; kept, it is refused as before."""
    root = _tree(tmp_path / "ds", classes=("benign", "cyst", "normal"))
    (root / "cyst").chmod(0)
    try:
        dropped = _load_as_user(str(root), check=True, classes="benign,normal")
        kept = _load_as_user(str(root), check=True, classes="benign,cyst")
    finally:
        (root / "cyst").chmod(0o755)
    assert "ids" in dropped and len(dropped["ids"]) == 16, dropped
    assert any("cyst (unreadable: not counted)" in n for n in dropped["notes"]), dropped["notes"]
    _error(kept, f"cannot read folder {root / 'cyst'}", "Permission denied")


def test_unreadable_data_folder_is_one_line(tmp_path: Path, permissions_apply: None) -> None:
    root = _tree(tmp_path / "ds")
    root.chmod(0)
    try:
        out = _load_as_user(str(root))
    finally:
        root.chmod(0o755)
    _error(out, f"cannot read folder {root}", "Permission denied")  # before: a PermissionError traceback


def test_a_hidden_folder_the_user_cannot_read_is_skipped_with_the_other_hidden_files(tmp_path: Path,
                                                                                       permissions_apply: None) -> None:
    root = _tree(tmp_path / "ds")
    hidden = root / "normal" / ".thumbnails"
    hidden.mkdir()
    (hidden / "t.png").write_bytes(_png_bytes(999))
    hidden.chmod(0)
    try:
        out = _load_as_user(str(root))
    finally:
        hidden.chmod(0o755)
    assert "ids" in out and len(out["ids"]) == 16, out


def test_unreadable_folder_cli_is_one_line_exit_2(tmp_path: Path, permissions_apply: None) -> None:
    root = _tree(tmp_path / "ds")
    sub = root / "benign" / "more"
    sub.mkdir()
    (sub / "x.png").write_bytes(_png_bytes(7))
    sub.chmod(0)
    try:
        r = subprocess.run(_as_user(sys.executable, "-m", "edgeclf", "train", "--data", str(root), "--out",
                                    str(tmp_path / "run"), "--size", "32", "--epochs", "1", "--json"),
                           capture_output=True, text=True, env=_env(), timeout=600)
    finally:
        sub.chmod(0o755)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("edgeclf: error: cannot read folder ") and str(sub) in lines[0], r.stderr


# -- 2. an unreadable image or clips.csv: one line naming it -------------------------------------------------------

def test_unreadable_image_is_one_line_naming_it(tmp_path: Path, permissions_apply: None) -> None:
    root = _tree(tmp_path / "ds")
    f = root / "normal" / "img3.png"
    f.chmod(0)
    try:
        out = _load_as_user(str(root))
    finally:
        f.chmod(0o644)
    # before: a PermissionError traceback from f.read_bytes()
    _error(out, f"cannot read image {f}", "Permission denied", "fix its permissions or move it out of the data set")


def test_unreadable_clips_csv_is_one_line(tmp_path: Path, permissions_apply: None) -> None:
    root = tmp_path / "clips"
    for c in ("covid19", "regular"):
        for k in range(4):
            _clip(root / c / f"{c}{k}.avi", 2 + k)
    (root / "clips.csv").write_text("file,label,license,original_source\ncovid19/covid190.avi,covid19,CC BY 4.0,x\n")
    (root / "clips.csv").chmod(0)
    try:
        out = _load_as_user(str(root))
    finally:
        (root / "clips.csv").chmod(0o644)
    _error(out, f"cannot read file {root / 'clips.csv'}", "Permission denied")  # before: a PermissionError traceback


# -- 3. names that are not UTF-8 --------------------------------------------------------------------------------------

def test_image_named_in_latin1_is_usable_under_an_escaped_id(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    with open(_bytes_name(root / "normal", b"\xe9cho.png"), "wb") as f:  # a Latin-1 name, as from a USB stick
        f.write(_png_bytes(555))
    ds = load_dataset(str(root))  # before: UnicodeEncodeError where the name was hashed
    ids = [i for s in ds.splits.values() for i in s.ids]
    assert len(ids) == 17 and "normal/\\xe9cho.png" in ids, ids
    assert all(i.encode("utf-8") for i in ids)  # text every writer takes (splits/*.txt, run.json, split lists)
    # The UTF-8 files keep their ids, and the hash changes with the file (it is in the data).
    assert {i for i in ids if "\\x" not in i} == {f"{c}/img{k}.png" for c in ("benign", "normal") for k in range(8)}
    (root / "normal" / "img0.png").unlink()
    assert load_dataset(str(root)).data_hash != ds.data_hash

    # A split list written as UTF-8 text with that id reads back and assigns the same file.
    rows, _ = make_split_list(str(root))
    listed = tmp_path / "list.csv"
    with open(listed, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "sha256", "split", "group"])
        w.writerows(rows)
    again = load_dataset(f"{root}?split={listed}")
    sides = {i: s for s, sp in again.splits.items() for i in sp.ids}
    assert sides["normal/\\xe9cho.png"] == next(r[2] for r in rows if r[0] == "normal/\\xe9cho.png")
    assert len(sides) == 16


def test_ids_of_utf8_names_and_the_data_hash_are_unchanged(tmp_path: Path) -> None:
    """Non-ASCII UTF-8 names (all names before the change) keep their ids; the hash is over those ids as before."""
    import hashlib

    root = _tree(tmp_path / "ds")
    (root / "normal" / "img0.png").rename(root / "normal" / "écho ü.png")
    ds = load_dataset(str(root))
    assert "normal/écho ü.png" in [i for s in ds.splits.values() for i in s.ids]
    digest = hashlib.sha256(repr(None).encode())
    for c in ("benign", "normal"):
        for f in sorted((root / c).iterdir(), key=lambda p: natural_key(str(p))):
            digest.update(f"{c}/{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()}:{c}\n".encode())
    assert ds.data_hash == digest.hexdigest()


def test_two_files_that_show_as_one_id_are_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    with open(_bytes_name(root / "normal", b"\xe9cho.png"), "wb") as f:
        f.write(_png_bytes(555))
    (root / "normal" / "\\xe9cho.png").write_bytes(_png_bytes(556))  # a real backslash: the same id
    with pytest.raises(EdgeclfError) as exc:
        load_dataset(str(root))
    assert isinstance(exc.value, DataError) and "show as the same name" in str(exc.value) and "rename" in str(exc.value)


def test_clip_named_in_latin1_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "clips"
    for c in ("covid19", "regular"):
        for k in range(4):
            _clip(root / c / f"{c}{k}.avi", 2 + k)
    bad = _bytes_name(root / "regular", b"\xe9cho.avi")
    shutil.copyfile(root / "regular" / "regular0.avi", bad)  # OpenCV cannot open such a name (it would crash)
    with pytest.raises(EdgeclfError) as exc:
        load_dataset(str(root))
    msg = str(exc.value)
    assert isinstance(exc.value, DataError) and "\\xe9cho.avi" in msg and "not valid UTF-8" in msg and "rename" in msg, msg


def test_class_folder_named_in_latin1_is_one_line(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ds")
    try:
        os.rename(os.fsencode(root / "normal"), os.fsencode(root) + b"/norm\xe9l")
    except OSError as exc:
        pytest.skip(f"this file system refuses a name that is not UTF-8 ({exc})")
    with pytest.raises(EdgeclfError) as exc:
        load_dataset(str(root))  # before: UnicodeEncodeError (the class name is hashed and is the label)
    msg = str(exc.value)
    assert isinstance(exc.value, DataError) and "norm\\xe9l" in msg and "class folder" in msg and "rename" in msg, msg


def test_latin1_image_name_trains_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    root = _tree(tmp_path / "ds", per_class=10)
    with open(_bytes_name(root / "normal", b"\xe9cho.png"), "wb") as f:
        f.write(_png_bytes(555))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "edgeclf", "train", "--data", str(root), "--out", str(out), "--size", "32",
                        "--epochs", "1", "--json"], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2500:]
    written = "".join(p.read_text(encoding="utf-8") for p in (out / "splits").glob("*.txt"))
    assert "normal/\\xe9cho.png\n" in written


# -- 4. an empty spec -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["", "  ", "?dedup=near"])
def test_empty_spec_is_refused_not_read_as_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              spec: str) -> None:
    _tree(tmp_path / "cwd")
    monkeypatch.chdir(tmp_path / "cwd")  # a loadable folder: before, "" trained on it
    for call in (load_dataset, check_spec_options, split_spec):
        with pytest.raises(EdgeclfError) as exc:
            call(spec)
        msg = str(exc.value)
        assert isinstance(exc.value, DataError) and "names no data" in msg and "synthetic:" in msg, msg


_RATE = itertools.count(5)


def _clip(path: Path, n_frames: int) -> Path:
    """MJPG .avi; each one written gets its own frame rate, so no two are byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), next(_RATE) % 500 + 5, (32, 24))
    assert vw.isOpened()
    for j in range(n_frames):
        vw.write(np.full((24, 32, 3), 20 + 20 * j, np.uint8))
    vw.release()
    return path
