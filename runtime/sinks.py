"""Where results go. Every sink counts what it wrote, so nothing is dropped without a count."""
from __future__ import annotations

import json
import os
from typing import IO, Any, Dict, List, Optional, Union

from edgeclf.errors import EdgeclfError

__all__ = ["Sink", "JsonlSink", "ListSink"]


class Sink:
    written = 0

    def write(self, record: Dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlSink(Sink):
    """One JSON object per line, flushed per line so a killed run leaves only whole lines."""

    def __init__(self, path: Union[str, os.PathLike[str]], *, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync
        self.written = 0
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            self._f: Optional[IO[str]] = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (held open across writes)
        except OSError as exc:
            raise EdgeclfError(f"cannot write results to {self.path}: {exc.strerror}; choose another --out") from None

    def write(self, record: Dict[str, Any]) -> None:
        if self._f is None:
            raise EdgeclfError(f"results file {self.path} is already closed")
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())
        except OSError as exc:
            raise EdgeclfError(
                f"writing result {self.written + 1} to {self.path} failed ({exc.strerror}); {self.written} results were written before it"
            ) from None
        self.written += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ListSink(Sink):
    """Keeps records in memory (tests, the demo's summary)."""

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []
        self.written = 0

    def write(self, record: Dict[str, Any]) -> None:
        self.records.append(record)
        self.written += 1
