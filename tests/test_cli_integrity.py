"""`edgeclf bundle sign` and kin (edgeclf/cli_integrity.py): what a user sees when a key needs a passphrase."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeclf.errors import ConfigError
from tests.runtime.tiny_bundle import make_tiny_bundle


def test_an_encrypted_key_without_its_passphrase_says_how_to_give_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cryptography")
    from edgeclf.cli_integrity import integrity

    bundle = make_tiny_bundle(tmp_path / "b")
    priv = tmp_path / "enc.pem"
    monkeypatch.setenv("EDGECLF_TEST_PW", "correct horse")
    runner = CliRunner()
    res = runner.invoke(integrity, ["keygen", "--private", str(priv), "--passphrase-env", "EDGECLF_TEST_PW"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(integrity, ["sign", str(bundle), "--key", str(priv)])
    assert isinstance(res.exception, ConfigError)
    msg = str(res.exception)
    assert "encrypted" in msg and "--passphrase-env VAR" in msg and "\n" not in msg
    res = runner.invoke(integrity, ["sign", str(bundle), "--key", str(priv), "--passphrase-env", "EDGECLF_TEST_PW"])
    assert res.exit_code == 0, res.output
