"""`edgeclf prune` reports validation figures as export and evaluate do: over the frames `edgeclf run` classifies."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.test_export_gated import BLANK, write_gated_clips

pytest.importorskip("torch_pruning")


def test_pruning_figures_leave_out_the_frames_run_does_not_classify(tmp_path: Path, one_torch_thread: None) -> None:
    """Trained without its test split (so training never ran the quality gate): pruning still knows which val frames
    run's quality gate stops, and its val figures, before and after, leave them out and count them."""
    from edgeclf.export.prune import PruneConfig, prune_trained
    from edgeclf.train import TrainConfig, train

    data = write_gated_clips(tmp_path / "clips")
    parent = tmp_path / "parent"
    train(TrainConfig(data=data, out=str(parent), model="compact", size=32, epochs=1, patience=1, seed=0, threads=1,
                      read_test=False, frames_per_clip=4))
    rec = prune_trained(PruneConfig(model=str(parent), out=str(tmp_path / "p"), target_macs=0.6, steps=1, finetune_epochs=1))
    for val in (rec["metrics"]["val"], rec["pruning"]["metrics_before"]["val"]):
        assert val["n"] == 24 - BLANK and val["all_frames"]["n"] == 24
        assert val["abstained"] == BLANK and val["abstain_reasons"] == {"blank": BLANK}
    assert set(rec["metrics"]) == {"val"}  # still no test figures for a run trained without its test split
