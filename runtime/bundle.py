"""The bundle: the only contract between the workstation and the device.

A folder with `model.onnx`, `manifest.json`, optionally `reference.npz`, and `checksums.sha256`
covering every other file (the manifest included). Loading verifies checksums and the manifest schema
before anything else touches the model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from edgeclf.errors import BundleError, IntegrityError
from edgeclf.runtime.postprocess import TASKS, DecisionRule
from edgeclf.runtime.preprocess import PreprocessSpec

__all__ = [
    "SCHEMA_VERSION",
    "CHECKSUM_FILE",
    "MANIFEST_FILE",
    "Bundle",
    "Manifest",
    "Variant",
    "PRECISIONS",
    "load_bundle",
    "verify_checksums",
    "write_checksums",
    "sha256_file",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: `variants` and `deploy`
READABLE_SCHEMAS = (1, 2)
FORMAT = "edgeclf-bundle"
MANIFEST_FILE = "manifest.json"
CHECKSUM_FILE = "checksums.sha256"
PathLike = Union[str, "os.PathLike[str]"]

# Top-level manifest fields: name -> (required, allowed JSON types).
_FIELDS: Dict[str, Tuple[bool, Tuple[type, ...]]] = {
    "schema_version": (True, (int,)),
    "format": (True, (str,)),
    "name": (True, (str,)),
    "created": (True, (str,)),
    "task": (True, (str,)),
    "labels": (True, (list,)),
    "model": (True, (dict,)),
    "variants": (False, (list,)),
    "preprocess": (True, (dict,)),
    "postprocess": (True, (dict,)),
    "provenance": (True, (dict,)),
    "parity": (False, (dict,)),
    "metrics": (False, (dict,)),
    "reference": (False, (dict, type(None))),
    "deploy": (False, (dict,)),
}
PRECISIONS = ("fp32", "fp16", "int8")
# Which INT8 form each backend needs: TensorRT parses only symmetric signed INT8 (zero point 0);
# x86 CPUs without VNNI are fast only with unsigned activations and reduced range.
INT8_FLAVOUR_FOR_BACKEND = {"ort-cpu": "cpu", "ort-cuda": "cpu", "ort-tensorrt": "tensorrt"}
_MODEL_FIELDS = {"file", "opset", "ir_version", "input_name", "output_name", "input_shape", "output_shape", "precision"}


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bundle_files(root: Path) -> List[str]:
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != CHECKSUM_FILE:
            files.append(p.relative_to(root).as_posix())
    return files


def write_checksums(root: PathLike) -> str:
    """Write `checksums.sha256` (sha256sum format) over every file in the folder; returns its digest."""
    r = Path(root)
    lines = [f"{sha256_file(r / f)}  {f}\n" for f in _bundle_files(r)]
    (r / CHECKSUM_FILE).write_text("".join(lines), encoding="utf-8")
    return sha256_file(r / CHECKSUM_FILE)


def verify_checksums(root: PathLike) -> str:
    """Check every file against `checksums.sha256`; returns the checksum file's own digest.

    Raises IntegrityError naming the first file that is changed, missing or not listed.
    """
    r = Path(root)
    sums = r / CHECKSUM_FILE
    if not sums.is_file():
        raise IntegrityError(f"bundle {r} has no {CHECKSUM_FILE}; re-export it with `edgeclf export`")
    listed: Dict[str, str] = {}
    for n, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split("  ", 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise IntegrityError(f"{CHECKSUM_FILE} line {n} is malformed; the bundle was edited, re-export it")
        listed[parts[1]] = parts[0]
    present = set(_bundle_files(r))
    for name in sorted(present - set(listed)):
        raise IntegrityError(f"bundle file {name!r} is not covered by {CHECKSUM_FILE}; remove it or re-export the bundle")
    for name, digest in sorted(listed.items()):
        if name not in present:
            raise IntegrityError(f"bundle file {name!r} listed in {CHECKSUM_FILE} is missing; re-export the bundle")
        if sha256_file(r / name) != digest:
            raise IntegrityError(
                f"bundle file {name!r} does not match its entry in {CHECKSUM_FILE}: one of them was changed after export; re-export the bundle"
            )
    return sha256_file(sums)


@dataclass(frozen=True)
class Variant:
    """A model file in the bundle: the fp32 parent or a compressed variant of it."""

    id: str  # "fp32", "fp16", "int8-cpu", "int8-tensorrt"
    file: str
    precision: str
    flavour: Optional[str] = None  # INT8 only: "cpu" | "tensorrt"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> Variant:
        for key in ("file", "precision"):
            if not isinstance(d.get(key), str):
                raise BundleError(f"{where}.{key} is missing or not a string")
        name = str(d["file"])
        if "/" in name or "\\" in name or name.startswith(".") or name == "model.onnx":
            raise BundleError(f"{where}.file is {name!r}; a variant is a plain file name inside the bundle, not the fp32 model")
        precision, flavour = str(d["precision"]), d.get("flavour")
        if precision not in PRECISIONS:
            raise BundleError(f"{where}.precision is {precision!r}; allowed: {', '.join(PRECISIONS)}")
        if precision == "int8" and flavour not in ("cpu", "tensorrt"):
            raise BundleError(f"{where}.flavour is {flavour!r}; an int8 variant is 'cpu' or 'tensorrt'")
        vid = precision if precision != "int8" else "int8-" + str(flavour)
        return cls(id=vid, file=str(d["file"]), precision=precision, flavour=str(flavour) if flavour else None)


@dataclass(frozen=True)
class Manifest:
    """The validated manifest. `raw` keeps every field for reporting."""

    raw: Mapping[str, Any]
    task: str
    labels: Tuple[str, ...]
    preprocess: PreprocessSpec
    temperature: float
    decision: DecisionRule
    model_file: str
    input_name: str
    output_name: str
    num_outputs: int
    min_confidence: float = 0.0  # abstain below this top probability (binary/multiclass); 0 never abstains
    variants: Tuple[Variant, ...] = ()
    deploy_precision: str = "fp32"  # what `run` uses unless told otherwise

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise BundleError("manifest.json must hold a JSON object")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise BundleError(f"manifest has unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
        for key, (required, types) in _FIELDS.items():
            if key not in d:
                if required:
                    raise BundleError(f"manifest is missing the required field {key!r}")
                continue
            if not isinstance(d[key], types) or (types == (int,) and isinstance(d[key], bool)):
                raise BundleError(f"manifest field {key!r} has type {type(d[key]).__name__}; expected {'/'.join(t.__name__ for t in types)}")
        if d["format"] != FORMAT:
            raise BundleError(f"manifest format is {d['format']!r}; expected {FORMAT!r}")
        if d["schema_version"] not in READABLE_SCHEMAS:
            raise BundleError(
                f"manifest schema_version {d['schema_version']} is not supported by this edgeclf (reads {READABLE_SCHEMAS}); "
                "upgrade edgeclf or re-export the bundle"
            )
        task = d["task"]
        if task not in TASKS:
            raise BundleError(f"manifest.task is {task!r}; allowed: {', '.join(TASKS)}")
        labels = tuple(str(x) for x in d["labels"])
        if len(labels) < 2 and task != "multilabel" or len(labels) < 1:
            raise BundleError(f"manifest.labels has {len(labels)} entries; a {task} model needs at least 2")
        if task == "binary" and len(labels) != 2:
            raise BundleError(f"manifest.labels has {len(labels)} entries; a binary model has exactly 2")
        model = d["model"]
        missing = sorted(_MODEL_FIELDS - set(model))
        if missing:
            raise BundleError(f"manifest.model is missing field(s) {missing}")
        num_outputs = 1 if task == "binary" else len(labels)
        out_shape = model["output_shape"]
        if not isinstance(out_shape, list) or len(out_shape) != 2 or out_shape[1] != num_outputs:
            raise BundleError(f"manifest.model.output_shape is {out_shape!r}; a {task} model with {len(labels)} labels has [batch, {num_outputs}]")
        post = d["postprocess"]
        for key in ("temperature", "decision"):
            if key not in post:
                raise BundleError(f"manifest.postprocess is missing {key!r}")
        temperature = post["temperature"]
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise BundleError(f"manifest.postprocess.temperature is {temperature!r}; expected a positive number")
        unknown_post = sorted(set(post) - {"temperature", "decision", "min_confidence"})
        if unknown_post:
            raise BundleError(f"manifest.postprocess has unknown field(s) {unknown_post}")
        min_conf = post.get("min_confidence", 0.0)
        if not isinstance(min_conf, (int, float)) or not 0.0 <= min_conf < 1.0:
            raise BundleError(f"manifest.postprocess.min_confidence is {min_conf!r}; expected a number in [0, 1)")
        try:
            pre = PreprocessSpec.from_dict(d["preprocess"])
            rule = DecisionRule.from_dict(post["decision"])
        except Exception as exc:  # ConfigError from the nested validators, re-labelled as a bundle problem
            raise BundleError(f"manifest: {exc}") from None
        in_shape = model["input_shape"]
        if not isinstance(in_shape, list) or len(in_shape) != 4 or list(in_shape[1:]) != [pre.channels, pre.size[0], pre.size[1]]:
            raise BundleError(f"manifest.model.input_shape {in_shape!r} disagrees with preprocess ({pre.channels}, {pre.size[0]}, {pre.size[1]})")
        variants = tuple(Variant.from_dict(v, f"manifest.variants[{i}]") for i, v in enumerate(d.get("variants", [])))
        ids = [v.id for v in variants]
        if len(set(ids)) != len(ids) or "fp32" in ids:
            raise BundleError(f"manifest.variants repeat a precision or list fp32 again: {ids}")
        deploy = str((d.get("deploy") or {}).get("precision", "fp32"))
        if deploy != "fp32" and deploy not in {v.precision for v in variants}:
            raise BundleError(f"manifest.deploy.precision is {deploy!r} but the bundle holds no such variant")
        return cls(
            raw=d,
            task=task,
            labels=labels,
            preprocess=pre,
            temperature=float(temperature),
            decision=rule,
            model_file=str(model["file"]),
            input_name=str(model["input_name"]),
            output_name=str(model["output_name"]),
            num_outputs=num_outputs,
            min_confidence=float(min_conf),
            variants=variants,
            deploy_precision=deploy,
        )


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    checksum: str  # sha256 of checksums.sha256: identifies the whole bundle

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    def select(self, precision: Optional[str], backend: str) -> Tuple[Path, str]:
        """The model file for a precision (default: the bundle's deploy choice) on a backend.

        Returns (path, variant id). INT8 picks the flavour the backend needs.
        """
        m = self.manifest
        want = precision or m.deploy_precision
        if precision is None and want == "fp16" and backend == "ort-cpu":
            log.info("fp16 brings no speed on a CPU: running the fp32 model")  # ask with --precision fp16 to force it
            want = "fp32"
        if want == "fp32":
            return self.model_path, "fp32"
        flavour = INT8_FLAVOUR_FOR_BACKEND.get(backend, "cpu") if want == "int8" else None
        for v in m.variants:
            if v.precision == want and (v.flavour == flavour or want != "int8"):
                return self.path / v.file, v.id
        have = ["fp32"] + [v.id for v in m.variants]
        if precision is None:  # the deploy choice lacks this backend's flavour: fall back, never guess
            log.warning("bundle %s deploys %s but holds no %s variant for %s; using fp32", self.path.name, want, flavour, backend)
            return self.model_path, "fp32"
        raise BundleError(
            f"bundle {self.path.name} holds {', '.join(have)}, not {want}{' (' + str(flavour) + ' flavour for ' + backend + ')' if flavour else ''}; "
            "re-export it with that precision or choose another"
        )

    @property
    def reference_path(self) -> Optional[Path]:
        ref = self.manifest.raw.get("reference")
        return self.path / str(ref["file"]) if ref else None


def load_bundle(path: PathLike, *, verify: bool = True) -> Bundle:
    """Load a bundle folder; with verify (the default) every checksum is checked first."""
    root = Path(path)
    if not root.exists():
        raise BundleError(f"bundle {root} does not exist; give the folder written by `edgeclf export`")
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a folder; a bundle is the folder written by `edgeclf export`")
    if not (root / MANIFEST_FILE).is_file():
        raise BundleError(f"{root} has no {MANIFEST_FILE}, so it is not an edgeclf bundle; give the folder written by `edgeclf export`")
    checksum = verify_checksums(root) if verify else ""
    try:
        raw = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{root / MANIFEST_FILE} is not valid JSON ({exc}); re-export the bundle") from None
    manifest = Manifest.from_dict(raw)
    for f in [manifest.model_file] + [v.file for v in manifest.variants]:
        if not (root / f).is_file():
            raise BundleError(f"bundle {root} has no model file {f!r}; re-export the bundle")
    log.info("loaded bundle %s (%s, %d labels)", root, manifest.task, len(manifest.labels))
    return Bundle(path=root, manifest=manifest, checksum=checksum)
