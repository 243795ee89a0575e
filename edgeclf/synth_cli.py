"""`edgeclf data synth`: write synthetic phantoms to disk in the formats `load_dataset` reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import ConfigError
from edgeclf.runtime import _cv

__all__ = ["synth"]


def synth(kind: str, out: str, *, n: int = 900, size: int | None = None, seed: int = 0) -> dict[str, Any]:
    from edgeclf.runtime import synthetic as syn

    o = Path(out)
    if n < 30:
        raise ConfigError(f"--n is {n}; generate at least 30 images")
    if kind == "cine":
        path = o if o.suffix.lower() == ".mp4" else o / "cine.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        timeline = syn.write_cine(path, size=size or 256, seed=seed)
        return {"kind": kind, "video": str(path), "timeline": str(path.with_suffix(".timeline.json")), "frames": timeline["frames"]}
    o.mkdir(parents=True, exist_ok=True)
    if kind == "ultrasound":
        cv2 = _cv.cv2()
        images, labels = syn.make_ultrasound(n, size=size or 128, seed=seed)
        for c in syn.ULTRASOUND_CLASSES:
            (o / c).mkdir(exist_ok=True)
        for i, (im, y) in enumerate(zip(images, labels)):
            cv2.imwrite(str(o / syn.ULTRASOUND_CLASSES[int(y)] / f"{i:05d}.png"), im)
        return {"kind": kind, "folder": str(o), "images": int(n), "classes": list(syn.ULTRASOUND_CLASSES)}
    if kind == "xray":
        images, labels = syn.make_xray(n, size=size or 128, seed=seed)
        a, b = int(n * 0.7), int(n * 0.85)
        path = o / "xray.npz"
        np.savez_compressed(path, train_images=images[:a], train_labels=labels[:a], val_images=images[a:b],
                            val_labels=labels[a:b], test_images=images[b:], test_labels=labels[b:],
                            label_names=np.array(syn.XRAY_FINDINGS))
        return {"kind": kind, "npz": str(path), "images": int(n), "labels": list(syn.XRAY_FINDINGS), "task": "multilabel"}
    raise ConfigError(f"synthetic kind {kind!r} is unknown; allowed: ultrasound, xray, cine")
