"""edgeclf.runtime.sources: hermetic tests (files made in tmp_path) and the real POCUS clip check."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import logging
import time
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="OpenCV (the 'cv' extra) is needed to read videos and images")

from edgeclf.errors import SourceError  # noqa: E402
from edgeclf.runtime import synthetic  # noqa: E402
from edgeclf.runtime.sources import (  # noqa: E402
    BaseSource,
    Frame,
    FrameSource,
    VideoFileSource,
    natural_key,
    open_source,
)
from tests.conftest import shared  # noqa: E402

W, H = 64, 48
RED_BGR = (0, 0, 255)


def _frames_bgr(n: int) -> list:
    """Frame 0 is pure red (BGR 0,0,255); the others are distinct gray levels."""
    out = [np.full((H, W, 3), RED_BGR, np.uint8)]
    out += [np.full((H, W, 3), 20 * i % 256, np.uint8) for i in range(1, n)]
    return out


def _write_video(path: Path, fourcc: str, n: int = 12, fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))
    assert writer.isOpened(), f"this OpenCV cannot write {fourcc} {path.suffix}"
    for f in _frames_bgr(n):
        writer.write(f)
    writer.release()
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


# ------------------------------------------------------------------------------------------- video


@pytest.mark.parametrize(
    ("fourcc", "name"), [("MJPG", "clip.avi"), ("mp4v", "clip.mp4"), ("mp4v", "CLIP.MP4")]
)
def test_video_roundtrip_count_and_rgb(tmp_path: Path, fourcc: str, name: str) -> None:
    path = _write_video(tmp_path / name, fourcc)
    with open_source(str(path)) as src:
        assert isinstance(src, FrameSource) and isinstance(src, VideoFileSource)
        assert (src.kind, src.live, src.frame_count, src.size) == ("video", False, 12, (W, H))
        assert src.fps == pytest.approx(10.0)
        frames = list(src)
        assert src.frames_read == 12
    assert [f.index for f in frames] == list(range(12))
    stamps = [f.timestamp for f in frames]
    assert stamps == sorted(stamps) and stamps[-1] <= time.monotonic()
    for f in frames:
        assert f.image.dtype == np.uint8 and f.image.shape == (H, W, 3) and f.image.flags.c_contiguous
        assert f.meta["source"] == "video" and f.meta["file_frame"] == f.index
        assert "clip" not in repr(f.meta).lower()  # no file names in meta
    r, g, b = frames[0].image.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60, "frame 0 was written pure red: the RGB conversion is wrong"
    assert [f.meta["pos_ms"] for f in frames] == pytest.approx([100.0 * i for i in range(12)])


def test_video_loop_restarts_and_keeps_counting(tmp_path: Path) -> None:
    path = _write_video(tmp_path / "loop.avi", "MJPG", n=5)
    with open_source(str(path), loop=True) as src:
        frames = list(itertools.islice(src, 12))
    assert [f.index for f in frames] == list(range(12))
    assert [f.meta["file_frame"] for f in frames] == [0, 1, 2, 3, 4] * 2 + [0, 1]
    assert [f.meta["pass"] for f in frames] == [0] * 5 + [1] * 5 + [2] * 2
    np.testing.assert_array_equal(frames[0].image, frames[5].image)


def test_video_size_resizes_frames(tmp_path: Path) -> None:
    path = _write_video(tmp_path / "s.avi", "MJPG", n=3)
    with open_source(str(path), size=(32, 24)) as src:
        assert src.size == (32, 24)
        assert {f.image.shape for f in src} == {(24, 32, 3)}


def _jpeg_starts(data: bytes) -> list:
    return [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]


def test_video_damaged_frame_mid_file_is_skipped_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write_video(tmp_path / "bad.avi", "MJPG", n=10)
    data = bytearray(path.read_bytes())
    soi = _jpeg_starts(bytes(data))
    assert len(soi) == 10
    data[soi[5] + 2 : soi[6] - 16] = bytes(soi[6] - 18 - soi[5])  # wipe frame 5's JPEG, not the AVI chunks
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="edgeclf.runtime.sources"), open_source(str(path)) as src:
        frames = list(src)
        assert src.frame_count == 10 and src.frames_read == 9 == len(frames)
        assert src.stats() == {"decoded": 9, "skipped": 1, "passes": 1}
    assert "frame 5 could not be decoded and was skipped" in caplog.text
    assert frames[5].image.mean() == pytest.approx(120, abs=8)  # frame 6 (gray 120) follows frame 4
    # file_frame is the index in the file: the frame after the skipped one keeps its own number
    assert [f.meta["file_frame"] for f in frames] == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_video_cut_short_ends_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_video(tmp_path / "cut.avi", "MJPG", n=10)
    data = path.read_bytes()
    path.write_bytes(data[: _jpeg_starts(data)[7] + 40])  # frame 7 cut in its headers, 8 and 9 gone
    with caplog.at_level(logging.WARNING, logger="edgeclf.runtime.sources"), open_source(str(path)) as src:
        assert len(list(src)) == 7 == src.frames_read
        claimed = src.frame_count
    assert f"decoding ended after 7 frames but the container claims {claimed}" in caplog.text


@pytest.mark.parametrize("content", [b"this is not a video\n" * 50, b""])
def test_not_a_video_renamed_mp4(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.mp4"
    path.write_bytes(content)
    with pytest.raises(SourceError) as exc:
        open_source(str(path))
    msg = _one_line(exc)
    # named by its kind and extension, never by its path (a PACS export's names carry the patient's)
    assert "notes" not in msg and str(tmp_path) not in msg and "the source video (.mp4)" in msg and ".avi" in msg


# ------------------------------------------------------------------------------------------ images


def _write(path: Path, image: np.ndarray) -> None:
    assert cv2.imwrite(str(path), image)


def test_gray_folder_natural_order_and_ignores_others(tmp_path: Path) -> None:
    for i in (10, 2, 1, 0):
        _write(tmp_path / f"Doe_Jane_{i}.png", np.full((H, W), i, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._Doe_Jane_3.png").write_bytes(b"macOS resource fork")  # hidden: ignored
    with open_source(str(tmp_path)) as src:
        assert (src.kind, src.frame_count, src.size, src.fps, src.live) == ("images", 4, (W, H), None, False)
        frames = list(src)
    assert [int(f.image[0, 0]) for f in frames] == [0, 1, 2, 10]
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert all(f.image.shape == (H, W) and f.image.dtype == np.uint8 for f in frames)
    meta = frames[3].meta
    assert meta["file_index"] == 3 and meta["ext"] == ".png" and meta["bit_depth"] == 8
    assert "doe" not in repr([f.meta for f in frames]).lower() and len(meta["name_hash"]) == 12


def test_natural_key() -> None:
    names = ["img10.png", "img2.png", "IMG1.png", "img2b.png", "a.png"]
    assert sorted(names, key=natural_key) == ["a.png", "IMG1.png", "img2.png", "img2b.png", "img10.png"]


def test_colour_images_are_rgb_and_gray_jpeg_stays_2d(tmp_path: Path) -> None:
    _write(tmp_path / "0.png", np.full((H, W, 3), RED_BGR, np.uint8))
    bgra = np.zeros((H, W, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 255, 128  # blue, half transparent
    _write(tmp_path / "1.png", bgra)
    _write(tmp_path / "2.jpg", np.full((H, W), 77, np.uint8))
    _write(tmp_path / "3.bmp", np.full((H, W, 3), (0, 255, 0), np.uint8))
    _write(tmp_path / "4.tiff", np.full((H, W), 200, np.uint8))
    frames = list(open_source(str(tmp_path)))
    assert [f.image.shape for f in frames] == [(H, W, 3), (H, W, 3), (H, W), (H, W, 3), (H, W)]
    assert tuple(frames[0].image[0, 0]) == (255, 0, 0)
    assert tuple(frames[1].image[0, 0]) == (0, 0, 255)  # alpha dropped, blue stays blue
    assert abs(int(frames[2].image[0, 0]) - 77) <= 2
    assert tuple(frames[3].image[0, 0]) == (0, 255, 0)
    assert [f.meta["ext"] for f in frames] == [".png", ".png", ".jpg", ".bmp", ".tiff"]


def test_16bit_png_scaled_to_8bit(tmp_path: Path) -> None:
    img = np.zeros((H, W), np.uint16)
    img[0, :3] = (0, 128 * 257, 65535)
    _write(tmp_path / "x.png", img)
    colour = np.full((H, W, 3), (0, 0, 65535), np.uint16)
    _write(tmp_path / "y.png", colour)
    frames = list(open_source(str(tmp_path)))
    assert frames[0].image.dtype == np.uint8 and frames[0].image.shape == (H, W)
    assert frames[0].image[0, :3].tolist() == [0, 128, 255]
    assert frames[0].meta["bit_depth"] == 16
    assert tuple(frames[1].image[0, 0]) == (255, 0, 0)


def test_unreadable_image_raises_naming_its_index(tmp_path: Path) -> None:
    for i in range(4):
        _write(tmp_path / f"f{i}.png", np.full((H, W), i, np.uint8))
    (tmp_path / "f2.png").write_bytes(b"broken")
    src = open_source(str(tmp_path))
    assert [int(src.read().image[0, 0]), int(src.read().image[0, 0])] == [0, 1]
    with pytest.raises(SourceError) as exc:
        src.read()
    msg = _one_line(exc)
    assert "image 2 of 4" in msg and "f2" not in msg
    src.close()
    (tmp_path / "f0.png").write_bytes(b"")  # the first file is checked when the source opens
    with pytest.raises(SourceError, match="image 0 of 4"):
        open_source(str(tmp_path))


def test_glob_pattern_and_single_file(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        _write(tmp_path / f"s{i}.png", np.full((H, W), i, np.uint8))
    _write(tmp_path / "s5.jpg", np.full((H, W), 5, np.uint8))
    frames = list(open_source(str(tmp_path / "s*.png")))
    assert [int(f.image[0, 0]) for f in frames] == [1, 2, 10]
    one = open_source(str(tmp_path / "s2.png"))
    assert one.frame_count == 1 and [int(f.image[0, 0]) for f in one] == [2]
    with pytest.raises(SourceError, match="matched nothing"):
        open_source(str(tmp_path / "*.tif"))


def test_empty_folder_and_dicom_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no image or DICOM files"):
        open_source(str(tmp_path))
    (tmp_path / "IM0001.dcm").write_bytes(b"\0" * 132)  # named .dcm, but not DICOM
    pytest.importorskip("pydicom", reason="pydicom (the 'dicom' extra) reads DICOM")
    with pytest.raises(SourceError, match="has no DICOM images .1 files skipped") as exc:
        open_source(str(tmp_path))
    _one_line(exc)


def test_image_loop(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / f"{i}.png", np.full((H, W), i, np.uint8))
    frames = list(itertools.islice(open_source(str(tmp_path), loop=True), 7))
    assert [int(f.image[0, 0]) for f in frames] == [0, 1, 2, 0, 1, 2, 0]
    assert [f.index for f in frames] == list(range(7))


# ------------------------------------------------------------------------------- errors, dispatch


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceError) as exc:
        open_source(str(missing))
    msg = _one_line(exc)
    assert "nope" not in msg and str(tmp_path) not in msg and "(.mp4) does not exist" in msg
    assert "synthetic:ultrasound" in msg


@pytest.mark.parametrize("uri", ["ftp://host/clip.mp4", "s3://bucket/clip.mp4", "webcam:0", "Doe:Jane.mp4"])
def test_unknown_scheme(uri: str) -> None:
    with pytest.raises(SourceError, match="unknown source scheme") as exc:
        open_source(uri)
    msg = _one_line(exc)
    scheme = uri.split(":")[0]
    assert uri not in msg and "clip" not in msg and "Jane" not in msg
    assert (f"'{scheme}:'" in msg) == (scheme != "Doe")  # a known scheme is named; other text before ':' is not


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("watch:/no/such/incoming", r"the watched folder \(watch:FOLDER\) does not exist"),
        ("scan.DCM", r"the source path given \(\.dcm\) does not exist"),
    ],
)
def test_watch_and_dicom_uris_dispatch(uri: str, match: str) -> None:
    """Streams, watched folders and DICOM are recognised (tests/runtime/test_sources_live.py and friends)."""
    with pytest.raises(SourceError, match=match) as exc:
        open_source(uri)
    assert "incoming" not in _one_line(exc) and "scan" not in _one_line(exc)


def test_unsupported_file_extension(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF")
    with pytest.raises(SourceError, match="unsupported extension '.pdf'"):
        open_source(str(path))


@pytest.mark.parametrize("uri", ["57", "/dev/video57"])
def test_camera_that_does_not_exist(uri: str) -> None:
    with pytest.raises(SourceError) as exc:
        open_source(uri)
    assert _one_line(exc) == (
        f"camera {uri} could not be opened: no such device or it is busy; "
        "list devices with `v4l2-ctl --list-devices`"
    )


@pytest.mark.parametrize("size", [(0, 10), (10,), (1.5, 2), "64x64", (True, 3)])
def test_bad_size(size: object) -> None:
    with pytest.raises(SourceError, match="width, height"):
        open_source("synthetic:ultrasound", size=size)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ base/protocol


def test_close_is_idempotent_and_context_manager(tmp_path: Path) -> None:
    path = _write_video(tmp_path / "c.avi", "MJPG", n=4)
    src = open_source(str(path))
    assert isinstance(src, BaseSource)
    assert src.read() is not None
    src.close()
    src.close()
    assert src.closed and src.read() is None and list(src) == []
    with open_source(str(path)) as src2:
        assert next(iter(src2)).index == 0
    assert src2.closed  # type: ignore[attr-defined]


def test_frame_is_frozen() -> None:
    frame = Frame(image=np.zeros((2, 2), np.uint8), index=0, timestamp=time.monotonic(), meta={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.index = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------------- synthetic


def test_synthetic_yields_the_whole_cine() -> None:
    cine = synthetic.UltrasoundCine()
    with open_source("synthetic:ultrasound") as src:
        assert (src.kind, src.live, src.frame_count) == ("synthetic", False, len(cine))
        assert src.fps == 30.0 and src.size == (256, 256)
        frames = list(src)
    assert len(frames) == len(cine)
    assert [f.index for f in frames] == list(range(len(cine)))
    stamps = [f.timestamp for f in frames]
    assert all(b >= a for a, b in zip(stamps, stamps[1:])) and stamps[-1] > stamps[0]
    for i in (0, len(cine) // 2, len(cine) - 1):
        assert frames[i].image.shape == (256, 256) and frames[i].image.dtype == np.uint8
        np.testing.assert_array_equal(frames[i].image, cine.frame(i))


def test_synthetic_query() -> None:
    src = open_source("synthetic:ultrasound?seed=1&size=64&fps=12.5&frames=7")
    assert (src.fps, src.size, src.frame_count) == (12.5, (64, 64), 7)
    frames = list(src)
    assert len(frames) == 7 and frames[0].meta["seed"] == 1
    assert [f.meta["label"] for f in frames] == [
        synthetic.UltrasoundCine(size=64, seed=1).label_at(i) for i in range(7)
    ]
    np.testing.assert_array_equal(frames[3].image, synthetic.UltrasoundCine(size=64, seed=1).frame(3))
    looped = list(itertools.islice(open_source("synthetic:ultrasound?frames=3&size=32", loop=True), 7))
    assert [f.meta["cine_frame"] for f in looped] == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize(
    "uri",
    [
        "synthetic:xray",
        "synthetic:ultrasound?seed=-1",
        "synthetic:ultrasound?frames=0",
        "synthetic:ultrasound?fps=fast",
        "synthetic:ultrasound?colour=1",
        "synthetic:ultrasound?seed",
        "synthetic:ultrasound?size=8",
    ],
)
def test_synthetic_bad_uri(uri: str) -> None:
    with pytest.raises(SourceError) as exc:
        open_source(uri)
    msg = _one_line(exc)
    assert uri in msg or uri.partition("?")[2] in msg  # names the URI or the bad option


# ------------------------------------------------------------------------------ real POCUS clips

# Files whose container's frame count (CAP_PROP_FRAME_COUNT, our `frame_count`) is not the number
# of frames they hold; every one decodes to exactly the clips.csv count, so the stream is right.
# - The five .mov have a QuickTime edit list that presents fewer samples than the track stores
#   (e.g. vid1: 145 samples of 100/6000 s, edit 14325/6000 s -> 144 shown; vid13 also starts the
#   edit at 590 ticks and has variable frame durations). OpenCV reports the stored sample count.
# - MPEG-PS (.mpeg) has no frame count: OpenCV estimates duration x fps, one or two frames short.
#   The last frame of each is flushed from the decoder without a timestamp (pos_ms None).
CLAIM_DIFFERS = {
    "covid19/Cov_denault_proposedUS_vid1.mov": 145,
    "covid19/Cov_denault_proposedUS_vid11.mov": 143,
    "covid19/Cov_denault_proposedUS_vid12.mov": 161,
    "covid19/Cov_denault_proposedUS_vid13.mov": 174,
    "covid19/Cov_denault_proposedUS_vid14.mov": 137,
    "regular/Reg_pat1Image_133138.mpeg": 260,
    "regular/Reg_pat1Image_133232.mpeg": 199,
    "regular/Reg_pat1Image_133410.mpeg": 182,
    "regular/Reg_pat2Image_133824.mpeg": 271,
    "regular/Reg_pat2Image_134348.mpeg": 207,
    "regular/Reg_pat2Image_134441.mpeg": 214,
    "regular/Reg_pat3Image_134711.mpeg": 216,
    "regular/Reg_pat3Image_134811.mpeg": 206,
    "regular/Reg_pat3Image_134904.mpeg": 245,
    "regular/Reg_pat3Image_135026.mpeg": 278,
    "regular/Reg_pat4Image_140024.mpeg": 436,
}


@pytest.mark.shared_data
@pytest.mark.slow
def test_pocus_clips_decode_to_the_listed_frames(caplog: pytest.LogCaptureFixture) -> None:
    pocus = shared("pocus", "clips.csv").parent  # honours EDGECLF_SHARED_DATA; skips, saying why, where it is absent
    with (pocus / "clips.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 91
    problems, claims = [], {}
    start = time.perf_counter()
    for row in rows:
        rel = row["file"]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgeclf.runtime.sources"), open_source(
            str(pocus / rel)
        ) as src:
            size = src.size
            fps = src.fps
            n, shapes, pos = 0, set(), []
            for frame in src:
                n += 1
                shapes.add(frame.image.shape)
                pos.append(frame.meta["pos_ms"])
            claim = src.frame_count
        expected = (int(row["frames"]), (int(row["width"]), int(row["height"])))
        if (n, size) != expected or shapes != {(expected[1][1], expected[1][0], 3)}:
            problems.append(f"{rel}: {n} frames {size} {shapes}, csv says {expected}")
        if fps is None or abs(fps - float(row["fps"])) > 0.0051:  # the csv rounds fps to 2 decimals
            problems.append(f"{rel}: fps {fps}, csv says {row['fps']}")
        known = [p for p in pos if p is not None]
        if known != sorted(known) or (
            None in pos and (not rel.endswith(".mpeg") or pos.index(None) != n - 1)
        ):
            problems.append(f"{rel}: pos_ms not increasing {pos[:3]}...{pos[-3:]}")
        if claim != n:
            claims[rel] = claim
        warned = "but the container claims" in caplog.text
        if warned != (claim is not None and claim > n):
            problems.append(f"{rel}: warning {warned} with {n} frames read, {claim} claimed")
    elapsed = time.perf_counter() - start
    assert not problems, "\n".join(problems)
    assert claims == CLAIM_DIFFERS
    logging.getLogger(__name__).info("decoded %d POCUS clips in %.1f s", len(rows), elapsed)


def test_a_folder_of_images_and_dicom_files_is_refused(tmp_path: Path) -> None:
    """A series with a preview.jpg used to open as one image, dropping the series without a word."""
    folder = tmp_path / "ZYQUIST^ORVILLE"
    folder.mkdir()
    dicm = b"\0" * 128 + b"DICM" + b"\0" * 16
    for name in ("IM0001", "IM0002", "IM0003.dcm"):  # modalities often write no extension
        (folder / name).write_bytes(dicm)
    cv2.imwrite(str(folder / "preview.jpg"), np.zeros((8, 8), np.uint8))
    (folder / "notes.txt").write_text("neither")
    with pytest.raises(SourceError, match="holds 1 image files and 3 DICOM files; .* point --source at one kind") as exc:
        open_source(str(folder))
    assert "\n" not in str(exc.value) and "ZYQUIST" not in str(exc.value)
    for name in ("IM0001", "IM0002", "IM0003.dcm"):
        (folder / name).unlink()
    with open_source(str(folder)) as src:  # images alone still open
        assert src.kind == "images" and src.frame_count == 1


def test_an_unreadable_folder_is_one_line_without_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    folder = tmp_path / "ZYQUIST^ORVILLE_QX48213"
    folder.mkdir()
    (folder / "IM0001.dcm").write_bytes(b"\0" * 132)
    real = os.listdir

    def listdir(path: str = ".") -> list:
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    opens = [open_source]
    if importlib.util.find_spec("pydicom") is not None:  # without it only open_source's path is checked
        from edgeclf.runtime.dicom import DicomSource

        opens.append(DicomSource)
    for open_ in opens:
        with pytest.raises(SourceError, match=r"could not be listed \(PermissionError: Permission denied\); .*permissions") as exc:
            open_(str(folder))
        assert "\n" not in str(exc.value) and "ZYQUIST" not in str(exc.value) and "QX48213" not in str(exc.value)


# ------------------------------------------------------------------- names OpenCV cannot take, TIFF


_OPEN_IN_A_CHILD = (
    "import os, sys\n"
    "sys.path.insert(0, {repo!r})\n"
    "from edgeclf.errors import SourceError\n"
    "from edgeclf.runtime.sources import open_source\n"
    "p = os.fsdecode({target!r})  # what sys.argv / click hand over for such a name\n"
    "try:\n"
    "    with open_source(p) as s:\n"
    "        print('frames', sum(1 for _ in s))\n"
    "except SourceError as e:\n"
    "    print('refused', e)\n"
)


@pytest.mark.parametrize("kind", ["video", "stream"])
def test_a_name_that_is_not_utf8_is_refused_not_a_crash(tmp_path: Path, kind: str) -> None:
    """OpenCV cannot convert a surrogate-escaped str (a Latin-1 name from a USB stick, from sys.argv) and
    kills the interpreter (SIGSEGV): run in a child so that a crash fails the test, not the session."""
    import os
    import subprocess
    import sys

    if kind == "video":
        target = os.path.join(os.fsencode(str(tmp_path)), b"clip\xe9.avi")  # 'clipé' in Latin-1
        os.replace(str(_write_video(tmp_path / "x.avi", "MJPG", n=5)), target)
    else:
        target = b"rtsp://127.0.0.1:1/cam\xe9ra"
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", _OPEN_IN_A_CHILD.format(repo=repo, target=target)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"the interpreter died with {proc.returncode}: {proc.stderr[-300:]}"
    out = proc.stdout.strip()
    assert out.startswith("refused") and "not valid UTF-8" in out and "rename" in out, out
    assert "\n" not in out and "\\udce9" not in out and "\udce9" not in out


def _multipage(path: Path, values: tuple) -> Path:
    assert cv2.imwritemulti(str(path), [np.full((8, 8), v, np.uint8) for v in values])
    return path


def test_a_multipage_tiff_is_refused_not_cut_to_its_first_page(tmp_path: Path) -> None:
    """A cine or stack saved as one TIFF used to give its first page only, with frame_count 1."""
    one = _multipage(tmp_path / "DOE_JANE.tif", (10, 20, 30))
    with pytest.raises(SourceError, match=r"image 0 of 1 \(\.tif.*has 3 pages; supported: single-page") as exc:
        open_source(str(one))
    assert "DOE" not in _one_line(exc) and "split" in str(exc.value)
    folder = tmp_path / "series"
    folder.mkdir()
    _write(folder / "a.png", np.zeros((8, 8), np.uint8))
    _multipage(folder / "b.tiff", (1, 2))
    src = open_source(str(folder))
    assert src.read() is not None
    with pytest.raises(SourceError, match=r"image 1 of 2 .* has 2 pages"):  # as an undecodable file: never skipped
        src.read()
    src.close()
    _write(tmp_path / "single.tif", np.full((8, 8), 7, np.uint8))
    assert [int(f.image[0, 0]) for f in open_source(str(tmp_path / "single.tif"))] == [7]


def _tiff(ifds: list, big_endian: bool = False) -> bytes:
    """A classic TIFF whose IFDs hold only NewSubfileType (254) with the given values (None: no such tag)."""
    import struct

    o = ">" if big_endian else "<"
    out = bytearray((b"MM" if big_endian else b"II") + struct.pack(o + "HI", 42, 8))
    for k, subfile in enumerate(ifds):
        entries = [] if subfile is None else [struct.pack(o + "HHII", 254, 4, 1, subfile)]
        nxt = 0 if k == len(ifds) - 1 else len(out) + 2 + 12 * len(entries) + 4
        out += struct.pack(o + "H", len(entries)) + b"".join(entries) + struct.pack(o + "I", nxt)
    return bytes(out)


def test_tiff_page_count_leaves_out_reduced_resolution_pages() -> None:
    from edgeclf.runtime.sources import _tiff_pages as tiff_pages

    assert tiff_pages(_tiff([None])) == 1
    assert tiff_pages(_tiff([None, None, 0])) == 3
    assert tiff_pages(_tiff([0, 1], big_endian=True)) == 1  # a page and its thumbnail: one image
    assert tiff_pages(b"\x89PNG\r\n\x1a\n" + b"\0" * 20) == 1  # not a TIFF
    looped = bytearray(_tiff([None, None]))
    looped[-4:] = (8).to_bytes(4, "little")  # the last IFD points back at the first
    assert tiff_pages(bytes(looped)) == 2
    assert tiff_pages(_tiff([None])[:12]) == 1  # cut short: what OpenCV decodes decides


def test_an_existing_folder_named_with_digits_is_a_folder_not_a_camera(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "20240101"  # a study date, an accession number
    folder.mkdir()
    _write(folder / "a.png", np.zeros((4, 4), np.uint8))
    monkeypatch.chdir(tmp_path)
    with open_source("20240101") as src:
        assert src.kind == "images" and src.frame_count == 1
