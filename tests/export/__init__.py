"""Helpers shared by the export tests."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def _calibrated_on(calib: np.ndarray) -> dict[str, Any]:
    """The calibration fields of quantize_int8's record, for stand-in quantizers that read every image."""
    return {"calibration_n": len(calib), "calibration_sha256": hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest()}
