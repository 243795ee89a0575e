"""`edgeclf profile --vs-torch`: the training folder's model in eager PyTorch beside the bundle's ONNX."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeclf.errors import ConfigError
from tests.conftest import run_cli

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def test_profile_vs_torch_adds_the_eager_model_side_by_side(trained_dir: Path, bundle_dir: Path) -> None:
    r = run_cli("profile", "--bundle", str(bundle_dir), "--vs-torch", str(trained_dir), "--frames", "20", "--warmup", "2",
                "--chunk", "10", "--bootstrap", "0", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    names = [t["name"] for t in doc["targets"]]
    assert len(names) == 2 and names[1].endswith(":torch-eager:fp32") and doc["targets"][1]["backend"] == "torch-eager"
    for t in doc["targets"]:
        assert t["frames"] == 20 and t["stages_ms"]["infer"]["median"] > 0


def test_vs_torch_refuses_a_model_that_is_not_the_bundles(trained_dir: Path, bundle_dir: Path, tmp_path: Path) -> None:
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.torch_backend import TorchBackend

    b = load_bundle(bundle_dir)
    m = b.manifest
    be = TorchBackend(str(trained_dir), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs, threads=1)
    assert be.check_matches(b) < 1e-3  # the model the bundle was exported from
    with np.load(str(b.reference_path), allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data["logits"] = data["logits"] + 0.5  # as if another model had written the reference outputs
    np.savez(tmp_path / "reference.npz", **data)
    other = SimpleNamespace(path=tmp_path, reference_path=tmp_path / "reference.npz", read_file=lambda p: Path(p).read_bytes())
    with pytest.raises(ConfigError, match="not the model of bundle"):
        be.check_matches(other)
    with pytest.raises(ConfigError, match="reference.npz"):
        be.check_matches(SimpleNamespace(path=tmp_path, reference_path=None))


def test_vs_torch_on_a_folder_that_is_not_a_training_folder_is_one_line(bundle_dir: Path, tmp_path: Path) -> None:
    r = run_cli("profile", "--bundle", str(bundle_dir), "--vs-torch", str(tmp_path), "--frames", "5", "--warmup", "0", "--bootstrap", "0")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "training folder" in lines[0], r.stderr
