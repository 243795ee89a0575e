"""edgeclf.runtime.dicom: DICOM files made here with pydicom, and every file of ../shared/data/dicom."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) is needed to read DICOM")

from edgeclf.errors import SourceError  # noqa: E402
from edgeclf.runtime.dicom import DicomFile, DicomSource, is_dicom_file  # noqa: E402
from edgeclf.runtime.sources import open_source  # noqa: E402
from tests.conftest import SHARED_DATA, shared  # noqa: E402
from tests.runtime.pydicom2 import pydicom2_tree_fixture, run_under_pydicom2  # noqa: E402, F401 - the fixture

PYDICOM3 = int(pydicom.__version__.split(".")[0]) >= 3
PATIENT = "DOE^JANE"
PATIENT_ID = "PID-4242"


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: Optional[int] = None,
    signed: bool = False,
    window: Optional[tuple] = None,
    rescale: Optional[tuple] = None,
    frame_time: Optional[float] = None,
    cine_rate: Optional[float] = None,
    instance: Optional[int] = None,
    palette: Optional[Sequence[np.ndarray]] = None,
    syntax: Any = None,
    encapsulated: Union[bytes, Sequence[bytes], None] = None,
    sop_uid: Optional[str] = None,
    no_pixels: bool = False,
    modality: str = "US",
    sop_class: Optional[str] = None,
    bits_allocated: Optional[int] = None,
    number_of_frames: Optional[int] = None,
    pixel_data: Optional[bytes] = None,
) -> Path:
    """A small DICOM Part 10 file. `pixels`: (rows, cols[, 3]) or (frames, rows, cols[, 3]).

    `encapsulated`: one fragment or a list of them (with `syntax`); `pixel_data`: raw bytes written in place of
    `pixels`; `number_of_frames`, `bits_allocated`: the header's values instead of those of `pixels` (files whose
    header and pixel data disagree, 1-bit packed frames)."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    color = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    frames = pixels.shape[0] if pixels.ndim == (4 if color else 3) else 1
    rows, cols = (pixels.shape[-3], pixels.shape[-2]) if color else (pixels.shape[-2], pixels.shape[-1])
    meta = FileMetaDataset()
    # secondary capture image; without pixels a Basic Text SR (an image class always has pixel data)
    meta.MediaStorageSOPClassUID = sop_class or ("1.2.840.10008.5.1.4.1.1.88.11" if no_pixels else "1.2.840.10008.5.1.4.1.1.7")
    uid = sop_uid or generate_uid()
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    if not PYDICOM3:
        ds.is_little_endian = True
        ds.is_implicit_VR = False
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = uid
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.StudyDate = "20240101"
    ds.Modality = modality
    if no_pixels:
        _save(ds, path)
        return path
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = photometric
    if color:
        ds.PlanarConfiguration = 0
    bits = bits_allocated if bits_allocated is not None else pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if number_of_frames is not None:
        ds.NumberOfFrames = number_of_frames
    elif frames > 1 or pixels.ndim == (4 if color else 3):
        ds.NumberOfFrames = frames
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if frame_time is not None:
        ds.FrameTime = frame_time
    if cine_rate is not None:
        ds.CineRate = cine_rate
    if instance is not None:
        ds.InstanceNumber = instance
    if palette is not None:
        for name, lut in zip(("Red", "Green", "Blue"), palette):
            setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [len(lut), 0, 16])
            setattr(ds, f"{name}PaletteColorLookupTableData", np.asarray(lut, "<u2").tobytes())
    if encapsulated is not None:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([encapsulated] if isinstance(encapsulated, bytes) else list(encapsulated))
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = pixel_data if pixel_data is not None else np.ascontiguousarray(pixels).tobytes()
        ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    _save(ds, path)
    return path


def _save(ds: Any, path: Path) -> None:
    if PYDICOM3:
        ds.save_as(str(path), enforce_file_format=True)
    else:
        ds.save_as(str(path), write_like_original=False)


def _frames(src: Any) -> list:
    with src:
        return list(src)


def _no_identifiers(meta: dict) -> None:
    text = repr(meta)
    for secret in (PATIENT, PATIENT_ID, "20240101", "DOE"):
        assert secret not in text


# ------------------------------------------------------------------------------------ pixel handling


def test_monochrome2_8bit_passes_through_and_meta_has_no_identifiers(tmp_path: Path) -> None:
    img = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64)
    uid = "1.2.826.0.1.3680043.8.498.1"
    path = write_dicom(tmp_path / "a.dcm", img, window=(10, 20), sop_uid=uid)  # 8-bit: window not applied
    (frame,) = _frames(open_source(str(path)))
    assert frame.image.dtype == np.uint8 and np.array_equal(frame.image, img)
    m = frame.meta
    assert m["source"] == "dicom" and m["modality"] == "US" and m["photometric"] == "MONOCHROME2"
    assert m["bits_stored"] == 8 and m["file_frame"] == 0 and m["voi"] == "none"
    assert m["sop_uid_hash"] == _keyed(uid)
    _no_identifiers(dict(m))
    assert "a.dcm" not in repr(dict(m))


def _source_key() -> bytes:
    """The source key the runtime uses in tests (tests/conftest.py points EDGECLF_SOURCE_KEY at a temp file)."""
    return bytes.fromhex(Path(os.environ["EDGECLF_SOURCE_KEY"]).read_text().strip())


def _keyed(text: str) -> str:
    return hmac.new(_source_key(), text.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def test_sop_uid_hash_is_keyed_and_names_its_key(tmp_path: Path) -> None:
    # An unkeyed sha256 of a UID can be matched against a PACS export's UID list; the HMAC only with the key.
    uid = "1.2.826.0.1.3680043.8.498.20240101093015.7"
    path = write_dicom(tmp_path / "k.dcm", np.zeros((8, 8), np.uint8), sop_uid=uid)
    (frame,) = _frames(open_source(str(path)))
    m = dict(frame.meta)
    assert m["sop_uid_hash"] == _keyed(uid) != hashlib.sha256(uid.encode()).hexdigest()[:12]
    assert m["key_id"] == hashlib.sha256(_source_key()).hexdigest()[:8]  # which key: the audit's key_id
    assert uid not in repr(m) and uid.rsplit(".", 1)[0] not in repr(m)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    img = np.array([[0, 10, 255]], np.uint8)
    path = write_dicom(tmp_path / "m1.dcm", img, photometric="MONOCHROME1")
    (frame,) = _frames(DicomSource(str(path)))
    assert frame.image.tolist() == [[255, 245, 0]]


def test_16bit_window_and_rescale(tmp_path: Path) -> None:
    # stored 0..1000, rescale *2 - 100 -> -100..1900; window center 500 width 1001 (LINEAR):
    # x <= -0.5 -> 0, x > 999.5 -> 255, else ((x + 0.5) / 1000) * 255
    stored = np.array([[0, 50, 300, 550, 1000]], np.uint16)
    path = write_dicom(tmp_path / "w.dcm", stored, bits_stored=12, window=(500, 1001), rescale=(2, -100),
                       modality="CR")
    (frame,) = _frames(DicomSource(str(path)))
    values = stored.astype(float) * 2 - 100
    expected = np.clip(np.rint(np.clip((values + 0.5) / 1000.0, 0, 1) * 255), 0, 255).astype(np.uint8)
    assert frame.image.tolist() == expected.tolist() == [[0, 0, 128, 255, 255]]
    assert frame.meta["voi"] == "window" and frame.meta["bits_stored"] == 12


def test_16bit_monochrome1_window_inverts_after_voi(tmp_path: Path) -> None:
    stored = np.array([[0, 512, 1023]], np.uint16)
    path = write_dicom(tmp_path / "w1.dcm", stored, photometric="MONOCHROME1", bits_stored=10, window=(512, 1024))
    (frame,) = _frames(DicomSource(str(path)))
    assert frame.image[0, 0] == 255 and frame.image[0, 2] == 0 and 120 <= frame.image[0, 1] <= 135


def test_16bit_without_voi_scales_min_max_over_the_whole_file(tmp_path: Path) -> None:
    cine = np.zeros((3, 4, 4), np.uint16)
    cine[0] = 100  # flat, darker frame
    cine[1] = 100
    cine[1, 3, 3] = 4000  # the file's extremes: 100 and 4000
    cine[2] = 2050
    path = write_dicom(tmp_path / "mm.dcm", cine, bits_stored=12, frame_time=50.0)
    src = DicomSource(str(path))
    assert src.frame_count == 3 and src.fps == pytest.approx(20.0)
    frames = _frames(src)
    assert [f.meta["voi"] for f in frames] == ["minmax"] * 3
    assert frames[0].image.max() == 0  # 100 is the file's minimum, not the frame's own range
    assert frames[1].image[0, 0] == 0 and frames[1].image[3, 3] == 255
    assert frames[2].image[0, 0] == round((2050 - 100) * 255 / 3900)
    # starting in the middle still uses the file's range
    df = DicomFile.probe(str(path))
    assert df is not None
    (img, meta), = list(df.iter_frames(2))
    assert meta["file_frame"] == 2 and img[0, 0] == frames[2].image[0, 0]


def test_signed_16bit(tmp_path: Path) -> None:
    stored = np.array([[-1000, 0, 1000]], np.int16)
    path = write_dicom(tmp_path / "s.dcm", stored, signed=True, window=(0, 2001), modality="CT")
    (frame,) = _frames(DicomSource(str(path)))
    assert frame.image.tolist() == [[0, 128, 255]]


def _with_voi_lut(path: Path, descriptor: list, data: Any, vr: str = "US") -> Path:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    ds = pydicom.dcmread(str(path))
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    item["LUTData"].VR = vr
    ds.VOILUTSequence = DicomSequence([item])
    _save(ds, path)
    return path


def test_voi_lut_with_8bit_entries_indexes_inputs_over_255(tmp_path: Path) -> None:
    # pydicom's apply_voi_lut indexes an 8-bit LUT with uint8, so 1024 wrapped to 0 ([0 0 0 15])
    stored = np.array([[0, 1024, 2048, 4095]], np.uint16)
    path = write_dicom(tmp_path / "lut8.dcm", stored, bits_stored=12)
    _with_voi_lut(path, [4096, 0, 8], [v >> 4 for v in range(4096)])
    (frame,) = _frames(DicomSource(str(path)))
    assert frame.image.tolist() == [[0, 64, 128, 255]] and frame.meta["voi"] == "lut"
    # OW data (16-bit words), a first mapped value and 0 entries meaning 65536
    lut = (np.arange(65536) >> 8).astype("<u2")
    path = write_dicom(tmp_path / "lutow.dcm", stored, bits_stored=12)
    _with_voi_lut(path, [0, 1000, 8], lut.tobytes(), vr="OW")
    (frame,) = _frames(DicomSource(str(path)))
    assert frame.image.tolist() == [[0, 0, 4, 12]]  # below 1000 -> entry 0; 4095 -> entry 3095 -> 12


def test_voi_lut_with_16bit_entries_matches_pydicom(tmp_path: Path) -> None:
    stored = np.array([[0, 100, 1024, 2048, 4095]], np.uint16)
    path = write_dicom(tmp_path / "lut12.dcm", stored, bits_stored=12)
    _with_voi_lut(path, [2048, 512, 12], [min(4095, 2 * v) for v in range(2048)])
    (frame,) = _frames(DicomSource(str(path)))
    utils = pydicom.pixels if PYDICOM3 else pydicom.pixel_data_handlers.util
    ds = pydicom.dcmread(str(path))
    ref = utils.apply_voi_lut(stored.astype(np.int64), ds, index=0, prefer_lut=True)
    assert frame.image.tolist() == np.rint(ref * 255.0 / 4095).astype(np.uint8).tolist() == [[0, 0, 64, 191, 255]]


def test_voi_lut_shorter_than_its_descriptor_is_one_line(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "short.dcm", np.array([[0, 4095]], np.uint16), bits_stored=12)
    _with_voi_lut(path, [4096, 0, 8], list(range(16)))
    with pytest.raises(SourceError, match="VOI LUT with 16 entries where its descriptor says 4096") as exc:
        _frames(DicomSource(str(path)))
    assert "\n" not in str(exc.value)


def test_rgb_and_ybr_full_become_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 2] = (10, 200, 30)
    (frame,) = _frames(DicomSource(str(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))))
    assert frame.image.shape == (2, 3, 3) and np.array_equal(frame.image, rgb)
    ybr = np.zeros((2, 2, 3), np.uint8)
    ybr[..., 0] = [[16, 100], [200, 235]]
    ybr[..., 1:] = 128  # no chroma: gray, R = G = B = Y
    (frame,) = _frames(DicomSource(str(write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))))
    assert frame.image.shape == (2, 2, 3)
    for c in range(3):
        assert np.abs(frame.image[..., c].astype(int) - ybr[..., 0]).max() <= 1


def test_palette_color(tmp_path: Path) -> None:
    lut_r = np.zeros(256, np.uint16)
    lut_g = np.zeros(256, np.uint16)
    lut_b = np.zeros(256, np.uint16)
    lut_r[1], lut_g[2], lut_b[3] = 65535, 65535, 32896  # index 3 -> half blue (128)
    idx = np.array([[0, 1, 2, 3]], np.uint8)
    path = write_dicom(tmp_path / "pal.dcm", idx, photometric="PALETTE COLOR", palette=(lut_r, lut_g, lut_b))
    (frame,) = _frames(DicomSource(str(path)))
    assert frame.image.tolist() == [[[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 128]]]
    assert frame.meta["voi"] == "palette"


def test_cine_fps_from_cine_rate_and_frames(tmp_path: Path) -> None:
    cine = np.stack([np.full((4, 5), i * 10, np.uint8) for i in range(6)])
    src = DicomSource(str(write_dicom(tmp_path / "cine.dcm", cine, cine_rate=25)))
    assert (src.fps, src.size, src.frame_count, src.live, src.kind) == (25.0, (5, 4), 6, False, "dicom")
    frames = _frames(src)
    assert [int(f.image[0, 0]) for f in frames] == [0, 10, 20, 30, 40, 50]
    assert [f.meta["file_frame"] for f in frames] == list(range(6)) == [f.index for f in frames]


# ------------------------------------------------------------------------------------------- folders


def test_folder_sorted_by_instance_number_then_name_skipping_non_dicom(tmp_path: Path) -> None:
    def img(v: int) -> np.ndarray:
        return np.full((4, 4), v, np.uint8)

    write_dicom(tmp_path / "b.dcm", img(3), instance=3)
    write_dicom(tmp_path / "a.dcm", img(1), instance=1)
    write_dicom(tmp_path / "IM10", img(20), instance=2)  # no extension, DICM marker
    write_dicom(tmp_path / "IM9", img(19), instance=2)  # same InstanceNumber: name order (natural)
    write_dicom(tmp_path / "z.dcm", img(99))  # no InstanceNumber: last
    write_dicom(tmp_path / "DICOMDIR", img(0), no_pixels=True, sop_class="1.2.840.10008.1.3.10")  # no pixels
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 200)
    (tmp_path / ".hidden.dcm").write_bytes(b"\0" * 10)
    src = open_source(str(tmp_path))
    assert isinstance(src, DicomSource)
    assert src.skipped == 4 and src.frame_count == 5
    values = [int(f.image[0, 0]) for f in _frames(src)]
    assert values == [1, 19, 20, 3, 99]


def test_folder_loop_and_indices(tmp_path: Path) -> None:
    write_dicom(tmp_path / "1.dcm", np.stack([np.full((2, 2), v, np.uint8) for v in (1, 2)]), instance=1)
    write_dicom(tmp_path / "2.dcm", np.full((2, 2), 3, np.uint8), instance=2)
    src = open_source(str(tmp_path), loop=True)
    got = [src.read() for _ in range(7)]
    src.close()
    assert [int(f.image[0, 0]) for f in got] == [1, 2, 3, 1, 2, 3, 1]
    assert [f.index for f in got] == list(range(7))
    assert [f.meta["pass"] for f in got] == [0, 0, 0, 1, 1, 1, 2]


def test_resize_to_requested_size(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    path = write_dicom(tmp_path / "r.dcm", np.zeros((40, 60), np.uint8))
    (frame,) = _frames(open_source(str(path), size=(30, 20)))
    assert frame.image.shape == (20, 30)


# -------------------------------------------------------------------------------------------- errors


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def test_missing_decoder_names_the_syntax_and_the_package(tmp_path: Path) -> None:
    uid = "1.2.840.10008.1.2.4.70"  # JPEG Lossless SV1: no decoder in edgeclf[dicom] (libjpeg is GPL)
    if PYDICOM3:
        from pydicom.pixels import get_decoder

        if get_decoder(uid).is_available:
            pytest.skip("a JPEG Lossless decoder is installed here")
    path = write_dicom(tmp_path / "jl.dcm", np.zeros((4, 4), np.uint8), syntax=uid, encapsulated=b"\xff\xd8junk")
    with pytest.raises(SourceError) as exc:
        DicomSource(str(path))
    msg = _one_line(exc)
    assert "JPEG Lossless" in msg and uid in msg and "pylibjpeg-libjpeg" in msg and "install" in msg
    assert "jl.dcm" not in msg or str(path) not in msg


def test_video_syntax_is_refused_with_a_way_out(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "v.dcm", np.zeros((4, 4), np.uint8), syntax="1.2.840.10008.1.2.4.102",
                       encapsulated=b"\0\0\1")
    with pytest.raises(SourceError, match="video stream that pydicom does not decode") as exc:
        DicomSource(str(path))
    _one_line(exc)


def test_damaged_pixel_data_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "d.dcm", np.zeros((64, 64), np.uint16), window=(1, 2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])  # cut the pixel data short
    with pytest.raises(SourceError) as exc:
        _frames(DicomSource(str(path)))
    assert "DICOM file" in _one_line(exc)


def test_no_pixels_and_not_dicom(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "sr.dcm", np.zeros((2, 2), np.uint8), no_pixels=True)
    with pytest.raises(SourceError, match="holds no image") as exc:
        DicomSource(str(path))
    _one_line(exc)
    other = tmp_path / "x.dcm"
    other.write_bytes(b"hello" * 50)
    with pytest.raises(SourceError, match="not a DICOM file") as exc:
        DicomSource(str(other))
    _one_line(exc)
    assert not is_dicom_file(str(other)) and is_dicom_file(str(path))


def _series_with_a_damaged_file(folder: Path) -> Path:
    folder.mkdir()
    for i in (1, 2, 3):
        write_dicom(folder / f"DOE^JANE_{i}.dcm", np.full((8, 8), i, np.uint8), instance=i)
    return folder / "DOE^JANE_2.dcm"


def test_a_cut_short_file_in_a_series_is_an_error_not_skipped(tmp_path: Path) -> None:
    bad = _series_with_a_damaged_file(tmp_path / "series")
    bad.write_bytes(bad.read_bytes()[:400])  # a half-finished copy: cut in the header
    with pytest.raises(SourceError, match=r"DICOM file 1 of 3 .* cut short or damaged") as exc:
        open_source(str(tmp_path / "series"))
    assert "DOE" not in _one_line(exc) and "series" not in str(exc.value)
    bad.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)  # the marker, then garbage
    with pytest.raises(SourceError, match=r"DICOM file 1 of 3 .* cut short or damaged"):
        open_source(str(tmp_path / "series"))


def test_an_extension_made_of_a_name_is_not_quoted(tmp_path: Path) -> None:
    # "Jane.Doe" (no real extension): splitext calls ".Doe" its extension; errors name files by index only.
    folder = tmp_path / "series"
    folder.mkdir()
    for i in (1, 2):
        write_dicom(folder / f"IM{i}", np.full((8, 8), i, np.uint8), instance=i)
    bad = write_dicom(folder / "Jane.Doe", np.full((8, 8), 3, np.uint8), instance=3)
    bad.write_bytes(bad.read_bytes()[:400])
    with pytest.raises(SourceError, match=r"DICOM file \d of 3 .* cut short or damaged") as exc:
        open_source(str(folder))
    assert "doe" not in _one_line(exc).lower()
    path = write_dicom(tmp_path / "John.Smith", np.zeros((2, 2, 3), np.uint8), photometric="HSV")
    with pytest.raises(SourceError) as exc:
        DicomSource([str(path), str(tmp_path / "series" / "IM1")])
    assert "smith" not in _one_line(exc).lower()


def test_a_dicm_file_pydicom_cannot_parse_is_a_damaged_header_error(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _series_with_a_damaged_file(tmp_path / "series")
    real = pydicom.dcmread

    def dcmread(fp: Any, *args: Any, **kwargs: Any) -> Any:
        if str(fp) == str(bad):
            raise NotImplementedError("a damaged element")
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    with pytest.raises(SourceError, match=r"DICOM file 1 of 3 .* damaged header element \(NotImplementedError\)") as exc:
        open_source(str(tmp_path / "series"))
    assert "DOE" not in _one_line(exc)
    bad.write_bytes(b"not dicom at all" * 20)  # no marker, but named .dcm: still skipped as before
    with open_source(str(tmp_path / "series")) as src:
        assert src.frame_count == 2 and src.skipped == 1


def test_unsupported_photometric(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "hsv.dcm", np.zeros((2, 2, 3), np.uint8), photometric="HSV")
    with pytest.raises(SourceError, match="PhotometricInterpretation 'HSV'") as exc:
        DicomSource(str(path))
    _one_line(exc)


def test_pydicom_imported_only_when_needed() -> None:
    import subprocess
    import sys

    code = (
        "import sys, edgeclf.runtime.sources, edgeclf.runtime.dicom, edgeclf.runtime.watch, edgeclf.runtime.live;"
        "print('pydicom' in sys.modules, 'cv2' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["False", "False", "False"]


# ------------------------------------------------------------------------------ ../shared/data/dicom


def _manifest() -> list:
    root = shared("dicom")
    with open(root / "MANIFEST.csv", newline="") as f:
        return list(csv.DictReader(f))


def _shared_rows() -> list:
    path = SHARED_DATA / "dicom" / "MANIFEST.csv"  # at collection: shared() would skip the whole module
    if not path.exists():
        reason = f"real data {path} is absent (it lives in ../shared/data beside a development checkout)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    with open(path, newline="") as f:
        return [pytest.param(row, id=row["file"]) for row in csv.DictReader(f)]


@pytest.mark.shared_data
@pytest.mark.parametrize("row", _shared_rows())
def test_every_shared_dicom_file(row: dict, caplog: pytest.LogCaptureFixture) -> None:
    path = shared("dicom", row["file"])
    rows, cols, frames = int(row["rows"]), int(row["cols"]), int(row["frames"] or 1)
    caplog.set_level(logging.DEBUG)
    try:
        src = open_source(str(path))
    except SourceError as exc:  # only for a transfer syntax without an installed decoder
        msg = str(exc)
        assert "\n" not in msg and "no installed decoder" in msg and row["transfer_syntax"].split(" (")[0] in msg
        pytest.skip(f"no decoder installed here: {msg}")
    assert isinstance(src, DicomSource)
    assert src.frame_count == frames and src.size == (cols, rows)
    got = _frames(src)
    assert len(got) == frames
    color = row["photometric"] not in ("MONOCHROME1", "MONOCHROME2")
    for k, f in enumerate(got):
        assert f.image.dtype == np.uint8 and f.image.flags["C_CONTIGUOUS"]
        assert f.image.shape == ((rows, cols, 3) if color else (rows, cols))
        assert f.meta["file_frame"] == k and f.meta["photometric"] == row["photometric"]
        assert f.image.max() > f.image.min()  # not blank
    for record in caplog.records:  # nothing identifying in the logs either
        assert row["file"] not in record.getMessage()


@pytest.mark.shared_data
@pytest.mark.parametrize(("compressed", "raw"), [("US1_J2KR.dcm", "US1_UNCR.dcm"), ("MR2_J2KR.dcm", "MR2_UNCR.dcm")])
def test_lossless_jpeg2000_equals_uncompressed(compressed: str, raw: str) -> None:
    try:
        (a,) = _frames(DicomSource(str(shared("dicom", compressed))))
    except SourceError as exc:
        pytest.skip(str(exc))
    (b,) = _frames(DicomSource(str(shared("dicom", raw))))
    assert np.array_equal(a.image, b.image)


def test_bare_data_set_without_part10_header(tmp_path: Path) -> None:
    """A .dcm file that is only a data set (no preamble, no file meta: old ACR-NEMA style exports)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 2, 3, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(6, dtype=np.uint8).tobytes()
    path = tmp_path / "bare.dcm"
    if PYDICOM3:
        ds.save_as(str(path), implicit_vr=True, little_endian=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, True
        ds.save_as(str(path))
    assert not is_dicom_file(str(path))
    (frame,) = _frames(open_source(str(path)))
    assert frame.image.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_a_damaged_header_element_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """pydicom converts values lazily: a flipped VR (Rows 'US' -> 'TS') fails at first access, inside the
    runtime; found by tests/test_fuzz_sources.py."""
    path = write_dicom(tmp_path / "x.dcm", np.zeros((8, 8), np.uint8))
    data = path.read_bytes()
    rows = b"\x28\x00\x10\x00US"
    assert data.count(rows) == 1
    path.write_bytes(data.replace(rows, b"\x28\x00\x10\x00TS"))
    with pytest.raises(SourceError, match="damaged header element") as info:
        open_source(str(path))
    assert "\n" not in str(info.value)


def test_pydicom_module_loggers_withhold_values_too(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) reads DICOM")
    import logging

    from edgeclf.runtime import dicom as d

    d._pydicom()
    child = logging.getLogger("pydicom.pixels.decoders.base")  # a module logger: records propagate past the parent's filter
    d._pydicom()  # pydicom 3 has made that logger by now; under pydicom 2 the test just made it
    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        child.warning("could not decode: Invalid value for VR PN: 'DOE^JANE' in file /data/DOE^JANE/IM1")
    assert caplog.records and "DOE" not in caplog.text and "<withheld>" in caplog.text


# ------------------------------------------------------- transfer syntaxes, bits, identifiers, memory

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped with pydicom: offline


def _test_file(name: str) -> Path:
    path = TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom's test file {name} is not installed")
    return path


def test_deflated_explicit_vr_little_endian_decodes(tmp_path: Path) -> None:
    # Deflated (1.2.840.10008.1.2.1.99) was read from the path as it lies on disk (deflated): "no Pixel Data"
    cine = (np.arange(32, dtype=np.uint16).reshape(2, 4, 4) * 100)
    path = write_dicom(tmp_path / "dfl.dcm", cine, bits_stored=12, window=(1550, 3101),
                       syntax=pydicom.uid.DeflatedExplicitVRLittleEndian)
    frames = _frames(DicomSource(str(path)))
    assert [f.meta["voi"] for f in frames] == ["window"] * 2
    assert frames[0].image[0, 0] == 0 and frames[1].image[3, 3] == 255
    assert frames[1].meta["transfer_syntax"] == "1.2.840.10008.1.2.1.99"
    sample = _test_file("image_dfl.dcm")  # pydicom's own deflated file (8-bit MONOCHROME2)
    (frame,) = _frames(DicomSource(str(sample)))
    assert np.array_equal(frame.image, pydicom.dcmread(str(sample)).pixel_array)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_8bit_with_fewer_bits_stored_spans_0_to_255(tmp_path: Path, photometric: str) -> None:
    # BitsStored 6: 63 is the top value (white in MONOCHROME2, black in MONOCHROME1, PS3.3 C.7.6.3.1.2);
    # MONOCHROME1 came out 255 - v (63 -> 192, light grey), MONOCHROME2 stayed 0..63 (dark)
    stored = np.array([[0, 21, 42, 63]], np.uint8)
    path = write_dicom(tmp_path / "b6.dcm", stored, bits_stored=6, photometric=photometric)
    (frame,) = _frames(DicomSource(str(path)))
    expected = [0, 85, 170, 255] if photometric == "MONOCHROME2" else [255, 170, 85, 0]
    assert frame.image.tolist() == [expected] and frame.meta["voi"] == "none"


def _non_pillow_jpeg_extended_decoder() -> bool:
    uid = "1.2.840.10008.1.2.4.51"
    if PYDICOM3:
        from pydicom.pixels import get_decoder

        return bool(set(get_decoder(uid).available_plugins) - {"pillow"})
    from pydicom.pixel_data_handlers import gdcm_handler, pylibjpeg_handler

    return bool(gdcm_handler.is_available() or getattr(pylibjpeg_handler, "HAVE_LIBJPEG", False))


def test_12bit_jpeg_extended_with_only_pillow_is_refused_at_open(tmp_path: Path) -> None:
    # Pillow counts as a decoder for JPEG Extended but decodes 8-bit samples only: the file opened and
    # failed at its first frame (in a folder, in the middle of the run)
    if _non_pillow_jpeg_extended_decoder():
        pytest.skip("a 12-bit JPEG Extended decoder (pylibjpeg-libjpeg or gdcm) is installed here")
    folder = tmp_path / "series"
    folder.mkdir()
    write_dicom(folder / "1.dcm", np.zeros((4, 4), np.uint8), instance=1)
    write_dicom(folder / "2.dcm", np.zeros((4, 4), np.uint16), bits_stored=12, instance=2,
                syntax="1.2.840.10008.1.2.4.51", encapsulated=b"\xff\xd8\xff\xc1junk")
    with pytest.raises(SourceError, match="DICOM file 1 of 2 .* 12 bits stored") as exc:
        open_source(str(folder))
    msg = _one_line(exc)
    assert "1.2.840.10008.1.2.4.51" in msg and "pylibjpeg-libjpeg" in msg and "gdcm" in msg
    with pytest.raises(SourceError, match="12 bits stored"):
        DicomSource(str(_test_file("JPGExtended.dcm")))
    # 8-bit JPEG Extended stays Pillow's
    assert DicomFile.probe(str(write_dicom(tmp_path / "8.dcm", np.zeros((4, 4), np.uint8),
                                           syntax="1.2.840.10008.1.2.4.51", encapsulated=b"\xff\xd8"))) is not None


def test_photometric_free_text_is_not_echoed(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "pi.dcm", np.zeros((2, 2), np.uint8))
    ds = pydicom.dcmread(str(path))
    with warnings.catch_warnings():  # pydicom warns, quoting it, when the test sets it: not the runtime's doing
        warnings.simplefilter("ignore", UserWarning)
        ds.PhotometricInterpretation = PATIENT  # a name typed into the wrong field
    _save(ds, path)
    with pytest.raises(SourceError, match=r"PhotometricInterpretation \(not a DICOM-defined value\)") as exc:
        DicomSource(str(path))
    assert "DOE" not in _one_line(exc)


def test_folder_and_file_paths_are_not_quoted(tmp_path: Path) -> None:
    folder = tmp_path / PATIENT
    folder.mkdir()
    write_dicom(folder / "sr.dcm", np.zeros((2, 2), np.uint8), no_pixels=True)  # a report: no images
    with pytest.raises(SourceError, match="the source folder has no DICOM images") as exc:
        DicomSource(str(folder))
    assert "DOE" not in _one_line(exc)
    with pytest.raises(SourceError, match="does not exist") as exc:
        DicomSource(str(folder / "DOE_JANE_1.dcm"))
    assert "DOE" not in _one_line(exc)
    empty = tmp_path / "DOE^JOHN"
    empty.mkdir()
    with pytest.raises(SourceError, match="the source folder has no image or DICOM files") as exc:
        open_source(str(empty))
    assert "DOE" not in _one_line(exc)


def test_implicit_vr_data_set_under_a_jpeg_syntax_decodes_as_pydicom_does() -> None:
    # SC_rgb_jpeg.dcm (written by highdicom 0.1.0): an implicit VR data set under JPEG Baseline. dcmread
    # copes; reading the path in place did not ("Found unexpected tag (0000,0000)")
    path = _test_file("SC_rgb_jpeg.dcm")
    try:
        ref = pydicom.dcmread(str(path)).pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom 2 with some plugin sets cannot decode it either
        pytest.skip(f"pydicom itself cannot decode it here ({type(exc).__name__})")
    (frame,) = _frames(DicomSource(str(path)))
    assert np.array_equal(frame.image, ref)


PYDICOM2_FRAMES = r"""
import json, sys
from pydicom.dataset import Dataset
from edgeclf.runtime.dicom import DicomSource

seen = []  # NumberOfFrames of every data set pydicom 2 decodes
real = Dataset.convert_pixel_data

def convert(self, *args, **kwargs):
    seen.append(int(self.get("NumberOfFrames") or 1))
    return real(self, *args, **kwargs)

Dataset.convert_pixel_data = convert
files = []
for path in sys.argv[1:]:
    with DicomSource(path) as src:
        files.append([[f.image[0, 0].tolist(), f.meta["file_frame"]] for f in src])
print(json.dumps({"files": files, "seen": seen}))
"""


def test_pydicom2_decodes_a_cine_one_frame_at_a_time(tmp_path: Path, pydicom2_tree: Path) -> None:
    # pydicom 2 (Python 3.8, JetPack 5) decoded every frame of a file at once (~1.4 GB for 1000 frames of
    # 800x600 RGB); run under pydicom 2 whatever is installed here (pydicom 3 decodes with iter_pixels)
    mono = np.stack([np.full((4, 6), 10 * i, np.uint16) for i in range(5)])
    rgb = np.stack([np.full((4, 6, 3), (i, 2 * i, 3 * i), np.uint8) for i in range(4)])
    native = write_dicom(tmp_path / "m.dcm", mono, bits_stored=12, window=(20, 41))
    color = write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB")
    rle = tmp_path / "r.dcm"
    ds = pydicom.dcmread(str(color))
    ds.compress(pydicom.uid.RLELossless)
    ds.save_as(str(rle))
    out = json.loads(run_under_pydicom2(pydicom2_tree, PYDICOM2_FRAMES, str(native), str(color), str(rle)))
    mono_frames, *colour_files = out["files"]
    assert [v for v, _ in mono_frames] == [3, 67, 131, 194, 255]  # LINEAR window 20/41
    for frames in colour_files:
        assert frames == [[[i, 2 * i, 3 * i], i] for i in range(4)]  # (first pixel, file_frame)
    assert out["seen"] and set(out["seen"]) == {1}, out["seen"]


def test_skipped_files_reach_the_source_stats(tmp_path: Path) -> None:
    """The run summary takes a source's counts from stats() only (pipeline: source_stats)."""
    write_dicom(tmp_path / "1.dcm", np.full((4, 4), 1, np.uint8), instance=1)
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / ".hidden.dcm").write_bytes(b"\0" * 10)
    write_dicom(tmp_path / "3.dcm", np.full((4, 4), 3, np.uint8), instance=3)
    with open_source(str(tmp_path), loop=True) as src:
        assert [src.read() is not None for _ in range(3)] == [True] * 3
        assert src.stats() == {"files": 2, "skipped": 2, "passes": 2}


def test_an_empty_dcm_file_in_a_series_is_an_error_not_skipped(tmp_path: Path) -> None:
    """A zero-byte .dcm is a copy that never got its bytes: cut short, so an error, as the docstring says."""
    bad = _series_with_a_damaged_file(tmp_path / "series")
    bad.write_bytes(b"")
    with pytest.raises(SourceError, match=r"DICOM file 1 of 3 \(\.dcm.* is empty \(0 bytes") as exc:
        open_source(str(tmp_path / "series"))
    assert "DOE" not in _one_line(exc) and "series" not in str(exc.value)
    with pytest.raises(SourceError, match=r"^DICOM file is empty \(0 bytes"):
        open_source(str(bad))


def test_a_header_value_in_a_pydicom_warning_never_reaches_stderr(tmp_path: Path) -> None:
    """pydicom's 'Unknown encoding' UserWarning quotes Specific Character Set verbatim (a name typed into it);
    a fresh interpreter, since warnings print once per place and pytest captures them."""
    import subprocess
    import sys
    import warnings

    p = write_dicom(tmp_path / "cs.dcm", np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(p)
    with warnings.catch_warnings():  # setting and saving it warns here too, quoting the made-up name into the CI log
        warnings.simplefilter("ignore")
        ds.SpecificCharacterSet = "ZYQUIST^ORVILLE"
        _save(ds, p)
    repo = str(Path(__file__).resolve().parents[2])
    code = (f"import sys; sys.path.insert(0, {repo!r})\n"
            "from edgeclf.runtime.sources import open_source\n"
            f"s = open_source({str(p)!r}); print(len(list(s))); s.close()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr[-300:]
    assert "ZYQUIST" not in proc.stderr, proc.stderr.strip()[:200]
