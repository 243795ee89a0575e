"""The QAT rung distils the fp32 parent at its fitted temperature: the probabilities the gate's decisions are made on."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_qat_rung_distils_at_the_parents_temperature(trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.train as train_mod
    from edgeclf.data import load_dataset
    from edgeclf.export.qat import make_qat_rung
    from edgeclf.export.quantize import calibration_indices
    from edgeclf.runtime.preprocess import Preprocessor

    tm = train_mod.load_trained(trained_dir)
    tm.temperature = 3.5  # an overconfident parent's: at 1 its softmax would saturate where the gate's does not
    run = tm.run
    ds = load_dataset(run["data"]["spec"], classes=run["data"].get("classes"), seed=int(run["config"].get("seed", 0)))
    tr = ds.split("train")
    calib = Preprocessor(tm.preprocess).batch([tr.images[i] for i in calibration_indices(tr.labels, 32, 0)])
    seen: list[float] = []
    real = train_mod._distill

    def spy(student, teacher, task, t):  # the loss fit() adds on every batch, against the parent's outputs
        seen.append(t)
        return real(student, teacher, task, t)

    monkeypatch.setattr(train_mod, "_distill", spy)
    out = make_qat_rung(tm, ds)(flavour="cpu", out_path=tmp_path / "q.onnx", calib_x=calib, calib_method="minmax", epochs=1)
    assert seen and set(seen) == {3.5}  # softmax(logits / 3.5): the gate's probabilities(logits, task, 3.5)
    assert out["qat"]["temperature"] == 3.5 and "temperature 3.5" in out["qat"]["loss"]

@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, True])
def test_qat_refuses_a_temperature_that_is_not_a_positive_number(bad: float) -> None:
    from edgeclf.errors import ConfigError
    from edgeclf.export.qat import qat_finetune

    with pytest.raises(ConfigError, match="temperature"):
        qat_finetune(None, None, flavour="cpu", epochs=1, calib_x=np.zeros((1, 1, 8, 8), np.float32), temperature=bad)
