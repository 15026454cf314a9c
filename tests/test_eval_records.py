import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlmjax.eval.records import ResultsWriter, ScalarLogger

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A long run: one record per id, a little work per sample, resumable.
RUN_SCRIPT = """
import sys, time
from vlmjax.eval.records import ResultsWriter
path, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with ResultsWriter(path) as writer:
    for i in writer.pending(range(n)):
        time.sleep(delay)
        writer.write({"id": i, "prediction": "yes" if i % 3 else "no", "p_yes": i / n, "correct": i % 2 == 0})
"""


def _run(path, n, delay=0.0):
    return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(path), str(n), str(delay)], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": REPO_ROOT})


def _lines(path):
    with open(path, "rb") as handle:
        return handle.read().split(b"\n")


def test_write_then_resume(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    with ResultsWriter(str(path)) as writer:
        assert writer.pending([1, 2, 3]) == [1, 2, 3]
        assert writer.write({"id": 1, "prediction": "yes", "p_yes": np.float32(0.75), "extra": np.arange(2)})
        assert writer.write({"id": np.int64(2), "prediction": "no"})
        assert not writer.write({"id": 1, "prediction": "changed"})  # duplicate: refused, not written
        assert writer.pending([1, 2, 3]) == [3]
    with ResultsWriter(str(path)) as writer:
        assert writer.done_ids == {1, 2}
        assert writer.pending([3, 2, 1, 4]) == [3, 4]
        assert writer.records[0] == {"id": 1, "prediction": "yes", "p_yes": 0.75, "extra": [0, 1]}
        assert not writer.write({"id": 2, "prediction": "again"})
    assert len([line for line in _lines(path) if line]) == 2


def test_truncated_final_line_is_dropped_and_cut_off(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(str(path)) as writer:
        for i in range(3):
            writer.write({"id": f"q{i}", "prediction": "yes"})
    with open(path, "ab") as handle:
        handle.write(b'{"id": "q3", "predic')  # a crash mid-write
    with ResultsWriter(str(path)) as writer:
        assert [r["id"] for r in writer.records] == ["q0", "q1", "q2"]
        assert writer.pending(["q0", "q1", "q2", "q3", "q4"]) == ["q3", "q4"]
        writer.write({"id": "q3", "prediction": "no"})
    lines = _lines(path)
    assert lines[-1] == b"" and [json.loads(line)["id"] for line in lines[:-1]] == ["q0", "q1", "q2", "q3"]


def test_complete_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"id": 0}\n{"id": 1}')
    with ResultsWriter(str(path)) as writer:
        assert writer.pending(range(3)) == [2]
        writer.write({"id": 2})
    assert path.read_bytes() == b'{"id": 0}\n{"id": 1}\n{"id": 2}\n'


def test_corruption_before_the_end_is_an_error_not_silently_dropped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"id": 0}\n{"id": 1, bad\n{"id": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        ResultsWriter(str(path)).open()


def test_second_writer_on_the_same_file_is_refused(tmp_path):
    path = str(tmp_path / "results.jsonl")
    with ResultsWriter(path):
        with pytest.raises(RuntimeError, match="locked"):
            ResultsWriter(path).open()
    with ResultsWriter(path) as writer:  # the lock is released on close
        assert writer.records == []


def test_bad_ids_are_rejected(tmp_path):
    with ResultsWriter(str(tmp_path / "r.jsonl")) as writer:
        with pytest.raises(TypeError, match="int or str"):
            writer.write({"prediction": "yes"})
        with pytest.raises(TypeError, match="int or str"):
            writer.write({"id": 1.5})


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    n = 60
    reference = tmp_path / "reference.jsonl"
    assert _run(reference, n).wait(timeout=60) == 0

    interrupted = tmp_path / "interrupted.jsonl"
    process = _run(interrupted, n, delay=0.01)
    deadline = time.time() + 30
    while time.time() < deadline:
        if interrupted.exists() and len(_lines(interrupted)) > 15:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    written_before_kill = len([line for line in _lines(interrupted) if line.strip()])
    assert 15 <= written_before_kill < n

    assert _run(interrupted, n).wait(timeout=60) == 0
    resumed = [json.loads(line) for line in _lines(interrupted) if line.strip()]
    expected = [json.loads(line) for line in _lines(reference) if line.strip()]
    assert len(resumed) == n and len({r["id"] for r in resumed}) == n
    assert sorted(resumed, key=lambda r: r["id"]) == expected


def test_scalar_logger_writes_readable_event_files(tmp_path):
    logdir = str(tmp_path / "tb")
    with ScalarLogger(logdir) as logger:
        for step in range(3):
            logger.log(step, accuracy=0.5 + 0.1 * step, yes_ratio=0.4)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(logdir))
    accumulator = EventAccumulator(logdir)
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == {"accuracy", "yes_ratio"}
    events = accumulator.Scalars("accuracy")
    assert [e.step for e in events] == [0, 1, 2]
    assert [e.value for e in events] == pytest.approx([0.5, 0.6, 0.7])
