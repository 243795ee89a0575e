"""Recipes: packaged TOML files load and resolve; precedence defaults < recipe < CLI; the run records its recipe."""
from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pytest

from edgeclf.errors import ConfigError, EdgeclfError
from edgeclf.recipes import RECIPE_DIR, list_recipes, load_recipe, resolve_recipe
from tests.conftest import run_cli, shared

RECIPES = ["brain-mri", "breast-us", "chest-xray", "lung-pocus"]


def test_packaged_recipes_load_and_build_configs() -> None:
    from edgeclf.train import TrainConfig

    assert set(RECIPES) <= set(list_recipes())
    datas = {"brain-mri": ["/d/brain_mri"], "breast-us": ["/d/busi", "/d/medmnist/breastmnist.npz"],
             "chest-xray": ["/d/medmnist/pneumoniamnist.npz"], "lung-pocus": ["/d/pocus"]}
    for name in RECIPES:
        r = load_recipe(name)
        assert r.name == name and r.version >= 1 and r.description and len(r.sha256) == 64
        for data in datas[name]:
            kwargs, spec, rec = resolve_recipe(r, data, {})
            TrainConfig(data=spec, out="x", **kwargs)  # every value passes TrainConfig's validation
            assert rec["name"] == name and rec["export"].get("precision") in ("auto", "fp32")
            # The thread count is part of the computation: each recipe names the one its figure used.
            assert isinstance(kwargs["threads"], int) and kwargs["threads"] >= 1
            assert resolve_recipe(r, data, {"threads": 4})[0]["threads"] == 4  # the CLI still overrides it
            assert spec.startswith(data)
    # The variant follows the data: BreastMNIST takes the compact CNN and no folder options.
    kwargs, spec, rec = resolve_recipe(load_recipe("breast-us"), "/d/breastmnist.npz", {})
    assert spec == "/d/breastmnist.npz" and kwargs["model"] == "compact" and rec["variant"] == "breastmnist"
    assert kwargs["ensemble"] == 1  # the variant's figure is one model's: it does not inherit BUSI's ensemble
    kwargs, spec, rec = resolve_recipe(load_recipe("breast-us"), "/d/busi", {})
    assert spec == "/d/busi?split=busi" and kwargs["model"] == "efficientnet_lite0" and rec["variant"] is None
    assert kwargs["ensemble"] == 5
    kwargs, spec, _ = resolve_recipe(load_recipe("lung-pocus"), "/d/pocus", {})
    assert spec == "/d/pocus?frames=24&roi=sector" and kwargs["folds"] == 5 and kwargs["group"] == "source"
    assert "viral" not in kwargs["classes"]


def test_cli_values_win_and_options_given_win() -> None:
    r = load_recipe("lung-pocus")
    kwargs, spec, rec = resolve_recipe(r, "/d/pocus?frames=4", {"epochs": 2, "size": 64})
    assert kwargs["epochs"] == 2 and kwargs["size"] == 64 and kwargs["model"] == "efficientnet_lite0"
    assert spec == "/d/pocus?frames=4&roi=sector"  # the spec's own frames=4 wins over the recipe's
    assert rec["overridden"] == ["epochs", "size"]


def test_bad_recipes_are_one_line_errors(tmp_path: Path) -> None:
    cases = {
        "unknown.toml": 'name = "x"\n[train]\nepochz = 3\n',
        "type.toml": '[train]\nepochs = "many"\n',
        "top.toml": 'colour = 1\n',
        "export.toml": '[export]\nprecision = "auto"\nmagic = 1\n',
        "broken.toml": '[train\n',
    }
    for fname, text in cases.items():
        (tmp_path / fname).write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_recipe(str(tmp_path / fname))
        msg = str(exc.value)
        assert msg and "\n" not in msg, msg
    with pytest.raises(ConfigError) as exc:
        load_recipe(str(tmp_path / "unknown.toml"))
    assert "train.epochz" in str(exc.value)
    with pytest.raises(EdgeclfError, match="allowed: brain-mri"):
        load_recipe("no-such-recipe")


def test_train_with_recipe_records_it(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('name = "tiny"\nversion = 3\ndescription = "test"\n[train]\nmodel = "compact"\nsize = 32\nepochs = 3\n'
                      'patience = 2\nlr = 0.004\n[export]\nprecision = "fp16"\nmax_drop = 0.05\n')
    out = tmp_path / "run"
    res = run_cli("train", "--recipe", str(recipe), "--data", "synthetic:ultrasound?n=120&size=48&seed=1", "--out", str(out),
                  "--epochs", "1", "--threads", "1", "--json")
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["epochs"] == 1  # CLI flag wins over the recipe's 3
    assert run["config"]["size"] == 32 and run["config"]["lr"] == 0.004  # recipe over defaults
    assert run["config"]["patience"] == 2 and run["config"]["recipe"] == "tiny"
    assert run["recipe"]["export"] == {"precision": "fp16", "max_drop": 0.05}
    assert run["recipe"]["version"] == 3 and run["recipe"]["overridden"] == ["epochs"]
    assert run["recipe"]["sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert (out / "recipe.toml").read_text() == recipe.read_text()

    # export --model RUN applies the recorded [export] table without being told again ...
    res = run_cli("export", "--model", str(out), "--out", str(tmp_path / "b1"))
    assert res.returncode == 0, res.stderr
    assert "recipe tiny: export settings precision=fp16, max_drop=0.05" in res.stderr
    m1 = json.loads((tmp_path / "b1" / "manifest.json").read_text())
    assert [v["precision"] for v in m1["variants"]] == ["fp16"]
    assert m1["provenance"]["recipe"]["name"] == "tiny" and m1["provenance"]["recipe"]["export"]["max_drop"] == 0.05
    # ... and a flag on the command line wins over it.
    res = run_cli("export", "--model", str(out), "--out", str(tmp_path / "b2"), "--precision", "fp32", "--json")
    assert res.returncode == 0, res.stderr
    m2 = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert m2["variants"] == [] and m2["deploy"]["precision"] == "fp32"


def _read_list(name: str) -> list[dict[str, str]]:
    with open(RECIPE_DIR / "splits" / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@pytest.mark.parametrize("name", ["brain-mri", "busi"])
def test_committed_split_lists_are_consistent(name: str) -> None:
    rows = _read_list(name)
    assert len({r["path"] for r in rows}) == len(rows)
    by_group: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        assert r["split"] in ("train", "val", "test", "duplicate") and len(r["sha256"]) == 16
        if r["split"] != "duplicate":
            by_group[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in by_group.values())  # no group of near copies straddles splits
    kept = [r for r in rows if r["split"] != "duplicate"]
    assert len({r["sha256"] for r in kept}) == len(kept)  # no exact copies left
    test_share = sum(r["split"] == "test" for r in kept) / len(kept)
    assert 0.17 < test_share < 0.23


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "folder", "n"), [("brain-mri", "brain_mri", 5708), ("busi", "busi", 624)])
def test_committed_split_lists_match_the_data(name: str, folder: str, n: int) -> None:
    root = shared(folder)
    rows = _read_list(name)
    assert len(rows) == n
    for r in rows:
        assert hashlib.sha256((root / r["path"]).read_bytes()).hexdigest().startswith(r["sha256"]), r["path"]


def test_recipe_can_ask_for_test_time_augmentation(tmp_path: Path) -> None:
    from edgeclf.cli import train as train_cmd
    from edgeclf.models import TTA_MODES

    path = tmp_path / "t.toml"
    path.write_text('name = "t"\nversion = 1\ndescription = "x"\n[train]\nmodel = "compact"\ntta = "hflip"\n')
    kwargs, _, _ = resolve_recipe(load_recipe(str(path)), "/d/x", {})
    assert kwargs["tta"] == "hflip"
    choices = next(p for p in train_cmd.params if p.name == "tta").type.choices  # type: ignore[attr-defined]
    assert tuple(choices) == TTA_MODES


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "recipe", "folder"), [("brain-mri", "brain-mri", "brain_mri"), ("busi", "breast-us", "busi")])
def test_no_near_copy_crosses_the_committed_split(name: str, recipe: str, folder: str) -> None:
    """Recomputed from the images: no two files on different sides lie within the recipe's `near` bits."""
    import numpy as np

    from edgeclf.data import _read_image, near_hash

    root = shared(folder)
    near = int(load_recipe(recipe).splits["near"])
    rows = [r for r in _read_list(name) if r["split"] != "duplicate"]
    h = np.stack([np.frombuffer(near_hash(_read_image(root / r["path"])), np.uint8) for r in rows])
    split = np.array([r["split"] for r in rows])
    bits = np.array([bin(i).count("1") for i in range(256)], np.uint8)
    for i in range(len(rows) - 1):
        close = np.flatnonzero(bits[np.bitwise_xor(h[i + 1 :], h[i])].sum(1, dtype=np.int32) <= near) + i + 1
        assert (split[close] == split[i]).all(), (rows[i]["path"], [rows[j]["path"] for j in close if split[j] != split[i]])


def test_split_list_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeclf.recipes import main

    assert main(["splits", "no-such-recipe", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m edgeclf.recipes: error:") and "allowed: brain-mri" in err and "\n" not in err
    assert main(["splits", "breast-us", "--data", str(tmp_path / "nowhere")]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
