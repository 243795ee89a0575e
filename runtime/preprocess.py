"""Preprocessing from the manifest: one implementation, shared by training, export and the runtime.

Two steps so training can cache the geometry and augment before normalising:
`geometry(image) -> (H, W, C) uint8` (channels, ROI crop, resize) and
`normalize(batch) -> (N, C, H, W) float32`.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import ConfigError
from edgeclf.runtime import _cv
from edgeclf.runtime.sources import to_uint8

__all__ = ["PreprocessSpec", "Preprocessor", "RESIZE_MODES"]

RESIZE_MODES = ("stretch", "letterbox")
# Shrinking: "area" is OpenCV's INTER_AREA (exact, but 3-6 ms for 640x480 -> 224 here, non-integer
# factors take its slow path); "fast-area" averages by the largest integer factor with INTER_AREA's
# fast path, then finishes with INTER_LINEAR (about 0.2-0.4 ms, still anti-aliased). Enlarging is
# INTER_LINEAR either way. Manifests written before the field existed mean "area".
INTERPOLATIONS = ("fast-area", "area")
_KEYS = {"channels", "size", "resize", "roi", "scale", "mean", "std", "layout", "dtype", "interpolation", "sector"}


@dataclass(frozen=True)
class PreprocessSpec:
    """The complete preprocessing a model expects; serialised into the manifest as-is."""

    channels: int
    size: Tuple[int, int]  # (height, width)
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    resize: str = "stretch"
    scale: float = 1.0 / 255.0
    # Room for the runtime's ROI fields: {"mode": "fixed", "box": [x, y, w, h]} for now.
    roi: Optional[Dict[str, Any]] = None
    layout: str = "NCHW"
    dtype: str = "float32"
    interpolation: str = "fast-area"
    # Trained on ultrasound sector crops (clips data `?roi=sector`): the runtime detects, masks and crops the
    # sector before this geometry (`edgeclf run` defaults to --roi sector). Written only when true, so that
    # manifests of other models (and their checksums) stay as they were.
    sector: bool = False

    def __post_init__(self) -> None:
        where = "preprocess"
        if self.channels not in (1, 3):
            raise ConfigError(f"{where}.channels is {self.channels!r}; allowed: 1 or 3")
        if len(self.size) != 2 or min(self.size) < 8 or max(self.size) > 4096:
            raise ConfigError(f"{where}.size is {self.size!r}; expected [height, width] between 8 and 4096")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"{where}.mean/std need {self.channels} values (one per channel), got {self.mean!r}/{self.std!r}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{where}.std must be positive, got {self.std!r}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"{where}.resize is {self.resize!r}; allowed: {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"{where}.interpolation is {self.interpolation!r}; allowed: {', '.join(INTERPOLATIONS)}")
        if self.layout != "NCHW" or self.dtype != "float32":
            raise ConfigError(f"{where}.layout/dtype must be NCHW/float32, got {self.layout}/{self.dtype}")
        if self.roi is not None:
            box = self.roi.get("box")
            allowed = "allowed: null or {\"mode\": \"fixed\", \"box\": [x, y, w, h]} with integer pixels, w > 0 and h > 0"
            if self.roi.get("mode") != "fixed" or not isinstance(box, (list, tuple)) or len(box) != 4:
                raise ConfigError(f"{where}.roi is {self.roi!r}; {allowed}")
            # Integers only: a float or bool would be truncated into another box than the one written.
            if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in box) or box[2] <= 0 or box[3] <= 0:
                raise ConfigError(f"{where}.roi box is {list(box)!r}; {allowed}; fix the box")
        if not isinstance(self.sector, bool):
            raise ConfigError(f"{where}.sector is {self.sector!r}; allowed: true or false (leave it out for false)")
        if self.sector and self.roi is not None:
            raise ConfigError(f"{where} has both sector and roi; allowed: one of them (a model is trained on sector crops "
                              "or on a fixed box); remove one")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if not self.sector:
            del d["sector"]  # absent means false: manifests written before the field existed hash the same
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        unknown = set(d) - _KEYS
        if unknown:
            raise ConfigError(f"preprocess has unknown field(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        missing = {"channels", "size", "mean", "std"} - set(d)
        if missing:
            raise ConfigError(f"preprocess is missing field(s) {sorted(missing)}")
        try:
            return cls(
                channels=int(d["channels"]),
                size=(int(d["size"][0]), int(d["size"][1])),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                resize=str(d.get("resize", "stretch")),
                scale=float(d.get("scale", 1.0 / 255.0)),
                roi=dict(d["roi"]) if d.get("roi") else None,
                layout=str(d.get("layout", "NCHW")),
                dtype=str(d.get("dtype", "float32")),
                interpolation=str(d.get("interpolation", "area")),
                sector=d.get("sector", False),  # checked as a bool, not coerced: "false" must not read as true
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"preprocess has a value of the wrong type ({exc})") from None


class Preprocessor:
    """Callable turning an RGB (H, W, 3) or gray (H, W) uint8 image into a (1, C, H, W) float32 input."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self._cv2: Any = _cv.cv2()
        # Fold scale, mean and std into one multiply-add per pixel.
        std = np.asarray(spec.std, np.float32)
        self._mul = (np.float32(spec.scale) / std).astype(np.float32)
        self._add = (-np.asarray(spec.mean, np.float32) / std).astype(np.float32)
        levels = np.arange(256, dtype=np.float32)
        self._lut = [np.ascontiguousarray((levels * self._mul[k] + self._add[k]).astype(np.float32).reshape(1, 256))
                     for k in range(spec.channels)]

    def geometry(self, image: NDArray[Any]) -> NDArray[np.uint8]:
        """(H, W) or (H, W, 3|4) uint8/uint16 -> (h, w, C) uint8 at the model's size."""
        cv2 = self._cv2
        img = image
        if img.dtype == np.uint16:
            img = to_uint8(img)  # the sources' conversion: the same pixels as training and image files
        elif img.dtype != np.uint8:
            raise ConfigError(f"image dtype {img.dtype} is not supported; expected uint8 or uint16")
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
            raise ConfigError(f"image shape {img.shape} is not supported; expected (H, W) or (H, W, 3)")
        if self.spec.roi is not None:
            x, y, w, h = (int(v) for v in self.spec.roi["box"])
            # Clipped to the frame by hand: a negative slice end would count from the far edge (another region).
            x0, y0 = max(x, 0), max(y, 0)
            x1, y1 = min(x + w, img.shape[1]), min(y + h, img.shape[0])
            if x1 <= x0 or y1 <= y0:
                raise ConfigError(f"preprocess.roi box {list(self.spec.roi['box'])} lies outside the {image.shape[1]}x{image.shape[0]} "
                                  "frame; allowed: a box [x, y, w, h] overlapping the frame; fix the bundle's roi box")
            img = img[y0:y1, x0:x1]
        if self.spec.channels == 1 and img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        elif self.spec.channels == 3 and img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        out_h, out_w = self.spec.size
        h0, w0 = img.shape[:2]
        if self.spec.resize == "letterbox":
            s = min(out_h / h0, out_w / w0)
            nh, nw = max(1, round(h0 * s)), max(1, round(w0 * s))
            resized = self._resize(img, nw, nh)
            canvas = np.zeros((out_h, out_w) + resized.shape[2:], np.uint8)
            top, left = (out_h - nh) // 2, (out_w - nw) // 2
            canvas[top : top + nh, left : left + nw] = resized
            img = canvas
        elif (h0, w0) != (out_h, out_w):
            img = self._resize(img, out_w, out_h)
        if img.ndim == 2:
            img = img[:, :, None]
        return np.ascontiguousarray(img, dtype=np.uint8)

    def _resize(self, img: NDArray[np.uint8], w: int, h: int) -> NDArray[np.uint8]:
        cv2 = self._cv2
        h0, w0 = img.shape[:2]
        shrink = w * h < h0 * w0
        if shrink and self.spec.interpolation == "fast-area":
            k = max(1, min(h0 // h, w0 // w))
            if k > 1:
                img = cv2.resize(img, (w0 // k, h0 // k), interpolation=cv2.INTER_AREA)  # integer factor: fast path
            if img.shape[:2] == (h, w):
                return img
            out: NDArray[np.uint8] = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
            return out
        out = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return out

    def normalize(self, batch: NDArray[np.uint8], out: Optional[NDArray[np.float32]] = None) -> NDArray[np.float32]:
        """(N, H, W, C) uint8 -> (N, C, H, W) float32, into `out` when given (a C-contiguous array of that shape)."""
        # A 256-entry float table per channel, looked up plane by plane straight into the NCHW output:
        # bit-identical to multiply-then-add in float32 (the table is built that way) and about half
        # the time of the numpy chain on strided channels (75 against 140 us for 224x224x3 here).
        cv2 = self._cv2
        n, h, w, c = batch.shape
        if out is None:
            out = np.empty((n, c, h, w), np.float32)
        elif out.shape != (n, c, h, w) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 of shape {(n, c, h, w)}; got {out.dtype} {out.shape}")
        for i in range(n):
            planes = cv2.split(batch[i]) if c > 1 else (batch[i, :, :, 0],)
            for k in range(c):
                cv2.LUT(np.ascontiguousarray(planes[k]), self._lut[k], dst=out[i, k])
        return out

    def batch(self, images: Sequence[NDArray[Any]]) -> NDArray[np.float32]:
        """A list of images (any sizes) -> (N, C, H, W) float32 model input."""
        if not images:
            return np.zeros((0, self.spec.channels) + tuple(self.spec.size), np.float32)
        return self.normalize(np.stack([self.geometry(im) for im in images]))

    def __call__(self, image: NDArray[Any], out: Optional[NDArray[np.float32]] = None) -> NDArray[np.float32]:
        """One image -> (1, C, H, W) float32 (into `out` when given: no allocation per frame)."""
        return self.normalize(self.geometry(image)[None], out)
