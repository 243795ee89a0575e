"""Property-based tests of the frame sources: random bytes and damaged (truncated, bit-flipped) image,
video and DICOM files, and DICOM headers with random values, missing pixel data and wrong bit depths,
fed to open_source and read to the end (profiles: tests/_fuzz.py)."""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from edgeclf.runtime.sources import open_source
from tests._fuzz import check_error, time_limit

MAX_FRAMES = 64  # enough to reach the damage in any of the small files below


def _read_all(path: Path) -> int:
    """Open and read up to MAX_FRAMES frames: frames read, or the error checked (one-line EdgeclfError)."""
    with time_limit():
        try:
            with open_source(str(path)) as src:
                n = 0
                for frame in itertools.islice(src, MAX_FRAMES):
                    img = frame.image
                    assert img.dtype == np.uint8 and img.ndim in (2, 3) and min(img.shape[:2]) > 0
                    assert img.ndim == 2 or img.shape[2] == 3
                    n += 1
                return n
        except Exception as exc:
            check_error(exc)
            return -1


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    """A valid file truncated, bit-flipped, or both, or with garbage appended or inserted."""
    buf = bytearray(original)
    ops = draw(st.lists(st.sampled_from(["truncate", "flip", "flip", "append", "zero"]), min_size=1, max_size=3))
    for op in ops:
        if not buf:
            break
        if op == "truncate":
            buf = buf[: draw(st.integers(0, len(buf) - 1))]
        elif op == "flip":
            for _ in range(draw(st.integers(1, 8))):
                if buf:
                    buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
        elif op == "zero":
            start = draw(st.integers(0, len(buf) - 1))
            n = draw(st.integers(1, 256))
            buf[start:start + n] = bytes(len(buf[start:start + n]))
        else:
            buf += draw(st.binary(max_size=128))
    return bytes(buf)


# ------------------------------------------------------------------------------------------------ images

IMAGE_EXTS = [".png", ".jpg", ".bmp", ".tif"]


@pytest.fixture(scope="module")
def valid_images() -> Dict[str, bytes]:
    import cv2

    rng = np.random.default_rng(0)
    out = {}
    for ext, img in itertools.product(IMAGE_EXTS, (rng.integers(0, 255, (24, 32), np.uint8),
                                                   rng.integers(0, 255, (24, 32, 3), np.uint8),
                                                   rng.integers(0, 65535, (24, 32), np.uint16))):
        if img.dtype == np.uint16 and ext in (".jpg", ".bmp"):
            continue
        ok, buf = cv2.imencode(ext, img)
        assert ok
        out[f"{ext}-{img.ndim}-{img.dtype}"] = bytes(buf)
    return out


@given(data=st.data())
def test_any_damaged_or_random_image_file_fails_in_one_line(tmp_path_factory: pytest.TempPathFactory,
                                                            valid_images: Dict[str, bytes], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(valid_images) + ["random"]))
    ext = key.split("-")[0] if key != "random" else data.draw(st.sampled_from(IMAGE_EXTS))
    content = data.draw(st.binary(max_size=512)) if key == "random" else data.draw(damaged(valid_images[key]))
    path = tmp_path_factory.mktemp("img") / f"frame{ext}"
    path.write_bytes(content)
    n = _read_all(path)
    assert n in (-1, 1)
    if n == 1:
        path.unlink()  # keep the temporary folder small over thousands of examples


# ------------------------------------------------------------------------------------------------ videos

VIDEO_FORMATS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "mp4v"}


@pytest.fixture(scope="module")
def valid_videos(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, bytes]:
    import cv2

    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(1)
    out = {}
    for ext, fourcc in VIDEO_FORMATS.items():
        path = folder / f"v{ext}"
        vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (32, 24), True)
        assert vw.isOpened()
        for _ in range(8):
            vw.write(rng.integers(0, 255, (24, 32, 3), np.uint8))
        vw.release()
        out[ext] = path.read_bytes()
    return out


@given(data=st.data())
def test_any_damaged_or_random_video_file_fails_in_one_line(tmp_path_factory: pytest.TempPathFactory,
                                                            valid_videos: Dict[str, bytes], data: st.DataObject) -> None:
    ext = data.draw(st.sampled_from(sorted(VIDEO_FORMATS) + [".gif", ".mov", ".webm"]))
    if ext in valid_videos and data.draw(st.booleans()):
        content = data.draw(damaged(valid_videos[ext]))
    else:
        content = data.draw(st.binary(max_size=2048))
    path = tmp_path_factory.mktemp("vid") / f"clip{ext}"
    path.write_bytes(content)
    n = _read_all(path)
    assert n == -1 or 0 <= n <= MAX_FRAMES
    path.unlink()


# ------------------------------------------------------------------------------------------------- DICOM

try:
    import pydicom
except ImportError:  # pragma: no cover - the 'dicom' extra is not installed
    pydicom = None
needs_pydicom = pytest.mark.skipif(pydicom is None, reason="pydicom (the 'dicom' extra) is needed to read DICOM")

SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.4.50",  # JPEG baseline (the pixel data below is not JPEG: a decoder error)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.4.100",  # MPEG-2: video in DICOM
]
PHOTOMETRIC = ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "YBR_ICT", "CMYK", "", "HSV"]
small = st.integers(0, 70)
latin1 = st.characters(max_codepoint=255, blacklist_categories=("Cs",))  # what a DICOM default character set holds
number_text = st.one_of(st.integers(-5, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                        st.text(latin1, max_size=12), st.sampled_from(["", "1\\2", "0", "-1", "1e309", "NaN"]))


@st.composite
def dicom_headers(draw: st.DrawFn) -> Dict[str, Any]:
    rows = draw(st.one_of(small, st.sampled_from([0, 1, 65535])))
    cols = draw(st.one_of(small, st.sampled_from([0, 1, 65535])))
    bits = draw(st.sampled_from([0, 1, 8, 8, 12, 16, 16, 24, 32, 64]))
    samples = draw(st.sampled_from([0, 1, 1, 3, 4]))
    frames = draw(st.one_of(st.none(), st.integers(0, 6), st.sampled_from([2**31 - 1, 10**6])))
    h: Dict[str, Any] = {
        "Rows": rows, "Columns": cols, "BitsAllocated": bits,
        "BitsStored": draw(st.one_of(st.just(bits), st.integers(0, 64))),
        "HighBit": draw(st.integers(0, 64)), "PixelRepresentation": draw(st.sampled_from([0, 0, 1, 2])),
        "SamplesPerPixel": samples, "PhotometricInterpretation": draw(st.sampled_from(PHOTOMETRIC) | st.text(latin1, max_size=16)),
        "PlanarConfiguration": draw(st.sampled_from([0, 1, 2])),
    }
    if frames is not None:
        h["NumberOfFrames"] = str(frames)
    for key in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "FrameTime", "CineRate"):
        if draw(st.booleans()):
            h[key] = draw(number_text)
    if draw(st.booleans()):
        h["VOILUTFunction"] = draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS"]))
    if draw(st.integers(0, 4)) == 0:  # free text where names live
        h["PatientName"] = draw(st.text(latin1, max_size=80))
    expected = max(rows * cols * max(samples, 1) * max(bits, 1) // 8 * (frames if frames and frames < 8 else 1), 0)
    size = draw(st.sampled_from(["none", "exact", "short", "long", "random"]))
    if expected > 1 << 21 and size in ("exact", "short", "long"):
        size = "random"  # a huge header with a little data: the runtime must refuse it without allocating it
    if size == "exact":
        h["PixelData"] = bytes(draw(st.binary(min_size=min(expected, 64), max_size=min(expected, 64)))) + bytes(max(expected - 64, 0))
    elif size == "short":
        h["PixelData"] = bytes(max(expected - draw(st.integers(1, 64)), 0))
    elif size == "long":
        h["PixelData"] = bytes(expected + draw(st.integers(1, 64)))
    elif size == "random":
        h["PixelData"] = draw(st.binary(max_size=256))
    h["_syntax"] = draw(st.sampled_from(SYNTAXES) | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20))
    h["_damage"] = draw(st.sampled_from([None, None, "truncate", "flip"]))
    h["_preamble"] = draw(st.booleans())
    return h


def _write_dicom(path: Path, h: Dict[str, Any], data: st.DataObject) -> None:
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = h["_syntax"]
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128 if h["_preamble"] else None)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, "1.2.3.4", "US"
    big = h["_syntax"] == "1.2.840.10008.1.2.2"
    implicit = h["_syntax"] == "1.2.840.10008.1.2"
    try:
        for key, value in h.items():
            if key.startswith("_"):
                continue
            try:
                setattr(ds, key, value)
            except (ValueError, TypeError, OverflowError):
                # Text pydicom will not hold as a number: stored as LO, read back as IS/DS from implicit VR files.
                ds.add_new(pydicom.datadict.tag_for_keyword(key), "LO", str(value)[:64])
        if "PixelData" in ds and h["_syntax"] in SYNTAXES[4:]:  # compressed: fragments of (not really) JPEG data
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([h["PixelData"][:4096] or b"\0\0"])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        elif "PixelData" in ds:
            ds["PixelData"].VR = "OW" if h["BitsAllocated"] > 8 else "OB"
        if int(pydicom.__version__.split(".")[0]) >= 3:
            if big:  # pydicom writes big endian only when forced (and then not as a strict Part 10 file)
                pydicom.dcmwrite(str(path), ds, implicit_vr=False, little_endian=False, force_encoding=True)
            else:
                ds.save_as(str(path), enforce_file_format=h["_preamble"], implicit_vr=implicit, little_endian=True)
        else:  # pragma: no cover - pydicom 2
            ds.is_little_endian, ds.is_implicit_VR = not big, implicit
            ds.save_as(str(path), write_like_original=not h["_preamble"])
    except Exception:  # noqa: BLE001 - pydicom refuses to write some combinations: not a runtime input
        assume(False)
    if h["_damage"]:
        buf = bytearray(path.read_bytes())
        if h["_damage"] == "truncate" and buf:
            buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
        elif buf:
            for _ in range(data.draw(st.integers(1, 6))):
                buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(buf))


@needs_pydicom
@given(h=dicom_headers(), data=st.data())
def test_any_dicom_header_or_damage_fails_in_one_line(tmp_path_factory: pytest.TempPathFactory, h: Dict[str, Any],
                                                      data: st.DataObject) -> None:
    path = tmp_path_factory.mktemp("dcm") / "x.dcm"
    with warnings.catch_warnings():  # pydicom validates values as they are set and warns: not the runtime
        warnings.simplefilter("ignore")
        _write_dicom(path, h, data)
        n = _read_all(path)
    assert n == -1 or 0 < n <= MAX_FRAMES
    path.unlink()


@needs_pydicom
@given(content=st.binary(max_size=600), marker=st.booleans(), name=st.sampled_from(["x.dcm", "x.DICOM", "noext"]))
def test_random_bytes_as_dicom_fail_in_one_line(tmp_path_factory: pytest.TempPathFactory, content: bytes, marker: bool,
                                                name: str) -> None:
    if marker:  # past the preamble check, into the parser
        content = bytes(128) + b"DICM" + content
    path = tmp_path_factory.mktemp("dcmr") / name
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = _read_all(path)
    assert n == -1 or 0 < n <= MAX_FRAMES  # refused in one line, or frames read: never an empty success
