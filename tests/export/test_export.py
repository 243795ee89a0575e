from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeclf.errors import ConfigError, ModelError
from edgeclf.evaluate import evaluate
from edgeclf.export.bundle_writer import ExportConfig, export_bundle
from edgeclf.runtime.bundle import load_bundle
from tests.conftest import TINY_DATA


def test_bundle_and_training_folder_evaluate_alike(trained_dir: Path, bundle_dir: Path, tmp_path: Path) -> None:
    a = evaluate(str(trained_dir), split="test", n_boot=200)
    b = evaluate(str(bundle_dir), split="test", n_boot=200, out=str(tmp_path / "ev"))
    assert a["evaluated_with"].startswith("training") and b["evaluated_with"].startswith("bundle")
    assert a["data"]["hash"] == b["data"]["hash"] and a["data"]["n"] == b["data"]["n"]
    assert abs(a["metrics"]["auc"]["macro"] - b["metrics"]["auc"]["macro"]) < 0.005
    assert a["metrics"]["confusion_matrix"] == b["metrics"]["confusion_matrix"]
    for f in ("metrics.json", "roc.png", "confusion.png"):
        assert (tmp_path / "ev" / f).stat().st_size > 500


def test_reference_samples_hold_preprocessed_inputs_and_outputs(bundle_dir: Path) -> None:
    m = load_bundle(bundle_dir).manifest
    with np.load(bundle_dir / "reference.npz", allow_pickle=False) as z:
        assert set(z.files) == {"inputs", "logits"}
        assert z["inputs"].shape[1:] == (1, 32, 32) and z["logits"].shape == (len(z["inputs"]), 3)
    assert m.raw["parity"]["max_abs_diff_logits"] < 1e-4 and m.raw["parity"]["min_cosine"] > 0.9999


def test_no_samples_and_overwrite(trained_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    export_bundle(ExportConfig(out=str(out), model=str(trained_dir), samples=False))
    assert not (out / "reference.npz").exists() and load_bundle(out).manifest.raw["reference"] is None
    with pytest.raises(ConfigError, match="already holds a bundle; pass --overwrite to replace it"):
        export_bundle(ExportConfig(out=str(out), model=str(trained_dir)))
    export_bundle(ExportConfig(out=str(out), model=str(trained_dir), overwrite=True))
    assert (out / "reference.npz").exists()


def test_from_torch_and_from_onnx(tmp_path: Path, bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    pkg = tmp_path / "usermodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "net.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(4, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from usermodels.net import make

    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file(make().state_dict(), str(tmp_path / "w.safetensors"))
    common = dict(labels="normal,cyst,mass", task="multiclass", size=32, channels=3, data=TINY_DATA)
    m = export_bundle(ExportConfig(out=str(tmp_path / "t"), from_torch="usermodels.net:make", weights=str(tmp_path / "w.safetensors"), **common))
    assert m["provenance"]["source"] == "torch" and m["parity"]["decision_agreement"] == 1.0
    assert m["postprocess"]["decision"]["kind"] == "max-ratio"  # fitted on the validation split, never a silent argmax
    m2 = export_bundle(ExportConfig(out=str(tmp_path / "o"), from_onnx=str(tmp_path / "t" / "model.onnx"), **common))
    assert m2["provenance"]["source"] == "onnx" and m2["model"]["opset"] == 17
    with pytest.raises(ModelError, match="do not fit"):
        bad = torch.nn.Linear(2, 2).state_dict()
        save_file(bad, str(tmp_path / "bad.safetensors"))
        export_bundle(ExportConfig(out=str(tmp_path / "x"), from_torch="usermodels.net:make", weights=str(tmp_path / "bad.safetensors"), **common))
    assert not (tmp_path / "x").exists()  # no half-written bundle
    with pytest.raises(ConfigError, match="exactly one"):
        ExportConfig(out="o", model="a", from_onnx="b")


def test_manifest_records_provenance(bundle_dir: Path, trained_dir: Path) -> None:
    m = json.loads((bundle_dir / "manifest.json").read_text())
    run = json.loads((trained_dir / "run.json").read_text())
    assert m["provenance"]["data"]["hash"] == run["data"]["hash"]
    assert m["provenance"]["training"]["config"]["model"] == "compact"
    assert m["metrics"]["val_onnx_fp32"]["n"] == m["parity"]["n"]
    assert m["postprocess"]["temperature"] == pytest.approx(run["model"]["temperature"])


def _user_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int = 1, dynamic: bool = False) -> Path:
    """A 3-class torch model exported by the user to ONNX (fixed batch of `batch` unless dynamic, output named 'scores')."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3))
    path = tmp_path / ("user-dynamic.onnx" if dynamic else f"user-{batch}.onnx" if batch != 1 else "user.onnx")
    axes = {"pixels": {0: "batch"}, "scores": {0: "batch"}} if dynamic else None
    torch.onnx.export(net, (torch.zeros(batch, 1, 32, 32),), str(path), opset_version=17, dynamo=False,
                      input_names=["pixels"], output_names=["scores"], dynamic_axes=axes)
    return path


def test_imported_onnx_with_fixed_batch_runs_and_is_honest_about_parity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _user_model(tmp_path, monkeypatch)
    common = dict(labels="normal,cyst,mass", task="multiclass", size=32, channels=1, data=TINY_DATA)
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), **common))
    assert "parity" not in m and m["provenance"]["parity"].startswith("not measured")
    assert m["model"]["input_name"] == "pixels" and m["model"]["output_name"] == "scores"
    assert m["model"]["input_shape"][0] == 1  # the fixed batch is recorded, not claimed dynamic
    r = evaluate(str(tmp_path / "b"), split="test", n_boot=50)  # batches of 64 fed one at a time
    assert r["data"]["n"] > 1
    # Calibration always uses the validation split, whatever split feeds parity and the samples.
    m2 = export_bundle(ExportConfig(out=str(tmp_path / "b2"), from_onnx=str(src), split="test", **common))
    assert m2["postprocess"] == m["postprocess"] and m2["reference"]["split"] == "test"


def test_ort_logits_handles_a_split_not_a_multiple_of_the_fixed_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.export.bundle_writer import _ort_logits

    fixed, dynamic = _user_model(tmp_path, monkeypatch, batch=4), _user_model(tmp_path, monkeypatch, dynamic=True)
    x = np.random.default_rng(0).normal(size=(6, 1, 32, 32)).astype(np.float32)  # a last chunk of 2 for a batch of 4
    out = _ort_logits(fixed, x)
    assert out.shape == (6, 3)  # the padding's outputs are dropped
    np.testing.assert_allclose(out, _ort_logits(dynamic, x), rtol=1e-5, atol=1e-6)


def test_imported_onnx_with_a_fixed_batch_not_dividing_the_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """36 val and 36 test images, batches of exactly 5: export, its reference check and evaluate all run."""
    src = _user_model(tmp_path, monkeypatch, batch=5)
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), labels="normal,cyst,mass", task="multiclass",
                                   size=32, channels=1, data=TINY_DATA))
    assert m["model"]["input_shape"][0] == 5 and m["metrics"]["val_onnx_fp32"]["n"] == 36
    # The device re-runs the 36 reference inputs as they are: its backend pads the last call of 1 to a batch of 5.
    assert m["reference"]["count"] == 36
    from edgeclf.runtime.app import verify_bundle

    assert verify_bundle(str(tmp_path / "b"))["reference"]["n"] == 36
    r = evaluate(str(tmp_path / "b"), split="test", n_boot=50)
    assert r["data"]["n"] == 36 and r["metrics"]["n"] == 36


def test_imported_labels_must_match_the_data_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.errors import DataError

    src = _user_model(tmp_path, monkeypatch)
    with pytest.raises(DataError, match="same order"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), labels="mass,cyst,normal", task="multiclass",
                                   size=32, channels=1, data=TINY_DATA))
    with pytest.raises(ConfigError, match="--positive"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(src), labels="normal,cyst,mass", task="multiclass",
                                   size=32, channels=1, data=TINY_DATA, positive="tumour"))
    (tmp_path / "junk.onnx").write_text("not a model")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(tmp_path / "junk.onnx"), labels="normal,cyst,mass",
                                   task="multiclass", size=32, channels=1, data=TINY_DATA))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_failed_overwrite_keeps_the_old_bundle(trained_dir: Path, tmp_path: Path) -> None:
    from edgeclf.errors import DataError

    out = tmp_path / "b"
    export_bundle(ExportConfig(out=str(out), model=str(trained_dir)))
    before = (out / "checksums.sha256").read_text()
    with pytest.raises(DataError):
        export_bundle(ExportConfig(out=str(out), model=str(trained_dir), data=str(tmp_path / "missing"), overwrite=True))
    assert (out / "checksums.sha256").read_text() == before
    load_bundle(out)


def test_bundle_carries_no_workstation_paths(bundle_dir: Path, trained_dir: Path) -> None:
    text = (bundle_dir / "manifest.json").read_text()
    assert str(trained_dir) not in text and str(Path.home()) + "/" not in text and "/tmp/" not in text


def _copy_trained(trained_dir: Path, tmp_path: Path, edit) -> Path:
    import shutil

    dst = tmp_path / "trained"
    shutil.copytree(trained_dir, dst)
    run = json.loads((dst / "run.json").read_text())
    edit(run)
    (dst / "run.json").write_text(json.dumps(run))
    return dst


def test_data_changed_since_training_is_refused(trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.errors import DataError
    from edgeclf.export import bundle_writer

    def edit(run: dict) -> None:
        run["data"]["hash"] = "0" * 64  # as if images were added to the folder after training
        run["config"]["frames_per_clip"] = 5

    src = _copy_trained(trained_dir, tmp_path, edit)
    seen: list[int] = []
    real = bundle_writer.load_dataset

    def spy(*args, **kw):
        seen.append(kw.get("frames_per_clip"))
        return real(*args, **kw)

    monkeypatch.setattr(bundle_writer, "load_dataset", spy)
    with pytest.raises(DataError, match="changed since the model was trained .* restore the data as it was or retrain"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(src)))
    assert seen == [5]  # clip models are gated on the frames they were validated on
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


@pytest.mark.parametrize("skew", [5.0, 0.01])
def test_parity_checks_outputs_not_only_decisions(trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    import edgeclf.train as train_mod
    from edgeclf.export.onnx_export import ExportError
    from edgeclf.runtime.postprocess import decide, probabilities

    real, tm = train_mod.torch_logits, train_mod.load_trained(str(trained_dir))

    def skewed(model, x):  # raise each decided class's logit: same decisions, different outputs
        out = real(model, x).astype(np.float32)
        out[np.arange(len(out)), decide(probabilities(out, tm.task, tm.temperature), tm.decision)] += skew
        return out

    monkeypatch.setattr(train_mod, "torch_logits", skewed)
    with pytest.raises(ExportError, match="beyond the fp32 tolerance 0.001"):
        export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(trained_dir)))
    assert not (tmp_path / "b").exists()


def test_bundle_is_readable_by_other_users_and_records_pruning_cost(trained_dir: Path, tmp_path: Path) -> None:
    import os
    import stat

    before = {"auc_macro": 0.9, "balanced_accuracy": 0.8}
    src = _copy_trained(trained_dir, tmp_path, lambda run: run.update(
        pruning={"target_macs": 0.5, "macs": {"ratio": 0.5}, "pays": False, "verdict": "v", "parent": "p", "metrics_before": before}))
    old = os.umask(0o022)
    try:
        m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(src)))
    finally:
        os.umask(old)
    out = tmp_path / "b"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # mkdtemp's 0700 would shut out the service user
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert m["provenance"]["pruning"]["metrics_before"] == before
    assert json.loads((out / "manifest.json").read_text())["provenance"]["pruning"]["metrics_before"] == before


def test_from_onnx_with_external_data_is_stored_as_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    src = _user_model(tmp_path, monkeypatch)
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(onnx.load(str(src)), str(ext / "user.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="user.onnx.data", size_threshold=0)
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), from_onnx=str(ext / "user.onnx"), labels="normal,cyst,mass",
                                   task="multiclass", size=32, channels=1, data=TINY_DATA))
    assert m["provenance"]["source"] == "onnx"
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.initializer)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checksums.sha256", "manifest.json", "model.onnx", "reference.npz"]


def test_from_torch_user_mistakes_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    pkg = tmp_path / "usermistakes"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "def needs_args(num_classes):\n"
        "    return torch.nn.Linear(4, num_classes)\n"
        "def not_a_module():\n"
        "    return {'weight': torch.zeros(3, 4)}\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 3))\n"
        "class Pair(torch.nn.Linear):\n"
        "    def forward(self, x):\n"
        "        return super().forward(x.flatten(1)), x\n"
        "class Named(torch.nn.Linear):\n"
        "    def forward(self, x):\n"
        "        return {'logits': super().forward(x.flatten(1))}\n"
        "def with_features():\n"
        "    return Pair(1024, 3)\n"
        "def as_dict():\n"
        "    return Named(1024, 3)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    save_file({"weight": torch.zeros(3, 1024), "bias": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    common = dict(labels="normal,cyst,mass", task="multiclass", size=32, channels=1, data=TINY_DATA, weights=str(tmp_path / "w.safetensors"))
    cases = [("needs_args", "with no arguments .*num_classes"), ("not_a_module", "returned a dict, not a torch.nn.Module"),
             ("make", "do not fit .*missing keys 1.bias, 1.weight; unexpected keys bias, weight"),
             # forward must return the logits alone: checked on one image before anything is exported
             ("with_features", r"returns a tuple of \(Tensor \(1, 3\), Tensor \(1, 1, 32, 32\)\); .*\(N, K\).*logits only"),
             ("as_dict", r"returns a dict with keys logits; .*wrap the model")]
    for fn, match in cases:
        with pytest.raises(ModelError, match=match) as info:
            export_bundle(ExportConfig(out=str(tmp_path / "x"), from_torch=f"usermistakes:{fn}", **common))
        assert "\n" not in str(info.value)
    save_file({"1.weight": torch.zeros(3, 100), "1.bias": torch.zeros(3)}, str(tmp_path / "s.safetensors"))
    with pytest.raises(ModelError, match=r"shape mismatch 1.weight \(3, 100\) vs \(3, 1024\)"):
        export_bundle(ExportConfig(out=str(tmp_path / "x"), from_torch="usermistakes:make", **{**common, "weights": str(tmp_path / "s.safetensors")}))
    assert not (tmp_path / "x").exists()


def test_an_operator_opset_17_lacks_is_one_line(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from edgeclf.export.onnx_export import ExportError, export_onnx

    class Median(torch.nn.Module):  # aten::median has no ONNX form at opset 17
        def forward(self, x):  # type: ignore[no-untyped-def]
            return torch.median(x.flatten(1), dim=1)[0][:, None].repeat(1, 3)

    with pytest.raises(ExportError, match="torch cannot export this model to ONNX opset 17 .*aten::median.*--from-onnx") as info:
        export_onnx(Median(), np.zeros((2, 1, 8, 8), np.float32), tmp_path / "m.onnx")
    assert "\n" not in str(info.value)


def test_imported_binary_model_decides_for_the_datas_positive_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As `edgeclf train` does: BreastMNIST's positive class is malignant (index 0), not labels[1]; --positive overrides."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 24), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    data = tmp_path / "breastmnist.npz"  # a MedMNIST file name: labels malignant, normal_or_benign; positive malignant
    np.savez(data, **arrays)
    pkg = tmp_path / "binmodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(4, 1))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from binmodels import make

    torch.manual_seed(0)
    save_file(make().state_dict(), str(tmp_path / "w.safetensors"))
    common = dict(from_torch="binmodels:make", weights=str(tmp_path / "w.safetensors"), labels="malignant,normal_or_benign",
                  task="binary", size=28, channels=1, data=str(data), samples=False)
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), **common))
    assert m["postprocess"]["decision"]["positive"] == 0
    m = export_bundle(ExportConfig(out=str(tmp_path / "b2"), positive="normal_or_benign", **common))
    assert m["postprocess"]["decision"]["positive"] == 1
    with pytest.raises(ConfigError, match="--positive applies to binary tasks only") as info:
        ExportConfig(out=str(tmp_path / "x"), **{**common, "task": "multiclass", "positive": "malignant"})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("flag, value", [("--mean", "nan"), ("--std", "0.25,inf,0.25")])
def test_non_finite_mean_or_std_is_refused_naming_the_flag(tmp_path: Path, flag: str, value: str) -> None:
    """A flag's mistake is named as such, before any data is read, not blamed on the model's logits later."""
    from edgeclf.export.bundle_writer import _floats

    with pytest.raises(ConfigError, match=f"^{flag} .*finite.*") as info:
        ExportConfig(out=str(tmp_path / "b"), from_onnx=str(tmp_path / "m.onnx"), labels="a,b,c", task="multiclass", size=32,
                     data=TINY_DATA, **{flag[2:]: value})
    assert "\n" not in str(info.value)
    assert _floats("0.5,1e3", 2, 0.0, "--mean") == (0.5, 1000.0)
    with pytest.raises(ConfigError, match="^--std 'x' is not a comma-separated list of numbers"):
        _floats("x", 1, 0.25, "--std")


def test_cli_non_finite_mean_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from edgeclf.export.onnx_export import export_onnx
    from edgeclf.models import create_model
    from tests.conftest import run_cli

    torch.manual_seed(0)
    onnx_path = tmp_path / "m.onnx"
    export_onnx(create_model("compact", num_outputs=3, in_chans=1), np.zeros((1, 1, 32, 32), np.float32), onnx_path)
    r = run_cli("export", "--from-onnx", str(onnx_path), "--labels", "normal,cyst,mass", "--task", "multiclass", "--size", "32",
                "--channels", "1", "--mean", "nan", "--data", TINY_DATA, "--out", str(tmp_path / "b"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeclf: error: --mean 'nan'") and "finite" in lines[0], r.stderr
    assert not (tmp_path / "b").exists()


def test_deploy_reason_names_the_recipe_that_chose_the_precision(trained_dir: Path, tmp_path: Path) -> None:
    """A recipe's [export] precision, recorded in run.json, is no user's request: the reason says where it came from."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_dir, run)
    doc = json.loads((run / "run.json").read_text())
    doc["recipe"] = {"name": "tiny-recipe", "version": 1, "export": {"precision": "fp32", "max_drop": 0.01}}
    (run / "run.json").write_text(json.dumps(doc))
    m = export_bundle(ExportConfig(out=str(tmp_path / "b"), model=str(run), samples=False))
    reason = m["deploy"]["reason"]
    assert m["deploy"]["precision"] == "fp32" and "recipe tiny-recipe's [export] settings" in reason
    assert "requested" not in reason and "--precision" not in reason


def test_deploy_reason_of_the_default_precision_says_default(bundle_dir: Path) -> None:
    reason = load_bundle(bundle_dir).manifest.raw["deploy"]["reason"]
    assert "default" in reason and "requested" not in reason and "recipe" not in reason
