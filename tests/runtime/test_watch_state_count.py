"""`watch_state_of`: how many files a watched folder's state records as handled, read without opening the source."""
from __future__ import annotations

import json
from pathlib import Path

from edgeclf.runtime.watch import STATE_NAME, watch_state_of


def _state(path: Path, files: dict) -> None:
    path.write_text(json.dumps({"format": "edgeclf-watch-state", "version": 1, "files": files}))


def test_done_failed_and_partly_acknowledged_files_count_new_ones_do_not(tmp_path: Path) -> None:
    _state(tmp_path / STATE_NAME, {"a": {"status": "done", "frames": 1, "acked": 1}, "b": {"status": "failed", "acked": 0},
                                   "c": {"status": "partial", "frames": 9, "acked": 4},
                                   "d": {"status": "partial", "frames": 9, "acked": 0}})
    assert watch_state_of(f"watch:{tmp_path}?poll=0.5") == (False, 3)
    other = tmp_path / "elsewhere.json"
    _state(other, {"a": {"status": "done", "acked": 1}})
    assert watch_state_of(f"watch:{tmp_path}?state={other}&poll=1") == (True, 1)


def test_no_state_or_one_that_is_not_a_state_counts_nothing(tmp_path: Path) -> None:
    assert watch_state_of(f"watch:{tmp_path}") == (False, 0)
    (tmp_path / STATE_NAME).write_text("{not json")
    assert watch_state_of(f"watch:{tmp_path}") == (False, 0)
    (tmp_path / STATE_NAME).write_text(json.dumps({"format": "other", "files": {"a": {"status": "done"}}}))
    assert watch_state_of(f"watch:{tmp_path}") == (False, 0)
