"""The bundle: the only contract between the workstation and the device.

A folder with `model.onnx`, `manifest.json`, optionally `reference.npz` and compressed variants, and
`checksums.sha256` (sha256sum format) covering every other file, the manifest included. Loading checks,
in this order and before anything touches the model: the checksums (a changed byte, a missing or an
extra file is refused, naming the file), the signature when one is present or required, then the
manifest schema (unknown, missing or mistyped fields named by their dotted key).

Every byte used is a byte that was hashed (no time-of-check/time-of-use window for a writer racing the
load): the checksum file is read once, and the signature is checked against those same bytes; the manifest
is parsed from the bytes that were hashed; a model or the reference file is read later through
`Bundle.read_file` / `Bundle.read_model`, which read it once, check those bytes against the digest verified
at load and hand them over (a backend gets bytes, never a path to re-open).

Signing (optional, Ed25519, `pip install 'edgeclf[sign]'`): `checksums.sha256.sig` signs the bytes of
`checksums.sha256`, which names the digest of every other file, so one signature covers the whole bundle.
The signature file is the only file the checksum file does not list (it is written after it); it is
checked on its own: a canonical one-line JSON document (any edited byte breaks the form or the
signature) holding the signer's public key, its key id, the signed file's sha256 and the signature.
Without a trusted key a present signature is checked against the key it names (integrity: a damaged or
stale signature is refused); with a trusted key (`trusted_key=`, or the environment variable
EDGECLF_TRUSTED_KEY naming a public key PEM file) the bundle must be signed by exactly that key
(authenticity), and an unsigned bundle is refused.

Python 3.8 compatible; `cryptography` is imported only inside the functions that sign or verify.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from edgeclf.errors import BundleError, ConfigError, IntegrityError, MissingExtraError
from edgeclf.runtime.postprocess import TASKS, DecisionRule, rule_kind_for_task
from edgeclf.runtime.preprocess import PreprocessSpec

__all__ = [
    "SCHEMA_VERSION",
    "CHECKSUM_FILE",
    "SIGNATURE_FILE",
    "MANIFEST_FILE",
    "TRUSTED_KEY_ENV",
    "Bundle",
    "Manifest",
    "Variant",
    "PRECISIONS",
    "load_bundle",
    "verify_checksums",
    "write_checksums",
    "sha256_file",
    "sign_bundle",
    "verify_signature",
    "generate_keypair",
    "public_key_id",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: `variants` and `deploy`
READABLE_SCHEMAS = (1, 2)
FORMAT = "edgeclf-bundle"
MANIFEST_FILE = "manifest.json"
CHECKSUM_FILE = "checksums.sha256"
SIGNATURE_FILE = CHECKSUM_FILE + ".sig"
TRUSTED_KEY_ENV = "EDGECLF_TRUSTED_KEY"
SIGNATURE_FORMAT = "edgeclf-bundle-signature"
SIGNATURE_VERSION = 1
# Domain separation: a signature over a bundle can never be replayed as a signature over anything else.
_SIGNED_PREFIX = b"edgeclf-bundle-signature-v1\0"
_MAX_CHECKSUM_BYTES = 1 << 20  # a bundle lists a handful of files; more is not a checksum file
_MAX_SIGNATURE_BYTES = 4096
_MAX_MANIFEST_BYTES = 16 << 20  # export writes a few KiB; a bigger one is not read into memory
PathLike = Union[str, "os.PathLike[str]"]
KeyLike = Union[str, bytes, "os.PathLike[str]"]

# Field tables: name -> (required, allowed JSON types). Closed tables refuse unknown fields.
_Spec = Dict[str, Tuple[bool, Tuple[type, ...]]]
_FIELDS: _Spec = {
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
_MODEL_SPEC: _Spec = {
    "file": (True, (str,)),
    "architecture": (False, (str,)),
    "precision": (True, (str,)),
    "opset": (True, (int,)),
    "ir_version": (True, (int,)),
    "input_name": (True, (str,)),
    "output_name": (True, (str,)),
    "input_shape": (True, (list,)),
    "output_shape": (True, (list,)),
}
_REFERENCE_SPEC: _Spec = {"file": (True, (str,)), "count": (True, (int,)), "split": (False, (str,))}
_POSTPROCESS_SPEC: _Spec = {"temperature": (True, (int, float)), "decision": (True, (dict,)), "min_confidence": (False, (int, float))}
# Open tables (compression results carry many informational fields): only these are checked.
_VARIANT_SPEC: _Spec = {"file": (True, (str,)), "precision": (True, (str,)), "flavour": (False, (str, type(None)))}
_DEPLOY_SPEC: _Spec = {"precision": (False, (str,)), "reason": (False, (str,))}
PRECISIONS = ("fp32", "fp16", "int8")
# Which INT8 form each backend needs: TensorRT parses only symmetric signed INT8 (zero point 0);
# x86 CPUs without VNNI are fast only with unsigned activations and reduced range.
INT8_FLAVOUR_FOR_BACKEND = {"ort-cpu": "cpu", "ort-cuda": "cpu", "ort-tensorrt": "tensorrt", "trt": "tensorrt"}
_FLOAT32_MAX = 3.4028234663852886e38
_CHECKSUM_LINE = re.compile(r"([0-9a-f]{64})  ([^\x00-\x1f\x7f]+)")


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value for an error message, cut short: a fuzzed or damaged manifest can hold anything."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(types: Tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", str: "string", list: "list", dict: "object", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_fields(d: Any, spec: _Spec, where: str, *, closed: bool = True) -> Dict[str, Any]:
    """Check one JSON object against a field table; BundleError names the dotted key."""
    if not isinstance(d, dict):
        raise BundleError(f"{where} is {type(d).__name__}; expected an object; re-export the bundle")
    if closed:
        unknown = sorted(str(k) for k in d if k not in spec)
        if unknown:
            raise BundleError(f"{where} has unknown field(s) {unknown}; allowed: {sorted(spec)}; re-export the bundle")
    for key, (required, types) in spec.items():
        if key not in d:
            if required:
                raise BundleError(f"{where} is missing the required field {key!r}; re-export the bundle")
            continue
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, types):  # JSON true/false is not a number here
            raise BundleError(f"{where}.{key} is {_short(v)} ({type(v).__name__}); expected {_type_name(types)}")
    return d


def _plain_name(name: str, where: str) -> str:
    """A file named by the manifest: a plain name inside the bundle folder, never a path out of it."""
    if (not name or "/" in name or "\\" in name or name.startswith(".") or name in (CHECKSUM_FILE, SIGNATURE_FILE)
            or any(ord(c) < 32 for c in name)):
        raise BundleError(f"{where} is {_short(name)}; a bundle file is a plain file name inside the bundle folder")
    return name


def _nonblocking(path: str, flags: int) -> int:
    # A FIFO swapped in after the folder was listed must not block the reader: opened non-blocking, then refused.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _open_regular(path: PathLike, name: str) -> Tuple[IO[bytes], int]:
    """(open file, size) of one regular file, for the caller to close: every bundle file is opened this way
    (OSError for the caller to word)."""
    f = open(path, "rb", opener=_nonblocking)  # noqa: SIM115 - returned open, the caller closes it
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"bundle file {name!r} is not a regular file; a bundle holds regular files only, re-export it")
    except BaseException:
        f.close()
        raise
    return f, st.st_size


def _hash_regular(path: PathLike, name: str) -> Tuple[str, int]:
    """(sha256, number of bytes hashed) of one regular file, streamed."""
    h = hashlib.sha256()
    size = 0
    f, expected = _open_regular(path, name)
    with f:
        step = min(max(expected + 1, 1 << 16), 1 << 20)  # small files: no 1 MiB buffer per read
        for chunk in iter(lambda: f.read(step), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sha256_file(path: PathLike) -> str:
    """sha256 of a regular file (a FIFO or device is refused with IntegrityError, never waited on)."""
    return _hash_regular(path, Path(path).name)[0]


def _read_regular(path: Path, name: str, limit: int) -> bytes:
    """All bytes of one regular file of at most `limit` bytes, read through one open file (OSError for the caller
    to word). Never more than limit + 1 bytes are read: a huge (or sparse) file is refused, not loaded."""
    f, size = _open_regular(path, name)
    with f:
        data = f.read(min(size, limit) + 1)  # sized by fstat: a limit-sized buffer for a small file is slow
        if size < len(data) <= limit:  # it grew since fstat: read on, up to the limit
            data += f.read(limit + 1 - len(data))
    if len(data) > limit:
        raise IntegrityError(f"bundle file {name!r} is over {limit} bytes, far more than edgeclf writes; the bundle was "
                             "edited or damaged, re-export it")
    return data


# ONNX protobuf field numbers (onnx.proto3), for finding tensors without the onnx package (the device may lack it).
# message -> {field: message it holds}; TensorProto's data_location (14) = 1 means EXTERNAL.
_ONNX_MESSAGES: Dict[str, Dict[int, str]] = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1


def _varint(buf: memoryview, i: int) -> Tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _onnx_fields(buf: memoryview) -> Any:
    """(field number, wire type, varint value or length-delimited payload) of one protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field_no, wire, value
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            yield field_no, wire, buf[i:i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")


def _uses_external_data(data: bytes) -> bool:
    """Whether serialized ONNX keeps any tensor (initializer, Constant or attribute tensor, in any subgraph or
    function) in external data files: a walk of the protobuf message tree, weights skipped by length. A model
    that does not parse is left to the backend to refuse."""
    stack = [("model", memoryview(data), 0)]
    try:
        while stack:
            kind, buf, depth = stack.pop()
            for field_no, wire, value in _onnx_fields(buf):
                if kind == "tensor":
                    if field_no == _TENSOR_EXTERNAL_DATA and wire == 2:
                        return True
                    if field_no == _TENSOR_DATA_LOCATION and wire == 0 and value == _EXTERNAL:
                        return True
                    continue
                inner = _ONNX_MESSAGES[kind].get(field_no)
                if inner is not None and wire == 2 and depth < 64:
                    stack.append((inner, value, depth + 1))
    except ValueError:
        return False
    return False


def _changed_after_verification(name: str) -> IntegrityError:
    return IntegrityError(f"bundle file {name!r} changed after the bundle was verified (it no longer matches "
                          f"{CHECKSUM_FILE}): something wrote into the bundle folder while it was in use; load the "
                          "bundle again once the copy is complete, or re-export it")


def _read_checked(path: Path, sha256: Optional[str], name: str, *, model: bool = False,
                  size: Optional[int] = None) -> bytes:
    """A bundle file's bytes, read once and, when `sha256` is given (the digest verified at load), checked against
    it. The caller uses exactly these bytes and never re-opens the path: whatever a writer does to the file
    afterwards, what runs is what was verified. size: the byte count verified at load, compared before reading (a
    file swapped for a huge one is refused, never read into memory). model: refuse ONNX that keeps weights in
    external data files (read by path, so unverified at use; edgeclf exports self-contained models)."""
    actual = 0
    try:
        f, actual = _open_regular(path, name)
        with f:
            if size is not None and actual != size:
                raise _changed_after_verification(name)
            data = f.read(-1 if size is None else size + 1)
    except OSError as exc:
        raise BundleError(f"bundle file {name!r} cannot be read ({exc.strerror or type(exc).__name__}); check its "
                          "permissions and the disk") from None
    except MemoryError:  # no verified size to compare first (verify=False, or a caller without it): one line
        raise BundleError(f"bundle file {name!r} ({actual} bytes) is too large to read into memory; re-export the "
                          "bundle") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise _changed_after_verification(name)
    if model and _uses_external_data(data):
        raise BundleError(f"bundle model {name!r} keeps its weights in external data files, which a bundle does not "
                          "allow (every byte a backend uses must be verified); re-export it as one self-contained "
                          "ONNX file (onnx.save_model(..., save_as_external_data=False))")
    return data


def _bundle_files(root: Path) -> List[str]:
    """Every file of the bundle (relative posix names, sorted), except the checksum and signature files.

    Symbolic links and special files (FIFOs, devices) are refused: they could point outside the bundle
    or block the reader, and a copied bundle would not carry them.
    """
    files = []
    # Folders to list (relative posix names, "" the bundle): a stack, not recursion, so a tree of any depth is
    # listed (its stray files then refused by name) rather than exhausting Python's stack as os.walk does.
    stack = [""]
    while stack:
        folder = stack.pop()
        try:  # an unreadable folder is an error (OSError), not a folder without files
            with os.scandir(root / folder if folder else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            raise IntegrityError(f"bundle {root} holds folders nested too deeply to list (under {_short(folder.split('/')[0])}); "
                                 "remove them or re-export the bundle") from None
        subfolders = []
        for entry in entries:
            rel = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_symlink():
                raise IntegrityError(f"bundle {root} holds {_short(rel, 200)}, a symbolic link; a bundle holds regular files "
                                     "only; remove it or re-export the bundle")
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(rel)
            elif not entry.is_file(follow_symlinks=False):
                raise IntegrityError(f"bundle {root} holds {_short(rel, 200)}, which is not a regular file; remove it or "
                                     "re-export the bundle")
            elif rel not in (CHECKSUM_FILE, SIGNATURE_FILE):
                files.append(rel)
        stack.extend(reversed(subfolders))  # visited in name order
    return sorted(files)


def write_checksums(root: PathLike) -> str:
    """Write `checksums.sha256` (sha256sum format) over every file in the folder; returns its digest.

    Every file but the checksum file itself and its signature; a signature made before is now stale
    (it signs other bytes) and is refused on load until the bundle is signed again.
    """
    r = Path(root)
    lines = [f"{sha256_file(r / f)}  {f}\n" for f in _bundle_files(r)]
    (r / CHECKSUM_FILE).write_text("".join(lines), encoding="utf-8")
    return sha256_file(r / CHECKSUM_FILE)


def _listed_name_ok(name: str) -> bool:
    parts = name.split("/")
    return (not name.startswith("/") and "\\" not in name and all(p not in ("", ".", "..") for p in parts)
            and name not in (CHECKSUM_FILE, SIGNATURE_FILE))


def _read_checksums(r: Path) -> Tuple[Dict[str, str], bytes]:
    """Parse `checksums.sha256` strictly: one `<64 lowercase hex>  <name>` per line, each ending in a
    newline, no blank or repeated lines. Anything else is an edited file, not a different spelling."""
    sums = r / CHECKSUM_FILE
    if sums.is_symlink() or not sums.is_file():
        raise IntegrityError(f"bundle {r} has no {CHECKSUM_FILE}; re-export it with `edgeclf export`")
    try:
        raw = _read_regular(sums, CHECKSUM_FILE, _MAX_CHECKSUM_BYTES)
    except OSError as exc:
        raise BundleError(f"{CHECKSUM_FILE} of bundle {r} cannot be read ({exc.strerror or type(exc).__name__}); check its "
                          "permissions and the disk") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IntegrityError(f"{CHECKSUM_FILE} of bundle {r} is not UTF-8 text; the bundle was edited, re-export it") from None
    if not text.endswith("\n"):
        raise IntegrityError(f"{CHECKSUM_FILE} of bundle {r} does not end with a newline (cut short or edited); re-export the bundle")
    listed: Dict[str, str] = {}
    for n, line in enumerate(text[:-1].split("\n"), 1):
        m = _CHECKSUM_LINE.fullmatch(line)
        if m is None or not _listed_name_ok(m.group(2)) or m.group(2) in listed:
            raise IntegrityError(f"{CHECKSUM_FILE} line {n} is malformed; the bundle was edited, re-export it")
        listed[m.group(2)] = m.group(1)
    return listed, raw


class _Verified(NamedTuple):
    listed: Dict[str, str]  # file name -> sha256, as the checksum file lists it
    sizes: Dict[str, int]  # file name -> number of bytes hashed
    raw: bytes  # the checksum file's bytes: the ones parsed and (when signed) signed
    digest: str  # sha256 of `raw`: identifies the whole bundle
    kept: Dict[str, bytes]  # the bytes of the files asked for, exactly as hashed


def verify_checksums(root: PathLike) -> str:
    """Check every file against `checksums.sha256`; returns the checksum file's own digest.

    Raises IntegrityError naming the first file that is changed, missing or not listed.
    """
    return _verify(Path(root)).digest


def _verify(r: Path, keep: Sequence[str] = ()) -> _Verified:
    """verify_checksums, also returning the checksum file's bytes and the bytes of the files in `keep` (small
    ones: the manifest), hashed from the same read they are then used from."""
    listed, raw = _read_checksums(r)
    kept: Dict[str, bytes] = {}
    sizes: Dict[str, int] = {}
    present = set(_bundle_files(r))
    for name in sorted(present - set(listed)):
        raise IntegrityError(f"bundle file {_short(name, 200)} is not covered by {CHECKSUM_FILE}; remove it or re-export "
                             "the bundle")
    for name, digest in sorted(listed.items()):
        if name not in present:
            raise IntegrityError(f"bundle file {name!r} listed in {CHECKSUM_FILE} is missing; re-export the bundle")
        try:
            if name in keep:
                kept[name] = _read_regular(r / name, name, _MAX_MANIFEST_BYTES)
                actual, sizes[name] = hashlib.sha256(kept[name]).hexdigest(), len(kept[name])
            else:
                actual, sizes[name] = _hash_regular(r / name, name)
        except OSError as exc:
            raise BundleError(f"bundle file {name!r} cannot be read ({exc.strerror or type(exc).__name__}); check its "
                              "permissions and the disk") from None
        if actual != digest:
            raise IntegrityError(
                f"bundle file {name!r} does not match its entry in {CHECKSUM_FILE}: one of them was changed after export; re-export the bundle"
            )
    return _Verified(listed, sizes, raw, hashlib.sha256(raw).hexdigest(), kept)


# ------------------------------------------------------------------------------------------ signing


def _crypto() -> Any:
    """cryptography's Ed25519 and serialization modules, or a one-line error naming the extra."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise MissingExtraError(
            f"signing and signature checks need cryptography ({exc}); install it with: pip install 'edgeclf[sign]'"
        ) from None

    class _Mods:
        pass

    mods = _Mods()
    mods.serialization = serialization  # type: ignore[attr-defined]
    mods.ed25519 = ed25519  # type: ignore[attr-defined]
    return mods


def public_key_id(raw_public_key: bytes) -> str:
    """A key's short id: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def _read_key_text(key: KeyLike, what: str) -> Tuple[bytes, str]:
    """(PEM bytes, a name for messages) from PEM bytes or a path to a PEM file."""
    if isinstance(key, bytes):
        return key, f"the given {what}"
    path = os.fspath(key)
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}; give a PEM file (see `edgeclf bundle keygen`)") from None
    return data, f"{what} {path}"


def _raw_public(pub: Any) -> bytes:
    crypto = _crypto()
    enc = crypto.serialization.Encoding.Raw
    fmt = crypto.serialization.PublicFormat.Raw
    out: bytes = pub.public_bytes(enc, fmt)
    return out


def _load_public_key(key: KeyLike) -> Any:
    """An Ed25519 public key from a PEM file or PEM bytes; a private key is refused (it stays off devices)."""
    crypto = _crypto()
    data, name = _read_key_text(key, "trusted public key")
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{name} is a private key; give the public key (the .pub.pem from `edgeclf bundle keygen`) and keep "
                          "the private key off the device")
    try:
        pub = crypto.serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{name} is not a PEM public key ({type(exc).__name__}); give the .pub.pem written by "
                          "`edgeclf bundle keygen`") from None
    except Exception as exc:  # noqa: BLE001 - UnsupportedAlgorithm and kin
        raise ConfigError(f"{name} could not be read as a public key ({type(exc).__name__}); give an Ed25519 .pub.pem") from None
    if not isinstance(pub, crypto.ed25519.Ed25519PublicKey):
        raise ConfigError(f"{name} is a {type(pub).__name__}, not an Ed25519 key; bundles are signed with Ed25519 "
                          "(`edgeclf bundle keygen`)")
    return pub


def _load_private_key(key: KeyLike, passphrase: Optional[bytes]) -> Any:
    crypto = _crypto()
    data, name = _read_key_text(key, "private key")
    try:
        priv = crypto.serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        hint = ("it is encrypted: give its passphrase (`--passphrase-env VAR`, VAR an environment variable holding it; "
                "passphrase= in Python)" if passphrase is None else "it is not encrypted: give no passphrase")
        raise ConfigError(f"{name} could not be opened: {hint}") from None
    except ValueError:
        raise ConfigError(f"{name} is not a PEM private key, or the passphrase is wrong; give the key written by "
                          "`edgeclf bundle keygen`") from None
    except Exception as exc:  # noqa: BLE001 - UnsupportedAlgorithm and kin
        raise ConfigError(f"{name} could not be read as a private key ({type(exc).__name__})") from None
    if not isinstance(priv, crypto.ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{name} is a {type(priv).__name__}, not an Ed25519 key; make one with `edgeclf bundle keygen`")
    return priv


def _signature_doc(doc: Mapping[str, Any]) -> bytes:
    """The one canonical spelling of a signature document (sorted keys, no spaces, one line)."""
    return (json.dumps(dict(doc), sort_keys=True, separators=(",", ":")) + "\n").encode("ascii")


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(str(tmp), str(path))
    except OSError as exc:
        # A full disk or a read-only folder: one line, and no .tmp left in the bundle (an uncovered file
        # that every later load would refuse).
        with contextlib.suppress(OSError):  # never created, or the folder refuses that too: the load then names it
            os.unlink(str(tmp))
        raise BundleError(f"cannot write {path} ({exc.strerror or type(exc).__name__}); free space or make the bundle "
                          "folder writable, then sign again") from None


def generate_keypair(private_path: PathLike, public_path: PathLike, *, passphrase: Optional[bytes] = None) -> str:
    """Write a new Ed25519 key pair as PEM (the private key readable by its owner only, PKCS#8, encrypted
    when a passphrase is given); returns the key id. Existing files are never overwritten."""
    crypto = _crypto()
    priv_p, pub_p = Path(private_path), Path(public_path)
    if priv_p.resolve() == pub_p.resolve():
        raise ConfigError("the private and public key paths are the same; give two files")
    for p in (priv_p, pub_p):
        if p.exists():
            raise ConfigError(f"{p} exists; keys are never overwritten: choose another path or remove it yourself")
    ser = crypto.serialization
    priv = crypto.ed25519.Ed25519PrivateKey.generate()
    enc = ser.BestAvailableEncryption(passphrase) if passphrase else ser.NoEncryption()
    priv_pem = priv.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, enc)
    pub_pem = priv.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    # Both files are created (O_EXCL) before either is written, and on any failure the ones this call created are
    # removed: never a private key without its public key, which a retry would refuse to overwrite.
    created: List[Tuple[Path, int]] = []
    done = False
    try:
        for p, mode in ((priv_p, 0o600), (pub_p, 0o644)):
            try:
                if p.parent and not p.parent.exists():
                    p.parent.mkdir(parents=True)
                created.append((p, os.open(str(p), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)))
            except OSError as exc:
                raise ConfigError(f"cannot write the key {p}: {exc.strerror}; choose another path") from None
        for (p, fd), data in zip(created, (priv_pem, pub_pem)):
            try:
                os.write(fd, data)
                os.fsync(fd)
            except OSError as exc:
                raise ConfigError(f"cannot write the key {p}: {exc.strerror}; free space or choose another path") from None
        done = True
    finally:
        for p, fd in created:
            os.close(fd)
            if not done:
                with contextlib.suppress(OSError):  # ours (O_EXCL): a pre-existing file is never among them
                    os.unlink(str(p))
    return public_key_id(_raw_public(priv.public_key()))


def sign_bundle(path: PathLike, private_key: KeyLike, *, passphrase: Optional[bytes] = None) -> Dict[str, Any]:
    """Sign a bundle's `checksums.sha256` with an Ed25519 private key, writing `checksums.sha256.sig`.

    The bundle is verified first (checksums and manifest schema): a damaged bundle is never signed.
    Replaces an earlier signature. Returns {"path", "key_id", "signed_sha256", "signature_file"}.
    """
    root = Path(path)
    _check_folder(root)
    # What is signed is the very checksum file read and checked here, and the manifest checked is the one hashed.
    verified = _verify(root, keep=(MANIFEST_FILE,))
    _parse_manifest(root, verified.kept[MANIFEST_FILE])
    priv = _load_private_key(private_key, passphrase)
    raw_sums, digest = verified.raw, verified.digest
    raw_pub = _raw_public(priv.public_key())
    doc = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "algorithm": "ed25519",
        "signed_file": CHECKSUM_FILE,
        "signed_sha256": digest,
        "public_key": base64.b64encode(raw_pub).decode("ascii"),
        "key_id": public_key_id(raw_pub),
        "signature": base64.b64encode(priv.sign(_SIGNED_PREFIX + raw_sums)).decode("ascii"),
    }
    _write_atomic(root / SIGNATURE_FILE, _signature_doc(doc))
    log.info("signed bundle %s with key %s", root, doc["key_id"])
    return {"path": str(root), "key_id": doc["key_id"], "signed_sha256": digest, "signature_file": SIGNATURE_FILE}


_SIG_KEYS = ("algorithm", "format", "key_id", "public_key", "signature", "signed_file", "signed_sha256", "version")


def _b64(text: Any, size: int, what: str) -> bytes:
    try:
        out = base64.b64decode(str(text).encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        out = b""
    if len(out) != size or base64.b64encode(out).decode("ascii") != text:
        raise IntegrityError(f"{SIGNATURE_FILE}: {what} is not {size} bytes of canonical base64; the signature file was "
                             "edited, sign the bundle again")
    return out


def verify_signature(path: PathLike, trusted_key: Optional[KeyLike] = None, *, checksums: Optional[bytes] = None) -> Dict[str, Any]:
    """Check `checksums.sha256.sig` against the bundle's `checksums.sha256` (call verify_checksums first).

    checksums: the bytes of `checksums.sha256` that were verified (load_bundle passes them, so the signature
    covers exactly what was checked); default: read from the folder.

    Without `trusted_key`, the signature is checked against the public key it names (a damaged or stale
    signature is refused; anyone could have made it); where cryptography is not installed that check is
    skipped with a warning and "checked": False. With `trusted_key` (a public key PEM file or bytes) the
    signer must be exactly that key. Returns {"key_id", "checked", "trusted"}; raises IntegrityError.
    """
    root = Path(path)
    sig = root / SIGNATURE_FILE
    if sig.is_symlink() or not sig.is_file():
        raise IntegrityError(f"bundle {root} is not signed (no {SIGNATURE_FILE}); sign it with `edgeclf bundle sign`")
    try:
        f, _ = _open_regular(sig, SIGNATURE_FILE)
        with f:
            data = f.read(_MAX_SIGNATURE_BYTES + 1)  # more is refused below as not a signature document
        raw_sums = _read_regular(root / CHECKSUM_FILE, CHECKSUM_FILE, _MAX_CHECKSUM_BYTES) if checksums is None else checksums
    except OSError as exc:
        raise BundleError(f"{SIGNATURE_FILE} of bundle {root} cannot be read ({exc.strerror or type(exc).__name__})") from None
    bad = f"{SIGNATURE_FILE} of bundle {root} is not a valid signature document; it was edited or damaged, sign the bundle again"
    if len(data) > _MAX_SIGNATURE_BYTES:
        raise IntegrityError(bad)
    try:
        doc = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError(bad) from None
    if not isinstance(doc, dict) or tuple(sorted(doc)) != _SIG_KEYS or _signature_doc(doc) != data:
        raise IntegrityError(bad)
    if (doc["format"] != SIGNATURE_FORMAT or doc["version"] != SIGNATURE_VERSION or doc["algorithm"] != "ed25519"
            or doc["signed_file"] != CHECKSUM_FILE):
        raise IntegrityError(f"{SIGNATURE_FILE} of bundle {root} is not an edgeclf Ed25519 signature (version {SIGNATURE_VERSION}) "
                             f"of {CHECKSUM_FILE}; sign the bundle again")
    if doc["signed_sha256"] != hashlib.sha256(raw_sums).hexdigest():
        raise IntegrityError(f"{SIGNATURE_FILE} of bundle {root} signs another {CHECKSUM_FILE}: the bundle changed after it was "
                             "signed; re-export or sign it again")
    raw_pub = _b64(doc["public_key"], 32, "public_key")
    signature = _b64(doc["signature"], 64, "signature")
    key_id = public_key_id(raw_pub)
    if doc["key_id"] != key_id:
        raise IntegrityError(f"{SIGNATURE_FILE} of bundle {root}: key_id does not match its public key; the signature file was "
                             "edited, sign the bundle again")
    if trusted_key is None:
        try:
            crypto = _crypto()
        except MissingExtraError:
            log.warning("bundle %s is signed by key %s but cryptography is not installed: signature not checked "
                        "(pip install 'edgeclf[sign]')", root, key_id)
            return {"key_id": key_id, "checked": False, "trusted": False}
        pub = crypto.ed25519.Ed25519PublicKey.from_public_bytes(raw_pub)
    else:
        pub = _load_public_key(trusted_key)
        want = public_key_id(_raw_public(pub))
        if want != key_id:
            raise IntegrityError(f"bundle {root} is signed by key {key_id}, not by the trusted key {want}; use a bundle signed "
                                 "with the trusted key or change the trusted key")
    try:
        pub.verify(signature, _SIGNED_PREFIX + raw_sums)
    except Exception:  # noqa: BLE001 - cryptography's InvalidSignature
        raise IntegrityError(f"{SIGNATURE_FILE} of bundle {root}: the signature does not verify against {CHECKSUM_FILE}; "
                             "the bundle or its signature was changed, re-export or sign it again") from None
    return {"key_id": key_id, "checked": True, "trusted": trusted_key is not None}


@dataclass(frozen=True)
class Variant:
    """A model file in the bundle: the fp32 parent or a compressed variant of it."""

    id: str  # "fp32", "fp16", "int8-cpu", "int8-tensorrt"
    file: str
    precision: str
    flavour: Optional[str] = None  # INT8 only: "cpu" | "tensorrt"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> Variant:
        _check_fields(d, _VARIANT_SPEC, where, closed=False)
        name = str(d["file"])
        # Like model.file, never the checksum or signature file: the signature is the one file no checksum covers.
        if ("/" in name or "\\" in name or name.startswith(".") or name in ("model.onnx", CHECKSUM_FILE, SIGNATURE_FILE)
                or not name or any(ord(c) < 32 for c in name)):
            raise BundleError(f"{where}.file is {_short(name)}; a variant is a plain file name inside the bundle, not the fp32 model nor the checksum or signature file")
        precision, flavour = str(d["precision"]), d.get("flavour")
        if precision not in PRECISIONS:
            raise BundleError(f"{where}.precision is {_short(precision)}; allowed: {', '.join(PRECISIONS)}")
        if precision == "int8" and flavour not in ("cpu", "tensorrt"):
            raise BundleError(f"{where}.flavour is {_short(flavour)}; an int8 variant is 'cpu' or 'tensorrt'")
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

    @property
    def trained_on_sector(self) -> bool:
        """Whether the model was trained on ultrasound sector crops: preprocess.sector, or, for bundles exported
        before that field existed, a training data spec with roi=sector (provenance.data.name)."""
        if self.preprocess.sector:
            return True
        data = self.raw.get("provenance", {}).get("data")
        name = data.get("name") if isinstance(data, dict) else None
        return isinstance(name, str) and "roi=sector" in name.partition("?")[2].split("&")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """Validate a parsed manifest.json; BundleError names the first bad field by its dotted key."""
        if not isinstance(d, dict):
            raise BundleError("manifest.json must hold a JSON object")
        # The version first: a newer bundle is told to upgrade, not that its new fields are unknown.
        version = d.get("schema_version")
        if "schema_version" not in d:
            raise BundleError("manifest is missing the required field 'schema_version'; re-export the bundle")
        if isinstance(version, bool) or not isinstance(version, int):
            raise BundleError(f"manifest.schema_version is {_short(version)}; expected an integer")
        if version not in READABLE_SCHEMAS:
            raise BundleError(
                f"manifest schema_version {version} is not supported by this edgeclf (reads {READABLE_SCHEMAS}); "
                "upgrade edgeclf or re-export the bundle"
            )
        if d.get("format") != FORMAT:
            raise BundleError(f"manifest format is {_short(d.get('format'))}; expected {FORMAT!r}")
        unknown = sorted(str(k) for k in d if k not in _FIELDS)
        if unknown:
            raise BundleError(f"manifest has unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
        for key, (required, types) in _FIELDS.items():
            if key not in d:
                if required:
                    raise BundleError(f"manifest is missing the required field {key!r}")
                continue
            if not isinstance(d[key], types) or (types == (int,) and isinstance(d[key], bool)):
                raise BundleError(f"manifest field {key!r} has type {type(d[key]).__name__}; expected {'/'.join(t.__name__ for t in types)}")
        task = d["task"]
        if task not in TASKS:
            raise BundleError(f"manifest.task is {_short(task)}; allowed: {', '.join(TASKS)}")
        raw_labels = d["labels"]
        if not all(isinstance(x, str) and x.strip() for x in raw_labels):
            raise BundleError(f"manifest.labels is {_short(raw_labels)}; expected a list of non-empty strings")
        labels = tuple(raw_labels)
        if len(set(labels)) != len(labels):
            raise BundleError(f"manifest.labels repeats a label: {_short(list(labels))}; each class is named once")
        if len(labels) < 2 and task != "multilabel" or len(labels) < 1:
            raise BundleError(f"manifest.labels has {len(labels)} entries; a {task} model needs at least 2")
        if task == "binary" and len(labels) != 2:
            raise BundleError(f"manifest.labels has {len(labels)} entries; a binary model has exactly 2")
        model = _check_fields(d["model"], _MODEL_SPEC, "manifest.model")
        model_file = _plain_name(model["file"], "manifest.model.file")
        num_outputs = 1 if task == "binary" else len(labels)
        out_shape = model["output_shape"]
        if len(out_shape) != 2 or out_shape[1] != num_outputs or isinstance(out_shape[1], bool):
            raise BundleError(f"manifest.model.output_shape is {_short(out_shape)}; a {task} model with {len(labels)} labels has [batch, {num_outputs}]")
        post = _check_fields(d["postprocess"], _POSTPROCESS_SPEC, "manifest.postprocess")
        temperature = post["temperature"]
        if not (temperature > 0 and temperature < float("inf")):
            raise BundleError(f"manifest.postprocess.temperature is {_short(temperature)}; expected a positive number")
        min_conf = post.get("min_confidence", 0.0)
        if not 0.0 <= min_conf < 1.0:
            raise BundleError(f"manifest.postprocess.min_confidence is {_short(min_conf)}; expected a number in [0, 1)")
        try:
            pre = PreprocessSpec.from_dict(d["preprocess"])
            rule = DecisionRule.from_dict(post["decision"])
        except Exception as exc:  # ConfigError from the nested validators, re-labelled as a bundle problem
            raise BundleError(f"manifest: {exc}") from None
        # The device normalises in float32 (x * scale / std - mean / std): values beyond it (or NaN) would turn
        # every pixel into inf or NaN.
        folded = [pre.scale / sd for sd in pre.std] + [m / sd for m, sd in zip(pre.mean, pre.std)]
        if not pre.scale > 0 or not all(abs(v) <= _FLOAT32_MAX for v in list(pre.mean) + list(pre.std) + [pre.scale] + folded):
            raise BundleError(f"manifest.preprocess has scale {_short(pre.scale)}, mean {_short(list(pre.mean))}, std "
                              f"{_short(list(pre.std))}; expected scale > 0 and values whose ratios stay finite in float32")
        if rule.kind != rule_kind_for_task(task):
            raise BundleError(f"manifest.postprocess.decision.kind is {rule.kind!r}; a {task} model uses {rule_kind_for_task(task)!r}")
        if rule.kind != "threshold" and len(rule.thresholds) != len(labels):
            raise BundleError(f"manifest.postprocess.decision has {len(rule.thresholds)} thresholds for {len(labels)} labels; "
                              "give one per label")
        in_shape = model["input_shape"]
        if len(in_shape) != 4 or list(in_shape[1:]) != [pre.channels, pre.size[0], pre.size[1]] or any(isinstance(v, bool) for v in in_shape):
            raise BundleError(f"manifest.model.input_shape {_short(in_shape)} disagrees with preprocess ({pre.channels}, {pre.size[0]}, {pre.size[1]})")
        raw_variants = d.get("variants", [])
        variants = tuple(Variant.from_dict(v, f"manifest.variants[{i}]") for i, v in enumerate(raw_variants))
        ids = [v.id for v in variants]
        if len(set(ids)) != len(ids) or "fp32" in ids:
            raise BundleError(f"manifest.variants repeat a precision or list fp32 again: {ids}")
        if model_file in {v.file for v in variants} or len({v.file for v in variants}) != len(variants):
            raise BundleError("manifest.variants name the same file twice, or the fp32 model's file; each model has its own file")
        deploy_d = _check_fields(d.get("deploy") or {}, _DEPLOY_SPEC, "manifest.deploy", closed=False)
        deploy = str(deploy_d.get("precision", "fp32"))
        if deploy != "fp32" and deploy not in {v.precision for v in variants}:
            raise BundleError(f"manifest.deploy.precision is {_short(deploy)} but the bundle holds no such variant")
        ref = d.get("reference")
        if ref is not None:
            _check_fields(ref, _REFERENCE_SPEC, "manifest.reference")
            ref_file = _plain_name(ref["file"], "manifest.reference.file")
            # Its own file: verify would otherwise read the manifest or a model as the reference npz.
            if ref_file in {MANIFEST_FILE, model_file, *(v.file for v in variants)}:
                raise BundleError(f"manifest.reference.file is {_short(ref_file)}, the manifest's or a model's file; the reference "
                                  "is its own .npz file (reference.npz); re-export the bundle")
            if ref["count"] < 0:
                raise BundleError(f"manifest.reference.count is {ref['count']}; expected 0 or more")
        return cls(
            raw=d,
            task=task,
            labels=labels,
            preprocess=pre,
            temperature=float(temperature),
            decision=rule,
            model_file=model_file,
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
    checksum: str  # sha256 of checksums.sha256: identifies the whole bundle ("" when loaded without verification)
    signature: Optional[Dict[str, Any]] = None  # {"key_id", "checked", "trusted"} when signed, else None
    # File name -> sha256 from the checksum file that was verified (empty without verification). Digests only:
    # a model's bytes are read when a backend is made (read_model) and checked against these, never kept here,
    # so a bundle with several variants holds no model in memory.
    digests: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # File name -> size in bytes when verified: read_file compares it before reading (a huge swap is never read).
    sizes: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def read_file(self, file: PathLike) -> bytes:
        """The bytes of one bundle file (a name such as "reference.npz", or a path inside the bundle as
        `model_path`, `select` and `reference_path` give), read once. For a verified bundle the bytes must hash to
        the digest checked at load (else IntegrityError): use them, never re-open the path, e.g.
        `np.load(io.BytesIO(b.read_file(ref)))`."""
        name = self._name(file)
        return _read_checked(self.path / name, self._digest(name), name, size=self.sizes.get(name))

    def read_model(self, file: PathLike) -> bytes:
        """`read_file` for an ONNX model: the bytes to hand a backend (`InferenceSession(bytes)`, TensorRT's
        `parse(bytes)`). Refuses models with external data files (they would be read by path, unverified)."""
        name = self._name(file)
        return _read_checked(self.path / name, self._digest(name), name, model=True, size=self.sizes.get(name))

    def _name(self, file: PathLike) -> str:
        p = Path(os.fspath(file))
        with contextlib.suppress(ValueError):  # a bare name stays as it is
            p = p.relative_to(self.path)
        name = p.as_posix()
        if p.is_absolute() or not _listed_name_ok(name):
            raise BundleError(f"{_short(os.fspath(file))} is not a file of bundle {self.path}; give a file name inside the bundle")
        return name

    def _digest(self, name: str) -> Optional[str]:
        if not self.checksum:  # loaded with verify=False: nothing to check against (the bytes are still read once)
            return None
        digest = self.digests.get(name)
        if digest is None:
            raise IntegrityError(f"bundle file {name!r} is not covered by {CHECKSUM_FILE}; give a file of the bundle or "
                                 "re-export it")
        return digest

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


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise BundleError(f"bundle {root} does not exist; give the folder written by `edgeclf export`")
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a folder; a bundle is the folder written by `edgeclf export`")
    if not (root / MANIFEST_FILE).is_file():
        raise BundleError(f"{root} has no {MANIFEST_FILE}, so it is not an edgeclf bundle; give the folder written by `edgeclf export`")


def _parse_manifest(root: Path, data: Optional[bytes] = None) -> Manifest:
    """The manifest from `data` (the bytes that were hashed), else read from the folder (no verification)."""
    try:
        if data is None:
            data = _read_regular(root / MANIFEST_FILE, MANIFEST_FILE, _MAX_MANIFEST_BYTES)
        raw = json.loads(data.decode("utf-8"))
    except OSError as exc:
        raise BundleError(f"{root / MANIFEST_FILE} cannot be read ({exc.strerror or type(exc).__name__}); check its permissions") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{root / MANIFEST_FILE} is not valid JSON ({exc}); re-export the bundle") from None
    except RecursionError:  # nesting deep enough to exhaust the parser: not a manifest
        raise BundleError(f"{root / MANIFEST_FILE} is nested too deeply to be a manifest; re-export the bundle") from None
    return Manifest.from_dict(raw)


def _trusted_key_from_env() -> Optional[str]:
    value = os.environ.get(TRUSTED_KEY_ENV, "").strip()
    return value or None


def load_bundle(
    path: PathLike,
    *,
    verify: bool = True,
    trusted_key: Optional[KeyLike] = None,
    require_signature: Optional[bool] = None,
) -> Bundle:
    """Load a bundle folder; with verify (the default) every checksum is checked first.

    trusted_key: an Ed25519 public key (PEM file path or PEM bytes) the bundle must be signed with;
        default: the file named by the environment variable EDGECLF_TRUSTED_KEY, if set.
    require_signature: refuse unsigned bundles; default True exactly when a trusted key is in effect
        (False with a trusted key: a signature, where present, must be by that key; unsigned is allowed).
    Order: checksums, signature, then the manifest: nothing reads the model before all of them pass.
    """
    root = Path(path)
    try:
        return _load(root, verify, trusted_key, require_signature)
    except OSError as exc:
        # A bundle copied with owner-only permissions, read by a service running as another user.
        raise BundleError(f"bundle {root} cannot be read ({type(exc).__name__}); check its permissions") from None


def _load(root: Path, verify: bool, trusted_key: Optional[KeyLike], require_signature: Optional[bool]) -> Bundle:
    _check_folder(root)
    key = trusted_key if trusted_key is not None else _trusted_key_from_env()
    required = (key is not None) if require_signature is None else bool(require_signature)
    if required and key is None:
        raise ConfigError(f"a signed bundle is required but no trusted key is set; pass the public key or set {TRUSTED_KEY_ENV}="
                          "/path/to/public.pem")
    if not verify and key is not None:
        raise ConfigError(f"a trusted key is set ({TRUSTED_KEY_ENV} or trusted_key), so the bundle must be verified; "
                          "do not skip verification")
    checksum = ""
    signature: Optional[Dict[str, Any]] = None
    digests: Dict[str, str] = {}
    sizes: Dict[str, int] = {}
    manifest_bytes: Optional[bytes] = None
    if verify:
        # One read of each: the checksum file parsed is the one signed; the manifest hashed is the one parsed.
        verified = _verify(root, keep=(MANIFEST_FILE,))
        checksum, digests, manifest_bytes = verified.digest, verified.listed, verified.kept[MANIFEST_FILE]
        sizes = verified.sizes
        sig = root / SIGNATURE_FILE
        if sig.exists() or sig.is_symlink():
            signature = verify_signature(root, key, checksums=verified.raw)
        elif required:
            raise IntegrityError(f"bundle {root} is not signed (no {SIGNATURE_FILE}) but a signature by the trusted key is "
                                 "required; sign it with `edgeclf bundle sign`")
    manifest = _parse_manifest(root, manifest_bytes)
    for f in [manifest.model_file] + [v.file for v in manifest.variants]:
        if not (root / f).is_file():
            raise BundleError(f"bundle {root} has no model file {f!r}; re-export the bundle")
    ref = manifest.raw.get("reference")
    if ref and not (root / str(ref["file"])).is_file():
        raise BundleError(f"bundle {root} has no reference file {ref['file']!r}; re-export the bundle")
    log.info("loaded bundle %s (%s, %d labels%s)", root, manifest.task, len(manifest.labels),
             f", signed by {signature['key_id']}" if signature else "")
    return Bundle(path=root, manifest=manifest, checksum=checksum, signature=signature, digests=digests, sizes=sizes)
