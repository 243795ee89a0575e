"""Recipes: tested, versioned answers to a point-of-care task, as small TOML files.

A recipe (``edgeclf/recipe_files/<name>.toml``) holds the training settings (any `TrainConfig` field), the
data options added to the data spec (dedup, committed split list, sector crop, frames per clip), the
compression settings `edgeclf export` applies, and the published figures it is compared with::

    name = "brain-mri"
    version = 1
    description = "..."

    [data]                 # folder options appended to --data as its query (see edgeclf.data.FolderOptions)
    split = "brain-mri"    # a committed split list under edgeclf/recipe_files/splits/

    [train]                # TrainConfig fields
    model = "efficientnet_lite0"
    pretrained = true

    [export]               # ExportConfig fields `edgeclf export --model RUN` takes from run.json["recipe"]["export"]
    precision = "auto"

    [variants.breastmnist] # applied when --data names this data set (its file or folder stem)
    data = {}              # a variant's data table replaces the recipe's
    train = { size = 32 }  # and its train/export tables update the recipe's

    [splits]               # how the committed split list was made (python -m edgeclf.recipes splits NAME --data DIR --out CSV)
    dedup = "near"

    [reference]            # published figures, for the results table
    text = "..."

    [target]               # the figure the recipe must reach (benchmarks/recipes.py judges a run by it)
    metric = "accuracy"    # TARGET_METRICS: accuracy, balanced_accuracy, auc on the test split; clip_* pooled out of fold
    minimum = 0.95
    deployed_within = 0.01 # optional: the deployed bundle's figure within this of fp32's (a test-split metric)
    min_clip_agreement = 0.95  # optional: the deployed bundles agree with fp32 on at least this share of clips
    folds = 5              # optional, with a clip_* metric: the figure pooled over this many cross-validation folds
    group = "source"       # optional, with folds: grouped this way (clip, source, site)

A variant's `target` table replaces the recipe's (`target = {}`: no target for that data set).

A field whose default is chosen from the data or the machine (`AUTO_FIELDS`: size, channels, threads, classes,
positive) takes "auto" to say so: a variant's `train = { size = "auto" }` undoes the recipe's size, as `--size auto`
does on the command line; run.json's config records None for it and run.json["recipe"]["automatic"] lists them.

Precedence: TrainConfig defaults < recipe < explicit CLI flags. The training folder records the
resolved recipe in run.json["recipe"] (name, version, sha256 of the file, variant, data options,
train, export, evaluate, reference, target) and a copy of the file as recipe.toml.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Any

from edgeclf.errors import ConfigError

__all__ = ["Recipe", "RECIPE_DIR", "EXPORT_FIELDS", "AUTO", "AUTO_FIELDS", "TARGET_METRICS", "list_recipes", "load_recipe",
           "resolve_recipe", "recipe_data_spec", "recipe_target", "recorded_export"]

RECIPE_DIR = Path(__file__).resolve().parent / "recipe_files"
# The ExportConfig fields a recipe may set (the rest are about the data or the output, not the recipe).
EXPORT_FIELDS = ("precision", "max_drop", "min_agreement", "calibration", "calibration_n", "qat_epochs", "device",
                 "target_sensitivity")
# The precisions that use each compression setting: the gate judges every candidate but fp32; calibration and the
# QAT rung exist for INT8 alone. `edgeclf export` refuses a flag typed for a precision that never uses it.
EXPORT_PRECISIONS: dict[str, tuple[str, ...]] = {
    "max_drop": ("fp16", "int8", "auto"), "min_agreement": ("fp16", "int8", "auto"),
    "calibration": ("int8", "auto"), "calibration_n": ("int8", "auto"), "qat_epochs": ("int8", "auto")}
# Their types (ExportConfig's; tests/test_recipes.py keeps the two in step).
_EXPORT_TYPES: dict[str, type] = {"precision": str, "max_drop": float, "min_agreement": float, "calibration": str,
                                  "calibration_n": int, "qat_epochs": int, "device": str, "target_sensitivity": float}
# TrainConfig fields whose default (None) means "chosen from the data or the machine": the value AUTO, in a recipe
# or on the command line (`--size auto`), sets one back to that, also over a recipe's value (TOML has no null).
AUTO = "auto"
AUTO_FIELDS = ("size", "channels", "threads", "classes", "positive")
_TOP_KEYS = {"name", "version", "description", "data", "train", "export", "evaluate", "variants", "splits", "reference", "target"}
_EVALUATE_KEYS = {"aggregate"}
_AGGREGATES = ("mean", "vote")  # edgeclf.runtime.clips: the clip decision a recipe's figure is read from
_SPLIT_KEYS = {"dedup", "near", "test", "val", "seed"}
_SPLIT_TYPES: dict[str, type] = {"dedup": str, "near": int, "test": float, "val": float, "seed": int}
# A [target]'s figure: on the test split (a held-out recipe's summary["test"]), or clip_*: pooled out-of-fold clip
# figures of a cross-validation run, read with the recipe's [evaluate] aggregate.
TARGET_METRICS = ("accuracy", "balanced_accuracy", "auc", "clip_accuracy", "clip_balanced_accuracy")
_TARGET_TYPES: dict[str, type] = {"metric": str, "minimum": float, "deployed_within": float, "min_clip_agreement": float,
                                  "folds": int, "group": str}
_GROUPS = ("clip", "source", "site")  # TrainConfig.group: what one cross-validation fold keeps together


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise ConfigError("reading a recipe needs tomllib (Python 3.11+) or the tomli package; pip install tomli") from None
    return tomli


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    description: str
    path: Path
    text: str
    data: dict[str, Any]
    train: dict[str, Any]
    export: dict[str, Any]
    evaluate: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    splits: dict[str, Any]
    reference: dict[str, Any]
    target: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def _train_fields() -> dict[str, Any]:
    from edgeclf.train import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "out", "recipe")}


def _check_table(where: str, table: Any, allowed: dict[str, Any] | set[str] | tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {type(table).__name__}")
    bad = sorted(set(table) - set(allowed))
    if bad:
        raise ConfigError(f"{where}.{bad[0]} is not a known setting; allowed: {', '.join(sorted(allowed))}")
    return dict(table)


def _check_types(where: str, table: dict[str, Any], types: dict[str, type]) -> None:
    """Each value of the type its key wants (an integer passes for a float, a boolean for nothing else)."""
    for k, v in table.items():
        want = types[k]
        ok = isinstance(v, want) and not isinstance(v, bool) if want is not bool else isinstance(v, bool)
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{where}.{k} is {v!r}; expected {want.__name__}")


def _check_data(where: str, table: dict[str, Any], folds: Any = 0) -> None:
    """A [data] table: known options of the right types and values, none without effect beside the others
    (checked here, not when a data set is read)."""
    from edgeclf.data import _OPTION_TYPES, FolderOptions, check_option_table
    from edgeclf.errors import DataError

    _check_types(where, table, _OPTION_TYPES)
    try:
        # folds: the [train] table's (cross-validation asked for beside the data options)
        check_option_table(table, FolderOptions(**table), folds=folds if isinstance(folds, int) else 0)
    except DataError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_splits(where: str, table: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A [splits] table (a variant's: over the recipe's `base`)."""
    table = _check_table(where, table, _SPLIT_KEYS)
    _check_types(where, table, _SPLIT_TYPES)
    merged = {**(base or {}), **table}
    if "near" in merged and merged.get("dedup") != "near":  # with_options would drop it: the list made without it
        raise ConfigError(f"{where}: near applies with dedup = \"near\"; add it or leave near out")
    return table


def _check_export(where: str, table: Any) -> dict[str, Any]:
    table = _check_table(where, table, EXPORT_FIELDS)
    _check_types(where, table, _EXPORT_TYPES)
    return table


def _check_reference(where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table (e.g. text = \"...\"), got {type(table).__name__}")
    return dict(table)


def _check_target(where: str, table: Any) -> dict[str, Any]:
    """A [target] table: empty (no target) or a metric and its minimum, fractions all."""
    table = _check_table(where, table, _TARGET_TYPES)
    if not table:
        return table
    _check_types(where, table, _TARGET_TYPES)
    if "metric" not in table or "minimum" not in table:
        raise ConfigError(f"{where} needs metric and minimum (e.g. metric = \"accuracy\", minimum = 0.9), or none of it")
    if table["metric"] not in TARGET_METRICS:
        raise ConfigError(f"{where}.metric is {table['metric']!r}; allowed: {', '.join(TARGET_METRICS)}")
    for k in ("minimum", "deployed_within", "min_clip_agreement"):
        if k in table and not 0 <= table[k] <= 1:
            raise ConfigError(f"{where}.{k} is {table[k]!r}; give a fraction between 0 and 1 (e.g. 0.9)")
    if "deployed_within" in table and table["metric"].startswith("clip_"):
        raise ConfigError(f"{where}: deployed_within applies to a test-split metric ({', '.join(m for m in TARGET_METRICS if not m.startswith('clip_'))}); "
                          "for clips give min_clip_agreement")
    # The cross-validation protocol the figure must come from (the "5 source-grouped folds").
    if "folds" in table:
        if not 2 <= table["folds"] <= 20:
            raise ConfigError(f"{where}.folds is {table['folds']!r}; give 2..20 (the folds the figure is pooled over), or leave it out")
        if not table["metric"].startswith("clip_"):
            raise ConfigError(f"{where}: folds applies to a pooled out-of-fold metric ({', '.join(m for m in TARGET_METRICS if m.startswith('clip_'))}); "
                              "leave folds out for a test-split metric")
    if "group" in table:
        if table["group"] not in _GROUPS:
            raise ConfigError(f"{where}.group is {table['group']!r}; allowed: {', '.join(_GROUPS)}")
        if "folds" not in table:
            raise ConfigError(f"{where}: group applies with folds (the grouping of the cross-validation folds); add folds, e.g. folds = 5")
    return table


def _check_train_types(where: str, table: dict[str, Any]) -> None:
    fields = _train_fields()
    for k, v in table.items():
        if k in AUTO_FIELDS and v == AUTO:
            continue  # None: chosen from the data or the machine
        want = str(fields[k].type)
        ok = (("bool" in want and isinstance(v, bool)) or ("int" in want and isinstance(v, int) and not isinstance(v, bool))
              or ("float" in want and isinstance(v, (int, float)) and not isinstance(v, bool))
              or ("str" in want and isinstance(v, str)))
        if not ok:
            auto = f' or "{AUTO}"' if k in AUTO_FIELDS else ""
            raise ConfigError(f"{where}.{k} is {v!r}; expected {want.replace(' | None', '')}{auto}")


def load_recipe(name: str) -> Recipe:
    """A recipe by name (`edgeclf/recipe_files/NAME.toml`) or by path to a .toml file, validated."""
    p = Path(name).expanduser()
    path = p if p.suffix == ".toml" and p.is_file() else RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        if p.suffix == ".toml":  # a path was meant
            raise ConfigError(f"recipe file {name} does not exist; give the path of a .toml file, or a packaged recipe: "
                              f"{', '.join(list_recipes())}")
        raise ConfigError(f"recipe {name!r} is unknown; allowed: {', '.join(list_recipes())} or a path to a .toml file")
    text = path.read_text(encoding="utf-8")
    try:
        doc = _toml().loads(text)
    except Exception as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"recipe {path} is not valid TOML ({exc}); fix the file") from None
    where = f"recipe {path.stem}"
    _check_table(where, doc, _TOP_KEYS)
    fields = _train_fields()
    train = _check_table(f"{where}: train", doc.get("train", {}), fields)
    _check_train_types(f"{where}: train", train)
    export = _check_export(f"{where}: export", doc.get("export", {}))
    evaluate = _check_table(f"{where}: evaluate", doc.get("evaluate", {}), _EVALUATE_KEYS)
    if "aggregate" in evaluate and evaluate["aggregate"] not in _AGGREGATES:
        raise ConfigError(f"{where}: evaluate.aggregate is {evaluate['aggregate']!r}; allowed: {', '.join(_AGGREGATES)}")
    data = _check_table(f"{where}: data", doc.get("data", {}), _data_keys())
    _check_data(f"{where}: data", data, train.get("folds", 0))
    splits = _check_splits(f"{where}: splits", doc.get("splits", {}))
    reference = _check_reference(f"{where}: reference", doc.get("reference", {}))
    target = _check_target(f"{where}: target", doc.get("target", {}))
    vs = doc.get("variants", {})
    variants = _check_table(f"{where}: variants", vs, set(vs) if isinstance(vs, dict) else set())
    for vname, v in variants.items():
        vw = f"{where}: variants.{vname}"
        _check_table(vw, v, {"data", "train", "export", "splits", "reference", "target"})
        _check_train_types(f"{vw}.train", _check_table(f"{vw}.train", v.get("train", {}), fields))
        _check_export(f"{vw}.export", v.get("export", {}))
        _check_data(f"{vw}.data", _check_table(f"{vw}.data", v.get("data", {}), _data_keys()),
                    {**train, **v.get("train", {})}.get("folds", 0))
        _check_splits(f"{vw}.splits", v.get("splits", {}), splits)
        _check_reference(f"{vw}.reference", v.get("reference", {}))
        _check_target(f"{vw}.target", v.get("target", {}))
    version = doc.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"{where}.version is {version!r}; expected an integer")
    return Recipe(name=str(doc.get("name", path.stem)), version=version, description=str(doc.get("description", "")),
                  path=path, text=text, data=data, train=train, export=export, evaluate=evaluate, variants=variants,
                  splits=splits, reference=reference, target=target)


def _data_keys() -> set[str]:
    from edgeclf.data import FolderOptions

    return {f.name for f in dataclasses.fields(FolderOptions)}


def _variant_name(recipe: Recipe, data: str) -> str | None:
    """The variant whose name is the data's file or folder stem, compared without case (`[variants.BreastMNIST]`
    applies to breastmnist.npz too), else the MedMNIST set an .npz holds by content (a renamed copy)."""
    base = data.partition("?")[0].rstrip("/")
    stem = Path(base).stem if not base.startswith("synthetic:") else base.split(":", 1)[1]
    names = {v.lower(): v for v in recipe.variants}
    if stem.lower() in names:
        return names[stem.lower()]
    from edgeclf.data import known_npz

    known = known_npz(data) if names else None  # a renamed MedMNIST copy: known by its content, as training knows it
    return names.get(known) if known else None


def _variant(recipe: Recipe, data: str) -> tuple[str | None, dict[str, Any]]:
    """(the variant's name, its table; {} for none). Once per command: for a renamed .npz it reads the whole file."""
    variant = _variant_name(recipe, data)
    return variant, (recipe.variants.get(variant, {}) if variant else {})


def _target_of(recipe: Recipe, v: dict[str, Any]) -> dict[str, Any]:
    return dict(v["target"]) if "target" in v else dict(recipe.target)


def recipe_target(recipe: Recipe, data: str) -> dict[str, Any]:
    """The [target] for this data: its variant's when that has one (an empty one: no target), else the recipe's."""
    return _target_of(recipe, _variant(recipe, data)[1])


def recipe_data_spec(data: str, options: dict[str, Any]) -> str:
    """The data spec with the recipe's folder options added; options the spec already names win."""
    if not options or data.startswith("synthetic:"):
        return data
    from edgeclf.data import split_spec, with_options

    base, given = split_spec(data)
    query = data.partition("?")[2]
    named = {kv.split("=", 1)[0] for kv in query.split("&") if kv}
    merged = {k: v for k, v in options.items() if k not in named}
    return with_options(data, **merged) if merged else data


def _spec_frames(spec: str) -> int | None:
    """The frames=N option of a folder spec (None when it names none, or for synthetic data)."""
    if spec.startswith("synthetic:"):
        return None
    from edgeclf.data import split_spec

    return split_spec(spec)[1].frames


def resolve_recipe(recipe: Recipe, data: str, cli: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Merge defaults < recipe (< its variant for this data) < explicit CLI values. Returns (TrainConfig keyword
    arguments without data/out, the data spec with the recipe's options, the record for run.json["recipe"])."""
    variant, v = _variant(recipe, data)
    train = {**recipe.train, **v.get("train", {})}  # as written: "auto" stays "auto" in the record
    export = {**recipe.export, **v.get("export", {})}
    options = dict(v["data"]) if "data" in v else dict(recipe.data)
    spec = recipe_data_spec(data, options)
    # The data spec's own options win over the recipe's: recorded as overrides ("data.frames"), like CLI flags.
    data_over = []
    if options and not data.startswith("synthetic:"):
        from edgeclf.data import split_spec

        given = split_spec(data)[1]
        named = {kv.split("=", 1)[0] for kv in data.partition("?")[2].split("&") if kv}
        data_over = [f"data.{k}" for k in options if k in named and getattr(given, k) != options[k]]
    # The recipe's frames per clip live in the spec (frames=N), where they beat --frames-per-clip: a different
    # value given on the command line would be recorded in the config but not used. Refused, with the way to say it.
    frames = _spec_frames(spec)
    if "frames" in options and frames is not None and "frames_per_clip" in cli and cli["frames_per_clip"] != frames:
        raise ConfigError(f"--frames-per-clip {cli['frames_per_clip']} would be ignored: the data spec samples {frames} frames "
                          f"per clip (data option frames={frames}, recipe {recipe.name}); give it in the data spec instead: "
                          f"--data \"{data.partition('?')[0]}?frames={cli['frames_per_clip']}\"")
    resolved = {k: None if k in AUTO_FIELDS and x == AUTO else x for k, x in train.items()}
    kwargs = {**resolved, **cli}
    if frames is not None and "frames_per_clip" not in cli:
        kwargs["frames_per_clip"] = frames  # the config records the frames the spec samples, not the unused default
    synthetic = data.startswith("synthetic:")
    record = {
        "name": recipe.name, "version": recipe.version, "sha256": recipe.sha256, "variant": variant,
        # Synthetic data takes no folder options: recorded apart, so the record says only what was applied.
        "data_options": {} if synthetic else options, "train": train, "export": export, "evaluate": dict(recipe.evaluate),
        "overridden": sorted([k for k in cli if k in resolved and cli[k] != resolved[k]] + data_over),
        # Fields left to the data or the machine in this run (None in run.json's config), a recipe's value reset with
        # `--size auto` included: a rerun with the recorded config chooses them again the same way.
        "automatic": [k for k in AUTO_FIELDS if kwargs.get(k) is None],
        "reference": {**recipe.reference, **v.get("reference", {})}, "target": _target_of(recipe, v), "_text": recipe.text,
    }
    if synthetic and options:
        record["data_options_not_applied"] = options
    return kwargs, spec, record


def recorded_export(model_dir: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(recipe name, its [export] settings) recorded in a training folder's run.json, or None when the folder
    was not trained from a recipe. A pruned folder carries its parent's record."""
    import json

    path = Path(model_dir) / "run.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc}); give a training folder written by `edgeclf train`") from None
    rec = doc.get("recipe") if isinstance(doc, dict) else None
    if not isinstance(rec, dict):
        return None
    export = {k: v for k, v in (rec.get("export") or {}).items() if k in EXPORT_FIELDS}
    return str(rec.get("name")), export


def _main(argv: list[str] | None = None) -> int:
    """`python -m edgeclf.recipes list | splits NAME --data DIR --out CSV [--overwrite]`: list recipes or write a
    split list with the recipe's [splits] settings (to replace a committed one, --out names it, with --overwrite)."""
    import argparse

    from edgeclf.data import make_split_list, with_options

    ap = argparse.ArgumentParser(prog="python -m edgeclf.recipes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    sp = sub.add_parser("splits")
    sp.add_argument("name")
    sp.add_argument("--data", required=True)
    sp.add_argument("--out", default=None)
    sp.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "list":
        for n in list_recipes():
            r = load_recipe(n)
            print(f"{n}  v{r.version}  {r.description}")
        return 0
    from edgeclf.errors import ConfigError, DataError

    if not Path(a.data.partition("?")[0]).expanduser().exists():
        raise DataError(f"--data {a.data.partition('?')[0]} does not exist; give the data set's folder")
    r = load_recipe(a.name)
    variant, v = _variant(r, a.data)
    name = v.get("data", r.data).get("split") or a.name  # a variant's data table replaces the recipe's
    # The committed list defines the recipe's test set: it is rewritten only where --out names it.
    if not a.out:
        raise ConfigError(f"splits needs --out CSV (the committed list, {RECIPE_DIR / 'splits' / (name + '.csv')}, is "
                          "replaced only when --out names it, with --overwrite); add --out")
    if Path(a.out).exists() and not a.overwrite:
        raise ConfigError(f"--out {a.out} already exists; allowed: a new file, or --overwrite to replace it")
    cfg = {**r.splits, **v.get("splits", {})}
    seed = int(cfg.pop("seed", 0))
    spec = with_options(a.data.partition("?")[0], **cfg)
    rows, notes = make_split_list(spec, seed=seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(1 for x in rows if x[2] == s) for s in ("train", "val", "test", "duplicate")}
    head = [f"# edgeclf split list for recipe {r.name}: data {Path(a.data.partition('?')[0]).name}, options {spec.partition('?')[2]}, seed {seed}",
            f"# {'; '.join(notes)}", f"# counts: {counts}", "# sha256 is a prefix of the file's sha256; group ties near copies together",
            "path,sha256,split,group"]
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows(rows)
    out.write_text("\n".join(head) + "\n" + buf.getvalue())
    print(f"wrote {out}: {counts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`_main` with the CLI's error contract: a mistake the user can fix is one line and exit code 2."""
    import sys

    from edgeclf.errors import EdgeclfError

    try:
        return _main(argv)
    except EdgeclfError as exc:
        print(f"python -m edgeclf.recipes: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
