"""No patient identifiers in source messages, pydicom's complaints or source hashes.

The threat: PACS exports name folders and files after the patient (DOE^JOHN_<MRN>/DOE^JOHN.mp4), and a name
can be typed into the wrong header field. What edgeclf prints goes to the cart's journal, what it hashes into
logs and the audit can be looked up from a list of names or record numbers unless the hash is keyed.

- Source errors (sources.py, watch.py) name a source by its kind and extension, never by its path.
- pydicom messages keep their fixed text; header values, unquoted ones too, and paths are withheld.
- source_id, name_hash, watch_key and the audit's uri_hmac are HMAC-SHA256 under a per-install key (0600),
  which an auditor with the key file can recompute; a watched folder's state does not depend on the key.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from edgeclf.errors import SourceError
from edgeclf.runtime.sources import open_source
from tests.runtime.tiny_bundle import make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
NAME = "DOEVANDER^JOHNATHAN"
MRN = "MRN7730142"
SECRETS = ("DOEVANDER", "JOHNATHAN", "7730142")
KEY_ENV = "EDGECLF_SOURCE_KEY"


def _leaks(text: str) -> List[str]:
    low = text.lower()
    return [s for s in SECRETS if s.lower() in low]


@pytest.fixture(autouse=True)
def _own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test keeps its source key in its own folder (never the user's ~/.local/state)."""
    key = tmp_path / "keys" / "source-key"
    monkeypatch.setenv(KEY_ENV, str(key))
    return key


def _key_bytes(path: Path) -> bytes:
    return bytes.fromhex(path.read_text().strip())


def _hmac(path: Path, text: str, n: int) -> str:
    return hmac.new(_key_bytes(path), text.encode("utf-8"), hashlib.sha256).hexdigest()[:n]


def _sha(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


@pytest.fixture
def patient_folder(tmp_path: Path) -> Path:
    folder = tmp_path / f"{NAME}_{MRN}"
    folder.mkdir()
    return folder


def _write_png(path: Path, value: int = 7) -> None:
    import cv2

    assert cv2.imwrite(str(path), np.full((16, 16), value, np.uint8))


def _write_dcm(path: Path, frames: int = 2, extra: Dict[str, Any] | None = None) -> None:
    pydicom = pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) reads DICOM")
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77301421"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = NAME, MRN
    ds.Modality, ds.InstanceNumber = "US", 1
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.NumberOfFrames, ds.FrameTime = frames, 33.3
    with warnings.catch_warnings():  # pydicom's own complaints about the misfiled values written here
        warnings.simplefilter("ignore")
        for k, v in (extra or {}).items():
            setattr(ds, k, v)
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (frames, 16, 16), dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if int(pydicom.__version__.split(".")[0]) >= 3:
            ds.save_as(str(path), enforce_file_format=True)
        else:  # pragma: no cover - pydicom 2
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(str(path), write_like_original=False)


def _cli(*args: str, env: Dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeclf", *args], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=300)


def _source_error(uri: str) -> str:
    with pytest.raises(SourceError) as info:
        open_source(uri).close()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------ 2. source errors never quote the path


def test_a_damaged_video_is_named_by_kind_not_path(patient_folder: Path) -> None:
    pytest.importorskip("cv2")
    src = patient_folder / f"{NAME}.mp4"
    src.write_bytes(b"\x00not a video" * 400)
    msg = _source_error(str(src))
    assert not _leaks(msg), msg
    assert "the source video (.mp4) could not be opened" in msg and "ffprobe" in msg


def test_a_video_whose_first_frame_fails_is_named_by_kind_not_path(patient_folder: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2")
    from edgeclf.runtime.sources import VideoFileSource

    class Opened:  # opens, claims nothing, decodes nothing
        def get(self, prop: int) -> float:
            return 0.0

        def read(self) -> Any:
            return False, None

        def release(self) -> None:
            pass

    monkeypatch.setattr(VideoFileSource, "_open", staticmethod(lambda path: Opened()))
    src = patient_folder / f"{NAME}.mov"
    src.write_bytes(b"\x00" * 64)
    msg = _source_error(str(src))
    assert not _leaks(msg), msg
    assert "the source video (.mov) opened but its first frame could not be decoded" in msg


@pytest.mark.parametrize(
    ("file_name", "content", "said"),
    [
        (f"{NAME}.mp4", b"", "the source video (.mp4) is empty (0 bytes"),
        (f"{NAME}.j2k", b"\x00" * 100, "has an unsupported extension '.j2k'"),
        # what splitext calls the extension of "Doe.Johnathan" is part of the name: not repeated
        ("scan.Johnathan", b"\x00" * 100, "the source file has an unsupported extension and no DICOM marker"),
        (NAME, b"\x00" * 100, "the source file has no extension and no DICOM marker"),
    ],
    ids=["empty-video", "unsupported-extension", "name-as-extension", "no-extension"],
)
def test_source_file_errors_are_named_by_kind_not_path(patient_folder: Path, file_name: str, content: bytes,
                                                       said: str) -> None:
    src = patient_folder / file_name
    src.write_bytes(content)
    msg = _source_error(str(src))
    assert not _leaks(msg), msg
    assert said in msg


def test_missing_paths_globs_and_odd_files_are_not_quoted(patient_folder: Path) -> None:
    msg = _source_error(str(patient_folder / f"{NAME}_{MRN}.dcm"))  # a typo, or a file already archived
    assert not _leaks(msg) and "the source path given (.dcm) does not exist" in msg, msg
    msg = _source_error(str(patient_folder / "*.png"))
    assert not _leaks(msg) and "the source pattern matched nothing" in msg, msg
    (patient_folder / f"{NAME}.txt").write_text("x")
    msg = _source_error(str(patient_folder / "*.txt"))
    assert not _leaks(msg) and "matched 1 files but no images" in msg, msg
    msg = _source_error(f"s3://bucket/{NAME}/{MRN}.mp4")
    assert not _leaks(msg) and "unknown source scheme 's3:'" in msg, msg
    if hasattr(os, "mkfifo"):
        fifo = patient_folder / f"{NAME}.mp4"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
        msg = _source_error(str(fifo))
        assert not _leaks(msg) and "not a regular file or folder" in msg, msg


def test_streams_and_pipelines_are_named_by_scheme_host_or_first_element() -> None:
    pytest.importorskip("cv2")
    msg = _source_error(f"rtsp://admin:pw@127.0.0.1:1/{NAME}/live?patient={MRN}")
    assert not _leaks(msg) and ":pw@" not in msg and "the stream rtsp://***@127.0.0.1:1/... could not" in msg, msg
    msg = _source_error(f"filesrc location=/data/{NAME}/{MRN}.mp4 ! decodebin ! videoconvert ! appsink")
    assert not _leaks(msg) and "the GStreamer pipeline starting with filesrc" in msg, msg


def test_watch_errors_never_quote_the_folder_or_state_path(patient_folder: Path) -> None:
    msg = _source_error(f"watch:{patient_folder}/{NAME}")
    assert not _leaks(msg) and "the watched folder (watch:FOLDER) does not exist" in msg, msg
    msg = _source_error(f"watch:{patient_folder}?poll={NAME}")
    assert not _leaks(msg) and "watch option poll=(not a number)" in msg, msg
    msg = _source_error(f"watch:{patient_folder}?poll=-1")
    assert "watch option poll='-1'" in msg, msg
    msg = _source_error(f"watch:{patient_folder}?{NAME}=1")
    assert not _leaks(msg) and "bad watch option" in msg, msg
    (patient_folder / ".edgeclf-watch.json").write_text("{damaged")
    msg = _source_error(f"watch:{patient_folder}")
    assert not _leaks(msg) and ".edgeclf-watch.json in the watched folder) cannot be read" in msg, msg
    (patient_folder / ".edgeclf-watch.json").unlink()
    state = patient_folder / f"{NAME}.json"
    with open_source(f"watch:{patient_folder}?state={state}&idle_exit=1"):
        msg = _source_error(f"watch:{patient_folder}?state={state}")  # a second watcher on the same state
    assert not _leaks(msg) and "the watch state file (state=PATH) is in use" in msg, msg


def test_run_on_a_damaged_patient_video_keeps_the_journal_clean(patient_folder: Path, tmp_path: Path) -> None:
    """What the cart's journal gets (stderr, at -vv too): the error, no folder or file name."""
    pytest.importorskip("cv2")
    bundle = make_tiny_bundle(tmp_path / "bundle")
    src = patient_folder / f"{NAME}.mp4"
    src.write_bytes(b"\x00not a video" * 400)
    out = tmp_path / "out"
    out.mkdir()
    p = _cli("-vv", "run", "--bundle", str(bundle), "--source", str(src), "--out", str(out / "r.jsonl"))
    assert p.returncode != 0 and "error" in p.stderr
    assert not _leaks(p.stderr + p.stdout), p.stderr[-800:]


# ------------------------------------------------------------ 3. pydicom's complaints keep no header values


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        ("Value 'ISO_IR 192' for Specific Character Set does not allow code extensions, ignoring: DOEVANDER JOHNATHAN",
         "Value 'ISO_IR 192' for Specific Character Set does not allow code extensions, ignoring: <withheld>"),
        ("Value 'DOEVANDER' for Specific Character Set does not allow code extensions, ignoring: ISO 2022 IR 100",
         "Value '<withheld>' for Specific Character Set does not allow code extensions, ignoring: ISO 2022 IR 100"),
        ("Failed to decode byte string with encodings: iso8859, DOEVANDER - using replacement characters in decoded "
         "string", "Failed to decode byte string with encodings: <withheld> - using replacement characters"),
        ("Found unknown escape sequence in encoded string value - using encoding DOEVANDER",
         "Found unknown escape sequence in encoded string value - using encoding <withheld>"),
        ("Unknown encoding 'DOEVANDER JOHNATHAN' - using default encoding instead",
         "Unknown encoding '<withheld>' - using default encoding instead"),
        ("Incorrect value for Specific Character Set 'DOEVANDER' - assuming 'ISO_IR 100'",
         "Incorrect value for Specific Character Set '<withheld>' - assuming 'ISO_IR 100'"),
        ("Invalid value for VR PN: 'DOEVANDER^JOHNATHAN'. Please see <https://dicom.nema.org/medical/dicom/current/"
         "output/html/part05.html#table_6.2-1> for allowed values for each VR.", "Invalid value for VR PN: <withheld>."),
        ("The value length (70) exceeds the maximum length of 64 allowed for VR LO. Invalid value for VR LO: "
         "'JOHNATHAN'.", "The value length (70) exceeds the maximum length of 64 allowed for VR LO. Invalid value"),
        ('Value "MRN7730142" is not valid for elements with a VR of IS',
         'Value "<withheld>" is not valid for elements with a VR of IS'),
        ("A value of 'JOHNATHAN' for (0028,0008) 'Number of Frames' is invalid, assuming 1 frame",
         "A value of '<withheld>' for (0028,0008) 'Number of Frames' is invalid"),
        ("Reached the end of the file DOEVANDER in file /data/DOEVANDER^JOHNATHAN/IM1",
         "Reached the end of the file <withheld> in file <withheld>"),
        # a message no allow-list knows: cut at the first part that is not plain text
        ("A new complaint about DOEVANDER JOHNATHAN", "A new complaint about <withheld>"),
        ("A new complaint: doevander johnathan 7730142", "A new complaint <withheld>"),
        ("Element (0010,0010) 'Patient's Name' holds =DOEVANDER", "Element (0010,0010) 'Patient's Name' holds <withheld>"),
    ],
)
def test_pydicom_messages_keep_their_fixed_text_and_withhold_values(message: str, kept: str) -> None:
    pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) reads DICOM")
    from edgeclf.runtime import dicom as d

    d._pydicom()
    out = d._withhold(message)
    assert not _leaks(out) and kept in out, out
    assert d._withhold(out) == out  # a record filtered twice (parent and module logger) reads the same


def test_a_misfiled_character_set_value_is_not_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "IM1.dcm"
    _write_dcm(f, extra={"SpecificCharacterSet": ["ISO_IR 192", "DOEVANDER JOHNATHAN"]})
    with caplog.at_level(logging.WARNING, logger="pydicom"), open_source(str(f)) as src:
        assert len(list(src)) == 2
    assert "Specific Character Set" in caplog.text  # the complaint itself is kept
    assert not _leaks(caplog.text), caplog.text


def test_a_pydicom_record_with_a_traceback_loses_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) reads DICOM")
    from edgeclf.runtime import dicom as d

    d._pydicom()
    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        try:
            raise ValueError(f"could not convert {NAME!r}")
        except ValueError:
            logging.getLogger("pydicom").exception("Error while processing tag %s", NAME)
    assert caplog.records and "Error while processing tag <withheld> (ValueError)" in caplog.text
    assert not _leaks(caplog.text), caplog.text


def test_run_at_default_verbosity_keeps_the_character_set_complaint_only(tmp_path: Path) -> None:
    f = tmp_path / "IM1.dcm"
    _write_dcm(f, extra={"SpecificCharacterSet": ["ISO_IR 192", "DOEVANDER JOHNATHAN"]})
    bundle = make_tiny_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    out.mkdir()
    p = _cli("run", "--bundle", str(bundle), "--source", str(f), "--out", str(out / "r.jsonl"))
    assert p.returncode == 0, p.stderr
    assert "Specific Character Set" in p.stderr and not _leaks(p.stderr), p.stderr[-800:]


# ------------------------------------------------------------------------ 4. source hashes are keyed


def test_the_audit_source_fact_cannot_be_matched_against_an_mrn_list(tmp_path: Path, _own_key: Path) -> None:
    from edgeclf.runtime.audit import source_fact

    inbox = tmp_path / "export"
    uri = f"{inbox}/MRN7730142.dcm"
    fact = source_fact(uri)
    assert "uri_sha256" not in fact and set(fact) == {"kind", "uri_hmac", "key_id", "key_scope"}
    recorded = json.dumps(fact)
    # the attacker knows the export's layout and the MRN range: 100k candidates take well under a second
    hits = [n for n in range(7700000, 7800000) if _sha(f"{inbox}/MRN{n}.dcm", 16) in recorded]
    assert not hits, f"the audit's source fact re-identifies MRN{hits[0]}"
    # whoever holds the key (an auditor on the cart) recomputes it, and knows which key from key_id
    assert fact["uri_hmac"] == _hmac(_own_key, uri, 16) and fact["key_scope"] == "install"
    assert fact["key_id"] == hashlib.sha256(_key_bytes(_own_key)).hexdigest()[:8]


def test_the_key_is_made_once_private_and_kept(tmp_path: Path, _own_key: Path) -> None:
    from edgeclf.runtime.sources import source_hash, source_key_path

    assert not _own_key.exists()
    first = source_hash("/data/x.mp4")
    assert source_key_path() == str(_own_key) and _own_key.is_file()
    assert stat.S_IMODE(_own_key.stat().st_mode) == 0o600 and stat.S_IMODE(_own_key.parent.stat().st_mode) == 0o700
    assert first == _hmac(_own_key, "/data/x.mp4", 12) != _sha("/data/x.mp4", 12)
    code = "from edgeclf.runtime.sources import source_hash; print(source_hash('/data/x.mp4'))"
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.strip()
    assert again == first  # another process on the same install: the same key, the same hash


def test_the_key_lives_in_the_state_folder_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.runtime.sources import source_key_path

    for var in (KEY_ENV, "STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert source_key_path() == str(tmp_path / "home" / ".local" / "state" / "edgeclf" / "source-key")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert source_key_path() == str(tmp_path / "xdg" / "edgeclf" / "source-key")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edgeclf")  # systemd's StateDirectory= (the cart unit)
    assert source_key_path() == "/var/lib/edgeclf/source-key"
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "svc.key"))
    assert source_key_path() == str(tmp_path / "svc.key")


def test_no_writable_key_folder_means_a_process_key_said_at_debug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from edgeclf.runtime.sources import source_hash, source_key_info

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(KEY_ENV, str(blocker / "source-key"))  # its folder is a file: nothing can be made there
    with caplog.at_level(logging.DEBUG, logger="edgeclf.runtime.sources"):
        h = source_hash("/data/x.mp4")
    assert source_key_info()["key_scope"] == "process" and h != _sha("/data/x.mp4", 12)
    assert h == source_hash("/data/x.mp4")  # one key for the whole process
    assert any(r.levelno == logging.DEBUG and "per-process key" in r.getMessage() for r in caplog.records)


def test_a_file_that_is_no_key_is_never_overwritten(tmp_path: Path, _own_key: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from edgeclf.runtime.sources import source_key_info

    _own_key.parent.mkdir()
    _own_key.write_text("not a key\n")
    with caplog.at_level(logging.WARNING, logger="edgeclf.runtime.sources"):
        assert source_key_info()["key_scope"] == "process"
    assert _own_key.read_text() == "not a key\n" and "holds no key" in caplog.text


def test_source_ids_and_name_hashes_are_keyed(patient_folder: Path, _own_key: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("cv2")
    _write_png(patient_folder / f"{NAME}_1.png")
    with caplog.at_level(logging.INFO, logger="edgeclf.runtime.sources"), open_source(str(patient_folder)) as src:
        meta = dict(next(iter(src)).meta)
    uri = str(patient_folder)
    assert src.source_id == _hmac(_own_key, uri, 12) != _sha(uri, 12)
    assert meta["name_hash"] == _hmac(_own_key, f"{NAME}_1.png", 12) != _sha(f"{NAME}_1.png", 12)
    assert _sha(uri, 12) not in caplog.text and src.source_id in caplog.text
    dcm = patient_folder.parent / "dcm" / f"{MRN}.dcm"
    dcm.parent.mkdir()
    _write_dcm(dcm)
    with caplog.at_level(logging.INFO, logger="edgeclf.runtime.dicom"), open_source(str(dcm)) as src:
        assert src.source_id == _hmac(_own_key, str(dcm), 12)
    assert _sha(str(dcm), 12) not in caplog.text and f"opened DICOM {src.source_id}" in caplog.text


def _watch_once(folder: Path) -> List[Any]:
    frames = []
    with open_source(f"watch:{folder}?poll=0.05&idle_exit=0.5") as src:
        for frame in src:
            frames.append(frame)
            src.ack(frame)  # type: ignore[attr-defined]
    return frames


def test_watch_keys_are_keyed_and_the_state_does_not_depend_on_the_key(tmp_path: Path, _own_key: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2")
    from edgeclf.runtime.watch import STATE_NAME, _identity

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _write_png(inbox / f"{NAME}.png")
    st = (inbox / f"{NAME}.png").stat()
    identity = _identity(f"{NAME}.png", st.st_size, st.st_mtime_ns)
    (frame,) = _watch_once(inbox)
    # records carry the keyed key; a name's plain hash (with a guessable size and mtime) is not exported
    assert frame.meta["watch_key"] == _hmac(_own_key, identity, 20) != identity
    state = json.loads((inbox / STATE_NAME).read_text())
    assert list(state["files"]) == [identity]  # the state's format is unchanged: a state from before still holds
    # another key (a new install key, a per-process one): nothing already done is classified again
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "other-key"))
    _write_png(inbox / "later.png", 9)
    time.sleep(0.01)
    again = _watch_once(inbox)
    assert [int(f.image[0, 0]) for f in again] == [9]


def test_the_audit_start_record_says_which_keyed_hash_it_holds(tmp_path: Path, _own_key: Path) -> None:
    inbox = tmp_path / "export"
    inbox.mkdir()
    src = inbox / f"{MRN}.dcm"
    _write_dcm(src)
    bundle = make_tiny_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    out.mkdir()
    p = _cli("-vv", "run", "--bundle", str(bundle), "--source", str(src), "--out", str(out / "r.jsonl"),
             "--audit", str(out / "audit.jsonl"), env={"EDGECLF_SOURCE_NAMES": "index"})
    assert p.returncode == 0, p.stderr
    start = json.loads((out / "audit.jsonl").read_text().splitlines()[0])
    fact = start["payload"]["config"]["source"]
    assert fact == {"kind": "path", "uri_hmac": _hmac(_own_key, str(src), 16), "key_scope": "install",
                    "key_id": hashlib.sha256(_key_bytes(_own_key)).hexdigest()[:8]}
    # the log's source_id is the same keyed hash, so an auditor can tie log lines to the audit
    assert fact["uri_hmac"][:12] in p.stderr and _sha(str(src), 12) not in p.stderr + p.stdout
