"""Two processes on this machine (jax.distributed, CPU collectives), 4 simulated devices each, one global mesh of 8:
the sharded forward (with a probe) and a sweep over a global batch equal the single-process run (fp32)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import vlmjax
from vlmjax import interventions as iv
from vlmjax.probes import VisualAttention
from vlmjax.sweep import make_sweep
from vlmjax.testing.tiny import make_tiny_llava

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(argv: list[str], env: dict[str, str]) -> list[str]:
    """Run `python argv` as processes 0 and 1 of one jax.distributed job on this machine, with `env` added to the
    environment; both must exit 0. Their logs (stdout and stderr)."""
    port = _free_port()
    procs = []
    for pid in range(2):
        job = {**os.environ, "PYTHONPATH": str(ROOT), **env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, *argv], env=job, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    return logs


def _inputs(image_token_id: int, rows: int = 4, seed: int = 0) -> dict:
    """4 left-padded prompts of one 56 px image each (16 image tokens) and different text lengths."""
    rng = np.random.default_rng(seed)
    length = 32
    ids = np.full((rows, length), 3)  # the tiny model's pad id
    mask = np.zeros((rows, length), int)
    for r in range(rows):
        text = 6 + 3 * r
        row = np.concatenate([[1], rng.integers(5, 60, 2), np.full(16, image_token_id), rng.integers(5, 60, text - 3)])
        ids[r, length - len(row):], mask[r, length - len(row):] = row, 1
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": rng.normal(size=(rows, 3, 56, 56)).astype(np.float32)}


@pytest.mark.slow  # about a minute alone, several on a busy 2-core machine
def test_two_processes_equal_one(tmp_path):
    make_tiny_llava(tmp_path / "model", variant="gqa", text_layers=4)
    model = vlmjax.load(tmp_path / "model", progress=False)
    inputs = _inputs(model.config.image_token_id)
    np.savez(tmp_path / "inputs.npz", **inputs)

    _two_processes([str(WORKER), str(tmp_path / "model"), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                   {})
    got = np.load(tmp_path / "out.npz")

    out = model(**inputs, hooks={"visual": VisualAttention()})
    layers = model.num_layers["blocks"]
    zone = range(layers // 3, layers)
    flags = np.asarray(iv.layer_flags(layers, zone), np.float32)
    sweep = make_sweep(model, lambda v: {"viar": iv.AttentionBias(v * flags)}, first_layer=zone[0])
    batch, _ = model.prepare(inputs)
    swept = sweep(model.params, batch, np.linspace(0.0, 3.0, 4, dtype=np.float32))
    want = {"logits": out["logits"], "sweep_logits": swept["logits"],
            **{f"visual/{k}": v for k, v in out["hooks"]["visual"]["attn.pattern"].items()}}
    assert sorted(got.files) == sorted(want)
    for k, v in want.items():
        v = np.asarray(jax.device_get(v))
        assert got[k].shape == v.shape, k
        assert np.abs(got[k] - v).max() <= TOL, (k, np.abs(got[k] - v).max())
    assert np.abs(swept["logits"][0] - swept["logits"][-1]).max() > 1e-3  # the sweep did change something


@pytest.mark.slow  # about a minute alone, several on a busy 2-core machine
def test_distributed_eval_merges_to_the_single_process_records(tmp_path, capsys):
    from vlmjax import cli

    single = tmp_path / "single"
    args = ["eval", "--n-images", "10", "--limit", "5", "--batch-size", "4"]
    assert cli.main([*args, "--out", str(single)]) == 0
    table = capsys.readouterr().out.splitlines()[-1]
    logs = _two_processes(["-m", "vlmjax.cli", *args, "--distributed", "--data", str(single / "data"), "--out",
                           str(tmp_path / "multi")], {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    parts = sorted(p.name for p in (tmp_path / "multi").glob("results.part-*.jsonl"))
    assert parts == ["results.part-000-of-002.jsonl", "results.part-001-of-002.jsonl"]
    assert all(len((tmp_path / "multi" / p).read_text().splitlines()) in (7, 8) for p in parts)  # 15 questions
    assert (tmp_path / "multi" / "results.jsonl").read_text() == (single / "results.jsonl").read_text()
    assert logs[0].splitlines()[-1] == table  # the same summary
