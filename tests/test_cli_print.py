"""The CLI's human-readable summaries show what the reports hold: candidates that could not be built, and the
copy-group interval of an image cross-validation."""
from __future__ import annotations

import pytest

from edgeclf import cli


def test_export_summary_names_a_candidate_that_could_not_be_built(capsys: pytest.CaptureFixture[str]) -> None:
    m = {"name": "b", "model": {"architecture": "compact"}, "task": "binary", "parity": None, "provenance": {"parity": "skipped"},
         "deploy": {"precision": "fp32", "reason": "int8-cpu could not be built", "max_drop": 0.01,
                    "candidates": [{"id": "int8-cpu", "built": False, "error": "onnxruntime could not quantize model.onnx (x)"}]}}
    cli._print_export(m)
    out = capsys.readouterr().out
    assert "NOT BUILT" in out and "int8-cpu could not be built: onnxruntime could not quantize model.onnx (x)" in out


def test_image_cross_validation_prints_the_copy_group_interval(capsys: pytest.CaptureFixture[str]) -> None:
    dec = {"accuracy": 0.8, "accuracy_ci95": [0.7, 0.9], "balanced_accuracy": 0.75, "balanced_accuracy_ci95": [0.65, 0.85],
           "clustered": {"unit": "copy group", "clusters": 40, "accuracy_ci95": [0.6, 0.95], "balanced_accuracy_ci95": [0.55, 0.9]}}
    r = {"pooled_out_of_fold": {"decisions": dec}, "data": {"grouped_by": "group"}, "seconds": 1,
         "folds": [{"fold": 0, "test_items": 10, "test": {"accuracy": 0.8, "balanced_accuracy": 0.75}}]}
    cli._print_cv(r)
    out = capsys.readouterr().out
    assert "bootstrap over the 40 copy groups instead: 0.550-0.900" in out
    header = next(ln for ln in out.splitlines() if "test items" in ln)
    assert "clips" not in header and "sources" not in header, header  # an image data set has neither


def _clips(n: int) -> dict:
    level = {"n": n, "abstained": 0, "accuracy": 0.5, "accuracy_ci95": [0.2, 0.8], "balanced_accuracy": 0.5,
             "balanced_accuracy_ci95": [0.2, 0.8], "per_class": {"a": {"sensitivity": 1.0}, "b": {"sensitivity": 0.0}}}
    return {"clips": 4, "frames": 8, "clip_mean": level, "clip_vote": level, "frame": {**level, "n": 8}}


def test_training_metrics_with_clip_figures_print_them_as_clips(capsys: pytest.CaptureFixture[str]) -> None:
    m = {"n": 8, "accuracy": 0.5, "balanced_accuracy": 0.5, "auc": {"macro": 0.6, "macro_ci95": [0.4, 0.8]}, "ece": 0.1,
         "per_class": {"a": {"sensitivity": 1.0, "specificity": 0.0}}}
    cli._print_metrics({"val": m, "test": m, "test_clips": _clips(4)}, "trained")
    out = capsys.readouterr().out
    assert "[test_clips]" in out and "4 clips, 8 frames" in out and "clip, mean probability" in out
    assert "at the recorded operating points" in out
    # training's clip figures, like evaluate's, leave out the frames run would not classify: said
    assert "those `edgeclf run` would not classify abstained, as in `edgeclf evaluate`" in out


def test_training_test_figures_say_how_many_frames_abstained(capsys: pytest.CaptureFixture[str]) -> None:
    m = {"n": 8, "accuracy": 0.5, "balanced_accuracy": 0.5, "auc": {"macro": 0.6, "macro_ci95": [0.4, 0.8]}, "ece": 0.1,
         "per_class": {"a": {"sensitivity": 1.0, "specificity": 0.0}}}
    gated = {**m, "abstained": 2, "abstain_reasons": {"blank": 2}, "min_confidence": 0.0}
    cli._print_metrics({"val": m, "test": gated}, "trained")
    assert "[test] 2 abstained (2 blank)" in capsys.readouterr().out


def test_export_candidates_give_latency_per_image(capsys: pytest.CaptureFixture[str]) -> None:
    c = {"id": "int8-cpu", "passed": True, "decision_agreement": 1.0, "size_bytes": 1e6, "latency_ms": {"median": 1.5},
         "worst": {"metric": "auc", "drop": 0.0, "drop_ci95": [0.0, 0.0]}}
    cli._print_export({"name": "b", "model": {"architecture": "compact"}, "task": "binary", "parity": None,
                       "provenance": {"parity": "skipped"}, "deploy": {"precision": "fp32", "candidates": [c]}})
    assert "median ms/image" in capsys.readouterr().out


def test_run_summary_counts_the_watched_folders_lost_files(capsys: pytest.CaptureFixture[str]) -> None:
    s = {"stages_ms": {}, "frames": 3, "wall_s": 1, "fps": 3, "written": 3, "abstained": 0, "label_counts": {"a": 3},
         "source_stats": {"files_unreadable": 2, "files_changed": 1, "files_done": 3, "dropped": 0}}
    cli._print_run(s)
    out = capsys.readouterr().out
    assert "source: files_unreadable 2, files_changed 1" in out
    # A wrapped video's undecodable frames (--realtime: the reader's stats carry the video's as source_*)
    cli._print_run({**s, "source_stats": {"captured": 9, "dropped": 0, "source_skipped": 2}})
    assert "source: source_skipped 2" in capsys.readouterr().out


def test_evaluate_title_names_the_decided_class_probability(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import edgeclf.evaluate

    m = {"n": 8, "accuracy": 0.5, "balanced_accuracy": 0.5, "auc": {"macro": 0.6}, "ece": 0.1, "per_class": {},
         "abstained": 2, "min_confidence": 0.6, "coverage": 0.8}
    report = {"target": "b", "evaluated_with": "ort", "data": {"n": 10}, "metrics": {**m, "all_frames": {**m, "n": 10}}}
    monkeypatch.setattr(edgeclf.evaluate, "evaluate", lambda *a, **k: report)
    res = CliRunner().invoke(cli.cli, ["evaluate", "--model", "b", "--data", "synthetic:ultrasound"])
    assert res.exit_code == 0, res.output
    assert "decided class's probability below min_confidence 0.6" in res.output


@pytest.mark.parametrize("cmd", [["run"], ["profile"], ["bundle", "check"]])
def test_engine_cache_help_names_xdg_cache_home(cmd: list[str]) -> None:
    from click.testing import CliRunner

    out = " ".join(CliRunner().invoke(cli.cli, [*cmd, "--help"], terminal_width=200).output.split())
    assert "$EDGECLF_ENGINE_CACHE, else $XDG_CACHE_HOME/edgeclf/engines, else ~/.cache/edgeclf/engines" in out


def test_min_confidence_help_judges_the_decided_class() -> None:
    from click.testing import CliRunner

    out = " ".join(CliRunner().invoke(cli.cli, ["run", "--help"], terminal_width=200).output.split())
    assert "Abstain when the probability of the class decided is below this" in out


def test_train_on_clips_prints_its_clip_figures(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("torch")
    pytest.importorskip("cv2")
    from click.testing import CliRunner

    from tests.test_evaluate_clips import _phantom_clips

    root = _phantom_clips(tmp_path / "clips", per_class=4, n_frames=3, size=32)
    res = CliRunner().invoke(cli.cli, ["train", "--data", f"{root}?test=0.34&val=0.34", "--out", str(tmp_path / "m"), "--size", "32",
                                       "--epochs", "1", "--frames-per-clip", "2", "--threads", "1"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "[test_clips]" in res.output and "clip, majority vote" in res.output


def test_demo_printout_counts_unclassified_cine_frames(capsys: pytest.CaptureFixture[str]) -> None:
    seg = {"start": 0, "end": 3, "label": "normal", "majority": "normal", "agreement": 2 / 3}
    r = {"held_out_test": {"n": 3, "per_class_accuracy": {"normal": 1.0}}, "out": "o",
         "cine": {"segments": [seg], "frames_predicted": 3, "frames_in_timeline": 3, "agreement": 2 / 3,
                  "shown_label_agreement": 2 / 3, "abstained": 1, "frames_unclassified": 1, "frames_missing": 0},
         "runtime": {"fps": 30, "stages_ms": {"infer": {"median": 1.0, "p90": 2.0}}}, "seconds": {"total": 1.0}}
    cli._print_demo(r)
    out = capsys.readouterr().out
    assert "cine frames unclassified 1" in out and "missing" not in out


def test_export_parity_agreement_is_a_count_not_a_rounded_percentage(capsys: pytest.CaptureFixture[str]) -> None:
    m = {"name": "b", "model": {"architecture": "compact"}, "task": "binary",
         "parity": {"n": 2500, "split": "val", "decision_agreement": 2499 / 2500, "max_abs_diff_logits": 1e-6, "min_cosine": 1.0}}
    cli._print_export(m)
    out = capsys.readouterr().out
    assert "decisions agree on 2499 of 2500" in out and "100.0%" not in out


def test_a_multi_file_run_prints_one_clip_decision_per_file_and_counts_the_stills(capsys: pytest.CaptureFixture[str]) -> None:
    """Several cines (or a watched folder's files) are several clips: the end-of-run print gives each its decision and
    none over all of them; single-frame files are counted, each decided by its own result."""
    from edgeclf.cli import _print_run

    stage = {"median": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}
    one = {"frames": 12, "used": 12, "abstained": 0}
    s = {"frames": 26, "wall_s": 0.1, "fps": 30, "written": 26, "abstained": 0, "stages_ms": {"infer": stage},
         "label_counts": {"a": 26},
         "clip": {"majority_label": "a", "abstain_rate": 0.0, "decision": None, "stills": 2,
                  "decisions": [{**one, "file_index": 0, "mean_label": "normal", "vote_label": "normal"},
                                {**one, "file_index": 1, "mean_label": "mass", "vote_label": "mass"}]}}
    _print_run(s)
    out = capsys.readouterr().out
    assert "one per file (2 clips; no decision over several files)" in out
    assert "file 0: mean probability normal" in out and "file 1: mean probability mass, majority vote mass" in out
    assert "2 single-frame file(s)" in out and "clip decision (as" not in out
    # the run-wide shown-label count spans the files: said, beside the per-file decisions
    assert "shown labels (after smoothing), over all 4 files (not a decision): most frames a" in out


def test_a_model_pruned_twice_says_what_is_left_of_the_unpruned_one(capsys: pytest.CaptureFixture[str]) -> None:
    lat = {"median": 1.0}
    pr = {"parent": "p1", "macs": {"before": 11.3e6, "after": 5.5e6, "ratio": 0.49, "ratio_of_original": 0.23},
          "params": {"before": 1e6, "after": 5e5}, "latency_ms": {"before": lat, "after": lat}, "metrics_before": {},
          "verdict": "v", "previous": {"parent": "trained"}, "original": {"model": "trained", "macs": 24.2e6}}
    cli._print_prune({"pruning": pr, "metrics": {}})
    assert "p1 was itself pruned: this model keeps 23% of the unpruned trained's 24.2 M MACs" in capsys.readouterr().out


def test_export_gate_states_its_rule_and_why_a_large_drop_passed(capsys: pytest.CaptureFixture[str]) -> None:
    """A drop above --max-drop fails only when its interval excludes zero (or it exceeds the ceiling): a row that
    passed with a larger drop printed only "pass" under a header saying "max drop 0.01"."""
    def cand(i: str, drop: float, lo: float) -> dict:
        return {"id": i, "passed": True, "failed_on": [], "decision_agreement": 0.99, "size_bytes": 1e6, "latency_ms": {},
                "worst": {"metric": "sensitivity[normal]", "drop": drop, "drop_ci95": [lo, 0.04]}}
    cli._print_export({"name": "b", "model": {"architecture": "compact"}, "task": "binary", "parity": None,
                       "provenance": {"parity": "skipped"},
                       "deploy": {"precision": "int8", "max_drop": 0.01,
                                  "candidates": [cand("int8-tensorrt", 0.0148, 0.0), cand("fp16-tensorrt", 0.004, -0.01)]}})
    out = capsys.readouterr().out
    assert "fails a drop above 0.01 whose interval excludes 0, or any drop above 0.05" in out, out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith(("int8-", "fp16-"))}
    assert "pass (interval reaches 0)" in rows["int8-tensorrt"]
    assert "interval reaches" not in rows["fp16-tensorrt"]  # within --max-drop: a plain pass


def _profile_target(ci: bool) -> dict:
    stage = {"median": 1.0, "p90": 1.2, "p99": 1.5, "max": 2.0, "std": 0.1, "throughput_per_s": 1000.0,
             "ci95": {"median": [0.9, 1.1], "p99": [1.4, 1.6]} if ci else None}
    return {"name": "a", "model": "compact", "backend": "onnxruntime-cpu", "frames": 100, "fps": 900.0,
            "stages_ms": {"latency": stage}, "ratio_to_first": None,
            "cold_start": {"bundle_load_ms": 1.0, "backend_create_ms": 1.0, "session_ms": 1.0, "time_to_first_result_ms": 1.0},
            "warmup": {"frames": 5, "stages_ms": {}}, "system": {"energy": {"available": False, "reason": "none"}}}


def test_profile_without_bootstrap_prints_plain_medians(capsys: pytest.CaptureFixture[str]) -> None:
    """--bootstrap 0 printed "95% bootstrap intervals" and "median (95% CI)" columns with no intervals in them."""
    def doc(ci: bool) -> dict:
        off = {"available": False, "reason": "none"}
        return {"targets": [_profile_target(ci)], "warnings": [],
                "cold_start": {"process_start_to_first_result_ms": 9.0, "cli_entry_to_first_result_ms": 8.0},
                "system": {"process": {"cpu_percent_mean": 50.0, "rss_mb_start": 1.0, "rss_mb_end": 1.0,
                                       "rss_slope_mb_per_10k_frames": 0.0}, "gpu": off, "tegrastats": off}}
    cli._print_profile(doc(ci=False))
    out = capsys.readouterr().out
    assert "95%" not in out and "CI" not in out and "no intervals (--bootstrap 0)" in out, out
    cli._print_profile(doc(ci=True))
    out = capsys.readouterr().out
    assert "95% bootstrap intervals" in out and "median (95% CI)" in out and "(0.900-1.100)" in out
