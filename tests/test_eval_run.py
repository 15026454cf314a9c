"""The evaluation run: records appended as done, and a run killed with SIGKILL then resumed equals an
uninterrupted one exactly (no record lost, none repeated)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoProcessor

import vlmjax
from vlmjax import cli
from vlmjax.data.shapes import generate_dataset
from vlmjax.eval.run import evaluate_pope, load_shapes_pope, null_image
from vlmjax.testing.tiny import make_tiny_llava

LIMIT = 8  # questions per split: 24 in all


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_tiny_llava(root / "model", variant="gqa")
    generate_dataset(str(root / "data"), 16, seed=5, image_size=56, progress=False)
    return root


def _read(path):
    return sorted((json.loads(line) for line in open(path)), key=lambda r: r["id"])


def test_killed_and_resumed_run_equals_uninterrupted(setup, tmp_path):
    model = vlmjax.load(setup / "model", progress=False)
    processor = AutoProcessor.from_pretrained(str(setup / "model"))
    records = load_shapes_pope(setup / "data", limit=LIMIT)
    assert len(records) == 3 * LIMIT
    evaluate_pope(model, processor, records, tmp_path / "whole.jsonl", batch_size=1, progress=False)
    whole = _read(tmp_path / "whole.jsonl")
    assert [r["id"] for r in whole] == sorted(r.question_id for r in records)

    out = tmp_path / "killed"
    argv = ["eval", "--model", str(setup / "model"), "--data", str(setup / "data"), "--limit", str(LIMIT),
            "--batch-size", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "vlmjax.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results, written = out / "results.jsonl", 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        written = sum(1 for _ in open(results)) if results.exists() else 0
        if written >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= written < len(records), f"the run must be killed mid-way ({written} of {len(records)} written)"

    assert cli.main(argv) == 0
    resumed = _read(results)
    assert [r["id"] for r in resumed] == [r["id"] for r in whole]  # none lost, none repeated
    assert resumed == whole  # the same predictions and the same p_yes, to the last bit


def test_null_image_keeps_size():
    from PIL import Image

    image = Image.new("RGB", (30, 20), (10, 200, 30))
    black = null_image(image, "black")
    assert black.size == (30, 20) and black.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert null_image(image, "gray").getpixel((3, 3)) == (128, 128, 128)
