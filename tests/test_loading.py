"""Loading straight into a mesh: each tensor (or each device's slice of it) placed as it is read, equal to the
plain host read, with the shardings the rules give (8 simulated CPU devices, tests/conftest.py)."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import vlmjax
from converters import hf as hf_conv
from converters.keymaps import KeyMap
from vlmjax import cli
from vlmjax.sharding import DEFAULT_RULES, make_mesh, param_shardings
from vlmjax.testing.tiny import make_tiny_llava
from vlmjax.testing.tiny_instructblip import make_tiny_instructblip

# The up-projection's layer axis split over "model" exercises the path that reads whole layers per device.
LAYER_SPLIT_RULES = ((r"text/layers/up/kernel$", P("model", None, None)), *DEFAULT_RULES)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava")
    make_tiny_llava(out, variant="gqa", text_layers=4)
    return out


def host_read(path, cfg, dtype) -> dict:
    """An independent plain host read: every tensor of every file, mapped by the family's key table (HF's [out, in]
    linear and conv kernels transposed to vlmjax's [in, out]), cast, and stacked per layer."""
    keymap, shapes = KeyMap(hf_conv.model_module(cfg).KEY_ROWS, cfg), hf_conv.expected_shapes(cfg)
    out = {p: np.zeros(s, np.dtype(jnp.dtype(dtype))) for p, s in shapes.items()}
    for file in sorted(Path(path).glob("*.safetensors")):
        for key, value in load_file(file).items():
            found = keymap.lookup(key)
            if found is None or found[0] not in shapes:
                continue  # tied LM head copies and tensors the model does not use
            p, layer, transform = found
            value = value.reshape(value.shape[0], -1).T if transform in ("linear", "conv") else value
            out[p][... if layer is None else layer] = value
    return hf_conv.unflatten(out)


def _same(params, reference):
    flat, ref = hf_conv.flatten(params), hf_conv.flatten(reference)
    assert flat.keys() == ref.keys()
    for p in ref:
        assert flat[p].dtype == ref[p].dtype, p
        assert np.array_equal(np.asarray(flat[p]), ref[p]), p


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rules", [None, LAYER_SPLIT_RULES], ids=["default-rules", "layer-split"])
def test_sharded_load_equals_host_read_and_follows_rules(path, dtype, rules):
    model = vlmjax.load(path)
    reference = host_read(path, model.config, dtype)
    mesh = make_mesh(data=2, model=4)
    sharded = vlmjax.load(path, dtype=dtype, mesh=mesh, rules=rules, progress=False)
    _same(sharded.params, reference)
    want = hf_conv.flatten(param_shardings(sharded.params, mesh, rules or DEFAULT_RULES))
    got = hf_conv.flatten(sharded.params)
    for p, sharding in want.items():
        assert got[p].sharding.is_equivalent_to(sharding, got[p].ndim), (p, got[p].sharding, sharding)
    assert got["text/layers/q/kernel"].sharding.spec == P(None, None, "model")  # the rules did split something
    if rules is LAYER_SPLIT_RULES:
        assert got["text/layers/up/kernel"].addressable_shards[0].data.shape[0] == 1  # 4 layers over 4 devices


def test_single_device_load_equals_host_read(path):
    model = vlmjax.load(path, progress=False)
    _same(model.params, host_read(path, model.config, "float32"))
    assert {x.sharding.device_set.pop().id for x in hf_conv.flatten(model.params).values()} == {0}


def test_instructblip_load_equals_host_read(tmp_path):
    """InstructBLIP's cross-attention rows name HF layers 0 and 2 only: the host read maps them by the config."""
    make_tiny_instructblip(tmp_path)
    model = vlmjax.load(tmp_path, progress=False)
    _same(model.params, host_read(tmp_path, model.config, "float32"))


def test_converted_checkpoint_restores_into_the_mesh(path, tmp_path):
    assert cli.main(["convert", str(path), str(tmp_path / "conv"), "--dtype", "bfloat16"]) == 0
    model = vlmjax.load(path, progress=False)
    reference = host_read(path, model.config, "bfloat16")
    mesh = make_mesh(data=2, model=4)
    restored = vlmjax.load(tmp_path / "conv", mesh=mesh)
    _same(restored.params, reference)
    assert hf_conv.flatten(restored.params)["text/embed"].sharding.spec == P("model", None)


def test_rules_without_mesh_are_refused(path):
    with pytest.raises(vlmjax.errors.VlmJaxError, match="pass mesh="):
        vlmjax.load(path, rules=DEFAULT_RULES)
