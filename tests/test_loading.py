"""Loading straight into a mesh: each tensor (or each device's slice of it) placed as it is read, equal to the
plain host read, with the shardings the rules give (8 simulated CPU devices, tests/conftest.py)."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import vlmjax
from converters import hf as hf_conv
from vlmjax import cli
from vlmjax.sharding import DEFAULT_RULES, make_mesh, param_shardings
from vlmjax.testing.tiny import make_tiny_llava

# The up-projection's layer axis split over "model" exercises the path that reads whole layers per device.
LAYER_SPLIT_RULES = ((r"text/layers/up/kernel$", P("model", None, None)), *DEFAULT_RULES)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava")
    make_tiny_llava(out, variant="gqa", text_layers=4)
    return out


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
    reference = hf_conv.load_params(path, model.config, dtype, progress=False)
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
    _same(model.params, hf_conv.load_params(path, model.config, "float32", progress=False))
    assert {x.sharding.device_set.pop().id for x in hf_conv.flatten(model.params).values()} == {0}


def test_converted_checkpoint_restores_into_the_mesh(path, tmp_path):
    assert cli.main(["convert", str(path), str(tmp_path / "conv"), "--dtype", "bfloat16"]) == 0
    model = vlmjax.load(path, progress=False)
    reference = hf_conv.load_params(path, model.config, "bfloat16", progress=False)
    mesh = make_mesh(data=2, model=4)
    restored = vlmjax.load(tmp_path / "conv", mesh=mesh)
    _same(restored.params, reference)
    assert hf_conv.flatten(restored.params)["text/embed"].sharding.spec == P("model", None)


def test_rules_without_mesh_are_refused(path):
    with pytest.raises(vlmjax.errors.VlmJaxError, match="pass mesh="):
        vlmjax.load(path, rules=DEFAULT_RULES)
