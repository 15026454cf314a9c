"""benchmarks/scale.py scaled down: a LLaVA-1.5-7B-shaped checkpoint (vocabulary 32064, CLIP ViT-L/14-336) with 2
decoder layers of width 512 and 1 vision layer, written tensor by tensor, then (a) loaded to one device (and a
26-layer one, for the memory slope), (b) loaded into a (data 2, model 4) mesh of 8 simulated devices with
FSDP_RULES, (c) the probed 616-token forward on both, (d) `vlmjax convert` of both checkpoints. Each in a fresh
process; memory is asserted against the checkpoints' bytes."""

import json
import subprocess
import sys

import ml_dtypes
import pytest
from safetensors import safe_open

from benchmarks import scale

SHAPE = dict(layers=2, width=512, heads=8, mlp=1376, vocab=32064, vision_layers=1)
DEEPER = dict(SHAPE, layers=26)  # 154 MiB more decoder layers
BF16_EPS = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)


def _measure(runs: dict) -> dict:
    """{name: (kind, checkpoint, save, forwards)} measured concurrently, each in its own process."""
    procs = {name: subprocess.Popen([sys.executable, scale.__file__, "--measure", kind, str(ckpt), str(save),
                                     str(forwards)], stdout=subprocess.PIPE, text=True,
                                    env=scale.measurement_env(kind))
             for name, (kind, ckpt, save, forwards) in runs.items()}
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, name
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.slow  # about a minute alone, several on a busy 2-core machine
def test_scaled_down_7b_shape_loads_and_converts_within_memory_and_shards_forward(tmp_path):
    total = scale.write_checkpoint(tmp_path / "hf", shard_bytes=64 << 20, **SHAPE)
    deeper = scale.write_checkpoint(tmp_path / "deeper", **DEEPER)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and index["metadata"]["total_size"] == total
    with safe_open(str(tmp_path / "hf" / files[0]), framework="numpy") as f:  # the writer's files read as safetensors
        assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == files[0]}

    results = _measure({"one": ("load", tmp_path / "hf", tmp_path / "one.npz", 1),
                        "deeper": ("load", tmp_path / "deeper", tmp_path / "deeper.npz", 0),
                        "mesh": ("fsdp", tmp_path / "hf", tmp_path / "mesh.npz", 1),
                        "convert": ("convert", tmp_path / "hf", tmp_path / "converted", 0),
                        "convert deeper": ("convert", tmp_path / "deeper", tmp_path / "converted deeper", 0)})
    one, mesh = results["one"], results["mesh"]
    # (a) Host memory grows with the checkpoint at <= 1.2x its bytes. The difference of two loads whose
    # checkpoints differ only in depth cancels the fixed costs (compiles, one in-flight tensor), which at this
    # size would swamp the ratio (benchmarks/RESULTS.md).
    above = lambda r: (r["peak_mb"] - r["baseline_mb"]) * 2**20
    assert above(results["deeper"]) - above(one) <= 1.2 * (deeper - total), (above(results["deeper"]), above(one))
    assert list(one["bytes_per_device"].values()) == [total]
    # (d) so does `vlmjax convert`'s: the save writes the loaded arrays without a second host copy.
    assert above(results["convert deeper"]) - above(results["convert"]) <= 1.2 * (deeper - total), (
        above(results["convert deeper"]), above(results["convert"]))
    # (b) FSDP_RULES: each of the 8 devices holds 1/8 of the sharded parameters plus the replicated ones.
    per_device = mesh["bytes_per_device"]
    assert len(per_device) == 8
    assert max(per_device.values()) <= (total - mesh["replicated_bytes"]) / 8 + mesh["replicated_bytes"]
    assert mesh["replicated_bytes"] < 0.05 * total
    # (c) the probed 616-token forward, sharded, equals one device within bf16 rounding.
    compared = scale.compare_records(tmp_path / "one.npz", tmp_path / "mesh.npz")
    assert compared["finite"] and compared["top1_same"]
    assert compared["max_abs"]["visual/mass"] <= BF16_EPS
    assert compared["max_abs"]["logits"] <= 4 * BF16_EPS * compared["logit_scale"]
    assert compared["last_token_kl"] <= 1e-3



def _forward_temp_bytes(layers: int, dtype) -> int:
    """XLA's temporary buffer bytes of the compiled 616-token forward (`model.jit`) of the SHAPE model with `layers`
    decoder layers in `dtype`, compiled from abstract parameters (nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    from converters.hf import expected_shapes, unflatten
    from vlmjax import VLM, models

    hf_config = scale.hf_config(**dict(SHAPE, layers=layers))
    cfg = models.from_hf(hf_config)
    params = unflatten({p: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)) for p, s in expected_shapes(cfg).items()})
    model = VLM(cfg, params, hf_config)
    batch, _ = model.prepare(scale.question_inputs())
    run = model.jit(lambda p, b: model.forward(p, b, {}, logits="last")["logits"])
    return run.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


def test_bf16_forward_memory_does_not_grow_with_depth_on_cpu():
    """XLA:CPU computes bf16 in f32, and its while-loop invariant code motion converted every layer's stacked
    weights to f32 before the layer scan: the forward's temporary memory grew by 2x the extra layers' bf16 bytes
    (a 7B bf16 forward needed ~40 GiB). `model.jit` compiles a bf16 model on CPU without that pass."""
    extra_layer_bytes = 8 * 2 * (4 * 512 * 512 + 3 * 512 * 1376)  # 8 more layers' q, k, v, o, gate, up, down in bf16
    growth = _forward_temp_bytes(10, "bfloat16") - _forward_temp_bytes(2, "bfloat16")
    assert growth <= 0.05 * extra_layer_bytes, (growth, extra_layer_bytes)
    assert _forward_temp_bytes(10, "float32") == _forward_temp_bytes(2, "float32")
