"""No patient identifiers in any output: DICOM files that carry a patient's name and IDs in their headers
and in their file and folder names are run through the runtime (CLI, watched folder, audit log), and
every file the runs write, their stdout and their debug log are searched for those identifiers."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) is needed to read DICOM")

REPO = Path(__file__).resolve().parents[2]
NAME = "ZYQUIST^ORVILLE"
PATIENT_ID = "QX48213"
HEADER: Dict[str, str] = {
    "PatientName": NAME,
    "PatientID": PATIENT_ID,
    "OtherPatientIDs": "QX99107",
    "PatientBirthDate": "19510417",
    "AccessionNumber": "ACC77120",
    "InstitutionName": "WINTERBOURNE CLINIC",
    "ReferringPhysicianName": "QUILLFEATHER^MARGOLINE",
    "StudyDescription": "ZYQUIST FOLLOW-UP",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.5551234",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.5551235",
    "StudyID": "STX8812",
}
SOP_UIDS = ["1.2.826.0.1.3680043.8.498.7770001", "1.2.826.0.1.3680043.8.498.7770002", "1.2.826.0.1.3680043.8.498.7770003"]
# Every identifier, also as the parts a name is made of, and as spelled in file names.
SECRETS: List[str] = sorted(
    {v for v in HEADER.values()} | set(SOP_UIDS) | {"ZYQUIST", "ORVILLE", "QUILLFEATHER", "MARGOLINE", "WINTERBOURNE",
                                                    "ZYQUIST ORVILLE", "ORVILLE ZYQUIST", "ZYQUIST_ORVILLE"}
)
FILE_NAMES = [f"{NAME}_{PATIENT_ID}.dcm", f"{PATIENT_ID}_orville_2.dcm", "zyquist-orville.DCM"]


def _write(path: Path, pixels: np.ndarray, sop_uid: str, *, color: bool = False, window: Any = None, instance: int = 1) -> None:
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # ultrasound image storage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    for key, value in HEADER.items():
        setattr(ds, key, value)
    ds.Modality, ds.InstanceNumber = "US", instance
    frames = pixels.shape[0] if pixels.ndim == (4 if color else 3) else 1
    ds.Rows, ds.Columns = (pixels.shape[-3], pixels.shape[-2]) if color else (pixels.shape[-2], pixels.shape[-1])
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = "RGB" if color else "MONOCHROME2"
    if color:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames, ds.FrameTime = frames, 33.3
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(str(path), enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)


@pytest.fixture
def patient_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in" / f"{NAME}_{PATIENT_ID}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write(folder / FILE_NAMES[0], rng.integers(0, 255, (4, 64, 64), dtype=np.uint8), SOP_UIDS[0], instance=1)
    _write(folder / FILE_NAMES[1], rng.integers(0, 4000, (64, 64), dtype=np.uint16), SOP_UIDS[1], window=(2000, 4000),
           instance=2)
    _write(folder / FILE_NAMES[2], rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), SOP_UIDS[2], color=True, instance=3)
    # Values a validating reader would complain about, quoting them: the complaint must not reach the log.
    ds = pydicom.dcmread(str(folder / FILE_NAMES[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientName = NAME + "^" + "ORVILLE" * 12  # a PN component over 64 characters
        ds.BodyPartExamined = "zyquist orville"  # not a valid CS value
    ds.save_as(str(folder / FILE_NAMES[1]))
    return folder


def _leaks(text: str) -> List[str]:
    low = text.lower()
    return [s for s in SECRETS if s.lower() in low or s.lower().replace("^", " ") in low or s.lower().replace("^", "_") in low]


def _check_outputs(where: Path, *texts: str) -> int:
    """Search every file under `where` and the given texts; returns how many files were searched."""
    n = 0
    for p in sorted(where.rglob("*")):
        if p.is_file():
            n += 1
            assert not _leaks(p.read_bytes().decode("utf-8", "replace")), (p, _leaks(p.read_bytes().decode("utf-8", "replace")))
            assert not _leaks(p.name), p
    for t in texts:
        assert not _leaks(t), (_leaks(t), t[:2000])
    return n


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "edgeclf", "-vv", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_the_identifiers_are_really_in_the_inputs(patient_folder: Path) -> None:
    """The search works: the inputs themselves are full of what the outputs must not hold."""
    raw = "".join(p.read_bytes().decode("latin-1") for p in patient_folder.iterdir())
    assert {"ZYQUIST", PATIENT_ID, "19510417", SOP_UIDS[0]} <= set(_leaks(raw))
    assert "ZYQUIST" in _leaks(str(patient_folder)) and _leaks(FILE_NAMES[2])


@pytest.mark.parametrize("what", ["folder", "file"])
def test_cli_run_on_dicom_with_identifiers_writes_none_of_them(bundle_dir: Path, patient_folder: Path, tmp_path: Path,
                                                               what: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    source = patient_folder if what == "folder" else patient_folder / FILE_NAMES[0]
    p = _cli("run", "--bundle", str(bundle_dir), "--source", str(source), "--out", str(out / "results.jsonl"),
             "--summary", str(out / "clip.json"), "--record", str(out / "annotated.avi"), "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    frames = 6 if what == "folder" else 4
    assert result["frames"] == frames and result["source_kind"] == "dicom"
    assert len((out / "results.jsonl").read_text().splitlines()) == frames
    assert "DEBUG" in p.stderr  # the most talkative log was searched
    assert _check_outputs(out, p.stdout, p.stderr) == 3


def test_watched_folder_state_and_results_hold_no_identifiers(bundle_dir: Path, patient_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    p = _cli("run", "--bundle", str(bundle_dir), "--source", f"watch:{patient_folder}?poll=0.05&idle_exit=1",
             "--out", str(out / "results.jsonl"), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["frames"] == 6
    state = patient_folder / ".edgeclf-watch.json"  # the one file the runtime writes beside the inputs
    assert state.is_file()
    assert _check_outputs(out, p.stdout, p.stderr, state.read_text()) == 1


def test_audit_log_of_a_dicom_run_holds_no_identifiers(bundle_dir: Path, patient_folder: Path, tmp_path: Path) -> None:
    from edgeclf.runtime.app import run_bundle
    from edgeclf.runtime.audit import AuditLog, AuditSink, source_fact, verify_audit
    from edgeclf.runtime.bundle import load_bundle

    out = tmp_path / "out"
    uri = str(patient_folder)
    with AuditLog(out / "audit.jsonl", fsync_every=0, digest_every=2) as log:
        log.start(bundle_checksum=load_bundle(bundle_dir).checksum, config={"source": source_fact(uri), "backend": "ort-cpu"})
        try:
            summary = run_bundle(str(bundle_dir), uri, out=str(out / "results.jsonl"), extra_sinks=[AuditSink(log)])
        except Exception as exc:
            log.fault("run", str(exc))
            raise
        log.end("ok", summary=summary)
    assert verify_audit(out / "audit.jsonl").state == "intact"
    assert _check_outputs(out) == 2


def test_dicom_meta_is_whitelisted_and_hashes_the_uid(patient_folder: Path) -> None:
    from edgeclf.runtime.dicom import META_KEYS
    from edgeclf.runtime.sources import open_source

    with open_source(str(patient_folder)) as src:
        metas = [dict(f.meta) for f in src]
    assert len(metas) == 6 and all(set(m) <= set(META_KEYS) for m in metas)
    assert not _leaks(repr(metas))
    assert all(m["sop_uid_hash"] and len(m["sop_uid_hash"]) == 12 for m in metas) and metas[0]["modality"] == "US"
    # keyed (HMAC under the source key, tests/conftest.py): a list of the export's UIDs cannot be matched against it
    key = bytes.fromhex(Path(os.environ["EDGECLF_SOURCE_KEY"]).read_text().strip())
    want = [hmac.new(key, uid.encode(), hashlib.sha256).hexdigest()[:12] for uid in SOP_UIDS]
    assert [m["sop_uid_hash"] for m in metas] == [want[0]] * 4 + want[1:]
    assert not {hashlib.sha256(uid.encode()).hexdigest()[:12] for uid in SOP_UIDS} & {m["sop_uid_hash"] for m in metas}


def test_a_misfiled_value_in_a_coded_field_is_dropped(tmp_path: Path) -> None:
    from edgeclf.runtime.sources import open_source

    path = tmp_path / "x.dcm"
    _write(path, np.zeros((32, 32), np.uint8), SOP_UIDS[0])
    ds = pydicom.dcmread(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.Modality = "zyquist orville"  # a name typed into the wrong field (not a valid CS value)
    ds.save_as(str(path))
    with open_source(str(path)) as src:
        meta = dict(next(iter(src)).meta)
    assert meta["modality"] is None and not _leaks(repr(meta))


@pytest.mark.parametrize("typed", ["ZYQUIST ORVILLE", "ZYQUIST", "QX48213"])
def test_an_uppercase_name_in_modality_is_dropped(tmp_path: Path, typed: str) -> None:
    """An uppercase name has the form of a CS value: only DICOM-defined modality codes are kept."""
    from edgeclf.runtime.sources import open_source

    path = tmp_path / "x.dcm"
    _write(path, np.zeros((32, 32), np.uint8), SOP_UIDS[0])
    ds = pydicom.dcmread(str(path))
    ds.Modality = typed
    ds.save_as(str(path))
    with open_source(str(path)) as src:
        meta = dict(next(iter(src)).meta)
    assert meta["modality"] is None and not _leaks(repr(meta))
    for code in ("MR", "IVUS", "CF"):  # defined (CF: retired) codes are kept
        ds.Modality = code
        ds.save_as(str(path))
        with open_source(str(path)) as src:
            assert dict(next(iter(src)).meta)["modality"] == code


def test_image_names_are_hashed_or_indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    from edgeclf.errors import SourceError
    from edgeclf.runtime.sources import SOURCE_NAMES_ENV, open_source

    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / f"{NAME}_{PATIENT_ID}.png"), np.zeros((16, 16), np.uint8))
    with open_source(str(folder)) as src:
        meta = dict(next(iter(src)).meta)
    assert meta["file_index"] == 0 and len(meta["name_hash"]) == 12 and not _leaks(repr(meta))
    monkeypatch.setenv(SOURCE_NAMES_ENV, "index")
    with open_source(str(folder)) as src:
        meta = dict(next(iter(src)).meta)
    assert "name_hash" not in meta and meta["file_index"] == 0
    monkeypatch.setenv(SOURCE_NAMES_ENV, "verbatim")
    with pytest.raises(SourceError, match="allowed: hash, index"):
        open_source(str(folder))


def test_pydicom_complaints_quoting_a_header_value_are_withheld(bundle_dir: Path, tmp_path: Path) -> None:
    """A name in a numeric field (InstanceNumber, IS): pydicom's reader warns and logs quoting the value."""
    from pydicom.uid import ImplicitVRLittleEndian

    path = tmp_path / "in" / "x.dcm"
    path.parent.mkdir()
    _write(path, np.zeros((32, 32), np.uint8), SOP_UIDS[0])
    ds = pydicom.dcmread(str(path))
    del ds.InstanceNumber
    ds.add_new(0x00200013, "LO", "ZYQUIST")  # read back as IS (the dictionary's VR) from an implicit-VR file
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(str(path), implicit_vr=True, little_endian=True)
    else:  # pragma: no cover - pydicom 2
        ds.is_implicit_VR, ds.is_little_endian = True, True
        ds.save_as(str(path))
    out = tmp_path / "out"
    out.mkdir()
    p = _cli("run", "--bundle", str(bundle_dir), "--source", str(path), "--out", str(out / "r.jsonl"))
    assert p.returncode == 0, p.stderr
    assert "Invalid value for VR IS: <withheld>" in p.stderr  # the complaint is kept, the value is not
    _check_outputs(out, p.stdout, p.stderr)


def test_pydicom_naming_a_damaged_file_by_its_path_is_withheld(tmp_path: Path) -> None:
    """A half-copied file: pydicom says "... in file <path>" as a log record and as a warning; the folder is
    named after the patient, so neither may reach stderr at the default verbosity."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    folder = tmp_path / f"{NAME}_{PATIENT_ID}"
    folder.mkdir()
    path = folder / "IM1.dcm"
    _write(path, np.zeros((32, 32), np.uint8), SOP_UIDS[0])
    ds = pydicom.dcmread(str(path))
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 2000 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])  # cut inside the encapsulated pixel data
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from edgeclf.errors import SourceError\n"
        "from edgeclf.runtime.sources import open_source\n"
        "try:\n"
        "    open_source(sys.argv[1]).close()\n"
        "except SourceError as exc:\n"
        "    print('SourceError', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "in file <withheld>" in p.stderr  # the complaint is kept (logged), its path is not
    _check_outputs(tmp_path / "none", p.stdout, p.stderr)
