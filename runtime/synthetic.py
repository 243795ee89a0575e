"""Seeded synthetic phantoms: the embedded offline data that lets a new user run everything in a minute.

Three generators, all deterministic for a seed and free of any real patient data:

* B-mode ultrasound stills (``make_ultrasound``): convex-probe fan, speckle, depth attenuation,
  tissue layers, burned-in UI text outside the fan; classes ``normal``, ``cyst``, ``mass``.
* Chest X-ray-like stills (``make_xray``): a multilabel task over ``consolidation``, ``nodule``,
  ``effusion`` with burned-in markers.
* An ultrasound cine loop (``UltrasoundCine``, ``write_cine``) whose class changes over time, with a
  ground-truth timeline. It uses the same renderer as the stills, so a model trained on stills
  classifies cine frames.

These are phantoms for plumbing, demos and tests: nothing here is clinically meaningful.
numpy is the only import-time dependency; OpenCV is imported (via `_cv`) where it is needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import ConfigError, DataError
from edgeclf.runtime import _cv

__all__ = [
    "ULTRASOUND_CLASSES",
    "XRAY_FINDINGS",
    "ultrasound_image",
    "make_ultrasound",
    "make_xray",
    "default_timeline",
    "UltrasoundCine",
    "write_cine",
]

ULTRASOUND_CLASSES: Tuple[str, ...] = ("normal", "cyst", "mass")
XRAY_FINDINGS: Tuple[str, ...] = ("consolidation", "nodule", "effusion")

F32 = NDArray[np.float32]
U8 = NDArray[np.uint8]

_MIN_SIZE = 32
_MAX_SIZE = 4096
# Display mapping of the envelope: a square root stands in for log compression (cheaper, and
# close enough over the phantom's dynamic range); the small black level makes anechoic areas black.
_DISPLAY_REF = 2.6
_BLACK_LEVEL = 0.07
_FONT_SCALE_128 = 0.28

# X-ray label sets cycled like the ultrasound classes: 30% none, 30% one, 30% two, 10% all three.
_XRAY_PATTERN: Tuple[Tuple[int, int, int], ...] = (
    (0, 0, 0), (0, 0, 0), (0, 0, 0),
    (1, 0, 0), (0, 1, 0), (0, 0, 1),
    (1, 1, 0), (0, 1, 1), (1, 0, 1),
    (1, 1, 1),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# validation


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ConfigError(f"size must be an int, got {type(size).__name__}; pass e.g. size=128")
    if not _MIN_SIZE <= int(size) <= _MAX_SIZE:
        raise ConfigError(
            f"size={size} is out of range; allowed {_MIN_SIZE}..{_MAX_SIZE} pixels; pass e.g. size=128"
        )
    return int(size)


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 0:
        raise ConfigError(f"n={n!r} is not a count; allowed an int >= 0; pass e.g. n=600")
    return int(n)


def _check_label(label: int) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ConfigError(
            f"label must be an int, got {type(label).__name__}; "
            f"pass an index into ULTRASOUND_CLASSES {ULTRASOUND_CLASSES}"
        )
    if not 0 <= int(label) < len(ULTRASOUND_CLASSES):
        raise ConfigError(
            f"label={label} is not a class index; allowed 0..{len(ULTRASOUND_CLASSES) - 1} "
            f"for {ULTRASOUND_CLASSES}; pass one of those"
        )
    return int(label)


def _check_rng(rng: np.random.Generator) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
            "pass numpy.random.default_rng(seed)"
        )
    return rng


def _check_timeline(timeline: Optional[Sequence[Tuple[int, int]]]) -> List[Tuple[int, int]]:
    if timeline is None:
        return default_timeline()
    out: List[Tuple[int, int]] = []
    try:
        items = [(entry[0], entry[1], len(entry)) for entry in timeline]
    except (TypeError, IndexError, KeyError):
        raise ConfigError(
            "timeline must be a sequence of (label, n_frames) pairs; pass e.g. [(0, 45), (1, 60)]"
        ) from None
    for label, frames, width in items:
        if width != 2:
            raise ConfigError(
                "timeline entries must be (label, n_frames) pairs; pass e.g. [(0, 45), (1, 60)]"
            )
        lab = _check_label(label)
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or int(frames) < 1:
            raise ConfigError(
                f"timeline segment ({label}, {frames!r}) has a bad frame count; "
                "allowed an int >= 1; pass e.g. (1, 60)"
            )
        out.append((lab, int(frames)))
    if not out:
        raise ConfigError(
            "timeline is empty; allowed one or more (label, n_frames) pairs; pass e.g. [(0, 45)]"
        )
    return out


# ---------------------------------------------------------------------------------------------------
# ultrasound: probe geometry, tissue, lesions, speckle


@dataclass
class _Probe:
    """Convex-probe field of view and display settings, fixed for a still or for a whole cine."""

    size: int
    ax: float  # apex (the centre of the probe's curvature), above the top edge
    ay: float
    r0: float  # probe face radius: the curved top edge of the fan
    r1: float  # maximum imaging depth from the apex
    half: float  # half opening angle, radians
    r: F32  # per-pixel distance from the apex
    th: F32  # per-pixel beam angle, 0 straight down
    fan: NDArray[np.bool_]
    att: F32  # gain x depth attenuation x lateral roll-off, exactly 0 outside the fan
    sig_x: float  # speckle correlation lengths (px): lateral is longer, as in a real beam
    sig_y: float
    gain: float
    alpha: float


def _probe_geometry(
    size: int, ax: float, ay: float, r0: float, r1: float, half: float
) -> Tuple[F32, F32, NDArray[np.bool_]]:
    dx = np.arange(size, dtype=np.float32)[None, :] - np.float32(ax)
    dy = np.arange(size, dtype=np.float32)[:, None] - np.float32(ay)
    r = np.sqrt(dx * dx + dy * dy)
    th = np.arctan2(np.broadcast_to(dx, r.shape), np.broadcast_to(dy, r.shape))
    fan = (r >= r0) & (r <= r1) & (np.abs(th) <= half)
    return r, th, fan


def _sample_probe(rng: np.random.Generator, size: int) -> _Probe:
    s = float(size)
    half = math.radians(rng.uniform(30.0, 37.5))  # 60-75 degree convex fan
    ay = rng.uniform(-0.12, -0.04) * s
    r0 = -ay + rng.uniform(0.035, 0.07) * s
    # The outer arc must fit the frame both at the bottom and at the lateral corners.
    r1 = min(0.975 * s - ay, 0.48 * s / math.sin(half)) * rng.uniform(0.93, 1.0)
    ax = s / 2.0 + rng.uniform(-0.01, 0.01) * s
    gain = rng.uniform(0.75, 1.3)
    alpha = rng.uniform(0.35, 1.1)
    r, th, fan = _probe_geometry(size, ax, ay, r0, r1, half)
    depth = np.clip((r - np.float32(r0)) * np.float32(1.0 / (r1 - r0)), 0.0, 1.0)
    lat2 = (th * np.float32(1.0 / half)) ** 2  # float32 ** 6 takes the slow pow() path: multiply instead
    att = np.exp(depth * np.float32(-alpha)) * (1.0 - np.float32(0.3) * lat2 * lat2 * lat2) * np.float32(gain)
    att[~fan] = 0.0
    scale = s / 128.0
    return _Probe(
        size=size, ax=ax, ay=ay, r0=r0, r1=r1, half=half, r=r, th=th, fan=fan, att=att,
        sig_x=rng.uniform(0.8, 1.1) * scale, sig_y=rng.uniform(0.5, 0.65) * scale,
        gain=gain, alpha=alpha,
    )  # fmt: skip


@dataclass
class _Layers:
    """Horizontal tissue layers (skin, fat, muscle, organ...) with gently wavy interfaces."""

    bounds: NDArray[np.float64]  # interface depths, frame fraction
    values: NDArray[np.float64]  # echogenicity above each interface and below the last
    wave_amp: NDArray[np.float64]
    wave_freq: NDArray[np.float64]
    wave_phase: NDArray[np.float64]
    line_gain: NDArray[np.float64]  # bright specular reflection at each interface
    striation: float
    texture: F32  # coarse grid of slow echogenicity variation, upsampled at render


def _sample_layers(rng: np.random.Generator, top: float) -> _Layers:
    n = int(rng.integers(3, 6))
    # Thin bright skin line, then layers of decreasing thickness variability down to the organ.
    gaps = rng.uniform(0.05, 0.16, size=n)
    gaps[0] = rng.uniform(0.03, 0.05)
    bounds = top + np.cumsum(gaps)
    # Alternate darker and brighter layers (fat, muscle, fascia...) so the layering reads at 64 px.
    values = np.where(
        np.arange(n + 1) % 2 == 1, rng.uniform(0.35, 0.55, size=n + 1), rng.uniform(0.6, 0.9, size=n + 1)
    )
    values[0] = rng.uniform(0.8, 0.95)
    return _Layers(
        bounds=bounds, values=values,
        wave_amp=rng.uniform(0.0, 0.02, size=n), wave_freq=rng.uniform(2.0, 7.0, size=n),
        wave_phase=rng.uniform(0.0, 2 * math.pi, size=n), line_gain=rng.uniform(0.3, 0.9, size=n),
        striation=float(rng.uniform(0.0, 0.15)),
        texture=rng.normal(0.0, 0.1, size=(7, 7)).astype(np.float32),
    )  # fmt: skip


def _tissue_map(xs: F32, ys: F32, layers: _Layers, size: int) -> F32:
    """Echogenicity on the grid of 1-D pixel coordinates `xs` (columns) x `ys` (rows).

    The stills pass the frame grid; the cine passes a larger grid that the probe drifts over.
    """
    cv2 = _cv.cv2()

    s = np.float32(size)
    u = xs / s
    v = (ys / s)[:, None]
    n = len(layers.bounds)
    # Interfaces depend on x only: evaluate the waves on one row, not on every pixel.
    bounds = [
        np.float32(layers.bounds[k])
        + np.float32(layers.wave_amp[k])
        * np.sin(np.float32(layers.wave_freq[k]) * u + np.float32(layers.wave_phase[k]))
        for k in range(n)
    ]
    idx = np.zeros((len(ys), len(xs)), dtype=np.intp)
    for b in bounds:
        idx += v >= b[None, :]
    echo = layers.values.astype(np.float32)[idx]
    width = np.float32(0.8 / 128.0)  # specular line width (sigma), frame fraction
    for k, b in enumerate(bounds):
        # Bright specular line at each interface, computed only in the rows it can reach.
        lo = int(np.searchsorted(ys / s, float(b.min()) - 4 * width))
        hi = int(np.searchsorted(ys / s, float(b.max()) + 4 * width))
        if hi > lo:
            d = (v[lo:hi] - b[None, :]) / width
            echo[lo:hi] += np.float32(layers.line_gain[k]) * np.exp(np.float32(-0.5) * d * d)
    if layers.striation > 0:
        echo *= 1.0 + np.float32(layers.striation) * np.sin(
            np.float32(2 * math.pi * 9.0) * (v + np.float32(0.15) * u[None, :])
        )
    tex = cv2.resize(layers.texture, (len(xs), len(ys)), interpolation=cv2.INTER_CUBIC)
    echo *= 1.0 + tex
    return echo


def _complex_speckle(rng: np.random.Generator, h: int, w: int, sig_x: float, sig_y: float) -> F32:
    """Blurred complex Gaussian field (h, w, 2) scaled so that its magnitude has mean 1.

    The magnitude of a band-limited complex Gaussian is fully developed speckle (Rayleigh); keeping the
    complex field lets the cine mix fresh noise into a drifting field without changing its statistics.
    """
    cv2 = _cv.cv2()

    field = rng.standard_normal(size=(h, w, 2), dtype=np.float32)
    field = np.asarray(cv2.GaussianBlur(field, (0, 0), sigmaX=sig_x, sigmaY=sig_y), dtype=np.float32)
    kx = cv2.getGaussianKernel(2 * int(math.ceil(3 * sig_x)) + 1, sig_x)
    ky = cv2.getGaussianKernel(2 * int(math.ceil(3 * sig_y)) + 1, sig_y)
    std = math.sqrt(float((kx**2).sum() * (ky**2).sum()))
    return (field * np.float32(1.0 / (std * math.sqrt(math.pi / 2.0)))).astype(np.float32)


@dataclass
class _Lesion:
    kind: int  # 1 cyst, 2 mass
    radius: float  # mean radius, px
    extent: float  # bounding radius used to keep the lesion inside the fan
    aspect: float
    angle: float
    level: float  # echogenicity inside, relative to the tissue
    post: float  # posterior factor: > 1 enhancement (cyst), < 1 shadowing (mass)
    post_decay: float  # px
    harm_amp: NDArray[np.float64]  # border irregularity (mass)
    harm_phase: NDArray[np.float64]
    spike_angle: NDArray[np.float64]
    spike_height: NDArray[np.float64]
    het_freq: NDArray[np.float64]
    het_phase: NDArray[np.float64]
    edge: float  # border softness, px
    halo: float  # echogenic rim gain (mass)


def _sample_lesion(kind: int, rng: np.random.Generator, size: int) -> _Lesion:
    s = float(size)
    radius = rng.uniform(0.09, 0.13) * s
    aspect = rng.uniform(1.0, 1.35)
    if kind == 1:
        harm_amp = np.zeros(0)
        harm_phase = np.zeros(0)
        spike_angle = np.zeros(0)
        spike_height = np.zeros(0)
        level = rng.uniform(0.01, 0.04)
        post = rng.uniform(1.5, 2.0)
        post_decay = rng.uniform(0.3, 0.6) * s
        edge = rng.uniform(0.8, 1.4) * s / 128.0
        extent = radius * math.sqrt(aspect)
        halo = 0.0
    else:
        # Lobulated outline (decaying harmonics 2..6) plus thin spicules radiating from the border.
        harm_amp = rng.uniform(0.02, 0.12, size=5) / np.arange(1, 6) ** 0.5
        harm_phase = rng.uniform(0.0, 2 * math.pi, size=5)
        n_spikes = int(rng.integers(6, 12))
        spike_angle = rng.uniform(-math.pi, math.pi, size=n_spikes)
        spike_height = rng.uniform(0.2, 0.55, size=n_spikes)
        level = rng.uniform(0.15, 0.35)
        post = rng.uniform(0.25, 0.55)
        post_decay = 1e6
        edge = rng.uniform(0.4, 0.7) * s / 128.0
        extent = radius * math.sqrt(aspect) * 1.2
        halo = rng.uniform(0.2, 0.6)
    return _Lesion(
        kind=kind, radius=radius, extent=extent, aspect=aspect, angle=rng.uniform(0, math.pi),
        level=level, post=post, post_decay=post_decay, harm_amp=harm_amp, harm_phase=harm_phase,
        spike_angle=spike_angle, spike_height=spike_height,
        het_freq=rng.uniform(0.08, 0.2, size=2) * 128.0 / s, het_phase=rng.uniform(0, 2 * math.pi, size=2),
        edge=edge, halo=halo,
    )  # fmt: skip


def _place_lesion(
    lesion: _Lesion, probe: _Probe, rng: np.random.Generator, margin: float
) -> Tuple[float, float]:
    """Centre (x, y) such that the lesion plus `margin` px stays inside the fan with room below it."""
    post_room = 0.07 * probe.size
    for _ in range(64):
        e = lesion.extent + margin
        lo = probe.r0 + e
        hi = probe.r1 - e - post_room
        if hi > lo:
            rc = rng.uniform(lo, hi)
            th_max = probe.half - math.asin(min(1.0, e / rc))
            if th_max > 0:
                thc = rng.uniform(-th_max, th_max)
                return probe.ax + rc * math.sin(thc), probe.ay + rc * math.cos(thc)
        # Shallow wide fans cannot hold every lesion size: shrink it and try again.
        lesion.radius *= 0.95
        lesion.extent *= 0.95
    rc = 0.5 * (probe.r0 + probe.r1)  # unreachable for the geometry ranges above
    return probe.ax, probe.ay + rc


def _apply_lesion(echo: F32, probe: _Probe, lesion: _Lesion, cx: float, cy: float) -> None:
    """Multiply the lesion and its posterior enhancement or shadow into `echo` (frame coordinates)."""
    size = probe.size
    # Posterior effect: a wedge along the beam lines that pass through the lesion, behind it.
    rc = math.hypot(cx - probe.ax, cy - probe.ay)
    thc = math.atan2(cx - probe.ax, cy - probe.ay)
    lateral = lesion.radius * 0.85
    w = math.asin(min(0.99, lateral / rc))
    y0 = max(0, int(cy - lesion.extent))
    r = probe.r[y0:]
    dth = np.abs(probe.th[y0:] - np.float32(thc))
    ang = np.clip((np.float32(w) - dth) * r / np.float32(1.5 * size / 128.0) + 0.5, 0.0, 1.0)
    # Ramp in across the distal border so the lesion body keeps its own echo level.
    dep = np.clip((r - np.float32(rc + 0.6 * lesion.radius)) / np.float32(0.5 * lesion.radius), 0.0, 1.0)
    if lesion.post_decay < 1e5:
        dep = dep * np.exp(-np.maximum(r - np.float32(rc), 0.0) / np.float32(lesion.post_decay))
    echo[y0:] *= 1.0 + np.float32(lesion.post - 1.0) * ang * dep

    # Lesion body, computed in its bounding box only (keeps cine frames cheap).
    e = lesion.extent * 1.5 + 2 * lesion.edge + 2
    x0, x1 = max(0, int(cx - e)), min(size, int(cx + e) + 1)
    y0, y1 = max(0, int(cy - e)), min(size, int(cy + e) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    ca, sa = math.cos(lesion.angle), math.sin(lesion.angle)
    u = (dx * ca + dy * sa) / np.float32(math.sqrt(lesion.aspect))
    v = (-dx * sa + dy * ca) * np.float32(math.sqrt(lesion.aspect))
    dist = np.sqrt(u * u + v * v)
    bound = np.full(dist.shape, lesion.radius, dtype=np.float32)
    if lesion.kind == 2:
        phi = np.arctan2(v, u)
        rel = np.ones(dist.shape, dtype=np.float32)
        for k, (a, p) in enumerate(zip(lesion.harm_amp, lesion.harm_phase)):
            rel += np.float32(a) * np.cos(np.float32(k + 2) * phi + np.float32(p))
        for sa_k, h in zip(lesion.spike_angle, lesion.spike_height):
            d = (phi - np.float32(sa_k - math.pi)) % np.float32(2 * math.pi) - np.float32(math.pi)
            rel += np.float32(h) * np.exp(np.abs(d) * np.float32(-1.0 / 0.07))  # pointed, not bumps
        bound = bound * rel
    m = np.clip((bound - dist) / np.float32(lesion.edge) + 0.5, 0.0, 1.0)
    inside = np.full(dist.shape, lesion.level, dtype=np.float32)
    if lesion.kind == 2:
        # Heterogeneous interior: a solid mass is not uniformly dark.
        inside *= 1.0 + np.float32(0.3) * np.sin(
            np.float32(lesion.het_freq[0]) * dx + np.float32(lesion.het_phase[0])
        ) * np.sin(np.float32(lesion.het_freq[1]) * dy + np.float32(lesion.het_phase[1]))
    body = 1.0 - m + m * inside
    if lesion.halo > 0:
        # Thin echogenic rim: sets the mass apart from its own shadow, as a halo does on real scans.
        ring = (bound - dist) / np.float32(1.2 * lesion.edge + size / 128.0)
        body += np.float32(lesion.halo) * np.exp(np.float32(-0.5) * ring * ring)
    echo[y0:y1, x0:x1] *= body


def _compose(probe: _Probe, echo: F32, amp: F32, text: U8) -> U8:
    """Envelope -> display: attenuation and gain, compression, black outside the fan, burned-in text."""
    inten = echo * amp * probe.att
    disp = np.sqrt(inten * np.float32(1.0 / _DISPLAY_REF))
    disp = disp * np.float32(255.0 * (1.0 + _BLACK_LEVEL)) - np.float32(255.0 * _BLACK_LEVEL)
    out = np.clip(disp, 0.0, 255.0).astype(np.uint8)
    shown: U8 = np.maximum(out, text)
    return shown


def _font_scale(size: int) -> Tuple[float, int]:
    return _FONT_SCALE_128 * size / 128.0, max(1, int(round(size / 256.0)))


def _put(layer: U8, text: str, x: int, y: int, size: int, gray: int) -> Tuple[int, int]:
    """Draw `text` with its top-left corner at (x, y); returns its (width, height)."""
    cv2 = _cv.cv2()

    scale, thick = _font_scale(size)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.putText(layer, text, (x, y + th), cv2.FONT_HERSHEY_SIMPLEX, scale, gray, thick, cv2.LINE_AA)
    return tw, th + base


def _us_counter_text(number: int) -> str:
    return f"#{number % 10000:04d}"


def _us_text_layer(rng: np.random.Generator, probe: _Probe, with_counter: bool) -> Tuple[U8, int]:
    """Scanner UI burned in outside the fan: acoustic indices, gain, depth, probe and a depth scale.

    Returns the layer (0 inside the fan) and its text gray level. The frame counter is drawn
    separately by the cine so that it can change per frame.
    """
    cv2 = _cv.cv2()

    size = probe.size
    layer = np.zeros((size, size), dtype=np.uint8)
    gray = int(rng.integers(170, 256))
    pad = max(1, size // 64)
    depth_cm = int(rng.integers(8, 19))
    _, lh = _put(layer, f"TIS {rng.uniform(0.1, 0.9):.1f}", pad, pad, size, gray)
    _put(layer, f"MI {rng.uniform(0.6, 1.4):.1f}", pad, pad + lh + pad, size, gray)
    _put(layer, f"G{int(rng.integers(30, 80))}", pad, size - 2 * (lh + pad), size, gray)
    _put(layer, f"{depth_cm}cm", pad, size - (lh + pad), size, gray)
    probe_name = ("C5-2", "C6-1", "C3-1", "C4-1")[int(rng.integers(0, 4))]
    scale, thick = _font_scale(size)
    (tw, _), _ = cv2.getTextSize(probe_name, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    _put(layer, probe_name, size - tw - 3 * pad - 2, size - (lh + pad), size, gray)
    # Depth scale: a tick per centimetre along the right edge, the usual B-mode ruler.
    tick = max(2, size // 48)
    for k in range(depth_cm + 1):
        y = int(round(probe.ay + probe.r0 + k * (probe.r1 - probe.r0) / depth_cm))
        if 0 <= y < size:
            length = tick * 2 if k % 5 == 0 else tick
            layer[y, size - length - 1 : size - 1] = gray
    counter = int(rng.integers(0, 10000))
    if with_counter:
        _draw_counter(layer, probe, counter, gray)
    layer[probe.fan] = 0
    return layer, gray


def _draw_counter(layer: U8, probe: _Probe, number: int, gray: int) -> None:
    cv2 = _cv.cv2()

    size = probe.size
    pad = max(1, size // 64)
    scale, thick = _font_scale(size)
    text = _us_counter_text(number)
    (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    _put(layer, text, size - tw - 3 * pad - 2, pad, size, gray)


def _ultrasound(
    label: int, rng: np.random.Generator, size: int
) -> Tuple[U8, NDArray[np.bool_], NDArray[np.bool_]]:
    """One still plus its fan mask and burned-in text mask (the masks are for tests and overlays)."""
    probe = _sample_probe(rng, size)
    layers = _sample_layers(rng, (probe.ay + probe.r0) / size)
    lesion = _sample_lesion(label, rng, size) if label else None
    center = _place_lesion(lesion, probe, rng, margin=0.02 * size) if lesion is not None else (0.0, 0.0)
    text, _ = _us_text_layer(rng, probe, with_counter=True)
    grid = np.arange(size, dtype=np.float32)
    echo = _tissue_map(grid, grid, layers, size)
    if lesion is not None:
        _apply_lesion(echo, probe, lesion, center[0], center[1])
    field = _complex_speckle(rng, size, size, probe.sig_x, probe.sig_y)
    amp = np.sqrt(field[..., 0] ** 2 + field[..., 1] ** 2)
    img = _compose(probe, echo, amp, text)
    return img, probe.fan.copy(), text > 0


def ultrasound_image(label: int, rng: np.random.Generator, size: int = 128) -> U8:
    """One B-mode frame (size, size) uint8 of class ULTRASOUND_CLASSES[label].

    Convex-probe fan (apex at top centre, 60-75 degree opening, black outside), speckle, depth
    attenuation, tissue layers and burned-in scanner text outside the fan. ``cyst``: anechoic oval with
    a smooth border and posterior enhancement. ``mass``: hypoechoic, spiculated, with a posterior shadow.
    Lesions have a mean radius of 9-13% of the frame (rarely down to ~8%). Consumes `rng`.
    """
    return _ultrasound(_check_label(label), _check_rng(rng), _check_size(size))[0]


def make_ultrasound(n: int, *, size: int = 128, seed: int = 0) -> Tuple[U8, NDArray[np.int64]]:
    """(n, size, size) uint8 images and (n,) int64 labels; classes balanced (label = i % 3, then
    shuffled); deterministic for a seed."""
    n = _check_count(n)
    size = _check_size(size)
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % len(ULTRASOUND_CLASSES)).astype(np.int64)
    rng.shuffle(labels)
    images = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        images[i] = _ultrasound(int(labels[i]), rng, size)[0]
    return images, labels


# ---------------------------------------------------------------------------------------------------
# chest X-ray


def _soft(d: F32, width: float) -> F32:
    """0..1 step across a signed distance (px), `width` px wide: anti-aliased masks without blur."""
    soft: F32 = np.clip(d / np.float32(width) + 0.5, 0.0, 1.0).astype(np.float32)
    return soft


def _xray(findings: Sequence[int], rng: np.random.Generator, size: int) -> Tuple[U8, List[NDArray[np.bool_]]]:
    """One frame plus, per finding, the region where it would be drawn (also when absent).

    Every random draw happens whatever `findings` says, so the same generator state renders the same
    patient with findings toggled: a counterfactual the tests use.
    """
    cv2 = _cv.cv2()

    s = float(size)
    sc = s / 128.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    u = xs / np.float32(s)
    v = ys / np.float32(s)

    mid = 0.5 + rng.uniform(-0.03, 0.03)
    body_w = rng.uniform(0.38, 0.45)
    soft_val = rng.uniform(0.5, 0.62)
    air_val = rng.uniform(0.03, 0.08)
    lung_val = rng.uniform(0.12, 0.2)
    top = rng.uniform(0.12, 0.18)
    med_w = rng.uniform(0.05, 0.07)
    lat_w = rng.uniform(0.33, 0.39)
    heart = rng.uniform(0.08, 0.13)
    heart_y = rng.uniform(0.6, 0.68)
    base = rng.uniform(0.7, 0.78)
    dome = rng.uniform(0.035, 0.07)
    base_shift = rng.uniform(0.0, 0.03)  # the patient's right hemidiaphragm (image left) sits higher

    # Thorax: a wide rounded body with the neck on top, air around it.
    # A superellipse gives the thorax square shoulders rather than an egg.
    bx = np.abs(u - np.float32(mid)) / np.float32(body_w)
    by = np.abs(v - np.float32(0.7)) / np.float32(0.62)
    body_d = (1.0 - np.sqrt(np.sqrt(bx**4 + by**4))) * np.float32(s * 0.4)
    neck_d = (np.float32(0.08) - np.abs(u - np.float32(mid))) * np.float32(s)
    body = np.maximum(_soft(body_d, 1.5 * sc), _soft(neck_d, 1.5 * sc) * (v < 0.3))
    img = air_val + (soft_val - air_val) * body

    t_side = [np.float32(-1.0) * (u - np.float32(mid)), u - np.float32(mid)]  # image left, image right
    lungs: List[F32] = []
    for side in (0, 1):
        t = t_side[side]
        b = base - (base_shift if side == 0 else 0.0)
        med = med_w + (
            heart * np.exp(-(((v - heart_y) / 0.12) ** 2))
            if side == 1
            else 0.02 * np.exp(-(((v - heart_y) / 0.1) ** 2))
        )
        # Rounded apex widening to the base, where the lateral wall meets the diaphragm at an angle.
        lat = med_w + (lat_w - med_w) * np.clip((v - top) / (b - top), 0.0, 1.0) ** 0.4
        tm, th = 0.5 * (med_w + lat_w), 0.5 * (lat_w - med_w)
        bot = b - dome * (1.0 - ((t - tm) / th) ** 2)
        d = np.minimum(np.minimum(t - med, lat - t), bot - v) * np.float32(s)
        lungs.append(_soft(d.astype(np.float32), 1.5 * sc))
    lung = np.maximum(lungs[0], lungs[1])
    texture = cv2.resize(
        rng.normal(0.0, 0.04, size=(14, 14)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    hilum = np.float32(0.08) * np.exp(
        -(((np.abs(u - np.float32(mid)) - (med_w + 0.05)) / 0.05) ** 2 + ((v - 0.45) / 0.12) ** 2)
    )
    img = img * (1.0 - lung) + (lung_val + texture + hilum) * lung
    # Mediastinum and spine, brighter than the soft tissue around them.
    img += (
        np.float32(0.05)
        * _soft((np.float32(0.04) - np.abs(u - np.float32(mid))) * np.float32(s), 2 * sc)
        * (v > top - 0.05)
    )

    # Ribs (posterior arcs from the spine, curving laterally and down) and clavicles.
    bones = np.zeros((size, size), dtype=np.uint8)
    n_ribs = int(rng.integers(8, 11))
    spacing = rng.uniform(0.06, 0.07)
    rib_tilt = rng.uniform(5.0, 15.0)
    rib_b = rng.uniform(0.14, 0.2)
    for i in range(n_ribs):
        cy = (top + 0.1 + i * spacing) * s
        thick = max(1, int(round((0.016 + 0.001 * i) * s)))  # lower ribs are broader
        for sign, (a0, a1) in ((-1, (180, 265)), (1, (275, 360))):
            center = (int(round((mid + sign * 0.02) * s)), int(round(cy + rib_b * s * 0.5)))
            axes = (int(round(0.34 * s)), int(round(rib_b * s)))
            cv2.ellipse(bones, center, axes, float(sign * rib_tilt), a0, a1, 255, thick, cv2.LINE_AA)
    for sign in (-1, 1):
        p0 = (int(round((mid + sign * 0.05) * s)), int(round((top - 0.01) * s)))
        p1 = (int(round((mid + sign * 0.32) * s)), int(round((top - 0.06) * s)))
        cv2.line(bones, p0, p1, 255, max(1, int(round(0.03 * s))), cv2.LINE_AA)
    bones = np.asarray(cv2.GaussianBlur(bones, (0, 0), 0.8 * sc), dtype=np.uint8)
    bone_gain = rng.uniform(0.05, 0.09)
    img += np.float32(bone_gain / 255.0) * bones.astype(np.float32) * body

    # Findings: all parameters are drawn first; only the active ones are painted.
    regions: List[NDArray[np.bool_]] = []

    def lung_point(side: int, margin: float, v_lo: float, v_hi: float) -> Tuple[float, float]:
        # A point at least `margin` (frame fraction) inside the lung, else the most interior one.
        dist = cv2.distanceTransform((lungs[side] > 0.99).astype(np.uint8), cv2.DIST_L2, 3)
        dist[: int(v_lo * s)] = 0
        dist[int(v_hi * s) :] = 0
        yy, xx = np.nonzero(dist >= min(margin * s, 0.999 * float(dist.max())))
        j = int(rng.integers(0, len(yy)))
        return float(xx[j]), float(yy[j])

    # Consolidation: patchy airspace opacity, a cluster of blobs modulated by coarse noise.
    c_side = int(rng.integers(0, 2))
    ccx, ccy = lung_point(c_side, 0.06, 0.3, 0.7)
    blobs = np.zeros((size, size), dtype=np.float32)
    for _ in range(7):
        bx = ccx + rng.normal(0.0, 0.05 * s)
        by = ccy + rng.normal(0.0, 0.05 * s)
        sig = rng.uniform(0.025, 0.045) * s
        blobs += np.exp(
            -((xs - np.float32(bx)) ** 2 + (ys - np.float32(by)) ** 2) / np.float32(2 * sig * sig)
        )
    patch_noise = cv2.resize(
        rng.uniform(0.0, 1.0, size=(20, 20)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    # The offset gives the patch a compact support: outside it the image is untouched.
    consol = np.clip((blobs * (0.4 + 0.9 * patch_noise) - 0.1) / 0.9, 0.0, 1.0) * lungs[c_side]
    consol_gain = rng.uniform(0.35, 0.45)
    regions.append(consol > 0.0)

    # Nodule: a small, well-defined round opacity.
    n_side = int(rng.integers(0, 2))
    n_r = rng.uniform(0.05, 0.065) * s
    ncx, ncy = lung_point(n_side, n_r / s + 0.015, 0.25, 0.7)
    nod = _soft(
        np.float32(n_r) - np.sqrt((xs - np.float32(ncx)) ** 2 + (ys - np.float32(ncy)) ** 2), 1.5 * sc
    )
    nod_gain = rng.uniform(0.35, 0.45)
    regions.append(nod > 0.0)

    # Effusion: fluid fills the base and blunts the costophrenic angle; the meniscus rises laterally.
    e_side = int(rng.integers(0, 2))
    t = t_side[e_side]
    h_med = rng.uniform(0.04, 0.08)
    h_lat = rng.uniform(0.16, 0.26)
    b_e = base - (base_shift if e_side == 0 else 0.0)
    frac = np.clip((t - np.float32(med_w)) / np.float32(lat_w - med_w), 0.0, 1.0)
    meniscus = b_e - h_med - (h_lat - h_med) * frac**2
    eff = _soft(((v - meniscus) * np.float32(s)).astype(np.float32), 2.0 * sc) * lungs[e_side]
    eff_val = soft_val * rng.uniform(0.95, 1.05)
    regions.append(eff > 0.0)

    if findings[0]:
        img += np.float32(consol_gain) * consol
    if findings[1]:
        img += np.float32(nod_gain) * nod
    if findings[2]:
        img = img * (1.0 - eff) + np.maximum(img, np.float32(eff_val)) * eff

    # Exposure: blur, contrast, gamma, quantum noise.
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.6 * sc)
    contrast = rng.uniform(0.9, 1.25)
    gamma = rng.uniform(0.8, 1.2)
    noise = rng.normal(0.0, 0.012, size=(size, size)).astype(np.float32)
    img = np.clip(img * np.float32(contrast), 0.0, 1.0) ** np.float32(gamma) + noise
    out = np.clip(img * 255.0, 0.0, 255.0).astype(np.uint8)

    # Burned-in markers: side marker on the patient's left (image right) and the projection.
    marks = np.zeros((size, size), dtype=np.uint8)
    gray = int(rng.integers(215, 256))
    pad = max(1, size // 40)
    scale, thickness = _FONT_SCALE_128 * 1.3 * s / 128.0, max(1, int(round(s / 200.0)))
    (lw, _), _ = cv2.getTextSize("L", cv2.FONT_HERSHEY_SIMPLEX, scale * 1.4, thickness + 1)
    _put_scaled(
        marks,
        "L",
        size - lw - pad - int(rng.integers(0, pad + 1)),
        pad + int(rng.integers(0, 2 * pad + 1)),
        scale * 1.4,
        thickness + 1,
        gray,
    )
    _put_scaled(
        marks,
        ("PORTABLE", "AP PORTABLE", "PORTABLE AP")[int(rng.integers(0, 3))],
        pad,
        pad,
        scale,
        thickness,
        gray,
    )
    if rng.uniform() < 0.5:
        _put_scaled(marks, "ERECT", pad, size - 4 * pad, scale, thickness, gray)
    return np.maximum(out, marks), regions


def _put_scaled(layer: U8, text: str, x: int, y: int, scale: float, thick: int, gray: int) -> None:
    cv2 = _cv.cv2()

    (_, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.putText(layer, text, (x, y + th), cv2.FONT_HERSHEY_SIMPLEX, scale, gray, thick, cv2.LINE_AA)


def make_xray(n: int, *, size: int = 128, seed: int = 0) -> Tuple[U8, NDArray[np.uint8]]:
    """(n, size, size) uint8 chest X-ray-like images and (n, 3) uint8 multi-hot labels over XRAY_FINDINGS.

    Label sets cycle through a fixed pattern (30% none, 30% one finding, 30% two, 10% all three; each
    finding in 40%) and are then shuffled; deterministic for a seed.
    """
    n = _check_count(n)
    size = _check_size(size)
    rng = np.random.default_rng(seed)
    pattern = np.asarray(_XRAY_PATTERN, dtype=np.uint8)
    labels = pattern[np.arange(n) % len(pattern)]
    labels = labels[rng.permutation(n)]
    images = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        images[i] = _xray(labels[i].tolist(), rng, size)[0]
    return images, labels


# ---------------------------------------------------------------------------------------------------
# cine


def default_timeline() -> List[Tuple[int, int]]:
    """[(label, n_frames), ...]: normal -> cyst -> normal -> mass -> normal, 240 frames (8 s at 30 fps)."""
    return [(0, 45), (1, 60), (0, 45), (2, 60), (0, 30)]


class UltrasoundCine:
    """A temporally coherent ultrasound cine whose class follows `timeline`.

    The probe settings are fixed for the loop; the probe drifts slowly over a tissue and speckle field
    larger than the frame (sub-pixel shifts per frame, a little fresh speckle each frame), and each lesion
    segment holds one lesion that moves with the tissue. Lesions appear and disappear at segment
    boundaries, so labels are exact per frame. Every frame is a pure function of (seed, index): frames
    can be generated in any order. The probe motion is periodic over one pass, so ``loop=True`` wraps
    without a jump in the tissue; the burned-in frame counter shows the index within the pass.
    """

    _FRESH = 0.03  # share of speckle power renewed per frame (probe pressure, tissue motion)
    _BANK = 16

    def __init__(
        self,
        timeline: Optional[Sequence[Tuple[int, int]]] = None,
        *,
        size: int = 256,
        seed: int = 0,
        loop: bool = False,
    ) -> None:
        self._timeline = _check_timeline(timeline)
        self._size = size = _check_size(size)
        self._loop = bool(loop)
        self._labels = np.concatenate([np.full(k, lab, dtype=np.int64) for lab, k in self._timeline])
        self._segment = np.concatenate(
            [np.full(k, j, dtype=np.int64) for j, (_, k) in enumerate(self._timeline)]
        )
        n = len(self._labels)
        rng = np.random.default_rng(seed)
        self._probe = probe = _sample_probe(rng, size)
        layers = _sample_layers(rng, (probe.ay + probe.r0) / size)

        # Periodic probe motion over one pass, capped at ~0.5 px/frame so speckle stays correlated.
        cycles = rng.integers(1, 3, size=2)
        amp = min(0.03 * size, 0.5 * n / (2 * math.pi * float(cycles.max())))
        self._motion_amp = np.array([amp, amp * 0.4])
        self._motion_cycles = cycles.astype(np.float64)
        self._motion_phase = rng.uniform(0.0, 2 * math.pi, size=2)
        self._margin = m = int(math.ceil(amp)) + 2

        big = size + 2 * m
        grid = np.arange(big, dtype=np.float32) - np.float32(m)
        tissue = _tissue_map(grid, grid, layers, size)
        speckle = _complex_speckle(rng, big, big, probe.sig_x, probe.sig_y)
        self._world = np.ascontiguousarray(np.dstack([speckle, tissue[..., None]]).astype(np.float32))
        self._bank = [_complex_speckle(rng, size, size, probe.sig_x, probe.sig_y) for _ in range(self._BANK)]

        # One lesion per lesion segment, placed so that probe motion keeps it inside the fan.
        self._lesions: List[Optional[Tuple[_Lesion, float, float, NDArray[np.float64]]]] = []
        start = 0
        for lab, k in self._timeline:
            if lab == 0:
                self._lesions.append(None)
            else:
                lesion = _sample_lesion(lab, rng, size)
                fx, fy = _place_lesion(lesion, probe, rng, margin=2 * amp + 0.02 * size)
                ox, oy = self._offset(start + k // 2)
                drift = rng.uniform(-0.01, 0.01, size=2) * size  # the lesion's own slow wander
                self._lesions.append((lesion, fx + ox, fy + oy, drift))
            start += k
        self._starts = np.cumsum([0] + [k for _, k in self._timeline])
        self._text, self._gray = _us_text_layer(rng, probe, with_counter=False)
        self._notfan = (~probe.fan).astype(np.uint8)
        self._counter0 = int(rng.integers(0, 5000))

    def __len__(self) -> int:
        return int(len(self._labels))

    @property
    def size(self) -> int:
        return self._size

    @property
    def timeline(self) -> List[Tuple[int, int]]:
        return list(self._timeline)

    def _index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ConfigError(
                f"frame index must be an int, got {type(index).__name__}; pass 0..{len(self) - 1}"
            )
        i = int(index)
        if self._loop:
            return i % len(self)
        if not 0 <= i < len(self):
            raise ConfigError(
                f"frame index {i} is out of range; allowed 0..{len(self) - 1}; "
                "pass an index in range or create the cine with loop=True"
            )
        return i

    def _offset(self, i: int) -> Tuple[float, float]:
        phase = 2 * math.pi * self._motion_cycles * (i / len(self)) + self._motion_phase
        ox, oy = self._motion_amp * np.sin(phase)
        return float(ox), float(oy)

    def label_at(self, index: int) -> int:
        """Ground-truth class index of frame `index`."""
        return int(self._labels[self._index(index)])

    def frame(self, index: int) -> U8:
        """Frame `index` as (size, size) uint8 grayscale; deterministic for (seed, index)."""
        cv2 = _cv.cv2()

        i = self._index(index)
        size, m = self._size, self._margin
        ox, oy = self._offset(i)
        warp = np.array([[1.0, 0.0, m + ox], [0.0, 1.0, m + oy]], dtype=np.float64)
        moved = np.asarray(
            cv2.warpAffine(self._world, warp, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP),
            dtype=np.float32,
        )
        fresh = self._bank[(i * 7) % self._BANK]
        mix = (
            np.float32(math.sqrt(1.0 - self._FRESH)) * moved[..., :2]
            + np.float32(math.sqrt(self._FRESH)) * fresh
        )
        amp = np.asarray(
            cv2.magnitude(np.ascontiguousarray(mix[..., 0]), np.ascontiguousarray(mix[..., 1])),
            dtype=np.float32,
        )
        # Interpolating at sub-pixel offsets smooths the field a little; renormalise to avoid flicker.
        amp *= np.float32(1.0 / max(1e-6, float(amp.mean())))
        echo = np.ascontiguousarray(moved[..., 2])
        seg = int(self._segment[i])
        entry = self._lesions[seg]
        if entry is not None:
            lesion, wx, wy, drift = entry
            p = (i - int(self._starts[seg])) / max(1, self._timeline[seg][1] - 1)
            wander = drift * math.sin(math.pi * p)
            _apply_lesion(echo, self._probe, lesion, wx - ox + float(wander[0]), wy - oy + float(wander[1]))
        text = self._text.copy()
        _draw_counter(text, self._probe, self._counter0 + i, self._gray)
        text *= self._notfan
        return _compose(self._probe, echo, amp, text)

    def __iter__(self) -> Iterator[U8]:
        while True:
            for i in range(len(self)):
                yield self.frame(i)
            if not self._loop:
                return


def _read_back(cv2: Any, path: Path, size: int) -> Tuple[int, bool]:
    """(frames that decode, whether all are size x size)."""
    cap = cv2.VideoCapture(str(path))
    read = 0
    shape_ok = True
    try:
        while cap.isOpened():
            ok, got = cap.read()
            if not ok:
                break
            shape_ok = shape_ok and got.shape[:2] == (size, size)
            read += 1
    finally:
        cap.release()
    return read, shape_ok


def write_cine(
    path: str | os.PathLike[str],
    *,
    timeline: Optional[Sequence[Tuple[int, int]]] = None,
    size: int = 256,
    fps: float = 30.0,
    seed: int = 0,
) -> Dict[str, Any]:
    """Write the cine as an mp4 (OpenCV, fourcc 'mp4v', 3-channel BGR) plus `<path stem>.timeline.json`.

    The JSON is ``{"fps", "frames", "size": [H, W], "classes", "segments": [{"label", "start", "end"}]}``
    with `end` exclusive; it is also returned. The video is read back to check its frame count (OpenCV reports no
    failed write: a full disk shows only there); when anything fails, what was written is removed again.
    """
    cv2 = _cv.cv2()

    target = Path(os.fspath(path))
    if target.suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise ConfigError(
            f"cine path {str(target)!r} must end in .mp4 (or .m4v/.mov) for the 'mp4v' codec; "
            "pass e.g. demo_cine.mp4"
        )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < float(fps) <= 240:
        raise ConfigError(f"fps={fps!r} is out of range; allowed 0 < fps <= 240; pass e.g. fps=30")
    if _check_size(size) % 2:
        raise ConfigError(
            f"size={size} is odd; the 'mp4v' encoder needs even frame sizes; pass e.g. size={size - 1}"
        )
    cine = UltrasoundCine(timeline, size=size, seed=seed)
    n = len(cine)
    if not target.parent.is_dir():
        raise DataError(
            f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist; create it first"
        )
    fourcc = cv2.VideoWriter.fourcc(*"mp4v")
    writer = cv2.VideoWriter(_cv.utf8_path(str(target), "cine file", ConfigError), fourcc, float(fps), (cine.size, cine.size), True)
    if not writer.isOpened():
        raise DataError(
            f"OpenCV could not open a video writer for {str(target)!r} with codec 'mp4v'; "
            "the path must be writable and OpenCV built with FFmpeg (pip opencv-python-headless is); "
            "check the path or the OpenCV build"
        )
    timeline_path = target.with_suffix(".timeline.json")
    written = [target]  # removed again unless everything was written
    try:
        try:
            for img in cine:
                writer.write(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
        finally:
            writer.release()
        read, shape_ok = _read_back(cv2, target, cine.size)
        back = f"it reads back {read} of {n} frames of {cine.size}x{cine.size} (codec 'mp4v') and was removed"
        if read > n or (read == n and not shape_ok):  # all there, but not as written
            raise DataError(f"{str(target)!r} reads back {read} frames, expected {n} of {cine.size}x{cine.size} (codec "
                            "'mp4v'), and was removed; the OpenCV video backend is incomplete; use an OpenCV build with FFmpeg")
        if read < n:
            # OpenCV reports no failed write: a full disk shows only as a file cut short. Said first when this
            # machine shows it; an OpenCV that writes what it cannot read is the rarer cause.
            from edgeclf.runtime.sinks import _full_disk_cause

            cause = _full_disk_cause(str(target))
            if cause is not None:
                raise DataError(f"{str(target)!r} could not be written completely ({cause}): {back}; free space or "
                                "choose another path")
            raise DataError(f"{str(target)!r} could not be written completely (disk full or not writable?): {back}; "
                            "free space or choose another path; if there is space, the OpenCV video backend is "
                            "incomplete: use an OpenCV build with FFmpeg")
        segments = []
        start = 0
        for lab, k in cine.timeline:
            segments.append({"label": ULTRASOUND_CLASSES[lab], "start": start, "end": start + k})
            start += k
        meta: Dict[str, Any] = {
            "fps": float(fps),
            "frames": n,
            "size": [cine.size, cine.size],
            "classes": list(ULTRASOUND_CLASSES),
            "segments": segments,
        }
        written.append(timeline_path)
        try:
            timeline_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise DataError(f"cannot write the cine's timeline {str(timeline_path)!r}: {exc.strerror}; the cine was "
                            "removed; free space or choose another path") from None
        written = []
    finally:
        for p in written:  # a cut-short video (or one without its timeline) would only block a rerun: --out exists
            with contextlib.suppress(OSError):
                p.unlink()
    return meta
