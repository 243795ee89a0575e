"""`edgeclf profile` measures what `edgeclf run` does, and `profile compare` fails on what it should, not on noise.

Timings here are sleeps of a fake source and backend, judged with gaps of 1.5x or more (a training may share the cores).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest

from edgeclf.errors import ConfigError
from edgeclf.runtime.backends import FakeBackend
from edgeclf.runtime.pipeline import RunOptions
from edgeclf.runtime.profile import ProfileOptions, ProfileTarget, compare_profiles, profile_bundles
from tests.conftest import run_cli
from tests.runtime.tiny_bundle import make_tiny_bundle


def _factory(fn: Optional[Callable[[np.ndarray], np.ndarray]] = None):  # type: ignore[no-untyped-def]
    def make(bundle, model_path, target, threads):  # type: ignore[no-untyped-def]
        m = bundle.manifest
        f = fn or (lambda x: np.zeros((x.shape[0], m.num_outputs), np.float32))
        return FakeBackend((m.preprocess.channels,) + tuple(m.preprocess.size), m.num_outputs, fn=f)

    return make


def _sleeping(seconds: float) -> Callable[[np.ndarray], np.ndarray]:
    def fn(x: np.ndarray) -> np.ndarray:
        time.sleep(seconds)
        return np.zeros((x.shape[0], 3), np.float32)

    return fn


# ---------------------------------------------------------------------------------------- the profile's own run

def test_the_sector_locks_once_not_at_every_interleaved_chunk(tmp_path: Path) -> None:
    """Chunks of 10 after a 10-frame warm-up: every steady frame is inferred, as in one continuous `edgeclf run`
    (before, each chunk started the sector detector afresh and 7 of its 10 frames abstained with sector_warmup)."""
    bundle = make_tiny_bundle(tmp_path / "tiny")
    opts = ProfileOptions(source="synthetic:ultrasound?frames=200&size=128", frames=40, warmup=10, chunk=10, bootstrap=0,
                          sample_interval_s=0.05, run_options=RunOptions(roi="sector", quality=False))
    doc = profile_bundles([ProfileTarget(str(bundle), label="a"), ProfileTarget(str(bundle), label="b")], opts,
                          backend_factory=_factory()).doc
    for t in doc["targets"]:
        assert t["frames"] == 40 and t["frames_not_inferred"] == 0, t["frames_not_inferred"]
        assert t["stages_ms"]["infer"]["n"] == 40


def test_pipeline_state_carries_the_sector_lock_from_call_to_call(tmp_path: Path) -> None:
    from edgeclf.runtime.bundle import load_bundle
    from edgeclf.runtime.pipeline import PipelineState, run_pipeline
    from edgeclf.runtime.sinks import Sink
    from edgeclf.runtime.sources import open_source

    class Keep(Sink):
        def __init__(self) -> None:
            self.records: list = []

        def write(self, record: Dict[str, Any], image: Any = None) -> None:
            self.records.append(record)

    b = load_bundle(str(make_tiny_bundle(tmp_path / "tiny")))
    be = _factory()(b, "", None, None)
    opts = RunOptions(roi="sector", quality=False, pipelined=False)
    state = PipelineState()
    with open_source("synthetic:ultrasound?frames=60&size=128") as src:
        first = run_pipeline(b, src, be, [Keep()], max_frames=20, options=opts, state=state)
        second = run_pipeline(b, src, be, [Keep()], max_frames=20, options=opts, state=state)
        fresh = run_pipeline(b, src, be, [Keep()], max_frames=20, options=opts)  # `edgeclf run`: no state, a fresh start
    assert first.extra["sector_warmup"] > 0 and second.extra["sector_warmup"] == 0
    assert fresh.extra["sector_warmup"] == first.extra["sector_warmup"]
    with open_source("synthetic:ultrasound?frames=5&size=128") as src, pytest.raises(ValueError, match="same bundle, options"):
        run_pipeline(b, src, be, [Keep()], options=RunOptions(roi="none", quality=False), state=state)


def test_profile_runs_opencv_on_one_thread_as_run_does_and_restores_it(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    before = cv2.getNumThreads()
    cv2.setNumThreads(4)  # whatever this machine's default: a pool of several threads
    seen = []

    def fn(x: np.ndarray) -> np.ndarray:
        seen.append(cv2.getNumThreads())
        return np.zeros((x.shape[0], 3), np.float32)

    try:
        opts = ProfileOptions(source="synthetic:ultrasound?frames=40&size=64", frames=10, warmup=2, chunk=5, bootstrap=0,
                              sample_interval_s=0.05, infer_only=False)
        doc = profile_bundles([ProfileTarget(str(make_tiny_bundle(tmp_path / "tiny")))], opts, backend_factory=_factory(fn)).doc
        assert seen and set(seen) == {1}, sorted(set(seen))
        assert cv2.getNumThreads() == 4  # restored
        assert doc["config"]["opencv_threads"] == 1
    finally:
        cv2.setNumThreads(before)


def test_frame_is_the_time_per_frame_not_the_sum_of_overlapping_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source taking 25 ms a read (feeder thread) and a backend taking 25 ms a call (consumer) overlap: about 25 ms
    a frame. "frame" was their sum (~50 ms) and its throughput half the fps."""
    import edgeclf.runtime.profile as prof

    real_open = prof.open_source

    class Slow:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def read(self, *a: Any) -> Any:
            time.sleep(0.025)
            return self.inner.read(*a)

        def __getattr__(self, k: str) -> Any:
            return getattr(self.inner, k)

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *a: Any) -> None:
            self.inner.close()

    monkeypatch.setattr(prof, "open_source", lambda uri: Slow(real_open(uri)))
    opts = ProfileOptions(source="synthetic:ultrasound?frames=100&size=64", frames=24, warmup=2, chunk=12, bootstrap=0,
                          sample_interval_s=0.05, infer_only=False, run_options=RunOptions(quality=False))
    t = profile_bundles([ProfileTarget(str(make_tiny_bundle(tmp_path / "tiny")))], opts,
                        backend_factory=_factory(_sleeping(0.025))).doc["targets"][0]
    st = t["stages_ms"]
    assert st["frame"]["n"] == 24  # one value per frame
    assert st["capture"]["median"] >= 25 and st["infer"]["median"] >= 25
    assert st["frame"]["median"] < 0.75 * (st["capture"]["median"] + st["infer"]["median"]), st["frame"]
    assert st["frame"]["median"] <= 1.5 * 1000.0 / t["fps"], (st["frame"]["median"], t["fps"])
    assert st["frame"]["throughput_per_s"] == pytest.approx(t["fps"], rel=0.3)  # every frame's time: the wall's


def test_compare_leaves_out_frame_against_a_profile_where_it_was_the_stages_sum(tmp_path: Path) -> None:
    opts = ProfileOptions(source="synthetic:ultrasound?frames=40&size=64", frames=8, warmup=2, chunk=8, bootstrap=0,
                          sample_interval_s=0.05, infer_only=False)
    new = profile_bundles([ProfileTarget(str(make_tiny_bundle(tmp_path / "tiny")), label="a")], opts,
                          backend_factory=_factory()).doc
    assert new["config"]["frame_stage"] == "result_interval"
    old = copy.deepcopy(new)
    del old["config"]["frame_stage"], old["config"]["opencv_threads"]  # written before: frame was the stages' sum
    old["targets"][0]["stages_ms"]["frame"]["median"] = 1e-6  # so that any comparison of it would fail
    r = compare_profiles(old, new)
    assert "frame" not in {x["stage"] for x in r["rows"]} and not r["regressed"]
    assert any("frame is not compared" in w for w in r["warnings"])
    assert "frame" in {x["stage"] for x in compare_profiles(new, copy.deepcopy(new))["rows"]}


def test_frame_at_batch_4_is_a_share_of_the_batch_not_the_gaps_inside_it(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """At batch 4 results come 4 at a time: a frame's time is the span of 4 results over 4 (a 20 s call: >= 5 s),
    neither the gaps between results of one batch (~0) nor the whole call.

    The call's 20 s are spent on a virtual clock (time.perf_counter plus what the fake spent), without sleeping: the
    10 s between a share and the bound are slack for the real overhead, however loaded the machine."""
    real_clock, spent = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + spent[0])

    def call(x: np.ndarray) -> np.ndarray:
        spent[0] += 20.0
        return np.zeros((x.shape[0], 3), np.float32)

    opts = ProfileOptions(source="synthetic:ultrasound?frames=100&size=64", frames=32, warmup=8, chunk=16, bootstrap=0,
                          sample_interval_s=0.05, infer_only=False, run_options=RunOptions(quality=False, batch=4))
    t = profile_bundles([ProfileTarget(str(make_tiny_bundle(tmp_path / "tiny")))], opts,
                        backend_factory=_factory(call)).doc["targets"][0]
    assert t["batch"] == 4
    assert 5000.0 <= t["stages_ms"]["frame"]["median"] < 15000.0, t["stages_ms"]["frame"]


# ------------------------------------------------------------------------------------------------ profile compare

def _stats(median: Optional[float], ci: Optional[tuple] = None) -> Dict[str, Any]:
    if median is None:
        return {"n": 0, "mean": None, "std": None, "min": None, "median": None, "p90": None, "p99": None, "max": None,
                "throughput_per_s": None, "ci95": None}
    return {"n": 100, "mean": median, "std": 0.0, "min": median, "median": median, "p90": median, "p99": median,
            "max": median, "throughput_per_s": 1000.0 / median,
            "ci95": None if ci is None else {"median": list(ci), "p90": list(ci), "p99": list(ci)}}


def _doc(targets: Dict[str, Dict[str, Any]], *, gpu: Optional[str] = None, config: Optional[Dict[str, Any]] = None,
         not_inferred: int = 0) -> Dict[str, Any]:
    """targets: name -> stage -> median or (median, (ci low, ci high))."""
    def stage(v: Any) -> Dict[str, Any]:
        return _stats(v[0], v[1]) if isinstance(v, tuple) else _stats(v)

    return {
        "schema_version": 1, "kind": "edgeclf-profile",
        "host": {"machine": "x86_64", "cpu": "AMD EPYC", "cpu_count": 2, "platform": "Linux-6", "python": "3.10", "edgeclf": "x"},
        "config": config or {"source": "synthetic:ultrasound?frames=550", "quality": True, "roi": None, "smoothing": "auto",
                             "threads": 2, "batch": 1},
        "system": {"gpu": {"available": gpu is not None, "name": gpu, "reason": None if gpu else "pynvml is not installed"}},
        "targets": [{"name": n, "batch": 1, "threads": 2, "frames": 100, "frames_not_inferred": not_inferred,
                     "stages_ms": {k: stage(v) for k, v in st.items()}} for n, st in targets.items()],
    }


def test_compare_does_not_fail_on_noise_its_intervals_cover() -> None:
    """Two back-to-back profiles of the same code: capture 1.882 (1.484-2.369) -> 2.634 (2.060-2.977) ms, +40%."""
    old = _doc({"a": {"capture": (1.882, (1.484, 2.369)), "infer": (5.0, (4.9, 5.1))}})
    new = _doc({"a": {"capture": (2.634, (2.060, 2.977)), "infer": (5.0, (4.9, 5.1))}})
    r = compare_profiles(old, new)
    assert not r["regressed"] and r["regressions"] == []
    row = next(x for x in r["rows"] if x["stage"] == "capture")
    assert row["status"] == "inconclusive" and not row["regressed"]
    assert [x["stage"] for x in r["inconclusive"]] == ["capture"]
    assert any("capture" in w and "inconclusive" in w for w in r["warnings"]), r["warnings"]


def test_compare_fails_a_slow_down_its_intervals_separate_and_without_intervals_on_medians() -> None:
    old = _doc({"a": {"infer": (5.0, (4.9, 5.1))}})
    new = _doc({"a": {"infer": (6.0, (5.8, 6.2))}})  # +20%, intervals apart
    r = compare_profiles(old, new)
    assert r["regressed"] and r["regressions"][0]["status"] == "regressed"
    assert not compare_profiles(old, new, max_regression=0.25)["regressed"]  # within the allowed slow-down
    # --bootstrap 0 (no intervals): the medians alone decide, as before
    assert compare_profiles(_doc({"a": {"infer": 5.0}}), _doc({"a": {"infer": 6.0}}))["regressed"]
    assert compare_profiles(_doc({"a": {"infer": (5.0, (4.9, 5.1))}}), _doc({"a": {"infer": 6.0}}))["regressed"]


def test_compare_fails_on_a_target_missing_from_the_new_profile_unless_allowed(tmp_path: Path) -> None:
    old = _doc({"a": {"infer": 5.0}, "b": {"infer": 5.0}})
    new = _doc({"a": {"infer": 5.0}})
    r = compare_profiles(old, new)
    assert r["regressed"] and r["missing"] == [{"target": "b", "stage": None}]
    assert any("target b" in w and "missing" in w for w in r["warnings"])
    allowed = compare_profiles(old, new, allow_missing=True)
    assert not allowed["regressed"] and allowed["missing"] and allowed["warnings"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    p = run_cli("profile", "compare", str(tmp_path / "old.json"), str(tmp_path / "new.json"), timeout=60)
    assert p.returncode == 1 and "target b" in p.stderr, (p.returncode, p.stderr)


def test_compare_fails_on_a_stage_with_no_median_now_and_warns_on_more_frames_not_inferred() -> None:
    """A gate that turns every frame away: no infer median, and every other stage looks faster."""
    old = _doc({"a": {"infer": 5.0, "frame": 7.0, "latency": 8.0}})
    new = _doc({"a": {"infer": None, "frame": 2.0, "latency": 3.0}}, not_inferred=100)
    r = compare_profiles(old, new)
    assert r["regressed"] and r["missing"] == [{"target": "a", "stage": "infer"}]
    assert any("infer" in w and "none in the new" in w for w in r["warnings"])
    assert any("100 of 100 steady frames were not inferred" in w for w in r["warnings"]), r["warnings"]
    some = compare_profiles(old, _doc({"a": {"infer": 5.0, "frame": 6.0, "latency": 7.0}}, not_inferred=30))
    assert not some["regressed"] and any("30 of 100" in w for w in some["warnings"])
    assert compare_profiles(old, copy.deepcopy(old))["warnings"] == []


def test_compare_takes_a_gpu_name_recorded_in_one_profile_only_as_not_recorded() -> None:
    st = {"infer": 5.0}
    assert compare_profiles(_doc({"a": st}), _doc({"a": st}, gpu="NVIDIA H100"))["host_differences"] == []
    assert compare_profiles(_doc({"a": st}, gpu="NVIDIA H100"), _doc({"a": st}))["host_differences"] == []
    with pytest.raises(ConfigError, match="GPU: 'NVIDIA A2' -> 'NVIDIA L4'"):
        compare_profiles(_doc({"a": st}, gpu="NVIDIA A2"), _doc({"a": st}, gpu="NVIDIA L4"))


def test_compare_refuses_another_pipeline_configuration_unless_allowed() -> None:
    base = {"source": "synthetic:ultrasound?frames=550", "quality": True, "roi": None, "smoothing": "auto", "opencv_threads": 1}
    old = _doc({"a": {"preprocess": 0.30}}, config=dict(base, quality=False))
    new = _doc({"a": {"preprocess": 0.45}}, config=base)
    with pytest.raises(ConfigError, match=r"different pipelines \(quality: False -> True\).*--allow-other-config") as e:
        compare_profiles(old, new)
    assert "\n" not in str(e.value)
    r = compare_profiles(old, new, allow_other_config=True)
    assert r["config_differences"] == ["quality: False -> True"] and "different pipelines" in r["warnings"][0]
    for k, v in (("roi", "sector"), ("smoothing", "off"), ("source", "synthetic:ultrasound?frames=550&size=512"),
                 ("opencv_threads", None)):
        with pytest.raises(ConfigError, match=f"{k}: "):
            compare_profiles(_doc({"a": {"infer": 1.0}}, config=base), _doc({"a": {"infer": 1.0}}, config=dict(base, **{k: v})))
    # Not differences: another --frames of the default synthetic source, a setting an older profile did not record
    longer = dict(base, source="synthetic:ultrasound?frames=2050")
    assert compare_profiles(_doc({"a": {"infer": 1.0}}, config=base), _doc({"a": {"infer": 1.0}}, config=longer))["config_differences"] == []
    older = {k: v for k, v in base.items() if k != "opencv_threads"}
    assert compare_profiles(_doc({"a": {"infer": 1.0}}, config=older), _doc({"a": {"infer": 1.0}}, config=base))["config_differences"] == []
