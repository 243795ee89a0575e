"""`edgeclf profile`, `profile compare`, `run --audit` and `build-engine` as the README describes them (review r4)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import pytest

from edgeclf.errors import ConfigError
from edgeclf.runtime.profile import compare_profiles
from tests.conftest import run_cli
from tests.runtime.tiny_bundle import make_tiny_bundle


def _stats(median: float, ci: Any = None) -> Dict[str, Any]:
    lo, hi = ci or (median * 0.98, median * 1.02)
    return {"n": 100, "mean": median, "std": 0.1, "min": median, "median": median, "p90": median, "p99": median,
            "max": median, "throughput_per_s": 1000 / median, "ci95": {"median": [lo, hi], "p90": [lo, hi], "p99": [lo, hi]}}


def _doc(targets: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    return {
        "schema_version": 1, "kind": "edgeclf-profile",
        "host": {"machine": "x86_64", "cpu": "AMD EPYC", "cpu_count": 2, "platform": "Linux-6", "python": "3.11", "edgeclf": "x"},
        "config": {"source": "synthetic:ultrasound?frames=550", "quality": True, "roi": None, "smoothing": "auto",
                   "threads": 2, "batch": 1, "opencv_threads": 1, "frame_stage": "result_interval"},
        "system": {"gpu": {"available": False, "name": None, "reason": "pynvml is not installed"}},
        "targets": [{"name": n, "batch": 1, "threads": 2, "frames": 100, "frames_not_inferred": 0,
                     "stages_ms": {k: _stats(v) for k, v in st.items()}} for n, st in targets.items()],
    }


def test_profile_device_threads_are_capped_at_the_cores_this_process_may_use(tmp_path: Path) -> None:
    """README: a device profile's thread count is capped at the cores the process may use (`run --device` does it);
    `profile --device jetson-orin-nx` on a 2-core host ran ORT with 6 threads, timing an oversubscribed pipeline."""
    b = make_tiny_bundle(tmp_path / "bundle")
    p = run_cli("profile", "--bundle", str(b), "--device", "jetson-orin-nx", "--frames", "5", "--warmup", "0",
                "--bootstrap", "0", "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    usable = len(os.sched_getaffinity(0))
    threads = json.loads(p.stdout)["targets"][0]["threads"]
    assert threads <= usable, f"profile ran {threads} inference threads on {usable} usable cores (run --device caps at {usable})"


def test_compare_does_not_silently_pair_two_differently_named_targets() -> None:
    """README: compare matches targets by name, and a target of the old profile missing from the new one fails.
    With one target each, 'breast:ort-cpu:fp32' was compared with 'pneumonia:ort-cpu:int8' and passed, no word said."""
    old = _doc({"breast:ort-cpu:fp32": {"infer": 5.0}})
    new = _doc({"pneumonia:ort-cpu:int8": {"infer": 5.0}})
    r = compare_profiles(old, new)
    told = any("breast:ort-cpu:fp32" in w and "pneumonia:ort-cpu:int8" in w for w in r["warnings"])
    assert r["regressed"] or told, r
    assert compare_profiles(old, _doc({"breast:ort-cpu:fp32": {"infer": 5.0}}))["warnings"] == []  # one name: nothing to say


def test_compare_prints_the_pairing_of_two_differently_named_targets(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(json.dumps(_doc({"a/bundle:ort-cpu:deploy": {"infer": 5.0}})))
    (tmp_path / "new.json").write_text(json.dumps(_doc({"bundle:ort-cpu:deploy": {"infer": 5.0}})))
    p = run_cli("profile", "compare", str(tmp_path / "old.json"), str(tmp_path / "new.json"), timeout=60)
    assert p.returncode == 0, p.stderr
    assert any("a/bundle:ort-cpu:deploy" in line and "bundle:ort-cpu:deploy" in line.replace("a/bundle", "")
               for line in p.stderr.splitlines() if line.startswith("warning:")), p.stderr


@pytest.mark.parametrize("damage", ["no_name", "batch_null", "targets_null", "ci_text", "frames_text", "median_text",
                                    "stage_list", "host_list", "name_twice"])
def test_compare_of_a_damaged_profile_is_one_line_exit_2_not_a_traceback_exit_1(tmp_path: Path, damage: str) -> None:
    """A hand-edited or half-written profile JSON crashed compare with a traceback and exit 1, which a CI gate reads as
    'regression'; user errors are one line, exit 2 (the profile schema, runtime/profile_schema.json, exists for this)."""
    good = _doc({"a:ort-cpu:fp32": {"infer": 5.0}})
    bad = json.loads(json.dumps(good))
    t = bad["targets"][0]
    if damage == "no_name":
        del t["name"]
    elif damage == "batch_null":
        t["batch"] = None
    elif damage == "targets_null":
        bad["targets"] = None
    elif damage == "ci_text":
        t["stages_ms"]["infer"]["ci95"]["median"] = [4.9, "x"]
    elif damage == "frames_text":
        t["frames"] = "x"
    elif damage == "median_text":
        t["stages_ms"]["infer"]["median"] = "5.0"
    elif damage == "stage_list":
        t["stages_ms"]["infer"] = [5.0]
    elif damage == "host_list":
        bad["host"] = ["x86_64"]
    else:
        bad["targets"].append(json.loads(json.dumps(t)))
    (tmp_path / "old.json").write_text(json.dumps(bad))
    (tmp_path / "new.json").write_text(json.dumps(good))
    p = run_cli("profile", "compare", str(tmp_path / "old.json"), str(tmp_path / "new.json"), timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, (p.returncode, p.stderr)
    assert "old.json" in p.stderr, p.stderr  # which of the two files
    with pytest.raises(ConfigError):  # the library call as well
        compare_profiles(bad, good)


def test_compare_still_reads_a_profile_without_the_fields_it_does_not_need() -> None:
    """A profile written before batch, frames_not_inferred or the CPU model were recorded compares as before."""
    old = _doc({"a:ort-cpu:fp32": {"infer": 5.0}})
    for k in ("batch", "frames_not_inferred"):
        del old["targets"][0][k]
    del old["host"]["cpu"], old["system"]
    assert compare_profiles(old, _doc({"a:ort-cpu:fp32": {"infer": 5.0}}))["rows"]


def test_the_audit_head_reaches_the_printed_summary_or_the_summary_file(tmp_path: Path) -> None:
    """README: `audit verify LOG --head SHA256` with 'all 64 hex characters of the run summary's audit head'. Without
    --json, `run --audit` printed neither the log's path nor its head, and --summary's file holds no head either."""
    b = make_tiny_bundle(tmp_path / "bundle")
    out, summ, aud = tmp_path / "res.jsonl", tmp_path / "clip.json", tmp_path / "aud"
    p = run_cli("run", "--bundle", str(b), "--source", "synthetic:ultrasound?frames=12", "--roi", "none", "--out", str(out),
                "--summary", str(summ), "--audit", str(aud) + "/", timeout=120)
    assert p.returncode == 0, p.stderr
    log = next(aud.glob("audit-*.jsonl"))
    head = json.loads(log.read_text().splitlines()[-1])["hash"]
    assert head in p.stdout + p.stderr or head in summ.read_text(), "the audit head is kept nowhere but the log itself"
    assert f"audit: {log} head {head}" in p.stdout, p.stdout
    assert json.loads(summ.read_text())["audit"] == {"path": str(log), "head": head, "records": len(log.read_text().splitlines())}
    assert "synthetic" not in p.stdout.split("audit:")[1].splitlines()[0]  # the log's path and head, no source
    p = run_cli("audit", "verify", str(log), "--head", head, timeout=60)
    assert p.returncode == 0, p.stderr


def test_a_bundle_given_as_dot_is_named_by_its_folder(tmp_path: Path) -> None:
    """README: each target is named FOLDER:BACKEND:PRECISION after its bundle's folder; `--bundle .` gave ':ort-cpu:deploy'."""
    b = make_tiny_bundle(tmp_path / "breast")
    p = run_cli("profile", "--bundle", ".", "--frames", "5", "--warmup", "0", "--bootstrap", "0", "--json", cwd=b, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["targets"][0]["name"].startswith("breast:"), p.stdout[:400]


def test_build_engine_takes_engine_cache_as_run_and_profile_do(tmp_path: Path) -> None:
    """README names --engine-cache (run, profile, bundle check); build-engine refused it, knowing only --cache."""
    b = make_tiny_bundle(tmp_path / "bundle")
    for opt in ("--engine-cache", "--cache"):
        p = run_cli("build-engine", "--bundle", str(b), "--device", "jetson-orin-nx", opt, str(tmp_path / "engines"),
                    "--print-trtexec", timeout=60)
        assert p.returncode == 0 and "No such option" not in p.stderr, (opt, p.stderr)
