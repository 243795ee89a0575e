"""Synthetic phantoms: shapes, determinism, class separability, fan/text layout, cine coherence, mp4 output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from edgeclf.errors import ConfigError, DataError  # noqa: E402
from edgeclf.runtime import synthetic as syn  # noqa: E402
from edgeclf.runtime.synthetic import (  # noqa: E402
    ULTRASOUND_CLASSES,
    XRAY_FINDINGS,
    UltrasoundCine,
    default_timeline,
    make_ultrasound,
    make_xray,
    ultrasound_image,
    write_cine,
)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


# --------------------------------------------------------------------------------------------------
# ultrasound stills


def test_public_constants():
    assert ULTRASOUND_CLASSES == ("normal", "cyst", "mass")
    assert XRAY_FINDINGS == ("consolidation", "nodule", "effusion")
    assert set(syn.__all__) >= {
        "ULTRASOUND_CLASSES", "XRAY_FINDINGS", "ultrasound_image", "make_ultrasound",
        "make_xray", "default_timeline", "UltrasoundCine", "write_cine",
    }  # fmt: skip


def test_make_ultrasound_shapes_determinism_and_balance():
    x, y = make_ultrasound(30, size=64, seed=3)
    assert x.shape == (30, 64, 64) and x.dtype == np.uint8
    assert y.shape == (30,) and y.dtype == np.int64
    assert np.bincount(y, minlength=3).tolist() == [10, 10, 10]
    assert (y != np.arange(30) % 3).any(), "labels should be shuffled"
    x2, y2 = make_ultrasound(30, size=64, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, y3 = make_ultrasound(30, size=64, seed=4)
    assert not np.array_equal(x, x3)
    assert not np.array_equal(y, y3)
    _, y31 = make_ultrasound(31, size=64, seed=0)
    assert np.bincount(y31, minlength=3).tolist() == [11, 10, 10]
    empty, ye = make_ultrasound(0, size=64)
    assert empty.shape == (0, 64, 64) and ye.shape == (0,)
    # Frames differ from one another, not just between seeds.
    assert len({img.tobytes() for img in x}) == 30


def test_ultrasound_image_uses_the_generator():
    a = ultrasound_image(1, np.random.default_rng(7), size=96)
    b = ultrasound_image(1, np.random.default_rng(7), size=96)
    assert a.shape == (96, 96) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    rng = np.random.default_rng(7)
    first, second = ultrasound_image(1, rng), ultrasound_image(1, rng)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    "call",
    [
        lambda: ultrasound_image(3, np.random.default_rng(0)),
        lambda: ultrasound_image(-1, np.random.default_rng(0)),
        lambda: ultrasound_image(1, 0),  # type: ignore[arg-type]
        lambda: ultrasound_image(1, np.random.default_rng(0), size=16),
        lambda: make_ultrasound(-1),
        lambda: make_xray(4, size=8),
        lambda: UltrasoundCine([(0, 0)]),
        lambda: UltrasoundCine([(5, 10)]),
        lambda: UltrasoundCine([]),
        lambda: UltrasoundCine([(0,)]),  # type: ignore[list-item]
    ],
)
def test_bad_arguments_raise_config_error(call):
    with pytest.raises(ConfigError) as info:
        call()
    assert "\n" not in str(info.value)


def test_fan_is_black_outside_except_burned_in_text():
    rng = np.random.default_rng(11)
    for i in range(9):
        img, fan, text = syn._ultrasound(i % 3, rng, 128)
        assert not (text & fan).any(), "text must stay outside the fan"
        assert (img[~fan & ~text] == 0).all()
        assert text.sum() > 150, "scanner text is burned in"
        assert (img[text] > 100).sum() > 100
        assert img[fan].mean() > 30, "tissue is visible inside the fan"
        # Convex fan, apex at the top centre: it widens with depth and is centred.
        rows = np.nonzero(fan.any(axis=1))[0]
        top, bottom = rows[0], rows[-1]
        assert top < 0.12 * 128 and bottom > 0.6 * 128
        widths = fan.sum(axis=1)
        assert widths[top + 5] < widths[(top + bottom) // 2] < widths[bottom - 20]
        cols = np.nonzero(fan[(top + bottom) // 2])[0]
        assert abs((cols[0] + cols[-1]) / 2 - 63.5) < 3
        # 60-75 degree opening, measured from the fan edges at two depths.
        ys = [top + 20, bottom - 25]
        half_widths = [fan[y].sum() / 2.0 for y in ys]
        angle = math.degrees(2 * math.atan((half_widths[1] - half_widths[0]) / (ys[1] - ys[0])))
        assert 55 < angle < 80


def test_public_frames_have_text_in_corners_and_black_margins():
    x, _ = make_ultrasound(6, size=128, seed=5)
    for img in x:
        assert img[:14, :40].max() > 150  # acoustic indices, top left
        assert img[-14:, :40].max() > 150  # gain and depth, bottom left
        # Between the text and the fan, the frame is black: the bottom centre below the fan.
        assert img[-3:, 40:88].max() == 0


def _dark_features(images, fans):
    # Fraction of fan pixels that are anechoic (cyst) and hypoechoic (mass, shadow), gain-normalised.
    feats = []
    for img, fan in zip(images, fans):
        v = cv2.blur(img, (5, 5)).astype(np.float64)[fan]
        med = np.median(v)
        feats.append([(v < 0.25 * med).mean(), ((v >= 0.25 * med) & (v < 0.65 * med)).mean()])
    return np.asarray(feats)


def test_ultrasound_classes_are_separable_by_a_simple_feature():
    def data(n, seed):
        rng = np.random.default_rng(seed)
        out = [syn._ultrasound(i % 3, rng, 96) for i in range(n)]
        return _dark_features([o[0] for o in out], [o[1] for o in out]), np.arange(n) % 3

    f_train, y_train = data(90, 1)
    f_test, y_test = data(90, 2)
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-9
    centroids = np.stack([((f_train - mu) / sd)[y_train == c].mean(0) for c in range(3)])
    pred = (((f_test - mu) / sd)[:, None] - centroids[None]) ** 2
    pred = pred.sum(-1).argmin(1)
    per_class = [(pred[y_test == c] == c).mean() for c in range(3)]
    assert min(per_class) >= 0.7, per_class
    assert np.mean(per_class) >= 0.85, per_class
    # The direction of the difference is the anatomy: cysts are anechoic, masses hypoechoic.
    anechoic = [f_test[y_test == c, 0].mean() for c in range(3)]
    hypo = [f_test[y_test == c, 1].mean() for c in range(3)]
    assert anechoic[1] > 3 * anechoic[0] and anechoic[1] > anechoic[2]
    assert hypo[2] > 2 * hypo[0]
    # Global brightness alone does not give the class away (not a one-number trick).
    means = np.array([[img.mean()] for img in make_ultrasound(60, size=64, seed=9)[0]])
    _, labels = make_ultrasound(60, size=64, seed=9)
    spread = [means[labels == c].std() for c in range(3)]
    gaps = np.ptp([means[labels == c].mean() for c in range(3)])
    assert gaps < 2 * min(spread)


def test_lesions_are_large_and_inside_the_fan():
    rng = np.random.default_rng(0)
    for i in range(300):
        probe = syn._sample_probe(rng, 128)
        lesion = syn._sample_lesion(1 + i % 2, rng, 128)
        margin = 0.02 * 128 if i % 3 else 0.08 * 128  # stills, and cine with its probe motion
        cx, cy = syn._place_lesion(lesion, probe, rng, margin)
        assert lesion.radius >= 0.08 * 128
        r = math.hypot(cx - probe.ax, cy - probe.ay)
        th = math.atan2(cx - probe.ax, cy - probe.ay)
        assert probe.r0 + lesion.extent <= r <= probe.r1 - lesion.extent
        assert r * math.sin(probe.half - abs(th)) >= lesion.extent


# --------------------------------------------------------------------------------------------------
# chest X-ray


def test_make_xray_shapes_labels_and_determinism():
    x, y = make_xray(40, size=64, seed=1)
    assert x.shape == (40, 64, 64) and x.dtype == np.uint8
    assert y.shape == (40, 3) and y.dtype == np.uint8
    assert set(np.unique(y)) <= {0, 1}
    counts = y.sum(1)
    assert (counts == 0).mean() == pytest.approx(0.3)
    assert (counts == 1).any() and (counts >= 2).any() and (counts == 3).any()
    assert (y.sum(0) > 0).all()
    x2, y2 = make_xray(40, size=64, seed=1)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, y3 = make_xray(40, size=64, seed=2)
    assert not np.array_equal(x, x3) and not np.array_equal(y, y3)
    assert x.mean() > 40 and x.std() > 30  # a thorax, not a blank frame


@pytest.mark.parametrize("finding", [0, 1, 2])
def test_xray_finding_brightens_only_its_region(finding):
    kernel = np.ones((7, 7), np.uint8)
    for seed in range(3):
        none, regions = syn._xray([0, 0, 0], np.random.default_rng(seed), 128)
        on = [0, 0, 0]
        on[finding] = 1
        with_it, _ = syn._xray(on, np.random.default_rng(seed), 128)
        region = regions[finding]
        assert region.sum() > 0.0025 * 128 * 128  # nodule radius >= 5% of the frame
        diff = with_it.astype(np.int16) - none.astype(np.int16)
        near = cv2.dilate(region.astype(np.uint8), kernel) > 0
        assert (diff[~near] == 0).all(), "a finding changes nothing outside its region"
        assert diff[region].mean() > 15, "findings are opacities: brighter than the lung"


def test_xray_effusion_sits_at_a_lung_base_and_has_markers():
    _, regions = syn._xray([0, 0, 1], np.random.default_rng(4), 128)
    ys, _ = np.nonzero(regions[2])
    assert ys.mean() > 0.5 * 128
    x, _ = make_xray(5, size=128, seed=3)
    for img in x:
        assert img[:20, -20:].max() > 200  # the "L" side marker, top right
        assert img[:16, :60].max() > 200  # "PORTABLE"


# --------------------------------------------------------------------------------------------------
# cine


def test_default_timeline():
    tl = default_timeline()
    assert sum(k for _, k in tl) <= 300
    assert {lab for lab, _ in tl} == {0, 1, 2}
    assert tl[0][0] == 0 and tl[-1][0] == 0


def test_cine_labels_follow_the_timeline():
    cine = UltrasoundCine(size=64)
    tl = default_timeline()
    assert len(cine) == sum(k for _, k in tl)
    start = 0
    for lab, k in tl:
        assert [cine.label_at(i) for i in (start, start + k // 2, start + k - 1)] == [lab] * 3
        start += k
    with pytest.raises(ConfigError):
        cine.frame(len(cine))
    with pytest.raises(ConfigError):
        cine.label_at(-1)


def test_cine_frames_are_deterministic_in_any_order_and_loop():
    tl = [(0, 5), (2, 5)]
    a = UltrasoundCine(tl, size=64, seed=2)
    frames = list(a)
    assert len(frames) == 10 and frames[0].shape == (64, 64) and frames[0].dtype == np.uint8
    b = UltrasoundCine(tl, size=64, seed=2)
    assert np.array_equal(b.frame(7), frames[7])
    assert np.array_equal(b.frame(2), frames[2])
    c = UltrasoundCine(tl, size=64, seed=3)
    assert not np.array_equal(c.frame(2), frames[2])
    looped = UltrasoundCine(tl, size=64, seed=2, loop=True)
    it = iter(looped)
    got = [next(it) for _ in range(23)]
    assert np.array_equal(got[20], frames[0]) and np.array_equal(got[13], frames[3])
    assert looped.label_at(17) == 2 and np.array_equal(looped.frame(12), frames[2])


def test_cine_is_temporally_coherent_and_segments_differ():
    cine = UltrasoundCine(size=128, seed=0)
    fan = cine._probe.fan  # compare pixels inside the field of view only
    frames = {i: cine.frame(i) for i in (10, 11, 12, 30, 70, 71, 100, 160, 161)}
    for i in (10, 11, 70, 160):
        assert cine.label_at(i) == cine.label_at(i + 1)
        assert ncc(frames[i][fan], frames[i + 1][fan]) > 0.8
    # Different segments: a cyst frame vs a normal or a mass frame is far less alike.
    assert (cine.label_at(30), cine.label_at(70), cine.label_at(160)) == (0, 1, 2)
    assert ncc(frames[70][fan], frames[30][fan]) < 0.6
    assert ncc(frames[70][fan], frames[160][fan]) < 0.6
    feats = _dark_features([frames[30], frames[70], frames[160]], [fan] * 3)
    assert feats[1, 0] > 3 * feats[0, 0]  # the cyst is anechoic
    assert feats[2, 1] > 2 * feats[0, 1]  # the mass and its shadow are hypoechoic
    # The lesion stays put within its segment (slow drift only).
    dark = [(cv2.blur(frames[i], (5, 5)) < 20) & fan for i in (70, 100)]
    centres = [np.argwhere(d).mean(0) for d in dark]
    assert np.hypot(*(centres[0] - centres[1])) < 0.06 * 128


def test_write_cine_roundtrip(tmp_path):
    tl = [(0, 6), (1, 8), (2, 7)]
    path = tmp_path / "demo.mp4"
    meta = write_cine(path, timeline=tl, size=64, fps=15.0, seed=1)
    assert meta == {
        "fps": 15.0,
        "frames": 21,
        "size": [64, 64],
        "classes": list(ULTRASOUND_CLASSES),
        "segments": [
            {"label": "normal", "start": 0, "end": 6},
            {"label": "cyst", "start": 6, "end": 14},
            {"label": "mass", "start": 14, "end": 21},
        ],
    }
    assert json.loads((tmp_path / "demo.timeline.json").read_text()) == meta
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == 21
    assert frames[0].shape == (64, 64, 3)
    # Lossy, but the content is the cine's: compare with the generator's own frame.
    original = UltrasoundCine(tl, size=64, seed=1).frame(10)
    assert ncc(cv2.cvtColor(frames[10], cv2.COLOR_BGR2GRAY), original) > 0.8


def test_write_cine_rejects_bad_paths(tmp_path):
    with pytest.raises(ConfigError):
        write_cine(tmp_path / "demo.gif", timeline=[(0, 3)], size=64)
    with pytest.raises(DataError):
        write_cine(tmp_path / "missing" / "demo.mp4", timeline=[(0, 3)], size=64)
    with pytest.raises(ConfigError):
        write_cine(tmp_path / "demo.mp4", timeline=[(0, 3)], size=64, fps=0)
    with pytest.raises(ConfigError):
        write_cine(tmp_path / "demo.mp4", timeline=[(0, 3)], size=65)  # mp4v would crop it to 64
    assert not (tmp_path / "demo.mp4").exists()
