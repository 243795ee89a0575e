from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from edgeclf.runtime.app import run_bundle, verify_bundle
from edgeclf.runtime.backends import FakeBackend
from edgeclf.runtime.bundle import load_bundle
from edgeclf.runtime.pipeline import STAGES, run_pipeline
from edgeclf.runtime.sinks import JsonlSink, ListSink
from edgeclf.runtime.sources import open_source

REPO = Path(__file__).resolve().parents[2]


def test_every_frame_gives_one_whole_record(bundle_dir: Path, tmp_path: Path) -> None:
    b = load_bundle(bundle_dir)
    out = tmp_path / "r.jsonl"
    with FakeBackend((1, 32, 32), 3) as be, open_source("synthetic:ultrasound?frames=25&size=96") as src:
        mem = ListSink()
        s = run_pipeline(b, src, be, [mem, JsonlSink(out)])
    lines = out.read_text().splitlines()
    assert s.frames == 25 and s.written == 25 and len(lines) == 25
    recs = [json.loads(ln) for ln in lines]
    assert [r["frame"] for r in recs] == list(range(25))
    for r in recs:
        # Cine smoothing: the shown label may wait ("settling") while each frame still has its own decision.
        assert r["frame_label"] in ("normal", "cyst", "mass") and r["quality"] == []
        assert r["label"] in ("normal", "cyst", "mass") or (r["abstain"] and r["abstain_reason"] == "settling")
        assert abs(sum(r["probs"].values()) - 1) < 1e-5
        assert set(r["latency_ms"]) == {"capture", "preprocess", "infer", "postprocess", "total"}
        assert r["latency_ms"]["total"] >= r["latency_ms"]["infer"]
    stats = s.to_dict()["stages_ms"]
    assert set(stats) == set(STAGES) | {"latency"} and all(v["n"] == 25 for v in stats.values())


def test_stage_times_put_inference_alone_in_infer(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import edgeclf.runtime.pipeline as pl

    # A virtual clock: perf_counter plus the time the fakes "spend" (1 s inferring, 10 s in the softmax), no sleeping;
    # the 9 s between the two is slack for the real overhead, however loaded the machine.
    real_clock, spent = time.perf_counter, [0.0]
    monkeypatch.setattr(pl.time, "perf_counter", lambda: real_clock() + spent[0])
    real = pl.frame_probabilities  # the per-frame softmax of a multiclass bundle

    def slow_probabilities(*a, **k):  # type: ignore[no-untyped-def]
        spent[0] += 10.0
        return real(*a, **k)

    def slow_infer(x: np.ndarray) -> np.ndarray:
        spent[0] += 1.0
        return np.zeros((len(x), 3), np.float32)

    monkeypatch.setattr(pl, "frame_probabilities", slow_probabilities)
    with FakeBackend((1, 32, 32), 3, fn=slow_infer) as be, open_source("synthetic:ultrasound?frames=3") as src:
        mem = ListSink()
        run_pipeline(load_bundle(bundle_dir), src, be, [mem])
    # Softmax, temperature and the decision are postprocessing, not inference.
    assert len(mem.records) == 3  # the checks below must have records to hold for
    for r in mem.records:
        assert 1000 <= r["latency_ms"]["infer"] < 10000 and r["latency_ms"]["postprocess"] >= 10000, r["latency_ms"]


def test_fake_backend_logits_drive_the_decision(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    # Class 2 ("mass") always wins by a wide margin.
    with FakeBackend((1, 32, 32), 3, fn=lambda x: np.tile(np.array([[-9, -9, 9]], np.float32), (len(x), 1))) as be, \
            open_source("synthetic:ultrasound?frames=5") as src:
        mem = ListSink()
        run_pipeline(b, src, be, [mem])
    assert [r["frame_label"] for r in mem.records] == ["mass"] * 5
    assert {r["label"] for r in mem.records} <= {"mass", None}  # shown once the smoother settles


def test_run_bundle_writes_as_many_lines_as_frames(bundle_dir: Path, tmp_path: Path) -> None:
    from edgeclf.runtime.synthetic import write_cine

    video = tmp_path / "c.mp4"
    tl = write_cine(video, timeline=[(0, 12), (1, 13)], size=96, fps=10)
    s = run_bundle(str(bundle_dir), str(video), out=str(tmp_path / "r.jsonl"))
    assert s["frames"] == tl["frames"] == 25 == len((tmp_path / "r.jsonl").read_text().splitlines())
    assert s["frame_count_claimed"] == 25


def test_run_clip_decision_equals_offline_aggregation_of_its_records(bundle_dir: Path, tmp_path: Path) -> None:
    from edgeclf.runtime.clips import aggregate_records
    from edgeclf.runtime.synthetic import write_cine

    video = tmp_path / "c.mp4"
    write_cine(video, timeline=[(0, 10), (1, 10), (2, 10)], size=96, fps=10)
    m = load_bundle(bundle_dir).manifest
    for floor in (0.0, 0.999):  # every frame used; every frame below the confidence floor (this model is unsure)
        out, clip = tmp_path / f"r{floor}.jsonl", tmp_path / f"clip{floor}.json"
        s = run_bundle(str(bundle_dir), str(video), out=str(out), summary_path=str(clip), min_confidence=floor)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        offline = aggregate_records(records, m.labels, rule=m.decision, min_confidence=floor).to_dict()
        assert s["clip"]["decision"] == offline == json.loads(clip.read_text())["decision"]
        assert offline["frames"] == 30 and sum(offline["votes"].values()) == offline["used"]
        if floor == 0.0:
            assert offline["used"] == 30 and offline["mean_label"] in m.labels and offline["vote_label"] in m.labels
        else:
            assert offline["abstained"] == 30 and offline["mean_label"] is None


def test_verify_bundle_rechecks_reference_outputs(bundle_dir: Path) -> None:
    r = verify_bundle(str(bundle_dir))
    assert r["reference"]["n"] > 0 and r["reference"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("module", ["edgeclf.runtime", "edgeclf.runtime.app", "edgeclf.runtime.pipeline", "edgeclf.runtime.sources",
                                    "edgeclf.runtime.live", "edgeclf.runtime.watch", "edgeclf.runtime.dicom", "edgeclf.runtime.sector",
                                    "edgeclf.runtime.quality", "edgeclf.runtime.smoothing", "edgeclf.runtime.sinks", "edgeclf.runtime.overlay",
                                    "edgeclf.devices"])
def test_runtime_never_imports_torch(module: str) -> None:
    code = f"import sys, {module}; bad = [m for m in ('torch', 'edgeclf.export', 'sklearn') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_run_help_loads_no_torch() -> None:
    code = ("import sys; from edgeclf.cli import main\n"
            "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "sys.exit('torch' in sys.modules or 'onnxruntime' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--bundle" in r.stdout, r.stderr


def _const_backend(k: int = 2):
    logits = np.full((1, 3), -9.0, np.float32)
    logits[0, k] = 9.0
    return FakeBackend((1, 32, 32), 3, fn=lambda x: np.tile(logits, (len(x), 1)))


def test_single_images_show_their_own_decision(bundle_dir: Path, tmp_path: Path) -> None:
    import cv2

    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.synthetic import make_ultrasound

    images, _ = make_ultrasound(4, size=96, seed=1)
    for i, im in enumerate(images):
        cv2.imwrite(str(tmp_path / f"{i}.png"), im)
    b = load_bundle(bundle_dir)
    with _const_backend(2) as be, open_source(str(tmp_path)) as src:
        mem = ListSink()
        s = run_pipeline(b, src, be, [mem], options=RunOptions(smoothing="auto"))
    assert s.extra["smoothing"] == "off" and [r["label"] for r in mem.records] == ["mass"] * 4


def test_quality_failures_abstain_without_inference_and_keep_their_line(bundle_dir: Path) -> None:
    from edgeclf.runtime.pipeline import RunOptions

    b = load_bundle(bundle_dir)
    calls = []

    def fn(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return np.tile(np.array([[-9, -9, 9]], np.float32), (len(x), 1))

    class Blackout:
        """Synthetic cine with frames 20-24 black."""

        def __init__(self, src) -> None:
            self.src, self.kind, self.fps, self.size, self.frame_count, self.live = src, "video", 10.0, None, None, False

        def read(self, timeout=None):
            f = self.src.read()
            if f is not None and 20 <= f.index < 25:
                f.image[...] = 0
            return f

    with FakeBackend((1, 32, 32), 3, fn=fn) as be, open_source("synthetic:ultrasound?frames=40&size=96") as src:
        mem = ListSink()
        s = run_pipeline(b, Blackout(src), be, [mem], options=RunOptions(smoothing="cine"))
    recs = mem.records
    assert len(recs) == 40 and s.frames == 40 and len(calls) == 40 - 5
    for r in recs[20:25]:
        assert r["abstain"] and r["abstain_reason"] == "blank" and r["probs"] is None and r["quality"] == ["blank"]
    assert s.quality_flagged == 5 and s.abstain_reasons
    # Each stage's statistics are over the frames that went through it: the 5 gated frames were never inferred,
    # so they are not 0 ms infer times (which pulled the infer median down); every other stage has all 40.
    assert all(r["latency_ms"]["infer"] is None for r in recs[20:25])
    assert all(r["latency_ms"]["infer"] is not None for r in recs[:20] + recs[25:])
    st = s.to_dict()["stages_ms"]
    assert st["infer"]["n"] == 35 and all(st[k]["n"] == 40 for k in ("capture", "preprocess", "postprocess", "sink", "latency"))


def test_shown_label_never_flips_on_one_odd_frame(bundle_dir: Path) -> None:
    from edgeclf.runtime.pipeline import RunOptions

    b = load_bundle(bundle_dir)
    odd = {15, 27, 33}

    def fn(x: np.ndarray) -> np.ndarray:
        fn.i += 1  # type: ignore[attr-defined]
        k = 0 if fn.i in odd else 2  # type: ignore[attr-defined]
        z = np.full((len(x), 3), -9.0, np.float32)
        z[:, k] = 9.0
        return z

    fn.i = -1  # type: ignore[attr-defined]
    with FakeBackend((1, 32, 32), 3, fn=fn) as be, open_source("synthetic:ultrasound?frames=40&size=96") as src:
        mem = ListSink()
        run_pipeline(b, src, be, [mem], options=RunOptions(smoothing="cine", quality=False))
    shown = [r["label"] for r in mem.records if not r["abstain"]]
    assert shown and set(shown) == {"mass"}
    assert [r["frame_label"] for r in mem.records if r["frame"] in odd] == ["normal"] * 3


def test_acks_follow_the_sink_write_and_stop_ends_cleanly(bundle_dir: Path) -> None:
    import threading

    b = load_bundle(bundle_dir)
    order = []

    class Acking:
        def __init__(self, src) -> None:
            self.src, self.kind, self.fps, self.size, self.frame_count, self.live = src, "images", None, None, None, False

        def read(self, timeout=None):
            return self.src.read()

        def ack(self, frame) -> None:
            order.append(("ack", frame.index))

    class Recording(ListSink):
        def write(self, record, image=None) -> None:
            order.append(("write", record["frame"]))
            super().write(record)
            if record["frame"] == 6:
                stop.set()

    stop = threading.Event()
    with _const_backend() as be, open_source("synthetic:ultrasound?frames=30&size=96") as src:
        s = run_pipeline(b, Acking(src), be, [Recording()], stop=stop)
    assert s.frames == 7 and s.stopped_by == "signal"
    assert order == [(w, i) for i in range(7) for w in ("write", "ack")]


def test_roi_option_is_checked() -> None:
    from edgeclf.errors import ConfigError
    from edgeclf.runtime.pipeline import RunOptions, parse_roi

    assert parse_roi("10,20,110,220") == ("fixed", (10, 20, 110, 220)) and parse_roi("sector") == ("sector", None)
    with pytest.raises(ConfigError, match="allowed: none, sector"):
        RunOptions(roi="10,20,5,5")


def test_a_source_failing_every_100_frames_loses_no_result_line(bundle_dir: Path, tmp_path: Path) -> None:
    from edgeclf.runtime.live import ReconnectingSource
    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.sinks import read_jsonl
    from tests.runtime.test_live import FlakyCamera, _fast, _Shared

    shared = _Shared(every=100, limit=1000, corrupt_every=37)
    b = load_bundle(bundle_dir)
    out = tmp_path / "r.jsonl"
    with _const_backend() as be, ReconnectingSource(lambda: FlakyCamera(shared), drop="none", **_fast()) as src:
        sink = JsonlSink(out)
        s = run_pipeline(b, src, be, [sink], max_frames=1000, options=RunOptions(quality=False, smoothing="off"))
        sink.close()
        stats = src.stats()
    records, torn = read_jsonl(out)
    assert torn == 0 and s.frames == s.written == len(records) == len(shared.delivered) == 1000
    assert sum(shared.failures.values()) >= 9 and stats["reconnects"] >= 9 and stats["skipped"] == shared.corrupt > 0
    assert len({r["frame"] for r in records}) == 1000  # every delivered frame once


def test_watched_folder_classifies_each_file_once_across_two_restarts(bundle_dir: Path, tmp_path: Path) -> None:
    import cv2

    from edgeclf.runtime.app import run_bundle
    from edgeclf.runtime.sinks import read_jsonl

    folder = tmp_path / "inbox"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def drop(n: int, start: int) -> None:
        for i in range(start, start + n):
            img = rng.integers(0, 255, (64, 64), dtype=np.uint8)
            cv2.imwrite(str(folder / f".{i}.png"), img)
            (folder / f".{i}.png").rename(folder / f"xr{i:03d}.png")  # complete files appear by rename

    uri = f"watch:{folder}?poll=0.05&idle_exit=0.5"
    drop(20, 0)  # dropped while the runtime is stopped
    total = []
    for run, new in enumerate((0, 25, 5)):
        drop(new, 20 if run == 1 else 45)
        out = tmp_path / f"run{run}.jsonl"
        s = run_bundle(str(bundle_dir), uri, out=str(out))
        records, torn = read_jsonl(out)
        assert torn == 0 and s["frames"] == len(records)
        total += records
    assert len(total) == 50 and s["source_kind"] == "watch"
    assert all("xr0" not in json.dumps(r) for r in total)  # no file names in results


def test_no_per_frame_memory_growth(bundle_dir: Path, tmp_path: Path) -> None:
    import tracemalloc

    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.sinks import SummarySink

    b = load_bundle(bundle_dir)

    def run(frames: int) -> int:
        with _const_backend() as be, open_source(f"synthetic:ultrasound?frames={frames}&size=64") as src:
            sinks = [JsonlSink(tmp_path / "r.jsonl"), SummarySink(labels=list(b.manifest.labels))]
            tracemalloc.start()
            run_pipeline(b, src, be, sinks, options=RunOptions(smoothing="cine"))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            for s in sinks:
                s.close()
        return peak

    small, large = run(300), run(3000)
    # Ten times the frames: the peak may not grow with them (no per-frame lists kept anywhere).
    assert large - small < 256 * 1024, (small, large)


def test_device_profile_sets_backend_and_flags_win(bundle_dir: Path) -> None:
    from edgeclf.errors import ConfigError

    s = run_bundle(str(bundle_dir), "synthetic:ultrasound?frames=3&size=64", device="x86-cpu")
    assert s["backend"] == "ort-cpu" and "device profile x86-cpu" in s["chosen_by"]["backend"]
    s = run_bundle(str(bundle_dir), "synthetic:ultrasound?frames=3&size=64", device="x86-cpu", threads=1)
    assert s["threads"] == 1 and s["chosen_by"]["threads"] == "argument"
    with pytest.raises(ConfigError, match="unknown"):
        run_bundle(str(bundle_dir), "synthetic:ultrasound?frames=3", device="no-such-board")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_run_cleanly_with_everything_written(bundle_dir: Path, tmp_path: Path, sig: str) -> None:
    import os
    import signal
    import time

    from edgeclf.runtime.sinks import read_jsonl

    out, summary = tmp_path / "r.jsonl", tmp_path / "clip.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "edgeclf", "run", "--bundle", str(bundle_dir), "--source",
                          "synthetic:ultrasound?frames=100000&size=64", "--out", str(out), "--summary", str(summary), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 20):
        time.sleep(0.2)
    p.send_signal(getattr(signal, sig))
    stdout, stderr = p.communicate(timeout=60)
    # Ctrl-C ends `run` as interrupted (killed by SIGINT, shell status 130) after writing everything; SIGTERM (systemd) 0.
    assert p.returncode == (-signal.SIGINT if sig == "SIGINT" else 0), stderr
    result = json.loads(stdout)
    records, torn = read_jsonl(out)
    assert result["stopped_by"] == "signal" and torn == 0 and len(records) == result["frames"] == result["written"] >= 20
    assert json.loads(summary.read_text())["frames"] == result["frames"]


def test_preprocess_parts_are_timed_apart(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import edgeclf.runtime.quality as quality

    real = quality.QualityGate.check

    def slow_check(self, *a, **k):  # type: ignore[no-untyped-def]
        time.sleep(0.01)
        return real(self, *a, **k)

    monkeypatch.setattr(quality.QualityGate, "check", slow_check)
    with FakeBackend((1, 32, 32), 3) as be, open_source("synthetic:ultrasound?frames=6") as src:
        s = run_pipeline(load_bundle(bundle_dir), src, be, [ListSink()])
    d = s.to_dict()
    parts, pre = d["preprocess_parts_ms"], d["stages_ms"]["preprocess"]
    assert set(parts) == {"sector", "quality", "model_input"}
    # The gate's 10 ms sit in "quality", inside the preprocess stage; no sector detector ran, so it has no times.
    assert parts["quality"]["n"] == 6 and parts["quality"]["median"] >= 10 and pre["median"] >= parts["quality"]["median"]
    assert parts["sector"]["n"] == 0 and 0 < parts["model_input"]["median"] < 10
    assert parts["model_input"]["n"] == 6 - d["quality_flagged"]  # a frame the gate stopped gets no model input


# --------------------------------------------------------------- tiny bundle (no training): review fixes

TINY = "synthetic:ultrasound?frames={}&size=32"


def _tiny(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tests.runtime.tiny_bundle import make_tiny_bundle

    return load_bundle(make_tiny_bundle(tmp_path / "tiny"))


def test_auto_smoothing_is_cine_for_a_reconnecting_live_source(tmp_path: Path) -> None:
    from edgeclf.runtime.live import ReconnectingSource
    from edgeclf.runtime.pipeline import RunOptions

    b = _tiny(tmp_path)
    uri = TINY.format(30)

    def fn(x: np.ndarray) -> np.ndarray:  # one odd frame ("mass") among "normal" ones
        fn.i += 1  # type: ignore[attr-defined]
        return np.array([[-9, -9, 9]] if fn.i == 20 else [[9, -9, -9]], np.float32)  # type: ignore[attr-defined]

    # run_bundle wraps cameras and streams like this; also before the first connection (kind not known yet).
    for make in (lambda: ReconnectingSource(lambda: open_source(uri), drop="none"),
                 lambda: ReconnectingSource(lambda: open_source(uri), drop="none", connect_now=False)):
        fn.i = -1  # type: ignore[attr-defined]
        with make() as src, FakeBackend((1, 8, 8), 3, fn=fn) as be:
            mem = ListSink()
            s = run_pipeline(b, src, be, [mem], options=RunOptions(quality=False))  # smoothing "auto"
        assert s.extra["smoothing"] == "cine" and s.frames == 30
        assert mem.records[20]["frame_label"] == "mass" and mem.records[20]["label"] == "normal"


def test_non_finite_outputs_abstain_on_their_frame_and_the_run_goes_on(tmp_path: Path) -> None:
    from edgeclf.runtime.pipeline import INVALID_OUTPUT, RunOptions

    b = _tiny(tmp_path)
    bad = {3: np.nan, 7: np.inf}

    def fn(x: np.ndarray) -> np.ndarray:  # e.g. an fp16 overflow on two frames
        fn.i += 1  # type: ignore[attr-defined]
        return np.array([[bad.get(fn.i, 3.0), 1, 2]], np.float32)  # type: ignore[attr-defined]

    fn.i = -1  # type: ignore[attr-defined]
    events: list = []
    with open_source(TINY.format(12)) as src, FakeBackend((1, 8, 8), 3, fn=fn) as be:
        mem = ListSink()
        s = run_pipeline(b, src, be, [mem], options=RunOptions(quality=False, smoothing="off"),
                         on_event=lambda kind, msg, d: events.append((kind, d)))
    assert s.frames == len(mem.records) == 12 and [r["frame"] for r in mem.records] == list(range(12))
    for r in mem.records:
        if r["frame"] in bad:
            assert r["abstain"] and r["abstain_reason"] == INVALID_OUTPUT and r["probs"] is None
            assert r["frame_label"] is None and r["quality"] == []
        else:
            assert not r["abstain"] and r["frame_label"] == "normal"
    assert s.extra["invalid_outputs"] == 2 and s.extra["backend_errors"] == 0 and s.quality_flagged == 0
    assert s.abstain_reasons == {INVALID_OUTPUT: 2} and s.to_dict()["abstain_reasons"] == {INVALID_OUTPUT: 2}
    assert [(k, d["frame"]) for k, d in events] == [("fault", 3), ("recovery", 4), ("fault", 7), ("recovery", 8)]
    assert events[0][1]["reason"] == INVALID_OUTPUT


@pytest.mark.parametrize("mixed", [False, True])
def test_the_failure_that_ends_the_run_keeps_its_frames_record(tmp_path: Path, mixed: bool) -> None:
    from edgeclf.errors import BackendError
    from edgeclf.runtime.pipeline import BACKEND_ERROR, INVALID_OUTPUT, MAX_BACKEND_ERRORS, RunOptions

    b = _tiny(tmp_path)

    def fn(x: np.ndarray) -> np.ndarray:  # mixed: failures of both kinds in turn count as one run of failures
        fn.i += 1  # type: ignore[attr-defined]
        if not mixed or fn.i % 2 == 0:  # type: ignore[attr-defined]
            raise BackendError("device lost")
        return np.array([[np.nan, 0, 0]], np.float32)

    fn.i = -1  # type: ignore[attr-defined]
    acked: list = []

    class Acking:
        def __init__(self, src) -> None:  # type: ignore[no-untyped-def]
            self.src, self.kind, self.fps, self.size, self.frame_count, self.live = src, "images", None, None, None, False

        def read(self, timeout=None):  # type: ignore[no-untyped-def]
            return self.src.read()

        def ack(self, frame) -> None:  # type: ignore[no-untyped-def]
            acked.append(frame.index)

    with open_source(TINY.format(12)) as src, FakeBackend((1, 8, 8), 3, fn=fn) as be:
        mem = ListSink()
        with pytest.raises(BackendError, match="device lost"):
            run_pipeline(b, Acking(src), be, [mem], options=RunOptions(quality=False))
    # Every frame delivered has its record, the last one (whose failure ended the run) included.
    assert [r["frame"] for r in mem.records] == acked == list(range(MAX_BACKEND_ERRORS))
    want = [BACKEND_ERROR, INVALID_OUTPUT] * 2 + [BACKEND_ERROR] if mixed else [BACKEND_ERROR] * MAX_BACKEND_ERRORS
    assert [r["abstain_reason"] for r in mem.records] == want


class _Counting:
    """Counts the frames a source delivers."""

    def __init__(self, src) -> None:  # type: ignore[no-untyped-def]
        self.src, self.reads = src, 0

    def read(self, timeout=None):  # type: ignore[no-untyped-def]
        f = self.src.read()
        self.reads += f is not None
        return f

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.src, name)


def test_frames_read_ahead_are_all_counted_when_a_run_stops_early(tmp_path: Path) -> None:
    import threading
    import time

    from edgeclf.runtime.pipeline import RunOptions

    b = _tiny(tmp_path)

    def slow(x: np.ndarray) -> np.ndarray:  # the feeder runs ahead and holds a frame as the run stops
        time.sleep(0.01)
        return np.zeros((len(x), 3), np.float32)

    class Stopping(ListSink):
        def write(self, record, image=None) -> None:  # type: ignore[no-untyped-def]
            super().write(record)
            if record["frame"] == 6:
                stop.set()

    for _ in range(3):
        for how in ("max_frames", "signal"):
            stop = threading.Event()
            with open_source(TINY.format(200)) as s0, FakeBackend((1, 8, 8), 3, fn=slow) as be:
                src = _Counting(s0)
                s = run_pipeline(b, src, be, [Stopping()], options=RunOptions(quality=False), stop=stop,
                                 max_frames=5 if how == "max_frames" else None)
                assert s.frames == (5 if how == "max_frames" else 7)
                assert src.reads == s.frames + s.extra["read_not_classified"], how


def test_the_live_clip_decision_uses_the_numbers_of_each_frame_label(tmp_path: Path) -> None:
    from edgeclf.runtime.clips import ClipAggregator, aggregate_clip, aggregate_records
    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.postprocess import probabilities
    from edgeclf.runtime.sinks import SummarySink, read_jsonl

    b = _tiny(tmp_path)
    m = b.manifest
    logit = np.array([[0.0, 4e-7, -30.0]], np.float32)  # "cyst" ahead of "normal" by ~1e-7: a tie at 6 digits
    agg = ClipAggregator(rule=m.decision, min_confidence=m.min_confidence, labels=list(m.labels))
    clip, mem, out = SummarySink(labels=list(m.labels), aggregator=agg), ListSink(), tmp_path / "r.jsonl"
    with open_source(TINY.format(10)) as src, FakeBackend((1, 8, 8), 3, fn=lambda x: logit) as be, JsonlSink(out) as js:
        run_pipeline(b, src, be, [mem, js, clip], options=RunOptions(quality=False))
    assert [r["frame_label"] for r in mem.records] == ["cyst"] * 10
    live = clip.decision()
    assert live is not None and live["mean_label"] == live["vote_label"] == "cyst" and live["votes"]["cyst"] == 10
    # The same as `edgeclf evaluate` on these frames, and as offline aggregation of the results file.
    offline = aggregate_clip(list(probabilities(np.repeat(logit, 10, 0), m.task, m.temperature)),
                             rule=m.decision, min_confidence=m.min_confidence, labels=list(m.labels))
    records, _ = read_jsonl(out)
    assert offline.to_dict() == live == aggregate_records(records, m.labels, rule=m.decision, min_confidence=m.min_confidence).to_dict()


def _input_logits(calls: list):  # type: ignore[no-untyped-def]
    """A backend function whose logits depend on each input (so a frame's row cannot be swapped unseen)."""

    def fn(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        v = x.reshape(len(x), -1).mean(axis=1)
        return np.stack([np.sin(37 * v), np.cos(53 * v), v], axis=1).astype(np.float32)

    return fn


def _same_results(a: list, b: list) -> None:
    drop = ("time", "timestamp", "latency_ms")  # clocks and timings differ from run to run
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [{k: v for k, v in r.items() if k not in drop} for r in b]


@pytest.mark.parametrize("pipelined", [True, False])
def test_batched_inference_gives_the_records_of_one_frame_at_a_time(tmp_path: Path, pipelined: bool) -> None:
    from edgeclf.runtime.pipeline import RunOptions

    b = _tiny(tmp_path)
    runs = {}
    for batch in (1, 4):
        calls: list = []
        # frames=30: 7 full batches and a last one of 2; the quality gate on, so some batches lose gated frames.
        with open_source(TINY.format(30)) as src, FakeBackend((1, 8, 8), 3, fn=_input_logits(calls)) as be:
            mem = ListSink()
            s = run_pipeline(b, src, be, [mem], options=RunOptions(batch=batch, pipelined=pipelined))
        runs[batch] = (mem.records, calls, s)
    (one, calls1, s1), (four, calls4, s4) = runs[1], runs[4]
    assert s1.frames == s4.frames == 30 and s4.extra["read_not_classified"] == 0
    assert set(calls1) == {1} and max(calls4) == 4 and sum(calls4) == sum(calls1)
    assert len(calls4) < len(calls1)
    _same_results(one, four)  # labels, smoothing, abstains, probabilities: all the same, in frame order
    assert all(r["latency_ms"]["infer"] >= 0 for r in four)


def test_live_sources_are_inferred_one_frame_at_a_time_whatever_the_batch(tmp_path: Path) -> None:
    from edgeclf.runtime.live import ReconnectingSource
    from edgeclf.runtime.pipeline import RunOptions

    b = _tiny(tmp_path)
    calls: list = []
    with ReconnectingSource(lambda: open_source(TINY.format(20)), drop="none") as src, \
            FakeBackend((1, 8, 8), 3, fn=_input_logits(calls)) as be:
        s = run_pipeline(b, src, be, [ListSink()], options=RunOptions(batch=8, quality=False))
    assert s.frames == 20 and calls == [1] * 20  # the newest frame at once, never held back for a batch


def test_a_failed_batch_is_retried_frame_by_frame(tmp_path: Path) -> None:
    from edgeclf.errors import BackendError
    from edgeclf.runtime.pipeline import BACKEND_ERROR, RunOptions

    b = _tiny(tmp_path)
    calls: list = []
    good = _input_logits(calls)

    def fn(x: np.ndarray) -> np.ndarray:  # call 1: the second batch (a hiccup); call 2: its first frame alone
        fn.i += 1  # type: ignore[attr-defined]
        if fn.i in (1, 2):  # type: ignore[attr-defined]
            raise BackendError("hiccup")
        return good(x)

    fn.i = -1  # type: ignore[attr-defined]
    with open_source(TINY.format(12)) as src, FakeBackend((1, 8, 8), 3, fn=fn) as be:
        mem = ListSink()
        s = run_pipeline(b, src, be, [mem], options=RunOptions(batch=4, quality=False, smoothing="off"))
    assert s.frames == 12 and [r["frame"] for r in mem.records] == list(range(12))
    # Frames 4-7: their batch failed; each was retried alone and only the first retry failed again.
    assert [r.get("abstain_reason") for r in mem.records[4:8]] == [BACKEND_ERROR, None, None, None]
    assert s.extra["backend_errors"] == 1 and sum(not r["abstain"] for r in mem.records) == 11


def test_a_dead_backend_still_ends_a_batched_run_after_the_same_failures_in_a_row(tmp_path: Path) -> None:
    from edgeclf.errors import BackendError
    from edgeclf.runtime.pipeline import BACKEND_ERROR, MAX_BACKEND_ERRORS, RunOptions

    b = _tiny(tmp_path)

    def dead(x: np.ndarray) -> np.ndarray:
        raise BackendError("device lost")

    with open_source(TINY.format(40)) as src, FakeBackend((1, 8, 8), 3, fn=dead) as be:
        mem = ListSink()
        with pytest.raises(BackendError, match="device lost"):
            run_pipeline(b, src, be, [mem], options=RunOptions(batch=8, quality=False))
    assert [r["abstain_reason"] for r in mem.records] == [BACKEND_ERROR] * MAX_BACKEND_ERRORS


@pytest.mark.parametrize("how", ["max_frames", "signal"])
def test_a_batched_run_that_stops_early_counts_every_frame_it_read(tmp_path: Path, how: str) -> None:
    import threading

    from edgeclf.runtime.pipeline import RunOptions

    b = _tiny(tmp_path)
    stop = threading.Event()

    class Stopping(ListSink):
        def write(self, record, image=None) -> None:  # type: ignore[no-untyped-def]
            super().write(record)
            if record["frame"] == 9:  # in the middle of the third batch of 4
                stop.set()

    with open_source(TINY.format(100)) as s0, FakeBackend((1, 8, 8), 3) as be:
        src = _Counting(s0)
        s = run_pipeline(b, src, be, [Stopping()], options=RunOptions(batch=4, quality=False), stop=stop,
                         max_frames=10 if how == "max_frames" else None)
    # max frames: batches of 4, 4 and 2; a signal: seen between batches, so the third batch (8-11) completes.
    assert s.frames == (10 if how == "max_frames" else 12)
    assert src.reads == s.frames + s.extra["read_not_classified"]


def test_batch_option_is_checked() -> None:
    from edgeclf.errors import ConfigError
    from edgeclf.runtime.pipeline import MAX_BATCH, RunOptions

    for bad in (0, MAX_BATCH + 1):
        with pytest.raises(ConfigError, match="batch"):
            RunOptions(batch=bad)


def test_batched_onnx_runtime_matches_one_frame_at_a_time(bundle_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.sinks import read_jsonl
    from edgeclf.runtime.synthetic import write_cine

    m = load_bundle(bundle_dir).manifest
    batch_axis = ort.InferenceSession(str(bundle_dir / m.raw["model"]["file"])).get_inputs()[0].shape[0]
    assert isinstance(batch_axis, str)  # exported with a free batch axis: batch 8 runs as one call, not 8
    video = tmp_path / "c.mp4"
    write_cine(video, timeline=[(0, 10), (1, 11)], size=96, fps=10)
    res = {}
    for batch in (1, 8):
        out = tmp_path / f"b{batch}.jsonl"
        s = run_bundle(str(bundle_dir), str(video), out=str(out), options=RunOptions(batch=batch))
        res[batch] = (read_jsonl(out)[0], s)
    (one, s1), (eight, s8) = res[1], res[8]
    timing = ("duration_s", "span_s")
    assert s1["frames"] == s8["frames"] == 21
    assert {k: v for k, v in s1["clip"].items() if k not in timing} == {k: v for k, v in s8["clip"].items() if k not in timing}
    assert [r["frame_label"] for r in one] == [r["frame_label"] for r in eight]
    assert [r["label"] for r in one] == [r["label"] for r in eight]
    for r1, r8 in zip(one, eight):  # a batched kernel may round differently in the last digits, no more
        if r1["probs"] is not None:
            assert max(abs(r1["probs"][k] - r8["probs"][k]) for k in r1["probs"]) < 1e-5


def test_a_batch_in_consecutive_ring_slots_is_a_view_and_any_other_a_copy() -> None:
    from edgeclf.runtime.pipeline import _stack

    ring = np.random.default_rng(0).random((6, 3, 4, 4)).astype(np.float32)
    view = _stack([ring[k : k + 1] for k in (2, 3, 4)], ring)
    assert np.shares_memory(view, ring) and np.array_equal(view, ring[2:5])
    for slots in ((4, 5, 0), (1, 3)):  # wraps around the end; skips a slot
        copy = _stack([ring[k : k + 1] for k in slots], ring)
        assert not np.shares_memory(copy, ring) and np.array_equal(copy, ring[list(slots)])
    loose = [np.ones((1, 3, 4, 4), np.float32), np.zeros((1, 3, 4, 4), np.float32)]
    assert np.array_equal(_stack(loose, ring), np.concatenate(loose)) and _stack(loose[:1], None) is loose[0]


def test_preprocessing_into_a_given_array_gives_the_same_input(bundle_dir: Path) -> None:
    from edgeclf.runtime.preprocess import Preprocessor

    pre = Preprocessor(load_bundle(bundle_dir).manifest.preprocess)
    image = np.random.default_rng(1).integers(0, 256, (120, 160, 3), np.uint8)
    want = pre(image)
    out = np.full((2,) + want.shape[1:], np.nan, np.float32)
    got = pre(image, out[1:2])
    assert np.shares_memory(got, out) and np.array_equal(out[1:2], want) and np.isnan(out[0]).all()
    with pytest.raises(ValueError, match="C-contiguous float32"):
        pre(image, np.empty((1, 1, 2, 2), np.float32))


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_source_error_in_a_batch_comes_after_the_frames_read_before_it(tmp_path: Path, pipelined: bool) -> None:
    from edgeclf.errors import SourceError
    from edgeclf.runtime.pipeline import RunOptions

    b = _tiny(tmp_path)

    class Breaking(_Counting):  # the 7th read fails (an undecodable file in a folder)
        def read(self, timeout=None):  # type: ignore[no-untyped-def]
            if self.reads == 6:
                raise SourceError("file 6 is damaged")
            return super().read(timeout)

    with open_source(TINY.format(20)) as s0, FakeBackend((1, 8, 8), 3) as be:
        mem = ListSink()
        with pytest.raises(SourceError, match="damaged"):
            run_pipeline(b, Breaking(s0), be, [mem], options=RunOptions(batch=4, quality=False, pipelined=pipelined))
    assert [r["frame"] for r in mem.records] == list(range(6))  # as batch 1 would: every frame read is recorded


def test_a_batch_with_non_finite_rows_infers_those_frames_again_alone(tmp_path: Path) -> None:
    from edgeclf.runtime.pipeline import RunOptions

    b = _tiny(tmp_path)
    calls: list = []
    good = _input_logits(calls)
    def fn(x: np.ndarray) -> np.ndarray:  # the first batch overflows (fp16, say)
        out = good(x)
        if len(calls) == 1:
            out[:] = np.nan
        return out

    runs = {}
    for batch in (1, 4):
        calls.clear()
        with open_source(TINY.format(12)) as src, FakeBackend((1, 8, 8), 3, fn=fn if batch == 4 else good) as be:
            mem = ListSink()
            s = run_pipeline(b, src, be, [mem], options=RunOptions(batch=batch, quality=False))
        runs[batch] = (mem.records, s)
    (one, s1), (four, s4) = runs[1], runs[4]
    assert s4.extra["batch_retries"] == 1 and s4.extra["invalid_outputs"] == 0 and s4.abstained == s1.abstained
    _same_results(one, four)  # each retried frame has its own logits


# ------------------------------------------------------------------------- per-frame failures, files, smoothing


def _png(path: Path, shape: tuple, seed: int = 0) -> None:
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(30, 200, size=shape, dtype=np.uint8))


@pytest.mark.parametrize("roi", ["none", "sector"])
@pytest.mark.parametrize("shape", [(2, 2, 3), (6, 6)])
def test_a_tiny_image_gives_a_too_small_abstain_not_a_crash(tmp_path: Path, shape: tuple, roi: str) -> None:
    # A valid 6x6 PNG raised DataError "sector mask is empty" and a 2x2 RGB one a raw cv2.error: the run ended.
    from edgeclf.runtime.pipeline import RunOptions
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "1.png", shape)
    _png(folder / "2.png", (64, 64))
    mem = ListSink()
    with FakeBackend((1, 8, 8), 3) as be, open_source(str(folder)) as src:
        s = run_pipeline(b, src, be, [mem], options=RunOptions(roi=roi))
    assert s.frames == 2 and len(mem.records) == 2
    first, second = mem.records
    assert first["abstain"] and first["abstain_reason"] == "too_small" and first["quality"] == ["too_small"]
    assert first["probs"] is None
    if roi == "sector":  # a still gives no sector to lock: it abstains, never classified uncropped
        assert second["abstain_reason"] == "no_sector_still" and second["probs"] is None and s.extra["no_sector_still"] == 1
    else:
        assert second["probs"] is not None
    assert s.quality_flagged == 1 and s.extra["quality"]["too_small"] == 1 and s.extra["frame_errors"] == 0


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("stage", ["quality", "sector"])
def test_a_data_error_on_one_frame_abstains_that_frame_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipelined: bool, stage: str
) -> None:
    from edgeclf.errors import DataError
    from edgeclf.runtime import quality, sector
    from edgeclf.runtime.pipeline import FRAME_ERROR, RunOptions
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))
    owner, name = (quality.QualityGate, "check") if stage == "quality" else (sector.SectorDetector, "update")
    real = getattr(owner, name)
    calls = [0]

    def flaky(self, *a, **k):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 3:
            raise DataError("sector mask is empty (or thinner than 8 px); pass None to check the whole frame")
        return real(self, *a, **k)

    monkeypatch.setattr(owner, name, flaky)
    mem = ListSink()
    opts = RunOptions(roi="4,4,60,60", pipelined=pipelined, smoothing="off")  # a fixed box: no warm-up
    with FakeBackend((1, 8, 8), 3) as be, open_source("synthetic:ultrasound?frames=6&size=64") as src:
        s = run_pipeline(b, src, be, [mem], options=opts)
    assert s.frames == 6 and [r["frame"] for r in mem.records] == list(range(6))
    bad = mem.records[2]
    assert bad["abstain"] and bad["abstain_reason"] == FRAME_ERROR and bad["quality"] == [] and bad["probs"] is None
    assert s.extra["frame_errors"] == 1 and s.abstain_reasons.get(FRAME_ERROR) == 1 and s.quality_flagged == 0
    assert all(r["probs"] is not None for k, r in enumerate(mem.records) if k != 2)


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_programming_error_in_the_gate_still_ends_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             pipelined: bool) -> None:
    from edgeclf.runtime import quality
    from edgeclf.runtime.pipeline import RunOptions
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))

    def broken(self, *a, **k):  # type: ignore[no-untyped-def]
        raise TypeError("a bug, not the frame's data")

    monkeypatch.setattr(quality.QualityGate, "check", broken)
    with FakeBackend((1, 8, 8), 3) as be, open_source("synthetic:ultrasound?frames=4&size=64") as src, \
            pytest.raises(TypeError, match="a bug"):
        run_pipeline(b, src, be, [ListSink()], options=RunOptions(pipelined=pipelined))


def _by_brightness(x: np.ndarray) -> np.ndarray:
    """Class 0 for dark images, class 2 for bright ones: each image's own decision is unambiguous."""
    m = x.reshape(len(x), -1).mean(axis=1)
    out = np.zeros((len(x), 3), np.float32)
    out[:, 0] = np.where(m < 0, 9.0, -9.0)
    out[:, 2] = np.where(m < 0, -9.0, 9.0)
    return out


def _dicom_run(b, folder: Path, smoothing: str = "auto"):  # type: ignore[no-untyped-def]
    from edgeclf.runtime.pipeline import RunOptions

    mem = ListSink()
    with FakeBackend((1, 8, 8), 3, fn=_by_brightness) as be, open_source(str(folder)) as src:
        s = run_pipeline(b, src, be, [mem], options=RunOptions(quality=False, smoothing=smoothing))
    return s, mem.records


def _film(rng: np.random.Generator, level: int, frames: int = 1) -> np.ndarray:
    shape = (frames, 32, 32) if frames > 1 else (32, 32)
    return np.clip(rng.normal(level, 5, size=shape), 0, 255).astype(np.uint8)


def test_a_folder_of_single_frame_dicom_images_is_not_smoothed_as_a_cine(tmp_path: Path) -> None:
    # The summed frame count made six X-ray films one "cine": every film came out "abstain: settling" or
    # showed the film before it.
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))
    rng = np.random.default_rng(0)
    folder = tmp_path / "dcm"
    folder.mkdir()
    for i, level in enumerate([40, 40, 40, 220, 220, 40]):
        write_dicom(folder / f"im{i}.dcm", _film(rng, level), instance=i + 1)
    s, recs = _dicom_run(b, folder)
    assert [r["label"] for r in recs] == [r["frame_label"] for r in recs] == ["normal"] * 3 + ["mass"] * 2 + ["normal"]
    assert s.extra["smoothing"] == "off"
    # each record says which file (and frame of it) it is
    assert [(r["file_index"], r["file_frame"]) for r in recs] == [(i, 0) for i in range(6)]


def test_two_cines_in_one_dicom_folder_are_smoothed_each_on_its_own(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from tests.runtime.test_dicom import write_dicom
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))
    rng = np.random.default_rng(1)
    folder = tmp_path / "dcm"
    folder.mkdir()
    write_dicom(folder / "a.dcm", _film(rng, 40, 12), instance=1, frame_time=33.3)
    write_dicom(folder / "b.dcm", _film(rng, 220, 12), instance=2, frame_time=33.3)
    write_dicom(folder / "c.dcm", _film(rng, 40), instance=3)  # a still of the same study
    s, recs = _dicom_run(b, folder)
    assert s.extra["smoothing"] == "cine" and s.frames == 25
    first, second, still = recs[:12], recs[12:24], recs[24]
    assert first[-1]["label"] == "normal"
    # the second cine starts afresh: it never shows the first cine's label while it settles
    assert all(r["label"] in (None, "mass") for r in second) and second[0]["abstain_reason"] == "settling"
    assert second[-1]["label"] == "mass"
    assert still["label"] == still["frame_label"] == "normal" and not still["abstain"]  # a still: shown as decided
    assert [(r["file_index"], r["file_frame"]) for r in recs[11:14]] == [(0, 11), (1, 0), (1, 1)]


def test_two_cines_dropped_in_a_watched_folder_are_smoothed_each_on_its_own(tmp_path: Path) -> None:
    """A cart's scanner drops cine loops into a watched folder: each is its own clip, as in a DICOM folder; the second
    must not show the first one's label while it settles, and its clip decision is its own."""
    pytest.importorskip("pydicom")
    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.watch import WatchFolderSource
    from tests.runtime.test_dicom import write_dicom
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))
    rng = np.random.default_rng(1)
    inbox = tmp_path / "in"
    inbox.mkdir()
    a = write_dicom(inbox / "a.dcm", _film(rng, 40, 12), instance=1, frame_time=33.3)
    second = write_dicom(inbox / "b.dcm", _film(rng, 220, 12), instance=2, frame_time=33.3)
    os.utime(second, (a.stat().st_mtime + 5, a.stat().st_mtime + 5))  # read after a.dcm
    mem = ListSink()
    src = WatchFolderSource(str(inbox), poll=0.02, idle_exit=0.5, state_path=str(tmp_path / "s.json"))
    try:
        with FakeBackend((1, 8, 8), 3, fn=_by_brightness) as be:
            s = run_pipeline(b, src, be, [mem], options=RunOptions(quality=False, smoothing="cine"))
    finally:
        src.close()
    recs = mem.records
    assert s.frames == 24 and recs[11]["label"] == "normal"
    assert all(r["label"] in (None, "mass") for r in recs[12:]) and recs[12]["abstain_reason"] == "settling"
    assert s.extra["smoother"]["resets"] == 1


def test_logits_that_overflow_under_the_bundles_temperature_abstain_as_invalid_output(tmp_path: Path) -> None:
    import dataclasses

    from edgeclf.errors import DataError
    from edgeclf.runtime.pipeline import INVALID_OUTPUT, RunOptions

    b = _tiny(tmp_path)
    b = dataclasses.replace(b, manifest=dataclasses.replace(b.manifest, temperature=1e-300))  # a valid temperature
    logits = np.array([[3e38, 0.0, 0.0]], np.float32)  # finite: logit / T is not
    mem = ListSink()
    with open_source(TINY.format(6)) as src, FakeBackend((1, 8, 8), 3, fn=lambda x: logits) as be, \
            pytest.raises(DataError, match="NaN or infinity"):  # MAX_BACKEND_ERRORS in a row: the run ends
        run_pipeline(b, src, be, [mem], options=RunOptions(quality=False, smoothing="cine"))
    assert len(mem.records) == 5 and all(r["abstain"] and r["abstain_reason"] == INVALID_OUTPUT and r["probs"] is None for r in mem.records)


class _Cam:
    """A live camera double: frames of one grey level; raises after `n` frames (a pulled cable); may stall once."""

    kind, live, fps, size, frame_count = "camera", True, 30.0, (16, 16), None

    def __init__(self, value: int, n: Optional[int] = None, stall_after: Optional[int] = None,
                 stall_s: float = 0.0) -> None:
        self.value, self.n, self.k, self.closed = value, n, 0, False
        self.stall_after, self.stall_s = stall_after, stall_s

    def read(self, timeout: Optional[float] = None) -> Any:
        import time

        from edgeclf.runtime.sources import Frame

        if self.closed:
            return None
        if self.n is not None and self.k >= self.n:
            raise OSError("cable pulled")
        if self.stall_after is not None and self.k == self.stall_after:
            time.sleep(self.stall_s)
        time.sleep(0.002)
        self.k += 1
        return Frame(image=np.full((16, 16), self.value, np.uint8), index=self.k - 1, timestamp=time.monotonic(), meta={})

    def close(self) -> None:
        self.closed = True


def _by_level(x: np.ndarray) -> np.ndarray:  # a bright frame -> mass, a dark one -> normal
    z = np.full((len(x), 3), -9.0, np.float32)
    for i in range(len(x)):
        z[i, 2 if x[i].mean() > 0 else 0] = 9.0
    return z


def test_a_new_connection_starts_smoothing_afresh(tmp_path: Path) -> None:
    from edgeclf.runtime.live import ReconnectingSource
    from edgeclf.runtime.pipeline import RunOptions

    b = _tiny(tmp_path)
    cams = iter([_Cam(250, n=30), _Cam(5)])
    with FakeBackend((1, 8, 8), 3, fn=_by_level) as be, ReconnectingSource(
            lambda: next(cams), drop="none", read_timeout=1.0, backoff_initial=0.001, backoff_max=0.002) as src:
        mem = ListSink()
        s = run_pipeline(b, src, be, [mem], max_frames=32, options=RunOptions(smoothing="cine", quality=False))
    assert mem.records[29]["label"] == "mass"
    first = mem.records[30]  # the first frame of the new connection: the old connection's label is not shown
    assert first["frame_label"] == "normal" and first["abstain"] and first["abstain_reason"] == "settling"
    assert s.extra["smoother"]["resets"] == 1


def test_a_live_stall_marks_the_display_stale_and_restarts_smoothing(tmp_path: Path) -> None:
    from edgeclf.runtime.live import LatestFrameReader
    from edgeclf.runtime.pipeline import STALE_MIN_S, RunOptions

    b = _tiny(tmp_path)
    marks: list = []

    class Display(ListSink):
        def mark_stale(self, idle_s: float) -> None:
            marks.append((len(self.records), idle_s))

    src = LatestFrameReader(_Cam(250, stall_after=20, stall_s=1.6))
    mem = Display()
    try:
        with FakeBackend((1, 8, 8), 3, fn=_by_level) as be:
            s = run_pipeline(b, src, be, [mem], max_frames=25, options=RunOptions(smoothing="cine", quality=False))
    finally:
        src.close()
    assert s.frames == len(mem.records) == 25  # no record invented for the stall
    # Where the stall falls among the records: the latest-frame reader may drop frames on a loaded machine, so it is
    # found by the capture-time gap rather than assumed to be after record 20.
    ts = [r["timestamp"] for r in mem.records]
    (k,) = [i for i in range(1, len(ts)) if ts[i] - ts[i - 1] >= 1.0]
    assert mem.records[k - 1]["label"] == "mass"
    assert marks and all(n == k and idle >= STALE_MIN_S for n, idle in marks)  # told while stalled, not after
    assert s.extra["stalls"] == 1 and s.extra["smoother"]["resets"] == 1
    after = mem.records[k]  # the first frame after the stall: settling, not the old label as current
    assert after["abstain"] and after["abstain_reason"] == "settling"
    # A steady source never stalls.
    with open_source(TINY.format(10)) as src2, FakeBackend((1, 8, 8), 3, fn=_by_level) as be:
        s2 = run_pipeline(b, src2, be, [ListSink()], options=RunOptions(smoothing="cine", quality=False))
    assert s2.extra["stalls"] == 0


def test_the_displayed_latency_counts_a_slow_sink_before_the_display(tmp_path: Path) -> None:
    import time

    from edgeclf.runtime.overlay import latency_text
    from edgeclf.runtime.pipeline import RunOptions

    b = _tiny(tmp_path)
    seen: list = []

    class SlowLog(ListSink):  # e.g. a results file fsyncing
        def write(self, record: Any, image: Any = None) -> None:
            time.sleep(0.1)

    class Display(ListSink):
        needs_image = True

        def write(self, record: Any, image: Any = None) -> None:
            seen.append((latency_text(record), record["latency_ms"]["total"]))

    with FakeBackend((1, 8, 8), 3, fn=_by_level) as be, open_source(TINY.format(3)) as src:
        run_pipeline(b, src, be, [SlowLog(), Display()], options=RunOptions(smoothing="cine", quality=False))
    text, total = seen[-1]
    shown = float(text.split()[1])
    assert text.startswith("cap-to-disp ") and shown - total >= 90  # the recorded total is capture-to-result


def test_a_watched_folder_waiting_for_the_next_xray_is_not_a_stall(tmp_path: Path) -> None:
    """A watched folder waits for its next file by design: the X-ray's result stays shown (no NO SIGNAL), no stall."""
    from edgeclf.runtime.watch import WatchFolderSource
    from tests.runtime.tiny_bundle import inbox_with_one_xray

    inbox = inbox_with_one_xray(tmp_path)
    marks: list = []

    class Display(ListSink):
        def mark_stale(self, idle_s: float) -> None:
            marks.append(idle_s)

    src = WatchFolderSource(str(inbox), poll=0.05, idle_exit=1.5, state_path=str(tmp_path / "state.json"))
    mem = Display()
    try:
        with FakeBackend((1, 8, 8), 3) as be:
            s = run_pipeline(_tiny(tmp_path), src, be, [mem])  # ~1.5 s of waiting after the one file: 3 x STALE_MIN_S
    finally:
        src.close()
    assert s.frames == 1 and len(mem.records) == 1
    assert marks == [] and s.extra["stalls"] == 0 and s.extra["smoother"]["resets"] == 0


def test_a_window_quit_while_a_watched_folder_waits_stops_the_run(tmp_path: Path) -> None:
    """'q' pressed between files: the display is refreshed while no frame comes, and the run stops then,
    not at the next file (which may be hours away on a cart)."""
    import threading
    import time

    from edgeclf.runtime.watch import WatchFolderSource
    from tests.runtime.tiny_bundle import inbox_with_one_xray

    inbox = inbox_with_one_xray(tmp_path)
    refreshes: list = []

    class Window(ListSink):
        def refresh(self) -> None:
            refreshes.append(time.monotonic())
            if len(refreshes) == 2:
                self.stop_requested = True  # as OverlayWindow does when waitKey returns 'q'

    src = WatchFolderSource(str(inbox), poll=0.05, state_path=str(tmp_path / "state.json"))  # no idle_exit
    win = Window()
    out: dict = {}
    with FakeBackend((1, 8, 8), 3) as be:
        t = threading.Thread(target=lambda: out.update(s=run_pipeline(_tiny(tmp_path), src, be, [win])), daemon=True)
        t.start()
        t.join(20)
    src.close()
    assert not t.is_alive(), "a watched folder with no idle_exit: 'q' between files did not stop the run"
    assert out["s"].frames == 1 and len(win.records) == 1 and out["s"].stopped_by == "sink"
    assert len(refreshes) == 2


def _sector_bundle(tmp_path: Path, how: str):  # type: ignore[no-untyped-def]
    """The tiny bundle as exported from sector crops: preprocess.sector, or (older exports) only the data name."""
    from edgeclf.runtime.bundle import write_checksums
    from tests.runtime.tiny_bundle import make_tiny_bundle

    folder = make_tiny_bundle(tmp_path / how)
    m = json.loads((folder / "manifest.json").read_text())
    if how == "field":
        m["preprocess"]["sector"] = True
    else:
        m["provenance"]["data"] = {"name": "pocus?frames=8&roi=sector", "kind": "clips"}
    (folder / "manifest.json").write_text(json.dumps(m))
    write_checksums(folder)
    return load_bundle(folder)


@pytest.mark.parametrize("how", ["field", "provenance"])
def test_a_sector_bundle_is_cropped_to_the_sector_by_default(tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from edgeclf.runtime.pipeline import RunOptions

    b = _sector_bundle(tmp_path, how)
    with caplog.at_level(logging.WARNING), FakeBackend((1, 8, 8), 3) as be, open_source(TINY.format(12)) as src:
        s = run_pipeline(b, src, be, [ListSink()], options=RunOptions())
    assert s.extra["roi"] == {"mode": "sector", "chosen_by": "bundle", "bundle": "sector"}
    assert s.to_dict()["preprocess_parts_ms"]["sector"]["n"] == 12 and not caplog.records


@pytest.mark.parametrize("roi", ["none", "2,2,30,30"])
def test_another_roi_on_a_sector_bundle_runs_with_a_warning_on_record(tmp_path: Path, roi: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from edgeclf.runtime.pipeline import RunOptions

    b = _sector_bundle(tmp_path, "field")
    with caplog.at_level(logging.WARNING), FakeBackend((1, 8, 8), 3) as be, open_source(TINY.format(5)) as src:
        s = run_pipeline(b, src, be, [ListSink()], options=RunOptions(roi=roi))
    rec = s.to_dict()["roi"]
    assert rec["mode"] == ("none" if roi == "none" else "fixed") and rec["chosen_by"] == "argument"
    assert "trained on sector crops" in rec["warning"]
    assert [r for r in caplog.records if r.levelname == "WARNING" and "trained on sector crops" in r.getMessage()]


def test_a_bundle_not_trained_on_sectors_runs_whole_frames_by_default(tmp_path: Path) -> None:
    from edgeclf.runtime.pipeline import RunOptions

    with FakeBackend((1, 8, 8), 3) as be, open_source(TINY.format(5)) as src:
        s = run_pipeline(_tiny(tmp_path), src, be, [ListSink()], options=RunOptions())
    assert s.extra["roi"] == {"mode": "none", "chosen_by": "bundle", "bundle": "none"}
    assert s.to_dict()["preprocess_parts_ms"]["sector"]["n"] == 0


class _CineCam:
    """A live camera double showing one synthetic scanner; raises after `n` frames (a pulled cable)."""

    kind, live, fps, frame_count = "camera", True, 30.0, None

    def __init__(self, seed: int, n: Optional[int] = None) -> None:
        from edgeclf.runtime.synthetic import UltrasoundCine

        self.cine = UltrasoundCine(size=128, seed=seed, loop=True)
        self.size = (128, 128)
        self.n, self.k, self.closed = n, 0, False

    def read(self, timeout: Optional[float] = None) -> Any:
        import time

        from edgeclf.runtime.sources import Frame

        if self.closed:
            return None
        if self.n is not None and self.k >= self.n:
            raise OSError("cable pulled")
        time.sleep(0.001)
        self.k += 1
        return Frame(image=self.cine.frame(self.k), index=self.k - 1, timestamp=time.monotonic(), meta={})

    def close(self) -> None:
        self.closed = True


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b)) / max(1, int(np.count_nonzero(a | b)))


def test_a_new_connection_gets_its_own_sector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2")
    import edgeclf.runtime.sector as sec
    from edgeclf.runtime.live import ReconnectingSource
    from edgeclf.runtime.pipeline import RunOptions

    used: list = []
    real = sec.SectorDetector.update

    def spy(self, frame):  # type: ignore[no-untyped-def]
        used.append(real(self, frame))
        return used[-1]

    monkeypatch.setattr(sec.SectorDetector, "update", spy)
    first, second = _CineCam(0, n=40), _CineCam(1)  # another probe: IoU of the fans ~0.65
    cams = iter([first, second])
    with FakeBackend((1, 8, 8), 3) as be, ReconnectingSource(
            lambda: next(cams), drop="none", read_timeout=1.0, backoff_initial=0.001, backoff_max=0.002) as src:
        s = run_pipeline(_tiny(tmp_path), src, be, [ListSink()], max_frames=70, options=RunOptions(roi="sector"))
    assert len(used) >= 70
    fan_a, fan_b = first.cine._probe.fan, second.cine._probe.fan
    assert used[39].locked and _mask_iou(used[39].mask, fan_a) >= 0.9  # the first scanner's fan, locked
    assert not used[40].locked  # the new connection warms up afresh: nothing carried over
    late = used[60]  # 20 frames into the new connection (after a warm-up of 8): its own fan
    assert late.locked and _mask_iou(late.mask, fan_b) >= 0.9, (
        f"IoU {_mask_iou(late.mask, fan_b):.2f} to the new connection's fan, {_mask_iou(late.mask, fan_a):.2f} to the old")
    st = s.extra["sector"]["stats"]
    assert st["resets"] == 1 and st["detections"] == 2 and st["redetections"] == 0  # a new lock, not a re-detection
    assert s.extra["quality"]["resets"] == 1  # the gate's baseline and previous frame too


def test_no_frame_of_a_sector_bundle_is_inferred_uncropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the sector locks, a sector bundle's frames abstain ("sector_warmup"), never inferred whole."""
    pytest.importorskip("cv2")
    import edgeclf.runtime.pipeline as pl
    from edgeclf.runtime.pipeline import SECTOR_WARMUP, RunOptions

    seen: list = []

    class Spy(pl.Preprocessor):  # type: ignore[misc, name-defined]
        def __call__(self, image, out=None):  # type: ignore[no-untyped-def]
            seen.append(image.shape[:2])
            return super().__call__(image, out)

    monkeypatch.setattr(pl, "Preprocessor", Spy)
    mem = ListSink()
    with FakeBackend((1, 8, 8), 3) as be, open_source("synthetic:ultrasound?frames=20&size=128") as src:
        s = run_pipeline(_sector_bundle(tmp_path, "field"), src, be, [mem], options=RunOptions(quality=False))
    assert s.extra["roi"]["mode"] == "sector"
    inferred_full = [i for i, shape in enumerate(seen) if shape == (128, 128)]
    assert not inferred_full, f"frames {inferred_full} inferred on the whole 128x128 frame; shapes {sorted(set(seen))}"
    warm = [r for r in mem.records if r.get("abstain_reason") == SECTOR_WARMUP]
    assert len(warm) == 7 and [r["frame"] for r in warm] == list(range(7))  # the lock comes on the 8th frame
    assert all(r["probs"] is None and r["latency_ms"]["infer"] is None and r["quality"] == [] for r in warm)
    assert len(seen) == 13 and s.abstain_reasons.get(SECTOR_WARMUP) == 7
    assert s.extra["sector_warmup"] == 7 and s.quality_flagged == 0  # counted apart from the quality gate


# ------------------------------------------------------------- stills: each judged on its own by the quality gate

STILLS = ("images", "dicom", "watch")  # an image folder, a folder of single-frame DICOM files, image files dropped in
CINES = ("video", "dicom_cine", "watch_cine")  # a video stream, a multi-frame DICOM, one dropped in a watched folder


def _textured(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 200, size=(64, 64), dtype=np.uint8)  # texture ~57


def _soft(seed: int = 0) -> np.ndarray:
    """Low texture (~2.6): above the gate's absolute floor (1.0), below 0.3x a textured image's."""
    return (100 + np.random.default_rng(seed).integers(0, 8, size=(64, 64))).astype(np.uint8)


class _Video:
    """The frames as a video stream (kind "video"): one stream to the gate."""

    kind, fps, live = "video", 25.0, False

    def __init__(self, frames: list) -> None:
        self.frames, self.size, self.frame_count, self.k = frames, (64, 64), len(frames), 0

    def read(self, timeout: Optional[float] = None) -> Any:
        from edgeclf.runtime.sources import Frame

        if self.k >= len(self.frames):
            return None
        self.k += 1
        return Frame(image=self.frames[self.k - 1].copy(), index=self.k - 1, timestamp=__import__("time").monotonic(),
                     meta={"source": "video"})

    def close(self) -> None:
        pass


def _quality_of(tmp_path: Path, how: str, frames: list) -> list:
    """Each frame's record["quality"] from a run over `frames` delivered as `how` (STILLS or CINES)."""
    cv2 = pytest.importorskip("cv2")
    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.watch import WatchFolderSource
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))
    folder = tmp_path / how
    folder.mkdir()
    if how in ("dicom", "dicom_cine", "watch_cine"):
        pytest.importorskip("pydicom")
        from tests.runtime.test_dicom import write_dicom

        if how == "dicom":
            for i, f in enumerate(frames):
                write_dicom(folder / f"im{i}.dcm", f, instance=i + 1)
        else:
            write_dicom(folder / "cine.dcm", np.stack(frames), instance=1, frame_time=33.3)
    elif how in ("images", "watch"):
        t0 = 1_700_000_000
        for i, f in enumerate(frames):
            cv2.imwrite(str(folder / f"{i}.png"), f)
            os.utime(folder / f"{i}.png", (t0 + i, t0 + i))  # a watched folder reads by mtime
    mem = ListSink()
    opts = RunOptions(smoothing="off", roi="none")
    with FakeBackend((1, 8, 8), 3) as be:
        if how.startswith("watch"):
            src: Any = WatchFolderSource(str(folder), poll=0.02, idle_exit=0.5, state_path=str(tmp_path / "state.json"))
        elif how == "video":
            src = _Video(frames)
        else:
            src = open_source(str(folder))
        try:
            s = run_pipeline(b, src, be, [mem], options=opts)
        finally:
            src.close()
    assert s.frames == len(frames) == len(mem.records)
    return [r["quality"] for r in mem.records]


@pytest.mark.parametrize("how", STILLS + CINES)
def test_identical_stills_are_never_frozen_while_a_cine_of_them_is(tmp_path: Path, how: str) -> None:
    """Two X-rays alike in a row (a repeat exposure, the same file sent twice) are two stills, never "frozen" however
    many follow each other; the same frames as a cine are a frozen scanner from the 16th on (15 unchanged after it)."""
    same = _textured(0)
    near = same.copy()
    near[2, 2] ^= 1  # near-identical: one (sampled) pixel apart
    frames = [same if i % 2 == 0 else near for i in range(20)]
    got = _quality_of(tmp_path, how, frames)
    assert got == ([[]] * 20 if how in STILLS else [[]] * 15 + [["frozen"]] * 5), got


@pytest.mark.parametrize("how", STILLS + CINES)
def test_a_soft_still_after_textured_ones_is_not_empty_while_in_a_cine_it_is(tmp_path: Path, how: str) -> None:
    """A low-texture image (not empty on its own) after many highly textured ones: as a still (another patient, another
    exposure) it is judged alone and passes; in a cine the sudden loss of texture is a lifted probe: "empty"."""
    frames = [_textured(i) for i in range(12)] + [_soft()]
    got = _quality_of(tmp_path, how, frames)
    assert got == [[]] * 12 + [[] if how in STILLS else ["empty"]], got


@pytest.mark.parametrize("how", STILLS)
def test_a_blank_saturated_or_empty_still_is_still_stopped(tmp_path: Path, how: str) -> None:
    """The gate's checks of a frame on its own still stop a still: black ("blank"), gain far too high ("saturated"),
    nearly all dark with a bright strip ("empty": >= 90% dark, not blank); among 16 identical images (no "frozen")."""
    same = _textured(3)
    dark = np.zeros((64, 64), np.uint8)
    dark[:8, :40] = 200  # 20 of the 256 sampled pixels bright: mean ~16 (not blank), 92% dark
    frames = [same] * 16 + [np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8), dark, _textured(4)]
    got = _quality_of(tmp_path, how, frames)
    assert got == [[]] * 16 + [["blank"], ["saturated"], ["empty"], []], got


def test_a_still_between_cines_leaves_the_cines_gate_alone(tmp_path: Path) -> None:
    """A DICOM folder holding a cine, then stills: the stills are judged alone (no "frozen", no "empty" from the cine's
    baseline) and the gate counts them, with no reset for them."""
    pytest.importorskip("pydicom")
    from edgeclf.runtime.pipeline import RunOptions
    from tests.runtime.test_dicom import write_dicom
    from tests.runtime.tiny_bundle import make_tiny_bundle

    b = load_bundle(make_tiny_bundle(tmp_path / "b"))
    folder = tmp_path / "dcm"
    folder.mkdir()
    cine = [_textured(i) for i in range(12)]
    write_dicom(folder / "a.dcm", np.stack(cine), instance=1, frame_time=33.3)
    for i in range(17):
        write_dicom(folder / f"s{i}.dcm", _soft(), instance=2 + i)  # the same soft still, 17 times
    mem = ListSink()
    with FakeBackend((1, 8, 8), 3) as be, open_source(str(folder)) as src:
        s = run_pipeline(b, src, be, [mem], options=RunOptions(smoothing="off", roi="none"))
    assert [r["quality"] for r in mem.records] == [[]] * (12 + 17)
    q = s.extra["quality"]
    assert q["frames"] == 29 and q["stills"] == 17 and q["flagged"] == 0 and q["resets"] == 0, q


# ------------------------------------------------------------- stills under --roi sector: no sector to lock

def _sector_stills_run(tmp_path: Path, how: str, frames: list, roi: Optional[str] = None, cine: Optional[list] = None):  # type: ignore[no-untyped-def]
    """(summary, records) of a sector bundle's run over `frames` as stills delivered as `how` (STILLS), after
    `cine` (a multi-frame DICOM in the same folder) when given."""
    cv2 = pytest.importorskip("cv2")
    from edgeclf.runtime.pipeline import RunOptions
    from edgeclf.runtime.watch import WatchFolderSource

    b = _sector_bundle(tmp_path, "field")
    folder = tmp_path / how
    folder.mkdir()
    if how == "dicom":
        pytest.importorskip("pydicom")
        from tests.runtime.test_dicom import write_dicom

        if cine is not None:
            write_dicom(folder / "a.dcm", np.stack(cine), instance=1, frame_time=33.3)
        for i, f in enumerate(frames):
            write_dicom(folder / f"s{i}.dcm", f, instance=i + 2)
    else:
        t0 = 1_700_000_000
        for i, f in enumerate(frames):
            cv2.imwrite(str(folder / f"{i}.png"), f)
            os.utime(folder / f"{i}.png", (t0 + i, t0 + i))
    mem = ListSink()
    with FakeBackend((1, 8, 8), 3) as be:
        if how == "watch":
            src: Any = WatchFolderSource(str(folder), poll=0.02, idle_exit=0.5, state_path=str(tmp_path / "state.json"))
        else:
            src = open_source(str(folder))
        try:
            s = run_pipeline(b, src, be, [mem], options=RunOptions(roi=roi))
        finally:
            src.close()
    return s, mem.records


NO_SECTOR_STILL = "no_sector_still"  # the reason's name is part of the results format (evaluate, readers)


@pytest.mark.parametrize("how", STILLS)
def test_a_still_under_roi_sector_abstains_with_its_own_reason_and_one_warning(tmp_path: Path, how: str,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A sector model never classifies a still (no sector can be found in one frame, and never will: not a warm-up):
    each still abstains "no_sector_still", is not inferred, and the run says once what to pass instead."""
    import logging

    n = 12  # more than the detector's warm-up (8): stills never lock a sector, however many come
    with caplog.at_level(logging.WARNING):
        s, recs = _sector_stills_run(tmp_path, how, [_textured(i) for i in range(n)])
    assert len(recs) == n
    assert [r.get("abstain_reason") for r in recs] == [NO_SECTOR_STILL] * n
    assert all(r["probs"] is None and r["latency_ms"]["infer"] is None and r["quality"] == [] for r in recs)
    d = s.to_dict()
    assert d["abstain_reasons"] == {NO_SECTOR_STILL: n} and d["no_sector_still"] == n and d["sector_warmup"] == 0
    assert s.quality_flagged == 0  # not the gate's verdict
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and NO_SECTOR_STILL in r.getMessage()]
    assert len(said) == 1, said  # once per run, not per still
    assert "--roi x0,y0,x1,y1" in said[0] and "--roi none" in said[0] and "never saw" in said[0]
    assert "--roi x0,y0,x1,y1" in d["roi"]["warning"] and f"{n} still image(s)" in d["roi"]["warning"]


def test_a_cine_under_roi_sector_is_unchanged_and_stills_beside_it_abstain(tmp_path: Path) -> None:
    """A DICOM folder with a cine and stills: the cine warms up, locks and is classified as before; the stills abstain."""
    from edgeclf.runtime.pipeline import SECTOR_WARMUP
    from edgeclf.runtime.synthetic import UltrasoundCine

    us = UltrasoundCine(size=64, seed=0)
    cine = [us.frame(i) for i in range(14)]
    cine = [f if f.ndim == 2 else f[..., 0] for f in cine]
    s, recs = _sector_stills_run(tmp_path, "dicom", [_textured(i) for i in range(3)], cine=cine)
    why = [r.get("abstain_reason") if r["probs"] is None else "classified" for r in recs]
    assert why == [SECTOR_WARMUP] * 7 + ["classified"] * 7 + [NO_SECTOR_STILL] * 3, why
    assert s.extra["sector_warmup"] == 7 and s.extra["no_sector_still"] == 3


@pytest.mark.parametrize("roi", ["0,0,64,64", "none"])
def test_stills_on_a_sector_bundle_are_classified_with_a_box_or_roi_none(tmp_path: Path, roi: str) -> None:
    """What the warning advises works: a fixed box (or the whole frame) classifies every still."""
    s, recs = _sector_stills_run(tmp_path, "images", [_textured(i) for i in range(3)], roi=roi)
    assert all(r["probs"] is not None for r in recs) and not s.extra.get("no_sector_still")
