"""edgeclf.runtime.sector: hermetic tests on synthetic cines, and IoU against fans placed by eye on real clips.

The real-clip references (tests/data/sector_refs.json) were drawn by looking at the frames, never
from the detector; see the file's "about".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="OpenCV (the 'cv' extra) is needed for sector detection")

from edgeclf.errors import ConfigError, DataError  # noqa: E402
from edgeclf.runtime.sector import (  # noqa: E402
    Sector,
    SectorConfig,
    SectorDetector,
    apply_sector,
    detect_sector,
)
from edgeclf.runtime.sources import open_source  # noqa: E402
from edgeclf.runtime.synthetic import UltrasoundCine  # noqa: E402
from tests.conftest import shared  # noqa: E402

REFS = Path(__file__).resolve().parents[1] / "data" / "sector_refs.json"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b)) / max(1, int(np.count_nonzero(a | b)))


def _raster(polygon: List[List[float]], w: int, h: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(polygon, np.float64)).astype(np.int32)], 1)
    return mask.astype(bool)


def _fan(cine: UltrasoundCine) -> np.ndarray:
    # The renderer's own field of view (the pixels it draws the image in): the ground truth.
    return cine._probe.fan


def _rect_frames(n: int, box: Tuple[int, int, int, int] = (60, 40, 260, 200)) -> List[np.ndarray]:
    """A linear-probe layout: live speckle in `box` of a 320x240 screen with static text around it."""
    cine = UltrasoundCine(size=256, seed=4)
    x0, y0, x1, y1 = box
    frames = []
    for i in range(n):
        f = np.zeros((240, 320), np.uint8)
        f[y0:y1, x0:x1] = cv2.resize(cine.frame(i)[70:150, 88:168], (x1 - x0, y1 - y0))
        cv2.putText(f, "L12-4  GAIN 50", (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 230, 1)
        cv2.putText(f, "4.0cm", (262, 232), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 200, 1)
        frames.append(f)
    return frames


# ---------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fan_found_locked_and_text_masked(seed: int) -> None:
    cine = UltrasoundCine(size=256, seed=seed)
    det = SectorDetector(warmup=8, recheck_every=30)
    for i in range(7):
        s = det.update(cine.frame(i))
        assert (s.kind, s.locked, s.bbox) == ("full", False, (0, 0, 256, 256))  # provisional
        assert not det.locked and det.sector is None
    s = det.update(cine.frame(7))
    assert s.locked and det.locked and s.kind == "fan"
    fan = _fan(cine)
    assert _iou(s.mask, fan) >= 0.95
    assert len(s.polygon) >= 8
    assert _iou(_raster([list(p) for p in s.polygon], 256, 256), s.mask) >= 0.99  # the polygon is the mask

    frame = cine.frame(20)
    text = (frame > 0) & ~fan  # burned-in UI: acoustic indices, depth ruler, frame counter
    assert np.count_nonzero(text) > 500
    out = apply_sector(frame, s)
    x0, y0, x1, y1 = s.bbox
    assert out.shape == (y1 - y0, x1 - x0)
    back = np.zeros_like(frame)
    back[y0:y1, x0:x1] = out
    assert np.count_nonzero(back[text]) == 0  # every text pixel is zeroed
    inside = s.mask & fan
    assert np.array_equal(back[inside], frame[inside])  # the image is untouched


def test_locked_sector_is_reused_without_looking_at_frames() -> None:
    cine = UltrasoundCine(size=128, seed=5, loop=True)
    det = SectorDetector(warmup=8, recheck_every=30)
    for i in range(8):
        locked = det.update(cine.frame(i))
    for _ in range(8, 37):  # up to the first check, frames are not even read
        assert det.update(np.zeros((128, 128), np.uint8)) is locked
    assert det.stats["checks"] == 0


@pytest.mark.parametrize("shape", [(2, 2, 3), (6, 6), (1, 50), (40, 2)])
def test_a_tiny_frame_gets_the_whole_frame_and_leaves_the_lock_alone(shape) -> None:
    # A frame with a side < 3 px raised a raw cv2.error (dilate of an empty subsampled mask) at the lock.
    from edgeclf.runtime.sector import MIN_DETECT_SIDE

    tiny = np.random.default_rng(0).integers(30, 200, size=shape, dtype=np.uint8)
    det = SectorDetector(warmup=2, recheck_every=1)
    for _ in range(4):
        s = det.update(tiny)
        assert s.kind == "full" and not s.locked and s.size == (shape[1], shape[0]) and min(shape[:2]) < MIN_DETECT_SIDE
        assert apply_sector(tiny, s) is tiny
    assert det.sector is None and det.stats["too_small"] == 4
    cine = UltrasoundCine(size=128, seed=5, loop=True)
    for i in range(8):
        locked = det.update(cine.frame(i))
    assert locked.locked and locked.kind == "fan"
    assert det.update(tiny).kind == "full"  # one thumbnail in the stream: no re-detection
    assert det.update(cine.frame(8)) is locked and det.stats["redetections"] == 0


def test_no_false_redetection_on_a_steady_stream() -> None:
    cine = UltrasoundCine(size=192, seed=6, loop=True)
    det = SectorDetector(warmup=8, recheck_every=20)
    first = None
    for i in range(300):
        s = det.update(cine.frame(i))
        first = first or (s if s.locked else None)
    assert det.sector is first
    st = det.stats
    assert st["checks"] >= 10 and st["redetections"] == 0 and st["false_alarms"] == 0 and st["detections"] == 1


def test_redetects_on_layout_change() -> None:
    a = UltrasoundCine(size=256, seed=0, loop=True)
    b = UltrasoundCine(size=256, seed=7, loop=True)  # another probe geometry: IoU with a's fan ~0.77
    det = SectorDetector(warmup=8, recheck_every=30)
    for i in range(90):
        det.update(a.frame(i))
    assert _iou(det.sector.mask, _fan(a)) >= 0.95
    seen_unlocked = False
    for i in range(90, 200):
        s = det.update(b.frame(i))
        seen_unlocked |= not s.locked
    assert seen_unlocked  # re-warming hands out the old sector, unlocked
    assert det.redetections == 1 and det.locked
    assert _iou(det.sector.mask, _fan(b)) >= 0.95


def test_smaller_layout_is_accepted_only_when_seen_three_times() -> None:
    a = UltrasoundCine(size=256, seed=1, loop=True)
    fan = _fan(a)
    probe = a._probe
    small = fan & (probe.r <= probe.r0 + 0.6 * (probe.r1 - probe.r0))  # the depth was reduced
    det = SectorDetector(warmup=8, recheck_every=20)
    for i in range(60):
        det.update(a.frame(i))
    old = det.sector
    deferred_at = None
    for i in range(60, 400):
        f = a.frame(i)
        f[fan & ~small] = 0
        det.update(f)
        if deferred_at is None and det.stats["deferred"]:
            deferred_at = i
            assert det.sector is old  # not trusted yet: the image is still inside the old sector
    assert deferred_at is not None
    assert det.redetections == 1
    assert _iou(det.sector.mask, small) >= 0.9


def test_rect_layout() -> None:
    frames = _rect_frames(8)
    s = detect_sector(frames)
    assert s is not None and s.kind == "rect" and not s.locked
    assert all(abs(got - want) <= 3 for got, want in zip(s.bbox, (60, 40, 260, 200)))
    out = apply_sector(frames[0], s)
    assert out.shape == (s.bbox[3] - s.bbox[1], s.bbox[2] - s.bbox[0])
    assert np.shares_memory(out, frames[0])  # a rect is a view
    assert len(s.polygon) == 4


def test_full_frame_and_black_stream() -> None:
    cine = UltrasoundCine(size=256, seed=2)
    full = [np.ascontiguousarray(cine.frame(i)[60:160, 80:180]) for i in range(8)]  # speckle everywhere
    s = detect_sector(full)
    assert s is not None and s.kind == "full"
    assert apply_sector(full[0], s) is full[0]

    det = SectorDetector(warmup=4)
    for _ in range(12):
        s = det.update(np.zeros((64, 80), np.uint8))
        assert s.kind == "full" and not s.locked
    assert det.stats["failed"] == 3 and det.sector is None
    assert detect_sector([np.zeros((64, 80), np.uint8)] * 4) is None


def test_fixed_roi_overrides_detection() -> None:
    cine = UltrasoundCine(size=256, seed=0)
    det = SectorDetector(roi=(10, 20, 200, 180))
    s = det.update(cine.frame(0))
    assert s.locked and det.locked and s.kind == "rect" and s.bbox == (10, 20, 200, 180)
    assert det.update(cine.frame(1)) is s
    out = apply_sector(cine.frame(1), s)
    assert out.shape == (160, 190)
    assert SectorDetector(roi=(100, 100, 999, 999)).update(cine.frame(0)).bbox == (100, 100, 256, 256)
    with pytest.raises(ConfigError, match="sector.roi"):
        SectorDetector(roi=(300, 300, 400, 400)).update(cine.frame(0))
    with pytest.raises(ConfigError, match="sector.roi"):
        SectorDetector(roi=(50, 10, 40, 90))


def test_rgb_frames_and_size_change() -> None:
    cine = UltrasoundCine(size=128, seed=3, loop=True)
    det = SectorDetector(warmup=6, recheck_every=10)
    for i in range(6):
        s = det.update(cv2.cvtColor(cine.frame(i), cv2.COLOR_GRAY2RGB))
    assert s.locked and s.kind == "fan"
    rgb = cv2.cvtColor(cine.frame(9), cv2.COLOR_GRAY2RGB)
    out = apply_sector(rgb, s)
    assert out.shape[2] == 3 and np.count_nonzero(out[~s.crop_mask.astype(bool)]) == 0
    big = UltrasoundCine(size=160, seed=3, loop=True)
    for i in range(8):
        s = det.update(big.frame(i))
    assert s.mask.shape == (160, 160) and s.locked and det.redetections == 1
    with pytest.raises(DataError, match="does not match"):
        apply_sector(cine.frame(0), s)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="sector.warmup"):
        SectorDetector(warmup=1)
    with pytest.raises(ConfigError, match="sector.recheck_every"):
        SectorConfig(recheck_every=-1)
    with pytest.raises(ConfigError, match="sector.min_area"):
        SectorConfig(min_area=1.5)
    with pytest.raises(ConfigError, match="unknown"):
        SectorConfig.from_dict({"warmup": 8, "depth": 3})
    cfg = SectorConfig.from_dict({"warmup": 12, "recheck_every": 0, "roi": [1, 2, 30, 40]})
    assert cfg.roi == (1, 2, 30, 40) and SectorConfig.from_dict(cfg.to_dict()) == cfg
    det = SectorDetector.from_config(cfg)
    assert det.config == cfg
    with pytest.raises(DataError, match="dtype"):
        SectorDetector().update(np.zeros((8, 8), np.float32))
    s = Sector.full(4, 3)
    assert s.to_dict() == {
        "kind": "full", "size": [4, 3], "bbox": [0, 0, 4, 3], "polygon": [[0, 0], [4, 0], [4, 3], [0, 3]],
        "locked": False, "area_fraction": 1.0,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------- real data


def _refs() -> List[dict]:
    return list(json.loads(REFS.read_text(encoding="utf-8"))["clips"])


def test_references_are_many_and_well_formed() -> None:
    refs = _refs()
    assert len(refs) >= 10
    for r in refs:
        w, h = r["size"]
        poly = np.asarray(r["polygon"], np.float64)
        assert len(poly) >= 8 and "by eye" in r["note"]
        assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= w and poly[:, 1].min() >= 0 and poly[:, 1].max() <= h
        assert 0.3 < np.count_nonzero(_raster(r["polygon"], w, h)) / (w * h) < 0.97


@pytest.mark.shared_data
@pytest.mark.parametrize("ref", _refs(), ids=lambda r: Path(r["clip"]).stem)
def test_iou_with_reference_fans(ref: dict) -> None:
    path = shared("pocus", *ref["clip"].split("/"))
    det = SectorDetector(warmup=8, recheck_every=30)
    with open_source(str(path)) as src:
        for k, frame in enumerate(src):
            s = det.update(frame.image)
            if k == ref["frame"]:
                assert list(frame.image.shape[1::-1]) == ref["size"]
            if s.locked:
                break
    assert s.locked and s.kind == "fan"
    w, h = ref["size"]
    iou = _iou(s.mask, _raster(ref["polygon"], w, h))
    assert iou >= 0.9, f"IoU {iou:.3f} with the reference fan of {ref['clip']}"


@pytest.mark.shared_data
@pytest.mark.parametrize("clip", [
    "regular/Reg_northumbria_1009_vid7.avi",
    # Known limitation: the lower right of this fan is dark during the warm-up and lights up only around frames
    # 56-64, between the periodic checks (every 30 frames), so the lock cuts it off (13% of its live pixels).
    pytest.param("regular/Reg_northumbria_1009_vid5.avi", marks=pytest.mark.xfail(strict=True, reason="fan cut off")),
])
def test_the_live_image_lies_inside_the_sector(clip: str) -> None:
    det = SectorDetector(warmup=8, recheck_every=30)
    frames = []
    with open_source(str(shared("pocus", *clip.split("/")))) as src:
        for frame in src:
            g = cv2.cvtColor(frame.image, cv2.COLOR_RGB2GRAY)
            det.update(g)
            frames.append(g)
    a = np.stack(frames).astype(np.int16)
    live = (a.max(0) >= 20) & (np.abs(np.diff(a, axis=0)).max(0) >= 8)  # bright and moving at some time
    assert det.sector is not None
    out = float(np.count_nonzero(live & ~det.sector.mask)) / np.count_nonzero(live)
    assert out < 0.05, f"{out:.1%} of the live pixels lie outside the sector (area {det.sector.area_fraction:.2f})"


def test_reset_starts_a_new_warm_up_and_keeps_the_counts() -> None:
    cine = UltrasoundCine(size=128, seed=0, loop=True)
    det = SectorDetector(warmup=8)
    assert det.update(cine.frame(0)) is not None and det.provisional  # the whole frame, before any lock
    for i in range(1, 8):
        s = det.update(cine.frame(i))
    assert s.locked and not det.provisional
    det.reset()
    s = det.update(cine.frame(8))
    assert not s.locked and s.kind == "full" and det.provisional and det.sector is None
    st = det.stats
    assert st["frames"] == 9 and st["detections"] == 1 and st["resets"] == 1
    for i in range(9, 16):
        s = det.update(cine.frame(i))
    assert s.locked and det.stats["detections"] == 2 and det.stats["redetections"] == 0  # a new lock, not a re-detection
