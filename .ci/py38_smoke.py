"""Run under Python 3.8 (JetPack 5) with only numpy and click: the device side must import and work.

vermin checks the syntax statically; this catches what only running shows (stdlib APIs, numpy calls).
"""
import importlib
import pkgutil
import tempfile
from pathlib import Path

import numpy as np

import edgeclf.devices
import edgeclf.runtime
from edgeclf.devices import list_profiles, load_profile
from edgeclf.runtime.bundle import verify_checksums, write_checksums
from edgeclf.runtime.postprocess import DecisionRule, decide, probabilities
from edgeclf.runtime.preprocess import PreprocessSpec

for pkg in (edgeclf.runtime, edgeclf.devices):
    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
assert [load_profile(n).name for n in list_profiles()] == list_profiles()
p = probabilities(np.array([[2.0, 0.0, -1.0]]), "multiclass", 1.5)
assert decide(p, DecisionRule("max-ratio", (0.5, 0.3, 0.2))).tolist() == [0]
assert PreprocessSpec.from_dict(PreprocessSpec(1, (32, 32), (0.5,), (0.25,)).to_dict()).size == (32, 32)
with tempfile.TemporaryDirectory() as d:
    (Path(d) / "model.onnx").write_bytes(b"x")
    write_checksums(d)
    verify_checksums(d)
print("python 3.8 smoke: runtime and devices import and run")
