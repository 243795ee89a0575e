"""`edgeclf train` flags: `auto` resets an automatic field (also over a recipe's value); settings that would have no
effect together are refused in one line before any data is read; the run says how its folds are grouped.

Training itself is replaced by a stub that records its config (the checks run before it), except in one tiny
synthetic run that follows `--size auto` into run.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgeclf.cli import cli
from edgeclf.errors import EdgeclfError
from tests.conftest import run_cli


class _Stop(EdgeclfError):
    """Raised by the stub in place of training."""


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """edgeclf.train.train replaced: what the CLI would train with (cfg, recipe record), then _Stop."""
    import edgeclf.train

    got: dict[str, Any] = {}

    def stub(cfg: Any, *, on_epoch: Any = None, recipe: Any = None, overwrite: bool = False) -> dict[str, Any]:
        got["cfg"], got["recipe"], got["overwrite"] = cfg, recipe, overwrite
        raise _Stop("stub")

    monkeypatch.setattr(edgeclf.train, "train", stub)
    return got


def _train(*args: str) -> Any:
    return CliRunner().invoke(cli, ["train", "--out", "/tmp/never-written", *args])


def _refused(res: Any, *words: str) -> str:
    """A one-line EdgeclfError (exit 2 through edgeclf.cli.main), raised before training started."""
    assert isinstance(res.exception, EdgeclfError) and not isinstance(res.exception, _Stop), res.output
    msg = str(res.exception)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def _reached_training(res: Any) -> None:
    assert isinstance(res.exception, _Stop), (res.output, res.exception)


# -- auto ------------------------------------------------------------------------------------------------------


def test_auto_resets_a_recipes_values_to_automatic(seen: dict[str, Any]) -> None:
    from edgeclf.train import TrainConfig

    # brain-mri sets size, channels and threads; without auto they could only be replaced by other numbers.
    _reached_training(_train("--recipe", "brain-mri", "--data", "/d/brain_mri", "--size", "auto", "--channels", "auto",
                             "--threads", "AUTO"))
    cfg, rec = seen["cfg"], seen["recipe"]
    assert cfg.size is None and cfg.channels is None and cfg.threads is None and cfg.model == "efficientnet_lite0"
    assert rec["overridden"] == ["channels", "size", "threads"] and {"size", "channels", "threads"} <= set(rec["automatic"])
    assert rec["train"]["size"] == 160  # the recipe as written, beside what this run did
    # The recorded config (run.json["config"] is asdict(cfg), as JSON) rebuilds the same automatic choice.
    assert TrainConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    # chest-xray names its positive class, lung-pocus its class map: auto leaves them to the data.
    _reached_training(_train("--recipe", "chest-xray", "--data", "/d/pneumoniamnist.npz", "--positive", "auto"))
    assert seen["cfg"].positive is None and seen["recipe"]["overridden"] == ["positive"]
    _reached_training(_train("--recipe", "lung-pocus", "--data", "/d/pocus", "--classes", "auto"))
    assert seen["cfg"].classes is None and seen["recipe"]["overridden"] == ["classes"]
    # Without auto the recipe's values stay.
    _reached_training(_train("--recipe", "brain-mri", "--data", "/d/brain_mri"))
    assert seen["cfg"].size == 160 and seen["recipe"]["overridden"] == []


def test_auto_is_in_the_help_and_a_bad_value_names_it() -> None:
    from edgeclf.recipes import AUTO_FIELDS

    res = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200)
    for field in AUTO_FIELDS:
        line = next(x for x in res.output.splitlines() if x.strip().startswith(f"--{field} "))
        assert f"--{field} auto|" in line or f"--{field} [auto|" in line, line
    res = _train("--data", "synthetic:ultrasound", "--size", "big")
    assert res.exit_code == 2 and "Or give auto" in res.output


def test_size_auto_is_recorded_and_chosen_from_the_data(tmp_path: Path) -> None:
    """One tiny run: the recipe's size = 32 reset with --size auto; run.json's config says null (automatic), and the
    model's input is what automatic gives for these 40 px images (compact's 64 capped at the data's 40)."""
    pytest.importorskip("torch")
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('name = "tiny"\n[train]\nmodel = "compact"\nsize = 32\nepochs = 1\npatience = 1\n')
    out = tmp_path / "run"
    res = run_cli("train", "--recipe", str(recipe), "--data", "synthetic:ultrasound?n=90&size=40&seed=2", "--out", str(out),
                  "--threads", "1", "--size", "auto", "--json")
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["size"] is None and run["recipe"]["overridden"] == ["size"]
    assert "size" in run["recipe"]["automatic"] and run["model"]["preprocess"]["size"] == [40, 40]


# -- settings without effect ---------------------------------------------------------------------------------------


def test_group_without_cross_validation_is_refused(seen: dict[str, Any]) -> None:
    _refused(_train("--data", "/d/pocus", "--group", "site"), "--group site", "no effect", "--folds K")
    # lung-pocus sets folds = 5 and group = "source": under --folds 0 its group is the recipe's doing, not refused (it
    # groups a clip data set's single split: test_without_folds_the_recorded_group_is_the_one_the_split_used).
    _reached_training(_train("--recipe", "lung-pocus", "--data", "/d/pocus", "--folds", "0"))
    _refused(_train("--recipe", "lung-pocus", "--data", "/d/pocus", "--folds", "0", "--group", "site"), "--group site")
    _reached_training(_train("--data", "/d/pocus", "--folds", "3", "--group", "site"))


def test_group_against_the_specs_own_folds_is_refused(seen: dict[str, Any]) -> None:
    """load_folds keeps a spec's own grouping (it was only logged): a different --group was recorded and not used."""
    _refused(_train("--data", "/d/pocus?folds=3", "--folds", "3", "--group", "site"), "its own group (clip)", "group=site")
    _refused(_train("--data", "/d/pocus?folds=3&fold=1&group=source", "--group", "site"), "--group site has no effect")
    # The same grouping typed twice is harmless (a fold's recorded config says both).
    _reached_training(_train("--data", "/d/pocus?folds=3&fold=1&group=site", "--group", "site"))


def test_one_fold_of_a_spec_with_cross_validation_is_refused(seen: dict[str, Any]) -> None:
    """--folds trains every fold: a spec's fold=2 (or another fold count) was dropped without a word."""
    _refused(_train("--data", "/d/pocus?folds=5&fold=2", "--folds", "5"), "fold has no effect", "--folds 0")
    # fold 0 is the default value, but named it is fold 0's recorded spec: refused alike, not all five folds trained.
    _refused(_train("--data", "/d/pocus?folds=5&fold=0&group=source", "--folds", "5"), "fold has no effect", "--folds 0")
    _refused(_train("--recipe", "lung-pocus", "--data", "/d/pocus?folds=5&fold=0&group=source"), "fold has no effect")
    _refused(_train("--recipe", "lung-pocus", "--data", "/d/pocus?folds=5&fold=2"), "recipe lung-pocus's folds = 5")
    _refused(_train("--data", "/d/pocus?folds=3", "--folds", "5"), "folds=3&fold=0")
    _reached_training(_train("--data", "/d/pocus?folds=5&fold=2"))  # that fold alone
    _reached_training(_train("--data", "/d/pocus?folds=5&group=site", "--folds", "5"))  # all five, grouped by the spec


def test_target_sensitivity_with_the_accuracy_operating_point_is_refused(seen: dict[str, Any]) -> None:
    _refused(_train("--data", "synthetic:ultrasound", "--operating-point", "accuracy", "--target-sensitivity", "0.95"),
             "--target-sensitivity 0.95 has no effect with --operating-point accuracy")
    _refused(_train("--recipe", "brain-mri", "--data", "/d/brain_mri", "--target-sensitivity", "0.95"),
             "recipe brain-mri's operating_point = \"accuracy\"", "--operating-point sensitivity")
    _reached_training(_train("--recipe", "brain-mri", "--data", "/d/brain_mri", "--target-sensitivity", "0.95",
                             "--operating-point", "sensitivity"))


def test_frames_per_clip_without_clips_is_refused(seen: dict[str, Any], tmp_path: Path) -> None:
    import numpy as np

    cv2 = pytest.importorskip("cv2")
    _refused(_train("--data", "synthetic:ultrasound", "--frames-per-clip", "4"), "synthetic images")
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "imgs" / cls / "0.png"), np.full((8, 8), 9 if cls == "a" else 99, np.uint8))
    _refused(_train("--data", str(tmp_path / "imgs"), "--frames-per-clip", "4"), "a folder of images", "leave it out")
    # A spec's frames=N wins over the flag: a different flag was recorded and not used (the recipe case was refused).
    _refused(_train("--data", "/d/pocus?frames=12", "--frames-per-clip", "4"), "frames=12 wins", "frames=4")
    _reached_training(_train("--data", "/d/pocus?frames=12", "--frames-per-clip", "12"))


def test_data_options_against_a_recipes_split_list_name_the_recipe(seen: dict[str, Any]) -> None:
    msg = _refused(_train("--recipe", "breast-us", "--data", "/d/busi?test=0.3"), "option test has no effect with split=busi")
    assert msg.endswith("(split=busi comes from recipe breast-us's [data] table)")
    _refused(_train("--data", "/d/busi?split=busi&dedup=near"), "dedup has no effect")
    _refused(_train("--data", "/d/pocus?test=0.2", "--folds", "5"), "test has no effect with cross-validation")
    # What the recipes produce themselves (breast-us's BreastMNIST variant: no data options) is never refused.
    for recipe, data in [("brain-mri", "/d/brain_mri"), ("breast-us", "/d/busi"), ("breast-us", "/d/medmnist/breastmnist.npz"),
                         ("chest-xray", "/d/medmnist/pneumoniamnist.npz"), ("lung-pocus", "/d/pocus")]:
        _reached_training(_train("--recipe", recipe, "--data", data))


# -- which grouping -----------------------------------------------------------------------------------------------


def test_the_run_says_how_its_folds_are_grouped(seen: dict[str, Any]) -> None:
    res = _train("--data", "/d/pocus", "--folds", "5")
    _reached_training(res)
    assert "cross-validation: 5 folds grouped by source (the default of --folds K" in res.stderr
    res = _train("--data", "/d/pocus?folds=5&fold=2")
    assert "fold 2 of 5 held out as the test split, grouped by clip (the data spec names folds without group=" in res.stderr
    res = _train("--data", "/d/pocus?folds=5&group=site", "--folds", "5")
    assert "5 folds grouped by site (the data spec's group=site)" in res.stderr
    res = _train("--recipe", "lung-pocus", "--data", "/d/pocus")
    assert "5 folds grouped by source (recipe lung-pocus)" in res.stderr
    res = _train("--data", "/d/pocus", "--folds", "5", "--json")
    assert "grouped" not in res.stderr  # --json: nothing but the document (cv.json records data.grouped_by)
    assert "grouped" not in _train("--data", "/d/pocus").stderr


def _folder(root: Path, ext: str) -> Path:
    """Class folders of (empty) files: whether a folder holds clips or images is decided from file names alone."""
    for c in ("covid19", "regular"):
        (root / c).mkdir(parents=True)
        (root / c / f"a{ext}").write_bytes(b"")
    return root


def test_without_folds_the_recorded_group_is_the_one_the_split_used(seen: dict[str, Any], tmp_path: Path) -> None:
    """lung-pocus's group = "source" under --folds 0 was recorded in run.json while the single split was drawn by clip."""
    clips, images = _folder(tmp_path / "clips", ".mp4"), _folder(tmp_path / "images", ".png")
    # Clips: the recipe's group groups the single split too, written into the spec the run records.
    res = _train("--recipe", "lung-pocus", "--data", str(clips), "--folds", "0")
    _reached_training(res)
    cfg = seen["cfg"]
    assert cfg.group == "source" and "group=source" in cfg.data.partition("?")[2], cfg.data
    assert "one train/val/test split grouped by source (recipe lung-pocus" in res.stderr, res.stderr
    # The spec's own group= wins, and the config says it.
    _reached_training(_train("--recipe", "lung-pocus", "--data", f"{clips}?group=site", "--folds", "0"))
    assert seen["cfg"].group == "site" and "group=site" in seen["cfg"].data
    # Images have no sources: the split is by copy group, recorded as clip, and the run says the recipe's group is unused.
    res = _train("--recipe", "lung-pocus", "--data", str(images), "--folds", "0")
    _reached_training(res)
    assert seen["cfg"].group == "clip" and "group=" not in seen["cfg"].data
    assert "recipe lung-pocus's group = source is not used" in res.stderr, res.stderr
    # No recipe: --group's default (source, for --folds K) is not recorded for a plain split by clip; nothing printed.
    res = _train("--data", str(clips))
    _reached_training(res)
    assert seen["cfg"].group == "clip" and "group=" not in seen["cfg"].data and "group" not in res.stderr
    _reached_training(_train("--data", f"{clips}?group=source"))
    assert seen["cfg"].group == "source"
    # Cross-validation keeps its grouping.
    _reached_training(_train("--recipe", "lung-pocus", "--data", str(clips)))
    assert seen["cfg"].group == "source" and seen["cfg"].folds == 5 and "group=" not in seen["cfg"].data


def test_overwrite_reaches_training_and_a_used_out_is_refused_first(seen: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")  # a previous training's
    res = CliRunner().invoke(cli, ["train", "--data", "synthetic:ultrasound", "--out", str(tmp_path)])
    _refused(res, "not empty", "--overwrite")
    _reached_training(CliRunner().invoke(cli, ["train", "--data", "synthetic:ultrasound", "--out", str(tmp_path), "--overwrite"]))
    assert seen["overwrite"] is True


@pytest.mark.parametrize("data", ["synthetic:ultrasound", "npz"])
def test_folds_on_data_that_is_not_a_folder_is_refused_before_the_grouping_line(seen: dict[str, Any], data: str,
                                                                               tmp_path: Path) -> None:
    """It printed "cross-validation: 3 folds grouped by source ..." and then the error: two lines, the first untrue."""
    if data == "npz":
        (tmp_path / "b.npz").write_bytes(b"")  # the kind is read from the name; nothing is loaded before the refusal
        data = str(tmp_path / "b.npz")
    res = _train("--folds", "3", "--data", data)
    _refused(res, "--folds needs a folder data set")
    assert "grouped by" not in res.output
