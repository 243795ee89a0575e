"""edgeclf.runtime.dicom pixel fidelity: data that a pydicom version decodes wrong or not at all frame by frame.

- signed monochrome pixels with BitsStored < BitsAllocated whose unused high bits are left zero (PS3.5 8.1.1
  allows it): pydicom 2.4 does not sign-extend them (stored -2048 read as 2048, shown white); pydicom 3 does.
  The helper and its use in DicomFile._raw_frames are tested under whatever pydicom is installed; the
  pydicom 2 path itself runs in a subprocess under pydicom 2.4 (tests/runtime/pydicom2.py installs it once a
  session).
- pydicom 3.0's iter_pixels cannot split a native YBR_FULL_422 cine nor a 1-bit cine whose frames do not end
  on a byte ("cannot reshape"); its pixel_array decodes both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Tuple

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) is needed to read DICOM")

from edgeclf.runtime import dicom as dicom_mod  # noqa: E402
from edgeclf.runtime.dicom import DicomFile, DicomSource  # noqa: E402
from tests.runtime.pydicom2 import pydicom2_tree_fixture, run_under_pydicom2  # noqa: E402, F401 - the fixture
from tests.runtime.test_dicom import PYDICOM3, _save, write_dicom  # noqa: E402


def _read(path: Path) -> np.ndarray:
    with DicomSource(str(path)) as src:
        return np.stack([f.image for f in src])


def _signed_12_of_16(frames: int) -> Tuple[np.ndarray, np.ndarray]:
    """(values, stored): random signed 12-bit values incl. -2048 and 2047, and the same in 16-bit samples
    with the high 4 bits left zero."""
    rng = np.random.default_rng(0)
    vals = rng.integers(-2048, 2048, (frames, 8, 8)).astype(np.int16)
    vals[0, 0, 0], vals[0, 0, 1] = -2048, 2047
    stored = (vals.astype(np.uint16) & 0x0FFF).view(np.int16)
    return vals, stored


def _expected_window(vals: np.ndarray) -> np.ndarray:
    # window C=0, W=4096 (LINEAR): -2048 -> 0 (black), 2047 -> 255 (white)
    return np.clip((vals.astype(float) + 0.5) / 4095.0 + 0.5, 0, 1) * 255


# ------------------------------------------------------------------------------------ sign extension


def test_fit_stored_sign_extends_signed_and_masks_unsigned() -> None:
    fit = dicom_mod._fit_stored
    vals = np.array([-2048, -1, 0, 1, 2047], np.int16)
    zero_high = (vals.astype(np.uint16) & 0x0FFF).view(np.int16)  # [2048, 4095, 0, 1, 2047]
    assert np.array_equal(fit(zero_high, 12, True), vals)
    assert np.array_equal(fit(vals, 12, True), vals)  # already extended (pydicom 3): unchanged
    got = fit(zero_high.view(np.uint16), 12, True)  # signed data handed over as unsigned samples
    assert got.dtype.kind == "i" and np.array_equal(got, vals)
    assert np.array_equal(fit(np.array([-8, 7, 0x70], np.int8), 4, True), [-8, 7, 0])
    assert np.array_equal(fit(np.array([0x7FFFFFFF], ">i4"), 31, True), [-1])  # byte order kept
    # unsigned: bits above BitsStored (old overlays) masked off; data within them unchanged
    u = np.array([0, 4095, 0xF000 | 5, 0xFFFF], np.uint16)
    assert np.array_equal(fit(u, 12, False), [0, 4095, 5, 4095])
    assert fit(u, 12, False).dtype == np.uint16
    # nothing to do: all bits stored, or not integer data
    assert fit(u, 16, False) is u
    f = np.array([1.5, -2.0])
    assert fit(f, 12, True) is f


def _not_extended(frames: Any) -> Iterator[Tuple[int, np.ndarray]]:
    """Frames as pydicom 2 decodes signed 12-of-16 data stored with zero high bits: not sign-extended."""
    for k, arr in frames:
        yield k, (arr.view(np.uint16) & 0x0FFF).view(np.int16) if arr.dtype == np.int16 else arr


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("window", [True, False])
def test_signed_data_not_sign_extended_by_the_decoder_is_extended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frames: int, window: bool
) -> None:
    """The decoder's frames stripped of their sign extension (as pydicom 2 leaves them): -2048 still black,
    with a window, and with the min-max range read over the whole file before the first frame."""
    vals, stored = _signed_12_of_16(frames)
    pix = stored if frames > 1 else stored[0]
    p = write_dicom(tmp_path / "s12.dcm", pix, bits_stored=12, signed=True, window=(0, 4096) if window else None)
    decode = DicomFile._v3_frames if PYDICOM3 else DicomFile._v2_frames
    monkeypatch.setattr(DicomFile, "_v3_frames" if PYDICOM3 else "_v2_frames",
                        lambda self, start: _not_extended(decode(self, start)))
    got = _read(p).astype(float)
    assert got.shape == (frames, 8, 8)
    if window:
        expected = _expected_window(vals)
    else:  # min-max over all frames: -2048 -> 0, 2047 -> 255
        expected = (vals.astype(float) + 2048) * (255.0 / 4095.0)
    assert got[0, 0, 0] == 0 and got[0, 0, 1] == 255
    assert np.abs(got - expected).max() <= 1.0


@pytest.mark.parametrize("signed", [True, False])
def test_correctly_stored_12_of_16_bits_unchanged(tmp_path: Path, signed: bool) -> None:
    """Data stored as the standard prefers (signed values sign-extended, unsigned with zero high bits)
    reads exactly as before under the installed pydicom."""
    vals, _ = _signed_12_of_16(2)
    pix = vals if signed else (vals.astype(np.int32) + 2048).astype(np.uint16)
    p = write_dicom(tmp_path / "ok.dcm", pix, bits_stored=12, signed=signed,
                    window=(0, 4096) if signed else (2048, 4096))
    got = _read(p).astype(float)
    assert np.abs(got - _expected_window(vals)).max() <= 1.0


SCRIPT = r"""
import sys, numpy as np
from edgeclf.runtime.dicom import DicomSource
with DicomSource(sys.argv[1]) as s:
    out = np.stack([f.image for f in s])
np.save(sys.argv[2], out)
"""


@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("window", [True, False])
def test_signed_12_of_16_bits_zero_high_bits_pydicom2(tmp_path: Path, pydicom2_tree: Path, frames: int,
                                                      window: bool) -> None:
    vals, stored = _signed_12_of_16(frames)
    pix = stored if frames > 1 else stored[0]
    p = write_dicom(tmp_path / "s12.dcm", pix, bits_stored=12, signed=True, window=(0, 4096) if window else None)
    out = tmp_path / "out.npy"
    run_under_pydicom2(pydicom2_tree, SCRIPT, str(p), str(out))
    got = np.load(out).astype(float)
    expected = _expected_window(vals) if window else (vals.astype(float) + 2048) * (255.0 / 4095.0)
    assert got[0, 0, 0] == 0, f"-2048 shown as {got[0, 0, 0]}"
    assert np.abs(got - expected).max() <= 1.0


# ------------------------------------------------------------------------------------ pydicom 3 iter_pixels

needs_pydicom3 = pytest.mark.skipif(not PYDICOM3, reason="pydicom 3 path (iter_pixels)")


@needs_pydicom3
@pytest.mark.parametrize("frames", [2, 3])
def test_native_ybr_full_422_cine_decodes_like_pydicom(tmp_path: Path, frames: int) -> None:
    from pydicom.pixels import convert_color_space

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (frames, 4, 6, 3), dtype=np.uint8)
    p = write_dicom(tmp_path / "ybr422_cine.dcm", rgb, photometric="YBR_FULL_422")
    ds = pydicom.dcmread(p)
    buf = b""
    for f in rgb:  # native YBR_FULL_422: Y0 Y1 Cb Cr per pixel pair (PS3.3 C.7.6.3.1.2), 2 bytes a pixel
        y = convert_color_space(f, "RGB", "YBR_FULL")
        cb = y[..., 1].reshape(4, 3, 2)[..., 0]
        cr = y[..., 2].reshape(4, 3, 2)[..., 0]
        buf += np.stack([y[..., 0][:, 0::2], y[..., 0][:, 1::2], cb, cr], -1).tobytes()
    ds.PixelData = buf
    _save(ds, p)
    ref = pydicom.dcmread(p).pixel_array  # pydicom's own decode: (frames, 4, 6, 3) RGB
    got = _read(p)
    assert got.shape == ref.shape == (frames, 4, 6, 3)
    assert np.array_equal(got, ref)
    # from a later frame too (a source resumed part way)
    with DicomSource(str(p)) as src:
        first = next(iter(src))
    assert np.array_equal(first.image, ref[0])
    one = DicomFile.probe(str(p))
    assert one is not None
    assert [k for k, _ in one._raw_frames(1)] == list(range(1, frames))


@needs_pydicom3
def test_single_frame_native_ybr_full_422_still_converted_alike(tmp_path: Path) -> None:
    """The single-frame path (iter_pixels) and the cine path give the same colour conversion."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    from pydicom.pixels import convert_color_space

    def pack(f: np.ndarray) -> bytes:
        y = convert_color_space(f, "RGB", "YBR_FULL")
        cb = y[..., 1].reshape(4, 3, 2)[..., 0]
        cr = y[..., 2].reshape(4, 3, 2)[..., 0]
        return bytes(np.stack([y[..., 0][:, 0::2], y[..., 0][:, 1::2], cb, cr], -1).tobytes())

    cine = write_dicom(tmp_path / "cine.dcm", rgb, photometric="YBR_FULL_422")
    ds = pydicom.dcmread(cine)
    ds.PixelData = pack(rgb[0]) + pack(rgb[1])
    _save(ds, cine)
    single = write_dicom(tmp_path / "one.dcm", rgb[1], photometric="YBR_FULL_422")
    ds = pydicom.dcmread(single)
    ds.PixelData = pack(rgb[1])
    _save(ds, single)
    assert np.array_equal(_read(cine)[1], _read(single)[0])


@needs_pydicom3
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 3, 5)])
def test_one_bit_cine_not_ending_on_a_byte_decodes_like_pydicom(tmp_path: Path, shape: Tuple[int, int, int]) -> None:
    from pydicom.pixels.utils import pack_bits

    rng = np.random.default_rng(4)
    mask = rng.integers(0, 2, shape).astype(np.uint8)  # 35 or 15 bits a frame
    p = write_dicom(tmp_path / "bit1.dcm", mask * 255)
    ds = pydicom.dcmread(p)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.NumberOfFrames = 1, 1, 0, shape[0]
    ds.PixelData = pack_bits(mask)
    _save(ds, p)
    assert np.array_equal(pydicom.dcmread(p).pixel_array, mask)
    got = _read(p)
    assert np.array_equal(got, mask * 255)
