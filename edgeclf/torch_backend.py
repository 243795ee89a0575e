"""Eager PyTorch as a profiling backend (`edgeclf profile --vs-torch TRAINING_DIR`), workstation side only.

The runtime never imports torch; this module lives in `edgeclf` and is imported only by the profile
command when asked. It runs the training folder's model in eager mode, after checking on the bundle's
reference inputs that it is the bundle's model (the same logits as the exported fp32 ONNX, within
float rounding), so the comparison is like for like.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import ConfigError
from edgeclf.runtime.backends import Backend

__all__ = ["TorchBackend", "TORCH_BACKEND", "PARITY_ATOL"]

TORCH_BACKEND = "torch-eager"
PARITY_ATOL = 1e-3  # as the bundle's own fp32 parity check: float rounding only


class TorchBackend(Backend):
    """(N, C, H, W) float32 -> (N, K) float32 logits through the training folder's model, eager, no grad."""

    name = TORCH_BACKEND

    def __init__(self, folder: str, input_shape: Tuple[int, int, int], num_outputs: Optional[int],
                 threads: Optional[int] = None) -> None:
        super().__init__(input_shape, num_outputs)
        from edgeclf.errors import require

        torch = require("torch", "train")  # one line naming the extra when torch is absent (a device install)
        from edgeclf.train import load_trained

        if threads:
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()
        self._torch = torch
        self._trained = load_trained(folder)  # ModelError, one line, for a folder that is not a training folder
        self._model: Any = self._trained.model.eval()

    def check_matches(self, bundle: Any) -> float:
        """Max |logit difference| against the bundle's recorded fp32 outputs; ConfigError when it is not the
        bundle's model (or the bundle has no reference.npz to tell)."""
        ref = bundle.reference_path
        if ref is None or not Path(ref).is_file():
            raise ConfigError(f"--vs-torch needs the bundle's reference.npz to check it is the same model; "
                              f"bundle {bundle.path.name} has none (exported with --no-samples): re-export it with samples")
        with np.load(io.BytesIO(bundle.read_file(ref)), allow_pickle=False) as z:  # the verified bytes
            x, want = z["inputs"].astype(np.float32), z["logits"].astype(np.float64)
        # What the training folder's model takes and gives (not the shape this backend was built for: the bundle's).
        pre = self._trained.preprocess
        takes = (int(pre.channels), *(int(v) for v in pre.size))
        gives = int(self._trained.meta.get("num_outputs", want.shape[-1]))
        if tuple(x.shape[1:]) != self.input_shape or takes != tuple(x.shape[1:]) or gives != want.shape[-1]:
            raise ConfigError(f"--vs-torch model takes {takes} and gives {gives} outputs, bundle {bundle.path.name} takes "
                              f"{tuple(x.shape[1:])} and gives {want.shape[-1]}: give the training folder this bundle was "
                              "exported from")
        got = self.infer(x).astype(np.float64)
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        if got.shape != want.shape or err > PARITY_ATOL * max(1.0, float(np.max(np.abs(want)))):
            raise ConfigError(f"--vs-torch model is not the model of bundle {bundle.path.name} (max |logit diff| {err:.3g} on its "
                              "reference inputs); give the training folder this bundle was exported from")
        return err

    def _infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        with self._torch.inference_mode():
            out = self._model(self._torch.from_numpy(x)).numpy()
        return np.asarray(out, np.float32)
