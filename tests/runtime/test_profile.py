"""`edgeclf profile`: the document's structure and schema, regression checks, the report, the statistics.

Timing accuracy is not tested here (timings do not belong in tests): see benchmarks/profile_accuracy.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np
import pytest

from edgeclf.errors import ConfigError
from edgeclf.runtime.backends import FakeBackend
from edgeclf.runtime.pipeline import RunOptions
from edgeclf.runtime.profile import (
    PROFILE_STAGES,
    SCHEMA_VERSION,
    ProfileOptions,
    ProfileResult,
    ProfileTarget,
    build_figures,
    compare_profiles,
    latency_stats,
    load_profile_json,
    profile_bundles,
    profile_schema,
    ratio_ci,
    rss_slope_mb_per_10k,
    write_report,
)
from tests.conftest import REPO, run_cli

SOURCE = "synthetic:ultrasound?frames=12&size=64"  # shorter than a target's frames: the source is reopened


def _validate(doc: Dict[str, Any]) -> None:
    """Against profile_schema.json with jsonschema where installed, else the required keys by hand."""
    schema = profile_schema()
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        jsonschema.Draft202012Validator(schema).validate(doc)
        return
    for key in schema["required"]:  # pragma: no cover - only without jsonschema
        assert key in doc, key
    tdef = schema["$defs"]["target"]
    for t in doc["targets"]:  # pragma: no cover
        assert set(tdef["required"]) <= set(t)
        for s in t["stages_ms"].values():
            assert set(schema["$defs"]["stats"]["required"]) <= set(s)


def _factory(delay_s: float = 0.0):  # type: ignore[no-untyped-def]
    def fn(x: np.ndarray) -> np.ndarray:
        if delay_s:
            time.sleep(delay_s)
        return np.tile(np.array([[0.1, 0.2, 0.3]], np.float32), (len(x), 1))

    def make(bundle, path, target, threads):  # type: ignore[no-untyped-def]
        return FakeBackend((1, 32, 32), 3, fn=fn)

    return make


def _profile(bundle_dir: Path, *, delay_s: float = 0.0, labels: Sequence[str] = ("a",), frames: int = 20,
             bootstrap: int = 100) -> ProfileResult:
    opts = ProfileOptions(source=SOURCE, frames=frames, warmup=4, chunk=8, bootstrap=bootstrap, sample_interval_s=0.02)
    targets = [ProfileTarget(str(bundle_dir), label=lb) for lb in labels]
    return profile_bundles(targets, opts, backend_factory=_factory(delay_s), started_at=time.time())


def test_document_follows_the_schema_and_keeps_every_frame(bundle_dir: Path) -> None:
    res = _profile(bundle_dir, labels=["a", "b"])
    doc = json.loads(json.dumps(res.doc, allow_nan=False))  # strict JSON: no NaN or Infinity
    _validate(doc)
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert [t["name"] for t in doc["targets"]] == ["a", "b"]
    for t in doc["targets"]:
        assert t["frames"] == 20 and t["source_reopened"] >= 1
        assert set(t["stages_ms"]) == set(PROFILE_STAGES)
        assert all(s["n"] == 20 for s in t["stages_ms"].values())  # warm-up excluded
        assert all(s["n"] == 4 for s in t["warmup"]["stages_ms"].values())
        lat = t["stages_ms"]["latency"]
        assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["ci95"]["median"][0] <= lat["median"] <= lat["ci95"]["median"][1]
        assert t["cold_start"]["session_ms"] is None  # a FakeBackend has no session
        assert t["cold_start"]["time_to_first_result_ms"] > 0
    assert doc["targets"][0]["ratio_to_first"] is None
    assert set(doc["targets"][1]["ratio_to_first"]) == set(PROFILE_STAGES)
    assert doc["cold_start"]["cli_entry_to_first_result_ms"] > 0
    for name in ("a", "b"):  # every frame kept, warm-up first
        assert all(len(res.series[name][s]) == 24 for s in PROFILE_STAGES)
    proc = doc["system"]["process"]
    assert proc["available"] and proc["rss_mb_max"] > 0
    import shutil

    if shutil.which("tegrastats") is None:
        assert doc["system"]["tegrastats"]["available"] is False and "tegrastats" in doc["system"]["tegrastats"]["reason"]
        assert doc["system"]["jetson"]["nvpmodel"]["available"] is False
    if not doc["system"]["gpu"]["available"]:
        assert doc["system"]["gpu"]["reason"]
    assert doc["targets"][0]["system"]["energy"]["available"] in (True, False)


def test_compare_catches_a_slowed_stage(bundle_dir: Path, tmp_path: Path) -> None:
    old = _profile(bundle_dir, frames=12, bootstrap=0).doc
    new = _profile(bundle_dir, frames=12, bootstrap=0, delay_s=0.004).doc  # 4 ms more in every infer call
    r = compare_profiles(old, new, max_regression=0.1)
    slowed = {x["stage"] for x in r["regressions"]}
    assert r["regressed"] and {"infer", "infer_only", "latency"} <= slowed
    assert not compare_profiles(old, old, max_regression=0.1)["regressed"]
    assert not compare_profiles(new, old, max_regression=0.1, min_delta_ms=1.0)["regressed"]  # faster is fine

    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    p = run_cli("profile", "compare", str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--max-regression", "0.1", timeout=60)
    assert p.returncode == 1, p.stderr
    assert "REGRESSION" in p.stderr and " infer:" in p.stderr and "REGRESSED" in p.stdout
    p = run_cli("profile", "compare", str(tmp_path / "old.json"), str(tmp_path / "old.json"), "--json", timeout=60)
    assert p.returncode == 0 and json.loads(p.stdout)["regressed"] is False
    (tmp_path / "bad.json").write_text("{}")
    p = run_cli("profile", "compare", str(tmp_path / "bad.json"), str(tmp_path / "old.json"), timeout=60)
    assert p.returncode == 2 and "not an edgeclf profile" in p.stderr


def test_batch_profile_infers_batches_and_reports_per_frame_times(bundle_dir: Path) -> None:
    calls: list = []

    def fn(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        time.sleep(0.02)  # per call, whatever its size: at batch 4 each frame's share is a quarter
        return np.tile(np.array([[0.1, 0.2, 0.3]], np.float32), (len(x), 1))

    def make(bundle, path, target, threads):  # type: ignore[no-untyped-def]
        return FakeBackend((1, 32, 32), 3, fn=fn)

    opts = ProfileOptions(source=SOURCE, frames=20, warmup=4, chunk=8, bootstrap=0, sample_interval_s=0.02,
                          run_options=RunOptions(batch=4))
    res = profile_bundles([ProfileTarget(str(bundle_dir), label="a")], opts, backend_factory=make)
    doc = json.loads(json.dumps(res.doc, allow_nan=False))
    _validate(doc)
    t = doc["targets"][0]
    assert doc["config"]["batch"] == 4 and t["batch"] == 4
    assert t["frames"] == 20 and t["stages_ms"]["infer"]["n"] == 20  # pipeline stages stay one value per frame
    # 24 frames through the pipeline (batches end early at the source's end and skip gated frames) and 24 infer-only
    # frames in 6 calls of 4: far fewer calls than frames
    assert max(calls) == 4 and calls.count(4) >= 6 and len(calls) < 24
    io = t["stages_ms"]["infer_only"]
    assert io["n"] == 5  # steady chunks of 8, 8, 4 frames: 2 + 2 + 1 calls, one value each
    assert 5.0 <= io["median"] < 20.0  # a 20 ms call over 4 frames: at least 5 ms a frame, not the whole call
    # a profile at another batch is not a baseline for this one
    base = _profile(bundle_dir, frames=8, bootstrap=0).doc
    assert base["targets"][0]["batch"] == 1
    with pytest.raises(ConfigError, match="batch 1 in the old profile and 4 in the new"):
        compare_profiles(base, doc)
    legacy = json.loads(json.dumps(base))
    del legacy["targets"][0]["batch"], legacy["config"]["batch"]  # profiles written before --batch ran at 1
    _validate(legacy)
    assert compare_profiles(legacy, base)["rows"]


def test_report_writes_labelled_plots_and_markdown(bundle_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    res = _profile(bundle_dir, labels=["a", "b"], frames=16, bootstrap=0)
    figs = build_figures(res)
    assert set(figs) == {f"hist_{s}.png" for s in PROFILE_STAGES} | {"timeline.png"}
    for name, fig in figs.items():
        ax = fig.axes[0]
        assert ax.get_title() and "(ms)" in (ax.get_xlabel() + ax.get_ylabel()), name
    tl = figs["timeline.png"].axes[0]
    assert tl.get_xlabel().startswith("frame index") and tl.get_ylabel() == "latency (ms)"
    assert any("warm-up" in t.get_text() for t in tl.get_legend().get_texts())
    written = write_report(res, str(tmp_path / "rep"))
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    assert len(pngs) == len(figs) and all(p.stat().st_size > 5000 for p in pngs)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert str(tmp_path / "rep" / "report.md") in written
    assert "| infer |" in md and "![timeline.png](timeline.png)" in md and "not available" in md


def test_rss_slope_from_a_synthetic_series() -> None:
    frames = np.arange(0, 20_001, 500)
    rss = 150.0 + 3e-4 * frames  # 3 MB per 10,000 frames
    assert rss_slope_mb_per_10k(frames, rss) == pytest.approx(3.0)
    noise = np.random.default_rng(0).normal(0, 0.05, frames.size)
    assert rss_slope_mb_per_10k(frames, rss + noise) == pytest.approx(3.0, abs=0.1)
    assert rss_slope_mb_per_10k(frames, np.full(frames.size, 150.0)) == pytest.approx(0.0)
    # An allocator step (heap trimmed and regrown) near the end of a flat run is not a trend for the
    # default estimator, while least squares reports it as one.
    flat = np.full(frames.size, 138.0)
    flat[-3:] = 150.0
    assert rss_slope_mb_per_10k(frames, flat) == pytest.approx(0.0)
    assert rss_slope_mb_per_10k(frames, flat, method="ls") > 1.0
    assert rss_slope_mb_per_10k(frames, rss, method="ls") == pytest.approx(3.0)
    assert rss_slope_mb_per_10k([5], [1.0]) is None and rss_slope_mb_per_10k([5, 5], [1.0, 2.0]) is None
    with pytest.raises(ValueError):
        rss_slope_mb_per_10k([1, 2], [1.0])


def test_latency_stats_and_ratios() -> None:
    v = np.arange(1.0, 101.0)
    s = latency_stats(v, n_boot=200)
    assert s["n"] == 100 and s["median"] == 50.5 and s["max"] == 100.0 and s["min"] == 1.0
    assert s["p90"] == pytest.approx(np.percentile(v, 90)) and s["std"] == pytest.approx(np.std(v, ddof=1))
    assert s["throughput_per_s"] == pytest.approx(1000 / 50.5)
    for q in ("median", "p90", "p99"):
        lo, hi = s["ci95"][q]
        assert lo <= s[q] <= hi
    assert latency_stats([])["n"] == 0 and latency_stats([], n_boot=0)["median"] is None
    r = ratio_ci(v, 2 * v, n_boot=200)
    assert r["median_ratio"] == pytest.approx(2.0) and r["ci95"][0] <= 2.0 <= r["ci95"][1]


def test_bad_options_are_config_errors(bundle_dir: Path) -> None:
    with pytest.raises(ConfigError, match="frames"):
        ProfileOptions(frames=0)
    with pytest.raises(ConfigError, match="bootstrap"):
        ProfileOptions(bootstrap=5)
    with pytest.raises(ConfigError, match="repeat"):
        profile_bundles([ProfileTarget(str(bundle_dir)), ProfileTarget(str(bundle_dir))], ProfileOptions(frames=1))
    with pytest.raises(ConfigError, match="schema_version"):
        p = Path(bundle_dir).parent / "v9.json"
        p.write_text(json.dumps({"kind": "edgeclf-profile", "schema_version": 9}))
        load_profile_json(str(p))


def test_cli_profile_json_on_onnx_runtime(bundle_dir: Path) -> None:
    p = run_cli("profile", "--bundle", str(bundle_dir), "--frames", "12", "--warmup", "3", "--chunk", "6", "--threads", "1",
                "--bootstrap", "100", "--source", SOURCE, "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # stdout holds the one document and nothing else
    _validate(doc)
    t = doc["targets"][0]
    assert t["backend"] == "ort-cpu" and t["threads"] == 1 and t["cold_start"]["session_ms"] > 0 and t["batch"] == 1
    assert doc["cold_start"]["process_start_to_first_result_ms"] >= doc["cold_start"]["cli_entry_to_first_result_ms"] > 0
    p = run_cli("profile", "--bundle", str(bundle_dir), "--frames", "8", "--warmup", "4", "--chunk", "8", "--threads", "1",
                "--bootstrap", "0", "--batch", "4", "--source", SOURCE, "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    _validate(doc)
    assert doc["config"]["batch"] == 4 and doc["targets"][0]["batch"] == 4 and doc["targets"][0]["frames"] == 8
    p = run_cli("profile", "--bundle", str(bundle_dir), "--batch", "65", timeout=60)
    assert p.returncode == 2 and "1 to 64" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("profile", timeout=60)
    assert p.returncode == 2 and "--bundle" in p.stderr


def test_profile_modules_import_no_torch() -> None:
    code = ("import sys, edgeclf.runtime.profile, edgeclf.runtime.tegrastats; "
            "bad = [m for m in ('torch', 'edgeclf.export', 'matplotlib', 'psutil') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------- tegrastats power credited to the right target

_POWER = {"a": 1000, "b": 5000}  # mW drawn while each target runs


class _PowerFollowsTheEngine:
    """Stands in for TegrastatsReader: a reading of the power of the target that is inferring, stamped with its
    arrival time as the real reader stamps each line, at most one per `interval_ms`. Readings come from the inference
    calls themselves, not a timer thread, so which target a reading belongs to does not depend on the host's load
    (a thread sampling "whoever inferred last" put the first ms of each chunk on the other target, a share that grew
    past the test's tolerance on a loaded 2-core host)."""

    samples: list = []
    interval_ms = 2

    def __init__(self, interval_ms: int = 100, executable: Any = None) -> None:
        self.available, self.executable, self.reason = True, "/stand-in/tegrastats", None

    @classmethod
    def read(cls, who: str) -> None:
        from edgeclf.runtime.tegrastats import TegraSample

        now = time.monotonic()
        if not cls.samples or (now - cls.samples[-1][0]) * 1e3 >= cls.interval_ms:
            cls.samples.append((now, TegraSample(rails_mw={"VDD_IN": (_POWER[who], _POWER[who])})))

    def start(self) -> _PowerFollowsTheEngine:
        return self

    def close(self) -> None:
        pass

    def snapshot(self) -> list:
        return list(self.samples)


def test_tegrastats_power_goes_to_the_target_running_when_it_was_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast engines (short chunks): each reading belongs to the target running when it arrived. The old code
    credited a reading to the latest process sample, taken at the end of the previous chunk, so the start of each
    chunk (and the infer-only pass) went to the other target: about 1640 and 4370 mW for a true 1000 and 5000."""
    import edgeclf.runtime.tegrastats as tg
    from tests.runtime.tiny_bundle import make_tiny_bundle

    monkeypatch.setattr(tg, "TegrastatsReader", _PowerFollowsTheEngine)
    monkeypatch.setattr(_PowerFollowsTheEngine, "samples", [])
    bundle = make_tiny_bundle(tmp_path / "b")

    def factory(b, path, target, threads):  # type: ignore[no-untyped-def]
        def fn(x: np.ndarray) -> np.ndarray:
            time.sleep(0.0005)
            _PowerFollowsTheEngine.read(target.label)
            return np.tile(np.array([[0.1, 0.2, 0.3]], np.float32), (len(x), 1))
        return FakeBackend((1, 8, 8), 3, fn=fn)

    # Several chunks per target, so that the old attribution (by the latest process sample) would mix them.
    opts = ProfileOptions(source="synthetic:ultrasound?frames=2000&size=64", frames=150, warmup=10, chunk=50, bootstrap=0,
                          infer_only=False)  # chunks of the two targets back to back: a late attribution mixes them
    doc = profile_bundles([ProfileTarget(str(bundle), label="a"), ProfileTarget(str(bundle), label="b")], opts,
                          backend_factory=factory).doc
    got = {t["name"]: t["system"]["energy"] for t in doc["targets"]}
    for name, e in got.items():
        assert e["power_mw_mean"] == pytest.approx(_POWER[name]), {n: g["power_mw_mean"] for n, g in got.items()}
        assert e["available"] and e["module_input_power"] is True and e["source"] == "tegrastats VDD_IN (module input power)"
        assert e["samples"] > 0 and "arrived" in e["attribution"]
        assert e["energy_per_inference_mj"] == pytest.approx(e["power_mw_mean"] / doc["targets"][0 if name == "a" else 1]["fps"])
    _validate(doc)


def test_readings_are_credited_by_arrival_time_not_split() -> None:
    from edgeclf.runtime.profile import _target_power
    from edgeclf.runtime.tegrastats import TegraSample

    def reading(t: float, mw: int) -> Any:
        return (t, TegraSample(rails_mw={"VDD_IN": (mw, mw)}))

    timeline = [(0.0, 0, "steady"), (1.0, 0, "steady_infer_only"), (1.2, 1, "steady"), (2.2, 1, "steady_infer_only"),
                (2.4, None, "done")]
    readings = [reading(-0.1, 9), reading(0.5, 1000), reading(1.1, 7), reading(1.25, 5000), reading(2.0, 5000),
                reading(2.3, 7), reading(3.0, 9)]
    p0, f0 = _target_power(readings, timeline, 0)
    p1, f1 = _target_power(readings, timeline, 1)
    assert (p0, len(f0)) == (1000.0, 1) and (p1, len(f1)) == (5000.0, 2)  # infer-only, set-up and after: nobody's
    assert _target_power(readings, timeline, 2) == (None, [])


def test_readings_that_arrive_in_bursts_are_not_attributed() -> None:
    from edgeclf.runtime.profile import _bursty

    steady = [(i * 0.1, None) for i in range(20)]
    burst = [(i // 10 * 1.0 + (i % 10) * 0.0001, None) for i in range(20)]  # ten lines at once, once a second
    assert _bursty(steady, 100) is None and _bursty(steady, None) is None
    why = _bursty(burst, 100)
    assert why is not None and "bursts" in why and "buffered" in why


# ------------------------------------------------------------------------------- review fixes (figures, compare)

def _fake(delays: Dict[str, float], cpu: Any = None) -> Any:
    """A backend factory: target label -> seconds per inference call; `cpu`: a stand-in process clock charged
    with target "a"'s inference time."""
    def make(b, path, target, threads):  # type: ignore[no-untyped-def]
        delay = delays.get(target.label or "", 0.0)

        def fn(x: np.ndarray) -> np.ndarray:
            if delay:
                time.sleep(delay)
                if cpu is not None and target.label == "a":
                    cpu[0] += delay
            return np.tile(np.linspace(0.1, 0.3, b.manifest.num_outputs, dtype=np.float32), (len(x), 1))
        m = b.manifest
        return FakeBackend((m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs, fn=fn)
    return make


def test_infer_only_histogram_holds_every_steady_value_at_batch_4(bundle_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    opts = ProfileOptions(source="synthetic:ultrasound?frames=40&size=64", frames=32, warmup=8, chunk=8, bootstrap=0,
                          sample_interval_s=0.05, run_options=RunOptions(batch=4))
    res = profile_bundles([ProfileTarget(str(bundle_dir), label="a")], opts, backend_factory=_fake({}))
    assert res.warmup["a"]["infer_only"] == 2 and res.warmup["a"]["latency"] == 8  # 8 frames = 2 calls of 4
    figs = build_figures(res)
    for stage in ("infer_only", "latency"):
        n_doc = res.doc["targets"][0]["stages_ms"][stage]["n"]
        n_plotted = int(sum(p.get_height() for p in figs[f"hist_{stage}.png"].axes[0].patches))
        assert n_plotted == n_doc, (stage, n_plotted, n_doc)


def test_infer_stage_statistics_hold_only_inferred_frames(bundle_dir: Path, tmp_path: Path) -> None:
    import cv2

    from edgeclf.runtime.synthetic import make_ultrasound

    imgs, _ = make_ultrasound(6, size=64, seed=0)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):  # every other frame blank (probe lifted): gated, not inferred
        cv2.imwrite(str(folder / f"f{i:02d}.png"), imgs[i // 2] if i % 2 == 0 else np.zeros((64, 64), np.uint8))
    opts = ProfileOptions(source=str(folder), frames=24, warmup=0, chunk=12, bootstrap=0, sample_interval_s=0.05)
    res = profile_bundles([ProfileTarget(str(bundle_dir), label="a")], opts, backend_factory=_fake({"a": 0.005}))
    t = res.doc["targets"][0]
    infer = t["stages_ms"]["infer"]
    assert t["frames"] == 24 and t["frames_not_inferred"] == 12  # the gated frames are counted, not timed as 0 ms
    assert infer["n"] == 12 and infer["min"] >= 5.0 and infer["median"] >= 5.0, infer
    assert t["stages_ms"]["latency"]["n"] == 24 and t["stages_ms"]["capture"]["n"] == 24  # other stages: every frame


def test_second_targets_time_to_first_result_is_its_own_with_warmup_0(bundle_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A virtual clock: perf_counter plus the 10 s each of a's inferences "takes" (no sleeping), so that a's chunk
    # (20 frames, 200 s) is told from b's own set-up and first frame however slow the machine is.
    real_clock, spent = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + spent[0])

    def make(b, path, target, threads):  # type: ignore[no-untyped-def]
        m = b.manifest

        def fn(x: np.ndarray) -> np.ndarray:
            if target.label == "a":
                spent[0] += 10.0
            return np.tile(np.linspace(0.1, 0.3, m.num_outputs, dtype=np.float32), (len(x), 1))
        return FakeBackend((m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs, fn=fn)

    opts = ProfileOptions(source="synthetic:ultrasound?frames=40&size=64", frames=20, warmup=0, chunk=20, bootstrap=0,
                          sample_interval_s=0.05, infer_only=False)
    doc = profile_bundles([ProfileTarget(str(bundle_dir), label="a"), ProfileTarget(str(bundle_dir), label="b")], opts,
                          backend_factory=make).doc
    a, b = doc["targets"]
    # a's first result waited for its first (10 s) inference; b's did not wait for any of a's
    assert a["cold_start"]["time_to_first_result_ms"] >= 10_000, a["cold_start"]
    assert b["cold_start"]["time_to_first_result_ms"] < 10_000, b["cold_start"]
    assert "left out" in b["cold_start"]["first_result_frame"]
    assert a["frames"] == b["frames"] == 20 and a["stages_ms"]["latency"]["n"] == 20  # the cold frame is in no other figure
    assert a["warmup"]["stages_ms"]["latency"]["n"] == 0


def test_an_idle_target_is_not_credited_with_the_busy_targets_cpu(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = [0.0]
    monkeypatch.setitem(sys.modules, "psutil", None)  # the stdlib probe: process_time deltas
    # A stand-in process clock: only target a's inference burns CPU (a wall second of a's work = a CPU second).
    monkeypatch.setattr(time, "process_time", lambda: cpu[0])
    opts = ProfileOptions(source="synthetic:ultrasound?frames=200&size=32", frames=60, warmup=2, chunk=10, bootstrap=0,
                          sample_interval_s=0.03)
    doc = profile_bundles([ProfileTarget(str(bundle_dir), label="a"), ProfileTarget(str(bundle_dir), label="b")], opts,
                          backend_factory=_fake({"a": 0.01, "b": 0.01}, cpu)).doc
    got = {t["name"]: t["system"]["cpu_percent_mean"] for t in doc["targets"]}
    assert got["a"] > 20 and got["b"] < 5, got  # b used no CPU on this clock: the first sample of its chunk is not a's tail


def _doc(threads: Any, machine: str, median: float, gpu: Any = None) -> Dict[str, Any]:
    stats = {"n": 500, "median": median}
    return {"schema_version": 1, "kind": "edgeclf-profile",
            "host": {"platform": f"Linux-{machine}", "machine": machine, "cpu_count": 8, "python": "3.10", "edgeclf": "x"},
            "config": {"threads": threads, "batch": 1}, "system": {"gpu": {"name": gpu}},
            "targets": [{"name": "tiny:ort-cpu:deploy", "batch": 1, "threads": threads, "backend": "ort-cpu",
                         "stages_ms": {"infer": dict(stats), "latency": dict(stats)}}]}


def test_compare_refuses_other_thread_counts() -> None:
    with pytest.raises(ConfigError, match="threads 4 in the old profile and 1 in the new one.*same --threads"):
        compare_profiles(_doc(4, "x86_64", 2.0), _doc(1, "x86_64", 6.0))  # 3x slower on 1 thread: not a regression
    with pytest.raises(ConfigError, match="threads default"):
        compare_profiles(_doc(None, "x86_64", 2.0), _doc(4, "x86_64", 2.0))


def test_compare_refuses_another_machine_unless_allowed_and_then_says_so() -> None:
    old, new = _doc(4, "x86_64", 2.0), _doc(4, "aarch64", 6.0)  # workstation baseline vs a Jetson run
    with pytest.raises(ConfigError, match=r"different machines \(machine: 'x86_64' -> 'aarch64'.*--allow-other-host"):
        compare_profiles(old, new)
    with pytest.raises(ConfigError, match="GPU: 'NVIDIA A2' -> 'NVIDIA L4'"):
        compare_profiles(_doc(4, "x86_64", 2.0, "NVIDIA A2"), _doc(4, "x86_64", 2.0, "NVIDIA L4"))
    r = compare_profiles(old, new, allow_other_host=True)
    assert r["regressed"] and r["host_differences"] and "different machines" in r["warnings"][0]
    same = compare_profiles(old, _doc(4, "x86_64", 2.0))
    assert same["host_differences"] == [] and same["warnings"] == []


def test_compare_tells_machines_apart_by_cpu_and_takes_a_kernel_update_as_a_warning() -> None:
    def doc(cpu: Any, plat: str) -> Dict[str, Any]:
        d = _doc(4, "x86_64", 2.0)
        d["host"].update(cpu=cpu, platform=plat)
        return d

    with pytest.raises(ConfigError, match="cpu: 'AMD EPYC 7B13' -> 'Intel Xeon'"):
        compare_profiles(doc("AMD EPYC 7B13", "Linux-6.1"), doc("Intel Xeon", "Linux-6.1"))
    r = compare_profiles(doc("AMD EPYC 7B13", "Linux-6.1"), doc("AMD EPYC 7B13", "Linux-6.8"))  # same cart, new kernel
    assert r["host_differences"] == [] and "kernel" in r["warnings"][0]
    old = _doc(4, "x86_64", 2.0)  # recorded before the CPU model was: that fact is not compared
    assert compare_profiles(old, doc("AMD EPYC 7B13", "Linux-x86_64"))["host_differences"] == []


def test_a_profile_records_the_cpu_model() -> None:
    from edgeclf.runtime.profile import _cpu_model

    m = _cpu_model()
    assert m is None or (isinstance(m, str) and m)
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        assert m and m in Path("/proc/cpuinfo").read_text()


def test_bundles_in_folders_of_one_name_are_told_apart_not_refused(bundle_dir: Path, tmp_path: Path) -> None:
    # runs/a/bundle and runs/b/bundle is the usual layout; their names used to collide ("targets repeat").
    import shutil

    a, b = tmp_path / "a" / "bundle", tmp_path / "b" / "bundle"
    shutil.copytree(bundle_dir, a)
    shutil.copytree(bundle_dir, b)
    opts = ProfileOptions(source=SOURCE, frames=4, warmup=1, chunk=4, bootstrap=0, sample_interval_s=0.02)
    doc = profile_bundles([ProfileTarget(str(a)), ProfileTarget(str(b))], opts, backend_factory=_factory()).doc
    assert [t["name"] for t in doc["targets"]] == ["a/bundle:ort-cpu:deploy", "b/bundle:ort-cpu:deploy"]
    # One folder given twice is still a repeat, by whatever path it was given.
    with pytest.raises(ConfigError, match="repeat"):
        profile_bundles([ProfileTarget(str(a)), ProfileTarget(str(tmp_path / "b" / ".." / "a" / "bundle"))], opts,
                        backend_factory=_factory())
