"""Writers for prediction records: json, jsonl and csv, to a stream or a file.

Every writer streams: records are written as batches arrive and never collected. jsonl is
flushed after every batch, so an interrupted run keeps every finished record. json and csv
files go to a temporary file beside the target that is renamed over it only when the run
finishes, so a reader never sees half a file (an interrupted run leaves the old file alone).
A write that fails (disk full, read-only folder, file size limit, a closed or broken stdout)
removes the temporary file and raises OutputError: one line, no traceback. A streamed file
(jsonl to a file, anything to a stdout that is a file) is cut back to the end of the last
batch written in full, so it never ends on half a record.

Text that cannot go into a file as it is, is escaped reversibly by vitcli/text.py
(docs/predict.md):
- JSON: characters that are valid JSON but unsafe or unencodable (a name that is not UTF-8
  holds lone surrogates; DEL and C1 controls; bidi overrides) are written as \\uXXXX escapes,
  which every JSON reader turns back into the same string (Python: os.fsencode gives the bytes).
- CSV: a backslash is doubled, a control character becomes \\u00XX, a byte that is not UTF-8
  becomes \\xHH; then a cell that starts with = + - @ or ' gets a ' in front, so that no
  spreadsheet runs it as a formula (OWASP's advice). Scores are plain numbers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import stat
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import TextIO

from ..errors import InputError, OptionError, OutputError, VitError
from ..fileio import output_error, temp_file_beside, write_target
from ..text import csv_text, csv_unescape, json_line

__all__ = ["csv_text", "csv_unescape", "json_line"]  # re-exported: the writers' escaping


class OutputFormat(str, Enum):
    """How records are written: a table on a terminal, or a machine-readable format."""

    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


FILE_FORMATS = ("json", "jsonl", "csv")
_SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def format_for_path(path: str | Path) -> str | None:
    """The format a file name implies (results.csv -> csv), or None."""
    return _SUFFIX_FORMATS.get(Path(path).suffix.lower())


def choose_format(
    chosen: str | None, output: str | Path | None, stdout_is_terminal: bool
) -> OutputFormat:
    """--format when given; else from the --output suffix (jsonl if none); else a table on a
    terminal and jsonl in a pipe."""
    if chosen is not None:
        return OutputFormat(chosen)
    if output is not None:
        return OutputFormat(format_for_path(output) or "jsonl")
    return OutputFormat.table if stdout_is_terminal else OutputFormat.jsonl


# -- targets -----------------------------------------------------------------------------------


def _cannot_write(path: Path | None, error: OSError, atomic: bool = True) -> OutputError:
    where = f"--output {path}" if path is not None else "standard output"
    if path is not None and not atomic:
        where += " (it ends on the last whole record)"
    return output_error(where, error, replaced=path is not None and atomic)


class _AtomicTextFile:
    """A text file written beside `path` (a symlink's target) and renamed over it on commit()."""

    def __init__(self, path: Path) -> None:
        self.path = write_target(path)
        fd, self.tmp = temp_file_beside(self.path)
        self.handle = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes into the error that got us here
            self.handle.close()
        Path(self.tmp).unlink(missing_ok=True)


def _open_target(path: Path | None, stream: TextIO | None, atomic: bool):
    """(text handle, atomic file or None, whether we opened a plain file)."""
    if path is None:
        return stream, None, False
    if path.is_dir():
        raise OptionError(
            f"--output {path}: is a folder; give a file name such as {path / 'predictions.jsonl'}"
        )
    try:
        if atomic:
            target = _AtomicTextFile(path)
            return target.handle, target, False
        path.parent.mkdir(parents=True, exist_ok=True)
        # A plain open follows a symlink and keeps the file's mode, as the atomic path does.
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
        self._ended = False  # closed or aborted: abort() again does nothing
        self._whole = self._offset()  # where the last whole batch ends (a regular file only)

    def _offset(self) -> int | None:
        """The byte offset of a streamed regular file (None for a pipe, a terminal, a
        temporary file that is discarded anyway)."""
        if self._atomic is not None:
            return None
        try:
            fd = self.handle.fileno()
            return os.lseek(fd, 0, os.SEEK_CUR) if stat.S_ISREG(os.fstat(fd).st_mode) else None
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return None

    def _cut_back(self) -> None:
        """After a failed write: drop the partial batch, so the file ends on a record."""
        if self._whole is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if self._owned and self.path is not None:
                os.truncate(self.path, self._whole)  # closed by abort(): by name
            else:
                fd = self.handle.fileno()
                os.ftruncate(fd, self._whole)
                os.lseek(fd, self._whole, os.SEEK_SET)

    def _failed(self, error: Exception) -> VitError:
        self.abort()
        self._cut_back()
        if isinstance(error, VitError):  # a guarded stdout said it already (console.py)
            return error
        assert isinstance(error, OSError)
        return _cannot_write(self.path, error, atomic=self._atomic is not None)

    def write(self, records: Iterable[dict]) -> None:
        try:
            for record in records:
                self._write_one(record)
                self.count += 1
            self.handle.flush()
        except BrokenPipeError:
            raise
        except (OSError, OutputError) as error:
            raise self._failed(error) from None
        self._whole = self._offset()

    def _write_one(self, record: dict) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Closing text (json's bracket)."""

    def close(self) -> None:
        if self._ended:
            return
        try:
            self._finish()
            self.handle.flush()
            if self._atomic is not None:
                self._atomic.commit()
            elif self._owned:
                self.handle.close()
        except BrokenPipeError:
            raise
        except (OSError, OutputError) as error:
            raise self._failed(error) from None
        self._ended = True

    def abort(self) -> None:
        """Stop early: an atomic target is discarded, a streamed one keeps what it has."""
        if self._ended:
            return
        self._ended = True
        if self._atomic is not None:
            self._atomic.abort()
            return
        try:
            self.handle.flush()
        except (OSError, ValueError):  # ValueError: the stream was closed under us
            pass
        finally:
            if self._owned:
                with contextlib.suppress(OSError):
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
        self.handle.write(json_line(record) + "\n")


class JsonWriter(RecordWriter):
    """One JSON array, streamed element by element, atomic when written to a file."""

    atomic = True

    def _write_one(self, record: dict) -> None:
        self.handle.write(("[\n  " if self.count == 0 else ",\n  ") + json_line(record))

    def _finish(self) -> None:
        self.handle.write("[]\n" if self.count == 0 else "\n]\n")


class CsvWriter(RecordWriter):
    """One row per image: path, label_1, score_1, ..., label_k, score_k, error."""

    atomic = True

    def __init__(
        self,
        path: str | Path | None = None,
        stream: TextIO | None = None,
        top_k: int = 5,
        decode_column: bool = False,
    ) -> None:
        super().__init__(path, stream)
        self.top_k = top_k
        self.decode_column = decode_column  # a "decode" column when --fast-decode was used
        # Every control character is escaped in the cells (csv_text), so no raw CR or LF can
        # split a row whatever the line terminator.
        self.csv = csv.writer(self.handle, lineterminator="\n")
        header = ["path"]
        for rank in range(1, top_k + 1):
            header += [f"label_{rank}", f"score_{rank}"]
        try:
            self.csv.writerow(header + ["error"] + (["decode"] if decode_column else []))
        except (OSError, OutputError) as error:
            raise self._failed(error) from None

    def _write_one(self, record: dict) -> None:
        row = [csv_text(record["path"])]
        predictions = record.get("predictions", [])
        for rank in range(self.top_k):
            if rank < len(predictions):
                prediction = predictions[rank]
                row += [csv_text(prediction["label"]), repr(float(prediction["score"]))]
            else:
                row += ["", ""]
        # The path has its own column: the error cell says only what went wrong.
        error = record.get("error", "").removeprefix(f"{record['path']}: ")
        row.append(csv_text(error))
        if self.decode_column:
            row.append(record.get("decode", ""))
        self.csv.writerow(row)


def open_writer(
    format: str,
    path: str | Path | None = None,
    stream: TextIO | None = None,
    top_k: int = 5,
    decode_column: bool = False,
) -> RecordWriter:
    """A writer for json, jsonl or csv to `path` (a file) or else `stream`."""
    if format == "jsonl":
        return JsonLinesWriter(path, stream)
    if format == "json":
        return JsonWriter(path, stream)
    if format == "csv":
        return CsvWriter(path, stream, top_k=top_k, decode_column=decode_column)
    raise InputError(f"unknown output format {format!r}: use one of {', '.join(FILE_FORMATS)}")
