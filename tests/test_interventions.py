"""Interventions as hooks against independent HF PyTorch references (the same change made with torch hooks), on a
left-padded batch whose image starts at a different position in each sample; identity settings bit-identical;
one compile for a sweep; gradients through traced parameters; clear errors; the input transforms."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llama import modeling_llama

import vlmjax
from vlmjax import interventions as iv
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Capture, validate_hooks
from vlmjax.verify import load_hf_model
from vlmjax.testing.tiny import make_tiny_llava

TOL = 1e-4
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
                valid=inputs["attention_mask"].astype(bool), plain=plain)


# ---------------------------------------------------------------------------------------------------------------------
# HF reference machinery: the change made with torch hooks on the HF model


def _hf_layers(hf):
    return hf.model.language_model.layers


@contextlib.contextmanager
def _torch_hooks(*registrations):
    handles = list(registrations)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hf_logits(hf, inputs, *registrations) -> np.ndarray:
    feed = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}
    with _torch_hooks(*registrations), torch.no_grad():
        return hf(**feed).logits.float().numpy()


def _edit_mask(hf, edit):
    """Forward pre-hooks on every self_attn replacing the 4D additive mask by edit(layer, mask)."""

    def pre(module, args, kwargs):
        kwargs["attention_mask"] = edit(module.layer_idx, kwargs["attention_mask"].clone())
        return args, kwargs

    return [layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True) for layer in _hf_layers(hf)]


@contextlib.contextmanager
def _edit_scores(edit):
    """HF eager attention with edit(layer, scores) applied to the masked pre-softmax scores."""
    original = modeling_llama.eager_attention_forward

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
        scores = edit(module.layer_idx, scores, attention_mask)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    modeling_llama.eager_attention_forward = eager
    try:
        yield
    finally:
        modeling_llama.eager_attention_forward = original


def _close(setup, ours, theirs):
    """max |Δ| of logits over real (non-padding) positions."""
    diff = np.abs(np.asarray(ours) - theirs)[setup["valid"]]
    return float(diff.max())


def _ours(setup, hooks, inputs=None):
    return np.asarray(setup["model"](**(inputs or setup["inputs"]), hooks=hooks)["logits"])


def _changed(setup, ours):
    """The intervention must change the output, or the comparison proves nothing."""
    assert np.abs(ours - setup["plain"])[setup["valid"]].max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Identity settings are bit-identical


@pytest.fixture(scope="module")
def clean_resid(setup):
    """resid_post of every layer on the clean batch (other images, same prompts) [L, B, N, D]."""
    out = setup["model"](**setup["clean"], hooks={"c": Capture(sites=frozenset({"resid_post"}))})
    return np.asarray(out["hooks"]["c"]["resid_post"]), np.asarray(out["logits"])


def test_identity_settings_are_bit_identical(setup, clean_resid):
    text, visual = setup["model"].config.text, setup["visual"]
    key = jax.random.PRNGKey(0)
    hooks = {
        "bias": iv.AttentionBias.on_layers(LAYERS, bias=0.0),
        "bias_compat": iv.AttentionBias.on_layers(LAYERS, bias=0.0, first_columns=8),
        "block": iv.BlockTextToVisual.on_layers(LAYERS, []),
        "remove": iv.RemoveVisualTokens.from_mask(LAYERS, np.zeros_like(visual)),
        "heads_uniform": iv.HeadMask.heads(LAYERS, text.num_heads, mode="uniform"),
        "heads_zero": iv.HeadMask.heads(LAYERS, text.num_heads, mode="zero_output"),
        "zero_visual": iv.ZeroVisualStates.at_layers(LAYERS, []),
        "scale_visual": iv.ScaleVisualStates.at_layers(LAYERS, 4, visual, scale=1.0),
        "neurons": iv.NeuronAblation.zero(LAYERS, text.intermediate_size, {}),
        "resid_dims": iv.NeuronAblation.mean(LAYERS, {}, np.ones((LAYERS, text.hidden_size)), "resid_post"),
        "noise_out": iv.NoiseAttentionOutput.on_layers(LAYERS, key, []),
        "noise_qkv": iv.NoiseQKV.from_params(setup["model"].params["text"], key, []),
        "patch": iv.ActivationPatch.from_capture(clean_resid[0], [], visual),
    }
    assert np.array_equal(_ours(setup, hooks), setup["plain"])


# ---------------------------------------------------------------------------------------------------------------------
# Attention-score interventions against HF


VIAR_LAYERS = range(8, 17)


def test_viar_bias_matches_hf_mask_edit(setup):
    ours = _ours(setup, {"viar": iv.AttentionBias.on_layers(LAYERS, VIAR_LAYERS, bias=2.0)})
    visual = torch.as_tensor(setup["visual"])

    def edit(layer, mask):
        if layer in VIAR_LAYERS:
            mask += 2.0 * visual[:, None, None, :]
        return mask

    theirs = _hf_logits(setup["hf"], setup["inputs"], *_edit_mask(setup["hf"], edit))
    _changed(setup, ours)
    assert _close(setup, ours, theirs) < TOL


def test_viar_first_columns_compat_matches_hf(setup):
    """The original code's convention: the first K key columns, whatever they hold (padding and text included)."""
    columns = 12
    ours = _ours(setup, {"viar": iv.AttentionBias.on_layers(LAYERS, VIAR_LAYERS, bias=2.0, first_columns=columns)})

    def edit(layer, mask):
        if layer in VIAR_LAYERS:
            mask[..., :columns] += 2.0
        return mask

    theirs = _hf_logits(setup["hf"], setup["inputs"], *_edit_mask(setup["hf"], edit))
    assert _close(setup, ours, theirs) < TOL
    true_positions = _ours(setup, {"viar": iv.AttentionBias.on_layers(LAYERS, VIAR_LAYERS, bias=2.0)})
    assert np.abs(true_positions - ours)[setup["valid"]].max() > 1e-3  # the two conventions differ here


def test_block_text_to_visual_and_remove_tokens_match_hf(setup):
    visual = setup["visual"]
    removed = visual & (np.cumsum(visual, 1) % 3 == 0)  # every third visual token, at other positions per sample
    hooks = {"block": iv.BlockTextToVisual.on_layers(LAYERS, [3, 9]),
             "remove": iv.RemoveVisualTokens.from_mask(LAYERS, removed)}
    ours = _ours(setup, hooks)
    visual_t, removed_t = torch.as_tensor(visual), torch.as_tensor(removed)
    lowest = torch.finfo(torch.float32).min

    def edit(layer, mask):
        if layer in (3, 9):
            text_to_visual = ~visual_t[:, None, :, None] & visual_t[:, None, None, :]
            mask = torch.where(text_to_visual, lowest, mask)
        return torch.where(removed_t[:, None, None, :], lowest, mask)

    theirs = _hf_logits(setup["hf"], setup["inputs"], *_edit_mask(setup["hf"], edit))
    _changed(setup, ours)
    assert _close(setup, ours, theirs) < TOL


def test_head_masks_both_conventions_match_hf(setup):
    heads = setup["model"].config.text.num_heads
    uniform, zeroed = [(2, 1), (5, 3), (11, 0)], [(4, 2), (5, 0)]
    hooks = {"uniform": iv.HeadMask.heads(LAYERS, heads, uniform, mode="uniform"),
             "zero": iv.HeadMask.heads(LAYERS, heads, zeroed, mode="zero_output")}
    ours = _ours(setup, hooks)

    def edit(layer, scores, mask):
        for masked_layer, head in uniform:
            if layer == masked_layer:  # allowed scores -> 0, masked ones stay at finfo.min
                scores[:, head] = mask[:, 0]
        return scores

    head_dim = setup["model"].config.text.head_dim

    def zero_heads(layer):
        def pre(module, args):
            z = args[0].clone()
            for masked_layer, head in zeroed:
                if layer == masked_layer:
                    z[..., head * head_dim:(head + 1) * head_dim] = 0
            return (z,)
        return pre

    registrations = [_hf_layers(setup["hf"])[l].self_attn.o_proj.register_forward_pre_hook(zero_heads(l))
                     for l in {l for l, _ in zeroed}]
    with _edit_scores(edit):
        theirs = _hf_logits(setup["hf"], setup["inputs"], *registrations)
    _changed(setup, ours)
    assert _close(setup, ours, theirs) < TOL


@pytest.mark.parametrize("order", ["bias_first", "heads_first"])
def test_composition_follows_dict_order(setup, order):
    """VIAR and a uniform head mask on the same layer do not commute: the hooks run in the order of the plain dict
    given (jax.jit alone would hand it back in sorted key order, "heads" before "viar")."""
    bias = iv.AttentionBias.on_layers(LAYERS, [6], bias=3.0)
    heads = iv.HeadMask.heads(LAYERS, setup["model"].config.text.num_heads, [(6, 1)])
    pairs = [("viar", bias), ("heads", heads)]
    hooks = dict(pairs if order == "bias_first" else pairs[::-1])
    ours = _ours(setup, hooks)
    visual = torch.as_tensor(setup["visual"])

    def edit(layer, scores, mask):
        if layer != 6:
            return scores
        add_bias = lambda s: s + 3.0 * visual[:, None, None, :]
        if order == "bias_first":
            scores = add_bias(scores)
        scores[:, 1] = mask[:, 0]
        return scores if order == "bias_first" else add_bias(scores)

    with _edit_scores(edit):
        theirs = _hf_logits(setup["hf"], setup["inputs"])
    assert _close(setup, ours, theirs) < TOL


# ---------------------------------------------------------------------------------------------------------------------
# Hidden-state interventions against HF


def _layer_input_hook(layer, change):
    def pre(module, args, kwargs):
        return (change(args[0].clone()),) + args[1:], kwargs
    return layer.register_forward_pre_hook(pre, with_kwargs=True)


def test_zero_and_scale_visual_states_match_hf(setup):
    visual = setup["visual"]
    soft = visual & (np.cumsum(visual, 1) % 2 == 0)
    hooks = {"knockout": iv.ZeroVisualStates.at_layers(LAYERS, 2),
             "soft": iv.ScaleVisualStates.at_layers(LAYERS, 9, soft, scale=0.3)}
    ours = _ours(setup, hooks)
    visual_t, soft_t = torch.as_tensor(visual)[..., None], torch.as_tensor(soft)[..., None]
    layers = _hf_layers(setup["hf"])
    theirs = _hf_logits(setup["hf"], setup["inputs"],
                        _layer_input_hook(layers[2], lambda h: torch.where(visual_t, 0.0, h)),
                        _layer_input_hook(layers[9], lambda h: torch.where(soft_t, 0.3 * h, h)))
    _changed(setup, ours)
    assert _close(setup, ours, theirs) < TOL


def test_neuron_and_residual_dim_ablation_match_hf(setup):
    text = setup["model"].config.text
    neurons, dims = [3, 40, 77, 120], [1, 5, 60]
    means = np.random.default_rng(0).normal(size=(LAYERS, text.hidden_size)).astype(np.float32)
    hooks = {"neurons": iv.NeuronAblation.zero(LAYERS, text.intermediate_size, {5: neurons}),
             "dims": iv.NeuronAblation.mean(LAYERS, {12: dims}, means, site="resid_post")}
    ours = _ours(setup, hooks)
    layers = _hf_layers(setup["hf"])

    def zero_neurons(module, args):
        hidden = args[0].clone()
        hidden[..., neurons] = 0
        return (hidden,)

    def mean_dims(module, args, output):
        output = output.clone()
        output[..., dims] = torch.as_tensor(means[12, dims])
        return output

    theirs = _hf_logits(setup["hf"], setup["inputs"], layers[5].mlp.down_proj.register_forward_pre_hook(zero_neurons),
                        layers[12].register_forward_hook(mean_dims))
    _changed(setup, ours)
    assert _close(setup, ours, theirs) < TOL


def test_activation_patch_matches_hf(setup, clean_resid):
    """resid_post of layer 5 at visual positions taken from the run on other images."""
    source, _ = clean_resid
    ours = _ours(setup, {"patch": iv.ActivationPatch.from_capture(source, [5], setup["visual"])})
    feed = {k: torch.as_tensor(np.asarray(v)) for k, v in setup["clean"].items()}
    with torch.no_grad():
        clean_hidden = setup["hf"](**feed, output_hidden_states=True).hidden_states[6]
    visual = torch.as_tensor(setup["visual"])[..., None]
    patch = lambda module, args, output: torch.where(visual, clean_hidden, output)
    theirs = _hf_logits(setup["hf"], setup["inputs"], _hf_layers(setup["hf"])[5].register_forward_hook(patch))
    _changed(setup, ours)
    assert _close(setup, ours, theirs) < TOL


def test_noise_substitutions_match_hf(setup):
    """Noise-Δ on all tokens at layer 3, Noise-QKV on visual tokens at layers 6 and 10, with the same draws."""
    model = setup["model"]
    key = jax.random.PRNGKey(7)
    noise_out = iv.NoiseAttentionOutput.on_layers(LAYERS, jax.random.fold_in(key, 1), [3])
    noise_qkv = iv.NoiseQKV.from_params(model.params["text"], key, [6, 10], scope="visual")
    ours = _ours(setup, {"noise_out": noise_out, "noise_qkv": noise_qkv})
    layers = _hf_layers(setup["hf"])
    b, n = setup["visual"].shape
    d = model.config.text.hidden_size
    visual = torch.as_tensor(setup["visual"])[..., None]

    def replace_update(module, args, output):
        update = output[0]
        rms = update.pow(2).mean(-1, keepdim=True).sqrt()
        return (torch.tensor(np.asarray(noise_out.noise(3, (b, n, d)))) * rms, output[1])

    def noisy_projection(layer, which, projection):
        weight = projection.weight
        std = torch.as_tensor(weight).std(unbiased=False)
        kernel = torch.tensor(np.asarray(noise_qkv.kernel(layer, which, tuple(weight.T.shape), 1.0))) * std
        return lambda module, args, output: torch.where(visual, args[0] @ kernel, output)

    registrations = [layers[3].self_attn.register_forward_hook(replace_update)]
    for layer in (6, 10):
        attn = layers[layer].self_attn
        for which, projection in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            registrations.append(projection.register_forward_hook(noisy_projection(layer, which, projection)))
    theirs = _hf_logits(setup["hf"], setup["inputs"], *registrations)
    _changed(setup, ours)
    assert _close(setup, ours, theirs) < TOL


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
