"""Writers for prediction records: json, jsonl and csv, to a stream or a file.

Every writer streams: records are written as batches arrive and never collected. jsonl is
flushed after every batch, so an interrupted run keeps every finished record. json and csv
files go to a temporary file beside the target that is renamed over it only when the run
finishes, so a reader never sees half a file (an interrupted run leaves the old file alone).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from ..errors import InputError
from ..fileio import temp_file_beside

FORMATS = ("table", "json", "jsonl", "csv")
FILE_FORMATS = ("json", "jsonl", "csv")
_SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def format_for_path(path: str | Path) -> str | None:
    """The format a file name implies (results.csv -> csv), or None."""
    return _SUFFIX_FORMATS.get(Path(path).suffix.lower())


class _AtomicTextFile:
    """A text file written beside `path` and renamed over it on commit()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd, self.tmp = temp_file_beside(path)
        self.handle = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.handle.close()
        Path(self.tmp).unlink(missing_ok=True)


def _open_target(path: Path | None, stream: TextIO | None, atomic: bool):
    """(text handle, atomic file or None, whether we opened a plain file)."""
    if path is None:
        return stream, None, False
    if path.is_dir():
        raise InputError(
            f"--output {path}: is a folder; give a file name such as {path / 'predictions.jsonl'}"
        )
    try:
        if atomic:
            target = _AtomicTextFile(path)
            return target.handle, target, False
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8", newline=""), None, True
    except OSError as error:
        raise InputError(
            f"--output {path}: cannot write there ({error.strerror or error}); choose another path"
        ) from None


class RecordWriter:
    """Base: write(records) per batch, then close(); abort() on failure. A context manager."""

    atomic = False

    def __init__(self, path: str | Path | None = None, stream: TextIO | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.handle, self._atomic, self._owned = _open_target(self.path, stream, self.atomic)
        self.count = 0

    def write(self, records: Iterable[dict]) -> None:
        for record in records:
            self._write_one(record)
            self.count += 1
        self.handle.flush()

    def _write_one(self, record: dict) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Closing text (json's bracket)."""

    def close(self) -> None:
        self._finish()
        self.handle.flush()
        if self._atomic is not None:
            self._atomic.commit()
        elif self._owned:
            self.handle.close()

    def abort(self) -> None:
        """Stop early: an atomic target is discarded, a streamed one keeps what it has."""
        if self._atomic is not None:
            self._atomic.abort()
            return
        try:
            self.handle.flush()
        finally:
            if self._owned:
                self.handle.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class JsonLinesWriter(RecordWriter):
    """One JSON object per line, flushed per batch (not atomic, on purpose)."""

    def _write_one(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")


class JsonWriter(RecordWriter):
    """One JSON array, streamed element by element, atomic when written to a file."""

    atomic = True

    def _write_one(self, record: dict) -> None:
        self.handle.write(
            ("[\n  " if self.count == 0 else ",\n  ") + json.dumps(record, ensure_ascii=False)
        )

    def _finish(self) -> None:
        self.handle.write("[]\n" if self.count == 0 else "\n]\n")


class CsvWriter(RecordWriter):
    """One row per image: path, label_1, score_1, ..., label_k, score_k, error."""

    atomic = True

    def __init__(
        self, path: str | Path | None = None, stream: TextIO | None = None, top_k: int = 5
    ) -> None:
        super().__init__(path, stream)
        self.top_k = top_k
        self.csv = csv.writer(self.handle, lineterminator="\n")
        header = ["path"]
        for rank in range(1, top_k + 1):
            header += [f"label_{rank}", f"score_{rank}"]
        self.csv.writerow(header + ["error"])

    def _write_one(self, record: dict) -> None:
        row = [record["path"]]
        predictions = record.get("predictions", [])
        for rank in range(self.top_k):
            if rank < len(predictions):
                row += [predictions[rank]["label"], repr(float(predictions[rank]["score"]))]
            else:
                row += ["", ""]
        self.csv.writerow(row + [record.get("error", "")])


def open_writer(
    format: str, path: str | Path | None = None, stream: TextIO | None = None, top_k: int = 5
) -> RecordWriter:
    """A writer for json, jsonl or csv to `path` (a file) or else `stream`."""
    if format == "jsonl":
        return JsonLinesWriter(path, stream)
    if format == "json":
        return JsonWriter(path, stream)
    if format == "csv":
        return CsvWriter(path, stream, top_k=top_k)
    raise InputError(f"unknown output format {format!r}: use one of {', '.join(FILE_FORMATS)}")
