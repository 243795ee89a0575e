"""edgeclf.runtime.audit: the hash-chained audit log, its three states, and `edgeclf audit verify`."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from click.testing import CliRunner

from edgeclf.cli_integrity import AUDIT_EXIT_CODES, audit
from edgeclf.errors import ConfigError, DataError, EdgeclfError
from edgeclf.runtime import audit as audit_mod
from edgeclf.runtime.audit import (
    GENESIS,
    AuditLog,
    AuditSink,
    result_line,
    scrub_source,
    source_fact,
    verify_audit,
)

REPO = Path(__file__).resolve().parents[2]


def _result(i: int, abstain: bool = False) -> Dict[str, Any]:
    return {"frame": i, "timestamp": 100.0 + i / 30, "time": 1.7e9 + i, "label": None if abstain else "cyst",
            "abstain": abstain, "abstain_reason": "dark" if abstain else None, "probs": {"normal": 0.1, "cyst": 0.9},
            "latency_ms": {"total": 12.5}}


def _finished_log(path: Path, results: int = 7, digest_every: int = 3) -> List[bytes]:
    """start, digests (every 3 results), a fault and a recovery, end: 8 records for 7 results."""
    with AuditLog(path, fsync_every=0, digest_every=digest_every) as log:
        log.start(bundle_checksum="ab" * 32, device_profile={"name": "x86-cpu"}, config={"backend": "ort-cpu"},
                  source=source_fact("/data/SMITH^ANNA/clip.mp4"))
        for i in range(results):
            log.result(_result(i, abstain=i % 4 == 3))
            if i == 4:
                log.fault("source", "disconnected", attempts=1)
                log.recovery("source", "reconnected", attempts=1)
    return path.read_bytes().splitlines(keepends=True)


def test_a_finished_log_is_intact_with_every_record_chained(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = _finished_log(path)
    recs = [json.loads(x) for x in lines]
    assert [r["type"] for r in recs] == ["start", "digest", "digest", "fault", "recovery", "digest", "end"]
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    assert recs[0]["prev"] == GENESIS and all(b["prev"] == a["hash"] for a, b in zip(recs, recs[1:]))
    start = recs[0]["payload"]
    assert start["bundle_checksum"] == "ab" * 32 and start["packages"]["python"] and start["format"] == "edgeclf-audit"
    assert "SMITH" not in lines[0].decode() and start["source"]["kind"] == "path"  # the URI is hashed, never kept
    digests = [r["payload"] for r in recs if r["type"] == "digest"]
    assert [d["count"] for d in digests] == [3, 2, 2]  # the fault flushed the pending 2 results first
    assert sum(d["abstained"] for d in digests) == 1 and digests[-1]["total"] == 7
    rep = verify_audit(path)
    assert rep.state == "intact" and rep.records == len(recs) and rep.results == 7 and rep.faults == 1
    assert rep.end is not None and rep.end["status"] == "ok" and rep.head == recs[-1]["hash"]


def _cases(n: int) -> List[Any]:
    return [pytest.param(kind, i, id=f"{kind}-{i}") for kind in ("edit", "delete", "insert", "swap") for i in range(n)]


N_RECORDS = 7


@pytest.mark.parametrize(("kind", "pos"), _cases(N_RECORDS))
def test_any_single_record_edited_deleted_inserted_or_swapped_is_detected(tmp_path: Path, kind: str, pos: int) -> None:
    path = tmp_path / "a.jsonl"
    lines = _finished_log(path)
    assert len(lines) == N_RECORDS
    if kind == "edit":  # a plausible edit: change a value, keep the JSON valid
        rec = json.loads(lines[pos])
        rec["time"] += 1
        lines[pos] = (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode()
    elif kind == "delete":
        del lines[pos]
    elif kind == "insert":  # a copy of a record, or a forged one that chains to its predecessor
        if pos % 2:
            lines.insert(pos, lines[pos - 1] if pos else lines[0])
        else:
            prev = json.loads(lines[pos - 1])["hash"] if pos else GENESIS
            forged = {"seq": pos, "time": 1.0, "type": "event", "payload": {"name": "forged"}, "prev": prev}
            forged["hash"] = audit_mod._record_hash(forged)
            lines.insert(pos, (audit_mod._canonical(forged) + "\n").encode())
    else:
        other = (pos + 1) % N_RECORDS
        lines[pos], lines[other] = lines[other], lines[pos]
    path.write_bytes(b"".join(lines))
    rep = verify_audit(path)
    if kind == "delete" and pos == N_RECORDS - 1:
        # Dropping the end record leaves a whole chain: it reads as a cut-off run, never as intact; a head
        # hash kept elsewhere (the run summary) tells the two apart.
        assert rep.state == "unterminated"
        head = json.loads(_finished_log(tmp_path / "b.jsonl")[-1])["hash"]
        assert verify_audit(path, expected_head=head).state == "tampered"
        return
    assert rep.state == "tampered", rep
    assert rep.bad_line is not None and "\n" not in rep.reason and f"line {rep.bad_line}" in rep.reason
    assert rep.bad_line <= max(pos, (pos + 1) % N_RECORDS if kind == "swap" else pos) + 2


def test_a_whitespace_only_edit_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = _finished_log(path)
    lines[2] = lines[2].replace(b'"type":', b'"type": ')
    path.write_bytes(b"".join(lines))
    rep = verify_audit(path)
    assert rep.state == "tampered" and rep.bad_line == 3 and "canonical" in rep.reason


def test_torn_last_line_and_missing_end_read_as_unterminated(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = _finished_log(path)
    body = b"".join(lines[:-1])
    for cut in (0, 1, len(lines[-1]) // 2, len(lines[-1]) - 2):  # every cut of the end record mid-write
        path.write_bytes(body + lines[-1][:cut])
        rep = verify_audit(path)
        assert rep.state == "unterminated" and rep.records == len(lines) - 1 and rep.torn == (1 if cut else 0), cut
    path.write_bytes(body + b"\x00" * 40)  # size grew, data never reached the disk
    assert verify_audit(path).state == "unterminated" and verify_audit(path).torn == 1
    path.write_bytes(body + lines[-1][:-1])  # only the newline is missing: the end record is whole
    assert verify_audit(path).state == "intact"
    path.write_bytes(b"".join(lines[:3]) + lines[3][:20] + b"\n" + b"".join(lines[4:]))  # torn in the middle
    assert verify_audit(path).state == "tampered"
    path.write_bytes(b"")
    assert verify_audit(path).state == "unterminated" and verify_audit(path).records == 0


def test_records_after_end_or_a_second_start_are_tampering(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    la, lb = _finished_log(a), _finished_log(b)
    a.write_bytes(b"".join(la + lb[:1]))
    assert verify_audit(a).state == "tampered" and "after the end" in verify_audit(a).reason
    a.write_bytes(b"".join(la[:-1] + lb[1:]))  # two sessions spliced: the chain breaks at the seam
    assert verify_audit(a).state == "tampered" and verify_audit(a).bad_line == len(la)


def test_results_file_is_checked_against_the_digests(tmp_path: Path) -> None:
    log_path, results = tmp_path / "a.jsonl", tmp_path / "r.jsonl"
    records = [_result(i, abstain=i == 5) for i in range(10)]
    results.write_bytes(b"".join(result_line(r) for r in records))
    with AuditLog(log_path, digest_every=4) as log:
        log.start(bundle_checksum="0" * 64)
        sink = AuditSink(log)
        for r in records:
            sink.write(r)
        sink.close()  # digests the 2 pending results, does not end the log
        assert log.records == 4 and not log.ended
    rep = verify_audit(log_path, results=results)
    assert rep.state == "intact" and rep.results_check == {"state": "match", "checked": 10, "undigested": 0, "torn": 0,
                                                           "reason": ""}
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(b"".join(lines[:3] + [lines[3].replace(b"cyst", b"mass")] + lines[4:]))
    rep = verify_audit(log_path, results=results)
    assert rep.state == "tampered" and "results lines 1-4" in rep.reason
    results.write_bytes(b"".join(lines[:9]))
    assert verify_audit(log_path, results=results).results_check["state"] == "mismatch"


def test_writer_refuses_overwrite_and_bad_settings(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("earlier log\n")
    with pytest.raises(ConfigError, match="never overwritten"):
        AuditLog(path)
    assert path.read_text() == "earlier log\n"
    with pytest.raises(ConfigError, match="digest_every"):
        AuditLog(tmp_path / "b.jsonl", digest_every=0)
    with pytest.raises(ConfigError, match="fsync_every"):
        AuditLog(tmp_path / "c.jsonl", fsync_every=-1)
    log = AuditLog(tmp_path)  # a folder: a new, uniquely named log inside it
    assert Path(log.path).parent == tmp_path and Path(log.path).name.startswith("audit-")
    with pytest.raises(EdgeclfError, match="start"):
        log.result(_result(0))
    log.start(bundle_checksum="0" * 64)
    log.end()
    with pytest.raises(EdgeclfError, match="already has its end"):
        log.fault("x", "y")
    log.close()
    log.close()  # idempotent
    with pytest.raises(DataError, match="cannot read"):
        verify_audit(tmp_path / "missing.jsonl")


def test_fsync_policy_follows_the_results_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(audit_mod.time, "monotonic", lambda: clock[0])
    log = AuditLog(tmp_path / "a.jsonl", fsync_every=1.0, digest_every=1)
    log.start(bundle_checksum="0" * 64)  # start: always synced
    assert log.fsyncs == 1
    for i in range(8):  # a digest per result, 0.25 s apart: one fsync a second
        clock[0] += 0.25
        log.result(_result(i))
    assert log.fsyncs == 3
    log.fault("backend", "raised once")  # faults: always synced
    assert log.fsyncs == 4
    log.end()
    assert log.fsyncs == 5
    log.close()
    never = AuditLog(tmp_path / "b.jsonl", fsync_every=None)
    never.start(bundle_checksum="0" * 64)
    never.result(_result(0))
    never.end()
    never.close()
    assert never.fsyncs == 2  # start and end only


def test_an_exception_leaving_the_context_ends_the_log_with_the_error(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with pytest.raises(RuntimeError), AuditLog(path) as log:
        log.start(bundle_checksum="0" * 64)
        log.result(_result(0))
        raise RuntimeError("backend exploded\nwith two lines")
    rep = verify_audit(path)
    assert rep.state == "intact" and rep.end is not None and rep.end["status"] == "error"
    assert rep.end["error"] == "backend exploded with two lines" and rep.results == 1


class _FullDisk:
    """os.write that fails with ENOSPC after `ok` successful writes, the first failing one half-written."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.real = os.write

    def __call__(self, fd: int, data: Any) -> int:
        if self.ok <= 0:
            self.real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.ok -= 1
        return self.real(fd, data)


def test_a_full_disk_keeps_whole_records_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, digest_every=1)
    log.start(bundle_checksum="0" * 64)
    monkeypatch.setattr(audit_mod.os, "write", _FullDisk(ok=2))
    log.result(_result(0))
    log.result(_result(1))
    with pytest.raises(EdgeclfError) as info:
        log.result(_result(2))
    msg = str(info.value)
    assert str(path) in msg and "No space left" in msg and "3 whole records" in msg and "\n" not in msg
    with pytest.raises(EdgeclfError, match="No space left"):  # every later record fails the same way
        log.end()
    monkeypatch.undo()
    log.close()
    rep = verify_audit(path)
    assert rep.state == "unterminated" and rep.records == 3 and rep.torn == 0  # the half record was cut off


def test_cli_audit_verify_exit_codes_and_json(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = _finished_log(path)
    runner = CliRunner()
    res = runner.invoke(audit, ["verify", str(path)])
    assert res.exit_code == AUDIT_EXIT_CODES["intact"] == 0 and res.output.startswith("intact:")
    path.write_bytes(b"".join(lines[:-1]))
    res = runner.invoke(audit, ["verify", str(path), "--json"])
    assert res.exit_code == 3 and json.loads(res.output)["state"] == "unterminated"
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    res = runner.invoke(audit, ["verify", str(path)])
    assert res.exit_code == 4 and res.output.startswith("tampered:") and "line 3" in res.output
    res = runner.invoke(audit, ["verify", str(tmp_path / "none.jsonl")])
    assert isinstance(res.exception, DataError)


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from edgeclf.runtime.audit import AuditLog
    log = AuditLog(sys.argv[1], fsync_every=0, digest_every=2)
    log.start(bundle_checksum="0" * 64)
    for i in range(int(sys.argv[2])):
        log.result({"frame": i, "abstain": False})
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_kill_9_leaves_an_unterminated_log_up_to_its_last_record(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), "9"], env=env, timeout=60)
    assert p.returncode == -signal.SIGKILL
    rep = verify_audit(path)
    assert rep.state == "unterminated" and rep.records == 1 + 4 and rep.results == 8  # 9th result not yet digested
    res = CliRunner().invoke(audit, ["verify", str(path)])
    assert res.exit_code == 3 and "unterminated" in res.output


def test_kill_9_during_a_real_run_leaves_whole_results_and_an_unterminated_log(bundle_dir: Path, tmp_path: Path) -> None:
    """A run killed from outside at a random moment: whole JSONL lines only, the audit log unterminated
    up to its last record, and every digested result present in the results file."""
    from edgeclf.runtime.sinks import read_jsonl

    out, log_path = tmp_path / "r.jsonl", tmp_path / "audit.jsonl"
    # The audit sink after the JSONL sink, as the run loop is to wire it: it digests only results on file.
    runner = textwrap.dedent(
        f"""
        from edgeclf.runtime.audit import AuditLog, AuditSink
        from edgeclf.runtime.backends import create_backend
        from edgeclf.runtime.bundle import load_bundle
        from edgeclf.runtime.pipeline import run_pipeline
        from edgeclf.runtime.sinks import JsonlSink
        from edgeclf.runtime.sources import open_source
        b = load_bundle({str(bundle_dir)!r})
        m = b.manifest
        log = AuditLog({str(log_path)!r}, fsync_every=0, digest_every=5)
        log.start(bundle_checksum=b.checksum)
        with create_backend(str(b.model_path), (m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs) as be, \\
                open_source("synthetic:ultrasound?frames=100000&size=64") as src:
            run_pipeline(b, src, be, [JsonlSink({str(out)!r}, fsync_every=0), AuditSink(log)])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", runner], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and (not log_path.exists() or log_path.read_bytes().count(b"\n") < 6):
        time.sleep(0.05)
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
    p.kill()
    p.wait(timeout=30)
    records, torn = read_jsonl(out)
    assert torn == 0 and len(records) >= 25
    rep = verify_audit(log_path, results=out)
    assert rep.state == "unterminated" and rep.records >= 6 and rep.torn == 0
    assert rep.results_check is not None and rep.results_check["state"] == "match"
    assert rep.results_check["checked"] == rep.results and rep.results_check["undigested"] < 5 + 2


def test_attached_to_the_main_cli_the_exit_codes_survive(tmp_path: Path) -> None:
    """The wiring edgeclf/cli.py is to use (`cli.add_command(audit)`), through its real entry point."""
    path = tmp_path / "a.jsonl"
    lines = _finished_log(path)
    wired = "import sys; from edgeclf.cli import cli, main; from edgeclf.cli_integrity import audit; " \
            "cli.add_command(audit); main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", wired, *args], capture_output=True, text=True, env=env, timeout=120)

    assert run("audit", "verify", str(path)).returncode == 0
    path.write_bytes(b"".join(lines[:-1]))
    assert run("audit", "verify", str(path)).returncode == 3
    path.write_bytes(b"".join(lines[1:]))
    p = run("audit", "verify", str(path))
    assert p.returncode == 4 and p.stdout.startswith("tampered:")
    p = run("audit", "verify", str(tmp_path / "missing.jsonl"))
    assert p.returncode == 2 and p.stderr.startswith("edgeclf: error: cannot read audit log") and p.stderr.count("\n") == 1


def test_a_path_ending_in_a_slash_is_a_folder_made_if_missing(tmp_path) -> None:
    from edgeclf.runtime.audit import AuditLog

    folder = tmp_path / "logs" / "cart1"
    with AuditLog(str(folder) + "/") as log:
        log.start(bundle_checksum="0" * 64, device_profile=None, config={})
        log.end()
    made = list(folder.glob("audit-*.jsonl"))
    assert len(made) == 1 and made[0] == __import__("pathlib").Path(log.path)


# ------------------------------------------------------------------------------------ no identifiers

URI = "http://user:pw@127.0.0.1:18731/c.mp4?patient=DOE_JOHN_MRN123"


@pytest.mark.parametrize("text", [
    f"a read failed (SourceError: stream {URI!r} delivered no frame after 0 frames)",
    "a read failed (SourceError: stream 'http://***@127.0.0.1:18731/c.mp4?patient=DOE_JOHN_MRN123' delivered no frame)",
    "a read failed (SourceError: stream 'http://***@127.0.0.1:18731/c.mp4?patient=DOE_JO)",  # clipped at 200 chars
])
def test_scrub_source_removes_the_uri_in_every_form_a_message_quotes_it(text: str) -> None:
    out = scrub_source(text, URI)
    assert "DOE_JO" not in out and "127.0.0.1" not in out and "<source>" in out
    assert out.startswith("a read failed (SourceError: stream ")


def test_scrub_source_paths_and_what_it_leaves_alone() -> None:
    assert scrub_source("video /data/SMITH^ANNA/clip.mp4: frame 3 unreadable", "/data/SMITH^ANNA/clip.mp4") == \
        "video <source> frame 3 unreadable"
    assert "SMITH" not in scrub_source("DICOM /incoming/SMITH^ANNA.dcm: bad", "watch:/incoming")  # a file in the watched folder
    assert scrub_source("camera 0 failed after 10 tries", "0") == "camera 0 failed after 10 tries"
    assert scrub_source("opening rtsp://cam.local/live failed", None) == "opening <source> failed"


def test_fault_recovery_and_end_texts_never_carry_the_source(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, fsync_every=None, source=URI) as log:
        log.start(bundle_checksum="ab" * 32, config={"source": source_fact(URI)})
        for _ in range(3):
            log.fault("source", f"a read failed (SourceError: stream {URI!r} delivered no frame)", counts={"disconnects": 1})
        log.recovery("source", "reconnected (connection 2)")
        log.end("error", error=f"stream {URI!r} could not be reopened")
    text = path.read_text()
    assert "DOE_JOHN" not in text and "127.0.0.1" not in text and text.count("<source>") == 4
    assert verify_audit(path).state == "intact"


@pytest.mark.parametrize("uri", ["watch:/in/ZQ^ORV?poll=1", "watch:/in/ZQ^ORV?poll=0.5&state=/var/ZQ^ORV.json",
                                 "watch:ZQ^ORV?idle_exit=5"])
def test_a_watched_folder_with_options_is_scrubbed_like_one_without(uri: str) -> None:
    # open_watch takes the folder (and the state file) out of the URI's query: messages quote those paths,
    # never the URI with its ?options, so the forms must be the paths themselves (short ones included).
    folder = "/in/ZQ^ORV" if uri.startswith("watch:/") else os.path.abspath("ZQ^ORV")
    for text in (f"watch state '{folder}/.edgeclf-watch.json' cannot be written (OSError: No space left on device)",
                 f"watch folder {folder!r} does not exist or is not a folder", "watch state '/var/ZQ^ORV.json' is in use"):
        if "/var/" in text and "state=" not in uri:
            continue
        out = scrub_source(text, uri)
        assert "ZQ^ORV" not in out and "<source>" in out, out


def test_a_torn_last_results_line_is_counted_not_dropped(tmp_path: Path) -> None:
    # kill -9 mid-write leaves a cut-short last result: like read_jsonl, the check says so instead of
    # reporting a clean match that silently leaves a (partial) result out.
    log_path, results = tmp_path / "a.jsonl", tmp_path / "r.jsonl"
    records = [_result(i) for i in range(5)]
    with AuditLog(log_path, digest_every=2) as log:
        log.start(bundle_checksum="0" * 64)
        for r in records[:4]:
            log.result(r)
    results.write_bytes(b"".join(result_line(r) for r in records[:4]) + result_line(records[4])[:20])
    rep = verify_audit(log_path, results=results)
    assert rep.state == "intact"
    assert rep.results_check == {"state": "match", "checked": 4, "undigested": 0, "torn": 1, "reason": ""}
    res = CliRunner().invoke(audit, ["verify", str(log_path), "--results", str(results)])
    assert res.exit_code == 0 and "a torn last line ignored" in res.output


def test_results_appended_after_an_ended_log_are_a_mismatch(tmp_path: Path) -> None:
    # end() digests every pending result, so an ended log leaves no result undigested: a line after the last
    # digest was added later (a made-up result), not one the run wrote.
    log_path, results = tmp_path / "a.jsonl", tmp_path / "r.jsonl"
    records = [_result(i) for i in range(6)]
    with AuditLog(log_path, digest_every=4) as log:
        log.start(bundle_checksum="0" * 64)
        sink = AuditSink(log)
        for r in records:
            sink.write(r)
        log.end("ok")
    forged = dict(_result(6), label="mass")
    results.write_bytes(b"".join(result_line(r) for r in records) + result_line(forged))
    rep = verify_audit(log_path, results=results)
    assert rep.state == "tampered" and rep.results_check is not None
    assert rep.results_check["state"] == "mismatch" and rep.results_check["undigested"] == 1
    assert "after line 6" in rep.reason and "\n" not in rep.reason
    res = CliRunner().invoke(audit, ["verify", str(log_path), "--results", str(results)])
    assert res.exit_code == AUDIT_EXIT_CODES["tampered"] == 4, res.output


def test_undigested_results_of_a_log_without_end_are_counted_not_a_mismatch(tmp_path: Path) -> None:
    # Cut off before end (kill -9): results written after the last digest are honest, and counted.
    log_path, results = tmp_path / "a.jsonl", tmp_path / "r.jsonl"
    records = [_result(i) for i in range(6)]
    log = AuditLog(log_path, digest_every=4)
    log.start(bundle_checksum="0" * 64)
    for r in records:
        log.result(r)
    log.close()  # no end: 2 results pending
    results.write_bytes(b"".join(result_line(r) for r in records))
    rep = verify_audit(log_path, results=results)
    assert rep.state == "unterminated"
    assert rep.results_check == {"state": "match", "checked": 4, "undigested": 2, "torn": 0, "reason": ""}


def test_an_end_record_counting_other_results_than_the_digests_is_a_mismatch(tmp_path: Path) -> None:
    log_path, results = tmp_path / "a.jsonl", tmp_path / "r.jsonl"
    records = [_result(i) for i in range(5)]
    with AuditLog(log_path, digest_every=2) as log:
        log.start(bundle_checksum="0" * 64)
        for r in records:
            log.result(r)
    results.write_bytes(b"".join(result_line(r) for r in records))
    assert verify_audit(log_path, results=results).results_check["state"] == "match"
    # a re-hashed end record (the chain still holds: it is the last record) that claims 7 results
    lines = log_path.read_bytes().splitlines(keepends=True)
    end = json.loads(lines[-1])
    end["payload"]["results"] = 7
    end["hash"] = audit_mod._record_hash(end)
    log_path.write_bytes(b"".join(lines[:-1]) + (audit_mod._canonical(end) + "\n").encode("ascii"))
    rep = verify_audit(log_path, results=results)
    assert verify_audit(log_path).state == "intact"  # alone, the log cannot tell
    assert rep.state == "tampered" and rep.results_check is not None and rep.results_check["state"] == "mismatch"
    assert "counts 7 results but the digests cover 5" in rep.reason


def test_bytes_after_the_end_record_are_tampering_even_without_a_newline(tmp_path: Path) -> None:
    # The end record is fsynced and nothing is written after it: a cut-short line there is no power-loss tear.
    path = tmp_path / "a.jsonl"
    whole = b"".join(_finished_log(path))
    for tail in (b'{"note":"added later"}\n', b'{"note":"added later"', b"\x00" * 40):
        path.write_bytes(whole + tail)
        rep = verify_audit(path)
        assert rep.state == "tampered" and rep.torn == 0, (tail, rep.state, rep.reason)
        assert "after the end record" in rep.reason and rep.bad_line == whole.count(b"\n") + 1


# -- user mistakes are not integrity findings: a file that is no audit log, a malformed --head


def _main_cli(*args: str) -> subprocess.CompletedProcess:
    """`edgeclf` through its real entry point (one-line errors on stderr, exit 2)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", "import sys; from edgeclf.cli import main; main(sys.argv[1:])", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_a_results_file_given_as_the_log_is_a_user_error_saying_so(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    results.write_bytes(b"".join(result_line(_result(i)) for i in range(5)))
    rep = verify_audit(results)
    assert rep.state == "not_audit" and not rep.ok and "results file" in rep.reason
    p = _main_cli("audit", "verify", str(results))
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p
    assert p.stderr.startswith("edgeclf: error: not an audit log: ") and "results file" in p.stderr
    assert "--audit" in p.stderr and "tampered" not in p.stderr


def test_a_file_with_no_audit_record_is_a_user_error_not_tampering(tmp_path: Path) -> None:
    other = tmp_path / "summary.json"
    other.write_text(json.dumps({"frames": 12, "fps": 30.0}, indent=2) + "\n")
    rep = verify_audit(other)
    assert rep.state == "not_audit" and "results file" not in rep.reason and "edgeclf run --audit" in rep.reason
    res = CliRunner().invoke(audit, ["verify", str(other), "--json"])
    assert isinstance(res.exception, DataError) and "not an audit log" in str(res.exception)
    one_line = tmp_path / "one.jsonl"  # no newline: not a torn record either, it does not start like one
    one_line.write_bytes(result_line(_result(0)).rstrip(b"\n"))
    assert verify_audit(one_line).state == "not_audit"


def test_a_log_with_a_later_bad_line_or_a_torn_first_record_is_still_judged(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = _finished_log(path)
    path.write_bytes(lines[0] + result_line(_result(0)) + b"".join(lines[1:]))  # a result spliced into the log
    rep = verify_audit(path)
    assert rep.state == "tampered" and rep.bad_line == 2
    path.write_bytes(b"garbage\n" + b"".join(lines[1:]))  # the first record replaced: the rest are records
    assert verify_audit(path).state == "tampered"
    path.write_bytes(lines[0][:40])  # power loss in the first record
    rep = verify_audit(path)
    assert rep.state == "unterminated" and rep.torn == 1
    path.write_bytes(b"\x00" * 300)  # its blocks never reached the disk
    assert verify_audit(path).state == "unterminated"


def test_an_empty_regular_file_is_a_run_cut_off_before_its_first_record_but_an_empty_stream_is_no_log(
        tmp_path: Path) -> None:
    # AuditLog creates (and syncs) the empty file before writing start: power loss in between leaves it empty.
    path = tmp_path / "a.jsonl"
    AuditLog(path).close()
    rep = verify_audit(path)
    assert rep.state == "unterminated" and rep.records == 0
    assert "before its first record" in rep.reason and "not an audit log" in rep.reason
    if os.path.exists(os.devnull) and not os.path.isfile(os.devnull):
        assert verify_audit(os.devnull).state == "not_audit"
        p = _main_cli("audit", "verify", os.devnull)
        assert p.returncode == 2 and "empty" in p.stderr and "not an audit log" in p.stderr, p


@pytest.mark.parametrize("head", ["deadbeef", "ab" * 33, "zz" * 32, ""])
def test_a_head_that_is_no_sha256_is_a_user_error_naming_the_form(tmp_path: Path, head: str) -> None:
    path = tmp_path / "a.jsonl"
    _finished_log(path)
    with pytest.raises(ConfigError, match="64 hex characters"):
        verify_audit(path, expected_head=head)
    res = CliRunner().invoke(audit, ["verify", str(path), "--head", head])
    assert isinstance(res.exception, ConfigError) and "64 hex characters" in str(res.exception)


def test_a_whole_head_is_checked_whatever_its_case(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _finished_log(path)
    head = verify_audit(path).head
    assert verify_audit(path, expected_head=head.upper()).state == "intact"
    res = CliRunner().invoke(audit, ["verify", str(path), "--head", f" {head} "])
    assert res.exit_code == 0, res.output
    other = ("0" if head[0] != "0" else "1") + head[1:]
    res = CliRunner().invoke(audit, ["verify", str(path), "--head", other])
    assert res.exit_code == AUDIT_EXIT_CODES["tampered"] and "expected head" in res.output
