"""Property-based tests of the audit log verifier: any change to a finished log is caught, and no input
makes the verifier raise (profiles: tests/_fuzz.py)."""
from __future__ import annotations

from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeclf.runtime.audit import STATES, AuditLog, verify_audit
from tests._fuzz import time_limit


@pytest.fixture(scope="module")
def finished_log(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("audit") / "a.jsonl"
    with AuditLog(path, fsync_every=None, digest_every=3) as log:
        log.start(bundle_checksum="ab" * 32, config={"backend": "ort-cpu", "note": "caf\u00e9 \u2603"})
        for i in range(10):
            log.result({"frame": i, "abstain": i % 4 == 0, "label": "cyst"})
            if i == 6:
                log.fault("source", "disconnected", attempts=2)
                log.recovery("source", "reconnected")
    return path.read_bytes()


@given(data=st.data())
def test_any_byte_change_to_a_finished_log_is_never_intact(tmp_path_factory: pytest.TempPathFactory, finished_log: bytes,
                                                           data: st.DataObject) -> None:
    buf = bytearray(finished_log)
    for _ in range(data.draw(st.integers(1, 3))):
        buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    if bytes(buf) == finished_log:  # flips of one byte that cancel out
        return
    path = tmp_path_factory.mktemp("a") / "a.jsonl"
    path.write_bytes(bytes(buf))
    with time_limit():
        rep = verify_audit(path)
    assert rep.state in ("tampered", "unterminated"), rep
    assert "\n" not in rep.reason


@given(data=st.data())
def test_lines_removed_duplicated_or_moved_are_never_intact(tmp_path_factory: pytest.TempPathFactory, finished_log: bytes,
                                                            data: st.DataObject) -> None:
    lines: List[bytes] = finished_log.splitlines(keepends=True)
    n = len(lines)
    op = data.draw(st.sampled_from(["remove", "duplicate", "move"]))
    i = data.draw(st.integers(0, n - 1))
    if op == "remove":
        del lines[i]
    elif op == "duplicate":
        lines.insert(data.draw(st.integers(0, n)), lines[i])
    else:
        j = data.draw(st.integers(0, n - 1))
        if i == j:
            return
        lines.insert(j, lines.pop(i))
    path = tmp_path_factory.mktemp("a") / "a.jsonl"
    path.write_bytes(b"".join(lines))
    rep = verify_audit(path)
    if op == "remove" and i == n - 1:
        assert rep.state == "unterminated"  # a cut-off log; the head hash kept elsewhere catches it
    else:
        assert rep.state == "tampered", (op, i, rep)


@given(content=st.one_of(st.binary(max_size=2000), st.text(max_size=500).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_any_bytes_give_a_state_never_an_exception(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    path = tmp_path_factory.mktemp("a") / "a.jsonl"
    path.write_bytes(content)
    with time_limit():
        rep = verify_audit(path, results=path)
    assert rep.state in STATES and "\n" not in rep.reason
