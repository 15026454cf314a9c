"""Metric and capture hooks against plain NumPy on what HF PyTorch computes (attentions, hidden states, residuals
captured with torch hooks, autograd), on a left-padded batch whose images start at different positions; memory of
the per-layer reduction from the compiled function's memory analysis; clear errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import vlmjax
from vlmjax import interventions as iv
from vlmjax import probes
from vlmjax.errors import VlmJaxError
from vlmjax.verify import load_hf_model, run_hf
from vlmjax.testing.tiny import make_tiny_llava

TOL = dict(rtol=1e-5, atol=1e-5)
LAYERS = 4
PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:",
           "the picture : USER: <image> how many red circle are there ? ASSISTANT: the",
           "USER: is there a <image> circle ? ASSISTANT: yes"]
BOXES = np.array([[0, 0, 30, 20], [10, 25, 56, 56], [20, 5, 40, 50]], np.float32)  # pixels of the 56x56 input
IMAGE_SIZE, GRID = 56, 4


def _images(seed, n=3):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((50 + 10 * i, 70, 3)) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_probes")
    _, processor = make_tiny_llava(path, variant="gqa", text_layers=LAYERS, vision_layers=2)
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(images=_images(0), text=PROMPTS, return_tensors="np", padding=True))
    model = vlmjax.load(path, progress=False)
    hf = load_hf_model(path)
    visual = inputs["input_ids"] == model.config.image_token_id
    valid = inputs["attention_mask"].astype(bool)
    assert len(set(visual.argmax(1))) == 3 and visual.argmax(1).min() > 0 and not valid.all()
    return dict(model=model, hf=hf, processor=processor, inputs=inputs, visual=visual, valid=valid,
                reference=run_hf(hf, inputs), residuals=_hf_residuals(hf, inputs))


def _feed(inputs):
    return {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}


def _hf_residuals(hf, inputs):
    """resid_pre, resid_mid, resid_post of every HF decoder layer, float64 [L, B, N, D], via torch hooks."""
    seen = {"pre": [], "mid": [], "post": []}
    handles = []
    for layer in hf.model.language_model.layers:
        handles.append(layer.register_forward_pre_hook(lambda m, args: seen["pre"].append(args[0].clone())))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, args: seen["mid"].append(args[0].clone())))
        handles.append(layer.register_forward_hook(lambda m, args, out: seen["post"].append(out.clone())))
    with torch.no_grad():
        hf(**_feed(inputs))
    for handle in handles:
        handle.remove()
    return {k: np.stack([t.double().numpy() for t in v]) for k, v in seen.items()}


@pytest.fixture(scope="module")
def probed(setup):
    """One forward with every read-only probe at once."""
    model = setup["model"]
    _, meta = model.prepare(setup["inputs"])
    b = setup["visual"].shape[0]
    n = setup["visual"].shape[1]
    targets = np.array([[5], [40], [100]])
    hooks = {
        "visual": probes.VisualAttention(),
        "map": probes.LastQueryVisualMap(),
        "heads": probes.VisualHeadAttention.with_boxes(BOXES, meta, (IMAGE_SIZE, IMAGE_SIZE)),
        "lens": probes.LogitLens.from_model(model, k=3, positions=np.tile([n - 3, n - 1], (b, 1)), target_ids=targets),
        "geometry": probes.UpdateGeometry(),
        "geometry_visual": probes.UpdateGeometry(tokens="visual"),
        "states": probes.HiddenStates(positions=np.tile([n - 2, n - 1], (b, 1)), only_layers=(0, 2)),
        **probes.capture(["blocks.2.attn.pattern", "logits", "vision.blocks.0.resid_post"], model.num_layers),
    }
    out = model(**setup["inputs"], hooks=hooks)
    plain = model(**setup["inputs"])
    return out, hooks, plain, targets


# ---------------------------------------------------------------------------------------------------------------------
# Plain NumPy references


def _text_after_image(visual, valid):
    last_visual = np.array([np.flatnonzero(v).max() for v in visual])
    return valid & (np.arange(visual.shape[1])[None] > last_visual[:, None])


def _erank(x):
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum())


def _rid(new, old, energy=0.99):
    u, s, vt = np.linalg.svd(old, full_matrices=False)
    fraction = np.cumsum(s**2) / (s**2).sum()
    rank = min(int(np.searchsorted(fraction, energy) + 1), int((s > max(old.shape) * np.finfo(np.float32).eps * s[0])
                                                                 .sum()))
    u, v = u[:, :rank], vt[:rank].T
    spectral = abs(_erank(new) - _erank(old)) / min(old.shape)
    innovation = (np.linalg.norm(new - u @ (u.T @ new)) + np.linalg.norm(new - (new @ v) @ v.T)) / (
        2 * np.linalg.norm(new))
    return spectral + innovation


def _mixing_entropy(x):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    affinity = (unit @ unit.T + 1) / 2
    p = affinity / affinity.sum(1, keepdims=True)
    return float(np.mean(-(p * np.log(p)).sum(1)))


# ---------------------------------------------------------------------------------------------------------------------
# Attention metrics


def test_probes_leave_the_forward_unchanged(probed):
    out, _, plain, _ = probed
    assert np.array_equal(np.asarray(out["logits"]), np.asarray(plain["logits"]))


def test_visual_attention_mass_and_fraction(setup, probed):
    out = probed[0]
    record = {k: np.asarray(v) for k, v in out["hooks"]["visual"]["attn.pattern"].items()}
    visual, valid = setup["visual"], setup["valid"]
    text = _text_after_image(visual, valid)
    b_size, heads = visual.shape[0], setup["model"].config.text.num_heads
    for layer, attn in enumerate(setup["reference"]["attentions"]):
        for b in range(b_size):
            queries, keys, last = np.flatnonzero(text[b]), np.flatnonzero(visual[b]), np.flatnonzero(valid[b]).max()
            block = attn[b][:, queries][:, :, keys]  # [H, |T|, |V|]
            text_block = attn[b][:, queries][:, :, queries]
            np.testing.assert_allclose(record["mass"][layer, b], block.sum(-1).mean(-1), **TOL)
            np.testing.assert_allclose(record["last_query_mass"][layer, b], attn[b][:, last, keys].sum(-1), **TOL)
            np.testing.assert_allclose(record["block_mean"][layer, b], block.mean(), **TOL)
            m_v, m_t = block.mean(), text_block.mean()
            np.testing.assert_allclose(record["visual_fraction"][layer, b], m_v / (m_v + m_t), **TOL)
            per_head = [block[h].mean() / (block[h].mean() + text_block[h].mean()) for h in range(heads)]
            np.testing.assert_allclose(record["visual_fraction_per_head"][layer, b], per_head, **TOL)
    assert record["mass"].shape == (LAYERS, b_size, heads)


def test_last_query_visual_map(setup, probed):
    record = np.asarray(probed[0]["hooks"]["map"]["attn.pattern"])
    visual = setup["visual"]
    for layer, attn in enumerate(setup["reference"]["attentions"]):
        for b in range(visual.shape[0]):
            row = attn[b, :, -1].mean(0)  # left padding: the last real token is the last position
            expected = np.where(visual[b], row, 0) / row[visual[b]].sum()
            np.testing.assert_allclose(record[layer, b], expected, **TOL)


def _box_tokens(visual_row, box):
    """Visual positions of the patches whose centre lies in the box (row-major patch order, 14-pixel cells)."""
    positions = np.flatnonzero(visual_row)
    cell = IMAGE_SIZE / GRID
    chosen = [positions[r * GRID + c] for r in range(GRID) for c in range(GRID)
              if box[0] <= (c + 0.5) * cell <= box[2] and box[1] <= (r + 0.5) * cell <= box[3]]
    return np.array(chosen)


def test_visual_head_attention_region_and_detection_score(setup, probed):
    record = {k: np.asarray(v) for k, v in probed[0]["hooks"]["heads"]["attn.pattern"].items()}
    visual = setup["visual"]
    for layer, attn in enumerate(setup["reference"]["attentions"]):
        for b in range(visual.shape[0]):
            rows = attn[b, :, -1]  # [H, N] at the last query
            keys = np.flatnonzero(visual[b])
            box = _box_tokens(visual[b], BOXES[b])
            assert box.size >= 2
            np.testing.assert_allclose(record["image_weight"][layer, b], rows[:, keys].sum(-1), **TOL)
            np.testing.assert_allclose(record["region_weight"][layer, b], rows[:, box].sum(-1), **TOL)
            a = rows[:, keys] / rows[:, keys].sum(-1, keepdims=True)
            c = 1 - (-(a * np.log(a + 1e-9)).sum(-1)) / np.log(len(keys))
            np.testing.assert_allclose(record["concentration"][layer, b], c, **TOL)
    scores = np.asarray(probes.head_detection_scores(probed[0]["hooks"]["heads"]["attn.pattern"]))
    layers = np.arange(LAYERS)[:, None]
    expected = record["image_weight"].mean(1) * record["concentration"].mean(1) / np.log(layers + math.e)
    np.testing.assert_allclose(scores, expected, **TOL)


# ---------------------------------------------------------------------------------------------------------------------
# Residual-stream metrics


def test_logit_lens(setup, probed):
    out, _, _, targets = probed
    record = {k: np.asarray(v) for k, v in out["hooks"]["lens"]["resid_post"].items()}
    state = setup["hf"].state_dict()
    scale = state["model.language_model.norm.weight"].double().numpy()
    unembedding = state["lm_head.weight"].double().numpy().T
    eps = setup["model"].config.text.rms_norm_eps
    n = setup["visual"].shape[1]
    positions = [n - 3, n - 1]
    for layer in range(LAYERS):
        h = setup["residuals"]["post"][layer][:, positions]  # [B, 2, D]
        logits = h / np.sqrt((h**2).mean(-1, keepdims=True) + eps) * scale @ unembedding
        if layer == LAYERS - 1:  # the last layer's lens is the model's own output
            np.testing.assert_allclose(logits, setup["reference"]["logits"][:, positions], **TOL)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1, kind="stable")[..., :3]
        np.testing.assert_array_equal(record["top_ids"][layer], order)
        np.testing.assert_allclose(record["top_probs"][layer], np.take_along_axis(probs, order, -1), **TOL)
        target_logit = np.take_along_axis(logits, np.broadcast_to(targets[:, :, None], (3, 2, 1)), -1)
        np.testing.assert_array_equal(record["target_rank"][layer], (logits > target_logit).sum(-1))
        np.testing.assert_allclose(record["target_prob"][layer],
                                   np.take_along_axis(probs, np.broadcast_to(targets[:, :, None], (3, 2, 1)), -1)[..., 0],
                                   **TOL)


def test_update_geometry(setup, probed):
    out = probed[0]
    residuals, visual, valid = setup["residuals"], setup["visual"], setup["valid"]
    for name, scope in (("geometry", valid), ("geometry_visual", valid & visual)):
        for site, before, after in (("resid_mid", "pre", "mid"), ("resid_post", "mid", "post")):
            record = {k: np.asarray(v) for k, v in out["hooks"][name][site].items()}
            for layer in range(LAYERS):
                for b in range(visual.shape[0]):
                    x_old = residuals[before][layer, b][scope[b]]
                    x_new = residuals[after][layer, b][scope[b]]
                    np.testing.assert_allclose(record["erank_before"][layer, b], _erank(x_old), **TOL)
                    np.testing.assert_allclose(record["erank_after"][layer, b], _erank(x_new), **TOL)
                    np.testing.assert_allclose(record["rid"][layer, b], _rid(x_new, x_old), **TOL)
                    np.testing.assert_allclose(record["mix_ig"][layer, b],
                                               _mixing_entropy(x_new) - _mixing_entropy(x_old), **TOL)


def test_hidden_states_at_chosen_layers_and_positions(setup, probed):
    record = np.asarray(probed[0]["hooks"]["states"]["resid_post"])
    n = setup["visual"].shape[1]
    assert record.shape[0] == 2  # only the two chosen layers are stored
    for i, layer in enumerate((0, 2)):
        np.testing.assert_allclose(record[i], setup["reference"]["hidden_states"][layer + 1][:, [n - 2, n - 1]], **TOL)


def test_capture_by_canonical_names(setup, probed):
    out, hooks, _, _ = probed
    assert out["hooks"]["blocks.2.attn.pattern"]["attn.pattern"].shape[0] == 1  # one layer stored, not all
    values = probes.read_captures(out, {k: v for k, v in hooks.items() if "." in k or k == "logits"},
                                  setup["model"].num_layers)
    valid = setup["valid"]
    np.testing.assert_allclose(np.asarray(values["blocks.2.attn.pattern"])[np.broadcast_to(
        valid[:, None, :, None], values["blocks.2.attn.pattern"].shape)],
        setup["reference"]["attentions"][2][np.broadcast_to(valid[:, None, :, None],
                                                            values["blocks.2.attn.pattern"].shape)], **TOL)
    np.testing.assert_allclose(np.asarray(values["logits"])[valid], setup["reference"]["logits"][valid], **TOL)
    with torch.no_grad():
        vision = setup["hf"].model.vision_tower(torch.as_tensor(setup["inputs"]["pixel_values"]),
                                                output_hidden_states=True).hidden_states[1].numpy()
    np.testing.assert_allclose(values["vision.blocks.0.resid_post"], vision, **TOL)


def test_capture_names_are_checked(setup):
    num_layers = setup["model"].num_layers
    with pytest.raises(VlmJaxError, match="Did you mean 'blocks.0.attn.pattern'"):
        probes.capture(["blocks.2.attn.patern"], num_layers)
    with pytest.raises(VlmJaxError, match="layer 4 out of range; blocks has layers 0..3"):
        probes.capture(["blocks.4.resid_post"], num_layers)
    with pytest.raises(VlmJaxError, match="Unknown site 'logit'"):
        probes.capture(["logit"], num_layers)


def test_region_box_outside_the_image_is_a_clear_error(setup):
    _, meta = setup["model"].prepare(setup["inputs"])
    with pytest.raises(VlmJaxError, match="lies outside the image"):
        probes.VisualHeadAttention.with_boxes(np.array([60, 60, 80, 80]), meta, (IMAGE_SIZE, IMAGE_SIZE))


def test_residual_update_cosine_real_vs_null_image(setup):
    model, hf = setup["model"], setup["hf"]
    ip = setup["processor"].image_processor
    null = iv.null_image(setup["inputs"]["pixel_values"], "black", ip.image_mean, ip.image_std)
    paired = probes.paired_inputs(setup["inputs"], null)
    record = np.asarray(model(**paired, hooks={"cos": probes.ResidualUpdateCosine()})["hooks"]["cos"]["resid_post"])
    residuals = _hf_residuals(hf, paired)
    update = residuals["post"] - residuals["pre"]  # [L, 2B, N, D]
    b = setup["visual"].shape[0]
    text = _text_after_image(setup["visual"], setup["valid"])
    for layer in range(LAYERS):
        for s in range(b):
            real, null_update = update[layer, s][text[s]], update[layer, b + s][text[s]]
            cos = (real * null_update).sum(-1) / np.linalg.norm(real, axis=-1) / np.linalg.norm(null_update, axis=-1)
            np.testing.assert_allclose(record[layer, s], cos.mean(), **TOL)
    assert record.shape == (LAYERS, b) and (record < 1 - 1e-4).any()  # the null image changes the updates


# ---------------------------------------------------------------------------------------------------------------------
# Gradient visual importance


def test_visual_gradient_importance_matches_torch_autograd(setup):
    model, hf = setup["model"], setup["hf"]
    targets = np.array([7, 30, 99])
    ours = np.asarray(probes.visual_gradient_importance(model, setup["inputs"], targets))
    outputs = []
    handles = [layer.register_forward_hook(lambda m, args, out: outputs.append(out))
               for layer in hf.model.language_model.layers]
    logits = hf(**_feed(setup["inputs"])).logits
    for handle in handles:
        handle.remove()
    target_logit = logits[torch.arange(3), -1, torch.as_tensor(targets)].sum()
    grads = torch.autograd.grad(target_logit, outputs)
    norms = np.stack([g.detach().double().norm(dim=-1).numpy() for g in grads])  # [L, B, N]
    visual = setup["visual"]
    expected = np.stack([[norms[layer, b][visual[b]].mean() for b in range(3)] for layer in range(LAYERS)])
    np.testing.assert_allclose(ours, expected, **TOL)
    assert ours.shape == (LAYERS, 3) and (ours[:-1] > 0).all()
    assert (ours[-1] == 0).all()  # the last layer's visual outputs no longer reach the query's logit


# ---------------------------------------------------------------------------------------------------------------------
# Memory: per-layer reduction never holds every layer's attention


@pytest.mark.slow
def test_visual_mass_memory_stays_per_layer(tmp_path_factory):
    """Compile (no run) on a 1000+ token batch: the temp buffers of the per-layer, per-head visual mass stay near the
    plain forward's and far below all layers' attention L*B*H*N*N*4 (which a capture of attn.pattern needs)."""
    path = tmp_path_factory.mktemp("tiny_long")
    make_tiny_llava(path, variant="gqa", text_layers=LAYERS, vision_layers=1, image_size=448)
    model = vlmjax.load(path, progress=False)
    tokens_per_image = model.config.tokens_per_image
    b, n = 2, tokens_per_image + 24
    heads = model.config.text.num_heads
    batch = {"input_ids": jax.ShapeDtypeStruct((b, n), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((b, n), jnp.bool_),
             "pixel_values": jax.ShapeDtypeStruct((b, 3, 448, 448), jnp.float32)}

    def temp_bytes(hooks, read):
        f = lambda params, batch: read(model.forward(params, batch, hooks, logits=None))
        return jax.jit(f).lower(model.params, batch).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes({}, lambda out: out["last_hidden_state"])
    mass = temp_bytes({"visual": probes.VisualAttention()}, lambda out: out["hooks"])
    every_layer = LAYERS * b * heads * n * n * 4
    one_layer = every_layer // LAYERS
    assert n > 1000
    assert mass < every_layer, (mass, every_layer)
    assert mass <= plain + one_layer, (mass, plain, one_layer)
    print(f"N={n}: temp bytes plain {plain}, visual mass {mass}; one layer's attention {one_layer}, "
          f"all layers' {every_layer}")


def test_rank_units_by_standardised_coefficient():
    from vlmjax.probes import rank_units

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4)) * np.array([0.01, 1.0, 2.0, 0.5])  # unit 0 barely varies
    w = np.array([50.0, 1.0, 0.2, 1.5])  # raw coefficients: |w| alone would rank unit 0 first
    std = x.std(axis=0)
    np.testing.assert_array_equal(rank_units(w, x), np.argsort(-np.abs(w) * std))
    assert rank_units(w, x).tolist() == [1, 3, 0, 2]  # |w| std about 0.5, 1.0, 0.4, 0.75; |w| alone: 0, 3, 1, 2
    scale = np.array([100.0, 1.0, 0.1, 3.0])  # rescaled units with compensating weights: the same probe, same order
    np.testing.assert_array_equal(rank_units(w / scale, x * scale), rank_units(w, x))
    assert rank_units([1.0, 1.0], np.ones((3, 2))).tolist() == [0, 1]  # ties (here zero variance): lower index first
    with pytest.raises(VlmJaxError, match="activations"):
        rank_units(w, x[:, :3])
