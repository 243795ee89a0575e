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
    assert kwargs["frames_per_clip"] == 24  # run.json's config records the frames sampled, not the default 8


def test_a_renamed_copy_of_breastmnist_takes_the_breastmnist_variant(tmp_path: Path) -> None:
    """The variant went by file name: `BreastMNIST (1).npz` took BUSI's settings (folder options, a 5-model ensemble)
    and was refused with a `?split=busi` error. The data is known by its content, so the variant is too."""
    import shutil

    copy = tmp_path / "BreastMNIST (1).npz"
    shutil.copyfile(shared("medmnist", "breastmnist.npz"), copy)
    kwargs, spec, rec = resolve_recipe(load_recipe("breast-us"), str(copy), {})
    assert rec["variant"] == "breastmnist" and spec == str(copy) and kwargs["model"] == "compact", (rec, spec)


def test_cli_values_win_and_options_given_win() -> None:
    r = load_recipe("lung-pocus")
    kwargs, spec, rec = resolve_recipe(r, "/d/pocus?frames=4", {"epochs": 2, "size": 64})
    assert kwargs["epochs"] == 2 and kwargs["size"] == 64 and kwargs["model"] == "efficientnet_lite0"
    assert spec == "/d/pocus?frames=4&roi=sector"  # the spec's own frames=4 wins over the recipe's
    assert kwargs["frames_per_clip"] == 4
    assert rec["overridden"] == ["data.frames", "epochs", "size"]  # the spec overrode the recipe's frames=24


def test_synthetic_data_records_the_recipe_data_options_as_not_applied() -> None:
    """run.json must say what was applied: synthetic data takes no folder options (no sector crop, no frames=N)."""
    _, spec, rec = resolve_recipe(load_recipe("lung-pocus"), "synthetic:ultrasound", {})
    assert spec == "synthetic:ultrasound"
    assert rec["data_options"] == {} and rec["data_options_not_applied"] == {"roi": "sector", "frames": 24}
    _, _, rec = resolve_recipe(load_recipe("lung-pocus"), "/d/pocus", {})
    assert rec["data_options"] == {"roi": "sector", "frames": 24} and "data_options_not_applied" not in rec


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
    # The recipe's gate setting is not announced as applied where the precision used never applies it.
    res = run_cli("export", "--model", str(out), "--out", str(tmp_path / "b3"), "--precision", "fp32")
    assert res.returncode == 0 and "max_drop" not in res.stderr, res.stderr


def test_every_training_field_has_a_flag() -> None:
    """The issue's rule: any recipe field overridable from the CLI (data, out and recipe are not settings)."""
    import dataclasses

    from edgeclf.cli import cli
    from edgeclf.train import TrainConfig

    params = {p.name: p for p in cli.commands["train"].params}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "out", "recipe"}
    assert fields <= set(params), sorted(fields - set(params))
    assert "--no-pretrained" in params["pretrained"].secondary_opts  # a recipe's pretrained = true can be undone
    assert "--test" in params["read_test"].opts and "--no-test" in params["read_test"].secondary_opts


def test_flags_override_a_recipes_read_test_and_weight_decay(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    recipe = tmp_path / "quiet.toml"
    recipe.write_text('name = "quiet"\n[train]\nmodel = "compact"\nsize = 32\nepochs = 1\nread_test = false\nweight_decay = 0.5\n'
                      'pretrained = false\n')
    out = tmp_path / "run"
    res = run_cli("train", "--recipe", str(recipe), "--data", "synthetic:ultrasound?n=90&size=40&seed=2", "--out", str(out),
                  "--threads", "1", "--test", "--weight-decay", "0.01", "--no-pretrained", "--json")
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["read_test"] is True and run["config"]["weight_decay"] == 0.01 and run["config"]["pretrained"] is False
    assert run["recipe"]["overridden"] == ["read_test", "weight_decay"]  # --no-pretrained says what the recipe says
    assert run["metrics"].get("test")  # the recipe's read_test = false was overridden: the test split was read


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


def test_recipe_tables_are_type_checked_when_loaded(tmp_path: Path) -> None:
    """[data], [splits], [export], [evaluate], [reference] and the variants' tables: a wrong type or an unknown key
    is one ConfigError line when the recipe is read (was: a TypeError traceback later, or nothing at all)."""
    cases = {
        "data_type.toml": ('[data]\nframes = "24"\n', "data.frames"),
        "data_value.toml": ('[data]\ndedup = "nearr"\n', "dedup"),
        "splits_type.toml": ('[splits]\nnear = "30"\n', "splits.near"),
        "export_type.toml": ('[export]\nqat_epochs = "4"\n', "export.qat_epochs"),
        "evaluate_value.toml": ('[evaluate]\naggregate = "median"\n', "aggregate"),
        "reference.toml": ('reference = "a paper"\n', "reference"),
        "variant_splits.toml": ('[variants.x]\nsplits = { bogus = 1 }\n', "variants.x.splits.bogus"),
        "variant_data.toml": ('[variants.x]\ndata = { frames = "3" }\n', "variants.x.data.frames"),
        "variant_reference.toml": ('[variants.x]\nreference = "x"\n', "variants.x.reference"),
        "variants_list.toml": ('variants = [{ a = 1 }]\n', "variants must be a table"),  # was: unhashable dict TypeError
    }
    for fname, (text, words) in cases.items():
        (tmp_path / fname).write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_recipe(str(tmp_path / fname))
        msg = str(exc.value)
        assert words in msg and "\n" not in msg, (fname, msg)
    (tmp_path / "ok.toml").write_text('[export]\nmax_drop = 0\nprecision = "auto"\n[splits]\ntest = 0.2\nseed = 1\n')
    assert load_recipe(str(tmp_path / "ok.toml")).export["max_drop"] == 0  # an integer passes for a float


def test_export_types_follow_export_config() -> None:
    import dataclasses

    from edgeclf.export.bundle_writer import ExportConfig
    from edgeclf.recipes import _EXPORT_TYPES, EXPORT_FIELDS

    fields = {f.name: str(f.type) for f in dataclasses.fields(ExportConfig)}
    assert set(_EXPORT_TYPES) == set(EXPORT_FIELDS)
    for k, t in _EXPORT_TYPES.items():
        assert fields[k].split(" |")[0] == t.__name__, k


def test_frames_per_clip_flag_is_not_silently_beaten_by_the_recipe() -> None:
    """lung-pocus puts frames=24 in the spec, which beats --frames-per-clip: a different flag was recorded in the
    config while 24 frames were sampled. It is refused now, naming the spec option that says it."""
    r = load_recipe("lung-pocus")
    with pytest.raises(ConfigError) as exc:
        resolve_recipe(r, "/d/pocus", {"frames_per_clip": 12})
    assert '/d/pocus?frames=12' in str(exc.value) and "\n" not in str(exc.value)
    assert resolve_recipe(r, "/d/pocus", {"frames_per_clip": 24})[1] == "/d/pocus?frames=24&roi=sector"
    kwargs, spec, rec = resolve_recipe(r, "/d/pocus?frames=12", {"frames_per_clip": 12})
    assert spec == "/d/pocus?frames=12&roi=sector" and rec["overridden"] == ["data.frames"]
    # Recipes without a frames option and synthetic data are unaffected.
    assert resolve_recipe(load_recipe("chest-xray"), "synthetic:ultrasound", {"frames_per_clip": 3})[0]["frames_per_clip"] == 3


def test_variant_names_match_without_case(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text('[train]\nsize = 64\n[variants.BreastMNIST]\ntrain = { size = 32 }\n')
    kwargs, _, rec = resolve_recipe(load_recipe(str(path)), "/d/breastmnist.npz", {})
    assert kwargs["size"] == 32 and rec["variant"] == "BreastMNIST"
    assert resolve_recipe(load_recipe("breast-us"), "/d/BreastMNIST.npz", {})[2]["variant"] == "breastmnist"


def test_split_list_command_names_the_list_from_the_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A variant whose data table is empty names no list: the command names NAME.csv, not the recipe's list (and,
    since --out is required, writes neither)."""
    import numpy as np

    cv2 = pytest.importorskip("cv2")
    import edgeclf.recipes as recipes

    for cls in ("a", "b"):
        for i in range(6):
            (tmp_path / "small" / cls).mkdir(parents=True, exist_ok=True)
            img = np.random.default_rng(i + (10 if cls == "b" else 0)).integers(0, 256, (16, 16), dtype=np.uint8)
            cv2.imwrite(str(tmp_path / "small" / cls / f"{i}.png"), img)
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n[data]\nsplit = "big"\n[splits]\ntest = 0.2\n[variants.small]\ndata = {}\n')
    monkeypatch.setattr(recipes, "RECIPE_DIR", tmp_path / "pkg")
    assert recipes.main(["splits", str(path), "--data", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert "big.csv" not in err and "r.toml.csv" in err, err  # named after the recipe argument (a path here)
    assert not (tmp_path / "pkg" / "splits").exists()
    assert recipes.main(["splits", str(path), "--data", str(tmp_path / "small"), "--out", str(tmp_path / "s.csv")]) == 0
    assert (tmp_path / "s.csv").is_file()


def test_a_corrupt_run_json_is_one_line(tmp_path: Path) -> None:
    from edgeclf.recipes import recorded_export

    (tmp_path / "run.json").write_text('{"recipe": {"name": "x"')  # cut short
    with pytest.raises(ConfigError, match="not readable JSON") as exc:
        recorded_export(tmp_path)
    assert "\n" not in str(exc.value)
    (tmp_path / "run.json").write_text("[1, 2]")  # JSON, but not a run record
    assert recorded_export(tmp_path) is None


def test_auto_in_a_recipe_means_chosen_from_the_data(tmp_path: Path) -> None:
    """TOML has no null: "auto" sets a field back to automatic (None in TrainConfig), e.g. in a variant over the recipe."""
    import dataclasses

    from edgeclf.recipes import AUTO_FIELDS
    from edgeclf.train import TrainConfig

    # The fields that take auto are exactly those whose default is "chosen from the data or the machine".
    assert set(AUTO_FIELDS) == {f.name for f in dataclasses.fields(TrainConfig) if f.default is None} - {"recipe"}
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n[train]\nsize = 96\nthreads = 2\npositive = "b"\nchannels = "auto"\n'
                    '[variants.small]\ntrain = { size = "auto", classes = "auto" }\n')
    r = load_recipe(str(path))
    kwargs, _, rec = resolve_recipe(r, "/d/small", {})
    assert kwargs["size"] is None and kwargs["classes"] is None and kwargs["channels"] is None and kwargs["threads"] == 2
    TrainConfig(data="/d/small", out="x", **kwargs)
    assert rec["train"]["size"] == "auto" and rec["overridden"] == []  # recorded as written
    assert rec["automatic"] == ["size", "channels", "classes"]
    # On the command line (--size auto reaches resolve_recipe as None) it overrides the recipe's value.
    kwargs, _, rec = resolve_recipe(r, "/d/big", {"size": None, "threads": None, "positive": None})
    assert kwargs["size"] is None and kwargs["threads"] is None and kwargs["positive"] is None
    assert rec["overridden"] == ["positive", "size", "threads"] and rec["automatic"] == list(AUTO_FIELDS)
    path.write_text('[train]\nepochs = "auto"\n')  # only the automatic fields take it
    with pytest.raises(ConfigError, match="train.epochs is 'auto'; expected int$"):
        load_recipe(str(path))
    path.write_text('[train]\nsize = "big"\n')
    with pytest.raises(ConfigError, match='expected int or "auto"'):
        load_recipe(str(path))


def test_recipe_data_options_without_effect_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    for table, words in [
        ('[data]\nsplit = "busi"\ndedup = "near"\n', "dedup has no effect with split=busi"),  # was: in the spec, unused
        ('[data]\nsplit = "busi"\ntest = 0.3\n', "test has no effect with split=busi"),
        ('[data]\nnear = 30\n', "near applies with dedup=near"),  # was: dropped from the spec silently
        ('[data]\nfold = 2\n', "applies to cross-validation"),
        ('[splits]\nnear = 30\n', "near applies with dedup"),  # was: the list written with exact dedup
        ('[variants.v]\ndata = { split = "busi", val = 0.2 }\n', "variants.v.data: data option val has no effect"),
        # [train] folds beside [data] test: refused when the recipe loads, not only at `edgeclf train`.
        ('[data]\ntest = 0.3\n[train]\nfolds = 5\n', "test has no effect with cross-validation (folds=5)"),
        ('[train]\nfolds = 5\n[variants.v]\ndata = { test = 0.3 }\n', "variants.v.data: data option test has no effect"),
    ]:
        path.write_text(table)
        with pytest.raises(ConfigError) as exc:
            load_recipe(str(path))
        assert words in str(exc.value) and "\n" not in str(exc.value), table
    # A variant's [splits] may rely on the recipe's dedup = "near" (they are merged).
    path.write_text('[splits]\ndedup = "near"\n[variants.v]\nsplits = { near = 40 }\n')
    assert load_recipe(str(path)).variants["v"]["splits"] == {"near": 40}


def test_recipe_splits_never_replaces_a_list_unasked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`splits NAME --data DIR` without --out rewrote the committed list inside the package (which defines the
    recipe's test set), silently, and an existing --out file was replaced silently too."""
    import shutil

    import edgeclf.recipes as recipes
    from edgeclf.synth_cli import synth

    rd = tmp_path / "recipe_files"
    shutil.copytree(recipes.RECIPE_DIR, rd)
    monkeypatch.setattr(recipes, "RECIPE_DIR", rd)
    committed = rd / "splits" / "busi.csv"
    before = committed.read_bytes()
    data = tmp_path / "other" / "busi"
    synth("ultrasound", str(data), n=60, size=32)
    assert recipes.main(["splits", "breast-us", "--data", str(data)]) == 2
    assert "--out" in capsys.readouterr().err and committed.read_bytes() == before
    mine = tmp_path / "mine.csv"
    assert recipes.main(["splits", "breast-us", "--data", str(data), "--out", str(mine)]) == 0
    first = mine.read_bytes()
    mine.write_text("kept")
    assert recipes.main(["splits", "breast-us", "--data", str(data), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1 and mine.read_text() == "kept"
    assert recipes.main(["splits", "breast-us", "--data", str(data), "--out", str(mine), "--overwrite"]) == 0
    assert mine.read_bytes() == first
    assert recipes.main(["splits", "breast-us", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_recipe_path_that_does_not_exist_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_recipe(str(tmp_path / "mine.toml"))
    msg = str(exc.value)
    assert "does not exist" in msg and "mine.toml" in msg and "unknown" not in msg, msg
    with pytest.raises(ConfigError, match="is unknown; allowed: .*breast-us"):
        load_recipe("breast-usx")


def test_a_binary_recipe_on_multiclass_data_names_the_recipe(tmp_path: Path) -> None:
    """`--recipe chest-xray` (positive = "pneumonia") on 3-class data said only "--positive applies to binary tasks
    only", a flag the user never typed."""
    r = run_cli("train", "--recipe", "chest-xray", "--data", "synthetic:ultrasound?n=30&size=32", "--out",
                str(tmp_path / "r"), "--epochs", "1")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "chest-xray" in line and "'pneumonia'" in line and "3 classes" in line and "--positive auto" in line, line


def test_the_variant_of_a_renamed_npz_is_read_once_per_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Knowing a renamed MedMNIST copy means reading (and hashing) the whole .npz: resolve_recipe (train --recipe),
    recipe_target and the splits command each read it once, not once for the settings and again for the target."""
    import edgeclf.data
    from edgeclf.recipes import _main, recipe_target

    reads: list[str] = []

    def known_npz(spec: str) -> str | None:  # the content reader, counted; the file is a renamed BreastMNIST
        reads.append(spec)
        return "breastmnist"

    monkeypatch.setattr(edgeclf.data, "known_npz", known_npz)
    monkeypatch.setattr(edgeclf.data, "make_split_list", lambda spec, seed=0: ([], ["no rows"]))
    data = tmp_path / "BreastMNIST (1).npz"
    data.write_bytes(b"")
    r = load_recipe("breast-us")
    kwargs, _, rec = resolve_recipe(r, str(data), {})
    assert rec["variant"] == "breastmnist" and kwargs["model"] == "compact" and rec["target"] == {}
    assert len(reads) == 1, reads
    assert recipe_target(r, str(data)) == {} and len(reads) == 2
    assert _main(["splits", "breast-us", "--data", str(data), "--out", str(tmp_path / "s.csv")]) == 0 and len(reads) == 3
    # A file name that names the variant needs no read at all.
    resolve_recipe(r, str(tmp_path / "breastmnist.npz"), {})
    assert len(reads) == 3
