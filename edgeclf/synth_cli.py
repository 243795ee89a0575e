"""`edgeclf data synth`: write synthetic phantoms to disk in the formats `load_dataset` reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import ConfigError
from edgeclf.runtime import _cv

__all__ = ["synth"]


def synth(kind: str, out: str, *, n: int | None = None, size: int | None = None, seed: int = 0) -> dict[str, Any]:
    """`n` (ultrasound, xray; default 900) and `size` (default 128, cine 256); None: the default. Everything is
    checked before anything is written, into a new or empty folder (or, for cine, a new .mp4 path)."""
    from edgeclf.runtime import synthetic as syn

    o = Path(out)
    if kind == "cine" and n is not None:
        raise ConfigError(f"--n is for ultrasound and xray (images to generate); a cine loop's length is fixed, so "
                          f"--n {n} has no effect: leave it out")
    count = 900 if n is None else n
    if kind != "cine" and count < 30:
        raise ConfigError(f"--n is {count}; generate at least 30 images, e.g. --n 300")
    size = (256 if kind == "cine" else 128) if size is None else syn._check_size(size)  # 0 is a size like any other
    _check_out(o, mp4=kind == "cine" and o.suffix.lower() == ".mp4")
    if kind == "cine":
        path = o if o.suffix.lower() == ".mp4" else o / "cine.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        timeline = syn.write_cine(path, size=size, seed=seed)
        return {"kind": kind, "video": str(path), "timeline": str(path.with_suffix(".timeline.json")), "frames": timeline["frames"]}
    o.mkdir(parents=True, exist_ok=True)
    if kind == "ultrasound":
        cv2 = _cv.cv2()
        images, labels = syn.make_ultrasound(count, size=size, seed=seed)
        for c in syn.ULTRASOUND_CLASSES:
            (o / c).mkdir(exist_ok=True)
        for i, (im, y) in enumerate(zip(images, labels)):
            # Encoded here and written by Python: cv2.imwrite dies (SIGSEGV) on a folder name that is not UTF-8.
            ok, png = cv2.imencode(".png", im)
            if not ok:
                raise RuntimeError(f"OpenCV could not encode phantom image {i} as PNG")
            (o / syn.ULTRASOUND_CLASSES[int(y)] / f"{i:05d}.png").write_bytes(png.tobytes())
        return {"kind": kind, "folder": str(o), "images": count, "classes": list(syn.ULTRASOUND_CLASSES)}
    if kind == "xray":
        images, labels = syn.make_xray(count, size=size, seed=seed)
        a, b = int(count * 0.7), int(count * 0.85)
        path = o / "xray.npz"
        np.savez_compressed(path, train_images=images[:a], train_labels=labels[:a], val_images=images[a:b],
                            val_labels=labels[a:b], test_images=images[b:], test_labels=labels[b:],
                            label_names=np.array(syn.XRAY_FINDINGS), modality=np.array("xray"))  # no left-right flips
        return {"kind": kind, "npz": str(path), "images": count, "labels": list(syn.XRAY_FINDINGS), "task": "multilabel"}
    raise ConfigError(f"synthetic kind {kind!r} is unknown; allowed: ultrasound, xray, cine")


def _check_out(o: Path, *, mp4: bool) -> None:
    """A new or empty folder (or a new .mp4 path): new phantoms mixed into an older set would be counted as one."""
    if mp4:
        if o.exists():
            raise ConfigError(f"--out {o} exists; give a new .mp4 path or a new folder")
        return
    if o.exists() and not o.is_dir():
        raise ConfigError(f"--out {o} is a file; data synth writes a folder: give a new folder")
    if o.is_dir() and any(o.iterdir()):
        raise ConfigError(f"--out {o} is not empty; give a new or empty folder (phantoms written into it would mix with "
                          "what is there)")
