"""Crash-safe per-sample results for long evaluation runs, and a small TensorBoard scalar logger.

``ResultsWriter`` appends one JSON object per line and flushes + fsyncs each line before returning, so a killed run
loses at most the line being written. Reopening the file keeps every complete record, drops a truncated final line
(cutting it off the file so the next append starts clean), and reports which ids are done. A record whose id is
already in the file is never written again, and an exclusive lock stops two processes appending to the same file.

    with ResultsWriter("results.jsonl") as writer:
        for question_id in writer.pending(all_ids):
            writer.write({"id": question_id, "prediction": ..., "p_yes": ..., "correct": ...})
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from typing import Iterable, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from vlmjax.errors import VlmJaxError
from vlmjax.fingerprint import claim, sidecar


def _json_default(value):
    """Let numpy / JAX scalars and arrays through json.dumps."""
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _nonfinite(value) -> bool:
    """A number or numeric array holding NaN or inf (what a record must never carry)."""
    try:
        return not np.isfinite(np.asarray(value, dtype=float)).all()
    except (TypeError, ValueError):
        return False


class ResultsWriter:
    """Append-only JSONL results file that resumes after a crash; see the module docstring."""

    def __init__(self, path: str, id_key: str = "id", fingerprint: Mapping | None = None, overwrite: bool = False):
        self.path = path
        self.id_key = id_key
        self.fingerprint = fingerprint  # see vlmjax.fingerprint: a resume must match it
        self.overwrite = overwrite  # discard the records already in the file
        self._records: list[dict] = []
        self._done: set = set()
        self._handle = None

    def __enter__(self) -> "ResultsWriter":
        self.open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def open(self) -> None:
        """Lock the file, read the complete records, and cut off a truncated final line."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        handle = open(self.path, "a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RuntimeError(f"{self.path} is locked by another running process; run one writer per file") from None
        self._handle = handle
        if self.overwrite:
            handle.truncate(0)
        handle.seek(0)
        self._recover(handle.read())
        if self.fingerprint is not None:
            claim(sidecar(self.path), self.fingerprint, bool(self._records), self.path)

    def _recover(self, content: bytes) -> None:
        lines = content.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: empty unless the last write was cut short
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise VlmJaxError(f"{self.path} line {number} is not JSON but is followed by complete lines, so it is "
                                  "not a crash artifact (an edit by hand?). Fix or delete that line and resume, or "
                                  "start again: a fresh output directory, or --overwrite (overwrite=True)") from None
            self._remember(record, number)
        if tail.strip():
            try:
                record = json.loads(tail)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and self.id_key in record:
                self._remember(record, len(lines) + 1)  # complete record whose newline was lost: keep it
                self._append(b"\n")
            else:
                self._handle.truncate(len(content) - len(tail))
                self._handle.flush()
                os.fsync(self._handle.fileno())

    def _remember(self, record, line_number: int) -> None:
        if not isinstance(record, dict) or self.id_key not in record:
            raise VlmJaxError(f"{self.path} line {line_number} is not a JSON object with key {self.id_key!r}. Fix or "
                              "delete that line, or start again with a fresh output directory or --overwrite")
        if record[self.id_key] in self._done:
            raise VlmJaxError(f"{self.path} line {line_number} repeats id {record[self.id_key]!r}. Delete that line, "
                              "or start again with a fresh output directory or --overwrite")
        self._done.add(record[self.id_key])
        self._records.append(record)

    def _append(self, data: bytes) -> None:
        self._handle.write(data)  # the file is in append mode: this always lands at the end
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the lock
            self._handle = None

    @property
    def done_ids(self) -> set:
        return set(self._done)

    @property
    def records(self) -> list[dict]:
        """Every complete record in the file, in file order (including those written by this writer)."""
        return list(self._records)

    def pending(self, all_ids: Iterable) -> list:
        """The ids of ``all_ids`` not yet in the file, in the given order."""
        return [i for i in all_ids if i not in self._done]

    def write(self, record: Mapping) -> bool:
        """Append ``record`` durably; returns False (and writes nothing) if its id is already in the file."""
        if self._handle is None:
            raise RuntimeError("ResultsWriter is not open; use it as a context manager")
        record_id = record.get(self.id_key)
        if isinstance(record_id, np.integer):
            record_id = int(record_id)
        if not isinstance(record_id, (int, str)) or isinstance(record_id, bool):
            raise TypeError(f"record key {self.id_key!r} must be an int or str id, got {record_id!r}")
        if record_id in self._done:
            return False
        record = {**record, self.id_key: record_id}
        try:
            line = json.dumps(record, default=_json_default, ensure_ascii=False, allow_nan=False)
        except ValueError:
            bad = sorted(k for k, v in record.items() if _nonfinite(v))
            raise VlmJaxError(f"Record {record_id!r} for {self.path} holds a non-finite number (NaN or inf) in "
                              f"{bad or 'a nested field'}; it is not written. Find where it stops being finite with "
                              "model(**inputs, check_finite=True).") from None
        self._append(line.encode("utf-8") + b"\n")
        self._done.add(record_id)
        self._records.append(json.loads(line))
        return True


class ScalarLogger:
    """TensorBoard scalars without torch or TensorFlow: ``log(step, accuracy=..., yes_ratio=...)``.

    Writes classic ``simple_value`` summaries, which TensorBoard and ``EventAccumulator.Scalars`` read directly.
    """

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._writer = EventFileWriter(logdir)

    def __enter__(self) -> "ScalarLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def log(self, step: int, **scalars: float) -> None:
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        self._writer.add_event(event)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
