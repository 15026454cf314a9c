"""benchmarks/scale.py scaled down: a LLaVA-1.5-7B-shaped checkpoint (vocabulary 32064, CLIP ViT-L/14-336) with 2
decoder layers of width 512 and 1 vision layer, written tensor by tensor, then (a) loaded to one device, (b)
loaded into a (data 2, model 4) mesh of 8 simulated devices with FSDP_RULES, (c) the probed 616-token forward on
both. Each in a fresh process; memory is asserted against the checkpoint's bytes."""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from benchmarks import scale

SHAPE = dict(layers=2, width=512, heads=8, mlp=1376, vocab=32064, vision_layers=1)
BF16_EPS = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)


@pytest.mark.slow  # about a minute alone, several on a busy 2-core machine
def test_scaled_down_7b_shape_loads_within_memory_and_shards_forward(tmp_path):
    ckpt = tmp_path / "hf"
    total = scale.write_checkpoint(ckpt, shard_bytes=64 << 20, **SHAPE)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and index["metadata"]["total_size"] == total
    with safe_open(str(ckpt / files[0]), framework="numpy") as f:  # the writer's files read as safetensors
        assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == files[0]}
    largest = max(2 * int(np.prod(shape)) for _, shape in scale.hf_tensors(scale.hf_config(**SHAPE)))

    procs = {kind: subprocess.Popen([sys.executable, scale.__file__, "--measure", kind, str(ckpt),
                                     str(tmp_path / f"{kind}.npz"), "1"], stdout=subprocess.PIPE, text=True,
                                    env=scale.measurement_env(kind)) for kind in ("load", "fsdp")}
    results = {}
    for kind, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, kind
        results[kind] = json.loads(out.strip().splitlines()[-1])

    one, mesh = results["load"], results["fsdp"]
    assert (one["peak_mb"] - one["baseline_mb"]) * 2**20 <= 1.2 * total  # (a): the goal
    assert list(one["bytes_per_device"].values()) == [total]
    per_device = mesh["bytes_per_device"]
    assert len(per_device) == 8
    assert max(per_device.values()) <= (total - mesh["replicated_bytes"]) / 8 + mesh["replicated_bytes"]  # (b)
    assert mesh["replicated_bytes"] < 0.05 * total
    # all 8 simulated devices live in this one process: it holds the checkpoint once, plus transients
    assert (mesh["peak_mb"] - mesh["baseline_mb"]) * 2**20 <= sum(per_device.values()) + 2 * largest

    compared = scale.compare_records(tmp_path / "load.npz", tmp_path / "fsdp.npz")  # (c)
    assert compared["finite"] and compared["top1_same"]
    assert compared["max_abs"]["visual/mass"] <= BF16_EPS
    assert compared["max_abs"]["logits"] <= 4 * BF16_EPS * compared["logit_scale"]
    assert compared["last_token_kl"] <= 1e-3
