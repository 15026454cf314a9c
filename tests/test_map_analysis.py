"""RoPE baseline probe and the host-side map analysis of docs/methods.md §2 and §5."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vlmjax
from vlmjax import probes
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Capture
from vlmjax.metrics import batched_rid
from vlmjax.testing.tiny import make_tiny_llava
from vlmjax.visual import llava_visual_tokens


@pytest.fixture(scope="module")
def model_and_inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("rope")
    _, processor = make_tiny_llava(path, variant="gqa")
    image = Image.fromarray((np.random.default_rng(0).random((56, 56, 3)) * 255).astype("uint8"))
    inputs = dict(processor(images=[image], text=["USER: <image> what is in the image ? ASSISTANT:"],
                            return_tensors="np"))
    return vlmjax.load(path, progress=False), inputs


def test_rope_baseline_is_rid_of_rotated_keys_and_zero_without_rotation(model_and_inputs):
    model, inputs = model_and_inputs
    hooks = {"keys": Capture(sites=frozenset({"attn.k", "attn.rot_k"})), "rope": probes.RopeBaseline()}
    out = model(**inputs, hooks=hooks, logits=None)
    keys, eps = out["hooks"]["keys"], np.asarray(out["hooks"]["rope"]["attn.rot_k"])
    flat = lambda k: k.reshape(*k.shape[:2], -1)
    for layer in range(model.config.text.num_layers):
        want = batched_rid(flat(keys["attn.rot_k"][layer]), flat(keys["attn.k"][layer]),
                           jnp.asarray(inputs["attention_mask"], bool))
        np.testing.assert_allclose(eps[layer], np.asarray(want), atol=1e-6)
    assert (eps > 1e-3).all()
    # At position 0 rotary turns nothing: eps equals RID(X | X), the floor the 99%-energy truncation leaves.
    still = model(**inputs, position_ids=np.zeros_like(inputs["input_ids"]), hooks=hooks, logits=None)
    k = flat(still["hooks"]["keys"]["attn.k"][0])
    floor = np.asarray(batched_rid(k, k, jnp.asarray(inputs["attention_mask"], bool)))
    np.testing.assert_allclose(np.asarray(still["hooks"]["rope"]["attn.rot_k"])[0], floor, atol=1e-6)
    assert (eps[0] > floor + 1e-3).all()


def _meta_and_maps():
    ids = np.array([[7, 7, 4, 4, 4, 4, 9], [4, 4, 4, 4, 9, 9, 9]])  # two 2x2 images at different offsets
    meta = llava_visual_tokens(ids, image_token_id=4, grid=2, with_cls=False)
    maps = np.zeros((3, 2, 7))
    maps[0, 0, 2:6] = 0.25  # layer 0: uniform
    maps[1, 0, 3] = 1.0  # layer 1: one patch, not a corner of layer 2
    maps[2, 0, [2, 5]] = 0.5  # layer 2: two opposite corners
    maps[:, 1, 0:4] = [0.7, 0.1, 0.1, 0.1]
    return meta, maps


def test_map_statistics():
    meta, maps = _meta_and_maps()
    grids = probes.map_grids(maps, meta)
    np.testing.assert_array_equal(grids[0][2], [[0.5, 0], [0, 0.5]])
    stats = probes.map_statistics(maps, meta, fraction=0.5)
    np.testing.assert_allclose(stats["spatial_entropy"][:, 0], [np.log(4), 0, np.log(2)], atol=1e-6)
    assert stats["clusters"][2, 0] == 2 and stats["clusters"][1, 0] == 1  # diagonal corners: two 4-connected parts
    h = stats["hellinger"][0]
    np.testing.assert_allclose(np.diag(h), 0, atol=1e-6)
    np.testing.assert_allclose(h, h.T, atol=1e-6)
    assert h[1, 2] > h[0, 2] > 0
    with pytest.raises(VlmJaxError, match="Sample 0 has no image"):
        probes.map_grids(maps[:, :1], llava_visual_tokens(np.array([[7, 9]]), 4, 2, False))


def test_contrastive_mask_picks_the_most_distant_fusion_layer():
    meta, maps = _meta_and_maps()
    chosen, contrast, mask = probes.contrastive_mask(maps, meta.mask, fusion_layers=[0, 1], post_layer=2,
                                                     percentile=50)
    assert chosen.tolist() == [1, 0]  # sample 0: H = 1 (disjoint) vs 0.54; sample 1: a tie
    np.testing.assert_allclose(contrast[0, 2:6], [0.5, 1, 0, 0.5])
    assert mask[0].tolist() == [False, False, False, False, True, False, False]  # below the median (0.5) of C on V
    assert not mask[:, ~meta.mask[0]][0].any()
