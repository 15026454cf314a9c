"""Interventions and probes on the families other than LLaVA-1.5 (tests/test_interventions.py and tests/test_probes.py
cover that one). The study-facing pieces whose inputs differ: the null image on packed Qwen2-VL patches and LLaVA-NeXT
crops (against the processor's own black image), top-attended patch removal and box regions on Qwen2-VL's (t, h, w)
grid (against NumPy on the token coordinates). On Qwen2.5-VL, PaliGemma 2 and InstructBLIP, each on a left-padded
pair of prompts: every intervention against the same change made with torch hooks on the HF model
(tests/hf_references.py), the visual-attention mass and the logit lens against NumPy on HF's attentions and hidden
states, and the bf16 forward against fp32."""

import numpy as np
import pytest
import torch
from PIL import Image

import vlmjax
from vlmjax import interventions as iv
from vlmjax import probes
from vlmjax.processors import IMAGE_PROMPT
from vlmjax.testing.tiny_instructblip import make_tiny_instructblip
from vlmjax.testing.tiny_llava_next import make_tiny_llava_next
from vlmjax.testing.tiny_paligemma import make_tiny_paligemma
from vlmjax.testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl
from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl
from vlmjax.verify import load_hf_model, run_hf

from tests import hf_references as ref

LAYERS = 3
PROMPTS = [f"USER: {IMAGE_PROMPT} is there a red circle ? ASSISTANT:", f"USER: {IMAGE_PROMPT} what ? ASSISTANT:"]


def _images(seed, sizes=((84, 112), (84, 112))):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")) for size in sizes]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    _, processor = make_tiny_qwen2_vl(path, text_layers=LAYERS)
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(images=_images(0), text=PROMPTS, return_tensors="np", padding=True))
    model = vlmjax.load(path, progress=False)
    assert not inputs["attention_mask"][1].all(), "the second prompt is shorter: left padding"
    return dict(path=path, processor=processor, inputs=inputs, model=model, meta=model.prepare(inputs)[1])


def test_null_image_on_packed_qwen2_vl_patches_is_the_processed_black_image(qwen):
    ip = qwen["processor"].image_processor
    black = ip(images=[Image.new("RGB", (112, 84))] * 2, return_tensors="np")["pixel_values"]
    ours = np.asarray(iv.null_image(qwen["inputs"]["pixel_values"], "black", ip.image_mean, ip.image_std))
    assert ours.shape == qwen["inputs"]["pixel_values"].shape == black.shape and ours.ndim == 2
    np.testing.assert_allclose(ours, black, rtol=0, atol=1e-6)


def test_null_image_on_llava_next_crops_is_the_processed_black_image(tmp_path):
    _, processor = make_tiny_llava_next(tmp_path)
    ip = processor.image_processor
    pixel_values = ip(images=_images(1, [(40, 60)] * 2), return_tensors="np")["pixel_values"]
    black = ip(images=[Image.new("RGB", (60, 40))] * 2, return_tensors="np")["pixel_values"]
    ours = np.asarray(iv.null_image(pixel_values, "black", ip.image_mean, ip.image_std))
    assert ours.ndim == 5 and ours.shape == pixel_values.shape == black.shape
    np.testing.assert_allclose(ours, black, rtol=0, atol=1e-6)  # the processor letterboxes in black too


def test_remove_top_attended_on_qwen2_vl_grid(qwen):
    meta, model = qwen["meta"], qwen["model"]
    assert all(len(image.grid) == 3 for image in meta.images)  # (t, h, w)
    visual = np.asarray(meta.mask)
    visual_map = np.where(visual, np.random.default_rng(2).random(visual.shape), 0)
    hook = iv.RemoveVisualTokens.top_attended(LAYERS, visual_map, meta, fraction=0.3)
    removed = np.asarray(hook.token_mask)
    for b in range(2):  # NumPy: the ceil(30%) highest-map visual tokens of the sample
        count = int(np.ceil(0.3 * visual[b].sum()))
        expected = np.zeros_like(visual[b])
        expected[np.argsort(-visual_map[b])[:count]] = True
        np.testing.assert_array_equal(removed[b], expected)
    out = model(**qwen["inputs"], hooks={"remove": hook}, logits="last")
    assert np.isfinite(np.asarray(out["logits"])).all()
    assert not np.allclose(out["logits"], model(**qwen["inputs"], logits="last")["logits"])


def test_head_attention_box_region_on_qwen2_vl_grid(qwen):
    meta = qwen["meta"]
    _, gh, gw = meta.images[0].grid
    size = (gh * 28, gw * 28)  # a merged token covers 28 x 28 pixels of the preprocessed image
    box = np.array([0, 0, size[1] / 2, size[0]])  # the left half
    hook = probes.VisualHeadAttention.with_boxes(box, meta, size)
    expected = np.asarray(meta.mask) & (np.asarray(meta.grid_col) < gw / 2)
    np.testing.assert_array_equal(np.asarray(hook.region_mask), expected)
    record = qwen["model"](**qwen["inputs"], hooks={"heads": hook}, logits=None)["hooks"]["heads"]["attn.pattern"]
    assert (np.asarray(record["region_weight"]) <= np.asarray(record["image_weight"]) + 1e-6).all()


# ---------------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL, PaliGemma 2 and InstructBLIP: every intervention against its torch-hook reference on the HF model
# (tests/hf_references.py), the probes against NumPy on HF's outputs, and bf16 against fp32


FAMILIES = {  # maker, processor text arguments, image sizes (height, width): a left-padded pair of prompts
    "qwen2_5_vl": (make_tiny_qwen2_5_vl, dict(text=PROMPTS), [(56, 56), (84, 112)]),  # 4 and 12 visual tokens
    "paligemma": (make_tiny_paligemma, dict(text=["<image>what is in the image ?", "<image>is there a red circle ?"],
                                            suffix=["yes", "no , the red circle is left of a blue square"]),
                  [(40, 30), (30, 40)]),  # Gemma 2: soft-caps, sliding window 8, prefix-LM prompt, causal suffix
    "instructblip": (make_tiny_instructblip, dict(text=["USER: what is in the image ? ASSISTANT:",
                                                        "USER: how many red circle are there ? ASSISTANT: the"]),
                     [(40, 60), (60, 60)]),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """The setup of `tests/hf_references.py`, with `base`: the interventions at identity and the probes, which every
    forward here carries so that one compile serves all (`records`: the probes' on the plain forward)."""
    make, text, sizes = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    _, processor = make(path, text_layers=LAYERS)
    inputs = dict(processor(images=_images(3, sizes), **text, return_tensors="np", padding=True))
    model = vlmjax.load(path, progress=False)
    visual, valid = np.asarray(model.prepare(inputs)[1].mask), inputs["attention_mask"].astype(bool)
    assert not valid.all() and valid[:, -1].all(), "left padding: the last position is each sample's last token"
    base = ref.identity(model, visual) + ref.Case({"visual": probes.VisualAttention(),
                                                   "lens": probes.LogitLens.from_model(model, k=3)})
    out = model(**inputs, hooks=base.hooks)
    return dict(path=path, model=model, hf=load_hf_model(path), inputs=inputs, visual=visual, valid=valid, base=base,
                plain=np.asarray(out["logits"]), records=out["hooks"])


def test_attention_bias_matches_hf_mask_edit(family):
    ref.assert_matches_hf(family, family["base"] + ref.visual_bias(family, [1, 2], 2.0))


def test_block_text_to_visual_and_remove_tokens_match_hf(family):
    ref.assert_matches_hf(family, family["base"] + ref.blocked_keys(family, [0, 2]))


def test_head_masks_both_conventions_match_hf(family):
    masks = ref.head_masks(family, uniform=[(0, 1), (2, 3)], zeroed=[(1, 2), (2, 0)])
    ref.assert_matches_hf(family, family["base"] + masks)


def test_zero_and_scale_visual_states_match_hf(family):
    ref.assert_matches_hf(family, family["base"] + ref.visual_states(family, knockout_layer=1, soft_layer=2))


def test_neuron_and_residual_dim_ablation_match_hf(family):
    ref.assert_matches_hf(family, family["base"] + ref.ablations(family, neuron_layer=0, dim_layer=1))


def test_noise_substitutions_match_hf(family):
    """Noise-Δ on every token at layer 1 (Gemma 2: the post-normed update), Noise-QKV on the visual tokens at layers
    0 and 2 (Qwen2's q/k/v biases kept), with the hooks' own draws."""
    ref.assert_matches_hf(family, family["base"] + ref.noise_substitutions(family, out_layer=1, qkv_layers=[0, 2]))


def test_visual_attention_and_logit_lens_match_numpy_on_hf(family):
    """Text-to-visual mass (T: real tokens after the last visual one) and the last query's, on HF's attentions; the
    lens at the last token on HF's hidden states through HF's final norm, LM head and logit soft-cap (the last
    layer's lens: HF's own logits)."""
    hf, visual, valid, records = family["hf"], family["visual"], family["valid"], family["records"]
    theirs = run_hf(hf, family["inputs"])
    mass = {k: np.asarray(records["visual"]["attn.pattern"][k]) for k in ("mass", "last_query_mass")}
    text = valid & (np.arange(visual.shape[1]) > np.array([np.flatnonzero(v).max() for v in visual])[:, None])
    for layer, attention in enumerate(theirs["attentions"]):
        for b in range(2):
            to_visual = attention[b][:, :, visual[b]].sum(-1)  # [H, N]
            np.testing.assert_allclose(mass["mass"][layer, b], to_visual[:, text[b]].mean(-1), atol=1e-5, rtol=0)
            np.testing.assert_allclose(mass["last_query_mass"][layer, b], to_visual[:, -1], atol=1e-5, rtol=0)
    cap = getattr(hf.config.get_text_config(), "final_logit_softcapping", None)
    with torch.no_grad():
        lens = [hf.get_output_embeddings()(hf.get_decoder().norm(torch.as_tensor(h[:, -1]))).double().numpy()
                for h in theirs["hidden_states"][1:-1]]
    lens = [x if cap is None else cap * np.tanh(x / cap) for x in lens] + [theirs["logits"][:, -1].astype(np.float64)]
    lens_record = records["lens"]["resid_post"]
    for layer, logits in enumerate(lens):
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :3]
        np.testing.assert_array_equal(np.asarray(lens_record["top_ids"])[layer, :, 0], order)
        np.testing.assert_allclose(np.asarray(lens_record["top_probs"])[layer, :, 0],
                                   np.take_along_axis(probs, order, -1), atol=1e-5, rtol=0)


def test_bfloat16_forward_agrees_with_float32(family):
    """Loaded in bf16: finite logits, the fp32 top-1 token at 90% of the real positions or more, KL(fp32 || bf16)
    below 1e-3 at every one."""
    bf16 = vlmjax.load(family["path"], dtype="bfloat16", progress=False)
    logits = np.asarray(bf16(**family["inputs"])["logits"], np.float64)
    assert str(bf16.dtype) == "bfloat16" and np.isfinite(logits).all()
    valid, plain = family["valid"], family["plain"].astype(np.float64)
    log_p = plain - np.logaddexp.reduce(plain, -1, keepdims=True)
    log_q = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)[valid]
    agree = (logits.argmax(-1) == plain.argmax(-1))[valid]
    assert agree.mean() >= 0.9 and kl.max() < 1e-3  # measured: >= 0.97 and <= 3e-5
