"""profile --vs-torch against a training folder of another input; `edgeclf ensemble` of TTA runs records what
`train --ensemble` records; the pip-shipped weights asked for a model that has none."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgeclf.errors import ConfigError, EdgeclfError
from tests.conftest import TINY_DATA

pytest.importorskip("torch")


def _train(out: Path, **kw: Any) -> dict[str, Any]:
    from edgeclf.train import TrainConfig, train

    return train(TrainConfig(**{"data": TINY_DATA, "out": str(out), "model": "compact", "size": 32, "epochs": 1,
                                "patience": 1, "seed": 0, "threads": 1, **kw}))


def test_vs_torch_with_a_training_folder_of_another_input_is_one_line(bundle_dir: Path, tmp_path: Path) -> None:
    """The input check compared the bundle's reference inputs with the shape built from the bundle itself: a folder
    taking 3 channels reached torch's convolution and died in a RuntimeError traceback."""
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.torch_backend import TorchBackend

    _train(tmp_path / "rgb", channels=3)
    b = load_bundle(bundle_dir)
    m = b.manifest
    assert m.preprocess.channels == 1
    be = TorchBackend(str(tmp_path / "rgb"), (m.preprocess.channels, *m.preprocess.size), m.num_outputs, threads=1)
    with pytest.raises(ConfigError, match="give the training folder this bundle was exported from"):
        be.check_matches(b)


def test_ensemble_of_tta_runs_records_val_without_tta_as_train_ensemble_does(tmp_path: Path) -> None:
    from edgeclf.train import ensemble_runs

    for k in range(2):
        _train(tmp_path / f"m{k}", tta="hflip", seed=k)
    rec = ensemble_runs([str(tmp_path / "m0"), str(tmp_path / "m1")], str(tmp_path / "ens"), read_test=False)
    assert rec["model"]["tta"] == "hflip" and rec["metrics"]["val_without_tta"]["n"] == rec["metrics"]["val"]["n"]


@pytest.mark.parametrize("name", ["compact", "efficientnet_b0"])
def test_pip_weights_for_a_model_that_has_none_is_one_line(name: str) -> None:
    from edgeclf.models import lite_state_dict, lite_weight_file

    for fn in (lite_weight_file, lite_state_dict):
        with pytest.raises(EdgeclfError, match="no pip-shipped ImageNet weights"):
            fn(name)
