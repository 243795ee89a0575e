"""Structured pruning to a MAC budget: valid pruned models, ONNX parity, a pickle-free round trip."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeclf.errors import ConfigError, MissingExtraError, ModelError

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
ort = pytest.importorskip("onnxruntime")

from edgeclf.export.onnx_export import export_onnx  # noqa: E402
from edgeclf.export.prune import count_macs, load_pruned, ort_latency, prune_step, save_pruned  # noqa: E402
from edgeclf.models import create_model  # noqa: E402

SIZE = 32
MODELS = ["compact", "resnet18", "mobilenet_v3_small", "efficientnet_lite0"]


def _model(name: str, seed: int = 0, num_outputs: int = 3) -> Any:
    """An untrained registry model whose logits depend on the input: random BatchNorm scales and shifts, and
    statistics measured on random images (untrained MobileNetV3 otherwise gives the same logits for every image)."""
    from torch import nn

    torch.manual_seed(seed)
    m = create_model(name, num_outputs=num_outputs, in_chans=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
                mod.reset_running_stats()
                mod.momentum = None  # cumulative average over the batches below
        m.train()
        for i in range(2):
            m(_x(8, seed=100 + i))
    return m.eval()


def _convs(m: Any) -> dict[str, Any]:
    return {n: c for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d)}


def _x(n: int, seed: int = 1) -> Any:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 1, SIZE, SIZE)).astype(np.float32))


@pytest.mark.parametrize("name", MODELS)
def test_prune_to_half_the_macs_keeps_a_valid_exportable_model(name: str, tmp_path: Path) -> None:
    model = _model(name)
    x, example = _x(4), _x(1, seed=2)
    with torch.no_grad():
        y0 = model(x)
    assert float(y0.std(0).mean()) > 1e-3  # the logits depend on the input
    before = {n: (c.out_channels, c.in_channels, c.groups) for n, c in _convs(model).items()}
    head_before = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.shape[0]
    macs0, params0 = count_macs(model, example)

    r = prune_step(model, example, target_macs_ratio=0.5)

    assert (r["macs_before"], r["params_before"]) == (macs0, params0)
    assert 0.40 <= r["macs_after"] / macs0 <= 0.52 and r["ratio"] == pytest.approx(r["macs_after"] / macs0)
    assert count_macs(model, example) == (r["macs_after"], r["params_after"]) and r["params_after"] < 0.7 * params0
    after = _convs(model)
    assert after.keys() == before.keys()
    changed = 0
    for n, c in after.items():
        out0, in0, groups0 = before[n]
        assert c.out_channels <= out0 and c.weight.shape[0] == c.out_channels
        if c.out_channels != out0:
            changed += 1
            assert c.out_channels % 8 == 0, f"{n}: {out0} -> {c.out_channels} channels"
        if groups0 > 1 and groups0 == in0 == out0:  # depthwise stays depthwise
            assert c.groups == c.in_channels == c.out_channels
        assert c.weight.shape[1] * c.groups == c.in_channels
    assert changed >= 0.5 * len(after)
    stem = next(iter(after.values()))
    assert stem.in_channels == 1  # the input is never pruned

    with torch.no_grad():
        y = model(x)
    assert y.shape == y0.shape == (4, 3)
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.shape[0] == head_before

    path = tmp_path / "pruned.onnx"
    assert export_onnx(model, x.numpy(), path)["opset"] == 17
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    scale = float(y.abs().max())
    np.testing.assert_allclose(got, y.numpy(), rtol=1e-4, atol=1e-5 * scale)

    # round trip: JSON structure + safetensors weights, onto a fresh unpruned model of the same kind
    folder = tmp_path / "saved"
    save_pruned(model, folder, record=r)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "pruned.json"]
    raw = (folder / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header_len])["__metadata__"]["format"] == "edgeclf.pruned"
    meta = json.loads((folder / "pruned.json").read_text())
    assert meta["format"] == "edgeclf.pruned" and meta["pruning"]["macs_after"] == r["macs_after"]
    for blob in (raw[:2], (folder / "pruned.json").read_bytes()[:2]):
        assert blob[:1] != b"\x80" and blob != b"PK"  # neither pickle nor torch.save's zip
    fresh = _model(name, seed=5)
    loaded = load_pruned(fresh, folder)
    assert loaded is fresh and not loaded.training
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert {n: (c.out_channels, c.in_channels, c.groups) for n, c in _convs(loaded).items()} == \
        {n: (c.out_channels, c.in_channels, c.groups) for n, c in after.items()}


def test_bad_ratio_options_and_unreachable_targets_are_config_errors() -> None:
    model, example = _model("compact"), _x(1)
    for bad in (0, 0.0, 1, 1.5, -0.2, float("nan"), True, "0.5"):
        with pytest.raises(ConfigError, match="target MACs ratio"):
            prune_step(model, example, target_macs_ratio=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="round_to"):
        prune_step(model, example, target_macs_ratio=0.5, round_to=0)
    with pytest.raises(ConfigError, match="importance"):
        prune_step(model, example, target_macs_ratio=0.5, importance="taylor")
    with pytest.raises(ConfigError, match="expected a float tensor"):
        prune_step(model, torch.zeros(1, SIZE, SIZE), target_macs_ratio=0.5)
    with pytest.raises(ConfigError, match="cannot reach"):
        prune_step(model, example, target_macs_ratio=0.001)
    assert all(c.out_channels in (32, 64, 128, 256) for c in _convs(model).values())  # nothing was pruned


def test_missing_torch_pruning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # None in sys.modules: the import fails
    with pytest.raises(MissingExtraError, match=r"pip install 'edgeclf\[train\]'"):
        prune_step(_model("compact"), _x(1), target_macs_ratio=0.5)


@pytest.fixture(scope="module")
def saved_compact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = _model("compact")
    prune_step(model, _x(1), target_macs_ratio=0.5)
    folder = tmp_path_factory.mktemp("pruned") / "compact"
    save_pruned(model, folder)
    return folder


def test_load_refuses_another_model_or_edited_files(saved_compact: Path, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(ModelError, match="another architecture"):
        load_pruned(_model("resnet18"), saved_compact)
    with pytest.raises(ModelError, match="num_outputs"):
        load_pruned(_model("compact", num_outputs=5), saved_compact)
    with pytest.raises(ModelError, match="in_chans"):
        load_pruned(create_model("compact", num_outputs=3, in_chans=3), saved_compact)
    with pytest.raises(ModelError, match="no pruned.json"):
        load_pruned(_model("compact"), tmp_path)

    edited = tmp_path / "edited"
    shutil.copytree(saved_compact, edited)
    meta = json.loads((edited / "pruned.json").read_text())
    conv = next(e for e in meta["modules"] if e["name"] == "stage2.conv")
    conv["attrs"]["out_channels"] -= 8
    (edited / "pruned.json").write_text(json.dumps(meta))
    fresh = _model("compact")
    with pytest.raises(ModelError, match=r"stage2\.conv\.weight is \("):
        load_pruned(fresh, edited)
    assert fresh.stage2.conv.out_channels == 64  # nothing was changed before the check failed

    (edited / "pruned.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ModelError, match="not an edgeclf.pruned file"):
        load_pruned(_model("compact"), edited)
    (edited / "pruned.json").write_bytes(b"\x80\x04\x95 a pickle")
    with pytest.raises(ModelError, match="not readable JSON"):
        load_pruned(_model("compact"), edited)


def test_ort_latency_times_both_models_interleaved() -> None:
    before, after = _model("compact"), _model("compact")
    prune_step(after, _x(1), target_macs_ratio=0.5)
    lat = ort_latency(before, after, (1, SIZE, SIZE), runs=5, warmup=1, threads=1)
    assert lat["before"]["runs"] == lat["after"]["runs"] == 5
    assert lat["before"]["median"] > 0 and lat["after"]["median"] > 0
    assert lat["speedup"] == pytest.approx(lat["before"]["median"] / lat["after"]["median"])
    with pytest.raises(ConfigError, match="example size"):
        ort_latency(before, after, (SIZE, SIZE))  # type: ignore[arg-type]
