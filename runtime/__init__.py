"""edgeclf.runtime: the device side. Loads a bundle, reads frames, runs a backend, writes results.

Never imports torch or edgeclf.export; Python 3.8 compatible (JetPack 5). Heavy modules (cv2,
onnxruntime) are imported inside the leaf modules that use them.
"""
from __future__ import annotations

from typing import List

__all__: List[str] = []
