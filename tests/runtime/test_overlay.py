"""edgeclf.runtime.overlay: the banner draws on a copy, headless machines get a clear error, q/Esc stop."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pytest

from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime import overlay as overlay_mod
from edgeclf.runtime.overlay import (
    FpsMeter,
    OverlayWindow,
    display_problem,
    draw_overlay,
    draw_stale,
    latency_text,
    to_bgr,
)

cv2 = pytest.importorskip("cv2")

REC: Dict[str, Any] = {"frame": 3, "timestamp": 1.0, "label": "cyst", "abstain": False,
                       "probs": {"normal": 0.1, "cyst": 0.9}, "latency_ms": {"total": 23.4}}
ABSTAIN: Dict[str, Any] = {"frame": 4, "timestamp": 1.1, "label": None, "abstain": True,
                           "abstain_reason": "low_confidence", "probs": {"normal": 0.5, "cyst": 0.5}}


def _image(h: int = 480, w: int = 640, gray: bool = False) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(60, 200, size=(h, w) if gray else (h, w, 3), dtype=np.uint8)


def _banner_rows(h: int) -> int:
    return max(14, round(h * 0.075))


def test_overlay_draws_in_the_banner_on_a_copy() -> None:
    img = _image()
    keep = img.copy()
    out = draw_overlay(img, REC, fps=29.97)
    assert out.shape == img.shape and out.dtype == np.uint8 and out is not img
    np.testing.assert_array_equal(img, keep)  # the frame itself is untouched
    bh = _banner_rows(480)
    np.testing.assert_array_equal(out[bh:], img[bh:])  # below the banner: the image as it was
    banner = out[:bh].astype(int)
    assert np.mean(np.any(banner != img[:bh], axis=2)) > 0.9  # darkened and written on
    assert np.any(np.all(banner > 240, axis=2))  # white label text
    assert np.any((banner[..., 2] > 200) & (banner[..., 0] < 60))  # the confidence bar (RGB 0, 200, 255)


def test_overlay_orders_gray_and_abstain() -> None:
    img = _image()
    rgb = draw_overlay(img, REC, fps=30.0, now=1.05)  # the same moment: the same capture-to-display text
    bgr = draw_overlay(img, REC, fps=30.0, order="bgr", now=1.05)
    np.testing.assert_array_equal(bgr, rgb[..., ::-1])
    g = _image(gray=True)
    out = draw_overlay(g, ABSTAIN)
    assert out.shape == (480, 640, 3)
    bh = _banner_rows(480)
    np.testing.assert_array_equal(out[bh:], np.repeat(g[bh:, :, None], 3, axis=2))
    amber = (out[:bh, :, 0] > 200) & (out[:bh, :, 1] > 140) & (out[:bh, :, 2] < 80)  # RGB 255, 191, 0
    assert amber.sum() > 50
    np.testing.assert_array_equal(to_bgr(g), np.repeat(g[:, :, None], 3, axis=2))


def test_overlay_confidence_bar_follows_the_confidence() -> None:
    img = np.full((480, 640, 3), 128, np.uint8)

    def bar_pixels(conf: float) -> int:
        out = draw_overlay(img, {**REC, "confidence": conf})
        b = out[: _banner_rows(480)].astype(int)
        return int(((b[..., 2] > 200) & (b[..., 0] < 60)).sum())

    assert bar_pixels(0.0) == 0 < bar_pixels(0.3) < bar_pixels(0.9)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1), (16, 200, 3), (1080, 1920, 3)])
def test_overlay_any_frame_size(shape: tuple) -> None:  # type: ignore[type-arg]
    img = np.full(shape, 100, np.uint8)
    out = draw_overlay(img, REC, fps=25.0)
    assert out.shape == shape[:2] + (3,)
    multi = draw_overlay(img, {"label": None, "labels": ["a", "b"], "abstain": False})
    assert multi.shape == shape[:2] + (3,)


def test_overlay_bad_inputs() -> None:
    with pytest.raises(DataError, match="uint8"):
        draw_overlay(np.zeros((8, 8, 3), np.float32), REC)
    with pytest.raises(DataError, match="shape"):
        draw_overlay(np.zeros((8, 8, 4), np.uint8), REC)
    with pytest.raises(ConfigError, match="order"):
        draw_overlay(np.zeros((8, 8, 3), np.uint8), REC, order="hsv")


def test_fps_meter() -> None:
    m = FpsMeter()
    assert m.update(0.0) is None
    for i in range(1, 60):
        fps = m.update(i / 30)
    assert fps == pytest.approx(30.0, rel=1e-6)
    assert m.update(None) is not None  # no timestamp: the meter uses the clock


# ------------------------------------------------------------------------------------------- window


def test_no_display_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(overlay_mod.sys, "platform", "linux")
    with pytest.raises(ConfigError) as err:
        OverlayWindow()
    msg = str(err.value)
    assert msg.startswith("no display/GUI-capable OpenCV: DISPLAY") and msg.endswith("use --record FILE instead")
    assert "\n" not in msg


def test_headless_opencv_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    if overlay_mod._gui_backend(cv2) not in ("NONE", None):
        pytest.skip("this OpenCV has a GUI backend")
    monkeypatch.setenv("DISPLAY", ":99")
    assert display_problem() is not None and "GUI backend" in str(display_problem())
    with pytest.raises(ConfigError, match=r"^no display/GUI-capable OpenCV: .*GUI backend.*use --record FILE instead$"):
        OverlayWindow()
    # even if the build information were silent, the failing cv2 call becomes the same one-line error
    monkeypatch.setattr(overlay_mod, "display_problem", lambda: None)
    with pytest.raises(ConfigError, match=r"^no display/GUI-capable OpenCV: cv2 cannot open a window .*--record FILE"):
        OverlayWindow()


class _FakeGui:
    """Real cv2 for drawing; window calls recorded, keys scripted."""

    def __init__(self, keys: List[int], visible: Sequence[float] = (1.0,)) -> None:
        self.keys = list(keys)
        self.visible = list(visible)
        self.shown: List[np.ndarray] = []
        self.destroyed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(cv2, name)

    def namedWindow(self, title: str, flags: int) -> None:  # noqa: N802 (cv2's names)
        pass

    def imshow(self, title: str, img: np.ndarray) -> None:
        self.shown.append(img)

    def waitKey(self, ms: int) -> int:  # noqa: N802
        return self.keys.pop(0) if self.keys else -1

    def getWindowProperty(self, title: str, prop: int) -> float:  # noqa: N802
        return self.visible.pop(0) if len(self.visible) > 1 else self.visible[0]

    def destroyWindow(self, title: str) -> None:  # noqa: N802
        self.destroyed += 1


@pytest.mark.parametrize("key, reason", [(ord("q"), "key q"), (27, "key Esc")])
def test_window_shows_frames_and_stops_on_q_or_esc(monkeypatch: pytest.MonkeyPatch, key: int, reason: str) -> None:
    fake = _FakeGui([-1, -1, key])
    monkeypatch.setattr(overlay_mod._cv, "cv2", lambda: fake)
    monkeypatch.setattr(overlay_mod, "display_problem", lambda: None)
    with OverlayWindow("test") as win:
        assert win.needs_image and not win.stop_requested
        for i in range(3):
            win.write({**REC, "frame": i, "timestamp": i / 30}, image=_image(120, 160))
            assert win.stop_requested == (i == 2)
    assert win.written == 3 and win.stop_reason == reason and fake.destroyed == 1
    assert len(fake.shown) == 3 and fake.shown[0].shape == (120, 160, 3)
    win.close()  # idempotent
    assert fake.destroyed == 1
    with pytest.raises(ConfigError, match="closed"):
        win.write(REC, image=_image(8, 8))


def test_window_closed_by_the_user_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeGui([], visible=(1.0, 1.0, 0.0))
    monkeypatch.setattr(overlay_mod._cv, "cv2", lambda: fake)
    monkeypatch.setattr(overlay_mod, "display_problem", lambda: None)
    win = OverlayWindow()
    for _ in range(2):
        win.write(REC, image=_image(64, 64))
        assert not win.stop_requested
    win.write(REC, image=_image(64, 64))
    assert win.stop_requested and win.stop_reason == "window closed"
    # a backend that never reports the window as visible is not taken as closed
    blind = _FakeGui([], visible=(-1.0,))
    monkeypatch.setattr(overlay_mod._cv, "cv2", lambda: blind)
    other = OverlayWindow()
    for _ in range(3):
        other.write(REC, image=_image(64, 64))
    assert not other.stop_requested
    other.close()
    with pytest.raises(TypeError, match="image="):
        win.write(REC)
    win.close()


def test_the_overlay_latency_is_capture_to_display_measured_when_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    # A slow sink ahead of the display: the recorded total (capture-to-result, 23.4 ms) is too small; the overlay
    # measures now minus the capture timestamp itself, and says which figure it shows.
    assert latency_text(REC, now=1.25) == "cap-to-disp 250 ms"
    with monkeypatch.context() as m:  # without `now`: the monotonic clock (pinned, so no stall can move the figure)
        m.setattr(overlay_mod.time, "monotonic", lambda: 10.1)
        assert latency_text({**REC, "timestamp": 10.0}) == "cap-to-disp 100 ms"
    assert latency_text({"latency_ms": {"total": 23.4}}) == "cap-to-result 23 ms"  # no capture timestamp
    assert latency_text({**REC, "timestamp": 5.0}, now=1.0) == "cap-to-result 23 ms"  # another clock: not negative
    assert latency_text({}) is None
    img = _image()
    assert not np.array_equal(draw_overlay(img, REC, now=1.02), draw_overlay(img, REC, now=1.9))


def test_a_stale_frame_is_dimmed_and_says_no_signal() -> None:
    shown = draw_overlay(_image(), REC, now=1.02, order="bgr")
    stale = draw_stale(shown, 2.5, order="bgr")
    bh = _banner_rows(480)
    np.testing.assert_array_equal(stale[bh:], shown[bh:] >> 1)  # dimmed
    assert not np.any(np.all(stale[:bh] > 240, axis=2))  # the white label is gone
    amber = (stale[:bh, :, 2] > 200) & (stale[:bh, :, 1] > 140) & (stale[:bh, :, 0] < 80)  # BGR of 255, 191, 0
    assert amber.sum() > 50


def test_window_marks_the_last_frame_stale_until_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeGui([])
    monkeypatch.setattr(overlay_mod._cv, "cv2", lambda: fake)
    monkeypatch.setattr(overlay_mod, "display_problem", lambda: None)
    with OverlayWindow("test") as win:
        win.mark_stale(1.0)  # nothing shown yet: nothing to mark
        assert not fake.shown and not win.stale
        win.write(REC, image=_image(120, 160))
        win.mark_stale(0.7)
        assert win.stale and len(fake.shown) == 2 and win.written == 1
        np.testing.assert_array_equal(fake.shown[1][20:], fake.shown[0][20:] >> 1)
        win.write(REC, image=_image(120, 160))
        assert not win.stale and win.written == 2


def test_window_refresh_pumps_keys_without_redrawing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a watched folder's files no frame comes: refresh() lets the window see 'q' and closing."""
    fake = _FakeGui([-1, -1, ord("q")])
    monkeypatch.setattr(overlay_mod._cv, "cv2", lambda: fake)
    monkeypatch.setattr(overlay_mod, "display_problem", lambda: None)
    with OverlayWindow("test") as win:
        win.refresh()  # nothing shown yet: keys are read (no redraw, no visibility check), here none pressed
        assert fake.keys == [-1, ord("q")] and not fake.shown and not win.stop_requested
        win.write(REC, image=_image(120, 160))
        assert not win.stop_requested
        win.refresh()
        assert win.stop_requested and win.stop_reason == "key q"
        assert len(fake.shown) == 1 and win.written == 1  # refreshed, not redrawn nor counted as a frame
    empty = _FakeGui([ord("q")], visible=[0.0])  # an empty inbox: 'q' before any frame, a backend calling it invisible
    monkeypatch.setattr(overlay_mod._cv, "cv2", lambda: empty)
    with OverlayWindow("test") as win:
        win.refresh()
        assert win.stop_requested and win.stop_reason == "key q" and not empty.shown
    closed = _FakeGui([], visible=[1.0, 0.0])
    monkeypatch.setattr(overlay_mod._cv, "cv2", lambda: closed)
    with OverlayWindow("test") as win:
        win.write(REC, image=_image(120, 160))
        win.refresh()
        assert win.stop_requested and win.stop_reason == "window closed"


# ------------------------------------------------------------------------------------------- text placement


def _spy(monkeypatch: pytest.MonkeyPatch) -> List[Tuple[str, int, int]]:
    """Record (text, x_start, x_end) of every string the overlay draws."""
    calls: List[Tuple[str, int, int]] = []
    orig = cv2.putText

    def put(img: Any, text: str, org: Any, font: int, scale: float, color: Any, thick: int = 1, *a: Any) -> Any:
        (tw, _), _ = cv2.getTextSize(text, font, scale, thick)
        calls.append((text, int(org[0]), int(org[0]) + tw))
        return orig(img, text, org, font, scale, color, thick, *a)

    monkeypatch.setattr(overlay_mod._cv, "cv2", lambda: _Spy(put))
    return calls


class _Spy:
    def __init__(self, put: Any) -> None:
        self.putText = put  # noqa: N815 (cv2's name)

    def __getattr__(self, name: str) -> Any:
        return getattr(cv2, name)


@pytest.mark.parametrize("conf", [0.995, 0.996, 0.999])
def test_confidence_below_one_is_never_shown_as_100_percent(monkeypatch: pytest.MonkeyPatch, conf: float) -> None:
    calls = _spy(monkeypatch)
    draw_overlay(np.zeros((480, 640, 3), np.uint8), {"label": "pneumothorax", "abstain": False, "confidence": conf})
    texts = [t for t, _, _ in calls]
    assert "99%" in texts and "100%" not in texts, f"confidence {conf} drawn as {texts}"
    calls.clear()
    draw_overlay(np.zeros((480, 640, 3), np.uint8), {"label": "pneumothorax", "abstain": False, "confidence": 1.0})
    assert "100%" in [t for t, _, _ in calls]


SMALL_RECS = [
    {"label": "pneumothorax", "abstain": False, "confidence": 0.8, "timestamp": 0.0},
    {"label": None, "abstain": True, "abstain_reason": "low_confidence", "timestamp": 0.0},
]


@pytest.mark.parametrize("size", [128, 160, 256])
@pytest.mark.parametrize("rec", SMALL_RECS)
def test_label_not_overdrawn_by_fps_and_latency_on_small_frames(monkeypatch: pytest.MonkeyPatch, size: int,
                                                                 rec: Dict[str, Any]) -> None:
    calls = _spy(monkeypatch)
    draw_overlay(np.zeros((size, size), np.uint8), rec, fps=30.0, now=0.033)
    label = "pneumothorax" if rec["label"] else "ABSTAIN: low_confidence"
    assert label in [t for t, _, _ in calls]  # the label is always drawn, whole
    # one line of text: no two strings overlap, and every one lies inside the frame
    spans = sorted((x0, x1, t) for t, x0, x1 in calls)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"{size}x{size}: drawn over each other: {spans}"
    assert all(x0 >= 0 and x1 <= size for x0, x1, _ in spans), spans


def test_fps_and_latency_stay_in_full_where_there_is_room(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    draw_overlay(np.zeros((480, 640), np.uint8), {**REC, "timestamp": 0.0}, fps=30.0, now=0.033)
    assert [t for t, _, _ in calls] == ["cyst", "90%", "30.0 fps  cap-to-disp 33 ms"]
    calls.clear()  # at 128 px a short label leaves room for the latency alone, never a cut-off string
    draw_overlay(np.zeros((128, 128), np.uint8), {**REC, "timestamp": 0.0}, fps=30.0, now=0.033)
    texts = [t for t, _, _ in calls]
    assert "cyst" in texts and "30.0 fps  cap-to-disp 33 ms" not in texts


@pytest.mark.parametrize("size, idle", [(128, 2.0), (128, 125.3), (160, 2.0), (640, 2.0), (64, 2.0)])
def test_no_signal_text_fits_the_frame(monkeypatch: pytest.MonkeyPatch, size: int, idle: float) -> None:
    calls = _spy(monkeypatch)
    draw_stale(np.zeros((size, size, 3), np.uint8), idle)
    (text, x0, x1), = calls
    assert text.startswith("NO SIGNAL") and f"{idle:.1f} s" in text
    assert x0 >= 0 and x1 <= size, f"{text!r} spans x={x0}..{x1} on a {size} px frame: the idle time is cut off"
    if size >= 160:
        assert text == f"NO SIGNAL: no frame for {idle:.1f} s"
