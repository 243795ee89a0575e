"""Property-based tests of bundle loading: random manifest mutations, random manifest bytes, and bundle
folders with flipped bytes, missing files and extra files (profiles: tests/_fuzz.py)."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from edgeclf.errors import BundleError, IntegrityError
from edgeclf.runtime.bundle import (
    CHECKSUM_FILE,
    FORMAT,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    Manifest,
    load_bundle,
)
from edgeclf.runtime.postprocess import DecisionRule, decide, probabilities
from edgeclf.runtime.preprocess import Preprocessor, PreprocessSpec
from tests._fuzz import check_error, time_limit


def valid_manifest() -> Dict[str, Any]:
    """A manifest as `edgeclf export` writes it for a 3-class model (no files needed to validate it)."""
    spec = PreprocessSpec(channels=1, size=(32, 32), mean=(0.5,), std=(0.25,))
    rule = DecisionRule(kind="max-ratio", thresholds=(0.3, 0.4, 0.5), target_sensitivity=0.9)
    return {
        "schema_version": SCHEMA_VERSION, "format": FORMAT, "name": "tiny", "created": "2024-01-01T00:00:00+00:00",
        "task": "multiclass", "labels": ["normal", "cyst", "mass"],
        "model": {"file": "model.onnx", "architecture": "compact", "precision": "fp32", "opset": 17, "ir_version": 8,
                  "input_name": "input", "output_name": "logits", "input_shape": ["batch", 1, 32, 32],
                  "output_shape": ["batch", 3]},
        "variants": [{"id": "int8-cpu", "file": "model.int8-cpu.onnx", "precision": "int8", "flavour": "cpu", "gate": {}}],
        "deploy": {"precision": "int8", "reason": "faster"},
        "preprocess": spec.to_dict(),
        "postprocess": {"temperature": 1.5, "decision": rule.to_dict(), "min_confidence": 0.0},
        "provenance": {"exported_at": "2024-01-01", "data": {"hash": "x"}},
        "parity": {"n": 3, "decision_agreement": 1.0},
        "metrics": {},
        "reference": {"file": "reference.npz", "count": 3, "split": "val"},
    }


def test_the_base_manifest_is_valid() -> None:
    m = Manifest.from_dict(valid_manifest())
    assert m.labels == ("normal", "cyst", "mass") and m.deploy_precision == "int8"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)


def _containers(obj: Any, path: Tuple[Any, ...] = ()) -> List[Tuple[Tuple[Any, ...], Any]]:
    """Every (path, container) in a JSON tree: where a mutation can happen."""
    out: List[Tuple[Tuple[Any, ...], Any]] = []
    if isinstance(obj, dict):
        out.append((path, obj))
        for k, v in obj.items():
            out += _containers(v, path + (k,))
    elif isinstance(obj, list):
        out.append((path, obj))
        for i, v in enumerate(obj):
            out += _containers(v, path + (i,))
    return out


@st.composite
def mutated_manifests(draw: st.DrawFn) -> Dict[str, Any]:
    m = valid_manifest()
    for _ in range(draw(st.integers(1, 4))):
        places = _containers(m)
        _, target = draw(st.sampled_from(places))
        op = draw(st.sampled_from(["delete", "replace", "add", "retype"]))
        keys = list(target.keys()) if isinstance(target, dict) else list(range(len(target)))
        if op == "add" or not keys:
            if isinstance(target, dict):
                target[draw(st.text(max_size=12))] = draw(json_values)
            else:
                target.append(draw(json_values))
            continue
        key = draw(st.sampled_from(keys))
        if op == "delete":
            del target[key]
        elif op == "replace":
            target[key] = draw(json_values)
        else:  # the same value in a confusing type: "1" for 1, [x] for x, True for 1, NaN for numbers
            v = target[key]
            target[key] = draw(st.sampled_from([str(v), [v], {"v": v}, True, None, float("nan"), -1, 0, 10**12, ""]))
    return m


def _use(m: Manifest) -> None:
    """What a device does with an accepted manifest: it must not fail outside the error tree."""
    Preprocessor(m.preprocess)(np.zeros((40, 30), np.uint8))
    logits = np.zeros((1, m.num_outputs), np.float32)
    decide(probabilities(logits, m.task, m.temperature), m.decision)
    if m.task != "multilabel":  # the pipeline smooths single-label tasks only
        from edgeclf.runtime.smoothing import CineSmoother

        CineSmoother.from_manifest(m).update(probabilities(logits, m.task, m.temperature)[0], quality_ok=True, reasons=())


@given(mutated_manifests())
def test_any_mutated_manifest_is_accepted_and_usable_or_refused_in_one_line(m: Dict[str, Any]) -> None:
    with time_limit():
        try:
            manifest = Manifest.from_dict(copy.deepcopy(m))
        except Exception as exc:
            check_error(exc)
            assert isinstance(exc, BundleError)
            return
        try:
            _use(manifest)
        except Exception as exc:
            check_error(exc)


@given(st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),  # nesting deep enough to exhaust the parser
    mutated_manifests().map(lambda m: json.dumps(m).encode()),
))
def test_any_manifest_bytes_are_refused_in_one_line_or_load(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    folder = tmp_path_factory.mktemp("m")
    (folder / MANIFEST_FILE).write_bytes(data)
    for name in ("model.onnx", "model.int8-cpu.onnx", "reference.npz"):
        (folder / name).write_bytes(b"x")
    with time_limit():
        try:
            b = load_bundle(folder, verify=False)
        except Exception as exc:
            check_error(exc)
            return
    assert isinstance(b.manifest, Manifest)
    shutil.rmtree(folder)


# ------------------------------------------------------------------------------------------ bundle folders


@pytest.fixture(scope="module")
def signed_bundle(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Any]:
    """A signed copy of the tiny bundle (signature checks too where cryptography is installed)."""
    dst = tmp_path_factory.mktemp("fuzzbundle") / "b"
    shutil.copytree(bundle_dir, dst)
    pub = None
    try:
        import cryptography  # noqa: F401

        from edgeclf.runtime.bundle import generate_keypair, sign_bundle

        keys = tmp_path_factory.mktemp("keys")
        generate_keypair(keys / "k.pem", keys / "k.pub.pem")
        sign_bundle(dst, keys / "k.pem")
        pub = keys / "k.pub.pem"
    except ImportError:
        pass
    return dst, pub


_NAME_CHARS = st.characters(whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters="._-~ #%") | st.sampled_from("aZ0._")


@st.composite
def damage(draw: st.DrawFn, names: List[str]) -> Dict[str, Any]:
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "remove", "extra"]))
    if kind == "extra":
        name = draw(st.text(_NAME_CHARS, min_size=1, max_size=24))
        assume(name not in (".", "..") and name not in names and name.strip() == name and "/" not in name)
        sub = draw(st.sampled_from(["", "sub/", ".hidden/"]))
        return {"kind": kind, "name": sub + name, "data": draw(st.binary(max_size=64))}
    name = draw(st.sampled_from(names))
    if kind == "remove":
        return {"kind": kind, "name": name}
    if kind == "truncate":
        return {"kind": kind, "name": name, "frac": draw(st.floats(0, 1, exclude_max=True))}
    flips = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3))
    return {"kind": kind, "name": name, "flips": flips}


_FILES = ["manifest.json", "model.onnx", "reference.npz", CHECKSUM_FILE, SIGNATURE_FILE]


@given(st.data())
def test_any_damaged_bundle_is_refused_naming_the_file(signed_bundle: Tuple[Path, Any], data: st.DataObject) -> None:
    root, pub = signed_bundle
    names = [n for n in _FILES if (root / n).exists()]
    d = data.draw(damage(names))
    target = root / d["name"]
    original = target.read_bytes() if target.is_file() else None
    try:
        if d["kind"] == "extra":
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(d["data"])
        elif d["kind"] == "remove":
            target.unlink()
        elif d["kind"] == "truncate":
            assert original is not None
            target.write_bytes(original[: int(d["frac"] * len(original))])
        else:
            assert original is not None
            buf = bytearray(original)
            for frac, mask in d["flips"]:
                buf[int(frac * len(buf))] ^= mask
            assume(bytes(buf) != original)  # two flips of the same byte can cancel out
            target.write_bytes(bytes(buf))
        trusted = [None] + ([pub] if pub is not None else [])
        for key in trusted:
            if d["kind"] == "remove" and d["name"] == SIGNATURE_FILE and key is None:
                assert load_bundle(root).signature is None  # unsigned is allowed without a trusted key
                continue
            with time_limit(), pytest.raises(BundleError) as info:
                load_bundle(root, trusted_key=key)
            check_error(info.value)
            msg = str(info.value)
            shown = d["name"].split("/")[0] if d["kind"] == "extra" else d["name"]
            assert shown in msg or (d["name"] == CHECKSUM_FILE and isinstance(info.value, IntegrityError)), msg
    finally:
        if d["kind"] == "extra":
            top = root / d["name"].split("/")[0]
            shutil.rmtree(top) if top.is_dir() else top.unlink()
        elif original is not None:
            target.write_bytes(original)
    assert load_bundle(root, trusted_key=pub).checksum  # restored for the next example


def test_nan_and_infinity_in_manifest_json_are_refused(tmp_path: Path) -> None:
    """Python's json reads NaN and Infinity, which JSON forbids: they must not become thresholds."""
    for value in (float("nan"), float("inf")):
        m = valid_manifest()
        m["postprocess"]["decision"]["thresholds"][0] = value
        with pytest.raises(BundleError):
            Manifest.from_dict(m)
        assert not math.isfinite(value)
