"""Folder sources (a DICOM series, an image folder, a watched folder): an unusable DICOM is refused when the source
opens, before any result is written; subfolders, which are not read, are counted and warned about; the watch state's
count of handled files says what they are."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) reads DICOM")
cv2 = pytest.importorskip("cv2", reason="OpenCV (the 'cv' extra) decodes the images")

from edgeclf.errors import SourceError  # noqa: E402
from edgeclf.runtime.dicom import DicomSource  # noqa: E402
from edgeclf.runtime.sources import open_source  # noqa: E402
from edgeclf.runtime.watch import STATE_NAME, WatchFolderSource  # noqa: E402
from tests.runtime.pydicom2 import pydicom2_tree_fixture, run_under_pydicom2  # noqa: E402, F401 - the fixture
from tests.runtime.test_dicom import write_dicom  # noqa: E402

RLE = "1.2.840.10008.1.2.5"


def _cine(n: int = 6, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(30, 200, size=(n, size, size), dtype=np.uint8)


def _rle_fragments(frames: np.ndarray) -> List[bytes]:
    """Each frame RLE Lossless encoded (pydicom's own encoder), one fragment a frame."""
    from pydicom.pixels.encoders import RLELosslessEncoder  # pydicom 3, which writes the test files

    out = []
    for f in frames:
        out.append(RLELosslessEncoder.encode(f, rows=f.shape[0], columns=f.shape[1], samples_per_pixel=1,
                                             bits_allocated=8, bits_stored=8, photometric_interpretation="MONOCHROME2",
                                             pixel_representation=0, number_of_frames=1, encoding_plugin="pydicom"))
    return out


def _one_line(exc: Any) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# -- a cut-short DICOM is refused when the source opens -------------------------------------------------------


def test_a_cut_short_dicom_in_a_series_fails_before_any_result_is_written(tmp_path: Path) -> None:
    """runtime/dicom.py promises every file is checked when the source opens: a .dcm cut short (a copy
    interrupted on the cart) in the middle of a series used to fail only when its frames were read, after the
    earlier files' results were written."""
    pytest.importorskip("onnxruntime")
    from edgeclf.runtime import app
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    folder = tmp_path / "DOE_JANE"
    folder.mkdir()
    cine = _cine(6, 64)
    write_dicom(folder / "a1.dcm", cine)
    write_dicom(folder / "a2_doe.dcm", cine)
    write_dicom(folder / "a3.dcm", cine[:1])
    whole = (folder / "a2_doe.dcm").read_bytes()
    (folder / "a2_doe.dcm").write_bytes(whole[: len(whole) - 64 * 64 * 3])  # pixel data cut short by 3 frames
    out = tmp_path / "r.jsonl"
    with pytest.raises(SourceError) as exc:
        app.run_bundle(str(bundle), str(folder), out=str(out))
    assert not out.exists() or out.read_text() == "", f"{len(out.read_text().splitlines())} results written first"
    text = _one_line(exc)
    assert "DICOM file 1 of 3" in text and "3 of the 6 frames" in text, text
    assert "doe" not in text.lower() and "a2" not in text


def test_a_file_cut_inside_its_pixel_data_header_is_refused_at_open(tmp_path: Path) -> None:
    """The h2 reproducer: the first 2000 bytes of a 6-frame cine (the Pixel Data element's header is there,
    almost none of its bytes)."""
    path = write_dicom(tmp_path / "a.dcm", _cine(6, 64))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SourceError, match=r"^DICOM file is cut short: its pixel data holds 0 of the 6 frames"):
        DicomSource(str(path))


def test_pixel_data_holding_fewer_frames_than_the_header_says_is_refused_at_open(tmp_path: Path) -> None:
    """The header says 5 frames, the (complete) Pixel Data element holds 3: the source opened and handed out
    three frames before it failed."""
    cine = _cine(5)
    path = write_dicom(tmp_path / "m.dcm", cine, pixel_data=cine[:3].tobytes())
    with pytest.raises(SourceError, match=r"holds 3 of the 5 frames its header says") as exc:
        DicomSource(str(path))
    assert "copy or export it again" in _one_line(exc)


def test_a_palette_color_file_without_its_lookup_tables_is_refused_at_open(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    write_dicom(folder / "1.dcm", _cine(2))
    write_dicom(folder / "2.dcm", _cine(1), photometric="PALETTE COLOR")
    with pytest.raises(SourceError, match=r"^DICOM file 1 of 2 .*PALETTE COLOR without its palette") as exc:
        DicomSource(str(folder))
    assert "Lookup Table" in _one_line(exc)
    # and one whose tables do not fit their descriptor (red has 256 entries, green 3)
    ramp = np.arange(256, dtype=np.uint16) * 257
    write_dicom(folder / "2.dcm", _cine(1), photometric="PALETTE COLOR", palette=[ramp, ramp[:3], ramp])
    with pytest.raises(SourceError, match=r"PALETTE COLOR"):
        DicomSource(str(folder))


def test_encapsulated_pixel_data_with_fewer_fragments_than_frames_is_refused_at_open(tmp_path: Path) -> None:
    pytest.importorskip("pydicom.pixels.encoders", reason="pydicom 3's RLE encoder writes the test file")
    cine = _cine(5)
    frags = _rle_fragments(cine)
    short = write_dicom(tmp_path / "s.dcm", cine, syntax=RLE, encapsulated=frags[:3])  # NumberOfFrames 5
    with pytest.raises(SourceError, match=r"holds 3 fragment\(s\) for the 5 frames its header says"):
        DicomSource(str(short))
    # cut in the middle of its last fragment (no sequence delimiter either)
    whole = write_dicom(tmp_path / "w.dcm", cine, syntax=RLE, encapsulated=frags).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) - len(frags[-1]) // 2 - 8])
    with pytest.raises(SourceError, match=r"cut short"):
        DicomSource(str(tmp_path / "cut.dcm"))


def test_complete_files_of_odd_packed_and_encapsulated_sizes_still_open_and_read_whole(tmp_path: Path) -> None:
    """The checks at open pass complete files: odd-length pixel data padded to even, 1-bit frames packed across
    byte boundaries, RLE (one fragment a frame), 16-bit, PALETTE COLOR with its tables."""
    odd = write_dicom(tmp_path / "odd.dcm", _cine(3, 3))  # 27 bytes, padded to 28
    bits1 = np.random.default_rng(1).integers(0, 2, size=(3, 3, 3), dtype=np.uint8)
    from pydicom.pixels.utils import pack_bits

    # 27 one-bit pixels, packed into 4 bytes
    one_bit = write_dicom(tmp_path / "bits1.dcm", bits1, bits_allocated=1, pixel_data=pack_bits(bits1, pad=True))
    wide = write_dicom(tmp_path / "w16.dcm", _cine(2).astype(np.uint16) * 200)
    ramp = np.arange(256, dtype=np.uint16) * 257
    pal = write_dicom(tmp_path / "pal.dcm", _cine(2), photometric="PALETTE COLOR", palette=[ramp, ramp, ramp])
    rle = write_dicom(tmp_path / "rle.dcm", _cine(4), syntax=RLE, encapsulated=_rle_fragments(_cine(4)))
    for path, n in ((odd, 3), (one_bit, 3), (wide, 2), (pal, 2), (rle, 4)):
        with DicomSource(str(path)) as src:
            assert len(list(src)) == n, path.name


PYDICOM2_OPEN = r"""
import json, sys
from edgeclf.errors import SourceError
from edgeclf.runtime.dicom import DicomSource

out = []
for path in sys.argv[1:]:
    try:
        src = DicomSource(path)
    except SourceError as exc:
        out.append("refused at open: " + str(exc))
        continue
    try:
        out.append(len(list(src)))
    except SourceError as exc:
        out.append("failed while read: " + str(exc))
    src.close()
print(json.dumps(out))
"""


def test_pydicom2_refuses_the_same_files_at_open(tmp_path: Path, pydicom2_tree: Path) -> None:
    """The same checks on the pydicom 2 path (Python 3.8, JetPack 5): no pydicom API differs between them."""
    cine = _cine(5)
    short = write_dicom(tmp_path / "short.dcm", cine, pixel_data=cine[:3].tobytes())
    cut = write_dicom(tmp_path / "cut.dcm", cine)
    cut.write_bytes(cut.read_bytes()[:-100])
    pal = write_dicom(tmp_path / "pal.dcm", cine[:1], photometric="PALETTE COLOR")
    frags = _rle_fragments(cine)
    enc = write_dicom(tmp_path / "enc.dcm", cine, syntax=RLE, encapsulated=frags[:4])
    good = write_dicom(tmp_path / "good.dcm", cine, syntax=RLE, encapsulated=frags)
    odd = write_dicom(tmp_path / "odd.dcm", _cine(3, 3))
    zero = write_dicom(tmp_path / "zero.dcm", cine[:1], number_of_frames=0)  # read as 1 frame: pydicom 2 failed on it
    paths = (short, cut, pal, enc, good, odd, zero)
    out = json.loads(run_under_pydicom2(pydicom2_tree, PYDICOM2_OPEN, *map(str, paths)))
    assert [str(o).startswith("refused at open") for o in out] == [True] * 4 + [False] * 3, out
    assert out[4:] == [5, 3, 1], out


def test_a_cut_short_dicom_in_a_watched_folder_hands_out_no_frame(tmp_path: Path) -> None:
    """A watched folder opens each file when it comes to it: a cut-short cine fails there (recorded failed, tried
    again when it changes), not after some of its frames were classified."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    cut = write_dicom(inbox / "a.dcm", _cine(6))
    cut.write_bytes(cut.read_bytes()[: -16 * 16 * 2])
    write_dicom(inbox / "b.dcm", _cine(2))
    old = time.time() - 100
    for p in inbox.iterdir():
        os.utime(p, (old, old))
    frames = []
    with WatchFolderSource(str(inbox), poll=0.02, idle_exit=0.4) as src:
        for frame in src:
            frames.append(frame.meta["file_frames"])
            src.ack(frame)
        stats = src.stats()
    assert frames == [2, 2] and stats["files_failed"] == 1 and stats["files_done"] == 1, (frames, stats)


# -- subfolders are counted and warned about, never dropped without a word ----------------------------------


def _warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_dicom_series_in_subfolders_of_a_dicom_folder_are_counted_and_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A scanner's USB export holds one folder per study or series: the run used to read the top file and say
    source_stats {'files': 1, 'skipped': 0}, two series gone without a word."""
    pytest.importorskip("onnxruntime")
    from edgeclf.runtime import app
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    root = tmp_path / "export"
    for sub in ("DOE_JANE_S1", "DOE_JANE_S2"):
        (root / sub).mkdir(parents=True)
        write_dicom(root / sub / "a.dcm", _cine(1, 64))
    (root / ".Trashes").mkdir()  # hidden: not counted (a USB stick's own folders)
    write_dicom(root / "top.dcm", _cine(1, 64))
    caplog.set_level("INFO")
    s = app.run_bundle(str(bundle), str(root))
    assert s["frames"] == 1 and s["source_stats"]["folders_skipped"] == 2, s["source_stats"]
    said = [w for w in _warnings(caplog) if "subfolder" in w]
    assert len(said) == 1 and "2 subfolders" in said[0], _warnings(caplog)
    assert "DOE" not in caplog.text and "export" not in caplog.text


def test_subfolders_of_an_image_folder_are_counted_and_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "films"
    (root / "DOE_JANE").mkdir(parents=True)
    img = np.random.default_rng(0).integers(30, 200, size=(16, 16), dtype=np.uint8)
    assert cv2.imwrite(str(root / "a.png"), img) and cv2.imwrite(str(root / "DOE_JANE" / "b.png"), img)
    caplog.set_level("INFO")
    with open_source(str(root)) as src:
        assert len(list(src)) == 1
        assert src.stats()["folders_skipped"] == 1  # type: ignore[attr-defined]
    said = [w for w in _warnings(caplog) if "subfolder" in w]
    assert len(said) == 1 and "1 subfolder" in said[0] and "DOE" not in caplog.text


def test_a_folder_with_only_subfolders_says_so(tmp_path: Path) -> None:
    (tmp_path / "DOE_JANE" / "S1").mkdir(parents=True)
    write_dicom(tmp_path / "DOE_JANE" / "S1" / "a.dcm", _cine(1))
    with pytest.raises(SourceError, match=r"1 subfolder.*not read") as exc:
        open_source(str(tmp_path / "DOE_JANE"))
    assert "DOE" not in _one_line(exc)


def test_subfolders_of_a_watched_folder_are_counted_and_warned_about_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A PACS drop folder with one folder per study: its files were never read, and files_seen 1,
    files_ignored 0 said nothing of them."""
    inbox = tmp_path / "in"
    (inbox / "STUDY_DOE").mkdir(parents=True)
    (inbox / ".cache").mkdir()
    (inbox / "state").mkdir()  # the state file's own folder (state=PATH inside the watched folder): not counted
    write_dicom(inbox / "STUDY_DOE" / "x.dcm", _cine(1))
    write_dicom(inbox / "top.dcm", _cine(1))
    old = time.time() - 100
    os.utime(inbox / "top.dcm", (old, old))
    caplog.set_level("INFO")
    with WatchFolderSource(str(inbox), poll=0.02, idle_exit=0.4, state_path=str(inbox / "state" / "w.json")) as src:
        for frame in src:
            src.ack(frame)
        stats = src.stats()
    assert stats["files_done"] == 1 and stats["folders_skipped"] == 1, stats
    said = [w for w in _warnings(caplog) if "subfolder" in w]
    assert len(said) == 1, _warnings(caplog)  # once, not at every poll
    assert "DOE" not in caplog.text


# -- the watch state's count says what the handled files are ------------------------------------------------


def test_the_watch_state_counts_classified_and_failed_files_apart(tmp_path: Path) -> None:
    """The refusal of a run onto a results file said the state 'marks 4 file(s) done, which are never classified
    again' when 1 was classified and 3 had failed (those are tried again when they change)."""
    files: Dict[str, Dict[str, Any]] = {
        "a": {"status": "done", "frames": 1, "acked": 1},
        "b": {"status": "failed", "frames": None, "acked": 0},
        "c": {"status": "failed", "frames": 9, "acked": 4},  # failed after 4 frames were classified
        "d": {"status": "partial", "frames": 9, "acked": 2},
        "e": {"status": "partial", "frames": 9, "acked": 0},
    }
    from edgeclf.runtime.watch import describe_watch_state, watch_state_counts

    (tmp_path / STATE_NAME).write_text(json.dumps({"format": "edgeclf-watch-state", "version": 1, "files": files}))
    counts = watch_state_counts(f"watch:{tmp_path}?poll=0.5")
    assert counts == {"done": 1, "failed": 2, "partial": 1, "with_results": 3}, counts
    words = describe_watch_state(counts)
    assert words.startswith("1 classified, never to be classified again") and "; 2 failed to decode" in words, words
    assert "once they change" in words and "partly classified" in words
    assert watch_state_counts(f"watch:{tmp_path / 'none'}") == {"done": 0, "failed": 0, "partial": 0, "with_results": 0}
