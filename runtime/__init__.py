"""edgeclf.runtime: the device side. Loads a bundle, reads frames, runs a backend, writes results.

Never imports torch or edgeclf.export; Python 3.8 compatible (JetPack 5). Heavy modules (cv2,
onnxruntime) are imported inside the functions that use them, so this import costs only numpy.
"""
from __future__ import annotations

from typing import List

from edgeclf.runtime.app import run_bundle, verify_bundle
from edgeclf.runtime.backends import Backend, FakeBackend, OrtBackend, create_backend
from edgeclf.runtime.bundle import Bundle, Manifest, load_bundle
from edgeclf.runtime.pipeline import RunOptions, RunSummary, run_pipeline
from edgeclf.runtime.postprocess import DecisionRule, decide, probabilities
from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec
from edgeclf.runtime.sinks import JsonlSink, ListSink, Sink
from edgeclf.runtime.sources import Frame, FrameSource, open_source

__all__: List[str] = [
    "Backend", "Bundle", "DecisionRule", "FakeBackend", "Frame", "FrameSource", "JsonlSink", "ListSink", "Manifest",
    "OrtBackend", "PreprocessSpec", "Preprocessor", "RunSummary", "Sink", "create_backend", "decide", "load_bundle",
    "open_source", "probabilities", "run_bundle", "run_pipeline", "verify_bundle", "RunOptions",
]
