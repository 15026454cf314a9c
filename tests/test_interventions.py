"""Interventions as hooks against independent HF PyTorch references (the same change made with torch hooks), on a
left-padded batch whose image starts at a different position in each sample; identity settings bit-identical;
one compile for a sweep; gradients through traced parameters; clear errors; the input transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import vlmjax
from vlmjax import interventions as iv
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Capture, validate_hooks
from vlmjax.verify import load_hf_model
from vlmjax.testing.tiny import make_tiny_llava

from tests import hf_references as ref

LAYERS = 18  # VIAR's zone 8-16 needs 17+ layers
PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:",
           "the picture : USER: <image> how many red circle are there ? ASSISTANT: the"]


def _images(seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((60 + 10 * i, 80, 3)) * 255).astype("uint8")) for i in range(2)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny18")
    _, processor = make_tiny_llava(path, variant="gqa", text_layers=LAYERS, vision_layers=2)
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(images=_images(0), text=PROMPTS, return_tensors="np", padding=True))
    clean = dict(processor(images=_images(1), text=PROMPTS, return_tensors="np", padding=True))
    model = vlmjax.load(path, progress=False)
    hf = load_hf_model(path)
    visual = inputs["input_ids"] == model.config.image_token_id
    starts = visual.argmax(1)
    assert starts[0] != starts[1] and not inputs["attention_mask"][0].all(), "need left padding, shifted images"
    plain = np.asarray(model(**inputs)["logits"])
    return dict(model=model, hf=hf, processor=processor, inputs=inputs, clean=clean, visual=visual,
                valid=inputs["attention_mask"].astype(bool), plain=plain, base=ref.identity(model, visual))


def _ours(setup, hooks):
    return np.asarray(setup["model"](**setup["inputs"], hooks=hooks)["logits"])


# ---------------------------------------------------------------------------------------------------------------------
# Identity settings are bit-identical


@pytest.fixture(scope="module")
def clean_resid(setup):
    """resid_post of every layer on the clean batch (other images, same prompts) [L, B, N, D]."""
    out = setup["model"](**setup["clean"], hooks={"c": Capture(sites=frozenset({"resid_post"}))})
    return np.asarray(out["hooks"]["c"]["resid_post"]), np.asarray(out["logits"])


def test_identity_settings_are_bit_identical(setup, clean_resid):
    """The base the HF comparisons below run on (every intervention at identity, `tests/hf_references.py`), with the
    compatibility bias and an activation patch at identity too."""
    hooks = {**setup["base"].hooks, "bias_compat": iv.AttentionBias.on_layers(LAYERS, bias=0.0, first_columns=8),
             "patch": iv.ActivationPatch.from_capture(clean_resid[0], [], setup["visual"])}
    assert np.array_equal(_ours(setup, hooks), setup["plain"])


# ---------------------------------------------------------------------------------------------------------------------
# Attention-score interventions against HF


VIAR_LAYERS = range(8, 17)


def test_viar_bias_matches_hf_mask_edit(setup):
    ref.assert_matches_hf(setup, setup["base"] + ref.visual_bias(setup, VIAR_LAYERS, 2.0))


def test_viar_first_columns_compat_matches_hf(setup):
    """The original code's convention: the first K key columns, whatever they hold (padding and text included)."""
    columns = 12

    def edit(layer, mask):
        if layer in VIAR_LAYERS:
            mask[..., :columns] += 2.0
        return mask

    compat = {"viar": iv.AttentionBias.on_layers(LAYERS, VIAR_LAYERS, bias=2.0, first_columns=columns)}
    ours = ref.assert_matches_hf(setup, ref.Case(compat, lambda hf: ref.mask_edit(hf, edit)))
    true_positions = _ours(setup, {"viar": iv.AttentionBias.on_layers(LAYERS, VIAR_LAYERS, bias=2.0)})
    assert np.abs(true_positions - ours)[setup["valid"]].max() > 1e-3  # the two conventions differ here


def test_block_text_to_visual_and_remove_tokens_match_hf(setup):
    ref.assert_matches_hf(setup, setup["base"] + ref.blocked_keys(setup, [3, 9]))


def test_head_masks_both_conventions_match_hf(setup):
    masks = ref.head_masks(setup, uniform=[(2, 1), (5, 3), (11, 0)], zeroed=[(4, 2), (5, 0)])
    ref.assert_matches_hf(setup, setup["base"] + masks)


@pytest.mark.parametrize("order", ["bias_first", "heads_first"])
def test_composition_follows_dict_order(setup, order):
    """VIAR and a uniform head mask on the same layer do not commute: the hooks run in the order of the plain dict
    given (jax.jit alone would hand it back in sorted key order, "heads" before "viar")."""
    bias = iv.AttentionBias.on_layers(LAYERS, [6], bias=3.0)
    heads = iv.HeadMask.heads(LAYERS, setup["model"].config.text.num_heads, [(6, 1)])
    pairs = [("viar", bias), ("heads", heads)]
    visual = torch.as_tensor(setup["visual"])
    uniform = ref.uniform_heads([(6, 1)])

    def edit(layer, scores, mask):
        if layer != 6:
            return scores
        add_bias = lambda s: s + 3.0 * visual[:, None, None, :]
        if order == "bias_first":
            return uniform(layer, add_bias(scores), mask)
        return add_bias(uniform(layer, scores, mask))

    ref.assert_matches_hf(setup, ref.Case(dict(pairs if order == "bias_first" else pairs[::-1]), score_edit=edit))


# ---------------------------------------------------------------------------------------------------------------------
# Hidden-state interventions against HF


def test_zero_and_scale_visual_states_match_hf(setup):
    ref.assert_matches_hf(setup, setup["base"] + ref.visual_states(setup, knockout_layer=2, soft_layer=9))


def test_neuron_and_residual_dim_ablation_match_hf(setup):
    ref.assert_matches_hf(setup, setup["base"] + ref.ablations(setup, neuron_layer=5, dim_layer=12))


def test_activation_patch_matches_hf(setup, clean_resid):
    """resid_post of layer 5 at visual positions taken from the run on other images."""
    source, _ = clean_resid
    feed = {k: torch.as_tensor(np.asarray(v)) for k, v in setup["clean"].items()}
    with torch.no_grad():
        clean_hidden = setup["hf"](**feed, output_hidden_states=True).hidden_states[6]
    visual = torch.as_tensor(setup["visual"])[..., None]
    patch = lambda output: torch.where(visual, clean_hidden, output)
    ref.assert_matches_hf(setup, ref.Case({"patch": iv.ActivationPatch.from_capture(source, [5], setup["visual"])},
                                          lambda hf: [ref.layer_output_edit(hf, 5, patch)]))


def test_noise_substitutions_match_hf(setup):
    """Noise-Δ on all tokens at layer 3, Noise-QKV on visual tokens at layers 6 and 10, with the same draws."""
    ref.assert_matches_hf(setup, setup["base"] + ref.noise_substitutions(setup, out_layer=3, qkv_layers=[6, 10]))


# ---------------------------------------------------------------------------------------------------------------------
# One compile for a sweep; gradients through traced parameters


def test_bias_sweep_compiles_once_and_matches_separate_runs(setup):
    model, params = setup["model"], setup["model"].params
    batch, _ = model.prepare(setup["inputs"])
    zone = iv.layer_flags(LAYERS, VIAR_LAYERS).astype(np.float32)
    traces = []

    @jax.jit
    def sweep(params, batch, bias_values):
        traces.append("sweep")
        hooks = iv.AttentionBias(jnp.asarray(bias_values)[:, None] * zone)  # [16, L]: vmapped to [L]
        run = lambda hook: model.forward(params, batch, {"viar": hook}, logits="last")["logits"]
        return jax.vmap(run)(hooks)

    @jax.jit
    def single(params, batch, hook):
        traces.append("single")
        return model.forward(params, batch, {"viar": hook}, logits="last")["logits"]

    values = np.linspace(-2, 4, 16, dtype=np.float32)
    swept = np.asarray(sweep(params, batch, values))
    swept_again = np.asarray(sweep(params, batch, values + 0.5))
    separate = np.stack([np.asarray(single(params, batch, iv.AttentionBias.on_layers(LAYERS, VIAR_LAYERS, float(v))))
                         for v in values])
    assert traces.count("sweep") == 1 and traces.count("single") == 1, traces
    assert swept.shape == (16, 2, 1, model.config.text.vocab_size)
    np.testing.assert_allclose(swept, separate, rtol=0, atol=1e-5)
    assert np.abs(swept_again - swept).max() > 1e-3


def test_gradient_with_respect_to_head_mask(setup):
    """d logit / d keep is finite, nonzero and agrees with a central finite difference."""
    model = setup["model"]
    batch, _ = model.prepare(setup["inputs"])
    heads = model.config.text.num_heads
    target = 7

    @jax.jit
    def logit_and_grad(keep):
        f = lambda keep: model.forward(model.params, batch, {"heads": iv.HeadMask(keep)}, logits="last")[
            "logits"][:, -1, target].sum()
        return jax.value_and_grad(f)(keep)

    keep = jnp.ones((LAYERS, heads), jnp.float32)
    _, grad = logit_and_grad(keep)
    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-4
    layer, head = np.unravel_index(np.abs(grad).argmax(), grad.shape)
    step = 1e-2
    plus, _ = logit_and_grad(keep.at[layer, head].add(-step))
    minus, _ = logit_and_grad(keep.at[layer, head].add(-2 * step))
    base, _ = logit_and_grad(keep)
    # one-sided second-order difference at keep = 1 (keep above 1 is outside the interpolation's meaning)
    finite_difference = (3 * float(base) - 4 * float(plus) + float(minus)) / (2 * step)
    np.testing.assert_allclose(grad[layer, head], finite_difference, rtol=2e-2)


# ---------------------------------------------------------------------------------------------------------------------
# Clear errors


def test_errors_are_clear(setup):
    model, processor = setup["model"], setup["processor"]
    heads = model.config.text.num_heads
    with pytest.raises(VlmJaxError, match="Layer index 18 out of range"):
        iv.AttentionBias.on_layers(LAYERS, [5, 18])
    with pytest.raises(VlmJaxError, match="Head index 4 out of range"):
        iv.HeadMask.heads(LAYERS, heads, [(3, 4)])
    with pytest.raises(VlmJaxError, match="mode must be one of"):
        iv.HeadMask.heads(LAYERS, heads, mode="zero")
    with pytest.raises(VlmJaxError, match="Unit index 500 out of range"):
        iv.NeuronAblation.zero(LAYERS, model.config.text.intermediate_size, {2: [500]})
    text_only = dict(processor.tokenizer(["what is a circle ?", "the red box"], return_tensors="np", padding=True))
    with pytest.raises(VlmJaxError, match=r"sample\(s\) \[0, 1\] of this batch have none"):
        model(hooks={"viar": iv.AttentionBias.on_layers(LAYERS)}, **text_only)
    validate_hooks({"viar": iv.AttentionBias.on_layers(LAYERS, first_columns=4)}, model.prepare(text_only)[1])
    _, meta = model.prepare(setup["inputs"])
    not_visual = np.zeros_like(setup["visual"])
    not_visual[1, -1] = True
    with pytest.raises(VlmJaxError, match="not a visual token"):
        validate_hooks({"remove": iv.RemoveVisualTokens.from_mask(LAYERS, not_visual)}, meta)
    with pytest.raises(VlmJaxError, match="token mask has shape"):
        validate_hooks({"soft": iv.ScaleVisualStates.at_layers(LAYERS, 3, setup["visual"][:1])}, meta)


def test_remove_top_attended_patches_picks_top_fraction(setup):
    _, meta = setup["model"].prepare(setup["inputs"])
    visual_map = np.where(setup["visual"], np.random.default_rng(1).random(setup["visual"].shape), 0)
    hook = iv.RemoveVisualTokens.top_attended(LAYERS, visual_map, meta, fraction=0.3)
    removed = np.asarray(hook.token_mask)
    per_image = int(setup["visual"][0].sum())
    for b in range(2):
        count = int(np.ceil(0.3 * per_image))
        assert removed[b].sum() == count and not (removed[b] & ~setup["visual"][b]).any()
        assert visual_map[b][removed[b]].min() > visual_map[b][setup["visual"][b] & ~removed[b]].max()


# ---------------------------------------------------------------------------------------------------------------------
# Input transforms


@pytest.mark.parametrize("kind, level", [("black", 0), ("gray", 128)])
def test_null_image_equals_processed_uniform_image(setup, kind, level):
    processor = setup["processor"]
    image = Image.new("RGB", (70, 50), (level, level, level))
    expected = processor.image_processor(images=[image, image], return_tensors="np")["pixel_values"]
    pixel_values = setup["inputs"]["pixel_values"]
    ip = processor.image_processor
    ours = iv.null_image(pixel_values, kind, ip.image_mean, ip.image_std)
    assert ours.shape == pixel_values.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_vcd_noise_matches_the_vcd_formula():
    """methods §6 in float64 with the same standard-normal draw; VCD's own torch code (float32 tables) agrees with the
    schedule to its float32 rounding."""
    pixel_values = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    eps = np.asarray(jax.random.normal(key, pixel_values.shape, jnp.float32), np.float64)
    betas = 1 / (1 + np.exp(-np.linspace(-6, 6, 1000))) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = np.cumprod(1 - betas)[500]
    expected = np.sqrt(alpha_bar) * pixel_values + np.sqrt(1 - alpha_bar) * eps
    np.testing.assert_allclose(iv.vcd_noise(pixel_values, key, step=500), expected, rtol=0, atol=1e-6)
    vcd_betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5  # VCD's add_diffusion_noise
    vcd_alpha_bar = float(torch.cumprod(1 - vcd_betas, dim=0)[500])
    assert abs(vcd_alpha_bar - alpha_bar) < 1e-6
    with pytest.raises(VlmJaxError, match="VCD step"):
        iv.vcd_noise(pixel_values, key, step=1000)
