from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeclf.errors import ConfigError, DataError
from edgeclf.train import KERNEL_PIN_VARIABLES, TrainConfig, default_size, train
from tests.conftest import write_gray_clip

pytest.importorskip("torch")


def test_multilabel_end_to_end(tmp_path: Path) -> None:
    from edgeclf.evaluate import evaluate
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.runtime.app import run_bundle
    from edgeclf.runtime.sinks import ListSink

    epochs: list[dict] = []
    rec = train(TrainConfig(data="synthetic:xray?n=150&size=48&seed=2", out=str(tmp_path / "m"), size=32, epochs=2, patience=2),
                on_epoch=epochs.append)
    assert [e["epoch"] for e in epochs] == [1, 2] and rec["data"]["augment"] == "xray"
    assert rec["model"]["decision"]["kind"] == "multilabel" and len(rec["model"]["decision"]["thresholds"]) == 3
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(tmp_path / "m")))
    assert m["task"] == "multilabel" and m["parity"]["decision_agreement"] == 1.0
    ev = evaluate(str(tmp_path / "b"), split="test", n_boot=50)
    assert set(ev["metrics"]["per_class"]) == {"consolidation", "nodule", "effusion"}
    sink = ListSink()
    run_bundle(str(tmp_path / "b"), "synthetic:ultrasound?frames=3", extra_sinks=[sink])
    assert all(r["label"] is None and isinstance(r["labels"], list) for r in sink.records)


def test_run_record_is_complete_and_loadable_without_pickle(trained_dir: Path) -> None:
    run = json.loads((trained_dir / "run.json").read_text())
    assert {"config", "data", "history", "metrics", "packages", "best_epoch"} <= set(run)
    assert run["data"]["hash"] and run["data"]["sizes"]["train"] > 0
    assert run["host"]["cpu"] and run["host"]["torch_cpu_capability"] and run["host"]["torch_threads"] >= 1
    assert set(run["host"]["kernel_pins"]) <= set(KERNEL_PIN_VARIABLES)
    assert sorted(p.name for p in (trained_dir / "splits").iterdir()) == ["test.txt", "train.txt", "val.txt"]
    head = (trained_dir / "model.safetensors").read_bytes()[:8]
    assert int.from_bytes(head, "little") > 0  # safetensors header length, not a pickle opcode
    assert not (trained_dir / "model.safetensors").read_bytes().startswith(b"\x80")


def test_host_records_the_kernel_pins_that_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.train import host_info

    for k in KERNEL_PIN_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    assert host_info()["kernel_pins"] == {}
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")  # empty: not a pin
    assert host_info()["kernel_pins"] == {"MKL_CBWR": "AVX2"}


def test_val_split_without_a_class_is_refused_before_training(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for cls, n in (("common", 12), ("rare", 2)):  # 2 images: the rare class cannot reach val
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(tmp_path / "d" / cls / f"{i}.png"), rng.integers(0, 255, (32, 32), np.uint8))
    with pytest.raises(DataError, match="no images of rare"):
        train(TrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "o"), epochs=1))
    assert not (tmp_path / "o").exists()


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="batch-size"):
        TrainConfig(data="x", out="y", batch_size=1)
    with pytest.raises(ConfigError, match="target-sensitivity"):
        TrainConfig(data="x", out="y", target_sensitivity=0)
    with pytest.raises(ConfigError, match="augment"):
        TrainConfig(data="x", out="y", augment="mixup")


def test_seed_and_weight_decay_are_checked() -> None:
    """np.random.seed takes 0..2**32-1 (member k of an ensemble gets seed + k), AdamW a finite weight decay >= 0:
    anything else was a traceback from deep inside training."""
    for seed, ensemble in [(-1, 1), (2**32, 1), (2**32 - 2, 3)]:
        with pytest.raises(ConfigError, match=f"seed is {seed}; give 0"):
            TrainConfig(data="x", out="y", seed=seed, ensemble=ensemble)
    TrainConfig(data="x", out="y", seed=2**32 - 1)
    TrainConfig(data="x", out="y", seed=2**32 - 3, ensemble=3)
    for wd in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="weight-decay is"):
            TrainConfig(data="x", out="y", weight_decay=wd)
    TrainConfig(data="x", out="y", weight_decay=0.0)


def test_bad_seed_or_recipe_weight_decay_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeclf.cli import main

    base = ["train", "--data", "synthetic:ultrasound?n=90&size=48&seed=4", "--size", "32", "--epochs", "1", "--threads", "1"]
    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "mine"\nversion = 1\n[train]\nweight_decay = -0.1\n')
    for extra, says in [(["--seed", "-1"], "seed is -1"), (["--recipe", str(recipe)], "weight-decay is -0.1")]:
        with pytest.raises(SystemExit) as e:
            main([*base, "--out", str(tmp_path / "o"), *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_one_cycle_schedule_completes_when_a_batch_of_one_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """With n % batch_size == 1 the final one-image batch is skipped (BatchNorm); the schedule counts only the steps
    taken, so the learning rate still anneals to its end (it was sized ceil(n / batch) and stopped mid-anneal)."""
    import torch

    from edgeclf.data import load_dataset
    from edgeclf.models import create_model
    from edgeclf.runtime.preprocess import PreprocessSpec
    from edgeclf.train import _prepare, fit

    torch.set_num_threads(1)
    ds = load_dataset("synthetic:ultrasound?n=90&size=48&seed=4")
    p = _prepare(ds, PreprocessSpec(channels=1, size=(32, 32), mean=(0.5,), std=(0.25,)), "ultrasound", 0)
    n = len(p.xtr)
    made = []
    real = torch.optim.lr_scheduler.OneCycleLR

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(torch.optim.lr_scheduler, "OneCycleLR", spy)
    for batch in (n - 1, n - 3):  # n % batch == 1: one step an epoch; n % batch == 3: two, as before (ceil(n / batch))
        torch.manual_seed(0)
        history, _ = fit(create_model("compact", num_outputs=3, in_chans=1), p, epochs=2, lr=3e-3, batch_size=batch,
                         patience=2, seed=0)
        s = made[-1]
        assert len(history) == 2 and s.last_epoch == s.total_steps, (batch, s.last_epoch, s.total_steps)
    assert made[0].total_steps == 2 and made[1].total_steps == 4


def test_default_size_never_upsamples_past_the_data() -> None:
    small = [np.zeros((28, 28), np.uint8)] * 5
    big = [np.zeros((256, 300), np.uint8)] * 5
    assert default_size(64, 28, small) == 32
    assert default_size(224, 32, small) == 32
    assert default_size(64, 28, big) == 64


def test_flip_tta_is_trained_recorded_and_exported_into_the_graph(tmp_path: Path) -> None:
    import torch

    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.models import unwrap_tta, with_tta
    from edgeclf.runtime.backends import OrtBackend
    from edgeclf.train import load_trained

    rec = train(TrainConfig(data="synthetic:ultrasound?n=90&size=48&seed=3", out=str(tmp_path / "m"), size=32, epochs=1,
                            patience=1, threads=1, tta="hflip"))
    # The same weights without the augmentation, measured on validation only (test is read once, with it).
    assert rec["metrics"]["val_without_tta"]["n"] == rec["metrics"]["val"]["n"] > 0
    assert "test_without_tta" not in rec["metrics"] and rec["config"]["tta"] == "hflip"
    tm = load_trained(tmp_path / "m")
    assert tm.tta == "hflip" and unwrap_tta(tm.model) is tm.net
    x = np.random.default_rng(0).normal(size=(5, 1, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        a, b = tm.net(torch.from_numpy(x)).numpy(), tm.net(torch.from_numpy(x[..., ::-1].copy())).numpy()
    np.testing.assert_allclose(tm.logits(x), (a + b) / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tm.logits(x[..., ::-1].copy()), tm.logits(x), rtol=1e-5, atol=1e-5)  # mirror-invariant
    # The weights on disk are the network's own: a plain load gives the unaugmented logits.
    from safetensors.torch import load_file

    assert all(not k.startswith("net.") for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    # Export bakes it into the ONNX graph: ONNX Runtime gives the averaged logits, and the bundle says so.
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(tmp_path / "m")))
    assert m["provenance"]["test_time_augmentation"] == "hflip" and m["parity"]["decision_agreement"] == 1.0
    with OrtBackend(str(tmp_path / "b" / "model.onnx"), (1, 32, 32), m["model"]["output_shape"][1], threads=1) as be:
        np.testing.assert_allclose(be.infer(x), (a + b) / 2, rtol=1e-4, atol=1e-4)
    assert with_tta(tm.net, "none") is tm.net
    with pytest.raises(ConfigError, match="tta is 'vflip'; allowed: none, hflip"):
        TrainConfig(data="x", out="y", tta="vflip")


def test_probe_epochs_train_only_the_head_then_fine_tune_everything(tmp_path: Path) -> None:
    """LP-FT: during the head-only epochs every pretrained weight stays exactly as loaded (BatchNorm statistics
    follow the data); the fine-tuning epochs after them move the whole network and alone compete for the best epoch."""
    import torch

    pytest.importorskip("timm")
    from edgeclf.data import load_dataset
    from edgeclf.models import create_model, head_module, normalization
    from edgeclf.runtime.preprocess import PreprocessSpec
    from edgeclf.train import _prepare, fit

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_outputs=3, in_chans=1, pretrained=True)
    torch.set_num_threads(1)
    ds = load_dataset("synthetic:ultrasound?n=60&size=48&seed=4")
    mean, std = normalization("efficientnet_lite0", 1, True)
    p = _prepare(ds, PreprocessSpec(channels=1, size=(32, 32), mean=tuple(mean), std=tuple(std)), "ultrasound", 0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    head = {k for k, _ in model.named_parameters() if k.startswith("classifier.")}
    assert head == {"classifier.weight", "classifier.bias"}
    assert {id(q) for q in head_module(model).parameters()} == {id(model.classifier.weight), id(model.classifier.bias)}
    after_probe: dict = {}

    def on_epoch(e: dict) -> None:
        if e.get("probe") and e["epoch"] == 2:
            after_probe.update({k: v.clone() for k, v in model.state_dict().items()})

    history, best = fit(model, p, epochs=2, lr=1e-3, batch_size=16, patience=2, seed=0, on_epoch=on_epoch, probe_epochs=2)
    assert [(h["epoch"], h.get("probe", False)) for h in history] == [(1, True), (2, True), (1, False), (2, False)]
    assert best in (1, 2)
    params = {k for k, _ in model.named_parameters()}
    moved = {k for k in start if not torch.equal(start[k], after_probe[k])}
    assert moved & params == head  # every other weight untouched by the probe
    # BatchNorm re-estimates its statistics on this data (the network runs as fine-tuning will)
    assert "bn1.running_mean" in moved and "bn1.num_batches_tracked" in moved
    assert all(q.requires_grad for q in model.parameters())  # unfrozen again for fine-tuning
    final = model.state_dict()
    assert not torch.equal(final["conv_stem.weight"], start["conv_stem.weight"])


def test_no_test_trains_the_same_and_leaves_the_test_split_unread(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeclf.cli import cli
    from edgeclf.evaluate import evaluate

    data = "synthetic:ultrasound?n=90&size=48&seed=4"
    full = train(TrainConfig(data=data, out=str(tmp_path / "full"), size=32, epochs=2, patience=2, threads=1))
    blind = train(TrainConfig(data=data, out=str(tmp_path / "blind"), size=32, epochs=2, patience=2, threads=1, read_test=False))
    assert "test" in full["metrics"] and set(blind["metrics"]) == {"val"}
    assert blind["config"]["read_test"] is False
    assert blind["metrics"]["val"] == full["metrics"]["val"] and blind["history"] == full["history"]
    assert (tmp_path / "blind" / "model.safetensors").read_bytes() == (tmp_path / "full" / "model.safetensors").read_bytes()
    # The chosen run's test figure, read afterwards, is the one training would have reported.
    later = evaluate(str(tmp_path / "blind"), split="test", n_boot=0)["metrics"]
    assert later["accuracy"] == pytest.approx(full["metrics"]["test"]["accuracy"])
    assert later["auc"]["macro"] == pytest.approx(full["metrics"]["test"]["auc"]["macro"])
    res = CliRunner().invoke(cli, ["train", "--data", data, "--out", str(tmp_path / "cli"), "--size", "32", "--epochs", "1",
                                   "--patience", "1", "--threads", "1", "--no-test"])
    assert res.exit_code == 0, res.output
    assert "test split not read (--no-test)" in res.output
    assert not any(line.startswith(("test ", "[test]")) for line in res.output.splitlines())
    assert any(line.startswith("val ") for line in res.output.splitlines())


def test_ema_validates_and_keeps_the_averaged_weights_without_changing_training() -> None:
    import torch

    from edgeclf.data import load_dataset
    from edgeclf.models import create_model
    from edgeclf.runtime.preprocess import PreprocessSpec
    from edgeclf.train import _prepare, fit

    torch.set_num_threads(1)
    ds = load_dataset("synthetic:ultrasound?n=60&size=48&seed=4")
    p = _prepare(ds, PreprocessSpec(channels=1, size=(32, 32), mean=(0.5,), std=(0.25,)), "ultrasound", 0)

    def run(ema: float) -> tuple[list, int, dict, list]:
        torch.manual_seed(0)
        model = create_model("compact", num_outputs=3, in_chans=1)
        raw: list = []
        history, best = fit(model, p, epochs=3, lr=3e-3, batch_size=16, patience=3, seed=0, ema=ema,
                            on_epoch=lambda e: raw.append({k: v.clone() for k, v in model.state_dict().items()}))
        return history, best, model.state_dict(), raw

    h0, b0, w0, raw0 = run(0.0)
    h1, b1, w1, raw1 = run(0.9)
    # The average never feeds back into training: the same losses, the same raw weights epoch by epoch.
    assert [h["loss"] for h in h1] == [h["loss"] for h in h0]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(raw0, raw1) for k in a)
    # What is validated and kept is the average, not the raw weights.
    assert [h["val_loss"] for h in h1] != [h["val_loss"] for h in h0]
    assert all(torch.equal(w0[k], raw0[b0 - 1][k]) for k in w0)
    assert not torch.equal(w1["stage1.conv.weight"], raw1[b1 - 1]["stage1.conv.weight"])
    # A decay of ~0 averages nothing: the same run as without it, bit for bit.
    h2, b2, w2, _ = run(1e-12)
    assert h2 == h0 and b2 == b0 and all(torch.equal(w2[k], w0[k]) for k in w0)
    with pytest.raises(ConfigError, match="ema is 1.0"):
        TrainConfig(data="x", out="y", ema=1.0)


def test_probe_epochs_need_a_pretrained_network() -> None:
    with pytest.raises(ConfigError, match="probe-epochs trains a head on pretrained features; add --pretrained"):
        TrainConfig(data="x", out="y", probe_epochs=2)
    with pytest.raises(ConfigError, match="probe-epochs is -1"):
        TrainConfig(data="x", out="y", probe_epochs=-1, pretrained=True)


def test_ensemble_members_are_the_seeded_plain_runs_and_export_as_one_graph(tmp_path: Path) -> None:
    """--ensemble N trains member k exactly as a plain run with --seed seed+k (same split), deploys the mean of
    their probabilities, and `edgeclf ensemble` combining those plain runs gives the same model and figures."""
    import torch
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from edgeclf.cli import cli
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.runtime.backends import OrtBackend
    from edgeclf.train import ensemble_runs, load_trained

    data = "synthetic:ultrasound?n=90&size=48&seed=4"
    kw = dict(data=data, size=32, epochs=2, patience=2, threads=1)
    ens = train(TrainConfig(out=str(tmp_path / "ens"), ensemble=2, **kw))
    plain = [train(TrainConfig(out=str(tmp_path / f"s{k}"), seed=k, **kw)) for k in (0, 1)]
    weights = load_file(str(tmp_path / "ens" / "model.safetensors"))
    for k in (0, 1):
        alone = load_file(str(tmp_path / f"s{k}" / "model.safetensors"))
        assert set(alone) == {key.split(".", 2)[2] for key in weights if key.startswith(f"members.{k}.")}
        assert all(torch.equal(v, weights[f"members.{k}.{key}"]) for key, v in alone.items())
        assert ens["ensemble"]["members"][k]["seed"] == k and ens["ensemble"]["members"][k]["best_epoch"] == plain[k]["best_epoch"]
        assert ens["ensemble"]["members"][k]["val"]["accuracy"] == pytest.approx(plain[k]["metrics"]["val"]["accuracy"])
    assert any(not torch.equal(weights[f"members.0.{key}"], weights[f"members.1.{key}"]) for key in alone)
    assert ens["best_epoch"] == [plain[0]["best_epoch"], plain[1]["best_epoch"]]
    assert {h["member"] for h in ens["history"]} == {0, 1}
    # The deployed output: log of the mean softmax, so softmax(output) is the averaged probability.
    tm, m0, m1 = load_trained(tmp_path / "ens"), load_trained(tmp_path / "s0"), load_trained(tmp_path / "s1")
    assert tm.members == 2 and tm.meta["ensemble"] == 2 and tm.run["ensemble"]["combined"] == "mean probability"
    x = np.random.default_rng(0).normal(size=(6, 1, 32, 32)).astype(np.float32)
    soft = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    want = (soft(m0.logits(x)) + soft(m1.logits(x))) / 2
    np.testing.assert_allclose(soft(tm.logits(x)), want, rtol=1e-5, atol=1e-6)
    # Combining the plain runs afterwards: the same weights and validation figures as training the ensemble.
    res = CliRunner().invoke(cli, ["ensemble", "--member", str(tmp_path / "s0"), "--member", str(tmp_path / "s1"),
                                   "--out", str(tmp_path / "comb"), "--no-test"])
    assert res.exit_code == 0, res.output
    assert "each member alone on validation" in res.output and not any(ln.startswith("test ") for ln in res.output.splitlines())
    assert (tmp_path / "comb" / "model.safetensors").read_bytes() == (tmp_path / "ens" / "model.safetensors").read_bytes()
    comb = json.loads((tmp_path / "comb" / "run.json").read_text())
    assert comb["metrics"]["val"] == ens["metrics"]["val"] and set(comb["metrics"]) == {"val"}
    assert comb["model"]["temperature"] == pytest.approx(ens["model"]["temperature"])
    # Exported: one ONNX graph running both members; ONNX Runtime gives the same averaged probabilities.
    man = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(tmp_path / "ens")))
    assert man["provenance"]["ensemble"]["members"] == 2 and len(man["provenance"]["ensemble"]["members_val"]) == 2
    assert man["provenance"]["ensemble"]["from_folders"] is False
    assert man["parity"]["decision_agreement"] == 1.0
    with OrtBackend(str(tmp_path / "b" / "model.onnx"), (1, 32, 32), man["model"]["output_shape"][1], threads=1) as be:
        np.testing.assert_allclose(soft(be.infer(x)), want, rtol=1e-4, atol=1e-5)
    # What cannot be combined is refused with the reason.
    with pytest.raises(ConfigError, match="at least 2"):
        ensemble_runs([str(tmp_path / "s0")], str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="is one of the members"):
        ensemble_runs([str(tmp_path / "s0"), str(tmp_path / "s1")], str(tmp_path / "s1"))
    with pytest.raises(ConfigError, match="pruned model or an ensemble"):
        ensemble_runs([str(tmp_path / "s0"), str(tmp_path / "ens")], str(tmp_path / "x"))
    train(TrainConfig(out=str(tmp_path / "other"), **{**kw, "data": "synthetic:ultrasound?n=90&size=48&seed=5"}))
    with pytest.raises(ConfigError, match="other data"):
        ensemble_runs([str(tmp_path / "s0"), str(tmp_path / "other")], str(tmp_path / "x"))
    train(TrainConfig(out=str(tmp_path / "big"), **{**kw, "size": 40}))
    with pytest.raises(ConfigError, match=r"differs from .* in input \(input: \{'size': \[40, 40\]\} against \{'size': \[32, 32\]\}\)"):
        ensemble_runs([str(tmp_path / "s0"), str(tmp_path / "big")], str(tmp_path / "x"))


def test_train_cli_ensemble_reports_each_member(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeclf.cli import cli

    res = CliRunner().invoke(cli, ["train", "--data", "synthetic:ultrasound?n=90&size=48&seed=4", "--out", str(tmp_path / "e"),
                                   "--size", "32", "--epochs", "1", "--patience", "1", "--threads", "1", "--ensemble", "2"])
    assert res.exit_code == 0, res.output
    assert "trained an ensemble of 2 compact" in res.output and "best epochs [1, 1]" in res.output
    rows = [ln.split() for ln in res.output.splitlines() if ln[:2] in ("0 ", "1 ")]
    assert [r[:3] for r in rows] == [["0", "0", "1"], ["1", "1", "1"]]  # member, seed, best epoch
    rec = json.loads((tmp_path / "e" / "run.json").read_text())
    assert [m["seed"] for m in rec["ensemble"]["members"]] == [0, 1] and all(m["seconds"] > 0 for m in rec["ensemble"]["members"])


def test_ensemble_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="ensemble is 0; give 1"):
        TrainConfig(data="x", out="y", ensemble=0)
    with pytest.raises(ConfigError, match="ensemble is 17"):
        TrainConfig(data="x", out="y", ensemble=17)
    from edgeclf.models import ensemble_of

    with pytest.raises(ConfigError, match="at least 2 members"):
        ensemble_of([], "multiclass")


def test_ensemble_is_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import edgeclf.train as tr

    monkeypatch.setattr(tr, "dist_info", lambda: (0, 2))
    with pytest.raises(ConfigError, match="without torchrun"):
        tr.train(TrainConfig(data="synthetic:ultrasound?n=90&size=48&seed=4", out=str(tmp_path / "m"), ensemble=2))


def test_cross_validation_on_images_with_copies_adds_intervals_over_copy_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pooled out-of-fold figures of an image folder whose images come in exact copies (one copy group each): beside the
    per-image intervals, intervals bootstrapped over the copy groups (copies are not independent). Training is stubbed:
    each fold's "model" scores an image by its mean intensity."""
    cv2 = pytest.importorskip("cv2")
    import types

    import edgeclf.train as tr

    rng = np.random.default_rng(3)
    for cls, level in (("a", 110), ("b", 140)):  # overlapping intensities: some errors
        (tmp_path / "d" / cls).mkdir(parents=True)
        for g in range(8):
            im = np.clip(rng.normal(level + rng.normal(0, 20), 5, (16, 16)), 0, 255).astype(np.uint8)
            for c in range(3):  # three byte-identical copies: one copy group (dedup=exact, the default)
                cv2.imwrite(str(tmp_path / "d" / cls / f"{g}_{c}.png"), im)

    def fake_train_on(ds, cfg, *, on_epoch=None, recipe=None):  # noqa: ANN001, ANN202
        rule = {"kind": "threshold", "thresholds": [0.5], "positive": 1}
        record = {"data": {"sizes": {s: len(v) for s, v in ds.splits.items()}}, "best_epoch": 1, "_meta": {},
                  "metrics": {"test": {"accuracy": None, "balanced_accuracy": None}, "val": {"n": len(ds.splits["val"])}},
                  "model": {"temperature": 1.0, "decision": rule}}
        pre = types.SimpleNamespace(batch=lambda ims: np.array([[float(np.mean(im))] for im in ims]))
        return record, object(), types.SimpleNamespace(pre=pre)

    monkeypatch.setattr(tr, "_train_on", fake_train_on)
    monkeypatch.setattr(tr, "save_run", lambda *a, **k: None)
    monkeypatch.setattr(tr, "torch_logits", lambda model, x: (x - 125.0) / 10.0)
    res = tr.cross_validate(TrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "cv"), folds=3))
    pooled = res["pooled_out_of_fold"]
    assert pooled["items"] == 48
    d = pooled["decisions"]
    assert d["n"] == 48 and d["bootstrap_unit"] == "item"
    c = d["clustered"]
    assert c["unit"] == "copy group" and c["clusters"] == 16
    # Three identical copies per group: resampling groups gives the wider, honest interval.
    width = d["balanced_accuracy_ci95"][1] - d["balanced_accuracy_ci95"][0]
    assert c["balanced_accuracy_ci95"][1] - c["balanced_accuracy_ci95"][0] > 1.2 * width
    lo, hi = c["accuracy_ci95"]
    assert lo <= d["accuracy"] <= hi
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["pooled_out_of_fold"]["decisions"]["clustered"] == c


def test_pooled_image_decisions_without_copies_carry_no_clustered_interval() -> None:
    """Every image its own group: an interval over groups would be the per-image one again, so none is added."""
    from edgeclf.runtime.postprocess import DecisionRule
    from edgeclf.train import _pooled_decisions

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    p1 = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 40), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1)
    folds = np.arange(40) % 2
    rules = [DecisionRule("threshold", (0.5,), positive=1)] * 2
    d = _pooled_decisions(probs, y, folds, rules, ["a", "b"], [str(i) for i in range(40)], n_boot=200, seed=0)
    assert d["n"] == 40 and "clustered" not in d and d["accuracy_ci95"] is not None


def test_pooled_image_decisions_abstain_on_the_images_run_does_not_classify(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-validation of an image folder: the images `edgeclf run`'s quality gate stops (here black ones) are abstained
    in the pooled out-of-fold decisions, as the folds' own test figures, frame_auc_macro and evaluate leave them out
    (they were counted as classified). Training is stubbed: each fold's "model" scores an image by its mean intensity."""
    cv2 = pytest.importorskip("cv2")
    import types

    import edgeclf.train as tr
    from edgeclf.data import load_folds

    rng = np.random.default_rng(3)
    for cls, level in (("a", 100), ("b", 150)):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for g in range(9):
            im = np.clip(rng.normal(level, 30, (64, 64)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(tmp_path / "d" / cls / f"{g}.png"), im)
        for g in range(3):  # black images (run: "blank"), each distinct
            cv2.imwrite(str(tmp_path / "d" / cls / f"dark{g}.png"), rng.integers(0, 6, (64, 64), dtype=np.uint8))

    def fake_train_on(ds, cfg, *, on_epoch=None, recipe=None):  # noqa: ANN001, ANN202
        rule = {"kind": "threshold", "thresholds": [0.5], "positive": 1}
        record = {"data": {"sizes": {s: len(v) for s, v in ds.splits.items()}}, "best_epoch": 1, "_meta": {},
                  "metrics": {"test": {"accuracy": None, "balanced_accuracy": None}, "val": {"n": len(ds.splits["val"])}},
                  "model": {"temperature": 1.0, "decision": rule}}
        pre = types.SimpleNamespace(batch=lambda ims: np.array([[float(np.mean(im))] for im in ims]))
        return record, object(), types.SimpleNamespace(pre=pre)

    monkeypatch.setattr(tr, "_train_on", fake_train_on)
    monkeypatch.setattr(tr, "save_run", lambda *a, **k: None)
    monkeypatch.setattr(tr, "torch_logits", lambda model, x: (x - 125.0) / 10.0)
    monkeypatch.setattr(tr, "_classified_val", lambda ds: None)  # the stub needs no calibration
    res = tr.cross_validate(TrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "cv"), folds=3))
    folds = load_folds(str(tmp_path / "d"), 3, seed=0, quality=True)
    stopped = sum(1 for ds in folds for i in ds.splits["test"].ids if ds.abstain.get(i))
    assert stopped == 6  # the six black images, each held out once
    d = res["pooled_out_of_fold"]["decisions"]
    assert res["pooled_out_of_fold"]["items"] == 24
    assert d["abstained"] == stopped and d["n"] == 24 - stopped
    # The black images (mean ~2) would all have been "a": counted, they raised a's sensitivity.
    assert sum(d["confusion_matrix"][0]) == 9 and sum(d["confusion_matrix"][1]) == 9


def test_pooled_clip_figures_abstain_on_the_frames_run_does_not_classify(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-validation of clips (the same stub as above): the frames run's quality gate stops are abstained in the
    pooled frame figure and left out of their clips' aggregation, as evaluate does."""
    import types

    import edgeclf.train as tr
    from edgeclf.data import load_folds

    def fake_train_on(ds, cfg, *, on_epoch=None, recipe=None):  # noqa: ANN001, ANN202
        rule = {"kind": "threshold", "thresholds": [0.5], "positive": 1}
        record = {"data": {"sizes": {s: len(v) for s, v in ds.splits.items()}}, "best_epoch": 1, "_meta": {},
                  "metrics": {"test": {"accuracy": None, "balanced_accuracy": None}, "val": {"n": len(ds.splits["val"])}},
                  "model": {"temperature": 1.0, "decision": rule}}
        pre = types.SimpleNamespace(batch=lambda ims: np.array([[float(np.mean(im))] for im in ims]))
        return record, object(), types.SimpleNamespace(pre=pre)

    monkeypatch.setattr(tr, "_train_on", fake_train_on)
    monkeypatch.setattr(tr, "save_run", lambda *a, **k: None)
    monkeypatch.setattr(tr, "torch_logits", lambda model, x: (x - 1.0) * 10.0)  # every frame not black: "b"
    monkeypatch.setattr(tr, "_classified_val", lambda ds: None)
    data = _blank_ended_clips(tmp_path / "clips")
    res = tr.cross_validate(TrainConfig(data=data, out=str(tmp_path / "cv"), folds=2, group="clip", frames_per_clip=4))
    folds = load_folds(data, 2, seed=0, frames_per_clip=4, group="clip", quality=True)
    stopped = sum(1 for ds in folds for i in ds.splits["test"].ids if ds.abstain.get(i))
    pooled = res["pooled_out_of_fold"]
    assert stopped > 0 and pooled["frame"]["abstained"] == stopped
    # b's black frames would have been "a": left out, every b clip is decided "b" from its frames run classifies.
    assert pooled["clip_vote"]["per_class"]["b"]["sensitivity"] == 1.0


def test_a_model_trained_on_sector_crops_says_so_from_training_to_run_and_evaluate(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Training on `clips?roi=sector` records preprocess.sector; export carries it into the manifest; `run` without
    --roi then crops the sector, and `evaluate` on clips of another folder name crops them as training did."""
    import shutil

    cv2 = pytest.importorskip("cv2")
    from edgeclf.cli import main
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle
    from edgeclf.runtime.app import run_bundle
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.sources import open_source

    with open_source("synthetic:ultrasound?frames=24&size=96&seed=1") as s:
        frames = [f.image for f in s]
    root = tmp_path / "us"
    for cls in ("a", "b"):
        for k in range(3):
            path = root / cls / f"c{k}.avi"
            path.parent.mkdir(parents=True, exist_ok=True)
            vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 96))
            for f in frames[3 * (cls == "b") + k:]:  # six different clips: byte-identical ones are one group
                vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
            vw.release()
    train(TrainConfig(data=f"{root}?roi=sector&frames=2", out=str(tmp_path / "m"), model="compact", size=32, epochs=1,
                      patience=1, threads=1))
    assert json.loads((tmp_path / "m" / "model.json").read_text())["preprocess"]["sector"] is True
    export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(tmp_path / "m")))
    m = load_bundle(tmp_path / "b").manifest
    assert m.raw["preprocess"]["sector"] is True and m.preprocess.sector and m.trained_on_sector
    s = run_bundle(str(tmp_path / "b"), "synthetic:ultrasound?frames=12&size=96")
    assert s["roi"] == {"mode": "sector", "chosen_by": "bundle", "bundle": "sector"} and s["preprocess_parts_ms"]["sector"]["n"] == 12
    shutil.copytree(root, tmp_path / "site2")  # the same clips under another folder name: no recorded options apply
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--model", str(tmp_path / "b"), "--data", str(tmp_path / "site2"), "--split", "all", "--json"])
    assert exc.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["spec"] == f"{tmp_path / 'site2'}?roi=sector"
    from edgeclf.evaluate import evaluate  # the library call crops alike, not only the CLI

    assert evaluate(str(tmp_path / "b"), data=str(tmp_path / "site2"), split="all", n_boot=0)["data"]["spec"] == report["data"]["spec"]


# -- --out: never replaced silently --------------------------------------------------------------------------

_SMALL = "synthetic:ultrasound?n=90&size=32&seed=4"


def _no_data(*a: object, **k: object) -> None:
    raise AssertionError("data was read: --out must be checked before any work")


@pytest.mark.parametrize("folds", [0, 2])
def test_train_refuses_a_used_out_before_reading_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folds: int) -> None:
    import edgeclf.data
    import edgeclf.train as tr

    monkeypatch.setattr(tr, "load_dataset", _no_data)
    monkeypatch.setattr(edgeclf.data, "load_folds", _no_data)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    (tmp_path / "afile.txt").write_text("mine")
    with pytest.raises(ConfigError) as exc:
        train(TrainConfig(data=_SMALL, out=str(tmp_path / "used"), folds=folds))
    assert "not empty" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        train(TrainConfig(data=_SMALL, out=str(tmp_path / "used"), folds=folds), overwrite=True)
    assert "not a training folder" in str(exc.value)  # --overwrite replaces a previous training, nothing else
    with pytest.raises(ConfigError, match="is a file"):
        train(TrainConfig(data=_SMALL, out=str(tmp_path / "afile.txt"), folds=folds))
    assert (tmp_path / "used" / "notes.txt").read_text() == (tmp_path / "afile.txt").read_text() == "mine"


def test_every_torchrun_rank_checks_out_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only rank 0 writes, at the end; every rank checks at the start, so no rank trains for nothing or races a write."""
    import edgeclf.train as tr

    monkeypatch.setattr(tr, "load_dataset", _no_data)
    monkeypatch.setattr(tr, "dist_info", lambda: (1, 2))
    (tmp_path / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        tr.train(TrainConfig(data=_SMALL, out=str(tmp_path)))


def test_overwrite_replaces_only_a_previous_trainings_own_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(data=_SMALL, out=str(out), size=32, epochs=1, threads=1)
    train(cfg)
    # What an older run of another kind left: a recipe copy and a cross-validation's fold and summary.
    (out / "recipe.toml").write_text("name = 'other'\n")
    (out / "cv.json").write_text("{}")
    train(TrainConfig(data=_SMALL, out=str(out / "fold-0"), size=32, epochs=1, threads=1))
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError) as exc:  # its evaluation would describe the old model: moved away by the user
        train(cfg, overwrite=True)
    assert "eval" in str(exc.value) and "\n" not in str(exc.value)
    (out / "eval" / "metrics.json").unlink()
    (out / "eval").rmdir()
    before = (out / "run.json").stat().st_mtime_ns
    train(cfg, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "run.json", "splits"]
    assert (out / "run.json").stat().st_mtime_ns != before


def test_ensemble_refuses_the_same_member_twice_and_a_used_out(trained_dir: Path, tmp_path: Path) -> None:
    import shutil

    from edgeclf.train import ensemble_runs

    with pytest.raises(ConfigError) as exc:
        ensemble_runs([str(trained_dir), str(trained_dir) + "/."], str(tmp_path / "e"))
    assert "twice" in str(exc.value) and "\n" not in str(exc.value)
    copy = tmp_path / "copy"
    shutil.copytree(trained_dir, copy)
    with pytest.raises(ConfigError) as exc:
        ensemble_runs([str(trained_dir), str(copy)], str(tmp_path / "e"))
    assert "same weights" in str(exc.value) and "\n" not in str(exc.value)
    (tmp_path / "afile.txt").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        ensemble_runs([str(trained_dir), str(copy)], str(tmp_path / "afile.txt"))
    with pytest.raises(ConfigError, match="not empty"):
        ensemble_runs([str(trained_dir), str(copy)], str(tmp_path))
    assert not (tmp_path / "e").exists()


def test_ensemble_combines_a_member_recorded_before_split_lists_were_hashed(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A member whose run.json carries the data's former hash (recorded before split-list contents were part of
    the hash; the same files and list) combines with one trained now, with export's warning that a regenerated split
    list cannot be told apart (once, whichever member carries it); another data set is still refused."""
    import csv
    import logging

    from edgeclf.data import load_dataset, make_split_list
    from edgeclf.train import ensemble_runs
    from tests.test_data import _image_tree

    root = tmp_path / "d"
    _image_tree(root, {"a": 12, "b": 12})
    rows, _ = make_split_list(f"{root}?test=0.25&val=0.25")
    lst = tmp_path / "list.csv"
    with open(lst, "w", newline="") as f:
        csv.writer(f).writerows([["path", "sha256", "split", "group"], *rows])
    spec = f"{root}?split={lst}"
    ds = load_dataset(spec)
    assert ds.former_hash and ds.former_hash != ds.data_hash
    kw = dict(data=spec, model="compact", size=32, epochs=1, patience=1, threads=1)
    for k in (0, 1):
        train(TrainConfig(out=str(tmp_path / f"m{k}"), seed=k, **kw))
    run = json.loads((tmp_path / "m0" / "run.json").read_text())
    run["data"]["hash"] = ds.former_hash  # as recorded by an edgeclf from before the split-list hash
    (tmp_path / "m0" / "run.json").write_text(json.dumps(run))
    warning = "recorded before split-list contents were part of the data hash"
    for k, members in enumerate((["m0", "m1"], ["m1", "m0"])):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgeclf.data"):
            rec = ensemble_runs([str(tmp_path / m) for m in members], str(tmp_path / f"e{k}"), read_test=False)
        assert rec["ensemble"]["from_folders"] and len(rec["ensemble"]["members"]) == 2
        assert sum(warning in r.getMessage() for r in caplog.records) == 1, members
    run["data"]["hash"] = "0" * 64  # another data set's hash
    (tmp_path / "m0" / "run.json").write_text(json.dumps(run))
    with pytest.raises(DataError, match="changed since") as exc:
        ensemble_runs([str(tmp_path / "m0"), str(tmp_path / "m1")], str(tmp_path / "e2"), read_test=False)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="other data"):
        ensemble_runs([str(tmp_path / "m1"), str(tmp_path / "m0")], str(tmp_path / "e3"), read_test=False)
    del run["data"]["hash"]  # a member recorded without any hash, beside one with
    (tmp_path / "m0" / "run.json").write_text(json.dumps(run))
    with pytest.raises(ConfigError, match="records no data hash"):
        ensemble_runs([str(tmp_path / "m0"), str(tmp_path / "m1")], str(tmp_path / "e4"), read_test=False)


def _copy_of(trained_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(trained_dir, to)
    return to


def test_a_bug_inside_load_pruned_keeps_its_traceback(trained_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclf.export.prune as prune
    from edgeclf.train import load_trained

    folder = _copy_of(trained_dir, tmp_path / "m")
    (folder / "pruned.json").write_text("{}")

    def broken(model: object, where: Path) -> object:
        raise RuntimeError("a bug in the rebuild code")  # not the folder's files: must not become a one-line ModelError

    monkeypatch.setattr(prune, "load_pruned", broken)
    with pytest.raises(RuntimeError, match="a bug in the rebuild code"):
        load_trained(folder)


def test_weights_that_are_not_this_models_are_a_one_line_model_error(trained_dir: Path, tmp_path: Path) -> None:
    import json as _json

    from safetensors.torch import save_file

    from edgeclf.errors import ModelError
    from edgeclf.models import create_model
    from edgeclf.train import load_trained

    meta = _json.loads((trained_dir / "model.json").read_text())
    other = _copy_of(trained_dir, tmp_path / "other")  # weights of another architecture
    net = create_model("mobilenet_v3_small", num_outputs=int(meta["num_outputs"]), in_chans=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(other / "model.safetensors"))
    cut = _copy_of(trained_dir, tmp_path / "cut")  # cut short by a copy
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    gone = _copy_of(trained_dir, tmp_path / "gone")
    (gone / "model.safetensors").unlink()
    damaged = _copy_of(trained_dir, tmp_path / "damaged")  # a pruned.json that is not JSON
    (damaged / "pruned.json").write_text("{not json")
    for folder, why in ((other, "Error"), (cut, "Error"), (gone, "Error"), (damaged, "pruned.json")):
        with pytest.raises(ModelError, match=why) as exc:
            load_trained(folder)
        assert "\n" not in str(exc.value), folder.name


# -- calibration over the frames `edgeclf run` classifies -----------------------------------------------------------

def _fits(folder: Path, ids: list[str], images: list[np.ndarray], y: np.ndarray,
          abstain: dict[str, str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A training folder's model on these frames: (temperature, *thresholds) fitted on the frames `edgeclf run` classifies
    (as export fits an imported model), and fitted on every frame."""
    from edgeclf.calibration import fit_decision_rule, fit_temperature
    from edgeclf.runtime.postprocess import probabilities
    from edgeclf.runtime.preprocess import Preprocessor
    from edgeclf.train import load_trained

    tm = load_trained(folder)
    lv = tm.logits(Preprocessor(tm.preprocess).batch(images))
    positive = tm.decision.positive if tm.decision.positive is not None else 1

    def fitted(rows: np.ndarray) -> tuple[float, ...]:
        t = fit_temperature(lv[rows], y[rows], tm.task)
        return (t, *fit_decision_rule(probabilities(lv[rows], tm.task, t), y[rows], tm.task, target_sensitivity=0.9,
                                      positive=positive).thresholds)

    kept = np.array([not abstain.get(i) for i in ids])
    return fitted(kept), fitted(np.ones(len(kept), bool))


def _calibrated_on(folder: Path, fit: tuple[float, ...]) -> bool:
    from edgeclf.train import load_trained

    tm = load_trained(folder)
    return (tm.temperature, *tm.decision.thresholds) == pytest.approx(fit, rel=1e-6, abs=1e-9)


def test_temperature_rule_and_val_figures_leave_out_the_frames_run_does_not_classify(tmp_path: Path) -> None:
    """Val frames run's quality gate stops (blank, with both labels) neither calibrate the model nor count in run.json's
    val figures, as export and evaluate treat them; trained without its test split, so no test read turns the gate on."""
    from edgeclf.data import load_dataset
    from edgeclf.evaluate import evaluate
    from tests.export.test_export_gated import BLANK, write_gated_clips

    data = write_gated_clips(tmp_path / "clips")
    out = tmp_path / "m"
    rec = train(TrainConfig(data=data, out=str(out), model="compact", size=32, epochs=1, patience=1, seed=0, threads=1,
                            read_test=False, frames_per_clip=4))
    ds = load_dataset(data, frames_per_clip=4, quality=True)
    va = ds.split("val")
    kept, every = _fits(out, va.ids, va.images, va.labels, ds.abstain)
    assert kept != pytest.approx(every, rel=1e-6), "the blank frames must move a fit over every frame"
    assert _calibrated_on(out, kept)
    val = rec["metrics"]["val"]
    assert val["n"] == 24 - BLANK and val["all_frames"]["n"] == 24
    assert val["abstained"] == BLANK and val["abstain_reasons"] == {"blank": BLANK}
    # The figures a reviewer reads in run.json are those `edgeclf evaluate` gives the folder on its val split.
    ev = evaluate(str(out), split="val", n_boot=500)["metrics"]
    for k in ("n", "accuracy", "balanced_accuracy", "confusion_matrix", "abstained", "abstain_reasons"):
        assert val[k] == ev[k], k


def _blank_ended_clips(root: Path, per_class: int = 8) -> str:
    """A pooled clip folder (no split folders, so it cross-validates), class b brighter; every clip of b turns black
    half-way (run's quality gate: "blank"): frames labelled b that look like nothing of b."""
    pytest.importorskip("cv2")
    from edgeclf.runtime.sources import open_source

    with open_source("synthetic:ultrasound?frames=200&size=64&seed=2") as s:
        frames = [f.image for f in s]
    k = 0
    for cls, gain in (("a", 1.0), ("b", 1.3)):
        for j in range(per_class):
            clip = [np.clip(f * gain, 0, 255).astype(np.uint8) for f in frames[k:k + 8]]
            k += 8
            if cls == "b":
                clip = clip[:4] + [np.zeros_like(f) for f in clip[4:]]
            write_gray_clip(root / cls / f"c{j}.avi", clip)
    return f"{root}?frames=4"


def test_cross_validation_folds_calibrate_on_the_frames_run_classifies(tmp_path: Path) -> None:
    """Each fold's inner validation split: the frames run's quality gate stops are counted beside its figures, left out of
    them and of its temperature, with or without the held-out folds read."""
    from edgeclf.data import load_folds

    data = _blank_ended_clips(tmp_path / "clips")
    res = train(TrainConfig(data=data, out=str(tmp_path / "cv"), model="compact", size=32, epochs=1, patience=1, seed=0,
                            threads=1, folds=2, group="clip", read_test=False))
    folds = load_folds(data, 2, seed=0, frames_per_clip=4, group="clip", quality=True)
    moved = 0
    for f, ds in zip(res["folds"], folds):
        va = ds.split("val")
        blank = sum(1 for i in va.ids if ds.abstain.get(i))
        run = json.loads((Path(f["out"]) / "run.json").read_text())
        assert run["metrics"]["val"]["abstained"] == f["val"]["abstained"] == blank
        assert run["metrics"]["val"]["n"] == f["val"]["n"] == len(va) - blank
        kept, every = _fits(Path(f["out"]), va.ids, va.images, va.labels, ds.abstain)
        assert _calibrated_on(Path(f["out"]), kept)
        moved += kept != pytest.approx(every, rel=1e-6)
    assert moved, "in some fold the blank frames must move a fit over every frame"


def _blank_val_images(root: Path, blank: tuple[str, ...] = ("a", "b")) -> str:
    """Images in train/ val/ test/ folders; the val images of the classes `blank` black (run's quality gate: "blank"),
    each one distinct."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                top = 6 if split == "val" and cls in blank else 256
                cv2.imwrite(str(root / split / cls / f"{i}.png"), rng.integers(0, top, (32, 32), np.uint8))
    return str(root)


def test_no_val_frame_run_classifies_is_refused_in_one_line_before_training(tmp_path: Path) -> None:
    data = _blank_val_images(tmp_path / "d")
    epochs: list[dict] = []
    with pytest.raises(DataError) as exc:
        train(TrainConfig(data=data, out=str(tmp_path / "m"), model="compact", size=32, epochs=1, patience=1, threads=1),
              on_epoch=epochs.append)
    msg = str(exc.value)
    assert "\n" not in msg and not epochs and not (tmp_path / "m").exists()
    assert "none of the 6 val frames" in msg and "is one `edgeclf run` classifies (it abstains on every one: blank: 6)" in msg
    assert "nothing to fit the model's temperature and decision rule on" in msg and "quality gate passes" in msg


def test_a_class_with_no_val_frame_run_classifies_is_refused_in_one_line_before_training(tmp_path: Path) -> None:
    """Every val image of b is one run's quality gate stops: no operating point for b can be fitted on what run classifies."""
    data = _blank_val_images(tmp_path / "d", blank=("b",))
    epochs: list[dict] = []
    with pytest.raises(DataError) as exc:
        train(TrainConfig(data=data, out=str(tmp_path / "m"), model="compact", size=32, epochs=1, patience=1, threads=1),
              on_epoch=epochs.append)
    msg = str(exc.value)
    assert "\n" not in msg and not epochs and not (tmp_path / "m").exists()
    assert "that `edgeclf run` classifies hold no images of b (it abstains on 3 of 6: blank: 3)" in msg


def test_a_cross_validation_folder_given_as_a_model_names_its_fold_folders(tmp_path: Path) -> None:
    """`train --folds K` writes one model per fold under its --out; giving that --out to export/evaluate/prune says so
    and names a fold folder, instead of telling the user to give the --out folder they just gave."""
    from edgeclf.errors import ModelError
    from edgeclf.train import load_trained

    cv = tmp_path / "cv"
    (cv / "fold-1").mkdir(parents=True)
    (cv / "fold-10").mkdir()
    (cv / "fold-0").mkdir()
    for d in ("fold-0", "fold-1", "fold-10"):
        (cv / d / "model.json").write_text("{}")
    (cv / "cv.json").write_text("{}")
    with pytest.raises(ModelError, match=r"cross-validation folder \(cv.json\).*\(fold-0, fold-1, fold-10\).*e\.g\. .*fold-0$"):
        load_trained(cv)
    with pytest.raises(ModelError, match="is not a training folder"):
        load_trained(tmp_path)
