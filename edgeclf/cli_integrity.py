"""CLI commands for integrity and traceability: `audit verify`, `bundle sign`, `bundle keygen`,
`bundle verify-signature`. Attached to the main `edgeclf` group in edgeclf/cli.py.

Thin like every command: parse, call one library function, report. Errors users can cause are
EdgeclfError (the main entry point prints them as one line, exit code 2).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import click

from edgeclf.errors import ConfigError, DataError

__all__ = ["audit", "audit_verify", "bundle_sign", "bundle_keygen", "bundle_verify_signature", "integrity",
           "AUDIT_EXIT_CODES"]

# `audit verify` exit codes: scripts tell the three states apart without parsing output. A file that is no
# audit log is the user's mistake, not an integrity finding: a one-line error, exit 2 like every other.
AUDIT_EXIT_CODES = {"intact": 0, "unterminated": 3, "tampered": 4, "not_audit": 2}


def _emit(as_json: bool, doc: Any, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        click.echo(human)


def _passphrase(env_name: Optional[str]) -> Optional[bytes]:
    """A key passphrase from an environment variable (never from the command line: it would show in ps)."""
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"--passphrase-env names {env_name}, which is not set or empty; export it or leave the option out")
    return value.encode("utf-8")


_json = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout and nothing else there.")
_pass_env = click.option("--passphrase-env", default=None, metavar="VAR",
                         help="Environment variable holding the private key's passphrase (never give it as an argument).")


# -- audit ----------------------------------------------------------------------------------------------

@click.group("audit")
def audit() -> None:
    """Check the hash-chained audit logs that runs write."""


@audit.command("verify")
@click.argument("log")
@click.option("--results", default=None, help="The run's results file (JSON lines): check it against the log's digests.")
@click.option("--head", default=None, metavar="SHA256",
              help="The log's head hash recorded elsewhere (the run summary's audit head): all 64 hex characters.")
@_json
@click.pass_context
def audit_verify(ctx: click.Context, log: str, results: Optional[str], head: Optional[str], as_json: bool) -> None:
    """Verify an audit log: intact (exit 0), unterminated (exit 3: cut off by power loss or kill -9) or
    tampered (exit 4: a record edited, removed, inserted or moved; the first bad one is named). A file that
    is no audit log (a results file given by mistake) or a malformed --head is an error (exit 2)."""
    from edgeclf.runtime.audit import verify_audit

    rep = verify_audit(log, results=results, expected_head=head)
    if rep.state == "not_audit":
        raise DataError(f"not an audit log: {log}: {rep.reason}")
    doc = rep.to_dict()
    if rep.state == "intact":
        line = f"intact: {log}: {rep.records} records, {rep.results} results ({rep.abstained} abstained), {rep.faults} faults"
        status = (rep.end or {}).get("status")
        line += f", ended {status}" if status else ""
    elif rep.state == "unterminated":
        line = f"unterminated: {log}: {rep.reason}"
    else:
        line = f"tampered: {log}: {rep.reason}"
    check = rep.results_check
    if check and check.get("state") == "match":
        line += f"; results file matches ({check['checked']} results digested, {check['undigested']} after the last digest"
        line += ", a torn last line ignored" if check.get("torn") else ""
        if check.get("run"):  # a file several appending runs share: this run's lines only
            line += f"; run {check['run']}'s lines, {check['other_runs_lines']} of other runs not checked"
        line += ")"
    _emit(as_json, doc, line)
    ctx.exit(AUDIT_EXIT_CODES[rep.state])


# -- bundle signing ---------------------------------------------------------------------------------------

@click.command("sign")
@click.argument("path")
@click.option("--key", "key", required=True, help="Ed25519 private key (PEM), e.g. from `edgeclf bundle keygen`.")
@_pass_env
@_json
def bundle_sign(path: str, key: str, passphrase_env: Optional[str], as_json: bool) -> None:
    """Sign a bundle's checksum file (writes checksums.sha256.sig); the bundle is verified first."""
    from edgeclf.runtime.bundle import sign_bundle

    info = sign_bundle(path, key, passphrase=_passphrase(passphrase_env))
    _emit(as_json, info, f"signed {info['path']} with key {info['key_id']} ({info['signature_file']})")


@click.command("keygen")
@click.option("--private", "private_path", default="edgeclf-signing.pem", show_default=True,
              help="Private key to write (PKCS#8 PEM, owner-only); keep it on the workstation.")
@click.option("--public", "public_path", default=None, help="Public key to write [default: PRIVATE with .pub.pem].")
@_pass_env
@_json
def bundle_keygen(private_path: str, public_path: Optional[str], passphrase_env: Optional[str], as_json: bool) -> None:
    """Make an Ed25519 key pair for signing bundles; existing files are never overwritten."""
    from edgeclf.runtime.bundle import generate_keypair

    if public_path is None:
        stem = private_path[:-4] if private_path.endswith(".pem") else private_path
        public_path = stem + ".pub.pem"
    key_id = generate_keypair(private_path, public_path, passphrase=_passphrase(passphrase_env))
    doc = {"key_id": key_id, "private": private_path, "public": public_path}
    _emit(as_json, doc, f"key {key_id}: private {private_path} (keep it secret), public {public_path} "
                        f"(give it to devices: --key, or EDGECLF_TRUSTED_KEY)")


@click.command("verify-signature")
@click.argument("path")
@click.option("--key", "key", default=None,
              help="Trusted Ed25519 public key (PEM) [default: $EDGECLF_TRUSTED_KEY]; the bundle must be signed by it.")
@_json
def bundle_verify_signature(path: str, key: Optional[str], as_json: bool) -> None:
    """Check a bundle's checksums and that it is signed by the trusted key (the manifest schema too)."""
    from edgeclf.runtime.bundle import TRUSTED_KEY_ENV, load_bundle

    if key is None and not os.environ.get(TRUSTED_KEY_ENV, "").strip():
        raise ConfigError(f"no trusted key: give --key public.pem or set {TRUSTED_KEY_ENV}")
    b = load_bundle(path, trusted_key=key, require_signature=True)
    sig = b.signature or {}
    doc = {"path": str(b.path), "checksum": b.checksum, "checksums": "ok", "manifest": "ok", "signature": sig}
    _emit(as_json, doc, f"OK {b.path}: checksums match, manifest valid, signed by trusted key {sig.get('key_id')}")


@click.group("bundle")
def integrity() -> None:
    """These commands alone, for tests and embedding; edgeclf/cli.py attaches them to its own `bundle` group."""


integrity.add_command(bundle_sign)
integrity.add_command(bundle_keygen)
integrity.add_command(bundle_verify_signature)
