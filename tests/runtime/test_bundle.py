from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeclf.errors import BundleError, ConfigError, IntegrityError
from edgeclf.runtime.bundle import (
    CHECKSUM_FILE,
    SIGNATURE_FILE,
    TRUSTED_KEY_ENV,
    load_bundle,
    verify_checksums,
    write_checksums,
)


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


# ------------------------------------------------------------------------------ integrity, every file



def _files(bundle: Path) -> list:
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


def _keys(tmp_path: Path, name: str = "k") -> tuple:
    pytest.importorskip("cryptography")
    from edgeclf.runtime.bundle import generate_keypair

    priv, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    generate_keypair(priv, pub)
    return priv, pub


@pytest.fixture
def signed_copy(bundle_copy: Path, tmp_path: Path) -> tuple:
    from edgeclf.runtime.bundle import sign_bundle

    priv, pub = _keys(tmp_path)
    sign_bundle(bundle_copy, priv)
    return bundle_copy, pub


def _flip_each_byte_position(p: Path) -> list:
    size = p.stat().st_size
    return sorted({0, 1, size // 3, size // 2, size - 2, size - 1} & set(range(size)))


def test_every_file_is_covered_and_one_flipped_byte_anywhere_is_refused(signed_copy: tuple) -> None:
    bundle, pub = signed_copy
    names = _files(bundle)
    assert set(names) == {"manifest.json", "model.onnx", "reference.npz", CHECKSUM_FILE, SIGNATURE_FILE}
    assert load_bundle(bundle, trusted_key=pub).signature == {"key_id": load_bundle(bundle).signature["key_id"],
                                                              "checked": True, "trusted": True}
    for name in names:
        p = bundle / name
        original = p.read_bytes()
        for pos in _flip_each_byte_position(p):
            for mask in (0x01, 0x20, 0x80):
                data = bytearray(original)
                data[pos] ^= mask
                p.write_bytes(bytes(data))
                for key in (None, pub):  # with and without a trusted key: refused either way
                    with pytest.raises(IntegrityError) as info:
                        load_bundle(bundle, trusted_key=key)
                    msg = str(info.value)
                    assert "\n" not in msg and name in msg, (name, pos, mask, msg)
        p.write_bytes(original)
    assert load_bundle(bundle, trusted_key=pub).checksum


def test_each_file_removed_is_refused_naming_it(signed_copy: tuple) -> None:
    bundle, pub = signed_copy
    for name in _files(bundle):
        p = bundle / name
        original = p.read_bytes()
        p.unlink()
        if name == SIGNATURE_FILE:  # unsigned is allowed only without a trusted key
            assert load_bundle(bundle).signature is None
            with pytest.raises(IntegrityError, match="not signed"):
                load_bundle(bundle, trusted_key=pub)
        else:
            with pytest.raises(BundleError) as info:
                load_bundle(bundle)
            assert name in str(info.value)
        p.write_bytes(original)
    load_bundle(bundle, trusted_key=pub)


@pytest.mark.parametrize("extra", ["engine.plan", ".DS_Store", "sub/notes.txt", "link.onnx", "fifo"])
def test_an_extra_file_of_any_kind_is_refused_naming_it(bundle_copy: Path, extra: str) -> None:
    p = bundle_copy / extra
    if extra == "link.onnx":
        p.symlink_to(bundle_copy / "model.onnx")
    elif extra == "fifo":
        os.mkfifo(p)  # hashing it would block forever: refused without opening it
    else:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    with pytest.raises(IntegrityError) as info:
        load_bundle(bundle_copy)
    assert extra in str(info.value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.replace("\n", "\r\n"), "line 1 is malformed"),
        (lambda t: t[:-1], "does not end with a newline"),
        (lambda t: t + t.splitlines(keepends=True)[0], "malformed"),
        (lambda t: t + "0" * 64 + "  ../outside.txt\n", "malformed"),
        (lambda t: t + "0" * 64 + "  /etc/passwd\n", "malformed"),
        (lambda t: t + "\n", "malformed"),
        (lambda t: t.upper(), "malformed"),
    ],
)
def test_checksum_file_is_parsed_strictly(bundle_copy: Path, edit, match: str) -> None:
    p = bundle_copy / CHECKSUM_FILE
    p.write_text(edit(p.read_text()))
    with pytest.raises(IntegrityError, match=match):
        load_bundle(bundle_copy)


def test_checksums_are_checked_before_any_session_is_created(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.runtime import app

    def no_session(*a, **k):
        raise AssertionError("a backend session was created for a bundle that failed verification")

    monkeypatch.setattr(app, "create_backend", no_session)
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[-1] ^= 1
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    for call in (lambda: app.run_bundle(str(bundle_copy), "synthetic:ultrasound?frames=2&size=64"),
                 lambda: app.verify_bundle(str(bundle_copy))):
        with pytest.raises(IntegrityError, match="model.onnx"):
            call()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["model"].update(extra=1), r"manifest.model has unknown field\(s\) \['extra'\]"),
        (lambda m: m["model"].pop("opset"), "manifest.model is missing the required field 'opset'"),
        (lambda m: m["model"].update(opset="17"), "manifest.model.opset is '17'"),
        (lambda m: m["model"].update(file="../model.onnx"), "manifest.model.file"),
        (lambda m: m["reference"].update(file="/etc/passwd"), "manifest.reference.file"),
        (lambda m: m["reference"].pop("count"), "manifest.reference is missing the required field 'count'"),
        (lambda m: m["reference"].update(file="model.onnx"), "manifest.reference.file is 'model.onnx', the manifest's or a model's"),
        (lambda m: m["reference"].update(file="manifest.json"), "manifest.reference.file is 'manifest.json'"),
        (lambda m: m["postprocess"].update(temperature=float("nan")), "temperature"),
        (lambda m: m["postprocess"].update(temperature=True), "temperature"),
        (lambda m: m.update(schema_version=True), "schema_version"),
        (lambda m: m.update(labels=["normal", "cyst", "cyst"]), "repeats a label"),
        (lambda m: m.update(labels=["normal", 3, "mass"]), "non-empty strings"),
        (lambda m: m.update(variants=["int8"]), r"manifest.variants\[0\] is str"),
        (lambda m: m["postprocess"]["decision"].update(thresholds=[0.5, 0.5]), "2 thresholds for 3 labels"),
        (lambda m: m["postprocess"]["decision"].update(kind="multilabel"), "multiclass model uses 'max-ratio'"),
        (lambda m: m.update(schema_version=3, colour="red"), "schema_version 3 is not supported"),
    ],
)
def test_manifest_schema_names_the_bad_nested_field(bundle_copy: Path, edit, match: str) -> None:
    _rewrite_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=match) as info:
        load_bundle(bundle_copy)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ signing


def test_signed_bundle_loads_with_its_key_and_is_refused_with_another(signed_copy: tuple, tmp_path: Path) -> None:
    bundle, pub = signed_copy
    b = load_bundle(bundle, trusted_key=pub)
    assert b.signature is not None and b.signature["trusted"] and len(b.signature["key_id"]) == 16
    _, other = _keys(tmp_path, "other")
    with pytest.raises(IntegrityError, match=f"signed by key {b.signature['key_id']}, not by the trusted key"):
        load_bundle(bundle, trusted_key=other)
    with pytest.raises(IntegrityError, match="signed by key"):
        load_bundle(bundle, trusted_key=other.read_bytes())  # PEM bytes work like a path


def test_trusted_key_from_the_environment_refuses_unsigned_bundles(bundle_copy: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclf.runtime.app import run_bundle
    from edgeclf.runtime.bundle import sign_bundle

    priv, pub = _keys(tmp_path)
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(pub))
    with pytest.raises(IntegrityError, match="not signed"):
        load_bundle(bundle_copy)
    with pytest.raises(IntegrityError, match="not signed"):
        run_bundle(str(bundle_copy), "synthetic:ultrasound?frames=2&size=64")
    sign_bundle(bundle_copy, priv)
    assert run_bundle(str(bundle_copy), "synthetic:ultrasound?frames=2&size=64")["frames"] == 2
    assert load_bundle(bundle_copy, require_signature=False).signature["trusted"]
    with pytest.raises(ConfigError, match="must be verified"):
        load_bundle(bundle_copy, verify=False)
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(priv))
    with pytest.raises(ConfigError, match="private key"):
        load_bundle(bundle_copy)
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="cannot read the trusted public key"):
        load_bundle(bundle_copy)
    monkeypatch.delenv(TRUSTED_KEY_ENV)
    with pytest.raises(ConfigError, match="no trusted key"):
        load_bundle(bundle_copy, require_signature=True)


def test_a_signature_goes_stale_when_the_bundle_is_re_checksummed(signed_copy: tuple) -> None:
    bundle, pub = signed_copy
    _rewrite_manifest(bundle, lambda m: m.update(name="renamed"))  # someone edits and re-checksums
    with pytest.raises(IntegrityError, match="changed after it was signed"):
        load_bundle(bundle)
    with pytest.raises(IntegrityError, match="changed after it was signed"):
        load_bundle(bundle, trusted_key=pub)


def test_signing_refuses_a_damaged_bundle_and_handles_encrypted_keys(bundle_copy: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from edgeclf.runtime.bundle import generate_keypair, sign_bundle

    priv, pub = tmp_path / "enc.pem", tmp_path / "enc.pub.pem"
    generate_keypair(priv, pub, passphrase=b"correct horse")
    assert oct(priv.stat().st_mode & 0o777) == "0o600" and b"ENCRYPTED" in priv.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        generate_keypair(priv, tmp_path / "x.pub.pem")
    with pytest.raises(ConfigError, match="encrypted: give its passphrase"):
        sign_bundle(bundle_copy, priv)
    with pytest.raises(ConfigError, match="passphrase is wrong"):
        sign_bundle(bundle_copy, priv, passphrase=b"wrong")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        sign_bundle(bundle_copy, pub)
    (bundle_copy / "extra.txt").write_text("x")
    with pytest.raises(IntegrityError, match="extra.txt"):
        sign_bundle(bundle_copy, priv, passphrase=b"correct horse")
    assert not (bundle_copy / SIGNATURE_FILE).exists()
    (bundle_copy / "extra.txt").unlink()
    sign_bundle(bundle_copy, priv, passphrase=b"correct horse")
    assert load_bundle(bundle_copy, trusted_key=pub).signature["trusted"]


def test_reference_file_may_not_be_a_variants_model(tmp_path: Path) -> None:
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = make_tiny_bundle(tmp_path / "b", variants=["fp16"])
    _rewrite_manifest(b, lambda m: m["reference"].update(file="model.fp16.onnx"))
    with pytest.raises(BundleError, match="manifest.reference.file is 'model.fp16.onnx', the manifest's or a model's file"):
        load_bundle(b)


@pytest.mark.parametrize("blocked", ["parent-is-a-file", "public-exists-as-dangling-link"])
def test_keygen_that_cannot_write_the_public_key_leaves_no_private_key(tmp_path: Path, blocked: str) -> None:
    pytest.importorskip("cryptography")
    from edgeclf.runtime.bundle import generate_keypair

    priv = tmp_path / "k.pem"
    if blocked == "parent-is-a-file":
        (tmp_path / "not-a-dir").write_text("x")
        pub = tmp_path / "not-a-dir" / "k.pub.pem"
    else:
        pub = tmp_path / "k.pub.pem"
        pub.symlink_to(tmp_path / "nowhere" / "k.pub.pem")  # exists() is False; O_EXCL still refuses it
    with pytest.raises(ConfigError, match="cannot write the key"):
        generate_keypair(priv, pub)
    assert not priv.exists(), "a private key left without its public key"
    generate_keypair(priv, tmp_path / "ok.pub.pem")  # so a retry with a good public path works
    assert priv.stat().st_size > 0 and (tmp_path / "ok.pub.pem").stat().st_size > 0


def test_keygen_never_removes_a_key_it_did_not_create(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from edgeclf.runtime.bundle import generate_keypair

    (tmp_path / "old.pem").write_text("someone's key")
    with pytest.raises(ConfigError, match="exists"):
        generate_keypair(tmp_path / "new.pem", tmp_path / "old.pem")
    assert (tmp_path / "old.pem").read_text() == "someone's key" and not (tmp_path / "new.pem").exists()


def test_cli_keygen_sign_and_verify_signature(bundle_copy: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from click.testing import CliRunner

    from edgeclf.cli_integrity import integrity

    runner = CliRunner()
    priv = tmp_path / "k.pem"
    res = runner.invoke(integrity, ["keygen", "--private", str(priv), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["public"] == str(tmp_path / "k.pub.pem") and Path(doc["public"]).is_file()
    res = runner.invoke(integrity, ["verify-signature", str(bundle_copy), "--key", doc["public"]])
    assert isinstance(res.exception, IntegrityError) and "not signed" in str(res.exception)
    res = runner.invoke(integrity, ["sign", str(bundle_copy), "--key", str(priv)])
    assert res.exit_code == 0 and doc["key_id"] in res.output
    res = runner.invoke(integrity, ["verify-signature", str(bundle_copy), "--key", doc["public"], "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["signature"]["key_id"] == doc["key_id"]
    res = runner.invoke(integrity, ["sign", str(bundle_copy), "--key", str(priv), "--passphrase-env", "EDGECLF_NO_SUCH_VAR"])
    assert isinstance(res.exception, ConfigError)
    res = runner.invoke(integrity, ["verify-signature", str(bundle_copy)], env={TRUSTED_KEY_ENV: ""})
    assert isinstance(res.exception, ConfigError) and "no trusted key" in str(res.exception)


def test_an_unreadable_file_is_one_line_naming_it(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from edgeclf.runtime import bundle as bundle_mod

    real = bundle_mod._hash_regular

    def denied(path, name):
        if name == "model.onnx":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, name)

    monkeypatch.setattr(bundle_mod, "_hash_regular", denied)
    with pytest.raises(BundleError, match="'model.onnx' cannot be read \\(Permission denied\\)"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(("key", "value"), [("mean", [1e300]), ("std", [1e-300]), ("std", [float("inf")]), ("scale", 0.0)])
def test_preprocessing_that_overflows_float32_is_refused(bundle_copy: Path, key: str, value) -> None:
    _rewrite_manifest(bundle_copy, lambda m: m["preprocess"].update({key: value}))
    with pytest.raises(BundleError, match="finite in float32"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("where", ["folder", "walk"])
def test_an_owner_only_bundle_is_one_line_not_a_traceback(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    # A 0700 folder owned by another user: stat() of any file inside fails with EACCES (root ignores modes, so patched).
    import errno

    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    if where == "folder":
        real_is_file = Path.is_file

        def is_file(self: Path) -> bool:
            if self.name == "manifest.json":
                raise denied
            return real_is_file(self)

        monkeypatch.setattr(Path, "is_file", is_file)
    else:  # os.walk used to skip an unreadable folder silently: every file then looked "missing"
        monkeypatch.setattr(os, "scandir", lambda *a, **k: (_ for _ in ()).throw(denied))
    with pytest.raises(BundleError, match=r"cannot be read \(PermissionError\); check its permissions") as info:
        load_bundle(bundle_copy)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", [CHECKSUM_FILE, SIGNATURE_FILE])
def test_a_variant_cannot_name_the_checksum_or_signature_file(tmp_path: Path, name: str) -> None:
    # The signature file is the one file the checksums do not cover; model.file already refuses both names.
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b", variants=["fp16"])
    (bundle / "model.fp16.onnx").unlink()
    _rewrite_manifest(bundle, lambda m: m["variants"][0].update(file=name))
    with pytest.raises(BundleError, match=r"manifest.variants\[0\].file") as info:
        load_bundle(bundle)
    assert "\n" not in str(info.value)


def test_signing_that_cannot_write_is_one_line_and_leaves_the_bundle_loadable(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk or a read-only bundle folder: a user's problem, one line; and no half-written
    # .checksums.sha256.sig.tmp left behind, which the next load would refuse as a file not covered.
    import errno

    from edgeclf.runtime.bundle import sign_bundle
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    priv, _ = _keys(tmp_path)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(BundleError, match=r"cannot write .*No space left on device") as info:
        sign_bundle(bundle, priv)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in bundle.iterdir()) == sorted([CHECKSUM_FILE, "manifest.json", "model.onnx", "reference.npz"])
    assert load_bundle(bundle).signature is None


# ------------------------------------------------------- what is used is what was hashed (no check/use window)


def _race_after_hashing(monkeypatch: pytest.MonkeyPatch, last: str, write) -> list:
    """A writer racing the load: once `last` (the last file hashed, names sort) has been hashed, `write()` runs,
    as if another process rewrote the bundle between the checks and the use. Returns [] until it has run."""
    from edgeclf.runtime import bundle as bundle_mod

    real, fired = bundle_mod._hash_regular, []

    def hashed_then_raced(path, name):
        digest_and_size = real(path, name)
        if name == last and not fired:
            write()
            fired.append(True)
        return digest_and_size

    monkeypatch.setattr(bundle_mod, "_hash_regular", hashed_then_raced)
    return fired


def test_the_manifest_used_is_the_one_that_was_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.runtime.tiny_bundle import LABELS, make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    swapped = json.loads((bundle / "manifest.json").read_text())
    swapped["labels"] = ["benign", "cyst", "malignant"]
    fired = _race_after_hashing(monkeypatch, "reference.npz",
                                lambda: (bundle / "manifest.json").write_text(json.dumps(swapped)))
    b = load_bundle(bundle)
    assert fired, "the racing write never happened: the test no longer exercises the window"
    assert b.manifest.labels == tuple(LABELS)  # the verified manifest, not the one written after the check


def test_the_signature_covers_the_checksum_file_that_was_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Someone who can write the folder but has no key: an edited manifest with fresh checksums (the signature is now
    # stale), then the signed checksum file put back once the files were hashed, before the signature check reads it.
    from edgeclf.runtime.bundle import sign_bundle
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    priv, pub = _keys(tmp_path)
    sign_bundle(bundle, priv)
    signed_sums = (bundle / CHECKSUM_FILE).read_bytes()
    _rewrite_manifest(bundle, lambda m: m.update(labels=["benign", "cyst", "malignant"]))
    edited_sums = (bundle / CHECKSUM_FILE).read_bytes()
    fired = _race_after_hashing(monkeypatch, "reference.npz", lambda: (bundle / CHECKSUM_FILE).write_bytes(signed_sums))
    for key in (pub, None):
        fired.clear()
        (bundle / CHECKSUM_FILE).write_bytes(edited_sums)
        with pytest.raises(IntegrityError, match="signs another checksums.sha256") as info:
            load_bundle(bundle, trusted_key=key)
        assert fired and "\n" not in str(info.value)


def test_read_file_hands_over_the_verified_bytes_or_refuses(tmp_path: Path) -> None:
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    b = load_bundle(bundle)
    original = (bundle / "reference.npz").read_bytes()
    assert b.read_file(b.reference_path) == b.read_file("reference.npz") == original
    assert b.read_model(b.model_path) == (bundle / "model.onnx").read_bytes()
    (bundle / "reference.npz").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="'reference.npz' changed after the bundle was verified") as info:
        b.read_file(b.reference_path)
    assert "\n" not in str(info.value)
    for outside in (tmp_path / "elsewhere.onnx", "../b/model.onnx", CHECKSUM_FILE):
        with pytest.raises(BundleError):
            b.read_file(outside)
    unverified = load_bundle(bundle, verify=False)  # nothing to compare with: the bytes as they are, read once
    assert unverified.read_file("reference.npz") == (bundle / "reference.npz").read_bytes()


@pytest.mark.parametrize("edit, sector", [
    (lambda m: None, False),
    (lambda m: m["preprocess"].update(sector=True), True),
    # exported before preprocess.sector existed: the training data spec says it
    (lambda m: m["provenance"].update(data={"name": "pocus?frames=8&roi=sector", "kind": "clips"}), True),
    (lambda m: m["provenance"].update(data={"name": "pocus?frames=8", "kind": "clips"}), False),
    (lambda m: m["provenance"].update(data={"name": "roi=sector", "kind": "images"}), False),  # a folder's name, not an option
])
def test_a_bundle_says_whether_its_model_was_trained_on_sector_crops(tmp_path: Path, edit, sector: bool) -> None:
    from tests.runtime.tiny_bundle import make_tiny_bundle

    folder = make_tiny_bundle(tmp_path / "b")
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    write_checksums(folder)
    assert load_bundle(folder).manifest.trained_on_sector is sector


def test_a_manifest_without_sector_reserialises_without_it(bundle_dir: Path) -> None:
    """preprocess.sector is written only when true: bundles of other models keep their bytes and checksums."""
    b = load_bundle(bundle_dir)
    assert "sector" not in b.manifest.raw["preprocess"] and b.manifest.preprocess.to_dict() == b.manifest.raw["preprocess"]


# ------------------------------------------- what an attacker with write access to the folder can do: one line each


def _make_deep_tree(root: Path, depth: int, name: str, leaf: bytes) -> None:
    """root/name/name/... (`depth` folders) with a file x at the bottom, made through folder fds (no path too long)."""
    fd = os.open(str(root), os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            below = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = below
        out = os.open("x", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, leaf)
        os.close(out)
    finally:
        os.close(fd)


def _remove_deep_tree(root: Path, name: str) -> None:
    """Remove root/name and all below it, bottom up through folder fds: shutil.rmtree (so pytest's cleanup) recurses."""
    fd, depth = os.open(str(root), os.O_RDONLY), 0
    try:
        while True:
            try:
                below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                break
            os.close(fd)
            fd, depth = below, depth + 1
        for leaf in os.listdir(fd) if depth else ():  # the bottom folder's files (x), never root's
            os.unlink(leaf, dir_fd=fd)
        for _ in range(depth):
            above = os.open("..", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = above
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("depth, name, match", [
    (1100, "d", "is not covered by"),  # deeper than Python's recursion limit
    (17, "n" * 250, "nested too deeply to list"),  # a path longer than PATH_MAX (4096), without 2000 slow rmdirs
])
def test_a_deep_folder_tree_in_the_bundle_is_refused_in_one_line(tmp_path: Path, depth: int, name: str, match: str) -> None:
    """A stray file at the bottom of a deep folder tree (left by a careless copy or put there on purpose) is refused
    in one line naming it, not a RecursionError from the listing (os.walk recursed); a tree too deep for a path
    (over PATH_MAX) says so, rather than that the bundle is unreadable. Listing is unchanged: once checksummed,
    the deep file is a file of the bundle like any other."""
    from tests.conftest import run_cli
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    _make_deep_tree(bundle, depth, name, b"stray")
    try:
        with pytest.raises(IntegrityError, match=match) as info:
            load_bundle(bundle)
        assert "\n" not in str(info.value) and len(str(info.value)) < 600
        if name == "d":
            res = run_cli("bundle", "verify", "--no-parity", str(bundle), timeout=120)
            assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-400:]
            write_checksums(bundle)  # the same listing semantics: a deep file is a file of the bundle, covered once listed
            assert load_bundle(bundle).digests[f"{name}/" * depth + "x"]
    finally:
        _remove_deep_tree(bundle, name)


def _run_with_memory_limit(*args: str) -> subprocess.CompletedProcess[str]:
    """python ARGS in a child with a 6 GiB address-space limit: should a regression read a 1 TB file whole, it
    fails fast instead of exhausting this machine (where memory overcommit would allow the allocation)."""
    from tests.conftest import REPO

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=str(REPO), env=env,
                          preexec_fn=limit, timeout=120)


def test_a_huge_manifest_is_refused_in_one_line_not_a_memory_error(tmp_path: Path) -> None:
    """manifest.json replaced by a 1 TB sparse file (no disk used): the manifest was read whole before its hash
    was compared, so MemoryError; now at most 16 MiB + 1 byte is read and the file is refused by name, with or
    without verification (exit code 2 through the CLI)."""
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    os.truncate(bundle / "manifest.json", 1 << 40)
    try:
        res = _run_with_memory_limit(
            "-c",
            "from edgeclf.errors import IntegrityError\n"
            "from edgeclf.runtime.bundle import load_bundle\n"
            "for verify in (True, False):\n"
            "    try:\n"
            f"        load_bundle({str(bundle)!r}, verify=verify)\n"
            "    except IntegrityError as exc:\n"
            "        print(exc)\n"
        )
        cli = _run_with_memory_limit("-m", "edgeclf", "bundle", "verify", "--no-parity", str(bundle))
    finally:
        (bundle / "manifest.json").unlink()  # no 1 TB (sparse) file left behind
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) == 2, (res.stdout + res.stderr)[-600:]
    assert all("'manifest.json' is over 16777216 bytes" in line for line in lines), lines
    assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [cli.stderr.strip()], cli.stderr[-400:]
    assert "manifest.json" in cli.stderr


def test_a_model_swapped_for_a_huge_file_after_load_is_refused_in_one_line(tmp_path: Path) -> None:
    """After load_bundle, model.onnx replaced by a 1 TB sparse file: read_model compares the size verified at load
    before reading, so the usual "changed after the bundle was verified", never a 1 TB read and MemoryError.
    Loaded unverified (no size to compare), a file too big for memory is one line as well."""
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    res = _run_with_memory_limit(
        "-c",
        "import os\n"
        "from edgeclf.errors import BundleError\n"
        "from edgeclf.runtime.bundle import load_bundle\n"
        f"verified, unverified = load_bundle({str(bundle)!r}), load_bundle({str(bundle)!r}, verify=False)\n"
        "os.truncate(verified.model_path, 1 << 40)\n"
        "for b in (verified, unverified):\n"
        "    try:\n"
        "        b.read_model(b.model_path)\n"
        "    except BundleError as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    (bundle / "model.onnx").unlink()  # no 1 TB (sparse) file left behind (tmp_path is kept a while)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) == 2, (res.stdout + res.stderr)[-600:]
    assert lines[0].startswith("IntegrityError bundle file 'model.onnx' changed after the bundle was verified"), lines
    assert lines[1].startswith("BundleError bundle file 'model.onnx' (1099511627776 bytes) is too large"), lines


@pytest.mark.parametrize("name", ["model.onnx", "reference.npz", CHECKSUM_FILE, SIGNATURE_FILE])
def test_a_fifo_swapped_in_for_a_bundle_file_is_refused_not_waited_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      name: str) -> None:
    """A writer replaces a file by a FIFO after the folder was listed (or after the checksum or signature file was
    checked with is_file): a blocking open would wait forever for a writer to the FIFO. Every file of the bundle
    is opened non-blocking and refused unless it is a regular file."""
    import threading

    from edgeclf.runtime import bundle as bundle_mod
    from tests.runtime.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    target = bundle / name
    if name == SIGNATURE_FILE:
        target.write_text("{}\n")  # refused as a FIFO before anything parses it
    listed_first = name not in (CHECKSUM_FILE, SIGNATURE_FILE)
    real_files, real_is_file = bundle_mod._bundle_files, Path.is_file

    def swap() -> None:
        target.unlink()
        os.mkfifo(target)

    def listed_then_swapped(root: Path) -> list:
        names = real_files(root)
        if listed_first:
            swap()
        return names

    def checked_then_swapped(self: Path) -> bool:
        ok = real_is_file(self)
        if not listed_first and self == target and ok:
            swap()
        return ok

    monkeypatch.setattr(bundle_mod, "_bundle_files", listed_then_swapped)
    monkeypatch.setattr(Path, "is_file", checked_then_swapped)
    outcome: dict = {}

    def load() -> None:
        try:
            outcome["loaded"] = load_bundle(bundle)
        except Exception as exc:  # noqa: BLE001 - checked below
            outcome["error"] = exc

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5.0)
    blocked = t.is_alive()
    if blocked:  # never leave a thread blocked: open the FIFO's write end and close it (the reader sees EOF)
        os.close(os.open(str(target), os.O_WRONLY | os.O_NONBLOCK))
        t.join(5.0)
    assert not blocked, f"load_bundle blocked opening {name} as a FIFO"
    assert isinstance(outcome.get("error"), IntegrityError), outcome
    assert f"{name!r} is not a regular file" in str(outcome["error"])
