from __future__ import annotations

import numpy as np
import pytest

from edgeclf.errors import ConfigError
from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec


def spec(**kw):
    base = dict(channels=1, size=(32, 48), mean=(0.5,), std=(0.25,))
    base.update(kw)
    return PreprocessSpec(**base)


def test_gray_and_rgb_inputs_give_the_models_layout() -> None:
    p = Preprocessor(spec())
    gray = np.full((100, 80), 255, np.uint8)
    rgb = np.zeros((100, 80, 3), np.uint8)
    rgb[..., 0] = 255  # pure red -> luma 76
    x = p(gray)
    assert x.shape == (1, 1, 32, 48) and x.dtype == np.float32
    assert np.allclose(x, (1.0 - 0.5) / 0.25)
    assert np.allclose(p(rgb), (76 / 255 - 0.5) / 0.25, atol=1e-2)
    p3 = Preprocessor(spec(channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5)))
    x3 = p3(gray)
    assert x3.shape == (1, 3, 32, 48)
    assert np.allclose(x3[0, :, 0, 0], [(1 - 0.1) / 0.5, (1 - 0.2) / 0.5, (1 - 0.3) / 0.5])


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    p = Preprocessor(spec(size=(32, 32), resize="letterbox"))
    wide = np.full((50, 100), 200, np.uint8)
    g = p.geometry(wide)[:, :, 0]
    assert g.shape == (32, 32)
    assert (g[:8] == 0).all() and (g[-8:] == 0).all() and (g[8:24] == 200).all()


def test_fixed_roi_and_16_bit() -> None:
    img = np.zeros((60, 60), np.uint16)
    img[10:30, 20:40] = 65535
    p = Preprocessor(spec(size=(20, 20), roi={"mode": "fixed", "box": [20, 10, 20, 20]}))
    assert (p.geometry(img) == 255).all()
    with pytest.raises(ConfigError, match="outside"):
        Preprocessor(spec(roi={"mode": "fixed", "box": [100, 100, 5, 5]})).geometry(img)


@pytest.mark.parametrize("box", [
    [0, -20, 10, 10],  # wholly above the frame: y + h = -10 (a slice end counting from the bottom)
    [-30, 0, 10, 10],  # wholly left of it: x + w = -20
    [100, 0, 10, 10],  # wholly right of it
])
def test_a_roi_box_outside_the_frame_is_refused_not_read_from_the_far_edge(box: list) -> None:
    img = (np.arange(100 * 100) % 251).astype(np.uint8).reshape(100, 100)
    with pytest.raises(ConfigError, match="lies outside the 100x100 frame") as exc:
        Preprocessor(spec(size=(16, 16), roi={"mode": "fixed", "box": box})).geometry(img)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("box", [[0, 0, -5, 10], [0, 0, 10, 0], [0, 0, 10.5, 10], [0, 0, True, 10], ["0", 0, 10, 10]])
def test_a_roi_box_without_a_positive_integer_size_is_refused(box: list) -> None:
    with pytest.raises(ConfigError, match="w > 0 and h > 0"):
        spec(roi={"mode": "fixed", "box": box})


def test_a_roi_box_partly_outside_is_clipped_to_the_frame() -> None:
    img = (np.arange(100 * 100) % 251).astype(np.uint8).reshape(100, 100)
    # [x, y, w, h] = [-5, -4, 21, 12]: the part inside is img[0:8, 0:16], the model's size (no resize)
    out = Preprocessor(spec(size=(8, 16), roi={"mode": "fixed", "box": [-5, -4, 21, 12]})).geometry(img)
    np.testing.assert_array_equal(out[:, :, 0], img[0:8, 0:16])
    # Past the right and bottom edges likewise: img[92:100, 84:100]
    out = Preprocessor(spec(size=(8, 16), roi={"mode": "fixed", "box": [84, 92, 30, 30]})).geometry(img)
    np.testing.assert_array_equal(out[:, :, 0], img[92:100, 84:100])


def test_sector_is_recorded_only_when_true() -> None:
    plain = spec()
    assert "sector" not in plain.to_dict() and not plain.sector  # manifests without it stay byte-identical
    assert PreprocessSpec.from_dict(plain.to_dict()) == plain
    cropped = spec(sector=True)
    assert cropped.to_dict()["sector"] is True and PreprocessSpec.from_dict(cropped.to_dict()) == cropped
    with pytest.raises(ConfigError, match="sector is 'false'; allowed: true or false"):
        PreprocessSpec.from_dict({**plain.to_dict(), "sector": "false"})
    with pytest.raises(ConfigError, match="both sector and roi"):
        spec(sector=True, roi={"mode": "fixed", "box": [0, 0, 10, 10]})


def test_16_bit_uses_the_sources_rounding_not_a_shift() -> None:
    from edgeclf.runtime.sources import to_uint8

    img = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    img[0, :2] = (255, 383)  # a shift gives 0 and 1, rounding 1 and 1
    g = Preprocessor(spec(size=(32, 32))).geometry(img)[:, :, 0]
    np.testing.assert_array_equal(g, to_uint8(img))
    assert g[0, :2].tolist() == [1, 1]
    with pytest.raises(ConfigError, match="float32"):
        Preprocessor(spec()).geometry(img.astype(np.float32))


def test_spec_round_trip_and_validation() -> None:
    s = spec(resize="letterbox")
    assert PreprocessSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="channels"):
        spec(channels=2)
    with pytest.raises(ConfigError, match="resize"):
        spec(resize="crop")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['gamma'\]"):
        PreprocessSpec.from_dict({**s.to_dict(), "gamma": 2})
    with pytest.raises(ConfigError, match="mean/std"):
        spec(mean=(0.5, 0.5))


@pytest.mark.parametrize("channels", [1, 3])
def test_normalize_is_the_documented_formula_in_nchw(channels: int) -> None:
    rng = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406)[:channels], (0.229, 0.224, 0.225)[:channels]
    pre = Preprocessor(PreprocessSpec(channels=channels, size=(24, 32), mean=mean, std=std))
    batch = rng.integers(0, 256, (2, 24, 32, channels), dtype=np.uint8)
    got = pre.normalize(batch)
    want = ((batch / 255.0 - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2)
    assert got.dtype == np.float32 and got.shape == (2, channels, 24, 32) and got.flags.c_contiguous
    assert np.abs(got - want).max() < 1e-5


def test_interpolation_is_recorded_and_old_manifests_keep_area() -> None:
    spec = PreprocessSpec(channels=1, size=(32, 32), mean=(0.5,), std=(0.5,))
    assert spec.interpolation == "fast-area" and spec.to_dict()["interpolation"] == "fast-area"
    old = {k: v for k, v in spec.to_dict().items() if k != "interpolation"}
    assert PreprocessSpec.from_dict(old).interpolation == "area"
    with pytest.raises(ConfigError, match="interpolation"):
        PreprocessSpec(channels=1, size=(32, 32), mean=(0.5,), std=(0.5,), interpolation="cubic")


def test_fast_area_stays_close_to_area_on_a_smooth_image() -> None:
    yy, xx = np.mgrid[0:480, 0:640]
    img = ((np.sin(xx / 37.0) + np.cos(yy / 23.0)) * 60 + 128).astype(np.uint8)
    fast = Preprocessor(PreprocessSpec(channels=1, size=(224, 224), mean=(0.5,), std=(0.5,))).geometry(img)
    area = Preprocessor(PreprocessSpec(channels=1, size=(224, 224), mean=(0.5,), std=(0.5,), interpolation="area")).geometry(img)
    assert fast.shape == area.shape == (224, 224, 1)
    assert np.abs(fast.astype(int) - area.astype(int)).mean() < 1.5


def test_normalize_table_is_bit_identical_to_float32_multiply_add() -> None:
    # Every gray level in every channel, against the float32 chain it replaced (scale/std, then -mean/std).
    spec = PreprocessSpec(channels=3, size=(16, 16), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pre = Preprocessor(spec)
    levels = np.arange(256, dtype=np.uint8)
    batch = np.stack([np.roll(levels, 7 * k) for k in range(3)], axis=-1).reshape(1, 16, 16, 3)
    std = np.asarray(spec.std, np.float32)
    mul = (np.float32(spec.scale) / std).astype(np.float32)
    add = (-np.asarray(spec.mean, np.float32) / std).astype(np.float32)
    want = batch.astype(np.float32) * mul + add
    np.testing.assert_array_equal(pre.normalize(batch), want.transpose(0, 3, 1, 2))
