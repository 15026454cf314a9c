"""Sweeps: the shared prefix runs once, results equal full runs, one compile for any values, clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vlmjax
from vlmjax import interventions as iv
from vlmjax.errors import VlmJaxError
from vlmjax.sweep import make_sweep, sweep
from vlmjax.testing.tiny import make_tiny_llava

LAYERS, ZONE = 6, range(3, 5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep")
    _, processor = make_tiny_llava(path, variant="gqa", text_layers=LAYERS)
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((60, 70, 3)) * 255).astype("uint8")) for _ in range(2)]
    inputs = dict(processor(images=images, text=["USER: <image> is there a red circle ? ASSISTANT:",
                                                 "USER: <image> how many ? ASSISTANT:"], return_tensors="np",
                            padding=True))
    return vlmjax.load(path, progress=False), inputs


def viar(value):
    return {"viar": iv.AttentionBias(value * jnp.asarray(iv.layer_flags(LAYERS, ZONE), jnp.float32))}


def test_shared_prefix_sweep_equals_separate_full_runs(setup):
    model, inputs = setup
    values = np.linspace(0, 3, 16, dtype=np.float32)
    out = sweep(model, inputs, viar, values, first_layer=ZONE[0])
    assert out["logits"].shape[0] == 16
    chunked = sweep(model, inputs, viar, values, first_layer=ZONE[0], chunk=4)
    np.testing.assert_allclose(np.asarray(chunked["logits"]), np.asarray(out["logits"]), rtol=0, atol=1e-5)
    for i in (0, 7, 15):
        full = np.asarray(model(**inputs, hooks=viar(float(values[i])), logits="last").logits)
        np.testing.assert_allclose(np.asarray(out["logits"][i]), full, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(out["logits"][15] - out["logits"][0])).max() > 1e-3


def test_one_compile_for_any_values_and_prefix_outside_the_vmap(setup):
    model, inputs = setup
    batch, _ = model.prepare(inputs)
    run = make_sweep(model, viar, first_layer=ZONE[0])
    run(model.params, batch, np.linspace(0, 1, 16, dtype=np.float32))
    run(model.params, batch, np.linspace(2, 5, 16, dtype=np.float32))
    assert run._cache_size() == 1
    # The vision tower runs once: its patch-embedding matmul is not batched over the 16 values.
    vision_tokens = model.config.vision.num_patches + 1
    knockout = lambda onehot: {"ko": iv.ZeroVisualStates(onehot)}  # varies from layer 0: only the tower is shared
    for sweep_fn, values in ((run, np.zeros(16, np.float32)), (make_sweep(model, knockout, first_layer=0),
                                                              np.eye(LAYERS, dtype=bool))):
        hlo = sweep_fn.lower(model.params, batch, values).as_text()
        assert f"tensor<2x{vision_tokens}x" in hlo and f"tensor<{len(values)}x2x{vision_tokens}x" not in hlo
    swept = make_sweep(model, knockout, first_layer=0)(model.params, batch, np.eye(LAYERS, dtype=bool))["logits"]
    full = model(**inputs, hooks=knockout(np.eye(LAYERS, dtype=bool)[2]), logits="last").logits
    np.testing.assert_allclose(np.asarray(swept[2]), np.asarray(full), rtol=0, atol=1e-5)


def test_sweep_refuses_values_that_change_earlier_layers(setup):
    model, inputs = setup
    with pytest.raises(VlmJaxError, match="before first_layer=4: set first_layer <= 3"):
        sweep(model, inputs, viar, np.array([0.0, 1.0], np.float32), first_layer=4)
    with pytest.raises(VlmJaxError, match="first_layer must be in"):
        make_sweep(model, viar, first_layer=LAYERS)
