"""`edgeclf prune` calibrates and reports validation figures as training, export and evaluate do: over the frames
`edgeclf run` classifies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_pruning")
BLANK = 4  # val frames the quality gate stops, all of class b


def _clips_with_blank_b_val(root: Path) -> str:
    """write_gated_clips's clips, but two val clips of b turn black half-way (run's quality gate: "blank"): frames a
    model reads as class a, labelled b, they pull a fit over every frame. 24 val frames, BLANK of them stopped."""
    pytest.importorskip("cv2")
    from tests.export.test_export_gated import write_gated_clips

    return write_gated_clips(root, blanked=lambda split, cls, j: split == "val" and cls == "b" and j < 2)


def test_pruning_calibrates_and_measures_on_the_frames_run_classifies(tmp_path: Path, one_torch_thread: None) -> None:
    """Trained without its test split (so no test read turns the quality gate on): pruning still knows which val frames
    run's quality gate stops; the pruned model's temperature and decision rule are fitted without them, and its val
    figures, before and after, leave them out and count them."""
    from edgeclf.calibration import fit_decision_rule, fit_temperature
    from edgeclf.data import load_dataset
    from edgeclf.export.prune import PruneConfig, prune_trained
    from edgeclf.runtime.postprocess import probabilities
    from edgeclf.runtime.preprocess import Preprocessor
    from edgeclf.train import TrainConfig, load_trained, train

    data = _clips_with_blank_b_val(tmp_path / "clips")
    parent = tmp_path / "parent"
    train(TrainConfig(data=data, out=str(parent), model="compact", size=32, epochs=1, patience=1, seed=0, threads=1,
                      read_test=False, frames_per_clip=4))
    rec = prune_trained(PruneConfig(model=str(parent), out=str(tmp_path / "p"), target_macs=0.6, steps=1, finetune_epochs=1))
    for val in (rec["metrics"]["val"], rec["pruning"]["metrics_before"]["val"]):
        assert val["n"] == 24 - BLANK and val["all_frames"]["n"] == 24
        assert val["abstained"] == BLANK and val["abstain_reasons"] == {"blank": BLANK}
    assert set(rec["metrics"]) == {"val"}  # still no test figures for a run trained without its test split
    tm = load_trained(tmp_path / "p")
    ds = load_dataset(data, frames_per_clip=4, quality=True)
    va = ds.split("val")
    kept = np.array([not ds.abstain.get(i) for i in va.ids])
    lv = tm.logits(Preprocessor(tm.preprocess).batch(va.images))

    def fitted(rows: np.ndarray) -> tuple[float, ...]:
        t = fit_temperature(lv[rows], va.labels[rows], "binary")
        rule = fit_decision_rule(probabilities(lv[rows], "binary", t), va.labels[rows], "binary", target_sensitivity=0.9,
                                 positive=tm.decision.positive)
        return (t, *rule.thresholds)

    kept_fit = fitted(kept)
    assert kept_fit != pytest.approx(fitted(np.ones(len(kept), bool)), rel=1e-6), "the blank frames must move the fit"
    assert (tm.temperature, *tm.decision.thresholds) == pytest.approx(kept_fit, rel=1e-6, abs=1e-9)
