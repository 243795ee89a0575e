from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeclf.errors import BundleError, IntegrityError
from edgeclf.runtime.bundle import CHECKSUM_FILE, load_bundle, verify_checksums, write_checksums


def test_exported_bundle_loads_and_matches_contract(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    m = b.manifest
    assert m.task == "multiclass" and m.labels == ("normal", "cyst", "mass")
    assert m.raw["model"]["opset"] == 17 and m.raw["model"]["input_shape"] == ["batch", 1, 32, 32]
    assert m.raw["parity"]["decision_agreement"] == 1.0
    assert m.raw["reference"]["count"] == min(64, m.raw["parity"]["n"])
    assert m.raw["provenance"]["data"]["hash"] and m.raw["provenance"]["packages"]["onnxruntime"]
    listed = [ln.split("  ", 1)[1] for ln in (bundle_dir / CHECKSUM_FILE).read_text().splitlines()]
    assert sorted(listed) == ["manifest.json", "model.onnx", "reference.npz"]
    assert len(b.checksum) == 64


@pytest.mark.parametrize("name", ["manifest.json", "model.onnx", "reference.npz", CHECKSUM_FILE])
def test_one_changed_byte_in_any_file_is_refused(bundle_copy: Path, name: str) -> None:
    p = bundle_copy / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        load_bundle(bundle_copy)
    msg = str(info.value)
    assert "\n" not in msg
    assert name in msg or CHECKSUM_FILE in msg


def test_extra_or_missing_files_are_refused(bundle_copy: Path) -> None:
    (bundle_copy / "engine.plan").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="engine.plan.*not covered"):
        verify_checksums(bundle_copy)
    (bundle_copy / "engine.plan").unlink()
    (bundle_copy / "reference.npz").unlink()
    with pytest.raises(IntegrityError, match="reference.npz.*missing"):
        verify_checksums(bundle_copy)


def _rewrite_manifest(bundle: Path, edit) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    write_checksums(bundle)  # a validly re-signed but malformed manifest must still be refused by the schema


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(colour="red"), r"unknown field\(s\) \['colour'\]"),
        (lambda m: m.pop("labels"), "missing the required field 'labels'"),
        (lambda m: m.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda m: m.update(task="regression"), "task is 'regression'"),
        (lambda m: m["postprocess"].update(temperature=-1), "temperature"),
        (lambda m: m["preprocess"].update(channels=2), "channels"),
        (lambda m: m["model"].update(output_shape=["batch", 7]), "output_shape"),
        (lambda m: m["postprocess"]["decision"].update(kind="argmax"), "decision"),
    ],
)
def test_manifest_schema_names_the_bad_field(bundle_copy: Path, edit, match: str) -> None:
    _rewrite_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)


def test_variant_files_must_be_plain_names_inside_the_bundle(bundle_copy: Path) -> None:
    def add_variant(m):
        m["variants"] = [{"file": "../elsewhere.onnx", "precision": "int8", "flavour": "cpu"}]

    _rewrite_manifest(bundle_copy, add_variant)
    with pytest.raises(BundleError, match="plain file name"):
        load_bundle(bundle_copy)


def test_schema_version_1_bundles_still_load(bundle_copy: Path) -> None:
    _rewrite_manifest(bundle_copy, lambda m: (m.update(schema_version=1), m.pop("variants"), m.pop("deploy")))
    assert load_bundle(bundle_copy).manifest.deploy_precision == "fp32"
